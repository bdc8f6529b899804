"""lookupc's reference math and ops against the plain NumPy implementation in numpy_lookup."""

import numpy as np
import numpy_lookup as npl
import pytest
import torch

from lookupc import LookupConfig, LookupFFN
from lookupc import reference as ref


def _params(m: LookupFFN):
    return [p.detach().double().numpy() for p in (m.bh4_weight, m.hash_bias, m.tables, m.bias)]


@pytest.mark.parametrize("d_in,d_out,tables,bits,block", [
    (24, 10, 6, 4, 8),      # d_in not a power of two, d_out != d_in, one repeat
    (16, 16, 16, 1, 4),     # tau = 1, h*tau = D
    (20, 7, 5, 8, 16),      # tau = 8, two repeats (40 > 32)
    (12, 5, 2, 13, 4),      # tau = 13 (8192-row tables), two repeats
])
def test_op_matches_numpy(d_in, d_out, tables, bits, block):
    m = LookupFFN(d_in, d_out, LookupConfig(tables=tables, bits=bits, block_size=block)).double()
    with torch.no_grad():
        m.hash_bias.normal_(0, 0.1)
        m.bias.normal_(0, 0.1)
    x = torch.randn(5, d_in, dtype=torch.float64)
    w, hb, t, b = _params(m)
    codes, scores, y = npl.lookup_ffn(x.numpy(), w, hb, t, b, m.config.decay, bits)
    got_scores, got_codes = m.hash(x)
    assert got_codes.dtype == torch.int32
    np.testing.assert_array_equal(got_codes.numpy(), codes)
    np.testing.assert_allclose(got_scores.detach().numpy(), scores, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m(x).detach().numpy(), y, rtol=1e-10, atol=1e-12)


def test_fwht_twice_is_d_times_identity():
    for d in (1, 2, 8, 64, 512):
        x = torch.randn(3, d, dtype=torch.float64)
        torch.testing.assert_close(ref.fwht(ref.fwht(x)), d * x)


def test_fwht_equals_hadamard_matrix():
    x = torch.randn(4, 16, dtype=torch.float64)
    h = torch.from_numpy(npl.hadamard_matrix(16))
    torch.testing.assert_close(ref.fwht(x), x @ h)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power-of-two"):
        ref.fwht(torch.randn(2, 12))


def test_codes_known_answer_msb_first():
    # table 0: signs + - + +  -> 1011b = 11 ; table 1: - - - + -> 0001b = 1 ; zero is "not > 0"
    z = torch.tensor([[0.5, -2.0, 3.0, 0.1, -1.0, -0.2, 0.0, 4.0]])
    codes, _ = ref.codes_scores(z, 4)
    assert codes.tolist() == [[11, 1]]


def test_scores_known_answer():
    # one bit: score = |z| / (1 + e^{-2|z|})  (paper's tau=1 GELU-like weight)
    z = torch.tensor([[1.0], [-2.0], [0.0]], dtype=torch.float64)
    _, s = ref.codes_scores(z, 1)
    expect = [1 / (1 + np.exp(-2)), 2 / (1 + np.exp(-4)), 0.0]
    np.testing.assert_allclose(s[:, 0].numpy(), expect, rtol=1e-12)
    # two bits, by the paper's definition <z,S> e^{<z,S>} / prod(e^z + e^-z)
    z = torch.tensor([[0.3, -0.7]], dtype=torch.float64)
    _, s = ref.codes_scores(z, 2)
    num = 1.0 * np.exp(1.0)
    den = (np.exp(0.3) + np.exp(-0.3)) * (np.exp(0.7) + np.exp(-0.7))
    np.testing.assert_allclose(s.item(), num / den, rtol=1e-12)


def test_scores_do_not_overflow():
    z = torch.tensor([[1e4, -3e4, 5e3, 800.0]], dtype=torch.float32)
    codes, s = ref.codes_scores(z, 4)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s, torch.tensor([[z.abs().sum().item()]]))
    assert codes.item() == 0b1011
