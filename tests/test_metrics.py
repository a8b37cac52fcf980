"""/metrics of hub, proxy and registry: Prometheus text the official parser reads, with the names
operators query, and values that move when requests run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from conftest import Grid, chat, eventually, stalled_client, workers_linked
from ghubai import protocol


async def scrape(grid: Grid, url: str) -> dict[str, float]:
    text = (await grid.http.get(url + "/metrics")).text
    return {sample.name + str(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    return samples.get(name + str(sorted(labels.items())), 0.0)


async def test_hub_proxy_and_registry_metrics_move_with_requests(grid: Grid, tmp_path: Path) -> None:
    sim_url, _ = await grid.sim(tokens=5)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, name="gpu-1")
    registry_file = tmp_path / "registry.toml"
    registry_file.write_text(f'[[hubs]]\nname = "one"\naddress = "{hub.value}"\n')
    registry = await grid.registry(str(registry_file))
    proxy = await grid.proxy(registry.value)
    await grid.wait_for_model(proxy.value, "sim")
    before = await scrape(grid, hub.value)
    assert "ghubai_queue_depth[('model', 'sim')]" in before  # (hunt: 0 before any queue, not no series)
    for series in ("ghubai_inflight_requests", "ghubai_request_duration_seconds_count",
                   "ghubai_time_to_first_token_seconds_count"):  # (and a hunt: none until a first request)
        assert f"{series}[('role', 'hub')]" in before, series
    for _ in range(3):
        assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())).status_code == 200
    # streams have a time to first token; a whole answer's first byte is its end, and counts in none
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(stream=True))).status_code == 200
    ollama = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}  # NDJSON, streamed by default
    assert (await grid.http.post(proxy.value + "/api/chat", json=ollama)).status_code == 200
    assert (await grid.http.post(hub.value + "/v1/chat/completions", json=chat("nope"))).status_code == 404
    bad = {"model": "sim", "messages": "x"}  # an error's head through the proxy brings no token (review)
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=bad)).status_code == 400

    after = await scrape(grid, hub.value)
    assert value(after, "ghubai_requests_total", role="hub", model="sim", code="200") - \
        value(before, "ghubai_requests_total", role="hub", model="sim", code="200") == 5
    assert value(after, "ghubai_requests_total", role="hub", model="other", code="404") == 1  # no worker serves it
    # (a hunt: the hub counted a 400 under model "", the proxy under its model)
    assert value(after, "ghubai_requests_total", role="hub", model="sim", code="400") == 1
    assert value(after, "ghubai_tokens_total", model="sim", type="completion") == 25
    assert value(after, "ghubai_time_to_first_token_seconds_count", role="hub") == 2
    assert value(after, "ghubai_request_duration_seconds_count", role="hub") == 7
    assert value(after, "ghubai_workers") == 1 and value(after, "ghubai_worker_inflight", worker="gpu-1") == 0
    assert value(after, "ghubai_inflight_requests", role="hub") == 0

    proxied = await scrape(grid, proxy.value)
    assert value(proxied, "ghubai_requests_total", role="proxy", model="sim", code="200") == 5
    assert value(proxied, "ghubai_time_to_first_token_seconds_count", role="proxy") == 2  # (hunt: was never filled)
    assert value(proxied, "ghubai_requests_total", role="proxy", model="sim", code="400") == 1
    assert value(proxied, "ghubai_proxy_hub_up", hub="one") == 1

    listed = await scrape(grid, registry.value)
    assert value(listed, "ghubai_registry_hubs") == 1 and value(listed, "ghubai_registry_reload_errors_total") == 0


async def test_gauges_follow_requests_in_flight_and_waiting(grid: Grid, tmp_path: Path) -> None:
    """One request running on a worker of capacity 1, one waiting behind it: the gauges say so, then
    fall back; a broken registry edit counts as a reload error and the list stays."""
    sim_url, _ = await grid.sim(itl_ms=50, tokens=40)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, name="gpu-1", max_concurrency=1)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")

    async def one() -> None:
        assert (await grid.http.post(proxy.value + "/v1/chat/completions", json=chat())).status_code == 200

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one)
        nursery.start_soon(one)

        async def busy() -> bool:
            hub_now, proxy_now = await scrape(grid, hub.value), await scrape(grid, proxy.value)
            return (value(hub_now, "ghubai_inflight_requests", role="hub"), value(hub_now, "ghubai_queue_depth",
                    model="sim"), value(hub_now, "ghubai_worker_inflight", worker="gpu-1"),
                    value(proxy_now, "ghubai_inflight_requests", role="proxy")) == (2, 1, 1, 2)

        await eventually(busy, "two requests in flight, one of them queued")
    idle = await scrape(grid, hub.value)
    assert (value(idle, "ghubai_inflight_requests", role="hub"), value(idle, "ghubai_queue_depth", model="sim"),
            value(idle, "ghubai_worker_inflight", worker="gpu-1")) == (0, 0, 0)
    assert value(idle, "ghubai_tokens_total", model="sim", type="completion") == 80
    assert "ghubai_queue_depth[('model', 'sim')]" in idle  # (hunt: 0, not no series, once none waits)

    registry_file = tmp_path / "registry.toml"
    registry_file.write_text(f'[[hubs]]\nname = "one"\naddress = "{hub.value}"\n')
    registry = await grid.registry(str(registry_file))
    registry_file.write_text("[[hubs]]\nname = 42\n")

    async def refused() -> bool:
        return value(await scrape(grid, registry.value), "ghubai_registry_reload_errors_total") == 1

    await eventually(refused, "the broken edit to be counted")
    assert value(await scrape(grid, registry.value), "ghubai_registry_hubs") == 1


async def test_every_request_is_counted_and_logged_with_the_status_its_client_got(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression: 400, 401 and 429 answers got no metric and no log line, and a non-streaming
    request whose worker link dropped after the first chunk was answered 502 but counted as 200."""
    hub = await grid.hub(api_keys=("k",), limits={"requests_per_minute": 1})
    key = {"Authorization": "Bearer k"}
    hub_ws = hub.value.replace("http", "ws") + protocol.GRIDHUB_PATH

    async def worker_that_dies_after_one_chunk() -> None:
        async with trio_websocket.open_websocket_url(hub_ws) as ws:
            await ws.send_message(protocol.encode(protocol.Hello(protocol.PROTOCOL, "w-dies", "dies", ("sim",), 2,
                                                                 "ollama", "test")))
            await ws.get_message()  # welcome
            while True:
                frames, _ = protocol.unpack(await ws.get_message())
                if requests := [frame for frame in frames if isinstance(frame, protocol.Request)]:
                    await ws.send_message(protocol.chunk(requests[0].id, b'{"partial": '))
                    return  # the link closes with the answer half sent

    grid.nursery.start_soon(worker_that_dies_after_one_chunk)
    await eventually(lambda: _has_workers(grid, hub.value, 1), "the dying worker to join")
    caplog.set_level(logging.INFO, logger="ghubai.hub")
    statuses = [(await grid.http.post(hub.value + "/v1/chat/completions", json=chat(), headers=key)).status_code,
                (await grid.http.post(hub.value + "/v1/chat/completions", json=chat())).status_code,
                (await grid.http.post(hub.value + "/v1/chat/completions", json={"model": 1}, headers=key)
                 ).status_code,
                (await grid.http.post(hub.value + "/v1/chat/completions", json=chat(), headers=key)).status_code]
    assert statuses == [502, 401, 400, 429]

    def logged() -> list[str]:
        return [record.getMessage() for record in caplog.records if "POST /v1/chat/completions" in record.getMessage()]

    async def all_finished() -> bool:  # a record is finished just after its answer went out
        return len(logged()) == 4

    await eventually(all_finished, "a log line for each of the 4 requests")
    samples = await scrape(grid, hub.value)
    # the 502's model is its label though its worker died since (a hunt: a rolling restart's last answers
    # counted as "other"), and so is the 429's: the hub waits for a worker of "sim" to link again (a hunt)
    for code, model in (("502", "sim"), ("401", ""), ("400", ""), ("429", "sim")):
        assert value(samples, "ghubai_requests_total", role="hub", model=model, code=code) == 1, code
    assert value(samples, "ghubai_requests_total", role="hub", model="sim", code="200") == 0
    assert [line.split()[2] for line in logged()] == ["502", "401", "400", "429"]


