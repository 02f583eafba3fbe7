"""A client's mistake is a 4xx with a JSON message saying what was wrong, never a 5xx."""

from __future__ import annotations

import httpx
import pytest

from tests.deploy.conftest import Running, image_bytes

PREDICT = "/v1/models/vehicles/predict"


def check(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    assert isinstance(message, str) and words.lower() in message.lower(), message


def test_corrupt_and_empty_images(server: Running) -> None:
    url = server.url + PREDICT
    png = image_bytes(1)
    check(httpx.post(url, content=b"not an image", headers={"Content-Type": "image/png"}), 415,
          "not a JPEG or PNG file")  # fmt: skip
    check(httpx.post(url, content=png[: len(png) // 2], headers={"Content-Type": "image/png"}),
          400, "image 1")  # fmt: skip
    check(httpx.post(url, content=b"", headers={"Content-Type": "image/png"}), 400, "empty body")


def test_content_types(server: Running) -> None:
    url = server.url + PREDICT
    check(httpx.post(url, content=image_bytes(1), headers={"Content-Type": "text/plain"}), 415,
          "unsupported media type")  # fmt: skip
    check(httpx.post(url, content=image_bytes(1), headers={"Content-Type": ""}), 415,
          "missing Content-Type")  # fmt: skip
    text_part = [("file", ("a.txt", b"hello", "text/plain"))]
    check(httpx.post(url, files=text_part), 415, "text/plain")
    check(httpx.post(url, data={"camera_id": "c1"}, files=[("x", ("e.png", b"", "image/png"))]),
          400, "image 1 is empty")  # fmt: skip
    no_files = httpx.post(
        url, content=b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )  # fmt: skip
    check(no_files, 400, "no image")
    check(httpx.post(url, content=b"garbage", headers={"Content-Type": "multipart/form-data"}),
          400, "")  # fmt: skip


def test_one_bad_image_fails_the_whole_request(server: Running) -> None:
    files = [
        ("files", ("a.png", image_bytes(1), "image/png")),
        ("files", ("b.png", image_bytes(2)[:100], "image/png")),
    ]
    check(httpx.post(server.url + PREDICT, files=files), 400, "image 2")


def test_size_limits(server: Running) -> None:
    url = server.url + PREDICT
    big = b"\0" * (2 << 20)  # the test servers allow 1 MiB
    check(httpx.post(url, content=big, headers={"Content-Type": "image/png"}), 413, "limit")

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"\0" * 65536

    check(httpx.post(url, content=chunks(), headers={"Content-Type": "image/png"}), 413, "limit")
    many = [("f", (f"{i}.png", image_bytes(1), "image/png")) for i in range(65)]
    check(httpx.post(url, files=many), 413, "too many images: at most 64 per request")


def test_unknown_model_version_route_and_method(server: Running) -> None:
    png = {"content": image_bytes(1), "headers": {"Content-Type": "image/png"}}
    check(httpx.post(server.url + "/v1/models/nosuch/predict", **png), 404, "not served here")
    check(httpx.post(server.url + "/v1/models/vehicles/versions/2/predict", **png), 404,
          "no version '2'")  # fmt: skip
    check(httpx.post(server.url + "/v1/models/vehicles/versions/x/predict", **png), 404,
          "no version 'x'")  # fmt: skip
    check(httpx.get(server.url + "/nowhere"), 404, "no such endpoint")
    check(httpx.get(server.url + PREDICT), 405, "not allowed")
    check(httpx.get(server.url + "/v2/models/nosuch"), 404, "not served here")


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("captured_at=yesterday", "ISO 8601"),
        ("k=" + "x" * 2000, "longer than"),
        ("&".join(f"k{i}=v" for i in range(40)), "too much metadata"),
    ],
)
def test_bad_metadata(server: Running, query: str, words: str) -> None:
    r = httpx.post(f"{server.url}{PREDICT}?{query}", content=image_bytes(1),
                   headers={"Content-Type": "image/png"})  # fmt: skip
    check(r, 400, words)


def test_bad_metadata_field(server: Running) -> None:
    files = [("f", ("a.png", image_bytes(1), "image/png"))]
    check(httpx.post(server.url + PREDICT, files=files, data={"metadata": "[1]"}), 400,
          "JSON object")  # fmt: skip
    check(httpx.post(server.url + PREDICT, files=files, data={"metadata": '{"a": {"b": 1}}'}),
          400, "string, number or boolean")  # fmt: skip
