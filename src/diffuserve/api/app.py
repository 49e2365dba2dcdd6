"""`build_app(settings)`: the FastAPI application, its lifespan (workers start and stop with it) and routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from diffuserve import __version__
from diffuserve.api import openapi
from diffuserve.api.auth import BearerAuth
from diffuserve.api.body_budget import BodyBudget
from diffuserve.api.device_metrics import GpuCollector, WorkerStateCollector
from diffuserve.api.drain import Drain
from diffuserve.api.errors import install_error_handlers
from diffuserve.api.forwarded import TrustedForwarding
from diffuserve.api.image_store import ImageStore
from diffuserve.api.job_service import make_job_manager
from diffuserve.api.metrics import JobMetrics, Metrics
from diffuserve.api.middleware import RequestContextMiddleware
from diffuserve.api.routes import health, image_files, images, jobs, metrics, models, playground
from diffuserve.config import Settings
from diffuserve.serving.service import EngineFactory, GenerationService, load_engine

log = logging.getLogger(__name__)


def ready_line(settings: Settings) -> str:
    """Where a user goes once the server is ready: the API's base URL and the playground's."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    base = (
        settings.public_url.rstrip("/")
        if settings.public_url
        else f"http://{_bracketed(host)}:{settings.port}"
    )
    return f"API {base}/v1" + (f" · playground {base}/" if settings.playground else "")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def build_app(
    settings: Settings,
    *,
    on_fatal: Callable[[str], None] | None = None,
    engine_factory: EngineFactory = load_engine,
) -> FastAPI:
    """`engine_factory` makes each worker's engine (tests run the real workers around a stand-in engine)."""
    registry = Metrics()
    announced = False

    def alive_changed(count: int) -> None:
        nonlocal announced
        registry.workers_alive.set(count)
        if not announced and service.ready:  # the one line that says where to go, once every model is ready
            announced = True
            log.info("ready: %s", ready_line(settings))

    service = GenerationService(
        settings,
        observer_for=registry.observer_for,
        on_fatal=on_fatal,
        on_alive_changed=alive_changed,
        on_restart=registry.worker_restarts.inc,
        on_watchdog=registry.watchdog_kills.inc,
        engine_factory=engine_factory,
    )
    for worker_id, model, devices in service.worker_slots:
        registry.worker_devices.labels(str(worker_id), ",".join(devices), model).set(len(devices))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        await app.state.jobs.start()
        sweeper = asyncio.create_task(app.state.image_store.sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            await app.state.jobs.stop()
            await service.stop()

    # No docs pages, and the document is served by a route of our own: with API keys set, every route but
    # health and the playground's page must be authenticated.
    app = FastAPI(
        title="diffuserve",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        responses=openapi.ERROR_RESPONSES,
    )
    app.state.settings = settings
    app.state.service = service
    registry.registry.register(WorkerStateCollector(service.describe_workers))
    registry.registry.register(GpuCollector())
    app.state.metrics = registry
    app.state.auth = BearerAuth(settings.api_keys)
    app.state.drain = Drain()
    app.state.body_budget = BodyBudget(settings.max_body_memory_bytes)
    app.state.image_store = ImageStore(
        settings.resolved_image_store_dir,
        max_bytes=settings.image_store_max_bytes,
        ttl_seconds=settings.image_url_ttl_seconds,
    )
    app.state.jobs = make_job_manager(settings, service, app.state.image_store, JobMetrics(registry))
    install_error_handlers(app)
    for module in (health, images, jobs, image_files, models, metrics, openapi):
        app.include_router(module.router)
    app.include_router(openapi.docs_router)
    if settings.playground:
        app.include_router(playground.router)
    app.add_middleware(RequestContextMiddleware)
    # Outermost: forwarded headers are dropped (untrusted peer) or applied before anything reads them.
    app.add_middleware(TrustedForwarding, trusted=settings.forwarded_allow_ips)
    return app
