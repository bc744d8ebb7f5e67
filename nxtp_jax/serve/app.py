"""The Starlette app: `POST /v1/tag`, `POST /v1/attention`, `GET /v1/info`, health, metrics,
`GET /openapi.json`, the page.

Every error is `{"error": "..."}` with a 4xx/5xx status; nothing a client sends can stop
the batcher or the process. Images are decoded on `decode_threads` worker threads, after the
body size and the pixel count in the image header have passed the limits, and wait for the
device at model resolution. The query and form parameters of each endpoint are `Param`s:
the same objects parse a request and describe it in `/openapi.json` (`openapi.py`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import re
import sys
import threading
import time
import uuid
from typing import Any, AsyncIterator, Sequence

import numpy as np
import prometheus_client as prom
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nxtp_jax.choices import DEFAULT_NUM_LABELS
from nxtp_jax.data import preprocess
from nxtp_jax.serve import openapi, page
from nxtp_jax.serve.batcher import ATTENTION, Batcher, Runner


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 2**20  # per request, all its images together
    max_inflight_bytes: int = 256 * 2**20  # request bodies held at once, all requests together
    max_pixels: int = 40_000_000  # per image, from the header, before decoding (decompression bombs)
    max_images: int = 16  # per request (multipart fields `image`)
    max_queue: int = 256  # images waiting for the device, tag and attention together
    decode_threads: int = 2  # images decoded at once: at most this many at full size in memory
    timeout_s: float = 60.0
    retry_after_s: int = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@dataclasses.dataclass(frozen=True)
class Param:
    """A query or form parameter: `parse` reads it from a request, `schema` describes it (JSON Schema)."""

    name: str
    description: str
    schema: dict[str, Any]  # type integer/number/string; minimum, maximum, enum, default

    def parse(self, params: dict[str, str]) -> Any:
        raw = params.get(self.name)
        if raw is None or raw == "":
            return self.schema.get("default")
        lo, hi = self.schema.get("minimum"), self.schema.get("maximum")
        kind = self.schema["type"]
        if kind == "integer":
            try:
                value = int(raw)
            except ValueError:
                raise ApiError(400, f"{self.name} must be an integer in [{lo}, {hi}], found {raw!r}")
        elif kind == "number":
            try:
                value = float(raw)
            except ValueError:
                raise ApiError(400, f"{self.name} must be a number in [{lo:g}, {hi:g}], found {raw!r}")
        else:
            known = self.schema.get("enum", [])
            if raw not in known:
                names = ", ".join(known) or "none were loaded (start the server with --vocab=NAME:FILE)"
                raise ApiError(400, f"unknown {self.name} {raw!r}; known: {names}")
            return raw
        if not lo <= value <= hi:  # also refuses nan
            raise ApiError(400, f"{self.name} must be in [{lo:g}, {hi:g}], found {raw if kind == 'number' else value}")
        return value


class Metrics:
    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "nxtp_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.latency = prom.Histogram(
            "nxtp_request_latency_seconds", "Request latency", ["endpoint"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_size = prom.Histogram(
            "nxtp_batch_size", "Images per device batch (before padding)", registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        self.queue_depth = prom.Gauge("nxtp_queue_depth", "Images waiting for the device", registry=self.registry)
        self.compilations = prom.Counter(
            "nxtp_jit_compilations", "XLA compilations in this process (flat once /readyz is 200)", registry=self.registry
        )


def count_compilations(metrics: Metrics) -> None:
    import jax

    def listener(event: str, duration: float, **kw: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            metrics.compilations.inc()

    jax.monitoring.register_event_duration_secs_listener(listener)


class BodyBudget:
    """The bytes of request bodies held at once. A request's bytes count from their arrival to
    its answer (`release`); one that would pass the budget gets 503."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.used, self.retry_after_s = limit, 0, retry_after_s

    def take(self, request: Request, n: int) -> None:
        if self.used + n > self.limit:
            raise ApiError(503, f"too many uploads at once ({self.limit} bytes of request bodies held); retry later",
                           {"Retry-After": str(self.retry_after_s)})
        self.used += n
        request.state.body_bytes = getattr(request.state, "body_bytes", 0) + n

    def release(self, request: Request) -> None:
        self.used -= getattr(request.state, "body_bytes", 0)
        request.state.body_bytes = 0


async def read_body(request: Request, limit: int, budget: BodyBudget) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes is above the limit of {limit} bytes; send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is above the limit of {limit} bytes; send a smaller image")
        budget.take(request, len(chunk))
        chunks.append(chunk)
    return b"".join(chunks)


