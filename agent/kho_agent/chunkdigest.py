"""Chunked sha256 digests of a workload memfd, computed by parallel threads.

One sha256 stream runs on one core: a host with a TiB of preserved memory would stay dark
for many minutes while the agent checks it. So the journal carries one digest per fixed
chunk (CHUNK_SIZE, 2 MiB) of each memfd; the chunks are independent, so threads hash them
side by side (hashlib releases the GIL for updates larger than 2 KiB, os.preadv releases
it while copying), each reading into its own reused buffer. A mismatch narrows to a chunk;
badpages.py narrows it to the page.

The whole-file sha256 (the report's `sha256_before`) is a single stream: before the kexec
it is computed by one extra thread next to the chunk threads; after the kexec it is only
recomputed when a chunk differs (identical chunks are identical bytes, hence the same
sha256: see docs/bench.md, "verify").

`page_size` asks for a crc32 of every page as well (packed little-endian u32, base64 in
the journal): what tells the page inside a bad chunk when the expected bytes cannot be
regenerated (adopted workloads). Stdlib only, Python 3.9.
"""

from __future__ import annotations

import base64
import hashlib
import mmap
import os
import sys
import threading
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, Union

__all__ = ["CHUNK_SIZE", "FileDigest", "default_threads", "digest_fd", "digest_bytes",
           "digest_mapped",
           "pack_crcs", "unpack_crcs", "page_crcs", "differing_chunks"]

CHUNK_SIZE = 2 << 20
MAX_THREADS = 64
MAP_MAX = 8 << 30          # digest_mapped: larger files are read through buffers
Buffer = Union[bytes, bytearray, memoryview]


@dataclass
class FileDigest:
    """A file's digests: one sha256 per chunk, the whole-file sha256 if asked, page crcs if
    asked (one u32 per page, in file order)."""

    size: int
    chunk_size: int
    chunks: list[str]
    sha256: Optional[str] = None
    page_crcs: Optional[array] = None


