"""Engines nobody on this team wrote, stood in for by the simulator: one that demands a key, one that
lacks an API, one that reports its slots (llama.cpp), one that sends usage on a non-empty
``choices`` (LiteLLM) — and what the worker and the hub make of each."""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import logging
import socket
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
import trio

from conftest import WAIT_S, Grid, _scoped, chat, eventually, run_ghubai, workers_linked
from ghubai import __version__, dialects
from ghubai.config import EngineConfig, load
from ghubai.http11.server import Connection, Request, serve_connection
from ghubai.sim.generator import SimOptions, Simulator
from ghubai.sim.server import serve as serve_sim
from ghubai.worker.engine import PROBE_MODEL, Engine, _counts_of, _error_message, _usage_of

KEY = "engine-secret-4f1c"


def ollama_chat(model: str = "sim", content: str = "hi") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": False}


async def test_a_worker_with_the_engine_key_serves_a_key_protected_engine(grid: Grid,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    sim_url, sim = await grid.sim(api_key=KEY)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, api_key=KEY)
    for path, body in (("/v1/chat/completions", chat()), ("/api/chat", ollama_chat())):
        response = await grid.http.post(hub.value + path, json=body)
        assert response.status_code == 200, response.text
    assert sim.stats.completed == 2
    assert KEY not in caplog.text


async def test_without_the_key_the_operator_and_the_client_hear_that_the_engine_refused_it(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    sim_url, _ = await grid.sim(api_key=KEY)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    assert "engine at %s lists no models: the engine rejected the worker's credentials (HTTP 401)\n" % sim_url \
        in caplog.text  # (the whole line: httpx's words after it had a second line and a link, a hunt)
    for path in ("/v1/chat/completions", "/api/chat"):
        response = await grid.http.post(hub.value + path, json=chat())
        message = response.json()["error"]
        message = message["message"] if isinstance(message, dict) else message
        assert response.status_code == 502 and "rejected the worker's credentials" in message, response.text
    [worker] = await grid.workers(hub.value)
    assert "rejected the worker's credentials" in worker["problem"]


async def test_a_key_refused_mid_life_is_named_in_the_clients_error(grid: Grid,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The engine took the key at discovery, then refuses it (a rotated key): the request's error and
    the worker's log say so, instead of a bare 401 passed on as the client's own fault."""
    sim_url, sim = await grid.sim(api_key=KEY)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, api_key=KEY)
    sim.options = dataclasses.replace(sim.options, api_key="rotated")
    response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
    assert response.status_code == 502
    assert "rejected the worker's credentials (HTTP 401" in response.json()["error"]["message"]
    assert any(record.levelno == logging.WARNING and "rejected the worker's credentials" in record.getMessage()
               for record in caplog.records)


async def test_the_key_comes_from_the_environment_and_headers_reach_every_engine_call(grid: Grid,
                                                                                      tmp_path: Path) -> None:
    seen: list[tuple[str, str | None, str | None]] = []

    async def engine(conn: Connection, request: Request) -> None:
        seen.append((request.path, (request.header(b"authorization") or b"").decode() or None,
                     (request.header(b"x-team") or b"").decode() or None))
        if PROBE_MODEL.encode() in (request.body or b""):
            await conn.respond_json(404, {"error": f'model "{PROBE_MODEL}" not found'})
        elif request.path == "/api/ps":
            await conn.respond_json(200, {"models": []})
        else:
            await conn.respond_json(200, {"model": "sim", "message": {"role": "assistant", "content": "ok"},
                                          "done": True, "prompt_eval_count": 1, "eval_count": 1})

    engine_url = await grid.fake_engine(engine)
    path = tmp_path / "worker.toml"
    path.write_text(f'[engine]\nurl = "{engine_url}"\nheaders = {{ X-Team = "gpu" }}\n')
    config = load("worker", str(path), env={"GHUBAI_ENGINE_API_KEY": KEY})
    assert config.engine.api_key == KEY and KEY not in repr(config)
    hub = await grid.hub()
    await grid.worker(hub.value, engine_url, api_key=config.engine.api_key, headers=config.engine.headers)
    response = await grid.http.post(hub.value + "/api/chat", json=ollama_chat())
    assert response.status_code == 200
    assert {"/api/chat", "/api/ps"} <= {path for path, _, _ in seen}  # probes, discovery and the call
    assert all(auth == f"Bearer {KEY}" and team == "gpu" for _, auth, team in seen), seen


async def test_an_engine_that_echoes_its_credentials_in_an_error_never_shows_them(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): only a 401's or 403's words were dropped; an engine (LiteLLM was one) that
    quotes the key and headers it got in a 400, a 500 or an error event mid-stream had them reach the
    client and the worker's and hub's logs."""
    header = "hdr-secret-77aa"

    async def engine(conn: Connection, request: Request) -> None:
        said = f"you sent {(request.header(b'authorization') or b'').decode()} and {header}"
        if request.path == "/api/ps":
            await conn.respond_json(200, {"models": []})
        elif PROBE_MODEL.encode() in (request.body or b""):
            await conn.respond_json(404, {"error": f'model "{PROBE_MODEL}" not found'})
        elif b'"stream":true' not in (request.body or b""):
            await conn.respond_json(400, {"error": said})
        else:
            first = {"model": "sim", "message": {"role": "assistant", "content": "a"}, "done": False}
            await conn.respond(200, json.dumps(first).encode() + b"\n" + json.dumps({"error": said}).encode() + b"\n",
                               "application/x-ndjson")

    engine_url = await grid.fake_engine(engine)
    hub = await grid.hub()
    await grid.worker(hub.value, engine_url, api_key=KEY, headers={"X-Team": header})
    whole = await grid.http.post(hub.value + "/api/chat", json=ollama_chat())
    streamed = await grid.http.post(hub.value + "/v1/chat/completions", json=chat(stream=True))
    assert whole.status_code == 400 and "you sent Bearer *** and ***" in whole.text, whole.text
    assert streamed.status_code == 200 and "you sent Bearer *** and ***" in streamed.text, streamed.text
    for text in (whole.text, streamed.text, caplog.text):
        assert KEY not in text and header not in text
    engine = Engine(EngineConfig(api_key="sk-live-0123456789abcdef"), httpx.AsyncClient())  # (review: cut short)
    assert engine.scrub("x" * 480 + "Bearer sk-live-0123") == "x" * 480 + "Bearer ***"
    assert engine.scrub("skim it") == "skim it"
    # an engine's words cut short say so (they ended mid-word, as if whole), and a key cut there is found
    cut = engine.scrub(_error_message(b"x" * 480 + b"Bearer sk-live-0123456789abcdef and more"))
    assert cut == "x" * 480 + "Bearer ***…" and len(_error_message(b"y" * 600)) == 500
    assert _error_message(b'{"error": "short"}') == "short"
    short = Engine(EngineConfig(api_key="k3y9"), httpx.AsyncClient())  # (reread: a short key is a key too)
    assert short.scrub("you sent Bearer k3y9") == "you sent Bearer ***"
    # (hunt) a refusal's words cut short and then put in brackets; a key with " or \ quoted back in JSON
    refused = engine._refusal(404, b"x" * 480 + b" token sk-live-0123456789abcdef", "POST", "/api/chat")
    assert "sk-live-0" not in str(refused) and str(refused).endswith(" token ***…)"), str(refused)
    quoting = Engine(EngineConfig(api_key='sk-"q\\uote"-1'), httpx.AsyncClient())
    echoed = json.dumps({"authorization": 'Bearer sk-"q\\uote"-1'})
    assert quoting.scrub(echoed) == '{"authorization": "Bearer ***"}'


def test_check_names_a_bad_engine_key_never_its_value(tmp_path: Path) -> None:
    path = tmp_path / "worker.toml"
    path.write_text('[engine]\napi_key = ["sk-do-not-print"]\nheaders = { Authorization = "Bearer sk-other" }\n')
    result = run_ghubai("check", str(path))
    assert result.returncode == 1
    assert "engine.api_key" in result.stdout + result.stderr and "engine.headers" in result.stdout + result.stderr
    assert "sk-do-not-print" not in result.stdout + result.stderr and "sk-other" not in result.stdout + result.stderr


async def test_an_ollama_api_goes_only_to_workers_whose_engine_serves_it(grid: Grid) -> None:
    """Done means of issue 13: 100 of 100 chats succeed and none reaches the shim that lacks /api/chat."""
    shim_url, shim = await grid.sim(disabled=frozenset({"/api/chat"}))
    full_url, full = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, shim_url, name="shim", discovery_interval_s=60)  # (each survey asks it again)
    await grid.worker(hub.value, full_url, name="full")
    probed = shim.stats.refused  # the worker's probe of /api/chat
    statuses = []
    for _ in range(100):
        statuses.append((await grid.http.post(hub.value + "/api/chat", json=ollama_chat())).status_code)
    assert statuses == [200] * 100
    assert shim.stats.refused == probed and full.stats.completed == 100
    workers = {worker["name"]: worker for worker in await grid.workers(hub.value)}
    assert "ollama.chat" not in workers["shim"]["apis"] and "openai.chat" not in workers["shim"]["apis"]
    assert "ollama.generate" in workers["shim"]["apis"] and "ollama.chat" in workers["full"]["apis"]
    # what the shim serves still goes to both: 16 conversations spread over the two (by their hash)
    for index in range(16):
        assert (await grid.http.post(hub.value + "/api/generate", json={
            "model": "sim", "prompt": f"conversation {index}", "stream": False})).status_code == 200
    assert shim.stats.completed > 0 and full.stats.completed > 100


async def test_with_only_a_shim_the_client_hears_which_api_is_missing(grid: Grid) -> None:
    shim_url, _ = await grid.sim(disabled=frozenset({"/api/chat"}))
    hub = await grid.hub()
    await grid.worker(hub.value, shim_url)
    with trio.fail_after(WAIT_S):
        response = await grid.http.post(hub.value + "/api/chat", json=ollama_chat())
    assert response.status_code == 501, response.text
    assert response.json() == {"error": "No worker serves POST /api/chat for model 'sim': its engines lack that API"}
    openai = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())  # goes to /api/chat too
    assert openai.status_code == 501 and openai.json()["error"]["code"] == "api_not_served"


