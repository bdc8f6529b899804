"""Tensors placed against an inaccessible guard page, to catch out-of-bounds kernel accesses.

``guarded(t, side)`` copies ``t`` into an anonymous mapping laid out so that the tensor's
last byte is the last byte before a ``PROT_NONE`` page (``side="end"``) or its first byte
is the first byte after one (``side="start"``). Any read or write past that edge faults
(SIGSEGV), so callers run the kernels in a subprocess and treat a signal as a failure.
Tensors keep their mapping alive; the guard stays until the process exits.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch

PROT_NONE = 0
PAGE = os.sysconf("SC_PAGE_SIZE")
_LIBC = ctypes.CDLL(None, use_errno=True)
_KEEP: list = []  # mappings must outlive the tensors viewing them


def _protect(addr: int, size: int) -> None:
    if _LIBC.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(size), PROT_NONE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed")


def guarded(t: torch.Tensor, side: str = "end") -> torch.Tensor:
    """A copy of contiguous ``t`` that ends (or starts) exactly at a guard page."""
    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    if nbytes % 64:
        raise ValueError(f"{nbytes} bytes: keep sizes a multiple of 64 so the placement is "
                         "64-byte aligned (misaligned tensors are copied by the kernels)")
    data_pages = -(-max(nbytes, 1) // PAGE)
    mm = mmap.mmap(-1, (data_pages + 1) * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    if side == "end":
        offset = data_pages * PAGE - nbytes
        guard = base + data_pages * PAGE
    elif side == "start":
        offset = PAGE
        guard = base
    else:
        raise ValueError(f"side must be 'end' or 'start', got {side!r}")
    flat = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
    out = flat.view(t.dtype).view(t.shape)
    out.copy_(t)
    _protect(guard, PAGE)
    _KEEP.append(mm)
    return out
