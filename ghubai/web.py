"""Serving a quart-trio app with hypercorn's trio worker, inside the caller's nursery.

Also carries one fix to hypercorn 0.18 (issues #330 and #106): quart-trio runs a connection's close
inside the request's already-cancelled scope, so ``send_eof`` is skipped and a client that sent
``Connection: close`` (or speaks HTTP/1.0) never sees EOF. The close is run shielded here.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from ghubai.protocol import MAX_MESSAGE_BYTES

_unshielded_close = TCPServer._close


async def _shielded_close(self: TCPServer) -> None:
    with trio.CancelScope(shield=True):
        await _unshielded_close(self)


TCPServer._close = _shielded_close  # type: ignore[method-assign]


def server_config(listen: str, *, tls_cert: str = "", tls_key: str = "", graceful_timeout_s: float = 1.0) -> Config:
    config = Config()
    config.bind = [listen]
    config.graceful_timeout = graceful_timeout_s
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = None
    config.websocket_max_message_size = MAX_MESSAGE_BYTES
    if tls_cert:
        config.certfile, config.keyfile = tls_cert, tls_key
    return config


async def serve_app(app: Any, config: Config, *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until cancelled; reports the bound URLs (``["http://127.0.0.1:PORT"]``)."""
    await serve(app, config, shutdown_trigger=trio.sleep_forever, task_status=task_status)