async def test_the_openai_sdk_does_not_send_again_what_no_worker_serves(grid: Grid) -> None:
    """Regression (hunt): the SDK sends again every 5xx the server does not mark as final: a 501 for
    an API no engine serves came back three times, 1.2 s late through the SDK's backoff."""
    shim_url, _ = await grid.sim(disabled=frozenset({"/api/generate"}))
    hub = await grid.hub()
    await grid.worker(hub.value, shim_url)
    sent: list[str] = []

    async def count(request: httpx.Request) -> None:
        sent.append(request.url.path)

    async with httpx.AsyncClient(event_hooks={"request": [count]}) as http, \
            openai.AsyncOpenAI(base_url=hub.value + "/v1", api_key="x", http_client=http) as sdk:  # (2 retries)
        with trio.fail_after(WAIT_S), pytest.raises(openai.InternalServerError) as refused:
            await sdk.completions.create(model="sim", prompt="hi", max_tokens=2)
    assert refused.value.status_code == 501 and sent == ["/v1/completions"]
    assert refused.value.response.headers["x-should-retry"] == "false"


async def test_through_the_proxy_a_hub_whose_workers_lack_the_api_is_passed_over(grid: Grid) -> None:
    shim_url, shim = await grid.sim(disabled=frozenset({"/api/chat"}))
    full_url, full = await grid.sim()
    hubs = [await grid.hub(), await grid.hub()]
    await grid.worker(hubs[0].value, shim_url, name="shim")
    await grid.worker(hubs[1].value, full_url, name="full")
    proxy = await grid.proxy(hubs=tuple(hub.value for hub in hubs))
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    for _ in range(10):  # round robin sends half of them to the first hub first
        response = await grid.http.post(proxy.value + "/api/chat", json=ollama_chat())
        assert response.status_code == 200, response.text
    assert full.stats.completed == 10 and shim.stats.started == 0


async def test_an_api_the_engine_drops_later_is_learned_from_its_404_and_routed_around(grid: Grid) -> None:
    """The engine served /api/chat when probed, then stops (a shim swapped in): the request that hits
    the 404 is retried on the other worker, the worker tells its hubs, and no later chat goes there.
    The engine's 404 is never called a missing model, and its message is text, not a repr."""
    first_url, first = await grid.sim()
    second_url, second = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, first_url, name="first", discovery_interval_s=60)  # (each survey asks it again)
    await grid.worker(hub.value, second_url, name="second", discovery_interval_s=60)
    first.options = dataclasses.replace(first.options, disabled=frozenset({"/api/chat"}))
    for index in range(16):  # 16 conversations: spread over both workers (by their hash)
        response = await grid.http.post(hub.value + "/api/chat", json=ollama_chat(content=f"chat {index}"))
        assert response.status_code == 200, response.text

    async def learned() -> bool:
        workers = {worker["name"]: worker for worker in await grid.workers(hub.value)}
        return "ollama.chat" not in workers["first"]["apis"]

    await eventually(learned, "the hub to hear that the first engine lacks /api/chat")
    before, refused = second.stats.completed, first.stats.refused
    for _ in range(6):
        assert (await grid.http.post(hub.value + "/api/chat", json=ollama_chat())).status_code == 200
    assert second.stats.completed == before + 6 and first.stats.refused == refused and refused >= 1
    second.options = dataclasses.replace(second.options, disabled=frozenset({"/api/chat"}))
    response = await grid.http.post(hub.value + "/api/chat", json=ollama_chat())
    assert response.status_code == 501
    assert response.json()["error"] == \
        "the engine does not serve POST /api/chat (HTTP 404: Not Found)", response.text


async def test_an_api_the_engine_lacked_is_served_again_once_the_engine_serves_it(grid: Grid) -> None:
    """Regression (hunt): one 404 for a path (a gateway's while the engine restarted, llama.cpp
    started without --embeddings) took that API off the worker for good, discovery after discovery,
    until the worker restarted. Each survey now asks the engine again about what it lacked."""
    sim_url, sim = await grid.sim(disabled=frozenset({"/api/chat"}))
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    assert (await grid.http.post(hub.value + "/api/chat", json=ollama_chat())).status_code == 501
    sim.options = dataclasses.replace(sim.options, disabled=frozenset())

    async def served() -> bool:
        return "ollama.chat" in (await grid.workers(hub.value))[0]["apis"]

    await eventually(served, "the worker to find /api/chat served again")
    assert (await grid.http.post(hub.value + "/api/chat", json=ollama_chat())).status_code == 200


