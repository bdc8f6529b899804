"""Public frontend API: :func:`find_ffns`, :func:`convert`, :class:`ConversionResult`.

``convert`` runs, on a deep copy of the model: analysis (``torch.export``, see
:mod:`lookupc.passes.match_ffn`), :class:`~lookupc.passes.rewrite_modules.SwapFFNModules`,
:class:`~lookupc.passes.rewrite_functional.RewriteFunctionalFFNs`, then checks the
rewrite end to end (each LookupFFN slot temporarily holds the dense original, and
the model's outputs must equal the original model's), and optionally distills.
The config choice and table budget are in :mod:`lookupc.passes.configs`, the end-to-end
check in :mod:`lookupc.passes.verify`.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch  # noqa: F401 - the docstring examples use it
from torch import nn

from lookupc.config import LookupConfig
from lookupc.errors import LookupcError, LookupcInputError
from lookupc.module import LookupFFN

from .configs import (
    ConfigSpec,
    _cheaper_than_dense,
    _check_config,
    _check_table_budget,
    _config_for,
    _default_config,
)
from .infra import run_passes
from .match_ffn import FFNMatch, FFNMatches, Skipped, analyze, normalize_inputs
from .replacement import Replacement
from .report import ConversionReport, MatchedFFN
from .rewrite_functional import RewriteFunctionalFFNs
from .rewrite_modules import SwapFFNModules
from .verify import _eval_mode, verify_rewrite

__all__ = ["find_ffns", "convert", "ConversionResult", "Replacement", "FFNMatch"]

_INITS = ("random", "distill")


@dataclass
class ConversionResult:
    """Output of :func:`convert`.

    ``module`` is the converted model (the input is never modified), ``report`` what
    happened, ``replacements`` one :class:`Replacement` per ``report.matched`` entry
    (same order) with the LookupFFN inside ``module`` and an eval-mode dense copy.
    """

    module: nn.Module
    report: ConversionReport
    replacements: list[Replacement] = field(default_factory=list)


def find_ffns(model: nn.Module, example_inputs: Any) -> FFNMatches:
    """Find every Linear -> GELU -> Linear in ``model`` (the model is not changed).

    Parameters
    ----------
    model : nn.Module
    example_inputs : tuple, dict or Tensor
        Positional arguments (tuple), keyword arguments (dict, e.g. ``input_ids``,
        ``attention_mask``) or a single tensor.

    Returns
    -------
    FFNMatches
        A list of :class:`FFNMatch` (``.name``, ``.d_in``, ``.d_hidden``, ``.d_out``,
        ``.activation`` in ``{'gelu', 'gelu_tanh'}``); ``.skipped`` lists the
        FFN-like chains that were not matched as ``(location, reason)``.

    Examples
    --------
    >>> m = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    >>> [(f.name, f.d_hidden, f.activation) for f in find_ffns(m, (torch.randn(2, 8),))]
    [('0', 32, 'gelu')]
    """
    analysis = analyze(model, example_inputs)
    return FFNMatches(analysis.matches, analysis.skipped)


def _make_lookup(module: nn.Module, match: FFNMatch, cfg: LookupConfig) -> LookupFFN:
    w = module.get_parameter(match.fc1_weight)
    return LookupFFN(match.d_in, match.d_out, cfg).to(device=w.device, dtype=w.dtype)


def _run_rewrites(model: nn.Module, matches: list[FFNMatch], lookups: dict[str, LookupFFN],
                  ) -> tuple[nn.Module, list[Replacement], list[Skipped]]:
    leaves = {p for m in matches for p, w in ((m.fc1, m.fc1_weight), (m.fc2, m.fc2_weight))
              if p != w}
    swap = SwapFFNModules(matches, lookups)
    functional = RewriteFunctionalFFNs(matches, lookups, leaves)
    result = run_passes([swap, functional], copy.deepcopy(model))
    return result.module, swap.replacements + functional.replacements, functional.skipped


def _distill_fn() -> Callable:
    """``lookupc.distill.layer.distill_conversion``, or a clear error if it is not available."""
    try:
        return importlib.import_module("lookupc.distill.layer").distill_conversion
    except (ImportError, AttributeError) as exc:
        raise LookupcError("init='distill' needs lookupc.distill.layer.distill_conversion, which is "
                           f"not available: {exc}") from exc


def convert(model: nn.Module, example_inputs: Any, config: ConfigSpec = None,
            init: str = "random", calibration: Any = None,
            distill_options: dict | None = None, *, force: bool = False,
            max_table_bytes: int | None = None,
            min_fidelity: float | None = None, tokenizer: Any = None,
            table_dtype: str | None = None) -> ConversionResult:
    """Replace every Linear -> GELU -> Linear of ``model`` with a LookupFFN.

    Parameters
    ----------
    model : nn.Module
        Not modified; the result holds a converted deep copy.
    example_inputs : tuple, dict or Tensor
        As for :func:`find_ffns`. For a ``SentenceTransformer`` ``model``: sentences
        (default two short ones) or its transformer's inputs (:mod:`lookupc.artifact.st_format`).
    config : LookupConfig, dict, callable or None
        None: sized from each FFN (``LookupConfig.for_distill`` with ``init='distill'``,
        else ``LookupConfig.for_ffn``); one LookupConfig for all;
        a dict ``name -> LookupConfig`` (missing names get the default, ``None``
        leaves that FFN dense); or a callable ``match -> LookupConfig | None``.
    init : {'random', 'distill'}
        'random' keeps the LookupFFN's random init; 'distill' fits each LookupFFN
        to the dense FFN it replaces on ``calibration`` (see ``lookupc.distill.layer``).
    calibration : optional
        Calibration inputs for ``init='distill'``: example inputs, or text (a list of
        sentences, a ``.txt``/``.jsonl`` path) tokenised with ``tokenizer``.
    distill_options : dict, optional
        Keyword arguments of ``lookupc.distill.layer.distill_conversion``.
    force : bool
        Replace an FFN even when its LookupFFN would cost more FLOPs per token than the
        dense FFN. Without it such an FFN stays dense, with the reason in
        ``report.skipped``; with the default (per-FFN) configuration, cheaper ones (fewer
        bits, then fewer tables: ``lookupc.config.cheaper_configs``) are tried first.
    max_table_bytes : int, optional
        Budget for the tables of all LookupFFNs together, checked before anything is
        allocated (default: half of the memory available now).
    min_fidelity : float, optional
        Refuse (``LookupcError``) when the pooled-output cosine with the original model on
        the example inputs (``report.fidelity``, :mod:`lookupc.fidelity`) is below it.
    tokenizer : optional
        Hugging Face tokenizer for text calibration (default: the one saved in the
        model's directory, when there is one).
    table_dtype : {'float32', 'bfloat16', 'int8'}, optional
        Store every LookupFFN's tables in this dtype (overrides the configs'
        ``table_dtype``). Tables are trained/distilled in float32 and quantised at the
        end (:mod:`lookupc.table_quant`); ``report`` shows bytes and error per layer.

    Returns
    -------
    ConversionResult
        ``.module``, ``.report`` and ``.replacements``. For a ``SentenceTransformer``,
        ``.module`` is a converted copy of it (its ``encode`` runs the LookupFFNs, with the
        original pooling and normalisation) and ``.embedding`` describes that pooling.

    Examples
    --------
    >>> m = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(),
    ...                         torch.nn.Linear(2048, 512))
    >>> r = convert(m, (torch.randn(2, 512),))
    >>> r.report.flops_before, r.report.flops_after   # the paper's 512 -> 2048 -> 512
    (4196864, 700928)
    >>> type(r.module[0]).__name__, type(r.module[2]).__name__
    ('LookupFFN', 'Identity')
    """
    params = dict(locals())  # every argument, as given
    from lookupc.artifact.st_format import convert_sentence_transformer, is_sentence_transformer

    if is_sentence_transformer(model):  # its transformer is converted; pooling etc. kept
        return convert_sentence_transformer(convert, params.pop("model"),
                                            params.pop("example_inputs"), **params)
    if init not in _INITS:
        raise LookupcInputError(f"init must be one of {_INITS}, got {init!r}")
    if init == "distill" and calibration is None:
        raise LookupcInputError("init='distill' needs calibration data (calibration=None)")
    _check_config(config)
    if table_dtype is not None:
        LookupConfig(table_dtype=table_dtype)  # validates the name before any work
    distill = _distill_fn() if init == "distill" else None  # fail before the work
    analysis = analyze(model, example_inputs)
    skipped = list(analysis.skipped)
    if isinstance(config, Mapping):
        unknown = set(config) - {m.name for m in analysis.matches}
        if unknown:
            raise LookupcInputError(f"config names FFNs that were not found: {sorted(unknown)}; "
                                    f"found: {[m.name for m in analysis.matches]}")
    matches, configs = [], {}
    for m in analysis.matches:
        cfg = _config_for(config, m, init)
        if cfg is None:
            skipped.append(Skipped(m.name, "left dense by the config"))
            continue
        default = _default_config(m, init)
        cfg, why = _cheaper_than_dense(m, cfg, try_cheaper=cfg == default, force=force)
        if cfg is None:
            skipped.append(Skipped(m.name, why))
            continue
        matches.append(m)
        configs[m.name] = cfg
    # tables are built (and distilled) in float32 and quantised at the end
    stored = {n: table_dtype or c.table_dtype for n, c in configs.items()}
    configs = {n: replace(c, table_dtype="float32") for n, c in configs.items()}
    _check_table_budget(matches, configs, max_table_bytes)
    lookups = {m.name: _make_lookup(model, m, configs[m.name]) for m in matches}
    module, replacements, rewrite_skipped = _run_rewrites(model, matches, lookups)
    skipped += rewrite_skipped
    verify_rewrite(model, module, replacements, example_inputs)
    by_name = {m.name: m for m in matches}
    order = {m.name: i for i, m in enumerate(matches)}
    replacements.sort(key=lambda r: order[r.name])
    report = ConversionReport(
        [_matched(by_name[r.name], r.lookup) for r in replacements], skipped)
    result = ConversionResult(module, report, replacements)
    if distill is not None:
        extra = {} if tokenizer is None else {"tokenizer": tokenizer}
        distill(result, model, calibration, **extra, **(distill_options or {}))
    if any(d != "float32" for d in stored.values()):
        from lookupc.table_quant import quantize_lookups

        lookup_names = {id(m): n for n, m in module.named_modules()}
        quantize_lookups(result, {lookup_names[id(r.lookup)]: stored[r.name]
                                  for r in replacements if id(r.lookup) in lookup_names})
    if replacements:
        _measure_fidelity(result, model, example_inputs, init, min_fidelity)
    return result


def _measure_fidelity(result, model, example_inputs, init: str,
                      min_fidelity: float | None) -> None:
    from lookupc import fidelity

    args, kwargs = normalize_inputs(example_inputs)
    try:
        with _eval_mode(model, result.module):
            f = fidelity.measure(model, result.module, args, kwargs)
    except Exception as err:  # noqa: BLE001 - a model with keyword-only inputs, say
        f = {"inputs": "example inputs", "rel_error": None, "cosine_mean": None,
             "cosine_min": None, "error": f"{type(err).__name__}: {err}"[:200]}
    result.report.fidelity = f
    fidelity.warn_if_random_init_lost_quality(f, init)
    if min_fidelity is not None:
        cos = f.get("cosine_mean")
        if cos is None or cos < min_fidelity:
            got = "could not be measured" if cos is None else f"is {cos:.4f}"
            raise LookupcError(f"fidelity check failed: the pooled-output cosine with the "
                               f"original model on the example inputs {got}, below "
                               f"min_fidelity={min_fidelity} (init={init!r}"
                               + ("; init='distill' / --init distill recovers quality)"
                                  if init == "random" else ")"))


def _matched(m: FFNMatch, lookup: LookupFFN) -> MatchedFFN:
    return MatchedFFN(m.name, m.d_in, m.d_hidden, m.d_out, m.activation, m.form,
                      lookup.config, m.calls * m.dense_flops(),
                      m.calls * lookup.flops_per_token(), lookup.table_bytes(), calls=m.calls)
