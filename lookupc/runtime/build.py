"""Building the forward CPU kernels: compile, cache, export to a library, tune.

``build(shapes, target=None, schedule="cpu", tuning_db=None) -> Kernels`` compiles (or
fetches from cache) the hash and gather TensorIR (``lookupc.kernels.forward``) scheduled by
``lookupc.schedules`` into a :class:`~lookupc.runtime.compiled.Kernels` pair.
``export_library(shapes_list, target, schedule, path, tuning_db=None) -> path`` writes one
shared library with the kernels of several shape sets; it works for any ``mcpu`` LLVM
knows (cross-compiling: nothing is run). ``load_library(path)`` loads it back and
``Library.kernels(shapes)`` gives the same ``Kernels`` interface. ``tune(shapes_list,
target, db_dir, trials)`` runs MetaSchedule tuning into a persistent JSON database
(``schedules/cpu/tuned.py``). Targets are ``lookupc.tvm_shim.make_target`` specs: ``None``
(this host), a dict ``{"kind": "llvm", "mcpu": "znver2"}`` or a ``tvm.target.Target``.
Decay is a runtime scalar argument of the hash kernel (one build serves any decay).
Caching: built modules are kept in memory per (shapes, target, schedule, database) and on
disk as shared libraries in ``$LOOKUPC_CACHE_DIR`` (default ``~/.cache/lookupc/kernels``)
named by a SHA-256 of the kernels' TVMScript, the target, the schedule's source and knobs
(for ``tuned``: the chosen knobs), and the TVM and lookupc versions.
``$LOOKUPC_CACHE_DIR=off`` disables the disk cache; :func:`cache_info` reports hits.
Importing this module is cheap (no TVM import).
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

from ..errors import KernelNotFoundError, LookupcInputError, LookupcTypeError
from ..kernels.shapes import KernelShapes
from .compiled import Kernels, kernel_symbols

__all__ = ["build", "export_library", "Library", "load_library", "tune", "cache_info",
           "clear_memory_cache", "cache_dir"]


# ----------------------------------------------------------------------------- caching
_LOCK = threading.RLock()
_MEMORY: dict[tuple, Kernels] = {}
_STATS = {"memory_hits": 0, "disk_hits": 0, "builds": 0}


def cache_dir() -> str | None:
    """Directory of the on-disk kernel cache, or None when disabled."""
    from .training import cache_root

    return cache_root()


def cache_info() -> dict:
    """Counters: ``memory_hits``, ``disk_hits``, ``builds`` (compilations)."""
    return dict(_STATS)


def clear_memory_cache() -> None:
    """Forget the in-memory modules (the disk cache stays)."""
    with _LOCK:
        _MEMORY.clear()


# ----------------------------------------------------------------------------- building
def _resolve(target: Any, schedule: str, tuning_db: str | None):
    from .. import tvm_shim
    from ..schedules.registry import get_schedule

    tgt = tvm_shim.make_target(target)
    if not isinstance(schedule, str):  # a schedule object (e.g. CpuSchedule(lanes=16))
        if not schedule.applies_to(tgt):
            raise LookupcInputError(f"schedule {schedule.name!r} does not apply to {tgt}")
        return tgt, schedule
    return tgt, get_schedule(schedule, tgt, tuning_db)


def _prim_funcs(shapes: KernelShapes, sched: Any, tgt: Any, parts) -> dict:
    """Unscheduled and scheduled PrimFuncs by symbol."""
    from ..kernels import forward as tir_kernels

    hash_sym, gather_sym = kernel_symbols(shapes, sched.fold, sched.token_tile)
    funcs = {}
    if "hash" in parts:
        raw = tir_kernels.make_hash(shapes, fold=sched.fold, token_tile=sched.token_tile)
        funcs[hash_sym] = (raw, lambda raw=raw: sched.hash(raw, shapes, tgt))
    if "gather" in parts:
        raw = tir_kernels.make_gather(shapes)
        funcs[gather_sym] = (raw, lambda raw=raw: sched.gather(raw, shapes, tgt))
    return funcs


def _cache_key(funcs: dict, tgt: Any, sched: Any, extra: str = "") -> str:
    import lookupc

    from .. import tvm_shim
    from ..schedules.registry import source_token

    h = hashlib.sha256()
    for sym in sorted(funcs):
        h.update(sym.encode())
        h.update(tvm_shim.script_of(funcs[sym][0]).encode())
    h.update(str(tgt).encode())
    h.update(f"{sched.name}|{source_token(sched)}|{tvm_shim.tvm_version()}|"
             f"{lookupc.__version__}|{extra}".encode())
    return h.hexdigest()[:32]


def _compile(funcs: dict, tgt: Any, sched: Any):
    """Compile the scheduled PrimFuncs; a schedule may adjust the codegen target."""
    from .. import tvm_shim

    tvm = tvm_shim.tvm
    mod = tvm.IRModule({sym: make().with_attr("global_symbol", sym)
                        for sym, (_, make) in funcs.items()})
    codegen_target = getattr(sched, "codegen_target", None)
    return tvm_shim.compile_module(mod, codegen_target(tgt) if codegen_target else tgt)


def _build_module(shapes: KernelShapes, tgt: Any, sched: Any, parts) -> Any:
    """Runtime module with the requested kernels, via the disk cache when enabled."""
    from .training import disk_cached

    funcs = _prim_funcs(shapes, sched, tgt, parts)
    return disk_cached(_cache_key(funcs, tgt, sched) + ".so", lambda: _compile(funcs, tgt, sched),
                       cache_dir(), _STATS)


def build(lookup_shapes: KernelShapes, target: Any = None, schedule: str = "cpu",
          tuning_db: str | None = None, parts=("hash", "gather")) -> Kernels:
    """Compile (or fetch from cache) the kernels for ``lookup_shapes``.

    Parameters
    ----------
    lookup_shapes : KernelShapes
        Sizes of the LookupFFN (``KernelShapes.of(module)``).
    target : None, dict or tvm.target.Target
        CPU target; None = this host (``mcpu`` detected by LLVM).
    schedule : str or schedule object
        ``"naive"``, ``"cpu"``/``"hand"`` or ``"tuned"``, or a schedule object such as
        ``lookupc.schedules.cpu.hand.CpuSchedule(lanes=16)``.
    tuning_db : str, optional
        MetaSchedule work directory for ``"tuned"``.
    parts : tuple of str
        Which kernels to build (``"hash"``, ``"gather"``).

    Examples
    --------
    >>> k = build(KernelShapes.of(ffn))                                  # doctest: +SKIP
    >>> codes, scores = k.hash(x, ffn.bh4_weight, ffn.hash_bias, 0.7)    # doctest: +SKIP
    """
    if not isinstance(lookup_shapes, KernelShapes):
        raise LookupcTypeError(f"build() needs KernelShapes, got {type(lookup_shapes).__name__}")
    parts = tuple(sorted(set(parts)))
    if not parts or set(parts) - {"hash", "gather"}:
        raise LookupcInputError(f"parts must be a subset of ('hash', 'gather'), got {parts}")
    tgt, sched = _resolve(target, schedule, tuning_db)
    mem_key = (lookup_shapes, str(tgt), sched.name, sched.cache_token(), parts)
    with _LOCK:
        hit = _MEMORY.get(mem_key)
        if hit is not None:
            _STATS["memory_hits"] += 1
            return hit
        module = _build_module(lookup_shapes, tgt, sched, parts)
        kernels = Kernels(lookup_shapes, module, sched.fold, sched.token_tile, sched.name, parts)
        _MEMORY[mem_key] = kernels
        return kernels


# ----------------------------------------------------------------------------- libraries
def export_library(shapes_list, target: Any, schedule: str, path: str,
                   tuning_db: str | None = None) -> str:
    """Compile the kernels of every shape set in ``shapes_list`` into one shared library.

    Nothing is run, so ``target`` may name any CPU LLVM knows (cross-compilation).
    Linking needs a C++ compiler on this machine. Returns ``path``.
    """
    from .. import tvm_shim

    tgt, sched = _resolve(target, schedule, tuning_db)
    funcs: dict = {}
    for shapes in dict.fromkeys(shapes_list):
        funcs.update(_prim_funcs(shapes, sched, tgt, ("gather", "hash")))
    if not funcs:
        raise LookupcInputError("export_library needs at least one KernelShapes")
    executable = _compile(funcs, tgt, sched)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tvm_shim.export_library(executable, path)
    return path


class Library:
    """Kernels loaded from a library written by :func:`export_library`."""

    def __init__(self, path: str):
        from .. import tvm_shim

        self.path = path
        self.module = tvm_shim.load_module(path)

    def kernels(self, shapes: KernelShapes) -> Kernels:
        """The hash/gather pair for ``shapes``; raises KeyError when not in the library."""
        from .. import tvm_shim

        gather_sym = kernel_symbols(shapes, True, 1)[1]
        if tvm_shim.get_function(self.module, gather_sym) is None:
            raise KernelNotFoundError(f"{self.path} has no kernels for {shapes}")
        for fold in (True, False):
            for tile in (1, 2, 4, 8, 16, 32, 64):
                if tvm_shim.get_function(self.module, kernel_symbols(shapes, fold, tile)[0]):
                    return Kernels(shapes, self.module, fold, tile, "library")
        raise KernelNotFoundError(f"{self.path} has no hash kernel for {shapes}")


def load_library(path: str) -> Library:
    """Load a shared library written by :func:`export_library`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no kernel library at {path}")
    return Library(path)


# ----------------------------------------------------------------------------- tuning
def tune(shapes_list, target: Any, db_dir: str, trials: int, **kwargs) -> str:
    """Tune the hash and gather of every shape set into the MetaSchedule database ``db_dir``.

    Resumable: records already in the database are kept and their knob settings are not
    measured again; progress is printed. See ``schedules/cpu/tuned.py``. Returns ``db_dir``.

    ``rpc="HOST:PORT", rpc_key="KEY"`` measure on a remote board through a TVM RPC tracker
    (``target`` is the board's); a tracker that does not answer within ``rpc_timeout``
    seconds (default 10) or has no server under the key raises
    :class:`~lookupc.errors.LookupcError` before any tuning.
    """
    from .. import tvm_shim
    from ..schedules.cpu.tuned import tune as _tune

    return _tune(list(dict.fromkeys(shapes_list)), tvm_shim.make_target(target), db_dir,
                 trials, **kwargs)
