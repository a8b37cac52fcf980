"""What a daemon tells its supervisor: systemd's notify protocol (``sd_notify(3)``), spoken directly.

A datagram to ``$NOTIFY_SOCKET`` per state change: ``READY=1`` once the role serves, ``STOPPING=1``
when it drains, ``RELOADING=1`` + ``MONOTONIC_USEC`` before a SIGHUP reload and ``READY=1`` after it,
``STATUS=`` with a one-line summary whenever that line changes, and ``WATCHDOG=1`` every half
``$WATCHDOG_USEC`` from a task of the event loop, so a wedged loop misses it and systemd restarts
the daemon. Without ``$NOTIFY_SOCKET`` (not under systemd, or in tests) every call does nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from ghubai.config import ConfigError, reload_file

log = logging.getLogger("ghubai.service")

STATUS_INTERVAL_S = 2.0


def file_config(role: str, path: str) -> Any:
    """The file's configuration as the daemon starts (not its command line's ``--listen``), to tell
    later edits by; None when it cannot be read now."""
    try:
        return reload_file(role, path)
    except ConfigError:
        return None


def restart_needed(path: str, started: Any, fresh: Any, live: Iterable[str]) -> None:
    """Warn of the keys that changed in the file since ``started`` and are not ``live``: they wait for a restart."""
    if waiting := [key for key in changed_keys(started, fresh) if key not in live]:
        log.warning("%s: changed, and taking effect on restart only: %s", path, ", ".join(waiting))


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted names of the fields of two configurations (frozen dataclasses) that differ."""
    if not (dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new)):
        return []
    found = []
    for field in dataclasses.fields(old):
        before, after = getattr(old, field.name), getattr(new, field.name, None)
        if dataclasses.is_dataclass(before):
            found += changed_keys(before, after, f"{prefix}{field.name}.")
        elif before != after:
            found.append(prefix + field.name)
    return found


class Service:
    """The daemon's side of systemd's notify protocol (READY, STATUS, WATCHDOG, RELOADING,
    STOPPING). Invariant: without ``NOTIFY_SOCKET`` every call is a no-op."""
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        if self._address:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)
        self.watchdog_s = _watchdog_interval(environ)
        self.summary: Callable[[], str] = lambda: ""
        # What SIGHUP does: quick and synchronous (work that waits belongs to the role's own tasks,
        # which a reload only wakes), so signals are handled in order. None: nothing to reload.
        self.reload: Callable[[], None] | None = None
        self._status = ""
        self._ready = self._stopping = False

    def reloads_config(self, role: str, path: str | None, apply: Callable[[Any], str],
                       kept: Callable[[], Iterable[str]] = tuple, live: Iterable[str] = ()) -> None:
        """On SIGHUP, read ``path`` again and hand the new configuration to ``apply``, which takes
        what can change while running (the ``live`` keys) and says what it took; the keys that changed
        in the file since the start and wait for a restart are named (a changed ``listen`` was taken
        silently). A broken file raises ConfigError, and so does one without a key of the secret lists
        that ``kept`` names (``config.reload_file``)."""
        if path is None:
            return
        started = file_config(role, path)

        def reload() -> None:
            fresh = reload_file(role, path, kept())
            log.info("reloaded %s: %s (other keys take effect on restart)", path, apply(fresh))
            restart_needed(path, started, fresh, live)

        self.reload = reload

    def notify(self, *lines: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError as error:  # systemd gone or its queue full: the daemon itself goes on
            log.debug("sd_notify %s failed: %s", lines, error)

    def ready(self) -> None:
        self._ready = True
        self.notify("READY=1", f"STATUS={self._refresh()}")

    def stopping(self) -> None:
        self._stopping = True
        self.notify("STOPPING=1", "STATUS=draining")

    def reloaded(self) -> None:
        """Run ``reload`` between RELOADING=1 and READY=1 — those only once the daemon is ready and
        until it stops, so a reload never announces readiness early. A failed reload keeps what runs."""
        if self.reload is None:
            log.info("SIGHUP: nothing to reload for this role")
            return
        announce = self._ready and not self._stopping
        if announce:  # Type=notify-reload (systemd 253) also wants the clock
            self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            self.reload()
        except ConfigError as error:
            log.error("reload failed, the running configuration stays: %s", "; ".join(error.errors))
        except Exception:  # a reload must never take the daemon down
            log.exception("reload failed, the running configuration stays")
        finally:
            if announce and not self._stopping:
                self.ready()

    def _refresh(self) -> str:
        self._status = self.summary()
        return self._status

    async def run(self) -> None:
        """Keep systemd's watchdog fed and its STATUS line current, until cancelled."""
        if self._socket is None:
            return
        interval = min(STATUS_INTERVAL_S, self.watchdog_s or STATUS_INTERVAL_S)
        while True:
            await trio.sleep(interval)
            lines = ["WATCHDOG=1"] if self.watchdog_s else []
            if self.summary() != self._status:
                lines.append(f"STATUS={self._refresh()}")
            if lines:
                self.notify(*lines)


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half the watchdog timeout, when systemd set one for this very process."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1e6 if usec > 0 else None
