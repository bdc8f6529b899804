"""The CPU training kernels (``lookupc.runtime.cpu_training``, ``schedules/cpu/backward.py``).

The TVM-built backward must give the reference gradients (``lookupc.reference``) for
the hash (``g_x``, ``g_weight``, ``g_hash_bias``) and the gather (``g_scores``,
``g_tables``) at awkward shapes, and ``loss.backward()`` under ``set_schedule("cpu")``
must run it and match the reference schedule. Also: every schedule in
``cpu_backward.SCHEDULES`` against the unscheduled PrimFunc, the AVX-512 schedules
(16 lanes, run here split by LLVM) and their machine code (no gathers, scatters or
masked vector memory accesses: LLVM 22 miscompiled such code for AVX-512).

Tolerance (float32 vs the float32 reference, relative to the largest magnitude): 1e-5;
observed below 2e-6.
"""

import os
import re

import pytest
import torch

pytest.importorskip("tvm")

import lookupc  # noqa: E402
from lookupc import dispatch  # noqa: E402
from lookupc import reference as ref  # noqa: E402
from lookupc.kernels.shapes import KernelShapes  # noqa: E402
from lookupc.runtime.cpu_training import CpuTrainingKernels, kernel_catalogue  # noqa: E402

RTOL = 1e-5
DECAY = 0.7
# (tokens, d_in, d_out, tables, bits, block, repeats)
SHAPES = {
    # one token, d_in padded 20 -> 32, small blocks, code width < padded width
    "one_token": (1, 20, 24, 4, 4, 4, 1),
    # a prime token count, two repeats, 8 bits, d_in padded 48 -> 64, d_out != d_in
    "prime_two_repeats": (7, 48, 40, 12, 8, 16, 2),
    # unit blocks, odd bits (a table's bits straddle vector widths and repeats), 257 tokens
    "unit_blocks_odd_bits": (257, 64, 32, 16, 3, 1, 1),
    # one bit per table, 2x2 blocks, a few hundred tokens, unpadded d_in
    "one_bit": (300, 16, 8, 2, 1, 2, 1),
    # block size 64 (two blocks), 5 bits over two repeats
    "block64": (13, 100, 50, 40, 5, 64, 2),
}
SLOW_SHAPES = {
    "minilm_1280": (1280, 384, 384, 128, 4, 32, 1),
    "paper_like": (301, 512, 512, 32, 8, 64, 1),
    # width 64: repeats = ceil(tables * bits / 64)
    **{f"bits{b}_bs{bs}_n{n}": (n, 48, 40, 2 * b + 3, b, bs, -(-(2 * b + 3) * b // 64))
       for b in range(1, 9) for bs in (1, 8, 64) for n in (1, 31, 300)},
}


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    old = os.environ.get("LOOKUPC_CACHE_DIR")
    os.environ["LOOKUPC_CACHE_DIR"] = str(tmp_path_factory.mktemp("train_cache"))
    yield
    if old is None:
        os.environ.pop("LOOKUPC_CACHE_DIR", None)
    else:
        os.environ["LOOKUPC_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def kernels():
    return CpuTrainingKernels()


def _case(n, d_in, d_out, h, bits, bs, reps, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = 1 << (d_in - 1).bit_length()
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(reps, 4, width // bs, bs, bs, generator=g) / (bs * width) ** 0.5
    hb = 0.1 * torch.randn(h * bits, generator=g)
    tables = torch.randn(h, 1 << bits, d_out, generator=g)
    grad_y = torch.randn(n, d_out, generator=g)
    grad_s = torch.randn(n, h, generator=g)
    return x, w, hb, tables, bits, grad_y, grad_s


def _close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    scale = b.abs().max().clamp_min(1e-6)
    err = ((a - b).abs().max() / scale).item()
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:.0e}"


def _check(k, shape, seed=0):
    x, w, hb, tables, bits, grad_y, grad_s = _case(*shape, seed=seed)
    codes, scores = ref.codes_scores(ref.hash_forward(x, w, hb, DECAY), bits)
    got = k.gather_backward(grad_y, codes, scores, tables)
    want = ref.gather_backward(grad_y, codes, scores, tables)
    for a, b, what in zip(got, want, ("g_scores", "g_tables")):
        _close(a, b, what)
    got = k.hash_backward(grad_s, x, w, hb, DECAY, bits)
    want = ref.hash_backward(grad_s, x, w, hb, DECAY, bits)
    for a, b, what in zip(got, want, ("g_x", "g_weight", "g_hash_bias")):
        _close(a, b, what)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cpu_backward_matches_reference(kernels, shape):
    _check(kernels, SHAPES[shape])


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SLOW_SHAPES))
def test_cpu_backward_matches_reference_sweep(kernels, shape):
    _check(kernels, SLOW_SHAPES[shape], seed=1)


def test_avx512_schedules_match_reference():
    """The 16-lane schedules (what an AVX-512 host builds), run here with split vectors."""
    _check(CpuTrainingKernels(lanes=16), SHAPES["prime_two_repeats"], seed=2)


def test_segment_table_gradient_matches_fused(kernels):
    seg = CpuTrainingKernels(table_grad="segment")
    x, w, hb, tables, bits, grad_y, _ = _case(*SHAPES["prime_two_repeats"])
    codes = torch.randint(0, 1 << bits, (50, tables.shape[0]), dtype=torch.int32)
    codes[:, 0] = 3  # many pairs on one row: a long segment
    scores, grad_y = torch.randn(50, tables.shape[0]), torch.randn(50, tables.shape[-1])
    want = ref.gather_backward(grad_y, codes, scores, tables)
    for k in (kernels, seg):
        for a, b, what in zip(k.gather_backward(grad_y, codes, scores, tables), want,
                              ("g_scores", "g_tables")):
            _close(a, b, what)
    with pytest.raises(ValueError, match="table_grad"):
        CpuTrainingKernels(table_grad="atomic")


def test_no_tokens_and_odd_inputs(kernels):
    x, w, hb, tables, bits, grad_y, grad_s = _case(*SHAPES["one_token"])
    g_x, g_w, g_b = kernels.hash_backward(grad_s[:0], x[:0], w, hb, DECAY, bits)
    assert g_x.shape == (0, x.shape[1]) and not g_w.any() and not g_b.any()
    g_s, g_t = kernels.gather_backward(grad_y[:0], torch.zeros(0, 4, dtype=torch.int32),
                                       grad_s[:0], tables)
    assert g_s.shape == (0, 4) and not g_t.any()
    # a misaligned, non-contiguous view of x is copied, not read out of bounds
    big = torch.randn(9, 2 * x.shape[1] + 1)
    xv = big[1:, 1:1 + 2 * x.shape[1]:2]
    gs = torch.randn(8, 4)
    for a, b in zip(kernels.hash_backward(gs, xv, w, hb, DECAY, bits),
                    ref.hash_backward(gs, xv.contiguous(), w, hb, DECAY, bits)):
        _close(a, b, "view")


def test_kernels_are_built_once_per_shape(kernels):
    x, w, hb, tables, bits, grad_y, grad_s = _case(*SHAPES["one_token"])
    kernels.hash_backward(grad_s, x, w, hb, DECAY, bits)
    builds = kernels.builds
    x2 = torch.randn(37, x.shape[1])  # another token count: symbolic n, no rebuild
    kernels.hash_backward(torch.randn(37, 4), x2, w, hb, DECAY, bits)
    assert kernels.builds == builds


def test_new_process_loads_kernels_from_disk(kernels):
    """A second instance (as in a new process) loads the compiled kernels from the cache."""
    _check(kernels, SHAPES["one_token"])
    root = os.environ["LOOKUPC_CACHE_DIR"]
    files = [f for f in os.listdir(root) if f.startswith("train_") and f.endswith(".so")]
    assert files, "no training kernel was written to the disk cache"
    fresh = CpuTrainingKernels()
    _check(fresh, SHAPES["one_token"])
    assert sorted(os.listdir(root)) == sorted(set(os.listdir(root)))  # nothing half-written
    assert not [f for f in os.listdir(root) if f.endswith(".tmp.so")]


def test_every_schedule_matches_the_unscheduled_primfunc():
    """Each kernel in SCHEDULES, scheduled and not, on the same random inputs."""
    from lookupc import tvm_shim
    from lookupc.kernels import backward as tb
    from lookupc.schedules.cpu import backward as cb

    tvm, tgt = tvm_shim.tvm, tvm_shim.make_target(None)
    h, rows, d, n, reps, nb, bs, tile, m = 6, 16, 24, 13, 2, 4, 8, 4, 3
    width = nb * bs
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    codes = torch.randint(0, rows, (n, h), dtype=torch.int32, generator=g)
    order = torch.randperm(n * h, generator=g).to(torch.int32)
    offsets = torch.linspace(0, n * h, h * rows + 1).round().to(torch.int32)
    tiled = (reps, m, tile, width)
    cases = {  # kernel -> (PrimFunc, inputs + outputs, output positions)
        "table_grad_serial": (tb.table_grad_scatter(h, rows, d, False),
                              [rnd(n, d), codes, rnd(n, h), rnd(h * rows, d)], [3]),
        "table_grad_segment": (tb.table_grad_segment(h, rows, d),
                               [rnd(n, d), rnd(n, h), order, offsets, rnd(h * rows, d)], [4]),
        "gather_score_grad": (tb.gather_score_grad(h, rows, d),
                              [rnd(n, d), codes, rnd(h * rows, d), rnd(n, h)], [3]),
        "round_fwd": (tb.block_round(reps, nb, bs, tile=tile),
                      [rnd(*tiled), rnd(reps, nb, bs, bs), rnd(*tiled)], [2]),
        "round_bwd": (tb.block_round(reps, nb, bs, transpose=True, tile=tile),
                      [rnd(*tiled), rnd(reps, nb, bs, bs), rnd(*tiled)], [2]),
        "round_fwd_nofwht": (tb.block_round(reps, nb, bs, fwht=False, tile=tile),
                             [rnd(*tiled), rnd(reps, nb, bs, bs), rnd(*tiled)], [2]),
        "round_bwd_nofwht": (tb.block_round(reps, nb, bs, transpose=True, fwht=False, tile=tile),
                             [rnd(*tiled), rnd(reps, nb, bs, bs), rnd(*tiled)], [2]),
        "fwht_scaled": (tb.fwht_scaled(reps, width, DECAY, tile=tile),
                        [rnd(m, tile, reps * width), rnd(*tiled)], [1]),
        "score_grad": (tb.score_grad(reps, width, 12, 4, DECAY),
                       [rnd(reps, n, width), rnd(n, width), rnd(48), rnd(n, 12),
                        rnd(n, reps * width)], [4]),
        "column_sum": (tb.column_sum(reps * width, 40), [rnd(n, reps * width), rnd(40)], [1]),
        "weight_grad": (tb.weight_grad(2 * reps, nb, bs, tile=tile),
                        [rnd(2 * reps, 1, m, tile, width), rnd(2 * reps, 1, m, tile, width),
                         rnd(1, 2 * reps, nb, bs, bs)], [2]),
    }
    shapes = KernelShapes(20, d, h, 4, bs, reps)
    for name, (make, _) in kernel_catalogue(shapes, DECAY, tile).items():
        if name in cases or name in ("gather_score_grad", "table_grad_segment", "weight_grad"):
            continue
        func = make()
        cases[name] = (func, [torch.randn(*[int(v) if not isinstance(v, tvm.tirx.Var) else
                                            (n if name == "gather_backward_fused" else m * tile)
                                            for v in p.shape], generator=g)
                              if p.dtype == "float32" else codes
                              for p in func.params], None)
    assert set(cb.SCHEDULES) <= set(cases), set(cb.SCHEDULES) - set(cases)
    for name, (func, args, outs) in cases.items():
        symbol = str(func.attrs["global_symbol"])
        plain = tvm.compile(func, target=tgt)[symbol]
        fast = tvm.compile(cb.SCHEDULES[name](func, 8), target=tgt)[symbol]
        a = [t.clone() for t in args]
        b = [t.clone() for t in args]
        plain(*a)
        fast(*b)
        for i in outs if outs is not None else range(len(args)):
            if args[i].dtype == torch.float32:
                _close(b[i], a[i], name)


# gathers, scatters, masked moves, or any masked instruction with a memory operand other
# than a constant-pool load (a masked broadcast of 1.0 is how LLVM writes a vector select)
_BAD_ASM = re.compile(r"\b(v(p)?gather\w*|v(p)?scatter\w*|v(p)?maskmov\w*)\b"
                      r"|^(?!.*%rip).*\(.*\{%k[1-7]\}|^(?!.*%rip).*\{%k[1-7]\}.*\(")


@pytest.mark.parametrize("mcpu", ["znver4", pytest.param("skylake-avx512", marks=pytest.mark.slow)])
def test_avx512_machine_code_has_no_gathers_or_masked_accesses(mcpu):
    """Cross-compiled for AVX-512 (nothing runs): only contiguous vector memory accesses,
    also where bits per table are odd (scalar loops LLVM would otherwise auto-vectorise
    into masked gathers and scatters)."""
    from lookupc import tvm_shim
    from lookupc.schedules.cpu.backward import codegen_target

    target = tvm_shim.make_target({"kind": "llvm", "mcpu": mcpu})
    lanes = tvm_shim.vector_lanes(target)
    assert lanes == 16
    for shapes in (KernelShapes(384, 384, 128, 4, 32, 1), KernelShapes(48, 40, 12, 3, 16, 2)):
        for name, (make, schedule) in kernel_catalogue(shapes, lanes=lanes).items():
            asm = tvm_shim.compile_module(schedule(make(), lanes), codegen_target(target))
            lines = asm.mod.inspect_source("asm").splitlines()
            hits = sorted({ln.strip() for ln in lines if _BAD_ASM.search(ln)})
            assert not hits, f"{name} for {mcpu}: {hits[:5]}"


# --------------------------------------------------------------------------- dispatch
def _grads(module, x, schedule, dtype=torch.float32):
    module = module.to(dtype)
    module.zero_grad(set_to_none=True)
    xr = x.to(dtype).clone().requires_grad_()
    with lookupc.set_schedule(schedule):
        (module(xr).square().mean() + module(xr[:1]).sum()).backward()
    return [xr.grad] + [p.grad.clone() for p in module.parameters()]


def test_loss_backward_under_cpu_schedule_runs_tvm_and_matches_reference(monkeypatch):
    torch.manual_seed(0)
    m = lookupc.LookupFFN(48, 40, lookupc.LookupConfig(tables=12, bits=8, block_size=16))
    x = torch.randn(3, 7, 48)
    calls = []
    for method in ("hash_backward", "gather_backward"):
        orig = getattr(CpuTrainingKernels, method)

        def spy(self, *args, _orig=orig, _name=method):
            calls.append(_name)
            return _orig(self, *args)
        monkeypatch.setattr(CpuTrainingKernels, method, spy)
    want = _grads(m, x, "reference")
    assert not calls
    got = _grads(m, x, "cpu")
    assert sorted(set(calls)) == ["gather_backward", "hash_backward"]
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for a, b, what in zip(got, want, names):
        _close(a, b, what)
    with lookupc.set_schedule("tuned"):  # "tuned" runs the same backward kernels as "cpu"
        tuned = dispatch.provider_for(torch.device("cpu"), torch.float32)
    with lookupc.set_schedule("cpu"):
        cpu = dispatch.provider_for(torch.device("cpu"), torch.float32)
    assert tuned.schedule == "tuned" and tuned._training() is cpu._training()


def test_float64_and_naive_keep_the_reference_backward(monkeypatch):
    def boom(*args):
        raise AssertionError("TVM backward used for a reference-only case")

    monkeypatch.setattr(CpuTrainingKernels, "hash_backward", boom)
    monkeypatch.setattr(CpuTrainingKernels, "gather_backward", boom)
    with lookupc.set_schedule("cpu"):
        assert dispatch.provider_for(torch.device("cpu"), torch.float64).name == "reference"
    torch.manual_seed(0)
    m = lookupc.LookupFFN(12, 6, lookupc.LookupConfig(tables=3, bits=3, block_size=4)).double()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    with lookupc.set_schedule("cpu"):
        assert torch.autograd.gradcheck(lambda t: m(t), (x,), eps=1e-6, atol=1e-5)
    m32 = lookupc.LookupFFN(12, 6, lookupc.LookupConfig(tables=3, bits=3, block_size=4))
    x32 = torch.randn(4, 12)
    a = _grads(m32, x32, "naive")  # the naive schedule's backward: the reference
    b = _grads(m32, x32, "reference")
    for u, v in zip(a, b):
        _close(u, v, "naive")
