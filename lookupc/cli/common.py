"""Plumbing the ``lookupc`` commands share: errors, progress, loading and converting MODEL.

:func:`usage` makes the error for bad command-line input and :func:`one_line` turns any
exception into the one-line message the command prints; :class:`step` shows progress of a
long step on stderr; :func:`load` and :func:`convert` load a MODEL and run
:func:`lookupc.convert` on it with the policy flags of the command line (read by
:func:`policy`); :func:`helper_rank` says whether this process is a ``torchrun`` helper
rank that prints and writes nothing; :func:`print_report` and :func:`write_json` write
results. Importing this module imports neither torch nor TVM.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

__all__ = ["POLICY_KEY", "DISTILL_KEY", "usage", "one_line", "policy", "step", "load",
           "convert", "helper_rank", "print_report", "write_json"]

# click context meta keys where the option callbacks of :mod:`.options` store their flags
POLICY_KEY = "lookupc.policy"
DISTILL_KEY = "lookupc.distill"


def usage(msg: str) -> Exception:
    """The error for bad command-line input (printed as one line, without a traceback)."""
    from ..errors import LookupcInputError

    return LookupcInputError(msg)


def one_line(err: BaseException) -> str:
    """``err`` as the single line the command prints for it."""
    from ..errors import LookupcError

    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (LookupcError, ValueError, FileNotFoundError)):
        return text
    return f"{type(err).__name__}: {text} (run with --debug for the traceback)"


def policy() -> dict:
    """The conversion policy flags of the running command (``force``, ``max_table_mib``,
    ``min_fidelity``, ``table_dtype``); a copy."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(POLICY_KEY, {})) if ctx else {}


def _main_process() -> bool:
    """False on the ranks other than 0 of a ``torchrun`` launch: they take part in the
    distillation (:mod:`lookupc.distill.distributed`) but print and write nothing."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return True
    return world <= 1 or os.environ.get("RANK", "0") == "0"


def helper_rank() -> bool:
    """On a rank other than 0: silence warnings and say so (the caller stops after the
    conversion)."""
    if _main_process():
        return False
    import warnings

    warnings.simplefilter("ignore")
    return True


class step:
    """Progress for one long step on stderr: ``what ...`` while it runs (on a terminal),
    ``what: done (1.2 s)`` when it finishes; nothing is left behind when it fails, so an
    error stays a single line."""

    def __init__(self, what: str):
        self.what = what
        self.quiet = not _main_process()
        self.tty = sys.stderr.isatty() and not self.quiet

    def __enter__(self):
        if self.tty:
            click.echo(f"{self.what} ...", err=True, nl=False)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc):
        if self.tty:
            click.echo("\r\033[K", err=True, nl=False)
        if exc_type is None and not self.quiet:
            click.echo(f"{self.what}: done ({time.perf_counter() - self.t0:.1f} s)", err=True)


def load(model: str, batch: int, seq_len: int, trust_pickle: bool):
    """MODEL loaded (:func:`lookupc.artifact.model_load.load_model`), with progress."""
    from ..artifact.model_load import describe_model_spec, load_model

    describe_model_spec(model)  # a bad path fails here, before any progress output
    with step(f"loading {model}"):
        return load_model(model, batch=batch, seq_len=seq_len, trust_pickle=trust_pickle)


def _calibration(path: str | None, loaded, init: str):
    """Calibration items for distillation: the file's inputs, else the example inputs."""
    if init != "distill":
        if path:
            raise usage("--calibration is only used with --init distill")
        return None
    from ..distill.calibration_text import default_sentences, is_text_file, tokenizer_for

    if path is None:
        if loaded.kind == "hf" and tokenizer_for(loaded.module, loaded.source) is not None:
            return [s for _, s in default_sentences()]  # the stdlib docstrings
        return [loaded.example_inputs]
    if is_text_file(path):
        return path
    from ..artifact.tensor_files import load_inputs

    return [load_inputs(path)]


def convert(loaded, config, init, calibration, seed, distill_options=None):
    """:func:`lookupc.convert` on a loaded MODEL with the command line's policy flags; an
    already converted .pt2 program is returned as it is."""
    import torch

    import lookupc

    flags = policy()
    if loaded.kind == "pt2":
        from ..artifact.graph import already_converted

        done = already_converted(loaded.module)
        if done is not None:
            if flags.get("table_dtype"):
                raise usage("--table-dtype applies when converting; MODEL is already a "
                            "converted program (convert it again from the original model)")
            return done

    items = _calibration(calibration, loaded, init)
    torch.manual_seed(seed)
    mib = flags.pop("max_table_mib", None)
    with step(f"converting ({init} init)"):
        tokenizer = None
        if init == "distill" and loaded.kind == "hf":
            from ..distill.calibration_text import tokenizer_for

            tokenizer = tokenizer_for(loaded.module, loaded.source)
        return lookupc.convert(loaded.module, loaded.example_inputs, config=config, init=init,
                               calibration=items, tokenizer=tokenizer,
                               distill_options=distill_options or None,
                               force=bool(flags.get("force")),
                               max_table_bytes=None if mib is None else int(mib * 2**20),
                               min_fidelity=flags.get("min_fidelity"),
                               table_dtype=flags.get("table_dtype"))


def print_report(report) -> None:
    click.echo(str(report).rstrip())


def write_json(path: str | None, data) -> None:
    """Write ``data`` as JSON to ``path`` (nothing when ``path`` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)
        click.echo(f"wrote {path}", err=True)
