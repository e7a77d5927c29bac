"""The agent's one wire format (kho_agent.wire), on real socketpairs with real memfds, and
the holder's machine-readable error kinds on a real holder of a twin host.

The receiver must turn everything that is not a whole message into WireError, close every
fd that came with a bad message, never read past a length it refuses, and never wait for
bytes once the peer has closed.
"""

from __future__ import annotations

import array
import json
import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho_agent import wire
from kho_agent.errors import KhoAgentError
from kho_agent.holder import (
    BAD_REQUEST,
    NOT_FOUND,
    NOT_READY,
    PEER_GONE,
    PIDFILE,
    SOCKET,
    HolderClient,
    HolderError,
)
from kho_agent.kernel import twinproto
from kho_agent.wire import MAX_FDS, MAX_MSG, WireError, recv_msg, send_msg
from kho_fleet.sim.handover import run_agent
from kho_fleet.sim.twinkernel import start_twin

TAG = "kho-wire-test"
TIMEOUT = 30.0        # a receiver that waits when it should not fails instead of hanging


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(TIMEOUT)
    b.settimeout(TIMEOUT)
    yield a, b
    a.close()
    b.close()


def memfd(data: bytes, name: str = TAG) -> int:
    fd = os.memfd_create(name, 0)
    os.write(fd, data)
    return fd


def tagged_fds(name: str = TAG) -> int:
    """How many fds of this process are memfds named `name` (leak check)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == f"/memfd:{name} (deleted)":
                n += 1
        except OSError:
            pass
    return n


def frame(body: bytes, length: Optional[int] = None) -> bytes:
    return struct.pack("<I", len(body) if length is None else length) + body


def send_raw(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """`data` with `fds` on its first byte, as a hostile or broken peer would."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", list(fds)).tobytes())]
    sent = sock.sendmsg([data], anc if fds else [])
    sock.sendall(data[sent:])


def refused(sock: socket.socket) -> WireError:
    with pytest.raises(WireError) as e:
        recv_msg(sock)
    return e.value


# --- the happy path ---------------------------------------------------------------------------
def test_round_trip_with_memfds(pair) -> None:
    a, b = pair
    fds = [memfd(b"first"), memfd(b"second" * 1000)]
    msg = {"op": "preserve", "token": 2**64 - 1, "name": "vm-ram \u00e9\u4e2d", "pfns": [1, 2]}
    send_msg(a, msg, fds)
    got, rfds = recv_msg(b)
    assert got == msg and len(rfds) == 2
    for mine, theirs in zip(fds, rfds):
        assert os.fstat(mine).st_ino == os.fstat(theirs).st_ino      # the same memfds
        size = os.fstat(theirs).st_size
        assert os.pread(theirs, size, 0) == os.pread(mine, size, 0)
    wire.close_fds(fds + rfds)
    send_msg(a, {"second": True})                                   # the stream stays in step
    assert recv_msg(b) == ({"second": True}, [])
    assert tagged_fds() == 0


def test_large_message_round_trip(pair) -> None:
    a, b = pair
    msg = {"blob": "x" * (5 << 20)}              # several reads of the receiver's chunk size
    t = threading.Thread(target=send_msg, args=(a, msg))
    t.start()
    assert recv_msg(b) == (msg, [])
    t.join()


def test_short_reads_one_byte_at_a_time(pair) -> None:
    """A sender that dribbles the message out byte by byte (fd on the first byte)."""
    a, b = pair
    fd = memfd(b"dribbled")
    data = frame(json.dumps({"op": "adopt", "token": 7}).encode())

    def dribble() -> None:
        send_raw(a, data[:1], [fd])
        for i in range(1, len(data)):
            time.sleep(0.001)
            a.sendall(data[i:i + 1])

    t = threading.Thread(target=dribble)
    t.start()
    got, rfds = recv_msg(b)
    t.join()
    assert got == {"op": "adopt", "token": 7} and len(rfds) == 1
    assert os.pread(rfds[0], 8, 0) == b"dribbled"
    wire.close_fds([fd] + rfds)


def test_twin_protocol_is_the_same_wire() -> None:
    """twinproto adds the twin's operations only: its messages are wire.py's."""
    assert twinproto.send_msg is send_msg and twinproto.recv_msg is recv_msg
    assert twinproto.WireError is WireError and twinproto.MAX_MSG == MAX_MSG
    assert issubclass(WireError, KhoAgentError) and issubclass(WireError, OSError)


# --- EOF ----------------------------------------------------------------------------------
def test_eof_between_messages_is_a_clean_close(pair) -> None:
    a, b = pair
    a.close()
    e = refused(b)
    assert e.closed


@pytest.mark.parametrize("cut", [1, 3, 6, -3], ids=["header-1", "header-3", "body-2",
                                                 "body-less-3"])
