"""CPU schedules of the backward kernels (``lookupc.kernels.backward``, ``lookupc.kernels.backward_cpu``).

One function per kernel, ``schedule_<kernel>(func, lanes=8, **knobs) -> PrimFunc``;
:data:`SCHEDULES` maps the kernels' global symbols to them. ``lanes`` is the fp32
vector width of the target (8 with AVX2, 16 with AVX-512: ``tvm_shim.vector_lanes``).
Style as in ``schedules/cpu.py``: parallel over tokens (or tables, or rows), vectors
along contiguous inner axes, register tiles (``cache_write`` "local") for the matmuls.

Vector rule: a vectorised loop here only ever walks a contiguous inner axis, with any
data-dependent index (a table row picked by a code) the same in every lane; vector
widths are powers of two that divide the extent, so there are no tail predicates inside
vectors either. All vector code is explicit: :func:`codegen_target` turns LLVM's loop
and SLP auto-vectorisers off (as ``schedules/naive.py`` does), because left on they
re-vectorised the scalar loops that remain (e.g. the per-table sums of the score
gradient when a table's bits are not a power of two) into masked gathers and scatters
on AVX-512 targets, the code LLVM 22 miscompiled there (issue 13). The tests check the
AVX-512 machine code for gathers, scatters and masked memory accesses.

What each kernel becomes
    * fused gather backward (what the CPU path runs): token blocks outermost, tables in
      parallel inside, so a block of ``grad_y`` rows stays in L2 while every table uses
      it; per (table, token) pair one loop over the columns both accumulates the score's
      dot product in vector registers and updates the table's gradient row (a vector
      read-modify-write; the row belongs to the thread's table, so no races), sharing
      each ``grad_y`` load.
    * score gradient alone (tokens in parallel, the dot product in vector accumulators via
      ``rfactor``), and the table gradient alone as a segment reduction (table rows in
      parallel, the row's segment summed in vector registers) or as the serial scatter.
    * rounds (block matmul + butterflies): token tiles in parallel, every stage of a
      tile computed in the tile (L1 resident); the block matmul is a register-tiled
      micro-kernel (``rows`` tokens x ``cols`` output columns), the butterflies are split
      into contiguous chunks of the partner distance (radix-4 stages compute a group's
      four outputs together). Stages with partner distance below the vector width run as
      narrower vectors (or scalars).
    * score gradient: token tiles in parallel; ``z`` and ``exp(-2|z|)`` in vectors along
      the code coordinate, the per-table sums serial, ``dz`` vectorised over the bits of
      a table.
    * weight gradient: tasks of (round, group of BH4 blocks) walk the token tiles in
      order; per tile and block an ``rfactor`` partial in ``ro x ri`` register tiles.
    * column sums: column chunks in parallel, accumulated in registers over tokens.

Measured (MiniLM config: d 384 -> D 512, 128 tables x 4 bits, blocks of 32; 1280
tokens; 2 threads of a quiet 2-core Zen 3, kernels alone): hash backward 10.1-10.5 ms
(8 rounds 5.0, the last round 0.5, weight gradient 2.6, score gradient 0.9, the rest
1.1), gather backward 6.0 ms; one thread: 17.6 and 11 ms.

Size: one schedule per backward kernel (the list above), gather and hash alike built
from the helpers here that enforce the vector rule (``_vectorize``, ``_register_tile``,
``_dot_rfactor``); ``lookupc.runtime.cpu_training`` keys its build cache on this
module's source, which stays correct only while every CPU backward schedule lives in it.
"""

from __future__ import annotations

from lookupc import tvm_shim

__all__ = ["SCHEDULES", "codegen_target", "schedule_gather_backward_fused",
           "schedule_gather_score_grad", "schedule_table_grad_serial", "schedule_table_grad_segment", "schedule_round",
           "schedule_fwht_scaled", "schedule_score_grad", "schedule_score_grad_fast",
           "schedule_weight_grad", "schedule_column_sum", "schedule_column_sum_planes",
           "schedule_fold_rounds", "schedule_pad_inputs", "schedule_input_grad",
           "pow2_divisor", "ROUND_TILE"]

