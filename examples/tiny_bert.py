"""A small BERT-like encoder with GELU feed-forward networks: the bundled example model.

``factory()`` returns ``(model, example_inputs)``, the form ``lookupc`` accepts as
``examples.tiny_bert:factory``::

    lookupc inspect examples.tiny_bert:factory
    lookupc compile examples.tiny_bert:factory -o tiny_bert.lookupc
    lookupc run tiny_bert.lookupc

Each layer is pre-norm attention followed by ``Linear(d, 4d) -> GELU -> Linear(4d, d)``,
the pattern lookupc replaces. Weights are random (seeded): the example is about the
compiler, not about accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TinyBert", "factory"]


class FeedForward(nn.Module):
    """``Linear(d, hidden) -> GELU -> Linear(hidden, d)``."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    """Pre-norm self-attention and feed-forward, each with a residual connection."""

    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ffn = FeedForward(d, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.ffn(self.norm2(x))


class TinyBert(nn.Module):
    """Token + position embeddings, ``layers`` encoder layers, a final LayerNorm."""

    def __init__(self, vocab: int = 1000, d: int = 128, heads: int = 4, layers: int = 2,
                 max_len: int = 128):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(max_len, d)
        self.layers = nn.ModuleList(Layer(d, heads, 4 * d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(pos)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def factory(batch: int = 2, seq_len: int = 32) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The example model (eval mode, seeded weights) and a batch of token ids."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TinyBert().eval()
    input_ids = torch.randint(0, 1000, (batch, seq_len), generator=gen)
    return model, (input_ids,)
