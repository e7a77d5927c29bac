"""The lab fleet: N QEMU guests that outlive the command that started them, tracked in a
state file, with an Ansible inventory the rollout engine uses as it is.

    fleet = LabFleet(Path(".lab/guests"))
    fleet.up(2, kernel, cache=Path(".lab/cache"), extra_kernels=[target],
             inventory=Path("inventory/lab.yaml"))
    fleet.status()                              # [{name, pid, port, state, release}, ...]
    fleet.dump("lab-1", Path("lab-1.core"))     # ELF core over QMP; the guest runs on
    fleet.down()                                # QMP quit (then signals), overlays removed

The workdir holds `guests.json` (the state file), `known_hosts` (every guest's host key,
recorded on first contact: trust on first use, acceptable for lab VMs on loopback ports
only) and one directory per guest: its qcow2 overlay on the shared read-only rootfs
image, serial log, QMP socket, QEMU stderr and its own known_hosts. QEMU runs in its own
session, so Ctrl-C in the terminal that ran `lab up` does not take the guests down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import yaml

from kho_agent.atomicfile import atomic_write, atomic_write_json
from kho_agent.kernel.twinproto import pid_alive
from kho_fleet.lab.guest import GuestError, LabGuest, LabKey, _ssh_banner, lab_key
from kho_fleet.lab.qemu import QemuError, dump_guest_memory, find_qemu
from kho_fleet.lab.qmp import QMPClient, QMPError
from kho_fleet.lab.rootfs import build_rootfs

from ..errors import KhoFleetError

__all__ = ["LabError", "GuestRecord", "LabFleet", "check_qemu", "write_inventory",
           "STATE_FILE", "BOOT_TIMEOUT_VAR"]

STATE_FILE = "guests.json"
BOOT_TIMEOUT_VAR = 180          # kho_boot_timeout written into the inventory (TCG kexec)
PathLike = Union[str, Path]
Note = Callable[[str], None]


class LabError(KhoFleetError, RuntimeError):
    """A lab command that cannot be carried out; the message is one line."""


@dataclass(frozen=True)
class GuestRecord:
    """One running lab guest, as the state file records it."""

    name: str
    pid: int
    port: int
    dir: str            # the guest's own directory (overlay, serial log, known_hosts)
    qmp: str            # QMP unix socket
    serial: str
    kernel: str         # booted with -kernel
    image: str          # the shared rootfs image under the overlay
    key: str            # the lab's SSH private key
    started: float      # Unix time
    arch: str = "x86_64"   # the inventory's kho_arch (arm64: qemu-system-aarch64 -M virt)


def check_qemu(arch: str = "x86_64") -> str:
    """Path of qemu-system-x86_64 (arm64: qemu-system-aarch64); LabError naming the Debian
    package when QEMU is missing."""
    name, pkg = (("qemu-system-aarch64", "qemu-system-arm") if arch == "arm64"
                 else ("qemu-system-x86_64", "qemu-system-x86"))
    qemu = find_qemu(name)
    if qemu is None:
        raise LabError(f"{name} not found: install the Debian package {pkg} (make test "
                       "does, as root)")
    if shutil.which("qemu-img") is None:
        raise LabError("qemu-img not found: install the Debian package qemu-utils")
    return qemu


def guest_alive(rec: GuestRecord) -> bool:
    """True while this record's QEMU runs (a zombie child of ours is reaped and counts as
    gone) and its command line names the record's QMP socket: a recycled pid does not count."""
    if not pid_alive(rec.pid):
        return False
    try:
        return rec.qmp.encode() in Path(f"/proc/{rec.pid}/cmdline").read_bytes()
    except OSError:
        return False


