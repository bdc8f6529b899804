"""Golden before/after TensorIR of every CPU forward schedule (``naive``, ``cpu``, ``tuned``).

Each case builds a kernel PrimFunc (``lookupc.kernels.forward``), applies one schedule with
explicit knobs for an explicit target (a fixed ``-mcpu``, so the result is the same on an
AVX2 and an AVX-512 host), and checks the scheduled IRModule with
``tvm.ir.assert_structural_equal`` against ``tests/golden/<case>.py``: the TVMScript text
of the expected module (``IRModule.script()``), parsed back with ``tvm.script.from_source``.
The ``before_*`` cases are the unscheduled PrimFuncs themselves, so a change to the TensorIR
definition of a kernel shows up as a golden diff too. Each case is also run once on a small
random input against ``lookupc.reference`` where this host can execute the case's target
(``lookupc.targets.can_execute``; an AVX-512 case is not run on an AVX2-only host).

Regenerating the golden files::

    LOOKUPC_REGEN_GOLDEN=1 python -m pytest tests/test_schedule_golden.py

rewrites every golden file from the current code. Regenerate only when a schedule (or kernel
definition) change is intended, and review the diff of ``tests/golden/`` before committing
it: the diff *is* the change to the generated TensorIR. Without the variable a missing
golden file fails its test (nothing is ever created silently). The comment header of a
golden file (case, shapes, target, knobs) is informational and not compared.

``tuned`` reads its knobs from a MetaSchedule database; its golden cases patch
``lookupc.schedules.cpu.tuned.best_knobs`` to return a fixed record, so they check how the
schedule turns a record into a schedule, and a separate test checks that with no records it
compiles exactly what the hand schedule's default knobs give.
"""

from __future__ import annotations

import difflib
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import lookupc
from lookupc import reference as ref
from lookupc import targets, tvm_shim
from lookupc.kernels import forward
from lookupc.kernels.fold import fold_weight
from lookupc.kernels.shapes import KernelShapes
from lookupc.schedules.cpu import tuned as tuned_mod
from lookupc.schedules.cpu.hand import (
    TOKEN_TILE,
    CpuSchedule,
    GatherKnobs,
    HashKnobs,
    gather_mode,
    valid_gather_knobs,
    valid_hash_knobs,
)
from lookupc.schedules.cpu.naive import NaiveSchedule
from lookupc.schedules.registry import get_schedule

tvm = tvm_shim.tvm

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("LOOKUPC_REGEN_GOLDEN", "") not in ("", "0")
REGEN_CMD = "LOOKUPC_REGEN_GOLDEN=1 python -m pytest tests/test_schedule_golden.py"

# Fixed targets: the schedules read only the vector width from them (8 / 16 fp32 lanes).
AVX2 = "llvm -mtriple=x86_64-linux-gnu -mcpu=znver3 -num-cores=2"
AVX512 = "llvm -mtriple=x86_64-linux-gnu -mcpu=znver4 -num-cores=2"

# Small shapes. SMALL's tables (8 x 2**4 rows x 32 columns, 16 KiB as float32) take the
# register form of the gather; BIG_TABLES' (8 x 2**12 x 32, 4 MiB) the table-outer form.
SMALL = KernelShapes(d_in=64, d_out=32, tables=8, bits=4, block_size=32, repeats=1)
BIG_TABLES = KernelShapes(d_in=64, d_out=32, tables=8, bits=12, block_size=32, repeats=2)
SMALL_BF16 = KernelShapes(64, 32, 8, 4, 32, 1, "bfloat16")
SMALL_INT8 = KernelShapes(64, 32, 8, 4, 32, 1, "int8")

TOKENS = 37  # not a multiple of the token tiles (16, 32): the tails run too
NEAR_ZERO = 1e-4  # codes may differ from the float64 reference only where |z| < this


@dataclass(frozen=True)
class Case:
    """One golden file: ``schedule`` applied to ``kernel`` at ``shapes`` for ``target``.

    schedule: ``before`` (the unscheduled PrimFunc), ``naive``, ``cpu`` or ``tuned``.
    record: for ``tuned``, the knob values of its (patched) best tuning record.
    form: for gather cases of the hand/tuned schedules, the gather form the case covers
    (checked against :func:`gather_mode` and the scheduled loop nest).
    """

    name: str
    schedule: str
    kernel: str
    shapes: KernelShapes
    target: str = AVX2
    hash_knobs: HashKnobs | None = None
    gather_knobs: GatherKnobs | None = None
    record: tuple[int, ...] | None = None
    form: str | None = None

    @property
    def fold(self) -> bool:
        return self.schedule != "naive"

    @property
    def token_tile(self) -> int:
        return 1 if self.schedule == "naive" else TOKEN_TILE


