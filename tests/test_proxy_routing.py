"""The proxy's routing as hubs change under it: a model's hubs busy, down, losing or gaining it; a
slow answer; addresses and environments that would send checks and requests different ways; a
registry that does not hold its long-poll. Real hubs, workers and simulators on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import ssl
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from conftest import Grid, chat, eventually, next_request, workers_linked
from ghubai.config import ConfigError, HubEntry, hub_address_problem, parse
from ghubai.configfiles import add_hub
from ghubai.http11.server import Connection, Request, serve_connection
from ghubai.proxy.hubs import SETTLING_S, Hub, HubSet


async def _first_of_two_hubs_down(grid: Grid, first: str, second: str) -> str:
    """Two hubs, one model each, behind a proxy; then the first hub down, as the proxy sees it."""
    hubs = []
    for model in (first, second):
        sim_url, _ = await grid.sim(models=[model])
        hubs.append(await grid.hub())
        await grid.worker(hubs[-1].value, sim_url)
    proxy = await grid.proxy(hubs=tuple(hub.value for hub in hubs))
    for model in (first, second):
        await grid.wait_for_model(proxy.value, model)
    hubs[0].stop()

    async def first_down() -> bool:
        return [hub["up"] for hub in (await grid.http.get(proxy.value + "/health")).json()["hubs"]] == [False, True]

    await eventually(first_down, "the first hub down")
    return proxy.value


async def test_a_model_s_busy_hub_is_a_503_not_another_hub_s_404(grid: Grid) -> None:
    """Regression (hunt): the only hub with a model answered 503 (no slot in time), the proxy
    retried on a hub without the model, and the client got 404 model_not_found, which SDKs take
    for good, where a 503 they retry."""
    alpha_url, alpha = await grid.sim(models=["alpha"], tokens=100_000, itl_ms=10)
    hub_a = await grid.hub(limits={"queue_timeout_s": 0.3})
    await grid.worker(hub_a.value, alpha_url, max_concurrency=1)
    beta_url, _ = await grid.sim(models=["beta"])
    hub_b = await grid.hub()
    await grid.worker(hub_b.value, beta_url)
    proxy = await grid.proxy(hubs=(hub_a.value, hub_b.value))
    for model in ("alpha", "beta"):
        await grid.wait_for_model(proxy.value, model)
    url = proxy.value + "/v1/chat/completions"
    async with grid.http.stream("POST", url, json=chat("alpha", stream=True)) as busy:  # alpha's only slot
        assert busy.status_code == 200

        async def running() -> bool:
            return alpha.stats.active == 1

        await eventually(running, "the first request to hold the slot")
        second = await grid.http.post(url, json=chat("alpha", content="another"))
    assert second.status_code == 503 and "retry-after" in second.headers, second.text


async def test_a_model_s_hub_down_is_a_503_not_another_hub_s_404(grid: Grid) -> None:
    """Regression (hunt): the same, with the model's only hub down (restarting)."""
    proxy = await _first_of_two_hubs_down(grid, "alpha", "beta")
    response = await grid.http.post(proxy + "/v1/chat/completions", json=chat("alpha"))
    assert response.status_code == 503, response.text


@pytest.mark.parametrize("change", ["lost", "gained"])
async def test_a_hub_whose_models_changed_since_its_check_does_not_404_while_another_has_it(
        grid: Grid, change: str) -> None:
    """Regression (hunt): between two health checks the proxy sent a model's requests to a hub that
    had just lost it, or (nobody advertising a model just gained) to any hub, and the hub's 404
    reached the client: [404, 200, 404, 200]. A 404 at one hub is now tried at another."""
    hub_a, hub_b = await grid.hub(), await grid.hub()
    leaving = await grid.worker(hub_a.value, (await grid.sim(models=["alpha"]))[0], name="a-alpha")
    await grid.worker(hub_a.value, (await grid.sim(models=["beta"]))[0], name="a-beta")
    await grid.worker(hub_b.value, (await grid.sim(models=["alpha"]))[0], name="b-alpha")
    proxy = await grid.proxy(hubs=(hub_a.value, hub_b.value), health={"interval_s": 60.0})
    await grid.wait_for_model(proxy.value, "alpha", hubs_up=2)
    if change == "lost":  # hub A loses alpha; hub B still has it
        leaving.stop()
        await workers_linked(grid, hub_a.value, 1)
    else:  # hub B gains gamma, which no hub advertises yet
        await grid.worker(hub_b.value, (await grid.sim(models=["gamma"]))[0], name="b-gamma")
        await workers_linked(grid, hub_b.value, 2)
    model = "alpha" if change == "lost" else "gamma"
    statuses = [(await grid.http.post(proxy.value + "/v1/embeddings", json={"model": model, "input": "x"})).status_code
                for _ in range(4)]
    assert statuses == [200] * 4


