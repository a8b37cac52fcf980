"""Decoding a chunked response body (RFC 9112 §7.1) from raw bytes, for the hot path.

h11 reads a response's head; its body, when chunked, is decoded here instead. h11 turns every chunk
into an event that passes its state machine: 6-7 µs a chunk, a third of the worker's cost per token
with an engine that sends a chunk per token. This decoder takes what one network read brought in a
few slices: 1.3 µs a chunk (a 256-chunk NDJSON answer, read 4 KiB at a time). It accepts and refuses
what h11 does, with h11's grammar (made linear in ``ghubai.http11.grammar``): a chunk-size line of
1 to 20 hex digits, extensions after ``;`` (ignored), optional whitespace; chunks ended by CRLF,
checked byte by byte; trailer lines checked as header lines and their fields as h11 checks an
``EndOfMessage``'s; the section ended by a blank line (LF or CRLF). Two bounds are its own: a
chunk-size line over 4 KiB and a trailer section over 16 KiB are refused even when they arrive whole
(h11 bounds what is still incomplete).
"""

from __future__ import annotations

import re

import h11

from ghubai.http11.grammar import CHUNK_SIZE_LINE, HEADER_FIELD

MAX_LINE = 4096  # a chunk-size line, with its extensions
MAX_TRAILERS = 16384
_BLANK_LINE = re.compile(rb"\n\r?\n")  # the trailer section ends as h11 ends a head: LF or CRLF lines


class ChunkedDecoder:
    """Feed it the bytes as they arrive; it returns the payload they complete. Invariant: ``done``
    once the last chunk and the trailers have been read; what came after them is in ``leftover``."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.remaining = 0  # bytes still to come of the chunk being read
        self.crlf = False  # a chunk's data has been read: its CRLF comes next
        self.trailers = False  # the last chunk has been read: its trailer section comes next
        self.done = False

    @property
    def leftover(self) -> bytes:
        return bytes(self.buffer) if self.done else b""

    def feed(self, data: bytes | bytearray) -> bytes:
        """The payload that ``data`` (with what was fed before) completes; h11.RemoteProtocolError
        when the framing is wrong."""
        buf = self.buffer
        buf += data
        if self.done:
            return b""
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while pos < end:
            if self.remaining:
                take = min(self.remaining, end - pos)
                out.append(bytes(buf[pos:pos + take]))
                pos += take
                self.remaining -= take
                if self.remaining:
                    break
                self.crlf = True
            if self.crlf:
                if not b"\r\n".startswith(buf[pos:pos + 2]):  # byte by byte, as h11: a wrong one fails at once
                    raise h11.RemoteProtocolError("a chunk did not end in CRLF")
                if end - pos < 2:
                    break
                pos += 2
                self.crlf = False
                continue
            if self.trailers:
                pos = self._trailer_section(buf, pos)
                break
            stop = buf.find(b"\r\n", pos, pos + MAX_LINE)
            if stop < 0:
                if end - pos >= MAX_LINE:
                    raise h11.RemoteProtocolError("chunk-size line too long")
                break
            header = CHUNK_SIZE_LINE.fullmatch(buf, pos, stop)
            if header is None:
                raise h11.RemoteProtocolError("malformed chunk-size line")
            pos = stop + 2
            self.remaining = int(header[1], 16)
            self.trailers = not self.remaining
        del buf[:pos]
        return b"".join(out)

    def _trailer_section(self, buf: bytearray, pos: int) -> int:
        """Where the trailer section that starts at ``pos`` ends (``pos`` while it has not all
        arrived), each of its lines checked as h11 checks a header line."""
        if buf.startswith(b"\n", pos) or buf.startswith(b"\r\n", pos):
            end = pos + (1 if buf[pos] == 0x0A else 2)
        elif blank := _BLANK_LINE.search(buf, pos, pos + MAX_TRAILERS):
            end = blank.end()
        elif len(buf) - pos >= MAX_TRAILERS:
            raise h11.RemoteProtocolError("trailers too large")
        else:
            return pos
        lines: list[bytes] = []
        for line in bytes(buf[pos:end]).split(b"\n")[:-2] if end - pos > 2 else []:
            line = line.removesuffix(b"\r")
            if line[:1] in (b" ", b"\t") and lines:  # an obsolete folded line continues the one before
                lines[-1] += b" " + line.strip(b" \t")
            else:
                lines.append(line)
        fields = [HEADER_FIELD.fullmatch(line) for line in lines]
        if not all(fields):
            raise h11.RemoteProtocolError("malformed trailer line")
        try:  # the fields themselves as h11 checks them (a Content-Length or Transfer-Encoding there)
            h11.EndOfMessage(headers=[(field["field_name"], field["field_value"]) for field in fields if field])
        except h11.LocalProtocolError:
            raise h11.RemoteProtocolError("malformed trailer field") from None
        self.done = True
        return end
