"""TensorIR of the LookupFFN backward in the forms the CPU runs fastest.

The math is :mod:`lookupc.kernels.backward`'s (and so :mod:`lookupc.reference`'s); these
PrimFuncs change its shape for CPUs (scheduled in ``schedules/cpu/backward.py``):

* :func:`gather_backward_fused`: score and table gradients in one pass over the
  (table, token) pairs. Tables are the outer, parallel axis: each table's gradient rows
  are written by the one thread that owns the table (race-free without atomics or a
  sort), and each ``grad_y`` value is loaded once for both gradients.
* :func:`fold_rounds`: BH4 weights -> the folded block layouts the round kernels take.
  Sylvester order gives ``H_D = (H_{D/BS} (x) I) (I (x) H_BS)``, so the BS-wide part of
  every Hadamard transform is folded into the BS x BS blocks and only the
  ``log2(D/BS)`` butterfly stages across blocks stay (as in the forward hash kernel).
* :func:`round_folded`: ``out = crossblock_fwht(blockdiag(w)^T a)`` with the block
  output index contiguous in ``w`` (vector FMAs along it). With the folded weights it
  is a forward round, a backward round, or (blocks = ``decay * H_BS``) the scaled
  Hadamard transform that starts the backward.
* :func:`score_grad_fast`: the score derivative with one vectorisable ``exp`` per
  coordinate (:func:`lookupc.kernels.forward.fast_exp_neg`) instead of libm's ``exp``,
  ``log1p`` and ``sigmoid``; the output is ``[R, n, D]``, one plane per repeat.
* :func:`column_sum_planes`, :func:`pad_inputs`, :func:`input_grad`: the glue (hash
  bias gradient, zero padding, the input gradient), in TIR so that no torch op (and so
  no wake-up of torch's OpenMP pool between two TVM kernels) runs inside the backward.

All are float32, symbolic in the token count, and name their blocks stably.

Size: one PrimFunc per CPU-form backward kernel, which ``lookupc.runtime.cpu_training``
imports as one set and ``schedules/cpu/backward.py`` schedules one for one;
``fold_rounds`` writes the folded weight layout that ``round_folded`` reads, so the two
halves of that contract stay side by side.
"""

from __future__ import annotations

from .. import tvm_shim
from .backward import _butterfly, _check_pos, _check_pow2, _finish
from .forward import fast_exp_neg

tvm = tvm_shim.tvm
from tvm import te, tirx  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from ..errors import LookupcInputError  # noqa: E402

__all__ = ["gather_backward_fused", "fold_rounds", "round_folded", "score_grad_fast",
           "column_sum_planes", "pad_inputs", "input_grad", "crossblock_stages"]

_F32 = "float32"