async def test_an_engine_slow_to_begin_a_stream_is_bounded_by_the_hub_s_first_token_s_not_idle_timeout_s(
        grid: Grid) -> None:
    """Regression (hunt): a model load longer than the worker's ``idle_timeout_s`` (silence in the
    middle of a stream) cut every streamed request with a 504, retried on every other worker, however
    long the hub's ``first_token_s`` allowed; a whole answer waited."""
    sim_url, _ = await grid.sim(ttft_ms=600)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, idle_timeout_s=0.2)
    for stream in (True, False):
        response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat(stream=stream))
        assert response.status_code == 200 and '"error"' not in response.text, (stream, response.text)


async def test_slots_reported_by_a_llama_cpp_engine_bound_the_workers_concurrency(grid: Grid) -> None:
    sim_url, sim = await grid.sim(slots=2, ttft_ms=200)
    hub = await grid.hub()
    worker = await grid.worker(hub.value, sim_url, kind="openai", max_concurrency=8)
    [linked] = await grid.workers(hub.value)
    assert linked["max_concurrency"] == 2 and worker.value.capacity == 2
    sim.options = dataclasses.replace(sim.options, slots=12)  # more than the config allows: config caps it

    async def capped() -> bool:
        return (await grid.workers(hub.value))[0]["max_concurrency"] == 8

    await eventually(capped, "the worker to follow the engine's slots, up to max_concurrency")


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_usage_chunk_with_choices_reaches_only_clients_that_asked_for_usage(grid: Grid,
                                                                                    include_usage: bool) -> None:
    sim_url, _ = await grid.sim(usage_with_choices=True)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, kind="openai")
    body = chat(stream=True, **({"stream_options": {"include_usage": True}} if include_usage else {}))
    response = await grid.http.post(hub.value + "/v1/chat/completions", json=body)
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    with_usage = [event for event in events if event.get("usage")]
    assert len(with_usage) == (1 if include_usage else 0), events
    assert all("usage" not in event for event in events) or include_usage
    assert "".join(event["choices"][0]["delta"].get("content") or "" for event in events if event["choices"])


async def test_versions_an_ollama_client_sees_and_ours(grid: Grid) -> None:
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    version = await grid.http.get(hub.value + "/api/version")
    assert version.json() == {"version": dialects.OLLAMA_API_VERSION}
    assert version.headers["x-ghubai-version"] == __version__
    assert (await grid.http.get(hub.value + "/health")).json()["version"] == __version__


@pytest.mark.parametrize(("tools", "slots", "expected"), [(True, None, True), (False, None, False),
                                                          (True, 2, True)])
async def test_show_over_an_openai_engine_advertises_tools_when_it_takes_them(
        grid: Grid, tools: bool, slots: int | None, expected: bool) -> None:
    """And ``vision`` when llama.cpp's /props says its model sees images (``ollama run`` attaches an
    image only then)."""
    sim_url, _ = await grid.sim(slots=slots)  # with slots, /props says supports_tools and vision
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, kind="openai", tools=tools)
    response = await grid.http.post(hub.value + "/api/show", json={"model": "sim"})
    assert response.status_code == 200
    assert ("tools" in response.json()["capabilities"]) is expected
    assert ("vision" in response.json()["capabilities"]) is (slots is not None)


async def test_models_in_memory_reach_the_hub_and_its_api_ps(grid: Grid) -> None:
    async def nothing_loaded(conn: Connection, request: Request) -> None:
        await conn.respond_json(200, {"models": []})  # /api/ps: its model "sim" is not in memory

    cold_url = await grid.fake_engine(nothing_loaded)
    warm_url, _ = await grid.sim(models=("a", "b"))
    silent_url, _ = await grid.sim(models=("c",), disabled=frozenset({"/api/ps"}))
    hub = await grid.hub()
    for name, url in (("cold", cold_url), ("warm", warm_url), ("silent", silent_url)):
        await grid.worker(hub.value, url, name=name)
    workers = {worker["name"]: worker for worker in await grid.workers(hub.value)}
    assert workers["cold"]["models"] == ["sim"] and workers["cold"]["loaded"] == []
    assert workers["warm"]["loaded"] == ["a", "b"]
    assert workers["silent"]["loaded"] == ["c"]  # an engine that cannot tell: all it lists counts as loaded
    running = (await grid.http.get(hub.value + "/api/ps")).json()["models"]
    assert sorted(model["name"] for model in running) == ["a", "b", "c"]


@pytest.mark.parametrize("line", ['api_key = "sk-from-a-file\\n"', 'headers = { X-Tenant = "café" }',
                                  'headers = { X-Tenant = " padded" }', 'headers = { Accept-Encoding = "gzip" }'])
def test_a_key_or_header_no_http_client_would_send_is_refused_by_check(tmp_path: Path, line: str) -> None:
    """Regression: these passed ``check``, then every engine call failed (or the worker crashed
    at start with UnicodeEncodeError)."""
    path = tmp_path / "worker.toml"
    path.write_text(f"[engine]\n{line}\n")
    result = run_ghubai("check", str(path))
    assert result.returncode == 1 and "engine." in result.stdout + result.stderr
    assert "sk-from-a-file" not in result.stdout + result.stderr


async def test_an_engine_that_echoes_the_key_in_its_refusal_never_leaks_it(grid: Grid,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Regression: the engine's 401 text went to the client and the log verbatim, key and all."""
    async def echo(conn: Connection, request: Request) -> None:
        if PROBE_MODEL.encode() in (request.body or b"") or request.path == "/api/ps":
            await conn.respond_json(404, {"error": "model not found"})
        else:
            await conn.respond_json(401, {"error": f"invalid api key: {request.header(b'authorization')!r}"})

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(echo), api_key=KEY)
    response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
    assert response.status_code == 502 and "rejected the worker's credentials (HTTP 401)" in response.text
    assert KEY not in response.text and KEY not in caplog.text


async def test_a_mistyped_model_is_a_404_while_a_healthy_worker_is_linked(grid: Grid) -> None:
    good_url, _ = await grid.sim()
    locked_url, _ = await grid.sim(api_key=KEY)
    hub = await grid.hub()
    await grid.worker(hub.value, good_url, name="good")
    await grid.worker(hub.value, locked_url, name="locked")
    response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat("gpt-4o-mini-typo"))
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert "locked" not in response.text


