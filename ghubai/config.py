"""Configuration of every role: TOML files read with tomllib into validated, frozen dataclasses.

The dataclasses below are the single description of every key: its type, its default and its
check. The loader walks them, so a new key needs one line here and nothing else. Every problem in
a file is collected (``ghubai check`` prints them all); a daemon reports the first one and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import json
import math
import os
import re
import socket
import ssl
import stat
import tomllib
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

from ghubai.protocol import HEARTBEAT_MAX_S, HEARTBEAT_MIN_S, MAX_ANSWER_BYTES


class ConfigError(Exception):
    """A configuration that cannot be used; ``errors`` holds one line per problem, key first."""

    def __init__(self, errors: list[str], passing: bool = False) -> None:
        super().__init__(errors[0] if errors else "invalid configuration")
        self.errors = errors
        self.passing = passing  # the file could not be read for a while (no file descriptor left): try again


# what stops a file being read for a while, not for good
_PASSING = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR, errno.EAGAIN})


Check = Callable[[Any], str | None]


def split_hostport(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` to ``(host, port)``; ValueError when it is neither."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:  # ":::7197" is [::]:7197 as it always was; but "::1" would be host ":" on port 1
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected HOST:PORT, with an IPv6 address in brackets ([::1]:7197), "
                             f"got {text!r}") from None
    return host, int(port)


def listen_host(host: str) -> str | None:
    """The host to bind for ``listen``'s: ``::`` means every address, IPv4 too (trio would bind IPv6
    alone); None is trio's "every address". An IPv4-mapped address is its IPv4 one, which a socket
    that is IPv6 alone (trio's) cannot bind."""
    if host == "::":
        return None
    with contextlib.suppress(ValueError):
        if mapped := ipaddress.IPv6Address(host.partition("%")[0]).ipv4_mapped:
            return str(mapped)
    return host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an unbracketed IP address) is this machine's loopback."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # (::ffff:127.0.0.1: Python 3.11 says no)


def _address(value: str) -> str | None:
    try:
        host, _ = split_hostport(value)
    except ValueError as error:
        return str(error)
    return None if not host or _is_host(host) else f"{host!r} is not a host name or IP address"


