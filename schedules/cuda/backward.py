"""CUDA schedules of the backward kernels in :mod:`lookupc.kernels.backward`.

One function per kernel, each ``schedule_<kernel>(func, emulate=False) -> IRModule``
(see :mod:`lookupc.schedules.cuda.util` for ``emulate``); :data:`SCHEDULES` maps the
kernel names of ``tir_backward`` to them.

Gather backward
    * score gradient: one thread block per (token, group of 8 tables); the token's
      gradient row is staged in shared memory; each warp owns one table and its 32
      lanes split the d_out dot product (a cross-thread warp reduction).
    * table gradient, atomics: one block per (token, table), consecutive threads
      add to consecutive floats of the same table row (coalesced ``atomicAdd``).
    * table gradient, segments: one block per table row, threads along d_out; each
      thread walks the row's segment of sorted (token, table) pairs. No atomics, so
      the result is deterministic; the sort is done outside (``torch.sort``).

Hash backward
    * rounds (block matmul then Hadamard, forward or transposed): one block per tile of
      tokens of one repeat; the input tile is cached in shared memory, every stage's
      output lives in shared memory (the butterflies exchange values across the whole
      row, so the tile must stay on chip), each stage spread over the block's threads.
    * score gradient: one block per token; z and the per-table sums in shared memory.
    * weight gradient: a batched GEMM over tokens (``g^T y`` per block and round): one
      block per (token split, round, BH4 block), a 16x16 thread grid, register tiles,
      and tiles of 16 tokens staged in shared memory; the splits are added afterwards.
    * column sum (hash bias gradient): one thread per column, serial over tokens.
"""

from __future__ import annotations

from .util import DEFAULT_THREADS, GpuSchedule

__all__ = ["SCHEDULES", "schedule_gather_score_grad", "schedule_table_grad_scatter",
           "schedule_table_grad_segment", "schedule_round", "schedule_score_grad",
           "schedule_weight_grad", "schedule_column_sum", "round_tile", "weight_grad_splits"]

# Shared memory per block (floats) the round kernels may use for one stage buffer.
_TILE_FLOATS = 2048
SHARED_FLOATS = 12 * 1024  # 48 KiB: the static shared memory limit per block


def schedule_gather_score_grad(func, emulate: bool = False, tables_per_block: int = 8):
    """g_scores[n, k] = <table row, grad_y[n]>: warp per table, lanes split d_out."""
    g = GpuSchedule.of(func, emulate)
    sch, blk = g.sch, g.sch.get_sblock("g_scores")
    t, k, d = sch.get_loops(blk)
    ko, ky = sch.split(k, [None, tables_per_block])
    do, dx = sch.split(d, [None, 32])
    sch.reorder(t, ko, ky, do, dx)
    # Phase 1: grid over (token, table group); stage grad_y[n] once per block.
    bx = sch.fuse(t, ko)
    g.bind(bx, "blockIdx.x")
    cache = g.cache_read(blk, "grad_y", "shared")
    sch.compute_at(cache, bx)
    lanes = sch.fuse(*sch.get_loops(cache)[1:])
    _, cy, cx = sch.split(lanes, [None, tables_per_block, 32])
    g.bind(cy, "threadIdx.y")
    g.bind(cx, "threadIdx.x")
    # Phase 2: warp per table; the d_out reduction is split over the 32 lanes.
    g.bind(ky, "threadIdx.y")
    g.bind(dx, "threadIdx.x")
    return g.mod


def schedule_table_grad_scatter(func, emulate: bool = False, threads: int = DEFAULT_THREADS):
    """Zero the gradient, then one block per (token, table) adds its row (atomicAdd)."""
    g = GpuSchedule.of(func, emulate)
    sch = g.sch
    g.bind_grid(sch.get_sblock("zero"), threads)
    blk = sch.get_sblock("scatter")
    t, k, d = sch.get_loops(blk)
    bx = sch.fuse(t, k)
    dy, dx = sch.split(d, [None, threads])
    g.bind(bx, "blockIdx.x")
    g.bind(dy, "blockIdx.y")
    g.bind(dx, "threadIdx.x")
    return g.mod


