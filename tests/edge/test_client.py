"""The agent against a hostile hub (a stdlib server that sends other bytes than the bundle it
announces): the download is refused, nothing is left on disk, the running model stays."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from loopline.digest import sha256_bytes
from loopline.edge.agent import Agent
from loopline.edge.agent_config import AgentConfig
from loopline.edge.client import HubClient, HubError, HubUnreachable
from loopline.errors import IntegrityError
from tests.edge.models import png, write_model_bundle

ANNOUNCED = sha256_bytes(b"the real bundle")


class _Hostile(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != "Bearer t":
            body, status = b'{"error": "invalid bearer token"}', 401
        elif self.path.startswith("/v1/edge/bundles/"):
            body, status = b"other bytes entirely", 200
        else:
            body, status = json.dumps({"model_name": "m", "version": 2, "generation": 5,
                                       "bundle_sha256": ANNOUNCED}).encode(), 200  # fmt: skip
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hostile() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_a_download_that_does_not_match_its_digest_is_refused(hostile: str, tmp_path: Path) -> None:
    client = HubClient(hostile, "e", "t")
    dest = tmp_path / "b.tar"
    with pytest.raises(IntegrityError, match="refusing it"):
        client.download_bundle(ANNOUNCED, dest)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(IntegrityError, match="64 lowercase hex"):
        client.download_bundle("../../etc/passwd", dest)
    with pytest.raises(HubError, match="401: invalid bearer token"):
        HubClient(hostile, "e", "wrong").deployment()
    with pytest.raises(HubUnreachable):
        HubClient("http://127.0.0.1:9", "e", "t", timeout=2).deployment()


def test_the_agent_keeps_its_model_when_the_hub_sends_other_bytes(
    hostile: str, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    agent = Agent(AgentConfig(hub_url=hostile, env="e", device_id="d", token_file=token,
                              work_dir=tmp_path / "work", port=None, mqtt_url=None))  # fmt: skip
    tar = tmp_path / "v1.tar"
    sha = write_model_bundle("car", tar)
    agent.slot.install(tar, sha, name="m", version=1, generation=1)
    agent.reconcile(agent.hub.deployment())
    assert agent.status() == "error" and "refused m:2" in (agent.error or "")
    assert "still serving m:1" in (agent.error or "")
    assert agent.slot.current is not None and agent.slot.current.version == 1
    assert agent.infer(png(0), "test", {})["label"] == "car"
    assert not [p for p in (tmp_path / "work" / "bundles").iterdir() if ANNOUNCED in p.name]
