"""The deployable artifact: an exported program, its kernel library and a manifest.

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
                            (``lookupc run DIR --text``, ``Artifact.encode``: lookupc.text_io)

``manifest.json`` records the sha256 and size of every other file and a sha256 of its
own content. :func:`verify` checks all of it and says exactly what is wrong (a missing,
truncated or edited file, a version mismatch); :func:`load` verifies, refuses a target
this machine cannot execute, loads the kernel library and returns an
:class:`Artifact`, a callable ``nn.Module`` that runs the program with its lookupc ops
dispatched to the library.

Token counts: the kernels are generic in the token count (one build serves every
batch x sequence length), and the program is exported with dynamic batch and sequence
dims where the model allows it (``manifest["program"]["dynamic_dims"]``); otherwise
the program accepts only the compiled input shapes and says so when called.
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

from .errors import LookupcError, LookupcInputError

__all__ = ["Artifact", "ArtifactError", "load", "verify", "write_artifact", "MANIFEST",
           "FORMAT", "FORMAT_VERSION", "versions", "sha256_file"]

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
    from . import __version__
    from .tvm_shim import tvm_version

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
    from .model_io import save_inputs, save_program

    out = Path(out_dir)
    _prepare_dir(out, overwrite)
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


def _prepare_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LookupcInputError(f"-o {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise LookupcInputError(f"-o {out}: a non-empty directory that is not a lookupc "
                                    f"artifact; refusing to replace it")
        if not overwrite:
            raise LookupcInputError(f"-o {out}: artifact exists; pass --force to replace it")


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


# --- loading and running --------------------------------------------------------------------

def load(path: str | os.PathLike, *, check_versions: bool = True, trusted_keys=None,
         trust_artifact: bool = False, rebuild_kernels: bool = False) -> "Artifact":
    """Verify and load an artifact directory; returns a callable :class:`Artifact`.

    Parameters
    ----------
    path : path
        Directory written by ``lookupc compile`` (or :func:`write_artifact`).
    check_versions : bool
        Refuse when lookupc/torch/TVM versions differ from those that built it.
    trusted_keys : list of paths, optional
        Public keys (``lookupc keygen``'s ``.pub``) whose signature makes the artifact's
        ``kernels.so`` loadable, besides those in ``$LOOKUPC_TRUSTED_KEYS``
        (:mod:`lookupc.signing`).
    trust_artifact : bool
        Load ``kernels.so`` even when it is not signed by a trusted key.
    rebuild_kernels : bool
        Never load ``kernels.so``: rebuild the kernels on this machine (what happens anyway
        for an artifact not signed by a trusted key, unless ``trust_artifact``).

    ``model.pt2`` is checked before it is deserialised (:mod:`lookupc.pt2_safety`):
    ``torch.export.load`` can unpickle, and archives that would are refused.

    Raises
    ------
    ArtifactError
        Verification failed, a signature does not verify, or this machine cannot execute
        the target's code (another architecture, or instruction-set extensions this CPU
        lacks).

    Examples
    --------
    >>> model = lookupc.load("tiny_bert.lookupc")          # doctest: +SKIP
    >>> outputs = model(*model.example_inputs)             # doctest: +SKIP
    """
    from .targets import TargetSpec, can_execute

    root = Path(path)
    manifest = verify(root, check_versions=check_versions)
    spec = TargetSpec.from_dict(manifest["target"])
    ok, why = can_execute(spec)
    if not ok:
        raise ArtifactError(f"{root}: cannot run this artifact here: {why}. Run it on a "
                            f"machine of its target ({manifest.get('target_string', spec)}), "
                            f"or compile for this one (lookupc compile ... --target host)")
    from . import signing

    trust = signing.trust_of(root, manifest, signing.trusted_keys(trusted_keys)
                             if (root / signing.SIGNATURE).is_file() else set())
    if trust.kind == "invalid":
        raise ArtifactError(f"{root}: {trust.describe()}: the artifact was changed after it "
                            f"was signed; refusing to load it")
    native = (trust.kind == "trusted" or trust_artifact) and not rebuild_kernels
    return Artifact(root, manifest, trust=trust, native=native)


class Artifact(torch.nn.Module):
    """A loaded artifact, an ``nn.Module``: call it like the model (positional inputs);
    it returns the tuple of outputs.

    Attributes
    ----------
    path : Path
    manifest : dict
    program : torch.export.ExportedProgram
    output_names : list of str
    example_inputs : tuple of Tensor
        The inputs stored at compile time.
    schedule_name : str
        The dispatch schedule name under which the library's kernels are registered.
    """

    def __init__(self, path: Path, manifest: dict, trust=None, native: bool = True):
        from . import (
            dispatch,
            ops,  # noqa: F401  (registers torch.ops.lookupc before loading)
        )
        from .model_io import load_inputs

        super().__init__()
        from .pt2_safety import check_pt2

        self.path, self.manifest = Path(path), manifest
        check_pt2(self.path / PROGRAM)  # torch.export.load can unpickle: refuse such archives
        self.program = torch.export.load(str(self.path / PROGRAM))
        self.module = self.program.module()
        self.output_names = list(manifest.get("program", {}).get("outputs", []))
        self.example_inputs = load_inputs(str(self.path / INPUTS)) \
            if (self.path / INPUTS).is_file() else ()
        self.trust = trust
        self.kernel_source = ("artifact kernels.so" if native else
                              "rebuilt on this machine (no native code from the artifact)")
        self.provider = (_load_provider(self.path / manifest["library"], manifest) if native
                         else _rebuilt_provider(manifest))
        self.schedule_name = f"artifact-{manifest['files'][manifest['library']]['sha256'][:12]}"
        provider = self.provider
        dispatch.register_provider(self.schedule_name, lambda: provider)

    def forward(self, *inputs) -> tuple:
        """Run the program with this artifact's kernels; returns the tuple of outputs."""
        return self.run(*inputs)

    def run(self, *inputs, schedule: str | None = None) -> tuple:
        """Run with the library's kernels, or with ``schedule`` (e.g. ``"reference"``)."""
        from . import dispatch

        self._check_inputs(inputs)
        try:
            with torch.no_grad(), dispatch.set_schedule(schedule or self.schedule_name):
                out = self.module(*inputs)
        except (AssertionError, IndexError, RuntimeError) as err:
            # e.g. a sequence longer than the model's positions: torch.export's guard
            # (AssertionError) or the embedding lookup (IndexError) fails deep inside
            text = " ".join(str(err).split())[:300] or type(err).__name__
            shapes = ", ".join(str(tuple(t.shape)) for t in inputs if hasattr(t, "shape"))
            compiled = ", ".join(str(tuple(e["shape"])) for e in
                                 self.manifest.get("program", {}).get("inputs", []))
            raise LookupcInputError(
                f"the artifact cannot run inputs of shape {shapes} (compiled with {compiled}; "
                f"a sequence longer than the model's positions is the usual cause): "
                f"{type(err).__name__}: {text}") from err
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    @property
    def tokenizer(self):
        """The tokenizer bundled in the artifact (``tokenizer/``); an error says when there
        is none (:func:`lookupc.text_io.load_tokenizer`)."""
        if getattr(self, "_tokenizer", None) is None:
            from .text_io import load_tokenizer

            self._tokenizer = load_tokenizer(self.path, self.manifest)
        return self._tokenizer

    def encode(self, sentences, batch_size: int = 32, normalize: bool | None = None,
               convert_to_tensor: bool = False, schedule: str | None = None):
        """Sentence embeddings of ``sentences`` (a string or a list of strings).

        Tokenises with the bundled tokenizer (texts longer than the model takes are
        truncated with a :class:`lookupc.text_io.TextTruncatedWarning`), runs the program in
        batches of ``batch_size``, pools as the manifest's ``embedding`` says (mean over
        the attention mask unless the source was a sentence-transformers model with other
        pooling) and L2-normalises when the source had a ``Normalize`` module
        (``normalize=True/False`` overrides). Returns a float32 numpy array ``[n, dim]``
        (``[dim]`` for one string), or a ``torch.Tensor`` with ``convert_to_tensor=True``;
        ``schedule="reference"`` runs the PyTorch reference ops instead of the kernels.
        """
        from .text_io import encode

        return encode(self, sentences, batch_size=batch_size, normalize=normalize,
                      convert_to_tensor=convert_to_tensor, schedule=schedule)

    def _check_inputs(self, inputs: tuple) -> None:
        expected = self.manifest.get("program", {}).get("inputs", [])
        if expected and len(inputs) != len(expected):
            names = ", ".join(e["name"] for e in expected)
            raise LookupcInputError(f"the artifact takes {len(expected)} inputs ({names}), "
                                    f"got {len(inputs)}")

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Artifact({str(self.path)!r}, target={m.get('target_string')!r}, "
                f"schedule={m.get('schedule')!r}, ffns={len(m.get('config', []))})")


