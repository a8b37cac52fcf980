"""The worker's API translation, unit by unit: Ollama requests over OpenAI-compatible engines and
OpenAI requests over Ollama's native API, the answers back, streamed and whole; no engine, no socket."""

from __future__ import annotations

import base64
import json
import struct
from datetime import datetime, timedelta
from typing import Any

import msgspec
import ollama
import pytest

from ghubai import dialects, protocol
from ghubai.errors import ApiError
from ghubai.worker.translate import OllamaOverOpenAI, OpenAIOverOllama, Untranslatable, translator_for


def ollama_over_openai(api: str) -> OllamaOverOpenAI:
    translator = translator_for("openai", api)
    assert isinstance(translator, OllamaOverOpenAI)
    return translator


def openai_over_ollama(api: str) -> OpenAIOverOllama:
    translator = translator_for("ollama", api)
    assert isinstance(translator, OpenAIOverOllama)
    return translator


HI = {"role": "user", "content": "hi"}


def ndjson(line: bytes) -> dict[str, Any]:
    """One NDJSON line: exactly one object, newline-terminated."""
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    value = json.loads(line)
    assert isinstance(value, dict)
    return value


def sse(event: bytes) -> dict[str, Any]:
    """One SSE event: ``data: <json>`` and a blank line."""
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    value = json.loads(event[len(b"data: "):])
    assert isinstance(value, dict)
    return value


DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


def timestamp(value: dict[str, Any]) -> str:
    """Pop and check Ollama's ``created_at`` (ISO 8601 in UTC, written with a Z), and its durations
    where there are any (whole nanoseconds)."""
    created_at = value.pop("created_at")
    assert created_at.endswith("Z")
    assert datetime.fromisoformat(created_at).utcoffset() == timedelta(0)
    for name in DURATIONS:
        if name in value:
            assert type(nanoseconds := value.pop(name)) is int and nanoseconds >= 0
    return created_at


# -- translator_for ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, api, translator_class, path", [
    ("openai", "ollama.chat", OllamaOverOpenAI, "/v1/chat/completions"),
    ("openai", "ollama.generate", OllamaOverOpenAI, "/v1/chat/completions"),  # raw: /v1/completions
    ("openai", "ollama.embed", OllamaOverOpenAI, "/v1/embeddings"),
    ("openai", "ollama.embeddings", OllamaOverOpenAI, "/v1/embeddings"),
    ("openai", "ollama.show", OllamaOverOpenAI, "/v1/models"),
    ("ollama", "openai.chat", OpenAIOverOllama, "/api/chat"),
    ("ollama", "openai.completions", OpenAIOverOllama, "/api/generate"),
    ("ollama", "openai.embeddings", OpenAIOverOllama, "/api/embed"),
])
def test_each_api_of_the_other_kind_is_translated_to_the_engines_own_path(
        kind: str, api: str, translator_class: type, path: str) -> None:
    """An openai-kind engine gets every Ollama API on its /v1 paths; an ollama-kind engine every
    OpenAI API on its native /api paths."""
    translator = translator_for(kind, api)
    assert type(translator) is translator_class
    assert (translator.api, translator.path) == (api, path)


@pytest.mark.parametrize("kind, api", [
    ("openai", "openai.chat"), ("openai", "openai.completions"), ("openai", "openai.embeddings"),
    ("ollama", "ollama.chat"), ("ollama", "ollama.generate"), ("ollama", "ollama.show"),
    ("openai", "ollama.tags"), ("ollama", "openai.models"), ("vllm", "ollama.chat"), ("", "openai.chat"),
])
def test_no_translator_when_the_engine_speaks_the_api_or_none_applies(kind: str, api: str) -> None:
    """An engine's own dialect, an API with no translation and an unknown kind get no translator."""
    assert translator_for(kind, api) is None


@pytest.mark.parametrize("api, method", [
    ("ollama.show", "GET"), ("ollama.chat", "POST"), ("ollama.generate", "POST"),
    ("ollama.embed", "POST"), ("ollama.embeddings", "POST"),
])
def test_ollama_over_openai_method(api: str, method: str) -> None:
    """Only ``ollama.show`` (answered from GET /v1/models) is not a POST."""
    assert ollama_over_openai(api).method(api) == method


@pytest.mark.parametrize("api", ["openai.chat", "openai.completions", "openai.embeddings"])
def test_openai_over_ollama_method_is_always_post(api: str) -> None:
    """Every native Ollama endpoint used is a POST."""
    assert openai_over_ollama(api).method(api) == "POST"


# -- OllamaOverOpenAI: requests ------------------------------------------------------------------


def test_ollama_chat_request_maps_messages_options_format_and_tools() -> None:
    """Options are renamed or copied, images become content parts, tool-call arguments a JSON string,
    a tool call keeps its id (or gets one), a thinking level is a reasoning effort."""
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    body = {
        "model": "llama3",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is this?", "images": ["QUJD", "REVG"]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "clock"}, "id": "call_clock"}]},
            {"role": "tool", "content": "sunny"},
            {"content": "no role"},
            "not a message",
        ],
        "options": {"temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["\n\n", "END"], "num_predict": 64,
                    "frequency_penalty": 0.1, "presence_penalty": 0.3, "top_k": 40, "min_p": 0.05, "num_ctx": 8192},
        "format": "json",
        "tools": tools,
        "keep_alive": "5m",
        "think": "high",
    }
    translator = ollama_over_openai("ollama.chat")
    assert translator.request(body, stream=False) == {
        "model": "llama3", "stream": False,
        "temperature": 0.2, "top_p": 0.9, "seed": 7, "stop": ["\n\n", "END"],
        "frequency_penalty": 0.1, "presence_penalty": 0.3, "top_k": 40, "min_p": 0.05, "max_tokens": 64,
        "reasoning_effort": "high", "response_format": {"type": "json_object"},
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,REVG"}}]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c00020000", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_clock", "type": "function", "function": {"name": "clock", "arguments": "{}"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c00020000"},
            {"role": "user", "content": "no role"},
        ],
        "tools": tools,
    }
    assert translator.model == "llama3"


def test_each_ollama_tool_result_names_the_call_it_answers() -> None:
    """Regression (review): tool results reached an OpenAI engine without ``tool_call_id``, which
    OpenAI's API requires, and every assistant's calls were numbered from call_0 again."""
    calls = [{"function": {"name": "weather", "arguments": {}}}, {"function": {"name": "clock", "arguments": {}}}]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "content": "12:00", "tool_name": "clock"}, {"role": "tool", "content": "sunny"},
                {"role": "assistant", "content": "", "tool_calls": calls[:1]},
                {"role": "tool", "content": "rain", "tool_call_id": "theirs"}, {"role": "tool", "content": "snow"}]
    sent = ollama_over_openai("ollama.chat").request({"model": "m", "messages": messages}, stream=False)["messages"]
    assert [call["id"] for call in sent[1]["tool_calls"]] == ["c00010000", "c00010001"]
    assert [m.get("tool_call_id") for m in sent[2:]] == ["c00010001", "c00010000", None, "theirs", "c00040000"]
    assert all(len(call["id"]) == 9 and call["id"].isalnum() for m in sent for call in m.get("tool_calls", []))


def test_ollama_stream_asks_the_engine_for_usage() -> None:
    """A streamed request asks for the usage chunk that the final record's counts come from."""
    request = ollama_over_openai("ollama.chat").request({"model": "m", "messages": [HI]}, stream=True)
    assert request == {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "messages": [HI]}


def test_ollama_format_schema_becomes_json_schema_response_format() -> None:
    """A ``format`` object is a JSON schema, named as OpenAI requires."""
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    request = ollama_over_openai("ollama.chat").request({"model": "m", "format": schema}, stream=False)
    assert request["response_format"] == {"type": "json_schema",
                                          "json_schema": {"name": "response", "schema": schema}}


@pytest.mark.parametrize("body", [
    {"model": "m", "options": "hot", "format": "yaml", "tools": [], "messages": [HI]},
    {"model": "m", "options": None, "format": "", "messages": [HI]},
    {"model": "m", "messages": [HI]},
])
def test_ollama_request_ignores_missing_or_malformed_extras(body: dict[str, Any]) -> None:
    """Options that are not an object, an unknown format and empty tools add nothing."""
    assert ollama_over_openai("ollama.chat").request(body, stream=False) == {
        "model": "m", "stream": False, "messages": [HI]}