def single_values(items: Sequence[tuple[str, str]], where: str) -> dict[str, str]:
    """name -> value; a name given twice is a 400 (which of two values is meant cannot be guessed)."""
    values: dict[str, str] = {}
    for name, value in items:
        if name in values:
            raise ApiError(400, f"{where} parameter {name!r} is given more than once; give it once")
        values[name] = value
    return values


async def read_images_and_params(
    request: Request, limits: Limits, budget: BodyBudget, max_images: int
) -> tuple[list[bytes], dict[str, str]]:
    """The images (a raw image/* body, or the multipart fields `image`, in order) and the query +
    form parameters."""
    content_type = request.headers.get("content-type", "")
    params = single_values(request.query_params.multi_items(), "query")
    media = content_type.split(";")[0].strip().lower()
    if media.startswith("image/"):
        return [await read_body(request, limits.max_body_bytes, budget)], params
    if media != "multipart/form-data":
        raise ApiError(
            415,
            f"expected Content-Type image/* (the image as the body) or multipart/form-data with a field 'image', "
            f"found {content_type or 'none'!r}",
        )
    body = await read_body(request, limits.max_body_bytes, budget)

    async def stream() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(Headers(raw=request.headers.raw), stream(), max_files=max_images,
                             max_part_size=limits.max_body_bytes)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if e.message.startswith("Too many files"):
            raise ApiError(400, f"too many images: at most {max_images} image(s) per request here")
        raise ApiError(400, f"unreadable multipart body: {e.message}")
    try:
        uploads = [v for k, v in form.multi_items() if k == "image"]
        if not uploads or not all(isinstance(u, UploadFile) for u in uploads):
            raise ApiError(400, "multipart body has no file field 'image'; send the image as the field 'image'")
        images = [await u.read() for u in uploads]
        fields = single_values([(k, v) for k, v in form.multi_items() if isinstance(v, str)], "form")
    finally:
        await form.close()
    both = sorted(set(fields) & set(params))
    if both:
        raise ApiError(400, f"parameter {both[0]!r} is given in the query and in the form; give it once")
    return images, {**params, **fields}


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """`preprocess.load_image`, the decoder of inference and training (it checks the pixel count
    from the header before decoding); ApiError 413 for a too large image, 400 for the rest."""
    if not data:
        raise ApiError(400, "empty image: the request carried 0 bytes; send the image bytes")
    try:
        return preprocess.load_image(data, max_pixels=max_pixels)
    except preprocess.ImageError as e:
        if e.kind == "too_large":
            raise ApiError(413, f"image too large: {e}")
        raise ApiError(400, f"image does not decode ({e.kind.replace('_', ' ')}): {e}")


