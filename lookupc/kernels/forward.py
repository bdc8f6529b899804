"""The LookupFFN kernels as TensorIR PrimFuncs: the hash and the gather.

Both are generic in the token count: ``n`` is a symbolic variable bound from the
first input's shape at call time, so one build serves every batch x sequence.
Everything else comes from :class:`lookupc.kernels.shapes.KernelShapes` (d_in, d_out,
tables h, bits tau, BH4 block size BS, repeats R). The math is
``lookupc.reference``'s convention exactly (see its docstring).

hash(x [n, d_in], weight, hash_bias [h*tau], decay: float32, codes [n, h] int32, scores [n, h])
    ``decay`` is a runtime scalar (one build serves any decay). Two weight layouts:

    - ``fold=False`` (canonical): ``weight`` is the module's ``[R, 4, D/BS, BS(out), BS(in)]``;
      each round is a block matmul and all ``log2 D`` butterfly stages.
    - ``fold=True``: ``weight`` is :func:`fold_weight` of it, ``[R, 4, D/BS, BS(in), BS(out)]``
      holding ``H_BS @ W_b`` transposed. Sylvester order gives ``H_D = H_{D/BS} (x) H_BS``, so
      the BS-wide part of every transform is folded into the blocks and only the
      ``log2(D/BS)`` butterfly stages *across* blocks remain; the [in, out] layout makes
      the output columns contiguous for vector FMAs.

    Intermediate values are ``[n, R, D/BS, BS]`` (repeats are a spatial axis). ``mix``
    writes the soft code z transposed, ``zt[n, tau, h]``, so that codes and scores reduce
    over bits with the tables contiguous (vectorisable). Scores use
    ``sum|z| / prod(1 + exp(-2|z|))`` (equal to the reference's overflow-free form; the
    product of tau factors in [1, 2] cannot overflow) with a vectorisable polynomial exp
    (relative error < 2e-7).

gather(codes [n, h] int32, scores [n, h], tables [h, 2**tau, d_out], bias [d_out], y [n, d_out])
    ``y = bias + sum_k scores[:, k] * tables[k, codes[:, k]]``. Codes are masked to
    ``2**tau - 1`` so that a bad code can never read outside the tables. Tables may be
    float32, bfloat16 (as int16 bits) or int8 with row scales (``KernelShapes.table_dtype``,
    :func:`make_gather`); the sum is float32 in every case.

Block names are stable (schedules refer to them): hash: ``pad``, ``bmm{j}``,
``fwht{j}_{s}``, ``mix``, ``code``, ``sabs``, ``den``, ``score``; gather: ``gather``.
"""

from __future__ import annotations

import math

from .. import tvm_shim
from .shapes import KernelShapes

tvm = tvm_shim.tvm
from tvm import te, tirx  # noqa: E402
from tvm.script import tirx as T  # noqa: E402

from ..errors import LookupcInputError  # noqa: E402

__all__ = ["make_hash", "make_gather", "hash_stage_names", "fast_exp_neg"]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def fast_exp_neg(x: "tirx.PrimExpr") -> "tirx.PrimExpr":
    """exp(x) for x <= 0 as plain arithmetic (vectorises; LLVM's exp would be 8 libm calls).

    x = (k + f) ln 2 with k = round(x log2 e), |f| <= 1/2; 2**f by its degree-7 Taylor
    series in f ln 2 (relative error < 1e-8 + rounding), 2**k by building the float's
    exponent bits. x is clamped at -87 (exp(-87) ~ 1.6e-38, still normal).
    """
    x = tirx.max(x, tirx.const(-87.0, "float32"))
    k = tirx.floor(x * tirx.const(_LOG2E, "float32") + tirx.const(0.5, "float32"))
    r = x - k * tirx.const(_LN2, "float32")  # |r| <= ln2 / 2
    p = tirx.const(1.0 / 5040.0, "float32")
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        p = p * r + tirx.const(c, "float32")
    bits = (tirx.Cast("int32", k) + 127) << 23
    return p * tirx.reinterpret("float32", bits)


