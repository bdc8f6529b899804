"""The compile driver: a converted model -> an artifact directory for a target.

:func:`compile_artifact` exports the model, builds its kernels with TVM, writes the
directory (:mod:`lookupc.artifact.format`) and checks the loaded artifact's outputs
against the converted model in PyTorch.

Token counts: the kernels are generic in the token count (one build serves every
batch x sequence length), and the program is exported with dynamic batch and sequence
dims where the model allows it (``manifest["program"]["dynamic_dims"]``); otherwise
the program accepts only the compiled input shapes and says so when called.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import LookupcInputError
from .format import PROGRAM, prepare_dir, write_artifact
from .graph import lookup_configs, lookup_shapes
from .load import Artifact, load

__all__ = ["compile_artifact", "check_against", "rest_fidelity", "TOKEN_RULE"]

TOKEN_RULE = ("kernels are generic in the token count; the program accepts any batch and "
              "sequence length when program.dynamic_dims is true, else only the compiled "
              "input shapes")


def _library_suffix(spec) -> str:
    """``.so`` when this machine can link for the target, else ``.tar`` (objects)."""
    from ..targets import host_target

    return ".so" if spec.arch == host_target().arch and shutil.which(
        os.environ.get("CXX", "g++")) else ".tar"


def _input_meta(loaded) -> list[dict]:
    names = loaded.input_names or [f"input_{i}" for i in range(len(loaded.example_inputs))]
    return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for n, t in zip(names, loaded.example_inputs)]


def compile_artifact(result, loaded, spec, out_dir, *, schedule: str = "hand",
                     tuning_db: str | None = None, overwrite: bool = False,
                     progress: bool = False, exported: tuple | None = None,
                     sign_key: str | None = None, rest_dtype: str = "float32") -> tuple[dict, str]:
    """Export a converted model, build its kernels for ``spec`` and write an artifact.

    Parameters
    ----------
    result : lookupc.ConversionResult
        From :func:`lookupc.convert` (``.module`` holds the LookupFFNs, ``.report``).
    loaded : lookupc.artifact.model_load.LoadedModel
        The original model's description and example inputs.
    spec : lookupc.targets.TargetSpec
        Where the kernels will run.
    out_dir : path
        Artifact directory to write.
    schedule : str
        ``"naive"``, ``"hand"`` (= ``"cpu"``) or ``"tuned"`` (needs ``tuning_db``).
    exported : tuple, optional
        What :func:`lookupc.artifact.export.export_program` returned for ``result.module``, to
        compile one export for several targets without exporting again.
    sign_key : path, optional
        Ed25519 private key (``lookupc keygen``): writes ``signature.json``
        (:mod:`lookupc.artifact.signing`).
    rest_dtype : {"float32", "int8", "bfloat16"}
        Precision the model's remaining linear layers run in when the artifact is loaded
        (:mod:`lookupc.compose`). Its fidelity cost is measured here on the example inputs
        (converted model with vs without it, PyTorch reference ops) and recorded in
        ``manifest["rest"]``; the exact-kernel check below runs with float32 rest layers.

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
        :mod:`lookupc.artifact.output_check` (the artifact stays on disk, named in the message).
    """
    from ..compose import check_rest_dtype
    from ..progress import progress as progress_bar
    from ..runtime.build import export_library
    from ..targets import can_execute
    from .export import export_program

    check_rest_dtype(rest_dtype)
    shapes = lookup_shapes(result.module)
    if not shapes:
        raise LookupcInputError(f"{loaded.source}: no FFN was converted, nothing to compile "
                                f"(see 'lookupc inspect' for why each FFN was skipped)")
    prepare_dir(Path(out_dir), overwrite)
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
        export_library(shapes, spec.to_tvm(), schedule, path, tuning_db=tuning_db)
        bar.update(len(shapes))
        return path

    report = result.report.to_dict() if hasattr(result.report, "to_dict") else str(result.report)
    fields = {
        "target": spec.to_dict(), "target_string": str(spec), "schedule": schedule,
        "tuning_db": os.path.abspath(tuning_db) if tuning_db else None,
        "kernels": [_shape_dict(s) for s in shapes],
        "config": lookup_configs(result.module),
        "program": {"file": PROGRAM, "inputs": _input_meta(loaded), "outputs": names,
                    "outputs_flattened": flattened, "dynamic_dims": dynamic,
                    "token_rule": TOKEN_RULE},
        "model": {"source": loaded.source, "kind": loaded.kind, **_jsonable(loaded.info)},
        "conversion": report,
        "rest": rest_fidelity(result.module, loaded.example_inputs, rest_dtype),
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
        artifact = load(out_dir, trust_artifact=True, rest_dtype="float32")
        outcome = check_against(artifact, result.module, loaded.example_inputs)
        check = outcome.line(_CHECK_WHAT)
        if rest_dtype != "float32":
            rest = fields["rest"]
            check += (f"\nrest    {rest['linears']} linear layer(s) in {rest_dtype}: output cosine "
                      f"{rest['cosine_min']:.5f} (min), max abs error {rest['max_abs_err']:.3g} "
                      f"vs float32 rest layers")
    else:
        outcome, check = None, f"check   not run: this machine cannot execute the target ({why})"
    bar.update(1)
    bar.close()
    if outcome is not None:
        outcome.raise_if_failed(_CHECK_WHAT, f"; the artifact written to {out_dir} computes "
                                f"wrong outputs on this machine: do not deploy it")
    return manifest, check


_CHECK_WHAT = "artifact vs converted model in PyTorch on the example inputs"


def rest_fidelity(module: torch.nn.Module, inputs: tuple, dtype: str) -> dict:
    """What running ``module``'s remaining linear layers in ``dtype`` costs on ``inputs``:
    per-output cosine (min over outputs and rows) and max abs error against float32."""
    from .. import dispatch
    from ..compose import quantize_rest
    from .export import flatten_outputs

    out = {"dtype": dtype, "linears": 0, "cosine_min": 1.0, "max_abs_err": 0.0}
    if dtype == "float32":
        return out
    mixed = quantize_rest(module, dtype)
    out["linears"] = sum(1 for m in module.modules() if type(m) is torch.nn.Linear)
    with torch.no_grad(), dispatch.set_schedule("reference"):
        want = flatten_outputs(module(*inputs))[0]
        got = flatten_outputs(mixed(*inputs))[0]
    for g, w in zip(got, want):
        if not (torch.is_tensor(w) and w.is_floating_point() and w.numel()):
            continue
        g2, w2 = g.float().reshape(w.shape[0], -1), w.float().reshape(w.shape[0], -1)
        cos = torch.nn.functional.cosine_similarity(g2, w2, dim=-1).min().item()
        out["cosine_min"] = min(out["cosine_min"], round(cos, 6))
        out["max_abs_err"] = max(out["max_abs_err"], float((g2 - w2).abs().max()))
    return out


def check_against(artifact: Artifact, module: torch.nn.Module, inputs: tuple):
    """Compare the artifact's outputs with ``module``'s on the PyTorch reference ops.

    Returns a :class:`lookupc.artifact.output_check.OutputCheck`; ``.line(...)`` describes it.
    """
    from .. import dispatch
    from .export import flatten_outputs
    from .output_check import compare_outputs

    got = artifact(*inputs)
    with torch.no_grad(), dispatch.set_schedule("reference"):
        want = flatten_outputs(module(*inputs))[0]
    return compare_outputs(got, want)


def _shape_dict(s) -> dict:
    from dataclasses import asdict

    return asdict(s)


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))
