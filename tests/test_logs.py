"""Logs of a whole grid of real processes: one line per event, JSON or text, the request id of a request
on the lines about it in every role (proxy → hub → worker → engine), and no secret anywhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx

from conftest import WAIT_S, chat, eventually, free_port, ghubai_command

API_KEY, TOKEN = "sk-client-secret-4242", "provider-secret-1717"


def daemon(tmp_path: Path, role: str, config: str | None, *args: str, fmt: str = "json") -> subprocess.Popen[bytes]:
    command = ghubai_command(role, "--log-format", fmt, "--log-level", "debug", *args)
    if config is not None:
        (tmp_path / f"{role}.toml").write_text(config)
        command += ["--config", str(tmp_path / f"{role}.toml")]
    return subprocess.Popen(command, stderr=(tmp_path / f"{role}.log").open("wb"))


async def test_a_request_id_crosses_every_role_and_secrets_never_appear(tmp_path: Path) -> None:
    sim_port, hub_port, proxy_port = free_port(), free_port(), free_port()
    processes = [
        daemon(tmp_path, "sim", None, "--listen", f"127.0.0.1:{sim_port}", "--ttft-ms", "1", "--itl-ms", "1"),
        daemon(tmp_path, "hub", f'listen = "127.0.0.1:{hub_port}"\napi_keys = ["{API_KEY}"]\n'
                                f'provider_tokens = ["{TOKEN}"]\n', fmt="text"),
        daemon(tmp_path, "worker", f'hub_url = ["ws://127.0.0.1:{hub_port}/gridhub"]\nprovider_token = "{TOKEN}"\n'
                                   f'name = "w1"\n[engine]\nurl = "http://127.0.0.1:{sim_port}"\n'),
        daemon(tmp_path, "proxy", f'listen = "127.0.0.1:{proxy_port}"\nregistry_url = ""\n'
                                  f'hubs = ["http://127.0.0.1:{hub_port}"]\napi_keys = ["{API_KEY}"]\n'
                                  '[health]\ninterval_s = 0.1\n'),
    ]
    proxy = f"http://127.0.0.1:{proxy_port}"
    try:
        async with httpx.AsyncClient(timeout=WAIT_S, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            async def serving() -> bool:
                try:
                    return (await http.get(proxy + "/ready")).status_code == 200 and \
                        (await http.get(proxy + "/v1/models")).json()["data"] != []
                except httpx.TransportError:
                    return False

            await eventually(serving, "the grid behind the proxy")
            given = await http.post(proxy + "/v1/chat/completions", json=chat(stream=True),
                                    headers={"X-Request-ID": "trace-me-42"})
            made = await http.post(proxy + "/api/chat", json=chat())
            forged = await http.post(proxy + "/v1/chat/completions", json=chat("nope\nCRITICAL ghubai.hub: forged\u2028CRITICAL x"))
            unknown = await http.get(proxy + "/v2/models")
            refused = await http.post(proxy + "/v1/chat/completions", json=chat(), headers={
                "Authorization": "Bearer wrong-key", "X-Request-ID": "bad id; forged=1"})
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=WAIT_S)

    assert given.status_code == 200 and given.headers["x-request-id"] == "trace-me-42"
    made_id = made.headers["x-request-id"]
    assert made.status_code == 200 and len(made_id) == 32
    assert refused.status_code == 401 and refused.headers["x-request-id"] not in ("", "bad id; forged=1")

    assert forged.status_code == 404 and unknown.status_code == 404
    logs = {role: (tmp_path / f"{role}.log").read_text() for role in ("sim", "hub", "worker", "proxy")}
    assert not [line for line in logs["hub"].splitlines() if line.startswith("CRITICAL")]  # no forged line
    assert any(entry.get("request_id") == unknown.headers["x-request-id"] and "/v2/models 404" in entry["msg"]
               for entry in map(json.loads, logs["proxy"].splitlines()))
    for role, text in logs.items():
        assert API_KEY not in text and TOKEN not in text, f"a secret in the {role} log"
    lines = {role: [json.loads(line) for line in text.splitlines()] for role, text in logs.items() if role != "hub"}
    for role, entries in lines.items():
        assert all({"level", "logger", "msg"} <= set(entry) for entry in entries), role
        for rid in ("trace-me-42", made_id):
            assert any(entry.get("request_id") == rid for entry in entries), f"{rid} not in the {role} log"
    hub_lines = logs["hub"].splitlines()
    for rid in ("trace-me-42", made_id):
        assert any(line.startswith("INFO ghubai.hub: POST ") and line.endswith(f" request_id={rid}")
                   for line in hub_lines), f"{rid} not in the hub log"
