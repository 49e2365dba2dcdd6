"""`stream: true`: server-sent events as OpenAI sends them — partial images while the batch denoises, then
one completed event per image (with `usage`), or one `error` event; with `progress: true`, `progress` events
(queue position, then each denoising step) beside them."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import orjson
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from diffuserve.api.errors import error_body
from diffuserve.errors import ClientClosed, DiffuserveError, GenerationFailed
from diffuserve.protocol.generation import ImageGenerationRequest
from diffuserve.protocol.usage import usage_for
from diffuserve.serving.service import ClientGone
from diffuserve.types import Completed, EncodedImage, GenerationRequest, ModelInfo

log = logging.getLogger(__name__)

# Headers for an event stream: no caching, and no buffering in nginx (or it would hold the previews back).
STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# How often a queued stream that asked for progress looks at its queue position.
POSITION_POLL_S = 0.25


def event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class EventStream(StreamingResponse):
    """A StreamingResponse that closes its event generator however the response ends: a client that leaves
    while a send is pending leaves the generator suspended at a `yield`, and its outcome (the metrics, the
    status in the access log) would otherwise be settled only when the garbage collector gets to it."""

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers=STREAM_HEADERS)
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


def _read_outcome(work: asyncio.Future[Any]) -> None:
    # A stream left early never reads its work's outcome; read here so asyncio logs no "never retrieved".
    if not work.cancelled():
        work.exception()


class ImageStream:
    """One streamed request: previews queue here as the batch sends them, and `events` turns them, then the
    outcome of `work`, into the event stream. `kind` is OpenAI's event prefix: image_generation or image_edit."""

    def __init__(
        self,
        *,
        kind: str,
        body: ImageGenerationRequest,
        generation: GenerationRequest,
        model: ModelInfo,
        finished: Callable[[Completed | None, int], None],
        delivered: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self.kind = kind
        self.body = body
        self.generation = generation
        self.model = model
        self._finished = finished
        self._delivered = delivered
        # Previews (partial index, first image, images) and steps (step, steps) in the order they came.
        self._partials: asyncio.Queue[tuple[int, int, list[EncodedImage]] | tuple[int, int]] = asyncio.Queue()
        # Set by the route when the client asked for progress: the request's queue position (None once it runs).
        self.position: Callable[[], int | None] | None = None
        self._last_position: int | None = None

    def on_partial(self, partial_index: int, first_image: int, images: list[EncodedImage]) -> None:
        self._partials.put_nowait((partial_index, first_image, images))

    def on_progress(self, step: int, steps: int) -> None:
        self._partials.put_nowait((step, steps))

    def response(self, work: asyncio.Future[Completed]) -> StreamingResponse:
        work.add_done_callback(_read_outcome)
        return EventStream(self.events(work))

    async def events(self, work: asyncio.Future[Completed]) -> AsyncGenerator[bytes, None]:
        """The events; the status counted is 200 only once the last one went out to a client still there."""
        status = 500
        completed: Completed | None = None
        getter: asyncio.Future[Any] | None = None
        try:
            while True:
                if (queued := self._position_event()) is not None:
                    yield queued
                if getter is None or getter.done():
                    getter = asyncio.ensure_future(self._partials.get())
                watched: set[asyncio.Future[Any]] = {getter, work}
                timeout = POSITION_POLL_S if self.position is not None else None
                await asyncio.wait(watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield self._queued_event(getter.result())
                elif work.done():
                    break
            while not self._partials.empty():  # previews that came in just before the result
                yield self._queued_event(self._partials.get_nowait())
            try:
                completed = work.result()
            except ClientGone:
                status = ClientClosed.status
                return
            except DiffuserveError as exc:
                status = exc.status
                yield event("error", {"type": "error", **error_body(exc)})
                return
            except Exception:  # the stream has begun: the failure can only be told as an event
                log.exception("a streamed generation failed")
                failed = GenerationFailed("generation failed; the server log has the details")
                yield event("error", {"type": "error", **error_body(failed)})
                return
            for index, image in enumerate(completed.images):
                yield self._completed_event(index, image, completed)
            # Sent is not received: the server's buffers take a whole answer from a client that reads nothing.
            delivered = await self._delivered() if self._delivered is not None else True
            status = 200 if delivered else ClientClosed.status
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled when the client hangs up, closed when it left while a send was pending: a 499 as for
            # any request left.
            status = ClientClosed.status
            raise
        finally:
            if getter is not None:
                getter.cancel()
            work.cancel()  # a client gone mid-stream frees its place in the queue or its batch
            self._finished(completed, status)

    def _queued_event(self, item: tuple[int, int, list[EncodedImage]] | tuple[int, int]) -> bytes:
        if len(item) == 2:
            step, steps = item
            name = f"{self.kind}.progress"
            return event(name, {"type": name, "status": "running", "step": step, "steps": steps})
        return self._partial_events(*item)

    def _position_event(self) -> bytes | None:
        """A `progress` event with the queue position, when it changed since the last one (None once running)."""
        if self.position is None:
            return None
        position = self.position()
        if position is None or position == self._last_position:
            return None
        self._last_position = position
        name = f"{self.kind}.progress"
        return event(name, {"type": name, "status": "queued", "queue_position": position})

    def _common(self) -> dict[str, Any]:
        g = self.generation
        return {
            "created_at": int(time.time()),
            "output_format": g.output_format,
            "size": f"{g.width}x{g.height}",
            "quality": self.body.quality or "auto",
            "background": "opaque",
        }

    def _partial_events(self, partial_index: int, first_image: int, images: list[EncodedImage]) -> bytes:
        chunks = []
        for offset, image in enumerate(images):
            payload = {
                "type": f"{self.kind}.partial_image",
                "b64_json": base64.b64encode(image.data).decode("ascii"),
                "partial_image_index": partial_index,
                **self._common(),
            }
            if self.generation.n > 1:
                payload["image_index"] = first_image + offset
            chunks.append(event(payload["type"], payload))
        return b"".join(chunks)

    def _completed_event(self, index: int, image: EncodedImage, done: Completed) -> bytes:
        # The prompt and input pictures count once, with the first image; each image adds its own output.
        first = index == 0
        usage = usage_for(
            self.generation,
            self.model,
            done.text_tokens if first else 0,
            images=1,
            pictures=None if first else 0,
        )
        payload = {
            "type": f"{self.kind}.completed",
            "b64_json": base64.b64encode(image.data).decode("ascii"),
            **self._common(),
            "usage": usage.model_dump(),
        }
        if self.generation.n > 1:
            payload["image_index"] = index
        return event(payload["type"], payload)
