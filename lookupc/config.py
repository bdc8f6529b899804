"""LookupFFN hyper-parameters (:class:`LookupConfig`) and the sizes derived from them.

A LookupFFN with ``tables`` = h and ``bits`` = tau hashes each token into h codes of
tau bits each (tables of 2**tau rows). The BH4 projection works on the input padded
to a power of two ``D = padded_width(d_in)``; when ``h * tau > D`` it is repeated
``R = repeats(...)`` times with independent weights and the outputs concatenated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .errors import LookupcInputError

__all__ = ["LookupConfig", "padded_width", "num_repeats", "lookup_flops", "table_bytes",
           "cheaper_configs", "SizeOverride", "TABLE_DTYPES"]

# Storage dtypes of the tables and their bytes per element. float32 tables train; bfloat16
# and int8 (symmetric, one float32 scale per table row) are for inference: training keeps
# float32 master tables and conversion quantises them (``LookupFFN.quantize_tables``).
TABLE_DTYPES = {"float32": 4, "bfloat16": 2, "int8": 1}
# precisions the rest of a converted model (its remaining linear layers) can run in
# (lookupc.compose; lookupc compile|run --rest-dtype)
REST_DTYPES = ("float32", "int8", "bfloat16")


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0


def padded_width(d_in: int) -> int:
    """Smallest power of two >= ``d_in`` (the width BH4 works on)."""
    if not isinstance(d_in, int) or d_in < 1:
        raise LookupcInputError(f"d_in must be a positive int, got {d_in!r}")
    return 1 << (d_in - 1).bit_length()


def num_repeats(d_in: int, tables: int, bits: int) -> int:
    """Number of independent BH4 repeats needed to produce ``tables * bits`` outputs."""
    return max(1, math.ceil(tables * bits / padded_width(d_in)))


@dataclass(frozen=True)
class LookupConfig:
    """Hyper-parameters of one LookupFFN.

    Parameters
    ----------
    tables : int
        Number of hash tables h (>= 1).
    bits : int
        Code length tau (1..16); each table has ``2**bits`` rows.
    block_size : int
        Size of the square blocks of the BH4 block-diagonal matrices (a power of two,
        at most the padded input width; checked by :meth:`check_for`).
    decay : float
        Mix of the BH4 output and the (repeated, padded) input:
        ``z = decay * BH4(x) + (1 - decay) * x``, in [0, 1]. The paper's code uses 0.7.
    table_dtype : str
        How the tables are stored: ``"float32"`` (trainable), ``"bfloat16"`` or ``"int8"``
        (inference only; int8 rows carry a float32 scale each, ``row = scale * int8``; the
        gather accumulates in float32). See :data:`TABLE_DTYPES`.

    Examples
    --------
    >>> LookupConfig(tables=128, bits=8, block_size=64).table_rows
    32768
    """

    tables: int = 128
    bits: int = 8
    block_size: int = 64
    decay: float = 0.7
    table_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.tables, int) or isinstance(self.tables, bool) or self.tables < 1:
            raise LookupcInputError(f"LookupConfig.tables must be an int >= 1, got {self.tables!r}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 16:
            raise LookupcInputError(f"LookupConfig.bits must be an int in 1..16, got {self.bits!r}")
        if not _is_pow2(self.block_size) or isinstance(self.block_size, bool):
            raise LookupcInputError(
                f"LookupConfig.block_size must be a power of two, got {self.block_size!r}")
        if not isinstance(self.decay, (int, float)) or not 0.0 <= float(self.decay) <= 1.0:
            raise LookupcInputError(f"LookupConfig.decay must be a float in [0, 1], got {self.decay!r}")
        if self.table_dtype not in TABLE_DTYPES:
            raise LookupcInputError(
                f"LookupConfig.table_dtype must be one of {', '.join(TABLE_DTYPES)}, got "
                f"{self.table_dtype!r}")

    @property
    def table_rows(self) -> int:
        """Rows of all tables together, ``tables * 2**bits``."""
        return self.tables * (1 << self.bits)

    @property
    def code_width(self) -> int:
        """Width of the soft hash code, ``tables * bits``."""
        return self.tables * self.bits

    @property
    def table_itemsize(self) -> int:
        """Bytes per table element (4, 2 or 1)."""
        return TABLE_DTYPES[self.table_dtype]

    def check_for(self, d_in: int) -> None:
        """Raise ``ValueError`` if this config cannot serve an input of width ``d_in``."""
        width = padded_width(d_in)
        if self.block_size > width:
            raise LookupcInputError(
                f"LookupConfig.block_size={self.block_size} is larger than the padded input "
                f"width {width} (d_in={d_in})")

    @classmethod
    def for_ffn(cls, d_in: int, d_hidden: int, d_out: int | None = None) -> "LookupConfig":
        """Defaults sized from a dense FFN ``d_in -> d_hidden -> d_out``.

        Follows the paper's choice for d=512, hidden=2048 (h=128, tau=8, block 64):
        one 8-bit table per 16 hidden units, blocks of 64 (or the padded width when
        that is smaller).

        >>> LookupConfig.for_ffn(512, 2048)
        LookupConfig(tables=128, bits=8, block_size=64, decay=0.7)
        """
        if d_hidden < 1:
            raise LookupcInputError(f"d_hidden must be >= 1, got {d_hidden!r}")
        tables = max(1, d_hidden // 16)
        return cls(tables=tables, bits=8, block_size=min(64, padded_width(d_in)))

    @classmethod
    def for_distill(cls, d_in: int, d_hidden: int, d_out: int | None = None) -> "LookupConfig":
        """Defaults for converting a *trained* FFN (``init="distill"``).

        One 1-bit table per input feature (``padded_width(d_in)`` tables, one BH4 repeat),
        blocks of 32: the LookupFFN is then a pruned copy of the dense FFN whose first
        layer is a BH4 matrix, with ``2 * tables`` table rows, few enough that the table
        solve is exact and does not overfit a few hundred calibration sentences (8-bit
        tables have 128x more rows: on all-MiniLM-L6-v2 with 256 sentences they gave a
        pooled cosine of 0.20). MiniLM's 384-1536-384: 512 x 1, 4.3x fewer FLOPs.

        >>> LookupConfig.for_distill(384, 1536)
        LookupConfig(tables=512, bits=1, block_size=32, decay=0.7)
        """
        if d_hidden < 1:
            raise LookupcInputError(f"d_hidden must be >= 1, got {d_hidden!r}")
        width = padded_width(d_in)
        return cls(tables=width, bits=1, block_size=min(32, width))

    def to_dict(self) -> dict:
        return asdict(self)


def lookup_flops(d_in: int, d_out: int, config: LookupConfig) -> tuple[int, int]:
    """(hash, gather) FLOPs per token of a LookupFFN, from its sizes alone (no allocation).

    Hash: BH4 (4 rounds of block matmul + FWHT per repeat), mix, bias, codes and scores.
    Gather: one multiply-add per table and output column, plus the bias.
    """
    d, bs = padded_width(d_in), config.block_size
    r = num_repeats(d_in, config.tables, config.bits)
    code_width = config.code_width
    hash_flops = r * 4 * (2 * d * bs + d * int(math.log2(d))) + 3 * r * d + 5 * code_width
    return hash_flops, 2 * config.tables * d_out + d_out


def table_bytes(d_out: int, config: LookupConfig, itemsize: int | None = None) -> int:
    """Bytes of the tables ``[tables, 2**bits, d_out]`` in ``config.table_dtype`` (or
    ``itemsize`` bytes per element), int8 row scales included."""
    size = itemsize or config.table_itemsize
    scales = config.table_rows * 4 if size == 1 and itemsize is None else 0
    return config.tables * (1 << config.bits) * d_out * size + scales


def cheaper_configs(config: LookupConfig):
    """Configurations to try, cheapest last, when ``config`` costs more than the dense FFN:
    smaller BH4 blocks (halved, down to 8: the hash's block matmuls shrink), then fewer
    bits (8 -> 6 -> 4: tables 4x smaller each step), then fewer tables (halved)."""
    block, bits, tables = config.block_size, config.bits, config.tables
    while block > 8 or bits > 4 or tables > 1:
        if block > 8:
            block //= 2
        elif bits > 4:
            bits = max(4, bits - 2)
        else:
            tables = max(1, tables // 2)
        yield replace(config, tables=tables, bits=bits, block_size=block)


@dataclass(frozen=True)
class SizeOverride:
    """Some sizes given, the others per-FFN defaults (``LookupConfig.for_ffn``, or
    ``for_distill`` with ``distill=True``).

    What the CLI's ``--tables/--bits/--block-size`` mean: one flag changes only that size.
    Callable on an FFN match (``lookupc.convert(config=...)`` accepts callables).

    >>> SizeOverride(bits=6).for_ffn(384, 1536)
    LookupConfig(tables=96, bits=6, block_size=64, decay=0.7)
    """

    tables: int | None = None
    bits: int | None = None
    block_size: int | None = None
    distill: bool = False

    def for_ffn(self, d_in: int, d_hidden: int, d_out: int | None = None) -> LookupConfig:
        given = {k: v for k, v in asdict(self).items() if v is not None and k != "distill"}
        base = LookupConfig.for_distill if self.distill else LookupConfig.for_ffn
        return replace(base(d_in, d_hidden, d_out), **given)

    def __call__(self, match) -> LookupConfig:
        return self.for_ffn(match.d_in, match.d_hidden, match.d_out)
