"""Migrate crypto (draft-snoeren-tcp-migrate §3) against an independent hashlib computation.

These live in _common and are the same code in both builds, so they are tested once.
"""

import hashlib
import random

import pytest

import _fastpath
from _fastpath import _common as C


def ref_token(ni, na, k=b""):
    """Top 64 bits of SHA-1(Ni, Na, K): Ni, Na 32-bit big-endian, K left-padded to 25 bytes."""
    h = hashlib.sha1()
    h.update((ni % 2**32).to_bytes(4, "big"))
    h.update((na % 2**32).to_bytes(4, "big"))
    h.update(b"\x00" * (25 - len(k)) + k)
    return int(h.hexdigest()[:16], 16)


def ref_request(ni, na, k, s, reqno):
    """Top 64 bits of SHA-1(Ni, Na, K, S, ReqNo): S 32-bit big-endian, ReqNo one byte."""
    h = hashlib.sha1()
    h.update((ni % 2**32).to_bytes(4, "big") + (na % 2**32).to_bytes(4, "big"))
    h.update(k.rjust(25, b"\x00"))
    h.update((s % 2**32).to_bytes(4, "big") + bytes([reqno]))
    return int(h.hexdigest()[:16], 16)


EDGE32 = (0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)


def test_token_insecure_known_value():
    """K = 0 (the insecure variant): SHA-1 of 8 bytes of Ni, Na and 25 zero bytes."""
    digest = hashlib.sha1(bytes.fromhex("0000000100000002") + bytes(25)).digest()
    assert C.migrate_token(1, 2) == int.from_bytes(digest[:8], "big")
    assert C.migrate_token(1, 2, b"") == C.migrate_token(1, 2, bytes(25)) == C.migrate_token(1, 2, b"\0")


def test_token_random_and_edges():
    """migrate_token equals the reference for edge and random Ni, Na and keys of every length."""
    rng = random.Random(3)
    cases = [(a, b, b"") for a in EDGE32 for b in EDGE32]
    cases += [(rng.getrandbits(32), rng.getrandbits(32), bytes(rng.getrandbits(8) for _ in range(n)))
              for n in range(26) for _ in range(20)]
    for ni, na, k in cases:
        tok = C.migrate_token(ni, na, k)
        assert tok == ref_token(ni, na, k)
        assert 0 <= tok < 2**64


def test_token_depends_on_every_input():
    """Swapping Ni/Na or changing one key bit changes the token."""
    assert C.migrate_token(1, 2) != C.migrate_token(2, 1)
    k = bytes(range(25))
    flipped = bytes([k[0] ^ 1]) + k[1:]
    assert C.migrate_token(5, 6, k) != C.migrate_token(5, 6, flipped)


def test_request_random_and_edges():
    """migrate_request equals the reference, ReqNo over its whole 7-bit range."""
    rng = random.Random(4)
    for reqno in range(128):
        ni, na, s = rng.getrandbits(32), rng.getrandbits(32), rng.choice(EDGE32 + (rng.getrandbits(32),))
        k = bytes(rng.getrandbits(8) for _ in range(rng.randrange(26)))
        assert C.migrate_request(ni, na, k, s, reqno) == ref_request(ni, na, k, s, reqno)
    for s in EDGE32:
        assert C.migrate_request(1, 2, b"", s, 5) == ref_request(1, 2, b"", s, 5)


def test_request_masks_inputs():
    """Ni, Na, S are taken modulo 2**32 and ReqNo modulo 128."""
    assert C.migrate_request(2**32 + 1, 2, b"k", 2**32 + 3, 128 + 4) == ref_request(1, 2, b"k", 3, 4)
    assert C.migrate_token(-1, 2**32) == ref_token(0xFFFFFFFF, 0)


def test_key_too_long_raises():
    """K is at most 200 bits (25 bytes)."""
    with pytest.raises(ValueError):
        C.migrate_token(1, 2, bytes(26))
    with pytest.raises(ValueError):
        C.migrate_request(1, 2, bytes(26), 3, 4)


def reqno_newer_def(a, b):
    """a is newer than b when it lies 1..63 steps ahead of b modulo 128."""
    steps = 0
    x = b
    while x != a:
        x = (x + 1) % 128
        steps += 1
    return 1 <= steps <= 63


def test_reqno_newer_exhaustive():
    """All 128 x 128 pairs against the counting definition; never both a>b and b>a."""
    for a in range(128):
        for b in range(128):
            assert C.reqno_newer(a, b) == reqno_newer_def(a, b), (a, b)
            assert not (C.reqno_newer(a, b) and C.reqno_newer(b, a))
    assert C.reqno_newer(0, 127) and not C.reqno_newer(127, 0)
    assert not C.reqno_newer(64, 0) and not C.reqno_newer(0, 64)


def test_reqno_next():
    """reqno_next steps modulo 128 and is always newer than its argument."""
    for a in range(128):
        assert C.reqno_next(a) == (a + 1) % 128
        assert C.reqno_newer(C.reqno_next(a), a)


def test_reexported_from_package():
    """The package re-exports the shared crypto helpers unchanged."""
    assert _fastpath.migrate_token is C.migrate_token
    assert _fastpath.migrate_request is C.migrate_request
    assert _fastpath.reqno_newer is C.reqno_newer
