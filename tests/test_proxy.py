"""Many hubs as one: the proxy over hubs found in a registry file, hub failures, federation."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import trio

from conftest import (WAIT_S, Grid, HubProcess, _scoped, chat, eventually, peak_active, read_until, run_registry,
                      stalled_client, workers_linked)
from ghubai import dialects
from ghubai.config import ProxyConfig, load
from ghubai.configfiles import add_hub, remove_hub
from ghubai.errors import ApiError
from ghubai.http11.server import Connection, Request, origin_form, serve_connection
from ghubai.proxy.follow import _state_of, _workers_of
from ghubai.proxy.hubs import HubSet
from ghubai.proxy.server import TOLD_FOR_S, Proxy


def registry_file(tmp_path: Path, hubs: dict[str, str]) -> Path:
    path = tmp_path / "registry.toml"
    path.write_text("".join(f'[[hubs]]\nname = "{name}"\naddress = "{url}"\n' for name, url in hubs.items()))
    return path


async def two_hub_grid(grid: Grid, tmp_path: Path, **sim_options: object) -> tuple[str, list[str], list[str]]:
    """Two hubs in a registry file, each with its own worker and simulator, behind a proxy."""
    sims, hubs = [], []
    for _ in range(2):
        sim_url, _ = await grid.sim(**sim_options)
        hub = await grid.hub()
        await grid.worker(hub.value, sim_url)
        sims.append(sim_url)
        hubs.append(hub.value)
    path = registry_file(tmp_path, {"one": hubs[0], "two": hubs[1]})
    registry = await grid.registry(str(path))
    proxy = await grid.proxy(registry.value)
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    return proxy.value, hubs, sims


async def test_a_proxy_started_with_its_registry_takes_its_refusal_for_no_answer(grid: Grid, tmp_path: Path) -> None:
    """Regression (hunt): started together (a boot), the registry refused the proxy for a moment; the
    proxy took that for its answer, said it was ready, and answered 503 "No healthy hub" for a second
    beside a healthy hub. It asks again at once while it starts, and is ready once the list is in."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    path = registry_file(tmp_path, {"only": hub.value})
    reserved = socket.socket()  # bound, not listening: the registry's port refuses connections
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    ready, proxy_url = trio.Event(), ""

    async def start_proxy() -> None:
        nonlocal proxy_url
        proxy_url = (await grid.proxy(f"http://127.0.0.1:{port}", health={"timeout_s": 4.0})).value  # (a margin)
        ready.set()

    grid.nursery.start_soon(start_proxy)
    with trio.move_on_after(0.5):  # (ready at once, with no hubs, was the fault)
        await ready.wait()
    assert not ready.is_set()
    reserved.close()
    config = dataclasses.replace(load("registry", str(path)), listen=f"127.0.0.1:{port}")
    await grid.nursery.start(_scoped, run_registry, config, str(path))
    with trio.fail_after(WAIT_S):
        await ready.wait()
    answer = await grid.http.post(proxy_url + "/v1/chat/completions", json=chat())
    assert answer.status_code == 200, answer.text


