"""Find every Linear -> GELU -> Linear in a model (analysis only: the model is not changed).

Steps of :func:`analyze`:

1. ``torch.export`` (non-strict) a deep copy of the model in eval mode; the aten graph
   keeps each weight's parameter name and each node's ``nn_module_stack``, so every
   location is a module path of the original model.
2. Find *linear sites*: ``aten.linear`` with a parameter weight, GPT-2's ``Conv1D``
   (``view -> addmm(bias, x, W[in, out]) -> view``) and ``x @ W.T (+ b)`` (Falcon).
3. From each site's output grow the elementwise closure (pointwise ops whose inputs
   all come from the site or scalar constants); a site whose closure computes a
   non-affine function is an FFN candidate.
4. Run the named match filters (:data:`FILTERS`): hidden not used elsewhere, not
   gated, the activation feeds a second linear site, the activation is GELU
   (by value, see :mod:`lookupc.passes.activation`), a supported dtype. A rejected
   candidate goes to ``skipped`` as ``(location, reason)``, except chains with
   neither a GELU nor a second Linear (a pooler's Linear -> tanh), which are not
   FFN-like and are not reported.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import fx, nn

from lookupc.errors import LookupcInputError, PassError

from .activation import Classification, classify, evaluate_nodes, probe
from .infra import MatchFilter, first_rejection

__all__ = ["FFNMatch", "Skipped", "FFNAnalysis", "FFNMatches", "LinearSite", "analyze",
           "normalize_inputs", "tensor_leaves", "FILTERS"]

aten = torch.ops.aten
_WRAP = "model"
_IDENTITY_OPS = {
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.clone.default, aten.alias.default, aten.detach.default, aten._to_copy.default,
    aten.to.dtype, aten.type_as.default,
}
# identities in eval mode that may stay in place when the modules around them are swapped
_TRANSPARENT_OPS = {
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.clone.default, aten.alias.default, aten.detach.default,
}
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_FLOAT_DTYPES = (torch.float32, torch.float64)


class Skipped(NamedTuple):
    """An FFN-like chain that was not replaced: unpacks as ``(location, reason)``."""

    location: str
    reason: str


@dataclass(frozen=True)
class FFNMatch:
    """One Linear -> GELU -> Linear found in a model.

    ``name`` is fc1's location (module path, or the weight's path for a functional
    ``F.linear``); ``form`` is ``'module'`` when fc1, the activation and fc2 are whole
    submodules that can be swapped, else ``'functional'`` (rewritten by fx inside
    ``container``). ``calls`` counts how often the same FFN (same weights) runs per
    forward; all calls share the one replacement.
    """

    name: str
    d_in: int
    d_hidden: int
    d_out: int
    activation: str
    fc1: str
    fc2: str
    fc1_weight: str
    fc2_weight: str
    fc1_bias: bool
    fc2_bias: bool
    fc1_kind: str
    form: str
    container: str
    act_modules: tuple[str, ...]
    deviation: float
    dtype: torch.dtype
    calls: int = 1

    def dense_flops(self) -> int:
        """FLOPs per token of the dense FFN (multiply-add 2, bias adds 1, activation 0)."""
        return (2 * self.d_in * self.d_hidden + 2 * self.d_hidden * self.d_out
                + self.d_hidden * self.fc1_bias + self.d_out * self.fc2_bias)


class FFNMatches(list):
    """The list returned by :func:`lookupc.find_ffns`; ``.skipped`` holds the rejects."""

    def __init__(self, matches: list[FFNMatch], skipped: list[Skipped]):
        super().__init__(matches)
        self.skipped = skipped


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


@dataclass
class FFNAnalysis:
    matches: list[FFNMatch] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


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


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """An fc1 site whose output goes through a non-affine elementwise closure."""

    view: GraphView
    fc1: LinearSite
    closure: list[fx.Node]
    exits: list[fx.Node]
    classes: dict[fx.Node, Classification]
    sites_by_first: dict[fx.Node, LinearSite]
    fc2: LinearSite | None = None

    @property
    def members(self) -> set[fx.Node]:
        return set(self.closure) | {self.fc1.out}

    def outside_users(self, n: fx.Node) -> list[fx.Node]:
        return [u for u in n.users if u not in self.closure]


def _closure(view: GraphView, start: fx.Node) -> list[fx.Node]:
    members: set[fx.Node] = {start}
    changed = True
    while changed:
        changed = False
        for n in list(members):
            for u in n.users:
                if u in members or not _is_pointwise(u):
                    continue
                if all(i in members or view.scalar(i) is not None for i in _node_inputs(u)):
                    members.add(u)
                    changed = True
    members.discard(start)
    return sorted(members, key=view.order.__getitem__)


def _candidate(view: GraphView, site: LinearSite,
               sites_by_first: dict[fx.Node, LinearSite]) -> Candidate | None:
    closure = _closure(view, site.out)
    if not closure:
        return None
    members = set(closure)
    exits = [n for n in [site.out, *closure] if any(u not in members for u in n.users)]
    x = probe()
    try:
        env = evaluate_nodes(site.out, closure, x, view.scalar)
        classes = {e: classify(x, env[e]) for e in exits}
    except Exception:
        classes = {e: Classification("other", float("inf"), "gelu") for e in exits}
    if all(c.kind == "affine" for c in classes.values()):
        return None
    return Candidate(view, site, closure, exits, classes, sites_by_first)


# --------------------------------------------------------------------------- filters


def _shapes_known(c: Candidate) -> str | None:
    val = c.fc1.out.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 1 or val.shape[-1] != c.fc1.d_out:
        return "the shape of fc1's output could not be determined"
    return None


def _not_gated(c: Candidate) -> str | None:
    members = c.members
    for n in [c.fc1.out, *c.closure]:
        for u in c.outside_users(n):
            if not _is_pointwise(u):
                continue
            others = [i for i in _node_inputs(u) if i not in members and c.view.scalar(i) is None]
            if not others:
                continue
            what = c.view.describe(others[0])
            if u.target == aten.mul.Tensor:
                return (f"gated FFN (GLU/SwiGLU-style): the activation is multiplied by "
                        f"another branch ({what}) at {c.view.describe(u)}")
            return (f"the activation is combined with another tensor ({what}) at "
                    f"{c.view.describe(u)}")
    return None


def _hidden_single_use(c: Candidate) -> str | None:
    pre = c.outside_users(c.fc1.out)
    if pre:
        return ("fc1's output (before the activation) is also used by "
                + ", ".join(c.view.describe(u) for u in pre))
    users = [u for e in c.exits for u in c.outside_users(e)]
    if len(c.exits) > 1 or len(users) > 1:
        return "the hidden activation is also used elsewhere: " + ", ".join(
            sorted({c.view.describe(u) for u in users}))
    return None


def _fc2_consumes_activation(c: Candidate) -> str | None:
    exit_node = c.exits[0]
    user = c.outside_users(exit_node)[0]
    fc2 = c.sites_by_first.get(user)
    if fc2 is None:
        return f"the activation's output goes to {c.view.describe(user)}, not to a Linear"
    if fc2.input is not exit_node:
        return "fc2's input is not the activation's output"
    if fc2.d_in != c.fc1.d_out:
        return f"fc2 takes {fc2.d_in} features but fc1 gives {c.fc1.d_out}"
    c.fc2 = fc2
    return None


def _is_gelu(c: Candidate) -> bool:
    return c.classes[c.exits[0]].kind in ("gelu", "gelu_tanh")


def _gelu_activation(c: Candidate) -> str | None:
    cls = c.classes[c.exits[0]]
    if cls.kind in ("gelu", "gelu_tanh"):
        return None
    ops = sorted({c.view.describe(n).split(" in ")[0] for n in c.closure})
    return (f"activation is not GELU ({', '.join(ops)}): max deviation {cls.deviation:.3g} "
            f"from {cls.closest} on [{probe()[0]:.0f}, {probe()[-1]:.0f}]")


def _float_dtype(c: Candidate) -> str | None:
    val = c.fc1.out.meta["val"]
    if val.dtype not in _FLOAT_DTYPES:
        return f"dtype {val.dtype} is not supported by the lookupc ops (float32/float64)"
    return None


FILTERS: tuple[MatchFilter[Candidate], ...] = (
    MatchFilter("shapes_known", _shapes_known),
    MatchFilter("hidden_single_use", _hidden_single_use),
    MatchFilter("not_gated", _not_gated),
    MatchFilter("fc2_consumes_activation", _fc2_consumes_activation),
    MatchFilter("gelu_activation", _gelu_activation),
    MatchFilter("float_dtype", _float_dtype),
)


# --------------------------------------------------------------------------- matches


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    out = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return ".".join(out)


def _act_modules(view: GraphView, closure: list[fx.Node],
                 container: str) -> tuple[str, ...] | None:
    """Submodules that hold exactly the activation chain (all calls), or None.

    Eval-mode identities written functionally between the module calls (BART's
    ``F.dropout(h, p, self.training)`` in the layer) may stay where they are: after
    the swap they act on the LookupFFN's output (the same in eval mode).
    """
    paths = []
    for n in closure:
        p = view.path(n)
        inside = p is not None and p != container and (
            not container or p.startswith(container + "."))
        if not inside:
            if n.target in _TRANSPARENT_OPS:
                continue
            return None
        if p not in paths:
            paths.append(p)
    top = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
    members = set(closure)
    if not top or any(not set(view.nodes_under(p)) <= members for p in top):
        return None
    return tuple(top)


def _to_match(view: GraphView, calls: list[Candidate]) -> FFNMatch:
    """One match from every call of the same FFN (one call unless weights are reused)."""
    c = calls[0]
    fc1, fc2 = c.fc1, c.fc2
    closure = sorted({n for k in calls for n in k.closure}, key=view.order.__getitem__)
    nodes = [n for k in calls for n in (*k.fc1.nodes, *k.closure, *k.fc2.nodes)]
    container = _common_prefix([view.path(n) or "" for n in nodes])
    if container in (fc1.module, fc2.module):
        container = _owner(container)
    acts = _act_modules(view, closure, container) if fc1.module and fc2.module else None
    cls = c.classes[c.exits[0]]
    return FFNMatch(
        name=fc1.location, d_in=fc1.d_in, d_hidden=fc1.d_out, d_out=fc2.d_out,
        activation=cls.kind, fc1=fc1.location, fc2=fc2.location, fc1_weight=fc1.weight,
        fc2_weight=fc2.weight, fc1_bias=fc1.bias is not None, fc2_bias=fc2.bias is not None,
        fc1_kind=fc1.kind, form="module" if acts else "functional", container=container,
        act_modules=acts or (), deviation=max(k.classes[k.exits[0]].deviation for k in calls),
        dtype=fc1.out.meta["val"].dtype, calls=len(calls))


def analyze_program(ep: torch.export.ExportedProgram) -> FFNAnalysis:
    """Matches and skipped chains of an exported program (see module docstring)."""
    view = GraphView(ep)
    sites = find_sites(view)
    by_first = {s.first: s for s in sites}
    result = FFNAnalysis()
    accepted: dict[tuple[str, str], list[Candidate]] = {}
    used: dict[str, str] = {}
    for site in sites:
        cand = _candidate(view, site, by_first)
        if cand is None:
            continue
        rejected = first_rejection(FILTERS, cand)
        if rejected and rejected[0] == "fc2_consumes_activation" and not _is_gelu(cand):
            continue  # neither a GELU nor a second Linear: not FFN-like (e.g. a pooler)
        reason = rejected[1] if rejected else None
        key = (site.weight, cand.fc2.weight if cand.fc2 else "")
        if reason is None and key in accepted:  # the same FFN called again (tied weights)
            accepted[key].append(cand)
            continue
        if reason is None and (site.location in used or cand.fc2.location in used):
            other = used.get(site.location) or used.get(cand.fc2.location)
            reason = f"overlaps with the FFN at '{other}' (shares a Linear with it)"
        if reason is not None:
            result.skipped.append(Skipped(site.location, reason))
            continue
        accepted[key] = [cand]
        used[site.location] = used[cand.fc2.location] = site.location
    for calls in accepted.values():
        reason = _tied_elsewhere(sites, calls)
        if reason:
            result.skipped.append(Skipped(calls[0].fc1.location, reason))
        else:
            result.matches.append(_to_match(view, calls))
    return result


def _tied_elsewhere(sites: list[LinearSite], calls: list[Candidate]) -> str | None:
    """A reason if fc1's or fc2's weight is also used by a linear outside these calls."""
    for which in ("fc1", "fc2"):
        mine = {getattr(k, which).first for k in calls}
        weight = getattr(calls[0], which).weight
        others = [s for s in sites if s.weight == weight and s.first not in mine]
        if others:
            return (f"{which}'s weight {weight} is also used by another Linear call that is "
                    "not this FFN (tied weights)")
    return None


def analyze(model: nn.Module, example_inputs: Any) -> FFNAnalysis:
    """Export ``model`` (a deep copy, eval mode) and find its Linear -> GELU -> Linear chains."""
    if not isinstance(model, nn.Module):
        raise LookupcInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return analyze_program(export_model(model, example_inputs))