def test_ollama_generate_request_is_a_chat_and_a_raw_one_a_completion_with_the_system_first() -> None:
    """Regression (hunt): ``/api/generate`` went to ``/v1/completions``, where no template applies: an instruct
    model continued the prompt (vLLM for 16 tokens). As Ollama applies the model's template, it is now a chat
    of the system and the prompt; ``raw`` (no template) is a completion prompt. Options map as for chat."""
    body = {"model": "m", "system": "You are terse.", "prompt": "Say hi", "options": {"num_predict": 5, "seed": 1},
            "format": "json"}
    common = {"model": "m", "stream": True, "seed": 1, "max_tokens": 5, "stream_options": {"include_usage": True},
              "response_format": {"type": "json_object"}}
    translator = ollama_over_openai("ollama.generate")
    assert translator.request(body, stream=True) == {**common, "messages": [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi"}]}
    assert translator.path == "/v1/chat/completions"
    raw = ollama_over_openai("ollama.generate")
    assert raw.request({**body, "raw": True}, stream=True) == {**common, "prompt": "You are terse.\n\nSay hi"}
    assert raw.path == "/v1/completions"


def test_ollama_generate_without_system_or_prompt() -> None:
    """No system adds no blank lines; no prompt is a load, not a generation (as Ollama answers it)."""
    assert ollama_over_openai("ollama.generate").request({"model": "m", "prompt": "x"}, stream=False)["messages"] == [
        {"role": "user", "content": "x"}]
    assert ollama_over_openai("ollama.generate").request({"model": "m", "prompt": "x", "raw": True},
                                                         stream=False)["prompt"] == "x"
    translator = ollama_over_openai("ollama.generate")
    translator.request({"model": "m", "system": "terse"}, stream=False)
    assert translator.preload == "load"


def test_ollama_embed_requests_carry_only_model_and_input() -> None:
    """``/api/embed`` passes its input through (a list stays a list); the legacy form's prompt is a string."""
    embed = ollama_over_openai("ollama.embed").request(
        {"model": "e", "input": ["a", "b"], "options": {"temperature": 1}, "truncate": True}, stream=False)
    assert embed == {"model": "e", "input": ["a", "b"]}
    legacy = ollama_over_openai("ollama.embeddings").request({"model": "e", "prompt": 42}, stream=True)
    assert legacy == {"model": "e", "input": "42"}


@pytest.mark.parametrize("api, body", [("ollama.embed", {"prompt": "hello"}),
                                       ("ollama.embeddings", {"input": "hello"})])
def test_the_other_api_s_field_is_nothing_to_embed(api: str, body: dict[str, Any]) -> None:
    """Regression (a hunt): either field counted for both APIs, and an OpenAI engine embedded "" (an
    Ollama one answers nothing: Ollama reads only ``input`` on /api/embed, ``prompt`` on the legacy form)."""
    translator = ollama_over_openai(api)
    assert translator.request({"model": "e", **body}, stream=False) == {} and translator.preload == "load"


@pytest.mark.parametrize("num_predict", [-1, -2])
def test_ollama_unlimited_num_predict_sets_no_max_tokens(num_predict: int) -> None:
    """Ollama's 'no limit' values of num_predict leave max_tokens unset rather than negative."""
    request = ollama_over_openai("ollama.chat").request({"model": "m", "options": {"num_predict": num_predict}},
                                                        stream=False)
    assert "max_tokens" not in request


# -- OllamaOverOpenAI: answers -------------------------------------------------------------------


def test_ollama_chat_stream_text_chunks_become_ndjson_lines() -> None:
    """A content delta is one done=false NDJSON line; role-only, empty and usage-only chunks give none."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "llama3", "messages": []}, stream=True)
    assert translator.chunk({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}) == []
    assert translator.chunk({"choices": [{"index": 0, "delta": {"content": ""}}]}) == []
    assert translator.chunk({"choices": [{"index": 0, "delta": {"content": None}}]}) == []
    assert translator.chunk({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}) == []
    assert translator.chunk({"choices": [None]}) == []
    assert translator.chunk({}) == []
    lines = translator.chunk({"choices": [{"index": 0, "delta": {"content": "Hé \"you\"\n"}}]})
    assert len(lines) == 1
    value = ndjson(lines[0])
    timestamp(value)
    assert value == {"model": "llama3", "message": {"role": "assistant", "content": "Hé \"you\"\n"}, "done": False}
    assert translator.done is False


def test_ndjson_lines_escape_the_line_separators_a_client_splits_at() -> None:
    """Regression (a hunt): llama.cpp and vLLM write U+2028 and U+2029 raw, so did the translated
    lines, and the ollama SDK (httpx's ``iter_lines``, ``str.splitlines``' rules) cut the line there:
    a JSONDecodeError. Ollama (Go) escapes them."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "llama3", "messages": []}, stream=True)
    text = "a\u2028b\u2029c — “d”\u0085e"  # (U+0085 too: a hunt)
    [line] = translator.chunk({"choices": [{"index": 0, "delta": {"content": text}}]})
    assert len(line.decode().splitlines()) == 1 and ndjson(line)["message"]["content"] == text


def test_ollama_chat_final_line_has_counts_and_done_reason() -> None:
    """The line after [DONE] is done=true with the usage as Ollama's counts and the finish reason mapped."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "llama3", "messages": []}, stream=True)
    translator.chunk({"choices": [{"index": 0, "delta": {"content": "abc"}, "finish_reason": "length"}]})
    value = ndjson(translator.final({"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}))
    # (hunt: none came, and a client's tokens per second, eval_count / eval_duration, raised TypeError)
    assert value["eval_duration"] >= 1 and set(DURATIONS) <= set(value)
    assert value["total_duration"] >= value["prompt_eval_duration"] + value["eval_duration"]
    timestamp(value)
    assert value == {"model": "llama3", "message": {"role": "assistant", "content": ""}, "done": True,
                     "done_reason": "length", "prompt_eval_count": 11, "eval_count": 4}
    assert translator.done is False  # the engine's own [DONE] ends these streams, not the translator


@pytest.mark.parametrize("finish_reason, done_reason", [
    ("stop", "stop"), ("length", "length"), ("tool_calls", "stop"), ("content_filter", "stop"), (None, "stop"),
])
def test_ollama_finish_reason_maps_to_done_reason(finish_reason: str | None, done_reason: str) -> None:
    """Only ``length`` survives as itself; every other finish is Ollama's ``stop``."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m"}, stream=True)
    translator.chunk({"choices": [{"delta": {}, "finish_reason": finish_reason}]})
    assert ndjson(translator.final(None))["done_reason"] == done_reason


def test_ollama_final_without_usage_counts_zero() -> None:
    """An engine that never sent usage yields zero counts, not missing keys."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m"}, stream=True)
    value = ndjson(translator.final(None))
    assert (value["done"], value["done_reason"], value["prompt_eval_count"], value["eval_count"]) == (
        True, "stop", 0, 0)


def test_ollama_streamed_tool_calls_are_assembled_into_the_final_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tool-call fragments are joined and ordered by index, their arguments parsed; a call whose
    arguments are no JSON object is the text the model wrote (the ollama SDK takes only objects)."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m", "messages": []}, stream=True)
    fragments = [
        {"index": 1, "id": "b", "type": "function", "function": {"name": "clock", "arguments": ""}},
        {"index": 0, "id": "a", "type": "function", "function": {"name": "wea", "arguments": '{"ci'}},
        {"index": 0, "function": {"name": "ther", "arguments": 'ty": "Paris"}'}},
        {"index": 2, "function": {"name": "broken", "arguments": '{"no'}},
    ]
    monkeypatch.setattr("ghubai.worker.translate.time.monotonic", lambda: 100.0)  # (a stalled runner: no flake)
    lines = [translator.chunk({"choices": [{"delta": {"tool_calls": [fragment]}}]}) for fragment in fragments]
    assert [len(found) for found in lines] == [1, 0, 0, 0]  # one empty line: see the test below
    translator.chunk({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]})
    value = ndjson(translator.final({"prompt_tokens": 9, "completion_tokens": 12}))
    assert value["message"] == {"role": "assistant", "content": '{"name": "broken", "arguments": {"no}',
                                "tool_calls": [  # ids kept (Ollama has them)
                                    {"id": "a", "function": {"index": 0, "name": "weather",
                                                             "arguments": {"city": "Paris"}}},
                                    {"id": "b", "function": {"index": 1, "name": "clock", "arguments": {}}}]}
    assert (value["done_reason"], value["prompt_eval_count"], value["eval_count"]) == ("stop", 9, 12)


def test_ollama_tool_call_without_index_is_call_zero() -> None:
    """A fragment without an index belongs to the first call."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m"}, stream=True)
    translator.chunk({"choices": [{"delta": {"tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}}]})
    translator.chunk({"choices": [{"delta": {"tool_calls": [{"function": {"arguments": None}}]}}]})
    assert ndjson(translator.final(None))["message"]["tool_calls"] == [
        {"function": {"index": 0, "name": "f", "arguments": {}}}]


@pytest.mark.parametrize("deltas", [
    [[{"id": "c1", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}],
     [{"id": "c2", "function": {"name": "get_time", "arguments": '{"tz":"UTC"}'}}]],  # a call a delta, ids
    [[{"function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
      {"function": {"name": "get_time", "arguments": '{"tz":"UTC"}'}}]],  # both in one delta
    [[{"function": {"name": "get_weather"}}], [{"function": {"arguments": '{"city":'}}],
     [{"function": {"arguments": '"Paris"}'}}], [{"function": {"name": "get_time", "arguments": '{"tz":"UTC"}'}}]],
])
def test_parallel_tool_calls_streamed_without_their_index_stay_apart(deltas: list[list[dict[str, Any]]]) -> None:
    """Regression (hunt): Gemini's OpenAI layer and mistral.rs stream calls without ``index``; every
    piece went to call 0, two calls became ``get_weatherget_time`` with both arguments run together,
    and an Ollama client got that as text and no call."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m"}, stream=True)
    for delta in deltas:
        translator.chunk({"choices": [{"delta": {"tool_calls": delta}}]})
    calls = ndjson(translator.final(None))["message"]["tool_calls"]
    assert [(call["function"]["index"], call["function"]["name"], call["function"]["arguments"]) for call in calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_time", {"tz": "UTC"})]


@pytest.mark.parametrize("raw", [False, True])
def test_ollama_generate_stream_uses_response_not_message(raw: bool) -> None:
    """``/api/generate`` lines carry ``response``; its text comes from the chat's delta, or a raw
    generation's choice ``text``; a thinking model's reasoning goes beside it, as Ollama's ``thinking``."""
    translator = ollama_over_openai("ollama.generate")
    translator.request({"model": "g", "prompt": "p", "raw": raw}, stream=True)
    assert translator.chunk({"choices": [{"index": 0, "text": ""} if raw else {"delta": {"role": "assistant"}}]}) == []
    choice = {"text": "Once"} if raw else {"delta": {"content": "Once"}}
    value = ndjson(translator.chunk({"choices": [{"index": 0, **choice, "finish_reason": None}]})[0])
    timestamp(value)
    assert value == {"model": "g", "response": "Once", "done": False}
    if not raw:
        value = ndjson(translator.chunk({"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]})[0])
        timestamp(value)
        assert value == {"model": "g", "response": "", "thinking": "hm", "done": False}
    last = ndjson(translator.final({"prompt_tokens": 1, "completion_tokens": 2}))
    timestamp(last)
    assert last == {"model": "g", "response": "", "done": True, "done_reason": "stop",
                    "prompt_eval_count": 1, "eval_count": 2}


def test_ollama_chat_whole_answer() -> None:
    """A non-streamed chat answer is one done=true object with message, reason and counts."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "llama3", "messages": []}, stream=False)
    raw = translator.whole({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                                                     "finish_reason": "stop"}]},
                           {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
    assert not raw.endswith(b"\n")
    value = json.loads(raw)
    # (review: a whole answer's time all went to the prompt, and eval_duration was 1 ns: 1e11 tokens/s;
    # then its prompt took 1 ns, and clients printed a prompt rate of 1e9 per token (a hunt): none is said)
    assert value["eval_duration"] > 1 and "prompt_eval_duration" not in value
    timestamp(value)
    assert value == {"model": "llama3", "message": {"role": "assistant", "content": "Hi!"}, "done": True,
                     "done_reason": "stop", "prompt_eval_count": 5, "eval_count": 2}


def test_llama_cpp_s_timings_are_ollama_s_durations() -> None:
    """Over llama.cpp a client's prompt and generation rates are the engine's own: its ``timings``
    come with a whole answer and on a stream's last chunk (the usage chunk the worker asks for); a
    whole answer from another engine counted all its time as generating, its prompt in 1 ns."""
    timings = {"prompt_n": 5, "prompt_ms": 12.5, "predicted_n": 2, "predicted_ms": 40.0}
    whole = ollama_over_openai("ollama.chat")
    whole.request({"model": "m", "messages": []}, stream=False)
    value = json.loads(whole.whole({"choices": [{"message": {"content": "Hi"}, "finish_reason": "stop"}],
                                    "timings": timings}, None))
    assert (value["prompt_eval_duration"], value["eval_duration"]) == (12_500_000, 40_000_000)
    assert value["total_duration"] >= 52_500_000  # (a hunt: less than its parts with the engine's times)
    streamed = ollama_over_openai("ollama.generate")
    streamed.request({"model": "m", "prompt": "p"}, stream=True)
    streamed.chunk({"choices": [{"text": "Hi", "finish_reason": "stop"}]})
    streamed.chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}, "timings": timings})
    last = ndjson(streamed.final({"prompt_tokens": 5, "completion_tokens": 2}))
    assert (last["prompt_eval_duration"], last["eval_duration"]) == (12_500_000, 40_000_000)
    odd = ollama_over_openai("ollama.chat")
    odd.request({"model": "m", "messages": []}, stream=False)
    value = json.loads(odd.whole({"choices": [{"message": {"content": "Hi"}}], "timings": {"prompt_ms": "x"}}, None))
    assert value["eval_duration"] >= 1
    for huge in (10**400, float("nan"), -1.0):  # (hunt: 10**400 raised OverflowError, a traceback per answer)
        odd.chunk({"choices": [], "timings": {"prompt_ms": huge, "predicted_ms": 1}})
        assert ndjson(odd.final(None))["eval_duration"] != 1_000_000  # (the worker's own times, not half the engine's)


def test_ollama_chat_whole_answer_with_tool_calls_and_length() -> None:
    """Whole-answer tool calls get object arguments; content None is empty; ``length`` is kept."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m"}, stream=False)
    message = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": [2]}'}},
        {"id": "call_10", "type": "function", "function": {"name": "noop"}}]}
    value = json.loads(translator.whole({"choices": [{"message": message, "finish_reason": "length"}]}, None))
    assert value["message"] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_9", "function": {"index": 0, "name": "add", "arguments": {"a": 1, "b": [2]}}},
        {"id": "call_10", "function": {"index": 1, "name": "noop", "arguments": {}}}]}
    assert (value["done_reason"], value["prompt_eval_count"], value["eval_count"]) == ("length", 0, 0)


def test_ollama_whole_answer_without_choices() -> None:
    """An answer with no choice is an empty, finished one, not an exception."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m"}, stream=False)
    value = json.loads(translator.whole({"choices": []}, None))
    assert (value["message"], value["done_reason"]) == ({"role": "assistant", "content": ""}, "stop")


@pytest.mark.parametrize("raw", [False, True])
def test_ollama_generate_whole_answer(raw: bool) -> None:
    """A non-streamed generate answer carries ``response`` from the chat's message, or a raw one's text."""
    translator = ollama_over_openai("ollama.generate")
    translator.request({"model": "g", "prompt": "p", "raw": raw}, stream=False)
    choice = {"text": "done."} if raw else {"message": {"role": "assistant", "content": "done."}}
    value = json.loads(translator.whole({"choices": [{**choice, "finish_reason": "length"}]},
                                        {"prompt_tokens": 3, "completion_tokens": 8}))
    timestamp(value)
    assert value == {"model": "g", "response": "done.", "done": True, "done_reason": "length",
                     "prompt_eval_count": 3, "eval_count": 8}


def test_ollama_embed_whole_answer() -> None:
    """``/api/embed`` returns every vector in order, with the prompt token count."""
    translator = ollama_over_openai("ollama.embed")
    translator.request({"model": "e", "input": ["a", "b"]}, stream=False)
    value = {"object": "list", "data": [{"index": 0, "embedding": [0.5, -1.0]}, {"index": 1, "embedding": [2.0, 0.0]}]}
    answer = json.loads(translator.whole(value, {"prompt_tokens": 4, "total_tokens": 4}))
    assert answer.pop("total_duration") >= 1 and answer.pop("load_duration") == 0
    assert answer == {"model": "e", "embeddings": [[0.5, -1.0], [2.0, 0.0]], "prompt_eval_count": 4}
    shuffled = {"data": [{"index": 1, "embedding": [2.0]}, {"index": 0, "embedding": [1.0]}]}
    assert json.loads(translator.whole(shuffled, None))["embeddings"] == [[1.0], [2.0]]  # (each by its index)
    empty = json.loads(translator.whole({"data": []}, None))
    assert {key: empty[key] for key in ("model", "embeddings", "prompt_eval_count")} == \
        {"model": "e", "embeddings": [], "prompt_eval_count": 0}


def test_ollama_legacy_embeddings_whole_answer() -> None:
    """``/api/embeddings`` returns the first vector alone, or an empty one."""
    translator = ollama_over_openai("ollama.embeddings")
    translator.request({"model": "e", "prompt": "a"}, stream=False)
    assert json.loads(translator.whole({"data": [{"embedding": [0.25, 1.5]}, {"embedding": [9.0]}]}, None)) == {
        "embedding": [0.25, 1.5]}
    assert json.loads(translator.whole({"data": [{"index": 1, "embedding": [9.0]}, {"index": 0, "embedding": [1.0]}]},
                                       None)) == {"embedding": [1.0]}
    assert json.loads(translator.whole({"data": []}, None)) == {"embedding": []}
    assert json.loads(translator.whole({}, None)) == {"embedding": []}


def test_ollama_show_answer_is_the_empty_shape_clients_expect() -> None:
    """``/api/show`` over an OpenAI engine answers the fields Ollama clients read, mostly empty."""
    translator = ollama_over_openai("ollama.show")
    translator.request({"model": "m"}, stream=False)
    value = json.loads(translator.whole({"object": "list", "data": [{"id": "m"}]}, None))
    modified_at = value.pop("modified_at")
    assert modified_at.endswith("Z")
    assert value == {"modelfile": "", "parameters": "", "template": "", "model_info": {},
                     "details": {"format": "", "family": "", "parameter_size": "", "quantization_level": ""},
                     "capabilities": ["completion"]}


# -- OpenAIOverOllama: requests ------------------------------------------------------------------


def test_openai_chat_request_maps_messages_options_format_and_tools() -> None:
    """Sampling fields become options, content parts text and images, tool-call arguments objects,
    and a tool result names the tool of the call it answers (Ollama's ``tool_name``)."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    body = {
        "model": "qwen",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QUJD"}},
                {"type": "text", "text": "Answer briefly."},
                "junk"]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}},
                {"id": "call_2", "type": "function", "function": {"name": "raw", "arguments": "not json"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "2"},
            {"role": "tool", "tool_call_id": "call_9", "content": "?"},
            {"content": "roleless"},
            7,
        ],
        "temperature": 0.5, "top_p": None, "seed": 3, "stop": ["END"], "frequency_penalty": 0.0,
        "presence_penalty": 1.5, "max_tokens": 100, "max_completion_tokens": 50, "user": "u1",
        "response_format": {"type": "json_object"}, "tools": tools, "tool_choice": "auto",
    }
    translator = openai_over_ollama("openai.chat")
    assert translator.request(body, stream=False) == {
        "model": "qwen", "stream": False,
        "options": {"temperature": 0.5, "seed": 3, "stop": ["END"], "frequency_penalty": 0.0,
                    "presence_penalty": 1.5, "num_predict": 50},
        "format": "json",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "What is this?\nAnswer briefly.", "images": ["QUJD"]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "function": {"name": "add", "arguments": {"a": 1}}},
                {"id": "call_2", "function": {"name": "raw", "arguments": "not json"}}]},
            {"role": "tool", "content": "2", "tool_call_id": "call_1", "tool_name": "add"},
            {"role": "tool", "content": "?", "tool_call_id": "call_9"},
            {"role": "user", "content": "roleless"},
        ],
        "tools": tools, "tool_choice": "auto",
    }
    assert translator.model == "qwen"


