"""Attention memoization on the traffic it is made for: near-duplicates, plus disjoint text.

Near-duplicate workload (all-MiniLM-L6-v2, packed ``--seq-len`` tokens): the database is
built from ``--db-seqs`` packed standard-library docstring sequences with the defaults
(embedder trained on token-edited copies, calibrated, alpha from held-out copies); the
queries are the database sequences with 2%, 5%, 10%, 20% of their tokens replaced
(another seed, replacement tokens drawn from a disjoint slice of text), and a disjoint
slice of text. For each preset with automatic layer selection (eq. 3) it reports the hit
rate per layer, the cosine of the mean-pooled sentence embedding vs the unmemoized
model (mean and min), and attention and end-to-end speed ratios. Base and memoized
model run in one process, batch by batch in alternating order, ``--repeats`` rounds
(median of the per-round sums), because the shared machine's load drifts too much for
separately timed runs to be compared.

The disjoint workload is a stream of ``--disjoint-seqs`` sequences (default 256), long
enough that the per-layer backoff reaches its steady state (it stops looking up on
traffic that does not hit, probing now and then).

Paper setting (``--paper``): short sentences, one per sequence, right-padded to 512
tokens, records matched by real length, on each of ``--paper-models``: a BERT-base-sized
encoder (12 layers, hidden 768, 12 heads) with random weights (the paper's size, speed
only: its attention is near uniform, so everything is "similar") and the real
all-MiniLM-L6-v2 (fidelity: cosine against the model without memo).

    python bench/attention_memo.py                  # ~10-15 min on 2 shared cores
    python bench/attention_memo.py --paper          # adds the padded 512 setting (~15 min more)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from lookupc.memo.attention import find_self_attention, memo_stats, reset_memo_stats
from lookupc.memo.build import build_memo_db
from lookupc.memo.data import edit_tokens, load_encoder, pack_sentences, pad_sentences
from lookupc.memo.embed import EmbedConfig
from lookupc.memo.perf import PRESETS, format_plan
from lookupc.memo.plan import memo_plan
from lookupc.passes.attention_memo import apply_memo
from lookupc.textdata import docstring_sentences

LINES: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def pooled(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return torch.nn.functional.normalize(hidden.mean(1), dim=-1)
    m = mask.to(hidden.dtype)[..., None]
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


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


def batches(ids, mask, batch):
    for s in range(0, len(ids), batch):
        kw = {"input_ids": ids[s:s + batch]}
        if mask is not None:
            kw["attention_mask"] = mask[s:s + batch]
        yield kw


def embed_all(model, ids, mask, batch) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([pooled(model(**kw).last_hidden_state, kw.get("attention_mask"))
                          for kw in batches(ids, mask, batch)])


def run_pair(base, memo, ids, mask, batch: int, repeats: int) -> dict:
    """Time ``base`` and ``memo`` batch by batch, alternating which goes first each batch and round."""
    clocks = {"base": AttentionClock(base), "memo": AttentionClock(memo)}
    models = {"base": base, "memo": memo}
    rows = {k: dict(e2e=[], attn=[]) for k in models}
    try:
        with torch.no_grad():
            for rep in range(repeats):
                e2e = dict.fromkeys(models, 0.0)
                for c in clocks.values():
                    c.total = 0.0
                for k, kw in enumerate(batches(ids, mask, batch)):
                    order = ("base", "memo") if (k + rep) % 2 == 0 else ("memo", "base")
                    for name in order:
                        t0 = time.perf_counter()
                        models[name](**kw)
                        e2e[name] += time.perf_counter() - t0
                for name in models:
                    rows[name]["e2e"].append(e2e[name])
                    rows[name]["attn"].append(clocks[name].total)
    finally:
        for c in clocks.values():
            c.close()
    med = {name: {k: statistics.median(v) for k, v in r.items()} for name, r in rows.items()}
    return dict(base_e2e_s=med["base"]["e2e"], base_attention_s=med["base"]["attn"],
                e2e_s=med["memo"]["e2e"], attention_s=med["memo"]["attn"],
                e2e_rounds=[b / m for b, m in zip(rows["base"]["e2e"], rows["memo"]["e2e"])])


def evaluate(model, memo, workload: str, ids, mask, args, n_layers: int) -> dict:
    base_emb = embed_all(model, ids, mask, args.batch)
    reset_memo_stats(memo)
    got = embed_all(memo, ids, mask, args.batch)  # hit rates and quality of exactly one pass
    stats = memo_stats(memo)
    cos = (base_emb * got).sum(-1)
    per_layer = [round(stats[k].hit_rate, 3) if k in stats else None for k in range(n_layers)]
    skipped = [stats[k].skipped if k in stats else None for k in range(n_layers)]  # backoff
    memo_rate = sum(s.hits for s in stats.values()) / (len(ids) * n_layers)
    t = run_pair(model, memo, ids, mask, args.batch, args.repeats)  # (updates the stats again)
    return dict(workload=workload, n=len(ids), memo_layers=sorted(stats), hit_rate_per_layer=per_layer,
                skipped_per_layer=skipped, memo_rate=memo_rate, cos_mean=float(cos.mean()),
                cos_min=float(cos.min()), **t,
                attention_speedup=t["base_attention_s"] / t["attention_s"], e2e_speedup=t["base_e2e_s"] / t["e2e_s"])


def print_rows(rows: list[dict]) -> None:
    say(f"{'workload':14}{'preset':13}{'hit rate per layer':40}{'memo':>6}{'cos mean':>9}{'cos min':>9}"
        f"{'attn s':>13}{'e2e s':>14}{'attn x':>7}{'e2e x':>7}")
    for r in rows:
        hits = " ".join("  - " if h is None else f"{h:.2f}" for h in r["hit_rate_per_layer"])
        say(f"{r['workload']:14}{r['preset']:13}{hits:40}{r['memo_rate']:6.2f}{r['cos_mean']:9.4f}{r['cos_min']:9.4f}"
            f"{r['base_attention_s']:7.2f}>{r['attention_s']:5.2f}{r['base_e2e_s']:8.2f}>{r['e2e_s']:5.2f}"
            f"{r['attention_speedup']:7.2f}{r['e2e_speedup']:7.2f}")


def build_report(store) -> list[dict]:
    out = []
    for b in store.manifest["buckets"]:
        tr, cal = b["train"], b["calibration"]
        out.append(dict(layer=b["layer"], seq_len=b["seq_len"], groups=len(b["groups"]),
                        train_seconds=tr["seconds"], steps=tr["steps"], stopped=tr["stopped"],
                        initial_val_loss=tr["initial_val_loss"], final_val_loss=tr["final_val_loss"],
                        val_reduction=tr["val_reduction"], calibration_fitted=cal["fitted"],
                        calibration_held_out=cal["held_out"], timing=b["timing"], alpha_source=b["alpha_source"]))
    return out


def print_build(report: list[dict]) -> None:
    say(f"{'layer':>5} {'train s':>7} {'steps':>5} {'held-out loss':>22} {'|pred-true|':>11} {'|cal-true|':>10}"
        f"  held-out pairs by calibrated similarity: [n] predicted -> calibrated / true")
    for r in report:
        h = r["calibration_held_out"]
        loss = f"{r['initial_val_loss']:.2g}->{r['final_val_loss']:.2g} (-{100 * r['val_reduction']:.0f}%)"
        bins = "  ".join(f"[{b['n']}] {b['predicted']:.3f}->{b['calibrated']:.3f}/{b['true']:.3f}"
                         for b in h["bins"] if b["calibrated"] > 0.8)
        say(f"{r['layer']:>5} {r['train_seconds']:7.1f} {r['steps']:>5} {loss:>22} {h['mae_raw']:11.3f} "
            f"{h['mae']:10.3f}  {bins}")


def near_duplicate(args, work: Path) -> dict:
    model, tok = load_encoder("all-minilm-l6-v2")
    n_layers = len(find_self_attention(model))
    db_ids = pack_sentences(tok, docstring_sentences(args.calib_sentences), args.seq_len, args.db_seqs)
    other = docstring_sentences(args.eval_sentences, offset=args.calib_sentences)
    disjoint = pack_sentences(tok, other, args.seq_len, args.disjoint_seqs)
    pool = pack_sentences(tok, other, args.seq_len)[:, 1:-1].flatten()  # replacement tokens: other text
    say(f"== near-duplicate workload: all-MiniLM-L6-v2, L={args.seq_len}, database of {len(db_ids)} packed "
        f"docstring sequences, queries = those with a fraction of tokens replaced; {len(disjoint)} disjoint")
    t0 = time.perf_counter()
    embed = EmbedConfig(steps=args.steps, max_seconds=args.train_seconds)
    store = build_memo_db(model, [{"input_ids": db_ids[s:s + args.batch]} for s in range(0, len(db_ids), args.batch)],
                          work / f"db_{args.seq_len}", embed=embed, log=lambda s: print("  " + s, flush=True))
    build_s = time.perf_counter() - t0
    db_bytes = sum(f.stat().st_size for f in store.path.iterdir())
    report = build_report(store)
    say(f"built in {build_s:.0f}s ({db_bytes / 2**20:.0f} MiB); embedder training and calibration per layer:")
    print_build(report)
    plans = {}
    for preset, thr in PRESETS.items():
        plans[preset] = memo_plan(store, threshold=thr)
        say(f"\n{preset}: " + format_plan(plans[preset], thr))
    gen = torch.Generator().manual_seed(10_000)
    workloads = [(f"{round(100 * r)}% edited", edit_tokens(db_ids, r, gen, pool)) for r in args.edit_rates]
    workloads.append(("disjoint", disjoint))
    rows = []
    for preset in args.presets:
        memo = apply_memo(model, store, preset)
        for name, ids in workloads:
            row = evaluate(model, memo, name, ids, None, args, n_layers)
            row["preset"] = preset
            rows.append(row)
            print(f"  {name} {preset}: hit {row['hit_rate_per_layer']} cos {row['cos_mean']:.4f}/"
                  f"{row['cos_min']:.4f} attn x{row['attention_speedup']:.2f} e2e x{row['e2e_speedup']:.2f}",
                  flush=True)
    say("\nresults (automatic layer selection; times: base > memo, medians of per-round sums)")
    print_rows(rows)
    return dict(setting="near-duplicate", model="sentence-transformers/all-MiniLM-L6-v2", seq_len=args.seq_len,
                n_db=len(db_ids), build_s=build_s, db_bytes=db_bytes, build=report,
                plans={k: [{kk: vv for kk, vv in r.items()} for r in v] for k, v in plans.items()}, results=rows)


PAPER_MODELS = ("bert-base-random", "minilm")


def paper_model(which: str, layers: int):
    """``(model, tokenizer, description)`` of the padded-512 setting: a BERT-base-sized encoder
    with random weights (the paper's size; speed only) or the real all-MiniLM-L6-v2 (fidelity)."""
    import transformers

    model, tok = load_encoder("all-minilm-l6-v2")
    if which == "minilm":
        return model, tok, "all-MiniLM-L6-v2 (6 layers, hidden 384, real weights)"
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=768, num_hidden_layers=layers,
                                  num_attention_heads=12, intermediate_size=3072, max_position_embeddings=512,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    return (transformers.BertModel(cfg).eval(), tok,
            f"BERT-base-sized random-weight encoder ({layers} layers, hidden 768)")


def paper_setting(args, work: Path, which: str) -> dict:
    model, tok, desc = paper_model(which, args.paper_layers)
    n_layers = len(find_self_attention(model))
    sents = [s for s in docstring_sentences(4000) if 6 <= len(s.split()) <= 20]
    db_ids, db_mask = pad_sentences(tok, sents[:args.paper_db], 512)
    dis_ids, dis_mask = pad_sentences(tok, sents[args.paper_db:args.paper_db + args.paper_queries], 512)
    lengths = db_mask.sum(1)
    say(f"\n== paper setting: {desc}, "
        f"{len(db_ids)} short sentences padded to 512 (real lengths {int(lengths.min())}-{int(lengths.max())}, "
        f"{len(set(lengths.tolist()))} distinct); queries: {args.paper_queries} of them with 5% tokens replaced "
        f"(at least one), and {len(dis_ids)} disjoint sentences")
    t0 = time.perf_counter()
    items = [{"input_ids": db_ids[s:s + args.batch], "attention_mask": db_mask[s:s + args.batch]}
             for s in range(0, len(db_ids), args.batch)]
    store = build_memo_db(model, items, work / f"db_paper_{which}",
                          embed=EmbedConfig(token_dim=8, steps=args.steps, max_seconds=args.train_seconds,
                                            edit_rates=(0.05, 0.1)),
                          log=lambda s: print("  " + s, flush=True))
    build_s = time.perf_counter() - t0
    report = build_report(store)
    say(f"built in {build_s:.0f}s; records per layer grouped into {report[0]['groups']} real lengths")
    plan = memo_plan(store, "moderate")
    say(format_plan(plan, PRESETS["moderate"]))
    gen = torch.Generator().manual_seed(10_000)
    pool = db_ids[db_mask.bool()]
    q = args.paper_queries
    edited = edit_tokens(db_ids[:q], 0.05, gen, pool, lengths=lengths[:q])
    memo = apply_memo(model, store, "moderate")
    rows = []
    for name, ids, mask in (("5% edited", edited, db_mask[:q]), ("disjoint", dis_ids, dis_mask)):
        row = evaluate(model, memo, name, ids, mask, args, n_layers)
        row["preset"] = "moderate"
        rows.append(row)
    say("results (moderate, automatic layer selection; padded to 512; cosine of the masked mean)")
    print_rows(rows)
    return dict(setting="paper", model=desc, seq_len=512,
                n_db=len(db_ids), build_s=build_s, build=report, plan=plan, results=rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--db-seqs", type=int, default=96, help="database sequences (near-duplicate workload)")
    ap.add_argument("--disjoint-seqs", type=int, default=256,
                    help="disjoint sequences: a stream long enough for the backoff's steady state")
    ap.add_argument("--calib-sentences", type=int, default=3000)
    ap.add_argument("--eval-sentences", type=int, default=1500)
    ap.add_argument("--edit-rates", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="alternating timing rounds per workload")
    ap.add_argument("--steps", type=int, default=EmbedConfig().steps, help="embedder step limit per layer")
    ap.add_argument("--train-seconds", type=float, default=None, help="embedder time budget per layer")
    ap.add_argument("--paper", action="store_true", help="also run the padded-512 BERT-base-sized setting")
    ap.add_argument("--paper-only", action="store_true")
    ap.add_argument("--paper-db", type=int, default=32)
    ap.add_argument("--paper-queries", type=int, default=16)
    ap.add_argument("--paper-layers", type=int, default=12, help="layers of the random BERT-base-sized encoder")
    ap.add_argument("--paper-models", nargs="+", default=list(PAPER_MODELS), choices=PAPER_MODELS,
                    help="random BERT-base-sized weights measure speed; the real MiniLM measures fidelity")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a loaded machine)")
    ap.add_argument("--json", default="bench/results/attention_memo.json")
    ap.add_argument("--keep-db", default=None, help="directory to keep the databases in")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(1)
    work = Path(args.keep_db) if args.keep_db else Path(tempfile.mkdtemp(prefix="lookupc-memo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out = dict(cpu=cpu_model(), threads=args.threads, batch=args.batch, presets=PRESETS, args=vars(args),
               settings=[])
    say(f"CPU: {out['cpu']}, {os.cpu_count()} cores visible (shared), torch threads {args.threads}")
    try:
        if not args.paper_only:
            out["settings"].append(near_duplicate(args, work))
        if args.paper or args.paper_only:
            for which in args.paper_models:
                out["settings"].append(paper_setting(args, work, which))
    finally:
        if not args.keep_db:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    Path(args.json).with_suffix(".txt").write_text("\n".join(LINES) + "\n")
    print(f"\nwrote {args.json} and {Path(args.json).with_suffix('.txt')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
