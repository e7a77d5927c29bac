"""Build the lab guests' root filesystem: a Debian ext4 image (bookworm by default, or sid
with systemd >= 262 and systemd-networkd) with sshd, python3 and kexec-tools, made without
mounting anything (debootstrap + `mkfs.ext4 -d`).

    image = build_rootfs(Path(".lab/cache"), Path("bzImage-7.2.13-kho"), pubkey,
                         extra_kernels=[Path("bzImage-7.2.13-lab-b")])

Two cache levels, both keyed by content, so a second call returns at once:
- `debootstrap-<key>/`: the Debian tree (suite, mirror, package list, recipe version), with
  the lab's network/ssh/fstab settings; this is the slow part (~1 min, needs root);
- `rootfs-<key>.img`: that tree plus root's authorized_keys and the kernels in /boot
  (key: the tree's key, the public key, each kernel's name and sha256).
Guests boot from a qcow2 overlay on top of the image (see guest.py); the image itself is
never written. Builds take a lock in the cache dir, and results appear by atomic rename.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

from kho_agent.atomicfile import atomic_open
from kho_agent.digest import sha256_file

from ..errors import KhoFleetError

__all__ = ["RootfsError", "DEFAULT_PACKAGES", "DEFAULT_SUITE", "SUITES", "build_rootfs",
           "cached_rootfs", "find_debian_mirror", "image_key", "suite_packages"]

DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_PACKAGES = ("python3", "openssh-server", "kexec-tools", "iproute2", "ifupdown",
                    "isc-dhcp-client", "systemd-sysv", "udev", "procps")
# Debian sid (systemd >= 262, the LUO-aware PID 1; python3 3.14): no isc-dhcp-client there,
# so eth0 is configured by systemd-networkd (a .network file with DHCP=yes, enabled below).
SID_PACKAGES = ("python3", "openssh-server", "kexec-tools", "iproute2", "systemd-sysv", "udev",
                "procps", "dbus")
SUITES = {"bookworm": DEFAULT_PACKAGES, "sid": SID_PACKAGES}
IMAGE_SIZE = 2 << 30
# Bump when the recipe below changes in a way that must invalidate cached trees/images.
_RECIPE_VERSION = 1

PathLike = Union[str, Path]


class RootfsError(KhoFleetError, RuntimeError):
    """The root filesystem could not be built; the message is one line naming the step."""


def suite_packages(suite: str) -> tuple:
    """The package list of a lab suite (bookworm: ifupdown + dhclient; sid: networkd)."""
    if suite not in SUITES:
        raise RootfsError(f"suite {suite!r}: the lab builds {' or '.join(SUITES)}")
    return SUITES[suite]


def _key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _one_line_entry(line: str) -> Optional[tuple]:
    """(uri, [suite]) of a one-line `deb [options] uri suite components...` entry."""
    words = line.split("#", 1)[0].split()
    if not words or words[0] != "deb":
        return None
    words = words[1:]
    if words and words[0].startswith("["):  # "[arch=amd64 signed-by=...]"
        while words and not words[0].endswith("]"):
            words = words[1:]
        words = words[1:]
    return (words[0], [words[1]]) if len(words) >= 2 else None


def find_debian_mirror(suite: str = DEFAULT_SUITE, etc_apt: PathLike = "/etc/apt") -> str:
    """The first non-security `deb` mirror of this machine's APT sources that carries `suite`
    (one-line .list and deb822 .sources files), else deb.debian.org."""
    etc = Path(etc_apt)
    found: list[tuple] = []  # (uri, suites)
    lists = [etc / "sources.list"]
    lists += sorted(Path(p) for p in glob.glob(str(etc / "sources.list.d/*.list")))
    for path in lists:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            entry = _one_line_entry(line)
            if entry:
                found.append(entry)
    for path in sorted(Path(p) for p in glob.glob(str(etc / "sources.list.d/*.sources"))):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for stanza in text.split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.split()
            if "deb" not in fields.get("types", []) or fields.get("enabled", ["yes"]) == ["no"]:
                continue
            for uri in fields.get("uris", []):
                found.append((uri, fields.get("suites", [])))
    for uri, suites in found:
        if suite in suites and "security" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


def image_key(kernels: Sequence[Path], ssh_pubkey: str, suite: str, mirror: str,
              packages: Sequence[str]) -> tuple:
    """(tree key, image key) for these inputs."""
    tree = _key({"recipe": _RECIPE_VERSION, "suite": suite, "mirror": mirror,
                 "packages": sorted(packages)})
    image = _key({"tree": tree, "pubkey": ssh_pubkey.strip(),
                  "kernels": [(k.name, sha256_file(k)) for k in kernels]})
    return tree, image


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(step: str, argv: list[str], timeout: float, env: Optional[dict] = None) -> None:
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RootfsError(f"{step}: timed out after {timeout:.0f}s "
                          f"({' '.join(argv[:3])} ...)") from None
    except OSError as e:
        raise RootfsError(f"{step}: cannot run {argv[0]}: {e.strerror}") from None
    if res.returncode != 0:
        tail = (res.stderr.strip() or res.stdout.strip()).splitlines()
        why = tail[-1] if tail else f"exit status {res.returncode}"
        raise RootfsError(f"{step}: {argv[0]} failed: {why}")


def _ensure_tool(tool: str, package: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if path:
        return path
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RootfsError(f"{tool} not found: install the Debian package {package} (as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(f"installing {package}", ["apt-get", "install", "-y", "-q", package], 600, env)
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not path:
        raise RootfsError(f"{tool} still not found after installing {package}")
    return path


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    """Create or replace root/rel (unlink first: never write through a hard link)."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_text(text)
    os.chmod(path, mode)


