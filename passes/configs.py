"""Which LookupConfig each matched FFN gets, and whether the tables fit in memory.

:func:`_check_config` validates the ``config`` argument of
:func:`~lookupc.passes.api.convert` (a :data:`ConfigSpec`), :func:`_config_for` resolves it
for one FFN (:func:`_default_config` when it names none; ``None`` leaves the FFN dense),
:func:`_cheaper_than_dense` keeps a LookupFFN only when it costs fewer FLOPs per token than
the dense FFN (trying cheaper defaults first), and :func:`_check_table_budget` refuses,
before anything is allocated, tables that exceed the budget (default: half of
:func:`_available_bytes`).
"""

from __future__ import annotations

from typing import Callable, Mapping, Union

from lookupc.config import LookupConfig
from lookupc.errors import LookupcInputError

from .match_ffn import FFNMatch

ConfigSpec = Union[None, LookupConfig, Mapping[str, LookupConfig],
                   Callable[[FFNMatch], "LookupConfig | None"]]


def _check_config(config: ConfigSpec) -> None:
    if config is None or isinstance(config, LookupConfig) or callable(config):
        return
    if isinstance(config, Mapping):
        bad = {k: v for k, v in config.items() if v is not None and not isinstance(v, LookupConfig)}
        if bad:
            raise LookupcInputError(f"config[{next(iter(bad))!r}] must be a LookupConfig or None")
        return
    raise LookupcInputError("config must be None, a LookupConfig, a dict name -> LookupConfig "
                            f"or a callable match -> LookupConfig, got {type(config).__name__}")


def _default_config(match: FFNMatch, init: str) -> LookupConfig:
    """Per-FFN default: ``LookupConfig.for_distill`` when distilling a trained FFN, else
    ``for_ffn`` (the paper's sizes, for training from scratch)."""
    make = LookupConfig.for_distill if init == "distill" else LookupConfig.for_ffn
    return make(match.d_in, match.d_hidden, match.d_out)


def _config_for(config: ConfigSpec, match: FFNMatch, init: str = "random") -> LookupConfig | None:
    """The LookupConfig for ``match``; ``None`` means "leave this FFN dense"."""
    default = _default_config(match, init)
    if config is None:
        return default
    if isinstance(config, LookupConfig):
        cfg = config
    elif isinstance(config, Mapping):
        cfg = config.get(match.name, default)
    else:
        cfg = config(match)
    if cfg is not None and not isinstance(cfg, LookupConfig):
        raise LookupcInputError(f"config for FFN {match.name!r} must be a LookupConfig, "
                                f"got {type(cfg).__name__}")
    if cfg is not None:
        try:
            cfg.check_for(match.d_in)
        except ValueError as exc:
            raise LookupcInputError(f"config for FFN {match.name!r}: {exc}") from exc
    return cfg


def _cheaper_than_dense(m: FFNMatch, cfg: LookupConfig, try_cheaper: bool,
                        force: bool) -> tuple[LookupConfig | None, str]:
    """``(cfg, "")`` when a LookupFFN with ``cfg`` costs fewer FLOPs than the dense FFN
    (or ``force``); else a cheaper default, or ``(None, reason)``."""
    from lookupc.config import cheaper_configs, lookup_flops

    dense = m.dense_flops()
    cost = sum(lookup_flops(m.d_in, m.d_out, cfg))
    if cost < dense or force:
        return cfg, ""
    if try_cheaper:
        for cand in cheaper_configs(cfg):
            if sum(lookup_flops(m.d_in, m.d_out, cand)) < dense:
                return cand, ""
    return None, (f"a LookupFFN ({cfg.tables}x{cfg.bits} / {cfg.block_size}) would cost "
                  f"{cost:,} FLOPs/token, the dense FFN {dense:,}"
                  + ("; no cheaper configuration either" if try_cheaper else "")
                  + " (force=True / --force-replace replaces it anyway)")


def _available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil: assume plenty rather than refuse
        return 1 << 62


def _check_table_budget(matches, configs, max_table_bytes: int | None) -> None:
    """Refuse before allocating when the tables of all LookupFFNs exceed the budget."""
    from lookupc.config import table_bytes

    budget = max_table_bytes if max_table_bytes is not None else _available_bytes() // 2
    need = sum(table_bytes(m.d_out, configs[m.name]) for m in matches)
    if need > budget:
        worst = max(matches, key=lambda m: table_bytes(m.d_out, configs[m.name]))
        c = configs[worst.name]
        raise LookupcInputError(
            f"the LookupFFN tables would take {need / 2**20:,.0f} MiB, over the budget of "
            f"{budget / 2**20:,.0f} MiB (largest: {worst.name}, {c.tables} tables x 2**{c.bits} "
            f"rows x {worst.d_out} = {table_bytes(worst.d_out, c) / 2**20:,.0f} MiB); use fewer "
            f"bits or tables, or raise the budget (max_table_bytes / --max-table-mib)")