def _load_provider(library: Path, manifest: dict) -> "LibraryProvider":
    from . import kernels

    shapes = [kernels.KernelShapes(**d) for d in manifest.get("kernels", [])]
    return LibraryProvider(kernels.load_library(str(library)), shapes)


class _RebuiltLibrary:
    """Kernels for an artifact's shapes built here (no native code from the artifact)."""

    def __init__(self, manifest: dict):
        from .targets import TargetSpec

        self.target = TargetSpec.from_dict(manifest["target"]).to_tvm()
        self.schedule = {"hand": "cpu"}.get(manifest.get("schedule"), manifest.get("schedule"))

    def kernels(self, shapes):
        from . import kernels

        return kernels.build(shapes, target=self.target, schedule=self.schedule)


def _rebuilt_provider(manifest: dict) -> "LibraryProvider":
    from . import kernels

    shapes = [kernels.KernelShapes(**d) for d in manifest.get("kernels", [])]
    return LibraryProvider(_RebuiltLibrary(manifest), shapes)


class LibraryProvider:
    """A :mod:`lookupc.dispatch` provider whose hash and gather run an artifact's kernels.

    The library holds one hash/gather pair per LookupFFN shape (``shapes``, from the
    manifest); each op call is matched to its pair by the sizes of its arguments. The
    kernels take float32 CPU tensors (others use the reference, as dispatch does); a
    call whose sizes were not compiled raises instead of running something else.
    """

    def __init__(self, library, shapes: list):
        self.library, self.shapes = library, list(shapes)
        self._kernels: dict = {}

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype == torch.float32

    def _get(self, shapes):
        k = self._kernels.get(shapes)
        if k is None:
            k = self._kernels[shapes] = self.library.kernels(shapes)
        return k

    def _find(self, what: str, **sizes):
        for s in self.shapes:
            if all(getattr(s, k) == v for k, v in sizes.items()):
                return self._get(s)
        have = "; ".join(s.key for s in self.shapes)
        raise LookupcError(f"the artifact has no {what} kernel for "
                           f"{', '.join(f'{k}={v}' for k, v in sizes.items())} (it was compiled "
                           f"for {have})")

    def hash(self, x, weight, hash_bias, decay, bits):
        r, _, _, bs, _ = weight.shape
        kernels = self._find("hash", d_in=x.shape[1], tables=hash_bias.shape[0] // bits,
                             bits=bits, block_size=bs, repeats=r)
        return kernels.hash(x, weight, hash_bias, decay)

    def gather(self, codes, scores, tables, bias, scale=None):
        from .kernels import table_dtype_of

        h, rows, d_out = tables.shape
        kernels = self._find("gather", tables=h, bits=rows.bit_length() - 1, d_out=d_out,
                             table_dtype=table_dtype_of(tables))
        return kernels.gather(codes.to(torch.int32), scores, tables, bias, scale)

    def gather_quantized(self, codes, scores, tables, scale, bias):
        return self.gather(codes, scores, tables, bias, scale)