def test_openai_max_tokens_and_stream_flag() -> None:
    """``max_tokens`` alone is num_predict; the stream flag is passed on as given."""
    request = openai_over_ollama("openai.chat").request({"model": "m", "max_tokens": 1, "messages": []}, stream=True)
    assert request == {"model": "m", "stream": True, "options": {"num_predict": 1}, "messages": []}


def test_token_limits_mean_what_each_engine_reads_them_as() -> None:
    """Regression (hunt): Ollama's runners read ``num_predict: 0`` as no limit; it went to an OpenAI
    engine as ``max_tokens: 0`` (which vLLM refuses), a ``3.0`` was dropped, and OpenAI's
    ``max_tokens: 0`` (a 400 at OpenAI) reached Ollama as no limit at all."""
    for limit, expected in ((0, None), (-1, None), (-2, None), (3.0, 3), (True, None), (5, 5)):
        request = ollama_over_openai("ollama.chat").request(
            {"model": "m", "messages": [], "options": {"num_predict": limit}}, stream=False)
        assert request.get("max_tokens") == expected, limit
    for name in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(ApiError, match=f"'{name}' must be at least 1"):
            dialects.validate_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], name: 0})
    dialects.validate_completion({"model": "m", "prompt": "x", "max_tokens": 0})  # (OpenAI's minimum: a hunt)
    with pytest.raises(ApiError, match="'max_tokens' must be at least 0"):
        dialects.validate_completion({"model": "m", "prompt": "x", "max_tokens": -1})
    with pytest.raises(Untranslatable, match="num_predict 0"):
        openai_over_ollama("openai.completions").request({"model": "m", "prompt": "x", "max_tokens": 0}, False)
    for n in (0, 2.0, "2", True):  # (a hunt: over Ollama each was one choice and a 200)
        with pytest.raises(ApiError, match="'n' must be|'n': expected"):
            dialects.validate_completion({"model": "m", "prompt": "x", "n": n})
        with pytest.raises(ApiError, match="'n' must be|'n': expected"):
            dialects.validate_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": n})
    with pytest.raises(ApiError, match="'encoding_format' must be"):  # (a hunt: "BASE64" got a list of floats)
        dialects.validate_openai_inputs({"model": "m", "input": "x", "encoding_format": "BASE64"})
    with pytest.raises(ApiError, match="images must be an array"):  # (hunt: a string was an image a character)
        dialects.validate_ollama_generate({"model": "m", "prompt": "x", "images": "abc"})
    # Ollama's content is a string (content parts reached an OpenAI engine as a part whose text was a list)
    with pytest.raises(ApiError, match=r"messages\[0\].content must be a string"):
        dialects.validate_ollama_chat({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x"}]}]})


def test_openai_tool_choice_without_tools_is_dropped() -> None:
    """``tool_choice`` only goes with tools."""
    request = openai_over_ollama("openai.chat").request({"model": "m", "tool_choice": "required", "tools": []},
                                                        stream=False)
    assert "tool_choice" not in request and "tools" not in request


def test_a_named_tool_choice_leaves_ollama_only_that_tool() -> None:
    """Regression (hunt): Ollama ignores ``tool_choice``, so a model told to call ``search`` could
    answer with another tool; it is now offered only that one, or only the ``allowed_tools`` (a later
    hunt: a tool the client excluded was offered). What Ollama cannot say is a 400 that names it (a
    later hunt: each was a 200, the request's tools changed)."""
    tools = [{"type": "function", "function": {"name": name}} for name in ("weather", "search", "delete")]
    allowed = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "weather"}}, {"type": "function", "name": "search"}]}}
    for choice, offered in (({"type": "function", "function": {"name": "search"}}, tools[1:2]), ("required", tools),
                            (allowed, tools[:2]), ("auto", tools)):
        request = openai_over_ollama("openai.chat").request({**CHAT, "tools": tools, "tool_choice": choice}, False)
        assert request["tools"] == offered
    for refused, said in (({"tool_choice": {"type": "function", "function": {"name": "other"}}}, "names no function"),
                          ({"tools": [*tools, {"type": "custom", "custom": {"name": "py"}}]}, "function tools only"),
                          ({"tool_choice": {"type": "custom", "custom": {"name": "py"}}}, "no tool_choice of type"),
                          ({"functions": [{"name": "f"}], "function_call": "auto"}, "not functions"),
                          ({"tools": [*tools, {"type": "function", "function": {}}],
                            "tool_choice": {"type": "function"}}, "names no function")):  # (review: it took one)
        with pytest.raises(Untranslatable, match=said):
            openai_over_ollama("openai.chat").request({**CHAT, "tools": tools, **refused}, False)


