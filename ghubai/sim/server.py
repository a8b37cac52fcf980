"""An Ollama-compatible engine simulator on h11 + trio: Ollama's native API and its OpenAI layer,
deterministic text on a configurable timetable, failure injection, and ``/sim/stats``."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import unquote

import trio

from ghubai import __version__, dialects
from ghubai.config import split_hostport
from ghubai.errors import ApiError
from ghubai.http11.server import Connection, Request, serve_connection
from ghubai.observability import logs, tracing
from ghubai.sim.generator import EngineFailure, Simulator, embedding, fit, requested_json, requested_tool
from ghubai.sim.shapes import (OllamaChat, OllamaGenerate, OllamaShape, OpenAIChat, OpenAICompletion, OpenAIResponse,
                               Shape)
from ghubai.sockets import open_listeners

log = logging.getLogger("ghubai.sim")


def _body(request: Request) -> dict[str, Any]:
    return dialects.parse_body(request.body or b"{}")


def _text_of(content: Any, dialect: str) -> str:
    """A message's text; a 400 for content its engine refuses: parts (Ollama's is a string) or a
    part whose text is not a string (a translation's mistake must show here, not drop a connection)."""
    if not isinstance(content, list):
        return content if isinstance(content, str) else ""
    texts = [part.get("text", "") for part in content if isinstance(part, dict)]  # OpenAI content parts
    if dialect != "openai" or not all(isinstance(text, str) for text in texts):
        raise ApiError(400, "a message's content must be a string" +
                       (" or content parts with text" if dialect == "openai" else ""))
    return " ".join(texts)


def _prompt(body: dict[str, Any], dialect: str) -> str:
    """The request's text, as the model would read it: the Responses API's ``instructions`` first
    (Ollama's and vLLM's system message)."""
    if isinstance(instructions := body.get("instructions"), str) and instructions:
        return f"{instructions} {_prompt({**body, 'instructions': None}, dialect)}"
    if "messages" in body:
        messages = body["messages"] if isinstance(body["messages"], list) else []
        return " ".join(_text_of(m.get("content"), dialect) for m in messages if isinstance(m, dict))
    if isinstance(inputs := body.get("input"), list):  # the Responses API's items (a role's content)
        return " ".join(_text_of(item.get("content"), dialect) for item in inputs if isinstance(item, dict))
    prompt = body.get("prompt", body.get("input", ""))
    return " ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)


def _options(body: dict[str, Any]) -> dict[str, Any]:
    return body["options"] if isinstance(body.get("options"), dict) else {}


def _limit(body: dict[str, Any], dialect: str) -> int | None:
    """The request's own limit, read as its API names it (Ollama's ``/api/chat`` ignores a
    ``max_tokens``: a translation that forgot to rename it must show here)."""
    if dialect == "ollama":
        return dialects.ollama_limit(_options(body))
    for value in (body.get("max_completion_tokens"), body.get("max_tokens"), body.get("max_output_tokens")):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _stops(body: dict[str, Any], dialect: str) -> tuple[str, ...]:
    """The stop sequences: OpenAI's ``stop`` (a string or a list), Ollama's ``options.stop`` (a list)."""
    stop = body.get("stop") if dialect == "openai" else _options(body).get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    return tuple(item for item in stops if isinstance(item, str) and item)


MAX_BODY_BYTES = 64 << 20  # Ollama sets no limit; a hub may pass 48 MiB on (an image or a few)


class SimServer:
    """The simulator's HTTP face: Ollama's native API and its OpenAI layer, on ``http11.server``.
    Invariant: a generation runs only while its client is connected; one that leaves is cancelled."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.routes: dict[tuple[str, str], Callable[[Connection, Request], Awaitable[None]]] = {
            ("GET", "/"): self.root,
            ("HEAD", "/"): self.root,  # (the ollama command's check that its server runs)
            ("GET", "/api/version"): self.version,
            ("HEAD", "/api/version"): self.version,
            ("GET", "/api/tags"): self.tags,
            ("HEAD", "/api/tags"): self.tags,
            ("GET", "/api/ps"): self.running,
            ("GET", "/v1/models"): self.openai_models,
            ("GET", "/props"): self.props,
            ("GET", "/sim/stats"): self.stats,
            ("POST", "/api/chat"): partial(self.generate, OllamaChat, "ollama"),
            ("POST", "/api/generate"): partial(self.generate, OllamaGenerate, "ollama"),
            ("POST", "/v1/chat/completions"): partial(self.generate, OpenAIChat, "openai"),
            ("POST", "/v1/completions"): partial(self.generate, OpenAICompletion, "openai"),
            ("POST", "/v1/responses"): partial(self.generate, OpenAIResponse, "openai"),
            ("POST", "/api/embed"): self.ollama_embed,
            ("POST", "/api/embeddings"): self.ollama_legacy_embed,
            ("POST", "/api/show"): self.show,
            ("POST", "/v1/embeddings"): self.openai_embed,
        }

    async def handle(self, conn: Connection, request: Request) -> None:
        options = self.sim.options
        route = self.routes.get((request.method, request.path))
        if route is None and request.method == "GET" and request.path.startswith(dialects.MODEL_PATH):
            route = self.openai_model
        logs.request_id(request.header(b"x-request-id"))
        log.debug("%s %s", request.method, request.path)
        try:
            if options.api_key and request.path != "/sim/stats" and \
                    request.header(b"authorization") != f"Bearer {options.api_key}".encode():
                self.sim.stats.refused += 1
                raise ApiError(401, "Invalid API key", code="invalid_api_key")
            if route is None or request.path in options.disabled or (request.path == "/props" and not options.slots):
                self.sim.stats.refused += 1
                if route is None and any(path == request.path for _, path in self.routes):
                    allowed = ", ".join(sorted(method for method, path in self.routes if path == request.path))
                    await conn.respond(405, b"405 method not allowed", "text/plain", headers={"allow": allowed})
                else:
                    await conn.respond(404, b'{"detail":"Not Found"}')  # as a FastAPI shim answers an unknown path
                return
            # an engine that traces, as the last link of a request's trace
            with tracing.span(f"sim {request.method} {request.path}", tracing.carrier(request.headers)):
                await route(conn, request)
        except ApiError as error:
            await conn.respond_error(error, request.path)

    def _model(self, body: dict[str, Any]) -> str:
        """The model asked for, as Ollama finds it (``llama3`` is the ``llama3:latest`` it has, and
        the other way round), named as ``--models`` names it: one model in memory, however asked
        for. (Answers name it as the request did, as Ollama's do.)"""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "model is required")
        models = self.sim.options.models
        if (name := dialects.tagged(model, models.__contains__)) in models:
            return name
        raise ApiError(404, f'model "{model}" not found, try pulling it first')

    def _maybe_fail(self) -> None:
        if self.sim.should_fail():
            self.sim.stats.failed += 1
            raise ApiError(500, "simulated engine failure")

    async def root(self, conn: Connection, request: Request) -> None:
        await conn.respond(200, b"Ollama is running", "text/plain; charset=utf-8")

    async def version(self, conn: Connection, request: Request) -> None:
        await conn.respond_json(200, {"version": f"0.0.0-ghubai-sim-{__version__}"})

    async def props(self, conn: Connection, request: Request) -> None:
        """As llama.cpp server tells its slots (``--slots``)."""
        await conn.respond_json(200, {"total_slots": self.sim.options.slots, "model_path": self.sim.options.models[0],
                                      "chat_template_caps": {"supports_tools": True},
                                      "modalities": {"vision": True, "audio": False}})  # (one with a projector)

    async def stats(self, conn: Connection, request: Request) -> None:
        await conn.respond_json(200, self.sim.stats.as_dict())

    def _listing(self, models: list[str], **extra: Any) -> dict[str, Any]:
        return {"models": [{
            "name": name, "model": name, "modified_at": "2026-01-01T00:00:00Z", "size": 1_000_000,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {"parent_model": "", "format": "gguf", "family": "sim", "families": ["sim"],
                        "parameter_size": "1B", "quantization_level": "Q4_0"}, **extra,
        } for name in models]}

    async def tags(self, conn: Connection, request: Request) -> None:
        await conn.respond_json(200, self._listing(list(self.sim.options.models)))

    async def running(self, conn: Connection, request: Request) -> None:
        """``/api/ps``: the models in memory (every one, unless the simulator has memory)."""
        await conn.respond_json(200, self._listing(self.sim.loaded(), expires_at="2999-01-01T00:00:00Z",
                                                   size=1_500_000, size_vram=1_000_000, context_length=4096))

    @staticmethod
    def _openai_model(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": 0, "owned_by": "library",
                "meta": {"n_params": 1_000_000_000, "size": 1_000_000}}  # (llama.cpp's)

    async def openai_models(self, conn: Connection, request: Request) -> None:
        data = [self._openai_model(name) for name in self.sim.options.models]
        await conn.respond_json(200, {"object": "list", "data": data})

    async def openai_model(self, conn: Connection, request: Request) -> None:
        name = unquote(request.path.removeprefix(dialects.MODEL_PATH))
        self._model({"model": name})
        await conn.respond_json(200, self._openai_model(name))

    async def generate(self, shape_class: type[Shape], dialect: str, conn: Connection, request: Request) -> None:
        body = _body(request)
        model, asked = self._model(body), body["model"]
        self._maybe_fail()
        prompt = _prompt(body, dialect)
        stream = dialect == "ollama" if body.get("stream") is None else body["stream"] is True  # as each API reads it
        if shape_class is OpenAIResponse and body.get("previous_response_id"):  # (vLLM's: by default it stores none)
            raise ApiError(404, f"Response with id '{body['previous_response_id']}' not found.",
                           param="previous_response_id")
        if dialect == "ollama" and (reason := dialects.preload(body, shape_class is OllamaChat)):
            await self.sim.preload(model, reason)  # Ollama loads (or unloads); no generation
            await self._preload(conn, reason, asked, shape_class)
            return
        include_usage = dialects.wants_usage(body)
        generation = self.sim.plan(prompt, _limit(body, dialect), _stops(body, dialect))
        wants_json, schema = requested_json(body, dialect)
        if tool := requested_tool(body):
            generation.answer_with_call(*tool)
        elif wants_json:
            generation.answer_with_json(fit(schema))
        shape = shape_class(asked, generation, include_usage)
        shape.usage_with_choices = self.sim.options.usage_with_choices
        if isinstance(shape, OpenAIResponse):
            shape.echo(body)
        if isinstance(shape, OllamaShape) and body.get("logprobs") is True:
            if type(top := body.get("top_logprobs", 0)) is not int or not 0 <= top <= 20:
                raise ApiError(400, "top_logprobs must be between 0 and 20")  # (as Ollama's)
            shape.top_logprobs = top
        failure: EngineFailure | None = None
        async with trio.open_nursery() as nursery:
            watching = trio.CancelScope()
            nursery.start_soon(conn.watch, nursery.cancel_scope, watching)
            async with contextlib.aclosing(self.sim.run(shape.gen, prompt, model)) as tokens:
                if stream:
                    await conn.start_stream(200, shape.content_type)
                head = shape.head()  # (an OpenAI role chunk comes with the first token, as vLLM's does)
                try:
                    async for token in tokens:
                        if stream:
                            await conn.write(head + shape.token(token))
                            head = b""
                except EngineFailure as error:
                    failure = error
            if stream:
                await conn.write(head + (shape.error(str(failure)) if failure else shape.tail()))
                await conn.finish()
            watching.cancel()
        if not stream:
            if failure:
                raise ApiError(500, str(failure))
            await conn.respond_json(200, shape.whole())

    @staticmethod
    async def _preload(conn: Connection, reason: str, model: str, shape_class: type[Shape]) -> None:
        """What Ollama answers a request with no prompt (no messages): the model loaded, or
        unloaded (``reason``); nothing generated; one JSON object, whatever ``stream`` said."""
        answer: dict[str, Any] = {"model": model, "created_at": "2026-01-01T00:00:00Z", "done": True, "done_reason": reason}
        answer.update({"message": {"role": "assistant", "content": ""}} if shape_class is OllamaChat else {"response": ""})
        await conn.respond_json(200, answer)

    def _embed_inputs(self, body: dict[str, Any], token_ids: bool = False) -> list[str]:
        """The texts to embed; with ``token_ids`` (an OpenAI-compatible engine's), a list of integer
        token ids (or a list of such lists) counts as a text of those numbers."""
        raw = body.get("input", body.get("prompt"))
        items: list[Any] = raw if isinstance(raw, list) else [raw]
        if token_ids:
            items = [" ".join(map(str, item)) if dialects.token_ids(item) else item
                     for item in ([items] if dialects.token_ids(items) else items)]
        if not items or not all(isinstance(item, str) for item in items):
            raise ApiError(400, "input must be a string or a list of strings" + (" or of token ids" if token_ids else ""))
        return items

    async def ollama_embed(self, conn: Connection, request: Request) -> None:
        body = _body(request)
        self._model(body)
        self._maybe_fail()
        inputs = self._embed_inputs(body) if body.get("input") else []  # none: Ollama loads the model, embeds nothing
        vectors = [embedding(text, self._dimensions(body)) for text in inputs]
        await conn.respond_json(200, {"model": body["model"], "embeddings": vectors,
                                      "prompt_eval_count": sum(len(t.split()) for t in inputs)})

    async def show(self, conn: Connection, request: Request) -> None:
        body = _body(request)
        self._model({"model": body.get("model", body.get("name"))})
        await conn.respond_json(200, {
            "modelfile": "# simulated by ghubai sim", "parameters": "num_ctx 4096", "template": "{{ .Prompt }}",
            "details": {"parent_model": "", "format": "gguf", "family": "sim", "families": ["sim"],
                        "parameter_size": "1B", "quantization_level": "Q4_0"},
            "model_info": {"general.architecture": "sim"}, "capabilities": ["completion", "tools"],
            "modified_at": "2026-01-01T00:00:00Z"})

    async def ollama_legacy_embed(self, conn: Connection, request: Request) -> None:
        body = _body(request)
        self._model(body)
        self._maybe_fail()
        if not body.get("prompt"):  # as Ollama: the model loads, and the embedding is empty
            await conn.respond_json(200, {"embedding": []})
            return
        [text] = self._embed_inputs({"input": body["prompt"]})
        await conn.respond_json(200, {"embedding": embedding(text, self.sim.options.embed_dim)})

    def _dimensions(self, body: dict[str, Any]) -> int:
        """``dimensions`` when the request asks for fewer than the model has: its vector cut there and
        normalised again, as Ollama does (``embedding``'s first numbers are the same whatever its length)."""
        wanted = body.get("dimensions")
        if isinstance(wanted, int) and not isinstance(wanted, bool) and 0 < wanted < self.sim.options.embed_dim:
            return wanted
        return self.sim.options.embed_dim

    async def openai_embed(self, conn: Connection, request: Request) -> None:
        body = _body(request)
        self._model(body)
        self._maybe_fail()
        inputs = self._embed_inputs(body, token_ids=True)
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector: Any = embedding(text, self._dimensions(body))
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(len(t.split()) for t in inputs)
        await conn.respond_json(200, {"object": "list", "data": data, "model": body["model"],
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def serve(sim: Simulator, listen: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; reports the bound port through ``task_status``."""
    host, port = split_hostport(listen)
    server = SimServer(sim)
    listeners = await open_listeners(host, port)
    bound = listeners[0].socket.getsockname()[1]
    log.info("simulator serving %s on %s:%d (ttft %s ms, itl %s ms, %d tokens)",
             ",".join(sim.options.models), f"[{host}]" if ":" in host else host, bound, sim.options.ttft_ms,
             sim.options.itl_ms, sim.options.tokens)
    task_status.started(bound)
    await trio.serve_listeners(partial(serve_connection, handle=server.handle, max_body=MAX_BODY_BYTES), listeners)
