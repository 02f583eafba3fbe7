"""What the targets share: the model a target serves, its identity, and ``render``.

``open_context`` resolves a model reference in the registry, extracts its bundle (checked
against the registered sha256, then every file against the bundle's manifest) into a
private folder, and yields the :class:`TargetContext` of one environment. ``render``
writes what a target would apply into a folder, without applying it.

Every target gives its servers the same registry identity: ``LOOPLINE_MODEL_NAME`` and
``LOOPLINE_MODEL_VERSION`` in their environment (the server reads both for a bundle
started outside the registry), and the bundle's sha256 as a label or annotation, so a
container started from a bare bundle still serves ``vehicles:3``, never version 0.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopline.drivers.targets import TargetContext, get_target
from loopline.errors import ConfigError

if TYPE_CHECKING:
    from loopline.config import Config
    from loopline.drivers.metadata.models import ModelVersion
    from loopline.environments import EnvironmentConfig

IMAGE_PORT = 8080  # the port the serving image listens on (its Dockerfile's CMD)
LABEL_PREFIX = "loopline.dev/"


# -- the model -----------------------------------------------------------------------------
def export_bundle(config: Config, ref: str, out: Path) -> ModelVersion:
    """Write the verified bundle of ``ref`` (NAME, NAME:VERSION, NAME@ALIAS) to ``out``.

    ``out`` must not exist; it appears only once the bundle matches the registered sha256
    and its manifest. Returns the registry's model version.
    """
    from loopline.bundle import extract_bundle
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.metadata.store import MetadataStore

    store = MetadataStore(config.metadata_url())
    try:
        mv = store.models.resolve(ref)
    finally:
        store.close()
    if not mv.version:
        raise ConfigError(f"{ref} resolves to version 0; a served model needs a registry version")
    with tempfile.TemporaryDirectory(prefix="loopline-export-") as tmp:
        tar = ArtifactStore(config.artifacts_url()).get_file(mv.bundle_sha256, Path(tmp) / "b.tar")
        extract_bundle(tar, out)
    return mv


@contextmanager
def open_context(
    config: Config, environment: str, ref: str, extra: dict[str, Any] | None = None
) -> Iterator[TargetContext]:
    """The context of ``environment`` serving ``ref``, its bundle in a private folder."""
    env = config.environment(environment)
    with tempfile.TemporaryDirectory(prefix="loopline-target-") as tmp:
        mv = export_bundle(config, ref, Path(tmp) / "bundle")
        yield TargetContext(
            config=config,
            environment=environment,
            env=env,
            model_name=mv.name,
            model_version=mv.version,
            bundle_sha256=mv.bundle_sha256,
            bundle_dir=Path(tmp) / "bundle",
            extra=dict(extra or {}),
        )


def render(
    config: Config,
    environment: str,
    ref: str,
    target: str,
    out: Path,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """Write what ``target`` would apply for ``environment`` serving ``ref`` into ``out``.

    ``out`` must not exist or be an empty folder. Nothing is applied. Returns the files
    written; on an error ``out`` is left as it was.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder; choose another --out")
    impl = get_target(target)
    config.environment(environment)  # an unknown environment fails before any work
    existed = out.exists()
    try:
        with open_context(config, environment, ref, extra) as ctx:
            out.mkdir(parents=True, exist_ok=True)
            return impl.render(ctx, out)
    except BaseException:
        if out.exists():
            if existed:
                for child in out.iterdir():
                    _remove(child)
            else:
                shutil.rmtree(out, ignore_errors=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- identity --------------------------------------------------------------------------------
def identity(ctx: TargetContext) -> tuple[str, int, str, Path]:
    """(name, version, bundle sha256, bundle folder); ConfigError when ctx has no model."""
    if not ctx.model_name or not ctx.model_version or not ctx.bundle_sha256:
        raise ConfigError(
            f"environment {ctx.environment!r} has no model version to serve; give NAME:VERSION"
        )
    if ctx.bundle_dir is None:
        raise ConfigError(f"no bundle of {ctx.model_name}:{ctx.model_version} was extracted")
    return ctx.model_name, ctx.model_version, ctx.bundle_sha256, ctx.bundle_dir


def identity_env(ctx: TargetContext) -> dict[str, str]:
    """The variables that tell a server started from a bare bundle who it is."""
    name, version, _, _ = identity(ctx)
    return {"LOOPLINE_MODEL_NAME": name, "LOOPLINE_MODEL_VERSION": str(version)}


def identity_labels(ctx: TargetContext) -> dict[str, str]:
    """Labels naming the environment and the model (short values, label-safe)."""
    name, version, _, _ = identity(ctx)
    return {
        LABEL_PREFIX + "project": label_value(ctx.config.project),
        LABEL_PREFIX + "environment": label_value(ctx.environment),
        LABEL_PREFIX + "model": label_value(name),
        LABEL_PREFIX + "model-version": str(version),
    }


def identity_annotations(ctx: TargetContext) -> dict[str, str]:
    """The bundle's identity in full (a sha256 is longer than a label value may be)."""
    name, version, sha, _ = identity(ctx)
    return {
        LABEL_PREFIX + "model-ref": f"{name}:{version}",
        LABEL_PREFIX + "bundle-sha256": sha,
    }


def slug(text: str, limit: int = 63) -> str:
    """``text`` as a lowercase DNS label: letters, digits and ``-``."""
    out = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return (out[:limit].rstrip("-")) or "x"


def label_value(text: str) -> str:
    """``text`` as a Kubernetes label value (63 characters of [A-Za-z0-9-_.])."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", out)


def copy_bundle(ctx: TargetContext, dest: Path) -> list[Path]:
    """Copy the verified bundle to ``dest`` and check the copy against its manifest."""
    from loopline.bundle import MANIFEST, verify_bundle_dir

    _, _, _, src = identity(ctx)
    shutil.copytree(src, dest)
    files = verify_bundle_dir(dest, manifest=(src / MANIFEST).read_bytes())
    return [dest / MANIFEST, *(dest / name for name in sorted(files))]


def image_command(bundle_dir: Path) -> list[str]:
    """The serving image's command (its Dockerfile's CMD), without --host and --port."""
    path = bundle_dir / "Dockerfile"
    if not path.is_file():
        raise ConfigError(f"the bundle has no Dockerfile; re-package it with Loopline {_ver()}")
    text = path.read_text().replace("\\\n", " ")
    cmds = [line[4:] for line in text.splitlines() if line.startswith("CMD ")]
    try:
        cmd = json.loads(cmds[-1])
        if not isinstance(cmd, list) or not all(isinstance(a, str) for a in cmd):
            raise ValueError("not a list of strings")
    except (IndexError, ValueError) as err:
        raise ConfigError(f"the bundle's Dockerfile has no exec-form CMD ({err})") from None
    for flag in ("--host", "--port"):  # each target listens where it should
        if flag in cmd:
            i = cmd.index(flag)
            cmd = cmd[:i] + cmd[i + 2 :]
    return list(cmd)


def _ver() -> str:
    from loopline import __version__

    return __version__


# -- settings --------------------------------------------------------------------------------
def serve_env(env: EnvironmentConfig) -> dict[str, str]:
    """The environment's serve settings as ``LOOPLINE_SERVE_*`` variables (no secrets)."""
    from loopline.deploy.settings import ENV_PREFIX

    out: dict[str, str] = {}
    for key, value in sorted(env.serve.items()):
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        out[ENV_PREFIX + key.upper()] = text
    return out


