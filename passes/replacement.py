"""``Replacement``: one LookupFFN put into a converted model, with its dense original."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lookupc.module import LookupFFN

__all__ = ["Replacement"]


@dataclass
class Replacement:
    """One replaced FFN.

    Attributes
    ----------
    name : str
        The FFN's location (``report.matched[i].name``).
    lookup : LookupFFN
        The LookupFFN living inside the converted module at ``slot``.
    dense : nn.Module
        Eval-mode copy of the original fc1 -> activation -> fc2 (deep-copied
        parameters, not registered in the converted module): [..., d_in] -> [..., d_out].
    slot : str
        Module path of ``lookup`` inside the converted module.
    """

    name: str
    lookup: LookupFFN
    dense: nn.Module
    slot: str