class Service:
    """The model, the batcher, the decoder threads and the readiness flag behind the endpoints."""

    def __init__(
        self,
        tagger: Any,
        *,
        vocabs: dict[str, Any] | None = None,  # name -> labels or a file of them (Tagger.vocabulary)
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        max_num_labels: int = 20,
        limits: Limits = Limits(),
    ):
        self.tagger = tagger
        self.limits = limits
        self.metrics = Metrics()
        count_compilations(self.metrics)
        self.runner = Runner(tagger, max_batch=max_batch, max_num_labels=max_num_labels, vocabs=vocabs)
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self.default_num_labels = min(DEFAULT_NUM_LABELS, max_num_labels)
        self.ready = threading.Event()
        self.draining = False
        self.batcher: Batcher | None = None
        self.decoder = concurrent.futures.ThreadPoolExecutor(limits.decode_threads, thread_name_prefix="decode")
        self.bodies = BodyBudget(limits.max_inflight_bytes, limits.retry_after_s)
        cfg = tagger.model.config
        vocab_schema: dict[str, Any] = {"type": "string"}
        if self.runner.vocabs:
            vocab_schema["enum"] = sorted(self.runner.vocabs)
        self.tag_params = (
            Param("num_labels", "Labels per image (k of the one-shot sampling).",
                  {"type": "integer", "minimum": 1, "maximum": max_num_labels, "default": self.default_num_labels}),
            Param("min_prob", "Drop labels scored below this probability.",
                  {"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.0}),
            Param("vocab", "A closed vocabulary loaded with --vocab=NAME:FILE; decoding is constrained to its labels.",
                  vocab_schema),
        )
        self.attention_params = (
            Param("layer", "Decoder layer (default: the last).",
                  {"type": "integer", "minimum": 0, "maximum": cfg.decoder.layers - 1, "default": cfg.decoder.layers - 1}),
            Param("head", "Attention head.",
                  {"type": "integer", "minimum": 0, "maximum": cfg.decoder.n_heads - 1, "default": 0}),
        )

    # -- lifecycle -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.batcher = Batcher(
            self.runner.tag, self.runner.attention, self.runner.label_sizes, max_batch=self.max_batch,
            max_wait_s=self.max_wait_s, max_queue=self.limits.max_queue, on_batch=self.metrics.batch_size.observe,
        )
        warm = asyncio.create_task(self._warm_up())
        loop = asyncio.create_task(self.batcher.serve_forever())
        try:
            yield
        finally:
            warm.cancel()
            loop.cancel()
            self.batcher.device.shutdown(wait=False, cancel_futures=True)
            self.decoder.shutdown(wait=False, cancel_futures=True)

    async def _warm_up(self) -> None:
        await self.batcher.on_device(self.runner.warm_up)
        self.ready.set()

    def drain(self, drain_s: float) -> None:
        """SIGTERM: new requests get 503 now; what waits for the device after `drain_s` gets 503 then."""
        self.draining = True
        shutting_down = ApiError(503, "the server is shutting down; retry on another instance",
                                 {"Retry-After": str(self.limits.retry_after_s)})
        asyncio.get_running_loop().call_later(drain_s, self.batcher.close, shutting_down)

    # -- endpoints -----------------------------------------------------------------

    async def tag(self, request: Request) -> Response:
        images, params = await read_images_and_params(request, self.limits, self.bodies, self.limits.max_images)
        k, min_prob, vocab = (p.parse(params) for p in self.tag_params)
        results = await self._run(images, k, min_prob, vocab)
        answers = [{"labels": [{"label": label, "prob": float(p)} for label, p in labels]} for labels in results]
        return JSONResponse(answers[0] if len(answers) == 1 else {"results": answers})

    async def attention(self, request: Request) -> Response:
        images, params = await read_images_and_params(request, self.limits, self.bodies, 1)
        layer, head = (p.parse(params) for p in self.attention_params)
        [grids] = await self._run(images, ATTENTION, 0.0, None)
        return JSONResponse(
            {"layer": layer, "head": head, "num_layers": int(grids.shape[0]), "num_heads": int(grids.shape[1]),
             "grid": np.asarray(grids[layer, head], np.float64).tolist()}
        )

    async def _run(self, images: list[bytes], k: int | str, min_prob: float, vocab: str | None) -> list[Any]:
        """Decodes the images on the decoder threads, queues them together, waits for their results."""
        self._check_ready()
        self._check_room(len(images))
        loop = asyncio.get_running_loop()
        n = len(images)
        xs = await asyncio.gather(*[loop.run_in_executor(self.decoder, self._model_input, d, i, n)
                                    for i, d in enumerate(images)])
        del images  # the encoded bytes are not needed while waiting
        try:
            futures = self.batcher.submit([(x, k, min_prob, vocab) for x in xs])
        except asyncio.QueueFull:
            self._queue_full()
        self.metrics.queue_depth.set(self.batcher.waiting)
        return await asyncio.gather(*futures)

    async def info(self, request: Request) -> Response:
        cfg = self.tagger.model.config
        return JSONResponse(
            {"vocabs": sorted(self.runner.vocabs), "max_num_labels": self.runner.max_num_labels,
             "default_num_labels": self.default_num_labels,
             "num_layers": cfg.decoder.layers, "num_heads": cfg.decoder.n_heads, "image_size": self.tagger.image_size}
        )

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self.ready.is_set():
            return error(503, "warming up: compiling the model's batch shapes", {"Retry-After": "1"})
        return JSONResponse({"status": "ready"})

    async def metrics_text(self, request: Request) -> Response:
        if self.batcher is not None:
            self.metrics.queue_depth.set(self.batcher.waiting)
        return Response(prom.generate_latest(self.metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

    def _model_input(self, data: bytes, index: int, count: int) -> np.ndarray:
        """Image `index` of `count` checked, decoded, resized and cropped: uint8 [R, R, 3] (on a decoder thread)."""
        try:
            return preprocess.resize_center_crop(decode_image(data, self.limits.max_pixels), self.tagger.image_size)
        except ApiError as e:
            if count > 1:
                e.message = f"image {index + 1} of {count}: {e.message}"
            raise

    def _check_ready(self) -> None:
        retry = {"Retry-After": str(self.limits.retry_after_s)}
        if self.draining:
            raise ApiError(503, "the server is shutting down; retry on another instance", retry)
        if not self.ready.is_set():
            raise ApiError(503, "warming up: the model is still compiling; retry once GET /readyz is 200", retry)

    def _check_room(self, n: int) -> None:
        if self.batcher.waiting + n > self.limits.max_queue:
            self._queue_full()

    def _queue_full(self):
        raise ApiError(
            503, f"the queue is full ({self.limits.max_queue} images waiting at most); retry later",
            {"Retry-After": str(self.limits.retry_after_s)},
        )

    def observed(self, name: str, handler):
        """Times `handler`, turns ApiError/timeouts/crashes into JSON errors, counts the status."""

        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            try:
                response = await asyncio.wait_for(handler(request), self.limits.timeout_s)
            except ApiError as e:
                response = error(e.status, e.message, e.headers)
            except asyncio.TimeoutError:
                response = error(504, f"request timed out after {self.limits.timeout_s:g} s; retry later")
            except Exception as e:  # a bug answers 500 and the server goes on
                response = error(500, f"internal error: {type(e).__name__}: {e}")
            finally:
                self.bodies.release(request)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
            return response

        return endpoint


OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # answered without an API key (probes)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestLog:
    """Gives every response an `X-Request-ID` (the client's, if it sent a sane one) and, with
    `access_log`, writes one JSON line per request to stdout."""

    def __init__(self, app: ASGIApp, access_log: bool):
        self.app, self.access_log = app, access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        start, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.access_log:
                client = scope.get("client") or ("", 0)
                line = {"time": round(time.time(), 3), "request_id": request_id, "client": client[0],
                        "method": scope["method"], "path": scope["path"], "status": status,
                        "duration_ms": round(1000 * (time.perf_counter() - start), 2)}
                sys.stdout.write(json.dumps(line) + "\n")
                sys.stdout.flush()


class BearerAuth:
    """401 unless `Authorization: Bearer <one of the keys>`; OPEN_PATHS and CORS preflights pass."""

    def __init__(self, app: ASGIApp, keys: Sequence[str]):
        self.app, self.keys = app, [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip().encode(), k) for k in self.keys):
            return await self.app(scope, receive, send)
        message = "missing or unknown API key; send the header 'Authorization: Bearer <key>'"
        response = error(401, message, {"WWW-Authenticate": 'Bearer realm="nxtp"'})
        await response(scope, receive, send)


async def http_error(request: Request, exc: HTTPException) -> Response:
    return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")


@dataclasses.dataclass(frozen=True)
class Access:
    """Who may call the service and from which web pages."""

    api_keys: tuple[str, ...] = ()  # empty: no authentication
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers
    access_log: bool = False


def create_app(service: Service, access: Access = Access()) -> Starlette:
    o = service.observed
    spec: dict[str, Any] = {}

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(spec)

    E = openapi.Endpoint
    endpoints = [
        E("/v1/tag", "POST", o("tag", service.tag), "Tag one image, or several (the multipart field 'image' repeated).",
          service.tag_params, openapi.IMAGES, openapi.TAG_ANSWER, openapi.IMAGE_ERRORS),
        E("/v1/attention", "POST", o("attention", service.attention),
          "The attention each image token receives in one decoder layer and head.",
          service.attention_params, openapi.IMAGE, openapi.ATTENTION_ANSWER, openapi.IMAGE_ERRORS),
        E("/v1/info", "GET", o("info", service.info), "What this server offers.", answer=openapi.INFO_ANSWER),
        E("/healthz", "GET", o("healthz", service.healthz), "200 while the process is up.", answer=openapi.STATUS_ANSWER),
        E("/readyz", "GET", o("readyz", service.readyz), "200 once the model is compiled, 503 before.",
          answer=openapi.STATUS_ANSWER, errors=(503,)),
        E("/metrics", "GET", service.metrics_text, "Prometheus metrics.", answer=openapi.text_answer(prom.CONTENT_TYPE_LATEST)),
        E("/openapi.json", "GET", openapi_json, "This description (OpenAPI 3.1).", answer=openapi.JSON_ANSWER),
        *(E(path, "GET", handler, "The web page and its files.", answer=openapi.text_answer(media))
          for path, handler, media in page.endpoints()),
    ]
    spec.update(openapi.document(endpoints, api_key=bool(access.api_keys), open_paths=OPEN_PATHS))
    middleware = [Middleware(RequestLog, access_log=access.access_log)]
    if access.cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(access.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"], expose_headers=["X-Request-ID"],
        ))
    if access.api_keys:
        middleware.append(Middleware(BearerAuth, keys=access.api_keys))
    routes = [Route(e.path, e.handler, methods=[e.method]) for e in endpoints]
    return Starlette(routes=routes, lifespan=service.lifespan, middleware=middleware,
                     exception_handlers={HTTPException: http_error})
