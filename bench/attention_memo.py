"""Attention memoization on all-MiniLM-L6-v2: hit rate, quality and time per preset.

The database is built on one slice of standard-library docstring sentences and
evaluated on a disjoint slice (``lookupc.textdata.docstring_sentences``), packed into
full sequences of ``--seq-lens`` tokens. For each preset it runs the memoized model
twice: ``auto`` (layers chosen by the eq. 3 performance model) and ``all`` (every
layer memoizes, to show hit rates and the quality cost even where eq. 3 says no).

Reported per configuration: hit rate per layer, cosine of the mean-pooled sentence
embedding vs the original model (mean and min), attention time (sum of time inside
the self-attention modules, including embed/search/hit path) and end-to-end time,
each for the original and the memoized model timed side by side batch by batch
(alternating order; medians of ``--repeats`` passes), because the shared machine's
load drifts too much for separately timed runs to be compared.

    python bench/attention_memo.py                 # ~3-5 min on 2 shared cores
    python bench/attention_memo.py --seq-lens 128 256 --calib-sentences 6000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lookupc.memo_data import load_encoder, pack_sentences  # noqa: E402
from lookupc.memo_embed import EmbedConfig  # noqa: E402
from lookupc.memo_perf import PRESETS  # noqa: E402
from lookupc.passes.attention_memo import (  # noqa: E402
    apply_memo,
    build_memo_db,
    find_self_attention,
    layer_profiles,
    memo_stats,
    reset_memo_stats,
)
from lookupc.textdata import docstring_sentences  # noqa: E402


def mean_pool(hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(hidden.mean(1), dim=-1)


class AttentionClock:
    """Sums wall time spent inside the self-attention modules (original or memo wrapper)."""

    def __init__(self, model: torch.nn.Module):
        self.total = 0.0
        self._t0 = 0.0
        self.handles = []
        for _, mod in find_self_attention(model):
            self.handles.append(mod.register_forward_pre_hook(self._start))
            self.handles.append(mod.register_forward_hook(self._stop))

    def _start(self, *_):
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t0

    def close(self):
        for h in self.handles:
            h.remove()


def run_eval(model, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Sentence embeddings (mean-pooled, normalised) of ``ids``."""
    with torch.no_grad():
        return mean_pool(torch.cat([model(input_ids=ids[s:s + batch]).last_hidden_state
                                    for s in range(0, len(ids), batch)]))


def run_pair(base, memo, ids: torch.Tensor, batch: int, repeats: int) -> dict:
    """Time ``base`` and ``memo`` batch by batch, alternating which goes first.

    The machine is shared and its load drifts by 2x within minutes, so the two models
    are timed side by side on each batch and compared as sums over the same batches.
    """
    clocks = {"base": AttentionClock(base), "memo": AttentionClock(memo)}
    models = {"base": base, "memo": memo}
    rows = {k: dict(e2e=[], attn=[]) for k in models}
    try:
        with torch.no_grad():
            for rep in range(repeats):
                reset_memo_stats(memo)
                e2e = dict.fromkeys(models, 0.0)
                for c in clocks.values():
                    c.total = 0.0
                for k, s in enumerate(range(0, len(ids), batch)):
                    order = ("base", "memo") if (k + rep) % 2 == 0 else ("memo", "base")
                    for name in order:
                        t0 = time.perf_counter()
                        models[name](input_ids=ids[s:s + batch])
                        e2e[name] += time.perf_counter() - t0
                for name in models:
                    rows[name]["e2e"].append(e2e[name])
                    rows[name]["attn"].append(clocks[name].total)
    finally:
        for c in clocks.values():
            c.close()
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rows.items()}
    return dict(base_e2e_s=med["base"]["e2e"], base_attention_s=med["base"]["attn"],
                e2e_s=med["memo"]["e2e"], attention_s=med["memo"]["attn"])


