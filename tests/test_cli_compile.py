"""``lookupc inspect / convert / compile / run`` end to end on a small Hugging Face BERT saved
with ``save_pretrained`` (the bundled example's run is in test_artifact.py)."""

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("tvm")

import lookupc  # noqa: E402
from lookupc.cli import cli  # noqa: E402
from lookupc.model_io import load_model  # noqa: E402


def _ok(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


@pytest.fixture(scope="module")
def hf_bert_dir(tmp_path_factory):
    from cli_models import make_hf_bert

    return make_hf_bert(tmp_path_factory.mktemp("hf_bert"))


def test_hf_bert_convert_compile_run(hf_bert_dir, tmp_path):
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

    out = tmp_path / "bert.lookupc"
    r = _ok(["compile", hf_bert_dir, "-o", out, "--seq-len", "8", "--schedule", "naive"])
    assert "max abs diff" in r.stdout
    r = _ok(["run", out, "--repeat", "0"])
    assert "output  last_hidden_state: (2, 8, 64)" in r.stdout
    assert "output  pooler_output: (2, 64)" in r.stdout

    # the artifact computes what the converted HF model computes in PyTorch
    loaded = load_model(str(hf_bert_dir), seq_len=8)
    torch.manual_seed(0)
    model = lookupc.load(out)
    got = model(ids, torch.ones_like(ids))
    want = model.run(ids, torch.ones_like(ids), schedule="reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert loaded.input_names == [i["name"] for i in model.manifest["program"]["inputs"]]

    # the converted .pt2 is a MODEL too
    r = _ok(["inspect", pt2])
    assert "0 FFN(s) replaced" in r.stdout or "skipped" in r.stdout
