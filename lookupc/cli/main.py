"""The ``lookupc`` command: a thin layer over the Python API.

This module holds the click group :func:`cli`, the console entry point :func:`main`, the
error handling (one line on stderr and a non-zero exit status; ``--debug`` or the
environment variable ``LOOKUPC_DEBUG=1`` shows the traceback instead) and the lazily
imported sub-groups. The commands live one per module -- :mod:`.inspect`, :mod:`.convert`,
:mod:`.compile`, :mod:`.run`, :mod:`.tune`, :mod:`.compare`, :mod:`.doctor`,
:mod:`.keygen` -- and are attached here; ``memo`` (:mod:`lookupc.cli.memo`) is attached
when first used. Importing this module imports neither torch nor TVM: each command imports
what it needs when it runs, so ``lookupc --help`` answers at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import click

from .common import one_line
from .compare import compare
from .compile import compile_
from .convert import convert
from .doctor import doctor
from .inspect import inspect
from .keygen import keygen
from .options import CONTEXT
from .run import run
from .tune import tune

__all__ = ["cli", "main"]

# sub-command groups that live in other modules: name -> (module, attribute, short help)
_LAZY = {"memo": ("lookupc.cli.memo", "memo", "Attention memoization (see 'lookupc memo -h').")}


def _debug(ctx: click.Context | None) -> bool:
    root = ctx.find_root() if ctx else None
    return bool(os.environ.get("LOOKUPC_DEBUG")) or bool(root and root.meta.get("lookupc.debug"))


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


class _Group(click.Group):
    """Adds lazily imported sub-groups and turns exceptions into one-line errors."""

    def _lazy_available(self) -> list[str]:
        return [name for name, (module, _, _) in _LAZY.items() if _module_exists(module)]

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self._lazy_available()))

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        if command is None and name in self._lazy_available():
            module, attr, _ = _LAZY[name]
            command = getattr(importlib.import_module(module), attr)
            self.add_command(command, name)
        return command

    def format_commands(self, ctx, formatter):
        rows = [(name, cmd.get_short_help_str(60)) for name, cmd in sorted(self.commands.items())]
        rows += [(name, _LAZY[name][2]) for name in self._lazy_available()
                 if name not in self.commands]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(sorted(rows))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as err:
            if _debug(ctx):
                raise
            raise click.ClickException(one_line(err)) from None


@click.group(cls=_Group, context_settings=CONTEXT)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(package_name="lookupc", prog_name="lookupc")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Compile transformer feed-forward networks into LookupFFN and TVM CPU kernels.

    \b
    lookupc inspect examples.tiny_bert:factory
    lookupc compile examples.tiny_bert:factory -o tiny_bert.lookupc
    lookupc run tiny_bert.lookupc
    """
    ctx.meta["lookupc.debug"] = debug


for _command in (inspect, convert, compile_, run, tune, compare, doctor, keygen):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lookupc`` console script."""
    cli.main(args=argv, prog_name="lookupc")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
