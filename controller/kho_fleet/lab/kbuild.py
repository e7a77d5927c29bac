"""Lab kernels: build one from a Linux source tree with the lab's config fragment, or take
a prebuilt bzImage; either way check that it speaks KHO and record it for `kho-fleet lab up`.

    rec = build_kernel(Path("linux-source-7.2"), Path(".lab/kernels"),
                       Path("deploy/lab/kho-lab.config"), note=print)     # ~15 min, 2 cores
    rec = record_kernel(Path("bzImage-7.2.13-kho"), Path(".lab/kernels"))  # prebuilt
    recorded_kernel(Path(".lab/kernels"))         # the kernel `lab up` boots by default
    find_kernel(Path(".lab/kernels"), "7.3.4-prod")   # any recorded kernel, by release

The build is the lab README's recipe, run in the source tree with O=<build dir>:
defconfig, kvm_guest.config, the fragment merged by scripts/kconfig/merge_config.sh -m,
olddefconfig, then bzImage. Before the long bzImage step the final .config is checked
against the fragment, so an option Kconfig silently dropped (a missing dependency) is
named at once instead of surfacing as a kernel without /dev/liveupdate. The fragment is
any file of CONFIG_ lines: the lab's (deploy/lab/kho-lab.config) or a production-like one
(../shared/lab/kho-prod.config: STRICT_DEVMEM, no KHO debugfs); `configure_only` stops
after that check (seconds, not the 15-25 min of bzImage).

Every kernel recorded is kept in the store as bzImage-<release> and listed in KERNELS;
RECORD names the default one (`make_default=False` records a kexec target only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Union

from kho_agent.atomicfile import atomic_open
from kho_agent.digest import sha256_file
from kho_agent.kimage import inspect_kernel_image
from kho_fleet.lab.fleet import LabError

__all__ = ["RECORD", "KERNELS", "build_steps", "missing_options", "check_fragment",
           "build_kernel", "record_kernel", "recorded_kernel", "find_kernel"]

RECORD = "lab-kernel.json"
KERNELS = "lab-kernels.json"
PathLike = Union[str, Path]
Note = Callable[[str], None]
_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def build_steps(build_dir: PathLike, fragment: PathLike,
                jobs: int = 3) -> list[tuple[str, list[str]]]:
    """(name, argv) of each build step, to run in the source tree."""
    b = str(build_dir)
    return [("defconfig", ["make", f"O={b}", "defconfig"]),
            ("kvm_guest.config", ["make", f"O={b}", "kvm_guest.config"]),
            ("merge_config", ["scripts/kconfig/merge_config.sh", "-m", "-O", b,
                              f"{b}/.config", str(fragment)]),
            ("olddefconfig", ["make", f"O={b}", "olddefconfig"]),
            ("bzImage", ["make", f"O={b}", f"-j{jobs}", "bzImage"])]


def _options(text: str) -> dict[str, str]:
    """CONFIG_* settings of a .config or fragment ("n" for `# CONFIG_X is not set`)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        m = _OPTION.match(line)
        if m:
            out[m.group(1)] = m.group(2)
            continue
        m = _UNSET.match(line)
        if m:
            out[m.group(1)] = "n"
    return out


def missing_options(config: str, fragment: str) -> list[str]:
    """Fragment settings the final .config does not have, as "CONFIG_X=want (got ...)"."""
    have = _options(config)
    out = []
    for name, want in _options(fragment).items():
        got = have.get(name, "n")
        if got != want:
            out.append(f"{name}={want} (got {got})")
    return out


def check_fragment(fragment: PathLike) -> dict[str, str]:
    """The settings of a config fragment; LabError naming the file when it has none."""
    frag = Path(fragment)
    try:
        text = frag.read_text(errors="replace")
    except OSError as e:
        raise LabError(f"config fragment {fragment}: {e.strerror or e}") from None
    opts = _options(text)
    if not opts:
        raise LabError(f"config fragment {fragment}: no CONFIG_ settings (want lines like "
                       "CONFIG_KEXEC_HANDOVER=y or '# CONFIG_X is not set')")
    return opts


def _run(step: str, argv: list[str], cwd: Path, log: Path, note: Note, timeout: float) -> None:
    """Run one build step, appending its output to `log`; LabError naming the step and
    its last output line when it fails."""
    note(f"{step}: {' '.join(argv)}")
    last = ""
    t0 = time.monotonic()
    with open(log, "a") as lf:
        lf.write(f"\n=== {step}: {' '.join(argv)}\n")
        lf.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
        except OSError as e:
            raise LabError(f"{step}: cannot run {argv[0]}: {e.strerror}") from None
        assert proc.stdout is not None
        for line in proc.stdout:
            lf.write(line)
            if line.strip():
                last = line.strip()
                note(f"{step}: {last[:100]}")
            if time.monotonic() - t0 > timeout:
                proc.kill()
                proc.wait()
                raise LabError(f"{step}: timed out after {timeout:.0f}s (log {log})")
        rc = proc.wait()
    if rc != 0:
        raise LabError(f"{step} failed (exit {rc}): {last or 'no output'} (log {log})")


