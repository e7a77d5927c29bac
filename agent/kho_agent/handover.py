"""The handover lifecycle on one host: preflight -> stage -> preserve -> snapshot -> kexec
-> (boot) -> verify -> report. Each step is one function over a Kernel, persisting what
it learned in the state dir so the next step -- possibly in the next kernel -- goes on.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional

from . import bootcopy, bootrestore, journal
from .digest import sha256_file
from .errors import InputError, KhoAgentError, one_line
from .holder import PEER_GONE, HolderClient, HolderError, holder_client
from .holderstart import point_boot_unit, queue_holder_unit, start_holder
from .journal import IncomingTree, Journal, JournalTail, VerifyResult, WorkloadResult
from .kernel import Kernel, KernelError, LiveUpdateError
from .snapshot import read_incoming, take_snapshot
from .state import AgentState, load_state, read_json, save_state, write_json
from .systemdhost import decide, fdstore_counts
from .workload import WorkloadSpec, runs_to_pfns

__all__ = ["AgentError", "Agent", "KexecAlreadyStarted", "NothingToCollect"]

PRESERVE_FILE = "preserve.json"
SNAPSHOT_FILE = "snapshot.json"
VERIFY_FILE = "verify.json"
FDSTORES_FILE = "fdstores.json"     # the kexec method and the FD stores before the kexec
COLLECT_WAIT_S = 1800.0             # verify --collect waits this long for a pending boot unit


class AgentError(KhoAgentError):
    """A step failed on this host (exit 1); `phase` names it in the report."""

    def __init__(self, phase: str, msg: str) -> None:
        super().__init__(msg)
        self.phase = phase

    def headline(self) -> str:
        return f"{self.phase}: {one_line(self)}"


class NothingToCollect(KhoAgentError):
    """`verify --collect`: no verify ran in this boot (the boot unit did not run): exit 3,
    and the controller runs verify itself."""

    exit_code = 3


class KexecAlreadyStarted(KhoAgentError):
    """`kexec`: this handover's kexec already started in this boot (exit 4). A controller
    that died mid-step and asks again is told so; nothing is sent twice."""

    exit_code = 4


class Agent:
    """One host's handover, driven step by step (each CLI subcommand is one method)."""

    def __init__(self, kernel: Kernel, state_dir: Optional[str] = None,
                 create: bool = True) -> None:
        """`create` False: a read-only look (status) that does not create `state_dir`.
        A state.json that cannot be used raises StateError (exit 2) naming file and field."""
        self.kernel = kernel
        self.dir = state_dir or kernel.state_dir()
        if os.path.lexists(self.dir) and not os.path.isdir(self.dir):
            raise InputError(f"state dir {self.dir}: not a directory")
        if create:
            try:
                os.makedirs(self.dir, exist_ok=True)
            except OSError as e:
                raise InputError(f"state dir {self.dir}: {e.strerror or e}") from None
        self.state = load_state(self.dir)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _save(self) -> None:
        save_state(self.dir, self.state)

    def _fail(self, phase: str, msg: str) -> AgentError:
        self.state.fail(phase, msg)
        self._save()
        return AgentError(phase, msg)

    # --- before kexec -------------------------------------------------------------------
    def preflight(self, *, kernel_image: Optional[str] = None, initrd: Optional[str] = None,
                  spec: Optional[WorkloadSpec] = None, page_size: Optional[int] = None,
                  allow_unknown_abi: bool = False, kexec_method: Optional[str] = None,
                  allow_fdstore_loss: bool = False) -> dict:
        """Run the preflight checks; a blocking failure aborts the handover."""
        if (self.state.phase in ("new", "preflight", "report", "verify")
                or self.state.failure or self.state.aborted):
            self.state = AgentState()          # a new handover on this host
        from .preflight import preflight  # not on the boot unit's path: imported here
        res = preflight(self.kernel, kernel_image=kernel_image, initrd=initrd,
                        workload_bytes=spec.total_bytes if spec else 0, page_size=page_size,
                        allow_unknown_abi=allow_unknown_abi, kexec_method=kexec_method,
                        allow_fdstore_loss=allow_fdstore_loss)
        out = res.to_json()
        self.state.preflight = out
        if not res.ok:
            self.state.aborted = True
            raise self._fail("preflight", "; ".join(c.detail for c in res.failures()))
        self.state.enter("preflight")
        self._save()
        return out

    def stage(self, kernel_image: str, *, initrd: Optional[str] = None,
              cmdline: str = "reuse", sha256: Optional[str] = None,
              allow_unknown_abi: bool = False) -> dict:
        """Verify and load the target kernel with kexec_file_load (refusing an ABI change)."""
        if self.state.failure or self.state.aborted:
            self.state = AgentState()          # a refused or failed attempt does not carry over
        for path in (kernel_image, initrd):
            if path is None:
                continue
            if not os.path.isfile(path):
                raise self._fail("stage", f"{path}: no such file")
        digest = sha256_file(kernel_image)
        if sha256 and digest != sha256.lower():
            raise self._fail("stage", f"{kernel_image}: sha256 {digest} != expected {sha256}")
        from .preflight import preflight  # not on the boot unit's path: imported here
        res = preflight(self.kernel, kernel_image=kernel_image, initrd=initrd,
                        allow_unknown_abi=allow_unknown_abi)
        abi = [c for c in res.checks if c.name in ("abi", "target_image", "kexec_sig")
               and not c.ok and c.blocking]
        if abi:
            self.state.aborted = True
            raise self._fail("stage", abi[0].detail)
        reuse = cmdline == "reuse"
        line = self.kernel.cmdline() if reuse else cmdline
        try:
            self.kernel.kexec_load(kernel_image, initrd, None if reuse else line)
        except KernelError as e:
            raise self._fail("stage", f"kexec load failed: {e}") from None
        # the agent the next boot runs (boot unit, holder unit): unpacked and byte-compiled
        # now, outside the blackout (bootcopy.py), and the boot unit pointed at it
        copy, copied = bootcopy.ensure()
        staged = {"kernel": os.path.abspath(kernel_image), "sha256": digest,
                  "initrd": os.path.abspath(initrd) if initrd else None, "cmdline": line,
                  "target": res.target, "running": res.running,
                  "kexec_loaded": self.kernel.kexec_loaded(),
                  "boot_agent": {"copy": copy, "detail": copied,
                                 "unit": point_boot_unit(self.dir, self.kernel)}}
        self.state.staged = staged
        self.state.enter("stage")
        self._save()
        return staged

    def _via_unit(self, after_kexec: bool) -> bool:
        """Start the holder as kho-agent-holder.service (holderstart.py)? Before the kexec:
        when preflight chose the systemd method; after it: when the kexec was one."""
        if after_kexec:
            rec = read_json(self._path(FDSTORES_FILE))
            return isinstance(rec, dict) and rec.get("method") == "systemd"
        km = (self.state.preflight or {}).get("kexec_method")
        return isinstance(km, dict) and km.get("method") == "systemd"

    def _holder(self) -> HolderClient:
        c = holder_client(self.dir)
        if c is not None:
            return c
        try:
            return start_holder(self.dir, self.kernel, self._via_unit(after_kexec=False))
        except HolderError as e:
            raise self._fail(self.state.phase if self.state.phase != "new" else "preserve",
                             str(e)) from None

    def preserve(self, spec: WorkloadSpec) -> dict:
        """Start the holder and preserve every workload of `spec` through LUO."""
        with self._holder() as h:
            try:
                # the reply lists every workload the holder preserved, created and adopted
                records, _ = h.call("preserve", spec=spec.to_json())
            except HolderError as e:
                raise self._fail("preserve", str(e)) from None
        out = {"workloads": records["workloads"], "spec": spec.to_json()}
        write_json(self._path(PRESERVE_FILE), out)
        self.state.enter("preserve")
        self._save()
        return out

    def _records(self, phase: str) -> list[dict]:
        """Every preserved workload, from the holder (it also knows adopted memfds)."""
        c = holder_client(self.dir)
        if c is None:
            raise self._fail(phase, "no holder is running: nothing is preserved (run preserve)")
        with c:
            reply, _ = c.call("records")
        return reply["workloads"]

    def snapshot(self) -> dict:
        """Walk the live outgoing radix tree; the journal body (snapshot, workload hashes
        and PFNs) is written now, so the kexec window only adds the final stamps."""
        pfns = {f"{w['session']}/{w['token']}": runs_to_pfns(w["pfn_runs"])
                for w in self._records("snapshot")}
        try:
            snap = take_snapshot(self.kernel, pfns)
        except (OSError, KernelError, ValueError) as e:
            raise self._fail("snapshot", str(e)) from None
        write_json(self._path(SNAPSHOT_FILE), snap)
        self.state.enter("snapshot")
        staged = self.state.staged or {}
        body = Journal(
            handover_id=self.state.handover_id, host=self.kernel.hostname(),
            kernel_from=staged.get("running") or _running_abi(self.kernel),
            kernel_to={k: staged.get(k) for k in ("kernel", "sha256", "target")},
            snapshot=snap, stamps={h["phase"]: h["t"] for h in self.state.history})
        with self._holder() as h:
            try:
                h.call("prepare", journal=body.to_json())
            except HolderError as e:
                raise self._fail("snapshot", str(e)) from None
        self._save()
        return {k: v for k, v in snap.items() if k not in ("blocks", "node_pages")}

    def kexec(self, *, yes: bool, kexec_method: str = "direct",
              allow_fdstore_loss: bool = False) -> dict:
        """Seal the journal (final stamps) into its preserved memfd and on disk, then
        `kexec -e` -- or, with the systemd method, hand the sessions to PID 1 and
        `systemctl kexec` (kho_agent.systemdhost). Everything big was written at snapshot
        time: this window is short. A direct kexec that would lose other units' FD stores
        is refused unless `allow_fdstore_loss`."""
        if not yes:
            raise AgentError("kexec", "refusing to kexec without --yes")
        claim = self._claim_kexec()       # first: a second ask touches nothing else
        started = False
        try:
            res = self._kexec_claimed(kexec_method, allow_fdstore_loss)
            started = True
            return res
        finally:
            if not started:               # refused, or the kexec returned an error
                os.unlink(claim)

    def _kexec_claimed(self, kexec_method: str, allow_fdstore_loss: bool) -> dict:
        """kexec's work once this ask holds the boot's claim."""
        # A last look at PID 1 and the other units' FD stores (systemctl: seconds on a slow
        # host). Everything still runs meanwhile, so it is not part of the kexec window the
        # agent reports (agent_kexec_s): that starts now, with the sealing.
        decision = decide(self.kernel, kexec_method, allow_fdstore_loss)
        if not decision.ok:
            raise self._fail("kexec", str(decision.refused))
        write_json(self._path(FDSTORES_FILE), {"method": decision.method, "why": decision.why,
                                               "before": fdstore_counts(decision.fdstores)})
        t0 = time.time()
        if not self.kernel.kexec_loaded():
            raise self._fail("kexec", "no kernel staged (kexec_loaded is 0): run stage first")
        if self.state.stamp("snapshot") is None:
            raise self._fail("kexec", "no radix snapshot: run snapshot first")
        tail = JournalTail(self.state.handover_id, {"kexec": time.time()})
        c = holder_client(self.dir)
        if c is None:
            raise self._fail("kexec", "no holder is running: nothing is preserved")
        with c:
            try:
                sealed, _ = c.call("seal", tail=tail.to_json())
                if decision.method == "systemd":
                    c.call("to_pid1")
            except HolderError as e:
                raise self._fail("kexec", str(e)) from None
        t_exec = time.time()
        tail.stamps["kexec_exec"] = t_exec
        tail.agent_kexec_s = t_exec - t0
        journal.write_tail(self.dir, tail)
        self.state.enter("kexec")
        self._save()
        command = "systemctl kexec" if decision.method == "systemd" else "kexec -e"
        try:
            if decision.method == "systemd":
                self.kernel.systemd_kexec()
            else:
                self.kernel.kexec_exec()
        except KernelError as e:
            raise self._fail("kexec", f"{command} failed: {e}") from None
        return {"handover_id": self.state.handover_id, "kexec_exec": t_exec,
                "command": command, "kexec_method": decision.to_json(),
                "agent_kexec_s": t_exec - t0, "journal_bytes": sealed["bytes"]}

    def _claim_kexec(self) -> str:
        """Make this handover's kexec happen at most once per boot, whoever asks: the first
        caller creates `kexec-claim.<handover>.<boot>` (O_EXCL); any later one -- a controller
        resuming after it died between committing kexec_requested and hearing back -- is
        refused with KexecAlreadyStarted. The claim is dropped again only when the kexec
        certainly did not start. Returns the claim's path."""
        boot = self.kernel.boot_id()
        path = self._path(f"kexec-claim.{self.state.handover_id}.{boot}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KexecAlreadyStarted(
                f"kexec: the kexec of handover {self.state.handover_id} already started in "
                f"this boot ({boot}); not sent twice") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{time.time():.6f}\n")
        return path

    # --- after kexec ----------------------------------------------------------------------
    def verify(self, *, agent_start: Optional[float] = None,
               release_before_verify: bool = False, at_boot: bool = False,
               collect: bool = False) -> dict:
        """Read the incoming state, retrieve every workload and FINISH (restored), then
        check their bytes (verified), measure. `release_before_verify`: the workloads
        waiting to claim their memfds get them between the two (the holder verifies its
        own duplicate of each fd). `at_boot`: run by kho-agent-verify.service early in the
        boot. `collect`: only return what a verify of this boot found (waiting for one
        still running); NothingToCollect (exit 3) when none ran."""
        import fcntl
        agent_start = agent_start or time.time()
        deadline = time.monotonic() + COLLECT_WAIT_S
        while True:
            try:
                with open(self._path("verify.lock"), "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)   # the boot unit's verify, if it runs
                    return self._verify_locked(agent_start, release_before_verify, at_boot,
                                               collect)
            except NothingToCollect:
                # the boot unit may not have started yet (sshd can come up first): wait
                # while PID 1 still has it queued or starting
                if (time.monotonic() > deadline
                        or not self.kernel.unit_pending(bootrestore.VERIFIED_BY_UNIT)):
                    raise
            time.sleep(0.2)

    def _verify_locked(self, agent_start: float, release_before_verify: bool, at_boot: bool,
                       collect: bool) -> dict:
        boot_time = self.kernel.boot_time()
        prev = self._verified_in_this_boot(boot_time)
        if prev is not None:
            # already verified in this boot (by the systemd unit, then the controller
            # collects): the sessions are FINISHed and held; say what was found then
            from .report import handover_report
            rep0 = handover_report(prev, self.state, self.kernel.hostname())
            self._fdstores(rep0, after=False)
            self._boot(rep0, collected=True)
            return rep0.to_json()
        if collect:
            raise NothingToCollect("nothing to collect: no verify ran in this boot "
                                   "(kho-agent-verify.service did not run or failed early)")
        disk, raw_in, t_tree, pages = self._early_reads(boot_time)
        incoming = IncomingTree.from_json(raw_in, "incoming")
        via_unit = self._via_unit(after_kexec=True)
        if at_boot and via_unit and holder_client(self.dir) is None:
            # the holder's interpreter starts while this one records what it read
            queue_holder_unit(self.dir, self.kernel)
        tree = bootrestore.tree_record(raw_in, t_tree, boot_time)
        ok, no = bootrestore.verdicts(tree, pages)
        t_exec = None if disk is None else (disk.stamps.get("kexec_exec")
                                            or disk.stamps.get("kexec"))
        stopped = bootrestore.read_holder_stopped(self.dir)
        sd_s, rest_s = bootrestore.shutdown_spans(t_exec, stopped, boot_time)
        write_json(self._path(bootrestore.BOOT_FILE), bootrestore.BootRecord(
            bootrestore.VERIFIED_BY_UNIT if at_boot else bootrestore.VERIFIED_BY_CONTROLLER,
            boot_time, tree, pages, ok, no, stopped if sd_s is not None else None,
            sd_s, rest_s, self._early_of_this_boot(boot_time)).to_json())
        reply, lost_holder, checked, t_released = None, None, None, None
        for attempt in range(2):
            try:
                c = holder_client(self.dir) or start_holder(self.dir, self.kernel, via_unit,
                                                            after_kexec=True)
                with c:
                    reply, _ = c.call("retrieve",
                                      journal=None if disk is None else disk.to_json())
                    if not release_before_verify:
                        checked, _ = c.call("verify")
                if release_before_verify:
                    # the connection is closed: claims queued on the holder are served now
                    t_released = time.time()
                    c2 = holder_client(self.dir)
                    if c2 is None:
                        raise HolderError("the holder went away after retrieve", PEER_GONE)
                    with c2:
                        checked, _ = c2.call("verify")
                break
            except (HolderError, LiveUpdateError) as e:
                # A holder killed mid-retrieval takes every session it had retrieved but
                # not FINISHed with it (LUO drops them on close). Retry once with a fresh
                # holder so the report can say exactly which workloads were lost.
                if (attempt == 0 and isinstance(e, HolderError) and e.kind == PEER_GONE
                        and disk is not None):
                    lost_holder = str(e)
                    continue
                out = VerifyResult(incoming=incoming, journal=disk, error=str(e),
                                   agent_start=agent_start,
                                   kernel_boot_time=self.kernel.boot_time(),
                                   release=self.kernel.release())
                write_json(self._path(VERIFY_FILE), out.to_json())
                raise self._fail("verify", f"retrieval failed: {e}") from None
        assert reply is not None and checked is not None
        results = [WorkloadResult.from_json(r, f"verify: results[{i}]")
                   for i, r in enumerate(checked["results"])]
        if lost_holder:
            for r in results:
                if r.error:
                    r.error += f" (the first holder died mid-retrieval: {lost_holder})"
        jr = Journal.from_json(reply["journal"], "retrieve: journal")
        if disk is not None and disk.handover_id == jr.handover_id:
            # the disk tail was written after the memfd was sealed: its stamps are later
            jr = jr.merged(JournalTail(disk.handover_id, disk.stamps, disk.agent_kexec_s))
        journal_error = reply.get("journal_error")
        out = VerifyResult(incoming=incoming, journal=jr,
                           journal_error=journal_error if isinstance(journal_error, str) else None,
                           results=results, agent_start=agent_start,
                           kernel_boot_time=self.kernel.boot_time(),
                           t_restored=reply["t_restored"], t_verified=checked["t_verified"],
                           t_released=t_released, release=self.kernel.release(),
                           running=_running_abi(self.kernel),
                           sessions_lost=_str_dict(reply.get("sessions_lost")))
        write_json(self._path(VERIFY_FILE), out.to_json())
        if self.state.handover_id != jr.handover_id:
            self.state = AgentState(handover_id=jr.handover_id or self.state.handover_id,
                                    history=[{"phase": p, "t": t} for p, t in
                                             jr.stamps.items()])
        self.state.enter("boot", t=out.kernel_boot_time)
        from .report import handover_report
        rep = handover_report(out, self.state, self.kernel.hostname())
        self._fdstores(rep, after=True)
        self._boot(rep, collected=False)
        if rep.failure is not None and rep.result != "success":
            self.state.fail(rep.failure.phase, rep.failure.reason)
        self.state.enter("verify")
        self._save()
        return rep.to_json()

    def _early_reads(self, boot_time: float) -> tuple[Optional[Journal], dict, float,
                                                        dict]:
        """The reads made first thing after a kexec (bootrestore.py): the journal on
        disk, the incoming tree (and when it was read), /proc/kpageflags of every
        preserved page."""
        try:
            disk = journal.read_disk(self.dir)
        except InputError:
            disk = None    # the disk copy is the fallback: the memfd journal comes first
        t_tree = time.time()
        raw_in = read_incoming(self.kernel, None if disk is None else disk.snapshot)
        pages = bootrestore.pages_record(
            self.kernel, None if disk is None else disk.snapshot,
            [p for w in (disk.workloads if disk is not None else [])
             for p in runs_to_pfns(w.pfn_runs) if p], boot_time)
        return disk, raw_in, t_tree, pages

    def early(self, by: str) -> dict:
        """Only the early reads (tree, kpageflags), recorded in early.json for the verify
        of this boot to report beside its own: run by a hook earlier than any unit (an
        initramfs), where the incoming tree may still be whole. Retrieves nothing."""
        boot_time = self.kernel.boot_time()
        _, raw_in, t_tree, pages = self._early_reads(boot_time)
        tree = bootrestore.tree_record(raw_in, t_tree, boot_time)
        ok, no = bootrestore.verdicts(tree, pages)
        rec = {"by": by, "kernel_start": boot_time, "tree": tree, "kpageflags": pages,
               "established": ok, "not_established": no}
        write_json(self._path(bootrestore.EARLY_FILE), rec)
        return rec

    def _early_of_this_boot(self, boot_time: float) -> Optional[dict]:
        """early.json when `kho-agent early` wrote it in this boot, else None."""
        rec = read_json(self._path(bootrestore.EARLY_FILE))
        if not isinstance(rec, dict):
            return None
        t = rec.get("kernel_start")
        if not isinstance(t, (int, float)) or abs(t - boot_time) >= 1.0:
            return None
        return {k: rec.get(k) for k in ("by", "tree", "kpageflags", "established",
                                         "not_established")}

    def _fdstores(self, rep: Any, after: bool) -> None:
        """The report's kexec_method and per-unit FD stores before/after the kexec
        (fdstores.json; `after`: count them now, in the new kernel, and record it)."""
        path = self._path(FDSTORES_FILE)
        rec = read_json(path)
        if not isinstance(rec, dict):
            return
        raw = rec.get("before")
        before: dict = raw if isinstance(raw, dict) else {}
        if after:
            try:
                rec["after"] = {u.unit: u.count for u in self.kernel.fdstore_units()}
            except KhoAgentError as e:
                rec["after_error"] = str(e)
            write_json(path, rec)
        now = rec.get("after") if isinstance(rec.get("after"), dict) else None
        rep.kexec_method = str(rec.get("method"))
        rep.fdstores = [{"unit": u, "before": int(n),
                         "after": None if now is None else int(now.get(u, 0)),
                         "lost": None if now is None else max(0, int(n) - int(now.get(u, 0)))}
                        for u, n in sorted(before.items())]

    def handover_in_flight(self) -> bool:
        """This host's agent sent a kexec and has not verified since (the boot unit's
        condition: after any other kexec it has nothing to do)."""
        return self.state.phase == "kexec"

    def _boot(self, rep: Any, collected: bool) -> None:
        """The report's `boot` record (boot.json of this handover) and systemd's shutdown
        span; `collected`: this call only returned an earlier verify's result."""
        rec = read_json(self._path(bootrestore.BOOT_FILE))
        if not isinstance(rec, dict) or rec.get("kernel_start") is None:
            return
        t0 = rep.stamps.get("kernel_start")
        if t0 is not None and abs(float(rec["kernel_start"]) - float(t0)) >= 1.0:
            return                        # an older boot's record
        rep.boot = dict(rec, collected=collected)
        sd = rec.get("systemd_shutdown_s")
        rep.downtime.systemd_shutdown_s = sd if isinstance(sd, (int, float)) else None

    def _verified_in_this_boot(self, boot_time: float) -> Optional[VerifyResult]:
        """verify.json when a verify of this boot wrote it (restored), else None; an older
        boot's file is not parsed whole (the boot unit reads it first thing)."""
        raw = read_json(self._path(VERIFY_FILE))
        if not isinstance(raw, dict):
            return self._read_verify() if raw is not None else None   # says what is wrong
        t = raw.get("kernel_boot_time")
        if not isinstance(t, (int, float)) or abs(t - boot_time) >= 1.0:
            return None
        prev = VerifyResult.from_json(raw, self._path(VERIFY_FILE))
        return prev if prev.t_restored else None

    def _read_verify(self) -> Optional[VerifyResult]:
        """verify.json, if written; StateError/RecordError (exit 2) naming file and field."""
        path = self._path(VERIFY_FILE)
        raw = read_json(path)
        return None if raw is None else VerifyResult.from_json(raw, path)

    def report(self, textfile_dir: Optional[str] = None) -> dict:
        """Write report.json and the node_exporter textfile; return the report."""
        from .report import handover_report, write_report
        rep = handover_report(self._read_verify(), self.state, self.kernel.hostname())
        self._fdstores(rep, after=False)
        self._boot(rep, collected=False)
        write_report(rep, self.dir, textfile_dir)
        if self.state.phase != "report":
            self.state.enter("report")
            self._save()
        return rep.to_json()

    def release(self, session: Optional[str] = None, token: Optional[int] = None) -> dict:
        """Drop retrieved memfds on purpose (they are freed when nobody holds them)."""
        c = holder_client(self.dir)
        if c is None:
            raise AgentError("verify", "no holder is running")
        with c:
            reply, _ = c.call("release", session=session, token=token)
        return reply


def _str_dict(v: object) -> dict[str, str]:
    """{name: reason} from a holder reply field (anything else: empty)."""
    return ({str(k): str(x) for k, x in v.items()} if isinstance(v, dict) else {})


def _running_abi(kernel: Kernel) -> dict:
    """preflight.running_abi, imported when needed (preflight pulls in the image readers)."""
    from .preflight import running_abi
    return running_abi(kernel)
