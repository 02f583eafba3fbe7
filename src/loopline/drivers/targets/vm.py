"""The vm target: a plain Linux host, a systemd unit and an install script.

``render`` writes, for environment ENV serving NAME:VERSION::

    bundle/                 the verified bundle, byte for byte the registered one
    loopline-ENV.service    the systemd unit: a non-root user, Restart=on-failure, secrets
                            from an EnvironmentFile, the bundle checked (verify-bundle.py)
                            before every start, then the server (``loopline.deploy.server``)
    install.sh              idempotent installer (run as root on the host)
    ENV.env.example         the EnvironmentFile's variables, without values

Layout on the host (``vm.prefix``, default /opt/loopline)::

    PREFIX/ENV/venv/              a virtualenv with the bundle's requirements-serve.txt
    PREFIX/ENV/bundles/SHA256/    the bundle, root-owned and read-only to the service
    /etc/loopline/ENV.env         LOOPLINE_SERVE_TOKEN, LOOPLINE_DB_URL (mode 0600)

The server's code is the bundle's own copy of Loopline, started exactly as the serving
image starts it (the bundle's Dockerfile CMD, with the installed path for ``/bundle``):
``python -I -B -c`` checks the folder against its manifest with the standard library
alone, then appends it to ``sys.path`` (it can shadow no installed package) and runs
``loopline.deploy.server``'s ``main``. Nothing in the virtualenv points at the bundle (no
``.pth`` file): a ``sitecustomize.py`` slipped into the folder would otherwise run at every
start of that Python, before any check.

``install.sh`` takes overrides, so its steps can run without root (the tests run them in a
temporary folder): ``LOOPLINE_PREFIX`` (the unit's paths are rewritten to it),
``LOOPLINE_PYTHON`` (the interpreter the venv is made from), ``LOOPLINE_PIP_ARGS`` (extra
pip arguments) and ``SKIP_SYSTEMD=1`` (no user, env file or unit). ``up``/``down`` cannot
reach a remote host: they say so and give the commands.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

from loopline.drivers.targets import Outcome, TargetContext
from loopline.drivers.targets.context import (
    copy_bundle,
    identity,
    identity_env,
    image_command,
    probe,
    serve_env,
    shown_store_url,
    slug,
    token_variable,
    work_dir,
    write,
)
from loopline.errors import ConfigError


def unit_name(ctx: TargetContext) -> str:
    return f"loopline-{slug(ctx.environment)}.service"


def layout(ctx: TargetContext) -> dict[str, str]:
    """Paths on the host, from ``vm.prefix``."""
    prefix = ctx.env.vm.prefix.rstrip("/") or "/"
    if not prefix.startswith("/") or re.search(r"[\s\"'\\$%`]", prefix):
        raise ConfigError(
            f"vm.prefix {ctx.env.vm.prefix!r} must be an absolute path without spaces, "
            "quotes, $, % or backslashes"
        )
    _, _, sha, _ = identity(ctx)
    home = f"{prefix}/{slug(ctx.environment)}"
    return {
        "prefix": prefix,
        "home": home,
        "venv": f"{home}/venv",
        "bundle": f"{home}/bundles/{sha}",
        "env_file": f"/etc/loopline/{slug(ctx.environment)}.env",
        "state": f"loopline-{slug(ctx.environment)}",
    }


def _quote(value: str) -> str:
    """A systemd ``Environment=`` assignment value: quoted, ``%`` and ``\\`` escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def _exec_arg(arg: str) -> str:
    """One ``ExecStart=`` word: quoted when needed, ``%`` and ``$`` escaped for systemd."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_./:=,+@-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unit(ctx: TargetContext) -> str:
    name, version, sha, bundle_dir = identity(ctx)
    user = ctx.env.vm.user
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", user) or user == "root":
        raise ConfigError(f"vm.user {user!r} must be a plain non-root user name")
    paths = layout(ctx)
    python = f"{paths['venv']}/bin/python"
    env = {**identity_env(ctx), **serve_env(ctx.env)}
    server = [python, *image_command(bundle_dir)[1:]]  # the image's CMD without "python"
    server = [arg.replace("/bundle", paths["bundle"]) for arg in server]
    server += ["--host", ctx.env.host, "--port", str(ctx.env.port)]
    lines = [
        "[Unit]",
        f"Description=Loopline model server: {name}:{version} for environment {ctx.environment}",
        f"X-Loopline-Model={name}:{version}",
        f"X-Loopline-Bundle-Sha256={sha}",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=exec",
        f"User={user}",
        f"Group={user}",
        *(f"Environment={_quote(f'{k}={v}')}" for k, v in env.items()),
        "# Secrets (LOOPLINE_SERVE_TOKEN, LOOPLINE_DB_URL): root-owned, mode 0600.",
        f"EnvironmentFile={paths['env_file']}",
        f"StateDirectory={paths['state']}",
        f"WorkingDirectory=/var/lib/{paths['state']}",
        "# The bundle must match its manifest before any of its code runs.",
        f"ExecStartPre={python} -I -B {paths['bundle']}/verify-bundle.py {paths['bundle']}",
        "ExecStart=" + " ".join(_exec_arg(arg) for arg in server),
        "Restart=on-failure",
        "RestartSec=2",
        "TimeoutStopSec=30",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectControlGroups=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


INSTALL = """\
#!/usr/bin/env bash
# Installs {ref} (bundle sha256 {sha}) as {unit} on this host.
# Run it as root from the rendered folder: sudo ./install.sh. Running it again is safe:
# each step checks what is already done.
#
# Overrides, e.g. to run the steps without root into a folder:
#   LOOPLINE_PREFIX=DIR   install under DIR instead of {prefix} (the unit follows)
#   LOOPLINE_PYTHON=EXE   the Python (3.11+) the virtualenv is made from (python3)
#   LOOPLINE_PIP_ARGS=..  extra pip arguments (an index URL, a constraints file)
#   SKIP_SYSTEMD=1        skip the service user, the env file and the unit
set -euo pipefail

