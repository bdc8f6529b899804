"""Attention memoization pass (AttMemo, Feng et al. 2023) for BERT/RoBERTa-style self-attention.

``build_memo_db`` runs a model on calibration inputs, records every self-attention
layer's input hidden state and attention probability matrix (APM), trains an
embedder per layer (``lookupc.memo.embed``) on pairs that include token-edited copies
of the calibration sequences, fits a calibrated map from predicted to true similarity
on held-out pairs (``lookupc.memo.calib``), measures the eq. 3 performance model on
representative queries (``alpha_inputs``) and writes a database
(``lookupc.memo.store``). ``apply_memo`` returns a copy of a model whose chosen
self-attention modules are wrapped by :class:`MemoSelfAttention`: per batch it embeds
the eligible sequences, finds each one's nearest stored record of the same real
length, and where the calibrated similarity (less an error margin) clears the threshold computes
``APM_stored @ V_live`` for all hits of the batch at once (V from the live value
projection; the output projection, residual and LayerNorm of the enclosing
``BertAttention`` run as usual). The other sequences take the original module, so a
layer that never hits is bit-identical to the original.

Which modules: any submodule with ``query``/``key``/``value`` ``nn.Linear`` children
and ``num_attention_heads``/``attention_head_size`` attributes that is not
cross-attention and not causal (``BertSelfAttention``, ``RobertaSelfAttention``,
``ElectraSelfAttention`` ...), in module order. In transformers 5 these call an
attention interface (eager or ``scaled_dot_product_attention``) chosen by
``config._attn_implementation``; the wrapper does not care which, because the miss
path calls the original module and the hit path never needs Q/K. The build computes
APMs itself from Q/K and the mask (SDPA does not return them).

Lengths and padding: a database has a bucket per (layer, padded length ``L``) it was
built with; a record is the ``n x n`` APM of one sequence's ``n`` real tokens. Inputs
must have a built length ``L`` (another length raises ``MemoDatabaseError``, or runs
unmemoized with ``other_lengths="original"``). Right padding is supported: a padded
sequence with ``n`` real tokens may only use a record of real length ``n`` (each
length has its own index); on a hit its real rows get ``APM @ V[:n]`` and its padding
rows (ignored downstream: every layer masks padding keys) uniform attention over the
real tokens. Masks that are not a right-padding key mask (left padding, holes, causal)
make the sequence ineligible. Packed, unpadded inputs (``lookupc.memo.data``) are the
case ``n = L``.

Order with the LookupFFN pass: either. ``apply_memo(lookupc.convert(m, ...).module, db)``
and ``lookupc.convert(apply_memo(m, db), ...)`` both work; the database fingerprint
covers only the Q/K weights, which the FFN pass does not touch.

Examples
--------
>>> db = build_memo_db(model, [{"input_ids": ids}], "/tmp/db", alpha_inputs=[{"input_ids": q}])  # doctest: +SKIP
>>> fast = apply_memo(model, "/tmp/db", preset="moderate", log=print)   # prints the per-layer plan  # doctest: +SKIP
>>> fast(input_ids=ids); memo_stats(fast)                              # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from lookupc.errors import LookupcInputError, PassError
from lookupc.memo.calib import SimilarityCalibration, calibration_table, with_margin
from lookupc.memo.data import edit_tokens, real_lengths_2d
from lookupc.memo.embed import (
    ROLE_CALIB,
    ROLE_QUERY,
    ROLE_RECORD,
    ROLE_TRAIN,
    ROLE_VAL,
    EmbedConfig,
    apm_sketch,
    build_pairs,
    pair_distances,
    train_embedder,
)
from lookupc.memo.perf import LayerProfile, LayerTiming, format_plan, measure_timing, resolve_threshold
from lookupc.memo.store import (
    BucketData,
    LengthGroup,
    MemoDatabaseError,
    MemoStore,
    ModelFingerprint,
    StoreWriter,
    hash_tensors,
    new_index,
)

__all__ = ["find_self_attention", "model_fingerprint", "build_memo_db", "apply_memo", "memo_plan", "memo_stats",
           "reset_memo_stats", "MemoSelfAttention", "LayerStats", "layer_profiles", "compute_apm",
           "apm_times_value"]

PASS_NAME = "attention_memo"


# ----------------------------------------------------------------------------- finding modules

def _is_self_attention(module: nn.Module) -> bool:
    has_proj = all(isinstance(getattr(module, n, None), nn.Linear) for n in ("query", "key", "value"))
    has_heads = hasattr(module, "num_attention_heads") and hasattr(module, "attention_head_size")
    cross = "cross" in type(module).__name__.lower() or getattr(module, "is_cross_attention", False)
    causal = bool(getattr(module, "is_causal", False)) or bool(getattr(module, "is_decoder", False))
    return has_proj and has_heads and not cross and not causal


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
        elif _is_self_attention(mod):
            found.append((name, mod))
    return found


def _unwrap(mod: nn.Module) -> nn.Module:
    return mod.inner if isinstance(mod, MemoSelfAttention) else mod


def model_fingerprint(model: nn.Module, found: list[tuple[str, nn.Module]] | None = None) -> ModelFingerprint:
    """The fingerprint a database built for ``model`` carries (see ``ModelFingerprint``)."""
    found = find_self_attention(model) if found is None else found
    if not found:
        raise PassError(PASS_NAME, f"no BERT-style self-attention module found in {type(model).__name__}")
    first = _unwrap(found[0][1])
    cfg = getattr(model, "config", None)
    model_id = str(getattr(cfg, "_name_or_path", "") or "") or type(model).__name__
    tensors = []
    for _, m in found:
        m = _unwrap(m)
        for lin in (m.query, m.key):
            tensors.append(lin.weight)
            if lin.bias is not None:
                tensors.append(lin.bias)
    return ModelFingerprint(model_id=model_id, num_layers=len(found), hidden_size=first.query.in_features,
                            num_heads=int(first.num_attention_heads), qk_hash=hash_tensors(tensors))


# ----------------------------------------------------------------------------- attention math

def _real_lengths(mask: Tensor | None, batch: int, seq_len: int) -> Tensor:
    """``[batch]`` real lengths from the mask a self-attention module receives; -1 where the mask
    is not "every query sees exactly the first n keys" (left padding, holes, causal)."""
    if mask is None:
        return torch.full((batch,), seq_len, dtype=torch.long)
    if mask.dim() == 2:
        return real_lengths_2d(mask, batch, seq_len)
    vis = mask if mask.dtype == torch.bool else mask == 0
    vis = vis.reshape(vis.shape[0], -1, vis.shape[-2], vis.shape[-1])
    kv = vis[:, 0, 0, :]
    same = (vis == kv[:, None, None, :]).flatten(1).all(1)
    n = kv.sum(1)
    prefix = (kv == (torch.arange(kv.shape[-1])[None, :] < n[:, None])).all(1)
    out = torch.where(same & prefix & (kv.shape[-1] == seq_len), n, torch.full_like(n, -1))
    return out.expand(batch).clone() if out.shape[0] == 1 else out


def _tracing() -> bool:
    """True under torch.export / torch.compile: the lookup is host-side Python (faiss, memmap),
    so traced graphs get the original attention (this is what lets the LookupFFN pass,
    which exports the model, run on a memoized model)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _take(x: Tensor, rows: Tensor, n: int) -> Tensor:
    """``x[rows, :n]``, without a copy when ``rows`` is the whole batch in order."""
    if len(rows) == x.shape[0] and bool((rows == torch.arange(len(rows))).all()):
        return x[:, :n]
    return x[rows, :n]