_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+")  # a name, an IPv4 or (unbracketed) IPv6 address
_AUTHORITY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*:)?(//)?[^/?#]*")  # a URL up to its path, query or fragment
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")  # as the resolver (and WHATWG URLs) read an IPv4 part


def _is_host(host: str) -> bool:
    """A name the resolver takes (labels of 1-63 characters, 253 in all: ``gpu..lan`` made it raise
    UnicodeError, not the OSError every caller handles), or an IP address. A host whose last label
    is a number is an IPv4 address in dotted decimal or nothing: the resolver reads ``127.1``,
    ``2130706433`` and ``010.0.0.5`` (octal: 8.0.0.5) as addresses, so one hub could be listed as
    several, and httpx refuses ``127.000.000.001`` (such a hub was never checked up)."""
    with contextlib.suppress(ValueError):
        return bool(ipaddress.ip_address(host))  # (an IPv6 address with its scope too: fe80::1%eth0)
    if not _HOST.fullmatch(host):
        return False
    name = host.removesuffix(".")
    if _NUMERIC_LABEL.fullmatch(name.rpartition(".")[2]):
        return False
    return len(name) <= 253 and all(0 < len(label) <= 63 for label in name.split("."))


def url_problem(url: str, schemes: tuple[str, ...], *, credentials: bool = False) -> str | None:
    """What is wrong with ``url`` as an address to dial, or None: its scheme, a host name or IP
    address, and a port, if it has one, from 1 to 65535 — an address every client here can dial.
    ``credentials``: it may carry ``user:password@`` (httpx sends them; logs show ``redacted``)."""
    try:
        return _url_problem(url, schemes, credentials)
    except ValueError as error:  # urlsplit's own refusal: "http://[::1:7197" (a bracket missing), "http://[zz]"
        return f"expected a {' or '.join(s + '://' for s in schemes)} URL, got {shown(url)!r}: {error}"


def _url_problem(url: str, schemes: tuple[str, ...], credentials: bool) -> str | None:
    if "@" in url:  # never echoed: it may hold a password
        if not credentials:
            return "a user name or password in this URL would not be sent, and would reach the logs"
        if urlsplit(url).hostname != urlsplit(redacted(url)).hostname:
            return "a password in a URL must have its / ? # percent-encoded (%2F %3F %23)"
        url = redacted(url)
    parts = urlsplit(url)
    expected = f"expected a {' or '.join(s + '://' for s in schemes)} URL, got {shown(url)!r}"
    if "//" not in url:  # the slip of the pen: "localhost:11434", or "http:/gpu1:11434"
        scheme, colon, rest = url.partition(":")
        if colon and scheme.lower() in schemes:
            return f"{expected} (write {scheme}://{shown(rest.lstrip('/'))})"
        return f"{expected} (no scheme: write {schemes[0]}://{shown(url)})"
    if parts.scheme not in schemes or not parts.hostname:
        return expected
    if "%25" in parts.hostname:  # (RFC 6874's spelling of a zone, which the resolver reads as "25eth0")
        zone = parts.hostname.partition("%25")[2]
        return f"{expected}: write an IPv6 zone as %{zone}, not %25{zone}, which no client here dials"
    if not _is_host(parts.hostname):
        return f"{expected}: {parts.hostname!r} is not a host name or IP address"
    try:
        port = parts.port
    except ValueError:
        port = 0
    return f"{expected}: its port is not a number from 1 to 65535" if port == 0 else None


def hub_address_problem(address: str) -> str | None:
    """What is wrong with ``address`` as a hub's: ``url_problem``'s, or a path (a proxy checks a hub
    at ``address``/api/summary but forwards to its host and port: a hub behind a path-routing
    gateway would look up and answer nothing), or a query."""
    if problem := url_problem(address, ("http", "https")):
        return problem
    parts = urlsplit(address)
    if parts.path.strip("/") or parts.query or parts.fragment:
        return f"a hub's address is scheme://host:port, with no path, query or fragment, got {shown(address)!r}"
    return None


def hub_address(address: str) -> str:
    """The one spelling of a valid hub address (``hub_address_problem``): scheme and host in lower
    case, an IP address in its shortest form, no default port, no trailing "/". ``HTTP://Hub1:80/``
    and ``http://hub1`` are one hub, and so are ``http://[::1]`` and ``http://[0:0::1]``."""
    parts = urlsplit(address)
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    with contextlib.suppress(ValueError):  # (a name)
        ip = ipaddress.ip_address(host)
        host = str(getattr(ip, "ipv4_mapped", None) or ip)  # (::ffff:10.0.0.1 is 10.0.0.1)
    port = "" if parts.port in (None, {"http": 80, "https": 443}.get(scheme)) else f":{parts.port}"
    return f"{scheme}://{f'[{host}]' if ':' in host else host}{port}"


def _hub_addresses(value: str | tuple[str, ...]) -> str | None:
    addresses = (value,) if isinstance(value, str) else value
    return next(filter(None, map(hub_address_problem, addresses)), None) or _urls("http", "https", allow_empty=True)(value)


def shown(url: str) -> str:
    """``url`` as an error may quote it: without its password (``redacted``), and without a path,
    query or fragment, where a token may sit too (``?api_key=...``); the errors that quote it are
    about its scheme, host or port."""
    url = redacted(re.sub(r"[\t\r\n]", "", url))  # (as urlsplit reads it)
    try:
        parts = urlsplit(url)
    except ValueError:  # (a bracket missing, "http://[zz]"): cut by hand, after the scheme and host
        parts = None
    if parts is None or not parts.netloc:  # (and "10.0.0.5:7197", whose host and port urlsplit reads as a path)
        kept = _AUTHORITY.match(url)
        return url if kept is None or kept.end() == len(url) else f"{kept[0]}/…"
    if parts.path.strip("/") or parts.query or parts.fragment:
        return f"{parts.scheme}://{parts.netloc}/…"
    return url


def redacted(url: str) -> str:
    """``url`` without the password it may carry, for a log."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{host}" if at else url


def scrubbed(text: str, url: str) -> str:
    """``text`` (an error's, which may quote the URL whole, as httpx's do) without ``url``'s password."""
    userinfo, at, _ = url.partition("://")[2].rpartition("@")
    password = userinfo.partition(":")[2] if at else ""
    return text.replace(password, "***") if password else text


def _urls(*schemes: str, allow_empty: bool = False, credentials: bool = False) -> Check:
    def check(value: str | tuple[str, ...]) -> str | None:
        for url in (value,) if isinstance(value, str) else value:
            if problem := url_problem(url, schemes, credentials=credentials):
                return problem
        if not value and not allow_empty:
            return "expected at least one URL"
        if not isinstance(value, str) and (twice := next((url for url in value if value.count(url) > 1), None)):
            return f"{twice!r} is listed twice"
        return None

    return check


def _name(value: str) -> str | None:
    """A worker's or a hub's name, which logs, pages, metrics' labels and headers show: as the link's
    frames take one (a registry took 3,000 characters and control characters)."""
    if len(value) <= 128 and not re.search(r"[\x00-\x1f\x7f-\x9f]", value):
        return None
    return "must be at most 128 characters, none of them a control character"


def _at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be at least {low}, got {value}"


def _one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"


def _key(check: Check | None = None, doc: str = "", *, one_or_many: bool = False, required: bool = False,
         secret: bool = False, **kwargs: Any) -> Any:
    """A dataclass field with its check and the comment ``ghubai init`` writes above it;
    ``one_or_many`` lets a list key also be given as a single string; the value of a ``secret`` key
    never appears in an error message (they reach logs) nor in the config's repr."""
    return field(metadata={"check": check, "doc": doc, "one_or_many": one_or_many, "required": required,
                           "secret": secret}, repr=not secret, **kwargs)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
# What every HTTP client sends as is: visible ASCII, inner spaces, no space at either end.
_HEADER_VALUE = re.compile(r"([\x21-\x7e]([\x20-\x7e\t]*[\x21-\x7e])?)?")
_OWN_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-type", "authorization",
                "expect", "te", "upgrade", "keep-alive", "trailer", "proxy-connection", "accept-encoding",
                "x-request-id", "traceparent", "tracestate", "x-ghubai-engine-call"}


