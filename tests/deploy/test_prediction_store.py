"""The store's prediction log and feedback methods, on every metadata backend."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from loopline.drivers.metadata.store import MetadataStore


def rows(n: int, start: datetime, version: int = 1, prefix: str = "p") -> list[dict]:
    return [
        {
            "id": f"{prefix}{i:031d}",
            "at": start + timedelta(seconds=i),
            "model_name": "vehicles",
            "model_version": version,
            "source": "v1",
            "label": "car" if i % 2 else "bus",
            "confidence": 0.5 + i / 1000,
            "probabilities": [0.1, 0.2, 0.3, 0.2, 0.2],
            "request_metadata": {"camera_id": f"c{i % 3}"} if i % 2 else None,
            "input_stats": {"brightness": 100.0 + i, "contrast": 20.0},
        }
        for i in range(n)
    ]


def test_log_count_get_and_feedback(db_url: str) -> None:
    store = MetadataStore(db_url)
    t0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
    assert store.predictions.log(rows(50, t0)) == 50
    store.predictions.log(rows(50, t0)[:10])  # a retried flush: no duplicates, no error
    store.predictions.log(rows(5, t0, version=2, prefix="q"))
    assert store.predictions.count() == 55
    assert store.predictions.count("vehicles", 1) == 50
    assert store.predictions.count("vehicles", 1, since=t0 + timedelta(seconds=40)) == 10
    got = store.predictions.find("vehicles", 1, until=t0 + timedelta(seconds=3))
    assert [p.id for p in got] == [f"p{i:031d}" for i in range(3)]
    assert got[1].request_metadata == {"camera_id": "c1"} and got[0].request_metadata is None
    assert got[0].input_stats["brightness"] == 100.0
    assert got[0].probabilities == pytest.approx([0.1, 0.2, 0.3, 0.2, 0.2])

    a, b = f"p{0:031d}", f"p{1:031d}"
    labels = ["car", "van", "truck", "bus", "motorcycle"]
    first = store.predictions.record_feedback(
        [(a, "car"), (b, "bus"), ("nope", "car"), (a, "boat")], labels
    )
    assert [r["status"] for r in first] == ["recorded", "recorded", "error", "error"]
    again = store.predictions.record_feedback([(a, "car"), (b, "van"), (b, "van")], labels)
    assert [r["status"] for r in again] == ["unchanged", "updated", "unchanged"]
    assert store.predictions.feedback([a, b, "nope"]) == {a: "car", b: "van"}
    store.close()


def test_labelled_accuracy_counts_only_the_answers_routed_to_clients(db_url: str) -> None:
    """A canary's judge compares the accuracy of routed answers: shadow answers never
    reached a client, and answers to requests naming their version (a replica test's) are
    neither canary nor stable traffic."""
    store = MetadataStore(db_url)
    t0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)
    logged = []
    for prefix, version, variant in [
        ("s", 1, "stable"), ("c", 2, "canary"), ("h", 2, "shadow"), ("a", 2, "addressed"),
        ("b", 1, "addressed"), ("n", 1, None),
    ]:  # fmt: skip
        batch = rows(4, t0, version=version, prefix=prefix)
        for r in batch:
            r.update(environment="prod", variant=variant)
        logged += batch
    store.predictions.log(logged)
    # Every answer is labelled wrong except the canary's and the addressed ones.
    truth = {r["id"]: r["label"] if r["variant"] in ("canary", "addressed") else "van"
             for r in logged}  # fmt: skip
    store.predictions.record_feedback(list(truth.items()))
    got = store.predictions.labelled_accuracy(
        environment="prod", model_name="vehicles", since=t0, versions=[1, 2]
    )
    assert got == {1: (8, 0), 2: (4, 4)}  # stable + untagged rows; the canary's alone
    store.close()
