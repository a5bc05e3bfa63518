"""The web app: one page to read an X-ray, and the JSON API behind it.

Uploads are untrusted. Every bad input gets a 4xx naming the problem, never a 500, and every
answer is one the OpenAPI schema declares (``schemas``): a body larger than the cap is cut off
while it arrives (413) or that arrives too slowly is cut off too (408), anything that is not a
JPEG, PNG or DICOM file by its first bytes is refused (415), an image whose header claims too many pixels
(413) or that is corrupt or truncated (422) never reaches the model. Decoding and inference run
in a small thread pool, within a budget of decoded pixels; when the queue or the budget is full,
new requests get a quick 503 instead of piling up in memory (``limits``). The server around the
app (``server``) puts deadlines on every connection. Nothing on the page or in /docs loads from
a CDN, so it works offline.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import html
import io
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import Body, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field

from pneumo.audit.record import AuditTrail, FeedbackError, UnknownReading
from pneumo.audit.schema import NOTE_MAX_CHARS
from pneumo.data.dicom import PREAMBLE_END, looks_like_dicom
from pneumo.data.imaging import open_image, prepare, to_grey_uint8
from pneumo.decision import describe_reading
from pneumo.errors import ImageError, PneumoError
from pneumo.infer.runtime import open_chosen, open_model, runtime_of
from pneumo.infer.scope import ScopeCheck
from pneumo.report.about import training_summary
from pneumo.serve.limits import (
    ENVELOPE_BYTES,
    PIXEL_BUDGET,
    SERVE_MAX_PIXELS,
    BodyLimit,
    BodyTimeout,
    InferencePool,
    PixelBudget,
    header_pixels,
)
from pneumo.serve.schemas import AUTH_ERRORS, UPLOAD_ERRORS, UPLOAD_OPENAPI, Health, ModelInfo, Reading, errors
from pneumo.serve.server import ConnectionLimits, connection_cap, log_repeats_once, uvicorn_config
from pneumo.version import __version__

if TYPE_CHECKING:  # torch, Grad-CAM and matplotlib load only on the torch runtime (--runtime onnx: never)
    from pneumo.infer.model_folder import LoadedModel

STATIC = Path(__file__).parent / "static"
MAGIC = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG\r\n\x1a\n": "image/png"}
ACCEPTED_TYPES = {"", "application/octet-stream", "application/dicom"}  # plus any image/*; the first bytes decide
HEATMAP_MAX_SIDE = 800  # the page needs no more; keeps the JSON small for 3000 px radiographs
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
log = logging.getLogger("pneumo.serve.app")


class SecurityHeaders:
    """ASGI middleware: a strict content security policy (no third-party anything) on every response."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.encode() not in present]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def sniff_image_type(data: bytes) -> str | None:
    if looks_like_dicom(data[:PREAMBLE_END]):
        return "application/dicom"
    return next((kind for magic, kind in MAGIC.items() if data.startswith(magic)), None)


def png_base64(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)  # 3x faster than 6, 7% larger
    return base64.b64encode(buf.getvalue()).decode("ascii")


