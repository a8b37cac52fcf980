"""The hub↔worker frames, without a socket: every frame type round-trips as a typed, immutable
object; anything malformed is refused at ``decode`` with a reason, and the protocol version is
compared before anything else."""

from __future__ import annotations

import json

import msgspec
import pytest
import trio
import trio.testing

from ghubai import link, protocol

RID = "0123456789abcdef0123456789abcdef"

FRAMES = [
    protocol.Hello(protocol.PROTOCOL, "w-1", "gpu-1", ("llama3", "qwen"), 4, "ollama", "0.1.0"),
    protocol.Welcome("hub-1", 0.5),
    protocol.Models(("llama3",)),
    protocol.Request(RID, "openai.chat", {"model": "llama3", "messages": []}, True, {"traceparent": "00-ab-cd-01"}),
    protocol.End(RID, {"prompt_tokens": 3, "completion_tokens": 5}),
    protocol.End(RID, None),
    protocol.Error(RID, 503, "full", retryable=True, busy=True),
    protocol.Error(RID, 429, "slow down", retryable=True, retry_after=30),
    protocol.Cancel(RID),
    protocol.Credit(RID, 1024),
    protocol.Load(2),
    protocol.Draining(),
    protocol.Ping(1),
    protocol.Pong(0),
]


@pytest.mark.parametrize("frame", FRAMES, ids=protocol.type_of)
def test_every_frame_round_trips_as_its_own_type(frame: protocol.Frame) -> None:
    """What one side encodes, the other decodes to an equal object of the same class."""
    text = protocol.encode(frame)
    assert json.loads(text)["type"] == protocol.type_of(frame)
    assert protocol.decode(text) == frame and type(protocol.decode(text)) is type(frame)


def test_frames_are_immutable() -> None:
    """A frame handed from the reader to a request's task cannot be changed on the way."""
    with pytest.raises(AttributeError):
        FRAMES[3].id = "x"  # type: ignore[misc]


def test_a_newer_peers_hello_is_refused_as_a_version_mismatch_whatever_it_lacks() -> None:
    """Version first: a protocol-2 hello without ``engine`` is a mismatch, not a malformed hello."""
    with pytest.raises(protocol.VersionMismatch, match="protocol 2"):
        protocol.decode(json.dumps({"type": "hello", "protocol": 2, "worker_id": "w", "name": "n"}))
    whole = json.loads(protocol.encode(FRAMES[0]))
    with pytest.raises(protocol.VersionMismatch):
        protocol.decode(json.dumps({**whole, "protocol": 2}))


@pytest.mark.parametrize("bad_id", ["abc", "F" * 32, "0" * 31, "0" * 33, "g" * 32, "0" * 64, "0" * 32 + "\n", 7])
def test_request_ids_must_be_32_lowercase_hex_digits(bad_id: object) -> None:
    """Binary chunks carry the id in exactly 32 bytes: any other id is refused at decode."""
    for frame in ({"type": "cancel", "id": bad_id}, {"type": "end", "id": bad_id, "usage": None}):
        with pytest.raises(protocol.ProtocolError, match="id"):
            protocol.decode(json.dumps(frame))


def test_a_refused_request_names_its_id_only_when_the_id_is_valid() -> None:
    """So the worker can answer a bad request frame with an ``error`` the hub will match."""
    frame = json.loads(protocol.encode(FRAMES[3]))
    with pytest.raises(protocol.ProtocolError) as bad_api:
        protocol.decode(json.dumps({**frame, "api": 5}))
    assert bad_api.value.request_id == RID
    with pytest.raises(protocol.ProtocolError) as bad_id:
        protocol.decode(json.dumps({**frame, "id": "abc", "api": 5}))
    assert bad_id.value.request_id is None


@pytest.mark.parametrize("trace", [{"x-other": "1"}, {"traceparent": "x" * 513}, {"tracestate": "é"}])
def test_a_request_may_carry_only_clean_trace_headers(trace: dict[str, str]) -> None:
    frame = json.loads(protocol.encode(FRAMES[3]))
    with pytest.raises(protocol.ProtocolError, match="trace"):
        protocol.decode(json.dumps({**frame, "trace": trace}))


def test_a_request_of_an_older_hub_without_trace_decodes() -> None:
    frame = json.loads(protocol.encode(FRAMES[3]))
    del frame["trace"]
    assert protocol.decode(json.dumps(frame)).trace == {}  # type: ignore[union-attr]


@pytest.mark.parametrize("text, reason", [
    ("not json", "not a JSON object"),
    ("[1, 2]", "not a JSON object"),
    ('{"id": "x"}', "no type"),
    ('{"type": 3}', "no type"),
    ('{"type": "chunk", "id": "x"}', "binary"),
    ('{"type": "hello", "protocol": 1, "worker_id": "w"}', "hello"),
    ('{"type": "welcome", "hub_id": "h", "heartbeat_s": 0}', "welcome"),
    ('{"type": "hello", "protocol": 1, "worker_id": "w", "name": "n", "models": [], "max_concurrency": 0,'
     ' "engine": "ollama", "version": "1"}', "max_concurrency"),
    ('{"type": "error", "id": "' + RID + '", "status": "boom", "message": 1, "retryable": true}', "error"),
    ('{"type": "models", "models": [1]}', "models"),
    ('{"type": "load", "inflight": -1}', "load"),
    ('{"type": "credit", "id": "' + RID + '", "bytes": true}', "credit"),
    ('{"type": "end", "id": "' + RID + '", "usage": {"prompt_tokens": -3}}', "end"),
])
def test_malformed_frames_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=reason):
        protocol.decode(text)


