"""Wire shapes of the simulated engine's replies: OpenAI SSE chunks and Ollama NDJSON lines.

A token's event is a pre-rendered template with the token's JSON string spliced in, so the
simulator spends microseconds per token and stays far from being a benchmark's bottleneck.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import trio

from ghubai.errors import ApiError
from ghubai.sim.generator import Generation

_HOLE = "\x00token\x00"


def _template(value: dict[str, Any]) -> tuple[bytes, bytes]:
    before, after = json.dumps(value).split(json.dumps(_HOLE))
    return before.encode(), after.encode()


def _ns(seconds: float) -> int:
    return max(1, int(seconds * 1e9))


def _usage(gen: Generation) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


class Shape:
    """How one request's reply looks on the wire; subclasses per API."""

    content_type = "application/x-ndjson"
    usage_with_choices = False

    def __init__(self, model: str, gen: Generation, include_usage: bool) -> None:
        self.model = model
        self.gen = gen
        self.include_usage = include_usage
        self.created = int(time.time())
        self.before, self.after = _template(self.token_value(_HOLE))

    def token_value(self, token: str) -> dict[str, Any]:
        raise NotImplementedError

    def head(self) -> bytes:
        return b""

    def token(self, token: str) -> bytes:
        return self.before + json.dumps(token).encode() + self.after

    def tail(self) -> bytes:
        raise NotImplementedError

    def whole(self) -> dict[str, Any]:
        raise NotImplementedError

    sse = False

    def error(self, message: str) -> bytes:
        """The event that ends a stream the engine could not finish (Ollama's and OpenAI's layer alike)."""
        return ApiError(500, message).stream_end(self.sse)


class OpenAIShape(Shape):
    """Answers of OpenAI's layer: SSE events, ``[DONE]`` at the end."""
    content_type = "text/event-stream"
    prefix = "chatcmpl-"

    def __init__(self, model: str, gen: Generation, include_usage: bool) -> None:
        self.id = self.prefix + uuid.uuid4().hex[:24]
        super().__init__(model, gen, include_usage)
        self.before = b"data: " + self.before
        self.after += b"\n\n"

    def frame(self, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                **fields}

    def event(self, value: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(value).encode() + b"\n\n"

    def tail(self) -> bytes:
        out = self.event(self.frame(choices=[self.choice_end()]))
        if self.include_usage:  # LiteLLM sends it on an empty delta; OpenAI with no choice at all
            choices = [{"index": 0, "delta": {}}] if self.usage_with_choices else []
            out += self.event(self.frame(choices=choices, usage=_usage(self.gen)))
        return out + b"data: [DONE]\n\n"

    sse = True

    chunk_object = ""

    def choice_end(self) -> dict[str, Any]:
        raise NotImplementedError


class OpenAIChat(OpenAIShape):
    """``/v1/chat/completions``."""
    chunk_object = "chat.completion.chunk"

    def token_value(self, token: str) -> dict[str, Any]:
        return self.frame(choices=[{"index": 0, "delta": {"content": token}, "finish_reason": None}])

    def head(self) -> bytes:
        return self.event(self.frame(choices=[
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]))

    def _calls(self) -> list[dict[str, Any]]:
        assert self.gen.tool_call is not None
        name, arguments = self.gen.tool_call
        return [{"id": "call_" + self.id[-12:], "type": "function",
                 "function": {"name": name, "arguments": json.dumps(arguments)}}]

    def tail(self) -> bytes:
        if self.gen.tool_call is None:
            return super().tail()
        calls = [{"index": 0, **call} for call in self._calls()]
        return self.event(self.frame(choices=[{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": None}])) \
            + super().tail()

    def choice_end(self) -> dict[str, Any]:
        return {"index": 0, "delta": {}, "finish_reason": self.finish_reason}

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.gen.tool_call else self.gen.finish_reason

    def whole(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.gen.text}
        if self.gen.tool_call:
            message = {"role": "assistant", "content": None, "tool_calls": self._calls()}
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason}],
                "usage": _usage(self.gen)}


class OpenAICompletion(OpenAIShape):
    """``/v1/completions``."""
    chunk_object = "text_completion"
    prefix = "cmpl-"

    def token_value(self, token: str) -> dict[str, Any]:
        return self.frame(choices=[{"index": 0, "text": token, "logprobs": None, "finish_reason": None}])

    def choice_end(self) -> dict[str, Any]:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": self.gen.finish_reason}

    def whole(self) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": self.gen.text, "logprobs": None,
                             "finish_reason": self.gen.finish_reason}],
                "usage": _usage(self.gen)}


