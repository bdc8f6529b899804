"""Distillation on several processes: the few torch.distributed operations it needs.

Whole-model distillation (:func:`lookupc.distill.model.finetune_model`) runs data
parallel when ``torch.distributed`` is initialised with more than one process, or when
the process was started by ``torchrun`` (``WORLD_SIZE`` > 1 and ``MASTER_ADDR`` in the
environment; the default process group is then initialised here: ``gloo``, plus
``nccl`` for CUDA tensors when CUDA is available). Each optimiser step still consumes
one whole calibration item: its rows (the batch dimension) are split across the ranks,
every loss term is a ratio of sums over rows whose denominators (teacher norms, row
counts; no gradient) are summed across ranks first, and the gradients are summed, so
the step equals the one-process step up to float summation order.

An item whose batch is smaller than the number of processes (or whose tensors do not
share a first dimension) is run whole by every rank: every row is then counted once
per rank in numerators and denominators alike, so the ratios, and the step, are
still those of one process.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["Comm", "setup", "init_from_env", "rank", "world_size", "is_main", "shard_item",
           "torchrun_env"]

_CREATED = False


def torchrun_env() -> bool:
    """Whether the environment is that of one of several processes started by torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    return world > 1 and "RANK" in os.environ and "MASTER_ADDR" in os.environ


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def init_from_env() -> bool:
    """Initialise the default process group from torchrun's environment when it is not
    initialised yet (``gloo``; ``cpu:gloo,cuda:nccl`` when CUDA and NCCL are available,
    with the CUDA device set to ``LOCAL_RANK``). Returns whether a process group with
    more than one process is in place."""
    global _CREATED
    dist = _dist()
    if dist is None:
        return False
    if not dist.is_initialized():
        if not torchrun_env():
            return False
        backend = "gloo"
        if torch.cuda.is_available() and dist.is_nccl_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) %
                                  torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(backend=backend)
        _CREATED = True
        atexit.register(_shutdown)
    return dist.get_world_size() > 1


def _shutdown() -> None:
    dist = _dist()
    if _CREATED and dist is not None and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank: the process group's, else torchrun's ``RANK``, else 0."""
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if torchrun_env() else 0


def world_size() -> int:
    dist = _dist()
    if dist is not None and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) if torchrun_env() else 1


def is_main() -> bool:
    """True in a single process and on rank 0 (the one that prints and writes files)."""
    return rank() == 0


def setup(enabled: bool = True) -> "Comm | None":
    """The communicator of a data-parallel run, or None for a single process (also when
    ``enabled`` is False: every process then works alone)."""
    if not enabled or not init_from_env():
        return None
    return Comm()


def _row_bounds(rows: int, rank: int, world: int) -> tuple[int, int]:
    return rows * rank // world, rows * (rank + 1) // world


def shard_item(item: Any, rank: int, world: int) -> Any:
    """This rank's rows of a calibration item: every tensor argument (top level of a
    tuple/list, dict or a tensor) whose first dimension is the batch size is split into
    ``world`` contiguous row ranges. The item is returned whole (run by every rank)
    when the batch is smaller than ``world`` or the tensors disagree on it."""
    if world <= 1:
        return item
    if isinstance(item, Mapping):
        values = list(item.values())
    elif isinstance(item, (tuple, list)):
        values = list(item)
    else:
        values = [item]
    batched = [v for v in values if isinstance(v, Tensor) and v.dim() >= 1]
    if not batched:
        return item
    rows = batched[0].shape[0]
    if rows < world or any(v.shape[0] != rows for v in batched):
        return item
    lo, hi = _row_bounds(rows, rank, world)

    def cut(v: Any) -> Any:
        return v[lo:hi] if isinstance(v, Tensor) and v.dim() >= 1 else v

    if isinstance(item, Mapping):
        return {k: cut(v) for k, v in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(cut(v) for v in item)
    return cut(item)


class Comm:
    """Collectives of the default process group on lists of tensors (flattened into one
    buffer per dtype and device, so one call per dtype whatever the number of tensors)."""

    def __init__(self):
        self.dist = _dist()
        self.rank = self.dist.get_rank()
        self.world = self.dist.get_world_size()
        backend = str(self.dist.get_backend())
        # a group with only NCCL cannot move CPU tensors: they travel through the GPU
        self._via_cuda = "nccl" in backend and "gloo" not in backend

    def _comm_device(self, t: Tensor) -> torch.device:
        if self._via_cuda and t.device.type == "cpu":
            return torch.device("cuda", torch.cuda.current_device())
        return t.device

    def _flat(self, tensors: list[Tensor], op) -> None:
        groups: dict = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for group in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dev = self._comm_device(flat)
            moved = flat.to(dev)
            op(moved)
            flat = moved.to(flat.device) if dev != flat.device else moved
            offset = 0
            with torch.no_grad():
                for t in group:
                    n = t.numel()
                    t.copy_(flat[offset:offset + n].view_as(t))
                    offset += n

    def all_reduce_(self, tensors: list[Tensor]) -> None:
        """Sum each tensor over the ranks, in place."""
        self._flat(tensors, lambda t: self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM))

    def broadcast_(self, tensors: list[Tensor], src: int = 0) -> None:
        """Overwrite each tensor with rank ``src``'s, in place."""
        if tensors:
            self._flat(tensors, lambda t: self.dist.broadcast(t, src=src))

    def sum_grads_(self, params: list[Tensor], flags: list[float] = ()) -> list[float]:
        """Sum the gradients of ``params`` over the ranks; also sum ``flags`` (plain
        numbers, e.g. a stop request) in the same call and return them. A parameter keeps
        ``grad=None`` when no rank gave it a gradient (as one process would)."""
        dtype, device = (params[0].dtype, params[0].device) if params else (torch.float32, "cpu")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params] + list(flags),
                           dtype=dtype, device=device)
        self.all_reduce_(grads + [has])
        for p, g, h in zip(params, grads, has.tolist()):
            p.grad = g if h > 0 else None
        return has.tolist()[len(params):]

    def same_everywhere(self, text: str) -> bool:
        """Whether every rank passed the same ``text`` (the same answer on every rank)."""
        digest = int.from_bytes(hashlib.sha1(text.encode()).digest()[:7], "little")
        both = torch.tensor([digest, -digest], dtype=torch.int64)
        self._flat([both], lambda t: self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX))
        return int(both[0]) == -int(both[1])

    def barrier(self) -> None:
        self.dist.barrier()

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes | None:
        """Rank ``src``'s bytes (None stays None) on every rank."""
        size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64)
        self.broadcast_([size], src)
        n = int(size.item())
        if n < 0:
            return None
        buf = torch.zeros(n, dtype=torch.uint8)
        if self.rank == src:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.broadcast_([buf], src)
        return data if self.rank == src else buf.numpy().tobytes()
