"""The worker's side of the local engine: model discovery (httpx: a request every
``discovery_interval_s``) and the calls themselves, on a keep-alive pool of h11 connections
(``ghubai.http11.client``: at most ``max_concurrency`` kept, a connection reused only after a clean
answer, closed at once when its request is cancelled, which is what stops the engine).

A call yields the answer as the client will receive it (SSE events or NDJSON lines), one piece per
network read, so a fast engine costs one hub frame per read and nothing waits to fill a batch. The
engine's end-of-stream marker, its usage figures and its mid-stream errors are taken out here: the
worker reports them in the ``end`` and ``error`` frames, and the hub ends the stream its own way.
"""

from __future__ import annotations

import enum
import logging
import math
import ssl
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import trio

from ghubai import dialects, protocol
from ghubai.config import EngineConfig
from ghubai.errors import describe
from ghubai.http11.client import TRANSPORT_ERRORS, ConnectFailed, ConnectionPool, Response, TooLarge, tls_client_context
from ghubai.worker.translate import (OllamaOverOpenAI, OpenAIOverOllama, Translator, Untranslatable, count, engine_path,
                                    translator_for)

log = logging.getLogger("ghubai.worker")
CREDENTIALS_REFUSED = "the engine rejected the worker's credentials"
PROBE_MODEL = "ghubai-probe-no-such-model"  # what a probe names: no engine runs it, so none generates
DISCOVERY_ERRORS = (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError, ArithmeticError)
NO_CONNECTION = (httpx.ConnectError, httpx.ConnectTimeout)  # discovery's (Cause.UNREACHABLE): not a slow or odd answer


class Cause(enum.Enum):
    """Why an engine refused a call, where the worker acts on it."""
    MODEL_MISSING = "model missing"  # ask for the model list again
    UNSERVED = "unserved"  # the engine lacks the API's path: tell the hubs
    CREDENTIALS = "credentials"  # the operator's key is missing or wrong: say so loudly
    UNFIT = "unfit"  # the engine's answer does not fit its API: say so loudly (no traceback per request)
    UNTRANSLATABLE = "untranslatable"  # the engine's API cannot say it: the hub tries another engine kind
    UNREACHABLE = "unreachable"  # the connection failed: ask for the model list now (the engine may be down)


class EngineError(Exception):
    """The engine could not serve the call. ``retryable``: another worker may succeed. ``detail``:
    more for the worker's log, which the client must not read (the engine's address)."""

    def __init__(self, status: int, message: str, retryable: bool, cause: Cause | None = None,
                 detail: str = "", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retryable = retryable
        self.cause = cause
        self.detail = detail
        self.retry_after = retry_after  # (seconds: the engine's Retry-After)


@dataclass(frozen=True)
class Offer:
    """What the engine offers, as the hubs hear it (``hello``, ``models``). ``apis``: the APIs it
    serves (None until probed); ``loaded``: models in memory (None: the engine cannot tell);
    ``problem``: why it offers no model; ``slots``: the parallel slots it reports (llama.cpp)."""
    models: tuple[str, ...] = ()
    apis: tuple[str, ...] | None = None
    loaded: tuple[str, ...] | None = None
    problem: str = ""
    slots: int | None = None
    facts: dict[str, protocol.ModelFacts] | None = None  # what the engine tells of its models
    detail: str = field(default="", compare=False)  # the problem's cause in full: for the worker's log only


_FOUND_WORDS = ("model", "response")  # what an engine's 404 names when the path is served


def unserved(status: int, message: str) -> bool:
    """An engine's refusal that means "no such path here", not "no such model": 405 or 501, or a
    404 that does not speak of a model (Ollama, vLLM and llama.cpp all name the model they lack) or
    of a stored response (vLLM's for a ``previous_response_id`` it does not hold: the API is served)."""
    return status in (405, 501) or (status == 404 and not any(word in message.lower() for word in _FOUND_WORDS))


def discovery_problem(error: Exception, has_key: bool) -> str:
    """Why the engine lists no model, in words for an operator and a client (never its URL)."""
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        if status in (401, 403):
            return f"{CREDENTIALS_REFUSED} (HTTP {status})"
        if status == dialects.ENGINE_LOOP.status:
            return f"the engine's URL is {dialects.NOT_AN_ENGINE}"
        # LiteLLM answers a call without its key with a 500 (NOTES.md)
        hint = "; if it needs a key, set [engine] api_key" if status == 500 and not has_key else ""
        return f"the engine answered HTTP {status} to GET {error.request.url.path}{hint}"
    if isinstance(error, httpx.TransportError):  # the worker's log has the details; a client needs none
        if _untrusted(error):  # (else as a dead engine's: the one cause its operator cannot guess)
            return "the engine's TLS certificate is not trusted (the worker trusts the system's CAs, or " \
                   "SSL_CERT_FILE's; its ca_file is for wss:// hubs)"
        return f"the engine does not answer ({type(error).__name__})"
    return f"the engine's model list is unreadable: {error or type(error).__name__}"


def _untrusted(error: BaseException) -> bool:
    """The failure is a refused certificate, somewhere down its chain of causes."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
        cause = cause.__cause__ or cause.__context__
    return cause is not None


def engine_headers(config: EngineConfig) -> list[tuple[str, str]]:
    """What every call to the engine carries: its key and the operator's extra headers, and that
    its answer must not be compressed (none asked for, any may come: a gateway before vLLM gzipped)."""
    key = [("authorization", f"Bearer {config.api_key}")] if config.api_key else []
    return [*key, *config.headers.items(), ("accept-encoding", "identity"), (dialects.ENGINE_CALL_HEADER, "1")]


@dataclass
class Call:
    """One request to the engine; ``usage`` is filled in as the engine reports it. Invariant: once
    ``failure`` is set or ``finished`` is true, the engine's answer is over."""
    api: str
    body: dict[str, Any]
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)  # X-Request-ID, W3C trace context
    strip_usage: bool = False  # the engine was asked for usage the client did not ask for
    usage: dict[str, int] | None = field(default=None)
    finished: bool = False  # the engine said its answer is complete ([DONE], or "done": true)
    failure: EngineError | None = None  # the engine reported an error in the middle of its stream


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _encode(value).decode()