class OpenAIResponse(OpenAIShape):
    """``/v1/responses``, OpenAI's Responses API as vLLM and Ollama serve it: typed events, each
    numbered, named by an ``event:`` line too, and no ``[DONE]``: its last event is the whole answer,
    which says back the request's ``instructions``, tools and text format. Its one output item is a
    message, or the function call a request forced."""
    prefix = "resp_"

    def __init__(self, model: str, gen: Generation, include_usage: bool) -> None:
        self.sequence = 0
        self.item = ("fc_" if gen.tool_call else "msg_") + uuid.uuid4().hex[:24]
        self.echoed: dict[str, Any] = {"instructions": None, "tools": [], "tool_choice": "auto",
                                       "text": {"format": {"type": "text"}}}
        super().__init__(model, gen, include_usage)

    def echo(self, request: dict[str, Any]) -> None:
        """Say back what ``request`` asked for, as the whole answer does."""
        self.echoed.update((key, request[key]) for key in self.echoed if request.get(key) is not None)

    def token_value(self, token: str) -> dict[str, Any]:
        return {"type": "response.output_text.delta", "item_id": self.item, "output_index": 0, "content_index": 0,
                "delta": token, "logprobs": []}

    def token(self, token: str) -> bytes:
        return self.event(self.token_value(token))  # (numbered: no template)

    def event(self, value: dict[str, Any]) -> bytes:
        value["sequence_number"], self.sequence = self.sequence, self.sequence + 1
        return f"event: {value['type']}\n".encode() + super().event(value)

    def _item(self, status: str) -> dict[str, Any]:
        done = status != "in_progress"
        if self.gen.tool_call is not None:
            name, arguments = self.gen.tool_call
            return {"id": self.item, "type": "function_call", "status": status, "call_id": "call_" + self.item[-12:],
                    "name": name, "arguments": json.dumps(arguments) if done else ""}
        content = [{"type": "output_text", "text": self.gen.text, "annotations": [], "logprobs": []}] if done else []
        return {"id": self.item, "type": "message", "status": status, "role": "assistant", "content": content}

    def _response(self, status: str) -> dict[str, Any]:
        done = status != "in_progress"
        usage = {"input_tokens": self.gen.prompt_tokens, "output_tokens": self.gen.completion_tokens,
                 "total_tokens": self.gen.prompt_tokens + self.gen.completion_tokens,
                 "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
                "output": [self._item("completed")] if done else [], "usage": usage if done else None,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "parallel_tool_calls": True, **self.echoed}

    def head(self) -> bytes:
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": self._response("in_progress")},
            {"type": "response.in_progress", "response": self._response("in_progress")},
            {"type": "response.output_item.added", "output_index": 0, "item": self._item("in_progress")}]
        if self.gen.tool_call is None:
            events.append({"type": "response.content_part.added", "item_id": self.item, "output_index": 0,
                           "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}})
        return b"".join(map(self.event, events))

    def tail(self) -> bytes:
        item, status = self._item("completed"), self.whole()["status"]
        at = {"item_id": self.item, "output_index": 0}
        if self.gen.tool_call is not None:
            events = [{"type": "response.function_call_arguments.delta", **at, "delta": item["arguments"]},
                      {"type": "response.function_call_arguments.done", **at, "name": item["name"],
                       "arguments": item["arguments"]}]
        else:
            text = self.gen.text
            events = [{"type": "response.output_text.done", **at, "content_index": 0, "text": text, "logprobs": []},
                      {"type": "response.content_part.done", **at, "content_index": 0,
                       "part": {"type": "output_text", "text": text, "annotations": []}}]
        events += [{"type": "response.output_item.done", "output_index": 0, "item": item},
                   {"type": f"response.{status}", "response": self._response(status)}]
        return b"".join(map(self.event, events))

    def whole(self) -> dict[str, Any]:
        return self._response("incomplete" if self.gen.finish_reason == "length" else "completed")


class OllamaShape(Shape):
    """Answers of Ollama's native API: NDJSON lines, the last with ``done: true`` and the counts."""
    top_logprobs: int | None = None  # the request's logprobs (Ollama 0.12.11): alternatives per token

    def __init__(self, model: str, gen: Generation, include_usage: bool) -> None:
        self.created_at = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        super().__init__(model, gen, include_usage)
        self.after += b"\n"

    def token(self, token: str) -> bytes:
        if self.top_logprobs is None:
            return super().token(token)
        return json.dumps({**self.token_value(token), "logprobs": self.logprobs([token])}).encode() + b"\n"

    def logprobs(self, tokens: list[str]) -> list[dict[str, Any]]:
        """Made-up log probabilities, each token the likeliest of its alternatives, as Ollama's shape."""
        out = []
        for token in tokens:
            chosen = -(len(token) % 5) / 10 - 0.01
            entry: dict[str, Any] = {"token": token, "logprob": chosen}
            if self.top_logprobs:
                entry["top_logprobs"] = [{"token": token, "logprob": chosen}] + [
                    {"token": f"{token.strip()}~{rank}", "logprob": chosen - rank}
                    for rank in range(1, self.top_logprobs)]
            out.append(entry)
        return out

    def base(self, **fields: Any) -> dict[str, Any]:
        return {"model": self.model, "created_at": self.created_at, **fields}

    def counts(self) -> dict[str, Any]:
        """The final line's counts and durations (nanoseconds, as Ollama's: clients divide the
        counts by them for tokens per second)."""
        gen, now = self.gen, trio.current_time()
        first = gen.first_token_at or now
        return {"done": True, "done_reason": gen.finish_reason, "total_duration": _ns(now - gen.started),
                "load_duration": 1, "prompt_eval_count": gen.prompt_tokens,
                "prompt_eval_duration": _ns(first - gen.started), "eval_count": gen.completion_tokens,
                "eval_duration": _ns(now - first)}

    def tail(self) -> bytes:
        return json.dumps(self.final("")).encode() + b"\n"

    def whole(self) -> dict[str, Any]:
        whole = self.final(self.gen.text)
        return whole if self.top_logprobs is None else {**whole, "logprobs": self.logprobs(self.gen.tokens)}

    def final(self, text: str) -> dict[str, Any]:
        raise NotImplementedError


class OllamaChat(OllamaShape):
    """``/api/chat``."""
    def token_value(self, token: str) -> dict[str, Any]:
        return self.base(message={"role": "assistant", "content": token}, done=False)

    def final(self, text: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.gen.tool_call:
            name, arguments = self.gen.tool_call
            message["tool_calls"] = [{"function": {"name": name, "arguments": arguments}}]
        return self.base(message=message, **self.counts())


class OllamaGenerate(OllamaShape):
    """``/api/generate``."""
    def token_value(self, token: str) -> dict[str, Any]:
        return self.base(response=token, done=False)

    def final(self, text: str) -> dict[str, Any]:
        """With the ``context`` Ollama returns for the next turn (here, token ids of prompt and answer)."""
        context = list(range(self.gen.prompt_tokens + self.gen.completion_tokens))
        return self.base(response=text, **self.counts(), context=context)
