"""Logs of a whole grid of real processes: one line per event, JSON or text, the request id of a request
on the lines about it in every role (proxy → hub → worker → engine), and no secret anywhere."""

from __future__ import annotations

import json
import logging
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from conftest import WAIT_S, Daemon, Grid, chat, eventually
from ghubai.observability import logs

API_KEY, TOKEN = "sk-client-secret-4242", "provider-secret-1717"


def daemon(tmp_path: Path, role: str, config: str | None, *args: str, fmt: str = "json") -> Daemon:
    """``role`` logging at debug level to ``ROLE.log``; its config, if any, in ``ROLE.toml``."""
    command = [role, "--log-format", fmt, "--log-level", "debug", *args]
    if config is not None:
        (tmp_path / f"{role}.toml").write_text(config)
        command += ["--config", str(tmp_path / f"{role}.toml")]
    return Daemon(tmp_path, *command)


async def test_a_request_id_crosses_every_role_and_secrets_never_appear(tmp_path: Path) -> None:
    processes = [daemon(tmp_path, "sim", None, "--listen", "127.0.0.1:0", "--ttft-ms", "1", "--itl-ms", "1"),
                 daemon(tmp_path, "hub", f'listen = "127.0.0.1:0"\napi_keys = ["{API_KEY}"]\n'
                                         f'provider_tokens = ["{TOKEN}"]\n', fmt="text")]
    try:
        sim, hub = [await role.url() for role in processes]
        processes.append(daemon(tmp_path, "worker", f'hub_url = ["{hub.replace("http", "ws", 1)}/gridhub"]\n'
                                                    f'provider_token = "{TOKEN}"\nname = "w1"\n'
                                                    f'[engine]\nurl = "{sim}"\n'))
        processes.append(daemon(tmp_path, "proxy", f'listen = "127.0.0.1:0"\nregistry_url = ""\nhubs = ["{hub}"]\n'
                                                   f'api_keys = ["{API_KEY}"]\n[health]\ninterval_s = 0.1\n'))
        proxy = await processes[-1].url()
        async with httpx.AsyncClient(timeout=WAIT_S, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            async def serving() -> bool:
                try:
                    return (await http.get(proxy + "/ready")).status_code == 200 and \
                        (await http.get(proxy + "/v1/models")).json()["data"] != []
                except httpx.TransportError:
                    return False

            await eventually(serving, "the grid behind the proxy")
            given = await http.post(proxy + "/v1/chat/completions", json=chat(stream=True),
                                    headers={"X-Request-ID": "trace-me-42"})
            made = await http.post(proxy + "/api/chat", json=chat())
            forged = await http.post(proxy + "/v1/chat/completions", json=chat("nope\nCRITICAL ghubai.hub: forged\u2028CRITICAL x"))
            unknown = await http.get(proxy + "/v2/models")
            refused = await http.post(proxy + "/v1/chat/completions", json=chat(), headers={
                "Authorization": "Bearer wrong-key", "X-Request-ID": "bad id; forged=1"})
    finally:
        for role in processes:
            role.process.terminate()
        for role in processes:
            role.process.wait(timeout=WAIT_S)

    assert given.status_code == 200 and given.headers["x-request-id"] == "trace-me-42"
    made_id = made.headers["x-request-id"]
    assert made.status_code == 200 and len(made_id) == 32
    assert refused.status_code == 401 and refused.headers["x-request-id"] not in ("", "bad id; forged=1")

    assert forged.status_code == 404 and unknown.status_code == 404
    logs = {role: (tmp_path / f"{role}.log").read_text() for role in ("sim", "hub", "worker", "proxy")}
    assert not [line for line in logs["hub"].splitlines() if line.startswith("CRITICAL")]  # no forged line
    assert any(entry.get("request_id") == unknown.headers["x-request-id"] and "/v2/models 404" in entry["msg"]
               for entry in map(json.loads, logs["proxy"].splitlines()))
    for role, text in logs.items():
        assert API_KEY not in text and TOKEN not in text, f"a secret in the {role} log"
    lines = {role: [json.loads(line) for line in text.splitlines()] for role, text in logs.items() if role != "hub"}
    for role, entries in lines.items():
        assert all({"level", "logger", "msg"} <= set(entry) for entry in entries), role
        for rid in ("trace-me-42", made_id):
            assert any(entry.get("request_id") == rid for entry in entries), f"{rid} not in the {role} log"
    hub_lines = logs["hub"].splitlines()
    for rid in ("trace-me-42", made_id):
        assert any(line.startswith(f"INFO ghubai.hub request_id={rid}: POST ")
                   for line in hub_lines), f"{rid} not in the hub log"


async def test_the_proxy_logs_and_counts_a_client_that_left_before_its_answer(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): the hub logged its 499, but the proxy wrote no line and counted nothing
    for a client that left before the answer began."""
    sim_url, _ = await grid.sim(ttft_ms=3000)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url)
    proxy = await grid.proxy(hubs=(hub.value,))
    await grid.wait_for_model(proxy.value, "sim")
    caplog.set_level(logging.INFO)
    body = json.dumps(chat()).encode()
    client = await trio.open_tcp_stream("127.0.0.1", int(proxy.value.rsplit(":", 1)[1]))
    await client.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    async def started() -> bool:
        return (await grid.stats(sim_url))["started"] >= 1

    await eventually(started, "the engine to start")
    await client.aclose()

    async def logged() -> bool:
        return any(record.name == "ghubai.proxy" and "POST /v1/chat/completions 499" in record.getMessage()
                   for record in caplog.records)

    await eventually(logged, "the proxy's line for the client that left")
    assert 'code="499",model="sim",role="proxy"' in (await grid.http.get(proxy.value + "/metrics")).text


async def test_hub_and_proxy_say_when_a_client_left_in_the_middle_of_its_answer(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): a client that left mid-stream was logged at hub and proxy as a plain 200,
    alike to a whole answer; only the worker's line said it was cancelled. The status stays the one
    it got; the line says it left."""
    hub, proxy = await grid.chain(itl_ms=50, tokens=1000)
    caplog.set_level(logging.INFO)
    for url in (hub.value, proxy.value):
        async with grid.http.stream("POST", url + "/v1/chat/completions", json=chat(stream=True)) as answer:
            async for _ in answer.aiter_lines():
                break  # a first event, and gone

    async def logged() -> bool:
        said = [record.getMessage() for record in caplog.records if record.name in ("ghubai.hub", "ghubai.proxy")
                and "POST /v1/chat/completions 200" in record.getMessage()]
        return len([line for line in said if line.endswith(": the client left before the answer's end")]) == 3
    await eventually(logged, "a line at the hub for each client and at the proxy for its own that say they left")
    assert "ghubai_requests_total{code=\"200\",model=\"sim\",role=\"proxy\"} 1.0" in \
        (await grid.http.get(proxy.value + "/metrics")).text


async def test_a_refused_key_s_line_names_the_client_s_address(grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Hunt: a request refused for its key was logged at hub and proxy without its client's address:
    key guessing, or a leaked key in use, could not be traced to a source."""
    caplog.set_level(logging.INFO)
    hub = await grid.hub(api_keys=("sk-right",))
    proxy = await grid.proxy(hubs=(hub.value,), api_keys=("sk-right",))
    for url in (hub.value + "/v1/chat/completions", hub.value + "/v1/models", proxy.value + "/v1/chat/completions"):
        wrong = await grid.http.post(url, json=chat(), headers={"Authorization": "Bearer sk-wrong"}) \
            if url.endswith("completions") else await grid.http.get(url, headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401

    def refused() -> list[str]:
        return sorted(record.getMessage() for record in caplog.records
                      if record.name in ("ghubai.hub", "ghubai.proxy") and " 401" in record.getMessage())

    async def said(*ends: str) -> bool:
        lines = refused()
        return len(lines) == len(ends) and all(line.endswith(end) for line, end in zip(lines, ends))
    await eventually(partial(said, *["(from 127.0.0.1)"] * 3), "a line for each that names its client")
    caplog.clear()  # (a review: behind a proxy that checks no key, the hub saw the proxy's address alone)
    open_proxy = await grid.proxy(hubs=(hub.value,))
    assert (await grid.http.post(open_proxy.value + "/v1/chat/completions", json=chat(),
                                 headers={"Authorization": "Bearer sk-wrong"})).status_code == 401
    await eventually(partial(said, "(from 127.0.0.1, forwarded for 127.0.0.1)", "(from 127.0.0.1)"),
                     "the hub's line with the address it was forwarded for, and the proxy's with its client's")
    caplog.clear()  # (a hunt: the proxy's own look at the hubs' lists for /api/ps got their 401 with no
    caplog.handler.addFilter(logs._WithRequestId())  # (as a daemon's handler: each record's request id)
    listed = await grid.http.get(open_proxy.value + "/api/ps", headers={"X-Request-ID": "ps-1"})  # client's
    assert listed.status_code == 401 and "error" in listed.json()  # address, and answered the client 200)

    async def forwarded() -> bool:
        return any(record.name == "ghubai.hub" and "ps-1" in record.request_id  # type: ignore[attr-defined]
                   and record.getMessage().endswith("(from 127.0.0.1, forwarded for 127.0.0.1)")
                   for record in caplog.records)
    await eventually(forwarded, "the hub's line for the proxy's look, under the client's request id")


async def test_every_request_has_a_line_that_says_why_it_failed_in_hub_and_worker(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): the hub's line for a failed request gave its status alone (a 504 and a 400
    looked alike whatever the cause), and the worker wrote nothing for a request the hub cancelled,
    though the engine stopped it."""
    sim_url, _ = await grid.sim(ttft_ms=2000)
    hub = await grid.hub(timeouts={"first_token_s": 0.3}, limits={"max_attempts": 1})
    await grid.worker(hub.value, sim_url)
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(logs._WithRequestId())  # as logs.setup does: each record gets its request's id
    timed_out = await grid.http.post(hub.value + "/v1/chat/completions", json=chat(),
                                     headers={"X-Request-ID": "cut-short"})
    bad = await grid.http.post(hub.value + "/v1/chat/completions", json={"model": "sim", "messages": "x"})
    assert (timed_out.status_code, bad.status_code) == (504, 400)

    def lines(role: str, request_id: str | None = None) -> list[str]:
        return [record.getMessage() for record in caplog.records if record.name == f"ghubai.{role}"
                and request_id in (None, getattr(record, "request_id", ""))]

    async def written() -> bool:
        return any(" 400 " in line for line in lines("hub")) and \
            any("stopped after" in line for line in lines("worker", "cut-short"))

    await eventually(written, "the hub's lines, and the worker's for the request the hub cancelled")
    assert [line for line in lines("hub", "cut-short") if " 504 " in line and "Timed out" in line]
    assert [line for line in lines("hub") if " 400 " in line and bad.json()["error"]["message"] in line]


def test_a_text_line_s_request_id_comes_before_what_a_client_could_write() -> None:
    """Regression (hunt): the id ended the line, after the message, so a model named
    ``x request_id=victim`` gave its line two ids, the forged one first."""
    record = logging.LogRecord("ghubai.hub", logging.INFO, __file__, 1, "POST 404 model %s",
                               ("x request_id=victim",), None)
    record.request_id = "mine"
    line = logs.TextFormatter().format(record)
    assert line == "INFO ghubai.hub request_id=mine: POST 404 model x request_id=victim"
    record.request_id = ""
    assert logs.TextFormatter().format(record) == "INFO ghubai.hub: POST 404 model x request_id=victim"


def test_a_text_line_escapes_control_characters_in_a_traceback_too() -> None:
    """Regression (hunt): the message was escaped but an exception's text kept its carriage returns
    and escape sequences, with which a peer's words in an error could forge or hide log lines."""
    try:
        raise ValueError("bad\r\x1b[2Kforged line")
    except ValueError:
        record = logging.LogRecord("ghubai.hub", logging.ERROR, __file__, 1, "failed: %s", ("x\ry",), sys.exc_info())
    line = logs.TextFormatter().format(record)
    assert "\r" not in line and "\x1b" not in line and "\n" not in line
    assert "x\\ry" in line and "bad\\r\\x1b[2Kforged line" in line


async def test_an_http2_client_s_key_never_reaches_the_debug_log(tmp_path: Path) -> None:
    """Regression (hunt): over HTTP/2 the hpack library logged every header it decoded at debug,
    the client's ``Authorization`` among them."""
    hub = daemon(tmp_path, "hub", f'listen = "127.0.0.1:0"\napi_keys = ["{API_KEY}"]\n')
    try:
        url = await hub.url()
        async with httpx.AsyncClient(http1=False, http2=True, timeout=WAIT_S) as http:
            response = await http.post(url + "/v1/chat/completions", json=chat(),
                                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert response.http_version == "HTTP/2" and response.status_code == 503  # (no worker: what is logged is the point)
    finally:
        assert hub.stop() == 0
    assert API_KEY not in hub.log() and "POST /v1/chat/completions 503" in hub.log()
