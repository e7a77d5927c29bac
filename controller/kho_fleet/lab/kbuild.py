"""Lab kernels: build one from a Linux source tree with the lab's config fragment, or take
a prebuilt image; either way check that it speaks KHO and record it for `kho-fleet lab up`.

    rec = build_kernel(Path("linux-source-7.2"), Path(".lab/kernels"),
                       Path("deploy/lab/kho-lab.config"), note=print)     # ~15 min, 2 cores
    rec = build_kernel(src, store, Path("../shared/lab/arm64/kho-lab-arm64.config"),
                       arch="arm64", localversion="-lab-b")               # cross-built Image
    rec = record_kernel(Path("bzImage-7.2.13-kho"), Path(".lab/kernels"))  # prebuilt
    recorded_kernel(Path(".lab/kernels"))         # the kernel `lab up` boots by default
    find_kernel(Path(".lab/kernels"), "7.3.4-prod")   # any recorded kernel, by release
    find_kernel(store, "7.2.13-lab-b", arch="arm64")  # ... and architecture

The build is the lab README's recipe, run in the source tree with O=<build dir>:
defconfig, the arch's guest fragment (kvm_guest.config on x86_64, virt.config on arm64),
the fragment merged by scripts/kconfig/merge_config.sh -m, olddefconfig, then bzImage
(x86_64) or Image (arm64: ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-, Debian's
gcc-aarch64-linux-gnu). Before the long image step the final .config is checked against
the fragment, so an option Kconfig silently dropped (a missing dependency) is named at once
instead of surfacing as a kernel without /dev/liveupdate. One drop is repaired instead:
`# CONFIG_DEBUG_INFO is not set` cannot hold by itself when defconfig picks a debug-info
level (arm64's does), because DEBUG_INFO is selected by that choice; the build then merges
the choice's "none" entry (DERIVED) and runs olddefconfig again. The fragment is any file
of CONFIG_ lines: the lab's (deploy/lab/kho-lab.config) or a production-like one
(../shared/lab/kho-prod.config: STRICT_DEVMEM, no KHO debugfs); `configure_only` stops
after that check (seconds, not the 15-25 min of the image).

Variants of one tree (the lab's upgrade target and ABI-mismatch images) come from the same
build directory, so a variant rebuilds only what changed (minutes): `localversion` is make's
LOCALVERSION (release 7.2.13-lab-b), `kho_compatible` replaces the string of
`#define KHO_FDT_COMPATIBLE` in the source's KHO ABI header for the build only. That header
belongs to the user's tree: its original text is kept in the build directory
(PATCH_RECORD) before it is changed, and put back after the build, on failure too, and at
the start of the next build there if a killed build left it changed. It is put back with a
new mtime, so the next build recompiles what the variant compiled.

Every kernel recorded is kept in the store as bzImage-<release> (x86_64) or
Image-<release> (arm64) and listed in KERNELS (arm64 entries keyed "arm64/<release>", so
x86 and arm64 kernels of one release are both kept); RECORD names the default x86 kernel
`lab up` boots, RECORD_ARM64 the arm64 one (`make_default=False` records a kexec target
only).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from kho_agent.atomicfile import atomic_open, atomic_write, atomic_write_json
from kho_agent.digest import sha256_file
from kho_agent.kimage import inspect_kernel_image
from kho_fleet.lab.fleet import LabError

__all__ = ["RECORD", "RECORD_ARM64", "KERNELS", "ARCHES", "ArchBuild", "build_steps",
           "missing_options", "derived_settings", "check_fragment", "patch_define",
           "build_kernel", "record_kernel", "recorded_kernel", "find_kernel"]

RECORD = "lab-kernel.json"
RECORD_ARM64 = "lab-kernel-arm64.json"
KERNELS = "lab-kernels.json"
PATCH_RECORD = "kho-lab-source-patch.json"
DERIVED = "kho-lab-derived.config"
KHO_ABI_HEADER = "include/linux/kho/abi/kexec_handover.h"
PathLike = Union[str, Path]
Note = Callable[[str], None]
_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_LOCALVERSION = re.compile(r"^[A-Za-z0-9._+-]{1,40}$")
_KHO_COMPAT = re.compile(r"^kho-v[0-9]{1,4}$")
# fragment settings Kconfig cannot honour alone, and what makes them hold
_FIXES = {("CONFIG_DEBUG_INFO", "n"): ["CONFIG_DEBUG_INFO_NONE=y"]}


@dataclass(frozen=True)
class ArchBuild:
    """How one architecture's lab kernel is configured, built and stored."""
    arch: str                      # kho_arch: "x86_64" | "arm64"
    make_vars: tuple[str, ...]     # ARCH=, CROSS_COMPILE= for a cross build
    guest_config: str              # the kernel's config target for a VM guest
    target: str                    # make target of the boot image
    output: str                    # where the build leaves it, under the build dir
    prefix: str                    # store file name: <prefix>-<release>
    image_format: str              # kho_agent.kimage's format of such an image
    compiler: str                  # the C compiler the build needs
    compiler_package: str          # the Debian package that has it


