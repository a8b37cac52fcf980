"""The registry follows its file: edits, atomic saves, broken edits, long-poll, SIGHUP, edit tools."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from conftest import WAIT_S, Daemon, Grid, eventually, ghubai_command, run_ghubai
from ghubai.config import ConfigError, hub_address, load, parse
from ghubai.proxy.hubs import HubSet
from ghubai.registry import server as registry_server
from ghubai.registry.server import HubList, reload
from ghubai.registry import watch as watch_module
from ghubai.registry.watch import watch

TWO_HUBS = """listen = "127.0.0.1:7001"
[[hubs]]
name = "a"
address = "http://10.0.0.1:7197"
[[hubs]]
name = "b"
address = "http://10.0.0.2:7197"
"""


def save_atomically(path: Path, text: str) -> None:
    temporary = path.with_suffix(".new")
    temporary.write_text(text)
    os.replace(temporary, path)


async def test_serves_its_hubs_with_etag_and_the_seed_shape(grid: Grid, tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(TWO_HUBS)
    registry = await grid.registry(str(path))
    response = await grid.http.get(registry.value + "/hubs")
    assert response.json() == {"version": 1, "hubs": [{"name": "a", "address": "http://10.0.0.1:7197"},
                                                      {"name": "b", "address": "http://10.0.0.2:7197"}]}
    assert response.headers["etag"]
    seed = await grid.http.get(registry.value + "/Registry")
    assert seed.json() == response.json()["hubs"]
    assert (await grid.http.get(registry.value + "/health")).json() == {"status": "ok"}


async def test_long_poll_wakes_on_an_edit_and_times_out_with_304(grid: Grid, tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(TWO_HUBS)
    registry = await grid.registry(str(path))
    first = await grid.http.get(registry.value + "/hubs")
    etag = first.headers["etag"]
    unchanged = await grid.http.get(registry.value + "/hubs", params={"wait": "0.2"},
                                    headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.headers["etag"] == etag

    async def edit_soon() -> None:
        await trio.sleep(0.3)
        save_atomically(path, TWO_HUBS.replace("10.0.0.2", "10.0.0.3"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(edit_soon)
        with trio.fail_after(WAIT_S):  # the poll would hold 60 s: only the edit can end it this soon
            changed = await grid.http.get(registry.value + "/hubs", params={"wait": "60"},
                                          headers={"If-None-Match": etag}, timeout=70)
    assert changed.status_code == 200 and changed.json()["version"] == 2
    assert changed.json()["hubs"][1]["address"] == "http://10.0.0.3:7197"
    assert changed.headers["etag"] != etag


async def test_in_place_edits_count_too_and_a_broken_edit_keeps_the_last_list(grid: Grid, tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(TWO_HUBS)
    registry = await grid.registry(str(path))

    async def hubs() -> list[str]:
        return [hub["name"] for hub in (await grid.http.get(registry.value + "/hubs")).json()["hubs"]]

    with open(path, "a") as file:  # in place: same inode
        file.write('[[hubs]]\nname = "c"\naddress = "http://10.0.0.3:7197"\n')

    async def three() -> bool:
        return await hubs() == ["a", "b", "c"]

    await eventually(three, "the in-place edit to be served")
    save_atomically(path, TWO_HUBS + '[[hubs]]\nname = "d"\naddress = "not a url"\n')

    async def degraded() -> bool:
        return (await grid.http.get(registry.value + "/health")).json()["status"] == "degraded"

    await eventually(degraded, "the registry to report the broken edit")
    health = (await grid.http.get(registry.value + "/health")).json()
    assert "hubs[2].address" in health["config_error"]
    assert await hubs() == ["a", "b", "c"]
    save_atomically(path, TWO_HUBS)

    async def healed() -> bool:
        return await hubs() == ["a", "b"] and (await grid.http.get(registry.value + "/health")).json() == {
            "status": "ok"}

    await eventually(healed, "the fixed file to be served")


async def test_an_empty_file_keeps_the_last_list_and_hubs_equals_nothing_empties_it(grid: Grid,
                                                                                    tmp_path: Path) -> None:
    """Regression (review): an empty file (a save on a full disk) parsed as valid with no hubs, and
    the registry served an empty list: every proxy then answered 503."""
    path = tmp_path / "registry.toml"
    path.write_text(TWO_HUBS)
    registry = await grid.registry(str(path))
    path.write_text("")

    async def degraded() -> bool:
        return "no hubs key" in (await grid.http.get(registry.value + "/health")).json().get("config_error", "")

    await eventually(degraded, "the registry to refuse the empty file")
    assert len((await grid.http.get(registry.value + "/hubs")).json()["hubs"]) == 2
    save_atomically(path, "hubs = []\n")

    async def emptied() -> bool:
        return (await grid.http.get(registry.value + "/hubs")).json()["hubs"] == []

    await eventually(emptied, "an explicit empty list to be served")


async def test_a_registry_started_on_a_file_that_names_no_hubs_serves_no_list_until_one_does(
        grid: Grid, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (operator's path): the guard above held only while the registry ran: one
    restarted (a reboot) on the empty file published an empty list, and every proxy dropped every
    hub. Now /hubs answers 503 (a proxy keeps its last list) until the file names its hubs."""
    path = tmp_path / "registry.toml"
    path.write_text('listen = "127.0.0.1:0"\n')
    registry = await grid.registry(str(path))
    refused = await grid.http.get(registry.value + "/hubs")
    assert refused.status_code == 503 and "no hubs key" in refused.json()["error"]["message"]  # OpenAI's shape
    assert (await grid.http.get(registry.value + "/health")).json()["status"] == "degraded"
    assert (await grid.http.get(registry.value + "/Registry")).status_code == 503  # (review) the seed's shape too
    caplog.set_level(logging.WARNING, logger="ghubai.proxy")
    await grid.proxy(registry_url=registry.value)  # (first-run hunt: it said "HTTP 503", not why)

    async def told() -> bool:
        return any("HTTP 503: " in record.message and "no hubs key" in record.message for record in caplog.records)

    await eventually(told, "the proxy to log why its registry has no list")
    save_atomically(path, TWO_HUBS)

    async def served() -> bool:
        return (await grid.http.get(registry.value + "/hubs")).status_code == 200

    await eventually(served, "the hubs to be served once the file names them")
    assert len((await grid.http.get(registry.value + "/hubs")).json()["hubs"]) == 2
    assert (await grid.http.get(registry.value + "/health")).json() == {"status": "ok"}


