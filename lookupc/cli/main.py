"""The ``lookupc`` command: a thin layer over the Python API.

Commands: ``inspect``, ``convert``, ``compile``, ``run``, ``tune``, ``compare`` (and
``memo`` when :mod:`lookupc.cli.memo` is installed). Importing this module imports
neither torch nor TVM: each command imports what it needs when it runs, so
``lookupc --help`` answers at once.

Errors are one line on stderr and a non-zero exit status; ``--debug`` (or the
environment variable ``LOOKUPC_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time

import click

from ..schedules.registry import schedule_names

__all__ = ["cli", "main"]

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
MODEL_HELP = ("MODEL is a Hugging Face model dir (config.json + safetensors, loaded locally), "
              "a torch.export .pt2 file, or package.module:factory returning "
              "(model, example_inputs).")

# sub-command groups that live in other modules: name -> (module, attribute, short help)
_LAZY = {"memo": ("lookupc.cli.memo", "memo", "Attention memoization (see 'lookupc memo -h').")}


def _debug(ctx: click.Context | None) -> bool:
    root = ctx.find_root() if ctx else None
    return bool(os.environ.get("LOOKUPC_DEBUG")) or bool(root and root.meta.get("lookupc.debug"))


def _one_line(err: BaseException) -> str:
    from ..errors import LookupcError

    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (LookupcError, ValueError, FileNotFoundError)):
        return text
    return f"{type(err).__name__}: {text} (run with --debug for the traceback)"


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
            raise click.ClickException(_one_line(err)) from None


def _usage(msg: str) -> Exception:
    from ..errors import LookupcInputError

    return LookupcInputError(msg)


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@click.group(cls=_Group, context_settings=_CONTEXT)
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


# --- shared options -------------------------------------------------------------------------

def _model_options(f):
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow a pickled .pt model (unpickling runs code from the file).")(f)
    f = click.option("--seq-len", type=click.IntRange(min=1), default=32, show_default=True,
                     help="Tokens per sequence of the example batch made for HF models.")(f)
    f = click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True,
                     help="Sequences in the example batch made for HF models.")(f)
    return f


def _lookup_options(f):
    f = click.option("--block-size", type=click.IntRange(min=1), default=None,
                     help="BH4 block size (default: per FFN, min(64, padded width)).")(f)
    f = click.option("--bits", type=click.IntRange(1, 16), default=None,
                     help="Code bits tau per table (default 8).")(f)
    f = click.option("--tables", type=click.IntRange(min=1), default=None,
                     help="Hash tables h (default: hidden width / 16 per FFN).")(f)
    return f


def _store_policy(ctx, param, value):
    ctx.meta.setdefault("lookupc.policy", {})[param.name] = value
    return value


def _policy_options(f):
    """Conversion policy flags; they reach :func:`_convert` through the click context."""
    f = click.option("--force-replace", "force", is_flag=True, expose_value=False,
                     callback=_store_policy,
                     help="Replace FFNs even where a LookupFFN costs more FLOPs than the dense "
                          "FFN (by default those stay dense, with the reason in the report).")(f)
    f = click.option("--max-table-mib", "max_table_mib", type=click.FloatRange(min=0),
                     default=None, expose_value=False, callback=_store_policy,
                     help="Budget for all LookupFFN tables, checked before allocating "
                          "(default: half the memory available).")(f)
    return f


def _fidelity_option(f):
    return click.option("--min-fidelity", "min_fidelity", type=click.FloatRange(-1, 1),
                        default=None, expose_value=False, callback=_store_policy,
                        help="Fail when the converted model's pooled-output cosine with the "
                             "original on the example inputs is below this.")(f)


def _store_distill(ctx, param, value):
    if value:
        ctx.meta.setdefault("lookupc.distill.layer", {})[param.name] = value
    return value


def _convert_options(f):
    f = click.option("--table-dtype", type=click.Choice(["float32", "bfloat16", "int8"]),
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
                     help="A lookupc.distill.layer.DistillOptions field for --init distill, e.g. "
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
    return _lookup_options(f)


def _config(tables, bits, block_size, init: str = "random"):
    """The sizes given on the command line over per-FFN defaults, or None (all per-FFN)."""
    if tables is None and bits is None and block_size is None:
        return None
    from ..config import SizeOverride

    return SizeOverride(tables=tables, bits=bits, block_size=block_size,
                        distill=init == "distill")


def _load(model: str, batch: int, seq_len: int, trust_pickle: bool):
    from ..artifact.model_io import describe_model_spec, load_model

    describe_model_spec(model)  # a bad path fails here, before any progress output
    with _step(f"loading {model}"):
        return load_model(model, batch=batch, seq_len=seq_len, trust_pickle=trust_pickle)


def _main_process() -> bool:
    """False on the ranks other than 0 of a ``torchrun`` launch: they take part in the
    distillation (:mod:`lookupc.distill.distributed`) but print and write nothing."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return True
    return world <= 1 or os.environ.get("RANK", "0") == "0"


