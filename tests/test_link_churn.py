"""The hub↔worker link as networks treat it: slow, cut and laggy, through a TCP relay between the
worker and its hub (real hub, worker and simulator on 127.0.0.1)."""

from __future__ import annotations

import gc
import logging
from functools import partial
from typing import Any

import pytest
import trio
import trio_websocket

from conftest import WAIT_S, Grid, _scoped, chat, eventually, workers_linked
from ghubai import protocol
from ghubai.config import EngineConfig, WorkerConfig
from ghubai.http11.server import Connection, Request, serve_connection
from ghubai.worker.agent import BACKOFF_FIRST_S, BACKOFF_MAX_S, backoffs
from ghubai.worker import agent
from ghubai.worker.agent import QUEUED_BYTES, Worker
from ghubai.worker.agent import run as run_worker
from relay import Relay


async def _through(grid: Grid, hub_url: str, **relay: Any) -> tuple[Relay, str]:
    """A relay before the hub, and the URL a worker dials to reach the hub through it."""
    relayed = Relay(int(hub_url.rsplit(":", 1)[1]), **relay)
    return relayed, f"http://127.0.0.1:{await grid.nursery.start(relayed.serve)}"


def test_a_restarting_hub_is_dialled_every_second_and_a_lost_one_every_ten_at_most() -> None:
    """Regression (hunt): the backoff doubled to 30 s whatever the hub said, so a hub back from its
    restart had no worker for up to 17 s; while it restarts (it closed the link with 1001) the waits
    stay at 0.5-1 s, even when an outage before made the backoff 10 s."""
    backoff, waits = BACKOFF_FIRST_S, []
    for _ in range(10):
        now, backoff = backoffs(backoff, restarting=False)
        waits.append(now)
    assert waits[:3] == [0.5, 1.0, 2.0] and waits[-1] == BACKOFF_MAX_S == 10.0
    now, backoff = backoffs(backoff, restarting=True)  # the hub said it restarts
    assert (now, backoff) == (1.0, 1.0)


async def welcomed(request: trio_websocket.WebSocketRequest, hub_id: str, heartbeat_s: float,
                   ) -> trio_websocket.WebSocketConnection:
    """A fake hub's start of a link: the worker's hello read, a welcome sent."""
    ws = await request.accept()
    await ws.get_message()  # the hello
    await ws.send_message(protocol.encode(protocol.Welcome(hub_id, heartbeat_s)))
    return ws


def chat_request(request_id: str = "") -> str:
    """A fake hub's request frame: a streamed chat for ``sim``."""
    return protocol.encode(protocol.Request(request_id or protocol.new_request_id(), "ollama.chat", {
        "model": "sim", "messages": [{"role": "user", "content": "x"}], "stream": True}, True))


