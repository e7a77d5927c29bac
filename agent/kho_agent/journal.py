"""The handover journal, what the agent carries across the kexec, and what came back of it.

The body (workload hashes and PFNs, radix snapshot, kernels) is big and is written when
the snapshot is taken; the tail (final stamps) is one small JSON line added in the
kexec window. In the agent's preserved memfd they are two lines; on disk two files.

After the kexec the holder retrieves every workload the journal lists: one
`WorkloadResult` each; `VerifyResult` is what `verify` found (verify.json), which the
handover report is built from. All are dataclasses, turned into JSON only at the edge
(`to_json`) and read back with every field's type checked (`from_json`: a RecordError,
exit 2, naming where the record came from and the field).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from .badpages import BadPage
from .fields import Fields, JsonRecord
from .state import read_json, write_json

__all__ = ["SCHEMA", "BODY_FILE", "TAIL_FILE", "JournalWorkload", "Journal", "JournalTail",
           "WorkloadResult", "VerifyResult", "merge", "parse_memfd", "read_disk",
           "write_body", "write_tail"]

SCHEMA = "kho-fleet/journal/v1"
BODY_FILE = "journal.json"
TAIL_FILE = "journal-tail.json"


@dataclass
class JournalWorkload(JsonRecord):
    """One preserved memfd as the holder recorded it before the kexec."""

    WHERE = "workload"
    OMIT_NONE = ("seed", "page_crcs")

    session: str
    token: int
    size: int
    sha256: str
    pfn_runs: list[list[int]]
    source: str = "created"        # created, adopted or carried (from the last handover)
    # chunked digests (chunkdigest.py): one sha256 per chunk_size bytes; an old journal
    # has none and is verified by its whole-file sha256
    chunks: list[str] = field(default_factory=list)
    chunk_size: int = 0
    seed: Optional[int] = None          # a created workload's fill seed: its bytes regenerate
    page_crcs: Optional[str] = None     # an adopted one's per-page crc32 (where cheap)
    props: Optional[dict[str, Any]] = None   # memfdprops.read_props before, + "kind" asked


@dataclass
class Journal(JsonRecord):
    """The journal: which handover, which kernels, the radix snapshot, every workload.

    `kernel_from` (preflight.running_abi), `kernel_to` ({kernel, sha256, target}) and
    `snapshot` (snapshot.take_snapshot) are other modules' records, carried as they are.
    """

    WHERE = "journal"
    OMIT_NONE = ("agent_kexec_s",)      # only a journal with its tail applied has it

    handover_id: str
    host: Optional[str] = None
    kernel_from: Optional[dict[str, Any]] = None
    kernel_to: Optional[dict[str, Any]] = None
    snapshot: Optional[dict[str, Any]] = None
    stamps: dict[str, float] = field(default_factory=dict)
    workloads: list[JournalWorkload] = field(default_factory=list)
    empty_sessions: list[str] = field(default_factory=list)   # preserved with no files
    agent_kexec_s: Optional[float] = None      # from the tail: how long the agent's kexec took
    schema: str = SCHEMA

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        return {"schema": out.pop("schema"), **out}      # the schema first, as it always was

    def check(self, r: Fields) -> None:
        if self.schema != SCHEMA:
            raise r.error(f"{r.at('schema')}: expected {SCHEMA!r}, got {self.schema!r:.60}")

    def merged(self, tail: Optional[JournalTail]) -> Journal:
        """This journal with the tail's stamps applied (a tail of another handover: ignored)."""
        if tail is None or tail.handover_id != self.handover_id:
            return self
        return replace(self, stamps={**self.stamps, **tail.stamps},
                       agent_kexec_s=(tail.agent_kexec_s if tail.agent_kexec_s is not None
                                      else self.agent_kexec_s))


@dataclass
class JournalTail(JsonRecord):
    """The journal's last line, written in the kexec window: the final stamps."""

    WHERE = "journal tail"
    OMIT_NONE = ("agent_kexec_s",)

    handover_id: str
    stamps: dict[str, float] = field(default_factory=dict)
    agent_kexec_s: Optional[float] = None


