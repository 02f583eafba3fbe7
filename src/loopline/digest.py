"""sha256 of bytes, files and streams: the one place Loopline hashes content.

The artifact store, the bundle format and the server all name content by the hex sha256
these functions return, so a digest computed anywhere compares equal everywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import IO

CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_stream(stream: IO[bytes], copy_to: IO[bytes] | None = None) -> str:
    """Hex sha256 of what is left in ``stream``, read in chunks; optionally copied on."""
    h = hashlib.sha256()
    while chunk := stream.read(CHUNK):
        h.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a local file, without reading it into memory at once."""
    with open(path, "rb") as f:
        return sha256_stream(f)
