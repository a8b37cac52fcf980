"""Name lookups under a DNS that hangs for some names (``ghubai.resolver``)."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from conftest import WAIT_S
from ghubai.resolver import NameLookups

SLOW_NAMES = [f"hub{index}.dns-down.example" for index in range(60)]


async def test_names_whose_dns_hangs_neither_pile_up_threads_nor_starve_other_names(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (hunt): a lookup its caller gave up on kept one of trio's 40 threads until the C
    resolver gave up (about 10 s); a proxy checking a dozen hubs whose DNS hung, each round, took
    them all, then no name resolved, ``localhost`` included, and its healthy hubs went down."""
    released, started = threading.Event(), Counter[str]()
    real = socket.getaddrinfo

    def lookup(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        """The C resolver, which hangs for names under dns-down (trio's own try of a numeric host
        first, in its thread, does not)."""
        name = host.decode() if isinstance(host, bytes) else host
        if name in SLOW_NAMES and not flags & socket.AI_NUMERICHOST:
            started[name] += 1
            released.wait()
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    trio.socket.set_custom_hostname_resolver(NameLookups())
    try:
        for _ in range(3):  # three rounds of health checks, each giving up on the names that hang
            async with trio.open_nursery() as nursery:
                for name in SLOW_NAMES:
                    nursery.start_soon(_given_up, name)
        with trio.fail_after(WAIT_S):  # (the default resolver: never, while the slow lookups hang)
            assert await trio.socket.getaddrinfo("localhost", 80)
        assert started == {name: 1 for name in SLOW_NAMES}  # one thread per name, however often asked
    finally:
        released.set()


async def test_a_burst_of_lookups_of_one_name_costs_one_lookup_and_each_caller_its_own_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: one place per name made a burst of new connections to a hub named in DNS look it up
    one after another; at 25 ms a lookup, 42 of 120 connects passed the proxy's 2 s timeout and the
    hub was marked down. Callers asking the same at once now share the one lookup."""
    asked, release = Counter[str](), trio.Event()
    real = socket.getaddrinfo
    token = trio.lowlevel.current_trio_token()

    def lookup(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name.endswith(".lan") and not flags & socket.AI_NUMERICHOST:
            asked[name] += 1
            trio.from_thread.run(release.wait, trio_token=token)
            if name == "gone.lan":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real("127.0.0.1", port, family, type, proto, flags)
        return real(host, port, family, type, proto, flags)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    trio.socket.set_custom_hostname_resolver(NameLookups())
    answers: list[list[Any]] = []
    failures: list[BaseException] = []

    async def resolve(name: str) -> None:
        try:
            answers.append(await trio.socket.getaddrinfo(name, 7197, type=socket.SOCK_STREAM))
        except socket.gaierror as error:
            failures.append(error)

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(resolve, "hub1.lan")
            nursery.start_soon(resolve, "gone.lan")
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert asked == {"hub1.lan": 1, "gone.lan": 1}
    assert len(answers) == 100 and all(answer[0][4] == ("127.0.0.1", 7197) for answer in answers)
    assert len({id(answer) for answer in answers}) == 100  # (each its own list: trio reorders it)
    assert len(failures) == 100 and len({id(error) for error in failures}) == 100


async def _given_up(name: str) -> None:
    with trio.move_on_after(0.05):
        await trio.socket.getaddrinfo(name, 80)
        raise AssertionError(f"{name} resolved")
