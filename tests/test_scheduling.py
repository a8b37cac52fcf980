"""The llm-aware scheduler end to end, with simulators that have memory: a model in memory is
preferred, a conversation keeps its worker (and its hub, through a proxy), weights reach the hub,
and every answer says who served it."""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import httpx
import trio
import trio_websocket

from conftest import WAIT_S, Grid, chat, eventually
from ghubai import protocol

SYSTEM = " ".join(f"rule{i}" for i in range(200))


def turn(history: list[dict[str, str]], content: str, model: str = "sim") -> dict[str, Any]:
    history.append({"role": "user", "content": content})
    return {"model": model, "messages": list(history)}


async def converse(grid: Grid, url: str, turns: int, opening: str = "") -> list[httpx.Response]:
    history = [{"role": "system", "content": SYSTEM + opening}]
    answers = []
    for index in range(turns):
        response = await grid.http.post(url + "/v1/chat/completions", json=turn(history, f"question {index}"))
        assert response.status_code == 200, response.text
        history.append(response.json()["choices"][0]["message"])
        answers.append(response)
    return answers


async def test_requests_go_to_the_worker_that_holds_their_model(grid: Grid) -> None:
    sims = [await grid.sim(models=("a", "b"), max_loaded=1, load_ms=50) for _ in range(2)]
    hub = await grid.hub()
    for index, (url, _) in enumerate(sims):
        await grid.worker(hub.value, url, name=f"gpu-{index}", max_concurrency=4)
    served = {}
    for model in ("a", "b"):  # each loads once, somewhere
        response = await grid.http.post(hub.value + "/v1/chat/completions",
                                         json={"model": model, "messages": [{"role": "user", "content": "x"}]})
        served[model] = response.headers["x-ghubai-worker"]

    async def reported() -> bool:
        workers = {worker["name"]: worker for worker in await grid.workers(hub.value)}
        return all(model in workers[name]["loaded"] for model, name in served.items())

    await eventually(reported, "the workers to report what their engines hold")
    for index in range(12):  # new conversations, alternating models: each to the worker holding its model
        model = "ab"[index % 2]
        response = await grid.http.post(hub.value + "/v1/chat/completions",
                                         json={"model": model, "messages": [{"role": "user", "content": f"{index}"}]})
        assert response.headers["x-ghubai-worker"] == served[model]
    assert sum(sim.stats.loads for _, sim in sims) == 2  # least-loaded would have swapped models back and forth


async def test_an_unload_reaches_every_engine_that_holds_the_model_and_no_other(grid: Grid) -> None:
    """Regression (a hunt): ``keep_alive: 0`` went to one worker as any request does, which might not
    hold the model: the client heard "unload" and every copy stayed in memory (``ollama stop``); and
    (a hunt) one for an engine busy with a long answer waited for a slot, a 503 after queue_timeout_s."""
    sims = [await grid.sim(models=("a", "b"), max_loaded=2, load_ms=10, itl_ms=20) for _ in range(3)]
    hub = await grid.hub()
    for index, (url, _) in enumerate(sims):
        await grid.worker(hub.value, url, name=f"gpu-{index}", residency_interval_s=0.2, max_concurrency=1)
    for url, _ in sims[:2]:  # "a" in the memory of two engines of three
        assert (await grid.http.post(url + "/api/generate", json={"model": "a"})).json()["done_reason"] == "load"

    async def reported() -> bool:
        return sum("a" in worker["loaded"] for worker in await grid.workers(hub.value)) == 2

    await eventually(reported, "the workers to report what their engines hold")
    long = {"model": "a", "prompt": "a long answer", "options": {"num_predict": 100}}  # (2 s: its worker is full)
    async with grid.http.stream("POST", hub.value + "/api/generate", json=long) as answer:
        busy = int(answer.headers["x-ghubai-worker"][-1])
        response = await grid.http.post(hub.value + "/api/generate", json={"model": "a", "keep_alive": 0})
        assert response.status_code == 200 and response.json()["done_reason"] == "unload"
        assert response.headers["x-ghubai-worker"] == "gpu-0, gpu-1"
        assert [sim.loaded() for _, sim in sims] == [["a"] if index == busy else [] for index in range(3)]
        await answer.aread()  # (Ollama lets a running model finish: then it goes)
    assert [sim.loaded() for _, sim in sims] == [[], [], []]

    async def dropped() -> bool:  # (the hub's own view at once; /api/registry's within its second)
        return not any("a" in worker["loaded"] for worker in await grid.workers(hub.value))

    await eventually(dropped, "the hub's list of what the engines hold to lose the model")
    for url, _ in sims[:2]:  # (a review: one holder's refusal is not the answer when another unloaded)
        await grid.http.post(url + "/api/generate", json={"model": "a"})
    await eventually(reported, "the workers to report the model loaded again")
    sims[1][1].options = dataclasses.replace(sims[1][1].options, fail_rate=1.0)
    response = await grid.http.post(hub.value + "/api/generate", json={"model": "a", "keep_alive": 0})
    assert response.status_code == 200 and response.headers["x-ghubai-worker"] == "gpu-0", response.text


