"""Every client speaks to the grid: OpenAI's completions, embeddings and model lookup, and Ollama's
native API, through the proxy, over an Ollama engine (the simulator)."""

from __future__ import annotations

import json
import re
from typing import Any

import ollama
import openai
import pytest
import trio
from openai.types.responses import ResponseErrorEvent

from conftest import Grid, chat
from ghubai import dialects
from ghubai.http11.server import Connection, Request
from ghubai.worker.engine import PROBE_MODEL


async def proxied_grid(grid: Grid, kind: str = "ollama") -> str:
    sim_url, _ = await grid.sim(tokens=6, embed_dim=8)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, kind=kind)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")
    return proxy.value


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_openai_completions_embeddings_and_model_lookup(grid: Grid, kind: str) -> None:
    url = await proxied_grid(grid, kind)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
        completion = await sdk.completions.create(model="sim", prompt="once upon", max_tokens=4)
        assert completion.object == "text_completion" and len(completion.choices[0].text.split()) == 4
        streamed = [c async for c in await sdk.completions.create(model="sim", prompt="x", stream=True)]
        assert sum(1 for c in streamed if c.choices and c.choices[0].text) == 6
        vectors = await sdk.embeddings.create(model="sim", input=["a", "b"])  # base64 by default
        assert [len(item.embedding) for item in vectors.data] == [8, 8]
        assert (await sdk.models.retrieve("sim")).id == "sim"
        try:
            await sdk.models.retrieve("nope")
            raise AssertionError("an unknown model was found")
        except openai.NotFoundError as error:
            assert error.code == "model_not_found"


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_the_responses_api_reaches_engines_that_serve_it_whole_and_streamed(grid: Grid, kind: str) -> None:
    """The openai SDK's own first example is ``client.responses.create``; the grid said 404 'Unknown
    endpoint'. vLLM and Ollama (0.13.3 on) serve it: the worker passes it on, as the engine says it,
    through hub and proxy, and the usage in its last event is counted."""
    url = await proxied_grid(grid, kind)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
        whole = await sdk.responses.create(model="sim", instructions="be brief", input="once upon")
        assert whole.status == "completed" and len(whole.output_text.split()) == 6
        assert (whole.usage.input_tokens, whole.usage.output_tokens) == (4, 6)  # (its instructions count)
        cut = await sdk.responses.create(model="sim", input=[{"role": "user", "content": "x"}], max_output_tokens=3)
        assert cut.status == "incomplete" and len(cut.output_text.split()) == 3
        events = [event async for event in await sdk.responses.create(model="sim", input="x", stream=True)]
        assert [event.type for event in events][:2] == ["response.created", "response.in_progress"]
        assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == \
            events[-1].response.output_text and events[-1].type == "response.completed"
        async with sdk.responses.stream(model="sim", input="x") as stream:  # (the SDK's helper reads the events)
            assert len((await stream.get_final_response()).output_text.split()) == 6
    raw = await grid.http.post(url + "/v1/responses", json={"model": "sim", "input": "x", "stream": True})
    assert not raw.text.rstrip().endswith("[DONE]") and raw.text.count("response.completed") == 1
    hub_url = (await grid.http.get(url + "/health")).json()["hubs"][0]["address"]
    metrics = (await grid.http.get(hub_url + "/metrics")).text  # (6 + 3 + 6 + 6 + 6 tokens, from the engine's counts)
    assert 'ghubai_tokens_total{model="sim",type="completion"} 27.0' in metrics
    refused = await grid.http.post(url + "/v1/responses", json={"model": "sim", "input": 3})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "input"
    # (a review: an engine's 404 for a response it does not hold took the API off every worker)
    stale = await grid.http.post(url + "/v1/responses",
                                 json={"model": "sim", "input": "x", "previous_response_id": "r1"})
    assert stale.status_code == 404 and "Response with id 'r1' not found" in stale.json()["error"]["message"]
    assert stale.json()["error"]["code"] != "model_not_found", stale.text  # (review: the model was found)
    assert (await grid.http.post(url + "/v1/responses", json={"model": "sim", "input": "x"})).status_code == 200
    assert all("openai.responses" in worker["apis"] for worker in await grid.workers(hub_url))


