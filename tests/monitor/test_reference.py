"""The monitoring reference: built deterministically at package time, calibrated
monotonically, stored in a real bundle in a real artifact store, registered in a real
SQLite store, and read back verified and cached."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from loopline.builder.monitoring import MAX_SAMPLE, encode, reference_payload, softmax
from loopline.bundle import PreprocessSpec, write_bundle
from loopline.drivers.artifacts.store import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.errors import IntegrityError, NotFound
from loopline.images import STAT_NAMES
from loopline.monitor import reference as refmod
from loopline.monitor.reference import Reference, load_reference
from tests.monitor.synthetic_stream import LABELS, make_reference, outputs, stats


def test_the_payload_is_the_same_bytes_for_the_same_inputs() -> None:
    first, _ = make_reference(seed=0)
    again, _ = make_reference(seed=0)
    other, _ = make_reference(seed=1)
    assert encode(first) == encode(again)
    assert encode(first) != encode(other)


def test_the_payload_holds_what_the_monitor_compares_with() -> None:
    rng = np.random.default_rng(0)
    logits, y = outputs(rng, 3000)
    payload = reference_payload(logits, y, LABELS, stats(rng, 5000))
    predicted = logits.argmax(axis=1)
    assert payload["labels"] == LABELS and payload["n"] == 3000
    assert payload["accuracy"] == pytest.approx(float((predicted == y).mean()), abs=1e-6)
    assert sum(payload["class_shares"]) == pytest.approx(1.0, abs=1e-5)
    assert payload["class_shares"][0] == pytest.approx(float((predicted == 0).mean()), abs=1e-6)
    assert len(payload["softmax"]) == MAX_SAMPLE
    assert all(len(row) == 5 and abs(sum(row) - 1) < 1e-3 for row in payload["softmax"])
    assert set(payload["input_stats"]) == set(STAT_NAMES)
    assert all(len(v) == MAX_SAMPLE for v in payload["input_stats"].values())
    json.loads(encode(payload))  # plain JSON, no pickle anywhere


def test_calibration_is_monotone_and_matches_isotonic_regression() -> None:
    rng = np.random.default_rng(0)
    logits, y = outputs(rng, 3000)
    payload = reference_payload(logits, y, LABELS, stats(rng, 100))
    calibration = payload["calibration"]
    curves = [calibration["global"], *calibration["classes"].values()]
    assert set(calibration["classes"]) == set(LABELS)  # ~600 predictions each
    for curve in curves:
        assert np.all(np.diff(curve["x"]) >= 0) and np.all(np.diff(curve["y"]) >= 0)
        assert curve["y"][0] >= 0.0 and curve["y"][-1] <= 1.0
    # Reading the breakpoints back gives what sklearn's own predict gives.
    probs = softmax(logits)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    mask = pred == 2
    iso = IsotonicRegression(out_of_bounds="clip").fit(conf[mask], (y == pred)[mask])
    probe = np.linspace(0.0, 1.0, 301)
    ref = Reference.from_payload(json.loads(encode(payload)))
    got = ref.calibration.p_correct(["truck"] * len(probe), probe)
    np.testing.assert_allclose(got, iso.predict(probe), atol=1e-5)


def test_a_rare_class_uses_the_global_curve() -> None:
    rng = np.random.default_rng(0)
    logits, y = outputs(rng, 1000, shares=[0.97, 0.0075, 0.0075, 0.0075, 0.0075], strength=4.0)
    payload = reference_payload(logits, y, LABELS, stats(rng, 100))
    assert list(payload["calibration"]["classes"]) == ["car"]
    ref = Reference.from_payload(payload)
    conf = np.array([0.5, 0.9, 0.99])
    np.testing.assert_allclose(
        ref.calibration.p_correct(["bus"] * 3, conf), ref.calibration.global_curve(conf)
    )


def test_mismatched_inputs_are_refused() -> None:
    rng = np.random.default_rng(0)
    logits, y = outputs(rng, 50)
    with pytest.raises(ValueError, match="validation logits"):
        reference_payload(logits, y[:40], LABELS, stats(rng, 10))
    with pytest.raises(ValueError, match="image statistics"):
        reference_payload(logits, y, LABELS, stats(rng, 10)[:, :5])
    with pytest.raises(IntegrityError, match="format"):
        Reference.from_payload({"format": "something-else/9"})


# -- read back from a registered bundle ---------------------------------------------------
def bundle_files(monitoring: bytes | None) -> dict[str, bytes]:
    files = {
        "model.onnx": b"not read by the monitor",
        "labels.json": json.dumps(LABELS).encode(),
        "preprocess.json": json.dumps(PreprocessSpec(height=32, width=32).to_dict()).encode(),
        "metadata.json": json.dumps({"name": "vehicles"}).encode(),
    }
    if monitoring is not None:
        files["monitoring.json"] = monitoring
    return files


def register(tmp_path: Path, tar: Path) -> tuple[MetadataStore, ArtifactStore, int]:
    store = MetadataStore(f"sqlite:///{tmp_path / 'loopline.db'}")
    artifacts = ArtifactStore(str(tmp_path / "artifacts"))
    ref = artifacts.put_file(tar)
    mv = store.models.register(
        "vehicles",
        metrics={"accuracy": 0.8},
        bundle_uri=ref.uri,
        bundle_sha256=ref.sha256,
        dataset_version=None,
        run_id=None,
        lineage={},
    )
    return store, artifacts, mv.version.version


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    refmod.clear_cache()


def test_load_reference_reads_the_registered_bundle_and_caches_it(tmp_path: Path) -> None:
    payload, want = make_reference()
    tar = tmp_path / "bundle.tar"
    digest = write_bundle(bundle_files(encode(payload)), tar)
    store, artifacts, version = register(tmp_path, tar)
    got = load_reference(store, artifacts, "vehicles", version)
    assert got is not None and got.bundle_sha256 == digest
    assert got.labels == want.labels and got.accuracy == want.accuracy and got.n == want.n
    assert got.class_shares == want.class_shares
    assert got.input_stats == want.input_stats and got.softmax == want.softmax
    assert got.calibration == want.calibration
    # Cached by the bundle's sha256: the artifact is not read again.
    assert artifacts.delete(digest)
    assert load_reference(store, artifacts, "vehicles", version) is got
    refmod.clear_cache()
    with pytest.raises(NotFound, match="missing"):
        load_reference(store, artifacts, "vehicles", version)


def test_a_bundle_without_monitoring_json_has_no_reference(tmp_path: Path) -> None:
    tar = tmp_path / "bundle.tar"
    write_bundle(bundle_files(None), tar)
    store, artifacts, version = register(tmp_path, tar)
    assert load_reference(store, artifacts, "vehicles", version) is None


def test_a_tampered_monitoring_json_is_refused(tmp_path: Path) -> None:
    """The bundle's manifest lists monitoring.json's sha256; changed content is refused
    even though the tar itself is registered under its own (new) digest."""
    payload, _ = make_reference()
    good = tmp_path / "good.tar"
    write_bundle(bundle_files(encode(payload)), good)
    bad = tmp_path / "bad.tar"
    forged = json.dumps({**payload, "accuracy": 0.99}).encode()
    with tarfile.open(good) as src, tarfile.open(bad, "w", format=tarfile.PAX_FORMAT) as out:
        for member in src.getmembers():
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "monitoring.json":
                data = forged
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    store, artifacts, version = register(tmp_path, bad)
    with pytest.raises(IntegrityError, match="monitoring.json"):
        load_reference(store, artifacts, "vehicles", version)


@pytest.mark.slow
def test_a_real_build_stores_a_reference(project: Path) -> None:
    """A tiny real build: the registered bundle holds monitoring.json, and the monitor
    reads it back."""
    from typer.testing import CliRunner

    from loopline.cli.main import app
    from loopline.config import load_config

    result = CliRunner().invoke(app, ["build", "-c", str(project), "--json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    model = json.loads(result.stdout)["model"]
    config = load_config(project)
    store = MetadataStore(config.metadata_url())
    artifacts = ArtifactStore(config.artifacts_url())
    ref = load_reference(store, artifacts, model["name"], model["version"])
    assert ref is not None and ref.bundle_sha256 == model["bundle_sha256"]
    assert ref.labels == config.data.labels and ref.n > 0
    assert 0.0 <= ref.accuracy <= 1.0
    assert set(ref.input_stats) == set(STAT_NAMES) and len(ref.input_stats["sharpness"]) > 0
    assert len(ref.softmax) == min(ref.n, MAX_SAMPLE)
    conf = np.array([0.2, 0.6, 0.99])
    p = ref.calibration.p_correct([ref.labels[0]] * 3, conf)
    assert np.all(np.diff(p) >= 0) and np.all((p >= 0) & (p <= 1))
