"""What one request may cost the server: bytes, seconds, decoded pixels and a place in the queue.

Every limit answers with a status the OpenAPI schema declares (``schemas.ERROR_RESPONSES``) and
the same body, ``{"detail": "..."}``: 408 when the body does not arrive in time, 413 for too many
bytes or too many pixels, 503 with ``Retry-After`` when the inference queue or the pixel budget is
full. The pixel checks read only the image header, so a 250 KB PNG claiming 8,900 x 8,900 pixels
is refused before a single row is decoded.
"""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from PIL import Image

from pneumo.errors import PneumoError

T = TypeVar("T")
ENVELOPE_BYTES = 64 * 1024  # multipart boundaries and headers around the file itself
# A chest detector is at most ~4,300 x 4,300 (18 MP); 36 MP (6,000 x 6,000) leaves room and refuses the
# 79 MP "8,900 x 8,900 PNG of 252 KB" bomb. Decoding costs ~8 bytes per pixel at its peak (the decoded
# image, its copy and its grey conversion), so the default budget of two such images is ~600 MB at once.
SERVE_MAX_PIXELS = 36_000_000
PIXEL_BUDGET = 2 * SERVE_MAX_PIXELS
RETRY_AFTER_S = 1


def busy(detail: str) -> HTTPException:
    return HTTPException(503, detail, headers={"retry-after": str(RETRY_AFTER_S)})


class BodyLimit:
    """ASGI middleware: 413 as soon as a request body passes ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._too_large(scope, receive, send)
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI re-raises HTTPException from body parsing as it is
                raise HTTPException(413, self._message())
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"upload too large: the limit is {(self.limit - ENVELOPE_BYTES) / 2**20:.1f} MB"

    async def _too_large(self, scope: dict, receive: Any, send: Any) -> None:
        await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)


class BodyTimeout:
    """ASGI middleware: 408 (and the connection closed) when a request body takes longer than ``seconds``.

    The clock starts at the first read of the body, so a slow client holds a connection for a
    bounded time however slowly it trickles bytes. Reads after the body is complete (a response
    waiting for a disconnect) are not timed.
    """

    def __init__(self, app: Any, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        body_done = False

        async def timed_receive() -> dict:
            nonlocal deadline, body_done
            if body_done:
                return await receive()
            if deadline is None:
                deadline = loop.time() + self.seconds
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(
                    408, f"request body not received within {self.seconds:g} s", headers={"connection": "close"}
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


class InferencePool:
    """A fixed number of inference threads and a bounded number of requests allowed to wait."""

    def __init__(self, workers: int, queue_limit: int):
        if workers < 1 or queue_limit < 0:
            raise PneumoError(
                f"need at least 1 inference worker and a queue limit >= 0 (got {workers} and {queue_limit})"
            )
        self.workers, self.queue_limit = workers, queue_limit
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="pneumo-infer")
        self.active = 0  # running + waiting; touched only on the event loop thread

    @property
    def waiting(self) -> int:
        return max(0, self.active - self.workers)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self.active >= self.workers + self.queue_limit:
            raise busy(f"server busy: {self.waiting} requests already waiting; retry shortly")
        self.active += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.active -= 1


class PixelBudget:
    """How many decoded pixels may be in memory at once, across all inference threads.

    Taken on the inference thread just before decoding (a request waiting in the queue holds only
    its compressed bytes) and given back when the reading is done. Never waits: when the budget
    is spent the request is answered 503 with Retry-After, so memory stays bounded under any load.
    """

    def __init__(self, pixels: int, max_image_pixels: int):
        if max_image_pixels < 1 or pixels < max_image_pixels:
            raise PneumoError(
                f"the pixel budget ({pixels:,}) must hold at least one image of the largest size allowed "
                f"({max_image_pixels:,} pixels)"
            )
        self.pixels, self.max_image_pixels = pixels, max_image_pixels
        self.in_use = 0
        self._lock = threading.Lock()

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        with self._lock:
            if self.in_use + pixels > self.pixels:
                free = self.pixels - self.in_use
                raise busy(f"server busy: {pixels:,} pixels to decode, {free:,} of {self.pixels:,} free; retry shortly")
            self.in_use += pixels
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= pixels

    def spend(self, pixels: int, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` holding ``pixels`` of the budget (on the inference thread)."""
        with self.reserve(pixels):
            return fn(*args)


def header_pixels(data: bytes, name: str, max_pixels: int) -> int:
    """The pixel count an image's header claims, refusing more than ``max_pixels`` (413) before decoding.

    Returns 0 when the header cannot be read; the full decode on the pool thread then names the problem.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"{name}: refusing a possible decompression bomb: {exc}") from None
    except Exception:  # noqa: BLE001 - reported precisely by open_image on the pool thread
        return 0
    if width * height > max_pixels:
        raise HTTPException(
            413,
            f"{name}: image too large ({width}x{height} pixels; limit {max_pixels:,}): "
            f"refusing a possible decompression bomb",
        )
    return width * height
