"""``ghubai up --backend sim`` as a user runs it: a real process, a curl-style SSE request, ``ghubai
status``, Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trio

from conftest import WAIT_S, Daemon, ghubai_command, run_ghubai
from ghubai.http11.server import Connection, Request, serve_connection
from ghubai.up import _banner


# a user's HTTP proxy, which no loopback call of the grid's may go through (regression, hunt: up's
# own checks went through it, and the banner never came; nor did ghubai status read the grid)
USERS_PROXY = {"http_proxy": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "no_proxy": "localhost"}


async def test_up_with_the_simulator_streams_tokens_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    up = Daemon(tmp_path, "up", "--backend", "sim", "--port", "0", env={**os.environ, **USERS_PROXY})
    try:  # the banner, on stdout once the grid is up, names the port the OS gave the proxy
        url = (await up.wrote(re.compile(r"GhubAi grid is up on (http://127\.0\.0\.1:\d+)"), stdout=True,
                              timeout_s=30))[1]
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            # at once, as a user pastes the banner's curl line (regression: the banner came before the
            # proxy had seen the hub healthy, and such a request got 503 No healthy hub);
            # what curl -N sends: no Content-Type beyond curl's form default, a JSON body
            body = '{"model":"sim","messages":[{"role":"user","content":"hi"}],"stream":true}'
            async with http.stream("POST", url + "/v1/chat/completions", content=body,
                                   headers={"content-type": "application/x-www-form-urlencoded"}) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        tokens = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
        assert sum(1 for t in tokens if t) == 32
        status = await trio.run_process(ghubai_command("status", "--proxy", url), capture_stdout=True, check=False,
                                        env={**os.environ, **USERS_PROXY})
        assert status.returncode == 0 and b"local" in status.stdout  # the grid's one worker
    finally:
        up.process.send_signal(signal.SIGINT)
        up.process.wait(timeout=WAIT_S)
    assert up.process.returncode == 0, up.log()
    out = up.printed()
    assert "built-in simulator" in out and f"curl -N {url}/v1/chat/completions" in out
    assert "Ollama" not in out  # --backend sim never asked one
    assert f"{url}/dashboard" in out


async def test_up_fronts_a_key_protected_openai_engine(tmp_path: Path) -> None:
    """``--backend openai --engine-url URL --engine-api-key-env VAR``: the grid in front of an
    OpenAI-compatible engine that demands a key, which only the environment holds."""
    sim = Daemon(tmp_path, "sim", "--listen", "127.0.0.1:0", "--models", "remote", "--api-key", "engine-secret",
                 "--ttft-ms", "0", "--itl-ms", "0", "--tokens", "4")
    up = None
    try:
        engine_url = await sim.url()
        up = Daemon(tmp_path, "up", "--backend", "openai", "--engine-url", engine_url, "--engine-api-key-env",
                    "ENGINE_KEY", "--port", "0", env={**os.environ, "ENGINE_KEY": "engine-secret"})
        url = (await up.wrote(re.compile(r"GhubAi grid is up on (http://127\.0\.0\.1:\d+)"), stdout=True,
                              timeout_s=30))[1]
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            openai = await http.post(url + "/v1/chat/completions", json={
                "model": "remote", "messages": [{"role": "user", "content": "hi"}]})
            ollama = await http.post(url + "/api/chat", json={
                "model": "remote", "messages": [{"role": "user", "content": "hi"}], "stream": False})
        assert openai.status_code == 200 and openai.json()["choices"][0]["message"]["content"]
        assert ollama.status_code == 200 and ollama.json()["done"] is True  # translated for the OpenAI engine
        assert "OpenAI-compatible engine at " + engine_url in up.printed()
    finally:
        if up is not None:
            up.process.send_signal(signal.SIGINT)
            up.process.wait(timeout=WAIT_S)
        sim.stop()
    assert "engine-secret" not in up.log() + up.printed()


def test_a_second_ctrl_c_while_a_stopped_role_exits_does_not_kill_it() -> None:
    """Regression (hunt): a Ctrl-C pressed twice came, the second, while the interpreter shut down
    after the role had stopped: killed by it, ``ghubai up`` said 130, not its clean 0."""
    script = ("import os, signal, sys\n"
              "from ghubai import cli, launch\n"
              "cli.main = lambda: 0\n"  # (the role ran, and stopped)
              "sys.argv = ['ghubai', 'up']\n"
              "status = launch.main()\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"  # (as the second press, after the stop)
              "print('exits', status)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "exits 0\n", ""), done.stderr


def test_a_port_out_of_range_is_one_line_not_a_traceback() -> None:
    """Regression (hunt): ``--port 70000`` started every role, then died with a traceback."""
    for port in ("70000", "-1"):
        done = run_ghubai("up", "--backend", "sim", f"--port={port}")
        assert done.returncode == 2 and "expected a port from 0 to 65535" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_the_banner_s_curl_line_is_one_command_whatever_the_engine_names_its_model(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Regression (hunt): an engine's model named ``x' ; touch /tmp/pwned ; echo '`` made the banner's
    curl line, pasted into a shell, run ``touch``; and escape sequences in a name reached the terminal."""
    model = "x' ; touch /tmp/pwned ; echo '\x1b]0;title\x07"
    worker = SimpleNamespace(offer=SimpleNamespace(apis=None))
    _banner("http://127.0.0.1:9", "route", worker, [model], model)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    line = out[out.index("curl -N"):out.index("\nWatch it")].replace("\\\n", " ")
    words = shlex.split(line)
    assert words[:3] == ["curl", "-N", "http://127.0.0.1:9/v1/chat/completions"] and len(words) == 7, words
    assert words[5] == "-d" and json.loads(words[6])["model"] == model


