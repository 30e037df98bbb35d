"""The HTTP service: FastAPI routes over a Runner, with every limit answered as a JSON error.

POST /v1/detect takes one image (multipart field `image`, or the raw body with an image content type) and answers
the object `zoomin detect --json` writes for it; several images (multipart field `images`, repeated) get
{"results": [...]}, one object per image in order, each with its own `error`. Options come as form fields or
query parameters: `regions` and `zoom_regions` (JSON lists of [x1, y1, x2, y2] or {"box": [...], "label": ...}
in original pixels), `max_new_tokens`.

Errors: 400 a malformed parameter (named), 413 a body or image over the limits, 415 no image, 422 an image that
cannot be decoded, 429 queue full (Retry-After), 503 not ready or shutting down, 504 request timeout,
507 out of memory on that image.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from zoomin.runtime.batch import scheduler_of
from zoomin.runtime.image_io import ImageError, ImageTooLarge, load_image
from zoomin.runtime.pipeline import DeadlineExceeded, DetectResult, out_of_memory, result_record

from .config import ServeConfig
from .metrics import Metrics
from .runner import Job, QueueFull, Runner, ShuttingDown

log = logging.getLogger("zoomin.serve")

OPTION_FIELDS = ("regions", "zoom_regions", "max_new_tokens")


class HTTPError(Exception):
    """An answer other than 200: status, a one-line message, and extra JSON fields / headers."""

    def __init__(self, status: int, message: str, *, outcome: str, headers: dict[str, str] | None = None,
                 **fields: Any):
        super().__init__(message)
        self.status, self.message, self.outcome = status, message, outcome
        self.headers, self.fields = headers or {}, fields

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, **self.fields}, status_code=self.status, headers=self.headers)


class Service:
    """What the routes share: settings, metrics, and (once loaded) the runner and the engine summary."""

    def __init__(self, cfg: ServeConfig, load_detectors):
        self.cfg = cfg
        self.metrics = Metrics()
        self.runner: Runner | None = None
        self.engine_info: dict[str, Any] = {}
        self.load_error: str | None = None
        self._load_detectors = load_detectors
        self.draining = False

    def load(self) -> None:
        try:
            detectors, self.engine_info = self._load_detectors(self.cfg)
            for scheduler in {id(s): s for d in detectors if (s := scheduler_of(d)) is not None}.values():
                scheduler.observers.append(self.metrics.decode_batch_size.observe)
            self.runner = Runner(detectors, max_queue=self.cfg.max_queue, on_done=self._job_done)
        except Exception as e:  # reported by /ready and every request, never a crash of the server
            self.load_error = f"cannot load the engine: {e}"
            log.error(self.load_error)

    def _job_done(self, job: Job, result: DetectResult | None, error: BaseException | None) -> None:
        self.metrics.images.labels("ok" if error is None else _outcome(error)).inc()
        if result is not None:
            self.metrics.observe_result(result)
        self._gauges()

    def _gauges(self) -> None:
        if self.runner is not None:
            self.metrics.queue_depth.set(self.runner.depth)
            self.metrics.running.set(self.runner.running)

    async def detect(self, request: Request) -> dict[str, Any]:
        if self.runner is None or self.draining:
            raise HTTPError(503, self.load_error or ("shutting down" if self.draining else "the engine is loading"),
                            outcome="unavailable", headers={"Retry-After": "5"})
        deadline = time.monotonic() + self.cfg.request_timeout_s
        uploads, params, batch = await read_request(request, self.cfg)
        options = parse_options(params, self.cfg)
        decoded = await run_in_threadpool(lambda: [self._decode(name, data) for name, data in uploads])
        if not batch and isinstance(decoded[0][1], HTTPError):
            raise decoded[0][1]
        jobs = [Job(rgb, name, options, deadline) for name, rgb in decoded if not isinstance(rgb, HTTPError)]
        try:
            self.runner.submit_all(jobs)
        except QueueFull as e:
            raise HTTPError(429, str(e), outcome="queue_full",
                            headers={"Retry-After": str(math.ceil(e.retry_after_s))}) from None
        except ShuttingDown as e:
            raise HTTPError(503, str(e), outcome="unavailable") from None
        self._gauges()
        grace = 5.0  # a job stops at its next decode step; a long prefill may run a little past the deadline
        waits = [asyncio.wrap_future(j.future) for j in jobs]
        done, _ = await asyncio.wait(waits, timeout=max(0.0, deadline - time.monotonic()) + grace) if waits else ((), ())
        answers = iter(zip(jobs, waits))
        records = []
        for name, rgb in decoded:
            if isinstance(rgb, HTTPError):
                records.append({"path": name, "error": rgb.message, "status": rgb.status})
                continue
            job, fut = next(answers)
            if fut not in done:
                records.append(_error_record(job.name, HTTPError(504, f"{job.name}: request timed out after "
                                                                      f"{self.cfg.request_timeout_s:g} s",
                                                                 outcome="timeout")))
                continue
            error = fut.exception()
            records.append(result_record(job.name, fut.result(), None) if error is None
                           else _error_record(job.name, _http_error(job.name, error, self.cfg)))
        if batch:
            return {"results": records}
        if records[0]["error"] is not None:
            raise HTTPError(records[0]["status"], records[0]["error"], outcome=_status_outcome(records[0]["status"]),
                            path=records[0]["path"])
        return records[0]

    def _decode(self, name: str, data: bytes):
        try:
            return name, load_image(data, max_pixels=self.cfg.max_image_pixels)
        except ImageTooLarge as e:
            return name, HTTPError(413, f"{name}: {e.problem}", outcome="too_large", path=name)
        except ImageError as e:
            return name, HTTPError(422, f"{name}: {e.problem}", outcome="unprocessable", path=name)
        except MemoryError as e:
            return name, HTTPError(507, f"{name}: out of memory while decoding ({e})", outcome="out_of_memory",
                                   path=name)


def _http_error(name: str, error: BaseException, cfg: ServeConfig) -> HTTPError:
    if isinstance(error, DeadlineExceeded):
        return HTTPError(504, f"{name}: request timed out after {cfg.request_timeout_s:g} s ({error})",
                         outcome="timeout")
    if isinstance(error, ImageError):  # e.g. over the protocol's image-token limit with oversize=refuse
        return HTTPError(422, str(error), outcome="unprocessable")
    detail = out_of_memory(error)
    if detail is not None:
        return HTTPError(507, f"{name}: out of memory ({detail})", outcome="out_of_memory")
    log.error("internal error on %s", name, exc_info=error)
    return HTTPError(500, f"{name}: internal error ({type(error).__name__}: {error})", outcome="error")


def _error_record(name: str, e: HTTPError) -> dict[str, Any]:
    return {"path": name, "error": e.message, "status": e.status}


_OUTCOMES = {400: "bad_request", 413: "too_large", 415: "unsupported", 422: "unprocessable", 429: "queue_full",
             503: "unavailable", 504: "timeout", 507: "out_of_memory"}


def _status_outcome(status: int) -> str:
    return _OUTCOMES.get(status, "error")


def _outcome(error: BaseException) -> str:
    if isinstance(error, DeadlineExceeded):
        return "timeout"
    if isinstance(error, ImageError):
        return "unprocessable"
    return "out_of_memory" if out_of_memory(error) else "error"


# -- request parsing ------------------------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused as soon as it is known to pass `limit` bytes (declared length or bytes read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes",
                        outcome="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, f"request body exceeds the limit of {limit} bytes", outcome="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_request(request: Request, cfg: ServeConfig) -> tuple[list[tuple[str, bytes]], dict[str, str], bool]:
    """(uploads as (name, bytes), option fields, batch form?) from a multipart form or a raw image body."""
    body = await read_body(request, cfg.max_body_bytes)
    params = {k: v for k, v in request.query_params.items() if k in OPTION_FIELDS}
    unknown = sorted(set(request.query_params) - set(OPTION_FIELDS))
    if unknown:
        raise HTTPError(400, f"unknown parameter {unknown[0]!r}; accepted: {', '.join(OPTION_FIELDS)}",
                        outcome="bad_request", field=unknown[0])
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=cfg.max_images + 1, max_fields=16)
        except Exception as e:  # python-multipart / starlette parse errors
            raise HTTPError(400, f"malformed multipart body ({e})", outcome="bad_request") from None
        single = [v for v in form.getlist("image") if isinstance(v, UploadFile)]
        many = [v for v in form.getlist("images") if isinstance(v, UploadFile)]
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key not in ("image", "images"):
                    raise HTTPError(400, f"unexpected file field {key!r}; send `image` or `images`",
                                    outcome="bad_request", field=key)
            elif key in OPTION_FIELDS:
                params[key] = value
            else:
                raise HTTPError(400, f"unknown field {key!r}; accepted: image, images, {', '.join(OPTION_FIELDS)}",
                                outcome="bad_request", field=key)
        if single and many or len(single) > 1:
            raise HTTPError(400, "send one `image` or several `images`, not both", outcome="bad_request",
                            field="image")
        files = single or many
        if not files:
            raise HTTPError(415, "no image: send a multipart `image` / `images` file or an image body",
                            outcome="unsupported")
        if len(files) > cfg.max_images:
            raise HTTPError(413, f"{len(files)} images exceed the limit of {cfg.max_images} per request",
                            outcome="too_large", field="images")
        uploads = [(f.filename or f"<upload {i}>", await f.read()) for i, f in enumerate(files)]
        return uploads, params, bool(many)
    if not body:
        raise HTTPError(415, "no image: send a multipart `image` / `images` file or an image body",
                        outcome="unsupported")
    if ctype.startswith(("application/json", "text/", "application/x-www-form-urlencoded")):
        raise HTTPError(415, f"content type {ctype!r} is not an image", outcome="unsupported")
    return [("<body>", body)], params, False


def parse_options(params: dict[str, str], cfg: ServeConfig) -> dict[str, Any]:
    """ZoomIn.detect keyword arguments from the request's option fields; 400 naming the field when malformed."""
    options: dict[str, Any] = {}
    if "max_new_tokens" in params:
        raw = params["max_new_tokens"]
        try:
            value = int(raw)
        except ValueError:
            raise HTTPError(400, f"max_new_tokens: not an integer ({raw!r})", outcome="bad_request",
                            field="max_new_tokens") from None
        if not 1 <= value <= cfg.max_new_tokens:
            raise HTTPError(400, f"max_new_tokens: {value} is outside 1..{cfg.max_new_tokens}",
                            outcome="bad_request", field="max_new_tokens")
        options["max_new_tokens"] = value
    for key in ("regions", "zoom_regions"):
        if key in params:
            options[key] = parse_regions(key, params[key])
    return options


