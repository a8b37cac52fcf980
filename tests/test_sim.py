"""The simulator speaks Ollama's API and its OpenAI layer, on the timetable and limits it is given."""

from __future__ import annotations

import base64
import datetime
import json
import struct
from typing import Any, Literal

import ollama
import openai
import pydantic
import pytest
import trio
import trio.testing

from conftest import Grid, chat, eventually, run_ghubai
from ghubai.sim.generator import SimOptions, Simulator, fit


async def test_ollama_chat_streams_ndjson_and_respects_num_predict(grid: Grid) -> None:
    url, _ = await grid.sim(tokens=20)
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi there"}], "options": {"num_predict": 4}}
    async with grid.http.stream("POST", url + "/api/chat", json=body) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    assert [line["done"] for line in lines] == [False] * 4 + [True]
    last = lines[-1]
    assert (last["done_reason"], last["prompt_eval_count"], last["eval_count"]) == ("length", 2, 4)


async def test_generate_non_streaming_and_text_is_deterministic(grid: Grid) -> None:
    url, _ = await grid.sim(tokens=6)
    body = {"model": "sim", "prompt": "same prompt", "stream": False}
    first = (await grid.http.post(url + "/api/generate", json=body)).json()
    second = (await grid.http.post(url + "/api/generate", json=body)).json()
    assert first["response"] == second["response"] and len(first["response"].split()) == 6
    assert first["done"] is True and first["eval_count"] == 6


async def test_openai_layer_completions_and_models(grid: Grid) -> None:
    url, _ = await grid.sim(models=["a", "b:latest"], tokens=3)
    assert [m["id"] for m in (await grid.http.get(url + "/v1/models")).json()["data"]] == ["a", "b:latest"]
    assert [m["name"] for m in (await grid.http.get(url + "/api/tags")).json()["models"]] == ["a", "b:latest"]
    reply = (await grid.http.post(url + "/v1/completions", json={"model": "a", "prompt": "x"})).json()
    assert reply["object"] == "text_completion" and reply["usage"]["completion_tokens"] == 3
    assert (await grid.http.get(url + "/api/version")).json()["version"]


async def test_embeddings_in_both_dialects(grid: Grid) -> None:
    url, _ = await grid.sim(embed_dim=8)
    native = (await grid.http.post(url + "/api/embed", json={"model": "sim", "input": ["a", "b"]})).json()
    assert len(native["embeddings"]) == 2 and len(native["embeddings"][0]) == 8
    b64 = (await grid.http.post(url + "/v1/embeddings", json={"model": "sim", "input": "a",
                                                             "encoding_format": "base64"})).json()
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert all(abs(x - y) < 1e-6 for x, y in zip(decoded, native["embeddings"][0]))


async def test_unknown_model_and_failures_in_ollama_shape(grid: Grid) -> None:
    url, _ = await grid.sim()
    missing = await grid.http.post(url + "/api/chat", json=chat(model="nope"))
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    openai_missing = await grid.http.post(url + "/v1/chat/completions", json=chat(model="nope"))
    assert openai_missing.status_code == 404 and openai_missing.json()["error"]["message"]
    failing_url, failing = await grid.sim(fail_rate=1.0)
    assert (await grid.http.post(failing_url + "/api/chat", json=chat())).status_code == 500
    assert failing.stats.failed == 1 and failing.stats.started == 0


async def test_content_its_engine_refuses_is_a_400_not_a_dropped_connection(grid: Grid) -> None:
    """Regression: a content part whose text was a list raised inside the simulator, which dropped
    the connection (a worker's 502); and Ollama refuses content parts, which it took."""
    url, _ = await grid.sim()
    parts = [{"role": "user", "content": [{"type": "text", "text": ["x"]}]}]
    for path, messages in (("/v1/chat/completions", parts),
                           ("/api/chat", [{"role": "user", "content": [{"type": "text", "text": "x"}]}])):
        response = await grid.http.post(url + path, json={"model": "sim", "messages": messages, "stream": False})
        assert response.status_code == 400 and "content must be a string" in response.text, (path, response.text)


async def test_fail_after_tokens_ends_the_ndjson_stream_with_an_error_line(grid: Grid) -> None:
    url, sim = await grid.sim(fail_after_tokens=2)
    async with grid.http.stream("POST", url + "/api/chat", json=chat(stream=True)) as response:
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    assert len(lines) == 3 and "error" in lines[-1] and sim.stats.failed == 1


