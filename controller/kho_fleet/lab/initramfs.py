"""Pure-Python writer (and reader) for cpio "newc" archives, the Linux initramfs format.

Builds a minimal initramfs: a static /init, the usual mount-point dirs and /dev/console.
"""

from __future__ import annotations

import gzip
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_HEADER_LEN = 110  # magic + 13 fields of 8 hex digits


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


@dataclass(frozen=True)
class CpioEntry:
    """One archive member; `mode` includes the file type bits (S_IFREG, S_IFDIR, ...)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    nlink: int = 1

    def encode(self, ino: int) -> bytes:
        name = self.name.lstrip("/") or "."
        namez = name.encode() + b"\0"
        fields = (
            ino,
            self.mode,
            self.uid,
            self.gid,
            self.nlink,
            self.mtime,
            len(self.data),
            0,  # devmajor
            0,  # devminor
            self.rdev[0],
            self.rdev[1],
            len(namez),
            0,  # check (unused by newc)
        )
        for v in fields:
            if not 0 <= v <= 0xFFFFFFFF:
                raise ValueError(f"cpio field out of range in {self.name!r}: {v}")
        header = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
        out = header + namez + b"\0" * _pad4(_HEADER_LEN + len(namez))
        return out + self.data + b"\0" * _pad4(len(self.data))


@dataclass
class Initramfs:
    """An ordered set of entries; parents must be added before their children."""

    entries: list[CpioEntry] = field(default_factory=list)

    def add(self, entry: CpioEntry) -> Initramfs:
        self.entries.append(entry)
        return self

    def add_dir(self, name: str, mode: int = 0o755) -> Initramfs:
        return self.add(CpioEntry(name, stat.S_IFDIR | mode, nlink=2))

    def add_file(self, name: str, data: bytes, mode: int = 0o644) -> Initramfs:
        return self.add(CpioEntry(name, stat.S_IFREG | mode, data=data))

    def add_symlink(self, name: str, target: str) -> Initramfs:
        return self.add(CpioEntry(name, stat.S_IFLNK | 0o777, data=target.encode()))

    def add_chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> Initramfs:
        return self.add(CpioEntry(name, stat.S_IFCHR | mode, rdev=(major, minor)))

    def to_bytes(self, compress: bool = False) -> bytes:
        parts = [e.encode(ino) for ino, e in enumerate(self.entries, start=1)]
        parts.append(CpioEntry(TRAILER, 0, nlink=1).encode(0))
        raw = b"".join(parts)
        raw += b"\0" * ((512 - len(raw) % 512) % 512)  # like cpio(1): whole blocks
        return gzip.compress(raw, mtime=0) if compress else raw

    def write(self, path: Union[str, Path], compress: bool = False) -> Path:
        out = Path(path)
        out.write_bytes(self.to_bytes(compress=compress))
        return out


def build_init_initramfs(
    init_binary: Union[str, Path],
    out: Union[str, Path],
    *,
    compress: bool = False,
    extra_files: Optional[dict[str, bytes]] = None,
) -> Path:
    """Write an initramfs whose /init is `init_binary` (static), with /dev/console (5,1)."""
    ramfs = Initramfs()
    for d in ("dev", "proc", "sys", "tmp", "run"):
        ramfs.add_dir(d)
    ramfs.add_chardev("dev/console", 5, 1)
    ramfs.add_file("init", Path(init_binary).read_bytes(), mode=0o755)
    for name, data in (extra_files or {}).items():
        ramfs.add_file(name, data)
    return ramfs.write(out, compress=compress)


def read_newc(data: bytes) -> Iterator[CpioEntry]:
    """Parse a (possibly gzip-compressed) newc archive, stopping at the trailer."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    off = 0
    while True:
        if data[off : off + 6] != NEWC_MAGIC:
            raise ValueError(f"bad newc magic at offset {off}")
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        _ino, mode, uid, gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, _chk = f
        name_start = off + _HEADER_LEN
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + _pad4(_HEADER_LEN + namesize)
        body = data[data_start : data_start + size]
        off = data_start + size + _pad4(size)
        if name == TRAILER:
            return
        yield CpioEntry(name, mode, body, (rmaj, rmin), uid, gid, mtime, nlink)
