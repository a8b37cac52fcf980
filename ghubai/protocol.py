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
    "ollama.chat", "ollama.generate", "ollama.embed",
)

FIELDS: dict[str, tuple[str, ...]] = {
    "hello": ("protocol", "worker_id", "name", "models", "max_concurrency", "engine", "version"),
    "welcome": ("hub_id", "heartbeat_s"),
    "models": ("models",),
    "request": ("id", "api", "body", "stream"),
    "end": ("id", "usage"),
    "error": ("id", "status", "message", "retryable"),
    "cancel": ("id",),
    "load": ("inflight",),
    "ping": ("inflight",),
    "pong": ("inflight",),
}


class ProtocolError(ValueError):
    """A frame that cannot be understood (not JSON, no type, a known type lacking fields)."""


def _encode(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields}, separators=(",", ":"))


def hello(worker_id: str, name: str, models: list[str], max_concurrency: int, engine: str, version: str) -> str:
    return _encode("hello", protocol=PROTOCOL, worker_id=worker_id, name=name, models=models,
                   max_concurrency=max_concurrency, engine=engine, version=version)


def welcome(hub_id: str, heartbeat_s: float) -> str:
    return _encode("welcome", hub_id=hub_id, heartbeat_s=heartbeat_s)


def models(names: list[str]) -> str:
    return _encode("models", models=names)


def request(request_id: str, api: str, body: dict[str, Any], stream: bool) -> str:
    return _encode("request", id=request_id, api=api, body=body, stream=stream)


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
            raise ProtocolError("truncated chunk header")
        (length,) = _LENGTH.unpack_from(message, offset + ID_BYTES)
        if start + length > size:
            raise ProtocolError("truncated chunk data")
        frames.append({"type": "chunk", "id": message[offset:offset + ID_BYTES].decode("ascii", "replace"),
                       "data": message[start:start + length]})
        offset = start + length
    return frames


def end(request_id: str, usage: dict[str, int] | None) -> str:
    return _encode("end", id=request_id, usage=usage)


def error(request_id: str, status: int, message: str, retryable: bool) -> str:
    return _encode("error", id=request_id, status=status, message=message, retryable=retryable)


def cancel(request_id: str) -> str:
    return _encode("cancel", id=request_id)


def load(inflight: int) -> str:
    """Worker -> every hub, whenever its number of running requests changes: a worker shared by
    several hubs is full for all of them at once, and each hub must know when a slot frees."""
    return _encode("load", inflight=inflight)


# An ``error`` with this status and ``retryable`` says "no free slot here right now": the hub waits for
# the worker's next ``load`` (or another worker) instead of counting it as a failed attempt.
BUSY = 429


def ping(inflight: int) -> str:
    return _encode("ping", inflight=inflight)


def pong(inflight: int) -> str:
    return _encode("pong", inflight=inflight)


def unpack(message: str | bytes) -> list[dict[str, Any]]:
    """Every frame of one WebSocket message; raises ProtocolError if any is malformed."""
    if isinstance(message, bytes):
        return unpack_chunks(message)
    return [decode(line) for line in message.split("\n")]


async def write_batched(frames: Any, send: Any) -> None:
    """The one writer of a link: sends what is queued on the ``frames`` channel (JSON text frames and
    binary chunks), everything already waiting in as few messages as order allows, through ``send``."""
    async for frame in frames:
        batch = [frame]
        while True:
            try:
                batch.append(frames.receive_nowait())
            except (WouldBlock, EndOfChannel):
                break
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
    missing = [name for name in FIELDS.get(frame["type"], ()) if name not in frame]
    if missing:
        raise ProtocolError(f"{frame['type']} frame lacks {', '.join(missing)}")
    return frame
