"""Progress on stderr for long work: a tqdm bar on a terminal, plain lines elsewhere.

On a terminal, :func:`progress` is ``tqdm``. When stderr is not a terminal (CI logs, a
pipe, a file), a bar's carriage returns would leave one long line of overwritten
fragments, so it prints whole lines instead: ``desc: n/total (postfix)``, at most every
``interval`` seconds, plus one when the work ends.
"""

from __future__ import annotations

import sys
import time

__all__ = ["progress", "write"]


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(*, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, interval: float = 10.0, file=None, **tqdm_kwargs):
    """A progress bar (``update``, ``set_postfix_str``, ``set_description``, ``close``)."""
    stream = file or sys.stderr
    if _is_tty(stream):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, disable=disable, file=stream,
                    dynamic_ncols=True, **tqdm_kwargs)
    return _Lines(total, desc, unit, disable, interval, stream)


def write(message: str, file=None) -> None:
    """Print a line without breaking a bar on a terminal."""
    stream = file or sys.stderr
    if _is_tty(stream):
        from tqdm import tqdm

        tqdm.write(message, file=stream)
    else:
        print(message, file=stream, flush=True)


class _Lines:
    """The subset of tqdm's interface lookupc uses, as whole lines."""

    def __init__(self, total, desc, unit, disable, interval, stream):
        self.total, self.desc, self.unit = total, desc, unit
        self.disable, self.interval, self.stream = disable, interval, stream
        self.n, self.postfix, self._last, self._start = 0, "", 0.0, time.monotonic()
        self._closed = False

    def _emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.disable or (not force and now - self._last < self.interval):
            return
        self._last = now
        of = f"/{self.total}" if self.total is not None else ""
        extra = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.n}{of} {self.unit}{extra} [{now - self._start:.0f} s]",
              file=self.stream, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._emit(force=self.total is not None and self.n >= self.total)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s
        self._emit()

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc
        self._emit()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.total is None or self.n < self.total:
                self._emit(force=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
