"""The agent's on-host state: which handover phase this host is in, persisted atomically.

Phases are named in the handover report (`failure.phase`): preflight, stage, preserve,
snapshot, kexec, boot, verify, report. Files live in Kernel.state_dir().
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = ["PHASES", "AgentState", "load_state", "save_state", "write_json", "read_json"]

PHASES = ("preflight", "stage", "preserve", "snapshot", "kexec", "boot", "verify", "report")
STATE_FILE = "state.json"


def write_json(path: str, data: Any, *, fsync: bool = True) -> None:
    """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Optional[Any]:
    """The JSON in `path`, or None if the file does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


@dataclass
class AgentState:
    """One handover on this host: id, current phase, per-phase timestamps and outcomes."""

    handover_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phase: str = "new"
    history: list[dict] = field(default_factory=list)
    failure: Optional[dict] = None
    aborted: bool = False
    staged: Optional[dict] = None
    preflight: Optional[dict] = None

    def enter(self, phase: str, **info: Any) -> None:
        """Record that `phase` completed now."""
        self.phase = phase
        self.history.append({"phase": phase, "t": time.time(), **info})

    def fail(self, phase: str, reason: str) -> None:
        self.failure = {"phase": phase, "reason": reason}

    def stamp(self, phase: str) -> Optional[float]:
        """When `phase` was last recorded (epoch seconds), or None."""
        for h in reversed(self.history):
            if h["phase"] == phase:
                return float(h["t"])
        return None


def load_state(state_dir: str) -> AgentState:
    """The current state, or a fresh one (new handover id) if none was saved."""
    raw = read_json(os.path.join(state_dir, STATE_FILE))
    if not raw:
        return AgentState()
    known = {k: raw[k] for k in AgentState.__dataclass_fields__ if k in raw}
    return AgentState(**known)


def save_state(state_dir: str, st: AgentState) -> None:
    write_json(os.path.join(state_dir, STATE_FILE), asdict(st))
