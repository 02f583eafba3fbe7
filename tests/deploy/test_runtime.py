"""ModelRuntime and the dynamic batcher, without HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loopline.bundle import PreprocessSpec
from loopline.deploy.runtime import Batcher, ModelRuntime
from loopline.errors import InvalidInput, LooplineError, UnsupportedImage
from tests.deploy.conftest import LABELS, SIZE, image_bytes, reference_labels


@pytest.fixture(scope="module")
def runtime(model_bytes: bytes, tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    path = tmp_path_factory.mktemp("rt") / "model.onnx"
    path.write_bytes(model_bytes)
    return ModelRuntime(path, LABELS, PreprocessSpec(height=SIZE, width=SIZE))


def test_runtime_checks_the_bundle_agrees_with_the_model(
    model_bytes: bytes, tmp_path: Path
) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(model_bytes)
    with pytest.raises(LooplineError, match="does not match preprocess.json"):
        ModelRuntime(path, LABELS, PreprocessSpec(height=SIZE * 2, width=SIZE))
    with pytest.raises(LooplineError, match="labels.json names 4"):
        ModelRuntime(path, LABELS[:4], PreprocessSpec(height=SIZE, width=SIZE))
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(LooplineError, match="ONNX Runtime cannot load"):
        ModelRuntime(tmp_path / "bad.onnx", LABELS, PreprocessSpec(height=SIZE, width=SIZE))


def test_concurrent_jobs_are_batched(runtime: ModelRuntime, model_bytes: bytes) -> None:
    sizes: list[int] = []
    batcher = Batcher(
        runtime, max_batch_size=16, max_delay_ms=5, threads=1,
        on_batch=lambda jobs, results, s: sizes.append(sum(j.n for j in jobs)),
    )  # fmt: skip
    images = [image_bytes(i) for i in range(64)]

    async def main() -> list[str]:
        batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit(images=[b]) for b in images))
        finally:
            batcher.stop()
        return [LABELS[int(r.top[0])] for r in results]

    assert asyncio.run(main()) == reference_labels(model_bytes, images)
    assert sum(sizes) == 64 and max(sizes) > 1 and max(sizes) <= 16


def test_a_bad_image_fails_only_its_own_job(runtime: ModelRuntime) -> None:
    batcher = Batcher(runtime, threads=2)

    async def main() -> tuple[object, object]:
        batcher.start()
        try:
            good = batcher.submit(images=[image_bytes(1), image_bytes(2)])
            bad = batcher.submit(images=[image_bytes(3), b"broken"])
            return await asyncio.gather(good, bad, return_exceptions=True)  # type: ignore[return-value]
        finally:
            batcher.stop()

    good, bad = asyncio.run(main())
    assert len(good.ids) == 2  # type: ignore[attr-defined]
    assert isinstance(bad, UnsupportedImage) and "image 2" in str(bad)
    assert isinstance(bad, InvalidInput)


def test_stop_answers_queued_jobs_then_refuses(runtime: ModelRuntime) -> None:
    batcher = Batcher(runtime, threads=1)

    async def main() -> None:
        batcher.start()
        futures = [
            batcher.submit(tensor=np.zeros((1, 3, SIZE, SIZE), np.float32)) for _ in range(20)
        ]
        await asyncio.to_thread(batcher.stop)
        assert all(len(r.ids) == 1 for r in await asyncio.gather(*futures))
        with pytest.raises(LooplineError, match="shutting down"):
            batcher.submit(tensor=np.zeros((1, 3, SIZE, SIZE), np.float32))

    asyncio.run(main())


def test_statistics_of_a_batch_are_each_job_s_own(runtime: ModelRuntime) -> None:
    """Computed once per batch, sliced back to the jobs: the same as one job at a time."""
    from loopline.bundle import PreprocessSpec, decode_image, to_input
    from loopline.images import image_stats

    seen: list[list[dict[str, object]]] = []

    # No batcher thread: stop() answers every queued job in one batch.
    def hook(jobs: list[Any], results: list[Any], seconds: float) -> None:
        seen.extend(j.stats for j in jobs)

    batcher = Batcher(runtime, threads=0, max_batch_size=64, on_batch=hook)
    images = [[image_bytes(1)], [image_bytes(2), image_bytes(3, "JPEG")], [image_bytes(4)]]
    tensor = np.random.default_rng(0).uniform(0, 255, (2, 3, SIZE, SIZE)).astype(np.float32)

    async def main() -> None:
        batcher.start()
        futures = [batcher.submit(images=batch) for batch in images]
        futures.append(batcher.submit(tensor=tensor))
        await asyncio.to_thread(batcher.stop)
        await asyncio.gather(*futures)

    asyncio.run(main())
    spec = PreprocessSpec(height=SIZE, width=SIZE)
    inputs = [to_input(np.stack([decode_image(b, spec) for b in batch])) for batch in images]
    inputs.append(tensor)
    assert len(seen) == 4
    for stats, x, batch in zip(seen, inputs, [*images, None], strict=True):
        want = image_stats(x, channels_last=False)
        assert len(stats) == len(x)
        for row, expected, i in zip(stats, want.tolist(), range(len(x)), strict=True):
            assert row["brightness"] == pytest.approx(expected[0], abs=1e-3)
            assert row["contrast"] == pytest.approx(expected[1], abs=1e-3)
            assert row["mean_rgb"] == pytest.approx(expected[2:5], abs=1e-2)
            assert row.get("bytes") == (len(batch[i]) if batch is not None else None)


def test_answers_reach_the_loop_that_asked(runtime: ModelRuntime, model_bytes: bytes) -> None:
    """Two event loops in two threads share one batcher; each gets its own answers, and a
    loop that closed with a job in flight harms nobody."""
    import threading

    batcher = Batcher(runtime, threads=2, max_batch_size=8)
    batcher.start()
    out: dict[str, list[str]] = {}

    def client(name: str, seeds: range) -> None:
        async def main() -> list[str]:
            results = await asyncio.gather(
                *(batcher.submit(images=[image_bytes(s)]) for s in seeds)
            )
            return [LABELS[int(r.top[0])] for r in results]

        out[name] = asyncio.run(main())

    try:
        threads = [threading.Thread(target=client, args=(f"c{i}", range(10 * i, 10 * i + 10)))
                   for i in range(2)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

        async def abandon() -> None:  # submit and close the loop without waiting
            batcher.submit(images=[image_bytes(99)])

        asyncio.run(abandon())
        client("after", range(40, 44))  # a new loop, after one closed with a job in flight
    finally:
        batcher.stop()

    def want(seeds: range) -> list[str]:
        return reference_labels(model_bytes, [image_bytes(s) for s in seeds])

    assert out == {"c0": want(range(10)), "c1": want(range(10, 20)), "after": want(range(40, 44))}


def test_prediction_ids_are_distinct_hex(runtime: ModelRuntime) -> None:
    batcher = Batcher(runtime, threads=1)

    async def main() -> list[str]:
        batcher.start()
        try:
            results = await asyncio.gather(
                *(
                    batcher.submit(tensor=np.zeros((3, 3, SIZE, SIZE), np.float32))
                    for _ in range(20)
                )
            )
        finally:
            batcher.stop()
        return [pid for r in results for pid in r.ids]

    ids = asyncio.run(main())
    assert len(ids) == len(set(ids)) == 60
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_a_row_is_written_with_its_statistics_never_before(tmp_path: Path) -> None:
    """Statistics are filled in after the answer went out; the log waits for them."""
    import threading
    import time as clock

    from loopline.deploy.predlog import PredictionLog
    from loopline.deploy.runtime import InputStats

    written: list[dict[str, object]] = []
    log = PredictionLog(written.extend, spill_dir=tmp_path)
    ready = threading.Event()
    stats = InputStats(ready)
    log.add([{"id": "a" * 32, "at": clock.time(), "input_stats": stats}])

    def fill() -> None:
        clock.sleep(0.3)
        stats.update(brightness=1.0, contrast=2.0)
        ready.set()

    threading.Thread(target=fill).start()
    assert log.flush(10)
    assert [r["input_stats"] for r in written] == [{"brightness": 1.0, "contrast": 2.0}]
    assert type(written[0]["input_stats"]) is dict
