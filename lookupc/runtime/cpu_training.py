"""The lookupc backward on the CPU: TVM-built training kernels for float32 CPU tensors.

:class:`CpuTrainingKernels` builds the backward kernels for the host's ``llvm`` target
with the CPU schedules (``schedules/cpu/backward.py``; PrimFuncs from
``lookupc.kernels.backward`` and ``lookupc.kernels.backward_cpu``), once per shape set, and
keeps the compiled modules in the kernel disk cache (``$LOOKUPC_CACHE_DIR``). It is
what the ``"cpu"`` and ``"tuned"`` providers (``lookupc.runtime.cpu.TvmProvider``) run for
``hash_backward`` and ``gather_backward``.

Gather backward
    One fused kernel: tables in parallel, and per (table, token) pair the score gradient
    (a dot product with the table row) and the table-gradient update (the row plus the
    scaled ``grad_y`` row). A table's gradient rows are written only by the thread that
    owns the table, so the reduction is race-free and deterministic with no atomics and
    no sort. ``table_grad="segment"`` instead sorts the pairs by table row (torch) and
    runs a segment reduction, parallel over rows; it is slower here (the sort alone costs
    more than the fused kernel) and is kept for comparison.

Hash backward (BH4; see :func:`lookupc.reference.hash_backward`)
    1. pad ``x`` (every repeat) and ``grad_scores`` to a multiple of the token tile;
       fold the BH4 blocks (:func:`lookupc.kernels.backward_cpu.fold_rounds`);
    2. recompute the forward rounds, keeping each round's input;
    3. the score derivative ``dz`` and its column sums (the hash bias gradient);
    4. back through the rounds: the scaled Hadamard transform, then per round the
       transposed block matmul and the next Hadamard transform;
    5. the weight gradient of all rounds at once (a batched ``g^T y`` over tokens), and
       the input gradient.

Everything between two kernels is allocation or views, never a torch op on big
tensors: a torch op wakes torch's OpenMP pool, whose threads then spin for a while
(libgomp's default) on the cores the next TVM kernel needs; measured on 2 cores, a
0.7 ms round kernel took 3-5 ms right after a torch op. The first kernel of each
backward op still meets the spin of the torch ops that autograd ran before it;
``OMP_WAIT_POLICY=PASSIVE`` in the environment (read when torch loads) removes that.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from ..errors import LookupcInputError
from .training import Kernel, KernelCache, aligned, cache_root, ceil_to, disk_cached, hashed_name

__all__ = ["CpuTrainingKernels", "TABLE_GRAD_METHODS", "for_target", "kernel_catalogue"]

TABLE_GRAD_METHODS = ("fused", "segment")
# Token padding of the hash backward: a multiple of the round kernels' tile, and of 16
# so that every [rows, D] slice of the work buffers stays 64-byte aligned for any D.
_TOKEN_MULTIPLE = 16


class CpuTrainingKernels(KernelCache):
    """Builds, caches and runs the CPU backward kernels for one llvm target.

    Parameters
    ----------
    target : None, dict or tvm.target.Target
        CPU target (``lookupc.tvm_shim.make_target`` spec); None = this host.
    table_grad : {"fused", "segment"}
        How the table gradient is reduced (see the module doc).
    disk_cache : bool
        Keep compiled kernels in the kernel cache directory (``$LOOKUPC_CACHE_DIR``).
    lanes : int, optional
        fp32 vector width of the schedules; default: the target's (8 with AVX2, 16 with
        AVX-512). Tests set 16 to run the AVX-512 schedules on an AVX2 host (LLVM splits
        the wider vectors).
    """

    def __init__(self, target: Any = None, table_grad: str = "fused", disk_cache: bool = True,
                 lanes: int | None = None):
        super().__init__()
        if table_grad not in TABLE_GRAD_METHODS:
            raise LookupcInputError(f"table_grad must be one of {TABLE_GRAD_METHODS}, got {table_grad!r}")
        from .. import tvm_shim
        from ..schedules.cpu import backward as cpu_backward

        self.target = tvm_shim.make_target(target)
        self.lanes = lanes or tvm_shim.vector_lanes(self.target)
        self.codegen_target = cpu_backward.codegen_target(self.target)
        self.threads = tvm_shim.num_threads()
        self.table_grad = table_grad
        self.disk_cache = disk_cache
        self.tile = cpu_backward.ROUND_TILE
        self._constants: dict[tuple, Any] = {}

    # ----------------------------------------------------------------- building
    def _build(self, key: tuple, make, schedule) -> Kernel:
        import inspect

        import lookupc

        from .. import tvm_shim
        from ..errors import LookupcError
        from ..schedules.cpu import backward as cpu_backward

        func = make()
        name = str(func.attrs["global_symbol"])

        def compile_():
            try:
                return tvm_shim.compile_module(schedule(func, self.lanes), self.codegen_target)
            except Exception as exc:  # noqa: BLE001 - any TVM failure becomes a clear error
                raise LookupcError(f"cannot build the lookupc training kernel {name!r} "
                                   f"{key[1:]} for {self.target}: {exc}") from exc

        key_text = "|".join([name, repr(key), tvm_shim.script_of(func), str(self.codegen_target),
                             str(self.lanes), inspect.getsource(cpu_backward),
                             tvm_shim.tvm_version(), lookupc.__version__])
        module = disk_cached(hashed_name("train_", key_text), compile_,
                             cache_root() if self.disk_cache else None)
        return Kernel(module, name)

    def _const(self, key: tuple, make):
        hit = self._constants.get(key)
        if hit is None:
            hit = self._constants[key] = aligned(make())
        return hit

    # ----------------------------------------------------------------- gather
    def gather_backward(self, grad_y, codes, scores, tables):
        """Gradients of the gather w.r.t. scores [n, h] and tables [h, rows, d_out]."""
        import torch

        from ..kernels import backward as tb
        from ..kernels import backward_cpu as tc
        from ..schedules.cpu import backward as cb

        h, rows, d_out = tables.shape
        n = codes.shape[0]
        g_scores = scores.new_empty((n, h))
        g_table = tables.new_empty((h * rows, d_out))
        if n == 0:
            return g_scores, g_table.zero_().view(h, rows, d_out)
        codes = aligned(codes.to(torch.int32))
        grad_y, scores = aligned(grad_y), aligned(scores)
        flat = aligned(tables).view(h * rows, d_out)
        if self.table_grad == "fused":
            self.kernel(("gather_backward_fused", h, rows, d_out),
                        lambda: tc.gather_backward_fused(h, rows, d_out, self.lanes),
                        cb.schedule_gather_backward_fused)(
                grad_y, codes, scores, flat, g_scores, g_table)
            return g_scores, g_table.view(h, rows, d_out)
        from .training import segments

        self.kernel(("gather_score_grad", h, rows, d_out),
                    lambda: tb.gather_score_grad(h, rows, d_out),
                    cb.schedule_gather_score_grad)(grad_y, codes, flat, g_scores)
        order, offsets = segments(codes, rows)
        self.kernel(("table_grad_segment", h, rows, d_out),
                    lambda: tb.table_grad_segment(h, rows, d_out),
                    cb.schedule_table_grad_segment)(grad_y, scores, order, offsets, g_table)
        return g_scores, g_table.view(h, rows, d_out)

    # ----------------------------------------------------------------- hash
    def hash_backward(self, grad_scores, x, weight, hash_bias, decay: float, bits: int):
        """Gradients of the scores w.r.t. x [n, d_in], the BH4 weight and the hash bias."""
        import torch

        from .. import reference as ref
        from ..kernels import backward as tb
        from ..kernels import backward_cpu as tc
        from ..schedules.cpu import backward as cb

        reps, rounds, nb, bs, _ = weight.shape
        width = nb * bs
        n, d_in = x.shape
        code = hash_bias.shape[0]
        tables = code // bits
        decay = float(decay)
        tile = self.tile
        n_pad = ceil_to(max(n, 1), ceil_to(tile, _TOKEN_MULTIPLE))
        m = n_pad // tile
        q = rounds * reps
        if n == 0:
            return x.new_zeros((0, d_in)), weight.new_zeros(weight.shape), hash_bias.new_zeros(code)
        x, grad_scores = aligned(x), aligned(grad_scores)
        weight, hash_bias = aligned(weight), aligned(hash_bias)

        k = self.kernel

        def tiles(t):  # [..., n_pad, D] -> [..., m, tile, D] (a free view)
            return t.view(*t.shape[:-2], m, tile, t.shape[-1])

        # Phase 1: padded inputs (ys[0] = x_pad in every repeat) and the folded blocks.
        ys = x.new_empty((rounds + 1, reps, n_pad, width))
        gs_pad = x.new_empty((n_pad, tables))
        k(("pad_inputs", reps, d_in, width, tables), lambda: tc.pad_inputs(reps, d_in, width, tables),
          cb.schedule_pad_inputs)(x, grad_scores, ys[0], gs_pad)
        had = self._const(("had", bs), lambda: ref.fwht(torch.eye(bs)))  # Sylvester H_BS
        w_fwd, w_bwd, w_raw = (weight.new_empty((rounds, reps, nb, bs, bs)) for _ in range(3))
        k(("fold_rounds", reps, rounds, nb, bs), lambda: tc.fold_rounds(reps, rounds, nb, bs),
          cb.schedule_fold_rounds)(weight, had, w_fwd, w_bwd, w_raw)

        def folded(stages: bool):
            return k(("round_folded", reps, nb, bs, stages, tile),
                     lambda: tc.round_folded(reps, nb, bs, stages=stages, tile=tile),
                     cb.schedule_round)

        # Phase 2: the forward rounds again; ys[j] is round j's input, ys[rounds] = BH4(x).
        fwd = folded(True)
        for j in range(rounds):
            fwd(tiles(ys[j]), w_fwd[j], tiles(ys[j + 1]))
        # Phase 3: d scores / d z (zero past the code width) and the hash bias gradient.
        dz = x.new_empty((reps, n_pad, width))
        k(("score_grad_fast", reps, width, tables, bits, decay, tile),
          lambda: tc.score_grad_fast(reps, width, tables, bits, decay, tile=tile),
          cb.schedule_score_grad_fast)(tiles(ys[rounds]), tiles(ys[0, 0]), hash_bias,
                                       gs_pad.view(m, tile, tables), tiles(dz))
        col = hash_bias.new_empty((reps, width))
        k(("column_sum_planes", reps, width), lambda: tc.column_sum_planes(reps, width),
          cb.schedule_column_sum_planes)(dz, col)
        g_b = col.view(-1)[:code].clone()
        # Phase 4: back through the rounds; g_out[j] = gradient of round j's matmul output.
        g_out = x.new_empty((rounds, reps, n_pad, width))
        scaled = self._const(("scaled_had", reps, nb, bs, decay),
                             lambda: (decay * had).expand(reps, nb, bs, bs).contiguous())
        fwd(tiles(dz), scaled, tiles(g_out[rounds - 1]))  # fwht(decay * dz)
        for j in range(rounds - 1, 0, -1):
            fwd(tiles(g_out[j]), w_bwd[j], tiles(g_out[j - 1]))
        g_in = x.new_empty((reps, n_pad, width))
        folded(False)(tiles(g_out[0]), w_raw[0], tiles(g_in))
        # Phase 5: the weight gradient of every (round, repeat) at once; the input gradient.
        parts = weight.new_empty((1, q, nb, bs, bs))
        view = (q, 1, m, tile, width)
        tasks = 2 * self.threads
        k(("weight_grad", q, nb, bs, tile, tasks), lambda: tb.weight_grad(q, nb, bs, tile=tile),
          functools.partial(cb.schedule_weight_grad, tasks=tasks))(
            g_out.view(view), ys[:rounds].view(view), parts)
        g_w = parts.view(rounds, reps, nb, bs, bs).transpose(0, 1)
        g_x = x.new_empty((n, d_in))
        k(("input_grad", reps, width, d_in, decay), lambda: tc.input_grad(reps, width, d_in, decay),
          cb.schedule_input_grad)(dz, g_in, g_x)
        return g_x, (g_w if reps == 1 else g_w.contiguous()), g_b


def kernel_catalogue(shapes, decay: float = 0.7, tile: int | None = None,
                     lanes: int = 8) -> dict:
    """Every kernel the CPU backward runs for ``shapes`` (:class:`lookupc.kernels.shapes.KernelShapes`):
    name -> (PrimFunc factory, CPU schedule ``schedule(func, lanes)``), for ``lanes``-wide
    vectors."""
    from ..kernels import backward as tb
    from ..kernels import backward_cpu as tc
    from ..schedules.cpu import backward as cb

    h, bits, bs, reps = shapes.tables, shapes.bits, shapes.block_size, shapes.repeats
    rows, width, d_in, d_out = 1 << bits, shapes.width, shapes.d_in, shapes.d_out
    nb, tile = width // bs, tile or cb.ROUND_TILE
    return {
        "gather_backward_fused": (lambda: tc.gather_backward_fused(h, rows, d_out, lanes),
                                  cb.schedule_gather_backward_fused),
        "gather_score_grad": (lambda: tb.gather_score_grad(h, rows, d_out),
                              cb.schedule_gather_score_grad),
        "table_grad_segment": (lambda: tb.table_grad_segment(h, rows, d_out),
                               cb.schedule_table_grad_segment),
        "pad_inputs": (lambda: tc.pad_inputs(reps, d_in, width, h), cb.schedule_pad_inputs),
        "fold_rounds": (lambda: tc.fold_rounds(reps, 4, nb, bs), cb.schedule_fold_rounds),
        "round_folded": (lambda: tc.round_folded(reps, nb, bs, tile=tile), cb.schedule_round),
        "round_folded_nofwht": (lambda: tc.round_folded(reps, nb, bs, stages=False, tile=tile),
                                cb.schedule_round),
        "score_grad_fast": (lambda: tc.score_grad_fast(reps, width, h, bits, decay, tile=tile),
                            cb.schedule_score_grad_fast),
        "column_sum_planes": (lambda: tc.column_sum_planes(reps, width),
                              cb.schedule_column_sum_planes),
        "weight_grad": (lambda: tb.weight_grad(4 * reps, nb, bs, tile=tile),
                        cb.schedule_weight_grad),
        "input_grad": (lambda: tc.input_grad(reps, width, d_in, decay), cb.schedule_input_grad),
    }


_SHARED: dict[str, CpuTrainingKernels] = {}
_SHARED_LOCK = threading.Lock()


def for_target(target: Any = None) -> CpuTrainingKernels:
    """The process-wide :class:`CpuTrainingKernels` of ``target`` (built lazily, shared by
    the providers)."""
    from .. import tvm_shim

    key = str(tvm_shim.make_target(target))
    with _SHARED_LOCK:
        hit = _SHARED.get(key)
        if hit is None:
            hit = _SHARED[key] = CpuTrainingKernels(target)
        return hit
