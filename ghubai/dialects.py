"""The client-facing shapes of the two APIs the grid speaks, OpenAI's (``/v1``) and Ollama's (``/api``):
request validation, model lists, SSE and NDJSON framing. Errors live in ``ghubai.errors``."""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from ghubai import protocol
from ghubai.errors import ApiError

_decode = msgspec.json.Decoder().decode


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    body = loads(raw, "Request body")
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return body


def loads(raw: bytes, what: str) -> Any:
    """JSON at C speed (msgspec: see scripts/json_choice.py); malformed or hostile JSON — invalid
    UTF-8, NaN, nesting a thousand levels deep — is a 400 naming ``what``, never a 500. A lone UTF-16
    surrogate escape is U+FFFD, as Ollama (Go) reads it: valid JSON that msgspec refuses, and what a
    JavaScript chunker that cut an emoji in two sends (one such text made a whole batch a 400)."""
    try:
        return _decode(raw)
    except msgspec.DecodeError as error:
        if (mended := _mended(raw, str(error))) is not None:
            return loads(mended, what)
        raise ApiError(400, f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, f"{what} is nested too deeply") from None


# a high surrogate's escape without a low one after it, or a low one without a high one before it
_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})|"
                             rb"(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _mended(raw: bytes, error: str) -> bytes | None:
    """``raw`` with its lone surrogates' escapes U+FFFD's, or None when it has none (or the error is
    another). Escaped backslashes are set aside as NULs first, which JSON cannot hold raw, so every
    backslash left starts an escape; no callback per match (a body of escaped backslashes cost seconds)."""
    if not ("surrogate" in error or "truncated" in error) or b"\\u" not in raw or b"\0" in raw:
        return None
    mended = _LONE_SURROGATE.sub(rb"\\ufffd", raw.replace(b"\\\\", b"\0\0")).replace(b"\0\0", b"\\\\")
    return None if mended == raw else mended


def _require(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str, within: str = "") -> None:
    """``body[name]`` is a ``kind``; ``within``: the field ``body`` is, for the error's words."""
    param = f"{within}.{name}" if within else name
    if name not in body:
        raise ApiError(400, f"Missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    value = body[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # JSON true is no int
        raise ApiError(400, f"Invalid type for '{param}': expected {what}", param=param, code="invalid_type")


def _optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str, within: str = "") -> None:
    if body.get(name) is not None:
        _require(body, name, kind, what, within)


def validate_chat(body: dict[str, Any]) -> None:
    """Checks the fields the grid relies on; the engine judges the rest."""
    validate_model(body)
    _require(body, "messages", list, "an array of messages")
    if not body["messages"]:
        raise ApiError(400, "'messages' must contain at least one message", param="messages")
    for index, message in enumerate(body["messages"]):
        _check_message(message, f"messages[{index}]")
    _optional(body, "stream", bool, "a boolean")
    _optional(body, "stream_options", dict, "an object")
    _validate_response_format(body)
    _check_sampling(body)
    for name in ("max_tokens", "max_completion_tokens"):
        _limit(body, name)
    _limit(body, "n")
    _check_choices(body)
    _optional(body, "reasoning_effort", str, "a string such as \"low\"")
    _optional(body, "reasoning", dict, "an object such as {\"effort\": \"low\"}")
    if isinstance(body.get("reasoning"), dict):
        _optional(body["reasoning"], "effort", str, "a string such as \"low\"", "reasoning")


