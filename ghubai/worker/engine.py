"""The worker's side of the local engine: model discovery and streaming calls over httpx.

A call yields the answer as the client will receive it (SSE events or NDJSON lines), one piece per
network read, so a fast engine costs one hub frame per read and nothing waits to fill a batch. The
engine's end-of-stream marker, its usage figures and its mid-stream errors are taken out here: the
worker reports them in the ``end`` and ``error`` frames, and the hub ends the stream its own way.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from ghubai import dialects
from ghubai.config import EngineConfig
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
    """One request to the engine; ``usage`` is filled in as the engine reports it."""
    api: str
    body: dict[str, Any]
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)  # X-Request-ID, W3C trace context
    client_wants_usage: bool = False
    usage: dict[str, int] | None = field(default=None)
    finished: bool = False  # the engine said its answer is complete ([DONE], or "done": true)


def _error_message(raw: bytes) -> str:
    try:
        value = json.loads(raw)
    except ValueError:
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
        value = json.loads(payload)
    except ValueError:
        return None
    if isinstance(value, dict) and "error" in value:
        return _error_message(payload)
    if isinstance(value, dict) and value.get("object") == "error":
        return str(value.get("message") or "engine error")
    return None


def _usage_of(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    usage = value.get("usage")
    if isinstance(usage, dict):
        return {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                "completion_tokens": int(usage.get("completion_tokens") or 0)}
    if value.get("done") is True or "prompt_eval_count" in value:
        return {"prompt_tokens": int(value.get("prompt_eval_count") or 0),
                "completion_tokens": int(value.get("eval_count") or 0)}
    return None


class Engine:
    """The local engine as the worker calls it. Invariant: every call yields the answer as its
    client will receive it, and ends with the engine's usage in its ``Call`` or an ``EngineError``."""
    def __init__(self, config: EngineConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client

    @staticmethod
    def client_for(config: EngineConfig) -> httpx.AsyncClient:
        timeout = httpx.Timeout(config.idle_timeout_s, connect=config.connect_timeout_s,
                                pool=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=config.max_concurrency + 4,
                              max_keepalive_connections=config.max_concurrency + 4)
        return httpx.AsyncClient(base_url=config.url, timeout=timeout, limits=limits)

    async def discover(self) -> list[str]:
        """The engine's model names; raises httpx.HTTPError or ValueError when it cannot say."""
        if self.config.kind == "ollama":
            response = await self.client.get("/api/tags")
            response.raise_for_status()
            return sorted({m["name"] for m in response.json().get("models", [])})
        response = await self.client.get("/v1/models")
        response.raise_for_status()
        return sorted({m["id"] for m in response.json().get("data", [])})

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
        try:
            method = translator.method(call.api) if translator else "POST"
            async with self.client.stream(method, path, json=body if method == "POST" else None,
                                          headers=call.headers) as response:
                if response.status_code != 200:
                    raise self._refusal(response.status_code, await response.aread())
                if not call.stream:
                    raw = await response.aread()
                    value = json.loads(raw)
                    call.usage = _usage_of(value)
                    yield translator.whole(value, call.usage) if translator else raw
                    return
                sse = path.startswith("/v1/")
                split = sse_payloads if sse else ndjson_payloads
                async for batch in split(response.aiter_bytes()):
                    out = self._translate(call, batch, translator) if translator else self._render(call, batch, sse)
                    if out:
                        yield out
                if not call.finished:  # e.g. Ollama's OpenAI layer after an error: the stream just stops
                    raise EngineError(502, "the engine ended the stream without finishing its answer",
                                      retryable=True)
        except httpx.TimeoutException as error:
            raise EngineError(504, f"engine timed out: {type(error).__name__}", retryable=True) from None
        except (httpx.TransportError, ValueError) as error:
            raise EngineError(502, f"engine connection failed: {error or type(error).__name__}",
                              retryable=True) from None

    def _refusal(self, status: int, raw: bytes) -> EngineError:
        message = _error_message(raw)
        if status == 404:
            return EngineError(404, message, retryable=True, model_missing=True)
        return EngineError(status, message, retryable=status >= 500 or status == 429)

    def _render(self, call: Call, batch: list[bytes], sse: bool) -> bytes:
        """The payloads as the client receives them. Usage is noted (and dropped if the client did
        not ask for it); an error payload ends the call as an EngineError, so that the hub sends
        its one final error event."""
        out = []
        for payload in batch:
            if payload == b"[DONE]":
                call.finished = True
                continue
            if (message := engine_error(payload)) is not None:
                raise EngineError(502, message, retryable=True)
            if any(marker in payload for marker in _USAGE_MARKERS):
                value = json.loads(payload)
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
                raise EngineError(502, message, retryable=True)
            value = json.loads(payload)
            if isinstance(value, dict):
                call.usage = _usage_of(value) or call.usage
                out.extend(translator.chunk(value))
                call.finished |= translator.done
        return b"".join(out)


_USAGE_MARKERS = (b'"usage":{', b'"usage": {', b'"done":true', b'"done": true')


def _sse_data(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


async def sse_payloads(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """SSE ``data`` payloads, one list per network read. An event is complete at a blank line, or
    at the end of the stream (an engine may end on ``data: [DONE]\n`` alone)."""
    pending = b""
    async for data in chunks:
        pending += data
        *events, pending = pending.replace(b"\r\n", b"\n").split(b"\n\n")
        if batch := [payload for event in events if (payload := _sse_data(event)) is not None]:
            yield batch
    if (payload := _sse_data(pending.strip(b"\r\n"))) is not None:
        yield [payload]


async def ndjson_payloads(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """NDJSON lines, one list per network read; a last line without its newline counts too."""
    pending = b""
    async for data in chunks:
        pending += data
        *lines, pending = pending.split(b"\n")
        if batch := [line for line in lines if line.strip()]:
            yield batch
    if pending.strip():
        yield [pending]