async def test_a_hub_address_without_a_path_is_its_link(grid: Grid) -> None:
    """Regression: ``hub_url = "ws://hub:7197"``, as an operator writes an address, was refused with a
    404 at / at every dial, for ever; it means the hub's /gridhub."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub()
    config = WorkerConfig(hub_url=(hub.value.replace("http://", "ws://"),), name="bare",
                          engine=EngineConfig(url=sim_url))
    running = await grid.nursery.start(_scoped, run_worker, config)
    with trio.fail_after(WAIT_S):
        await running.value.welcomed.wait()
    await workers_linked(grid, hub.value, 1)


@pytest.mark.parametrize("words", [750_000, 1_500_000])
async def test_a_large_request_on_a_slow_link_ends_no_link(grid: Grid, words: int) -> None:
    """Regression (hunt): a request frame that took longer than three heartbeats to reach the worker
    (1.5 MB at 400 kB/s here; 4 MiB under 2.2 Mbit/s at the default 5 s) made the worker take its
    hub for silent: it dropped the link and every stream on it, and the request, retried, took down
    each worker's link in turn. Bytes arriving now count as a hub that speaks. (A review: at 3 MB,
    7.5 s, the first watch for pongs took both ends for deaf: the pings waited behind it.)"""
    hub = await grid.hub(heartbeat_s=0.3, scheduler={"policy": "least-loaded"})
    sims = []
    for name in ("a", "b"):
        _, url = await _through(grid, hub.value, rate=400_000)
        sim_url, sim = await grid.sim(itl_ms=20, tokens=words // 2500)
        sims.append(sim)
        await grid.worker(url, sim_url, name=name, max_concurrency=2)
    endings: list[str] = []
    big: list[Any] = []

    async def stream() -> None:
        last = ""
        async with grid.http.stream("POST", hub.value + "/v1/chat/completions", json=chat(stream=True)) as answer:
            async for line in answer.aiter_lines():
                last = line[6:] if line.startswith("data: ") else last
        endings.append(last)

    async def large() -> None:
        big.append(await grid.http.post(hub.value + "/v1/chat/completions", json=chat(content="x " * words),
                                        timeout=words / 25_000))

    with trio.fail_after(words / 25_000):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream)
            nursery.start_soon(stream)  # least-loaded: one on each worker

            async def both_run() -> bool:
                return [sim.stats.active for sim in sims] == [1, 1]

            await eventually(both_run, "a stream on each worker")
            nursery.start_soon(large)
    assert endings == ["[DONE]", "[DONE]"] and big[0].status_code == 200, (endings, big[0].text)


async def test_a_queue_waits_through_its_worker_s_link_blip(grid: Grid) -> None:
    """Regression (hunt): a worker whose link broke and came back within half a second: its running
    request got a 502 (the retry could not go to the same worker), and the one queued for it a 404
    model_not_found, since another worker (of another model) was still linked."""
    hub = await grid.hub()
    relay, url = await _through(grid, hub.value)
    sim_url, sim = await grid.sim(itl_ms=2, tokens=1000)  # a 2 s answer
    await grid.worker(url, sim_url, max_concurrency=1, name="a")
    await grid.worker(hub.value, (await grid.sim(models=["other"]))[0], name="b")
    await workers_linked(grid, hub.value, 2)
    results: list[Any] = []

    async def ask() -> None:
        results.append(await grid.http.post(hub.value + "/v1/chat/completions", json=chat(), timeout=30))

    async def running() -> bool:
        return sim.stats.active == 1

    async def queued() -> bool:
        return (await grid.http.get(hub.value + "/api/registry")).json()["queued"] == 1

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)  # takes the only slot
            await eventually(running, "the first request to run")
            nursery.start_soon(ask)  # waits in the hub's queue
            await eventually(queued, "the second request to queue")
            await relay.cut()  # the worker links again within half a second, as the same worker
    assert [answer.status_code for answer in results] == [200, 200], [answer.text for answer in results]


async def test_what_the_engine_offers_while_the_hello_awaits_its_welcome_reaches_the_hub(grid: Grid) -> None:
    """Regression (hunt): a change of the engine's models between the worker's hello and the hub's
    welcome (the engine starting with the worker, a pull ending, a slow hub) never reached that hub:
    it kept the hello's list, and clients got 404 for a model the worker served."""
    serving: list[str] = []

    async def engine(conn: Connection, request: Request) -> None:
        if request.path == "/api/tags":
            await conn.respond_json(200, {"models": [{"name": name} for name in serving]})
        else:
            await conn.respond_json(404, {"error": "model 'x' not found"})

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=engine), 0,
                                                 host="127.0.0.1"))
    hub = await grid.hub()
    relay, url = await _through(grid, hub.value, delay=1.5)  # the hub's words reach the worker late
    await grid.worker(url, f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}", wait=False)
    with trio.fail_after(WAIT_S):
        await relay.hello.wait()
    serving.append("sim")  # the worker finds it within 0.2 s, while its welcome is 1.5 s away

    async def hub_sees_the_model() -> bool:
        workers = (await grid.http.get(hub.value + "/api/registry")).json()["workers"]
        return bool(workers) and "sim" in workers[0]["models"]

    await eventually(hub_sees_the_model, "the hub to learn the worker's new model")


