"""The agent's HTTP client of the hub: standard library only (``urllib``).

Every call carries the device token. A hub that cannot be reached raises ``HubUnreachable``
(the agent keeps working offline); a hub that answers with an error raises ``HubError``
with the hub's own message.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loopline.edge import protocol
from loopline.errors import IntegrityError, LooplineError

MAX_BUNDLE_BYTES = 4 << 30
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class HubUnreachable(LooplineError):
    """The hub did not answer (down, no network)."""


class HubError(LooplineError):
    """The hub answered with an error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"hub answered {status}: {message}")
        self.status = status


class HubClient:
    """Talks to one hub for one environment."""

    def __init__(self, url: str, env: str, token: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.env = env
        self.timeout = timeout
        self._token = token
        host = urlsplit(self.url).hostname or ""
        handlers: list[Any] = []
        if host in _LOOPBACK:  # never through a proxy
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def _open(self, method: str, path: str, body: Any = None) -> Any:
        data = None
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            return self._opener.open(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            raise HubError(err.code, _message(err)) from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise HubUnreachable(f"hub {self.url} is unreachable: {reason}") from None

    def _json(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            with self._open(method, path, body) as response:
                raw = response.read()
        except (OSError, ValueError) as err:  # the connection broke mid-answer
            raise HubUnreachable(f"hub {self.url} is unreachable: {err}") from None
        try:
            out = json.loads(raw)
        except ValueError:
            raise HubError(200, "the answer is not JSON") from None
        if not isinstance(out, dict):
            raise HubError(200, "the answer is not a JSON object")
        return out

    def deployment(self) -> dict[str, Any]:
        return self._json("GET", protocol.deployment_path(self.env))

    def report(self, report: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", protocol.telemetry_path(self.env), report)

    def upload(self, device_id: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"device_id": device_id, "rows": rows}
        return self._json("POST", protocol.predictions_path(self.env), body)

    def download_bundle(self, sha256: str, dest: Path) -> Path:
        """Download the bundle tar ``sha256`` to ``dest``, checking its sha256 on the way;
        ``dest`` appears only when complete and matching (IntegrityError otherwise)."""
        if not protocol.SHA256.match(sha256):
            raise IntegrityError(f"invalid bundle digest {sha256!r}: expected 64 lowercase hex")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        digest = hashlib.sha256()
        size = 0
        try:
            try:
                with (
                    self._open("GET", protocol.bundle_path(sha256)) as response,
                    open(tmp, "wb") as out,
                ):
                    while chunk := response.read(1 << 20):
                        size += len(chunk)
                        if size > MAX_BUNDLE_BYTES:
                            raise IntegrityError(
                                f"bundle {sha256[:12]} is larger than {MAX_BUNDLE_BYTES} bytes"
                            )
                        digest.update(chunk)
                        out.write(chunk)
            except OSError as err:
                raise HubUnreachable(f"bundle download from {self.url} broke off: {err}") from None
            actual = digest.hexdigest()
            if actual != sha256:
                raise IntegrityError(
                    f"the bundle downloaded as {sha256[:12]} has sha256 {actual[:12]} "
                    "(tampered or corrupt); refusing it"
                )
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest


def _message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read() or b"{}")
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            return str(body["error"])
    except (OSError, ValueError):
        pass
    return str(err.reason)