def test_tool_calls_cut_by_the_limit_finish_with_length() -> None:
    """Regression (hunt): a turn with calls that Ollama ended for ``length`` said ``tool_calls``, as if
    it were whole; only a stop becomes ``tool_calls``, as Ollama's own OpenAI layer maps it."""
    for stream in (True, False):
        translator = openai_over_ollama("openai.chat")
        translator.request({**CHAT, "max_tokens": 5}, stream=stream)
        calls = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {}}}]}
        if stream:
            translator.chunk({"message": calls, "done": False})
            [end] = translator.chunk({"message": {"content": ""}, "done": True, "done_reason": "length"})
            assert sse(end)["choices"][0]["finish_reason"] == "length"
        else:
            value = json.loads(translator.whole({"message": calls, "done_reason": "length"}, None))
            assert value["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("response_format, expected", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}, {"type": "object"}),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json"),
    ({"type": "json_schema"}, "json"),
    ({"type": "json_object"}, "json"),
])
def test_openai_response_format_becomes_ollama_format(response_format: dict[str, Any], expected: Any) -> None:
    """A JSON schema is passed as the format; JSON mode (or a schema-less schema) is ``"json"``."""
    request = openai_over_ollama("openai.chat").request({"model": "m", "response_format": response_format},
                                                        stream=False)
    assert request["format"] == expected


@pytest.mark.parametrize("response_format", [None, {"type": "text"}, {}])
def test_openai_text_response_format_sets_no_format(response_format: dict[str, Any] | None) -> None:
    """Plain text output asks Ollama for no format at all."""
    request = openai_over_ollama("openai.chat").request({"model": "m", "response_format": response_format},
                                                        stream=False)
    assert "format" not in request


def test_openai_single_stop_string_becomes_a_list() -> None:
    """A single stop string reaches Ollama as the list of strings its options require."""
    request = openai_over_ollama("openai.chat").request({"model": "m", "stop": "\n"}, stream=False)
    assert request["options"]["stop"] == ["\n"]


@pytest.mark.parametrize("prompt, expected", [("Tell me", "Tell me"), (["only"], "only"), (12, "12")])
def test_openai_completions_request_takes_one_prompt(prompt: Any, expected: str) -> None:
    """``/api/generate`` takes one prompt: a list of one gives it (a longer list: the next test)."""
    request = openai_over_ollama("openai.completions").request(
        {"model": "m", "prompt": prompt, "max_tokens": 16, "stop": ["\n"]}, stream=True)
    assert request == {"model": "m", "stream": True, "options": {"stop": ["\n"], "num_predict": 16},
                       "prompt": expected}


@pytest.mark.parametrize("prompt", [["first", "second"], [], [[1, 2]], [7]])
def test_a_batch_of_prompts_or_token_ids_cannot_be_said_to_ollama(prompt: Any) -> None:
    with pytest.raises(Untranslatable, match="one text prompt"):
        openai_over_ollama("openai.completions").request({"model": "m", "prompt": prompt}, stream=False)


@pytest.mark.parametrize("prompt", ["", [""]])
def test_an_empty_prompt_is_not_sent_to_ollama_as_a_load(prompt: Any) -> None:
    """Regression (hunt): ``/api/generate`` with an empty prompt is Ollama's load: a completion of
    "" with max_tokens 3 came back 200, empty, finish "stop". It is another engine's to continue."""
    with pytest.raises(Untranslatable, match="empty prompt"):
        openai_over_ollama("openai.completions").request({"model": "m", "prompt": prompt, "max_tokens": 3},
                                                         stream=False)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


@pytest.mark.parametrize("field", [{"temperature": "hot"}, {"top_p": True}, {"seed": 1.5}, {"top_k": "4"},
                                   {"stop": [1]}, {"stop": {"a": 1}}, {"presence_penalty": [0]},
                                   {"repeat_last_n": "64"}, {"mirostat": "2"}, {"typical_p": [1]},
                                   {"response_format": {"type": 1}},
                                   {"response_format": {"type": "json_schema", "json_schema": {"schema": "oops"}}}])
def test_a_sampling_field_of_the_wrong_type_is_a_400(field: dict[str, Any]) -> None:
    """Regression (hunt): the hub checked none, so ``stop: [1]`` reached Ollama as an option it
    refuses with a 500: a 502 tried on every worker, and again by the SDK's retries."""
    for validate, body in ((dialects.validate_chat, CHAT),
                           (dialects.validate_completion, {"model": "m", "prompt": "x"})):
        with pytest.raises(ApiError) as refused:
            validate({**body, **field})
        assert refused.value.status == 400 and refused.value.param.split(".")[0] in field
    dialects.validate_chat({**CHAT, "temperature": 0, "top_p": 0.5, "seed": 7.0, "stop": "x", "top_k": None,
                            "response_format": {"type": "structural_tag"}})  # (vLLM's: the engine judges it)


@pytest.mark.parametrize("field", [{"tool_choice": "required"}, {"tool_choice": {"type": "function", "function": {
    "name": "f"}}}, {"tool_choice": "any"}, {"tools": {"type": "function"}}, {"tools": ["f"]},
    {"top_logprobs": 2}, {"top_logprobs": 2, "logprobs": False}, {"logprobs": 1},
    {"top_logprobs": "2", "logprobs": True}])
