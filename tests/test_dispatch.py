import pytest
import torch

import lookupc
from lookupc import dispatch
from lookupc.errors import LookupcError


class _Recorder:
    """A provider that runs the reference math and records what it was asked to do."""

    name = "recorder"

    def __init__(self):
        self.calls = []

    def supports(self, device, dtype):
        return dtype == torch.float32

    def hash(self, *args):
        self.calls.append("hash")
        return dispatch._REFERENCE.hash(*args)

    def gather(self, *args):
        self.calls.append("gather")
        return dispatch._REFERENCE.gather(*args)


def test_unknown_schedule_lists_available():
    with pytest.raises(ValueError, match="unknown schedule 'nope'; available: .*reference"):
        lookupc.set_schedule("nope")


def test_context_manager_restores_previous():
    assert lookupc.current_schedule() == "auto"
    with lookupc.set_schedule("reference"):
        assert lookupc.current_schedule() == "reference"
    assert lookupc.current_schedule() == "auto"


def test_registered_provider_is_used_and_dtype_fallback():
    rec = _Recorder()
    dispatch.register_provider("test-recorder", lambda: rec)
    m = lookupc.LookupFFN(16, 4, lookupc.LookupConfig(tables=4, bits=3, block_size=4))
    x = torch.randn(3, 16)
    expect = m(x)
    with lookupc.set_schedule("test-recorder"):
        torch.testing.assert_close(m(x), expect)
        assert rec.calls == ["hash", "gather"]
        m.double()(x.double())  # float64 is not supported by it: reference, no call
        assert rec.calls == ["hash", "gather"]
    dispatch._FACTORIES.pop("test-recorder")


def test_unsupported_device_raises_instead_of_falling_back():
    rec = _Recorder()
    dispatch.register_provider("test-recorder", lambda: rec)
    with lookupc.set_schedule("test-recorder"):
        with pytest.raises(LookupcError, match="cannot run torch.float64 tensors on meta"):
            dispatch.provider_for(torch.device("meta"), torch.float64)
    dispatch._FACTORIES.pop("test-recorder")
