"""Kernel providers implement the typed interface in :mod:`lookupc.dispatch`, and a
registered object that does not is refused with a clear error, never half-run."""

from __future__ import annotations

import pytest
import torch

from lookupc import dispatch
from lookupc.dispatch import (
    KernelProvider,
    QuantizedGatherProvider,
    TrainingKernelProvider,
    register_provider,
)
from lookupc.errors import LookupcError, LookupcInputError


def test_reference_is_a_kernel_provider():
    assert isinstance(dispatch._REFERENCE, KernelProvider)


@pytest.mark.parametrize("name", ["naive", "cpu", "tuned"])
def test_tvm_providers_implement_forward_backward_and_quantized(name):
    pytest.importorskip("tvm")
    from lookupc.runtime.cpu import TvmProvider

    provider = TvmProvider(name)
    assert provider.name == name
    assert isinstance(provider, KernelProvider)
    assert isinstance(provider, TrainingKernelProvider)
    assert isinstance(provider, QuantizedGatherProvider)


def test_cuda_providers_implement_training():
    pytest.importorskip("tvm")
    from lookupc.runtime.cuda import CudaProvider, EmulatedCudaProvider

    for cls in (CudaProvider, EmulatedCudaProvider):
        for method in ("supports", "hash", "gather", "hash_backward", "gather_backward"):
            assert callable(getattr(cls, method)), (cls, method)
        assert isinstance(cls.name, str)


class _NoGather:
    name = "broken"

    def supports(self, device, dtype):
        return True

    def hash(self, x, weight, hash_bias, decay, bits):
        raise AssertionError("must not run")


def test_a_registered_non_provider_is_refused_by_name():
    register_provider("broken-test", _NoGather)
    try:
        with dispatch.set_schedule("broken-test"):
            with pytest.raises(LookupcError, match="broken-test.*not a KernelProvider.*gather"):
                dispatch.provider_for(torch.device("cpu"), torch.float32)
    finally:
        dispatch._FACTORIES.pop("broken-test", None)
        dispatch._INSTANCES.pop("broken-test", None)


def test_unknown_schedule_is_an_input_error():
    with pytest.raises(LookupcInputError, match="unknown schedule 'nope'"):
        dispatch.set_schedule("nope")
