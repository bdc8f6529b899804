"""Hidden-state embedding for attention memoization (AttMemo, section 5.2).

A layer's input hidden state (``L x H``) is mapped to a short vector (default
128-d) so that the Euclidean distance between two embeddings predicts how
different the two attention probability matrices (APMs) are. The target is the
paper's total-variation distance (eq. 1): ``d(A, A') = 1 - SC(A, A')``, the mean
over heads and query rows of half the L1 distance between rows. An embedding
distance of ``d`` therefore reads directly as a *predicted similarity score*
``1 - d``, and the memoization threshold is a similarity score (see
``lookupc.memo_perf``).

Model: a token-wise projection ``H -> r`` (shared over positions; the top-r
principal directions of the layer's token states, whitened, fitted once and frozen),
flattened to ``L * r`` and fed to a two-layer MLP (``width`` hidden units, GELU)
that outputs ``dim`` values and is trained. Compared with the paper's MLP on the
flattened ``L * H`` state, the token-wise projection keeps positional structure
(APM rows are per position) while cutting the embedding cost ~10x (MiniLM, L=128,
r=32: 2.6 M multiply-adds versus the 44 M a hit saves), which matters because
embedding is the dominant overhead (paper table 4); freezing it makes training
fast (the projected data is computed once). The input length is fixed, so there is one embedder per
(layer, sequence-length bucket).

Training is siamese: both members of a pair go through the same network and the
loss is ``(||e_i - e_j|| - d(A_i, A_j))^2`` averaged over pairs, so no labels are
needed. Pairs are half random and half "near" pairs (nearest neighbours under a
random projection of the raw hidden states), so that the low-distance regime the
threshold cares about is represented.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = [
    "EmbedConfig",
    "HiddenStateEmbedder",
    "TrainReport",
    "apm_distance",
    "pair_distances",
    "sample_pairs",
    "train_embedder",
]


@dataclass(frozen=True)
class EmbedConfig:
    """Shape and training options of one embedder.

    Parameters
    ----------
    dim : int
        Output (search key) width.
    token_dim : int
        Width of the per-token projection ``H -> token_dim``.
    width : int
        Hidden units of the MLP.
    steps : int
        Adam steps of siamese training.
    pairs : int
        Number of (i, j) training pairs sampled per layer and bucket.
    batch_pairs : int
        Pairs per optimisation step.
    lr : float
        Adam learning rate.
    target_rows : int
        Query rows sampled for the pair targets (all rows if >= L).
    seed : int
        Seed for pair sampling and initialisation.
    """

    dim: int = 128
    token_dim: int = 32
    width: int = 256
    steps: int = 300
    pairs: int = 4096
    batch_pairs: int = 512
    lr: float = 2e-3
    target_rows: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "token_dim", "width", "steps", "pairs", "batch_pairs", "target_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EmbedConfig.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"EmbedConfig.lr must be > 0, got {self.lr!r}")


class HiddenStateEmbedder(nn.Module):
    """Map hidden states ``[B, L, H]`` to search keys ``[B, dim]``.

    Examples
    --------
    >>> emb = HiddenStateEmbedder(seq_len=8, hidden=16, config=EmbedConfig(dim=4))
    >>> emb(torch.zeros(2, 8, 16)).shape
    torch.Size([2, 4])
    """

    def __init__(self, seq_len: int, hidden: int, config: EmbedConfig = EmbedConfig()):
        super().__init__()
        self.seq_len = seq_len
        self.hidden = hidden
        self.token_proj = nn.Linear(hidden, config.token_dim)
        self.mlp = nn.Sequential(
            nn.Linear(seq_len * config.token_dim, config.width),
            nn.GELU(),
            nn.Linear(config.width, config.dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.shape[-2:] != (self.seq_len, self.hidden):
            raise ValueError(
                f"hidden_states must be [B, {self.seq_len}, {self.hidden}], got {tuple(hidden_states.shape)}")
        return self.mlp(self.token_proj(hidden_states).flatten(1))

    def flops_per_sequence(self) -> int:
        """Multiply-adds x 2 of one forward call for one sequence."""
        macs = self.seq_len * self.token_proj.in_features * self.token_proj.out_features
        macs += sum(m.in_features * m.out_features for m in self.mlp if isinstance(m, nn.Linear))
        return 2 * macs


@dataclass
class TrainReport:
    """What siamese training did: time, loss before/after (train and held-out pairs)."""

    seconds: float
    initial_loss: float
    final_loss: float
    initial_val_loss: float
    final_val_loss: float
    n_pairs: int
    steps: int
    best_step: int = 0
    losses: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["losses"] = [round(x, 6) for x in self.losses[:: max(1, len(self.losses) // 20)]]
        return d


def apm_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Paper eq. 1 distance ``1 - SC``: mean over heads and rows of the rows' TV distance.

    Parameters
    ----------
    a, b : torch.Tensor
        APMs ``[..., heads, L, L]`` (rows are probability distributions).

    Returns
    -------
    torch.Tensor
        ``[...]`` distances in ``[0, 1]``.
    """
    return 0.5 * (a.float() - b.float()).abs().sum(-1).mean((-1, -2))


