"""Pass infrastructure: :class:`PassResult`, :class:`Pass`, :func:`run_passes`, match filters.

Modelled on ``torch.fx.passes.infra``: a pass is a small callable over a module
(an ``nn.Module`` or an fx ``GraphModule``) returning ``PassResult(module, modified)``.
"No match" is not an error (``modified=False``); a pass that fails raises
:class:`lookupc.errors.PassError` naming the pass and the passes that ran before it.

Match filters are named functions ``candidate -> reason | None``: ``None`` keeps the
candidate, a string rejects it and becomes the reason shown in ``report.skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generic, Iterable, Sequence, TypeVar

from torch import nn

from lookupc.errors import PassError

__all__ = ["PassResult", "Pass", "run_passes", "MatchFilter", "first_rejection"]

T = TypeVar("T")


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) module and whether it changed anything."""

    module: nn.Module
    modified: bool


class Pass:
    """Base class of lookupc passes: subclasses set ``name`` and implement :meth:`call`.

    ``requires`` / ``ensures`` are optional checks run before and after ``call``.
    """

    name: str = "pass"

    def requires(self, module: nn.Module) -> None:
        """Raise if ``module`` is not a valid input of this pass."""

    def call(self, module: nn.Module) -> PassResult:
        raise NotImplementedError

    def ensures(self, module: nn.Module) -> None:
        """Raise if the pass left ``module`` in an invalid state."""

    def __call__(self, module: nn.Module) -> PassResult:
        self.requires(module)
        result = self.call(module)
        self.ensures(result.module)
        return result


def run_passes(passes: Sequence[Callable[[nn.Module], PassResult]],
               module: nn.Module) -> PassResult:
    """Run ``passes`` in order (like ``torch.fx.passes.infra.PassManager``).

    Returns the final module and whether any pass modified it. A pass that raises
    is reported as :class:`PassError` naming it and the passes that ran before it.
    """
    modified, done = False, []
    for p in passes:
        name = getattr(p, "name", None) or getattr(p, "__name__", type(p).__name__)
        try:
            result = p(module)
        except PassError:
            raise
        except Exception as exc:
            after = f" (after {', '.join(done)})" if done else ""
            raise PassError(name, f"{type(exc).__name__}: {exc}{after}") from exc
        module, modified = result.module, modified or result.modified
        done.append(name)
    return PassResult(module, modified)


@dataclass(frozen=True)
class MatchFilter(Generic[T]):
    """A named match filter: ``fn(candidate)`` returns ``None`` to keep it or a reason."""

    name: str
    fn: Callable[[T], str | None]

    def __call__(self, candidate: T) -> str | None:
        return self.fn(candidate)


def first_rejection(filters: Iterable[MatchFilter[T]],
                    candidate: T) -> tuple[str, str] | None:
    """``(filter name, reason)`` of the first filter that rejects ``candidate``, or ``None``."""
    for f in filters:
        reason = f(candidate)
        if reason is not None:
            return f.name, reason
    return None
