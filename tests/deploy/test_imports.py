"""The serving process imports no torch: the serving image stays small (dvc-style check)."""

from __future__ import annotations

import subprocess
import sys

from tests.deploy.conftest import Project

# Requests go through the app too: a module imported lazily while an image is decoded,
# a batch is run or an answer is written counts as well.
CHECK = """
import io, sys
from PIL import Image
from starlette.testclient import TestClient
from loopline.deploy.server import ModelSource, create_app, load_model
from loopline.deploy.settings import ServeSettings
from loopline.cli.serve import register
settings = ServeSettings(log_predictions=False)
served, _ = load_model(ModelSource(ref="vehicles:1", config=sys.argv[1]), settings)
app = create_app(served, settings)
with TestClient(app) as client:
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), (90, 120, 30)).save(buf, fmt)
        r = client.post("/v1/models/vehicles/predict", content=buf.getvalue(),
                        headers={"Content-Type": "image/" + fmt.lower()})
        assert r.status_code == 200, r.text
    body = {"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                        "data": [0.5] * 3072}]}
    r = client.post("/v2/models/vehicles/infer", json=body)
    assert r.status_code == 200, r.text
    assert client.get("/metrics").status_code == 200
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


def deploy_imports() -> dict[str, set[str]]:
    """Which ``loopline.deploy`` modules each one imports, lazy imports inside functions
    included (those that only type checkers see excepted)."""
    import ast
    from pathlib import Path

    import loopline.deploy

    folder = Path(loopline.deploy.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        name = f"loopline.deploy.{path.stem}"
        tree = ast.parse(path.read_text())
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "loopline.deploy":
                    found |= {f"loopline.deploy.{a.name}" for a in node.names}
                else:
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m.startswith("loopline.deploy.") and m != name}
    return graph


def test_no_import_cycle_among_deploy_modules() -> None:
    graph = deploy_imports()
    assert "loopline.deploy.workers" in graph and "loopline.deploy.server" in graph

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            assert nxt not in path, "import cycle: " + " -> ".join([*path, nxt])
            visit(nxt, [*path, nxt])

    for module in graph:
        visit(module, [module])


def test_server_and_workers_import_alone() -> None:
    for module in ("loopline.deploy.workers", "loopline.deploy.server"):
        out = subprocess.run(
            [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
