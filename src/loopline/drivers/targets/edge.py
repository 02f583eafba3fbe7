"""The edge target: a self-contained device bundle, and the hub its agents follow.

``render`` writes, for environment ENV serving NAME:VERSION::

    agent/loopline/...          the agent's code: only the modules it imports (no torch,
                                FastAPI or SQLAlchemy), from this installation
    requirements-edge.txt       onnxruntime, numpy, pillow, paho-mqtt, pinned
    agent.json                  the agent's settings (hub, environment, intervals, MQTT)
    bundle/NAME-VERSION.tar     the verified model bundle, byte for byte the registered one,
                                served at once, before the hub is first reached
    loopline-edge-agent.service the systemd unit (a system user, restarted on failure)
    install.sh                  the installer (run as root on the device)
    SHA256SUMS                  every file above; install.sh checks them first
    README.md

The device token is never part of the bundle: ``install.sh`` takes it from
``LOOPLINE_EDGE_TOKEN`` and writes it to a file only the agent's user can read. Like the
vm target's installer, its steps run without root for tests: ``LOOPLINE_PREFIX``,
``LOOPLINE_PYTHON``, ``LOOPLINE_PIP_ARGS``, ``SKIP_PIP=1`` (use ``LOOPLINE_PYTHON`` as it
is) and ``SKIP_SYSTEMD=1``.

``up``/``down``/``status`` start, stop and show the environment's hub on this machine
(``loopline hub --env ENV``), under the local target's supervisor (restarts with backoff,
health checks): the hub serves what the agents poll, the agents run on the devices.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import loopline
from loopline.digest import sha256_file
from loopline.drivers.targets import Outcome, TargetContext
from loopline.drivers.targets.context import identity, write
from loopline.drivers.targets.local import LocalTarget, config_path
from loopline.edge import protocol
from loopline.errors import MissingExtra

# What the agent imports, as paths in the package: nothing else is shipped to a device.
AGENT_ENTRY_POINTS = (
    "loopline.edge.agent", "loopline.edge.agent_http", "loopline.edge.frames",
    "loopline.edge.mqtt",
)  # fmt: skip


def agent_modules() -> tuple[str, ...]:
    """The package files the agent imports (read from source, as cache keys are), with the
    ``__init__`` of every package on the way, so no hand-kept list can fall behind."""
    from loopline.pipeline.code import closure

    rels: set[str] = {"__init__.py"}
    for name in closure(AGENT_ENTRY_POINTS, ["loopline"]):
        parts = name.split(".")[1:]
        if not parts:
            continue
        for i in range(1, len(parts)):
            rels.add("/".join(parts[:i]) + "/__init__.py")
        package = Path(loopline.__file__).parent.joinpath(*parts)
        rels.add("/".join(parts) + ("/__init__.py" if package.is_dir() else ".py"))
    return tuple(sorted(rels))


EDGE_REQUIREMENTS = ("onnxruntime", "numpy", "pillow", "paho-mqtt")
UNIT = "loopline-edge-agent.service"
AGENT_PORT = 8095


def agent_sources() -> dict[str, bytes]:
    """``loopline/<path>`` for every module the agent imports, from this installation."""
    root = Path(loopline.__file__).parent
    return {f"loopline/{rel}": (root / rel).read_bytes() for rel in agent_modules()}


def edge_requirements() -> str:
    """``requirements-edge.txt``: the agent's dependencies pinned to the installed versions."""
    lines = ["# The edge agent's dependencies, pinned to the versions Loopline was tested with."]
    for name in EDGE_REQUIREMENTS:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise MissingExtra(
                f"{name} is not installed, so the edge bundle cannot pin it; install the "
                "extra: pip install 'loopline[edge]'"
            ) from None
    return "\n".join(lines) + "\n"


def hub_url(ctx: TargetContext) -> str:
    """The URL agents reach the hub at: ``edge.hub_url``, else this machine's hub port."""
    if ctx.env.edge.hub_url:
        return ctx.env.edge.hub_url.rstrip("/")
    host = "127.0.0.1" if ctx.env.host in ("0.0.0.0", "::") else ctx.env.host
    return f"http://{host}:{ctx.env.edge.hub_port}"


