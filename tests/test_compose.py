"""lookupc composed with dynamic int8 quantization of the rest of the model."""

import pytest
import torch
from torch import nn

import lookupc
from lookupc.artifact.model_load import load_model
from lookupc.compose import quantize_rest


def test_int8_rest_keeps_lookup_ffns_and_quantizes_the_other_linears():
    loaded = load_model("examples.tiny_bert:factory", batch=2, seq_len=8)
    result = lookupc.convert(loaded.module, loaded.example_inputs)
    mixed = quantize_rest(result.module, "int8")
    kinds = {type(m).__module__ + "." + type(m).__name__ for m in mixed.modules()}
    assert any("quantized" in k and k.endswith("Linear") for k in kinds)
    assert not any(type(m) is nn.Linear for m in mixed.modules())  # every Linear quantized
    assert sum(isinstance(m, lookupc.LookupFFN) for m in mixed.modules()) == 2
    assert any(type(m) is nn.Linear for m in result.module.modules())  # original untouched
    with torch.no_grad(), lookupc.set_schedule("cpu"):
        want = result.module(*loaded.example_inputs)
        got = mixed(*loaded.example_inputs)
    cos = torch.nn.functional.cosine_similarity(got.mean(1), want.mean(1), dim=-1)
    assert cos.min() > 0.99, cos


def test_bad_rest_dtype_is_a_clear_error():
    with pytest.raises(lookupc.LookupcInputError, match="rest dtype"):
        quantize_rest(nn.Linear(2, 2), "int4")


def test_bf16_rest_computes_in_bf16_and_returns_float32():
    from lookupc.compose import Bf16Linear

    loaded = load_model("examples.tiny_bert:factory", batch=2, seq_len=8)
    result = lookupc.convert(loaded.module, loaded.example_inputs)
    mixed = quantize_rest(result.module, "bfloat16")
    assert not any(type(m) is nn.Linear for m in mixed.modules())
    assert any(isinstance(m, Bf16Linear) for m in mixed.modules())
    assert sum(isinstance(m, lookupc.LookupFFN) for m in mixed.modules()) == 2
    with torch.no_grad():
        want = result.module(*loaded.example_inputs)
        got = mixed(*loaded.example_inputs)
    assert got.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(got.mean(1), want.mean(1), dim=-1)
    assert cos.min() > 0.99, cos


class _TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4, bias=False)

    def forward(self, x, w):
        # the third linear takes its weight from an input: not a constant, left alone
        return torch.nn.functional.linear(self.b(torch.relu(self.a(x))), w)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_graph_form_equals_the_module_form(dtype):
    from lookupc.compose import quantize_rest_graph

    torch.manual_seed(0)
    model, x, w = _TwoLinears().eval(), torch.randn(2, 3, 8), torch.randn(5, 4)
    gm = torch.export.export(model, (x, w)).module()
    assert quantize_rest_graph(gm, dtype) == 2
    linears = [n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 1  # the input-weight linear stays
    with torch.no_grad():
        want = quantize_rest(model, dtype)(x, w)
        got = gm(x, w)
        exact = model(x, w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert 0 < (got - exact).abs().max() < 0.05  # really quantized, and close


def test_graph_form_float32_changes_nothing():
    from lookupc.compose import quantize_rest_graph

    gm = torch.export.export(_TwoLinears(), (torch.randn(2, 8), torch.randn(5, 4))).module()
    before = gm.code
    assert quantize_rest_graph(gm, "float32") == 0 and gm.code == before


def test_artifact_runs_its_rest_layers_in_the_compiled_dtype(tmp_path):
    """``compile_artifact(rest_dtype="int8")`` records the dtype and its measured fidelity;
    ``lookupc.load`` applies it, and ``rest_dtype="float32"`` gives the exact outputs back."""
    from lookupc.artifact.compile import compile_artifact
    from lookupc.targets import host_target

    loaded = load_model("examples.tiny_bert:factory", batch=2, seq_len=8)
    torch.manual_seed(3)
    result = lookupc.convert(loaded.module, loaded.example_inputs)
    out = tmp_path / "tiny.lookupc"
    manifest, check = compile_artifact(result, loaded, host_target(), out, rest_dtype="int8")
    rest = manifest["rest"]
    assert rest["dtype"] == "int8" and rest["linears"] > 0
    assert 0.99 < rest["cosine_min"] < 1.0 and rest["max_abs_err"] > 0
    assert "in int8: output cosine" in check

    quantized = lookupc.load(out, trust_artifact=True)
    exact = lookupc.load(out, trust_artifact=True, rest_dtype="float32")
    assert quantized.rest_dtype == "int8" and quantized.rest_linears == rest["linears"]
    assert exact.rest_linears == 0
    got, want = quantized(*loaded.example_inputs)[0], exact(*loaded.example_inputs)[0]
    with torch.no_grad(), lookupc.set_schedule("reference"):
        eager = result.module(*loaded.example_inputs)
    torch.testing.assert_close(want, eager, rtol=1e-4, atol=1e-4)
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1), dim=-1)
    assert cos.min() > 0.99 and not torch.equal(got, want)

    with pytest.raises(lookupc.LookupcInputError, match="rest dtype"):
        compile_artifact(result, loaded, host_target(), tmp_path / "bad", rest_dtype="int4")


def test_cli_compile_and_run_with_an_int8_rest(tmp_path):
    from click.testing import CliRunner

    from lookupc.cli.main import cli

    out = tmp_path / "tiny.lookupc"
    r = CliRunner().invoke(cli, ["compile", "examples.tiny_bert:factory", "-o", str(out),
                                 "--seq-len", "8", "--rest-dtype", "int8"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "rest layers in int8" in r.output and "in int8: output cosine" in r.output
    r = CliRunner().invoke(cli, ["run", str(out), "--trust-artifact", "--repeat", "0"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "rest layers in float32 for the check; they run in int8" in r.output
    assert "OK" in r.output or "ok" in r.output.lower()
    r = CliRunner().invoke(cli, ["run", str(out), "--trust-artifact", "--repeat", "0",
                                 "--rest-dtype", "float32"])
    assert r.exit_code == 0 and "they run in" not in r.output
