"""The ``ghubai`` command: one sub-command per role, plus ``up`` for the whole grid on one machine."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import signal
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable

import trio

from ghubai import __version__
from ghubai.config import ConfigError, engine_key_problem, engine_url_problem, load, split_hostport, with_listen
from ghubai.launch import ignore_hangups, interrupted
from ghubai.observability import logs, tracing
from ghubai.observability.service import Service
from ghubai.resolver import NameLookups

log = logging.getLogger("ghubai")


async def _until_signal(scope: trio.CancelScope, drain: trio.Event | None, service: Service, reloads: bool, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM asks a role that drains (``drain`` given) to finish its work, then return; SIGINT, a
    second SIGTERM, or SIGTERM to a role with nothing to drain stops at once. SIGHUP reloads what a
    daemon can reload; for ``ghubai up`` and the simulator (``reloads`` false) it is a terminal
    hang-up, and stops them."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP and reloads:
                service.reloaded()
                continue
            if signum == signal.SIGTERM and drain is not None and not drain.is_set():
                log.info("SIGTERM: draining (send it again to stop at once)")
                service.stopping()
                drain.set()
                continue
            log.info("%s: stopping", signal.Signals(signum).name)
            service.stopping()
            scope.cancel()
            return


Main = Callable[[trio.Event, Service], Awaitable[object]]


def _run(main: Main) -> int:
    """Run a daemon, ``main(drain, service)``, until it returns or a signal stops it; a clean stop
    exits 0. SIGHUP reloads it."""
    return _serve(main, reloads=True, drains=True)


def _stopping_on(main: Callable[[Service], Awaitable[object]]) -> int:
    """Run a role with nothing to drain and nothing to reload (``ghubai up``, the simulator):
    SIGTERM simply stops it, and SIGHUP too."""
    return _serve(lambda drain, service: main(service), reloads=False, drains=False)


def _serve(main: Main, reloads: bool, drains: bool) -> int:
    async def runner() -> None:
        trio.socket.set_custom_hostname_resolver(NameLookups())
        drain, service = trio.Event(), Service()
        try:
            async with trio.open_nursery() as nursery:
                # listening before the role's first line: a Ctrl-C in its start was a traceback, and exit 1
                await nursery.start(_until_signal, nursery.cancel_scope, drain if drains else None, service, reloads)
                nursery.start_soon(service.run)
                await main(drain, service)
                nursery.cancel_scope.cancel()
        finally:  # (a crash too: its spans say what led to it)
            with trio.CancelScope(shield=True):
                await tracing.flush()

    trio.run(runner)
    return 0


def _hub(args: argparse.Namespace) -> int:
    from ghubai.hub.app import run

    config = with_listen(load("hub", args.config), args.listen)
    return _run(lambda drain, service: run(config, path=args.config, drain=drain, service=service))


def _registry(args: argparse.Namespace) -> int:
    from ghubai import configfiles

    if args.action == "add-hub":
        configfiles.add_hub(_required_config(args), args.name, args.address)
        print(f"{args.config}: added hub {args.name} at {args.address}")
        return 0
    if args.action == "remove-hub":
        configfiles.remove_hub(_required_config(args), args.name)
        print(f"{args.config}: removed hub {args.name}")
        return 0
    from ghubai.registry.server import run

    config = with_listen(load("registry", args.config), args.listen)
    return _run(lambda stop, service: run(config, args.config, service=service, stop=stop))


def _required_config(args: argparse.Namespace) -> str:
    if not args.config:
        raise ConfigError(["--config FILE is required to edit a registry file"])
    return str(args.config)


def _proxy(args: argparse.Namespace) -> int:
    from ghubai.proxy.server import run

    config = with_listen(load("proxy", args.config), args.listen)
    return _run(lambda drain, service: run(config, path=args.config, drain=drain, service=service))


def _init(args: argparse.Namespace) -> int:
    from ghubai.configfiles import init

    try:
        written = init(args.dir, force=args.force)
    except OSError as error:
        if isinstance(error, FileExistsError) and error.errno is None:  # (init's own: the files it would replace)
            print(f"ghubai init: not overwriting {error} (use --force)", file=sys.stderr)
        else:  # (a part of --dir that is a file, a config's name taken by a folder, no permission)
            print(f"ghubai init: {error.filename2 or error.filename or args.dir}: {error.strerror or error}",
                  file=sys.stderr)
        return 1
    for path in written:  # (after: a reader that left was blamed on the folder)
        print(f"wrote {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from ghubai.configfiles import check, role_of

    role = args.role or role_of(args.file)
    if role is None:
        print(f"ghubai check: cannot tell the role of {args.file} from its name; pass --role", file=sys.stderr)
        return 1
    errors = check(args.file, role)
    for line in errors:
        print(line, file=sys.stderr)
    if not errors:
        print(f"{args.file}: valid {role} configuration")
    return 1 if errors else 0


def _worker(args: argparse.Namespace) -> int:
    from ghubai.worker.agent import run

    config = load("worker", args.config)
    return _run(lambda drain, service: run(config, drain=drain, service=service))


def _sim(args: argparse.Namespace) -> int:
    from ghubai.sim.generator import SimOptions, Simulator
    from ghubai.sim.server import serve

    try:
        split_hostport(args.listen)
    except ValueError as error:
        raise ConfigError([f"--listen: {error}"]) from None
    options = SimOptions(
        models=args.models, ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms, tokens=args.tokens, max_parallel=args.max_parallel, fail_rate=args.fail_rate,
        fail_after_tokens=args.fail_after_tokens, embed_dim=args.embed_dim, api_key=args.api_key,
        disabled=frozenset(path.strip() for path in args.disable.split(",") if path.strip()), slots=args.slots,
        usage_with_choices=args.usage_with_choices, load_ms=args.load_ms, max_loaded=args.max_loaded,
        prefill_us_per_token=args.prefill_us_per_token)
    return _stopping_on(lambda service: serve(Simulator(options), args.listen))


def _up(args: argparse.Namespace) -> int:
    from ghubai.up import up

    if args.backend == "openai" and not args.engine_url:
        raise ConfigError(["--backend openai: give the engine's address with --engine-url"])
    if args.engine_url and (problem := engine_url_problem(args.engine_url)):
        raise ConfigError([f"--engine-url: {problem}"])
    env_url = os.environ.get("OLLAMA_LOCAL_URL") if args.backend in ("auto", "ollama") and not args.engine_url else ""
    if env_url and (problem := engine_url_problem(env_url)):  # (as the worker checks it)
        raise ConfigError([f"environment: OLLAMA_LOCAL_URL: {problem}"])
    key = ""
    if args.engine_api_key_env:
        if not (key := os.environ.get(args.engine_api_key_env, "")):
            raise ConfigError([f"--engine-api-key-env: the variable {args.engine_api_key_env} is not set"])
        if problem := engine_key_problem(key):  # (as the worker checks it; a key read from a file keeps its line end)
            raise ConfigError([f"--engine-api-key-env: {args.engine_api_key_env} {problem}"])
    return _stopping_on(lambda service: up(port=args.port, backend=args.backend, engine_url=args.engine_url,
                                           engine_api_key=key))


def _status(args: argparse.Namespace) -> int:
    from ghubai.status import status

    return status(args.hub or args.proxy, args.watch, ca_file=args.ca_file, insecure=args.allow_invalid_certs)


def _number(kind: type[int] | type[float], low: float, high: float | None = None) -> Callable[[str], float]:
    """An argument type: a number of ``kind`` from ``low`` (to ``high``), else argparse's one-line usage error."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not low <= value <= (math.inf if high is None else high):
            upto = "" if high is None else f" to {high:g}"
            raise argparse.ArgumentTypeError(f"expected a{' whole' if kind is int else ''} number from {low:g}{upto}, "
                                             f"got {text!r}")
        return value

    return parse


