"""Reduced-precision tables (``LookupConfig.table_dtype``): bfloat16 and int8 with row scales.

Kernel tolerance: the kernels and the NumPy reference read the *same* stored values (the
quantisation is done once, by ``lookupc.reference.quantize_tables``), so they differ only
by float32 rounding of the sums (h products per output): rtol 1e-5 / atol 1e-5. The
quantisation itself is checked against its own bound: int8 within half a step
(``scale / 2``) of the float32 table, bfloat16 within a relative 2**-8 (half an ulp of an
8-bit mantissa).
"""

import numpy as np
import pytest
import torch
from numpy_lookup import bfloat16_bits_to_float, quantize_int8
from numpy_lookup import gather as np_gather
from two_block_net import Net

import lookupc
from lookupc import reference as ref
from lookupc.config import LookupConfig
from lookupc.errors import LookupcError, LookupcInputError

DTYPES = ["bfloat16", "int8"]


def _stored_as_float(q, scale):
    """What the stored tables mean, in float64, computed independently of lookupc."""
    if q.dtype == torch.float32:
        return q.numpy().astype(np.float64)
    if q.dtype == torch.bfloat16:
        return bfloat16_bits_to_float(q.view(torch.int16).numpy())
    return q.numpy().astype(np.float64) * scale.numpy().astype(np.float64)[..., None]


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantisation_matches_numpy_and_its_error_bound(dtype):
    torch.manual_seed(0)
    t = torch.randn(6, 16, 40) * torch.rand(6, 16, 1)  # rows of different magnitude
    t[2, 3] = 0.0  # an all-zero row
    q, scale = ref.quantize_tables(t, dtype)
    stored = _stored_as_float(q, scale)
    if dtype == "int8":
        nq, nscale = quantize_int8(t.numpy())
        np.testing.assert_array_equal(q.numpy(), nq)
        np.testing.assert_allclose(scale.numpy(), nscale, rtol=1e-7)
        assert np.all(np.abs(stored - t.numpy()) <= scale.numpy()[..., None] / 2 + 1e-7)
        assert stored[2, 3].tolist() == [0.0] * 40
    else:
        assert scale is None
        assert np.all(np.abs(stored - t.numpy()) <= np.abs(t.numpy()) * 2.0 ** -8 + 1e-30)
    deq = ref.dequantize_tables(q, scale)
    np.testing.assert_allclose(deq.numpy(), stored, rtol=1e-6, atol=1e-7)


def _case(h, bits, d_out, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    tables = torch.randn(h, 1 << bits, d_out, generator=g)
    q, scale = (tables, None) if dtype == "float32" else ref.quantize_tables(tables, dtype)
    codes = torch.randint(0, 1 << bits, (n, h), generator=g, dtype=torch.int32)
    scores = torch.rand(n, h, generator=g)
    bias = torch.randn(d_out, generator=g)
    want = np_gather(codes.numpy(), scores.numpy().astype(np.float64), _stored_as_float(q, scale),
                     bias.numpy().astype(np.float64))
    return codes, scores, q, scale, bias, want


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 13, 64])
def test_reference_gather_matches_numpy(dtype, n):
    codes, scores, q, scale, bias, want = _case(8, 4, 24, n, dtype)
    got = ref.gather_forward_quantized(codes, scores, q, scale, bias)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def _schedules():
    pytest.importorskip("tvm")
    from lookupc.schedules.cpu.hand import CpuSchedule, GatherKnobs

    return {"naive": "naive", "cpu": "cpu", "tuned": "tuned",
            "cpu-table-outer": CpuSchedule(gather_knobs=GatherKnobs(cols=0)),
            "cpu-register": CpuSchedule(gather_knobs=GatherKnobs(cols=16)),
            "cpu-16-lanes": CpuSchedule(lanes=16)}


@pytest.mark.filterwarnings("ignore:lookupc. no tuning record")
@pytest.mark.parametrize("dtype", ["float32", *DTYPES])
@pytest.mark.parametrize("n", [1, 13, 64])
@pytest.mark.parametrize("sizes", [(8, 4, 48), (16, 1, 40), (4, 8, 16)])
def test_every_schedule_matches_numpy(dtype, n, sizes):
    from lookupc.runtime.build import build
    from lookupc.runtime.cpu import _gather_only

    h, bits, d_out = sizes
    codes, scores, q, scale, bias, want = _case(h, bits, d_out, n, dtype, seed=n)
    shapes = _gather_only(h, bits, d_out, dtype)
    for name, sched in _schedules().items():
        k = build(shapes, schedule=sched, parts=("gather",))
        got = k.gather(codes, scores, q, bias, scale)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_quantises_in_place_and_keeps_dtype(dtype):
    torch.manual_seed(0)
    m = lookupc.LookupFFN(32, 24, LookupConfig(tables=8, bits=4, block_size=8)).eval()
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        before = m(x)
        fp32_bytes = m.table_bytes()
        err = m.quantize_tables(dtype)
        after = m(x)
    assert m.config.table_dtype == dtype and "tables" not in dict(m.named_parameters())
    assert 0 < err < (0.01 if dtype == "int8" else 0.005)
    assert m.table_bytes() == (fp32_bytes // 2 if dtype == "bfloat16"
                               else fp32_bytes // 4 + 8 * 16 * 4)
    rel = float((after - before).norm() / before.norm())
    assert rel < 3 * err
    m.double()  # floats move, the stored tables and their scales keep their dtypes
    assert m.tables.dtype == getattr(torch, dtype) and m.bh4_weight.dtype == torch.float64
    if dtype == "int8":
        assert m.table_scale.dtype == torch.float32
    m.float()
    with torch.no_grad():
        torch.testing.assert_close(m(x), after)
    # a module built with the dtype holds that dtype from the start
    m2 = lookupc.LookupFFN(32, 24, LookupConfig(tables=8, bits=4, block_size=8,
                                                 table_dtype=dtype))
    assert m2.tables.dtype == getattr(torch, dtype)
    m2.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m2(x), after)


