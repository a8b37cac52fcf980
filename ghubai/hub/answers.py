"""How an exchange's frames reach its client, as plain ASGI messages: a stream paced by the client
(SSE on ``/v1``, NDJSON on ``/api``), or one whole body. The worker rendered the bytes; the hub adds
only the stream's end, and writes each batch of frames that had already arrived in one message."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ghubai import dialects, protocol
from ghubai.errors import ApiError, last_sequence_number
from ghubai.hub.exchange import Exchange, client_error
from ghubai.hub.pool import Answer

log = logging.getLogger("ghubai.hub")

SendBody = Callable[[bytes, bool], Awaitable[None]]  # (bytes, more to come)


@dataclass(frozen=True)
class Dialect:
    """How a stream ends and fails for the client: SSE with [DONE] on /v1, NDJSON on /api."""
    headers: list[tuple[bytes, bytes]]
    done: bytes
    sse: bool
    boundary: bytes  # where one event ends
    typed: bool = False  # the Responses API's: its error event is typed too

    def failure(self, error: ApiError, after: int | None) -> bytes:
        """The event that ends a stream that failed after its first byte (and a typed one's event
        numbered ``after``)."""
        return error.typed_event(after) if self.typed else error.stream_end(self.sse)

    def numbered(self, data: bytes, after: int | None) -> int | None:
        """The number of a typed stream's last event once ``data`` is passed on too (``after``: before)."""
        if not self.typed:
            return None
        number = last_sequence_number(data)
        return after if number is None else number


def _headers(fields: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode(), value.encode()) for name, value in fields.items()]


OPENAI = Dialect(_headers(dialects.SSE_HEADERS), dialects.SSE_DONE, sse=True, boundary=b"\n\n")
# the Responses API's: its last event (response.completed) ends it, with no [DONE]
RESPONSES = Dialect(OPENAI.headers, b"", sse=True, boundary=b"\n\n", typed=True)
OLLAMA = Dialect(_headers(dialects.NDJSON_HEADERS), b"", sse=False, boundary=b"\n")
JSON_HEADERS = [(b"content-type", b"application/json")]


def dialect_of(api: str) -> Dialect:
    return RESPONSES if api == "openai.responses" else OPENAI if api.startswith("openai.") else OLLAMA


def _render(frames: list[Answer], dialect: Dialect, failed: Callable[[ApiError], None], held: bytearray,
            after: int | None) -> bytes:
    """The frames as the client's bytes: whole events only (a worker cuts a huge event into
    records, and the answer may fail between two), the start of the next held back in ``held``,
    and dropped when an error ends the stream: its error event then follows whole events (and is
    numbered after them, or after the event numbered ``after`` that went before)."""
    out = []
    for frame in frames:
        if isinstance(frame, protocol.Chunk):
            out.append(dialects.whole_events(held, frame.data, dialect.boundary))
            if len(held) > protocol.MAX_EVENT_BYTES:  # no event is that large: the answer is broken
                raise ApiError(502, f"The worker sent an event larger than {protocol.MAX_EVENT_BYTES} bytes")
        elif isinstance(frame, protocol.End):
            out += [bytes(held), dialect.done]  # (a worker's answer ends whole: nothing is held)
            held.clear()
        else:
            held.clear()
            error = client_error(frame)
            failed(error)
            out.append(dialect.failure(error, dialect.numbered(b"".join(out), after)))
    return b"".join(out)


def _size(frames: list[Answer]) -> int:
    return sum(len(frame.data) for frame in frames if isinstance(frame, protocol.Chunk))


async def stream(send: SendBody, exchange: Exchange, first: Answer, dialect: Dialect,
                 failed: Callable[[ApiError], None]) -> None:
    """The stream, paced by the client: hypercorn returns from a send once the socket took the
    bytes, and only then does the worker get credit to send more. ``failed`` hears of
    an error that ends the stream after its first byte; the last message carries the stream's end."""
    held = bytearray()  # the start of an event whose end has not arrived
    after: int | None = None  # the number of the last typed event passed on (the Responses API's)
    try:
        frames = [first, *exchange.arrived()]  # a short answer often has its end here too: one write
        await send(out := _render(frames, dialect, failed, held, after), not exchange.done)
        after = dialect.numbered(out, after)
        exchange.passed_on(_size(frames))  # (held bytes too: the worker needs credit to send the rest)
        async for batch in exchange.batches():
            await send(out := _render(batch, dialect, failed, held, after), not exchange.done)
            after = dialect.numbered(out, after)
            exchange.passed_on(_size(batch))
    except ApiError as error:  # a timeout after the first byte: one final error event
        failed(error)
        await send(dialect.failure(error, after), False)
    except Exception:  # the client must hear that the stream ended, never see it just stop
        log.exception("the hub failed in the middle of a stream")
        failed(internal := ApiError(500, "internal error in the hub"))
        await send(dialect.failure(internal, after), False)
    finally:
        exchange.close()


async def whole(exchange: Exchange, first: Answer) -> bytes:
    """The whole answer; an error at any point is the answer instead. The worker gets credit as the
    pieces arrive (the hub holds them), up to ``limits.max_answer_bytes``: past that, a 502 and a cancel."""
    limit = exchange.config.limits.max_answer_bytes
    frames, size = [first], _size([first])
    exchange.passed_on(size)
    if not exchange.done:
        async for batch in exchange.batches():
            frames.extend(batch)
            size += _size(batch)
            if size > limit:
                exchange.close()
                raise ApiError(502, f"The answer is larger than {limit} bytes", extra_headers=dialects.FINAL)
            exchange.passed_on(_size(batch))
    for frame in frames:
        if isinstance(frame, protocol.Error):
            raise client_error(frame)
    return b"".join(frame.data for frame in frames if isinstance(frame, protocol.Chunk))