def test_eof_mid_message(pair, cut: int) -> None:
    a, b = pair
    fd = memfd(b"x")
    send_raw(a, frame(b'{"op": "preserve"}')[:cut], [fd])
    a.shutdown(socket.SHUT_WR)
    os.close(fd)
    e = refused(b)
    assert not e.closed and "mid-message" in str(e)
    assert tagged_fds() == 0                     # the fd that came with it was closed


# --- refused messages ---------------------------------------------------------------------
def test_oversized_length_is_refused_without_reading_on(pair) -> None:
    """A length above MAX_MSG is refused at once: the receiver neither allocates nor waits
    for the body (none is sent, and the write side stays open)."""
    a, b = pair
    fd = memfd(b"x")
    send_raw(a, struct.pack("<I", MAX_MSG + 1), [fd])
    os.close(fd)
    e = refused(b)
    assert "too large" in str(e) and not e.closed
    assert tagged_fds() == 0
    with pytest.raises(WireError):
        send_msg(a, {"blob": "x" * MAX_MSG})     # and the sender refuses to build one


def test_largest_length_is_refused(pair) -> None:
    a, b = pair
    a.sendall(b"\xff\xff\xff\xff")
    assert "too large" in str(refused(b))


@pytest.mark.parametrize("body,what", [
    (b"not json", "JSONDecodeError"),
    (b'{"op": "x"', "JSONDecodeError"),
    (b'{"op": "\xff\xfe"}', "UnicodeDecodeError"),
    (b'\xef\xbb\xbf{"op": 1}', "JSONDecodeError"),            # a BOM is not JSON
    ('{"op": 1}'.encode("utf-16"), "UnicodeDecodeError"),      # json.loads would guess this
    (b"[1, 2]", "not an object"),
    (b'"op"', "not an object"),
    (b"null", "not an object"),
    (b"[" * 200_000 + b"]" * 200_000, "RecursionError"),
    (b"", "JSONDecodeError"),
], ids=["text", "truncated-json", "bad-utf8", "bom", "utf16", "list", "string", "null",
        "deep-nesting", "empty"])
def test_malformed_bodies_are_refused(pair, body: bytes, what: str) -> None:
    a, b = pair
    fd = memfd(b"x")
    t = threading.Thread(target=send_raw, args=(a, frame(body), [fd]))
    t.start()
    e = refused(b)
    t.join()
    os.close(fd)
    assert "malformed" in str(e) and what in str(e)
    assert tagged_fds() == 0
    send_msg(a, {"next": 1})                     # the whole bad message was consumed
    assert recv_msg(b) == ({"next": 1}, [])


def test_too_many_fds_on_one_message(pair) -> None:
    a, b = pair
    fds = [memfd(b"x") for _ in range(MAX_FDS + 3)]
    send_raw(a, frame(b"{}"), fds)
    wire.close_fds(fds)
    e = refused(b)
    assert f"more than {MAX_FDS} fds" in str(e)
    assert tagged_fds() == 0                     # the ones it got are closed, the rest never came


def test_too_many_fds_across_the_pieces_of_one_message(pair) -> None:
    """MAX_FDS on the first byte and one more on a later piece: still one message."""
    a, b = pair
    fds = [memfd(b"x") for _ in range(MAX_FDS + 1)]
    data = frame(b'{"op": "x"}')
    send_raw(a, data[:1], fds[:MAX_FDS])
    send_raw(a, data[1:], fds[MAX_FDS:])
    wire.close_fds(fds)
    e = refused(b)
    assert f"more than {MAX_FDS} fds" in str(e)
    assert tagged_fds() == 0


def test_max_fds_is_accepted_and_more_is_not_sent(pair) -> None:
    a, b = pair
    fds = [memfd(b"x") for _ in range(MAX_FDS)]
    send_msg(a, {"n": MAX_FDS}, fds)
    got, rfds = recv_msg(b)
    assert got == {"n": MAX_FDS} and len(rfds) == MAX_FDS
    wire.close_fds(rfds)
    with pytest.raises(WireError):
        send_msg(a, {}, fds + fds[:1])
    wire.close_fds(fds)
    assert tagged_fds() == 0


def test_a_stalled_peer_is_a_wire_error(pair) -> None:
    """Half a message, then silence: the socket timeout ends it as a WireError."""
    a, b = pair
    b.settimeout(0.2)
    a.sendall(frame(b'{"op": "x"}')[:6])
    e = refused(b)
    assert isinstance(e.__context__, TimeoutError)


def test_send_to_a_closed_peer_is_a_wire_error(pair) -> None:
    a, b = pair
    b.close()
    with pytest.raises(WireError):
        send_msg(a, {"op": "ping"})


