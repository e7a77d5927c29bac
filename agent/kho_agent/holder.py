"""The holder: the one process per host that owns /dev/liveupdate and the session fds.

/dev/liveupdate is exclusive-open and a LUO session lives exactly as long as its fd, so
one long-lived process must hold them until `kexec -e` (before) or until the workloads
take their memfds back (after). Agent commands and workloads talk to it over a unix
socket in the state dir (wire.py messages; memfds travel by SCM_RIGHTS).

Before kexec: `preserve` (create + fill or adopt memfds, PRESERVE_FD, record sha256 and
PFNs) and `seal` (the journal, in the agent's own preserved memfd). After kexec:
`retrieve` (journal, then every workload: RETRIEVE_FD, sha256, PFNs, FINISH), then
`claim` hands a memfd to its workload and `release` drops them on purpose.

Fault injection, for lab tests only: with KHO_AGENT_FAULT=exit-after-retrieve=N in its
environment, the holder calls os._exit(1) right after its N-th successful RETRIEVE_FD
(the journal's included), as a crashed agent would: LUO drops every session it had
retrieved but not FINISHed. Each holder process counts its own retrievals.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Optional

from . import bootcopy, journal
from .badpages import PAGE_CRC_MAX_BYTES
from .chunkdigest import FileDigest, digest_bytes, digest_fd, digest_mapped, pack_crcs
from .errors import KhoAgentError
from .fields import RecordError
from .journal import Journal, JournalTail, JournalWorkload, WorkloadResult
from .journal import parse_memfd as parse_journal
from .kernel import Kernel, KernelError, LiveUpdate, LiveUpdateError, Session

if TYPE_CHECKING:
    # imported where used: concurrent.futures loads logging, traceback and (python 3.14)
    # _colorize, which the boot unit's verify (a client of this module) does not need
    from concurrent.futures import Future, ThreadPoolExecutor
from .memfdprops import read_holes, read_props
from .systemdhost import HOLDER_UNIT
from .verify import verify_results
from .wire import call, close_fds, connect_unix, recv_msg, send_msg
from .workload import (
    AGENT_SESSION,
    JOURNAL_TOKEN,
    MemfdSpec,
    SpecError,
    create_memfd,
    create_pattern_memfd,
    expected_bytes,
    make_memfd,
    parse_spec,
    pfn_runs,
)

__all__ = ["SOCKET", "HolderError", "Holder", "HolderClient", "spawn_holder", "holder_client",
           "HOLDER_ERROR_KINDS", "PEER_GONE", "NO_HOLDER", "BAD_REQUEST", "NOT_FOUND",
           "NOT_READY", "BUSY", "KERNEL", "UNKNOWN", "error_kind"]

FAULT_ENV = "KHO_AGENT_FAULT"
SOCKET = "holder.sock"
PIDFILE = "holder.pid"
LOG = "holder.log"


# What went wrong with a holder request, machine-readable: an error reply carries it as
# "kind" next to the human "error", and HolderError as `.kind`. Callers decide on the kind,
# never on the reason's words.
PEER_GONE = "peer-gone"        # the connection broke mid-request (the holder died or was killed)
NO_HOLDER = "no-holder"        # no holder could be started or reached
BAD_REQUEST = "bad-request"    # the request itself is wrong (unknown op, missing field, bad spec)
NOT_FOUND = "not-found"        # no such memfd, session or journal
NOT_READY = "not-ready"        # asked at the wrong point (e.g. seal before prepare)
BUSY = "busy"                  # /dev/liveupdate or a session is in use (EBUSY)
KERNEL = "kernel"              # a syscall or a LUO ioctl failed
UNKNOWN = "unknown"            # a reply without a kind this client knows (another version)
HOLDER_ERROR_KINDS = frozenset({PEER_GONE, NO_HOLDER, BAD_REQUEST, NOT_FOUND, NOT_READY, BUSY,
                                KERNEL, UNKNOWN})


class HolderError(KhoAgentError):
    """A holder request failed: the message is the holder's one-line reason, `kind` one of
    HOLDER_ERROR_KINDS (what callers decide on)."""

    def __init__(self, reason: str, kind: str = UNKNOWN) -> None:
        if kind not in HOLDER_ERROR_KINDS:
            raise ValueError(f"holder error kind {kind!r} (known: {sorted(HOLDER_ERROR_KINDS)})")
        super().__init__(reason)
        self.kind = kind


# What the holder answers for each exception a request may raise (anything else is a bug
# and ends the holder, like any bug).
_REQUEST_ERRORS = (HolderError, LiveUpdateError, KernelError, SpecError, RecordError, KeyError,
                   ValueError, TypeError, OSError)


def error_kind(e: BaseException) -> str:
    """The kind of an exception a request raised (one of HOLDER_ERROR_KINDS)."""
    if isinstance(e, HolderError):
        return e.kind
    if isinstance(e, LiveUpdateError):
        return {errno.EBUSY: BUSY, errno.ENOENT: NOT_FOUND}.get(e.errno or 0, KERNEL)
    if isinstance(e, (RecordError, KeyError, ValueError, TypeError)):   # SpecError: ValueError
        return BAD_REQUEST
    return KERNEL                                               # KernelError, OSError


def _exit_after_retrieve() -> Optional[int]:
    """N of KHO_AGENT_FAULT=exit-after-retrieve=N (fault injection for lab tests), else None."""
    value = os.environ.get(FAULT_ENV)
    if not value:
        return None
    name, _, n = value.partition("=")
    if name != "exit-after-retrieve" or not n.isdigit() or int(n) < 1:
        print(f"holder: ignoring {FAULT_ENV}={value!r} (known: exit-after-retrieve=N)",
              file=sys.stderr, flush=True)
        return None
    return int(n)


class Holder:
    """Owns /dev/liveupdate, the sessions and the memfds; serves requests one at a time."""

    def __init__(self, kernel: Kernel, state_dir: str) -> None:
        self.kernel = kernel
        self.state_dir = state_dir
        self.lu: LiveUpdate = kernel.open_liveupdate()
        self.sessions: dict[str, Session] = {}       # outgoing: created in this kernel
        self.incoming: dict[str, Session] = {}       # retrieved from the previous kernel
        self.fds: dict[tuple[str, int], int] = {}
        self.records: dict[tuple[str, int], JournalWorkload] = {}   # preserved, for the journal
        self.journal_fd: Optional[int] = None              # prepared, not yet sealed
        self.journal_count = 0
        self.running = True
        self.retrieved = 0                                  # successful RETRIEVE_FDs
        self.exit_after_retrieve = _exit_after_retrieve()   # fault injection (lab tests)
        self.to_verify: dict[tuple[str, int], tuple[JournalWorkload, int]] = {}
        self.retrieved_journal: Optional[Journal] = None
        self.retrieved_results: list[WorkloadResult] = []
        self.from_pid1: Optional[dict[str, Session]] = None   # sessions PID 1 handed back
        self.pid1_names: list[str] = []     # their FD-store names: dropped once FINISHed

    def _count_retrieve(self) -> None:
        """Count one successful RETRIEVE_FD; exit here if the fault knob says so."""
        self.retrieved += 1
        if self.exit_after_retrieve == self.retrieved:
            print(f"holder: {FAULT_ENV}: exiting after RETRIEVE_FD #{self.retrieved}",
                  file=sys.stderr, flush=True)
            os._exit(1)

    # --- requests --------------------------------------------------------------------
    def op_ping(self, req: dict, fds: list[int]) -> dict:
        return {"pid": os.getpid(), "sessions": sorted(self.sessions),
                "incoming": sorted(self.incoming),
                "memfds": [[s, t] for s, t in sorted(self.fds)]}

    def _session(self, name: str) -> Session:
        if name not in self.sessions:
            self.sessions[name] = self.lu.create_session(name)
        return self.sessions[name]

    def _preserve(self, session: str, token: int, fd: int, size: int, source: str,
                  digest: FileDigest | Future[FileDigest],
                  seed: Optional[int] = None) -> JournalWorkload:
        """PRESERVE_FD `fd` as `token` of `session` and record it. `digest` may still be
        computing (a created memfd's, in a thread): the kernel's preserve and the hashing
        of the same unchanging bytes overlap, on two cores."""
        sess = self._session(session)
        sess.preserve_fd(fd, token)
        self.fds[(session, token)] = fd
        dg = digest if isinstance(digest, FileDigest) else digest.result()
        pfns = self.kernel.memfd_pfns(fd, size)
        rec = JournalWorkload(session, token, size, dg.sha256 or "", pfn_runs(pfns), source,
                              seed=seed)
        rec.chunks, rec.chunk_size = dg.chunks, dg.chunk_size    # chunkdigest.py
        rec.page_crcs = None if dg.page_crcs is None else pack_crcs(dg.page_crcs)
        self.records[(session, token)] = rec
        return rec

    def _digest_fd(self, fd: int, size: int, adopted: bool) -> FileDigest:
        """sha256 + chunk digests of a memfd the holder did not fill (per-page crcs too
        where cheap: its bytes cannot be regenerated after the kexec)."""
        small = adopted and size <= PAGE_CRC_MAX_BYTES
        return digest_fd(fd, size, whole=True,
                         page_size=self.kernel.page_size() if small else 0)

    def op_records(self, req: dict, fds: list[int]) -> dict:
        """Every workload preserved so far (created or adopted), for snapshot and journal."""
        return {"workloads": [w.to_json() for w in self.records.values()]}   # in order

    def op_preserve(self, req: dict, fds: list[int]) -> dict:
        """Create every memfd of a spec and preserve it. A memfd this holder already holds
        from the previous handover is preserved again as it is (its bytes and pages go on
        living across the next kexec too). The reply is op_records' (every workload
        preserved, adopted ones too), so the agent needs no second call."""
        spec = parse_spec(req["spec"], "spec")
        ps = self.kernel.page_size()
        records: list[JournalWorkload] = []
        new = [(s.name, m) for s in spec.sessions for m in s.memfds
               if not (m.adopt or (s.name, m.token) in self.records
                       or (s.name, m.token) in self.fds)]
        from concurrent.futures import ThreadPoolExecutor
        # A pipeline on two cores: the memfds are filled one at a time ahead of the loop
        # (two at once halved the speed of each: the first preserve waited twice as
        # long), each one's digests run (one memfd at a time, in threads of their own)
        # while the kernel preserves it, and the loop preserves them in the spec's order.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="digest") as digests, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="fill") as fills:
            made = {(name, m.token): fills.submit(_created_memfd, f"kho-{name}-{m.token}", m,
                                                  ps, digests) for name, m in new}
            try:
                for s in spec.sessions:
                    if not s.memfds:
                        self._session(s.name)  # empty: preserved with no files (journal says so)
                    for m in s.memfds:
                        key = (s.name, m.token)
                        if key not in made:
                            if key in self.fds and key not in self.records and not m.adopt:
                                records.append(self._preserve_carried(s.name, m.token))
                            continue
                        fd, pending = made[key].result()
                        if m.huge is not None:
                            self.kernel.shmem_huge_hint(fd, m.huge)
                        # PRESERVE_FD fills holes (memfd_pin_folios): measure them before
                        holes = read_holes(fd, m.size)[0] if m.holes else []
                        # a memfd with holes is not the plain pattern: no seed to regenerate
                        records.append(self._preserve(s.name, m.token, fd, m.size, "created",
                                                      pending, None if m.holes else m.seed))
                        records[-1].props = self._props_before(fd, m, holes, m.size)
            except BaseException:
                _close_unheld(made.values(), set(self.fds.values()))
                raise
        return self.op_records(req, fds)

    def _preserve_carried(self, session: str, token: int) -> JournalWorkload:
        """Preserve again, as it is, a memfd this holder holds from the previous handover."""
        fd = self.fds[(session, token)]
        size = os.fstat(fd).st_size
        rec = self._preserve(session, token, fd, size, "carried",
                             self._digest_fd(fd, size, adopted=True))
        rec.props = self._props_before(fd, None, None, size)
        return rec

    def _props_before(self, fd: int, m: Optional[MemfdSpec],
                      holes: Optional[list[list[int]]], size: int) -> dict[str, Any]:
        """memfdprops of a memfd after PRESERVE_FD (folios pinned: counted where `huge` was
        asked), its holes as measured before PRESERVE_FD (None: as they are now), and (a
        memfd the holder created: `m`) the kind the spec asked for. Unreadable properties
        are said, not raised: the memfd is preserved all the same."""
        try:
            props = read_props(self.kernel, fd, size, folios=m is not None and m.huge is not None)
        except (OSError, KernelError) as e:
            return {"error": f"properties unreadable: {e}"}
        if holes is not None:
            props["holes"] = holes
        if m is not None:
            props["kind"] = m.kind
        return props

    def _refresh_props(self) -> None:
        """size, pos, seals and flags of every preserved memfd as they are now, in the
        snapshot just before the kexec: what the kernel should carry. (memfd-v2 takes the
        seals at PRESERVE_FD and f_pos again at freeze: a seal added since is lost, and
        the comparison after the kexec says so.)"""
        for key, rec in self.records.items():
            fd = self.fds.get(key)
            if fd is None or rec.props is None:
                continue
            try:
                now = read_props(self.kernel, fd, 0)
            except OSError:
                continue
            rec.props.update({k: now[k] for k in ("size", "pos", "seals", "flags")})

    def op_adopt(self, req: dict, fds: list[int]) -> dict:
        """A workload hands its memfd over (SCM_RIGHTS) to be preserved as `token`."""
        if len(fds) != 1:
            close_fds(fds)
            raise HolderError("adopt needs exactly one memfd passed with the request",
                              BAD_REQUEST)
        fd = fds[0]
        size = os.fstat(fd).st_size
        try:
            dg = self._digest_fd(fd, size, adopted=True)
            holes = read_holes(fd, size)[0]      # before PRESERVE_FD fills them
            rec = self._preserve(str(req["session"]), int(req["token"]), fd, size,
                                 "adopted", dg)
        except BaseException:
            os.close(fd)
            raise
        rec.props = self._props_before(fd, None, holes, size)
        return {"workload": rec.to_json()}

    def op_prepare(self, req: dict, fds: list[int]) -> dict:
        """Write the journal body (with every workload record) into the agent's memfd and
        to disk, ahead of the kexec window."""
        body = Journal.from_json(req["journal"], "prepare: journal")
        self._refresh_props()
        body.workloads = list(self.records.values())
        body.empty_sessions = [n for n in self.sessions if n != AGENT_SESSION
                               and not any(k[0] == n for k in self.records)]
        raw = json.dumps(body.to_json(), separators=(",", ":")).encode() + b"\n"
        if self.journal_fd is not None:
            os.close(self.journal_fd)
        self.journal_fd = make_memfd("kho-agent-journal", raw)
        self.journal_count = len(self.records)
        journal.write_body(self.state_dir, body)
        return {"bytes": len(raw), "workloads": self.journal_count}

    def op_seal(self, req: dict, fds: list[int]) -> dict:
        """Append the tail (final stamps) and preserve the journal memfd: frozen from here."""
        if self.journal_fd is None or self.journal_count != len(self.records):
            raise HolderError("journal not prepared, or workloads changed since the "
                              "snapshot: run snapshot again", NOT_READY)
        tail = JournalTail.from_json(req["tail"], "seal: tail")
        line = json.dumps(tail.to_json(), separators=(",", ":")).encode() + b"\n"
        os.pwrite(self.journal_fd, line, os.fstat(self.journal_fd).st_size)
        fd, self.journal_fd = self.journal_fd, None
        self._session(AGENT_SESSION).preserve_fd(fd, JOURNAL_TOKEN)
        self.fds[(AGENT_SESSION, JOURNAL_TOKEN)] = fd
        return {"bytes": os.fstat(fd).st_size}

    def _retrieve_session(self, name: str) -> Session:
        """RETRIEVE_SESSION, unless PID 1 handed the session back (a `systemctl kexec`
        handover: the sessions went through systemd's FD store, kho_agent.systemdhost)."""
        if self.from_pid1 is None:
            self.from_pid1 = {}
            try:
                got = self.kernel.fdstore_take(HOLDER_UNIT)
            except KhoAgentError:
                got = []
            for fdname, fd in got:
                if fdname.startswith("luo-"):
                    self.from_pid1[fdname[4:]] = self.kernel.adopt_session(fd, fdname[4:])
                    self.pid1_names.append(fdname)
                else:
                    os.close(fd)
        if name in self.from_pid1:
            return self.from_pid1.pop(name)
        return self.lu.retrieve_session(name)

    def op_to_pid1(self, req: dict, fds: list[int]) -> dict:
        """Before `systemctl kexec`: every outgoing session fd into PID 1's FD store of the
        holder's unit (systemd records them as `luo_session` entries, which survive the
        kexec as their own sessions), then close /dev/liveupdate so systemd-shutdown can
        open it. The holder may die at shutdown now: PID 1 keeps the sessions."""
        names = sorted(self.sessions)
        for name in names:
            self.kernel.fdstore_push(HOLDER_UNIT, f"luo-{name}", self.sessions[name].fileno(),
                                     session_name=name)
        self.lu.close()
        return {"sessions": names, "unit": HOLDER_UNIT}

    def op_retrieve(self, req: dict, fds: list[int]) -> dict:
        """After kexec: the journal first, then every workload it lists; FINISH each session.

        `journal` in the request (the disk copy) is used when the agent's own session
        cannot be retrieved. Per-workload failures are reported, not raised.
        """
        jr: Optional[Journal] = None
        journal_error = None
        try:
            sess = self._retrieve_session(AGENT_SESSION)
            self.incoming[AGENT_SESSION] = sess
            jfd = sess.retrieve_fd(JOURNAL_TOKEN)
            self._count_retrieve()
            try:   # the file position is preserved too: read from 0, whatever it is
                jr = parse_journal(os.pread(jfd, os.fstat(jfd).st_size, 0))
            finally:
                os.close(jfd)
            sess.finish()
        except (LiveUpdateError, ValueError, RecordError, OSError) as e:
            journal_error = f"journal memfd not retrieved: {e}"
        if jr is None and req.get("journal") is not None:
            jr = Journal.from_json(req["journal"], "retrieve: journal")
        if jr is None:
            raise HolderError(journal_error or "no journal", NOT_FOUND)
        results: list[WorkloadResult] = []
        by_session: dict[str, list[JournalWorkload]] = {}
        wanted: dict[tuple[str, int], Optional[dict[str, Any]]] = {}
        for w in jr.workloads:
            by_session.setdefault(w.session, []).append(w)
            wanted[(w.session, w.token)] = w.props
        sessions_lost = self._retrieve_empty(jr.empty_sessions)
        for name, ws in by_session.items():
            try:
                sess = self._retrieve_session(name)
            except LiveUpdateError as e:
                results += [WorkloadResult(name, w.token, error=f"session lost: {e}") for w in ws]
                continue
            self.incoming[name] = sess
            got = []
            for w in ws:
                res = WorkloadResult(name, w.token)
                try:
                    fd = sess.retrieve_fd(w.token)
                except LiveUpdateError as e:
                    res.error = f"RETRIEVE_FD: {e}"
                    results.append(res)
                    continue
                self._count_retrieve()
                self.fds[(name, w.token)] = fd
                got.append((res, fd, w.size))
                self.to_verify[(name, w.token)] = (w, os.dup(fd))   # `verify` reads it
            for res, fd, size in got:
                res.size = os.fstat(fd).st_size
                try:
                    pfns = self.kernel.memfd_pfns(fd, size)
                    res.pfn_runs = pfn_runs(pfns)
                except Exception as e:
                    pfns = None
                    res.error = f"PFNs unreadable: {e}"
                res.props = self._props_after(fd, size, pfns, wanted.get((name, res.token)))
                results.append(res)
            try:
                sess.finish()
            except LiveUpdateError as e:
                for res, _, _ in got:
                    if res.error is None:
                        res.error = f"FINISH: {e}"
        self.retrieved_journal, self.retrieved_results = jr, results
        self._drop_from_pid1()
        return {"journal": jr.to_json(), "journal_error": journal_error,
                "results": [r.to_json() for r in results], "t_restored": time.time(),
                "sessions_lost": sessions_lost}

    def _drop_from_pid1(self) -> None:
        """The sessions PID 1 handed back are FINISHed (or lost): out of the holder unit's
        FD store, or the next `systemctl kexec` would carry them again (FDSTOREREMOVE=1).
        Until then PID 1's copy keeps them alive should this holder die mid-retrieval."""
        names, self.pid1_names = self.pid1_names, []
        for n in names:
            try:
                self.kernel.fdstore_remove(HOLDER_UNIT, n)
            except KhoAgentError as e:
                print(f"holder: FDSTOREREMOVE {n}: {e}", file=sys.stderr, flush=True)

    def _retrieve_empty(self, names: list[str]) -> dict[str, str]:
        """Retrieve and FINISH each session preserved with no files (the kernel selftests'
        empty sessions): LUO must carry a session whatever it holds. Returns the lost ones."""
        lost: dict[str, str] = {}
        for name in names:
            try:
                sess = self._retrieve_session(name)
                self.incoming[name] = sess
                sess.finish()
            except LiveUpdateError as e:
                lost[name] = f"session lost: {e}"
        return lost

    def op_verify(self, req: dict, fds: list[int]) -> dict:
        """After `retrieve`: check every retrieved workload's bytes (chunk digests in
        parallel threads, verify.py) and name its bad pages. The holder reads its own
        duplicate of each fd, so workloads may have claimed theirs already."""
        if self.retrieved_journal is None:
            raise HolderError("nothing retrieved yet: run retrieve first", NOT_READY)
        try:
            log = self.kernel.dmesg()
        except Exception:
            log = None
        pending, self.to_verify = self.to_verify, {}
        try:
            results = verify_results(self.retrieved_journal, self.retrieved_results, pending,
                                     self.kernel.page_size(), log)
        finally:
            for _, dfd in pending.values():
                os.close(dfd)
        return {"results": [r.to_json() for r in results], "t_verified": time.time()}

    def _props_after(self, fd: int, size: int, pfns: Optional[list[int]],
                     before: Optional[dict[str, Any]]) -> dict[str, Any]:
        """memfdprops of a retrieved memfd: folios counted where they were before, and
        whether the holes of before read as zeros."""
        before = before or {}
        try:
            return read_props(self.kernel, fd, size, pfns=pfns,
                              folios="folios_by_order" in before,
                              holes_before=before.get("holes") or None)
        except (OSError, KernelError) as e:
            return {"error": f"properties unreadable: {e}"}

    def op_claim(self, req: dict, fds: list[int]) -> tuple[dict, list[int]]:
        """Hand a retrieved memfd to its workload (the caller) and forget it here."""
        key = (str(req["session"]), int(req["token"]))
        fd = self.fds.pop(key, None)
        if fd is None:
            raise HolderError(f"no memfd held for session {key[0]!r} token {key[1]}", NOT_FOUND)
        return {"session": key[0], "token": key[1]}, [fd]

    def op_release(self, req: dict, fds: list[int]) -> dict:
        """Close held memfds on purpose (all, or one session/token); exit when none left."""
        sess, tok = req.get("session"), req.get("token")
        keys = [k for k in self.fds if (sess is None or k[0] == sess)
                and (tok is None or k[1] == int(tok))]
        for k in keys:
            os.close(self.fds.pop(k))
        if not self.fds:
            self.running = False
        return {"released": [[s, t] for s, t in keys]}

    def op_shutdown(self, req: dict, fds: list[int]) -> dict:
        """Close everything (outgoing sessions are destroyed: nothing is preserved)."""
        self.running = False
        return {"closing": sorted(self.sessions)}

    # --- serving ------------------------------------------------------------------------
    def handle(self, conn: socket.socket) -> None:
        while True:
            try:
                req, fds = recv_msg(conn)
            except OSError:                  # WireError too: the client left or sent garbage
                return
            op = getattr(self, f"op_{req.get('op')}", None)
            out_fds: list[int] = []
            try:
                if op is None:
                    raise HolderError(f"unknown request {req!r:.80}", BAD_REQUEST)
                res = op(req, fds)
                if isinstance(res, tuple):
                    res, out_fds = res
                reply = {"ok": True, **res}
            except _REQUEST_ERRORS as e:
                reply = {"ok": False, "kind": error_kind(e),
                         "error": f"{type(e).__name__}: {e}" if isinstance(e, KeyError)
                         else str(e)}
            try:
                send_msg(conn, reply, out_fds)
            except OSError:
                return
            finally:
                for fd in out_fds:
                    os.close(fd)
            if not self.running:
                return

    def serve(self) -> None:
        path = os.path.join(self.state_dir, SOCKET)
        if os.path.exists(path):
            os.unlink(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        srv.bind(path)
        os.chmod(path, 0o600)
        srv.listen(8)
        with open(os.path.join(self.state_dir, PIDFILE), "w") as f:
            f.write(f"{os.getpid()}\n")
        self.kernel.notify_ready()          # Type=notify: `systemctl start` returns now
        try:
            while self.running:
                conn, _ = srv.accept()
                with conn:
                    self.handle(conn)
        finally:
            srv.close()
            for p in (path, os.path.join(self.state_dir, PIDFILE)):
                try:
                    os.unlink(p)
                except OSError:
                    pass
            for fd in self.fds.values():
                os.close(fd)
            for s in list(self.sessions.values()) + list(self.incoming.values()):
                s.close()
            self.lu.close()


def _close_unheld(made: Iterable[Future[tuple[int, Future[FileDigest]]]],
                  held: set[int]) -> None:
    """After a failed preserve: close every created memfd the holder does not hold, once
    its fill and digest threads are done with it."""
    from concurrent.futures import wait
    for f in made:
        try:
            fd, pending = f.result()
        except BaseException:         # its fill failed: it closed its own memfd
            continue
        wait([pending])
        if fd not in held:
            os.close(fd)


def _created_memfd(name: str, m: MemfdSpec, page_size: int,
                   pool: ThreadPoolExecutor) -> tuple[int, Future[FileDigest]]:
    """A new memfd of spec `m` holding its pattern, and its digests (sha256 + chunks, in
    threads) still being computed on `pool`: written straight into the memfd and hashed
    in place where the pattern allows (workload.create_pattern_memfd), else through one
    buffer of its bytes."""
    fd = create_pattern_memfd(name, m, page_size)
    if fd is not None:
        return fd, pool.submit(digest_mapped, fd, m.size, whole=True)
    data = expected_bytes(m, page_size)             # the fill pattern, zeros in holes
    fd = create_memfd(name, m, data)
    return fd, pool.submit(digest_bytes, data, whole=True)


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the holder keeps every memfd and session fd
    open (a spec may ask for 1000 files per session, 100 sessions), like the kernel's
    luo_stress_sessions selftest does with luo_ensure_nofile_limit()."""
    import resource
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
    except (OSError, ValueError):
        pass                       # stays as it is; EMFILE then names the limit


def run_holder(kernel: Kernel, state_dir: str) -> int:
    """Entry point of `kho-agent holder`: serve until released or signalled."""
    def _term(*_: object) -> None:
        from .bootrestore import stamp_holder_stopped
        stamp_holder_stopped(state_dir)     # systemd's shutdown reached the holder (report)
        sys.exit(0)
    signal.signal(signal.SIGTERM, _term)
    raise_nofile_limit()
    try:
        h = Holder(kernel, state_dir)
    except LiveUpdateError as e:
        print(f"holder: cannot open /dev/liveupdate: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"holder: pid {os.getpid()} serving {state_dir}", file=sys.stderr, flush=True)
    h.serve()
    return 0


class HolderClient:
    """Requests to a running holder."""

    def __init__(self, state_dir: str, timeout: float = 600.0) -> None:
        self.sock = connect_unix(os.path.join(state_dir, SOCKET), timeout)

    def call(self, op: str, fds: tuple[int, ...] = (), **args: Any) -> tuple[dict, list[int]]:
        try:
            reply, got = call(self.sock, {"op": op, **args}, fds)
        except OSError as e:                 # WireError too
            raise HolderError(f"holder went away during {op!r}: {e}", PEER_GONE) from None
        if not reply.get("ok"):
            close_fds(got)
            kind = reply.get("kind")
            raise HolderError(str(reply.get("error", "holder request failed")),
                              kind if isinstance(kind, str) and kind in HOLDER_ERROR_KINDS
                              else UNKNOWN)
        return reply, got

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> HolderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def holder_client(state_dir: str) -> Optional[HolderClient]:
    """A client of the running holder, or None if none answers."""
    try:
        c = HolderClient(state_dir)
        c.call("ping")
        return c
    except (OSError, HolderError):
        return None


def spawn_holder(state_dir: str, kernel: Kernel, timeout: float = 90.0) -> HolderClient:
    """Start a detached holder (same python, same agent code: works from the zipapp too)
    on the same host as `kernel`: its environment is kernel.child_env(), so a holder
    started for a twin host opens that twin's /dev/liveupdate, never this machine's.
    `timeout`: an arm64 lab guest (TCG, loaded host) took more than 15 s to start python
    from the zipapp; a holder that exits is reported at once."""
    pkg_root = bootcopy.code_root()         # the byte-compiled copy of the zipapp, if made
    env = kernel.child_env()
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_path = os.path.join(state_dir, LOG)
    with open(log_path, "ab") as log, open(os.devnull, "rb") as null:
        proc = subprocess.Popen([sys.executable, "-m", "kho_agent", "holder",
                                 "--state-dir", state_dir],
                                stdin=null, stdout=log, stderr=log, env=env,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(log_path)
            raise HolderError(f"holder exited with {proc.returncode}: {tail}", NO_HOLDER)
        c = holder_client(state_dir)
        if c is not None:
            return c
        time.sleep(0.05)
    proc.kill()
    raise HolderError(f"holder did not answer within {timeout:.0f}s: {_tail(log_path)}",
                      NO_HOLDER)


def _tail(path: str) -> str:
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        return lines[-1] if lines else "(no output)"
    except OSError:
        return "(no log)"
