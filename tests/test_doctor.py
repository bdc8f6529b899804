"""``lookupc doctor`` runs in the default suite without its benchmark and names the
provider the ops really use."""

import json

from click.testing import CliRunner

from lookupc.cli.main import cli


def test_doctor_without_bench(tmp_path):
    js = tmp_path / "d.json"
    r = CliRunner().invoke(cli, ["doctor", "--no-bench", "--json", str(js)])
    assert r.exit_code == 0, (r.stderr, r.exception)
    out = r.stdout
    for head in ("cpu ", "threads ", "versions ", "cache ", "dispatch "):
        assert any(line.startswith(head) for line in out.splitlines()), (head, out)
    report = json.loads(js.read_text())
    d = report["dispatch"]
    # the default schedule runs the reference on CPU; 'cpu' really gets the TVM provider
    assert d["default_provider"] == "_ReferenceProvider" and "set_schedule('cpu')" in out
    assert d["cpu_provider"] == "TvmProvider" and d["cpu_kernels"] == "built and loaded"
    assert "bench" not in report
    assert set(report["cpu"]["isa"]) >= {"avx2", "avx512f", "avx512_bf16"}


def test_doctor_on_an_artifact_and_a_missing_one(tmp_path):
    r = CliRunner().invoke(cli, ["doctor", "--no-bench", str(tmp_path / "nope")])
    assert r.exit_code == 0
    assert "artifact" in r.stdout and "no such artifact directory" in r.stdout
