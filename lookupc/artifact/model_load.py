"""Reading a MODEL argument of the ``lookupc`` command into a :class:`LoadedModel`.

A MODEL argument is one of

- a Hugging Face model directory (``config.json`` + ``*.safetensors``), loaded with
  ``AutoModel.from_pretrained(..., local_files_only=True)`` -- never downloaded;
- a ``torch.export`` program (``.pt2``), whose stored example inputs are used;
- ``package.module:factory``, a function returning ``(model, example_inputs)``;
- a pickled ``.pt``/``.pth``/``.bin`` -- refused unless ``trust_pickle=True``
  (``--trust-pickle``), because unpickling runs arbitrary code.

Example inputs come from the factory, from the ``.pt2`` file, or for a Hugging Face
model from its config: ``input_ids`` of shape ``[batch, seq_len]`` drawn from the
vocabulary (seeded) and an all-ones ``attention_mask``.

A ``.pt2`` that lookupc wrote (:func:`lookupc.artifact.export.save_program`) also gives
the names of its flattened outputs (``info["output_names"]``).

Size: one loader per MODEL kind listed above (50-100 lines each) behind
:func:`load_model`, which dispatches on :func:`describe_model_spec`; the factory and
pickle loaders share ``_split_model_inputs`` and make this directory importable the same
way.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LookupcInputError
from .export import PT2_EXTRA

__all__ = ["LoadedModel", "load_model", "describe_model_spec"]

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")
MODEL_HELP = ("a Hugging Face model dir (config.json + safetensors), a torch.export .pt2 "
              "file, or package.module:factory returning (model, example_inputs)")


@dataclass
class LoadedModel:
    """A model ready for the frontend: module in eval mode plus positional example inputs.

    Attributes
    ----------
    module : torch.nn.Module
    example_inputs : tuple
        Positional arguments for ``module``.
    kind : str
        ``"hf"``, ``"pt2"``, ``"factory"`` or ``"pickle"``.
    source : str
        The MODEL argument as given.
    input_names : list of str
        Names of the positional inputs (for messages and the artifact manifest).
    info : dict
        Extra facts worth recording (HF architecture, config sizes ...).
    """

    module: Any
    example_inputs: tuple
    kind: str
    source: str
    input_names: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def output_names_for(self, names: list[str]) -> list[str]:
        """The names a .pt2 MODEL recorded for its outputs, else ``names`` (those found by
        flattening the outputs)."""
        recorded = self.info.get("output_names")
        return list(recorded) if recorded and len(recorded) == len(names) else names

    def outputs_kind(self) -> str:
        """What the model returns when its outputs need flattening, in words."""
        return "a Hugging Face output object" if self.kind == "hf" else "a nested output"


def _fail(msg: str) -> None:
    raise LookupcInputError(msg)


def describe_model_spec(spec: str) -> str:
    """Which kind of MODEL ``spec`` is (``hf``/``pt2``/``pickle``/``factory``); raises if none."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "modules.json").is_file():
            _fail(f"{spec}: a directory but not a Hugging Face model (no config.json); MODEL is "
                  f"{MODEL_HELP}")
        return "hf"
    if path.is_file():
        if path.suffix == ".pt2":
            return "pt2"
        if path.suffix in _PICKLE_SUFFIXES:
            return "pickle"
        _fail(f"{spec}: unknown model file type {path.suffix!r}; MODEL is {MODEL_HELP}")
    if _FACTORY_RE.match(spec) and os.path.sep not in spec:
        return "factory"
    _fail(f"{spec}: no such file or directory; MODEL is {MODEL_HELP}")
    raise AssertionError  # unreachable


