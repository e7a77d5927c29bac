"""What is on disk under a directory, to assert that a refused input changed nothing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def snapshot(root: Path) -> dict[str, Optional[bytes]]:
    """Every path under `root`: a file's bytes, None for a directory."""
    out: dict[str, Optional[bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p):
                out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out