async def test_up_says_it_serves_once_a_slow_engine_is_ready(grid: Grid, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: with an engine still loading after the banner's wait, ``ghubai up`` warned and
    then never said that the grid serves."""
    from ghubai import up
    ready = False

    async def loading(conn: Connection, request: Request) -> None:
        if request.path == "/v1/models":
            if ready:
                await conn.respond_json(200, {"data": [{"id": "late"}]})
            else:
                await conn.respond_json(503, {"error": {"message": "Loading model"}})
        else:
            await conn.respond_json(400, {"error": "no"})

    monkeypatch.setattr(up, "READY_TIMEOUT_S", 0.3)
    monkeypatch.setattr(up, "DISCOVERY_S", 0.1)
    engine_url = await grid.fake_engine(loading)
    await grid.nursery.start(partial(up.up, 0, "openai", engine_url=engine_url))
    assert "is not serving yet" in capsys.readouterr().out
    ready = True

    async def banner() -> bool:
        return "GhubAi grid is up on" in capsys.readouterr().out

    await eventually(banner, "the banner once the engine serves")


@pytest.mark.parametrize("ready_s", [0.3, 0.0])
async def test_up_says_why_it_does_not_serve_in_time_even_when_ollama_never_answers(
        grid: Grid, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, ready_s: float) -> None:
    """Regression (hunt): with an Ollama that took connections and never answered, ``ghubai up`` said
    nothing for 51 s (the worker's first survey, 30 s, then the banner's wait), and its proxy, started
    after the worker, refused the dashboard meanwhile. The proxy now starts first, and the wait counts
    from the command's start; a start slower than the wait said why with a traceback (a negative
    timeout: a hunt on a loaded machine)."""
    from ghubai import up

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await grid.nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    monkeypatch.setattr(up, "READY_TIMEOUT_S", ready_s)
    with trio.fail_after(WAIT_S):  # (the worker's first survey would take 30 s)
        proxy_url = await grid.nursery.start(partial(
            up.up, 0, "ollama", engine_url=f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"))
    assert "is not serving yet: the worker on Ollama at" in capsys.readouterr().out
    assert (await grid.http.get(proxy_url + "/dashboard")).status_code == 200


async def _openai_engine(conn: Connection, request: Request) -> bool:
    """Answers what a worker asks an OpenAI-compatible engine before any call; False for a call."""
    if PROBE_MODEL.encode() in (request.body or b""):
        await conn.respond_json(404, {"error": {"message": f"model {PROBE_MODEL} not found"}})
    elif request.path == "/v1/models":
        await conn.respond_json(200, {"object": "list", "data": [{"id": "sim", "object": "model"}]})
    else:
        return False
    return True


async def test_an_answer_with_no_content_at_all_is_a_stream_that_just_ends(grid: Grid) -> None:
    """Regression: an engine whose stream held nothing but its end (``data: [DONE]``) made the
    worker's end the first frame the hub saw, and the hub answered 500 instead of an empty stream."""

    async def engine(conn: Connection, request: Request) -> None:
        if not await _openai_engine(conn, request):
            await conn.start_stream(200, "text/event-stream")
            await conn.write(b"data: [DONE]\n\n")
            await conn.finish()

    engine_url = await grid.fake_engine(engine)
    hub = await grid.hub()
    await grid.worker(hub.value, engine_url, kind="openai")
    response = await grid.http.post(hub.value + "/v1/chat/completions",
                                    json={"model": "sim", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert response.status_code == 200, response.text
    assert response.text.strip().endswith("data: [DONE]") and response.headers["x-ghubai-worker"] == "w"


async def test_an_engine_that_starts_after_its_worker_serves_within_seconds(grid: Grid) -> None:
    """A worker and its engine boot together; the engine is not up at the worker's first look. The
    worker asks again after 1 s, 2 s, ..., not only at the next ``discovery_interval_s``."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # a port nothing listens on, yet
    hub = await grid.hub()
    await grid.worker(hub.value, f"http://127.0.0.1:{port}", discovery_interval_s=3600)
    assert (await grid.http.get(hub.value + "/v1/models")).json()["data"] == []
    await grid.nursery.start(_scoped, serve_sim, Simulator(SimOptions(ttft_ms=5, itl_ms=1)), f"127.0.0.1:{port}")

    async def listed() -> bool:
        return [m["id"] for m in (await grid.http.get(hub.value + "/v1/models")).json()["data"]] == ["sim"]

    await eventually(listed, "the worker to find its engine's model")
    assert (await grid.http.post(hub.value + "/v1/chat/completions", json=chat())).status_code == 200


async def test_an_error_an_engine_answers_with_200_reaches_the_client_as_an_error(grid: Grid) -> None:
    """LM Studio answers some errors with status 200 and an error object: a whole answer like that
    is the engine's error, not an answer (for /v1 it became an empty completion)."""
    async def engine(conn: Connection, request: Request) -> None:
        if request.path == "/api/ps":
            await conn.respond_json(200, {"models": []})
        else:
            await conn.respond_json(200, {"error": "Model is unloaded."})

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine))
    for path in ("/api/chat", "/v1/chat/completions"):
        response = await grid.http.post(hub.value + path, json=chat())
        assert response.status_code == 502, (path, response.text)
        error = response.json()["error"]
        assert "Model is unloaded." in (error if isinstance(error, str) else error["message"])


async def test_a_llama_cpp_error_event_mid_stream_reaches_the_client_as_the_error(grid: Grid) -> None:
    """Regression: llama.cpp server sends a streamed error as an ``error:`` SSE field, then
    ``data: [DONE]``; the worker read only ``data:`` fields, so the client got a 200 with an empty
    answer (``/v1``) or ``done: true`` with no content (``/api``). Its code, 400, is the client's status
    (a hunt: it was a 502, which SDKs retry)."""
    message = "the request exceeds the available context size, try increasing it"

    async def engine(conn: Connection, request: Request) -> None:
        if not await _openai_engine(conn, request):
            await conn.start_stream(200, "text/event-stream")
            await conn.write(b'error: {"code":400,"message":"' + message.encode() +
                             b'","type":"exceed_context_size_error"}\n\ndata: [DONE]\n\n')
            await conn.finish()

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai")
    for path in ("/v1/chat/completions", "/api/chat"):
        response = await grid.http.post(hub.value + path, json=chat(stream=True))
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert message in (error if isinstance(error, str) else error["message"]), path


async def test_an_event_of_several_data_lines_reaches_an_openai_client_as_one_it_can_read(grid: Grid) -> None:
    """Regression (hunt): an event whose JSON spans several ``data:`` lines (legal SSE; sse-starlette
    sends pretty-printed JSON so) was passed on with bare line ends inside, and the openai SDK raised
    JSONDecodeError on the first event."""
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "sim",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]}

    async def engine(conn: Connection, request: Request) -> None:
        if not await _openai_engine(conn, request):
            await conn.start_stream(200, "text/event-stream")
            lines = json.dumps(chunk, indent=1).encode().split(b"\n")
            await conn.write(b"".join(b"data: " + line + b"\n" for line in lines) + b"\ndata: [DONE]\n\n")
            await conn.finish()

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai")
    async with openai.AsyncOpenAI(base_url=hub.value + "/v1", api_key="x", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}],
                                                   stream=True)
        assert [part.choices[0].delta.content async for part in stream if part.choices] == ["hello"]


async def test_an_answer_is_over_at_its_end_even_if_the_engine_keeps_its_body_open(grid: Grid) -> None:
    """Regression: after ``data: [DONE]`` (or ``"done": true``) the worker waited for the body's
    end: an engine that kept it open with keep-alive comments held the client's complete answer
    for ever, and one that went silent turned it into a 504 after ``idle_timeout_s``. What an
    engine sends after its end does not reach the client; its connection is not reused."""
    calls = 0

    async def engine(conn: Connection, request: Request) -> None:
        nonlocal calls
        if await _openai_engine(conn, request):
            return
        if request.path != "/v1/chat/completions":
            await conn.respond_json(404, {"error": {"message": "not here"}})
            return
        calls += 1
        await conn.start_stream(200, "text/event-stream")
        await conn.write(b'data: {"choices":[{"index":0,"delta":{"content":"all of it"},"finish_reason":"stop"}]}\n\n'
                         b'data: [DONE]\n\ndata: {"choices":[{"index":0,"delta":{"content":"after the end"}}]}\n\n')
        while True:
            await trio.sleep(0.2)
            await conn.write(b": keep-alive\n\n")

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai", idle_timeout_s=600)
    with trio.fail_after(WAIT_S):
        for _ in range(2):
            response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat(stream=True))
            assert response.status_code == 200 and "all of it" in response.text, response.text
            assert "after the end" not in response.text and response.text.rstrip().endswith("data: [DONE]")
    assert calls == 2