async def test_one_slow_answer_is_a_504_and_takes_no_hub_down(grid: Grid) -> None:
    """Regression (hunt): an answer slower than response_timeout_s marked its hub down and was run
    again on the next hub, marking it down too: that client got 503 after every hub's wait, and
    every other client 503 until the next check."""
    hubs = []
    for _ in range(2):
        sim_url, _ = await grid.sim(ttft_ms=1500)
        hub = await grid.hub()
        await grid.worker(hub.value, sim_url)
        hubs.append(hub.value)
    proxy = await grid.proxy(hubs=tuple(hubs), response_timeout_s=1.0, health={"interval_s": 60.0})
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    slow = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())
    assert slow.status_code == 504 and "response_timeout_s" in slow.text
    assert (await grid.http.get(proxy.value + "/health")).json()["hubs_up"] == 2
    assert (await grid.http.post(proxy.value + "/v1/embeddings", json={"model": "sim", "input": "x"})).status_code == 200


def test_a_hub_address_with_a_path_is_refused() -> None:
    """Regression (hunt): ``http://gw:8080/hub1`` passed; health checks asked the gateway under the
    path and found the hub up, while forwarding kept only host and port and reached nothing."""
    assert hub_address_problem("http://gw:8080/hub1") and not hub_address_problem("http://gw:8080/")
    for role, text in (("proxy", 'hubs = ["http://gw:8080/hub1"]'),
                       ("registry", '[[hubs]]\nname = "a"\naddress = "http://gw:8080/hub1?x=1"')):
        with pytest.raises(ConfigError, match="no path, query or fragment"):
            parse(role, text, f"{role}.toml")


