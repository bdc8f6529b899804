"""``LookupFFN``: the nn.Module that holds BH4 weights, tables and bias and calls the ops."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.lookupc.*)
from . import reference as ref
from .config import LookupConfig, lookup_flops, num_repeats, padded_width
from .errors import LookupcInputError

__all__ = ["LookupFFN", "dense_ffn_flops"]


def dense_ffn_flops(d_in: int, d_hidden: int, d_out: int) -> int:
    """FLOPs per token of Linear(d_in, d_hidden) -> GELU -> Linear(d_hidden, d_out).

    A multiply-add counts 2, each bias add 1; the activation is not counted.
    """
    return 2 * d_in * d_hidden + d_hidden + 2 * d_hidden * d_out + d_out


class LookupFFN(nn.Module):
    """A LookupFFN mapping ``[..., d_in]`` to ``[..., d_out]``.

    Parameters
    ----------
    d_in, d_out : int
        Input and output widths (independent of each other).
    config : LookupConfig, optional
        Hyper-parameters; defaults to ``LookupConfig.for_ffn(d_in, 4 * d_in)``.

    Examples
    --------
    >>> ffn = LookupFFN(384, 384, LookupConfig(tables=96, bits=8, block_size=64))
    >>> ffn(torch.randn(2, 5, 384)).shape
    torch.Size([2, 5, 384])
    """

    def __init__(self, d_in: int, d_out: int, config: LookupConfig | None = None):
        super().__init__()
        if not isinstance(d_in, int) or d_in < 1:
            raise LookupcInputError(f"LookupFFN.d_in must be a positive int, got {d_in!r}")
        if not isinstance(d_out, int) or d_out < 1:
            raise LookupcInputError(f"LookupFFN.d_out must be a positive int, got {d_out!r}")
        config = config or LookupConfig.for_ffn(d_in, 4 * d_in, d_out)
        config.check_for(d_in)
        self.d_in, self.d_out, self.config = d_in, d_out, config
        width = padded_width(d_in)
        bs = config.block_size
        repeats = num_repeats(d_in, config.tables, config.bits)
        self.bh4_weight = nn.Parameter(
            torch.randn(repeats, 4, width // bs, bs, bs) / math.sqrt(bs * width))
        self.hash_bias = nn.Parameter(torch.zeros(config.code_width))
        self.tables = nn.Parameter(0.02 * torch.randn(config.tables, 1 << config.bits, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))
        if config.table_dtype != "float32":
            self.config = replace(config, table_dtype="float32")
            self.quantize_tables(config.table_dtype)

    def quantize_tables(self, dtype: str) -> float:
        """Store the tables in ``dtype`` (``"bfloat16"`` or ``"int8"``), in place.

        The float32 parameter is replaced by a buffer (the module is then inference-only:
        a backward through it raises). Returns the relative error of the stored tables,
        ``||T_q - T|| / ||T||`` (0.0 when ``dtype`` is already the tables' dtype).
        """
        if dtype == self.config.table_dtype:
            return 0.0
        replace(self.config, table_dtype=dtype)  # validates the name
        if self.config.table_dtype != "float32":
            raise LookupcInputError(
                f"LookupFFN.quantize_tables: the tables are already {self.config.table_dtype}; "
                f"quantise from float32 tables")
        if dtype == "float32":
            raise LookupcInputError("LookupFFN.quantize_tables: dtype must be 'bfloat16' or "
                                    "'int8' (reduced-precision tables do not go back)")
        master = self.tables.detach()
        q, scale = ref.quantize_tables(master, dtype)
        deq = ref.dequantize_tables(q, scale).to(master.dtype)
        err = float((deq - master).norm() / master.norm().clamp_min(1e-30))
        del self.tables
        self.register_buffer("tables", q)
        self.register_buffer("table_scale", scale)
        self.config = replace(self.config, table_dtype=dtype)
        return err

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .double() must not cast stored tables or their scales: they are
        # viewed as integers (which dtype casts skip) while the move applies, then back.
        if self.config.table_dtype == "float32":
            return super()._apply(fn, recurse)
        kept = {name: self._buffers[name].dtype for name in ("tables", "table_scale")
                if self._buffers.get(name) is not None}
        as_int = {torch.bfloat16: torch.int16, torch.float32: torch.int32}
        for name, dtype in kept.items():
            if dtype in as_int:
                self._buffers[name] = self._buffers[name].view(as_int[dtype])
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, dtype in kept.items():
                self._buffers[name] = self._buffers[name].view(dtype)

    @property
    def padded_width(self) -> int:
        return padded_width(self.d_in)

    @property
    def repeats(self) -> int:
        return self.bh4_weight.shape[0]

    def hash(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores (float) and codes (int32) of ``x`` [..., d_in], each [..., tables]."""
        return torch.ops.lookupc.hash(x, self.bh4_weight, self.hash_bias,
                                      float(self.config.decay), self.config.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores, codes = self.hash(x)
        if self.config.table_dtype == "float32":
            return torch.ops.lookupc.gather(codes, scores, self.tables, self.bias)
        return torch.ops.lookupc.gather_quantized(codes, scores, self.tables, self.table_scale,
                                                  self.bias)

    def hash_flops_per_token(self) -> int:
        """BH4 (4 rounds of block matmul + FWHT per repeat), mix, bias, codes and scores."""
        return lookup_flops(self.d_in, self.d_out, self.config)[0]

    def gather_flops_per_token(self) -> int:
        """One multiply-add per table and output column, plus the bias."""
        return lookup_flops(self.d_in, self.d_out, self.config)[1]

    def flops_per_token(self) -> int:
        """FLOPs per token (multiply-add = 2): hash + gather. See the two parts."""
        return self.hash_flops_per_token() + self.gather_flops_per_token()

    def table_bytes(self) -> int:
        """Bytes of the lookup tables (int8 row scales included)."""
        scale = getattr(self, "table_scale", None)
        extra = 0 if scale is None else scale.numel() * scale.element_size()
        return self.tables.numel() * self.tables.element_size() + extra

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_in={self.d_in}, d_out={self.d_out}, tables={c.tables}, bits={c.bits}, "
                f"block_size={c.block_size}, decay={c.decay}, repeats={self.repeats}"
                + ("" if c.table_dtype == "float32" else f", table_dtype={c.table_dtype}"))
