"""The artifact's on-disk format: file names, manifest, writing and verifying.

Layout of an artifact directory (``lookupc compile ... -o DIR``)::

    DIR/
      manifest.json         what this is: versions, target, config, schedule, shapes, hashes
      model.pt2             torch.export program of the converted model (lookupc ops inside);
                            outputs flattened to a tuple of tensors (names in the manifest)
      kernels.so            TVM kernel library for the target (kernels.tar when cross-compiled
                            without a linker for the target: object files, linked at load)
      inputs.safetensors    the example inputs it was compiled with (``lookupc run DIR``
                            uses them when no --input is given)
      tokenizer/            the source model's tokenizer files, when it has them
                            (``lookupc run DIR --text``, ``Artifact.encode``: lookupc.artifact.text_io)

``manifest.json`` records the sha256 and size of every other file and a sha256 of its
own content. :func:`verify` checks all of it and says exactly what is wrong (a missing,
truncated or edited file, a version mismatch). :func:`write_artifact` writes a
directory; :mod:`lookupc.artifact.compile` fills it from a converted model and
:mod:`lookupc.artifact.load` loads it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..errors import LookupcError, LookupcInputError

__all__ = ["ArtifactError", "verify", "read_manifest", "write_artifact", "prepare_dir",
           "MANIFEST", "PROGRAM", "INPUTS", "FORMAT", "FORMAT_VERSION", "versions",
           "sha256_file"]

MANIFEST = "manifest.json"
PROGRAM = "model.pt2"
INPUTS = "inputs.safetensors"
FORMAT = "lookupc-artifact"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


class ArtifactError(LookupcError):
    """An artifact directory is missing, incomplete, modified or made for other versions."""


# --- hashing and versions -------------------------------------------------------------------

def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def versions() -> dict:
    """Versions that must match between the machine that compiled and the one that runs."""
    from .. import __version__
    from ..tvm_shim import tvm_version

    return {"lookupc": __version__, "torch": torch.__version__.split("+")[0],
            "tvm": tvm_version(), "python": platform.python_version()}


# Which versions must match exactly, and why (python is informational).
_VERSION_RULES = {
    "lookupc": "the op schemas and manifest format",
    "torch": "the torch.export program format",
    "tvm": "the kernel library ABI",
}


# --- writing --------------------------------------------------------------------------------

def write_artifact(out_dir: str | os.PathLike, *, program, example_inputs: tuple,
                   build_library: Callable[[str], str], manifest_fields: dict,
                   overwrite: bool = False, extra_files: dict | None = None) -> dict:
    """Write an artifact directory (see the module docstring) and return its manifest.

    Parameters
    ----------
    out_dir : path
        The directory to create. An existing directory is replaced only when
        ``overwrite`` is true and it is empty or is itself an artifact.
    program : torch.export.ExportedProgram
        The converted, exported model.
    example_inputs : tuple of Tensor
        Stored as ``inputs.safetensors``.
    build_library : callable
        ``build_library(path_without_suffix) -> written file path``: writes the kernel
        library (the suffix it picks, ``.so`` or ``.tar``, is kept).
    manifest_fields : dict
        Target, schedule, config, shapes, program description... merged into the manifest.
    extra_files : dict, optional
        ``{relative name: source path}`` copied in (e.g. ``tokenizer/vocab.txt``); hashed
        like every other file.
    """
    from .export import save_program
    from .tensor_files import save_inputs

    out = Path(out_dir)
    prepare_dir(out, overwrite)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_program(program, str(tmp / PROGRAM),
                     manifest_fields.get("program", {}).get("outputs", []))
        save_inputs(tuple(example_inputs), str(tmp / INPUTS))
        for name, src in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / name)
        library = Path(build_library(str(tmp / "kernels")))
        if library.parent != tmp or not library.is_file():
            raise ArtifactError(f"kernel library was not written into {tmp}: {library}")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"),
                    "versions": versions(), **manifest_fields}
        manifest["library"] = library.name
        manifest["files"] = {p.relative_to(tmp).as_posix(): {"sha256": sha256_file(p),
                                                             "bytes": p.stat().st_size}
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def prepare_dir(out: Path, overwrite: bool, marker: str = MANIFEST,
                what: str = "artifact") -> None:
    """Refuse ``out`` unless it is absent, empty, or a directory lookupc wrote (it holds
    ``marker``) that ``overwrite`` may replace. ``what`` names it in the messages (the
    sentence-transformers export uses this too)."""
    if out.exists() and not out.is_dir():
        raise LookupcInputError(f"-o {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise LookupcInputError(f"-o {out}: a non-empty directory that is not a lookupc "
                                    f"{what}; refusing to replace it")
        if not overwrite:
            raise LookupcInputError(f"-o {out}: {what} exists; pass --force to replace it")


# --- verifying ------------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict:
    """Parse ``DIR/manifest.json``; raise :class:`ArtifactError` naming what is wrong."""
    root = Path(path)
    if not root.exists():
        raise ArtifactError(f"{root}: no such artifact directory")
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a directory (an artifact is a directory made by "
                            f"'lookupc compile')")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root}: not a lookupc artifact ({MANIFEST} is missing)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{mpath}: corrupt manifest ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a lookupc artifact manifest")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise ArtifactError(f"{mpath}: the manifest was edited after it was written "
                            f"(its manifest_sha256 does not match its content)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: artifact format version {manifest.get('format_version')}"
                            f", this lookupc reads version {FORMAT_VERSION}")
    return manifest


def _check_files(root: Path, manifest: dict) -> list[str]:
    problems = []
    for name, meta in manifest.get("files", {}).items():
        p = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            problems.append(f"{name} is a path outside the artifact")
            continue
        if not p.is_file():
            problems.append(f"{name} is missing")
            continue
        size = p.stat().st_size
        if size != meta["bytes"]:
            what = "truncated" if size < meta["bytes"] else "longer than written"
            problems.append(f"{name} is {what} ({size} bytes, the manifest says "
                            f"{meta['bytes']})")
        elif sha256_file(p) != meta["sha256"]:
            problems.append(f"{name} was modified (sha256 {sha256_file(p)[:16]}..., the "
                            f"manifest says {meta['sha256'][:16]}...)")
    for required in (PROGRAM, manifest.get("library", "kernels.so")):
        if required not in manifest.get("files", {}):
            problems.append(f"the manifest lists no {required}")
    return problems


def _check_versions(manifest: dict) -> list[str]:
    have = versions()
    built = manifest.get("versions", {})
    return [f"built with {name} {built.get(name)}, this machine has {name} {have[name]} "
            f"({why} must match)"
            for name, why in _VERSION_RULES.items() if built.get(name) != have[name]]


def verify(path: str | os.PathLike, *, check_versions: bool = True) -> dict:
    """Check an artifact directory: manifest, every file's size and sha256, versions.

    Returns the manifest. Raises :class:`ArtifactError` listing every problem found.
    """
    root = Path(path)
    manifest = read_manifest(root)
    problems = _check_files(root, manifest)
    if check_versions:
        problems += _check_versions(manifest)
    if problems:
        raise ArtifactError(f"{root}: artifact failed verification: " + "; ".join(problems))
    return manifest
