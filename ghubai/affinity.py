"""Which conversation a request belongs to, so that hub and proxy can send it where its prompt is
already computed.

LLM engines keep the computed prefix of a prompt (the KV cache) in the slot that ran it; the next
turn of a chat re-sends that prefix, and only the engine that holds it skips the work. The key
names a conversation without reading all of it: an explicit session (header ``X-Session-ID``, or
OpenAI's ``prompt_cache_key`` or ``user`` field), else a hash of the model and the conversation's
opening — the first system and the first user message, or the start of a completion's prompt —
which every later turn repeats unchanged. Many conversations open alike (every user says "hi" under
one system prompt), so once a chat has the model's first answer, that answer is part of its key, and
the opening alone is what the hub falls back on for the turn that first carries it, and what it places
a turn by when it knows no worker for it (after a restart: ``keys_of``, ``Pool``).
``score`` ranks places for a key (rendezvous hashing: the place of highest score wins): the same
key gets the same place while it is there, and keys spread evenly over places.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import msgspec

SESSION_HEADER = b"x-session-id"
# the APIs whose prompts an engine keeps computed: an embedding's is not kept, and remembering its key
# (a RAG ingestion makes a hundred thousand) would push the conversations out of a hub's memory
CONVERSING = frozenset({"openai.chat", "openai.completions", "openai.responses", "ollama.chat", "ollama.generate"})
# of a completion's prompt, and of /api/generate's context (the conversation's tokens so far): what
# every turn repeats once the conversation is that long. A shorter conversation's turns each have a key
# of their own, but their prompts are cheap to compute again; a shorter cut would make one key of every
# conversation under a long Modelfile SYSTEM or a licence header, and one worker take them all (a review)
PROMPT_OPENING_CHARS = 2048
CONTEXT_TOKENS = 1024
MESSAGE_CHARS = 65536  # of each text of the messages hashed: their start tells conversations apart
MESSAGES_SCANNED = 64  # for the first system, user and assistant messages
_MASK = (1 << 64) - 1
_encode = msgspec.json.Encoder().encode


def _digest(*parts: bytes) -> int:
    hashed = hashlib.blake2b(digest_size=8)
    for part in parts:
        hashed.update(len(part).to_bytes(4, "big"))
        hashed.update(part)
    return int.from_bytes(hashed.digest(), "big")


NODES = 1024  # of a message's structure visited, however it nests


def _bounded(value: Any) -> Any:
    """``value`` with each text cut to ``MESSAGE_CHARS``, each list and object to its first 64 items,
    8 levels deep and ``NODES`` in all: hashing a 4 MB message whole took half the hub's time for its
    request, and 64 items a level, 8 levels deep, still left 0.85 s for a 3.7 MB body of nested lists."""
    budget = [NODES]

    def bounded(value: Any, depth: int) -> Any:
        budget[0] -= 1
        if budget[0] < 0:
            return None
        if isinstance(value, str):
            return value[:MESSAGE_CHARS]
        if depth >= 8:
            return None
        if isinstance(value, list):
            return [bounded(item, depth + 1) for item in itertools.islice(value, 64)]
        if isinstance(value, dict):
            return {name: bounded(item, depth + 1) for name, item in itertools.islice(value.items(), 64)}
        return value

    return bounded(value, 0)


def _openings(body: dict[str, Any]) -> tuple[bytes | None, bytes | None]:
    """The conversation's opening, and its opening with the model's first answer once it has one."""
    messages = body.get("messages")
    if isinstance(messages, list):
        first: dict[str, Any] = {}
        for message in messages[:MESSAGES_SCANNED]:
            if not isinstance(message, dict) or not isinstance(role := message.get("role"), str) or role in first:
                continue  # (the proxy reads bodies no one has checked: a role may be anything)
            if role in ("system", "user") and "user" not in first:
                first[role] = _bounded(message.get("content"))
            elif role == "assistant" and "user" in first:  # (a tool call is its answer, when it said nothing)
                first[role] = _bounded(message.get("content") or message.get("tool_calls"))
                break
        if "user" not in first:
            return None, None
        opening = [first.get("system"), first["user"]]  # (both bounded above)
        return _encode(opening), (_encode([*opening, first["assistant"]]) if "assistant" in first else None)
    system = _bounded(body.get("system"))  # (the proxy reads bodies no one has checked: it may be anything)
    if isinstance(context := body.get("context"), list) and context:  # /api/generate's memory of the conversation
        return None, _encode([system, [token for token in context[:CONTEXT_TOKENS] if type(token) is int]])
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        return _encode([system, prompt[:PROMPT_OPENING_CHARS]]), None
    return None, None


def as_conversation(body: dict[str, Any]) -> dict[str, Any]:
    """A Responses API request (``/v1/responses``) as the chat it keys like: its ``instructions`` the
    system message, its ``input`` the messages (items without a role, a tool call's, are passed over)
    or, as text, the prompt."""
    inputs, instructions = body.get("input"), body.get("instructions")
    if isinstance(inputs, list):  # (no more than the openings are looked for in)
        return {**body, "messages": [{"role": "system", "content": instructions}, *inputs[:MESSAGES_SCANNED]]}
    return {**body, "system": instructions, "prompt": inputs}


def _session(body: dict[str, Any], headers: list[tuple[bytes, bytes]], model: bytes) -> int | None:
    session = next((value for name, value in headers if name == SESSION_HEADER), None)
    if session:
        return _digest(b"session", model, session)
    for field in ("prompt_cache_key", "user"):  # OpenAI's key for its own prompt caches, and its older one
        if isinstance(body.get(field), str) and body[field]:
            return _digest(b"user", model, body[field][:MESSAGE_CHARS].encode(errors="replace"))
    return None


def key_of(body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> int | None:
    """The conversation's key as the proxy routes it (the same for every turn), or None for a request
    that has none (no session, ``user`` or opening to key: an empty prompt, most embeddings)."""
    model = str(body.get("model", "")).encode()
    if (session := _session(body, headers, model)) is not None:
        return session
    opening, deeper = _openings(body)
    chosen = opening if opening is not None else deeper
    return None if chosen is None else _digest(b"opening", model, chosen)


def keys_of(body: dict[str, Any], headers: list[tuple[bytes, bytes]], api: str) -> tuple[int, int | None] | None:
    """The conversation's key as the hub remembers it, and the key of its opening, which the turn that
    first carries the model's answer falls back on; None for an ``api`` that is not ``CONVERSING``
    or a request with no key."""
    if api not in CONVERSING:
        return None
    if api == "openai.responses":
        body = as_conversation(body)
    model = str(body.get("model", "")).encode()
    if (session := _session(body, headers, model)) is not None:
        return session, None
    opening, deeper = _openings(body)
    opening_key = None if opening is None else _digest(b"opening", model, opening)
    if deeper is not None:
        return _digest(b"answered", model, deeper), opening_key
    return None if opening_key is None else (opening_key, None)


def seed_of(name: str) -> int:
    """A place's own 64-bit number, computed once, so that ranking costs no hashing per place."""
    return _digest(b"place", name.encode())


def score(key: int, seed: int) -> int:
    """The place's random weight for ``key``: a 64-bit mix of the two (splitmix64's finaliser)."""
    value = (key ^ seed) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)
