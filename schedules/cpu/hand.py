"""``cpu``: hand-written CPU schedules for the hash and the gather (alias ``hand``).

The vector width comes from the target's ``mcpu`` (8 fp32 lanes with AVX2, 16 with
AVX-512, via ``lookupc.tvm_shim.vector_lanes``). Tile sizes are knobs
(:class:`HashKnobs`, :class:`GatherKnobs`); ``schedules/tuned.py`` searches the same
knobs with MetaSchedule, so both schedules share :func:`schedule_hash` and
:func:`schedule_gather`. A knob may be an int or a MetaSchedule random variable.

Hash (compute-bound: ~0.5 MFLOP/token of 64x64 block matmuls at the paper config)
    Uses the folded weight layout (``lookupc.kernels.forward``: BS-wide Hadamard folded into
    the blocks, only ``log2(D/BS)`` butterfly stages left). Steps:

    1. anchor on ``mix`` (the last block every output depends on), split tokens into
       tiles of ``tile`` and run tiles in parallel;
    2. ``reverse_compute_at`` the four output blocks and ``compute_at`` every producer into
       the tile: all intermediates shrink to ``[tile, R, D]`` per thread (L1/L2 resident);
    3. each block matmul becomes a small GEMM micro-kernel: ``rows`` tokens x ``cols``
       output columns accumulate in registers (``cache_write`` "local", unrolled, the
       write-back too), one weight row vector is loaded per input column and shared by
       the ``rows`` tokens;
    4. each round's butterfly stages run in one pass: per token and vector of output
       columns the values of all D/BS blocks are loaded once, combined in registers
       (the earlier stages become "local" buffers under the last stage's column loop,
       unrolled over blocks) and stored once, instead of one load/store pass per stage
       (rounds of at most ``FUSED_BUTTERFLY_MAX_BLOCKS`` blocks);
    5. padding, mix, codes and scores are vectorised along their contiguous axis (output
       columns / tables); codes and scores reduce over bits outermost so the tables stay
       in vector lanes (``mix`` writes z as [tau, h] for that).

    Layouts (the schedule's own buffers; the kernel's arguments keep theirs):
    ``pad`` is stored block-major, ``[D/BS, tile, BS]``, so the first matmul's inputs
    for one block are one contiguous panel (with ``[tile, D]`` the tile's rows sit a
    power-of-two stride apart, in few L1 sets); the intermediates' token stride is
    padded by one cache line when it is a multiple of 1 KiB (``storage_align``) for the
    same reason; ``hash_bias`` is copied once per call (outside the parallel tiles) as
    ``[tau, h]`` so that ``mix`` reads it along the tables.

    Measured on a 2-core Zen 3 (AVX2, 1 thread, N=4096, old and new schedules interleaved
    in one process, medians of 21 rounds; FLOPs by ``LookupFFN.hash_flops_per_token``;
    FMA peak 95 GFLOP/s by ``lookupc.perf.fma_peak_gflops``): the unrolled write-back,
    the one-pass butterflies and the layouts take the paper config (512, h=128, tau=8,
    BS=64) to 0.78-0.84x of the time before them (default knobs: 48 -> 59-65 GFLOP/s,
    62-69% of peak; ``tile=16``: 65-71%), MiniLM's 384 (h=96, tau=8, BS=64) to
    0.82-0.85x, and 384 with h=128, tau=4, BS=32 to 0.87-0.95x. Dropping any one of
    them cost 2-7% at the first two shapes. The micro-kernel itself runs at ~75-80% of
    the FMA peak (8 accumulators with ``rows=4, cols=16`` cover Zen 3's FMA latency x 2
    pipes exactly, without slack); the rest is the butterflies, ``mix`` (its reads across
    bits are strided: a transpose) and the scores' exp. Tried and not kept (within noise
    or slower): column tiles outside the row tiles, unrolling the reduction by 2-16,
    inlining ``pad`` into the first matmul (1.10x slower), ``pad`` stored bit-major so
    that ``mix`` reads it along the tables (1.15x), ``mix`` vectorised along the bits
    (strided stores instead of strided loads), codes/scores with the bits innermost,
    8-row tiles with AVX2 (1.45-1.55x: 16 accumulators spill).

Gather (memory-bound: h random rows of d_out values per token), two forms
    *Table-outer* (large tables): tables in groups of ``kb`` are the outer serial loop;
    inside, tokens run in parallel and each token adds its ``kb`` rows into its ``y`` row.
    A group of ``kb`` tables (``kb * 2**tau * d_out`` elements, 1 MiB per 2 fp32 tables at
    the paper config) stays in L2/L3 while every token uses it, instead of each token
    streaming 128 random 2 KiB rows from DRAM; ``y`` is re-read ``h / kb`` times instead.
    Measured here (shared 2-core box, paper config, interleaved runs): kb=4 and 8 are
    within noise of each other (the notes' quiet AVX-512 box: kb=4 13.3 ms, kb=1 16.2,
    kb=16 14.8 at N=4096); splitting the columns across threads instead of the tokens
    (one parallel region, no per-group barrier) was 1.5-2x slower.
    *Register* (tables of at most ``REGISTER_GATHER_MAX_BYTES``, e.g. 1-bit tables):
    chunks of tokens in parallel; per tile of ``cols`` output columns each token sums all
    its tables' row slices in registers, so ``y`` is written once and every FMA loads one
    table vector (the table-outer form re-reads ``y`` per group: at 512 x 1 tables that
    is 128 passes over a 6 MiB ``y`` at N=4096). Tables may be float32, bfloat16 or int8
    (``KernelShapes.table_dtype``); both forms widen each element to float32 as it is
    loaded.

Prefetch: ``s_tir.Schedule`` has no prefetch primitive. ``tirx.prefetch`` exists as a
builtin (lowers to ``prefetcht0``) and can be issued from a write-free block beside the
compute block (``../shared/notes/tvm`` recipe 02); measured there it gave nothing for
token-outer gathers on a quiet box and slowed the table-blocked gather (the group of
tables is already cache resident, so the rows the prefetch would fetch are in L2/L3).
It is therefore not used.

Size: the hash and the gather schedules share the knob types, the vector-width rules and
the helpers that ``tuned`` searches over, and the ~50-line design note above (what each
step does and what was measured) is part of the count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lookupc import tvm_shim
from lookupc.kernels import forward as tir_kernels

NAME = "cpu"

__all__ = ["CpuSchedule", "HashKnobs", "GatherKnobs", "schedule_hash", "schedule_gather",
           "valid_hash_knobs", "valid_gather_knobs", "pow2_divisor", "TOKEN_TILE"]


@dataclass(frozen=True)
class HashKnobs:
    """Tile sizes of the hash schedule (ints, or MetaSchedule random variables).

    tile: tokens per parallel task (divides ``TOKEN_TILE``, the kernel's token padding);
    rows x cols: register tile of the block matmuls (tokens x output columns); ``rows``
    divides ``tile``, ``cols`` divides the block size and is a multiple of the vector width.
    """

    tile: Any = 16  # or (groups, rows) with tile = groups * rows; 16 beat 8 by 6-8% on Zen 3
    rows: Any = 4
    cols: Any = 16


@dataclass(frozen=True)
class GatherKnobs:
    """Tile sizes of the gather schedule (ints, or MetaSchedule random variables).

    kb: tables per cache-resident group (divides h), for the table-outer form.
    cols: output columns per register tile for the register form (0: table-outer form;
    None: chosen from the table size, :func:`gather_mode`).
    """

    kb: Any = 4
    cols: Any = None


# Tables up to this many bytes take the register form of the gather (they stay in L2
# while tokens stream past); larger tables the table-outer form. Measured on a 2-core
# Zen 3 (AVX2, 1 MiB L2 per core), N=4096, 2 threads, forms interleaved (ms, outer /
# register with 32 / 64 columns): 512x1 x 384 (1.5 MiB) 118 / 93 / 111; 128x4 x 384
# (3 MiB) 31 / 31 / 32; 256x4 x 384 (6 MiB) 78 / 126 / 119; 128x8 x 512 (64 MiB) 100 /
# 304 / 263. ``tuned`` searches both forms.
REGISTER_GATHER_MAX_BYTES = 2 << 20
REGISTER_GATHER_COLS = 32
GATHER_TOKEN_CHUNK = 32


def gather_mode(shapes: Any) -> str:
    """``"register"`` or ``"table-outer"``: which gather form the hand schedule uses."""
    from lookupc.config import TABLE_DTYPES

    size = shapes.tables * (1 << shapes.bits) * shapes.d_out * TABLE_DTYPES[shapes.table_dtype]
    return "register" if size <= REGISTER_GATHER_MAX_BYTES else "table-outer"


TOKEN_TILE = 16  # the hash kernel's token padding (lookupc.kernels.forward.make_hash)


def pow2_divisor(extent: int, cap: int) -> int:
    """Largest power of two <= cap that divides extent (>= 1)."""
    v = 1
    while v * 2 <= cap and extent % (v * 2) == 0:
        v *= 2
    return v


def valid_hash_knobs(shapes: Any, lanes: int, knobs: HashKnobs) -> HashKnobs:
    """``knobs`` clipped to values that tile ``shapes`` exactly (no tail predicates)."""
    tile = pow2_divisor(TOKEN_TILE, knobs.tile)
    vec = pow2_divisor(shapes.block_size, lanes)
    cols = max(vec, pow2_divisor(shapes.block_size, knobs.cols))
    return HashKnobs(tile=tile, rows=pow2_divisor(tile, knobs.rows), cols=cols)


def valid_gather_knobs(shapes: Any, lanes: int, knobs: GatherKnobs) -> GatherKnobs:
    """``knobs`` clipped to values that tile ``shapes`` exactly (no tail predicates), with
    ``cols`` resolved (0 = table-outer form)."""
    cols = knobs.cols
    if cols is None:
        cols = REGISTER_GATHER_COLS if gather_mode(shapes) == "register" else 0
    if cols and shapes.d_out % lanes == 0:
        cols = max(lanes, pow2_divisor(shapes.d_out, cols))
    elif cols:  # d_out not a multiple of the vector width: the table-outer form
        cols = 0
    return GatherKnobs(kb=pow2_divisor(shapes.tables, knobs.kb), cols=cols)


def _vectorize_last(sch: Any, block: Any, extent: int, lanes: int) -> None:
    """Split the innermost loop of ``block`` by the widest fitting vector and vectorise."""
    vec = pow2_divisor(extent, lanes)
    if vec > 1:
        _, inner = sch.split(sch.get_loops(block)[-1], [None, vec])
        sch.vectorize(inner)


def _hash_blocks(shapes: Any) -> list[str]:
    """bmm/butterfly block names in dataflow order."""
    names = []
    for j, stages in enumerate(tir_kernels.hash_stage_names(shapes, fold=True)):
        names += [f"bmm{j}", *stages]
    return names


#: rounds with at most this many blocks run their butterflies in one pass (one vector per
#: block live at once)
FUSED_BUTTERFLY_MAX_BLOCKS = 16

#: the token stride of an intermediate buffer is padded by this many floats (one 64-byte
#: cache line) when it is a multiple of ``_ALIGN_FACTOR`` floats (see :func:`schedule_hash`)
_ALIGN_OFFSET = 16
_ALIGN_FACTOR = 256


def schedule_hash(sch: Any, shapes: Any, lanes: int, knobs: HashKnobs) -> None:
    """Apply the hand schedule to the folded hash PrimFunc in ``sch`` (in place).

    ``knobs`` must already be valid for ``shapes`` (:func:`valid_hash_knobs`).
    """
    bs, h, tau = shapes.block_size, shapes.tables, shapes.bits
    vec = pow2_divisor(bs, lanes)
    chain = _hash_blocks(shapes)
    stages = tir_kernels.hash_stage_names(shapes, fold=True)
    # rounds whose butterflies run in one pass (needs an output-column loop: bs > 1)
    fused = [st for st in stages if len(st) > 1 and bs > 1
             and shapes.width // bs <= FUSED_BUTTERFLY_MAX_BLOCKS]
    # Phase 0: layouts (module docstring, "Layouts").
    sch.transform_layout(sch.get_sblock("pad"), ("write", 0), lambda i, c: (c // bs, i, c % bs))
    stride = shapes.repeats * shapes.width
    if stride % _ALIGN_FACTOR == 0:
        kept = [n for n in chain if not any(n in st[:-1] for st in fused)]
        for name in kept:  # the buffers that stay in memory
            sch.storage_align(sch.get_sblock(name), 0, 0, _ALIGN_FACTOR, _ALIGN_OFFSET)
    bias = sch.cache_read(sch.get_sblock("mix"), 2, "global")  # once per call, outside the tiles
    sch.transform_layout(bias, ("write", 0), lambda c: (c % tau, c // tau))
    # Phase 1: token tiles in parallel, anchored at "mix".
    mix = sch.get_sblock("mix")
    i, _, _ = sch.get_loops(mix)
    # (tile may be a pair (groups, rows): tile = groups * rows, as MetaSchedule samples it)
    factors = list(knobs.tile) if isinstance(knobs.tile, tuple) else [knobs.tile]
    tile_o = sch.split(i, [None, *factors])[0]
    sch.parallel(tile_o)
    # Phase 2: outputs after, all producers inside the tile (consumers first).
    for name in ("code", "sabs", "den", "score"):
        sch.reverse_compute_at(sch.get_sblock(name), tile_o)
    for name in [*reversed(chain), "pad"]:
        sch.compute_at(sch.get_sblock(name), tile_o)
    # Phase 3: each round's butterflies in one pass: per token and vector of output
    # columns, all blocks' values are combined in registers (the stages before the last
    # become "local" buffers under the last stage's column loop).
    for st in fused:
        last = sch.get_sblock(st[-1])
        b, o = sch.get_loops(last)[-2:]
        o_o, o_i = sch.split(o, [None, vec])
        sch.reorder(o_o, b)
        for name in reversed(st[:-1]):
            block = sch.get_sblock(name)
            sch.compute_at(block, o_o)
            sch.set_scope(block, 0, "local")
        for name in st:
            block_b, lane = sch.get_loops(sch.get_sblock(name))[-2:]
            sch.vectorize(lane)
            sch.unroll(block_b)
    # Phase 4: block matmuls as register-tiled micro-kernels; other butterflies vectorised.
    for name in chain:
        block = sch.get_sblock(name)
        if not name.startswith("bmm"):
            if not any(name in st for st in fused):
                _vectorize_last(sch, block, bs, lanes)  # along o, contiguous in every stage
            continue
        if bs == 1:
            continue  # 1x1 blocks: o and k are unit loops (dropped), nothing to tile
        _schedule_bmm(sch, block, knobs, bs, vec)
    # Phase 5: padding, mix, codes and scores along their contiguous axis.
    _vectorize_last(sch, sch.get_sblock("pad"), shapes.width, lanes)
    _vectorize_last(sch, sch.get_sblock("mix"), h, lanes)
    for name in ("code", "sabs", "den"):
        if h == 1 or shapes.bits == 1:
            continue  # unit loops were dropped; nothing worth vectorising
        block = sch.get_sblock(name)
        t, bit = sch.get_loops(block)[-2:]
        sch.reorder(bit, t)  # bits outermost: tables stay in the vector lanes
        _vectorize_last(sch, block, h, lanes)
        sch.decompose_reduction(block, bit)
    _vectorize_last(sch, sch.get_sblock("score"), h, lanes)


def _schedule_bmm(sch: Any, block: Any, knobs: HashKnobs, bs: int, vec: int) -> None:
    """One block matmul as a GEMM micro-kernel: a ``rows x cols`` accumulator tile in
    registers, one weight row vector per input column shared by the ``rows`` tokens."""
    # compute_at drops unit loops: [tile_i if tile > 1] [r if R > 1] [b if D > BS] o k
    rest = sch.get_loops(block)[1:]
    o, k = rest[-2:]
    tiled = not (isinstance(knobs.tile, int) and knobs.tile == 1)
    outer = list(rest[1:-2] if tiled else rest[:-2])
    if tiled:
        rows_o, rows_i = sch.split(rest[0], [None, knobs.rows])
        outer.append(rows_o)
    cols_o, cols_i = sch.split(o, [None, knobs.cols])
    sch.reorder(*outer, cols_o, k, *([rows_i] if tiled else []), cols_i)
    acc = sch.cache_write(block, 0, "local")  # the [rows, cols] accumulator tile
    sch.reverse_compute_at(acc, cols_o)
    if vec > 1:
        unroll_v, lane = sch.split(cols_i, [None, vec])
        sch.vectorize(lane)
        sch.unroll(unroll_v)
    if tiled:
        sch.unroll(rows_i)
    _vectorize_last(sch, acc, bs, vec)
    # the write-back fully unrolled too, so that LLVM keeps the tile in registers (a loop
    # over it leaves a stack copy that every tile stores and reloads)
    loops = sch.get_loops(acc)
    anchor = sch.get(cols_o)
    own = [lp for n, lp in enumerate(loops) if any(sch.get(p).same_as(anchor) for p in loops[:n])]
    for lp in own[:-1] if vec > 1 else own:
        sch.unroll(lp)
    sch.decompose_reduction(block, k)  # after vectorize (TVM 0.27 pitfall 4)


def schedule_gather(sch: Any, shapes: Any, lanes: int, knobs: GatherKnobs) -> None:
    """Apply the gather schedule to the gather PrimFunc in ``sch`` (in place).

    ``knobs`` must already be valid for ``shapes`` (:func:`valid_gather_knobs`):
    ``cols`` > 0 takes the register form, else the table-outer form.
    """
    if isinstance(knobs.cols, int) and knobs.cols == 0:
        _schedule_gather_table_outer(sch, shapes, lanes, knobs)
    else:
        _schedule_gather_registers(sch, shapes, lanes, knobs.cols)


def _schedule_gather_registers(sch: Any, shapes: Any, lanes: int, cols: Any) -> None:
    """Token-outer gather accumulating in registers: chunks of tokens in parallel; per
    column tile (``cols`` outputs) every token of the chunk adds each table's row slice
    into a register tile (one table load per FMA, ``y`` written once). The tables' slice
    for one column tile (``h * 2**tau * cols`` elements) stays in L2 across the chunk."""
    block = sch.get_sblock("gather")
    i, c, k = sch.get_loops(block)
    i_o, i_i = sch.split(i, [None, GATHER_TOKEN_CHUNK])
    c_o, c_i = sch.split(c, [None, cols])
    sch.reorder(i_o, c_o, i_i, k, c_i)
    sch.parallel(i_o)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, i_i)
    unroll_v, lane = sch.split(c_i, [None, lanes])
    sch.vectorize(lane)
    sch.unroll(unroll_v)
    _vectorize_last(sch, acc, lanes, lanes)
    sch.decompose_reduction(block, k)


def _schedule_gather_table_outer(sch: Any, shapes: Any, lanes: int, knobs: GatherKnobs) -> None:
    """Table-outer gather (module docstring): groups of ``kb`` tables outermost."""
    block = sch.get_sblock("gather")
    i, c, k = sch.get_loops(block)
    # Phase 1: groups of kb tables outermost (cache-resident group), tokens inside.
    k_o, k_i = sch.split(k, [None, knobs.kb])
    # Phase 2: per token, the kb rows of the group are added into the y row (L1 resident),
    # columns vectorised. (Accumulating in registers instead needs the partial sum over a
    # group as its own block: cache_write here would make a y-sized "local" buffer,
    # because the reduction runs across the outer k_o loop.)
    sch.reorder(k_o, i, k_i, c)
    _vectorize_last(sch, block, shapes.d_out, lanes)
    # Phase 3: tokens in parallel inside each table group; the bias init nest (decomposed
    # before k_o) inherits the parallel token loop.
    sch.parallel(i)
    sch.decompose_reduction(block, k_o)


class CpuSchedule:
    """The hand schedules with default knobs (``HashKnobs()``, ``GatherKnobs()``)."""

    name = NAME
    fold = True
    token_tile = TOKEN_TILE

    def __init__(self, hash_knobs: HashKnobs | None = None,
                 gather_knobs: GatherKnobs | None = None, lanes: int | None = None):
        self.hash_knobs = hash_knobs or HashKnobs()
        self.gather_knobs = gather_knobs or GatherKnobs()
        # fp32 vector lanes; None = the target's (8 with AVX2, 16 with AVX-512). Tests set
        # it to run the other width's schedule on this host (LLVM splits wider vectors).
        self.lanes = lanes

    def _lanes(self, target: Any) -> int:
        return self.lanes or tvm_shim.vector_lanes(target)

    def applies_to(self, target: Any) -> bool:
        return tvm_shim.is_cpu_target(target)

    def hash(self, func: Any, shapes: Any, target: Any) -> Any:
        lanes = self._lanes(target)
        sch = tvm_shim.Schedule(func)
        schedule_hash(sch, shapes, lanes, valid_hash_knobs(shapes, lanes, self.hash_knobs))
        return sch.mod["main"]

    def gather(self, func: Any, shapes: Any, target: Any) -> Any:
        lanes = self._lanes(target)
        sch = tvm_shim.Schedule(func)
        schedule_gather(sch, shapes, lanes,
                        valid_gather_knobs(shapes, lanes, self.gather_knobs))
        return sch.mod["main"]

    def cache_token(self) -> str:
        return f"{self.hash_knobs}{self.gather_knobs}" + (f"lanes={self.lanes}" if self.lanes else "")