def _readable(path: str) -> str | None:
    """A TLS file the daemon will read: checked here, so that a wrong path is a one-line error that
    names its key (and ``ghubai check`` finds it), not a traceback at startup. Opened, and the
    system's reason said: a file in a folder the daemon's user may not enter (certbot's ``live/``)
    was "no such file" to an existence check; a folder passed an access check. Only a regular file
    is opened: opening a FIFO waits for a writer (a reload would hang)."""
    if not path:
        return None
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            return f"cannot read {path!r} (not a regular file)"
        os.close(os.open(path, os.O_RDONLY))
    except OSError as error:
        return f"cannot read {path!r} ({error.strerror})"
    return None


def engine_key_problem(key: str) -> str | None:
    if re.fullmatch(r"[\x21-\x7e]*", key):
        return None
    return "must be visible ASCII without spaces or line breaks (a key read from a file keeps its line end)"


def _secrets(value: str | tuple[str, ...]) -> str | None:
    """Keys and tokens as a client or worker can present them: a header value is visible ASCII (a
    server reads others as Latin-1, and they would never match) with no space at either end (a key
    read from a file keeps its line end, and would never match)."""
    for secret in (value,) if isinstance(value, str) else value:
        if not _HEADER_VALUE.fullmatch(secret):
            return "must be visible ASCII (spaces inside allowed), with no line break, control character or space " \
                   "at either end (a key read from a file keeps its line end)"
        if not isinstance(value, str) and not secret:
            return "an entry must not be empty"
        if secret.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", secret):
            return 'a "sha256:" entry must hold the 64 hex digits of the key\'s SHA-256 digest'
    return None


def engine_url_problem(url: str) -> str | None:
    """``url_problem``'s, or a path ending in ``/v1``: the base URL an OpenAI SDK is given is not the
    engine's root, and every call would go to ``/v1/v1/...`` (or ``/v1/api/...``) and find nothing."""
    if problem := url_problem(url, ("http", "https")):  # (advice for an engine's key: a hub's or registry's has none)
        return problem + (" (an engine's key goes in [engine] api_key or headers)" if "@" in url else "")
    parts = urlsplit(url)
    if parts.query or parts.fragment:  # (never sent as one: it went into every path; and a key there was logged)
        return "an engine's URL has no query or fragment (a key goes in [engine] api_key or headers), " \
               f"got {shown(url)!r}"
    if parts.path.rstrip("/").lower().endswith("/v1"):
        return "give the engine's root URL: drop the final /v1 (the worker adds /v1/... or /api/... itself)"
    return None


def _engine_headers(headers: dict[str, str]) -> str | None:
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            return f"{name!r} is not a header name"
        if name.lower() in _OWN_HEADERS:
            return f"{name!r} is set by the worker" + (" (use api_key)" if name.lower() == "authorization" else "")
        if not _HEADER_VALUE.fullmatch(value):
            return f"the value of {name!r} must be visible ASCII, with no space at either end"
    return None


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s@]+", re.IGNORECASE)  # scheme://host[:port], no path


def _origins(origins: tuple[str, ...]) -> str | None:
    for origin in origins:
        if origin != "*" and "*" in origin:  # (OLLAMA_ORIGINS takes them; a browser names one origin exactly)
            return f"{origin!r}: a wildcard is \"*\" alone, for any origin; list each origin in full"
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            return f"{origin!r} is not an origin: scheme://host[:port] as a browser names a page's, or \"*\""
    return None


def _unique_names(hubs: tuple[Any, ...]) -> str | None:
    """Names and addresses each once: a proxy knows a hub by its address (``hub_address``), so a
    second name for one would be merged into it, under one of the two names."""
    duplicates = sorted(name for name, count in Counter(hub.name for hub in hubs).items() if count > 1)
    if duplicates:
        return f"hub names must be unique: {', '.join(duplicates)} appears more than once"
    twice = sorted(address for address, count in Counter(hub_address(hub.address) for hub in hubs).items() if count > 1)
    return f"hub addresses must be unique: {', '.join(twice)} is listed more than once" if twice else None


def _bytes_up_to(high: int, why: str) -> Check:
    """At least 1 KiB, at most ``high`` bytes (a size the grid's protocol cannot go past, ``why``)."""
    return lambda value: (f"must be at most {high} ({high >> 20} MiB): {why}, got {value}" if value > high
                          else _at_least(1024)(value))