async def _has_workers(grid: Grid, hub_url: str, count: int) -> bool:
    return len(await grid.workers(hub_url)) == count


async def test_two_workers_with_one_name_make_one_series(grid: Grid) -> None:
    """Regression (review): two workers named alike (the default, the host name, for a host's two
    GPUs) gave two samples of one series, which Prometheus refuses as duplicates."""
    sim_url, _ = await grid.sim(tokens=5)
    hub = await grid.hub()
    for _ in range(2):
        await grid.worker(hub.value, sim_url, name="gpu-host")
    await workers_linked(grid, hub.value, 2)
    text = (await grid.http.get(hub.value + "/metrics")).text
    assert text.count('ghubai_worker_inflight{worker="gpu-host"}') == 1, text


async def test_a_stream_that_fails_mid_way_is_a_failure_at_hub_and_proxy_alike(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regressions (hunt): a stream that ended with the hub's error event after its 200 head was
    counted 502 at the hub and 200 at the proxy (and its trace said 200); the proxy's dashboard
    took error answers for fast first tokens; and the proxy, unlike the hub, counted no first token for
    the streams, whose first tokens had reached their clients."""
    hub, proxy = await grid.chain(tokens=10, fail_after_tokens=3)
    caplog.set_level(logging.INFO)
    for path, body in (("/v1/chat/completions", chat(stream=True)), ("/api/chat", chat(stream=True))):
        response = await grid.http.post(proxy.value + path, json=body)
        assert response.status_code == 200 and '"error"' in response.text.rstrip().splitlines()[-1], response.text
    assert (await grid.http.post(proxy.value + "/v1/chat/completions", content=b"{")).status_code == 400

    async def counted() -> bool:
        return value(await scrape(grid, proxy.value), "ghubai_requests_total", role="proxy", model="", code="400") == 1

    await eventually(counted, "the proxy to count the 400")
    for url, role in ((hub.value, "hub"), (proxy.value, "proxy")):
        samples = await scrape(grid, url)
        assert value(samples, "ghubai_requests_total", role=role, model="sim", code="200") == 0, role
        assert value(samples, "ghubai_requests_total", role=role, model="sim", code="502") == 2, role
        assert value(samples, "ghubai_time_to_first_token_seconds_count", role=role) == 2, role  # (not the 400)
    assert sum(1 for record in caplog.records if "the hub's answer ended with its error event" in record.getMessage()) == 2


async def test_a_request_the_hub_refuses_before_reading_it_is_logged_and_counted(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): both Content-Length and Transfer-Encoding (a smuggling attempt), or an
    absolute target the hub cannot read, got their 400 with no log line and no count."""
    hub = await grid.hub()
    caplog.set_level(logging.INFO, logger="ghubai.hub")
    for head in (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                 b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                 b"GET http://[bad/v1/models HTTP/1.1\r\nhost: x\r\n\r\n"):
        port = int(hub.value.rsplit(":", 1)[1])
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(head.replace(b"host: x\r\n", b"host: x\r\nx-request-id: refused-1\r\n"))
            answer = await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 400") and b"x-request-id: refused-1" in answer, answer
    samples = await scrape(grid, hub.value)
    assert value(samples, "ghubai_requests_total", role="hub", model="", code="400") == 2
    lines = [record.getMessage() for record in caplog.records if " 400 in " in record.getMessage()]
    assert len(lines) == 2 and "Transfer-Encoding" in lines[0], lines


async def test_a_client_that_leaves_after_its_answer_s_end_arrived_is_counted_the_engine_s_tokens(
        grid: Grid) -> None:
    """Regression (hunt): the engine's usage, in the answer's end, was read only when the client's task
    read that frame: a slow client that left once the end had arrived at the hub had its 300 tokens
    counted as none (metrics, per worker) and was charged an estimate."""
    sim_url, _ = await grid.sim(tokens=300, itl_ms=0, ttft_ms=1)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, name="w1")
    client = await stalled_client(hub.value)  # reads 100 bytes, then nothing

    async def ended() -> bool:  # the end is at the hub: the worker's slot is free
        samples = await scrape(grid, hub.value)
        return (await grid.stats(sim_url))["completed"] == 1 and \
            value(samples, "ghubai_worker_inflight", worker="w1") == 0

    await eventually(ended, "the engine to finish and its end to reach the hub")
    client.close()

    async def counted() -> bool:
        return value(await scrape(grid, hub.value), "ghubai_tokens_total", model="sim", type="completion") == 300

    await eventually(counted, "the engine's 300 tokens counted")