def parse_regions(key: str, raw: str) -> list:
    """[x1, y1, x2, y2] boxes, optionally labelled ({"box": [...], "label": ...} or [[...], "label"])."""
    def bad(why: str) -> HTTPError:
        return HTTPError(400, f"{key}: {why}", outcome="bad_request", field=key)

    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, list):
        raise bad("expected a JSON list of boxes")
    out = []
    for i, item in enumerate(value):
        label = None
        if isinstance(item, dict):
            box, label = item.get("box", item.get("bbox_2d")), item.get("label")
        elif isinstance(item, list) and len(item) == 2 and isinstance(item[1], str):
            box, label = item
        else:
            box = item
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
            raise bad(f"box {i} is not four finite numbers [x1, y1, x2, y2]")
        x1, y1, x2, y2 = (float(v) for v in box)
        if x2 <= x1 or y2 <= y1:
            raise bad(f"box {i} {box} is empty (needs x2 > x1 and y2 > y1)")
        if label is not None and not isinstance(label, str):
            raise bad(f"box {i}: label must be a string")
        out.append(((x1, y1, x2, y2), label) if label else (x1, y1, x2, y2))
    return out


# -- the app --------------------------------------------------------------------------------------------------

def load_engine_detectors(cfg: ServeConfig):
    """The runner's lanes on the engine, and the engine's summary for /v1/engine: one ZoomIn, or with max_batch
    > 1 that many whose decode steps are batched together (ZoomIn.lanes)."""
    from zoomin.runtime import ZoomIn

    zi = ZoomIn.load(cfg.engine, device=cfg.device, threads=cfg.threads, **dict(cfg.protocol_overrides))
    return ([zi] if cfg.max_batch == 1 else zi.lanes(cfg.max_batch)), engine_summary(zi)


