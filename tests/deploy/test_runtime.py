"""ModelRuntime and the dynamic batcher, without HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
