"""A real grid on 127.0.0.1 for the tests: simulator, hubs and workers as real servers on port 0,
each in a cancel scope of its own so a test can stop one (a worker leaves, a hub restarts)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
import trio

from ghubai.config import (EngineConfig, HealthConfig, HubConfig, HubLimits, HubTimeouts, ProxyConfig, ProxyLimits,
                           RegistryConfig, SchedulerConfig, WorkerConfig, load)
from ghubai.http11.server import Connection, Request, serve_connection
from ghubai.hub.app import run as run_hub
from ghubai.proxy.server import run as run_proxy
from ghubai.registry.server import run as run_registry
from ghubai.sim.generator import SimOptions, Simulator
from ghubai.sim.server import serve as serve_sim
from ghubai.worker.agent import Worker
from ghubai.worker.agent import run as run_worker

WAIT_S = 10.0


@dataclass
class Running:
    scope: trio.CancelScope
    value: Any

    def stop(self) -> None:
        self.scope.cancel()


async def _scoped(start: Callable[..., Awaitable[Any]], *args: Any,
                  task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            value = await nursery.start(start, *args)
            task_status.started(Running(scope, value))


async def next_request(conn: h11.Connection, stream: trio.abc.Stream) -> bytes | None:
    """The target of the next whole request a raw h11 server connection reads; None once the client closed."""
    target = b""
    while not isinstance(event := conn.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            if not (data := await stream.receive_some(65536)):
                return None
            conn.receive_data(data)
        elif isinstance(event, h11.Request):
            target = event.target
    return target


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll ``check`` until it holds; fail the test naming ``what`` after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while not await check():
            await trio.sleep(0.02)
        return
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def worker_process(directory: Path, hub_url: str, engine_url: str, *, name: str = "w",
                   drain_timeout_s: float = 30.0, max_concurrency: int = 4) -> subprocess.Popen[bytes]:
    """A worker as a real process (it drains on SIGTERM, as systemd stops it), its file in ``directory``."""
    config = directory / f"worker-{name}.toml"
    config.write_text(f'hub_url = "{hub_url.replace("http", "ws")}/gridhub"\nname = "{name}"\n'
                      f'drain_timeout_s = {drain_timeout_s}\n[engine]\nurl = "{engine_url}"\n'
                      f'max_concurrency = {max_concurrency}\ndiscovery_interval_s = 0.2\n')
    return subprocess.Popen(ghubai_command("worker", "--config", str(config), "--log-level", "warning"),
                            env={**os.environ, "HUB_URL": "", "OLLAMA_LOCAL_URL": ""})


async def exited(process: subprocess.Popen[bytes]) -> int:
    """``process``'s exit status, waited for in a thread: a wait in the event loop would freeze the
    in-process hubs, workers and simulators it may be talking to."""
    return await trio.to_thread.run_sync(process.wait, WAIT_S)


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes = b"\r\n\r\n", data: bytes = b"") -> bytes:
    """What ``stream`` sends (after ``data``, read already) up to ``marker``, or until it closes: a loop
    on ``receive_some`` alone would spin on its b"" at the close."""
    while marker not in data:
        if not (more := await stream.receive_some(65536)):
            break
        data += more
    return data


async def peak_active(sim: Simulator, jobs: list[Callable[[], Awaitable[None]]]) -> int:
    """Run ``jobs`` at once; the most generations the simulator ran at the same time meanwhile."""
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, sim.stats.active)
            await trio.sleep(0.001)

    async with trio.open_nursery() as outer:
        outer.start_soon(watch)
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
        outer.cancel_scope.cancel()
    return peak


async def workers_linked(grid: "Grid", hub_url: str, count: int) -> None:
    async def linked() -> bool:
        return len(await grid.workers(hub_url)) == count

    await eventually(linked, f"{count} worker(s) linked to {hub_url}")


class Grid:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.http = httpx.AsyncClient(timeout=WAIT_S)

    async def sim(self, **options: Any) -> tuple[str, Simulator]:
        options.setdefault("ttft_ms", 5)
        options.setdefault("itl_ms", 1)
        if "models" in options:
            options["models"] = tuple(options["models"])
        sim = Simulator(SimOptions(**options))
        running = await self.nursery.start(_scoped, serve_sim, sim, "127.0.0.1:0")
        return f"http://127.0.0.1:{running.value}", sim

    async def hub(self, listen: str = "127.0.0.1:0", **config: Any) -> Running:
        limits = config.pop("limits", {})
        timeouts = config.pop("timeouts", {})
        scheduler = config.pop("scheduler", {})
        hub_config = HubConfig(listen=listen, heartbeat_s=config.pop("heartbeat_s", 1.0),
                               limits=dataclasses.replace(HubLimits(), **limits),
                               timeouts=dataclasses.replace(HubTimeouts(), **timeouts),
                               scheduler=dataclasses.replace(SchedulerConfig(), **scheduler), **config)
        return await self.nursery.start(_scoped, run_hub, hub_config)

    async def worker(self, hub_url: str | list[str], engine_url: str, *, wait: bool = True,
                     **engine: Any) -> Running:
        urls = [hub_url] if isinstance(hub_url, str) else hub_url
        token = engine.pop("provider_token", "")
        tls = {key: engine.pop(key) for key in ("ca_file", "allow_invalid_certs") if key in engine}
        config = WorkerConfig(
            hub_url=tuple(u.replace("https://", "wss://").replace("http://", "ws://") + "/gridhub" for u in urls),
            provider_token=token, name=engine.pop("name", "w"), weight=engine.pop("weight", 1.0), **tls,
            engine=EngineConfig(url=engine_url, **{"discovery_interval_s": 0.2, **engine}))
        running = await self.nursery.start(_scoped, run_worker, config)
        if wait:
            worker: Worker = running.value
            with trio.fail_after(WAIT_S):
                await worker.welcomed.wait()
        return running

    async def registry(self, path: str | None = None, **config: Any) -> Running:
        registry_config = load("registry", path) if path else RegistryConfig(**config)
        registry_config = dataclasses.replace(registry_config, listen="127.0.0.1:0")
        return await self.nursery.start(_scoped, run_registry, registry_config, path)

    async def proxy(self, registry_url: str = "", hubs: tuple[str, ...] = (), **config: Any) -> Running:
        health = dataclasses.replace(HealthConfig(interval_s=0.2, timeout_s=1.0), **config.pop("health", {}))
        limits = dataclasses.replace(ProxyLimits(), **config.pop("limits", {}))
        proxy_config = ProxyConfig(**{"listen": "127.0.0.1:0", **config}, registry_url=registry_url, hubs=hubs,
                                   health=health, limits=limits)
        return await self.nursery.start(_scoped, run_proxy, proxy_config)

    async def chain(self, **sim: Any) -> tuple[Running, Running]:
        """The whole chain, sim → worker → hub → proxy, serving ``sim`` through the proxy: its hub
        and its proxy (``sim``: the simulator's options)."""
        sim_url, _ = await self.sim(**sim)
        hub = await self.hub()
        await self.worker(hub.value, sim_url)
        proxy = await self.proxy(hubs=(hub.value,))
        await self.wait_for_model(proxy.value, "sim")
        return hub, proxy

    async def wait_for_model(self, proxy_url: str, model: str, hubs_up: int = 1) -> None:
        async def listed() -> bool:
            health = (await self.http.get(proxy_url + "/health")).json()
            return sum(1 for hub in health["hubs"] if hub["up"] and model in hub["models"]) >= hubs_up

        await eventually(listed, f"{hubs_up} hub(s) serving {model} behind the proxy")

    async def fake_engine(self, answer: Callable[[Connection, Request], Awaitable[None]]) -> str:
        """An engine that lists model ``sim`` and answers every other request with ``answer``."""

        async def handle(conn: Connection, request: Request) -> None:
            if request.path == "/api/tags":
                await conn.respond_json(200, {"models": [{"name": "sim"}]})
            else:
                await answer(conn, request)

        listeners = await self.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=handle), 0,
                                                     host="127.0.0.1"))
        return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"

    async def stats(self, sim_url: str) -> dict[str, int]:
        return (await self.http.get(sim_url + "/sim/stats")).json()

    async def workers(self, hub_url: str) -> list[dict[str, Any]]:
        return (await self.http.get(hub_url + "/api/registry")).json()["workers"]