async def test_a_proxy_started_behind_a_gateway_takes_its_503_for_no_answer(grid: Grid) -> None:
    """Regression: a registry behind a gateway that answers 503 while the registry starts: the
    starting proxy took the 503 for the registry's answer, said it was ready with no hub, and its
    clients got 503 "No healthy hub" for a second beside a healthy hub."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    asked = 0

    async def gateway(conn: Connection, request: Request) -> None:
        nonlocal asked
        asked += 1
        if asked <= 3:
            await conn.respond_json(503, {"error": "upstream not ready"})
        else:
            await conn.respond_json(200, {"version": 1, "hubs": [{"name": "only", "address": hub.value}]},
                                    headers={"ETag": '"1"'})

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=gateway), 0,
                                                 host="127.0.0.1"))
    proxy = await grid.proxy(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    answer = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())
    assert answer.status_code == 200, answer.text


async def test_a_restarted_hub_is_taken_back_within_a_second_not_a_health_interval(grid: Grid) -> None:
    """Regression (a rolling-restart hunt): a hub the proxy had found down was checked again only at
    the next ``health.interval_s``, and one checked before its workers linked again was taken for
    empty as long: restarting the next hub a second after this one was back gave every client a 503.
    A hub down or empty since a change is checked every quarter second."""
    sim_url, _ = await grid.sim()
    old = await grid.hub()
    port = int(old.value.rsplit(":", 1)[1])
    await grid.worker(old.value, sim_url)
    proxy = await grid.proxy(hubs=(old.value,), health={"interval_s": 60})
    await grid.wait_for_model(proxy.value, "sim")
    old.stop()
    refused = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())
    assert refused.status_code in (502, 503), refused.text  # (the hub is found down)
    await grid.hub(listen=f"127.0.0.1:{port}")  # back, as systemd starts it again; its worker dials it again

    async def served() -> bool:
        return (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())).status_code == 200
    await eventually(served, "the proxy to take the hub back with its model")


async def test_requests_spread_over_two_hubs_from_the_registry(grid: Grid, tmp_path: Path) -> None:
    """Conversations spread over the hubs by their key; a conversation stays on its hub (where its
    prompt is cached); requests without one (embeddings) go round robin."""
    proxy_url, _, sims = await two_hub_grid(grid, tmp_path)
    async with openai.AsyncOpenAI(base_url=proxy_url + "/v1", api_key="x", max_retries=0) as sdk:
        for _ in range(10):
            reply = await sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}])
            assert reply.choices[0].message.content
        stream = await sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x"}],
                                                   stream=True)
        assert [c async for c in stream]
        assert sorted([(await grid.stats(url))["completed"] for url in sims]) == [0, 11]
        for index in range(40):  # 40 conversations: both hubs get some but by a 2 ** -39 chance
            await sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": f"chat {index}"}])
        assert min([(await grid.stats(url))["completed"] for url in sims]) > 0
        hubs = set()
        for _ in range(4):
            with_headers = await sdk.embeddings.with_raw_response.create(model="sim", input="no conversation")
            hubs.add(with_headers.headers["x-ghubai-hub"])
        assert len(hubs) == 2  # round robin


async def test_the_proxy_answers_models_health_and_metrics_itself(grid: Grid, tmp_path: Path) -> None:
    proxy_url, _, _ = await two_hub_grid(grid, tmp_path)
    assert (await grid.http.get(proxy_url + "/v1/models")).json()["data"][0]["id"] == "sim"
    assert [m["name"] for m in (await grid.http.get(proxy_url + "/api/tags")).json()["models"]] == ["sim"]
    assert (await grid.http.get(proxy_url + "/health")).json()["hubs_up"] == 2
    assert (await grid.http.post(proxy_url + "/v1/chat/completions", json=chat())).status_code == 200
    metrics = (await grid.http.get(proxy_url + "/metrics")).text
    assert 'ghubai_proxy_hub_up{hub="one"} 1.0' in metrics
    assert 'ghubai_requests_total{code="200",model="sim",role="proxy"} 1.0' in metrics


async def test_a_model_behind_only_one_hub_always_reaches_it(grid: Grid, tmp_path: Path) -> None:
    alpha_url, _ = await grid.sim(models=["alpha"])
    beta_url, beta = await grid.sim(models=["beta"])
    hub_a, hub_b = await grid.hub(), await grid.hub()
    await grid.worker(hub_a.value, alpha_url)
    await grid.worker(hub_b.value, beta_url)
    proxy = await grid.proxy(hubs=(hub_a.value, hub_b.value))
    await grid.wait_for_model(proxy.value, "beta")
    ok = 0
    for _ in range(100):
        response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(model="beta"))
        ok += response.status_code == 200
    assert ok == 100 and beta.stats.completed == 100


async def test_a_hub_with_no_worker_is_passed_over_by_retry(grid: Grid, tmp_path: Path) -> None:
    sim_url, sim = await grid.sim()
    empty, full = await grid.hub(), await grid.hub()
    await grid.worker(full.value, sim_url)
    proxy = await grid.proxy(hubs=(empty.value, full.value))
    await grid.wait_for_model(proxy.value, "sim")
    # a model nobody advertises goes round robin over all hubs: the empty hub answers 404 ...
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat("nope"))).status_code in (404, 503)
    # ... and a hub that answers 503 before any byte is retried on the next one
    for _ in range(6):
        response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(), headers={
            "x-request-id": "req-123"})
        assert response.status_code == 200 and response.headers["x-request-id"] == "req-123"
    assert sim.stats.completed == 6
    # the model lists the proxy answers itself carry the id too (the SDKs' request_id; hunt: none did)
    for path in ("/v1/models", "/v1/models/sim", "/api/tags", "/api/ps"):
        listed = await grid.http.get(proxy.value + path, headers={"x-request-id": "req-456"})
        assert (listed.status_code, listed.headers.get("x-request-id")) == (200, "req-456"), path


async def test_killing_a_hub_loses_no_request_and_no_capacity(grid: Grid, tmp_path: Path,
                                                               hub_processes: list[HubProcess]) -> None:
    hubs = [await HubProcess().started(grid.http) for _ in range(2)]
    hub_processes.extend(hubs)
    sim_url, sim = await grid.sim(itl_ms=2, tokens=8)
    # one worker linked to both hubs (federation): either hub can schedule it
    await grid.worker([hub.url for hub in hubs], sim_url, max_concurrency=32)
    registry = await grid.registry(str(registry_file(tmp_path, {"a": hubs[0].url, "b": hubs[1].url})))
    proxy = await grid.proxy(registry.value, max_attempts=2)
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    url = proxy.value + "/v1/chat/completions"
    failures_after_kill: list[int] = []
    killed = trio.Event()

    async def flow() -> None:
        for _ in range(60):
            after = killed.is_set()
            response = await grid.http.post(url, json=chat())
            if after and response.status_code != 200:
                failures_after_kill.append(response.status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flow)
        await trio.sleep(0.1)
        hubs[0].kill()
        killed.set()
    assert failures_after_kill == []

    sequential = [(await grid.http.post(url, json=chat())).status_code for _ in range(100)]
    assert sequential == [200] * 100

    async def stream(results: list[int]) -> None:
        async with grid.http.stream("POST", url, json=chat(stream=True)) as response:
            events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        results.append(response.status_code if events[-1] == "data: [DONE]" else -1)

    results: list[int] = []
    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(stream, results)
    assert results == [200] * 20
    health = (await grid.http.get(proxy.value + "/health")).json()
    assert [hub["up"] for hub in health["hubs"]] == [False, True]
    assert sim.stats.failed == 0


async def test_a_hub_added_with_the_tool_serves_and_a_removed_one_stops(grid: Grid, tmp_path: Path) -> None:
    first_sim, _ = await grid.sim()
    second_sim, second = await grid.sim()
    first, later = await grid.hub(), await grid.hub()
    await grid.worker(first.value, first_sim)
    await grid.worker(later.value, second_sim)
    path = registry_file(tmp_path, {"first": first.value})
    registry = await grid.registry(str(path))
    proxy = await grid.proxy(registry.value)
    await grid.wait_for_model(proxy.value, "sim")

    add_hub(str(path), "later", later.value)
    added_at = trio.current_time()
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    print(f"added hub serving through the proxy after {trio.current_time() - added_at:.2f} s")
    for index in range(16):  # 16 conversations: the new hub gets some but by a 2 ** -16 chance
        response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(content=f"chat {index}"))
        assert response.status_code == 200
    served = second.stats.completed
    assert served > 0

    remove_hub(str(path), "first")

    async def only_later() -> bool:
        return [h["name"] for h in (await grid.http.get(proxy.value + "/health")).json()["hubs"]] == ["later"]

    await eventually(only_later, "the proxy to drop the removed hub")
    for _ in range(4):
        assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())).status_code == 200
    assert second.stats.completed == served + 4

    path.write_text("[[hubs]]\nname = \n")  # a broken edit changes nothing

    async def degraded() -> bool:
        return (await grid.http.get(registry.value + "/health")).json()["status"] == "degraded"

    await eventually(degraded, "the registry to notice the broken edit")
    await trio.sleep(0.5)
    assert [h["name"] for h in (await grid.http.get(proxy.value + "/health")).json()["hubs"]] == ["later"]
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())).status_code == 200


async def test_a_proxy_listed_as_a_hub_is_never_up_and_no_request_goes_round_through_it(
        grid: Grid, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (a hunt): a proxy whose registry listed the proxy's own address (5000 for 7197)
    health-checked itself through to a real hub, took that hub's summary for its own, and sent
    conversations round through itself, one request 17 times."""
    sim_url, sim = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    path = registry_file(tmp_path, {"hub": hub.value})
    proxy = await grid.proxy((await grid.registry(str(path))).value)
    await grid.wait_for_model(proxy.value, "sim")
    add_hub(str(path), "oops", proxy.value)

    async def refused() -> bool:
        hubs = {h["name"]: h for h in (await grid.http.get(proxy.value + "/health")).json()["hubs"]}
        return "oops" in hubs and hubs["oops"].get("reason") != "not checked yet"

    await eventually(refused, "the proxy to check the address it was given")
    oops = next(h for h in (await grid.http.get(proxy.value + "/health")).json()["hubs"] if h["name"] == "oops")
    assert not oops["up"] and "a GhubAi proxy answers there, not a hub" in oops["reason"]
    for index in range(10):  # ten conversations: each goes to the hub, once
        response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(),
                                        headers={"x-session-id": f"s{index}"})
        assert response.status_code == 200
    metrics = (await grid.http.get(proxy.value + "/metrics")).text
    assert 'ghubai_requests_total{code="200",model="sim",role="proxy"} 10.0' in metrics and sim.stats.completed == 10
    looped = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(),
                                  headers={dialects.PROXY_HOP_HEADER: "1"})
    assert looped.status_code == 508 and looped.json()["error"]["code"] == "loop_detected"
    await grid.proxy(proxy.value)  # a proxy's address as registry_url: the log names that slip

    async def said() -> bool:
        return "a GhubAi proxy answers there, not a registry" in caplog.text

    await eventually(said, "the second proxy to say what answers at its registry_url")