async def test_a_conversation_keeps_its_worker_and_computes_only_what_is_new(grid: Grid) -> None:
    sims = [await grid.sim(prefill_us_per_token=1, max_parallel=4) for _ in range(3)]
    hub = await grid.hub()
    for index, (url, _) in enumerate(sims):
        await grid.worker(hub.value, url, name=f"gpu-{index}", max_concurrency=4)
    answers = await converse(grid, hub.value, turns=5)
    assert len({answer.headers["x-ghubai-worker"] for answer in answers}) == 1
    assert {answer.headers["x-ghubai-hub"] for answer in answers} == {(await grid.http.get(
        hub.value + "/api/summary")).json()["hub_id"]}
    computed = sum(sim.stats.prefill_tokens_computed for _, sim in sims)
    prompt = len(SYSTEM.split())
    assert computed < prompt + 5 * 40  # the opening once, then each turn's new words only


async def test_a_conversation_keeps_its_hub_through_the_proxy(grid: Grid) -> None:
    hubs = []
    for index in range(2):
        url, _ = await grid.sim()
        hubs.append(await grid.hub())
        await grid.worker(hubs[-1].value, url, name=f"gpu-{index}")
    proxy = await grid.proxy(hubs=tuple(hub.value for hub in hubs))
    await grid.wait_for_model(proxy.value, "sim", hubs_up=2)
    seen: dict[str, set[str]] = {}
    for conversation in range(6):
        answers = await converse(grid, proxy.value, turns=3, opening=f" conversation {conversation}")
        seen[str(conversation)] = {answer.headers["x-ghubai-hub"] for answer in answers}
    assert all(len(hubs_seen) == 1 for hubs_seen in seen.values())  # each conversation on one hub


async def test_a_workers_weight_reaches_the_hub(grid: Grid) -> None:
    url, _ = await grid.sim()
    hub = await grid.hub()
    await grid.worker(hub.value, url, name="big", weight=3.0)
    [worker] = await grid.workers(hub.value)
    assert worker["weight"] == 3.0


async def test_a_refusal_then_a_load_report_in_one_message_leaves_the_worker_free(grid: Grid) -> None:
    """Review: a worker shared with another hub refuses a request (no free slot), and in the same
    message reports its load back to 0 (the other hub's request just ended). The refusal was noted
    after the report and undid it: the free worker got the retry only at its next heartbeat (30 s
    by default), or the client a 503. The retry must be the next frame it sees, before any ping."""
    hub = await grid.hub(heartbeat_s=30.0)
    seen: list[str] = []

    async def worker(*, task_status: trio.TaskStatus[None]) -> None:
        async with trio_websocket.open_websocket_url(hub.value.replace("http", "ws") + "/gridhub") as ws:
            await ws.send_message(protocol.encode(protocol.Hello(protocol.PROTOCOL, "w1", "shared", ("sim",), 1,
                                                                 "ollama", "test")))
            await ws.get_message()  # welcome
            task_status.started()
            while True:
                frames, _ = protocol.unpack(await ws.get_message())
                for frame in frames:
                    seen.append(type(frame).__name__)
                    if isinstance(frame, protocol.Request) and seen.count("Request") == 1:
                        await ws.send_message(protocol.encode(protocol.Error(frame.id, 503, "no free slot", True, busy=True))
                                              + "\n" + protocol.encode(protocol.Load(0)))
                    elif isinstance(frame, protocol.Request):
                        await ws.send_message(protocol.chunk(frame.id, b'{"answer": "x"}'))
                        await ws.send_message(protocol.encode(protocol.End(frame.id, None)))

    await grid.nursery.start(worker)
    with trio.fail_after(WAIT_S):
        response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
    assert response.status_code == 200 and seen[:2] == ["Request", "Request"], (seen, response.text)