def read_xray(
    model: LoadedModel,
    data: bytes,
    name: str,
    heatmap: bool,
    max_pixels: int,
    scope: ScopeCheck,
    explainer: LoadedModel | None = None,
) -> dict[str, Any]:
    """Decode, predict and (optionally) explain one upload: the work done on a pool thread.

    ``explainer``: the PyTorch model that draws Grad-CAM when ``model`` runs on onnxruntime (``--runtime
    auto``); None with ``--runtime onnx``, which serves no heatmaps."""
    start = time.perf_counter()
    try:
        img = open_image(data, max_pixels=max_pixels)
        pixels = np.array(prepare(img, model.meta.image_size))  # writable: torch warns on read-only
    except ImageError as exc:
        status = 413 if "decompression bomb" in exc.reason else 422
        raise HTTPException(status, f"{name}: {exc.reason}") from None
    except Exception as exc:  # noqa: BLE001 - a decoder failing on hostile bytes is bad input, not a crash
        raise HTTPException(422, f"{name}: cannot decode the image ({type(exc).__name__}: {exc})") from None
    probs_of, verdicts = scope.read(pixels[None], [data])  # one pass: probabilities and scope's features
    probs = probs_of[0]
    predicted = int(model.decide(probs[None])[0])
    result: dict[str, Any] = {
        "filename": name,
        "label": model.classes[predicted],  # no p(label) beside it: p_positive is the one probability
        "probabilities": {c: float(p) for c, p in zip(model.classes, probs)},
        "threshold": model.threshold,
        "positive_class": model.meta.positive_class,
        "p_positive": None if model.positive is None else float(probs[model.positive]),
        "reading": describe_reading(probs, model.classes, model.positive, model.threshold),
        "image": {"width": img.width, "height": img.height, "mode": img.mode},
        "heatmap_png_base64": None,
        "heatmap_class": None,
    }
    result.update(verdicts[0])  # infer.scope: an out-of-scope film gets the reason, not a label
    if not result["in_scope"]:
        warning = f"out of scope, no label given: {result['scope_reason']}"
        result.update(label=None, reading=None, warning=warning)  # as predict: probabilities kept, no decision
        log.warning("an upload was out of scope: %s", result["scope_reason"])  # no file name: it may identify
    explainer = explainer if runtime_of(model) == "onnx" else model
    if heatmap and explainer is None:
        result["heatmap_unavailable"] = "Grad-CAM needs the network: serve with --runtime torch or auto"
    elif heatmap:
        from pneumo.infer.explain import DEFAULT_CMAP, gradcam_heatmap
        from pneumo.plots import overlay_heatmap_array

        heat = gradcam_heatmap(explainer, pixels, predicted)
        grey = Image.fromarray(to_grey_uint8(img), mode="L")
        grey.thumbnail((HEATMAP_MAX_SIDE, HEATMAP_MAX_SIDE), Image.BILINEAR)
        result["heatmap_png_base64"] = png_base64(overlay_heatmap_array(np.asarray(grey), heat, 0.4, cmap=DEFAULT_CMAP))
        result["heatmap_class"] = model.classes[predicted]
    result["elapsed_ms"] = round(1000 * (time.perf_counter() - start), 1)
    return result


# ------------------------------------------------------------------ access and the audit trail
LOOPBACK = ("127.0.0.1", "localhost", "::1")
OPEN_API_PATHS = {"/api/access"}  # the page asks here whether it needs a token


class TokenGate:
    """ASGI middleware: every /api/ route (but /api/access) needs ``Authorization: Bearer TOKEN``."""

    def __init__(self, app: Any, token: str):
        self.app, self.expected = app, f"Bearer {token}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith("/api/") or path in OPEN_API_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        detail = "this server needs an access token: send the header 'Authorization: Bearer TOKEN'"
        await JSONResponse({"detail": detail}, status_code=401, headers={"www-authenticate": "Bearer"})(
            scope, receive, send
        )


def check_access(host: str, token: str | None) -> None:
    """Loopback needs nothing; any other address is refused without a token."""
    if host not in LOOPBACK and not token:
        raise PneumoError(
            f"--host {host} lets anyone who can reach this address read images: give an access token "
            "with --token or the PNEUMO_TOKEN environment variable"
        )


class FeedbackIn(BaseModel):
    """A reader's verdict on one reading (the ``reading_id`` that /api/predict returned)."""

    reading_id: str = Field(min_length=1, max_length=36)
    agreed: bool
    true_label: str | None = Field(default=None, max_length=64)
    note: str | None = Field(default=None, max_length=NOTE_MAX_CHARS, description="no patient identifiers")


