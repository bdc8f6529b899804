"""Phase 2 of a layer fit: the tables, by ridge least squares given the codes.

With the codes fixed, a LookupFFN's output ``y ~ sum_k s_k T[k, c_k] + b`` is linear in
the tables: a sparse design ``A`` with h non-zeros per token. :func:`solve_tables` solves
the ridge normal equations exactly (Cholesky) while the tables are small, else by
Jacobi-preconditioned conjugate gradients (sparse products, nothing dense of size
rows x rows).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..module import LookupFFN

__all__ = ["solve_tables"]


def _design(lookup: LookupFFN, x: Tensor) -> tuple[Tensor, Tensor]:
    """Global table rows [N, h] (int64) and scores [N, h] of x under the current hash."""
    with torch.no_grad():
        scores, codes = lookup.hash(x)
    rows = 1 << lookup.config.bits
    offs = torch.arange(lookup.config.tables, device=x.device) * rows
    return codes.long() + offs, scores


def _design_chunks(rows_idx: Tensor, scores: Tensor, n_rows: int, chunk: int):
    """Dense slices of the design matrix A [N, n_rows] (scores at the code rows)."""
    for i in range(0, rows_idx.shape[0], chunk):
        a = torch.zeros(min(chunk, rows_idx.shape[0] - i), n_rows, device=scores.device)
        yield i, a.scatter_(1, rows_idx[i:i + chunk], scores[i:i + chunk].float())


def _apply_a(rows_idx: Tensor, scores: Tensor, t: Tensor) -> Tensor:
    return nn.functional.embedding_bag(rows_idx, t, per_sample_weights=scores.float(),
                                       mode="sum")


def _apply_at(rows_idx: Tensor, scores: Tensor, r: Tensor, n_rows: int, chunk: int) -> Tensor:
    """``A^T r``: dense design chunks (one GEMM each) while the design is narrow, else a
    scatter-add of the h scaled rows per token (N h d work instead of N rows d: at 8-bit
    tables the dense form did ~250x the arithmetic)."""
    out = torch.zeros(n_rows, r.shape[1], device=r.device)
    h = rows_idx.shape[1]
    if n_rows <= 64 * h:
        for i, a in _design_chunks(rows_idx, scores, n_rows, chunk):
            out.addmm_(a.T, r[i:i + a.shape[0]])
        return out
    step = max(1, (1 << 24) // max(1, h * r.shape[1]))
    for i in range(0, rows_idx.shape[0], step):
        s, rr = scores[i:i + step].float(), r[i:i + step]
        out.index_add_(0, rows_idx[i:i + step].reshape(-1),
                       (s[:, :, None] * rr[:, None, :]).reshape(-1, r.shape[1]))
    return out


def _sparse_design_t(rows_idx: Tensor, scores: Tensor, n_rows: int) -> Tensor:
    """``A^T`` [n_rows, N] as a CSR matrix (built once per solve: each CG step is then one
    sparse-dense product, ~10x faster than scattering the scaled rows)."""
    n, h = rows_idx.shape
    cols = torch.arange(n, device=rows_idx.device).repeat_interleave(h)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        coo = torch.sparse_coo_tensor(torch.stack([rows_idx.reshape(-1), cols]),
                                      scores.reshape(-1).float(), (n_rows, n))
        return coo.coalesce().to_sparse_csr()


def solve_tables(lookup: LookupFFN, x: Tensor, y: Tensor, *, ridge: float = 1e-3,
                 iters: int = 60, max_direct_rows: int = 8192, bar=None,
                 ridge_grid: tuple = (1.0,)) -> float:
    """Set the tables and bias to the ridge least-squares fit given the codes (bias unregularised).

    Solves ``(A^T A + lam I) T = A^T (y - bias)``, where ``A`` [N, h * 2**bits] holds
    each token's scores at its code rows and ``lam = ridge * mean(diag(A^T A))``. Up to
    ``max_direct_rows`` table rows the normal matrix is formed (dense GEMMs over token
    chunks) and solved by Cholesky; above, ``iters`` Jacobi-preconditioned conjugate
    gradient steps run on all output columns at once. Rows no token hits become zero.
    With several multipliers in ``ridge_grid``, the exact solve first fits 90% of the
    tokens for each ``ridge * m``, keeps the ``m`` with the lowest error on the other
    10%, and then solves on all tokens with it (the normal matrix is additive over
    tokens, so this costs one extra Cholesky per candidate). Returns the relative
    training residual.
    """
    h, n_rows_per, d_out = lookup.tables.shape
    n_rows = h * n_rows_per
    rows_idx, scores = _design(lookup, x)
    # one extra unregularised column of ones solves the bias jointly with the tables
    rows_idx = torch.cat([rows_idx, torch.full_like(rows_idx[:, :1], n_rows)], dim=1)
    scores = torch.cat([scores.float(), torch.ones_like(scores[:, :1], dtype=torch.float32)], 1)
    total = n_rows + 1
    chunk = max(256, (1 << 23) // total)
    mean = y.mean(0)
    r0 = (y - mean).float()
    diag = torch.zeros(total, device=x.device).index_add_(0, rows_idx.reshape(-1),
                                                          scores.reshape(-1) ** 2)
    hit = diag[:n_rows] > 0
    lam_v = ridge * float(diag[:n_rows][hit].mean()) if bool(hit.any()) else max(ridge, 1e-6)
    lam = torch.full((total,), lam_v, device=x.device)
    lam[-1] = 1e-6 * float(diag[-1])
    if total <= max_direct_rows:
        rhs = _apply_at(rows_idx, scores, r0, total, chunk)
        n = rows_idx.shape[0]
        select = len(ridge_grid) > 1 and n >= 20
        held = torch.zeros(n, dtype=torch.bool, device=x.device)
        if select:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
            held[perm[: n // 10].to(x.device)] = True
        gram = torch.zeros(total, total, device=x.device, dtype=torch.float64)
        gram_held = torch.zeros_like(gram)
        rhs_held = torch.zeros(total, r0.shape[1], device=x.device, dtype=torch.float64)
        for i, a in _design_chunks(rows_idx, scores, total, chunk):
            gram += (a.T @ a).double()
            h_rows = held[i:i + a.shape[0]]
            if bool(h_rows.any()):
                a_h = a[h_rows]
                gram_held += (a_h.T @ a_h).double()
                rhs_held += (a_h.T @ r0[i:i + a.shape[0]][h_rows]).double()
        if bar is not None:
            bar.set_postfix_str(f"tables: cholesky {total}x{total}")
        mult = 1.0
        if select:
            best = None
            for m in ridge_grid:
                g = gram - gram_held
                g.diagonal().add_(lam.double())
                g.diagonal()[:n_rows].add_(lam_v * (float(m) - 1.0))
                t_m = torch.cholesky_solve(rhs.double() - rhs_held, torch.linalg.cholesky(g))
                err = float((r0[held] - _apply_a(rows_idx[held], scores[held],
                                                 t_m.float())).norm())
                if best is None or err < best[0]:
                    best = (err, float(m))
            mult = best[1]
        gram.diagonal().add_(lam.double())
        gram.diagonal()[:n_rows].add_(lam_v * (mult - 1.0))
        t = torch.cholesky_solve(rhs.double(), torch.linalg.cholesky(gram)).float()
    else:
        at = _sparse_design_t(rows_idx, scores, total)
        t = _cg(lambda v: at @ _apply_a(rows_idx, scores, v) + lam[:, None] * v, at @ r0,
                1.0 / (diag + lam), iters, bar)
    with torch.no_grad():
        lookup.tables.copy_(t[:n_rows].reshape(h, n_rows_per, d_out).to(lookup.tables.dtype))
        lookup.bias.copy_((mean + t[n_rows]).to(lookup.bias.dtype))
    resid = r0 - _apply_a(rows_idx, scores, t)
    return float(resid.norm() / r0.norm().clamp_min(1e-30))


def _cg(normal, rhs: Tensor, precond: Tensor, iters: int, bar=None) -> Tensor:
    """Preconditioned CG on ``normal(t) = rhs``, each column of rhs its own system."""
    t = torch.zeros_like(rhs)
    r = rhs.clone()
    zv = precond[:, None] * r
    p = zv.clone()
    rz = (r * zv).sum(0)
    for it in range(iters):
        ap = normal(p)
        alpha = rz / (p * ap).sum(0).clamp_min(1e-30)
        t += alpha * p
        r -= alpha * ap
        zv = precond[:, None] * r
        rz_new = (r * zv).sum(0)
        p = zv + (rz_new / rz.clamp_min(1e-30)) * p
        rz = rz_new
        if bar is not None and it % 10 == 0:
            bar.set_postfix_str(f"tables: cg {it}/{iters}")
    return t
