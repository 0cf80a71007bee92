"""appliance.linkem's per-direction queue with a fake socket: delay order, loss, send errors."""

from __future__ import annotations

import errno
import random

from appliance.linkem import Direction


class FakeTx:
    def __init__(self, errors=()):
        self.sent = []
        self.errors = list(errors)

    def send(self, frame):
        if self.errors:
            err = self.errors.pop(0)
            if err is not None:
                raise err
        self.sent.append(frame)
        return len(frame)


def make(tx, delay=0.05, loss=0.0, seed=1, max_frames=100, max_bytes=1 << 20):
    return Direction("a->b", None, tx, delay, loss, random.Random(seed), max_frames, max_bytes)


def test_delay_releases_in_order_when_due():
    tx = FakeTx()
    d = make(tx)
    d.receive(b"one", 10.0)
    d.receive(b"two", 10.01)
    d.release(10.049)
    assert tx.sent == []
    assert d.next_due() == 10.05
    d.release(10.05)
    assert tx.sent == [b"one"]
    d.release(10.2)
    assert tx.sent == [b"one", b"two"]
    snap = d.snapshot()
    assert snap["rx"] == 2 and snap["tx"] == 2 and snap["queued"] == 0
    assert abs(snap["late_max_ms"] - 140.0) < 1e-6


def test_loss_is_seeded_and_close_to_p():
    results = []
    for _ in range(2):
        tx = FakeTx()
        d = make(tx, delay=0.0, loss=0.25, seed=42, max_frames=10000)
        for i in range(4000):
            d.receive(i.to_bytes(2, "big"), 0.0)
        d.release(1.0, limit=10000)
        results.append(tx.sent)
        assert 0.22 < d.c["lost"] / 4000 < 0.28
        assert d.c["lost"] + d.c["tx"] == 4000
    assert results[0] == results[1]


def test_send_errors_are_counted_and_survived():
    tx = FakeTx([OSError(errno.ENOBUFS, "nobufs"), OSError(errno.EMSGSIZE, "too big"),
                 OSError(errno.ENETDOWN, "down"), None])
    d = make(tx, delay=0.0)
    for f in (b"a", b"b", b"c", b"d"):
        d.receive(f, 0.0)
    d.release(0.0)
    assert tx.sent == [b"d"]
    assert (d.c["enobufs"], d.c["emsgsize"], d.c["tx_errors"], d.c["tx"]) == (1, 1, 1, 1)
    assert d.snapshot()["tx_error_kinds"] == {"ENETDOWN": 1}


def test_eagain_keeps_the_frame_and_blocks():
    tx = FakeTx([BlockingIOError(errno.EAGAIN, "full")])
    d = make(tx, delay=0.0)
    d.receive(b"x", 0.0)
    d.release(0.0)
    assert d.blocked and tx.sent == [] and d.c["eagain"] == 1 and d.next_due() is None
    d.blocked = False  # EPOLLOUT
    d.release(0.0)
    assert tx.sent == [b"x"]


def test_queue_bounds():
    d = make(FakeTx(), max_frames=2, max_bytes=10)
    for f in (b"12345", b"12345", b"1"):
        d.receive(f, 0.0)
    assert d.c["queue_drop"] == 1 and len(d.q) == 2
