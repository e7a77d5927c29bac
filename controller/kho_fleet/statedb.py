"""Rollout state: one SQLite file per rollout, `<rollouts_dir>/<rollout-id>/state.db`.

The database is the controller's memory. Every transition is committed (WAL,
synchronous=FULL) before the action it guards, so a controller killed at any moment
resumes from the last committed state. The state that matters most is `kexec_requested`:
it is written *before* the kexec command is sent and can be entered once per host, ever.
A host found in kexec_requested, kexec_sent or down after a crash may or may not have
kexec'd; it is reconnected to and verified, never kexec'd again (`resume_action`). One found
in kexec_requested and still in the boot recorded before is asked once more; the agent's
per-boot claim makes sure at most one of the two asks kexecs (HostSteps.resend_kexec).

Host states, in order (any live state may also go to `failed`):

    pending -> preflight -> staged -> preserved -> snapshotted -> kexec_requested
      -> kexec_sent -> down -> up -> verified -> reported

plus shortcuts that only skip observations (kexec_requested/kexec_sent -> down | up: the
host was seen back without being seen down), `pending|preflight -> skipped`, and a retry
`failed -> preflight` for hosts that never reached kexec_requested.

Rollout status: running <-> halted, then completed | aborted | rolled_back (final).
Stage status: pending -> running -> passed | failed | paused (gate passed, waiting for an
operator's go-ahead: `pause: manual`) -> passed; pending -> skipped.

Concurrency: a StateDB may be shared by a thread pool. Each thread gets its own sqlite3
connection (thread-local); every write is one `BEGIN IMMEDIATE` transaction that re-reads
the row it changes, so concurrent writers serialize in SQLite (busy_timeout) and a
transition is judged against the committed state, even across processes.
Timestamps are Unix seconds (REAL).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from kho_agent.digest import sha256_file

from . import lifecycle
from .errors import Bug, InputError

__all__ = ["StateError", "IllegalTransition", "HOST_STATES", "HAPPY_PATH", "ROLLOUT_STATUSES",
           "STAGE_STATUSES", "FINAL_STATUSES", "TRANSITIONS", "RolloutRow", "StageRow", "HostRow",
           "Event", "StateDB", "list_rollouts", "DB_NAME", "entering"]

DB_NAME = "state.db"
SCHEMA_VERSION = 2          # 2: rollout.options (the mode and every option that changes hosts)
_READABLE_VERSIONS = (1, 2)  # a version-1 rollout has no recorded options: it is never resumed

HOST_STATES = ("pending", "preflight", "staged", "preserved", "snapshotted", "kexec_requested",
               "kexec_sent", "down", "up", "verified", "reported", "failed", "skipped")
HAPPY_PATH = HOST_STATES[:11]            # pending .. reported, in order
_LIVE = ("pending", "preflight", "staged", "preserved", "snapshotted", "kexec_requested",
         "kexec_sent", "down", "up", "verified")
TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"preflight", "skipped"}),
    "preflight": frozenset({"staged", "skipped"}),
    "staged": frozenset({"preserved"}),
    "preserved": frozenset({"snapshotted"}),
    "snapshotted": frozenset({"kexec_requested"}),
    "kexec_requested": frozenset({"kexec_sent", "down", "up"}),
    "kexec_sent": frozenset({"down", "up"}),
    "down": frozenset({"up"}),
    "up": frozenset({"verified"}),
    "verified": frozenset({"reported"}),
    "reported": frozenset(),
    "failed": frozenset({"preflight"}),      # retry; refused once kexec was requested
    "skipped": frozenset(),
}
for _s in _LIVE:
    TRANSITIONS[_s] = TRANSITIONS[_s] | {"failed"}
_PRE_KEXEC = lifecycle.states_before_kexec()
lifecycle.check_against(TRANSITIONS)     # the engines' step table and this machine agree
_RESUME = {**{s: "run" for s in _PRE_KEXEC},
           **{s: "reconnect_verify" for s in ("kexec_requested", "kexec_sent", "down", "up",
                                              "verified")},
           "reported": "done", "skipped": "done", "failed": "failed"}
# states whose entry means the controller just talked to the host
_CONTACT = ("preflight", "staged", "preserved", "snapshotted", "kexec_sent", "up", "verified",
            "reported")

ROLLOUT_STATUSES = ("running", "halted", "completed", "aborted", "rolled_back")
FINAL_STATUSES = ("completed", "aborted", "rolled_back")
_ROLLOUT_NEXT = {"running": {"halted", "completed", "aborted", "rolled_back"},
                 "halted": {"running", "aborted", "rolled_back"},
                 "completed": set(), "aborted": set(), "rolled_back": set()}
STAGE_STATUSES = ("pending", "running", "passed", "paused", "failed", "skipped")
_STAGE_NEXT = {"pending": {"running", "skipped"},
               "running": {"passed", "paused", "failed"},
               "paused": {"passed", "failed"},          # paused: gate passed, awaiting go-ahead
               "passed": set(), "failed": set(), "skipped": set()}

_SCHEMA = """
CREATE TABLE rollout(
  id TEXT PRIMARY KEY, playbook_path TEXT NOT NULL, playbook_sha256 TEXT NOT NULL,
  inventory_path TEXT NOT NULL, inventory_sha256 TEXT NOT NULL, created REAL NOT NULL,
  status TEXT NOT NULL, reason TEXT, options TEXT);