def build_kernel(source: PathLike, out: PathLike, fragment: PathLike, *,
                 build_dir: Optional[PathLike] = None, jobs: int = 3, note: Note = lambda m: None,
                 step_timeout: float = 4 * 3600, configure_only: bool = False,
                 make_default: bool = True) -> dict:
    """Configure and build an x86_64 bzImage from the Linux tree at `source` with
    `fragment` merged into defconfig + kvm_guest.config; record and return it.
    `configure_only`: stop once the fragment is checked against the final .config and
    return {"config", "fragment", "options"} instead (nothing is built or recorded)."""
    src = Path(source).resolve()
    if not src.is_dir():
        raise LabError(f"--source {source}: no such directory")
    if not (src / "Makefile").is_file():
        raise LabError(f"--source {source}: no Makefile there: not a Linux source tree "
                       "(unpack Debian's linux-source-7.2 and point --source at it)")
    if not (src / "scripts/kconfig/merge_config.sh").is_file():
        raise LabError(f"--source {source}: no scripts/kconfig/merge_config.sh: not a "
                       "Linux source tree")
    frag = Path(fragment).resolve()
    if not frag.is_file():
        raise LabError(f"config fragment not found: {fragment}")
    opts = check_fragment(frag)
    if shutil.which("make") is None:
        raise LabError("make not found: install the Debian packages build-essential, "
                       "flex, bison, bc, libelf-dev, libssl-dev")
    b = Path(build_dir).resolve() if build_dir else src / "B"
    b.mkdir(parents=True, exist_ok=True)
    log = b / "kho-lab-build.log"
    log.write_text(f"kho-fleet lab build-kernel {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    for step, argv in build_steps(b, frag, jobs):
        if step == "bzImage":
            missing = missing_options((b / ".config").read_text(), frag.read_text())
            if missing:
                raise LabError(f"{b / '.config'}: the fragment's settings did not survive "
                               f"olddefconfig (unmet dependencies?): {', '.join(missing)}")
            if configure_only:
                return {"config": str(b / ".config"), "fragment": str(frag),
                        "options": len(opts), "log": str(log)}
        _run(step, argv, src, log, note, step_timeout)
    image = b / "arch/x86/boot/bzImage"
    if not image.is_file():
        raise LabError(f"the build left no {image} (log {log})")
    return record_kernel(image, out, origin=f"built from {src} with {frag.name}",
                         make_default=make_default)


def record_kernel(image: PathLike, out: PathLike, origin: Optional[str] = None,
                  make_default: bool = True) -> dict:
    """Check that `image` is an x86 bzImage with a kho-vN ABI string, copy it into `out`
    as bzImage-<release>, list it in KERNELS and (`make_default`) record it there
    (RECORD) as the lab's kernel."""
    src = Path(image)
    try:
        info = inspect_kernel_image(str(src))
    except OSError as e:
        raise LabError(f"--kernel {image}: {e.strerror or e}") from None
    if info.format != "bzImage":
        raise LabError(f"--kernel {image}: not an x86 bzImage (looks like: {info.format})")
    if not info.kho:
        why = "; ".join(info.notes) or "no kho-vN string"
        raise LabError(f"--kernel {image}: not a KHO kernel ({why})")
    release = re.sub(r"[^A-Za-z0-9._+-]", "_", info.release or "unknown")
    dest = Path(out).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    dst = dest / f"bzImage-{release}"
    if not dst.exists() or not os.path.samefile(src, dst):
        with open(src, "rb") as fin, atomic_open(dst) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    rec = {"path": str(dst), "release": info.release, "kho": info.kho, "luo": info.luo,
           "memfd": info.memfd, "sha256": sha256_file(dst),
           "origin": origin or f"prebuilt {src.resolve()}",
           "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    index = _index(dest)
    index[str(info.release)] = rec
    (dest / KERNELS).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    if make_default:
        (dest / RECORD).write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def _index(out: Path) -> dict:
    try:
        raw = json.loads((out / KERNELS).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def find_kernel(out: PathLike, release: str) -> Optional[Path]:
    """The image of a kernel recorded in `out` with this release, if it is still there."""
    rec = _index(Path(out)).get(release)
    if isinstance(rec, dict) and Path(str(rec.get("path", ""))).is_file():
        return Path(rec["path"])
    default = recorded_kernel(out)
    if default is not None and default.get("release") == release:
        return Path(default["path"])
    return None


def recorded_kernel(out: PathLike) -> Optional[dict]:
    """The kernel last recorded in `out` by build_kernel/record_kernel, if its image exists."""
    try:
        rec = json.loads((Path(out) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and Path(rec.get("path", "")).is_file() else None