async def test_with_the_registry_down_the_proxy_keeps_its_list(grid: Grid, tmp_path: Path) -> None:
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    registry = await grid.registry(str(registry_file(tmp_path, {"only": hub.value})))
    proxy = await grid.proxy(registry.value)
    await grid.wait_for_model(proxy.value, "sim")
    registry.stop()
    await trio.sleep(1.5)
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())).status_code == 200


async def test_client_disconnect_through_the_proxy_stops_generation(grid: Grid, tmp_path: Path) -> None:
    proxy_url, _, sims = await two_hub_grid(grid, tmp_path, itl_ms=20, tokens=10_000)
    for attempt in range(2):  # round robin: one stream lands on each hub
        async with grid.http.stream("POST", proxy_url + "/v1/chat/completions", json=chat(stream=True)) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += line.startswith("data: ")
                if seen == 3:
                    break

        async def stopped() -> bool:
            stats = [await grid.stats(url) for url in sims]
            return sum(s["cancelled"] for s in stats) == attempt + 1 and all(s["active"] == 0 for s in stats)

        await eventually(stopped, "generation to stop after the client left")


async def test_a_slow_reader_does_not_stall_other_streams(grid: Grid, tmp_path: Path) -> None:
    sim_url, _ = await grid.sim(itl_ms=0, tokens=200_000)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")
    host, port = proxy.value.removeprefix("http://").split(":")
    slow = await trio.open_tcp_stream(host, int(port))
    body = json.dumps(chat(stream=True)).encode()
    await slow.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(body), body))
    await slow.receive_some(100)  # it started, and now this client reads no more
    with trio.fail_after(WAIT_S):
        for _ in range(5):
            response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(max_tokens=50))
            assert response.json()["usage"]["completion_tokens"] == 50
    await slow.aclose()


async def test_bad_requests_at_the_proxy(grid: Grid, tmp_path: Path) -> None:
    proxy = await grid.proxy(hubs=(), limits={"max_body_bytes": 2048, "max_headers": 20})
    url = proxy.value + "/v1/chat/completions"
    none = await grid.http.post(url, json=chat())
    assert none.status_code == 503 and none.json()["error"]["type"] == "server_error"
    assert none.headers["retry-after"] == "1"
    assert (await grid.http.post(url, json=chat(content="x" * 4096))).status_code == 413
    many = {f"x-h{i}": "v" for i in range(30)} | {"x-request-id": "many-headers"}
    refused = await grid.http.post(url, json=chat(), headers=many)  # its id kept (hunt: it had none)
    assert (refused.status_code, refused.headers.get("x-request-id")) == (431, "many-headers")
    port = int(proxy.value.rsplit(":", 1)[1])
    for head in (b"P", b"POST /v1/chat/completions HTTP/1.1\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"):
        async with await trio.open_tcp_stream("127.0.0.1", port) as leaving:  # (a hunt: each was a "400
            await leaving.send_all(head)  # malformed HTTP request"; it is no request, as a connection with none)
    for reset in (False, True):
        leaving = await trio.open_tcp_stream("127.0.0.1", port)
        await leaving.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        if reset:  # (a soak: one that reset its connection mid-body had no line and no count)
            leaving.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await leaving.aclose()
    # (hunt: a client that left mid-body was a "400 malformed HTTP request")
    async with await trio.open_tcp_stream("127.0.0.1", port) as h2:  # (a hunt: a 404, then a 400)
        await h2.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        assert (await read_until(h2)).startswith(b"HTTP/1.1 505 ")
    async with await trio.open_tcp_stream("127.0.0.1", port) as later:  # (a review: 1.x is served as 1.1)
        await later.send_all(b"GET /health HTTP/1.2\r\nHost: x\r\n\r\n")
        assert (await read_until(later)).startswith(b"HTTP/1.1 200 ")

    async def counted() -> bool:
        text = (await grid.http.get(proxy.value + "/metrics")).text
        return 'ghubai_requests_total{code="499",model="",role="proxy"} 2.0' in text and \
            'ghubai_requests_total{code="505",model="",role="proxy"} 1.0' in text

    await eventually(counted, "the client that left mid-body counted as 499")
    assert 'code="400"' not in (await grid.http.get(proxy.value + "/metrics")).text
    huge = await grid.http.post(url, json=chat(), headers={"x-big": "v" * 20000})
    assert huge.status_code == 431 and set(huge.json()["error"]) == {"message", "type", "param", "code"}
    unknown = await grid.http.get(proxy.value + "/elsewhere")
    assert unknown.status_code == 404 and "Unknown endpoint" in unknown.json()["error"]["message"]
    ollama = await grid.http.post(proxy.value + "/api/chat", json=chat())
    assert ollama.status_code == 503 and isinstance(ollama.json()["error"], str)


async def test_proxy_api_keys(grid: Grid, tmp_path: Path) -> None:
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(hub.value,), api_keys=("k1",))
    await grid.wait_for_model(proxy.value, "sim")
    url = proxy.value + "/v1/chat/completions"
    assert (await grid.http.post(url, json=chat())).status_code == 401
    assert (await grid.http.post(url, json=chat(), headers={"authorization": "Bearer k1"})).status_code == 200
    assert (await grid.http.get(proxy.value + "/health")).status_code == 200