async def test_sighup_reads_the_file_again(tmp_path: Path) -> None:
    """SIGHUP reads the file whatever the watcher saw (an edit its ``stat`` cannot show: a network
    file system's cached attributes, two same-size edits within one timestamp tick): a file that
    nothing changed is read again, and its error counted again."""
    async with registry_daemon(tmp_path) as (registry, path, url, http):
        async def refused(count: int) -> bool:
            return f"ghubai_registry_reload_errors_total {count}.0" in (await http.get(url + "/metrics")).text

        path.write_text(TWO_HUBS + "oops")
        await eventually(partial(refused, 1), "the watcher to see the broken edit")
        registry.process.send_signal(signal.SIGHUP)
        await eventually(partial(refused, 2), "SIGHUP to read the file again")
        assert (await http.get(url + "/hubs")).json()["hubs"][0]["name"] == "a"
        assert registry.stop() == 0


@contextlib.asynccontextmanager
async def registry_daemon(tmp_path: Path) -> AsyncIterator[tuple[Daemon, Path, str, httpx.AsyncClient]]:
    """A registry process serving ``TWO_HUBS`` from its file, and a client."""
    path = tmp_path / "registry.toml"
    path.write_text(TWO_HUBS)
    registry = Daemon(tmp_path, "registry", "--config", str(path), "--listen", "127.0.0.1:0")
    try:
        url = await registry.url()
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            yield registry, path, url, http
    finally:
        registry.process.kill()
        registry.process.wait()


async def test_a_stopping_registry_answers_its_held_long_polls_304(tmp_path: Path) -> None:
    """Regression (hunt): SIGTERM cancelled the held long-polls, which hypercorn answered 500, and every
    proxy logged the registry's failure at each restart. They are answered as the list stands."""
    async with registry_daemon(tmp_path) as (registry, _, url, http):
        etag = (await http.get(url + "/hubs")).headers["etag"]
        answers: list[int] = []

        async def poll() -> None:
            answers.append((await http.get(url + "/hubs", params={"wait": "60"},
                                           headers={"If-None-Match": etag})).status_code)

        async def held() -> bool:
            return "ghubai_registry_long_polls 1.0" in (await http.get(url + "/metrics")).text

        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await eventually(held, "the long-poll to be held")
            registry.process.terminate()
        assert answers == [304]
        assert registry.process.wait(timeout=WAIT_S) == 0


