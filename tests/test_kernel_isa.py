"""Kernels for every target ``lookupc compile`` offers: built for each, run where this host can.

Each target (AVX2 ``znver3``, AVX-512 ``znver4`` and ``skylake-avx512``, ``aarch64``) gets
both schedules compiled to machine code (nothing linked, so no cross toolchain is needed);
the host can run a target when :func:`lookupc.targets.can_execute` says so, and then the
kernels are also checked numerically against the PyTorch reference. The ``naive``
schedule must stay scalar on every ISA (it is the baseline the others are checked
against; LLVM's auto-vectorised AVX-512 code computed wrong codes, issue 13), and the
``cpu`` schedule must use the ISA's full vector width.
"""

from __future__ import annotations

import re

import pytest
import torch
from test_kernels import check_hash, make_ffn

from lookupc import targets, tvm_shim
from lookupc.kernels.shapes import KernelShapes
from lookupc.runtime import build as K
from lookupc.schedules.registry import get_schedule

TARGETS = {
    "znver3": "llvm -mcpu=znver3",
    "znver4": "llvm -mcpu=znver4",
    "skylake-avx512": "llvm -mcpu=skylake-avx512",
    "aarch64": "llvm -mtriple=aarch64-linux-gnu -mcpu=neoverse-n1",
}
# vector registers of the widest kind each ISA has (AT&T / LLVM asm spelling)
WIDE_REGISTER = {"znver3": r"%ymm", "znver4": r"%zmm", "skylake-avx512": r"%zmm",
                 "aarch64": r"\bv[0-9]+\.4s\b"}
# packed fp32 arithmetic (a stray vector register move for a struct copy is not compute)
ANY_VECTOR = {"x86": r"\b(v?(add|sub|mul|div|max|min)ps|vfn?m(add|sub)\w*ps|vgather\w+)\b",
              "aarch64": r"\bf(add|sub|mul|mla|max|min)\s+v[0-9]+\.4s"}


def _asm(name: str, schedule: str, shapes: KernelShapes) -> str:
    tgt = tvm_shim.make_target(targets.parse_target(TARGETS[name]).to_tvm())
    sched = get_schedule(schedule, tgt)
    funcs = K._prim_funcs(shapes, sched, tgt, ("hash", "gather"))
    return K._compile(funcs, tgt, sched).mod.inspect_source("asm")


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_offered_target_builds_with_the_right_vector_width(name):
    shapes = KernelShapes.of(make_ffn("B"))
    naive = _asm(name, "naive", shapes)
    isa = "aarch64" if name == "aarch64" else "x86"
    assert not re.search(ANY_VECTOR[isa], naive), f"naive {name} kernels are vectorised"
    cpu = _asm(name, "cpu", shapes)
    assert re.search(ANY_VECTOR[isa], cpu), "the vector-code pattern must match scheduled code"
    assert re.search(WIDE_REGISTER[name], cpu), f"cpu {name} kernels miss {WIDE_REGISTER[name]}"


@pytest.mark.parametrize("name", sorted(TARGETS))
@pytest.mark.parametrize("schedule", ["naive", "cpu"])
def test_kernels_for_runnable_targets_match_the_reference(name, schedule):
    ok, why = targets.can_execute(TARGETS[name])
    if not ok:
        pytest.skip(f"{name} cannot run here: {why}")
    m = make_ffn("B")
    tgt = targets.parse_target(TARGETS[name]).to_tvm()
    kernels = K.build(KernelShapes.of(m), target=tgt, schedule=schedule)
    for n in (1, 16, 37):
        x = torch.randn(n, m.d_in)
        codes, scores = kernels.hash(x, m.bh4_weight, m.hash_bias, 0.7)
        check_hash(m, x, codes, scores)
