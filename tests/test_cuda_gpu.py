"""The TVM-built CUDA kernels on a GPU against the CPU reference (skipped without a GPU).

Tolerances (float32 on the GPU vs the reference): scores, outputs and gradients within
1e-4 of the largest magnitude (relative); codes equal wherever no coordinate of z is
within 1e-4 of zero (a sign there may legitimately flip); against float64 autograd
2e-3; one SGD step changes every parameter by the same amount within 1e-4 (relative).
"""

import copy

import pytest
import torch

import lookupc
from lookupc import dispatch
from lookupc import reference as ref

pytestmark = pytest.mark.gpu

# (n, d_in, d_out, tables, bits, block): odd N, N = 1, d_in not a power of two,
# two repeats, d_out != d_in, the paper config
SHAPES = [(1, 20, 24, 4, 4, 4), (257, 48, 40, 12, 8, 16), (1000, 512, 512, 128, 8, 64)]
RTOL = 1e-4


def _module(d_in, d_out, h, bits, bs, seed=0):
    torch.manual_seed(seed)
    m = lookupc.LookupFFN(d_in, d_out, lookupc.LookupConfig(tables=h, bits=bits, block_size=bs))
    with torch.no_grad():
        m.hash_bias.normal_(0, 0.1)
        m.bias.normal_()
    return m


def _close(a, b, what, rtol=RTOL):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def _stable(x, m):
    """Tokens whose soft codes have no coordinate near zero (codes cannot flip)."""
    z = ref.hash_forward(x.reshape(-1, m.d_in), m.bh4_weight, m.hash_bias, m.config.decay)
    return ~(z.abs() < 1e-4).any(-1)


def test_auto_schedule_routes_cuda_tensors_to_the_cuda_kernels():
    provider = dispatch.provider_for(torch.device("cuda"), torch.float32)
    assert type(provider).__name__ == "CudaProvider"
    with pytest.raises(lookupc.LookupcError):
        dispatch.provider_for(torch.device("cuda"), torch.float64)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_cpu_reference(shape):
    n, d_in, d_out, h, bits, bs = shape
    cpu = _module(d_in, d_out, h, bits, bs)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(n, d_in)
    x = x[_stable(x, cpu)]  # tokens whose codes cannot flip between implementations
    assert x.shape[0] >= max(1, n // 2)
    xc = x.clone().requires_grad_()
    xg = x.cuda().requires_grad_()
    with lookupc.set_schedule("reference"):
        s_c, c_c = cpu.hash(xc)
        y_c = cpu(xc)
    s_g, c_g = gpu.hash(xg)
    y_g = gpu(xg)
    assert c_g.dtype == torch.int32 and torch.equal(c_g.cpu(), c_c)
    _close(s_g, s_c, "scores")
    _close(y_g, y_c, "y")
    grad = torch.randn_like(y_c)
    with lookupc.set_schedule("reference"):
        y_c.backward(grad)
    y_g.backward(grad.cuda())
    _close(xg.grad, xc.grad, "g_x")
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        _close(pg.grad, pc.grad, f"g_{name}")


@pytest.mark.parametrize("method", ["atomic", "segment"])
def test_backward_matches_float64_autograd_of_the_reference(method):
    """gradcheck-style: CUDA gradients vs autograd of the reference math in float64."""
    m = _module(48, 40, 12, 8, 16, seed=1)
    x = torch.randn(64, 48)
    params64 = [p.detach().double().requires_grad_() for p in m.parameters()]
    x64 = x.double().requires_grad_()
    w, hb, tables, bias = params64
    y64 = ref.lookup_ffn(x64, w, hb, tables, bias, m.config.decay, m.config.bits)
    grad = torch.randn_like(y64)
    y64.backward(grad)
    gpu = copy.deepcopy(m).cuda()
    provider = dispatch.provider_for(torch.device("cuda"), torch.float32)
    provider.set_table_grad(method)
    try:
        xg = x.cuda().requires_grad_()
        gpu(xg).backward(grad.float().cuda())
    finally:
        provider.set_table_grad("atomic")
    _close(xg.grad, x64.grad, "g_x", 2e-3)
    for p64, pg, name in zip(params64, gpu.parameters(), ("weight", "hash_bias", "tables", "bias")):
        _close(pg.grad, p64.grad, f"g_{name}", 2e-3)


def test_one_optimizer_step_equals_the_cpu_step():
    cpu = _module(48, 40, 12, 8, 16, seed=2)
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(128, 48)
    keep = _stable(x, cpu)
    x = x[keep]
    target = torch.randn(x.shape[0], 40)
    # SGD with momentum: the update is linear in the gradient (Adam's first step is
    # g / (|g| + eps), which turns float rounding in near-zero gradients into full steps)
    opt_c = torch.optim.SGD(cpu.parameters(), lr=0.1, momentum=0.9)
    opt_g = torch.optim.SGD(gpu.parameters(), lr=0.1, momentum=0.9)
    with lookupc.set_schedule("reference"):
        torch.nn.functional.mse_loss(cpu(x), target).backward()
    torch.nn.functional.mse_loss(gpu(x.cuda()), target.cuda()).backward()
    before = [p.detach().clone() for p in cpu.parameters()]
    opt_c.step()
    opt_g.step()
    for (name, pc), pg, p0 in zip(cpu.named_parameters(), gpu.parameters(), before):
        delta_c, delta_g = pc.detach() - p0, pg.detach().cpu() - p0
        assert delta_c.abs().max() > 0, name
        _close(delta_g, delta_c, f"step of {name}")


def test_kernels_are_built_once_per_shape():
    m = _module(48, 40, 12, 8, 16).cuda()
    m(torch.randn(33, 48, device="cuda")).sum().backward()
    provider = dispatch.provider_for(torch.device("cuda"), torch.float32)
    kernels = provider.kernels(m.tables)
    builds = kernels.builds
    m(torch.randn(40, 48, device="cuda")).sum().backward()  # same hash bucket
    assert kernels.builds == builds
