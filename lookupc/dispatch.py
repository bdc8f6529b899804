"""Which implementation the ``lookupc`` custom ops run: the PyTorch reference or compiled kernels.

A *kernel provider* implements :class:`KernelProvider` (a ``typing.Protocol``): ``name``,
``supports(device, dtype)``, and ``hash``/``gather`` on 2-D contiguous tensors. It may
also implement the optional methods of :class:`TrainingKernelProvider`
(``hash_backward``, ``gather_backward``) and :class:`QuantizedGatherProvider`
(``gather_quantized``); where it does not, those ops run the reference math.

Providers register by schedule name (``register_provider``); ``"reference"`` is always
there. The schedule in use is chosen with :func:`set_schedule` (a setter that also
works as a context manager). The default, ``"auto"``, means the reference on CPU
tensors and the ``"cuda"`` provider on CUDA tensors. A chosen schedule that cannot
serve a CPU tensor's dtype (compiled kernels are float32) falls back to the reference;
on a CUDA tensor it raises instead of silently running something else.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from . import reference as ref
from .errors import LookupcError, LookupcInputError

__all__ = ["set_schedule", "current_schedule", "register_provider", "available_schedules",
           "provider_for", "KernelProvider", "TrainingKernelProvider", "QuantizedGatherProvider"]


@runtime_checkable
class KernelProvider(Protocol):
    """What every provider implements (tensors 2-D and contiguous; ``N`` tokens)."""

    name: str

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether it runs tensors of ``device``/``dtype``."""

    def hash(self, x: Tensor, weight: Tensor, hash_bias: Tensor, decay: float,
             bits: int) -> tuple[Tensor, Tensor]:
        """``x`` [N, d_in] -> (codes int32 [N, h], scores [N, h])."""

    def gather(self, codes: Tensor, scores: Tensor, tables: Tensor, bias: Tensor) -> Tensor:
        """Weighted sum of table rows: -> y [N, d_out]."""


@runtime_checkable
class TrainingKernelProvider(KernelProvider, Protocol):
    """A provider whose kernels also run the backward ops."""

    def hash_backward(self, grad_scores: Tensor, x: Tensor, weight: Tensor, hash_bias: Tensor,
                      decay: float, bits: int) -> tuple[Tensor, Tensor, Tensor]:
        """-> (grad_x, grad_weight, grad_hash_bias)."""

    def gather_backward(self, grad_y: Tensor, codes: Tensor, scores: Tensor,
                        tables: Tensor) -> tuple[Tensor, Tensor]:
        """-> (grad_scores, grad_tables)."""


@runtime_checkable
class QuantizedGatherProvider(KernelProvider, Protocol):
    """A provider with a gather over bfloat16 / int8 tables (``LookupConfig.table_dtype``)."""

    def gather_quantized(self, codes: Tensor, scores: Tensor, tables: Tensor,
                         scale: Tensor | None, bias: Tensor) -> Tensor:
        """Like ``gather``; int8 ``tables`` come with one float32 ``scale`` per row."""


class _ReferenceProvider:
    """The PyTorch reference math (``lookupc.reference``) as a provider."""

    name = "reference"

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def hash(self, x, weight, hash_bias, decay, bits):
        return ref.codes_scores(ref.hash_forward(x, weight, hash_bias, decay), bits)

    def gather(self, codes, scores, tables, bias):
        return ref.gather_forward(codes, scores, tables, bias)


_REFERENCE = _ReferenceProvider()
# name -> zero-argument factory returning a provider; created lazily (TVM imports are slow).
_FACTORIES: dict[str, Callable[[], KernelProvider]] = {"reference": lambda: _REFERENCE,
                                               "auto": lambda: _REFERENCE}
_ALIASES = {"hand": "cpu", "ref": "reference", "torch": "reference"}
_INSTANCES: dict[str, KernelProvider] = {"reference": _REFERENCE}
_state = threading.local()
_default = ["auto"]


def register_provider(name: str, factory: Callable[[], KernelProvider]) -> None:
    """Register ``factory`` (called once, lazily) as the provider for schedule ``name``."""
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def available_schedules() -> list[str]:
    _load_builtin_providers()
    return sorted(_FACTORIES)


def _canonical(name: str) -> str:
    _load_builtin_providers()
    name = _ALIASES.get(name, name)
    if name not in _FACTORIES:
        raise LookupcInputError(
            f"unknown schedule {name!r}; available: {', '.join(sorted(_FACTORIES))}")
    return name


def current_schedule() -> str:
    """Name of the schedule the ops use in this thread."""
    return getattr(_state, "name", None) or _default[0]


class _ScheduleSetting(contextlib.AbstractContextManager):
    def __init__(self, previous: str | None, previous_default: str):
        self._previous = previous
        self._previous_default = previous_default

    def __exit__(self, *exc) -> None:
        _state.name = self._previous
        _default[0] = self._previous_default


def set_schedule(name: str) -> _ScheduleSetting:
    """Select the implementation of the lookupc ops: ``"auto"`` (default), ``"reference"``,
    ``"naive"``, ``"cpu"`` (alias ``"hand"``), ``"tuned"``, ``"cuda"``...

    Used as a statement it sets the process default; used in a ``with`` block it
    restores the previous choice on exit.

    >>> with set_schedule("reference"):
    ...     pass
    """
    canonical = _canonical(name)
    setting = _ScheduleSetting(getattr(_state, "name", None), _default[0])
    _default[0] = canonical
    _state.name = canonical
    return setting


def provider_for(device: torch.device, dtype: torch.dtype) -> KernelProvider:
    """The provider that runs the ops on tensors of ``device``/``dtype`` (see module doc)."""
    name = current_schedule()
    if name == "auto":
        name = "cuda" if device.type == "cuda" else "reference"
    if name == "reference":
        return _REFERENCE
    provider = _INSTANCES.get(name)
    if provider is None:
        _load_builtin_providers()
        if name not in _FACTORIES:
            raise LookupcError(f"no {name!r} kernels are available for {device} tensors "
                               f"(available: {', '.join(sorted(_FACTORIES))})")
        provider = _FACTORIES[name]()
        if not isinstance(provider, KernelProvider):
            missing = [m for m in ("name", "supports", "hash", "gather") if not hasattr(provider, m)]
            raise LookupcError(f"the provider registered as {name!r} ({type(provider).__name__}) "
                               f"is not a KernelProvider: it lacks {', '.join(missing)}")
        _INSTANCES[name] = provider
    if provider.supports(device, dtype):
        return provider
    if device.type == "cpu":
        return _REFERENCE
    raise LookupcError(f"schedule {name!r} cannot run {dtype} tensors on {device}")


_builtin_loaded = [False]


def _load_builtin_providers() -> None:
    """Register the compiled-kernel providers shipped with lookupc (without importing TVM)."""
    if _builtin_loaded[0]:
        return
    _builtin_loaded[0] = True
    import importlib

    for module in ("runtime.cpu", "runtime.cuda"):  # register "naive"/"cpu"/"tuned" and "cuda"
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(f"{__package__}.{module}")