async def test_a_request_that_waited_its_queue_time_at_one_hub_is_not_queued_again_at_another(grid: Grid) -> None:
    """Regression (hunt): the proxy took a hub's 503 for a request that had waited its whole
    ``queue_timeout_s`` as any 503 and queued the request again at the next hub: with three hubs
    sharing one busy worker a client waited three times the documented limit (its SDK's retries,
    nine). Such a 503 now goes to the client; its retry comes spread out (``retry-after-ms``)."""
    sim_url, sim = await grid.sim(ttft_ms=30_000)
    hubs = [await grid.hub(limits={"queue_timeout_s": 0.5}) for _ in range(2)]
    await grid.worker([hub.value for hub in hubs], sim_url, max_concurrency=1)
    await workers_linked(grid, hubs[0].value, 1)
    await workers_linked(grid, hubs[1].value, 1)
    proxy = await grid.proxy(hubs=tuple(hub.value for hub in hubs))
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(grid.http.post, hubs[0].value + "/v1/chat/completions", json=chat()))

        async def busy() -> bool:
            return sim.stats.active == 1

        await eventually(busy, "the worker's one slot taken")
        waited = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())
        nursery.cancel_scope.cancel()
    assert waited.status_code == 503 and "was free within 0.5 s" in waited.json()["error"]["message"]
    assert 1000 <= int(waited.headers["retry-after-ms"]) <= 1500 and "x-ghubai-elsewhere" not in waited.headers
    refused = [(await grid.http.get(hub.value + "/metrics")).text.count('code="503"') for hub in hubs]
    assert sorted(refused) == [0, 1]  # one hub made it wait, and only one


async def test_a_worker_shared_by_two_hubs_keeps_its_max_concurrency(grid: Grid) -> None:
    sim_url, sim = await grid.sim(itl_ms=10, tokens=20)
    hub_a, hub_b = await grid.hub(), await grid.hub()
    await grid.worker([hub_a.value, hub_b.value], sim_url, max_concurrency=2)

    async def linked() -> bool:
        return [len(await grid.workers(h.value)) for h in (hub_a, hub_b)] == [1, 1]

    await eventually(linked, "the worker to link to both hubs")

    def through(hub_url: str) -> Callable[[], Awaitable[None]]:
        async def one() -> None:
            response = await grid.http.post(hub_url + "/v1/chat/completions", json=chat())
            assert response.status_code == 200, response.text
        return one

    assert await peak_active(sim, [through(hub_a.value), through(hub_b.value)] * 4) == 2
    assert sim.stats.completed == 8


def test_hop_by_hop_headers_are_stripped_and_forwarding_headers_added() -> None:
    from ghubai.http11.server import Request
    from ghubai.proxy.forward import upstream_headers
    from ghubai.http11.client import tls_client_context
    from ghubai.proxy.hubs import HubSet

    hubs = HubSet(1.0, tls_client_context())
    hubs.update([("h", "http://10.0.0.5:7197")])
    request = Request("POST", "/v1/x", [(b"connection", b"keep-alive, x-private"), (b"x-private", b"1"),
                                        (b"keep-alive", b"timeout=5"), (b"te", b"trailers"), (b"host", b"front"),
                                        (b"authorization", b"Bearer k"), (b"x-forwarded-for", b"10.1.1.1")], b"{}")
    headers = dict(upstream_headers(request, hubs.hubs["http://10.0.0.5:7197"], "192.0.2.7", "rid"))
    assert headers == {b"host": b"10.0.0.5:7197", b"authorization": b"Bearer k",
                       b"x-forwarded-for": b"10.1.1.1, 192.0.2.7", b"x-request-id": b"rid",
                       b"content-length": b"2", b"x-ghubai-proxy": b"1"}


async def test_upstream_failure_mid_stream_ends_with_an_error_event(grid: Grid,
                                                                     hub_processes: list[HubProcess]) -> None:
    hub = await HubProcess().started(grid.http)
    hub_processes.append(hub)
    sim_url, _ = await grid.sim(itl_ms=20, tokens=10_000)
    await grid.worker(hub.url, sim_url)
    proxy = await grid.proxy(hubs=(hub.url,))
    await grid.wait_for_model(proxy.value, "sim")
    async with grid.http.stream("POST", proxy.value + "/v1/chat/completions", json=chat(stream=True)) as response:
        events = []
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 3:
                    hub.kill()
    assert json.loads(events[-1][6:])["error"]["message"]
    assert "data: [DONE]" not in events



async def test_hubs_that_want_api_keys_pass_the_proxy_health_checks(grid: Grid) -> None:
    sim_url, _ = await grid.sim()
    hub = await grid.hub(api_keys=("client-key",))
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")
    url = proxy.value + "/v1/chat/completions"
    assert (await grid.http.post(url, json=chat())).status_code == 401  # the hub judges the key
    ok = await grid.http.post(url, json=chat(), headers={"authorization": "Bearer client-key"})
    assert ok.status_code == 200


async def test_a_hub_that_refuses_a_body_early_is_not_marked_down(grid: Grid) -> None:
    sim_url, _ = await grid.sim()
    hub = await grid.hub(limits={"max_body_bytes": 65536})
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")
    url = proxy.value + "/v1/chat/completions"
    too_big = await grid.http.post(url, json=chat(content="x" * 3_000_000))
    assert too_big.status_code == 413
    assert (await grid.http.get(proxy.value + "/health")).json()["hubs_up"] == 1
    assert (await grid.http.post(url, json=chat())).status_code == 200


async def test_a_client_that_stops_reading_is_dropped_by_the_proxy_too(grid: Grid) -> None:
    """Regression: the proxy wrote to a stalled client without a bound, holding its task, socket and
    in-flight count for ever after the hub had given up."""
    sim_url, sim = await grid.sim(tokens=1_000_000, itl_ms=0, ttft_ms=1)
    hub = await grid.hub(timeouts={"idle_s": 1.0})
    await grid.worker(hub.value, sim_url, max_concurrency=1)
    proxy = await grid.proxy(hubs=(hub.value,), limits={"idle_timeout_s": 1.0})
    await grid.wait_for_model(proxy.value, "sim")
    sock = await stalled_client(proxy.value)
    try:
        async def proxy_let_go() -> bool:
            metrics = (await grid.http.get(proxy.value + "/metrics")).text
            return 'ghubai_inflight_requests{role="proxy"} 0.0' in metrics and sim.stats.active == 0

        await eventually(proxy_let_go, "the proxy to drop the stalled client and the engine to stop")
    finally:
        sock.close()


