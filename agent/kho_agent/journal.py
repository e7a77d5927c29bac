"""The handover journal: what the agent carries across the kexec, in two parts.

The body (workload hashes and PFNs, radix snapshot, kernels) is big and is written when
the snapshot is taken; the tail (final stamps) is one small JSON line added in the
kexec window. In the agent's preserved memfd they are two lines; on disk two files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from .state import read_json, write_json

__all__ = ["SCHEMA", "BODY_FILE", "TAIL_FILE", "merge", "parse_memfd", "read_disk",
           "write_body", "write_tail"]

SCHEMA = "kho-fleet/journal/v1"
BODY_FILE = "journal.json"
TAIL_FILE = "journal-tail.json"


def merge(body: dict[str, Any], tail: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The body with the tail's stamps and fields applied (tail of another handover: ignored)."""
    if not tail or tail.get("handover_id") != body.get("handover_id"):
        return body
    out = dict(body)
    out["stamps"] = {**body.get("stamps", {}), **tail.get("stamps", {})}
    out.update({k: v for k, v in tail.items() if k not in ("stamps", "handover_id")})
    return out


def parse_memfd(data: bytes) -> dict[str, Any]:
    """Body line + optional tail line, as sealed in the agent's memfd."""
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    if not lines:
        raise ValueError("empty journal")
    body = json.loads(lines[0])
    tail = json.loads(lines[1]) if len(lines) > 1 else None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise ValueError("not a kho-fleet journal")
    return merge(body, tail)


def read_disk(state_dir: str) -> Optional[dict[str, Any]]:
    """The disk copy (body + tail), if any."""
    body = read_json(os.path.join(state_dir, BODY_FILE))
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        return None
    return merge(body, read_json(os.path.join(state_dir, TAIL_FILE)))


def write_body(state_dir: str, body: dict[str, Any]) -> None:
    write_json(os.path.join(state_dir, BODY_FILE), body, fsync=True)


def write_tail(state_dir: str, tail: dict[str, Any]) -> None:
    write_json(os.path.join(state_dir, TAIL_FILE), tail, fsync=True)