async def test_an_ollama_answer_is_over_at_done_even_if_the_body_stays_open(grid: Grid) -> None:
    async def engine(conn: Connection, request: Request) -> None:
        if request.path != "/api/chat" or PROBE_MODEL.encode() in (request.body or b""):
            await conn.respond_json(200 if request.path == "/api/ps" else 404, {"models": [], "error": "model not found"})
            return
        await conn.start_stream(200, "application/x-ndjson")
        await conn.write(b'{"model":"sim","message":{"role":"assistant","content":"whole"},"done":false}\n'
                         b'{"model":"sim","message":{"role":"assistant","content":""},"done":true,'
                         b'"done_reason":"stop","prompt_eval_count":3,"eval_count":1}\n')
        await trio.sleep_forever()

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), idle_timeout_s=600)
    with trio.fail_after(WAIT_S):
        for path in ("/api/chat", "/v1/chat/completions"):
            response = await grid.http.post(hub.value + path, json=chat(stream=True))
            assert response.status_code == 200 and "whole" in response.text, (path, response.text)


async def test_an_engine_that_never_finishes_its_model_list_does_not_keep_the_worker_off_its_hub(
        grid: Grid) -> None:
    """Regression (review): discovery was bounded per read only, so an engine that trickled its
    answer (or a probe's) held a starting worker off every hub, silently, for ever."""
    async def engine(conn: Connection, request: Request) -> None:
        await conn.start_stream(200, "application/json")
        while True:
            await conn.write(b" ")
            await trio.sleep(0.1)

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=engine), 0,
                                                 host="127.0.0.1"))
    hub = await grid.hub()
    await grid.worker(hub.value, f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", idle_timeout_s=1)
    [worker] = await grid.workers(hub.value)
    assert "does not answer" in worker["problem"], worker


async def test_an_answer_whose_body_is_cut_after_its_end_is_whole(grid: Grid) -> None:
    """Review: an engine that closed its connection after ``data: [DONE]`` without the chunked
    body's end turned a complete answer into an error event, and its usage was lost."""
    async def engine(conn: Connection, request: Request) -> None:
        if await _openai_engine(conn, request):
            return
        if request.path != "/v1/chat/completions":
            await conn.respond_json(404, {"error": {"message": "not here"}})
            return
        await conn.start_stream(200, "text/event-stream")
        await conn.write(b'data: {"choices":[{"index":0,"delta":{"content":"all"},"finish_reason":"stop"}]}\n\n'
                         b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\ndata: [DONE]\n\n')
        await conn.stream.aclose()

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai")
    response = await grid.http.post(hub.value + "/v1/chat/completions",
                                    json=chat(stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200 and '"error"' not in response.text, response.text
    assert '"completion_tokens":1' in response.text and response.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("kind, answer, paths", [
    ("ollama", b'{"model": "sim", "message": "hi", "done": true}', ("/v1/chat/completions",)),
    ("ollama", b'{"model": "sim", "message": {"content": 5}, "response": 5, "done": true}',
     ("/v1/chat/completions", "/v1/completions")),
    ("ollama", b'[]', ("/v1/chat/completions", "/v1/completions")),
    ("openai", b'{"choices": [{"message": {"content": ["hi"]}, "delta": {"content": ["hi"]}, "text": 7}]}',
     ("/api/chat", "/api/generate")),
    ("openai", b'{"choices": {"0": "hi"}}', ("/api/chat",)),
    ("ollama", b'{"embeddings": [[0.5, null]], "prompt_eval_count": "x"}', ("/v1/embeddings",)),
    ("ollama", b'{"embeddings": [[1e39]]}', ("/v1/embeddings",)),
])
async def test_an_engine_answer_of_another_shape_is_a_502_that_names_it_not_a_traceback(
        grid: Grid, caplog: pytest.LogCaptureFixture, kind: str, answer: bytes, paths: tuple[str, ...]) -> None:
    """Regression: valid JSON of a shape the translation cannot read (an object that is text, a
    number as the answer's text) was a 500 "internal error in the worker" with a traceback in the
    worker's log per request, or a 200 whose text was a number, which clients choke on. It is the
    engine's error: a 502 that says so, a line in the log, and the worker serves on."""
    sse = b"data: " + answer + b"\n\ndata: [DONE]\n\n"

    async def engine(conn: Connection, request: Request) -> None:
        if kind == "openai" and await _openai_engine(conn, request):
            return
        if b'"stream":true' in request.body:
            await conn.start_stream(200, "text/event-stream" if kind == "openai" else "application/x-ndjson")
            await conn.write(sse if kind == "openai" else answer + b"\n")
            await conn.finish()
        else:
            await conn.respond(200, answer)

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), kind=kind)
    for path in paths:
        for stream in (False, True):
            body = {**chat(stream=stream), "prompt": "hi", "input": "hi", "encoding_format": "base64"}
            response = await grid.http.post(hub.value + path, json=body)
            assert response.status_code == 502, (path, stream, response.text)
            error = response.json()["error"]
            assert "does not fit its API" in (error if isinstance(error, str) else error["message"]), error
    assert "inside the worker" not in caplog.text
    assert len(await grid.workers(hub.value)) == 1


async def test_a_whole_answer_that_is_not_json_is_a_502_that_says_so_and_is_not_generated_again(grid: Grid) -> None:
    """Regression (hunt): an engine that streamed where a whole answer was asked (as Ollama did for
    ``"stream": null``) gave "engine connection failed: JSON is malformed", and the hub had every
    worker generate the answer again."""
    asked = 0

    async def engine(conn: Connection, request: Request) -> None:
        nonlocal asked
        if await _openai_engine(conn, request):
            return
        asked += request.path == "/v1/chat/completions"
        await conn.respond(200, b'{"choices": []}\n{"choices": []}\n')

    hub = await grid.hub()
    for _ in range(2):
        await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai")
    response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
    assert response.status_code == 502 and "not JSON" in response.json()["error"]["message"], response.text
    assert asked == 1


async def test_a_streamed_record_that_is_not_json_ends_a_passed_on_stream_with_an_error(grid: Grid) -> None:
    """Regression (hunt): a stream the worker passes on unparsed (an engine speaking the client's
    API) passed a record that is not JSON (``ping``) to the client in its 200 stream: the SDKs raised
    a bare JSONDecodeError. It ends the stream with the engine's error, as a translated one did; and an
    Ollama stream's byte order mark is no part of its first line."""
    line = {"model": "sim", "message": {"role": "assistant", "content": "Hel"}, "done": False}
    done = {"model": "sim", "message": {"role": "assistant", "content": ""}, "done": True, "eval_count": 1}

    async def engine(conn: Connection, request: Request) -> None:
        if await _openai_engine(conn, request) or request.path == "/api/ps":
            return
        bom = b"\xef\xbb\xbf" if b"bom" in request.body else b""
        if request.path == "/api/chat":
            await conn.start_stream(200, "application/x-ndjson")
            await conn.write(bom + json.dumps(line).encode() + (b"\nbom\n" if bom else b"\nping\n") +
                             json.dumps(done).encode() + b"\n")
        else:
            await conn.start_stream(200, "text/event-stream")
            await conn.write(b'data: {"id": "c", "object": "chat.completion.chunk", "choices": []}\n\n'
                             b"data: ping\n\ndata: [DONE]\n\n")
        await conn.finish()

    ollama, vllm = await grid.hub(), await grid.hub()  # (each with the engine that speaks its client's API)
    await grid.worker(ollama.value, await grid.fake_engine(engine), kind="ollama")
    await grid.worker(vllm.value, await grid.fake_engine(engine), kind="openai")
    for url, path in ((ollama.value, "/api/chat"), (vllm.value, "/v1/chat/completions")):
        response = await grid.http.post(url + path, json=chat(stream=True))
        assert b"ping" not in response.content and response.status_code == 200, response.text
        assert b"not JSON" in response.content.strip().rpartition(b"\n")[2], response.text
    whole = await grid.http.post(ollama.value + "/api/chat", json=chat(stream=True, content="bom"))
    lines = [json.loads(text) for text in whole.text.splitlines()]
    assert [value.get("done") for value in lines[:1]] == [False] and "error" in lines[-1], whole.text


async def test_an_engine_is_asked_for_no_compression_and_one_it_sends_is_named(grid: Grid) -> None:
    """Regression (hunt): the worker sent no Accept-Encoding (any coding, then) and refused the header
    as "set by the worker"; a gateway in front of vLLM that gzipped gave "not JSON (invalid character)"
    or a stream of binary lines."""
    asked: list[bytes | None] = []

    async def engine(conn: Connection, request: Request) -> None:
        if not await _openai_engine(conn, request):
            asked.append(request.header(b"accept-encoding"))
            status = 400 if b"refused" in request.body else 200  # (a review: a refusal's words were its bytes)
            await conn.respond(status, gzip.compress(b'{"error": "no"}' if status == 400 else b'{"choices": []}'),
                               headers={"content-encoding": "gzip"})

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai")
    for stream, content, status in ((False, "hi", 502), (True, "hi", 502), (False, "refused", 400)):
        response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat(stream=stream, content=content))
        assert response.status_code == status and "'gzip'-encoded" in response.text, response.text
    assert asked and set(asked) == {b"identity"}


async def test_a_worker_probes_its_engine_s_apis_at_once_not_one_after_another(grid: Grid) -> None:
    """Regression (hunt): the probes of a first survey went one by one, each bounded alone, and the worker
    dials no hub before its survey ends: an engine that answered GETs but no POST kept the worker off its
    hubs for 5 × 30 s. They now run at once: here all five wait on the engine together."""
    waiting, together = 0, trio.Event()

    async def engine(conn: Connection, request: Request) -> None:
        nonlocal waiting
        waiting += 1
        if waiting == 5:  # /api/chat, /api/embed, /api/embeddings, /api/generate, /api/show
            together.set()
        await trio.sleep_forever()

    hub = await grid.hub()
    # (a worker is started once its first survey ends: here, when its probes' bounds run out)
    grid.nursery.start_soon(partial(grid.worker, hub.value, await grid.fake_engine(engine), kind="ollama"))
    with trio.fail_after(WAIT_S):
        await together.wait()


async def test_an_embedding_batch_whose_base64_fits_is_served_though_ollama_s_text_is_larger(
        grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (hunt): 2,048 texts at 4096 dimensions over Ollama were a 502 "larger than 64 MiB": Ollama
    writes each float32 as ~12 bytes of text (109 MB), while the base64 answer the openai SDK asks for
    is 45 MB. The bound is the client's answer; the engine's text may be three times it. (The bound is made
    1 MiB here, for speed.)"""
    monkeypatch.setattr("ghubai.worker.engine.ANSWER_LIMIT", 1 << 20)
    rows, dim = 32, 4096
    text = b'{"model":"sim","embeddings":[%s],"prompt_eval_count":%d}' % (
        b",".join([b"[" + b",".join([b"-0.012345679"] * dim) + b"]"] * rows), rows)
    assert len(text) > 1.5 * (1 << 20)

    async def engine(conn: Connection, request: Request) -> None:
        await conn.respond(200, text)

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="ollama")
    async with openai.AsyncOpenAI(base_url=hub.value + "/v1", api_key="x", max_retries=0) as sdk:
        vectors = await sdk.embeddings.create(model="sim", input=["a"] * rows)  # base64, as the SDK asks
        assert len(vectors.data) == rows and vectors.data[-1].embedding[:2] == [pytest.approx(-0.012345679)] * 2
        with pytest.raises(openai.APIStatusError, match="larger than") as floats:  # as floats it is too large
            await sdk.embeddings.create(model="sim", input=["a"] * rows, encoding_format="float")
        assert floats.value.status_code == 502


async def test_an_image_link_for_an_ollama_engine_is_a_400_not_garbage_base64(grid: Grid) -> None:
    """Regression: an image part's ``https://`` URL went to Ollama as if it were the image's base64.
    Ollama takes images as bytes, and the worker fetches no address a client names: a 400 that
    says what to send. A ``data:`` URL still reaches the engine."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)

    def with_image(url: str) -> dict[str, object]:
        return chat(content=[{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}])

    for url in ("https://example.com/cat.png", "data:image/png,not-base64"):
        response = await grid.http.post(hub.value + "/v1/chat/completions", json=with_image(url))
        assert response.status_code == 400, response.text
        assert "base64 data: URL" in response.json()["error"]["message"]
    assert (await grid.stats(sim_url))["started"] == 0
    response = await grid.http.post(hub.value + "/v1/chat/completions", json=with_image("data:image/png;base64,iVBORw0KGgo="))
    assert response.status_code == 200, response.text


async def test_a_whole_answer_longer_than_the_engine_idle_timeout_is_not_cut(grid: Grid) -> None:
    """Review: a request that does not stream is silent until its answer is done, and the worker
    bounded that by ``idle_timeout_s`` (silence mid-answer): a long answer was a retryable 504, run
    again on every worker. The hub's ``first_token_s`` bounds it."""
    sim_url, sim = await grid.sim(ttft_ms=0, itl_ms=100, tokens=10)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, idle_timeout_s=0.6)
    response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
    assert response.status_code == 200, response.text
    assert sim.stats.started == 1
    streamed = await grid.http.post(hub.value + "/v1/chat/completions", json=chat(stream=True))
    assert streamed.status_code == 200 and "[DONE]" in streamed.text  # a token every 100 ms: never silent for long


async def test_a_path_found_missing_while_a_survey_asks_again_is_not_forgotten(grid: Grid) -> None:
    """Regression (review): a survey asking again about the paths the engine lacked replaced that
    set with its answer, losing a path a request had found missing meanwhile: the hub was told the
    engine served it again, and sent it the next such request to fail."""
    gone, asked_again = False, [trio.Event(), trio.Event()]
    completions_asked = 0

    async def engine(conn: Connection, request: Request) -> None:
        nonlocal completions_asked
        probe = PROBE_MODEL.encode() in (request.body or b"")
        if request.path == "/v1/models":
            await conn.respond_json(200, {"object": "list", "data": [{"id": "sim", "object": "model"}]})
        elif request.path == "/v1/embeddings":  # llama.cpp without --embeddings: asked again at each survey
            if gone and probe:
                first = not asked_again[0].is_set()
                asked_again[0 if first else 1].set()
                if first:
                    await trio.sleep(0.5)  # while a request finds /v1/completions gone
            await conn.respond_json(501, {"error": {"message": "This server does not support embeddings"}})
        elif request.path == "/v1/completions" and gone:
            completions_asked += not probe
            await conn.respond_json(404, {"error": "Not Found"})
        elif probe:
            await conn.respond_json(404, {"error": {"message": f"model {PROBE_MODEL} not found"}})
        else:
            await conn.respond_json(200, {"choices": [{"text": "ok", "index": 0, "finish_reason": "stop"}]})

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai")
    gone = True
    await asked_again[0].wait()
    completion = {"model": "sim", "prompt": "hi"}
    assert (await grid.http.post(hub.value + "/v1/completions", json=completion)).status_code == 501
    await asked_again[1].wait()  # the survey that was asking has told the hub what it found
    assert (await grid.http.post(hub.value + "/v1/completions", json=completion)).status_code == 501
    assert completions_asked == 1


async def test_a_client_never_reads_the_engine_s_address(grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): an engine that went away after discovery gave clients "engine connection
    failed: all attempts to connect to 10.0.0.5:11434 failed": the engine's address, which only the
    worker's log may hold."""
    sim = await grid.nursery.start(_scoped, serve_sim, Simulator(SimOptions()), "127.0.0.1:0")
    hub = await grid.hub(limits={"max_attempts": 1})
    await grid.worker(hub.value, f"http://127.0.0.1:{sim.value}", discovery_interval_s=60)
    sim.stop()
    caplog.set_level(logging.INFO, logger="ghubai.worker")
    response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
    assert response.status_code == 502 and "cannot connect to the engine" in response.text, response.text
    assert str(sim.value) not in response.text
    assert any(str(sim.value) in record.getMessage() for record in caplog.records)


async def test_an_engine_that_cannot_be_connected_to_in_time_is_a_timeout(grid: Grid) -> None:
    """Regression: an engine whose host takes no connection (SYNs dropped: the machine overloaded or
    gone dark) was a 502 "engine connection failed (TimeoutError)"; the wait ran out: a 504."""
    sim = await grid.nursery.start(_scoped, serve_sim, Simulator(SimOptions()), "127.0.0.1:0")
    hub = await grid.hub(limits={"max_attempts": 1})
    await grid.worker(hub.value, f"http://127.0.0.1:{sim.value}", discovery_interval_s=60, connect_timeout_s=0.3)
    sim.stop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    async def bound() -> bool:  # the engine's port, where nothing is accepted, once the simulator let it go
        try:
            listener.bind(("127.0.0.1", sim.value))
        except OSError:
            return False
        return True

    await eventually(bound, "the simulator's port free")
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):  # the accept queue full: the next SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", sim.value))
            fillers.append(filler)
        response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
    finally:
        for sock in (*fillers, listener):
            sock.close()
    assert response.status_code == 504 and "engine connection timed out" in response.text, response.text


