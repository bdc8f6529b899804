"""Exception hierarchy of lookupc.

``LookupcError`` is the root. Bad user input raises ``ValueError`` subclasses so
that callers who only know the standard library still catch it; a pass that fails
raises ``PassError`` naming the pass (chained with ``from`` to the cause).
"""

from __future__ import annotations


class LookupcError(Exception):
    """Root of every error lookupc raises on purpose."""


class LookupcInputError(LookupcError, ValueError):
    """An argument has the wrong shape, dtype, device or value; the message names it."""


class PassError(LookupcError):
    """A graph pass failed; ``pass_name`` says which one."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass {pass_name!r} failed: {message}")
        self.pass_name = pass_name


class OutputMismatchError(LookupcError):
    """Compiled kernels gave outputs that differ from the PyTorch reference beyond tolerance."""
