"""`diffuserve serve`: start the HTTP server and its workers; exits non-zero when the model cannot load."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from diffuserve.config import Settings, add_settings_arguments, settings_from_args

if TYPE_CHECKING:
    from diffuserve.api.server import DrainingServer

log = logging.getLogger("diffuserve.serve")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="start the OpenAI-compatible server",
        description="Start the server on one or more models (default: the built-in digits model). Every flag "
        "also reads an environment variable (shown in brackets).",
    )
    parser.add_argument(
        "positional_models",
        nargs="*",
        metavar="MODEL",
        help="models to serve, each [NAME=]REPO (as --model; both may be given)",
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=run)


def settings_for(args: argparse.Namespace) -> Settings:
    """The settings of `serve`'s command line: models given as arguments come first, then `--model` ones."""
    if args.positional_models:
        args.models = [*args.positional_models, *(args.models or [])]
    return settings_from_args(args)


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_for(args)
    except ValueError as exc:
        print(f"diffuserve serve: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from diffuserve.api.app import build_app
    from diffuserve.api.http_protocol import guarded_protocol
    from diffuserve.api.server import DrainingServer
    from diffuserve.engine.loader import ModelLoadError, check_model_source
    from diffuserve.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    try:
        for spec in settings.model_specs:
            check_model_source(spec.repo, settings.weights)
    except ModelLoadError as exc:
        print(f"diffuserve serve: {exc}", file=sys.stderr)
        return 2

    server: DrainingServer | None = None

    def stop_on_fatal(message: str) -> None:
        if server is not None:
            server.should_exit = True

    try:
        app = build_app(settings, on_fatal=stop_on_fatal)
    except ValueError as exc:
        print(f"diffuserve serve: {exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # our own logging: one structured line per request
        access_log=False,
        timeout_keep_alive=75,
        http=guarded_protocol(settings.header_timeout, settings.body_timeout, settings.max_connections),
        # After the drain every generation has been answered; this only bounds a response still being sent.
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, app.state.drain, settings.drain_timeout)
    log.info("serving %s on http://%s:%d", ", ".join(app.state.service.models), settings.host, settings.port)
    server.run()
    fatal = app.state.service.fatal_error
    if fatal:
        print(f"diffuserve serve: {fatal}", file=sys.stderr)
        return 1
    return 0 if server.started else 1
