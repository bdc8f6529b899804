"""Helpers shared by the CUDA schedules (``cuda_hash``, ``cuda_gather``, ``cuda_backward``).

Every CUDA schedule takes ``emulate``: with ``emulate=True`` it applies the *same* loop
transformations (splits, reorders, compute_at, caches) but leaves thread-bound loops
serial and keeps caches in global scope, so the result builds for ``llvm`` and its
numbers can be checked on a machine without a GPU. What emulation cannot check is
concurrency (races, barriers); TVM inserts the barriers for shared memory itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import s_tir

__all__ = ["GpuSchedule", "cuda_target", "DEFAULT_THREADS", "specialize_tokens"]

DEFAULT_THREADS = 128


def cuda_target(arch: str = "sm_90") -> "tvm.target.Target":
    """CUDA target for ``arch`` (``"sm_80"``, ``"sm_90"``...) with an llvm host."""
    if not (isinstance(arch, str) and arch.startswith("sm_") and arch[3:].isdigit()):
        raise ValueError(f"arch must look like 'sm_90', got {arch!r}")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


def _region_buffer(region):
    """The buffer of a read/write region (``BufferRegion.buffer``; ``.source`` in TVM 0.27)."""
    return getattr(region, "buffer", None) or region.source


def specialize_tokens(func, tokens: int, param: int = 0):
    """Fix the symbolic token count (dim 0 of parameter ``param``) of ``func`` to ``tokens``.

    In TVM 0.27 PrimFunc parameters are buffers; specialising one to a static-shape
    buffer substitutes its shape variables everywhere.
    """
    buf = func.params[param]
    if not isinstance(buf.shape[0], tvm.tirx.Var):
        return func  # already static
    static = tvm.tirx.decl_buffer((int(tokens), *buf.shape[1:]), buf.dtype, name=buf.name)
    return func.specialize({buf: static})


@dataclass
class GpuSchedule:
    """An ``s_tir.Schedule`` plus the emulation switch (see the module docstring)."""

    sch: s_tir.Schedule
    emulate: bool = False

    @classmethod
    def of(cls, func, emulate: bool = False) -> "GpuSchedule":
        return cls(s_tir.Schedule(func), emulate)

    @property
    def mod(self):
        return self.sch.mod

    def bind(self, loop, tag: str) -> None:
        """Bind ``loop`` to a CUDA thread axis (kept serial when emulating)."""
        if not self.emulate:
            self.sch.bind(loop, tag)

    def set_scope(self, block, scope: str) -> None:
        """Put the buffer ``block`` writes into ``scope`` (global when emulating)."""
        if not self.emulate:
            self.sch.set_scope(block, 0, scope)

    def read_index(self, block, buffer_name: str) -> int:
        """Index of the read region of ``buffer_name`` in ``block`` (for cache_read)."""
        names = [_region_buffer(r).name for r in self.sch.get(block).reads]
        if buffer_name not in names:
            raise ValueError(f"block reads {names}, not {buffer_name!r}")
        return names.index(buffer_name)

    def cache_read(self, block, buffer_name: str, scope: str):
        """Cache ``buffer_name`` as read by ``block`` in ``scope`` (global when emulating)."""
        idx = self.read_index(block, buffer_name)
        return self.sch.cache_read(block, idx, "global" if self.emulate else scope,
                                   consumer_blocks=[block])

    def split_loops(self, block, outer: int):
        """(spatial, reduction) loops of ``block`` below its first ``outer`` loops."""
        loops = self.sch.get_loops(block)[outer:]
        n_red = sum(1 for iv in self.sch.get(block).iter_vars if int(iv.iter_type) == 2)
        cut = len(loops) - n_red
        return list(loops[:cut]), list(loops[cut:])

    def fuse(self, loops):
        return loops[0] if len(loops) == 1 else self.sch.fuse(*loops)

    def depth_below(self, block, loop) -> int:
        """Number of ``block``'s loops down to and including ``loop``."""
        target = self.sch.get(loop)
        for i, lp in enumerate(self.sch.get_loops(block)):
            if self.sch.get(lp).same_as(target):
                return i + 1
        raise ValueError("loop does not enclose the block")

    def bind_threads(self, block, outer: int, threads: int) -> None:
        """Fuse the spatial loops of ``block`` below ``outer`` and spread them over threadIdx.x.

        Reduction loops stay serial inside each thread.
        """
        spatial, _ = self.split_loops(block, outer)
        if not spatial:
            return
        _, inner = self.sch.split(self.fuse(spatial), [None, threads])
        self.bind(inner, "threadIdx.x")

    def bind_grid(self, block, threads: int) -> None:
        """Simple 1-D launch: all spatial loops fused, blockIdx.x x threadIdx.x."""
        spatial, _ = self.split_loops(block, 0)
        bx, tx = self.sch.split(self.fuse(spatial), [None, threads])
        self.bind(bx, "blockIdx.x")
        self.bind(tx, "threadIdx.x")
