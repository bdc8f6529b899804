"""Helpers shared by the CUDA schedules (``hash``, ``gather``, ``backward``).

Every CUDA schedule takes ``emulate``: with ``emulate=True`` it applies the *same* loop
transformations (splits, reorders, compute_at, caches) but leaves thread-bound loops
serial and keeps caches in global scope, so the result builds for ``llvm`` and its
numbers can be checked on a machine without a GPU. What emulation cannot check is
concurrency (races, barriers); TVM inserts the barriers for shared memory itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from lookupc.errors import LookupcInputError

from ... import tvm_shim

s_tir = tvm_shim.tvm.s_tir

__all__ = ["GpuSchedule", "cuda_target", "DEFAULT_THREADS", "specialize_tokens"]

DEFAULT_THREADS = 128


cuda_target = tvm_shim.cuda_target


def specialize_tokens(func, tokens: int, param: int = 0):
    """Fix the symbolic token count (dim 0 of parameter ``param``) of ``func`` to ``tokens``."""
    return tvm_shim.specialize_leading_dim(func, tokens, param)


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
        names = [tvm_shim.region_buffer(r).name for r in self.sch.get(block).reads]
        if buffer_name not in names:
            raise LookupcInputError(f"block reads {names}, not {buffer_name!r}")
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
        raise LookupcInputError("loop does not enclose the block")

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
