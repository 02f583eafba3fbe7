"""The build context of a bundle's serving image: Dockerfile, pinned requirements, source.

Every bundle carries these files (the package step adds them), so an extracted bundle is a
complete ``docker build`` / ``podman build`` context. The image holds no torch: only what
``python -m loopline.deploy.server`` imports, pinned to the versions this bundle was built
and tested with, and ``verify-bundle.py`` (``prestart.py``), which checks the folder
against its manifest before any of its code runs.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import loopline

# Distributions the server imports at run time (psycopg: the log may go to PostgreSQL).
SERVE_REQUIREMENTS = (
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "onnxruntime",
    "numpy",
    "pillow",
    "prometheus-client",
    "sqlalchemy",
    "alembic",
    "pydantic",
    "orjson",
    "python-multipart",
    "pyyaml",
    "fsspec",
    "psycopg",
)
OPTIONAL = frozenset({"uvloop", "httptools", "psycopg"})
EXTRAS = {"psycopg": "[binary]"}
# Parts of the package the server never imports (training needs torch).
EXCLUDED = ("examples", "builder", "cli")

VERIFY_SCRIPT = "verify-bundle.py"  # loopline/deploy/prestart.py, at the bundle root

DOCKERFILE = """\
# Serving image of a Loopline model bundle: no torch, runs as a non-root user.
# Build it from the extracted bundle folder:
#   docker build -t loopline-model .        (or: podman build -t loopline-model .)
#   docker run -p 8080:8080 -e LOOPLINE_SERVE_TOKEN=... loopline-model
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --create-home --uid 10001 loopline
COPY requirements-serve.txt /bundle/requirements-serve.txt
RUN pip install --no-cache-dir -r /bundle/requirements-serve.txt
COPY . /bundle
# What may run: the files MANIFEST.json lists, and nothing else. verify-bundle.py uses the
# standard library alone (python -I puts neither /bundle nor the working folder on
# sys.path): it refuses a file the manifest does not list (a sitecustomize.py, a
# __pycache__, a module dropped next to Loopline's own), a link, or a file that does not
# match its sha256, here and again at every start, before any code from /bundle runs.
# The manifest itself was checked against the registry when the bundle was exported, and
# the image's digest pins it; the server then verifies the model files before loading.
RUN python -I -B /bundle/verify-bundle.py /bundle
USER loopline
# The prediction log defaults to a SQLite file here; set LOOPLINE_DB_URL for PostgreSQL.
WORKDIR /home/loopline
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 CMD ["python", "-c", \\
"import urllib.request as u; u.urlopen('http://127.0.0.1:8080/v2/health/ready', timeout=2)"]
# /bundle goes last on sys.path (not on PYTHONPATH, which -I ignores anyway), after the
# check: it can shadow no installed package.
CMD ["python", "-I", "-B", "-c", \\
     "import runpy, sys; runpy.run_path('/bundle/verify-bundle.py')['verify']('/bundle'); sys.path.append('/bundle'); from loopline.deploy.server import main; sys.exit(main())", \\
     "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8080"]
"""  # noqa: E501 - a Dockerfile's exec-form command cannot be split


def serve_requirements() -> str:
    """``requirements-serve.txt``: the server's dependencies and all of theirs, each pinned
    to the version installed here (what Loopline was built and tested with), so an image or
    a VM install gets the same packages, not whatever their ranges allow on the day.

    Environment markers are evaluated for this interpreter and platform (CPython 3.11 on
    Linux, as the image's ``python:3.11-slim``).
    """
    lines = [
        "# The serving image's dependencies, and theirs, pinned to the versions Loopline was",
        "# built and tested with.",
    ]
    top = {_key(name) for name in SERVE_REQUIREMENTS}
    for key, (name, version) in sorted(_closure().items()):
        extras = EXTRAS.get(key, "") if key in top else ""
        lines.append(f"{name}{extras}=={version}")
    return "\n".join(lines) + "\n"


def _key(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def _closure() -> dict[str, tuple[str, str]]:
    """Installed distributions the server needs: ``SERVE_REQUIREMENTS`` (less the optional
    ones that are not installed) and, transitively, what each requires here, by key:
    (name as published, version)."""
    from packaging.requirements import Requirement

    found: dict[str, tuple[str, str]] = {}
    extras_seen: dict[str, set[str]] = {}
    todo: list[tuple[str, set[str], bool]] = [
        (name, {EXTRAS[name].strip("[]")} if name in EXTRAS else set(), True)
        for name in SERVE_REQUIREMENTS
    ]
    while todo:
        name, extras, top = todo.pop()
        key = _key(name)
        if key in found and extras <= extras_seen[key]:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if top and name not in OPTIONAL:
                raise
            continue  # an optional server dependency, or one this platform does not use
        found[key] = (dist.metadata["Name"], dist.version)
        extras_seen[key] = extras_seen.get(key, set()) | extras
        environments = [{"extra": e} for e in sorted(extras)] or [{"extra": ""}]
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not any(req.marker.evaluate(e) for e in environments):
                continue
            todo.append((req.name, set(req.extras), False))
    return found


def package_sources() -> dict[str, bytes]:
    """``loopline/<path>.py`` for every module of the installed package the server may need."""
    root = Path(loopline.__file__).parent
    out: dict[str, bytes] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in EXCLUDED or "__pycache__" in rel.parts:
            continue
        out[f"loopline/{rel.as_posix()}"] = path.read_bytes()
    return out


def image_context_files() -> dict[str, bytes]:
    """Every file of the image's build context, by bundle path (Dockerfile at the root)."""
    files = {
        "Dockerfile": DOCKERFILE.encode(),
        "requirements-serve.txt": serve_requirements().encode(),
        VERIFY_SCRIPT: (Path(__file__).parent / "prestart.py").read_bytes(),
    }
    files.update(package_sources())
    return files
