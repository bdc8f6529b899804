"""Reading models and inputs for the ``lookupc`` command, and writing ``torch.export`` programs.

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

Outputs that are not plain tensors or tuples (HF ``ModelOutput`` objects, dicts) are
flattened into a tuple of tensors before export -- :class:`FlatOutputs` -- so the
``.pt2`` loads back with plain ``torch.export.load``; the names of the flattened
outputs are kept in :attr:`LoadedModel.output_names`.
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

__all__ = ["LoadedModel", "load_model", "load_inputs", "save_inputs", "FlatOutputs",
           "flatten_outputs", "export_program", "describe_model_spec", "describe_tensor"]

PT2_EXTRA = "lookupc.json"  # extra file in .pt2s that lookupc writes: output names
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
        info.update(json.loads(extra[PT2_EXTRA]))  # output names written by save_program
    return LoadedModel(_Unlifted.wrap(ep.module(), names), tuple(args), "pt2", spec, names, info)


def save_program(program, path: str, output_names: list[str]) -> None:
    """``torch.export.save`` plus the output names (kept in the .pt2 as an extra file)."""
    import torch

    torch.export.save(program, path,
                      extra_files={PT2_EXTRA: json.dumps({"output_names": list(output_names)})})


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


# --- outputs and export ---------------------------------------------------------------------

def flatten_outputs(out, prefix: str = "") -> tuple[list, list[str]]:
    """Tensors of a (possibly nested) model output and their names, depth-first.

    Dicts and HF ``ModelOutput`` objects contribute their non-``None`` values under
    their keys; tuples and lists their items under ``prefix.i``.
    """
    import torch

    if isinstance(out, torch.Tensor):
        return [out], [prefix or "output"]
    items: list = []
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):
        items = [(str(k), out[k]) for k in out.keys()]
    elif isinstance(out, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(out)]
    elif out is None:
        return [], []
    else:
        _fail(f"model output of type {type(out).__name__} is not a tensor, tuple or dict")
    tensors, names = [], []
    for key, value in items:
        t, n = flatten_outputs(value, f"{prefix}.{key}" if prefix else key)
        tensors += t
        names += n
    return tensors, names


def FlatOutputs(module):  # noqa: N802 -- a factory that returns an nn.Module
    """Wrap ``module`` so that it returns a flat tuple of tensors (see :func:`flatten_outputs`)."""
    import torch

    class _Flat(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return tuple(flatten_outputs(self.inner(*args))[0])

    return _Flat(module)


def needs_flattening(out) -> bool:
    """Whether ``out`` is anything other than a tensor or a flat tuple of tensors."""
    import torch

    if isinstance(out, torch.Tensor):
        return False
    return not (type(out) in (tuple, list) and all(isinstance(t, torch.Tensor) for t in out))


def export_program(module, example_inputs: tuple, *, dynamic: bool = True):
    """``torch.export`` ``module`` on ``example_inputs``; outputs flattened to a tuple.

    Returns
    -------
    program : torch.export.ExportedProgram
    output_names : list of str
    flattened : bool
        Whether the outputs needed flattening (HF output objects, dicts).
    dynamic_dims : bool
        Whether batch and sequence dims were exported as dynamic (falls back to static
        shapes when the model specialises them).
    """
    import torch

    with torch.no_grad():
        out = module(*example_inputs)
    _, names = flatten_outputs(out)
    flattened = needs_flattening(out)
    wrapped = FlatOutputs(module) if flattened else module
    if dynamic:
        auto = torch.export.Dim.AUTO
        shapes = tuple({i: auto for i in range(min(2, t.dim()))}
                       if isinstance(t, torch.Tensor) else None for t in example_inputs)
        # one spec per positional argument; FlatOutputs takes *args (one tuple)
        dyn = (shapes,) if flattened else shapes
        try:
            return torch.export.export(wrapped, tuple(example_inputs),
                                       dynamic_shapes=dyn), names, flattened, True
        except Exception:  # noqa: BLE001 -- fall back to static shapes below
            pass
    program = torch.export.export(wrapped, tuple(example_inputs))
    return program, names, flattened, False


# --- input files ----------------------------------------------------------------------------

def load_inputs(path: str) -> tuple:
    """Positional inputs from a file: ``.pt`` (tensors only, no pickle code runs),
    ``.safetensors`` (keys ``input_0``, ``input_1``... or any keys, in sorted order),
    ``.npy`` or ``.npz`` (arrays in order ``arr_0``...)."""
    import torch

    p = Path(path)
    if not p.is_file():
        _fail(f"--input {path}: no such file")
    if p.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(p, weights_only=True, map_location="cpu")
        except Exception as err:  # noqa: BLE001
            _fail(f"--input {path}: not a tensor file ({str(err).splitlines()[0]})")
        if isinstance(obj, dict):
            obj = [obj[k] for k in sorted(obj, key=_natural)]
        if isinstance(obj, torch.Tensor):
            obj = [obj]
        if not isinstance(obj, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in obj):
            _fail(f"--input {path}: must hold a tensor, a tuple/list or dict of tensors")
        return tuple(obj)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            d = load_file(str(p))
        except Exception as err:  # noqa: BLE001 - SafetensorError does not name the file
            _fail(f"--input {path}: not a readable safetensors file "
                  f"({' '.join(str(err).split())[:200]})")
        return tuple(d[k] for k in sorted(d, key=_natural))
    if p.suffix in (".npy", ".npz"):
        import numpy as np

        arr = np.load(p, allow_pickle=False)
        arrays = [arr] if p.suffix == ".npy" else [arr[k] for k in sorted(arr.files, key=_natural)]
        return tuple(torch.from_numpy(np.ascontiguousarray(a)).clone() for a in arrays)
    _fail(f"--input {path}: unknown input file type {p.suffix!r} "
          f"(use .pt, .safetensors, .npy or .npz)")
    raise AssertionError  # unreachable


def save_inputs(inputs: tuple, path: str) -> None:
    """Write positional inputs (or outputs) as ``.safetensors`` keys ``input_0``... or a ``.pt``."""
    import torch

    tensors = {f"input_{i}": t.contiguous() for i, t in enumerate(inputs)}
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


def describe_tensor(t, stats: bool = False) -> str:
    """``(2, 32) int64``: shape and dtype of a tensor, with ``stats`` its mean and std."""
    text = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
    if stats:
        text += f" mean {t.float().mean().item():+.5f} std {t.float().std().item():.5f}"
    return text


def _natural(key: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]