async def test_a_whole_answer_that_fails_after_its_first_chunk_counts_no_first_token(grid: Grid) -> None:
    """Regression (hunt): the hub counted a time to first token when a non-streamed answer's first chunk
    came, though the answer then failed (its worker's link dropped) and its client got a 502 and no token;
    the proxy counts none for an error. It counts one once the answer is whole now."""
    hub = await grid.hub()

    async def worker_that_dies_after_one_chunk() -> None:
        async with trio_websocket.open_websocket_url(hub.value.replace("http", "ws") + protocol.GRIDHUB_PATH) as ws:
            await ws.send_message(protocol.encode(protocol.Hello(protocol.PROTOCOL, "w-dies", "dies", ("sim",), 2,
                                                                 "ollama", "test")))
            await ws.get_message()
            while True:
                frames, _ = protocol.unpack(await ws.get_message())
                if requests := [frame for frame in frames if isinstance(frame, protocol.Request)]:
                    await ws.send_message(protocol.chunk(requests[0].id, b'{"partial": '))
                    return

    grid.nursery.start_soon(worker_that_dies_after_one_chunk)
    await workers_linked(grid, hub.value, 1)
    assert (await grid.http.post(hub.value + "/v1/chat/completions", json=chat())).status_code == 502
    samples = await scrape(grid, hub.value)
    assert [count for key, count in samples.items()
            if key.startswith("ghubai_requests_total") and "'502'" in key] == [1]
    assert value(samples, "ghubai_time_to_first_token_seconds_count", role="hub") == 0


