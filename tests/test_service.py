"""Each daemon, as a real process, speaks systemd's notify protocol to a socket the test listens on,
the way systemd does for a ``Type=notify`` unit with ``WatchdogSec=``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ghubai.observability.service import Service
from conftest import WAIT_S, Daemon, chat, eventually

WATCHDOG_USEC = 300_000  # a ping every 0.15 s


class NotifySocket:
    """What systemd would hear from the daemon: one datagram a message, ``KEY=value`` lines."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.heard: list[list[str]] = []

    async def bind(self) -> NotifySocket:
        await self.sock.bind(self.path)
        return self

    async def until(self, line: str, timeout_s: float = WAIT_S) -> list[str]:
        """Read messages until one carries ``line``; that message."""
        with trio.fail_after(timeout_s):
            while True:
                message = (await self.sock.recv(4096)).decode().split("\n")
                self.heard.append(message)
                if line in message:
                    return message

    def said(self) -> list[str]:
        return [line for message in self.heard for line in message]


def start(role: str, config: Path, notify: NotifySocket, processes: list[Daemon], *extra: str) -> Daemon:
    """The daemon, its stderr in ``ROLE.log`` beside its config ``ROLE.toml``, in ``processes``."""
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    env.pop("WATCHDOG_PID", None)
    processes.append(Daemon(config.parent, role, "--config", str(config), "--log-level", "info", *extra, env=env))
    return processes[-1]


