"""The ``tuned`` schedule: MetaSchedule database written, reloaded and used without re-tuning.

Tolerances as in test_kernels.py (codes exact away from |z| < 1e-4, rtol 1e-4).
"""

import json
import os

import pytest
import torch
from test_kernels import check_hash, make_ffn, ref

from lookupc import tvm_shim
from lookupc.kernels.shapes import KernelShapes
from lookupc.runtime import build as K


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKUPC_CACHE_DIR", str(tmp_path / "kernel_cache"))
    K.clear_memory_cache()
    yield
    K.clear_memory_cache()


def _check_pair(m, kernels):
    x = torch.randn(19, m.d_in)
    codes, scores = kernels.hash(x, m.bh4_weight, m.hash_bias, 0.7)
    check_hash(m, x, codes, scores)
    tables, bias = m.tables.detach(), m.bias.detach()
    torch.testing.assert_close(kernels.gather(codes, scores, tables, bias),
                               ref.gather_forward(codes, scores, tables, bias),
                               rtol=1e-4, atol=1e-5)


def test_tuned_without_records_falls_back_to_hand_knobs(tmp_path):
    m = make_ffn("A")
    with pytest.warns(UserWarning, match="no tuning record for the hash kernel"):
        kernels = K.build(KernelShapes.of(m), schedule="tuned",
                          tuning_db=str(tmp_path / "empty_db"))
    _check_pair(m, kernels)


@pytest.mark.slow
def test_tuning_database_written_reloaded_and_used_without_retuning(tmp_path, monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    from lookupc.schedules.cpu import tuned

    m = make_ffn("A")
    shapes = KernelShapes.of(m)
    db = str(tmp_path / "db")
    target = tvm_shim.make_target()
    lines = []
    K.tune([shapes], target, db, trials=2, cost_model="random", log=lines.append)
    assert any("tuning" in line for line in lines)
    records = os.path.join(db, "database_tuning_record.json")
    with open(records) as f:
        count = sum(1 for line in f if line.strip())
    assert count >= 3  # >= 2 hash records + >= 1 gather record (its space may be tiny)
    json.loads(open(records).readline())

    # From here on MetaSchedule must not search again.
    def no_tuning(*args, **kwargs):
        raise AssertionError("tune_tir called although the database has the records")

    monkeypatch.setattr(ms, "tune_tir", no_tuning)
    lines.clear()
    K.tune([shapes], target, db, trials=2, cost_model="random", log=lines.append)
    assert all("skipped" in line for line in lines), lines
    knobs = tuned.best_knobs("hash", shapes, target, db)
    assert knobs is not None and len(knobs) == 3
    assert tuned.best_knobs("gather", shapes, target, db) is not None
    kernels = K.build(shapes, target, schedule="tuned", tuning_db=db)
    _check_pair(m, kernels)


def test_benchmark_rows_say_when_tuned_has_no_records(tmp_path):
    """compare/bench label a tuned build without records as such, never as tuned."""
    import torch

    import lookupc
    from lookupc import perf

    ffn = lookupc.LookupFFN(24, 20, lookupc.LookupConfig(tables=12, bits=4, block_size=8))
    names = perf.lookup_variants(ffn, torch.randn(16, 24), ["tuned"],  # prints a note
                                 str(tmp_path / "empty"), 16)
    assert "tvm-tuned-no-records" in names and "tvm-tuned" not in names


@pytest.mark.slow
def test_interrupted_tune_keeps_its_records_and_resumes(tmp_path):
    """SIGINT after the first committed chunk: the records stay, and a rerun completes."""
    import signal
    import subprocess
    import sys
    import time

    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "lookupc.cli", "tune", "--config", "64x256", "--db", str(db),
           "--trials", "12", "--cost-model", "random"]
    records = db / "database_tuning_record.json"

    def count() -> int:
        return len(records.read_text().splitlines()) if records.is_file() else 0

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, LOOKUPC_CACHE_DIR=str(tmp_path / "cache")))
    deadline = time.time() + 600
    while count() == 0 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.5)
    assert count() > 0, "no record was committed"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    kept = count()
    assert kept > 0
    if proc.returncode != 0:  # interrupted (it may also have finished just before the signal)
        assert "interrupted" in err and "resume" in err, err[-2000:]
    assert "DEBUG" not in err  # TVM's logs went to the log file
    # per-chunk progress lines
    assert "trials measured" in err or "skipped" in err, err[-2000:]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, LOOKUPC_CACHE_DIR=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr[-2000:]
    assert count() >= kept
    assert "already recorded" in r.stderr or "skipped" in r.stderr
    assert list((db / "logs").rglob("*.log"))  # TVM's logs, in files


def test_tuning_runs_with_unnamed_handlers_on_the_metaschedule_logger(tmp_path):
    """MetaSchedule's log setup names every handler of its logger and fails on an unnamed
    one (pytest's capture leaves two): they are detached during a run and put back."""
    import logging

    from lookupc.schedules.cpu.tune_run import _quiet_tvm_logs

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    stray = logging.NullHandler()
    ms_logger.addHandler(stray)
    try:
        with _quiet_tvm_logs(str(tmp_path), verbose=False):
            assert all(h.get_name() is not None for h in ms_logger.handlers)
        assert stray in ms_logger.handlers
    finally:
        ms_logger.removeHandler(stray)
