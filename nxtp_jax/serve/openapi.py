"""`GET /openapi.json`: the OpenAPI 3.1 description of the service, written from the routes
`app.create_app` serves and the `Param`s its endpoints parse with, so it cannot drift."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

IMAGE, IMAGES = "image", "images"  # request bodies: one image, or one or more
IMAGE_ERRORS = (400, 413, 415, 503, 504)

_LABELS = {
    "type": "object", "required": ["labels"],
    "properties": {"labels": {"type": "array", "description": "Best first.", "items": {
        "type": "object", "required": ["label", "prob"],
        "properties": {"label": {"type": "string"}, "prob": {"type": "number"}}}}},
}
SCHEMAS: dict[str, Any] = {
    "Labels": _LABELS,
    "TagAnswer": {"oneOf": [
        {"$ref": "#/components/schemas/Labels"},
        {"type": "object", "required": ["results"], "description": "Several images: one answer per image, in order.",
         "properties": {"results": {"type": "array", "items": {"$ref": "#/components/schemas/Labels"}}}},
    ]},
    "Attention": {
        "type": "object", "required": ["layer", "head", "num_layers", "num_heads", "grid"],
        "properties": {"layer": {"type": "integer"}, "head": {"type": "integer"}, "num_layers": {"type": "integer"},
                       "num_heads": {"type": "integer"},
                       "grid": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}},
    },
    "Info": {
        "type": "object",
        "required": ["vocabs", "max_num_labels", "default_num_labels", "num_layers", "num_heads", "image_size"],
        "properties": {"vocabs": {"type": "array", "items": {"type": "string"}}, "max_num_labels": {"type": "integer"},
                       "default_num_labels": {"type": "integer"}, "num_layers": {"type": "integer"},
                       "num_heads": {"type": "integer"}, "image_size": {"type": "integer"}},
    },
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
}


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}


TAG_ANSWER, ATTENTION_ANSWER, INFO_ANSWER, STATUS_ANSWER = (_json(s) for s in ("TagAnswer", "Attention", "Info", "Status"))
JSON_ANSWER = {"application/json": {"schema": {"type": "object"}}}


def text_answer(media_type: str) -> dict[str, Any]:
    return {media_type.split(";")[0]: {"schema": {"type": "string"}}}


@dataclasses.dataclass(frozen=True)
class Endpoint:
    path: str
    method: str
    handler: Callable
    summary: str
    params: Sequence[Any] = ()  # app.Param
    body: str | None = None  # IMAGE, IMAGES or None
    answer: dict[str, Any] | None = None  # the 200 answer's content
    errors: Sequence[int] = ()


def _request_body(endpoint: Endpoint) -> dict[str, Any]:
    many = endpoint.body == IMAGES
    image = {"type": "string", "format": "binary"}
    fields = {p.name: {**p.schema, "description": p.description} for p in endpoint.params}
    return {"required": True, "content": {
        "image/*": {"schema": image},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "array", "items": image} if many else image, **fields},
        }},
    }}


def _operation(endpoint: Endpoint, api_key: bool, open_paths: frozenset[str]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": endpoint.summary,
        "operationId": endpoint.method.lower() + endpoint.path.replace("/", "_").replace(".", "_"),
        "responses": {"200": {"description": "OK", "content": endpoint.answer}},
    }
    if endpoint.params:
        op["parameters"] = [
            {"name": p.name, "in": "query", "required": False, "description": p.description, "schema": p.schema}
            for p in endpoint.params
        ]
    if endpoint.body is not None:
        op["requestBody"] = _request_body(endpoint)
    secured = api_key and endpoint.path not in open_paths
    for status in sorted({*endpoint.errors, *((401,) if secured else ())}):
        op["responses"][str(status)] = {"description": "An error, named in the JSON body.", "content": _json("Error")}
    if api_key and not secured:
        op["security"] = []
    return op


def document(endpoints: Sequence[Endpoint], *, api_key: bool, open_paths: frozenset[str]) -> dict[str, Any]:
    from importlib.metadata import version

    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        paths.setdefault(e.path, {})[e.method.lower()] = _operation(e, api_key, open_paths)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "nxtp_jax tagging service", "version": version("nxtp_jax"),
                 "description": "Object recognition as next token prediction: labels for images (docs/serving.md)."},
        "paths": paths,
        "components": {"schemas": SCHEMAS},
    }
    if api_key:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
