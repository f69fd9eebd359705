"""Hex digests of files, read in chunks (``hashlib.file_digest`` needs Python 3.11)."""

from __future__ import annotations

import hashlib
import os


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    """The hex digest of the file at ``path`` with ``algorithm`` (a :mod:`hashlib` name)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
