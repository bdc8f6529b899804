"""The LookupFFNs in a converted model: their kernel shapes and configs.

A converted model holds them as :class:`lookupc.LookupFFN` submodules, or, for an
exported program (a ``.pt2`` that ``lookupc convert`` wrote), as
``lookupc.hash`` -> ``lookupc.gather`` calls in its fx graphs; :func:`lookup_shapes` and
:func:`lookup_configs` read either.
"""

from __future__ import annotations

import torch

__all__ = ["lookup_shapes", "lookup_configs", "GraphLookup", "AlreadyConverted",
           "already_converted"]


def lookup_shapes(module: torch.nn.Module) -> list:
    """Distinct :class:`lookupc.kernels.shapes.KernelShapes` of the LookupFFNs in ``module``, in
    module order: LookupFFN submodules, or for an exported program (a ``.pt2`` that
    ``lookupc convert`` wrote) the ``lookupc.hash``/``gather`` calls in its graphs."""
    shapes = []
    for named in _lookup_modules(module) or _graph_lookups(module):
        s = _kernel_shapes(named[1])
        if s not in shapes:
            shapes.append(s)
    return shapes


class GraphLookup:
    """The sizes of one LookupFFN read off a ``lookupc.hash`` -> ``lookupc.gather`` pair."""

    def __init__(self, hash_node, gather_node):
        x, weight, hash_bias, decay, bits = hash_node.args[:5]
        r, _, _, bs, _ = weight.meta["val"].shape
        self.d_in, self.repeats = int(x.meta["val"].shape[-1]), int(r)
        self.tables = int(hash_bias.meta["val"].shape[0]) // int(bits)
        tables = gather_node.args[2].meta["val"]
        self.d_out = int(tables.shape[-1])
        from ..config import LookupConfig

        self.config = LookupConfig(self.tables, int(bits), int(bs), float(decay),
                                   str(tables.dtype).replace("torch.", ""))


def _graph_lookups(module: torch.nn.Module) -> list:
    """``[(node name, GraphLookup)]`` for every lookupc.hash node in ``module``'s fx graphs."""
    hash_op = torch.ops.lookupc.hash.default
    gather_ops = (torch.ops.lookupc.gather.default, torch.ops.lookupc.gather_quantized.default)
    found = []
    for m in module.modules():
        graph = getattr(m, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.target is not hash_op:
                continue
            gathers = [u for g in node.users for u in g.users if u.target in gather_ops]
            if gathers:
                found.append((node.name, GraphLookup(node, gathers[0])))
    return found


def _kernel_shapes(m):
    from ..kernels.shapes import KernelShapes
    from ..module import LookupFFN

    if isinstance(m, LookupFFN):
        return KernelShapes.of(m)
    return KernelShapes.for_config(m.d_in, m.d_out, m.config)


class AlreadyConverted:
    """Stands in for a ConversionResult when MODEL already holds lookupc ops (a .pt2 from
    ``lookupc convert``): compiled as it is."""

    def __init__(self, module: torch.nn.Module, count: int):
        self.module = module
        self.report = (f"MODEL is already converted: {count} LookupFFN(s) as lookupc ops in "
                       f"its program; used as it is, not converted again")


def already_converted(module: torch.nn.Module) -> "AlreadyConverted | None":
    """An :class:`AlreadyConverted` when ``module``'s graphs call lookupc ops, else None."""
    found = _graph_lookups(module)
    return AlreadyConverted(module, len(found)) if found else None


def lookup_configs(module: torch.nn.Module) -> list[dict]:
    """``{"module", "d_in", "d_out", **config}`` of each LookupFFN in ``module``, in module
    order (the manifest's ``config``); graph node names stand in for module names."""
    return [_config_of(m) for m in (_lookup_modules(module) or _graph_lookups(module))]


def _lookup_modules(module: torch.nn.Module) -> list:
    from ..module import LookupFFN

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LookupFFN)]


def _config_of(named) -> dict:
    name, m = named
    return {"module": name, "d_in": m.d_in, "d_out": m.d_out, **m.config.to_dict()}
