"""Rewrite: swap module-form FFNs (fc1, activation and fc2 are whole submodules).

Precondition: matches of form ``'module'`` from :func:`lookupc.passes.match_ffn.analyze`
on a model with the same module paths. fc1 becomes the LookupFFN; the activation
modules (and dropouts between) and fc2 become ``nn.Identity``, so what the parent
does around them (residual add, LayerNorm: Hugging Face ``BertOutput``) stays. A
functional dropout that the parent applies between the calls (BART's
``F.dropout(h, p, self.training)``) stays too and then acts on the LookupFFN's output:
the same in eval mode, dropout on d_out instead of d_hidden in training mode.
"""

from __future__ import annotations

import copy

from torch import nn

from lookupc.module import LookupFFN

from .infra import Pass, PassResult
from .match_ffn import FFNMatch
from .replacement import Replacement

__all__ = ["SwapFFNModules"]


class SwapFFNModules(Pass):
    """Replace each module-form match; ``replacements`` lists what was done."""

    name = "swap_ffn_modules"

    def __init__(self, matches: list[FFNMatch], lookups: dict[str, LookupFFN]):
        self.matches = [m for m in matches if m.form == "module"]
        self.lookups = lookups
        self.replacements: list[Replacement] = []

    def requires(self, module: nn.Module) -> None:
        for m in self.matches:
            for path in (m.fc1, m.fc2, *m.act_modules):
                module.get_submodule(path)  # raises AttributeError naming the path

    def _swap(self, module: nn.Module, m: FFNMatch) -> Replacement:
        parts = [module.get_submodule(p) for p in (m.fc1, *m.act_modules, m.fc2)]
        dense = nn.Sequential(*copy.deepcopy(parts)).eval()
        lookup = self.lookups[m.name]
        module.set_submodule(m.fc1, lookup)
        for path in (*m.act_modules, m.fc2):
            module.set_submodule(path, nn.Identity())
        return Replacement(m.name, lookup, dense, m.fc1)

    def call(self, module: nn.Module) -> PassResult:
        self.replacements = [self._swap(module, m) for m in self.matches]
        return PassResult(module, bool(self.replacements))