async def test_a_responses_stream_the_engine_breaks_ends_in_an_error_and_an_engine_without_the_api_is_a_501(
        grid: Grid) -> None:
    failing_url, _ = await grid.sim(fail_after_tokens=2)
    older_url, _ = await grid.sim(models=("old",), disabled=frozenset({"/v1/responses"}))  # (Ollama before 0.13.3)
    hub = await grid.hub()
    await grid.worker(hub.value, failing_url, name="failing")
    await grid.worker(hub.value, older_url, name="older")
    async with openai.AsyncOpenAI(base_url=hub.value + "/v1", api_key="x", max_retries=0) as sdk:
        events = []
        with pytest.raises(openai.APIError, match="after 2 tokens"):
            async for event in await sdk.responses.create(model="sim", input="x", stream=True):
                events.append(event.type)
        assert events.count("response.output_text.delta") == 2 and "response.completed" not in events
        with pytest.raises(openai.InternalServerError) as unserved:
            await sdk.responses.create(model="old", input="x")
        assert unserved.value.status_code == 501 and unserved.value.code == "api_not_served"
    raw = await grid.http.post(hub.value + "/v1/responses", json={"model": "sim", "input": "x", "stream": True})
    *events, last = raw.text.rstrip("\n").split("\n\n")
    event, data = last.split("\n")  # (hunt: typed, as its other events, and numbered after them)
    error = ResponseErrorEvent.model_validate_json(data.removeprefix("data: "))
    before = json.loads(events[-1].partition("data: ")[2])
    assert event == "event: error" and error.sequence_number == before["sequence_number"] + 1 > 1


async def test_ollama_native_api_streams_ndjson_by_default(grid: Grid) -> None:
    url = await proxied_grid(grid)
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    async with grid.http.stream("POST", url + "/api/chat", json=body) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) async for line in response.aiter_lines() if line]
    assert [line["done"] for line in lines] == [False] * 6 + [True] and lines[-1]["eval_count"] == 6
    generated = (await grid.http.post(url + "/api/generate", json={"model": "sim", "prompt": "x",
                                                                  "stream": False})).json()
    assert generated["done"] and len(generated["response"].split()) == 6
    embedded = (await grid.http.post(url + "/api/embed", json={"model": "sim", "input": "x"})).json()
    assert len(embedded["embeddings"][0]) == 8
    assert (await grid.http.get(url + "/api/tags")).json()["models"][0]["name"] == "sim"
    for path in ("/api/chat", "/api/show"):  # (hunt: the ``ollama`` command reads "not found" in Ollama's words)
        missing = await grid.http.post(url + path, json={"model": "nope", "messages": []})
        assert missing.status_code == 404 and missing.json()["error"] == "model 'nope' not found (no worker serves it)"
    bad = await grid.http.post(url + "/api/chat", content=b"{")
    assert bad.status_code == 400 and isinstance(bad.json()["error"], str)


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_an_engine_error_mid_stream_reaches_the_ollama_client(grid: Grid, kind: str) -> None:
    sim_url, _ = await grid.sim(fail_after_tokens=2)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, kind=kind)
    response = await grid.http.post(hub.value + "/api/chat", json=chat(stream=True))
    lines = [json.loads(line) for line in response.text.splitlines() if line]
    assert len(lines) == 3 and "after 2 tokens" in lines[-1]["error"]



async def test_the_official_ollama_client_through_the_proxy(grid: Grid) -> None:
    import ollama

    url = await proxied_grid(grid)

    def session() -> None:
        client = ollama.Client(host=url)
        reply = client.chat(model="sim", messages=[{"role": "user", "content": "hi"}])
        assert len(reply.message.content.split()) == 6 and reply.eval_count == 6
        parts = [part.message.content for part in client.chat(model="sim", stream=True,
                                                               messages=[{"role": "user", "content": "hi"}])]
        assert "".join(parts) == reply.message.content
        assert len(client.generate(model="sim", prompt="x").response.split()) == 6
        assert len(client.embed(model="sim", input=["a", "b"]).embeddings) == 2
        assert [model.model for model in client.list().models] == ["sim"]
        assert [model.model for model in client.ps().models] == ["sim"]
        assert len(client.embeddings(model="sim", prompt="x").embedding) == 8
        assert client.show("sim").details.family == "sim"

    await trio.to_thread.run_sync(session)