async def _fake_worker(url: str, worker_id: str, models: tuple[str, ...] = ("sim",), *, answer: bool = True,
                       read: bool = True, draining: bool = False,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A worker on a raw link: it answers each request with one chunk, or reads nothing after its
    welcome (a half-open link), or says at once that it drains."""
    async with trio_websocket.open_websocket_url(url.replace("http", "ws") + "/gridhub", message_queue_size=1,
                                                 max_message_size=protocol.MAX_MESSAGE_BYTES) as ws:
        await ws.send_message(protocol.encode(protocol.Hello(protocol.PROTOCOL, worker_id, worker_id, models, 16,
                                                             "ollama", "test")))
        await ws.get_message()  # welcome
        if draining:
            await ws.send_message(protocol.encode(protocol.Draining()))
        task_status.started()
        if not read:
            await trio.sleep_forever()
        while True:
            frames, _ = protocol.unpack(await ws.get_message())
            for frame in frames:
                if isinstance(frame, protocol.Request) and answer:
                    await ws.send_message(protocol.chunk(frame.id, b'{"answer": "x"}'))
                    await ws.send_message(protocol.encode(protocol.End(frame.id, None)))


async def test_the_requests_of_a_link_replaced_by_its_worker_go_elsewhere_at_once(grid: Grid) -> None:
    """Regression (hunt): a worker linked again while the hub's writer sat in a write to its old,
    half-open link (bodies filled the socket); the old link's requests failed over only when that
    write timed out, after ``idle_s`` (120 s by default; 300 here)."""
    hub = await grid.hub(heartbeat_s=30.0, timeouts={"idle_s": 300.0}, scheduler={"policy": "least-loaded"})
    old = trio.CancelScope()

    async def old_link(*, task_status: trio.TaskStatus[None]) -> None:
        with old:
            await _fake_worker(hub.value, "w1", read=False, task_status=task_status)

    await grid.nursery.start(old_link)
    statuses: list[int] = []

    async def client(index: int) -> None:
        response = await grid.http.post(hub.value + "/v1/chat/completions", timeout=300,
                                        json=chat(content="x" * (3 << 20) + str(index)))
        statuses.append(response.status_code)

    for index in range(8):  # 24 MiB of requests to a link that reads nothing
        grid.nursery.start_soon(client, index)

    async def all_sent() -> bool:
        return (await grid.workers(hub.value))[0]["inflight"] == 8

    await eventually(all_sent, "8 requests on the link")
    await grid.nursery.start(_fake_worker, hub.value, "w2")  # another worker, for the retries
    await grid.nursery.start(_fake_worker, hub.value, "w1")  # the same worker, linked again
    with trio.fail_after(WAIT_S):
        while len(statuses) < 8:
            await trio.sleep(0.05)
    old.cancel()
    assert statuses == [200] * 8


async def test_a_short_name_while_its_workers_drain_is_a_503_as_the_full_name(grid: Grid) -> None:
    """Regression (hunt): ``llama3.2`` means ``llama3.2:latest`` only by the workers that take
    requests, so while the one that serves it drained, the short name was a 404 model_not_found (a
    client gives up) where the full name was a 503 to retry. (Both wait for the worker, which may be
    restarting, for their queue time.)"""
    hub = await grid.hub(limits={"queue_timeout_s": 0.3})
    await grid.nursery.start(partial(_fake_worker, hub.value, "w1", ("llama3.2:latest",), draining=True))

    async def draining() -> bool:
        return [worker["draining"] for worker in await grid.workers(hub.value)] == [True]

    await eventually(draining, "the worker to drain")
    for name in ("llama3.2:latest", "llama3.2"):
        response = await grid.http.post(hub.value + "/v1/chat/completions", json=chat(name))
        assert response.status_code == 503 and "retry-after" in response.headers, (name, response.text)