def _helper_rank() -> bool:
    """On a rank other than 0: silence warnings and say so (the caller stops after the
    conversion)."""
    if _main_process():
        return False
    import warnings

    warnings.simplefilter("ignore")
    return True


class _step:
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


def _calibration(path: str | None, loaded, init: str):
    """Calibration items for distillation: the file's inputs, else the example inputs."""
    if init != "distill":
        if path:
            raise _usage("--calibration is only used with --init distill")
        return None
    from ..distill.calibration_text import default_sentences, is_text_file, tokenizer_for

    if path is None:
        if loaded.kind == "hf" and tokenizer_for(loaded.module, loaded.source) is not None:
            return [s for _, s in default_sentences()]  # the stdlib docstrings
        return [loaded.example_inputs]
    if is_text_file(path):
        return path
    from ..artifact.model_io import load_inputs

    return [load_inputs(path)]


def _distill_options(pairs, init: str) -> dict:
    """``KEY=VALUE`` strings to a dict of Python literals (strings stay strings)."""
    import ast

    ctx = click.get_current_context(silent=True)
    flags = dict(ctx.meta.get("lookupc.distill.layer", {})) if ctx else {}
    if pairs and init != "distill":
        raise _usage("--distill-option is only used with --init distill")
    if flags and init != "distill":
        raise _usage(f"--{sorted(flags)[0]} is only used with --init distill")
    if flags.get("resume") and not flags.get("checkpoint"):
        raise _usage("--resume needs --checkpoint FILE")
    out = dict(flags)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise _usage(f"--distill-option wants KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    if out:
        from ..distill.layer import DistillOptions

        DistillOptions.from_kwargs(**out)  # unknown keys and bad values fail before loading
    return out


def _convert(loaded, config, init, calibration, seed, distill_options=None):
    import torch

    import lookupc

    ctx = click.get_current_context(silent=True)
    policy = dict(ctx.meta.get("lookupc.policy", {})) if ctx else {}
    if loaded.kind == "pt2":
        from ..artifact.core import already_converted

        done = already_converted(loaded.module)
        if done is not None:
            if policy.get("table_dtype"):
                raise _usage("--table-dtype applies when converting; MODEL is already a "
                             "converted program (convert it again from the original model)")
            return done

    items = _calibration(calibration, loaded, init)
    torch.manual_seed(seed)
    mib = policy.pop("max_table_mib", None)
    with _step(f"converting ({init} init)"):
        tokenizer = None
        if init == "distill" and loaded.kind == "hf":
            from ..distill.calibration_text import tokenizer_for

            tokenizer = tokenizer_for(loaded.module, loaded.source)
        return lookupc.convert(loaded.module, loaded.example_inputs, config=config, init=init,
                               calibration=items, tokenizer=tokenizer,
                               distill_options=distill_options or None,
                               force=bool(policy.get("force")),
                               max_table_bytes=None if mib is None else int(mib * 2**20),
                               min_fidelity=policy.get("min_fidelity"),
                               table_dtype=policy.get("table_dtype"))


def _print_report(report) -> None:
    click.echo(str(report).rstrip())


def _write_json(path: str | None, data) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2, default=str)
        click.echo(f"wrote {path}", err=True)


# --- inspect ----------------------------------------------------------------------------------

@cli.command(context_settings=_CONTEXT, epilog=MODEL_HELP)
@click.argument("model")
@_model_options
@_lookup_options
@_policy_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON.")
def inspect(model, batch, seq_len, trust_pickle, tables, bits, block_size, json_path):
    """Show which FFNs of MODEL become LookupFFNs, which are skipped and why, and the
    FLOPs and table memory before and after. MODEL may also be an artifact directory."""
    from pathlib import Path

    if Path(model, "manifest.json").is_file():
        return _inspect_artifact(model, json_path)
    loaded = _load(model, batch, seq_len, trust_pickle)
    # a random-init conversion: cheap, and it checks the rewrite end to end
    report = _convert(loaded, _config(tables, bits, block_size), "random", None, 0).report
    _print_report(report)
    _write_json(json_path, report.to_dict() if hasattr(report, "to_dict")
                else {"report": str(report)})


