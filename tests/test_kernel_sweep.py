"""Property sweep: random valid LookupFFN shapes through every CPU schedule, both kernels,
against the independent NumPy reference (``tests/numpy_lookup.py``).

A seeded sweep rather than Hypothesis: every example costs TVM builds (seconds), so
shrinking would spend minutes rebuilding, and a seeded case list is the same on every
machine, so a failure seen on one CPU (the issue-13 failure only showed on AVX-512) names
a case (``seed``, shape, schedule) anyone reproduces with ``-k`` on any host.

Coverage, by construction of :func:`make_case` (stratified, then random within):
padded and unpadded input widths, every block size from 1 to the padded width, bits 1..8,
repeats > 1, token counts 1, a prime and a multiple of the hash's token tile. Schedules:
``naive``, ``cpu`` at this host's vector width and at the other x86 width (8 or 16 fp32
lanes: LLVM splits vectors wider than the ISA, so both schedules run on either host), and
``tuned`` with an empty database (the hand knobs as MetaSchedule applies them).

The default run checks ``DEFAULT_CASES`` cases; ``-m slow`` runs ``SLOW_CASES`` more.
Tolerances as in ``test_kernels``: codes exact wherever the float64 soft code has no
coordinate within 1e-4 of zero; scores rtol 1e-4; gather outputs rtol 1e-4 / atol 1e-5
against the NumPy gather of the kernel's own codes and scores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import numpy_lookup as npl
import pytest
import torch

import lookupc
from lookupc import tvm_shim
from lookupc.config import num_repeats, padded_width
from lookupc.kernels.shapes import KernelShapes
from lookupc.runtime import build as K
from lookupc.schedules.cpu.hand import TOKEN_TILE, CpuSchedule

DEFAULT_CASES = 8
SLOW_CASES = 40
PRIMES = (7, 13, 37)
NEAR_ZERO = 1e-4
# Bound on the NumPy reference's per-token work (R * D * BS multiply-adds per round).
MAX_WORK = 8192


@dataclass(frozen=True)
class Case:
    seed: int
    d_in: int
    d_out: int
    tables: int
    bits: int
    block_size: int
    tokens: tuple

    def __str__(self) -> str:
        return (f"seed{self.seed}-d{self.d_in}x{self.d_out}-h{self.tables}-b{self.bits}"
                f"-bs{self.block_size}")


def make_case(seed: int) -> Case:
    """A valid shape; ``seed`` picks the stratum (bits, block size, padding, repeats)."""
    rng = random.Random(seed)
    bits = 1 + seed % 8
    padded = seed % 2 == 0
    block = 1 << (seed % 7)  # 1 .. 64
    while True:
        width = rng.choice([w for w in (4, 8, 16, 32, 64) if w >= max(block, 4)])
        d_in = rng.randint(width // 2 + 1, width - 1) if padded else width
        width = padded_width(d_in)
        # every third case has more code bits than the padded width: repeats > 1
        code_width = (width * rng.choice((2, 3)) if seed % 3 == 0
                      else rng.randint(bits, max(bits, width)))
        tables = max(1, code_width // bits)
        reps = num_repeats(d_in, tables, bits)
        if reps * width * block <= MAX_WORK and tables <= 96:
            break
    tokens = (1, PRIMES[seed % len(PRIMES)], TOKEN_TILE * rng.choice((1, 2, 3)))
    return Case(seed, d_in, rng.randint(1, 40), tables, bits, block, tokens)


def schedules(tmp_db: str) -> dict:
    host = tvm_shim.vector_lanes(tvm_shim.make_target(None))
    other = 16 if host == 8 else 8
    return {
        "naive": "naive",
        f"cpu{host}": CpuSchedule(lanes=host),
        f"cpu{other}": CpuSchedule(lanes=other),
        "tuned-no-records": ("tuned", tmp_db),
    }


def make_module(case: Case) -> lookupc.LookupFFN:
    torch.manual_seed(case.seed)
    m = lookupc.LookupFFN(case.d_in, case.d_out, lookupc.LookupConfig(
        tables=case.tables, bits=case.bits, block_size=case.block_size))
    with torch.no_grad():
        m.hash_bias.normal_(0.0, 0.1)
        m.bias.normal_(0.0, 0.1)
        m.tables.normal_(0.0, 1.0)
    return m


def check_case(case: Case, tmp_db: str) -> None:
    m = make_module(case)
    assert m.bh4_weight.shape[0] == num_repeats(case.d_in, case.tables, case.bits)
    weight = m.bh4_weight.detach()
    hash_bias, tables, bias = (m.hash_bias.detach(), m.tables.detach(), m.bias.detach())
    xs = {n: torch.randn(n, case.d_in, generator=torch.Generator().manual_seed(n))
          for n in case.tokens}
    expect = {}
    for n, x in xs.items():
        z = npl.soft_codes(x.double().numpy(), weight.double().numpy(),
                           hash_bias.double().numpy(), 0.7, case.bits)
        codes, scores = npl.codes_scores(z, case.bits)
        near = (np.abs(z) < NEAR_ZERO).reshape(n, case.tables, -1).any(-1)
        expect[n] = (codes, scores, near)
    for label, spec in schedules(tmp_db).items():
        schedule, db = spec if isinstance(spec, tuple) else (spec, None)
        kernels = K.build(KernelShapes.of(m), schedule=schedule, tuning_db=db)
        for n, x in xs.items():
            codes, scores, near = expect[n]
            got_codes, got_scores = kernels.hash(x, weight, hash_bias, 0.7)
            wrong = (got_codes.numpy() != codes) & ~near
            assert not wrong.any(), (
                f"{case} {label} n={n}: {int(wrong.sum())} of {wrong.size} codes differ "
                f"away from z=0")
            np.testing.assert_allclose(got_scores.double().numpy(), scores, rtol=1e-4,
                                       atol=1e-6, err_msg=f"{case} {label} n={n} scores")
            y = kernels.gather(got_codes, got_scores, tables, bias)
            y_ref = npl.gather(got_codes.numpy(), got_scores.double().numpy(),
                               tables.double().numpy(), bias.double().numpy())
            np.testing.assert_allclose(y.double().numpy(), y_ref, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{case} {label} n={n} gather")


@pytest.fixture(scope="module")
def tmp_db(tmp_path_factory, request):
    import os

    cache = str(tmp_path_factory.mktemp("sweep_cache"))
    old = os.environ.get("LOOKUPC_CACHE_DIR")
    os.environ["LOOKUPC_CACHE_DIR"] = cache
    K.clear_memory_cache()
    yield str(tmp_path_factory.mktemp("empty_tuning_db"))
    K.clear_memory_cache()
    if old is None:
        os.environ.pop("LOOKUPC_CACHE_DIR", None)
    else:
        os.environ["LOOKUPC_CACHE_DIR"] = old


def test_cases_cover_the_strata():
    """The default cases alone cover bits 1..8, padded/unpadded, repeats > 1, the tokens."""
    cases = [make_case(s) for s in range(DEFAULT_CASES)]
    assert {c.bits for c in cases} == set(range(1, 9))
    assert any(c.d_in & (c.d_in - 1) for c in cases)  # padded
    assert any(not c.d_in & (c.d_in - 1) for c in cases)  # unpadded
    assert any(num_repeats(c.d_in, c.tables, c.bits) > 1 for c in cases)
    assert all(c.tokens[0] == 1 and c.tokens[2] % TOKEN_TILE == 0 for c in cases)
    every = [make_case(s) for s in range(DEFAULT_CASES + SLOW_CASES)]
    blocks = {c.block_size for c in every}
    assert {1, 2, 4, 8, 16, 32, 64} <= blocks, blocks


pytestmark = pytest.mark.filterwarnings("ignore:lookupc. no tuning record:UserWarning")


@pytest.mark.parametrize("seed", range(DEFAULT_CASES), ids=lambda s: str(make_case(s)))
def test_sweep(seed, tmp_db):
    check_case(make_case(seed), tmp_db)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(DEFAULT_CASES, DEFAULT_CASES + SLOW_CASES),
                         ids=lambda s: str(make_case(s)))
def test_sweep_more(seed, tmp_db):
    check_case(make_case(seed), tmp_db)