@dataclass(frozen=True)
class HubLimits:
    """``[limits]`` of ``hub.toml``: request size, queue and budgets."""
    max_body_bytes: int = _key(_bytes_up_to(48 << 20, "a request goes to its worker in one WebSocket message "
                                            "of at most 64 MiB"),
                               "larger request bodies get 413, and so do bodies sent in more "
                               "than max(1024, this / 1024) pieces under 1 KiB (at most 48 MiB)", default=4 * 1024 * 1024)
    max_header_bytes: int = _key(_at_least(1024), "larger request heads get 431", default=16384)
    max_headers: int = _key(_at_least(1), "more header lines get 431", default=100)
    body_timeout_s: float = _key(_at_least(0.1), "a request body must arrive whole within this, after its "
                                 "head -> 408", default=60.0)
    idle_timeout_s: float = _key(_at_least(0.1), "an idle kept-alive connection is closed after this (above a "
                                 "front's, nginx's 60 s)", default=75.0)
    queue_size: int = _key(_at_least(0), "requests waiting for a free worker slot; full -> 429 with Retry-After",
                           default=256)
    queue_timeout_s: float = _key(_at_least(0), "longest wait for a worker slot, over all of a request's attempts "
                                  "-> 503 with Retry-After", default=30.0)
    max_attempts: int = _key(_at_least(1), "workers tried for a request that has sent no byte yet", default=3)
    max_worker_concurrency: int = _key(_at_least(1), "the most slots a worker's hello may claim; more is cut to this",
                                       default=1024)
    max_answer_bytes: int = _key(_bytes_up_to(MAX_ANSWER_BYTES, "a worker returns no larger whole answer"),
                                 "a larger non-streamed answer gets 502 (a stream has no bound; at most 64 MiB)",
                                 default=MAX_ANSWER_BYTES)
    requests_per_minute: int = _key(_at_least(0), "per client key; 0 = off", default=0)
    tokens_per_minute: int = _key(_at_least(0), "per client key; 0 = off", default=0)
    max_connections: int = _key(_at_least(1), "open connections, clients' and workers' links together; more are "
                                "turned away with 503 (capped to what the process's file limit allows)",
                                default=10000)


@dataclass(frozen=True)
class HubTimeouts:
    """``[timeouts]`` of ``hub.toml``: every wait of a request is bounded by one of these."""
    connect_s: float = _key(_at_least(0.001), "a worker that connects must say hello within this", default=5.0)
    first_token_s: float = _key(_at_least(0.001), "a model may need minutes to load; for a request that does not "
                                "stream, its whole answer", default=300.0)
    idle_s: float = _key(_at_least(0.001), "longest silence between two chunks of a stream", default=120.0)
    total_s: float = _key(_at_least(0.001), "", default=3600.0)


@dataclass(frozen=True)
class SchedulerConfig:
    """``[scheduler]`` of ``hub.toml``: how a worker is chosen for a request."""
    policy: str = _key(_one_of("llm-aware", "least-loaded"),
                       "llm-aware: a worker with the model in memory first, then the one that served the "
                       "conversation, then the least loaded; least-loaded: only the last", default="llm-aware")
    affinity_margin: float = _key(_at_least(0), "a conversation stays on its worker while that worker's load "
                                  "(busy slots / max_concurrency / weight) is at most this above the least loaded",
                                  default=0.5)
    affinity_entries: int = _key(_at_least(0), "conversations remembered (the least recently used forgotten)",
                                 default=100_000)
    warm_wait_s: float = _key(_at_least(0), "a request waits this long for a slot on a worker that holds its model "
                              "in memory before it loads the model on another", default=1.0)


@dataclass(frozen=True)
class HubConfig:
    """``hub.toml``: where to listen, who may join and call, limits and timeouts."""
    listen: str = _key(_address, "HTTP API and the workers' WebSocket /gridhub, on one port (127.0.0.1: this "
                       "machine only; 0.0.0.0:7197 for workers and proxies elsewhere)", default="127.0.0.1:7197")
    provider_tokens: tuple[str, ...] = _key(_secrets, "tokens workers present; empty = ANY worker may join",
                                            secret=True, default=())
    api_keys: tuple[str, ...] = _key(_secrets, 'client keys (Bearer), plain or "sha256:<hex>"; empty = no client auth',
                                     secret=True, default=())
    cors_origins: tuple[str, ...] = _key(_origins, 'web pages that may call from the browser, as scheme://host[:port], '
                                         'or "*" for any; other pages than the server\'s own get 403',
                                         one_or_many=True, default=())
    heartbeat_s: float = _key(lambda value: None if HEARTBEAT_MIN_S <= value <= HEARTBEAT_MAX_S else
                              f"must be from {HEARTBEAT_MIN_S} to {HEARTBEAT_MAX_S:g} (what a worker takes), "
                              f"got {value}",
                              "a worker silent for 3 heartbeats is dropped", default=5.0)
    drain_timeout_s: float = _key(_at_least(0), "on SIGTERM, how long in-flight streams may finish", default=30.0)
    tls_cert: str = _key(_readable, "PEM files to serve HTTPS and WSS", default="")
    tls_key: str = _key(_readable, default="")
    limits: HubLimits = HubLimits()
    timeouts: HubTimeouts = HubTimeouts()
    scheduler: SchedulerConfig = SchedulerConfig()