async def test_a_request_that_breaks_the_link_each_time_is_sent_back_once(grid: Grid) -> None:
    """Review: a request whose link broke may go back to the same worker once it links again (the
    link failed, not its engine), but only once: a request that breaks the link each time (a poison)
    took it down max_attempts times, and every stream on it each time."""
    hub = await grid.hub()
    relay, url = await _through(grid, hub.value, cut_on=b"POISON")
    sim_url, _ = await grid.sim()
    await grid.worker(url, sim_url, name="a")
    with trio.fail_after(WAIT_S):
        poisoned = await grid.http.post(hub.value + "/v1/chat/completions", json=chat(content="POISON"))
    assert poisoned.status_code == 502 and "lost the link" in poisoned.text and relay.cuts == 2

    async def fine() -> bool:
        return (await grid.http.post(hub.value + "/v1/chat/completions", json=chat())).status_code == 200

    await eventually(fine, "the worker to link again and serve")


async def test_a_hub_that_welcomes_and_drops_every_link_is_dialled_ever_less_often(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): the backoff began afresh at every welcome, so a hub that welcomed and then
    dropped each link (a crash loop, an overloaded proxy in front) was dialled twice a second for
    ever, three log lines each time. Only a link that lasted starts it afresh."""
    sim_url, _ = await grid.sim()

    async def flapping_hub(request: trio_websocket.WebSocketRequest) -> None:
        ws = await welcomed(request, "flap", 5.0)
        await ws.aclose(1011, "overloaded")

    server = await grid.nursery.start(partial(trio_websocket.serve_websocket, flapping_hub, "127.0.0.1", 0,
                                              ssl_context=None))
    caplog.set_level(logging.INFO, logger="ghubai.worker")
    await grid.worker(f"http://127.0.0.1:{server.port}", sim_url, wait=True)

    def delays() -> list[float]:
        return [float(record.getMessage().rsplit(" in ", 1)[1].removesuffix(" s")) for record in caplog.records
                if record.getMessage().startswith("reconnecting to ")]

    async def three() -> bool:
        return len(delays()) >= 3

    await eventually(three, "three redials")
    assert delays()[2] >= 1.0, delays()  # 0.25-0.5 s, then 0.5-1 s, then 1-2 s: not 0.25-0.5 s each time


async def test_a_hub_that_grants_credit_but_never_reads_holds_the_worker_to_a_bound(grid: Grid) -> None:
    """Regression (hunt): a hub that stopped reading its link but went on granting credit (and
    pinging) had the worker queue the engine's answer for it, 3 MB a second without bound, pongs by
    the thousand with it. Now the answer waits once the link's writer is ``QUEUED_BYTES`` behind: the
    engine's generation stalls, and the worker holds that much."""
    sim_url, _ = await grid.sim(tokens=10_000_000, itl_ms=0)
    request_id = protocol.new_request_id()

    async def deaf_hub(request: trio_websocket.WebSocketRequest) -> None:
        ws = await welcomed(request, "deaf", 5.0)
        await ws.send_message(chat_request(request_id))
        while True:  # never reads again
            await ws.send_message(protocol.encode(protocol.Ping(0)) + "\n" +
                                  protocol.encode(protocol.Credit(request_id, 1 << 30)))
            await trio.sleep(0.01)

    server = await grid.nursery.start(partial(trio_websocket.serve_websocket, deaf_hub, "127.0.0.1", 0,
                                              ssl_context=None))
    running = await grid.worker(f"http://127.0.0.1:{server.port}", sim_url, wait=True)
    worker: Worker = running.value
    tokens = -1

    async def stalled() -> bool:  # the engine's generation stopped: its answer waits for the link
        nonlocal tokens
        now, tokens = tokens, (await grid.stats(sim_url))["tokens"]
        return now == tokens > 0

    await eventually(stalled, "the engine's generation to stall")
    [link] = worker.links
    assert link.queued <= QUEUED_BYTES + protocol.MAX_CHUNK_BYTES + 65536, link.queued


