"""Keys and tokens as the daemons check them: digests only, any number of them, replaced on reload."""

from __future__ import annotations

import hashlib

from ghubai.auth import Secrets


def test_a_key_is_found_among_ten_thousand_by_its_digest_and_no_other_is() -> None:
    """One lookup of the presented key's digest, plain and ``sha256:`` entries alike (the scale hunt:
    comparing it with each configured one cost 0.56 ms a request at 10,000 keys); what was refused
    before is refused still."""
    plain = tuple(f"key-{i}" for i in range(5_000))
    hashed = tuple("sha256:" + hashlib.sha256(f"hashed-{i}".encode()).hexdigest() for i in range(5_000))
    secrets = Secrets(plain + hashed)
    assert secrets.identify("Bearer key-4999") == hashlib.sha256(b"key-4999").digest()
    assert secrets.identify("bearer  hashed-17 ") == hashlib.sha256(b"hashed-17").digest()
    for refused in ("Bearer key-5000", "Bearer sha256:" + hashed[0][7:], "Basic key-1", "Bearer ", "", None):
        assert secrets.identify(refused) is None, refused
    digest = secrets.identify("Bearer key-1")
    assert digest is not None and secrets.holds(digest)
    secrets.replace(("other",))  # a reload
    assert not secrets.holds(digest) and secrets.identify("Bearer key-1") is None
    assert Secrets(()).identify(None) == b"" and Secrets(()).open
