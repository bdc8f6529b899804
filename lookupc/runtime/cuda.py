"""The ``"cuda"`` kernel provider: TVM-built CUDA kernels for the forward and backward.

The forward kernels are the CPU path's TensorIR definitions (``lookupc.kernels.forward``:
``make_hash``, ``make_gather``), the backward ones ``lookupc.kernels.backward``; the CUDA
schedules live in ``schedules/cuda/hash.py``, ``gather.py`` and
``backward.py``. :class:`~lookupc.runtime.cuda_training.TirTrainingKernels` (in
``lookupc.runtime.cuda_training``) builds each kernel once per (kernel, shapes, target)
and calls it on torch tensors directly (DLPack, zero copy); it also orchestrates the
backward (which kernel runs when, and the small glue: padding, the sort of the segment
reduction, summing repeats). The build-once cache and the glue helpers are shared with
the CPU backward (``lookupc.runtime.training``;
``lookupc.runtime.cpu_training`` is the CPU orchestrator).

It runs in three modes, so that everything but the GPU itself is testable on a CPU:

``"cuda"``
    CUDA schedules, built for the device's ``sm_XY``; tensors on that device.
``"emulate"``
    The same CUDA schedules with thread bindings left serial and caches in global
    memory, built for ``llvm`` (checks the schedules' loop structure numerically).
``"naive"``
    The unscheduled PrimFuncs built for ``llvm`` (checks the TensorIR math).

The token count: the backward kernels take tokens as ``[tiles, tile]`` and the
CUDA hash is built per padded token count; both pad the batch with zero rows (whose
gradients are zero) and cut the results back.

Registering: importing this module registers the provider factory under ``"cuda"``
(``lookupc.dispatch`` imports it on first use), and ``"cuda-emulate"``: the CUDA
schedules run serially on CPU float32 tensors (slow; for checking and debugging the
GPU path on a machine without one). Creating the provider fails with
:class:`~lookupc.errors.LookupcError` when TVM cannot reach a CUDA device; building a
kernel fails the same way (naming the kernel and arch) instead of falling back.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch
from torch import Tensor

from .. import dispatch
from ..errors import LookupcError, LookupcInputError
from .cuda_training import TABLE_GRAD_METHODS, TirTrainingKernels, _device_arch

__all__ = ["CudaProvider", "EmulatedCudaProvider", "kernel_catalogue", "cuda_source"]


def kernel_catalogue(shapes, decay: float = 0.7, tokens: int | None = None) -> dict:
    """Every CUDA kernel of a LookupFFN of ``shapes`` (:class:`lookupc.kernels.shapes.KernelShapes`):
    name -> (PrimFunc factory, schedule). ``tokens`` fixes the hash forward's batch
    (default: one tile)."""
    from ..kernels import backward as tb
    from ..kernels import forward as tir_kernels
    from ..schedules.cuda import backward as cb
    from ..schedules.cuda.gather import schedule_gather
    from ..schedules.cuda.hash import hash_tile, schedule_hash

    h, bits, bs, reps, d_out = shapes.tables, shapes.bits, shapes.block_size, shapes.repeats, \
        shapes.d_out
    rows, width, nb = 1 << bits, shapes.width, shapes.width // bs
    rt, n_hash = cb.round_tile(width), tokens or hash_tile(width, reps)
    return {
        "hash": (lambda: tir_kernels.make_hash(shapes, fold=True),
                 lambda f, emulate=False: schedule_hash(f, n_hash, emulate=emulate)),
        "gather": (lambda: tir_kernels.make_gather(shapes), schedule_gather),
        "gather_score_grad": (lambda: tb.gather_score_grad(h, rows, d_out),
                              cb.schedule_gather_score_grad),
        "table_grad_atomic": (lambda: tb.table_grad_scatter(h, rows, d_out, True),
                              cb.schedule_table_grad_scatter),
        "table_grad_segment": (lambda: tb.table_grad_segment(h, rows, d_out),
                               cb.schedule_table_grad_segment),
        "round_fwd": (lambda: tb.block_round(reps, nb, bs, tile=rt), cb.schedule_round),
        "round_bwd": (lambda: tb.block_round(reps, nb, bs, transpose=True, tile=rt),
                      cb.schedule_round),
        "round_bwd_nofwht": (lambda: tb.block_round(reps, nb, bs, transpose=True, fwht=False,
                                                    tile=rt), cb.schedule_round),
        "fwht_scaled": (lambda: tb.fwht_scaled(reps, width, decay, tile=rt),
                        cb.schedule_fwht_scaled),
        "score_grad": (lambda: tb.score_grad(reps, width, h, bits, decay),
                       cb.schedule_score_grad),
        "column_sum": (lambda: tb.column_sum(reps * width, h * bits), cb.schedule_column_sum),
        "weight_grad": (lambda: tb.weight_grad(4 * reps, nb, bs, tile=16,
                                               splits=cb.weight_grad_splits(4 * reps, nb)),
                        cb.schedule_weight_grad),
    }


def cuda_source(name: str, shapes, arch: str = "sm_90", **kw) -> str:
    """CUDA C++ source of kernel ``name`` of :func:`kernel_catalogue` for ``arch``.

    Works without a GPU (TVM keeps the source in a fallback module); raises
    :class:`LookupcError` when the build yields no device code.
    """
    from .. import tvm_shim
    from ..schedules.cuda.util import cuda_target

    make, schedule = kernel_catalogue(shapes, **kw)[name]
    ex = tvm_shim.tvm.compile(schedule(make()), target=cuda_target(arch))
    imports = list(ex.mod.imports)
    if not imports:
        raise LookupcError(f"kernel {name!r} built without a CUDA device module")
    return imports[0].inspect_source("cuda")


def _choose_cuda_compiler() -> None:
    """Use nvcc when NVRTC's Python bindings are missing but nvcc is installed."""
    if "TVM_CUDA_COMPILE_MODE" in os.environ:
        return
    try:
        has_nvrtc = importlib.util.find_spec("cuda.bindings") is not None
    except (ImportError, ValueError):  # no top-level "cuda" package at all
        has_nvrtc = False
    if not has_nvrtc and shutil.which("nvcc"):
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"


