"""kho_agent.atomicfile, the one "temp file, fsync, rename" of the tree: a writer killed
with SIGKILL at any moment leaves the old bytes or the new ones, never a mix; modes are
applied whatever the umask; an unwritable directory is a plain OSError.

Real processes and real files: the crash tests kill a child that is writing.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from kho_agent.atomicfile import atomic_open, atomic_write, atomic_write_json

SIZE = 8 << 20          # large enough that a kill lands inside the write most of the time


def _temps(d: Path, name: str) -> list[Path]:
    return sorted(d.glob(f".{name}.*.tmp"))


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _generation(data: bytes) -> int:
    """The generation a complete file of the writer below holds; fails on a torn one."""
    assert len(data) == SIZE, f"torn file: {len(data)} bytes"
    assert data.count(data[:1]) == SIZE, "torn file: bytes of two generations"
    return data[0]


# Writes generation 1, 2, 3, ... (a file of one repeated byte each) until killed.
_LOOP_WRITER = textwrap.dedent("""
    import sys
    from kho_agent.atomicfile import atomic_write
    path, size = sys.argv[1], int(sys.argv[2])
    n = 1
    while True:
        atomic_write(path, bytes([n % 250 + 1]) * size)
        if n == 1:
            print("first", flush=True)
        n += 1
""")

# Writes half of the new content through atomic_open, says so, then waits to be killed.
_HALF_WRITER = textwrap.dedent("""
    import sys, time
    from kho_agent.atomicfile import atomic_open
    path, size = sys.argv[1], int(sys.argv[2])
    with atomic_open(path) as f:
        f.write(b"N" * (size // 2))
        f.flush()
        print(f.name, flush=True)
        time.sleep(3600)
""")


def _spawn(code: str, path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, str(path), str(SIZE)],
                            stdout=subprocess.PIPE, text=True)


def test_kill_mid_write_leaves_the_old_file_and_a_temp_the_next_write_ignores(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write(target, b"O" * SIZE)
    child = _spawn(_HALF_WRITER, target)
    try:
        tmp_name = child.stdout.readline().strip()
        assert tmp_name, "writer did not start"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    # the kill landed mid-write: the temp file holds half the new bytes, the target none
    leftover = Path(tmp_name)
    assert leftover.parent == tmp_path and _temps(tmp_path, target.name) == [leftover]
    assert leftover.read_bytes() == b"N" * (SIZE // 2)
    assert target.read_bytes() == b"O" * SIZE
    # the next write uses its own temp name: it succeeds and leaves the stale one alone
    atomic_write(target, b"fresh")
    assert target.read_bytes() == b"fresh"
    assert _temps(tmp_path, target.name) == [leftover]


def test_sigkill_at_random_moments_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "big.bin"
    rng = random.Random(1234)
    rounds, seen = 6, set()
    for r in range(rounds):
        child = _spawn(_LOOP_WRITER, target)
        try:
            assert child.stdout.readline().strip() == "first"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        seen.add(_generation(target.read_bytes()))
        # each killed writer leaves at most its one temp file
        assert len(_temps(tmp_path, target.name)) <= r + 1
        atomic_write(target, bytes([251]) * SIZE)            # the next writer is not in the way
        assert _generation(target.read_bytes()) == 251
    assert seen and 251 not in seen


def test_modes_are_applied_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        for name, mode in (("key", 0o600), ("tool", 0o755), ("report", 0o644)):
            atomic_write(tmp_path / name, b"x", mode=mode)
            assert _mode(tmp_path / name) == mode
        # replacing a file gives the new file the requested mode, not the old one's
        atomic_write(tmp_path / "tool", b"y", mode=0o640)
        assert _mode(tmp_path / "tool") == 0o640 and (tmp_path / "tool").read_bytes() == b"y"
        atomic_write_json(tmp_path / "j.json", {"a": [1, 2]}, mode=0o600)
        assert _mode(tmp_path / "j.json") == 0o600
        assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
        # default: 0644
        atomic_write(tmp_path / "plain", b"z")
        assert _mode(tmp_path / "plain") == 0o644
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.json", "key", "plain", "report",
                                                         "tool"]


def test_content_is_private_while_written_and_a_failed_block_changes_nothing(tmp_path):
    target = tmp_path / "id_ed25519"
    atomic_write(target, b"old key", mode=0o600)
    with pytest.raises(RuntimeError):
        with atomic_open(target, mode=0o644) as f:
            f.write(b"half a new key")
            assert _mode(Path(f.name)) == 0o600       # never wider than 0600 before rename
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old key" and _mode(target) == 0o600
    assert list(tmp_path.iterdir()) == [target]


def test_directory_is_created_and_a_path_object_works(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write(target, b"deep")
    assert target.read_bytes() == b"deep"


# Runs as an unprivileged user when the test runs as root (root ignores permission bits).
_UNWRITABLE = textwrap.dedent("""
    import json, os, sys
    from kho_agent.atomicfile import atomic_write
    ro, drop = sys.argv[1], sys.argv[2] == "1"
    if drop:
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
    out = {}
    for name in ("target", "missing/target"):
        try:
            atomic_write(os.path.join(ro, name), b"new")
            out[name] = "written"
        except OSError as e:
            out[name] = [type(e).__name__, e.errno, str(e)]
        except BaseException as e:
            out[name] = ["NOT AN OSError", type(e).__name__, str(e)]
    print(json.dumps(out))
""")


def test_unwritable_directory_is_a_clean_oserror():
    base = Path(tempfile.mkdtemp(prefix="atomic-", dir="/tmp"))   # traversable by nobody
    try:
        os.chmod(base, 0o755)
        ro = base / "ro"
        ro.mkdir()
        (ro / "target").write_bytes(b"old")
        os.chmod(ro, 0o555)
        proc = subprocess.run([sys.executable, "-c", _UNWRITABLE, str(ro),
                               "1" if os.geteuid() == 0 else "0"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        out = json.loads(proc.stdout)
        for name in ("target", "missing/target"):
            kind, code, msg = out[name]
            assert kind == "PermissionError" and code == errno.EACCES, out
            assert str(ro) in msg
        assert (ro / "target").read_bytes() == b"old"
        assert sorted(p.name for p in ro.iterdir()) == ["target"]   # no temp, no directory
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base)