def _check_choices(body: dict[str, Any]) -> None:
    """A chat's tools and logprobs, as OpenAI and vLLM refuse them: an Ollama engine ignored a
    ``tool_choice`` that must call a tool when none was offered, and ``top_logprobs`` without
    ``logprobs``, and answered a 200 with neither."""
    _optional(body, "tools", list, "an array of tools")
    if not all(isinstance(tool, dict) for tool in body.get("tools") or ()):
        raise ApiError(400, "Invalid type for 'tools': expected an array of objects", param="tools",
                       code="invalid_type")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, dict) and choice not in ("none", "auto", "required"):
        raise ApiError(400, "Invalid value for 'tool_choice': expected \"none\", \"auto\", \"required\" or an "
                            "object", param="tool_choice", code="invalid_value")
    if (choice == "required" or isinstance(choice, dict)) and not body.get("tools"):
        raise ApiError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                            "specified", param="tool_choice", code="invalid_value")
    _optional(body, "logprobs", bool, "a boolean")
    _optional(body, "top_logprobs", int, "an integer")
    if body.get("top_logprobs") is not None and body.get("logprobs") is not True:
        raise ApiError(400, "Invalid value for 'top_logprobs': 'logprobs' must be set to true when "
                            "'top_logprobs' is used", param="top_logprobs", code="invalid_value")


