"""``naive``: the kernels exactly as written, unscheduled (the correctness baseline).

Every loop stays serial and scalar; the hash uses the canonical (unfolded) weight
layout with all ``log2 D`` butterfly stages per round. It compiles for any target
TVM can build host code for, and is slow by design.

Scalar means scalar in the machine code too: :meth:`NaiveSchedule.codegen_target` turns
LLVM's loop and SLP auto-vectorisers off. Left on, LLVM re-vectorised the unscheduled
loop nests on its own, and on AVX-512 targets (``znver4``, ``skylake-avx512``) it turned
them into masked gathers and scatters over the workspace buffers; that code computed
wrong hash codes on a Zen 4 host (issue 13: 15 of 16 codes wrong at block size 32) while
the same TIR built for AVX2 was right. The baseline every other schedule is checked
against must not depend on the vector ISA, so it no longer lets LLVM choose.
"""

from __future__ import annotations

from typing import Any

from lookupc import tvm_shim

NAME = "naive"

#: LLVM options that keep the generated code scalar (TVM's typed ``cl-opt`` form).
SCALAR_CODEGEN = ("-vectorize-loops:bool=false", "-vectorize-slp:bool=false")


class NaiveSchedule:
    """Leaves both PrimFuncs untouched."""

    name = NAME
    fold = False  # the hash takes the module's weight layout as is
    token_tile = 1  # no token padding

    def applies_to(self, target: Any) -> bool:
        return target.kind.name == "llvm"

    def codegen_target(self, target: Any) -> Any:
        """``target`` with LLVM's auto-vectorisers off (see the module docstring)."""
        return tvm_shim.with_llvm_options(target, SCALAR_CODEGEN)

    def hash(self, func: Any, shapes: Any, target: Any) -> Any:
        return func

    def gather(self, func: Any, shapes: Any, target: Any) -> Any:
        return func

    def cache_token(self) -> str:
        """Extra text for build-cache keys (nothing beyond the file's source)."""
        return ""
