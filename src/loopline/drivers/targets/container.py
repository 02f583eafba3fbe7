"""The container target: the serving image, built and run with docker or podman.

``render`` writes a build context that serves exactly one registry version::

    OUT/bundle/       the verified bundle, byte for byte the registered one
    OUT/Dockerfile    the bundle's own recipe plus the model's identity (ENV and LABEL)
    OUT/run.sh        the exact build and run commands

The Dockerfile sits next to the bundle folder, not in it, on purpose: the image copies its
whole build context into ``/bundle`` and refuses to start on any file the manifest does
not list, so an identity file added to the bundle would stop every container. Building
with ``docker build -f OUT/Dockerfile OUT/bundle`` keeps the bundle untouched while the
image carries ``LOOPLINE_MODEL_NAME``/``LOOPLINE_MODEL_VERSION`` (a container started
from it serves ``vehicles:3``, not version 0) and the bundle's sha256 as labels. The
recipe is the bundle's own, the one its pinned requirements were tested with, not this
installation's.

``up`` builds the image and (re)starts ``container.replicas`` containers named
``loopline-PROJECT-ENV-N`` on host port ``port + N``, restart policy unless-stopped.
Secrets reach them through the engine's own environment (``-e NAME`` without a value),
never on a command line: the token from the environment's ``${VAR}`` reference, and
``LOOPLINE_DB_URL`` (the environment's ``metadata_url``, else the project's store when it
is PostgreSQL) so that every replica logs to one store. Without a usable engine (none
installed, or its daemon not reachable) it writes the build context under
``.loopline/targets/ENV/container``, says so plainly and returns the commands to run
where an engine exists.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from loopline.drivers.targets import Outcome, TargetContext
from loopline.drivers.targets.context import (
    IMAGE_PORT,
    copy_bundle,
    expanded_store_url,
    identity,
    identity_annotations,
    identity_env,
    identity_labels,
    label_value,
    probe,
    serve_env,
    shown_store_url,
    slug,
    store_url,
    token_variable,
    work_dir,
    write,
)
from loopline.errors import ConfigError

ENGINES = ("docker", "podman")
ENV_LABEL = "loopline.dev/environment"
PROJECT_LABEL = "loopline.dev/project"
BUILD_TIMEOUT_S = 3600.0


def find_engine(choice: str = "auto") -> tuple[str | None, str]:
    """``(engine path, "")`` for the first engine that answers, or ``(None, why none)``."""
    names = ENGINES if choice == "auto" else (choice,)
    reasons = []
    for name in names:
        path = shutil.which(name)
        if path is None:
            reasons.append(f"{name} is not installed")
            continue
        try:
            r = subprocess.run(
                [path, "info"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            reasons.append(f"{name} does not answer ({err})")
            continue
        if r.returncode == 0:
            return path, ""
        detail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        reasons.append(f"{name} is installed but its engine does not answer: {detail}")
    return None, "; ".join(reasons)


def image_tag(ctx: TargetContext) -> str:
    name, version, _, _ = identity(ctx)
    return ctx.env.container.image or f"loopline-{slug(name)}:{version}"


def container_names(ctx: TargetContext) -> list[str]:
    base = f"loopline-{slug(ctx.config.project)}-{slug(ctx.environment)}"
    return [f"{base}-{i}" for i in range(ctx.env.container.replicas)]


def dockerfile(ctx: TargetContext, recipe: str) -> str:
    """The bundle's Dockerfile ``recipe`` with the model's identity added before its CMD."""
    name, version, sha, _ = identity(ctx)
    lines = recipe.splitlines()
    at = max((i for i, line in enumerate(lines) if line.startswith("CMD ")), default=-1)
    if at < 0:
        raise ConfigError("the bundle's Dockerfile has no CMD; re-package the model")
    while at > 0 and lines[at - 1].startswith("#"):
        at -= 1
    labels = {**identity_labels(ctx), **identity_annotations(ctx)}
    labels.pop(ENV_LABEL)  # one image may serve several environments; the run labels it
    block = [
        "# Registry identity, added by Loopline's container target: the server reports this",
        "# name and version; the labels name the bundle the image was built from.",
        "LABEL " + " \\\n      ".join(f"{k}={json.dumps(v)}" for k, v in labels.items()),
        "ENV " + " ".join(f"{k}={json.dumps(v)}" for k, v in identity_env(ctx).items()),
    ]
    header = [
        f"# Serving image of {name}:{version} (bundle sha256 {sha}).",
        "# The recipe is the bundle's own (bundle/Dockerfile) with the identity block below;",
        "# build it with the bundle folder, unchanged, as the context:",
        f"#   docker build -f Dockerfile -t {image_tag(ctx)} bundle   (or podman build)",
    ]
    return "\n".join([*header, *lines[:at], *block, *lines[at:]]) + "\n"


def _publish(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        return f"{port}:{IMAGE_PORT}"
    return f"{host}:{port}:{IMAGE_PORT}"


def run_args(ctx: TargetContext, engine: str, index: int) -> list[str]:
    """``ENGINE run ...`` for replica ``index``; secrets as bare ``-e NAME`` only."""
    env = ctx.env
    args = [
        engine,
        "run",
        "--detach",
        "--name",
        container_names(ctx)[index],
        "--restart",
        "unless-stopped",
        "--publish",
        _publish(env.host, env.port + index),
        "--label",
        f"{ENV_LABEL}={label_value(ctx.environment)}",
        "--label",
        f"{PROJECT_LABEL}={label_value(ctx.config.project)}",
    ]
    if token_variable(env):
        args += ["--env", "LOOPLINE_SERVE_TOKEN"]
    if store_url(ctx):
        args += ["--env", "LOOPLINE_DB_URL"]
    for key, value in serve_env(env).items():
        args += ["--env", f"{key}={value}"]
    return [*args, image_tag(ctx)]


def build_args(engine: str, tag: str, where: Path) -> list[str]:
    return [engine, "build", "-f", str(where / "Dockerfile"), "-t", tag, str(where / "bundle")]


def commands(ctx: TargetContext, where: Path, engine: str = "docker") -> list[str]:
    """The shell commands that build and run this environment (no secret values)."""
    out: list[str] = []
    token = token_variable(ctx.env)
    if token:
        out.append(f'export LOOPLINE_SERVE_TOKEN="${{{token}}}"')
    shown = shown_store_url(ctx)
    if shown:
        out.append(f"export LOOPLINE_DB_URL={_double_quoted(shown)}")
    out.append(shlex.join(build_args(engine, image_tag(ctx), where)))
    for i, name in enumerate(container_names(ctx)):
        out.append(f"{shlex.join([engine, 'rm', '-f', name])} >/dev/null 2>&1 || true")
        out.append(shlex.join(run_args(ctx, engine, i)))
    return out


def _double_quoted(text: str) -> str:
    """``text`` in double quotes, ``${VAR}`` references left for the shell to expand."""
    return '"' + "".join("\\" + c if c in '"\\`' else c for c in text) + '"'


class ContainerTarget:
    name = "container"

    def render(self, ctx: TargetContext, out: Path) -> list[Path]:
        _, _, _, bundle = identity(ctx)
        files = copy_bundle(ctx, out / "bundle")
        recipe = (bundle / "Dockerfile").read_text() if (bundle / "Dockerfile").is_file() else ""
        if not recipe:
            raise ConfigError("the bundle has no Dockerfile; re-package the model")
        files.append(write(out / "Dockerfile", dockerfile(ctx, recipe)))
        script = [
            "#!/bin/sh",
            f"# Build and run {ctx.model_name}:{ctx.model_version} for environment "
            f"{ctx.environment} (docker; podman takes the same commands).",
            "set -eu",
            'cd "$(dirname "$0")"',
            *commands(ctx, Path(".")),
        ]
        files.append(write(out / "run.sh", "\n".join(script) + "\n", 0o755))
        return files

    def up(self, ctx: TargetContext) -> Outcome:
        where = work_dir(ctx, self.name)
        where.mkdir(parents=True)
        self.render(ctx, where)
        engine, why = find_engine(ctx.env.container.engine)
        if engine is None:
            return self._no_engine(ctx, why, where, "wrote the build context to " + str(where))
        env = self._secrets(ctx)
        tag = image_tag(ctx)
        built = _run(build_args(engine, tag, where), dict(os.environ), BUILD_TIMEOUT_S)
        if built.returncode != 0:
            return Outcome(
                False,
                f"building {tag} failed: {_last_line(built)}",
                commands=commands(ctx, where, Path(engine).name),
            )
        started: list[str] = []
        for i, name in enumerate(container_names(ctx)):
            _run([engine, "rm", "-f", name], env)
            r = _run(run_args(ctx, engine, i), env)
            if r.returncode != 0:
                return Outcome(
                    False, f"starting {name} failed: {_last_line(r)}", details={"started": started}
                )
            started.append(name)
        for extra in set(self._containers(ctx, engine)) - set(started):
            _run([engine, "rm", "-f", extra], env)
        endpoints = [
            _endpoint(ctx.env.host, ctx.env.port + i) for i in range(ctx.env.container.replicas)
        ]
        return Outcome(
            True,
            f"{ctx.model_name}:{ctx.model_version} runs in {len(started)} container(s) "
            f"({tag}) at {', '.join(endpoints)}",
            details={
                "engine": Path(engine).name,
                "image": tag,
                "containers": started,
                "endpoints": endpoints,
            },
        )

    def down(self, ctx: TargetContext) -> Outcome:
        engine, why = find_engine(ctx.env.container.engine)
        if engine is None:
            flt = _filter_args(ctx)
            cmd = f"docker rm -f $(docker ps -aq {shlex.join(flt)})"
            return self._no_engine(ctx, why, None, "nothing was stopped", [cmd])
        names = self._containers(ctx, engine)
        for name in names:
            _run([engine, "rm", "-f", name], dict(os.environ))
        return Outcome(
            True,
            f"removed {len(names)} container(s) of {ctx.environment}",
            details={"containers": names},
        )

    def status(self, ctx: TargetContext) -> dict[str, Any]:
        engine, why = find_engine(ctx.env.container.engine)
        if engine is None:
            return {
                "target": self.name,
                "engine": None,
                "message": f"no container engine was found: {why}",
                "containers": [],
            }
        fmt = "{{.Names}}\t{{.Status}}\t{{.Image}}"
        r = _run([engine, "ps", "-a", *_filter_args(ctx), "--format", fmt], dict(os.environ))
        rows = []
        for line in r.stdout.splitlines():
            name, _, rest = line.partition("\t")
            state, _, image = rest.partition("\t")
            rows.append({"name": name, "status": state, "image": image})
        return {
            "target": self.name,
            "engine": Path(engine).name,
            "containers": rows,
            "healthy": probe(_endpoint(ctx.env.host, ctx.env.port)),
        }

    # -- helpers -----------------------------------------------------------------------------
    def _no_engine(
        self,
        ctx: TargetContext,
        why: str,
        where: Path | None,
        done: str,
        cmds: list[str] | None = None,
    ) -> Outcome:
        engine = ctx.env.container.engine
        shown = "docker" if engine == "auto" else engine
        return Outcome(
            False,
            f"no container engine was found ({why}); {done}; run these commands where "
            f"{'docker or podman' if engine == 'auto' else engine} runs",
            details={"build_context": str(where) if where else None},
            commands=cmds if cmds is not None else commands(ctx, where or Path("."), shown),
        )

    def _secrets(self, ctx: TargetContext) -> dict[str, str]:
        env = dict(os.environ)
        token = ctx.env.token_value()
        if token:
            env["LOOPLINE_SERVE_TOKEN"] = token
        db = expanded_store_url(ctx)
        if db:
            env["LOOPLINE_DB_URL"] = db
        return env

    def _containers(self, ctx: TargetContext, engine: str) -> list[str]:
        r = _run(
            [engine, "ps", "-a", *_filter_args(ctx), "--format", "{{.Names}}"], dict(os.environ)
        )
        return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def _filter_args(ctx: TargetContext) -> list[str]:
    return [
        "--filter",
        f"label={ENV_LABEL}={label_value(ctx.environment)}",
        "--filter",
        f"label={PROJECT_LABEL}={label_value(ctx.config.project)}",
    ]


def _endpoint(host: str, port: int) -> str:
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"


def _run(
    args: list[str], env: dict[str, str], timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            args, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return subprocess.CompletedProcess(args, 1, "", str(err))


def _last_line(r: subprocess.CompletedProcess[str]) -> str:
    return (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or ["no output"])[-1]
