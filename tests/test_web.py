"""ghubai.web patches private methods of hypercorn: it must refuse to import when they are
gone, rather than serve without its fixes; and what the patches do, over real sockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from functools import partial
from typing import Any

import h2.config
import h2.connection
import pytest
import trio
import trio.testing

from conftest import WAIT_S, Grid, chat, eventually


@pytest.mark.parametrize("owner, module, method", [
    ("TCPServer", "hypercorn.trio.tcp_server", "protocol_send"),
    ("HTTPStream", "hypercorn.protocol.http_stream", "handle"),
])
def test_web_refuses_a_hypercorn_without_the_methods_it_patches(owner: str, module: str, method: str) -> None:
    script = f"from {module} import {owner}\ndel {owner}.{method}\nimport ghubai.web\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"ImportError: ghubai.web patches {owner}.{method}(self, event)" in result.stderr


async def test_a_fault_that_escapes_the_app_is_logged_and_the_server_serves_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review (hunt): hypercorn's error log was off, so a fault that escaped the app left no line."""
    from ghubai.web import serve_app, server_config

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raise RuntimeError("a bug in the app")
        while (await receive())["type"] != "lifespan.shutdown":  # lifespan: started, then stopped
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(serve_app, app, server_config("127.0.0.1:0"))
        for _ in range(2):  # (and the server answers the next one too)
            async with await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1])) as stream:
                await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                with trio.fail_after(WAIT_S):
                    assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 500")
        nursery.cancel_scope.cancel()
    assert [record.exc_info[1].args for record in caplog.records if record.exc_info] == [("a bug in the app",)] * 2


async def test_a_failed_write_on_an_h2_connection_cancels_every_request_on_it(grid: Grid, monkeypatch: Any) -> None:
    """Regression: a request whose own write found the connection broken handled its close in its
    own task, which that close cancels (the client is gone): the close stopped half-way, and the
    other requests on the connection ran on, their engines generating for nobody."""
    broken: set[int] = set()
    send_all, write = trio.SocketStream.send_all, os.write

    async def failing(self: trio.SocketStream, data: Any) -> None:
        if self.socket.getpeername()[1] in broken:
            raise trio.BrokenResourceError("the peer is gone")
        await send_all(self, data)

    def failing_write(fd: int, data: Any) -> int:  # the write a socket takes at once (ghubai.web)
        try:
            with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as sock:
                peer = sock.getpeername()[1]
        except OSError:
            peer = None
        if peer in broken:
            raise BrokenPipeError("the peer is gone")
        return write(fd, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", failing)
    monkeypatch.setattr(os, "write", failing_write)
    first_url, first = await grid.sim(models=("a",), ttft_ms=1500, itl_ms=20, tokens=100_000)
    other_url, other = await grid.sim(models=("b",), ttft_ms=60_000, itl_ms=20, tokens=100_000)
    hub = await grid.hub()
    await grid.worker(hub.value, first_url, name="wa")
    await grid.worker(hub.value, other_url, name="wb")
    stream = await trio.open_tcp_stream("127.0.0.1", int(hub.value.rsplit(":", 1)[1]))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    for model in ("a", "b"):  # two requests on one connection (cleartext h2, prior knowledge)
        body = json.dumps(chat(model=model, stream=True)).encode()
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(":method", "POST"), (":path", "/v1/chat/completions"), (":scheme", "http"),
                                  (":authority", "x"), ("content-type", "application/json"),
                                  ("content-length", str(len(body)))])
        client.send_data(sid, body, end_stream=True)
    await stream.send_all(client.data_to_send())

    async def both_running() -> bool:
        return first.stats.active == 1 and other.stats.active == 1

    await eventually(both_running, "both requests at their engines")
    broken.add(stream.socket.getsockname()[1])  # every write of the hub's end of this connection fails now

    async def both_cancelled() -> bool:  # the first at its first token (its write fails), the other with it
        return first.stats.cancelled == 1 and other.stats.cancelled == 1

    await eventually(both_cancelled, "both engines told to stop")
    await stream.aclose()