async def test_max_parallel_makes_the_rest_wait(grid: Grid) -> None:
    url, sim = await grid.sim(max_parallel=2, itl_ms=10, tokens=20)

    async def one() -> None:
        assert (await grid.http.post(url + "/api/chat", json=chat(stream=False))).status_code == 200

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)

        async def queued() -> bool:
            return sim.stats.active == 2 and sim.stats.waiting == 3

        await eventually(queued, "two generating and three waiting")
    assert sim.stats.completed == 5


async def test_disconnect_while_waiting_for_the_first_token_is_seen(grid: Grid) -> None:
    url, sim = await grid.sim(ttft_ms=60_000)
    with trio.move_on_after(0.3):
        await grid.http.post(url + "/api/chat", json=chat())

    async def cancelled() -> bool:
        return sim.stats.cancelled == 1 and sim.stats.active == 0

    await eventually(cancelled, "the simulator to notice the client left")


async def _answer(sim: Simulator, model: str, prompt: str) -> float:
    """Run one generation to its end; its time to first token."""
    start = trio.current_time()
    first = None
    async for _ in sim.run(sim.plan(prompt, 2), prompt, model):
        first = first if first is not None else trio.current_time() - start
    assert first is not None
    return first


async def test_a_model_not_in_memory_is_loaded_and_the_least_recently_used_evicted(
        autojump_clock: trio.testing.MockClock) -> None:
    sim = Simulator(SimOptions(models=("a", "b", "c"), ttft_ms=0, itl_ms=0, load_ms=500, max_loaded=2))
    assert sim.loaded() == []
    assert await _answer(sim, "a", "hi") == 0.5
    assert await _answer(sim, "a", "hi") == 0.0  # resident now
    await _answer(sim, "b", "hi")
    await _answer(sim, "a", "hi")  # a is the most recently used: c evicts b
    await _answer(sim, "c", "hi")
    assert sim.loaded() == ["a", "c"] and sim.stats.loads == 3
    assert await _answer(sim, "b", "hi") == 0.5 and sim.stats.loads == 4


async def test_an_unload_is_answered_at_once_and_evicts_the_model_as_its_last_generation_ends(
        autojump_clock: trio.testing.MockClock) -> None:
    """As Ollama unloads: at once, or, while the model generates, once it is done (its slots' caches
    with it); a load after that keeps it; and an unload never waits behind a load of another model
    that waits for memory (reviews)."""
    sim = Simulator(SimOptions(models=("a", "b"), ttft_ms=0, itl_ms=100, load_ms=10, max_loaded=1,
                               prefill_us_per_token=1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer, sim, "a", "a long answer")
        await trio.sleep(0.05)  # (fake time: a loaded, and generating)
        nursery.start_soon(_answer, sim, "b", "b waits for memory")  # (holds the load lock, waiting)
        await trio.testing.wait_all_tasks_blocked()
        began = trio.current_time()
        await sim.preload("a", "unload")
        assert trio.current_time() == began and sim.loaded() == ["a"]  # (at once; a still generates)
    assert sim.loaded() == ["b"] and not any(slot.model == "a" for slot in sim.free)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_answer, sim, "a", "again")
        await trio.sleep(0.05)
        await sim.preload("a", "unload")
        await sim.preload("a", "load")  # (asked for again: it stays)
    assert sim.loaded() == ["a"]


async def test_a_slot_computes_only_the_part_of_a_prompt_its_cache_lacks(
        autojump_clock: trio.testing.MockClock) -> None:
    sim = Simulator(SimOptions(ttft_ms=0, itl_ms=0, prefill_us_per_token=1000, max_parallel=2))
    system = " ".join(["system"] * 100)
    assert await _answer(sim, "sim", system + " first question") == pytest.approx(0.102)
    assert await _answer(sim, "sim", system + " first question answer second question") == pytest.approx(0.003)
    assert await _answer(sim, "sim", "another conversation") == pytest.approx(0.002)  # the other slot, empty
    assert sim.stats.prefill_tokens_computed == 102 + 3 + 2
    assert await _answer(sim, "sim", system + " other") == pytest.approx(0.001)  # the slot that holds the system prompt


