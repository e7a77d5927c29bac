"""`kho-fleet inspect --memory FILE` scans any dump in bounded resident memory.

Real processes on real files: 4 GiB sparse images (all zeros; zeros with windows of random
garbage and FDT-magic-looking pages; a real KHO image at the top of 4 GiB), 64 MiB of
random bytes, and truncated or lying ELF cores. Each run is the installed `kho-fleet`
as a child reaped with os.wait4, so its own peak RSS (ru_maxrss) is measured, not the
test's. Before the bounded scan, the 4 GiB zero file took 4.1 GiB resident. The in-process
tests check that the scan still finds FDTs anywhere in data, and only there. No timing
is asserted; a generous timeout only turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import imagegen
import pytest

from kho_agent.abi.encode.kho import encode_kho_fdt
from kho_agent.abi.kho import KhoSubtree
from kho_agent.inspect import find_kho_fdts
from kho_agent.physmem import ElfCore, RawImage, open_memory

KHO_FLEET = Path(sys.executable).with_name("kho-fleet")
GiB = 1 << 30
MiB = 1 << 20
PS = 4096
RSS_LIMIT = 256 * MiB          # the dumps below are 4 GiB; the scan window is 16 MiB
HANG_GUARD = 300               # seconds: not a speed assertion, a hang detector
MAGIC = b"\xd0\x0d\xfe\xed"


# Runs argv[2:] and writes "exit-code peak-RSS-bytes" to the file argv[1]. A process
# started from pytest inherits pytest's RSS high-water mark into its own ru_maxrss (Linux
# keeps it across vfork+exec), so the measured child is started from this small one.
_MEASURE = """
import os, signal, subprocess, sys, time
p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL)
deadline = time.monotonic() + float(os.environ["HANG_GUARD"])
while True:
    pid, status, usage = os.wait4(p.pid, os.WNOHANG)
    if pid:
        break
    if time.monotonic() > deadline:
        p.kill()
        pid, status, usage = os.wait4(p.pid, 0)
        break
    time.sleep(0.02)