def hash_stage_names(s: KernelShapes, fold: bool) -> list[list[str]]:
    """Names of the butterfly blocks of each round, in order (empty lists allowed)."""
    nb, bs = s.width // s.block_size, s.block_size
    inner = 0 if fold else int(math.log2(bs))
    stages = inner + int(math.log2(nb))
    return [[f"fwht{j}_{t}" for t in range(stages)] for j in range(4)]


def _butterfly(prev, inner: bool, h: int, name: str):
    """One Hadamard stage with partner distance h along the block (inner) or block index."""
    def body(i, r, b, o):
        pos = o if inner else b
        base = (pos // (2 * h)) * (2 * h) + pos % h
        if inner:
            a, c = prev[i, r, b, base], prev[i, r, b, base + h]
        else:
            a, c = prev[i, r, base, o], prev[i, r, base + h, o]
        return te.if_then_else((pos // h) % 2 == 0, a + c, a - c)

    return te.compute(prev.shape, body, name=name)


def _bmm(prev, weight, j: int, fold: bool, shape, bs: int, first: bool):
    """Round j's block-diagonal matmul; ``first`` reads the padded input [n, D]."""
    k = te.reduce_axis((0, bs), name="k")

    def src(i, r, b, kk):
        return prev[i, b * bs + kk] if first else prev[i, r, b, kk]

    def w(r, b, o, kk):
        return weight[r, j, b, kk, o] if fold else weight[r, j, b, o, kk]

    return te.compute(shape, lambda i, r, b, o: te.sum(w(r, b, o, k) * src(i, r, b, k), axis=k),
                      name=f"bmm{j}")


def make_hash(s: KernelShapes, fold: bool = True, token_tile: int = 1,
              name: str = "hash") -> "tirx.PrimFunc":
    """The hash PrimFunc (schedulable TIR) for shapes ``s``; see the module docstring.

    ``token_tile``: every stage runs over ``n_pad``, ``n`` rounded up to a multiple of it
    (rows past ``n`` repeat row ``n - 1``), and ``codes``/``scores`` must have ``n_pad``
    rows (callers pass padded outputs and use the first ``n`` rows). A schedule can then
    tile tokens by any divisor of ``token_tile`` without tail predicates: predicated tiles
    make TVM 0.27's buffer compaction emit negative allocation sizes for a symbolic
    ``n``, and the predicates block vectorising the outputs.
    """
    d, bs, reps, tau, h = s.width, s.block_size, s.repeats, s.bits, s.tables
    nb = d // bs
    n = te.var("n")
    x = te.placeholder((n, s.d_in), "float32", name="x")
    wshape = (reps, 4, nb, bs, bs)
    weight = te.placeholder(wshape, "float32", name="weight")
    hash_bias = te.placeholder((h * tau,), "float32", name="hash_bias")
    decay = te.var("decay", "float32")

    if token_tile < 1 or token_tile & (token_tile - 1):
        raise LookupcInputError(f"token_tile must be a power of two, got {token_tile}")
    n_pad = (n + (token_tile - 1)) // token_tile * token_tile if token_tile > 1 else n
    row = (lambda i: te.min(i, n - 1)) if token_tile > 1 else (lambda i: i)
    pad = te.compute(
        (n_pad, d),
        lambda i, c: te.if_then_else(c < s.d_in, x[row(i), te.min(c, s.d_in - 1)], 0.0),
        name="pad")
    shape = (n_pad, reps, nb, bs)
    y = pad
    names = hash_stage_names(s, fold)
    inner = 0 if fold else int(math.log2(bs))
    for j in range(4):
        y = _bmm(y, weight, j, fold, shape, bs, first=j == 0)
        for t, stage in enumerate(names[j]):
            is_inner = t < inner
            dist = 1 << (t if is_inner else t - inner)
            y = _butterfly(y, is_inner, dist, stage)

    def mix(i, b, t):
        c = t * tau + b  # code coordinate; repeat c // D, column c % D
        col = c % d
        return (decay * y[i, c // d, col // bs, col % bs]
                + (tirx.const(1.0, "float32") - decay) * pad[i, col] + hash_bias[c])

    zt = te.compute((n_pad, tau, h), mix, name="mix")
    bit = te.reduce_axis((0, tau), name="bit")
    code = te.compute(
        (n_pad, h), lambda i, t: te.sum(tirx.Cast("int32", zt[i, bit, t] > 0) << (tau - 1 - bit),
                                    axis=bit), name="code")
    b2 = te.reduce_axis((0, tau), name="b2")
    sabs = te.compute((n_pad, h), lambda i, t: te.sum(te.abs(zt[i, b2, t]), axis=b2), name="sabs")
    prod = te.comm_reducer(lambda a, b: a * b, lambda dt: tirx.const(1, dt), name="prod")
    b3 = te.reduce_axis((0, tau), name="b3")
    den = te.compute(
        (n_pad, h), lambda i, t: prod(1.0 + fast_exp_neg(-2.0 * te.abs(zt[i, b3, t])), axis=b3),
        name="den")
    score = te.compute((n_pad, h), lambda i, t: sabs[i, t] / den[i, t], name="score")
    func = te.create_prim_func([x, weight, hash_bias, decay, code, score])
    return func.with_attr("global_symbol", name)


def make_gather(s: KernelShapes, name: str = "gather") -> "tirx.PrimFunc":
    """The gather PrimFunc (schedulable TIR) for shapes ``s``; see the module docstring.

    ``s.table_dtype`` picks the table buffer: float32; ``bfloat16`` passed as its int16
    bit pattern (widened exactly: the bits shifted into the top half of a float32, no
    dependence on LLVM's bf16 support); ``int8`` with an extra float32 ``scale`` buffer
    [h, rows] between ``tables`` and ``bias`` (row = scale * q).
    """
    return _gather(s.tables, 1 << s.bits, s.d_out, s.table_dtype).with_attr("global_symbol", name)


def _term_f32(w, tables, scale, k, row, c):
    return w * tables[k, row, c]


def _term_bf16(w, tables, scale, k, row, c):
    return w * T.reinterpret("float32", T.shift_left(T.Cast("int32", tables[k, row, c]), 16))


def _term_int8(w, tables, scale, k, row, c):
    return w * scale[k, row] * T.Cast("float32", tables[k, row, c])


def _gather(h: int, rows: int, d_out: int, table_dtype: str):
    """One gather PrimFunc: the loop nest is the ``nest`` macro, shared by every table dtype.

    Only the weighted table term differs (``_term_*``: score ``w`` times the widened element
    of row ``row``), plus the int8 variant's extra ``scale`` parameter. The macro is created
    per call: TVMScript suffixes the block names of a macro's second and later expansions.
    """
    mask = rows - 1
    term = {"float32": _term_f32, "bfloat16": _term_bf16}.get(table_dtype, _term_int8)
    storage = {"float32": "float32", "bfloat16": "int16"}.get(table_dtype, "int8")

    @T.macro
    def nest(var_codes, var_scores, tables, scale, bias, var_y):
        n = T.int32()
        codes = T.match_buffer(var_codes, (n, h), "int32")
        scores = T.match_buffer(var_scores, (n, h), "float32")
        y = T.match_buffer(var_y, (n, d_out), "float32")
        for i, c, k in T.grid(n, d_out, h):
            with T.sblock("gather"):
                vi, vc, vk = T.axis.remap("SSR", [i, c, k])
                with T.init():
                    y[vi, vc] = bias[vc]
                y[vi, vc] = y[vi, vc] + term(scores[vi, vk], tables, scale, vk,
                                             T.bitwise_and(codes[vi, vk], mask), vc)

    if storage != "int8":
        @T.prim_func(s_tir=True)
        def gather(var_codes: T.handle, var_scores: T.handle,
                   tables: T.Buffer((h, rows, d_out), storage),
                   bias: T.Buffer((d_out,), "float32"), var_y: T.handle):
            T.func_attr({"global_symbol": "gather", "tirx.noalias": True})
            nest(var_codes, var_scores, tables, None, bias, var_y)

        return gather

    @T.prim_func(s_tir=True)
    def gather_q(var_codes: T.handle, var_scores: T.handle,
                 tables: T.Buffer((h, rows, d_out), "int8"),
                 scale: T.Buffer((h, rows), "float32"),
                 bias: T.Buffer((d_out,), "float32"), var_y: T.handle):
        T.func_attr({"global_symbol": "gather", "tirx.noalias": True})
        nest(var_codes, var_scores, tables, scale, bias, var_y)

    return gather_q