HERE="$(cd -- "$(dirname -- "${{BASH_SOURCE[0]}}")" && pwd)"
RENDERED_PREFIX={prefix_q}
PREFIX="${{LOOPLINE_PREFIX:-$RENDERED_PREFIX}}"
PREFIX="${{PREFIX%/}}"
PYTHON="${{LOOPLINE_PYTHON:-python3}}"
HOME_DIR="$PREFIX/{env}"
VENV="$HOME_DIR/venv"
BUNDLE="$HOME_DIR/bundles/{sha}"
UNIT={unit_q}
SERVICE_USER={user_q}
ENV_FILE={env_file_q}

step() {{ printf '==> %s\\n' "$*"; }}

step "checking the bundle against its manifest"
"$PYTHON" -I -B "$HERE/bundle/verify-bundle.py" "$HERE/bundle"

if [ -x "$VENV/bin/python" ]; then
  step "virtualenv $VENV exists"
else
  step "creating the virtualenv $VENV"
  mkdir -p "$HOME_DIR"
  "$PYTHON" -m venv "$VENV"
fi

step "installing the serving requirements"
# shellcheck disable=SC2086  # LOOPLINE_PIP_ARGS is a list of arguments
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet \\
  ${{LOOPLINE_PIP_ARGS:-}} -r "$HERE/bundle/requirements-serve.txt"

if [ -d "$BUNDLE" ] && "$VENV/bin/python" -I -B "$HERE/bundle/verify-bundle.py" "$BUNDLE" \\
    >/dev/null 2>&1; then
  step "bundle $BUNDLE is installed"
else
  step "copying the bundle to $BUNDLE"
  rm -rf "$BUNDLE" "$BUNDLE.partial"
  mkdir -p "$(dirname "$BUNDLE")"
  cp -R "$HERE/bundle" "$BUNDLE.partial"
  chmod -R u=rwX,go=rX "$BUNDLE.partial"
  mv "$BUNDLE.partial" "$BUNDLE"
fi
step "verifying the installed bundle"
"$VENV/bin/python" -I -B "$HERE/bundle/verify-bundle.py" "$BUNDLE"

step "checking that the server imports"
"$VENV/bin/python" -I -B -c \\
  'import sys; sys.path.append(sys.argv[1]); import loopline.deploy.server' "$BUNDLE"

