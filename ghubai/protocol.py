"""Frames between hub and worker: the whole contract of the link, and the only place that knows it.

A worker dials the hub's ``/gridhub`` WebSocket (``Authorization: Bearer <provider token>`` when the
hub has ``provider_tokens``) and each side then sends frames:

- **Text messages** carry one or more JSON frames, one per line (JSON text has no raw newline). Each
  is an object whose ``type`` names one of the classes below; fields a peer does not know are
  ignored, so a newer peer may add optional ones. ``decode`` returns one immutable, typed object
  per frame and refuses anything else as a whole, so neither side meets a wrong type later.
- **Binary messages** carry ``chunk`` records back to back: the request ``id`` (exactly 32 ASCII hex
  digits, ``ID_BYTES``), a 4-byte big-endian length, then ``data``, the bytes exactly as the client
  will receive them (SSE events or NDJSON lines, rendered by the worker). The hub forwards them
  without parsing them.

The conversation:

1. worker → ``hello``, alone in its message (``protocol`` first: a hub refuses another version with
   close code 4001, whatever else the hello holds); hub → ``welcome``, alone in its message (its id
   and the heartbeat period), or a close with 4002 for a malformed hello. A second link with the
   same ``worker_id`` and provider token replaces the first, which the hub closes; worker ids are
   per provider token, so a link with another token is another worker, whatever id it names.
2. hub → ``request``; worker → ``chunk``\\* then ``end`` (with the engine's usage) or ``error``. The
   hub sends ``cancel`` when its client leaves, and ``credit`` as its client takes the bytes: a worker
   keeps at most ``WINDOW_BYTES`` of one answer unacknowledged, beyond a record sent while none was.
   A worker answers a request it cannot take (full, draining, a duplicate id, a malformed frame
   with a valid id) with ``error``; ``busy`` says it was only full. A hub fails at once a request
   whose ``end`` or ``error`` it had to refuse.
3. worker → ``models`` when what its engine offers changes (its models, the APIs it serves, the
   models it holds in memory, its slots), ``load`` whenever its number of running requests changes
   (a worker shared by several hubs is full for all of them at once), ``draining`` when it shuts down.
4. both → ``ping`` every heartbeat, answered by ``pong``; both carry the sender's running count. A
   side that hears nothing for three heartbeats drops the link, and the hub fails what ran on it.

A link's writer sends everything already queued in as few messages as it can (``ghubai.link``), and
never holds a frame back to fill a batch. Request ids are ``uuid4().hex``: 32 lowercase hex digits.
"""

from __future__ import annotations

import re
import struct
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec

PROTOCOL = 1
GRIDHUB_PATH = "/gridhub"

# WebSocket close codes the hub uses to tell a worker why it is refused, or that it stops (RFC 6455's
# "going away": a planned stop after its drain, which the worker logs as news, not as a fault).
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_MISMATCH = 4001
CLOSE_BAD_HELLO = 4002

# The APIs a request can name, and the path where a client calls each (and where an engine that
# speaks it natively serves it).
API_PATHS = {
    "openai.chat": "/v1/chat/completions", "openai.completions": "/v1/completions",
    "openai.responses": "/v1/responses", "openai.embeddings": "/v1/embeddings",
    "ollama.chat": "/api/chat", "ollama.generate": "/api/generate",
    "ollama.embed": "/api/embed", "ollama.embeddings": "/api/embeddings", "ollama.show": "/api/show",
}

# Flow control: a worker may have at most this many bytes of a request's answer that the hub has
# not yet handed to its client. The hub returns ``credit`` as its client's socket takes the bytes,
# so a slow client paces the worker (which stops reading the engine) instead of filling the hub.
WINDOW_BYTES = 256 * 1024
# A batch is cut here (a single larger frame goes alone): a peer hears whole messages only, and on a
# slow uplink a batch of 1 MiB (4 big answers) took the worker's 50 KB/s 21 s, past the hub's three
# heartbeats of silence; 64 KiB take it 1.3 s. (Token chunks of 64 streams make a few KB.)
MAX_BATCH_BYTES = 64 << 10
MAX_MESSAGE_BYTES = 64 << 20  # what either side accepts in one message (request bodies included)
MAX_FRAME_BYTES = MAX_MESSAGE_BYTES - 2 * MAX_BATCH_BYTES  # one frame, with a batch of others before it
MAX_CHUNK_BYTES = 64 << 10  # a worker cuts an answer into chunk records no larger than this
MAX_EVENT_BYTES = 16 << 20  # one SSE event or NDJSON line of an answer (an engine's, a worker's)
MAX_ANSWER_BYTES = 64 << 20  # what one request may return whole (a stream has no such bound)

