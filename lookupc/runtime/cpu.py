"""Compiled TVM kernels behind the lookupc ops: build, cache, dispatch, export.

Importing this module is cheap (no TVM import); it registers the kernel providers
``"naive"``, ``"cpu"`` (alias ``"hand"``) and ``"tuned"`` with :mod:`lookupc.dispatch`, so
``with lookupc.set_schedule("cpu"): model(x)`` runs the lookupc ops through TVM kernels
on float32 CPU tensors (other dtypes/devices use the reference). Under ``"cpu"`` and
``"tuned"`` the backward ops run TVM kernels too (``lookupc.runtime.cpu_training``); ``"naive"``
keeps the reference math for the backward.

Python API
----------
``KernelShapes(d_in, d_out, tables, bits, block_size, repeats)``
    Frozen dataclass fixing one kernel pair; ``KernelShapes.of(lookup_ffn_module)``.
``build(shapes, target=None, schedule="cpu", tuning_db=None) -> Kernels``
    Compiles (or fetches from cache) the hash and gather kernels. ``Kernels.hash(x,
    weight, hash_bias, decay) -> (codes, scores)`` and ``Kernels.gather(codes, scores,
    tables, bias) -> y`` take torch tensors (module layout of ``weight``; the folded
    layout is derived and cached per weight tensor and version); ``Kernels.hash_fn`` /
    ``gather_fn`` are the raw TVM functions (see ``lookupc.kernels.forward`` for their
    signatures; the hash writes ``n`` rounded up to ``Kernels.token_tile`` rows).
``export_library(shapes_list, target, schedule, path, tuning_db=None) -> path``
    One shared library with the kernels of several shape sets; works for any ``mcpu``
    LLVM knows (cross-compiling: nothing is run). ``load_library(path)`` loads it back;
    ``Library.kernels(shapes)`` gives the same ``Kernels`` interface.
``tune(shapes_list, target, db_dir, trials)``
    MetaSchedule tuning into a persistent JSON database (``schedules/tuned.py``).

Targets are ``lookupc.tvm_shim.make_target`` specs: ``None`` (this host), a dict
``{"kind": "llvm", "mcpu": "znver2"}`` or a ``tvm.target.Target``.

Decay is a runtime scalar argument of the hash kernel (one build serves any decay).

Caching: built modules are kept in memory per (shapes, target, schedule, database) and
on disk as shared libraries in ``$LOOKUPC_CACHE_DIR`` (default ``~/.cache/lookupc/kernels``)
named by a SHA-256 of the kernels' TVMScript, the target, the schedule's source and
knobs (for ``tuned``: the chosen knobs), and the TVM and lookupc versions.
``$LOOKUPC_CACHE_DIR=off`` disables the disk cache. :func:`cache_info` reports hits.

Memory: kernels run on the tensors' own memory through DLPack (no copies). TVM's
vectorised code assumes 64-byte aligned buffers; a misaligned view (e.g. ``x[1:]``)
is cloned once into an aligned tensor instead of crashing.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from typing import Any

from ..errors import KernelNotFoundError, LookupcIndexError, LookupcInputError, LookupcTypeError
from ..kernels.shapes import KernelShapes

__all__ = ["KernelShapes", "Kernels", "Library", "build", "export_library", "load_library",
           "tune", "fold_weight", "cache_info", "clear_memory_cache", "cache_dir"]


def hadamard(n: int, dtype=None):
    """Sylvester Hadamard matrix H_n (entries +-1) as a torch tensor."""
    import torch

    h = torch.ones(1, 1, dtype=dtype or torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def fold_weight(weight):
    """BH4 weight [R, 4, D/BS, BS(out), BS(in)] -> folded [R, 4, D/BS, BS(in), BS(out)].

    Block ``b`` becomes ``(H_BS @ W_b)^T``: the BS-wide factor of every round's
    Hadamard transform moves into the blocks (``H_D = H_{D/BS} (x) H_BS``), computed in
    float64 and rounded once to float32.
    """
    import torch

    bs = weight.shape[-1]
    h = hadamard(bs).to(weight.device)
    folded = torch.einsum("po,rjboi->rjbip", h, weight.detach().double())
    return folded.to(torch.float32).contiguous()


def _gather_only(tables: int, bits: int, d_out: int,
                 table_dtype: str = "float32") -> KernelShapes:
    """Shapes for a gather-only build (the gather does not depend on d_in/BS/R)."""
    return KernelShapes(1, d_out, tables, bits, 1, tables * bits, table_dtype)


def table_dtype_of(tables) -> str:
    """``KernelShapes.table_dtype`` of a torch table tensor."""
    return str(tables.dtype).replace("torch.", "")


def _check_codes(codes, rows: int) -> None:
    """Codes must index the tables. NumPy, single-threaded: a torch reduction here wakes
    torch's OpenMP pool between two TVM kernels, and on few cores the two pools' spinning
    threads then slow both (measured: 8 ms of a 22 ms MiniLM-sized op at 1024 tokens)."""
    if codes.numel():
        flat = codes.detach().contiguous().numpy()
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= rows:
            raise LookupcIndexError(f"lookupc.gather: codes must be in [0, {rows}), got [{lo}, {hi}]")


# ----------------------------------------------------------------------------- caching
_LOCK = threading.RLock()
_MEMORY: dict[tuple, "Kernels"] = {}
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


def _symbols(shapes: KernelShapes, fold: bool, token_tile: int) -> tuple[str, str]:
    layout = "f" if fold else "u"
    return (f"lookupc_hash_{shapes.key}__{layout}{token_tile}",
            f"lookupc_gather_{shapes.key}")


def _aligned(t):
    """``t`` itself when contiguous and 64-byte aligned, else an aligned contiguous copy."""
    if not t.is_contiguous() or t.data_ptr() % 64:
        return t.clone(memory_format=__import__("torch").contiguous_format)
    return t


class Kernels:
    """A compiled hash/gather pair for one :class:`KernelShapes` (either may be absent)."""

    def __init__(self, shapes: KernelShapes, module: Any, fold: bool, token_tile: int,
                 schedule: str, parts=("hash", "gather")):
        from .. import tvm_shim

        self.shapes, self.module, self.fold, self.token_tile = shapes, module, fold, token_tile
        self.schedule = schedule
        hash_sym, gather_sym = _symbols(shapes, fold, token_tile)
        self.hash_fn = tvm_shim.get_function(module, hash_sym) if "hash" in parts else None
        self.gather_fn = tvm_shim.get_function(module, gather_sym) if "gather" in parts else None
        self._folded: dict[int, tuple] = {}

    def prepare_weight(self, weight):
        """The weight in the layout the hash kernel takes (folded copies are cached)."""
        import torch

        if not self.fold:
            return _aligned(weight.detach().to(torch.float32))
        key = id(weight)
        version = getattr(weight, "_version", None)
        hit = self._folded.get(key)
        if hit is not None:
            ref, ptr, ver, folded = hit
            if ref() is weight and ptr == weight.data_ptr() and ver == version:
                return folded
        folded = fold_weight(weight)
        try:
            ref = weakref.ref(weight)
        except TypeError:
            return folded
        if len(self._folded) > 64:
            self._folded.clear()
        self._folded[key] = (ref, weight.data_ptr(), version, folded)
        return folded

    def hash(self, x, weight, hash_bias, decay: float):
        """codes (int32) and scores [N, tables] of x [N, d_in] (float32 CPU tensors)."""
        import torch

        if self.hash_fn is None:
            raise KernelNotFoundError(f"no hash kernel was built for {self.shapes}")
        n, h = x.shape[0], self.shapes.tables
        rows = -(-n // self.token_tile) * self.token_tile
        codes = torch.empty(rows, h, dtype=torch.int32)
        scores = torch.empty(rows, h, dtype=torch.float32)
        if n:
            self.hash_fn(_aligned(x), self.prepare_weight(weight), _aligned(hash_bias),
                         float(decay), codes, scores)
        return codes[:n], scores[:n]

    def gather(self, codes, scores, tables, bias, scale=None):
        """y [N, d_out] = bias + sum_k scores[:, k] * tables[k, codes[:, k]].

        ``tables`` in ``shapes.table_dtype`` (a bfloat16 tensor is passed as its int16 bits;
        int8 tables need their row ``scale`` [tables, rows]).
        """
        import torch

        if self.gather_fn is None:
            raise KernelNotFoundError(f"no gather kernel was built for {self.shapes}")
        if table_dtype_of(tables) != self.shapes.table_dtype:
            raise LookupcInputError(f"lookupc.gather: tables are {tables.dtype} but the kernel "
                                    f"was built for {self.shapes.table_dtype} tables")
        y = torch.empty(codes.shape[0], self.shapes.d_out, dtype=torch.float32)
        if not codes.shape[0]:
            return y
        if tables.dtype == torch.bfloat16:
            tables = tables.contiguous().view(torch.int16)
        args = [_aligned(codes), _aligned(scores), _aligned(tables)]
        if tables.dtype == torch.int8:
            args.append(_aligned(scale))
        self.gather_fn(*args, _aligned(bias), y)
        return y


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

    hash_sym, gather_sym = _symbols(shapes, sched.fold, sched.token_tile)
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

        gather_sym = _symbols(shapes, True, 1)[1]
        if tvm_shim.get_function(self.module, gather_sym) is None:
            raise KernelNotFoundError(f"{self.path} has no kernels for {shapes}")
        for fold in (True, False):
            for tile in (1, 2, 4, 8, 16, 32, 64):
                if tvm_shim.get_function(self.module, _symbols(shapes, fold, tile)[0]):
                    return Kernels(shapes, self.module, fold, tile, "library")
        raise KernelNotFoundError(f"{self.path} has no hash kernel for {shapes}")


def load_library(path: str) -> Library:
    """Load a shared library written by :func:`export_library`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no kernel library at {path}")
    return Library(path)