CREATE TABLE stage(
  rollout TEXT NOT NULL REFERENCES rollout(id), idx INTEGER NOT NULL, name TEXT NOT NULL,
  status TEXT NOT NULL, gate TEXT, started_at REAL, finished_at REAL,
  PRIMARY KEY (rollout, idx));
CREATE TABLE host(
  rollout TEXT NOT NULL REFERENCES rollout(id), name TEXT NOT NULL, stage_idx INTEGER NOT NULL,
  state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_contact REAL,
  kexec_requested_at REAL, kexec_started_at REAL, back_at REAL, report TEXT, error TEXT,
  updated REAL NOT NULL, PRIMARY KEY (rollout, name));
CREATE TABLE event(
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, host TEXT, event TEXT NOT NULL,
  detail TEXT);
CREATE INDEX event_host ON event(host, id);
CREATE INDEX host_name ON host(name);
"""
_FIELDS = ("last_contact", "kexec_started_at", "back_at", "report", "error")


class StateError(InputError, RuntimeError):
    """A state database that cannot be used as asked (missing, wrong version, unknown host)."""


class IllegalTransition(Bug, StateError):
    """A transition the state machine does not allow, e.g. pending -> verified."""


@dataclass(frozen=True)
class RolloutRow:
    """The rollout: its inputs (paths and sha256s), status and why."""

    id: str
    playbook_path: str
    playbook_sha256: str
    inventory_path: str
    inventory_sha256: str
    created: float
    status: str
    reason: Optional[str]
    options: Optional[dict] = None   # recorded at creation (mode, ...); None: an older rollout
    path: str = ""            # the state.db file

    @property
    def final(self) -> bool:
        """True once the rollout can no longer move (completed, aborted, rolled back)."""
        return self.status in FINAL_STATUSES


@dataclass(frozen=True)
class StageRow:
    """A stage: status and the gate's verdict (decoded JSON, or None before judging)."""

    idx: int
    name: str
    status: str
    gate: Optional[dict]
    started_at: Optional[float]
    finished_at: Optional[float]


@dataclass(frozen=True)
class HostRow:
    """A host's place in the rollout."""

    name: str
    stage_idx: int
    state: str
    attempts: int
    last_contact: Optional[float]
    kexec_requested_at: Optional[float]
    kexec_started_at: Optional[float]
    back_at: Optional[float]
    report: Optional[dict]
    error: Optional[str]
    updated: float

    @property
    def downtime_s(self) -> Optional[float]:
        """Seconds from sending kexec to the host being back, once both are known."""
        if self.kexec_started_at is None or self.back_at is None:
            return None
        return self.back_at - self.kexec_started_at