# Tokens per parallel task of the round kernels (the orchestrator pads to a multiple).
ROUND_TILE = 8


def codegen_target(target):
    """``target`` with LLVM's auto-vectorisers off: only the schedules' vectors remain."""
    from lookupc.schedules.cpu.naive import SCALAR_CODEGEN

    return tvm_shim.with_llvm_options(target, SCALAR_CODEGEN)


def pow2_divisor(extent: int, cap: int) -> int:
    """Largest power of two <= cap that divides extent (>= 1)."""
    v = 1
    while v * 2 <= cap and extent % (v * 2) == 0:
        v *= 2
    return v


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _vectorize(sch, loop, lanes: int, unroll_rest: bool = False) -> None:
    """Vectorise ``loop`` (a constant extent) by the widest power of two dividing it."""
    extent = _extent(sch, loop)
    vec = pow2_divisor(extent, lanes)
    if vec <= 1:
        return
    if vec == extent:
        sch.vectorize(loop)
        return
    outer, inner = sch.split(loop, [None, vec])
    sch.vectorize(inner)
    if unroll_rest:
        sch.unroll(outer)


def _register_tile(sch, blk, at, rows, cols, lanes: int, reduction) -> None:
    """Accumulate ``blk``'s (rows x cols) output tile in registers, written back at loop
    ``at``: the columns vectorised (the widest power of two dividing them, the rest
    unrolled), the rows unrolled, the reduction's init split off at ``reduction``."""
    vec = pow2_divisor(_extent(sch, cols), lanes)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, at)
    _vectorize(sch, cols, vec, unroll_rest=True)
    sch.unroll(rows)
    _vectorize(sch, sch.get_loops(acc)[-1], vec)
    sch.decompose_reduction(blk, reduction)


def _schedule(func):
    return tvm_shim.Schedule(func)


def _done(sch):
    return sch.mod["main"]


# ---------------------------------------------------------------------------------------
# gather backward
# ---------------------------------------------------------------------------------------

def _loops_below(sch, block, anchor) -> tuple[list, list]:
    """The loops of ``block`` below ``anchor``, split into (spatial, reduction) ones by the
    kind of the block iter each is bound to (outer to inner within each list)."""
    loops = sch.get_loops(block)
    target = sch.get(anchor)
    below = loops[[sch.get(lp).same_as(target) for lp in loops].index(True) + 1:]
    realize = sch.get(loops[-1]).body
    kinds = {}
    for iv, value in zip(realize.block.iter_vars, realize.iter_values):
        if isinstance(value, tvm_shim.tvm.tirx.Var):
            kinds[value] = int(iv.iter_type)  # 0: spatial, 2: reduction
    spatial = [lp for lp in below if kinds.get(sch.get(lp).loop_var) == 0]
    reduce = [lp for lp in below if kinds.get(sch.get(lp).loop_var) == 2]
    return spatial, reduce


def _reduction_loops(sch, block) -> list:
    """The loops of ``block`` bound to its reduction iters, outermost first."""
    loops = sch.get_loops(block)
    realize = sch.get(loops[-1]).body
    red = set()
    for iv, value in zip(realize.block.iter_vars, realize.iter_values):
        if int(iv.iter_type) == 2:
            red |= {sch.get(lp).loop_var for lp in loops if _uses_var(value, sch.get(lp).loop_var)}
    return [lp for lp in loops if sch.get(lp).loop_var in red]


def _uses_var(expr, var) -> bool:
    """Whether ``expr`` reads ``var``."""
    return any(v.same_as(var) for v in tvm_shim.tvm.tirx.analysis.undefined_vars(expr, []))


