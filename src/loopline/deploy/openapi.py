"""The server's OpenAPI 3.1 document: every path parameter, request body and error declared.

The endpoints take the raw ``Request`` (the hot ones are plain Starlette routes, see
``fastroute``), so FastAPI cannot see their parameters and bodies in their signatures.
The request bodies are declared here and given to the routes as ``openapi_extra``;
``install`` completes the generated document: the path parameters of every templated path
(``{name}``, ``{version}``) and the JSON error body of every 4xx and 503.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"error": {"type": "string", "description": "what was wrong, one line"}},
    "required": ["error"],
}
PATH_PARAMETERS: dict[str, dict[str, Any]] = {
    "name": {"description": "the served model's name", "schema": {"type": "string"}},
    "version": {
        "description": "the served model's version (a registry version number)",
        "schema": {"type": "string", "examples": ["3"]},
    },
}
_TEMPLATE = re.compile(r"{([^}/]+)}")
_BINARY = {"type": "string", "contentMediaType": "application/octet-stream"}

IMAGE_BODY: dict[str, Any] = {
    "required": True,
    "description": "one JPEG or PNG image as the body, or one or many as multipart file "
    "fields; other multipart fields (or a field 'metadata' holding a JSON object) are "
    "kept with the predictions",
    "content": {
        "image/jpeg": {"schema": {"type": "string", "contentMediaType": "image/jpeg"}},
        "image/png": {"schema": {"type": "string", "contentMediaType": "image/png"}},
        "application/octet-stream": {"schema": _BINARY},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {"type": "array", "items": _BINARY},
                    "metadata": {"type": "string", "description": "a JSON object"},
                },
                "additionalProperties": {"type": "string"},
            }
        },
    },
}
METADATA_QUERY: dict[str, Any] = {
    "name": "metadata",
    "in": "query",
    "description": "request metadata kept with the predictions, e.g. camera_id=cam-3",
    "required": False,
    "style": "form",
    "explode": True,
    "schema": {"type": "object", "additionalProperties": {"type": "string"}},
}
PREDICTIONS_RESPONSE: dict[str, Any] = {
    "200": {
        "description": "one prediction per image, in order",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "model": {"type": "string"},
                        "model_version": {"type": "integer"},
                        "predictions": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "prediction_id": {"type": "string"},
                                    "label": {"type": "string"},
                                    "confidence": {"type": "number"},
                                    "probabilities": {
                                        "type": "object",
                                        "additionalProperties": {"type": "number"},
                                    },
                                    "model_version": {"type": "integer"},
                                },
                            },
                        },
                    },
                }
            }
        },
    }
}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "description": "the model's input: pixels as FP32 or UINT8 [N, 3, H, W], or encoded JPEG "
    "or PNG images as BYTES [N] or [N, 1] (decoded as /v1 predict decodes them)",
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string", "enum": ["FP32", "UINT8", "BYTES"]},
        "parameters": {
            "type": "object",
            "properties": {
                "binary_data_size": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "bytes of this tensor in the binary part of the body; "
                    "a BYTES tensor there is each element's 4-byte little-endian length, "
                    "then its bytes",
                }
            },
        },
        "data": {
            "type": "array",
            "description": "numbers (flat or nested) for FP32 and UINT8; base64 strings, "
            "one image each, for BYTES",
            "items": {},
        },
    },
}
INFER_BODY: dict[str, Any] = {
    "required": True,
    "description": "an Open Inference Protocol v2 inference request; with the binary tensor "
    "extension (header Inference-Header-Content-Length) the JSON header is followed by the "
    "tensors' bytes",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
                    "outputs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "properties": {
                                "name": {"type": "string"},
                                "parameters": {"type": "object"},
                            },
                        },
                    },
                    "parameters": {"type": "object"},
                },
            }
        },
        "application/octet-stream": {"schema": _BINARY},
    },
}
INFER_HEADER: dict[str, Any] = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "description": "length of the JSON header when binary tensors follow it",
    "required": False,
    "schema": {"type": "integer", "minimum": 0},
}
_FEEDBACK_ITEM = {
    "type": "object",
    "required": ["prediction_id", "label"],
    "properties": {"prediction_id": {"type": "string"}, "label": {"type": "string"}},
}
FEEDBACK_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    _FEEDBACK_ITEM,
                    {"type": "array", "items": _FEEDBACK_ITEM, "minItems": 1},
                    {
                        "type": "object",
                        "required": ["items"],
                        "properties": {"items": {"type": "array", "items": _FEEDBACK_ITEM}},
                    },
                ]
            }
        }
    },
}
_ERRORS = {
    "4XX": "the request was wrong (the message says what is allowed)",
    "503": "the queue is full or the server is stopping; retry after Retry-After seconds",
}


def path_parameters(path: str) -> list[dict[str, Any]]:
    """The OpenAPI declaration of every ``{parameter}`` in ``path``."""
    out = []
    for name in _TEMPLATE.findall(path):
        spec = PATH_PARAMETERS.get(name, {"schema": {"type": "string"}})
        out.append({"name": name, "in": "path", "required": True, **spec})
    return out


def complete(schema: dict[str, Any]) -> dict[str, Any]:
    """Declare each operation's missing path parameters and the JSON error responses."""
    schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path, item in schema.get("paths", {}).items():
        for operation in item.values():
            params = operation.setdefault("parameters", [])
            declared = {p.get("name") for p in params if p.get("in") == "path"}
            params.extend(p for p in path_parameters(path) if p["name"] not in declared)
            if not params:
                del operation["parameters"]
            responses = operation.setdefault("responses", {})
            for code, description in _ERRORS.items():
                responses.setdefault(
                    code,
                    {
                        "description": description,
                        "content": {"application/json": {"schema": ERROR_REF}},
                    },
                )
    return schema


def install(app: FastAPI) -> None:
    """Serve the completed document at ``/openapi.json`` (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    openapi_version=app.openapi_version,
                    summary=app.summary,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
