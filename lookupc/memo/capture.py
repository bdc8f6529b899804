"""What the database build runs through the model: the capture plan and its hooks.

A build runs the model once per item over three kinds of sequences, each numbered in the
bucket of its padded length ``L`` (:class:`CaptureBucket`): the calibration sequences
(``ROLE_RECORD``: the records stored), token-edited copies of them (train / validation /
calibration roles, by origin: all copies of one record share a role) for the embedder's
near-pair training, and the representative queries (``ROLE_QUERY``, ``alpha_inputs``) the
eq. 3 hit rate is measured on. :func:`plan_runs` lists the forward passes
(:class:`CaptureRun`); :func:`capture_hooks` hands each self-attention layer's input to a
sink while they run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from lookupc.errors import LookupcInputError
from lookupc.memo.attention import unwrap
from lookupc.memo.data import edit_tokens, real_lengths_2d
from lookupc.memo.embed import EmbedConfig
from lookupc.memo.pairs import ROLE_CALIB, ROLE_QUERY, ROLE_RECORD, ROLE_TRAIN, ROLE_VAL

__all__ = ["CaptureRun", "CaptureBucket", "plan_runs", "capture_hooks", "run_item"]


def _lead_tensor(item: Any) -> Tensor:
    if isinstance(item, Tensor):
        return item
    values = list(item.values()) if isinstance(item, Mapping) else list(item)
    if isinstance(item, Mapping):
        for key in ("input_ids", "inputs_embeds"):
            if isinstance(item.get(key), Tensor):
                return item[key]
    for v in values:
        if isinstance(v, Tensor):
            return v
    raise LookupcInputError(f"calibration item {type(item).__name__} holds no tensor")


def _item_lengths(item: Any, t: Tensor) -> Tensor:
    mask = item.get("attention_mask") if isinstance(item, Mapping) else None
    if isinstance(mask, Tensor) and mask.dim() != 2:
        raise LookupcInputError(f"attention_mask of a calibration item must be [batch, L], got {tuple(mask.shape)}")
    return real_lengths_2d(mask, int(t.shape[0]), int(t.shape[1]))


def _input_ids(item: Any) -> Tensor | None:
    if isinstance(item, Tensor) and not item.is_floating_point():
        return item
    if isinstance(item, Mapping) and isinstance(item.get("input_ids"), Tensor):
        return item["input_ids"]
    return None


def _with_ids(item: Any, rows: Tensor, ids: Tensor) -> Any:
    """``item`` restricted to ``rows``, with ``input_ids`` replaced by ``ids`` (already restricted)."""
    if isinstance(item, Tensor):
        return ids
    b = int(item["input_ids"].shape[0])
    out = {k: (v[rows] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == b else v)
           for k, v in item.items()}
    out["input_ids"] = ids
    return out


def capture_hooks(found, sink: Callable[[int, Tensor, Tensor | None], None]) -> list:
    """Forward pre-hooks on the ``found`` self-attentions calling ``sink(layer, hidden, mask)``."""
    handles = []
    for layer, (_, mod) in enumerate(found):
        def hook(module, args, kwargs, layer=layer):
            hidden = args[0] if args else kwargs["hidden_states"]
            sink(layer, hidden, kwargs.get("attention_mask", args[1] if len(args) > 1 else None))
        handles.append(unwrap(mod).register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def run_item(model: nn.Module, item: Any) -> None:
    """``model`` on one calibration item (keyword dict, positional tuple or tensor)."""
    if isinstance(item, Mapping):
        model(**item)
    elif isinstance(item, Tensor):
        model(item)
    else:
        model(*item)


@dataclass
class CaptureRun:
    """One forward pass of the capture: an item and, per row, its sequence index in its length bucket."""

    item: Any
    seq_len: int
    seq: Tensor        # [B] sequence index in the bucket, -1 = skip the row
    record: Tensor     # [B] record index (-1 for copies and queries)
    lengths: Tensor    # [B] real lengths


@dataclass
class CaptureBucket:
    """Everything captured for one padded length (all layers)."""

    seq_len: int
    roles: list = field(default_factory=list)
    origin: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    rec_lengths: list = field(default_factory=list)

    def add(self, role: int, origin: int, n: int) -> int:
        self.roles.append(role)
        self.origin.append(origin)
        self.lengths.append(n)
        if role == ROLE_RECORD:
            self.rec_lengths.append(n)
        return len(self.roles) - 1


def plan_runs(items, alpha_items, embed: EmbedConfig, say) -> tuple[list[CaptureRun], dict[int, CaptureBucket]]:
    """Which sequences the capture runs: records, edited copies (with roles) and alpha queries."""
    buckets: dict[int, CaptureBucket] = {}
    runs: list[CaptureRun] = []
    rec_rows: dict[int, list[tuple[int, int, int, int]]] = {}  # L -> (item, row, seq, n)
    for i, item in enumerate(items):
        t = _lead_tensor(item)
        if t.dim() < 2:
            raise LookupcInputError(f"calibration item {i}: leading tensor must be [batch, L], got {tuple(t.shape)}")
        L = int(t.shape[1])
        bk = buckets.setdefault(L, CaptureBucket(L))
        lens = _item_lengths(item, t)
        seq = torch.full((len(lens),), -1, dtype=torch.long)
        rec = torch.full((len(lens),), -1, dtype=torch.long)
        for r, n in enumerate(lens.tolist()):
            if n >= 1:
                rec[r] = len(bk.rec_lengths)
                seq[r] = bk.add(ROLE_RECORD, -1, n)
                seq_idx = int(seq[r])
                bk.origin[seq_idx] = seq_idx
                rec_rows.setdefault(L, []).append((i, r, seq_idx, n))
        runs.append(CaptureRun(item, L, seq, rec, lens))
    for L, bk in buckets.items():
        if len(bk.rec_lengths) < 2:
            raise LookupcInputError(f"length {L}: only {len(bk.rec_lengths)} usable calibration sequences "
                                    "(unpadded or right-padded); need >= 2")
    if embed.edit_rates:
        runs += _copy_runs(items, rec_rows, buckets, embed, say)
    for i, item in enumerate(alpha_items):
        t = _lead_tensor(item)
        L = int(t.shape[1]) if t.dim() >= 2 else -1
        if L not in buckets:
            say(f"alpha input {i}: length {L} has no calibration data; ignored")
            continue
        lens = _item_lengths(item, t)
        seq = torch.tensor([buckets[L].add(ROLE_QUERY, -1, n) if n >= 1 else -1 for n in lens.tolist()])
        runs.append(CaptureRun(item, L, seq, torch.full_like(seq, -1), lens))
    return runs, buckets


def _copy_runs(items, rec_rows, buckets, embed: EmbedConfig, say) -> list[CaptureRun]:
    rng = np.random.default_rng(embed.seed)
    gen = torch.Generator().manual_seed(embed.seed)
    runs = []
    for L, rows in rec_rows.items():
        usable = [x for x in rows if _input_ids(items[x[0]]) is not None and x[3] >= 3]
        if not usable:
            say(f"length {L}: calibration items carry no input_ids; no edited copies (no near-pair training)")
            continue
        pool = torch.cat([_input_ids(items[i])[r, 1:n - 1] for i, r, _, n in usable])
        per_record = len(embed.edit_rates) * embed.copies_per_rate
        chosen = rng.permutation(len(usable))[:max(1, embed.max_copies // per_record)]
        chosen = sorted(chosen.tolist())
        # roles by origin: all copies of one record share a role, so held-out copies are of unseen records
        n_val = max(1, round(embed.val_fraction * len(chosen)))
        n_cal = round(embed.calib_fraction * len(chosen))
        order = rng.permutation(len(chosen))
        role_of = {}
        for k, c in enumerate(order.tolist()):
            role_of[chosen[c]] = ROLE_VAL if k < n_val else ROLE_CALIB if k < n_val + n_cal else ROLE_TRAIN
        by_item: dict[int, list[tuple[int, int, int, int]]] = {}
        for c in chosen:
            i, r, s, n = usable[c]
            by_item.setdefault(i, []).append((r, s, n, role_of[c]))
        bk = buckets[L]
        for i, entries in sorted(by_item.items()):
            ids = _input_ids(items[i])
            rows_t = torch.tensor([e[0] for e in entries])
            lens = torch.tensor([e[2] for e in entries])
            for rate in embed.edit_rates:
                for _ in range(embed.copies_per_rate):
                    edited = edit_tokens(ids[rows_t], rate, gen, pool, lengths=lens)
                    seq = torch.tensor([bk.add(role, s, n) for _, s, n, role in entries])
                    runs.append(CaptureRun(_with_ids(items[i], rows_t, edited), L, seq, torch.full_like(seq, -1), lens))
    return runs
