"""TVM kernels (lookupc.runtime.build / tir_kernels / schedules) against the PyTorch reference.

Tolerances: codes must equal the float64 reference exactly for every table whose soft
code z has no coordinate within 1e-4 of zero (|z| is O(1) here and the float32 kernels
differ from float64 by ~1e-6, so only such coordinates can flip sign); scores match to
rtol 1e-4 (relative to the float64 scores), outputs of the gather to rtol 1e-4 / atol 1e-5.
"""

import os

import pytest
import torch

import lookupc
from lookupc import reference as ref
from lookupc.kernels.shapes import KernelShapes
from lookupc.runtime import build as K

# (d_in, d_out, tables, bits, block): d_in not a power of two, d_out != d_in, tau 1/4/8,
# two repeats (A), a single block per round (C).
SHAPES = {
    "A": (24, 20, 12, 4, 8),
    "B": (100, 36, 16, 8, 32),
    "C": (16, 8, 8, 1, 16),
}
TOKENS = (1, 5, 37)
NEAR_ZERO = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    old = os.environ.get("LOOKUPC_CACHE_DIR")
    os.environ["LOOKUPC_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel_cache"))
    K.clear_memory_cache()
    yield
    K.clear_memory_cache()
    if old is None:
        os.environ.pop("LOOKUPC_CACHE_DIR", None)
    else:
        os.environ["LOOKUPC_CACHE_DIR"] = old


def make_ffn(key: str, seed: int = 0) -> lookupc.LookupFFN:
    d_in, d_out, h, tau, bs = SHAPES[key]
    torch.manual_seed(seed)
    m = lookupc.LookupFFN(d_in, d_out, lookupc.LookupConfig(tables=h, bits=tau, block_size=bs))
    with torch.no_grad():
        m.hash_bias.normal_(0.0, 0.1)
        m.bias.normal_(0.0, 0.1)
    return m


def reference_hash(m, x, decay=0.7):
    z = ref.hash_forward(x.double(), m.bh4_weight.detach().double(),
                         m.hash_bias.detach().double(), decay)
    codes, scores = ref.codes_scores(z, m.config.bits)
    near = (z.abs() < NEAR_ZERO).reshape(x.shape[0], m.config.tables, -1).any(-1)
    return codes, scores, near


