"""Logging setup: readable console lines or one JSON object per line, node id on every record."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from harmonylite.redact import redact

_STD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class _NodeFilter(logging.Filter):
    def __init__(self, node_id: int) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "node_id"):
            record.node_id = self.node_id
        return True


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STD_ATTRS and k != "node_id"}


def _redact(text: str) -> str:
    # Every line passes here: credentials in URLs (NATS, stores) never reach the log, whichever
    # module (or library) wrote the message.
    return redact(text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _redact(self._format(record))

    def _format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
            "node_id": getattr(record, "node_id", None),
            "logger": record.name,
        }
        out.update(_extras(record))
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class ConsoleFormatter(logging.Formatter):
    COLOURS = {"DEBUG": "\x1b[2m", "INFO": "\x1b[32m", "WARNING": "\x1b[33m", "ERROR": "\x1b[31m",
               "CRITICAL": "\x1b[41m"}

    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        return _redact(self._format(record))

    def _format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        level = record.levelname[:4]
        if self.colour:
            level = f"{self.COLOURS.get(record.levelname, '')}{level}\x1b[0m"
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{ts} {level} [node {getattr(record, 'node_id', '-')}] {record.getMessage()}"
        if fields:
            line += " " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.colour:
            # On a terminal a progress bar may own the current line: clear it first (the bar
            # redraws itself below on its next update).
            line = "\r\x1b[K" + line
        return line


def setup_logging(node_id: int, fmt: str = "console", verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(ConsoleFormatter(colour=sys.stderr.isatty()))
    handler.addFilter(_NodeFilter(node_id))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("asyncio", "nats", "botocore", "boto3", "s3transfer", "asyncssh", "httpx",
                  "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
