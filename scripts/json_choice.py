#!/usr/bin/env python3
"""Why msgspec: the JSON work of the hot path, timed with the standard library, orjson and msgspec.

- a ``request`` frame, decoded (and, for msgspec, validated into its typed struct) and encoded;
- an Ollama NDJSON line of one token, decoded (what the worker reads per token);
- a client's chat body, decoded (what the hub reads per request).

    python scripts/json_choice.py      (needs orjson installed: pip install orjson)
"""

from __future__ import annotations

import json
import timeit

import msgspec
import orjson

from ghubai import protocol

FRAME = protocol.encode(protocol.Request(
    protocol.new_request_id(), "openai.chat",
    {"model": "llama3", "messages": [{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": "Say hello in five words."}],
     "stream": True, "max_tokens": 16}, True, {"x-request-id": "0123456789abcdef"}))
LINE = json.dumps({"model": "llama3", "created_at": "2026-01-01T00:00:00Z",
                   "message": {"role": "assistant", "content": " hello"}, "done": False}).encode()
BODY = json.dumps({"model": "llama3", "messages": [{"role": "user", "content": "x" * 400}] * 8,
                   "stream": True}).encode()
FRAME_OBJECT = json.loads(FRAME)
STRUCT = protocol.decode(FRAME)
ENCODER, DECODER = msgspec.json.Encoder(), msgspec.json.Decoder()


def _check_frame(frame: dict) -> None:  # roughly what the field checks of a dict-based decoder cost
    assert isinstance(frame["id"], str) and len(frame["id"]) == 32 and isinstance(frame["body"], dict)
    assert isinstance(frame["api"], str) and isinstance(frame["stream"], bool)


CASES = {
    "request frame: decode + check": {
        "json": lambda: _check_frame(json.loads(FRAME)),
        "orjson": lambda: _check_frame(orjson.loads(FRAME)),
        "msgspec": lambda: protocol.decode(FRAME)},
    "request frame: encode": {
        "json": lambda: json.dumps(FRAME_OBJECT, separators=(",", ":")),
        "orjson": lambda: orjson.dumps(FRAME_OBJECT).decode(),
        "msgspec": lambda: protocol.encode(STRUCT)},
    "engine NDJSON line: decode": {
        "json": lambda: json.loads(LINE), "orjson": lambda: orjson.loads(LINE), "msgspec": lambda: DECODER.decode(LINE)},
    "client body (3 KB): decode": {
        "json": lambda: json.loads(BODY), "orjson": lambda: orjson.loads(BODY), "msgspec": lambda: DECODER.decode(BODY)},
}


def main() -> None:
    print(f"| {'µs per call':<32} | {'json':>6} | {'orjson':>6} | {'msgspec':>7} |")
    print(f"|{'-' * 34}|{'-' * 8}|{'-' * 8}|{'-' * 9}|")
    for case, libraries in CASES.items():
        times = {name: min(timeit.repeat(call, number=20_000, repeat=5)) / 20_000 * 1e6
                 for name, call in libraries.items()}
        print(f"| {case:<32} | {times['json']:>6.2f} | {times['orjson']:>6.2f} | {times['msgspec']:>7.2f} |")


if __name__ == "__main__":
    main()
