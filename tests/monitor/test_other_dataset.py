"""The closed loop on a data set that is not the vehicle example, on SQLite and PostgreSQL.

A tiny generated lake of shapes (``circle``, ``square``, ``triangle``) photographed at two
sites (``site``: north, south) under two lightings (``lighting``: bright, dim). ``shapes:1``
is built on the bright images only and serves production. Production then sees dim images
at the north site, where ``shapes:1`` is wrong (its real ONNX answers, logged as the server
logs them, with the captured images and their feedback labels), and bright ones at the
south site, where it is right. The monitor fires ``accuracy < 0.4`` globally and per site
(north only), and the loop retrains on the lake plus the captures (``trigger=alert``),
gates, tests in the replica on a real temporary server, and releases ``shapes:2``
directly. ``alert_report`` shows the chain from the alert to the deployment.

A fast test keeps ``loopline.monitor`` free of the vehicle example's names in its code.
"""

from __future__ import annotations

import ast
import csv
import io
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

import loopline.monitor
from loopline.drivers.metadata.store import MetadataStore
from loopline.monitor.types import scope_name

if TYPE_CHECKING:
    from loopline.drivers.metadata.alerts import AlertRecord
    from loopline.drivers.metadata.loops import LoopRecord

SHAPES = ("circle", "square", "triangle")
SITES = ("north", "south")
LIGHTINGS = ("bright", "dim")
SIZE = 32  # validate's minimum width and height
MODEL = "shapes"
OWNER = "monitor-other-dataset"


# -- a tiny generated lake of shapes -------------------------------------------------------
def draw_shape(rng: np.random.Generator, label: str, lighting: str) -> bytes:
    """One PNG of ``label``: a dark shape on a light ground (bright), or a faint light one
    on a dark, noisy ground (dim)."""
    if lighting == "bright":
        ground = tuple(int(v) for v in rng.integers(190, 256, 3))
        ink = tuple(int(v) for v in rng.integers(0, 90, 3))
    else:
        ground = tuple(int(v) for v in rng.integers(0, 30, 3))
        ink = tuple(int(v) for v in rng.integers(45, 80, 3))
    img = Image.new("RGB", (SIZE, SIZE), ground)
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(7, 12))
    cx, cy = (int(v) for v in rng.integers(r + 1, SIZE - r - 1, 2))
    if label == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=ink)
    elif label == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=ink)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=ink)
    pixels = np.asarray(img, dtype=np.int16)
    if lighting == "dim":
        pixels = pixels + rng.normal(0.0, 6.0, pixels.shape).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def generate_shapes(out: Path, plan: dict[tuple[str, str], int], seed: int) -> pd.DataFrame:
    """Write ``plan[(site, lighting)]`` images (labels in turn) under ``out/images`` and
    ``out/manifest.csv`` (``path,label,site,lighting``: the folder lake's manifest layout);
    returns the manifest with absolute paths in ``file`` and digests in ``sha256``."""
    rng = np.random.default_rng(seed)
    rows = []
    for (site, lighting), n in plan.items():
        folder = out / "images" / site / lighting
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            label = SHAPES[i % len(SHAPES)]
            rel = f"images/{site}/{lighting}/{label}_{i:04d}.png"
            (out / rel).write_bytes(draw_shape(rng, label, lighting))
            rows.append({"path": rel, "label": label, "site": site, "lighting": lighting})
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "site", "lighting"])
        writer.writeheader()
        writer.writerows(rows)
    from loopline.digest import sha256_bytes

    df = pd.DataFrame(rows)
    df["file"] = [str(out / p) for p in df["path"]]
    df["sha256"] = [sha256_bytes(Path(f).read_bytes()) for f in df["file"]]
    return df


@pytest.fixture(scope="module")
def shapes_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lake the model is built on: both sites, both lightings (the config keeps bright)."""
    out = tmp_path_factory.mktemp("shapes-lake")
    plan = {(s, light): 45 if light == "bright" else 15 for s in SITES for light in LIGHTINGS}
    generate_shapes(out, plan, seed=3)
    return out


@pytest.fixture(scope="module")
def production_shapes(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Other images (another seed) that production sees: dim at north, bright at south."""
    out = tmp_path_factory.mktemp("shapes-production")
    return generate_shapes(out, {("north", "dim"): 150, ("south", "bright"): 90}, seed=97)