@dataclass(frozen=True)
class EngineConfig:
    """``[engine]`` of ``worker.toml``: the local engine and how much of it the grid may use."""
    kind: str = _key(_one_of("ollama", "openai"), "ollama, or openai (llama.cpp server, vLLM, LM Studio ...)",
                     default="ollama")
    url: str = _key(engine_url_problem, "the engine's root URL (without /v1)", default="http://localhost:11434")
    max_concurrency: int = _key(_at_least(1), "requests run at once, across all hubs; match OLLAMA_NUM_PARALLEL",
                                default=4)
    discovery_interval_s: float = _key(
        _at_least(0.01), "how often the model list is refreshed (while the engine lists none because of a "
                         "problem, such as no answer: after 1 s, 2 s, 4 s ... up to this)", default=30.0)
    connect_timeout_s: float = _key(_at_least(0.001), "a connection to the engine, and the worker's to each hub "
                                    "(TCP, TLS and the WebSocket handshake)", default=5.0)
    idle_timeout_s: float = _key(_at_least(0.001), "longest silence of the engine in the middle of a streamed answer "
                                 "(before it begins, and a whole answer: the hub's first_token_s)", default=300.0)
    api_key: str = _key(engine_key_problem, "sent as 'Authorization: Bearer' on every engine call (vLLM/llama.cpp "
                        "--api-key, LiteLLM's key); env GHUBAI_ENGINE_API_KEY wins", secret=True, default="")
    headers: dict[str, str] = _key(_engine_headers, "extra headers on every engine call, e.g. "
                                   '{ "OpenAI-Organization" = "org-1" }', secret=True, default_factory=dict)
    tools: bool = _key(None, "openai engines: /api/show advertises tool support (llama.cpp's /props overrides)",
                       default=True)
    residency_interval_s: float = _key(_at_least(0.1), "how often Ollama is asked which models it holds in memory "
                                       "(/api/ps), besides right after a model was loaded", default=2.0)


@dataclass(frozen=True)
class WorkerConfig:
    """``worker.toml``: the hubs to dial, the provider token, the engine."""
    hub_url: tuple[str, ...] = _key(
        _urls("ws", "wss"), "wss:// for TLS; a list links the worker to every hub in it", one_or_many=True,
        default=("ws://localhost:7197/gridhub",))
    provider_token: str = _key(_secrets, "presented to the hubs (env PROVIDER_TOKEN wins)", secret=True, default="")
    name: str = _key(_name, "default: the host name", default="")
    ca_file: str = _key(_readable, "CA bundle for wss:// hubs", default="")
    allow_invalid_certs: bool = _key(None, "development only", default=False)
    drain_timeout_s: float = _key(_at_least(0), "on SIGTERM, how long running requests may finish", default=30.0)
    weight: float = _key(lambda v: None if 0 < v <= 1000 else f"must be above 0 and at most 1000, got {v}",
                         "hubs give a worker of weight 2 twice the load of one of weight 1 (a faster GPU)",
                         default=1.0)
    engine: EngineConfig = EngineConfig()


@dataclass(frozen=True)
class HubEntry:
    """One ``[[hubs]]`` entry of the registry's list."""
    name: str = _key(lambda v: _name(v) if v else "must not be empty", required=True, default="")
    address: str = _key(_hub_addresses, required=True, default="")


@dataclass(frozen=True)
class RegistryConfig:
    """``registry.toml``: where to listen, and the hubs it publishes."""
    listen: str = _key(_address, "where proxies ask for the hub list (127.0.0.1: this machine only)",
                       default="127.0.0.1:7001")
    tls_cert: str = _key(_readable, "PEM files to serve HTTPS", default="")
    tls_key: str = _key(_readable, default="")
    max_connections: int = _key(_at_least(1), "open connections, proxies' long polls included; more are turned "
                                "away with 503 (capped to what the process's file limit allows)", default=10000)
    hubs: tuple[HubEntry, ...] = _key(_unique_names, "edit and save: proxies follow within a second", default=())


@dataclass(frozen=True)
class HealthConfig:
    """``[health]`` of ``proxy.toml``: how often and how long hubs are checked."""
    interval_s: float = _key(_at_least(0.05), "GET /api/summary of every hub this often (its health, models and "
                             "queue; every fifth check /api/registry, its workers)", default=2.0)
    timeout_s: float = _key(_at_least(0.01), "", default=1.0)
    down_after: int = _key(_at_least(1), "a hub that is up goes down when this many checks in a row fail (one "
                           "slow answer under load is not an outage; a refused connection takes it down at once)",
                           default=2)


@dataclass(frozen=True)
class ProxyLimits:
    """``[limits]`` of ``proxy.toml``: what a client request may be."""
    max_body_bytes: int = _key(_at_least(1024), "larger request bodies get 413, and so do bodies sent in more "
                               "than max(1024, this / 1024) pieces under 1 KiB", default=4 * 1024 * 1024)
    max_header_bytes: int = _key(_at_least(1024), "larger request heads get 431", default=16384)
    max_headers: int = _key(_at_least(1), "more header lines get 431", default=100)
    idle_timeout_s: float = _key(_at_least(0.1), "an idle client connection is closed after this", default=75.0)
    header_timeout_s: float = _key(_at_least(0.1), "a request head must arrive whole within this, from its "
                                   "first byte", default=10.0)
    body_timeout_s: float = _key(_at_least(0.1), "a request body must arrive whole within this, after its "
                                 "head -> 408", default=60.0)
    max_connections: int = _key(_at_least(1), "open client connections; more are turned away with 503 (capped "
                                "to what the process's file limit allows)", default=10000)


