"""The torch-free Build steps on the tiny lake: ingest, validate, split, gate rules."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from loopline.builder.gate import check_rules, lookup, parse_rule
from loopline.builder.ingest import dataset_version, ingest
from loopline.builder.pipeline import build_pipeline
from loopline.builder.resources import BuildResources
from loopline.builder.split import split
from loopline.builder.validate import validate
from loopline.config import Config, parse_config
from loopline.drivers.artifacts import ArtifactStore
from loopline.drivers.metadata.store import MetadataStore
from loopline.errors import ConfigError, ValidationFailed
from loopline.pipeline import StepContext
from loopline.pipeline.step import SilentReporter


def make_config(tmp_path: Path, lake: Path, **overrides: object) -> Config:
    data: dict = {"data": {"source": {"uri": str(lake)}}}
    for key, value in overrides.items():
        section, field = key.split("__")
        data.setdefault(section, {})[field] = value
    return parse_config(data, tmp_path)


def make_ctx(tmp_path: Path, lake: Path, **overrides: object) -> tuple[StepContext, Config]:
    """A step context over ``lake`` (read-only resources, as the runner gives) and its config."""
    config = make_config(tmp_path, lake, **overrides)
    store = MetadataStore(f"sqlite:///{tmp_path / 'm.db'}")
    res = BuildResources(config, store, ArtifactStore(str(tmp_path / "a"))).for_steps()
    return StepContext(run_id="run1", step="test", reporter=SilentReporter(), resources=res), config


def step_sections(config: Config) -> dict[str, Any]:
    """Each step's params as the runner selects them from ``config``."""
    raw = config.to_dict()
    sections = {s.name: s.select_params(raw) for s in build_pipeline()}
    return {"data": sections["ingest"], **sections}


def test_ingest_versions_by_content(tmp_path: Path, tiny_lake: Path) -> None:
    ctx, config = make_ctx(tmp_path, tiny_lake)
    sections = step_sections(config)
    first = ingest(ctx, sections["data"])
    again = ingest(ctx, sections["data"])
    records = first["records"]
    assert first["dataset"]["version"] == again["dataset"]["version"]
    assert {"path", "label", "sha256", "bytes", "camera_id", "condition"} <= set(records.columns)
    assert len(records) == first["dataset"]["n_records"]
    # Order does not matter; content does.
    shuffled = records.sample(frac=1.0, random_state=3)
    assert dataset_version(shuffled) == first["dataset"]["version"]
    changed = records.copy()
    changed.loc[0, "label"] = "bus" if changed.loc[0, "label"] != "bus" else "car"
    assert dataset_version(changed) != first["dataset"]["version"]
    assert first["dataset"]["records_sha256"] and first["dataset"]["stats"]["labels"]


def test_ingest_filter_and_unknown_filter_column(tmp_path: Path, tiny_lake: Path) -> None:
    ctx, config = make_ctx(tmp_path, tiny_lake, data__filter={"condition": ["day"]})
    out = ingest(ctx, config.data)
    assert set(out["records"]["condition"]) == {"day"}
    ctx, config = make_ctx(tmp_path / "b", tiny_lake, data__filter={"weather": ["x"]})
    with pytest.raises(ConfigError, match="weather"):
        ingest(ctx, config.data)


def test_validate_quarantines_each_defect_with_a_reason(tmp_path: Path, tiny_lake: Path) -> None:
    ctx, config = make_ctx(tmp_path, tiny_lake, validate__max_quarantine_share=0.5)
    sections = step_sections(config)
    records = ingest(ctx, sections["data"])["records"]
    out = validate(ctx, records, sections["validate"])
    q, report = out["quarantine"], out["report"]
    reasons = set(report["by_reason"])
    assert {"unlabelled", "duplicate", "undecodable image"} <= reasons | {
        r for r in reasons if r.startswith("truncated")
    }
    assert any(r.startswith("too small") for r in reasons)
    assert report["valid"] + report["quarantined"] == len(records)
    assert len(out["clean"]) == report["valid"]
    assert not set(out["clean"]["path"]) & set(q["path"])
    assert q["reason"].str.len().min() > 0
    manifest = pd.read_csv(tiny_lake / "manifest.csv", dtype=str, keep_default_na=False)
    unlabelled = set(manifest.loc[manifest["label"] == "", "path"])
    assert unlabelled <= set(q["path"])