def test_add_and_remove_hub_rewrite_the_file_and_keep_other_keys(tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text('listen = "0.0.0.0:7009"\n')
    path.chmod(0o640)
    if os.geteuid() == 0:  # as under install-systemd.sh: root's file, the service's group
        os.chown(path, 0, 4242)
    assert run_ghubai("registry", "add-hub", "one", "http://10.0.0.1:7197", "--config", str(path)).returncode == 0
    assert run_ghubai("registry", "--config", str(path), "add-hub", "two", "http://10.0.0.2:7197").returncode == 0
    duplicate = run_ghubai("registry", "add-hub", "one", "http://10.0.0.9:7197", "--config", str(path))
    assert duplicate.returncode != 0 and "already listed" in duplicate.stderr
    bad = run_ghubai("registry", "add-hub", "three", "ftp://nowhere", "--config", str(path))
    assert bad.returncode != 0 and "address" in bad.stderr
    assert run_ghubai("registry", "remove-hub", "one", "--config", str(path)).returncode == 0
    assert run_ghubai("registry", "remove-hub", "one", "--config", str(path)).returncode != 0
    import tomllib

    document = tomllib.loads(path.read_text())
    assert document == {"listen": "0.0.0.0:7009", "hubs": [{"name": "two", "address": "http://10.0.0.2:7197"}]}
    assert [p.name for p in tmp_path.iterdir()] == ["registry.toml"]  # no temporary file left behind
    kept = path.stat()
    assert (kept.st_mode & 0o777, kept.st_gid if os.geteuid() == 0 else 4242) == (0o640, 4242)


def test_init_writes_every_role_and_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run_ghubai("init", "--dir", str(tmp_path)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub.toml", "proxy.toml", "registry.toml", "worker.toml"]
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o640}  # they come to hold tokens and keys
    (tmp_path / "hub.toml").write_text("kept")
    again = run_ghubai("init", "--dir", str(tmp_path))
    assert again.returncode == 1 and "hub.toml" in again.stderr
    assert (tmp_path / "hub.toml").read_text() == "kept"
    assert run_ghubai("init", "--dir", str(tmp_path), "--force").returncode == 0
    assert (tmp_path / "hub.toml").read_text() != "kept"


def test_check_prints_each_error_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "hub-2.toml"
    path.write_text('listen = "nowhere"\ncolour = 1\n[limits]\nqueue_size = "x"\n')
    result = run_ghubai("check", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"{path}: colour: unknown key",
        f"{path}: listen: expected HOST:PORT, got 'nowhere'",
        f"{path}: limits.queue_size: expected an integer, got 'x'"]
    good = tmp_path / "anything.toml"
    good.write_text('hub_url = "ws://h:1/gridhub"\n')
    assert run_ghubai("check", str(good)).returncode == 1  # no role in the name
    assert run_ghubai("check", str(good), "--role", "worker").returncode == 0


async def test_weak_and_listed_etags_count_as_a_match(grid: Grid, tmp_path: Path) -> None:
    path = tmp_path / "registry.toml"
    path.write_text(TWO_HUBS)
    registry = await grid.registry(str(path))
    etag = (await grid.http.get(registry.value + "/hubs")).headers["etag"]
    for given in (f"W/{etag}", f'"other", {etag}', "*"):
        answer = await grid.http.get(registry.value + "/hubs", params={"wait": "0.1"},
                                     headers={"If-None-Match": given})
        assert answer.status_code == 304, given


async def test_check_sees_a_registry_file_as_the_registry_does(grid: Grid, tmp_path: Path) -> None:
    """Regression (hunt): ``ghubai check`` called a file with no ``hubs`` key valid, ``init``'s own
    among them (its hubs are an example in comments), while the registry refused it: 503 on /hubs,
    "degraded". Check now says so, until the file names its hubs."""
    assert run_ghubai("init", "--dir", str(tmp_path)).returncode == 0
    path = tmp_path / "registry.toml"
    checked = run_ghubai("check", str(path))
    assert checked.returncode == 1 and "no hubs key" in checked.stdout + checked.stderr
    registry = await grid.registry(str(path))
    assert (await grid.http.get(registry.value + "/hubs")).status_code == 503
    with trio.fail_after(WAIT_S):  # (a review: no list yet "matched" no If-None-Match, held for the wait)
        assert (await grid.http.get(registry.value + "/hubs", params={"wait": "300"})).status_code == 503
    assert run_ghubai("registry", "add-hub", "hub1", "http://10.0.0.5:7197", "--config", str(path)).returncode == 0
    assert run_ghubai("check", str(path)).returncode == 0

    async def served() -> bool:
        answer = await grid.http.get(registry.value + "/hubs")
        return answer.status_code == 200 and len(answer.json()["hubs"]) == 1

    await eventually(served, "the registry to serve the hub added")


async def test_a_broken_ipv6_address_or_a_toml_bomb_keeps_the_registry_serving_the_last_list(
        grid: Grid, tmp_path: Path) -> None:
    """Regressions (hunt): ``http://[fd00::2:7197`` (a bracket forgotten) made urlsplit raise inside
    the check, and the registry died, and died again at each restart on that file; ``ghubai check``
    and ``add-hub`` printed a traceback. So did 3,000 nested ``[`` (tomllib's recursion)."""
    path = tmp_path / "registry.toml"
    path.write_text(TWO_HUBS)
    registry = await grid.registry(str(path))
    for broken, said in ((TWO_HUBS.replace("http://10.0.0.2:7197", "http://[fd00::2:7197"), "Invalid IPv6 URL"),
                         (TWO_HUBS.replace("http://10.0.0.2:7197", "http://[zz]:1"), "IPv4 or IPv6"),
                         ("x = " + "[" * 3000, "not valid TOML")):
        save_atomically(path, broken)

        async def degraded() -> bool:
            health = (await grid.http.get(registry.value + "/health")).json()
            return health["status"] == "degraded" and said in health["config_error"]

        await eventually(degraded, f"the registry to refuse {broken[-60:]!r} and serve on")
        assert len((await grid.http.get(registry.value + "/hubs")).json()["hubs"]) == 2
        check = run_ghubai("check", str(path))
        assert check.returncode == 1 and said in check.stdout + check.stderr and "Traceback" not in check.stderr
        save_atomically(path, TWO_HUBS)


async def test_a_same_size_edit_within_a_coarse_timestamp_s_tick_is_seen(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (hunt): on a filesystem of 1-second timestamps (ext3, old ext4, some NFS), a second
    in-place write of the same size within the tick has the same signature, and was missed for good."""
    path = tmp_path / "registry.toml"
    path.write_text("a = 1\n")
    stamp = time.time_ns()  # every write in one tick: the signature tells nothing apart but the size
    monkeypatch.setattr(watch_module, "signature", lambda name: (1, 1, os.stat(name).st_size, stamp, stamp))
    monkeypatch.setattr(watch_module, "RACY_NS", 3600 * 10**9)  # (however slow this machine is)
    read: list[str] = []
    changed = trio.Event()

    def on_change() -> bool:
        read.append(path.read_text())
        changed.set()
        return True

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(watch, str(path), on_change, 0.01))
        path.write_text("a = 2\n")
        with trio.fail_after(WAIT_S):
            await changed.wait()
        nursery.cancel_scope.cancel()
    assert read == ["a = 2\n"]


async def test_a_file_made_readable_by_chmod_is_seen(tmp_path: Path) -> None:
    """Regression (hunt): a list saved with a mode the service cannot read (``mktemp``'s 0600, then
    ``mv``) and fixed with ``chmod`` or ``chown`` was never read again: those change the ctime only,
    which the watcher did not look at."""
    path = tmp_path / "registry.toml"
    path.write_text(TWO_HUBS)
    changed = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(watch, str(path), changed.set, 0.01))
        path.chmod(0o600)
        with trio.fail_after(WAIT_S):
            await changed.wait()
        nursery.cancel_scope.cancel()


async def test_an_edit_read_while_no_file_descriptor_was_left_is_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (hunt): an edit saved while a flood of long polls held every file descriptor could not
    be read (EMFILE), and was never read again: the old list was served until the next edit."""
    path = tmp_path / "registry.toml"
    path.write_text(TWO_HUBS)
    hub_list = HubList()
    assert reload(hub_list, str(path)) and len(hub_list.hubs) == 2
    real_read = registry_server.read_text

    def exhausted(name: str) -> str:
        raise ConfigError([f"{name}: cannot read: Too many open files"], passing=True)

    monkeypatch.setattr(registry_server, "read_text", exhausted)
    calls = []

    def on_change() -> bool:
        calls.append(reload(hub_list, str(path)))
        if len(calls) == 2:  # the descriptors are back
            monkeypatch.setattr(registry_server, "read_text", real_read)
        return calls[-1]

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(watch, str(path), on_change, 0.01))
        save_atomically(path, TWO_HUBS.replace('name = "b"', 'name = "c"'))
        await eventually(lambda: _true(len(calls) >= 3), "the edit read again")
        nursery.cancel_scope.cancel()
    assert calls[:3] == [False, False, True] and [hub.name for hub in hub_list.hubs] == ["a", "c"]


async def _true(value: bool) -> bool:
    return value


async def test_connections_past_max_connections_get_a_503_not_every_file_descriptor(grid: Grid) -> None:
    """Regression (hunt): the registry had no connection cap (and its unit no file limit): 1,000 held long
    polls took every descriptor, and the proxies' polls and plain GETs timed out."""
    registry = await grid.registry(max_connections=2)
    port = int(registry.value.rsplit(":", 1)[1])
    held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]  # idle, as a held poll is
    async with httpx.AsyncClient() as client:
        refused = await client.get(registry.value + "/hubs")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
        for stream in held:
            await stream.aclose()

        async def served() -> bool:
            return (await client.get(registry.value + "/hubs")).status_code == 200

        await eventually(served, "a connection served again once the others are gone")


