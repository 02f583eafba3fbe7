"""Split: train / validation / test by content hash, so adding data never leaks a record
into test.

A record's split is a pure function of the sha256 of its file and ``split.seed``:
``u = int(sha256(f"{seed}:{file_sha256}")[:16], 16) / 2**64`` lands in test below
``split.test``, in val below ``split.test + split.val``, else in train. Records with the same
content share a split.

Stratification is statistical: each class's shares follow a binomial around the configured
ones (about ±2.5 points for 200 records of a class at 15 %) instead of being rounded exactly.
A class with at least 3 distinct images gets at least one test and one val image: when no
image of the class falls in test, the one with the smallest ``u`` is promoted there; then,
when none falls in val, the smallest left outside test. A class with no train image is an
error.

What adding records guarantees, precisely (``tests/builder/test_split.py`` checks it):

- A record whose class already had at least 3 distinct images never moves from train into
  val or test, nor from val into test. Without promotion (every class large enough to have
  test and val images by hash) no existing record moves at all.
- A promoted record may move back out of test or val, to where its ``u`` puts it (val or
  train), when a new image of its class takes its place. So a model trained on one dataset
  version never finds its training images in a later version's val or test split (classes
  of fewer than 3 images aside, below), but a later model may train on a record an earlier
  one was tested on.
- A class reaching 3 distinct images for the first time has had no test or val image yet;
  up to two of its existing (train) images are then promoted, one into test, one into val.
"""

from __future__ import annotations

import pandas as pd

from loopline.config import SplitConfig
from loopline.digest import sha256_bytes
from loopline.errors import ValidationFailed
from loopline.pipeline import StepContext

SPLITS = ("train", "val", "test")


def split_unit(seed: int, sha256: str) -> float:
    """A uniform number in [0, 1) drawn from a record's content hash and the seed."""
    return int(sha256_bytes(f"{seed}:{sha256}".encode())[:16], 16) / 2**64


def assign(shas: pd.Series, labels: pd.Series, params: SplitConfig) -> pd.Series:
    """The split of each record from its file's sha256 and its label (see the docstring)."""
    unit = {sha: split_unit(params.seed, sha) for sha in shas.unique()}
    cut_test, cut_val = params.test, params.test + params.val
    where = {
        sha: "test" if u < cut_test else "val" if u < cut_val else "train"
        for sha, u in unit.items()
    }
    for label, group in shas.groupby(labels, sort=True):
        ordered = sorted(set(group), key=lambda sha: (unit[sha], sha))
        if len(ordered) >= 3:
            if not any(where[sha] == "test" for sha in ordered):
                where[ordered[0]] = "test"
            if not any(where[sha] == "val" for sha in ordered):
                where[next(sha for sha in ordered if where[sha] != "test")] = "val"
        if not any(where[sha] == "train" for sha in ordered):
            raise ValidationFailed(
                f"class {label!r} has {len(ordered)} distinct valid image(s) and none falls in "
                f"train with split.seed={params.seed}; add images of it or change split.seed"
            )
    return shas.map(where)


def split(ctx: StepContext, clean: pd.DataFrame, params: SplitConfig) -> pd.DataFrame:
    out = clean.reset_index(drop=True)  # index labels are positions from here on
    out["split"] = assign(out["sha256"], out["label"], params).to_numpy()
    counts = out["split"].value_counts().to_dict()
    ctx.log(", ".join(f"{k} {counts.get(k, 0)}" for k in SPLITS))
    return out
