"""Frontend on small hand-written models: matching, golden graphs, negatives, API contract."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch
from torch import fx, nn

import lookupc
from lookupc.errors import LookupcInputError, PassError
from lookupc.passes import activation
from lookupc.passes.infra import PassResult, run_passes

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))
import tiny_models as tm  # noqa: E402

LOOKUP = ["lookupc.hash", "getitem", "getitem", "lookupc.gather"]

# Golden aten call sequences of the exported model, before and after conversion.
GOLDEN = {
    "module": (["linear", "gelu", "linear"], LOOKUP),
    "module_tanh": (["linear", "gelu", "linear"], LOOKUP),
    "module_dropout": (["linear", "gelu", "dropout", "linear"], LOOKUP),
    "functional": (["linear", "gelu", "linear", "add"], LOOKUP + ["add"]),
    "functional_tanh": (["linear", "gelu", "linear", "add"], LOOKUP + ["add"]),
    "written_tanh": (["linear", "pow", "mul", "add", "mul", "mul", "tanh", "add", "mul",
                      "dropout", "linear"], LOOKUP),
    "nested": (["layer_norm", "linear", "gelu", "dropout", "linear", "add",
                "layer_norm", "linear", "gelu", "linear", "add", "add", "linear"],
               ["layer_norm", *LOOKUP, "add", "layer_norm", *LOOKUP, "add", "add", "linear"]),
    "shared_act": (["linear", "gelu", "linear", "add"] * 2, (LOOKUP + ["add"]) * 2),
    "matmul": (["numpy_T", "matmul", "add", "gelu", "numpy_T", "matmul", "add"], LOOKUP),
    # the functional dropout stays in the layer and acts on the LookupFFN output
    "bart_like": (["linear", "gelu", "dropout", "linear", "add", "layer_norm"],
                  LOOKUP + ["dropout", "add", "layer_norm"]),
}
FORM = {"functional": "functional", "functional_tanh": "functional",
        "written_tanh": "functional", "shared_act": "functional"}
ACTIVATION = {"module": "gelu", "module_tanh": "gelu_tanh", "module_dropout": "gelu",
              "functional": "gelu", "functional_tanh": "gelu_tanh", "written_tanh": "gelu_tanh",
              "nested": "gelu", "shared_act": "gelu", "matmul": "gelu", "bart_like": "gelu"}
NEGATIVE_REASON = {"relu": "not GELU", "silu": "not GELU", "quick_gelu": "not GELU",
                   "swiglu": "gated", "geglu": "gated", "hidden_twice": "also used",
                   "norm_between": "not to a Linear"}


def _short(target) -> str:
    s = str(target)
    if "getitem" in s:
        return "getitem"
    s = s.removeprefix("aten.")
    return s.split(".")[0] if not s.startswith("lookupc.") else ".".join(s.split(".")[:2])


def exported_targets(model: nn.Module, x: torch.Tensor) -> list[str]:
    ep = torch.export.export(copy.deepcopy(model).eval(), (x,), strict=False)
    return [_short(n.target) for n in ep.graph.nodes if n.op == "call_function"]


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        y = model(x)
    model.train(was)
    return y


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 5, tm.D, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def converted(x):
    torch.manual_seed(0)
    models = tm.positive_models()
    return {k: (m, lookupc.convert(m, (x,))) for k, m in models.items()}


@pytest.mark.parametrize("name", sorted(tm.EXPECTED))
def test_find_ffns_positive(name, x):
    model = tm.positive_models()[name]
    found = lookupc.find_ffns(model, (x,))
    assert len(found) == tm.EXPECTED[name]
    assert found.skipped == []
    for f in found:
        assert (f.d_in, f.d_hidden, f.d_out) == (tm.D, tm.H, tm.D)
        assert f.activation == ACTIVATION[name]
        if name != "nested":
            assert f.form == FORM.get(name, "module")


def test_locations_are_module_paths(x):
    found = lookupc.find_ffns(tm.Nested(), (x,))
    assert [f.name for f in found] == ["blocks.0.mlp.fc1", "blocks.1.mlp.w1"]
    assert [f.form for f in found] == ["module", "functional"]
    assert found[0].act_modules == ("blocks.0.mlp.act", "blocks.0.mlp.drop")


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_graphs(name, converted, x):
    model, result = converted[name]
    before, after = GOLDEN[name]
    assert exported_targets(model, x) == before
    assert exported_targets(result.module, x) == after
    assert len(result.report.matched) == tm.EXPECTED[name]


@pytest.mark.parametrize("name", ["functional", "written_tanh"])
def test_functional_rewrite_graph(name, converted):
    _, result = converted[name]
    gm = result.module
    assert isinstance(gm, fx.GraphModule)
    gm.graph.lint()
    ops = [(n.op, str(n.target)) for n in gm.graph.nodes]
    assert ("call_module", "lookup_ffn_0") in ops
    assert not any("linear" in t or "gelu" in t or "tanh" in t for _, t in ops)
    assert isinstance(gm.lookup_ffn_0, lookupc.LookupFFN)
    # the replaced parameters are gone from the rewritten module
    assert not any(k.startswith(("w1", "w2", "fc1", "fc2")) for k in gm.state_dict())


def test_nested_functional_graph_put_back(converted):
    _, result = converted["nested"]
    mlp = result.module.blocks[1].mlp
    assert isinstance(mlp, fx.GraphModule)
    mlp.graph.lint()
    assert [r.slot for r in result.replacements] == ["blocks.0.mlp.fc1",
                                                     "blocks.1.mlp.lookup_ffn_0"]
    assert isinstance(result.module.blocks[0].mlp.fc2, nn.Identity)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_dense_replacement_reproduces_original(name, converted, x):
    """Putting each replacement's dense copy in its slot gives the original bit for bit."""
    model, result = converted[name]
    module = copy.deepcopy(result.module)
    for r in copy.deepcopy(result.replacements):
        assert not r.dense.training
        module.set_submodule(r.slot, r.dense)
    assert torch.equal(eval_out(module, x), eval_out(model, x))


