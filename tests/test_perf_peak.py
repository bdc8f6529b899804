"""Sanity of the machine-peak helpers ``bench/ffn.py`` reports (``lookupc.machine``).

Only plausibility is checked, never speed: the figures must be positive and below what
any CPU of the host's vector width could reach (lanes x 2 FLOPs per FMA x 2 FMA pipes x
5 GHz per thread). Calls are sized small to keep the test quick.
"""

from __future__ import annotations

import pytest

from lookupc import machine as perf
from lookupc import tvm_shim

MAX_GHZ, FMA_PIPES = 5.0, 2


def _ceiling(threads: int) -> float:
    lanes = tvm_shim.vector_lanes(tvm_shim.make_target(None))
    return lanes * 2 * FMA_PIPES * MAX_GHZ * threads


def test_fma_peak_is_positive_and_below_the_isa_ceiling():
    peak = perf.fma_peak_gflops(1, seconds=0.002, repeats=2)
    assert 0.0 < peak < _ceiling(1), peak


def test_fma_peak_kernel_is_built_once_per_process():
    perf.fma_peak_gflops(1, seconds=0.001, repeats=1)
    kernel = perf._fma_peak_kernel()
    perf.fma_peak_gflops(1, seconds=0.001, repeats=1)
    assert perf._fma_peak_kernel() is kernel
    assert kernel[1] == tvm_shim.vector_lanes(tvm_shim.make_target(None))


@pytest.mark.parametrize("threads", [2])
def test_fma_peak_runs_several_tasks(threads):
    # tasks beyond TVM's pool share a thread: slower, still a sane figure
    peak = perf.fma_peak_gflops(threads, seconds=0.002, repeats=2)
    assert 0.0 < peak < _ceiling(threads), peak


def test_sgemm_figure_is_positive_and_below_the_isa_ceiling():
    gflops = perf.sgemm_gflops(1, n=256, repeats=2)
    assert 0.0 < gflops < _ceiling(1), gflops


def test_benchmark_rows_carry_the_ceiling_no_schedule_can_beat():
    """bench/ffn.py's ceiling = hash FLOPs at the given peak + the gather's bandwidth bound."""
    import lookupc
    from lookupc import perf

    rows = perf.run_config("tiny", 64, 10, ["cpu"], None, 64, False, bw_l3=50.0,
                           peak_gflops=100.0)
    d, _, cfg = perf.CONFIGS["tiny"]
    ffn = lookupc.LookupFFN(d, d, cfg)
    dense = next(r for r in rows if r["variant"] == "dense")
    lookup = next(r for r in rows if r["variant"] == "tvm-cpu")
    assert "ceiling_ms" not in dense
    expected = ffn.hash_flops_per_token() * 64 / 100e6 + 64 * cfg.tables * d * 4 / 50e9 * 1e3
    assert lookup["ceiling_ms"] == pytest.approx(expected, rel=1e-9)
    assert lookup["speedup_ceiling_vs_dense"] == pytest.approx(
        dense["ms_median"] / lookup["ceiling_ms"], rel=1e-9)
