"""The serving process imports no torch: the serving image stays small (dvc-style check)."""

from __future__ import annotations

import subprocess
import sys

from tests.deploy.conftest import Project

CHECK = """
import sys
from loopline.deploy.server import ModelSource, create_app, load_model
from loopline.deploy.settings import ServeSettings
from loopline.cli.serve import register
settings = ServeSettings(log_predictions=False)
served, _ = load_model(ModelSource(ref="vehicles:1", config=sys.argv[1]), settings)
create_app(served, settings)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx"))
print(",".join(heavy))
"""


def test_serving_imports_no_torch(fresh_project: Project) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHECK, str(fresh_project.config)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"serving imported {out.stdout.strip()}"