async def test_a_request_the_proxy_cannot_read_is_answered_in_its_dialect_and_counted(grid: Grid) -> None:
    """Regression: a too large body on /api got OpenAI's error shape, and no log line or metric."""
    hub = await grid.hub()
    proxy = await grid.proxy(hubs=(hub.value,), limits={"max_body_bytes": 2048})
    ollama = await grid.http.post(proxy.value + "/api/chat", content=b"{" + b" " * 5000 + b"}")
    assert ollama.status_code == 413 and isinstance(ollama.json()["error"], str)
    assert ollama.headers.get_list("connection") == ["close"]  # (a hunt: "Connection" and "connection" were two)
    openai_style = await grid.http.post(proxy.value + "/v1/chat/completions", content=b"{" + b" " * 5000 + b"}")
    assert openai_style.status_code == 413 and openai_style.json()["error"]["type"] == "invalid_request_error"
    metrics = (await grid.http.get(proxy.value + "/metrics")).text
    assert 'ghubai_requests_total{code="413",model="",role="proxy"} 2.0' in metrics


HEAD_ONLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 309\r\n\r\n"


async def _fake_hub(grid: Grid, summary_status: int, registry_status: int, chats: list[str] | None = None,
                    hang: bool = False, answer: bytes = HEAD_ONLY,
                    respond: Callable[[Connection], Awaitable[None]] | None = None) -> str:
    """A hub that answers /api/summary and /api/registry with these statuses (and a worker serving sim);
    with ``chats`` (where each chat is noted), one whose chats get ``answer`` and a close (by default
    the answer's head alone, as a hub killed between its writes), or (``hang``) never answer, or
    get what ``respond`` writes."""
    async def handle(conn: Connection, request: Request) -> None:
        if chats is not None and request.path == "/v1/chat/completions":
            chats.append(request.path)
            if hang:
                await trio.sleep_forever()
            if respond is not None:
                await respond(conn)
                return
            await conn.stream.send_all(answer)
            await conn.stream.aclose()
        elif request.path == "/api/summary":
            await conn.respond_json(summary_status, {"hub_id": "fake", "draining": False, "heartbeat_s": 1,
                                                     "models": ["sim"], "workers": 1, "capacity": 4, "queue": {}})
        elif request.path == "/api/registry":
            await conn.respond_json(registry_status, {"hub_id": "fake", "draining": False, "heartbeat_s": 1, "queue": {},
                                                      "workers": [{"name": "w", "models": ["sim"], "inflight": 0,
                                                                   "max_concurrency": 4, "last_seen_s": 0}]})
        else:
            await conn.respond_json(404, {})

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=handle), 0,
                                                 host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_a_stream_that_ends_in_the_hub_s_error_event_is_a_502_though_its_client_left_there(
        grid: Grid) -> None:
    """Regression (chaos soak): a stream that fails after its 200 head ends in the hub's error event,
    where the SDKs stop reading and close. The proxy counted and logged the head's 200 unless the
    stream's own end had arrived before the client left (6 of 10 streams cut by a worker's kill -9),
    while the hub said 502."""
    client_left = trio.Event()

    async def failing(conn: Connection) -> None:
        await conn.start_stream(200, "text/event-stream")
        await conn.write(b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"sim",'
                         b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n')
        await conn.write(ApiError(502, "Engine error: lost the link to worker w").stream_end(sse=True))
        await client_left.wait()  # the stream's end comes after the client left
        await conn.finish()

    hub = await _fake_hub(grid, 200, 200, [], respond=failing)
    proxy = await grid.proxy(hubs=(hub,))
    await grid.wait_for_model(proxy.value, "sim")
    async with openai.AsyncOpenAI(base_url=proxy.value + "/v1", api_key="x", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}],
                                                   stream=True)
        with pytest.raises(openai.APIError, match="lost the link"):
            async with stream:
                async for _ in stream:
                    pass
    client_left.set()

    async def counted() -> bool:
        lines = (await grid.http.get(proxy.value + "/metrics")).text.splitlines()
        counts = [line for line in lines if line.startswith("ghubai_requests_total{")]
        return len(counts) == 1 and 'code="502"' in counts[0] and counts[0].endswith(" 1.0")

    await eventually(counted, "the proxy counting one 502 and nothing else")


async def test_a_hub_that_dies_after_its_answer_s_head_is_retried_not_relayed_cut(grid: Grid) -> None:
    """Regression: a hub killed between the head and the body of a whole answer left the client with
    a cut answer (1 run in 6 of the hub-killing test), though not a byte of it had been sent: the
    request now goes to another hub, or gets a 503 when there is none."""
    killed: list[str] = []
    dying = await _fake_hub(grid, 200, 200, killed)
    alone = await grid.proxy(hubs=(dying,), max_attempts=2)
    await grid.wait_for_model(alone.value, "sim")
    refused = await grid.http.post(alone.value + "/v1/chat/completions", json=chat())
    assert refused.status_code == 503 and refused.json()["error"]["message"] and killed
    # checked again, not taken down by a request's answer (one client's requests could take a hub from all)
    assert [hub["up"] for hub in (await grid.http.get(alone.value + "/health")).json()["hubs"]] == [True]
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    killed.clear()
    proxy = await grid.proxy(hubs=(dying, hub.value), max_attempts=2)
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    for turn in range(40):  # new conversations (each goes to the hub its key ranks first), until one met the dying hub
        answer = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(content=f"hello {turn}"))
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
        if killed:
            break
    assert killed


async def test_a_client_that_leaves_during_the_retry_is_not_counted_with_the_broken_hub_s_status(
        grid: Grid) -> None:
    """Regression (review): the retried request kept the broken hub's 200, so a client that left
    while the next hub worked was counted and logged with an answer it never got."""
    killed: list[str] = []
    dying, hanging = await _fake_hub(grid, 200, 200, killed), await _fake_hub(grid, 200, 200, [], hang=True)
    proxy = await grid.proxy(hubs=(dying, hanging), max_attempts=2)
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    for turn in range(40):  # new conversations, until one went to the dying hub first, then to the hanging one
        with pytest.raises(httpx.TimeoutException):
            await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(content=f"leave {turn}"),
                                 timeout=0.5)
        if killed:
            break
    assert killed
    assert 'code="200"' not in (await grid.http.get(proxy.value + "/metrics")).text