def _inspect_artifact(path: str, json_path: str | None) -> None:
    from ..artifact.core import ArtifactError, read_manifest, verify
    from ..targets import TargetSpec, can_execute

    manifest = read_manifest(path)
    try:
        verify(path)
        status = "ok (all files match their sha256, versions match)"
    except ArtifactError as err:
        status = f"FAILED: {str(err).split(': artifact failed verification: ', 1)[-1]}"
    ok, why = can_execute(TargetSpec.from_dict(manifest["target"]))
    click.echo(f"artifact {path}")
    click.echo(f"  target     {manifest.get('target_string')}")
    click.echo(f"  runs here  {'yes' if ok else 'no: ' + why}")
    click.echo(f"  schedule   {manifest.get('schedule')}")
    click.echo("  versions   " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))
    click.echo(f"  model      {manifest.get('model', {}).get('source')}")
    for k in manifest.get("kernels", []):
        click.echo(f"  kernels    {k}")
    for name, meta in manifest["files"].items():
        click.echo(f"  file       {name:20s} {meta['bytes']:>12,d} B  sha256 {meta['sha256'][:16]}")
    click.echo(f"  verify     {status}")
    click.echo(f"  trust      {_trust_line(path, manifest)}")
    _write_json(json_path, manifest)


def _trust_line(path: str, manifest: dict) -> str:
    from ..artifact import signing

    try:
        trust = signing.trust_of(path, manifest, signing.trusted_keys())
    except Exception as err:  # noqa: BLE001 - e.g. cryptography missing: say so
        return f"cannot check the signature: {_one_line(err)}"
    if trust.kind == "trusted":
        return f"{trust.describe()}: kernels.so loads"
    if trust.kind == "invalid":
        return f"{trust.describe()}: refused"
    return (f"{trust.describe()}: kernels.so does not load unless --trust-artifact; "
            f"'lookupc run' rebuilds the kernels here instead")


# --- doctor -----------------------------------------------------------------------------------

@cli.command(context_settings=_CONTEXT)
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

    with _step("checking this machine" + ("" if no_bench else " (with a ~10 s benchmark)")):
        report = diagnose(artifact, bench=not no_bench)
    click.echo(render(report))
    _write_json(json_path, report)


# --- keygen -----------------------------------------------------------------------------------

@cli.command(context_settings=_CONTEXT)
@click.argument("key", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace existing key files.")
def keygen(key, force):
    """Write an Ed25519 signing KEY (private, mode 0600) and KEY.pub for signing artifacts
    ('lookupc compile --sign-key KEY'; trust it with 'lookupc run --trusted-key KEY.pub')."""
    from ..artifact.signing import default_keys_dir
    from ..artifact.signing import keygen as _keygen

    pub, public = _keygen(key, overwrite=force)
    click.echo(f"wrote {key} (private: keep it secret) and {pub} (public {public[:16]}...)")
    click.echo(f"to trust it everywhere on this machine: copy {pub} into {default_keys_dir()}/")


# --- convert ----------------------------------------------------------------------------------

@cli.command(context_settings=_CONTEXT, epilog=MODEL_HELP)
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Where to write the torch.export program (.pt2), or the directory for "
                   "--format sentence-transformers.")
@click.option("--format", "fmt", type=click.Choice(["pt2", "sentence-transformers"]),
              default="pt2", show_default=True,
              help="sentence-transformers: a directory with modules.json, pooling, "
                   "normalisation, tokenizer and the program (lookupc compile takes it).")
