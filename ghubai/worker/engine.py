"""The worker's side of the local engine: model discovery (httpx: a request every
``discovery_interval_s``) and the calls themselves, on a keep-alive pool of h11 connections
(``ghubai.http11.client``: at most ``max_concurrency`` kept, a connection reused only after a clean
answer, closed at once when its request is cancelled, which is what stops the engine).

A call yields the answer as the client will receive it (SSE events or NDJSON lines), one piece per
network read, so a fast engine costs one hub frame per read and nothing waits to fill a batch. The
engine's end-of-stream marker, its usage figures and its mid-stream errors are taken out here: the
worker reports them in the ``end`` and ``error`` frames, and the hub ends the stream its own way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from ghubai import dialects, protocol
from ghubai.config import EngineConfig
from ghubai.http11.client import TRANSPORT_ERRORS, ConnectionPool, TooLarge, tls_client_context
from ghubai.worker.translate import Translator, translator_for

# Where each API lives on an engine that speaks it: Ollama serves its native API and an OpenAI
# layer; an OpenAI-compatible engine gets Ollama-API requests translated (ghubai/worker/translate.py).
PATHS = {
    "openai.chat": "/v1/chat/completions",
    "openai.completions": "/v1/completions",
    "openai.embeddings": "/v1/embeddings",
    "ollama.chat": "/api/chat",
    "ollama.generate": "/api/generate",
    "ollama.embed": "/api/embed",
    "ollama.embeddings": "/api/embeddings",
    "ollama.show": "/api/show",
}


class EngineError(Exception):
    """The engine could not serve the call. ``retryable``: another worker may succeed."""

    def __init__(self, status: int, message: str, retryable: bool, model_missing: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable
        self.model_missing = model_missing


@dataclass
class Call:
    """One request to the engine; ``usage`` is filled in as the engine reports it. Invariant: once
    ``failure`` is set or ``finished`` is true, the engine's answer is over."""
    api: str
    body: dict[str, Any]
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)  # X-Request-ID, W3C trace context
    client_wants_usage: bool = False
    usage: dict[str, int] | None = field(default=None)
    finished: bool = False  # the engine said its answer is complete ([DONE], or "done": true)
    failure: EngineError | None = None  # the engine reported an error in the middle of its stream


def _error_message(raw: bytes) -> str:
    try:
        value = _decode(raw)
    except (ValueError, RecursionError):
        return raw.decode(errors="replace").strip()[:500] or "no detail"
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error if error is not None else value)


def engine_error(payload: bytes) -> str | None:
    """The message of a payload that is an engine's error object (``{"error": ...}`` however it is
    spaced, or vLLM's ``{"object": "error", "message": ...}``), else None. Cheap for the others:
    only a payload with a literal ``"error"`` string in it is parsed."""
    if b'"error"' not in payload:
        return None
    try:
        value = _decode(payload)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and "error" in value:
        return _error_message(payload)
    if isinstance(value, dict) and value.get("object") == "error":
        return str(value.get("message") or "engine error")
    return None


