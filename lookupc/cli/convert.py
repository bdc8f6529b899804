"""``lookupc convert``: replace MODEL's FFNs with LookupFFNs and write a ``torch.export``
program (.pt2) or a sentence-transformers directory.

Loading, converting and the policy flags are :mod:`.common`'s; exporting is
:func:`lookupc.artifact.export.export_program` and
:func:`lookupc.artifact.st_export.write_loaded`.
"""

from __future__ import annotations

import os

import click

from .common import convert as convert_model
from .common import helper_rank, load, print_report, step, usage
from .options import (
    CONTEXT,
    MODEL_HELP,
    convert_options,
    distill_options,
    fidelity_option,
    model_options,
    policy_options,
    size_config,
)

__all__ = ["convert"]


@click.command(context_settings=CONTEXT, epilog=MODEL_HELP)
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Where to write the torch.export program (.pt2), or the directory for "
                   "--format sentence-transformers.")
@click.option("--format", "fmt", type=click.Choice(["pt2", "sentence-transformers"]),
              default="pt2", show_default=True,
              help="sentence-transformers: a directory with modules.json, pooling, "
                   "normalisation, tokenizer and the program (lookupc compile takes it).")
@model_options
@convert_options
@policy_options
@fidelity_option
def convert(model, output, fmt, batch, seq_len, trust_pickle, tables, bits, block_size, init,
            calibration, seed, distill_option):
    """Replace MODEL's FFNs with LookupFFNs and write a torch.export program (.pt2)."""
    if fmt == "pt2" and not output.endswith(".pt2"):
        raise usage(f"-o/--output {output!r} must end in .pt2")
    options = distill_options(distill_option, init)
    helper = helper_rank()
    loaded = load(model, batch, seq_len, trust_pickle)
    result = convert_model(loaded, size_config(tables, bits, block_size, init), init,
                           calibration, seed, options)
    if helper:  # torchrun's other ranks helped distil; rank 0 reports and writes
        return
    print_report(result.report)
    from ..artifact.export import export_program, save_program

    with step("exporting"):
        program, names, flattened, dynamic = export_program(result.module, loaded.example_inputs)
        names = loaded.output_names_for(names)
        if fmt == "sentence-transformers":
            from ..artifact.st_export import write_loaded

            return click.echo(write_loaded(output, program, names, loaded))
        save_program(program, output, names)
    if flattened:
        click.echo(f"note: the model returns {loaded.outputs_kind()}; the program returns "
                   f"them flattened to a tuple ({', '.join(names)})", err=True)
    click.echo(f"wrote {output} ({os.path.getsize(output):,} bytes, "
               f"{'dynamic' if dynamic else 'static'} batch/sequence dims)")
