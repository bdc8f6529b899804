"""``lookupc inspect``: what converting MODEL would do, or what an artifact directory holds.

For a MODEL it runs a cheap random-init conversion and prints its report (which FFNs
become LookupFFNs, which are skipped and why, FLOPs and table memory); for an artifact
directory it prints the manifest, verifies the files and says whether the artifact runs
here and whether its kernels.so would load (its signature).
"""

from __future__ import annotations

import click

from .common import convert, load, one_line, print_report, write_json
from .options import CONTEXT, MODEL_HELP, lookup_options, model_options, policy_options, size_config

__all__ = ["inspect"]


@click.command(context_settings=CONTEXT, epilog=MODEL_HELP)
@click.argument("model")
@model_options
@lookup_options
@policy_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON.")
def inspect(model, batch, seq_len, trust_pickle, tables, bits, block_size, json_path):
    """Show which FFNs of MODEL become LookupFFNs, which are skipped and why, and the
    FLOPs and table memory before and after. MODEL may also be an artifact directory."""
    from pathlib import Path

    if Path(model, "manifest.json").is_file():
        return _inspect_artifact(model, json_path)
    loaded = load(model, batch, seq_len, trust_pickle)
    # a random-init conversion: cheap, and it checks the rewrite end to end
    report = convert(loaded, size_config(tables, bits, block_size), "random", None, 0).report
    print_report(report)
    write_json(json_path, report.to_dict() if hasattr(report, "to_dict")
               else {"report": str(report)})


def _inspect_artifact(path: str, json_path: str | None) -> None:
    from ..artifact.format import ArtifactError, read_manifest, verify
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
    write_json(json_path, manifest)


def _trust_line(path: str, manifest: dict) -> str:
    from ..artifact import signing

    try:
        trust = signing.trust_of(path, manifest, signing.trusted_keys())
    except Exception as err:  # noqa: BLE001 - e.g. cryptography missing: say so
        return f"cannot check the signature: {one_line(err)}"
    if trust.kind == "trusted":
        return f"{trust.describe()}: kernels.so loads"
    if trust.kind == "invalid":
        return f"{trust.describe()}: refused"
    return (f"{trust.describe()}: kernels.so does not load unless --trust-artifact; "
            f"'lookupc run' rebuilds the kernels here instead")