def token_variable(env: EnvironmentConfig) -> str | None:
    """The name of the variable the environment's ``${TOKEN}`` reference names."""
    return env.token[2:-1] if env.token else None


def store_url(ctx: TargetContext) -> str | None:
    """The store every replica logs to, as written (``${ENV}`` references kept).

    The environment's ``metadata_url``, else the project's store when it is PostgreSQL;
    None for a SQLite store, which a replica elsewhere cannot share.
    """
    if ctx.env.metadata_url:
        return ctx.env.metadata_url
    url = os.environ.get("LOOPLINE_DB_URL") or ctx.config.store.metadata_url
    return url if url and url.startswith("postgresql") else None


def expanded_store_url(ctx: TargetContext) -> str | None:
    """:func:`store_url` with its references expanded, to hand to a server (never print)."""
    from loopline.credentials import expand_url

    url = store_url(ctx)
    return None if url is None else expand_url(url, f"environments.{ctx.environment}.metadata_url")


def shown_store_url(ctx: TargetContext) -> str | None:
    """:func:`store_url` safe to print: literal passwords masked, references kept."""
    from loopline.credentials import mask_url

    url = store_url(ctx)
    return None if url is None else mask_url(url)


def work_dir(ctx: TargetContext, target: str) -> Path:
    """A fresh folder under ``.loopline/targets/ENV/`` for what ``up`` builds or applies."""
    path = ctx.config.state_dir / "targets" / ctx.environment / target
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def probe(url: str, timeout: float = 2.0) -> bool:
    """True when ``url``/v2/health/ready answers 200."""
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=timeout) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path