ID_BYTES = 32
_ID_PATTERN = "^[0-9a-f]{32}$"
# min/max length too: msgspec matches with re.search, where "$" also matches before a final newline
RequestId = Annotated[str, msgspec.Meta(pattern=_ID_PATTERN, min_length=ID_BYTES, max_length=ID_BYTES)]
WorkerId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Count = Annotated[int, msgspec.Meta(ge=0)]
# What a worker says of itself becomes log text, label values and a header value: bounded, never
# empty, and no control character (C1's included: U+009B is a terminal's escape too).
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"\A[^\x00-\x1f\x7f-\x9f]+\Z")]
MAX_MODEL_NAME, MAX_MODELS = 256, 4096  # a model's name, and the models one worker offers
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MODEL_NAME)]
ModelNames = Annotated[tuple[ModelName, ...], msgspec.Meta(max_length=MAX_MODELS)]
HEARTBEAT_MIN_S, HEARTBEAT_MAX_S = 0.01, 3600.0  # a hub's heartbeat, as its config and a worker take it
ApiNames = Annotated[tuple[Annotated[str, msgspec.Meta(max_length=64)], ...], msgspec.Meta(max_length=64)]
Problem = Annotated[str, msgspec.Meta(max_length=1000)]

# What a request carries along for logs and traces (W3C trace context), passed on to the engine.
TRACE_HEADERS = ("x-request-id", "traceparent", "tracestate")
_TRACE_VALUE = re.compile(r"[\x20-\x7e]{1,512}")  # what any HTTP client can send on to the engine


def _clean(key: str, value: str) -> bool:
    return key in TRACE_HEADERS and _TRACE_VALUE.fullmatch(value) is not None


def clean_trace(headers: dict[str, str]) -> dict[str, str]:
    """The trace headers a request frame may carry: a client's odd or oversized ones are dropped."""
    return {key: value for key, value in headers.items() if _clean(key, value)}


def new_request_id() -> str:
    return uuid.uuid4().hex


ShortText = Annotated[str, msgspec.Meta(max_length=256)]


class ModelDetails(msgspec.Struct, frozen=True, omit_defaults=True):
    """Ollama's ``details`` of a model (its family, size in parameters, quantization), as its
    ``/api/tags`` says them."""
    parent_model: ShortText = ""
    format: ShortText = ""
    family: ShortText = ""
    families: Annotated[tuple[ShortText, ...], msgspec.Meta(max_length=16)] | None = None
    parameter_size: ShortText = ""
    quantization_level: ShortText = ""


class ModelFacts(msgspec.Struct, frozen=True, omit_defaults=True):
    """What an engine tells of a model, for Ollama's clients (``ollama list``, ``ollama ps``, the UIs'
    pickers): from Ollama's ``/api/tags`` its file's ``size``, ``digest``, ``modified_at`` and
    ``details`` (llama.cpp's ``/v1/models``: the size and the parameters); from ``/api/ps``, while in
    memory, its ``memory`` (Ollama's ``size`` there), the part of it in VRAM and its context length."""
    size: Count = 0
    digest: ShortText = ""
    modified_at: ShortText = ""
    details: ModelDetails | None = None
    memory: Count = 0
    size_vram: Count = 0
    context_length: Count = 0

    def fuller(self, other: ModelFacts) -> ModelFacts:
        """Of these and ``other`` (another engine's, of a model of the same name), what an Ollama client
        would rather see: an Ollama engine's (dated, with its family), not llama.cpp's size alone."""
        return other if other.modified_at and not self.modified_at else self

    def held(self, memory: ModelFacts) -> ModelFacts:
        """These facts with ``memory``'s figures in memory (an engine's ``/api/ps``)."""
        return msgspec.structs.replace(self, memory=memory.memory, size_vram=memory.size_vram,
                                       context_length=memory.context_length)


ModelFactsByName = Annotated[dict[ModelName, ModelFacts], msgspec.Meta(max_length=MAX_MODELS)]


class Frame(msgspec.Struct, frozen=True, tag_field="type"):
    """Any frame. Invariant: every field has been checked against its type when the frame exists.
    (Each kind says ``frozen=True`` again, which msgspec inherits anyway, for type checkers.)"""


class Hello(Frame, tag="hello", frozen=True):
    """Worker → hub, first: who the worker is and what it offers."""
    protocol: int
    worker_id: WorkerId
    name: Name
    models: ModelNames
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)]
    engine: str
    version: Annotated[str, msgspec.Meta(max_length=128)]  # (shown in /api/registry and the log)
    apis: ApiNames | None = None  # as in ``models``
    loaded: ModelNames | None = None
    problem: Problem = ""
    weight: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0  # its share of load, against other workers
    facts: ModelFactsByName | None = None  # as in ``models``


