"""Which conversation a request belongs to, so that hub and proxy can send it where its prompt is
already computed.

LLM engines keep the computed prefix of a prompt (the KV cache) in the slot that ran it; the next
turn of a chat re-sends that prefix, and only the engine that holds it skips the work. The key
names a conversation without reading all of it: an explicit session (header ``X-Session-ID``, or
OpenAI's ``user`` field), else a hash of the model and the conversation's opening — the first
system and the first user message, or the start of a completion's prompt — which every later turn
repeats unchanged. ``score`` ranks places for a key (rendezvous hashing: the place of highest score
wins): the same key gets the same place while it is there, and keys spread evenly over places.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

SESSION_HEADER = b"x-session-id"
PROMPT_OPENING_CHARS = 2048  # of a completion's prompt: a long shared preamble, not the whole prompt
_MASK = (1 << 64) - 1
_encode = msgspec.json.Encoder().encode


def _digest(*parts: bytes) -> int:
    hashed = hashlib.blake2b(digest_size=8)
    for part in parts:
        hashed.update(len(part).to_bytes(4, "big"))
        hashed.update(part)
    return int.from_bytes(hashed.digest(), "big")


def _opening(body: dict[str, Any]) -> bytes | None:
    messages = body.get("messages")
    if isinstance(messages, list):
        first: dict[str, Any] = {}
        for message in messages:
            if isinstance(message, dict) and message.get("role") in ("system", "user"):
                first.setdefault(str(message["role"]), message.get("content"))
            if "user" in first:
                return _encode([first.get("system"), first["user"]])
        return None
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return _encode([body.get("system"), prompt[:PROMPT_OPENING_CHARS]])
    return None


def key_of(body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> int | None:
    """The conversation's key, or None for a request that has none (embeddings, an empty prompt)."""
    model = str(body.get("model", "")).encode()
    session = next((value for name, value in headers if name == SESSION_HEADER), None)
    if session:
        return _digest(b"session", model, session)
    if isinstance(body.get("user"), str) and body["user"]:
        return _digest(b"user", model, body["user"].encode())
    opening = _opening(body)
    return None if opening is None else _digest(b"opening", model, opening)


def seed_of(name: str) -> int:
    """A place's own 64-bit number, computed once, so that ranking costs no hashing per place."""
    return _digest(b"place", name.encode())


def score(key: int, seed: int) -> int:
    """The place's random weight for ``key``: a 64-bit mix of the two (splitmix64's finaliser)."""
    value = (key ^ seed) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)