def _slice_mask(mask: Tensor | None, rows: Tensor) -> Tensor | None:
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[rows]


def compute_apm(attn: nn.Module, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T * scaling + mask) ``[B, heads, L, L]`` of a BERT-style self-attention module."""
    b, L, _ = hidden.shape
    heads, dh = attn.num_attention_heads, attn.attention_head_size
    q = attn.query(hidden).view(b, L, heads, dh).transpose(1, 2)
    k = attn.key(hidden).view(b, L, heads, dh).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * getattr(attn, "scaling", dh ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1)


def apm_times_value(attn: nn.Module, hidden: Tensor, apm: Tensor) -> Tensor:
    """The hit path for one unpadded sequence: ``(APM @ V)`` reshaped to ``[L, heads * dh]``."""
    L = hidden.shape[-2]
    v = attn.value(hidden).view(L, attn.num_attention_heads, attn.attention_head_size).transpose(0, 1)
    return torch.matmul(apm.to(v.dtype), v).transpose(0, 1).reshape(L, -1)


def _context(attn: nn.Module, hidden: Tensor, apm: Tensor, seq_len: int) -> Tensor:
    """Hit path for ``k`` sequences of real length ``n``: hidden ``[k, n, H]``, APMs ``[k, heads, n, n]``
    -> ``[k, seq_len, heads * dh]``; padding rows get uniform attention over the ``n`` real tokens."""
    k, n = hidden.shape[0], hidden.shape[1]
    heads, dh = attn.num_attention_heads, attn.attention_head_size
    v = attn.value(hidden).view(k, n, heads, dh).transpose(1, 2)
    ctx = torch.matmul(apm.to(v.dtype), v).transpose(1, 2).reshape(k, n, heads * dh)
    if n == seq_len:
        return ctx
    pad = v.mean(2).reshape(k, 1, heads * dh).expand(k, seq_len - n, heads * dh)
    return torch.cat([ctx, pad], 1)


# ----------------------------------------------------------------------------- the wrapper

@dataclass
class LayerStats:
    """Counts of one wrapped layer, in sequences (a miss includes "no record of this real length")."""

    hits: int = 0
    misses: int = 0
    ineligible: int = 0
    seconds_overhead: float = 0.0
    last_records: list[tuple[int, int, float]] = field(default_factory=list)  # (batch row, record, calibrated sim)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses + self.ineligible
        return self.hits / total if total else 0.0


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
                 margins: Mapping[int, float] | None = None):
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
        self.train(inner.training)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, threshold={self.threshold}, lengths={sorted(self.buckets)}, margins={self.margins}"

    def _original(self, hidden_states, attention_mask, args, kwargs):
        return self.inner(hidden_states, attention_mask, *args, **kwargs)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs: Any):
        b, L = hidden_states.shape[0], hidden_states.shape[1]
        cached = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if (self.training or args or cached or _tracing() or kwargs.get("encoder_hidden_states") is not None):
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
        lengths = _real_lengths(attention_mask, b, L)
        hits = self._lookup(bucket, hidden_states, lengths)  # [(n, rows, records, sims)]
        n_hits = sum(len(h[1]) for h in hits)
        eligible = int((lengths > 0).sum())
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
            out[miss] = self._original(hidden_states[miss], _slice_mask(attention_mask, miss), args, kwargs)[0]
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
                keys = bucket.embedder(_take(hidden_states, rows, n).float()).numpy()
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
            return _context(self.inner, _take(hidden_states, rows, n), apm, seq_len)
        return torch.cat([_context(self.inner, hidden_states[r:r + 1, :n], torch.from_numpy(bucket.apm(rec))[None],
                                   seq_len) for r, rec in zip(rows.tolist(), records.tolist())])


def memo_stats(model: nn.Module) -> dict[int, LayerStats]:
    """Per-layer ``LayerStats`` of every memoizing layer in ``model`` (by layer index)."""
    return {m.layer: m.stats for m in model.modules() if isinstance(m, MemoSelfAttention)}


def reset_memo_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, MemoSelfAttention):
            m.stats = LayerStats()


# ----------------------------------------------------------------------------- building

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


def _capture_hooks(found, sink: Callable[[int, Tensor, Tensor | None], None]) -> list:
    handles = []
    for layer, (_, mod) in enumerate(found):
        def hook(module, args, kwargs, layer=layer):
            hidden = args[0] if args else kwargs["hidden_states"]
            sink(layer, hidden, kwargs.get("attention_mask", args[1] if len(args) > 1 else None))
        handles.append(_unwrap(mod).register_forward_pre_hook(hook, with_kwargs=True))
    return handles


def _run_item(model: nn.Module, item: Any) -> None:
    if isinstance(item, Mapping):
        model(**item)
    elif isinstance(item, Tensor):
        model(item)
    else:
        model(*item)


def layer_profiles(store: MemoStore, margin_quantile: float | None = 0.9) -> dict[tuple[int, int], LayerProfile]:
    """The eq. 3 performance model of each (layer, length) bucket, as measured at build time."""
    return {key: LayerProfile(b.layer, b.seq_len, LayerTiming(**b.info["timing"]), b.calibration,
                              b.alpha_predicted, b.alpha_true, b.info.get("alpha_source", ""),
                              b.margin(margin_quantile))
            for key, b in store.buckets.items()}


@dataclass
class _Run:
    """One forward pass of the capture: an item and, per row, its sequence index in its length bucket."""

    item: Any
    seq_len: int
    seq: Tensor        # [B] sequence index in the bucket, -1 = skip the row
    record: Tensor     # [B] record index (-1 for copies and queries)
    lengths: Tensor    # [B] real lengths


@dataclass
class _Bucket:
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


def _plan_runs(items, alpha_items, embed: EmbedConfig, say) -> tuple[list[_Run], dict[int, _Bucket]]:
    """Which sequences the capture runs: records, edited copies (with roles) and alpha queries."""
    buckets: dict[int, _Bucket] = {}
    runs: list[_Run] = []
    rec_rows: dict[int, list[tuple[int, int, int, int]]] = {}  # L -> (item, row, seq, n)
    for i, item in enumerate(items):
        t = _lead_tensor(item)
        if t.dim() < 2:
            raise LookupcInputError(f"calibration item {i}: leading tensor must be [batch, L], got {tuple(t.shape)}")
        L = int(t.shape[1])
        bk = buckets.setdefault(L, _Bucket(L))
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
        runs.append(_Run(item, L, seq, rec, lens))
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
        runs.append(_Run(item, L, seq, torch.full_like(seq, -1), lens))
    return runs, buckets


def _copy_runs(items, rec_rows, buckets, embed: EmbedConfig, say) -> list[_Run]:
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
                    runs.append(_Run(_with_ids(items[i], rows_t, edited), L, seq, torch.full_like(seq, -1), lens))
    return runs


def build_memo_db(model: nn.Module, calibration_inputs: Iterable[Any], out_dir: str | os.PathLike, *,
                  embed: EmbedConfig = EmbedConfig(), alpha_inputs: Iterable[Any] | None = None,
                  apm_dtype: str = "float32", overwrite: bool = False, timing_batch: int = 8,
                  timing_repeats: int = 7, hnsw_m: int = 32, log: Callable[[str], None] | None = None,
                  progress: bool = True) -> MemoStore:
    """Build an attention database for ``model`` from calibration inputs and open it.

    Parameters
    ----------
    model : nn.Module
        A model with BERT-style self-attention (not modified; run in eval mode, no grad).
    calibration_inputs : iterable
        The database content. Items as ``model`` takes them: dicts of keyword args
        (``{"input_ids": .., "attention_mask": ..}``), tuples of positional args, or tensors.
        Each item's leading tensor is ``[batch, L]``; items of different ``L`` make different
        buckets. A 2-d ``attention_mask`` with right padding makes records of the real length;
        other padding is skipped. Items with ``input_ids`` also get token-edited copies
        (``embed.edit_rates``) for training and calibration; the copies are not stored.
    out_dir : path
        Where the database goes (written to a temp dir first, renamed at the end).
    embed : EmbedConfig
        Embedder size, training data (edited copies) and training budget.
    alpha_inputs : iterable, optional
        Representative queries (the traffic the database is for), same form as
        ``calibration_inputs``: the eq. 3 hit rate alpha of each layer is measured on them.
        Default: the held-out edited copies (near-duplicate traffic).
    apm_dtype : {"float32", "float16"}
        APM storage type (float32 allows zero-copy hits).
    overwrite : bool
        Replace an existing database.
    timing_batch, timing_repeats : int
        Sequences and repeats for the perf-model timings.
    hnsw_m : int
        HNSW graph degree (for length groups of more than ``memo_store.FLAT_MAX`` records).
    log : callable, optional
        Receives report lines (training per layer, calibration table, alpha).
    progress : bool
        Show progress of the capture and of each embedder's training on stderr.

    Returns
    -------
    MemoStore
        The finished, reopened database. ``store.manifest["buckets"][i]`` holds the training
        report (``train``: held-out loss before/after, steps, why it stopped), the calibration
        report (``calibration``: predicted vs true similarity on fitted and held-out pairs),
        the timing and the alpha source.
    """
    from lookupc.progress import progress as progress_bar

    say = log or (lambda s: None)
    items = list(calibration_inputs)
    alpha_items = list(alpha_inputs) if alpha_inputs is not None else []
    if not items:
        raise LookupcInputError("calibration_inputs is empty: give at least one batch")
    found = find_self_attention(model)
    fp = model_fingerprint(model, found)
    heads, hidden = fp.num_heads, fp.hidden_size
    runs, buckets = _plan_runs(items, alpha_items, embed, say)
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    R = embed.target_rows
    with StoreWriter(out_dir, apm_dtype=apm_dtype, overwrite=overwrite) as writer:
        apms, hids, sketches, lmax = {}, {}, {}, {}
        for L, bk in buckets.items():
            lmax[L] = max(bk.lengths)
            for layer in range(len(found)):
                apms[(layer, L)] = writer.apm_array(layer, L, np.asarray(bk.rec_lengths), heads)
                hids[(layer, L)] = writer.scratch_array(f"hidden_l{layer}_s{L}", (len(bk.roles), lmax[L], hidden))
                sketches[(layer, L)] = writer.scratch_array(f"sketch_l{layer}_s{L}",
                                                            (len(bk.roles), heads, R, lmax[L]))
        timing_data: dict[tuple[int, int], list] = {}
        current: dict[str, _Run] = {}

        def sink(layer: int, h: Tensor, mask: Tensor | None) -> None:
            run = current["run"]
            L = run.seq_len
            seen = _real_lengths(mask, h.shape[0], L)
            ok = (run.seq >= 0).nonzero().flatten()
            if not torch.equal(seen[ok], run.lengths[ok]):
                raise PassError(PASS_NAME, f"layer {layer}: the mask the attention sees gives real lengths "
                                f"{seen[ok].tolist()}, the item's attention_mask {run.lengths[ok].tolist()}")
            if len(ok) == 0:
                return
            a = compute_apm(_unwrap(found[layer][1]), h[ok], _slice_mask(mask, ok))
            seq = run.seq[ok].numpy()
            lens = run.lengths[ok].tolist()
            hids[(layer, L)][seq] = h[ok, :lmax[L]].float().numpy()
            sketches[(layer, L)][seq] = apm_sketch(a, lens, R, lmax[L]).numpy()
            flat, offsets = apms[(layer, L)]
            for k, (rec, n) in enumerate(zip(run.record[ok].tolist(), lens)):
                if rec >= 0:
                    flat[offsets[rec]:offsets[rec] + heads * n * n] = a[k, :, :n, :n].reshape(-1).numpy()
            got = timing_data.setdefault((layer, L), [])
            if run.record[ok][0] >= 0 and sum(len(x[0]) for x in got) < timing_batch:
                rec_ok = ok[run.record[ok] >= 0]
                got.append((h[rec_ok].clone(), _slice_mask(mask, rec_ok), run.record[rec_ok].clone(),
                            run.lengths[rec_ok].clone()))

        handles = _capture_hooks(found, sink)
        bar = progress_bar(total=sum(int((r.seq >= 0).sum()) for r in runs), desc="memo capture", unit="seq",
                           disable=not progress)
        try:
            with torch.no_grad():
                for run in runs:
                    current["run"] = run
                    _run_item(model, run.item)
                    bar.update(int((run.seq >= 0).sum()))
        finally:
            bar.close()
            for h in handles:
                h.remove()
            model.train(was_training)
        n_copies = sum(r in (ROLE_TRAIN, ROLE_VAL, ROLE_CALIB) for bk in buckets.values() for r in bk.roles)
        say(f"captured {sum(len(bk.rec_lengths) for bk in buckets.values())} records, {n_copies} edited copies, "
            f"{sum(r == ROLE_QUERY for bk in buckets.values() for r in bk.roles)} alpha queries x "
            f"{len(found)} layers in {time.perf_counter() - t_start:.1f}s")
        for L, bk in buckets.items():
            for layer in range(len(found)):
                info = _build_bucket(writer, found, layer, bk, apms[(layer, L)], hids[(layer, L)],
                                     sketches[(layer, L)], timing_data.get((layer, L), []), embed, hnsw_m,
                                     timing_repeats, heads, progress)
                _report_bucket(say, layer, L, info)
        writer.finalize(fp, embed_config=embed.as_dict(), extra={"build_seconds": time.perf_counter() - t_start})
    return MemoStore.open(out_dir)


def _nearest(embedder, groups: dict[int, LengthGroup], hidden: np.ndarray, lengths: np.ndarray, idx: np.ndarray,
             k: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Predicted similarity ``[len(idx), k]`` and record ``[len(idx), k]`` (-1: none) of each sequence's nearest
    records of its real length."""
    sims = np.full((len(idx), k), -np.inf)
    recs = np.full((len(idx), k), -1, dtype=np.int64)
    for n in np.unique(lengths[idx]).tolist():
        group = groups.get(int(n))
        if group is None:
            continue
        sel = np.flatnonzero(lengths[idx] == n)
        for s in range(0, len(sel), 64):
            part = sel[s:s + 64]
            with torch.no_grad():
                keys = embedder(torch.from_numpy(np.asarray(hidden[idx[part], :n], dtype=np.float32))).numpy()
            d2, nn_ = group.index.search(np.ascontiguousarray(keys), k)
            ok = nn_ >= 0
            sims[part] = np.where(ok, embedder.similarity(d2), -np.inf)
            recs[part] = np.where(ok, group.ids[np.maximum(nn_, 0)], -1)
    return sims, recs