@dataclass(frozen=True)
class Event:
    """One line of the rollout's log."""

    id: int
    ts: float
    host: Optional[str]
    event: str
    detail: Optional[str]


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _connect(path: str) -> sqlite3.Connection:
    # explicit BEGINs; used by one thread only, but close() may come from another
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA cache_size = -512")      # KiB: one connection per pool thread
    return conn


class StateDB:
    """One rollout's state.db; create() a new rollout or open() an existing one."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        # Writers of this process queue here rather than in SQLite's busy handler, whose
        # sleep-and-retry starves some of hundreds of threads (seen at max_parallel 500);
        # other processes still serialize through SQLite's lock and busy_timeout.
        self._write_lock = threading.Lock()
        try:
            version = self._conn().execute("PRAGMA user_version").fetchone()[0]
            if version not in _READABLE_VERSIONS:
                raise StateError(f"{self.path}: schema version {version}, this kho-fleet reads "
                                 + " and ".join(map(str, _READABLE_VERSIONS)))
            row = self._conn().execute("SELECT id FROM rollout").fetchone()
        except sqlite3.Error as e:
            self.close()
            raise StateError(f"{self.path}: not a usable kho-fleet state database ({e})") from None
        if row is None or not isinstance(row[0], str):
            self.close()
            raise StateError(f"{self.path}: not a usable kho-fleet state database (no rollout row)")
        self.version: int = version
        self.rollout_id: str = row[0]

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def create(cls, rollouts_dir: str, *, playbook_path: str, inventory_path: str,
               stages: Sequence[tuple[str, Sequence[str]]],
               rollout_id: Optional[str] = None,
               options: Optional[dict] = None) -> StateDB:
        """A new rollout: `stages` is [(name, [host, ...]), ...]; every host starts pending.

        The inputs' sha256s are recorded so a resume can refuse changed files, and so are
        `options` (JSON: the mode and every option that changes what happens to hosts), so a
        resume keeps them: a dry run stays a dry run.
        Example: StateDB.create("rollouts", playbook_path="playbooks/demo.yaml",
        inventory_path="inventory/sim.yaml", stages=[("canary", ["twin-a1"]), ...]).
        """
        rid = rollout_id or _new_id()
        if not rid or "/" in rid or rid.startswith("."):
            raise StateError(f"bad rollout id {rid!r}")
        seen: set[str] = set()
        for _, hosts in stages:
            for h in hosts:
                if h in seen:
                    raise StateError(f"host {h!r} is in more than one stage")
                seen.add(h)
        d = os.path.join(rollouts_dir, rid)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, DB_NAME)
        tmp = path + ".new"
        if os.path.exists(path):
            raise StateError(f"{path}: rollout {rid!r} already exists")
        for stale in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
            if os.path.exists(stale):
                os.unlink(stale)
        now = time.time()
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript("BEGIN;" + _SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
            conn.execute("INSERT INTO rollout VALUES (?,?,?,?,?,?,?,?,?)",
                         (rid, os.path.abspath(playbook_path), sha256_file(playbook_path),
                          os.path.abspath(inventory_path), sha256_file(inventory_path), now,
                          "running", None, json.dumps(options or {}, sort_keys=True)))
            for idx, (name, hosts) in enumerate(stages):
                conn.execute("INSERT INTO stage(rollout, idx, name, status) VALUES (?,?,?,?)",
                             (rid, idx, name, "pending"))
                conn.executemany(
                    "INSERT INTO host(rollout, name, stage_idx, state, updated) "
                    "VALUES (?,?,?,?,?)", [(rid, h, idx, "pending", now) for h in hosts])
            conn.execute("INSERT INTO event(ts, host, event, detail) VALUES (?,?,?,?)",
                         (now, None, "rollout",
                          f"created with {len(seen)} hosts in {len(stages)} stages"))
            conn.execute("COMMIT")
            conn.execute("PRAGMA journal_mode = WAL")
        except BaseException:
            conn.close()
            os.unlink(tmp)
            raise
        conn.close()
        _fsync(tmp)
        os.replace(tmp, path)      # a complete database appears atomically, or none does
        _fsync(d)
        return cls(path)

    @classmethod
    def open(cls, path: str) -> StateDB:
        """An existing rollout, by its state.db or its directory."""
        if os.path.isdir(path):
            path = os.path.join(path, DB_NAME)
        if not os.path.isfile(path):
            raise StateError(f"{path}: no such rollout state")
        return cls(path)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection (call once the pool is done)."""
        with self._conns_lock:
            for c in self._conns:
                c.close()
            self._conns.clear()
        self._local = threading.local()

    def __enter__(self) -> StateDB:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write(self) -> _Txn:
        return _Txn(self._conn(), self._write_lock)

    # -- the rollout and its stages ------------------------------------------------------

    def rollout(self) -> RolloutRow:
        """The rollout row."""
        d = dict(self._conn().execute("SELECT * FROM rollout").fetchone())
        try:
            d["options"] = json.loads(d["options"]) if d.get("options") else None
        except ValueError:
            d["options"] = None
        if not isinstance(d["options"], dict):
            d["options"] = None
        return RolloutRow(**d, path=self.path)

    def set_status(self, status: str, reason: Optional[str] = None) -> RolloutRow:
        """Move the rollout to `status` (running <-> halted; then a final status)."""
        if status not in ROLLOUT_STATUSES:
            raise StateError(f"unknown rollout status {status!r}")
        with self._write() as c:
            old = c.execute("SELECT status FROM rollout").fetchone()[0]
            if status not in _ROLLOUT_NEXT[old]:
                raise IllegalTransition(f"rollout {self.rollout_id}: {old} -> {status}")
            c.execute("UPDATE rollout SET status = ?, reason = ?", (status, reason))
            _log(c, None, "rollout", f"{old} -> {status}" + (f": {reason}" if reason else ""))
        return self.rollout()

    def stages(self) -> list[StageRow]:
        """Every stage, in order."""
        rows = self._conn().execute("SELECT * FROM stage ORDER BY idx").fetchall()
        return [_stage(r) for r in rows]

    def set_stage(self, idx: int, status: str, gate: Optional[dict] = None) -> StageRow:
        """Move stage `idx` to `status`, recording the gate verdict (JSON) if given."""
        if status not in STAGE_STATUSES:
            raise StateError(f"unknown stage status {status!r}")
        now = time.time()
        with self._write() as c:
            r = c.execute("SELECT status, name FROM stage WHERE idx = ?", (idx,)).fetchone()
            if r is None:
                raise StateError(f"no stage {idx}")
            if status not in _STAGE_NEXT[r[0]]:
                raise IllegalTransition(f"stage {idx} ({r[1]}): {r[0]} -> {status}")
            c.execute("UPDATE stage SET status = ?, gate = coalesce(?, gate), "
                      "started_at = CASE WHEN ? = 'running' THEN ? ELSE started_at END, "
                      "finished_at = CASE WHEN ? IN ('passed', 'failed', 'skipped') THEN ? "
                      "ELSE finished_at END WHERE idx = ?",
                      (status, None if gate is None else json.dumps(gate), status, now,
                       status, now, idx))
            _log(c, None, "stage", f"{r[1]}: {r[0]} -> {status}")
        return self.stages()[idx]

    # -- hosts ---------------------------------------------------------------------------

    def host(self, name: str) -> HostRow:
        """One host's row (StateError if it is not in this rollout)."""
        r = self._conn().execute("SELECT * FROM host WHERE name = ?", (name,)).fetchone()
        if r is None:
            raise StateError(f"host {name!r} is not in rollout {self.rollout_id}")
        return _host(r)

    def hosts(self, stage: Optional[int] = None, state: Optional[str] = None) -> list[HostRow]:
        """Hosts (optionally of one stage and/or in one state), in creation order."""
        q = "SELECT * FROM host WHERE 1"
        args: list[object] = []
        if stage is not None:
            q, args = q + " AND stage_idx = ?", args + [stage]
        if state is not None:
            q, args = q + " AND state = ?", args + [state]
        return [_host(r) for r in self._conn().execute(q + " ORDER BY rowid", args)]

    def transition(self, host: str, new_state: str, **fields: Any) -> HostRow:
        """Move `host` to `new_state`, committed before returning; IllegalTransition if not allowed.

        fields: last_contact, kexec_started_at, back_at (override the automatic times),
        report (a dict, stored as JSON), error. Entering kexec_requested stamps
        kexec_requested_at, kexec_sent stamps kexec_started_at, up stamps back_at,
        preflight counts an attempt; states that mean contact stamp last_contact.
        """
        if new_state not in TRANSITIONS:
            raise StateError(f"unknown host state {new_state!r}")
        bad = set(fields) - set(_FIELDS)
        if bad:
            raise TypeError(f"transition() got unknown fields {sorted(bad)} "
                            f"(allowed: {', '.join(_FIELDS)})")
        now = time.time()
        with self._write() as c:
            r = c.execute("SELECT * FROM host WHERE name = ?", (host,)).fetchone()
            if r is None:
                raise StateError(f"host {host!r} is not in rollout {self.rollout_id}")
            old = r["state"]
            sets = entering(r, new_state, now)
            for k, v in fields.items():
                sets[k] = json.dumps(v) if k == "report" and v is not None else v
            cols = ", ".join(f"{k} = ?" for k in sets)
            c.execute(f"UPDATE host SET {cols} WHERE name = ?", (*sets.values(), host))
            detail = f"{old} -> {new_state}"
            if fields.get("error"):
                detail += f": {fields['error']}"
            _log(c, host, "state", detail)
        return self.host(host)

    def touch(self, host: str, **fields: Any) -> HostRow:
        """Update a host's fields (e.g. last_contact while waiting) without changing state."""
        bad = set(fields) - set(_FIELDS)
        if bad or not fields:
            raise TypeError(f"touch() needs fields from {', '.join(_FIELDS)}, got {sorted(fields)}")
        with self._write() as c:
            vals = [json.dumps(v) if k == "report" and v is not None else v
                    for k, v in fields.items()]
            cur = c.execute(f"UPDATE host SET {', '.join(f'{k} = ?' for k in fields)}, "
                            "updated = ? WHERE name = ?", (*vals, time.time(), host))
            if cur.rowcount != 1:
                raise StateError(f"host {host!r} is not in rollout {self.rollout_id}")
        return self.host(host)

    def needs_kexec(self, host: str) -> bool:
        """True while the host is before kexec_requested: driving it on will kexec it once."""
        r = self.host(host)
        return r.state in _PRE_KEXEC and r.kexec_requested_at is None

    def resume_action(self, host: str) -> str:
        """What a resuming controller does with `host`.

        'run' (pre-kexec: run it from preflight), 'reconnect_verify' (kexec may have been
        sent: wait for it, verify, report — never kexec again), 'done' (reported or
        skipped), 'failed'.
        """
        return _RESUME[self.host(host).state]

    def counts(self, stage: Optional[int] = None) -> dict[str, int]:
        """Host counts by state (every state present, zeros included)."""
        q = "SELECT state, count(*) FROM host"
        args: list = []
        if stage is not None:
            q, args = q + " WHERE stage_idx = ?", [stage]
        out = dict.fromkeys(HOST_STATES, 0)
        for state, n in self._conn().execute(q + " GROUP BY state", args):
            out[state] = n
        return out

    # -- the event log -------------------------------------------------------------------

    def log(self, event: str, detail: Optional[str] = None, host: Optional[str] = None) -> None:
        """Append an event (committed at once)."""
        with self._write() as c:
            _log(c, host, event, detail)

    def events(self, host: Optional[str] = None) -> list[Event]:
        """The log, oldest first (only `host`'s when given)."""
        if host is None:
            rows = self._conn().execute("SELECT * FROM event ORDER BY id")
        else:
            rows = self._conn().execute("SELECT * FROM event WHERE host = ? ORDER BY id", (host,))
        return [Event(**dict(r)) for r in rows]


