"""The TIR training kernels behind the ``"cuda"`` provider: :class:`TirTrainingKernels`.

It builds each LookupFFN kernel (the forward from ``lookupc.kernels.forward``, the backward
from ``lookupc.kernels.backward``, with the CUDA schedules of ``schedules/cuda/``) once per
(kernel, shapes, target), calls it on torch tensors, and orchestrates the backward, in one of
three modes (``"cuda"``, ``"emulate"``, ``"naive"``: see ``lookupc.runtime.cuda``, which
describes them and holds the providers that run this class, their registration, the
kernel catalogue and the CUDA compiler choice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import LookupcError, LookupcInputError
from .training import Kernel, KernelCache
from .training import ceil_to as _ceil_to
from .training import pad_rows as _pad_rows
from .training import segments as _segments

__all__ = ["TirTrainingKernels", "TABLE_GRAD_METHODS"]

TABLE_GRAD_METHODS = ("atomic", "segment")
_MODES = ("cuda", "emulate", "naive")
# Hash forward builds are per padded token count; pad to this multiple to share builds.
_HASH_BUCKET = 128


class TirTrainingKernels(KernelCache):
    """Builds, caches and runs the LookupFFN TIR kernels in one mode (see module doc).

    Parameters
    ----------
    mode : {"cuda", "emulate", "naive"}
    arch : str, optional
        CUDA arch (``"sm_90"``) for ``mode="cuda"``; default: the current device's.
    table_grad : {"atomic", "segment"}
        How the table gradient is reduced (atomics, or sort + segment reduction).
    """

    def __init__(self, mode: str = "cuda", arch: str | None = None, table_grad: str = "atomic"):
        if mode not in _MODES:
            raise LookupcInputError(f"mode must be one of {_MODES}, got {mode!r}")
        if table_grad not in TABLE_GRAD_METHODS:
            raise LookupcInputError(f"table_grad must be one of {TABLE_GRAD_METHODS}, got {table_grad!r}")
        super().__init__()
        from .. import tvm_shim

        self.tvm = tvm_shim.tvm
        self.mode, self.table_grad = mode, table_grad
        if mode == "cuda":
            self.arch = arch or _device_arch()
            from ..schedules.cuda.util import cuda_target

            self.target = cuda_target(self.arch)
        else:
            self.arch = None
            self.target = self.tvm.target.Target("llvm")

    # ----------------------------------------------------------------- building
    def _build(self, key: tuple, make, schedule):
        """``make()`` gives the PrimFunc, ``schedule(func, emulate=...)`` the CUDA-scheduled
        module (not used in ``naive`` mode)."""
        func = make()
        name = str(func.attrs["global_symbol"])
        try:
            mod = func if self.mode == "naive" else schedule(func, emulate=self.mode == "emulate")
            ex = self.tvm.compile(mod, target=self.target)
        except Exception as exc:  # noqa: BLE001 - any TVM failure becomes a clear error
            where = f"CUDA {self.arch}" if self.mode == "cuda" else f"llvm ({self.mode})"
            raise LookupcError(f"cannot build the lookupc kernel {name!r} {key[1:]} for "
                               f"{where}: {exc}{_cuda_compile_hint(self.mode)}") from exc
        if self.mode == "cuda" and not list(ex.mod.imports):
            raise LookupcError(f"kernel {name!r} compiled without a CUDA device module "
                               "(missing thread bindings): refusing to run it on the host")
        return Kernel(ex, name, self.mode == "cuda")

    # ----------------------------------------------------------------- forward
    def hash(self, x: Tensor, weight: Tensor, hash_bias: Tensor, decay: float,
             bits: int) -> tuple[Tensor, Tensor]:
        """Codes (int32) and scores of ``x`` [n, d_in] with the TIR hash kernel."""
        from ..kernels import forward as tir_kernels
        from ..kernels.fold import fold_weight
        from ..kernels.shapes import KernelShapes
        from ..schedules.cuda.hash import hash_tile, schedule_hash

        reps, rounds, nb, bs, _ = weight.shape
        if rounds != 4:
            raise LookupcError(f"the TIR hash kernel has 4 BH4 rounds, weight has {rounds}")
        n, d_in = x.shape
        tables = hash_bias.shape[0] // bits
        shapes = KernelShapes(d_in, 1, tables, bits, bs, reps)
        n_pad = n
        if self.mode != "naive":
            n_pad = _ceil_to(max(n, 1), max(hash_tile(nb * bs, reps), _HASH_BUCKET))
        fn = self.kernel(("hash", shapes, n_pad if self.mode != "naive" else None),
                         lambda: tir_kernels.make_hash(shapes, fold=True),
                         lambda f, emulate: schedule_hash(f, n_pad, emulate=emulate))
        codes = x.new_empty((n_pad, tables), dtype=torch.int32)
        scores = x.new_empty((n_pad, tables))
        if n:
            fn(_pad_rows(x, n_pad), fold_weight(weight), hash_bias, float(decay), codes, scores)
        return codes[:n], scores[:n]

    def gather(self, codes: Tensor, scores: Tensor, tables: Tensor, bias: Tensor) -> Tensor:
        """``y = sum_k scores * tables[k, codes] + bias`` with the TIR gather kernel."""
        from ..kernels import forward as tir_kernels
        from ..kernels.shapes import KernelShapes
        from ..schedules.cuda.gather import schedule_gather

        h, rows, d_out = tables.shape
        bits = rows.bit_length() - 1
        shapes = KernelShapes(h * bits, d_out, h, bits, 1, 1)  # only h, bits, d_out matter
        fn = self.kernel(("gather", shapes), lambda: tir_kernels.make_gather(shapes),
                         schedule_gather)
        y = scores.new_empty((codes.shape[0], d_out))
        if codes.shape[0]:
            fn(codes.to(torch.int32).contiguous(), scores, tables, bias, y)
        else:
            y.copy_(bias.expand_as(y))
        return y

    # ----------------------------------------------------------------- backward
    def gather_backward(self, grad_y: Tensor, codes: Tensor, scores: Tensor,
                        tables: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of the gather w.r.t. scores [n, h] and tables [h, rows, d_out]."""
        from ..kernels import backward as tb
        from ..schedules.cuda import backward as cb

        h, rows, d_out = tables.shape
        n = codes.shape[0]
        codes = codes.to(torch.int32).contiguous()
        grad_y = grad_y.contiguous()
        g_scores = scores.new_empty((n, h))
        g_table = tables.new_empty((h * rows, d_out))
        if n == 0:
            return g_scores, g_table.zero_().view(h, rows, d_out)
        fn = self.kernel(("gather_score_grad", h, rows, d_out),
                         lambda: tb.gather_score_grad(h, rows, d_out),
                         cb.schedule_gather_score_grad)
        fn(grad_y, codes, tables.reshape(h * rows, d_out), g_scores)
        if self.table_grad == "segment":
            order, offsets = _segments(codes, rows)
            fn = self.kernel(("table_grad_segment", h, rows, d_out),
                             lambda: tb.table_grad_segment(h, rows, d_out),
                             cb.schedule_table_grad_segment)
            fn(grad_y, scores, order, offsets, g_table)
        else:
            atomic = self.mode == "cuda"  # serial read-modify-write on the CPU builds
            fn = self.kernel(("table_grad_scatter", h, rows, d_out, atomic),
                             lambda: tb.table_grad_scatter(h, rows, d_out, atomic),
                             cb.schedule_table_grad_scatter)
            fn(grad_y, codes, scores, g_table)
        return g_scores, g_table.view(h, rows, d_out)

    def hash_backward(self, grad_scores: Tensor, x: Tensor, weight: Tensor, hash_bias: Tensor,
                      decay: float, bits: int) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients of the scores w.r.t. x [n, d_in], the BH4 weight and the hash bias.

        Recomputes the BH4 rounds (keeping each round's input), applies the score
        derivative, then runs the rounds backwards: Hadamard, transposed block matmul,
        and one batched weight-gradient GEMM over tokens for all rounds.
        """
        from ..kernels import backward as tb
        from ..schedules.cuda import backward as cb

        reps, rounds, nb, bs, _ = weight.shape
        width = nb * bs
        n, d_in = x.shape
        code = hash_bias.shape[0]
        tables = code // bits
        splits = cb.weight_grad_splits(rounds * reps, nb)
        tile = max(16 * splits, cb.round_tile(width))
        n_pad = _ceil_to(max(n, 1), tile)
        xp = _pad_rows(F.pad(x, (0, width - d_in)), n_pad).contiguous()
        gs = _pad_rows(grad_scores.contiguous(), n_pad).contiguous()
        w_t = weight.transpose(0, 1).contiguous()  # [rounds, R, nb, bs, bs]
        rt = cb.round_tile(width)

        def round_fn(transpose: bool, fwht: bool):
            return self.kernel(("round", reps, nb, bs, transpose, fwht, rt),
                               lambda: tb.block_round(reps, nb, bs, transpose=transpose,
                                                      fwht=fwht, tile=rt),
                               cb.schedule_round)

        def tiles(t: Tensor, size: int) -> Tensor:  # [..., n_pad, D] -> [..., n_pad/size, size, D]
            return t.view(*t.shape[:-2], n_pad // size, size, t.shape[-1])

        # Phase 1: recompute the rounds; ys[j] is the input of round j, ys[rounds] = BH4(x).
        ys = x.new_empty((rounds + 1, reps, n_pad, width))
        ys[0] = xp
        fwd = round_fn(False, True)
        for j in range(rounds):
            fwd(tiles(ys[j], rt), w_t[j], tiles(ys[j + 1], rt))
        # Phase 2: d scores / d z, zero-padded to R*D columns; hash bias gradient.
        dz = x.new_empty((n_pad, reps * width))
        self.kernel(("score_grad", reps, width, tables, bits, float(decay)),
                    lambda: tb.score_grad(reps, width, tables, bits, decay),
                    cb.schedule_score_grad)(ys[rounds], xp, hash_bias, gs, dz)
        g_b = hash_bias.new_empty(code)
        self.kernel(("column_sum", reps * width, code),
                    lambda: tb.column_sum(reps * width, code), cb.schedule_column_sum)(dz, g_b)
        # Phase 3: back through the rounds: gs_[j] = grad of round j's matmul output.
        g_out = x.new_empty((rounds, reps, n_pad, width))
        self.kernel(("fwht_scaled", reps, width, float(decay), rt),
                    lambda: tb.fwht_scaled(reps, width, decay, tile=rt),
                    cb.schedule_fwht_scaled)(dz.view(n_pad // rt, rt, -1),
                                             tiles(g_out[rounds - 1], rt))
        bwd = round_fn(True, True)
        for j in range(rounds - 1, 0, -1):
            bwd(tiles(g_out[j], rt), w_t[j], tiles(g_out[j - 1], rt))
        g_in = x.new_empty((reps, n_pad, width))
        round_fn(True, False)(tiles(g_out[0], rt), w_t[0], tiles(g_in, rt))
        # Phase 4: weight gradient of every round at once.
        q = rounds * reps
        parts = weight.new_empty((splits, rounds, reps, nb, bs, bs))
        split_view = (q, splits, n_pad // (16 * splits), 16, width)
        self.kernel(("weight_grad", q, nb, bs, 16, splits),
                    lambda: tb.weight_grad(q, nb, bs, tile=16, splits=splits),
                    cb.schedule_weight_grad)(
            g_out.view(split_view), ys[:rounds].view(split_view),
            parts.view(splits, q, nb, bs, bs))
        g_w = parts.sum(0)
        # Phase 5: the input gradient: the mixed-in x plus every repeat's chain.
        g_x = (1.0 - decay) * dz.view(n_pad, reps, width).sum(1) + g_in.sum(0)
        return (g_x[:n, :d_in].contiguous(), g_w.transpose(0, 1).contiguous(), g_b)


def _device_arch(device: int | None = None) -> str:
    if not torch.cuda.is_available():
        raise LookupcError("the cuda kernels need a CUDA device, and torch sees none")
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _cuda_compile_hint(mode: str) -> str:
    if mode != "cuda":
        return ""
    return (" (TVM compiles CUDA with NVRTC, which needs `pip install cuda-bindings`, or with "
            "nvcc when TVM_CUDA_COMPILE_MODE=nvcc and nvcc is on PATH)")
