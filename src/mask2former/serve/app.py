"""The FastAPI application of `mask2former serve`.

    GET  /          the web page (static/index.html)
    POST /predict   an image (multipart field `image`, or the raw bytes) -> JSON, overlay PNG or label PNG
    GET  /health    200 once the model is loaded, 503 before
    GET  /info      model, classes, pre-processing, batching and limits
    GET  /metrics   Prometheus text

The model is loaded in a thread after the server starts listening (so /health can say it is not ready
yet); model inference and image decoding/encoding run in threads, never on the event loop. Errors are
JSON {"error": one line naming the problem, "status": code}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from mask2former.config import PIXEL_MEAN, PIXEL_STD
from mask2former.inference.predictor import DEFAULT_SCORE_THRESHOLD, TASKS, Predictor
from mask2former.serve import encode
from mask2former.serve.batcher import DynamicBatcher, QueueFullError
from mask2former.serve.limits import (
    MULTIPART,
    ServeLimits,
    UploadError,
    check_body_size,
    check_content_type,
    check_declared_length,
    decode_upload,
)
from mask2former.serve.memory import HeapTrimmer
from mask2former.serve.metrics import ServeMetrics
from mask2former.writers import meta_from_config

STATIC_DIR = Path(__file__).parent / "static"
ENDPOINTS = ("/", "/predict", "/health", "/info", "/metrics")
FILE_FIELDS = ("image", "file")
RETRY_AFTER_S = 1
ENCODE_THREADS = max(2, os.cpu_count() or 2)
log = logging.getLogger("mask2former.serve")


@dataclass
class ServeSettings:
    """Batching and bounds of one server."""

    max_batch: int = 8
    max_wait_ms: float = 5.0
    workers: int = 1  # batches run at once, each in its own thread
    limits: ServeLimits = field(default_factory=ServeLimits)


class Service:
    """What the endpoints share: the predictor once loaded, its batcher, the metrics."""

    def __init__(
        self,
        load_predictor: Callable[[], Predictor],
        settings: ServeSettings,
        on_load_error: Callable[[BaseException], None] | None = None,
    ):
        self.load_predictor = load_predictor
        self.settings = settings
        self.on_load_error = on_load_error
        self.predictor: Predictor | None = None
        self.meta = None  # DatasetMeta of the loaded model
        self.batcher: DynamicBatcher | None = None
        self.load_error: str | None = None
        self.metrics = ServeMetrics(queue_depth=lambda: self.batcher.depth if self.batcher else 0)
        self.limiter: anyio.CapacityLimiter | None = None  # threads decoding uploads / encoding answers

    async def in_thread(self, function, *args):
        """function(*args) in a worker thread; at most a few at once (CPU-bound work, bounded memory)."""
        if self.limiter is None:
            self.limiter = anyio.CapacityLimiter(ENCODE_THREADS)
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)

    @property
    def ready(self) -> bool:
        return self.predictor is not None

    async def load(self) -> None:
        try:
            predictor = await asyncio.to_thread(self.load_predictor)
        except Exception as error:  # noqa: BLE001 - reported by /health and the on_load_error callback
            self.load_error = " ".join(str(error).split()) or type(error).__name__
            log.error("mask2former serve: the model could not be loaded: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(error)
            return
        settings = self.settings
        self.meta = meta_from_config(predictor.config)
        trimmer = HeapTrimmer()

        def run_batch(images, task):
            try:
                # The official unthresholded results; each request applies its own threshold afterwards.
                return predictor.predict_batch(images, task, score_threshold=0.0)
            finally:
                trimmer.maybe_trim()  # a batch frees many blocks; keep RSS at what is in use

        self.batcher = DynamicBatcher(
            run_batch,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.limits.max_queue,
            workers=settings.workers,
            on_batch=self.metrics.batch_run,
        )
        self.batcher.start()
        self.predictor = predictor
        log.info("mask2former serve: model %s ready (%s)", predictor.config.name, predictor.source)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()


def create_app(
    load_predictor: Callable[[], Predictor],
    settings: ServeSettings | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The application; `load_predictor()` is called once, in a thread, after the server starts."""
    service = Service(load_predictor, settings or ServeSettings(), on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(service.load())
        yield
        # Shutdown comes after uvicorn has drained the in-flight requests; finish what is still queued.
        await loading
        await service.close()

    # The interactive docs pages load their scripts from a CDN; the service must work offline.
    app = FastAPI(title="mask2former", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(_MetricsMiddleware, metrics=service.metrics)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(UploadError, _upload_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ok", "model": service.predictor.config.name})
        state = f"model failed to load: {service.load_error}" if service.load_error else "loading the model"
        return _error(503, state, retry_after=service.load_error is None)

    @app.get("/info")
    async def info() -> JSONResponse:
        if not service.ready:
            return _not_ready(service)
        return JSONResponse(_info(service))

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/predict")
    async def predict(
        request: Request,
        task: str | None = None,
        threshold: float | None = None,
        output: str = "json",
        overlay: bool = False,
    ) -> Response:
        started = time.monotonic()
        if not service.ready:
            return _not_ready(service)
        predictor, limits = service.predictor, service.settings.limits
        task = task or predictor.config.task
        if threshold is None:  # as `mask2former predict`: instances below 0.5 dropped, other tasks unfiltered
            threshold = DEFAULT_SCORE_THRESHOLD if task == "instance" else 0.0
        _check_parameters(task, threshold, output)
        check_declared_length(request.headers.get("content-length"), limits)
        body = await _read_body(request, limits)
        kind = check_content_type(request.headers.get("content-type"))
        data = await _multipart_image(request, body) if kind == MULTIPART else body
        image = await service.in_thread(decode_upload, data, limits)
        remaining = limits.timeout_s - (time.monotonic() - started)
        try:
            prediction = await asyncio.wait_for(service.batcher.submit(image, task), max(remaining, 0.0))
        except QueueFullError as error:
            return _error(503, f"server busy: {error}; retry shortly", retry_after=True)
        except TimeoutError:
            return _error(504, f"no result within the per-request timeout of {limits.timeout_s:g} s")
        return await service.in_thread(_answer, service, prediction, threshold, output, overlay)

    return app


def _check_parameters(task: str, threshold: float, output: str) -> None:
    if task not in TASKS:
        raise UploadError(400, f"task {task!r} unknown; use one of {', '.join(TASKS)}")
    if output not in encode.OUTPUTS:
        raise UploadError(400, f"output {output!r} unknown; use one of {', '.join(encode.OUTPUTS)}")
    if output in ("panoptic_png", "semantic_png") and not output.startswith(task):
        raise UploadError(400, f"output {output} needs task={output.split('_')[0]}, not task={task}")
    if not threshold >= 0:
        raise UploadError(400, f"threshold {threshold} must be a number >= 0")


async def _read_body(request: Request, limits: ServeLimits) -> bytes:
    """The request body, refusing (413) as soon as it passes the upload limit."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_body_size(size, limits)
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_image(request: Request, body: bytes) -> bytes:
    """The bytes of the file field `image` (or `file`) of a multipart/form-data body."""

    async def once() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(request.headers, once(), max_files=1, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise UploadError(400, f"malformed multipart/form-data body: {error.message}") from None
    try:
        for name in FILE_FIELDS:
            value = form.get(name)
            if isinstance(value, UploadFile):
                return await value.read()
            if value is not None:
                raise UploadError(422, f"form field {name!r} is text, not a file upload")
        sent = ", ".join(repr(key) for key in form.keys()) or "none"
        raise UploadError(422, f"missing the file field 'image' of the multipart form (fields sent: {sent})")
    finally:
        await form.close()


def _answer(service: Service, prediction, threshold: float, output: str, overlay: bool) -> Response:
    """The response body for one prediction (runs in a thread: masks are encoded here)."""
    prediction = encode.apply_threshold(prediction, threshold)
    meta = service.meta
    if output == "overlay":
        return Response(encode.overlay_png(prediction, meta), media_type="image/png")
    if output == "panoptic_png":
        return Response(encode.panoptic_png(prediction.result), media_type="image/png")
    if output == "semantic_png":
        return Response(encode.semantic_png(prediction.result, meta), media_type="image/png")
    document = encode.prediction_json(prediction, meta, service.predictor.config.name, threshold, overlay)
    return Response(json.dumps(document), media_type="application/json")


def _info(service: Service) -> dict:
    predictor, meta = service.predictor, service.meta
    config = predictor.config
    classes = [
        {"class_id": k, "category_id": cid, "name": name, "isthing": bool(thing), "color": list(color)}
        for k, (cid, name, thing, color) in enumerate(
            zip(meta.category_ids, meta.class_names, meta.thing_classes, meta.colors, strict=True)
        )
    ]
    settings = service.settings
    return {
        "model": config.name,
        "source": predictor.source,
        "trained": predictor.trained,
        "task": config.task,
        "tasks": list(TASKS),
        "outputs": list(encode.OUTPUTS),
        "classes": classes,
        "preprocessing": {
            **asdict(config.input),
            "pixel_mean": list(PIXEL_MEAN),
            "pixel_std": list(PIXEL_STD),
        },
        "batching": {
            "max_batch": settings.max_batch,
            "max_wait_ms": settings.max_wait_ms,
            "workers": settings.workers,
        },
        "limits": asdict(settings.limits),
    }


def _error(status: int, message: str, retry_after: bool = False, close: bool = False) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry_after else {}
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _not_ready(service: Service) -> JSONResponse:
    if service.load_error:
        return _error(503, f"model failed to load: {service.load_error}")
    return _error(503, "the model is still loading; retry shortly", retry_after=True)


async def _upload_error(request: Request, error: UploadError) -> JSONResponse:
    # After a refused oversized body the rest of it is unread: close the connection rather than read it.
    return _error(error.status, error.message, close=error.status == 413)


async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in item.get('loc', ())[1:]) or 'request'}: {item.get('msg', '')}"
        for item in error.errors()
    )
    return _error(422, f"bad parameter: {problems}")


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("mask2former serve: %s %s failed", request.method, request.url.path, exc_info=error)
    message = " ".join(str(error).split()) or type(error).__name__
    return _error(500, f"internal error ({type(error).__name__}: {message})")


class _MetricsMiddleware:
    """Counts every HTTP request by endpoint and status and times it (plain ASGI, no per-request task)."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
        status = 500
        started = time.monotonic()

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.request_started()
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.request_finished(endpoint, status, time.monotonic() - started)