def _dot_rfactor(sch, block, d_loop, lanes: int, acc: int) -> None:
    """The dot product over ``d_loop`` (innermost) in ``acc`` vector accumulators.

    Two ``rfactor`` steps: ``part[a, b] = sum_{d_o} x[d_o, a, b]`` (acc x vec registers),
    ``lane[b] = sum_a part[a, b]`` (vector adds), then the block sums the ``vec`` lanes.
    Both partial buffers live right under the loop above ``d_loop`` (registers).
    """
    d_out = _extent(sch, d_loop)
    vec = pow2_divisor(d_out, lanes)
    acc = pow2_divisor(d_out // vec, acc)
    if vec == 1:
        return
    anchor = sch.get_loops(block)[-2]
    b = sch.split(d_loop, [None, acc, vec] if acc > 1 else [None, vec])[-1]
    lane = sch.rfactor(b, factor_axis=0)  # lane[b] = sum over (d_o, a)
    # (rfactor gives the rf block its own copy of the loops: a is its second-to-last)
    part = sch.rfactor(sch.get_loops(lane)[-2], factor_axis=0) if acc > 1 else None
    sch.compute_at(lane, anchor)
    sch.set_scope(lane, 0, "local")
    first = part if part is not None else lane  # the block that walks d_o
    if part is not None:  # part[a, b] = sum over d_o
        sch.compute_at(part, anchor)
        sch.set_scope(part, 0, "local")
        (a_loop, b_loop), d_o = _loops_below(sch, part, anchor)
        sch.reorder(*d_o, a_loop, b_loop)
        sch.unroll(a_loop)
        (b2,), (a2,) = _loops_below(sch, lane, anchor)
        sch.reorder(a2, b2)
        sch.vectorize(b2)
        sch.unroll(a2)
        sch.decompose_reduction(lane, a2)
    else:
        (b_loop,), d_o = _loops_below(sch, lane, anchor)
        if d_o:
            sch.reorder(*d_o, b_loop)
    sch.vectorize(b_loop)
    if d_o:
        sch.decompose_reduction(first, d_o[0])
    sch.decompose_reduction(block, _reduction_loops(sch, block)[0])


def schedule_gather_backward_fused(func, lanes: int = 8, tb: int | None = None):
    """Token blocks of ``tb`` outermost, tables in parallel inside; per (table, token)
    pair, the dot product's partial sums in registers and the gradient-row update in
    vectors, sharing each ``grad_y`` load (the PrimFunc splits the columns for it); then
    the partial sums are added up, as vectors and then across lanes.

    Token blocks: a block of ``grad_y`` rows stays in L2 while every table uses it; each
    block re-reads the tables' rows instead. Default ``tb = max(128, 4 * rows)``. Measured
    on one Zen 3 core at 1280 tokens: 16 rows per table (MiniLM config, 3 MiB of tables)
    8.8 ms with blocks of 128 against 16.7 ms without blocks (all of ``grad_y`` streamed
    from L3 once per table); 256 rows (64 MiB of tables) 65-68 ms with blocks of 256 or
    none, 76 ms with blocks of 128."""
    sch = _schedule(func)
    if tb is None:
        tables = int(func.params[1].shape[1])  # codes [n, tables]
        rows = int(func.params[3].shape[0]) // tables  # table [tables * rows, d_out]
        tb = max(128, 4 * rows)
    zero = sch.get_sblock("zero")
    sch.parallel(sch.get_loops(zero)[0])
    _vectorize(sch, sch.get_loops(zero)[-1], lanes)
    dot = sch.get_sblock("dot")
    k, t = sch.get_loops(dot)[:2]
    t_o, t_i = sch.split(t, [None, tb])
    sch.reorder(t_o, k)
    sch.parallel(k)
    for name in ("lane", "g_scores"):
        sch.reverse_compute_at(sch.get_sblock(name), t_i)
    sch.set_scope(dot, 0, "local")
    sch.set_scope(sch.get_sblock("lane"), 0, "local")
    o, a, b = sch.get_loops(dot)[-3:]
    if _extent(sch, b) > 1:
        sch.vectorize(b)
    if _extent(sch, a) > 1:
        sch.unroll(a)
    sch.decompose_reduction(dot, o)
    lane = sch.get_sblock("lane")
    spatial, red = _loops_below(sch, lane, t_i)
    if spatial and red:
        sch.reorder(red[0], spatial[-1])
        sch.vectorize(spatial[-1])
        sch.unroll(red[0])
        sch.decompose_reduction(lane, red[0])
    gs = sch.get_sblock("g_scores")
    red = _reduction_loops(sch, gs)
    if red:
        sch.decompose_reduction(gs, red[0])
    return _done(sch)


def schedule_gather_score_grad(func, lanes: int = 8, acc: int = 4):
    """Tokens in parallel; each dot product in vector accumulators."""
    sch = _schedule(func)
    blk = sch.get_sblock("g_scores")
    t, _, d = sch.get_loops(blk)
    sch.parallel(t)
    _dot_rfactor(sch, blk, d, lanes, acc)
    return _done(sch)


def schedule_table_grad_serial(func, lanes: int = 8):
    """``tir_backward.table_grad_scatter(atomic=False)``: the zeroing in parallel vectors,
    the scatter as written (tables inside tokens, serial, scalar). TVM refuses to
    parallelise or vectorise a block that declares a read of the buffer it writes; the
    fused gather backward (what the CPU path runs) leaves that read out of its declared
    regions, and is parallel over tables and vectorised along the rows."""
    sch = _schedule(func)
    zero = sch.get_sblock("zero")
    r, d = sch.get_loops(zero)
    sch.parallel(r)
    _vectorize(sch, d, lanes)
    return _done(sch)


def schedule_table_grad_segment(func, lanes: int = 8, cols: int = 64):
    """Table rows in parallel; per row, ``cols`` columns at a time accumulate the row's
    segment in registers (vectors along d_out)."""
    sch = _schedule(func)
    blk = sch.get_sblock("segment")
    r, d = sch.get_loops(blk)
    d_out = _extent(sch, d)
    c = pow2_divisor(d_out, cols)
    d_o, d_i = sch.split(d, [None, c])
    sch.parallel(r)
    # The block's body holds the segment loop (lane-uniform bounds): vectorising d_i
    # makes its body a vector multiply-add into the register accumulator.
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, d_o)
    _vectorize(sch, d_i, lanes, unroll_rest=True)
    _vectorize(sch, sch.get_loops(acc)[-1], lanes)
    return _done(sch)


