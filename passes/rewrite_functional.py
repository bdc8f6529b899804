"""Rewrite: functional FFNs (``F.linear`` / ``F.gelu`` inside a custom ``forward``).

Precondition: matches of form ``'functional'`` from
:func:`lookupc.passes.match_ffn.analyze`; module-form matches already swapped (their
LookupFFNs are fx leaves here). For each smallest module ``container`` holding a
chain: ``torch.fx.symbolic_trace`` it (``nn.Linear`` and the other linear sites
are leaves), find fc1 (a ``call_module`` to the site or ``F.linear`` of its weight),
the elementwise nodes and fc2, replace them by one ``call_module`` to a new
``lookup_ffn_<k>`` submodule, lint, and put the GraphModule back in place of the
container. Containers are processed deepest first; a container that fx cannot
trace, or whose trace does not show the chain, is skipped with the reason.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from lookupc.errors import LookupcInputError
from lookupc.module import LookupFFN

from .infra import Pass, PassResult
from .match_ffn import FFNMatch, Skipped
from .replacement import Replacement

__all__ = ["RewriteFunctionalFFNs"]

_LINEAR_FNS = (F.linear, torch._C._nn.linear)


def _relative(path: str, container: str) -> str:
    return path[len(container) + 1:] if container else path


class _LeafTracer(fx.Tracer):
    """fx tracer that keeps torch.nn modules, LookupFFNs and the given paths as leaves."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaves or isinstance(m, (LookupFFN, fx.GraphModule))
                or super().is_leaf_module(m, qualname))


def trace_container(container: nn.Module, leaves: set[str]) -> fx.GraphModule:
    """Symbolically trace ``container`` with ``leaves`` (paths relative to it) as leaves.

    Traced in eval mode: fx bakes ``self.training`` checks into the graph, and the
    chain was identified in eval mode (dropout = identity).
    """
    flags = [(m, m.training) for m in container.modules()]
    container.eval()
    try:
        graph = _LeafTracer(leaves).trace(container)
    finally:
        for m, flag in flags:
            m.training = flag
    return fx.GraphModule(container, graph, class_name=type(container).__name__)


def _site_input(node: fx.Node, rel_weight: str) -> fx.Node | None:
    """fc's input if ``node`` applies the linear whose weight is ``rel_weight``."""
    if node.op == "call_module" and f"{node.target}.weight" == rel_weight and node.args:
        return node.args[0]
    if node.op == "call_function" and node.target in _LINEAR_FNS:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if isinstance(w, fx.Node) and w.op == "get_attr" and w.target == rel_weight:
            return node.args[0] if node.args else node.kwargs.get("input")
    return None


def _find(graph: fx.Graph, rel_weight: str) -> list[fx.Node]:
    return [n for n in graph.nodes if _site_input(n, rel_weight) is not None]


