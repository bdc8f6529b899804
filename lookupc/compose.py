"""lookupc composed with what a CPU user already does: the rest of the model in int8 or bf16.

A conversion only replaces the FFNs; attention projections, the pooler and any FFN left
dense stay float32 linear layers. The *rest dtype* runs exactly those cheaper, so lookupc
adds to the int8 / bf16 speed-up instead of competing with it:

``"int8"``
    PyTorch's dynamic quantization (qint8 weights, one scale per tensor, activations
    quantized per call: ``torch.ao.quantization.quantize_dynamic``'s kernels).
``"bfloat16"``
    bf16 weights; each call casts its input to bf16 and its output back to float32. Fast
    only on CPUs with native bf16 (AVX512-BF16 / AMX); elsewhere PyTorch emulates it.

LookupFFN tables and hash weights are not linear layers and are left alone (their own
precision is ``LookupConfig.table_dtype``). Two forms: :func:`quantize_rest` rewrites an
``nn.Module`` (the converted model, eager), :func:`quantize_rest_graph` a
``torch.fx.GraphModule`` such as ``ExportedProgram.module()`` (what an artifact runs:
``aten.linear`` calls whose weight is a constant). The fidelity cost is measured, never
assumed: :func:`lookupc.fidelity.measure`, and ``lookupc compile --rest-dtype`` records it.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .config import REST_DTYPES
from .errors import LookupcInputError

__all__ = ["quantize_rest", "quantize_rest_graph", "check_rest_dtype", "REST_DTYPES", "Bf16Linear"]


def check_rest_dtype(dtype: str) -> None:
    """Raise :class:`LookupcInputError` unless ``dtype`` is one of :data:`REST_DTYPES`."""
    if dtype not in REST_DTYPES:
        raise LookupcInputError(f"rest dtype must be one of {', '.join(REST_DTYPES)}, got {dtype!r}")


class Bf16Linear(nn.Module):
    """A float32-in, float32-out linear layer that computes in bfloat16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16))
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Bf16Linear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def _int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return quantize_rest(nn.Sequential(linear), "int8", inplace=True)[0]


def quantize_rest(module: nn.Module, dtype: str = "int8", inplace: bool = False) -> nn.Module:
    """``module`` with every remaining ``nn.Linear`` in ``dtype`` (see the module doc)."""
    check_rest_dtype(dtype)
    if dtype == "float32":
        return module
    target = module if inplace else copy.deepcopy(module)
    if dtype == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation notes on quantized tensors
            return torch.ao.quantization.quantize_dynamic(target.eval(), {nn.Linear},
                                                          dtype=torch.qint8, inplace=True)
    for child in list(target.modules()):
        for attr, sub in list(child.named_children()):
            if type(sub) is nn.Linear:
                setattr(child, attr, Bf16Linear.from_linear(sub))
    return target


def _constant(gm: torch.fx.GraphModule, node) -> torch.Tensor | None:
    if node is None or getattr(node, "op", None) != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def quantize_rest_graph(gm: torch.fx.GraphModule, dtype: str = "int8") -> int:
    """Rewrite ``gm`` in place: each ``aten.linear`` with constant float32 weights (and a
    constant bias or none) calls a ``dtype`` linear module instead. Returns how many."""
    check_rest_dtype(dtype)
    if dtype == "float32":
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        x, w_node = node.args[0], node.args[1]
        b_node = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = _constant(gm, w_node)
        bias = _constant(gm, b_node)
        if weight is None or weight.dtype != torch.float32 or (b_node is not None and bias is None):
            continue
        module = _int8_linear(weight, bias) if dtype == "int8" else Bf16Linear(weight, bias)
        name = f"_rest_{dtype}_{count}"
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count