@pytest.mark.parametrize("content_type, events, half", [
    (b"text/event-stream", b'data: {"choices":[{"index":0,"delta":{"content":"one"}}]}\n\n',
     b'data: {"choices":[{"delta":{"cont'),
    (b"application/x-ndjson", b'{"message":{"role":"assistant","content":"one"},"done":false}\n', b'{"message":{"cont'),
])
async def test_a_hub_cut_mid_event_leaves_the_client_whole_events_and_a_clean_error(
        grid: Grid, content_type: bytes, events: bytes, half: bytes) -> None:
    """Regression (review): the proxy passed on half an event from a hub that died, then its error
    event right after it, so the client read broken JSON (the openai SDK: JSONDecodeError, not an
    APIError) instead of the error."""
    body = events + half
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ntransfer-encoding: chunked\r\n\r\n"
              + b"%x\r\n" % len(body) + body + b"\r\n")
    proxy = await grid.proxy(hubs=(await _fake_hub(grid, 200, 200, [], answer=answer),), max_attempts=1)
    await grid.wait_for_model(proxy.value, "sim")
    response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(stream=True))
    sse = content_type == b"text/event-stream"
    lines = [line.removeprefix("data: ") for line in response.text.splitlines() if line]
    assert [json.loads(line) for line in lines][:1] == [json.loads(events.removeprefix(b"data: "))]
    error = json.loads(lines[-1])["error"]
    assert len(lines) == 2 and "failed in the middle" in (error["message"] if sse else error), response.text
    metrics = (await grid.http.get(proxy.value + "/metrics")).text
    assert 'code="502"' in metrics and 'code="200"' not in metrics  # counted as what the client got


async def test_health_comes_from_the_summary_and_an_old_hub_from_its_registry(grid: Grid) -> None:
    """Regressions: a hub whose /api/registry failed was held down for good although its summary
    said it served; a hub older than /api/summary that wants API keys (401) was called down."""
    failing_registry = await _fake_hub(grid, 200, 500)
    old_with_keys = await _fake_hub(grid, 401, 200)
    proxy = await grid.proxy(hubs=(failing_registry, old_with_keys))

    async def both_up() -> bool:
        health = (await grid.http.get(proxy.value + "/health")).json()
        return health["hubs_up"] == 2 and all(hub["models"] == ["sim"] for hub in health["hubs"])

    await eventually(both_up, "both hubs up")


async def test_a_hub_whose_answers_break_goes_down_only_when_they_break_in_a_row() -> None:
    """Review: an answer that broke before its first byte took its hub down at once (a client's
    lowercase ``head`` did it to a healthy hub); then, checked instead, a hub that broke every answer
    but passed its checks stayed up for good. Down at ``down_after`` in a row; an answer between resets."""
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([("a", "http://127.0.0.1:1")])
    [hub] = hubs.hubs.values()
    state = {"models": ["m"], "loaded": [], "capacity": 2, "queue": {}, "heartbeat_s": 1.0, "draining": False}
    hubs.set_health(hub, True, state=state)
    hubs.answer_broke(hub, "cut", down_after=2)
    assert hub.up and hubs.check_now.is_set()  # checked at once
    hub.broken_answers = 0  # (an answer relayed whole in between, as the forwarder notes it)
    hubs.answer_broke(hub, "cut", down_after=2)
    assert hub.up
    hubs.answer_broke(hub, "cut", down_after=2)
    assert not hub.up and "2 answers in a row broke" in hub.reason


async def test_a_hub_renamed_at_its_address_keeps_its_state_and_the_log_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """(A hunt: the registry logged the rename, the proxy nothing.)"""
    caplog.set_level(logging.INFO, "ghubai.proxy")
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([("a", "http://127.0.0.1:1")])
    [hub] = hubs.hubs.values()
    hubs.set_health(hub, True)
    hubs.update([("b", "http://127.0.0.1:1/")])
    assert list(hubs.hubs.values()) == [hub] and (hub.name, hub.up) == ("b", True)
    assert "hub a (http://127.0.0.1:1) renamed b" in caplog.text


async def test_a_conversation_leaves_its_hub_only_while_that_hub_is_much_busier() -> None:
    """Regression: identical conversations all went to one hub however busy, while the hub itself
    bounds affinity by load."""
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([("a", "http://127.0.0.1:1"), ("b", "http://127.0.0.1:2")])
    for hub in hubs.hubs.values():
        hubs.set_health(hub, True, state={"models": ["m"], "loaded": [], "capacity": 2, "queue": {}, "heartbeat_s": 1.0, "draining": False})
    first = hubs.pick("m", set(), 42)
    assert first is not None and all(hubs.pick("m", set(), 42) is first for _ in range(5))
    first.inflight = 1  # half its slots: 0.5 above the other, still within the margin
    assert hubs.pick("m", set(), 42) is first
    first.inflight = 2
    assert hubs.pick("m", set(), 42) is not first


async def test_a_hub_address_that_answers_something_else_is_down_and_the_proxy_lives_on(grid: Grid) -> None:
    """Regression: a 200 that was not a hub's summary ({}, [], odd figures) ended the health checks
    and with them the proxy."""
    async def handle(conn: Connection, request: Request) -> None:
        await conn.respond_json(200, {"models": None} if request.path == "/api/summary" else [])

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=handle), 0,
                                                 host="127.0.0.1"))
    other = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(other, hub.value))
    await grid.wait_for_model(proxy.value, "sim")
    health = (await grid.http.get(proxy.value + "/health")).json()
    assert [h["up"] for h in health["hubs"]] == [False, True]
    assert "the answer lists no models" in health["hubs"][0]["reason"]
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())).status_code == 200


async def test_a_proxy_listening_on_every_ipv6_address_serves_ipv4_too(grid: Grid) -> None:
    """Regression (review): ``listen = "[::]:PORT"`` made the proxy IPv6-only (trio binds :: with
    IPV6_V6ONLY), while hub and registry on the same address serve both."""
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proxy = await grid.proxy(hubs=(), listen=f"[::]:{port}")
    assert proxy.value.startswith("http://[::]:")
    assert (await grid.http.get(f"http://127.0.0.1:{port}/health")).status_code == 200