async def record_reading(app: FastAPI, data: bytes, result: dict[str, Any]) -> str | None:
    """Commit the reading to the audit trail before answering (None with --no-audit).

    Written on the audit thread, so the event loop and the inference threads never wait on the disk.
    A reading that cannot be recorded is not answered: the trail must hold every answer given.
    """
    audit: AuditTrail | None = app.state.audit
    if audit is None:
        return None
    probs = [result["probabilities"][c] for c in audit.meta.classes]
    size = (result["image"]["width"], result["image"]["height"])
    try:
        return await asyncio.get_running_loop().run_in_executor(
            app.state.audit_writer,
            lambda: audit.record_reading(
                data, probs, result["elapsed_ms"], "serve", size=size, in_scope=result.get("in_scope")
            ),
        )
    except Exception as exc:  # noqa: BLE001 - a full disk or a lost database: refuse rather than answer unrecorded
        log.error("audit trail: cannot record a reading: %s: %s", type(exc).__name__, exc)
        raise HTTPException(503, "the reading could not be recorded in the audit trail; retry shortly") from None


def add_audit_routes(app: FastAPI, audit: AuditTrail | None, token_required: bool) -> None:
    """/api/access (what the page must tell the reader) and, with an audit trail, /api/feedback."""
    app.state.audit = audit
    app.state.audit_writer = ThreadPoolExecutor(1, thread_name_prefix="pneumo-audit") if audit else None

    @app.get("/api/access", summary="whether a token is needed, whether readings are recorded and images kept")
    async def access() -> dict[str, Any]:
        return {
            "token_required": token_required,
            "audit": audit is not None,
            "keep_images": audit is not None and audit.images is not None,
        }

    if audit is None:
        return

    @app.post(
        "/api/feedback",
        summary="a reader's verdict on a reading: agreed or not, the true label, a short note",
        responses=errors({400: "the body is not JSON", 404: "no such reading", 422: "feedback that cannot be stored"}),
    )
    async def feedback(item: FeedbackIn = Body(...)) -> dict[str, Any]:
        try:
            return await asyncio.get_running_loop().run_in_executor(
                app.state.audit_writer,
                lambda: audit.record_feedback(item.reading_id, item.agreed, item.true_label, item.note),
            )
        except UnknownReading as exc:
            raise HTTPException(404, str(exc)) from None
        except FeedbackError as exc:
            raise HTTPException(422, str(exc)) from None


def audit_banner(trail: AuditTrail | None) -> str:
    if trail is None:
        return "pneumo: audit trail off (--no-audit): readings are not recorded"
    kept = f"; images kept in {trail.images}" if trail.images else ""
    return f"pneumo: recording every reading in {trail.engine.url.render_as_string()}{kept}"


def close_audit(app: FastAPI) -> None:
    """On shutdown: let queued writes finish, then release the database."""
    if app.state.audit_writer is not None:
        app.state.audit_writer.shutdown(wait=True)
    if app.state.audit is not None:
        app.state.audit.close()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def docs_page(app: FastAPI) -> str:
    """A CDN-free stand-in for Swagger UI: each route, its summary and a link to the schema."""
    rows = []
    for path, ops in app.openapi().get("paths", {}).items():
        for method, op in ops.items():
            rows.append(
                f"<tr><td><code>{html.escape(method.upper())}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{html.escape(op.get('summary', ''))}</td></tr>"
            )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>pneumo API</title>"
        "<link rel='stylesheet' href='/static/style.css'></head><body><main><h1>pneumo API</h1>"
        "<p>The full schema is at <a href='/openapi.json'>/openapi.json</a>.</p><table><thead><tr>"
        "<th>method</th><th>path</th><th>what</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></main></body></html>"
    )


