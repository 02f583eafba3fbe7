"""The captures data source on real stores: captured blobs in the artifact store, joined with
their predictions and feedback labels (SQLite and PostgreSQL); the union with a lake, and
``data.filter`` applied to the primary source only."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from loopline.builder.ingest import ingest, source_modules
from loopline.builder.resources import StepResources
from loopline.config import parse_config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.data import open_source
from loopline.drivers.data.captures import CapturesSource
from loopline.drivers.data.union import UnionSource
from loopline.drivers.metadata.store import MetadataStore
from loopline.errors import DataSourceError, IntegrityError
from loopline.pipeline import StepContext
from loopline.pipeline.step import SilentReporter

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LABELS = ["car", "van", "truck", "bus", "motorcycle"]


def png(seed: int, size: int = 12) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def seed_captures(
    store: MetadataStore,
    artifacts: ArtifactStore,
    images: list[bytes],
    *,
    labels: list[str | None],
    start: datetime = T0,
    step_s: float = 1.0,
    environment: str = "production",
    model_name: str = "tiny",
    version: int = 1,
    predicted: Callable[[int], str] = lambda i: "car",
) -> list[str]:
    """Log one prediction per image (``start`` + i * ``step_s``), capture its image (rows
    first, then blobs, as the server does) and record the labels that are not None."""
    ids = [uuid.uuid4().hex for _ in images]
    times = [start + timedelta(seconds=i * step_s) for i in range(len(images))]
    store.predictions.log(
        [
            {"id": pid, "at": at, "model_name": model_name, "model_version": version,
             "source": "http", "label": predicted(i), "confidence": 0.9,
             "probabilities": None, "request_metadata": {"camera_id": f"cam-{i % 2}"},
             "input_stats": None, "environment": environment, "deployment_generation": 1,
             "variant": "stable", "camera_id": f"cam-{i % 2}"}
            for i, (pid, at) in enumerate(zip(ids, times, strict=True))
        ]
    )  # fmt: skip
    from loopline.digest import sha256_bytes

    store.captures.record(
        [
            {"prediction_id": pid, "sha256": sha256_bytes(data), "bytes": len(data),
             "media_type": "image/png", "environment": environment, "at": at,
             "expires_at": at + timedelta(days=30)}
            for pid, data, at in zip(ids, images, times, strict=True)
        ]
    )  # fmt: skip
    for data in images:
        artifacts.put_bytes(data, durable=False)
    given = [(pid, label) for pid, label in zip(ids, labels, strict=True) if label is not None]
    if given:
        results = store.predictions.record_feedback(given)
        assert all(r["status"] in ("recorded", "updated", "unchanged") for r in results)
    return ids


@dataclass
class Stores:
    url: str
    root: Path
    store: MetadataStore
    artifacts: ArtifactStore


@pytest.fixture
def stores(db_url: str, tmp_path: Path) -> Iterator[Stores]:
    store = MetadataStore(db_url)
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    yield Stores(db_url, tmp_path, store, artifacts)
    store.close()


def source(s: Stores, **kw: Any) -> CapturesSource:
    return CapturesSource(environment="production", store=s.store, artifacts=s.artifacts, **kw)


def test_lists_labelled_captures_of_the_environment_and_model_in_the_time_range(
    stores: Stores,
) -> None:
    images = [png(i) for i in range(6)]
    ids = seed_captures(stores.store, stores.artifacts, images,
                        labels=["car", None, "bus", "van", "truck", "car"])  # fmt: skip
    seed_captures(stores.store, stores.artifacts, [png(10)], labels=["car"], environment="staging")
    seed_captures(stores.store, stores.artifacts, [png(11)], labels=["car"], model_name="other")

    df = source(stores, model_name="tiny").list_records()
    assert list(df.columns) == ["path", "label", "camera_id", "captured_at", "predicted_at",
                                "environment", "model_version", "sha256"]  # fmt: skip
    # Unlabelled (ids[1]), other environments and other models are left out; oldest first.
    assert df["path"].tolist() == [f"captures/{ids[i]}" for i in (0, 2, 3, 4, 5)]
    assert df["label"].tolist() == ["car", "bus", "van", "truck", "car"]
    assert set(df["environment"]) == {"production"} and set(df["model_version"]) == {"1"}
    assert df["camera_id"].tolist() == ["cam-0", "cam-0", "cam-1", "cam-0", "cam-1"]
    from loopline.digest import sha256_bytes

    assert df["sha256"].tolist() == [sha256_bytes(images[i]) for i in (0, 2, 3, 4, 5)]
    assert datetime.fromisoformat(df["predicted_at"].iloc[0]) == T0

    # [since, until): prediction times T0+2s, T0+3s; until is exclusive.
    ranged = source(stores, model_name="tiny", since=T0 + timedelta(seconds=2),
                    until=T0 + timedelta(seconds=4)).list_records()  # fmt: skip
    assert ranged["path"].tolist() == [f"captures/{ids[2]}", f"captures/{ids[3]}"]
    # Without a model, every model's captures of the environment.
    assert len(source(stores).list_records()) == 6


def test_read_bytes_serves_listed_blobs_verified_and_refuses_anything_else(
    stores: Stores,
) -> None:
    images = [png(i) for i in range(3)]
    ids = seed_captures(stores.store, stores.artifacts, images, labels=["car", None, "bus"])
    other = seed_captures(stores.store, stores.artifacts, [png(9)], labels=["car"],
                          environment="staging")  # fmt: skip
    src = source(stores)
    assert src.read_bytes(f"captures/{ids[0]}") == images[0]  # read before any listing
    for path in (f"captures/{ids[1]}", f"captures/{other[0]}", "captures/../secret",
                 "images/0.png", f"{ids[0]}"):  # fmt: skip
        with pytest.raises(DataSourceError, match="is not a labelled capture"):
            src.read_bytes(path)
    # A blob whose bytes changed is refused by the artifact store's check on read.
    from loopline.digest import sha256_bytes

    digest = sha256_bytes(images[2])
    blob = Path(stores.artifacts.root) / "sha256" / digest[:2] / digest
    blob.write_bytes(png(99))
    with pytest.raises(IntegrityError, match="corrupt or tampered"):
        src.read_bytes(f"captures/{ids[2]}")
    blob.unlink()
    with pytest.raises(DataSourceError, match="listed but its image"):
        src.read_bytes(f"captures/{ids[2]}")


def test_fingerprint_changes_with_labels_and_labelled_captures_only(stores: Stores) -> None:
    ids = seed_captures(stores.store, stores.artifacts, [png(0), png(1)], labels=["car", None])
    src = source(stores)
    first = src.fingerprint()
    assert src.fingerprint() == first
    seed_captures(stores.store, stores.artifacts, [png(2)], labels=[None])  # unlabelled
    assert src.fingerprint() == first
    stores.store.predictions.record_feedback([(ids[1], "bus")])  # a late label
    second = src.fingerprint()
    assert second != first
    stores.store.predictions.record_feedback([(ids[0], "van")])  # a corrected label
    assert src.fingerprint() not in (first, second)


def test_a_captures_entry_opens_over_the_configs_own_stores(stores: Stores) -> None:
    ids = seed_captures(stores.store, stores.artifacts, [png(0)], labels=["car"])
    cfg = parse_config(
        {"store": {"metadata_url": stores.url, "artifacts_url": str(stores.artifacts.url)},
         "data": {"source": {"kind": "captures", "environment": "production",
                             "model_name": "tiny", "since": T0.isoformat()}}},
        stores.root,
    )  # fmt: skip
    src = open_source(cfg)
    assert isinstance(src, CapturesSource)
    assert src.uri == "captures://production?model=tiny&since=2025-03-01T12%3A00%3A00%2B00%3A00"
    assert src.list_records()["path"].tolist() == [f"captures/{ids[0]}"]
    with pytest.raises(DataSourceError, match="needs environment"):
        open_source(parse_config({"data": {"source": {"kind": "captures"}}}, stores.root))
    with pytest.raises(DataSourceError, match="not an ISO-8601 time"):
        open_source(parse_config({"data": {"source": {"kind": "captures",
                    "environment": "production", "since": "yesterday"}}}, stores.root))  # fmt: skip


# -- the union with a lake -----------------------------------------------------------------
def _lake(root: Path) -> Path:
    import csv

    lake = root / "lake"
    (lake / "img").mkdir(parents=True)
    rows = []
    for i, (label, cond) in enumerate([("car", "day"), ("bus", "night"), ("van", "day")]):
        (lake / "img" / f"{i}.png").write_bytes(png(100 + i))
        rows.append({"path": f"img/{i}.png", "label": label, "condition": cond})
    with open(lake / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "condition"])
        writer.writeheader()
        writer.writerows(rows)
    return lake


def _config(s: Stores, lake: Path, **data: Any) -> Any:
    return parse_config(
        {"store": {"metadata_url": s.url, "artifacts_url": str(s.artifacts.url)},
         "data": {"source": {"kind": "lake", "uri": str(lake)},
                  "also": [{"kind": "captures", "environment": "production",
                            "model_name": "tiny"}], **data}},
        s.root,
    )  # fmt: skip


def test_union_appends_captures_and_ingest_filters_the_primary_only(stores: Stores) -> None:
    lake = _lake(stores.root)
    images = [png(0), png(1)]
    ids = seed_captures(stores.store, stores.artifacts, images, labels=["truck", "car"])
    cfg = _config(stores, lake, filter={"condition": ["day"]})
    src = open_source(cfg)
    assert isinstance(src, UnionSource)
    assert src.uri == f"{lake} + captures://production?model=tiny"
    listed = src.list_records()
    assert listed["path"].tolist() == ["img/0.png", "img/1.png", "img/2.png",
                                       *(f"captures/{i}" for i in ids)]  # fmt: skip
    # Each read goes to the source that lists the path.
    assert src.read_bytes("img/1.png") == (lake / "img" / "1.png").read_bytes()
    assert src.read_bytes(f"captures/{ids[1]}") == images[1]
    with pytest.raises(DataSourceError, match="not listed by any source"):
        src.read_bytes("captures/unknown")

    ctx = StepContext("run", "ingest", SilentReporter(),
                      StepResources(src, stores.artifacts, lambda n, a: None))  # fmt: skip
    out = ingest(ctx, cfg.data)
    records = out["records"]
    # The filter (condition: day) keeps lake rows 0 and 2; captures lack the column and
    # are all kept.
    assert records["path"].tolist() == ["img/0.png", "img/2.png",
                                        *(f"captures/{i}" for i in ids)]  # fmt: skip
    assert records["condition"].tolist() == ["day", "day", "", ""]
    assert records["label"].tolist() == ["car", "van", "truck", "car"]
    assert (records["bytes"] > 0).all()
    assert out["dataset"]["source"] == src.uri

    # The fingerprint combines every source's: a new label changes it.
    before = src.fingerprint()
    stores.store.predictions.record_feedback([(ids[0], "bus")])
    assert src.fingerprint() != before
    # Every source module is in ingest's code version.
    assert source_modules(cfg.data) == [
        "loopline.drivers.data.lake",
        "loopline.drivers.data.captures",
        "loopline.drivers.data.union",
    ]
    assert source_modules(parse_config({}, stores.root).data) == ["loopline.drivers.data.lake"]


def test_union_refuses_a_path_two_sources_list(stores: Stores) -> None:
    lake = _lake(stores.root)
    ids = seed_captures(stores.store, stores.artifacts, [png(0)], labels=["car"])
    (lake / "captures").mkdir()
    (lake / "captures" / ids[0]).write_bytes(png(0))
    with open(lake / "manifest.csv", "a") as f:
        f.write(f"captures/{ids[0]},car,day\n")
    src = open_source(_config(stores, lake))
    with pytest.raises(DataSourceError, match=f"captures/{ids[0]}' is listed by both"):
        src.list_records()
