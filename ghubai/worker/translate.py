"""Ollama's native API answered by an OpenAI-compatible engine (llama.cpp server, vLLM, LM Studio).

The worker turns an ``ollama.chat`` / ``ollama.generate`` / ``ollama.embed`` request into the engine's
``/v1`` request (options, ``format``, tools and images mapped across), and the engine's answer back
into Ollama's JSON or NDJSON lines, with the counts Ollama clients expect in the last line.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

PATHS = {"ollama.chat": "/v1/chat/completions", "ollama.generate": "/v1/completions",
         "ollama.embed": "/v1/embeddings"}
_SAME_OPTIONS = ("temperature", "top_p", "seed", "stop", "frequency_penalty", "presence_penalty")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode() + b"\n"


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """An Ollama message as OpenAI's: images become content parts, tool-call arguments a string."""
    converted: dict[str, Any] = {"role": message.get("role", "user"), "content": message.get("content", "")}
    if message.get("images"):
        converted["content"] = [{"type": "text", "text": converted["content"]}] + [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
            for image in message["images"]]
    if message.get("tool_calls"):
        converted["tool_calls"] = [
            {"id": f"call_{index}", "type": "function",
             "function": {"name": call["function"]["name"],
                          "arguments": json.dumps(call["function"].get("arguments", {}))}}
            for index, call in enumerate(message["tool_calls"])]
    return converted


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's tool calls as Ollama's: the arguments string becomes an object."""
    converted = []
    for call in calls:
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = function.get("arguments")
        converted.append({"function": {"name": function.get("name", ""), "arguments": arguments}})
    return converted


class OllamaOverOpenAI:
    def __init__(self, api: str) -> None:
        self.api = api
        self.path = PATHS[api]
        self.model = ""
        self.finish_reason = "stop"
        self.calls: dict[int, dict[str, str]] = {}  # streamed tool calls, assembled by index

    def request(self, body: dict[str, Any], stream: bool) -> dict[str, Any]:
        self.model = str(body.get("model", ""))
        if self.api == "ollama.embed":
            return {"model": self.model, "input": body.get("input", "")}
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        request: dict[str, Any] = {"model": self.model, "stream": stream}
        request.update({name: options[name] for name in _SAME_OPTIONS if name in options})
        if "num_predict" in options:
            request["max_tokens"] = options["num_predict"]
        if stream:
            request["stream_options"] = {"include_usage": True}
        if body.get("format") == "json":
            request["response_format"] = {"type": "json_object"}
        elif isinstance(body.get("format"), dict):
            request["response_format"] = {"type": "json_schema",
                                          "json_schema": {"name": "response", "schema": body["format"]}}
        if self.api == "ollama.chat":
            request["messages"] = [_message(m) for m in body.get("messages", []) if isinstance(m, dict)]
            if body.get("tools"):
                request["tools"] = body["tools"]
        else:
            system = f"{body['system']}\n\n" if body.get("system") else ""
            request["prompt"] = system + str(body.get("prompt", ""))
        return request

    def _counts(self, usage: dict[str, int] | None) -> dict[str, Any]:
        return {"done": True, "done_reason": "length" if self.finish_reason == "length" else "stop",
                "prompt_eval_count": (usage or {}).get("prompt_tokens", 0),
                "eval_count": (usage or {}).get("completion_tokens", 0)}

    def _text(self, text: str, **extra: Any) -> dict[str, Any]:
        base: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.api == "ollama.chat":
            return {**base, "message": {"role": "assistant", "content": text, **extra}}
        return {**base, "response": text}

    def chunk(self, value: dict[str, Any]) -> list[bytes]:
        """One streamed OpenAI chunk as NDJSON lines (none for a role-only or usage-only chunk)."""
        choices = value.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or []:
            assembled = self.calls.setdefault(call.get("index", 0), {"name": "", "arguments": ""})
            function = call.get("function") or {}
            assembled["name"] += function.get("name") or ""
            assembled["arguments"] += function.get("arguments") or ""
        text = delta.get("content") if self.api == "ollama.chat" else choice.get("text")
        return [_line({**self._text(text), "done": False})] if text else []

    def final(self, usage: dict[str, int] | None) -> bytes:
        """The last line, when the engine said [DONE]."""
        extra = {}
        if self.calls:
            extra["tool_calls"] = _tool_calls([{"function": self.calls[i]} for i in sorted(self.calls)])
        return _line({**self._text("", **extra), **self._counts(usage)})

    def whole(self, value: dict[str, Any], usage: dict[str, int] | None) -> bytes:
        """A non-streamed answer."""
        if self.api == "ollama.embed":
            return json.dumps({"model": self.model, "embeddings": [d["embedding"] for d in value.get("data", [])],
                               "prompt_eval_count": (usage or {}).get("prompt_tokens", 0)}).encode()
        choice = (value.get("choices") or [{}])[0]
        self.finish_reason = choice.get("finish_reason") or "stop"
        if self.api == "ollama.chat":
            message = choice.get("message") or {}
            extra = {"tool_calls": _tool_calls(message["tool_calls"])} if message.get("tool_calls") else {}
            answer = self._text(message.get("content") or "", **extra)
        else:
            answer = self._text(choice.get("text") or "")
        return json.dumps({**answer, **self._counts(usage)}).encode()