def test_replacement_interface(converted, x):
    model, result = converted["module"]
    (rep,), (matched,) = result.replacements, result.report.matched
    assert rep.name == matched.name == "fc1"
    assert rep.lookup is result.module.fc1
    assert all(p is not q for p in rep.dense.parameters() for q in result.module.parameters())
    assert all(p is not q for p in rep.dense.parameters() for q in model.parameters())
    ref = model.fc2(model.act(model.fc1(x)))
    assert torch.equal(rep.dense(x), ref)
    # the converted module computes the LookupFFN where the FFN was
    assert torch.equal(eval_out(result.module, x), rep.lookup(x).detach())


@pytest.mark.parametrize("name", sorted(NEGATIVE_REASON))
def test_negative_cases(name, x):
    model = tm.negative_models()[name]
    result = lookupc.convert(model, (x,))
    assert result.report.matched == [] and result.replacements == []
    assert len(result.report.skipped) == 1
    location, reason = result.report.skipped[0]
    assert location in ("fc1", "gate")
    assert NEGATIVE_REASON[name] in reason
    assert torch.equal(eval_out(result.module, x), eval_out(model, x))
    assert result.report.flops_before == result.report.flops_after == 0


def test_activation_classifier_tolerances():
    xs = activation.probe()
    assert activation.classify(xs, torch.nn.functional.gelu(xs)).kind == "gelu"
    tanh = torch.nn.functional.gelu(xs, approximate="tanh")
    assert activation.classify(xs, tanh).kind == "gelu_tanh"
    assert activation.classify(xs, 3 * xs + 1).kind == "affine"
    quick = activation.classify(xs, xs * torch.sigmoid(1.702 * xs))
    assert quick.kind == "other" and quick.deviation > 0.01


def test_convert_leaves_input_unchanged(x):
    model = tm.Nested().train()
    state = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    result = lookupc.convert(model, (x,))
    assert result.module is not model
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags
    assert isinstance(model.blocks[0].mlp.fc1, nn.Linear)
    assert result.module.training


def test_other_batch_and_sequence_sizes(converted):
    for name, (_, result) in converted.items():
        for shape in [(1, 1, tm.D), (4, 9, tm.D), (7, tm.D)]:
            y = eval_out(result.module, torch.randn(*shape))
            assert y.shape == shape and torch.isfinite(y).all(), name


def test_flops_hand_count(x):
    """16 -> 64 -> 16 with h=4, tau=8, block 16 (D=16, R=ceil(32/16)=2), counted by hand."""
    cfg = lookupc.LookupConfig(tables=4, bits=8, block_size=16)
    # this LookupFFN costs more than the dense FFN: only replaced when forced
    report = lookupc.convert(tm.ModuleFFN(), (x,), config=cfg, force=True).report
    dense = 2 * 16 * 64 + 64 + 2 * 64 * 16 + 16            # 4176
    bh4 = 2 * 4 * (2 * 16 * 16 + 16 * 4)                   # 2 repeats x 4 rounds: blocks + FWHT
    hash_ = bh4 + 3 * 2 * 16 + 32 + 4 * 32                 # + mix, hash bias, codes/scores
    gather = 2 * 4 * 16 + 16                               # 144
    assert (dense, hash_ + gather) == (4176, 5008)
    assert (report.flops_before, report.flops_after) == (4176, 5008)
    assert report.table_bytes == 4 * 256 * 16 * 4


