"""The agent's settings: a JSON file (``--config``, written by the edge target) with the
command line on top. Standard library only."""

from __future__ import annotations

import argparse
import json
import logging
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loopline.edge import protocol
from loopline.errors import ConfigError

PATHS = ("token_file", "work_dir", "frames_dir", "sensors_file", "initial_bundle")


@dataclass
class AgentConfig:
    """What an agent needs; from ``--config`` (JSON) with the command line on top."""

    hub_url: str
    env: str
    device_id: str
    token_file: Path
    work_dir: Path
    frames_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int | None = 8095  # None: no HTTP endpoint
    poll_s: float = 5.0
    heartbeat_s: float = 10.0
    mqtt_url: str | None = "mqtt://127.0.0.1:1883"
    topic_prefix: str = "loopline"
    sensors_file: Path | None = None
    spool_max_rows: int = 100_000
    upload_interval_s: float = 1.0
    frames_interval_s: float = 0.5
    initial_bundle: Path | None = None  # a bundle tar shipped with the agent
    initial_model: dict[str, Any] = field(default_factory=dict)  # name, version, sha256

    def __post_init__(self) -> None:
        protocol.check_device_id(self.device_id)
        for name in ("poll_s", "heartbeat_s", "upload_interval_s", "frames_interval_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


def parse_args(argv: list[str] | None) -> AgentConfig:
    """The agent's settings from ``argv`` (and ``--config``); ConfigError when incomplete."""
    p = argparse.ArgumentParser(
        prog="python -m loopline.edge.agent",
        description="The Loopline edge agent: follows its environment's deployment through "
        "the hub, infers on the device, reports telemetry over HTTP and MQTT.",
    )
    p.add_argument("--config", type=Path, help="agent config (JSON); flags override it")
    p.add_argument("--hub", dest="hub_url", help="the hub's URL, e.g. http://hub:8090")
    p.add_argument("--env", help="the environment this device follows")
    p.add_argument("--device-id", help="this device's id (default: the host name)")
    p.add_argument("--token-file", type=Path, help="file holding the device token")
    p.add_argument("--work-dir", type=Path, help="where bundles, spool and logs live")
    p.add_argument("--frames", dest="frames_dir", type=Path, help="infer on new files here")
    p.add_argument("--host", help="address of the HTTP endpoint (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port of the HTTP endpoint (-1: none)")
    p.add_argument("--poll-s", type=float)
    p.add_argument("--heartbeat-s", type=float)
    p.add_argument("--mqtt-url", help="MQTT broker ('' or 'none': no MQTT)")
    p.add_argument("--topic-prefix")
    p.add_argument("--sensors-file", type=Path, help="JSON file of sensor readings")
    p.add_argument("--spool-max-rows", type=int)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            values = json.loads(args.config.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read the agent config {args.config}: {err}") from None
        base = args.config.resolve().parent
        for key in PATHS:
            if values.get(key):
                values[key] = base / values[key]  # relative to the config file
    known = {f.name for f in fields(AgentConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown agent setting(s) {', '.join(unknown)}; allowed: "
                          + ", ".join(sorted(known)))  # fmt: skip
    for key in known & set(vars(args)):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    if values.get("port") == -1:
        values["port"] = None
    if values.get("mqtt_url") in ("", "none"):
        values["mqtt_url"] = None
    if not values.get("device_id"):
        values["device_id"] = socket.gethostname().split(".")[0]
    missing = [k for k in ("hub_url", "env", "token_file", "work_dir") if not values.get(k)]
    if missing:
        flags = ", ".join("--" + {"hub_url": "hub"}.get(k, k).replace("_", "-") for k in missing)
        raise ConfigError(f"missing {flags} (or give them in --config)")
    for key in PATHS:
        if values.get(key) is not None:
            values[key] = Path(values[key])
    try:
        return AgentConfig(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid agent config: {err}") from None