def test_unknown_types_and_fields_pass_for_a_newer_peer() -> None:
    """A newer peer may add frame types (ignored) and optional fields (ignored)."""
    assert protocol.decode('{"type": "telemetry", "gpu": 1}') == protocol.Unknown("telemetry")
    assert protocol.decode(json.dumps({"type": "load", "inflight": 1, "queue": 9})) == protocol.Load(1)


def test_chunks_pack_back_to_back_and_a_truncated_record_keeps_those_before() -> None:
    other = "f" * 32
    message = protocol.chunk(RID, b"data: 1\n\n") + protocol.chunk(other, b"") + protocol.chunk(RID, b"x" * 70_000)
    assert protocol.unpack_chunks(message) == [protocol.Chunk(RID, b"data: 1\n\n"), protocol.Chunk(other, b""),
                                               protocol.Chunk(RID, b"x" * 70_000)]
    frames, problems = protocol.unpack(message[:-1])
    assert frames == [protocol.Chunk(RID, b"data: 1\n\n"), protocol.Chunk(other, b"")]
    assert "truncated chunk data" in str(problems[0])
    frames, problems = protocol.unpack(message[:10])
    assert frames == [] and "truncated chunk header" in str(problems[0])


def test_a_bad_line_of_a_text_message_costs_that_line_only() -> None:
    text = "\n".join([protocol.encode(protocol.Load(1)), "junk", protocol.encode(protocol.Cancel(RID))])
    frames, problems = protocol.unpack(text)
    assert frames == [protocol.Load(1), protocol.Cancel(RID)] and len(problems) == 1


def test_ids_the_hub_makes_are_valid_ids() -> None:
    for _ in range(100):
        assert protocol.decode(protocol.encode(protocol.Cancel(protocol.new_request_id())))


def test_encoding_refuses_nothing_decode_would_accept() -> None:
    """Encoding is msgspec's: the bytes are compact JSON with no raw newline (one frame per line)."""
    text = protocol.encode(protocol.Request(RID, "openai.chat", {"messages": [{"content": "a\nb"}]}, False))
    assert "\n" not in text and msgspec.json.decode(text)["body"]["messages"][0]["content"] == "a\nb"


@pytest.mark.parametrize("field, raw", [("name", r'"x\udfff"'), ("name", '""'), ("name", '"' + "n" * 129 + '"'),
                                        ("name", r'"gpu\f1"'), ("name", r'"rack 1\r\nSet-Cookie: x=1"'),
                                        ("name", r'"gpu\n"'), ("name", r'"gpu\u009b31m"'),
                                        ("models", '["' + "m" * 257 + '"]'), ("models", r'["\ud800"]')])
def test_a_hello_is_refused_when_its_name_or_models_could_break_a_label_or_a_log(field: str, raw: str) -> None:
    """Regression: a hello name with a lone surrogate broke /metrics until restart; one with a
    control character made every answer its worker served a 500 (the name is a header value)."""
    hello = json.loads(protocol.encode(FRAMES[0]))
    hello[field] = "PLACEHOLDER"
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(json.dumps(hello).replace('"PLACEHOLDER"', raw))


def test_blank_lines_cost_nothing_and_garbage_is_refused_a_few_frames_at_a_time() -> None:
    """Regression (hunt): every blank line of a message was its own refused frame, each with an
    exception and a log line: 100,000 newlines froze a hub for 2.6 s and held 166 MB."""
    assert protocol.unpack("\n" * 100_000) == ([], [])
    ping = protocol.encode(protocol.Ping(3))
    frames, problems = protocol.unpack("\n\n" + ping + "\n\n" + "junk\n" * 10_000 + ping)
    assert frames == [protocol.Ping(3)]  # what came after the garbage is dropped with it
    assert len(problems) == protocol.MAX_BAD_FRAMES + 1 and "dropped" in str(problems[-1])


def test_a_message_of_more_frames_than_a_batch_holds_is_cut_short() -> None:
    """Hunt: a worker's 64 MiB message of 2.3 million load frames took the hub 1.7 s to decode, its
    every client waiting. Past ``MAX_FRAMES`` the rest is dropped, and the problem says so."""
    smallest = protocol.encode(protocol.Ping(0))
    assert protocol.MAX_FRAMES > (1 << 20) // len(smallest)  # (a writer's batches, 1 MiB once, never reach it)
    record = protocol.chunk(RID, b"x")
    for message in ("\n".join([smallest] * (protocol.MAX_FRAMES + 5)), record * (protocol.MAX_FRAMES + 5)):
        frames, problems = protocol.unpack(message)
        assert len(frames) == protocol.MAX_FRAMES and [problem.frame_type for problem in problems] == ["message"]


async def test_a_link_is_silent_from_the_last_byte_its_peer_sent(autojump_clock: trio.testing.MockClock) -> None:
    """Review: bytes of a message still arriving keep a peer alive, but the silence after them was
    counted from the next full window, up to twice three heartbeats, and reported as three."""
    last_bytes = 0.0

    async def never() -> str:
        await trio.sleep_forever()
        return ""

    async def trickle() -> None:
        nonlocal last_bytes
        for _ in range(17):  # bytes every 0.05 s until 0.85 s, then none
            await trio.sleep(0.05)
            last_bytes = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        silent_s = await link.read_frames(never, 0.3, lambda frame: None, lambda problem: None, lambda: last_bytes)
    assert trio.current_time() == pytest.approx(0.85 + 0.9) and silent_s == pytest.approx(0.9)