async def test_the_ollama_client_over_an_openai_compatible_engine(grid: Grid) -> None:
    """The worker translates Ollama's API for an engine that only speaks OpenAI's (kind = "openai")."""
    import ollama

    sim_url, _ = await grid.sim(tokens=6, embed_dim=8)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, kind="openai")
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")

    def session() -> None:
        client = ollama.Client(host=proxy.value)
        reply = client.chat(model="sim", messages=[{"role": "user", "content": "hi"}], options={"num_predict": 4})
        assert len(reply.message.content.split()) == 4 and reply.eval_count == 4 and reply.done_reason == "length"
        parts = list(client.chat(model="sim", stream=True, messages=[{"role": "user", "content": "hi"}]))
        assert len("".join(p.message.content for p in parts).split()) == 6 and parts[-1].done
        assert parts[-1].prompt_eval_count == 1 and parts[-1].eval_count == 6
        assert len(client.generate(model="sim", prompt="x", system="be brief").response.split()) == 6
        assert [len(v) for v in client.embed(model="sim", input=["a", "b"]).embeddings] == [8, 8]
        assert "completion" in (client.show("sim").capabilities or [])

    await trio.to_thread.run_sync(session)
    async with openai.AsyncOpenAI(base_url=proxy.value + "/v1", api_key="x", max_retries=0) as sdk:
        reply = await sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}])
        assert len(reply.choices[0].message.content.split()) == 6


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_openai_tool_call_round_trip_and_json_answers(grid: Grid, kind: str) -> None:
    sim_url, _ = await grid.sim(tokens=6)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, kind=kind)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")
    messages: list[dict[str, object]] = [{"role": "user", "content": "weather in Paris?"}]
    async with openai.AsyncOpenAI(base_url=proxy.value + "/v1", api_key="x", max_retries=0) as sdk:
        first = await sdk.chat.completions.create(model="sim", messages=messages, tools=WEATHER,
                                                  tool_choice="required")
        [call] = first.choices[0].message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "sim"})
        assert first.choices[0].finish_reason == "tool_calls"
        streamed = [c async for c in await sdk.chat.completions.create(
            model="sim", messages=messages, tools=WEATHER, tool_choice="required", stream=True)]
        deltas = [d for c in streamed if c.choices for d in c.choices[0].delta.tool_calls or []]
        assert deltas and deltas[0].function.name == "get_weather"
        assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        second = await sdk.chat.completions.create(model="sim", messages=messages, tools=WEATHER)
        assert second.choices[0].message.content and second.choices[0].finish_reason == "stop"
        as_json = await sdk.chat.completions.create(model="sim", messages=messages[:1],
                                                    response_format={"type": "json_object"})
        assert isinstance(json.loads(as_json.choices[0].message.content), dict)


async def test_the_hub_counts_tokens_per_model_and_per_worker(grid: Grid) -> None:
    sim_url, _ = await grid.sim(models=["a", "b"], tokens=5)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    for model in ("a", "a", "b"):
        assert (await grid.http.post(hub.value + "/v1/chat/completions", json=chat(model))).status_code == 200
    async with grid.http.stream("POST", hub.value + "/api/chat", json=chat("b", stream=True)) as response:
        assert [line async for line in response.aiter_lines()]
    state = (await grid.http.get(hub.value + "/api/registry")).json()
    assert state["usage"] == {"a": {"prompt_tokens": 4, "completion_tokens": 10},
                              "b": {"prompt_tokens": 4, "completion_tokens": 10}}
    assert state["workers"][0]["usage"] == {"prompt_tokens": 8, "completion_tokens": 20}


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_the_synchronous_openai_client(grid: Grid, kind: str) -> None:
    url = await proxied_grid(grid, kind)

    def session() -> None:
        with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
            reply = sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}])
            assert len(reply.choices[0].message.content.split()) == 6
            chunks = list(sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}],
                                                      stream=True, stream_options={"include_usage": True}))
            assert chunks[-1].usage.completion_tokens == 6
            assert [m.id for m in sdk.models.list().data] == ["sim"]

    await trio.to_thread.run_sync(session)


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_legacy_embeddings_and_running_models(grid: Grid, kind: str) -> None:
    url = await proxied_grid(grid, kind)
    legacy = (await grid.http.post(url + "/api/embeddings", json={"model": "sim", "prompt": "x"})).json()
    assert len(legacy["embedding"]) == 8
    for body in ({}, {"prompt": ""}):  # as Ollama: the model loads, the embedding is empty
        nothing = await grid.http.post(url + "/api/embeddings", json={"model": "sim", **body})
        assert nothing.status_code == 200 and nothing.json() == {"embedding": []}, nothing.text
    assert (await grid.http.post(url + "/api/embeddings", json={"model": "sim", "prompt": 1})).status_code == 400
    assert [m["name"] for m in (await grid.http.get(url + "/api/ps")).json()["models"]] == ["sim"]