def _true_similarity(sketch: np.ndarray, lengths: np.ndarray, seq_of_record: np.ndarray, idx: np.ndarray,
                     recs: np.ndarray) -> np.ndarray:
    out = np.full(len(idx), np.nan)
    ok = recs >= 0
    if ok.any():
        pairs = np.stack([idx[ok], seq_of_record[recs[ok]]], 1)
        out[ok] = 1.0 - pair_distances(sketch, pairs, lengths)
    return out


def _build_bucket(writer: StoreWriter, found, layer: int, bk: _Bucket, apm, hid: np.ndarray, sketch: np.ndarray,
                  timing_data: list, embed: EmbedConfig, hnsw_m: int, timing_repeats: int, heads: int,
                  show_progress: bool) -> dict:
    L = bk.seq_len
    roles, origin, lengths = np.asarray(bk.roles), np.asarray(bk.origin), np.asarray(bk.lengths)
    rec_seq = np.flatnonzero(roles == ROLE_RECORD)  # record id -> sequence index
    rec_len = lengths[rec_seq]
    pairs = build_pairs(hid, roles, origin, lengths, seed=embed.seed + layer)
    embedder, report = train_embedder(hid, sketch, lengths, pairs, embed, fit_idx=rec_seq,
                                      desc=f"embed layer {layer} L={L}", show_progress=show_progress)
    groups, indexes = {}, {}
    for n in np.unique(rec_len).tolist():
        ids = np.flatnonzero(rec_len == n)
        with torch.no_grad():
            keys = torch.cat([embedder(torch.from_numpy(np.asarray(hid[rec_seq[ids[s:s + 64]], :n], np.float32)))
                              for s in range(0, len(ids), 64)]).numpy()
        index = new_index(keys.shape[1], len(ids), hnsw_m)
        index.add(np.ascontiguousarray(keys, dtype=np.float32))
        groups[n], indexes[n] = LengthGroup(n, ids, index), index

    # calibration: held-out copies against their nearest record (as live), records leave-one-out
    def probe(idx):
        sims, recs = _nearest(embedder, groups, hid, lengths, idx)
        return sims[:, 0], recs[:, 0], _true_similarity(sketch, lengths, rec_seq, idx, recs[:, 0])

    loo_s, loo_r = _nearest(embedder, groups, hid, lengths, rec_seq, k=2)
    self_first = loo_r[:, 0] == np.arange(len(rec_seq))
    loo_pred = np.where(self_first, loo_s[:, 1], loo_s[:, 0])
    loo_rec = np.where(self_first, loo_r[:, 1], loo_r[:, 0])
    loo_true = _true_similarity(sketch, lengths, rec_seq, rec_seq, loo_rec)
    cal_p, _, cal_t = probe(np.flatnonzero(roles == ROLE_CALIB))
    val_p, _, val_t = probe(np.flatnonzero(roles == ROLE_VAL))
    fit_p = np.concatenate([cal_p, loo_pred[0::2]])
    fit_t = np.concatenate([cal_t, loo_true[0::2]])
    ok = np.isfinite(fit_p) & np.isfinite(fit_t)
    calibration = SimilarityCalibration.fit(fit_p[ok], fit_t[ok]) if ok.any() else SimilarityCalibration.identity()
    held_p = np.concatenate([val_p, loo_pred[1::2]])
    held_t = np.concatenate([val_t, loo_true[1::2]])
    hok = np.isfinite(held_p) & np.isfinite(held_t)
    calib_report = dict(
        fitted=calibration_table(fit_p[ok], fit_t[ok], calibration),
        held_out=calibration_table(held_p[hok], held_t[hok], calibration),
        near_fitted=calibration_table(cal_p[np.isfinite(cal_t)], cal_t[np.isfinite(cal_t)], calibration),
        near_held_out=calibration_table(val_p[np.isfinite(val_t)], val_t[np.isfinite(val_t)], calibration),
        knots=len(calibration.knots_x))

    # alpha: representative queries (alpha_inputs) or the held-out edited copies
    queries = np.flatnonzero(roles == ROLE_QUERY)
    if len(queries):
        source = "alpha_inputs"
        a_pred, _, a_true = probe(queries)
    else:
        held = np.flatnonzero((roles == ROLE_VAL) | (roles == ROLE_CALIB))
        if len(held):
            source = f"held-out edited copies ({', '.join(f'{r:.0%}' for r in embed.edit_rates)} tokens replaced)"
            a_pred, _, a_true = probe(held)
        else:
            source = "database records, leave-one-out"
            a_pred, a_true = loo_pred, loo_true
    bucket = BucketData(layer, L, len(rec_seq), heads, rec_len, apm[1], apm[0], embedder, groups, calibration,
                        a_pred, a_true, {})
    timing = _measure(_unwrap(found[layer][1]), bucket, timing_data, timing_repeats)
    info = dict(train=report.as_dict(), timing=timing.as_dict(), calibration=calib_report, alpha_source=source,
                n_copies=int(np.isin(roles, (ROLE_TRAIN, ROLE_VAL, ROLE_CALIB)).sum()), n_alpha=int(len(a_pred)))
    if np.isfinite(val_t).any():  # the error margin is read off held-out near pairs
        h_pred, h_true = val_p, val_t
    else:
        h_pred, h_true = loo_pred[1::2], loo_true[1::2]
    meta = dict(calibration.to_arrays(), alpha_predicted=np.asarray(a_pred, np.float64),
                alpha_true=np.asarray(a_true, np.float64), heldout_predicted=np.asarray(h_pred, np.float64),
                heldout_true=np.asarray(h_true, np.float64))
    writer.add_bucket(layer, L, heads, rec_len, embedder, indexes, meta, info)
    return info


