"""``ghubai up``: the whole grid on one machine, on loopback, in one process: registry, hub,
worker (and the simulator when no Ollama answers) behind the proxy on ``--port``.

With ``--backend auto`` it uses the Ollama at ``OLLAMA_LOCAL_URL`` when that answers
``/api/version``, otherwise it starts the built-in simulator, and its banner says which.
"""

from __future__ import annotations

import logging
import os
import secrets

import httpx
import trio

from ghubai.config import (EngineConfig, HealthConfig, HubConfig, HubEntry, ProxyConfig, RegistryConfig,
                           WorkerConfig)
from ghubai.hub.app import run as run_hub
from ghubai.proxy.server import run as run_proxy
from ghubai.registry.server import run as run_registry
from ghubai.sim.generator import SimOptions, Simulator
from ghubai.sim.server import serve as serve_sim
from ghubai.worker.agent import run as run_worker

log = logging.getLogger("ghubai.up")

PROBE_TIMEOUT_S = 1.0
SIM_CONCURRENCY = 16


async def _ollama_answers(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT_S) as client:
            return (await client.get(url.rstrip("/") + "/api/version")).status_code == 200
    except httpx.HTTPError:
        return False


async def up(port: int, backend: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    ollama_url = os.environ.get("OLLAMA_LOCAL_URL") or EngineConfig().url
    use_ollama = backend == "ollama" or (backend == "auto" and await _ollama_answers(ollama_url))
    async with trio.open_nursery() as nursery:
        if use_ollama:
            engine = EngineConfig(url=ollama_url)
            source = f"Ollama at {ollama_url}"
        else:
            sim_port = await nursery.start(serve_sim, Simulator(SimOptions(max_parallel=SIM_CONCURRENCY)),
                                           "127.0.0.1:0")
            engine = EngineConfig(url=f"http://127.0.0.1:{sim_port}", max_concurrency=SIM_CONCURRENCY)
            source = "the built-in simulator (no Ollama answered at " + ollama_url + ")"
        token = secrets.token_urlsafe(24)  # only this worker may join the demo hub
        hub_url = await nursery.start(run_hub, HubConfig(listen="127.0.0.1:0", provider_tokens=(token,)))
        registry_url = await nursery.start(
            run_registry, RegistryConfig(listen="127.0.0.1:0", hubs=(HubEntry("local", hub_url),)), None)
        worker = await nursery.start(run_worker, WorkerConfig(
            hub_url=(hub_url.replace("http://", "ws://", 1) + "/gridhub",), provider_token=token, name="local",
            engine=engine))
        proxy_url = await nursery.start(run_proxy, ProxyConfig(
            listen=f"127.0.0.1:{port}", registry_url=registry_url, health=HealthConfig(interval_s=1.0)))
        with trio.move_on_after(10):
            await worker.welcomed.wait()
        model = worker.models[0] if worker.models else "MODEL"
        print(f"""
GhubAi grid is up on {proxy_url}: proxy -> hub {hub_url} (from registry {registry_url})
  -> one worker on {source}.
Models: {", ".join(worker.models) or "(none yet)"}
Try:
  curl -N {proxy_url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":true}}'
Watch it: {proxy_url}/dashboard (or: ghubai status --proxy {proxy_url})
Ctrl-C stops everything.
""", flush=True)
        task_status.started(proxy_url)
