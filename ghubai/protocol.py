"""Frames between hub and worker over one WebSocket per worker.

This module is the only place that knows frame shapes. Control frames are JSON text; each
constructor returns the encoded text and ``decode`` checks that a frame has the fields its type needs.

Two deliberate changes to DESIGN.md, both to keep the per-token cost of the grid low (measured:
decoding JSON chunk frames took a third of the hub's CPU at 64 streams):
- ``chunk`` is binary: ``id`` (32 ASCII hex digits), 4-byte big-endian length, then ``data``, the bytes
  exactly as the client will receive them (SSE events or NDJSON lines, rendered by the worker). The
  hub forwards them without parsing, and several chunks can share one binary message;
- one text message carries one or more JSON frames, one per line (JSON text has no raw newline).
A link's writer sends everything already queued in as few messages as it can, and never holds a
frame back to fill a batch.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
import uuid
from typing import Any

from trio import EndOfChannel, WouldBlock

PROTOCOL = 1
GRIDHUB_PATH = "/gridhub"

# WebSocket close codes the hub uses to tell a worker why it is refused.
CLOSE_PROTOCOL_MISMATCH = 4001
CLOSE_BAD_HELLO = 4002
CLOSE_REPLACED = 4003

APIS = (
    "openai.chat", "openai.completions", "openai.embeddings",
    "ollama.chat", "ollama.generate", "ollama.embed", "ollama.embeddings", "ollama.show",
)

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


_ID = lambda value: isinstance(value, str) and 0 < len(value) <= 64  # noqa: E731
_STR = lambda value: isinstance(value, str)  # noqa: E731
_BOOL = lambda value: isinstance(value, bool)  # noqa: E731
_COUNT = lambda value: _is_int(value) and value >= 0  # noqa: E731

# What a request carries along for logs and traces (W3C trace context), passed on to the engine.
TRACE_HEADERS = ("x-request-id", "traceparent", "tracestate")
_TRACE_VALUE = re.compile(r"[\x20-\x7e]{1,512}")  # what any HTTP client can send on to the engine
_TRACE = lambda value: isinstance(value, dict) and all(  # noqa: E731
    key in TRACE_HEADERS and isinstance(item, str) and _TRACE_VALUE.fullmatch(item) for key, item in value.items())


def clean_trace(headers: dict[str, str]) -> dict[str, str]:
    """The trace headers a request frame may carry: a client's odd or oversized ones are dropped."""
    return {key: value for key, value in headers.items() if key in TRACE_HEADERS and _TRACE_VALUE.fullmatch(value)}

# Each frame type, with a check of every field it must carry: a frame that fails one is refused
# as a whole, so a buggy or hostile peer cannot make the other side fail on a wrong type later.
# Fields in OPTIONAL may be missing (frames of an older peer); when present they are checked too.
FIELDS: dict[str, dict[str, Any]] = {
    "hello": {"protocol": _is_int, "worker_id": _ID, "name": _STR, "models": _is_strings,
              "max_concurrency": lambda v: _is_int(v) and v >= 1, "engine": _STR, "version": _STR},
    "welcome": {"hub_id": _STR, "heartbeat_s": lambda v: isinstance(v, int | float) and v > 0},
    "models": {"models": _is_strings},
    "request": {"id": _ID, "api": _STR, "body": lambda v: isinstance(v, dict), "stream": _BOOL, "trace": _TRACE},
    "end": {"id": _ID, "usage": lambda v: v is None or (isinstance(v, dict) and all(map(_COUNT, v.values())))},
    "error": {"id": _ID, "status": lambda v: _is_int(v) and 100 <= v <= 599, "message": _STR, "retryable": _BOOL},
    "cancel": {"id": _ID},
    "credit": {"id": _ID, "bytes": _COUNT},
    "load": {"inflight": _COUNT},
    "draining": {},
    "ping": {"inflight": _COUNT},
    "pong": {"inflight": _COUNT},
}
OPTIONAL = {("request", "trace")}


