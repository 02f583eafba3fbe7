"""Validate: ETL checks on every record; bad ones are quarantined with a reason each.

Checks: manifest schema (pandera), allowed labels, readable and decodable image, minimum
size, colour channels, duplicate content. The run fails with a clear message when the
quarantined share passes the configured limit or a class is too rare to learn.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import pandera.pandas as pa
from pydantic import BaseModel

from loopline.config import ValidateConfig
from loopline.errors import ValidationFailed
from loopline.pipeline import StepContext


class ValidateParams(ValidateConfig):
    """The validate section plus the allowed labels from ``data.labels``."""

    labels: list[str]


MANIFEST_SCHEMA = pa.DataFrameSchema(
    {
        "path": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        "label": pa.Column(str, nullable=False),
        "sha256": pa.Column(str, pa.Check.str_length(64, 64), nullable=False),
    },
    strict=False,
    coerce=True,
)


def _schema_failures(records: pd.DataFrame) -> dict[int, str]:
    """Row index -> reason for rows that break the manifest schema."""
    try:
        MANIFEST_SCHEMA.validate(records, lazy=True)
    except pa.errors.SchemaErrors as err:
        out: dict[int, str] = {}
        cases = err.failure_cases
        for _, case in cases.iterrows():
            index = case.get("index")
            if index is None or pd.isna(index):
                raise ValidationFailed(
                    f"manifest schema: {case['check']} failed for column {case['column']}"
                ) from None
            reason = (
                "unreadable file"
                if case["column"] == "sha256"
                else (f"schema: {case['column']} fails {case['check']}")
            )
            out.setdefault(int(index), reason)
        return out
    return {}


def _image_check(data: bytes, params: BaseModel) -> str | None:
    from PIL import Image, UnidentifiedImageError

    assert isinstance(params, ValidateConfig)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            width, height = img.size
            mode = img.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        kind = "truncated image" if "truncated" in str(err).lower() else "undecodable image"
        return kind
    if width < params.min_width or height < params.min_height:
        return f"too small ({width}x{height} < {params.min_width}x{params.min_height})"
    if mode not in params.channels:
        return f"channels {mode} not in {','.join(params.channels)}"
    return None


def validate(ctx: StepContext, records: pd.DataFrame, params: ValidateParams) -> dict[str, Any]:
    source = ctx.resources.source
    records = records.reset_index(drop=True)  # index labels are positions from here on
    reasons: dict[int, str] = _schema_failures(records)
    allowed = set(params.labels)
    for i, label in records["label"].items():
        if i in reasons:
            continue
        if not str(label).strip():
            reasons[int(i)] = "unlabelled"
        elif label not in allowed:
            reasons[int(i)] = f"label {label!r} not in {','.join(params.labels)}"
    # Duplicate content: the first valid occurrence stays, later ones are quarantined.
    candidates = records.loc[~records.index.isin(list(reasons)), ["path", "sha256"]]
    originals = candidates.drop_duplicates("sha256")
    first = dict(zip(originals["sha256"], originals["path"], strict=True))
    dups = candidates[candidates["sha256"].duplicated(keep="first")]
    for i, digest in zip(dups.index, dups["sha256"], strict=True):
        reasons[int(i)] = f"duplicate of {first[digest]}"

    paths = records["path"].tolist()
    todo = [i for i in range(len(records)) if i not in reasons]
    bar = ctx.progress(len(todo), "checking images")

    def check(i: int) -> tuple[int, str | None]:
        try:
            data = source.read_bytes(paths[i])
        except Exception as err:
            return i, f"unreadable file: {err}"
        finally:
            bar.advance()
        return i, _image_check(data, params)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for i, reason in pool.map(check, todo):
            if reason:
                reasons[i] = reason
    bar.close()

    quarantined = records.loc[sorted(reasons)].copy()
    quarantined["reason"] = [reasons[i] for i in sorted(reasons)]
    clean = records.drop(index=list(reasons)).reset_index(drop=True)
    by_reason: dict[str, int] = {}
    for r in quarantined["reason"]:
        key = r.split(" (")[0].split(" of ")[0]
        key = "label not allowed" if key.startswith("label ") else key
        by_reason[key] = by_reason.get(key, 0) + 1
    share = len(quarantined) / max(len(records), 1)
    per_class = {label: int((clean["label"] == label).sum()) for label in params.labels}
    report: dict[str, Any] = {
        "records": len(records),
        "valid": len(clean),
        "quarantined": len(quarantined),
        "quarantined_share": round(share, 4),
        "by_reason": dict(sorted(by_reason.items())),
        "per_class": per_class,
    }
    ctx.log(
        f"{len(clean)} valid, {len(quarantined)} quarantined ({share:.1%}): "
        + ", ".join(f"{k} {v}" for k, v in report["by_reason"].items())
    )
    if share > params.max_quarantine_share:
        raise ValidationFailed(
            f"validation quarantined {share:.1%} of {len(records)} records, over the limit "
            f"validate.max_quarantine_share={params.max_quarantine_share:g} "
            f"({', '.join(f'{k}: {v}' for k, v in report['by_reason'].items())})"
        )
    total = max(len(clean), 1)
    rare = [f"{k} ({v})" for k, v in per_class.items() if v / total < params.min_class_share]
    if rare:
        raise ValidationFailed(
            f"class balance: {', '.join(rare)} below validate.min_class_share="
            f"{params.min_class_share:g} of {len(clean)} valid records"
        )
    return {"clean": clean, "quarantine": quarantined.reset_index(drop=True), "report": report}