def _row(model, memo, ids, args, base_emb, preset, threshold, layers) -> dict:
    t = run_pair(model, memo, ids, args.batch, args.repeats)
    cos = (run_eval(memo, ids, args.batch) * base_emb).sum(-1)
    reset_memo_stats(memo)
    run_eval(memo, ids, args.batch)  # stats of exactly one pass
    stats = memo_stats(memo)
    n_layers = len(find_self_attention(model))
    per_layer = [round(stats[l].hit_rate, 3) if l in stats else None for l in range(n_layers)]
    total_hits = sum(s.hits for s in stats.values())
    return dict(preset=preset, threshold=threshold, layers=layers, memo_layers=sorted(stats),
                hit_rate_per_layer=per_layer, memo_rate=total_hits / (len(ids) * n_layers),
                cos_mean=float(cos.mean()), cos_min=float(cos.min()), **t,
                attention_speedup=t["base_attention_s"] / t["attention_s"], e2e_speedup=t["base_e2e_s"] / t["e2e_s"])


def evaluate(model, store, ids, args, repeat_ids=None) -> list[dict]:
    base_emb = run_eval(model, ids, args.batch)
    rows = []
    if repeat_ids is not None:  # best case: inputs the database holds (every lookup should hit)
        memo = apply_memo(model, store, "moderate", layers="all")
        rows.append(_row(model, memo, repeat_ids, args, run_eval(model, repeat_ids, args.batch), "db-inputs",
                         PRESETS["moderate"], "all"))
    for preset in PRESETS:
        for layers in ("auto", "all"):
            memo = apply_memo(model, store, preset, layers=layers)
            rows.append(_row(model, memo, ids, args, base_emb, preset, PRESETS[preset], layers))
    for thr in args.sweep:
        memo = apply_memo(model, store, threshold=thr, layers="all")
        rows.append(_row(model, memo, ids, args, base_emb, "sweep", thr, "all"))
    return rows


def bench_length(model, tok, seq_len: int, args, work: Path) -> dict:
    calib = pack_sentences(tok, docstring_sentences(args.calib_sentences), seq_len, args.max_calib)
    held = pack_sentences(tok, docstring_sentences(args.eval_sentences, offset=args.calib_sentences), seq_len,
                          args.max_eval)
    print(f"\n== L={seq_len}: database from {len(calib)} sequences, evaluation on {len(held)} disjoint ones",
          flush=True)
    t0 = time.perf_counter()
    store = build_memo_db(model, [{"input_ids": calib[s:s + args.batch]} for s in range(0, len(calib), args.batch)],
                          work / f"db_{seq_len}", embed=EmbedConfig(steps=args.steps, pairs=args.pairs),
                          apm_dtype=args.apm_dtype, log=lambda s: print("  " + s, flush=True))
    build_s = time.perf_counter() - t0
    db_bytes = sum(f.stat().st_size for f in store.path.iterdir())
    rows = evaluate(model, store, held, args, calib[:len(held)] if args.repeat_row else None)
    profiles = {f"{l}": dict(timing=p.timing.as_dict(), inflation=p.inflation,
                             loo_pred_mean=float(p.loo_predicted.mean()),
                             loo_true_mean=float(p.loo_true.mean()), loo_true_max=float(p.loo_true.max()),
                             **{f"alpha@{k}": p.hit_rate(v) for k, v in PRESETS.items()},
                             **{f"benefit@{k}_us": 1e6 * p.benefit(v) for k, v in PRESETS.items()})
                for (l, _), p in sorted(layer_profiles(store).items())}
    train = [dict(layer=b["layer"], **{k: b["train"][k] for k in ("seconds", "initial_loss", "final_loss",
                                                                   "initial_val_loss", "final_val_loss")},
                  loo_pred_mean=b["loo_pred_mean"], loo_true_mean=b["loo_true_mean"])
             for b in store.manifest["buckets"]]
    return dict(seq_len=seq_len, n_calib=len(calib), n_eval=len(held), build_s=build_s, db_bytes=db_bytes,
                embed_training=train,
                perf_model=profiles, results=rows)


