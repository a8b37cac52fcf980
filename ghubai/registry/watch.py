"""Noticing that a file changed, by polling ``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``.

Polling sees both ways editors save: an atomic rename (new inode) and an in-place write (new size
or mtime), and a change of owner or mode (new ctime: a file the daemon could not read becomes
readable), needs no platform API, and costs one ``stat`` per period. A change is acted on once two
polls in a row agree, so a file caught half-written is not read.

A filesystem whose timestamps are coarse (ext3's and some NFS mounts' 1 s, FAT's 2 s) gives two
in-place writes of one size within a tick the same signature: the second was missed for good. So
while a file's mtime is that recent, its text is compared too (git's "racy" rule).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import trio

from ghubai.config import ConfigError, read_text

POLL_S = 0.1
RACY_NS = 2_000_000_000  # the coarsest timestamps a change may hide within (FAT's)

Signature = tuple[int, int, int, int, int] | None


def signature(path: str) -> Signature:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _text(path: str) -> str | None:
    try:
        return read_text(path)
    except ConfigError:
        return None


async def watch(path: str, on_change: Callable[[], bool], poll_s: float = POLL_S, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Call ``on_change`` after each settled change of ``path`` (deletion included), until cancelled,
    and at each poll after it while it says False (it could not read the file yet). Reports started
    once it knows the file's state: any later change will be seen."""
    seen = signature(path)
    text = _text(path)  # what was there when ``seen`` was: for a change its signature cannot show
    task_status.started()
    pending: Signature = seen
    while True:
        await trio.sleep(poll_s)
        current = signature(path)
        if current != pending:
            pending = current  # still moving: wait for the next poll to agree
            continue
        racy = current is not None and time.time_ns() < current[3] + RACY_NS
        if current == seen and not (racy and _text(path) != text):
            continue
        before = _text(path)  # (read before: a write after it is then seen at the next poll)
        if on_change():
            seen, text = current, before
