"""``lookupc tune --rpc HOST:PORT --key KEY``: measuring candidates on a board behind a TVM
RPC tracker (MetaSchedule ``RPCRunner``), compiling here.

The default tests check the argument handling and the tracker probe against in-process
fakes on the loopback address (a socket that never answers, a tiny tracker that only
answers the summary request). The slow test starts a real ``tvm.exec.rpc_tracker`` and
``tvm.exec.rpc_server`` on 127.0.0.1, tunes the smallest gather through them and builds
from the records.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from lookupc.errors import LookupcError, LookupcInputError
from lookupc.kernels.shapes import KernelShapes
from lookupc.runtime import build as K
from lookupc.schedules.cpu import tuned

SHAPES = KernelShapes(64, 64, 16, 4, 16, 1)  # the smallest gather worth tuning


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOKUPC_CACHE_DIR", str(tmp_path / "kernel_cache"))
    K.clear_memory_cache()
    yield
    K.clear_memory_cache()


@pytest.fixture
def no_tuning(monkeypatch):
    """Fails the test if MetaSchedule starts tuning."""
    from tvm.s_tir import meta_schedule as ms

    def fail(*args, **kwargs):
        raise AssertionError("tune_tir called although the tracker check failed")

    monkeypatch.setattr(ms, "tune_tir", fail)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_tracker():
    """A listening socket that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock.getsockname()[1]
    sock.close()


class _FakeTracker:
    """Speaks just enough of the tracker protocol: the magic, then one SUMMARY reply."""

    def __init__(self, server_keys):
        from tvm.rpc import base

        self.base, self.keys = base, server_keys
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        base = self.base
        try:
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    base.recvall(conn, 4)
                    conn.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                    base.recvjson(conn)
                    info = [{"addr": ["127.0.0.1", 9090], "key": f"server:{k}"}
                            for k in self.keys]
                    queue = {k: {"free": 1, "pending": 0} for k in self.keys}
                    base.sendjson(conn, [base.TrackerCode.SUCCESS,
                                         {"server_info": info, "queue_info": queue}])
        except OSError:
            return

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("address,key,match", [
    ("127.0.0.1", "board", "HOST:PORT"),
    ("127.0.0.1:port", "board", "HOST:PORT"),
    ("127.0.0.1:70000", "board", "HOST:PORT"),
    ("127.0.0.1:9190", "", "key"),
    ("", "board", "without the tracker"),
])
def test_bad_rpc_arguments(address, key, match):
    with pytest.raises(LookupcInputError, match=match):
        tuned.parse_rpc(address, key)


def test_parse_rpc():
    assert tuned.parse_rpc("127.0.0.1:9190", "rasp") == ("127.0.0.1", 9190, "rasp")
    assert tuned.parse_rpc("[::1]:9190", "rasp").host == "::1"


def test_silent_tracker_is_a_clear_error_within_the_timeout(silent_tracker, tmp_path,
                                                            no_tuning):
    start = time.time()
    with pytest.raises(LookupcError) as info:
        K.tune([SHAPES], None, str(tmp_path / "db"), 2, cost_model="random",
               kinds=("gather",), rpc=f"127.0.0.1:{silent_tracker}", rpc_key="board",
               rpc_timeout=1.0, log=lambda _: None)
    assert time.time() - start < 10
    message = str(info.value)
    assert f"127.0.0.1:{silent_tracker}" in message and "'board'" in message
    assert "did not answer within 1 s" in message
    assert not (tmp_path / "db").exists()  # nothing started


def test_refused_tracker_is_a_clear_error():
    port = _free_port()  # closed again: nothing listens there
    start = time.time()
    with pytest.raises(LookupcError, match=f"cannot reach the RPC tracker 127.0.0.1:{port} "
                                           r"\(key 'board'\)"):
        tuned.check_tracker(tuned.parse_rpc(f"127.0.0.1:{port}", "board"), timeout=1.0)
    assert time.time() - start < 5


def test_tracker_without_a_server_for_the_key():
    fake = _FakeTracker(["other", "other"])
    try:
        remote = tuned.parse_rpc(f"127.0.0.1:{fake.port}", "board")
        with pytest.raises(LookupcError, match="no server registered under key 'board' "
                                               r"\(keys there: other\)"):
            tuned.check_tracker(remote, timeout=2.0)
        assert tuned.check_tracker(remote._replace(key="other"), timeout=2.0) == \
            {"servers": 2, "free": 1}
    finally:
        fake.close()


