"""Training-step throughput: LookupFFN vs the dense FFN, forward + backward, tokens/s.

One step = forward on ``[tokens, d]``, a scalar loss, backward into every parameter
(and the input). Rows, measured in the same process and interleaved:

- ``dense``: Linear(d, 4d) -> GELU -> Linear(4d, d);
- ``lookup-reference``: LookupFFN with the PyTorch reference math (``set_schedule("reference")``);
- on CUDA also ``lookup-cuda-atomic`` and ``lookup-cuda-segment``: the TVM-built CUDA
  kernels (``lookupc.cuda_kernels``), with the table gradient reduced by atomics or by a
  sort + segment reduction.

Each row: ``ms_median``, ``ms_min`` (over ``--repeats`` steps after ``--warmup``),
``tokens_per_s`` (from the median) and ``speedup_vs_dense``.

    python bench/train_step.py                          # CPU, paper config, 2048 tokens
    python bench/train_step.py --device cuda --tokens 16384 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lookupc  # noqa: E402

CONFIGS = {  # name -> (d, dense hidden, LookupConfig)
    "paper": (512, 2048, lookupc.LookupConfig(tables=128, bits=8, block_size=64)),
    "minilm": (384, 1536, lookupc.LookupConfig(tables=96, bits=8, block_size=64)),
    "small": (128, 512, lookupc.LookupConfig(tables=32, bits=8, block_size=32)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    module(x).backward(grad)


def _variants(name: str, device: torch.device, seed: int) -> list[tuple[str, nn.Module, str]]:
    d, hidden, cfg = CONFIGS[name]
    torch.manual_seed(seed)
    dense = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)).to(device)
    lookup = lookupc.LookupFFN(d, d, cfg).to(device)
    rows = [("dense", dense, "reference"), ("lookup-reference", lookup, "reference")]
    if device.type == "cuda":
        rows += [("lookup-cuda-atomic", lookup, "cuda:atomic"),
                 ("lookup-cuda-segment", lookup, "cuda:segment")]
    return rows


def _schedule(spec: str):
    """Context that selects the implementation (and the table-gradient method on CUDA)."""
    name, _, method = spec.partition(":")
    if method:
        from lookupc import dispatch

        with lookupc.set_schedule(name):
            dispatch.provider_for(torch.device("cuda"), torch.float32).set_table_grad(method)
    return lookupc.set_schedule(name)


def run(config: str, tokens: int, device: torch.device, warmup: int, repeats: int,
        seed: int = 0) -> list[dict]:
    d = CONFIGS[config][0]
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    grad = torch.randn(tokens, d, device=device)
    variants = _variants(config, device, seed)
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for name, module, spec in variants:  # warm-up (and kernel builds) first
        with _schedule(spec):
            for _ in range(warmup):
                _step(module, x, grad)
    _sync(device)
    for _ in range(repeats):  # interleaved so that load changes hit every row alike
        for name, module, spec in variants:
            with _schedule(spec):
                _sync(device)
                t0 = time.perf_counter()
                _step(module, x, grad)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    dense_ms = statistics.median(times["dense"]) * 1e3
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts) * 1e3
        rows.append({"variant": name, "config": config, "tokens": tokens, "device": str(device),
                     "ms_median": round(med, 3), "ms_min": round(min(ts) * 1e3, 3),
                     "tokens_per_s": round(tokens / med * 1e3),
                     "speedup_vs_dense": round(dense_ms / med, 3)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.tokens < 1:
        ap.error(f"--tokens must be >= 1, got {args.tokens}")
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    device = torch.device(dev)
    rows = run(args.config, args.tokens, device, args.warmup, args.repeats)
    print(f"{'variant':22s} {'ms median':>10s} {'ms min':>9s} {'tokens/s':>11s} {'vs dense':>9s}")
    for r in rows:
        print(f"{r['variant']:22s} {r['ms_median']:10.2f} {r['ms_min']:9.2f} "
              f"{r['tokens_per_s']:11d} {r['speedup_vs_dense']:8.2f}x")
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(),
                "torch_threads": torch.get_num_threads(),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
