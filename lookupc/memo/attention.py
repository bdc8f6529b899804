"""The memoizing self-attention module (:class:`MemoSelfAttention`) and which modules it wraps.

Per batch, a wrapped layer embeds the eligible sequences, finds each one's nearest stored
record of the same real length, and where the calibrated similarity (less an error margin)
clears the threshold computes ``APM_stored @ V_live`` for all hits of the batch at once (V
from the live value projection; the output projection, residual and LayerNorm of the
enclosing ``BertAttention`` run as usual). The other sequences take the original module, so
a layer that never hits is bit-identical to the original.

Which modules (:func:`find_self_attention`): any submodule with ``query``/``key``/``value``
``nn.Linear`` children and ``num_attention_heads``/``attention_head_size`` attributes that
is not cross-attention and not causal (``BertSelfAttention``, ``RobertaSelfAttention``,
``ElectraSelfAttention`` ...), in module order; a database numbers its layers in this
order. In transformers 5 these call an attention interface (eager or
``scaled_dot_product_attention``) chosen by ``config._attn_implementation``; the wrapper
does not care which, because the miss path calls the original module and the hit path
never needs Q/K.

Lengths and padding: a database has a bucket per (layer, padded length ``L``) it was built
with; a record is the ``n x n`` APM of one sequence's ``n`` real tokens. Inputs must have a
built length ``L`` (another length raises ``MemoDatabaseError``, or runs unmemoized with
``other_lengths="original"``). Right padding is supported: a padded sequence with ``n`` real
tokens may only use a record of real length ``n`` (each length has its own index); on a hit
its real rows get ``APM @ V[:n]`` and its padding rows (ignored downstream: every layer
masks padding keys) uniform attention over the real tokens. Masks that are not a
right-padding key mask (left padding, holes, causal) make the sequence ineligible. Packed,
unpadded inputs (``lookupc.memo.data``) are the case ``n = L``.

Backoff (online eq. 3): a lookup pays only if the layer's hit rate clears its break-even
``alpha* = T_overhead / (T_attn - T_hit)`` (the plan's timings). Each wrapped bucket keeps
the hit rate of its last ``BACKOFF_WINDOW`` looked-up sequences; when it falls below
``alpha*`` the layer stops looking up for 1, 2, 4 ... up to ``BACKOFF_MAX`` calls
(those sequences run the original module and count as ``skipped``), then probes one
batch; a probe that hits enough resets the wait. On traffic unlike the database
(disjoint text) the lookups, and their cost, stop after a few batches; on near duplicates
nothing changes. ``apply_memo(..., adaptive=False)`` looks up every call.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lookupc.errors import PassError
from lookupc.memo.apm import apm_context, is_tracing, real_lengths, slice_mask, take_rows
from lookupc.memo.calib import with_margin
from lookupc.memo.store import BucketData, MemoDatabaseError, MemoStore, ModelFingerprint, hash_tensors

__all__ = ["PASS_NAME", "find_self_attention", "rejected_attention", "self_attention_rejection", "unwrap", "Backoff",
           "model_fingerprint", "LayerStats", "MemoSelfAttention", "memo_stats", "reset_memo_stats"]

#: the name errors of the memoization pass and of the database build carry
PASS_NAME = "attention_memo"

_QKV = ("query", "key", "value")


# ----------------------------------------------------------------------------- finding modules

def self_attention_rejection(module: nn.Module) -> str | None:
    """Why ``module`` is not a memoizable self-attention, or ``None`` when it is one."""
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in _QKV):
        return "no query/key/value nn.Linear children"
    if not (hasattr(module, "num_attention_heads") and hasattr(module, "attention_head_size")):
        return "no num_attention_heads/attention_head_size attributes"
    if "cross" in type(module).__name__.lower() or getattr(module, "is_cross_attention", False):
        return "cross-attention (keys and values of another sequence)"
    if bool(getattr(module, "is_causal", False)) or bool(getattr(module, "is_decoder", False)):
        return "causal (decoder) attention"
    return None


def find_self_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every memoizable self-attention, in module order.

    Already wrapped modules are returned as their ``MemoSelfAttention`` wrapper.
    Returns ``[]`` when nothing matches (not an error).
    """
    found, inside = [], set()
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(mod, MemoSelfAttention):
            found.append((name, mod))
            inside.add(name)
        elif self_attention_rejection(mod) is None:
            found.append((name, mod))
    return found


def rejected_attention(model: nn.Module) -> list[tuple[str, str]]:
    """``(qualified name, reason)`` of every module with query/key/value ``nn.Linear`` children
    that :func:`find_self_attention` does not match (cross-attention, causal ...)."""
    out = []
    for name, mod in model.named_modules():
        if all(isinstance(getattr(mod, n, None), nn.Linear) for n in _QKV):
            reason = self_attention_rejection(mod)
            if reason is not None:
                out.append((name, reason))
    return out


