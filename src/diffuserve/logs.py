"""Logging set-up: one structured line per event, as text or JSON (`--log-format`)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

# Keys callers pass in `extra=` that belong in the structured line.
FIELDS = (
    "request_id", "model", "method", "path", "status", "n", "batch_size", "queue_ms", "inference_ms",
    "total_ms",
)  # fmt: skip


# C0 and C1 control characters, DEL, and Unicode's line and paragraph separators: anything that could end
# a log line early or rewrite the terminal showing it.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Longest client-controlled text (a path, an error message quoting the body) a log line carries.
MAX_LOGGED_CHARS = 512
# A message whose arguments could not be escaped one by one is escaped and cut whole, to this length.
MAX_MESSAGE_CHARS = 4096


def safe_text(value: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """`value` as one printable line: control characters escaped (`\\n`, `\\x1b`), cut to `limit` characters
    with a note of how much was left out. For text a client controls: field names, paths, ids."""
    text = _UNPRINTABLE.sub(_escape, str(value))
    if len(text) > limit:
        return f"{text[:limit]}…[{len(text) - limit} more]"
    return text


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def safe_message(record: logging.LogRecord) -> str:
    """The record's message with every argument passed through `safe_text`: a client's text (a path, a field
    name) always arrives as an argument, while the format string is the server's own and keeps its lines
    (a traceback a library logs as its message stays readable)."""
    args = record.args
    if not args:
        return str(record.msg)
    try:
        if isinstance(args, dict):
            return str(record.msg) % {key: _safe_arg(value) for key, value in args.items()}
        return str(record.msg) % tuple(_safe_arg(value) for value in args)
    except (TypeError, ValueError):  # an argument whose type the format needed as it was
        try:
            return safe_text(record.getMessage(), MAX_MESSAGE_CHARS)
        except (TypeError, ValueError):  # a broken call: still one line, with what it was given
            return safe_text(f"{record.msg} {args!r}", MAX_MESSAGE_CHARS)


def _safe_arg(value: object) -> object:
    return value if isinstance(value, (int, float)) or value is None else safe_text(value)


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": self.role,
            "msg": safe_message(record),
        }
        for key in FIELDS:
            if hasattr(record, key):
                value = getattr(record, key)
                entry[key] = value if isinstance(value, (int, float)) or value is None else safe_text(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        record.msg, record.args = safe_message(record), None
        try:
            line = super().format(record)
        finally:
            record.msg, record.args = msg, args
        extras = " ".join(
            f"{key}={safe_text(getattr(record, key))}" for key in FIELDS if hasattr(record, key)
        )
        return f"{line} {extras}" if extras else line


def configure_logging(log_format: str = "text", level: str = "info", role: str = "server") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if log_format == "json" else TextFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that chat at INFO during loading drown the request lines.
    for noisy in ("httpx", "httpx2", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # diffusers/transformers warn at import about optional backends (torchvision …) that we never use, and
    # write their warnings through handlers of their own, past our escaping: one of them quotes the part
    # of a client's prompt that the text encoder truncated, newlines and all. Their own variables set the
    # level they apply when first imported (here or in the workers, which inherit the environment).
    for chatty, variable in (
        ("diffusers", "DIFFUSERS_VERBOSITY"),
        ("transformers", "TRANSFORMERS_VERBOSITY"),
    ):
        logging.getLogger(chatty).setLevel(logging.ERROR)
        os.environ.setdefault(variable, "error")
