"""TensorIR definitions of the LookupFFN backward (the training kernels).

The same PrimFuncs serve the CPU (built for ``llvm`` unscheduled, to check the math
against :mod:`lookupc.reference`) and the GPU (scheduled in
``schedules/cuda/backward.py`` and built for ``cuda``). All are float32 and
symbolic in the token count ``n``, so one build per (config, target) serves every
batch. Block names are stable: the schedules find blocks by name.

Gather backward (``y = sum_k s_k T[k, c_k] + bias``)
    * :func:`gather_score_grad`: ``g_s[n, k] = <T[k, c_nk], g_y[n]>`` (block ``"g_scores"``).
    * :func:`table_grad_scatter`: ``g_T[k, c_nk] += s_nk g_y[n]`` as a scatter-add
      (blocks ``"zero"``, ``"scatter"``; ``atomic=True`` makes the update a CUDA
      ``atomicAdd``, ``atomic=False`` a plain read-modify-write for serial CPU builds).
    * :func:`table_grad_segment`: the same sum as a deterministic segment reduction:
      the (token, table) pairs sorted by their global table row (``order``) and the
      row boundaries (``offsets``, CSR style) come in; each table row sums its own
      segment, so every row is written exactly once (block ``"segment"``).

Hash backward (the BH4 chain, see :func:`lookupc.reference.hash_backward`)
    Arrays carry a leading repeat axis R, so one launch serves all repeats.

    * :func:`block_round`: ``out = fwht(blockdiag(W) a)`` (a forward round, recomputed
      to get the round inputs), or with ``transpose=True`` ``fwht(blockdiag(W)^T a)``
      (one step of the backward: transposed block matmul, then the next round's
      Hadamard, which is symmetric); ``fwht=False`` leaves the Hadamard out
      (blocks ``"bmm"``, ``"fwht0"``..``"fwht{log2 D - 1}"``).
    * :func:`score_grad`: mixes ``z = decay * y + (1 - decay) * x_pad + hash_bias`` and
      applies ``d score_k / d z_j = sign(z_j) / P * (1 + 2 A sigmoid(-2 |z_j|))``
      (``A = sum |z|``, ``P = prod(1 + e^{-2|z|})`` per table) times the incoming score
      gradient; the result is zero-padded to ``R * D`` columns.
    * :func:`fwht_scaled`: ``fwht(scale * g)`` per repeat (the first backward step).
    * :func:`weight_grad`: ``g_W[q, b, o, i] = sum_n g[q, n, b*BS+o] y[q, n, b*BS+i]``,
      batched over all rounds and repeats ``q``, in ``splits`` partial sums over tokens.
    * :func:`column_sum`: ``out[c] = sum_n a[n, c]`` for the first C columns (hash bias).

Size: one TE builder per backward kernel (10-60 lines each, listed above), sharing the
argument checks and ``_finish`` defined here (``backward_cpu`` imports them too); the
block names they fix are the contract with the CUDA and CPU schedules, easiest to check
against one file.
"""

from __future__ import annotations

from .. import tvm_shim

tvm = tvm_shim.tvm
from tvm import te, tirx  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from ..errors import LookupcInputError  # noqa: E402

__all__ = [
    "gather_score_grad", "table_grad_scatter", "table_grad_segment",
    "block_round", "fwht_scaled", "score_grad", "weight_grad", "column_sum",
]

_F32 = "float32"
_ATOMIC_ADD = tvm_shim.CUDA_ATOMIC_ADD


