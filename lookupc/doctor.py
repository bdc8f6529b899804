"""``lookupc doctor``: what a user gets on this machine, measured here, in one report.

Answers the questions users of lookup kernels ask most: is the fast path running (which
provider an op dispatches to, and why it falls back), why is it not as fast as published
(the CPU's ISA, threads, the measured gather bandwidth and hash FLOP rate next to the
machine's bounds and the dense FFN), and can this artifact run here at full speed.

:func:`diagnose` returns a dict (``--json``); :func:`render` turns it into text.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

__all__ = ["diagnose", "render"]

# a paper-sized FFN for the micro-benchmark, at a token count that takes ~1 s in all
_BENCH = {"d": 512, "hidden": 2048, "tables": 128, "bits": 8, "block": 64, "tokens": 1024}


def _versions() -> dict:
    import importlib.metadata as md

    import lookupc

    out = {"lookupc": lookupc.__version__, "python": platform.python_version()}
    for dist in ("torch", "apache-tvm", "apache-tvm-ffi", "transformers", "cryptography"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def _cache() -> dict:
    from .runtime.build import cache_dir

    root = cache_dir()
    if root is None:
        return {"path": None, "state": "disabled ($LOOKUPC_CACHE_DIR=off)"}
    p = Path(root)
    files = list(p.glob("*.so")) if p.is_dir() else []
    return {"path": str(p), "state": "ok" if p.is_dir() else "not created yet",
            "libraries": len(files), "bytes": sum(f.stat().st_size for f in files),
            "writable": os.access(p if p.is_dir() else p.parent, os.W_OK)}


def _dispatch() -> dict:
    """Which provider float32 CPU ops use under the default and the 'cpu' schedules."""
    import torch

    from . import dispatch

    out = {"default_schedule": dispatch.current_schedule()}
    dev, dt = torch.device("cpu"), torch.float32
    with dispatch.set_schedule(dispatch.current_schedule()):
        name = type(dispatch.provider_for(dev, dt)).__name__
    out["default_provider"] = name
    if "Reference" in name:
        out["default_note"] = ("the default schedule runs the PyTorch reference on CPU "
                               "tensors: use lookupc.set_schedule('cpu') or a compiled "
                               "artifact (lookupc compile) for the TVM kernels")
    try:
        import lookupc
        from lookupc.kernels.shapes import KernelShapes
        from lookupc.runtime.build import build

        ffn = lookupc.LookupFFN(32, 16, lookupc.LookupConfig(tables=4, bits=4, block_size=8))
        build(KernelShapes.of(ffn), schedule="cpu")
        with dispatch.set_schedule("cpu"):
            out["cpu_provider"] = type(dispatch.provider_for(dev, dt)).__name__
        out["cpu_kernels"] = "built and loaded"
    except Exception as err:  # noqa: BLE001 - the reason is the report
        out["cpu_provider"] = "reference (fallback)"
        out["cpu_kernels"] = f"cannot build: {type(err).__name__}: {str(err)[:200]}"
    return out


def _bench(seconds: float) -> dict:
    """Gather GB/s vs the L3-sized read bandwidth, hash GFLOP/s vs a GEMM's, dense beside."""
    import statistics

    import torch

    import lookupc
    from lookupc import perf
    from lookupc.kernels.shapes import KernelShapes
    from lookupc.runtime.build import build

    b = _BENCH
    torch.manual_seed(0)
    cfg = lookupc.LookupConfig(tables=b["tables"], bits=b["bits"], block_size=b["block"])
    ffn = lookupc.LookupFFN(b["d"], b["d"], cfg).eval()
    x = torch.randn(b["tokens"], b["d"])
    k = build(KernelShapes.of(ffn), schedule="cpu")
    p = {n: t.detach() for n, t in ffn.named_parameters()}
    codes, scores = k.hash(x, p["bh4_weight"], p["hash_bias"], 0.7)
    dense = torch.nn.Sequential(torch.nn.Linear(b["d"], b["hidden"]), torch.nn.GELU(),
                                torch.nn.Linear(b["hidden"], b["d"])).eval()
    a, w = torch.randn(1024, 1024), torch.randn(1024, 1024)
    fns = {"hash": lambda: k.hash(x, p["bh4_weight"], p["hash_bias"], 0.7),
           "gather": lambda: k.gather(codes, scores, p["tables"], p["bias"]),
           "dense": lambda: dense(x), "gemm": lambda: a @ w}
    times = {n: [] for n in fns}
    deadline = time.perf_counter() + seconds
    with torch.no_grad():
        for fn in fns.values():
            fn()
        while time.perf_counter() < deadline or len(times["hash"]) < 3:
            for n, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    hash_flops = lookupc.config.lookup_flops(b["d"], b["d"], cfg)[0] * b["tokens"]
    gather_bytes = b["tokens"] * b["tables"] * b["d"] * 4
    bw = perf.read_bandwidth(8 << 20, seconds=0.3)
    gemm_gflops = 2 * 1024 ** 3 / med["gemm"] / 1e9
    return {"config": b, "hash_ms": med["hash"] * 1e3, "gather_ms": med["gather"] * 1e3,
            "dense_ffn_ms": med["dense"] * 1e3,
            "lookup_vs_dense": med["dense"] / (med["hash"] + med["gather"]),
            "hash_gflops": hash_flops / med["hash"] / 1e9, "gemm_gflops": gemm_gflops,
            "hash_vs_gemm": hash_flops / med["hash"] / 1e9 / gemm_gflops,
            "gather_gbs": gather_bytes / med["gather"] / 1e9, "l3_read_gbs": bw,
            "gather_vs_l3": gather_bytes / med["gather"] / 1e9 / bw}


