"""What a CPU user would pick instead of lookupc: the same dense model, made cheaper in one line.

Every benchmark times these beside the lookupc variants in the same run (issue 15):

- ``fp32``: the model as it is (eager, float32) - the 1.00x reference;
- ``bf16``: ``model.to(torch.bfloat16)`` (native on CPUs with AVX512-BF16/AMX, emulated
  on others: :func:`cpu_isa` says which, and rows say so);
- ``int8-dynamic``: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, qint8)``;
- ``compile``: ``torch.compile(model)`` (float32).

:func:`dense_variants` returns ``{name: (module, input_cast)}``; a variant that cannot be
built here (e.g. torch.compile without a C++ compiler) is left out with a note instead of
stopping the benchmark.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
from torch import nn

__all__ = ["cpu_isa", "dense_variants", "best_dense"]


def cpu_isa() -> dict:
    """x86 vector ISA flags that decide which dense variants run natively (from /proc/cpuinfo)."""
    flags: set = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
            "avx512_vnni": "avx512_vnni" in flags or "avx512vnni" in flags,
            "neon": "asimd" in flags}


def _cast(dtype: torch.dtype) -> Callable:
    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    return cast


def _same(t):
    return t


def dense_variants(model: nn.Module, example: tuple, compile_model: bool = True,
                   notes: list | None = None) -> dict:
    """``{name: (module, cast)}`` for fp32, bf16, int8-dynamic and (optionally) compile.

    ``cast`` converts one input tensor for that variant (floats to bf16 for ``bf16``;
    token ids are left alone). ``example`` is run once through each variant (warm-up,
    and torch.compile's compilation); failures go to ``notes``.
    """
    notes = notes if notes is not None else []
    model = model.eval()
    out = {"fp32": (model, _same)}
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    out["bf16"] = (bf16, _cast(torch.bfloat16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notes on quantized tensors
        out["int8-dynamic"] = (torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8).eval(), _same)
    if compile_model:
        try:
            compiled = torch.compile(model)
            with torch.no_grad():
                compiled(*example)
            out["compile"] = (compiled, _same)
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            notes.append(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
    with torch.no_grad():
        for name, (module, cast) in list(out.items()):
            try:
                module(*[cast(t) for t in example])
            except Exception as e:  # noqa: BLE001
                notes.append(f"{name} failed: {type(e).__name__}: {str(e)[:200]}")
                del out[name]
    if "bf16" in out and not (cpu_isa()["avx512_bf16"] or cpu_isa()["amx_bf16"]):
        notes.append("bf16: this CPU has no native bf16 (no AVX512-BF16/AMX); PyTorch "
                     "emulates it")
    return out


def best_dense(medians: dict) -> tuple[str, float]:
    """(name, median) of the fastest dense row among ``{name: median_ms}``."""
    name = min(medians, key=medians.get)
    return name, medians[name]
