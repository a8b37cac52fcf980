"""Frames between hub and worker: JSON text messages over one WebSocket per worker.

This module is the only place that knows frame shapes. Each constructor returns the encoded text;
``decode`` turns text back into a dict and checks that the fields its type needs are there.

Two deliberate changes to DESIGN.md, both to keep the per-token cost of the grid low:
- ``chunk.data`` is a *list* of payloads: the worker puts every payload that one read from the engine
  brought into one frame, so a fast engine costs one frame per network read instead of one per token;
- one WebSocket message carries one or more frames, one per line (JSON text has no raw newline): a
  writer sends everything already queued in one message. Nothing is ever held back to fill a batch.
"""

from __future__ import annotations

import json
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
    "chunk": ("id", "data"),
    "end": ("id", "usage"),
    "error": ("id", "status", "message", "retryable"),
    "cancel": ("id",),
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


def chunk(request_id: str, data: list[str]) -> str:
    return _encode("chunk", id=request_id, data=data)


def end(request_id: str, usage: dict[str, int] | None) -> str:
    return _encode("end", id=request_id, usage=usage)


def error(request_id: str, status: int, message: str, retryable: bool) -> str:
    return _encode("error", id=request_id, status=status, message=message, retryable=retryable)


def cancel(request_id: str) -> str:
    return _encode("cancel", id=request_id)


def ping(inflight: int) -> str:
    return _encode("ping", inflight=inflight)


def pong(inflight: int) -> str:
    return _encode("pong", inflight=inflight)


def pack(frames: list[str]) -> str:
    """Frames already waiting to go out, as one WebSocket message."""
    return "\n".join(frames)


def unpack(message: str | bytes) -> list[dict[str, Any]]:
    """Every frame of one WebSocket message; raises ProtocolError if any is malformed."""
    lines = message.split(b"\n" if isinstance(message, bytes) else "\n")  # type: ignore[arg-type]
    return [decode(line) for line in lines]


async def write_batched(frames: Any, send: Any) -> None:
    """The one writer of a link: sends what is queued on the ``frames`` channel, all that is already
    waiting in one message, through ``send`` (an awaitable taking the message text)."""
    async for frame in frames:
        batch = [frame]
        while True:
            try:
                batch.append(frames.receive_nowait())
            except (WouldBlock, EndOfChannel):
                break
        await send(pack(batch))


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
