"""CUDA schedule of the gather forward (``lookupc.kernels.forward.make_gather``).

``y[n, :] = bias + sum_k scores[n, k] * tables[k, codes[n, k], :]``: memory-bound, each
(token, table) pair reads one random table row. One thread block per (token, chunk of
``threads`` output columns); thread c owns column c, so a warp reads 32 consecutive
floats of the same row (coalesced). The token's codes and scores (read by every
thread) are staged in shared memory; the sum over tables accumulates in a register
that starts at the bias.
"""

from __future__ import annotations

from .util import DEFAULT_THREADS, GpuSchedule

__all__ = ["schedule_gather"]


def schedule_gather(func, emulate: bool = False, threads: int = DEFAULT_THREADS):
    """Schedule the ``gather`` block of ``func`` for CUDA (see the module docstring)."""
    g = GpuSchedule.of(func, emulate)
    sch = g.sch
    blk = sch.get_sblock("gather")
    i, c, k = sch.get_loops(blk)
    # Phase 1: grid = tokens x column chunks; threads along the output columns.
    co, ci = sch.split(c, [None, threads])
    g.bind(i, "blockIdx.x")
    g.bind(co, "blockIdx.y")
    # Phase 2: the token's codes and scores, read by every thread, staged once per block.
    for name in ("scores", "codes"):
        cache = g.cache_read(blk, name, "shared")
        sch.compute_at(cache, co)
        g.bind_threads(cache, g.depth_below(cache, co), threads)
    g.bind(ci, "threadIdx.x")
    # Phase 3: accumulate over the tables in a register, write y once.
    acc = sch.cache_write(blk, 0, "global" if emulate else "local")
    sch.reverse_compute_at(acc, ci)
    sch.decompose_reduction(blk, k)
    return g.mod
