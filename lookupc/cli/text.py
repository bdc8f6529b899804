"""``lookupc run DIR --text ...``: sentences in, embeddings out (:mod:`lookupc.artifact.text_io`)."""

from __future__ import annotations

import time
import warnings

import click

from ..errors import LookupcInputError

__all__ = ["text_request", "run_text"]


def text_request(texts: tuple, text_file: str | None, out: str | None,
                 fmt: str | None) -> tuple[list[str], str | None]:
    """The sentences and the output format, checked before the artifact loads."""
    from ..artifact.text_io import output_format, read_texts

    if out and out.endswith(".pt"):
        raise LookupcInputError(f"--out {out}: embeddings are written as .safetensors, .npy or "
                                f".jsonl (not .pt)")
    fmt = output_format(out, fmt)
    return read_texts(texts, text_file), fmt


def run_text(model, sentences: list[str], batch_size: int, out: str | None, fmt: str | None,
             normalize: bool | None, check: bool, artifact: str) -> None:
    """Encode ``sentences`` with a loaded artifact, print a summary, write ``out``/``fmt``."""
    from ..artifact.text_io import TextTruncatedWarning, write_embeddings

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
        from ..artifact.output_check import compare_outputs

        what = "artifact vs the same program on the PyTorch reference ops (embeddings)"
        with warnings.catch_warnings(), model.float32_rest():  # the kernels are checked
            warnings.simplefilter("ignore", TextTruncatedWarning)  # said once above
            if model.rest_dtype != "float32":
                what += f" (rest layers in float32 for the check; they run in {model.rest_dtype})"
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