# --- compiling --------------------------------------------------------------------------------

TOKEN_RULE = ("kernels are generic in the token count; the program accepts any batch and "
              "sequence length when program.dynamic_dims is true, else only the compiled "
              "input shapes")


def lookup_shapes(module: torch.nn.Module) -> list:
    """Distinct :class:`lookupc.kernels.KernelShapes` of the LookupFFNs in ``module``, in
    module order: LookupFFN submodules, or for an exported program (a ``.pt2`` that
    ``lookupc convert`` wrote) the ``lookupc.hash``/``gather`` calls in its graphs."""
    shapes = []
    for named in _lookup_modules(module) or _graph_lookups(module):
        s = _kernel_shapes(named[1])
        if s not in shapes:
            shapes.append(s)
    return shapes


class GraphLookup:
    """The sizes of one LookupFFN read off a ``lookupc.hash`` -> ``lookupc.gather`` pair."""

    def __init__(self, hash_node, gather_node):
        x, weight, hash_bias, decay, bits = hash_node.args[:5]
        r, _, _, bs, _ = weight.meta["val"].shape
        self.d_in, self.repeats = int(x.meta["val"].shape[-1]), int(r)
        self.tables = int(hash_bias.meta["val"].shape[0]) // int(bits)
        tables = gather_node.args[2].meta["val"]
        self.d_out = int(tables.shape[-1])
        from .config import LookupConfig

        self.config = LookupConfig(self.tables, int(bits), int(bs), float(decay),
                                   str(tables.dtype).replace("torch.", ""))


