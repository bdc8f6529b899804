"""Training targets and pairs of the attention-memo embedder (:mod:`lookupc.memo.embed`).

The target of a pair of sequences is the paper's eq. 1 distance of their attention
probability matrices (:func:`apm_distance`: ``1 - SC``, the mean over heads and query
rows of the rows' total variation distance), estimated on ``target_rows`` query rows
(:func:`sketch_rows`) kept per sequence as an APM sketch (:func:`apm_sketch`,
:func:`pair_distances`). :func:`build_pairs` makes one bucket's training and validation
pairs, always between sequences of the same real length: near pairs (token-edited copies
of database sequences with their origin and with each other), copies against other
records, and record pairs (random and nearest under a random projection); held-out
copies and a tenth of the record pairs give the validation pairs. ``ROLE_*`` name what
each captured sequence is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lookupc.errors import LookupcInputError

__all__ = [
    "ROLE_CALIB",
    "ROLE_QUERY",
    "ROLE_RECORD",
    "ROLE_TRAIN",
    "ROLE_VAL",
    "PairSet",
    "apm_distance",
    "apm_sketch",
    "build_pairs",
    "pair_distances",
    "sketch_rows",
]


# ----------------------------------------------------------------------------- targets

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


def sketch_rows(n: int, rows: int) -> np.ndarray:
    """The query rows of an ``n``-token APM that the pair targets use: all of them if
    ``n <= rows``, else ``rows`` of them (a fixed random subset per ``n``, so two sequences of
    the same length are compared on the same rows)."""
    if n <= rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(n).choice(n, rows, replace=False))


def apm_sketch(apm: torch.Tensor, lengths, rows: int, width: int) -> torch.Tensor:
    """``[B, heads, rows, width]``: the :func:`sketch_rows` of each APM ``[B, heads, L, L]``,
    keys cut or zero-padded to ``width``; rows past a short sequence's length are zero."""
    b, heads = apm.shape[0], apm.shape[1]
    out = torch.zeros(b, heads, rows, width, dtype=torch.float32)
    lengths = [int(n) for n in lengths]
    cols = min(width, apm.shape[-1])
    if len(set(lengths)) == 1:
        r = torch.from_numpy(sketch_rows(lengths[0], rows))
        out[:, :, :len(r), :cols] = apm[:, :, r, :cols].float()
        return out
    for i, n in enumerate(lengths):
        r = torch.from_numpy(sketch_rows(n, rows))
        out[i, :, :len(r), :cols] = apm[i, :, r, :cols].float()
    return out


def pair_distances(sketches: np.ndarray, pairs: np.ndarray, lengths: np.ndarray | None = None,
                   chunk: int = 64) -> np.ndarray:
    """Eq. 1 distance of each pair ``(i, j)`` of equal-length sequences from their APM sketches.

    ``sketches`` is ``[N, heads, rows, width]`` (e.g. a memmap; also full APMs ``[N, heads, L, L]``
    work, with ``lengths`` omitted); rows past a sequence's length are zero and are left out
    of the mean.
    """
    out = np.empty(len(pairs), dtype=np.float32)
    heads, rows = sketches.shape[1], sketches.shape[2]
    for s in range(0, len(pairs), chunk):
        p = np.asarray(pairs[s:s + chunk])
        a = torch.from_numpy(np.asarray(sketches[p[:, 0]], dtype=np.float32))
        b = torch.from_numpy(np.asarray(sketches[p[:, 1]], dtype=np.float32))
        tv = 0.5 * (a - b).abs().sum((-1, -2, -3))
        valid = rows if lengths is None else np.minimum(np.asarray(lengths)[p[:, 0]], rows)
        out[s:s + chunk] = tv.numpy() / (heads * np.asarray(valid, dtype=np.float32))
    return out


# ----------------------------------------------------------------------------- pairs

ROLE_RECORD, ROLE_TRAIN, ROLE_VAL, ROLE_CALIB, ROLE_QUERY = 0, 1, 2, 3, 4


@dataclass
class PairSet:
    """Training and validation pairs ``[P, 2]`` (indices into the bucket's sequences)."""

    train: np.ndarray
    val: np.ndarray


