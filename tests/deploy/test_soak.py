"""Mixed valid and malformed traffic from 64 concurrent clients: no 5xx, nothing dropped,
the process stays up, every valid prediction is in the log.

The default run is short (5 s); ``LOOPLINE_SOAK_SECONDS=30`` gives the issue's full soak.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from typing import Any

import httpx
import numpy as np
import orjson

from tests.deploy.conftest import SIZE, Project, image_bytes, server_process

CLIENTS = 64
SECONDS = float(os.environ.get("LOOPLINE_SOAK_SECONDS", "5"))


def requests(url: str) -> list[tuple[str, bool, dict[str, Any]]]:
    """(kind, valid, httpx request arguments) for every kind of traffic."""
    predict = f"{url}/v1/models/vehicles/predict"
    infer = f"{url}/v2/models/vehicles/infer"
    png, jpeg = image_bytes(1), image_bytes(2, "JPEG")
    x = np.random.default_rng(0).uniform(0, 255, (2, 3, SIZE, SIZE)).astype("<f4")
    head = (
        b'{"inputs": [{"name": "input", "shape": [2, 3, 32, 32], "datatype": "FP32", '
        b'"parameters": {"binary_data_size": 24576}}], "outputs": [{"name": "logits"}]}'
    )
    hlen = {"Inference-Header-Content-Length": str(len(head))}
    both = [("f", ("a.png", png, "image/png")), ("f", ("b.jpg", jpeg, "image/jpeg"))]

    def post(url: str, body: bytes, ctype: str | None = None, **kw: Any) -> dict[str, Any]:
        headers = kw.pop("headers", {})
        if ctype:
            headers["Content-Type"] = ctype
        return {"url": url, "content": body, "headers": headers, **kw}

    return [
        ("png", True, post(predict + "?camera_id=c1", png, "image/png")),
        ("jpeg", True, post(predict, jpeg, "image/jpeg")),
        ("multipart", True, {"url": predict, "files": both}),
        ("v2-binary", True, post(infer, head + x.tobytes(), headers=hlen)),
        ("corrupt", False, post(predict, png[:300], "image/png")),
        ("empty", False, post(predict, b"", "image/png")),
        ("wrong-type", False, post(predict, png, "text/csv")),
        ("unknown-model", False, post(f"{url}/v1/models/x/predict", png, "image/png")),
        ("unknown-version", False, post(f"{url}/v2/models/vehicles/versions/3/infer", b"{}")),
        ("bad-json", False, post(infer, b'{"inputs": [{"name": "input"')),
        ("bad-shape", False, post(infer, head.replace(b"[2, 3", b"[2, 4"), headers=hlen)),
        ("bad-binary", False, post(infer, head + b"\0" * 10, headers=dict(hlen))),
    ]


async def client(
    http: httpx.AsyncClient, kinds: list[Any], stop: float, seed: int, out: dict[str, Any]
) -> None:
    rng = random.Random(seed)
    weights = [6 if valid else 1 for _, valid, _ in kinds]
    while asyncio.get_running_loop().time() < stop:
        kind, valid, args = rng.choices(kinds, weights)[0]
        try:
            r = await http.post(**args)
        except httpx.HTTPError as err:
            out["transport_errors"].append(f"{kind}: {err!r}")
            continue
        out["status"][(kind, r.status_code)] += 1
        if valid and r.status_code == 200:
            if kind == "v2-binary":
                size = int(r.headers.get("inference-header-content-length", len(r.content)))
                ids = orjson.loads(r.content[:size])["parameters"]["prediction_ids"].split(",")
            else:
                ids = [p["prediction_id"] for p in r.json()["predictions"]]
            out["ids"].extend(ids)


async def soak(url: str) -> dict[str, Any]:
    out: dict[str, Any] = {"status": Counter(), "ids": [], "transport_errors": []}
    kinds = requests(url)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        stop = asyncio.get_running_loop().time() + SECONDS
        await asyncio.gather(*(client(http, kinds, stop, i, out) for i in range(CLIENTS)))
    return out


def test_mixed_load_from_64_clients(fresh_project: Project) -> None:
    with server_process(fresh_project, "--flush-interval-s", "0.5") as server:
        out = asyncio.run(soak(server.url))
        assert server.proc.poll() is None, "the server died under load"
        stopped = server.stop()
    assert stopped in (0, -15)
    statuses = out["status"]
    assert not out["transport_errors"], out["transport_errors"][:5]
    assert not [k for k in statuses if k[1] >= 500], statuses
    valid = {kind for kind, ok, _ in requests("") if ok}
    assert all(code == 200 for kind, code in statuses if kind in valid), statuses
    assert all(400 <= code < 500 for kind, code in statuses if kind not in valid), statuses
    assert sum(n for (kind, _), n in statuses.items() if kind not in valid) > 0
    ids = out["ids"]
    assert len(ids) == len(set(ids)) > 100
    store = fresh_project.store()
    logged = {p.id for p in store.predictions.find("vehicles", 1)}
    store.close()
    assert set(ids) <= logged and len(logged) == len(ids)
