"""``lookupc doctor``: what lookupc gives you on this machine (:mod:`lookupc.doctor`).

The command only shows progress, prints :func:`lookupc.doctor.render` of
:func:`lookupc.doctor.diagnose` and writes it as JSON on request.
"""

from __future__ import annotations

import click

from .common import step, write_json
from .options import CONTEXT

__all__ = ["doctor"]


@click.command(context_settings=CONTEXT)
@click.argument("artifact", required=False, type=click.Path())
@click.option("--no-bench", is_flag=True, help="Skip the ~10-second micro-benchmark.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON.")
def doctor(artifact, no_bench, json_path):
    """What lookupc gives you on this machine: CPU and ISA, threads, versions, kernel cache,
    which provider the ops really dispatch to (and why they fall back), a micro-benchmark of
    the kernels against this machine's bounds and the dense FFN, and whether ARTIFACT can
    run here at full speed."""
    from ..doctor import diagnose, render

    with step("checking this machine" + ("" if no_bench else " (with a ~10 s benchmark)")):
        report = diagnose(artifact, bench=not no_bench)
    click.echo(render(report))
    write_json(json_path, report)
