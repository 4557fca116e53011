"""The HTTP API and web page for a bundle (FastAPI; run it with uvicorn or `graft serve`).

    POST /predict   one or more image files (multipart field `files`) -> top-k per image (JSON);
                    a multi-label bundle: each image's label set, `?threshold=` to override
    GET  /healthz   liveness, the model (its task, a multi-label bundle's thresholds) and the limits
    GET  /          a self-contained page to drop images on
    GET  /docs      OpenAPI docs (the schema itself is /openapi.json)

The bundle is loaded once, when the app is created. Decoding and inference run in Starlette's
thread pool, so requests never block the event loop; forward passes take a lock, one at a time,
because on CPU one pass already uses every core and parallel passes only add memory.

Every refused request is a 4xx with a JSON body `{"detail": "<what was wrong and the fix>"}`:
413 for a body, file, image count or pixel count over the limits, 422 for an empty, truncated or non-image file
(`"file"` names it), for a request without files, and for a `threshold` out of 0..1 or sent to
a single-label bundle.
"""

from __future__ import annotations

import importlib.util
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, MutableMapping

from graft.extras import require_extra

# Before the imports below, so that a missing extra names `graft[serve]` instead of a module.
require_extra("serve", "fastapi", "starlette")
if importlib.util.find_spec("python_multipart") is None and importlib.util.find_spec("multipart") is None:
    require_extra("serve", "python_multipart")

from fastapi import FastAPI, File, Form, Query, Request, UploadFile  # noqa: E402
from fastapi.encoders import jsonable_encoder  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import HTMLResponse, JSONResponse  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from graft.choices import UNKNOWN_MODES  # noqa: E402
from graft.errors import ConfigError, ImageError, ImageTooLargeError  # noqa: E402
from graft.input.images import MAX_IMAGE_PIXELS, image_size, load_image
from graft.ranges import IMAGES_PER_REQUEST, TOP_K, UPLOAD_BYTES, check_number  # noqa: E402
from graft.serve.page import PAGE_HTML  # noqa: E402
from graft.shipping.bundle import Bundle, load_bundle  # noqa: E402
from graft.shipping.multilabel import check_threshold  # noqa: E402
from graft.speed.allocator import release_free_memory

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_IMAGES = 16
DEFAULT_TOP_K = 5
# Pixels are what decoding costs (a 12 KB 1-bit PNG can declare 100 M of them), so they are bounded
# from the image headers, before any decoding: a 12 MP phone photo passes, 16 of them per request.
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_REQUEST_PIXELS = 200_000_000
# A request whose images declare more pixels than this gives the freed decoding memory back to
# the OS afterwards (graft.speed.allocator.release_free_memory): it would otherwise stay in the malloc
# arena of whichever thread decoded it, one arena per thread, for the life of the server.
RELEASE_AFTER_PIXELS = 16_000_000
# Room for the multipart boundaries and part headers on top of the files themselves.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
# Nothing but this origin: the page is self-contained and must stay so.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'self'"
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def create_app(
    bundle: Bundle | str | Path,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_images: int = DEFAULT_MAX_IMAGES,
    top_k: int = DEFAULT_TOP_K,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS,
    unknown: str = "auto",
    threshold: float | None = None,
) -> FastAPI:
    """A FastAPI app that predicts with `bundle` (a `Bundle` or its folder, loaded once here).

    `max_upload_bytes` bounds each image file, `max_images` the files per request; `top_k` is
    the default number of labels per image (a request may ask for fewer or more with `?top_k=`).
    `max_pixels` bounds the pixels each image declares in its header, `max_request_pixels` their
    sum over a request; both are checked before decoding, and an image over them gets a 413.
    `unknown` ("auto" or "off") as `Bundle.predict`'s: "auto" answers "unknown", with its
    `unknown_score`, for an image unlike the bundle's training images. `threshold` (multi-label
    bundles) replaces the per-label thresholds stored in the bundle with one for every label,
    unless a request gives its own (`?threshold=` or a form field `threshold`).

    Memory stays flat whatever is uploaded: each image is decoded at the size the model needs
    (`load_image(min_size=...)`), and the server decodes at most `max_pixels` pixels at a time,
    whatever the number of requests in flight.

    >>> import uvicorn
    >>> uvicorn.run(create_app("runs/birds/bundle"), host="127.0.0.1", port=8000)
    """
    _check_limits(max_upload_bytes, max_images, top_k, max_pixels, max_request_pixels)
    if unknown not in UNKNOWN_MODES:
        raise ConfigError(f"{unknown!r} is not one of {', '.join(UNKNOWN_MODES)}", parameter="unknown")
    check_threshold(threshold)
    model = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if threshold is not None:
        _check_multilabel(model)

    app = FastAPI(
        title="graft",
        summary=f"Image classifier: {model.backbone}, {len(model.class_names)} {_kind(model)}",
        description="Predict labels of images with a graft bundle. `POST /predict` with image files.",
        version=str(model.meta.get("graft_version", "")),
    )
    app.state.bundle = model
    max_body = max_images * max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(BodySizeLimit, max_bytes=max_body)

    _add_page_and_explanations(app)

    limits = {
        "top_k": top_k, "max_upload_bytes": max_upload_bytes, "max_images": max_images,
        "max_pixels": max_pixels, "max_request_pixels": max_request_pixels,
    }
    _add_health(app, model, limits, threshold)

    _add_predict(app, model, limits, unknown, threshold)

    return app