@dataclass(frozen=True)
class ProxyConfig:
    """``proxy.toml``: where to listen, where hubs come from, keys and timeouts."""
    listen: str = _key(_address, "the grid's front door (127.0.0.1: this machine only; 0.0.0.0:5000 for "
                       "clients elsewhere)", default="127.0.0.1:5000")
    registry_url: str = _key(lambda v: _urls("http", "https", credentials=True)(v) if v else None,
                             'the registry to follow (env REGISTRY_URL wins); "" = static hubs only',
                             default="http://localhost:7001")
    hubs: tuple[str, ...] = _key(_hub_addresses, "static hub addresses, used with or without a registry",
                                 default=())
    api_keys: tuple[str, ...] = _key(_secrets, 'client keys (Bearer), plain or "sha256:<hex>"; empty = no client auth',
                                     secret=True, default=())
    cors_origins: tuple[str, ...] = _key(_origins, 'web pages that may call from the browser, as scheme://host[:port], '
                                         'or "*" for any; other pages than the server\'s own get 403',
                                         one_or_many=True, default=())
    max_attempts: int = _key(_at_least(1), "hubs tried for a request that has sent no byte yet", default=3)
    connect_timeout_s: float = _key(_at_least(0.001), "", default=2.0)
    response_timeout_s: float = _key(_at_least(0.001), "longest silence of a hub, before its answer and between "
                                     "its chunks (keep it above the hubs' first_token_s and idle_s)", default=3600.0)
    drain_timeout_s: float = _key(_at_least(0), "on SIGTERM, how long forwarded answers may finish "
                                  "(new requests get 503 meanwhile)", default=30.0)
    tls_cert: str = _key(_readable, "PEM files to serve HTTPS", default="")
    tls_key: str = _key(_readable, default="")
    ca_file: str = _key(_readable, "CA bundle for https:// hubs and registry", default="")
    allow_invalid_certs: bool = _key(None, "development only", default=False)
    health: HealthConfig = HealthConfig()
    limits: ProxyLimits = ProxyLimits()


ROLES: dict[str, type] = {"registry": RegistryConfig, "hub": HubConfig, "worker": WorkerConfig,
                          "proxy": ProxyConfig}


def _got(raw: Any) -> str:
    """A TOML value as an error quotes it: as TOML spells it (``true``, not Python's ``True``)."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return json.dumps(raw, ensure_ascii=False, default=str) if isinstance(raw, list | dict) else repr(raw)


def _coerce(hint: Any, raw: Any, one_or_many: bool) -> tuple[Any, str | None]:
    """TOML value to the field's type, or a reason why it is not one."""
    if hint is bool:
        return raw, None if isinstance(raw, bool) else f"expected true or false, got {_got(raw)}"
    if hint is int:  # (TOML's: 64 bits; Python's tomllib reads more)
        if not isinstance(raw, int) or isinstance(raw, bool):
            return raw, f"expected an integer, got {_got(raw)}"
        return raw, None if abs(raw) < 1 << 63 else f"expected an integer of at most 2**63 - 1, got {str(raw)[:40]}"
    if hint is float:  # finite: inf went out in JSON as null (a hub's heartbeat_s: no worker could link)
        if not isinstance(raw, int | float) or isinstance(raw, bool):
            return raw, f"expected a number, got {_got(raw)}"
        ok = abs(raw) <= 1e308 and math.isfinite(raw)  # (an int past a float's range too)
        return (float(raw) if ok else raw), None if ok else f"expected a finite number, got {str(raw)[:40]}"
    if hint is str:
        return raw, None if isinstance(raw, str) else f"expected a string, got {_got(raw)}"
    if typing.get_origin(hint) is dict:
        ok = isinstance(raw, dict) and all(isinstance(value, str) for value in raw.values())
        return (dict(raw) if ok else raw), None if ok else f"expected a table of strings, got {_got(raw)}"
    if typing.get_origin(hint) is tuple:
        if one_or_many and isinstance(raw, str):
            raw = [raw]
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return tuple(raw), None
        return raw, f"expected a list of strings, got {_got(raw)}"
    raise TypeError(f"no TOML conversion for {hint!r}")  # a programming error in this module


