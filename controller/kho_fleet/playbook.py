"""A rollout plan: which kernel, which workloads to preserve, which hosts in which stages.

    name: canary then the rest
    hosts: all                      # an inventory pattern (default all)
    target:
      kernel: ../images/bzImage     # a file (relative to this playbook), or twin:<release>
      sha256: 72df46...             # required for a file; optional for twin:
      initrd: initrd.img            # optional, with optional initrd_sha256
      cmdline: reuse                # reuse (the running kernel's) or a literal command line
    # or, for a fleet of several architectures, one kernel per kho_arch (instead of kernel:):
    #   target:
    #     kernels:
    #       x86_64: {path: ../images/bzImage, sha256: 72df46...}
    #       arm64:  {path: ../images/Image.gz, sha256: 0c1d2e...}  # + initrd, cmdline
    #     cmdline: reuse            # the default of every kernels entry
    workloads:                      # the agent's spec (kho_agent.workload)
      sessions: [{name: vm-ram, memfds: [{token: 0x1001, size: 64MiB, seed: 1}]}]
    stages:
      - {name: canary, hosts: 1, gate: {max_downtime_p95_s: 20}, pause: manual}
      - {name: rest, max_parallel: 4}
    on_failure: halt                # halt | continue | rollback
    release_before_verify: false    # true: memfds go back to waiting workloads before
                                    # their bytes are checked (verify --release-before-verify)
    timeouts: {ssh_s: 30, boot_s: 300, verify_s: 120}

Decisions:
- `kernel: twin:<release>` names a digital-twin kernel image with that release, built on
  demand by kho_fleet.sim.kernelimage (deterministic bytes). It can only be rolled out to
  `kho_transport: sim` hosts. It takes no sha256: the image is generated, so a pin could
  not hold and would only look like a check (a pin given is refused).
- A kernel *file* must be pinned by sha256; nothing is computed and pinned silently, so the
  image that was reviewed is the image that boots. Loading a playbook does not read the
  kernel (it may live on another machine); `Target.check_files()` hashes it at rollout start.
- Stages take hosts in inventory order from the play's `hosts:` pattern, each taking only
  hosts no earlier stage took: `hosts: N` the next N, `hosts: "P%"` ceil(P% of the whole
  play) but at least 1, `hosts: <pattern>` (a group, host or list) the remaining hosts it
  matches, `hosts: rest` (or no `hosts:`, last stage only) all that remain. A count or a
  percentage asking for more hosts than remain is refused (a canary of 0 hosts would pass
  its gate vacuously); a pattern or `rest` stage may come out empty. Hosts no stage takes
  are left alone.
- Every count and duration is bounded (LIMITS below, each named in its message): stages,
  host counts, max_parallel, max_failed_hosts, durations (> 0, at most 7 days; pause >= 0),
  workload sessions, memfds and their sizes. A sim host's RAM is known, so workloads that
  cannot fit in it (>= kho_sim_ram_mib) are refused when hosts are assigned.
- Gates are judged per stage, over that stage's hosts. Defaults: min_success_ratio 1.0,
  all_workloads_verified true, no downtime or failed-host limit. `pause` (seconds, or
  `manual` for an operator's go-ahead) is waited after a stage passes its gate.
- `kernels:` names one kernel per architecture (keys as the inventory's kho_arch: x86_64,
  arm64; amd64/aarch64 accepted). A play host whose kho_arch has no entry is refused when
  hosts are assigned (before anything is built or touched), naming the host and its arch.
  `Playbook.check_files()` hashes every image against its pin and reads its header
  (kho_agent.kimage): an image whose architecture or page size is not its hosts' is refused
  too, for `kernel:` as well (a single x86_64 bzImage cannot go to a kho_arch: arm64 host).
  Compressed arm64 images (Image.gz, EFI zboot vmlinuz) are turned into the raw Image
  kexec_file_load takes by the controller (artifacts.py); the pin is of the file given.
- Every error is one line: `file:line: field: problem` (PlaybookError).
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional, Union

from kho_agent.digest import sha256_file
from kho_agent.kimage import KernelImageInfo, inspect_kernel_image
from kho_agent.workload import SpecError, WorkloadSpec, parse_spec

from .errors import InputError
from .inventory import MAX_HOSTS, MAX_SECONDS, Inventory, InventoryError
from .rawkernel import check_unpacks
from .sim.faults import FaultError, check_placements, workload_sizes
from .yamldoc import YamlDoc, load_yaml, one_line

__all__ = ["PlaybookError", "Target", "Gate", "Stage", "Timeouts", "Playbook", "load_playbook",
           "TWIN_SCHEME", "ON_FAILURE", "ARCHES"]

TWIN_SCHEME = "twin:"
ON_FAILURE = ("halt", "continue", "rollback")
ARCHES = ("x86_64", "arm64")                            # the inventory's kho_arch values
_ARCH_ALIASES = {"amd64": "x86_64", "aarch64": "arm64"}
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_RELEASE = re.compile(r"^[A-Za-z0-9._+\-]+$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_PATTERN = re.compile(r"^[A-Za-z0-9_.\-*?!&,:\[\] ]+$")

# --- limits (named in every message that enforces one) -------------------------------------
MAX_STAGES = 1000
MAX_PARALLEL = 1024              # hosts driven at once in one stage (one thread each)
MAX_SESSIONS = 256               # workload sessions
MAX_MEMFDS = 1024                # memfds per session
MAX_MEMFD_BYTES = 1 << 40        # one memfd: 1 TiB
MAX_WORKLOAD_BYTES = 1 << 40     # all memfds together: 1 TiB
MAX_TEXT = 4096                  # names, patterns, paths, command lines (characters)


class PlaybookError(InputError, ValueError):
    """A bad playbook; the one-line message starts with `file:line:` (exit 2)."""


@dataclass(frozen=True)
class Target:
    """The kernel to kexec: a pinned file, or a twin image built on demand.

    `arch` is the `target.kernels` key it was given under (None: the single `kernel:` form,
    for every host)."""

    kernel: str                       # absolute path, or "twin:<release>"
    sha256: Optional[str] = None      # lower-case hex
    initrd: Optional[str] = None
    initrd_sha256: Optional[str] = None
    cmdline: Optional[str] = None     # None = reuse the running kernel's
    where: dict = field(default_factory=dict, compare=False, repr=False)
    arch: Optional[str] = None

    @property
    def is_twin(self) -> bool:
        return self.kernel.startswith(TWIN_SCHEME)

    @property
    def twin_release(self) -> Optional[str]:
        return self.kernel[len(TWIN_SCHEME):] if self.is_twin else None

    def field_name(self, key: str) -> str:
        """The playbook field of `key` ("kernel", "sha256", ...): target.kernel, or
        target.kernels.arm64.path in the per-architecture form."""
        if self.arch is None:
            return f"target.{key}"
        return f"target.kernels.{self.arch}.{'path' if key == 'kernel' else key}"

    def check_files(self) -> Optional[KernelImageInfo]:
        """Hash the kernel (and initrd) files against their pins; PlaybookError if not.

        Returns what kimage reads of the kernel file (None for a twin image); an image for
        another architecture than its `kernels:` key is refused."""
        for what, path, pin in (("kernel", self.kernel, self.sha256),
                                ("initrd", self.initrd, self.initrd_sha256)):
            if path is None or (what == "kernel" and self.is_twin):
                continue
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):     # a FIFO or device would hang
                    raise PlaybookError(f"{self.where[what]}: {self.field_name(what)}: {path}: "
                                        "not a regular file")
                got = sha256_file(path)
            except OSError as e:
                raise PlaybookError(f"{self.where[what]}: {self.field_name(what)}: {path}: "
                                    f"{e.strerror}") from None
            if pin is not None and got != pin:
                key = "sha256" if what == "kernel" else "initrd_sha256"
                raise PlaybookError(f"{self.where.get(key, self.where[what])}: "
                                    f"{self.field_name(key)}: {path} has sha256 {got}, the "
                                    f"playbook pins {pin}")
        if self.is_twin:
            return None
        try:
            info = inspect_kernel_image(self.kernel)
        except OSError as e:
            raise PlaybookError(f"{self.where['kernel']}: {self.field_name('kernel')}: "
                                f"{self.kernel}: {e.strerror}") from None
        where = f"{self.where['kernel']}: {self.field_name('kernel')}"
        if self.arch is not None and info.arch is not None and info.arch != self.arch:
            raise PlaybookError(f"{where}: {self.kernel} is an {info.arch} kernel "
                                f"({info.format}), not {self.arch}")
        try:
            check_unpacks(self.kernel, where)      # a compressed arm64 image must unpack
        except InputError as e:
            raise PlaybookError(str(e)) from None
        return info


@dataclass(frozen=True)
class Gate:
    """What a stage must achieve, over its own hosts, before the rollout goes on."""

    min_success_ratio: float = 1.0
    max_downtime_p95_s: Optional[float] = None
    all_workloads_verified: bool = True
    max_failed_hosts: Optional[int] = None


@dataclass(frozen=True)
class Stage:
    """One step of the rollout: how hosts are picked (`select`, `value`), parallelism, gate."""

    name: str
    select: str                       # count | percent | pattern | rest
    value: Union[int, float, str, None]
    max_parallel: int = 1
    gate: Gate = field(default_factory=Gate)
    pause: Union[float, str] = 0.0    # seconds, or "manual"
    where: str = field(default="", compare=False)


@dataclass(frozen=True)
class Timeouts:
    """Seconds: one SSH operation, a host's return after kexec, verification."""

    ssh_s: float = 30.0
    boot_s: float = 300.0
    verify_s: float = 120.0