def test_kernels_run_the_module_under_every_cpu_schedule():
    pytest.importorskip("tvm")
    torch.manual_seed(1)
    m = lookupc.LookupFFN(40, 24, LookupConfig(tables=16, bits=3, block_size=8)).eval()
    m.quantize_tables("int8")
    x = torch.randn(29, 40)
    with torch.no_grad():
        want = m(x)
        for sched in ("cpu", "naive"):
            with lookupc.set_schedule(sched):
                torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_bad_input_is_a_clear_error():
    with pytest.raises(LookupcInputError, match="table_dtype must be one of"):
        LookupConfig(table_dtype="float16")
    m = lookupc.LookupFFN(16, 8, LookupConfig(tables=4, bits=2, block_size=8))
    with pytest.raises(LookupcInputError, match="must be one of"):
        m.quantize_tables("int4")
    m.quantize_tables("int8")
    with pytest.raises(LookupcInputError, match="already int8"):
        m.quantize_tables("bfloat16")
    # a training step on int8 tables: a LookupcError naming the fix, not a crash
    out = m(torch.randn(3, 16)).sum()
    with pytest.raises(LookupcError, match="Train .*with table_dtype='float32'"):
        out.backward()
    from lookupc.distill.layer import fit_lookup_ffn

    with pytest.raises(LookupcInputError, match="needs float32 tables"):
        fit_lookup_ffn(m, torch.randn(20, 16), torch.randn(20, 8))
    with pytest.raises(LookupcInputError, match="int8 tables need a float32 'scale'"):
        torch.ops.lookupc.gather_quantized(torch.zeros(2, 4, dtype=torch.int32),
                                           torch.ones(2, 4), m.tables, None, m.bias)


def test_convert_quantises_after_distillation_and_reports_it():
    torch.manual_seed(0)
    model = Net(32).eval()
    x = torch.randn(4, 16, 32)
    torch.manual_seed(0)
    dense = lookupc.convert(model, (x,), init="distill", calibration=[(x,)],
                            distill_options={"hash_steps": 5, "finetune_steps": 0})
    torch.manual_seed(0)
    result = lookupc.convert(model, (x,), init="distill", calibration=[(x,)],
                             distill_options={"hash_steps": 5, "finetune_steps": 0},
                             table_dtype="int8")
    rows, fp32_rows = result.report.matched, dense.report.matched
    assert [r.config.table_dtype for r in rows] == ["int8", "int8"]
    assert all(0 < r.table_error < 0.01 for r in rows)
    assert all(r.table_bytes < f.table_bytes / 3 for r, f in zip(rows, fp32_rows))
    text = str(result.report)
    assert "table_err" in text and "int8:" in text
    lookups = [m for m in result.module.modules() if isinstance(m, lookupc.LookupFFN)]
    assert all(m.tables.dtype == torch.int8 for m in lookups)
    with torch.no_grad():
        a, b = result.module(x), dense.module(x)
    assert float((a - b).norm() / b.norm()) < 0.02
    with pytest.raises(LookupcInputError, match="table_dtype must be one of"):
        lookupc.convert(model, (x,), table_dtype="fp8")


def test_int8_tables_export_compile_and_run(tmp_path):
    pytest.importorskip("tvm")
    from click.testing import CliRunner

    from lookupc.cli.main import cli

    out = tmp_path / "tiny_int8.lookupc"
    r = CliRunner().invoke(cli, ["compile", "examples.tiny_bert:factory", "-o", str(out),
                                 "--seq-len", "8", "--table-dtype", "int8", "--bits", "4"])
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
    assert "int8:" in r.stdout and "max abs diff" in r.stdout
    art = lookupc.load(out)
    assert {k["table_dtype"] for k in art.manifest["kernels"]} == {"int8"}
    program = torch.export.load(out / "model.pt2")
    assert "lookupc.gather_quantized.default" in {str(n.target) for n in program.graph.nodes}
    r = CliRunner().invoke(cli, ["run", str(out), "--repeat", "0", "--check"])
    assert r.exit_code == 0, (r.stdout, r.stderr, r.exception)