async def test_a_model_named_outside_model_finds_its_hub_behind_the_proxy(grid: Grid) -> None:
    """Regression (review): with two hubs serving different models, ``GET /v1/models/{id}`` (the
    openai SDK's models.retrieve) and ``/api/show {"name": ...}`` went to any hub: 200 and 404 by turns;
    ``/api/ps`` (``ollama ps``) answered one hub's models in memory by turns, not every hub's."""
    hubs = []
    for model in ("sim", "other"):
        sim_url, _ = await grid.sim(models=[model])
        hub = await grid.hub()
        await grid.worker(hub.value, sim_url)
        hubs.append(hub.value)
    proxy = await grid.proxy(hubs=tuple(hubs))
    await grid.wait_for_model(proxy.value, "sim")
    await grid.wait_for_model(proxy.value, "other")
    for _ in range(4):
        assert (await grid.http.get(proxy.value + "/v1/models/sim")).json()["id"] == "sim"
        assert (await grid.http.head(proxy.value + "/v1/models/other")).status_code == 200
        assert (await grid.http.post(proxy.value + "/api/show", json={"name": "sim"})).status_code == 200
        running = (await grid.http.get(proxy.value + "/api/ps")).json()["models"]
        assert sorted(model["name"] for model in running) == ["other", "sim"]
    missing = await grid.http.get(proxy.value + "/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_ollama_ps_through_the_proxy_lists_what_the_hubs_hold_now(grid: Grid) -> None:
    """Regression (hunt): ``/api/ps`` at the proxy took its names from the last health check and the
    figures from the hubs' own lists: for up to ``health.interval_s`` after an engine evicted a model
    for another, it showed the evicted one, with stand-in figures, and not the one in memory."""
    sim_url, _ = await grid.sim(models=("m1", "m2"), max_loaded=1)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, residency_interval_s=0.2)
    proxy = await grid.proxy(hubs=(hub.value,), health={"interval_s": 600})  # (its first check only)
    for model in ("m1", "m2"):
        answer = await grid.http.post(proxy.value + "/api/generate", json={"model": model, "prompt": "x",
                                                                           "stream": False})
        assert answer.status_code == 200, answer.text

        async def held(model: str = model) -> bool:
            running = (await grid.http.get(proxy.value + "/api/ps")).json()["models"]
            return [entry["name"] for entry in running] == [model] and running[0]["size"] > 0
        await eventually(held, f"the proxy's /api/ps to list {model} alone")


async def test_a_model_whose_worker_is_restarting_is_found_as_its_requests_are(grid: Grid) -> None:
    """Regression (hunt): while a model's only worker relinked (or drained, in a restart) its requests
    waited for it and succeeded, but ``GET /v1/models/{id}`` (the openai SDK's models.retrieve, a
    model picker's check) said at hub and proxy that the model did not exist, which a client takes
    for good. The lists leave such a model out; a lookup answers as a request would."""
    sim_url, _ = await grid.sim(models=("llama3:latest",))
    other_url, _ = await grid.sim(models=("other",))
    hub = await grid.hub()
    worker = await grid.worker(hub.value, sim_url, name="w")
    await grid.worker(hub.value, other_url, name="o")
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "llama3:latest")
    worker.stop()  # its link breaks: the hub waits a few seconds for it to come back

    async def unlisted() -> bool:
        listed = [(await grid.http.get(url + "/v1/models")).json()["data"] for url in (hub.value, proxy.value)]
        return not any(entry["id"] == "llama3:latest" for entries in listed for entry in entries)

    await eventually(unlisted, "the model out of the lists of hub and proxy")
    for url in (hub.value, proxy.value):
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
            assert (await sdk.models.retrieve("llama3")).id == "llama3:latest"  # (as served)
            with pytest.raises(openai.NotFoundError):
                await sdk.models.retrieve("nope")
    await grid.worker(hub.value, sim_url, name="w")
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(model="llama3"))).status_code == 200


def test_whole_events_hold_back_the_start_of_the_next_and_search_each_byte_once() -> None:
    held = bytearray()
    assert dialects.whole_events(held, b"data: a\n\n", b"\n\n") == b"data: a\n\n" and not held  # the usual read
    assert dialects.whole_events(held, b"data: b\n\ndata: c", b"\n\n") == b"data: b\n\n" and held == b"data: c"
    assert dialects.whole_events(held, b"\n", b"\n\n") == b"" and held == b"data: c\n"
    assert dialects.whole_events(held, b"\ndata: d", b"\n\n") == b"data: c\n\n" and held == b"data: d"  # across the seam
    for _ in range(1000):  # one huge event over many reads: held grows, nothing is passed on
        assert dialects.whole_events(held, b"x" * 1000, b"\n\n") == b""
    assert len(held) == 1_000_007 and dialects.whole_events(held, b"\n", b"\n") == b"data: d" + b"x" * 1_000_000 + b"\n"


@pytest.mark.parametrize("target, expected", [
    ("/v1/chat/completions?x=1", "/v1/chat/completions?x=1"), ("http://elsewhere/v1/models?a=b", "/v1/models?a=b"),
    ("https://h:1", "/"), ("*", "*"),
])
def test_an_absolute_form_target_becomes_its_path_and_query(target: str, expected: str) -> None:
    assert origin_form(target) == expected


def test_models_in_memory_come_from_the_summary_or_an_old_hub_s_workers() -> None:
    """Review: a hub read from /api/registry (older than /api/summary) had all it served counted as
    in memory, and a summary's ``loaded`` that was no list would have called the hub down."""
    assert _state_of({"models": ["a", "b"], "loaded": ["a"]}, None)["loaded"] == ["a"]
    assert _state_of({"models": ["a", "b"]}, None)["loaded"] == ["a", "b"]  # a hub that cannot tell
    assert _state_of({"models": ["a"], "loaded": 5}, None)["loaded"] == ["a"]
    workers = [{"models": ["a", "b"], "loaded": ["a"]}, {"models": ["c"]}, {"models": ["d"], "loaded": ["d"], "draining": True}]
    assert _state_of({}, workers)["loaded"] == ["a", "c"]


