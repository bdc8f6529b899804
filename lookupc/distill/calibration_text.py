"""Calibration text: the user's sentences (a file) or the stdlib docstrings, tokenised.

Distilling a pretrained encoder needs real text in the model's own tokenisation.
:func:`read_sentences` reads a file with one sentence per line (``.txt``) or JSON Lines
with a ``text`` field (``.jsonl``); :func:`tokenize` turns sentences into batches of
model inputs (``input_ids``, ``attention_mask``...), similar lengths together so that
little is padding; :func:`text_items` does both for ``convert``'s ``calibration``.
Every problem names the file and line: an empty file, a JSONL line without ``text``, a
sentence that tokenises to nothing but special tokens.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

from ..errors import LookupcInputError

__all__ = ["TEXT_SUFFIXES", "is_text_file", "read_sentences", "tokenize", "tokenizer_for",
           "default_sentences", "text_items"]

TEXT_SUFFIXES = (".txt", ".jsonl")


def is_text_file(path: str) -> bool:
    return str(path).lower().endswith(TEXT_SUFFIXES)


def read_sentences(path: str, what: str = "calibration file") -> list[tuple[int, str]]:
    """``(line number, sentence)`` pairs of a ``.txt`` or ``.jsonl`` file (blank lines skipped).

    ``what`` names the file in error messages (``--text-file`` for ``lookupc run``)."""
    if not os.path.isfile(path):
        raise LookupcInputError(f"{what} {path}: no such file")
    jsonl = str(path).lower().endswith(".jsonl")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text = _jsonl_text(path, number, line) if jsonl else line.strip()
                out.append((number, text))
    except UnicodeDecodeError as exc:
        raise LookupcInputError(f"{what} {path} is not UTF-8 text ({exc.reason} at "
                                f"byte {exc.start})") from None
    if not out:
        raise LookupcInputError(f"{what} {path} has no sentences (it is empty or blank)")
    return out


def _jsonl_text(path: str, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LookupcInputError(f"{path}:{number}: not a JSON object ({exc.msg})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise LookupcInputError(f"{path}:{number}: a JSONL line needs a non-empty string "
                                f"field \"text\"")
    return text.strip()


def default_sentences(n: int | None = None) -> list[tuple[int, str]]:
    """The stdlib docstring sentences (all by default), numbered from 1."""
    from ..textdata import docstring_sentences

    return list(enumerate(docstring_sentences(n), 1))


def tokenizer_for(model: Any, path: str | None = None):
    """The Hugging Face tokenizer stored next to ``model`` (its directory), or None."""
    where = path or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not where or not os.path.isdir(str(where)):
        return None
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    if not any(os.path.exists(os.path.join(where, n)) for n in names):
        return None
    from ..extras import require

    transformers = require("transformers", "tokenising calibration text")
    return transformers.AutoTokenizer.from_pretrained(str(where), local_files_only=True)


def tokenize(tokenizer: Any, sentences: list[tuple[int, str]] | list[str], *, batch: int = 32,
             max_length: int = 128, source: str = "calibration text",
             accepted: set | None = None) -> list[dict]:
    """Batches of model inputs (dicts of tensors) for ``sentences``, similar lengths together.

    ``accepted``: the model's forward parameters; input names it does not take (e.g.
    ``token_type_ids``) are dropped.
    """
    if tokenizer is None:
        raise LookupcInputError(f"{source}: text calibration needs the model's tokenizer (a "
                                f"Hugging Face model directory with its tokenizer files)")
    numbered = [(i + 1, s) if isinstance(s, str) else s for i, s in enumerate(sentences)]
    if not numbered:
        raise LookupcInputError(f"{source}: no sentences")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    lengths = []
    for number, text in numbered:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if not [t for t in ids if t not in special]:
            where = f"{source}:{number}" if source.endswith((".txt", ".jsonl")) else \
                f"{source}, sentence {number}"
            raise LookupcInputError(f"{where}: {text[:60]!r} tokenises to nothing but special "
                                    f"tokens")
        lengths.append(len(ids))
    order = sorted(range(len(numbered)), key=lambda i: (lengths[i], i))
    out = []
    for i in range(0, len(order), batch):
        texts = [numbered[j][1] for j in order[i:i + batch]]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({k: v for k, v in enc.items() if accepted is None or k in accepted})
    return out


def text_items(calibration: Any, model: Any, tokenizer: Any) -> Any:
    """Calibration given as text (a .txt/.jsonl path or a list of sentences) -> model inputs,
    tokenised with ``tokenizer`` or the one stored with the model; anything else as is."""
    if isinstance(calibration, (str, os.PathLike)):
        if not is_text_file(str(calibration)):
            raise LookupcInputError(f"calibration {calibration}: a file path must end in "
                                    f"{' or '.join(TEXT_SUFFIXES)} (text for the tokenizer)")
        source = str(calibration)
        sentences = read_sentences(source)
    elif isinstance(calibration, (list, tuple)) and calibration and all(
            isinstance(s, str) for s in calibration):
        source, sentences = "calibration sentences", list(calibration)
    else:
        return calibration
    tok = tokenizer if tokenizer is not None else tokenizer_for(model)
    accepted = set(inspect.signature(model.forward).parameters)
    return tokenize(tok, sentences, source=source, accepted=accepted)
