"""The chunked-body decoder the h11 client reads answers with: the same payload as h11 whatever
the network's split points, and the same refusals of broken framing."""

from __future__ import annotations

import random

import h11
import pytest

from ghubai.http11.chunked import MAX_LINE, MAX_TRAILERS, ChunkedDecoder

HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


def by_h11(body: bytes) -> bytes:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x"), ("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(HEAD + body)
    assert isinstance(conn.next_event(), h11.Response)
    out = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        out += event.data
    return out


def decode(body: bytes, cuts: list[int]) -> tuple[bytes, ChunkedDecoder]:
    decoder, out, start = ChunkedDecoder(), b"", 0
    for cut in [*cuts, len(body)]:
        out += decoder.feed(body[start:cut])
        start = cut
    return out, decoder


def test_any_split_of_a_stream_gives_h11_s_payload() -> None:
    rng = random.Random(7)
    records = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(40)]
    body = b"".join(b"%x\r\n%s\r\n" % (len(r), r) for r in records) + b"0\r\n\r\n"
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(body)), rng.randrange(0, 30)))
        out, decoder = decode(body, cuts)
        assert out == by_h11(body) == b"".join(records) and decoder.done and decoder.leftover == b""


@pytest.mark.parametrize("body", [
    b"5;name=value\r\nhello\r\n0\r\n\r\n",  # an extension
    b"5 \r\nhello\r\n0\r\nx-usage: 3\r\nx-more: 4\r\n\r\n",  # space before CRLF, and trailers
    b"00005\r\nhello\r\n000\r\n\r\n",  # leading zeros
    b"A\r\n0123456789\r\n0\r\n\r\n",
])
def test_extensions_trailers_and_zeros_are_read_as_h11_reads_them(body: bytes) -> None:
    for cut in range(len(body) + 1):
        out, decoder = decode(body, [cut])
        assert out == by_h11(body) and decoder.done


def test_what_follows_the_end_is_left_over_not_decoded() -> None:
    out, decoder = decode(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200", [5])
    assert out == b"ok" and decoder.done and decoder.leftover == b"HTTP/1.1 200"
    assert decoder.feed(b" OK") == b"" and decoder.leftover == b"HTTP/1.1 200 OK"


def test_an_unfinished_body_is_not_done() -> None:
    for body in (b"5\r\nhel", b"5\r\nhello\r\n", b"5\r\nhello\r\n0\r\n", b"5\r\nhello\r\n0\r\nx: 1\r\n"):
        out, decoder = decode(body, [])
        assert not decoder.done and out == body[3:8]


@pytest.mark.parametrize("body", [
    b"x\r\n", b"-5\r\n", b"\r\n", b" 5\r\n", b"0x5\r\n", b"1" * 21 + b"\r\n",  # sizes h11 refuses too
    b"2\r\nokXX", b"2\r\nok\n0\r\n\r\n",  # a chunk not ended by CRLF
])
def test_broken_framing_is_refused_like_h11_refuses_it(body: bytes) -> None:
    with pytest.raises(h11.RemoteProtocolError):
        by_h11(body)
    with pytest.raises(h11.RemoteProtocolError):
        decode(body, [])


def test_endless_lines_and_trailers_are_refused_not_buffered() -> None:
    with pytest.raises(h11.RemoteProtocolError):
        decode(b"5" + b";x" * MAX_LINE, [])
    with pytest.raises(h11.RemoteProtocolError):
        decode(b"0\r\n" + b"x: 1\r\n" * (MAX_TRAILERS // 6 + 1), [])