# -- the project ---------------------------------------------------------------------------
CONFIG = """\
project: shapes
model: {{name: shapes}}
store:
  metadata_url: {db}
  artifacts_url: {artifacts}
data:
  source: {{kind: lake, uri: {lake}}}
  labels: [circle, square, triangle]
  filter: {{lighting: [bright]}}
train:
  input_size: 24
  depth: 2
  width: 8
  epochs: 2
  batch_size: 16
  augment: false
  threads: 1
  search: {{space: {{lr: [0.01]}}}}
evaluate: {{segments: [site, lighting]}}
gate: {{rules: ["macro_precision >= 0.0"], max_regression: 1.0}}
monitor:
  environments: [production]
  segments: [site]
  owner: qa@example.com
  channels: [{{kind: log}}]
  rules:
    - {{name: accuracy-low, metric: accuracy, op: "<", threshold: 0.4, window: 50,
       min_samples: 30, severity: critical, action: retrain}}
    - {{name: site-accuracy-low, metric: accuracy, op: "<", threshold: 0.4, window: 50,
       min_samples: 10, severity: warning, scope: segment, action: notify}}
  retrain:
    min_new_labels: 40
    holdout_min: 15
    holdout_share: 0.25
    cooldown_s: 0
    strategy: direct
    max_regression: 1.0
environments:
  staging:
    port: {staging_port}
    replica_test: {{rules: ["accuracy >= 0.0"], load_requests: 10, concurrency: 2, replay: 0,
                   timeout_s: 120, max_p95_ms: 600000, max_memory_mb: 4096}}
  production:
    port: {prod_port}
"""


@dataclass
class Traffic:
    """What production was sent: prediction ids by (site, lighting)."""

    dim_north: list[str]
    bright_south: list[str]


def log_traffic(store: Any, artifacts: Any, rows: list[dict[str, Any]], version: int) -> list[str]:
    """Log each row's answer as the server does (prediction, then its captured image in the
    artifact store), then its feedback label. Times start now, a millisecond apart."""
    from loopline.digest import sha256_bytes
    from loopline.drivers.metadata.models import utcnow

    start = utcnow()
    ids = [uuid.uuid4().hex for _ in rows]
    times = [start + timedelta(milliseconds=i) for i in range(len(rows))]
    store.predictions.log(
        [
            {"id": pid, "at": at, "model_name": MODEL, "model_version": version,
             "source": "http", "label": r["predicted"], "confidence": 0.9,
             "probabilities": None, "request_metadata": {"site": r["site"]},
             "input_stats": None, "environment": "production", "deployment_generation": 1,
             "variant": "stable"}
            for pid, at, r in zip(ids, times, rows, strict=True)
        ]
    )  # fmt: skip
    images = [Path(r["file"]).read_bytes() for r in rows]
    store.captures.record(
        [
            {"prediction_id": pid, "sha256": sha256_bytes(data), "bytes": len(data),
             "media_type": "image/png", "environment": "production", "at": at,
             "expires_at": at + timedelta(days=30)}
            for pid, data, at in zip(ids, images, times, strict=True)
        ]
    )  # fmt: skip
    for data in images:
        artifacts.put_bytes(data, durable=False)
    results = store.predictions.record_feedback(
        [(pid, r["label"]) for pid, r in zip(ids, rows, strict=True)], labels=list(SHAPES)
    )
    assert {r["status"] for r in results} == {"recorded"}
    return ids


def answers(artifacts: Any, bundle_sha256: str, images: pd.DataFrame) -> list[str]:
    """The bundle's real (ONNX) answers on ``images``."""
    from loopline.builder.evaluate_registered import score_bundle
    from loopline.drivers.data.lake import Lake

    root = Path(images["file"].iloc[0]).parents[3]
    _, pred = score_bundle(
        artifacts, Lake(str(root)), bundle_sha256, images[["path", "label", "sha256"]], list(SHAPES)
    )
    return [SHAPES[i] for i in pred]


def send_production_traffic(
    store: Any, artifacts: Any, production: pd.DataFrame, bundle_sha256: str
) -> Traffic:
    """45 dim north images ``shapes:1`` gets wrong and 15 bright south ones it gets right,
    three north to one south."""
    df = production.copy()
    df["predicted"] = answers(artifacts, bundle_sha256, df)
    wrong = df[(df["lighting"] == "dim") & (df["predicted"] != df["label"])]
    right = df[(df["lighting"] == "bright") & (df["predicted"] == df["label"])]
    assert len(wrong) >= 45, f"shapes:1 is wrong on only {len(wrong)} of 150 dim images"
    assert len(right) >= 15, f"shapes:1 is right on only {len(right)} of 90 bright images"
    north, south = wrong.head(45).to_dict("records"), right.head(15).to_dict("records")
    rows: list[dict[str, Any]] = []
    for i in range(15):
        rows += [*north[3 * i : 3 * i + 3], south[i]]
    ids = log_traffic(store, artifacts, rows, version=1)
    dim = [pid for pid, r in zip(ids, rows, strict=True) if r["lighting"] == "dim"]
    bright = [pid for pid, r in zip(ids, rows, strict=True) if r["lighting"] == "bright"]
    return Traffic(dim, bright)