def test_cli_rpc_needs_key_and_reports_a_silent_tracker(silent_tracker, tmp_path, no_tuning):
    from lookupc.cli.main import cli

    base = ["tune", "--config", "64x256", "--db", str(tmp_path / "db"), "--trials", "2",
            "--cost-model", "random"]
    r = CliRunner().invoke(cli, base + ["--rpc", "127.0.0.1:9190"])
    assert r.exit_code != 0 and "--rpc HOST:PORT and --key KEY go together" in r.output
    r = CliRunner().invoke(cli, base + ["--key", "board"])
    assert r.exit_code != 0 and "go together" in r.output
    start = time.time()
    r = CliRunner().invoke(cli, base + ["--rpc", f"127.0.0.1:{silent_tracker}", "--key",
                                        "board", "--rpc-timeout", "1"])
    assert time.time() - start < 15
    assert r.exit_code != 0, r.output
    assert f"127.0.0.1:{silent_tracker}" in r.output and "did not answer" in r.output, r.output
    # a board's target that cannot run here is fine with --rpc (only the tracker fails)
    r = CliRunner().invoke(cli, base + ["--target", "llvm -mtriple=aarch64-linux-gnu",
                                        "--rpc", f"127.0.0.1:{silent_tracker}", "--key",
                                        "board", "--rpc-timeout", "1"])
    assert r.exit_code != 0 and "did not answer" in r.output, r.output
    r = CliRunner().invoke(cli, base + ["--target", "llvm -mtriple=aarch64-linux-gnu"])
    assert r.exit_code != 0 and "--rpc HOST:PORT --key KEY" in r.output, r.output


# ----------------------------------------------------------------------------- end to end
def _spawn(args, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def rpc_board(tmp_path):
    """A real tracker and one server (key ``lookupc-test``) on 127.0.0.1; yields HOST:PORT."""
    pytest.importorskip("tornado", reason="tvm.exec.rpc_tracker needs tornado")
    key = "lookupc-test"
    port = _free_port()
    procs = []
    log = open(tmp_path / "rpc.log", "w")
    try:
        procs.append(_spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                             str(port), "--port-end", str(port + 1)], log))
        server_port = _free_port()
        procs.append(_spawn(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port",
                             str(server_port), "--port-end", str(server_port + 1),
                             "--tracker", f"127.0.0.1:{port}", "--key", key], log))
        remote = tuned.parse_rpc(f"127.0.0.1:{port}", key)
        deadline = time.time() + 180
        while True:  # the server registers once both have imported TVM
            try:
                tuned.check_tracker(remote, timeout=5)
                break
            except LookupcError:
                if time.time() > deadline or any(p.poll() is not None for p in procs):
                    log.flush()
                    pytest.fail("tracker/server did not come up:\n" +
                                (tmp_path / "rpc.log").read_text()[-3000:])
                time.sleep(1)
        yield f"127.0.0.1:{port}", key
    finally:
        for proc in reversed(procs):
            _stop(proc)
        log.close()


@pytest.mark.slow
def test_rpc_tuning_writes_records_that_the_tuned_build_uses(rpc_board, tmp_path):
    import torch

    from lookupc import reference as ref
    from lookupc import tvm_shim

    address, key = rpc_board
    db = str(tmp_path / "db")
    target = tvm_shim.make_target()
    lines = []
    K.tune([SHAPES], target, db, trials=2, cost_model="random", kinds=("gather",),
           rpc=address, rpc_key=key, log=lines.append)
    assert any("measuring on 1 server(s)" in line for line in lines), lines
    records = os.path.join(db, "database_tuning_record.json")
    with open(records) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert rows, "no record written"
    assert any(" ms at " in line and "knobs [" in line for line in lines), lines  # timed
    knobs = tuned.best_knobs("gather", SHAPES, target, db)
    assert knobs is not None and len(knobs) == 1

    # compile --schedule tuned: the gather is built from the record, without a warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels = K.build(SHAPES, target, schedule="tuned", tuning_db=db, parts=("gather",))
    rows_ = 1 << SHAPES.bits
    codes = torch.randint(0, rows_, (7, SHAPES.tables), dtype=torch.int32)
    scores = torch.randn(7, SHAPES.tables)
    tables = torch.randn(SHAPES.tables, rows_, SHAPES.d_out)
    bias = torch.randn(SHAPES.d_out)
    torch.testing.assert_close(kernels.gather(codes, scores, tables, bias),
                               ref.gather_forward(codes, scores, tables, bias),
                               rtol=1e-4, atol=1e-5)

    # A key with no server: a clear error before tuning.
    with pytest.raises(LookupcError, match="no server registered under key 'nope'"):
        K.tune([SHAPES], target, db, trials=4, cost_model="random", kinds=("gather",),
               rpc=address, rpc_key="nope", log=lines.append)
