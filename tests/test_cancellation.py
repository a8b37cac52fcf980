"""A client that leaves stops everything done on its behalf, in each of the three moments it can
leave — mid-stream, while waiting for the first token, while queued — straight to the hub and
through the proxy. The simulator's counters prove the engine stopped (or never started)."""

from __future__ import annotations

import pytest
import trio

from conftest import Grid, chat, eventually

MOMENTS = ["mid-stream", "before the first token", "while queued"]


async def grid_entry(grid: Grid, via_proxy: bool, hub_url: str) -> str:
    if not via_proxy:
        return hub_url
    proxy = await grid.proxy(hubs=(hub_url,))
    await grid.wait_for_model(proxy.value, "sim")
    return proxy.value


@pytest.mark.parametrize("via_proxy", [False, True], ids=["hub", "proxy"])
@pytest.mark.parametrize("moment", MOMENTS)
async def test_a_client_that_leaves_stops_the_engine(grid: Grid, moment: str, via_proxy: bool) -> None:
    ttft_ms = 60_000 if moment == "before the first token" else 1
    sim_url, sim = await grid.sim(ttft_ms=ttft_ms, itl_ms=20, tokens=100_000)
    hub = await grid.hub()
    await grid.worker(hub.value, sim_url, max_concurrency=1)
    url = await grid_entry(grid, via_proxy, hub.value) + "/v1/chat/completions"

    async with trio.open_nursery() as background:
        if moment == "while queued":  # another client holds the only slot for the whole test
            async def hold() -> None:
                await grid.http.post(url, json=chat(stream=True))

            background.start_soon(hold)

            async def slot_taken() -> bool:
                return sim.stats.active == 1

            await eventually(slot_taken, "the first request to hold the only slot")

        async def leave() -> None:
            async with grid.http.stream("POST", url, json=chat(stream=True)) as response:
                if moment == "mid-stream":
                    seen = 0
                    async for line in response.aiter_lines():
                        seen += line.startswith("data: ")
                        if seen == 3:
                            return

        async def there() -> bool:  # where the client leaves (mid-stream, it leaves by itself)
            if moment == "while queued":
                return (await grid.http.get(hub.value + "/api/registry")).json()["queued"] == 1
            return sim.stats.started == 1  # the engine has it, its first token a minute away

        async with trio.open_nursery() as asking:
            asking.start_soon(leave)
            if moment != "mid-stream":
                await eventually(there, f"the request {moment}")
                asking.cancel_scope.cancel()
        left_at = trio.current_time()

        if moment == "while queued":
            async def dequeued() -> bool:
                return (await grid.http.get(hub.value + "/api/registry")).json()["queued"] == 0

            await eventually(dequeued, "the queued request to leave the hub's queue")
            assert sim.stats.started == 1  # the queued request never reached the engine
        else:
            async def stopped() -> bool:
                return sim.stats.cancelled == 1 and sim.stats.active == 0

            await eventually(stopped, "the engine to stop generating")
        print(f"{moment} via {'proxy' if via_proxy else 'hub'}: stopped "
              f"{1000 * (trio.current_time() - left_at):.0f} ms after the client left")
        background.cancel_scope.cancel()