CASES = [
    # the kernels as defined (what the cpu/tuned schedules start from)
    Case("before_hash", "before", "hash", SMALL),
    Case("before_gather", "before", "gather", SMALL),
    Case("before_gather_bf16", "before", "gather", SMALL_BF16),
    Case("before_gather_int8", "before", "gather", SMALL_INT8),
    # naive: unfolded hash, no token padding, nothing scheduled
    Case("naive_hash", "naive", "hash", SMALL),
    Case("naive_gather", "naive", "gather", SMALL),
    # cpu (hand): the default knobs, spelled out
    Case("cpu_hash_avx2", "cpu", "hash", SMALL, hash_knobs=HashKnobs(tile=16, rows=4, cols=16)),
    Case("cpu_hash_avx512", "cpu", "hash", SMALL, AVX512,
         hash_knobs=HashKnobs(tile=16, rows=4, cols=16)),
    Case("cpu_gather_register_avx2", "cpu", "gather", SMALL,
         gather_knobs=GatherKnobs(kb=4, cols=32), form="register"),
    Case("cpu_gather_register_avx512", "cpu", "gather", SMALL, AVX512,
         gather_knobs=GatherKnobs(kb=4, cols=32), form="register"),
    Case("cpu_gather_table_outer_avx2", "cpu", "gather", BIG_TABLES,
         gather_knobs=GatherKnobs(kb=4, cols=0), form="table-outer"),
    Case("cpu_gather_register_bf16_avx2", "cpu", "gather", SMALL_BF16,
         gather_knobs=GatherKnobs(kb=4, cols=32), form="register"),
    Case("cpu_gather_register_int8_avx2", "cpu", "gather", SMALL_INT8,
         gather_knobs=GatherKnobs(kb=4, cols=32), form="register"),
    # tuned: knobs from a record (hash: groups, rows, cols; gather: its one knob)
    Case("tuned_hash_avx2", "tuned", "hash", SMALL, record=(2, 4, 8)),
    Case("tuned_gather_register_avx2", "tuned", "gather", SMALL, record=(16,), form="register"),
    Case("tuned_gather_table_outer_avx2", "tuned", "gather", BIG_TABLES, record=(2,),
         form="table-outer"),
]
IDS = [c.name for c in CASES]


def _target(case: Case):
    return targets.parse_target(case.target).to_tvm()


def _raw(case: Case):
    if case.kernel == "hash":
        return forward.make_hash(case.shapes, fold=case.fold, token_tile=case.token_tile)
    return forward.make_gather(case.shapes)


def _schedule_obj(case: Case, tgt):
    if case.schedule == "naive":
        return get_schedule("naive", tgt)
    if case.schedule == "cpu":
        return CpuSchedule(hash_knobs=case.hash_knobs, gather_knobs=case.gather_knobs)
    # tuned: the database is never read (best_knobs is patched in _scheduled)
    return get_schedule("tuned", tgt, tuning_db=os.devnull)


@functools.lru_cache(maxsize=None)
def _scheduled(case: Case):
    """The case's IRModule ``{"main": scheduled PrimFunc}``."""
    raw = _raw(case)
    if case.schedule == "before":
        return tvm.IRModule({"main": raw})
    tgt = _target(case)
    sched = _schedule_obj(case, tgt)
    assert (sched.fold, sched.token_tile) == (case.fold, case.token_tile)
    apply = sched.hash if case.kernel == "hash" else sched.gather
    if case.schedule == "tuned":
        record = list(case.record)
        with mock.patch.object(tuned_mod, "best_knobs", lambda *a, **k: record):
            func = apply(raw, case.shapes, tgt)
    else:
        func = apply(raw, case.shapes, tgt)
    return tvm.IRModule({"main": func})


