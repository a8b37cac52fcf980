"""Keeping the proxy's picture of the grid current: the hub list from the registry (long-poll), and
active health checks of every hub."""

from __future__ import annotations

import logging

import httpx
import trio

from ghubai.config import ProxyConfig
from ghubai.errors import describe
from ghubai.proxy.hubs import Hub, HubSet

log = logging.getLogger("ghubai.proxy")

LONG_POLL_S = 30.0
RETRY_S = 1.0


async def follow_registry(config: ProxyConfig, hubs: HubSet, http: httpx.AsyncClient) -> None:
    """Long-poll the registry for ever. With the registry down, the last list stays in force."""
    static = [(address, address) for address in config.hubs]
    etag: str | None = None
    failing = False
    while True:
        headers = {"If-None-Match": etag} if etag else {}
        params = {"wait": str(LONG_POLL_S)} if etag else {}
        try:
            response = await http.get(config.registry_url.rstrip("/") + "/hubs", params=params, headers=headers,
                                      timeout=httpx.Timeout(config.health.timeout_s, read=LONG_POLL_S + 5))
            if response.status_code != 304:
                response.raise_for_status()
                entries = [(str(hub["name"]), str(hub["address"])) for hub in response.json()["hubs"]]
                hubs.update(static + entries)
                if response.headers.get("etag") in (None, etag):
                    await trio.sleep(RETRY_S)  # a registry that does not hold the poll must not make us spin
                etag = response.headers.get("etag")
            if failing:
                log.info("registry %s answers again", config.registry_url)
            failing = False
        except Exception as error:  # a hostile or broken registry answer must never stop the proxy
            if not failing:
                log.warning("registry %s unavailable (%s); keeping the last hub list", config.registry_url,
                            describe(error))
            failing = True
            await trio.sleep(RETRY_S)


async def _check(hub: Hub, hubs: HubSet, http: httpx.AsyncClient, timeout_s: float) -> None:
    """``/health`` says the hub serves; ``/api/registry`` (open even when the hub wants API keys)
    what its workers host, and whether the hub is draining."""
    try:
        with trio.fail_after(timeout_s):
            health = await http.get(hub.address + "/health")
            registry = await http.get(hub.address + "/api/registry")
        health.raise_for_status()
        registry.raise_for_status()
        state = registry.json()
        hubs.set_health(hub, not state.get("draining"), "the hub is draining", state=state)
    except Exception as error:  # whatever goes wrong, the hub is down and the proxy serves on
        hubs.set_health(hub, False, f"health check failed: {describe(error)}")


async def check_health(config: ProxyConfig, hubs: HubSet, http: httpx.AsyncClient) -> None:
    """Check every hub each ``interval_s``, and at once when the list gains a hub."""
    while True:
        hubs.check_now = trio.Event()
        async with trio.open_nursery() as nursery:
            for hub in list(hubs.hubs.values()):
                nursery.start_soon(_check, hub, hubs, http, config.health.timeout_s)
        with trio.move_on_after(config.health.interval_s):
            await hubs.check_now.wait()
