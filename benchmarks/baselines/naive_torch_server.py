"""Baseline: a naive FastAPI server running the torch model per request.

The usual first deployment of a trained model: torch in the serving process, one image per
forward pass, no batching, no logging.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Request

sys.path.insert(0, str(Path(__file__).parent))
from vehicle_model import make_model  # noqa: E402

from loopline.bundle import PreprocessSpec, decode_image  # noqa: E402


def make_app(weights: str, labels: list[str], size: int) -> FastAPI:
    app = FastAPI()
    net = make_model()
    net.load_state_dict(torch.load(weights, weights_only=True))
    net.eval()
    spec = PreprocessSpec(height=size, width=size)

    @app.post("/predict")
    async def predict(request: Request) -> dict[str, object]:
        body = await request.body()
        pixels = torch.from_numpy(decode_image(body, spec)).permute(2, 0, 1).float()[None]
        with torch.no_grad():
            p = torch.softmax(net(pixels), dim=1)[0]
        i = int(p.argmax())
        return {"label": labels[i], "confidence": float(p[i])}

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--labels", required=True, help="JSON list")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--port", type=int, default=8082)
    a = ap.parse_args()
    app = make_app(a.weights, json.loads(a.labels), a.size)
    uvicorn.run(app, host="127.0.0.1", port=a.port, access_log=False, log_level="warning")
