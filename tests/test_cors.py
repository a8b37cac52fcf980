"""Calls from web pages of other origins (CORS): the preflight answered before any key check, every
answer to an allowed page tagged (errors and streams too), others left as they were."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio

from browser import chromium
from conftest import WAIT_S, Grid, chat
from ghubai import cors

PAGE = "https://chat.example.com"
KEY = {"authorization": "Bearer k1"}


def test_an_allowed_origin_is_named_back_and_others_get_only_vary() -> None:
    origins = cors.Origins([PAGE.upper() + ":443"])  # compared without case, and as browsers name them
    assert origins.allow([(b"origin", PAGE.encode())])[0] == (b"access-control-allow-origin", PAGE.encode())
    assert origins.allow([(b"origin", b"https://evil.example.com")]) == [(b"vary", b"origin")]
    assert origins.allow([]) == [(b"vary", b"origin")]  # not from a page: a cache must still tell them apart
    assert cors.Origins(["*"]).allow([(b"origin", b"null")])[0][1] == b"null"  # named, not "*"
    assert cors.Origins(["http://localhost:8080"]).allow([(b"origin", b"http://localhost:8080")])[0][1] == \
        b"http://localhost:8080"
    assert not cors.Origins([])
    idn = cors.Origins(["https://Bücher.example:8443", "https://straße.example"])  # (hunt: never matched)
    assert cors.allowed(idn.allow([(b"origin", b"https://xn--bcher-kva.example:8443")]))
    assert cors.allowed(idn.allow([(b"origin", b"https://xn--strae-oqa.example")]))  # UTS 46, as browsers


def test_a_preflight_allows_what_the_page_asked_for() -> None:
    asked = [(b"access-control-request-method", b"POST"),
             (b"access-control-request-headers", b"authorization, content-type"),
             (b"access-control-request-private-network", b"true")]
    answer = dict(cors.preflight("OPTIONS", asked) or [])
    assert answer[b"access-control-allow-headers"] == b"authorization, content-type"
    assert answer[b"access-control-allow-private-network"] == b"true"
    assert b"POST" in answer[b"access-control-allow-methods"]
    assert cors.preflight("OPTIONS", []) is None  # a plain OPTIONS is no preflight
    assert cors.preflight("POST", asked) is None


async def _front(grid: Grid, role: str, origins: tuple[str, ...]) -> str:
    """A hub with a worker, or a proxy before it (both with the origins, as an operator may set them)."""
    hub = await grid.hub(api_keys=("k1",), cors_origins=origins)
    sim_url, _ = await grid.sim()
    await grid.worker(hub.value, sim_url)
    if role == "hub":
        return hub.value
    proxy = await grid.proxy(hubs=(hub.value,), api_keys=("k1",), cors_origins=origins)
    await grid.wait_for_model(proxy.value, "sim")
    return proxy.value


@pytest.mark.parametrize("role", ["hub", "proxy"])
async def test_a_page_of_an_allowed_origin_can_call_and_read_every_answer(grid: Grid, role: str) -> None:
    url = await _front(grid, role, (PAGE,))
    preflight = await grid.http.options(url + "/v1/chat/completions", headers={
        "origin": PAGE, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})  # no key: browsers send none
    assert preflight.status_code == 204
    assert preflight.headers.get_list("access-control-allow-origin") == [PAGE]
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type"

    page = {"origin": PAGE}
    for stream in (False, True):
        async with grid.http.stream("POST", url + "/v1/chat/completions", json=chat(stream=stream),
                                    headers={**page, **KEY}) as answer:
            body = await answer.aread()
        assert answer.status_code == 200 and b"content" in body
        assert answer.headers.get_list("access-control-allow-origin") == [PAGE]  # once, though the hub tags too
        assert "x-request-id" in answer.headers["access-control-expose-headers"]
    refused = await grid.http.post(url + "/v1/chat/completions", json=chat(), headers=page)
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == PAGE
    listed = await grid.http.get(url + "/api/tags", headers={**page, **KEY})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == PAGE


@pytest.mark.parametrize("role", ["hub", "proxy"])
async def test_other_origins_and_servers_without_origins_tag_nothing(grid: Grid, role: str) -> None:
    url = await _front(grid, role, ())
    other = await _front(grid, role, (PAGE,))
    for server, origin in ((url, PAGE), (other, "https://evil.example.com")):
        preflight = await grid.http.options(server + "/v1/chat/completions", headers={
            "origin": origin, "access-control-request-method": "POST"})
        assert preflight.status_code != 204 and "access-control-allow-origin" not in preflight.headers
        answer = await grid.http.post(server + "/v1/chat/completions", json=chat(), headers=KEY)  # not a page
        assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers
        assert answer.headers.get_list("vary") == ([] if server == url else ["origin"])


@pytest.mark.parametrize("role", ["hub", "proxy"])
async def test_a_page_of_another_origin_runs_nothing_even_without_a_preflight(grid: Grid, role: str) -> None:
    """Regression (hunt): a page of any origin could POST a chat with no preflight (a form, a
    ``fetch`` in ``no-cors`` mode: ``text/plain``, no key needed without api_keys) and the grid ran
    it, though the page could not read the answer: any page a user opened could spend its GPUs.
    It is a 403 now, as Ollama answers it; the server's own pages (same origin) still call."""
    hub = await grid.hub(cors_origins=(PAGE,))
    sim_url, sim = await grid.sim()
    await grid.worker(hub.value, sim_url)
    url = hub.value
    if role == "proxy":
        url = (await grid.proxy(hubs=(hub.value,))).value  # (no cors_origins: its own judgement)
        await grid.wait_for_model(url, "sim")
    for origin in ("https://evil.example.com", "null", PAGE if role == "proxy" else "http://127.0.0.2:1"):
        for path, body in (("/v1/chat/completions", json.dumps(chat())), ("/api/chat", json.dumps(chat()))):
            answer = await grid.http.post(url + path, content=body, headers={"origin": origin, "content-type": "text/plain"})
            assert answer.status_code == 403 and "cors_origins" in answer.text, (origin, path, answer.text)
    assert sim.stats.started == 0
    own = await grid.http.post(url + "/v1/chat/completions", json=chat(), headers={"origin": url})
    assert own.status_code == 200, own.text
    if role == "hub":  # the proxy passes no page's origin on: its hubs judge none it let through
        assert (await grid.http.post(url + "/v1/chat/completions", json=chat(), headers={"origin": PAGE})).status_code == 200


