"""``lookupc inspect / convert / compile / run`` end to end on a small Hugging Face BERT saved
with ``save_pretrained`` (the bundled example's run is in test_artifact.py)."""

import json

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("tvm")

import lookupc  # noqa: E402
from lookupc.artifact.export import export_program  # noqa: E402
from lookupc.artifact.model_load import load_model  # noqa: E402
from lookupc.cli.main import cli  # noqa: E402
from lookupc.errors import LookupcInputError  # noqa: E402


def _ok(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def hf_bert_dir(tmp_path_factory):
    from cli_models import make_hf_bert

    return make_hf_bert(tmp_path_factory.mktemp("hf_bert"))


def test_hf_bert_inspect_convert_compile_run(hf_bert_dir, tmp_path):
    r = _ok(["inspect", hf_bert_dir, "--seq-len", "8"])
    assert "2 FFN(s) replaced" in r.stdout and "64-256-64" in r.stdout

    pt2 = tmp_path / "bert.pt2"
    r = _ok(["convert", hf_bert_dir, "-o", pt2, "--seq-len", "8"])
    assert "flattened to a tuple (last_hidden_state, pooler_output)" in r.stderr
    program = torch.export.load(pt2)
    targets = {str(n.target) for n in program.graph.nodes}
    assert {"lookupc.hash.default", "lookupc.gather.default"} <= targets
    ids = torch.randint(0, 100, (2, 11))
    outs = program.module()(ids, torch.ones_like(ids))
    assert isinstance(outs, tuple) and outs[0].shape == (2, 11, 64)

    # the converted .pt2 is a MODEL too: compiled as it is, same outputs as the program
    out = tmp_path / "bert.lookupc"
    r = _ok(["compile", pt2, "-o", out, "--schedule", "naive"])
    assert "already converted: 2 LookupFFN(s)" in r.stdout and "max abs diff" in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["tables"] for c in manifest["config"]] == [16, 16]
    assert manifest["program"]["outputs"] == ["last_hidden_state", "pooler_output"]
    r = _ok(["run", out, "--repeat", "0"])
    assert "output  last_hidden_state: (2, 8, 64)" in r.stdout
    assert "output  pooler_output: (2, 64)" in r.stdout
    got = lookupc.load(out)(ids, torch.ones_like(ids))
    for a, b in zip(got, outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_hf_bert_dir_compiles_directly(hf_bert_dir, tmp_path):
    out = tmp_path / "bert.lookupc"
    r = _ok(["compile", hf_bert_dir, "-o", out, "--seq-len", "8", "--schedule", "hand"])
    assert "max abs diff" in r.stdout
    loaded = load_model(str(hf_bert_dir), seq_len=8)
    model = lookupc.load(out)
    assert loaded.input_names == [i["name"] for i in model.manifest["program"]["inputs"]]
    ids = torch.randint(0, 100, (3, 17))
    got = model(ids, torch.ones_like(ids))
    want = model.run(ids, torch.ones_like(ids), schedule="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_hf_model_dir_loads_locally(hf_bert_dir):
    loaded = load_model(str(hf_bert_dir), batch=2, seq_len=12)
    assert loaded.kind == "hf" and loaded.input_names == ["input_ids", "attention_mask"]
    ids, mask = loaded.example_inputs
    assert ids.shape == mask.shape == (2, 12) and int(ids.max()) < 100
    with pytest.raises(LookupcInputError, match="max_position_embeddings=64"):
        load_model(str(hf_bert_dir), seq_len=65)


def test_hf_outputs_are_flattened_for_export(hf_bert_dir, tmp_path):
    loaded = load_model(str(hf_bert_dir), batch=2, seq_len=8)
    program, names, flattened, dynamic = export_program(loaded.module, loaded.example_inputs)
    assert flattened and names == ["last_hidden_state", "pooler_output"]
    torch.export.save(program, tmp_path / "m.pt2")
    back = torch.export.load(tmp_path / "m.pt2").module()
    ids = torch.randint(0, 100, (3, 5))
    got = back(ids, torch.ones_like(ids))
    want = loaded.module(ids, torch.ones_like(ids))
    assert isinstance(got, tuple) and len(got) == 2 and dynamic
    torch.testing.assert_close(got[0], want.last_hidden_state)
    torch.testing.assert_close(got[1], want.pooler_output)
    # the .pt2 is itself a MODEL, with the stored example inputs
    again = load_model(str(tmp_path / "m.pt2"))
    assert again.kind == "pt2" and again.example_inputs[0].shape == (2, 8)