def _check_limits(max_upload_bytes: int, max_images: int, top_k: int, max_pixels: int, max_request_pixels: int) -> None:
    """`ConfigError` naming the first of `create_app`'s limits that is out of its range."""
    check_number("max_upload_bytes", max_upload_bytes, UPLOAD_BYTES)
    check_number("max_images", max_images, IMAGES_PER_REQUEST)
    check_number("top_k", top_k, TOP_K)
    if not 1 <= max_pixels <= MAX_IMAGE_PIXELS:
        raise ConfigError(
            f"expected 1 pixel to {MAX_IMAGE_PIXELS // 1_000_000} megapixels (graft's limit for any image), "
            f"got {max_pixels:,} pixels", parameter="max_pixels",
        )
    if max_request_pixels < 1:
        raise ConfigError(f"expected a positive count, got {max_request_pixels:,} pixels", parameter="max_request_pixels")


def _add_page_and_explanations(app: FastAPI) -> None:
    """The web page at `/`, and a 422 that says what `POST /predict` expects."""

    @app.exception_handler(RequestValidationError)
    async def explain_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        detail = "the request is not valid"
        if request.url.path.rstrip("/").endswith("/predict"):
            detail = (
                "POST /predict expects multipart/form-data with one or more image files in the "
                "field 'files', e.g. curl -F files=@photo.jpg http://HOST/predict"
            )
        return JSONResponse(status_code=422, content={"detail": detail, "errors": _plain(error.errors())})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})


def _kind(model: Bundle) -> str:
    return "labels (multi-label)" if model.task == "multilabel" else "classes"


def _add_predict(app: FastAPI, model: Bundle, limits: dict[str, int], unknown: str, threshold: float | None) -> None:
    """`POST /predict`: each upload checked against the limits, decoded at the model's size, predicted."""
    top_k, max_images, max_upload_bytes = limits["top_k"], limits["max_images"], limits["max_upload_bytes"]
    max_pixels, max_request_pixels = limits["max_pixels"], limits["max_request_pixels"]
    inference_lock = threading.Lock()
    decoding = PixelBudget(max_pixels)
    min_size = model.preprocessing.resize_size

    @app.post(
        "/predict",
        summary="Top-k labels (a multi-label bundle: the label set) for one or more images",
        responses={
            413: {"description": "Too many files, or a file, an image's pixels or the request is too large"},
            422: {"description": "An empty, truncated or non-image file, no files at all, or a threshold out of 0..1"},
        },
    )
    async def predict(
        files: list[UploadFile] = File(..., description="Image files (JPEG, PNG, WebP, BMP, GIF, TIFF...)"),
        k: int | None = Query(None, alias="top_k", ge=1, description=f"Labels per image (default {top_k})"),
        query_threshold: str | None = Query(None, alias="threshold", description=THRESHOLD_HELP),
        form_threshold: str | None = Form(None, alias="threshold", description=THRESHOLD_HELP),
    ) -> Any:
        try:
            cut = _request_threshold(model, query_threshold, form_threshold, threshold)
        except ConfigError as error:
            return _refuse(422, str(error))
        if len(files) > max_images:
            return _refuse(413, f"{len(files)} files in one request, the limit is {max_images}; send them in several requests")
        payloads = await _read_uploads(files, max_upload_bytes)
        if isinstance(payloads, JSONResponse):
            return payloads
        try:
            sizes = await run_in_threadpool(_image_sizes, payloads)
            refusal = _over_pixel_limits(payloads, sizes, max_pixels, max_request_pixels)
            if refusal is not None:
                return refusal
            predictions = await run_in_threadpool(
                _predict, model, inference_lock, decoding, payloads, sizes, min_size, k or top_k, unknown, cut
            )
        except ImageTooLargeError as error:
            return _refuse(413, f"{error.path}: {error.reason}", error.path)
        except ImageError as error:
            return _refuse(422, f"{error.path}: {error.reason}", error.path)
        if model.task == "multilabel":  # the thresholds the label sets were cut at, for the page's marks
            return {"predictions": predictions, "thresholds": _thresholds(model, cut)}
        return {"predictions": predictions}