async def test_a_prompt_that_shares_little_with_a_slot_s_cache_takes_the_least_recently_used_slot(
        autojump_clock: trio.testing.MockClock) -> None:
    """Regression (hunt): a prompt sharing one word with a slot's cache took that slot and wiped a
    conversation's cache while other slots stood empty; llama.cpp takes such a slot only when the cache
    holds more than a tenth of the prompt (``--slot-prompt-similarity``), else the least recently used."""
    sim = Simulator(SimOptions(ttft_ms=0, itl_ms=0, prefill_us_per_token=1000, max_parallel=2))
    conversation = " ".join(["context"] * 50)
    await _answer(sim, "sim", conversation)
    await _answer(sim, "sim", "context but a stranger of many other words after it")
    assert await _answer(sim, "sim", conversation + " more") == pytest.approx(0.001)  # its cache is whole


async def test_api_ps_lists_what_is_in_memory(grid: Grid) -> None:
    url, sim = await grid.sim(models=("a", "b"), load_ms=1, max_loaded=1)
    assert (await grid.http.get(url + "/api/ps")).json()["models"] == []
    assert (await grid.http.post(url + "/api/generate", json={"model": "b", "prompt": "hi", "stream": False})
            ).status_code == 200
    assert [m["name"] for m in (await grid.http.get(url + "/api/ps")).json()["models"]] == ["b"]
    assert (await grid.http.get(url + "/sim/stats")).json()["loads"] == 1


async def test_a_model_is_never_evicted_under_a_running_generation(autojump_clock: trio.testing.MockClock) -> None:
    """Regression: a request that found its model in memory while waiting for a slot then ran on a
    model evicted meanwhile, with no reload: swaps looked cheaper than an engine makes them."""
    sim = Simulator(SimOptions(models=("a", "b"), ttft_ms=10, itl_ms=10, load_ms=100, max_loaded=1, max_parallel=1))
    async with trio.open_nursery() as nursery:
        for model in ("a", "b", "a"):
            nursery.start_soon(_answer, sim, model, "hi")
            await trio.testing.wait_all_tasks_blocked()
    assert sim.stats.loads == 3 and sim.stats.completed == 3


async def test_structured_answers_fit_the_schemas_pydantic_writes(grid: Grid) -> None:
    """Regression (hunt): the simulator read only types, properties and enum, so a Pydantic model
    with an Optional, an enum or a nested model (``$ref``, ``anyOf``) got ``{"answer": ...}`` and
    the openai SDK's ``parse`` raised, where a real engine constrains its answer to the schema."""
    class Address(pydantic.BaseModel):
        city: str
        zip: str | None = None

    class Node(pydantic.BaseModel):
        name: str
        children: list[Node] = []

    class Person(pydantic.BaseModel):
        name: str
        nick: str | None
        kind: Literal["a", "b"]
        home: Address
        others: list[Address]
        born: datetime.datetime
        tree: Node

    url, _ = await grid.sim()
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
        parsed = await sdk.chat.completions.parse(model="sim", messages=[{"role": "user", "content": "who"}],
                                                  response_format=Person)
        assert isinstance(parsed.choices[0].message.parsed, Person)
        called = await sdk.chat.completions.parse(model="sim", messages=[{"role": "user", "content": "call"}],
                                                  tools=[openai.pydantic_function_tool(Address)],
                                                  tool_choice="required")
        assert isinstance(called.choices[0].message.tool_calls[0].function.parsed_arguments, Address)
    native = await ollama.AsyncClient(host=url).chat(model="sim", messages=[{"role": "user", "content": "who"}],
                                                     format=Person.model_json_schema())
    Person.model_validate_json(native.message.content)