async def test_model_lists_carry_a_digest_as_ollamas_cli_reads_it(grid: Grid) -> None:
    """Regression: ``ollama list`` and ``ollama ps`` print ``digest[:12]`` and panicked on the grid's empty
    digest. Each model has 64 hex digits, the same at hub and proxy, different for each model."""
    sim_url, _ = await grid.sim(models=("sim", "other"))
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "other")
    for path in ("/api/tags", "/api/ps"):
        digests: dict[str, str] = {}
        for base in (proxy.value, hub.value):
            for model in (await grid.http.get(base + path)).json()["models"]:
                assert re.fullmatch(r"[0-9a-f]{64}", model["digest"]), model
                assert digests.setdefault(model["name"], model["digest"]) == model["digest"]
        assert "sim" in digests and len(set(digests.values())) == len(digests), digests


async def test_model_lists_carry_what_ollama_engines_tell_of_their_models(grid: Grid) -> None:
    """``ollama list`` printed every model as 0 B, modified 55 years ago, and ``ollama ps`` as 100% CPU:
    the grid passed on names only. An Ollama engine's sizes, digest, date and details now reach Ollama's
    clients at hub and proxy, and the size in memory, the part in VRAM and the context length those in
    memory; llama.cpp's size and parameters too (its /v1/models' "meta")."""
    sim_url, _ = await grid.sim(models=("sim",))
    plain_url, _ = await grid.sim(models=("plain",))
    # a hub whose worker serves "sim" too, over an OpenAI engine: its stand-in, first in the order of
    # the hubs' names (their addresses, here), must not hide the other hub's facts at the proxy (review)
    other, hub = sorted([await grid.hub(), await grid.hub()], key=lambda running: running.value)
    await grid.worker(other.value, sim_url, kind="openai", name="w3")
    await grid.worker(hub.value, sim_url)
    await grid.worker(hub.value, plain_url, kind="openai", name="w2")
    proxy = await grid.proxy(hubs=(other.value, hub.value))
    await grid.wait_for_model(proxy.value, "plain")
    for base in (hub.value, proxy.value):
        async with ollama.AsyncClient(host=base) as client:
            listed = {model.model: model for model in (await client.list()).models}
            running = {model.model: model for model in (await client.ps()).models}
        sim, plain = listed["sim"], listed["plain"]
        assert (sim.size, str(sim.modified_at.date()), sim.details and sim.details.family,
                sim.details and sim.details.quantization_level) == (1_000_000, "2026-01-01", "sim", "Q4_0"), base
        # llama.cpp's /v1/models says a model's size and parameters in its "meta" (the simulator too)
        assert (plain.size, plain.modified_at and plain.modified_at.year,
                plain.details and plain.details.parameter_size) == (1_000_000, 1970, "1.0B")
        held = running["sim"]
        assert (held.size, held.size_vram, held.context_length) == (1_500_000, 1_000_000, 4096), base


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_a_stray_stream_flag_on_an_api_that_never_streams_is_ignored(grid: Grid, kind: str) -> None:
    """Regression: ``"stream": true`` on an embedding or ``/api/show`` made the worker wait for a
    stream: ``/v1/embeddings`` got a retryable 502 (the engine asked again by every worker and
    hub), the ``/api`` ones a 200 with an error line after the answer."""
    url = await proxied_grid(grid, kind)
    for path, body in (("/v1/embeddings", {"input": "hi"}), ("/api/embed", {"input": "hi"}),
                       ("/api/embeddings", {"prompt": "hi"}), ("/api/show", {})):
        response = await grid.http.post(url + path, json={"model": "sim", "stream": True, **body})
        assert response.status_code == 200, (path, response.text)
        assert "error" not in response.json() and response.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_nothing_to_embed_a_null_stream_and_a_suffix_are_read_as_ollama_reads_them(grid: Grid, kind: str) -> None:
    """Regressions (hunt): ``"stream": null`` on ``/api/chat`` is Ollama's default, a stream, but the
    hub took it for a whole answer (over an Ollama engine, which streamed: a 502 after a generation
    on every worker tried); ``/api/embed`` with nothing to embed (the ollama SDK's default input, an
    empty batch) was a 400 where Ollama loads the model and answers no embeddings; a ``suffix`` (fill
    in the middle) was silently dropped on the way to an OpenAI-compatible engine."""
    url = await proxied_grid(grid, kind)
    for path in ("/api/chat", "/api/generate"):
        response = await grid.http.post(url + path, json={**chat(model="sim", stream=None), "prompt": "hi"})
        assert response.status_code == 200 and response.headers["content-type"] == "application/x-ndjson", response.text
        lines = [json.loads(line) for line in response.text.splitlines()]
        assert len(lines) > 1 and lines[-1]["done"] is True
    for body in ({}, {"input": ""}, {"input": []}):
        response = await grid.http.post(url + "/api/embed", json={"model": "sim", **body})
        assert response.status_code == 200 and response.json()["embeddings"] == [], response.text
    for body in ({}, {"input": []}, {"input": 1}):  # OpenAI's API wants some input
        response = await grid.http.post(url + "/v1/embeddings", json={"model": "sim", **body})
        assert response.status_code == 400 and response.json()["error"]["param"] == "input", response.text
    infill = await grid.http.post(url + "/api/generate", json={"model": "sim", "prompt": "def f(", "suffix": "):",
                                                               "stream": False})
    if kind == "openai":  # no engine here fills in the middle: a 400 that says why, not an answer without it
        assert infill.status_code == 400 and "suffix" in infill.json()["error"], infill.text
    else:
        assert infill.status_code == 200, infill.text


