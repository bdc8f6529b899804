"""Attention memoization pass (AttMemo, Feng et al. 2023) for BERT/RoBERTa-style self-attention.

``build_memo_db`` runs a model on calibration inputs, records every self-attention
layer's input hidden state and attention probability matrix (APM), trains a small
embedder per layer (``lookupc.memo_embed``) and writes a database
(``lookupc.memo_store``). ``apply_memo`` returns a copy of a model whose chosen
self-attention modules are wrapped by :class:`MemoSelfAttention`: per sequence it
embeds the hidden state, finds the nearest stored record, and if the predicted
similarity, corrected by an error factor measured leave-one-out at build time, clears
the threshold (``lookupc.memo_perf``) computes ``APM_stored @ V_live`` (V from the live
value projection; the output projection, residual and LayerNorm of the enclosing
``BertAttention`` run as usual). Otherwise the original module runs unchanged, so a
layer that never hits is bit-identical to the original.

Which modules: any submodule with ``query``/``key``/``value`` ``nn.Linear`` children
and ``num_attention_heads``/``attention_head_size`` attributes that is not
cross-attention and not causal (``BertSelfAttention``, ``RobertaSelfAttention``,
``ElectraSelfAttention`` ...), in module order. In transformers 5 these call an
attention interface (eager or ``scaled_dot_product_attention``) chosen by
``config._attn_implementation``; the wrapper does not care which, because the miss
path calls the original module and the hit path never needs Q/K. The build computes
APMs itself from Q/K and the mask (SDPA does not return them).

Lengths: **length buckets, no padding**. A record is an APM of one exact padded
length L; a database holds buckets for the lengths it was built with (e.g. 128 and
256), each with its own embedder and index. A live sequence is eligible only if its
length has a bucket and its attention mask has no padding (all keys visible):
an APM spreads probability over exactly L key positions, so reusing it for a
sequence with a different number of real tokens would attend to padding or drop
real tokens. Padded sequences and other lengths always take the normal path
(counted as ``ineligible``). Pack inputs to full buckets (``lookupc.memo_data``).

Order with the LookupFFN pass: either. ``apply_memo(lookupc.convert(m, ...).module, db)``
and ``lookupc.convert(apply_memo(m, db), ...)`` both work; the database fingerprint
covers only the Q/K weights, which the FFN pass does not touch.

Examples
--------
>>> db = build_memo_db(model, [{"input_ids": ids}], "/tmp/db")        # doctest: +SKIP
>>> fast = apply_memo(model, "/tmp/db", preset="moderate")             # doctest: +SKIP
>>> fast(input_ids=ids); memo_stats(fast)                              # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from lookupc.errors import LookupcInputError, PassError
from lookupc.memo_embed import EmbedConfig, apm_distance, train_embedder
from lookupc.memo_perf import LayerProfile, LayerTiming, measure_timing, resolve_threshold
from lookupc.memo_store import MemoStore, ModelFingerprint, StoreWriter, hash_tensors, new_index

__all__ = ["find_self_attention", "model_fingerprint", "build_memo_db", "apply_memo", "memo_stats",
           "reset_memo_stats", "MemoSelfAttention", "LayerStats", "layer_profiles"]

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

def _unpadded(mask: Tensor | None, batch: int) -> Tensor:
    """[batch] bool: sequences whose mask lets every query see every key."""
    if mask is None:
        return torch.ones(batch, dtype=torch.bool)
    flat = mask.reshape(mask.shape[0], -1)
    ok = flat.all(1) if mask.dtype == torch.bool else (flat == 0).all(1)
    return ok.expand(batch) if ok.shape[0] == 1 else ok


def _tracing() -> bool:
    """True under torch.export / torch.compile: the lookup is host-side Python (faiss, memmap),
    so traced graphs get the original attention (this is what lets the LookupFFN pass,
    which exports the model, run on a memoized model)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


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
    """The hit path for one sequence: ``(APM @ V)`` reshaped to ``[L, heads * dh]`` like the original."""
    L = hidden.shape[-2]
    v = attn.value(hidden).view(L, attn.num_attention_heads, attn.attention_head_size).transpose(0, 1)
    return torch.matmul(apm.to(v.dtype), v).transpose(0, 1).reshape(L, -1)


# ----------------------------------------------------------------------------- the wrapper

@dataclass
class LayerStats:
    """Counts of one wrapped layer, in sequences."""

    hits: int = 0
    misses: int = 0
    ineligible: int = 0
    seconds_overhead: float = 0.0
    last_records: list[tuple[int, int, float]] = field(default_factory=list)  # (batch row, record, predicted)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses + self.ineligible
        return self.hits / total if total else 0.0