# ---------------------------------------------------------------------------------------
# rounds: block matmul + butterflies
# ---------------------------------------------------------------------------------------

def _stage_blocks(sch) -> list[str]:
    """Butterfly block names of a round kernel in dataflow order: ``fwht{s}`` (radix 2)
    and ``fwht{s}q`` (radix 4: stages s and s+1), s rising."""
    names = []
    for s in range(31):
        for name in (f"fwht{s}", f"fwht{s}q"):
            try:
                sch.get_sblock(name)
            except Exception:  # noqa: BLE001 - no such stage
                continue
            names.append(name)
    return names


def _schedule_butterfly(sch, block, lanes: int) -> None:
    """Split the stage's column loop into (outer, group, within) chunks of the partner
    distance h and vectorise ``within``; a radix-4 stage computes a group's four outputs
    chunk by chunk (the group loop unrolled inside), so each input vector is loaded once."""
    name = sch.get(block).name_hint
    radix4 = name.endswith("q")
    h = 1 << int(name[len("fwht"):].rstrip("q"))
    group = 4 if radix4 else 2
    j = sch.get_loops(block)[-1]
    if h * group > _extent(sch, j):
        return
    _, part, within = sch.split(j, [None, group, h])
    vec = pow2_divisor(h, lanes)
    if vec > 1:
        w_o, w_i = sch.split(within, [None, vec])
        if radix4:
            sch.reorder(w_o, part)
        sch.vectorize(w_i)
    sch.unroll(part)


