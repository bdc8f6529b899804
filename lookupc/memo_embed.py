"""Hidden-state embedding for attention memoization (AttMemo, section 5.2).

A layer's input hidden state (``L x H``) is mapped to a short vector (default
128-d) so that the Euclidean distance between two embeddings predicts how
different the two attention probability matrices (APMs) are. The target is the
paper's total-variation distance (eq. 1): ``d(A, A') = 1 - SC(A, A')``, the mean
over heads and query rows of half the L1 distance between rows. An embedding
distance of ``d`` therefore reads directly as a *predicted similarity score*
``1 - d``, and the memoization threshold is a similarity score (see
``lookupc.memo_perf``).

Model: a token-wise projection ``H -> r`` (shared over positions), flattened to
``L * r`` and fed to a two-layer MLP (``width`` hidden units, GELU) that outputs
``dim`` values. Compared with the paper's MLP on the flattened ``L * H`` state,
the token-wise projection keeps positional structure (APM rows are per position)
while cutting the embedding cost ~20x (MiniLM, L=128: 1.3 M multiply-adds versus
the 44 M a hit saves), which matters because embedding is the dominant overhead
(paper table 4). The input length is fixed, so there is one embedder per
(layer, sequence-length bucket).

Training is siamese: both members of a pair go through the same network and the
loss is ``(||e_i - e_j|| - d(A_i, A_j))^2`` averaged over pairs, so no labels are
needed. Pairs are half random and half "near" pairs (nearest neighbours under a
random projection of the raw hidden states), so that the low-distance regime the
threshold cares about is represented.
"""

from __future__ import annotations

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
    seed : int
        Seed for pair sampling and initialisation.
    """

    dim: int = 128
    token_dim: int = 16
    width: int = 256
    steps: int = 300
    pairs: int = 4096
    batch_pairs: int = 512
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "token_dim", "width", "steps", "pairs", "batch_pairs"):
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
    flat = hidden.reshape(n, -1).astype(np.float32, copy=False)
    proj = flat @ rng.standard_normal((flat.shape[1], 32)).astype(np.float32)
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


def _pair_loss(emb: HiddenStateEmbedder, x: torch.Tensor, pairs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    items, inverse = torch.unique(pairs, return_inverse=True)
    e = emb(x[items])
    diff = e[inverse[:, 0]] - e[inverse[:, 1]]
    dist = torch.sqrt((diff * diff).sum(-1) + 1e-12)
    return ((dist - target) ** 2).mean()


def _full_loss(emb: HiddenStateEmbedder, x: torch.Tensor, pairs: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [_pair_loss(emb, x, pairs[s:s + 2048], target[s:s + 2048]) * len(pairs[s:s + 2048])
                  for s in range(0, len(pairs), 2048)]
    return float(sum(losses) / max(1, len(pairs)))


def train_embedder(hidden: np.ndarray, apms: np.ndarray, config: EmbedConfig = EmbedConfig()
                   ) -> tuple[HiddenStateEmbedder, TrainReport]:
    """Train one embedder with the siamese loss on a layer's calibration data.

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
        pairs are held out for the validation loss.
    """
    n, seq_len, hid = hidden.shape
    if apms.shape[0] != n or apms.shape[-1] != seq_len:
        raise ValueError(f"apms shape {tuple(apms.shape)} does not match hidden {tuple(hidden.shape)}")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    pairs_np = sample_pairs(np.asarray(hidden), config.pairs, config.seed)
    target_np = pair_distances(apms, pairs_np)
    n_val = max(1, len(pairs_np) // 10) if len(pairs_np) >= 10 else 0
    pairs, target = torch.from_numpy(pairs_np), torch.from_numpy(target_np)
    val_p, val_t = pairs[:n_val], target[:n_val]
    tr_p, tr_t = (pairs[n_val:], target[n_val:]) if n_val else (pairs, target)
    x = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
    emb = HiddenStateEmbedder(seq_len, hid, config)
    init_loss, init_val = _full_loss(emb, x, tr_p, tr_t), _full_loss(emb, x, val_p, val_t) if n_val else float("nan")
    opt = torch.optim.Adam(emb.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in range(config.steps):
        sel = torch.randint(0, len(tr_p), (min(config.batch_pairs, len(tr_p)),), generator=gen)
        loss = _pair_loss(emb, x, tr_p[sel], tr_t[sel])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    emb.eval()
    report = TrainReport(
        seconds=time.perf_counter() - start, initial_loss=init_loss, final_loss=_full_loss(emb, x, tr_p, tr_t),
        initial_val_loss=init_val, final_val_loss=_full_loss(emb, x, val_p, val_t) if n_val else float("nan"),
        n_pairs=len(pairs_np), steps=config.steps, losses=losses)
    return emb, report