def merge(body: Journal, tail: Optional[JournalTail]) -> Journal:
    """The body with the tail's stamps applied (tail of another handover: ignored)."""
    return body.merged(tail)


def parse_memfd(data: bytes, where: str = "journal memfd") -> Journal:
    """Body line + optional tail line, as sealed in the agent's memfd. ValueError if it is
    not a journal at all, RecordError naming the field if a field has the wrong type."""
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    if not lines:
        raise ValueError("empty journal")
    body = json.loads(lines[0])
    tail = json.loads(lines[1]) if len(lines) > 1 else None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise ValueError("not a kho-fleet journal")
    return Journal.from_json(body, where).merged(
        None if tail is None else JournalTail.from_json(tail, f"{where} tail"))


def read_disk(state_dir: str) -> Optional[Journal]:
    """The disk copy (body + tail), if any; RecordError (naming file and field) if a field
    has the wrong type, StateError if a file is not JSON."""
    path = os.path.join(state_dir, BODY_FILE)
    body = read_json(path)
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        return None
    tpath = os.path.join(state_dir, TAIL_FILE)
    tail = read_json(tpath)
    return Journal.from_json(body, path).merged(
        None if tail is None else JournalTail.from_json(tail, tpath))


def write_body(state_dir: str, body: Journal) -> None:
    write_json(os.path.join(state_dir, BODY_FILE), body.to_json(), fsync=True)


def write_tail(state_dir: str, tail: JournalTail) -> None:
    write_json(os.path.join(state_dir, TAIL_FILE), tail.to_json(), fsync=True)


# --- after the kexec --------------------------------------------------------------------

@dataclass
class WorkloadResult(JsonRecord):
    """What retrieving one workload gave: its hash and PFNs now, or why it failed."""

    WHERE = "result"
    OMIT_NONE = ("sha256", "size", "pfn_runs", "error", "chunks", "chunk_size",
                 "sha256_from", "props")                  # only what was found is said

    session: str
    token: int
    sha256: Optional[str] = None
    size: Optional[int] = None
    pfn_runs: Optional[list[list[int]]] = None
    error: Optional[str] = None
    chunks: Optional[list[str]] = None        # the chunk digests after (verify)
    chunk_size: Optional[int] = None
    bad_pages: list[BadPage] = field(default_factory=list)   # the first MAX_BAD_PAGES
    bad_pages_total: int = 0
    bad_chunks: list[int] = field(default_factory=list)      # differing, not narrowed to pages
    sha256_from: Optional[str] = None         # "chunks": inferred, every chunk matched
    props: Optional[dict[str, Any]] = None    # memfdprops.read_props after retrieval


@dataclass
class IncomingTree(JsonRecord):
    """The incoming KHO state as `snapshot.read_incoming` found it after the kexec."""

    WHERE = "incoming"

    present: bool = False
    compatible: Optional[str] = None
    root: Optional[int] = None
    intact: bool = False
    valid_nodes: int = 0
    errors: list[str] = field(default_factory=list)
    metadata: Optional[dict[str, Any]] = None     # abi.metadata's record, or {"error": ...}
    matches_snapshot: Optional[bool] = None
    fdt_source: Optional[str] = None   # where the incoming FDT was read (debugfs, setup_data, DT)


@dataclass
class VerifyResult(JsonRecord):
    """What `verify` found after the kexec (verify.json): the incoming tree, the journal,
    one result per workload, and the times the downtime is measured from."""

    WHERE = "verify"

    incoming: Optional[IncomingTree] = None
    journal: Optional[Journal] = None
    journal_error: Optional[str] = None    # the memfd journal was not retrieved (disk used)
    results: list[WorkloadResult] = field(default_factory=list)
    error: Optional[str] = None            # retrieval failed as a whole
    agent_start: Optional[float] = None
    kernel_boot_time: Optional[float] = None
    t_restored: Optional[float] = None
    t_verified: Optional[float] = None     # every workload's digests checked
    t_released: Optional[float] = None     # adopted workloads handed back before verify
    release: Optional[str] = None
    running: Optional[dict[str, Any]] = None      # preflight.running_abi after the kexec
    sessions_lost: dict[str, str] = field(default_factory=dict)   # empty session -> why
