"""The timing harness that ``bench/ffn.py`` and ``lookupc compare`` share (an FFN, its
one-line dense alternatives and the LookupFFN kernels, interleaved in one run).

See ``bench/ffn.py`` for the method and the row fields. The end of the module serves
``lookupc compare`` (config names, machine facts, the JSON report and the PNG) and the
timing loop of ``lookupc run``. Part of the package (not of the checkout's ``bench/``)
so that ``lookupc compare`` works from an installed wheel. What the machine can do (CPU
name, read bandwidth, FMA peak, sgemm) is measured in :mod:`lookupc.machine`.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings

import torch

import lookupc
from lookupc import baselines
from lookupc import reference as ref
from lookupc.config import TABLE_DTYPES  # names -> bytes per element (re-exported)
from lookupc.machine import cpu_name, fma_peak_gflops, read_bandwidth, sgemm_gflops, timed
from lookupc.schedules.registry import schedule_names

__all__ = ["CONFIGS", "SCHEDULES", "TABLE_DTYPES", "cpu_name", "read_bandwidth", "fma_peak_gflops",
           "sgemm_gflops", "dense_ffn", "run_config", "print_table", "resolve_config", "kernel_shapes",
           "time_calls", "machine_facts", "compare_report", "plot_rows"]

CONFIGS = {
    # name: (d_model, d_hidden, LookupConfig)
    "tiny": (128, 512, lookupc.LookupConfig(tables=32, bits=8, block_size=64)),  # tiny_bert
    "paper": (512, 2048, lookupc.LookupConfig(tables=128, bits=8, block_size=64)),
    "minilm": (384, 1536, lookupc.LookupConfig(tables=96, bits=8, block_size=64)),
    "bert-base": (768, 3072, lookupc.LookupConfig(tables=192, bits=8, block_size=64)),
    # MiniLM's shape with the configurations the distillation section measures
    "minilm-512x1": (384, 1536, lookupc.LookupConfig(tables=512, bits=1, block_size=32)),
    "minilm-128x4": (384, 1536, lookupc.LookupConfig(tables=128, bits=4, block_size=32)),
}
SCHEDULES = tuple(schedule_names())


def dense_ffn(d: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(),
                               torch.nn.Linear(hidden, d)).eval()


def lookup_variants(ffn, x, schedules, tuning_db, naive_tokens, table_dtypes=("float32",)):
    """name -> (full fn, hash fn, gather fn, tokens it runs on, table bytes per element).

    Every schedule except ``naive`` also runs with each reduced-precision table dtype in
    ``table_dtypes`` (``tvm-cpu-int8``...: the same hash, the tables quantised).
    """
    from dataclasses import replace

    from lookupc.kernels.shapes import KernelShapes
    from lookupc.runtime import build as K

    p = {k: v.detach() for k, v in ffn.named_parameters()}
    decay, bits = float(ffn.config.decay), ffn.config.bits
    z = ref.hash_forward(x, p["bh4_weight"], p["hash_bias"], decay)
    codes, scores = ref.codes_scores(z, bits)

    def ref_hash():
        return ref.codes_scores(ref.hash_forward(x, p["bh4_weight"], p["hash_bias"], decay), bits)

    def ref_gather():
        return ref.gather_forward(codes, scores, p["tables"], p["bias"])

    out = {"lookup-reference": (lambda: ref.gather_forward(*ref_hash(), p["tables"], p["bias"]),
                                ref_hash, ref_gather, x.shape[0], 4)}
    stored = {"float32": (p["tables"], None)}
    stored.update({d: ref.quantize_tables(p["tables"], d) for d in table_dtypes if d != "float32"})
    for name in schedules:
        for dtype in (["float32"] if name == "naive" else list(dict.fromkeys(table_dtypes))):
            shapes = replace(KernelShapes.of(ffn), table_dtype=dtype)
            tables, scale = stored[dtype]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                k = K.build(shapes, schedule=name, tuning_db=tuning_db)
            for w in caught:
                print(f"  note: {w.message}", file=sys.stderr)
            xs = x[:naive_tokens] if name == "naive" else x
            cs, ss = codes[:xs.shape[0]], scores[:xs.shape[0]]
            k.prepare_weight(ffn.bh4_weight)  # fold once, outside the timings (cached)

            def full(k=k, xs=xs, tables=tables, scale=scale):
                c, s = k.hash(xs, ffn.bh4_weight, p["hash_bias"], decay)
                return k.gather(c, s, tables, p["bias"], scale)

            # a tuned build without records runs the hand knobs: say so, never "tuned"
            untuned = name == "tuned" and _without_records(shapes, tuning_db)
            label = f"tvm-{name}" + ("-no-records" if untuned else "") + (
                "" if dtype == "float32" else f"-{dtype.replace('bfloat16', 'bf16')}")
            out[label] = (full,
                          lambda k=k, xs=xs: k.hash(xs, ffn.bh4_weight, p["hash_bias"], decay),
                          lambda k=k, cs=cs, ss=ss, tables=tables, scale=scale: k.gather(
                              cs, ss, tables, p["bias"], scale),
                          xs.shape[0], TABLE_DTYPES[dtype])
    return out



def _without_records(shapes, tuning_db) -> bool:
    """True when the tuning database has no record for the hash or the gather of ``shapes``."""
    from lookupc import tvm_shim
    from lookupc.schedules.cpu.tuned import best_knobs, default_db_dir

    target = tvm_shim.make_target(None)
    db = tuning_db or default_db_dir()
    return any(best_knobs(kind, shapes, target, db) is None for kind in ("hash", "gather"))


def run_config(name: str, tokens: int, repeats: int, schedules, tuning_db, naive_tokens,
               compile_dense: bool, bw_l3: float, table_dtypes=("float32",),
               peak_gflops: float | None = None):
    """Rows of one config (see ``bench/ffn.py``). LookupFFN rows get ``hash_gflops``
    (``LookupFFN.hash_flops_per_token() * tokens / hash_ms``) and, given the machine's
    ``peak_gflops`` (:func:`fma_peak_gflops`), ``hash_pct_of_peak``."""
    d, hidden, cfg = CONFIGS[name]
    torch.manual_seed(0)
    x = torch.randn(tokens, d)
    dense = dense_ffn(d, hidden)
    ffn = lookupc.LookupFFN(d, d, cfg).eval()
    variants = {}  # name -> dict(fn, hash, gather, tokens)
    notes: list = []
    for vname, (module, cast) in baselines.dense_variants(
            dense, (x,), compile_model=compile_dense, notes=notes).items():
        xv = cast(x)
        label = "dense" if vname == "fp32" else f"dense-{vname}"
        variants[label] = dict(fn=lambda module=module, xv=xv: module(xv), tokens=tokens,
                               dense=True)
    for note in notes:
        print(f"  note: {note}", file=sys.stderr)
    for vname, (full, h, g, n, itemsize) in lookup_variants(
            ffn, x, schedules, tuning_db, naive_tokens, table_dtypes).items():
        variants[vname] = dict(fn=full, hash=h, gather=g, tokens=n, itemsize=itemsize)

    times = {v: {"full": [], "hash": [], "gather": []} for v in variants}
    with torch.no_grad():
        for v in variants.values():  # warm-up
            v["fn"]()
        for rnd in range(repeats):
            for vname, v in variants.items():
                if vname == "tvm-naive" and rnd >= 3:
                    continue
                times[vname]["full"].append(timed(v["fn"]))
                if "hash" in v:
                    times[vname]["hash"].append(timed(v["hash"]))
                    times[vname]["gather"].append(timed(v["gather"]))

    rows = []
    dense_med = statistics.median(times["dense"]["full"])
    best_name, best_med = baselines.best_dense(
        {v: statistics.median(times[v]["full"]) for v in variants if variants[v].get("dense")})
    for vname, v in variants.items():
        scale = tokens / v["tokens"]
        t = {k: [s * scale for s in vals] for k, vals in times[vname].items()}
        row = {"variant": vname, "config": name, "tokens": tokens,
               "ms_median": statistics.median(t["full"]), "ms_min": min(t["full"]),
               "runs": len(t["full"])}
        row["speedup_vs_dense"] = dense_med / row["ms_median"]
        row["speedup_vs_best_dense"] = best_med / row["ms_median"]
        row["best_dense"] = best_name
        if vname == "dense-bf16" and not (baselines.cpu_isa()["avx512_bf16"]
                                         or baselines.cpu_isa()["amx_bf16"]):
            row["note"] = "no native bf16 on this CPU (PyTorch emulates it)"
        if t["hash"]:
            # the gather must read tokens x tables rows of d values of the stored dtype
            bound_ms = tokens * cfg.tables * d * v["itemsize"] / (bw_l3 * 1e9) * 1e3
            row["hash_ms"] = statistics.median(t["hash"])
            row["gather_ms"] = statistics.median(t["gather"])
            row["gather_bound_ms"] = bound_ms
            row["gather_vs_bound"] = row["gather_ms"] / bound_ms
            row["hash_gflops"] = ffn.hash_flops_per_token() * tokens / (row["hash_ms"] * 1e6)
            if peak_gflops:
                row["hash_pct_of_peak"] = 100.0 * row["hash_gflops"] / peak_gflops
                # what no schedule can beat: the hash at 100% of the FMA peak plus the
                # gather at the L3 read bandwidth
                row["ceiling_ms"] = (ffn.hash_flops_per_token() * tokens / (peak_gflops * 1e6)
                                     + bound_ms)
                row["speedup_ceiling_vs_dense"] = dense_med / row["ceiling_ms"]
        if scale != 1:
            row["note"] = (f"measured on {v['tokens']} tokens, {len(t['full'])} runs; "
                           f"times scaled x{scale:g} to {tokens} tokens")
        rows.append(row)
    return rows


def print_table(rows) -> None:
    head = (f"{'config':12s} {'variant':24s} {'tokens':>6s} {'median ms':>10s} {'min ms':>8s} "
            f"{'x dense':>8s} {'x best':>7s} {'hash ms':>8s} {'gather ms':>9s} {'g/bound':>7s} "
            f"{'hash GF/s':>9s} {'%peak':>6s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if key in r else "-"
        print(f"{r['config']:12s} {r['variant']:24s} {r['tokens']:6d} {r['ms_median']:10.2f} "
              f"{r['ms_min']:8.2f} {r['speedup_vs_dense']:8.2f} "
              f"{r['speedup_vs_best_dense']:7.2f} {f('hash_ms', '8.2f'):>8s} "
              f"{f('gather_ms', '9.2f'):>9s} {f('gather_vs_bound', '7.2f'):>7s} "
              f"{f('hash_gflops', '9.1f'):>9s} {f('hash_pct_of_peak', '6.1f'):>6s}"
              + ("  *" if "note" in r else ""))
    for r in rows:
        if "note" in r:
            print(f"* {r['variant']}: {r['note']}")
    best = {r["config"]: r["best_dense"] for r in rows}
    print("x best = fastest dense variant of the run / row: "
          + ", ".join(f"{c}: {b}" for c, b in best.items()))
    for c in best:
        ceil = [r for r in rows if r["config"] == c and "speedup_ceiling_vs_dense" in r]
        if ceil:
            top = max(ceil, key=lambda r: r["speedup_ceiling_vs_dense"])
            print(f"ceiling ({c}, {top['variant']}): hash at 100% of the FMA peak + gather at the "
                  f"L3 read bandwidth = {top['ceiling_ms']:.2f} ms, "
                  f"{top['speedup_ceiling_vs_dense']:.2f}x dense fp32")


# --- lookupc compare / lookupc tune --config ----------------------------------------------------

def resolve_config(name: str, config=None):
    """``(d_model, d_hidden, LookupConfig)`` of a :data:`CONFIGS` name or of ``DxH``
    (d_model x d_hidden), with ``config`` (a LookupConfig or a SizeOverride) over the
    sizes; registered in :data:`CONFIGS` under ``name`` for :func:`run_config`."""
    from lookupc.config import LookupConfig
    from lookupc.errors import LookupcInputError

    if name in CONFIGS and config is None:
        return CONFIGS[name]
    if name in CONFIGS:
        d, hidden, _ = CONFIGS[name]
    else:
        parts = name.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise LookupcInputError(f"unknown --config {name!r}; use one of {', '.join(CONFIGS)} "
                                    f"or DxH for a d_model x d_hidden FFN (e.g. 128x512)")
        d, hidden = map(int, parts)
    if config is None:
        config = LookupConfig.for_ffn(d, hidden, d)
    elif not isinstance(config, LookupConfig):  # a SizeOverride from --tables/--bits/...
        config = config.for_ffn(d, hidden, d)
    config.check_for(d)
    CONFIGS[name] = (d, hidden, config)
    return CONFIGS[name]


def kernel_shapes(name: str, config=None):
    """The :class:`~lookupc.kernels.shapes.KernelShapes` of a config name or ``DxH``
    (:func:`resolve_config`)."""
    from lookupc.kernels.shapes import KernelShapes

    d, _, cfg = resolve_config(name, config)
    return KernelShapes.for_config(d, d, cfg)


def time_calls(fn, repeat: int) -> list[float]:
    """Seconds of ``repeat`` calls of ``fn`` (each timed alone)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def machine_facts(threads: int) -> dict:
    """CPU, thread count, versions and load of this machine, for a timing report."""
    from lookupc import tvm_shim

    return {"cpu": cpu_name(), "llvm_mcpu": tvm_shim.llvm_get_system_cpu(),
            "threads": threads, "torch": torch.__version__, "tvm": tvm_shim.tvm_version(),
            "load_avg_1m": os.getloadavg()[0]}


