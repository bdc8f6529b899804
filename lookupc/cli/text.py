"""``lookupc run DIR --text ...``: sentences in, embeddings out (:mod:`lookupc.artifact.text_io`).

The command line's side of text: :func:`read_texts` gathers ``--text`` values and
``--text-file`` sentences, :func:`output_format` picks the embeddings file format from
``--format`` and the ``--out`` suffix (:data:`FORMATS`), :func:`write_embeddings` writes
them (``.safetensors``, ``.npy`` or JSON Lines), and :func:`run_text` encodes with a loaded
artifact and prints a summary; tokenising, pooling and ``encode`` stay in the library.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import click

from ..errors import LookupcInputError

__all__ = ["text_request", "run_text", "read_texts", "FORMATS", "output_format",
           "write_embeddings"]


def text_request(texts: tuple, text_file: str | None, out: str | None,
                 fmt: str | None) -> tuple[list[str], str | None]:
    """The sentences and the output format, checked before the artifact loads."""
    if out and out.endswith(".pt"):
        raise LookupcInputError(f"--out {out}: embeddings are written as .safetensors, .npy or "
                                f".jsonl (not .pt)")
    fmt = output_format(out, fmt)
    return read_texts(texts, text_file), fmt


def run_text(model, sentences: list[str], batch_size: int, out: str | None, fmt: str | None,
             normalize: bool | None, check: bool, artifact: str) -> None:
    """Encode ``sentences`` with a loaded artifact, print a summary, write ``out``/``fmt``."""
    from ..artifact.text_io import TextTruncatedWarning

    model.tokenizer  # noqa: B018 -- loaded (or refused) before the timed pass
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TextTruncatedWarning)
        t0 = time.perf_counter()
        emb = model.encode(sentences, batch_size=batch_size, normalize=normalize)
        seconds = time.perf_counter() - t0
    for w in caught:
        if issubclass(w.category, TextTruncatedWarning):
            click.echo(f"warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    spec = model.manifest["embedding"]
    norm = spec["normalize"] if normalize is None else normalize
    to_stdout = fmt == "jsonl" and out is None
    echo = (lambda s: click.echo(s, err=True)) if to_stdout else click.echo
    echo(f"texts   {len(sentences)} sentence(s), batches of {batch_size}, at most "
         f"{_max_length(model)} tokens each")
    echo(f"output  embeddings: {tuple(emb.shape)} float32, {'+'.join(spec['pooling'])} pooling"
         f"{', L2-normalised' if norm else ''}")
    echo(f"time    {seconds * 1e3:.2f} ms for tokenising, running and pooling, first pass "
         f"({len(sentences) / seconds:.1f} sentences/s, {model.manifest['schedule']} kernels)")
    if fmt:
        write_embeddings(out, fmt, sentences, emb, echo=click.echo)
        if out:
            click.echo(f"wrote {out}", err=True)
    if check:
        from ..artifact.output_check import compare_outputs, rest_dtype_note

        what = ("artifact vs the same program on the PyTorch reference ops (embeddings)"
                + rest_dtype_note(model.rest_dtype))
        with warnings.catch_warnings(), model.float32_rest():  # the kernels are checked
            warnings.simplefilter("ignore", TextTruncatedWarning)  # said once above
            if model.rest_dtype != "float32":
                emb = model.encode(sentences, batch_size=batch_size, normalize=normalize)
            ref = model.encode(sentences, batch_size=batch_size, normalize=normalize,
                               schedule="reference")
        import torch

        outcome = compare_outputs([torch.from_numpy(emb)], [torch.from_numpy(ref)])
        echo(outcome.line(what))
        outcome.raise_if_failed(what, f"; the kernels in {artifact} compute wrong outputs on "
                                      f"this machine")


def _max_length(model) -> int:
    from ..artifact.text_io import EmbeddingSpec, _limits

    spec = EmbeddingSpec.from_dict(model.manifest["embedding"])
    return _limits(model.manifest, spec, model.tokenizer)[0]


# --- the command line: texts in, files out ----------------------------------------------------

def read_texts(texts: tuple | list, text_file: str | None) -> list[str]:
    """``--text`` values then the sentences of ``--text-file`` (.txt lines or .jsonl ``text``)."""
    from ..distill.calibration_text import read_sentences

    out = []
    for i, t in enumerate(texts or (), 1):
        if not t.strip():
            raise LookupcInputError(f"--text number {i} is empty")
        out.append(t)
    if text_file:
        out += [s for _, s in read_sentences(text_file, what="--text-file")]
    if not out:
        raise LookupcInputError("no texts given (--text is empty)")
    return out


FORMATS = {".safetensors": "safetensors", ".npy": "npy", ".jsonl": "jsonl"}


def output_format(path: str | None, fmt: str | None) -> str | None:
    """The embeddings file format from ``--format`` and the file's suffix."""
    suffix = Path(path).suffix.lower() if path else ""
    by_suffix = FORMATS.get(suffix)
    if path and fmt is None and by_suffix is None:
        raise LookupcInputError(f"--out {path}: unknown suffix {suffix!r} for embeddings (use "
                                f".safetensors, .npy or .jsonl, or --format)")
    if fmt and by_suffix and fmt != by_suffix:
        raise LookupcInputError(f"--format {fmt} does not match --out {path}")
    return fmt or by_suffix


def write_embeddings(path: str | None, fmt: str, texts: list[str], emb, echo=print) -> None:
    """Write ``emb`` (numpy ``[n, dim]``) as ``.safetensors`` (key ``embeddings``), ``.npy``
    or JSON Lines (``{"text": ..., "embedding": [...]}`` per line; stdout without ``path``)."""
    import numpy as np

    if fmt == "jsonl":
        lines = (json.dumps({"text": t, "embedding": [float(x) for x in e]}) + "\n"
                 for t, e in zip(texts, emb))
        if path is None:
            for line in lines:
                echo(line.rstrip("\n"))
            return
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)
    elif fmt == "npy":
        np.save(path, np.ascontiguousarray(emb, dtype=np.float32), allow_pickle=False)
    elif fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file({"embeddings": np.ascontiguousarray(emb, dtype=np.float32)}, str(path))
    else:
        raise LookupcInputError(f"unknown embeddings format {fmt!r}")
