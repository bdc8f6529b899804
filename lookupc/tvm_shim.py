"""Every TVM-version-specific call lookupc makes, in one place (TVM 0.27, apache-tvm-ffi 0.1.14).

Other modules import TVM through this shim so that a TVM upgrade touches one file.
Importing it sets the CPU thread-pool environment *before* TVM creates its pool
(TVM's default on x86 is ``hardware_concurrency() / 2`` threads, i.e. one thread on a
2-vCPU machine, and it pins the main thread, and so torch, to core 0):

- ``TVM_NUM_THREADS`` defaults to ``os.cpu_count()``;
- ``TVM_BIND_THREADS`` defaults to ``0`` (no pinning);
- ``TVM_THREAD_POOL_SPIN_COUNT`` defaults to ``1000``. TVM's workers otherwise spin for
  300,000 iterations after each parallel kernel, and in a model the next op is usually
  torch's (attention, LayerNorm) on its own OpenMP pool: on a 2-core machine the spinning
  TVM threads took the cores from torch's and a LookupFFN followed by three torch matmuls
  ran in 64 ms instead of 29 ms (``bench``-style interleaved timing, MiniLM-sized FFN at
  1024 tokens); the kernels alone lose nothing measurable at 1000.

Both are ``setdefault``: values already in the environment win.

Targets
    :func:`make_target` builds an ``llvm`` CPU target from ``None`` (this host), a kind
    name (``"llvm"``), a dict (``{"kind": "llvm", "mcpu": "znver2"}``), an ``mcpu``
    keyword or a ready ``tvm.target.Target``. It validates ``mcpu`` with LLVM
    (``Target`` itself accepts any name) and adds ``num-cores`` (MetaSchedule needs it).
    String forms like ``"llvm -mcpu=znver2"`` are rejected by TVM 0.27; pass a dict.

>>> from lookupc import tvm_shim
>>> tvm_shim.make_target({"kind": "llvm", "mcpu": "znver2"}).attrs["mcpu"]
'znver2'
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("TVM_BIND_THREADS", "0")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")

import tvm  # noqa: E402
from tvm.target import codegen as _codegen  # noqa: E402

from .errors import LookupcInputError  # noqa: E402

__all__ = [
    "tvm", "Schedule", "tvm_version", "host_cpu", "host_triple", "llvm_get_system_cpu",
    "llvm_is_valid_cpu", "is_valid_cpu", "make_target", "target_mcpu", "is_cpu_target",
    "vector_lanes", "with_llvm_options", "compile_module", "export_library", "load_module", "setup_threads",
    "num_threads", "to_tvm", "script_of",
]

Schedule = tvm.s_tir.Schedule


def tvm_version() -> str:
    """Version string of the TVM build in use (part of kernel cache keys)."""
    return str(tvm.__version__)


def llvm_get_system_cpu() -> str:
    """LLVM's name of the host CPU (``"znver3"``...)."""
    return str(_codegen.llvm_get_system_cpu())


def host_cpu() -> str:
    """Alias of :func:`llvm_get_system_cpu`."""
    return llvm_get_system_cpu()


def host_triple() -> str:
    """LLVM target triple of the host."""
    return str(_codegen.llvm_get_system_triple())


def llvm_is_valid_cpu(mcpu: str, triple: str | None = None) -> bool:
    """Whether LLVM knows ``mcpu`` for ``triple`` (default: the host triple)."""
    return bool(_codegen.llvm_is_valid_cpu(mcpu, triple or host_triple()))


is_valid_cpu = llvm_is_valid_cpu


def setup_threads(num: int | None = None) -> None:
    """Set the TVM thread-pool size (before the first parallel kernel call)."""
    os.environ["TVM_NUM_THREADS"] = str(num or os.cpu_count() or 1)
    os.environ.setdefault("TVM_BIND_THREADS", "0")


def num_threads() -> int:
    """Threads TVM's CPU pool uses (from ``TVM_NUM_THREADS``)."""
    return int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))


def make_target(spec: Any = None, mcpu: str | None = None,
                num_cores: int | None = None) -> "tvm.target.Target":
    """An llvm CPU target with ``mcpu`` and ``num-cores`` set.

    Parameters
    ----------
    spec : None, str, dict or tvm.target.Target
        ``None`` or ``"llvm"``: this host; a dict: TVM's target dict; a Target: used as is
        (``num-cores`` added if missing).
    mcpu : str, optional
        CPU to compile for (overrides the one in ``spec``); validated with LLVM.
    num_cores : int, optional
        Cores the kernels may use (default: ``os.cpu_count()``).
    """
    if isinstance(spec, tvm.target.Target):
        cfg = dict(spec.export())
    elif spec is None:
        cfg = {"kind": "llvm"}
    elif isinstance(spec, str):
        if " " in spec or spec.startswith("-"):
            raise LookupcInputError(
                f"target {spec!r}: string targets with options are not supported by TVM 0.27; "
                "pass a dict such as {'kind': 'llvm', 'mcpu': 'znver2'}")
        cfg = {"kind": spec}
    elif isinstance(spec, dict):
        cfg = dict(spec)
    else:
        raise LookupcInputError(f"target must be None, a kind name, a dict or a Target, "
                                f"got {type(spec).__name__}")
    for derived in ("keys", "tag"):  # filled in by TVM; re-passing them is redundant
        cfg.pop(derived, None)
    if mcpu is not None:
        cfg["mcpu"] = mcpu
    if cfg.get("kind") == "llvm":
        cfg.setdefault("mcpu", llvm_get_system_cpu())
        triple = cfg.get("mtriple") or host_triple()
        if not llvm_is_valid_cpu(cfg["mcpu"], triple):
            raise LookupcInputError(f"target mcpu {cfg['mcpu']!r} is not a CPU LLVM knows "
                                    f"for {triple}")
        cfg.setdefault("num-cores", int(num_cores or os.cpu_count() or 1))
        if num_cores is not None:
            cfg["num-cores"] = int(num_cores)
    return tvm.target.Target(cfg)