async def test_add_hub_run_several_times_at_once_loses_no_hub(tmp_path: Path) -> None:
    """Regression (hunt): each of four ``add-hub`` at once said "added", and the file kept one to
    three of them: each read the file, added its hub and replaced the file."""
    path = tmp_path / "registry.toml"
    path.write_text("hubs = []\n")
    names = [f"h{index}" for index in range(6)]
    async with trio.open_nursery() as nursery:
        for index, name in enumerate(names):
            nursery.start_soon(partial(trio.run_process, ghubai_command(
                "registry", "add-hub", name, f"http://10.0.1.{index}:7197", "--config", str(path)),
                capture_stdout=True))
    assert sorted(hub.name for hub in parse("registry", path.read_text()).hubs) == names


def test_one_hub_however_its_address_is_spelled() -> None:
    """Regression (hunt): ``http://hub1:7197``, ``http://HUB1:7197/`` and ``HTTP://hub1:7197`` were
    three hubs to the registry's check and to the proxy: three health checks, three turns in the
    round robin, three rows in /health for one hub."""
    spellings = ["http://hub1:7197", "http://HUB1:7197/", "HTTP://hub1:7197", "http://[FD00::1]:80/",
                 "http://[fd00:0::0:1]"]  # (hunt: an IPv6 address spelled two ways was two hubs)
    assert {hub_address(spelling) for spelling in spellings} == {"http://hub1:7197", "http://[fd00::1]"}
    text = "".join(f'[[hubs]]\nname = "n{index}"\naddress = "{address}"\n' for index, address in enumerate(spellings))
    with pytest.raises(ConfigError, match=r"hub addresses must be unique: http://\[fd00::1\], http://hub1:7197"):
        parse("registry", text)
    hubs = HubSet(1.0, ssl.create_default_context())
    hubs.update([(f"n{index}", address) for index, address in enumerate(spellings)])
    assert sorted(hubs.hubs) == ["http://[fd00::1]", "http://hub1:7197"]