async def test_what_an_ollama_engine_cannot_give_an_openai_client_is_a_400_not_a_200_without_it(grid: Grid) -> None:
    """Regression (hunt): over an Ollama engine ``n`` > 1, ``logprobs`` and ``echo`` were dropped: a
    200 with one choice (the SDK's ``choices[1]`` an IndexError), no logprobs, no echoed prompt."""
    url = await proxied_grid(grid, "ollama")
    for path, extra in (("/v1/chat/completions", {"n": 2}), ("/v1/completions", {"echo": True})):
        response = await grid.http.post(url + path, json={**chat(), "prompt": "hi", **extra})
        assert response.status_code == 400 and "Ollama engine" in response.json()["error"]["message"], response.text
    for path, extra in (("/v1/chat/completions", {"n": 1, "logprobs": False}), ("/v1/completions", {"echo": False})):
        assert (await grid.http.post(url + path, json={**chat(), "prompt": "hi", **extra})).status_code == 200


async def test_an_openai_client_s_logprobs_come_from_an_ollama_engine(grid: Grid) -> None:
    """Regression (a hunt): logprobs over an Ollama engine were a 400, though Ollama answers them since
    0.12.11 (and its own OpenAI layer passes them on): a chat's ``content`` list, a completion's
    parallel lists with each token's offset, streamed and whole, as the openai SDK reads them."""
    url = await proxied_grid(grid, "ollama")
    sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    chat_args: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                 "logprobs": True, "top_logprobs": 2}
    whole = (await sdk.chat.completions.create(**chat_args)).choices[0]
    assert whole.logprobs and whole.logprobs.content
    assert "".join(entry.token for entry in whole.logprobs.content) == whole.message.content
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token and
               entry.bytes == list(entry.token.encode()) for entry in whole.logprobs.content)
    streamed = [chunk async for chunk in await sdk.chat.completions.create(**chat_args, stream=True)]
    entries = [entry for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for entry in chunk.choices[0].logprobs.content or []]
    assert "".join(entry.token for entry in entries) == "".join(
        chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices) and entries
    for stream in (False, True):
        answer = await sdk.completions.create(model="sim", prompt="hi", max_tokens=5, logprobs=1, stream=stream)
        choices = [chunk.choices[0] async for chunk in answer] if stream else answer.choices  # type: ignore[union-attr]
        lists = [choice.logprobs for choice in choices if choice.logprobs and choice.logprobs.tokens]
        tokens = [token for part in lists for token in part.tokens or []]
        text = "".join(choice.text for choice in choices)
        assert "".join(tokens) == text and tokens, stream
        offsets = [offset for part in lists for offset in part.text_offset or []]
        assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
        assert all(list(top) == [token] for part in lists
                   for token, top in zip(part.tokens or [], part.top_logprobs or []))
    plain = await grid.http.post(url + "/v1/chat/completions", json={**chat_args, "logprobs": False,
                                                                    "top_logprobs": None})
    assert plain.json()["choices"][0]["logprobs"] is None


async def test_a_batch_of_prompts_is_refused_by_an_ollama_engine_not_cut_to_its_first(grid: Grid) -> None:
    """Regression: ``/v1/completions`` with a list of prompts on an Ollama engine answered the first
    prompt alone, with a 200; Ollama takes one text prompt per request."""
    url = await proxied_grid(grid, "ollama")
    for prompt in (["Say A", "Say B"], [1, 2, 3]):
        response = await grid.http.post(url + "/v1/completions", json={"model": "sim", "prompt": prompt})
        assert response.status_code == 400, response.text
        assert "one text prompt" in response.json()["error"]["message"]
    one = await grid.http.post(url + "/v1/completions", json={"model": "sim", "prompt": ["Say A"], "max_tokens": 2})
    assert one.status_code == 200 and len(one.json()["choices"]) == 1