def default_threads() -> int:
    """The CPUs this process may run on (at most MAX_THREADS)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, n))


def page_crcs(view: Buffer, page_size: int) -> array:
    """crc32 of every page of `view` (a short last page: of its bytes)."""
    mv = memoryview(view)
    return array("I", [zlib.crc32(mv[o:o + page_size]) for o in range(0, len(mv), page_size)])


def pack_crcs(crcs: array) -> str:
    a = array("I", crcs)
    if a.itemsize != 4:                   # pragma: no cover - every CPython has a 4-byte I
        raise ValueError("array('I') is not 32-bit here")
    if sys.byteorder != "little":
        a.byteswap()
    return base64.b64encode(a.tobytes()).decode("ascii")


def unpack_crcs(text: str) -> array:
    """The crcs of pack_crcs(); ValueError if `text` is not one."""
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 4:
        raise ValueError("page crcs: not a whole number of u32")
    a = array("I", raw)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _run(n_chunks: int, threads: int, work: Callable[[int, memoryview], None],
         buf_size: int, extra: Optional[Callable[[], None]] = None) -> None:
    """`work(i, buffer)` for every chunk index, over `threads` threads each with its own
    buffer; `extra` (the whole-file stream) in one more thread. The first exception of
    any thread is raised here."""
    lock = threading.Lock()
    nxt = [0]
    errors: list[BaseException] = []

    def worker() -> None:
        buf = memoryview(bytearray(buf_size)) if buf_size else memoryview(b"")
        try:
            while not errors:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= n_chunks:
                    return
                work(i, buf)
        except BaseException as e:
            errors.append(e)

    def side() -> None:
        try:
            assert extra is not None
            extra()
        except BaseException as e:
            errors.append(e)

    n = max(1, min(threads, n_chunks))
    ts = [threading.Thread(target=worker, daemon=True) for _ in range(n - 1)]
    if extra is not None:
        ts.append(threading.Thread(target=side, daemon=True))
    for t in ts:
        t.start()
    worker()                          # this thread works too
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def _read_full(fd: int, buf: memoryview, off: int) -> int:
    n = 0
    while n < len(buf):
        got = os.preadv(fd, [buf[n:]], off + n)
        if got <= 0:
            raise OSError(f"memfd shorter than expected: {off + n} bytes readable")
        n += got
    return n


def digest_fd(fd: int, size: int, *, chunk_size: int = CHUNK_SIZE,
              threads: Optional[int] = None, whole: bool = False,
              page_size: int = 0) -> FileDigest:
    """The chunk digests of the first `size` bytes of `fd` (OSError if it is shorter);
    with `whole` the whole-file sha256 too (one more thread streams it), with `page_size`
    the page crcs. The file offset is left alone (preadv)."""
    if chunk_size <= 0 or (page_size and chunk_size % page_size):
        raise ValueError(f"chunk size {chunk_size} (page size {page_size})")
    threads = threads or default_threads()
    n = -(-size // chunk_size)
    chunks = [""] * n
    crcs = array("I", bytes(4 * -(-size // page_size))) if page_size else None
    per_chunk = chunk_size // page_size if page_size else 0

    def work(i: int, buf: memoryview) -> None:
        off = i * chunk_size
        view = buf[:min(chunk_size, size - off)]
        _read_full(fd, view, off)
        chunks[i] = hashlib.sha256(view).hexdigest()
        if crcs is not None:
            crcs[i * per_chunk:i * per_chunk + -(-len(view) // page_size)] = \
                page_crcs(view, page_size)

    whole_hex: list[str] = []

    def stream() -> None:
        h = hashlib.sha256()
        buf = memoryview(bytearray(min(size, 8 << 20) or 1))
        off = 0
        while off < size:
            view = buf[:min(len(buf), size - off)]
            _read_full(fd, view, off)
            h.update(view)
            off += len(view)
        whole_hex.append(h.hexdigest())

    # one thread of the budget streams the whole file; the others hash chunks
    workers = max(1, threads - 1) if whole and threads > 1 else threads
    if whole and threads == 1:
        _run(n, 1, work, min(chunk_size, size))
        stream()
    else:
        _run(n, workers, work, min(chunk_size, size), stream if whole else None)
    if whole and n == 0:
        whole_hex[:] = [hashlib.sha256(b"").hexdigest()]
    return FileDigest(size, chunk_size, chunks, whole_hex[0] if whole else None, crcs)


def digest_bytes(data: Buffer, *, chunk_size: int = CHUNK_SIZE,
                 threads: Optional[int] = None, whole: bool = False,
                 page_size: int = 0) -> FileDigest:
    """digest_fd() of bytes already in memory (a created workload before its memfd)."""
    mv = memoryview(data).cast("B")
    size = len(mv)
    threads = threads or default_threads()
    n = -(-size // chunk_size)
    chunks = [""] * n
    crcs = array("I", bytes(4 * -(-size // page_size))) if page_size else None
    per_chunk = chunk_size // page_size if page_size else 0

    def work(i: int, _buf: memoryview) -> None:
        view = mv[i * chunk_size:(i + 1) * chunk_size]
        chunks[i] = hashlib.sha256(view).hexdigest()
        if crcs is not None:
            crcs[i * per_chunk:i * per_chunk + -(-len(view) // page_size)] = \
                page_crcs(view, page_size)

    whole_hex: list[str] = []

    def stream() -> None:
        whole_hex.append(hashlib.sha256(mv).hexdigest())

    if whole and threads == 1:
        _run(n, 1, work, 0)
        stream()
    else:
        _run(n, max(1, threads - 1) if whole else threads, work, 0, stream if whole else None)
    if whole and not whole_hex:
        stream()
    return FileDigest(size, chunk_size, chunks, whole_hex[0] if whole else None, crcs)


def digest_mapped(fd: int, size: int, *, chunk_size: int = CHUNK_SIZE,
                  threads: Optional[int] = None, whole: bool = False,
                  page_size: int = 0) -> FileDigest:
    """digest_fd() of a file read in place: digest_bytes() over a read-only private
    mapping of it, so the bytes are not copied into buffers first. Not MAP_POPULATE:
    each hashing thread then faults in its own chunks' page-table entries, in parallel
    (2 threads on 512 MiB: 2.58 GB/s vs 2.24 with the table filled up front by one
    thread, docs/bench.md). Where the file cannot be mapped, or is larger than MAP_MAX
    (its page tables would be as large as a GiB on a TiB), digest_fd()."""
    if size > MAP_MAX:
        return digest_fd(fd, size, chunk_size=chunk_size, threads=threads, whole=whole,
                         page_size=page_size)
    if size <= 0:
        return digest_bytes(b"", chunk_size=chunk_size, threads=threads, whole=whole,
                            page_size=page_size)
    try:
        mm = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ)
    except (OSError, ValueError):
        return digest_fd(fd, size, chunk_size=chunk_size, threads=threads, whole=whole,
                         page_size=page_size)
    try:
        with memoryview(mm) as view:
            return digest_bytes(view, chunk_size=chunk_size, threads=threads, whole=whole,
                                page_size=page_size)
    finally:
        mm.close()


def differing_chunks(before: Sequence[str], after: Sequence[str]) -> list[int]:
    """Indices of chunks whose digests differ (a chunk only one side has differs too)."""
    n = max(len(before), len(after))
    return [i for i in range(n)
            if i >= len(before) or i >= len(after) or before[i] != after[i]]
