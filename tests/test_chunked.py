"""The chunked-body decoder the h11 client reads answers with: h11's verdict on every framing (the
same payload, end or refusal) wherever the network splits it."""

from __future__ import annotations

import random

import h11
import pytest

from ghubai.http11.chunked import MAX_LINE, MAX_TRAILERS, ChunkedDecoder

HEAD = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"


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
        assert (out, decoder.done) == h11_verdict(body) == (b"".join(records), True) and decoder.leftover == b""


def h11_verdict(body: bytes) -> tuple[bytes, bool] | str:
    """What h11 makes of ``body``: the payload and whether it ended, or "refused"."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x"), ("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(HEAD + body)
    assert isinstance(conn.next_event(), h11.Response)
    out = b""
    try:
        while (event := conn.next_event()) is not h11.NEED_DATA:
            if isinstance(event, h11.EndOfMessage):
                return out, True
            out += event.data
    except h11.RemoteProtocolError:
        return "refused"
    return out, False


@pytest.mark.parametrize("body", [
    b"5;name=value\r\nhello\r\n0\r\n\r\n",  # an extension
    b"5 \r\nhello\r\n0\r\nx-usage: 3\r\nx-more: 4\r\n\r\n",  # space before CRLF, and trailers
    b"00005\r\nhello\r\n000\r\n\r\n",  # leading zeros
    b"A\r\n0123456789\r\n0\r\n\r\n",
    b"5\r\nhello\r\n0\r\n\n", b"5\r\nhello\r\n0\r\nx: 1\n\n",  # LF line ends in the trailers
    b"5\r\nhello\r\n0\r\nx: 1\r\n folded\r\n\r\n",  # an obsolete folded trailer line
    b"5\r\nhel", b"5\r\nhello\r\n", b"5\r\nhello\r\n0\r\n", b"5\r\nhello\r\n0\r\nx: 1\r\n",  # not ended yet
    b"x\r\n", b"-5\r\n", b"\r\n", b" 5\r\n", b"0x5\r\n", b"1" * 21 + b"\r\n",  # sizes h11 refuses
    b"5 ;x=1\r\nhello\r\n0\r\n\r\n", b"5;a\nb\r\nhello\r\n0\r\n\r\n",  # and size lines
    b"2\r\nokXX", b"2\r\nok\n0\r\n\r\n", b"2\r\nokX", b"2\r\nok\n", b"2\r\nok\r",  # a chunk's CRLF, byte by byte
    b"2\r\nok\r\n0\r\nContent-Length: x\r\n\r\n", b"2\r\nok\r\n0\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"2\r\nok\r\n0\r\nContent-Length: 5\r\n\r\n",  # trailer fields as h11 checks them
    b"5\r\nhello\r\n0\r\nthis is not a header\r\n\r\n", b"5\r\nhello\r\n0\r\nHTTP/1.1 200 OK\r\n\r\n",
    b"5\r\nhello\r\n0\r\nX\x00: y\r\n\r\n", b"5\r\nhello\r\n0\r\n folded\r\n\r\n",  # trailers h11 refuses
])
def test_every_framing_gets_h11_s_verdict_wherever_the_network_splits_it(body: bytes) -> None:
    expected = h11_verdict(body)
    for cut in range(len(body) + 1):
        try:
            out, decoder = decode(body, [cut])
            verdict: tuple[bytes, bool] | str = (out, decoder.done)
        except h11.RemoteProtocolError:
            verdict = "refused"
        assert verdict == expected, cut


def test_what_follows_the_end_is_left_over_not_decoded() -> None:
    out, decoder = decode(b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200", [5])
    assert out == b"ok" and decoder.done and decoder.leftover == b"HTTP/1.1 200"
    assert decoder.feed(b" OK") == b"" and decoder.leftover == b"HTTP/1.1 200 OK"


def test_endless_lines_and_trailers_are_refused_not_buffered() -> None:
    with pytest.raises(h11.RemoteProtocolError):
        decode(b"5" + b";x" * MAX_LINE, [])
    with pytest.raises(h11.RemoteProtocolError):
        decode(b"0\r\n" + b"x: 1\r\n" * (MAX_TRAILERS // 6 + 1), [])