def _check_pow2(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise LookupcInputError(f"{name} must be a power-of-two int, got {value!r}")


def _check_pos(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LookupcInputError(f"{name} must be a positive int, got {value!r}")


def _finish(tensors: list, name: str) -> tirx.PrimFunc:
    """TE tensors -> schedulable PrimFunc named ``name`` (noalias set by TE)."""
    return te.create_prim_func(tensors).with_attr("global_symbol", name)


# ---------------------------------------------------------------------------------------
# gather backward
# ---------------------------------------------------------------------------------------

def gather_score_grad(tables: int, rows: int, d_out: int) -> tirx.PrimFunc:
    """``g_scores[n, k] = sum_d table[k * rows + codes[n, k], d] * grad_y[n, d]``.

    Parameters: ``grad_y`` [n, d_out], ``codes`` int32 [n, tables], ``table`` (the tables
    flattened) [tables * rows, d_out]; output ``g_scores`` [n, tables].
    """
    for name, v in (("tables", tables), ("d_out", d_out)):
        _check_pos(name, v)
    _check_pow2("rows", rows)

    @T.prim_func(s_tir=True)
    def g_scores_fn(var_gy: T.handle, var_codes: T.handle,
                    table: T.Buffer((tables * rows, d_out), _F32), var_gs: T.handle):
        T.func_attr({"global_symbol": "gather_score_grad", "tirx.noalias": True})
        n = T.int32()
        grad_y = T.match_buffer(var_gy, (n, d_out), _F32)
        codes = T.match_buffer(var_codes, (n, tables), "int32")
        g_scores = T.match_buffer(var_gs, (n, tables), _F32)
        for t, k, d in T.grid(n, tables, d_out):
            with T.sblock("g_scores"):
                vt, vk, vd = T.axis.remap("SSR", [t, k, d])
                T.reads(table[vk * rows + codes[vt, vk], vd], grad_y[vt, vd], codes[vt, vk])
                T.writes(g_scores[vt, vk])
                with T.init():
                    g_scores[vt, vk] = T.float32(0)
                g_scores[vt, vk] = g_scores[vt, vk] + (
                    table[vk * rows + codes[vt, vk], vd] * grad_y[vt, vd])

    return g_scores_fn


def table_grad_scatter(tables: int, rows: int, d_out: int, atomic: bool) -> tirx.PrimFunc:
    """``g_table[k * rows + codes[n, k], :] += scores[n, k] * grad_y[n, :]`` (zeroed first).

    ``atomic=True`` writes the update as ``tirx.cuda.atomic_add`` (CUDA targets only);
    ``atomic=False`` as a plain read-modify-write, correct only when run serially.
    Parameters: ``grad_y`` [n, d_out], ``codes`` int32 [n, tables], ``scores`` [n, tables];
    output ``g_table`` [tables * rows, d_out].
    """
    for name, v in (("tables", tables), ("d_out", d_out)):
        _check_pos(name, v)
    _check_pow2("rows", rows)
    total = tables * rows

    if atomic:
        @T.prim_func(s_tir=True)
        def scatter_fn(var_gy: T.handle, var_codes: T.handle, var_s: T.handle,
                       g_table: T.Buffer((total, d_out), _F32)):
            T.func_attr({"global_symbol": "table_grad_atomic", "tirx.noalias": True})
            n = T.int32()
            grad_y = T.match_buffer(var_gy, (n, d_out), _F32)
            codes = T.match_buffer(var_codes, (n, tables), "int32")
            scores = T.match_buffer(var_s, (n, tables), _F32)
            for r, d in T.grid(total, d_out):
                with T.sblock("zero"):
                    vr, vd = T.axis.remap("SS", [r, d])
                    g_table[vr, vd] = T.float32(0)
            for t, k, d in T.grid(n, tables, d_out):
                with T.sblock("scatter"):
                    vt, vk, vd = T.axis.remap("SSS", [t, k, d])
                    T.reads(codes[vt, vk], scores[vt, vk], grad_y[vt, vd])
                    T.writes(g_table[vk * rows + codes[vt, vk], vd])
                    T.evaluate(T.call_intrin(
                        _F32, _ATOMIC_ADD,
                        T.address_of(g_table[vk * rows + codes[vt, vk], vd]),
                        scores[vt, vk] * grad_y[vt, vd]))
        return scatter_fn

    @T.prim_func(s_tir=True)
    def serial_fn(var_gy: T.handle, var_codes: T.handle, var_s: T.handle,
                  g_table: T.Buffer((total, d_out), _F32)):
        T.func_attr({"global_symbol": "table_grad_serial", "tirx.noalias": True})
        n = T.int32()
        grad_y = T.match_buffer(var_gy, (n, d_out), _F32)
        codes = T.match_buffer(var_codes, (n, tables), "int32")
        scores = T.match_buffer(var_s, (n, tables), _F32)
        for r, d in T.grid(total, d_out):
            with T.sblock("zero"):
                vr, vd = T.axis.remap("SS", [r, d])
                g_table[vr, vd] = T.float32(0)
        for t, k, d in T.grid(n, tables, d_out):
            with T.sblock("scatter"):
                vt, vk, vd = T.axis.remap("SSS", [t, k, d])
                T.reads(codes[vt, vk], scores[vt, vk], grad_y[vt, vd],
                        g_table[vk * rows + codes[vt, vk], vd])
                T.writes(g_table[vk * rows + codes[vt, vk], vd])
                g_table[vk * rows + codes[vt, vk], vd] = (
                    g_table[vk * rows + codes[vt, vk], vd] + scores[vt, vk] * grad_y[vt, vd])
    return serial_fn


def table_grad_segment(tables: int, rows: int, d_out: int) -> tirx.PrimFunc:
    """Table gradient as a segment reduction over the pairs sorted by table row.

    Parameters: ``grad_y`` [n, d_out], ``scores`` [n, tables], ``order`` int32 [n * tables]
    (flat pair ids ``n * tables + k`` sorted by global row ``k * rows + codes[n, k]``),
    ``offsets`` int32 [tables * rows + 1] (row r owns ``order[offsets[r]:offsets[r+1]]``);
    output ``g_table`` [tables * rows, d_out]. Deterministic: no atomics, no races.
    """
    for name, v in (("tables", tables), ("d_out", d_out)):
        _check_pos(name, v)
    _check_pow2("rows", rows)
    total = tables * rows

    @T.prim_func(s_tir=True)
    def segment_fn(var_gy: T.handle, var_s: T.handle, var_order: T.handle,
                   offsets: T.Buffer((total + 1,), "int32"),
                   g_table: T.Buffer((total, d_out), _F32)):
        T.func_attr({"global_symbol": "table_grad_segment", "tirx.noalias": True})
        n = T.int32()
        grad_y = T.match_buffer(var_gy, (n, d_out), _F32)
        scores = T.match_buffer(var_s, (n, tables), _F32)
        order = T.match_buffer(var_order, (n * tables,), "int32")
        for r, d in T.grid(total, d_out):
            with T.sblock("segment"):
                vr, vd = T.axis.remap("SS", [r, d])
                T.reads(offsets[vr:vr + 2], order[0:n * tables], scores[0:n, 0:tables],
                        grad_y[0:n, vd])
                T.writes(g_table[vr, vd])
                g_table[vr, vd] = T.float32(0)
                for i in range(offsets[vr], offsets[vr + 1]):
                    g_table[vr, vd] = g_table[vr, vd] + (
                        scores[order[i] // tables, order[i] % tables]
                        * grad_y[order[i] // tables, vd])

    return segment_fn


# ---------------------------------------------------------------------------------------
# hash (BH4) backward
# ---------------------------------------------------------------------------------------

def _fwht_stages(u: te.Tensor, width: int, prefix: str = "fwht") -> te.Tensor:
    """Unnormalised Sylvester FWHT over the last axis, one block per stage."""
    out = u
    for s in range(width.bit_length() - 1):
        out = _butterfly(out, 1 << s, f"{prefix}{s}")
    return out


def _butterfly(prev: te.Tensor, h: int, name: str) -> te.Tensor:
    def f(*idx):
        j = idx[-1]
        base = (j // (2 * h)) * (2 * h) + j % h
        a, b = prev[(*idx[:-1], base)], prev[(*idx[:-1], base + h)]
        return te.if_then_else((j // h) % 2 == 0, a + b, a - b)

    return te.compute(prev.shape, f, name=name)


def block_round(repeats: int, blocks: int, block_size: int, *, transpose: bool = False,
                fwht: bool = True, tile: int = 1) -> tirx.PrimFunc:
    """One BH4 round per repeat: ``out[r] = fwht(blockdiag(w[r]) @ a[r])`` on rows of ``a``.

    Blocks are [out, in] (``u[b*BS+o] = sum_i w[b, o, i] a[b*BS+i]``); ``transpose=True``
    multiplies by the transposed blocks instead (``u[b*BS+i] = sum_o w[b, o, i] a[b*BS+o]``).
    Tokens come in tiles: ``a`` [R, m, tile, D] is a free view of [R, m*tile, D] (the
    caller pads the token count to a multiple of ``tile``, so GPU tiles have no tails).
    Parameters: ``a``, ``w`` [R, D/BS, BS, BS]; output like ``a``.
    """
    _check_pos("repeats", repeats)
    _check_pos("blocks", blocks)
    _check_pow2("block_size", block_size)
    _check_pos("tile", tile)
    bs, width = block_size, blocks * block_size
    _check_pow2("blocks * block_size", width)
    m = te.var("m", "int32")
    a = te.placeholder((repeats, m, tile, width), _F32, name="a")
    w = te.placeholder((repeats, blocks, bs, bs), _F32, name="w")
    i = te.reduce_axis((0, bs), name="i")

    def matmul(r, t, p, j):
        wv = w[r, j // bs, i, j % bs] if transpose else w[r, j // bs, j % bs, i]
        return te.sum(a[r, t, p, (j // bs) * bs + i] * wv, axis=i)

    u = te.compute((repeats, m, tile, width), matmul, name="bmm")
    out = _fwht_stages(u, width) if fwht else u
    kind = ("round_bwd" if transpose else "round_fwd") + ("" if fwht else "_nofwht")
    return _finish([a, w, out], kind)


def fwht_scaled(repeats: int, width: int, scale: float, tile: int = 1) -> tirx.PrimFunc:
    """``out[r, n, :] = fwht(scale * g[n, r*D:(r+1)*D])``.

    ``g`` [m, tile, R*D] -> out [R, m, tile, D] (token tiles as in :func:`block_round`).
    """
    _check_pos("repeats", repeats)
    _check_pow2("width", width)
    _check_pos("tile", tile)
    m = te.var("m", "int32")
    g = te.placeholder((m, tile, repeats * width), _F32, name="g")
    load = te.compute((repeats, m, tile, width),
                      lambda r, t, p, j: g[t, p, r * width + j] * float(scale), name="load")
    return _finish([g, _fwht_stages(load, width)], "fwht_scaled")


def _sign(v):
    return tirx.Select(v > 0, tirx.const(1.0, _F32),
                       tirx.Select(v < 0, tirx.const(-1.0, _F32), tirx.const(0.0, _F32)))


def score_grad(repeats: int, width: int, tables: int, bits: int, decay: float) -> tirx.PrimFunc:
    """Gradient of the scores w.r.t. the soft code z, zero-padded to R*D columns.

    Parameters: ``y`` [R, n, D] (BH4 outputs per repeat), ``x_pad`` [n, D], ``hash_bias``
    [C], ``grad_scores`` [n, tables]; output ``dz`` [n, R*D] with ``C = tables * bits``.
    """
    for name, v in (("repeats", repeats), ("tables", tables), ("bits", bits)):
        _check_pos(name, v)
    _check_pow2("width", width)
    code = tables * bits
    if code > repeats * width:
        raise LookupcInputError(f"tables*bits={code} exceeds repeats*width={repeats * width}")
    n = te.var("n", "int32")
    y = te.placeholder((repeats, n, width), _F32, name="y")
    xp = te.placeholder((n, width), _F32, name="x_pad")
    hb = te.placeholder((code,), _F32, name="hash_bias")
    gs = te.placeholder((n, tables), _F32, name="grad_scores")
    dec, keep = float(decay), 1.0 - float(decay)
    z = te.compute((n, code), lambda t, c: dec * y[c // width, t, c % width]
                   + keep * xp[t, c % width] + hb[c], name="z")
    j = te.reduce_axis((0, bits), name="j")
    big_a = te.compute((n, tables), lambda t, k: te.sum(te.abs(z[t, k * bits + j]), axis=j),
                       name="abs_sum")
    j2 = te.reduce_axis((0, bits), name="j2")
    log_p = te.compute(
        (n, tables),
        lambda t, k: te.sum(tirx.log1p(te.exp(-2.0 * te.abs(z[t, k * bits + j2]))), axis=j2),
        name="log_p")

    def dz_fn(t, c):
        cc = te.min(c, code - 1)  # in range also where the guard discards the value
        zc, k = z[t, cc], cc // bits
        val = (gs[t, k] * _sign(zc) * te.exp(-log_p[t, k])
               * (1.0 + 2.0 * big_a[t, k] * te.sigmoid(-2.0 * te.abs(zc))))
        return te.if_then_else(c < code, val, tirx.const(0.0, _F32))

    dz = te.compute((n, repeats * width), dz_fn, name="dz")
    return _finish([y, xp, hb, gs, dz], "score_grad")


def weight_grad(rounds: int, blocks: int, block_size: int, tile: int = 1,
                splits: int = 1) -> tirx.PrimFunc:
    """``g_w[q, b, o, i] = sum_n g[q, n, b*BS+o] * y[q, n, b*BS+i]`` for q in 0..rounds-1.

    The token sum is split into ``splits`` partial sums (more independent work for a
    GPU; the caller adds them). Parameters: ``g`` (gradients of the block-matmul
    outputs) and ``y`` (the round inputs), each [Q, S, m, tile, D] (a free view of
    [Q, S*m*tile, D], tokens in tiles as in :func:`block_round`); output [S, Q, D/BS, BS, BS].
    """
    _check_pos("rounds", rounds)
    _check_pos("blocks", blocks)
    _check_pow2("block_size", block_size)
    _check_pos("tile", tile)
    _check_pos("splits", splits)
    bs, width = block_size, blocks * block_size
    m = te.var("m", "int32")
    g = te.placeholder((rounds, splits, m, tile, width), _F32, name="g")
    y = te.placeholder((rounds, splits, m, tile, width), _F32, name="y")
    t = te.reduce_axis((0, m), name="t")
    p = te.reduce_axis((0, tile), name="p")
    gw = te.compute(
        (splits, rounds, blocks, bs, bs),
        lambda s, q, b, o, i: te.sum(g[q, s, t, p, b * bs + o] * y[q, s, t, p, b * bs + i],
                                     axis=[t, p]),
        name="g_w")
    return _finish([g, y, gw], "weight_grad")


def column_sum(width: int, columns: int) -> tirx.PrimFunc:
    """``out[c] = sum_n a[n, c]`` for c < columns: a [n, width] -> out [columns]."""
    _check_pos("width", width)
    _check_pos("columns", columns)
    if columns > width:
        raise LookupcInputError(f"columns={columns} exceeds width={width}")
    n = te.var("n", "int32")
    a = te.placeholder((n, width), _F32, name="a")
    t = te.reduce_axis((0, n), name="t")
    out = te.compute((columns,), lambda c: te.sum(a[t, c], axis=t), name="col_sum")
    return _finish([a, out], "column_sum")