@_model_options
@_convert_options
@_policy_options
@_fidelity_option
def convert(model, output, fmt, batch, seq_len, trust_pickle, tables, bits, block_size, init,
            calibration, seed, distill_option):
    """Replace MODEL's FFNs with LookupFFNs and write a torch.export program (.pt2)."""
    if fmt == "pt2" and not output.endswith(".pt2"):
        raise _usage(f"-o/--output {output!r} must end in .pt2")
    options = _distill_options(distill_option, init)
    helper = _helper_rank()
    loaded = _load(model, batch, seq_len, trust_pickle)
    result = _convert(loaded, _config(tables, bits, block_size, init), init, calibration, seed,
                      options)
    if helper:  # torchrun's other ranks helped distil; rank 0 reports and writes
        return
    _print_report(result.report)
    from ..artifact.model_io import export_program, save_program

    with _step("exporting"):
        program, names, flattened, dynamic = export_program(result.module, loaded.example_inputs)
        names = _output_names(loaded, names)
        if fmt == "sentence-transformers":
            from ..artifact.st_export import write_loaded

            return click.echo(write_loaded(output, program, names, loaded))
        save_program(program, output, names)
    if flattened:
        click.echo(f"note: the model returns {_kind_of_outputs(loaded)}; the program returns "
                   f"them flattened to a tuple ({', '.join(names)})", err=True)
    click.echo(f"wrote {output} ({os.path.getsize(output):,} bytes, "
               f"{'dynamic' if dynamic else 'static'} batch/sequence dims)")


def _output_names(loaded, names: list[str]) -> list[str]:
    """Names a .pt2 MODEL recorded for its outputs, else those found by flattening."""
    recorded = loaded.info.get("output_names")
    return list(recorded) if recorded and len(recorded) == len(names) else names


def _kind_of_outputs(loaded) -> str:
    return "a Hugging Face output object" if loaded.kind == "hf" else "a nested output"


# --- compile ----------------------------------------------------------------------------------

@cli.command("compile", context_settings=_CONTEXT, epilog=MODEL_HELP)
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
@click.option("--sign-key", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Ed25519 private key from 'lookupc keygen': sign the artifact.")
@_model_options
@_convert_options
@_policy_options
@_fidelity_option
def compile_(model, target, output, schedule, tuning_db, force, sign_key, batch, seq_len,
             trust_pickle,
             tables, bits, block_size, init, calibration, seed, distill_option):
    """Convert MODEL and compile it into a deployable artifact directory for --target."""
    from ..targets import parse_target

    spec = parse_target(target)
    if schedule == "tuned" and not tuning_db:
        raise _usage("--schedule tuned needs --tuning-db DIR (made by 'lookupc tune')")
    options = _distill_options(distill_option, init)
    helper = _helper_rank()
    loaded = _load(model, batch, seq_len, trust_pickle)
    result = _convert(loaded, _config(tables, bits, block_size, init), init, calibration, seed,
                      options)
    if helper:  # torchrun's other ranks helped distil; rank 0 reports, compiles and writes
        return
    _print_report(result.report)
    from ..artifact.core import compile_artifact

    manifest, check = compile_artifact(result, loaded, spec, output, schedule=schedule,
                                       tuning_db=tuning_db, overwrite=force, progress=True,
                                       sign_key=sign_key)
    click.echo(f"wrote {output}/ for {manifest['target_string']} ({schedule} schedule, "
               f"{len(manifest['kernels'])} LookupFFN shape(s))")
    for name, meta in manifest["files"].items():
        click.echo(f"  {name:20s} {meta['bytes']:>12,d} bytes")
    click.echo(check)


# --- run --------------------------------------------------------------------------------------

@cli.command(context_settings=_CONTEXT)
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
@click.option("--rebuild-kernels", is_flag=True,
              help="Never load kernels.so: rebuild the kernels here (the default for "
                   "artifacts not signed by a trusted key).")
def run(artifact, input_path, output, texts, text_file, batch_size, fmt, normalize, check,
        repeat, ignore_versions, trusted_key, trust_artifact, rebuild_kernels):
    """Load an ARTIFACT directory (verifying it) and run it: on token inputs (--input, default
    the compiled example inputs), or on text (--text/--text-file) giving sentence embeddings."""
    from ..artifact.core import load
    from ..artifact.model_io import load_inputs, save_inputs

    text_mode = bool(texts or text_file)
    if text_mode and input_path:
        raise _usage("give --input or --text/--text-file, not both")
    if not text_mode and fmt:
        raise _usage("--format is for the embeddings of --text/--text-file")
    if text_mode:
        from .text import run_text, text_request

        sentences, fmt = text_request(texts, text_file, output, fmt)

    with _step(f"loading {artifact}"):
        model = load(artifact, check_versions=not ignore_versions, trusted_keys=trusted_key,
                     trust_artifact=trust_artifact, rebuild_kernels=rebuild_kernels)
    click.echo(f"trust   {model.trust.describe()}; kernels: {model.kernel_source}"
               + ("" if model.kernel_source.startswith("artifact") or rebuild_kernels else
                  " (--trusted-key KEY.pub or --trust-artifact loads its kernels.so)"),
               err=True)
    if text_mode:
        return run_text(model, sentences, batch_size, output, fmt, normalize, check, artifact)
    inputs = load_inputs(input_path) if input_path else model.example_inputs
    outputs = model(*inputs)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model(*inputs)
        times.append(time.perf_counter() - t0)
    names = model.output_names or [f"output_{i}" for i in range(len(outputs))]
    click.echo("inputs  " + ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                                       for t in inputs))
    for name, t in zip(names, outputs):
        click.echo(f"output  {name}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} "
                   f"mean {t.float().mean().item():+.5f} std {t.float().std().item():.5f}")
    if times:
        click.echo(f"time    {min(times) * 1e3:.2f} ms (min of {len(times)}, "
                   f"{model.manifest['schedule']} kernels)")
    if output:
        save_inputs(tuple(outputs), output)
        click.echo(f"wrote {output}", err=True)
    if check:
        from ..artifact.output_check import compare_outputs

        what = "artifact vs the same program on the PyTorch reference ops"
        outcome = compare_outputs(outputs, model.run(*inputs, schedule="reference"))
        click.echo(outcome.line(what))
        outcome.raise_if_failed(what, f"; the kernels in {artifact} compute wrong outputs on "
                                      f"this machine")