async def test_a_write_the_socket_takes_in_part_is_finished_even_when_its_request_is_cancelled() -> None:
    """Regression: the rest of a frame the socket took in part waited for the send lock outside
    the shield, so a request's cancel dropped it, and the client got a truncated frame."""
    from types import SimpleNamespace

    from hypercorn.events import RawData

    from ghubai import web

    left, right = trio.socket.socketpair()
    ours, theirs = trio.SocketStream(left), trio.SocketStream(right)
    server = SimpleNamespace(config=web.server_config("127.0.0.1:0"), send_lock=trio.Lock(), stream=ours)
    frame, received = b"F" * (8 << 20), bytearray()  # more than a socket buffer holds

    async def read() -> None:
        while len(received) < len(frame):
            received.extend(await theirs.receive_some(1 << 20))

    with trio.move_on_after(WAIT_S):  # a frame cut short never arrives whole: fail, not hang
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            with trio.CancelScope() as request:
                request.cancel()  # the client went away: the request's scope is cancelled
                await web._bounded_protocol_send(server, RawData(data=frame))  # type: ignore[arg-type]
    assert len(received) == len(frame)


async def test_a_write_queued_behind_another_has_its_own_deadline(mock_clock: Any) -> None:
    """Regression: the deadline of a write ran while it waited for the send lock, so a frame queued
    behind a long one to a client that kept reading timed out, and the connection was closed."""
    from types import SimpleNamespace

    from hypercorn.events import RawData

    from ghubai import web

    released = [trio.Event(), trio.Event()]
    stream = trio.testing.MemorySendStream()

    async def slow_client() -> None:  # takes each write's bytes, but only when the test says so
        await released[0].wait()
        released.pop(0)

    stream.send_all_hook = slow_client
    events: list[object] = []

    class Protocol:
        async def handle(self, event: object) -> None:
            events.append(event)

    config = web.server_config("127.0.0.1:0", write_timeout_s=1.0)
    server = SimpleNamespace(config=config, send_lock=trio.Lock(), stream=stream, protocol=Protocol())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(web._bounded_protocol_send, server, RawData(data=b"first "))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(web._bounded_protocol_send, server, RawData(data=b"second"))
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.8)  # the first write takes 0.8 s: within its deadline
        released[0].set()
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(0.4)  # 1.2 s after the second was queued, 0.4 s into its own write
        await trio.testing.wait_all_tasks_blocked()
        released[0].set()
    assert events == [] and stream.get_data_nowait() == b"first second"


def test_a_burst_of_connections_waits_in_the_backlog_rather_than_being_dropped() -> None:
    """Regression (scale hunt): hypercorn's backlog of 100 dropped the SYNs of a burst past it (2,000
    clients at once: 60 s for all to get in, connections reset, the proxy's connects timed out). The
    hub and registry listen as the proxy does, with what the kernel allows (net.core.somaxconn)."""
    from ghubai.web import server_config

    assert server_config("127.0.0.1:0").backlog >= 4096


async def test_a_request_the_stopping_server_cancels_before_its_answer_gets_a_503() -> None:
    """Regression (hunt): hypercorn answers a request whose app ended without an answer with a 500,
    and so it answered the requests a stopping hub cancelled: the proxy passed the 500 to its client,
    where a 503 sends the request to another hub."""
    from ghubai.web import serve_app, server_config

    entered = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            entered.set()
            await trio.sleep_forever()
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    async def server(task_status: trio.TaskStatus[tuple[trio.CancelScope, str]]) -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                [url] = await nursery.start(serve_app, app, server_config("127.0.0.1:0"))
                task_status.started((scope, url))

    async with trio.open_nursery() as nursery:
        stop, url = await nursery.start(server)
        async with await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1])) as stream:
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            with trio.fail_after(WAIT_S):
                await entered.wait()
                stop.cancel()  # (the hub's stop, once its drain is over)
                assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 503")