@dataclass
class Playbook:
    """A checked playbook file."""

    path: str
    name: str
    hosts: str
    target: Target
    workloads: WorkloadSpec
    stages: list[Stage]
    on_failure: str = "halt"
    timeouts: Timeouts = field(default_factory=Timeouts)
    sha256: str = ""
    where: dict = field(default_factory=dict, repr=False)
    kernels: dict[str, Target] = field(default_factory=dict)   # per arch; {} = `kernel:` form
    release_before_verify: bool = False     # verify --release-before-verify
    kexec_method: Optional[str] = None      # auto | systemd | direct; None: the inventory's
    allow_fdstore_loss: bool = False        # a direct kexec may lose other units' FD stores

    def target_for(self, arch: str) -> Optional[Target]:
        """The kernel for hosts of `arch` (None: the playbook names none for it)."""
        return self.kernels.get(arch) if self.kernels else self.target

    def targets(self) -> list[Target]:
        """Every kernel the playbook names, in playbook order."""
        return list(self.kernels.values()) if self.kernels else [self.target]

    def check_files(self, inventory: Optional[Inventory] = None) -> dict[str, KernelImageInfo]:
        """Hash every kernel (and initrd) against its pin and read its header; with the
        inventory, refuse a play host whose kernel is for another architecture or page size
        (one line naming the host). Returns kimage's reading of each file kernel by arch
        ("*" for the single `kernel:` form)."""
        infos: dict[str, KernelImageInfo] = {}
        for t in self.targets():
            info = t.check_files()
            if info is not None:
                infos[t.arch or "*"] = info
        if inventory is None:
            return infos
        for h in self._play(inventory):
            ht = self.target_for(h.arch)
            info = infos.get((ht.arch or "*") if ht is not None else "")
            if ht is None or info is None:
                continue
            where = f"{ht.where['kernel']}: {ht.field_name('kernel')}: {ht.kernel}"
            if info.arch is not None and info.arch != h.arch:
                raise PlaybookError(
                    f"{where} is an {info.arch} kernel, but host {h.name!r} has kho_arch: "
                    f"{h.arch} in {inventory.path} (name one kernel per architecture under "
                    "target.kernels)")
            if info.page_size is not None and info.page_size != h.page_size:
                raise PlaybookError(
                    f"{where} has {info.page_size}-byte pages, but host {h.name!r} has "
                    f"kho_page_size: {h.page_size} in {inventory.path} (live update between "
                    "page sizes is not supported)")
        return infos

    def _play(self, inventory: Inventory) -> list:
        try:
            return inventory.hosts_matching(self.hosts)
        except InventoryError as e:
            raise PlaybookError(f"{self.where['hosts']}: hosts: {e}") from None

    def assign_hosts(self, inventory: Inventory) -> list[list[str]]:
        """Host names per stage (index-aligned with `stages`), in inventory order."""
        try:
            play = [h.name for h in inventory.hosts_matching(self.hosts)]
        except InventoryError as e:
            raise PlaybookError(f"{self.where['hosts']}: hosts: {e}") from None
        if not play:
            raise PlaybookError(f"{self.where['hosts']}: hosts: {self.hosts!r} matches no "
                                f"host in {inventory.path}")
        for n in play:
            h = inventory.hosts[n]
            t = self.target_for(h.arch)
            if t is None:
                raise PlaybookError(
                    f"{self.where.get('kernels', self.where['hosts'])}: target.kernels: host "
                    f"{n!r} has kho_arch: {h.arch} in {inventory.path}, and the playbook names "
                    f"no {h.arch} kernel (it names: {', '.join(self.kernels)})")
            if t.is_twin and h.transport != "sim" and not h.twin_root:  # twins may sit behind sshd
                raise PlaybookError(
                    f"{t.where['kernel']}: {t.field_name('kernel')}: {t.kernel} "
                    f"is a twin image, but host {n!r} has kho_transport: "
                    f"{inventory.hosts[n].transport} (twin images go to sim hosts only)")
        need = self.workloads.total_bytes
        for n in play:                      # a twin's RAM is known: the workloads must fit
            h = inventory.hosts[n]
            if h.transport == "sim" and need >= h.sim_ram_mib << 20:
                raise PlaybookError(
                    f"{self.where.get('workloads', self.where['hosts'])}: workloads: "
                    f"{need} bytes do not fit in sim host {n!r}'s RAM (kho_sim_ram_mib: "
                    f"{h.sim_ram_mib} in {inventory.path})")
        sizes = workload_sizes(self.workloads)
        for n in play:                      # a placed twin fault must name a workload's page
            h = inventory.hosts[n]
            try:
                check_placements(h.sim_faults, sizes, h.page_size, f"the workloads of {self.path}")
            except FaultError as e:
                raise PlaybookError(f"{h.where or inventory.path}: host {n!r}: kho_sim_faults: "
                                    f"{e}") from None
        remaining = list(play)
        out: list[list[str]] = []
        for st in self.stages:
            if st.select in ("count", "percent"):
                want: int
                if st.select == "count":
                    want = int(st.value)                             # type: ignore[arg-type]
                    asked = f"{want}"
                else:
                    want = max(1, math.ceil(Fraction(str(st.value)) * len(play) / 100))
                    asked = f"{st.value:g}% of the play's {len(play)} hosts = {want}"
                if want > len(remaining):
                    raise PlaybookError(
                        f"{st.where}: stage {st.name!r}: hosts: asks for {asked} hosts, but "
                        f"only {len(remaining)} of the play's {len(play)} hosts "
                        f"({self.hosts!r} in {inventory.path}) are left for it")
                take = remaining[:want]
            elif st.select == "pattern":
                try:
                    names = {h.name for h in inventory.hosts_matching(str(st.value))}
                except InventoryError as e:
                    raise PlaybookError(f"{st.where}: stage {st.name!r}: hosts: {e}") from None
                take = [h for h in remaining if h in names]
            else:
                take = list(remaining)
            chosen = set(take)
            remaining = [h for h in remaining if h not in chosen]
            out.append(take)
        return out