class Welcome(Frame, tag="welcome", frozen=True):
    """Hub → worker: the link is up; ping every ``heartbeat_s``."""
    hub_id: str
    # (one of 1e-9 dropped every link at once, one of 1e9 never found a dead hub)
    heartbeat_s: Annotated[float, msgspec.Meta(ge=HEARTBEAT_MIN_S, le=HEARTBEAT_MAX_S)]


class Models(Frame, tag="models", frozen=True):
    """Worker → hub: what its engine offers changed. ``apis``: the ``API_PATHS`` it serves (None: all);
    ``loaded``: the models it holds in memory now (None: it cannot tell); ``problem``: why it lists
    no models, in words for the client (its credentials were refused, say); ``max_concurrency``: the
    slots it has now, when the engine says (llama.cpp's ``total_slots``; None: unchanged);
    ``facts``: what the engine tells of its models (``ModelFacts``; None: nothing)."""
    models: ModelNames
    apis: ApiNames | None = None
    loaded: ModelNames | None = None
    problem: Problem = ""
    max_concurrency: Annotated[int, msgspec.Meta(ge=1)] | None = None
    facts: ModelFactsByName | None = None


class Request(Frame, tag="request", frozen=True):
    """Hub → worker: run ``body`` on the engine's ``api`` (one of ``API_PATHS``)."""
    id: RequestId
    api: str
    body: dict[str, Any]
    stream: bool
    trace: dict[str, str] = {}

    def __post_init__(self) -> None:
        if not all(_clean(key, value) for key, value in self.trace.items()):
            raise ValueError("trace holds a header that is not a clean trace header")


class Chunk(Frame, tag="chunk", frozen=True):
    """Worker → hub, binary only: the next bytes of an answer, ready for the client."""
    id: str
    data: bytes


class End(Frame, tag="end", frozen=True):
    """Worker → hub: the answer is complete; ``usage`` is the engine's token count, if it gave one."""
    id: RequestId
    usage: dict[str, Count] | None = None


class Error(Frame, tag="error", frozen=True):
    """Worker → hub: the request failed. ``retryable``: another worker may succeed. ``busy``: the
    worker had no free slot (other hubs filled it); the hub waits for its next ``load`` instead of
    counting a failed attempt. ``untranslatable``: its engine's API cannot say the request, and no
    worker of its engine kind can: the hub tries the other kind, and counts no attempt.
    ``retry_after``: the seconds the engine asked for with its 429 or 503, which its client hears.
    ``by_hub``: the hub made it, about the worker or its link (never sent): not the engine's error."""
    id: RequestId
    status: Annotated[int, msgspec.Meta(ge=100, le=599)]
    message: str
    retryable: bool
    busy: bool = False
    untranslatable: bool = False
    retry_after: Count | None = None
    by_hub: bool = False


class Cancel(Frame, tag="cancel", frozen=True):
    """Hub → worker: the client left; stop the engine."""
    id: RequestId


class Credit(Frame, tag="credit", frozen=True):
    """Hub → worker: ``bytes`` more bytes of this request's answer reached the client."""
    id: RequestId
    bytes: Count


class Load(Frame, tag="load", frozen=True):
    """Worker → every hub, whenever its number of running requests changes."""
    inflight: Count


class Draining(Frame, tag="draining", frozen=True):
    """Worker → hub: shutting down; finishing what it runs, taking nothing new."""


class Ping(Frame, tag="ping", frozen=True):
    """Either way, every heartbeat: the sender's count of running requests."""
    inflight: Count


class Pong(Frame, tag="pong", frozen=True):
    """The answer to ``ping``, with the answering side's own count of running requests; at most one
    a quarter heartbeat (``link.pong_due``), however many pings come."""
    inflight: Count


class Unknown(msgspec.Struct, frozen=True):
    """A frame of a type this side does not know (a newer peer's): logged and ignored."""
    type: str


JSON_FRAMES = Hello | Welcome | Models | Request | End | Error | Cancel | Credit | Load | Draining | Ping | Pong
_TYPES = {cls.__struct_config__.tag for cls in JSON_FRAMES.__args__}  # type: ignore[attr-defined]
_decoder = msgspec.json.Decoder(JSON_FRAMES)
_encoder = msgspec.json.Encoder()


class _Head(msgspec.Struct):
    """What can be read of a frame that failed to decode, to say why and to whom."""
    type: Any = None
    protocol: Any = None
    id: Any = None


class ProtocolError(ValueError):
    """A frame that cannot be understood. ``frames``: those of the same message read before the
    fault. ``request_id`` and ``frame_type``: the valid id and the type of the refused frame, when it
    had them, so that the request it was about can be answered or ended."""

    def __init__(self, message: str, frames: Sequence[Frame] | None = None, request_id: str | None = None,
                 frame_type: str = "") -> None:
        super().__init__(message)
        self.frames = list(frames or ())
        self.request_id = request_id
        self.frame_type = frame_type