def pair_distances(apms: np.ndarray, pairs: np.ndarray, chunk: int = 64) -> np.ndarray:
    """``apm_distance`` for each row ``(i, j)`` of ``pairs``, reading ``apms`` (e.g. a memmap) in chunks."""
    out = np.empty(len(pairs), dtype=np.float32)
    for s in range(0, len(pairs), chunk):
        p = pairs[s:s + chunk]
        a = torch.from_numpy(np.asarray(apms[p[:, 0]]))
        b = torch.from_numpy(np.asarray(apms[p[:, 1]]))
        out[s:s + chunk] = apm_distance(a, b).numpy()
    return out


def sample_pairs(hidden: np.ndarray, n_pairs: int, seed: int, near: int = 4) -> np.ndarray:
    """Half random pairs, half nearest-neighbour pairs under a random projection of ``hidden``.

    Returns an ``[P, 2]`` int64 array of distinct ``i != j`` pairs (unordered, no duplicates).
    """
    n = hidden.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 calibration sequences per layer and length, got {n}")
    rng = np.random.default_rng(seed)
    flat = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32).reshape(n, -1))
    gen = torch.Generator().manual_seed(seed)
    proj = (flat @ torch.randn(flat.shape[1], 32, generator=gen)).numpy()  # torch: numpy's BLAS threads thrash here
    d2 = ((proj[:, None, :] - proj[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    k = min(near, n - 1)
    nbrs = np.argsort(d2, axis=1)[:, :k]
    near_pairs = np.unique(np.sort(np.stack([np.repeat(np.arange(n), k), nbrs.reshape(-1)], 1), axis=1), axis=0)
    rng.shuffle(near_pairs)
    n_pairs = min(n_pairs, n * (n - 1) // 2)
    chosen = [tuple(p) for p in near_pairs[: n_pairs // 2].tolist()]
    seen = set(chosen)
    while len(chosen) < n_pairs:
        for i, j in rng.integers(0, n, size=(2 * n_pairs, 2)).tolist():
            pair = (min(i, j), max(i, j))
            if i != j and pair not in seen:
                seen.add(pair)
                chosen.append(pair)
                if len(chosen) == n_pairs:
                    break
    return np.asarray(chosen, dtype=np.int64)


def _pair_loss(mlp: nn.Module, z: torch.Tensor, pairs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    items, inverse = torch.unique(pairs, return_inverse=True)
    e = mlp(z[items])
    diff = e[inverse[:, 0]] - e[inverse[:, 1]]
    dist = torch.sqrt((diff * diff).sum(-1) + 1e-12)
    return ((dist - target) ** 2).mean()


def _full_loss(mlp: nn.Module, z: torch.Tensor, pairs: torch.Tensor, target: torch.Tensor) -> float:
    if len(pairs) == 0:
        return float("nan")
    with torch.no_grad():
        losses = [_pair_loss(mlp, z, pairs[s:s + 4096], target[s:s + 4096]) * len(pairs[s:s + 4096])
                  for s in range(0, len(pairs), 4096)]
    return float(sum(losses) / len(pairs))


def fit_token_projection(emb: HiddenStateEmbedder, hidden: torch.Tensor) -> None:
    """Set ``emb.token_proj`` to the centred, whitened top principal directions of the token states (frozen)."""
    tokens = hidden.reshape(-1, hidden.shape[-1]).double()
    mean = tokens.mean(0)
    cov = (tokens - mean).T @ (tokens - mean) / max(1, tokens.shape[0] - 1)
    vals, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    r = emb.token_proj.out_features
    # whitened: unit variance per direction, so the MLP input has a known scale whatever the layer
    basis = (vecs[:, -r:] / torch.sqrt(vals[-r:].clamp_min(1e-6))).flip(1).T  # [r, H]
    with torch.no_grad():
        emb.token_proj.weight.copy_(basis.float())
        emb.token_proj.bias.copy_(-(basis @ mean).float())
    emb.token_proj.requires_grad_(False)


def _match_scale(mlp: nn.Sequential, z: torch.Tensor, pairs: torch.Tensor, target: torch.Tensor) -> None:
    """Rescale the last layer so initial pair distances have the targets' mean (faster, steadier training)."""
    with torch.no_grad():
        e = mlp(z)
        dist = (e[pairs[:, 0]] - e[pairs[:, 1]]).norm(dim=-1).mean()
        if dist > 0:
            mlp[-1].weight.mul_(target.mean() / dist)
            mlp[-1].bias.zero_()


def _target_rows(seq_len: int, rows: int, seed: int) -> np.ndarray:
    if rows >= seq_len:
        return np.arange(seq_len)
    return np.sort(np.random.default_rng(seed).choice(seq_len, rows, replace=False))


def train_embedder(hidden: np.ndarray, apms: np.ndarray, config: EmbedConfig = EmbedConfig()
                   ) -> tuple[HiddenStateEmbedder, TrainReport]:
    """Train one embedder with the siamese loss on a layer's calibration data.

    The token projection is fitted first (PCA of the layer's token states, then
    frozen) so the projected sequences ``[N, L * r]`` are computed once and the
    siamese steps only run the small MLP. Pair targets use the eq. 1 distance over
    ``config.target_rows`` random query rows (an unbiased estimate of the mean over
    all rows, 4x cheaper at L=128 with the default 32).

    Parameters
    ----------
    hidden : numpy.ndarray
        Hidden states ``[N, L, H]`` entering the attention layer (may be a memmap).
    apms : numpy.ndarray
        Their APMs ``[N, heads, L, L]`` (may be a memmap).
    config : EmbedConfig
        Sizes and training options.

    Returns
    -------
    (HiddenStateEmbedder, TrainReport)
        The trained embedder (eval mode) and the loss / time report. 10% of the
        pairs are held out; the weights kept are those with the lowest held-out loss
        (checked every 20 steps, ``report.best_step``; 0 means the scaled initial
        projection generalised best), because with a few hundred sequences the MLP
        can memorise the training pairs.
    """
    n, seq_len, hid = hidden.shape
    if apms.shape[0] != n or apms.shape[-1] != seq_len:
        raise ValueError(f"apms shape {tuple(apms.shape)} does not match hidden {tuple(hidden.shape)}")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    x = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
    pairs_np = sample_pairs(x.numpy(), config.pairs, config.seed)
    rows = _target_rows(seq_len, config.target_rows, config.seed)
    sub = np.ascontiguousarray(apms[:, :, rows, :], dtype=np.float32)  # one pass over the (mapped) APMs
    target_np = pair_distances(sub, pairs_np)
    n_val = len(pairs_np) // 10
    pairs, target = torch.from_numpy(pairs_np), torch.from_numpy(target_np)
    val_p, val_t = pairs[:n_val], target[:n_val]
    tr_p, tr_t = pairs[n_val:], target[n_val:]
    emb = HiddenStateEmbedder(seq_len, hid, config)
    fit_token_projection(emb, x)
    with torch.no_grad():
        z = torch.cat([emb.token_proj(x[s:s + 256]).flatten(1) for s in range(0, n, 256)])
    _match_scale(emb.mlp, z, tr_p, tr_t)
    init_loss, init_val = _full_loss(emb.mlp, z, tr_p, tr_t), _full_loss(emb.mlp, z, val_p, val_t)
    opt = torch.optim.Adam(emb.mlp.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    best = (init_val, 0, copy.deepcopy(emb.mlp.state_dict()))
    for step in range(1, config.steps + 1):
        sel = torch.randint(0, len(tr_p), (min(config.batch_pairs, len(tr_p)),), generator=gen)
        loss = _pair_loss(emb.mlp, z, tr_p[sel], tr_t[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if n_val and (step % 20 == 0 or step == config.steps):
            val = _full_loss(emb.mlp, z, val_p, val_t)
            if val < best[0]:
                best = (val, step, copy.deepcopy(emb.mlp.state_dict()))
    if n_val:  # early stopping: keep the weights with the lowest held-out loss
        emb.mlp.load_state_dict(best[2])
    emb.eval()
    report = TrainReport(
        seconds=time.perf_counter() - start, initial_loss=init_loss, final_loss=_full_loss(emb.mlp, z, tr_p, tr_t),
        initial_val_loss=init_val, final_val_loss=_full_loss(emb.mlp, z, val_p, val_t),
        n_pairs=len(pairs_np), steps=config.steps, best_step=best[1] if n_val else config.steps, losses=losses)
    return emb, report
