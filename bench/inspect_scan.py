#!/usr/bin/env python3
"""KHO root-FDT scan (kho_agent.inspect.find_kho_fdts): GB/s and peak RSS by dump kind.

Dumps: a 4 GiB sparse file of zeros (truncate), 512 MiB of random bytes, 1 GiB of written
(non-sparse) zeros, and 256 MiB in which every page starts with a lying FDT header (the
worst case for candidate checks). Baseline, same file, same run: plain os.pread of the
whole file in 16 MiB windows (what any reader of the file must at least do). Each
measurement is a fresh child process reaped with os.wait4, so its peak RSS is its own;
best of 3 after one warm-up read (page cache warm). Also the whole `kho-fleet inspect`
CLI on each dump (exit 2: no KHO FDT), as a user runs it.

Target (safety issue): peak RSS bounded whatever the dump size (one 16 MiB window);
sparse holes cost nothing; data is scanned at a fair fraction of plain read speed.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(ROOT, "agent")]

MiB = 1 << 20
WINDOW = 16 * MiB


def child(mode: str, path: str) -> None:
    """Runs in the measured process: one scan or one plain read; prints seconds."""
    from kho_agent.inspect import find_kho_fdts
    from kho_agent.physmem import open_memory
    t = time.perf_counter()
    if mode == "scan":
        with open_memory(path) as mem:
            found = find_kho_fdts(mem, 4096)
        assert not [c for c in found if c.root is not None], found
    else:
        fd = os.open(path, os.O_RDONLY)
        size, off = os.fstat(fd).st_size, 0
        while off < size:
            off += len(os.pread(fd, WINDOW, off)) or size
        os.close(fd)
    print(time.perf_counter() - t)


def measure(argv: list[str]) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, exit code, stdout) of a child started from here."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.join(ROOT, "agent"), os.path.join(ROOT, "controller"),
         os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryFile() as out:
        t = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return wall, usage.ru_maxrss * 1024, p.returncode, out.read().decode()


def best(argv: list[str], repeat: int = 3) -> tuple[float, int, int, str]:
    """The run with the least time: as the child reports it (scan/read), else wall time."""
    runs = [measure(argv) for _ in range(repeat)]
    return min(runs, key=lambda r: float(r[3]) if r[3].strip() else r[0])


DUMPS = [("4 GiB sparse zeros", "zero-sparse.raw", 4 << 30),
         ("512 MiB random", "random.raw", 512 * MiB),
         ("1 GiB written zeros", "zero-written.raw", 1024 * MiB),
         ("256 MiB, an FDT header per page", "lying-fdts.raw", 256 * MiB)]


def make_dumps(d: str) -> None:
    """Write the DUMPS into directory `d`, in windows."""
    with open(os.path.join(d, "zero-sparse.raw"), "wb") as f:
        f.truncate(4 << 30)
    rng = random.Random(1)
    with open(os.path.join(d, "random.raw"), "wb") as f:
        for _ in range(512 * MiB // WINDOW):
            f.write(rng.randbytes(WINDOW))
    with open(os.path.join(d, "zero-written.raw"), "wb") as f:
        for _ in range(1024 * MiB // WINDOW):
            f.write(bytes(WINDOW))
    hdr = struct.pack(">IIIIIIIIII", 0xD00DFEED, 4096, 40, 56, 48, 17, 16, 0, 8, 8)
    page = hdr.ljust(4096, b"\xa5")
    with open(os.path.join(d, "lying-fdts.raw"), "wb") as f:
        for _ in range(256 * MiB // WINDOW):
            f.write(page * (WINDOW // 4096))


def main() -> None:
    print(f"python {sys.version.split()[0]}; best of 3, fresh process each, page cache warm; "
          "RSS = the child's peak (os.wait4)")
    print(f"{'dump':<32} {'scan':>16} {'peak RSS':>9} | {'pread 16 MiB':>16} {'peak RSS':>9}"
          f" | scan/read | {'kho-fleet inspect':>17} {'peak RSS':>9}")
    me = [sys.executable, os.path.abspath(__file__)]
    cli = [sys.executable, "-m", "kho_fleet.cli", "inspect", "--memory"]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        # written by a child: a child started from here inherits this process's peak RSS
        # into its own ru_maxrss (Linux keeps it across vfork+exec), so this one stays small
        subprocess.run(me + ["--make", d], check=True)
        for name, path, size in DUMPS:
            path = os.path.join(d, path)
            measure(me + ["--child", "read", path])                 # warm the page cache
            _, scan_rss, rc, out = best(me + ["--child", "scan", path])
            assert rc == 0, f"scan of {name} failed"
            t_scan = float(out)
            _, read_rss, _, out = best(me + ["--child", "read", path])
            t_read = float(out)
            t_cli, cli_rss, rc, _ = best(cli + [path])
            assert rc == 2, f"kho-fleet inspect {name}: exit {rc}"
            print(f"{name:<32} {size / t_scan / 1e9:9.2f} GB/s {scan_rss >> 20:>5} MiB | "
                  f"{size / t_read / 1e9:9.2f} GB/s {read_rss >> 20:>5} MiB | "
                  f"{t_scan / t_read:8.2f}x | {t_cli:15.2f} s {cli_rss >> 20:>5} MiB")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "--make":
        make_dumps(sys.argv[2])
    else:
        main()
