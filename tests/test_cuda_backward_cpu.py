"""The training kernels' math on the CPU: TIR backward PrimFuncs built for llvm.

``naive``: the unscheduled PrimFuncs (proves the TensorIR math). ``emulate``: the CUDA
schedules with thread bindings left serial, built for llvm (proves the schedules'
loop restructuring: tiles, compute_at regions, caches, token padding). Both run the
same orchestration as the GPU provider and are compared with ``lookupc.reference``.

Tolerances (float32 vs the float32 reference, relative to the largest magnitude):
scores, y, gradients 1e-5; codes exactly equal away from z = 0.
"""

import pytest
import torch

pytest.importorskip("tvm")

from lookupc import dispatch  # noqa: E402
from lookupc import reference as ref
from lookupc.errors import LookupcError  # noqa: E402
from lookupc.runtime.cuda_training import TirTrainingKernels  # noqa: E402

RTOL = 1e-5
# (n, d_in, d_out, tables, bits, block, repeats): d_in not a power of two, two repeats,
# d_out != d_in, odd token counts, N = 1, code width < padded width.
SHAPES = {
    "two_repeats": (7, 48, 40, 12, 8, 16, 2),
    "one_token": (1, 20, 24, 4, 4, 4, 1),
}


def _case(n, d_in, d_out, h, bits, bs, reps, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = 1 << (d_in - 1).bit_length()
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(reps, 4, width // bs, bs, bs, generator=g) / (bs * width) ** 0.5
    hb = 0.1 * torch.randn(h * bits, generator=g)
    tables = torch.randn(h, 1 << bits, d_out, generator=g)
    bias = torch.randn(d_out, generator=g)
    return x, w, hb, tables, bias, bits


def _close(a, b, what):
    scale = b.abs().max().clamp_min(1e-6)
    err = ((a - b).abs().max() / scale).item()
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:.0e}"


@pytest.fixture(scope="module")
def naive():
    return TirTrainingKernels("naive")


@pytest.fixture(scope="module")
def emulate():
    return TirTrainingKernels("emulate")


def _check_all(k, shape, seed=0):
    x, w, hb, tables, bias, bits = _case(*shape, seed=seed)
    decay = 0.7
    codes, scores = k.hash(x, w, hb, decay, bits)
    z = ref.hash_forward(x, w, hb, decay)
    r_codes, r_scores = ref.codes_scores(z, bits)
    near0 = (z.view(z.shape[0], -1, bits).abs() < 1e-5).any(-1)
    assert torch.equal(codes[~near0], r_codes[~near0])
    _close(scores, r_scores, "scores")
    _close(k.gather(codes, scores, tables, bias),
           ref.gather_forward(codes, scores, tables, bias), "y")
    g = torch.Generator().manual_seed(seed + 1)
    grad_y = torch.randn(x.shape[0], tables.shape[-1], generator=g)
    grad_s = torch.randn(x.shape[0], tables.shape[0], generator=g)
    for got, want, what in zip(k.gather_backward(grad_y, codes, scores, tables),
                               ref.gather_backward(grad_y, codes, scores, tables),
                               ("g_scores", "g_tables")):
        _close(got, want, what)
    for got, want, what in zip(k.hash_backward(grad_s, x, w, hb, decay, bits),
                               ref.hash_backward(grad_s, x, w, hb, decay, bits),
                               ("g_x", "g_weight", "g_hash_bias")):
        assert got.shape == want.shape, what
        _close(got, want, what)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_unscheduled_primfuncs_match_reference(naive, shape):
    _check_all(naive, SHAPES[shape])


def test_cuda_schedules_emulated_on_cpu_match_reference(emulate):
    _check_all(emulate, SHAPES["two_repeats"])
    # a token count that is not a multiple of any tile, in the next hash bucket (128):
    # only the hash forward is built per padded count, the rest is symbolic in n
    builds = emulate.builds
    _check_all(emulate, (131, 48, 40, 12, 8, 16, 2), seed=3)
    assert emulate.builds == builds + 1


def test_segment_reduction_equals_scatter(naive):
    seg = TirTrainingKernels("naive", table_grad="segment")
    x, w, hb, tables, bias, bits = _case(*SHAPES["two_repeats"])
    codes = torch.randint(0, 1 << bits, (50, tables.shape[0]), dtype=torch.int32)
    codes[:, 0] = 3  # many pairs on one row: a long segment
    scores, grad_y = torch.randn(50, tables.shape[0]), torch.randn(50, tables.shape[-1])
    a = naive.gather_backward(grad_y, codes, scores, tables)[1]
    b = seg.gather_backward(grad_y, codes, scores, tables)[1]
    _close(b, a, "segment vs scatter")
    _close(b, ref.gather_backward(grad_y, codes, scores, tables)[1], "segment vs reference")


def test_kernels_are_built_once_per_shape(naive):
    x, w, hb, tables, bias, bits = _case(*SHAPES["one_token"])
    naive.hash_backward(torch.randn(1, 4), x, w, hb, 0.7, bits)
    builds = naive.builds
    x2 = torch.randn(9, x.shape[1])  # another token count: symbolic n, no rebuild
    naive.hash_backward(torch.randn(9, 4), x2, w, hb, 0.7, bits)
    assert naive.builds == builds


def test_bad_mode_and_method_are_rejected():
    with pytest.raises(ValueError, match="mode"):
        TirTrainingKernels("rocm")
    with pytest.raises(ValueError, match="table_grad"):
        TirTrainingKernels("naive", table_grad="sorted")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cuda_tensor_without_usable_gpu_raises_not_falls_back():
    with pytest.raises(LookupcError):
        dispatch.provider_for(torch.device("cuda"), torch.float32)


def test_ops_dispatch_to_emulated_cuda_kernels_with_autograd():
    """The custom ops' forward and backward run the CUDA kernels' code path (emulated)."""
    import lookupc

    m = lookupc.LookupFFN(20, 24, lookupc.LookupConfig(tables=4, bits=4, block_size=4))
    x = torch.randn(3, 5, 20)
    grads = []
    for schedule in ("cuda-emulate", "reference"):
        m.zero_grad()
        xr = x.clone().requires_grad_()
        with lookupc.set_schedule(schedule):
            y = m(xr)
            y.backward(torch.ones_like(y))
        grads.append([y.detach(), xr.grad] + [p.grad.clone() for p in m.parameters()])
    for got, want in zip(*grads):
        _close(got, want, "emulated vs reference")


def test_emulated_hash_with_a_single_bh4_block(emulate):
    """block_size == padded width: no butterfly stage is left after folding."""
    x, w, hb, _, _, bits = _case(5, 16, 8, 4, 4, 16, 1)
    codes, scores = emulate.hash(x, w, hb, 0.7, bits)
    r_codes, r_scores = ref.codes_scores(ref.hash_forward(x, w, hb, 0.7), bits)
    assert torch.equal(codes, r_codes)
    _close(scores, r_scores, "scores")