def _models(text: str) -> tuple[str, ...]:
    if not (names := tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))):
        raise argparse.ArgumentTypeError("expected at least one model name")
    return names


def _daemon_flags(parser: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        parser.add_argument("--config", metavar="FILE", help="TOML file (default: built-in loopback defaults)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="ghubai", description="Grid Hub AI: many inference machines, one API.")
    top.add_argument("--version", action="version", version=f"ghubai {__version__}")
    roles = top.add_subparsers(dest="role", required=True, metavar="ROLE")

    up = roles.add_parser("up", help="the whole grid on this machine, in one command")
    up.add_argument("--backend", choices=("auto", "ollama", "sim", "openai"), default="auto",
                    help="auto: Ollama at OLLAMA_LOCAL_URL if it answers, else the built-in simulator; "
                    "openai: the OpenAI-compatible engine at --engine-url")
    up.add_argument("--engine-url", metavar="URL", default="",
                    help="the engine's root URL (for ollama: instead of OLLAMA_LOCAL_URL)")
    up.add_argument("--engine-api-key-env", metavar="VAR", default="",
                    help="the environment variable that holds the engine's API key")
    up.add_argument("--port", type=_port, default=5000, help="port of the grid's API (default 5000)")
    _daemon_flags(up, config=False)
    up.set_defaults(func=_up)

    registry = roles.add_parser("registry", help="serves the hub list from a TOML file it watches")
    _daemon_flags(registry)
    registry.add_argument("--listen", metavar="HOST:PORT")
    registry.set_defaults(func=_registry, action=None)
    edits = registry.add_subparsers(dest="action", metavar="ACTION")
    add = edits.add_parser("add-hub", help="add a hub to a registry file (atomic rewrite; comments are not kept)")
    add.add_argument("name")
    add.add_argument("address", help="the hub's base URL, e.g. http://10.0.0.5:7197")
    remove = edits.add_parser("remove-hub", help="remove a hub from a registry file")
    remove.add_argument("name")
    for edit in (add, remove):
        edit.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help="the registry file")

    hub = roles.add_parser("hub", help="the API clients call; workers connect to it")
    _daemon_flags(hub)
    hub.add_argument("--listen", metavar="HOST:PORT")
    hub.set_defaults(func=_hub)

    worker = roles.add_parser("worker", help="runs next to an engine and serves the hubs' requests")
    _daemon_flags(worker)
    worker.set_defaults(func=_worker)

    proxy = roles.add_parser("proxy", help="the front door: health-checked, model-aware routing over hubs "
                                                 "(a conversation stays on its hub)")
    _daemon_flags(proxy)
    proxy.add_argument("--listen", metavar="HOST:PORT")
    proxy.set_defaults(func=_proxy)

    init = roles.add_parser("init", help="write commented default configs for every role")
    init.add_argument("--dir", default=".", help="where to write them (default: here)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    init.set_defaults(func=_init, log_level="warning", log_format="text")

    check = roles.add_parser("check", help="validate a config file; prints each error with its key")
    check.add_argument("file")
    check.add_argument("--role", choices=("registry", "hub", "worker", "proxy"),
                       help="default: from the file name (hub.toml, hub-2.toml ...)")
    check.set_defaults(func=_check, log_level="warning", log_format="text")

    status = roles.add_parser("status", help="the grid at a glance: hubs, workers, models, load")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--proxy", metavar="URL", default="http://127.0.0.1:5000",
                       help="the whole grid, as a proxy sees it (default: %(default)s, as 'ghubai up' runs it)")
    where.add_argument("--hub", metavar="URL", help="one hub, e.g. http://127.0.0.1:7197")
    status.add_argument("--watch", metavar="SECONDS", type=_number(float, 0.1),
                        help="refresh every SECONDS until Ctrl-C")
    status.add_argument("--ca-file", metavar="PEM", default="", help="CA bundle for an https:// hub or proxy "
                        "(the grid's own CA, as the daemons' ca_file)")
    status.add_argument("--allow-invalid-certs", action="store_true", help="development only: no certificate checks")
    status.set_defaults(func=_status, log_level="warning", log_format="text")

    sim = roles.add_parser("sim", help="an Ollama-compatible engine simulator")
    sim.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:11434")
    sim.add_argument("--models", type=_models, default=("sim",), help="comma-separated model names (default: sim)")
    sim.add_argument("--ttft-ms", type=_number(float, 0), default=20.0, help="time to first token")
    sim.add_argument("--itl-ms", type=_number(float, 0), default=10.0, help="time between tokens")
    sim.add_argument("--tokens", type=_number(int, 0), default=32, help="reply length when the request sets no limit")
    sim.add_argument("--max-parallel", type=_number(int, 1), default=64, help="generations at once; the rest wait")
    sim.add_argument("--fail-rate", type=_number(float, 0, 1), default=0.0, help="share of requests answered 500")
    sim.add_argument("--fail-after-tokens", type=_number(int, 0), default=None, help="fail every reply after N tokens")
    sim.add_argument("--embed-dim", type=_number(int, 1, 65536), default=16)  # (a billion froze it, deaf to Ctrl-C)
    sim.add_argument("--api-key", default="", help="answer 401 unless a request has 'Authorization: Bearer KEY'")
    sim.add_argument("--disable", default="", metavar="PATHS",
                     help="comma-separated paths to answer 404 on, as a partial shim does (e.g. /api/chat)")
    sim.add_argument("--slots", type=_number(int, 1), default=None,
                     help="report N slots on GET /props, as llama.cpp server")
    sim.add_argument("--usage-with-choices", action="store_true",
                     help="send the streamed usage chunk with a non-empty choices list, as LiteLLM does")
    sim.add_argument("--load-ms", type=_number(float, 0), default=0.0,
                     help="time to load a model that is not in memory")
    sim.add_argument("--max-loaded", type=_number(int, 0), default=0,
                     help="models in memory at once, the least recently used evicted (0: no bound)")
    sim.add_argument("--prefill-us-per-token", type=_number(float, 0), default=0.0,
                     help="prompt processing per word that the slot's prompt cache does not hold")
    _daemon_flags(sim, config=False)
    sim.set_defaults(func=_sim)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    ignore_hangups(args.role)  # (the command's own entry did so before its imports: see ghubai.launch)
    logs.setup(args.log_level, args.log_format)
    tracing.setup(args.role)
    try:
        return int(args.func(args))
    except ConfigError as error:
        print(f"ghubai {args.role}: {error}", file=sys.stderr)
        return 2
    except (OSError, BaseExceptionGroup) as error:  # a port in use, a TLS file it cannot read: one line
        if isinstance(error, BaseExceptionGroup) and error.split(KeyboardInterrupt)[1] is None:
            return interrupted(args.role)  # a Ctrl-C before trio listened for it
        if (cause := _startup_error(error)) is None:
            raise
        if cause.startswith("cannot listen:") and (address := _listen_of(args)):  # (the socket's error names none)
            cause = cause.replace("cannot listen:", f"cannot listen on {address}:", 1) + \
                (": choose another with --port" if cause == IN_USE and args.role == "up" else "")
        print(f"ghubai {args.role}: {cause}", file=sys.stderr)
        return 1


def _listen_of(args: argparse.Namespace) -> str:
    """The address a daemon was to listen on, as its command line or config file says; "" if unknown."""
    if args.role == "up":
        return f"127.0.0.1:{args.port}"
    if listen := getattr(args, "listen", None):
        return str(listen)
    try:
        return str(getattr(load(args.role, getattr(args, "config", None)), "listen", ""))
    except ConfigError:
        return ""


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


IN_USE = "cannot listen: the address is in use (another process serves that port?)"
_STARTUP_ERRNOS = {errno.EADDRINUSE: IN_USE,
                   errno.EADDRNOTAVAIL: "cannot listen: no such address on this machine",
                   errno.EINVAL: "cannot listen: this machine cannot bind that address (an IPv6 link-local "
                                 "address needs its interface, [fe80::1%eth0]; a multicast one cannot be bound)",
                   errno.EAFNOSUPPORT: "cannot listen: this machine has no IPv6",
                   errno.EACCES: "permission denied", errno.ENOENT: "no such file"}


def _startup_error(error: BaseException) -> str | None:
    """What stopped a daemon from starting, in one line; None for anything else (a traceback then)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    if isinstance(error, ssl.SSLError):
        return f"TLS certificate or key refused: {error.reason or error}"
    if isinstance(error, socket.gaierror):
        return f"cannot listen: the host name does not resolve ({error.strerror})"
    if not isinstance(error, OSError) or error.errno not in _STARTUP_ERRNOS:
        return None
    if error.errno == errno.EACCES and not error.filename:  # a bind: no file is named
        return "cannot listen: permission denied (a port below 1024 needs CAP_NET_BIND_SERVICE or root)"
    return _STARTUP_ERRNOS[error.errno] + (f": {error.filename}" if error.filename else "")


if __name__ == "__main__":
    sys.exit(main())
