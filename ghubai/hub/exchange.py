"""One client request through the grid: which worker, retries before the first byte, then frames.

Before the first chunk nothing has reached the client, so a retryable failure (engine 5xx or busy,
model missing, a worker that died) is tried again on another worker, up to ``max_attempts``. After
it, a failure is one final error for the client. Every wait is bounded by the hub's timeouts:
``first_token_s`` for the first frame, ``idle_s`` between frames, ``total_s`` for the whole request.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import trio

from ghubai import dialects, link, protocol
from ghubai.config import HubConfig
from ghubai.errors import MAX_RETRY_AFTER_S, ApiError
from ghubai.hub.pool import Answer, Pool, RemoteWorker

log = logging.getLogger("ghubai.hub")

DRAIN_FLUSH_S = 2.0
CREDIT_BYTES = protocol.WINDOW_BYTES // 4
TEMPLATE_TOKENS = 65536


def client_error(frame: protocol.Error) -> ApiError:
    """A worker's ``error`` frame as the client should see it."""
    status, message = frame.status, frame.message
    if status == 404 and "model" in message.lower():  # (as the worker tells them apart: a stored response's is not)
        return ApiError(404, message, param="model", code="model_not_found")
    if status == 501:  # the worker's engine lacks the API's path
        return ApiError(501, message, code="api_not_served")
    if 400 <= status < 500 or status in (503, 504):
        # a worker's wait, bounded as an engine's is (a hostile worker's of 400 digits overflowed as a float)
        wait = None if frame.retry_after is None else min(frame.retry_after, MAX_RETRY_AFTER_S)
        return ApiError(status, message, retry_after=wait)
    # (a link the hub lost, a worker that broke the protocol: "Engine error" sent operators to a sound engine)
    return ApiError(502, message if frame.by_hub else f"Engine error: {message}")


_GENERATING = frozenset({"openai.chat", "openai.completions", "openai.responses", "ollama.chat", "ollama.generate"})
_COUNTED = _GENERATING | {"openai.embeddings", "ollama.embed", "ollama.embeddings"}  # the APIs that spend tokens


class State(enum.Enum):
    """Where an exchange is; see ``Exchange``."""
    QUEUED = "queued"  # no worker yet: waiting for a slot, or between two attempts
    WAITING = "waiting"  # sent to ``worker``; nothing of the answer has arrived
    STREAMING = "streaming"  # the first chunk arrived: the answer now belongs to the client
    DONE = "done"  # ended (end, error, timeout or the client left); the slot is given back


def _text_bytes(body: dict[str, Any]) -> int:
    """The bytes of text in a request body, leaving out images (base64, or data: URLs), which
    would count a photo as a hundred thousand tokens. Without recursion: a body may nest deeply."""
    size, todo = 0, [body]
    while todo:
        value = todo.pop()
        if isinstance(value, str):
            if not value.startswith("data:"):  # (CJK: 3 bytes a character; no copy of an ASCII text)
                size += len(value) if value.isascii() else len(value.encode(errors="replace"))
        elif isinstance(value, dict):
            todo.extend(item for key, item in value.items() if key not in ("images", "image_url"))
        elif isinstance(value, list):
            todo.extend(value)
    return size


