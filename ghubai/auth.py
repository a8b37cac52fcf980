"""Shared secrets (worker tokens, client API keys): kept as SHA-256 digests, never logged. A
configured entry is the secret itself or ``sha256:<64 hex digits>`` of it.

A presented secret is hashed and its digest looked up in a set: one lookup however many keys (a
comparison with each, in constant time, cost 0.56 ms a request at 10,000 keys). What the lookup's
timing could tell is how close a digest came to a stored one, and no one can steer a SHA-256
digest toward another: it says nothing of the secrets."""

from __future__ import annotations

import hashlib


def _digest(entry: str) -> bytes:
    if entry.startswith("sha256:") and len(entry) == 71:
        try:
            return bytes.fromhex(entry[7:])
        except ValueError:
            pass
    return hashlib.sha256(entry.encode()).digest()


class Secrets:
    """API keys or provider tokens, kept only as SHA-256 digests. Invariant: a plain secret is
    never stored, logged or compared except through its digest."""
    def __init__(self, entries: tuple[str, ...]) -> None:
        self._digests: frozenset[bytes] = frozenset()
        self.replace(entries)

    def replace(self, entries: tuple[str, ...]) -> None:
        """New secrets for a running daemon (SIGHUP): requests from now on are checked against them."""
        self._digests = frozenset(_digest(entry) for entry in entries)

    @property
    def open(self) -> bool:
        """No secret configured: everyone is let in."""
        return not self._digests

    def identify(self, authorization: str | None) -> bytes | None:
        """Which secret an ``Authorization: Bearer ...`` header carries (its digest), ``b""`` when
        no secret is configured, None when it carries none of them."""
        if self.open:
            return b""
        presented = self.presented(authorization)
        return presented if presented in self._digests else None

    @staticmethod
    def presented(authorization: str | None) -> bytes:
        """The digest of the secret an ``Authorization: Bearer ...`` header carries, ``b""`` for none."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return b""
        return hashlib.sha256(token.strip().encode()).digest()

    def holds(self, digest: bytes) -> bool:
        """Whether a secret ``identify`` returned is still one of them (after a ``replace``)."""
        return self.open or digest in self._digests

    def allows(self, authorization: str | None) -> bool:
        return self.identify(authorization) is not None
