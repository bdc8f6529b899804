"""The artifact: layout, outputs equal to the converted model, tamper and version detection,
and refusal on hosts that cannot execute the target."""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

from click.testing import CliRunner  # noqa: E402

import lookupc  # noqa: E402
from lookupc.artifact import format as art  # noqa: E402
from lookupc.artifact.compile import compile_artifact  # noqa: E402
from lookupc.artifact.export import export_program  # noqa: E402
from lookupc.artifact.model_load import load_model  # noqa: E402
from lookupc.artifact.tensor_files import save_inputs  # noqa: E402
from lookupc.cli.main import cli  # noqa: E402
from lookupc.targets import host_target, parse_target  # noqa: E402


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """``lookupc compile`` of tiny_bert (batch 2 x 8 tokens) for this host, and the same
    conversion (same seed) done in this process."""
    out = tmp_path_factory.mktemp("artifact") / "tiny_bert.lookupc"
    cli_result = CliRunner().invoke(cli, ["compile", "examples.tiny_bert:factory", "-o", str(out),
                                          "--seq-len", "8", "--seed", "3"])
    assert cli_result.exit_code == 0, (cli_result.stderr, cli_result.exception)
    manifest = json.loads((out / "manifest.json").read_text())
    loaded = load_model("examples.tiny_bert:factory", batch=2, seq_len=8)
    torch.manual_seed(3)
    result = lookupc.convert(loaded.module, loaded.example_inputs)
    return out, manifest, cli_result.stdout, result, loaded


@pytest.fixture(scope="module")
def exported(compiled):
    _, _, _, result, loaded = compiled
    return export_program(result.module, loaded.example_inputs)


def _reference(module, inputs):
    with torch.no_grad(), lookupc.set_schedule("reference"):
        return module(*inputs)


def test_layout_and_manifest(compiled):
    out, manifest, check, result, _ = compiled
    names = sorted(p.name for p in out.iterdir())
    assert names == ["inputs.safetensors", "kernels.so", "manifest.json", "model.pt2"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    for name, meta in manifest["files"].items():
        assert meta["sha256"] == art.sha256_file(out / name)
        assert meta["bytes"] == (out / name).stat().st_size
    assert manifest["versions"]["torch"] == torch.__version__.split("+")[0]
    assert manifest["versions"]["tvm"] == art.versions()["tvm"]
    assert manifest["target"] == host_target().to_dict() and manifest["schedule"] == "hand"
    assert manifest["kernels"] == [{"d_in": 128, "d_out": 128, "tables": 32, "bits": 8,
                                    "block_size": 64, "repeats": 2,
                                    "table_dtype": "float32"}]
    assert [c["module"] for c in manifest["config"]] == [
        n for n, m in result.module.named_modules() if isinstance(m, lookupc.LookupFFN)]
    assert manifest["program"]["inputs"] == [{"name": "input_0", "shape": [2, 8],
                                              "dtype": "int64"}]
    assert manifest["program"]["dynamic_dims"] is True
    assert "2 FFN(s) replaced" in check and "max abs diff" in check


def test_outputs_match_the_converted_model(compiled):
    out, _, _, result, loaded = compiled
    model = lookupc.load(out)
    assert isinstance(model, torch.nn.Module)
    # the program's lookupc ops really run the library's kernels
    calls = []
    provider = model.provider
    orig = provider.gather
    provider.gather = lambda *a: calls.append(1) or orig(*a)
    try:
        for ids in (loaded.example_inputs[0], torch.randint(0, 1000, (1, 13)),
                    torch.randint(0, 1000, (3, 40))):  # compiled for 2x8; others still run
            (got,) = model(ids)
            want = _reference(result.module, (ids,))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        provider.gather = orig
    assert len(calls) == 3 * 2  # two LookupFFNs per call


def test_artifact_kernels_equal_the_reference_ops_bit_for_bit_on_codes(compiled):
    out, _, _, result, loaded = compiled
    model = lookupc.load(out)
    lookup = next(m for m in result.module.modules() if isinstance(m, lookupc.LookupFFN))
    x = torch.randn(37, 128)
    codes, scores = model.provider.hash(x, lookup.bh4_weight, lookup.hash_bias,
                                        lookup.config.decay, lookup.config.bits)
    want_scores, want_codes = lookupc.reference.codes_scores(
        lookupc.reference.hash_forward(x, lookup.bh4_weight, lookup.hash_bias,
                                       lookup.config.decay), lookup.config.bits)[::-1]
    assert torch.equal(codes, want_codes.to(torch.int32))
    torch.testing.assert_close(scores, want_scores, rtol=1e-4, atol=1e-6)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "model.pt2").write_bytes((d / "model.pt2").read_bytes()[:-100]),
     "model.pt2 is truncated"),
    (lambda d: _flip_byte(d / "kernels.so"), "kernels.so was modified"),
    (lambda d: (d / "inputs.safetensors").unlink(), "inputs.safetensors is missing"),
    (lambda d: _edit_manifest(d, lambda m: m.update(schedule="naive")), "manifest was edited"),
    (lambda d: _edit_manifest(d, lambda m: m["versions"].update(torch="2.99.0"), rehash=True),
     "built with torch 2.99.0, this machine has torch"),
    (lambda d: _edit_manifest(d, lambda m: m["versions"].update(tvm="0.1"), rehash=True),
     "kernel library ABI must match"),
    (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
])
def test_tampered_artifacts_are_refused(compiled, tmp_path, damage, needle):
    d = _copy(compiled[0], tmp_path / "a")
    damage(d)
    with pytest.raises(art.ArtifactError, match=needle.replace(".", r"\.")):
        lookupc.load(d)