def _schedule_block_matmul(sch, blk, lanes: int, rows: int, cols: int, out_contig: bool):
    """Register-tile the bmm block (loops ... p, j, q): ``rows`` tokens x ``cols`` columns.

    ``out_contig``: the weight's output index is contiguous (vector FMAs along it);
    otherwise the reduction index is, and the tile is a scalar-output dot product.
    """
    p, j, q = sch.get_loops(blk)[-3:]
    tile = _extent(sch, p)
    bs = int(sch.get(blk).iter_vars[-1].dom.extent)
    if not out_contig or bs == 1:
        return  # unit blocks or a [out, in] weight: plain loops (LLVM may vectorise q)
    rows = pow2_divisor(tile, rows)
    cols = pow2_divisor(bs, cols)
    p_o, p_i = sch.split(p, [None, rows])
    j_o, j_i = sch.split(j, [None, cols])
    sch.reorder(p_o, j_o, q, p_i, j_i)
    _register_tile(sch, blk, j_o, p_i, j_i, lanes, q)


def schedule_round(func, lanes: int = 8, rows: int = 4, cols: int = 16, first: str = "bmm",
                   out_contig: bool = True):
    """A round (block matmul or scaled load, then butterflies): one token tile of one
    repeat per task, every stage inside the tile, stages vectorised along columns.

    ``out_contig``: the weight is read ``w[.., q, p]`` with the output index p last (the
    transposed and folded rounds); the forward ``[out, in]`` form keeps a plain bmm."""
    sch = _schedule(func)
    names = [first, *_stage_blocks(sch)]
    last = sch.get_sblock(names[-1])
    r, t = sch.get_loops(last)[:2]
    rt = sch.fuse(r, t)
    sch.parallel(rt)
    for name in reversed(names[:-1]):
        sch.compute_at(sch.get_sblock(name), rt, preserve_unit_loops=True)
    for name in names[1:]:
        _schedule_butterfly(sch, sch.get_sblock(name), lanes)
    blk = sch.get_sblock(first)
    if first == "bmm":
        _schedule_block_matmul(sch, blk, lanes, rows, cols, out_contig)
    else:
        _vectorize(sch, sch.get_loops(blk)[-1], lanes)
    return _done(sch)


def schedule_fwht_scaled(func, lanes: int = 8):
    """Like :func:`schedule_round` with the scaled load as the first stage."""
    return schedule_round(func, lanes, first="load")


# ---------------------------------------------------------------------------------------
# score gradient, weight gradient, sums, glue
# ---------------------------------------------------------------------------------------

def schedule_score_grad(func, lanes: int = 8):
    """libm form (``tir_backward.score_grad``): tokens in parallel, z and the per-table sums
    per token; the transcendental calls stay scalar (the CPU path runs ``score_grad_fast``).
    Tokens are not tiled: a tiled symbolic token loop needs a tail predicate, and TVM
    0.27's buffer compaction then emits negative allocation sizes."""
    sch = _schedule(func)
    dz = sch.get_sblock("dz")
    t, _ = sch.get_loops(dz)
    sch.parallel(t)
    for name in ("log_p", "abs_sum", "z"):
        sch.compute_at(sch.get_sblock(name), t, preserve_unit_loops=True)
    _vectorize(sch, sch.get_loops(sch.get_sblock("z"))[-1], lanes)
    return _done(sch)


