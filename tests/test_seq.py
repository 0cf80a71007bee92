"""Unsigned 32-bit sequence arithmetic near the wrap, and the flow table's tracking across it."""

import itertools

import pytest

from _fastpath import _common as C
from helpers import ETH, V4_A, V4_B, V6_A, V6_B, ether, raw, tcp4, tcp6

M = 2**32
# A few hundred values around 0, 2**31 and 2**32 - 1 (and so around every wrap).
VALUES = sorted({(c + d) % M for c in (0, 2**31, M - 1) for d in range(-150, 151)})


def signed_distance(a, b):
    """a - b as a two's complement 32-bit integer, computed through bytes."""
    return int.from_bytes(((a - b) % M).to_bytes(4, "big"), "big", signed=True)


def test_seq_add_exhaustive():
    """seq_add wraps modulo 2**32, for positive and negative steps."""
    for a, n in itertools.product(VALUES, (-2**31, -65, -1, 0, 1, 64, 2**31 - 1, 2**31, M - 1, M, M + 5)):
        assert C.seq_add(a, n) == (a + n) % M


def test_seq_diff_and_comparisons_exhaustive():
    """seq_diff/lt/le/gt/ge over all pairs of VALUES against the signed distance definition."""
    for a in VALUES:
        for b in VALUES:
            d = signed_distance(a, b)
            assert C.seq_diff(a, b) == d
            assert C.seq_lt(a, b) == (d < 0)
            assert C.seq_le(a, b) == (d <= 0)
            assert C.seq_gt(a, b) == (d > 0)
            assert C.seq_ge(a, b) == (d >= 0)


def test_seq_comparisons_across_the_wrap():
    """Concrete cases: 0xFFFFFFFF < 0, 0 > 0xFFFFFFFF, and distance 2**31 counts as 'before'."""
    assert C.seq_lt(0xFFFFFFFF, 0) and C.seq_gt(0, 0xFFFFFFFF)
    assert C.seq_diff(5, 0xFFFFFFFB) == 10 and C.seq_diff(0xFFFFFFFB, 5) == -10
    assert C.seq_diff(0, 2**31) == -2**31 and C.seq_diff(2**31, 0) == -2**31
    assert C.seq_le(7, 7) and C.seq_ge(7, 7) and not C.seq_lt(7, 7)


@pytest.mark.parametrize("size", [0, 1, 2, 63, 64, 100, 2**31 - 1])
def test_seq_in_window_exhaustive(size):
    """left <= seq < left + size, modulo 2**32, for all pairs of VALUES."""
    for left in VALUES:
        for seq in VALUES:
            assert C.seq_in_window(seq, left, size) == ((seq - left) % M < size), (seq, left, size)


def test_seq_in_window_wrapping_window():
    """A window straddling the wrap contains both ends and nothing outside."""
    left = M - 10
    assert C.seq_in_window(M - 10, left, 20) and C.seq_in_window(9, left, 20)
    assert not C.seq_in_window(10, left, 20) and not C.seq_in_window(M - 11, left, 20)


# --- Flow-table tracking across the wrap --------------------------------------------------


def _seg(family, seq, ack=0, flags="A", payload=b"", ts=None):
    opts = [("NOP", None), ("NOP", None), ("Timestamp", ts)] if ts is not None else []
    if family == 4:
        return bytearray(raw(ether(tcp4(opts, payload=payload, seq=seq, ack=ack, flags=flags, sport=1000,
                                        dport=2000))))
    return bytearray(raw(ether(tcp6(opts, payload=payload, seq=seq, ack=ack, flags=flags, sport=1000,
                                    dport=2000))))


