"""``ghubai status`` as an operator runs it over ssh: a real process reading a running grid."""

from __future__ import annotations

import contextlib
import subprocess
from functools import partial
from typing import Any

import pytest
import trio

from conftest import WAIT_S, eventually, ghubai_command
from ghubai.observability.dashboard import capacity, hub_view, worker_health
from ghubai import status as status_module, up
from ghubai.http11.client import tls_client_context
from ghubai.status import render


async def status(*args: str) -> tuple[int, str, str]:
    done = await trio.run_process(ghubai_command("status", *args), capture_stdout=True, capture_stderr=True,
                                  check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_a_peer_that_trickles_its_answer_is_unreadable_within_the_timeout_not_waited_on_for_ever(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (hunt): httpx bounds each read, so a peer that sent an answer's head and then a byte
    now and then held ``ghubai status`` (a cron check) and ``ghubai up``'s look for a local Ollama for ever."""
    async def trickle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # (until the client leaves)
            await stream.receive_some()
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
            while True:
                await stream.send_all(b" ")
                await trio.sleep(0.05)

    listeners = await nursery.start(partial(trio.serve_tcp, trickle, 0, host="127.0.0.1"))
    url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    monkeypatch.setattr(status_module, "TIMEOUT_S", 0.5)
    monkeypatch.setattr(up, "PROBE_TIMEOUT_S", 0.5)
    with trio.fail_after(10):
        with pytest.raises(trio.TooSlowError):
            await status_module.fetch(url, tls_client_context("", False))
        assert not await up._ollama_answers(url)


@pytest.mark.parametrize("body", [b"[]", b'{"status": "ok"}', b'{"hubs": []}', b"[1]",
                                  b'{"hubs": [1], "history": [], "role": "hub"}'])
async def test_json_of_another_service_is_a_one_line_error_not_a_traceback(nursery: trio.Nursery,
                                                                          body: bytes) -> None:
    """Regression (a review): a port whose service answers JSON of another shape (a catch-all route)
    ended ``ghubai status`` in a traceback (KeyError 'hubs'), where a cron check needs one line."""
    async def answer(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                              b"%d\r\nconnection: close\r\n\r\n%s" % (len(body), body))

    listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    code, out, err = await status("--proxy", f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    assert (code, out) == (1, "") and "not a GhubAi dashboard's data" in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1


def test_a_url_without_its_scheme_is_refused_in_the_words_every_other_url_is(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Regression (a hunt): ``--proxy localhost:5000`` gave httpx's words, not the hint to write http://."""
    assert status_module.status("localhost:5000") == 1
    assert capsys.readouterr().err == "ghubai status: expected a http:// or https:// URL, got 'localhost:5000' " \
        "(no scheme: write http://localhost:5000)\n"


async def test_a_url_with_a_path_is_a_one_line_error_that_says_what_to_give(grid: Any) -> None:
    """Regression (hunt): ``--proxy http://host:port/v1`` gave httpx's two lines, the second a link."""
    _, proxy = await grid.chain()
    code, out, err = await status("--proxy", proxy.value + "/v1")
    assert (code, out, len(err.splitlines())) == (1, "", 1) and "HTTP 404" in err and "root URL" in err, err
    # --watch into a pipe: each picture, without the clear-screen escape a terminal needs (hunt: in the pipe)
    watching = await trio.lowlevel.open_process(ghubai_command("status", "--proxy", proxy.value, "--watch", "0.2"),
                                                stdout=subprocess.PIPE)
    try:
        seen = b""
        with trio.fail_after(WAIT_S):
            while seen.count(b"GhubAi") < 2:
                assert watching.stdout is not None
                seen += await watching.stdout.receive_some()
        assert b"\x1b[" not in seen, seen
    finally:
        watching.kill()
        await watching.wait()


async def test_status_shows_hubs_workers_models_and_load(grid: Any) -> None:
    sim_url, _ = await grid.sim(models=["llama3", "qwen2"])
    hubs = [await grid.hub(), await grid.hub()]
    await grid.worker(hubs[0].value, sim_url, name="gpu-a", max_concurrency=6)
    await grid.worker(hubs[1].value, sim_url, name="gpu-b")
    proxy = await grid.proxy(hubs=tuple(hub.value for hub in hubs))
    await grid.wait_for_model(proxy.value, "llama3", hubs_up=2)

    code, out, _ = await status("--proxy", proxy.value)
    assert code == 0, out
    assert "hubs 2/2 up · workers 2 · inflight 0/10 · queued 0" in out
    worker_lines = [line.split() for line in out.splitlines() if line.startswith("gpu-")]
    assert [(row[0], row[1], row[2:4], row[4], row[5]) for row in worker_lines] == [
        ("gpu-a", hubs[0].value, ["llama3,", "qwen2"], "0/6", "ok"),
        ("gpu-b", hubs[1].value, ["llama3,", "qwen2"], "0/4", "ok")]

    code, out, _ = await status("--hub", hubs[0].value)
    assert code == 0 and "gpu-a" in out and "gpu-b" not in out

    hubs[1].stop()

    async def noticed() -> bool:
        return (await grid.http.get(proxy.value + "/ready")).json()["hubs_up"] == 1

    await eventually(noticed, "the proxy to see the hub go")
    code, out, _ = await status("--proxy", proxy.value)
    assert code == 1 and "hubs 1/2 up" in out and f"{hubs[1].value} is down: " in out

    code, _, err = await status("--hub", hubs[1].value)
    assert code == 1 and err.startswith(f"ghubai status: cannot read {hubs[1].value}")
    gone = hubs[1].value.replace("://", "://admin:STATUSPW-2222@")  # (hunt: the password was printed, twice)
    code, _, err = await status("--hub", gone)
    assert code == 1 and "admin:***@" in err and "STATUSPW" not in err, err


@pytest.mark.parametrize("changes, health", [
    ({}, "ok"), ({"inflight": 4}, "full"), ({"last_seen_s": 21.0}, "late"),
    ({"busy": 4}, "full"),  # regression (hunt): filled by another hub's requests, it was "ok" beside a queue
    ({"problem": "credentials refused"}, "engine: credentials refused"), ({"draining": True, "inflight": 4}, "draining"),
])
def test_a_workers_health_is_one_word_for_page_and_terminal(changes: dict[str, Any], health: str) -> None:
    worker = {"inflight": 0, "max_concurrency": 4, "last_seen_s": 1.0, "draining": False, "problem": ""} | changes
    assert worker_health(worker, heartbeat_s=10.0) == health


@pytest.mark.parametrize("worker", [{"name": "w", "models": ["sim"]}, {"inflight": None, "max_concurrency": 2,
                                     "last_seen_s": 1.0}, {"problem": ["x"]}, {"inflight": True, "max_concurrency": 1,
                                                                               "last_seen_s": "1"}])
def test_a_hubs_odd_worker_entry_costs_its_health_word_only(worker: dict[str, Any]) -> None:
    """A proxy shows what any hub sent: an entry without the fields it needs must not stop its
    /health and /dashboard/data from answering (the view of every hub is built with this word)."""
    [shown] = hub_view("h", "http://h", True, None, {}, [worker], 1.0, models=["sim"])["workers"]  # as the proxy
    assert shown["health"] in ("?", "engine: ['x']")


def test_status_of_an_older_server_still_shows_each_workers_health() -> None:
    """A hub or proxy from before the health word was in its data: ``ghubai status`` computes it."""
    worker = {"name": "w", "models": ["sim"], "inflight": 2, "max_concurrency": 2, "last_seen_s": 0.5}
    hub = {"name": "h", "address": "http://h", "up": True, "reason": None, "queued": 0, "models": ["sim"],
           "workers": [worker], "heartbeat_s": 1.0}
    text = render({"role": "hub", "name": "h", "version": "0", "hubs": [hub], "queue": {}, "history": [],
                   "step_s": 5, "window_s": 300})
    assert "full" in text


def test_a_worker_two_hubs_share_counts_once_with_the_slots_every_hub_s_requests_take() -> None:
    """Regression (hunt): behind a proxy, one worker of 2 slots linked to two hubs showed as
    "workers 2 · inflight 2/4" while another hub's requests filled it."""
    def hub(name: str, inflight: int) -> dict[str, Any]:
        worker = {"id": "w1", "name": "gpu0", "models": ["sim"], "inflight": inflight, "busy": 2,
                  "max_concurrency": 2, "last_seen_s": 0.5}
        return {"name": name, "address": f"http://{name}", "up": True, "reason": None, "queued": 2 - inflight,
                "models": ["sim"], "workers": [worker], "heartbeat_s": 1.0}

    hubs = [hub("a", 0), hub("b", 2)]
    text = render({"role": "proxy", "name": "p", "version": "0", "hubs": hubs, "queue": {}, "history": [],
                   "step_s": 5, "window_s": 300})
    assert "workers 1 · inflight 2/2 · queued 2" in text
    assert [line.split()[-4] for line in text.splitlines() if line.startswith("gpu0")] == ["full", "full"]


ODD_WORKERS = [{"name": "w", "models": ["sim"], "inflight": 0, "max_concurrency": 1},  # before last_seen_s
               {"name": "v", "inflight": "x", "max_concurrency": None, "last_seen_s": True}]


def odd_view(history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The data of a proxy before a hub of another version, whose worker entries lack fields."""
    hub = {"name": "h", "address": "http://h", "up": True, "reason": None, "queued": 0, "models": ["sim"],
           "workers": ODD_WORKERS, "heartbeat_s": 1.0}
    return {"role": "proxy", "name": "p", "version": "0", "hubs": [hub], "capacity": capacity([hub]), "queue": {},
            "history": history or [], "step_s": 2.0, "window_s": 300.0}


def test_status_shows_what_it_can_of_odd_worker_entries() -> None:
    """Regression (hunt): ``ghubai status --proxy`` died with a KeyError on a worker entry from a hub
    of an older version (no ``last_seen_s``), and so for every hub of the grid."""
    text = render(odd_view())
    assert "0/1" in text and "? s ago" in text and "?/?" in text


def test_names_and_reasons_reach_the_terminal_as_text_never_as_escapes() -> None:
    """Regression (hunt): a model an engine listed as ``sim ESC]0;title BEL ESC[2K CR fake-ok-worker ...``
    went through worker, hub and proxy into ``ghubai status`` raw: it could set the terminal's title,
    erase lines and print a forged healthy row; an engine's problem text, a new line."""
    hostile = "sim\x1b]0;PWNED\x07\x1b[2K\rfake  h  sim  0/4  ok"
    view = odd_view()
    hub = view["hubs"][0]
    hub["models"], hub["name"] = [hostile], "h\x9b31m"
    hub["workers"] = [{"name": "w\x1b[8m\u202e", "models": [hostile], "inflight": 0, "max_concurrency": 1,
                       "last_seen_s": 0.1, "health": "engine: down\nforged line"}]
    text = render(view)
    assert not any(ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) < 0xa0 or c == "\u202e" for c in text), repr(text)
    assert "\\x1b]0;PWNED\\x07" in text and "forged line" in text and "\nforged line" not in text


def test_columns_stay_in_line_after_wide_characters() -> None:
    """Regression (hunt): columns were padded by ``len``: a worker named in CJK (two cells a character
    in a terminal) pushed the rest of its row two cells right of the others'."""
    lines = status_module._table([["w1", "sim", "ok"], ["w2 日本", "sim", "ok"], ["e\u0301", "sim", "ok"],
                                  ["กี่", "sim", "ok"]])  # (a review: Thai marks have no combining class)
    starts = {status_module._width(line.split("sim")[0]) for line in lines}
    assert len(starts) == 1, lines
