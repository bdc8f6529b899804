"""Click options shared by the ``lookupc`` commands, and reading them back.

The decorators here add the same flags to several commands: the example-batch options of
a MODEL (:func:`model_options`), the LookupFFN sizes (:func:`lookup_options`), the
conversion policy (:func:`policy_options`, :func:`fidelity_option`) and the conversion
and distillation flags (:func:`convert_options`). Policy and distillation flags are not
passed to the command function: their callbacks store them in the click context, where
:func:`lookupc.cli.common.policy` and :func:`distill_options` read them back.
:func:`size_config` turns --tables/--bits/--block-size into a size override.
:data:`CONTEXT` and :data:`MODEL_HELP` are the context settings and the epilog the
commands use. Importing this module imports neither torch nor TVM.
"""

from __future__ import annotations

import click

from ..config import TABLE_DTYPES
from .common import DISTILL_KEY, POLICY_KEY, usage

__all__ = ["CONTEXT", "MODEL_HELP", "model_options", "lookup_options", "policy_options",
           "fidelity_option", "convert_options", "size_config", "distill_options"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
MODEL_HELP = ("MODEL is a Hugging Face model dir (config.json + safetensors, loaded locally), "
              "a torch.export .pt2 file, or package.module:factory returning "
              "(model, example_inputs).")


def model_options(f):
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow a pickled .pt model (unpickling runs code from the file).")(f)
    f = click.option("--seq-len", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Tokens per sequence of the example batch made for HF models.")(f)
    f = click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Sequences in the example batch made for HF models.")(f)
    return f


def lookup_options(f):
    f = click.option("--block-size", type=click.IntRange(min=1), default=None,
                     help="BH4 block size (default: per FFN, min(64, padded width)).")(f)
    f = click.option("--bits", type=click.IntRange(1, 16), default=None,
                     help="Code bits tau per table (default 8).")(f)
    f = click.option("--tables", type=click.IntRange(min=1), default=None,
                     help="Hash tables h (default: hidden width / 16 per FFN).")(f)
    return f


def _store_policy(ctx, param, value):
    ctx.meta.setdefault(POLICY_KEY, {})[param.name] = value
    return value


def policy_options(f):
    """Conversion policy flags; they reach :func:`lookupc.cli.common.convert` through the
    click context."""
    f = click.option("--force-replace", "force", is_flag=True, expose_value=False,
                     callback=_store_policy,
                     help="Replace FFNs even where a LookupFFN costs more FLOPs than the dense "
                          "FFN (by default those stay dense, with the reason in the report).")(f)
    f = click.option("--max-table-mib", "max_table_mib", type=click.FloatRange(min=0),
                     default=None, expose_value=False, callback=_store_policy,
                     help="Budget for all LookupFFN tables, checked before allocating "
                          "(default: half the memory available).")(f)
    return f


def fidelity_option(f):
    return click.option("--min-fidelity", "min_fidelity", type=click.FloatRange(-1, 1),
                        default=None, expose_value=False, callback=_store_policy,
                        help="Fail when the converted model's pooled-output cosine with the "
                             "original on the example inputs is below this.")(f)


def _store_distill(ctx, param, value):
    if value:
        ctx.meta.setdefault(DISTILL_KEY, {})[param.name] = value
    return value


def convert_options(f):
    f = click.option("--table-dtype", type=click.Choice(list(TABLE_DTYPES)),
                     default=None, expose_value=False, callback=_store_policy,
                     help="Store the tables in this dtype: trained in float32, then quantised "
                          "(int8: one scale per table row). Default: float32.")(f)
    f = click.option("--resume", is_flag=True, expose_value=False, callback=_store_distill,
                     help="Continue the whole-model distillation from --checkpoint (same "
                          "model, sizes and options; a mismatch is an error).")(f)
    f = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     expose_value=False, callback=_store_distill,
                     help="Whole-model distillation checkpoint, written atomically every "
                          "checkpoint_every steps (Ctrl-C once: stop after the step and keep "
                          "the best parameters; --resume continues).")(f)
    f = click.option("--distill-option", "distill_option", multiple=True, metavar="KEY=VALUE",
                     help="A lookupc.distill.options.DistillOptions field for --init distill, e.g. "
                          "model_steps=100 or hash_source=hidden (repeatable).")(f)
    f = click.option("--seed", type=int, default=0, show_default=True,
                     help="Seed of the LookupFFN initialisation (conversions are reproducible).")(f)
    f = click.option("--calibration", type=click.Path(dir_okay=False), default=None,
                     help="Calibration for --init distill: text (.txt, one sentence per "
                          "line, or .jsonl with a 'text' field; needs the model's tokenizer) "
                          "or one batch of model inputs (.pt, .safetensors, .npz). Default: "
                          "the stdlib docstrings for a Hugging Face model with a tokenizer, "
                          "else the example inputs.")(f)
    f = click.option("--init", "init", type=click.Choice(["random", "distill"]),
                     default="random", show_default=True,
                     help="Initialise LookupFFNs randomly or distil them from the dense FFNs.")(f)
    return lookup_options(f)


def size_config(tables, bits, block_size, init: str = "random"):
    """The sizes given on the command line over per-FFN defaults, or None (all per-FFN)."""
    if tables is None and bits is None and block_size is None:
        return None
    from ..config import SizeOverride

    return SizeOverride(tables=tables, bits=bits, block_size=block_size,
                        distill=init == "distill")


def distill_options(pairs, init: str) -> dict:
    """``KEY=VALUE`` strings and the --checkpoint/--resume flags to a dict of Python
    literals (strings stay strings), checked before the model loads."""
    import ast

    ctx = click.get_current_context(silent=True)
    flags = dict(ctx.meta.get(DISTILL_KEY, {})) if ctx else {}
    if pairs and init != "distill":
        raise usage("--distill-option is only used with --init distill")
    if flags and init != "distill":
        raise usage(f"--{sorted(flags)[0]} is only used with --init distill")
    if flags.get("resume") and not flags.get("checkpoint"):
        raise usage("--resume needs --checkpoint FILE")
    out = dict(flags)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise usage(f"--distill-option wants KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    if out:
        from ..distill.options import DistillOptions

        DistillOptions.from_kwargs(**out)  # unknown keys and bad values fail before loading
    return out
