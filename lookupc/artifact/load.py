"""A loaded artifact: :func:`load` and the :class:`Artifact` it returns.

:func:`load` verifies an artifact directory (:func:`lookupc.artifact.format.verify`),
refuses a target this machine cannot execute, loads the kernel library (or rebuilds the
kernels here when the library is not signed by a trusted key) and returns an
:class:`Artifact`, a callable ``nn.Module`` that runs the program with its lookupc ops
dispatched to the library through a :class:`LibraryProvider`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..errors import LookupcError, LookupcInputError
from .format import INPUTS, PROGRAM, ArtifactError, verify

__all__ = ["Artifact", "ArtifactError", "LibraryProvider", "load"]


def load(path: str | os.PathLike, *, check_versions: bool = True, trusted_keys=None,
         trust_artifact: bool = False, rebuild_kernels: bool = False,
         rest_dtype: str | None = None) -> "Artifact":
    """Verify and load an artifact directory; returns a callable :class:`Artifact`.

    Parameters
    ----------
    path : path
        Directory written by ``lookupc compile`` (or
        :func:`lookupc.artifact.format.write_artifact`).
    check_versions : bool
        Refuse when lookupc/torch/TVM versions differ from those that built it.
    trusted_keys : list of paths, optional
        Public keys (``lookupc keygen``'s ``.pub``) whose signature makes the artifact's
        ``kernels.so`` loadable, besides those in ``$LOOKUPC_TRUSTED_KEYS``
        (:mod:`lookupc.artifact.signing`).
    trust_artifact : bool
        Load ``kernels.so`` even when it is not signed by a trusted key.
    rebuild_kernels : bool
        Never load ``kernels.so``: rebuild the kernels on this machine (what happens anyway
        for an artifact not signed by a trusted key, unless ``trust_artifact``).
    rest_dtype : {"float32", "int8", "bfloat16"}, optional
        Precision of the model's remaining linear layers (attention projections, pooler,
        FFNs left dense; :mod:`lookupc.compose`). Default: what ``lookupc compile
        --rest-dtype`` recorded in the manifest (``float32`` for older artifacts).

    ``model.pt2`` is checked before it is deserialised (:mod:`lookupc.artifact.pt2_safety`):
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
    from ..targets import TargetSpec, can_execute

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
    return Artifact(root, manifest, trust=trust, native=native, rest_dtype=rest_dtype)


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
    rest_dtype : str
        Precision the model's remaining linear layers run in; ``rest_linears`` how many.
    """

    def __init__(self, path: Path, manifest: dict, trust=None, native: bool = True,
                 rest_dtype: str | None = None):
        from .. import (
            dispatch,
            ops,  # noqa: F401  (registers torch.ops.lookupc before loading)
        )
        from .tensor_files import load_inputs

        super().__init__()
        from .pt2_safety import check_pt2

        self.path, self.manifest = Path(path), manifest
        check_pt2(self.path / PROGRAM)  # torch.export.load can unpickle: refuse such archives
        self.program = torch.export.load(str(self.path / PROGRAM))
        self.module = self.program.module()
        from ..compose import quantize_rest_graph

        self.rest_dtype = rest_dtype or manifest.get("rest", {}).get("dtype", "float32")
        self.rest_linears = quantize_rest_graph(self.module, self.rest_dtype)
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
        provider.name = self.schedule_name
        dispatch.register_provider(self.schedule_name, lambda: provider)

    @contextlib.contextmanager
    def float32_rest(self):
        """Within the block the remaining linear layers run in float32 whatever
        ``rest_dtype`` is: what output checks use, so that they test the kernels (an int8
        rest can round a slightly different activation to another step)."""
        if self.rest_dtype == "float32":
            yield self
            return
        if getattr(self, "_float_module", None) is None:
            self._float_module = self.program.module()
        rest, self.module = self.module, self._float_module
        try:
            yield self
        finally:
            self.module = rest

    def forward(self, *inputs) -> tuple:
        """Run the program with this artifact's kernels; returns the tuple of outputs."""
        return self.run(*inputs)

    def run(self, *inputs, schedule: str | None = None) -> tuple:
        """Run with the library's kernels, or with ``schedule`` (e.g. ``"reference"``)."""
        from .. import dispatch

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
        is none (:func:`lookupc.artifact.text_io.load_tokenizer`)."""
        if getattr(self, "_tokenizer", None) is None:
            from .text_io import load_tokenizer

            self._tokenizer = load_tokenizer(self.path, self.manifest)
        return self._tokenizer

    def encode(self, sentences, batch_size: int = 32, normalize: bool | None = None,
               convert_to_tensor: bool = False, schedule: str | None = None):
        """Sentence embeddings of ``sentences`` (a string or a list of strings).

        Tokenises with the bundled tokenizer (texts longer than the model takes are
        truncated with a :class:`lookupc.artifact.text_io.TextTruncatedWarning`), runs the program in
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
    from ..kernels.shapes import KernelShapes
    from ..runtime.build import load_library

    shapes = [KernelShapes(**d) for d in manifest.get("kernels", [])]
    return LibraryProvider(load_library(str(library)), shapes)


class _RebuiltLibrary:
    """Kernels for an artifact's shapes built here (no native code from the artifact)."""

    def __init__(self, manifest: dict):
        from ..targets import TargetSpec

        self.target = TargetSpec.from_dict(manifest["target"]).to_tvm()
        self.schedule = {"hand": "cpu"}.get(manifest.get("schedule"), manifest.get("schedule"))

    def kernels(self, shapes):
        from ..runtime.build import build

        return build(shapes, target=self.target, schedule=self.schedule)


def _rebuilt_provider(manifest: dict) -> "LibraryProvider":
    from ..kernels.shapes import KernelShapes

    shapes = [KernelShapes(**d) for d in manifest.get("kernels", [])]
    return LibraryProvider(_RebuiltLibrary(manifest), shapes)


class LibraryProvider:
    """A :mod:`lookupc.dispatch` provider whose hash and gather run an artifact's kernels.

    The library holds one hash/gather pair per LookupFFN shape (``shapes``, from the
    manifest); each op call is matched to its pair by the sizes of its arguments. The
    kernels take float32 CPU tensors (others use the reference, as dispatch does); a
    call whose sizes were not compiled raises instead of running something else.
    """

    name = "artifact"  # a loaded Artifact names it after its schedule, artifact-<sha256>

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
        from ..runtime.compiled import table_dtype_of

        h, rows, d_out = tables.shape
        kernels = self._find("gather", tables=h, bits=rows.bit_length() - 1, d_out=d_out,
                             table_dtype=table_dtype_of(tables))
        return kernels.gather(codes.to(torch.int32), scores, tables, bias, scale)

    def gather_quantized(self, codes, scores, tables, scale, bias):
        return self.gather(codes, scores, tables, bias, scale)
