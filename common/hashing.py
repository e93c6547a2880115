"""SHA-256 of files, the one definition the data checksums, the cache key and bundle manifests share."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20  # streamed: record files are small, but weights and tables need not fit in memory twice


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()