class MemoSelfAttention(nn.Module):
    """A self-attention module that reuses stored APMs on a hit (see module docstring).

    Same call signature and return value ``(attn_output, attn_weights)`` as the
    wrapped module. On a memo path ``attn_weights`` is ``None``; training mode,
    caches, cross-attention inputs and export/compile tracing always take the
    original path.
    """

    def __init__(self, inner: nn.Module, layer: int, store: MemoStore, threshold: float,
                 inflation: Mapping[int, float]):
        super().__init__()
        self.inner = inner
        self.layer = layer
        self.store = store
        self.threshold = float(threshold)
        self.inflation = {int(k): float(v) for k, v in inflation.items()}  # seq_len -> distance inflation
        self.stats = LayerStats()
        self.train(inner.training)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, threshold={self.threshold}, inflation={self.inflation}"

    def _original(self, hidden_states, attention_mask, past_key_values, kwargs):
        return self.inner(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, past_key_values=None,
                **kwargs: Any):
        b, L = hidden_states.shape[0], hidden_states.shape[1]
        bucket = self.store.bucket(self.layer, L) if L in self.inflation else None
        if (bucket is None or self.training or past_key_values is not None or _tracing()
                or kwargs.get("encoder_hidden_states") is not None):
            self.stats.ineligible += b
            return self._original(hidden_states, attention_mask, past_key_values, kwargs)
        t0 = time.perf_counter()
        eligible = _unpadded(attention_mask, b).nonzero().flatten()
        self.stats.ineligible += b - len(eligible)
        hit_rows, records, preds = self._lookup(bucket, hidden_states, eligible, self.inflation[L])
        self.stats.seconds_overhead += time.perf_counter() - t0
        self.stats.hits += len(hit_rows)
        self.stats.misses += len(eligible) - len(hit_rows)
        self.stats.last_records = list(zip(hit_rows, records, preds))
        if not hit_rows:
            return self._original(hidden_states, attention_mask, past_key_values, kwargs)
        out = torch.empty(*hidden_states.shape[:2], self.inner.all_head_size if hasattr(self.inner, "all_head_size")
                          else self.inner.value.out_features, dtype=hidden_states.dtype, device=hidden_states.device)
        hit_set = set(hit_rows)
        miss = torch.tensor([i for i in range(b) if i not in hit_set], dtype=torch.long)
        if len(miss):
            out[miss] = self._original(hidden_states[miss], _slice_mask(attention_mask, miss), None, kwargs)[0]
        for row, rec in zip(hit_rows, records):
            apm = torch.from_numpy(bucket.apm(rec))  # zero-copy view of the mapped record (float32 store)
            out[row] = apm_times_value(self.inner, hidden_states[row], apm)
        return out, None

    def _lookup(self, bucket, hidden_states: Tensor, eligible: Tensor, inflation: float
                ) -> tuple[list[int], list[int], list[float]]:
        if len(eligible) == 0 or self.threshold >= 1.0:
            return [], [], []
        with torch.no_grad():
            keys = bucket.embedder(hidden_states[eligible].float()).numpy()
        dist2, idx = bucket.index.search(np.ascontiguousarray(keys, dtype=np.float32), 1)
        pred = 1.0 - np.sqrt(np.maximum(dist2[:, 0], 0.0))
        hit = (1.0 - inflation * (1.0 - pred) > self.threshold) & (idx[:, 0] >= 0)
        rows = eligible[torch.from_numpy(hit)].tolist()
        return rows, idx[hit, 0].tolist(), pred[hit].tolist()


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
    return {key: LayerProfile(b.layer, b.seq_len, LayerTiming(**b.info["timing"]), b.loo[0], b.loo[1],
                              margin_quantile)
            for key, b in store.buckets.items()}