def test_a_chat_s_tool_choice_and_logprobs_are_refused_as_openai_refuses_them(field: dict[str, Any]) -> None:
    """Regression (noticed in a review): an Ollama engine ignored a ``tool_choice`` that must call a
    tool when no tool was offered, and ``top_logprobs`` without ``logprobs``: a 200 without either."""
    with pytest.raises(ApiError) as refused:
        dialects.validate_chat({**CHAT, **field})
    assert refused.value.status == 400 and refused.value.param in field
    for fine in ({"tool_choice": "auto"}, {"tool_choice": "none"}, {"logprobs": True, "top_logprobs": 0},
                 {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"},
                 {"logprobs": False, "top_logprobs": None}):
        dialects.validate_chat({**CHAT, **fine})
    for dimensions in (0, -1, 1.5, "8"):  # (0 reached an Ollama engine as its model's own size)
        with pytest.raises(ApiError, match="dimensions"):
            dialects.validate_openai_inputs({"model": "m", "input": "x", "dimensions": dimensions})


@pytest.mark.parametrize("body", [{"format": 123}, {"format": "yaml"}, {"options": "x"},
                                  {"options": {"num_predict": "5"}}, {"options": {"temperature": True}},
                                  {"options": {"stop": "x"}}, {"options": {"mirostat_tau": "x"}},
                                  {"options": {"use_mmap": 1}}, {"raw": True, "system": "s"},
                                  {"raw": True, "context": [1]}, {"think": "bogus"}, {"think": 3},
                                  {"keep_alive": False}, {"keep_alive": "5"}, {"keep_alive": "soon"},
                                  {"keep_alive": "1" * 5000}])  # (a review: its parse took hours, the hub's loop stood)
def test_what_ollama_refuses_of_format_options_and_raw_is_a_400(body: dict[str, Any]) -> None:
    """Regression (hunt): over an OpenAI engine each was dropped (a ``num_predict`` of "5" made an
    answer without limit; raw glued the system text into the prompt; a ``think`` of "bogus" reached
    it as a reasoning effort, and ``keep_alive: false`` unloaded the model); Ollama refuses them."""
    with pytest.raises(ApiError) as refused:
        dialects.validate_ollama_generate({"model": "m", "prompt": "x", **body})
    assert refused.value.status == 400
    if "raw" not in body:
        with pytest.raises(ApiError):
            dialects.validate_ollama_chat({"model": "m", **body})
    dialects.validate_ollama_generate({"model": "m", "format": "", "options": {"num_predict": 3.0, "stop": ["x"],
                                                                              "bogus": "kept"}})


@pytest.mark.parametrize("body", [{"options": "x"}, {"options": {"num_ctx": "big"}}, {"keep_alive": "forever"},
                                  {"keep_alive": True}])
def test_what_ollama_refuses_of_an_embedding_s_options_is_a_400_as_a_chat_s(body: dict[str, Any]) -> None:
    """Regression (a hunt): the embedding routes checked only the model and the input: a wrong option
    was a 500 from Ollama, tried on up to three workers, and passed unseen over an OpenAI engine."""
    for validate, field in ((dialects.validate_ollama_embed, "input"), (dialects.validate_ollama_embeddings, "prompt")):
        with pytest.raises(ApiError) as refused:
            validate({"model": "m", field: "x", **body})
        assert refused.value.status == 400


def test_an_ollama_embedding_s_truncate_and_dimensions_have_ollama_s_types() -> None:
    for body in ({"truncate": "no"}, {"dimensions": "4"}, {"dimensions": 4.5}, {"dimensions": True}):
        with pytest.raises(ApiError) as refused:
            dialects.validate_ollama_embed({"model": "m", "input": "x", **body})
        assert refused.value.status == 400 and refused.value.param in body
    for fine in ({"truncate": False, "dimensions": 0}, {"dimensions": -1}, {"dimensions": 8, "options": {"num_ctx": 8}},
                 {"options": {"mirostat": "2"}}):  # (llama.cpp's sampling options: Ollama drops them here)
        dialects.validate_ollama_embed({"model": "m", "input": "x", "keep_alive": "5m", **fine})
    for dimensions, sent in ((8, {"dimensions": 8}), (0, {}), (-1, {})):  # (0 or less: the model's own)
        request = ollama_over_openai("ollama.embed").request({"model": "e", "input": "x", "dimensions": dimensions},
                                                             stream=False)
        assert request == {"model": "e", "input": "x", **sent}


def test_ollama_s_repeat_penalty_reaches_openai_engines_and_back() -> None:
    """Regression (hunt): it was dropped on the way to llama.cpp (which takes Ollama's name) and vLLM
    (``repetition_penalty``); an OpenAI client's ``repetition_penalty`` (extra_body) is Ollama's."""
    request = ollama_over_openai("ollama.chat").request(
        {"model": "m", "messages": [], "options": {"repeat_penalty": 1.2, "repeat_last_n": 64, "num_ctx": 4096}},
        stream=False)
    assert (request["repeat_penalty"], request["repetition_penalty"], request["repeat_last_n"]) == (1.2, 1.2, 64)
    assert "num_ctx" not in request
    request = ollama_over_openai("ollama.chat").request(  # (review: nulls were sent; vLLM refuses seed 1.5)
        {"model": "m", "messages": [], "options": {"repeat_penalty": None, "seed": 1.5, "top_k": 40.0}}, False)
    assert "repeat_penalty" not in request and "repetition_penalty" not in request
    assert (request["seed"], request["top_k"]) == (1, 40) and type(request["top_k"]) is int
    options = openai_over_ollama("openai.chat").request({**CHAT, "repetition_penalty": 1.1}, False)["options"]
    assert options == {"repeat_penalty": 1.1}


def test_a_raw_generation_without_a_limit_has_none_at_an_openai_engine() -> None:
    """Regression (hunt): vLLM's completions stop at 16 tokens when ``max_tokens`` is left out; Ollama's
    default is no limit, which a null says to vLLM and llama.cpp alike."""
    translator = ollama_over_openai("ollama.generate")
    request = translator.request({"model": "m", "prompt": "p", "raw": True}, stream=False)
    assert translator.path == "/v1/completions" and "max_tokens" in request and request["max_tokens"] is None
    request = ollama_over_openai("ollama.generate").request(
        {"model": "m", "prompt": "p", "raw": True, "options": {"num_predict": 5}}, stream=False)
    assert request["max_tokens"] == 5


def test_a_response_format_ollama_cannot_honour_goes_to_another_engine() -> None:
    """Regression (hunt): one of another type (vLLM's structural_tag) was dropped over Ollama, a 200
    without it. (``logit_bias`` is dropped, as Ollama's own OpenAI layer drops it: Open WebUI sends one
    when set, and every chat of an Ollama-only grid would have been a 400.)"""
    with pytest.raises(Untranslatable):
        openai_over_ollama("openai.chat").request({**CHAT, "response_format": {"type": "structural_tag"}}, False)
    openai_over_ollama("openai.chat").request({**CHAT, "logit_bias": {"1": 2}, "response_format": {"type": "text"}},
                                              False)


@pytest.mark.parametrize("response_format", ["json", ["x"], {"type": "json_schema", "json_schema": "x"}])
def test_a_completion_s_response_format_that_is_no_object_is_a_400(response_format: Any) -> None:
    """Regression (hunt): on ``/v1/completions`` (not on chat) it reached the worker, whose
    translation raised: a 502 and a traceback in every worker tried."""
    with pytest.raises(ApiError) as refused:
        dialects.validate_completion({"model": "m", "prompt": "x", "response_format": response_format})
    assert refused.value.status == 400


def test_what_an_ollama_listing_tells_of_a_model_is_taken_only_when_well_typed() -> None:
    """An engine's listing reaches Ollama's clients through the grid: figures of other types, text too
    long or no name tell nothing (and break nothing); /api/ps's size is the size in memory. (Hunt: a
    size past Go's int64, a digest shorter than the 12 characters Ollama's CLI prints, or a date that
    is no RFC 3339 one broke `ollama list` and `ollama ps` for every client: each is told as a
    stand-in, and the rest as it was.)"""
    entries = [{"name": "a", "size": 5, "digest": "d", "details": {"family": "llama", "families": None, "x": 1}},
               {"name": "b", "size": "5"}, {"name": "c", "digest": "x" * 300}, {"size": 7}, "junk",
               {"name": "d", "details": {"families": ["x"] * 100}}, {"name": "e" * 300, "size": 1}]
    told = dialects.facts_of(entries)  # (review: a name a hub refuses made the whole hello refused)
    assert set(told) == {"a"} and (told["a"].size, told["a"].digest, told["a"].details.family) == (5, "d", "llama")
    digest, date = "0123456789ab" * 5 + "cdef", "2026-05-05T10:11:12.123456789-07:00"
    odd = protocol.ModelFacts(size=2**63, digest="abc", modified_at="yesterday",
                              details=protocol.ModelDetails(family="q"))
    [fine, unreadable] = dialects.ollama_tags(["a", "f"], facts={
        "a": protocol.ModelFacts(size=5, digest=digest, modified_at=date), "f": odd})["models"]
    assert (fine["size"], fine["digest"], fine["modified_at"]) == (5, digest, date)
    assert (unreadable["size"], len(unreadable["digest"]), unreadable["modified_at"]) == (0, 64, dialects.UNDATED)
    assert unreadable["details"]["family"] == "q"
    held = dialects.facts_of([{"name": "a", "size": 9, "size_vram": 4, "context_length": 8192}], running=True)["a"]
    assert (held.size, held.memory, held.size_vram, held.context_length) == (0, 9, 4, 8192)
    meta = dialects.facts_of_meta([{"id": "m", "meta": {"n_params": 494_032_768, "size": 5}}, {"id": "n"},
                                   {"id": "o", "meta": {"n_params": "x", "size": -1}},
                                   {"id": "p", "meta": {"n_params": 10**400, "size": 10**30}}])  # (hunt: a crash)
    assert {name: (facts.size, facts.details.parameter_size) for name, facts in meta.items()} == {
        "m": (5, "494M"), "o": (0, ""), "p": (0, "")}
    entry = dialects.ollama_tags(["a", "m", "z"], running=True, facts={"a": held, "m": meta["m"]})["models"]
    assert (entry[0]["size"], entry[0]["size_vram"], entry[0]["context_length"]) == (9, 4, 8192)
    # (a hunt: an OpenAI-compatible engine's model in memory was "0 B", "100% CPU" to ``ollama ps``)
    assert (entry[1]["size"], entry[1]["size_vram"]) == (5, 5)
    assert (entry[2]["size"], entry[2]["size_vram"], "context_length" in entry[2]) == (0, 0, False)


def test_openai_embeddings_request() -> None:
    """Embeddings carry only model and input; other fields do not reach Ollama."""
    translator = openai_over_ollama("openai.embeddings")
    assert translator.request({"model": "e", "input": ["x", "y"], "encoding_format": "float", "user": "u"},
                              stream=False) == {"model": "e", "input": ["x", "y"]}
    assert translator.base64 is False


# -- OpenAIOverOllama: streamed answers ----------------------------------------------------------


def test_openai_chat_stream_first_chunk_carries_the_role() -> None:
    """The first event's delta has role and content; later ones only content, same id and created."""
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "qwen", "messages": []}, stream=True)
    [first] = translator.chunk({"model": "qwen", "message": {"role": "assistant", "content": "Hel"}, "done": False})
    first_value = sse(first)
    assert first_value["id"].startswith("chatcmpl-") and len(first_value["id"]) == len("chatcmpl-") + 24
    assert isinstance(first_value["created"], int)
    assert first_value == {"id": translator.id, "object": "chat.completion.chunk", "created": translator.created,
                           "model": "qwen", "choices": [{"index": 0, "delta": {"content": "Hel", "role": "assistant"},
                                                         "finish_reason": None}]}
    [second] = translator.chunk({"message": {"role": "assistant", "content": "lo \"there\"\n\u00e9\u2603"},
                                 "done": False})
    assert sse(second) == {"id": translator.id, "object": "chat.completion.chunk", "created": translator.created,
                           "model": "qwen", "choices": [{"index": 0, "delta": {"content": "lo \"there\"\n\u00e9\u2603"},
                                                         "finish_reason": None}]}
    assert translator.done is False


def test_openai_chat_stream_empty_first_chunk_still_sends_the_role() -> None:
    """An empty first line sends a role-only delta; later empty lines send nothing."""
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "m"}, stream=True)
    [first] = translator.chunk({"message": {"role": "assistant", "content": ""}, "done": False})
    assert sse(first)["choices"] == [{"index": 0, "delta": {"content": "", "role": "assistant"},
                                      "finish_reason": None}]
    assert translator.chunk({"message": {"role": "assistant", "content": ""}, "done": False}) == []
    assert translator.chunk({"done": False}) == []


def test_openai_chat_stream_end_with_usage() -> None:
    """The done line gives the finish event and, when asked for, a usage event with no choices."""
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "m", "stream_options": {"include_usage": True}}, stream=True)
    translator.chunk({"message": {"role": "assistant", "content": "a"}, "done": False})
    events = translator.chunk({"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop",
                               "prompt_eval_count": 12, "eval_count": 30})
    assert [sse(event) for event in events] == [
        {"id": translator.id, "object": "chat.completion.chunk", "created": translator.created, "model": "m",
         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": translator.id, "object": "chat.completion.chunk", "created": translator.created, "model": "m",
         "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}},
    ]
    assert translator.done is True


def test_openai_chat_stream_end_without_usage_and_with_text() -> None:
    """Text in the done line comes before the finish; no usage event unless asked; length is kept."""
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "m", "stream_options": {"include_usage": False}}, stream=True)
    translator.chunk({"message": {"content": "a"}, "done": False})
    events = [sse(event) for event in translator.chunk({"message": {"content": "b"}, "done": True,
                                                         "done_reason": "length", "eval_count": 2})]
    assert [event["choices"] for event in events] == [
        [{"index": 0, "delta": {"content": "b"}, "finish_reason": None}],
        [{"index": 0, "delta": {}, "finish_reason": "length"}]]
    assert translator.done is True


def test_openai_chat_stream_tool_calls() -> None:
    """Tool calls get running indexes, fresh ids and JSON-string arguments; the finish is tool_calls;
    the content beside them is null, as OpenAI sends it (it was "")."""
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "m", "tools": [{"type": "function"}]}, stream=True)
    [first] = translator.chunk({"message": {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]}, "done": False})
    [second] = translator.chunk({"message": {"content": "", "tool_calls": [
        {"function": {"name": "now"}}, {"function": {"name": "sub", "arguments": {"x": "y"}}}]}, "done": False})
    first_delta = sse(first)["choices"][0]["delta"]
    second_delta = sse(second)["choices"][0]["delta"]
    calls = first_delta["tool_calls"] + second_delta["tool_calls"]
    assert [call["id"][:5] for call in calls] == ["call_"] * 3 and len({call["id"] for call in calls}) == 3
    assert [{k: v for k, v in call.items() if k != "id"} for call in calls] == [
        {"index": 0, "type": "function", "function": {"name": "add", "arguments": '{"a":1,"b":2}'}},
        {"index": 1, "type": "function", "function": {"name": "now", "arguments": "{}"}},
        {"index": 2, "type": "function", "function": {"name": "sub", "arguments": '{"x":"y"}'}}]
    assert (first_delta["role"], first_delta["content"], "role" in second_delta) == ("assistant", None, False)
    assert second_delta["content"] is None
    [end] = translator.chunk({"message": {"content": ""}, "done": True, "done_reason": "stop"})
    assert sse(end)["choices"] == [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]