def _check_message(message: Any, where: str) -> None:
    """The shapes the worker translates: a role, content as text or parts, tool calls as objects."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(400, f"{where} must be an object with a string 'role'", param=where)
    content = message.get("content")
    if isinstance(content, list):
        for number, part in enumerate(content):
            image = part.get("image_url") if isinstance(part, dict) else None
            if not isinstance(part, dict) or not isinstance(part.get("type"), str) or \
                    (part["type"] == "text" and not isinstance(part.get("text"), str)) or \
                    (part["type"] == "image_url" and not (isinstance(image, dict) and isinstance(image.get("url"), str))):
                raise ApiError(400, f"{where}.content[{number}] must be a content part such as {{\"type\": \"text\", "
                                    f"\"text\": ...}} or {{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}}",
                               param=f"{where}.content")
    elif content is not None and not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string or an array of content parts", param=f"{where}.content")
    calls = message.get("tool_calls")
    if calls is not None and not (isinstance(calls, list) and all(
            isinstance(call, dict) and isinstance(call.get("function"), dict)
            and isinstance(call["function"].get("name"), str) for call in calls)):
        raise ApiError(400, f"{where}.tool_calls must be an array of objects with a 'function' object that has "
                            "a string 'name'", param=f"{where}.tool_calls")
    _check_images(message.get("images"), f"{where}.images")  # Ollama's


def tagged(model: str, serves: Callable[[str], bool]) -> str:
    """The name the grid serves ``model`` under. Ollama lists every model with its tag and takes a
    name without one for ``:latest`` (``llama3.2`` is ``llama3.2:latest``), so clients send the
    short name; it means the tagged one when that is served and the short one itself is not. The
    other way too (clients that add ``:latest``, as Open WebUI's unload): an OpenAI engine's ``x``."""
    if serves(model):
        return model
    if model.endswith(":latest"):
        return short if serves(short := model.removesuffix(":latest")) else model
    if ":" in model.rpartition("/")[2] or not serves(latest := model + ":latest"):
        return model
    return latest


def folded(model: str, names: frozenset[str]) -> str | None:
    """The one name of ``names`` that ``model`` is, letter case aside (``:latest`` as ``tagged``
    reads it), as Ollama finds a model (``ollama run Llama3.2``, a name typed in capitals); None
    when none is, or several are. For a name ``tagged`` finds nothing for: no request served pays."""
    index = _fold_index(names)
    wanted = model.casefold()
    for key in (wanted, wanted.removesuffix(":latest"), wanted + ":latest"):
        if found := index.get(key):
            return found[0] if len(found) == 1 else None
    return None


@functools.lru_cache(maxsize=8)  # (by the set, whose hash Python keeps: a pool's or the proxy's, until it changes)
def _fold_index(names: frozenset[str]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for name in names:
        index.setdefault(name.casefold(), []).append(name)
    return index


# Worker → its engine, on every call: a hub or proxy that hears it is a worker's engine by mistake (its
# port for 11434's), which answered with the grid's own models, and each request went round for good.
ENGINE_CALL_HEADER = "x-ghubai-engine-call"
NOT_AN_ENGINE = "a GhubAi hub or proxy, not an engine: a worker's [engine] url must name the engine itself " \
                "(Ollama listens on 11434)"
ENGINE_LOOP = ApiError(508, f"This is {NOT_AN_ENGINE}", code="loop_detected")

# Proxy → its hubs, on every request and health check: a proxy that hears it is listed as a hub by
# mistake (its own address, or another proxy's), which answered the checks with a hub's summary that it
# forwarded, and each request went round through it again, up to 17 times (a hunt).
PROXY_HOP_HEADER = "x-ghubai-proxy"
PROXY_LOOP = ApiError(508, "This is a GhubAi proxy: a proxy's hubs and registry_url must name hubs and a registry, "
                      "not a proxy (a hub listens on 7197, a registry on 7001)", code="loop_detected")


def unknown_endpoint(method: str, path: str) -> str:
    """A 404's words, with the likeliest slip named: an OpenAI client whose base URL lacks ``/v1``
    asks ``/chat/completions``."""
    said = f"Unknown endpoint: {method} {path}"
    if "/v1" + path in protocol.API_PATHS.values() or path == "/models":
        said += f" (did you mean /v1{path}? an OpenAI client's base_url ends in /v1)"
    return said


# Proxy → hub: another hub could take this request. A hub whose workers of its model all drain then
# answers 503 at once, for the proxy to move on, rather than keep it for their return (a restart).
ELSEWHERE_HEADER = b"x-ghubai-elsewhere"
# Hub → proxy, on such a 503: only the header made the hub refuse it. When no other hub takes the
# request either, the proxy sends it back without the header, and the hub keeps it until they return.
SENT_ON = {"X-GhubAi-Elsewhere": "refused"}
# Hub → proxy, on the 503 of a request that waited its whole ``queue_timeout_s`` for a slot: the
# proxy passes it on rather than queue the request again at another hub (3 hubs sharing one worker
# made a client wait three times the time, and its SDK's retries nine).
WAITED = {"X-GhubAi-Elsewhere": "waited"}
# Hub → proxy and client, on a failure the same request meets again (an answer over max_answer_bytes,
# one longer than timeouts.total_s; not first_token_s, which a model's load may have taken): neither
# passes it on to another hub, nor the openai SDK sends it again (3 hubs x 3 tries, each a whole
# generation, all charged to the key: one call cost 18,000 tokens for a 6,000-token answer).
FINAL = {"X-GhubAi-Elsewhere": "final", "x-should-retry": "false"}


def validate_model(body: dict[str, Any]) -> None:
    _require(body, "model", str, "a string")
    if not body["model"]:
        raise ApiError(400, "'model' must not be empty", param="model")


def validate_completion(body: dict[str, Any]) -> None:
    validate_model(body)
    _require(body, "prompt", (str, list), "a string or an array")
    _optional(body, "stream", bool, "a boolean")
    _optional(body, "stream_options", dict, "an object")  # (a worker reads it: any other was its traceback)
    _validate_response_format(body)  # (and this: a string was a traceback in every worker tried)
    _check_sampling(body)
    _limit(body, "max_tokens", least=0)  # 0 with echo: the prompt's logprobs (vLLM; OpenAI's minimum)
    _limit(body, "n")


def validate_responses(body: dict[str, Any]) -> None:
    """OpenAI's Responses API, which an engine serves itself (vLLM, Ollama since 0.13.3): ``input``
    as a string or an array of items, the engine judges the items (the checks a worker relies on)."""
    validate_model(body)
    _require(body, "input", (str, list), "a string or an array of input items")
    _optional(body, "instructions", str, "a string")
    _optional(body, "stream", bool, "a boolean")
    _check_sampling(body)
    _limit(body, "max_output_tokens")


def _limit(body: dict[str, Any], name: str, least: int = 1) -> None:
    """A token limit, a number of choices or of dimensions, as OpenAI takes one: an integer from 1
    (a chat's 0 would be "no limit" to Ollama; n 0 or 2.0 was one choice)."""
    _optional(body, name, int, "an integer")
    if body.get(name) is not None and body[name] < least:
        raise ApiError(400, f"'{name}' must be at least {least}", param=name)


def _validate_response_format(body: dict[str, Any]) -> None:
    _optional(body, "response_format", dict, "an object such as {\"type\": \"json_object\"}")
    if isinstance(response_format := body.get("response_format"), dict):
        _optional(response_format, "type", str, "a string such as \"json_object\"", "response_format")
        _optional(response_format, "json_schema", dict, "an object with a 'schema'", "response_format")
        if isinstance(response_format.get("json_schema"), dict):
            _optional(response_format["json_schema"], "schema", dict, "a JSON schema object",
                      "response_format.json_schema")


# Ollama's options that llama.cpp's OpenAI API takes under the same names (vLLM ignores them)
LLAMA_NUMBERS = ("repeat_penalty", "typical_p", "mirostat_tau", "mirostat_eta")
LLAMA_INTEGERS = ("repeat_last_n", "mirostat")
# Sampling fields as OpenAI types them (and llama.cpp's, which reach Ollama as its options): one of
# another type reached an Ollama engine as an option it refuses, a 500 there, and so a 502 tried on
# every worker (and again by the SDK's retries). An integer may be sent as 3.0, as vLLM and Ollama take it.
_NUMBERS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "min_p", "repetition_penalty",
            *LLAMA_NUMBERS)
INTEGER_OPTIONS = ("seed", "top_k", *LLAMA_INTEGERS)


def _check_sampling(body: dict[str, Any]) -> None:
    for name in _NUMBERS:
        _optional(body, name, (int, float), "a number")
    for name in INTEGER_OPTIONS:
        _optional(body, name, (int, float), "an integer")
        if isinstance(body.get(name), float) and not body[name].is_integer():
            raise ApiError(400, f"Invalid type for '{name}': expected an integer", param=name, code="invalid_type")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not _strings(stop):
        raise ApiError(400, "Invalid type for 'stop': expected a string or an array of strings", param="stop",
                       code="invalid_type")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# Ollama's options by the type its runners read them as (an integer may be sent as 3.5: Ollama drops
# the fraction); others pass, as Ollama lets them
_OLLAMA_INTEGERS = ("num_keep", "num_predict", "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread",
                    *INTEGER_OPTIONS)
_OLLAMA_NUMBERS = ("top_p", "min_p", "temperature", "presence_penalty", "frequency_penalty", *LLAMA_NUMBERS)


def _check_ollama(body: dict[str, Any]) -> None:
    """What Ollama refuses of a chat's or a generation's ``format`` and ``options`` (an option of the
    wrong type was dropped over an OpenAI engine, and a 500 from Ollama, tried on every worker)."""
    _optional(body, "stream", bool, "a boolean")
    if body.get("format") not in (None, "", "json") and not isinstance(body["format"], dict):
        raise ApiError(400, "'format' must be \"json\" or a JSON schema object", param="format")
    if (think := body.get("think")) is not None and not isinstance(think, bool) and think not in _THINK_LEVELS:
        raise ApiError(400, f"invalid think value: \"{think}\" (must be {_THINK_WORDS})" if isinstance(think, str)
                       else f"think must be a boolean or string ({_THINK_WORDS})", param="think")  # (Ollama's words)
    _check_ollama_options(body)


def _check_ollama_options(body: dict[str, Any], sampling: bool = True) -> None:
    """What Ollama refuses of the ``options`` and ``keep_alive`` that every route of its that runs a
    model takes (embeddings too: a wrong type passed them to Ollama, a 500 tried on every worker).
    ``sampling``: llama.cpp's too (for an embedding, none: Ollama drops them, whatever their type)."""
    _optional(body, "options", dict, "an object")
    options = body.get("options") or {}
    for name in _OLLAMA_INTEGERS + _OLLAMA_NUMBERS:
        if not sampling and name in LLAMA_INTEGERS + LLAMA_NUMBERS:
            continue
        if options.get(name) is not None and (isinstance(options[name], bool)
                                              or not isinstance(options[name], (int, float))):
            kind = "an integer" if name in _OLLAMA_INTEGERS else "a number"
            raise ApiError(400, f"option {name!r} must be {kind}", param=f"options.{name}")
    if options.get("stop") is not None and not _strings(options["stop"]):
        raise ApiError(400, "option 'stop' must be an array of strings", param="options.stop")
    if options.get("use_mmap") is not None and not isinstance(options["use_mmap"], bool):
        raise ApiError(400, "option 'use_mmap' must be a boolean", param="options.use_mmap")
    keep_alive_seconds(body.get("keep_alive"))


_THINK_LEVELS = ("high", "medium", "low", "max")  # (Ollama's ThinkValue: these, true or false)
_THINK_WORDS = '"high", "medium", "low", "max", true, or false'
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)", re.ASCII)  # (one match: linear)
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's ``keep_alive``: seconds as a number, or a Go duration (``"5m"``, ``"1h30m"``, ``"0.0s"``,
    ``"-1"`` or any negative: for ever); None when not given. A 400 as Ollama's for anything else (a
    boolean was read as 0, an unload)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        sign, text = (-1.0, value[1:]) if value.startswith("-") else (1.0, value.removeprefix("+"))
        seconds, at = 0.0, 0
        while len(text) <= 64 and (part := _DURATION.match(text, at)):  # (one part at a time: findall was cubic)
            seconds, at = seconds + float(part[1]) * _UNIT_S[part[2]], part.end()
        if text == "0" or 0 < at == len(text):
            return sign * seconds
        raise ApiError(400, f"time: invalid duration \"{value[:64]}\"", param="keep_alive")
    raise ApiError(400, f"Unsupported type: '{type(value).__name__}' for keep_alive", param="keep_alive")


