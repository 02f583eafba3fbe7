"""``/openapi.json`` is a valid OpenAPI 3.1 document that declares every parameter and body."""

from __future__ import annotations

import re
from typing import Any

import httpx
from openapi_spec_validator import validate

from tests.deploy.conftest import Running

METHODS = ("get", "post", "put", "delete", "patch")


def document(server: Running) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_the_document_is_valid_openapi_3_1(server: Running) -> None:
    doc = document(server)
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on the first error


def test_every_path_parameter_is_declared_by_every_operation(server: Running) -> None:
    paths = document(server)["paths"]
    templated = [p for p in paths if "{" in p]
    assert "/v1/models/{name}/versions/{version}/predict" in templated
    assert "/v2/models/{name}/versions/{version}/infer" in templated
    checked = 0
    for path in templated:
        wanted = set(re.findall(r"{([^}]+)}", path))
        for method, op in paths[path].items():
            if method not in METHODS:
                continue
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == wanted, (method, path, declared)
            assert all(p["required"] for p in op["parameters"] if p["in"] == "path")
            checked += 1
    assert checked >= 11  # the operations that generated clients used to reject


def test_request_bodies_and_errors_are_declared(server: Running) -> None:
    paths = document(server)["paths"]
    predict = paths["/v1/models/{name}/predict"]["post"]
    assert set(predict["requestBody"]["content"]) >= {"image/jpeg", "image/png",
                                                      "multipart/form-data"}  # fmt: skip
    infer = paths["/v2/models/{name}/infer"]["post"]
    schema = infer["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["inputs"]
    assert "application/json" in paths["/v1/feedback"]["post"]["requestBody"]["content"]
    for path in ("/v1/models/{name}/predict", "/v2/models/{name}/infer"):
        responses = paths[path]["post"]["responses"]
        assert responses["4XX"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/Error"
        }
        assert "503" in responses