MESSAGE_CHARS = 500  # of an engine's error message the client gets (an HTML page can be megabytes)


def _error_message(raw: bytes) -> str:
    """An engine's error answer as text (never a Python repr): the message of ``{"error": ...}``,
    vLLM's ``{"message": ...}`` or FastAPI's ``{"detail": ...}``, else the answer itself; one that
    is cut ends with "…", so that no one reads it as whole."""
    try:
        value = _decode(raw)
    except (ValueError, RecursionError):
        value = raw.decode(errors="replace").strip() or "no detail"
    if isinstance(value, dict):
        error = next((value[key] for key in ("error", "message", "detail") if value.get(key) is not None), value)
        value = error.get("message", error) if isinstance(error, dict) else error
    text = _text(value)
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS - 1] + "…"


def engine_error(payload: bytes) -> str | None:
    """The message of a payload that is an engine's error object (``{"error": ...}`` however it is
    spaced, with an error in it, or vLLM's ``{"object": "error", "message": ...}``), else None.
    Cheap for the others: only a payload with a literal ``"error"`` string in it is parsed."""
    if b'"error"' not in payload:
        return None
    try:
        value = _decode(payload)
    except (ValueError, RecursionError):
        return None
    if isinstance(value, dict) and value.get("error"):  # ({"error": null} beside an answer is no error)
        return _error_message(payload)
    if isinstance(value, dict) and value.get("object") == "error":
        return str(value.get("message") or "engine error")
    return None


def engine_failure(payload: bytes, message: str) -> EngineError:
    """An engine's error object (``engine_error``'s ``message``) as the hub should tell it: with the
    error's own 4xx ``code`` when it gives one (llama.cpp and vLLM say so of a prompt longer than the
    context: the client's 400, not a 502), else a 502. Retryable as an engine's refusal by HTTP status
    is: a 502 or 429 before the answer's first byte goes to another worker, a 4xx is the request's
    (sent to every worker in turn, a prompt too long costs each a prefill and still fails); an
    engine's 401 or 403 is the worker's key's fault, and its 404 no client's missing model (the worker
    listed it)."""
    value = _decode(payload)
    error = value.get("error") if isinstance(value.get("error"), dict) else value
    code = error.get("code")
    if isinstance(code, str) and code.isascii() and code.isdigit() and len(code) == 3:  # (LiteLLM's: text)
        code = int(code)
    status = code if type(code) is int and 400 <= code < 500 and code not in (401, 403, 404) else 502
    return EngineError(status, message, retryable=status >= 500 or status == 429)


def _stateless(body: dict[str, Any]) -> None:
    """Refuse a Responses request that continues a stored one, as an engine that holds no such
    response does (OpenAI's and vLLM's 404), retryable: a worker whose engine stores responses may
    hold it. Ollama stores none and ignores ``previous_response_id`` and ``conversation``: it
    answered 200, as if the conversation had no earlier turns."""
    for key, kind in (("previous_response_id", "Response"), ("conversation", "Conversation")):
        if value := body.get(key):
            named = value.get("id") if isinstance(value, dict) else value
            raise EngineError(404, f"{kind} with id '{str(named)[:100]}' not found (Ollama stores no responses: "
                              "send the whole conversation as input)", retryable=True)


