"""``ghubai up --backend sim`` as a user runs it: a real process, a curl-style SSE request, ``ghubai
status``, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess

import httpx
import trio

from conftest import WAIT_S, free_port, ghubai_command


async def test_up_with_the_simulator_streams_tokens_and_stops_on_ctrl_c() -> None:
    port = free_port()
    process = subprocess.Popen(ghubai_command("up", "--backend", "sim", "--port", str(port)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            with trio.fail_after(30):
                while True:
                    try:  # the proxy lists a model once its hub has a worker that serves it
                        if "sim" in (await http.get(url + "/v1/models")).text:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(0.1)
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
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=WAIT_S)
    assert process.returncode == 0, err
    assert "built-in simulator" in out and f"curl -N http://127.0.0.1:{port}/v1/chat/completions" in out
    assert f"http://127.0.0.1:{port}/dashboard" in out
