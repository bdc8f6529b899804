"""Who built this artifact? Ed25519 signatures, and the rule for running its native code.

An artifact's ``kernels.so`` is native code: loading it runs its constructors. The
manifest's sha256 values detect accidents, not attackers (anyone can recompute them).
A signature by a key the user trusts is what makes the library safe to load:

- ``lookupc keygen KEY`` writes an Ed25519 private key (``KEY``, PEM, mode 0600) and its
  public key (``KEY.pub``: ``lookupc-ed25519 <hex>``);
- ``lookupc compile ... --sign-key KEY`` writes ``signature.json``: the signature of the
  manifest's own sha256, which covers every file's sha256 and size;
- loading trusts the public keys given (``--trusted-key FILE``, repeatable;
  ``trusted_keys=`` in the API) and every ``*.pub`` in ``$LOOKUPC_TRUSTED_KEYS``
  (default ``~/.config/lookupc/trusted_keys``).

:func:`trust_of` says which holds: ``trusted`` (valid signature by a trusted key),
``untrusted`` (valid signature, unknown key), ``unsigned``, or ``invalid`` (a signature
that does not verify: refused always). ``lookupc.load`` runs an artifact's ``kernels.so``
only when ``trusted`` or when the user passes ``trust_artifact=True``
(``--trust-artifact``); otherwise it rebuilds the kernels on this machine from the kernel
shapes and schedule in the manifest (lookupc generates the TensorIR from them), so no
native code from the artifact runs. Requires ``cryptography`` (extra ``lookupc[sign]``)
for signing and for checking signatures; an unsigned artifact needs neither.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import LookupcError, LookupcInputError

__all__ = ["SIGNATURE", "Trust", "keygen", "sign_artifact", "trusted_keys", "trust_of"]

SIGNATURE = "signature.json"
_PUB_TAG = "lookupc-ed25519"


def _ed25519():
    from ..extras import require

    return require("cryptography.hazmat.primitives.asymmetric.ed25519",
                   "signing or checking artifact signatures")


def _serialization():
    from ..extras import require

    return require("cryptography.hazmat.primitives.serialization", "artifact signing keys")


def keygen(private_path: str | os.PathLike, overwrite: bool = False) -> tuple[Path, str]:
    """Write a new private key and ``<private_path>.pub``; returns (pub path, public hex)."""
    ed, ser = _ed25519(), _serialization()
    private_path = Path(private_path)
    pub_path = private_path.with_name(private_path.name + ".pub")
    for p in (private_path, pub_path):
        if p.exists() and not overwrite:
            raise LookupcInputError(f"{p} exists; pass --force to replace it")
    key = ed.Ed25519PrivateKey.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw).hex()
    pub_path.write_text(f"{_PUB_TAG} {public}\n")
    return pub_path, public


def _load_private(path: str | os.PathLike):
    ed, ser = _ed25519(), _serialization()
    try:
        key = ser.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise LookupcInputError(f"{path}: not a lookupc signing key ({err})") from None
    if not isinstance(key, ed.Ed25519PrivateKey):
        raise LookupcInputError(f"{path}: not an Ed25519 private key")
    return key


def _read_public(path: str | os.PathLike) -> str:
    try:
        tag, value = Path(path).read_text().split()[:2]
        if tag != _PUB_TAG or len(bytes.fromhex(value)) != 32:
            raise ValueError
    except (OSError, ValueError):
        raise LookupcInputError(f"{path}: not a lookupc public key (expected a line "
                                f"'{_PUB_TAG} <64 hex digits>')") from None
    return value


def sign_artifact(artifact_dir: str | os.PathLike, private_path: str | os.PathLike) -> str:
    """Sign an artifact (its manifest digest); writes ``signature.json``, returns the key hex."""
    ser = _serialization()
    key = _load_private(private_path)
    try:  # the artifact was just written and verified; read its digest directly
        digest = json.loads((Path(artifact_dir) / "manifest.json").read_text())["manifest_sha256"]
    except (OSError, ValueError, KeyError) as err:
        raise LookupcInputError(f"{artifact_dir}: no artifact manifest to sign ({err})") from None
    public = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw).hex()
    doc = {"algorithm": "ed25519", "public_key": public, "manifest_sha256": digest,
           "signature": key.sign(digest.encode()).hex()}
    out = Path(artifact_dir) / SIGNATURE
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    return public


def default_keys_dir() -> Path:
    return Path(os.environ.get("LOOKUPC_TRUSTED_KEYS",
                               Path.home() / ".config" / "lookupc" / "trusted_keys"))


def trusted_keys(paths=None) -> set[str]:
    """Public keys (hex) from ``paths`` (files) plus every ``*.pub`` in the keys directory."""
    keys = {_read_public(p) for p in (paths or [])}
    folder = default_keys_dir()
    if folder.is_dir():
        keys |= {_read_public(p) for p in sorted(folder.glob("*.pub"))}
    return keys


@dataclass(frozen=True)
class Trust:
    """``kind``: trusted | untrusted | unsigned | invalid; ``key``: signer (hex) if any."""

    kind: str
    key: str = ""
    detail: str = ""

    def describe(self) -> str:
        short = self.key[:16]
        return {"trusted": f"signed by trusted key {short}...",
                "untrusted": f"signed by key {short}..., which is not trusted here",
                "unsigned": "not signed",
                "invalid": f"signature does not verify ({self.detail})"}[self.kind]


def trust_of(artifact_dir: str | os.PathLike, manifest: dict, keys: set[str]) -> Trust:
    """Check ``signature.json`` against ``manifest`` (already verified) and ``keys``."""
    path = Path(artifact_dir) / SIGNATURE
    if not path.is_file():
        return Trust("unsigned")
    try:
        doc = json.loads(path.read_text())
        public, signature = doc["public_key"], bytes.fromhex(doc["signature"])
        if doc.get("algorithm") != "ed25519":
            return Trust("invalid", public, f"unknown algorithm {doc.get('algorithm')!r}")
    except (ValueError, KeyError, TypeError) as err:
        return Trust("invalid", "", f"unreadable {SIGNATURE}: {err}")
    if doc.get("manifest_sha256") != manifest.get("manifest_sha256"):
        return Trust("invalid", public, "it signs another manifest")
    ed = _ed25519()
    try:
        ed.Ed25519PublicKey.from_public_bytes(bytes.fromhex(public)).verify(
            signature, manifest["manifest_sha256"].encode())
    except Exception as err:  # noqa: BLE001 - InvalidSignature, bad key bytes
        return Trust("invalid", public, type(err).__name__)
    return Trust("trusted" if public in keys else "untrusted", public)


class SignatureError(LookupcError):
    """An artifact's signature does not verify: it was changed after signing."""