_INTERFACES = """\
# kho-fleet lab guest (QEMU user networking)
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
"""

_SSHD = """\
# kho-fleet lab guest: key-only root login; no DNS lookups (slow under QEMU user net)
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
"""


_NETWORKD = """\
# kho-fleet lab guest (QEMU user networking), systemd-networkd
[Match]
Name=eth0

[Network]
DHCP=yes
"""


def _enable_networkd(tree: Path) -> None:
    """Enable systemd-networkd offline (the symlinks `systemctl enable` would make)."""
    for unit, wants in (("systemd-networkd.service", "multi-user.target.wants"),
                        ("systemd-networkd.socket", "sockets.target.wants")):
        src = next((d / unit for d in (tree / "usr/lib/systemd/system", tree / "lib/systemd/system")
                    if (d / unit).is_file()), None)
        if src is None:
            if unit.endswith(".socket"):
                continue
            raise RootfsError(f"{unit} not in the debootstrapped tree: cannot configure eth0")
        link = tree / "etc/systemd/system" / wants / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to("/" + str(src.relative_to(tree)))


def _configure_tree(tree: Path, suite: str = DEFAULT_SUITE) -> None:
    """Settings that do not depend on the key or kernels (baked into the cached tree)."""
    if suite == "sid":
        _write(tree, "etc/systemd/network/20-eth0.network", _NETWORKD)
        _enable_networkd(tree)
    else:
        _write(tree, "etc/network/interfaces", _INTERFACES)
    _write(tree, "etc/fstab", "/dev/vda / ext4 defaults 0 1\n")
    _write(tree, "etc/hostname", "kho-lab\n")
    _write(tree, "etc/hosts", "127.0.0.1 localhost\n127.0.1.1 kho-lab\n")
    _write(tree, "etc/ssh/sshd_config.d/kho-lab.conf", _SSHD)
    # kexec-tools must not load a kernel at shutdown on its own: the agent loads explicitly.
    _write(tree, "etc/default/kexec", 'LOAD_KEXEC=false\nUSE_GRUB_CONFIG=false\n')
    # minbase leaves the downloaded .debs behind; they only make the image bigger.
    for deb in (tree / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


def _build_tree(tree: Path, suite: str, mirror: str, packages: Sequence[str],
                arch: str = "x86_64", kernel: Optional[Path] = None) -> None:
    if arch == "arm64":
        return _build_tree_arm64(tree, suite, mirror, packages, kernel)
    if os.geteuid() != 0:
        raise RootfsError("debootstrap needs root (chroot, device nodes): run as root or "
                          "use a cached image")
    debootstrap = _ensure_tool("debootstrap", "debootstrap")
    tmp = tree.with_name(tree.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(f"debootstrap {suite} from {mirror}",
         [debootstrap, "--variant=minbase", "--include=" + ",".join(packages), suite,
          str(tmp), mirror], 1800, env)
    _configure_tree(tmp, suite)
    os.replace(tmp, tree)


def _build_tree_arm64(tree: Path, suite: str, mirror: str, packages: Sequence[str],
                      kernel: Optional[Path]) -> None:
    """An arm64 tree: foreign debootstrap here, second stage in a guest (rootfs_arm64)."""
    from . import rootfs_arm64 as a64
    if os.geteuid() != 0:
        raise RootfsError("debootstrap needs root (device nodes, ownership): run as root or "
                          "use a cached image")
    if kernel is None:
        raise RootfsError("an arm64 tree is finished in an arm64 guest: give an arm64 kernel")
    debootstrap = _ensure_tool("debootstrap", "debootstrap")
    mkfs = _ensure_tool("mkfs.ext4", "e2fsprogs")
    debugfs = _ensure_tool("debugfs", "e2fsprogs")
    tmp, work, out = (tree.with_name(tree.name + x) for x in (".foreign", ".stage2", ".tmp"))
    for d in (tmp, work, out):
        if d.exists():
            shutil.rmtree(d)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        a64.foreign_debootstrap(lambda step, argv, t: _run(step, argv, t, env), debootstrap, tmp,
                                suite, mirror, packages)
        image = a64.second_stage(_run, mkfs, tmp, kernel, work)
        a64.tree_from_image(_run, debugfs, image, out)
    except RuntimeError as e:
        if isinstance(e, RootfsError):
            raise
        raise RootfsError(str(e)) from None
    _configure_tree(out, suite)
    os.replace(out, tree)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)


def _build_image(tree: Path, image: Path, kernels: Sequence[Path], ssh_pubkey: str) -> None:
    mkfs = _ensure_tool("mkfs.ext4", "e2fsprogs")
    stage = image.with_name(image.stem + ".stage")
    if stage.exists():
        shutil.rmtree(stage)
    try:
        # hard-linked copy of the tree: cheap, and _write never writes through a link
        _run("staging the tree", ["cp", "-al", str(tree), str(stage)], 600)
        ssh_dir = stage / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(ssh_dir, 0o700)
        _write(stage, "root/.ssh/authorized_keys", ssh_pubkey.strip() + "\n", 0o600)
        for k in kernels:
            dst = stage / "boot" / k.name
            if dst.exists():
                dst.unlink()
            shutil.copyfile(k, dst)
            os.chmod(dst, 0o644)
        with atomic_open(image) as f:        # mkfs fills the temp file through its name
            f.truncate(IMAGE_SIZE)
            _run("mkfs.ext4 -d", [mkfs, "-q", "-F", "-L", "kho-lab", "-d", str(stage),
                                   f.name], 900)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _plan(cache_dir: PathLike, kernel: PathLike, ssh_pubkey: str,
          extra_kernels: Sequence[PathLike], suite: str, mirror: Optional[str],
          packages: Sequence[str], arch: str = "x86_64") -> tuple:
    cache = Path(cache_dir).resolve()
    suite_packages(suite)
    kernels = [Path(kernel)] + [Path(k) for k in extra_kernels]
    for k in kernels:
        if not k.is_file():
            raise RootfsError(f"kernel image not found: {k}")
    if not ssh_pubkey.strip().startswith(("ssh-", "ecdsa-")):
        raise RootfsError("ssh_pubkey is not an OpenSSH public key line")
    mirror = (mirror or find_debian_mirror(suite)).rstrip("/")
    tree_key, img_key = image_key(kernels, ssh_pubkey, suite, mirror, packages)
    if arch != "x86_64":                   # x86 keys stay as they were (existing caches)
        tree_key, img_key = _key([tree_key, arch]), _key([img_key, arch])
        suite = f"{arch}-{suite}"
    return (cache, kernels, mirror, cache / f"debootstrap-{suite}-{tree_key}",
            cache / f"rootfs-{img_key}.img")


def cached_rootfs(cache_dir: PathLike, kernel: PathLike, ssh_pubkey: str, *,
                  extra_kernels: Sequence[PathLike] = (), suite: str = DEFAULT_SUITE,
                  mirror: Optional[str] = None,
                  packages: Optional[Sequence[str]] = None,
                  arch: str = "x86_64") -> Optional[Path]:
    """The image build_rootfs() would return if it is already built, else None."""
    packages = suite_packages(suite) if packages is None else packages
    image = _plan(cache_dir, kernel, ssh_pubkey, extra_kernels, suite, mirror, packages,
                  arch)[4]
    return image if image.is_file() else None


def build_rootfs(cache_dir: PathLike, kernel: PathLike, ssh_pubkey: str, *,
                 extra_kernels: Sequence[PathLike] = (), suite: str = DEFAULT_SUITE,
                 mirror: Optional[str] = None,
                 packages: Optional[Sequence[str]] = None, arch: str = "x86_64") -> Path:
    """Path of a raw ext4 image (2 GiB, sparse) with Debian `suite`, `ssh_pubkey` in root's
    authorized_keys and `kernel` (+ `extra_kernels`) in /boot under their own names.

    `mirror` defaults to this machine's APT mirror for `suite` (`suite` is "bookworm" or
    "sid"; `packages` defaults to the suite's list). `arch` "arm64": the tree is finished in
    a first arm64 guest boot of `kernel` (rootfs_arm64.py; ~17 min under TCG). Cached in
    `cache_dir` by content; RootfsError (one line) when a step fails. Building the Debian
    tree needs root.
    """
    packages = suite_packages(suite) if packages is None else packages
    cache, kernels, mirror, tree, image = _plan(cache_dir, kernel, ssh_pubkey, extra_kernels,
                                                suite, mirror, packages, arch)
    if image.is_file():
        return image
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RootfsError(f"cannot create cache dir {cache}: {e.strerror}") from None
    with _locked(cache):
        if image.is_file():  # built by someone else while we waited
            return image
        if not tree.is_dir():
            _build_tree(tree, suite, mirror, packages, arch, kernels[0])
        _build_image(tree, image, kernels, ssh_pubkey)
        image.with_suffix(".json").write_text(json.dumps({
            "suite": suite, "mirror": mirror, "packages": list(packages),
            "kernels": [str(k) for k in kernels], "tree": tree.name,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
    return image