def build_memo_db(model: nn.Module, calibration_inputs: Iterable[Any], out_dir: str | os.PathLike, *,
                  embed: EmbedConfig = EmbedConfig(), apm_dtype: str = "float32", overwrite: bool = False,
                  timing_batch: int = 4, timing_repeats: int = 3, hnsw_m: int = 32,
                  log: Callable[[str], None] | None = None) -> MemoStore:
    """Build an attention database for ``model`` from calibration inputs and open it.

    Parameters
    ----------
    model : nn.Module
        A model with BERT-style self-attention (not modified; run in eval mode, no grad).
    calibration_inputs : iterable
        Items as ``model`` takes them: dicts of keyword args (``{"input_ids": ..}``), tuples
        of positional args, or tensors. Each item's leading tensor is ``[batch, L]``; items of
        different ``L`` make different length buckets. Padded sequences are skipped.
    out_dir : path
        Where the database goes (written to a temp dir first, renamed at the end).
    embed : EmbedConfig
        Embedder size and training options.
    apm_dtype : {"float32", "float16"}
        APM storage type (float32 allows zero-copy hits).
    overwrite : bool
        Replace an existing database.
    timing_batch, timing_repeats : int
        Sequences and repeats for the perf-model timings.
    hnsw_m : int
        HNSW graph degree.
    log : callable, optional
        Receives progress lines.

    Returns
    -------
    MemoStore
        The finished, reopened database. ``store.manifest["buckets"][i]["train"]`` holds
        the embedder training report (seconds, loss before/after).
    """
    say = log or (lambda s: None)
    items = list(calibration_inputs)
    if not items:
        raise LookupcInputError("calibration_inputs is empty: give at least one batch")
    found = find_self_attention(model)
    fp = model_fingerprint(model, found)
    heads, hidden = fp.num_heads, fp.hidden_size
    sizes: dict[int, int] = {}
    for i, item in enumerate(items):
        t = _lead_tensor(item)
        if t.dim() < 2:
            raise LookupcInputError(f"calibration item {i}: leading tensor must be [batch, L], got {tuple(t.shape)}")
        sizes[int(t.shape[1])] = sizes.get(int(t.shape[1]), 0) + int(t.shape[0])
    was_training = model.training
    model.eval()
    t_start = time.perf_counter()
    with StoreWriter(out_dir, apm_dtype=apm_dtype, overwrite=overwrite) as writer:
        apms = {(l, L): writer.apm_array(l, L, n, heads) for L, n in sizes.items() for l in range(len(found))}
        hids = {(l, L): writer.scratch_array(f"hidden_l{l}_s{L}", (n, L, hidden))
                for L, n in sizes.items() for l in range(len(found))}
        fill = {key: 0 for key in apms}

        def sink(layer: int, h: Tensor, mask: Tensor | None) -> None:
            ok = _unpadded(mask, h.shape[0]).nonzero().flatten()
            key = (layer, h.shape[1])
            if key not in apms or len(ok) == 0:
                return
            a = compute_apm(_unwrap(found[layer][1]), h[ok], _slice_mask(mask, ok))
            s = fill[key]
            apms[key][s:s + len(ok)] = a.numpy()
            hids[key][s:s + len(ok)] = h[ok].float().numpy()
            fill[key] = s + len(ok)

        handles = _capture_hooks(found, sink)
        try:
            with torch.no_grad():
                for i, item in enumerate(items):
                    _run_item(model, item)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        say(f"captured {sum(sizes.values())} sequences x {len(found)} layers in {time.perf_counter() - t_start:.1f}s")
        for (layer, L), arr in apms.items():
            n = fill[(layer, L)]
            if n < 2:
                raise LookupcInputError(f"length {L}: only {n} unpadded calibration sequences; need >= 2")
            info = _build_bucket(writer, found, layer, L, arr[:n], hids[(layer, L)][:n], embed, hnsw_m,
                                 timing_batch, timing_repeats)
            say(f"layer {layer} L={L}: n={n} train {info['train']['seconds']:.1f}s loss "
                f"{info['train']['initial_loss']:.4f}->{info['train']['final_loss']:.4f} "
                f"loo pred/true sim {info['loo_pred_mean']:.3f}/{info['loo_true_mean']:.3f}")
        writer.finalize(fp, embed_config=asdict(embed), extra={"build_seconds": time.perf_counter() - t_start})
    return MemoStore.open(out_dir)


def _build_bucket(writer: StoreWriter, found, layer: int, L: int, apm: np.ndarray, hid: np.ndarray,
                  embed: EmbedConfig, hnsw_m: int, timing_batch: int, timing_repeats: int) -> dict:
    n = apm.shape[0]
    embedder, report = train_embedder(hid, apm, embed)
    x = torch.from_numpy(np.ascontiguousarray(hid))
    with torch.no_grad():
        keys = torch.cat([embedder(x[s:s + 64]) for s in range(0, n, 64)]).numpy()
    index = new_index(keys.shape[1], hnsw_m)
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    loo = _leave_one_out(index, keys, apm)
    timing = _measure(_unwrap(found[layer][1]), embedder, index, apm, x[:timing_batch], timing_repeats)
    info = dict(train=report.as_dict(), timing=timing.as_dict(), loo_pred_mean=float(loo[0].mean()),
                loo_true_mean=float(loo[1].mean()))
    writer.add_bucket(layer, L, n, apm.shape[1], index, embedder, loo, info)
    return info


