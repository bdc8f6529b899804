"""The TVM kernel providers ``naive``, ``cpu`` (alias ``hand``) and ``tuned`` (:class:`TvmProvider`).

Importing this module is cheap (no TVM import); it registers the kernel providers
``"naive"``, ``"cpu"`` (alias ``"hand"``) and ``"tuned"`` with :mod:`lookupc.dispatch`, so
``with lookupc.set_schedule("cpu"): model(x)`` runs the lookupc ops through TVM kernels
on float32 CPU tensors (other dtypes/devices use the reference). Under ``"cpu"`` and
``"tuned"`` the backward ops run TVM kernels too (``lookupc.runtime.cpu_training``); ``"naive"``
keeps the reference math for the backward.

The kernels themselves are built, cached, exported and tuned by :mod:`lookupc.runtime.build`
(``build``, ``export_library``, ``load_library``, ``tune``) and called as
:class:`lookupc.runtime.compiled.Kernels`; the folded weight layout is
:func:`lookupc.kernels.fold.fold_weight`. Shapes are :class:`lookupc.kernels.shapes.KernelShapes`.
"""

from __future__ import annotations

from typing import Any

from ..errors import LookupcIndexError
from ..kernels.shapes import KernelShapes
from .build import build
from .build import tune as tune  # re-export: bench/ffn.py calls K.tune (drop when it imports .build)
from .compiled import Kernels, table_dtype_of

__all__ = ["TvmProvider"]


def _gather_only(tables: int, bits: int, d_out: int,
                 table_dtype: str = "float32") -> KernelShapes:
    """Shapes for a gather-only build (the gather does not depend on d_in/BS/R)."""
    return KernelShapes(1, d_out, tables, bits, 1, tables * bits, table_dtype)


def _check_codes(codes, rows: int) -> None:
    """Codes must index the tables. NumPy, single-threaded: a torch reduction here wakes
    torch's OpenMP pool between two TVM kernels, and on few cores the two pools' spinning
    threads then slow both (measured: 8 ms of a 22 ms MiniLM-sized op at 1024 tokens)."""
    if codes.numel():
        flat = codes.detach().contiguous().numpy()
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= rows:
            raise LookupcIndexError(f"lookupc.gather: codes must be in [0, {rows}), got [{lo}, {hi}]")


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