if [ "${{SKIP_SYSTEMD:-0}}" = "1" ]; then
  step "SKIP_SYSTEMD=1: not installing $UNIT"
  exit 0
fi

if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  step "creating the system user $SERVICE_USER"
  useradd --system --no-create-home --home-dir / --shell /usr/sbin/nologin "$SERVICE_USER"
fi
install -d -m 0755 "$(dirname "$ENV_FILE")"
if [ ! -f "$ENV_FILE" ]; then
  step "creating $ENV_FILE (fill in the secrets, then: systemctl restart $UNIT)"
  install -m 0600 "$HERE/{env}.env.example" "$ENV_FILE"
fi
step "installing /etc/systemd/system/$UNIT"
sed "s|$RENDERED_PREFIX/|$PREFIX/|g" "$HERE/$UNIT" > "/etc/systemd/system/$UNIT.partial"
mv "/etc/systemd/system/$UNIT.partial" "/etc/systemd/system/$UNIT"
systemctl daemon-reload
systemctl enable "$UNIT"
systemctl restart "$UNIT"
step "$UNIT (re)started; systemctl status $UNIT"
"""


def install_script(ctx: TargetContext) -> str:
    name, version, sha, _ = identity(ctx)
    paths = layout(ctx)
    return INSTALL.format(
        ref=f"{name}:{version}",
        sha=sha,
        unit=unit_name(ctx),
        unit_q=shlex.quote(unit_name(ctx)),
        prefix=paths["prefix"],
        prefix_q=shlex.quote(paths["prefix"]),
        env=slug(ctx.environment),
        user_q=shlex.quote(ctx.env.vm.user),
        env_file_q=shlex.quote(paths["env_file"]),
    )


def env_example(ctx: TargetContext) -> str:
    lines = [
        f"# Secrets of {unit_name(ctx)}: keep this file root-owned, mode 0600.",
        "# Fill in the values, then: systemctl restart " + unit_name(ctx),
    ]
    token = token_variable(ctx.env)
    if token:
        lines.append(f"# the value of ${token} where the environment's token is kept:")
    lines.append("LOOPLINE_SERVE_TOKEN=")
    shown = shown_store_url(ctx)
    lines.append("# the metadata store the server logs predictions to (PostgreSQL):")
    lines.append(f"# LOOPLINE_DB_URL={shown or 'postgresql+psycopg://USER:PASSWORD@HOST/DB'}")
    return "\n".join(lines) + "\n"


class VmTarget:
    name = "vm"

    def render(self, ctx: TargetContext, out: Path) -> list[Path]:
        files = copy_bundle(ctx, out / "bundle")
        files.append(write(out / unit_name(ctx), unit(ctx)))
        files.append(write(out / "install.sh", install_script(ctx), 0o755))
        files.append(write(out / f"{slug(ctx.environment)}.env.example", env_example(ctx)))
        return files

    def up(self, ctx: TargetContext) -> Outcome:
        where = work_dir(ctx, self.name)
        where.mkdir(parents=True)
        self.render(ctx, where)
        folder = f"loopline-{slug(ctx.environment)}"
        return Outcome(
            False,
            f"the vm target installs on a host Loopline does not reach by itself: wrote "
            f"{unit_name(ctx)} and install.sh to {where}; copy the folder to the host and run "
            "install.sh there as root",
            details={"rendered": str(where), "unit": unit_name(ctx)},
            commands=[
                f"scp -r {shlex.quote(str(where))} HOST:{folder}",
                f"ssh HOST sudo ./{folder}/install.sh",
            ],
        )

    def down(self, ctx: TargetContext) -> Outcome:
        return Outcome(
            False,
            "the vm target does not reach the host by itself; stop the service there",
            commands=[f"ssh HOST sudo systemctl disable --now {unit_name(ctx)}"],
        )

    def status(self, ctx: TargetContext) -> dict[str, Any]:
        return {
            "target": self.name,
            "unit": unit_name(ctx),
            "endpoint": ctx.env.endpoint,
            "healthy": probe(ctx.env.endpoint),
        }
