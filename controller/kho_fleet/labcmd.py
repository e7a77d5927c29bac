"""`kho-fleet lab ...`: build the lab's kernel and root filesystem, power QEMU guests up and
down, show them, dump a guest's memory. `--json` on each; errors are one line; progress
goes to stderr (a rich spinner on a terminal, plain lines otherwise).

    kho-fleet lab build-kernel --kernel ../shared/lab/bzImage-7.2.13-kho   # or --source DIR
    kho-fleet lab build-rootfs --extra-kernel ../shared/lab/bzImage-7.2.13-lab-b
    kho-fleet lab up 2 --extra-kernel ../shared/lab/bzImage-7.2.13-lab-b   # inventory/lab.yaml
    kho-fleet lab status
    kho-fleet lab dump lab-1 --out lab-1.core && kho-fleet inspect --memory lab-1.core
    kho-fleet lab down

Defaults live under the repository: kernels in .lab/kernels (the recorded one is what `up`
boots without --kernel), the rootfs cache in .lab/cache ($KHO_LAB_CACHE), guests in
.lab/guests, the inventory in inventory/lab.yaml. The lab package (QEMU, QMP, rootfs) is
imported only when a lab command runs: the rest of the CLI does not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import InputError

__all__ = ["LabCliError", "add_lab_parser", "run"]


class LabCliError(InputError):
    """A lab command failed: one line for the user, exit code 2."""


def repo_root() -> Path:
    """The checkout this package runs from (editable install), else the current directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() and (here / "controller").is_dir() \
        else Path.cwd()


def _defaults() -> dict:
    """Default directories and files of the lab commands, under the repository."""
    root = repo_root()
    return {"kernels": root / ".lab/kernels",
            "cache": Path(os.environ.get("KHO_LAB_CACHE") or root / ".lab/cache"),
            "workdir": root / ".lab/guests", "inventory": root / "inventory/lab.yaml",
            "config": root / "deploy/lab/kho-lab.config",
            "config_arm64": root / "deploy/lab/kho-lab-arm64.config"}


class _Progress:
    """Progress lines on stderr: a rich spinner on a terminal, plain lines otherwise.

    `note("step: detail")` updates the spinner; a new step (the text before the first
    colon) is also printed as a line of its own, so logs keep the step sequence."""

    def __init__(self, title: str) -> None:
        """A progress display titled `title`; shown between __enter__ and __exit__."""
        self.title = title
        self.tty = sys.stderr.isatty()
        self._last = ""
        self._status: Any = None
        self._console: Any = None
        self.t0 = time.monotonic()

    def __enter__(self) -> _Progress:
        """Start the spinner (on a terminal)."""
        from rich.console import Console
        self._console = Console(stderr=True, highlight=False)
        if self.tty:
            self._status = self._console.status(self.title)
            self._status.start()
        return self

    def note(self, msg: str) -> None:
        """Show `msg` (rate: every call on a terminal; once per step otherwise)."""
        step = msg.split(":", 1)[0]
        if self._status is not None:
            self._status.update(f"{self.title} [{time.monotonic() - self.t0:.0f}s] {msg}")
        if step != self._last:
            self._last = step
            self._console.print(f"kho-fleet lab: {msg}", markup=False, soft_wrap=True)

    def __exit__(self, *exc: object) -> None:
        """Stop the spinner."""
        if self._status is not None:
            self._status.stop()