def _build(cls: type, table: Mapping[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    errors.extend(f"{prefix}{key}: unknown key" for key in table if key not in known)
    values: dict[str, Any] = {}
    for name, spec in known.items():
        if name not in table:
            if spec.metadata.get("required"):
                errors.append(f"{prefix}{name}: missing")
            continue
        raw, hint, path = table[name], hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            if isinstance(raw, dict):
                values[name] = _build(typing.cast(type, hint), raw, path + ".", errors)
            else:
                # its type, not its value: a table's keys may be secrets ([[engine]] for [engine] showed the key)
                twice = f" (write [{path}], not [[{path}]])" if isinstance(raw, list) else ""
                errors.append(f"{path}: expected a table, got {type(raw).__name__}{twice}")
            continue
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
        if dataclasses.is_dataclass(item):  # an array of tables, such as [[hubs]]
            if not isinstance(raw, list) or not all(isinstance(entry, dict) for entry in raw):
                errors.append(f"{path}: expected an array of tables ([[{name}]]), got {type(raw).__name__}")
                continue
            before = len(errors)
            entries = tuple(_build(typing.cast(type, item), entry, f"{path}[{index}].", errors)
                            for index, entry in enumerate(raw))
            check = spec.metadata.get("check")
            if len(errors) == before and check is not None and (problem := check(entries)):
                errors.append(f"{path}: {problem}")
            values[name] = entries
            continue
        value, problem = _coerce(hint, raw, spec.metadata.get("one_or_many", False))
        check = spec.metadata.get("check")
        if problem is None and check is not None:
            problem = check(value)
        if problem and spec.metadata.get("secret"):
            problem, got, _ = problem.partition(", got ")
            problem += f", got {type(raw).__name__} (a secret: its value is not shown)" if got else ""
        if problem:
            errors.append(f"{path}: {problem}")
        else:
            values[name] = value
    return cls(**values)


NO_FILE = "<config>"
_FILE_KEYS = ("tls_cert", "tls_key", "ca_file")  # files a daemon reads: relative to its config file's folder


def _beside(table: dict[str, Any], folder: str) -> None:
    """Relative paths of files a daemon reads are read from its config file's folder, wherever the
    daemon runs from (a systemd unit runs in /), as ``ghubai check`` sees them from anywhere."""
    for key in _FILE_KEYS:
        if isinstance(path := table.get(key), str) and path and not os.path.isabs(path):
            table[key] = os.path.join(folder, path)


def _tls_problems(config: Any) -> list[str]:
    """What a daemon would refuse of its TLS files only when it starts (with a line that names no
    key): a certificate without its key, or with another pair's, an encrypted key (no one is
    there to type its password), a CA bundle that holds no certificate."""
    problems = []
    if cert := getattr(config, "tls_cert", ""):
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                cert, getattr(config, "tls_key", "") or None, password=lambda: b"")
        except (ssl.SSLError, OSError, ValueError) as error:
            problems.append(f"tls_cert, tls_key: not a certificate and its private key, unencrypted ({_why(error)})")
    if (ca_file := getattr(config, "ca_file", "")) and (problem := ca_file_problem(ca_file)):
        problems.append(f"ca_file: {problem}")
    return problems


def ca_file_problem(ca_file: str) -> str | None:
    """Why ``ca_file`` cannot be trusted from (a folder, no such file, no certificate in it), as a
    daemon's ``ca_file`` and ``ghubai status --ca-file`` say it; None when it can."""
    try:
        ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, OSError, ValueError) as error:
        return f"not a bundle of PEM certificates ({_why(error)})"
    return None


def renew_certificate(context: ssl.SSLContext, cert: str, key: str) -> str:
    """Read a server's certificate and key again into the context it listens with (certbot's deploy
    hook, then a reload): connections made after it are served the new pair, those open keep theirs.
    The pair is tried on a context of its own first, as ``ghubai check`` does; a certificate loaded
    beside a key it does not match would fail every handshake after it. ConfigError when it is no pair."""
    if problems := _tls_problems(SimpleNamespace(tls_cert=cert, tls_key=key)):
        raise ConfigError(problems)
    context.load_cert_chain(cert, key or None)
    return f"the TLS certificate read again from {cert}"


def _why(error: Exception) -> str:
    return str(getattr(error, "reason", None) or getattr(error, "strerror", None) or error)


def parse(role: str, text: str, source: str = NO_FILE) -> Any:
    """Validate TOML text for ``role``; raises ConfigError with every problem found."""
    try:
        table = tomllib.loads(text)
    except (ValueError, RecursionError) as error:  # (tomllib's, and its limits: 3,000 nested [, 5,000 digits)
        raise ConfigError([f"{source}: not valid TOML: {error}"]) from None
    errors: list[str] = []
    if source != NO_FILE:
        _beside(table, os.path.dirname(os.path.abspath(source)))
    config = _build(ROLES[role], table, "", errors)
    if getattr(config, "tls_key", "") and not getattr(config, "tls_cert", "") and \
            not any(error.startswith("tls_cert:") for error in errors):  # it would serve plain HTTP (not: unreadable)
        errors.append("tls_key: given without tls_cert (a key alone serves no HTTPS)")
    if not errors:
        errors += _tls_problems(config)
    if errors:
        raise ConfigError([f"{source}: {line}" for line in errors])
    return config


def unlisted_hubs(text: str, source: str) -> str | None:
    """Why a registry file (valid for ``parse``) gives no hub list: it has no ``hubs`` key at all,
    as an empty or half-written file (a full disk, a save caught midway) has; such a file must not
    empty the grid, while ``hubs = []`` does, on purpose. The registry serves no list on it, and
    ``ghubai check`` says so."""
    if "hubs" in tomllib.loads(text):
        return None
    return (f"{source}: no hubs key (hubs only in comments, as ghubai init writes them, or an empty or "
            "half-written file); list [[hubs]] entries, or write hubs = [] to serve no hub")