class Exchange:
    """One request's way through the grid: QUEUED → WAITING (→ QUEUED again on a retry) → STREAMING
    → DONE. Invariant: ``worker`` is set exactly in WAITING and STREAMING, while the request holds a
    slot on it. Who gives the slot back: whoever takes the request out of ``worker.pending`` — the
    pool, the moment the worker's ``end`` or ``error`` arrives (however slowly the client reads), or
    ``close()`` when the client leaves or a wait times out, which also tells the worker to stop."""

    def __init__(self, pool: Pool, config: HubConfig, api: str, body: dict[str, Any], stream: bool,
                 trace: dict[str, str], body_bytes: int = 0, conversation: tuple[int, int | None] | None = None,
                 elsewhere: bool = False, only: RemoteWorker | None = None) -> None:
        self.pool = pool
        self.only = only  # the one worker it may go to (an unload's: to each engine that holds the model)
        self.elsewhere = elsewhere  # another hub could take it (``dialects.ELSEWHERE_HEADER``)
        # the affinity key (``ghubai.affinity.keys_of``), if the request has one, and its opening's
        self.conversation: int | None = conversation[0] if conversation else None
        self.opening: int | None = conversation[1] if conversation else None
        self.body_bytes = body_bytes  # the request's size, a bound on the prompt tokens a worker may claim
        self.received = 0  # bytes of answer from the worker, a bound on the completion tokens it may claim
        self.lines = 0  # line ends in the answer: a stream's events (two per SSE event, one per NDJSON line)
        self.ended = False  # its end arrived, or an error before any answer (else it was cut, or never sent)
        self.trace = trace  # headers for logs and traces, passed on to the worker and its engine
        self.config = config
        self.api = api
        self.body = body
        self.stream = stream
        self.model = str(body["model"])
        self.deadline = trio.current_time() + config.timeouts.total_s
        self.worker: RemoteWorker | None = None
        self.served_by: RemoteWorker | None = None  # the worker it was sent to last (kept after it ended)
        self.request_id = ""
        self.usage: dict[str, int] | None = None
        self.state = State.QUEUED
        self._uncredited = 0  # bytes the client took that the worker has not been told of yet
        self._frames: trio.MemoryReceiveChannel[Answer] | None = None

    @property
    def done(self) -> bool:
        return self.state is State.DONE

    async def open(self) -> Answer:
        """The answer's first frame (a chunk, or the end of an empty answer)."""
        tried: set[str] = set()
        last_error: ApiError | None = None
        soonest: int | None = None  # the shortest Retry-After an engine gave (the client's, with a 429 or 503)
        queue_left = self.config.limits.queue_timeout_s  # time waiting for a slot, over every attempt
        again, attempts, pardoned = False, 0, set()  # pardoned: workers whose link broke (once each)
        while attempts < self.config.limits.max_attempts:
            asked = trio.current_time()
            try:
                worker = await self.pool.acquire(self.model, self.api, tried, min(self.deadline, asked + queue_left),
                                                 self.conversation, again, self.elsewhere, self.opening, self.only)
            except ApiError as error:  # on a retry with no other worker left, the real cause wins
                self.state = State.DONE
                raise (last_error or error) from None
            granted, again = trio.current_time(), True
            try:
                self._start(worker)
            except BaseException:  # (whatever it was, the slot is given back)
                self._served(worker, False)
                self.pool.release(worker, sent=False)
                self.state = State.DONE
                raise
            try:
                frame = await self._next(self.config.timeouts.first_token_s, "the first token", "first_token_s")
            except BaseException:  # timed out, or the client left: whatever the hub supposed of it
                self._served(worker, False)
                raise
            if not isinstance(frame, protocol.Error):
                self._served(worker, True)
                return frame
            self._served(worker, False)
            self.state = State.QUEUED
            # full because of other hubs (the pool noted it): a wait, not an attempt (an unload waits for none)
            if frame.busy and self.only is None:
                queue_left -= trio.current_time() - asked
                if queue_left > 0:
                    continue
                self.state = State.DONE
                raise self.pool.no_slot(self.model)
            queue_left -= granted - asked  # (not the time the failed worker took)
            refusal = client_error(frame)
            if not frame.retryable:
                self.state = State.DONE
                raise refusal
            if frame.untranslatable:  # none of its kind can (draining ones neither): three Ollama workers'
                hosting = [other for other in self.pool.workers.values() if self.model in other.models]
                tried.update(other.id for other in hosting if other.engine == worker.engine)  # 400s beside a vLLM one
                tried.add(worker.id)  # (each pass leaves out one worker more at least: it ends)
                last_error = last_error or refusal  # (a busy engine of the other kind's 503 says more)
                if all(other.engine == worker.engine for other in hosting):  # (no other kind to wait for)
                    self.state = State.DONE
                    raise last_error
                continue
            if refusal.retry_after is not None:
                soonest = refusal.retry_after if soonest is None else min(soonest, refusal.retry_after)
            if soonest is not None and refusal.status in (429, 503):
                refusal.retry_after = soonest
            last_error = refusal
            attempts += 1
            if worker.gone and worker.id not in pardoned:  # a link that broke may say nothing of the
                pardoned.add(worker.id)  # worker: it may take the request when back, once (not a
            else:  # request that breaks it each time)
                tried.add(worker.id)
            if attempts < self.config.limits.max_attempts:
                log.info("request %s failed on worker %s before its first byte (%s); trying again",
                         self.request_id[:8], worker.name, frame.message)
        self.state = State.DONE
        assert last_error is not None
        raise last_error

    def _start(self, worker: RemoteWorker) -> None:
        """Send the request to ``worker``, whose slot it holds; a 413 when its frame would be larger
        than the link carries (the hub re-encodes a body: ``1e15`` is ``1000000000000000.0`` then)."""
        request_id = protocol.new_request_id()
        try:
            frame = protocol.encode(protocol.Request(request_id, self.api, self.body, self.stream, self.trace))
        except RecursionError:  # msgspec's depth is what the stack leaves: a body read higher up fails here
            raise ApiError(400, "Request body is nested too deeply") from None
        if len(frame) > protocol.MAX_FRAME_BYTES // 4 and len(frame.encode()) > protocol.MAX_FRAME_BYTES:
            raise ApiError(413, f"The request is larger than a worker takes ({protocol.MAX_FRAME_BYTES} bytes "
                           "as the hub sends it)")
        self.worker, self.served_by, self.state = worker, worker, State.WAITING
        self.request_id, self.ended = request_id, False
        send, self._frames = trio.open_memory_channel[Answer](math.inf)
        worker.pending[self.request_id] = send
        worker.send(link.request_text(request_id, frame))  # (dropped unsent if the request ends first)

    def _served(self, worker: RemoteWorker, served: bool) -> None:
        """What the answer, or its failure, tells the pool of the model in the worker's engine:
        nothing for an unload (an engine busy with the model holds it until its answers end: the
        worker's reports say when it is gone)."""
        if self.only is None:
            (self.pool.served if served else self.pool.not_served)(worker, self.model, self.api)

    async def _next(self, timeout_s: float, what: str, key: str) -> Answer:
        """The next frame within ``timeout_s`` (the limit ``key`` names) and the request's ``total_s``;
        a 504 that names the limit that ran out (tokens that flowed for longer than total_s are no stall)."""
        assert self._frames is not None
        waited = trio.current_time()
        with trio.move_on_at(min(waited + timeout_s, self.deadline)):
            return self._note(await self._frames.receive())
        self.close()
        if self.deadline < waited + timeout_s:
            raise ApiError(504, f"The request took longer than timeouts.total_s ({self.config.timeouts.total_s:g} s)",
                           extra_headers=dialects.FINAL)
        raise ApiError(504, f"Timed out waiting for {what} from the worker ({timeout_s:g} s, timeouts.{key})")

    def _note(self, frame: Answer) -> Answer:
        if isinstance(frame, protocol.Chunk):
            self.state = State.STREAMING
            self.received += len(frame.data)
            if self.stream:  # (a whole answer's budget is by its bytes: no scan of 50 MB of vectors)
                self.lines += frame.data.count(b"\n")
            return frame
        # the pool gave the slot back when this end or error arrived
        self.ended = isinstance(frame, protocol.End) or not self.received  # (an error mid-answer: cut)
        if isinstance(frame, protocol.End) and frame.usage and self.worker is not None:
            self.usage = self._plausible(frame.usage)
            self.pool.count_usage(self.worker, self.model, self.usage)
        self.state, self.worker = State.DONE, None
        return frame

    def _plausible(self, usage: dict[str, int]) -> dict[str, int]:
        """A worker's count of tokens, clamped to what this request could have carried: no more
        completion tokens than bytes of answer, no more prompt tokens than bytes of request plus
        ``TEMPLATE_TOKENS`` (a model's own template and system prompt). Budgets and metrics trust this."""
        bounds = {"prompt_tokens": self.body_bytes + TEMPLATE_TOKENS, "completion_tokens": self.received}
        return {kind: min(count, bounds[kind]) for kind, count in usage.items() if kind in bounds}

    def spent(self) -> dict[str, int] | None:
        """The tokens this request costs its key: the worker's count. Without one, for a request
        the engine worked on — cut once a worker had it (the client left, a timeout, an engine error
        mid-answer), or answered by an engine that reports no counts — an estimate: a prompt token
        per 4 bytes of the request's text (not of its images) and, for a generation, a completion
        token per streamed event (a token or so each) or per 4 bytes of a whole answer received.
        An error before the answer's first byte, and calls that generate nothing (``/api/show``), are free."""
        if self.usage is not None or not self.request_id or self.api not in _COUNTED:
            return self.usage
        if self.ended and not self.received:
            return None
        events = self.lines // 2 if self.api.startswith("openai.") else self.lines
        completion = events if self.stream else self.received // 4
        return {"prompt_tokens": _text_bytes(self.body) // 4,
                "completion_tokens": completion if self.api in _GENERATING else 0}

    async def batches(self) -> AsyncIterator[list[Answer]]:
        """The frames after the first, each batch holding every frame that had already arrived,
        so a stream that falls behind catches up in few large writes instead of many small ones."""
        while not self.done:
            yield [await self._next(self.config.timeouts.idle_s, "the next token", "idle_s"), *self.arrived()]

    def arrived(self) -> list[Answer]:
        """The frames that have already arrived, without waiting."""
        assert self._frames is not None
        frames = []
        while not self.done:
            try:
                frames.append(self._note(self._frames.receive_nowait()))
            except trio.WouldBlock:
                break
        return frames

    def passed_on(self, size: int) -> None:
        """``size`` bytes of the answer reached the client: the worker may send that much more. Credit
        goes back in ``CREDIT_BYTES`` units, so a short answer costs no credit frame at all."""
        self._uncredited += size
        if self.worker is not None and self._uncredited >= CREDIT_BYTES:
            self.worker.credit(self.request_id, self._uncredited)
            self._uncredited = 0

    def abort(self, message: str) -> None:
        """End the request now with an error its client will see (the hub is shutting down)."""
        worker = self.worker
        if worker is not None and not self.done and self.request_id in worker.pending:
            worker.send(protocol.Cancel(self.request_id))
            self.pool.fail(worker, self.request_id, 503, message, retryable=False)

    def close(self) -> None:
        """Idempotent and synchronous, so it can run on any way out: if the worker is still
        producing, tell it to stop and give the slot back. An end that has already arrived is read
        first: its usage is the engine's count, which the client that left after it is charged (and
        the metrics count), not an estimate."""
        if self._frames is not None and not self.done:
            with contextlib.suppress(trio.EndOfChannel, trio.ClosedResourceError):
                self.arrived()
        worker, self.worker, self.state = self.worker, None, State.DONE
        if worker is not None and worker.forget(self.request_id):
            worker.send(protocol.Cancel(self.request_id))
            self.pool.release(worker)


class InFlight:
    """The hub's requests in flight, so that a drain can wait for them, then end the rest.
    Invariant: ``idle`` is set exactly when ``exchanges`` is empty."""

    def __init__(self) -> None:
        self.exchanges: set[Exchange] = set()
        self.idle = trio.Event()
        self.idle.set()

    def add(self, exchange: Exchange) -> None:
        self.exchanges.add(exchange)
        self.idle = trio.Event() if self.idle.is_set() else self.idle

    def discard(self, exchange: Exchange) -> None:
        self.exchanges.discard(exchange)
        if not self.exchanges:
            self.idle.set()

    async def drain(self, pool: Pool, timeout_s: float) -> None:
        """No new request; those running get ``timeout_s`` to finish; the rest end with an error."""
        pool.drain()
        log.info("draining: %d request(s) in flight, waiting up to %g s", len(self.exchanges), timeout_s)
        with trio.move_on_after(timeout_s):
            await self.idle.wait()
        if self.exchanges:
            log.warning("drain timeout: ending %d request(s) with an error", len(self.exchanges))
            for exchange in list(self.exchanges):
                exchange.abort("The hub is shutting down")
            with trio.move_on_after(DRAIN_FLUSH_S):  # time for those final events to reach clients
                await self.idle.wait()