_TOP = ("name", "hosts", "target", "workloads", "stages", "on_failure", "timeouts",
        "release_before_verify", "kexec_method", "allow_fdstore_loss")
KEXEC_METHODS = ("auto", "systemd", "direct")
_TARGET = ("kernel", "kernels", "sha256", "initrd", "initrd_sha256", "cmdline")
_ARCH_TARGET = ("path", "sha256", "initrd", "initrd_sha256", "cmdline")
_STAGE = ("name", "hosts", "max_parallel", "gate", "pause")
_GATE = ("min_success_ratio", "max_downtime_p95_s", "all_workloads_verified", "max_failed_hosts")
_TIMEOUTS = ("ssh_s", "boot_s", "verify_s")
_SPEC_ERR = re.compile(r"^workloads: sessions\[(\d+)\](?:\.memfds\[(\d+)\])?(?:\.(\w+))?: (.*)$")


def _short(v: Any, limit: int = 80) -> str:
    """repr(v), cut to `limit` characters (a message quotes the value, which may be huge)."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class _Checker:
    def __init__(self, doc: YamlDoc) -> None:
        self.doc = doc
        self.base = os.path.dirname(os.path.abspath(doc.path))

    def where(self, path: tuple) -> str:
        return f"{self.doc.path}:{self.doc.line(path)}"

    def string(self, path: tuple, v: Any) -> str:
        if not isinstance(v, str) or not v.strip():
            self.doc.fail(path, f"must be a non-empty string, got {_short(v)}")
        if "\0" in v or len(v) > MAX_TEXT:
            self.doc.fail(path, f"must be a string without NUL of at most {MAX_TEXT} "
                                f"characters, got {_short(v)}")
        return v

    def pos_int(self, path: tuple, v: Any, most: int) -> int:
        if not _is_int(v) or v < 1:
            self.doc.fail(path, f"must be a positive integer, got {_short(v)}")
        if v > most:
            self.doc.fail(path, f"must be a positive integer, got {v} (at most {most})")
        return v

    def seconds(self, path: tuple, v: Any) -> float:
        if not _is_num(v) or not 0 < v <= MAX_SECONDS:
            self.doc.fail(path, f"must be a positive number of seconds, got {_short(v)} "
                                f"(range: > 0 and at most {MAX_SECONDS}, 7 days)")
        return float(v)

    def sha(self, path: tuple, v: Any) -> str:
        if not isinstance(v, str) or not _HEX64.match(v):
            self.doc.fail(path, f"must be 64 hex digits (a sha256), got {_short(v)}")
        return v.lower()

    def file(self, path: tuple, v: Any) -> str:
        self.string(path, v)
        if "\n" in v or "\r" in v:
            self.doc.fail(path, f"must be a path of one line, got {_short(v)}")
        return os.path.normpath(os.path.join(self.base, os.path.expanduser(v)))

    def run(self) -> Playbook:
        doc = self.doc
        top = doc.mapping((), doc.data, _TOP, required=("name", "target", "stages"))
        name = self.string(("name",), top["name"])
        hosts = top.get("hosts", "all")
        if not isinstance(hosts, str) or not _PATTERN.match(hosts) or len(hosts) > MAX_TEXT:
            doc.fail(("hosts",), f"must be an inventory pattern like 'all' or 'rack-a,rack-b', "
                                 f"got {_short(hosts)} (at most {MAX_TEXT} characters)")
        target, kernels = self.targets(top["target"])
        workloads = self.workloads(top.get("workloads"))
        stages = self.stages(top["stages"])
        on_failure = top.get("on_failure", "halt")
        if on_failure not in ON_FAILURE:
            doc.fail(("on_failure",), "must be one of " + ", ".join(ON_FAILURE)
                     + f", got {_short(on_failure)}")
        rbv = top.get("release_before_verify", False)
        if not isinstance(rbv, bool):
            doc.fail(("release_before_verify",), f"must be true or false, got {_short(rbv)}")
        km = top.get("kexec_method")
        if km is not None and km not in KEXEC_METHODS:
            doc.fail(("kexec_method",), "must be one of " + ", ".join(KEXEC_METHODS)
                     + f", got {_short(km)}")
        afl = top.get("allow_fdstore_loss", False)
        if not isinstance(afl, bool):
            doc.fail(("allow_fdstore_loss",), f"must be true or false, got {_short(afl)}")
        t = doc.mapping(("timeouts",), top.get("timeouts"), _TIMEOUTS)
        timeouts = Timeouts(**{k: self.seconds(("timeouts", k), v) for k, v in t.items()})
        where = {"hosts": self.where(("hosts",)) if "hosts" in top else f"{doc.path}:1",
                 "workloads": self.where(("workloads",)),
                 "kernels": self.where(("target", "kernels"))}
        return Playbook(doc.path, name, hosts, target, workloads, stages, on_failure, timeouts,
                        where=where, kernels=kernels, release_before_verify=rbv,
                        kexec_method=km, allow_fdstore_loss=afl)

    def targets(self, raw: Any) -> tuple[Target, dict[str, Target]]:
        """target: the single `kernel:` form, or `kernels:` {arch: {path, sha256, ...}}
        (returns the first of those as the Playbook's `target`)."""
        doc = self.doc
        t = doc.mapping(("target",), raw, _TARGET)
        if "kernels" not in t:
            return self.target(t), {}
        for k in ("kernel", "sha256", "initrd", "initrd_sha256"):
            if k in t:
                doc.fail(("target", k), "give it inside each target.kernels entry (kernels: "
                                        "names one kernel per architecture), not beside it")
        raw_k = t["kernels"]
        kp = ("target", "kernels")
        if not isinstance(raw_k, dict) or not raw_k:
            doc.fail(kp, "must be a mapping of architectures (x86_64, arm64) to "
                         f"{{path, sha256}}, got {_short(raw_k)}")
        out: dict[str, Target] = {}
        for key, entry in raw_k.items():
            arch = _ARCH_ALIASES.get(str(key), str(key))
            if arch not in ARCHES:
                doc.fail(kp + (key,), f"unknown architecture {_short(key)} (one of "
                                      f"{', '.join(ARCHES)}, as kho_arch in the inventory)",
                         key=True)
            if arch in out:
                doc.fail(kp + (key,), f"{arch} is named twice", key=True)
            e = doc.mapping(kp + (key,), entry, _ARCH_TARGET, required=("path",))
            mapped = {("kernel" if k == "path" else k): v for k, v in e.items()}
            if "cmdline" not in mapped and "cmdline" in t:
                mapped["cmdline"] = t["cmdline"]
            out[arch] = self.target(mapped, kp + (key,), arch)
        return next(iter(out.values())), out

    def target(self, t: dict, base: tuple = ("target",), arch: Optional[str] = None) -> Target:
        """One kernel: `t` holds kernel (the `path:` of a kernels entry), sha256, initrd,
        initrd_sha256, cmdline; `base` is where it sits in the document."""
        doc = self.doc
        name = "path" if arch else "kernel"

        def yp(k: str) -> tuple:
            return base + ((name if k == "kernel" else k),)
        if t.get("kernel") is None:
            doc.fail(yp("kernel"), "required")
        kp = yp("kernel")
        kernel = self.string(kp, t["kernel"])
        where = {k: self.where(yp(k)) for k in ("kernel", "sha256", "initrd", "initrd_sha256",
                                                  "cmdline")}
        if kernel.startswith(TWIN_SCHEME):
            release = kernel[len(TWIN_SCHEME):]
            if not _RELEASE.match(release) or len(release) > 64:
                doc.fail(kp, f"twin:<release> needs a kernel release like twin:7.2.14-twin "
                             f"(at most 64 characters), got {_short(kernel)}")
            if t.get("sha256") is not None:
                doc.fail(yp("sha256"), f"a twin kernel ({kernel}) is generated on demand, so "
                                       "a sha256 pin cannot hold; remove it (pins are for "
                                       "kernel files)")
        else:
            kernel = self.file(kp, kernel)
            if t.get("sha256") is None:
                doc.fail(yp("sha256"), "required for a kernel file (pin the image; only "
                                       "twin:<release> kernels may omit it)")
        sha = self.sha(yp("sha256"), t["sha256"]) if t.get("sha256") is not None else None
        initrd = self.file(yp("initrd"), t["initrd"]) if t.get("initrd") else None
        isha = t.get("initrd_sha256")
        if isha is not None:
            if initrd is None:
                doc.fail(yp("initrd_sha256"), "given without "
                         + ("target.initrd" if arch is None else "initrd"))
            isha = self.sha(yp("initrd_sha256"), isha)
        cmdline = t.get("cmdline", "reuse")
        if (not isinstance(cmdline, str) or not cmdline.strip() or len(cmdline) > MAX_TEXT
                or any(c in cmdline for c in "\0\n\r")):
            doc.fail(yp("cmdline"), f"must be 'reuse' or a kernel command line (one line, at "
                                    f"most {MAX_TEXT} characters), got {_short(cmdline)}")
        return Target(kernel, sha, initrd, isha, None if cmdline == "reuse" else cmdline, where,
                      arch)

    def workloads(self, raw: Any) -> WorkloadSpec:
        doc = self.doc
        if raw is None:
            return WorkloadSpec()
        w = doc.mapping(("workloads",), raw, ("sessions",), required=("sessions",))
        sessions = w["sessions"]
        if not isinstance(sessions, list):
            doc.fail(("workloads", "sessions"), f"expected a list, got {type(sessions).__name__}")
        if len(sessions) > MAX_SESSIONS:
            doc.fail(("workloads", "sessions"), f"{len(sessions)} sessions: at most "
                                                f"{MAX_SESSIONS} sessions")
        for i, s in enumerate(sessions):
            sp = ("workloads", "sessions", i)
            s = doc.mapping(sp, s, ("name", "memfds", "files", "file", "token_base", "sessions"),
                            required=("name",))        # files/sessions: workload.parse_spec
            memfds = s.get("memfds")
            if memfds is not None and not isinstance(memfds, list):
                doc.fail(sp + ("memfds",), f"expected a list, got {type(memfds).__name__}")
            if memfds is not None and len(memfds) > MAX_MEMFDS:
                doc.fail(sp + ("memfds",), f"{len(memfds)} memfds: at most {MAX_MEMFDS} per "
                                           "session")
            for j, m in enumerate(memfds or []):
                mp = sp + ("memfds", j)
                m = doc.mapping(mp, m, ("token", "size", "seed", "adopt", "seals", "huge", "holes",
                                        "position"), required=("token",))
                self.memfd_fields(mp, m)
        try:
            spec = parse_spec(w, "workloads")
        except SpecError as e:
            m = _SPEC_ERR.match(str(e))
            if not m:
                doc.fail(("workloads",), str(e).split(": ", 1)[-1])
            path: tuple = ("workloads", "sessions", int(m.group(1)))
            if m.group(2) is not None:
                path += ("memfds", int(m.group(2)))
            if m.group(3):
                path += (m.group(3),)
            doc.fail(path, m.group(4))
        for i, sess in enumerate(spec.sessions):
            for j, mf in enumerate(sess.memfds):
                if mf.size > MAX_MEMFD_BYTES:
                    doc.fail(("workloads", "sessions", i, "memfds", j, "size"),
                             f"{mf.size} bytes: at most {MAX_MEMFD_BYTES} bytes (1 TiB) per memfd")
        if spec.total_bytes > MAX_WORKLOAD_BYTES:
            doc.fail(("workloads",), f"{spec.total_bytes} bytes in all: at most "
                                     f"{MAX_WORKLOAD_BYTES} bytes (1 TiB) of workloads")
        return spec

    def memfd_fields(self, path: tuple, m: dict) -> None:
        """Types and ranges parse_spec does not check (or checks only after costly parsing)."""
        doc = self.doc
        tok = m.get("token")
        if isinstance(tok, str) and len(tok) > 24:
            doc.fail(path + ("token",), f"an integer token (u64) is required, got {_short(tok)}")
        size = m.get("size")
        if isinstance(size, bool) or (size is not None and not isinstance(size, (int, str))):
            doc.fail(path + ("size",), f"not a size: {_short(size)} (e.g. 4096, 64MiB, 1GiB)")
        if isinstance(size, str) and len(size) > 24:
            doc.fail(path + ("size",), f"not a size: {_short(size)} (e.g. 4096, 64MiB, 1GiB)")
        if isinstance(size, int) and size > MAX_MEMFD_BYTES:
            doc.fail(path + ("size",), f"{size} bytes: at most {MAX_MEMFD_BYTES} bytes (1 TiB) "
                                       "per memfd")
        if "seed" in m:
            seed = m["seed"]
            if not _is_int(seed) or not 0 <= seed < 1 << 64:
                doc.fail(path + ("seed",), f"must be an integer in 0..2**64-1, got {_short(seed)}")
        if "adopt" in m and not isinstance(m["adopt"], bool):
            doc.fail(path + ("adopt",), f"must be true or false, got {_short(m['adopt'])}")

    def stages(self, raw: Any) -> list[Stage]:
        doc = self.doc
        if not isinstance(raw, list) or not raw:
            doc.fail(("stages",), "must be a non-empty list of stages")
        if len(raw) > MAX_STAGES:
            doc.fail(("stages",), f"{len(raw)} stages: at most {MAX_STAGES} stages")
        out: list[Stage] = []
        names: dict[str, int] = {}
        for i, s in enumerate(raw):
            p = ("stages", i)
            s = doc.mapping(p, s, _STAGE, required=("name",))
            name = self.string(p + ("name",), s["name"])
            if name in names:
                doc.fail(p + ("name",), f"{name!r} is also stages[{names[name]}].name")
            names[name] = i
            last = i == len(raw) - 1
            select, value = self.selection(p + ("hosts",), s.get("hosts"), last)
            max_parallel = self.pos_int(p + ("max_parallel",), s.get("max_parallel", 1),
                                        MAX_PARALLEL)
            gate = self.gate(p + ("gate",), s.get("gate"))
            raw_pause: Any = s.get("pause", 0)
            pause: Union[float, str] = "manual"
            if raw_pause != "manual":
                if not _is_num(raw_pause) or not 0 <= raw_pause <= MAX_SECONDS:
                    doc.fail(p + ("pause",), f"must be seconds (>= 0) or 'manual', got "
                                             f"{_short(raw_pause)} (at most {MAX_SECONDS}, 7 days)")
                pause = float(raw_pause)
            out.append(Stage(name, select, value, max_parallel, gate, pause,
                             self.where(p + ("hosts",) if "hosts" in s else p)))
        return out

    def selection(self, path: tuple, v: Any, last: bool) -> tuple[str, Any]:
        doc = self.doc
        if v is None or v == "rest":
            if not last:
                doc.fail(path, "required (only the last stage may omit it or say 'rest')"
                         if v is None else "'rest' is only allowed in the last stage")
            return "rest", None
        if _is_int(v):
            if v < 1:
                doc.fail(path, f"must be a positive host count, got {v!r}")
            if v > MAX_HOSTS:
                doc.fail(path, f"must be a positive host count, got {v} (at most {MAX_HOSTS} "
                               "hosts)")
            return "count", v
        if isinstance(v, str):
            m = _PERCENT.match(v)
            if m:
                pct = float(m.group(1))
                if not 0 < pct <= 100:
                    doc.fail(path, f"a percentage must be in (0, 100], got {v!r}")
                return "percent", pct
            if _PATTERN.match(v) and "%" not in v and len(v) <= MAX_TEXT:
                return "pattern", v.strip()
        doc.fail(path, "must be a host count, a percentage like '25%', a group or host "
                       f"pattern, or 'rest', got {_short(v)}")

    def gate(self, path: tuple, raw: Any) -> Gate:
        doc = self.doc
        g = doc.mapping(path, raw, _GATE)
        kw: dict[str, Any] = {}
        if "min_success_ratio" in g:
            v = g["min_success_ratio"]
            if not _is_num(v) or not 0 <= v <= 1:
                doc.fail(path + ("min_success_ratio",), f"must be a number in 0..1, got "
                                                        f"{_short(v)}")
            kw["min_success_ratio"] = float(v)
        if g.get("max_downtime_p95_s") is not None:
            kw["max_downtime_p95_s"] = self.seconds(path + ("max_downtime_p95_s",),
                                                    g["max_downtime_p95_s"])
        if "all_workloads_verified" in g:
            v = g["all_workloads_verified"]
            if not isinstance(v, bool):
                doc.fail(path + ("all_workloads_verified",), f"must be true or false, got "
                                                             f"{_short(v)}")
            kw["all_workloads_verified"] = v
        if g.get("max_failed_hosts") is not None:
            v = g["max_failed_hosts"]
            if not _is_int(v) or not 0 <= v <= MAX_HOSTS:
                doc.fail(path + ("max_failed_hosts",),
                         f"must be a non-negative integer, got {_short(v)} (at most "
                         f"{MAX_HOSTS})")
            kw["max_failed_hosts"] = v
        return Gate(**kw)


def load_playbook(path: str) -> Playbook:
    """Read and check a playbook; PlaybookError('file:line: field: problem') if bad."""
    doc = load_yaml(path, PlaybookError)
    pb = _Checker(doc).run()
    try:
        pb.sha256 = sha256_file(path)
    except OSError as e:
        raise PlaybookError(one_line(f"{path}: {e.strerror or e}")) from None
    return pb

