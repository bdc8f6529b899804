"""``lookupc keygen``: write an Ed25519 key pair for signing artifacts
(:func:`lookupc.artifact.signing.keygen`) and say how to trust it.
"""

from __future__ import annotations

import click

from .options import CONTEXT

__all__ = ["keygen"]


@click.command(context_settings=CONTEXT)
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
