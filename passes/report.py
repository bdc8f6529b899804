"""What :func:`lookupc.convert` did: :class:`MatchedFFN` rows and the :class:`ConversionReport`.

FLOPs are per token (multiply-add = 2, bias adds counted, activation not), summed
over the replaced FFNs: ``flops_before`` for the dense FFNs, ``flops_after`` for the
LookupFFNs that replace them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lookupc.config import LookupConfig

from .match_ffn import Skipped

__all__ = ["MatchedFFN", "ConversionReport"]


@dataclass
class MatchedFFN:
    """One replaced FFN. ``rel_error`` is set by distillation (held-out relative error).

    ``calls`` is how often the FFN runs per forward (> 1 for shared layers such as
    ALBERT's); the FLOPs count every call, the table bytes once.
    """

    name: str
    d_in: int
    d_hidden: int
    d_out: int
    activation: str
    form: str
    config: LookupConfig
    flops_before: int
    flops_after: int
    table_bytes: int
    rel_error: float | None = None
    calls: int = 1
    #: relative error of the stored tables after quantisation (``lookupc.table_quant``)
    table_error: float | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "d_in": self.d_in, "d_hidden": self.d_hidden,
                "d_out": self.d_out, "activation": self.activation, "form": self.form,
                "config": self.config.to_dict(), "flops_before": self.flops_before,
                "flops_after": self.flops_after, "table_bytes": self.table_bytes,
                "rel_error": self.rel_error, "calls": self.calls,
                "table_error": self.table_error}


@dataclass
class ConversionReport:
    """Matched and skipped FFNs with FLOPs per token and table memory."""

    matched: list[MatchedFFN] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    #: set by whole-model distillation (``distill_options={"model_steps": n}``):
    #: ``before``/``after`` relative output error on held-out calibration items.
    model_error: dict | None = None
    #: the converted model against the original on the example inputs
    #: (:func:`lookupc.fidelity.measure`): rel_error, cosine_mean, cosine_min
    fidelity: dict | None = None

    @property
    def flops_before(self) -> int:
        return sum(m.flops_before for m in self.matched)

    @property
    def flops_after(self) -> int:
        return sum(m.flops_after for m in self.matched)

    @property
    def table_bytes(self) -> int:
        return sum(m.table_bytes for m in self.matched)

    def to_dict(self) -> dict:
        return {"matched": [m.to_dict() for m in self.matched],
                "skipped": [{"location": s.location, "reason": s.reason} for s in self.skipped],
                "flops_before": self.flops_before, "flops_after": self.flops_after,
                "table_bytes": self.table_bytes, "model_error": self.model_error,
                "fidelity": self.fidelity}

    def _rows(self) -> list[list[str]]:
        quantised = any(m.table_error is not None for m in self.matched)
        rows = [["location", "d_in-d_hid-d_out", "act", "form", "h x tau / bs",
                 "FLOPs dense", "FLOPs lookup", "tables", "rel_err"]
                + (["table_err"] if quantised else [])]
        for m in self.matched:
            c = m.config
            form = m.form if m.calls == 1 else f"{m.form} x{m.calls}"
            dtype = "" if c.table_dtype == "float32" else f" {c.table_dtype}"
            rows.append([m.name, f"{m.d_in}-{m.d_hidden}-{m.d_out}", m.activation, form,
                         f"{c.tables}x{c.bits} / {c.block_size}", f"{m.flops_before:,}",
                         f"{m.flops_after:,}", _bytes(m.table_bytes) + dtype,
                         "-" if m.rel_error is None else f"{m.rel_error:.4f}"]
                        + (["-" if m.table_error is None else f"{m.table_error:.4f}"]
                           if quantised else []))
        return rows

    def _dtype_summary(self) -> str:
        """`` (int8: 3.1 MiB, float32: 1.0 MiB)`` when the tables are not all float32."""
        per: dict[str, int] = {}
        for m in self.matched:
            per[m.config.table_dtype] = per.get(m.config.table_dtype, 0) + m.table_bytes
        if set(per) == {"float32"}:
            return ""
        return " (" + ", ".join(f"{d}: {_bytes(b)}" for d, b in sorted(per.items())) + ")"

    def __str__(self) -> str:
        rows = self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [f"lookupc conversion: {len(self.matched)} FFN(s) replaced, "
                 f"{len(self.skipped)} skipped", fmt(rows[0]), fmt(["-" * w for w in widths])]
        lines += [fmt(r) for r in rows[1:]]
        if self.matched:
            ratio = self.flops_before / max(1, self.flops_after)
            lines.append(f"total FFN FLOPs/token: {self.flops_before:,} -> {self.flops_after:,} "
                         f"(dense/lookup {ratio:.2f}x); tables {_bytes(self.table_bytes)}"
                         + self._dtype_summary())
        if self.model_error:
            e = self.model_error
            where = (f"{e['held_out_items']} held-out calibration item(s)" if e["held_out_items"]
                     else f"its {e.get('eval_items', '?')} training item(s) (under 10 items: none "
                          f"held out)")
            cos = (f", pooled cosine {e['cosine_before']:.4f} -> {e['cosine_after']:.4f}"
                   if "cosine_after" in e else "")
            stop = " (interrupted; resume from the checkpoint)" if e.get("interrupted") else ""
            procs = e.get("processes", 1)
            stop += f", data parallel on {procs} processes" if procs > 1 else ""
            lines.append(f"whole-model distillation ({e['steps']} steps{stop}): output rel. "
                         f"error {e['before']:.4f} -> {e['after']:.4f}{cos} on {where}")
        if self.fidelity is not None:
            from lookupc.fidelity import describe

            lines.append(describe(self.fidelity))
        for s in self.skipped:
            lines.append(f"skipped {s.location}: {s.reason}")
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