def _graph_lookups(module: torch.nn.Module) -> list:
    """``[(node name, GraphLookup)]`` for every lookupc.hash node in ``module``'s fx graphs."""
    hash_op = torch.ops.lookupc.hash.default
    gather_ops = (torch.ops.lookupc.gather.default, torch.ops.lookupc.gather_quantized.default)
    found = []
    for m in module.modules():
        graph = getattr(m, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.target is not hash_op:
                continue
            gathers = [u for g in node.users for u in g.users if u.target in gather_ops]
            if gathers:
                found.append((node.name, GraphLookup(node, gathers[0])))
    return found


def _kernel_shapes(m):
    from .kernels import KernelShapes
    from .module import LookupFFN

    if isinstance(m, LookupFFN):
        return KernelShapes.of(m)
    return KernelShapes.for_config(m.d_in, m.d_out, m.config)


class AlreadyConverted:
    """Stands in for a ConversionResult when MODEL already holds lookupc ops (a .pt2 from
    ``lookupc convert``): compiled as it is."""

    def __init__(self, module: torch.nn.Module, count: int):
        self.module = module
        self.report = (f"MODEL is already converted: {count} LookupFFN(s) as lookupc ops in "
                       f"its program; used as it is, not converted again")


def already_converted(module: torch.nn.Module) -> "AlreadyConverted | None":
    """An :class:`AlreadyConverted` when ``module``'s graphs call lookupc ops, else None."""
    found = _graph_lookups(module)
    return AlreadyConverted(module, len(found)) if found else None


def _library_suffix(spec) -> str:
    """``.so`` when this machine can link for the target, else ``.tar`` (objects)."""
    from .targets import host_target

    return ".so" if spec.arch == host_target().arch and shutil.which(
        os.environ.get("CXX", "g++")) else ".tar"


def _input_meta(loaded) -> list[dict]:
    names = loaded.input_names or [f"input_{i}" for i in range(len(loaded.example_inputs))]
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for n, t in zip(names, loaded.example_inputs)]