def gather_backward_fused(tables: int, rows: int, d_out: int, lanes: int = 8,
                          acc: int = 4) -> tirx.PrimFunc:
    """Both gather gradients, table by table, in one pass over the (table, token) pairs.

    After zeroing the table gradient (block ``"zero"``), for each table k, token n and
    column ``d = (o * A + a) * B + b`` (``B = lanes``, ``A = acc``, both cut to powers of
    two dividing ``d_out``), block ``"dot"`` accumulates ``table[k*rows + codes[n, k], d] *
    grad_y[n, d]`` into ``part[a, b]`` (a reduction over o: A x B partial sums, vector
    registers once scheduled) and block ``"scatter"`` adds ``scores[n, k] * grad_y[n, d]`` to
    the gradient row ``k*rows + codes[n, k]``: both in the same loop body, so each
    ``grad_y`` value is loaded once for both. Then ``"lane"`` sums ``part`` over a and
    ``"g_scores"`` over b. Parameters: ``grad_y`` [n, d_out], ``codes`` int32 [n, tables]
    (masked to ``rows - 1``), ``scores`` [n, tables], ``table`` [tables * rows, d_out];
    outputs ``g_scores`` [n, tables], ``g_table`` like ``table``.
    """
    for name, v in (("tables", tables), ("d_out", d_out), ("lanes", lanes), ("acc", acc)):
        _check_pos(name, v)
    _check_pow2("rows", rows)
    total, mask = tables * rows, rows - 1
    nb = _pow2_divisor(d_out, lanes)
    na = _pow2_divisor(d_out // nb, acc)
    no = d_out // (na * nb)

    @T.prim_func(s_tir=True)
    def fused(var_gy: T.handle, var_codes: T.handle, var_s: T.handle,
              table: T.Buffer((total, d_out), _F32), var_gs: T.handle,
              g_table: T.Buffer((total, d_out), _F32)):
        T.func_attr({"global_symbol": "gather_backward_fused", "tirx.noalias": True})
        n = T.int32()
        grad_y = T.match_buffer(var_gy, (n, d_out), _F32)
        codes = T.match_buffer(var_codes, (n, tables), "int32")
        scores = T.match_buffer(var_s, (n, tables), _F32)
        g_scores = T.match_buffer(var_gs, (n, tables), _F32)
        part = T.sblock_alloc_buffer((tables, n, na, nb), _F32)
        lane = T.sblock_alloc_buffer((tables, n, nb), _F32)
        for r, d in T.grid(total, d_out):
            with T.sblock("zero"):
                vr, vd = T.axis.remap("SS", [r, d])
                g_table[vr, vd] = T.float32(0)
        for k in range(tables):
            for t, o, a, b in T.grid(n, no, na, nb):
                with T.sblock("dot"):
                    vk, vt, vo, va, vb = T.axis.remap("SSRSS", [k, t, o, a, b])
                    T.reads(table[vk * rows + T.bitwise_and(codes[vt, vk], mask),
                                  (vo * na + va) * nb + vb],
                            grad_y[vt, (vo * na + va) * nb + vb], codes[vt, vk])
                    T.writes(part[vk, vt, va, vb])
                    with T.init():
                        part[vk, vt, va, vb] = T.float32(0)
                    part[vk, vt, va, vb] = part[vk, vt, va, vb] + (
                        table[vk * rows + T.bitwise_and(codes[vt, vk], mask),
                              (vo * na + va) * nb + vb]
                        * grad_y[vt, (vo * na + va) * nb + vb])
                with T.sblock("scatter"):
                    vk, vt, vo, va, vb = T.axis.remap("SSSSS", [k, t, o, a, b])
                    # The update's read of g_table is left out of the declared regions (as
                    # for an atomic add): the schedule may then parallelise over tables,
                    # which is race-free, because only iterations of table k touch its rows
                    # and the token loop stays serial (see the module doc).
                    T.reads(codes[vt, vk], scores[vt, vk], grad_y[vt, (vo * na + va) * nb + vb])
                    T.writes(g_table[vk * rows + T.bitwise_and(codes[vt, vk], mask),
                                     (vo * na + va) * nb + vb])
                    g_table[vk * rows + T.bitwise_and(codes[vt, vk], mask),
                            (vo * na + va) * nb + vb] = (
                        g_table[vk * rows + T.bitwise_and(codes[vt, vk], mask),
                                (vo * na + va) * nb + vb]
                        + scores[vt, vk] * grad_y[vt, (vo * na + va) * nb + vb])
        for k, t, b, a in T.grid(tables, n, nb, na):
            with T.sblock("lane"):
                vk, vt, vb, va = T.axis.remap("SSSR", [k, t, b, a])
                with T.init():
                    lane[vk, vt, vb] = T.float32(0)
                lane[vk, vt, vb] = lane[vk, vt, vb] + part[vk, vt, va, vb]
        for k, t, b in T.grid(tables, n, nb):
            with T.sblock("g_scores"):
                vk, vt, vb = T.axis.remap("SSR", [k, t, b])
                with T.init():
                    g_scores[vt, vk] = T.float32(0)
                g_scores[vt, vk] = g_scores[vt, vk] + lane[vk, vt, vb]

    return fused


def _pow2_divisor(extent: int, cap: int) -> int:
    """Largest power of two <= cap that divides extent (>= 1)."""
    v = 1
    while v * 2 <= cap and extent % (v * 2) == 0:
        v *= 2
    return v


def fold_rounds(repeats: int, rounds: int, blocks: int, block_size: int) -> tirx.PrimFunc:
    """The folded block layouts of the BH4 weight for :func:`round_folded`.

    Parameters: ``weight`` [R, rounds, D/BS, BS(out), BS(in)] (the module's), ``had`` the
    Sylvester matrix H_BS [BS, BS]; outputs, each [rounds, R, D/BS, BS, BS]:
    ``w_fwd[j, r, b, q, p] = sum_o H[o, p] W[r, j, b, o, q]`` (the forward round j is
    ``round_folded`` with these blocks), ``w_bwd[j, r, b, q, p] = sum_i W[r, j, b, q, i]
    H[i, p]`` (its transposed round, the backward) and ``w_raw[j, r] = W[r, j]`` (the
    transposed first round, which has no Hadamard transform after it).
    """
    for name, v in (("repeats", repeats), ("rounds", rounds), ("blocks", blocks)):
        _check_pos(name, v)
    _check_pow2("block_size", block_size)
    bs = block_size
    w = te.placeholder((repeats, rounds, blocks, bs, bs), _F32, name="weight")
    had = te.placeholder((bs, bs), _F32, name="had")
    o = te.reduce_axis((0, bs), name="o")
    i = te.reduce_axis((0, bs), name="i")
    shape = (rounds, repeats, blocks, bs, bs)
    # had[o, p] = had[p, o] (H is symmetric), read along p: contiguous vector loads
    fwd = te.compute(shape, lambda j, r, b, q, p: te.sum(had[o, p] * w[r, j, b, o, q], axis=o),
                     name="w_fwd")
    bwd = te.compute(shape, lambda j, r, b, q, p: te.sum(w[r, j, b, q, i] * had[i, p], axis=i),
                     name="w_bwd")
    raw = te.compute(shape, lambda j, r, b, q, p: w[r, j, b, q, p], name="w_raw")
    return _finish([w, had, fwd, bwd, raw], "fold_rounds")


def crossblock_stages(width: int, block_size: int) -> list[int]:
    """Partner distances of the butterfly stages :func:`round_folded` keeps."""
    return [1 << s for s in range(block_size.bit_length() - 1, width.bit_length() - 1)]


def round_folded(repeats: int, blocks: int, block_size: int, *, stages: bool = True,
                 tile: int = 1) -> tirx.PrimFunc:
    """``out[r] = crossblock_fwht(u)``, ``u[b*BS+p] = sum_q w[r, b, q, p] a[r, b*BS+q]``.

    ``stages=False`` leaves the butterflies out (``out = u``). Tokens come in tiles like
    :func:`lookupc.kernels.backward.block_round`: ``a`` [R, m, tile, D] (a free view of
    [R, m*tile, D]); ``w`` [R, D/BS, BS, BS]; output like ``a``. Blocks ``"bmm"``, then the
    stages of partner distances ``2**s >= BS`` in pairs, ``"fwht{s}q"`` (distances
    ``2**s`` and ``2**(s+1)`` in one radix-4 pass), and a last ``"fwht{s}"`` if their
    number is odd.
    """
    for name, v in (("repeats", repeats), ("blocks", blocks), ("tile", tile)):
        _check_pos(name, v)
    _check_pow2("block_size", block_size)
    bs, width = block_size, blocks * block_size
    _check_pow2("blocks * block_size", width)
    m = te.var("m", "int32")
    a = te.placeholder((repeats, m, tile, width), _F32, name="a")
    w = te.placeholder((repeats, blocks, bs, bs), _F32, name="w")
    q = te.reduce_axis((0, bs), name="q")
    out = te.compute((repeats, m, tile, width),
                     lambda r, t, p, j: te.sum(
                         a[r, t, p, (j // bs) * bs + q] * w[r, j // bs, q, j % bs], axis=q),
                     name="bmm")
    if stages:
        dists = crossblock_stages(width, bs)
        while dists:  # two stages at a time (radix 4), a last odd one alone
            h = dists[0]
            if len(dists) > 1:
                out, dists = _butterfly4(out, h, f"fwht{h.bit_length() - 1}q"), dists[2:]
            else:
                out, dists = _butterfly(out, h, f"fwht{h.bit_length() - 1}"), dists[1:]
    return _finish([a, w, out], "round_folded" if stages else "round_folded_nofwht")


def _butterfly4(prev: te.Tensor, h: int, name: str) -> te.Tensor:
    """The Hadamard stages of partner distances h and 2h in one pass (radix 4): each group
    of four h-wide chunks x0..x3 becomes (x0+x1)+(x2+x3), (x0-x1)+(x2-x3), (x0+x1)-(x2+x3),
    (x0-x1)-(x2-x3); a schedule that computes a group's four outputs together loads each
    input once (two radix-2 passes load and store everything twice)."""
    def f(*idx):
        j = idx[-1]
        base = (j // (4 * h)) * (4 * h) + j % h
        x0, x1, x2, x3 = (prev[(*idx[:-1], base + c * h)] for c in range(4))
        quarter = (j // h) % 4
        s0, d0, s1, d1 = x0 + x1, x0 - x1, x2 + x3, x2 - x3
        return te.if_then_else(
            quarter == 0, s0 + s1,
            te.if_then_else(quarter == 1, d0 + d1,
                            te.if_then_else(quarter == 2, s0 - s1, d0 - d1)))

    return te.compute(prev.shape, f, name=name)


def score_grad_fast(repeats: int, width: int, tables: int, bits: int, decay: float,
                    tile: int = 1) -> tirx.PrimFunc:
    """``dz`` = d scores / d z times ``grad_scores``, as :func:`tir_backward.score_grad`.

    Tokens come in tiles (``[m, tile]``, free views of ``[m * tile]``; the caller pads).
    Parameters: ``y`` [R, m, tile, D] (BH4 outputs), ``x_pad`` [m, tile, D], ``hash_bias``
    [C], ``grad_scores`` [m, tile, tables]; output ``dz`` [R, m, tile, D] (coordinate
    ``c = r*D + d``; zero for ``c >= C = tables * bits``). Blocks: ``"z"`` and ``"e"``
    (``exp(-2|z|)``) along the code coordinate c; ``"abs_sum"`` and ``"den"``
    (``prod(1 + e)``) per table; ``"dz"`` over (table, bit); ``"dz_pad"`` zeroes the
    columns past C.
    """
    for name, v in (("repeats", repeats), ("tables", tables), ("bits", bits), ("tile", tile)):
        _check_pos(name, v)
    _check_pow2("width", width)
    code, d, reps = tables * bits, width, repeats
    if code > reps * d:
        raise LookupcInputError(f"tables*bits={code} exceeds repeats*width={reps * d}")
    pad = reps * d - code
    dec, keep = float(decay), 1.0 - float(decay)
    # A table's bits never straddle two repeats when bits divides D (then the (table, bit)
    # loop can index plane and column separately, which keeps vector lanes contiguous).
    aligned = d % bits == 0

    @T.prim_func(s_tir=True)
    def fn(var_y: T.handle, var_xp: T.handle, hash_bias: T.Buffer((code,), _F32),
           var_gs: T.handle, var_dz: T.handle):
        T.func_attr({"global_symbol": "score_grad_fast", "tirx.noalias": True})
        m = T.int32()
        y = T.match_buffer(var_y, (reps, m, tile, d), _F32)
        x_pad = T.match_buffer(var_xp, (m, tile, d), _F32)
        grad_scores = T.match_buffer(var_gs, (m, tile, tables), _F32)
        dz = T.match_buffer(var_dz, (reps, m, tile, d), _F32)
        z = T.sblock_alloc_buffer((m, tile, code), _F32)
        e = T.sblock_alloc_buffer((m, tile, code), _F32)
        big_a = T.sblock_alloc_buffer((m, tile, tables), _F32)
        den = T.sblock_alloc_buffer((m, tile, tables), _F32)
        for t, p, c in T.grid(m, tile, code):
            with T.sblock("z"):
                vt, vp, vc = T.axis.remap("SSS", [t, p, c])
                z[vt, vp, vc] = (T.float32(dec) * y[vc // d, vt, vp, vc % d]
                                 + T.float32(keep) * x_pad[vt, vp, vc % d] + hash_bias[vc])
        for t, p, c in T.grid(m, tile, code):
            with T.sblock("e"):
                vt, vp, vc = T.axis.remap("SSS", [t, p, c])
                e[vt, vp, vc] = fast_exp_neg(T.float32(-2.0) * T.fabs(z[vt, vp, vc]))
        for t, p, k, j in T.grid(m, tile, tables, bits):
            with T.sblock("abs_sum"):
                vt, vp, vk, vj = T.axis.remap("SSSR", [t, p, k, j])
                with T.init():
                    big_a[vt, vp, vk] = T.float32(0)
                big_a[vt, vp, vk] = big_a[vt, vp, vk] + T.fabs(z[vt, vp, vk * bits + vj])
        for t, p, k, j in T.grid(m, tile, tables, bits):
            with T.sblock("den"):
                vt, vp, vk, vj = T.axis.remap("SSSR", [t, p, k, j])
                with T.init():
                    den[vt, vp, vk] = T.float32(1)
                den[vt, vp, vk] = den[vt, vp, vk] * (T.float32(1) + e[vt, vp, vk * bits + vj])
        for t, p, k, j in T.grid(m, tile, tables, bits):
            with T.sblock("dz"):
                vt, vp, vk, vj = T.axis.remap("SSSS", [t, p, k, j])
                T.reads(z[vt, vp, vk * bits + vj], e[vt, vp, vk * bits + vj],
                        big_a[vt, vp, vk], den[vt, vp, vk], grad_scores[vt, vp, vk])
                T.writes(dz[0:reps, vt, vp, 0:d])
                if aligned:
                    dz[vk * bits // d, vt, vp, vk * bits % d + vj] = _dz_value(
                        z[vt, vp, vk * bits + vj], e[vt, vp, vk * bits + vj],
                        big_a[vt, vp, vk], den[vt, vp, vk], grad_scores[vt, vp, vk])
                else:
                    dz[(vk * bits + vj) // d, vt, vp, (vk * bits + vj) % d] = _dz_value(
                        z[vt, vp, vk * bits + vj], e[vt, vp, vk * bits + vj],
                        big_a[vt, vp, vk], den[vt, vp, vk], grad_scores[vt, vp, vk])
        if pad > 0:
            for t, p, c in T.grid(m, tile, pad):
                with T.sblock("dz_pad"):
                    vt, vp, vc = T.axis.remap("SSS", [t, p, c])
                    dz[(code + vc) // d, vt, vp, (code + vc) % d] = T.float32(0)

    return fn


def _dz_value(zv, ev, big_a, den, gs):
    """``gs * sign(z) / prod(1 + e) * (1 + 2 A e / (1 + e))`` with ``e = exp(-2|z|)``."""
    one = tirx.const(1.0, _F32)
    sign = tirx.Select(zv > 0, one, tirx.Select(zv < 0, -one, tirx.const(0.0, _F32)))
    return gs * sign / den * (one + tirx.const(2.0, _F32) * big_a * ev / (one + ev))


def column_sum_planes(repeats: int, width: int) -> tirx.PrimFunc:
    """``out[r, c] = sum_n a[r, n, c]``: a [R, n, D] -> out [R, D] (the hash bias gradient
    is the first ``tables * bits`` entries of ``out``, flattened)."""
    _check_pos("repeats", repeats)
    _check_pos("width", width)
    n = te.var("n", "int32")
    a = te.placeholder((repeats, n, width), _F32, name="a")
    t = te.reduce_axis((0, n), name="t")
    out = te.compute((repeats, width), lambda r, c: te.sum(a[r, t, c], axis=t), name="col_sum")
    return _finish([a, out], "column_sum_planes")


def pad_inputs(repeats: int, d_in: int, width: int, tables: int) -> tirx.PrimFunc:
    """``x`` [n, d_in] -> ``x_pad`` [R, m, D] (R copies: the first round's input for every
    repeat) and ``grad_scores`` [n, h] -> ``gs_pad`` [m, h], zero past row n and column
    d_in (``m >= n``: the token count rounded up to a tile).

    Copies and zero fills are separate blocks (``"x_copy"``, ``"x_zero_cols"``,
    ``"x_zero_rows"``, ``"gs_copy"``, ``"gs_zero_rows"``), so that every loop is a plain
    contiguous copy or fill (no clamped indices for a vectoriser to turn into gathers).
    """
    for name, v in (("repeats", repeats), ("d_in", d_in), ("width", width), ("tables", tables)):
        _check_pos(name, v)
    if d_in > width:
        raise LookupcInputError(f"d_in={d_in} exceeds width={width}")
    extra = width - d_in

    @T.prim_func(s_tir=True)
    def fn(var_x: T.handle, var_gs: T.handle, var_xp: T.handle, var_gsp: T.handle):
        T.func_attr({"global_symbol": "pad_inputs", "tirx.noalias": True})
        n = T.int32()
        m = T.int32()
        x = T.match_buffer(var_x, (n, d_in), _F32)
        gs = T.match_buffer(var_gs, (n, tables), _F32)
        x_pad = T.match_buffer(var_xp, (repeats, m, width), _F32)
        gs_pad = T.match_buffer(var_gsp, (m, tables), _F32)
        for t, r, c in T.grid(n, repeats, d_in):
            with T.sblock("x_copy"):
                vt, vr, vc = T.axis.remap("SSS", [t, r, c])
                x_pad[vr, vt, vc] = x[vt, vc]
        if extra > 0:
            for t, r, c in T.grid(n, repeats, extra):
                with T.sblock("x_zero_cols"):
                    vt, vr, vc = T.axis.remap("SSS", [t, r, c])
                    x_pad[vr, vt, d_in + vc] = T.float32(0)
        for t, r, c in T.grid(m - n, repeats, width):
            with T.sblock("x_zero_rows"):
                vt, vr, vc = T.axis.remap("SSS", [t, r, c])
                x_pad[vr, n + vt, vc] = T.float32(0)
        for t, k in T.grid(n, tables):
            with T.sblock("gs_copy"):
                vt, vk = T.axis.remap("SS", [t, k])
                gs_pad[vt, vk] = gs[vt, vk]
        for t, k in T.grid(m - n, tables):
            with T.sblock("gs_zero_rows"):
                vt, vk = T.axis.remap("SS", [t, k])
                gs_pad[n + vt, vk] = T.float32(0)

    return fn


def input_grad(repeats: int, width: int, d_in: int, decay: float) -> tirx.PrimFunc:
    """``g_x[t, c] = (1 - decay) sum_r dz[r, t, c] + sum_r g_in[r, t, c]`` for the first n
    tokens and d_in columns: ``dz``, ``g_in`` [R, m, D] -> ``g_x`` [n, d_in] (block ``"g_x"``)."""
    for name, v in (("repeats", repeats), ("width", width), ("d_in", d_in)):
        _check_pos(name, v)
    keep = 1.0 - float(decay)

    @T.prim_func(s_tir=True)
    def fn(var_dz: T.handle, var_gin: T.handle, var_gx: T.handle):
        T.func_attr({"global_symbol": "input_grad", "tirx.noalias": True})
        n = T.int32()
        m = T.int32()
        dz = T.match_buffer(var_dz, (repeats, m, width), _F32)
        g_in = T.match_buffer(var_gin, (repeats, m, width), _F32)
        g_x = T.match_buffer(var_gx, (n, d_in), _F32)
        for t, c, r in T.grid(n, d_in, repeats):
            with T.sblock("g_x"):
                vt, vc, vr = T.axis.remap("SSR", [t, c, r])
                with T.init():
                    g_x[vt, vc] = T.float32(0)
                g_x[vt, vc] = g_x[vt, vc] + (T.float32(keep) * dz[vr, vt, vc] + g_in[vr, vt, vc])

    return fn