async def test_an_sse_end_in_an_ollama_stream_is_a_malformed_line_not_a_worker_fault(grid: Grid) -> None:
    """Regression (type check): a bare ``[DONE]`` line in an Ollama engine's NDJSON (a proxy that
    speaks OpenAI behind an Ollama address) was taken for an SSE stream's end, whose OpenAI→Ollama
    translation the worker does not have: an AttributeError in the worker. It is a line that is not
    JSON, which the client hears as the engine's fault (a malformed line was "engine connection
    failed (DecodeError)", and the request was generated again on each worker), after what came
    before it."""
    async def engine(conn: Connection, request: Request) -> None:
        if request.path != "/api/chat" or PROBE_MODEL.encode() in (request.body or b""):
            answer = {"models": [], "error": "model not found"}
            await conn.respond_json(200 if request.path == "/api/ps" else 404, answer)
            return
        await conn.start_stream(200, "application/x-ndjson")
        await conn.write(b'{"model":"sim","message":{"role":"assistant","content":"half"},"done":false}\n[DONE]\n')
        await conn.finish()

    hub = await grid.hub()
    for _ in range(2):
        await grid.worker(hub.value, await grid.fake_engine(engine))
    response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 200 and "half" in response.text, response.text
    assert "the engine's stream is not JSON" in response.text.rsplit("data: ", 1)[1], response.text
    # (hunt) passed through to an Ollama client, it ended the stream as if done, with no "done": true line
    response = await grid.http.post(hub.value + "/api/chat", json={**chat(), "stream": True})
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[0]["message"]["content"] == "half" and "not JSON" in lines[-1]["error"], response.text