def validate_ollama_embed(body: dict[str, Any]) -> None:
    """Ollama's ``/api/embed``: ``model``, and a string or array of strings as ``input``. No input
    (missing, "" or []) is valid there: Ollama loads the model and answers no embeddings. Its
    ``truncate`` a boolean, ``dimensions`` an integer (0 or less: the model's own), as Ollama reads them."""
    validate_model(body)
    _check_texts(body)
    _optional(body, "truncate", bool, "a boolean")
    if body.get("dimensions") is not None and type(body["dimensions"]) is not int:
        raise ApiError(400, "Invalid type for 'dimensions': expected an integer", param="dimensions",
                       code="invalid_type")
    _check_ollama_options(body, sampling=False)


def _check_texts(body: dict[str, Any]) -> None:
    inputs = body.get("input")
    if not isinstance(inputs, (str, list, type(None))) or \
            isinstance(inputs, list) and not all(isinstance(item, str) for item in inputs):
        raise ApiError(400, "'input' must be a string or an array of strings", param="input")


def validate_openai_inputs(body: dict[str, Any]) -> None:
    """OpenAI's embeddings: ``input`` as Ollama's, or token ids (an array of integers, or of such
    arrays), which OpenAI-compatible engines take (and LangChain sends)."""
    if body.get("encoding_format") not in (None, "float", "base64"):  # (a list where base64 was asked for)
        raise ApiError(400, "'encoding_format' must be \"float\" or \"base64\"", param="encoding_format")
    _limit(body, "dimensions")  # (0 reached Ollama as "the model's own")
    inputs = body.get("input")
    validate_model(body)
    if isinstance(inputs, list) and inputs and (all(token_ids(item) for item in inputs) or token_ids(inputs)):
        return
    _check_texts(body)
    if not inputs:
        raise ApiError(400, "'input' must be a non-empty string or array of strings", param="input")