@pytest.mark.parametrize("family", [4, 6])
def test_tracking_across_wrap(engine, family):
    """seq_next, ack and tsval keep advancing as seq/ack/tsval wrap past 0xFFFFFFFF, and ignore old frames."""
    src, dst = (V4_A, V4_B) if family == 4 else (V6_A, V6_B)
    t = engine.FlowTable()
    t.set(src, 1000, dst, 2000, C.PASS)
    steps = [
        # (seq, ack, payload, tsval) -> expected (seq_next, ack, tsval)
        (0xFFFFFFF0, 0xFFFFFFFA, b"x" * 8, 0xFFFFFFFE, (0xFFFFFFF8, 0xFFFFFFFA, 0xFFFFFFFE)),
        (0xFFFFFFF8, 0xFFFFFFFF, b"y" * 16, 0xFFFFFFFF, (0x00000008, 0xFFFFFFFF, 0xFFFFFFFF)),
        (0x00000008, 0x00000005, b"z" * 4, 0x00000002, (0x0000000C, 0x00000005, 0x00000002)),
        # an old retransmission, an old ack and an old timestamp: nothing moves back
        (0xFFFFFFF0, 0xFFFFFFF0, b"x" * 8, 0xFFFFFFF0, (0x0000000C, 0x00000005, 0x00000002)),
        # a segment ending exactly at the wrap point
        (0x0000000C, 0x00000006, b"", 0x00000003, (0x0000000C, 0x00000006, 0x00000003)),
    ]
    for seq, ack, payload, tsval, (seq_next, want_ack, want_ts) in steps:
        t.classify(_seg(family, seq, ack, "A", payload, (tsval, 99)))
        f = t.get(src, 1000, dst, 2000)
        assert (f.seq_next, f.ack, f.tsval) == (seq_next, want_ack, want_ts), hex(seq)
    assert f.ts_seen and f.tsecr == 99 and f.frames == len(steps)


def test_tracking_syn_fin_count_and_wrap(engine):
    """SYN and FIN each count one sequence number, also when that carries seq_next over the wrap."""
    t = engine.FlowTable()
    t.set(V4_A, 1000, V4_B, 2000)
    t.classify(_seg(4, 0xFFFFFFFF, 0, "S"))
    assert t.get(V4_A, 1000, V4_B, 2000).seq_next == 0
    t.classify(_seg(4, 0, 1, "FA", b"ab"))
    f = t.get(V4_A, 1000, V4_B, 2000)
    assert (f.seq_next, f.ack, f.flags_seen) == (3, 1, C.SYN | C.FIN | C.ACK)


def test_tracking_rst_does_not_move_seq(engine):
    """A RST leaves seq_next alone; an ACK-less frame leaves ack/window alone."""
    t = engine.FlowTable()
    t.set(V4_A, 1000, V4_B, 2000)
    t.classify(_seg(4, 100, 5, "A", b"abcd"))
    t.classify(_seg(4, 0x90000000, 0, "R"))
    f = t.get(V4_A, 1000, V4_B, 2000)
    assert (f.seq_next, f.ack, f.flags_seen) == (104, 5, C.ACK | C.RST)


def test_tracking_huge_jump_is_not_newer(engine):
    """A seq more than 2**31 ahead counts as older (seq arithmetic), so seq_next stays."""
    t = engine.FlowTable()
    t.set(V4_A, 1000, V4_B, 2000)
    t.classify(_seg(4, 10, 1))
    t.classify(_seg(4, 10 + 2**31 + 5, 1))
    assert t.get(V4_A, 1000, V4_B, 2000).seq_next == 10
    t.classify(_seg(4, 10 + 2**31 - 5, 1))
    assert t.get(V4_A, 1000, V4_B, 2000).seq_next == 10 + 2**31 - 5


def test_first_ack_taken_even_if_older(engine):
    """The first ACK a flow sees is recorded whatever its value (nothing to compare with yet)."""
    t = engine.FlowTable()
    t.set(V4_A, 1000, V4_B, 2000)
    t.classify(_seg(4, 1, 0, "S"))
    t.classify(_seg(4, 2, 0x80000001, "A"))
    assert t.get(V4_A, 1000, V4_B, 2000).ack == 0x80000001
    assert ETH == C.LINK_ETHERNET
