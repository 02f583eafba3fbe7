"""Split stability: a record's split is a function of its content hash and the seed."""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter

import pandas as pd
import pytest

from loopline.builder.split import assign, split, split_unit
from loopline.config import SplitConfig
from loopline.errors import ValidationFailed
from loopline.pipeline import StepContext
from loopline.pipeline.step import SilentReporter

LABELS = ["car", "van", "truck", "bus", "motorcycle"]
CTX = StepContext(run_id="r", step="split", reporter=SilentReporter())


def records(n: int, start: int = 0, labels: list[str] = LABELS) -> pd.DataFrame:
    """``n`` records with distinct content hashes, classes in turn."""
    rows = [
        {
            "path": f"img/{i:05d}.png",
            "label": labels[i % len(labels)],
            "sha256": hashlib.sha256(f"image {i}".encode()).hexdigest(),
        }
        for i in range(start, start + n)
    ]
    return pd.DataFrame(rows)


def by_path(df: pd.DataFrame) -> dict[str, str]:
    return dict(zip(df["path"], df["split"], strict=True))


def test_adding_a_record_moves_no_existing_record() -> None:
    params = SplitConfig()
    table = records(1000)
    before = by_path(split(CTX, table, params))
    after = by_path(split(CTX, pd.concat([table, records(1, start=1000)]), params))
    moved = [p for p, s in before.items() if after[p] != s]
    assert moved == []
    assert len(after) == 1001
    # And the order the records come in does not matter.
    shuffled = table.sample(frac=1.0, random_state=5)
    assert by_path(split(CTX, shuffled, params)) == before


def test_shares_per_class_are_close_to_the_configured_ones() -> None:
    params = SplitConfig(train=0.7, val=0.15, test=0.15)
    out = split(CTX, records(2000), params)
    for _label, group in out.groupby("label"):
        n = len(group)
        counts = group["split"].value_counts()
        for name, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            sigma = math.sqrt(n * share * (1 - share))
            assert abs(counts[name] - n * share) <= 4 * sigma, (name, counts[name], n)


def test_the_seed_changes_the_split_and_is_the_only_other_input() -> None:
    table = records(300)
    a = split(CTX, table, SplitConfig(seed=1))["split"]
    b = split(CTX, table, SplitConfig(seed=2))["split"]
    assert (a != b).sum() > 50
    u = split_unit(1, table["sha256"][0])
    assert 0.0 <= u < 1.0 and u == split_unit(1, table["sha256"][0])


def test_duplicate_content_lands_in_the_same_split() -> None:
    table = records(200)
    copies = table.iloc[:50].copy()
    copies["path"] = copies["path"].str.replace("img/", "copy/")
    out = split(CTX, pd.concat([table, copies]), SplitConfig())
    got = by_path(out)
    for path in table["path"][:50]:
        assert got[path] == got[path.replace("img/", "copy/")]


def test_a_small_class_keeps_a_test_and_a_val_record() -> None:
    # Find a seed under which the 3-record class falls entirely in train by hash alone.
    small = records(3, labels=["bus"])
    seed = next(s for s in range(1000) if all(split_unit(s, sha) >= 0.3 for sha in small["sha256"]))
    params = SplitConfig(seed=seed)
    out = split(CTX, pd.concat([records(100, labels=["car"]), small]), params)
    bus = out[out["label"] == "bus"]
    assert sorted(bus["split"]) == ["test", "train", "val"]
    # The promoted ones are those with the smallest hash units, test first.
    ordered = bus.assign(u=[split_unit(seed, s) for s in bus["sha256"]]).sort_values("u")
    assert list(ordered["split"]) == ["test", "val", "train"]


def test_growing_small_classes_never_moves_a_record_into_test_or_train_into_val() -> None:
    rank = {"train": 0, "val": 1, "test": 2}
    rng = random.Random(0)
    params = SplitConfig()
    for trial in range(200):
        n = rng.randint(3, 12)
        shas = pd.Series([hashlib.sha256(f"{trial}:{i}".encode()).hexdigest() for i in range(n)])
        labels = pd.Series(["bus"] * n)
        try:
            before = dict(zip(shas, assign(shas, labels, params), strict=True))
        except ValidationFailed:
            continue
        more = pd.concat([shas, pd.Series([f"{trial}:new:{i}" for i in range(rng.randint(1, 5))])])
        more = more.reset_index(drop=True)
        after = dict(zip(more, assign(more, pd.Series(["bus"] * len(more)), params), strict=True))
        for sha, where in before.items():
            assert rank[after[sha]] <= rank[where], (trial, sha, where, after[sha])


