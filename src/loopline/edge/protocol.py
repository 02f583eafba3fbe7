"""What the agent and the hub say to each other: paths, topics and payload shapes.

Standard library only: the agent imports this module.

HTTP (every endpoint needs the environment's bearer token)::

    GET  /v1/edge/{env}/deployment    -> {environment, generation, model_name, version,
                                          bundle_sha256, poll_s, heartbeat_s}
    GET  /v1/edge/bundles/{sha256}    -> the bundle tar (application/x-tar)
    POST /v1/edge/{env}/telemetry     <- a report (below)
    POST /v1/edge/{env}/predictions   <- {device_id, rows: [prediction rows]}

A report, over HTTP or as the MQTT message on ``<prefix>/<env>/<device>/telemetry``::

    {device_id, status, model_name, version, generation, bundle_sha256, host, error,
     info: {...}, telemetry: {latest metrics}, samples: [{at, version, metrics}]}

``<prefix>/<env>/<device>/status`` holds ``online`` while the agent is connected, and the
broker sets it to ``offline`` (the agent's retained last will) when it goes away.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

HEALTH_PATH = "/v1/edge/health"
STATUS_ONLINE = "online"
STATUS_OFFLINE = "offline"
# Device statuses the agent reports (devices.status is 16 characters wide).
DEVICE_STATUSES = ("ok", "updating", "error", "no-model", "offline")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}$")
MAX_ROWS_PER_UPLOAD = 1000


def deployment_path(env: str) -> str:
    return f"/v1/edge/{env}/deployment"


def bundle_path(sha256: str) -> str:
    return f"/v1/edge/bundles/{sha256}"


def telemetry_path(env: str) -> str:
    return f"/v1/edge/{env}/telemetry"


def predictions_path(env: str) -> str:
    return f"/v1/edge/{env}/predictions"


def telemetry_topic(prefix: str, env: str, device: str) -> str:
    return f"{prefix}/{env}/{device}/telemetry"


def status_topic(prefix: str, env: str, device: str) -> str:
    return f"{prefix}/{env}/{device}/status"


def parse_topic(prefix: str, env: str, topic: str) -> tuple[str, str] | None:
    """``(device, kind)`` of ``<prefix>/<env>/<device>/<kind>``, or None for another topic."""
    head = f"{prefix}/{env}/"
    if not topic.startswith(head):
        return None
    device, _, kind = topic[len(head) :].partition("/")
    if not device or kind not in ("telemetry", "status"):
        return None
    return device, kind


def check_device_id(device_id: str) -> str:
    """``device_id`` if it is a safe name (letters, digits, ``_.:-``; MQTT-topic safe)."""
    if not isinstance(device_id, str) or not DEVICE_ID.match(device_id):
        raise ValueError(
            f"device id {device_id!r}: use 1 to 200 letters, digits, '_', '.', ':' or '-', "
            "starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class MqttUrl:
    """A broker address: ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> MqttUrl:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(
                f"MQTT URL {redact(url)!r}: expected mqtt://host[:port] (or mqtts:// for TLS)"
            )
        tls = parts.scheme in ("mqtts", "ssl")
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:  # never shows the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