def schedule_score_grad_fast(func, lanes: int = 8):
    """Token tiles in parallel; z and e in vectors along c, dz along the bits of a table."""
    sch = _schedule(func)
    dz = sch.get_sblock("dz")
    t = sch.get_loops(dz)[0]
    sch.parallel(t)
    for name in ("den", "abs_sum", "e", "z"):
        sch.compute_at(sch.get_sblock(name), t, preserve_unit_loops=True)
    for name in ("z", "e"):
        _vectorize(sch, sch.get_loops(sch.get_sblock(name))[-1], lanes)
    # dz vectorised over the bits only where a table's bits sit in one plane (see
    # score_grad_fast: the aligned form indexes plane and column separately).
    bits = _extent(sch, sch.get_loops(dz)[-1])
    width = int(func.params[-1].shape[-1])  # dz [R, m, tile, D] (0.27: params are buffers)
    if width % bits == 0:
        _vectorize(sch, sch.get_loops(dz)[-1], lanes)
    for name in ("abs_sum", "den"):
        blk = sch.get_sblock(name)
        sch.decompose_reduction(blk, sch.get_loops(blk)[-1])
    try:
        pad = sch.get_sblock("dz_pad")
    except Exception:  # noqa: BLE001 - no padded columns
        return _done(sch)
    t, _, c = sch.get_loops(pad)
    sch.parallel(t)
    _vectorize(sch, c, lanes)
    return _done(sch)


