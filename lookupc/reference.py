"""Reference math of LookupFFN in plain PyTorch: the one canonical convention.

Every other implementation (TVM CPU schedules, CUDA kernels) is tested against
these functions. The paper's own CPU and CUDA code disagree on block transposition
and Hadamard scaling; lookupc follows the paper's *training* code:

Walsh-Hadamard transform
    ``fwht(x)`` multiplies the last dim by the Sylvester-ordered Hadamard matrix
    ``H_D`` (entries +-1, symmetric, **unnormalised**): ``fwht(fwht(x)) == D * x``.

BH4 projection (paper eq. 11, m = 4)
    The input x [N, d_in] is zero-padded to ``D = next_pow2(d_in)``. For each repeat
    r in 0..R-1 (``R = ceil(h*tau / D)``), with ``W[r, j]`` block-diagonal made of
    ``D / BS`` blocks of shape [BS, BS] stored *as [out, in]* (like ``nn.Linear``)::

        y = x_pad
        for j in 0..3:  y = fwht(blockdiag(W[r, j]) @ y)   # y[b, o] = sum_i W[r,j,b,o,i] y[b, i]

    The repeats are concatenated (repeat r owns columns ``r*D .. (r+1)*D``), mixed
    with the input and cut to the code width::

        z = (decay * concat_r(y_r) + (1 - decay) * repeat(x_pad, R))[:, :h*tau] + hash_bias

    Blocks are initialised ``randn / sqrt(BS * D)`` so each round keeps the variance.

Codes
    ``z`` is split into h groups of tau; bit j of table k is ``z[k*tau + j] > 0`` and
    the bits are packed MSB-first: ``code_k = sum_j [z_kj > 0] << (tau - 1 - j)``.
    The global table row is ``k * 2**tau + code_k``.

Scores (paper section 4, the GELU-like weight)
    ``<z,S_g> exp(<z,S_g>) / prod_j (e^{z_j} + e^{-z_j})`` with ``S_g = sign(z)``,
    computed as ``sum_j |z_j| * exp(-sum_j log1p(exp(-2|z_j|)))``: exp of a
    non-positive number only, so no overflow for any |z|.

Gather
    ``y = sum_k score_k * T[k, code_k, :] + bias`` with tables T [h, 2**tau, d_out].

Reduced-precision tables (inference)
    ``bfloat16`` tables are rounded to nearest even from the float32 master tables; the
    gather widens each element to float32. ``int8`` tables are symmetric per row:
    ``scale[k, r] = max_c |T[k, r, c]| / 127``, ``q = round(T / scale)`` in [-127, 127],
    and the gather reads ``scale[k, code_k] * q[k, code_k, :]``. Accumulation is float32.

Backward formulas (used by the custom ops' autograd): with ``a = |z|``,
``A = sum a`` and ``P = prod(1 + e^{-2a})``, ``d score / d z_j =
sign(z_j) / P * (1 + 2 A sigmoid(-2 a_j))``; codes carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import LookupcInputError

__all__ = [
    "fwht", "bh4_forward", "hash_forward", "codes_scores", "gather_forward",
    "hash_backward", "gather_backward", "lookup_ffn", "quantize_tables", "dequantize_tables",
    "gather_forward_quantized",
]

# Bound on elements materialised at once by the chunked reference gather backward.
_CHUNK_ELEMS = 1 << 24
# Tables up to this many rows (tau <= 5) take the GEMM form of the gather backward.
_GEMM_MAX_ROWS = 32


def fwht(x: Tensor) -> Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim (Sylvester order).

    ``fwht(fwht(x)) == x.shape[-1] * x``. The last dim must be a power of two.

    Computed through the Kronecker structure ``H_D = H_a (x) H_b``: with the last dim
    viewed as [a, b] (a = high index bits), ``H_D x = H_a X H_b``, a matmul with a small
    Hadamard matrix on each side (the b side recursively, a <= 32). A few GEMM passes
    instead of log2(D) butterfly stages: 5-8x faster on CPU, and autograd-friendly.
    """
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise LookupcInputError(f"fwht needs a power-of-two last dim, got {d}")
    y = x.reshape(-1, d)
    n = y.shape[0]
    if d <= _FWHT_LEAF:
        return (y @ _hadamard(d, y.dtype, y.device)).reshape(x.shape)
    a = _FWHT_LEAF
    b = d // a
    low = fwht(y.reshape(n * a, b)).reshape(n, a, b)
    return torch.matmul(_hadamard(a, y.dtype, y.device), low).reshape(x.shape)


_FWHT_LEAF = 32
_HADAMARD: dict = {}