def _artifact(path: str) -> dict:
    from .artifact import signing
    from .artifact.format import ArtifactError, verify
    from .targets import TargetSpec, can_execute, host_target

    out: dict = {"path": path}
    try:
        manifest = verify(path)
        out["verify"] = "ok"
    except ArtifactError as err:
        return {**out, "verify": str(err)}
    spec = TargetSpec.from_dict(manifest["target"])
    ok, why = can_execute(spec)
    out["runs_here"] = ok if ok else f"no: {why}"
    host = host_target()
    out["target"] = manifest.get("target_string")
    if ok and spec.mcpu and host.mcpu and spec.mcpu != host.mcpu:
        out["full_speed"] = (f"runs, but was compiled for {spec.mcpu} and this CPU is "
                             f"{host.mcpu}: recompile with --target host for its full ISA")
    elif ok:
        out["full_speed"] = "yes (compiled for this CPU)"
    try:
        out["trust"] = signing.trust_of(path, manifest, signing.trusted_keys()).describe()
    except Exception as err:  # noqa: BLE001
        out["trust"] = f"cannot check: {err}"
    return out


def diagnose(artifact: str | None = None, bench: bool = True, seconds: float = 6.0) -> dict:
    """Everything :func:`render` prints, as a dict."""
    import torch

    from . import baselines, tvm_shim
    from .perf import cpu_name

    report = {
        "cpu": {"model": cpu_name(), "arch": platform.machine(),
                "llvm_mcpu": tvm_shim.llvm_get_system_cpu(), "isa": baselines.cpu_isa(),
                "vector_lanes_fp32": tvm_shim.vector_lanes(tvm_shim.make_target(None))},
        "threads": {"cpus": os.cpu_count(), "torch": torch.get_num_threads(),
                    "tvm": tvm_shim.num_threads(),
                    "tvm_spin_count": os.environ.get("TVM_THREAD_POOL_SPIN_COUNT")},
        "versions": _versions(),
        "cache": _cache(),
        "dispatch": _dispatch(),
    }
    if bench:
        report["bench"] = _bench(seconds)
    if artifact:
        report["artifact"] = _artifact(artifact)
    return report


def render(r: dict) -> str:
    isa = r["cpu"]["isa"]
    have = [k for k in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "neon")
            if isa.get(k)]
    lines = [f"cpu        {r['cpu']['model']} ({r['cpu']['arch']}, llvm {r['cpu']['llvm_mcpu']}): "
             f"{', '.join(have) or 'no SIMD extension known to lookupc'}; "
             f"{r['cpu']['vector_lanes_fp32']} fp32 lanes",
             f"threads    {r['threads']['cpus']} CPUs; torch {r['threads']['torch']}, TVM "
             f"{r['threads']['tvm']} (pool spin {r['threads']['tvm_spin_count']})",
             "versions   " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v)]
    c = r["cache"]
    lines.append(f"cache      {c['path']}: {c['state']}" + (
        f", {c['libraries']} kernel libraries ({c['bytes'] / 2**20:.1f} MiB)"
        f"{'' if c.get('writable') else ', NOT writable'}" if c["path"] else ""))
    d = r["dispatch"]
    lines.append(f"dispatch   default schedule {d['default_schedule']!r} -> "
                 f"{d['default_provider']} on float32 CPU tensors")
    if d.get("default_note"):
        lines.append(f"           note: {d['default_note']}")
    lines.append(f"           schedule 'cpu' -> {d['cpu_provider']} ({d['cpu_kernels']})")
    if "bench" in r:
        b = r["bench"]
        cfg = b["config"]
        lines += [
            f"bench      paper-sized FFN {cfg['d']}-{cfg['hidden']}-{cfg['d']}, "
            f"{cfg['tables']}x{cfg['bits']} / {cfg['block']}, {cfg['tokens']} tokens:",
            f"           hash   {b['hash_ms']:7.2f} ms  {b['hash_gflops']:7.1f} GFLOP/s "
            f"= {b['hash_vs_gemm']:.0%} of a 1024^3 GEMM here ({b['gemm_gflops']:.0f} GFLOP/s)",
            f"           gather {b['gather_ms']:7.2f} ms  {b['gather_gbs']:7.1f} GB/s "
            f"= {b['gather_vs_l3']:.0%} of the L3-sized read bandwidth ({b['l3_read_gbs']:.0f} GB/s)",
            f"           dense FFN {b['dense_ffn_ms']:.2f} ms: lookup is {b['lookup_vs_dense']:.2f}x "
            f"the dense FFN (fp32) on this machine"]
    if "artifact" in r:
        a = r["artifact"]
        lines.append(f"artifact   {a['path']}: verify {a['verify']}")
        for key in ("target", "runs_here", "full_speed", "trust"):
            if key in a:
                lines.append(f"           {key.replace('_', ' ')}: {a[key]}")
    return "\n".join(lines)
