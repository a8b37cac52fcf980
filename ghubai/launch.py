"""The ``ghubai`` command's first step, before anything heavy is imported.

A daemon that reloads on SIGHUP must not die of one that comes while it starts (a script that starts
it, edits its file and reloads): the default action ends a process, and systemd takes that end for a
clean exit, so ``Restart=on-failure`` left the role down. The imports before trio listens for signals
take 0.2–0.3 s, so the signal is ignored from here, the command's first line of our code; the files are
read after it.
"""

from __future__ import annotations

import os
import signal
import sys

RELOADING_ROLES = frozenset({"hub", "worker", "proxy", "registry"})
DAEMONS = RELOADING_ROLES | {"up", "sim"}  # (which a Ctrl-C stops cleanly, however early)


def ignore_hangups(role: str | None) -> None:
    """Ignore SIGHUP when ``role`` (the ``ghubai`` command's first word) reloads on it."""
    if role in RELOADING_ROLES:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def interrupted(role: str | None) -> int:
    """The exit status of a Ctrl-C before the command listened for it: a daemon's clean stop, or a
    command cut short (130), which did not succeed."""
    return 0 if role in DAEMONS else 130


def main() -> int:
    role = sys.argv[1] if len(sys.argv) > 1 else None
    ignore_hangups(role)
    try:
        from ghubai.cli import main as run  # (the heavy imports: trio, quart, hypercorn, msgspec ...)

        status = run()
        if role in DAEMONS:  # stopped: a second Ctrl-C must not kill the exit (``up`` said 130, not its 0)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if sys.stdout is not None:  # (None: started with it closed)
            sys.stdout.flush()  # (here, not at the exit, where a reader that left was "Exception ignored")
        return status
    except KeyboardInterrupt:  # not a traceback
        return interrupted(role)
    except BrokenPipeError:  # the reader of its output left (``status --watch | grep -m1``): not a traceback
        if sys.stdout is not None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the flush at exit would fail again)
        return 1
