"""The export graph of :func:`lookupc.passes.match_ffn.analyze`: inputs, graph view, linear sites.

:func:`export_model` exports a deep copy of the model in eval mode (non-strict), wrapped
so that its output is a flat tuple of tensors; :class:`GraphView` resolves the aten
graph's parameter names, constants and ``nn_module_stack`` module paths (relative to the
original model); :func:`find_sites` lists its *linear sites* (``aten.linear`` with a
parameter weight, GPT-2's ``Conv1D`` as ``view -> addmm -> view``, and ``x @ W.T (+ b)``)
with the module path or weight path each is reported under. The FFN matching on top of
this lives in :mod:`lookupc.passes.match_ffn`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from lookupc.errors import LookupcInputError, PassError

__all__ = ["GraphView", "LinearSite", "export_model", "find_sites", "normalize_inputs",
           "tensor_leaves"]

aten = torch.ops.aten
_WRAP = "model"
_IDENTITY_OPS = {
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.clone.default, aten.alias.default, aten.detach.default, aten._to_copy.default,
    aten.to.dtype, aten.type_as.default,
}
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}

@dataclass(frozen=True)
class LinearSite:
    """A linear map in the export graph: ``input`` [..., d_in] -> ``out`` [..., d_out]."""

    first: fx.Node
    out: fx.Node
    input: fx.Node
    nodes: tuple[fx.Node, ...]
    weight: str
    bias: str | None
    d_in: int
    d_out: int
    kind: str
    module: str | None
    location: str


# --------------------------------------------------------------------------- inputs


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``example_inputs`` as ``(args, kwargs)``: a tuple/list of positional args, a dict
    of keyword args, or a single Tensor."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    raise LookupcInputError(
        "example_inputs must be a tuple of positional arguments, a dict of keyword "
        f"arguments or a Tensor, got {type(example_inputs).__name__}")


def tensor_leaves(obj: Any) -> list[torch.Tensor]:
    """Tensors in a model output (tensors, dicts incl. ``ModelOutput``, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensor_leaves(o)]
    return []