async def test_a_web_page_cannot_link_to_a_hub_as_a_worker(grid: Grid) -> None:
    """Regression (hunt): no CORS guards a WebSocket, so with no provider_tokens (the default) any
    page a user opened could link to the hub as a worker of a model, and read its prompts."""
    import trio_websocket

    from ghubai import protocol

    hub = await grid.hub()
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with trio_websocket.open_websocket_url(hub.value.replace("http", "ws") + protocol.GRIDHUB_PATH,
                                                     extra_headers=[("Origin", "https://evil.example.com")]):
            pass
    assert refused.value.status_code == 403
    assert await grid.workers(hub.value) == []


async def test_the_proxy_s_origins_hold_whatever_its_hubs_allow(grid: Grid) -> None:
    """Review: with a hub that allows any page, a page the proxy allows not (or a proxy that allows
    none) read the hub's answers through the proxy, which passed the hub's CORS headers on."""
    hub = await grid.hub(cors_origins=("*",))
    sim_url, _ = await grid.sim()
    await grid.worker(hub.value, sim_url)
    for origins in ((PAGE,), ()):
        proxy = await grid.proxy(hubs=(hub.value,), cors_origins=origins)
        await grid.wait_for_model(proxy.value, "sim")
        evil = {"origin": "https://evil.example.com"}
        preflight = await grid.http.options(proxy.value + "/v1/chat/completions",
                                            headers={**evil, "access-control-request-method": "POST"})
        answer = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(), headers=evil)
        for seen in (preflight, answer):
            assert not [key for key in seen.headers if key.startswith("access-control-")], (origins, seen.headers)
        assert answer.status_code == 403
        if origins:
            allowed = await grid.http.post(proxy.value + "/v1/chat/completions", json=chat(), headers={"origin": PAGE})
            assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == PAGE