def _emit(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    """Print `data` as JSON with --json, else the human `lines`."""
    if args.json:
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        for ln in lines:
            print(ln)


def _kernel(args: argparse.Namespace, given: Optional[str]) -> Path:
    """--kernel, else the kernel recorded by `lab build-kernel`."""
    from kho_fleet.lab.kbuild import recorded_kernel
    if given:
        if not Path(given).is_file():
            raise LabCliError(f"--kernel {given}: kernel not found")
        return Path(given)
    rec = recorded_kernel(args.kernels)
    if rec is None:
        raise LabCliError(f"no lab kernel recorded in {args.kernels}: pass --kernel PATH, or "
                          "record one with `kho-fleet lab build-kernel --kernel PATH` "
                          "(or --source DIR)")
    return Path(rec["path"])


def _arch_kernel(args: argparse.Namespace, kernel: Path) -> Path:
    """`kernel`, checked to be for --arch (kho_agent.kimage reads its header)."""
    from kho_agent.kimage import inspect_kernel_image
    arch = getattr(args, "arch", "x86_64")
    try:
        got = inspect_kernel_image(str(kernel)).arch
    except OSError as e:
        raise LabCliError(f"--kernel {kernel}: {e.strerror}") from None
    if got is not None and got != arch:
        raise LabCliError(f"--kernel {kernel} is an {got} kernel: --arch {arch} boots "
                          + ("an arm64 Image (e.g. ../shared/lab/arm64/Image-7.2.13-kho)"
                             if arch == "arm64" else "an x86_64 bzImage"))
    if arch == "arm64" and got is None:
        raise LabCliError(f"--kernel {kernel}: not an arm64 Image (no \"ARM\\x64\" header)")
    return kernel


def cmd_build_kernel(args: argparse.Namespace) -> int:
    """Build the lab kernel from a Linux tree (--source), or record a prebuilt one (--kernel)."""
    from kho_fleet.lab.kbuild import build_kernel, record_kernel
    if bool(args.source) == bool(args.kernel):
        raise LabCliError("build-kernel needs exactly one of --source DIR (build) and "
                          "--kernel PATH (a prebuilt bzImage or arm64 Image)")
    if args.jobs < 1:
        raise LabCliError(f"--jobs {args.jobs}: must be >= 1")
    if args.kernel:
        if args.configure_only:
            raise LabCliError("--configure-only needs --source DIR (there is nothing to "
                              "configure for a prebuilt --kernel)")
        if args.localversion or args.kho_compatible:
            raise LabCliError("--localversion and --kho-compatible need --source DIR (a "
                              "prebuilt --kernel is recorded as it is)")
        rec = record_kernel(args.kernel, args.kernels, make_default=not args.keep_default,
                            arch=args.arch)
    else:
        config = args.config or _defaults()["config" if args.arch == "x86_64" else "config_arm64"]
        with _Progress(f"building the {args.arch} lab kernel in {args.source}") as p:
            rec = build_kernel(args.source, args.kernels, config, build_dir=args.build_dir,
                               jobs=args.jobs, note=p.note, configure_only=args.configure_only,
                               make_default=not args.keep_default, arch=args.arch,
                               localversion=args.localversion,
                               kho_compatible=args.kho_compatible)
        if args.configure_only:
            _emit(args, rec, [(f"{rec['config']}: all {rec['options']} settings of "
                               f"{rec['fragment']} survived olddefconfig")])
            return 0
    _emit(args, rec, [(f"{rec['path']}  {rec['release']} {rec['kho']} {rec['luo']} "
                       f"{rec['memfd']}"), f"sha256 {rec['sha256']}"])
    return 0


def cmd_build_rootfs(args: argparse.Namespace) -> int:
    """Build (or find cached) the guests' Debian ext4 image with the kernels in /boot."""
    from kho_fleet.lab.guest import lab_key
    from kho_fleet.lab.rootfs import build_rootfs, cached_rootfs
    if args.arch != "x86_64" and not args.kernel:
        raise LabCliError(f"--arch {args.arch} needs --kernel PATH (the recorded lab kernel "
                          "is x86_64)")
    kernels = [_kernel(args, k) for k in (args.kernel or [None])]
    _arch_kernel(args, kernels[0])
    extra = kernels[1:] + [Path(k) for k in args.extra_kernel or []]
    for k in extra:
        if not k.is_file():
            raise LabCliError(f"kernel not found: {k}")
    key = lab_key(args.cache)
    cached = cached_rootfs(args.cache, kernels[0], key.public, extra_kernels=extra,
                           suite=args.suite, arch=args.arch) is not None
    t0 = time.monotonic()
    with _Progress(f"root filesystem ({args.suite})") as p:
        if not cached and args.arch == "arm64":
            p.note("building: foreign debootstrap here (~1 min), then its second stage in "
                   "an arm64 guest under TCG (~17-27 min, once), and mkfs.ext4 -d")
        elif not cached:
            p.note("building: debootstrap (~1 min, once) and mkfs.ext4 -d")
        image = build_rootfs(args.cache, kernels[0], key.public, extra_kernels=extra,
                             suite=args.suite, arch=args.arch)
    data = {"image": str(image), "cached": cached, "suite": args.suite,
            "seconds": round(time.monotonic() - t0, 3),
            "kernels": [str(k) for k in [kernels[0], *extra]], "key": str(key.path)}
    _emit(args, data, [str(image)])
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Boot N guests that keep running, record them and write the inventory."""
    from kho_fleet.lab.fleet import LabFleet, check_qemu
    if args.n < 1 or args.n > 16:
        raise LabCliError(f"N {args.n}: the lab runs 1..16 guests")
    if args.arch != "x86_64" and not args.kernel:
        raise LabCliError(f"--arch {args.arch} needs --kernel PATH (the recorded lab kernel "
                          "is x86_64)")
    kernel = _arch_kernel(args, _kernel(args, args.kernel))
    check_qemu(args.arch)
    fleet = LabFleet(args.workdir)
    with _Progress(f"lab up {args.n}") as p:
        res = fleet.up(args.n, kernel, cache=args.cache, extra_kernels=args.extra_kernel or [],
                       inventory=args.inventory, memory_mib=args.memory, smp=args.smp,
                       boot_timeout=args.boot_timeout, suite=args.suite, note=p.note,
                       arch=args.arch)
    lines = [f"{g['name']:<8} pid {g['pid']:<8} ssh 127.0.0.1:{g['port']:<6} {g['release']:<18} "
             f"booted in {g['boot_s']:.1f}s" for g in res["guests"]]
    lines.append(f"inventory {res['inventory']} (known_hosts {res['known_hosts']})")
    _emit(args, res, lines)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """The recorded guests: pid, port, state (up / no-ssh / stopped), running release."""
    from kho_fleet.lab.fleet import LabFleet
    rows = LabFleet(args.workdir).status()
    _emit(args, rows, [f"{r['name']:<8} {r['state']:<8} pid {r['pid']:<8} port {r['port']:<6} "
                       f"{r['release'] or '-'}" for r in rows] or
          [f"no lab guests in {args.workdir}"])
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Power the recorded guests off (QMP quit, then kill) and remove their overlays."""
    from kho_fleet.lab.fleet import LabFleet
    rows = LabFleet(args.workdir).down()
    _emit(args, rows, [f"{r['name']:<8} pid {r['pid']:<8} {r['stopped']}" for r in rows] or
          [f"no lab guests in {args.workdir}"])
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    """Save a guest's memory as an ELF core over QMP (the guest resumes)."""
    from kho_fleet.lab.fleet import LabFleet
    with _Progress(f"dumping {args.host}") as p:
        p.note(f"{args.host}: QMP stop, dump-guest-memory, cont")
        res = LabFleet(args.workdir).dump(args.host, args.out)
    _emit(args, res, [f"{res['path']}  {res['bytes'] >> 20} MiB in {res['seconds']:.1f}s"])
    return 0


def run(args: argparse.Namespace) -> int:
    """Run the chosen lab subcommand; every lab failure becomes one LabCliError line."""
    from kho_fleet.lab.fleet import LabError
    from kho_fleet.lab.guest import GuestError
    from kho_fleet.lab.qemu import QemuError
    from kho_fleet.lab.qmp import QMPError
    from kho_fleet.lab.rootfs import RootfsError
    func: Callable[[argparse.Namespace], int] = args.lab_func
    try:
        return func(args)
    except LabCliError:
        raise
    except (LabError, GuestError, QemuError, QMPError, RootfsError) as e:
        text = str(e).strip()
        raise LabCliError(text.splitlines()[0] if text else type(e).__name__) from None


def add_lab_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `lab` and its subcommands to the `kho-fleet` subparsers `sub`."""
    d = _defaults()
    lab = sub.add_parser("lab", help="the QEMU lab: real KHO/LUO kernels in local guests",
                         description=__doc__.split("\n\n")[0])
    lsub = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON")
    common.add_argument("--kernels", type=Path, default=d["kernels"], metavar="DIR",
                        help="recorded lab kernels (default %(default)s)")
    common.add_argument("--cache", type=Path, default=d["cache"], metavar="DIR",
                        help="rootfs cache and the lab SSH key (default %(default)s)")
    common.add_argument("--workdir", type=Path, default=d["workdir"], metavar="DIR",
                        help="running guests and their state file (default %(default)s)")

    def add(name: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        """One `lab NAME` subcommand running `func`, with the common options."""
        sp = lsub.add_parser(name, parents=[common], help=(func.__doc__ or "").splitlines()[0],
                             description=func.__doc__)
        sp.set_defaults(lab_func=func)
        return sp

    bk = add("build-kernel", cmd_build_kernel)
    bk.add_argument("--source", metavar="DIR", help="Linux source tree to build in")
    bk.add_argument("--kernel", metavar="PATH",
                    help="a prebuilt bzImage (or arm64 Image with --arch arm64) to record "
                         "instead")
    bk.add_argument("--out", dest="kernels", type=Path, default=d["kernels"], metavar="DIR",
                    help="where the image and its record go (default %(default)s)")
    bk.add_argument("--fragment", "--config", dest="config", type=Path, default=None,
                    metavar="FILE", help="config fragment, e.g. ../shared/lab/kho-prod.config "
                    f"(default {d['config']}; arm64: {d['config_arm64']})")
    bk.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                    help="arm64: defconfig + virt.config, cross-built Image "
                         "(ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-; Debian "
                         "gcc-aarch64-linux-gnu)")
    bk.add_argument("--localversion", metavar="STR",
                    help="make LOCALVERSION=STR: another release from the same tree, "
                         "e.g. --localversion=-lab-b")
    bk.add_argument("--kho-compatible", metavar="kho-vN",
                    help="build with KHO_FDT_COMPATIBLE changed to this ABI string (an "
                         "ABI-mismatch target; the source header is put back afterwards)")
    bk.add_argument("--configure-only", action="store_true",
                    help="stop after olddefconfig and the fragment check (no bzImage)")
    bk.add_argument("--keep-default", action="store_true",
                    help="record the kernel as a kexec target only; `up` keeps booting the "
                    "current default")
    bk.add_argument("--build-dir", type=Path, metavar="DIR", help="O= directory (default SOURCE/B)")
    bk.add_argument("--jobs", type=int, default=3, metavar="N", help="make -jN (default 3)")

    br = add("build-rootfs", cmd_build_rootfs)
    br.add_argument("--kernel", action="append", metavar="PATH",
                    help="kernel(s) for /boot; the first is the one guests boot "
                         "(default: the recorded lab kernel)")
    br.add_argument("--extra-kernel", action="append", metavar="PATH",
                    help="more kernels for /boot (kexec targets)")
    br.add_argument("--suite", choices=("bookworm", "sid"), default="bookworm",
                    help="Debian suite of the guests (sid: systemd >= 262, systemd-networkd; "
                         "default %(default)s)")
    br.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                    help="arm64: foreign debootstrap here, second stage in a first guest boot "
                         "(~17 min under TCG, once; needs --kernel)")

    up = add("up", cmd_up)
    up.add_argument("n", type=int, metavar="N", help="number of guests (lab-1..lab-N)")
    up.add_argument("--kernel", metavar="PATH", help="kernel to boot (default: the recorded one)")
    up.add_argument("--extra-kernel", action="append", metavar="PATH",
                    help="more kernels in the guests' /boot (kexec targets)")
    up.add_argument("--inventory", type=Path, default=d["inventory"], metavar="PATH",
                    help="inventory to write (default %(default)s)")
    up.add_argument("--memory", type=int, default=1024, metavar="MIB", help="RAM per guest")
    up.add_argument("--smp", type=int, default=2, metavar="N", help="vCPUs per guest")
    up.add_argument("--boot-timeout", type=float, default=240.0, metavar="SECONDS")
    up.add_argument("--suite", choices=("bookworm", "sid"), default="bookworm",
                    help="Debian suite of the guests' root filesystem (default %(default)s)")
    up.add_argument("--arch", choices=("x86_64", "arm64"), default="x86_64",
                    help="guest architecture (arm64: qemu-system-aarch64 -M virt -cpu max, "
                         "TCG; needs --kernel; inventory kho_arch: arm64)")

    add("status", cmd_status)
    add("down", cmd_down)
    dp = add("dump", cmd_dump)
    dp.add_argument("host", metavar="HOST", help="guest name, e.g. lab-1")
    dp.add_argument("--out", required=True, metavar="PATH", help="ELF core to write")
    return lab