def token_ids(value: Any) -> bool:
    """Whether ``value`` is token ids: a non-empty array of integers."""
    return isinstance(value, list) and bool(value) and all(type(item) is int for item in value)


def preload(body: dict[str, Any], chat: bool) -> str:
    """What an Ollama request with nothing to generate asks (no messages for a chat, no prompt
    for a generation): "load" a model, or with ``keep_alive`` 0 "unload" it; "" for a real request."""
    if body.get("messages" if chat else "prompt"):
        return ""
    try:
        return "unload" if keep_alive_seconds(body.get("keep_alive")) == 0 else "load"
    except ApiError:  # (checked at the hub: a simulator or worker asked directly loads)
        return "load"


PRELOADS = ("ollama.chat", "ollama.generate")  # where nothing to generate is a load, or an unload (keep_alive 0)


def unloads(api: str, body: dict[str, Any]) -> bool:
    """Whether a request of ``api`` is an unload (``keep_alive`` 0, nothing to generate): it goes to
    every engine that holds the model, and takes no slot of theirs."""
    return api in PRELOADS and preload(body, api == "ollama.chat") == "unload"


def validate_ollama_embeddings(body: dict[str, Any]) -> None:
    """The legacy ``/api/embeddings``: ``model`` and one ``prompt`` (none, or "": Ollama loads the
    model and answers an empty embedding)."""
    validate_model(body)
    _optional(body, "prompt", str, "a string")
    _check_ollama_options(body, sampling=False)


