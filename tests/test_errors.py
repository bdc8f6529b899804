"""One error hierarchy: the package raises only :class:`lookupc.LookupcError` subclasses
on purpose, and those stay catchable as the standard exceptions callers expect."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lookupc import errors

ROOT = Path(__file__).resolve().parents[1]
# (``raise AssertionError  # unreachable`` after a NoReturn helper is allowed: not an error
# a caller can see)
BUILTINS = {"ValueError", "TypeError", "KeyError", "IndexError", "RuntimeError", "Exception",
            "OSError", "LookupError"}
# (file, builtin): raised and caught inside the same function, never seen by a caller
LOCAL = {("lookupc/artifact/signing.py", "ValueError")}


def _raises(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name):
                yield exc.id, node.lineno


def test_the_package_raises_only_lookupc_errors():
    bad = []
    for folder in ("lookupc", "passes", "schedules"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            bad += [f"{rel}:{line} raises {name}" for name, line in _raises(path)
                    if name in BUILTINS and (rel, name) not in LOCAL]
    assert not bad, "raise a lookupc.errors class instead:\n" + "\n".join(bad)


def test_the_scan_sees_a_builtin_raise(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    raise ValueError('x')\n")
    assert list(_raises(path)) == [("ValueError", 2)]


@pytest.mark.parametrize("cls, std", [
    (errors.LookupcInputError, ValueError),
    (errors.LookupcTypeError, TypeError),
    (errors.LookupcIndexError, IndexError),
    (errors.KernelNotFoundError, KeyError),
])
def test_each_error_is_a_lookupc_error_and_its_standard_twin(cls, std):
    err = cls("the message")
    assert isinstance(err, errors.LookupcError) and isinstance(err, std)
    assert str(err) == "the message"  # no KeyError-style quoting


def test_bad_config_is_an_input_error():
    import lookupc

    with pytest.raises(lookupc.LookupcInputError, match="tables"):
        lookupc.LookupConfig(tables=0)