def unwrap(mod: nn.Module) -> nn.Module:
    """The original module of a ``MemoSelfAttention`` (any other module as is)."""
    return mod.inner if isinstance(mod, MemoSelfAttention) else mod


def model_fingerprint(model: nn.Module, found: list[tuple[str, nn.Module]] | None = None) -> ModelFingerprint:
    """The fingerprint a database built for ``model`` carries (see ``ModelFingerprint``)."""
    found = find_self_attention(model) if found is None else found
    if not found:
        raise PassError(PASS_NAME, f"no BERT-style self-attention module found in {type(model).__name__}")
    first = unwrap(found[0][1])
    cfg = getattr(model, "config", None)
    model_id = str(getattr(cfg, "_name_or_path", "") or "") or type(model).__name__
    tensors = []
    for _, m in found:
        m = unwrap(m)
        for lin in (m.query, m.key):
            tensors.append(lin.weight)
            if lin.bias is not None:
                tensors.append(lin.bias)
    return ModelFingerprint(model_id=model_id, num_layers=len(found), hidden_size=first.query.in_features,
                            num_heads=int(first.num_attention_heads), qk_hash=hash_tensors(tensors))


# ----------------------------------------------------------------------------- the wrapper

@dataclass
class LayerStats:
    """Counts of one wrapped layer, in sequences (a miss includes "no record of this real length";
    ``skipped``: eligible sequences not looked up because the layer was backing off)."""

    hits: int = 0
    misses: int = 0
    ineligible: int = 0
    skipped: int = 0
    seconds_overhead: float = 0.0
    last_records: list[tuple[int, int, float]] = field(default_factory=list)  # (batch row, record, calibrated sim)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses + self.ineligible + self.skipped
        return self.hits / total if total else 0.0


BACKOFF_WINDOW = 16  # sequences whose hit rate decides whether lookups pay
BACKOFF_MAX = 64  # longest run of calls without a lookup before the next probe


@dataclass
class Backoff:
    """Online eq. 3 for one bucket: skip lookups while the recent hit rate is below
    ``break_even`` (see the module docstring)."""

    break_even: float
    recent: deque = field(default_factory=deque)  # (looked-up sequences, hits) per call
    skip: int = 0  # calls left without a lookup
    wait: int = 1  # length of the next skip run

    def should_skip(self) -> bool:
        if self.skip > 0:
            self.skip -= 1
            return True
        return False

    def record(self, looked_up: int, hits: int) -> None:
        if looked_up <= 0:
            return
        self.recent.append((looked_up, hits))
        while sum(n for n, _ in self.recent) - self.recent[0][0] >= BACKOFF_WINDOW:
            self.recent.popleft()
        seen = sum(n for n, _ in self.recent)
        rate = sum(h for _, h in self.recent) / seen
        if rate >= self.break_even:
            self.wait = 1
        elif seen >= BACKOFF_WINDOW:  # enough evidence (or a failed probe): skip, then probe
            self.skip, self.wait = self.wait, min(2 * self.wait, BACKOFF_MAX)