async def reload_and_stop(process: subprocess.Popen[bytes], notify: NotifySocket) -> None:
    """The watchdog is fed; SIGHUP is a reload between RELOADING=1 and READY=1; SIGTERM says STOPPING=1."""
    for _ in range(3):
        await notify.until("WATCHDOG=1")
    process.send_signal(signal.SIGHUP)
    reloading = await notify.until("RELOADING=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
    await notify.until("READY=1")
    await notify.until("WATCHDOG=1")  # the reload did not end it
    process.send_signal(signal.SIGTERM)
    await notify.until("STOPPING=1")
    with trio.fail_after(WAIT_S):
        while process.poll() is None:
            await trio.sleep(0.02)
    assert process.returncode == 0


@pytest.fixture
async def notify(tmp_path: Path) -> Any:
    notify = await NotifySocket(tmp_path / "notify").bind()
    yield notify
    notify.sock.close()


@pytest.fixture
def processes() -> Any:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


def status_of(message: list[str]) -> str:
    return next(line for line in message if line.startswith("STATUS="))


async def hub_with_key(key: str, tmp_path: Path, notify: NotifySocket,
                       processes: list[Daemon]) -> tuple[subprocess.Popen[bytes], Path, str]:
    """A hub process that takes ``key``: the process, its config file, its URL."""
    config = tmp_path / "hub.toml"
    config.write_text(f'listen = "127.0.0.1:0"\napi_keys = ["{key}"]\n')
    hub = start("hub", config, notify, processes)
    return hub.process, config, await hub.url()


async def test_hub_notifies_and_reloads_its_keys(grid: Any, notify: NotifySocket, processes: list[Daemon],
                                                 tmp_path: Path) -> None:
    hub, config, hub_url = await hub_with_key("old-key", tmp_path, notify, processes)
    ready = await notify.until("READY=1")
    assert status_of(ready) == "STATUS=0 workers, 0 inflight, 0 queued"
    sim_url, _ = await grid.sim()
    await grid.worker(hub_url, sim_url)
    await notify.until("STATUS=1 workers, 0 inflight, 0 queued")

    config.write_text(config.read_text().replace("old-key", "new-key"))
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        async def answer(key: str) -> int:
            response = await http.post(hub_url + "/v1/chat/completions", json=chat(),
                                       headers={"Authorization": f"Bearer {key}"})
            return response.status_code

        assert await answer("old-key") == 200
        hub.send_signal(signal.SIGHUP)
        await notify.until("READY=1")
        assert (await answer("old-key"), await answer("new-key")) == (401, 200)
        await reload_and_stop(hub, notify)


def test_a_reload_names_the_keys_that_changed_and_wait_for_a_restart(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): a changed ``listen`` or queue size was taken silently by a reload, which
    applies only the keys; the operator believed it applied."""
    path = tmp_path / "hub.toml"
    path.write_text('listen = "127.0.0.1:7000"\napi_keys = ["a"]\n')
    service = Service({})
    service.reloads_config("hub", str(path), lambda fresh: "taken", live=("api_keys", "provider_tokens"))
    assert service.reload is not None
    path.write_text('listen = "127.0.0.1:7000"\napi_keys = ["b"]\n')
    service.reload()
    assert "restart" not in caplog.text.replace("take effect on restart)", "")
    path.write_text('listen = "127.0.0.1:7001"\napi_keys = ["b"]\n[limits]\nqueue_size = 3\n')
    service.reload()
    assert "changed, and taking effect on restart only: listen, limits.queue_size" in caplog.text
    assert '"b"' not in caplog.text


async def test_a_broken_config_on_reload_keeps_the_hub_serving(notify: NotifySocket, processes: list[Daemon],
                                                               tmp_path: Path) -> None:
    hub, config, hub_url = await hub_with_key("key", tmp_path, notify, processes)
    await notify.until("READY=1")
    for broken in ('api_keys = "sk-typed-as-a-string"\n'.encode(), "# caf\u00e9\n".encode("latin-1")):
        config.write_bytes(broken)
        hub.send_signal(signal.SIGHUP)
        await notify.until("READY=1")
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            response = await http.get(hub_url + "/v1/models", headers={"Authorization": "Bearer key"})
        assert response.status_code == 200
    await reload_and_stop(hub, notify)
    log = config.with_suffix(".log").read_text()
    assert "api_keys: expected a list of strings, got str" in log and "not UTF-8" in log
    assert "sk-typed-as-a-string" not in log


async def test_worker_is_ready_once_a_hub_welcomed_it(grid: Any, notify: NotifySocket, processes: list[Daemon],
                                                      tmp_path: Path) -> None:
    sim_url, _ = await grid.sim()
    # The worker names its hub before any hub is up. The OS picks the port for a socket that is bound but
    # never listens: a connection to it is refused, as with no hub; no bind to port 0 and no outgoing
    # connection is given that port meanwhile; yet the hub can bind it too (both set SO_REUSEADDR, which
    # Linux allows while the other socket does not listen). It is closed once the hub listens there.
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        config = tmp_path / "worker.toml"
        config.write_text(f'hub_url = ["ws://127.0.0.1:{port}/gridhub"]\nname = "w1"\n'
                          f'[engine]\nurl = "{sim_url}"\nmax_concurrency = 3\n')
        worker = start("worker", config, notify, processes).process
        await notify.until("WATCHDOG=1")
        worker.send_signal(signal.SIGHUP)  # a reload must not announce readiness either
        await notify.until("WATCHDOG=1")
        await notify.until("WATCHDOG=1")
        assert "READY=1" not in notify.said() and "RELOADING=1" not in notify.said()  # alive, but not ready
        await grid.hub(listen=f"127.0.0.1:{port}")
    ready = await notify.until("READY=1")
    assert status_of(ready) == "STATUS=linked to 1/1 hubs, 0/3 inflight, 1 models"
    await reload_and_stop(worker, notify)


async def test_registry_notifies_and_reloads_its_file(notify: NotifySocket, processes: list[Daemon],
                                                      tmp_path: Path) -> None:
    config = tmp_path / "registry.toml"
    config.write_text('listen = "127.0.0.1:0"\n[[hubs]]\nname = "a"\naddress = "http://10.0.0.1:7197"\n')
    registry = start("registry", config, notify, processes).process
    assert status_of(await notify.until("READY=1")) == "STATUS=1 hubs"
    await reload_and_stop(registry, notify)


async def test_proxy_notifies(grid: Any, notify: NotifySocket, processes: list[Daemon], tmp_path: Path) -> None:
    hub = await grid.hub()
    config = tmp_path / "proxy.toml"
    config.write_text(f'listen = "127.0.0.1:0"\nregistry_url = ""\nhubs = ["{hub.value}"]\n'
                      '[health]\ninterval_s = 0.1\n')
    proxy = start("proxy", config, notify, processes).process
    ready = await notify.until("READY=1")
    assert "STATUS=1/1 hubs up, 0 inflight" in ready  # ready once its hubs are checked
    await reload_and_stop(proxy, notify)


async def test_a_draining_daemon_never_says_ready_again(notify: NotifySocket) -> None:
    service = Service({"NOTIFY_SOCKET": notify.path})

    service.reload = lambda: None
    service.ready()
    service.stopping()
    service.reloaded()
    service.notify("END=1")
    await notify.until("END=1")
    assert notify.said() == ["READY=1", "STATUS=", "STOPPING=1", "STATUS=draining", "END=1"]


async def test_sighup_stops_a_role_with_nothing_to_reload(tmp_path: Path) -> None:
    """For ``ghubai sim`` and ``ghubai up`` a SIGHUP is a terminal hang-up: they end, freeing the port."""
    sim = Daemon(tmp_path, "sim", "--listen", "127.0.0.1:0")
    try:
        await sim.url()
        sim.process.send_signal(signal.SIGHUP)
        assert sim.process.wait(timeout=WAIT_S) == 0
    finally:
        sim.process.kill()
        sim.process.wait()


@pytest.mark.parametrize("role, ignored", [("hub", True), ("registry", True), ("sim", False)])
def test_a_reloading_role_ignores_sighup_before_its_imports(role: str, ignored: bool) -> None:
    """Regression (hunt): SIGHUP was ignored from ``cli.main``, after 0.2–0.3 s of imports, and a hub
    sent one in that time died of it (systemd counts that a clean exit: Restart=on-failure left it down).
    The command's entry ignores it before it imports the CLI."""
    spy = ("import signal, sys\n"
           "class Spy:\n"
           "    def find_spec(self, name, path=None, target=None):\n"
           "        if name == 'ghubai.cli':\n"
           "            print('ignored' if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else 'default')\n"
           "            raise SystemExit(0)\n"
           "sys.meta_path.insert(0, Spy())\n"
           f"sys.argv = ['ghubai', {role!r}]\n"
           "from ghubai.launch import main\n"
           "main()\n")
    result = subprocess.run([sys.executable, "-c", spy], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == ("ignored" if ignored else "default"), result.stderr


@pytest.mark.parametrize("command, status", [("hub", 0), ("check", 130)])
def test_a_ctrl_c_while_a_daemon_starts_is_a_clean_stop_not_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                        command: str, status: int) -> None:
    """Regression (hunt): a Ctrl-C in a daemon's first second, before trio listened for signals, was a
    KeyboardInterrupt traceback (during the imports) or a group of one and exit status 1 (in the role's
    setup), which a script cannot tell from a failure. A command cut short (not a daemon) exits 130."""
    spy = ("import sys\n"
           "class Spy:\n"
           "    def find_spec(self, name, path=None, target=None):\n"
           "        if name == 'ghubai.cli':\n"
           "            raise KeyboardInterrupt\n"
           "sys.meta_path.insert(0, Spy())\n"
           f"sys.argv = ['ghubai', {command!r}]\n"
           "from ghubai.launch import main\n"
           "sys.exit(main())\n")
    result = subprocess.run([sys.executable, "-c", spy], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (status, "")
    from ghubai import cli

    def interrupted(args: object) -> int:
        raise BaseExceptionGroup("setup", [KeyboardInterrupt()])

    monkeypatch.setattr(cli, "_hub", interrupted)
    monkeypatch.setattr(cli.logs, "setup", lambda *args: None)  # (this process's logging stays the tests')
    monkeypatch.setattr(cli.tracing, "setup", lambda *args: None)
    monkeypatch.setattr(cli, "ignore_hangups", lambda argv: None)
    assert cli.main(["hub"]) == 0


async def test_a_sighup_while_a_daemon_starts_does_not_end_it(tmp_path: Path) -> None:
    """``kill -HUP`` right after a start (a script that starts, edits and reloads) came in the second
    of imports before trio listens for signals, and the default action ended the hub."""
    hub = Daemon(tmp_path, "hub", "--listen", "127.0.0.1:0")
    try:
        async def ignoring_hangups() -> bool:
            status = Path(f"/proc/{hub.process.pid}/status").read_text()
            ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
            return bool(ignored & 1 << (signal.SIGHUP - 1))

        await eventually(ignoring_hangups, "the starting hub to ignore SIGHUP")
        hub.process.send_signal(signal.SIGHUP)
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"{await hub.url()}/health")).status_code == 200
        assert hub.process.poll() is None
    finally:
        hub.process.kill()
        hub.process.wait()


