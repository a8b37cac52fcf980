"""Every API over every engine kind: the worker translates between OpenAI's and Ollama's APIs.

``OllamaOverOpenAI``: an ``ollama.*`` request for an OpenAI-compatible engine (llama.cpp server, vLLM,
LM Studio) becomes a ``/v1`` request, and the answer Ollama JSON or NDJSON with the counts Ollama
clients expect. ``OpenAIOverOllama``: an ``openai.*`` request for Ollama goes to its native API, and
the answer becomes OpenAI JSON or SSE. Options, ``format``/``response_format``, tools and images map
both ways; tool-call arguments are a JSON string on OpenAI's side and an object on Ollama's.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any

import msgspec

from ghubai import dialects, protocol

_encode = msgspec.json.Encoder().encode  # C speed; its strings come from msgspec, so no lone surrogates

_SAME_OPTIONS = ("temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty")
_ENGINE_OPTIONS = ("top_k", "min_p")  # Ollama options that llama.cpp's and vLLM's OpenAI APIs take too
# and those llama.cpp's takes under Ollama's names (vLLM ignores them, but takes ``repetition_penalty``)
_LLAMA_OPTIONS = (*dialects.LLAMA_NUMBERS, *dialects.LLAMA_INTEGERS)
PROGRESS_S = 1.0  # at most one sign of life a second while an engine writes what a client does not see yet
# OpenAI's reasoning efforts as Ollama's ``think``, as Ollama's own OpenAI layer maps them
_THINK: dict[str, bool | str] = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high",
                                 "max": "max", "xhigh": "max", "ultra": "max"}
_EFFORT = {"max": "high"}  # Ollama's think levels past OpenAI's (vLLM takes low, medium and high), as Ollama maps it


_HOLE = "\x00text\x00"  # where a template's text goes (no answer holds a NUL between two words "text")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class _Pulse:
    """Signs of life while an engine writes what a client does not see yet: at most one per
    ``PROGRESS_S``. Without them the hub takes the worker's silence for a stalled engine and cuts
    the answer at its ``idle_s`` (``first_token_s`` before any text)."""
    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = -PROGRESS_S  # when the last went out

    def due(self) -> bool:
        """Whether one may go out now (and if so, it is taken to have gone)."""
        now = time.monotonic()
        if now - self.at < PROGRESS_S:
            return False
        self.at = now
        return True


def _line(value: dict[str, Any]) -> bytes:
    """An NDJSON line, U+2028 and U+2029 escaped as Ollama's (Go's encoding/json) are, and U+0085 too:
    the ollama SDK splits lines as ``str.splitlines`` does (httpx), and cut a line at one of them (a
    JSONDecodeError for any text with one, as llama.cpp and vLLM write them raw)."""
    line = _encode(value)
    if b"\xe2\x80" in line:  # (their first two bytes, shared with dashes and quotes: rarely more)
        line = line.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")
    if b"\xc2\x85" in line:
        line = line.replace(b"\xc2\x85", b"\\u0085")
    return line + b"\n"


def count(value: Any) -> int:
    """A token count as an engine reported it: a non-negative int, whatever it sent (an engine's
    -1, a float, text or null must not fail an answer that otherwise arrived)."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError, OverflowError):
        return 0


def _text(value: Any) -> str:
    """An engine's answer text ("" for none); TypeError for anything else, which the worker reports
    as an answer that does not fit the engine's API rather than pass it on to a client."""
    if value is None or isinstance(value, str):
        return value or ""
    raise TypeError(f"answer text of type {type(value).__name__}")


def _call_id(call: dict[str, Any]) -> str | None:
    """A tool call's id, when it has one that is text."""
    return call["id"] if isinstance(call.get("id"), str) and call["id"] else None


def _dimensions(body: dict[str, Any]) -> dict[str, int]:
    """An embedding request's ``dimensions``, which both APIs take, when it names some (Ollama reads
    0 or less as the model's own size, which OpenAI's API refuses: then none)."""
    dimensions = body.get("dimensions")
    return {"dimensions": dimensions} if type(dimensions) is int and dimensions > 0 else {}


def _in_order(data: Any) -> list[Any]:
    """An OpenAI embeddings answer's items in the order of the inputs: each says its ``index``, and
    a client reads that, not the list's order (an engine's out-of-order answer gave Ollama clients
    each other's vectors)."""
    if not isinstance(data, list):
        return []
    if all(isinstance(item, dict) and type(item.get("index")) is int for item in data):
        return sorted(data, key=lambda item: item["index"])
    return data


def _reasoned(thinking: str) -> dict[str, str]:
    """A thinking model's thinking in an OpenAI message or delta, under both names clients read:
    ``reasoning`` (Ollama's own OpenAI layer, vLLM since 0.11, OpenRouter) and ``reasoning_content``
    (llama.cpp, DeepSeek, vLLM before, LiteLLM's readers), as vLLM sent it during its rename: one
    model served by an Ollama worker and by a llama.cpp one then reads the same to its clients."""
    return {"reasoning": thinking, "reasoning_content": thinking}


def _reasoning(message: dict[str, Any]) -> Any:
    """The reasoning an OpenAI message or delta carries: ``reasoning`` (Ollama's and OpenRouter's
    name) or ``reasoning_content`` (vLLM's, llama.cpp's, DeepSeek's)."""
    return message.get("reasoning") or message.get("reasoning_content")