def target_mcpu(target: "tvm.target.Target") -> str:
    """The ``mcpu`` of an llvm target (the host CPU when unset)."""
    mcpu = target.attrs.get("mcpu")
    return str(mcpu) if mcpu else llvm_get_system_cpu()


def is_cpu_target(target: "tvm.target.Target") -> bool:
    """True for llvm (CPU) targets."""
    return target.kind.name == "llvm"


def vector_lanes(target: "tvm.target.Target", bits: int = 32) -> int:
    """SIMD lanes of a ``bits``-wide type on ``target`` (8 fp32 with AVX2, 16 with AVX-512)."""
    # llvm_get_vector_width reports 512 even for AVX2-only CPUs in TVM 0.27; ask for features.
    if _codegen.target_has_features("avx512f", target):
        width = 512
    elif _codegen.target_has_features("avx", target):
        width = 256
    else:
        width = 128
    return max(1, width // bits)


def with_llvm_options(target: "tvm.target.Target", options) -> "tvm.target.Target":
    """``target`` with LLVM command-line options added (TVM 0.27's ``cl-opt`` attribute).

    Options use TVM's typed form, e.g. ``"-vectorize-loops:bool=false"``. TVM applies
    them for the duration of one codegen and restores LLVM's globals afterwards, so they
    do not leak into other builds.
    """
    cfg = dict(target.export())
    for derived in ("keys", "tag"):
        cfg.pop(derived, None)
    cfg["cl-opt"] = [*cfg.get("cl-opt", []), *options]
    return tvm.target.Target(cfg)


def compile_module(mod: Any, target: "tvm.target.Target") -> Any:
    """Compile a PrimFunc or IRModule; returns a ``tvm.runtime.Executable``."""
    return tvm.compile(mod, target=target)


def export_library(executable: Any, path: str) -> None:
    """Write a compiled executable to a shared library (needs a C++ compiler)."""
    executable.export_library(path)


def load_module(path: str) -> Any:
    """Load a shared library written by :func:`export_library` (a ``runtime.Module``)."""
    return tvm.runtime.load_module(path)


def get_function(module: Any, name: str) -> Any | None:
    """Function ``name`` of a runtime module or executable, or None when absent."""
    mod = getattr(module, "mod", module)
    if not mod.implements_function(name, True):
        return None
    return mod.get_function(name, True)


def to_tvm(t: Any) -> Any:
    """Zero-copy view of a torch tensor as a TVM tensor (needs 64-byte alignment)."""
    return tvm.runtime.from_dlpack(t)


def script_of(func: Any) -> str:
    """TVMScript text of a PrimFunc or IRModule (used in cache keys)."""
    return func.script()


# ---------------------------------------------------------------------------------------
# CUDA (added for lookupc.runtime.cuda / schedules/cuda_*.py; TVM 0.27 specifics)
# ---------------------------------------------------------------------------------------

#: Name of the TIR intrinsic that CUDA codegen emits as ``atomicAdd`` (0.27: "tirx.cuda.*";
#: the generic "tirx.atomic_add" has no CUDA lowering). llvm cannot lower it.
CUDA_ATOMIC_ADD = "tirx.cuda.atomic_add"


def cuda_target(arch: str = "sm_90") -> "tvm.target.Target":
    """CUDA target for ``arch`` (``"sm_80"``, ``"sm_90"``...) with an llvm host.

    Builds without a GPU: the device module then holds CUDA source (a fallback module).
    """
    if not (isinstance(arch, str) and arch.startswith("sm_") and arch[3:].isdigit()):
        raise LookupcInputError(f"arch must look like 'sm_90', got {arch!r}")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def region_buffer(region: Any) -> Any:
    """The buffer of a block's read/write region (``.buffer``; ``.source`` in TVM 0.27)."""
    return getattr(region, "buffer", None) or region.source


def specialize_leading_dim(func: Any, size: int, param: int = 0) -> Any:
    """``func`` with dim 0 of buffer parameter ``param`` (a symbolic var) fixed to ``size``.

    In TVM 0.27 PrimFunc parameters are buffers; specialising one to a static-shape
    buffer substitutes its shape variables everywhere.
    """
    buf = func.params[param]
    if not isinstance(buf.shape[0], tvm.tirx.Var):
        return func
    static = tvm.tirx.decl_buffer((int(size), *buf.shape[1:]), buf.dtype, name=buf.name)
    return func.specialize({buf: static})


def torch_stream() -> Any:
    """Context manager: TVM CUDA launches inside it go to torch's current stream."""
    import tvm_ffi

    return tvm_ffi.use_torch_stream()