def test_an_ipv4_address_is_one_spelling_or_refused() -> None:
    """Regression (hunt): ``127.1``, ``2130706433`` and ``[::ffff:127.0.0.1]`` passed the check of
    unique addresses beside ``127.0.0.1``, one hub listed as four; ``127.000.000.001`` was accepted
    and never checked up (httpx refuses it), and ``010.0.0.5`` is 8.0.0.5 to the resolver."""
    assert hub_address("http://[::ffff:127.0.0.1]:7197") == "http://127.0.0.1:7197"
    for host in ("127.1", "2130706433", "127.000.000.001", "010.0.0.5", "10.0.0.0x5", "0x7f.1"):
        with pytest.raises(ConfigError, match="is not a host name or IP address"):
            parse("registry", f'[[hubs]]\nname = "a"\naddress = "http://{host}:7197"\n')
    text = "".join(f'[[hubs]]\nname = "{name}"\naddress = "http://{host}:7197"\n'
                   for name, host in (("a", "127.0.0.1"), ("b", "[::ffff:127.0.0.1]")))
    with pytest.raises(ConfigError, match="hub addresses must be unique: http://127.0.0.1:7197"):
        parse("registry", text)
    named = parse("registry", '[[hubs]]\nname = "a"\naddress = "http://gpu-1.lan:7197"\n')
    assert [hub.address for hub in named.hubs] == ["http://gpu-1.lan:7197"]