def engine_summary(zi) -> dict[str, Any]:
    engine = zi.lm.engine
    m = engine.manifest
    text, vision = m.config.text, m.config.vision
    return {
        "engine": str(engine.root), "format_version": m.format_version, "precision": m.precision,
        "device": engine.device, "bytes": m.total_bytes, "provenance": m.provenance,
        "model": {"text_layers": text.num_hidden_layers, "hidden_size": text.hidden_size,
                  "vocab_size": text.vocab_size, "vision_depth": vision.depth},
        "protocol": zi.protocol.to_dict(),
    }


def create_app(cfg: ServeConfig, *, load_detectors=load_engine_detectors) -> FastAPI:
    """The service app; the engine loads in the background at startup (/health answers meanwhile)."""
    service = Service(cfg, load_detectors)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=service.load, name="zoomin-load", daemon=True)
        loader.start()
        yield
        service.draining = True  # uvicorn has finished in-flight requests; nothing new is admitted
        loader.join()
        if service.runner is not None:
            await run_in_threadpool(service.runner.close)

    app = FastAPI(title="zoomin", summary="ZoomIn forensic detector: real or AI-generated", lifespan=lifespan)
    app.state.service = service

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if service.runner is None or service.draining:
            reason = service.load_error or ("shutting down" if service.draining else "the engine is loading")
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        return {"ready": True, "queue_depth": service.runner.depth, "running": service.runner.running}

    @app.get("/metrics")
    async def metrics():
        service._gauges()
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/engine")
    async def engine():
        if service.runner is None:
            return JSONResponse({"error": service.load_error or "the engine is loading"}, status_code=503)
        return service.engine_info

    @app.post("/v1/detect")
    async def detect(request: Request):
        start = time.monotonic()
        try:
            answer = await service.detect(request)
        except HTTPError as e:
            service.metrics.requests.labels(e.outcome).inc()
            return e.response()
        finally:
            service.metrics.request_seconds.observe(time.monotonic() - start)
        service.metrics.requests.labels("ok").inc()
        return answer

    return app
