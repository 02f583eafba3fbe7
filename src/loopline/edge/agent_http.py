"""The agent's HTTP endpoint (standard library ``http.server``, one thread per request).

``POST /predict`` takes one JPEG or PNG image as the body (``camera_id`` as a query
parameter or an ``X-Camera-Id`` header is kept with the prediction) and answers the top
label; ``GET /health`` shows the running model and version (503 until one is loaded).
Errors are JSON ``{"error": ...}`` with a 4xx status for the client's mistakes.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from loopline.errors import InvalidInput, LooplineError

log = logging.getLogger("loopline.edge")

MAX_BODY_BYTES = 16 << 20
IMAGE_TYPES = ("image/jpeg", "image/jpg", "image/png", "application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    agent: Any = None


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path != "/health":
            self._send(404, {"error": f"no such endpoint: GET {path}; try GET /health"})
            return
        agent = self.server.agent
        current = agent.slot.current
        body = {
            "status": agent.status(),
            "device_id": agent.cfg.device_id,
            "environment": agent.cfg.env,
            "model": current.ref if current else None,
            "model_name": current.name if current else None,
            "version": current.version if current else None,
            "generation": current.generation if current else None,
            "bundle_sha256": current.sha256 if current else None,
            "error": agent.error,
            "pending_predictions": agent.spool.pending,
            "hub_reachable": agent.hub_reachable,
            "mqtt_connected": bool(agent.mqtt is not None and agent.mqtt.connected),
        }
        self._send(200 if current is not None else 503, body)

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != "/predict":
            self._send(404, {"error": f"no such endpoint: POST {parts.path}; try POST /predict"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._send(411, {"error": "send the image with a Content-Length header"})
            return
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            self._send(413, {"error": f"the image is larger than {MAX_BODY_BYTES} bytes"})
            return
        data = self.rfile.read(int(length))
        mime = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if mime not in IMAGE_TYPES:
            self._send(415, {"error": f"unsupported Content-Type {mime!r}; send image/jpeg "
                                      "or image/png"})  # fmt: skip
            return
        query = parse_qs(parts.query)
        given = query.get("camera_id")
        camera = given[0] if given else self.headers.get("X-Camera-Id")
        metadata = {"camera_id": camera} if camera else {}
        try:
            answer = self.server.agent.infer(data, "edge-http", metadata)
        except InvalidInput as err:
            self._send(getattr(err, "status_code", 400), {"error": str(err)})
            return
        except LooplineError as err:  # no model loaded yet
            self._send(503, {"error": str(err)})
            return
        except Exception:
            log.exception("inference failed")
            self._send(500, {"error": "inference failed (logged on the device)"})
            return
        self._send(200, answer)


def serve_http(agent: Any, host: str, port: int) -> _Server:
    """Serve the agent's endpoint on a daemon thread; returns the bound server."""
    server = _Server((host, port), _Handler)
    server.agent = agent
    threading.Thread(target=server.serve_forever, name="loopline-agent-http", daemon=True).start()
    return server
