"""lookupc: compile transformer feed-forward networks into LookupFFN for CPUs.

Heavy dependencies (torch, TVM, transformers) load lazily: ``import lookupc`` is
cheap, and each public name imports its module on first use.

>>> import lookupc
>>> cfg = lookupc.LookupConfig(tables=128, bits=8, block_size=64)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# passes/ and schedules/ live at the top of the source tree; the package-dir mapping in
# pyproject.toml (honoured by wheels and by editable installs alike) is the one place
# that joins them into lookupc.passes / lookupc.schedules.

# public name -> module that defines it
_EXPORTS = {
    "LookupConfig": "lookupc.config",
    "LookupFFN": "lookupc.module",
    "dense_ffn_flops": "lookupc.module",
    "set_schedule": "lookupc.dispatch",
    "current_schedule": "lookupc.dispatch",
    "available_schedules": "lookupc.dispatch",
    "LookupcError": "lookupc.errors",
    "LookupcInputError": "lookupc.errors",
    "PassError": "lookupc.errors",
    "find_ffns": "lookupc.passes.api",
    "convert": "lookupc.passes.api",
    "ConversionResult": "lookupc.passes.api",
    "load": "lookupc.artifact.load",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lookupc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
