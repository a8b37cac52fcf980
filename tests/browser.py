"""Headless Chromium driven over the DevTools protocol, spoken with trio-websocket: enough to load a
page, read what it shows and take a screenshot, with no browser-automation package."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

# Flags of a quiet headless browser on a machine with no internet (its background fetches would fail).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--window-size=1280,900", "--remote-debugging-port=0"]
WAIT_S = 20.0


class Page:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self.ws.send_message(json.dumps({"id": call_id, "method": method, "params": params}))
        with trio.fail_after(WAIT_S):
            while True:
                message = json.loads(await self.ws.get_message())
                if message.get("id") == call_id:  # events (no id) are not asked for, and skipped
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return dict(message.get("result", {}))

    async def open(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, expected: Any, what: str) -> None:
        """Poll ``expression`` in the page until it equals ``expected`` (one that throws, say before
        the page has loaded the element it reads, has not yet)."""
        seen: Any = None
        with trio.move_on_after(WAIT_S):
            while True:
                try:
                    if (seen := await self.evaluate(expression)) == expected:
                        return
                except RuntimeError as error:
                    seen = error
                await trio.sleep(0.1)
        raise AssertionError(f"the page never showed {what}: {expression} is {seen!r}, not {expected!r}")

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


@asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Page]:
    program = shutil.which("chromium") or shutil.which("chromium-browser")
    assert program, "Chromium is needed (Debian package chromium; .ci/run installs it)"
    process = subprocess.Popen([program, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        with trio.fail_after(WAIT_S):
            while not port_file.exists() or not port_file.read_text().strip():
                await trio.sleep(0.05)
        port = port_file.read_text().split()[0]
        async with httpx.AsyncClient(timeout=WAIT_S) as http:
            target = (await http.put(f"http://127.0.0.1:{port}/json/new?about:blank")).json()
        async with open_websocket_url(target["webSocketDebuggerUrl"], max_message_size=64 << 20) as ws:
            yield Page(ws)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
