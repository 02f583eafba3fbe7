"""The server under hostile images: bombs, truncated files and other formats fail alone.

Only JPEG and PNG are opened, the pixel count is checked from the header before decoding
(413), another format is a 415, a truncated file a 400, and one bad image never touches
another request, not even one batched with it.
"""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from loopline.deploy.runtime import Batcher, ModelRuntime, Overloaded
from loopline.errors import ImageTooLarge, InvalidInput, UnsupportedImage
from tests.deploy.conftest import (
    TOKEN,
    Project,
    Running,
    image_bytes,
    reference_labels,
    server_process,
    serving,
)
from tests.test_images import encoded, png_declaring

PREDICT = "/v1/models/vehicles/predict"
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


def post(url: str, body: bytes, ctype: str = "image/png") -> httpx.Response:
    return httpx.post(url + PREDICT, content=body, headers={"Content-Type": ctype}, timeout=60)


def check(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    for w in words:
        assert w.lower() in message.lower(), message


@pytest.mark.parametrize("side", [13000, 14000])
def test_a_bomb_is_a_413_naming_the_limit(server: Running, side: int) -> None:
    check(post(server.url, png_declaring(side, side)), 413, "image 1", "too many pixels",
          "16,777,216")  # fmt: skip


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "QOI", "TGA", "DDS", "WEBP"])
def test_other_formats_are_a_415_naming_jpeg_and_png(server: Running, fmt: str) -> None:
    check(post(server.url, encoded(fmt)), 415, "image 1", "not a JPEG or PNG", "send JPEG or PNG")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_truncated_image_is_a_400(server: Running, fmt: str) -> None:
    data = image_bytes(3, fmt)
    check(post(server.url, data[: len(data) // 2], f"image/{fmt.lower()}"), 400, "image 1",
          "cannot decode image")  # fmt: skip


def test_one_bomb_among_several_images_names_it(server: Running) -> None:
    files = [
        ("f", ("a.png", image_bytes(1), "image/png")),
        ("f", ("b.png", png_declaring(14000, 14000), "image/png")),
    ]
    check(httpx.post(server.url + PREDICT, files=files), 413, "image 2", "too many pixels")


def test_the_pixel_limit_is_a_setting(module_project: Project) -> None:
    small = image_bytes(1, size=(48, 40))  # 1,920 pixels
    with serving(module_project, max_image_pixels=1919, log_predictions=False) as running:
        check(post(running.url, small), 413, "48x40 is 1,920 pixels, at most 1,919")
    with serving(module_project, max_image_pixels=1920, log_predictions=False) as running:
        assert post(running.url, small).status_code == 200


# -- isolation inside one batch ------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime(model_bytes: bytes, tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    from loopline.bundle import PreprocessSpec
    from tests.deploy.conftest import LABELS, SIZE

    path = tmp_path_factory.mktemp("rt") / "model.onnx"
    path.write_bytes(model_bytes)
    return ModelRuntime(path, LABELS, PreprocessSpec(height=SIZE, width=SIZE))


def test_bad_images_batched_with_good_ones_fail_alone(
    runtime: ModelRuntime, model_bytes: bytes
) -> None:
    from tests.deploy.conftest import LABELS

    good = [image_bytes(i) for i in range(40, 46)]
    truncated = image_bytes(7)[:200]
    bad: list[tuple[list[bytes], type[InvalidInput]]] = [
        ([png_declaring(14000, 14000)], ImageTooLarge),
        ([good[0], png_declaring(13000, 13000)], ImageTooLarge),
        ([truncated], InvalidInput),
        ([encoded("BMP")], UnsupportedImage),
    ]
    batches: list[int] = []
    # No batcher thread: every job waits in the queue, and stop() answers them all as one
    # batch, so the bad jobs are certainly batched with the good ones.
    batcher = Batcher(
        runtime, threads=0, max_batch_size=64, max_pixels=16_777_216,
        on_batch=lambda jobs, results, s: batches.append(len(jobs)),
    )  # fmt: skip

    async def main() -> list[Any]:
        batcher.start()
        futures = []
        for i, image in enumerate(good):
            futures.append(batcher.submit(images=[image]))
            if i < len(bad):
                futures.append(batcher.submit(images=bad[i][0]))
        await asyncio.to_thread(batcher.stop)
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(main())
    answers = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    assert batches == [len(good)]  # one model run, of the good jobs only
    assert [LABELS[int(r.top[0])] for r in answers] == reference_labels(model_bytes, good)
    assert [type(e) for e in errors] == [kind for _, kind in bad]


def test_an_unexpected_decoder_failure_fails_its_request_as_the_client_s(
    runtime: ModelRuntime, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import struct

    import loopline.deploy.runtime

    # A fake, in-process: a Pillow plugin that raises its own exception type on a crafted
    # file (struct.error, IndexError...) cannot be produced on demand with a fixed Pillow.
    poison = image_bytes(77)
    decode = loopline.deploy.runtime.decode_image

    def decoder(data: bytes, spec: Any, *, max_pixels: int | None = None) -> np.ndarray:
        if data == poison:
            raise struct.error("unpack requires a buffer of 4 bytes")
        return decode(data, spec, max_pixels=max_pixels)

    monkeypatch.setattr(loopline.deploy.runtime, "decode_image", decoder)
    batcher = Batcher(runtime, threads=0, max_batch_size=64)

    async def main() -> list[Any]:
        batcher.start()
        futures = [
            batcher.submit(images=[image_bytes(1)]),
            batcher.submit(images=[image_bytes(2), poison]),
        ]
        await asyncio.to_thread(batcher.stop)
        return await asyncio.gather(*futures, return_exceptions=True)

    good, bad = asyncio.run(main())
    assert len(good.ids) == 1  # the job batched with it is answered
    assert isinstance(bad, InvalidInput) and bad.status_code == 400
    assert str(bad).startswith("image 2: cannot decode image (error: unpack requires")
    (record,) = [r for r in caplog.records if "decoder failed" in r.getMessage()]
    assert record.exc_info is not None  # the traceback is logged
    assert batcher.queued_bytes == 0


def test_the_queue_is_bounded_by_bytes(runtime: ModelRuntime) -> None:
    batcher = Batcher(runtime, threads=0, max_queue=1000, max_queue_bytes=10_000)
    image = image_bytes(1)  # about 3 kB

    async def main() -> tuple[int, str]:
        batcher.start()
        futures = []
        try:
            while True:
                futures.append(batcher.submit(images=[image]))
        except Overloaded as err:
            message = str(err)
        await asyncio.to_thread(batcher.stop)  # answers the queued ones
        await asyncio.gather(*futures)
        return len(futures), message

    queued, message = asyncio.run(main())
    assert queued == 10_000 // len(image)
    assert "10000 bytes" in message and Overloaded.status_code == 503
    assert batcher.queued_bytes == 0  # after successful jobs
    # A request alone in the queue is taken whatever its size: nothing is refused forever.
    big = np.zeros((30, 3, 32, 32), np.float32)  # 368,640 bytes

    async def alone() -> int:
        batcher.start()
        fut = batcher.submit(tensor=big)
        await asyncio.to_thread(batcher.stop)
        return len((await fut).ids)

    assert asyncio.run(alone()) == 30
    assert batcher.queued_bytes == 0

    async def failing() -> list[Any]:
        batcher.start()
        futures = [
            batcher.submit(images=[image[:200]]),  # truncated
            batcher.submit(images=[encoded("BMP")]),
            batcher.submit(images=[image, b""]),
        ]
        await asyncio.to_thread(batcher.stop)
        return await asyncio.gather(*futures, return_exceptions=True)

    assert all(isinstance(r, InvalidInput) for r in asyncio.run(failing()))
    assert batcher.queued_bytes == 0  # after failing jobs
    batcher.start()
    with pytest.raises(RuntimeError, match="no running event loop"):
        batcher.submit(images=[image])  # refused before anything is queued or counted
    batcher.stop()
    assert batcher.queued_bytes == 0


# -- a burst against a real server process ----------------------------------------------------
def test_a_burst_of_valid_and_hostile_requests(fresh_project: Project, model_bytes: bytes) -> None:
    valid = [image_bytes(100 + i, "PNG" if i % 2 else "JPEG") for i in range(48)]
    want = reference_labels(model_bytes, valid)
    jpeg = image_bytes(9, "JPEG")
    hostile: list[tuple[bytes, str, int]] = [
        (png_declaring(14000, 14000), "image/png", 413),
        (png_declaring(13000, 13000), "image/png", 413),
        (image_bytes(8)[:300], "image/png", 400),
        (jpeg[: len(jpeg) // 2], "image/jpeg", 400),
        (encoded("BMP"), "image/png", 415),
        (encoded("TIFF"), "application/octet-stream", 415),
        (encoded("QOI"), "image/png", 415),
    ] * 4
    jobs: list[tuple[str, int, bytes, str, Any]] = [
        ("valid", i, b, "image/png" if i % 2 else "image/jpeg", want[i])
        for i, b in enumerate(valid)
    ]
    jobs += [("hostile", i, b, ctype, code) for i, (b, ctype, code) in enumerate(hostile)]
    order = np.random.default_rng(0).permutation(len(jobs))
    args = ("--workers", "1", "--max-delay-ms", "5", "--max-batch-size", "16")
    with server_process(fresh_project, *args) as server:

        def send(job: tuple[str, int, bytes, str, Any]) -> tuple[Any, httpx.Response]:
            kind, _, body, ctype, expected = job
            return job, post(server.url, body, ctype)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(send, [jobs[i] for i in order]))
        for (kind, i, _, _, expected), r in results:
            if kind == "valid":
                assert r.status_code == 200, (i, r.text)
                assert r.json()["predictions"][0]["label"] == expected, i
            else:
                assert r.status_code == expected, (i, r.text)
                assert "error" in r.json()
        assert server.proc.poll() is None, "the server died"
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        metrics = httpx.get(f"{server.url}/metrics").text
        flushed = httpx.post(f"{server.url}/v1/admin/flush",
                             headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert flushed.status_code == 200 and flushed.json()["flushed"] is True
        assert server.stop() in (0, -15)
    assert 'code="500"' not in metrics
    store = fresh_project.store()
    try:
        assert store.predictions.count("vehicles", 1) == len(valid)
    finally:
        store.close()


def test_a_4k_frame_is_accepted(server: Running) -> None:
    buf = io.BytesIO()
    Image.new("L", (3840, 2160), 128).save(buf, "PNG")
    assert post(server.url, buf.getvalue()).status_code == 200