def compile_artifact(result, loaded, spec, out_dir, *, schedule: str = "hand",
                     tuning_db: str | None = None, overwrite: bool = False,
                     progress: bool = False, exported: tuple | None = None,
                     sign_key: str | None = None) -> tuple[dict, str]:
    """Export a converted model, build its kernels for ``spec`` and write an artifact.

    Parameters
    ----------
    result : lookupc.ConversionResult
        From :func:`lookupc.convert` (``.module`` holds the LookupFFNs, ``.report``).
    loaded : lookupc.model_io.LoadedModel
        The original model's description and example inputs.
    spec : lookupc.targets.TargetSpec
        Where the kernels will run.
    out_dir : path
        Artifact directory to write.
    schedule : str
        ``"naive"``, ``"hand"`` (= ``"cpu"``) or ``"tuned"`` (needs ``tuning_db``).
    exported : tuple, optional
        What :func:`lookupc.model_io.export_program` returned for ``result.module``, to
        compile one export for several targets without exporting again.
    sign_key : path, optional
        Ed25519 private key (``lookupc keygen``): writes ``signature.json``
        (:mod:`lookupc.signing`).

    Returns
    -------
    manifest : dict
    check : str
        One line: how the artifact's outputs compare with the converted model in
        PyTorch on the example inputs, or why that check could not run here.

    Raises
    ------
    lookupc.errors.OutputMismatchError
        When the check runs and the outputs differ beyond the float32 tolerance of
        :mod:`lookupc.output_check` (the artifact stays on disk, named in the message).
    """
    from . import kernels
    from .model_io import export_program
    from .progress import progress as progress_bar
    from .targets import can_execute

    shapes = lookup_shapes(result.module)
    if not shapes:
        raise LookupcInputError(f"{loaded.source}: no FFN was converted, nothing to compile "
                                f"(see 'lookupc inspect' for why each FFN was skipped)")
    _prepare_dir(Path(out_dir), overwrite)
    from .text_io import text_fields

    text, extra_files = text_fields(loaded)  # a tokenizer that does not fit fails here
    bar = progress_bar(total=3 + len(shapes), desc="compile", unit="step",
                       disable=not progress, leave=False)
    bar.set_postfix_str("torch.export")
    program, names, flattened, dynamic = exported or export_program(result.module,
                                                                    loaded.example_inputs)
    recorded = loaded.info.get("output_names")  # a .pt2 MODEL written by lookupc convert
    names = list(recorded) if recorded and len(recorded) == len(names) else names
    bar.update(1)

    def build_library(stem: str) -> str:
        path = stem + _library_suffix(spec)
        bar.set_postfix_str(f"TVM kernels for {len(shapes)} shape(s), {schedule}")
        kernels.export_library(shapes, spec.to_tvm(), schedule, path, tuning_db=tuning_db)
        bar.update(len(shapes))
        return path

    report = result.report.to_dict() if hasattr(result.report, "to_dict") else str(result.report)
    fields = {
        "target": spec.to_dict(), "target_string": str(spec), "schedule": schedule,
        "tuning_db": os.path.abspath(tuning_db) if tuning_db else None,
        "kernels": [_shape_dict(s) for s in shapes],
        "config": [_config_of(m) for m in (_lookup_modules(result.module)
                                            or _graph_lookups(result.module))],
        "program": {"file": PROGRAM, "inputs": _input_meta(loaded), "outputs": names,
                    "outputs_flattened": flattened, "dynamic_dims": dynamic,
                    "token_rule": TOKEN_RULE},
        "model": {"source": loaded.source, "kind": loaded.kind, **_jsonable(loaded.info)},
        "conversion": report,
        **text,
    }
    bar.set_postfix_str("writing")
    manifest = write_artifact(out_dir, program=program, example_inputs=loaded.example_inputs,
                              build_library=build_library, manifest_fields=fields,
                              overwrite=overwrite, extra_files=extra_files)
    if sign_key:
        from .signing import sign_artifact

        sign_artifact(out_dir, sign_key)
    bar.update(1)
    ok, why = can_execute(spec)
    if ok:
        bar.set_postfix_str("checking")
        # the library this process just built is checked as it is (trusted by construction)
        outcome = check_against(load(out_dir, trust_artifact=True), result.module,
                                loaded.example_inputs)
        check = outcome.line(_CHECK_WHAT)
    else:
        outcome, check = None, f"check   not run: this machine cannot execute the target ({why})"
    bar.update(1)
    bar.close()
    if outcome is not None:
        outcome.raise_if_failed(_CHECK_WHAT, f"; the artifact written to {out_dir} computes "
                                f"wrong outputs on this machine: do not deploy it")
    return manifest, check


_CHECK_WHAT = "artifact vs converted model in PyTorch on the example inputs"


def check_against(artifact: "Artifact", module: torch.nn.Module, inputs: tuple):
    """Compare the artifact's outputs with ``module``'s on the PyTorch reference ops.

    Returns a :class:`lookupc.output_check.OutputCheck`; ``.line(...)`` describes it.
    """
    from . import dispatch
    from .model_io import flatten_outputs
    from .output_check import compare_outputs

    got = artifact(*inputs)
    with torch.no_grad(), dispatch.set_schedule("reference"):
        want = flatten_outputs(module(*inputs))[0]
    return compare_outputs(got, want)


def _lookup_modules(module: torch.nn.Module) -> list:
    from .module import LookupFFN

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LookupFFN)]


def _config_of(named) -> dict:
    name, m = named
    return {"module": name, "d_in": m.d_in, "d_out": m.d_out, **m.config.to_dict()}


def _shape_dict(s) -> dict:
    from dataclasses import asdict

    return asdict(s)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
