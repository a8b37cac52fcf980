"""``ghubai status``: the dashboard's picture in a terminal, for operators on ssh. It reads the same
``/dashboard/data`` the page polls, from a proxy (the whole grid) or from one hub."""

from __future__ import annotations

import ssl
import sys
import unicodedata
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

import ghubai.http11.grammar  # noqa: F401  (httpx reads answers with h11: its grammars, linear)
from ghubai.config import ca_file_problem, is_loopback, redacted, scrubbed, url_problem
from ghubai.errors import describe
from ghubai.http11.client import tls_client_context
from ghubai.observability.dashboard import capacity, number, worker_health
from ghubai.observability.logs import printable

TIMEOUT_S = 5.0


def _table(rows: list[list[str]]) -> list[str]:
    rows = [[printable(cell) for cell in row] for row in rows]  # (as shown, for the columns' widths)
    widths = [max(_width(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell + " " * (width - _width(cell)) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def _width(text: str) -> int:
    """The cells ``text`` takes in a terminal: two for each wide character (日本, most emoji), none
    for a mark or a format character (padded by ``len``, a name in CJK pushed the row's later columns right)."""
    return sum(0 if unicodedata.category(char) in ("Mn", "Me", "Cf") else
               2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _figure(value: float | None, form: str = "g") -> str:
    return "?" if value is None else format(value, form)


def render(data: dict[str, Any]) -> str:
    hubs = data["hubs"]
    workers = [(hub, worker) for hub in hubs for worker in hub["workers"]]
    last = data["history"][-1] if data["history"] else {}
    rate = ("tokens_per_s", "tokens/s") if data["role"] == "hub" else ("requests_per_s", "requests/s")
    ttft = last.get("ttft_ms")
    total = capacity(hubs)  # (not the server's: an older one's counts a worker of two hubs twice)
    lines = [
        f"GhubAi {data['name']} · v{data['version']}",
        f"hubs {sum(hub['up'] for hub in hubs)}/{len(hubs)} up · workers {total['workers']:g} · inflight "
        f"{total['busy']:g}/{total['slots']:g} · queued {sum(hub['queued'] for hub in hubs)}",
        f"last {data['step_s']:g} s: {last.get(rate[0], 0)} {rate[1]}, time to first token "
        f"{'-' if ttft is None else f'{ttft:g} ms'} (median)",
        "",
    ]
    hub_rows = [["HUB", "HEALTH", "WORKERS", "QUEUED", "MODELS"]]
    for hub in hubs:
        hub_rows.append([hub["name"], "up" if hub["up"] else "down", str(len(hub["workers"])), str(hub["queued"]),
                         ", ".join(hub["models"]) or "-"])
    lines += _table(hub_rows)
    lines += [f"  {hub['name']} is down: {hub['reason']}" for hub in hubs if not hub["up"]] + [""]
    if workers:
        worker_rows = [["WORKER", "HUB", "MODELS", "INFLIGHT", "HEALTH", "HEARTBEAT"]]
        for hub, worker in workers:
            # an older server's data has no health word: the same rule, here
            health = worker.get("health") or worker_health(worker, hub.get("heartbeat_s") or 0.0)
            models = worker.get("models")
            worker_rows.append([str(worker.get("name", "?")), hub["name"],
                                ", ".join(map(str, models)) if isinstance(models, list) and models else "-",
                                f"{_figure(number(worker, 'inflight'))}/{_figure(number(worker, 'max_concurrency'))}",
                                health, f"{_figure(number(worker, 'last_seen_s'), '.1f')} s ago"])
        lines += _table(worker_rows)
    else:
        lines.append("no worker connected")
    waiting = {model: count for model, count in data["queue"].items() if count}
    if waiting:
        lines += ["", "queued: " + ", ".join(f"{model} {count}" for model, count in sorted(waiting.items()))]
    # names, models and reasons come from workers, engines and hubs: shown as text, never as escapes
    return "\n".join(map(printable, lines))


def healthy(data: dict[str, Any]) -> bool:
    """Every hub up, and at least one worker."""
    return all(hub["up"] for hub in data["hubs"]) and any(hub["workers"] for hub in data["hubs"])


def picture(data: Any) -> tuple[str, bool]:
    """The picture of ``data`` and whether it is healthy; ValueError when it is JSON of another
    shape (another service on that port: a traceback was all a cron check got)."""
    try:
        return render(data), healthy(data)
    except (KeyError, TypeError, AttributeError, IndexError) as error:
        raise ValueError(f"not a GhubAi dashboard's data ({type(error).__name__}: {error})"[:200]) from None


async def fetch(url: str, tls: ssl.SSLContext) -> Any:
    """The dashboard's data, within ``TIMEOUT_S`` for the whole answer (httpx bounds each read only:
    a peer that trickles a byte a second held a cron check for ever); raises trio.TooSlowError."""
    # a grid on this machine is reached directly, whatever HTTP_PROXY says (no_proxy names localhost,
    # rarely 127.0.0.1); a remote one as the operator's environment says
    with trio.fail_after(TIMEOUT_S):
        direct = is_loopback(urlsplit(url).hostname or "")
        async with httpx.AsyncClient(timeout=TIMEOUT_S, verify=tls, trust_env=not direct) as http:
            response = await http.get(url.rstrip("/") + "/dashboard/data")
            if response.status_code != 200:  # (httpx's error took two lines, the second a link to MDN)
                hint = " (give the proxy's or hub's root URL, with no path)" if response.status_code == 404 else ""
                raise ValueError(f"HTTP {response.status_code} for /dashboard/data{hint}")
            return response.json()


def status(url: str, watch_s: float | None = None, *, ca_file: str = "", insecure: bool = False) -> int:
    """Print the picture once (exit status 0 when healthy, 1 when not or unreachable), or every
    ``watch_s`` seconds until interrupted. TLS is checked as the daemons check it (``ca_file``)."""
    if ca_file and (problem := ca_file_problem(ca_file)):
        print(f"ghubai status: --ca-file {ca_file}: {problem}", file=sys.stderr)
        return 1
    if problem := url_problem(url, ("http", "https"), credentials=True):  # (as every other URL is judged)
        print(f"ghubai status: {problem}", file=sys.stderr)
        return 1
    tls = tls_client_context(ca_file, insecure)

    async def main() -> int:
        while True:
            try:
                shown, ok = picture(await fetch(url, tls))
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, trio.TooSlowError) as error:
                said = scrubbed(describe(error), url)  # (a TLS refusal's why; httpx quotes the URL, password and all)
                print(f"ghubai status: cannot read {redacted(url)}: {said}", file=sys.stderr)
                if watch_s is None:
                    return 1
            else:
                if watch_s is not None and sys.stdout.isatty():
                    sys.stdout.write("\x1b[H\x1b[2J")  # clear the terminal, like watch(1) (not a pipe's reader)
                print(shown, flush=True)
                if watch_s is None:
                    return 0 if ok else 1
            await trio.sleep(watch_s)

    try:
        return trio.run(main)
    except KeyboardInterrupt:  # how --watch ends
        return 0