async def test_health_checks_reach_hubs_as_forwarding_does_whatever_http_proxy_says(
        grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (hunt): with HTTP_PROXY set (a corporate container), health checks went through
    that proxy and called reachable hubs down, while forwarding dials hubs directly."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # a proxy that reaches nothing
    proxy = await grid.proxy(hubs=(hub.value,))
    monkeypatch.delenv("HTTP_PROXY")
    await grid.wait_for_model(proxy.value, "sim")


async def test_a_registry_answer_not_held_does_not_make_the_proxy_spin(grid: Grid) -> None:
    """Regression (hunt): a 304 that came back at once (a cache or gateway before the registry) was
    asked again at once: 1,267 polls a second."""
    polls = 0

    async def registry(conn: Connection, request: Request) -> None:
        nonlocal polls
        polls += 1
        if request.header(b"if-none-match") == b'"v1"':
            await conn.respond(304, b"", headers={"etag": '"v1"'})
        else:
            await conn.respond(200, json.dumps({"version": 1, "hubs": []}).encode(), headers={"etag": '"v1"'})

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=registry), 0,
                                                 host="127.0.0.1"))
    await grid.proxy(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    await trio.sleep(1.0)  # (what is measured is the count of polls in this time)
    assert 1 <= polls <= 5, polls


async def test_a_404_is_tried_elsewhere_on_model_routes_only_and_rechecks_at_most_once_a_second(grid: Grid) -> None:
    """Review: every 404 of a request naming a model was retried, and each set off a round of health
    checks of every hub: twenty POSTs to an endpoint no hub serves (``/api/pull``, a typo) made
    thirty-two rounds. Now only a model route's 404 goes on to another hub, and a hub found without
    a model it listed is checked again at most once a second."""
    summaries = 0

    async def hub(conn: Connection, request: Request) -> None:  # lists "sim", and has nothing
        nonlocal summaries
        if request.path == "/api/summary":
            summaries += 1
            await conn.respond_json(200, {"hub_id": "h", "draining": False, "heartbeat_s": 1, "models": ["sim"],
                                          "loaded": [], "workers": 1, "capacity": 4, "queue": {}})
        else:
            await conn.respond_json(404, {"error": {"message": "no", "code": "model_not_found"}})

    addresses = []
    for _ in range(2):
        listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=hub), 0,
                                                     host="127.0.0.1"))
        addresses.append(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    proxy = await grid.proxy(hubs=tuple(addresses), health={"interval_s": 60.0})
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    before = summaries
    for path in ("/api/pull", "/v1/no-such-endpoint") * 10:
        assert (await grid.http.post(proxy.value + path, json={"model": "sim"})).status_code == 404
    assert summaries == before  # not model routes: no retry, no check
    for _ in range(10):
        assert (await grid.http.post(proxy.value + "/v1/embeddings", json={"model": "sim", "input": "x"})).status_code == 404

    async def rechecked() -> bool:
        return summaries > before

    await eventually(rechecked, "a round of checks for the hubs found without their model")
    assert summaries - before <= 2 * 2  # a round or two (both hubs each), not one per request


async def test_a_hub_added_is_checked_at_once_however_many_listed_hubs_hang(grid: Grid, tmp_path: Path) -> None:
    """Regression (hunt): each round of health checks waited for the checks of every hub, and a hub
    that hangs holds its check for ``timeout_s``: with 300 such hubs listed, a hub added to the
    registry was first checked, and served, 12 s later (here: a minute)."""
    asked: Counter[int] = Counter()

    async def hangs(port: int, conn: Connection, request: Request) -> None:  # fails its first check, then hangs
        asked[port] += 1
        if asked[port] > 1:
            await trio.sleep_forever()
        await conn.respond_json(500, {"error": "starting"})

    hanging = []
    for _ in range(40):
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        await grid.nursery.start(trio.serve_listeners, partial(serve_connection, handle=partial(hangs, port)),
                                 [trio.SocketListener(listener)])
        hanging.append(port)
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    path = tmp_path / "registry.toml"
    path.write_text("".join(f'[[hubs]]\nname = "h{port}"\naddress = "http://127.0.0.1:{port}"\n' for port in hanging))
    registry = await grid.registry(str(path))
    proxy = await grid.proxy(registry.value, health={"interval_s": 0.2, "timeout_s": 60.0})

    async def hang() -> bool:  # each failed its first check; the next ones hang
        return len(asked) == len(hanging) and any(count > 1 for count in asked.values())

    await eventually(hang, "the listed hubs' second checks")
    add_hub(str(path), "real", hub.value)
    await grid.wait_for_model(proxy.value, "sim")


async def test_a_proxy_with_a_registry_and_static_hubs_serves_once_both_are_checked(grid: Grid) -> None:
    """Review: the static hubs' checks, begun before the registry's list came, were left out of the
    first round the proxy waits for: it took clients while its one healthy hub was "not checked
    yet", and answered them 503 "No healthy hub"."""
    async def hub(model: str, delay_s: float, conn: Connection, request: Request) -> None:
        await trio.sleep(delay_s)
        await conn.respond_json(200, {"hub_id": model, "draining": False, "heartbeat_s": 1, "models": [model],
                                      "loaded": [], "workers": 1, "capacity": 4, "queue": {}})

    addresses = []
    for model, delay_s in (("static", 0.3), ("listed", 0.0)):
        listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(
            serve_connection, handle=partial(hub, model, delay_s)), 0, host="127.0.0.1"))
        addresses.append(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    registry = await grid.registry(hubs=(HubEntry("listed", addresses[1]),))
    proxy = await grid.proxy(registry.value, hubs=(addresses[0],), health={"interval_s": 60.0})
    models = await grid.http.get(proxy.value + "/v1/models")
    assert models.status_code == 200 and [model["id"] for model in models.json()["data"]] == ["listed", "static"]


async def test_a_short_name_goes_to_the_healthy_hub_that_serves_it_tagged(grid: Grid) -> None:
    """Review: a down hub's old list (``llama3``) renamed a request for what a healthy hub serves as
    ``llama3:latest``, and no healthy hub served that name: 503 for ever."""
    proxy = await _first_of_two_hubs_down(grid, "llama3", "llama3:latest")
    answer = await grid.http.post(proxy + "/v1/embeddings", json={"model": "llama3", "input": "x"})
    assert answer.status_code == 200, answer.text


async def test_routing_by_model_as_the_hubs_come_and_go() -> None:
    """The proxy's choice of hubs alone, no sockets: a model's healthy hubs; every healthy hub for a
    model no hub lists; none when its hubs are down (their 503, not another's 404); a short name as
    the healthy hubs serve it, and the lists learnt again when a check changes them."""
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([("a", "http://127.0.0.1:1"), ("b", "http://127.0.0.1:2")])
    a, b = hubs.hubs.values()

    def check(hub: Hub, up: bool, *models: str) -> None:
        hubs.set_health(hub, up, state={"queue": {}, "heartbeat_s": 1.0, "capacity": 4, "models": list(models),
                                        "loaded": []})

    check(a, True, "llama3")
    check(b, True, "qwen:latest")
    assert [hub.name for hub in hubs.candidates("llama3", set())] == ["a"]
    assert [hub.name for hub in hubs.candidates("unknown", set())] == ["a", "b"]
    assert hubs.named("qwen") == "qwen:latest" and hubs.named("llama3") == "llama3"
    check(a, False, "llama3")
    assert hubs.candidates("llama3", set()) == [] and hubs.serves("llama3")
    check(b, True, "qwen:latest", "llama3:latest")  # a down hub's old "llama3" does not rename it
    assert hubs.named("llama3") == "llama3:latest"
    assert [hub.name for hub in hubs.candidates("llama3:latest", set())] == ["b"]


async def test_round_robin_takes_turns_per_model() -> None:
    """Regression (hunt): one turn for every model, so a client that alternated two models (a RAG
    pipeline's embedding and chat) sent all of each model's requests to one hub."""
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([("a", "http://127.0.0.1:1"), ("b", "http://127.0.0.1:2")])
    for hub in hubs.hubs.values():
        hubs.set_health(hub, True, state={"queue": {}, "heartbeat_s": 1.0, "capacity": 4, "models": ["e1", "e2"],
                                          "loaded": []})
    picks: dict[str, Counter[str]] = {"e1": Counter(), "e2": Counter()}
    for _ in range(10):
        for model in ("e1", "e2"):
            hub = hubs.pick(model, set())
            assert hub is not None
            picks[model][hub.name] += 1
    assert picks == {"e1": Counter(a=5, b=5), "e2": Counter(a=5, b=5)}


async def test_a_hub_that_moves_keeps_its_models_until_it_is_checked_at_its_new_address() -> None:
    """Regression (hunt): a registry entry whose address changed under the same name (the hub moved
    machines, or its address was spelled anew) became a hub that served nothing until checked, so its
    models' requests went to every other hub: a 404 "model_not_found", for as long as the hub at its
    new address was not up yet. Its requests get the 503 of a model whose hubs are down instead."""
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([("a", "http://127.0.0.1:1"), ("b", "http://127.0.0.1:2")])
    for hub, models in zip(hubs.hubs.values(), (["m1"], ["m2"])):
        hubs.set_health(hub, True, state={"queue": {}, "heartbeat_s": 1.0, "capacity": 4, "models": models,
                                          "loaded": models})
    hubs.update([("a", "http://10.0.0.9:7197"), ("b", "http://127.0.0.1:2")])
    moved = hubs.hubs["http://10.0.0.9:7197"]
    assert not moved.up and moved.models == {"m1"} and moved.loaded == {"m1"} and hubs.serves("m1")
    assert hubs.candidates("m1", set()) == [] and hubs.check_now.is_set()


async def test_one_failed_health_check_does_not_take_a_hub_down_but_failures_in_a_row_do(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (review of the proxy's health checks): one check that failed (a hub too busy to
    answer within ``timeout_s``, a lost packet) took the grid's only hub out: every request got 503
    until the next check. Now a hub goes down at ``down_after`` failures in a row."""
    from relay import Relay

    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    relay = Relay(int(hub.value.rsplit(":", 1)[1]))
    relay_port = await grid.nursery.start(relay.serve)
    proxy = await grid.proxy(hubs=(f"http://127.0.0.1:{relay_port}",), health={"interval_s": 0.6, "timeout_s": 0.5})
    await grid.wait_for_model(proxy.value, "sim")

    async def logged(text: str) -> bool:
        return text in caplog.text

    relay.frozen = True  # a check that gets no answer in time
    await eventually(partial(logged, "health check failed"), "a failed health check")
    relay.frozen = False
    response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())
    assert response.status_code == 200, response.text
    assert "is down" not in caplog.text

    relay.frozen = True
    await eventually(partial(logged, "is down"), "the hub down after failures in a row")
    assert "(1 in a row" in caplog.text and "(2 in a row" not in caplog.text


async def test_a_hub_whose_port_is_refused_goes_down_at_the_first_check(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (review): a check that found the hub's port refused counted as one slow answer of
    ``down_after``: a dead hub of an idle grid stayed up in /health, the dashboard and status."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(hub.value,), health={"down_after": 5})
    await grid.wait_for_model(proxy.value, "sim")
    hub.stop()

    async def down() -> bool:
        return not (await grid.http.get(proxy.value + "/health")).json()["hubs"][0]["up"]

    await eventually(down, "the proxy to see the hub down")
    assert "in a row" not in caplog.text


async def test_a_proxy_just_started_serves_its_first_request(grid: Grid) -> None:
    """Regression (hunt): a proxy said it was ready (systemd's READY=1) and took requests before its
    first health checks, while every hub counted as down: after ``systemctl restart``, clients got
    503 "No healthy hub" beside healthy hubs. It serves once the first checks are in."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    registry = await grid.registry(hubs=(HubEntry(name="h", address=hub.value),))
    for proxy in (await grid.proxy(hubs=(hub.value,)), await grid.proxy(registry.value)):
        response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())
        assert response.status_code == 200, response.text
        assert (await grid.http.get(proxy.value + "/ready")).status_code == 200


async def test_a_proxy_with_static_hubs_and_a_registry_is_ready_once_the_registry_s_hubs_are_checked(
        grid: Grid) -> None:
    """Review: the first round of checks held the static hubs only, and ended the wait: a model
    only a registry's hub served was a 404 (another hub's) for the first requests, which clients
    take for good."""
    hubs = []
    for model in ("a", "b"):
        sim_url, _ = await grid.sim(models=[model])
        hubs.append(await grid.hub())
        await grid.worker(hubs[-1].value, sim_url)
    registry = await grid.registry(hubs=(HubEntry(name="listed", address=hubs[1].value),))
    for _ in range(3):  # (the next round of checks is 2 s away: only the first can have let it in)
        proxy = await grid.proxy(registry.value, hubs=(hubs[0].value,), health={"interval_s": 2.0})
        for model in ("b", "a"):
            response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(model))
            assert response.status_code == 200, (model, response.text)
        proxy.stop()


async def _drain_while_streaming(grid: Grid, nursery: trio.Nursery, hub_url: str, model: str, sim: Any,
                                 worker: Any) -> None:
    """``worker`` draining, held up by a stream of ``model`` (from ``sim``) that the nursery keeps."""
    async def hold() -> None:
        async with grid.http.stream("POST", hub_url + "/v1/chat/completions", json=chat(model, stream=True)) as answer:
            async for _ in answer.aiter_bytes():
                pass

    nursery.start_soon(hold)

    async def generating() -> bool:
        return sim.stats.active == 1

    await eventually(generating, "the stream the drain waits for")
    nursery.start_soon(worker.drain)


async def test_behind_a_proxy_a_hub_whose_workers_drain_sends_requests_on_at_once(grid: Grid) -> None:
    """Review: a hub keeps requests for a model whose only workers drain, for their return (a
    restart); behind a proxy that had another hub for them, they waited there (up to the drain and
    the relink grace, 11 s in the review's run) instead of going on. The proxy now tells the hub
    when another hub could take a request, and the hub answers it 503 at once."""
    busy_url, busy = await grid.sim(tokens=100_000, itl_ms=5)
    other_url, other = await grid.sim()
    draining_hub = await grid.hub(limits={"queue_timeout_s": 60})
    other_hub = await grid.hub()
    draining = await grid.worker(draining_hub.value, busy_url)
    await grid.worker(other_hub.value, other_url)
    proxy = await grid.proxy(hubs=(draining_hub.value, other_hub.value), health={"interval_s": 60})
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    async with trio.open_nursery() as nursery:
        await _drain_while_streaming(grid, nursery, draining_hub.value, "sim", busy, draining.value)

        async def drains() -> bool:
            return [worker["draining"] for worker in await grid.workers(draining_hub.value)] == [True]

        await eventually(drains, "the worker to drain")
        for index in range(16):  # 16 conversations: about half go to the draining hub first
            response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(content=f"q{index}"))
            assert response.status_code == 200, response.text
        assert other.stats.completed == 16
        metrics = (await grid.http.get(draining_hub.value + "/metrics")).text
        assert 'code="503"' in metrics  # (some did go there first: the path under test)
        nursery.cancel_scope.cancel()


