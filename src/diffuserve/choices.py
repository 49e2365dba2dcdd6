"""The named choices of settings that are not the engine's: log format and level, how adapters batch."""

from __future__ import annotations

from diffuserve.types import StrChoice


class LogFormat(StrChoice):
    TEXT = "text"
    JSON = "json"


class LoraBatching(StrChoice):
    MIXED = "mixed"
    SPLIT = "split"


class LogLevel(StrChoice):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
