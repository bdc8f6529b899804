"""Distillation: fit a LookupFFN to the dense FFN it replaces, layer by layer.

For one layer, with inputs ``x`` [N, d_in] and the dense FFN's outputs ``y`` [N, d_out],
:func:`fit_lookup_ffn` runs three phases:

1. **Hash** (:func:`fit_hash`): choose the BH4 weights and hash bias so that the soft
   codes ``z`` follow the dense FFN's own hidden pre-activations ``u_j = W1_j x + b1_j``
   of its ``h * tau`` most important hidden units (importance: ``||W2[:, j]|| *
   std(GELU(u_j))``, the share of the output that unit carries). A few hundred Adam
   steps on ``||z - target||^2``: each code bit then flips where one of the dense
   FFN's important GELUs bends, and the score (``~ |z|`` for large ``|z|``) grows like
   that unit's activation. With 1-bit codes this makes the LookupFFN a pruned copy of
   the dense FFN whose first layer is a BH4 matrix.
2. **Tables** (:func:`solve_tables`): with the codes fixed the output
   ``y ~ sum_k s_k T[k, c_k] + b`` is linear in the tables, a sparse design with h
   non-zeros per token. Solved as ridge regression by Jacobi-preconditioned conjugate
   gradients on the normal equations (sparse matrix products, nothing dense of size
   rows x rows).
3. **Fine-tune** (:func:`finetune`): Adam on the MSE of all parameters, minibatches.

:func:`distill_conversion` is what ``lookupc.convert(..., init="distill")`` calls: it
captures every replacement's input activations on the calibration set (streaming,
capped at ``max_tokens``), fits it, and writes the held-out relative error
``||y_lookup - y_dense|| / ||y_dense||`` into ``result.report.matched[i].rel_error``.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import time
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from .. import reference as ref
from ..errors import LookupcInputError
from ..module import LookupFFN
from .calibration import ActivationCapture, StopForward, calibration_items, run_item

__all__ = ["DistillOptions", "fit_lookup_ffn", "fit_hash", "solve_tables", "finetune",
           "relative_error", "hash_target", "hidden_target", "distill_conversion",
           "first_linear", "last_linear", "capture_inputs", "hidden_unit_order"]


@dataclass(frozen=True)
class DistillOptions:
    """Options of the distillation (``lookupc.convert(..., distill_options={...})``).

    Parameters
    ----------
    max_tokens : int
        Cap on the calibration tokens captured per layer (memory is about
        ``max_tokens * (d_in + d_out) * 4`` bytes per layer at a time).
    holdout : float
        Fraction of the captured tokens kept out of the fit; the reported
        ``rel_error`` is measured on them.
    feed : str
        ``"converted"``: each layer sees the activations of the model in which the
        earlier layers are already distilled LookupFFNs (errors do not compound);
        ``"original"``: the dense model's activations (one pass for all layers).
    hash_steps, hash_lr : int, float
        Adam steps and learning rate fitting the hash to the dense projection (0 skips).
    hash_source : str
        ``"hidden"`` (the pre-activations of the dense FFN's most important hidden
        units, see the module docstring), ``"preact"`` (whitened principal directions
        of all pre-activations) or ``"input"`` (principal directions of x). The first
        two fall back to ``"input"`` when the dense module has no visible Linear.
    hash_scale : float
        Standard deviation of each coordinate of the hash target.
    ridge : float
        Ridge strength of the table solve, relative to the mean diagonal of A^T A.
    ridge_grid : tuple of float
        Multipliers of ``ridge`` tried by the exact (Cholesky) table solve; the one with
        the lowest error on a tenth of the training tokens held out from that solve wins
        (then the tables are solved on all training tokens). Small calibration sets
        overfit the table rows, so the strength is chosen on data, not fixed.
    cg_iters : int
        Conjugate-gradient iterations of the table solve (0 skips the solve).
    finetune_steps, finetune_lr, batch_tokens : int, float, int
        Adam fine-tuning of all parameters on the MSE (0 steps skips it).
    finetune_hash_lr : float
        Learning rate of the hash parameters during fine-tuning (the tables use
        ``finetune_lr``). Smaller: moving the hash re-codes tokens, so a hash step as
        large as a table step undoes the table solve.
    model_steps, model_lr, model_hash_lr : int, float, float
        Whole-model distillation after the layer fits (:mod:`lookupc.distill.model`):
        Adam steps (one calibration item each; 0 skips it) on the converted model's
        output error against the original model, and the learning rates of the tables
        and of the hash.
    input_noise : float
        Fine-tuning augmentation: Gaussian noise of this many per-feature standard
        deviations added to the FFN inputs, targets recomputed by the dense FFN (0: off).
    model_train, model_rest_lr : str, float
        ``"lookup"``: only the LookupFFNs train; ``"all"``: every other parameter of the
        converted model too, at ``model_rest_lr`` (it adapts to the LookupFFNs' errors).
    model_cosine_weight, model_layers : float, bool
        Weight of ``1 - cosine`` of the pooled output in the whole-model loss, and
        whether to match every hidden state (models that return ``hidden_states``).
    checkpoint, checkpoint_every, resume : str or None, int, bool
        Whole-model distillation checkpoint file (written atomically every
        ``checkpoint_every`` steps and at the end) and whether to continue from it.
    seed : int
        Seed of the token split and the minibatch order.
    progress : bool
        Show per-layer progress bars with the loss on stderr (tqdm).
    distributed : bool
        Under ``torch.distributed`` (initialised, or started by torchrun): every rank runs
        the layer fits and takes rank 0's fitted LookupFFN after each layer; whole-model
        distillation is data parallel (:mod:`lookupc.distill.distributed`); only rank 0 shows
        progress and writes the checkpoint. False: every process works alone.
    """

    max_tokens: int = 32768
    holdout: float = 0.1
    feed: str = "converted"
    hash_steps: int = 120
    hash_lr: float = 3e-3
    hash_source: str = "hidden"
    hash_scale: float = 1.0
    ridge: float = 1e-3
    ridge_grid: tuple = (1.0, 10.0, 100.0, 1000.0)
    cg_iters: int = 30
    finetune_steps: int = 60
    finetune_lr: float = 1e-3
    finetune_hash_lr: float = 3e-4
    batch_tokens: int = 2048
    input_noise: float = 0.0
    model_steps: int = 0
    model_lr: float = 3e-4
    model_hash_lr: float = 3e-5
    model_train: str = "lookup"
    model_rest_lr: float = 2e-5
    model_cosine_weight: float = 0.0
    model_layers: bool = True
    checkpoint: str | None = None
    checkpoint_every: int = 50
    resume: bool = False
    seed: int = 0
    progress: bool = True
    distributed: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 2:
            raise ValueError(f"distill option max_tokens must be an int >= 2, got "
                             f"{self.max_tokens!r}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"distill option holdout must be in (0, 1), got {self.holdout!r}")
        if self.feed not in ("converted", "original"):
            raise ValueError(f"distill option feed must be 'converted' or 'original', got "
                             f"{self.feed!r}")
        if self.hash_source not in ("hidden", "preact", "input"):
            raise ValueError(f"distill option hash_source must be 'hidden', 'preact' or "
                             f"'input', got {self.hash_source!r}")
        for name in ("hash_steps", "cg_iters", "finetune_steps", "batch_tokens", "model_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or (name == "batch_tokens" and value < 1):
                raise ValueError(f"distill option {name} must be a non-negative int, got {value!r}")
        if self.model_train not in ("lookup", "all"):
            raise ValueError(f"distill option model_train must be 'lookup' or 'all', got "
                             f"{self.model_train!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 1:
            raise ValueError(f"distill option checkpoint_every must be an int >= 1, got "
                             f"{self.checkpoint_every!r}")
        if self.resume and not self.checkpoint:
            raise ValueError("distill option resume=True needs checkpoint=<path>")
        if not self.ridge_grid or any(float(m) <= 0.0 for m in self.ridge_grid):
            raise ValueError(f"distill option ridge_grid must be positive multipliers, got "
                             f"{self.ridge_grid!r}")
        for name in ("hash_lr", "hash_scale", "ridge", "finetune_lr", "finetune_hash_lr",
                     "model_lr", "model_hash_lr", "model_rest_lr", "model_cosine_weight",
                     "input_noise"):
            if not float(getattr(self, name)) >= 0.0:
                raise ValueError(f"distill option {name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "DistillOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise LookupcInputError(f"unknown distill option(s) {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------
# One layer
# ---------------------------------------------------------------------------------------

def relative_error(lookup: LookupFFN, x: Tensor, y: Tensor, batch: int = 8192) -> float:
    """``||lookup(x) - y|| / ||y||`` over all rows (computed in batches, no grad)."""
    num = den = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            yb = y[i:i + batch]
            num += float((lookup(x[i:i + batch]) - yb).pow(2).sum())
            den += float(yb.pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def first_linear(dense: nn.Module | None) -> nn.Linear | None:
    """The first ``nn.Linear`` inside ``dense`` (its fc1), or None."""
    if dense is None:
        return None
    if isinstance(dense, nn.Linear):
        return dense
    return next((m for m in dense.modules() if isinstance(m, nn.Linear)), None)


def last_linear(dense: nn.Module | None) -> nn.Linear | None:
    """The last ``nn.Linear`` inside ``dense`` when it has at least two (its fc2), or None."""
    if dense is None or isinstance(dense, nn.Linear):
        return None
    linears = [m for m in dense.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if len(linears) >= 2 else None


def hidden_unit_order(g: Tensor, fc2: nn.Linear | None = None) -> Tensor:
    """Hidden units by decreasing importance ``||fc2.weight[:, j]|| * std(g_j)``, where
    ``g`` [N, d_hidden] are the GELU activations (``std`` alone without a matching fc2)."""
    imp = g.std(0)
    if fc2 is not None and fc2.in_features == g.shape[1]:
        imp = imp * fc2.weight.norm(dim=0).to(imp)
    return torch.argsort(imp, descending=True)


def hidden_target(x: Tensor, width: int, fc1: nn.Linear, fc2: nn.Linear | None = None,
                  scale: float = 1.0, batch: int = 8192) -> Tensor:
    """The code target [N, width]: pre-activations of the ``width`` most important hidden units.

    Unit j's importance is ``||fc2.weight[:, j]|| * std(GELU(u_j))`` (``std`` alone without
    ``fc2``), with ``u = fc1(x)`` not centred or whitened: a code bit is then the sign of
    a dense hidden unit, so it flips exactly where that unit's GELU bends. Units are
    assigned in decreasing importance (table 0 gets the top ``tau``). When the dense FFN
    has fewer hidden units than ``width``, the rest are random unit-norm mixtures of them.
    """
    with torch.no_grad():
        u = torch.cat([fc1(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
        t = u[:, hidden_unit_order(nn.functional.gelu(u), fc2)[:width]]
        if t.shape[1] < width:
            gen = torch.Generator().manual_seed(width)
            mix = torch.randn(t.shape[1], width - t.shape[1], generator=gen)
            t = torch.cat([t, t @ (mix / mix.norm(dim=0)).to(t.dtype)], dim=1)
        return scale * t


def _principal(u: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, top-k principal directions [d, k] and their standard deviations of rows u."""
    mean = u.mean(0)
    uc = (u - mean).double()
    cov = uc.T @ uc / max(1, u.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)[:k]
    return mean, evecs[:, order].to(u.dtype), evals[order].clamp_min(1e-12).sqrt().to(u.dtype)


