"""An unpacked, byte-compiled copy of the agent zipapp, for the processes a boot starts.

python3 never caches bytecode for modules it imports from a zip archive: every start of
`kho-agent.pyz` compiles each module it imports from source again. On a real host that is
a fraction of a second; on a loaded or emulated host it is seconds, and the boot unit
(kho-agent-verify.service) and the holder it starts pay it inside the blackout, twice.

So `stage` (before the kexec, outside the blackout) unpacks the archive it runs from into
`<archive>.d/<sha256 of the archive, 16 hex>/` and byte-compiles every module there
(unchecked-hash .pyc: the copy never changes once complete). The zipapp's `__main__`
(kho_fleet.agentbuild) puts a complete copy of the same archive first on sys.path before
importing the agent, and a child agent (holder, boot unit) gets the copy on PYTHONPATH
(`code_root`). A copy is complete when its COMPLETE file exists; it is built beside the
final name and renamed into place, so a crash leaves no half copy in use. Where the
directory is not writable, or the agent does not run from a zipapp, nothing changes.

Stdlib only; zipfile, py_compile and shutil are imported by `ensure` alone (the boot unit
imports this module and must start fast).
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["COMPLETE", "KEEP", "archive_of_agent", "build_id", "copy_dir", "code_root",
           "ensure"]

COMPLETE = "COMPLETE"         # written last: the copy is whole
KEEP = 3                      # copies kept per archive (a running holder may use an older one)
_MAX_MEMBERS = 4096           # an archive bigger than this is not one of ours
_MAX_BYTES = 64 << 20


def archive_of_agent() -> Optional[str]:
    """The zipapp this agent's modules were imported from, None when they come from a
    directory (a source tree, an installed package, or a complete copy)."""
    import kho_agent
    archive = getattr(getattr(kho_agent, "__loader__", None), "archive", None)
    return os.path.abspath(archive) if isinstance(archive, str) else None


def build_id(archive: str) -> str:
    """The copy's name for `archive`: the first 16 hex digits of its sha256."""
    import hashlib
    h = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def copy_dir(archive: str) -> str:
    """Where the copy of `archive` lives (complete or not)."""
    return os.path.join(archive + ".d", build_id(archive))


def code_root() -> str:
    """What a child agent process puts on PYTHONPATH to run this agent's code: the running
    agent's complete copy, else the archive, else the directory holding the package."""
    import kho_agent
    archive = archive_of_agent()
    if archive is not None:
        try:
            d = copy_dir(archive)
        except OSError:
            return archive
        return d if os.path.isfile(os.path.join(d, COMPLETE)) else archive
    return os.path.dirname(os.path.dirname(os.path.abspath(kho_agent.__file__)))


def ensure(archive: Optional[str] = None) -> tuple[Optional[str], str]:
    """The complete copy of `archive` (default: the running agent's), made when missing.
    Returns (its path or None, what happened in one line); never raises for I/O: without
    a copy the agent still runs from the archive, only slower to start."""
    import py_compile
    import shutil
    import zipfile
    archive = archive or archive_of_agent()
    if archive is None:
        return None, "the agent runs from a directory: no copy needed"
    try:
        final = copy_dir(archive)
    except OSError as e:
        return None, f"{archive}: {e.strerror or e}"
    if os.path.isfile(os.path.join(final, COMPLETE)):
        return final, f"{final}: already there"
    tmp = f"{final}.tmp.{os.getpid()}"
    try:
        _unpack(archive, tmp)
        _compile(tmp)
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"{os.path.basename(archive)}\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, COMPLETE)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)     # another agent made it first
    except (OSError, ValueError, zipfile.BadZipFile, py_compile.PyCompileError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        return None, f"{archive}: no byte-compiled copy ({one_line(e)})"
    _prune(os.path.dirname(final), keep=final)
    return final, f"{final}: unpacked and byte-compiled"


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _unpack(archive: str, dest: str) -> None:
    """Extract the archive's members under `dest`; ValueError for a member that is not a
    plain relative path or for an archive too large to be the agent."""
    import shutil
    import zipfile
    os.makedirs(dest)
    total = 0
    with zipfile.ZipFile(archive) as z:
        infos = z.infolist()
        if len(infos) > _MAX_MEMBERS:
            raise ValueError(f"{len(infos)} members")
        for info in infos:
            name = info.filename
            parts = name.split("/")
            if name.startswith("/") or ".." in parts or "\\" in name:
                raise ValueError(f"member {name!r} is not a relative path")
            total += info.file_size
            if total > _MAX_BYTES:
                raise ValueError("more than 64 MiB unpacked")
            if name.endswith("/"):
                continue
            path = os.path.join(dest, *parts)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with z.open(info) as src, open(path, "wb") as out:
                shutil.copyfileobj(src, out)


def _compile(root: str) -> None:
    """Byte-compile every module under `root` for this interpreter (unchecked hashes: the
    copy is never edited, so no import stats the source again)."""
    import py_compile
    for d, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                py_compile.compile(os.path.join(d, name), doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)


def _prune(parent: str, keep: str) -> None:
    """Remove all but the KEEP newest complete copies in `parent` (`keep` always stays)
    and leftovers of interrupted builds."""
    import shutil
    try:
        names = os.listdir(parent)
    except OSError:
        return
    copies = []
    for n in names:
        p = os.path.join(parent, n)
        if ".tmp." in n:
            try:
                pid = int(n.rsplit(".", 1)[1])
                os.kill(pid, 0)                        # still being built
                continue
            except (ValueError, ProcessLookupError):
                shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
            continue
        try:
            copies.append((os.stat(os.path.join(p, COMPLETE)).st_mtime, p))
        except OSError:
            continue
    for _, p in sorted(copies, reverse=True)[KEEP:]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)