THRESHOLD_HELP = ("Multi-label bundles: one score threshold (0 to 1) for every label instead of the per-label ones "
                  "(or the server's --threshold); in the query or as a form field")


def _request_threshold(model: Bundle, query: str | None, form: str | None, default: float | None) -> float | None:
    """The threshold a request asks for (query or form field), else the server's; `ConfigError` naming `threshold`."""
    if query is not None and form is not None and query != form:
        raise ConfigError(f"given twice, {query!r} in the query and {form!r} in the form; give it once", parameter="threshold")
    text = query if query is not None else form
    if text is None or text == "":
        return default
    _check_multilabel(model)
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 <= value <= 1.0:
        raise ConfigError(f"expected a score between 0 and 1 for every label (leave it out for the bundle's own "
                          f"per-label thresholds), got {text!r}", parameter="threshold")
    return value


def _check_multilabel(model: Bundle) -> None:
    """A threshold is for a multi-label bundle: `ConfigError` naming `threshold` for any other."""
    if model.task != "multilabel":
        raise ConfigError("the bundle is single-label (it answers the best label); a threshold is for "
                          "multi-label bundles: leave it out", parameter="threshold")


def _thresholds(model: Bundle, threshold: float | None) -> dict[str, float]:
    """Each label's threshold in effect: `threshold` for every label, or the bundle's own."""
    cuts = [threshold] * len(model.class_names) if threshold is not None else (model.thresholds or [])
    return {name: float(cut) for name, cut in zip(model.class_names, cuts)}


def _add_health(app: FastAPI, model: Bundle, limits: dict[str, int], threshold: float | None) -> None:
    """`GET /healthz`: liveness, the model's backbone, task and classes (a multi-label bundle's
    thresholds), and the server's limits."""

    @app.get("/healthz", summary="Liveness, the model and the limits")
    async def healthz() -> dict[str, Any]:
        info: dict[str, Any] = {
            "status": "ok",
            "backbone": model.backbone,
            "task": model.task,
            "classes": model.class_names,
            "num_classes": len(model.class_names),
        }
        if model.task == "multilabel":  # sigmoid scores, each label against its threshold (no temperature)
            info.update(thresholds=_thresholds(model, threshold), threshold=threshold)
        else:
            info["temperature"] = model.temperature  # the scores are softmax(logits / temperature), calibrated on validation
        return {**info, **limits}


async def _read_uploads(files: list[UploadFile], max_upload_bytes: int) -> list[tuple[str, bytes]] | JSONResponse:
    """(name, bytes) of every upload, or the 413 for the first one over `max_upload_bytes`."""
    payloads: list[tuple[str, bytes]] = []
    for index, upload in enumerate(files):
        name = upload.filename or f"file {index + 1}"
        if upload.size is not None and upload.size > max_upload_bytes:
            return _refuse(413, _too_large(name, upload.size, max_upload_bytes), name)
        data = await upload.read(max_upload_bytes + 1)
        await upload.close()
        if len(data) > max_upload_bytes:
            return _refuse(413, _too_large(name, len(data), max_upload_bytes), name)
        payloads.append((name, data))
    return payloads