async def test_an_ollama_name_without_its_tag_means_latest_at_hub_and_proxy(grid: Grid) -> None:
    """Regression: Ollama lists ``llama3.2:latest`` and takes ``llama3.2`` for it, the name people
    type; the grid matched names exactly, so every API answered 404 to the short name."""
    sim_url, _ = await grid.sim(models=("llama3.2:latest", "qwen3:8b", "library/phi:latest"))
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "llama3.2:latest")
    for url in (hub.value, proxy.value):
        for name in ("llama3.2", "llama3.2:latest", "library/phi"):
            for path in ("/api/chat", "/v1/chat/completions"):
                response = await grid.http.post(url + path, json=chat(model=name))
                assert response.status_code == 200, (url, path, name, response.text)
            assert (await grid.http.post(url + "/api/show", json={"name": name})).status_code == 200
            entry = await grid.http.get(url + "/v1/models/" + name)
            served = "library/phi:latest" if name.startswith("library") else "llama3.2:latest"
            assert (entry.status_code, entry.json()["id"]) == (200, served), entry.text  # (was the name asked)
        for name in ("qwen3", "llama3.2:8b", "llama3"):  # a tag other than latest is never guessed
            assert (await grid.http.post(url + "/api/chat", json=chat(model=name))).status_code == 404, name
        for name in ("Llama3.2", "QWEN3:8B", "Library/Phi:Latest"):  # (hunt: Ollama's names, any case)
            response = await grid.http.post(url + "/api/chat", json=chat(model=name))
            assert response.status_code == 200, (url, name, response.text)
        assert (await grid.http.get(url + "/v1/models/QWEN3:8B")).json()["id"] == "qwen3:8b"


