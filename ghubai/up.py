"""``ghubai up``: the whole grid on one machine, on loopback, in one process: registry, hub,
worker (and the simulator when no Ollama answers) behind the proxy on ``--port``.

With ``--backend auto`` it uses the Ollama at ``OLLAMA_LOCAL_URL`` when that answers
``/api/version``, otherwise it starts the built-in simulator, and its banner says which;
``--backend openai --engine-url URL`` fronts an OpenAI-compatible engine instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import shlex

import httpx
import trio

from ghubai.config import (EngineConfig, HealthConfig, HubConfig, HubEntry, ProxyConfig, RegistryConfig,
                           WorkerConfig)
from ghubai.hub.app import run as run_hub
from ghubai.observability.logs import printable
from ghubai.proxy.server import run as run_proxy
from ghubai.registry.server import run as run_registry
from ghubai.sim.generator import SimOptions, Simulator
from ghubai.sim.server import serve as serve_sim
from ghubai.worker.agent import Worker
from ghubai.worker.agent import run as run_worker

log = logging.getLogger("ghubai.up")

PROBE_TIMEOUT_S = 1.0
SIM_CONCURRENCY = 16
READY_TIMEOUT_S = 20.0  # for the proxy to route a model: its health check, every second, must see the hub
READY_POLL_S = 0.05  # the first wait between looks at the proxy, doubled after each (an access line each)
READY_POLL_MAX_S = 0.5  # ... up to this while it starts, and WAITING_POLL_S once it said it does not serve yet
WAITING_POLL_S = 5.0
DISCOVERY_S = 2.0  # an engine that is still loading is seen serving soon after (a daemon's default: 30 s)
SHOW_MODELS = 20  # the banner's curl line names one of the first models that can chat
SHOW_TIMEOUT_S = 5.0  # for all their /api/show answers


async def _ollama_answers(url: str) -> bool:
    """Whether an Ollama answers at ``url`` within ``PROBE_TIMEOUT_S`` (for the whole answer: one that
    trickles is none)."""
    with trio.move_on_after(PROBE_TIMEOUT_S):
        try:
            async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, trust_env=False) as client:  # (as a worker would)
                return (await client.get(url.rstrip("/") + "/api/version")).status_code == 200
        except httpx.HTTPError:
            return False
    return False


async def _serving(proxy_url: str, ready_by: float, every_s: float = READY_POLL_MAX_S) -> list[str]:
    """The models the proxy routes, once it routes any (its hub healthy, with a worker that serves
    them): from then on a request through it succeeds. Empty when that did not happen by ``ready_by``
    (a trio time, maybe already past: a slow start then says why, not a traceback). It asks every
    ``every_s`` at most: each ask is a line of the proxy's log (20 a second, for as long as an
    engine was down, buried the line that said why)."""
    wait_s = READY_POLL_S
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, trust_env=False) as client:  # a loopback grid: no HTTP_PROXY
        with trio.move_on_at(ready_by):
            while True:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    response = await client.get(proxy_url + "/v1/models")
                    if response.status_code == 200 and (models := [m["id"] for m in response.json()["data"]]):
                        return models
                await trio.sleep(wait_s)
                wait_s = min(2 * wait_s, every_s)
    return []


async def _chat_model(proxy_url: str, models: list[str]) -> str:
    """The first of ``models`` whose engine does not say it only embeds (Ollama's ``/api/show``
    lists a model's capabilities: ``["embedding"]`` for ``all-minilm``, which refuses a chat with a
    400), for the banner's curl line; the first of all when none says (or none does in
    ``SHOW_TIMEOUT_S``: the banner is not held up by a slow engine)."""
    with trio.move_on_after(SHOW_TIMEOUT_S):
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S, trust_env=False) as client:
            for model in models[:SHOW_MODELS]:
                with contextlib.suppress(httpx.HTTPError, ValueError, AttributeError):
                    capabilities = (await client.post(proxy_url + "/api/show", json={"model": model})).json() \
                        .get("capabilities")
                    if not isinstance(capabilities, list) or "completion" in capabilities:
                        return model
    return models[0]


async def up(port: int, backend: str, *, engine_url: str = "", engine_api_key: str = "",
             task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the grid until cancelled. ``backend``: ``sim``, ``ollama`` or ``openai`` (an engine at
    ``engine_url``, with ``engine_api_key`` if it needs one), or ``auto``: Ollama if it answers,
    else the simulator. The banner is printed once a request through the proxy would succeed."""
    ready_by = trio.current_time() + READY_TIMEOUT_S  # what the user waits for the banner, or for why not
    ollama_url = engine_url or os.environ.get("OLLAMA_LOCAL_URL") or EngineConfig().url
    use_ollama = backend == "ollama" or (backend == "auto" and await _ollama_answers(ollama_url))
    async with trio.open_nursery() as nursery:
        if backend == "openai":
            engine = EngineConfig(kind="openai", url=engine_url, api_key=engine_api_key,
                                  discovery_interval_s=DISCOVERY_S)
            source = f"the OpenAI-compatible engine at {engine_url}"
        elif use_ollama:
            engine = EngineConfig(url=ollama_url, api_key=engine_api_key, discovery_interval_s=DISCOVERY_S)
            source = f"Ollama at {ollama_url}"
        else:
            sim_port = await nursery.start(serve_sim, Simulator(SimOptions(max_parallel=SIM_CONCURRENCY)),
                                           "127.0.0.1:0")
            engine = EngineConfig(url=f"http://127.0.0.1:{sim_port}", max_concurrency=SIM_CONCURRENCY)
            source = "the built-in simulator" + (f" (no Ollama answered at {ollama_url})" if backend == "auto" else "")
        token = secrets.token_urlsafe(24)  # only this worker may join the demo hub
        hub_url = await nursery.start(run_hub, HubConfig(listen="127.0.0.1:0", provider_tokens=(token,)))
        registry_url = await nursery.start(
            run_registry, RegistryConfig(listen="127.0.0.1:0", hubs=(HubEntry("local", hub_url),)), None)
        proxy_url = await nursery.start(run_proxy, ProxyConfig(
            listen=f"127.0.0.1:{port}", registry_url=registry_url, health=HealthConfig(interval_s=1.0)))
        workers: list[Worker] = []  # started once its engine has answered (or its first survey gave up)
        worker_started = trio.Event()

        async def start_worker() -> None:  # (the proxy serves meanwhile: its dashboard shows why not yet)
            workers.append(await nursery.start(run_worker, WorkerConfig(
                hub_url=(hub_url.replace("http://", "ws://", 1) + "/gridhub",), provider_token=token,
                name="local", engine=engine)))
            worker_started.set()

        nursery.start_soon(start_worker)
        route = f"proxy -> hub {hub_url} (from registry {registry_url})\n  -> one worker on {source}"
        if models := await _serving(proxy_url, ready_by):
            await worker_started.wait()  # (it has, to serve)
            _banner(proxy_url, route, workers[0], models, await _chat_model(proxy_url, models))
            task_status.started(proxy_url)
            return
        why = printable(workers[0].offer.problem or "it lists no models") if workers else \
            "its engine has not answered yet"
        print(f"\nGhubAi grid on {proxy_url} is not serving yet: the worker on {source}: {why}.\nIt keeps "
              f"trying (start the engine, or try the grid on its simulator: ghubai up --backend sim), and says "
              f"so here once a request would succeed; watch {proxy_url}/dashboard. Ctrl-C stops everything.\n",
              flush=True)
        task_status.started(proxy_url)
        models = await _serving(proxy_url, math.inf, WAITING_POLL_S)
        await worker_started.wait()
        _banner(proxy_url, route, workers[0], models, await _chat_model(proxy_url, models))


def _banner(proxy_url: str, route: str, worker: Worker, models: list[str], model: str) -> None:
    """What a user needs once the grid serves: where, what, and a request that works (the curl
    line uses a chat API the worker's engine serves, and ``model``, one that chats)."""
    apis = worker.offer.apis
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    if apis is None or "openai.chat" in apis:
        path = "/v1/chat/completions"
    elif "ollama.chat" in apis:
        path = "/api/chat"
    else:
        path = ""
    # the model's name is the engine's: quoted for the shell a user pastes this line into
    try_it = (f"Try:\n  curl -N {proxy_url}{path} -H 'Content-Type: application/json' \\\n"
              f"    -d {shlex.quote(json.dumps(chat, separators=(',', ':')))}") if path else \
        "Its engine serves no chat API (see /api/registry)."
    print(f"""
GhubAi grid is up on {proxy_url}: {route}.
Models: {printable(", ".join(models))}
{try_it}
Watch it: {proxy_url}/dashboard (or: ghubai status --proxy {proxy_url})
Ctrl-C stops everything.
""", flush=True)