class ProtocolError(ValueError):
    """A frame that cannot be understood (not JSON, no type, a known type lacking fields).
    ``frames``: those of the same message that were read before the fault. ``request_id``: the id
    of a refused ``request`` frame, when it had a readable one, so the refusal can be answered."""

    def __init__(self, message: str, frames: list[dict[str, Any]] | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.frames = frames or []
        self.request_id = request_id


def _encode(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def hello(worker_id: str, name: str, models: list[str], max_concurrency: int, engine: str, version: str) -> str:
    return _encode("hello", protocol=PROTOCOL, worker_id=worker_id, name=name, models=models,
                   max_concurrency=max_concurrency, engine=engine, version=version)


def welcome(hub_id: str, heartbeat_s: float) -> str:
    return _encode("welcome", hub_id=hub_id, heartbeat_s=heartbeat_s)


def models(names: list[str]) -> str:
    return _encode("models", models=names)


def request(request_id: str, api: str, body: dict[str, Any], stream: bool, trace: dict[str, str]) -> str:
    return _encode("request", id=request_id, api=api, body=body, stream=stream, trace=trace)


ID_BYTES = 32
_LENGTH = struct.Struct(">I")


def new_request_id() -> str:
    return uuid.uuid4().hex


def chunk(request_id: str, data: bytes) -> bytes:
    return request_id.encode() + _LENGTH.pack(len(data)) + data


def unpack_chunks(message: bytes) -> list[dict[str, Any]]:
    """The chunk frames of one binary message."""
    frames, offset, size = [], 0, len(message)
    while offset < size:
        start = offset + ID_BYTES + _LENGTH.size
        if start > size:
            raise ProtocolError("truncated chunk header", frames)
        (length,) = _LENGTH.unpack_from(message, offset + ID_BYTES)
        if start + length > size:
            raise ProtocolError("truncated chunk data", frames)
        frames.append({"type": "chunk", "id": message[offset:offset + ID_BYTES].decode("ascii", "replace"),
                       "data": message[start:start + length]})
        offset = start + length
    return frames


def end(request_id: str, usage: dict[str, int] | None) -> str:
    return _encode("end", id=request_id, usage=usage)


def error(request_id: str, status: int, message: str, retryable: bool, busy: bool = False) -> str:
    """``busy``: the worker has no free slot right now (other hubs filled it); the hub waits for its
    next ``load`` or another worker instead of counting a failed attempt."""
    return _encode("error", id=request_id, status=status, message=message, retryable=retryable, busy=busy)


def cancel(request_id: str) -> str:
    return _encode("cancel", id=request_id)


# Flow control: a worker may have at most this many bytes of a request's answer that the hub has
# not yet handed to its client. The hub returns ``credit`` as its client's socket takes the bytes,
# so a slow client paces the worker (which stops reading the engine) instead of filling the hub.
WINDOW_BYTES = 256 * 1024


def credit(request_id: str, size: int) -> str:
    """Hub -> worker: ``size`` more bytes of this request's answer reached the client."""
    return _encode("credit", id=request_id, bytes=size)


def load(inflight: int) -> str:
    """Worker -> every hub, whenever its number of running requests changes: a worker shared by
    several hubs is full for all of them at once, and each hub must know when a slot frees."""
    return _encode("load", inflight=inflight)


def draining() -> str:
    """Worker -> hub: shutting down; finishing what it runs, taking nothing new."""
    return _encode("draining")


def ping(inflight: int) -> str:
    return _encode("ping", inflight=inflight)


def pong(inflight: int) -> str:
    return _encode("pong", inflight=inflight)


def unpack(message: str | bytes) -> tuple[list[dict[str, Any]], list[ProtocolError]]:
    """The frames of one WebSocket message, and what was wrong with the parts that were refused:
    a bad line of a text message costs that line only; a bad binary record ends its message."""
    if isinstance(message, bytes):
        try:
            return unpack_chunks(message), []
        except ProtocolError as problem:
            return problem.frames, [problem]
    frames, problems = [], []
    for line in message.split("\n"):
        try:
            frames.append(decode(line))
        except ProtocolError as problem:
            problems.append(problem)
    return frames, problems


MAX_BATCH_BYTES = 1 << 20  # a batch is cut here; a single larger frame goes alone
MAX_MESSAGE_BYTES = 64 << 20  # what either side accepts in one message (request bodies included)


async def write_batched(frames: Any, send: Any) -> None:
    """The one writer of a link: sends what is queued on the ``frames`` channel (JSON text frames and
    binary chunks), everything already waiting in as few messages as order and size allow."""
    async for frame in frames:
        batch = [frame]
        size = len(frame)
        while size < MAX_BATCH_BYTES:
            try:
                batch.append(frames.receive_nowait())
            except (WouldBlock, EndOfChannel):
                break
            size += len(batch[-1])
        for binary, group in itertools.groupby(batch, key=lambda item: isinstance(item, bytes)):
            await send(b"".join(group) if binary else "\n".join(group))


def decode(text: str | bytes) -> dict[str, Any]:
    """Parse one frame. Unknown types pass through (the caller logs and ignores them)."""
    try:
        frame = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"frame is not JSON: {exc}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise ProtocolError("frame has no type")
    if frame["type"] == "chunk":
        raise ProtocolError("chunk frames are binary")
    for name, valid in FIELDS.get(frame["type"], {}).items():
        if name not in frame:
            if (frame["type"], name) in OPTIONAL:
                continue
            answerable = frame["type"] == "request" and _ID(frame.get("id"))
            raise ProtocolError(f"{frame['type']} frame lacks {name}", request_id=frame["id"] if answerable else None)
        if not valid(frame[name]):
            answerable = frame["type"] == "request" and _ID(frame.get("id"))
            raise ProtocolError(f"{frame['type']} frame has a bad {name}: {str(frame[name])[:80]}",
                                request_id=frame["id"] if answerable else None)
    return frame