def _leave_one_out(index, keys: np.ndarray, apm: np.ndarray) -> np.ndarray:
    """[2, N]: predicted similarity to the nearest other record, and its true eq. 1 similarity."""
    dist2, idx = index.search(np.ascontiguousarray(keys, dtype=np.float32), 2)
    n = len(keys)
    self_first = idx[:, 0] == np.arange(n)
    nn_idx = np.where(self_first, idx[:, 1], idx[:, 0])
    nn_d2 = np.where(self_first, dist2[:, 1], dist2[:, 0])
    nn_idx = np.where(nn_idx < 0, (np.arange(n) + 1) % n, nn_idx)
    pred = 1.0 - np.sqrt(np.maximum(nn_d2, 0.0))
    true = np.empty(n, dtype=np.float32)
    for s in range(0, n, 32):
        a = torch.from_numpy(np.asarray(apm[s:s + 32]))
        b = torch.from_numpy(np.asarray(apm[nn_idx[s:s + 32]]))
        true[s:s + 32] = 1.0 - apm_distance(a, b).numpy()
    return np.stack([pred.astype(np.float32), true])


def _measure(attn: nn.Module, embedder, index, apm: np.ndarray, x: Tensor, repeats: int) -> LayerTiming:
    nb = x.shape[0]

    def run_attention():
        with torch.no_grad():
            attn(x)

    def run_hit():
        with torch.no_grad():
            for i in range(nb):
                apm_times_value(attn, x[i], torch.from_numpy(np.asarray(apm[i])))

    def run_overhead():
        with torch.no_grad():
            index.search(embedder(x).numpy(), 1)

    return measure_timing(run_attention, run_hit, run_overhead, nb, repeats)


# ----------------------------------------------------------------------------- applying

def apply_memo(model: nn.Module, db: MemoStore | str | os.PathLike, preset: str | float = "moderate", *,
               layers: str | Iterable[int] = "auto", threshold: float | None = None,
               margin_quantile: float | None = 0.9) -> nn.Module:
    """A memoizing copy of ``model`` (``model`` itself is never modified).

    Parameters
    ----------
    model : nn.Module
        Model with BERT-style self-attention; may already be LookupFFN-converted, or memoized
        (its wrappers are replaced).
    db : MemoStore or path
        A database from ``build_memo_db`` for this model; a mismatched one raises
        ``MemoDatabaseError`` naming the difference.
    preset : {"conservative", "moderate", "aggressive"} or float
        Similarity threshold (``lookupc.memo_perf.PRESETS``); ``1.0`` disables every hit.
    layers : "auto", "all" or iterable of int
        "auto": only (layer, length) buckets whose eq. 3 benefit at the threshold is positive;
        "all": every layer with a bucket; or explicit layer indices.
    threshold : float, optional
        Overrides ``preset``.
    margin_quantile : float or None
        A hit needs ``1 - inflation * (1 - predicted) > threshold`` where ``inflation`` is this
        quantile of the embedder's leave-one-out distance ratio true/predicted on the calibration
        set (``LayerProfile.inflation``), so roughly this fraction of hits truly clear the
        threshold. ``None``: no correction.

    Returns
    -------
    nn.Module
        The copy; ``memo_stats(copy)`` gives per-layer hits and misses.
    """
    store = db if isinstance(db, MemoStore) else MemoStore.open(db)
    found = find_self_attention(model)
    store.check(model_fingerprint(model, found))
    thr = resolve_threshold(preset if threshold is None else threshold)
    profiles = layer_profiles(store, margin_quantile)
    enabled = _enabled_buckets(profiles, thr, layers, len(found))
    out = copy.deepcopy(model)
    for layer, (name, _) in enumerate(find_self_attention(out)):
        lens = enabled.get(layer, set())
        inflation = {L: profiles[(layer, L)].inflation for L in lens}
        if not lens:
            if isinstance(out.get_submodule(name), MemoSelfAttention):
                _set_submodule(out, name, out.get_submodule(name).inner)
            continue
        wrapper = MemoSelfAttention(_unwrap(out.get_submodule(name)), layer, store, thr, inflation)
        _set_submodule(out, name, wrapper)
    return out


def _enabled_buckets(profiles: dict[tuple[int, int], LayerProfile], thr: float, layers,
                     n_layers: int) -> dict[int, set[int]]:
    if layers == "auto":
        chosen = [(l, L) for (l, L), p in profiles.items() if p.worth_it(thr)]
    elif layers == "all":
        chosen = list(profiles)
    elif isinstance(layers, str):
        raise LookupcInputError(f"layers must be 'auto', 'all' or layer indices, got {layers!r}")
    else:
        wanted = {int(l) for l in layers}
        bad = sorted(l for l in wanted if not 0 <= l < n_layers)
        if bad:
            raise LookupcInputError(f"layers {bad} out of range: the model has {n_layers} self-attention layers")
        chosen = [(l, L) for (l, L) in profiles if l in wanted]
    enabled: dict[int, set[int]] = {}
    for l, L in chosen:
        enabled.setdefault(l, set()).add(L)
    return enabled


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
