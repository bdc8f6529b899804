"""sentence-transformers models in and out: pooling and normalisation survive conversion.

A sentence-transformers model directory is a Hugging Face model (the ``Transformer``
module, usually at the top of the directory) plus ``modules.json``, which lists the
modules applied after it: ``1_Pooling/config.json`` (mean, cls or max pooling) and
optionally ``2_Normalize`` (L2 normalisation). lookupc reads these files itself
(:func:`read_st_dir`; sentence-transformers is not needed for it), converts the
Transformer's FFNs, and records the pooling in the artifact manifest
(:class:`lookupc.artifact.text_io.EmbeddingSpec`); other module types (``Dense``, ``Router``...)
are refused with their names.

:func:`lookupc.artifact.st_export.write_st_dir` writes a converted model back in that layout, with the converted
transformer as a ``torch.export`` program (``model.pt2``, lookupc ops inside) in place of
the Hugging Face weights, plus ``lookupc.json``; lookupc loads such a directory back as a
MODEL (``lookupc compile DIR``, ``lookupc convert DIR``). The sentence-transformers
package cannot load it (its Transformer module needs Hugging Face weights).

A :class:`sentence_transformers.SentenceTransformer` object given to
:func:`lookupc.convert` is converted by :func:`convert_sentence_transformer`: the result's
``module`` is a copy of the SentenceTransformer whose transformer holds the LookupFFNs,
so its own ``encode`` runs the converted model (with its pooling and normalisation);
:func:`lookupc.artifact.st_export.save` writes it as a directory for ``lookupc compile``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import LookupcInputError
from .text_io import EmbeddingSpec

__all__ = ["MODULES", "LOOKUPC_JSON", "PROGRAM", "is_st_dir", "read_st_dir",
           "pooling_from_config", "is_sentence_transformer", "parts", "spec_of_object",
           "convert_sentence_transformer", "token_inputs"]

MODULES = "modules.json"
LOOKUPC_JSON = "lookupc.json"  # marks a directory written by lookupc (converted program inside)
PROGRAM = "model.pt2"
ST_SOURCE = "sentence-transformers Pooling/Normalize"


def is_st_dir(path: str | os.PathLike) -> bool:
    return Path(path, MODULES).is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LookupcInputError(f"{path}: not readable JSON ({' '.join(str(err).split())[:120]})"
                                ) from None


def pooling_from_config(cfg: dict, where: str = "pooling config") -> tuple[str, ...]:
    """Pooling modes of a sentence-transformers ``Pooling`` config (the ``pooling_mode`` key of
    sentence-transformers 6, or the older ``pooling_mode_*`` booleans; default mean)."""
    legacy = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
              "pooling_mode_mean_tokens": "mean",
              "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
              "pooling_mode_weightedmean_tokens": "weightedmean",
              "pooling_mode_lasttoken": "lasttoken"}
    if "pooling_mode" in cfg:
        mode = cfg["pooling_mode"]
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    else:
        modes = tuple(m for k, m in legacy.items() if cfg.get(k)) or ("mean",)
    bad = [m for m in modes if m not in ("cls", "max", "mean")]
    if bad:
        raise LookupcInputError(f"{where}: pooling mode {', '.join(bad)} is not supported "
                                f"(lookupc pools with mean, cls or max)")
    return modes


def read_st_dir(path: str | os.PathLike) -> dict:
    """What lookupc needs from a sentence-transformers directory.

    Returns ``{"transformer_dir": Path, "embedding": dict (EmbeddingSpec), "lookupc": dict
    or None}``; ``lookupc`` is ``lookupc.json`` when lookupc wrote the directory.
    """
    root = Path(path)
    modules = _read_json(root / MODULES)
    if not isinstance(modules, list) or not modules:
        raise LookupcInputError(f"{root / MODULES}: expected a list of modules")
    transformer = pooling = None
    normalize = False
    for m in modules:
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        where = root / m.get("path", "")
        if kind in ("Transformer", "LookupTransformer") and transformer is None:
            transformer = where
        elif kind == "Pooling" and pooling is None:
            pooling = pooling_from_config(_read_json(where / "config.json")
                                          if (where / "config.json").is_file() else {},
                                          str(where / "config.json"))
        elif kind == "Normalize":
            cfg = _read_json(where / "config.json") if (where / "config.json").is_file() else {}
            if cfg.get("module_input_name", "sentence_embedding") != "sentence_embedding":
                raise LookupcInputError(f"{where}: a Normalize of "
                                        f"{cfg['module_input_name']!r} is not supported")
            normalize = True
        else:
            raise LookupcInputError(
                f"{root / MODULES}: module {m.get('name', '?')} ({m.get('type')}) is not "
                f"supported; lookupc keeps Transformer, Pooling and Normalize")
    if transformer is None:
        raise LookupcInputError(f"{root / MODULES}: no Transformer module")
    if pooling is None:
        raise LookupcInputError(f"{root / MODULES}: no Pooling module (lookupc needs one to "
                                f"make sentence embeddings)")
    spec = EmbeddingSpec(pooling, normalize, _max_seq_length(transformer, root), ST_SOURCE)
    marker = transformer / LOOKUPC_JSON
    return {"transformer_dir": transformer, "embedding": spec.to_dict(),
            "lookupc": _read_json(marker) if marker.is_file() else None}


def _max_seq_length(transformer: Path, root: Path) -> int | None:
    """sentence_bert_config.json's max_seq_length, else the tokenizer's model_max_length
    (sentence-transformers 6 keeps it there), capped by max_position_embeddings."""
    found = None
    for d in (transformer, root):
        f = d / "sentence_bert_config.json"
        if f.is_file() and isinstance(_read_json(f).get("max_seq_length"), int):
            found = _read_json(f)["max_seq_length"]
            break
    if found is None and (transformer / "tokenizer_config.json").is_file():
        n = _read_json(transformer / "tokenizer_config.json").get("model_max_length")
        found = n if isinstance(n, int) and n < 1 << 20 else None
    config = transformer / "config.json"
    positions = _read_json(config).get("max_position_embeddings") if config.is_file() else None
    limits = [n for n in (found, positions) if isinstance(n, int) and n > 0]
    return min(limits) if limits else None


# --- SentenceTransformer objects --------------------------------------------------------------

def is_sentence_transformer(model: Any) -> bool:
    """Whether ``model`` is a ``SentenceTransformer`` (without importing the package)."""
    return any(c.__name__ == "SentenceTransformer"
               and c.__module__.startswith("sentence_transformers") for c in type(model).__mro__)


def parts(st) -> tuple[Any, Any, EmbeddingSpec]:
    """(transformer module, tokenizer, EmbeddingSpec) of a SentenceTransformer."""
    modules = list(st)
    transformer, modes, normalize = None, None, False
    for m in modules:
        kind = type(m).__name__
        if kind == "Transformer" and transformer is None:
            transformer = m
        elif kind == "Pooling" and modes is None:
            mode = m.pooling_mode
            modes = (mode,) if isinstance(mode, str) else tuple(mode)
            pooling_from_config({"pooling_mode": list(modes)}, "the SentenceTransformer")
        elif kind == "Normalize":
            normalize = True
        else:
            raise LookupcInputError(f"the SentenceTransformer's {kind} module is not supported; "
                                    f"lookupc keeps Transformer, Pooling and Normalize")
    if transformer is None or modes is None:
        raise LookupcInputError("the SentenceTransformer needs a Transformer and a Pooling "
                                "module")
    n = getattr(transformer, "max_seq_length", None)
    positions = getattr(transformer.auto_model.config, "max_position_embeddings", None)
    limits = [x for x in (n, positions) if isinstance(x, int) and x > 0]
    spec = EmbeddingSpec(modes, normalize, min(limits) if limits else None, ST_SOURCE)
    return transformer, transformer.tokenizer, spec


def spec_of_object(st) -> EmbeddingSpec:
    """The pooling and normalisation of a SentenceTransformer object."""
    return parts(st)[2]


def token_inputs(tokenizer, sentences: list[str], max_length: int | None) -> tuple:
    enc = tokenizer(sentences, padding=True, truncation=True, max_length=max_length or 128,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def convert_sentence_transformer(convert, st, example_inputs: Any = None, **kwargs):
    """:func:`lookupc.convert` (given as ``convert``) for a SentenceTransformer ``st``.

    ``example_inputs``: sentences (a list of strings; default two short ones), or inputs
    of the Hugging Face model (``(input_ids, attention_mask)`` or a dict). Text calibration
    uses the SentenceTransformer's tokenizer unless ``tokenizer=`` is given. The result's
    ``module`` is a SentenceTransformer; ``result.embedding`` its EmbeddingSpec and
    ``result.example_inputs`` the model inputs used.
    """
    import copy

    transformer, tokenizer, spec = parts(st)
    if example_inputs is None:
        example_inputs = ["A sentence to trace the model with.", "Another one."]
    if isinstance(example_inputs, str):
        example_inputs = [example_inputs]
    if isinstance(example_inputs, list) and all(isinstance(s, str) for s in example_inputs):
        if tokenizer is None:
            raise LookupcInputError("the SentenceTransformer has no tokenizer to make example "
                                    "inputs from sentences; give token inputs")
        example_inputs = token_inputs(tokenizer, example_inputs, spec.max_length)
    if kwargs.get("tokenizer") is None:
        kwargs["tokenizer"] = tokenizer
    hf = transformer.auto_model
    was_training = st.training
    st.eval()
    try:
        result = convert(hf, example_inputs, **kwargs)
    finally:
        st.train(was_training)
    module = copy.deepcopy(st, memo={id(hf): result.module})
    result.module = module.eval()
    result.embedding = spec
    result.example_inputs = example_inputs
    return result