def load_model(spec: str, *, batch: int = 2, seq_len: int = 32,
               trust_pickle: bool = False) -> LoadedModel:
    """Load MODEL ``spec`` (see the module docstring) with its example inputs.

    Parameters
    ----------
    spec : str
        Path or ``package.module:factory``.
    batch, seq_len : int
        Size of the token batch made for Hugging Face models (and passed to factories
        that take ``batch``/``seq_len`` keyword arguments).
    trust_pickle : bool
        Allow unpickling a ``.pt`` file (runs code from the file).

    Raises
    ------
    LookupcInputError
        Nonexistent path, unknown file type, pickle without ``trust_pickle``, a factory
        that cannot be imported or returns the wrong thing.
    """
    if batch < 1 or seq_len < 1:
        _fail(f"--batch and --seq-len must be >= 1, got batch={batch}, seq_len={seq_len}")
    kind = describe_model_spec(spec)
    loader = {"hf": _load_hf, "pt2": _load_pt2, "factory": _load_factory,
              "pickle": _load_pickle}[kind]
    if kind == "pickle":
        return loader(spec, trust_pickle=trust_pickle, batch=batch, seq_len=seq_len)
    if kind == "pt2":
        return loader(spec)
    return loader(spec, batch=batch, seq_len=seq_len)


# --- Hugging Face ---------------------------------------------------------------------------

def _load_hf(spec: str, *, batch: int, seq_len: int) -> LoadedModel:
    path = Path(spec)
    if (path / "modules.json").is_file():  # a sentence-transformers directory
        return _load_st(spec, batch=batch, seq_len=seq_len)
    loaded = _load_hf_weights(spec, batch=batch, seq_len=seq_len)
    from .text_io import EmbeddingSpec

    positions = getattr(loaded.module.config, "max_position_embeddings", None)
    loaded.info["embedding"] = EmbeddingSpec(max_length=positions).to_dict()
    return loaded


def _load_st(spec: str, *, batch: int, seq_len: int) -> LoadedModel:
    """A sentence-transformers directory: its Transformer (HF weights, or the program that
    ``lookupc convert --format sentence-transformers`` wrote) plus pooling and normalisation
    (:mod:`lookupc.artifact.st_format`)."""
    from .st_format import read_st_dir

    st = read_st_dir(spec)
    where = st["transformer_dir"]
    marker = st["lookupc"]
    if marker:
        loaded = _load_pt2(str(where / marker.get("program", "model.pt2")))
        loaded.source, loaded.kind = spec, "pt2"
        loaded.info["vocab_rows"] = marker.get("vocab_rows")
        names = marker.get("input_names") or []
        if len(names) == len(loaded.example_inputs):
            loaded.input_names = list(names)
    else:
        if not (where / "config.json").is_file():
            _fail(f"{where}: the sentence-transformers Transformer directory has no config.json")
        loaded = _load_hf_weights(str(where), batch=batch, seq_len=seq_len)
        loaded.source = spec
    loaded.info.update({"sentence_transformers": True, "embedding": st["embedding"],
                        "tokenizer_dir": loaded.info.get("tokenizer_dir") or str(where)})
    return loaded


