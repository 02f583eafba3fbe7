"""Baseline: a bare FastAPI server running the ONNX model per request, with no logging.

What one would write first: read the PNG body, decode it, run ONNX Runtime on a batch of
one (default session options), answer the label. No batching, metrics, ids or log.
"""

from __future__ import annotations

import argparse
import json

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


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--labels", required=True, help="JSON list")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--port", type=int, default=8081)
    a = ap.parse_args()
    app = make_app(a.model, json.loads(a.labels), a.size)
    uvicorn.run(app, host="127.0.0.1", port=a.port, access_log=False, log_level="warning")
