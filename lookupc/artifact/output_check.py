"""Is an artifact's output the converted model's output? One check for compile, run and load.

The artifact runs the compiled TVM kernels; the reference runs the same program on the
PyTorch reference ops. Both are float32, so they agree to rounding (about 1e-6 relative)
except where a soft code sits within rounding of zero and one bit of its code flips. The
tolerance is ``RTOL`` times the largest reference output (at least ``RTOL`` absolute):
1e-3, three orders above float32 rounding and far below what a wrong kernel gives (the
AVX-512 naive-hash defect of issue 13 gave 0.39 at outputs up to 3.75, 1.05e-1 relative).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import OutputMismatchError

__all__ = ["RTOL", "OutputCheck", "compare_outputs", "rest_dtype_note"]

RTOL = 1e-3


@dataclass(frozen=True)
class OutputCheck:
    """Largest absolute difference, largest reference output, and the tolerance applied."""

    max_abs_diff: float
    scale: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self, what: str) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"check   {what}: max abs diff {self.max_abs_diff:.3g} <= tolerance "
                f"{self.tolerance:.3g} (outputs up to {self.scale:.3g}): {verdict}"
                if self.ok else
                f"check   {what}: max abs diff {self.max_abs_diff:.3g} exceeds the float32 "
                f"tolerance {self.tolerance:.3g} (= {RTOL:g} x largest output {self.scale:.3g})"
                f": {verdict}")

    def raise_if_failed(self, what: str, hint: str = "") -> None:
        if not self.ok:
            raise OutputMismatchError(self.line(what).removeprefix("check   ")
                                      .removesuffix(": FAILED") + hint)


def compare_outputs(got, want) -> OutputCheck:
    """Compare two sequences of tensors (artifact outputs, reference outputs)."""
    got, want = list(got), list(want)
    if len(got) != len(want):
        raise OutputMismatchError(f"the artifact gave {len(got)} outputs, the reference "
                                  f"{len(want)}")
    err, scale = 0.0, 0.0
    for a, b in zip(got, want):
        if tuple(a.shape) != tuple(b.shape):
            raise OutputMismatchError(f"output shape {tuple(a.shape)} differs from the "
                                      f"reference's {tuple(b.shape)}")
        if b.numel():
            diff = (a.float() - b.float()).abs()
            # NaN/inf where the reference is finite is as wrong as it gets
            diff = diff.nan_to_num(nan=float("inf"), posinf=float("inf"))
            err = max(err, float(diff.max()))
            scale = max(scale, float(b.float().abs().max()))
    return OutputCheck(err, scale, RTOL * max(1.0, scale))


def rest_dtype_note(rest_dtype: str) -> str:
    """What a kernel check's line adds when the artifact's rest layers are not float32
    (the check runs them in float32, so it measures the kernels alone)."""
    if rest_dtype == "float32":
        return ""
    return f" (rest layers in float32 for the check; they run in {rest_dtype})"