class CudaProvider:
    """Dispatch provider for float32 CUDA tensors (see ``lookupc.dispatch``)."""

    name = "cuda"

    def __init__(self, table_grad: str | None = None):
        from .. import tvm_shim

        if not torch.cuda.is_available():
            raise LookupcError("a CUDA tensor reached the lookupc cuda kernels but torch "
                               "reports no CUDA device")
        if not tvm_shim.tvm.cuda(0).exist:
            raise LookupcError(
                "a CUDA tensor reached lookupc, but TVM cannot use the GPU (its CUDA runtime "
                "did not load: check libcuda.so.1 and a CUDA-enabled apache-tvm build); "
                "move the model to the CPU or run with lookupc.set_schedule('reference') "
                "explicitly to use the PyTorch reference")
        _choose_cuda_compiler()
        self._per_arch: dict[str, TirTrainingKernels] = {}
        self.set_table_grad(table_grad or os.environ.get("LOOKUPC_CUDA_TABLE_GRAD", "atomic"))

    def set_table_grad(self, method: str) -> None:
        """Reduce the table gradient with ``"atomic"`` adds or a ``"segment"`` reduction."""
        if method not in TABLE_GRAD_METHODS:
            raise LookupcInputError(f"table_grad must be one of {TABLE_GRAD_METHODS}, got {method!r}")
        self.table_grad = method
        for k in self._per_arch.values():
            k.table_grad = method

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cuda" and dtype == torch.float32

    def kernels(self, t: Tensor) -> TirTrainingKernels:
        arch = _device_arch(t.device.index)
        k = self._per_arch.get(arch)
        if k is None:
            k = self._per_arch[arch] = TirTrainingKernels("cuda", arch, self.table_grad)
        return k

    def hash(self, x, weight, hash_bias, decay, bits):
        with torch.cuda.device(x.device):
            return self.kernels(x).hash(x, weight, hash_bias, decay, bits)

    def gather(self, codes, scores, tables, bias):
        with torch.cuda.device(scores.device):
            return self.kernels(scores).gather(codes, scores, tables, bias)

    def hash_backward(self, grad_scores, x, weight, hash_bias, decay, bits):
        with torch.cuda.device(x.device):
            return self.kernels(x).hash_backward(grad_scores, x, weight, hash_bias, decay, bits)

    def gather_backward(self, grad_y, codes, scores, tables):
        with torch.cuda.device(scores.device):
            return self.kernels(scores).gather_backward(grad_y, codes, scores, tables)


class EmulatedCudaProvider:
    """The CUDA schedules emulated on the CPU (``mode="emulate"``) as a provider."""

    name = "cuda-emulate"

    def __init__(self, table_grad: str = "atomic"):
        self._kernels = TirTrainingKernels("emulate", table_grad=table_grad)

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type == "cpu" and dtype == torch.float32

    def set_table_grad(self, method: str) -> None:
        if method not in TABLE_GRAD_METHODS:
            raise LookupcInputError(f"table_grad must be one of {TABLE_GRAD_METHODS}, got {method!r}")
        self._kernels.table_grad = method

    def kernels(self, t: Tensor) -> TirTrainingKernels:
        return self._kernels

    def hash(self, x, weight, hash_bias, decay, bits):
        return self._kernels.hash(x, weight, hash_bias, decay, bits)

    def gather(self, codes, scores, tables, bias):
        return self._kernels.gather(codes, scores, tables, bias)

    def hash_backward(self, grad_scores, x, weight, hash_bias, decay, bits):
        return self._kernels.hash_backward(grad_scores, x, weight, hash_bias, decay, bits)

    def gather_backward(self, grad_y, codes, scores, tables):
        return self._kernels.gather_backward(grad_y, codes, scores, tables)


dispatch.register_provider("cuda", CudaProvider)
dispatch.register_provider("cuda-emulate", EmulatedCudaProvider)