async def test_behind_a_proxy_a_model_of_one_hub_waits_for_its_draining_worker(grid: Grid) -> None:
    """Review: while the only worker of a model of one hub drained, no hub listed the model, so the
    proxy took every healthy hub for a candidate and told that hub another could take the request:
    it answered 503 at once, and the next hub a 404 ``model_not_found``, which clients take for good.
    Requests wait for the worker back (a restart), as without a proxy."""
    a_url, a_sim = await grid.sim(models=["a"], tokens=100_000, itl_ms=5)
    b_url, _ = await grid.sim(models=["b"])
    a_hub, b_hub = await grid.hub(), await grid.hub()
    draining = await grid.worker(a_hub.value, a_url)
    await grid.worker(b_hub.value, b_url)
    proxy = await grid.proxy(hubs=(a_hub.value, b_hub.value))
    for model in ("a", "b"):
        await grid.wait_for_model(proxy.value, model)
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:
        await _drain_while_streaming(grid, nursery, a_hub.value, "a", a_sim, draining.value)

        async def unlisted() -> bool:
            hubs = (await grid.http.get(proxy.value + "/health")).json()["hubs"]
            return not any("a" in hub["models"] for hub in hubs)

        await eventually(unlisted, "the proxy to see no hub list the model")

        async def ask(index: int) -> None:
            response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat("a", content=f"q{index}"))
            statuses.append(response.status_code)

        async with trio.open_nursery() as asking:
            for index in range(6):
                asking.start_soon(ask, index)
            async def settled() -> bool:  # each request queued at the model's hub, or answered already
                queued = (await grid.http.get(a_hub.value + "/api/registry")).json()["queued"]
                return queued + len(statuses) == 6

            await eventually(settled, "every request to wait at the model's hub, or be answered")
            back_url, _ = await grid.sim(models=["a"])
            await grid.worker(a_hub.value, back_url, name="back")  # the worker, restarted
        nursery.cancel_scope.cancel()
    assert statuses == [200] * 6, statuses


