"""Remote measurement for ``tuned``: the board behind a TVM RPC tracker.

:class:`RemoteDevice` names a board (tracker ``host:port`` and the key it registered
with); :func:`parse_rpc` reads ``lookupc tune --rpc HOST:PORT --key KEY``;
:func:`check_tracker` asks the tracker for its summary with a timeout before any tuning
starts, so a tracker that does not answer, or has no server under the key, is a clear
:class:`~lookupc.errors.LookupcError` instead of TVM's minute of retries. The runner that
measures on the board is built in :mod:`lookupc.schedules.cpu.tuned`.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["RemoteDevice", "parse_rpc", "check_tracker"]


class RemoteDevice(NamedTuple):
    """A board behind a TVM RPC tracker: ``host:port`` of the tracker, the board's key."""

    host: str
    port: int
    key: str

    def __str__(self) -> str:
        return f"key {self.key!r} at the RPC tracker {self.host}:{self.port}"


def parse_rpc(address: str, key: str | None) -> RemoteDevice:
    """``"HOST:PORT"`` and a key -> :class:`RemoteDevice` (``LookupcInputError`` if bad)."""
    from lookupc.errors import LookupcInputError

    if not address:
        raise LookupcInputError(f"rpc key {key!r} given without the tracker's HOST:PORT")
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise LookupcInputError(f"rpc address {address!r}: expected HOST:PORT of a TVM RPC "
                                f"tracker, e.g. 127.0.0.1:9190")
    if not key:
        raise LookupcInputError(f"rpc tracker {address}: give the key its board registered "
                                f"with (rpc_server --key KEY)")
    return RemoteDevice(host.strip("[]"), int(port), str(key))


def check_tracker(remote: RemoteDevice, timeout: float = 10.0) -> dict:
    """Ask the tracker for its summary within ``timeout`` seconds; raise
    :class:`~lookupc.errors.LookupcError` naming ``host:port`` and the key when it does not
    answer, is not a tracker, or has no server registered under the key.

    Returns ``{"servers": n, "free": m}`` for the key. (TVM's own client retries a refused
    connection for a minute and waits forever on a silent one.)"""
    import socket
    import struct

    from tvm.rpc import base

    from lookupc.errors import LookupcError

    where = f"the RPC tracker {remote.host}:{remote.port} (key {remote.key!r})"
    hint = (f"; check it with: python -m tvm.exec.query_rpc_tracker --host {remote.host} "
            f"--port {remote.port}")
    try:
        with socket.create_connection((remote.host, remote.port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                raise LookupcError(f"{where} is not a TVM RPC tracker (wrong handshake)")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            reply = base.recvjson(sock)
    except TimeoutError:
        raise LookupcError(f"{where} did not answer within {timeout:g} s{hint}") from None
    except (OSError, ValueError, struct.error) as err:
        raise LookupcError(f"cannot reach {where}: {err}{hint}") from None
    if not (isinstance(reply, list) and reply and reply[0] == base.TrackerCode.SUCCESS):
        raise LookupcError(f"{where} gave an unexpected summary reply {reply!r}")
    summary = reply[1]
    keys = [str(item.get("key", "")).partition(":")[2] for item in summary.get("server_info", [])]
    servers = keys.count(remote.key)
    if servers == 0:
        present = ", ".join(sorted(set(k for k in keys if k))) or "none"
        raise LookupcError(f"{where} has no server registered under key {remote.key!r} "
                           f"(keys there: {present}); start one on the board with: python -m "
                           f"tvm.exec.rpc_server --tracker {remote.host}:{remote.port} "
                           f"--key {remote.key}")
    free = summary.get("queue_info", {}).get(remote.key, {}).get("free", servers)
    return {"servers": servers, "free": int(free)}