async def test_a_revoked_provider_token_ends_the_link(grid: Any, notify: NotifySocket, processes: list[Daemon],
                                                     tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text('listen = "127.0.0.1:0"\nprovider_tokens = ["old-token", "new-token"]\n')
    hub = start("hub", config, notify, processes)
    await notify.until("READY=1")
    sim_url, _ = await grid.sim()
    hub_url = await hub.url()
    await grid.worker(hub_url, sim_url, name="old", provider_token="old-token")
    await grid.worker(hub_url, sim_url, name="new", provider_token="new-token")
    config.write_text('listen = "127.0.0.1:0"\nprovider_tokens = ["new-token"]\n')
    hub.process.send_signal(signal.SIGHUP)
    await notify.until("READY=1")

    async def only_new() -> bool:
        return [worker["name"] for worker in await grid.workers(hub_url)] == ["new"]

    await eventually(only_new, "the worker with the revoked token to be gone")


KEYED = 'listen = "127.0.0.1:0"\nprovider_tokens = ["tok-T"]\napi_keys = ["sk-K"]\n'


async def test_a_reload_of_an_empty_or_cut_file_keeps_the_keys_it_runs_with(
        grid: Any, notify: NotifySocket, processes: list[Daemon], tmp_path: Path) -> None:
    """Regression (hunt): a reload that read a file a save had cut after its provider_tokens line, or an
    empty one (a full disk), dropped the hub's api_keys without a word: a request with no key got 200.
    As the registry does with its hub list, a file without the key of a list the hub runs with is
    refused; ``api_keys = []`` still turns client auth off, with a warning."""
    config = tmp_path / "hub.toml"
    config.write_text(KEYED)
    hub = start("hub", config, notify, processes)
    await notify.until("READY=1")
    hub_url = await hub.url()
    sim_url, _ = await grid.sim()
    await grid.worker(hub_url, sim_url, name="w1", provider_token="tok-T")
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        for text in (KEYED.rsplit("api_keys", 1)[0], ""):  # cut after its last but one line; empty
            config.write_text(text)
            hub.process.send_signal(signal.SIGHUP)
            await notify.until("READY=1")
            assert (await http.post(hub_url + "/v1/chat/completions", json=chat())).status_code == 401
        config.write_text(KEYED.replace('["sk-K"]', "[]"))  # on purpose
        hub.process.send_signal(signal.SIGHUP)
        await notify.until("READY=1")
        assert (await http.post(hub_url + "/v1/chat/completions", json=chat())).status_code == 200
    log = hub.log()
    assert "no api_keys key (an empty or half-written file?)" in log and "no provider_tokens key" in log
    assert "api_keys is empty now" in log and "sk-K" not in log


async def test_listing_the_token_a_worker_already_sends_keeps_its_link_and_its_streams(
        grid: Any, notify: NotifySocket, processes: list[Daemon], tmp_path: Path) -> None:
    """Regression (hunt): a hub with no provider_tokens recorded no token for its workers, so the reload
    that listed the very token they sent (securing a grid) cut every link and every stream on them."""
    config = tmp_path / "hub.toml"
    config.write_text('listen = "127.0.0.1:0"\n')
    hub = start("hub", config, notify, processes)
    await notify.until("READY=1")
    hub_url = await hub.url()
    sim_url, _ = await grid.sim(tokens=40, itl_ms=20)
    await grid.worker(hub_url, sim_url, name="w1", provider_token="tok-T")
    async with httpx.AsyncClient(timeout=WAIT_S) as http, \
            http.stream("POST", hub_url + "/v1/chat/completions", json=chat(stream=True)) as response:
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")  # the stream runs
        config.write_text('listen = "127.0.0.1:0"\nprovider_tokens = ["tok-T"]\n')
        hub.process.send_signal(signal.SIGHUP)
        await notify.until("READY=1")
        rest = [line async for line in lines if line]
    assert rest[-1] == "data: [DONE]" and not [line for line in rest if '"error"' in line]
    assert "not listed now" not in hub.log()
