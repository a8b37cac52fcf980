"""Random bodies, headers, methods and paths at the hub and the proxy: never a 5xx, never a crash,
and nothing left behind (no slot taken, nothing queued, no generation running)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import WAIT_S, Daemon, eventually

SCALARS = st.none() | st.booleans() | st.integers(-10, 64) | st.floats(width=32) | st.text(max_size=12)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=10)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", ""]) | JSON},
                                          optional={"content": JSON}), max_size=3)
CHATS = st.fixed_dictionaries(
    {"model": st.sampled_from(["sim", "no-such-model", ""]) | JSON, "messages": MESSAGES | JSON},
    optional={"stream": st.booleans() | JSON, "stream_options": JSON, "max_tokens": st.integers(-3, 8) | JSON})
# what issue 12 found: odd Unicode (lone surrogates too) in model names, deep nesting, NaN and
# Infinity, huge arrays
ODD_NAMES = st.text(max_size=40) | st.sampled_from(["x\\udfff", "\\ud800", "\\u0000", "a\\nb", "\\u2028"])
HOSTILE = (ODD_NAMES.map(lambda name: ('{"model": "%s", "messages": [{"role": "user", "content": "x"}]}'
                                       % name.replace('"', "")).encode("utf-8", "surrogatepass"))
           | st.integers(200, 5000).map(lambda depth: b'{"model": "sim", "messages": ' + b"[" * depth
                                        + b"]" * depth + b"}")
           | st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]).map(
               lambda value: b'{"model": "sim", "messages": [{"role": "user", "content": "x"}], "temperature": '
               + value + b"}")
           | st.integers(1000, 50_000).map(lambda size: json.dumps({"model": "sim", "messages": [1] * size}).encode()))
BODIES = st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()) | CHATS.map(
    lambda v: json.dumps(v).encode()) | HOSTILE
RESERVED = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", "te", "keep-alive"}
HEADERS = st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True).filter(lambda h: h not in RESERVED),
                          st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True), max_size=5)
REQUESTS = st.tuples(st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
                     st.sampled_from(["/v1/chat/completions", "/v1/models", "/api/chat", "/v1/elsewhere", "/health",
                                      "/api/registry", "/"]), HEADERS, BODIES)

@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Simulator, hub, worker and proxy as real processes, shared by every example: their URLs."""
    folder = tmp_path_factory.mktemp("fuzz")
    started: list[Daemon] = []

    async def start() -> tuple[str, str, str]:
        started.append(Daemon(folder, "sim", "--listen", "127.0.0.1:0", "--tokens", "4", "--ttft-ms", "0",
                              "--itl-ms", "0"))
        started.append(Daemon(folder, "hub", "--listen", "127.0.0.1:0"))
        sim, hub = await started[0].url(), await started[1].url()
        (folder / "worker.toml").write_text(f'hub_url = "{hub.replace("http://", "ws://")}/gridhub"\n'
                                            f'[engine]\nurl = "{sim}"\nmax_concurrency = 8\n')
        (folder / "proxy.toml").write_text(f'registry_url = ""\nhubs = ["{hub}"]\n[health]\ninterval_s = 0.2\n')
        started.append(Daemon(folder, "worker", "--config", str(folder / "worker.toml"), "--log-level", "error"))
        started.append(Daemon(folder, "proxy", "--config", str(folder / "proxy.toml"), "--listen", "127.0.0.1:0"))
        proxy = await started[-1].url()
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            async def listed() -> bool:
                return "sim" in (await http.get(proxy + "/v1/models")).text

            await eventually(listed, "the proxy to list the model sim")
        return sim, hub, proxy

    try:
        yield trio.run(start)
    finally:
        for daemon in started:
            daemon.process.terminate()
        for daemon in started:
            daemon.process.wait(timeout=WAIT_S)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=REQUESTS)
async def test_random_requests_get_no_5xx_and_leave_nothing_behind(processes: tuple[str, str, str],
                                                                   request: Any) -> None:
    method, path, headers, body = request
    sim_url, hub_url, proxy_url = processes
    async with httpx.AsyncClient(timeout=WAIT_S) as http:
        for base in (hub_url, proxy_url):
            response = await http.request(method, base + path, content=body, headers=headers)
            assert response.status_code < 500, (base, method, path, body, response.text)
            if response.status_code >= 400 and path.startswith("/v1/"):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}

        for base in (hub_url, proxy_url):  # no label but the models some worker serves
            labels = set(re.findall(r'model="([^"]*)"', (await http.get(base + "/metrics")).text))
            assert labels <= {"sim", "", "other"}, labels

        async def nothing_left() -> bool:
            state = (await http.get(hub_url + "/api/registry")).json()
            engine = (await http.get(sim_url + "/sim/stats")).json()
            return state["queued"] == 0 and state["workers"][0]["inflight"] == 0 and engine["active"] == 0

        await eventually(nothing_left, "every slot, queue place and generation to be released")