def test_version_check_can_be_waived(compiled, tmp_path):
    d = _copy(compiled[0], tmp_path / "a")
    _edit_manifest(d, lambda m: m["versions"].update(lookupc="0.0.1"), rehash=True)
    with pytest.raises(art.ArtifactError, match="lookupc 0.0.1"):
        art.verify(d)
    assert art.verify(d, check_versions=False)["versions"]["lookupc"] == "0.0.1"


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_manifest(d: Path, edit, rehash: bool = False) -> None:
    p = d / "manifest.json"
    m = json.loads(p.read_text())
    edit(m)
    if rehash:
        m["manifest_sha256"] = art._manifest_digest(m)
    p.write_text(json.dumps(m))


def _cross_compile(compiled, exported, tmp_path, target: str) -> Path:
    _, _, _, result, loaded = compiled
    out = tmp_path / "cross"
    manifest, check = compile_artifact(result, loaded, parse_target(target), out,
                                       schedule="naive", exported=exported)
    assert check.startswith("check   not run: this machine cannot execute the target")
    return out


def test_cross_arch_artifact_is_written_but_refused_here(compiled, exported, tmp_path):
    out = _cross_compile(compiled, exported, tmp_path,
                         "llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1")
    manifest = art.verify(out)  # intact, just not for this machine
    assert manifest["library"] == "kernels.tar" and (out / "kernels.tar").stat().st_size > 0
    assert manifest["target"]["mcpu"] == "neoverse-n1"
    with pytest.raises(art.ArtifactError, match="cannot run this artifact here: it was compiled "
                                                "for aarch64"):
        lookupc.load(out)


@pytest.mark.slow
def test_missing_isa_extension_is_refused(compiled, exported, tmp_path):
    flags = Path("/proc/cpuinfo").read_text()
    if "avx512f" in flags or "flags" not in flags:
        pytest.skip("needs an x86 host without AVX-512")
    out = _cross_compile(compiled, exported, tmp_path,
                         "llvm -mcpu=skylake-avx512 -mattr=+avx512f")
    with pytest.raises(art.ArtifactError, match="avx512f.*which this CPU .* lacks"):
        lookupc.load(out)


