"""``lookupc compare`` (table, JSON, PNG from bench/ffn.py's timing) and ``lookupc tune``."""

import json

import pytest
from click.testing import CliRunner

pytest.importorskip("tvm")

from lookupc.cli.main import cli  # noqa: E402


def test_compare_writes_table_json_and_png(tmp_path):
    js, png = tmp_path / "c.json", tmp_path / "c.png"
    r = CliRunner().invoke(cli, ["compare", "--config", "64x256", "--tokens", "32",
                                 "--repeats", "3", "--schedules", "hand", "--no-torch-compile",
                                 "--json", str(js), "--plot", str(png)])
    assert r.exit_code == 0, (r.stderr, r.exception)
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("config"))
    variants = [line.split()[1] for line in lines[header + 2:] if line.startswith("64x256")]
    # the dense FFN as a CPU user would run it instead (bf16, int8 dynamic) in the same run
    assert variants == ["dense", "dense-bf16", "dense-int8-dynamic", "lookup-reference",
                        "tvm-hand"]
    data = json.loads(js.read_text())
    assert data["configs"]["64x256"] == {"d_model": 64, "d_hidden": 256, "tables": 16,
                                         "bits": 8, "block_size": 64, "decay": 0.7,
                                         "table_dtype": "float32"}
    rows = {row["variant"]: row for row in data["rows"]}
    assert set(rows) == {"dense", "dense-bf16", "dense-int8-dynamic", "lookup-reference",
                         "tvm-hand"}
    best = min(rows[v]["ms_median"] for v in ("dense", "dense-bf16", "dense-int8-dynamic"))
    for row in rows.values():
        assert row["speedup_vs_best_dense"] == pytest.approx(best / row["ms_median"])
    for row in rows.values():
        assert row["tokens"] == 32 and row["runs"] == 3 and 0 < row["ms_min"] <= row["ms_median"]
    # speed-ups are relative to the dense median of the same run
    dense = rows["dense"]["ms_median"]
    hand = rows["tvm-hand"]
    assert hand["speedup_vs_dense"] == pytest.approx(dense / hand["ms_median"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize("args, needle", [
    (["compare", "--config", "huge"], "unknown --config 'huge'"),
    (["compare", "--schedules", "hand,fast"], "unknown schedule(s) fast"),
    (["tune", "--db", "x"], "give a MODEL or --config NAME"),
    (["tune", "--config", "paper", "--db", "x", "--target",
      "llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1"], "cannot tune for"),
])
def test_compare_and_tune_errors(args, needle):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code != 0 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_tune_is_resumable_and_feeds_compile(tmp_path):
    db = tmp_path / "db"
    args = ["tune", "--config", "64x256", "--db", str(db), "--trials", "2",
            "--cost-model", "random"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert (db / "database_tuning_record.json").stat().st_size > 0
    records = (db / "database_tuning_record.json").read_text().count("\n")
    r = CliRunner().invoke(cli, args)  # everything recorded: nothing is measured again
    assert r.exit_code == 0 and r.stderr.count("skipped") == 2
    assert (db / "database_tuning_record.json").read_text().count("\n") == records
