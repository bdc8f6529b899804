"""Exception hierarchy of lookupc.

``LookupcError`` is the root: the package raises nothing else on purpose
(``tests/test_errors.py`` checks the source). Bad user input raises ``ValueError``
subclasses (and ``TypeError``/``IndexError`` ones where the standard library would) so
that callers who only know the standard library still catch it; a pass that fails
raises ``PassError`` naming the pass (chained with ``from`` to the cause).
"""

from __future__ import annotations


class LookupcError(Exception):
    """Root of every error lookupc raises on purpose."""


class LookupcInputError(LookupcError, ValueError):
    """An argument has the wrong shape, dtype, device or value; the message names it."""


class LookupcTypeError(LookupcInputError, TypeError):
    """An argument has the wrong type (also a ``TypeError``)."""


class LookupcIndexError(LookupcInputError, IndexError):
    """An index is out of range, e.g. a code outside its table (also an ``IndexError``)."""


class KernelNotFoundError(LookupcError, KeyError):
    """No compiled kernel for these shapes in a library or build (also a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PassError(LookupcError):
    """A graph pass failed; ``pass_name`` says which one."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass {pass_name!r} failed: {message}")
        self.pass_name = pass_name


class OutputMismatchError(LookupcError):
    """Compiled kernels gave outputs that differ from the PyTorch reference beyond tolerance."""