def test_openai_completions_stream() -> None:
    """Completion chunks are text_completion events with text and null logprobs, then the finish."""
    translator = openai_over_ollama("openai.completions")
    translator.request({"model": "g", "prompt": "p", "stream_options": {"include_usage": True}}, stream=True)
    assert translator.id.startswith("cmpl-") and len(translator.id) == len("cmpl-") + 24
    head = {"id": translator.id, "object": "text_completion", "created": translator.created, "model": "g"}
    assert translator.chunk({"response": "", "done": False}) == []
    [first] = translator.chunk({"response": "Once", "done": False})
    [second] = translator.chunk({"response": " upon", "done": False})
    assert sse(first) == {**head, "choices": [{"index": 0, "text": "Once", "logprobs": None, "finish_reason": None}]}
    assert sse(second) == {**head, "choices": [{"index": 0, "text": " upon", "logprobs": None,
                                                "finish_reason": None}]}
    end, usage = translator.chunk({"response": "", "done": True, "done_reason": "length",
                                   "prompt_eval_count": 2, "eval_count": 5})
    assert sse(end) == {**head, "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}]}
    assert sse(usage) == {**head, "choices": [],
                          "usage": {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}}
    assert translator.done is True


def test_openai_fast_path_matches_the_full_encoding() -> None:
    """The per-token template gives byte-for-byte the event a full encode of the same chunk gives."""
    for api, text_choice in (("openai.chat", lambda t: {"delta": {"content": t}}),
                             ("openai.completions", lambda t: {"text": t, "logprobs": None})):
        translator = openai_over_ollama(api)
        translator.request({"model": "m", "prompt": "p"}, stream=True)
        translator.chunk({"message": {"content": "x"}, "response": "x", "done": False})
        text = "tab\there \\ \"q\" \u0000 \U0001f600"
        [event] = translator.chunk({"message": {"content": text}, "response": text, "done": False})
        expected = {"id": translator.id, "object": "chat.completion.chunk" if api == "openai.chat" else
                    "text_completion", "created": translator.created, "model": "m",
                    "choices": [{"index": 0, **text_choice(text), "finish_reason": None}]}
        assert event == b"data: " + msgspec.json.encode(expected) + b"\n\n"


# -- OpenAIOverOllama: whole answers -------------------------------------------------------------


def test_openai_chat_whole_answer() -> None:
    """A non-streamed chat answer is a chat.completion with the message, the finish and exact usage."""
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "qwen", "messages": []}, stream=False)
    value = json.loads(translator.whole({"model": "qwen", "message": {"role": "assistant", "content": "Hi"},
                                         "done": True, "done_reason": "stop", "prompt_eval_count": 3,
                                         "eval_count": 2}, None))
    assert value == {"id": translator.id, "object": "chat.completion", "created": translator.created,
                     "model": "qwen", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                                   "logprobs": None, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    assert translator.done is False  # only a streamed done line sets it


def test_openai_chat_whole_answer_with_tool_calls() -> None:
    """Whole-answer tool calls have ids and string arguments but no index; the finish is tool_calls."""
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "m"}, stream=False)
    value = json.loads(translator.whole({"message": {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "add", "arguments": {"a": 1}}}, {"function": {"name": "now"}}]},
        "done_reason": "stop"}, None))
    [choice] = value["choices"]
    calls = choice["message"]["tool_calls"]
    assert all(call["id"].startswith("call_") and len(call["id"]) == 17 for call in calls)
    assert [{k: v for k, v in call.items() if k != "id"} for call in calls] == [
        {"type": "function", "function": {"name": "add", "arguments": '{"a":1}'}},
        {"type": "function", "function": {"name": "now", "arguments": "{}"}}]
    assert (choice["message"]["content"], choice["finish_reason"]) == (None, "tool_calls")  # (OpenAI's null)
    assert value["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize("done_reason, finish_reason", [("stop", "stop"), ("length", "length"), (None, "stop"),
                                                         ("load", "stop")])
def test_openai_completions_whole_answer(done_reason: str | None, finish_reason: str) -> None:
    """A non-streamed completion is a text_completion; only ``length`` is kept as a finish reason."""
    translator = openai_over_ollama("openai.completions")
    translator.request({"model": "g", "prompt": "p"}, stream=False)
    value = json.loads(translator.whole({"response": "text", "done_reason": done_reason,
                                         "prompt_eval_count": 4, "eval_count": None}, None))
    assert value == {"id": translator.id, "object": "text_completion", "created": translator.created, "model": "g",
                     "choices": [{"index": 0, "text": "text", "logprobs": None, "finish_reason": finish_reason}],
                     "usage": {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}}


def test_openai_embeddings_whole_answer_as_floats() -> None:
    """Each vector is an embedding object with its index; usage is the prompt count."""
    translator = openai_over_ollama("openai.embeddings")
    translator.request({"model": "e", "input": ["a", "b"]}, stream=False)
    value = json.loads(translator.whole({"embeddings": [[0.5, -1.25], [3.0, 0.0]], "prompt_eval_count": 6}, None))
    assert value == {"object": "list", "model": "e", "usage": {"prompt_tokens": 6, "total_tokens": 6},
                     "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -1.25]},
                              {"object": "embedding", "index": 1, "embedding": [3.0, 0.0]}]}


def test_openai_embeddings_whole_answer_as_base64() -> None:
    """``encoding_format: base64`` packs each vector as little-endian float32, as OpenAI does."""
    translator = openai_over_ollama("openai.embeddings")
    translator.request({"model": "e", "input": "a", "encoding_format": "base64"}, stream=False)
    assert translator.base64 is True
    value = json.loads(translator.whole({"embeddings": [[0.5, -1.25, 3.0]]}, None))
    [item] = value["data"]
    raw = base64.b64decode(item["embedding"])
    assert raw == struct.pack("<3f", 0.5, -1.25, 3.0)
    assert struct.unpack("<3f", raw) == (0.5, -1.25, 3.0)
    assert (item["index"], value["usage"]) == (0, {"prompt_tokens": 0, "total_tokens": 0})


def test_openai_embeddings_without_vectors() -> None:
    """An answer with no embeddings is an empty list, not an error."""
    translator = openai_over_ollama("openai.embeddings")
    translator.request({"model": "e", "input": []}, stream=False)
    assert json.loads(translator.whole({}, None))["data"] == []


def test_each_translation_has_its_own_id() -> None:
    """Two requests never share a completion id (Ollama's own OpenAI layer does not guarantee it)."""
    ids = {openai_over_ollama("openai.chat").id for _ in range(50)}
    assert len(ids) == 50


@pytest.mark.parametrize("arguments, expected", [
    ('{"city": "Paris"}', {"city": "Paris"}),
    ({"city": "Paris"}, {"city": "Paris"}),  # some clients send an object: it used to raise TypeError (a 500)
    ("not json", "not json"),
    (None, {}),
])
def test_openai_tool_call_arguments_reach_ollama_as_an_object(arguments: Any, expected: Any) -> None:
    message = {"role": "assistant", "content": "",
               "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}
    request = openai_over_ollama("openai.chat").request({"model": "m", "messages": [message]}, stream=False)
    assert request["messages"][0]["tool_calls"] == [{"id": "c", "function": {"name": "f", "arguments": expected}}]


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "http://10.0.0.5/x.png", "data:image/png,QUJD",
                                 "QUJD", "data:image/png;base64"])
def test_an_image_that_is_no_base64_data_url_is_untranslatable_for_ollama(url: str) -> None:
    """Ollama takes images as bytes; a link is refused (400), never fetched nor sent as base64."""
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    with pytest.raises(Untranslatable, match="base64 data: URL"):
        openai_over_ollama("openai.chat").request(body, stream=False)


@pytest.mark.parametrize("line", [{"message": {"content": 5}, "done": False}, {"message": {"content": ["a"]}},
                                  {"message": "hi", "done": True}])
def test_an_ollama_line_whose_text_is_no_text_raises_rather_than_passes_it_on(line: dict[str, Any]) -> None:
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "m", "messages": []}, stream=True)
    with pytest.raises((TypeError, AttributeError)):
        translator.chunk(line)


def test_an_openai_chunk_whose_text_is_no_text_raises_rather_than_passes_it_on() -> None:
    for raw, choice in ((True, {"text": 7}), (False, {"delta": {"content": 7}})):
        translator = ollama_over_openai("ollama.generate")
        translator.request({"model": "m", "prompt": "p", "raw": raw}, stream=True)
        with pytest.raises(TypeError):
            translator.chunk({"choices": [choice]})


def test_counts_an_engine_mangles_are_zero_not_an_error() -> None:
    translator = openai_over_ollama("openai.completions")
    translator.request({"model": "m", "prompt": "p"}, stream=False)
    value = json.loads(translator.whole({"response": "ok", "done": True, "eval_count": "x", "prompt_eval_count": -3}, None))
    assert value["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert value["choices"][0]["text"] == "ok"


def test_a_tool_result_names_its_tool_by_its_own_name_or_not_at_all_whatever_its_id() -> None:
    """Review: a ``tool_call_id`` that is no string (a list) made the lookup raise: a 500 per request."""
    body = {"model": "m", "messages": [{"role": "tool", "tool_call_id": ["a"], "content": "1", "name": "clock"},
                                       {"role": "tool", "tool_call_id": {"b": 1}, "content": "2"}]}
    messages = openai_over_ollama("openai.chat").request(body, stream=False)["messages"]
    assert messages == [{"role": "tool", "content": "1", "tool_name": "clock"}, {"role": "tool", "content": "2"}]


# -- what real clients send and get (a hunt through the openai and ollama clients) ------------------


@pytest.mark.parametrize("field, expected", [
    ({"reasoning_effort": "low"}, "low"), ({"reasoning_effort": "none"}, False),
    ({"reasoning_effort": "minimal"}, "low"), ({"reasoning": {"effort": "xhigh"}}, "max"), ({}, None)])
def test_a_reasoning_effort_is_ollama_s_think_as_its_own_openai_layer_maps_it(field: dict[str, Any], expected: Any) -> None:
    request = openai_over_ollama("openai.chat").request({"model": "m", "messages": [HI], **field}, stream=False)
    assert request.get("think") == expected


def test_an_unknown_reasoning_effort_is_untranslatable_and_an_empty_one_unset() -> None:
    with pytest.raises(Untranslatable, match="reasoning effort"):
        openai_over_ollama("openai.chat").request({"model": "m", "messages": [HI], "reasoning_effort": "huge"}, stream=False)
    assert "think" not in openai_over_ollama("openai.chat").request(
        {"model": "m", "messages": [HI], "reasoning_effort": ""}, stream=False)
    assert "think" not in openai_over_ollama("openai.completions").request(  # (Ollama's own completions ignore it)
        {"model": "m", "prompt": "p", "reasoning_effort": "low", "top_k": 5}, stream=False)


def test_think_levels_reach_an_openai_engine_as_efforts_it_takes_and_sampling_extras_reach_ollama() -> None:
    """Review: vLLM takes low, medium and high; Ollama's ``max`` is ``high`` there, as Ollama maps it
    for gpt-oss. ``top_k`` and ``min_p``, which vLLM and llama.cpp take on /v1, are Ollama options."""
    request = ollama_over_openai("ollama.chat").request({"model": "m", "messages": [HI], "think": "max"}, stream=False)
    assert request["reasoning_effort"] == "high"
    options = openai_over_ollama("openai.completions").request({"model": "m", "prompt": "p", "top_k": 5, "min_p": 0.1},
                                                              stream=False)["options"]
    assert options == {"top_k": 5, "min_p": 0.1}


def test_openai_request_details_ollama_would_lose_or_misread() -> None:
    """``developer`` is ``system`` (Ollama's templates know no other), an earlier turn's reasoning is
    its ``thinking``, a null ``max_completion_tokens`` leaves ``max_tokens`` in force, ``tool_choice:
    "none"`` sends no tools (Ollama ignores tool_choice), and ``suffix`` and ``dimensions`` pass."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    request = openai_over_ollama("openai.chat").request({
        "model": "m", "max_tokens": 3, "max_completion_tokens": None, "tools": tools, "tool_choice": "none",
        "messages": [{"role": "developer", "content": "be terse"}, HI,
                     {"role": "assistant", "content": "4", "reasoning_content": "2+2"}]}, stream=False)
    assert request["messages"] == [{"role": "system", "content": "be terse"}, HI,
                                   {"role": "assistant", "content": "4", "thinking": "2+2"}]
    assert request["options"] == {"num_predict": 3} and "tools" not in request
    completion = openai_over_ollama("openai.completions").request({"model": "m", "prompt": "def f(", "suffix": ")"}, False)
    assert completion["suffix"] == ")"
    embedding = openai_over_ollama("openai.embeddings").request({"model": "m", "input": "x", "dimensions": 256}, False)
    assert embedding == {"model": "m", "input": "x", "dimensions": 256}
    with pytest.raises(Untranslatable, match="token ids"):
        openai_over_ollama("openai.embeddings").request({"model": "m", "input": [[1, 2, 3]]}, False)


def test_a_thinking_model_s_thinking_is_the_openai_deltas_reasoning() -> None:
    """Regression: thinking lines were dropped: the client saw nothing while the model thought
    (long enough, and the hub's idle timeout cut the stream) and never saw the reasoning."""
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "m", "messages": [HI]}, stream=True)
    deltas = [sse(event)["choices"][0]["delta"] for line in (
        {"message": {"role": "assistant", "content": "", "thinking": "Let"}, "done": False},
        {"message": {"role": "assistant", "content": "", "thinking": " me see"}, "done": False},
        {"message": {"role": "assistant", "content": "Four", "thinking": "."}, "done": False},
        {"message": {"role": "assistant", "content": "."}, "done": False}) for event in translator.chunk(line)]
    assert deltas == [{"content": "", "role": "assistant", "reasoning": "Let", "reasoning_content": "Let"},
                      {"content": "", "reasoning": " me see", "reasoning_content": " me see"},
                      {"content": "Four", "reasoning": ".", "reasoning_content": "."}, {"content": "."}]
    whole = openai_over_ollama("openai.chat")
    whole.request({"model": "m", "messages": [HI]}, stream=False)
    message = json.loads(whole.whole({"message": {"content": "4", "thinking": "2+2"}, "done": True}, None))
    assert message["choices"][0]["message"] == {"role": "assistant", "content": "4", "reasoning": "2+2",
                                                "reasoning_content": "2+2"}


