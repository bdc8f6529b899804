"""Writing models as ``torch.export`` programs (``.pt2``) for the artifact and ``lookupc convert``.

:func:`export_program` runs ``torch.export`` with dynamic batch and sequence dims (static
when the model specialises them). Outputs that are not plain tensors or tuples (HF
``ModelOutput`` objects, dicts) are flattened into a tuple of tensors before export --
:func:`flatten_outputs`, :func:`FlatOutputs` -- so the ``.pt2`` loads back with plain
``torch.export.load``; :func:`save_program` keeps the names of the flattened outputs in
the ``.pt2`` as the extra file :data:`PT2_EXTRA`, which :mod:`lookupc.artifact.model_load`
reads back into ``LoadedModel.info["output_names"]``.
"""

from __future__ import annotations

import json

from ..errors import LookupcInputError

__all__ = ["PT2_EXTRA", "FlatOutputs", "flatten_outputs", "needs_flattening", "export_program",
           "save_program"]

PT2_EXTRA = "lookupc.json"  # extra file in .pt2s that lookupc writes: output names


def _fail(msg: str) -> None:
    raise LookupcInputError(msg)


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


def save_program(program, path: str, output_names: list[str]) -> None:
    """``torch.export.save`` plus the output names (kept in the .pt2 as an extra file)."""
    import torch

    torch.export.save(program, path,
                      extra_files={PT2_EXTRA: json.dumps({"output_names": list(output_names)})})
