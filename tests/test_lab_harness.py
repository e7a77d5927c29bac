"""Unit tests of the lab harness pieces that need no QEMU: the newc writer, the probe-output
parser and the QMP client (against an in-process fake server).
"""

from __future__ import annotations

import json
import socket
import stat
import threading
from pathlib import Path

import pytest

from kho_fleet.lab.initramfs import Initramfs, build_init_initramfs, read_newc
from kho_fleet.lab.probe import ProbeError, page_word, parse_probe_output
from kho_fleet.lab.qmp import QMPClient, QMPError


def test_newc_roundtrip_and_alignment(tmp_path: Path) -> None:
    init = tmp_path / "init"
    init.write_bytes(b"\x7fELF" + bytes(range(251)))  # odd length exercises padding
    out = build_init_initramfs(init, tmp_path / "i.cpio", extra_files={"etc/x": b"abc"})
    raw = out.read_bytes()
    assert raw[:6] == b"070701" and len(raw) % 512 == 0
    entries = {e.name: e for e in read_newc(raw)}
    assert stat.S_ISDIR(entries["dev"].mode)
    console = entries["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)
    assert entries["init"].data == init.read_bytes()
    assert entries["init"].mode & 0o777 == 0o755
    assert entries["etc/x"].data == b"abc"
    # every header starts 4-byte aligned
    pos = raw.find(b"070701")
    while pos >= 0:
        assert pos % 4 == 0
        pos = raw.find(b"070701", pos + 1)


def test_newc_gzip() -> None:
    ramfs = Initramfs().add_dir("d").add_symlink("d/l", "/init").add_file("f", b"x")
    data = ramfs.to_bytes(compress=True)
    assert data[:2] == b"\x1f\x8b"
    names = [(e.name, e.data) for e in read_newc(data)]
    assert names == [("d", b""), ("d/l", b"/init"), ("f", b"x")]


SERIAL = """\
[    1.0] Run /init as init process
KHO-PROBE uname release=7.2.13
KHO-PROBE memfd token=0x1001 size=16384 pages=4
KHO-PROBE pfns token=0x1001 100+2,200+1
[    1.2] random kernel line
KHO-PROBE pfns token=0x1001 300+1
KHO-PROBE memfd-end token=0x1001 pages=4 ranges=3
KHO-PROBE outfdt off=0 d00dfeed
KHO-PROBE outfdt off=4 00000010
KHO-PROBE outfdt-end len=8
KHO-PROBE READY
"""


def test_parse_probe_output() -> None:
    rep = parse_probe_output(SERIAL)
    assert rep.release == "7.2.13"
    (mf,) = rep.memfds
    assert (mf.token, mf.size, mf.pages) == (0x1001, 16384, 4)
    assert mf.pfns() == [0x100, 0x101, 0x200, 0x300]
    assert rep.outfdt == bytes.fromhex("d00dfeed00000010")
    assert page_word(0x1001, 2, 5) == 0x4B484F0000000000 ^ (0x1001 << 24) ^ (2 << 9) ^ 5


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.replace("300+1", "300+2"),  # count mismatch
        lambda s: s.replace("KHO-PROBE outfdt off=4 00000010\n", ""),  # missing chunk
        lambda s: s.replace("KHO-PROBE READY", "KHO-PROBE ERROR preserve-fd errno=22"),
    ],
)
def test_parse_probe_output_rejects_inconsistent(mutate) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProbeError):
        parse_probe_output(mutate(SERIAL))


def _fake_qmp_server(path: Path, seen: list[dict]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        f = conn.makefile("rwb")

        def send(obj: dict) -> None:
            f.write(json.dumps(obj).encode() + b"\r\n")
            f.flush()

        send({"QMP": {"version": {"qemu": {"major": 7}}, "capabilities": []}})
        for line in f:
            req = json.loads(line)
            seen.append(req)
            cmd, rid = req["execute"], req.get("id")
            if cmd == "stop":
                send({"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 5}})
                send({"return": {}, "id": rid})
            elif cmd == "bogus":
                send({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": rid})
            elif cmd == "quit":
                send({"return": {}, "id": rid})
                break
            else:
                send({"return": {"cmd": cmd}, "id": rid})
        conn.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_qmp_client(tmp_path: Path) -> None:
    seen: list[dict] = []
    sock = tmp_path / "q.sock"
    thread = _fake_qmp_server(sock, seen)
    client = QMPClient(sock)
    greeting = client.connect(timeout=5)
    assert greeting["version"]["qemu"]["major"] == 7
    assert seen[0]["execute"] == "qmp_capabilities"
    assert client.execute("stop") == {}
    assert client.wait_event("STOP", timeout=1).data == {}
    assert client.execute("query-status", {"a": 1}) == {"cmd": "query-status"}
    assert seen[-1]["arguments"] == {"a": 1}
    with pytest.raises(QMPError, match="CommandNotFound"):
        client.execute("bogus")
    with pytest.raises(QMPError, match="timed out"):
        client.wait_event("NEVER", timeout=0.2)
    client.execute("quit")
    client.close()
    thread.join(timeout=5)
