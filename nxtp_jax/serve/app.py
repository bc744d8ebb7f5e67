"""The Starlette app: `POST /v1/tag`, `POST /v1/attention`, `GET /v1/info`, health, metrics, the page.

Every error is `{"error": "..."}` with a 4xx/5xx status; nothing a client sends can stop
the batcher or the process. Images are decoded on worker threads, after the body size and
the pixel count in the image header have passed the limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Any, AsyncIterator

import numpy as np
import prometheus_client as prom
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nxtp_jax.data import preprocess
from nxtp_jax.serve import page
from nxtp_jax.serve.batcher import DEFAULT_NUM_LABELS, Batcher, Runner


@dataclasses.dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000  # from the header, before decoding (decompression bombs)
    max_queue: int = 256
    timeout_s: float = 60.0
    retry_after_s: int = 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"request body of {length} bytes is above the limit of {limit} bytes; send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is above the limit of {limit} bytes; send a smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_image_and_params(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    """The image bytes (raw image/* body or multipart field `image`) and the query + form parameters."""
    content_type = request.headers.get("content-type", "")
    params = dict(request.query_params)
    media = content_type.split(";")[0].strip().lower()
    if media.startswith("image/"):
        return await read_body(request, limit), params
    if media != "multipart/form-data":
        raise ApiError(
            415,
            f"expected Content-Type image/* (the image as the body) or multipart/form-data with a field 'image', "
            f"found {content_type or 'none'!r}",
        )
    body = await read_body(request, limit)

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(Headers(raw=request.headers.raw), stream(), max_files=1, max_part_size=limit).parse()
    except MultiPartException as e:
        raise ApiError(400, f"unreadable multipart body: {e.message}")
    try:
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "multipart body has no file field 'image'; send the image as the field 'image'")
        data = await upload.read()
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    finally:
        await form.close()
    return data, params


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


def parse_int(params: dict[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer in [{lo}, {hi}], found {raw!r}")
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be in [{lo}, {hi}], found {value}")
    return value


def parse_min_prob(params: dict[str, str]) -> float:
    raw = params.get("min_prob")
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"min_prob must be a number in [0, 1], found {raw!r}")
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise ApiError(400, f"min_prob must be in [0, 1], found {raw}")
    return value


class Service:
    """The model, the batcher and the readiness flag behind the endpoints."""

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
        self.batcher: Batcher | None = None

    # -- lifecycle -----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.batcher = Batcher(
            self.runner.tag, self.runner.label_sizes, max_batch=self.max_batch, max_wait_s=self.max_wait_s,
            max_queue=self.limits.max_queue, on_batch=self.metrics.batch_size.observe,
        )
        warm = asyncio.create_task(self._warm_up())
        loop = asyncio.create_task(self.batcher.serve_forever())
        try:
            yield
        finally:
            warm.cancel()
            loop.cancel()
            self.batcher.device.shutdown(wait=False, cancel_futures=True)

    async def _warm_up(self) -> None:
        await self.batcher.on_device(self.runner.warm_up)
        self.ready.set()

    # -- endpoints -----------------------------------------------------------------

    async def tag(self, request: Request) -> Response:
        data, params = await read_image_and_params(request, self.limits.max_body_bytes)
        k = parse_int(params, "num_labels", self.default_num_labels, 1, self.runner.max_num_labels)
        min_prob = parse_min_prob(params)
        vocab = params.get("vocab") or None
        if vocab is not None and vocab not in self.runner.vocabs:
            known = ", ".join(sorted(self.runner.vocabs)) or "none were loaded (start the server with --vocab=NAME:FILE)"
            raise ApiError(400, f"unknown vocab {vocab!r}; known: {known}")
        self._check_ready()
        x = await asyncio.to_thread(self._normalised, data)
        try:
            future = self.batcher.submit(x, k, min_prob, vocab)
        except asyncio.QueueFull:
            raise ApiError(
                503, f"the queue is full ({self.limits.max_queue} images waiting); retry later",
                {"Retry-After": str(self.limits.retry_after_s)},
            )
        self.metrics.queue_depth.set(self.batcher.waiting)
        labels = await future
        return JSONResponse({"labels": [{"label": label, "prob": float(p)} for label, p in labels]})

    async def attention(self, request: Request) -> Response:
        data, params = await read_image_and_params(request, self.limits.max_body_bytes)
        cfg = self.tagger.model.config
        layer = parse_int(params, "layer", cfg.decoder.layers - 1, 0, cfg.decoder.layers - 1)
        head = parse_int(params, "head", 0, 0, cfg.decoder.n_heads - 1)
        self._check_ready()
        image = await asyncio.to_thread(decode_image, data, self.limits.max_pixels)
        grids = await self.batcher.on_device(self.runner.attention, image)
        return JSONResponse(
            {"layer": layer, "head": head, "num_layers": int(grids.shape[0]), "num_heads": int(grids.shape[1]),
             "grid": np.asarray(grids[layer, head], np.float64).tolist()}
        )

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

    def _normalised(self, data: bytes) -> np.ndarray:
        """Checked, decoded, resized, cropped and normalised: [R, R, 3] (on a worker thread)."""
        return self.tagger.preprocess([decode_image(data, self.limits.max_pixels)])[0]

    def _check_ready(self) -> None:
        if not self.ready.is_set():
            raise ApiError(503, "warming up: the model is still compiling; retry once GET /readyz is 200",
                           {"Retry-After": str(self.limits.retry_after_s)})

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
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
            return response

        return endpoint


async def http_error(request: Request, exc: HTTPException) -> Response:
    return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")


def create_app(service: Service) -> Starlette:
    o = service.observed
    routes = [
        Route("/v1/tag", o("tag", service.tag), methods=["POST"]),
        Route("/v1/attention", o("attention", service.attention), methods=["POST"]),
        Route("/v1/info", o("info", service.info), methods=["GET"]),
        Route("/healthz", o("healthz", service.healthz), methods=["GET"]),
        Route("/readyz", o("readyz", service.readyz), methods=["GET"]),
        Route("/metrics", service.metrics_text, methods=["GET"]),
        *page.routes(),
    ]
    return Starlette(routes=routes, lifespan=service.lifespan, exception_handlers={HTTPException: http_error})