def entering(row: Mapping[str, Any], new_state: str, now: float) -> dict[str, Any]:
    """The column values a host row takes on entering `new_state` at `now` (pure).

    The one place the host state machine is enforced, for every engine: IllegalTransition
    when the machine does not allow the move, or when it would request a kexec a second time
    (also through a `failed -> preflight` retry). Entering kexec_requested stamps
    kexec_requested_at, kexec_sent kexec_started_at, up back_at; preflight counts an attempt;
    states that mean contact stamp last_contact.
    """
    host, old = row["name"], row["state"]
    if new_state not in TRANSITIONS.get(old, frozenset()):
        raise IllegalTransition(f"host {host!r}: {old} -> {new_state} is not allowed "
                                f"(from {old}: {', '.join(sorted(TRANSITIONS[old]))})")
    retry = old == "failed" and new_state == "preflight"
    if row["kexec_requested_at"] is not None and (new_state == "kexec_requested" or retry):
        raise IllegalTransition(f"host {host!r}: kexec was already requested at "
                                f"{row['kexec_requested_at']:.3f}; it is never requested "
                                "twice (reconnect and verify instead)")
    sets: dict[str, Any] = {"state": new_state, "updated": now}
    if new_state == "preflight":
        sets["attempts"] = row["attempts"] + 1
        if retry:
            sets["error"] = None
    if new_state == "kexec_requested":
        sets["kexec_requested_at"] = now
    if new_state == "kexec_sent":
        sets["kexec_started_at"] = now
    if new_state == "up" and row["back_at"] is None:
        sets["back_at"] = now
    if new_state in _CONTACT:
        sets["last_contact"] = now
    return sets