def validate_ollama_show(body: dict[str, Any]) -> None:
    """``/api/show`` names its model ``model``, or ``name`` (older clients; and the ``ollama`` command,
    which sends ``"model": ""`` beside it, read as Ollama reads it)."""
    if not body.get("model") and isinstance(body.get("name"), str):
        body["model"] = body["name"]
    validate_model(body)


# Ollama's model management, which the grid leaves to each worker's engine: its path (a blob's is
# under /api/blobs/), its method, what it does, and the command an operator runs on a worker instead
MANAGEMENT = {"/api/pull": ("POST", "pull", "ollama pull NAME"), "/api/push": ("POST", "push", "ollama push NAME"),
              "/api/create": ("POST", "create", "ollama create NAME"),
              "/api/copy": ("POST", "copy", "ollama cp SOURCE TARGET"),
              "/api/delete": ("DELETE", "delete", "ollama rm NAME"),
              "/api/blobs/": ("POST", "upload the files of", "ollama create NAME")}


def unmanaged(method: str, path: str) -> ApiError | None:
    """The grid's answer to model management from the request's head alone (a blob upload is a model
    file of gigabytes): a 501 that says where models are managed, and when the grid serves one pulled
    there (a 404 "Unknown endpoint" read as a missing model, and ``ollama run`` ended there); a blob's
    check, a 404 (none is here). None for anything else, and for a pull, which succeeds for a model
    the grid serves: the hub, which knows, answers it."""
    managed = "/api/blobs/" if path.startswith("/api/blobs/") else path
    if managed not in MANAGEMENT or managed == "/api/pull":
        return None
    if managed == "/api/blobs/" and method == "HEAD":
        return ApiError(404, "No such blob here")
    return cannot_manage(managed) if method == MANAGEMENT[managed][0] else None


def cannot_manage(managed: str) -> ApiError:
    """The 501 of a ``MANAGEMENT`` path."""
    _, verb, command = MANAGEMENT[managed]
    return ApiError(501, f"The grid does not {verb} models: run '{command}' on the workers' machines; the grid "
                    "serves what their engines list (within engine.discovery_interval_s, or at once after "
                    "'systemctl reload ghubai-worker')")