def _header(case: Case) -> str:
    knobs = [f"{k}={v}" for k, v in (("hash_knobs", case.hash_knobs),
                                      ("gather_knobs", case.gather_knobs),
                                      ("record", case.record)) if v is not None]
    lines = [
        "# ruff: noqa",
        f"# Golden TensorIR, case {case.name!r}: schedule {case.schedule!r}, kernel "
        f"{case.kernel!r}",
        f"# shapes: {case.shapes}",
        f"# target: {case.target}" + ("" if case.schedule != "before" else " (numerics only)"),
        *([f"# knobs: {', '.join(knobs)}"] if knobs else []),
        "# Written by tests/test_schedule_golden.py; do not edit. Regenerate only for an",
        f"# intended change, then review the diff: {REGEN_CMD}",
    ]
    return "\n".join(lines) + "\n"


def _golden_text(case: Case) -> str:
    path = GOLDEN_DIR / f"{case.name}.py"
    if REGEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(_header(case) + _scheduled(case).script())
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; generate it with `{REGEN_CMD}` "
                    "and review it before committing")
    return path.read_text()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_schedule_matches_golden(case):
    text = _golden_text(case)
    golden = tvm.script.from_source(text)
    mod = _scheduled(case)
    try:
        tvm.ir.assert_structural_equal(mod, golden)
        return
    except ValueError as err:  # TVM's message prints both modules whole: keep its first line
        where = str(err).splitlines()[0]
    now = _header(case) + mod.script()  # the file a regeneration would write
    diff = list(difflib.unified_diff(text.splitlines(), now.splitlines(),
                                     f"golden/{case.name}.py", "scheduled now", lineterm=""))
    shown = "\n".join(diff[:80]) + ("\n..." if len(diff) > 80 else "")
    pytest.fail(f"{case.name}: the scheduled TensorIR differs from tests/golden/{case.name}.py "
                f"({where}). If the change is intended, regenerate with `{REGEN_CMD}` and "
                f"review the diff.\n{shown}")


@pytest.mark.parametrize("case", [c for c in CASES if c.form], ids=[c.name for c in CASES if c.form])
def test_gather_cases_cover_the_form_they_name(case):
    """Register-form cases keep the ``y_local`` accumulator tile; table-outer ones do not,
    and the shapes make the hand schedule's default pick the same form."""
    assert gather_mode(case.shapes) == case.form
    has_acc = "y_local" in _scheduled(case).script()
    assert has_acc == (case.form == "register")


@pytest.mark.parametrize("case", [c for c in CASES if c.schedule == "cpu"],
                         ids=[c.name for c in CASES if c.schedule == "cpu"])
def test_cpu_cases_spell_out_the_default_knobs(case):
    """The cpu goldens are what ``CpuSchedule()`` compiles: if the default knobs change on
    purpose, update the cases' knobs to match and regenerate."""
    lanes = tvm_shim.vector_lanes(_target(case))
    if case.kernel == "hash":
        assert valid_hash_knobs(case.shapes, lanes, case.hash_knobs) == \
            valid_hash_knobs(case.shapes, lanes, HashKnobs())
    else:
        assert valid_gather_knobs(case.shapes, lanes, case.gather_knobs) == \
            valid_gather_knobs(case.shapes, lanes, GatherKnobs())


def test_every_golden_file_belongs_to_a_case():
    stale = sorted({p.stem for p in GOLDEN_DIR.glob("*.py")} - set(IDS))
    assert not stale, f"golden files of no case in this module (delete them): {stale}"


def test_tuned_without_records_uses_the_hand_defaults(tmp_path):
    """``tuned`` with an empty database compiles what ``cpu`` with default knobs does (and
    warns once per kernel)."""
    tgt = targets.parse_target(AVX2).to_tvm()
    tuned = get_schedule("tuned", tgt, tuning_db=str(tmp_path))
    hand = CpuSchedule()
    for shapes in (SMALL, BIG_TABLES):
        with pytest.warns(UserWarning, match="no tuning record"):
            got = tuned.hash(forward.make_hash(shapes, fold=True, token_tile=TOKEN_TILE),
                             shapes, tgt)
        expect = hand.hash(forward.make_hash(shapes, fold=True, token_tile=TOKEN_TILE), shapes, tgt)
        tvm.ir.assert_structural_equal(got, expect)
        with pytest.warns(UserWarning, match="no tuning record"):
            got = tuned.gather(forward.make_gather(shapes), shapes, tgt)
        tvm.ir.assert_structural_equal(got, hand.gather(forward.make_gather(shapes), shapes, tgt))


def test_naive_schedule_is_the_identity():
    tgt = targets.parse_target(AVX2).to_tvm()
    sched = NaiveSchedule()
    raw = forward.make_hash(SMALL, fold=False)
    tvm.ir.assert_structural_equal(sched.hash(raw, SMALL, tgt), raw)
    raw = forward.make_gather(SMALL)
    tvm.ir.assert_structural_equal(sched.gather(raw, SMALL, tgt), raw)


