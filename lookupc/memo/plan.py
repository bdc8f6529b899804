"""Which (layer, length) buckets of a database to memoize: the eq. 3 plan.

:func:`layer_profiles` reads the performance model measured at build time out of a store;
:func:`memo_plan` decides, per bucket, at a similarity threshold, whether it pays off
(``layers="auto"``) or applies an explicit choice (``"all"`` or layer indices). The
memoization pass (``lookupc.passes.attention_memo``) wraps the layers the plan enables.
"""

from __future__ import annotations

import os

from lookupc.errors import LookupcInputError
from lookupc.memo.perf import LayerProfile, LayerTiming, resolve_threshold
from lookupc.memo.store import MemoStore

__all__ = ["layer_profiles", "choose_buckets", "memo_plan"]


def layer_profiles(store: MemoStore, margin_quantile: float | None = 0.9) -> dict[tuple[int, int], LayerProfile]:
    """The eq. 3 performance model of each (layer, length) bucket, as measured at build time."""
    return {key: LayerProfile(b.layer, b.seq_len, LayerTiming(**b.info["timing"]), b.calibration,
                              b.alpha_predicted, b.alpha_true, b.info.get("alpha_source", ""),
                              b.margin(margin_quantile))
            for key, b in store.buckets.items()}


def choose_buckets(profiles: dict[tuple[int, int], LayerProfile], thr: float, layers, n_layers: int) -> set:
    """The ``(layer, length)`` keys of ``profiles`` that ``layers`` ("auto", "all" or indices) enables."""
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
    chosen = choose_buckets(profiles, thr, layers, store.fingerprint.num_layers)
    rows = []
    for key in sorted(profiles):
        row = profiles[key].decision(thr)
        row["forced"] = layers != "auto" and key in chosen
        row["auto"] = layers == "auto"
        row["enabled"] = key in chosen
        rows.append(row)
    return rows
