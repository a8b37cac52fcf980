"""One line per event on stderr, as text or JSON; journald adds the time and the unit.

Every line logged while a request is handled carries its request id (``X-Request-ID``): the first
role that sees the request takes the client's id or makes one, and each role passes it on (proxy →
hub → worker → engine). The id lives in a context variable, which trio copies into every task a
request's task starts, so no call needs to hand it down.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")  # nothing that could forge or split a log line

MAX_MESSAGE_CHARS = 2000
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "request_id"}


def request_id(header: str | bytes | None) -> str:
    """The client's id when it is a sane one, else a new one; becomes the id of this context's lines."""
    value = header.decode("latin-1") if isinstance(header, bytes) else header or ""
    chosen = value if _CLIENT_ID.fullmatch(value) else uuid.uuid4().hex
    REQUEST_ID.set(chosen)
    return chosen


class _WithRequestId(logging.Filter):
    """Adds the request id to each record, and cuts a message that quotes too much of what a client
    or a worker sent (a model name of a megabyte) to ``MAX_MESSAGE_CHARS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        try:
            message = record.getMessage()
        except Exception:  # a malformed log call: the handler reports it ("--- Logging error ---")
            return True
        if len(message) > MAX_MESSAGE_CHARS:
            message = f"{message[:MAX_MESSAGE_CHARS]}… ({len(message) - MAX_MESSAGE_CHARS} more characters)"
        record.msg, record.args = message, None
        return True


# A message may quote what a client sent (a model name ...): in text, no control character may split
# or forge a line (JSON escapes them by itself), nor, on a terminal, move the cursor, hide text or set
# the window's title (``printable``).
# C0, DEL, C1 (NEL, CSI ...), Unicode line breaks, and the bidirectional overrides that show text reversed
_BREAKS = [*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029, *range(0x202a, 0x202f), *range(0x2066, 0x206a)]
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _BREAKS} | {
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"}


def whence(address: str, forwarded: str | None) -> str:
    """Where a connection came from, for a log line: its address and, behind a front (a proxy,
    nginx), the ``X-Forwarded-For`` chain it sent, which names the client but is only its word."""
    return f"{address}, forwarded for {printable(forwarded[:200])}" if forwarded else address


def printable(text: str) -> str:
    """``text`` with its control characters written out: what a worker, an engine or a client named
    (a model ...) is shown to an operator's terminal as text, never as escape sequences."""
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """One line per event: level, logger, ``request_id=`` when there is one, then the message
    (journald adds the time). The id comes before the message, which may quote what a client sent:
    a model named ``x request_id=someone-else`` cannot pass its line off as another request's."""
    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = record.message.translate(_ESCAPES)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)  # (its message is escaped already)
        if record.exc_info or record.stack_info:  # a traceback too stays on its event's line, unforged
            line = line.translate(_ESCAPES)
        if not (rid := getattr(record, "request_id", "")):
            return line
        head = len(record.levelname) + len(record.name) + 1  # "LEVEL logger" before the ": "
        return f"{line[:head]} request_id={rid}{line[head:]}"


class JsonFormatter(logging.Formatter):
    """One JSON object per event, with the same fields as the text lines."""
    def format(self, record: logging.LogRecord) -> str:
        line = {"level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if rid := getattr(record, "request_id", ""):
            line["request_id"] = rid
        line.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_WithRequestId())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # (hpack logs every header an HTTP/2 client sends at debug, its API key too)
    for noisy in ("httpx", "httpcore", "hypercorn.access", "trio-websocket", "hpack", "h2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