# JSON of another shape (struct.error, OverflowError: an embedding's vector of nulls or of 1e39 to pack as float32)
_SHAPE_ERRORS = (AttributeError, TypeError, KeyError, IndexError, ValueError, OverflowError, struct.error)


def _unfit(path: str, error: Exception) -> EngineError:
    """An engine's answer the translation cannot read (a list where an object belongs, a number as
    text): the engine's fault, said in one line rather than as the worker's traceback (which is
    logged at debug, should the fault be the translation's)."""
    log.debug("an answer to %s that does not fit", path, exc_info=error)
    return EngineError(502, f"the engine's answer to {path} does not fit its API: {error}", retryable=True,
                       cause=Cause.UNFIT)


class _Counts(msgspec.Struct):
    """What an answer passed on as it came says of its tokens: decoded without building the rest (an
    embedding batch's 50 MB of floats took 80 ms of the worker's loop, and every stream on it waited)."""
    usage: Any = msgspec.UNSET
    done: Any = msgspec.UNSET
    prompt_eval_count: Any = msgspec.UNSET
    eval_count: Any = msgspec.UNSET


_decode_counts = msgspec.json.Decoder(_Counts).decode


def _counts_of(raw: bytes) -> Any:
    """``raw``'s counts as ``_usage_of`` reads them; an answer that is no object, whole."""
    try:
        counts = _decode_counts(raw)
    except msgspec.ValidationError:
        return _decode(raw)
    return {name: value for name in _Counts.__struct_fields__ if (value := getattr(counts, name)) is not msgspec.UNSET}


