"""bench/train_step.py's whole-model rows run: its ``cpu-forward`` provider is a real
KernelProvider (TVM forward, reference backward) and gives the reference gradients."""

import importlib.util
import os

import torch

import lookupc
from lookupc import LookupConfig, LookupFFN
from lookupc.dispatch import KernelProvider

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train_step",
                                                  os.path.join(ROOT, "bench", "train_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_forward_only_provider_runs_tvm_forward_and_reference_backward():
    bench = _bench()
    assert isinstance(bench._ForwardOnly(), KernelProvider)
    bench._register_forward_only()
    torch.manual_seed(0)
    lk = LookupFFN(32, 32, LookupConfig(tables=8, bits=4, block_size=8))
    x = torch.randn(37, 32)
    grads = {}
    for schedule in ("reference", "cpu-forward"):
        lk.zero_grad(set_to_none=True)
        with lookupc.set_schedule(schedule):
            y = lk(x)
            y.pow(2).sum().backward()
        grads[schedule] = (y.detach(), [p.grad.clone() for p in lk.parameters()])
    torch.testing.assert_close(grads["cpu-forward"][0], grads["reference"][0],
                               atol=1e-4, rtol=1e-4)
    for a, b in zip(grads["cpu-forward"][1], grads["reference"][1]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_floor_stand_in_keeps_a_trainable_path():
    ffn = _bench()._FreeFFN(6)
    x = torch.randn(3, 6, requires_grad=True)
    ffn(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 6))
    assert ffn.w.grad is not None
