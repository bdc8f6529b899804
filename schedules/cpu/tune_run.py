"""Plumbing of a ``tuned`` search run: quiet logs, Ctrl-C that keeps finished trials, and
MetaSchedule's scratch directory next to the database (:mod:`lookupc.schedules.cpu.tuned`).
"""

from __future__ import annotations

import os
import signal


class _quiet_tvm_logs:
    """MetaSchedule logs every step at DEBUG to the console (its console handler takes the
    level of the ``tvm.s_tir.meta_schedule`` logger, DEBUG when unset) and to files under
    the work directory. Unless ``verbose``, raise that logger to WARNING so the console
    only shows problems; the files (``db_dir/logs/*.log``) keep everything.

    Handlers without a name on that logger are detached for the run and put back after:
    MetaSchedule's logging setup lists the logger's handlers by name and fails on an
    unnamed one (``'NoneType' object has no attribute 'format'``); pytest's log capture
    leaves two there once a tuning run has configured the logger."""

    def __init__(self, scratch: str, verbose: bool):
        self.verbose = verbose

    def __enter__(self):
        import logging

        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        self.unnamed = [h for h in ms_logger.handlers if h.get_name() is None]
        for h in self.unnamed:
            ms_logger.removeHandler(h)
        if not self.verbose:
            self.logger = logging.getLogger("tvm.s_tir.meta_schedule")
            self.level = self.logger.level
            self.logger.setLevel(logging.WARNING)
            self.filter = _DropLevelHint()
            self.logger.addFilter(self.filter)
        return self

    def __exit__(self, *exc) -> None:
        import logging

        ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
        for h in self.unnamed:
            if h not in ms_logger.handlers:
                ms_logger.addHandler(h)
        if not self.verbose:
            self.logger.setLevel(self.level)
            self.logger.removeFilter(self.filter)


class _DropLevelHint:
    """Drops MetaSchedule's "Logging level set to WARNING, please set to INFO" line."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Logging level set to")


class _StopOnInterrupt:
    """Ctrl-C during tuning: finish the chunk in flight, keep its records, then stop
    (``KeyboardInterrupt``). A second Ctrl-C interrupts at once. MetaSchedule runs much of
    a chunk in C++ and in worker pools, where a plain KeyboardInterrupt is swallowed or
    lands mid-write; stopping between chunks is what keeps the database whole."""

    def __init__(self, log):
        self.log, self.requested, self.previous = log, False, None

    def _handler(self, signum, frame) -> None:

        self.requested = True
        signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)
        self.log("interrupt: stopping after the trials in flight (Ctrl-C again to abort now)")

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        import threading

        if threading.current_thread() is threading.main_thread() and not self.requested:
            signal.signal(signal.SIGINT, self.previous or signal.default_int_handler)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


class tempfile_dir:
    """A scratch directory for tune_tir's logs under ``db_dir`` (kept for inspection)."""

    def __init__(self, db_dir: str):
        self.path = os.path.join(db_dir, "logs")

    def __enter__(self) -> str:
        os.makedirs(self.path, exist_ok=True)
        return self.path

    def __exit__(self, *exc) -> None:
        return None