ARCHES = {
    "x86_64": ArchBuild("x86_64", (), "kvm_guest.config", "bzImage", "arch/x86/boot/bzImage",
                        "bzImage", "bzImage", "gcc", "build-essential"),
    "arm64": ArchBuild("arm64", ("ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-"),
                       "virt.config", "Image", "arch/arm64/boot/Image", "Image", "arm64 Image",
                       "aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
}


def _arch(arch: str) -> ArchBuild:
    try:
        return ARCHES[arch]
    except KeyError:
        raise LabError(f"--arch {arch}: the lab builds {' and '.join(ARCHES)} kernels") from None


def build_steps(build_dir: PathLike, fragment: PathLike, jobs: int = 3, *,
                arch: str = "x86_64",
                localversion: Optional[str] = None) -> list[tuple[str, list[str]]]:
    """(name, argv) of each build step, to run in the source tree; the last one builds
    the boot image (bzImage on x86_64, Image on arm64)."""
    ab = _arch(arch)
    b = str(build_dir)
    make = ["make", *ab.make_vars, f"O={b}"]
    image = [*make, f"-j{jobs}"]
    if localversion:
        image.append(f"LOCALVERSION={localversion}")
    return [("defconfig", [*make, "defconfig"]),
            (ab.guest_config, [*make, ab.guest_config]),
            ("merge_config", ["scripts/kconfig/merge_config.sh", "-m", "-O", b,
                              f"{b}/.config", str(fragment)]),
            ("olddefconfig", [*make, "olddefconfig"]),
            (ab.target, [*image, ab.target])]


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


def derived_settings(missing: list[str]) -> list[str]:
    """CONFIG_ lines that make these missing_options() entries hold, for the drops Kconfig
    cannot honour from a fragment alone (see _FIXES); [] when none of them is such a drop."""
    out: list[str] = []
    for entry in missing:
        name, _, rest = entry.partition("=")
        want = rest.split(" (got ", 1)[0]
        out += [ln for ln in _FIXES.get((name, want), []) if ln not in out]
    return out


def patch_define(text: str, name: str, value: str) -> str:
    """`text` (a C header) with the string of `#define NAME "..."` replaced by `value`;
    ValueError when the header has no such define, or more than one."""
    pat = re.compile(r'^(#define[ \t]+' + re.escape(name) + r'[ \t]+)"[^"\n]*"', re.M)
    found = pat.findall(text)
    if len(found) != 1:
        raise ValueError(f'{len(found)} lines `#define {name} "..."` (want exactly one)')
    return pat.sub(lambda m: f'{m.group(1)}"{value}"', text)


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


def _run(step: str, argv: list[str], cwd: Path, log: Path, note: Note, timeout: float,
         env: Optional[dict[str, str]] = None) -> None:
    """Run one build step, appending its output to `log`; LabError naming the step and
    its last output line when it fails."""
    note(f"{step}: {' '.join(argv)}")
    last = ""
    t0 = time.monotonic()
    with open(log, "a") as lf:
        lf.write(f"\n=== {step}: {' '.join(argv)}\n")
        lf.flush()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    errors="replace")
        except OSError as e:
            raise LabError(f"{step}: cannot run {argv[0]}: {e.strerror}") from None
        assert proc.stdout is not None
        for line in proc.stdout:
            lf.write(line)
            lf.flush()          # `tail -f` of the log follows a build of an hour
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
                 make_default: bool = True, arch: str = "x86_64",
                 localversion: Optional[str] = None,
                 kho_compatible: Optional[str] = None) -> dict:
    """Configure and build the lab kernel of `arch` (an x86_64 bzImage or a cross-built
    arm64 Image) from the Linux tree at `source` with `fragment` merged into defconfig +
    the arch's guest config; record and return it. `localversion` is appended to the
    release; `kho_compatible` (e.g. "kho-v3") builds a kernel whose KHO FDT ABI string
    differs (the source header is put back afterwards).
    `configure_only`: stop once the fragment is checked against the final .config and
    return {"config", "fragment", "options"} instead (nothing is built or recorded)."""
    ab = _arch(arch)
    src = Path(source).resolve()
    if not src.is_dir():
        raise LabError(f"--source {source}: no such directory")
    if not (src / "Makefile").is_file():
        raise LabError(f"--source {source}: no Makefile there: not a Linux source tree "
                       "(unpack Debian's linux-source-7.2 and point --source at it)")
    if not (src / "scripts/kconfig/merge_config.sh").is_file():
        raise LabError(f"--source {source}: no scripts/kconfig/merge_config.sh: not a "
                       "Linux source tree")
    if localversion is not None and not _LOCALVERSION.match(localversion):
        raise LabError(f"--localversion {localversion!r}: want 1-40 characters of "
                       "A-Z a-z 0-9 . _ + - (e.g. -lab-b)")
    if kho_compatible is not None and not _KHO_COMPAT.match(kho_compatible):
        raise LabError(f"--kho-compatible {kho_compatible!r}: want kho-vN (e.g. kho-v3)")
    frag = Path(fragment).resolve()
    if not frag.is_file():
        raise LabError(f"config fragment not found: {fragment}")
    opts = check_fragment(frag)
    if shutil.which("make") is None:
        raise LabError("make not found: install the Debian packages build-essential, "
                       "flex, bison, bc, libelf-dev, libssl-dev")
    if not configure_only and shutil.which(ab.compiler) is None:
        raise LabError(f"{ab.compiler} not found: an {ab.arch} kernel needs the Debian "
                       f"package {ab.compiler_package}")
    b = Path(build_dir).resolve() if build_dir else src / "B"
    b.mkdir(parents=True, exist_ok=True)
    restored = _restore_source(src, b)
    log = b / "kho-lab-build.log"
    log.write_text(f"kho-fleet lab build-kernel {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                   + (f"put back {restored} (left changed by an earlier build)\n"
                      if restored else ""))
    if restored:
        note(f"source: put back {restored} (left changed by an earlier build)")
    env = dict(os.environ, **dict(v.split("=", 1) for v in ab.make_vars))
    steps = build_steps(b, frag, jobs, arch=arch, localversion=localversion)
    for step, argv in steps[:-1]:
        _run(step, argv, src, log, note, step_timeout, env)
    missing = missing_options((b / ".config").read_text(), frag.read_text())
    derived = derived_settings(missing)
    if derived:
        (b / DERIVED).write_text("# derived by kho-fleet lab build-kernel from "
                                 f"{frag.name}\n" + "\n".join(derived) + "\n")
        _run("merge_config (derived)", ["scripts/kconfig/merge_config.sh", "-m", "-O", str(b),
                                        f"{b}/.config", str(b / DERIVED)],
             src, log, note, step_timeout, env)
        _run("olddefconfig (derived)", steps[3][1], src, log, note, step_timeout, env)
        missing = missing_options((b / ".config").read_text(), frag.read_text())
    if missing:
        raise LabError(f"{b / '.config'}: the fragment's settings did not survive "
                       f"olddefconfig (unmet dependencies?): {', '.join(missing)}")
    if configure_only:
        return {"config": str(b / ".config"), "fragment": str(frag),
                "options": len(opts), "log": str(log), "derived": derived}
    if kho_compatible:
        _patch_source(src, b, kho_compatible, note)
    try:
        _run(*steps[-1], src, log, note, step_timeout, env)
    finally:
        if kho_compatible:
            _restore_source(src, b)
    image = b / ab.output
    if not image.is_file():
        raise LabError(f"the build left no {image} (log {log})")
    info = inspect_kernel_image(str(image))
    if kho_compatible and info.kho != kho_compatible:
        raise LabError(f"{image}: built with --kho-compatible {kho_compatible} but the image "
                       f"says {info.kho} (log {log})")
    what = ", ".join(x for x in (f"LOCALVERSION={localversion}" if localversion else "",
                                 f"KHO_FDT_COMPATIBLE={kho_compatible}" if kho_compatible
                                 else "") if x)
    return record_kernel(image, out, origin=f"built from {src} with {frag.name}"
                         + (f" ({what})" if what else ""), make_default=make_default,
                         arch=arch)