def hash_target(x: Tensor, width: int, fc1: nn.Linear | None, scale: float = 1.0) -> Tensor:
    """The code target [N, width]: principal components of ``fc1(x)`` (or of x) at std ``scale``.

    When fewer principal directions exist than ``width`` (small d), the remaining
    coordinates get random mixtures of them (still informative, decorrelated signs).
    """
    with torch.no_grad():
        u = fc1(x) if fc1 is not None else x
        mean, dirs, std = _principal(u, min(width, u.shape[1]))
        keep = std > 1e-3 * std[0]  # drop null directions (rank(W1) < d_hidden)
        dirs, std = dirs[:, keep], std[keep]
        k = dirs.shape[1]
        t = (u - mean) @ dirs / std
        if k < width:
            gen = torch.Generator().manual_seed(width)
            mix = torch.randn(k, width - k, generator=gen)
            mix = mix / mix.norm(dim=0)  # unit columns: whitened inputs keep unit variance
            t = torch.cat([t, t @ mix.to(t.dtype)], dim=1)
        return scale * t


def _batches(n: int, batch: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch


def fit_hash(lookup: LookupFFN, x: Tensor, target: Tensor, *, steps: int, lr: float,
             batch: int = 2048, seed: int = 0, bar=None) -> float:
    """Adam on ``||z(x) - target||^2`` over the BH4 weight and hash bias; returns the final
    relative error of z. ``target`` is [N, tables * bits]."""
    w, b = lookup.bh4_weight, lookup.hash_bias
    decay = float(lookup.config.decay)
    with torch.no_grad():  # start the bias at the target mean minus the mixed-in input part
        b.copy_(target.mean(0) - ref.hash_forward(x[:batch], w, torch.zeros_like(b), decay)
                .mean(0))
    opt = torch.optim.Adam([w, b], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    loss_v = float("nan")
    for step, idx in enumerate(_batches(x.shape[0], batch, steps, seed)):
        z = ref.hash_forward(x[idx], w, b, decay)
        tb = target[idx]
        loss = (z - tb).pow(2).mean() / tb.pow(2).mean().clamp_min(1e-12)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if bar is not None and step % 20 == 0:
            bar.set_postfix_str(f"hash {step}/{steps} rel {math.sqrt(loss_v):.3f}")
    w.grad = b.grad = None
    return math.sqrt(loss_v) if steps else float("nan")


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


def finetune(lookup: LookupFFN, x: Tensor, y: Tensor, *, steps: int, lr: float,
             batch: int = 2048, seed: int = 0, bar=None, hash_lr: float | None = None,
             dense: nn.Module | None = None, noise: float = 0.0) -> float:
    """Adam (cosine-decayed lr) on the MSE of all parameters; returns the last batch's
    relative error. ``hash_lr`` (default ``lr``) is the hash parameters' learning rate.

    ``noise`` > 0 (with ``dense``): each minibatch's inputs get Gaussian noise of that many
    standard deviations of x per feature, and the targets are the dense FFN's outputs on
    the noisy inputs (augmentation: more distinct inputs than the calibration tokens)."""
    noise_gen = torch.Generator(device=x.device).manual_seed(seed + 2)
    x_std = x.std(0, keepdim=True) if noise > 0 and dense is not None else None
    hash_params = [lookup.bh4_weight, lookup.hash_bias]
    ids = {id(p) for p in hash_params}
    rest = [p for p in lookup.parameters() if id(p) not in ids]
    opt = torch.optim.Adam([{"params": hash_params, "lr": lr if hash_lr is None else hash_lr},
                            {"params": rest, "lr": lr}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    last = float("nan")
    for step, idx in enumerate(_batches(x.shape[0], batch, steps, seed + 1)):
        xb, yb = x[idx], y[idx]
        if x_std is not None:
            xb = xb + noise * x_std * torch.randn(xb.shape, generator=noise_gen, device=xb.device,
                                                  dtype=xb.dtype)
            with torch.no_grad():
                yb = dense(xb).to(yb.dtype)
        loss = (lookup(xb) - yb).pow(2).sum() / yb.pow(2).sum().clamp_min(1e-30)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = math.sqrt(float(loss.detach()))
        if bar is not None and step % 10 == 0:
            bar.set_postfix_str(f"finetune {step}/{steps} rel {last:.3f}")
    for p in lookup.parameters():
        p.grad = None
    return last


def fit_lookup_ffn(lookup: LookupFFN, x: Tensor, y: Tensor, *, dense: nn.Module | None = None,
                   x_val: Tensor | None = None, y_val: Tensor | None = None,
                   options: DistillOptions | None = None, bar=None) -> dict:
    """Fit ``lookup`` to map x [N, d_in] to y [N, d_out] (hash, tables, fine-tune).

    Parameters
    ----------
    lookup : LookupFFN
        Fitted in place.
    x, y : Tensor
        Training inputs and dense outputs.
    dense : nn.Module, optional
        The dense FFN; its first Linear gives the hash target (see ``hash_source``).
    x_val, y_val : Tensor, optional
        Held-out tokens; the returned ``rel_error`` is measured on them (else on x, y).
    options : DistillOptions, optional
        Steps, learning rates, ridge (defaults: ``DistillOptions()``).
    bar : tqdm, optional
        A progress bar whose postfix shows the phase and loss.

    Returns
    -------
    dict
        ``hash_rel`` (fit of z to its target), ``table_rel`` (training residual after
        the solve), ``train_rel`` (after fine-tuning), ``rel_error`` (held out),
        ``seconds``.

    Examples
    --------
    >>> from lookupc import LookupConfig
    >>> dense = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
    >>> x = torch.randn(4096, 32)
    >>> with torch.no_grad(): y = dense(x)
    >>> lk = LookupFFN(32, 32, LookupConfig(tables=16, bits=4, block_size=8))
    >>> stats = fit_lookup_ffn(lk, x, y, dense=dense,
    ...                        options=DistillOptions(progress=False, finetune_steps=20))
    >>> stats["rel_error"] < 0.6
    True
    """
    opts = options or DistillOptions()
    from ..table_quant import require_float_tables

    require_float_tables(lookup, "fit_lookup_ffn")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise LookupcInputError(f"fit_lookup_ffn needs x [N, d_in] and y [N, d_out] with the same "
                                f"N, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[1] != lookup.d_in or y.shape[1] != lookup.d_out:
        raise LookupcInputError(
            f"fit_lookup_ffn: x has {x.shape[1]} features and y {y.shape[1]}, but the LookupFFN "
            f"maps {lookup.d_in} -> {lookup.d_out}")
    dev, dt = lookup.tables.device, lookup.tables.dtype
    x, y = x.to(dev, dt), y.to(dev, dt)
    t0 = time.perf_counter()
    stats: dict[str, float] = {"tokens": float(x.shape[0])}
    if opts.hash_steps:
        fc1 = first_linear(dense) if opts.hash_source != "input" else None
        if fc1 is not None and fc1.in_features != x.shape[1]:
            fc1 = None
        if fc1 is not None:
            fc1 = _float_copy(fc1, dev, dt)
        if fc1 is not None and opts.hash_source == "hidden":
            fc2 = last_linear(dense)
            target = hidden_target(x, lookup.config.code_width, fc1, fc2, opts.hash_scale)
        else:
            target = hash_target(x, lookup.config.code_width, fc1, opts.hash_scale)
        stats["hash_rel"] = fit_hash(lookup, x, target, steps=opts.hash_steps, lr=opts.hash_lr,
                                     batch=opts.batch_tokens, seed=opts.seed, bar=bar)
    if opts.cg_iters:
        stats["table_rel"] = solve_tables(lookup, x, y, ridge=opts.ridge, iters=opts.cg_iters,
                                          bar=bar, ridge_grid=opts.ridge_grid)
    if opts.finetune_steps:
        dense_f = None
        if opts.input_noise > 0 and dense is not None:
            dense_f = copy.deepcopy(dense).to(dev, dt).eval()
        finetune(lookup, x, y, dense=dense_f, noise=opts.input_noise,
                 steps=opts.finetune_steps, lr=opts.finetune_lr,
                 hash_lr=opts.finetune_hash_lr, batch=opts.batch_tokens, seed=opts.seed, bar=bar)
    stats["train_rel"] = relative_error(lookup, x, y)
    xv, yv = (x, y) if x_val is None or y_val is None else (x_val.to(dev, dt), y_val.to(dev, dt))
    stats["rel_error"] = relative_error(lookup, xv, yv)
    stats["seconds"] = time.perf_counter() - t0
    return stats


def _float_copy(linear: nn.Linear, device, dtype) -> nn.Linear:
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        copy.weight.copy_(linear.weight)
        if linear.bias is not None:
            copy.bias.copy_(linear.bias)
    return copy.to(device, dtype)


# ---------------------------------------------------------------------------------------
# A whole converted model
# ---------------------------------------------------------------------------------------

def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` inside ``root``; return what was there."""
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    return old


def _slot_of(root: nn.Module, rep: Any) -> str:
    slot = getattr(rep, "slot", None)
    if slot:
        return slot
    for name, mod in root.named_modules():
        if mod is rep.lookup:
            return name
    raise LookupcInputError(f"replacement {rep.name!r}: its LookupFFN is not inside result.module")


def capture_inputs(model: nn.Module, modules: list[nn.Module], items: list, max_tokens: int,
                   stop: bool = False) -> list[Tensor]:
    """Inputs of each of ``modules`` over the calibration items (each capped at max_tokens)."""
    caps = [ActivationCapture(m, max_tokens, stop=stop) for m in modules]
    for c in caps:
        c.__enter__()
    try:
        with torch.no_grad():
            for index, item in enumerate(items):
                if all(c.full for c in caps):
                    break
                for c in caps:
                    c.item = item
                try:
                    run_item(model, item, index)
                except StopForward:
                    pass
    finally:
        for c in caps:
            c.__exit__(None, None, None)
    return [c.result() for c in caps]


def _dense_outputs(dense: nn.Module, x: Tensor, batch: int = 8192) -> Tensor:
    p = next(dense.parameters(), None)
    dev, dt = (p.device, p.dtype) if p is not None else (x.device, x.dtype)
    with torch.no_grad():
        return torch.cat([dense(x[i:i + batch].to(dev, dt)).float().cpu()
                          for i in range(0, x.shape[0], batch)])


def _split(n: int, holdout: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = min(n - 1, max(1, round(holdout * n)))
    return perm[n_val:], perm[:n_val]


def _set_rel_error(entry: Any, value: float) -> None:
    try:
        entry.rel_error = value
    except (AttributeError, TypeError):  # frozen dataclass
        object.__setattr__(entry, "rel_error", value)


def _text_items(calibration: Any, model: nn.Module, tokenizer: Any) -> Any:
    """Calibration given as text (a .txt/.jsonl path or a list of sentences) -> model inputs,
    tokenised with ``tokenizer`` or the one stored with the model; anything else as is."""
    from . import calibration_text as ct

    if isinstance(calibration, (str, os.PathLike)):
        if not ct.is_text_file(str(calibration)):
            raise LookupcInputError(f"calibration {calibration}: a file path must end in "
                                    f"{' or '.join(ct.TEXT_SUFFIXES)} (text for the tokenizer)")
        source = str(calibration)
        sentences = ct.read_sentences(source)
    elif isinstance(calibration, (list, tuple)) and calibration and all(
            isinstance(s, str) for s in calibration):
        source, sentences = "calibration sentences", list(calibration)
    else:
        return calibration
    tok = tokenizer if tokenizer is not None else ct.tokenizer_for(model)
    accepted = set(inspect.signature(model.forward).parameters)
    return ct.tokenize(tok, sentences, source=source, accepted=accepted)


def distill_conversion(result: Any, original_model: nn.Module, calibration: Any,
                       tokenizer: Any = None, **options: Any) -> list[dict]:
    """Fit every LookupFFN of a conversion to the dense FFN it replaced.

    Called by ``lookupc.convert(..., init="distill")``. Layer by layer (in
    ``result.replacements`` order): capture the LookupFFN's inputs on the calibration
    items (``feed="converted"``: in ``result.module``, whose earlier LookupFFNs are
    already fitted, stopping the forward at the layer; ``"original"``: once, with every
    dense FFN put back), compute the targets with ``replacement.dense``, fit with
    :func:`fit_lookup_ffn` and record the held-out relative error in
    ``result.report.matched[i].rel_error``. With ``model_steps`` the LookupFFNs are then
    trained together on the model's outputs (:func:`lookupc.distill.model.finetune_model`)
    and ``result.report.model_error`` records the output error before and after.

    Parameters
    ----------
    result : ConversionResult
        From ``lookupc.convert``; ``result.module`` is changed in place.
    original_model : nn.Module
        The unconverted model (only used to check the calibration items fit it).
    calibration : iterable or str
        Example inputs: tuples of positional args, dicts of keyword args or tensors.
        An ``attention_mask`` kwarg shaped like the tokens drops padding tokens. Or
        text: a list of sentences, or the path of a ``.txt`` (one per line) or ``.jsonl``
        (``text`` field) file, tokenised with ``tokenizer``.
    tokenizer : optional
        A Hugging Face tokenizer for text calibration (default: the one in the model's
        directory, ``model.config._name_or_path``).
    **options
        Fields of :class:`DistillOptions`.

    Returns
    -------
    list of dict
        Per replacement: ``name`` and the statistics of :func:`fit_lookup_ffn`.

    Raises
    ------
    LookupcInputError
        Empty or missing calibration, unknown options, or a calibration item the
        model cannot run (the message names the item and the model's error).
    """
    opts = DistillOptions.from_kwargs(**options)
    from ..table_quant import require_float_tables

    require_float_tables(result.module, "distillation")
    items = calibration_items(_text_items(calibration, original_model, tokenizer))
    reps = list(result.replacements)
    if not reps:
        return []
    module = result.module
    slots = [_slot_of(module, r) for r in reps]
    modes = (module.training, original_model.training)
    module.eval()
    original_model.eval()
    with torch.no_grad():  # a wrong item fails here with the model's own message
        try:
            run_item(original_model, items[0], 0)
        finally:
            original_model.train(modes[1])
    from ..progress import progress as progress_bar
    from .distributed import setup as setup_distributed

    comm = setup_distributed(opts.distributed)
    show = opts.progress and (comm is None or comm.rank == 0)
    stats_all = []
    try:
        pre = _capture_original(module, reps, slots, items, opts) if opts.feed == "original" \
            else None
        bar = progress_bar(total=len(reps), desc="distill", unit="ffn", disable=not show)
        with bar:
            for i, rep in enumerate(reps):
                bar.set_description(f"distill {rep.name}")
                x = pre[i] if pre is not None else \
                    capture_inputs(module, [rep.lookup], items, opts.max_tokens, stop=True)[0]
                if x.shape[0] < 2:
                    raise LookupcInputError(
                        f"calibration gave {x.shape[0]} token(s) for FFN {rep.name!r}; need >= 2 "
                        f"(is it reached by the model's forward?)")
                y = _dense_outputs(rep.dense, x)
                tr, va = _split(x.shape[0], opts.holdout, opts.seed + i)
                stats = fit_lookup_ffn(rep.lookup, x[tr], y[tr], dense=rep.dense, x_val=x[va],
                                       y_val=y[va], options=opts, bar=bar)
                if comm is not None:  # every rank goes on with rank 0's fit, bit for bit
                    comm.broadcast_(list(rep.lookup.parameters()))
                _set_rel_error(result.report.matched[i], stats["rel_error"])
                stats_all.append({"name": rep.name, **stats})
                bar.set_postfix_str(f"rel_error {stats['rel_error']:.4f}")
                bar.update(1)
        if opts.model_steps:
            from .model import finetune_model
            result.report.model_error = finetune_model(
                module, original_model, items, steps=opts.model_steps, lr=opts.model_lr,
                hash_lr=opts.model_hash_lr, rest_lr=opts.model_rest_lr, train=opts.model_train,
                cosine_weight=opts.model_cosine_weight, layers=opts.model_layers,
                seed=opts.seed, progress=show, checkpoint=opts.checkpoint,
                checkpoint_every=opts.checkpoint_every, resume=opts.resume,
                distributed=opts.distributed)
    finally:
        module.train(modes[0])
    return stats_all


def _capture_original(module: nn.Module, reps: list, slots: list[str], items: list,
                      opts: DistillOptions) -> list[Tensor]:
    """Inputs of every FFN in the dense model: slots temporarily hold the dense modules."""
    olds = [_set_submodule(module, s, r.dense) for s, r in zip(slots, reps)]
    try:
        return capture_inputs(module, [r.dense for r in reps], items, opts.max_tokens, stop=False)
    finally:
        for s, old in zip(slots, olds):
            _set_submodule(module, s, old)