@pytest.fixture
async def grid(nursery: trio.Nursery) -> Any:
    grid = Grid(nursery)
    yield grid
    await grid.http.aclose()
    nursery.cancel_scope.cancel()


def chat(model: str = "sim", stream: bool = False, content: str = "hello grid", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream, **extra}


async def stalled_client(hub_url: str) -> trio.socket.SocketType:
    """A client that sends a streaming request, sees it start, then reads nothing more."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", int(hub_url.rsplit(":", 1)[1])))
    body = json.dumps(chat(stream=True)).encode()
    await sock.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await sock.recv(100)
    return sock


def ghubai_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ghubai", *args]


# What each daemon logs at INFO once it has bound, e.g. "hub 1a2b serving on http://127.0.0.1:40123 (...)",
# "simulator serving sim on 127.0.0.1:40123 (...)", in text or JSON logs.
SERVING = re.compile(r"\bserving (?:\S+ )?on (https?://)?(\[[0-9a-fA-F:.]+\]|[^\s:/\"]+):(\d+)")


class Daemon:
    """A ``ghubai`` role as a real process, its stderr in ``folder/ROLE.log`` and its stdout in
    ``folder/ROLE.out`` (a pipe nobody reads could fill up and block it). Give it port 0
    (``--listen 127.0.0.1:0``) and learn the port it bound with :meth:`url`."""

    def __init__(self, folder: Path, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.name = args[0]
        for count in range(2, 1000):  # a second hub in the same folder writes hub-2.log
            if not (folder / f"{self.name}.log").exists():
                break
            self.name = f"{args[0]}-{count}"
        self.stderr, self.stdout = folder / f"{self.name}.log", folder / f"{self.name}.out"
        with self.stderr.open("wb") as stderr, self.stdout.open("wb") as stdout:
            self.process = subprocess.Popen(ghubai_command(*args), stdout=stdout, stderr=stderr, env=env)

    def log(self) -> str:
        """What it wrote to stderr so far."""
        return self.stderr.read_text(errors="replace")

    def printed(self) -> str:
        """What it wrote to stdout so far."""
        return self.stdout.read_text(errors="replace")

    async def wrote(self, pattern: re.Pattern[str], *, stdout: bool = False,
                    timeout_s: float = WAIT_S) -> re.Match[str]:
        """The first match of ``pattern`` in its stderr (or stdout), once it is there; fails the test if
        the process ends without writing it."""
        found: list[re.Match[str]] = []

        async def written() -> bool:
            ended = self.process.poll() is not None  # before reading: what it wrote before ending counts
            match = pattern.search(self.printed() if stdout else self.log())
            if match is None and ended:
                pytest.fail(f"{self.name} ended ({self.process.returncode}) before writing {pattern.pattern!r}:\n"
                            + self.log()[-3000:])
            found[:] = [match] if match else []
            return bool(found)

        await eventually(written, f"{self.name} to write {pattern.pattern!r}", timeout_s)
        return found[0]

    async def url(self) -> str:
        """The base URL it serves on, from its first ``serving ... on ADDRESS`` line (needs INFO logs)."""
        match = await self.wrote(SERVING)
        return f"{match[1] or 'http://'}{match[2]}:{match[3]}"

    def stop(self) -> int:
        """SIGTERM, then its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        return self.process.wait(timeout=WAIT_S)