def schedule_weight_grad(func, lanes: int = 8, ro: int = 4, ri: int = 16, tasks: int = 4,
                         bg: int | None = None):
    """Tasks of (split, round, group of ``bg`` BH4 blocks) in parallel; each walks the
    token tiles in order. Per tile and block, ``rfactor`` gives the tile's partial
    [BS, BS] block (L1), computed in ``ro x ri`` register tiles (vectors along the input
    index) and then added into the output block. A tile's rows are read once, ``bg * BS``
    contiguous floats at a time: with one task per block, each task read 128-byte pieces
    of rows 2 KiB apart, which the hardware prefetchers do not follow (measured at the
    MiniLM config, 1280 tokens, one thread: 6.9 ms per block, 3.8 ms per whole row).
    ``bg`` defaults to the widest group that still gives at least ``tasks`` tasks."""
    sch = _schedule(func)
    blk = sch.get_sblock("g_w")
    t = sch.get_loops(blk)[5]
    part = sch.rfactor(t, factor_axis=0)  # part[t] = sum over the tile's tokens
    s, q, b, o, i, t = sch.get_loops(blk)
    nb, others = _extent(sch, b), _extent(sch, s) * _extent(sch, q)
    if bg is None:
        bg = nb
        while bg > 1 and others * (nb // bg) < tasks:
            bg //= 2
    b_o, b_i = sch.split(b, [None, pow2_divisor(nb, bg)])
    sch.reorder(t, b_i, o, i)
    sch.parallel(sch.fuse(s, q, b_o))
    sch.compute_at(part, b_i, preserve_unit_loops=True)  # one [BS, BS] partial at a time
    sch.set_scope(part, 0, "local")
    spatial, red = _loops_below(sch, part, b_i)
    o2, i2, p2 = spatial[-2], spatial[-1], red[0]
    bs = _extent(sch, o2)
    ro, ri = pow2_divisor(bs, ro), pow2_divisor(bs, ri)
    o_o, o_i = sch.split(o2, [None, ro])
    i_o, i_i = sch.split(i2, [None, ri])
    sch.reorder(o_o, i_o, p2, o_i, i_i)
    _register_tile(sch, part, i_o, o_i, i_i, lanes, p2)
    _vectorize(sch, sch.get_loops(blk)[-1], lanes)
    sch.decompose_reduction(blk, t)
    return _done(sch)


def _column_sum(sch, blk, lanes: int, chunk: int) -> None:
    """Columns (the fused spatial loops) in parallel chunks, token loop inside, chunk in
    registers."""
    loops = sch.get_loops(blk)
    spatial, t = loops[:-1], loops[-1]
    cols = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    c = pow2_divisor(_extent(sch, cols), chunk)
    c_o, c_i = sch.split(cols, [None, c])
    sch.reorder(c_o, t, c_i)
    sch.parallel(c_o)
    acc = sch.cache_write(blk, 0, "local")
    sch.reverse_compute_at(acc, c_o)
    _vectorize(sch, c_i, lanes, unroll_rest=True)
    _vectorize(sch, sch.get_loops(acc)[-1], lanes)
    sch.decompose_reduction(blk, t)


def schedule_column_sum(func, lanes: int = 8, chunk: int = 64):
    """``tir_backward.column_sum``: column chunks in parallel, sums in registers."""
    sch = _schedule(func)
    _column_sum(sch, sch.get_sblock("col_sum"), lanes, chunk)
    return _done(sch)


def schedule_column_sum_planes(func, lanes: int = 8, chunk: int = 64):
    """``column_sum_planes``: as :func:`schedule_column_sum` over (plane, column)."""
    return schedule_column_sum(func, lanes, chunk)


def schedule_fold_rounds(func, lanes: int = 8):
    """(round, repeat, block) in parallel; vectors along the output index p."""
    sch = _schedule(func)
    for name in ("w_fwd", "w_bwd"):
        blk = sch.get_sblock(name)
        j, r, b, q, p, red = sch.get_loops(blk)
        sch.reorder(red, p)
        sch.parallel(sch.fuse(j, r, b))
        _vectorize(sch, p, lanes)
        sch.decompose_reduction(blk, red)
    j, r, b, q, p = sch.get_loops(sch.get_sblock("w_raw"))
    sch.parallel(sch.fuse(j, r, b))
    _vectorize(sch, p, lanes)
    return _done(sch)


def schedule_pad_inputs(func, lanes: int = 8):
    """Rows in parallel, contiguous copies and fills in vectors."""
    sch = _schedule(func)
    for name in ("x_copy", "x_zero_cols", "x_zero_rows", "gs_copy", "gs_zero_rows"):
        try:
            blk = sch.get_sblock(name)
        except Exception:  # noqa: BLE001 - no padded columns
            continue
        loops = sch.get_loops(blk)
        sch.parallel(loops[0])
        _vectorize(sch, loops[-1], lanes)
    return _done(sch)


def schedule_input_grad(func, lanes: int = 8):
    """Tokens in parallel; per token the repeats are summed into the row (vectors)."""
    sch = _schedule(func)
    blk = sch.get_sblock("g_x")
    t, c, r = sch.get_loops(blk)
    sch.reorder(r, c)
    sch.parallel(t)
    _vectorize(sch, c, lanes)
    sch.decompose_reduction(blk, r)
    return _done(sch)


def _round_out_in(func, lanes: int = 8, **knobs):
    """``tir_backward.block_round`` forward form (weight [out, in]): no vector bmm."""
    return schedule_round(func, lanes, out_contig=False, **knobs)


SCHEDULES = {
    "gather_backward_fused": schedule_gather_backward_fused,
    "gather_score_grad": schedule_gather_score_grad,
    "table_grad_serial": schedule_table_grad_serial,
    "table_grad_segment": schedule_table_grad_segment,
    "round_fwd": _round_out_in,
    "round_bwd": schedule_round,
    "round_fwd_nofwht": _round_out_in,
    "round_bwd_nofwht": schedule_round,
    "round_folded": schedule_round,
    "round_folded_nofwht": schedule_round,
    "fwht_scaled": schedule_fwht_scaled,
    "score_grad": schedule_score_grad,
    "score_grad_fast": schedule_score_grad_fast,
    "weight_grad": schedule_weight_grad,
    "column_sum": schedule_column_sum,
    "column_sum_planes": schedule_column_sum_planes,
    "fold_rounds": schedule_fold_rounds,
    "pad_inputs": schedule_pad_inputs,
    "input_grad": schedule_input_grad,
}
