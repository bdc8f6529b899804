"""Attention-probability-matrix (APM) math of a BERT-style self-attention module.

What the build computes (:func:`compute_apm`: SDPA does not return the APM, so it is
recomputed from Q/K and the mask) and what a hit computes instead of the attention
(:func:`apm_context`: ``APM_stored @ V_live``), plus the bookkeeping both share: the real
length of each sequence from the mask the module receives, and row selection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lookupc.memo.data import real_lengths_2d

__all__ = ["compute_apm", "apm_times_value", "apm_context", "real_lengths", "take_rows", "slice_mask",
           "is_tracing"]


def real_lengths(mask: Tensor | None, batch: int, seq_len: int) -> Tensor:
    """``[batch]`` real lengths from the mask a self-attention module receives; -1 where the mask
    is not "every query sees exactly the first n keys" (left padding, holes, causal)."""
    if mask is None:
        return torch.full((batch,), seq_len, dtype=torch.long)
    if mask.dim() == 2:
        return real_lengths_2d(mask, batch, seq_len)
    vis = mask if mask.dtype == torch.bool else mask == 0
    vis = vis.reshape(vis.shape[0], -1, vis.shape[-2], vis.shape[-1])
    kv = vis[:, 0, 0, :]
    same = (vis == kv[:, None, None, :]).flatten(1).all(1)
    n = kv.sum(1)
    prefix = (kv == (torch.arange(kv.shape[-1])[None, :] < n[:, None])).all(1)
    out = torch.where(same & prefix & (kv.shape[-1] == seq_len), n, torch.full_like(n, -1))
    return out.expand(batch).clone() if out.shape[0] == 1 else out


def is_tracing() -> bool:
    """True under torch.export / torch.compile: the lookup is host-side Python (faiss, memmap),
    so traced graphs get the original attention (this is what lets the LookupFFN pass,
    which exports the model, run on a memoized model)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def take_rows(x: Tensor, rows: Tensor, n: int) -> Tensor:
    """``x[rows, :n]``, without a copy when ``rows`` is the whole batch in order."""
    if len(rows) == x.shape[0] and bool((rows == torch.arange(len(rows))).all()):
        return x[:, :n]
    return x[rows, :n]


def slice_mask(mask: Tensor | None, rows: Tensor) -> Tensor | None:
    """The attention mask of ``rows`` of the batch (a mask broadcast over the batch as is)."""
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[rows]


def compute_apm(attn: nn.Module, hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T * scaling + mask) ``[B, heads, L, L]`` of a BERT-style self-attention module."""
    b, L, _ = hidden.shape
    heads, dh = attn.num_attention_heads, attn.attention_head_size
    q = attn.query(hidden).view(b, L, heads, dh).transpose(1, 2)
    k = attn.key(hidden).view(b, L, heads, dh).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-1, -2)) * getattr(attn, "scaling", dh ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1)


def apm_times_value(attn: nn.Module, hidden: Tensor, apm: Tensor) -> Tensor:
    """The hit path for one unpadded sequence: ``(APM @ V)`` reshaped to ``[L, heads * dh]``."""
    L = hidden.shape[-2]
    v = attn.value(hidden).view(L, attn.num_attention_heads, attn.attention_head_size).transpose(0, 1)
    return torch.matmul(apm.to(v.dtype), v).transpose(0, 1).reshape(L, -1)


def apm_context(attn: nn.Module, hidden: Tensor, apm: Tensor, seq_len: int) -> Tensor:
    """Hit path for ``k`` sequences of real length ``n``: hidden ``[k, n, H]``, APMs ``[k, heads, n, n]``
    -> ``[k, seq_len, heads * dh]``; padding rows get uniform attention over the ``n`` real tokens."""
    k, n = hidden.shape[0], hidden.shape[1]
    heads, dh = attn.num_attention_heads, attn.attention_head_size
    v = attn.value(hidden).view(k, n, heads, dh).transpose(1, 2)
    ctx = torch.matmul(apm.to(v.dtype), v).transpose(1, 2).reshape(k, n, heads * dh)
    if n == seq_len:
        return ctx
    pad = v.mean(2).reshape(k, 1, heads * dh).expand(k, seq_len - n, heads * dh)
    return torch.cat([ctx, pad], 1)
