"""A built hash/gather pair called on torch tensors (:class:`Kernels`).

:func:`lookupc.runtime.build.build` and :class:`lookupc.runtime.build.Library` hand out
:class:`Kernels`; the providers (:mod:`lookupc.runtime.cpu`) call them. ``Kernels.hash(x,
weight, hash_bias, decay) -> (codes, scores)`` and ``Kernels.gather(codes, scores, tables,
bias) -> y`` take torch tensors (the module layout of ``weight``; the folded layout,
:func:`lookupc.kernels.fold.fold_weight`, is derived and cached per weight tensor and
version); ``Kernels.hash_fn`` / ``gather_fn`` are the raw TVM functions (see
``lookupc.kernels.forward`` for their signatures; the hash writes ``n`` rounded up to
``Kernels.token_tile`` rows). :func:`kernel_symbols` names the two functions in a built
module or an exported library. Kernels run on the tensors' own memory through DLPack (no
copies); TVM's vectorised code assumes 64-byte aligned buffers, so a misaligned view
(e.g. ``x[1:]``) is cloned once into an aligned tensor instead of crashing.
"""

from __future__ import annotations

import weakref
from typing import Any

from ..errors import KernelNotFoundError, LookupcInputError
from ..kernels.fold import fold_weight
from ..kernels.shapes import KernelShapes
from .training import aligned

__all__ = ["Kernels", "kernel_symbols", "table_dtype_of"]


def table_dtype_of(tables) -> str:
    """``KernelShapes.table_dtype`` of a torch table tensor."""
    return str(tables.dtype).replace("torch.", "")


def kernel_symbols(shapes: KernelShapes, fold: bool, token_tile: int) -> tuple[str, str]:
    """Global symbols of the hash (per weight layout and token tile) and the gather."""
    layout = "f" if fold else "u"
    return (f"lookupc_hash_{shapes.key}__{layout}{token_tile}",
            f"lookupc_gather_{shapes.key}")


class Kernels:
    """A compiled hash/gather pair for one :class:`KernelShapes` (either may be absent)."""

    def __init__(self, shapes: KernelShapes, module: Any, fold: bool, token_tile: int,
                 schedule: str, parts=("hash", "gather")):
        from .. import tvm_shim

        self.shapes, self.module, self.fold, self.token_tile = shapes, module, fold, token_tile
        self.schedule = schedule
        hash_sym, gather_sym = kernel_symbols(shapes, fold, token_tile)
        self.hash_fn = tvm_shim.get_function(module, hash_sym) if "hash" in parts else None
        self.gather_fn = tvm_shim.get_function(module, gather_sym) if "gather" in parts else None
        self._folded: dict[int, tuple] = {}

    def prepare_weight(self, weight):
        """The weight in the layout the hash kernel takes (folded copies are cached)."""
        import torch

        if not self.fold:
            return aligned(weight.detach().to(torch.float32))
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
            self.hash_fn(aligned(x), self.prepare_weight(weight), aligned(hash_bias),
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
        args = [aligned(codes), aligned(scores), aligned(tables)]
        if tables.dtype == torch.int8:
            args.append(aligned(scale))
        self.gather_fn(*args, aligned(bias), y)
        return y