def schedule_table_grad_segment(func, emulate: bool = False, threads: int = DEFAULT_THREADS):
    """One block per table row (x d_out chunk); threads along d_out walk the row's segment."""
    g = GpuSchedule.of(func, emulate)
    sch = g.sch
    blk = sch.get_sblock("segment")
    r, d = sch.get_loops(blk)
    dy, dx = sch.split(d, [None, threads])
    g.bind(r, "blockIdx.x")
    g.bind(dy, "blockIdx.y")
    g.bind(dx, "threadIdx.x")
    return g.mod


def round_tile(width: int) -> int:
    """Tokens per thread block in the round kernels (a [tile, D] stage fits in shared)."""
    return max(1, _TILE_FLOATS // width)


def _stage_names(sch, first: str) -> list[str]:
    """Block names of a round kernel in dataflow order: ``first``, then fwht0, fwht1..."""
    names = [first]
    while True:
        try:
            sch.get_sblock(f"fwht{len(names) - 1}")
        except Exception:  # noqa: BLE001 - no such block: the stage list ended
            return names
        names.append(f"fwht{len(names) - 1}")


def schedule_round(func, emulate: bool = False, threads: int = DEFAULT_THREADS,
                   first: str = "bmm"):
    """Block matmul (or ``first`` = ``"load"``) and its Hadamard stages, one token tile
    of one repeat per thread block, every intermediate in shared memory.

    The kernel's token axis comes as (tile index, position in tile): no tail tiles.
    """
    g = GpuSchedule.of(func, emulate)
    sch = g.sch
    names = _stage_names(sch, first)
    # Phase 1: anchor = the last stage; (repeat, token tile) -> the grid.
    r, t = sch.get_loops(sch.get_sblock(names[-1]))[:2]
    g.bind(r, "blockIdx.y")
    g.bind(t, "blockIdx.x")
    # Phase 2: every earlier stage computed per tile, its output kept in shared memory
    # (the butterflies exchange values across the whole row, so the row stays on chip).
    for name in reversed(names[:-1]):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, t, preserve_unit_loops=True)
        g.set_scope(blk, "shared")
    if first == "bmm":
        _schedule_bmm(g, sch.get_sblock("bmm"), t, threads)
    # Phase 4: each stage's tile elements spread over the block's threads.
    for name in names[1:] if first == "bmm" else names:
        blk = sch.get_sblock(name)
        g.bind_threads(blk, g.depth_below(blk, t), threads)
    return g.mod


def _schedule_bmm(g: GpuSchedule, blk, tile_loop, threads: int) -> None:
    """The block matmul inside a round kernel (loops r, t, p, j, i; ``tile_loop`` = t)."""
    sch = g.sch
    # The input tile is read BS times per value: stage it in shared memory.
    cache = g.cache_read(blk, "a", "shared")
    sch.compute_at(cache, tile_loop)
    g.bind_threads(cache, g.depth_below(cache, tile_loop), threads)
    p, j, i = sch.get_loops(blk)[-3:]
    tile, width, bs = (int(v.dom.extent) for v in sch.get(blk).iter_vars[2:5])  # R, m, ..
    # One BH4 block at a time: its BS x BS weights staged in shared memory (when they fit
    # next to the two [tile, D] stage buffers), rows padded by one float so that lanes
    # reading a column hit different banks.
    jb, jo = sch.split(j, [None, bs])
    sch.reorder(jb, p, jo)
    if 2 * tile * width + bs * (bs + 1) <= SHARED_FLOATS:
        w_cache = g.cache_read(blk, "w", "shared")
        sch.compute_at(w_cache, jb)
        if not g.emulate:
            sch.storage_align(w_cache, 0, axis=2, factor=32, offset=1)
        g.bind_threads(w_cache, g.depth_below(w_cache, jb), threads)
    lane = g.fuse([p, jo])
    _, tx = sch.split(lane, [None, threads])
    g.bind(tx, "threadIdx.x")
    # Accumulate in a register, write the shared output once.
    acc = sch.cache_write(blk, 0, "global" if g.emulate else "local")
    sch.reverse_compute_at(acc, tx)
    sch.decompose_reduction(blk, i)