def test_an_ollama_tool_call_keeps_the_id_ollama_gave_it() -> None:
    translator = openai_over_ollama("openai.chat")
    translator.request({"model": "m", "messages": [HI]}, stream=False)
    answer = json.loads(translator.whole({"message": {"content": "", "tool_calls": [
        {"id": "call_abc", "function": {"name": "f", "arguments": {}}}, {"function": {"name": "g", "arguments": {}}}]},
        "done": True}, None))
    ids = [call["id"] for call in answer["choices"][0]["message"]["tool_calls"]]
    assert ids[0] == "call_abc" and ids[1].startswith("call_") and ids[1] != "call_abc"


def test_an_openai_engine_s_reasoning_is_ollama_s_thinking() -> None:
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m", "messages": [HI]}, stream=True)
    lines = [translator.chunk({"choices": [{"delta": delta}]}) for delta in (
        {"reasoning_content": "hmm"}, {"reasoning": "so"}, {"content": "4"})]
    assert [ndjson(line)["message"] for [line] in lines] == [
        {"role": "assistant", "content": "", "thinking": "hmm"}, {"role": "assistant", "content": "", "thinking": "so"},
        {"role": "assistant", "content": "4"}]
    whole = ollama_over_openai("ollama.chat")
    whole.request({"model": "m", "messages": [HI]}, stream=False)
    value = json.loads(whole.whole({"choices": [{"message": {"content": "4", "reasoning_content": "2+2"}}]}, None))
    assert value["message"] == {"role": "assistant", "content": "4", "thinking": "2+2"}


@pytest.mark.parametrize("api, body, reason", [
    ("ollama.generate", {"model": "m"}, "load"), ("ollama.generate", {"model": "m", "prompt": "", "keep_alive": 0}, "unload"),
    ("ollama.chat", {"model": "m"}, "load"),
    ("ollama.chat", {"model": "m", "messages": [], "keep_alive": "0s"}, "unload"),
    ("ollama.chat", {"model": "m", "keep_alive": "0.0s"}, "unload"),
    ("ollama.chat", {"model": "m", "keep_alive": "0h0m0s"}, "unload"),
    ("ollama.chat", {"model": "m", "keep_alive": "1h0m"}, "load"),
    ("ollama.chat", {"model": "m", "keep_alive": -1}, "load")])
def test_a_load_or_unload_is_answered_as_ollama_answers_it_not_generated(api: str, body: dict[str, Any], reason: str) -> None:
    """Regression: ``ollama run``'s and Open WebUI's preload (no prompt, no messages) made an
    OpenAI-compatible engine generate from nothing (or refuse empty messages). (Hunt: a zero that
    Go's durations spell otherwise, "0.0s", was a load.)"""
    translator = ollama_over_openai(api)
    translator.request(body, stream=True)
    value = ndjson(translator.preloaded(stream=True))
    assert (value["done"], value["done_reason"], value["model"]) == (True, reason, "m")