# an image's type by its first bytes (a WebP's RIFF header names it at bytes 8 to 12)
_IMAGE_TYPES = {b"\x89PNG": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF8": "image/gif", b"WEBP": "image/webp"}
# what Ollama's own OpenAI layer takes as an image's data: URL ("": unadorned base64)
_OLLAMA_IMAGE_TYPES = frozenset({"", "image/jpeg", "image/jpg", "image/png", "image/webp"})


def _image_url(image: str) -> str:
    """An Ollama image (base64 bytes) as an OpenAI data: URL, typed by its first bytes: an engine
    that trusts the type (LiteLLM passes it on to providers that check it) must not be told every
    image is a PNG. Unknown bytes are called PNG, as before."""
    try:
        head = base64.b64decode(image[:16])  # 12 bytes: 16 characters are whole base64 groups
    except ValueError:  # (not base64 at all: the engine says so)
        head = b""
    head = head[8:12] if head.startswith(b"RIFF") else head
    kind = next((kind for start, kind in _IMAGE_TYPES.items() if head.startswith(start)), "image/png")
    return f"data:{kind};base64,{image}"


def _ollama_logprobs(logprobs: Any) -> list[dict[str, Any]] | None:
    """An OpenAI choice's logprobs as Ollama's (``[{token, logprob, top_logprobs: [{token,
    logprob}]}]``): a chat's ``content`` list, or a completion's parallel lists. Entries without a
    text token and a numeric logprob are left out (the ollama SDK refuses a whole answer for one)."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(content := logprobs.get("content"), list):
        pairs = [(entry.get("token"), entry.get("logprob"),
                  [(top.get("token"), top.get("logprob")) for top in entry.get("top_logprobs") or []
                   if isinstance(top, dict)]) for entry in content if isinstance(entry, dict)]
    else:
        tokens, chosen = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if not (isinstance(tokens, list) and isinstance(chosen, list)):
            return None
        tops = logprobs["top_logprobs"] if isinstance(logprobs.get("top_logprobs"), list) else []
        tops = [list(top.items()) if isinstance(top, dict) else [] for top in tops] + [[]] * len(tokens)
        pairs = list(zip(tokens, chosen, tops))
    return [{"token": token, "logprob": logprob,
             "top_logprobs": [{"token": other, "logprob": value} for other, value in top if _logprob(other, value)]}
            for token, logprob, top in pairs if _logprob(token, logprob)]


def _token_logprob(entry: dict[str, Any]) -> dict[str, Any]:
    """One of Ollama's token logprobs as OpenAI's, which always carries the token's bytes: Ollama's
    own (a token that is part of a character is U+FFFD as text, its bytes exact), else its text's."""
    given = entry.get("bytes")
    exact = isinstance(given, list) and all(type(byte) is int and 0 <= byte < 256 for byte in given)
    return {"token": entry["token"], "logprob": entry["logprob"],
            "bytes": given if exact else list(entry["token"].encode())}


def _logprob(token: Any, logprob: Any) -> bool:
    return isinstance(token, str) and isinstance(logprob, int | float) and not isinstance(logprob, bool)


def _message(message: dict[str, Any], number: int) -> dict[str, Any]:
    """An Ollama message (the ``number``-th) as OpenAI's: images become content parts, tool-call
    arguments a string, thinking both ``reasoning_content`` (what llama.cpp's templates read back)
    and ``reasoning`` (vLLM's name since 0.11; it drops the other unread), and
    each tool call keeps its id, or gets one unique in the conversation: 9 letters and digits, the
    form Mistral's templates demand (vLLM refuses others for those models)."""
    converted: dict[str, Any] = {"role": message.get("role", "user"), "content": message.get("content", "")}
    if message.get("images"):
        converted["content"] = [{"type": "text", "text": converted["content"]}] + [
            {"type": "image_url", "image_url": {"url": _image_url(str(image))}} for image in message["images"]]
    if isinstance(thinking := message.get("thinking"), str) and thinking:
        converted["reasoning"] = converted["reasoning_content"] = thinking
    if message.get("tool_calls"):
        converted["tool_calls"] = [
            {"id": _call_id(call) or f"c{number:04d}{index:04d}",
             "type": "function",
             "function": {"name": call["function"]["name"],
                          "arguments": _encode(call["function"].get("arguments", {})).decode()}}
            for index, call in enumerate(message["tool_calls"])]
    if isinstance(message.get("tool_call_id"), str):
        converted["tool_call_id"] = message["tool_call_id"]
    return converted


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's. An Ollama tool result names no call (at most its tool, as
    ``tool_name``); OpenAI's must (``tool_call_id``): each gets the id of the call it answers, the
    one with its tool's name, else the next unanswered one."""
    converted: list[dict[str, Any]] = []
    unanswered: list[tuple[str, str]] = []  # (id, tool name) of the last assistant's calls
    for number, message in enumerate(m for m in messages if isinstance(m, dict)):
        out = _message(message, number)
        if out.get("tool_calls"):
            unanswered = [(call["id"], call["function"]["name"]) for call in out["tool_calls"]]
        elif out["role"] == "tool" and "tool_call_id" not in out and unanswered:
            named = [at for at, (_, name) in enumerate(unanswered) if name == message.get("tool_name")]
            out["tool_call_id"] = unanswered.pop(named[0] if named else 0)[0]
        converted.append(out)
    return converted


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's tool calls as Ollama's: the arguments string becomes an object; ids are kept."""
    converted = []
    for call in calls:
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        if isinstance(arguments, str | bytes):  # an object (as some clients send) is already what Ollama wants
            try:
                arguments = msgspec.json.decode(arguments)
            except (msgspec.DecodeError, RecursionError):  # (a lone surrogate too: it could not be sent on)
                pass
        out: dict[str, Any] = {"function": {"name": function.get("name", ""), "arguments": arguments}}
        if call_id := _call_id(call):
            out["id"] = call_id
        converted.append(out)
    return converted


def _name_of(tool: Any) -> Any:
    """The function a tool or a tool choice names (``{"function": {"name"}}``, or flat ``{"name"}``)."""
    if not isinstance(tool, dict):
        return None
    function = tool.get("function", tool)
    return function.get("name") if isinstance(function, dict) else None


def _chosen(tools: Any, choice: Any) -> Any:
    """The tools an Ollama engine is offered: function tools only (Ollama knows no other type), and
    of them only those a ``tool_choice`` allows: the one it names, or its ``allowed_tools`` (Ollama
    cannot be made to call one, but it can be left no other; offered the rest, a model could call a
    tool its client excluded). A choice that names no tool the request defines is refused, as
    OpenAI and vLLM refuse it."""
    if not isinstance(tools, list):
        return tools
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type", "function") != "function":
            raise Untranslatable(f"an Ollama engine takes function tools only, not {str(tool.get('type'))[:40]!r} "
                                 "tools: an OpenAI-compatible engine may take them")
    if not isinstance(choice, dict):
        return tools
    if choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        listed = allowed.get("tools") if isinstance(allowed, dict) else None
        names = [_name_of(tool) for tool in listed] if isinstance(listed, list) else []
    elif choice.get("type", "function") == "function":
        names = [_name_of(choice)]
    else:
        raise Untranslatable(f"an Ollama engine takes no tool_choice of type {str(choice.get('type'))[:40]!r}")
    offered = [tool for tool in tools if isinstance(name := _name_of(tool), str) and name in names]
    if not offered:
        raise Untranslatable(f"tool_choice names no function that tools defines ({str(names)[:200]})")
    return offered


def _answered_calls(calls: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """An engine's tool calls for an Ollama client, and the text of those it cannot take. Ollama's
    arguments are always an object (the ``ollama`` SDK refuses anything else, and loses a whole
    stream for it); a call cut by ``max_tokens`` or garbled by a small model is not a call, so it
    reaches the client as the text the model wrote."""
    good: list[dict[str, Any]] = []
    text: list[str] = []
    for call, converted in zip(calls, _tool_calls(calls)):
        if isinstance(converted["function"]["arguments"], dict):
            # numbered, as Ollama's always are: Open WebUI merges calls by index, and two without one
            # were one call named "get_weathersearch" with two objects glued as its arguments
            converted["function"] = {"index": len(good), **converted["function"]}
            good.append(converted)
        else:  # as the engine gave them, not as they decoded ('"x"' is no object either)
            raw = (call.get("function") or {}).get("arguments")
            raw = raw if isinstance(raw, str) else _encode(raw).decode()
            text.append(f'{{"name": {_encode(converted["function"]["name"]).decode()}, "arguments": {raw}}}')
    return good, "\n".join(text)


@dataclass
class _StreamedCall:
    """A tool call an engine streams in pieces, joined once at its end (joining each piece as it
    comes copies the whole so far each time: a long argument took seconds)."""
    id: str | None = None
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)


class OllamaOverOpenAI:
    """An ``ollama.*`` request for an OpenAI-compatible engine, and its answer back in Ollama's
    shapes. One per request: it keeps the stream's state (model, finish reason, tool calls so far).
    Invariant: ``request`` is called first and once. A generation goes to the engine's chat API, where
    the model's template applies as Ollama applies it (its ``/v1/completions`` applies none: an
    instruct model continued the prompt, and vLLM stopped at 16 tokens); a ``raw`` one goes there."""
    PATHS = {"ollama.chat": "/v1/chat/completions", "ollama.generate": "/v1/chat/completions",
             "ollama.embed": "/v1/embeddings", "ollama.embeddings": "/v1/embeddings", "ollama.show": "/v1/models"}
    done = False  # the engine's own [DONE] ends these streams

    def __init__(self, api: str, capabilities: tuple[str, ...] = ("completion",)) -> None:
        self.api = api
        self.path = self.PATHS[api]
        self.capabilities = capabilities  # for /api/show (tools, vision: Ollama's clients read them)
        self.model = ""
        self.finish_reason = "stop"
        self.calls: dict[int, _StreamedCall] = {}  # streamed tool calls, assembled by index
        self.calls_size = 0
        self.progress = _Pulse()  # empty lines while the engine writes a tool call
        self.preload = ""  # "load" or "unload": a request with nothing to generate, answered here
        self.started_ns = time.monotonic_ns()  # for Ollama's durations, which clients divide counts by
        self.first_ns = 0  # when the first chunk came: the prompt was evaluated by then
        self.timings: Any = None  # llama.cpp's own account of the answer's time, when it gave one
        self.thinks = True  # False: the client said ``think: false``, and gets no thinking

    @staticmethod
    def method(api: str) -> str:
        return "GET" if api == "ollama.show" else "POST"

    def request(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        self.model = str(body.get("model", ""))
        if self.api in ("ollama.embed", "ollama.embeddings") and \
                not body.get("input" if self.api == "ollama.embed" else "prompt"):
            self.preload = "load"  # nothing to embed: Ollama loads the model and answers no embeddings
            return {}
        if self.api == "ollama.embed":
            return {"model": self.model, "input": body.get("input", ""), **_dimensions(body)}
        if self.api == "ollama.embeddings":  # the legacy form: one prompt, one vector
            return {"model": self.model, "input": str(body.get("prompt", ""))}
        options: dict[str, Any] = body["options"] if isinstance(body.get("options"), dict) else {}
        request: dict[str, Any] = {"model": self.model, "stream": stream}
        request.update({name: int(options[name]) if name in dialects.INTEGER_OPTIONS else options[name]  # (as Ollama)
                        for name in (*_SAME_OPTIONS, *_ENGINE_OPTIONS, *_LLAMA_OPTIONS)
                        if options.get(name) is not None})
        if "repeat_penalty" in request:
            request["repetition_penalty"] = request["repeat_penalty"]
        if self.api == "ollama.generate" and body.get("raw"):
            self.path = "/v1/completions"
            request["max_tokens"] = None  # no limit, as Ollama's default: vLLM's completions stop at 16
        if self.chat and isinstance(think := body.get("think"), str):  # a level (gpt-oss)
            request["reasoning_effort"] = _EFFORT.get(think, think)
        elif self.chat and think is False:  # (true is a thinking model's default)
            # no OpenAI word for it: vLLM's, llama.cpp's and SGLang's way to a Qwen3-like template's
            request["chat_template_kwargs"] = {"enable_thinking": False}
            self.thinks = False  # and what an engine thinks anyway (gpt-oss cannot stop) is not passed on
        if (limit := dialects.ollama_limit(options)) is not None:
            request["max_tokens"] = limit
        if body.get("logprobs") is True:  # (a chat's: a flag and a count; a completion's: the count)
            top = body.get("top_logprobs") if type(body.get("top_logprobs")) is int else 0
            request.update({"logprobs": True, "top_logprobs": top} if self.chat else {"logprobs": top})
        if stream:
            request["stream_options"] = {"include_usage": True}
        if body.get("format") == "json":
            request["response_format"] = {"type": "json_object"}
        elif isinstance(body.get("format"), dict):
            request["response_format"] = {"type": "json_schema",
                                          "json_schema": {"name": "response", "schema": body["format"]}}
        if self.api != "ollama.show" and (preload := dialects.preload(body, self.api == "ollama.chat")):
            self.preload = preload  # Ollama's way to load a model, or to unload it: nothing to generate
            return request
        if self.api == "ollama.chat":
            request["messages"] = _messages(body.get("messages") or [])
            if body.get("tools"):
                request["tools"] = body["tools"]
        else:
            if body.get("suffix"):
                raise Untranslatable("suffix (fill in the middle) on /api/generate needs an Ollama engine")
            if body.get("images") and not self.chat:
                raise Untranslatable("images on a raw /api/generate need an Ollama engine (an OpenAI-compatible "
                                     "engine's /v1/completions takes none): send them without raw")
            if body.get("context"):  # (an answer from such an engine has none to send back)
                raise Untranslatable("context (an earlier answer's tokens) on /api/generate needs an Ollama "
                                     "engine: send the conversation to /api/chat as messages")
            if body.get("template"):
                raise Untranslatable("a template on /api/generate needs an Ollama engine: send the prompt "
                                     "as the template would make it, with raw")
            prompt, system = str(body.get("prompt", "")), str(body.get("system") or "")
            if self.chat:
                request["messages"] = _messages([*([{"role": "system", "content": system}] if system else []),
                                                 {"role": "user", "content": prompt, "images": body.get("images")}])
            else:
                request["prompt"] = f"{system}\n\n{prompt}" if system else prompt
        return request

    @property
    def chat(self) -> bool:
        """The engine is asked its chat API (a chat, or a generation that is not raw)."""
        return self.path == "/v1/chat/completions"

    def preloaded(self, stream: bool) -> bytes:
        """The answer to a load or unload (``preload``), as Ollama gives it: an engine behind its
        OpenAI API loads on demand, and would generate from an empty prompt (or refuse to embed nothing)."""
        if self.api == "ollama.embed":
            return _encode({"model": self.model, "embeddings": []})
        if self.api == "ollama.embeddings":
            return _encode({"embedding": []})
        answer = {**self._answer(""), "done": True, "done_reason": self.preload}
        return _line(answer) if stream else _encode(answer)

    def _counts(self, usage: dict[str, int] | None) -> dict[str, Any]:
        """The last line's counts, and Ollama's durations in nanoseconds: llama.cpp's ``timings``
        where it sent them, else as this worker saw them (a client's tokens per second divides
        ``eval_count`` by one; a whole answer from another engine counts all its time as generating)."""
        now = time.monotonic_ns()
        first = self.first_ns or self.started_ns
        prompt_ns, eval_ns = first - self.started_ns, now - first
        timings = self.timings if isinstance(self.timings, dict) else {}
        told: list[Any] = [timings.get(name) for name in ("prompt_ms", "predicted_ms")]
        if all(type(ms) in (int, float) and 0 <= ms < 1e12 for ms in told):  # (a hunt: 10**400 overflowed)
            prompt_ns, eval_ns = (int(ms * 1e6) for ms in told)
        durations = self._durations(now)  # (never less than its parts: an engine's clock is not ours)
        durations["total_duration"] = max(durations["total_duration"], prompt_ns + eval_ns)
        # a whole answer without timings does not say when its prompt was read: no duration, as Ollama
        # leaves out one it has not (a nanosecond made clients print a billion tokens a second)
        prompt = {"prompt_eval_duration": prompt_ns} if prompt_ns > 0 else {}
        return {"done": True, "done_reason": "length" if self.finish_reason == "length" else "stop",
                **durations, "prompt_eval_count": (usage or {}).get("prompt_tokens", 0), **prompt,
                "eval_count": (usage or {}).get("completion_tokens", 0), "eval_duration": max(1, eval_ns)}

    def _durations(self, now: int) -> dict[str, int]:
        return {"total_duration": max(1, now - self.started_ns), "load_duration": 0}

    def _answer(self, text: str, logprobs: Any = None, **extra: Any) -> dict[str, Any]:
        """An Ollama line of ``text``, with ``logprobs`` as the engine gave them, in Ollama's shape."""
        base: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if logprobs and (converted := _ollama_logprobs(logprobs)):
            base["logprobs"] = converted
        if self.api == "ollama.chat":
            return {**base, "message": {"role": "assistant", "content": text, **extra}}
        return {**base, "response": text, **extra}  # (a generation's thinking is beside its response)

    def chunk(self, value: dict[str, Any]) -> list[bytes]:
        """One streamed OpenAI chunk as NDJSON lines (none for a role-only or usage-only chunk)."""
        self.first_ns = self.first_ns or time.monotonic_ns()
        choices = value.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        if "timings" in value:  # llama.cpp's, on its last chunk (the usage chunk, which the worker asks for)
            self.timings = value["timings"]
        delta = choice.get("delta") or {}
        for position, call in enumerate(delta.get("tool_calls") or []):
            if (index := call.get("index")) is None:
                index = self._unindexed(call, position)
            if type(index) is not int:
                raise TypeError(f"a tool call's index of type {type(index).__name__}")
            assembled = self.calls.setdefault(index, _StreamedCall())
            function = call.get("function") or {}
            name, arguments = _text(function.get("name")), _text(function.get("arguments"))
            assembled.name.append(name)
            assembled.arguments.append(arguments)
            self.calls_size += len(name) + len(arguments)
            if self.calls_size > protocol.MAX_EVENT_BYTES:
                raise ValueError(f"tool calls larger than {protocol.MAX_EVENT_BYTES} bytes")
            assembled.id = _call_id(call) or assembled.id
        logprobs = choice.get("logprobs")
        if not self.chat:
            text = _text(choice.get("text"))
            return [_line({**self._answer(text, logprobs), "done": False})] if text else []
        text, thinking = _said(delta), _text(_reasoning(delta))
        if thinking and not self.thinks:
            return self._progress() if not text else [_line({**self._answer(text, logprobs), "done": False})]
        if not (text or thinking):
            return self._progress() if delta.get("tool_calls") else []
        extra = {"thinking": thinking} if thinking else {}
        return [_line({**self._answer(text, logprobs, **extra), "done": False})]

    def _unindexed(self, call: dict[str, Any], position: int) -> int:
        """Which call a streamed piece sent without its ``index`` belongs to (Gemini's OpenAI layer
        and mistral.rs send none): a new one when it is not its delta's first, or has another id or a
        name where the last call has one; else the last call's next piece. (All went to call 0: two
        calls became one named ``get_weatherget_time``, and an Ollama client got that text, no call.)"""
        if not self.calls:
            return 0
        last = max(self.calls)
        current, named, piece_id = self.calls[last], _text((call.get("function") or {}).get("name")), _call_id(call)
        new = position > 0 or bool(named and any(current.name)) or \
            bool(piece_id and current.id and piece_id != current.id)
        return last + 1 if new else last

    def _progress(self) -> list[bytes]:
        """An empty line while the engine writes a tool call, which an Ollama client gets whole in the
        last line (a call's arguments can be a whole file that takes minutes to write), or a thinking
        the client turned off (``_Pulse``). Ollama's clients read such a line as nothing new."""
        if not self.progress.due():
            return []
        return [_line({**self._answer(""), "done": False})]

    def final(self, usage: dict[str, int] | None) -> bytes:
        """The last line, when the engine said [DONE]."""
        calls, text = _answered_calls([
            {"id": call.id, "function": {"name": "".join(call.name), "arguments": "".join(call.arguments)}}
            for _, call in sorted(self.calls.items())])
        return _line({**self._answer(text, **({"tool_calls": calls} if calls else {})), **self._counts(usage)})

    def whole(self, value: dict[str, Any], usage: dict[str, int] | None) -> bytes:
        """A non-streamed answer."""
        if self.api == "ollama.embeddings":
            return _encode({"embedding": (_in_order(value.get("data")) or [{}])[0].get("embedding", [])})
        if self.api == "ollama.show":  # an OpenAI engine tells little: what Ollama clients need, mostly empty
            return _encode({"modelfile": "", "parameters": "", "template": "", "model_info": {},
                            "details": {"format": "", "family": "", "parameter_size": "",
                                        "quantization_level": ""},
                            "capabilities": list(self.capabilities),
                            "modified_at": _now()})
        if self.api == "ollama.embed":
            return _encode({"model": self.model, "embeddings": [d["embedding"] for d in _in_order(value.get("data"))],
                            **self._durations(time.monotonic_ns()),
                            "prompt_eval_count": (usage or {}).get("prompt_tokens", 0)})
        choice = (value.get("choices") or [{}])[0]
        self.finish_reason = choice.get("finish_reason") or "stop"
        self.timings = value.get("timings")
        if self.chat:
            message = choice.get("message") or {}
            calls, unparsed = _answered_calls(message.get("tool_calls") or [])
            extra: dict[str, Any] = {"tool_calls": calls} if calls else {}
            if (thinking := _text(_reasoning(message))) and self.thinks:
                extra["thinking"] = thinking
            answer = self._answer("\n".join(filter(None, (_said(message), unparsed))), choice.get("logprobs"), **extra)
        else:
            answer = self._answer(_text(choice.get("text")), choice.get("logprobs"))
        return _encode({**answer, **self._counts(usage)})


