"""``ghubai status`` as an operator runs it over ssh: a real process reading a running grid."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from conftest import eventually, ghubai_command
from ghubai.observability.dashboard import worker_health


async def status(*args: str) -> tuple[int, str, str]:
    done = await trio.run_process(ghubai_command("status", *args), capture_stdout=True, capture_stderr=True,
                                  check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


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


@pytest.mark.parametrize("changes, health", [
    ({}, "ok"), ({"inflight": 4}, "full"), ({"last_seen_s": 21.0}, "late"),
    ({"problem": "credentials refused"}, "engine: credentials refused"), ({"draining": True, "inflight": 4}, "draining"),
])
def test_a_workers_health_is_one_word_for_page_and_terminal(changes: dict[str, Any], health: str) -> None:
    worker = {"inflight": 0, "max_concurrency": 4, "last_seen_s": 1.0, "draining": False, "problem": ""} | changes
    assert worker_health(worker, heartbeat_s=10.0) == health