MAX_CONFIG_BYTES = 1 << 20  # a config or registry file is kilobytes


def read_text(path: str) -> str:
    """A config file's text; what stops it being read is a ConfigError. Only a regular file of at
    most ``MAX_CONFIG_BYTES`` is read (a link to /dev/zero or a huge file would stall the daemon)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError([f"{path}: not a regular file"])
        with open(path, "rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES} bytes"])
        return raw.decode("utf-8-sig")  # (a byte-order mark before it: Notepad, PowerShell 5)
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"], error.errno in _PASSING) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{path}: not UTF-8 (byte {error.start})"]) from None


def load(role: str, path: str | None, env: Mapping[str, str] | None = None) -> Any:
    """The config of ``role`` from ``path`` (defaults when None), with the role's env overrides."""
    config = ROLES[role]() if path is None else parse(role, read_text(path), path)
    return _with_env(role, config, os.environ if env is None else env)


def reload_file(role: str, path: str, kept: Iterable[str] = ()) -> Any:
    """The config of ``role`` read again from ``path`` for a running daemon. ``kept``: the secret lists it
    runs with (``api_keys``, ``provider_tokens``) that a file without their key must not drop: an empty
    or half-written file (a full disk, a save caught midway) would turn authentication off, while
    ``api_keys = []`` does, on purpose."""
    text = read_text(path)  # (read once: what is checked is what is applied)
    config = parse(role, text, path)
    if missing := [key for key in kept if key not in tomllib.loads(text)]:
        raise ConfigError([f"{path}: no {key} key (an empty or half-written file?); write {key} = [] to turn it "
                           "off" for key in missing])
    return _with_env(role, config, os.environ)


def _with_env(role: str, config: Any, env: Mapping[str, str]) -> Any:
    if role == "worker":
        config = worker_env_overrides(config, env)
    elif role == "proxy" and env.get("REGISTRY_URL"):
        errors: list[str] = []
        override = _build(ProxyConfig, {"registry_url": env["REGISTRY_URL"]}, "", errors)
        if errors:
            raise _environment_error(errors)
        config = dataclasses.replace(config, registry_url=override.registry_url)
    return config


_VARIABLES = {"hub_url": "HUB_URL", "provider_token": "PROVIDER_TOKEN", "engine.api_key": "GHUBAI_ENGINE_API_KEY",
              "engine.url": "OLLAMA_LOCAL_URL", "registry_url": "REGISTRY_URL",
              "allow_invalid_certs": "ALLOW_INVALID_CERTS"}  # key -> the variable that sets it


def _environment_error(errors: list[str]) -> ConfigError:
    """Problems of the values the environment set, each named by its variable (a unit's ``Environment=``
    line), with the key it stands for: the file's key may be right."""
    lines = []
    for line in errors:
        key, _, why = line.partition(":")
        variable = _VARIABLES.get(key.partition("[")[0], "")
        lines.append(f"environment: {variable} ({key}):{why}" if variable else f"environment: {line}")
    return ConfigError(lines)


_SWITCHES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def worker_env_overrides(config: WorkerConfig, env: Mapping[str, str]) -> WorkerConfig:
    """The seed's variables win over the file: HUB_URL (comma-separated), PROVIDER_TOKEN,
    OLLAMA_LOCAL_URL, ALLOW_INVALID_CERTS; and GHUBAI_ENGINE_API_KEY, so a key need not sit in the
    file. An empty one counts as unset (a unit's ``Environment=PROVIDER_TOKEN=`` placeholder must not
    wipe the file's token). The result is validated like the file."""
    table: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    if env.get("HUB_URL"):
        table["hub_url"] = [url.strip() for url in env["HUB_URL"].split(",") if url.strip()]
    if env.get("PROVIDER_TOKEN"):
        table["provider_token"] = env["PROVIDER_TOKEN"]
    if env.get("GHUBAI_ENGINE_API_KEY"):
        engine["api_key"] = env["GHUBAI_ENGINE_API_KEY"]
    if env.get("OLLAMA_LOCAL_URL"):
        engine["url"] = env["OLLAMA_LOCAL_URL"]
    if env.get("ALLOW_INVALID_CERTS"):  # a word of neither kind is the type's error (it was off, silently)
        said = env["ALLOW_INVALID_CERTS"]
        table["allow_invalid_certs"] = _SWITCHES.get(said.strip().lower(), said)
    errors: list[str] = []
    override = _build(WorkerConfig, table | {"engine": engine}, "", errors)
    if errors:
        raise _environment_error(errors)
    changed = {name: getattr(override, name) for name in table}
    changed_engine = {name: getattr(override.engine, name) for name in engine}
    config = dataclasses.replace(config, **changed, engine=dataclasses.replace(config.engine, **changed_engine))
    if not config.name:
        config = dataclasses.replace(config, name=socket.gethostname())
    return config


def with_listen(config: Any, listen: str | None) -> Any:
    """The ``--listen`` flag overrides the file's ``listen``."""
    if listen is None:
        return config
    if problem := _address(listen):
        raise ConfigError([f"--listen: {problem}"])
    return dataclasses.replace(config, listen=listen)

