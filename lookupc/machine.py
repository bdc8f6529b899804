"""What this machine can do, measured: CPU name, read bandwidth, fp32 FMA peak, sgemm.

The bounds ``bench/ffn.py``, ``lookupc compare`` and ``lookupc doctor`` put the kernels'
times next to (:mod:`lookupc.perf` re-exports them): the read bandwidth of a
cache-resident buffer, the FMA peak of a TVM micro-kernel of independent vector FMA
chains at the host's vector width, and ``torch.mm`` as the practical ceiling of a tuned
BLAS.
"""

from __future__ import annotations

import functools
import platform
import time

import torch

__all__ = ["cpu_name", "timed", "read_bandwidth", "fma_peak_gflops", "sgemm_gflops"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def read_bandwidth(nbytes: int, seconds: float = 0.5) -> float:
    """GB/s of ``torch.sum`` over a float32 buffer of ``nbytes``: the best call, with all
    threads or with one, whichever reads faster.

    Best of many calls: on a shared machine most calls lose a core to other jobs, and a
    multi-threaded call then waits for its descheduled thread (one thread is then faster).
    """
    threads = torch.get_num_threads()
    try:
        rates = [_read_bandwidth(nbytes, seconds)]
        if threads > 1:
            torch.set_num_threads(1)
            rates.append(_read_bandwidth(nbytes, seconds))
    finally:
        torch.set_num_threads(threads)
    return max(rates)


def _read_bandwidth(nbytes: int, seconds: float) -> float:
    buf = torch.randn(nbytes // 4)
    buf.sum()
    best, calls, start = float("inf"), 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 50:
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
        calls += 1
    return nbytes / best / 1e9


#: independent accumulator vectors of the FMA peak kernel: enough to cover the FMA latency
#: (4-5 cycles) on the FMA pipes of current x86 and Arm cores (2, sometimes 4), and with
#: the two operands still inside the 16 vector registers of AVX2 / Neon's 32. (Zen 3, 1
#: thread: 4 chains 48 GFLOP/s, 6: 73, 8 to 14: 95.)
_PEAK_CHAINS = 12


@functools.lru_cache(maxsize=None)
def _fma_peak_kernel():
    """``(function, lanes)``: the FMA peak micro-kernel for this host, built once per process.

    ``fma_peak(seed [2, lanes], out [tasks, chains, lanes], iters)`` runs ``tasks`` parallel
    tasks; each keeps ``chains`` accumulator vectors in registers and updates each
    ``iters`` times with ``acc = acc * seed[0] + seed[1]`` (one vector FMA: TVM's LLVM
    codegen contracts the multiply-add), then stores them (so nothing is dead code).
    """
    from lookupc import tvm_shim

    tvm = tvm_shim.tvm
    from tvm.script import tirx as T

    target = tvm_shim.make_target(None)
    lanes, chains = tvm_shim.vector_lanes(target), _PEAK_CHAINS

    @T.prim_func
    def fma_peak(var_seed: T.handle, var_out: T.handle, iters: T.int32):
        T.func_attr({"global_symbol": "fma_peak", "tirx.noalias": True})
        tasks = T.int32()
        seed = T.match_buffer(var_seed, (2, lanes), "float32")
        out = T.match_buffer(var_out, (tasks, chains, lanes), "float32")
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((chains, lanes), "float32", scope="local")
            for c in T.unroll(chains):
                for v in T.vectorized(lanes):
                    acc[c, v] = seed[1, v] * T.Cast("float32", c + 1)
            for _ in range(iters):
                for c in T.unroll(chains):
                    for v in T.vectorized(lanes):
                        acc[c, v] = acc[c, v] * seed[0, v] + seed[1, v]
            for c in T.unroll(chains):
                for v in T.vectorized(lanes):
                    out[t, c, v] = acc[c, v]

    module = tvm_shim.compile_module(tvm.IRModule({"fma_peak": fma_peak}), target)
    return tvm_shim.get_function(module, "fma_peak"), lanes


def fma_peak_gflops(threads: int = 1, seconds: float = 0.02, repeats: int = 7) -> float:
    """The machine's measured fp32 FMA peak in GFLOP/s on ``threads`` threads.

    A TVM micro-kernel (:func:`_fma_peak_kernel`, built once per process) runs
    ``threads`` parallel tasks of independent vector FMA chains in registers, vectorised at
    the host's width; an FMA counts 2 FLOPs. Each call is sized to about ``seconds``; the
    best of ``repeats`` calls is reported (a peak: calls that lose the core to other jobs
    only look slower). ``threads`` must not exceed TVM's thread pool (``TVM_NUM_THREADS``,
    set before TVM's first parallel call), or tasks share a thread and the figure drops.
    """
    import numpy as np

    from lookupc import tvm_shim

    tvm = tvm_shim.tvm
    fn, lanes = _fma_peak_kernel()
    threads = max(1, int(threads))
    seed = tvm.runtime.tensor(np.stack([np.full(lanes, 0.5, np.float32),
                                        np.full(lanes, 1.0, np.float32)]))
    out = tvm.runtime.tensor(np.zeros((threads, _PEAK_CHAINS, lanes), np.float32))
    flops_per_iter = 2.0 * threads * _PEAK_CHAINS * lanes
    iters = 1 << 14
    while True:  # size a call to about `seconds` (at least one timed call of 2 ms)
        t = _timed_call(fn, seed, out, iters)
        if t >= min(seconds, 0.002) or iters >= 1 << 30:
            break
        iters *= 4
    iters = max(1, min(1 << 30, int(iters * seconds / max(t, 1e-9))))
    best = min(_timed_call(fn, seed, out, iters) for _ in range(max(1, repeats)))
    return flops_per_iter * iters / best / 1e9


def _timed_call(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def sgemm_gflops(threads: int = 1, n: int = 2048, repeats: int = 3) -> float:
    """GFLOP/s of ``torch.mm`` of two ``n x n`` float32 matrices on ``threads`` torch threads
    (best of ``repeats`` calls after a warm-up): the practical ceiling a tuned BLAS reaches."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        out = torch.empty(n, n)
        torch.mm(a, b, out=out)
        best = min(_timed_call(lambda: torch.mm(a, b, out=out)) for _ in range(max(1, repeats)))
    finally:
        torch.set_num_threads(old)
    return 2.0 * n ** 3 / best / 1e9
