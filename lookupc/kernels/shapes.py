"""The sizes that fix one pair of LookupFFN kernels (:class:`KernelShapes`).

Its own module so that the TensorIR builders (``lookupc.kernels.forward``), the schedules and
the runtime (``lookupc.runtime.build``) all read it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TABLE_DTYPES, num_repeats, padded_width
from ..errors import LookupcInputError

__all__ = ["KernelShapes"]


@dataclass(frozen=True)
class KernelShapes:
    """Sizes that fix one pair of hash/gather kernels (the token count stays symbolic).

    Parameters
    ----------
    d_in, d_out : int
        Input and output widths.
    tables, bits : int
        Tables h and code bits tau (tables have ``2**bits`` rows).
    block_size : int
        BH4 block size BS (a power of two, at most the padded width).
    repeats : int
        BH4 repeats R (``ceil(tables * bits / padded_width)`` for a LookupFFN).
    table_dtype : str
        Storage dtype of the tables the gather reads (``lookupc.config.TABLE_DTYPES``).
    """

    d_in: int
    d_out: int
    tables: int
    bits: int
    block_size: int
    repeats: int
    table_dtype: str = "float32"

    def __post_init__(self) -> None:
        for field in ("d_in", "d_out", "tables", "bits", "block_size", "repeats"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LookupcInputError(f"KernelShapes.{field} must be a positive int, got {value!r}")
        if self.table_dtype not in TABLE_DTYPES:
            raise LookupcInputError(f"KernelShapes.table_dtype must be one of {', '.join(TABLE_DTYPES)}"
                             f", got {self.table_dtype!r}")
        bs = self.block_size
        if bs & (bs - 1) or bs > self.width:
            raise LookupcInputError(f"KernelShapes.block_size={bs} must be a power of two <= the "
                             f"padded width {self.width}")
        if self.tables * self.bits > self.repeats * self.width:
            raise LookupcInputError(f"KernelShapes.repeats={self.repeats} too few for "
                             f"{self.tables}x{self.bits} code bits at width {self.width}")

    @property
    def width(self) -> int:
        """Padded BH4 width D (next power of two >= d_in)."""
        return padded_width(self.d_in)

    @property
    def code_width(self) -> int:
        return self.tables * self.bits

    @property
    def key(self) -> str:
        """Short name used in kernel symbols, e.g. ``i512_o512_h128_t8_b64_r2`` (``_bf16`` or
        ``_i8`` appended for reduced-precision tables)."""
        suffix = {"float32": "", "bfloat16": "_bf16", "int8": "_i8"}[self.table_dtype]
        return (f"i{self.d_in}_o{self.d_out}_h{self.tables}_t{self.bits}_b{self.block_size}"
                f"_r{self.repeats}{suffix}")

    @classmethod
    def of(cls, module) -> "KernelShapes":
        """Shapes of a :class:`lookupc.LookupFFN`."""
        c = module.config
        return cls(module.d_in, module.d_out, c.tables, c.bits, c.block_size, module.repeats,
                   c.table_dtype)

    @classmethod
    def for_config(cls, d_in: int, d_out: int, config) -> "KernelShapes":
        """Shapes of a LookupFFN(d_in, d_out, config) without building one."""
        return cls(d_in, d_out, config.tables, config.bits, config.block_size,
                   num_repeats(d_in, config.tables, config.bits), config.table_dtype)
