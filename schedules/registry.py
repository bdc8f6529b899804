"""Kernel schedules by name: ``naive``, ``cpu`` (hand-written) and ``tuned`` (MetaSchedule).

A schedule object has ``name``, ``fold`` (whether the hash takes the folded weight
layout, see ``lookupc.kernels.forward``), ``applies_to(target)``, ``hash(func, shapes,
target)`` and ``gather(func, shapes, target)`` returning scheduled PrimFuncs, and
``cache_token()`` (extra text for build-cache keys). The source text of the file that
defines a schedule is part of every cache key (:func:`source_token`), so editing a
schedule invalidates the modules built with it.

Schedules are gated on the target: all three are CPU (``llvm``) schedules and read the
CPU from the target's ``mcpu`` (its vector width picks the vector lengths).
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

from lookupc.errors import LookupcInputError

__all__ = ["get_schedule", "schedule_names", "source_token", "ALIASES"]

ALIASES = {"hand": "cpu"}
_NAMES = ("naive", "cpu", "tuned")


def schedule_names(aliases: bool = False) -> list[str]:
    """Names :func:`get_schedule` accepts (the one list the CLI, dispatch and benchmarks
    read), with the aliases (``hand``) when ``aliases``."""
    return list(_NAMES) + (list(ALIASES) if aliases else [])


def get_schedule(name: str, target: Any, tuning_db: str | None = None) -> Any:
    """The schedule ``name`` for ``target`` (a ``tvm.target.Target``).

    Parameters
    ----------
    name : str
        ``"naive"``, ``"cpu"`` (alias ``"hand"``) or ``"tuned"``.
    target : tvm.target.Target
        Must be an llvm (CPU) target for these schedules.
    tuning_db : str, optional
        MetaSchedule work directory (``tuned`` only; default ``$LOOKUPC_TUNING_DB`` or
        ``~/.cache/lookupc/tuning``).
    """
    name = ALIASES.get(name, name)
    if name == "naive":
        from lookupc.schedules.cpu.naive import NaiveSchedule
        sched = NaiveSchedule()
    elif name == "cpu":
        from lookupc.schedules.cpu.hand import CpuSchedule
        sched = CpuSchedule()
    elif name == "tuned":
        from lookupc.schedules.cpu.tuned import TunedSchedule
        sched = TunedSchedule(tuning_db)
    else:
        raise LookupcInputError(f"unknown schedule {name!r}; available: {', '.join(_NAMES)}")
    if not sched.applies_to(target):
        raise LookupcInputError(f"schedule {name!r} needs an llvm (CPU) target, got "
                                f"{target.kind.name!r}")
    return sched


def source_token(sched: Any) -> str:
    """Hash of the source of the module defining ``sched`` plus its ``cache_token()``."""
    src = inspect.getsource(inspect.getmodule(type(sched)))
    return hashlib.sha256((src + sched.cache_token()).encode()).hexdigest()[:16]
