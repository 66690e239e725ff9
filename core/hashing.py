"""File checksums: the one sha256 helper (bundles, artifacts). Dependency-free so storage can use it."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20  # 1 MiB reads: models and bundles can be large


@dataclass(frozen=True)
class FileDigest:
    sha256: str
    bytes: int


def file_digest(path: str | Path) -> FileDigest:
    """sha256 (hex) and size of a file, read in chunks."""
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return FileDigest(h.hexdigest(), n)


def sha256_file(path: str | Path) -> str:
    return file_digest(path).sha256


__all__ = ["FileDigest", "file_digest", "sha256_file"]