# --- tune -------------------------------------------------------------------------------------

@cli.command(context_settings=_CONTEXT, epilog=MODEL_HELP)
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
@_model_options
@_lookup_options
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
        raise _usage("--rpc HOST:PORT and --key KEY go together (the tracker and the key "
                     "of the board to measure on)")
    spec = parse_target(target)
    if rpc is None:
        ok, why = can_execute(spec)
        if not ok:
            raise _usage(f"cannot tune for {spec} here: tuning measures the kernels, and "
                         f"{why}; measure on the board with --rpc HOST:PORT --key KEY")
    else:  # fail fast, before loading and converting the model
        from ..schedules.cpu.tuned import check_tracker, parse_rpc

        check_tracker(parse_rpc(rpc, rpc_key), rpc_timeout)
    shapes = _shapes_to_tune(model, preset, batch, seq_len, trust_pickle, tables, bits,
                             block_size)
    from ..progress import progress, write
    from ..runtime import cpu as kernels

    bar = progress(total=2 * len(shapes), desc="tune", unit="kernel")

    def log(message: str) -> None:
        write(message)
        if message.endswith("skipped") or ": done in " in message:
            bar.update(1)

    try:
        kernels.tune(shapes, spec.to_tvm(), db_dir, trials, cost_model=cost_model, log=log,
                     verbose=verbose, rpc=rpc, rpc_key=rpc_key, rpc_timeout=rpc_timeout)
    except KeyboardInterrupt:
        bar.close()
        raise click.ClickException(f"interrupted: every finished chunk of trials is kept in "
                                   f"{db_dir}; run the same command again to resume") from None
    finally:
        bar.close()
    click.echo(f"tuned {len(shapes)} LookupFFN shape(s) for {spec} into {db_dir}; compile with "
               f"--schedule tuned --tuning-db {db_dir} --target '{spec}'")


def _shapes_to_tune(model, preset, batch, seq_len, trust_pickle, tables, bits, block_size):
    if (model is None) == (preset is None):
        raise _usage("give a MODEL or --config NAME (one of them)")
    if preset is not None:
        return [s for _, s in _preset(preset, _config(tables, bits, block_size))]
    from ..artifact.core import lookup_shapes

    loaded = _load(model, batch, seq_len, trust_pickle)
    result = _convert(loaded, _config(tables, bits, block_size), "random", None, 0)
    return lookup_shapes(result.module)


# --- compare ----------------------------------------------------------------------------------

def _bench():
    """The timing harness ``compare`` shares with bench/ffn.py (:mod:`lookupc.perf`)."""
    from .. import perf

    return perf


def _preset(name: str, config=None) -> list:
    """``[(name, KernelShapes)]`` for a bench config name or ``DxH`` (d_model x d_hidden)."""
    from ..runtime.cpu import KernelShapes

    d, hidden, cfg = _bench_config(_bench(), name, config)
    return [(name, KernelShapes.for_config(d, d, cfg))]


