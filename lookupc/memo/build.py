"""Building an attention database: :func:`build_memo_db`.

``build_memo_db`` runs a model on calibration inputs (``lookupc.memo.capture``), records
every self-attention layer's input hidden state and attention probability matrix (APM),
trains an embedder per layer (``lookupc.memo.embed``) on pairs that include token-edited
copies of the calibration sequences, fits a calibrated map from predicted to true
similarity on held-out pairs (``lookupc.memo.calib``), measures the eq. 3 performance model
on representative queries (``alpha_inputs``, ``lookupc.memo.perf``) and writes a database
(``lookupc.memo.store``). Which modules it records is :func:`find_self_attention`'s
choice, in its order (the database's layer numbering). The build computes APMs itself from
Q/K and the mask (SDPA does not return them). ``lookupc.passes.attention_memo.apply_memo``
then puts the database to use.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from lookupc.errors import LookupcInputError, PassError
from lookupc.memo.apm import apm_context, compute_apm, real_lengths, slice_mask
from lookupc.memo.attention import PASS_NAME, find_self_attention, model_fingerprint, unwrap
from lookupc.memo.calib import SimilarityCalibration, calibration_table
from lookupc.memo.capture import CaptureBucket, CaptureRun, capture_hooks, plan_runs, run_item
from lookupc.memo.embed import EmbedConfig, train_embedder
from lookupc.memo.pairs import (
    ROLE_CALIB,
    ROLE_QUERY,
    ROLE_RECORD,
    ROLE_TRAIN,
    ROLE_VAL,
    apm_sketch,
    build_pairs,
    pair_distances,
)
from lookupc.memo.perf import LayerTiming, measure_timing
from lookupc.memo.store import BucketData, LengthGroup, MemoStore, StoreWriter, new_index

__all__ = ["build_memo_db"]


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
    runs, buckets = plan_runs(items, alpha_items, embed, say)
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
        current: dict[str, CaptureRun] = {}

        def sink(layer: int, h: Tensor, mask: Tensor | None) -> None:
            run = current["run"]
            L = run.seq_len
            seen = real_lengths(mask, h.shape[0], L)
            ok = (run.seq >= 0).nonzero().flatten()
            if not torch.equal(seen[ok], run.lengths[ok]):
                raise PassError(PASS_NAME, f"layer {layer}: the mask the attention sees gives real lengths "
                                f"{seen[ok].tolist()}, the item's attention_mask {run.lengths[ok].tolist()}")
            if len(ok) == 0:
                return
            a = compute_apm(unwrap(found[layer][1]), h[ok], slice_mask(mask, ok))
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
                got.append((h[rec_ok].clone(), slice_mask(mask, rec_ok), run.record[rec_ok].clone(),
                            run.lengths[rec_ok].clone()))

        handles = capture_hooks(found, sink)
        bar = progress_bar(total=sum(int((r.seq >= 0).sum()) for r in runs), desc="memo capture", unit="seq",
                           disable=not progress)
        try:
            with torch.no_grad():
                for run in runs:
                    current["run"] = run
                    run_item(model, run.item)
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


def _build_bucket(writer: StoreWriter, found, layer: int, bk: CaptureBucket, apm, hid: np.ndarray, sketch: np.ndarray,
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
    timing = _measure(unwrap(found[layer][1]), bucket, timing_data, timing_repeats)
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
                out[rows] = apm_context(attn, x[rows, :n], torch.from_numpy(bucket.gather(recs[rows.numpy()])), L)

    def run_overhead():  # what every call pays: real lengths, embedding, search, calibration
        with torch.no_grad():
            lengths = real_lengths(mask, nb, L)
            for n in torch.unique(lengths).tolist():
                keys = bucket.embedder(x[lengths == n, :n]).numpy()
                d2, _ = bucket.groups[n].index.search(keys, 1)
                bucket.calibration(bucket.embedder.similarity(d2[:, 0]))

    return measure_timing(run_attention, run_hit, run_overhead, nb, repeats)
