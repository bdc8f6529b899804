"""What the TIR training-kernel orchestrators share (``runtime.cuda_training``, ``runtime.cpu_training``).

:class:`KernelCache` builds each kernel once per key and keeps it (thread-safe); a
subclass says how to build (``_build``). :func:`disk_cached` keeps compiled CPU
modules as shared libraries in the kernel cache directory (the one
``lookupc.runtime.build`` uses), so a new process loads instead of compiling. The rest is
small glue on torch tensors: token padding, alignment, the sort of the segment
reduction.

Importing this module is cheap (no TVM or torch import).
"""

from __future__ import annotations

import abc
import hashlib
import os
import threading
from typing import TYPE_CHECKING, Any, Callable

from ..errors import KernelNotFoundError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["KernelCache", "Kernel", "cache_root", "disk_cached", "hashed_name", "ceil_to",
           "pad_rows",
           "aligned", "segments"]


def ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_rows(t: Tensor, rows: int) -> Tensor:
    """``t`` with zero rows appended up to ``rows`` (``t`` itself when already there)."""
    import torch.nn.functional as F

    return t if t.shape[0] == rows else F.pad(t, (0, 0, 0, rows - t.shape[0]))


def aligned(t: Tensor) -> Tensor:
    """``t`` when contiguous and 64-byte aligned (what TVM's CPU code assumes), else an
    aligned contiguous copy."""
    import torch

    if not t.is_contiguous() or t.data_ptr() % 64:
        return t.clone(memory_format=torch.contiguous_format)
    return t


def segments(codes: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Pair ids sorted by global table row, and the CSR row offsets (both int32)."""
    import torch

    n, h = codes.shape
    row = (codes.long() + torch.arange(h, device=codes.device) * rows).reshape(-1)
    order = torch.argsort(row, stable=True).to(torch.int32)
    offsets = torch.zeros(h * rows + 1, dtype=torch.int64, device=codes.device)
    offsets[1:] = torch.cumsum(torch.bincount(row, minlength=h * rows), 0)
    return order, offsets.to(torch.int32)


def cache_root() -> str | None:
    """Directory of the on-disk kernel cache (``$LOOKUPC_CACHE_DIR``, default
    ``~/.cache/lookupc/kernels``), or None when set to ``off``/``0``/``none``."""
    path = os.environ.get("LOOKUPC_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "lookupc", "kernels")
    return None if path.lower() in ("off", "0", "none") else path


def disk_cached(file_name: str, compile_fn: Callable[[], Any], root: str | None,
                stats: dict | None = None) -> Any:
    """The module compiled by ``compile_fn``, via the shared library ``root/file_name``.

    Loads the library when present; otherwise compiles, then writes it atomically (a
    missing C++ compiler or a read-only directory only skips the write). ``root=None``
    always compiles. The name must capture everything the code depends on. ``stats``,
    when given, counts ``disk_hits`` and ``builds``.
    """
    from .. import tvm_shim

    def count(what: str) -> None:
        if stats is not None:
            stats[what] = stats.get(what, 0) + 1

    path = os.path.join(root, file_name) if root is not None else None
    if path is not None and os.path.exists(path):
        try:
            module = tvm_shim.load_module(path)
            count("disk_hits")
            return module
        except Exception:  # noqa: BLE001 - a corrupt cache entry is rebuilt below
            pass
    count("builds")
    module = compile_fn()
    if path is None:
        return module
    try:
        os.makedirs(root, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.so"
        tvm_shim.export_library(module, tmp)
        os.replace(tmp, path)  # atomic: concurrent builders never see half a file
    except Exception:  # noqa: BLE001 - no compiler / read-only dir: keep it in memory only
        pass
    return module


def hashed_name(prefix: str, key_text: str) -> str:
    """A cache file name for ``key_text``: ``prefix`` + 32 hex digits of its SHA-256 + .so."""
    return prefix + hashlib.sha256(key_text.encode()).hexdigest()[:32] + ".so"


class Kernel:
    """A built function plus its module (kept alive); ``on_cuda`` calls run on torch's
    current CUDA stream."""

    def __init__(self, module, name: str, on_cuda: bool = False):
        from .. import tvm_shim

        self.executable, self.name, self.on_cuda = module, name, on_cuda
        self.fn = tvm_shim.get_function(module, name)
        if self.fn is None:
            raise KernelNotFoundError(f"the built module has no function {name!r}")

    def __call__(self, *args):
        if self.on_cuda:
            from .. import tvm_shim

            with tvm_shim.torch_stream():
                return self.fn(*args)
        return self.fn(*args)


class KernelCache(abc.ABC):
    """Built kernels by key; each key is built once (``_build``, under a lock)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, Kernel] = {}
        self._lock = threading.Lock()

    @property
    def builds(self) -> int:
        """Number of kernels built (or loaded) so far."""
        return len(self._cache)

    def kernel(self, key: tuple, make: Callable[[], Any], schedule: Callable[..., Any]) -> Kernel:
        """The kernel for ``key``: ``make()`` gives the PrimFunc, ``schedule`` schedules it
        (how it is called is up to ``_build``)."""
        fn = self._cache.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._cache.get(key)
            if fn is None:
                fn = self._cache[key] = self._build(key, make, schedule)
        return fn

    @abc.abstractmethod
    def _build(self, key: tuple, make: Callable[[], Any], schedule: Callable[..., Any]) -> Kernel:
        """Build the kernel for ``key`` (each orchestrator: its target and schedules)."""