async def test_a_hub_that_pings_but_reads_nothing_is_dropped_and_frees_the_engine_for_other_hubs(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): a hub that sent pings but read nothing held the worker's engine slots its
    requests took for good (its pings kept it from silence), and the worker's other hub answered 503.
    It answers no ping: the worker drops its link (its requests cancelled) within DEAF_MIN_S."""
    caplog.set_level(logging.WARNING, "ghubai.worker")
    sim_url, _ = await grid.sim(tokens=10_000_000, itl_ms=0)
    real = await grid.hub(heartbeat_s=0.3, limits={"queue_timeout_s": 30.0})

    async def deaf_hub(request: trio_websocket.WebSocketRequest) -> None:
        ws = await welcomed(request, "deaf", 0.3)
        for _ in range(2):  # the worker's two slots
            await ws.send_message(chat_request())
        while True:  # never reads again
            await ws.send_message(protocol.encode(protocol.Ping(0)))
            await trio.sleep(0.1)

    server = await grid.nursery.start(partial(trio_websocket.serve_websocket, deaf_hub, "127.0.0.1", 0,
                                              ssl_context=None))
    running = await grid.worker([real.value, f"http://127.0.0.1:{server.port}"], sim_url, max_concurrency=2)
    worker: Worker = running.value

    async def full() -> bool:
        return worker.inflight == 2

    await eventually(full, "the deaf hub's requests to hold both slots")
    with trio.fail_after(WAIT_S + 10):
        answer = await grid.http.post(real.value + "/v1/chat/completions", json=chat(max_tokens=3), timeout=40)
    assert answer.status_code == 200, answer.text
    assert "answered no ping" in caplog.text and "dropping the link" in caplog.text


async def test_the_hub_logs_how_a_worker_left(grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression: the hub logged "worker left" alike for a worker that stopped, one that closed its
    link, and one whose network failed; an operator reading the log could not tell them apart."""
    caplog.set_level(logging.INFO, "ghubai.hub")
    hub = await grid.hub()
    port = int(hub.value.rsplit(":", 1)[1])

    async def worker(name: str, how: str) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with trio.open_nursery() as nursery:
            front = [("X-Forwarded-For", "10.0.0.7")] if how == "say" else []  # (as nginx would add)
            ws = await trio_websocket.wrap_client_stream(nursery, stream, f"127.0.0.1:{port}", "/gridhub",
                                                         extra_headers=front)
            await ws.send_message(protocol.encode(protocol.Hello(protocol.PROTOCOL, name * 32, name, ("sim",), 2,
                                                                 "ollama", "0.0")))
            await ws.get_message()  # the welcome
            if how == "drain":
                await ws.send_message(protocol.encode(protocol.Draining()))
            if how == "break":
                await trio.aclose_forcefully(stream)
            else:
                await ws.aclose(*((1001, "upgrading") if how == "say" else ()))
            nursery.cancel_scope.cancel()

    for name, how, said in (("a", "close", "it closed its link"), ("b", "drain", "it closed its link, after draining"),
                            ("c", "break", "its connection broke without a close"),
                            ("d", "say", "it closed its link (1001: upgrading)")):
        with trio.fail_after(WAIT_S):
            await worker(name, how)
        line = f"worker {name} ({name * 8}) left: {said}"
        forwarded = ", forwarded for 10.0.0.7" if how == "say" else ""  # (a hunt: nginx's address for every worker)
        assert f"worker {name} ({name * 8}, GhubAi 0.0) joined from 127.0.0.1{forwarded}: sim" in caplog.text

        async def logged() -> bool:
            return line in caplog.text
        await eventually(logged, line)


def test_a_link_s_ending_says_who_closed_it_and_why() -> None:
    """Review: a link hypercorn closed itself (a message over its limit) was logged as one the worker
    closed, and the worker's own code and reason were lost."""
    from ghubai.hub.gridhub import ending
    from ghubai.web import WS_CLOSED_BY
    assert ending(None) == ""  # (the hub ended it, and said why)
    too_large = {"code": 1009, "reason": "", WS_CLOSED_BY: "server"}
    assert ending(too_large) == "it sent a message over the hub's limit (1009)"
    assert ending({"code": 1000, "reason": "", WS_CLOSED_BY: "peer"}) == "it closed its link"
    assert ending({"code": 1006}) == "its connection broke without a close"
    assert ending({"code": 1000}) == ""  # (the hub's own close, at its stop: said on the line before)


