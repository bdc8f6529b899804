"""``lookupc run``: load an artifact directory (verifying it and its signature) and run it.

On token inputs (``--input``, default the compiled example inputs) it prints the shapes
and statistics of the outputs and the time of a few runs (:func:`lookupc.perf.time_calls`);
on text (``--text``/``--text-file``) it gives sentence embeddings (:mod:`.text`). With
``--check`` the outputs are compared with the same program on the PyTorch reference ops.
"""

from __future__ import annotations

import click

from ..config import REST_DTYPES
from .common import step, usage
from .options import CONTEXT

__all__ = ["run"]


@click.command(context_settings=CONTEXT)
@click.argument("artifact", type=click.Path())
@click.option("--input", "input_path", type=click.Path(dir_okay=False), default=None,
              help="Inputs (.pt tensors, .safetensors, .npy/.npz); default: the artifact's "
                   "example inputs.")
@click.option("-o", "--output", "--out", "output", type=click.Path(dir_okay=False), default=None,
              help="Write the outputs (.safetensors or .pt); with --text the embeddings "
                   "(.safetensors key 'embeddings', .npy, or .jsonl).")
@click.option("--text", "texts", multiple=True,
              help="A sentence to embed with the artifact's tokenizer (repeatable).")
@click.option("--text-file", type=click.Path(dir_okay=False), default=None,
              help="Sentences to embed: .txt (one per line) or .jsonl with a 'text' field.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Sentences per run of the artifact (with --text/--text-file).")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "npy", "safetensors"]),
              default=None, help="Embeddings file format (default: from --out's suffix); "
                                 "jsonl without --out prints one JSON object per line.")
@click.option("--normalize/--no-normalize", default=None,
              help="L2-normalise the embeddings (default: as the source model did).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare with the same program on the PyTorch reference ops.")
@click.option("--repeat", type=click.IntRange(min=0), default=3, show_default=True,
              help="Timed runs after one warm-up (0: run once, untimed).")
@click.option("--ignore-versions", is_flag=True,
              help="Run even if lookupc/torch/TVM versions differ from the build's.")
@click.option("--trusted-key", "trusted_key", multiple=True, type=click.Path(dir_okay=False),
              help="Public key (lookupc keygen's .pub) whose signature lets the artifact's "
                   "kernels.so load (repeatable; also every *.pub in $LOOKUPC_TRUSTED_KEYS).")
@click.option("--trust-artifact", is_flag=True,
              help="Load the artifact's kernels.so (native code) even if it is not signed by "
                   "a trusted key.")
@click.option("--rest-dtype", type=click.Choice(REST_DTYPES), default=None,
              help="Run the remaining linear layers in this precision (default: what "
                   "'lookupc compile --rest-dtype' recorded).")
@click.option("--rebuild-kernels", is_flag=True,
              help="Never load kernels.so: rebuild the kernels here (the default for "
                   "artifacts not signed by a trusted key).")
def run(artifact, input_path, output, texts, text_file, batch_size, fmt, normalize, check,
        repeat, ignore_versions, trusted_key, trust_artifact, rest_dtype, rebuild_kernels):
    """Load an ARTIFACT directory (verifying it) and run it: on token inputs (--input, default
    the compiled example inputs), or on text (--text/--text-file) giving sentence embeddings."""
    from ..artifact.load import load
    from ..artifact.tensor_files import describe_tensor, load_inputs, save_inputs

    text_mode = bool(texts or text_file)
    if text_mode and input_path:
        raise usage("give --input or --text/--text-file, not both")
    if not text_mode and fmt:
        raise usage("--format is for the embeddings of --text/--text-file")
    if text_mode:
        from .text import run_text, text_request

        sentences, fmt = text_request(texts, text_file, output, fmt)

    with step(f"loading {artifact}"):
        model = load(artifact, check_versions=not ignore_versions, trusted_keys=trusted_key,
                     trust_artifact=trust_artifact, rebuild_kernels=rebuild_kernels,
                     rest_dtype=rest_dtype)
    click.echo(f"trust   {model.trust.describe()}; kernels: {model.kernel_source}"
               + ("" if model.kernel_source.startswith("artifact") or rebuild_kernels else
                  " (--trusted-key KEY.pub or --trust-artifact loads its kernels.so)"),
               err=True)
    if text_mode:
        return run_text(model, sentences, batch_size, output, fmt, normalize, check, artifact)
    from ..perf import time_calls

    inputs = load_inputs(input_path) if input_path else model.example_inputs
    outputs = model(*inputs)
    times = time_calls(lambda: model(*inputs), repeat)
    names = model.output_names or [f"output_{i}" for i in range(len(outputs))]
    click.echo("inputs  " + ", ".join(describe_tensor(t) for t in inputs))
    for name, t in zip(names, outputs):
        click.echo(f"output  {name}: {describe_tensor(t, stats=True)}")
    if times:
        click.echo(f"time    {min(times) * 1e3:.2f} ms (min of {len(times)}, "
                   f"{model.manifest['schedule']} kernels)")
    if output:
        save_inputs(tuple(outputs), output)
        click.echo(f"wrote {output}", err=True)
    if check:
        from ..artifact.output_check import compare_outputs, rest_dtype_note

        what = ("artifact vs the same program on the PyTorch reference ops"
                + rest_dtype_note(model.rest_dtype))
        with model.float32_rest():  # the check is of the kernels: rest layers in float32
            got = outputs if model.rest_dtype == "float32" else model(*inputs)
            outcome = compare_outputs(got, model.run(*inputs, schedule="reference"))
        click.echo(outcome.line(what))
        outcome.raise_if_failed(what, f"; the kernels in {artifact} compute wrong outputs on "
                                      f"this machine")