def agent_config(ctx: TargetContext, bundle_rel: str | None, sha: str | None) -> dict[str, Any]:
    edge = ctx.env.edge
    mqtt_url = edge.mqtt_url
    if mqtt_url is not None and protocol.redact(mqtt_url) != mqtt_url:
        mqtt_url = protocol.redact(mqtt_url)  # a password is set on the device, never here
    out: dict[str, Any] = {
        "hub_url": hub_url(ctx),
        "env": ctx.environment,
        "token_file": "token",
        "work_dir": "work",
        "host": "127.0.0.1",
        "port": AGENT_PORT,
        "poll_s": edge.poll_s,
        "heartbeat_s": edge.heartbeat_s,
        "mqtt_url": mqtt_url,
        "topic_prefix": edge.topic_prefix,
    }
    if bundle_rel is not None and sha is not None:
        out["initial_bundle"] = bundle_rel
        out["initial_model"] = {"name": ctx.model_name, "version": ctx.model_version,
                                "sha256": sha}  # fmt: skip
    return out


class _HubProcess(LocalTarget):
    """The hub, run and supervised the way the local target runs a server."""

    def server_command(self, ctx: TargetContext) -> list[str]:
        return [sys.executable, "-m", "loopline.edge.hub", "--env", ctx.environment,
                "--config", str(config_path(ctx)), "--host", ctx.env.host,
                "--port", str(ctx.env.port), "--log-level", "warning"]  # fmt: skip

    def folder(self, ctx: TargetContext) -> Path:
        return (ctx.config.state_dir / "envs" / ctx.environment / "hub").resolve()

    def health_url(self, ctx: TargetContext) -> str:
        return ctx.env.endpoint + protocol.HEALTH_PATH


class EdgeTarget:
    """Edge devices running the agent, following the hub of their environment."""

    name = "edge"

    def __init__(self) -> None:
        self.hub = _HubProcess()

    def _hub_ctx(self, ctx: TargetContext) -> TargetContext:
        """``ctx`` with the hub's port as the environment's: the supervisor's endpoint."""
        env = ctx.env.model_copy(update={"port": ctx.env.edge.hub_port})
        return dataclasses.replace(ctx, env=env)

    # -- render ----------------------------------------------------------------------------
    def render(self, ctx: TargetContext, out: Path) -> list[Path]:
        from loopline.drivers.artifacts.store import ArtifactStore

        name, version, sha, _ = identity(ctx)
        out.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        for rel, data in agent_sources().items():
            path = out / "agent" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files.append(path)
        bundle_rel = f"bundle/{name}-{version}.tar"
        tar = ArtifactStore(ctx.config.artifacts_url()).get_file(sha, out / bundle_rel)
        files.append(tar)
        config = agent_config(ctx, bundle_rel, sha)
        files.append(write(out / "requirements-edge.txt", edge_requirements()))
        files.append(write(out / "agent.json", json.dumps(config, indent=2) + "\n"))
        files.append(write(out / UNIT, UNIT_TEMPLATE.format(env=ctx.environment)))
        files.append(write(out / "install.sh", INSTALL_SH, 0o755))
        files.append(write(out / "README.md", README.format(
            env=ctx.environment, ref=f"{name}:{version}", hub=config["hub_url"],
            port=AGENT_PORT, unit=UNIT, sha=sha)))  # fmt: skip
        sums = "".join(f"{sha256_file(p)}  {p.relative_to(out).as_posix()}\n"
                       for p in sorted(files))  # fmt: skip
        files.append(write(out / "SHA256SUMS", sums))
        return files

    # -- the hub on this machine -----------------------------------------------------------
    def up(self, ctx: TargetContext) -> Outcome:
        outcome = self.hub.up(self._hub_ctx(ctx))
        outcome.message = f"edge hub of {ctx.environment}: {outcome.message}"
        outcome.details["hub_url"] = hub_url(ctx)
        return outcome

    def down(self, ctx: TargetContext) -> Outcome:
        outcome = self.hub.down(self._hub_ctx(ctx))
        outcome.message = f"edge hub of {ctx.environment}: {outcome.message}"
        return outcome

    def status(self, ctx: TargetContext) -> dict[str, Any]:
        from loopline.drivers.metadata.store import MetadataStore

        out = self.hub.status(self._hub_ctx(ctx))
        out["target"] = self.name
        out["hub_url"] = hub_url(ctx)
        store = MetadataStore(ctx.config.metadata_url())
        try:
            out["devices"] = store.devices.list(ctx.environment)
        finally:
            store.close()
        return out