def _image_sizes(payloads: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
    """(width, height) of every upload, from its header alone."""

    return [image_size(data, name=name) for name, data in payloads]


def _over_pixel_limits(
    payloads: list[tuple[str, bytes]], sizes: list[tuple[int, int]], max_pixels: int, max_request_pixels: int
) -> JSONResponse | None:
    """The 413 for an image or a request over its pixel limit, or None."""
    for (name, _), (width, height) in zip(payloads, sizes):
        if width * height > max_pixels:
            return _refuse(
                413,
                f"{name}: {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} pixels "
                "per image; resize it (or start the server with a larger --max-megapixels)",
                name,
            )
    total = sum(width * height for width, height in sizes)
    if total > max_request_pixels:
        return _refuse(
            413,
            f"{len(sizes)} images of {total:,} pixels together, over the limit of {max_request_pixels:,} pixels "
            "per request; send them in several requests (or start the server with a larger --max-request-megapixels)",
        )
    return None


def _predict(
    model: Bundle,
    lock: threading.Lock,
    decoding: "PixelBudget",
    payloads: list[tuple[str, bytes]],
    sizes: list[tuple[int, int]],
    min_size: int,
    top_k: int,
    unknown: str,
    threshold: float | None,
) -> list[dict[str, Any]]:
    """Decode every upload at the model's size, within the pixel budget; one forward pass at a time."""

    images = []
    try:
        for (name, data), (width, height) in zip(payloads, sizes):
            with decoding.hold(width * height):
                images.append(load_image(data, name=name, min_size=min_size))
    finally:
        if sum(width * height for width, height in sizes) > RELEASE_AFTER_PIXELS:
            release_free_memory()
    with lock:
        predictions = model.predict(images, top_k=top_k, batch_size=len(images), threshold=threshold, unknown=unknown)
    rows = []
    for (name, _), prediction in zip(payloads, predictions):
        row = prediction.to_dict()
        del row["path"]
        rows.append({"file": name, **row})
    return rows


def _refuse(status: int, detail: str, file: str | None = None) -> JSONResponse:
    content: dict[str, Any] = {"detail": detail}
    if file is not None:
        content["file"] = file
    return JSONResponse(status_code=status, content=content)


def _too_large(name: str, size: int, limit: int) -> str:
    return (
        f"{name}: {size:,} bytes, over the limit of {limit:,} bytes per image; resize or recompress "
        "it (or start the server with a larger --max-upload-mb)"
    )


def _plain(errors: Any) -> Any:
    # Validation errors can hold the raw bytes of the input; keep them out of the JSON.
    return jsonable_encoder(errors, custom_encoder={bytes: lambda raw: f"<{len(raw)} bytes>"})


class PixelBudget:
    """At most `limit` pixels (as the headers declare them) decoded at once, across all requests.

    Decoding runs in the thread pool, one thread per request: without a bound, concurrent requests
    would each hold a full-size image at the same moment. A thread waits until its image fits.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.limit)
        with self._changed:
            self._changed.wait_for(lambda: self.in_use + pixels <= self.limit)
            self.in_use += pixels
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= pixels
                self._changed.notify_all()


class BodySizeLimit:
    """Refuses a request body over `max_bytes` with 413 before it is parsed or spooled.

    A declared Content-Length is checked at once; a chunked body is counted as it arrives and the
    response is replaced by a 413 once the count passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._send_413(send, int(declared))
            return
        received = 0
        over = False

        async def counting_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    # End the body here: the parser fails, and its answer is replaced below.
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        replaced = False

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if over:
                if not replaced:
                    replaced = True
                    await self._send_413(send, received)
                return
            await send(message)

        await self.app(scope, counting_receive, guarded_send)

    async def _send_413(self, send: Send, size: int) -> None:
        response = _refuse(
            413,
            f"the request body ({size:,} bytes or more) is over the server's limit of {self.max_bytes:,} bytes; "
            "send fewer or smaller images per request",
        )
        await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
        await send({"type": "http.response.body", "body": response.body})
