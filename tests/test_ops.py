"""The custom ops: opcheck, gradcheck, export, torch.compile, bad inputs, training."""

import pytest
import torch
import torch.nn.functional as F

from lookupc import LookupcInputError, LookupConfig, LookupFFN
from lookupc import reference as ref


def _small(d_in=20, d_out=6, tables=5, bits=4, block=8, dtype=torch.float64):
    torch.manual_seed(0)
    m = LookupFFN(d_in, d_out, LookupConfig(tables=tables, bits=bits, block_size=block))
    return m.to(dtype)


def _hash_args(m, x):
    return (x, m.bh4_weight, m.hash_bias, float(m.config.decay), m.config.bits)


def test_opcheck_hash_and_gather():
    m = _small(dtype=torch.float32)
    x = torch.randn(3, 4, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.lookupc.hash.default, _hash_args(m, x))
    scores, codes = m.hash(x)
    torch.library.opcheck(torch.ops.lookupc.gather.default,
                          (codes, scores.detach().requires_grad_(), m.tables, m.bias))


def test_opcheck_backward_ops():
    m = _small(dtype=torch.float32)
    x = torch.randn(7, 20)
    scores, codes = m.hash(x)
    torch.library.opcheck(torch.ops.lookupc.hash_backward.default,
                          (torch.randn(7, 5), x, m.bh4_weight.detach(), m.hash_bias.detach(),
                           0.7, 4))
    torch.library.opcheck(torch.ops.lookupc.gather_backward.default,
                          (torch.randn(7, 6), codes, scores.detach(), m.tables.detach()))


def test_gradcheck_float64_all_inputs():
    m = _small()
    with torch.no_grad():
        m.hash_bias.normal_(0, 0.1)
    x = torch.randn(4, 20, dtype=torch.float64, requires_grad=True)
    w = m.bh4_weight.detach().clone().requires_grad_()
    hb = m.hash_bias.detach().clone().requires_grad_()
    t = m.tables.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()

    def f(x, w, hb, t, b):
        scores, codes = torch.ops.lookupc.hash(x, w, hb, 0.7, 4)
        return torch.ops.lookupc.gather(codes, scores, t, b)

    assert torch.autograd.gradcheck(f, (x, w, hb, t, b), eps=1e-6, atol=1e-5)


def test_backward_matches_autograd_of_reference():
    m = _small(d_in=24, d_out=9, tables=8, bits=8, block=8)  # two repeats
    x = torch.randn(2, 3, 24, dtype=torch.float64, requires_grad=True)
    m(x).square().sum().backward()
    got = [x.grad] + [p.grad for p in (m.bh4_weight, m.hash_bias, m.tables, m.bias)]

    params = [p.detach().clone().requires_grad_() for p in
              (m.bh4_weight, m.hash_bias, m.tables, m.bias)]
    x2 = x.detach().clone().requires_grad_()

    def plain_forward(x, w, hb, t, b):  # differentiable torch ops only
        z = ref.hash_forward(x.reshape(-1, 24), w, hb, 0.7)
        codes, _ = ref.codes_scores(z.detach(), 8)
        zz = z.reshape(z.shape[0], -1, 8)
        a = zz.abs()
        scores = a.sum(-1) * torch.exp(-F.softplus(-2 * a).sum(-1))
        idx = codes.long() + torch.arange(8) * 256
        rows = t.reshape(-1, 9)[idx]
        return (scores[..., None] * rows).sum(1) + b

    plain_forward(x2, *params).square().sum().backward()
    expect = [x2.grad] + [p.grad for p in params]
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e)


def test_export_keeps_lookupc_ops():
    m = _small(dtype=torch.float32).eval()
    wrapper = torch.nn.Sequential(torch.nn.Linear(20, 20), m)
    x = torch.randn(2, 8, 20)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(wrapper, (x,), dynamic_shapes=({0: batch},))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "lookupc.hash.default" in targets and "lookupc.gather.default" in targets
    out = ep.module()(torch.randn(5, 8, 20))
    assert out.shape == (5, 8, 6)
    x3 = torch.randn(3, 8, 20)
    torch.testing.assert_close(ep.module()(x3), wrapper(x3))