def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The Sylvester Hadamard matrix H_n (entries +-1), cached per dtype and device."""
    key = (n, dtype, str(device))
    h = _HADAMARD.get(key)
    if h is None:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        h = _HADAMARD[key] = h.to(dtype=dtype, device=device)
    return h


def _pad(x: Tensor, width: int) -> Tensor:
    return F.pad(x, (0, width - x.shape[-1])) if x.shape[-1] < width else x


def _block_mm(y: Tensor, w: Tensor) -> Tensor:
    """y [N, D] times blockdiag(w) with w [NB, BS(out), BS(in)]."""
    n = y.shape[0]
    nb, bs, _ = w.shape
    return torch.einsum("nbi,boi->nbo", y.reshape(n, nb, bs), w).reshape(n, nb * bs)


def bh4_forward(x_pad: Tensor, weight: Tensor, keep: bool = False):
    """BH4 of x_pad [N, D] for every repeat: returns [N, R*D] (and the round inputs if keep)."""
    outs, saved = [], []
    for r in range(weight.shape[0]):
        y = x_pad
        for j in range(weight.shape[1]):
            if keep:
                saved.append(y)
            y = fwht(_block_mm(y, weight[r, j]))
        outs.append(y)
    z = torch.cat(outs, dim=-1)
    return (z, saved) if keep else z


def hash_forward(x: Tensor, weight: Tensor, hash_bias: Tensor, decay: float) -> Tensor:
    """Soft hash code z [N, h*tau] of x [N, d_in] (see the module docstring)."""
    r, _, nb, bs, _ = weight.shape
    x_pad = _pad(x, nb * bs)
    z = decay * bh4_forward(x_pad, weight) + (1.0 - decay) * x_pad.repeat(1, r)
    return z[:, : hash_bias.shape[0]] + hash_bias


def codes_scores(z: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Codes (int32, MSB-first) and scores of soft codes z [N, h*bits]."""
    zz = z.reshape(z.shape[0], -1, bits)
    shifts = torch.arange(bits - 1, -1, -1, device=z.device, dtype=torch.int32)
    codes = ((zz > 0).to(torch.int32) << shifts).sum(-1, dtype=torch.int32)
    a = zz.abs()
    scores = a.sum(-1) * torch.exp(-torch.log1p(torch.exp(-2.0 * a)).sum(-1))
    return codes, scores


def _score_grad(z: Tensor, bits: int) -> Tensor:
    """d score_k / d z_kj, shape [N, h, bits]."""
    zz = z.reshape(z.shape[0], -1, bits)
    a = zz.abs()
    inv_p = torch.exp(-torch.log1p(torch.exp(-2.0 * a)).sum(-1, keepdim=True))
    big_a = a.sum(-1, keepdim=True)
    return torch.sign(zz) * inv_p * (1.0 + 2.0 * big_a * torch.sigmoid(-2.0 * a))


def gather_forward(codes: Tensor, scores: Tensor, tables: Tensor, bias: Tensor) -> Tensor:
    """y [N, d_out] = sum_k scores[:, k] * tables[k, codes[:, k]] + bias."""
    h, rows, d_out = tables.shape
    idx = codes.long() + torch.arange(h, device=codes.device) * rows
    y = F.embedding_bag(idx, tables.reshape(h * rows, d_out), per_sample_weights=scores,
                        mode="sum")
    return y + bias