class VersionMismatch(ProtocolError):
    """A hello of another protocol version."""


def type_of(frame: Frame | Unknown) -> str:
    return frame.type if isinstance(frame, Unknown) else str(frame.__struct_config__.tag)


def encode(frame: Frame) -> str:
    return _encoder.encode(frame).decode()


def decode(text: str | bytes) -> Frame | Unknown:
    """Parse one JSON frame. Unknown types come back as ``Unknown``; anything else wrong raises."""
    try:
        frame = _decoder.decode(text)
    except (msgspec.DecodeError, RecursionError) as error:  # RecursionError: nested ~1,000 levels deep
        return _refuse(text, error)
    if isinstance(frame, Hello) and frame.protocol != PROTOCOL:
        raise VersionMismatch(f"protocol {frame.protocol} not supported; this side speaks {PROTOCOL}")
    return frame


def _refuse(text: str | bytes, error: Exception) -> Unknown:
    """Why a frame failed, with the protocol version compared first; an unknown type is no fault."""
    try:
        head = msgspec.json.decode(text, type=_Head)
    except (msgspec.DecodeError, RecursionError) as not_json:
        raise ProtocolError(f"frame is not a JSON object: {str(not_json)[:200]}") from None
    if not isinstance(head.type, str):
        raise ProtocolError("frame has no type")
    if head.type == "hello" and head.protocol != PROTOCOL:
        raise VersionMismatch(f"protocol {str(head.protocol)[:20]} not supported; this side speaks {PROTOCOL}")
    if head.type == "chunk":
        raise ProtocolError("chunk frames are binary")
    if head.type not in _TYPES:
        return Unknown(head.type[:40])
    valid_id = isinstance(head.id, str) and re.fullmatch(_ID_PATTERN, head.id)
    raise ProtocolError(f"bad {head.type} frame: {str(error)[:200]}", request_id=head.id if valid_id else None,
                        frame_type=head.type)


_LENGTH = struct.Struct(">I")


def chunk(request_id: str, data: bytes) -> bytes:
    """One binary chunk record (``request_id`` is a valid id: it came from a decoded request)."""
    return request_id.encode() + _LENGTH.pack(len(data)) + data


def unpack_chunks(message: bytes) -> list[Chunk]:
    """The chunk records of one binary message."""
    frames: list[Chunk] = []
    offset, size = 0, len(message)
    while offset < size:
        start = offset + ID_BYTES + _LENGTH.size
        if start > size:
            raise ProtocolError("truncated chunk header", frames, frame_type="chunk")
        (length,) = _LENGTH.unpack_from(message, offset + ID_BYTES)
        if start + length > size:
            raise ProtocolError("truncated chunk data", frames, frame_type="chunk")
        if len(frames) == MAX_FRAMES:
            raise _too_many(frames)
        frames.append(Chunk(message[offset:offset + ID_BYTES].decode("ascii", "replace"),
                            message[start:start + length]))
        offset = start + length
    return frames


_LINE = re.compile(r"[^\n]+")
MAX_BAD_FRAMES = 8  # in one message; past it the rest is dropped (each one costs an exception and a log line)
# in one message: a writer's batch holds 40,000 of the smallest frames at most (of 1 MiB, as writers of
# this protocol made them until 2026-12; of MAX_BATCH_BYTES now, 2,400). A peer's 64 MiB of them took
# the hub 1.7 s to decode in one go, every client of it waiting (a hunt); past the cap (50 ms of them),
# the rest is dropped and the problem says so (frame type "message": a hub cuts such a worker's link)
MAX_FRAMES = 65536


def _too_many(frames: list[Any]) -> ProtocolError:
    return ProtocolError(f"the rest of the message is dropped after {MAX_FRAMES} frames", frames, frame_type="message")


def unpack(message: str | bytes) -> tuple[list[Frame | Unknown], list[ProtocolError]]:
    """The frames of one WebSocket message, and what was wrong with the parts that were refused:
    a bad line of a text message costs that line only; a bad binary record ends its message."""
    if isinstance(message, bytes):
        try:
            return list(unpack_chunks(message)), []
        except ProtocolError as problem:
            return list(problem.frames), [problem]
    frames: list[Frame | Unknown] = []
    problems = []
    for line in _LINE.finditer(message):  # (in C: a message of blank lines costs next to nothing)
        if len(frames) == MAX_FRAMES:
            problems.append(_too_many(frames))
            break
        try:
            frames.append(decode(line.group()))
        except ProtocolError as problem:
            problems.append(problem)
            if len(problems) == MAX_BAD_FRAMES:  # a peer that sends that much garbage sends no more frames
                problems.append(ProtocolError(f"the rest of the message is dropped after {MAX_BAD_FRAMES} bad frames"))
                break
    return frames, problems

