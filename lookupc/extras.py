"""Optional dependencies, installed as extras, and the error that names the missing one.

==========  ==========================  ================================================
extra       packages                    needed for
==========  ==========================  ================================================
``hf``      transformers                Hugging Face model directories, MiniLM benches
``memo``    faiss-cpu, transformers     the attention-memoization store (HNSW index)
``plot``    matplotlib                  ``lookupc compare --plot``, bench plots
``tune``    xgboost-cpu                 MetaSchedule's XGBoost cost model (``lookupc tune``)
``sign``    cryptography                Ed25519 artifact signatures (``lookupc keygen``)
==========  ==========================  ================================================

``pip install 'lookupc[all]'`` installs them all.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import LookupcError

__all__ = ["MissingExtraError", "require"]

EXTRAS = {"transformers": "hf", "faiss": "memo", "matplotlib": "plot", "xgboost": "tune",
          "cryptography": "sign"}
PACKAGES = {"faiss": "faiss-cpu", "xgboost": "xgboost-cpu"}


class MissingExtraError(LookupcError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming its extra and ``what``."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        if getattr(err, "name", top) not in (top, module):
            raise  # the package is there but one of its own imports failed: show that
        extra = EXTRAS.get(top, "all")
        raise MissingExtraError(
            f"{what} needs {PACKAGES.get(top, top)}, which is not installed: "
            f"pip install 'lookupc[{extra}]'") from None