@pytest.mark.parametrize("name", ["x" * 129, "hub\\u001b[31m", "a\\tb", "hub\\u009b31m", "a\\u0085b"])  # (C1 too)
def test_a_hub_s_name_is_held_to_what_a_worker_s_is(name: str) -> None:
    """Regression (hunt): a registry took a 3,000-character name and control characters, which logs,
    pages and metrics then showed, where a worker's name is at most 128 printable characters."""
    with pytest.raises(ConfigError, match="hubs\\[0\\].name: must be at most 128 characters, none of them a control"):
        parse("registry", f'[[hubs]]\nname = "{name}"\naddress = "http://10.0.0.1:7197"\n')
    assert parse("registry", f'[[hubs]]\nname = "{"é" * 128}"\naddress = "http://10.0.0.1:7197"\n').hubs


def test_a_token_in_a_hub_address_s_query_or_path_is_never_echoed() -> None:
    """Regression (hunt): the refusal of ``http://10.0.0.2:7197/?api_key=...`` quoted the address
    whole, in the registry's log and its unauthenticated /health, and in the proxy's startup error."""
    for address in ("http://10.0.0.2:7197/?api_key=PASSWORD", "http://10.0.0.2:7197/v1?token=PASSWORD",
                    "http://10.0.0.2:7197/#PASSWORD", "http://10.0.0.2:7197/PASSWORD/", "ftp://h:1/PASSWORD",
                    "http://[fd00::2:7197/?api_key=PASSWORD", "http://[zz]:7197/?api_key=PASSWORD",
                    "//[zz]/?api_key=PASSWORD", "http:\\t//[zz]/?api_key=PASSWORD"):
        for role, text in (("registry", f'[[hubs]]\nname = "a"\naddress = "{address}"\n'),
                           ("proxy", f'registry_url = ""\nhubs = ["{address}"]\n')):
            with pytest.raises(ConfigError) as caught:
                parse(role, text)
            assert "PASSWORD" not in str(caught.value) and "/…" in str(caught.value), caught.value