class MemoSelfAttention(nn.Module):
    """A self-attention module that reuses stored APMs on a hit (see module docstring).

    Same call signature and return value ``(attn_output, attn_weights)`` as the
    wrapped module. On a memo path ``attn_weights`` is ``None``; training mode,
    caches, cross-attention inputs and export/compile tracing always take the
    original path. ``batched=False`` serves hits one sequence at a time from zero-copy
    views of the store (the reference the batched path is tested against).
    """

    def __init__(self, inner: nn.Module, layer: int, store: MemoStore, threshold: float,
                 buckets: Mapping[int, BucketData], other_lengths: str = "error",
                 margins: Mapping[int, float] | None = None,
                 break_even: Mapping[int, float] | None = None):
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.store = store
        self.threshold = float(threshold)
        self.buckets = dict(buckets)  # padded length -> bucket
        self.margins = {int(k): float(v) for k, v in (margins or {}).items()}  # padded length -> error margin
        self.other_lengths = other_lengths
        self.batched = True
        self.stats = LayerStats()
        # padded length -> break-even hit rate; None: look up on every call
        self.break_even = None if break_even is None else {int(k): float(v) for k, v in break_even.items()}
        self.reset_backoff()
        self.train(inner.training)

    def reset_backoff(self) -> None:
        """Forget the observed hit rates (a new kind of traffic)."""
        self.backoff = {L: Backoff(be) for L, be in (self.break_even or {}).items()}

    def extra_repr(self) -> str:
        return f"layer={self.layer}, threshold={self.threshold}, lengths={sorted(self.buckets)}, margins={self.margins}"

    def _original(self, hidden_states, attention_mask, args, kwargs):
        return self.inner(hidden_states, attention_mask, *args, **kwargs)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs: Any):
        b, L = hidden_states.shape[0], hidden_states.shape[1]
        cached = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if (self.training or args or cached or is_tracing() or kwargs.get("encoder_hidden_states") is not None):
            self.stats.ineligible += b
            return self._original(hidden_states, attention_mask, args, kwargs)
        bucket = self.buckets.get(L)
        if bucket is None:
            if self.other_lengths == "error" and L not in self.store.seq_lens:
                raise MemoDatabaseError(
                    f"attention database {str(self.store.path)!r} was built for sequence lengths "
                    f"{self.store.seq_lens}, this input has length {L}: pad or pack inputs to a built length, "
                    "or apply_memo(..., other_lengths='original') to run other lengths unmemoized")
            self.stats.ineligible += b
            return self._original(hidden_states, attention_mask, args, kwargs)
        t0 = time.perf_counter()
        lengths = real_lengths(attention_mask, b, L)
        eligible = int((lengths > 0).sum())
        backoff = self.backoff.get(L)
        if backoff is not None and backoff.should_skip():
            self.stats.skipped += eligible
            self.stats.ineligible += b - eligible
            return self._original(hidden_states, attention_mask, args, kwargs)
        hits = self._lookup(bucket, hidden_states, lengths)  # [(n, rows, records, sims)]
        n_hits = sum(len(h[1]) for h in hits)
        if backoff is not None:
            backoff.record(eligible, n_hits)
        self.stats.seconds_overhead += time.perf_counter() - t0
        self.stats.hits += n_hits
        self.stats.misses += eligible - n_hits
        self.stats.ineligible += b - eligible
        self.stats.last_records = sorted((int(r), int(rec), float(s)) for _, rows, recs, sims in hits
                                         for r, rec, s in zip(rows.tolist(), recs.tolist(), sims.tolist()))
        if not n_hits:
            return self._original(hidden_states, attention_mask, args, kwargs)
        out = torch.empty(b, L, self.inner.value.out_features, dtype=hidden_states.dtype,
                          device=hidden_states.device)
        is_hit = torch.zeros(b, dtype=torch.bool)
        for _, rows, _, _ in hits:
            is_hit[rows] = True
        miss = (~is_hit).nonzero().flatten()
        if len(miss):
            out[miss] = self._original(hidden_states[miss], slice_mask(attention_mask, miss), args, kwargs)[0]
        for n, rows, recs, _ in hits:
            if len(rows) == b:
                out = self._serve(bucket, hidden_states, rows, recs, n, L)
            else:
                out[rows] = self._serve(bucket, hidden_states, rows, recs, n, L)
        return out, None

    def _lookup(self, bucket: BucketData, hidden_states: Tensor, lengths: Tensor) -> list:
        if self.threshold >= 1.0:
            return []
        found = []
        for n in torch.unique(lengths).tolist():
            group = bucket.groups.get(int(n)) if n > 0 else None
            if group is None:
                continue
            rows = (lengths == n).nonzero().flatten()
            with torch.no_grad():
                keys = bucket.embedder(take_rows(hidden_states, rows, n).float()).numpy()
            dist2, idx = group.index.search(np.ascontiguousarray(keys, dtype=np.float32), 1)
            sims = np.asarray(bucket.calibration(bucket.embedder.similarity(dist2[:, 0])))
            sims = with_margin(sims, self.margins.get(bucket.seq_len, 0.0))
            hit = (sims > self.threshold) & (idx[:, 0] >= 0)
            if hit.any():
                found.append((int(n), rows[torch.from_numpy(hit)], group.ids[idx[hit, 0]], sims[hit]))
        return found

    def _serve(self, bucket: BucketData, hidden_states: Tensor, rows: Tensor, records: np.ndarray, n: int,
               seq_len: int) -> Tensor:
        if self.batched:  # every hit of this length at once: one gather from the store, one matmul
            apm = torch.from_numpy(bucket.gather(records))
            return apm_context(self.inner, take_rows(hidden_states, rows, n), apm, seq_len)
        return torch.cat([apm_context(self.inner, hidden_states[r:r + 1, :n],
                                      torch.from_numpy(bucket.apm(rec))[None], seq_len)
                          for r, rec in zip(rows.tolist(), records.tolist())])


def memo_stats(model: nn.Module) -> dict[int, LayerStats]:
    """Per-layer ``LayerStats`` of every memoizing layer in ``model`` (by layer index)."""
    return {m.layer: m.stats for m in model.modules() if isinstance(m, MemoSelfAttention)}


def reset_memo_stats(model: nn.Module) -> None:
    """Zero the ``LayerStats`` and forget the backoff state of every memoizing layer in ``model``."""
    for m in model.modules():
        if isinstance(m, MemoSelfAttention):
            m.stats = LayerStats()
            m.reset_backoff()
