"""sha256 of files, read in 1 MiB blocks (kernels, playbooks, uploads): one helper for all."""

from __future__ import annotations

import hashlib
import os
from typing import Union

__all__ = ["sha256_file"]


def sha256_file(path: Union[str, os.PathLike[str]]) -> str:
    """Hex sha256 of the file at `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
