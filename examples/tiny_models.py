"""Small hand-written models with and without Linear -> GELU -> Linear FFNs.

Used by the frontend tests (golden graphs, negative cases) and handy for trying
``lookupc.find_ffns`` / ``lookupc.convert``. Every model maps ``x [B, T, D]`` to
``[B, T, D]`` (D = 16 by default) and :data:`EXPECTED` says how many FFNs each has.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

D, H = 16, 64


class ModuleFFN(nn.Module):
    """fc1 / act / fc2 as submodules (act: ``nn.GELU(approximate)``)."""

    def __init__(self, d: int = D, h: int = H, approximate: str = "none", dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.act = nn.GELU(approximate=approximate)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class FunctionalFFN(nn.Module):
    """``F.linear`` + ``F.gelu`` on raw parameters inside one forward."""

    def __init__(self, d: int = D, h: int = H, approximate: str = "none"):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(h, d) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(h))
        self.w2 = nn.Parameter(torch.randn(d, h) / math.sqrt(h))
        self.b2 = nn.Parameter(torch.zeros(d))
        self.approximate = approximate

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w1, self.b1), approximate=self.approximate)
        return x + F.linear(h, self.w2, self.b2)


class WrittenTanhFFN(nn.Module):
    """Linear submodules with the tanh GELU written out (GPT-Neo ``gelu_new``, BLOOM)."""

    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        h = self.fc1(x)
        inner = math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))
        h = 0.5 * h * (1.0 + torch.tanh(inner))
        return self.fc2(F.dropout(h, 0.1, self.training))


class MatmulLinear(nn.Module):
    """A Linear written as ``x @ W.T + b`` (Falcon's ``FalconLinear``)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        return x @ self.weight.T + self.bias


class MatmulFFN(nn.Module):
    """fc1 / fc2 as :class:`MatmulLinear` submodules around ``nn.GELU``."""

    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.fc1, self.act, self.fc2 = MatmulLinear(d, h), nn.GELU(), MatmulLinear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class BartLikeFFN(nn.Module):
    """Module fc1 / act / fc2 with a functional dropout between (BART, Whisper layers)."""

    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = F.dropout(self.act(self.fc1(x)), p=0.1, training=self.training)
        return self.norm(x + self.fc2(h))


class Block(nn.Module):
    """Pre-norm residual block around a nested ``mlp`` submodule."""

    def __init__(self, mlp: nn.Module, d: int = D):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), mlp

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Nested(nn.Module):
    """Two blocks in a ModuleList (one module-form, one functional FFN) and a head."""

    def __init__(self, d: int = D):
        super().__init__()
        self.blocks = nn.ModuleList([Block(ModuleFFN(d, dropout=0.1)), Block(FunctionalFFN(d))])
        self.head = nn.Linear(d, d)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class SharedAct(nn.Module):
    """Two FFNs that call one shared ``nn.GELU`` module (it cannot be swapped away)."""

    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.fc1a, self.fc2a = nn.Linear(d, h), nn.Linear(h, d)
        self.fc1b, self.fc2b = nn.Linear(d, h), nn.Linear(h, d)
        self.act = nn.GELU()

    def forward(self, x):
        x = x + self.fc2a(self.act(self.fc1a(x)))
        return x + self.fc2b(self.act(self.fc1b(x)))


class TiedFFN(nn.Module):
    """One FFN applied twice (shared weights): replaced nowhere, with a reason."""

    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.ffn = ModuleFFN(d, h)

    def forward(self, x):
        return self.ffn(self.ffn(x))


class ActFFN(nn.Module):
    """fc1 -> ``act`` -> fc2 for any activation module (negative cases)."""

    def __init__(self, act: nn.Module, d: int = D, h: int = H):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), act, nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SwiGLU(nn.Module):
    """LLaMA-style gated MLP: down(silu(gate(x)) * up(x)); also with GELU gating."""

    def __init__(self, d: int = D, h: int = H, act=F.silu):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class HiddenTwice(nn.Module):
    """The GELU output feeds fc2 and is also added to the result."""

    def __init__(self, d: int = D):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        return self.fc2(h) + h


class NormBetween(nn.Module):
    """fc2's input is a LayerNorm of the activation, not the activation itself."""

    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(d, h), nn.LayerNorm(h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


def negative_models() -> dict[str, nn.Module]:
    """Models with an FFN-like chain that must *not* be replaced."""
    return {
        "relu": ActFFN(nn.ReLU()),
        "silu": ActFFN(nn.SiLU()),
        "quick_gelu": ActFFN(QuickGELU()),
        "swiglu": SwiGLU(),
        "geglu": SwiGLU(act=F.gelu),
        "hidden_twice": HiddenTwice(),
        "norm_between": NormBetween(),
    }


def positive_models() -> dict[str, nn.Module]:
    """Models with Linear -> GELU -> Linear FFNs of each form."""
    return {
        "module": ModuleFFN(),
        "module_tanh": ModuleFFN(approximate="tanh"),
        "module_dropout": ModuleFFN(dropout=0.1),
        "functional": FunctionalFFN(),
        "functional_tanh": FunctionalFFN(approximate="tanh"),
        "written_tanh": WrittenTanhFFN(),
        "nested": Nested(),
        "shared_act": SharedAct(),
        "matmul": MatmulFFN(),
        "bart_like": BartLikeFFN(),
    }


EXPECTED = {"module": 1, "module_tanh": 1, "module_dropout": 1, "functional": 1,
            "functional_tanh": 1, "written_tanh": 1, "nested": 2, "shared_act": 2,
            "matmul": 1, "bart_like": 1}


def example_input(batch: int = 2, seq: int = 5, d: int = D) -> torch.Tensor:
    return torch.randn(batch, seq, d)


class TiedOutsideFFN(nn.Module):
    """fc1/fc2 reused once with GELU and once with ReLU between: must not be replaced."""

    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.GELU(), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) + self.fc2(torch.relu(self.fc1(x)))