def _bench_config(bench, name: str, config=None):
    from ..config import LookupConfig

    if name in bench.CONFIGS and config is None:
        return bench.CONFIGS[name]
    if name in bench.CONFIGS:
        d, hidden, _ = bench.CONFIGS[name]
    else:
        parts = name.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise _usage(f"unknown --config {name!r}; use one of {', '.join(bench.CONFIGS)} "
                         f"or DxH for a d_model x d_hidden FFN (e.g. 128x512)")
        d, hidden = map(int, parts)
    if config is None:
        config = LookupConfig.for_ffn(d, hidden, d)
    elif not isinstance(config, LookupConfig):  # a SizeOverride from --tables/--bits/...
        config = config.for_ffn(d, hidden, d)
    config.check_for(d)
    bench.CONFIGS[name] = (d, hidden, config)
    return bench.CONFIGS[name]


@cli.command(context_settings=_CONTEXT)
@click.option("--schedules", default="naive,hand,tuned", show_default=True,
              help="Comma-separated kernel schedules to time next to the dense FFN.")
@click.option("--config", "configs", multiple=True,
              help="FFN size: paper (512-2048-512), minilm, bert-base, or DxH such as 128x512; "
                   "repeatable (default: paper).")
@click.option("--tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens per call.")
@click.option("--repeats", type=click.IntRange(min=3), default=10, show_default=True,
              help="Interleaved timed rounds (median and min are reported).")
@_lookup_options
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
        raise _usage(f"unknown schedule(s) {', '.join(unknown)} in --schedules; accepted: "
                     f"{', '.join(schedule_names(aliases=True))} (hand = cpu)")
    bench = _bench()
    import torch

    from .. import tvm_shim

    torch.set_num_threads(threads)
    config = _config(tables, bits, block_size)
    configs = list(configs) or ["paper"]
    for name in configs:
        _bench_config(bench, name, config)
    if "tuned" in names:
        from ..schedules.cpu.tuned import default_db_dir

        tuning_db = tuning_db or default_db_dir()
    bw_l3 = bench.read_bandwidth(8 << 20)
    rows = []
    for name in configs:
        with _step(f"timing {name} ({tokens} tokens, {repeats} rounds)"):
            rows += bench.run_config(name, tokens, repeats, names, tuning_db,
                                     min(256, tokens), torch_compile, bw_l3)
    click.echo(f"CPU: {bench.cpu_name()} (llvm mcpu {tvm_shim.llvm_get_system_cpu()}), "
               f"threads {threads}, load average {os.getloadavg()[0]:.1f}")
    bench.print_table(rows)
    machine = {"cpu": bench.cpu_name(), "llvm_mcpu": tvm_shim.llvm_get_system_cpu(),
               "threads": threads, "torch": torch.__version__, "tvm": tvm_shim.tvm_version(),
               "load_avg_1m": os.getloadavg()[0]}
    _write_json(json_path, {"machine": machine, "bandwidth_gbs": {"l3_sized_8MiB": bw_l3},
                            "configs": {n: {"d_model": bench.CONFIGS[n][0],
                                            "d_hidden": bench.CONFIGS[n][1],
                                            **bench.CONFIGS[n][2].to_dict()} for n in configs},
                            "tuning_db": tuning_db, "rows": rows})
    if plot_path:
        _plot(rows, plot_path, machine)
        click.echo(f"wrote {plot_path}", err=True)


def _plot(rows: list[dict], path: str, machine: dict) -> None:
    from ..extras import require

    matplotlib = require("matplotlib", "lookupc compare --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(4.5 * len(configs), 3.8), squeeze=False)
    for ax, name in zip(axes[0], configs):
        sub = [r for r in rows if r["config"] == name]
        labels = [r["variant"] for r in sub]
        bars = ax.barh(labels, [r["ms_median"] for r in sub],
                       color=["#888888" if r["variant"].startswith("dense") else "#3b7dd8"
                              for r in sub])
        for bar, r in zip(bars, sub):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {r['speedup_vs_dense']:.2f}x", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(right=max(r["ms_median"] for r in sub) * 4)  # room for the labels
        ax.invert_yaxis()
        ax.set_xlabel(f"median ms per call ({sub[0]['tokens']} tokens, log)")
        ax.set_title(f"{name}: speed-up vs dense", fontsize=10)
    fig.suptitle(f"lookupc compare on {machine['llvm_mcpu']}, {machine['threads']} threads",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lookupc`` console script."""
    cli.main(args=argv, prog_name="lookupc")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