async def test_a_worker_that_joins_a_hub_is_listed_at_the_proxy_s_next_check(
        grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the proxy read a hub's workers in detail every fifth check only, so ``ghubai status``
    right after ``ghubai up``'s banner said "workers 0" and failed. A summary that counts other workers
    than the proxy lists now reads them at once."""
    monkeypatch.setattr("ghubai.proxy.follow.DETAILS_EVERY", 1000)  # (only the first check reads them otherwise,
    monkeypatch.setattr("ghubai.proxy.server.DETAILS_WANTED_S", 0.0)  # and none for a dashboard, for the test)
    hub = await grid.hub()
    proxy = await grid.proxy(hubs=(hub.value,))

    async def listed(count: int) -> bool:
        [seen] = (await grid.http.get(proxy.value + "/health")).json()["hubs"]
        return seen["up"] and len(seen["workers"]) == count

    await eventually(lambda: listed(0), "the hub up, with no worker")
    sim_url, _ = await grid.sim()
    await grid.worker(hub.value, sim_url)
    await eventually(lambda: listed(1), "the worker listed")


def test_a_hub_s_worker_entry_passes_on_as_text_lists_of_text_and_numbers() -> None:
    """What the proxy passes on of a hub's worker entry, whatever a hub of another version sends: a list
    is a list only when it was one (a text would be its letters), figures only when they are numbers."""
    entry = _workers_of({"workers": [{"id": ["x"], "name": "w", "models": "sim", "loaded": ["a", {"b": 1}, 2],
                                      "inflight": "3", "busy": True, "max_concurrency": 4, "draining": "no",
                                      "usage": {"prompt_tokens": 5, "x": "y"}, "secret": "z"}]})
    assert entry == [{"id": "['x']", "name": "w", "models": [], "loaded": ["a", "2"], "max_concurrency": 4,
                      "draining": False, "usage": {"prompt_tokens": 5}}]


async def test_polling_health_asks_the_hubs_for_nothing_more_but_the_dashboard_does(
        grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (scale hunt): each GET of the proxy's /health had every health check read every
    hub's workers for 10 s: a monitor polling it every 5 s made that for good (50 hubs of 500 workers:
    7 times the hubs' traffic, the proxy's CPU 6 → 39 %, its p99 15 → 300 ms). Only the dashboard's
    data (and so ``ghubai status``) asks for them."""
    monkeypatch.setattr("ghubai.proxy.follow.DETAILS_EVERY", 1000)  # (only the first check reads them otherwise)
    checks = {"/api/summary": 0, "/api/registry": 0}

    async def hub(conn: Connection, request: Request) -> None:
        checks[request.path] = checks.get(request.path, 0) + 1
        if request.path == "/api/summary":
            await conn.respond_json(200, {"hub_id": "h", "draining": False, "heartbeat_s": 1, "models": ["sim"],
                                          "workers": 1, "capacity": 4, "queue": {}})
        else:
            await conn.respond_json(200, {"hub_id": "h", "draining": False, "heartbeat_s": 1, "queue": {},
                                          "workers": [{"name": "w", "models": ["sim"], "inflight": 0,
                                                       "max_concurrency": 4, "last_seen_s": 0}]})

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=hub), 0,
                                                 host="127.0.0.1"))
    proxy = await grid.proxy(hubs=(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}",))
    await grid.wait_for_model(proxy.value, "sim")
    details = checks["/api/registry"]

    async def checked_again(rounds: int) -> bool:  # polling /health all the while
        assert (await grid.http.get(proxy.value + "/health")).status_code == 200
        return checks["/api/summary"] >= rounds

    await eventually(partial(checked_again, checks["/api/summary"] + 5), "five more health checks")
    assert checks["/api/registry"] == details
    assert (await grid.http.get(proxy.value + "/dashboard/data")).status_code == 200

    async def detailed() -> bool:
        return checks["/api/registry"] > details

    await eventually(detailed, "the workers read again for the dashboard")


async def test_what_hubs_told_of_their_models_is_forgotten_after_a_second(autojump_clock: Any) -> None:
    """Hunt: the proxy kept a copy of every hub's model list per Authorization value it ever saw, 1,000
    of them (435 MB for 500 models, made-up keys on an open proxy as good as real ones), though each
    is reused for a second only. Now what is a second old goes as the next one is told."""
    proxy = Proxy(ProxyConfig())
    client = SimpleNamespace(peer="127.0.0.1")  # (its connection: only its address is read)
    for key in range(50):
        keyed = Request("GET", "/api/tags", [(b"authorization", f"Bearer k{key}".encode())], b"")
        await proxy._told(client, keyed, False)  # type: ignore[arg-type]
    assert len(proxy._told_at) == 50
    await trio.sleep(TOLD_FOR_S)
    await proxy._told(client, Request("GET", "/api/ps", [], b""), running=True)  # type: ignore[arg-type]
    assert list(proxy._told_at) == [("/api/ps", b"")]


async def test_the_round_robin_of_models_no_hub_serves_any_more_is_forgotten() -> None:
    """Hunt: the proxy kept a round-robin turn for every model a hub ever served (a gateway engine's
    churning list grew it without end); those of models no hub lists any more now go."""
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([("a", "http://127.0.0.1:1")])
    [hub] = hubs.hubs.values()
    for turn in range(200):
        names = [f"gen-{turn}-{index}" for index in range(3)]
        hubs.set_health(hub, True, state={"models": names, "loaded": [], "capacity": 2, "queue": {},
                                          "heartbeat_s": 1.0, "draining": False})
        assert all(hubs.pick(name, set()) is hub for name in names)
        assert len(hubs._turns) <= 2 * 3 + 64 + 1


async def test_an_unload_through_the_proxy_reaches_every_hub_that_holds_the_model(grid: Grid) -> None:
    """Regression (a hunt): ``keep_alive: 0`` through a proxy went to one hub, as any request does:
    the engines behind the other hubs kept the model, and the client heard "unload"."""
    sims = [await grid.sim(models=("a",), max_loaded=2, load_ms=10) for _ in range(2)]
    hubs = [await grid.hub() for _ in range(2)]
    for (url, _), hub in zip(sims, hubs):
        await grid.worker(hub.value, url, residency_interval_s=0.2)
    proxy = await grid.proxy(hubs=tuple(hub.value for hub in hubs))
    await grid.wait_for_model(proxy.value, "a", hubs_up=2)
    for url, _ in sims:
        assert (await grid.http.post(url + "/api/generate", json={"model": "a"})).json()["done_reason"] == "load"

    async def held() -> bool:
        return sum("a" in hub["loaded"] for hub in (await grid.http.get(proxy.value + "/health")).json()["hubs"]) == 2

    await eventually(held, "the proxy to hear that both hubs' engines hold the model")
    response = await grid.http.post(proxy.value + "/api/generate", json={"model": "a", "keep_alive": 0})
    assert response.status_code == 200 and response.json()["done_reason"] == "unload", response.text
    assert [sim.loaded() for _, sim in sims] == [[], []]
