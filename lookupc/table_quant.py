"""Reduced-precision tables for a converted model: quantise every LookupFFN after training.

Training and distillation keep float32 master tables; :func:`quantize_lookups` then stores
each LookupFFN's tables in ``"bfloat16"`` or ``"int8"`` (symmetric, one scale per table
row: ``lookupc.reference.quantize_tables``) and says what that cost per layer: table
bytes before and after and the relative error of the stored tables. ``lookupc.convert``
calls it when a configuration asks for reduced-precision tables, ``lookupc compile
--table-dtype`` on the converted model before export.

int8 scales are per table row (4 bytes per row: 1% of an int8 row of 384 columns), not
per table: a table's rows differ in magnitude, and one scale per table would spend the
8 bits on its largest row.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .config import TABLE_DTYPES
from .errors import LookupcInputError
from .module import LookupFFN

__all__ = ["TableQuantization", "quantize_lookups", "require_float_tables"]


def require_float_tables(module: nn.Module, what: str) -> None:
    """Raise a clear ``LookupcInputError`` when a LookupFFN in ``module`` has
    reduced-precision tables (``what`` names the training step that was asked for)."""
    for name, m in module.named_modules():
        if isinstance(m, LookupFFN) and m.config.table_dtype != "float32":
            raise LookupcInputError(
                f"{what} needs float32 tables, but LookupFFN {name or '<root>'!r} stores "
                f"{m.config.table_dtype} tables (inference only). Train with float32 tables "
                f"and quantise afterwards (lookupc.convert(table_dtype=...), "
                f"lookupc.table_quant.quantize_lookups, lookupc compile --table-dtype)")


@dataclass(frozen=True)
class TableQuantization:
    """What quantising one LookupFFN's tables did."""

    name: str
    dtype: str
    bytes_before: int
    bytes_after: int
    rel_error: float

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "rel_error": self.rel_error}


def _check_dtype(dtype: str) -> None:
    if dtype not in TABLE_DTYPES:
        raise LookupcInputError(f"table dtype must be one of {', '.join(TABLE_DTYPES)}, got "
                                f"{dtype!r}")


def quantize_lookups(target, dtype: str | dict) -> list[TableQuantization]:
    """Store the tables of every LookupFFN in ``target`` in ``dtype``, in place.

    Parameters
    ----------
    target : nn.Module or lookupc.ConversionResult
        A result's report rows (config, table bytes, ``table_error``) are updated too.
    dtype : str or dict
        ``"float32"`` (nothing to do), ``"bfloat16"`` or ``"int8"``; or a dict from
        LookupFFN module name to dtype (names missing from it stay as they are).

    Returns one :class:`TableQuantization` per LookupFFN that changed.
    """
    module = target.module if hasattr(target, "report") else target
    if not isinstance(module, nn.Module):
        raise LookupcInputError(f"quantize_lookups needs a module or a ConversionResult, got "
                                f"{type(target).__name__}")
    wanted = dtype if isinstance(dtype, dict) else None
    for d in (wanted.values() if wanted is not None else [dtype]):
        _check_dtype(d)
    done = []
    for name, m in module.named_modules():
        if not isinstance(m, LookupFFN):
            continue
        d = wanted.get(name, m.config.table_dtype) if wanted is not None else dtype
        if d == m.config.table_dtype:
            continue
        before = m.table_bytes()
        err = m.quantize_tables(d)
        done.append(TableQuantization(name, d, before, m.table_bytes(), err))
    report = getattr(target, "report", None)
    if report is not None and done:
        _update_report(target, done)
    return done


def _update_report(result, done: list[TableQuantization]) -> None:
    """Point each matched row at its quantised LookupFFN (config, bytes, error)."""
    by_module = {q.name: q for q in done}
    lookup_names = {id(m): n for n, m in result.module.named_modules()
                    if isinstance(m, LookupFFN)}
    rows = {row.name: row for row in result.report.matched}
    for rep in getattr(result, "replacements", []):
        name = lookup_names.get(id(rep.lookup))
        q = by_module.get(name)
        row = rows.get(rep.name)
        if q is None or row is None:
            continue
        row.config = replace(row.config, table_dtype=q.dtype)
        row.table_bytes = rep.lookup.table_bytes()
        row.table_error = q.rel_error