def _record_pairs(rec: np.ndarray, proj: np.ndarray, rng, near: int = 2) -> list[tuple[int, int]]:
    """Random pairs and nearest-neighbour pairs (under ``proj``) among records of one length."""
    if len(rec) < 2:
        return []
    out = set()
    d2 = ((proj[rec][:, None, :] - proj[rec][None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    for a, nbrs in enumerate(np.argsort(d2, axis=1)[:, :min(near, len(rec) - 1)]):
        for b in nbrs:
            out.add((int(min(rec[a], rec[b])), int(max(rec[a], rec[b]))))
    n_rand = min(len(rec) * (len(rec) - 1) // 2 - len(out), 2 * len(rec))
    tries = 0
    while n_rand > 0 and tries < 20 * len(rec):
        i, j = rng.choice(rec, 2, replace=False)
        tries += 1
        pair = (int(min(i, j)), int(max(i, j)))
        if pair not in out:
            out.add(pair)
            n_rand -= 1
    return sorted(out)


def _copy_pairs(copies: np.ndarray, origin: np.ndarray, rec_by_len: dict, lengths: np.ndarray,
                rng) -> list[tuple[int, int]]:
    out = []
    by_origin: dict[int, list[int]] = {}
    for c in copies.tolist():
        o = int(origin[c])
        out.append((c, o))  # near: copy and its origin
        by_origin.setdefault(o, []).append(c)
        others = rec_by_len[int(lengths[c])]
        if len(others) > 1:
            other = int(rng.choice(others))
            while other == o:
                other = int(rng.choice(others))
            out.append((c, other))  # far: copy and an unrelated record
    for cs in by_origin.values():  # medium: two copies of one origin
        out += [(cs[k], cs[k + 1]) for k in range(len(cs) - 1)]
    return out


def build_pairs(hidden: np.ndarray, roles: np.ndarray, origin: np.ndarray, lengths: np.ndarray,
                seed: int = 0) -> PairSet:
    """Training and validation pairs of one bucket (see the module docstring).

    Parameters
    ----------
    hidden : numpy.ndarray
        ``[N, Lmax, H]`` hidden states (only used for the record nearest-neighbour pairs).
    roles : numpy.ndarray
        ``[N]`` ``ROLE_*`` of each sequence: database record, edited copy used for training,
        for validation or for calibration, or a query (not used here).
    origin : numpy.ndarray
        ``[N]`` the record an edited copy was made from (ignored for others).
    lengths : numpy.ndarray
        ``[N]`` real lengths; pairs always join sequences of equal length.
    """
    rng = np.random.default_rng(seed)
    rec = np.flatnonzero(roles == ROLE_RECORD)
    if len(rec) < 2:
        raise LookupcInputError(f"need at least 2 database sequences per layer and length, got {len(rec)}")
    flat = torch.from_numpy(np.asarray(hidden[rec], dtype=np.float32).reshape(len(rec), -1))
    gen = torch.Generator().manual_seed(seed)
    proj = np.zeros((len(hidden), 32), dtype=np.float32)
    proj[rec] = (flat @ torch.randn(flat.shape[1], 32, generator=gen)).numpy()
    rec_by_len: dict[int, np.ndarray] = {}
    for n in np.unique(lengths[rec]):
        rec_by_len[int(n)] = rec[lengths[rec] == n]
    record_pairs = []
    for group in rec_by_len.values():
        record_pairs += _record_pairs(group, proj, rng)
    rp = np.asarray(record_pairs, dtype=np.int64).reshape(-1, 2)
    rp = rp[rng.permutation(len(rp))]
    n_val_rec = max(1, len(rp) // 10) if len(rp) >= 2 else 0
    train = _copy_pairs(np.flatnonzero(roles == ROLE_TRAIN), origin, rec_by_len, lengths, rng)
    val = _copy_pairs(np.flatnonzero(roles == ROLE_VAL), origin, rec_by_len, lengths, rng)
    tr = np.concatenate([np.asarray(train, dtype=np.int64).reshape(-1, 2), rp[n_val_rec:]])
    va = np.concatenate([np.asarray(val, dtype=np.int64).reshape(-1, 2), rp[:n_val_rec]])
    if len(tr) == 0 or len(va) == 0:
        raise LookupcInputError("too few sequences to make training and validation pairs; give more "
                                "calibration sequences of each length")
    return PairSet(train=tr, val=va)
