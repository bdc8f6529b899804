"""``lookupc compare``: time the LookupFFN kernel schedules next to the dense FFN on random
inputs and print a table, optionally writing JSON and a PNG.

The timing, the config names, the machine facts, the JSON report and the chart are
:mod:`lookupc.perf`'s (the harness bench/ffn.py uses); the command checks its options,
sets the thread counts and shows progress.
"""

from __future__ import annotations

import os

import click

from ..schedules.registry import schedule_names
from .common import step, usage, write_json
from .options import CONTEXT, lookup_options, size_config

__all__ = ["compare"]


@click.command(context_settings=CONTEXT)
@click.option("--schedules", default="naive,hand,tuned", show_default=True,
              help="Comma-separated kernel schedules to time next to the dense FFN.")
@click.option("--config", "configs", multiple=True,
              help="FFN size: paper (512-2048-512), minilm, bert-base, or DxH such as 128x512; "
                   "repeatable (default: paper).")
@click.option("--tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens per call.")
@click.option("--repeats", type=click.IntRange(min=3), default=10, show_default=True,
              help="Interleaved timed rounds (median and min are reported).")
@lookup_options
@click.option("--tuning-db", type=click.Path(file_okay=False), default=None,
              help="Tuning database for the 'tuned' schedule (default: lookupc's cache).")
@click.option("--torch-compile/--no-torch-compile", default=True, show_default=True,
              help="Also time torch.compile of the dense FFN.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the rows and machine facts as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a bar chart (PNG) of the median times.")
def compare(schedules, configs, tokens, repeats, tables, bits, block_size, tuning_db,
            torch_compile, json_path, plot_path):
    """Time the LookupFFN kernel schedules side by side with the dense FFN (and the PyTorch
    reference ops) on random inputs; print a table, optionally write JSON and a PNG.

    The timing is bench/ffn.py's (lookupc.perf): all cores, one warm-up, then interleaved rounds so
    load changes on a shared machine hit every variant alike."""
    threads = os.cpu_count() or 1
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    names = [s.strip() for s in schedules.split(",") if s.strip()]
    unknown = sorted(set(names) - set(schedule_names(aliases=True)))
    if unknown:
        raise usage(f"unknown schedule(s) {', '.join(unknown)} in --schedules; accepted: "
                    f"{', '.join(schedule_names(aliases=True))} (hand = cpu)")
    import torch

    from .. import perf

    torch.set_num_threads(threads)
    config = size_config(tables, bits, block_size)
    configs = list(configs) or ["paper"]
    for name in configs:
        perf.resolve_config(name, config)
    if "tuned" in names:
        from ..schedules.cpu.tuned import default_db_dir

        tuning_db = tuning_db or default_db_dir()
    bw_l3 = perf.read_bandwidth(8 << 20)
    rows = []
    for name in configs:
        with step(f"timing {name} ({tokens} tokens, {repeats} rounds)"):
            rows += perf.run_config(name, tokens, repeats, names, tuning_db,
                                    min(256, tokens), torch_compile, bw_l3)
    machine = perf.machine_facts(threads)
    click.echo(f"CPU: {machine['cpu']} (llvm mcpu {machine['llvm_mcpu']}), "
               f"threads {threads}, load average {os.getloadavg()[0]:.1f}")
    perf.print_table(rows)
    write_json(json_path, perf.compare_report(rows, machine, bw_l3, configs, tuning_db))
    if plot_path:
        perf.plot_rows(rows, plot_path, machine)
        click.echo(f"wrote {plot_path}", err=True)