async def test_the_responses_api_answers_with_its_tools_formats_and_instructions(grid: Grid) -> None:
    """Hunt: the simulator's Responses API read tools and JSON formats as chat completions give them:
    a forced flat tool was an empty answer (the Agents SDK's default model got nothing), and
    ``responses.parse`` got text; its ``instructions`` were neither counted nor said back."""
    class Address(pydantic.BaseModel):
        city: str
        zip: int

    url, _ = await grid.sim()
    weather = {"type": "function", "name": "weather", "description": "", "strict": False,
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    address = openai.pydantic_function_tool(Address)["function"]
    tools: Any = [weather, {"type": "function", **address}]
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
        plain = await sdk.responses.create(model="sim", input="once upon")
        told = await sdk.responses.create(model="sim", instructions="be very brief", input="once upon")
        assert told.instructions == "be very brief" and told.usage.input_tokens == plain.usage.input_tokens + 3
        for choice, name in (("required", "weather"), ({"type": "function", "name": "Address"}, "Address")):
            called = await sdk.responses.create(model="sim", input="where", tools=tools, tool_choice=choice)
            assert [(item.type, item.name) for item in called.output] == [("function_call", name)], called.output
            assert isinstance(json.loads(called.output[0].arguments), dict)
            assert called.to_dict()["tool_choice"] == choice
        async with sdk.responses.stream(model="sim", input="where", tools=tools, tool_choice="required") as stream:
            events = [event.type async for event in stream]
            final = await stream.get_final_response()
        assert "response.function_call_arguments.done" in events and "response.output_text.delta" not in events
        assert final.output[0].type == "function_call" and json.loads(final.output[0].arguments).keys() == {"city"}
        parsed = await sdk.responses.parse(model="sim", input="who", text_format=Address)
        assert isinstance(parsed.output_parsed, Address) and parsed.text.format.type == "json_schema"
        whole = await sdk.responses.create(model="sim", input="who", text={"format": {"type": "json_object"}})
        assert isinstance(json.loads(whole.output_text), dict)


async def test_requests_are_answered_as_each_api_reads_them(grid: Grid) -> None:
    """Regression (hunt): stop sequences were ignored; a JSON answer overran ``max_tokens``;
    ``dimensions`` was ignored; ``max_tokens`` and ``response_format`` were honoured on Ollama's API,
    where Ollama ignores them (a translation that forgot to rename them passed every test); a
    request without a model was a 404 for model "None"; ``llama3`` did not find ``llama3:latest``;
    ``/api/generate`` gave no ``context`` and durations of 1 ns."""
    url, _ = await grid.sim(models=["llama3:latest"], tokens=8, embed_dim=16)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
        whole = await sdk.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "hi"}])
        words = whole.choices[0].message.content.split()
        stopped = await sdk.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "hi"}],
                                                    stop=[words[3]])
        assert stopped.choices[0].message.content.split() == words[:3]
        assert stopped.choices[0].finish_reason == "stop"
        cut = await sdk.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "hi"}],
                                                response_format={"type": "json_object"}, max_tokens=2)
        assert (cut.usage.completion_tokens, cut.choices[0].finish_reason) == (2, "length")
        short = await sdk.embeddings.create(model="llama3", input="x", dimensions=4, encoding_format="float")
        assert len(short.data[0].embedding) == 4 and abs(sum(v * v for v in short.data[0].embedding) - 1) < 1e-6
        assert (await sdk.models.retrieve("llama3")).id == "llama3"
    chat_body = {"model": "llama3:latest", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    ignored = (await grid.http.post(url + "/api/chat", json={**chat_body, "max_tokens": 2,
                                                             "response_format": {"type": "json_object"}})).json()
    assert ignored["eval_count"] == 8 and not ignored["message"]["content"].startswith("{")
    stopped_native = (await grid.http.post(url + "/api/chat",
                                           json={**chat_body, "options": {"stop": [words[3]]}})).json()
    assert stopped_native["message"]["content"].split() == words[:3]
    embedded = (await grid.http.post(url + "/api/embed",
                                     json={"model": "llama3", "input": "x", "dimensions": 4})).json()
    assert len(embedded["embeddings"][0]) == 4
    nameless = await grid.http.post(url + "/api/chat", json={"messages": []})
    assert nameless.status_code == 400 and nameless.json()["error"] == "model is required"
    generated = await ollama.AsyncClient(host=url).generate(model="llama3", prompt="hi there")
    assert generated.context and generated.eval_count == 8
    assert generated.eval_duration > 1_000_000  # (7 tokens 1 ms apart)
    assert generated.total_duration >= generated.eval_duration


async def test_an_openai_stream_begins_with_its_first_token_and_the_paths_clients_probe_answer(grid: Grid) -> None:
    """Regression (hunt): the OpenAI stream's role chunk went out before the first token (before a
    slot, a load, the time to first token), so a hub's ``first_token_s`` never fired over an
    OpenAI-kind engine; ``HEAD /`` (the ollama command's check), ``GET /v1/models/{id}`` and a large
    body (a photo, over 4 MiB) were refused; a wrong method was a 404, not Ollama's 405."""
    url, _ = await grid.sim(ttft_ms=3000)
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with grid.http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        with trio.move_on_after(0.5):  # (nothing may come before the first token, 3 s away)
            async for chunk in response.aiter_bytes():
                raise AssertionError(f"{chunk!r} before the first token")
    for path in ("/", "/api/version", "/api/tags"):
        assert (await grid.http.head(url + path)).status_code == 200
    wrong = await grid.http.get(url + "/api/chat")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    fast_url, _ = await grid.sim(tokens=2)
    photo = "A" * (6 << 20)
    large = await grid.http.post(fast_url + "/api/chat", json={**body, "stream": False, "messages": [
        {"role": "user", "content": "what is this", "images": [photo]}]})
    assert large.status_code == 200


def test_a_value_fits_merged_and_long_schemas() -> None:
    """Review: ``allOf`` kept only its last part's properties, and ``minItems`` over 100 got 100."""
    both = {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                      {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]}
    assert fit(both) == {"a": "sim", "b": 1}
    assert fit({"allOf": [{"format": "date"}]}, depth=1) == "2026-01-01"  # (review: no type is no object)
    inherited = {"$defs": {"Base": {"type": "object", "properties": {"x": {"type": "integer"}}},
                           "Mid": {"allOf": [{"$ref": "#/$defs/Base"}], "properties": {"y": {"type": "string"}}}},
                 "allOf": [{"$ref": "#/$defs/Mid"}], "properties": {"z": {"type": "boolean"}}}
    assert fit(inherited) == {"x": 1, "y": "sim", "z": True}
    itself = {"$defs": {"A": {"allOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/A"}]}},
              "allOf": [{"$ref": "#/$defs/A"}]}  # (review: merged 4 ways a level, 32 levels deep: hours)
    assert fit(itself) == "sim"  # (an answer, at once: a part that names only itself has no type)
    assert len(fit({"type": "array", "items": {"type": "integer"}, "minItems": 150})) == 150


