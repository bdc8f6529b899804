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

Steps 1 and 2 (the export, its graph view and the linear sites) are in
:mod:`lookupc.passes.ffn_graph`; this module holds the result types, the candidates,
the filters and the matches.

Size: the result types (what a match or a skip says) and the candidate filters that fill
them read together; reading the graph (inputs, graph view, linear sites) is in
:mod:`lookupc.passes.ffn_graph`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import fx, nn

from lookupc.errors import LookupcInputError

from .activation import Classification, classify, evaluate_nodes, probe
from .ffn_graph import (
    GraphView,
    LinearSite,
    _is_pointwise,
    _node_inputs,
    _owner,
    export_model,
    find_sites,
    normalize_inputs,
    tensor_leaves,
)
from .infra import MatchFilter, first_rejection

__all__ = ["FFNMatch", "Skipped", "FFNAnalysis", "FFNMatches", "LinearSite", "analyze",
           "normalize_inputs", "tensor_leaves", "FILTERS"]

aten = torch.ops.aten
# identities in eval mode that may stay in place when the modules around them are swapped
_TRANSPARENT_OPS = {
    aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
    aten.clone.default, aten.alias.default, aten.detach.default,
}
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


@dataclass
class FFNAnalysis:
    matches: list[FFNMatch] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


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