def validate_ollama_chat(body: dict[str, Any]) -> None:
    """``messages`` may be left out: a chat with none loads the model (or, ``keep_alive: 0``, unloads it)."""
    validate_model(body)
    _optional(body, "messages", list, "an array of messages")
    for index, message in enumerate(body.get("messages") or ()):
        _check_message(message, f"messages[{index}]")
        if isinstance(message.get("content"), list):  # (Ollama refuses them too)
            raise ApiError(400, f"messages[{index}].content must be a string: Ollama's messages carry images "
                                "in 'images', not content parts", param=f"messages[{index}].content")
    _check_ollama(body)


def validate_ollama_generate(body: dict[str, Any]) -> None:
    validate_model(body)
    _optional(body, "prompt", str, "a string")
    _check_ollama(body)
    _check_images(body.get("images"), "images")  # (a string was an image per character)
    if body.get("raw") is True and (body.get("template") or body.get("system") or body.get("context")):
        raise ApiError(400, "raw mode does not support template, system, or context")  # (Ollama's words)


def _check_images(images: Any, where: str) -> None:
    if images is not None and not (isinstance(images, list) and all(isinstance(image, str) for image in images)):
        raise ApiError(400, f"{where} must be an array of base64 strings", param=where)


def ollama_limit(options: dict[str, Any]) -> int | None:
    """``options.num_predict`` as Ollama's runners read it: a count from 1 (``3.0`` too); -1, -2 and
    0 mean no limit (None)."""
    value = options.get("num_predict")
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1 else None


def wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


MODEL_PATH = "/v1/models/"  # + a model's name: ``GET`` it for ``model_entry``


def model_entry(model: str) -> dict[str, Any]:
    """``GET /v1/models/{model}``, and each entry of the list."""
    return {"id": model, "object": "model", "created": 0, "owned_by": "ghubai"}


def model_list(models: list[str]) -> dict[str, Any]:
    """``GET /v1/models``."""
    return {"object": "list", "data": [model_entry(m) for m in models]}


def ollama_tags(models: list[str], running: bool = False,
                facts: Mapping[str, protocol.ModelFacts] | None = None) -> dict[str, Any]:
    """``GET /api/tags`` (or, ``running``, ``/api/ps``: the models engines hold in memory now), with what
    the workers' engines told of each (``facts``: sizes, digest, details, and in memory its size
    there, the part in VRAM and its context length, which ``ollama ps`` prints). A model no engine told
    of (a vLLM's, say) gets size 0 and a digest that stands in, 64 hex digits from the name
    (the same at every hub and proxy): Ollama's CLI prints a digest's first 12 characters, and an empty
    one made ``ollama list`` and ``ollama ps`` panic. An engine keeps a model in memory for its
    ``keep_alive`` after each request, on each worker: the grid says none expires."""
    return {"models": [_tag(model, (facts or {}).get(model) or protocol.ModelFacts(), running) for model in models]}


UNDATED = "1970-01-01T00:00:00Z"  # a model list's date of a model no engine dated (read back as none)


def facts_of(entries: list[Any], running: bool = False) -> dict[str, protocol.ModelFacts]:
    """What the entries of an Ollama ``/api/tags`` (or, ``running``, ``/api/ps``, whose ``size`` is the
    model's in memory) tell of each model, by name; an entry whose figures are not of their types (or
    too long) tells nothing. (What Ollama's clients could not read is left out as they are told:
    ``_tag``.)"""
    fields = {"size": "memory", "size_vram": "size_vram", "context_length": "context_length"} if running else \
        {"size": "size"}
    fields |= {"digest": "digest", "modified_at": "modified_at", "details": "details"}
    told = {}
    for entry in entries[:protocol.MAX_MODELS]:
        if isinstance(entry, dict) and isinstance(name := entry.get("name"), str) and \
                0 < len(name) <= protocol.MAX_MODEL_NAME:
            try:
                told[name] = msgspec.convert({ours: entry[theirs] for theirs, ours in fields.items()
                                              if entry.get(theirs) not in (None, UNDATED)}, protocol.ModelFacts)
            except msgspec.ValidationError:
                continue
    return told


