"""Random bodies, headers, methods and paths at the hub and the proxy: never a 5xx, never a crash,
and nothing left behind (no slot taken, nothing queued, no generation running)."""

from __future__ import annotations

import json
from typing import Any

import subprocess
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import WAIT_S, eventually, free_port, ghubai_command

SCALARS = st.none() | st.booleans() | st.integers(-10, 64) | st.floats(allow_nan=False, width=32) | st.text(max_size=12)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=10)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", ""]) | JSON},
                                          optional={"content": JSON}), max_size=3)
CHATS = st.fixed_dictionaries(
    {"model": st.sampled_from(["sim", "no-such-model", ""]) | JSON, "messages": MESSAGES | JSON},
    optional={"stream": st.booleans() | JSON, "stream_options": JSON, "max_tokens": st.integers(-3, 8) | JSON})
BODIES = st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()) | CHATS.map(
    lambda v: json.dumps(v).encode())
RESERVED = {"host", "content-length", "transfer-encoding", "connection", "expect", "upgrade", "te", "keep-alive"}
HEADERS = st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,15}", fullmatch=True).filter(lambda h: h not in RESERVED),
                          st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True), max_size=5)
REQUESTS = st.tuples(st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
                     st.sampled_from(["/v1/chat/completions", "/v1/models", "/api/chat", "/v1/elsewhere", "/health",
                                      "/api/registry", "/"]), HEADERS, BODIES)

@pytest.fixture(scope="module")
def processes(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Simulator, hub, worker and proxy as real processes, shared by every example."""
    folder = tmp_path_factory.mktemp("fuzz")
    sim, hub, proxy = free_port(), free_port(), free_port()
    (folder / "worker.toml").write_text(f'hub_url = "ws://127.0.0.1:{hub}/gridhub"\n'
                                        f'[engine]\nurl = "http://127.0.0.1:{sim}"\nmax_concurrency = 8\n')
    (folder / "proxy.toml").write_text(f'registry_url = ""\nhubs = ["http://127.0.0.1:{hub}"]\n'
                                       f'[health]\ninterval_s = 0.2\n')
    commands = [("sim", "--listen", f"127.0.0.1:{sim}", "--tokens", "4", "--ttft-ms", "0", "--itl-ms", "0"),
                ("hub", "--listen", f"127.0.0.1:{hub}"), ("worker", "--config", str(folder / "worker.toml")),
                ("proxy", "--config", str(folder / "proxy.toml"), "--listen", f"127.0.0.1:{proxy}")]
    started = [subprocess.Popen(ghubai_command(*command, "--log-level", "error")) for command in commands]
    urls = tuple(f"http://127.0.0.1:{port}" for port in (sim, hub, proxy))
    try:
        for _ in range(200):
            try:
                if "sim" in httpx.get(urls[2] + "/v1/models", timeout=1).text:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        yield urls
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.wait(timeout=WAIT_S)


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

        async def nothing_left() -> bool:
            state = (await http.get(hub_url + "/api/registry")).json()
            engine = (await http.get(sim_url + "/sim/stats")).json()
            return state["queued"] == 0 and state["workers"][0]["inflight"] == 0 and engine["active"] == 0

        await eventually(nothing_left, "every slot, queue place and generation to be released")
