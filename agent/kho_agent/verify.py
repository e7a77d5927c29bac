"""Verify retrieved workloads against the journal: chunk digests, then the bad pages.

The holder's `verify` request runs this after `retrieve` (restore first, verify second:
the report times them apart). For each retrieved workload: the chunk digests of its memfd
now (chunkdigest.digest_mapped: hashed in place by parallel threads) against the
journal's; when every chunk matches, the bytes are the bytes that were preserved and
`sha256` after is the journal's (`sha256_from: "chunks"`, no second pass over the
memory); when one differs, the real
whole-file sha256 is computed and badpages.locate names the pages. A journal without
chunk digests (an older agent's) is verified by the whole-file sha256 as before.
A workload that could not be retrieved gets the pages the kernel log says it could not
restore (badpages.lost_folio_pages). Stdlib only, Python 3.9.
"""

from __future__ import annotations

from typing import Optional

from .badpages import MAX_BAD_PAGES, locate, lost_folio_pages, snapshot_ranges, unrestored_pfns
from .chunkdigest import digest_mapped
from .journal import Journal, JournalWorkload, WorkloadResult
from .workload import hash_fd, runs_to_pfns

__all__ = ["verify_results", "verify_one"]


def verify_one(fd: int, w: JournalWorkload, res: WorkloadResult, page_size: int,
               snapshot: Optional[dict] = None) -> None:
    """Fill `res` (sha256, chunks, bad pages) from the memfd `fd` retrieved for `w`."""
    if not (w.chunks and w.chunk_size):
        res.sha256 = hash_fd(fd, w.size)                      # an older journal
        return
    dg = digest_mapped(fd, w.size, chunk_size=w.chunk_size)       # in place, threads
    res.chunks, res.chunk_size = dg.chunks, dg.chunk_size
    same_bytes = dg.chunks == w.chunks and res.size in (None, w.size)
    if same_bytes:
        res.sha256, res.sha256_from = w.sha256, "chunks"
    else:
        res.sha256 = hash_fd(fd, w.size)
    pfns_after = runs_to_pfns(res.pfn_runs) if res.pfn_runs is not None else None
    pfns_before = runs_to_pfns(w.pfn_runs)
    if same_bytes and pfns_after == pfns_before:
        return
    found = locate(fd, token=w.token, size=w.size, chunk_size=w.chunk_size,
                   chunks_before=w.chunks, chunks_after=dg.chunks, pfns_before=pfns_before,
                   pfns_after=pfns_after, page_size=page_size, seed=w.seed,
                   page_crcs_before=w.page_crcs, snapshot=snapshot)
    res.bad_pages, res.bad_pages_total, res.bad_chunks = found.pages, found.total, \
        found.bad_chunks


def verify_results(jr: Journal, results: list[WorkloadResult],
                   fds: dict[tuple[str, int], tuple[JournalWorkload, int]], page_size: int,
                   kernel_log: Optional[str] = None) -> list[WorkloadResult]:
    """Every result verified: those with an fd in `fds` by their bytes, the others (not
    retrieved) by the kernel log's unrestored folios. Returns `results`, filled in."""
    lost = unrestored_pfns(kernel_log, page_size)
    ranges = snapshot_ranges(jr.snapshot) if lost else None
    by_key = {(w.session, w.token): w for w in jr.workloads}
    for res in results:
        key = (res.session, res.token)
        if key in fds:
            w, fd = fds[key]
            try:
                verify_one(fd, w, res, page_size, jr.snapshot)
            except OSError as e:
                res.error = res.error or f"unreadable after retrieval: {e}"
        elif key in by_key and lost:
            pages = lost_folio_pages(runs_to_pfns(by_key[key].pfn_runs), lost, page_size,
                                     ranges)
            res.bad_pages, res.bad_pages_total = pages[:MAX_BAD_PAGES], len(pages)
    return results