# --- random bytes -------------------------------------------------------------------------
_lengths = st.one_of(st.integers(0, 64), st.integers(0, MAX_MSG + 1), st.integers(0, 2**32 - 1))
_streams = st.one_of(
    st.binary(max_size=256),
    st.builds(lambda n, body: struct.pack("<I", n) + body, _lengths, st.binary(max_size=256)),
    st.builds(lambda body, cut: frame(body)[:cut], st.binary(max_size=256), st.integers(0, 300)),
    st.builds(lambda obj, junk: frame(json.dumps(obj).encode()) + junk,
              st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=4), kids, max_size=4),
                           max_leaves=12),
              st.binary(max_size=16)),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_streams, nfds=st.integers(0, MAX_FDS + 2))
def test_random_bytes_only_ever_raise_the_wire_error(data: bytes, nfds: int) -> None:
    """Whatever arrives, then EOF: a message (a dict) or WireError, never anything else,
    never a wait for bytes that cannot come, never a leaked fd."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(TIMEOUT)
    fds = [memfd(b"r") for _ in range(nfds)]
    try:
        if data:
            send_raw(a, data, fds)
        a.shutdown(socket.SHUT_WR)
        wire.close_fds(fds)
        for _ in range(len(data) + 1):           # every message in the stream, then the end
            try:
                obj, rfds = recv_msg(b)
            except WireError as e:
                assert not isinstance(e.__context__, TimeoutError), "waited after EOF"
                break
            assert isinstance(obj, dict) and len(rfds) <= MAX_FDS
            wire.close_fds(rfds)
        else:
            raise AssertionError("more messages than bytes")
        assert tagged_fds() == 0
    finally:
        a.close()
        b.close()


# --- the holder's error kinds ---------------------------------------------------------------
def test_holder_errors_carry_a_kind(tmp_path: Path) -> None:
    """A real holder on a twin host answers bad requests with a kind; a holder that dies
    under a client is PEER_GONE, whatever the words."""
    short = tempfile.mkdtemp(prefix="twin-", dir="/tmp")    # AF_UNIX paths: 107 bytes
    try:
        _holder_kinds(tmp_path, os.path.join(short, "host"))
    finally:
        shutil.rmtree(short, ignore_errors=True)


def _holder_kinds(tmp_path: Path, root: str) -> None:
    spec = tmp_path / "w.json"
    spec.write_text(json.dumps({"sessions": [{"name": "app", "memfds": [
        {"token": 1, "size": 1 << 20, "seed": 1}]}]}))
    with start_twin(root, boot_delay=0.05, ram_mib=64) as twin:
        assert run_agent(twin.root, "preserve", "--spec", str(spec))["rc"] == 0
        state = os.path.join(twin.root, "var/lib/kho-agent")
        with HolderClient(state, timeout=TIMEOUT) as h:
            for op, args, kind in (("claim", {"session": "app", "token": 99}, NOT_FOUND),
                                   ("no-such-op", {}, BAD_REQUEST),
                                   ("adopt", {"session": "app", "token": 2}, BAD_REQUEST),
                                   ("preserve", {}, BAD_REQUEST),
                                   ("release", {"token": "two"}, BAD_REQUEST),
                                   ("seal", {"tail": {}}, NOT_READY)):
                with pytest.raises(HolderError) as e:
                    h.call(op, **args)
                assert e.value.kind == kind, (op, str(e.value))
            assert h.call("ping")[0]["ok"]           # a bad request does not end the holder
            with open(os.path.join(state, PIDFILE)) as f:
                pid = int(f.read())
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(HolderError) as e:
                h.call("ping")
            assert e.value.kind == PEER_GONE


def test_holder_error_kinds_are_a_fixed_set() -> None:
    assert HolderError("x").kind == "unknown"
    with pytest.raises(ValueError):
        HolderError("x", "went away")


@pytest.mark.parametrize("reply", [
    {"ok": False, "error": "from an older holder"},
    {"ok": False, "error": "x", "kind": "went away"},
    {"ok": False, "error": "x", "kind": ["peer-gone"]},
    {"ok": False, "error": "x", "kind": {"a": 1}},
], ids=["no-kind", "unknown-kind", "list-kind", "object-kind"])
def test_client_reads_a_kind_it_does_not_know_as_unknown(tmp_path: Path, reply: dict) -> None:
    """The client side of the holder protocol, against a peer that answers `reply`."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(tmp_path / SOCKET))
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        with conn:
            recv_msg(conn)
            send_msg(conn, reply)

    t = threading.Thread(target=answer)
    t.start()
    try:
        with HolderClient(str(tmp_path), timeout=TIMEOUT) as h, \
                pytest.raises(HolderError) as e:
            h.call("ping")
        assert e.value.kind == "unknown" and str(e.value) == reply["error"]
    finally:
        t.join()
        srv.close()
