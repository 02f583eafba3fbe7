"""Split: a stratified, seeded train / validation / test assignment, recorded per record."""

from __future__ import annotations

import numpy as np
import pandas as pd

from loopline.config import SplitConfig
from loopline.errors import ValidationFailed
from loopline.pipeline import StepContext


def split(ctx: StepContext, clean: pd.DataFrame, params: SplitConfig) -> pd.DataFrame:
    rng = np.random.default_rng(params.seed)
    clean = clean.reset_index(drop=True)  # index labels are positions from here on
    assignment = np.empty(len(clean), dtype=object)
    # Sort by path first so the split depends on content, not on listing order.
    ordered = clean.sort_values("path", kind="stable")
    for label, group in ordered.groupby("label", sort=True):
        idx = group.index.to_numpy().copy()
        rng.shuffle(idx)
        n = len(idx)
        n_test = max(1, round(n * params.test)) if n >= 3 else 0
        n_val = max(1, round(n * params.val)) if n >= 3 else 0
        if n - n_test - n_val < 1:
            raise ValidationFailed(f"class {label!r} has only {n} valid records; need at least 3")
        assignment[idx[:n_test]] = "test"
        assignment[idx[n_test : n_test + n_val]] = "val"
        assignment[idx[n_test + n_val :]] = "train"
    out = clean.copy()
    out["split"] = assignment
    counts = out["split"].value_counts().to_dict()
    ctx.log(", ".join(f"{k} {counts.get(k, 0)}" for k in ("train", "val", "test")))
    return out