def _usage_of(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    if isinstance(response := value.get("response"), dict) and "usage" not in value:
        value = response  # a Responses stream's last event: the whole answer, its usage in it
    usage = value.get("usage")
    if isinstance(usage, dict):
        if "input_tokens" in usage and "prompt_tokens" not in usage:  # (a Responses answer's)
            return {"prompt_tokens": count(usage["input_tokens"]),
                    "completion_tokens": count(usage.get("output_tokens"))}
        return {"prompt_tokens": count(usage.get("prompt_tokens")),
                "completion_tokens": count(usage.get("completion_tokens"))}
    if value.get("done") is True or "prompt_eval_count" in value:
        return {"prompt_tokens": count(value.get("prompt_eval_count")), "completion_tokens": count(value.get("eval_count"))}
    return None


IDLE_REUSE_S = 4.0  # reuse an idle connection only while the engine surely keeps it (uvicorn: 5 s)
REFUSAL_LIMIT = 1 << 20  # what is read of an engine's error answer
DISCOVERY_TIMEOUT_S = 30.0  # for a whole discovery call or probe (or idle_timeout_s, when shorter)
LISTING_LIMIT = 16 << 20  # what is read of an engine's model list, /api/ps, /props or a probe's answer
MAX_RECORD_BYTES = protocol.MAX_EVENT_BYTES  # one NDJSON line or SSE event of an engine's stream
AFTER_END_S = 1.0  # for the body's end after the answer's ([DONE]); an engine that keeps it open loses the connection
ANSWER_LIMIT = protocol.MAX_ANSWER_BYTES
# Ollama writes an embedding's float32s as text, 12-15 bytes each, which reach an OpenAI client that asks
# for base64 (the openai SDK does) as 5.3: the engine's answer may be nearly three times the client's
BASE64_SHRINK = 3
_JSON = [("content-type", "application/json")]
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class Engine:
    """The local engine as the worker calls it. Invariant: every call yields the answer as its
    client will receive it, and ends with the engine's usage in its ``Call`` or an ``EngineError``."""

    def __init__(self, config: EngineConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client  # for discovery and probes
        self.headers = engine_headers(config)
        # what ``scrub`` hides: long ones first (a header's value may hold the key); the key whatever its
        # length but for a few characters, a header's value from 8 (a shorter one is no secret worth the
        # name, and hiding it would garble the engine's words)
        secrets = {value for value in config.headers.values() if len(value) >= 8} | \
            ({config.api_key} if len(config.api_key) >= 4 else set())
        # and as JSON quotes them back (an error object the worker re-encodes, an engine's own JSON): " and \ escaped
        quoted = {msgspec.json.encode(secret).decode()[1:-1] for secret in secrets}
        self.secrets = sorted(secrets | quoted, key=len, reverse=True)
        self.tools = config.tools
        self.vision = False  # llama.cpp's /props says so
        self.unserved: frozenset[str] | None = None  # engine paths that are missing; None: not probed yet
        # what the engine's model list (Ollama's /api/tags, llama.cpp's /v1/models) and Ollama's /api/ps
        # last told of each model (``facts``)
        self.listed: dict[str, protocol.ModelFacts] = {}
        self.in_memory: dict[str, protocol.ModelFacts] = {}
        parts = urlsplit(config.url)
        tls = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")  # an engine behind a path (a gateway's /ollama, say)
        self.pool = ConnectionPool(parts.hostname or "localhost", parts.port or (443 if tls else 80),
                                   ssl_context=tls_client_context() if tls else None,
                                   connect_timeout_s=config.connect_timeout_s, max_idle=config.max_concurrency,
                                   idle_reuse_s=IDLE_REUSE_S)

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What an OpenAI-compatible engine's models can do, as Ollama's ``/api/show`` says it."""
        return ("completion", *(("tools",) if self.tools else ()), *(("vision",) if self.vision else ()))

    @staticmethod
    def client_for(config: EngineConfig) -> httpx.AsyncClient:
        timeout = httpx.Timeout(config.idle_timeout_s, connect=config.connect_timeout_s,
                                pool=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=config.max_concurrency + 4,
                              max_keepalive_connections=config.max_concurrency + 4)
        # discovery reaches the engine as the calls do (on h11): direct, whatever HTTP_PROXY says, and
        # trusting the same CAs (the system's, SSL_CERT_FILE's)
        return httpx.AsyncClient(base_url=config.url, timeout=timeout, limits=limits, headers=engine_headers(config),
                                 trust_env=False, verify=tls_client_context())

    async def survey(self) -> Offer:
        """What the engine offers now. Its APIs are probed on the first answer, and again after it
        was down; the paths it lacked, and what it holds in memory (Ollama) or its slots
        (llama.cpp), are asked each time."""
        try:
            models = await self.list_models()
        except DISCOVERY_ERRORS as error:
            self.unserved = None
            # the detail for the log, as an engine's words are; none for a status, which the problem
            # names (httpx's words add a second line and a web page's link)
            return Offer(problem=discovery_problem(error, bool(self.config.api_key)),
                         detail="" if isinstance(error, httpx.HTTPStatusError) else self.scrub(describe(error)))
        if self.unserved is None:
            self.unserved = await self._probe()
        elif asked := self.unserved:  # a path found missing may be back (an engine restarted unseen, a gateway's 404)
            back = asked - await self._probe(asked)
            self.unserved = (self.unserved or frozenset()) - back  # (what a request found missing meanwhile stays)
        loaded, slots = (await self._loaded_if_told(), None) if self.config.kind == "ollama" else \
            (None, await self._props())
        # the APIs last: a request may have found one missing while this survey waited
        return Offer(tuple(models), self.apis(), loaded, slots=slots, facts=self.facts())

    def apis(self) -> tuple[str, ...] | None:
        if self.unserved is None:
            return None
        return tuple(api for api in protocol.API_PATHS if engine_path(self.config.kind, api) not in self.unserved)

    async def _probe(self, paths: frozenset[str] | None = None) -> frozenset[str]:
        """The engine paths (of ``paths``, else all) that answer as missing, each asked once with a
        body that names no real model and holds no prompt; a path that cannot be asked counts as served."""
        asked = set(paths) if paths is not None else {engine_path(self.config.kind, api) for api in protocol.API_PATHS}
        asked.discard("/v1/models")  # a GET, and the model list itself
        missing = set()

        async def probe(path: str) -> None:
            try:
                status, body = await self._ask("POST", path, json={"model": PROBE_MODEL})
            except (httpx.HTTPError, ValueError):
                return
            if unserved(status, _error_message(body)):
                missing.add(path)

        async with trio.open_nursery() as nursery:  # at once: one by one, an engine that answered no POST
            for path in sorted(asked):  # held a starting worker off its hubs for five of their bounds (150 s)
                nursery.start_soon(probe, path)
        return frozenset(missing)

    async def _ask(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        """The status and body of a discovery call or a probe (a GET's error status raises), within
        ``DISCOVERY_TIMEOUT_S`` in all (httpx bounds each read only: an engine that trickles, or
        streams, would hold a starting worker off its hubs for ever). A body over ``LISTING_LIMIT``
        is refused (ValueError): an engine's listing is kilobytes, and a runaway one must not fill
        the worker's memory."""
        limit_s = min(DISCOVERY_TIMEOUT_S, self.config.idle_timeout_s)
        with trio.move_on_after(limit_s):
            async with self.client.stream(method, path, **kwargs) as response:
                if method == "GET":
                    response.raise_for_status()
                body = bytearray()
                async for piece in response.aiter_bytes():
                    body += piece
                    if len(body) > LISTING_LIMIT:
                        raise ValueError(f"{path} answered more than {LISTING_LIMIT} bytes")
                return response.status_code, bytes(body)
        raise httpx.ReadTimeout(f"{method} {path} took longer than {limit_s:g} s")

    async def _get(self, path: str) -> Any:
        """A GET's JSON answer; ValueError when it is not JSON, or nested too deeply."""
        try:
            return _decode((await self._ask("GET", path))[1])
        except RecursionError:
            raise ValueError(f"{path} answered JSON nested too deeply") from None

    async def loaded(self) -> tuple[str, ...] | None:
        """The models Ollama holds in memory (``/api/ps``); None when it does not say. Raises
        ``NO_CONNECTION`` when no connection to it can be made."""
        try:
            entries = (await self._get("/api/ps")).get("models")
        except NO_CONNECTION:
            raise
        except DISCOVERY_ERRORS:
            return None
        if not isinstance(entries, list):
            return None
        self.in_memory = dialects.facts_of(entries, running=True)
        return _names(entries, "name")

    async def _loaded_if_told(self) -> tuple[str, ...] | None:
        """``loaded()``, None when the engine cannot be reached (it listed its models a moment ago)."""
        try:
            return await self.loaded()
        except NO_CONNECTION:
            return None

    def facts(self) -> dict[str, protocol.ModelFacts] | None:
        """What the engine told of each model it lists, with its figures in memory while it holds it."""
        if not self.listed:
            return None
        return {name: facts if (held := self.in_memory.get(name)) is None else facts.held(held)
                for name, facts in self.listed.items()}  # (the models it lists: what a hub takes)

    async def _props(self) -> int | None:
        """llama.cpp server's parallel slots (``/props``), whether its template takes tools, and
        whether its model sees images (``ollama run`` attaches an image only to a model that does)."""
        try:
            props = await self._get("/props")
        except DISCOVERY_ERRORS:
            return None
        if not isinstance(props, dict):
            return None
        caps = props.get("chat_template_caps")
        if isinstance(caps, dict) and isinstance(caps.get("supports_tools"), bool):
            self.tools = caps["supports_tools"]
        modalities = props.get("modalities")
        self.vision = isinstance(modalities, dict) and modalities.get("vision") is True
        slots = props.get("total_slots")
        return slots if isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1 else None

    async def list_models(self) -> list[str]:
        """The engine's model names; raises httpx.HTTPError or ValueError when it cannot say. Names a
        hub would refuse (not text, empty, over 256 characters) are left out, and at most 4,096 kept."""
        path, listing, key = ("/api/tags", "models", "name") if self.config.kind == "ollama" else \
            ("/v1/models", "data", "id")
        answer = await self._get(path)
        entries = answer.get(listing) if isinstance(answer, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{path} answered no {listing!r} list")
        names = _names(entries, key)
        told = dialects.facts_of(entries) if self.config.kind == "ollama" else dialects.facts_of_meta(entries)
        self.listed = {name: facts for name, facts in told.items() if name in names}
        return list(names)

    def _prepare(self, call: Call) -> dict[str, Any]:
        body = dict(call.body)
        if call.stream and call.api in ("openai.chat", "openai.completions"):
            # Always ask for usage so the grid can count tokens; strip it if the client did not ask.
            call.strip_usage = not dialects.wants_usage(body)
            options = body.get("stream_options")  # (an object at a hub of this release; an older one let any through)
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return body

    def _route(self, call: Call) -> tuple[Translator | None, str, dict[str, Any]]:
        """How the engine is asked: the translation between the client's API and the engine's (None:
        the engine speaks the client's), the engine's path, and the body to send it."""
        if call.api == "openai.responses" and self.config.kind == "ollama":
            _stateless(call.body)
        translator = translator_for(self.config.kind, call.api, self.capabilities)
        if translator is not None:
            try:
                body = translator.request(call.body, call.stream)
            except Untranslatable as error:
                raise EngineError(400, str(error), retryable=True, cause=Cause.UNTRANSLATABLE) from None
            return translator, translator.path, body  # (a path known once the request is read: a raw generation's)
        if call.api in protocol.API_PATHS:
            return None, protocol.API_PATHS[call.api], self._prepare(call)
        raise EngineError(400, f"this worker does not serve {call.api}", retryable=False)

    async def _whole(self, response: Response, call: Call, translator: Translator | None, path: str) -> bytes:
        """A whole answer, read and translated."""
        shrinks = isinstance(translator, OpenAIOverOllama) and translator.base64
        raw = await response.read(ANSWER_LIMIT * BASE64_SHRINK if shrinks else ANSWER_LIMIT)
        if (message := engine_error(raw)) is not None:  # LM Studio says some errors with a 200
            raise engine_failure(raw, message)
        try:
            value = _decode(raw) if translator else _counts_of(raw)
        except (ValueError, RecursionError) as error:  # a whole generation wasted: not done elsewhere
            raise EngineError(502, f"the engine's answer is not JSON ({error})", retryable=False) from None
        call.usage = _usage_of(value)
        try:
            return translator.whole(value, call.usage) if translator else raw
        except _SHAPE_ERRORS as error:
            raise _unfit(path, error) from None

    async def run(self, call: Call) -> AsyncIterator[bytes]:
        """Yield the reply's bytes as they arrive; raise EngineError when the engine fails."""
        translator, path, body = self._route(call)
        if isinstance(translator, OllamaOverOpenAI) and translator.preload:
            call.finished = True
            yield translator.preloaded(call.stream)
            return
        method = translator.method(call.api) if translator else "POST"
        raw_body = _encode(body) if method == "POST" else b""
        headers = [*_JSON, *self.headers, *call.headers.items()] if raw_body else \
            [*self.headers, *call.headers.items()]
        # until an answer begins (a model load, a long prompt), and a whole answer until it is done,
        # the hub's first_token_s bounds the wait (and cancels this call), not idle_timeout_s, which
        # would cut every long one, then try it on every worker
        silence_s = self.config.idle_timeout_s if call.stream else math.inf
        try:
            async with self.pool.request(method, self.prefix + path, headers, raw_body, math.inf) as response:
                coding = _coding(response.headers)  # (a gateway's, whatever was asked: no JSON in it)
                if response.status != 200:  # (a compressed refusal keeps its status; its words are bytes)
                    raw = await response.read(REFUSAL_LIMIT)
                    raise self._refusal(response.status, _encode({"error": _compressed(coding)}) if coding else raw,
                                        method, path, response.retry_after)
                if coding:
                    raise EngineError(502, _compressed(coding), retryable=True)
                if not call.stream:
                    yield await self._whole(response, call, translator, path)
                    return
                sse = path.startswith("/v1/")
                split = sse_payloads if sse else ndjson_payloads
                try:
                    async for batch in split(response.chunks()):
                        response.timeout_s = silence_s  # the answer began: silence now is the engine's
                        if call.finished:  # after the answer's end: read (the connection is kept), not passed on
                            continue
                        out = self._translate(call, batch, translator) if translator else self._render(call, batch, sse)
                        if out:
                            yield out
                        if call.failure:
                            raise call.failure
                        if call.finished:  # the body's own end may come late, or never: not waited for long
                            response.until = trio.current_time() + AFTER_END_S
                except (trio.TooSlowError, TooLarge, *TRANSPORT_ERRORS):
                    if not call.finished:
                        raise
                    return  # after the end, whatever the body does (stays open, is cut) costs the connection only
                if not call.finished:  # e.g. Ollama's OpenAI layer after an error: the stream just stops
                    raise EngineError(502, "the engine ended the stream without finishing its answer",
                                      retryable=True)
        except trio.TooSlowError:  # (silence once the answer began: before, math.inf, and the hub's limits)
            raise EngineError(504, f"the engine sent nothing for {silence_s:g} s in the middle of its answer "
                              "(the worker's engine.idle_timeout_s)", retryable=True) from None
        except TimeoutError:  # (the pool's connect, in connect_timeout_s: a timeout, as the client's 504 says)
            raise EngineError(504, "engine connection timed out", retryable=True, cause=Cause.UNREACHABLE) from None
        except TooLarge as error:  # another worker's engine would send the same: no retry
            raise EngineError(502, str(error), retryable=False) from None
        except ConnectFailed as error:  # (the client hears what failed, not the engine's address: the detail's)
            raise EngineError(502, "cannot connect to the engine", retryable=True, detail=str(error),
                              cause=Cause.UNREACHABLE) from None
        except (*TRANSPORT_ERRORS, ValueError, RecursionError) as error:
            raise EngineError(502, f"engine connection failed ({type(error).__name__})", retryable=True,
                              detail=str(error)) from None

    def scrub(self, text: str) -> str:
        """An engine's words without the key and header values it was sent: some echo them in any
        error, a 400 or a 429 as well as a 401 (LiteLLM's key in a 400 was one); and the start of one
        the text ends with (before its "…"), where an engine's words were cut short."""
        mark = "…" if text.endswith("…") else ""
        text = text.removesuffix(mark)
        for secret in self.secrets:
            text = text.replace(secret, "***")
            text = next((text[:-cut] + "***" for cut in range(len(secret) - 1, 3, -1)
                         if text.endswith(secret[:cut])), text)
        return text + mark

    def _refusal(self, status: int, raw: bytes, method: str, path: str, wait: int | None = None) -> EngineError:
        """An engine's answer other than 200 as the hub should hear it; ``wait``, its Retry-After."""
        message = self.scrub(_error_message(raw))  # (before it is bracketed: a key cut short at its end is found)
        if status in (401, 403):  # without the engine's words: some echo the key they were given
            return EngineError(502, f"{CREDENTIALS_REFUSED} (HTTP {status})", retryable=True,
                               cause=Cause.CREDENTIALS)
        if unserved(status, message):  # from now on the hubs send this API elsewhere
            self.unserved = (self.unserved or frozenset()) | {path}
            return EngineError(501, f"the engine does not serve {method} {path} (HTTP {status}: {message})",
                               retryable=True, cause=Cause.UNSERVED)
        if status == 404:  # (another worker's engine may hold the model, or the stored response)
            return EngineError(404, message, retryable=True,
                               cause=Cause.MODEL_MISSING if "model" in message.lower() else None)
        return EngineError(status, message, retryable=status >= 500 or status == 429,
                           retry_after=wait if status in (429, 503) else None)

    def _render(self, call: Call, batch: list[bytes], sse: bool) -> bytes:
        """The payloads as the client receives them. Usage is noted (and dropped if the client did
        not ask for it); an error payload ends the call (``call.failure``), so that the hub sends
        its one final error event after what came before it."""
        out = []
        markers = _RESPONSE_MARKERS if call.api == "openai.responses" else _USAGE_MARKERS
        for payload in batch:
            if payload == b"[DONE]":  # the end of a chat or completions stream, and of nothing else
                if sse and call.api != "openai.responses":
                    call.finished = True
                elif not sse:
                    _decoded(call, payload)  # an NDJSON line that is not JSON: the engine's fault
                else:  # (a Responses stream ends with its last event: without it, it is cut, and said so)
                    continue
                break
            if (message := engine_error(payload)) is not None:
                call.failure = engine_failure(payload, message)  # after what came before it
                break
            if payload[:1] != b"{":  # (every record's first byte, where a passed-on 'ping' was the client's)
                _decoded(call, payload)
                if call.failure:
                    break
            if any(marker in payload for marker in markers):
                value = _decoded(call, payload)
                if call.failure:
                    break
                value = value if isinstance(value, dict) else {}
                if usage := _usage_of(value):
                    call.usage = usage
                call.finished |= value.get("done") is True or value.get("type") in _RESPONSE_ENDS
                if call.strip_usage and "usage" in value:  # whatever its choices (LiteLLM sends one)
                    if not value.get("choices"):
                        continue
                    del value["usage"]
                    payload = _encode(value)
            if sse and b"\n" in payload:  # an event of several data lines: each line its own again
                payload = payload.replace(b"\n", b"\ndata: ")
            out.append(b"data: " + payload + b"\n\n" if sse else payload + b"\n")
            if call.finished:  # Ollama's "done": true
                break
        return b"".join(out)

    def _translate(self, call: Call, batch: list[bytes], translator: Translator) -> bytes:
        out = []
        for payload in batch:
            if payload == b"[DONE]" and isinstance(translator, OllamaOverOpenAI):  # (an SSE stream's end)
                try:
                    out.append(translator.final(call.usage))
                except _SHAPE_ERRORS as error:
                    call.failure = _unfit(translator.path, error)
                call.finished = True
                break
            if (message := engine_error(payload)) is not None:
                call.failure = engine_failure(payload, message)  # after what came before it
                break
            value = _decoded(call, payload)
            if call.failure:
                break
            try:
                if not isinstance(value, dict):
                    raise TypeError(f"a JSON {type(value).__name__} where an object belongs")
                out.extend(translator.chunk(value))
            except _SHAPE_ERRORS as error:
                call.failure = _unfit(translator.path, error)
                break
            call.usage = _usage_of(value) or call.usage
            if translator.done:
                call.finished = True
                break
        return b"".join(out)


def _compressed(coding: str) -> str:
    return f"the engine's answer is {coding[:40]!r}-encoded, which the worker does not decode (a gateway in front " \
           "of the engine compresses it)"


def _coding(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """An answer's content coding other than identity, or ""."""
    for name, value in headers:
        if name == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return value.decode(errors="replace")
    return ""


def _decoded(call: Call, payload: bytes) -> Any:
    """A streamed record's JSON. One that is not JSON is the engine's fault, not its connection's:
    it ends the call (``call.failure``) after what came before it, and is not generated again elsewhere."""
    try:
        return _decode(payload)
    except (ValueError, RecursionError) as error:
        call.failure = EngineError(502, f"the engine's stream is not JSON ({error})", retryable=False)
        return None


def _names(entries: list[Any], key: str) -> tuple[str, ...]:
    """The model names of a listing's entries; names a hub would refuse (not text, empty, over 256
    characters) are left out, and at most 4,096 kept."""
    names = {name for entry in entries if isinstance(entry, dict)
             and isinstance(name := entry.get(key), str) and 0 < len(name) <= 256}  # a list as a name: left out
    return tuple(sorted(names)[:4096])


_BOM = b"\xef\xbb\xbf"
_USAGE_MARKERS = (b'"usage":{', b'"usage": {', b'"done":true', b'"done": true')
# a Responses stream has no [DONE]: its last event is one of these (the first with its usage)
_RESPONSE_ENDS = ("response.completed", "response.incomplete", "response.failed")
_RESPONSE_MARKERS = tuple(f'"{end}"'.encode() for end in _RESPONSE_ENDS)


def _sse_data(event: bytes) -> bytes | None:
    """An event's ``data``. An error event comes back as ``{"error": ...}``, which ``engine_error``
    reads as the engine's error: llama.cpp server sends a mid-stream error as an ``error:`` field
    (and its ``data: [DONE]`` after it), other servers as ``event: error`` with the error as data."""
    if b"error" in event and (error := _sse_error(event)) is not None:
        return error
    lines = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines and event.startswith(b"{") and engine_error(event) is not None:
        return event  # an error object sent bare, not as an event (a gateway's refusal in a 200 stream)
    return b"\n".join(lines) if lines else None


def _sse_error(event: bytes) -> bytes | None:
    fields = [line.partition(b":") for line in event.split(b"\n")]
    if any(name == b"event" and value.strip() == b"error" for name, _, value in fields):
        fields = [(b"error" if name == b"data" else name, _, value) for name, _, value in fields]
    errors = [value.lstrip(b" ") for name, _, value in fields if name == b"error"]
    if not errors:
        return None
    text = b"\n".join(errors)
    try:
        value = _decode(text)
    except (ValueError, RecursionError):
        value = text.decode(errors="replace")
    if isinstance(value, dict) and value.get("error"):  # already an error object: {"error": {...}}
        return text
    return _encode({"error": value or "engine error"})


async def _records(chunks: AsyncIterator[bytes], separator: bytes, crlf: bool,
                   whole: Callable[[bytes], bool] | None = None) -> AsyncIterator[list[bytes]]:
    """The records of a byte stream, one list per network read, in linear time however long a record
    (each byte is searched about once), and none over ``MAX_RECORD_BYTES``. The last record needs no
    separator, when ``whole`` says it is one. ``crlf``: CRLF and CR line ends count as LF (SSE's three).
    A byte order mark before the first record is no part of it (of an SSE event, of an NDJSON line's
    JSON), however the reads cut it."""
    buffer = bytearray()
    head: bytes | None = b""  # the stream's first bytes, until they show whether a mark begins it
    after_cr = False  # the last read ended in a CR, a line's end: a LF that begins this one is its CRLF's
    async for data in chunks:
        if head is not None:
            head += data
            if len(head) < len(_BOM) and _BOM.startswith(head):
                continue
            data, head = head.removeprefix(_BOM), None
        if crlf:
            if after_cr and data.startswith(b"\n"):
                data = data[1:]
            after_cr = data.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        start = max(0, len(buffer) - len(separator) + 1)
        buffer += data
        records, taken = [], 0
        while (end := buffer.find(separator, start)) != -1:
            records.append(bytes(buffer[taken:end]))
            taken = start = end + len(separator)
        del buffer[:taken]
        if len(buffer) > MAX_RECORD_BYTES:
            raise TooLarge(f"the engine sent a line or event larger than {MAX_RECORD_BYTES} bytes")
        if records:
            yield records
    if buffer.strip() and (whole is None or whole(bytes(buffer))):
        yield [bytes(buffer)]


async def sse_payloads(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """SSE ``data`` payloads, one list per network read. An event is complete at a blank line, or
    at the end of the stream (an engine may end on ``data: [DONE]\n`` alone) when it is whole: one
    cut in the middle is dropped, as the SSE standard says, and the stream's end without a finish is
    the error."""
    async for events in _records(chunks, b"\n\n", crlf=True, whole=_whole_event):
        # (an event of empty data is not one, as the standard says: a bare "data:" failed the answer)
        if batch := [payload for event in events if (payload := _sse_data(event.strip(b"\n")))]:
            yield batch


def _whole_event(event: bytes) -> bool:
    """Whether an event the stream ended in without its blank line is whole (``data: [DONE]\n``),
    not one cut in the middle, which no client could parse."""
    payload = _sse_data(event.strip(b"\n"))
    return payload is None or payload == b"[DONE]" or _whole_line(payload)


def _whole_line(line: bytes) -> bool:
    """Whether a record the stream ended in is whole JSON, not one cut in the middle."""
    try:
        _decode(line)
    except (ValueError, RecursionError):
        return False
    return True


async def ndjson_payloads(chunks: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """NDJSON lines, one list per network read; a last line without its newline counts too, when it
    is whole (one cut in the middle is dropped: the stream's end without ``done`` is the error)."""
    async for lines in _records(chunks, b"\n", crlf=False, whole=_whole_line):
        if batch := [line for line in lines if line.strip()]:
            yield batch