def test_a_file_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Regression (hunt): Windows Notepad and PowerShell 5 save UTF-8 with a byte-order mark, which
    was refused as "Invalid statement (at line 1, column 1)"."""
    path = tmp_path / "registry.toml"
    path.write_bytes(b"\xef\xbb\xbf" + '[[hubs]]\nname = "a"\naddress = "http://10.0.0.1:7197"\n'.encode())
    assert [hub.name for hub in load("registry", str(path)).hubs] == ["a"]


async def test_a_proxy_hears_at_once_that_its_registry_is_back(grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (hunt): after a failed poll the proxy asked again as a long poll of the list it
    held, which a registry back with that list holds for 30 s: "registry ... unavailable" stayed its
    last word for half a minute after the registry answered again. A poll after a failure is not held."""
    from ghubai.http11.server import Connection, Request, serve_connection

    asked: list[str] = []

    async def registry(conn: Connection, request: Request) -> None:
        asked.append(request.target)
        if len(asked) == 1:
            await conn.respond_json(200, {"hubs": [{"name": "a", "address": "http://127.0.0.1:9"}]},
                                    headers={"etag": '"v1"'})
        elif len(asked) == 2:
            await conn.respond_json(500, {"error": "restarting"})
        elif "wait=" in request.target:
            await trio.sleep_forever()  # a held poll: the list has not changed
        else:
            await conn.respond(304, b"")

    listeners = await grid.nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=registry), 0,
                                                 host="127.0.0.1"))
    caplog.set_level("INFO", "ghubai.proxy")
    await grid.proxy(registry_url=f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    async def heard() -> bool:
        return any("answers again" in record.message for record in caplog.records)

    await eventually(heard, "the proxy to say its registry answers again")
    assert "wait=" not in asked[2], asked


def test_the_registry_logs_what_a_new_list_changed_in_a_bounded_line() -> None:
    """Review (hunt): each change logged the whole list, half a megabyte for thousands of hubs, where
    an operator who edited the file wants to see what the edit did."""
    from ghubai.config import HubEntry
    from ghubai.registry.server import _changes

    first = (HubEntry("a", "http://a:7197"), HubEntry("b", "http://b:7197"))
    assert _changes((), first, first=True) == "a=http://a:7197, b=http://b:7197"
    assert _changes((), first) == "added a=http://a:7197, added b=http://b:7197"  # (after an empty list)
    assert _changes(first, (HubEntry("b", "http://b2:7197"), HubEntry("c", "http://c:7197"))) == \
        "added c=http://c:7197, b moved to http://b2:7197, removed a"
    assert _changes(first, first[::-1]) == "the same hubs, in another order" and _changes((), ()) == "(none)"
    many = _changes((), tuple(HubEntry(f"h{n}", f"http://h{n}:7197") for n in range(5000)), first=True)
    assert len(many) < 1000 and many.endswith(" and 4980 more")


def test_an_address_spelled_anew_is_no_move_and_no_new_version(caplog: pytest.LogCaptureFixture) -> None:
    """Regression (a hunt): ``HTTP://h:7197/`` for ``http://h:7197`` was logged as the hub's move, and
    the new version woke every proxy, for a hub they already took as the same."""
    from ghubai.config import HubEntry

    hub_list = HubList()
    hub_list.publish((HubEntry("a", "HTTP://A:7197/"),))
    version, etag = hub_list.version, hub_list.etag
    assert hub_list.entries() == [{"name": "a", "address": "http://a:7197"}]
    with caplog.at_level(logging.INFO, logger="ghubai.registry"):
        for spelling in ("http://a:7197", "http://a:7197/", "Http://a:7197"):
            hub_list.publish((HubEntry("a", spelling),))
    assert (hub_list.version, hub_list.etag) == (version, etag) and "moved" not in caplog.text


async def test_a_worker_pointed_at_a_registry_or_proxy_hears_what_to_dial(
        grid: Grid, caplog: pytest.LogCaptureFixture) -> None:
    """Regression (first-run hunt): a worker whose hub_url named a proxy's or a registry's port logged
    their 404 (the registry's an HTML page) for ever, with no word of what to dial; and a client that
    asked a registry for a page it has no got that HTML page, where hub and proxy answer JSON."""
    registry = await grid.registry(hubs=())
    unknown = await grid.http.get(registry.value + "/v1/models")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "Unknown endpoint: GET /v1/models"
    proxy = await grid.proxy(hubs=(), api_keys=("k",))  # (hunt: a proxy with keys said 401, a wrong token)
    sim_url, _ = await grid.sim()
    caplog.set_level(logging.ERROR, logger="ghubai.worker")
    for url in (registry.value, proxy.value):
        caplog.clear()
        worker = await grid.worker(url, sim_url, wait=False)

        async def told() -> bool:
            return "no /gridhub there: hub_url must name a hub, not a proxy or a registry" in caplog.text

        await eventually(told, "the worker to say what its hub_url must name")
        worker.stop()


def test_a_registry_refusal_is_read_for_its_words_briefly() -> None:
    """What the proxy's log quotes of a registry's error answer: its message in either dialect's
    shape, printable and at most 300 characters; nothing for an answer that is not such JSON."""
    from ghubai.proxy.follow import _said_by

    assert _said_by(b'{"error": {"message": "no hubs key"}}') == ": no hubs key"
    assert _said_by(b'{"error": "no hubs key"}') == ": no hubs key"
    assert _said_by(b"<html>503</html>") == "" and _said_by(b"[1]") == "" and _said_by(b'{"error": 3}') == ""
    assert len(_said_by(('{"error": "' + "x\\u001b" * 1000 + '"}').encode())) <= 302
