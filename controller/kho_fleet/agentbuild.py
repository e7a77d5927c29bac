"""`kho-fleet build-agent`: pack the stdlib-only agent into one zipapp (kho-agent.pyz).

The archive is reproducible (sorted entries, fixed timestamps), so its sha256 names it
in the content-addressed directory on each host.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import kho_agent

__all__ = ["build_agent"]

_MAIN = b"import sys\nfrom kho_agent.cli import main\nsys.exit(main())\n"
_EPOCH = (2026, 1, 1, 0, 0, 0)


def build_agent(out: str) -> tuple[str, str]:
    """Write the zipapp to `out`; returns (path, sha256)."""
    pkg = Path(kho_agent.__file__).resolve().parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(zipfile.ZipInfo("__main__.py", _EPOCH), _MAIN)
        for path in sorted(pkg.rglob("*.py")):
            rel = path.relative_to(pkg.parent).as_posix()
            info = zipfile.ZipInfo(rel, _EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, path.read_bytes())
    data = b"#!/usr/bin/env python3\n" + buf.getvalue()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    return out, hashlib.sha256(data).hexdigest()
