"""An independent, deliberately plain NumPy LookupFFN (loops, no code shared with lookupc).

Written from the convention in ``lookupc.reference``'s docstring only, so the package
and this file can disagree if either is wrong.
"""

from __future__ import annotations

import math

import numpy as np


def hadamard_matrix(d: int) -> np.ndarray:
    """Sylvester Hadamard matrix by the recursive definition."""
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


def bh4(x_pad: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """All repeats of BH4 for one token x_pad [D]; weight [R, 4, NB, BS, BS] (out, in)."""
    reps, rounds, nb, bs, _ = weight.shape
    d = nb * bs
    had = hadamard_matrix(d)
    out = []
    for r in range(reps):
        y = x_pad.copy()
        for j in range(rounds):
            t = np.zeros(d)
            for b in range(nb):
                for o in range(bs):
                    acc = 0.0
                    for i in range(bs):
                        acc += weight[r, j, b, o, i] * y[b * bs + i]
                    t[b * bs + o] = acc
            y = had @ t
        out.extend(y.tolist())
    return np.array(out)


def soft_codes(x, weight, hash_bias, decay, bits):
    """z [N, h * bits]: the BH4 projection mixed with the input, plus the hash bias."""
    n, d_in = x.shape
    reps, _, nb, bs, _ = weight.shape
    d = nb * bs
    width = hash_bias.shape[0]
    z = np.zeros((n, width))
    for t in range(n):
        x_pad = np.zeros(d)
        x_pad[:d_in] = x[t]
        proj = bh4(x_pad, weight)
        z[t] = [decay * proj[c] + (1 - decay) * x_pad[c % d] + hash_bias[c] for c in range(width)]
    return z


def codes_scores(z, bits):
    """(codes [N, h], scores [N, h]) from z [N, h * bits]: MSB-first sign bits, GELU-like score."""
    n, width = z.shape
    h = width // bits
    codes = np.zeros((n, h), dtype=np.int64)
    scores = np.zeros((n, h))
    for t in range(n):
        for k in range(h):
            zk = z[t, k * bits:(k + 1) * bits]
            code = 0
            for j, v in enumerate(zk):
                if v > 0:
                    code += 2 ** (bits - 1 - j)
            # <z, S_g> exp(<z, S_g>) / prod(e^z + e^-z), evaluated in log space
            s = sum(abs(v) for v in zk)
            log_den = sum(abs(v) + math.log1p(math.exp(-2 * abs(v))) for v in zk)
            codes[t, k] = code
            scores[t, k] = s * math.exp(s - log_den)
    return codes, scores


def gather(codes, scores, tables, bias):
    """y [N, d_out] = bias + sum_k scores[:, k] * tables[k, codes[:, k]] (a plain loop)."""
    n, h = codes.shape
    y = np.zeros((n, tables.shape[2]))
    for t in range(n):
        for k in range(h):
            y[t] += scores[t, k] * tables[k, codes[t, k]]
        y[t] += bias
    return y


def lookup_ffn(x, weight, hash_bias, tables, bias, decay, bits):
    """Returns (codes [N, h], scores [N, h], y [N, d_out]) for x [N, d_in]."""
    z = soft_codes(x, weight, hash_bias, decay, bits)
    codes, scores = codes_scores(z, bits)
    return codes, scores, gather(codes, scores, tables, bias)


def quantize_int8(tables):
    """Symmetric int8 per table row: (q int8 [h, rows, d], scale [h, rows]), row = scale * q."""
    t = np.asarray(tables, dtype=np.float32)
    scale = np.abs(t).max(axis=-1) / np.float32(127.0)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(t / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def bfloat16_bits_to_float(bits):
    """float64 values of bfloat16 numbers given as their int16/uint16 bit patterns."""
    u = np.asarray(bits).astype(np.uint16).astype(np.uint32) << 16
    return u.view(np.float32).astype(np.float64)