class _Flatten(nn.Module):
    """Wraps a model so that its output is a flat tuple of tensors (exportable)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return tuple(tensor_leaves(self.model(*args, **kwargs)))


def _strip(path: str) -> str:
    if path == _WRAP:
        return ""
    return path[len(_WRAP) + 1:] if path.startswith(_WRAP + ".") else path


def export_model(model: nn.Module, example_inputs: Any) -> torch.export.ExportedProgram:
    """Export a deep copy of ``model`` in eval mode (non-strict); PassError on failure."""
    args, kwargs = normalize_inputs(example_inputs)
    wrapped = _Flatten(copy.deepcopy(model).eval())
    try:
        with torch.no_grad():
            return torch.export.export(wrapped, args, kwargs, strict=False)
    except Exception as exc:
        raise PassError("export_graph", "torch.export could not trace the model with the "
                        f"example inputs: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- graph view


class GraphView:
    """The export graph with parameter names, constants and module paths resolved."""

    def __init__(self, ep: torch.export.ExportedProgram):
        self.ep = ep
        self.graph = ep.graph_module.graph
        sig = ep.graph_signature
        self.params = dict(sig.inputs_to_parameters)
        self.buffers = dict(sig.inputs_to_buffers)
        self.consts = dict(sig.inputs_to_lifted_tensor_constants)
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}
        self.by_path: dict[str, list[fx.Node]] = {}
        for n in self.graph.nodes:
            p = self.path(n)
            if p is not None:
                self.by_path.setdefault(p, []).append(n)

    def path(self, node: fx.Node) -> str | None:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        return _strip(list(stack.values())[-1][0])

    def nodes_under(self, path: str) -> list[fx.Node]:
        return [n for p, ns in self.by_path.items()
                if p == path or p.startswith(path + ".") or path == "" for n in ns]

    def param_name(self, node: Any) -> str | None:
        if isinstance(node, fx.Node) and node.op == "placeholder" and node.name in self.params:
            return _strip(self.params[node.name])
        return None

    def tensor(self, node: fx.Node) -> torch.Tensor | None:
        """The value of a parameter, buffer, lifted constant or get_attr input node."""
        if node.name in self.params or node.name in self.buffers:
            key = self.params.get(node.name) or self.buffers[node.name]
            return self.ep.state_dict.get(key, self.ep.constants.get(key))
        if node.name in self.consts:
            return self.ep.constants.get(self.consts[node.name])
        if node.op == "get_attr":
            return getattr(self.ep.graph_module, node.target, None)
        return None

    def scalar(self, node: fx.Node) -> torch.Tensor | None:
        """The value of a one-element constant input node, else ``None``."""
        if node.op not in ("placeholder", "get_attr"):
            return None
        t = self.tensor(node)
        return t.detach() if isinstance(t, torch.Tensor) and t.numel() == 1 else None

    def describe(self, node: fx.Node) -> str:
        if node.op == "output":
            return "the model output"
        target = node.target
        op = str(target).rsplit(".", 1)[0] if isinstance(target, torch._ops.OpOverload) \
            else getattr(target, "__name__", str(target))
        where = self.path(node)
        return f"{op} in '{where}'" if where else op


def _is_pointwise(node: fx.Node) -> bool:
    t = node.target
    return (node.op == "call_function" and isinstance(t, torch._ops.OpOverload)
            and (t in _IDENTITY_OPS or torch.Tag.pointwise in t.tags))


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


# --------------------------------------------------------------------------- sites


def _owner(weight: str) -> str:
    return weight.rsplit(".", 1)[0] if "." in weight else ""


def _with_locations(view: GraphView, sites: list[LinearSite]) -> list[LinearSite]:
    """Set each site's ``module`` (its owner module, when that module computes nothing but
    this site's calls) and ``location`` (that module path, else the weight's path)."""
    calls: dict[str, set[fx.Node]] = {}
    for s in sites:
        calls.setdefault(s.weight, set()).update(s.nodes)
    out = []
    for s in sites:
        owner = _owner(s.weight)
        pure = bool(owner) and set(view.nodes_under(owner)) == calls[s.weight]
        out.append(dataclasses.replace(s, module=owner if pure else None,
                                       location=owner if pure else s.weight))
    return out


def _linear_site(view: GraphView, n: fx.Node) -> LinearSite | None:
    x, w = n.args[0], n.args[1]
    b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
    wname = view.param_name(w)
    bname = view.param_name(b) if b is not None else None
    if wname is None or (b is not None and bname is None):
        return None
    if "val" not in w.meta:
        return None
    d_out, d_in = w.meta["val"].shape
    return LinearSite(n, n, x, (n,), wname, bname, int(d_in), int(d_out), "linear", None, wname)


def _conv1d_site(view: GraphView, n: fx.Node) -> LinearSite | None:
    if len(n.args) != 3 or any(n.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
        return None
    b, v, w = n.args
    wname, bname = view.param_name(w), view.param_name(b)
    if wname is None or bname is None or not isinstance(v, fx.Node):
        return None
    if v.target not in _VIEW_OPS or len(v.users) != 1:
        return None
    if "val" not in w.meta:
        return None
    d_in, d_out = (int(s) for s in w.meta["val"].shape)
    nodes = [v, n]
    out = n
    if len(n.users) == 1 and next(iter(n.users)).target in _VIEW_OPS:
        out = next(iter(n.users))
        nodes.append(out)
    return LinearSite(v, out, v.args[0], tuple(nodes), wname, bname, d_in, d_out, "conv1d",
                      None, wname)


_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.permute.default, aten.transpose.int}


def _transposed_param(view: GraphView, w: Any) -> str | None:
    """The weight name if ``w`` is a 2-D parameter transposed ([out, in] -> [in, out])."""
    if not isinstance(w, fx.Node) or w.target not in _TRANSPOSES:
        return None
    if w.target == aten.permute.default and list(w.args[1]) != [1, 0]:
        return None
    if w.target == aten.transpose.int and sorted(d % 2 for d in w.args[1:3]) != [0, 1]:
        return None
    name = view.param_name(w.args[0])
    return name if name and w.args[0].meta["val"].dim() == 2 else None


def _matmul_site(view: GraphView, n: fx.Node) -> LinearSite | None:
    """``x @ W.T (+ b)``, e.g. Falcon's ``FalconLinear``."""
    x, wt = n.args[0], n.args[1]
    wname = _transposed_param(view, wt)
    if wname is None or len(wt.users) != 1:
        return None
    d_out, d_in = (int(v) for v in wt.args[0].meta["val"].shape)
    nodes, out, bname = [wt, n], n, None
    add = next(iter(n.users)) if len(n.users) == 1 else None
    if add is not None and add.target == aten.add.Tensor and len(add.args) == 2 \
            and "alpha" not in add.kwargs:
        other = add.args[1] if add.args[0] is n else add.args[0]
        bias = view.param_name(other)
        if bias and tuple(other.meta["val"].shape) == (d_out,):
            nodes, out, bname = [wt, n, add], add, bias
    return LinearSite(n, out, x, tuple(nodes), wname, bname, d_in, d_out, "matmul", None, wname)


def find_sites(view: GraphView) -> list[LinearSite]:
    """Linear sites of the export graph, in graph order."""
    sites = []
    for n in view.graph.nodes:
        site = None
        if n.op == "call_function" and n.target == aten.linear.default:
            site = _linear_site(view, n)
        elif n.op == "call_function" and n.target == aten.addmm.default:
            site = _conv1d_site(view, n)
        elif n.op == "call_function" and n.target == aten.matmul.default:
            site = _matmul_site(view, n)
        if site is not None:
            sites.append(site)
    return _with_locations(view, sites)