async def test_an_sse_end_in_a_responses_stream_is_no_end(grid: Grid) -> None:
    """Regression (hunt): ``data: [DONE]``, which ends chat and completions streams, ended a
    Responses stream too, whose end is its ``response.completed`` (or ``incomplete``, ``failed``)
    event: an answer cut short went to the client as whole, with no error."""
    async def engine(conn: Connection, request: Request) -> None:
        if not await _openai_engine(conn, request):
            await conn.start_stream(200, "text/event-stream")
            await conn.write(b'data: {"type":"response.created","response":{"id":"resp_1","status":"in_progress"}}\n\n'
                             b'data: {"type":"response.output_text.delta","delta":"Once"}\n\ndata: [DONE]\n\n')
            await conn.finish()

    hub = await grid.hub()
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai")
    response = await grid.http.post(hub.value + "/v1/responses", json={"model": "sim", "input": "hi", "stream": True})
    assert response.status_code == 200 and "Once" in response.text, response.text
    last = response.text.rstrip().rsplit("\n\n", 1)[1]
    assert last.startswith("event: error\n") and "without finishing its answer" in last, response.text


async def test_a_stored_response_is_asked_of_engines_that_store_them_never_of_ollama(grid: Grid) -> None:
    """Hunt: Ollama's Responses API stores nothing and ignores ``previous_response_id``: it answered
    200, the conversation's earlier turns silently forgotten. Its worker now says 404, as an engine
    without that response does, and the hub tries the next worker, whose engine may hold it."""
    async def stores(conn: Connection, request: Request) -> None:  # a vLLM that kept resp_1
        if not await _openai_engine(conn, request):
            held = json.loads(request.body or b"{}").get("previous_response_id") == "resp_1"
            await conn.respond_json(200 if held else 404, {
                "id": "resp_2", "object": "response", "status": "completed", "model": "sim",
                "output": [{"type": "message", "id": "m", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "still here", "annotations": []}]}],
                "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5}} if held else
                {"error": {"message": "Response with id 'x' not found.", "type": "invalid_request_error"}})

    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, name="ollama")
    later = {"model": "sim", "input": "and then?", "previous_response_id": "resp_1"}
    for field, value in (("previous_response_id", "resp_1"), ("conversation", {"id": "conv_1"})):
        alone = await grid.http.post(hub.value + "/v1/responses", json={"model": "sim", "input": "x", field: value})
        assert alone.status_code == 404 and "Ollama stores no responses" in alone.text, alone.text
    await grid.worker(hub.value, await grid.fake_engine(stores), kind="openai", name="vllm")
    for _ in range(3):  # (whichever worker the hub picks first)
        answer = await grid.http.post(hub.value + "/v1/responses", json=later)
        assert answer.status_code == 200 and answer.json()["output"][0]["content"][0]["text"] == "still here"
        assert answer.headers["x-ghubai-worker"] == "vllm"
    fresh = await grid.http.post(hub.value + "/v1/responses", json={**later, "previous_response_id": None})
    assert fresh.status_code == 200 and fresh.headers["x-ghubai-worker"] == "ollama", fresh.text  # (a new one)