async def test_a_model_named_by_its_file_path_is_found_by_its_id(grid: Grid) -> None:
    """Regression (hunt): llama.cpp server names its model by its file (``/models/x.gguf``); the
    hub's ``GET /v1/models/{id}`` took no id that begins with a slash, and redirected (308) to
    another, so the SDK's ``models.retrieve`` said 404 for a model it lists and serves."""
    name = "/models/llama-3-8b.Q4_K_M.gguf"
    sim_url, _ = await grid.sim(models=[name])
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, kind="openai")
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, name)
    for url in (hub.value, proxy.value):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
            assert (await sdk.models.retrieve(name)).id == name
        raw = await grid.http.get(url + "/v1/models/" + name)
        assert raw.status_code == 200 and raw.json()["id"] == name, raw.text
        assert (await grid.http.get(url + "/v1/models//models/other.gguf")).status_code == 404


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_a_load_an_unload_and_token_id_embeddings_as_their_clients_expect(grid: Grid, kind: str) -> None:
    """Regressions: ``/api/chat`` with no messages (``ollama run``'s and Open WebUI's preload) was a
    400, and with an OpenAI-compatible engine a load was a generation from nothing; token ids as
    embedding input (LangChain's default) were a 400 even for engines that take them. (Hunt: a load
    or an unload that did not say ``stream: false``, as Open WebUI's unload, was answered as NDJSON,
    which its aiohttp client refused as JSON: "Failed to unload model".)"""
    sim_url, sim = await grid.sim(embed_dim=4)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, kind=kind)
    for path, body, reason in (("/api/chat", {"model": "sim", "stream": False}, "load"),
                               ("/api/generate", {"model": "sim", "keep_alive": 0, "stream": False}, "unload"),
                               ("/api/generate", {"model": "sim"}, "load"),
                               ("/api/generate", {"model": "sim", "keep_alive": 0, "prompt": ""}, "unload"),
                               ("/api/chat", {"model": "sim", "messages": [], "keep_alive": 0, "stream": True},
                                "unload")):
        response = await grid.http.post(hub.value + path, json=body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json"), (body, response.headers)
        assert response.json()["done_reason"] == reason
    assert sim.stats.started == 0  # nothing generated
    ids = await grid.http.post(hub.value + "/v1/embeddings", json={"model": "sim", "input": [[1, 2, 3], [4]]})
    if kind == "openai":
        assert ids.status_code == 200 and len(ids.json()["data"]) == 2
    else:  # Ollama embeds text only: a 400 that says so
        assert ids.status_code == 400 and "token ids" in ids.json()["error"]["message"]


async def test_a_thinking_model_streams_its_reasoning_to_the_openai_sdk_and_is_not_cut_while_it_thinks(
        grid: Grid) -> None:
    """Regression: an Ollama thinking model's ``thinking`` lines were dropped, so an OpenAI client got
    nothing while the model thought, and a thought longer than ``idle_s`` ended in a timeout."""
    async def engine(conn: Connection, request: Request) -> None:
        if request.path != "/api/chat" or PROBE_MODEL.encode() in request.body:  # (the worker's probe: no such model)
            await conn.respond_json(404, {"error": f"model '{PROBE_MODEL}' not found"})
            return
        await conn.start_stream(200, "application/x-ndjson")
        for _ in range(15):  # 1.5 s of thinking: longer than the hub's idle_s
            await conn.write(b'{"model":"sim","message":{"role":"assistant","content":"","thinking":"hm "},"done":false}\n')
            await trio.sleep(0.1)
        await conn.write(b'{"model":"sim","message":{"role":"assistant","content":"4"},"done":false}\n'
                         b'{"model":"sim","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
                         b'"prompt_eval_count":3,"eval_count":7}\n')
        await conn.finish()

    hub = await grid.hub(timeouts={"idle_s": 1.0})
    await grid.worker(hub.value, await grid.fake_engine(engine))
    async with openai.AsyncOpenAI(base_url=hub.value + "/v1", api_key="x", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": "2+2?"}],
                                                   stream=True, reasoning_effort="low")
        reasoning, content = "", ""
        async for chunk in stream:
            if chunk.choices:
                reasoning += (chunk.choices[0].delta.model_extra or {}).get("reasoning") or ""
                content += chunk.choices[0].delta.content or ""
    assert (reasoning, content) == ("hm " * 15, "4")


async def test_the_ollama_client_gets_a_long_tool_call_an_openai_engine_streams_and_is_not_cut(grid: Grid) -> None:
    """Regression (hunt): an Ollama client gets a tool call whole in the last line, so while an
    OpenAI-compatible engine streamed a long one (a coding agent's whole file) the worker sent
    nothing, and the hub took the silence for a stalled engine: a 504 at first_token_s (idle_s
    after some text), on every try."""
    import ollama

    def event(delta: dict[str, object], finish: str | None = None) -> bytes:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "sim",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def piece(arguments: str, name: str = "") -> bytes:
        return event({"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": name, "arguments": arguments}}]})

    async def engine(conn: Connection, request: Request) -> None:
        if request.path == "/v1/models":
            await conn.respond_json(200, {"object": "list", "data": [{"id": "sim", "object": "model"}]})
        elif PROBE_MODEL.encode() in request.body:  # (the worker's probe: no such model)
            await conn.respond_json(404, {"error": {"message": f"model '{PROBE_MODEL}' not found"}})
        else:
            await conn.start_stream(200, "text/event-stream")
            await conn.write(event({"role": "assistant", "content": ""}) + piece('{"text": "', "write_file"))
            for _ in range(16):  # 1.6 s of arguments: longer than the hub's first_token_s
                await trio.sleep(0.1)
                await conn.write(piece("line "))
            await conn.write(piece('"}') + event({}, "tool_calls") + b"data: [DONE]\n\n")
            await conn.finish()

    hub = await grid.hub(timeouts={"first_token_s": 1.2, "idle_s": 1.2})
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai")

    def session() -> list[ollama.ChatResponse]:
        return list(ollama.Client(host=hub.value).chat(
            model="sim", messages=[{"role": "user", "content": "write it"}], stream=True,
            tools=[{"type": "function", "function": {"name": "write_file", "parameters": {"type": "object"}}}]))

    parts = await trio.to_thread.run_sync(session)
    assert parts[-1].done and parts[-1].done_reason == "stop"
    calls = [call for part in parts for call in part.message.tool_calls or []]
    assert [(call.function.name, call.function.arguments) for call in calls] == [("write_file", {"text": "line " * 16})]


def test_a_name_without_a_tag_is_its_latest_only_when_it_is_not_served_itself() -> None:
    served = {"llama3.2:latest", "foo", "foo:latest", "ns/m:latest", "registry:5000/ns/x:latest"}.__contains__
    assert dialects.tagged("llama3.2", served) == "llama3.2:latest"
    assert dialects.tagged("foo", served) == "foo"  # a model literally named so keeps its name
    assert dialects.tagged("ns/m", served) == "ns/m:latest"
    assert dialects.tagged("registry:5000/ns/x", served) == "registry:5000/ns/x:latest"  # a port is no tag
    assert dialects.tagged("llama3.2:1b", served) == "llama3.2:1b" and dialects.tagged("qwen3", served) == "qwen3"
    # and the other way, for a name served without its tag (an OpenAI engine's): a hunt
    assert dialects.tagged("foo:latest", served) == "foo:latest"  # (served as it is named)
    assert dialects.tagged("gpt-oss:latest", {"gpt-oss"}.__contains__) == "gpt-oss"
    assert dialects.tagged("ns/x:latest", {"ns/x"}.__contains__) == "ns/x"
    assert dialects.tagged("none:latest", served) == "none:latest"