def test_refuses_to_overwrite_without_force(compiled, tmp_path):
    out, _, _, result, loaded = compiled
    r = CliRunner().invoke(cli, ["compile", "examples.tiny_bert:factory", "-o", str(out)])
    assert r.exit_code != 0 and "artifact exists; pass --force" in r.stderr
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep")
    with pytest.raises(lookupc.LookupcInputError, match="not a lookupc artifact"):
        compile_artifact(result, loaded, host_target(), tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep"


def test_cli_run_and_inspect(compiled, tmp_path):
    out, _, _, result, _ = compiled
    # another token count than compiled, from an input file; outputs saved
    ids = torch.randint(0, 1000, (1, 21))
    save_inputs((ids,), str(tmp_path / "in.safetensors"))
    r = CliRunner().invoke(cli, ["run", str(out), "--input", str(tmp_path / "in.safetensors"),
                                 "-o", str(tmp_path / "y.pt"), "--repeat", "1"])
    assert r.exit_code == 0, (r.stderr, r.exception)
    assert "output  output: (1, 21, 128) float32" in r.stdout
    line = next(l for l in r.stdout.splitlines() if l.startswith("check "))
    assert line.endswith(": ok") and "tolerance" in line, line
    err = float(line.split("max abs diff ")[1].split()[0])
    assert err < 1e-4
    y = torch.load(tmp_path / "y.pt", weights_only=True)["input_0"]
    torch.testing.assert_close(y, _reference(result.module, (ids,)), rtol=1e-4, atol=1e-4)
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "verify     ok" in r.stdout and "runs here  yes" in r.stdout


def test_cli_refuses_a_tampered_artifact_in_one_line(compiled, tmp_path):
    d = _copy(compiled[0], tmp_path / "a")
    _flip_byte(d / "kernels.so")
    r = CliRunner().invoke(cli, ["run", str(d)])
    assert r.exit_code != 0 and "kernels.so was modified" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
    r = CliRunner().invoke(cli, ["inspect", str(d)])
    assert "FAILED: kernels.so was modified" in r.stdout


def _wrong_gather(monkeypatch):
    """Kernels whose gather output is negated: what a miscompiled kernel looks like to a user
    (a constant offset would not do: the model's LayerNorm removes it)."""
    from lookupc.runtime.compiled import Kernels

    right = Kernels.gather
    monkeypatch.setattr(Kernels, "gather", lambda self, *a: -right(self, *a))


def test_run_fails_when_the_kernels_disagree_with_the_reference(compiled, monkeypatch):
    _wrong_gather(monkeypatch)
    r = CliRunner().invoke(cli, ["run", str(compiled[0]), "--repeat", "0"])
    assert r.exit_code != 0
    err = r.stderr.strip().splitlines()[-1]  # after the "loading ..." progress line
    assert err.startswith("Error: ") and "exceeds the float32 tolerance" in err, err
    assert "max abs diff" in err and "compute wrong outputs" in err
    # the check can be skipped explicitly
    assert CliRunner().invoke(cli, ["run", str(compiled[0]), "--repeat", "0",
                                    "--no-check"]).exit_code == 0


def test_compile_fails_when_the_kernels_disagree_with_the_reference(monkeypatch, tmp_path):
    _wrong_gather(monkeypatch)
    out = tmp_path / "bad.lookupc"
    r = CliRunner().invoke(cli, ["compile", "examples.tiny_bert:factory", "-o", str(out),
                                 "--seq-len", "8"])
    assert r.exit_code != 0
    err = r.stderr.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("Error: ") and "exceeds the float32 tolerance" in err, err
    assert "do not deploy it" in err and str(out) in err


def test_output_check_tolerance():
    from lookupc.artifact.output_check import RTOL, compare_outputs

    ref = [torch.full((2, 3), 4.0)]
    assert compare_outputs([ref[0] + 1e-6], ref).ok
    bad = compare_outputs([ref[0] + 0.1], ref)
    assert not bad.ok and bad.tolerance == pytest.approx(4 * RTOL)
    assert not compare_outputs([ref[0] * float("nan")], ref).ok
    with pytest.raises(lookupc.LookupcError, match="outputs"):
        compare_outputs(ref * 2, ref)


def test_too_long_input_is_a_clear_error(compiled):
    model = lookupc.load(compiled[0])
    with pytest.raises(lookupc.LookupcInputError, match=r"cannot run inputs of shape \(1, 600\)"):
        model(torch.randint(0, 100, (1, 600)))
