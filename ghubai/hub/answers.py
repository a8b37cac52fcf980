"""How an exchange's frames reach its client: a stream paced by the client (SSE on ``/v1``, NDJSON on
``/api``), or one whole body. The worker rendered the bytes; the hub adds only the stream's end."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ghubai import dialects, protocol
from ghubai.errors import ApiError
from ghubai.hub.exchange import Exchange, client_error
from ghubai.hub.pool import Answer

log = logging.getLogger("ghubai.hub")


@dataclass(frozen=True)
class Dialect:
    """How a stream ends and fails for the client: SSE with [DONE] on /v1, NDJSON on /api."""
    headers: dict[str, str]
    done: bytes
    sse: bool


OPENAI = Dialect(dialects.SSE_HEADERS, dialects.SSE_DONE, sse=True)
OLLAMA = Dialect(dialects.NDJSON_HEADERS, b"", sse=False)


def dialect_of(api: str) -> Dialect:
    return OPENAI if api.startswith("openai.") else OLLAMA


def _render(frames: list[Answer], dialect: Dialect, failed: Callable[[int], None]) -> bytes:
    out = []
    for frame in frames:
        if isinstance(frame, protocol.Chunk):
            out.append(frame.data)
        elif isinstance(frame, protocol.End):
            out.append(dialect.done)
        else:
            error = client_error(frame)
            failed(error.status)
            out.append(error.stream_end(dialect.sse))
    return b"".join(out)


def _size(frames: list[Answer]) -> int:
    return sum(len(frame.data) for frame in frames if isinstance(frame, protocol.Chunk))


async def stream(exchange: Exchange, first: Answer, dialect: Dialect,
                 failed: Callable[[int], None]) -> AsyncIterator[bytes]:
    """The stream, paced by the client: hypercorn returns from a yield once the socket took the
    bytes, and only then does the worker get credit to send more. ``failed`` hears the status of
    an error that ends the stream after its first byte."""
    try:
        yield _render([first], dialect, failed)
        exchange.passed_on(_size([first]))
        async for batch in exchange.batches():
            yield _render(batch, dialect, failed)
            exchange.passed_on(_size(batch))
    except ApiError as error:  # a timeout after the first byte: one final error event
        failed(error.status)
        yield error.stream_end(dialect.sse)
    except Exception:  # hypercorn would only cut the stream, silently: the client must hear it ended
        log.exception("the hub failed in the middle of a stream")
        failed(500)
        yield ApiError(500, "internal error in the hub").stream_end(dialect.sse)
    finally:
        exchange.close()


async def whole(exchange: Exchange, first: Answer) -> bytes:
    """The whole answer; an error at any point is the answer instead."""
    frames = [first]
    if not exchange.done:
        async for batch in exchange.batches():
            frames.extend(batch)
    for frame in frames:
        if isinstance(frame, protocol.Error):
            raise client_error(frame)
    return b"".join(frame.data for frame in frames if isinstance(frame, protocol.Chunk))