def loop_of(store: MetadataStore, alert_id: int) -> LoopRecord:
    loop = store.loops.get_by_alert(alert_id)
    assert loop is not None, f"alert {alert_id} has no loop"
    return loop


def stored(store: MetadataStore, alert_id: int) -> AlertRecord:
    alert = store.alerts.get(alert_id)
    assert alert is not None
    return alert


@pytest.mark.slow
def test_the_loop_retrains_on_captured_dim_shapes_and_serves_the_new_version(
    db_url: str,
    tmp_path: Path,
    shapes_lake: Path,
    production_shapes: pd.DataFrame,
) -> None:
    from loopline.builder.pipeline import build
    from loopline.config import load_config
    from loopline.deploy import release
    from loopline.drivers.artifacts import ArtifactStore
    from loopline.drivers.data.captures import PREFIX
    from loopline.monitor import service
    from loopline.pipeline import codecs
    from tests.deploy.conftest import free_port

    path = tmp_path / "loopline.yaml"
    path.write_text(
        CONFIG.format(
            db=db_url, artifacts=tmp_path / "artifacts", lake=shapes_lake,
            staging_port=free_port(), prod_port=free_port(),
        )
    )  # fmt: skip
    cfg = load_config(path)
    store, artifacts = MetadataStore(cfg.metadata_url()), ArtifactStore(cfg.artifacts_url())
    try:
        # shapes:1 on the bright images only, serving production (no replica test).
        first = build(cfg, stores=(store, artifacts))
        assert first.status == "succeeded" and first.model is not None
        v1 = store.models.get(MODEL, 1)
        ds1 = store.datasets.get(str(store.runs.get(first.run_id).dataset_version))
        assert ds1.n_records == 90  # 2 sites x 45 bright; the 30 dim ones filtered out
        release.promote(store, f"{MODEL}:1", to="production", require_replica_test=False,
                        actor="setup")  # fmt: skip

        traffic = send_production_traffic(store, artifacts, production_shapes, v1.bundle_sha256)
        report = service.run_pass(cfg, store, artifacts, owner=OWNER)
        assert report.errors == []
        fired = {(c["rule"], c["scope"]): c for c in report.changes if c["kind"] == "firing"}
        north, south = scope_name("site", "north"), scope_name("site", "south")
        # The per-site rule measures each site (the global rule covers the whole stream).
        assert set(fired) == {("accuracy-low", "global"), ("site-accuracy-low", north)}
        alert = fired[("accuracy-low", "global")]
        assert (alert["version"], alert["samples"], alert["action"]) == (1, 50, "retrain")
        assert alert["value"] < 0.4
        site_alert = fired[("site-accuracy-low", north)]
        assert (site_alert["value"], site_alert["samples"]) == (0.0, 45)
        by_scope = {m["scope"]: m for m in report.measurements if m["rule"] == "site-accuracy-low"}
        assert set(by_scope) == {north, south}
        assert (by_scope[south]["value"], by_scope[south]["samples"]) == (1.0, 15)
        started = [item for item in report.loops if item["event"] == "started"]
        notified = (site_alert["alert_id"],)
        assert {item["alert_id"] for item in started} == {alert["alert_id"], *notified}
        # The per-site rule only tells the owner (its loops end at once); accuracy-low retrains.
        for alert_id in notified:
            assert loop_of(store, alert_id).status == "succeeded"
        assert stored(store, site_alert["alert_id"]).scope == "site=north"

        moved = service.advance_loops(cfg, store, artifacts, owner=OWNER)
        assert [m["event"] for m in moved] == ["advanced"], moved
        loop = loop_of(store, alert["alert_id"])
        assert (loop.status, loop.step, loop.model_version) == ("succeeded", "done", 2), loop.reason
        steps = [(e["step"], e["status"]) for e in loop.timeline]
        assert steps == [
            ("start", "running"), ("dataset", "succeeded"), ("build", "running"),
            ("build", "succeeded"), ("gate", "succeeded"), ("replica", "running"),
            ("replica", "succeeded"), ("release", "succeeded"), ("canary", "succeeded"),
        ], steps  # direct: serving all traffic at once, no canary to wait for  # fmt: skip

        # shapes:2 was built, triggered by the alert, on a dataset holding dim captures.
        run = store.runs.get(str(loop.run_id))
        assert (run.trigger, run.trigger_ref, run.status) == ("alert", str(alert["alert_id"]),
                                                              "succeeded")  # fmt: skip
        v2 = store.models.get(MODEL, 2)
        assert loop.dataset_version == run.dataset_version != ds1.version
        assert v2.dataset_version == run.dataset_version
        ingest = next(s for s in store.steps.for_run(run.id) if s.step == "ingest")
        ref = ingest.outputs["records"]
        records = codecs.decode(ref["codec"], artifacts.get_bytes(ref["sha256"]))
        captured = {p[len(PREFIX) :] for p in records["path"] if p.startswith(PREFIX)}
        held = set(loop.state["holdout"])
        assert len(held) == 15 and captured == set(traffic.dim_north + traffic.bright_south) - held
        assert len(captured & set(traffic.dim_north)) >= 30
        assert store.captures.count(dataset_version=run.dataset_version) == 45
        lake_rows = records[~records["path"].str.startswith(PREFIX)]
        assert set(lake_rows["lighting"]) == {"bright"} and len(lake_rows) == 90
        gate = loop.state["gate"]
        assert (gate["n"], gate["incumbent"]["version"], gate["candidate"]["version"]) == (
            15, 1, 2,
        )  # fmt: skip
        test = store.replica_tests.latest(MODEL, 2, ["staging"])
        assert test is not None and test.passed and loop.replica_test_id == test.id
        assert test.report["server"]["started"] == "temporary"

        # Production serves shapes:2; the next pass retires shapes:1's alerts.
        assert loop.state["strategy"] == "direct"
        dep = store.deployments.get("production")
        assert dep is not None
        assert (dep.model_name, dep.stable_version, dep.candidate_version) == (MODEL, 2, None)
        after = service.run_pass(cfg, store, artifacts, owner=OWNER)
        assert after.errors == []
        for alert_id in (alert["alert_id"], *notified):
            assert stored(store, alert_id).state == "resolved"

        # alert -> dataset version -> run -> model version -> replica test -> deployment.
        shown = service.alert_report(store, alert["alert_id"])
        chain = [(link["kind"], link["id"]) for link in shown["chain"]]
        assert chain == [
            ("alert", alert["alert_id"]),
            ("dataset_version", run.dataset_version),
            ("run", run.id),
            ("model_version", f"{MODEL}:2"),
            ("replica_test", test.id),
            ("deployment", f"production@{loop.deployment_generation}"),
        ]
        assert all(link.get("at") for link in shown["chain"])
        assert "stable shapes:2" in shown["chain"][-1]["text"]
    finally:
        store.close()