def schedule_fwht_scaled(func, emulate: bool = False, threads: int = DEFAULT_THREADS):
    """Like :func:`schedule_round` with the scaled load as the first stage."""
    return schedule_round(func, emulate, threads, first="load")


def schedule_score_grad(func, emulate: bool = False, threads: int = DEFAULT_THREADS):
    """One block per token: z, sum|z| and sum log1p(e^{-2|z|}) in shared memory."""
    g = GpuSchedule.of(func, emulate)
    sch = g.sch
    dz = sch.get_sblock("dz")
    t, c = sch.get_loops(dz)
    g.bind(t, "blockIdx.x")
    for name in ("log_p", "abs_sum", "z"):  # consumers first
        blk = sch.get_sblock(name)
        sch.compute_at(blk, t, preserve_unit_loops=True)
        g.set_scope(blk, "shared")
    for name in ("z", "abs_sum", "log_p", "dz"):
        g.bind_threads(sch.get_sblock(name), 1, threads)
    return g.mod


def weight_grad_splits(rounds: int, blocks: int, target_blocks: int = 256) -> int:
    """Token splits for the weight gradient so that about ``target_blocks`` thread blocks
    run (rounds x BH4 blocks alone is often below the SM count: 64 at the paper config)."""
    want = max(1, -(-target_blocks // (rounds * blocks)))
    return min(8, 1 << (want - 1).bit_length())


def schedule_weight_grad(func, emulate: bool = False):
    """Batched g^T y over tokens: block per (token split, round, BH4 block), up to 16x16
    threads with register tiles, each token tile of g and y staged in shared memory."""
    g = GpuSchedule.of(func, emulate)
    sch = g.sch
    blk = sch.get_sblock("g_w")
    s, q, b, o, i, t, p = sch.get_loops(blk)
    bs = int(sch.get(blk).iter_vars[3].dom.extent)
    lanes = min(bs, 16)
    oo, ot = sch.split(o, [lanes, None])  # thread (ty, tx) owns a (bs/16)^2 register tile
    io, it = sch.split(i, [lanes, None])
    sch.reorder(s, q, b, oo, io, t, p, ot, it)
    bx = sch.fuse(s, q, b)  # one block per (token split, round, BH4 block)
    g.bind(bx, "blockIdx.x")
    g.bind(oo, "threadIdx.y")
    g.bind(io, "threadIdx.x")
    # Phase 1: accumulate in registers, write back after the token loop.
    acc = sch.cache_write(blk, 0, "global" if emulate else "local")
    sch.reverse_compute_at(acc, io)
    # Phase 2: each token tile of both operands staged in shared memory by all threads.
    for name in ("g", "y"):
        cache = g.cache_read(blk, name, "shared")
        sch.compute_at(cache, t)
        loops = sch.get_loops(cache)
        _, cy, cx = sch.split(g.fuse(loops[4:]), [None, lanes, lanes])
        g.bind(cy, "threadIdx.y")
        g.bind(cx, "threadIdx.x")
    sch.decompose_reduction(blk, t)
    return g.mod


def schedule_column_sum(func, emulate: bool = False, threads: int = DEFAULT_THREADS):
    """One thread per column, serial over tokens (coalesced: columns are contiguous)."""
    g = GpuSchedule.of(func, emulate)
    g.bind_grid(g.sch.get_sblock("col_sum"), threads)
    return g.mod


SCHEDULES = {
    "gather_score_grad": schedule_gather_score_grad,
    "table_grad_atomic": schedule_table_grad_scatter,
    "table_grad_serial": schedule_table_grad_scatter,
    "table_grad_segment": schedule_table_grad_segment,
    "round_fwd": schedule_round,
    "round_bwd": schedule_round,
    "round_fwd_nofwht": schedule_round,
    "round_bwd_nofwht": schedule_round,
    "fwht_scaled": schedule_fwht_scaled,
    "score_grad": schedule_score_grad,
    "weight_grad": schedule_weight_grad,
    "column_sum": schedule_column_sum,
}