def _reach(start: fx.Node, step) -> set[fx.Node]:
    seen, todo = set(), [start]
    while todo:
        for nxt in step(todo.pop()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def locate_chain(gm: fx.GraphModule, m: FFNMatch) -> tuple | str:
    """``(x, fc1_node, region, fc2_node)`` for match ``m`` in ``gm``, or a reason string."""
    rel1, rel2 = _relative(m.fc1_weight, m.container), _relative(m.fc2_weight, m.container)
    fc1s, fc2s = _find(gm.graph, rel1), _find(gm.graph, rel2)
    if len(fc1s) != 1 or len(fc2s) != 1:
        return (f"the fx trace of '{m.container or '<root>'}' shows fc1 {len(fc1s)} and fc2 "
                f"{len(fc2s)} times as a Linear call (expected once each)")
    fc1, fc2 = fc1s[0], fc2s[0]
    after = _reach(fc1, lambda n: n.users)
    before = _reach(fc2, lambda n: n.all_input_nodes)
    region = after & before
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    inside = region | {fc1}
    ok = (_site_input(fc2, rel2) in region and set(fc1.users) <= region
          and all(set(n.users) <= region | {fc2} for n in region)
          and all(i in inside or i.op == "get_attr" for n in region for i in n.all_input_nodes)
          and all(n.op in ("call_function", "call_method", "call_module") for n in region))
    if not ok:
        return (f"the fx trace of '{m.container or '<root>'}' does not show fc1 -> activation "
                "-> fc2 as a closed chain")
    return _site_input(fc1, rel1), fc1, sorted(region, key=order.__getitem__), fc2


def dense_copy(gm: fx.GraphModule, x: fx.Node, fc1: fx.Node, region: list[fx.Node],
               fc2: fx.Node) -> nn.Module:
    """Eval-mode GraphModule computing fc1 -> region -> fc2 with deep-copied parameters."""
    g = fx.Graph()
    env = {x: g.placeholder("x")}

    def arg(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise LookupcInputError(f"node {n.name} is not part of the FFN chain")
            env[n] = g.node_copy(n)
        return env[n]

    for n in (fc1, *region, fc2):
        env[n] = g.node_copy(n, arg)
    g.output(env[fc2])
    g.lint()
    return copy.deepcopy(fx.GraphModule(gm, g, class_name="DenseFFN")).eval()


def _slot_name(gm: fx.GraphModule) -> str:
    k = 0
    while hasattr(gm, f"lookup_ffn_{k}"):
        k += 1
    return f"lookup_ffn_{k}"


def _replace(gm: fx.GraphModule, x: fx.Node, fc1: fx.Node, region: list[fx.Node],
             fc2: fx.Node, lookup: LookupFFN) -> str:
    slot = _slot_name(gm)
    gm.add_submodule(slot, lookup)
    with gm.graph.inserting_before(fc1):
        new = gm.graph.call_module(slot, (x,))
    fc2.replace_all_uses_with(new)
    attrs = {i for n in (fc1, *region, fc2) for i in n.all_input_nodes if i.op == "get_attr"}
    for n in (fc2, *reversed(region), fc1):
        gm.graph.erase_node(n)
    for a in attrs:
        if not a.users:
            gm.graph.erase_node(a)
    return slot


def _drop_unused_attrs(gm: fx.GraphModule, before: set[str]) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in before - used:
        owner, _, name = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        if hasattr(mod, name):
            delattr(mod, name)
    gm.delete_all_unused_submodules()


class RewriteFunctionalFFNs(Pass):
    """fx-rewrite each functional match; ``replacements`` and ``skipped`` say what happened."""

    name = "rewrite_functional_ffns"

    def __init__(self, matches: list[FFNMatch], lookups: dict[str, LookupFFN],
                 leaf_paths: set[str]):
        self.matches = [m for m in matches if m.form == "functional"]
        self.lookups, self.leaf_paths = lookups, leaf_paths
        self.replacements: list[Replacement] = []
        self.skipped: list[Skipped] = []

    def _leaves(self, container: str) -> set[str]:
        if not container:
            return set(self.leaf_paths)
        pre = container + "."
        return {p[len(pre):] for p in self.leaf_paths if p.startswith(pre)}

    def _rewrite_container(self, module: nn.Module, container: str,
                           matches: list[FFNMatch]) -> nn.Module:
        try:
            gm = trace_container(module.get_submodule(container), self._leaves(container))
        except Exception as exc:
            self.skipped += [Skipped(m.name, f"could not fx-trace '{container or '<root>'}' to "
                                     f"rewrite it: {type(exc).__name__}: {exc}") for m in matches]
            return module
        attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        done = 0
        for m in matches:
            found = locate_chain(gm, m)
            if isinstance(found, str):
                self.skipped.append(Skipped(m.name, found))
                continue
            x, fc1, region, fc2 = found
            dense = dense_copy(gm, x, fc1, region, fc2)
            slot = _replace(gm, x, fc1, region, fc2, self.lookups[m.name])
            path = f"{container}.{slot}" if container else slot
            self.replacements.append(Replacement(m.name, self.lookups[m.name], dense, path))
            done += 1
        if not done:
            return module
        _drop_unused_attrs(gm, attrs)
        gm.graph.lint()
        gm.recompile()
        gm.train(module.get_submodule(container).training)
        if not container:
            return gm
        module.set_submodule(container, gm)
        return module

    def call(self, module: nn.Module) -> PassResult:
        groups: dict[str, list[FFNMatch]] = {}
        for m in self.matches:
            groups.setdefault(m.container, []).append(m)
        for container in sorted(groups, key=lambda c: -(len(c.split(".")) if c else 0)):
            module = self._rewrite_container(module, container, groups[container])
        return PassResult(module, bool(self.replacements))
