"""HTTP server: `create_app(florence, ServeConfig()) -> FastAPI`, run by `fiore serve` under uvicorn.

Requests are validated up front (sizes, tasks, inputs) so bad input gets a 4xx before it costs any compute; valid
ones go into a bounded queue. One worker takes up to `max_batch` queued requests (waiting at most `max_wait_ms`
for more once the first arrives) and answers them with one `Predictor` pass in a thread (each image encoded once,
every request's tasks decoded together, whatever each one asks), so the event loop keeps accepting requests while
the model runs; a pass that fails is retried one request at a time, so only a request that fails gets its 500. A
full queue answers 503 with Retry-After rather than letting latency grow without bound. The server only reads the
bytes it is sent: it never fetches URLs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import time
import warnings
from collections import Counter
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from fiore.limits import DEFAULT_MAX_PIXELS
from fiore.predictor import COORDS

WEB_DIR = Path(__file__).parent / "web"


@dataclass
class ServeConfig:
    max_batch: int = 8  # requests per engine pass
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_queue: int = 64  # requests waiting; beyond this -> 503
    max_upload_bytes: int = 10 * 2**20  # whole request body
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_text_chars: int = 1000
    max_tasks: int = 16
    api_key: str | None = None
    retry_after_s: int = 1
    max_new_tokens: int | None = None  # cap on tokens generated per task (None: each task's own budget)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Job:
    """One validated HTTP request: an image and the `fiore.Request`s asked of it."""

    image: object  # PIL RGB
    requests: list  # fiore.request.Request
    future: asyncio.Future
    coords: str = "bin"  # fiore.predictor.COORDS: "expected" = sub-bin coordinates
    batch_sizes: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- batching


class Batcher:
    """Bounded queue + one worker that forms batches and runs them on the engine in a thread."""

    def __init__(self, florence, config: ServeConfig):
        self.florence, self.config = florence, config
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=config.max_queue)
        self.batch_sizes: Counter[int] = Counter()  # images per engine call -> count
        self.requests_per_pass: Counter[int] = Counter()
        self.rejected = 0
        self.abandoned = 0  # requests whose client disconnected while they waited
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass

    async def submit(
        self, image, requests, client_gone: Awaitable | None = None, coords: str = "bin"
    ) -> tuple[dict, list[int]]:
        """Queue one request and wait for its answer. `client_gone` completes when the client disconnects: a request
        still queued is then dropped before it reaches the engine (a finished answer is discarded)."""
        job = Job(image, requests, asyncio.get_running_loop().create_future(), coords)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.rejected += 1
            if client_gone is not None:
                client_gone.close()
            raise HTTPError(
                503, "server busy: request queue is full, retry later", {"Retry-After": str(self.config.retry_after_s)}
            ) from None
        watcher = asyncio.ensure_future(client_gone) if client_gone is not None else None
        try:
            await asyncio.wait([job.future] + ([watcher] if watcher else []), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            job.future.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if not job.future.done():  # the client went away first
            job.future.cancel()  # the worker skips cancelled jobs
            self.abandoned += 1
            raise HTTPError(499, "client closed the request")
        return job.future.result(), job.batch_sizes

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.config.max_wait_ms / 1000
            while len(batch) < self.config.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [j for j in batch if not j.future.done()]  # clients that gave up
            if not batch:
                continue
            self.requests_per_pass[len(batch)] += 1
            outcomes = await asyncio.to_thread(self._execute, batch)
            for job, outcome in zip(batch, outcomes, strict=True):
                if job.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)

    def _execute(self, batch: list[Job]) -> list:
        """Runs in the worker thread: the whole batch in one predictor pass; if it fails, each job alone, so one
        failing request does not take the others down."""
        try:
            return self._answer(batch)
        except Exception as e:
            if len(batch) == 1:  # alone already: no second try
                return [HTTPError(500, f"generation failed: {type(e).__name__}: {e}")]
        outcomes: list = []
        for job in batch:
            try:
                outcomes += self._answer([job])
            except Exception as e:
                outcomes.append(HTTPError(500, f"generation failed: {type(e).__name__}: {e}"))
        return outcomes

    def _answer(self, batch: list[Job]) -> list[dict]:
        """One predictor pass per coordinate decoding asked in the batch (almost always one), answers in order."""
        outcomes: dict[int, dict] = {}
        for coords in dict.fromkeys(job.coords for job in batch):
            group = [i for i, job in enumerate(batch) if job.coords == coords]
            predictor = self.florence.predictor() if coords == "bin" else self.florence.predictor(coords=coords)
            predictor.set_images([batch[i].image for i in group])
            answers = predictor.predict([batch[i].requests for i in group])
            self.batch_sizes[len(group)] += 1
            for i, results in zip(group, answers, strict=True):
                batch[i].batch_sizes.append(len(group))
                pairs = zip(batch[i].requests, results, strict=True)
                outcomes[i] = {request.task.name: result_json(result) for request, result in pairs}
        return [outcomes[i] for i in range(len(batch))]


async def client_gone(request: Request) -> None:
    """Completes when the client disconnects. The body has been read, so the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def result_json(result) -> dict:
    value = result.to_json()
    return json.loads(value) if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------- parsing


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) before reading when Content-Length says it is too large, and while
    reading when a chunked body grows past the limit."""
    declared = request.headers.get("content-length")
    too_big = HTTPError(413, f"request body larger than the limit of {limit} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def decode_image(data: bytes, max_pixels: int):
    """PIL RGB image from bytes via `fiore.processor.load_image`; over `max_pixels` (read from the header, before
    any decoding) -> 413, unreadable -> 400."""
    from PIL import Image

    from fiore.processor import ImageError, load_image

    if not data:
        raise HTTPError(400, "image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
    except Image.DecompressionBombError as e:  # a header past PIL's own limit: too large, not malformed
        raise HTTPError(413, f"image is too large ({e})") from None
    except Exception:
        w = h = 0  # not an image: load_image names the problem below
    if w * h > max_pixels:
        raise HTTPError(413, f"image has {w}x{h}={w * h} pixels, more than the limit of {max_pixels}")
    try:
        return load_image(data, max_pixels=max_pixels)
    except ImageError as e:
        raise HTTPError(400, f"cannot read image: {e}") from None


def decode_base64_image(value) -> bytes:
    if not isinstance(value, str) or not value:
        raise HTTPError(400, '"image" must be a base64 string of the image bytes')
    if value.lower().startswith(("http://", "https://", "ftp://", "file:")):
        raise HTTPError(400, "the server does not fetch URLs; send the image bytes as base64")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, '"image" is not valid base64') from None


def validate(image, task_names: list[str], text, region, config: ServeConfig) -> list:
    """The `fiore.Request`s of an HTTP request, checked against its image; size limits answer 413, other bad input
    400."""
    from fiore.request import requests_for
    from fiore.tasks import TaskInputError

    if text is not None and not isinstance(text, str):
        raise HTTPError(400, '"text" must be a string')
    if text is not None and len(text) > config.max_text_chars:
        raise HTTPError(413, f"text has {len(text)} characters, more than the limit of {config.max_text_chars}")
    if len(task_names) > config.max_tasks:
        raise HTTPError(400, f"{len(task_names)} tasks asked; at most {config.max_tasks} per request")
    try:
        requests = requests_for(task_names, text, region, config.max_new_tokens)
        for r in requests:
            r.prompt(image.size)
    except TaskInputError as e:
        raise HTTPError(400, str(e)) from None
    return requests


def _boundary(content_type: str) -> bytes | None:
    """The multipart boundary named in a Content-Type header, if any."""
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    return None


async def parse_predict(request: Request, config: ServeConfig):
    """(image, task names, text, region, coords) from a multipart form or a JSON body. `coords`: "bin" (each
    coordinate at its bin's centre, the default) or "expected" (sub-bin, `fiore.predictor.Predictor`'s option)."""
    body = await read_body(request, config.max_upload_bytes)
    ctype = request.headers.get("content-type", "")
    if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        boundary = _boundary(ctype)
        if boundary is not None and b"--" + boundary + b"--" not in body:
            raise HTTPError(400, "multipart body is truncated: its closing boundary is missing")
        try:
            form = await Request(request.scope, replay).form(max_part_size=config.max_upload_bytes)
        except Exception as e:
            raise HTTPError(400, f"malformed multipart form: {e}") from None
        for field_name in ("image", "text", "region", "coords"):
            if len(form.getlist(field_name)) > 1:
                raise HTTPError(400, f'{len(form.getlist(field_name))} "{field_name}" fields; a request takes one')
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPError(400, 'missing file field "image" (the server does not fetch URLs)')
        data = await upload.read()
        names = [n.strip() for v in form.getlist("task") + form.getlist("tasks") for n in str(v).split(",")]
        text = form.get("text")
        region = form.get("region")
        coords = form.get("coords", "bin")
    elif ctype.startswith("application/json"):
        try:
            payload = json.loads(body)
        except ValueError as e:
            raise HTTPError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(payload, dict):
            raise HTTPError(400, "JSON body must be an object")
        if "image" not in payload:
            raise HTTPError(400, 'missing "image" (base64 of the image bytes)')
        data = decode_base64_image(payload["image"])
        names = payload.get("tasks", payload.get("task", []))
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise HTTPError(400, '"tasks" must be a list of task names')
        text, region, coords = payload.get("text"), payload.get("region"), payload.get("coords", "bin")
    else:
        raise HTTPError(415, "send multipart/form-data (field image + task) or application/json")
    if coords not in COORDS:
        raise HTTPError(400, f'"coords" must be one of {", ".join(COORDS)}; got {coords!r}')
    image = decode_image(data, config.max_pixels)
    return image, [n for n in names if n], text, region, coords


# ---------------------------------------------------------------------------------------------- app


def create_app(florence, config: ServeConfig | None = None) -> FastAPI:
    """The fastapi app serving `florence` (anything whose `predictor()` has `set_images` and `predict`)."""
    config = config or ServeConfig()
    batcher = Batcher(florence, config)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="fiore",
        summary="One vision model for many tasks: detection, captioning, OCR, grounding, segmentation.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.config = config

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise HTTPError(401, "missing or wrong API key (X-API-Key header)", {"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "queued": batcher.queue.qsize()}

    @app.get("/v1/tasks")
    async def list_tasks(request: Request) -> list[dict]:
        """Every task: name, task token and the input it takes ("none", "text" or "region")."""
        from fiore import tasks as registry

        authorize(request)
        return [{"name": t.name, "token": t.token, "inputs": t.inputs} for t in registry.all()]

    @app.get("/v1/stats")
    async def stats(request: Request) -> dict:
        """Batch sizes formed so far: images per engine call and requests per worker pass."""
        authorize(request)
        return {
            "engine_batch_sizes": {str(k): v for k, v in sorted(batcher.batch_sizes.items())},
            "requests_per_pass": {str(k): v for k, v in sorted(batcher.requests_per_pass.items())},
            "rejected_overload": batcher.rejected,
            "abandoned": batcher.abandoned,
            "queued": batcher.queue.qsize(),
            "max_batch": config.max_batch,
            "max_queue": config.max_queue,
        }

    @app.post(
        "/v1/predict",
        openapi_extra={
            "requestBody": {
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image", "task"],
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                "task": {"type": "array", "items": {"type": "string"}},
                                "text": {"type": "string"},
                                "region": {"type": "string", "description": "x1,y1,x2,y2 in pixels"},
                                "coords": {"type": "string", "enum": ["bin", "expected"], "default": "bin"},
                            },
                        }
                    },
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["image", "tasks"],
                            "properties": {
                                "image": {"type": "string", "description": "base64 of the image file bytes"},
                                "tasks": {"type": "array", "items": {"type": "string"}},
                                "text": {"type": "string"},
                                "region": {"type": "array", "items": {"type": "number"}, "minItems": 4},
                                "coords": {"type": "string", "enum": ["bin", "expected"], "default": "bin"},
                            },
                        }
                    },
                },
                "required": True,
            }
        },
    )
    async def predict(request: Request) -> JSONResponse:
        """Run one or more tasks on one image; the answer is a JSON object keyed by task name."""
        authorize(request)
        start = time.perf_counter()
        image, names, text, region, coords = await parse_predict(request, config)
        requests = validate(image, names, text, region, config)
        answer, sizes = await batcher.submit(image, requests, client_gone(request), coords)
        headers = {
            "X-Fiore-Batch-Size": str(max(sizes, default=0)),
            "X-Fiore-Time-Ms": f"{(time.perf_counter() - start) * 1000:.1f}",
        }
        return JSONResponse(answer, headers=headers)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    return app


def serve(florence, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None) -> None:
    """Run the server in the foreground (blocks)."""
    import uvicorn

    uvicorn.run(create_app(florence, config), host=host, port=port, log_level="info")
