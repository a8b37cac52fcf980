"""``ghubai up --backend sim`` as a user runs it: a real process, a curl-style SSE request, ``ghubai
status``, Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import httpx
import trio

from conftest import WAIT_S, Daemon, eventually, ghubai_command


async def test_up_with_the_simulator_streams_tokens_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    up = Daemon(tmp_path, "up", "--backend", "sim", "--port", "0")
    try:  # the banner, on stdout once the grid is up, names the port the OS gave the proxy
        url = (await up.wrote(re.compile(r"GhubAi grid is up on (http://127\.0\.0\.1:\d+)"), stdout=True,
                              timeout_s=30))[1]
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            async def listed() -> bool:  # the proxy lists a model once its hub has a worker that serves it
                return "sim" in (await http.get(url + "/v1/models")).text

            await eventually(listed, "the proxy to list the model sim")
            # what curl -N sends: no Content-Type beyond curl's form default, a JSON body
            body = '{"model":"sim","messages":[{"role":"user","content":"hi"}],"stream":true}'
            async with http.stream("POST", url + "/v1/chat/completions", content=body,
                                   headers={"content-type": "application/x-www-form-urlencoded"}) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                events = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        tokens = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
        assert sum(1 for t in tokens if t) == 32
        status = await trio.run_process(ghubai_command("status", "--proxy", url), capture_stdout=True, check=False)
        assert status.returncode == 0 and b"local" in status.stdout  # the grid's one worker
    finally:
        up.process.send_signal(signal.SIGINT)
        up.process.wait(timeout=WAIT_S)
    assert up.process.returncode == 0, up.log()
    out = up.printed()
    assert "built-in simulator" in out and f"curl -N {url}/v1/chat/completions" in out
    assert f"{url}/dashboard" in out