UNIT_TEMPLATE = """\
# The Loopline edge agent of environment {env}. Installed by install.sh (which rewrites
# @PREFIX@ and @PYTHON@); the agent follows the environment's deployment through its hub.
[Unit]
Description=Loopline edge agent ({env})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=loopline-edge
Group=loopline-edge
WorkingDirectory=@PREFIX@
Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=@PREFIX@/agent
ExecStart=@PYTHON@ -B -m loopline.edge.agent --config @PREFIX@/agent.json
Restart=always
RestartSec=5
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths=@PREFIX@/work

[Install]
WantedBy=multi-user.target
"""

INSTALL_SH = """\
#!/bin/sh
# Install the Loopline edge agent on this device (run as root from this folder):
#   LOOPLINE_EDGE_TOKEN=... [LOOPLINE_DEVICE_ID=cam-17] sh install.sh
# For tests, without root: LOOPLINE_PREFIX, LOOPLINE_PYTHON, LOOPLINE_PIP_ARGS, SKIP_PIP=1
# (use LOOPLINE_PYTHON as it is) and SKIP_SYSTEMD=1 (no user, no unit).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=${LOOPLINE_PREFIX:-/opt/loopline-edge}
PYTHON=${LOOPLINE_PYTHON:-python3}
DEVICE_ID=${LOOPLINE_DEVICE_ID:-$(hostname | cut -d. -f1)}
: "${LOOPLINE_EDGE_TOKEN:?set LOOPLINE_EDGE_TOKEN to the environment's device token}"
cd "$HERE"
sha256sum -c --quiet --strict SHA256SUMS  # nothing altered since it was rendered
mkdir -p "$PREFIX/work"
if [ "${SKIP_PIP:-0}" = 1 ]; then
  PY=$PYTHON
else
  "$PYTHON" -m venv "$PREFIX/venv"
  # shellcheck disable=SC2086
  "$PREFIX/venv/bin/pip" install --no-cache-dir ${LOOPLINE_PIP_ARGS:-} -r requirements-edge.txt
  PY=$PREFIX/venv/bin/python
fi
rm -rf "$PREFIX/agent" "$PREFIX/bundle"
cp -R agent bundle "$PREFIX/"
"$PY" - "$PREFIX/agent.json" "$DEVICE_ID" <<'EOF'
import json, sys
config = json.load(open("agent.json"))
config["device_id"] = sys.argv[2]
with open(sys.argv[1], "w") as f:
    json.dump(config, f, indent=2)
EOF
(umask 077 && printf '%s\\n' "$LOOPLINE_EDGE_TOKEN" > "$PREFIX/token")
if [ "${SKIP_SYSTEMD:-0}" != 1 ]; then
  id -u loopline-edge >/dev/null 2>&1 || useradd --system --home-dir "$PREFIX" \\
    --shell /usr/sbin/nologin loopline-edge
  chown -R loopline-edge:loopline-edge "$PREFIX/work"
  chown loopline-edge "$PREFIX/token"
  sed -e "s#@PREFIX@#$PREFIX#g" -e "s#@PYTHON@#$PY#g" loopline-edge-agent.service \\
    > /etc/systemd/system/loopline-edge-agent.service
  systemctl daemon-reload
  systemctl enable --now loopline-edge-agent.service
  systemctl restart loopline-edge-agent.service
fi
echo "installed the Loopline edge agent as device $DEVICE_ID in $PREFIX"
"""

README = """\
# Edge bundle of environment {env}: {ref}

The agent follows environment {env} through its hub at {hub} (set `edge.hub_url` in
loopline.yaml to the address devices reach, then render again). It serves {ref} from the
shipped bundle (sha256 {sha}) at once, then whatever the environment's deployment says.

    LOOPLINE_EDGE_TOKEN=... LOOPLINE_DEVICE_ID=cam-17 sudo -E sh install.sh

- Inference: `POST http://127.0.0.1:{port}/predict` with a JPEG or PNG body;
  `GET /health` shows the running version. Add `"frames_dir": "/path"` to agent.json to
  infer on new image files there too (results in work/frames.jsonl).
- Telemetry goes to the hub over HTTP and to the MQTT broker of agent.json; a broker
  password, if it needs one, goes into agent.json on the device (never into this bundle).
- The unit is `{unit}`; the token file, mode 0600, is PREFIX/token.
- On the hub side: `loopline up --env {env}` starts the hub; `loopline deployments` lists
  each device with the version it runs.
"""