def quantize_tables(tables: Tensor, dtype: str) -> tuple[Tensor, Tensor | None]:
    """Float tables [h, rows, d_out] -> (stored tables, int8 row scales [h, rows] or None).

    ``dtype`` is ``"bfloat16"`` (no scale) or ``"int8"`` (symmetric per row, see the module
    docstring; an all-zero row gets scale 0).
    """
    t = tables.detach().to(torch.float32)
    if dtype == "bfloat16":
        return t.to(torch.bfloat16), None
    if dtype != "int8":
        raise LookupcInputError(f"quantize_tables: dtype must be 'bfloat16' or 'int8', got {dtype!r}")
    scale = t.abs().amax(-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(t / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_tables(tables: Tensor, scale: Tensor | None) -> Tensor:
    """Float32 tables from stored ones (float32 / bfloat16 as they are, int8 times scale)."""
    if tables.dtype == torch.int8:
        return tables.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)
    return tables.to(torch.float32)


def gather_forward_quantized(codes: Tensor, scores: Tensor, tables: Tensor,
                             scale: Tensor | None, bias: Tensor) -> Tensor:
    """:func:`gather_forward` on bfloat16 or int8 tables (float32 accumulation)."""
    h, rows, d_out = tables.shape
    idx = codes.long() + torch.arange(h, device=codes.device) * rows
    weights = scores.to(torch.float32)
    if tables.dtype == torch.int8:
        weights = weights * scale.reshape(-1)[idx]
    flat = tables.reshape(h * rows, d_out).to(torch.float32)
    y = F.embedding_bag(idx, flat, per_sample_weights=weights, mode="sum")
    return (y + bias.to(torch.float32)).to(scores.dtype)


def hash_backward(grad_scores: Tensor, x: Tensor, weight: Tensor, hash_bias: Tensor,
                  decay: float, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the scores w.r.t. x [N, d_in], the BH4 weight and the hash bias."""
    r, rounds, nb, bs, _ = weight.shape
    d = nb * bs
    n, d_in = x.shape
    x_pad = _pad(x, d)
    y, saved = bh4_forward(x_pad, weight, keep=True)
    z = (decay * y + (1.0 - decay) * x_pad.repeat(1, r))[:, : hash_bias.shape[0]] + hash_bias
    dz = (grad_scores.unsqueeze(-1) * _score_grad(z, bits)).reshape(n, -1)
    g_hash_bias = dz.sum(0)
    dz_full = _pad(dz, r * d)
    g_x = (1.0 - decay) * dz_full.reshape(n, r, d).sum(1)
    g_w = torch.empty_like(weight)
    for ri in range(r):
        g = decay * dz_full[:, ri * d:(ri + 1) * d]
        for j in reversed(range(rounds)):
            g = fwht(g)  # H is symmetric
            y_in = saved[ri * rounds + j].reshape(n, nb, bs)
            g3 = g.reshape(n, nb, bs)
            g_w[ri, j] = torch.einsum("nbo,nbi->boi", g3, y_in)
            g = torch.einsum("nbo,boi->nbi", g3, weight[ri, j]).reshape(n, d)
        g_x = g_x + g
    return g_x[:, :d_in].contiguous(), g_w, g_hash_bias


def gather_backward(grad_y: Tensor, codes: Tensor, scores: Tensor,
                    tables: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of the gather w.r.t. the scores [N, h] and the tables [h, 2**tau, d_out].

    Two exact formulations, chosen by cost:

    - tables with at most :data:`_GEMM_MAX_ROWS` rows each (tau <= 5): the gather is a
      product ``y = A @ T`` with the sparse design ``A`` [N, h * 2**tau] (each token's
      scores at its code rows). Per chunk of tokens and tables, ``A`` is formed densely
      and ``g_tables = A^T g_y``, ``g_scores = (g_y T^T)[code rows]`` are two GEMMs:
      2**tau times the arithmetic of the row-wise form but no [N, h, d_out]
      intermediate (which made the row-wise form memory-bound, ~30x slower on CPU).
    - larger tables: per chunk of tables, the selected rows are gathered once
      (``flat[idx]``) and reduced, the scaled contributions index-added into the
      table gradient.
    """
    h, rows, d_out = tables.shape
    n = codes.shape[0]
    flat = tables.reshape(h * rows, d_out)
    idx = codes.long() + torch.arange(h, device=codes.device) * rows
    g_scores = torch.empty_like(scores)
    g_tables = torch.zeros_like(flat)
    if rows <= _GEMM_MAX_ROWS:
        k_step = max(1, min(h, _CHUNK_ELEMS // max(1, n * rows)))
        for k0 in range(0, h, k_step):
            k1 = min(h, k0 + k_step)
            r0, r1 = k0 * rows, k1 * rows
            n_step = max(1, _CHUNK_ELEMS // ((r1 - r0) * max(1, d_out // 64 + 1)))
            for i0 in range(0, n, n_step):
                i1 = min(n, i0 + n_step)
                sel = idx[i0:i1, k0:k1] - r0
                a = torch.zeros(i1 - i0, r1 - r0, dtype=scores.dtype, device=scores.device)
                a.scatter_(1, sel, scores[i0:i1, k0:k1])
                g_tables[r0:r1].addmm_(a.T, grad_y[i0:i1])
                g_all = grad_y[i0:i1] @ flat[r0:r1].T
                g_scores[i0:i1, k0:k1] = g_all.gather(1, sel)
        return g_scores, g_tables.reshape(h, rows, d_out)
    step = max(1, _CHUNK_ELEMS // max(1, n * d_out))
    for k0 in range(0, h, step):
        k1 = min(h, k0 + step)
        sel = idx[:, k0:k1]
        g_scores[:, k0:k1] = torch.einsum("nkd,nd->nk", flat[sel], grad_y)
        contrib = scores[:, k0:k1, None] * grad_y[:, None, :]
        g_tables.index_add_(0, sel.reshape(-1), contrib.reshape(-1, d_out))
    return g_scores, g_tables.reshape(h, rows, d_out)


def lookup_ffn(x: Tensor, weight: Tensor, hash_bias: Tensor, tables: Tensor, bias: Tensor,
               decay: float, bits: int) -> Tensor:
    """The whole LookupFFN in reference math, on x of any leading shape [..., d_in]."""
    lead = x.shape[:-1]
    z = hash_forward(x.reshape(-1, x.shape[-1]), weight, hash_bias, decay)
    codes, scores = codes_scores(z, bits)
    return gather_forward(codes, scores, tables, bias).reshape(*lead, tables.shape[-1])