def _load_hf_weights(spec: str, *, batch: int, seq_len: int) -> LoadedModel:
    path = Path(spec)
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = (f" (it has {', '.join(pickled)}: pickled weights are not loaded; re-save with "
                f"save_pretrained(safe_serialization=True))" if pickled else "")
        _fail(f"{spec}: no *.safetensors weights in the model directory{hint}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from ..extras import require

    transformers = require("transformers", "loading a Hugging Face model directory")
    AutoConfig, AutoModel = transformers.AutoConfig, transformers.AutoModel  # noqa: N806

    try:
        config = AutoConfig.from_pretrained(spec, local_files_only=True)
        model = AutoModel.from_pretrained(spec, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, KeyError) as err:
        _fail(f"{spec}: cannot load the Hugging Face model: {str(err).splitlines()[0]}")
    model.eval()
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 1:
        _fail(f"{spec}: config.json has no vocab_size; give the model as a factory instead")
    max_len = getattr(config, "max_position_embeddings", None)
    if max_len and seq_len > max_len:
        _fail(f"--seq-len={seq_len} exceeds the model's max_position_embeddings={max_len}")
    inputs, names = _hf_example_inputs(model, vocab, batch, seq_len)
    info = {"architecture": type(model).__name__, "model_type": getattr(config, "model_type", ""),
            "hidden_size": getattr(config, "hidden_size", None),
            "intermediate_size": getattr(config, "intermediate_size", None),
            "layers": getattr(config, "num_hidden_layers", None), "weights": weights,
            "tokenizer_dir": str(path.resolve()), "vocab_rows": _embedding_rows(model, vocab)}
    return LoadedModel(model, inputs, "hf", spec, names, info)


def _embedding_rows(model, vocab: int) -> int:
    """Rows of the model's token embedding (what a tokenizer's ids must stay below)."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        return vocab


def _hf_example_inputs(model, vocab: int, batch: int, seq_len: int) -> tuple[tuple, list]:
    """Seeded token ids (and an all-ones attention mask when the model takes one)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    inputs: tuple = (ids,)
    names = ["input_ids"]
    if "attention_mask" in inspect.signature(model.forward).parameters:
        inputs += (torch.ones(batch, seq_len, dtype=torch.long),)
        names.append("attention_mask")
    return inputs, names


# --- torch.export programs ------------------------------------------------------------------

def _load_pt2(spec: str) -> LoadedModel:
    import torch

    from .pt2_safety import check_pt2

    check_pt2(spec)  # torch.export.load can unpickle: refuse such archives first
    _ensure_lookupc_ops()
    extra = {PT2_EXTRA: ""}
    try:
        ep = torch.export.load(spec, extra_files=extra)
    except Exception as err:  # noqa: BLE001 -- torch raises many kinds here
        _fail(f"{spec}: not a loadable torch.export program: {type(err).__name__}: "
              f"{str(err).splitlines()[0] if str(err) else ''}")
    example = getattr(ep, "example_inputs", None)
    if not example:
        _fail(f"{spec}: the program stores no example inputs; re-export it with torch.export "
              f"(which records them) or use the original model")
    args, kwargs = example
    if kwargs:
        _fail(f"{spec}: keyword example inputs ({', '.join(kwargs)}) are not supported; export "
              f"with positional inputs")
    names = [getattr(s.arg, "name", f"input_{i}")
             for i, s in enumerate(ep.graph_signature.input_specs) if s.kind.name == "USER_INPUT"]
    info = {"exported_program": True}
    if extra[PT2_EXTRA]:
        info.update(json.loads(extra[PT2_EXTRA]))  # output names written by export.save_program
    return LoadedModel(_Unlifted.wrap(ep.module(), names), tuple(args), "pt2", spec, names, info)


class _Unlifted:
    """``ep.module()`` refuses ``.eval()``/``.train()``, which the frontend calls. Wrap it in
    a module whose ``train(mode)`` only records the flag (export already fixed dropout and
    batch-norm modes) and whose ``forward`` has the program's positional parameters (fx
    cannot trace a ``*args`` forward)."""

    @staticmethod
    def wrap(graph_module, names: list[str]):
        import torch

        args = ", ".join(n if n.isidentifier() else f"input_{i}" for i, n in enumerate(names))
        namespace: dict = {}
        exec(f"def forward(self, {args}):\n    return self.program({args})\n", namespace)

        class ExportedModule(torch.nn.Module):
            forward = namespace["forward"]

            def __init__(self, program):
                super().__init__()
                self.program = program

            def train(self, mode: bool = True):
                self.training = mode
                return self

        return ExportedModule(graph_module)


def _ensure_lookupc_ops() -> None:
    """Register ``torch.ops.lookupc.*`` so programs that contain them load."""
    from .. import ops  # noqa: F401


# --- factories and pickles ------------------------------------------------------------------

def _import_module(name: str):
    """Import ``name`` as a console script would if it ran from this directory: the
    current directory is on the path while importing (and only then)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = _import_module(module_name)
    except ImportError as err:
        # the bundled examples ship in the package as lookupc.examples: the README's
        # `examples.tiny_bert:factory` works from any directory
        if module_name.split(".")[0] != "examples":
            _fail(f"{spec}: cannot import module {module_name!r} ({err}); MODEL is {MODEL_HELP}")
        try:
            module = importlib.import_module(f"lookupc.{module_name}")
        except ImportError:
            _fail(f"{spec}: cannot import module {module_name!r} ({err}); MODEL is {MODEL_HELP}")
    factory = getattr(module, attr, None)
    if not callable(factory):
        _fail(f"{spec}: module {module_name!r} has no callable {attr!r}")
    return factory


def _load_factory(spec: str, *, batch: int, seq_len: int) -> LoadedModel:
    factory = _import_factory(spec)
    params = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (("batch", batch), ("seq_len", seq_len)) if k in params}
    result = factory(**kwargs)
    model, inputs = _split_model_inputs(result, spec, "the factory")
    return LoadedModel(model, inputs, "factory", spec,
                       [f"input_{i}" for i in range(len(inputs))], {"factory": spec})


def _split_model_inputs(obj, spec: str, what: str) -> tuple[Any, tuple]:
    import torch

    if not (isinstance(obj, (tuple, list)) and len(obj) == 2
            and isinstance(obj[0], torch.nn.Module)):
        _fail(f"{spec}: {what} must give (model, example_inputs), got {type(obj).__name__}")
    model, inputs = obj
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not inputs:
        _fail(f"{spec}: example_inputs must be a tensor or a non-empty tuple of tensors")
    model.eval()
    return model, tuple(inputs)


class _pickle_import_context:
    """While unpickling: the current directory is importable (as for a factory), and a
    pickle of the bundled examples (``examples.tiny_bert.TinyBert``) finds them in the
    installed package when no ``examples`` package is on the path."""

    def __enter__(self):
        cwd = os.getcwd()
        self.added = cwd not in sys.path
        if self.added:
            sys.path.insert(0, cwd)
        self.aliased = False
        if importlib.util.find_spec("examples") is None:
            sys.modules["examples"] = importlib.import_module("lookupc.examples")
            self.aliased = True
        return self

    def __exit__(self, *exc) -> None:
        cwd = os.getcwd()
        if self.added and cwd in sys.path:
            sys.path.remove(cwd)
        if self.aliased:
            sys.modules.pop("examples", None)


def _load_pickle(spec: str, *, trust_pickle: bool, batch: int = 2,
                 seq_len: int = 32) -> LoadedModel:
    if not trust_pickle:
        _fail(f"{spec}: refusing to unpickle (loading a pickle runs code from the file); "
              f"pass --trust-pickle if you trust it, or give a .pt2, an HF safetensors dir or "
              f"package.module:factory")
    import torch

    with _pickle_import_context():
        obj = torch.load(spec, weights_only=False, map_location="cpu")
    if isinstance(obj, torch.nn.Module):  # a bare model: an HF one gets token inputs
        vocab = int(getattr(getattr(obj, "config", None), "vocab_size", 0) or 0)
        if vocab < 1:
            _fail(f"{spec}: the pickle holds a bare {type(obj).__name__} and lookupc cannot "
                  f"make example inputs for it; save (model, example_inputs) instead "
                  f"(torch.save((model, (x,)), path)) or give package.module:factory")
        max_len = getattr(obj.config, "max_position_embeddings", None)
        if max_len and seq_len > max_len:
            _fail(f"--seq-len={seq_len} exceeds the model's max_position_embeddings={max_len}")
        obj.eval()
        inputs, names = _hf_example_inputs(obj, vocab, batch, seq_len)
        return LoadedModel(obj, inputs, "pickle", spec, names,
                           {"pickle": True, "architecture": type(obj).__name__})
    model, inputs = _split_model_inputs(obj, spec, "the pickle")
    return LoadedModel(model, inputs, "pickle", spec,
                       [f"input_{i}" for i in range(len(inputs))], {"pickle": True})