def _patch_source(src: Path, b: Path, value: str, note: Note) -> None:
    """Change KHO_FDT_COMPATIBLE in the source's KHO ABI header to `value`, keeping the
    original text in the build dir first (PATCH_RECORD) so it can always be put back."""
    header = src / KHO_ABI_HEADER
    try:
        text = header.read_text()
    except OSError as e:
        raise LabError(f"--kho-compatible: {header}: {e.strerror or e} (a Linux tree with "
                       "KHO, e.g. linux-source-7.2)") from None
    try:
        patched = patch_define(text, "KHO_FDT_COMPATIBLE", value)
    except ValueError as e:
        raise LabError(f"--kho-compatible: {header}: {e}") from None
    mode = header.stat().st_mode & 0o777
    atomic_write_json(b / PATCH_RECORD, {"path": str(header), "text": text, "mode": mode})
    atomic_write(header, patched.encode(), mode=mode)
    note(f"source: KHO_FDT_COMPATIBLE \"{value}\" in {KHO_ABI_HEADER} for this build")


def _restore_source(src: Path, b: Path) -> Optional[str]:
    """Put back the header _patch_source changed, if the build dir says one is changed;
    the path put back, or None."""
    rec_path = b / PATCH_RECORD
    try:
        rec = json.loads(rec_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise LabError(f"{rec_path}: unreadable ({e}); it holds the original text of a "
                       f"source header this build changed: restore {src / KHO_ABI_HEADER} "
                       "by hand and remove it") from None
    header = Path(rec["path"])
    atomic_write(header, rec["text"].encode(), mode=int(rec.get("mode", 0o644)))
    rec_path.unlink()
    return str(header)


def record_kernel(image: PathLike, out: PathLike, origin: Optional[str] = None,
                  make_default: bool = True, arch: Optional[str] = None) -> dict:
    """Check that `image` is an x86 bzImage or an arm64 Image (of `arch`, when given) with
    a kho-vN ABI string, copy it into `out` as <bzImage|Image>-<release>, list it in
    KERNELS and (`make_default`) record it there (RECORD / RECORD_ARM64) as the lab's
    kernel of its architecture."""
    src = Path(image)
    try:
        info = inspect_kernel_image(str(src))
    except OSError as e:
        raise LabError(f"--kernel {image}: {e.strerror or e}") from None
    ab = next((a for a in ARCHES.values() if a.image_format == info.format), None)
    if ab is None or (arch is not None and ab.arch != arch):
        want = {"x86_64": "an x86 bzImage", "arm64": "an arm64 Image"}.get(
            arch or "", "an x86 bzImage or an arm64 Image")
        hint = ("; unpack a compressed arm64 image first" if arch == "arm64"
                and info.arch == "arm64" else "")
        raise LabError(f"--kernel {image}: not {want} (looks like: {info.format}"
                       + (f", {info.arch}" if info.arch else "") + f"{hint})")
    if not info.kho:
        why = "; ".join(info.notes) or "no kho-vN string"
        raise LabError(f"--kernel {image}: not a KHO kernel ({why})")
    release = re.sub(r"[^A-Za-z0-9._+-]", "_", info.release or "unknown")
    dest = Path(out).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    dst = dest / f"{ab.prefix}-{release}"
    if not dst.exists() or not os.path.samefile(src, dst):
        with open(src, "rb") as fin, atomic_open(dst) as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    rec: dict[str, Any] = {
        "path": str(dst), "release": info.release, "kho": info.kho, "luo": info.luo,
        "memfd": info.memfd, "sha256": sha256_file(dst),
        "origin": origin or f"prebuilt {src.resolve()}",
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if ab.arch != "x86_64":
        rec.update(arch=ab.arch, page_size=info.page_size)
    index = _index(dest)
    index[_key(str(info.release), ab.arch)] = rec
    (dest / KERNELS).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    if make_default:
        (dest / _default_record(ab.arch)).write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def _key(release: str, arch: str) -> str:
    """KERNELS key: the release for x86_64 (as before arm64 existed), arch/release else."""
    return release if arch == "x86_64" else f"{arch}/{release}"


def _default_record(arch: str) -> str:
    return RECORD if arch == "x86_64" else RECORD_ARM64


def _index(out: Path) -> dict:
    try:
        raw = json.loads((out / KERNELS).read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def find_kernel(out: PathLike, release: str, arch: str = "x86_64") -> Optional[Path]:
    """The image of a kernel of `arch` recorded in `out` with this release, if it is
    still there."""
    rec = _index(Path(out)).get(_key(release, arch))
    if (isinstance(rec, dict) and rec.get("arch", "x86_64") == arch
            and Path(str(rec.get("path", ""))).is_file()):
        return Path(rec["path"])
    default = recorded_kernel(out, arch)
    if default is not None and default.get("release") == release:
        return Path(default["path"])
    return None


def recorded_kernel(out: PathLike, arch: str = "x86_64") -> Optional[dict]:
    """The default kernel of `arch` recorded in `out` by build_kernel/record_kernel, if
    its image exists."""
    try:
        rec = json.loads((Path(out) / _default_record(arch)).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and Path(rec.get("path", "")).is_file() else None