def _report_bucket(say, layer: int, L: int, info: dict) -> None:
    tr, cal = info["train"], info["calibration"]
    say(f"layer {layer} L={L}: embedder {tr['seconds']:.1f}s {tr['steps']} steps ({tr['stopped']}, best "
        f"{tr['best_step']}), held-out loss {tr['initial_val_loss']:.3g} -> {tr['final_val_loss']:.3g} "
        f"({100 * tr['val_reduction']:.0f}% lower); train loss {tr['initial_loss']:.3g} -> {tr['final_loss']:.3g}")
    for name in ("fitted", "held_out"):
        t = cal[name]
        if not t["n"]:
            continue
        bins = "  ".join(f"[{b['n']}] {b['predicted']:.3f}->{b['calibrated']:.3f}/{b['true']:.3f}" for b in t["bins"])
        say(f"  calibration {name:8}: {t['n']} pairs, |pred-true| {t['mae_raw']:.3f} -> |calibrated-true| "
            f"{t['mae']:.3f}; bins [n] predicted->calibrated/true: {bins}")


def _measure(attn: nn.Module, bucket: BucketData, data: list, repeats: int) -> LayerTiming:
    if not data:
        raise PassError(PASS_NAME, f"layer {bucket.layer} L={bucket.seq_len}: no record batch to time")
    x = torch.cat([d[0] for d in data])
    masks = [d[1] for d in data]
    mask = None if masks[0] is None else torch.cat([m.expand(len(d[0]), *m.shape[1:]) for m, d in zip(masks, data)])
    recs = torch.cat([d[2] for d in data]).numpy()
    lens = torch.cat([d[3] for d in data])
    nb, L = x.shape[0], x.shape[1]
    by_len = [(n, (lens == n).nonzero().flatten()) for n in torch.unique(lens).tolist()]

    def run_attention():
        with torch.no_grad():
            attn(x, attention_mask=mask)

    def run_hit():
        with torch.no_grad():
            out = torch.empty(nb, L, attn.value.out_features)
            for n, rows in by_len:
                out[rows] = _context(attn, x[rows, :n], torch.from_numpy(bucket.gather(recs[rows.numpy()])), L)

    def run_overhead():  # what every call pays: real lengths, embedding, search, calibration
        with torch.no_grad():
            lengths = _real_lengths(mask, nb, L)
            for n in torch.unique(lengths).tolist():
                keys = bucket.embedder(x[lengths == n, :n]).numpy()
                d2, _ = bucket.groups[n].index.search(keys, 1)
                bucket.calibration(bucket.embedder.similarity(d2[:, 0]))

    return measure_timing(run_attention, run_hit, run_overhead, nb, repeats)