def test_a_class_with_no_train_record_is_an_error() -> None:
    pair = records(2, labels=["bus"])
    seed = next(s for s in range(1000) if all(split_unit(s, x) < 0.3 for x in pair["sha256"]))
    with pytest.raises(ValidationFailed, match="class 'bus' has 2 distinct valid image"):
        split(CTX, pair, SplitConfig(seed=seed))


def test_growing_data_step_by_step_never_moves_a_record_towards_test() -> None:
    """Records added in batches over classes of every size, small ones (3-10) included.

    The guarantee (see ``loopline.builder.split``): a record whose class had at least 3
    distinct images never moves from train into val or test, nor from val into test; only
    a class reaching 3 images for the first time may promote up to two existing images.
    """
    rank = {"train": 0, "val": 1, "test": 2}
    rng = random.Random(11)
    params = SplitConfig()
    # Target sizes: two large classes, three small ones (3-10), one growing from 1 image.
    sizes = {"car": 400, "van": 150, "truck": 10, "bus": 6, "motorcycle": 3, "tram": 12}
    pending = [(label, i) for label, n in sizes.items() for i in range(n)]
    rng.shuffle(pending)
    rows: list[dict[str, str]] = []
    before: dict[str, str] = {}
    moves = {"towards_train": 0, "promotions": 0}
    checked = 0
    while pending:
        n = rng.randint(1, 25)
        batch, pending = pending[:n], pending[n:]
        rows += [
            {"path": f"{label}/{i}", "label": label, "sha256": _sha(f"{label}:{i}")}
            for label, i in batch
        ]
        table = pd.DataFrame(rows)
        distinct = table.groupby("label")["sha256"].nunique().to_dict()
        try:
            after = by_path(split(CTX, table, params))
        except ValidationFailed:  # a class of 1-2 images with none in train yet
            continue
        label_of = dict(zip(table["path"], table["label"], strict=True))
        had = Counter(label_of[p] for p in before)
        promoted: Counter[str] = Counter()
        for path, where in before.items():
            now = after[path]
            if rank[now] > rank[where]:
                # Only when the class reaches 3 images for the first time, at most two.
                label = label_of[path]
                assert had[label] < 3 <= distinct[label], (path, where, now)
                promoted[label] += 1
                assert promoted[label] <= 2
                moves["promotions"] += 1
            elif rank[now] < rank[where]:
                moves["towards_train"] += 1
            checked += 1
        before = after
    assert len(before) == sum(sizes.values())
    assert checked > 5_000  # many records re-split, step after step
    assert moves["towards_train"] > 0, moves  # promoted records moved back: the test saw it


def test_the_one_exception_a_class_reaching_three_images_promotes_existing_ones() -> None:
    """Documented, not wanted: with 2 images a class has no test or val image to keep;
    at 3 the smallest ``u`` goes to test and the next to val, existing images included."""
    params = SplitConfig()
    train_only = (
        f"bus {i}" for i in range(10_000) if split_unit(params.seed, _sha(f"bus {i}")) >= 0.3
    )
    shas = [_sha(next(train_only)) for _ in range(3)]
    big = records(100, labels=["car"])
    two = pd.concat([big, pd.DataFrame({"path": ["b0", "b1"], "label": "bus", "sha256": shas[:2]})])
    three = pd.concat([two, pd.DataFrame({"path": ["b2"], "label": "bus", "sha256": shas[2:]})])
    before, after = by_path(split(CTX, two, params)), by_path(split(CTX, three, params))
    assert (before["b0"], before["b1"]) == ("train", "train")
    assert sorted(after[p] for p in ("b0", "b1", "b2")) == ["test", "train", "val"]
    assert {p: after[p] for p in before if p.startswith("img/")} == {
        p: s for p, s in before.items() if p.startswith("img/")
    }  # the large class is untouched


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