def _count(value: Any) -> int:
    """A token count as an engine reported it: a non-negative int, whatever it sent (an engine's
    -1, a float, text or null must not fail an answer that otherwise arrived)."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError, OverflowError):
        return 0


def _usage_of(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    usage = value.get("usage")
    if isinstance(usage, dict):
        return {"prompt_tokens": _count(usage.get("prompt_tokens")),
                "completion_tokens": _count(usage.get("completion_tokens"))}
    if value.get("done") is True or "prompt_eval_count" in value:
        return {"prompt_tokens": _count(value.get("prompt_eval_count")), "completion_tokens": _count(value.get("eval_count"))}
    return None


IDLE_REUSE_S = 4.0  # reuse an idle connection only while the engine surely keeps it (uvicorn: 5 s)
REFUSAL_LIMIT = 1 << 20  # what is read of an engine's error answer
MAX_RECORD_BYTES = 16 << 20  # one NDJSON line or SSE event of an engine's stream
ANSWER_LIMIT = protocol.MAX_ANSWER_BYTES
_JSON = [("content-type", "application/json")]
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Engine:
    """The local engine as the worker calls it. Invariant: every call yields the answer as its
    client will receive it, and ends with the engine's usage in its ``Call`` or an ``EngineError``."""

    def __init__(self, config: EngineConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client  # for discovery
        parts = urlsplit(config.url)
        tls = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")  # an engine behind a path (a gateway's /ollama, say)
        self.pool = ConnectionPool(parts.hostname or "localhost", parts.port or (443 if tls else 80),
                                   ssl_context=tls_client_context() if tls else None,
                                   connect_timeout_s=config.connect_timeout_s, max_idle=config.max_concurrency,
                                   idle_reuse_s=IDLE_REUSE_S)

    @staticmethod
    def client_for(config: EngineConfig) -> httpx.AsyncClient:
        timeout = httpx.Timeout(config.idle_timeout_s, connect=config.connect_timeout_s,
                                pool=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=config.max_concurrency + 4,
                              max_keepalive_connections=config.max_concurrency + 4)
        return httpx.AsyncClient(base_url=config.url, timeout=timeout, limits=limits)

    async def discover(self) -> list[str]:
        """The engine's model names; raises httpx.HTTPError or ValueError when it cannot say. Names a
        hub would refuse (not text, empty, over 256 characters) are left out, and at most 4,096 kept."""
        path, listing, key = ("/api/tags", "models", "name") if self.config.kind == "ollama" else \
            ("/v1/models", "data", "id")
        response = await self.client.get(path)
        response.raise_for_status()
        try:
            answer = _decode(response.content)
        except RecursionError:
            raise ValueError(f"{path} answered JSON nested too deeply") from None
        entries = answer.get(listing) if isinstance(answer, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{path} answered no {listing!r} list")
        names = {name for entry in entries if isinstance(entry, dict)
                 and isinstance(name := entry.get(key), str) and 0 < len(name) <= 256}  # a list as a name: left out
        return sorted(names)[:4096]

    def _prepare(self, call: Call) -> dict[str, Any]:
        body = dict(call.body)
        if call.stream and call.api in ("openai.chat", "openai.completions"):
            # Always ask for usage so the grid can count tokens; strip it if the client did not ask.
            call.client_wants_usage = dialects.wants_usage(body)
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return body

    async def run(self, call: Call) -> AsyncIterator[bytes]:
        """Yield the reply's bytes as they arrive; raise EngineError when the engine fails."""
        translator = translator_for(self.config.kind, call.api)
        if translator is not None:
            path, body = translator.path, translator.request(call.body, call.stream)
        elif call.api in PATHS:
            path, body = PATHS[call.api], self._prepare(call)
        else:
            raise EngineError(400, f"this worker does not serve {call.api}", retryable=False)
        method = translator.method(call.api) if translator else "POST"
        raw_body = _encode(body) if method == "POST" else b""
        headers = [*_JSON, *call.headers.items()] if raw_body else list(call.headers.items())
        try:
            async with self.pool.request(method, self.prefix + path, headers, raw_body,
                                         self.config.idle_timeout_s) as response:
                if response.status != 200:
                    raise self._refusal(response.status, await response.read(REFUSAL_LIMIT))
                if not call.stream:
                    raw = await response.read(ANSWER_LIMIT)
                    value = _decode(raw)
                    call.usage = _usage_of(value)
                    yield translator.whole(value, call.usage) if translator else raw
                    return
                sse = path.startswith("/v1/")
                split = sse_payloads if sse else ndjson_payloads
                async for batch in split(response.chunks()):
                    out = self._translate(call, batch, translator) if translator else self._render(call, batch, sse)
                    if out:
                        yield out
                    if call.failure:
                        raise call.failure
                if not call.finished:  # e.g. Ollama's OpenAI layer after an error: the stream just stops
                    raise EngineError(502, "the engine ended the stream without finishing its answer",
                                      retryable=True)
        except trio.TooSlowError:
            raise EngineError(504, "engine timed out", retryable=True) from None
        except TooLarge as error:  # another worker's engine would send the same: no retry
            raise EngineError(502, str(error), retryable=False) from None
        except (*TRANSPORT_ERRORS, ValueError, RecursionError) as error:
            raise EngineError(502, f"engine connection failed: {error or type(error).__name__}",
                              retryable=True) from None

    def _refusal(self, status: int, raw: bytes) -> EngineError:
        message = _error_message(raw)
        if status == 404:
            return EngineError(404, message, retryable=True, model_missing=True)
        return EngineError(status, message, retryable=status >= 500 or status == 429)

    def _render(self, call: Call, batch: list[bytes], sse: bool) -> bytes:
        """The payloads as the client receives them. Usage is noted (and dropped if the client did
        not ask for it); an error payload ends the call (``call.failure``), so that the hub sends
        its one final error event after what came before it."""
        out = []
        for payload in batch:
            if payload == b"[DONE]":
                call.finished = True
                continue
            if (message := engine_error(payload)) is not None:
                call.failure = EngineError(502, message, retryable=True)  # after what came before it
                break
            if any(marker in payload for marker in _USAGE_MARKERS):
                value = _decode(payload)
                value = value if isinstance(value, dict) else {}
                if usage := _usage_of(value):
                    call.usage = usage
                call.finished |= value.get("done") is True
                if value.get("choices") == [] and not call.client_wants_usage:
                    continue
            out.append(b"data: " + payload + b"\n\n" if sse else payload + b"\n")
        return b"".join(out)


    def _translate(self, call: Call, batch: list[bytes], translator: Translator) -> bytes:
        out = []
        for payload in batch:
            if payload == b"[DONE]":
                call.finished = True
                out.append(translator.final(call.usage))
                continue
            if (message := engine_error(payload)) is not None:
                call.failure = EngineError(502, message, retryable=True)  # after what came before it
                break
            value = _decode(payload)
            if isinstance(value, dict):
                call.usage = _usage_of(value) or call.usage
                out.extend(translator.chunk(value))
                call.finished |= translator.done
        return b"".join(out)


_USAGE_MARKERS = (b'"usage":{', b'"usage": {', b'"done":true', b'"done": true')


def _sse_data(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


async def _records(chunks: AsyncIterator[bytes], separator: bytes, crlf: bool) -> AsyncIterator[list[bytes]]:
    """The records of a byte stream, one list per network read, in linear time however long a record
    (each byte is searched about once), and none over ``MAX_RECORD_BYTES``. The last record needs no
    separator. ``crlf``: CRLF line ends count as LF."""
    buffer = bytearray()
    async for data in chunks:
        if crlf:
            if buffer.endswith(b"\r") and data.startswith(b"\n"):
                del buffer[-1:]
            data = data.replace(b"\r\n", b"\n")
        start = max(0, len(buffer) - len(separator) + 1)
        buffer += data
        records, taken = [], 0
        while (end := buffer.find(separator, start)) != -1:
            records.append(bytes(buffer[taken:end]))
            taken = start = end + len(separator)
        del buffer[:taken]
        if len(buffer) > MAX_RECORD_BYTES:
            raise TooLarge(f"the engine sent a line or event larger than {MAX_RECORD_BYTES} bytes")
        if records:
            yield records
    if buffer.strip():
        yield [bytes(buffer)]


async def sse_payloads(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """SSE ``data`` payloads, one list per network read. An event is complete at a blank line, or
    at the end of the stream (an engine may end on ``data: [DONE]\n`` alone)."""
    async for events in _records(chunks, b"\n\n", crlf=True):
        if batch := [payload for event in events if (payload := _sse_data(event.strip(b"\n"))) is not None]:
            yield batch


async def ndjson_payloads(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """NDJSON lines, one list per network read; a last line without its newline counts too."""
    async for lines in _records(chunks, b"\n", crlf=False):
        if batch := [line for line in lines if line.strip()]:
            yield batch