def _sse(value: dict[str, Any]) -> bytes:
    return b"data: " + _encode(value) + b"\n\n"


class Untranslatable(ValueError):
    """A request the other API cannot say (a 400 from the worker, which another engine kind may serve)."""


def _base64_image(url: str) -> str:
    """An image part's URL as Ollama's ``images`` take it: the base64 of a ``data:`` URL. A link is
    refused, not fetched: a worker on a GPU machine fetching whatever address a client names would
    be a way into the operator's network (an OpenAI-compatible engine may fetch it: the 400 is
    retryable, so a hub tries such a worker next)."""
    head, comma, data = url.partition(",")
    if not (url.startswith("data:") and comma and head.endswith(";base64")):
        raise Untranslatable("an Ollama engine takes an image as a base64 data: URL "
                             "(data:image/png;base64,...), not a link: send the image's bytes")
    if head[5:-7].lower() not in _OLLAMA_IMAGE_TYPES:  # (Ollama's runner fails them: a 502, tried on every worker)
        raise Untranslatable(f"an Ollama engine takes JPEG, PNG and WebP images, not {head[5:-7][:100]!r}")
    return data


def _said(message: dict[str, Any]) -> str:
    """An OpenAI message's (or delta's) text: its ``content``, else its ``refusal``, where OpenAI puts
    a model's refusal beside a null content (Ollama has no place for it but the content: an Ollama
    client got an empty answer that looked like a normal stop)."""
    return _text(message.get("content")) or _text(message.get("refusal"))