async def test_a_model_asked_for_without_its_tag_is_the_one_in_memory(grid: Grid) -> None:
    """Review: ``llama3`` for ``llama3:latest`` was loaded as a model of its own: ``/api/ps`` listed a
    name ``/api/tags`` does not, and asking by the other name loaded it again."""
    url, sim = await grid.sim(models=["llama3:latest", "other"], max_loaded=1, load_ms=1, tokens=2)
    for name in ("llama3", "llama3:latest", "llama3"):
        answer = (await grid.http.post(url + "/api/chat", json={**chat(model=name), "stream": False})).json()
        assert answer["model"] == name  # (named as asked, as Ollama answers)
    assert sim.stats.loads == 1
    assert [model["name"] for model in (await grid.http.get(url + "/api/ps")).json()["models"]] == ["llama3:latest"]


def test_max_parallel_below_one_is_refused_in_one_line() -> None:
    """Regression (hunt): ``--max-parallel 0`` started a simulator whose every generation hung, and
    ``-1`` ended in a traceback."""
    for value in ("0", "-1"):
        done = run_ghubai("sim", f"--max-parallel={value}")
        assert done.returncode == 2 and "expected a whole number from 1" in done.stderr
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flag, value, said", [
    ("--tokens", "-5", "whole number from 0"), ("--fail-rate", "2", "number from 0 to 1"),
    ("--itl-ms", "inf", "number from 0,"), ("--ttft-ms", "-1", "number from 0,"), ("--models", ",", "one model name"),
    ("--embed-dim", "100000000000", "whole number from 1 to 65536"),  # (hunt: it froze, deaf to Ctrl-C)
])
def test_a_nonsense_simulator_setting_is_refused_in_one_line(flag: str, value: str, said: str) -> None:
    """Regression (left alone before): these started a simulator that hung (an endless sleep between
    tokens), failed every request, or listed no model."""
    done = run_ghubai("sim", "--listen", "127.0.0.1:0", f"{flag}={value}")
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
