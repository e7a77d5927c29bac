"""Write a file so that a crash leaves either the old file or the new one, never half.

One way for the whole tree (agent and controller): a unique temp file in the target's
directory, the bytes written and fsync'd, chmod, rename over the target, then fsync of
the directory so the rename itself survives a power cut. Stdlib only.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> atomic_write(os.path.join(d, "x"), b"hello")
>>> open(os.path.join(d, "x"), "rb").read()
b'hello'
>>> atomic_write_json(os.path.join(d, "y.json"), {"a": 1})
>>> open(os.path.join(d, "y.json")).read()
'{\\n "a": 1\\n}\\n'
>>> sorted(os.listdir(d))
['x', 'y.json']
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["atomic_write", "atomic_write_json", "fsync_dir"]


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: a rename into it is durable afterwards)."""
    fd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, *, mode: int = 0o644, fsync: bool = True) -> None:
    """Replace `path` with `data` atomically (creating its directory if needed).

    `fsync=False` skips both fsyncs: still atomic against a crashed process, not against
    a power cut (for files rewritten many times a second, such as progress counters)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(d)


def atomic_write_json(path: str, data: Any, *, fsync: bool = True, indent: int = 1) -> None:
    """atomic_write of `data` as JSON (with a final newline)."""
    text = json.dumps(data, indent=indent) + "\n"
    atomic_write(path, text.encode(), fsync=fsync)
