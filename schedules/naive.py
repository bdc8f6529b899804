"""``naive``: the kernels exactly as written, unscheduled (the correctness baseline).

Every loop stays serial and scalar; the hash uses the canonical (unfolded) weight
layout with all ``log2 D`` butterfly stages per round. It compiles for any target
TVM can build host code for, and is slow by design.
"""

from __future__ import annotations

from typing import Any

NAME = "naive"


class NaiveSchedule:
    """Leaves both PrimFuncs untouched."""

    name = NAME
    fold = False  # the hash takes the module's weight layout as is
    token_tile = 1  # no token padding

    def applies_to(self, target: Any) -> bool:
        return target.kind.name == "llvm"

    def hash(self, func: Any, shapes: Any, target: Any) -> Any:
        return func

    def gather(self, func: Any, shapes: Any, target: Any) -> Any:
        return func

    def cache_token(self) -> str:
        """Extra text for build-cache keys (nothing beyond the file's source)."""
        return ""
