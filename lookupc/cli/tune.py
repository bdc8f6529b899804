"""``lookupc tune``: tune the hash and gather kernels of MODEL's LookupFFN shapes (or of a
named benchmark config) into a persistent MetaSchedule database, here or on a board
through a TVM RPC tracker (:func:`lookupc.runtime.build.tune`), with a progress bar.
"""

from __future__ import annotations

import click

from .common import convert, load, usage
from .options import CONTEXT, MODEL_HELP, lookup_options, model_options, size_config

__all__ = ["tune"]


@click.command(context_settings=CONTEXT, epilog=MODEL_HELP)
@click.argument("model", required=False)
@click.option("--config", "preset", default=None,
              help="Tune the FFN shapes of a named benchmark config instead of a MODEL "
                   "(see 'lookupc compare --help').")
@click.option("--target", default=None, help="Target to tune for (default: this machine).")
@click.option("--db", "db_dir", required=True, type=click.Path(file_okay=False),
              help="Tuning database directory (created; an existing one is resumed).")
@click.option("--trials", type=click.IntRange(min=1), default=32, show_default=True,
              help="Measured candidates per kernel (records already in --db count).")
@click.option("--cost-model", type=click.Choice(["xgb", "random"]), default="xgb",
              show_default=True, help="MetaSchedule cost model.")
@click.option("--verbose", is_flag=True,
              help="Show MetaSchedule's logs on the console (always in DB/logs/*.log).")
@click.option("--rpc", "rpc", default=None, metavar="HOST:PORT",
              help="Measure on a remote board through this TVM RPC tracker (compile here "
                   "for --target, the board's); needs --key.")
@click.option("--key", "rpc_key", default=None,
              help="Key the board's 'python -m tvm.exec.rpc_server' registered with.")
@click.option("--rpc-timeout", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True, help="Seconds the tracker has to answer before tuning.")
@model_options
@lookup_options
def tune(model, preset, target, db_dir, trials, cost_model, verbose, rpc, rpc_key,
         rpc_timeout, batch, seq_len, trust_pickle, tables, bits, block_size):
    """Tune the hash and gather kernels for MODEL's LookupFFN shapes into a persistent
    MetaSchedule database. Resumable: an interrupted run keeps every finished record,
    and kernels that already have --trials records are skipped. Use the result with
    'lookupc compile ... --schedule tuned --tuning-db DIR'.

    With --rpc HOST:PORT --key KEY the candidates are compiled here and measured on the
    board registered under KEY with that TVM RPC tracker; give the board's --target."""
    from ..targets import can_execute, parse_target

    if (rpc is None) != (rpc_key is None):
        raise usage("--rpc HOST:PORT and --key KEY go together (the tracker and the key "
                    "of the board to measure on)")
    spec = parse_target(target)
    if rpc is None:
        ok, why = can_execute(spec)
        if not ok:
            raise usage(f"cannot tune for {spec} here: tuning measures the kernels, and "
                        f"{why}; measure on the board with --rpc HOST:PORT --key KEY")
    else:  # fail fast, before loading and converting the model
        from ..schedules.cpu.tune_rpc import check_tracker, parse_rpc

        check_tracker(parse_rpc(rpc, rpc_key), rpc_timeout)
    shapes = _shapes_to_tune(model, preset, batch, seq_len, trust_pickle,
                             size_config(tables, bits, block_size))
    from ..progress import progress, write
    from ..runtime.build import tune

    bar = progress(total=2 * len(shapes), desc="tune", unit="kernel")

    def log(message: str) -> None:
        write(message)
        if message.endswith("skipped") or ": done in " in message:
            bar.update(1)

    try:
        tune(shapes, spec.to_tvm(), db_dir, trials, cost_model=cost_model, log=log,
                     verbose=verbose, rpc=rpc, rpc_key=rpc_key, rpc_timeout=rpc_timeout)
    except KeyboardInterrupt:
        bar.close()
        raise click.ClickException(f"interrupted: every finished chunk of trials is kept in "
                                   f"{db_dir}; run the same command again to resume") from None
    finally:
        bar.close()
    click.echo(f"tuned {len(shapes)} LookupFFN shape(s) for {spec} into {db_dir}; compile with "
               f"--schedule tuned --tuning-db {db_dir} --target '{spec}'")


def _shapes_to_tune(model, preset, batch, seq_len, trust_pickle, config) -> list:
    """The KernelShapes of a --config NAME, or of MODEL's LookupFFNs (random init)."""
    if (model is None) == (preset is None):
        raise usage("give a MODEL or --config NAME (one of them)")
    if preset is not None:
        from ..perf import kernel_shapes

        return [kernel_shapes(preset, config)]
    from ..artifact.graph import lookup_shapes

    loaded = load(model, batch, seq_len, trust_pickle)
    return lookup_shapes(convert(loaded, config, "random", None, 0).module)