def test_images_on_generate_for_an_openai_engine_are_untranslatable_not_dropped() -> None:
    with pytest.raises(Untranslatable, match="without raw"):
        ollama_over_openai("ollama.generate").request({"model": "m", "prompt": "what?", "images": ["QUJD"],
                                                       "raw": True}, False)
    seen = ollama_over_openai("ollama.generate").request({"model": "m", "prompt": "what?", "images": ["QUJD"]}, False)
    assert seen["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}]}]
    embed = ollama_over_openai("ollama.embed").request({"model": "e", "input": "x", "dimensions": 64}, stream=False)
    assert embed == {"model": "e", "input": "x", "dimensions": 64}


@pytest.mark.parametrize("extra", [{"context": [1, 2, 3]}, {"template": "{{ .Prompt }}"}])
def test_a_context_or_template_on_generate_for_an_openai_engine_is_untranslatable_not_dropped(
        extra: dict[str, Any]) -> None:
    """Regression (hunt): a client that keeps a conversation in ``context`` got 200s from a model with no
    memory of it: an OpenAI-compatible engine was sent the bare prompt, and no context came back."""
    with pytest.raises(Untranslatable, match=next(iter(extra))):
        ollama_over_openai("ollama.generate").request({"model": "m", "prompt": "and then?", **extra}, False)
    empty = ollama_over_openai("ollama.generate").request({"model": "m", "prompt": "hi", "context": [],
                                                          "template": ""}, False)
    assert empty["messages"] == [{"role": "user", "content": "hi"}]


def test_streamed_tool_calls_are_joined_once_and_a_mixed_index_is_unfit() -> None:
    """Regression (hunt): each piece of a streamed argument was added to the whole so far (quadratic:
    800 KB in 4-byte pieces took 16 s), and an index that was no integer failed the end of the answer."""
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m", "messages": [HI]}, stream=True)
    for piece in ('{"a":', ' 1', "}"):
        translator.chunk({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": "", "arguments": piece}}]}}]})
    assert ndjson(translator.final(None))["message"]["tool_calls"] == [
        {"function": {"index": 0, "name": "", "arguments": {"a": 1}}}]
    with pytest.raises(TypeError):
        translator.chunk({"choices": [{"delta": {"tool_calls": [{"index": "1"}]}}]})


def test_an_engine_streaming_a_long_tool_call_sends_an_ollama_client_an_empty_line_each_second(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (hunt): an Ollama client gets a tool call whole in the last line, so while an
    OpenAI-compatible engine streamed a long one (a coding agent's whole file) the worker sent
    nothing, and the hub cut the answer at its idle_s (first_token_s before any text)."""
    clock = [100.0]
    monkeypatch.setattr("ghubai.worker.translate.time.monotonic", lambda: clock[0])
    translator = ollama_over_openai("ollama.chat")
    translator.request({"model": "m", "messages": [HI]}, stream=True)
    piece = {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "line "}}]}}]}
    sent = []
    for step in range(30):  # three seconds of arguments, a piece every 0.1 s
        clock[0] = 100 + step / 10
        sent.append(translator.chunk(piece))
    assert [at for at, lines in enumerate(sent) if lines] == [0, 10, 20]
    assert ndjson(sent[10][0])["message"] == {"role": "assistant", "content": ""}
    assert ndjson(sent[10][0])["done"] is False
    assert translator.chunk({"choices": [{"delta": {}}]}) == []  # a role-only or empty chunk stays unsent


def test_a_tool_call_cut_or_garbled_reaches_an_ollama_client_as_text_whole_and_streamed() -> None:
    """Regression (hunt): arguments that are no JSON object (a call cut by max_tokens) reached the
    client as a string, which Ollama never sends: the ollama SDK raised, and lost the whole stream."""
    whole = ollama_over_openai("ollama.chat")
    whole.request({"model": "m", "messages": [HI]}, stream=False)
    message = {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Pa'}},
        {"id": "c2", "type": "function", "function": {"name": "list", "arguments": "[1, 2]"}},
        {"id": "c3", "type": "function", "function": {"name": "say", "arguments": '"hi"'}}]}
    value = json.loads(whole.whole({"choices": [{"message": message, "finish_reason": "length"}]}, None))
    assert value["message"] == {"role": "assistant", "content": 'Checking.\n{"name": "weather", "arguments": '
                                '{"city": "Pa}\n{"name": "list", "arguments": [1, 2]}\n{"name": "say", "arguments": "hi"}'}
    assert value["done_reason"] == "length"
    streamed = ollama_over_openai("ollama.chat")
    streamed.request({"model": "m", "messages": [HI]}, stream=True)
    call = {"index": 0, "id": "c1", "function": {"name": "weather", "arguments": '{"city": "Pa'}}
    streamed.chunk({"choices": [{"delta": {"tool_calls": [call]}, "finish_reason": "length"}]})
    value = ndjson(streamed.final(None))
    assert value["message"] == {"role": "assistant", "content": '{"name": "weather", "arguments": {"city": "Pa}'}
    assert value["done_reason"] == "length"


def test_content_parts_reach_ollama_apart_and_a_part_ollama_cannot_take_is_untranslatable() -> None:
    """Regression (hunt): text parts were glued ("...file.Answer in French."), and audio or file
    parts dropped, the model answering without them."""
    translator = openai_over_ollama("openai.chat")
    parts = [{"type": "text", "text": "Summarize the file."}, {"type": "text", "text": "Answer in French."}]
    refused = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]}
    body = {"model": "m", "messages": [{"role": "user", "content": parts}, refused]}
    assert translator.request(body, stream=False)["messages"] == [
        {"role": "user", "content": "Summarize the file.\nAnswer in French."},
        {"role": "assistant", "content": "I cannot."}]
    for part in ({"type": "input_audio", "input_audio": {"data": "QUJD", "format": "wav"}},
                 {"type": "file", "file": {"file_data": "QUJD"}}):
        with pytest.raises(Untranslatable, match=part["type"]):
            openai_over_ollama("openai.chat").request(
                {"model": "m", "messages": [{"role": "user", "content": [*parts, part]}]}, stream=False)


def test_a_refusal_is_the_text_of_the_answer_both_ways() -> None:
    """Regression (hunt): OpenAI says a model's refusal in ``refusal`` beside a null ``content``; an
    Ollama client of an OpenAI-compatible engine got an empty answer that looked like a normal stop,
    streamed or whole, and an OpenAI client's history with such a message (an SDK's message appended
    as it came) reached Ollama as an empty assistant turn."""
    whole = ollama_over_openai("ollama.chat")
    whole.request({"model": "m", "messages": []}, stream=False)
    value = json.loads(whole.whole({"choices": [{"message": {"role": "assistant", "content": None,
                                                             "refusal": "I can't."}, "finish_reason": "stop"}]}, None))
    assert value["message"]["content"] == "I can't."
    streamed = ollama_over_openai("ollama.chat")
    streamed.request({"model": "m", "messages": []}, stream=True)
    [line] = streamed.chunk({"choices": [{"delta": {"content": None, "refusal": "I can't."}}]})
    assert ndjson(line)["message"]["content"] == "I can't."
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "refusal": "I can't."},
               {"role": "assistant", "content": None, "refusal": 7}]
    sent = openai_over_ollama("openai.chat").request({"model": "m", "messages": history}, stream=False)
    assert [message["content"] for message in sent["messages"]] == ["q", "I can't.", ""]


# -- thinking models and images (a hunt of both through every path) -------------------------------


def test_think_false_turns_an_openai_engine_s_thinking_off_and_none_reaches_the_client() -> None:
    """Regression: ``think: false`` was dropped for an OpenAI-compatible engine, and the client got
    the thinking it had turned off. It asks the template (vLLM's, llama.cpp's way); what an engine
    thinks anyway is not passed on, and while it thinks, empty lines keep the answer alive."""
    translator = ollama_over_openai("ollama.chat")
    request = translator.request({"model": "m", "messages": [HI], "think": False}, stream=True)
    assert request["chat_template_kwargs"] == {"enable_thinking": False}
    lines = [translator.chunk({"choices": [{"delta": delta}]}) for delta in (
        {"reasoning_content": "hmm"}, {"reasoning_content": "more"}, {"content": "4", "reasoning": "x"})]
    assert [ndjson(line)["message"] for line in lines[0] + lines[2]] == [
        {"role": "assistant", "content": ""}, {"role": "assistant", "content": "4"}]
    assert lines[1] == []  # (at most one empty line a second)
    whole = ollama_over_openai("ollama.generate")
    assert "chat_template_kwargs" in whole.request({"model": "m", "prompt": "p", "think": False}, stream=False)
    value = json.loads(whole.whole({"choices": [{"message": {"content": "4", "reasoning_content": "2+2"}}]}, None))
    assert value["response"] == "4" and "thinking" not in value
    for think in (True, "high", None):
        assert "chat_template_kwargs" not in ollama_over_openai("ollama.chat").request(
            {"model": "m", "messages": [HI], "think": think}, stream=False)


def test_a_completion_over_ollama_says_it_is_alive_while_its_model_thinks() -> None:
    """Regression: Ollama thinks by default for a thinking model; a completion has no place for
    thinking, so its lines were dropped and a model that thought past ``first_token_s`` was cut
    with a 504. An SSE comment (clients skip it) goes out at most once a second instead."""
    translator = openai_over_ollama("openai.completions")
    translator.request({"model": "m", "prompt": "p"}, stream=True)
    out = [translator.chunk({"response": "", "thinking": word, "done": False}) for word in ("a", "b")]
    assert out == [[b": thinking\n\n"], []]
    [event] = translator.chunk({"response": "Four", "done": False})
    assert sse(event)["choices"][0]["text"] == "Four"


def test_an_earlier_turn_s_thinking_reaches_an_openai_engine() -> None:
    """Regression: an Ollama assistant message's ``thinking`` was dropped on its way to an
    OpenAI-compatible engine (the other way it was kept); llama.cpp's templates read it back as
    ``reasoning_content``, vLLM's since 0.11 as ``reasoning`` (it went only as the first, which vLLM
    drops: a hunt)."""
    request = ollama_over_openai("ollama.chat").request({"model": "m", "messages": [
        HI, {"role": "assistant", "content": "Hello", "thinking": "I pondered"}, HI]}, stream=False)
    assert request["messages"][1] == {"role": "assistant", "content": "Hello", "reasoning_content": "I pondered",
                                      "reasoning": "I pondered"}


@pytest.mark.parametrize("image, kind", [
    (base64.b64encode(b"\x89PNG\r\n\x1a\nrest").decode(), "image/png"),
    (base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF").decode(), "image/jpeg"),
    (base64.b64encode(b"GIF89a....").decode(), "image/gif"),
    (base64.b64encode(b"RIFF\x00\x00\x00\x00WEBPVP8 ").decode(), "image/webp"),
    (base64.b64encode(b"RIFF\x00\x00\x00\x00WAVEfmt ").decode(), "image/png"),  # (a RIFF, not a WebP)
    ("QUJD", "image/png"), ("not base64!", "image/png")])
def test_an_ollama_image_reaches_an_openai_engine_typed_by_its_bytes(image: str, kind: str) -> None:
    """Regression: every image was sent as image/png; an engine that trusts the type (LiteLLM passes
    it to providers that check it) refused a JPEG."""
    request = ollama_over_openai("ollama.chat").request(
        {"model": "m", "messages": [{"role": "user", "content": "what?", "images": [image]}]}, stream=False)
    assert request["messages"][0]["content"][1]["image_url"]["url"] == f"data:{kind};base64,{image}"


@pytest.mark.parametrize("kind, ok", [("image/png", True), ("image/jpeg", True), ("image/jpg", True),
                                      ("image/webp", True), ("", True), ("IMAGE/PNG", True),
                                      ("image/gif", False), ("text/plain", False), ("image/svg+xml", False)])
def test_an_image_ollama_cannot_read_is_a_400_not_a_502_tried_on_every_worker(kind: str, ok: bool) -> None:
    """Regression: a GIF (or any data: URL) went to Ollama, whose runner failed it: a 502, retried
    on every worker. Ollama's own OpenAI layer takes JPEG, PNG and WebP, and unadorned base64."""
    body = {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:{kind};base64,QUJD"}}]}]}
    if ok:
        assert openai_over_ollama("openai.chat").request(body, stream=False)["messages"][0]["images"] == ["QUJD"]
    else:
        with pytest.raises(Untranslatable, match="JPEG, PNG and WebP"):
            openai_over_ollama("openai.chat").request(body, stream=False)


def test_api_show_over_an_openai_engine_says_what_its_models_can_do() -> None:
    """``ollama run`` attaches an image only to a model whose capabilities say ``vision``."""
    translator = translator_for("openai", "ollama.show", ("completion", "tools", "vision"))
    assert isinstance(translator, OllamaOverOpenAI)
    translator.request({"model": "m"}, stream=False)
    assert json.loads(translator.whole({}, None))["capabilities"] == ["completion", "tools", "vision"]


def test_an_ollama_client_s_logprobs_reach_an_openai_engine_and_come_back_in_ollama_s_shape() -> None:
    """Regression (hunt): ``logprobs`` and ``top_logprobs`` (the ollama SDK sends both) were dropped
    for an OpenAI-compatible engine, and the answer came back without them and without a word."""
    top = [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}, {"token": "Yo", "logprob": -2.5}]
    chat_logprobs = {"content": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": top}]}
    expected = [{"token": "Hi", "logprob": -0.1, "top_logprobs": [{"token": "Hi", "logprob": -0.1},
                                                                   {"token": "Yo", "logprob": -2.5}]}]
    translator = ollama_over_openai("ollama.chat")
    request = translator.request({"model": "m", "messages": [HI], "logprobs": True, "top_logprobs": 2}, stream=True)
    assert (request["logprobs"], request["top_logprobs"]) == (True, 2)
    [line] = translator.chunk({"choices": [{"delta": {"content": "Hi"}, "logprobs": chat_logprobs}]})
    assert ndjson(line)["logprobs"] == expected
    whole = ollama_over_openai("ollama.generate")
    whole.request({"model": "m", "prompt": "p", "logprobs": True}, stream=False)
    value = json.loads(whole.whole({"choices": [{"message": {"content": "Hi"}, "logprobs": chat_logprobs}]}, None))
    assert value["logprobs"] == expected and value["response"] == "Hi"
    raw = ollama_over_openai("ollama.generate")  # a completion's logprobs are parallel lists
    assert raw.request({"model": "m", "prompt": "p", "raw": True, "logprobs": True, "top_logprobs": 2},
                       stream=False)["logprobs"] == 2
    value = json.loads(raw.whole({"choices": [{"text": "Hi", "logprobs": {
        "tokens": ["Hi"], "token_logprobs": [-0.1], "top_logprobs": [{"Hi": -0.1, "Yo": -2.5}]}}]}, None))
    assert value["logprobs"] == expected
    ragged = json.loads(raw.whole({"choices": [{"text": "Hi", "logprobs": {  # (review: the SDK refused nulls)
        "tokens": ["Hi", "x", None], "token_logprobs": [-0.1, None], "top_logprobs": [None]}}]}, None))
    assert ragged["logprobs"] == [{"token": "Hi", "logprob": -0.1, "top_logprobs": []}]
    ollama.GenerateResponse.model_validate(ragged)
    plain = ollama_over_openai("ollama.chat")
    assert "logprobs" not in plain.request({"model": "m", "messages": [HI]}, stream=False)
    assert "logprobs" not in json.loads(plain.whole({"choices": [{"message": {"content": "Hi"}}]}, None))


def test_ollama_logprobs_are_openai_s_for_a_chat_and_for_a_completion() -> None:
    """Each entry with a text token and a number, with Ollama's ``bytes`` or its text's; a completion's
    parallel lists carry each token's offset in the text, across lines; the thinking's entries, which
    Ollama lists first, are left out (review: they shifted a completion's offsets)."""
    line = {"response": "é", "done": False, "logprobs": [
        {"token": "hm", "logprob": -0.1},
        {"token": "é", "logprob": -0.5, "top_logprobs": [{"token": "é", "logprob": -0.5},
                                                          {"token": "x", "logprob": None},
                                                          {"token": "\ufffd", "logprob": -3, "bytes": [240, 159]}]},
        {"token": None, "logprob": -1.0}]}
    chat = openai_over_ollama("openai.chat")
    request = chat.request({"model": "m", "messages": [HI], "logprobs": True, "top_logprobs": 1}, False)
    assert request["top_logprobs"] == 1
    assert chat._logprobs(line, "é") == {"content": [{"token": "é", "logprob": -0.5, "bytes": [195, 169],
                                                      "top_logprobs": [
        {"token": "é", "logprob": -0.5, "bytes": [195, 169]}, {"token": "\ufffd", "logprob": -3, "bytes": [240, 159]}]}]}
    assert chat._logprobs(line, "") is None  # (a line of thinking alone)
    completion = openai_over_ollama("openai.completions")
    request = completion.request({"model": "m", "prompt": "p", "logprobs": 0}, True)
    assert request["logprobs"] is True and request["top_logprobs"] == 0
    assert [completion._logprobs(line, "é")["text_offset"] for _ in range(2)] == [[0], [1]]  # type: ignore[index]
    assert completion._logprobs({"logprobs": "no"}, "é") is None
    plain = openai_over_ollama("openai.completions")
    assert "logprobs" not in plain.request({"model": "m", "prompt": "p", "logprobs": None}, True)
    assert plain._logprobs(line, "é") is None