def validation_error_body(exc: RequestValidationError) -> dict[str, str]:
    """FastAPI's list of validation errors as the one error body every route declares."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ())[1:]) or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return {"detail": "; ".join(parts) or "invalid request"}


def create_app(
    model_dir: str | Path,
    max_upload_mb: float = 20.0,
    inference_workers: int = 2,
    queue_limit: int = 32,
    max_pixels: int = SERVE_MAX_PIXELS,
    pixel_budget: int = PIXEL_BUDGET,
    body_timeout_s: float = ConnectionLimits.body_timeout_s,
    audit: AuditTrail | None = None,
    token: str | None = None,
    runtime: str = "auto",
) -> FastAPI:
    """The FastAPI app for one model folder (loaded once, shared by the inference threads).

    ``audit`` records every reading and takes readers' feedback (``add_audit_routes``); with ``token``
    every /api/ route but /api/access needs ``Authorization: Bearer TOKEN`` (``TokenGate``). ``runtime``
    "onnx" serves the model's ONNX export through onnxruntime, without torch and without heatmaps;
    "auto" reads through it when it is this model's (``infer.runtime``), PyTorch drawing the heatmaps.
    """
    if not max_upload_mb > 0:
        raise PneumoError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    if not body_timeout_s > 0:
        raise PneumoError(f"--body-timeout must be positive, got {body_timeout_s}")
    budget = PixelBudget(pixel_budget, max_pixels)  # options first: a bad one fails before the model loads
    pool = InferencePool(inference_workers, queue_limit)
    model, chosen, reason = open_chosen(model_dir, runtime, threads=max(1, _cores() // inference_workers))
    # Grad-CAM needs the network: under auto, PyTorch's copy of the model draws it
    explainer = open_model(model_dir, "torch") if chosen == "onnx" and runtime == "auto" else None
    if chosen == "torch" or explainer is not None:  # Grad-CAM's imports paid now, not by the first upload
        import pneumo.infer.explain  # noqa: F401
        import pneumo.plots  # noqa: F401
    scope = ScopeCheck(model)
    trained_on = training_summary(model_dir, model.meta)  # said on the page beside every answer
    max_bytes = int(max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        pool.executor.shutdown(wait=False, cancel_futures=True)
        close_audit(app)

    app = FastAPI(
        title="pneumo",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Read a chest X-ray (JPEG, PNG or DICOM): label, p(positive class) against the decision "
        "threshold and a Grad-CAM heatmap. A research tool, not a medical device. Every error answers "
        '{"detail": "..."}.',
    )
    app.state.model, app.state.pool, app.state.budget = model, pool, budget
    app.state.runtime, app.state.runtime_reason = chosen, reason
    app.add_middleware(BodyLimit, limit=max_bytes + ENVELOPE_BYTES)
    app.add_middleware(BodyTimeout, seconds=body_timeout_s)
    if token:  # outside BodyLimit (no body read without the token), inside SecurityHeaders (a 401 gets them)
        app.add_middleware(TokenGate, token=token)
    app.add_middleware(SecurityHeaders)
    add_audit_routes(app, audit, token_required=bool(token))
    auth = AUTH_ERRORS if token else {}

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_error_body(exc), status_code=422)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app))

    @app.get("/health", summary="liveness, queue and pixel budget", response_model=Health)
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "arch": model.meta.arch,
            "workers": pool.workers,
            "active": pool.active,
            "waiting": pool.waiting,
            "queue_limit": pool.queue_limit,
            "pixels_in_use": budget.in_use,
            "pixel_budget": budget.pixels,
        }

    @app.get("/api/model", summary="what the model reads and how it decides", response_model=ModelInfo, responses=auth)
    async def model_info() -> dict[str, Any]:
        return {
            "arch": model.meta.arch,
            "classes": model.classes,
            "image_size": model.meta.image_size,
            "threshold": model.threshold,
            "positive_class": model.meta.positive_class,
            "threshold_method": model.meta.threshold_method,
            "temperature": model.meta.temperature,
            "max_upload_mb": max_upload_mb,
            "max_image_pixels": max_pixels,
            "accepted": sorted(set(MAGIC.values()) | {"application/dicom"}),
            "scope_check": scope.method,
            "pneumo_version": model.meta.pneumo_version,
            "runtime": chosen,
            "trained_on": trained_on,
        }

    @app.post(
        "/api/predict",
        summary="label, p(positive class), threshold and Grad-CAM heatmap for one image",
        response_model=Reading,
        responses={**UPLOAD_ERRORS, **auth},
        openapi_extra=UPLOAD_OPENAPI,
    )
    async def predict(
        file: UploadFile = File(
            ...,
            description=f"a JPEG, PNG or DICOM chest X-ray, not empty, at most {max_upload_mb:g} MB and "
            f"{max_pixels:,} pixels",
            json_schema_extra={"minLength": 1},
        ),
        heatmap: bool = Query(True, description="include a Grad-CAM overlay as base64 PNG"),
    ) -> dict[str, Any]:
        name = file.filename or "upload"
        declared = (file.content_type or "").split(";")[0].strip().lower()
        if declared not in ACCEPTED_TYPES and not declared.startswith("image/"):
            detail = f"{name}: content type {declared!r} is not an image; send a JPEG, PNG or DICOM file"
            raise HTTPException(415, detail)
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{name}: upload too large: the limit is {max_upload_mb:.1f} MB")
        if not data:
            raise HTTPException(422, f"{name}: empty file (0 bytes)")
        if sniff_image_type(data) is None:
            raise HTTPException(415, f"{name}: not a JPEG or PNG, nor a DICOM file (the file starts with {data[:8]!r})")
        pixels = header_pixels(data, name, max_pixels)
        result = await pool.run(
            budget.spend, pixels, read_xray, model, data, name, heatmap, max_pixels, scope, explainer
        )
        result["reading_id"] = await record_reading(app, data, result)
        return result

    return app


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_upload_mb: float = 20.0,
    inference_workers: int = 2,
    queue_limit: int = 32,
    db: str | Path | None = None,
    audit: bool = True,
    keep_images: bool = False,
    token: str | None = None,
    max_pixels: int = SERVE_MAX_PIXELS,
    pixel_budget: int = PIXEL_BUDGET,
    limits: ConnectionLimits | None = None,
    runtime: str = "auto",
) -> None:
    """Run the app with uvicorn; loopback only unless ``host`` says otherwise (then with a token).

    Every reading is recorded in the audit database (``db``, default MODEL/audit.sqlite) unless ``audit``
    is False; ``keep_images`` also stores corrected-to-be images for ``pneumo audit export``.
    ``limits`` bounds every connection (``server.ConnectionLimits``).
    """
    import uvicorn

    check_access(host, token)
    if keep_images and not audit:
        raise PneumoError("--keep-images stores images for the audit trail: it cannot go with --no-audit")
    limits = limits or ConnectionLimits()
    trail = AuditTrail.open(db, model_dir, keep_images=keep_images, runtime=runtime) if audit else None
    app = create_app(
        model_dir,
        max_upload_mb,
        inference_workers,
        queue_limit,
        max_pixels,
        pixel_budget,
        limits.body_timeout_s,
        audit=trail,
        token=token,
        runtime=runtime,
    )
    if trail is not None:  # the runtime that reads, as chosen
        trail.runtime = app.state.runtime
    # Each queued upload may hold a spooled temporary file: leave descriptors for them.
    limits = dataclasses.replace(
        limits, max_connections=connection_cap(limits.max_connections, inference_workers + queue_limit)
    )
    if runtime != "onnx":  # each inference thread gets its share of the cores (torch: predicting or Grad-CAM)
        import torch

        torch.set_num_threads(max(1, _cores() // inference_workers))
    if host not in LOOPBACK:
        log.warning("serving on %s: API calls need the access token", host)
    config = uvicorn_config(app, host, port, limits)
    log_repeats_once()  # after uvicorn has configured its loggers
    print(
        f"pneumo: reading X-rays at http://{'[' + host + ']' if ':' in host else host}:{port}/ "
        f"(model {app.state.model.meta.arch}, up to {limits.max_connections} connections, Ctrl+C to stop)",
        flush=True,
    )
    print(f"runtime: {app.state.runtime} ({app.state.runtime_reason})", flush=True)
    print(audit_banner(trail), flush=True)
    uvicorn.Server(config).run()
