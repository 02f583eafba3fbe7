"""The serving image's check of ``/bundle`` before any code of the folder runs.

The image copies this file to the bundle root as ``verify-bundle.py`` and runs it with the
standard library alone (``python -I``), once when the image is built and again at every
start, before ``/bundle`` is put on ``sys.path``. A file the manifest does not list (a
``sitecustomize.py``, a ``__pycache__``, a module or package dropped next to Loopline's
own, which Python would import instead of the listed one), a link, or a file that does not
match its sha256 stops the container with a one-line error.

It imports nothing but the standard library, on purpose: the server's own verification
(``loopline.bundle.verify_bundle_dir``) runs from the very folder it checks, so it can only
run once this check has passed. It checks the folder against its own ``MANIFEST.json``;
that manifest is checked against the registry's sha256 when the bundle is exported, and
the image's digest pins it once the image is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from typing import NoReturn

MANIFEST = "MANIFEST.json"


def verify(root: str = "/bundle") -> None:
    """Exit with an error unless ``root`` holds exactly its manifest's files, unchanged."""
    try:
        with open(os.path.join(root, MANIFEST), "rb") as f:
            listed = json.load(f)["files"]
        if not isinstance(listed, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        _refuse(root, f"its {MANIFEST} is missing or unreadable ({err})")
    found: set[str] = set()
    for folder, dirs, names in os.walk(root):
        for name in sorted(dirs) + sorted(names):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                continue  # os.walk lists a link to a folder here, which lstat shows as a link
            if not stat.S_ISREG(mode):
                _refuse(root, f"bundle entry {rel} is a link or special file")
            if rel == MANIFEST:
                continue
            if rel not in listed:
                _refuse(root, f"bundle file {rel} is not in its manifest")
            if _sha256(path) != listed[rel]:
                _refuse(root, f"bundle file {rel} does not match its sha256 in the manifest")
            found.add(rel)
    missing = sorted(set(listed) - found)
    if missing:
        _refuse(root, f"bundle file {missing[0]} is missing")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _refuse(root: str, why: str) -> NoReturn:
    sys.exit(f"error: {why}; refusing to serve {root}")


if __name__ == "__main__":
    verify(*sys.argv[1:2])