class HubProcess:
    """A hub as a real process, for the tests that kill it: on a port the OS picks, or on ``port``
    (a hub restarted where its workers and proxies look for it)."""

    def __init__(self, config: str | None = None, port: int = 0) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="ghubai-hub-"))
        args = ["hub", "--listen", f"127.0.0.1:{port}"]
        if config is not None:
            (self.folder / "hub.toml").write_text(config)
            args += ["--config", str(self.folder / "hub.toml")]
        self.daemon = Daemon(self.folder, *args)
        self.process = self.daemon.process
        self.port, self.url = port, ""

    async def started(self, http: httpx.AsyncClient) -> HubProcess:
        """Once it serves: its ``url`` and ``port`` are those it bound."""
        try:
            self.url = await self.daemon.url()
        except BaseException:
            self.kill()  # not yet in ``hub_processes``
            raise
        self.port = int(self.url.rsplit(":", 1)[1])
        assert (await http.get(self.url + "/health")).status_code == 200
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=WAIT_S)


@pytest.fixture
def hub_processes() -> Any:
    started: list[HubProcess] = []
    yield started
    for hub in started:
        if hub.process.poll() is None:
            hub.kill()
        shutil.rmtree(hub.folder, ignore_errors=True)


def run_ghubai(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ghubai_command(*args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