async def test_a_kept_alive_connection_idles_out_after_a_framework_route_and_closes_as_the_hub_stops(
        autojump_clock: trio.abc.Clock) -> None:
    """Regression (left alone twice: "a stop waits 1 s"): after a request that quart answered, the
    connection's keep-alive countdown was cancelled at birth (hypercorn starts it from inside the
    request, whose scope quart-trio cancels as the request ends), so an idle connection stayed open
    for good, and a stopping hub waited out its whole grace for it. It closes after the hub's
    ``limits.idle_timeout_s``, and at once when the hub stops."""
    from ghubai.config import HubConfig
    from ghubai.hub.app import run

    drain = trio.Event()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(run, HubConfig(listen="127.0.0.1:0"), drain=drain))
        port = int(url.rsplit(":", 1)[1])

        async def kept_alive() -> trio.SocketStream:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 200")
            return stream

        async def closed(stream: trio.SocketStream) -> float:
            began = trio.current_time()
            with trio.fail_after(120):
                while await stream.receive_some(65536):
                    pass
            await stream.aclose()
            return trio.current_time() - began

        # (limits.idle_timeout_s, 75 s: above a front's 60, where hypercorn's own 5 s made nginx's 502s)
        assert 60 < await closed(await kept_alive()) <= HubConfig().limits.idle_timeout_s + 0.5
        stream = await kept_alive()
        await trio.testing.wait_all_tasks_blocked()  # (the hub idles: its countdown runs)
        await stream.send_eof()  # (hunt: a client that closed its side held the connection, and the cap's place, 5 s)
        assert await closed(stream) < 0.5
        stream = await kept_alive()
        drain.set()
        assert await closed(stream) < 0.5  # (not graceful_timeout, 1 s)


async def test_the_hub_keeps_an_idle_connection_longer_than_a_front_does_and_for_as_long_as_it_is_told(
        grid: Grid) -> None:
    """Regression (a hunt): the hub closed an idle kept-alive connection after hypercorn's 5 s, where
    nginx keeps its upstream connections 60 s: nginx sent a request on one the hub was closing, and
    its client got a 502 (1 in 20 requests sent 5 s apart). 75 s now, as the proxy's, and a key."""
    from ghubai.config import HubLimits
    from ghubai.web import server_config

    assert HubLimits().idle_timeout_s > 60 and server_config("127.0.0.1:0").keep_alive_timeout > 60
    hub = await grid.hub(limits={"idle_timeout_s": 0.2})
    stream = await trio.open_tcp_stream("127.0.0.1", int(hub.value.rsplit(":", 1)[1]))
    await stream.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    answer = b""
    with trio.fail_after(WAIT_S):  # the answer, then the hub's close once the connection idled 0.2 s
        while data := await stream.receive_some():
            answer += data
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
    await stream.aclose()


