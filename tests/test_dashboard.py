"""The dashboards in headless Chromium against a running grid: they show its workers and hubs, and
follow a worker that joins or leaves, or a hub that goes down, without a reload. Screenshots go to
``test-artifacts/``."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import trio

from browser import chromium
from conftest import chat, eventually
from ghubai.http11.server import Connection, Request, serve_connection
from ghubai.observability import dashboard
from ghubai.status import render
from test_status import odd_view

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WORKERS = "[...document.querySelectorAll('#workers tr[data-worker]')].map(r => r.dataset.worker).sort().join(',')"
HUB_STATES = "[...document.querySelectorAll('#hubs tr[data-hub] .pill')].map(p => p.textContent).join(',')"
CHARTED = "Number(document.getElementById('chart-rate').dataset.max || 0) > 0"


async def test_hub_dashboard_follows_workers_live(grid: Any, tmp_path: Path) -> None:
    sim_url, _ = await grid.sim(models=["llama3", "qwen2"])
    hub = await grid.hub()
    first = await grid.worker(hub.value, sim_url, name="gpu-a", max_concurrency=8)
    async with chromium(tmp_path / "profile") as page:
        await page.open(hub.value + "/dashboard")
        await page.until(WORKERS, "gpu-a", "the first worker")
        await page.until("document.querySelector('#workers tr[data-worker] .pill').textContent", "ok",
                         "its health, in the hub's word")
        await page.until("document.querySelectorAll('#workers .model.warm').length", 2,
                         "its two models shown as in memory (the engine's /api/ps)")
        await grid.worker(hub.value, sim_url, name="gpu-b")
        await page.until(WORKERS, "gpu-a,gpu-b", "a worker that joined")
        for _ in range(5):
            assert (await grid.http.post(hub.value + "/v1/chat/completions", json=chat("llama3"))).status_code == 200
        await page.until(CHARTED, True, "tokens per second in the chart")
        assert "llama3" in await page.evaluate("document.getElementById('hubs').innerText")
        await page.screenshot(ARTIFACTS / "dashboard-hub.png")
        first.stop()
        await page.until(WORKERS, "gpu-b", "a worker that left")
        assert await page.evaluate("document.getElementById('state').className") == ""  # live, not lost


async def test_proxy_dashboard_shows_the_grid_and_a_hub_going_down(grid: Any, tmp_path: Path) -> None:
    sim_url, _ = await grid.sim()
    hubs = [await grid.hub(), await grid.hub()]
    await grid.worker(hubs[0].value, sim_url, name="rack1-gpu0")
    await grid.worker(hubs[1].value, sim_url, name="rack2-gpu0")
    proxy = await grid.proxy(hubs=tuple(hub.value for hub in hubs))
    async with chromium(tmp_path / "profile") as page:
        await page.open(proxy.value + "/dashboard")
        await page.until(WORKERS, "rack1-gpu0,rack2-gpu0", "the workers of both hubs")
        await page.until(HUB_STATES, "up,up", "both hubs up")
        assert await page.evaluate("document.getElementById('role').textContent") == "proxy"
        await page.screenshot(ARTIFACTS / "dashboard-proxy.png")
        hubs[1].stop()
        await page.until(WORKERS, "rack1-gpu0", "only the workers of the hub still up")
        await page.until("[...document.querySelectorAll('#hubs .pill')].filter(p => p.textContent == 'down').length",
                         1, "the hub that went down")


async def _page_of(grid: Any, data: dict[str, Any]) -> str:
    """The dashboard page, served with ``data`` as its data: what a server of any version might send."""
    body = json.dumps(data).encode()

    async def handle(conn: Connection, request: Request) -> None:
        if request.path == "/dashboard":
            await conn.respond(200, dashboard.PAGE, dashboard.PAGE_TYPE)
        else:
            await conn.respond(200, body)

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=handle), 0,
                                                 host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/dashboard"


async def test_the_page_shows_what_it_can_of_odd_data_and_no_old_figure_as_now(grid: Any, tmp_path: Path) -> None:
    """Regression (hunt): a worker entry from a hub of another version (no ``last_seen_s``) stopped the
    proxy's page ("connection lost", in a loop); and the first-token chart drew its last median,
    minutes old, at the right edge as "now"."""
    steps = [{"t": 1000.0 + 2 * i, "requests_per_s": 0.0, "tokens_per_s": 0.0,
              "ttft_ms": 250.0 if i < 30 else None} for i in range(150)]  # no request for the last 4 minutes
    async with chromium(tmp_path / "profile") as page:
        await page.open(await _page_of(grid, odd_view(steps)))
        await page.until(WORKERS, "v,w", "both workers")
        await page.until("document.getElementById('chart-ttft').dataset.points", "30", "the chart drawn")
        assert (await page.evaluate("document.getElementById('state').textContent")).startswith("live")
        texts = await page.evaluate("[...document.querySelectorAll('#chart-ttft text')].map(t => t.textContent)")
        right = await page.evaluate("Math.max(...document.querySelector('#chart-ttft polyline').getAttribute('points')"
                                    ".split(' ').map(p => Number(p.split(',')[0])))")
        shown = await page.evaluate("document.getElementById('workers').innerText")
    assert not [text for text in texts if text.startswith("now")] and right < 100, (texts, right)
    assert "0 / 1" in shown and "? / ?" in shown


async def test_a_first_token_time_between_steps_without_one_is_drawn(grid: Any, tmp_path: Path) -> None:
    """Review: with a request every 10 s (light traffic), every first-token time sat alone between
    steps without one, and a line of one point draws nothing: the chart was blank."""
    steps = [{"t": 1000.0 + 2 * i, "requests_per_s": 0.5 if i % 5 == 4 else 0.0, "tokens_per_s": 0.0,
              "ttft_ms": 250.0 if i % 5 == 4 else None} for i in range(150)]
    async with chromium(tmp_path / "profile") as page:
        await page.open(await _page_of(grid, {**odd_view(steps), "hubs": []}))
        await page.until("document.getElementById('chart-ttft').dataset.points", "30", "the chart drawn")
        assert await page.evaluate("document.querySelectorAll('#chart-ttft circle').length") == 30


async def test_a_hub_s_odd_worker_entries_cost_neither_the_proxy_s_data_nor_its_page(grid: Any, tmp_path: Path) -> None:
    """Regression (hunt): one hub's worker entry with a list for its id made the proxy's
    ``/dashboard/data`` fail (and ``ghubai status --proxy`` for every hub), and an object for a name or a
    model (``{"toString": 1}``) stopped the page's every render. The proxy passes on text, lists of text
    and numbers; the page shows an object as its JSON."""
    odd = [{"id": ["x"], "name": {"toString": 1}, "models": ["sim", {"toString": 1}], "inflight": "3",
            "max_concurrency": 2, "last_seen_s": 0.1, "draining": "no", "usage": {"a": []}},
           {"id": "w2", "name": "fine", "models": ["sim"], "inflight": 0, "max_concurrency": 1, "last_seen_s": 0.1}]

    async def hub(conn: Connection, request: Request) -> None:
        if request.path == "/api/summary":
            await conn.respond_json(200, {"hub_id": "h", "draining": False, "heartbeat_s": 1, "models": ["sim"],
                                          "loaded": [], "workers": 2, "capacity": 3, "queue": {}})
        else:
            await conn.respond_json(200, {"workers": odd})

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=hub), 0,
                                                 host="127.0.0.1"))
    proxy = await grid.proxy(hubs=(f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}",))

    async def listed() -> bool:
        answer = await grid.http.get(proxy.value + "/dashboard/data")
        return answer.status_code == 200 and len(answer.json()["hubs"][0]["workers"]) == 2

    await eventually(listed, "the hub's two workers in the proxy's data")
    data = (await grid.http.get(proxy.value + "/dashboard/data")).json()
    first = data["hubs"][0]["workers"][0]
    assert (first["id"], first["name"], first["models"], "inflight" in first) == ("['x']", "{'toString': 1}", ["sim"],
                                                                                  False)
    assert "fine" in render(data)
    odd_data = odd_view()
    odd_data["hubs"][0]["workers"] = odd  # as a proxy before this one passed them on
    async with chromium(tmp_path / "profile") as page:
        await page.open(await _page_of(grid, odd_data))
        await page.until("document.querySelectorAll('#workers tr[data-worker]').length", 2, "both workers shown")
        shown = await page.evaluate("document.getElementById('workers').innerText")
    assert '{"toString":1}' in shown and "fine" in shown


async def test_a_first_look_at_the_proxy_s_data_shows_the_workers_as_they_are(grid: Any) -> None:
    """Regression (hunt): a proxy read its hubs' workers in detail every fifth check, and more often
    only once someone looked: the first look (``ghubai status`` from cron) showed a worker idle that
    had been busy for seconds, beside a queue of its requests. A look after none lately waits (a
    check's time at most) for a round that reads them."""
    sim_url, _ = await grid.sim(tokens=200, itl_ms=20, ttft_ms=0)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, name="w1")
    proxy = await grid.proxy(hubs=(hub.value,), health={"interval_s": 60.0})
    await grid.wait_for_model(proxy.value, "sim")
    async with grid.http.stream("POST", hub.value + "/v1/chat/completions", json=chat(stream=True)) as response:
        lines = response.aiter_lines()  # (kept: a loop left with break closes the answer, and the request ends)
        assert (await lines.__anext__()).startswith("data: ")  # the answer has begun: the worker is busy with it

        async def busy_at_the_hub() -> bool:  # (the hub builds its list at most once a second)
            return [worker["inflight"] for worker in await grid.workers(hub.value)] == [1]

        await eventually(busy_at_the_hub, "the hub to list its worker busy")
        data = (await grid.http.get(proxy.value + "/dashboard/data")).json()
    assert [worker["inflight"] for worker in data["hubs"][0]["workers"]] == [1], data["hubs"]
