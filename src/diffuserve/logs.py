"""Logging set-up: one structured line per event, as text or JSON (`--log-format`)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Keys callers pass in `extra=` that belong in the structured line.
FIELDS = (
    "request_id", "model", "method", "path", "status", "n", "batch_size", "queue_ms", "inference_ms",
    "total_ms",
)  # fmt: skip


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
            "msg": record.getMessage(),
        }
        for key in FIELDS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = " ".join(f"{key}={getattr(record, key)}" for key in FIELDS if hasattr(record, key))
        return f"{line} {extras}" if extras else line


def configure_logging(log_format: str = "text", level: str = "info", role: str = "server") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if log_format == "json" else TextFormatter(role))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Libraries that chat at INFO during loading drown the request lines.
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # diffusers/transformers warn at import about optional backends (torchvision …) that we never use.
    for chatty in ("diffusers", "transformers"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
