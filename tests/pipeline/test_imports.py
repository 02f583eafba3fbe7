"""The pipeline layer imports no driver, no web framework and no torch (STYLE.md, layers)."""

from __future__ import annotations

import json
import subprocess
import sys

# What the engine needs besides the standard library: numpy (the artifact codecs) and
# pydantic (step params). Anything else of Loopline's beyond these is another layer.
ALLOWED_LOOPLINE = {"loopline", "loopline.errors", "loopline.digest"}
FORBIDDEN = ("fastapi", "starlette", "uvicorn", "torch", "sqlalchemy", "onnxruntime", "fsspec")


def test_the_pipeline_layer_imports_no_driver_web_framework_or_torch() -> None:
    script = (
        "import importlib, json, pkgutil, sys, loopline.pipeline as p\n"
        "for m in pkgutil.iter_modules(p.__path__):\n"
        "    importlib.import_module(f'loopline.pipeline.{m.name}')\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    loaded = set(json.loads(out))
    assert {"loopline.pipeline.engine", "loopline.pipeline.code"} <= loaded
    ours = {m for m in loaded if m.split(".")[0] == "loopline"}
    assert {m for m in ours if not m.startswith("loopline.pipeline")} == ALLOWED_LOOPLINE
    assert not [m for m in loaded if m.split(".")[0] in FORBIDDEN]