async def test_pooled_connections_a_hub_dropped_are_passed_over_however_many(grid: Grid) -> None:
    """Regression (hunt): the proxy tried a dead kept-alive connection to a hub, then at most one more;
    when that was dead too (a front end that closes connections after a few requests, or resets one
    it has read a request from), the client got 503 "No healthy hub" while the hub was up. Here each
    of two kept connections takes one request, then closes when it reads the next."""
    both = trio.Event()
    posts = 0

    async def hub(stream: trio.SocketStream) -> None:
        nonlocal posts
        conn, answered = h11.Connection(h11.SERVER), 0
        with contextlib.suppress(trio.BrokenResourceError, h11.ProtocolError):
            while (path := await next_request(conn, stream)) is not None:
                if path == b"/api/summary":
                    body = json.dumps({"hub_id": "h", "draining": False, "heartbeat_s": 1, "models": ["sim"],
                                       "loaded": [], "workers": 1, "capacity": 4, "queue": {}})
                elif path != b"/v1/chat/completions":
                    body = json.dumps({"workers": []})
                elif answered:
                    return  # the next request on this connection: closed unanswered
                else:
                    posts += 1
                    if posts == 2:
                        both.set()
                    await both.wait()  # two at once: two connections, both kept
                    answered, body = 1, json.dumps({"answer": "ok"})
                await stream.send_all(conn.send(h11.Response(status_code=200, headers=[
                    ("content-type", "application/json"), ("content-length", str(len(body)))]))
                    + conn.send(h11.Data(data=body.encode())) + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()

    listeners = await grid.nursery.start(partial(trio.serve_tcp, hub, 0, host="127.0.0.1"))
    proxy = await grid.proxy(hubs=(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}",))
    await grid.wait_for_model(proxy.value, "sim")
    async with trio.open_nursery() as nursery:
        for _ in range(2):
            nursery.start_soon(partial(grid.http.post, proxy.value + "/v1/chat/completions", json=chat()))
    third = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())
    assert third.status_code == 200 and third.json() == {"answer": "ok"}, third.text


async def test_a_hub_that_breaks_mid_upload_passes_the_request_to_another(grid: Grid) -> None:
    """Regression (review): once a body the proxy was sending broke off over plain TCP with no answer, the
    client got a 502 "closed the connection before it took the whole request" (a TLS hub's early refusal)
    instead of the next hub, as for any broken connection."""
    import socket
    import struct

    cuts = 0
    hub_b = await grid.hub(limits={"max_body_bytes": 8 << 20})
    sim_url, _ = await grid.sim()
    await grid.worker(hub_b.value, sim_url)

    async def breaks(stream: trio.SocketStream) -> None:  # answers its health checks; resets an upload
        nonlocal cuts
        received = b""
        while b"\r\n\r\n" not in received:
            if not (data := await stream.receive_some(65536)):
                return
            received += data
        if received.startswith(b"GET /api/summary"):
            body = json.dumps({"hub_id": "a", "draining": False, "heartbeat_s": 1, "models": ["sim"], "loaded": [],
                               "workers": 0, "capacity": 4, "queue": {}}).encode()
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
                                  b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await stream.aclose()
            return
        while len(received) < 256 << 10:  # a part of the body, then the connection reset
            received += await stream.receive_some(65536)
        cuts += 1
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    listeners = await grid.nursery.start(partial(trio.serve_tcp, breaks, 0, host="127.0.0.1"))
    proxy = await grid.proxy(hubs=(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", hub_b.value),
                             health={"interval_s": 60.0})
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    for index in range(20):  # until one went to the hub that breaks first (each does by a half chance)
        if cuts:
            break
        answer = await grid.http.post(proxy.value + "/v1/chat/completions",
                                      json=chat(content=f"{index} " + "x" * (3 << 20)))
        assert answer.status_code == 200, answer.text
    assert cuts == 1


async def _draining_hub(grid: Grid) -> str:
    """A hub that lists sim, and answers every request with a draining hub's 503 (unmarked)."""
    async def draining(conn: Connection, request: Request) -> None:
        if request.path == "/api/summary":
            await conn.respond_json(200, {"hub_id": "d", "draining": False, "heartbeat_s": 1, "models": ["sim"],
                                          "loaded": [], "workers": 1, "capacity": 4, "queue": {}})
        else:
            await conn.respond_json(503, {"error": {"message": "This hub is shutting down; try another"}})

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=draining), 0,
                                                 host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_a_request_a_hub_sent_on_because_another_could_take_it_waits_there_when_none_does(grid: Grid) -> None:
    """Regression (chaos soak): a hub told that another hub could take a request (``X-GhubAi-Elsewhere``)
    refuses it at once when its workers of the model are gone for a moment (a restart); the other hub,
    draining in the same restart, refused too, and the client got a 503 that the first hub, asked
    plainly, would have spared it by queueing the request until its worker linked again. Now the
    proxy goes back to that hub without the header."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    worker = await grid.worker(hub.value, sim_url, name="w")
    other = await _draining_hub(grid)
    proxy = await grid.proxy(hubs=(hub.value, other), health={"interval_s": 60.0})  # its view stays as it was
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    worker.stop()  # a restart: its link gone, back in a moment
    await workers_linked(grid, hub.value, 0)
    statuses: list[int] = []

    async def ask(i: int) -> None:  # (each its own conversation: some go to each hub first)
        response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(content=f"question {i}"))
        statuses.append(response.status_code)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(ask, i)

        async def all_queued() -> bool:
            return (await grid.http.get(hub.value + "/api/summary")).json()["queued"] == 8

        await eventually(all_queued, "every request queued at the hub whose worker is coming back")
        await grid.worker(hub.value, sim_url, name="w")
    assert statuses == [200] * 8, statuses


async def test_a_hub_that_kept_a_request_its_full_queue_time_is_not_asked_again(grid: Grid) -> None:
    """Review: the proxy took any 503 to a request sent with ``X-GhubAi-Elsewhere`` for a hub that
    refused only because of the header, and sent the request back to a hub whose workers were merely
    busy: a second full queue_timeout_s for the same 503. Only a hub's marked refusal
    (``dialects.SENT_ON``) sends a request back."""
    sim_url, _ = await grid.sim(ttft_ms=60_000)
    hub = await grid.hub(limits={"queue_timeout_s": 0.5})
    await grid.worker(hub.value, sim_url, max_concurrency=1)
    other = await _draining_hub(grid)
    proxy = await grid.proxy(hubs=(hub.value, other), health={"interval_s": 60.0})
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    statuses: list[int] = []

    async def ask(i: int) -> None:  # (each its own conversation: some go to each hub first)
        response = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(content=f"question {i}"))
        statuses.append(response.status_code)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(grid.http.post, hub.value + "/v1/chat/completions", json=chat()))  # its only slot

        async def held() -> bool:
            return (await grid.http.get(hub.value + "/api/summary")).json()["queued"] == 0 and \
                (await grid.workers(hub.value))[0]["inflight"] == 1

        await eventually(held, "the hub's only slot taken")
        async with trio.open_nursery() as asking:
            for i in range(6):
                asking.start_soon(ask, i)
        nursery.cancel_scope.cancel()
    assert statuses == [503] * 6, statuses
    metrics = (await grid.http.get(hub.value + "/metrics")).text
    refused = [line for line in metrics.splitlines()
               if line.startswith("ghubai_requests_total{") and 'code="503"' in line]
    assert len(refused) == 1 and refused[0].endswith(" 6.0"), refused  # each asked once


async def test_a_model_a_hub_served_moments_ago_keeps_its_metrics_label() -> None:
    """Regression (hunt): requests for a model whose only worker had crashed, which its hub queued
    for the worker's return, were counted by the proxy as model "other" (no hub listed it then)."""
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([("a", "http://127.0.0.1:1")])
    [hub] = hubs.hubs.values()
    for models in (["sim"], []):
        hubs.set_health(hub, True, state={"queue": {}, "heartbeat_s": 1.0, "capacity": 4, "models": models,
                                          "loaded": []})
    assert not hubs.serves("sim") and hubs.labels("sim") and not hubs.labels("made-up")


def test_a_404_names_the_missing_v1_only_where_it_would_be_found() -> None:
    from ghubai.dialects import unknown_endpoint

    assert unknown_endpoint("POST", "/chat/completions").endswith(
        "(did you mean /v1/chat/completions? an OpenAI client's base_url ends in /v1)")
    assert unknown_endpoint("GET", "/models").endswith("(did you mean /v1/models? an OpenAI client's base_url "
                                                       "ends in /v1)")
    assert unknown_endpoint("GET", "/nothing") == "Unknown endpoint: GET /nothing"


async def test_a_hub_that_stops_serving_settles_for_a_while_and_its_flapping_makes_no_spin(
        autojump_clock: Any) -> None:
    """A hub that stopped serving (down, or back with no models: a restart) is checked often for
    ``SETTLING_S``, from when it stopped; a review: one that flapped between down and up-with-no-models
    woke the checks at each change, back to back, and restarted the window for ever."""
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([("a", "http://127.0.0.1:1")])
    [hub] = hubs.hubs.values()

    def check(up: bool, *models: str) -> None:
        hubs.set_health(hub, up, state={"queue": {}, "heartbeat_s": 1.0, "capacity": 4, "models": list(models),
                                        "loaded": []} if up else None)

    check(True)  # up with no models at first: never served, nothing to settle
    assert not hubs.settling(hub)
    check(True, "m")
    hubs.check_now = trio.Event()
    check(False)  # it stopped serving
    assert hubs.settling(hub) and hubs.check_now.is_set()
    hubs.check_now = trio.Event()
    for _ in range(10):  # flapping: no wake, and the window stays where it began
        check(True)
        check(False)
        await trio.sleep(SETTLING_S / 20)
    assert hubs.settling(hub)
    await trio.sleep(SETTLING_S / 2)
    assert not hubs.check_now.is_set() and not hubs.settling(hub)
