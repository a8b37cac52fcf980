"""The worker's splitters of an engine's stream (SSE and NDJSON) and its recognition of an engine's
error object, without an engine: each network read is a list of byte strings here."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from ghubai.errors import ApiError, describe, last_sequence_number
from ghubai.http11.client import ConnectFailed, TooLarge
from ghubai.worker.engine import (MAX_RECORD_BYTES, _usage_of, engine_error, engine_failure, ndjson_payloads,
                                  sse_payloads)


async def _reads(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _split(splitter: object, *parts: bytes) -> list[list[bytes]]:
    return [batch async for batch in splitter(_reads(*parts))]  # type: ignore[operator]


async def test_sse_events_come_one_list_per_read() -> None:
    batches = await _split(sse_payloads, b'data: {"a":1}\n\ndata: {"a":2}\n\n', b"data: [DONE]\n\n")
    assert batches == [[b'{"a":1}', b'{"a":2}'], [b"[DONE]"]]


async def test_an_sse_event_split_across_reads_and_crlf_line_ends() -> None:
    batches = await _split(sse_payloads, b'data: {"a"', b":1}\r", b"\n\r\n", b"data:[DONE]\r\n\r\n")
    assert batches == [[b'{"a":1}'], [b"[DONE]"]]


async def test_a_final_sse_event_without_a_blank_line_is_not_dropped() -> None:
    """Regression: an engine that ends on ``data: [DONE]\\n`` used to get a retryable 502."""
    assert await _split(sse_payloads, b'data: {"a":1}\n\n', b"data: [DONE]\n") == [[b'{"a":1}'], [b"[DONE]"]]
    assert await _split(sse_payloads, b"data: [DONE]") == [[b"[DONE]"]]


async def test_an_sse_stream_cut_inside_an_event_drops_it_and_a_bom_or_a_bare_error_is_read() -> None:
    """Regression (hunt): a stream that ended cleanly inside an event passed half an event on (the
    openai SDK raised JSONDecodeError, not the engine's error); an error object sent bare in a 200
    stream (Lemonade, LM Studio) was dropped, so the client got 502 "ended without finishing"; and
    a byte order mark hid the first event."""
    assert await _split(sse_payloads, b'data: {"a":1}\n\n', b'data: {"choices":[{"fini') == [[b'{"a":1}']]
    error = b'{"error": {"message": "the context is 4096 tokens", "code": 400}}'
    assert await _split(sse_payloads, error) == [[error]]
    assert await _split(sse_payloads, b'\xef\xbb\xbfdata: {"a":1}\n\n') == [[b'{"a":1}']]
    assert await _split(sse_payloads, b'\xef\xbb\xbfdata: {"choices":[{"fini') == []  # (review)
    assert await _split(ndjson_payloads, b'{"a":1}\n', b'{"message":{"cont') == [[b'{"a":1}']]  # (review)
    assert await _split(ndjson_payloads, b'{"a":1}\n{"done":true}') == [[b'{"a":1}'], [b'{"done":true}']]
    bom = b"\xef\xbb\xbf"  # (a review: an NDJSON stream's mark was stripped, but not before its unended last line)
    assert await _split(ndjson_payloads, bom + b'{"a":1}\n', b"{}") == [[b'{"a":1}'], [b"{}"]]
    assert await _split(ndjson_payloads, b"", bom + b'{"done": true}') == [[b'{"done": true}']]


async def test_sse_line_ends_of_a_cr_alone_an_empty_event_and_a_mark_cut_across_reads() -> None:
    """Regression (a hunt): an engine ending its lines with CR alone, which the SSE standard allows,
    lost its whole answer (a 502); an event of empty data ("data:"), which the standard does not
    dispatch, failed the answer; a byte order mark written a byte at a time hid the first event."""
    assert await _split(sse_payloads, b'data: {"a":1}\r\rdata: [DONE]\r\r') == [[b'{"a":1}', b"[DONE]"]]
    assert await _split(sse_payloads, b'data: {"a":1}\r', b"\r", b"data: [DONE]\r", b"\n\r", b"\n") == \
        [[b'{"a":1}'], [b"[DONE]"]]  # (a CR that ends a read ends its line: at once, not at the next read)
    assert await _split(sse_payloads, b'data: {"a":1}\n\ndata:\n\ndata: [DONE]\n\n') == [[b'{"a":1}', b"[DONE]"]]
    bom = b"\xef\xbb\xbf"
    assert await _split(sse_payloads, bom[:1], bom[1:2], bom[2:] + b'data: {"a":1}\n\n') == [[b'{"a":1}']]
    assert await _split(ndjson_payloads, bom[:2], bom[2:] + b'{"done":true}\n') == [[b'{"done":true}']]
    assert await _split(ndjson_payloads, b"\xef", b'{"a":1}\n') == [[b'\xef{"a":1}']]  # (no mark: kept as sent)
    assert await _split(sse_payloads, b"data: [DONE]\r") == [[b"[DONE]"]]  # (its last CR, at the end)


async def test_sse_comments_and_other_fields_carry_no_payload() -> None:
    batches = await _split(sse_payloads, b": keep-alive\n\nevent: x\nid: 1\ndata: a\ndata: b\n\nretry: 5\n\n")
    assert batches == [[b"a\nb"]]


async def test_ndjson_lines_blank_lines_and_a_last_line_without_newline() -> None:
    batches = await _split(ndjson_payloads, b'{"a":1}\n\n{"a"', b':2}\n{"done":true}')
    assert batches == [[b'{"a":1}'], [b'{"a":2}'], [b'{"done":true}']]


@pytest.mark.parametrize("payload, message", [
    (b'{"error":"model not loaded"}', "model not loaded"),
    (b'{ "error" : {"message": "out of memory", "type": "server_error"}}', "out of memory"),
    (b'{\n  "error": "spaced"\n}', "spaced"),
    (b'{"object":"error","message":"context too long","type":"BadRequestError","code":400}', "context too long"),
])
def test_engine_errors_are_recognised_however_they_are_spaced(payload: bytes, message: str) -> None:
    """Regression: ``startswith(b'{"error"')`` missed ``{ "error"``."""
    assert engine_error(payload) == message


@pytest.mark.parametrize("payload", [
    b'{"choices":[{"delta":{"content":"an error occurred"}}]}',
    b'{"message":{"content":"say \\"error\\" twice"},"done":false}',
    b'{"finish_reason":"error-free"}',
    b"[DONE]",
    b'"error"',
    b'{"choices":[{"message":{"content":"fine"}}],"error":null}',  # an answer with an empty error field
    b'{"message":{"role":"assistant","content":"fine"},"done":true,"error":""}',
])
def test_ordinary_payloads_are_not_errors(payload: bytes) -> None:
    assert engine_error(payload) is None


async def test_a_line_split_over_many_reads_comes_whole() -> None:
    line = b'{"x": "' + b"y" * 300_000 + b'"}'
    pieces = [line[start:start + 1000] for start in range(0, len(line), 1000)]
    assert await _split(ndjson_payloads, *pieces, b"\n", b'{"z":1}\n') == [[line], [b'{"z":1}']]
    event = b"data: " + line + b"\r\n\r\n"
    pieces = [event[start:start + 777] for start in range(0, len(event), 777)]
    assert await _split(sse_payloads, *pieces) == [[line]]


@pytest.mark.parametrize("splitter", [ndjson_payloads, sse_payloads])
async def test_an_engine_record_over_the_bound_ends_the_call(splitter: object) -> None:
    """Regression: one 50 MB engine line was buffered without bound (311 MB peak, 50 s, quadratic)."""
    piece = b"z" * 65536
    with pytest.raises(TooLarge):
        await _split(splitter, *[piece] * (MAX_RECORD_BYTES // len(piece) + 2))


@pytest.mark.parametrize("reported", [-1, "12", 1e30, None, "x", 1e400])
def test_an_engines_odd_usage_count_is_taken_as_a_count(reported: object) -> None:
    """Regression: prompt_eval_count -1 became a usage the hub refused, failing a finished answer."""
    usage = _usage_of({"done": True, "prompt_eval_count": reported, "eval_count": 3})
    assert usage is not None and usage["completion_tokens"] == 3 and usage["prompt_tokens"] >= 0


def test_describe_names_the_cause_a_wrapper_hides() -> None:
    """An operator must read "certificate verify failed", not a bare ConnectError."""
    outer, middle, cause = OSError(), RuntimeError(), ValueError("certificate verify failed")
    outer.__cause__, middle.__context__ = middle, cause  # wrappers that say nothing, around one that does
    assert describe(outer) == "OSError: certificate verify failed"
    assert describe(KeyError("x")) == "KeyError 'x'"
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 9)")  # trio's open_tcp_stream:
    connect = OSError("all attempts to connect to 127.0.0.1:9 failed")  # an error over a group of its
    connect.__cause__ = ExceptionGroup("all attempts to connect to 127.0.0.1:9 failed", [refused])  # attempts'
    assert describe(connect) == "OSError all attempts to connect to 127.0.0.1:9 failed: " \
                                "[Errno 111] Connect call failed ('127.0.0.1', 9)"  # (hunt: the group's text, twice)
    wrapped = ConnectFailed(str(connect))  # (the pool's, around it: what it wraps says nothing new)
    wrapped.__cause__ = connect
    assert describe(wrapped) == "ConnectFailed all attempts to connect to 127.0.0.1:9 failed: " \
                                "[Errno 111] Connect call failed ('127.0.0.1', 9)"


@pytest.mark.parametrize("event, message", [
    (b'error: {"code":400,"message":"the request exceeds the available context size","type":"invalid_request_error"}',
     "the request exceeds the available context size"),  # llama.cpp server
    (b'event: error\ndata: {"message":"out of memory"}', "out of memory"),
    (b"event: error\ndata: the engine broke", "the engine broke"),
    (b'event: error\ndata: {"error": {"message": "context too long", "type": "invalid_request_error"}}',
     "context too long"),
    (b"error: ", "engine error"),
])
async def test_an_sse_error_event_is_the_engines_error(event: bytes, message: str) -> None:
    """Regression: llama.cpp's ``error:`` field was dropped, and its ``data: [DONE]`` after it made
    the failed answer a successful empty one."""
    [[payload, done]] = await _split(sse_payloads, event + b"\n\ndata: [DONE]\n\n")
    assert engine_error(payload) == message and done == b"[DONE]"


async def test_data_that_mentions_an_error_is_data() -> None:
    event = b'event: message\ndata: {"choices":[{"delta":{"content":"error: none"}}]}\n\n'
    assert await _split(sse_payloads, event) == [[b'{"choices":[{"delta":{"content":"error: none"}}]}']]


@pytest.mark.parametrize("payload, status", [
    (b'{"error": {"code": 400, "message": "too long", "type": "exceed_context_size_error"}}', 400),  # llama.cpp
    (b'{"object": "error", "message": "too long", "type": "BadRequestError", "code": 400}', 400),  # vLLM
    (b'{"error": {"code": 429, "message": "slow down"}}', 429),
    (b'{"error": {"code": 401, "message": "bad key"}}', 502),  # the worker's key: not the client's fault
    (b'{"error": {"code": 404, "message": "no such model"}}', 502),  # a model the worker listed
    (b'{"error": {"code": "400", "message": "text"}}', 400),  # LiteLLM's code is text
    (b'{"error": {"code": "context_length_exceeded", "message": "text"}}', 502),
    (b'{"error": {"code": "40\xc2\xb2", "message": "text"}}', 502),  # (review: int() of it raised)
    (b'{"error": "Ollama says no"}', 502),
])
def test_an_engine_error_event_keeps_its_own_4xx_code(payload: bytes, status: int) -> None:
    message = engine_error(payload)
    assert message is not None
    failure = engine_failure(payload, message)
    assert failure.status == status
    # as a refusal by HTTP status: the request's own fault goes to no other worker, the rest does
    assert failure.retryable == (status in (429, 502))


@pytest.mark.parametrize("sent, number", [
    (b"", 0),  # (a stream that failed before its first event)
    (b'data: {"type": "keepalive"}\n\n', 0),
    (b'event: response.created\ndata: {"type":"response.created","sequence_number":0}\n\n', 1),
    # vLLM's spacing; the key quoted in a string
    (b'data: {"sequence_number": 7, "delta": "a"}\n\ndata: {"delta": "\\"sequence_number\\": 99"}\n\n', 8),
    (b'data: {"sequence_number":41}\n\ndata: {"type": "x", "sequence_number":  42}\n\n', 43),
])
def test_a_responses_error_event_is_numbered_after_the_last_event_passed_on(sent: bytes, number: int) -> None:
    last = last_sequence_number(sent)
    assert (0 if last is None else last + 1) == number
    event = ApiError(502, "cut").typed_event(last)
    assert json.loads(event.partition(b"data: ")[2])["sequence_number"] == number
