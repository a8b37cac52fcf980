"""Errors as clients see them: the one error type of every role that answers HTTP, and its bodies.

A client sees one dialect per path: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI) on
``/v1`` and everywhere else, ``{"error": "..."}`` (Ollama) on ``/api``. A stream that fails after
its first byte ends with the same body as one last SSE event or NDJSON line.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
    429: "rate_limit_error", 431: "invalid_request_error",
}


def is_ollama_path(path: str) -> bool:
    """Ollama's native API lives under ``/api/``; every other path answers in OpenAI's dialect."""
    return path.startswith("/api/")


MAX_RETRY_AFTER_S = 3600  # the longest wait an engine's Retry-After is passed on as (the SDKs heed 60 s)
_SEQUENCE_NUMBER = re.compile(rb'"sequence_number"\s*:\s*(\d+)')


def last_sequence_number(sent: bytes) -> int | None:
    """The ``sequence_number`` of the last Responses event in ``sent`` (bytes passed on), None if
    none there. Inside a JSON string the key's quotes are escaped, so the last match is the last
    event's own."""
    at = sent.rfind(b'"sequence_number"')
    match = _SEQUENCE_NUMBER.match(sent, at) if at >= 0 else None
    return int(match[1]) if match else None


CLIENT_CLOSED = 499  # logged and counted for a client that left before any answer went out (as nginx does)
# the reason on the access line of one that left after: counted with the status it got, this says it left
LEFT_MID_ANSWER = "the client left before the answer's end"


class ApiError(Exception):
    """An answer other than success, in terms both dialects can render. Invariant: ``status`` is
    an HTTP error status (400-599); ``retry_after`` (seconds), when set, becomes ``Retry-After``;
    ``extra_headers`` go out with it too (``Connection: close`` where the request cannot be read on)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None, extra_headers: dict[str, str] | None = None,
                 ollama_message: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.ollama_message = ollama_message or message  # (where Ollama's clients read its own words)
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.extra_headers = extra_headers or {}

    def openai_body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.ollama_message}

    def body_for(self, path: str) -> bytes:
        """The JSON body of the answer to a request for ``path``."""
        return json.dumps(self.ollama_body() if is_ollama_path(path) else self.openai_body()).encode()

    def stream_end(self, sse: bool) -> bytes:
        """The last piece of a stream that fails after its first byte: an SSE event or an NDJSON line."""
        if sse:
            return b"data: " + json.dumps(self.openai_body()).encode() + b"\n\n"
        return json.dumps(self.ollama_body()).encode() + b"\n"

    def typed_event(self, after: int | None) -> bytes:
        """The last event of a Responses API stream that fails after the event numbered ``after``
        (None: before any): typed as its other events are (an ``error`` event, as OpenAI's and
        vLLM's, numbered after them: the SDK's event type requires ``sequence_number``), with
        OpenAI's error object beside, which the openai SDK raises as it does a chat's."""
        body = self.openai_body()
        event = {"type": "error", "code": self.code or body["error"]["type"], "message": self.message,
                 "param": self.param, "sequence_number": 0 if after is None else after + 1, **body}
        return b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n"

    def headers(self) -> dict[str, str]:
        """``Retry-After``, and ``retry-after-ms`` (which the openai SDK reads first) up to half as
        long again at random: refused together, a crowd of clients must not come back together,
        each retry as sure to fail as the first (the SDK adds no jitter to a server's wait). A 501
        (no engine serves that API, the grid manages no models) says ``x-should-retry: false``: the
        SDK sends every other 5xx twice more, each as sure to fail."""
        if self.status == 501:
            return {"x-should-retry": "false"} | self.extra_headers
        if self.retry_after is None:
            return self.extra_headers
        spread = round(self.retry_after * 1000 * (1 + random.random() / 2))
        spread = min(spread, max(self.retry_after * 1000, 60_000))  # (the openai SDK heeds none past 60 s)
        return {"Retry-After": str(self.retry_after), "retry-after-ms": str(spread)} | self.extra_headers


def invalid_api_key() -> ApiError:
    return ApiError(401, "Missing or invalid API key", code="invalid_api_key")


CLOSE = {"Connection": "close"}  # a body left unread: what follows on the connection is no request


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body is larger than {limit} bytes", extra_headers=CLOSE)


def model_not_found(model: str) -> ApiError:
    """(The ``ollama`` command reads "not found" in the text: its ``/load`` of a typo went on, not out.)"""
    return ApiError(404, f"The model '{model}' does not exist or no worker serves it", param="model",
                    code="model_not_found", ollama_message=f"model '{model}' not found (no worker serves it)")


def describe(error: BaseException) -> str:
    """An exception for a log line: its type and text and, when it only wraps another (httpx's
    ConnectError around a TLS refusal, trio's BrokenResourceError around an SSL error), the first
    cause that says something new, so an operator reads "certificate verify failed"."""
    said = f"{type(error).__name__} {error}".strip()
    cause = error.__cause__ or error.__context__
    while cause is not None and (isinstance(cause, BaseExceptionGroup) or not str(cause) or str(cause) in said):
        # (trio's connect raises one error over a group of its attempts': the first attempt's says why)
        cause = cause.exceptions[0] if isinstance(cause, BaseExceptionGroup) else cause.__cause__ or cause.__context__
    return f"{said}: {cause}" if cause is not None and str(cause) not in said else said