SMUGGLED = (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: " + PAGE.encode() + b"\r\n"
            b"Access-Control-Request-Method: POST\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\nGET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize("role", ["hub", "proxy"])
async def test_a_preflight_with_two_framings_is_refused_as_any_request(grid: Grid, role: str) -> None:
    """Review: the hub answered a preflight before its check of Content-Length beside
    Transfer-Encoding, and then served the request smuggled in its body."""
    url = await _front(grid, role, (PAGE,))
    stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
    await stream.send_all(SMUGGLED)
    answer = b""
    with trio.fail_after(WAIT_S):
        while chunk := await stream.receive_some(65536):
            answer += chunk
    await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 400") and answer.count(b"HTTP/1.1 ") == 1, answer


async def test_a_preflight_is_not_forwarded_nor_counted(grid: Grid) -> None:
    url = await _front(grid, "proxy", (PAGE,))
    before = (await grid.http.get(url + "/metrics")).text.count("ghubai_requests_total{")
    await grid.http.options(url + "/v1/chat/completions", headers={"origin": PAGE,
                                                                   "access-control-request-method": "POST"})
    assert (await grid.http.get(url + "/metrics")).text.count("ghubai_requests_total{") == before



FETCH = """window.seen = 'pending';
fetch(%r + '/v1/chat/completions', {method: 'POST', body: JSON.stringify(%s),
      headers: {'authorization': 'Bearer k1', 'content-type': 'application/json'}})
  .then(async answer => { window.seen = answer.status + ' ' + answer.headers.get('x-request-id').length + ' ' +
                                        (await answer.text()).includes('[DONE]'); })
  .catch(error => { window.seen = 'blocked: ' + error.name; });"""


async def test_a_real_browser_streams_through_the_proxy_from_an_allowed_page_only(grid: Grid, tmp_path: Path) -> None:
    """Chromium, its preflight and its reading of a stream: from a page of the hub's origin (its
    dashboard) to the proxy, another origin; allowed by one proxy, not by the other."""
    hub = await grid.hub(api_keys=("k1",))
    sim_url, _ = await grid.sim()
    await grid.worker(hub.value, sim_url)
    proxies = {}
    for origins in ((hub.value,), ()):
        proxy = await grid.proxy(hubs=(hub.value,), api_keys=("k1",), cors_origins=origins)
        await grid.wait_for_model(proxy.value, "sim")
        proxies[origins] = proxy.value
    async with chromium(tmp_path / "profile") as page:
        await page.open(hub.value + "/dashboard")
        await page.until("document.readyState", "complete", "the page loaded")
        await page.evaluate(FETCH % (proxies[(hub.value,)], json.dumps(chat(stream=True))))
        await page.until("window.seen", "200 32 true", "the whole stream, and its request id, read by the page")
        await page.evaluate(FETCH % (proxies[()], json.dumps(chat(stream=True))))
        await page.until("window.seen", "blocked: TypeError", "the browser keeping the page out")


def test_a_page_is_the_server_s_own_by_its_host_whatever_the_scheme_and_on_loopback_only_by_a_local_name() -> None:
    """Regressions (review): a page behind a front that ends TLS (``https://grid.example``, the
    server hearing http) was refused its own server; and on a loopback server, a page of any DNS
    name an attacker points at 127.0.0.1 (DNS rebinding) passed for the server's own."""
    def judged(listen: str, origin: str, host: str) -> str | None:
        return cors.stranger(cors.Origins([], listen), [(b"origin", origin.encode()), (b"host", host.encode())])

    assert judged("0.0.0.0:5000", "https://grid.example", "grid.example") is None
    assert judged("0.0.0.0:5000", "http://Grid.example:5000", "grid.example:5000") is None
    assert judged("0.0.0.0:5000", "https://evil.example", "grid.example") == "https://evil.example"
    for host in ("localhost:5000", "127.0.0.1:5000", "[::1]:5000", "ui.localhost:5000", f"{socket.gethostname()}:5000"):
        assert judged("127.0.0.1:5000", f"http://{host}", host) is None, host
    assert judged("127.0.0.1:5000", "http://evil.example:5000", "evil.example:5000") == "http://evil.example:5000"
    assert judged("[::1]:5000", "http://evil.example:5000", "evil.example:5000") == "http://evil.example:5000"
    # (a hunt: an IPv4-mapped loopback listener took itself for a public one, which any page may call)
    assert judged("[::ffff:127.0.0.1]:5000", "http://evil.example:5000", "evil.example:5000") == \
        "http://evil.example:5000"
    # (and an IPv6 origin as configured is the one a browser sends: [::1], not [0:0:0:0:0:0:0:1])
    assert (b"access-control-allow-origin", b"http://[::1]:3000") in \
        cors.Origins(["http://[0:0:0:0:0:0:0:1]:3000"]).allow([(b"origin", b"http://[::1]:3000")])
    assert judged("10.0.0.5:5000", "http://grid.lan:5000", "grid.lan:5000") is None


@pytest.mark.parametrize("role", ["hub", "proxy"])
async def test_a_rebound_name_on_a_loopback_server_is_refused_and_the_refusal_keeps_its_request_id(
        grid: Grid, role: str) -> None:
    """The same through a real hub and proxy (both on 127.0.0.1, as under ``ghubai up``), and the
    proxy's 403 carries the client's request id, as its other refusals do (review)."""
    url = await _front(grid, role, ())
    port = url.rsplit(":", 1)[1]
    answer = await grid.http.post(url + "/v1/chat/completions", json=chat(), headers={
        **KEY, "host": f"evil.example:{port}", "origin": f"http://evil.example:{port}", "x-request-id": "rebound-1"})
    assert answer.status_code == 403 and answer.headers["x-request-id"] == "rebound-1", answer.text
    own = await grid.http.post(url + "/v1/chat/completions", json=chat(), headers={**KEY, "origin": url})
    assert own.status_code == 200
