"""The ``ghubai`` command's first step, before anything heavy is imported.

A daemon that reloads on SIGHUP must not die of one that comes while it starts (a script that starts
it, edits its file and reloads): the default action ends a process, and systemd takes that end for a
clean exit, so ``Restart=on-failure`` left the role down. The imports before trio listens for signals
take 0.2–0.3 s, so the signal is ignored from here, the command's first line of our code; the files are
read after it.
"""

from __future__ import annotations

import signal
import sys

RELOADING_ROLES = frozenset({"hub", "worker", "proxy", "registry"})
DAEMONS = RELOADING_ROLES | {"up", "sim"}  # (which a Ctrl-C stops cleanly, however early)


def ignore_hangups(argv: list[str]) -> None:
    """Ignore SIGHUP when ``argv`` (the command line after ``ghubai``) starts a reloading role."""
    if argv and argv[0] in RELOADING_ROLES:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)


def main() -> int:
    ignore_hangups(sys.argv[1:])
    try:
        from ghubai.cli import main as run  # (the heavy imports: trio, quart, hypercorn, msgspec ...)

        return run()
    except KeyboardInterrupt:  # a Ctrl-C before a daemon listened for it: a clean stop, not a traceback
        return 0 if sys.argv[1:2] and sys.argv[1] in DAEMONS else 130  # (a command cut short did not succeed)
