"""Write a file so that a crash leaves either the old file or the new one, never half.

One way for the whole tree (agent and controller): a unique temp file in the target's
directory, the bytes written and fsync'd, chmod, rename over the target, then fsync of
the directory so the rename itself survives a power cut. Stdlib only.

A process killed mid-write leaves at most its own temp file (`.NAME.XXXXXXXX.tmp`, a
unique name, so the next write never trips over it); the target keeps its old bytes.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> atomic_write(os.path.join(d, "x"), b"hello")
>>> open(os.path.join(d, "x"), "rb").read()
b'hello'
>>> atomic_write_json(os.path.join(d, "y.json"), {"a": 1})
>>> open(os.path.join(d, "y.json")).read()
'{\\n "a": 1\\n}\\n'
>>> with atomic_open(os.path.join(d, "z"), mode=0o600) as f:
...     _ = f.write(b"streamed")
>>> open(os.path.join(d, "z"), "rb").read(), oct(os.stat(os.path.join(d, "z")).st_mode & 0o777)
(b'streamed', '0o600')
>>> sorted(os.listdir(d))
['x', 'y.json', 'z']
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, Optional, Union

__all__ = ["atomic_open", "atomic_write", "atomic_write_json", "fsync_dir"]

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(path: PathLike) -> None:
    """fsync a directory (its entries: a rename into it is durable afterwards)."""
    fd = os.open(os.fspath(path) or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: PathLike, *, mode: int = 0o644, fsync: bool = True) -> Iterator[IO[bytes]]:
    """A binary file to write `path`'s new content into, for data that is streamed rather
    than held in memory (downloads, copies, images a tool writes into `f.name`, the temp path).

    When the block ends normally the content replaces `path` atomically with permission
    bits `mode`; if it raises, the temp file is removed and `path` is untouched. The temp
    file is created 0600, so content meant to be private never has wider bits. The
    directory is created if needed. `fsync=False` skips both fsyncs: still atomic against
    a crashed process, not against a power cut (for files rewritten many times a second)."""
    target = os.path.abspath(os.fspath(path))
    d, name = os.path.split(target)
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=d)
    try:
        # open() over mkstemp's fd (no second open by name), so that f.name is the temp path
        with open(tmp, "wb", opener=lambda _path, _flags: fd) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        fsync_dir(d)


def atomic_write(path: PathLike, data: bytes, *, mode: int = 0o644, fsync: bool = True) -> None:
    """Replace `path` with `data` atomically (see atomic_open)."""
    with atomic_open(path, mode=mode, fsync=fsync) as f:
        f.write(data)


def atomic_write_json(path: PathLike, data: Any, *, fsync: bool = True,
                      indent: Optional[int] = 1, sort_keys: bool = False,
                      mode: int = 0o644) -> None:
    """atomic_write of `data` as JSON (with a final newline; `indent` None: one line)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys) + "\n"
    atomic_write(path, text.encode(), mode=mode, fsync=fsync)