# ----------------------------------------------------------------------------- applying

def _chosen(profiles: dict[tuple[int, int], LayerProfile], thr: float, layers, n_layers: int) -> set:
    if layers == "auto":
        return {key for key, p in profiles.items() if p.worth_it(thr)}
    if layers == "all":
        return set(profiles)
    if isinstance(layers, str):
        raise LookupcInputError(f"layers must be 'auto', 'all' or layer indices, got {layers!r}")
    wanted = {int(x) for x in layers}
    bad = sorted(x for x in wanted if not 0 <= x < n_layers)
    if bad:
        raise LookupcInputError(f"layers {bad} out of range: the model has {n_layers} self-attention layers")
    return {key for key in profiles if key[0] in wanted}


def memo_plan(db: MemoStore | str | os.PathLike, preset: str | float = "moderate", *, layers="auto",
              threshold: float | None = None, margin_quantile: float | None = 0.9) -> list[dict]:
    """Per (layer, length) bucket: the eq. 3 figures at the threshold and whether it memoizes.

    Each row is :meth:`LayerProfile.decision` plus ``forced`` (chosen by ``layers`` rather
    than eq. 3). ``lookupc.memo.perf.format_plan(rows, threshold)`` prints them.
    """
    store = db if isinstance(db, MemoStore) else MemoStore.open(db)
    thr = resolve_threshold(preset if threshold is None else threshold)
    profiles = layer_profiles(store, margin_quantile)
    chosen = _chosen(profiles, thr, layers, store.fingerprint.num_layers)
    rows = []
    for key in sorted(profiles):
        row = profiles[key].decision(thr)
        row["forced"] = layers != "auto" and key in chosen
        row["auto"] = layers == "auto"
        row["enabled"] = key in chosen
        rows.append(row)
    return rows