def tune(shapes_list, target: Any, db_dir: str, trials: int, **kwargs) -> str:
    """Tune the hash and gather of every shape set into the MetaSchedule database ``db_dir``.

    Resumable: records already in the database are kept and their knob settings are not
    measured again; progress is printed. See ``schedules/tuned.py``. Returns ``db_dir``.

    ``rpc="HOST:PORT", rpc_key="KEY"`` measure on a remote board through a TVM RPC tracker
    (``target`` is the board's); a tracker that does not answer within ``rpc_timeout``
    seconds (default 10) or has no server under the key raises
    :class:`~lookupc.errors.LookupcError` before any tuning.
    """
    from .. import tvm_shim
    from ..schedules.cpu.tuned import tune as _tune

    return _tune(list(dict.fromkeys(shapes_list)), tvm_shim.make_target(target), db_dir,
                 trials, **kwargs)


# ----------------------------------------------------------------------------- providers
class TvmProvider:
    """Kernel provider for :mod:`lookupc.dispatch`: float32 CPU tensors, one schedule."""

    def __init__(self, schedule: str, target: Any = None, tuning_db: str | None = None):
        self.schedule, self.target, self.tuning_db = schedule, target, tuning_db
        self.name = schedule

    def supports(self, device, dtype) -> bool:
        import torch

        return device.type == "cpu" and dtype == torch.float32

    def _kernels(self, shapes: KernelShapes, part: str) -> Kernels:
        return build(shapes, self.target, self.schedule, self.tuning_db, parts=(part,))

    def hash(self, x, weight, hash_bias, decay, bits):
        r, _, nb, bs, _ = weight.shape
        shapes = KernelShapes(x.shape[1], 1, hash_bias.shape[0] // bits, bits, bs, r)
        if nb * bs != shapes.width:  # weights padded wider than next_pow2(d_in)
            from .. import dispatch

            return dispatch._REFERENCE.hash(x, weight, hash_bias, decay, bits)
        return self._kernels(shapes, "hash").hash(x, weight, hash_bias, decay)

    def gather(self, codes, scores, tables, bias, scale=None):
        h, rows, d_out = tables.shape
        codes = codes.to(__import__("torch").int32)
        _check_codes(codes, rows)
        shapes = _gather_only(h, rows.bit_length() - 1, d_out, table_dtype_of(tables))
        return self._kernels(shapes, "gather").gather(codes, scores, tables, bias, scale)

    def gather_quantized(self, codes, scores, tables, scale, bias):
        return self.gather(codes, scores, tables, bias, scale)

    # Backward: "cpu" and "tuned" run the hand-scheduled CPU training kernels (shared by
    # both, ``lookupc.runtime.cpu_training``); "naive", there to check the forward TIR as written,
    # keeps the reference math.
    def _training(self):
        from .cpu_training import for_target

        return for_target(self.target)

    def hash_backward(self, grad_scores, x, weight, hash_bias, decay, bits):
        if self.schedule == "naive":
            from ..reference import hash_backward

            return hash_backward(grad_scores, x, weight, hash_bias, decay, bits)
        return self._training().hash_backward(grad_scores, x, weight, hash_bias, decay, bits)

    def gather_backward(self, grad_y, codes, scores, tables):
        if self.schedule == "naive":
            from ..reference import gather_backward

            return gather_backward(grad_y, codes, scores, tables)
        return self._training().gather_backward(grad_y, codes, scores, tables)


def _register() -> None:
    from ..dispatch import register_provider
    from ..schedules.registry import schedule_names

    for name in schedule_names():
        register_provider(name, lambda name=name: TvmProvider(name))


_register()