async def test_the_hub_listens_on_every_address_its_host_names_as_the_proxy_does(grid: Grid) -> None:
    """Regression (an IPv6 hunt): hypercorn took the family from the text: a host name was IPv4
    alone (one with IPv6 addresses only failed), a zone was dropped (``[fe80::1%eth0]`` failed),
    and an IPv4-mapped address turned the DNS-rebinding guard off. The hub binds as the proxy."""
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    every = await grid.hub(listen=f"[::]:{port}")
    assert (await grid.http.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    if socket.has_ipv6:
        assert (await grid.http.get(f"http://[::1]:{port}/health")).status_code == 200
    every.stop()
    mapped = await grid.hub(listen="[::ffff:127.0.0.1]:0")
    port = mapped.value.rsplit(":", 1)[1]
    rebound = await grid.http.get(f"http://127.0.0.1:{port}/v1/models",
                                  headers={"host": f"evil.example:{port}", "origin": f"http://evil.example:{port}"})
    assert rebound.status_code == 403  # (a loopback listener: a page of a name pointed at it is a stranger)


async def test_an_asgi_message_is_one_write_and_a_head_waits_only_for_a_body_said_to_follow(monkeypatch: Any) -> None:
    """hypercorn wrote a head, each body message and a chunked answer's end each on its own (four
    or five writes for a short stream, two for a whole answer; each a syscall and a wake-up of the
    client or proxy that reads it). A head waits for its body only when the app says the body
    follows at once: another head (a slow stream's) is written as it comes."""
    from ghubai import web

    writes: list[bytes] = []
    write_now = web.write_now

    async def recorded(stream: Any, data: bytes, *, shielded: bool = False) -> bytes:
        writes.append(bytes(data))
        return await write_now(stream, data, shielded=shielded)

    monkeypatch.setattr(web, "write_now", recorded)
    head_read = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        said = {web.BODY_FOLLOWS: True} if scope["path"] != "/slow" else {}
        length = [(b"content-length", b"5")] if scope["path"] == "/whole" else []
        await send({"type": "http.response.start", "status": 200, "headers": length, **said})
        if scope["path"] == "/slow":
            await head_read.wait()  # (a head held for its body would never be read: the test fails)
        for part, more in ((b"hello", False),) if length else ((b"one", True), (b"two", False)):
            await send({"type": "http.response.body", "body": part, "more_body": more})

    async def exchange(stream: trio.SocketStream, request: bytes, ends: bytes) -> bytes:
        writes.clear()
        await stream.send_all(request)
        answer = b""
        with trio.fail_after(WAIT_S):
            while not answer.endswith(ends):
                answer += await stream.receive_some(4096)
                if b"\r\n\r\n" in answer:
                    head_read.set()
        return answer

    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(web.serve_app, app, web.server_config("127.0.0.1:0"))
        async with await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1])) as stream:
            answer = await exchange(stream, b"GET /whole HTTP/1.1\r\nHost: x\r\n\r\n", b"hello")
            assert answer.startswith(b"HTTP/1.1 200") and writes == [answer]
            answer = await exchange(stream, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", b"0\r\n\r\n")
            assert [write.endswith(end) for write, end in zip(writes, (b"3\r\none\r\n", b"0\r\n\r\n"))] == [True, True]
            assert writes[0].startswith(b"HTTP/1.1 200") and len(writes) == 2 and b"".join(writes) == answer
            await exchange(stream, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n", b"0\r\n\r\n")
            assert writes[0].endswith(b"\r\n\r\n") and b"one" not in writes[0]
            # the last answer of a connection is written whole before the connection closes
            answer = await exchange(stream, b"GET /whole HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b"hello")
            assert writes == [answer]
            with trio.fail_after(WAIT_S):
                assert await stream.receive_some(4096) == b""
        nursery.cancel_scope.cancel()


def test_the_answers_date_is_the_current_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """(Made once a second, not once an answer.)"""
    import time
    from email.utils import parsedate_to_datetime

    import hypercorn.config

    from ghubai.web import server_config

    config, now = server_config("127.0.0.1:0"), [1_800_000_000.2]
    monkeypatch.setattr(time, "time", lambda: now[0])
    monkeypatch.setattr(hypercorn.config, "time", lambda: now[0])  # (its clock for the date)
    dates = []
    for now[0] in (1_800_000_000.2, 1_800_000_000.9, 1_800_000_001.1):
        [date] = [value for name, value in config.response_headers("h11") if name == b"date"]
        dates.append(parsedate_to_datetime(date.decode()).timestamp())
    assert dates == [1_800_000_000, 1_800_000_000, 1_800_000_001]


async def test_a_client_that_leaves_during_an_answer_s_last_held_write_is_heard_as_gone() -> None:
    """Review: the last message and the chunked end, held to go in one write, were written only as
    hypercorn recycled the connection, when the answer counted as closed: a client that left during
    that write was never told to the app (``CLIENT_GONE``)."""
    from ghubai import web

    gone = trio.Event()
    big = b"x" * (16 << 20)  # more than the socket buffers hold

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        scope[web.CLIENT_GONE] = gone.set
        await send({"type": "http.response.start", "status": 200, web.BODY_FOLLOWS: True,
                    "headers": [(b"content-length", str(len(big)).encode())]})
        await send({"type": "http.response.body", "body": big, "more_body": False})

    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(web.serve_app, app, web.server_config("127.0.0.1:0"))
        stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(WAIT_S):
            assert (await stream.receive_some(1000)).startswith(b"HTTP/1.1 200")
            await trio.aclose_forcefully(stream)  # it leaves, the answer's write not done
            await gone.wait()
        nursery.cancel_scope.cancel()