def _ollama_message(message: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI message as Ollama's: content parts become text and base64 images, arguments an
    object, reasoning ``thinking``; ``developer`` (OpenAI's newer name for ``system``) is
    ``system``, the only one Ollama's templates know."""
    role = message.get("role", "user")
    converted: dict[str, Any] = {"role": "system" if role == "developer" else role}
    content = message.get("content")
    if isinstance(content, list):
        parts = [part for part in content if isinstance(part, dict)]
        if unsaid := {str(part.get("type")) for part in parts} - {"text", "refusal", "image_url"}:
            raise Untranslatable(f"an Ollama engine takes text and images, not content parts of type "
                                 f"{', '.join(sorted(unsaid))}")
        # parts apart, as the client wrote them (Ollama makes each part a message, vLLM joins with a line end)
        texts = (part.get("refusal" if part.get("type") == "refusal" else "text") for part in parts)
        converted["content"] = "\n".join(text for text in texts if isinstance(text, str))
        images = [_base64_image(part["image_url"]["url"]) for part in parts if part.get("type") == "image_url"]
        if images:
            converted["images"] = images
    else:
        refusal = message.get("refusal")  # (an SDK's message after a refusal, appended to the history as it came)
        converted["content"] = content or (refusal if isinstance(refusal, str) else "")
    if message.get("tool_calls"):
        converted["tool_calls"] = _tool_calls(message["tool_calls"])
    if isinstance(message.get("tool_call_id"), str):
        converted["tool_call_id"] = message["tool_call_id"]
    if isinstance(thinking := _reasoning(message), str) and thinking:
        converted["thinking"] = thinking
    return converted


def _ollama_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI's messages as Ollama's. An OpenAI tool result names the call it answers
    (``tool_call_id``); Ollama's names the tool (``tool_name``), so it gets the name of that call,
    else the result's own ``name`` (LangChain sends one)."""
    converted: list[dict[str, Any]] = []
    names: dict[str, Any] = {}  # tool-call id → its tool
    for message in (m for m in messages if isinstance(m, dict)):
        out = _ollama_message(message)
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict) and isinstance(call.get("id"), str):
                names[call["id"]] = (call.get("function") or {}).get("name")
        if out["role"] == "tool":
            call_id = message.get("tool_call_id")
            name = names.get(call_id) if isinstance(call_id, str) else None
            if isinstance(name := name or message.get("name"), str):
                out["tool_name"] = name
        converted.append(out)
    return converted




class OpenAIOverOllama:
    """OpenAI's API answered by Ollama's native one, so that ids are unique, usage is exact and an
    error in the middle of a stream reaches the client (Ollama's own OpenAI layer drops it). One per
    request; invariant: ``request`` is called first and once, and ``done`` is set by the last line."""

    PATHS = {"openai.chat": "/api/chat", "openai.completions": "/api/generate", "openai.embeddings": "/api/embed"}

    def __init__(self, api: str) -> None:
        self.api = api
        self.path = self.PATHS[api]
        self.model = ""
        self.include_usage = False
        self.base64 = False
        self.done = False
        self.started = False  # the first chunk, which carries the role, has gone out
        self.index = 0  # tool calls seen so far
        self.thinking = _Pulse()  # comments while a completion's model thinks
        self.logprobs = False  # the client asked for them: every line goes the slow way
        self.text_offset = 0  # where a completion's next token starts in its text (legacy logprobs)
        self.id = ("chatcmpl-" if api == "openai.chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def request(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        self.model = str(body.get("model", ""))
        if self.api == "openai.embeddings":
            self.base64 = body.get("encoding_format") == "base64"
            inputs = body.get("input", "")
            if isinstance(inputs, list) and inputs and not isinstance(inputs[0], str):
                raise Untranslatable("an Ollama engine embeds text, not token ids: send the text")
            return {"model": self.model, "input": inputs, **_dimensions(body)}
        self.include_usage = dialects.wants_usage(body)
        # what it cannot give, it says (not a 200 without it); completions' logprobs is a count
        if type(choices := body.get("n")) is int and choices > 1:
            raise Untranslatable(f"an Ollama engine makes one choice per request, not n = {choices}: "
                                 f"send {choices} requests")
        if body.get("echo") is True:
            raise Untranslatable("an Ollama engine does not echo the prompt")
        response_format = body.get("response_format") or {}
        if response_format.get("type") not in (None, "text", "json_object", "json_schema"):
            raise Untranslatable(f"an Ollama engine takes no response_format of type {response_format['type']!r}")
        options = {name: body[name] for name in (*_SAME_OPTIONS, *_ENGINE_OPTIONS, *_LLAMA_OPTIONS)
                   if body.get(name) is not None}
        if body.get("repetition_penalty") is not None:  # (vLLM's name; sent as the SDKs' extra_body)
            options.setdefault("repeat_penalty", body["repetition_penalty"])
        if isinstance(options.get("stop"), str):
            options["stop"] = [options["stop"]]  # OpenAI takes one string; Ollama's option is a list
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        if limit == 0:  # (a completion's: the prompt echoed with its logprobs, at vLLM)
            raise Untranslatable("an Ollama engine reads num_predict 0 as no limit: an OpenAI-compatible "
                                 "engine answers max_tokens 0")
        if limit is not None:
            options["num_predict"] = limit
        request: dict[str, Any] = {"model": self.model, "stream": stream, "options": options}
        # a chat's logprobs is a switch beside top_logprobs, a completion's the number of alternatives
        if self.api == "openai.chat":
            top, self.logprobs = body.get("top_logprobs"), body.get("logprobs") is True
        else:
            top = body.get("logprobs")
            self.logprobs = type(top) is int
        if self.logprobs:  # (Ollama 0.12.11 and later answer them)
            request.update(logprobs=True, **({"top_logprobs": top} if type(top) is int else {}))
        reasoning = body.get("reasoning")
        effort = reasoning.get("effort") if isinstance(reasoning, dict) else body.get("reasoning_effort")
        if effort and self.api == "openai.chat":  # ("" is unset, as Ollama reads it; completions think not)
            if not isinstance(effort, str) or effort not in _THINK:
                raise Untranslatable(f"reasoning effort {effort!r} is none of {', '.join(_THINK)}")
            request["think"] = _THINK[effort]
        if response_format.get("type") == "json_object":
            request["format"] = "json"
        elif response_format.get("type") == "json_schema":
            request["format"] = (response_format.get("json_schema") or {}).get("schema", "json")
        if self.api == "openai.chat":
            if body.get("functions") is not None or body.get("function_call") is not None:  # (were dropped)
                raise Untranslatable("an Ollama engine takes tools and tool_choice, not functions and function_call "
                                     "(OpenAI's deprecated form of them)")
            request["messages"] = _ollama_messages(body.get("messages", []))
            if body.get("tools") and body.get("tool_choice") != "none":  # Ollama knows no tool_choice: "none" is no tools
                request["tools"] = _chosen(body["tools"], body.get("tool_choice"))
                if body.get("tool_choice") is not None:  # Ollama ignores it; engines that know it use it
                    request["tool_choice"] = body["tool_choice"]
        else:
            prompt = body.get("prompt", "")
            if isinstance(prompt, list):  # OpenAI's batch of prompts, or token ids: Ollama has neither
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise Untranslatable("an Ollama engine takes one text prompt per request, not a list of "
                                         f"{len(prompt)} prompts or token ids: send them one by one")
                prompt = prompt[0]
            if prompt == "":  # (it would be a load: a 200 with nothing, whatever max_tokens asks)
                raise Untranslatable("an Ollama engine generates nothing from an empty prompt (it loads the "
                                     "model): an OpenAI-compatible engine can continue one")
            request["prompt"] = str(prompt)
            if isinstance(body.get("suffix"), str):
                request["suffix"] = body["suffix"]
        return request

    def _logprobs(self, value: dict[str, Any], text: str) -> dict[str, Any] | None:
        """An Ollama line's ``logprobs`` as OpenAI's, for the answer's ``text`` only (Ollama's cover
        the thinking too, which OpenAI's leave out, and a completion's offsets went astray): a chat's
        ``content`` list (with OpenAI's ``bytes``), a completion's parallel lists with each token's
        offset in the text."""
        if not self.logprobs or not text or not isinstance(entries := value.get("logprobs"), list):
            return None
        entries = [entry for entry in entries if isinstance(entry, dict) and _logprob(entry.get("token"),
                                                                                     entry.get("logprob"))]
        covered, first = 0, len(entries)  # the last entries, as many as the text's length takes
        while first and covered < len(text):
            first -= 1
            covered += len(entries[first]["token"])
        entries = entries[first:]
        tops = [[top for top in entry.get("top_logprobs") or [] if isinstance(top, dict) and
                 _logprob(top.get("token"), top.get("logprob"))] for entry in entries]
        if self.api == "openai.chat":
            return {"content": [{**_token_logprob(entry), "top_logprobs": [_token_logprob(top) for top in top_k]}
                                for entry, top_k in zip(entries, tops)]}
        offsets = []
        for entry in entries:
            offsets.append(self.text_offset)
            self.text_offset += len(entry["token"])
        return {"tokens": [entry["token"] for entry in entries],
                "token_logprobs": [entry["logprob"] for entry in entries],
                "top_logprobs": [{top["token"]: top["logprob"] for top in top_k} for top_k in tops],
                "text_offset": offsets}

    def _chunk(self, choice: dict[str, Any], **extra: Any) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.api == "openai.chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice}], **extra}

    def _finish_reason(self, value: dict[str, Any]) -> str:
        """Calls make a stop ``tool_calls``, not a cut: an agent must see that ``max_tokens`` ended the turn."""
        reason = "length" if value.get("done_reason") == "length" else "stop"
        return "tool_calls" if self.index and reason == "stop" else reason

    @staticmethod
    def _usage(value: dict[str, Any]) -> dict[str, int]:
        prompt, completion = count(value.get("prompt_eval_count")), count(value.get("eval_count"))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _openai_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        converted = []
        for call in calls:
            function = call.get("function") or {}
            converted.append({"index": self.index, "id": _call_id(call) or f"call_{uuid.uuid4().hex[:12]}", "type": "function",
                              "function": {"name": function.get("name", ""),
                                           "arguments": _encode(function.get("arguments", {})).decode()}})
            self.index += 1
        return converted

    @staticmethod
    def method(api: str) -> str:
        return "POST"

    def _template(self, choice: dict[str, Any]) -> tuple[bytes, bytes]:
        """The SSE event of a delta, split around its text: a token then costs one small JSON
        encode instead of building and encoding the whole chunk (this is the per-token path)."""
        before, after = _sse(self._chunk({**choice, "finish_reason": None})).split(_encode(_HOLE))
        return before, after

    @cached_property
    def _text_event(self) -> tuple[bytes, bytes]:
        """A text delta's event. Built at a stream's first token, after ``request``: a whole answer
        never needs it."""
        return self._template({"delta": {"content": _HOLE}} if self.api == "openai.chat" else
                              {"text": _HOLE, "logprobs": None})

    @cached_property
    def _reasoning_event(self) -> tuple[bytes, bytes, bytes]:
        """A reasoning delta's event, its text twice (``_reasoned``) with ``content`` empty."""
        before, between, after = _sse(self._chunk({"delta": {"content": "", **_reasoned(_HOLE)},
                                                   "finish_reason": None})).split(_encode(_HOLE))
        return before, between, after

    def chunk(self, value: dict[str, Any]) -> list[bytes]:
        """One Ollama NDJSON line as OpenAI SSE events: the first carries the role, the last the
        finish reason, then the usage if the client asked for it; a thinking model's thinking is
        the deltas' reasoning (``_reasoned``)."""
        message = value.get("message") or {}
        text = message.get("content") if self.api == "openai.chat" else value.get("response")
        if type(text) is not str:  # (the check costs a call only off the per-token path)
            text = _text(text)
        thinking = message.get("thinking")  # (only /api/chat's message has it)
        if self.started and value.get("done") is False and not message.get("tool_calls") and not self.logprobs:
            if text and not thinking:
                before, after = self._text_event
                return [before + _encode(text) + after]
            if thinking and not text and type(thinking) is str:
                before, between, after = self._reasoning_event
                encoded = _encode(thinking)
                return [before + encoded + between + encoded + after]
        out = []
        if self.api == "openai.chat":
            delta: dict[str, Any] = {"content": text}
            if not self.started:
                delta["role"] = "assistant"
            if thinking := _text(thinking):
                delta.update(_reasoned(thinking))
            if message.get("tool_calls"):
                delta.update(content=text or None, tool_calls=self._openai_calls(message["tool_calls"]))
            logprobs = self._logprobs(value, text)
            if delta.get("content") or len(delta) > 1:
                out.append(_sse(self._chunk({"delta": delta, **({"logprobs": logprobs} if logprobs else {}),
                                             "finish_reason": None})))
        elif text:
            out.append(_sse(self._chunk({"text": text, "logprobs": self._logprobs(value, text),
                                         "finish_reason": None})))
        elif value.get("thinking") and self.thinking.due():
            # A completion has no place for thinking, and a model that thinks for minutes sent nothing:
            # the hub cut it at first_token_s. An SSE comment, which clients skip, says it is alive.
            out.append(b": thinking\n\n")
        self.started = True
        if value.get("done") is True:
            self.done = True
            end: dict[str, Any] = {"delta": {}} if self.api == "openai.chat" else {"text": "", "logprobs": None}
            out.append(_sse(self._chunk({**end, "finish_reason": self._finish_reason(value)})))
            if self.include_usage:
                out.append(_sse({**self._chunk({}), "choices": [], "usage": self._usage(value)}))
        return out

    def whole(self, value: dict[str, Any], usage: dict[str, int] | None) -> bytes:
        if self.api == "openai.embeddings":
            vectors = value.get("embeddings", [])
            data = [{"object": "embedding", "index": index,
                     "embedding": base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if self.base64 else v}
                    for index, v in enumerate(vectors)]
            tokens = count(value.get("prompt_eval_count"))
            return _encode({"object": "list", "data": data, "model": self.model,
                            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
        if self.api == "openai.chat":
            message = value.get("message") or {}
            answer: dict[str, Any] = {"role": "assistant", "content": _text(message.get("content"))}
            if thinking := _text(message.get("thinking")):
                answer.update(_reasoned(thinking))
            if message.get("tool_calls"):  # (OpenAI's content beside calls is null, not "")
                calls = self._openai_calls(message["tool_calls"])
                answer.update(content=answer["content"] or None,
                              tool_calls=[{k: v for k, v in call.items() if k != "index"} for call in calls])
            choice: dict[str, Any] = {"message": answer, "logprobs": self._logprobs(value, answer["content"])}
        else:
            text = _text(value.get("response"))
            choice = {"text": text, "logprobs": self._logprobs(value, text)}
        kind = "chat.completion" if self.api == "openai.chat" else "text_completion"
        return _encode({"id": self.id, "object": kind, "created": self.created, "model": self.model,
                        "choices": [{"index": 0, **choice, "finish_reason": self._finish_reason(value)}],
                        "usage": self._usage(value)})


Translator = OllamaOverOpenAI | OpenAIOverOllama


def translator_for(kind: str, api: str, capabilities: tuple[str, ...] = ("completion",)) -> Translator | None:
    """The translation an engine of ``kind`` needs for ``api``; None when it speaks the API itself.
    ``capabilities``: what an OpenAI-compatible engine's models can do, as ``/api/show`` says it."""
    if kind == "openai" and api in OllamaOverOpenAI.PATHS:
        return OllamaOverOpenAI(api, capabilities)
    if kind == "ollama" and api in OpenAIOverOllama.PATHS:
        return OpenAIOverOllama(api)
    return None


def engine_path(kind: str, api: str) -> str:
    """Where an engine of ``kind`` is called for ``api``: its own path, or the one translated to."""
    translated = OllamaOverOpenAI.PATHS if kind == "openai" else OpenAIOverOllama.PATHS
    return translated.get(api) or protocol.API_PATHS[api]