def test_a_name_in_other_letter_case_is_the_one_it_folds_to_unless_several_do() -> None:
    """Regression (hunt): Ollama finds ``Llama3.2`` for the ``llama3.2:latest`` it holds; the grid said 404."""
    served = frozenset({"llama3.2:latest", "Qwen/Qwen3-8B", "gpt-oss", "a", "A"})
    assert dialects.folded("Llama3.2", served) == "llama3.2:latest"
    assert dialects.folded("LLAMA3.2:LATEST", served) == "llama3.2:latest"
    assert dialects.folded("qwen/qwen3-8b", served) == "Qwen/Qwen3-8B"
    assert dialects.folded("GPT-OSS:latest", served) == "gpt-oss"
    assert dialects.folded("a", served) is None  # (two models fold to it: none is guessed)
    assert dialects.folded("llama3.2:1b", served) is None and dialects.folded("x", frozenset()) is None


def test_model_management_is_answered_from_the_head_alone_but_a_pull() -> None:
    assert dialects.unmanaged("POST", "/api/pull") is None  # (the hub knows what it serves)
    refusal = dialects.unmanaged("DELETE", "/api/delete")
    assert refusal is not None and refusal.status == 501 and "ollama rm NAME" in refusal.message
    blob = dialects.unmanaged("POST", "/api/blobs/sha256:00")
    assert blob is not None and blob.status == 501
    check = dialects.unmanaged("HEAD", "/api/blobs/sha256:00")
    assert check is not None and check.status == 404
    assert dialects.unmanaged("GET", "/api/delete") is None and dialects.unmanaged("POST", "/api/chat") is None


async def test_a_completion_s_stream_options_that_is_no_object_is_a_400_not_a_worker_s_traceback(grid: Grid) -> None:
    """Regression (hunt): ``"stream_options": "yes"`` on /v1/completions reached the worker, which raised on
    it: 502 "internal error in the worker", a traceback on every worker tried, and retries through a proxy.
    Chat checked it already."""
    url = await proxied_grid(grid, "openai")
    for stream in (True, False):
        answer = await grid.http.post(url + "/v1/completions", json={"model": "sim", "prompt": "x", "stream": stream,
                                                                    "stream_options": "yes"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "stream_options", answer.text
    assert not dialects.wants_usage({"stream_options": "yes"})


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_model_management_as_ollama_clients_meet_it(grid: Grid, kind: str) -> None:
    """Regression (a hunt): the ollama command's ``show`` (``"model": ""`` beside ``name``) was a 400;
    every management call was a 404 "Unknown endpoint", read as a missing model (``ollama run`` ended
    there, an app that pulls at start crashed); ``x:latest`` did not find an OpenAI engine's ``x``."""
    url = await proxied_grid(grid, kind)
    client = ollama.AsyncClient(host=url)
    shown = await grid.http.post(url + "/api/show", json={"model": "", "name": "sim", "verbose": False})
    assert shown.status_code == 200, shown.text
    assert (await client.pull("sim")).status == "success"
    assert [part.status async for part in await client.pull("sim:latest", stream=True)] == ["success"]
    with pytest.raises(ollama.ResponseError) as refused:
        await client.pull("llama9")
    assert refused.value.status_code == 501 and "ollama pull NAME" in refused.value.error
    for call in (client.delete("sim"), client.copy("sim", "other"), client.push("sim"),
                 client.create("mine", from_="sim")):
        with pytest.raises(ollama.ResponseError) as refused:
            await call
        assert refused.value.status_code == 501 and "workers' machines" in refused.value.error
    blob = await grid.http.head(url + "/api/blobs/sha256:" + "0" * 64)
    assert blob.status_code == 404

    async def model_file() -> Any:  # (review: the proxy read a blob's gigabytes before it answered, a 413)
        for _ in range(8):
            yield b"\0" * (1 << 20)

    upload = await grid.http.post(url + "/api/blobs/sha256:" + "0" * 64, content=model_file())
    assert upload.status_code == 501 and "ollama create" in upload.json()["error"]
    assert (await grid.http.post(url + "/api/pull", json={"stream": False})).status_code == 400
    assert (await grid.http.post(url + "/api/show", json={"model": "sim:latest"})).status_code == 200