OLLAMA_MODELS = {"all-minilm:latest": ["embedding"], "llama3.2:latest": ["completion", "tools"]}


async def _ollama(conn: Connection, request: Request) -> None:
    """An Ollama with an embedding model and a chat model, answering as Ollama does: the embedding
    model lists only ``embedding`` in ``/api/show`` and refuses a chat with a 400."""
    model = json.loads(request.body or b"{}").get("model")
    if request.path == "/api/version":
        await conn.respond_json(200, {"version": "0.12.0"})
    elif request.path in ("/api/tags", "/api/ps"):
        names = OLLAMA_MODELS if request.path == "/api/tags" else []
        await conn.respond_json(200, {"models": [{"name": name, "model": name} for name in names]})
    elif model not in OLLAMA_MODELS:
        await conn.respond_json(404, {"error": f"model '{model}' not found"})
    elif request.path == "/api/show":
        await conn.respond_json(200, {"details": {}, "capabilities": OLLAMA_MODELS[model]})
    elif request.path == "/api/chat" and "completion" in OLLAMA_MODELS[model]:
        lines = [{"model": model, "created_at": "2026-01-01T00:00:00Z", "message": {"role": "assistant", **part},
                  "done": not part, **({"done_reason": "stop", "eval_count": 1} if not part else {})}
                 for part in ({"content": "hello"}, {})]
        await conn.respond(200, "".join(json.dumps(line) + "\n" for line in lines).encode(), "application/x-ndjson")
    else:
        await conn.respond_json(400, {"error": f'"{model}" does not support chat'})


async def test_the_banner_s_curl_line_names_a_model_that_chats(tmp_path: Path) -> None:
    """Regression (hunt): the banner's curl line named the first model by name, and on an Ollama
    with an embedding model (``all-minilm``, ``bge-m3`` sort before most) a user's first command got
    a 400 "does not support chat"."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=_ollama), 0,
                                                host="127.0.0.1"))
        engine = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        up = Daemon(tmp_path, "up", "--backend", "ollama", "--engine-url", engine, "--port", "0")
        try:
            await up.wrote(re.compile(r"Ctrl-C stops everything"), stdout=True, timeout_s=30)
            out = up.printed()
            line = re.search(r"curl -N (\S+) -H 'Content-Type: application/json' \\\n\s+-d (.+)\n", out)
            assert line is not None, out
            async with httpx.AsyncClient(timeout=WAIT_S, trust_env=False) as http:
                response = await http.post(line[1], content=shlex.split(line[2])[0],
                                           headers={"content-type": "application/json"})
            assert response.status_code == 200 and "hello" in response.text, response.text
        finally:
            up.process.send_signal(signal.SIGINT)
            await trio.to_thread.run_sync(up.process.wait, WAIT_S)
            nursery.cancel_scope.cancel()
    assert up.process.returncode == 0, up.log()


async def test_up_asks_its_proxy_ever_less_often_while_nothing_serves(autojump_clock: trio.abc.Clock) -> None:
    """Regression (first-run hunt): ``ghubai up`` asked its proxy for models every 50 ms for as long
    as the engine did not serve, each ask an access line: 20 lines a second (70,000 an hour) buried
    the one that said why. It asks after 50 ms, then twice as long each time, up to 0.5 s while it
    starts and 5 s once it said it does not serve yet."""
    from ghubai.up import WAITING_POLL_S, _serving

    asked = 0

    async def proxy(conn: Connection, request: Request) -> None:
        nonlocal asked
        asked += 1
        await conn.respond_json(200, {"object": "list", "data": []})

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, partial(serve_connection, handle=proxy), 0,
                                                host="127.0.0.1"))
        url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        assert await _serving(url, trio.current_time() + 20) == [] and asked <= 45, asked
        asked = 0
        assert await _serving(url, trio.current_time() + 600, WAITING_POLL_S) == [] and asked <= 130, asked
        nursery.cancel_scope.cancel()