def facts_of_meta(entries: list[Any]) -> dict[str, protocol.ModelFacts]:
    """What llama.cpp's ``/v1/models`` tells of each model in its ``meta`` (its file's size, its
    parameters), as Ollama's lists say them; entries without one tell nothing."""
    told = {}
    for entry in entries[:protocol.MAX_MODELS]:
        meta = entry.get("meta") if isinstance(entry, dict) else None
        name = entry.get("id") if isinstance(entry, dict) else None
        if not (isinstance(meta, dict) and isinstance(name, str) and 0 < len(name) <= protocol.MAX_MODEL_NAME):
            continue
        size, params = meta.get("size"), meta.get("n_params")
        params = params if type(params) is int and 0 < params <= MAX_SIZE else 0  # (10**400 overflowed: a hunt)
        count = f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M" if params else ""
        told[name] = protocol.ModelFacts(size=size if type(size) is int and 0 <= size <= MAX_SIZE else 0,
                                         details=protocol.ModelDetails(format="gguf", parameter_size=count))
    return told


# What Ollama's clients can read of a model list (a hunt: an engine's, or an older worker's, figures reached
# them as they were, and one entry broke the whole list): sizes that fit Go's int64, a digest of which the CLI
# prints the first 12 characters (a shorter one made `ollama ps` panic), a date Go's time.Time reads
MAX_SIZE = 2**63 - 1
_DIGEST = re.compile(r"(?:sha256:)?[0-9a-f]{12,64}")
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)")


def _fits(size: int) -> int:
    return size if size <= MAX_SIZE else 0


def _tag(model: str, facts: protocol.ModelFacts, running: bool) -> dict[str, Any]:
    """A model's entry in an Ollama list: what its engine told that the clients can read, else stand-ins.
    A model in memory whose engine tells not how much (an OpenAI-compatible one) is its size, all in
    the GPU's: ``ollama ps`` said "0 B" and "100% CPU" of a vLLM model."""
    details = {} if facts.details is None else msgspec.structs.asdict(facts.details)
    entry = {"name": model, "model": model,
             "modified_at": facts.modified_at if _RFC3339.fullmatch(facts.modified_at) else UNDATED,
             "size": _fits(facts.memory if running and facts.memory else facts.size),
             "digest": facts.digest if _DIGEST.fullmatch(facts.digest) else hashlib.sha256(model.encode()).hexdigest(),
             "details": details}
    if running:
        entry.update({"expires_at": "2999-01-01T00:00:00Z",
                      "size_vram": _fits(facts.size_vram if facts.memory else facts.size),
                      **({"context_length": _fits(facts.context_length)} if facts.context_length else {})})
    return entry


# What ``/api/version`` answers: the Ollama release whose API the hub serves (tools and streamed tool
# calls, structured outputs, /api/embed, thinking passed through), so that clients which gate features
# on Ollama's version use them. GhubAi's own version is on /health and in X-GhubAi-Version.
OLLAMA_API_VERSION = "0.9.0"

SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def whole_events(held: bytearray, data: bytes, boundary: bytes) -> bytes:
    """The whole events (SSE, NDJSON lines) of ``held`` + ``data``, up to the last ``boundary``; the
    start of the next stays in ``held``, so that an error event after an answer cut mid-event is
    never glued onto half an event (a client could parse neither). Each byte is searched once,
    however many pieces one huge event takes."""
    if not held and data.endswith(boundary):
        return data  # the usual read: whole events, nothing held, nothing copied
    seam = max(0, len(held) - len(boundary) + 1)  # a boundary may straddle the old and the new bytes
    held += data
    end = held.rfind(boundary, seam)
    if end < 0:
        return b""
    end += len(boundary)
    whole = bytes(held[:end])
    del held[:end]
    return whole