def test_torch_compile_fullgraph():
    m = _small(dtype=torch.float32)
    x = torch.randn(4, 20)
    compiled = torch.compile(m, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), m(x))
    compiled_inductor = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled_inductor(x), m(x))
    compiled_inductor(x).sum().backward()
    assert m.tables.grad is not None


def test_any_leading_shape_and_non_contiguous():
    m = _small(dtype=torch.float32)
    x = torch.randn(20, 3, 4).permute(1, 2, 0)  # [3, 4, 20], non-contiguous
    assert not x.is_contiguous()
    y = m(x)
    assert y.shape == (3, 4, 6)
    torch.testing.assert_close(y, m(x.contiguous()))
    assert m(torch.randn(20)).shape == (6,)


@pytest.mark.parametrize("bad,match", [
    (lambda m, x: m(x.to(torch.float16)), "'x' must be float32 or float64"),
    (lambda m, x: m(torch.randn(3, 40)), "'x' has 40 features"),
    (lambda m, x: torch.ops.lookupc.hash(x, m.bh4_weight[0], m.hash_bias, 0.7, 4), "'weight'"),
    (lambda m, x: torch.ops.lookupc.hash(x, m.bh4_weight, m.hash_bias.double(), 0.7, 4),
     "'hash_bias' has dtype"),
    (lambda m, x: torch.ops.lookupc.hash(x, m.bh4_weight, m.hash_bias, 0.7, 3), "'hash_bias'"),
    (lambda m, x: torch.ops.lookupc.hash(x, m.bh4_weight, m.hash_bias, 0.7, 0), "'bits'"),
    (lambda m, x: torch.ops.lookupc.gather(m.hash(x)[1], m.hash(x)[0].double(), m.tables,
                                           m.bias), "'tables' has dtype"),
    (lambda m, x: torch.ops.lookupc.gather(m.hash(x)[0], m.hash(x)[0], m.tables, m.bias),
     "'codes' must be an int32/int64"),
    (lambda m, x: torch.ops.lookupc.gather(*m.hash(x)[::-1], m.tables[:, :3], m.bias),
     "power-of-two row count"),
    (lambda m, x: torch.ops.lookupc.gather(*m.hash(x)[::-1], m.tables, m.bias[:2]), "'bias'"),
    (lambda m, x: torch.ops.lookupc.gather(*m.hash(x[:, :2])[::-1], m.tables, m.bias), None),
])
def test_bad_inputs_name_the_argument(bad, match):
    m = _small(dtype=torch.float32)
    x = torch.randn(3, 20)
    if match is None:  # a hash of a narrower x is still valid (zero padding): no error
        bad(m, x)
        return
    with pytest.raises(LookupcInputError, match=match):
        bad(m, x)


def test_bad_device_names_argument():
    m = _small(dtype=torch.float32)
    x = torch.randn(3, 20, device="meta")
    with pytest.raises(LookupcInputError, match="'weight' is on cpu"):
        torch.ops.lookupc.hash(x, m.bh4_weight, m.hash_bias, 0.7, 4)


def test_trains_from_scratch_to_fit_dense_gelu_ffn():
    torch.manual_seed(0)
    d, hidden = 32, 128
    dense = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.GELU(),
                                torch.nn.Linear(hidden, d))
    x = torch.randn(2048, d)
    with torch.no_grad():
        target = dense(x)
    m = LookupFFN(d, d, LookupConfig(tables=16, bits=6, block_size=8))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for step in range(300):
        idx = torch.randint(0, 2048, (256,))
        loss = F.mse_loss(m(x[idx]), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