def test_ffns_that_would_not_get_cheaper_stay_dense(x):
    # an explicit configuration (not the per-FFN default: decay differs) is kept as given
    cfg = lookupc.LookupConfig(tables=4, bits=8, block_size=16, decay=0.5)
    report = lookupc.convert(tm.ModuleFFN(), (x,), config=cfg).report
    assert not report.matched and len(report.skipped) == 1
    reason = report.skipped[0].reason
    assert "would cost 5,008 FLOPs/token, the dense FFN 4,176" in reason and "force" in reason
    # the default configuration tries cheaper ones (smaller blocks, fewer bits, fewer
    # tables) first
    report = lookupc.convert(tm.ModuleFFN(), (x,)).report
    assert len(report.matched) == 1
    assert report.flops_after < report.flops_before
    assert report.matched[0].config != lookupc.LookupConfig.for_ffn(16, 64, 16)


def test_table_memory_is_checked_before_allocating(x):
    huge = lookupc.LookupConfig(tables=4096, bits=16, block_size=16)  # 64 GiB of tables
    with pytest.raises(lookupc.LookupcInputError, match="tables would take .* over the budget"):
        lookupc.convert(tm.ModuleFFN(), (x,), config=huge, force=True)
    small = lookupc.LookupConfig(tables=2, bits=4, block_size=8)
    with pytest.raises(lookupc.LookupcInputError, match="max_table_bytes"):
        lookupc.convert(tm.ModuleFFN(), (x,), config=small, max_table_bytes=100)


def test_fidelity_against_the_original_is_reported(x):
    import warnings

    from lookupc.fidelity import FidelityWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lookupc.convert(tm.ModuleFFN(), (x,))
    f = result.report.fidelity
    assert 0 <= f["rel_error"] and -1 <= f["cosine_min"] <= f["cosine_mean"] <= 1
    assert "fidelity vs the original model" in str(result.report)
    assert json.loads(json.dumps(result.report.to_dict()))["fidelity"]["cosine_mean"] == \
        pytest.approx(f["cosine_mean"])
    if f["cosine_mean"] < 0.95:  # random init on a trained-looking model: named remedy
        assert any(issubclass(w.category, FidelityWarning) and "init='distill'" in
                   str(w.message) for w in caught)
    with pytest.raises(lookupc.LookupcError, match="fidelity check failed.*min_fidelity=0.9999"):
        lookupc.convert(tm.ModuleFFN(), (x,), min_fidelity=0.9999)


def test_size_override_keeps_per_ffn_defaults():
    from lookupc.config import SizeOverride

    assert SizeOverride(bits=6).for_ffn(128, 512) == lookupc.LookupConfig(32, 6, 64)
    assert SizeOverride(tables=8).for_ffn(384, 1536) == lookupc.LookupConfig(8, 8, 64)
    assert SizeOverride(block_size=16).for_ffn(32, 96) == lookupc.LookupConfig(6, 8, 16)


def test_report_str_and_dict(converted):
    report = converted["nested"][1].report
    text = str(report)
    assert "blocks.0.mlp.fc1" in text and "blocks.1.mlp.w1" in text and "8,352" in text
    report.matched[0].rel_error = 0.125
    data = json.loads(json.dumps(report.to_dict()))
    assert data["matched"][0]["rel_error"] == 0.125 and "0.1250" in str(report)
    assert data["flops_before"] == report.flops_before == 8352
    report.matched[0].rel_error = None


def test_config_forms(x):
    small = lookupc.LookupConfig(tables=2, bits=4, block_size=8)
    r = lookupc.convert(tm.Nested(), (x,), config={"blocks.1.mlp.w1": small})
    assert [m.config for m in r.report.matched][1] == small
    r = lookupc.convert(tm.Nested(), (x,), config={"blocks.0.mlp.fc1": None})
    assert [m.name for m in r.report.matched] == ["blocks.1.mlp.w1"]
    assert r.report.skipped == [("blocks.0.mlp.fc1", "left dense by the config")]
    r = lookupc.convert(tm.Nested(), (x,), config=lambda m: small if m.form == "module" else None)
    assert [(m.name, m.config) for m in r.report.matched] == [("blocks.0.mlp.fc1", small)]


@pytest.mark.parametrize("kwargs, match", [
    ({"init": "zeros"}, "init"),
    ({"init": "distill"}, "calibration"),
    ({"config": 3}, "config"),
    ({"config": {"nope": None}}, "nope"),
    ({"config": lookupc.LookupConfig(tables=4, bits=8, block_size=64)}, "block_size"),
])
def test_bad_arguments(kwargs, match, x):
    with pytest.raises(ValueError, match=match):
        lookupc.convert(tm.ModuleFFN(), (x,), **kwargs)


