"""Structured logging in etcd's shape: one JSON object per line on stderr, like etcd's zap logger.

    {"level":"info","ts":"2024-05-01T10:00:00.123Z","caller":"store/embedded.py:212","msg":"...", ...}

Modules log with the standard library (``logging.getLogger(__name__)``) and pass fields through
``extra``; etcd's hyphenated field names work there too::

    _log.info("serving client traffic", extra={"address": "127.0.0.1:2379"})
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import orjson

# etcd's --log-level values. zap's panic and fatal both end the process there; here they only filter.
LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "panic": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}
_LEVEL_NAMES = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "fatal",
}

# Attributes every LogRecord has; anything else on a record came from ``extra`` and becomes a field.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def _level_name(levelno: int) -> str:
    name = _LEVEL_NAMES.get(levelno)
    if name is None:
        # Custom numeric levels: report the nearest standard one at or below.
        name = next((n for lv, n in sorted(_LEVEL_NAMES.items(), reverse=True) if levelno >= lv), "debug")
    return name


class JSONFormatter(logging.Formatter):
    """Formats a record as one zap-style JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        # zap prints the caller as the file's last two path components ("embed/etcd.go:131").
        parts = record.pathname.replace("\\", "/").rsplit("/", 2)
        caller = "/".join(parts[-2:])
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        out: dict[str, object] = {
            "level": _level_name(record.levelno),
            "ts": ts,
            "caller": f"{caller}:{record.lineno}",
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS:
                out[key] = value
        if record.exc_info and record.exc_info[1] is not None:
            out.setdefault("error", str(record.exc_info[1]) or type(record.exc_info[1]).__name__)
            out["stacktrace"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stacktrace"] = record.stack_info
        return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every logger's records (ours, grpc's, asyncio's) to ``stream`` as JSON lines at ``level``."""
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (use one of {', '.join(LEVELS)})")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_fastetcd", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JSONFormatter())
    handler._fastetcd = True  # type: ignore[attr-defined]  # marks it ours, so setup can be repeated
    root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # The Azure SDK logs every HTTP request and response at info: a line per Cosmos call, and CPU that the
    # writer needs. Its warnings still come through; --log-level debug shows everything.
    logging.getLogger("azure").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.captureWarnings(True)
