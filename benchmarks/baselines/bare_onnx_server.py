"""Baseline: a bare FastAPI server running the ONNX model per request, with no logging.

What one would write first: read the PNG body, decode it, run ONNX Runtime on a batch of
one (default session options), answer the label. No batching, metrics, ids or log.
``--workers N`` runs it as ``uvicorn --workers N`` does (N processes sharing one socket),
the way one would scale it on a machine with N cores.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request

from loopline.bundle import PreprocessSpec, decode_image, to_input


def make_app(model: str, labels: list[str], size: int) -> FastAPI:
    app = FastAPI()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    spec = PreprocessSpec(height=size, width=size)

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, object]:
        body = await request.body()
        x = to_input(decode_image(body, spec)[None])
        logits = session.run(None, {"input": x})[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        i = int(p.argmax())
        return {"label": labels[i], "confidence": float(p[i])}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def app_from_env() -> FastAPI:
    """The app of one worker process (``--workers N``): its settings from the environment."""
    return make_app(
        os.environ["BARE_MODEL"],
        json.loads(os.environ["BARE_LABELS"]),
        int(os.environ["BARE_SIZE"]),
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--labels", required=True, help="JSON list")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--port", type=int, default=8081)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    options = {"host": "127.0.0.1", "port": a.port, "access_log": False, "log_level": "warning"}
    if a.workers == 1:
        uvicorn.run(make_app(a.model, json.loads(a.labels), a.size), **options)  # type: ignore[arg-type]
    else:
        os.environ.update(BARE_MODEL=a.model, BARE_LABELS=a.labels, BARE_SIZE=str(a.size))
        uvicorn.run(
            "bare_onnx_server:app_from_env", factory=True, workers=a.workers,
            app_dir=str(Path(__file__).parent), **options,  # type: ignore[arg-type]
        )  # fmt: skip
