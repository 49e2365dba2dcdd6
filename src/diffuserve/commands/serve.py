"""`diffuserve serve`: start the HTTP server and its workers; exits non-zero when the model cannot load."""

from __future__ import annotations

import argparse
import errno
import logging
import socket
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


def port_taken(host: str, port: int) -> str | None:
    """Why the server could not bind `host:port` (one line naming PORT), or None: checked before the workers
    start, where uvicorn would otherwise fail after them with a bare `[Errno 98]`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is taken; set PORT (or --port) to a free one"
            return f"cannot listen on {host}:{port} ({exc.strerror}); check HOST and PORT"
    return None


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_for(args)
    except ValueError as exc:
        print(f"diffuserve serve: {exc}", file=sys.stderr)
        return 2
    taken = port_taken(settings.host, settings.port)
    if taken:
        print(f"diffuserve serve: {taken}", file=sys.stderr)
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
    log.info(
        "starting %s on %s:%d; a `ready:` line follows once it answers",
        ", ".join(app.state.service.models),
        settings.host,
        settings.port,
    )
    server.run()
    fatal = app.state.service.fatal_error
    if fatal:
        print(f"diffuserve serve: {fatal}", file=sys.stderr)
        return 1
    return 0 if server.started else 1