def test_validate_fails_over_the_quarantine_limit(tmp_path: Path, tiny_lake: Path) -> None:
    ctx, config = make_ctx(tmp_path, tiny_lake, validate__max_quarantine_share=0.0)
    sections = step_sections(config)
    records = ingest(ctx, sections["data"])["records"]
    with pytest.raises(ValidationFailed, match="max_quarantine_share"):
        validate(ctx, records, sections["validate"])


def test_validate_refuses_labels_outside_the_allowed_list(tmp_path: Path, tiny_lake: Path) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(tiny_lake, lake)
    manifest = pd.read_csv(lake / "manifest.csv", dtype=str, keep_default_na=False)
    manifest.loc[manifest.index[:5], "label"] = "tractor"
    manifest.to_csv(lake / "manifest.csv", index=False)
    ctx, config = make_ctx(tmp_path, lake, validate__max_quarantine_share=0.5)
    sections = step_sections(config)
    out = validate(ctx, ingest(ctx, sections["data"])["records"], sections["validate"])
    assert (out["quarantine"]["reason"].str.contains("tractor")).sum() >= 4


def test_validate_class_balance(tmp_path: Path, tiny_lake: Path) -> None:
    ctx, config = make_ctx(
        tmp_path, tiny_lake, validate__max_quarantine_share=0.5, validate__min_class_share=0.5
    )
    sections = step_sections(config)
    records = ingest(ctx, sections["data"])["records"]
    with pytest.raises(ValidationFailed, match="class balance"):
        validate(ctx, records, sections["validate"])


def test_split_is_stratified_seeded_and_complete(tmp_path: Path, tiny_lake: Path) -> None:
    ctx, config = make_ctx(tmp_path, tiny_lake, validate__max_quarantine_share=0.5)
    sections = step_sections(config)
    clean = validate(ctx, ingest(ctx, sections["data"])["records"], sections["validate"])["clean"]
    a = split(ctx, clean, sections["split"])
    b = split(ctx, clean.sample(frac=1.0, random_state=1), sections["split"])
    assert len(a) == len(clean)
    assert dict(zip(a["path"], a["split"], strict=True)) == dict(
        zip(b["path"], b["split"], strict=True)
    )
    for _, group in a.groupby("label"):
        shares = group["split"].value_counts(normalize=True)
        # Hash-based: each class's train share is binomial around 0.7.
        assert abs(shares["train"] - 0.7) <= 4 * (0.7 * 0.3 / len(group)) ** 0.5
        assert shares.get("test", 0) > 0 and shares.get("val", 0) > 0
    other = parse_config({"split": {"seed": 99}}, tmp_path).split
    c = split(ctx, clean, other)
    assert list(c["split"]) != list(a["split"])


def test_gate_rules_parse_and_check() -> None:
    report = {
        "macro_precision": 0.9,
        "per_class": {"bus": {"recall": 0.5}},
        "segments": {"condition": {"fog": {"accuracy": 0.3}}},
    }
    assert parse_rule("macro_precision >= 0.80") == ("macro_precision", ">=", 0.8)
    checked = check_rules(
        report,
        [
            "macro_precision >= 0.8",
            "per_class.bus.recall > 0.6",
            "segments.condition.fog.accuracy < 0.5",
        ],
    )
    assert [c["passed"] for c in checked] == [True, False, True]
    assert lookup(report, "per_class.bus.recall") == 0.5
    with pytest.raises(ConfigError, match="METRIC OP NUMBER"):
        parse_rule("precision is great")
    with pytest.raises(ConfigError, match="not in the evaluation report"):
        lookup(report, "macro_recall")
