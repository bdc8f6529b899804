"""``lookupc compile``: convert MODEL and compile it into a deployable artifact directory
for a target (:func:`lookupc.artifact.compile.compile_artifact`), optionally signed.
"""

from __future__ import annotations

import click

from ..config import REST_DTYPES
from ..schedules.registry import schedule_names
from .common import convert, helper_rank, load, print_report, usage
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

__all__ = ["compile_"]


@click.command("compile", context_settings=CONTEXT, epilog=MODEL_HELP)
@click.argument("model")
@click.option("--target", default=None,
              help="Target, e.g. 'llvm -mcpu=znver2', 'llvm -mtriple=aarch64-linux-gnu "
                   "-mcpu=neoverse-n1' (default: this machine).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="Artifact directory to write.")
@click.option("--schedule", type=click.Choice(schedule_names(aliases=True)), default="hand",
              show_default=True, help="Kernel schedule ('tuned' reads --tuning-db).")
@click.option("--tuning-db", type=click.Path(file_okay=False), default=None,
              help="MetaSchedule database from 'lookupc tune' (for --schedule tuned).")
@click.option("--force", is_flag=True, help="Replace an existing artifact directory.")
@click.option("--rest-dtype", type=click.Choice(REST_DTYPES),
              default="float32", show_default=True,
              help="Precision of the model's remaining linear layers (attention, pooler) when "
                   "the artifact runs: int8 = dynamic quantization, bfloat16 fast only with "
                   "AVX512-BF16/AMX. Its fidelity cost is measured and printed.")
@click.option("--sign-key", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Ed25519 private key from 'lookupc keygen': sign the artifact.")
@model_options
@convert_options
@policy_options
@fidelity_option
def compile_(model, target, output, schedule, tuning_db, force, rest_dtype, sign_key, batch,
             seq_len,
             trust_pickle,
             tables, bits, block_size, init, calibration, seed, distill_option):
    """Convert MODEL and compile it into a deployable artifact directory for --target."""
    from ..targets import parse_target

    spec = parse_target(target)
    if schedule == "tuned" and not tuning_db:
        raise usage("--schedule tuned needs --tuning-db DIR (made by 'lookupc tune')")
    options = distill_options(distill_option, init)
    helper = helper_rank()
    loaded = load(model, batch, seq_len, trust_pickle)
    result = convert(loaded, size_config(tables, bits, block_size, init), init, calibration,
                     seed, options)
    if helper:  # torchrun's other ranks helped distil; rank 0 reports, compiles and writes
        return
    print_report(result.report)
    from ..artifact.compile import compile_artifact

    manifest, check = compile_artifact(result, loaded, spec, output, schedule=schedule,
                                       tuning_db=tuning_db, overwrite=force, progress=True,
                                       sign_key=sign_key, rest_dtype=rest_dtype)
    click.echo(f"wrote {output}/ for {manifest['target_string']} ({schedule} schedule, "
               f"{len(manifest['kernels'])} LookupFFN shape(s)"
               + ("" if rest_dtype == "float32" else f", rest layers in {rest_dtype}") + ")")
    for name, meta in manifest["files"].items():
        click.echo(f"  {name:20s} {meta['bytes']:>12,d} bytes")
    click.echo(check)
