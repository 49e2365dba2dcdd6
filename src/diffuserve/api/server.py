"""uvicorn's server with a graceful drain on SIGTERM/SIGINT before it shuts down, and the app's connection
limits applied to its protocol."""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import Counter

from diffuserve.api.drain import Drain
from diffuserve.api.http_protocol import GuardedHttpProtocol

log = logging.getLogger("diffuserve.serve")


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains the app (readiness 503, new generations 503, running ones finish up to
    `drain_timeout`, the rest fail with 503), then uvicorn shuts down; a second signal skips the drain. The
    signal is not re-raised after shutdown (uvicorn re-raises it; this server does not), so a drained server
    exits 0."""

    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout: float) -> None:
        apply_app_limits(config)
        super().__init__(config)
        self.drain = drain
        self.drain_timeout = drain_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or self._loop is None or not self.started:
            # A second signal, or one before the server took any request: shut down now.
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            return
        self._drain_requested = True
        log.info("received %s: draining before shutting down", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.drain(self.drain_timeout)
        finally:
            self.should_exit = True


def apply_app_limits(config: uvicorn.Config) -> None:
    """What uvicorn must do for the app's settings: the guarded protocol's send deadline (each cut-off counted in
    the app's metrics), and no forwarded-header handling of its own: the app applies X-Forwarded-* itself, from
    FORWARDED_ALLOW_IPS, where it can still see the proxy's address (api/forwarded.py)."""
    state: Any = getattr(config.app, "state", None)
    settings = getattr(state, "settings", None)
    if state is None or settings is None:
        return
    config.proxy_headers = False
    if isinstance(config.http, type) and issubclass(config.http, GuardedHttpProtocol):
        send_timeouts = Counter(
            "diffuserve_send_timeouts",
            "Connections closed because their client accepted no byte of a response for SEND_TIMEOUT s",
            registry=state.metrics.registry,
        )
        config.http = config.http.configured(
            send_timeout=settings.send_timeout, on_send_timeout=send_timeouts.inc
        )