def compare_report(rows: list[dict], machine: dict, bw_l3: float, configs, tuning_db) -> dict:
    """What ``lookupc compare --json`` writes: the machine, the bandwidth bound, the
    configs timed and the rows of :func:`run_config`."""
    return {"machine": machine, "bandwidth_gbs": {"l3_sized_8MiB": bw_l3},
            "configs": {n: {"d_model": CONFIGS[n][0], "d_hidden": CONFIGS[n][1],
                            **CONFIGS[n][2].to_dict()} for n in configs},
            "tuning_db": tuning_db, "rows": rows}


def plot_rows(rows: list[dict], path: str, machine: dict) -> None:
    """A bar chart (PNG) of the median times of :func:`run_config` rows, one panel per
    config, each bar labelled with its speed-up over the dense FFN (needs matplotlib)."""
    from lookupc.extras import require

    matplotlib = require("matplotlib", "lookupc compare --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 3.8), squeeze=False)
    for ax, name in zip(axes[0], configs):
        sub = [r for r in rows if r["config"] == name]
        labels = [r["variant"] for r in sub]
        bars = ax.barh(labels, [r["ms_median"] for r in sub],
                       color=["#888888" if r["variant"].startswith("dense") else "#3b7dd8"
                              for r in sub])
        for bar, r in zip(bars, sub):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {r['speedup_vs_dense']:.2f}x", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(right=max(r["ms_median"] for r in sub) * 4)  # room for the labels
        ax.invert_yaxis()
        ax.set_xlabel(f"median ms per call ({sub[0]['tokens']} tokens, log)")
        ax.set_title(f"{name}: speed-up vs dense", fontsize=10)
    fig.suptitle(f"lookupc compare on {machine['llvm_mcpu']}, {machine['threads']} threads",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