def apply_memo(model: nn.Module, db: MemoStore | str | os.PathLike, preset: str | float = "moderate", *,
               layers: str | Iterable[int] = "auto", threshold: float | None = None,
               margin_quantile: float | None = 0.9, other_lengths: str = "error",
               log: Callable[[str], None] | None = None) -> nn.Module:
    """A memoizing copy of ``model`` (``model`` itself is never modified).

    Parameters
    ----------
    model : nn.Module
        Model with BERT-style self-attention; may already be LookupFFN-converted, or memoized
        (its wrappers are replaced).
    db : MemoStore or path
        A database from ``build_memo_db`` for this model; a mismatched or damaged one raises
        ``MemoDatabaseError`` naming the problem.
    preset : {"conservative", "moderate", "aggressive"} or float
        Threshold on the calibrated similarity (``lookupc.memo.perf.PRESETS``); ``1.0`` disables
        every hit.
    layers : "auto", "all" or iterable of int
        "auto": only (layer, length) buckets whose eq. 3 saving at the threshold is positive,
        with alpha measured on the database's representative queries; "all": every layer;
        or explicit layer indices.
    threshold : float, optional
        Overrides ``preset``.
    margin_quantile : float or None
        A record is used when its calibrated similarity minus an error margin clears the
        threshold; the margin is this quantile of (calibrated - true) similarity on the
        build's held-out near pairs, so about this fraction of hits truly clear it
        (``lookupc.memo.calib.error_margin``). ``None``: no margin.
    other_lengths : {"error", "original"}
        What a wrapped layer does with an input whose padded length the database was not
        built for: raise ``MemoDatabaseError`` (default) or run the original attention.
    log : callable, optional
        Receives the plan: per layer T_attn, T_hit, T_overhead, alpha, expected saving, decision.

    Returns
    -------
    nn.Module
        The copy; ``memo_stats(copy)`` gives per-layer hits and misses.
    """
    if other_lengths not in ("error", "original"):
        raise LookupcInputError(f"other_lengths must be 'error' or 'original', got {other_lengths!r}")
    store = db if isinstance(db, MemoStore) else MemoStore.open(db)
    found = find_self_attention(model)
    store.check(model_fingerprint(model, found))
    thr = resolve_threshold(preset if threshold is None else threshold)
    rows = memo_plan(store, threshold=thr, layers=layers, margin_quantile=margin_quantile)
    if log is not None:
        log(format_plan(rows, thr))
    enabled: dict[int, dict[int, BucketData]] = {}
    margins: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["enabled"]:
            enabled.setdefault(r["layer"], {})[r["seq_len"]] = store.bucket(r["layer"], r["seq_len"])
            margins.setdefault(r["layer"], {})[r["seq_len"]] = r["margin"]
    out = copy.deepcopy(model)
    for layer, (name, _) in enumerate(find_self_attention(out)):
        mod = out.get_submodule(name)
        if layer not in enabled:
            if isinstance(mod, MemoSelfAttention):
                _set_submodule(out, name, mod.inner)
            continue
        _set_submodule(out, name, MemoSelfAttention(_unwrap(mod), layer, store, thr, enabled[layer], other_lengths,
                                                    margins[layer]))
    return out


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