def print_table(res: dict) -> None:
    print(f"\nL={res['seq_len']}  db {res['n_calib']} seqs ({res['db_bytes'] / 2**20:.0f} MiB, built in "
          f"{res['build_s']:.0f}s), eval {res['n_eval']} disjoint seqs; times: base -> memo, timed side by side")
    print(f"{'preset/thr':13}{'layers':7}{'hit rate per layer':34}{'memo':>6}{'cos mean':>9}{'cos min':>9}"
          f"{'attn s':>12}{'e2e s':>13}{'attn x':>7}{'e2e x':>7}")
    for r in res["results"]:
        hits = " ".join("  - " if h is None else f"{h:.2f}" for h in r["hit_rate_per_layer"])
        name = r["preset"] if r["preset"] != "sweep" else f"thr {r['threshold']:.2f}"
        name = name if r["preset"] != "db-inputs" else "db inputs*"
        print(f"{name:13}{r['layers']:7}{hits:34}{r['memo_rate']:6.2f}{r['cos_mean']:9.4f}"
              f"{r['cos_min']:9.4f}{r['base_attention_s']:6.2f}>{r['attention_s']:5.2f}"
              f"{r['base_e2e_s']:7.2f}>{r['e2e_s']:5.2f}{r['attention_speedup']:7.2f}"
              f"{r['e2e_speedup']:7.2f}")
    print("* best case: the evaluation re-runs sequences the database was built from (moderate, all layers)")
    print("perf model (eq. 3) per layer: " + "; ".join(
        f"L{l} t_attn {1e3 * p['timing']['t_attention']:.1f}ms "
        f"saved {1e3 * (p['timing']['t_attention'] - p['timing']['t_hit']):.1f}ms "
        f"ovh {1e3 * p['timing']['t_overhead']:.2f}ms "
        f"loo sim pred/true {p['loo_pred_mean']:.2f}/{p['loo_true_mean']:.2f} "
        f"(max true {p['loo_true_max']:.2f}) inflation {p['inflation']:.2f}" for l, p in res["perf_model"].items()))
    print("embedder training per layer: " + "; ".join(
        f"L{t['layer']} {t['seconds']:.1f}s {t['initial_loss']:.3f}->{t['final_loss']:.4f} "
        f"(val {t['initial_val_loss']:.3f}->{t['final_val_loss']:.4f})" for t in res["embed_training"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[128])
    ap.add_argument("--calib-sentences", type=int, default=3000)
    ap.add_argument("--eval-sentences", type=int, default=600)
    ap.add_argument("--max-calib", type=int, default=192, help="cap on database sequences per length")
    ap.add_argument("--max-eval", type=int, default=32, help="cap on evaluation sequences per length")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200, help="embedder training steps per layer")
    ap.add_argument("--pairs", type=int, default=2048, help="embedder training pairs per layer")
    ap.add_argument("--sweep", type=float, nargs="*", default=[0.6, 0.5],
                    help="extra thresholds evaluated with every layer memoizing")
    ap.add_argument("--no-repeat-row", dest="repeat_row", action="store_false",
                    help="skip the best-case row that re-runs database inputs")
    ap.add_argument("--apm-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a loaded machine)")
    ap.add_argument("--json", default="bench/results/attention_memo.json")
    ap.add_argument("--keep-db", default=None, help="directory to keep the databases in")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(1)
    model, tok = load_encoder("all-minilm-l6-v2")
    work = Path(args.keep_db) if args.keep_db else Path(tempfile.mkdtemp(prefix="lookupc-memo-bench-"))
    out = dict(model="sentence-transformers/all-MiniLM-L6-v2", threads=args.threads, batch=args.batch,
               presets=PRESETS, args=vars(args), lengths=[])
    try:
        for L in args.seq_lens:
            res = bench_length(model, tok, L, args, work)
            out["lengths"].append(res)
            print_table(res)
    finally:
        if not args.keep_db:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
