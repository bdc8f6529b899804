"""lookupc composed with what a CPU user already does: the rest of the model in int8.

A conversion only replaces the FFNs; attention projections, the pooler and any FFN left
dense stay float32 ``nn.Linear``. :func:`quantize_rest` applies PyTorch's dynamic int8
quantization (``torch.ao.quantization.quantize_dynamic``, qint8 weights, activations
quantized per call) to exactly those, so lookupc adds to the int8 speed-up instead of
competing with it. LookupFFN tables and hash weights stay float32 (they are not
``nn.Linear``). The fidelity cost is measurable with :func:`lookupc.fidelity.measure`
(``bench/e2e.py`` reports it per model).

This works on the converted ``nn.Module`` (eager, with the TVM kernels through
``lookupc.set_schedule``); a ``torch.export`` artifact of a dynamically quantized model is
not supported by lookupc's compiler yet.
"""

from __future__ import annotations

import copy
import warnings

from torch import nn

from .errors import LookupcInputError

__all__ = ["quantize_rest", "REST_DTYPES"]

REST_DTYPES = ("float32", "int8")


def quantize_rest(module: nn.Module, dtype: str = "int8", inplace: bool = False) -> nn.Module:
    """``module`` with every remaining ``nn.Linear`` dynamically quantized to ``dtype``."""
    if dtype not in REST_DTYPES:
        raise LookupcInputError(f"rest dtype must be one of {REST_DTYPES}, got {dtype!r}")
    if dtype == "float32":
        return module
    import torch

    target = module if inplace else copy.deepcopy(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes on quantized tensors
        return torch.ao.quantization.quantize_dynamic(target.eval(), {nn.Linear},
                                                      dtype=torch.qint8, inplace=True)
