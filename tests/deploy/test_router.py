"""Routing between versions in process: real tiny ONNX models behind their own batchers.

No HTTP here: ``Router.submit`` is what every predict endpoint awaits, so these tests call
it directly, on a real event loop, with real lanes (ONNX Runtime sessions and batchers).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from loopline.deploy.lanes import make_batcher
from loopline.deploy.metrics import ServerMetrics
from loopline.deploy.predlog import PredictionLog
from loopline.deploy.router import (
    Lane,
    NotReady,
    Router,
    deployment_table,
    empty_table,
    static_table,
    sticky_bucket,
)
from loopline.deploy.runtime import ModelRuntime, ServedModel
from loopline.deploy.settings import ServeSettings
from loopline.drivers.metadata.deployments import DeploymentState
from loopline.errors import InvalidInput, NotFound
from tests.deploy.conftest import LABELS
from tests.deploy.models import SIZE, constant_model, failing_model, good_model, images


def served_model(model: bytes, version: int, root: Path) -> ServedModel:
    from loopline.bundle import PreprocessSpec, extract_bundle, load_bundle, write_bundle

    files = {
        "model.onnx": model,
        "labels.json": json.dumps(LABELS).encode(),
        "preprocess.json": json.dumps(PreprocessSpec(height=SIZE, width=SIZE).to_dict()).encode(),
        "metadata.json": b"{}",
    }
    tar = root / f"v{version}.tar"
    digest = write_bundle(files, tar)
    bundle = load_bundle(extract_bundle(tar, root / f"v{version}"))
    runtime = ModelRuntime(bundle.model_path, bundle.labels, bundle.preprocess)
    return ServedModel("vehicles", version, bundle, digest, runtime)


class Lanes:
    """Started lanes by version, each logging its rows to ``rows``; stopped at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows: list[dict[str, Any]] = []
        self.log = PredictionLog(self.rows.extend, flush_interval_s=3600, spill_dir=root)
        self.lanes: dict[int, Lane] = {}

    def add(self, version: int, model: bytes, environment: str | None = "prod") -> Lane:
        served = served_model(model, version, self.root)
        metrics = ServerMetrics("vehicles", version, LABELS)
        settings = ServeSettings(workers=1, inference_threads=1)
        lane = Lane(served, make_batcher(served, settings, metrics, self.log, environment))
        lane.batcher.start()
        self.lanes[version] = lane
        return lane

    def flushed(self) -> list[dict[str, Any]]:
        assert self.log.flush(10)
        return self.rows

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.batcher.stop()


@pytest.fixture
def lanes(tmp_path: Path) -> Iterator[Lanes]:
    made = Lanes(tmp_path)
    yield made
    made.close()


def state(
    stable: int, candidate: int | None = None, strategy: str = "direct", share: float = 0.0
) -> DeploymentState:
    return DeploymentState(
        environment="prod", model_name="vehicles", stable_version=stable,
        candidate_version=candidate, strategy=strategy, candidate_share=share, generation=7,
    )  # fmt: skip


def run(coro: Any) -> Any:
    return asyncio.run(coro)


PNGS = images(40)


async def ask(
    router: Router, n: int = 40, camera: str | None = None, **kw: Any
) -> list[tuple[int, str, str]]:
    """(answering version, label, variant) for the first ``n`` images, concurrently."""
    meta = {"camera_id": camera} if camera is not None else None
    done = await asyncio.gather(
        *(router.submit(images=[png], metadata=meta, **kw) for _, png in PNGS[:n])
    )
    return [(r.served.version, r.served.labels[int(r.result.top[0])], r.variant) for r in done]


def test_direct_answers_from_the_stable_version_and_tags_its_rows(lanes: Lanes) -> None:
    lanes.add(1, good_model())
    router = Router(deployment_table(state(1), lanes.lanes))
    answers = run(ask(router, camera="cam-3"))
    assert [(v, label) for v, label, _ in answers] == [(1, truth) for truth, _ in PNGS]
    stats = router.table.stats[1]
    assert stats.requests == 40 and stats.errors == 0 and stats.snapshot()["p95_ms"] is not None
    rows = lanes.flushed()
    assert len(rows) == 40
    assert {
        (r["environment"], r["deployment_generation"], r["variant"], r["camera_id"]) for r in rows
    } == {("prod", 7, "stable", "cam-3")}
    assert all(r["request_metadata"] == {"camera_id": "cam-3"} for r in rows)
    assert all(type(r["request_metadata"]) is dict for r in rows)  # plain JSON, not the tag


def test_a_static_table_logs_rows_as_before(lanes: Lanes) -> None:
    lane = lanes.add(1, good_model(), environment=None)
    router = Router(static_table(lane))
    run(ask(router, 5, camera="cam-1"))
    rows = lanes.flushed()
    assert {(r["environment"], r["variant"], r["deployment_generation"]) for r in rows} == {
        (None, None, None)
    }
    assert {r["camera_id"] for r in rows} == {"cam-1"}  # a queryable column everywhere


