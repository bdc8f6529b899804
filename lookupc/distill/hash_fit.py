"""Phase 1 of a layer fit: the hash, fitted to the dense FFN's hidden pre-activations.

:func:`hidden_target` (or :func:`hash_target`) gives the code target ``[N, tables * bits]``
a LookupFFN's soft codes ``z`` should follow; :func:`fit_hash` runs Adam on
``||z - target||^2`` over the BH4 weight and hash bias (see :mod:`lookupc.distill.layer`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import reference as ref
from ..module import LookupFFN

__all__ = ["fit_hash", "hash_target", "hidden_target", "hidden_unit_order", "first_linear",
           "last_linear", "minibatches"]


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


def minibatches(n: int, batch: int, steps: int, seed: int):
    """``steps`` index batches of ``batch`` rows out of ``n``: consecutive slices of a
    seeded permutation, reshuffled when it runs out."""
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
    for step, idx in enumerate(minibatches(x.shape[0], batch, steps, seed)):
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