def _one_line(e: BaseException) -> str:
    """The first line of an error's message (GuestError carries serial tails below it)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def write_inventory(path: PathLike, records: Sequence[GuestRecord], known_hosts: PathLike,
                    workdir: PathLike) -> Path:
    """Write an Ansible YAML inventory of `records` (lab-1..lab-N) at `path`, atomically."""
    out = Path(path)
    hosts = {r.name: {"ansible_host": "127.0.0.1", "ansible_port": r.port,
                      "ansible_user": "root", "ansible_ssh_private_key_file": r.key,
                      "kho_ssh_known_hosts": str(Path(known_hosts).resolve()),
                      "kho_boot_timeout": BOOT_TIMEOUT_VAR if r.arch == "x86_64"
                      else 3 * BOOT_TIMEOUT_VAR,       # arm64 TCG: 1.5 min to SSH when loaded
                      **({"kho_arch": r.arch} if r.arch != "x86_64" else {})} for r in records}
    head = (f"# Written by `kho-fleet lab up` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: "
            f"{len(records)} QEMU lab guest(s)\n# tracked in {Path(workdir).resolve()} "
            "(`kho-fleet lab status`, `kho-fleet lab down`). Host keys were recorded on first\n"
            "# contact (trust on first use: loopback lab VMs only).\n")
    atomic_write(out, (head + yaml.safe_dump({"all": {"hosts": hosts}}, sort_keys=False)).encode())
    return out


class LabFleet:
    """The lab guests tracked in one workdir (default REPO/.lab/guests)."""

    def __init__(self, workdir: PathLike) -> None:
        """The fleet whose state lives in `workdir` (nothing is read or started yet)."""
        self.workdir = Path(workdir).resolve()

    @property
    def state_path(self) -> Path:
        """The state file: every guest `lab up` started here."""
        return self.workdir / STATE_FILE

    @property
    def known_hosts(self) -> Path:
        """Every guest's host key (the inventory's kho_ssh_known_hosts)."""
        return self.workdir / "known_hosts"

    # --- the state file -----------------------------------------------------------------
    def records(self) -> list[GuestRecord]:
        """The guests `lab up` recorded here (running or not); [] when there is no state."""
        try:
            data = json.loads(self.state_path.read_text())
            return [GuestRecord(**g) for g in data["guests"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LabError(f"{self.state_path}: unreadable lab state ({e}); remove it after "
                           "stopping any QEMU it lists") from None

    def record(self, name: str) -> GuestRecord:
        """The record of guest `name`; LabError listing the known names otherwise."""
        recs = self.records()
        for r in recs:
            if r.name == name:
                return r
        have = ", ".join(r.name for r in recs) or "none: run `kho-fleet lab up N`"
        raise LabError(f"no lab guest {name!r} in {self.workdir} (guests: {have})")

    def _save(self, records: Sequence[GuestRecord]) -> None:
        """Write the state file atomically."""
        atomic_write_json(self.state_path, {"guests": [asdict(r) for r in records]})

    def guest(self, rec: GuestRecord) -> LabGuest:
        """A LabGuest attached to a running record: SSH (`run`, `put`, `get`) only."""
        return LabGuest(rec.dir, rec.kernel, rec.image, LabKey(Path(rec.key), ""), port=rec.port,
                        arch=rec.arch)

    # --- up -------------------------------------------------------------------------------
    def up(self, n: int, kernel: PathLike, *, cache: PathLike,
           extra_kernels: Sequence[PathLike] = (), inventory: Optional[PathLike] = None,
           memory_mib: int = 1024, smp: int = 2, boot_timeout: float = 240.0,
           suite: str = "bookworm", note: Note = lambda msg: None,
           arch: str = "x86_64") -> dict:
        """Boot `n` guests (lab-1..lab-n) in parallel, wait for SSH, record their host keys,
        the state file and (if given) the inventory. Guests keep running after we return."""
        if not 1 <= n <= 16:
            raise LabError(f"{n} guests: the lab runs 1..16")
        check_qemu(arch)
        kernels = [Path(kernel)] + [Path(k) for k in extra_kernels]
        for k in kernels:
            if not k.is_file():
                raise LabError(f"kernel not found: {k}")
        running = [r.name for r in self.records() if guest_alive(r)]
        if running:
            raise LabError(f"lab guests already running in {self.workdir} "
                           f"({', '.join(running)}): run `kho-fleet lab down` first")
        key = lab_key(cache)
        note(f"root filesystem ({suite}) for {kernels[0].name} (cached by content; a first "
             "build runs debootstrap, ~1 min)")
        image = build_rootfs(cache, kernels[0], key.public, extra_kernels=kernels[1:],
                             suite=suite, arch=arch)
        prefix = "lab" if arch == "x86_64" else f"lab-{arch}"
        guests = [LabGuest(self.workdir / f"{prefix}-{i}", kernels[0], image, key,
                           memory_mib=memory_mib, smp=smp, new_session=True, arch=arch)
                  for i in range(1, n + 1)]
        note(f"booting {n} guest(s) under QEMU (TCG: ~20-30 s to SSH)")

        def boot(g: LabGuest) -> float:
            """Start one guest and wait for its SSH; the seconds it took."""
            secs = g.start(timeout=boot_timeout)
            note(f"{g.workdir.name}: SSH up on 127.0.0.1:{g.port} after {secs:.1f}s")
            return secs

        errors: list[str] = []
        with ThreadPoolExecutor(max_workers=n) as ex:
            futures = [ex.submit(boot, g) for g in guests]
            try:
                for g, f in zip(guests, futures):
                    try:
                        f.result()
                    except GuestError as e:
                        errors.append(f"{g.workdir.name} did not boot: {_one_line(e)} "
                                      f"(serial log {g.serial_path})")
            except BaseException:      # Ctrl-C: no guest may run on unrecorded
                for g in guests:
                    g.stop()           # a booting guest's wait then ends at once
                raise
        if errors:
            for g in guests:
                g.stop()
            raise LabError(errors[0] + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
        records: list[GuestRecord] = []
        out = []
        try:
            for g in guests:
                release = g.run("uname -r", timeout=30, check=True)[1].strip()
                assert g.vm is not None and g.port is not None
                qmp, serial = str(g.vm.qmp_path), str(g.serial_path)
                pid = g.release()
                assert pid is not None
                rec = GuestRecord(g.workdir.name, pid, g.port, str(g.workdir), qmp, serial,
                                  str(g.kernel), str(g.image), str(key.path.resolve()),
                                  time.time(), arch)
                records.append(rec)
                out.append({**asdict(rec), "release": release, "boot_s": g.boot_seconds})
        except GuestError as e:
            for g in guests:
                g.stop()
            self._stop(records)
            raise LabError(f"guest answered SSH, then failed: {_one_line(e)}") from None
        self._save(records)
        self._write_known_hosts(records)
        inv = None
        if inventory is not None:
            inv = str(write_inventory(inventory, records, self.known_hosts, self.workdir))
        return {"workdir": str(self.workdir), "image": str(image),
                "key": str(key.path.resolve()),
                "known_hosts": str(self.known_hosts), "inventory": inv, "guests": out}

    def _write_known_hosts(self, records: Sequence[GuestRecord]) -> None:
        """The workdir's known_hosts: every guest's key as recorded on first contact."""
        lines = []
        for r in records:
            try:
                lines += [ln for ln in (Path(r.dir) / "known_hosts").read_text().splitlines()
                          if ln.strip()]
            except OSError:
                continue
        atomic_write(self.known_hosts, "".join(f"{ln}\n" for ln in lines).encode(), mode=0o600)

    # --- status -----------------------------------------------------------------------------
    def status(self, ssh_timeout: float = 15.0) -> list[dict]:
        """Each recorded guest: name, pid, port, state (up: SSH answers; no-ssh: QEMU runs
        but SSH does not answer, e.g. booting or kexec'ing; stopped), release, boot_id."""
        out = []
        for r in self.records():
            alive = guest_alive(r)
            row = {"name": r.name, "pid": r.pid, "port": r.port, "state": "stopped",
                   "release": None, "boot_id": None, "serial": r.serial}
            if alive:
                row["state"] = "no-ssh"
                if _ssh_banner(r.port):
                    g = self.guest(r)
                    try:
                        rc, text, _ = g.run("uname -r; cat /proc/sys/kernel/random/boot_id",
                                            timeout=ssh_timeout)
                        words = text.split()
                        if rc == 0 and len(words) == 2:
                            row.update(state="up", release=words[0], boot_id=words[1])
                    except GuestError:
                        pass
                    finally:
                        g.stop()
            out.append(row)
        return out

    # --- down -------------------------------------------------------------------------------
    def _stop(self, records: Sequence[GuestRecord], timeout: float = 10.0) -> list[dict]:
        """Power each guest off: QMP quit, then SIGTERM, then SIGKILL; remove its overlay."""
        out = []
        for r in records:
            how = "not running"
            if guest_alive(r):
                how = "quit"
                try:
                    with QMPClient(r.qmp) as q:
                        q.execute("quit", timeout=5.0)
                except QMPError:
                    pass    # QEMU closes the socket as it quits; the wait below decides
                deadline = time.monotonic() + timeout
                while guest_alive(r) and time.monotonic() < deadline:
                    time.sleep(0.1)
                for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
                    if not guest_alive(r):
                        break
                    how = "killed"
                    try:
                        os.kill(r.pid, sig)
                    except ProcessLookupError:
                        break
                    deadline = time.monotonic() + wait
                    while guest_alive(r) and time.monotonic() < deadline:
                        time.sleep(0.1)
            for p in (Path(r.dir) / "disk.qcow2", Path(r.qmp)):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            if Path(r.qmp).parent.name.startswith("kho-qmp-"):   # QemuVM's short-path dir
                shutil.rmtree(Path(r.qmp).parent, ignore_errors=True)
            out.append({"name": r.name, "pid": r.pid, "stopped": how})
        return out

    def down(self) -> list[dict]:
        """Power off every recorded guest, remove overlays, forget them (logs are kept)."""
        out = self._stop(self.records())
        for p in (self.state_path, self.known_hosts):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        return out

    # --- dump -------------------------------------------------------------------------------
    def dump(self, name: str, out: PathLike, timeout: float = 300.0) -> dict:
        """Save guest `name`'s memory as an ELF core at `out` over QMP (stop, dump-guest-memory,
        cont): `kho-fleet inspect --memory` reads it. The guest resumes afterwards."""
        rec = self.record(name)
        if not guest_alive(rec):
            raise LabError(f"{name} is not running (pid {rec.pid})")
        path = Path(out)
        if not path.parent.is_dir():
            raise LabError(f"--out {out}: no such directory {path.parent}")
        qmp = QMPClient(rec.qmp)
        try:
            qmp.connect(timeout=10.0)
            res = dump_guest_memory(qmp, path, timeout=timeout, resume=True,
                                    alive=lambda: guest_alive(rec))
        except (QMPError, QemuError) as e:
            raise LabError(f"{name}: {_one_line(e)}") from None
        finally:
            qmp.close()
        return {"host": name, "path": str(res.path), "bytes": res.size,
                "seconds": round(res.seconds, 3)}