def test_canary_is_sticky_per_camera_and_follows_the_share(lanes: Lanes) -> None:
    lanes.add(1, good_model())
    lanes.add(2, good_model(0.02))
    router = Router(deployment_table(state(1, 2, "canary", 0.3), lanes.lanes))
    threshold = int(0.3 * 2**64)
    seen: dict[str, set[int]] = {}
    for camera in (f"cam-{i}" for i in range(30)):
        for version, _, variant in run(ask(router, 6, camera=camera)):
            seen.setdefault(camera, set()).add(version)
            assert variant == ("canary" if version == 2 else "stable")
    assert all(len(v) == 1 for v in seen.values()), seen  # each camera stays on one version
    for camera, (version,) in seen.items():
        assert (version == 2) == (sticky_bucket(camera) < threshold)
    assert {v for (v,) in seen.values()} == {1, 2}
    random.seed(12)  # no camera: a random share of the requests
    to_canary = sum(v == 2 for _ in range(10) for v, _, _ in run(ask(router, 40)))
    assert 0.2 < to_canary / 400 < 0.4


def test_a_failing_canary_is_answered_by_the_stable_version(lanes: Lanes) -> None:
    lanes.add(1, good_model())
    lanes.add(2, failing_model())
    router = Router(deployment_table(state(1, 2, "canary", 0.5), lanes.lanes))
    random.seed(3)
    answers = run(ask(router, 40))
    assert [(v, label) for v, label, _ in answers] == [(1, truth) for truth, _ in PNGS]
    cand, stable = router.table.stats[2], router.table.stats[1]
    assert cand.errors > 0 and cand.errors == cand.fallbacks == cand.requests
    assert stable.requests == 40 and stable.errors == 0
    assert {r["model_version"] for r in lanes.flushed()} == {1}


def test_a_client_mistake_is_answered_as_it_is_and_counts_against_nobody(lanes: Lanes) -> None:
    lanes.add(1, good_model())
    lanes.add(2, good_model(0.02))
    router = Router(deployment_table(state(1, 2, "canary", 0.5), lanes.lanes))
    to_canary = next(f"c{i}" for i in range(100) if sticky_bucket(f"c{i}") < 2**63)
    for camera in (to_canary, None):
        with pytest.raises(InvalidInput, match="cannot decode|not a JPEG or PNG|image 1"):
            run(router.submit(images=[b"not an image"], metadata={"camera_id": camera}))
    assert all(s.requests == s.errors == s.fallbacks == 0 for s in router.table.stats.values())


def test_shadow_answers_from_stable_and_compares_off_the_request_path(lanes: Lanes) -> None:
    lanes.add(1, good_model())
    lanes.add(3, constant_model("bus"))
    alone = run(ask(Router(deployment_table(state(1), lanes.lanes))))
    router = Router(deployment_table(state(1, 3, "shadow", 1.0), lanes.lanes))

    async def shadowed() -> list[tuple[int, str, str]]:
        answers = await ask(router)
        while router.shadow_in_flight:
            await asyncio.sleep(0.01)
        return answers

    assert run(shadowed()) == alone  # the answers never change
    stats = router.table.stats[3]
    bus = sum(label == "bus" for _, label, _ in alone)
    assert (stats.shadow_compared, stats.shadow_agreed, stats.shadow_errors) == (40, bus, 0)
    assert stats.requests == 0 and stats.snapshot()["shadow_p95_ms"] is not None
    rows = [r for r in lanes.flushed() if r["deployment_generation"] == 7]
    shadow = [r for r in rows if r["variant"] == "shadow"]
    assert len(shadow) == 40 and {r["model_version"] for r in shadow} == {3}
    assert {r["label"] for r in shadow} == {"bus"}


def test_shadow_drops_mirrors_beyond_its_queue(lanes: Lanes) -> None:
    lanes.add(1, good_model())
    lanes.add(2, failing_model())
    table = deployment_table(state(1, 2, "shadow", 1.0), lanes.lanes, shadow_max_queue=1)
    router = Router(table)

    async def go() -> list[tuple[int, str, str]]:
        answers = await ask(router)
        while router.shadow_in_flight:
            await asyncio.sleep(0.01)
        return answers

    assert {v for v, _, _ in run(go())} == {1}
    stats = table.stats[2]
    assert stats.shadow_dropped > 0
    assert stats.shadow_errors + stats.shadow_dropped == 40 and stats.shadow_compared == 0


def test_an_addressed_version_is_answered_by_it_or_404(lanes: Lanes) -> None:
    lanes.add(1, good_model())
    lanes.add(3, constant_model("van"))
    router = Router(deployment_table(state(1, 3, "canary", 0.01), lanes.lanes))
    assert {(v, label) for v, label, _ in run(ask(router, 10, version="3"))} == {(3, "van")}
    with pytest.raises(NotFound, match=r"no version '9' here; this server serves versions 1, 3"):
        run(ask(router, 1, version="9"))