class _Txn:
    """`with` one BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception)."""

    def __init__(self, conn: sqlite3.Connection, lock: threading.Lock) -> None:
        self.conn = conn
        self.lock = lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        try:
            if exc_type is None:
                self.conn.execute("COMMIT")
            else:
                self.conn.execute("ROLLBACK")
        finally:
            self.lock.release()


def _log(c: sqlite3.Connection, host: Optional[str], event: str, detail: Optional[str]) -> None:
    c.execute("INSERT INTO event(ts, host, event, detail) VALUES (?,?,?,?)",
              (time.time(), host, event, detail))


def _host(r: sqlite3.Row) -> HostRow:
    d = dict(r)
    d.pop("rollout")
    d["report"] = json.loads(d["report"]) if d["report"] else None
    return HostRow(**d)


def _stage(r: sqlite3.Row) -> StageRow:
    d = dict(r)
    d.pop("rollout")
    d["gate"] = json.loads(d["gate"]) if d["gate"] else None
    return StageRow(**d)


def list_rollouts(rollouts_dir: str) -> list[RolloutRow]:
    """Every rollout under `rollouts_dir`, oldest first; unreadable ones are skipped."""
    out: list[RolloutRow] = []
    try:
        names = os.listdir(rollouts_dir)
    except FileNotFoundError:
        return out
    for name in names:
        path = os.path.join(rollouts_dir, name, DB_NAME)
        if not os.path.isfile(path):
            continue
        try:
            db = StateDB(path)
        except (sqlite3.Error, StateError):
            continue
        try:
            out.append(db.rollout())
        finally:
            db.close()
    return sorted(out, key=lambda r: (r.created, r.id))