async def test_a_worker_that_pings_but_reads_nothing_is_dropped_and_its_requests_go_elsewhere(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): a worker that sent pings but read nothing kept its link; every request the
    hub sent it waited for ``first_token_s`` and got a 504, though another worker had free slots."""
    caplog.set_level(logging.WARNING, "ghubai.hub")
    sim_url, _ = await grid.sim(tokens=5)
    hub = await grid.hub(provider_tokens=("provider-secret-token-1234",), heartbeat_s=0.3,
                         timeouts={"first_token_s": 120.0}, scheduler={"policy": "least-loaded"})
    await grid.worker(hub.value, sim_url, provider_token="provider-secret-token-1234", name="good", max_concurrency=4)

    async def deaf_worker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio_websocket.open_websocket_url(
                hub.value.replace("http://", "ws://") + "/gridhub",
                extra_headers=[("Authorization", "Bearer provider-secret-token-1234")]) as ws:
            await ws.send_message(protocol.encode(protocol.Hello(protocol.PROTOCOL, "f" * 32, "deaf", ("sim",), 2,
                                                                 "ollama", "0.0")))
            await ws.get_message()  # the welcome; then never reads again
            task_status.started()
            while True:
                await ws.send_message(protocol.encode(protocol.Ping(0)))
                await trio.sleep(0.1)

    await grid.nursery.start(deaf_worker)
    await workers_linked(grid, hub.value, 2)
    answers: list[int] = []

    async def ask() -> None:
        answers.append((await grid.http.post(hub.value + "/v1/chat/completions", json=chat(), timeout=60)).status_code)

    with trio.fail_after(WAIT_S + 20):
        async with trio.open_nursery() as clients:
            for _ in range(6):
                clients.start_soon(ask)
    assert answers == [200] * 6
    assert "worker deaf answered no ping" in caplog.text


async def test_a_hub_that_floods_requests_and_reads_nothing_is_dropped_at_a_bound(
        grid: Grid, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (hunt): refusals (no slot) to a hub that flooded requests and read nothing queued
    without bound: 36 MB for 200,000 requests. Past ``UNREAD_BYTES`` (here 64 KiB) the link is dropped."""
    caplog.set_level(logging.WARNING, "ghubai.worker")
    monkeypatch.setattr(agent, "UNREAD_BYTES", 64 << 10)
    sim_url, _ = await grid.sim(tokens=10_000_000, itl_ms=0)
    flooded = trio.Event()

    async def flooding_hub(request: trio_websocket.WebSocketRequest) -> None:
        ws = await welcomed(request, "flood", 5.0)
        for _ in range(10):  # 2,000 requests for one slot; never reads
            await ws.send_message("\n".join(chat_request() for _ in range(200)))
        flooded.set()
        await trio.sleep_forever()

    server = await grid.nursery.start(partial(trio_websocket.serve_websocket, flooding_hub, "127.0.0.1", 0,
                                              ssl_context=None))
    await grid.worker(f"http://127.0.0.1:{server.port}", sim_url, max_concurrency=1)
    await flooded.wait()

    async def dropped() -> bool:
        return "reads nothing" in caplog.text

    await eventually(dropped, "the worker to drop the flooding hub's link")


async def test_a_hub_that_never_answers_the_handshake_leaves_no_socket_open(grid: Grid) -> None:
    """Regression (hunt): a dial whose WebSocket handshake timed out (a hung hub, accepting and
    saying nothing) left its socket to the garbage collector: one more open socket per retry."""
    ended: list[bool] = []
    accepted = trio.Event()

    async def mute_hub(stream: trio.SocketStream) -> None:
        index = len(ended)
        ended.append(False)
        accepted.set()
        while await stream.receive_some(4096):  # the upgrade request, never answered
            pass
        ended[index] = True

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    grid.nursery.start_soon(trio.serve_listeners, mute_hub, listeners)
    port = listeners[0].socket.getsockname()[1]
    sim_url, _ = await grid.sim()
    gc.disable()  # what the socket's garbage would do, it must not be left to
    try:
        await grid.worker(f"http://127.0.0.1:{port}", sim_url, wait=False, connect_timeout_s=0.2)
        await accepted.wait()

        async def closed() -> bool:
            return bool(ended) and ended[0]

        await eventually(closed, "the worker to close the socket of its failed handshake")
    finally:
        gc.enable()
