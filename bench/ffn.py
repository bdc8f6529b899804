"""Benchmark: dense PyTorch FFN vs LookupFFN (PyTorch reference and TVM schedules) on CPU.

    python bench/ffn.py --config paper --tokens 4096 --json out.json

One row per variant: the dense FFN (Linear-GELU-Linear, eval, no_grad) as a CPU user
would run it instead (``lookupc.baselines``): ``dense`` (fp32 eager), ``dense-bf16``,
``dense-int8-dynamic`` (``quantize_dynamic``), ``dense-compile`` (``torch.compile``);
then ``lookup-reference`` (the PyTorch reference ops), ``tvm-naive``, ``tvm-cpu``,
``tvm-tuned``, and with ``--table-dtypes float32,bfloat16,int8`` the same schedules on
reduced-precision tables (``tvm-cpu-bf16``, ``tvm-cpu-int8``...). Each row has ``variant,
config, tokens, ms_median, ms_min, speedup_vs_dense`` (fp32 dense median / row median, same
run), ``speedup_vs_best_dense`` (the fastest dense row of the run / row median), and for
LookupFFN rows ``hash_ms`` and ``gather_ms`` (medians of the two kernels timed alone),
plus ``gather_bound_ms`` and ``gather_vs_bound``.

Method: all cores (torch and TVM threads = ``os.cpu_count()``), one warm-up call per
variant, then ``--repeats`` (>= 10) rounds in which every variant runs once
(interleaved, so load changes on a shared machine hit all variants alike); median and
min over rounds. ``tvm-naive`` is unscheduled and very slow: it runs on
``--naive-tokens`` tokens (default 256) for 3 rounds, and its times are scaled
linearly to ``--tokens`` (the row says so in ``note``).

Gather bound: the gather must read ``tokens * tables * d_out * itemsize`` bytes of table
rows (4, 2 or 1 bytes per element by the table dtype).
The script measures the machine's read bandwidth for a cache-resident buffer (``sum``
of an L3-sized and an L2-sized buffer, best call on all threads or on one) and reports
``gather_bound_ms = bytes / L3 bandwidth`` (the table-blocked gather keeps a group of
tables and the outputs in L2/L3, not L1) and ``gather_vs_bound = gather_ms / bound``.

Hash efficiency: the script measures the machine's fp32 FMA peak on the run's thread count
(``lookupc.perf.fma_peak_gflops``: a TVM micro-kernel of independent vector FMA chains in
registers at the host's vector width) and ``torch.mm`` of 2048 x 2048 matrices
(``sgemm_gflops``, the practical ceiling of a tuned BLAS). LookupFFN rows add
``hash_gflops`` (``LookupFFN.hash_flops_per_token() * tokens / hash_ms``) and
``hash_pct_of_peak``; the JSON records ``fma_peak_gflops`` and ``sgemm_gflops`` too.

Ceiling: ``ceiling_ms`` = the hash's FLOPs at 100% of that peak + ``gather_bound_ms``, and
``speedup_ceiling_vs_dense`` = dense fp32 median / ceiling: the speed-up over dense fp32
that no schedule of this configuration can beat on this machine (fp32 hash arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from lookupc import baselines, perf
from lookupc.perf import (
    CONFIGS,
    SCHEDULES,
    cpu_name,
    fma_peak_gflops,
    print_table,
    read_bandwidth,
    run_config,
    sgemm_gflops,
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS),
                    help="repeatable; default: paper")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (>= 10)")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--table-dtypes", default="float32",
                    help="comma list of float32,bfloat16,int8: every schedule but naive also "
                         "runs with the tables stored in each (rows tvm-cpu-int8, ...)")
    ap.add_argument("--naive-tokens", type=int, default=256)
    ap.add_argument("--tuning-db", default=None, help="MetaSchedule work dir for 'tuned'")
    ap.add_argument("--tune-trials", type=int, default=0,
                    help="tune (resumably) this many trials per kernel before timing")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile'd dense")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch and TVM threads (default: all cores)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.repeats < 10:
        ap.error("--repeats must be >= 10")
    threads = args.threads
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    torch.set_num_threads(threads)
    from lookupc import tvm_shim
    from lookupc.runtime import cpu as K
    from lookupc.schedules.cpu.tuned import default_db_dir

    configs = args.config or ["paper"]
    schedules = [s for s in args.schedules.split(",") if s]
    table_dtypes = [d for d in args.table_dtypes.split(",") if d]
    bad = set(table_dtypes) - set(perf.TABLE_DTYPES)
    if bad:
        ap.error(f"--table-dtypes: unknown {sorted(bad)}; choose from {', '.join(perf.TABLE_DTYPES)}")
    tuning_db = args.tuning_db or default_db_dir()
    if args.tune_trials and "tuned" in schedules:
        shapes = [K.KernelShapes.for_config(CONFIGS[c][0], CONFIGS[c][0], CONFIGS[c][2])
                  for c in configs]
        K.tune(shapes, None, tuning_db, args.tune_trials)
    bw_l3 = read_bandwidth(8 << 20)
    bw_l2 = read_bandwidth(256 << 10)
    print(f"CPU: {cpu_name()} (llvm mcpu {tvm_shim.llvm_get_system_cpu()}), threads: torch "
          f"{torch.get_num_threads()}, TVM {os.environ['TVM_NUM_THREADS']}; read bandwidth "
          f"L3-sized {bw_l3:.0f} GB/s, L2-sized {bw_l2:.0f} GB/s")
    peak = fma_peak_gflops(threads)
    sgemm = sgemm_gflops(threads)
    print(f"fp32 FMA peak on {threads} thread(s): {peak:.1f} GFLOP/s (TVM micro-kernel); "
          f"torch.mm 2048x2048: {sgemm:.1f} GFLOP/s ({100 * sgemm / peak:.0f}% of peak)")
    rows = []
    for c in configs:
        rows += run_config(c, args.tokens, args.repeats, schedules, tuning_db,
                           min(args.naive_tokens, args.tokens), not args.no_compile, bw_l3,
                           table_dtypes, peak_gflops=peak)
    print_table(rows)
    if args.json:
        result = {"machine": {"cpu": cpu_name(), "llvm_mcpu": tvm_shim.llvm_get_system_cpu(),
                              "logical_cpus": threads, "torch_threads": torch.get_num_threads(),
                              "tvm_threads": int(os.environ["TVM_NUM_THREADS"]),
                              "torch": torch.__version__, "tvm": tvm_shim.tvm_version(),
                              "load_avg_1m": os.getloadavg()[0],
                              "isa": baselines.cpu_isa()},
                  "bandwidth_gbs": {"l3_sized_8MiB": bw_l3, "l2_sized_256KiB": bw_l2},
                  "fma_peak_gflops": peak, "sgemm_gflops": sgemm,
                  "tuning_db": tuning_db, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
