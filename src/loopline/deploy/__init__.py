"""Deploy: serve a registered model bundle over HTTP (Open Inference Protocol v2 and images).

Nothing here imports torch; heavy modules (FastAPI, ONNX Runtime) load only when a server
is created. Entry points: ``loopline.deploy.server.create_app`` and ``python -m
loopline.deploy.server``.
"""

from __future__ import annotations