async def test_a_malformed_line_passed_through_is_the_engine_s_fault_and_not_generated_again(grid: Grid) -> None:
    """Review: where the worker passes an engine's lines through (an Ollama client, an Ollama engine)
    and reads only those that carry usage, a malformed one was "engine connection failed
    (DecodeError)", retried: the same generation ran on every worker."""
    asked = 0

    async def engine(conn: Connection, request: Request) -> None:
        nonlocal asked
        if request.path != "/api/chat" or PROBE_MODEL.encode() in (request.body or b""):
            answer = {"models": [], "error": "model not found"}
            await conn.respond_json(200 if request.path == "/api/ps" else 404, answer)
            return
        asked += 1
        await conn.start_stream(200, "application/x-ndjson")
        await conn.write(b'{"model":"sim","message":{"role":"assistant","content":"half"},"done":false}\n'
                         b'{"model":"sim","done":true,,}\n')
        await conn.finish()

    hub = await grid.hub()
    for _ in range(2):
        await grid.worker(hub.value, await grid.fake_engine(engine))
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    response = await grid.http.post(hub.value + "/api/chat", json=body)
    assert response.status_code == 200 and "half" in response.text, response.text
    assert "the engine's stream is not JSON" in response.text.splitlines()[-1] and asked == 1


async def test_what_ollama_cannot_say_goes_to_the_other_engine_kind_however_many_ollama_workers_refuse(
        grid: Grid) -> None:
    """Regression (a hunt): each Ollama worker's refusal of ``n`` > 1 counted as one of
    ``max_attempts``, so with three of them beside an idle vLLM-like worker a request tried the three
    and got their 400 (6 of 30)."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub(limits={"max_attempts": 2})
    for name in ("o1", "o2", "o3"):
        await grid.worker(hub.value, sim_url, name=name)
    await grid.worker(hub.value, sim_url, kind="openai", name="v")
    await workers_linked(grid, hub.value, 4)
    for _ in range(8):
        response = await grid.http.post(hub.value + "/v1/completions",
                                        json={"model": "sim", "prompt": "hi", "n": 2, "max_tokens": 2})
        assert response.status_code == 200, response.text
        assert response.headers["x-ghubai-worker"] == "v"


@pytest.mark.parametrize("raw, usage", [
    (b'{"embeddings": [[0.5, 1e-3]], "prompt_eval_count": 7}', {"prompt_tokens": 7, "completion_tokens": 0}),
    (b'{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}',
     {"prompt_tokens": 3, "completion_tokens": 4}),
    (b'{"done": true, "eval_count": 2}', {"prompt_tokens": 0, "completion_tokens": 2}),
    (b'{"data": []}', None), (b'[1, 2]', None)])
def test_an_answer_passed_on_whole_is_read_for_its_counts_alone(raw: bytes, usage: dict[str, int] | None) -> None:
    """An answer's floats are not built to read two numbers (a hunt: a 50 MB embedding batch took
    the worker's loop 80 ms to decode, and every stream on it waited); the counts are as before."""
    assert _usage_of(_counts_of(raw)) == usage
    with pytest.raises(ValueError):
        _counts_of(b'{"data": [')


def test_a_responses_answer_s_usage_is_read_whole_and_from_its_stream_s_last_event() -> None:
    """The Responses API names its counts ``input_tokens`` and ``output_tokens``, and a stream's last
    event holds them in its ``response``; Ollama's ``response`` is its text, and a chat's usage wins."""
    whole = {"object": "response", "usage": {"input_tokens": 3, "output_tokens": 5}}
    assert _usage_of(whole) == _usage_of({"type": "response.completed", "response": whole}) == \
        {"prompt_tokens": 3, "completion_tokens": 5}
    assert _usage_of({"type": "response.created", "response": {"usage": None}}) is None
    assert _usage_of({"response": "text", "done": True, "prompt_eval_count": 2, "eval_count": 4}) == \
        {"prompt_tokens": 2, "completion_tokens": 4}
    assert _usage_of({"usage": {"prompt_tokens": 1, "completion_tokens": 2, "input_tokens": 9}}) == \
        {"prompt_tokens": 1, "completion_tokens": 2}


async def test_a_worker_whose_engine_is_a_hub_says_so_rather_than_loop(grid: Grid) -> None:
    """Regression (first-run hunt): a worker pointed at a hub's port instead of its engine's (7197 for
    11434) joined with the grid's own models, and each request went round hub → worker → hub until
    the queue timed out (a 503 after 30 s that named no cause). Every engine call carries the
    worker's mark; a hub or proxy answers it 508, and the worker lists no model and says why."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, name="real")
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")
    for engine_url in (hub.value, proxy.value):
        looped = await grid.worker(hub.value, engine_url, name="looped")

        async def said() -> bool:
            return "is a GhubAi hub or proxy, not an engine" in (looped.value.offer.problem or "")

        await eventually(said, "the worker to say its engine is a hub")
        assert not looped.value.offer.models
        looped.stop()


@pytest.mark.parametrize("kind", ["ollama", "openai"])
async def test_an_engine_that_dies_between_surveys_is_told_to_the_hubs_at_once(grid: Grid, kind: str) -> None:
    """Regression (hunt): an engine that died between two surveys (``discovery_interval_s``, 30 s by
    default) stayed healthy at every hub (its models listed, ``/ready`` ready) and each request for
    its models got a 502 until the next survey, though the worker's residency poll (Ollama's, every
    2 s) and each failed request had found it gone. Either now asks for the model list at once."""
    sim = Simulator(SimOptions(ttft_ms=5, itl_ms=1))
    engine = await grid.nursery.start(_scoped, serve_sim, sim, "127.0.0.1:0")
    hub = await grid.hub()
    await grid.worker(hub.value, f"http://127.0.0.1:{engine.value}", kind=kind, discovery_interval_s=600,
                      residency_interval_s=0.2)
    engine.stop()
    if kind == "openai":  # no residency poll: the failed request finds it gone
        failed = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
        assert failed.status_code == 502, failed.text

    async def told() -> bool:
        [worker] = await grid.workers(hub.value)
        return "does not answer" in worker["problem"]
    await eventually(told, "the worker to tell its hub that its engine does not answer")
    assert (await grid.http.get(hub.value + "/v1/models")).json()["data"] == []


async def test_requests_an_engine_drops_make_no_storm_of_surveys(grid: Grid) -> None:
    """Review: every failed request asked for a survey at once: an engine that listed its models but
    dropped every generation got 54 surveys in a second from a burst of 200. Only a connection that
    cannot be made asks, and a survey a second at most."""
    listed = 0

    async def engine(conn: Connection, request: Request) -> None:
        nonlocal listed
        listed += request.path == "/v1/models" and PROBE_MODEL.encode() not in (request.body or b"")
        if not await _openai_engine(conn, request):
            await conn.stream.aclose()  # took the request, and hung up

    hub = await grid.hub(limits={"max_attempts": 1})
    await grid.worker(hub.value, await grid.fake_engine(engine), kind="openai", discovery_interval_s=600,
                      max_concurrency=20)
    before = listed

    async def ask() -> None:
        assert (await grid.http.post(hub.value + "/v1/chat/completions", json=chat())).status_code == 502
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as clients:
            for _ in range(40):
                clients.start_soon(ask)
    assert listed - before <= 1
