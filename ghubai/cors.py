"""Calls from web pages of other origins (CORS), for the hub and the proxy alike.

A browser lets a page of one origin read an answer from another only when the answer names the
page's origin; before a request with an ``Authorization`` header or a JSON body it first asks, with
an ``OPTIONS`` preflight that carries no key. A server with ``cors_origins`` answers that preflight
itself, before any key check, and tags every answer to an allowed origin, errors and streams
included (a page must be able to read a 401 or a 429 too). A request from a page of any other
origin (not listed, and not the server's own) is refused with 403, as Ollama refuses it: a browser
sends some such requests with no preflight (a form's POST, a ``fetch`` in ``no-cors`` mode), which
would otherwise run, any page a user opens spending the grid's GPUs, though it could not read the
answer. Clients that are no browser send no ``Origin``. A page is the server's own when its origin
is the server's ``Host`` (either scheme: behind a front that ends TLS the server hears http), and,
on a server that listens on loopback only, that ``Host`` names this machine: a page of a DNS name an
attacker pointed at 127.0.0.1 (DNS rebinding) is no page of the server's, as Ollama refuses it too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import idna

from ghubai.config import is_loopback

Headers = list[tuple[bytes, bytes]]

ANY = "*"
_EXPOSED = b"x-request-id, retry-after, retry-after-ms"  # headers a page may read beyond the few every page may
_METHODS = b"GET, POST, DELETE, OPTIONS"
_MAX_AGE_S = b"600"  # how long a browser may keep a preflight's answer
_VARY = (b"vary", b"origin")


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}  # a browser names an origin without them


def _origin(name: str) -> bytes:
    name = name.lower()
    if not name.isascii():  # an international host as configured: a browser names it in punycode (UTS 46)
        with contextlib.suppress(idna.IDNAError, UnicodeError, ValueError):
            host = urlsplit(name).hostname or ""
            name = name.replace(host, idna.encode(host, uts46=True).decode(), 1)
    if "[" in name:  # an IPv6 address as a browser writes it ([::1], not [0:0:0:0:0:0:0:1])
        with contextlib.suppress(ValueError):
            host = urlsplit(name).hostname or ""
            name = name.replace(f"[{host}]", f"[{ipaddress.IPv6Address(host).compressed}]", 1)
    scheme = name.partition("://")[0]
    return name.removesuffix(_DEFAULT_PORTS.get(scheme, "\0")).encode()


class Origins:
    """The origins (``scheme://host[:port]``, or ``*`` for any) whose pages may call a server that
    listens on ``listen`` (HOST:PORT)."""

    def __init__(self, origins: Iterable[str], listen: str = "") -> None:
        self.names = frozenset(_origin(origin) for origin in origins)
        self.any = ANY.encode() in self.names
        self.local = is_loopback(listen.rpartition(":")[0].strip("[]"))  # reached from this machine only

    def __bool__(self) -> bool:
        return bool(self.names)

    def allow(self, headers: Sequence[tuple[bytes, bytes]]) -> Headers:
        """What every answer to this request adds: ``Vary: Origin`` (a shared cache must not give
        one page's answer to another), and, for a page that may read the answer, its origin, named
        rather than ``*`` so that it holds for requests with credentials too."""
        origin = next((value for key, value in headers if key == b"origin"), None)
        if origin is None or not (self.any or origin.lower() in self.names):
            return [_VARY]
        return [(b"access-control-allow-origin", origin), _VARY, (b"access-control-expose-headers", _EXPOSED)]


def stranger(origins: Origins, headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The origin of a page that may not call this server (neither listed nor the server's own),
    or None: the request's answer is a 403."""
    origin = next((value for key, value in headers if key == b"origin"), None)
    if origin is None or origins.any or (origin := origin.lower()) in origins.names:
        return None
    host = next((value for key, value in headers if key == b"host"), b"").decode("latin-1")
    own = origin in {_origin(f"{scheme}://{host}") for scheme in ("http", "https")}
    return None if own and (not origins.local or _this_machine(host)) else origin.decode("latin-1")


def _this_machine(host: str) -> bool:
    """A ``Host`` that names this machine (its loopback addresses, ``localhost``, its own name)."""
    try:
        name = urlsplit(f"//{host}").hostname or ""
    except ValueError:
        return False
    return is_loopback(name) or name.endswith(".localhost") or name == socket.gethostname().lower()


def refusal(origin: str) -> str:
    return f"Pages of {origin} may not call this server: its cors_origins does not name that origin"


def allowed(fields: Headers) -> bool:
    """``Origins.allow`` let the page read the answer."""
    return len(fields) > 1


def foreign(key: bytes, value: bytes) -> bool:
    """A header of another server's CORS answer, which a server that answers for itself drops."""
    return key.startswith(b"access-control-") or (key == b"vary" and value.lower() == b"origin")


def preflight(method: str, headers: Sequence[tuple[bytes, bytes]]) -> Headers | None:
    """What a preflight of a request adds to its answer (a 204), or None when the request is no
    preflight. The headers the page asked to send are allowed as asked (``Authorization`` must be
    named: a ``*`` does not cover it); a public page asking to reach this private address is let."""
    if method != "OPTIONS":
        return None
    asked = {key: value for key, value in headers if key.startswith(b"access-control-request-")}
    if b"access-control-request-method" not in asked:
        return None
    extra = [(b"access-control-allow-methods", _METHODS), (b"access-control-max-age", _MAX_AGE_S)]
    if wanted := asked.get(b"access-control-request-headers"):
        extra.append((b"access-control-allow-headers", wanted))
    if asked.get(b"access-control-request-private-network", b"").lower() == b"true":
        extra.append((b"access-control-allow-private-network", b"true"))
    return extra