# ----------------------------------------------------------------------------- numerics
def _compile(case: Case):
    tgt = _target(case)
    if case.schedule in ("before", "naive"):
        tgt = NaiveSchedule().codegen_target(tgt)  # scalar code, as the naive build does
    sym = f"golden_{case.name}"
    func = _scheduled(case)["main"].with_attr("global_symbol", sym)
    module = tvm_shim.compile_module(tvm.IRModule({sym: func}), tgt)
    return tvm_shim.get_function(module, sym)


def _tvm(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def _module(shapes: KernelShapes, seed: int = 0) -> lookupc.LookupFFN:
    torch.manual_seed(seed)
    cfg = lookupc.LookupConfig(tables=shapes.tables, bits=shapes.bits,
                               block_size=shapes.block_size)
    m = lookupc.LookupFFN(shapes.d_in, shapes.d_out, cfg)
    with torch.no_grad():
        m.hash_bias.normal_(0.0, 0.1)
        m.bias.normal_(0.0, 0.1)
    assert KernelShapes.of(m) == KernelShapes(*[getattr(shapes, f) for f in (
        "d_in", "d_out", "tables", "bits", "block_size", "repeats")])
    return m


def _check_hash(case: Case, fn) -> None:
    s, m = case.shapes, _module(case.shapes)
    x = torch.randn(TOKENS, s.d_in)
    weight = m.bh4_weight.detach()
    weight = fold_weight(weight) if case.fold else weight
    rows = -(-TOKENS // case.token_tile) * case.token_tile
    codes = _tvm(np.zeros((rows, s.tables), np.int32))
    scores = _tvm(np.zeros((rows, s.tables), np.float32))
    fn(_tvm(x.numpy()), _tvm(weight.numpy()), _tvm(m.hash_bias.detach().numpy()), 0.7,
       codes, scores)
    z = ref.hash_forward(x.double(), m.bh4_weight.detach().double(),
                         m.hash_bias.detach().double(), 0.7)
    c_ref, s_ref = ref.codes_scores(z, s.bits)
    near = (z.abs() < NEAR_ZERO).reshape(TOKENS, s.tables, -1).any(-1)
    got_codes = torch.from_numpy(codes.numpy()[:TOKENS])
    bad = (got_codes != c_ref) & ~near
    assert not bad.any(), f"{int(bad.sum())} codes differ from the reference away from z=0"
    torch.testing.assert_close(torch.from_numpy(scores.numpy()[:TOKENS]).double(), s_ref,
                               rtol=1e-4, atol=1e-6)


def _check_gather(case: Case, fn) -> None:
    s = case.shapes
    gen = torch.Generator().manual_seed(1)
    rows = 1 << s.bits
    codes = torch.randint(0, rows, (TOKENS, s.tables), dtype=torch.int32, generator=gen)
    scores = torch.randn(TOKENS, s.tables, generator=gen)
    tables = torch.randn(s.tables, rows, s.d_out, generator=gen)
    bias = torch.randn(s.d_out, generator=gen)
    y = _tvm(np.zeros((TOKENS, s.d_out), np.float32))
    if s.table_dtype == "float32":
        fn(_tvm(codes.numpy()), _tvm(scores.numpy()), _tvm(tables.numpy()), _tvm(bias.numpy()), y)
        expect = ref.gather_forward(codes, scores, tables, bias)
    else:
        stored, scale = ref.quantize_tables(tables, s.table_dtype)
        bits = stored.view(torch.int16) if stored.dtype == torch.bfloat16 else stored
        args = [_tvm(codes.numpy()), _tvm(scores.numpy()), _tvm(bits.numpy())]
        if scale is not None:
            args.append(_tvm(scale.numpy()))
        fn(*args, _tvm(bias.numpy()), y)
        expect = ref.gather_forward_quantized(codes, scores, stored, scale, bias)
    torch.testing.assert_close(torch.from_numpy(y.numpy()), expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_golden_case_matches_the_reference(case):
    ok, why = targets.can_execute(case.target)
    if not ok:
        pytest.skip(f"{case.name} cannot run on this host: {why}")
    fn = _compile(case)
    assert fn is not None
    (_check_hash if case.kernel == "hash" else _check_gather)(case, fn)
