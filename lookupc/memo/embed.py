"""Hidden-state embedding for attention memoization (AttMemo, section 5.2).

A layer's input hidden state (``n x H`` for a sequence of ``n`` real tokens) is
mapped to a search key so that key distance predicts how different two attention
probability matrices (APMs) are. The target is the paper's eq. 1 distance
``d(A, A') = 1 - SC(A, A')``: the mean over heads and query rows of the rows' total
variation distance.

Model (per layer and length bucket): a learned per-token linear map ``H -> r``
(``token_dim``), the same at every position, applied to the first ``n`` positions and
flattened, so a key has ``n * r`` values. The predicted distance of two keys is a
saturating function of their *squared* Euclidean distance ``q``::

    predicted distance = phi(q) = c * (1 - exp(-q / c))       (c learned)
    predicted similarity = 1 - phi(q)

Why this shape: a near-duplicate input (a few tokens replaced) changes the APM by an
amount roughly proportional to the number of replaced tokens; a per-token map makes
``q`` a sum over positions, so it grows linearly with the number of changed tokens,
where a plain Euclidean distance grows with its square root (the old flattened-MLP
embedder overstated near distances about 3x relative to far ones); ``phi`` saturates
for unrelated inputs. With a few hundred sequences a per-token map also generalises,
where an MLP on the flattened state memorised its training pairs. The map is trained
on top of a frozen PCA basis of the layer's token states (``pca_dim``), which makes a
training step cheap; the two are folded into one ``H x r`` matrix for inference, so
embedding a sequence costs ``n * H * r`` multiply-adds (MiniLM at 128 tokens: 0.8 M,
about 1% of what a hit saves).

Training is siamese (paper figure 6) on pairs whose target is the eq. 1 distance of
their APMs, estimated on ``target_rows`` query rows; the targets and the pairs are
made in :mod:`lookupc.memo.pairs`. Pairs mix near pairs (token-edited copies of
database sequences with their origin and with each other), copies against other
records, and record pairs (random and nearest under a random projection), always
between sequences of the same real length. Held-out copies give the validation loss;
training runs until that loss stops improving (``patience`` checks), the step limit or
the time budget, and keeps the best weights.

Size: the embedder and the loop that trains it (its loss, PCA start and early stopping)
share private state and read best together; a 40-line design note above is part of the
count. Its training pairs are in :mod:`lookupc.memo.pairs`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from lookupc.errors import LookupcInputError
from lookupc.memo.pairs import PairSet, pair_distances

__all__ = [
    "EmbedConfig",
    "HiddenStateEmbedder",
    "TrainReport",
    "train_embedder",
]


@dataclass(frozen=True)
class EmbedConfig:
    """Embedder shape, training data and training budget of one (layer, length) bucket.

    Parameters
    ----------
    token_dim : int
        ``r``: features per token; a key of an ``n``-token sequence has ``n * r`` values.
    pca_dim : int
        Width of the frozen PCA basis the learned map starts from (capped at the hidden size).
    steps : int
        Upper limit on Adam steps (training usually stops earlier, see ``patience``).
    max_seconds : float or None
        Training time budget per bucket; ``None``: no limit.
    patience : int
        Stop after this many validation checks without a 0.5% improvement.
    check_every : int
        Steps between validation checks.
    batch_pairs : int
        Pairs per step.
    lr : float
        Adam learning rate (cosine-decayed over ``steps``).
    target_rows : int
        Query rows per APM used for the pair targets (all rows of shorter sequences).
    edit_rates : tuple of float
        Token-replacement fractions of the edited copies of database sequences made at build
        time (near pairs for training, calibration and the default alpha estimate); ``()``:
        no copies (then only record pairs are used and nothing is calibrated on near pairs).
    copies_per_rate : int
        Edited copies per database sequence and rate.
    max_copies : int
        Cap on edited copies per length bucket (a deterministic subset of sequences is copied).
    val_fraction, calib_fraction : float
        Shares of the edited copies held out for the validation loss and for fitting the
        similarity calibration (the rest trains the embedder).
    seed : int
        Seed for copies, pair sampling and initialisation.
    threads : int or None
        torch threads while training (restored afterwards): the steps are small matmuls, and
        on a loaded machine two OpenMP threads spinning at barriers made them 30x slower than
        one. ``None``: leave torch's setting.
    """

    token_dim: int = 16
    pca_dim: int = 96
    steps: int = 1500
    max_seconds: float | None = None
    patience: int = 6
    check_every: int = 25
    batch_pairs: int = 512
    lr: float = 3e-3
    target_rows: int = 32
    edit_rates: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    copies_per_rate: int = 1
    max_copies: int = 1024
    val_fraction: float = 0.2
    calib_fraction: float = 0.2
    seed: int = 0
    threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("token_dim", "pca_dim", "steps", "patience", "check_every", "batch_pairs", "target_rows",
                     "copies_per_rate", "max_copies"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LookupcInputError(f"EmbedConfig.{name} must be a positive int, got {value!r}")
        if not self.lr > 0:
            raise LookupcInputError(f"EmbedConfig.lr must be > 0, got {self.lr!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise LookupcInputError(f"EmbedConfig.threads must be a positive int or None, got {self.threads!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise LookupcInputError(f"EmbedConfig.max_seconds must be > 0 or None, got {self.max_seconds!r}")
        object.__setattr__(self, "edit_rates", tuple(float(r) for r in self.edit_rates))
        if any(not 0 < r < 1 for r in self.edit_rates):
            raise LookupcInputError(f"EmbedConfig.edit_rates must lie in (0, 1), got {self.edit_rates!r}")
        if not (0 < self.val_fraction < 1 and 0 <= self.calib_fraction < 1
                and self.val_fraction + self.calib_fraction < 1):
            raise LookupcInputError("EmbedConfig.val_fraction in (0, 1) and calib_fraction in [0, 1) must "
                                    f"sum to < 1, got {self.val_fraction!r} + {self.calib_fraction!r}")

    def as_dict(self) -> dict:
        d = asdict(self)
        d["edit_rates"] = list(self.edit_rates)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EmbedConfig":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (tuple(v) if k == "edit_rates" else v) for k, v in d.items() if k in known})


class HiddenStateEmbedder(nn.Module):
    """Map hidden states ``[B, n, H]`` (``n <= seq_len`` real tokens) to keys ``[B, n * token_dim]``.

    Holds the folded token map (``weight [H, r]``, ``bias [r]``) and ``log_c`` of the
    saturation ``phi``. ``similarity(q)`` turns squared key distances into predicted
    similarities.

    Examples
    --------
    >>> emb = HiddenStateEmbedder(seq_len=8, hidden=16, config=EmbedConfig(token_dim=4))
    >>> emb(torch.zeros(2, 8, 16)).shape
    torch.Size([2, 32])
    """

    def __init__(self, seq_len: int, hidden: int, config: EmbedConfig = EmbedConfig()):
        super().__init__()
        self.seq_len = int(seq_len)
        self.hidden = int(hidden)
        self.token_dim = int(config.token_dim)
        self.register_buffer("weight", torch.zeros(hidden, config.token_dim))
        self.register_buffer("bias", torch.zeros(config.token_dim))
        self.register_buffer("log_c", torch.zeros(()))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        n = hidden_states.shape[-2]
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden or not 1 <= n <= self.seq_len:
            raise LookupcInputError(f"hidden_states must be [B, n <= {self.seq_len}, {self.hidden}], "
                                    f"got {tuple(hidden_states.shape)}")
        return torch.addmm(self.bias, hidden_states.reshape(-1, self.hidden), self.weight).reshape(
            hidden_states.shape[0], n * self.token_dim)

    def similarity(self, sq_dist):
        """Predicted similarity ``1 - phi(q)`` of squared key distances ``q`` (numpy or torch)."""
        c = float(torch.exp(self.log_c))
        if isinstance(sq_dist, torch.Tensor):
            return 1.0 - c * (1.0 - torch.exp(-sq_dist.clamp_min(0) / c))
        return 1.0 - c * (1.0 - np.exp(-np.maximum(np.asarray(sq_dist, np.float64), 0.0) / c))

    def flops_per_sequence(self, n: int | None = None) -> int:
        """Multiply-adds x 2 of embedding one sequence of ``n`` (default ``seq_len``) tokens."""
        return 2 * (n or self.seq_len) * self.hidden * self.token_dim


@dataclass
class TrainReport:
    """What siamese training did: time, steps, why it stopped, loss before/after (train and held-out)."""

    seconds: float
    initial_loss: float
    final_loss: float
    initial_val_loss: float
    final_val_loss: float
    n_pairs: int
    n_val_pairs: int
    steps: int
    best_step: int
    stopped: str
    val_curve: list[tuple[int, float]] = field(default_factory=list)

    @property
    def val_reduction(self) -> float:
        """``1 - final / initial`` held-out loss (0.6 = 60% lower)."""
        if not self.initial_val_loss > 0 or math.isnan(self.final_val_loss):
            return float("nan")
        return 1.0 - self.final_val_loss / self.initial_val_loss

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["val_reduction"] = self.val_reduction
        curve = self.val_curve
        d["val_curve"] = [[int(s), round(v, 8)] for s, v in curve[:: max(1, len(curve) // 20)]]
        return d


# ----------------------------------------------------------------------------- training

class _Trainable(nn.Module):
    """Learned ``pca_dim -> token_dim`` map on PCA coordinates; ``log_c`` of phi; a log scale."""

    def __init__(self, p: int, r: int, eigvals: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(p, r, bias=False)
        with torch.no_grad():  # start as the whitened top-r principal directions
            self.proj.weight.zero_()
            k = min(p, r)
            self.proj.weight[:k, :k] = torch.diag(eigvals[:k].clamp_min(1e-6).rsqrt())
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.log_c = nn.Parameter(torch.zeros(()))

    def keys(self, z: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        f = self.proj(z) * torch.exp(self.log_scale)  # [B, Lmax, r]
        mask = torch.arange(z.shape[1])[None, :] < lengths[:, None]
        return (f * mask[..., None]).flatten(1)

    def phi(self, q: torch.Tensor) -> torch.Tensor:
        c = torch.exp(self.log_c)
        return c * (1.0 - torch.exp(-q / c))


def _pca_basis(hidden: np.ndarray, lengths: np.ndarray, idx: np.ndarray, p: int, max_tokens: int, seed: int):
    """Mean ``[H]``, top-``p`` principal directions ``[H, p]`` and their variances of real token states."""
    rng = np.random.default_rng(seed)
    per_seq = max(1, max_tokens // max(1, len(idx)))
    toks = []
    for i in idx.tolist():
        n = int(lengths[i])
        pos = np.sort(rng.choice(n, min(n, per_seq), replace=False))
        toks.append(np.asarray(hidden[i, pos], dtype=np.float64))
    t = torch.from_numpy(np.concatenate(toks))
    mean = t.mean(0)
    cov = (t - mean).T @ (t - mean) / max(1, t.shape[0] - 1)
    vals, vecs = torch.linalg.eigh(cov)  # ascending
    p = min(p, t.shape[1])
    return mean.float(), vecs[:, -p:].flip(1).float(), vals[-p:].flip(0).float()


def _project(hidden: np.ndarray, mean: torch.Tensor, basis: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    n = hidden.shape[0]
    out = torch.empty(n, hidden.shape[1], basis.shape[1])
    for s in range(0, n, chunk):
        x = torch.from_numpy(np.asarray(hidden[s:s + chunk], dtype=np.float32))
        out[s:s + chunk] = (x - mean) @ basis
    return out


def _loss(model: _Trainable, z: torch.Tensor, lengths: torch.Tensor, pairs: torch.Tensor,
          target: torch.Tensor) -> torch.Tensor:
    items, inverse = torch.unique(pairs, return_inverse=True)
    e = model.keys(z[items], lengths[items])
    q = (e[inverse[:, 0]] - e[inverse[:, 1]]).pow(2).sum(-1)
    return (model.phi(q) - target).pow(2).mean()


def _full_loss(model, z, lengths, pairs, target) -> float:
    with torch.no_grad():
        total = sum(float(_loss(model, z, lengths, pairs[s:s + 2048], target[s:s + 2048])) * len(pairs[s:s + 2048])
                    for s in range(0, len(pairs), 2048))
    return total / max(1, len(pairs))


def _init_scale(model: _Trainable, z, lengths, pairs, target) -> None:
    """Scale so near pairs (target below the median) start at the right mean distance; c from the far ones."""
    with torch.no_grad():
        items, inverse = torch.unique(pairs, return_inverse=True)
        e = model.keys(z[items], lengths[items])
        q = (e[inverse[:, 0]] - e[inverse[:, 1]]).pow(2).sum(-1).double()
        near = target <= target.median()
        if q[near].mean() > 0:
            model.log_scale.fill_(0.5 * math.log(float(target[near].mean()) / float(q[near].mean())))
        model.log_c.fill_(math.log(max(float(target.max()), 1e-3) * 1.1))


def train_embedder(hidden: np.ndarray, sketches: np.ndarray, lengths: np.ndarray, pairs: PairSet,
                   config: EmbedConfig = EmbedConfig(), *, fit_idx: np.ndarray | None = None, desc: str = "embed",
                   show_progress: bool = True) -> tuple[HiddenStateEmbedder, TrainReport]:
    """Train one bucket's embedder with the siamese loss until the held-out loss stops improving.

    Parameters
    ----------
    hidden : numpy.ndarray
        ``[N, Lmax, H]`` hidden states entering the attention layer (may be a memmap);
        positions past a sequence's length are ignored.
    sketches : numpy.ndarray
        ``[N, heads, rows, Lmax]`` APM sketches (:func:`lookupc.memo.pairs.apm_sketch`).
    lengths : numpy.ndarray
        ``[N]`` real lengths.
    pairs : PairSet
        From :func:`lookupc.memo.pairs.build_pairs`.
    config : EmbedConfig
        Sizes and budget.
    fit_idx : numpy.ndarray, optional
        Sequences whose token states fit the PCA basis (default: all in ``pairs.train``).
    desc : str
        Progress label.
    show_progress : bool
        Show a progress bar / lines (``lookupc.progress``) on stderr.

    Returns
    -------
    (HiddenStateEmbedder, TrainReport)
        The embedder at the step with the lowest held-out loss (``report.best_step``; 0 = the
        scaled initial map) and the report (``report.val_reduction``: held-out loss reduction).
    """
    previous = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(hidden, sketches, lengths, pairs, config, fit_idx, desc, show_progress)
    finally:
        torch.set_num_threads(previous)


def _train(hidden, sketches, lengths, pairs, config, fit_idx, desc, show_progress):
    from lookupc.progress import progress

    n_seq, lmax, hid = hidden.shape
    if sketches.shape[0] != n_seq or len(lengths) != n_seq:
        raise LookupcInputError(f"sketches {tuple(sketches.shape)} / lengths {len(lengths)} do not match "
                                f"hidden {tuple(hidden.shape)}")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    fit_idx = np.unique(pairs.train) if fit_idx is None else np.asarray(fit_idx)
    mean, basis, eigvals = _pca_basis(hidden, lengths, fit_idx, config.pca_dim, 50_000, config.seed)
    z = _project(hidden, mean, basis)
    lens = torch.from_numpy(lengths)
    tr_p, va_p = torch.from_numpy(pairs.train), torch.from_numpy(pairs.val)
    tr_t = torch.from_numpy(pair_distances(sketches, pairs.train, lengths))
    va_t = torch.from_numpy(pair_distances(sketches, pairs.val, lengths))
    model = _Trainable(basis.shape[1], config.token_dim, eigvals)
    _init_scale(model, z, lens, tr_p, tr_t)
    init_loss, init_val = _full_loss(model, z, lens, tr_p, tr_t), _full_loss(model, z, lens, va_p, va_t)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)
    gen = torch.Generator().manual_seed(config.seed)
    best = (init_val, 0, copy.deepcopy(model.state_dict()))
    curve, stopped, since_best, step = [(0, init_val)], "steps", 0, 0
    bar = progress(total=config.steps, desc=desc, unit="step", disable=not show_progress)
    try:
        for step in range(1, config.steps + 1):
            sel = torch.randint(0, len(tr_p), (min(config.batch_pairs, len(tr_p)),), generator=gen)
            loss = _loss(model, z, lens, tr_p[sel], tr_t[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if step % config.check_every == 0 or step == config.steps:
                val = _full_loss(model, z, lens, va_p, va_t)
                curve.append((step, val))
                if val < best[0] * 0.995:
                    since_best = 0
                else:
                    since_best += 1
                if val < best[0]:
                    best = (val, step, copy.deepcopy(model.state_dict()))
                bar.set_postfix_str(f"held-out loss {val:.3g} ({val / init_val:.0%} of initial)"
                                    if init_val > 0 else f"held-out loss {val:.3g}")
                if since_best >= config.patience:
                    stopped = "converged"
                    break
            if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
                stopped = "time budget"
                break
    finally:
        bar.close()
    model.load_state_dict(best[2])
    emb = HiddenStateEmbedder(lmax, hid, config)
    with torch.no_grad():
        w = basis @ model.proj.weight.T * torch.exp(model.log_scale)  # [H, r]
        emb.weight.copy_(w)
        emb.bias.copy_(-(mean @ w))
        emb.log_c.copy_(model.log_c)
    emb.eval()
    report = TrainReport(
        seconds=time.perf_counter() - start, initial_loss=init_loss,
        final_loss=_full_loss(model, z, lens, tr_p, tr_t), initial_val_loss=init_val, final_val_loss=best[0],
        n_pairs=len(tr_p), n_val_pairs=len(va_p), steps=step, best_step=best[1], stopped=stopped, val_curve=curve)
    return emb, report