def test_nothing_loaded_is_not_ready(lanes: Lanes) -> None:
    router = Router(empty_table("prod", "environment prod has no model deployed yet"))
    with pytest.raises(NotReady, match="environment prod has no model deployed yet"):
        run(ask(router, 1))


def test_a_request_that_read_the_old_table_is_answered_by_the_new_one(lanes: Lanes) -> None:
    old_lane = lanes.add(1, good_model())
    lanes.add(2, constant_model("truck"))
    router = Router(deployment_table(state(1), {1: old_lane}))
    old = router.table
    router.table = deployment_table(state(2), lanes.lanes)  # the swap, then the old one stops
    old_lane.retired = True
    old_lane.batcher.stop()

    async def late() -> Any:  # what a request that read the table just before the swap does
        return await router._answer(old, old_lane, "stable", [PNGS[0][1]], None, None, "v1")

    routed = run(late())
    assert routed.served.version == 2 and int(routed.result.top[0]) == LABELS.index("truck")


def test_a_late_addressed_request_is_answered_by_its_version_or_refused(lanes: Lanes) -> None:
    """A request naming version 3 that read a table just before the swap is answered by
    version 3 of the new table, or refused naming what is loaded: never by another version
    (a replica test would measure the wrong model)."""
    lanes.add(1, good_model())
    old_lane = lanes.add(3, constant_model("van"))
    lanes.add(2, constant_model("truck"))
    old = Router(deployment_table(state(1, 3, "canary", 0.5), lanes.lanes)).table
    router = Router(deployment_table(state(2), lanes.lanes))  # 3 is gone: the swap
    old_lane.retired = True
    old_lane.batcher.stop()

    async def late(table: Any, lane: Lane, variant: str) -> Any:
        return await router._answer(table, lane, variant, [PNGS[0][1]], None, None, "v1")

    with pytest.raises(NotFound, match=r"no version '3' here; this server serves version 2$"):
        run(late(old, old_lane, "addressed"))
    routed = run(late(old, old_lane, "canary"))  # routed, not addressed: the stable answers
    assert (routed.served.version, routed.variant) == (2, "stable")

    (lanes.root / "again").mkdir()
    served = served_model(constant_model("bus"), 3, lanes.root / "again")
    again = Lane(served, make_batcher(served, ServeSettings(workers=1), ServerMetrics(
        "vehicles", 3, LABELS), lanes.log, "prod"))  # fmt: skip
    again.batcher.start()  # version 3 loaded again, in a new lane
    lanes.lanes[3] = again  # stopped at the end
    router.table = deployment_table(state(2, 3, "shadow", 0.0), {2: lanes.lanes[2], 3: again})
    routed = run(late(old, old_lane, "addressed"))
    assert (routed.served.version, routed.variant) == (3, "addressed")
    assert int(routed.result.top[0]) == LABELS.index("bus") and routed.served is again.served
    rows = lanes.flushed()
    assert [(r["model_version"], r["variant"]) for r in rows] == [(2, "stable"), (3, "addressed")]
    assert {r["deployment_generation"] for r in rows} == {7}


def test_addressed_requests_are_neither_canary_nor_shadow_traffic(lanes: Lanes) -> None:
    lanes.add(1, good_model())
    lanes.add(3, constant_model("van"))
    for strategy in ("shadow", "canary"):
        router = Router(deployment_table(state(1, 3, strategy, 0.5), lanes.lanes))
        answers = run(ask(router, 10, camera="cam-1", version="3"))
        assert set(answers) == {(3, "van", "addressed")}
        assert set(run(ask(router, 5, version="1"))) == {(1, truth, "addressed")
                                                         for truth, _ in PNGS[:5]}  # fmt: skip
        cand, stable = router.table.stats[3], router.table.stats[1]
        # Counted apart: the canary's judge sees no requests, errors or latency from them.
        assert (cand.requests, cand.addressed, stable.requests, stable.addressed) == (0, 10, 0, 5)
        assert cand.snapshot()["p95_ms"] is None and cand.snapshot()["addressed_errors"] == 0
    rows = lanes.flushed()
    assert len(rows) == 30 and {r["variant"] for r in rows} == {"addressed"}
    assert {(r["model_version"], r["camera_id"]) for r in rows if r["model_version"] == 3} == {
        (3, "cam-1")
    }


def test_a_failing_addressed_version_counts_apart(lanes: Lanes) -> None:
    lanes.add(1, good_model())
    lanes.add(2, failing_model())
    router = Router(deployment_table(state(1, 2, "canary", 0.0), lanes.lanes))
    with pytest.raises(Exception, match="(?i)gather|index|fail"):
        run(router.submit(images=[PNGS[0][1]], version="2"))
    stats = router.table.stats[2].snapshot()
    assert (stats["requests"], stats["errors"], stats["addressed"], stats["addressed_errors"]) == (
        0, 0, 1, 1
    )  # fmt: skip