async def test_a_stream_its_client_stopped_counts_the_tokens_it_was_sent(grid: Grid) -> None:
    """Regression (hunt): a chat whose user pressed stop counted no tokens (the engine's count comes
    in the answer's end, which never came), in ghubai_tokens_total and the dashboard's tokens/s, while
    its key was charged the estimate; both now count that estimate."""
    sim_url, _ = await grid.sim(tokens=400, itl_ms=5, ttft_ms=0)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, name="w1")
    received = 0
    async with grid.http.stream("POST", hub.value + "/v1/chat/completions", json=chat(stream=True)) as response:
        async for line in response.aiter_lines():
            received += line.startswith('data: {"id"')
            if received == 40:
                break

    async def counted() -> bool:
        samples = await scrape(grid, hub.value)
        return value(samples, "ghubai_requests_total", role="hub", model="sim", code="200") == 1 and \
            value(samples, "ghubai_tokens_total", model="sim", type="completion") >= 40

    await eventually(counted, "the tokens of the stopped stream counted")


async def test_requests_that_wait_for_a_returning_worker_are_counted_under_their_model(grid: Grid) -> None:
    """Regression (hunt): the 503s of requests that waited for a worker that had crashed or was
    restarting were counted as model "other": the hub queued them for the model it serves, but its
    metrics asked only the workers linked at the end."""
    sim_url, _ = await grid.sim()
    hub = await grid.hub(limits={"queue_timeout_s": 0.5})
    worker = await grid.worker(hub.value, sim_url, name="w1")
    worker.stop()
    await workers_linked(grid, hub.value, 0)
    answer = await grid.http.post(hub.value + "/v1/chat/completions", json=chat())
    assert answer.status_code == 503, answer.text
    samples = await scrape(grid, hub.value)
    assert value(samples, "ghubai_requests_total", role="hub", model="sim", code="503") == 1