p.returncode = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    f.write(f"{p.returncode} {usage.ru_maxrss * 1024}")
"""


def run_measured(*args: str, argv: Optional[list[str]] = None) -> tuple[int, str, str, int]:
    """The real CLI (`kho-fleet ARGS`, or `argv`) as a child process:
    (exit code, stdout, stderr, the child's own peak RSS in bytes from os.wait4)."""
    if argv is None:
        if not KHO_FLEET.exists():
            pytest.skip(f"{KHO_FLEET} not installed (run make test's bootstrap)")
        argv = [str(KHO_FLEET), *args]
    env = {**os.environ, "KHO_FLEET_DEBUG": "", "HANG_GUARD": str(HANG_GUARD)}
    with tempfile.TemporaryDirectory() as d:
        res = os.path.join(d, "result")
        p = subprocess.run([sys.executable, "-c", _MEASURE, res, *argv], capture_output=True,
                           text=True, env=env, timeout=HANG_GUARD + 60)
        assert p.returncode == 0, p.stderr
        with open(res) as f:
            rc, rss = (int(x) for x in f.read().split())
    if rc == -signal.SIGKILL:
        pytest.fail(f"{' '.join(argv)} still running after {HANG_GUARD} s")
    return rc, p.stdout, p.stderr, rss


def assert_one_line_error(rc: int, out: str, err: str, path: str) -> str:
    assert rc == 2, (rc, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kho-fleet") and path in lines[0], lines[0]
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def sparse(path: Path, size: int, pieces: Optional[dict[int, bytes]] = None) -> str:
    """A sparse file of `size` bytes with `pieces` ({offset: bytes}) written into it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in sorted((pieces or {}).items()):
            f.seek(off)
            f.write(data)
    return str(path)


def garbage_pieces(seed: int) -> dict[int, bytes]:
    """Windows of random bytes spread over 4 GiB, and pages that begin with FDT magic:
    bad totalsize, a plausible header over garbage, magic off the page boundary, one
    straddling a 16 MiB scan window, and 4 MiB where every page is a lying FDT header."""
    rng = random.Random(seed)
    pieces: dict[int, bytes] = {}
    for _ in range(12):
        off = rng.randrange(0, 4 * GiB - 2 * MiB) // PS * PS + rng.randrange(PS)
        pieces[off] = rng.randbytes(rng.randrange(1, 2 * MiB))
    lying = MAGIC + struct.pack(">IIIIIIIII", PS, 40, 56, 48, 17, 16, 0, 8, 8)
    pieces[1 * GiB + 0x3000] = MAGIC + b"\xff" * 36                   # totalsize 4 GiB-1
    pieces[1 * GiB + 0x5000] = lying + rng.randbytes(PS - len(lying))
    pieces[1 * GiB + 0x7001] = lying                                  # not page-aligned
    pieces[(2 * GiB + 16 * MiB) - 2] = MAGIC + rng.randbytes(60)     # across a window
    pieces[3 * GiB] = b"".join(lying + rng.randbytes(PS - len(lying)) for _ in range(1024))
    pieces[4 * GiB - 4] = MAGIC                                       # the very last bytes
    return pieces


# --- the real CLI, peak RSS of the child -----------------------------------------------

def test_sparse_zero_4g(tmp_path):
    path = sparse(tmp_path / "zero.raw", 4 * GiB)
    rc, out, err, rss = run_measured("inspect", "--memory", path)
    line = assert_one_line_error(rc, out, err, path)
    assert "no KHO root FDT found" in line
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"


def test_sparse_garbage_4g(tmp_path):
    path = sparse(tmp_path / "garbage.raw", 4 * GiB, garbage_pieces(1))
    rc, out, err, rss = run_measured("inspect", "--memory", path)
    line = assert_one_line_error(rc, out, err, path)
    assert "no KHO root FDT found" in line
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"


def test_real_image_at_the_top_of_4g_among_garbage(tmp_path):
    """A real KHO image at the top of a 4 GiB sparse dump, garbage below: found, decoded."""
    mem, facts = imagegen.build_image(PS, mem_pages=4 * GiB // PS)
    path = tmp_path / "kho.raw"
    imagegen.write_raw(mem, str(path))
    top = min(mem.pages)
    with open(path, "r+b") as f:
        for off, data in garbage_pieces(2).items():
            if off + len(data) <= top:
                f.seek(off)
                f.write(data)
    rc, out, err, rss = run_measured("inspect", "--json", "--memory", str(path))
    assert rc == 0, err
    r = json.loads(out)
    assert r["kho"]["root_fdt_phys"] == facts["fdt_phys"]
    assert r["kho"]["memory_map_root"] == facts["radix_root"]
    assert r["radix"]["intact"] is True
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"


def test_random_64m(tmp_path):
    path = tmp_path / "random.raw"
    path.write_bytes(random.Random(3).randbytes(64 * MiB))
    rc, out, err, rss = run_measured("inspect", "--memory", str(path))
    assert_one_line_error(rc, out, err, str(path))
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"


def _ehdr(phnum: int, phoff: int = 64) -> bytes:
    return struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1,
                       0, 0, b"\0" * 7, 4, 62, 1, 0, phoff, 0, 0, 64, 56, phnum, 0, 0, 0)


def test_truncated_elf_header(tmp_path):
    path = tmp_path / "trunc.core"
    path.write_bytes(_ehdr(4)[:40])                 # not even a whole ELF header
    rc, out, err, rss = run_measured("inspect", "--memory", str(path))
    assert_one_line_error(rc, out, err, str(path))
    path.write_bytes(_ehdr(4) + b"\0" * 20)         # program headers cut off
    rc, out, err, rss = run_measured("inspect", "--memory", str(path))
    line = assert_one_line_error(rc, out, err, str(path))
    assert "truncated" in line
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"


def test_elf_core_claiming_a_terabyte(tmp_path):
    """PT_LOADs that claim 1 TiB of memory (p_memsz) over a few MiB of file, and one whose
    p_filesz runs 4 GiB past the end of a truncated dump: zeros are not scanned."""
    phdrs = struct.pack("<IIQQQQQQ", 1, 6, 4096, 0, 0, 2 * MiB, 1 << 40, 0)
    phdrs += struct.pack("<IIQQQQQQ", 1, 6, 4096 + 2 * MiB, 0, 1 << 41, 4 * GiB, 4 * GiB, 0)
    data = random.Random(4).randbytes(3 * MiB)
    path = tmp_path / "huge.core"
    path.write_bytes((_ehdr(2) + phdrs).ljust(4096, b"\0") + data)
    rc, out, err, rss = run_measured("inspect", "--memory", str(path))
    line = assert_one_line_error(rc, out, err, str(path))
    assert "no KHO root FDT found" in line
    assert rss < RSS_LIMIT, f"peak RSS {rss >> 20} MiB"


# --- the scan itself, in process --------------------------------------------------------

@pytest.fixture
def hang_guard():
    """Fail (not hang) when an in-process scan runs past HANG_GUARD seconds."""
    def expire(signum, frame):
        raise TimeoutError(f"still scanning after {HANG_GUARD} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(HANG_GUARD)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


FDT = encode_kho_fdt("kho-v4", 0x200000, [KhoSubtree("LUO", 0x300000, 32)])


def test_scan_finds_fdts_in_data_only_once_each(tmp_path, hang_guard):
    """FDTs right after a hole, at a window edge, in the last page, inside garbage: each
    found exactly once; FDT-like garbage is not reported."""
    where = [5 * PS, 16 * MiB, 16 * MiB - PS, 1 * GiB + 7 * PS, 4 * GiB - PS]
    pieces = garbage_pieces(5)
    for p in where:
        pieces = {o: d for o, d in pieces.items() if o + len(d) <= p or o >= p + PS}
        pieces[p] = FDT
    path = sparse(tmp_path / "fdts.raw", 4 * GiB, pieces)
    with RawImage(path) as mem:
        found = find_kho_fdts(mem, PS)
    assert sorted(c.phys for c in found) == sorted(where)
    assert all(c.root is not None and c.root.memory_map_root == 0x200000 for c in found)


def test_scan_with_a_base_and_64k_pages(tmp_path, hang_guard):
    where = [0x40000000 + 64 * 1024, 0x40000000 + 3 * GiB]
    path = sparse(tmp_path / "based.raw", 4 * GiB, {p - 0x40000000: FDT for p in where})
    with open_memory(path, 0x40000000) as mem:
        assert [c.phys for c in find_kho_fdts(mem, 65536)] == where


def test_scan_elf_core_zero_tail_and_sparse_file(tmp_path, hang_guard):
    """An ELF core over a sparse file: the FDT in file data is found, the p_memsz tail is
    zeros (not read), and the limit on candidates holds."""
    phdrs = struct.pack("<IIQQQQQQ", 1, 6, 4096, 0, 1 << 32, 2 * GiB, 1 << 40, 0)
    head = (_ehdr(1) + phdrs).ljust(4096, b"\0")
    pieces = {0: head, 4096 + GiB + 8 * PS: FDT}
    path = sparse(tmp_path / "sparse.core", 4096 + 2 * GiB, pieces)
    with ElfCore(path) as mem:
        assert [c.phys for c in find_kho_fdts(mem, PS)] == [(1 << 32) + GiB + 8 * PS]
        assert list(mem.data_ranges()) != [] and all(
            e <= (1 << 32) + 2 * GiB for _, e in mem.data_ranges())
    many = {i * PS: FDT for i in range(300)}
    path = sparse(tmp_path / "many.raw", 64 * MiB, many)
    with RawImage(path) as mem:
        found = find_kho_fdts(mem, PS, limit=256)
    assert [c.phys for c in found] == [i * PS for i in range(256)]


def test_small_reads_do_not_keep_the_mapping_resident(tmp_path):
    """Reading one word of every page of a 256 MiB image through the mmap fast path
    leaves at most the drop budget of it mapped (resident) in this process."""
    path = tmp_path / "dense.raw"
    with open(path, "wb") as f:
        for _ in range(16):
            f.write(b"\x01" * (16 * MiB))
    code = (
        "import sys\n"
        "from kho_agent.physmem import RawImage\n"
        "with RawImage(sys.argv[1]) as m:\n"
        "    for p in range(0, 256 << 20, 4096):\n"
        "        assert m.read(p, 8) == b'\\x01' * 8\n")
    rc, out, err, rss = run_measured(argv=[sys.executable, "-c", code, str(path)])
    assert rc == 0, err
    assert rss < 128 * MiB, f"peak RSS {rss >> 20} MiB"