# -- Monitor knows nothing about vehicles -----------------------------------------------------
VEHICLE_WORDS = {"vehicle", "vehicles", "car", "cars", "truck", "trucks", "camera", "cameras"}
# The default segment (``monitor.segments``), and the prediction log's own ``camera_id``
# column, which the stream reads a ``camera_id`` segment from (the Deploy module's schema).
ALLOWED = {("config.py", "camera_id"), ("stream.py", "camera_id")}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of the module, its classes and its functions."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def code_words(source: str) -> list[tuple[int, str, str]]:
    """(line, text, word) for each word of the names and string constants in ``source``
    (docstrings and comments left out); words split at non-letters and at camelCase."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    texts: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            texts.append((line, node.value))
        elif isinstance(node, ast.Name):
            texts.append((line, node.id))
        elif isinstance(node, ast.Attribute):
            texts.append((line, node.attr))
        elif isinstance(node, ast.arg | ast.keyword) and node.arg:
            texts.append((line, node.arg))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            texts.append((line, node.name))
        elif isinstance(node, ast.alias):
            texts.append((line, node.asname or node.name))
    out = []
    for line, text in texts:
        for word in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])", text):
            out.append((line, text, word.lower()))
    return out


def vehicle_names(path: Path) -> list[str]:
    """``file:line: text`` for each vehicle-example word in the code of ``path``."""
    found = []
    for line, text, word in sorted(code_words(path.read_text())):
        if word in VEHICLE_WORDS and (path.name, text) not in ALLOWED:
            found.append(f"{path.name}:{line}: {text!r}")
    return found


def test_the_monitor_code_names_nothing_of_the_vehicle_example() -> None:
    folder = Path(loopline.monitor.__file__).parent
    files = sorted(folder.glob("*.py"))
    assert len(files) > 10
    found = [hit for f in files for hit in vehicle_names(f)]
    assert found == [], "loopline.monitor must stay data-agnostic:\n" + "\n".join(found)


def test_the_vehicle_check_sees_names_and_strings_but_not_docstrings(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Counts vehicles (a docstring: allowed)."""\n'
        "# a comment about cars: allowed\n"
        "def f(truckLoad: int) -> str:\n"
        '    """Trucks, in a docstring."""\n'
        "    camera_id = 1\n"
        '    return "bus or car" + str(camera_id)\n'
    )
    assert vehicle_names(sample) == [
        "sample.py:3: 'truckLoad'",
        "sample.py:5: 'camera_id'",
        "sample.py:6: 'bus or car'",
        "sample.py:6: 'camera_id'",
    ]
    # Words inside other words are not vehicle names.
    sample.write_text('x = "discard scar carry cardinality"\n')
    assert vehicle_names(sample) == []