def test_bad_inputs_and_failing_export():
    with pytest.raises(LookupcInputError, match="example_inputs"):
        lookupc.find_ffns(tm.ModuleFFN(), 3)
    with pytest.raises(PassError, match="export_graph") as info:
        lookupc.find_ffns(tm.ModuleFFN(), (torch.randn(2, 7),))
    assert info.value.pass_name == "export_graph"


def test_run_passes_names_the_failing_pass():
    def ok(m):
        return PassResult(m, False)

    def broken(m):
        raise RuntimeError("boom")

    with pytest.raises(PassError, match="'broken'.*boom.*after ok") as info:
        run_passes([ok, broken], nn.Identity())
    assert info.value.pass_name == "broken"
    assert run_passes([ok], nn.Identity()).modified is False


def test_kwargs_example_inputs(x):
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = tm.ModuleFFN()

        def forward(self, hidden, scale=1.0):
            return self.ffn(hidden) * scale

    found = lookupc.find_ffns(Kw(), {"hidden": x, "scale": 2.0})
    assert [f.name for f in found] == ["ffn.fc1"]


def test_export_converted_with_dynamic_dims(converted, x):
    _, result = converted["nested"]
    dims = {"x": {0: torch.export.Dim("b", max=64), 1: torch.export.Dim("t", max=512)}}
    ep = torch.export.export(result.module.eval(), (x,), dynamic_shapes=dims, strict=False)
    targets = [_short(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("lookupc.hash") == 2 and targets.count("lookupc.gather") == 2
    x2 = torch.randn(3, 11, tm.D)
    assert torch.allclose(ep.module()(x2), eval_out(result.module, x2), atol=1e-6)


def test_tied_ffn_called_twice(x):
    """One FFN module applied twice: one match with calls == 2, both calls replaced."""
    model = tm.TiedFFN()
    result = lookupc.convert(model, (x,))
    (found,) = lookupc.find_ffns(model, (x,))
    assert found.calls == 2 and result.report.skipped == []
    assert result.report.flops_before == 2 * 4176  # two calls per token
    (rep,) = result.replacements
    assert exported_targets(result.module, x) == LOOKUP * 2
    check = copy.deepcopy(result.module)
    check.set_submodule(rep.slot, rep.dense)
    assert torch.equal(eval_out(check, x), eval_out(model, x))


def test_init_distill_calls_distill_conversion(x, monkeypatch):
    import types

    calls = []
    fake = types.ModuleType("lookupc.distill.layer")

    def distill_conversion(result, model, calibration, **options):
        calls.append((model, calibration, options))
        for m in result.report.matched:
            m.rel_error = 0.5

    fake.distill_conversion = distill_conversion
    monkeypatch.setitem(sys.modules, "lookupc.distill.layer", fake)
    model, calib = tm.ModuleFFN(), [(x,)]
    result = lookupc.convert(model, (x,), init="distill", calibration=calib,
                             distill_options={"steps": 3})
    assert calls == [(model, calib, {"steps": 3})]
    assert result.report.matched[0].rel_error == 0.5 and "0.5000" in str(result.report)


def test_init_distill_without_module_is_a_clear_error(x, monkeypatch):
    monkeypatch.setitem(sys.modules, "lookupc.distill.layer", None)
    with pytest.raises(lookupc.LookupcError, match="distill_conversion"):
        lookupc.convert(tm.ModuleFFN(), (x,), init="distill", calibration=[(x,)])


def test_weights_reused_outside_the_ffn_are_not_replaced(x):
    model = tm.TiedOutsideFFN()
    result = lookupc.convert(model, (x,))
    assert result.report.matched == []
    reasons = [reason for _, reason in result.report.skipped]
    assert any("tied weights" in r for r in reasons) and any("not GELU" in r for r in reasons)
    assert torch.equal(eval_out(result.module, x), eval_out(model, x))


def test_unsupported_dtype_is_skipped(x):
    model = tm.ModuleFFN().to(torch.bfloat16)
    result = lookupc.convert(model, (x.to(torch.bfloat16),))
    assert result.report.matched == []
    (location, reason), = result.report.skipped
    assert location == "fc1" and "bfloat16" in reason


def test_api_docstring_examples():
    """The examples in find_ffns/convert docstrings run (and match the README's FLOPs)."""
    import doctest

    from lookupc.passes import api

    failed, attempted = doctest.testmod(api, optionflags=doctest.ELLIPSIS)
    assert attempted >= 4 and failed == 0
