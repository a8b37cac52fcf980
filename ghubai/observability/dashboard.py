"""The live dashboard of the hub and of the proxy: one self-contained page (``dashboard.html``, no CDN:
the grid may have no internet) that polls ``/dashboard/data``, whose shape both roles share."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from ghubai import __version__
from ghubai.observability.history import History

PAGE = files("ghubai.observability").joinpath("dashboard.html").read_bytes()
PAGE_TYPE = "text/html; charset=utf-8"
PATHS = ("/dashboard", "/dashboard/data")


def number(worker: dict[str, Any], key: str) -> float | None:
    """A worker's figure, or None: a proxy passes on what any hub sent, of any version."""
    value = worker.get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def capacity(hubs: list[dict[str, Any]]) -> dict[str, float]:
    """Workers, busy slots and slots over all ``hubs``: a worker that serves several hubs counts
    once, busy as it last reported to any of them (a hub older than ``busy`` says its own count)."""
    seen: dict[Any, tuple[float, float]] = {}
    for worker in (worker for hub in hubs for worker in hub["workers"]):
        busy, slots = number(worker, "busy") or number(worker, "inflight") or 0, number(worker, "max_concurrency") or 0
        before = seen.get(worker.get("id") or id(worker), (0, 0))
        seen[worker.get("id") or id(worker)] = (max(before[0], busy), max(before[1], slots))
    return {"workers": len(seen), "busy": sum(busy for busy, _ in seen.values()),
            "slots": sum(slots for _, slots in seen.values())}


def served_models(workers: list[dict[str, Any]]) -> list[str]:
    """The models that the workers not draining serve, from ``/api/registry``'s list."""
    return sorted({str(model) for worker in workers if not worker.get("draining") for model in worker["models"]})


def worker_health(worker: dict[str, Any], heartbeat_s: float) -> str:
    """A worker's state in a word, for the page and for ``ghubai status`` alike (the engine's
    problem follows ``engine:``); ``worker`` as a hub's ``/api/registry`` lists it. Total: a proxy
    shows what any hub sent, so an entry without the fields it needs is ``?``, never an error."""
    if worker.get("draining"):
        return "draining"
    if problem := worker.get("problem"):
        return f"engine: {problem}"
    seen, inflight, slots = worker.get("last_seen_s"), worker.get("inflight"), worker.get("max_concurrency")
    if not (isinstance(seen, int | float) and isinstance(inflight, int | float) and isinstance(slots, int | float)):
        return "?"
    if heartbeat_s and seen > 2 * heartbeat_s:
        return "late"
    busy = worker.get("busy", inflight)  # its slots other hubs use too (an older hub does not say)
    return "full" if isinstance(busy, int | float) and busy >= slots else "ok"


def hub_view(name: str, address: str, up: bool, reason: str | None, queue: dict[str, int],
             workers: list[dict[str, Any]], heartbeat_s: float, models: list[str] | None = None) -> dict[str, Any]:
    """One hub as the page shows it; ``workers`` as the hub's ``/api/registry`` lists them (each
    with its ``health``), and its ``models`` as its ``/api/summary`` does (by default: those its
    workers that are not draining serve)."""
    if models is None:
        models = served_models(workers)
    workers = [{**worker, "health": worker_health(worker, heartbeat_s)} for worker in workers]
    return {"name": name, "address": address, "up": up, "reason": None if up else reason,
            "queued": sum(queue.values()), "models": models, "workers": workers, "heartbeat_s": heartbeat_s}


def data(role: str, name: str, hubs: list[dict[str, Any]], queue: dict[str, int], history: History) -> dict[str, Any]:
    return {"role": role, "name": name, "version": __version__, "hubs": hubs, "capacity": capacity(hubs),
            "queue": queue, "step_s": history.step_s, "window_s": history.step_s * history.steps,
            "history": history.points()}