def check_hash(m, x, codes, scores, decay=0.7):
    c_ref, s_ref, near = reference_hash(m, x, decay)
    assert codes.dtype == torch.int32 and codes.shape == c_ref.shape
    mismatched = (codes != c_ref) & ~near
    assert not mismatched.any(), f"{int(mismatched.sum())} codes differ away from z=0"
    torch.testing.assert_close(scores.double(), s_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("schedule", ["naive", "cpu"])
@pytest.mark.parametrize("key", sorted(SHAPES))
def test_kernels_match_reference_at_several_token_counts(schedule, key):
    m = make_ffn(key)
    kernels = K.build(KernelShapes.of(m), schedule=schedule)
    builds = K.cache_info()["builds"]
    tables, bias = m.tables.detach(), m.bias.detach()
    for n in TOKENS:  # one build serves every n (symbolic token count)
        x = torch.randn(n, m.d_in)
        codes, scores = kernels.hash(x, m.bh4_weight, m.hash_bias, 0.7)
        check_hash(m, x, codes, scores)
        y = kernels.gather(codes, scores, tables, bias)
        torch.testing.assert_close(y, ref.gather_forward(codes, scores, tables, bias),
                                   rtol=1e-4, atol=1e-5)
    assert K.cache_info()["builds"] == builds


def test_gather_uses_every_table_row_and_bias():
    m = make_ffn("B")
    kernels = K.build(KernelShapes.of(m), schedule="cpu")
    n, h, rows = 300, m.config.tables, 1 << m.config.bits
    codes = torch.randint(0, rows, (n, h), dtype=torch.int32)
    scores = torch.randn(n, h)
    y = kernels.gather(codes, scores, m.tables.detach(), m.bias.detach())
    expect = (scores[..., None] * m.tables.detach()[torch.arange(h), codes.long()]).sum(1)
    torch.testing.assert_close(y, expect + m.bias.detach(), rtol=1e-4, atol=1e-5)


def test_runtime_decay_and_misaligned_input():
    m = make_ffn("A")
    kernels = K.build(KernelShapes.of(m), schedule="cpu")
    base = torch.randn(12 * m.d_in + 1)
    x = base[1:].view(12, m.d_in)  # 4-byte offset: not 64-byte aligned
    assert x.data_ptr() % 64
    for decay in (0.0, 0.35, 1.0):
        codes, scores = kernels.hash(x, m.bh4_weight, m.hash_bias, decay)
        check_hash(m, x, codes, scores, decay)


def test_folded_weight_cache_follows_in_place_updates():
    m = make_ffn("A")
    kernels = K.build(KernelShapes.of(m), schedule="cpu")
    x = torch.randn(9, m.d_in)
    kernels.hash(x, m.bh4_weight, m.hash_bias, 0.7)
    with torch.no_grad():
        m.bh4_weight.mul_(-1.0)  # bumps the version counter
    codes, scores = kernels.hash(x, m.bh4_weight, m.hash_bias, 0.7)
    check_hash(m, x, codes, scores)


def test_build_cache_hits_in_memory_then_on_disk():
    m = make_ffn("C", seed=3)
    shapes = KernelShapes.of(m)
    K.clear_memory_cache()
    before = K.cache_info()
    first = K.build(shapes, schedule="cpu")
    assert K.build(shapes, schedule="cpu") is first
    mid = K.cache_info()
    assert mid["memory_hits"] == before["memory_hits"] + 1
    files = [f for f in os.listdir(K.cache_dir()) if f.endswith(".so")]
    assert files, "nothing written to the disk cache"
    K.clear_memory_cache()
    again = K.build(shapes, schedule="cpu")
    after = K.cache_info()
    assert again is not first
    assert after["disk_hits"] == mid["disk_hits"] + 1
    assert after["builds"] == mid["builds"]
    x = torch.randn(7, m.d_in)
    check_hash(m, x, *again.hash(x, m.bh4_weight, m.hash_bias, 0.7))


def test_cache_key_depends_on_target_cpu():
    m = make_ffn("C")
    shapes = KernelShapes.of(m)
    host = K.build(shapes, schedule="naive")
    other = K.build(shapes, target={"kind": "llvm", "mcpu": "x86-64"}, schedule="naive")
    assert other is not host
    x = torch.randn(3, m.d_in)
    check_hash(m, x, *other.hash(x, m.bh4_weight, m.hash_bias, 0.7))


def test_schedules_are_gated_on_target_and_names():
    from lookupc import tvm_shim
    from lookupc.errors import LookupcInputError
    from lookupc.schedules.registry import get_schedule

    cuda = tvm_shim.tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with pytest.raises(LookupcInputError, match="needs an llvm"):
        get_schedule("cpu", cuda)
    with pytest.raises(LookupcInputError, match="unknown schedule 'fast'"):
        get_schedule("fast", tvm_shim.make_target())
    with pytest.raises(LookupcInputError, match="mcpu 'znver99'"):
        tvm_shim.make_target({"kind": "llvm", "mcpu": "znver99"})
    assert tvm_shim.target_mcpu(tvm_shim.make_target(mcpu="znver2")) == "znver2"
    assert tvm_shim.vector_lanes(tvm_shim.make_target(mcpu="skylake-avx512")) == 16
    assert tvm_shim.vector_lanes(tvm_shim.make_target(mcpu="haswell")) == 8


def test_export_load_and_cross_compile(tmp_path):
    ma, mb = make_ffn("A"), make_ffn("B")
    shapes = [KernelShapes.of(ma), KernelShapes.of(mb)]
    path = K.export_library(shapes, None, "cpu", str(tmp_path / "k.so"))
    lib = K.load_library(path)
    for m in (ma, mb):
        k = lib.kernels(KernelShapes.of(m))
        x = torch.randn(6, m.d_in)
        codes, scores = k.hash(x, m.bh4_weight, m.hash_bias, 0.7)
        check_hash(m, x, codes, scores)
    with pytest.raises(KeyError):
        lib.kernels(KernelShapes.of(make_ffn("C")))
    # a CPU other than the host: compiled and linked, never run
    other = K.export_library(shapes[:1], {"kind": "llvm", "mcpu": "skylake-avx512"}, "cpu",
                             str(tmp_path / "skx.so"))
    assert os.path.getsize(other) > 0


def test_ops_use_tvm_kernels_inside_a_model():
    m = make_ffn("B")
    model = torch.nn.Sequential(torch.nn.Linear(50, m.d_in), m, torch.nn.Linear(m.d_out, 3))
    x = torch.randn(2, 9, 50)
    with torch.no_grad():
        expect = model(x)
        h_in = model[0](x).reshape(-1, m.d_in)
    _, _, near = reference_hash(m, h_in)
    assert not near.any(), "test input puts a code bit at z=0; pick another seed"
    K.clear_memory_cache()
    builds = K.cache_info()
    with lookupc.set_schedule("cpu"), torch.no_grad():
        got = model(x)
    info = K.cache_info()
    assert info["builds"] + info["disk_hits"] > builds["builds"] + builds["disk_hits"]
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_autograd_under_tvm_dispatch():
    m = make_ffn("A")
    x = torch.randn(11, m.d_in, requires_grad=True)
    _, _, near = reference_hash(m, x.detach())
    assert not near.any()
    m(x).square().sum().backward()
    expect = [t.grad.clone() for t in (x, m.bh4_weight, m.tables, m.bias)]
    for t in (x, m.bh4_weight, m.tables, m.bias):
        t.grad = None
    with lookupc.set_schedule("cpu"):
        m(x).square().sum().backward()
    for t, e in zip((x, m.bh4_weight, m.tables, m.bias), expect):
        torch.testing.assert_close(t.grad, e, rtol=1e-4, atol=1e-5)


def test_tvm_provider_rejects_out_of_range_codes():
    m = make_ffn("C")
    codes = torch.full((2, m.config.tables), 2, dtype=torch.int32)  # tau=1: rows 0..1
    with lookupc.set_schedule("cpu"), pytest.raises(IndexError, match=r"codes must be in \[0, 2\)"):
        torch.ops.lookupc.gather(codes, torch.ones(2, m.config.tables), m.tables.detach(),
                                 m.bias.detach())
