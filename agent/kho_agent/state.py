"""The agent's on-host state: which handover phase this host is in, persisted atomically.

Phases are named in the handover report (`failure.phase`): preflight, stage, preserve,
snapshot, kexec, boot, verify, report. Files live in Kernel.state_dir().
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .atomicfile import atomic_write_json
from .errors import InputError

__all__ = ["PHASES", "AgentState", "StateError", "load_state", "save_state", "write_json",
           "read_json", "state_from_json"]

PHASES = ("preflight", "stage", "preserve", "snapshot", "kexec", "boot", "verify", "report")
STATE_FILE = "state.json"


class StateError(InputError):
    """An agent state file that cannot be used; the message names the file and field."""


def write_json(path: str, data: Any, *, fsync: bool = True) -> None:
    """Write JSON atomically (atomicfile: a crash never leaves half a file), readable by
    its owner only, as the agent's state files always were. One line: python's JSON
    encoder runs in C only without indentation, and the records of a GiB of scattered
    pages (PFN runs, chunk digests) took 0.2 s to write indented."""
    atomic_write_json(path, data, fsync=fsync, mode=0o600, indent=None)


def read_json(path: str) -> Optional[Any]:
    """The JSON in `path`, or None if the file does not exist; StateError naming the
    file if it cannot be read or is not (UTF-8) JSON."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise StateError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except RecursionError:
        raise StateError(f"{path}: not valid JSON (nested too deeply)") from None
    except ValueError as e:
        raise StateError(f"{path}: not valid JSON ({e})") from None


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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_record(v: Any, where: str, fields: dict[str, Any]) -> None:
    """`v` is a mapping whose `fields` have the given types (a callable: a predicate)."""
    if not isinstance(v, dict):
        raise StateError(f"{where}: expected an object, got {type(v).__name__}")
    for name, kind in fields.items():
        ok = isinstance(v.get(name), kind) if isinstance(kind, type) else kind(v.get(name))
        if not ok:
            raise StateError(f"{where}.{name}: wrong type or missing "
                             f"(got {type(v.get(name)).__name__})")


def state_from_json(raw: Any, where: str) -> AgentState:
    """An AgentState from decoded state.json, every field's type checked; StateError names
    `where` (the file) and the field. Unknown fields are ignored (a newer agent's)."""
    if not isinstance(raw, dict):
        raise StateError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if not raw:
        return AgentState()
    out = AgentState()
    hid = raw.get("handover_id", out.handover_id)
    if not isinstance(hid, str) or not hid or len(hid) > 128:
        raise StateError(f"{where}: handover_id: expected a non-empty string")
    phase = raw.get("phase", "new")
    if not isinstance(phase, str) or phase not in ("new",) + PHASES:
        raise StateError(f"{where}: phase: expected one of new, {', '.join(PHASES)}; "
                         f"got {phase!r:.40}")
    history = raw.get("history", [])
    if not isinstance(history, list):
        raise StateError(f"{where}: history: expected a list, got {type(history).__name__}")
    for i, h in enumerate(history):
        _check_record(h, f"{where}: history[{i}]",
                      {"phase": str, "t": _is_number})
    failure = raw.get("failure")
    if failure is not None:
        _check_record(failure, f"{where}: failure", {"phase": str, "reason": str})
    aborted = raw.get("aborted", False)
    if not isinstance(aborted, bool):
        raise StateError(f"{where}: aborted: expected true or false, got {aborted!r:.40}")
    for name in ("staged", "preflight"):
        v = raw.get(name)
        if v is not None and not isinstance(v, dict):
            raise StateError(f"{where}: {name}: expected an object or null, "
                             f"got {type(v).__name__}")
    checks = (raw.get("preflight") or {}).get("checks", [])
    if not isinstance(checks, list):
        raise StateError(f"{where}: preflight.checks: expected a list")
    for i, c in enumerate(checks):
        _check_record(c, f"{where}: preflight.checks[{i}]",
                      {"name": str, "ok": bool, "detail": str})
    staged = raw.get("staged") or {}
    for name in ("target", "running"):
        if staged.get(name) is not None and not isinstance(staged[name], dict):
            raise StateError(f"{where}: staged.{name}: expected an object or null")
    for name in ("kernel", "sha256", "initrd", "cmdline"):
        if staged.get(name) is not None and not isinstance(staged[name], str):
            raise StateError(f"{where}: staged.{name}: expected a string or null")
    return AgentState(handover_id=hid, phase=phase, history=history, failure=failure,
                      aborted=aborted, staged=raw.get("staged"), preflight=raw.get("preflight"))


def load_state(state_dir: str) -> AgentState:
    """The current state, or a fresh one (new handover id) if none was saved; StateError
    (naming the file and field) if state.json is unreadable or a field has the wrong type."""
    path = os.path.join(state_dir, STATE_FILE)
    raw = read_json(path)
    if raw is None:
        return AgentState()
    return state_from_json(raw, path)


def save_state(state_dir: str, st: AgentState) -> None:
    write_json(os.path.join(state_dir, STATE_FILE), asdict(st))
