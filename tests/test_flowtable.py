"""FlowTable: entries, verdicts, punting, stats, tracking, REWRITE checked with scapy, batches."""

import ipaddress
import random
import socket
from array import array

import pytest

from _fastpath import _common as C
from helpers import (
    ETH, LINUX_SYN_OPTS, MAC_A, MAC_B, RAW, V4_A, V4_B, V4_C, V4_D, V6_A, V6_B, V6_C, V6_D, ARP, ICMP, IP,
    IPv6, Raw, TCP, UDP, Ether, dissect, ether, garbage_options, ones_sum, raw, scapy_checksums_ok, tcp4, tcp6,
)

P4 = socket.inet_pton(socket.AF_INET, V4_A), socket.inet_pton(socket.AF_INET, V4_B)
P6 = socket.inet_pton(socket.AF_INET6, V6_A), socket.inet_pton(socket.AF_INET6, V6_B)


def seg4(flags="A", seq=1000, ack=0, payload=b"", sport=40000, dport=80, src=V4_A, dst=V4_B, opts=(), link=ETH):
    pkt = tcp4(list(opts), payload=payload, src=src, dst=dst, sport=sport, dport=dport, seq=seq, ack=ack,
               flags=flags)
    return bytearray(raw(ether(pkt) if link == ETH else pkt))


def seg6(flags="A", seq=1000, ack=0, payload=b"", sport=40000, dport=443, src=V6_A, dst=V6_B, opts=()):
    return bytearray(raw(ether(tcp6(list(opts), payload=payload, src=src, dst=dst, sport=sport, dport=dport,
                                    seq=seq, ack=ack, flags=flags))))


def udp4():
    return bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / UDP(sport=40000, dport=80) / Raw(b"u"))))


def stats_without_errors(t):
    s = t.stats()
    s.pop("errors")
    return s


def zero_errors():
    return {e.name: 0 for e in C.Err if e}


def assert_stats_consistent(t):
    s = t.stats()
    assert s["frames"] == s["passed"] + s["rewritten"] + s["dropped"] + s["to_python"]
    assert s["frames"] == s["malformed"] + s["non_tcp"] + s["misses"] + s["hits"]
    assert s["malformed"] == sum(s["errors"].values())


# --- Entries ----------------------------------------------------------------------------


def test_set_get_remove_len_keys_clear(engine):
    """The basic dictionary operations, with text and packed addresses as equal keys."""
    t = engine.FlowTable()
    assert len(t) == 0 and t.keys() == [] and t.get(V4_A, 1, V4_B, 2) is None
    t.set(V4_A, 1, V4_B, 2, C.DROP)
    t.set(P4[0], 3, P4[1], 4)
    t.set(V6_A, 5, V6_B, 6, C.PYTHON, punt_flags=C.SYN)
    t.set(ipaddress.ip_address(V4_A), 1, V4_B, 2, C.DROP)  # the same key again
    assert len(t) == 3
    assert sorted(t.keys()) == sorted([(P4[0], 1, P4[1], 2), (P4[0], 3, P4[1], 4), (P6[0], 5, P6[1], 6)])
    f = t.get(V4_A, 1, V4_B, 2)
    assert isinstance(f, C.Flow)
    assert (f.src, f.sport, f.dst, f.dport, f.verdict) == (P4[0], 1, P4[1], 2, C.DROP)
    assert (f.new_src, f.new_sport, f.new_dst, f.new_dport, f.punt_flags) == (None, None, None, None, 0)
    assert (f.frames, f.bytes, f.flags_seen, f.seq_next, f.ack, f.ts_seen) == (0, 0, 0, 0, 0, False)
    assert t.get(V6_A, 5, V6_B, 6).punt_flags == C.SYN
    assert t.get(V4_B, 2, V4_A, 1) is None  # direction matters
    assert t.remove(V4_A, 1, V4_B, 2) is True
    assert t.remove(V4_A, 1, V4_B, 2) is False
    assert len(t) == 2 and t.get(V4_A, 1, V4_B, 2) is None
    t.clear()
    assert len(t) == 0 and t.keys() == [] and t.get(V6_A, 5, V6_B, 6) is None
    t.set(V4_A, 1, V4_B, 2)
    assert len(t) == 1


def test_set_keeps_counters_and_updates_rewrite(engine):
    """set() on an existing flow changes its verdict and rewrite target but keeps its counters."""
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_dst=V4_C, new_dport=8080)
    t.classify(seg4())
    t.set(V4_A, 40000, V4_B, 80, C.PASS, new_src=V4_D)
    f = t.get(V4_A, 40000, V4_B, 80)
    assert (f.verdict, f.frames, f.new_src, f.new_dst, f.new_dport) == (
        C.PASS, 1, socket.inet_pton(socket.AF_INET, V4_D), None, None)


def test_set_validation(engine):
    """Bad verdicts, ports, mixed families and family-changing rewrites are refused."""
    t = engine.FlowTable()
    for args, kw in [((V4_A, 1, V4_B, 2, 4), {}), ((V4_A, 70000, V4_B, 2), {}), ((V4_A, 1, V4_B, -1), {}),
                     ((V4_A, 1, V6_B, 2), {}), ((V4_A, 1, V4_B, 2, C.REWRITE), dict(new_src=V6_A)),
                     ((V6_A, 1, V6_B, 2, C.REWRITE), dict(new_dst=V4_A)),
                     ((V4_A, 1, V4_B, 2, C.REWRITE), dict(new_sport=65536)),
                     ((V4_A, 1, V4_B, 2), dict(new_dport=-2)), ((b"\x01\x02\x03", 1, V4_B, 2), {})]:
        with pytest.raises(ValueError):
            t.set(*args, **kw)
    assert len(t) == 0
    with pytest.raises(ValueError):
        t.get(V4_A, 1, V6_B, 2)


def test_constructor_validation(engine):
    """capacity, verdict defaults and link are checked; the settings are readable."""
    for kw in (dict(capacity=0), dict(default_verdict=C.REWRITE), dict(default_verdict=9),
               dict(nontcp_verdict=C.REWRITE), dict(malformed_verdict=C.REWRITE), dict(malformed_verdict=-1),
               dict(link=2)):
        with pytest.raises(ValueError):
            engine.FlowTable(**kw)
    t = engine.FlowTable(capacity=1, default_verdict=C.DROP, default_punt=C.SYN | C.FIN,
                         nontcp_verdict=C.PYTHON, malformed_verdict=C.DROP, link=RAW)
    assert (t.default_verdict, t.default_punt, t.nontcp_verdict, t.malformed_verdict, t.link) == (
        C.DROP, C.SYN | C.FIN, C.PYTHON, C.DROP, RAW)


def test_capacity_above_maximum_refused(engine):
    """A capacity above MAX_CAPACITY is a ValueError in both builds (not a hang or a huge allocation)."""
    for capacity in (C.MAX_CAPACITY + 1, 2**62 + 1, 2**63 - 1):
        with pytest.raises(ValueError):
            engine.FlowTable(capacity=capacity)


def test_huge_capacity_does_not_hang(engine):
    """An absurd capacity (above 2**62) fails fast or is accepted; it must not loop forever."""
    import subprocess
    import sys
    code = (f"from _fastpath import _{'c' if engine.BUILD == 'c' else 'py'}engine as e\n"
            "try:\n    e.FlowTable(capacity=2**63 - 1)\nexcept (MemoryError, ValueError, OverflowError):\n    pass\n")
    try:
        proc = subprocess.run([sys.executable, "-c", code], timeout=5, capture_output=True)
    except subprocess.TimeoutExpired:
        pytest.fail("FlowTable(capacity=2**63 - 1) did not return within 5 s")
    assert proc.returncode == 0, proc.stderr


def _key(i):
    """A distinct, deterministic IPv4 or IPv6 4-tuple for each i."""
    if i % 3 == 2:
        return (ipaddress.IPv6Address(0x20010DB8 << 96 | i).packed, i % 65536,
                ipaddress.IPv6Address(0x20010DB8 << 96 | 1).packed, 443)
    return (ipaddress.IPv4Address(0x0A000000 + i // 7).packed, 1024 + i % 7,
            ipaddress.IPv4Address(0xC0A80001).packed, 80 + (i % 2))


def test_many_entries_growth_and_backward_shift_deletion(engine):
    """50,000 flows from a tiny initial capacity; removing every other one leaves all the rest findable."""
    n = 50_000
    t = engine.FlowTable(capacity=1)
    for i in range(n):
        k = _key(i)
        t.set(*k, C.DROP if i % 2 else C.PASS, new_sport=i % 65536)
    assert len(t) == n
    for i in range(0, n, 1):
        f = t.get(*_key(i))
        assert f is not None and f.new_sport == i % 65536, i
    rng = random.Random(5)
    order = list(range(0, n, 2))
    rng.shuffle(order)
    for i in order:
        assert t.remove(*_key(i)) is True
    assert len(t) == n // 2
    for i in range(n):
        f = t.get(*_key(i))
        if i % 2:
            assert f is not None and f.verdict == C.DROP and f.new_sport == i % 65536, i
        else:
            assert f is None, i
    assert len(t.keys()) == n // 2 and set(t.keys()) == {_key(i) for i in range(1, n, 2)}
    for i in order[:1000]:  # re-adding after deletions still works
        t.set(*_key(i), C.PYTHON)
    assert len(t) == n // 2 + 1000 and all(t.get(*_key(i)).verdict == C.PYTHON for i in order[:1000])


def test_remove_and_readd_random_churn(engine):
    """Random set/remove churn on a small table agrees with a dict model."""
    rng = random.Random(11)
    t = engine.FlowTable(capacity=4)
    model = {}
    for _ in range(20000):
        i = rng.randrange(300)
        k = _key(i)
        if rng.random() < 0.5:
            v = rng.choice((C.PASS, C.DROP, C.PYTHON))
            t.set(*k, v)
            model[k] = v
        else:
            assert t.remove(*k) == (model.pop(k, None) is not None)
    assert len(t) == len(model)
    assert {k: t.get(*k).verdict for k in model} == model
    assert set(t.keys()) == set(model)


# --- Verdicts ---------------------------------------------------------------------------


@pytest.mark.parametrize("verdict", [C.PASS, C.DROP, C.PYTHON])
def test_entry_verdicts_leave_frame_alone(engine, verdict):
    """PASS, DROP and PYTHON are returned as set and never modify the frame."""
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80, verdict, new_src=V4_C)
    frame = seg4(payload=b"data")
    before = bytes(frame)
    assert t.classify(frame) == verdict
    assert frame == before


@pytest.mark.parametrize("family", [4, 6])
def test_rewrite_verdict(engine, family):
    """REWRITE puts the new addresses and ports in place, with checksums scapy accepts."""
    t = engine.FlowTable()
    if family == 4:
        t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_src=V4_C, new_sport=1111, new_dst=V4_D, new_dport=2222)
        frame = seg4("PA", payload=b"payload", opts=[(253, b"\x12\x34zz"), ("NOP", None), ("NOP", None),
                                                      ("Timestamp", (1, 2))])
        want = (V4_C, V4_D)
    else:
        t.set(V6_A, 40000, V6_B, 443, C.REWRITE, new_src=V6_C, new_sport=1111, new_dst=V6_D, new_dport=2222)
        frame = seg6("PA", payload=b"payload", opts=[(30, b"ab")])
        want = (V6_C, V6_D)
    before = bytes(frame)
    assert t.classify(frame) == C.REWRITE
    pkt = dissect(frame)
    ip = pkt[IP] if family == 4 else pkt[IPv6]
    assert (ip.src, ip.dst, pkt[TCP].sport, pkt[TCP].dport) == (*want, 1111, 2222)
    assert bytes(pkt[TCP].payload) == b"payload"
    assert scapy_checksums_ok(frame)
    assert engine.verify_checksums(frame) == (True, True)
    v0, v1 = engine.parse(before), engine.parse(frame)
    assert before[v0.l4_off + 20:] == bytes(frame[v1.l4_off + 20:])  # options and payload untouched
    # the entry is keyed by the original tuple: the rewritten frame is a miss
    assert t.classify(frame) == C.PASS
    assert t.stats()["misses"] == 1


def test_rewrite_partial_fields(engine):
    """REWRITE with only a new destination port changes nothing else."""
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_dport=8080)
    frame = seg4()
    assert t.classify(frame) == C.REWRITE
    pkt = dissect(frame)
    assert (pkt[IP].src, pkt[IP].dst, pkt[TCP].sport, pkt[TCP].dport) == (V4_A, V4_B, 40000, 8080)
    assert scapy_checksums_ok(frame)


def test_punt_flags(engine):
    """Frames whose flags meet punt_flags go to PYTHON (and are not rewritten); others get the verdict."""
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_dport=81, punt_flags=C.SYN | C.FIN | C.RST)
    for flags, want in (("S", C.PYTHON), ("SA", C.PYTHON), ("A", C.REWRITE), ("FA", C.PYTHON),
                        ("R", C.PYTHON), ("PA", C.REWRITE)):
        frame = seg4(flags)
        before = bytes(frame)
        assert t.classify(frame) == want, flags
        assert (bytes(frame) == before) == (want == C.PYTHON)
    s = t.stats()
    assert (s["to_python"], s["rewritten"], s["hits"]) == (4, 2, 6)
    assert t.get(V4_A, 40000, V4_B, 80).frames == 6


def test_default_verdict_and_punt(engine):
    """Unknown flows get default_verdict, or PYTHON when their flags meet default_punt."""
    t = engine.FlowTable(default_verdict=C.DROP, default_punt=C.SYN)
    assert t.classify(seg4("S")) == C.PYTHON
    assert t.classify(seg4("SA")) == C.PYTHON
    assert t.classify(seg4("A")) == C.DROP
    assert t.classify(seg6("PA", payload=b"x")) == C.DROP
    s = t.stats()
    assert (s["misses"], s["to_python"], s["dropped"], s["hits"]) == (4, 2, 2, 0)


@pytest.mark.parametrize("verdict", [C.PASS, C.DROP, C.PYTHON])
def test_nontcp_verdict(engine, verdict):
    """UDP, ICMP, ARP and TCP fragments are non-TCP and get nontcp_verdict, even for a known 4-tuple."""
    t = engine.FlowTable(nontcp_verdict=verdict, default_verdict=C.PASS if verdict != C.PASS else C.DROP)
    t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_src=V4_C)
    frames = [udp4(), bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / ICMP()))),
              bytearray(raw(Ether(src=MAC_A, dst=MAC_B) / ARP())),
              bytearray(raw(ether(tcp4(payload=b"12345678", ip_kw=dict(flags="MF"))))),
              bytearray(raw(ether(IP(src=V4_A, dst=V4_B, frag=10, proto=6) / Raw(b"x" * 8)))),
              bytearray(raw(ether(IPv6(src=V6_A, dst=V6_B) / UDP())))]
    for f in frames:
        before = bytes(f)
        assert t.classify(f) == verdict
        assert f == before
    s = t.stats()
    assert s["non_tcp"] == len(frames) and s["hits"] == s["misses"] == 0
    assert t.get(V4_A, 40000, V4_B, 80).frames == 0
    assert_stats_consistent(t)


@pytest.mark.parametrize("verdict", [C.PASS, C.DROP, C.PYTHON])
def test_malformed_verdict_and_error_counts(engine, verdict):
    """Malformed frames get malformed_verdict and are counted in malformed and by kind."""
    t = engine.FlowTable(malformed_verdict=verdict)
    good = seg4(opts=LINUX_SYN_OPTS)
    bad = [good[:10], good[:20], good[:40], bytearray(good[:14]) + b"\x65" + good[15:]]
    doff = bytearray(good)
    doff[34 + 12] = 0x30
    bad.append(doff)
    opt = bytearray(good)
    opt[34 + 21] = 0  # MSS length 0
    bad.append(opt)
    for f in bad:
        before = bytes(f)
        assert t.classify(f) == verdict
        assert f == before
    s = t.stats()
    assert s["malformed"] == len(bad)
    want = zero_errors()
    want.update(TRUNCATED_ETHERNET=1, TRUNCATED_IP=1, BAD_IP_LENGTH=1, BAD_IP_VERSION=1, BAD_TCP_OFFSET=1,
                BAD_TCP_OPTION=1)
    assert s["errors"] == want
    assert s[("passed", "rewritten", "dropped", "to_python")[verdict]] == len(bad)
    assert_stats_consistent(t)


def test_stats_counters_exact(engine):
    """Every counter after a known mix of frames; reset_stats zeroes them but keeps flows."""
    t = engine.FlowTable(default_verdict=C.PASS)
    t.set(V4_A, 40000, V4_B, 80, C.DROP)
    t.set(V6_A, 40000, V6_B, 443, C.REWRITE, new_dport=444)
    frames = [seg4(), seg4("PA", payload=b"abc"), seg6(), seg4(sport=1), udp4(), bytearray(b"\x00" * 10)]
    total = sum(len(f) for f in frames)
    got = [t.classify(f) for f in frames]
    assert got == [C.DROP, C.DROP, C.REWRITE, C.PASS, C.PASS, C.PASS]
    assert stats_without_errors(t) == dict(frames=6, bytes=total, passed=3, rewritten=1, dropped=2, to_python=0,
                                           malformed=1, non_tcp=1, misses=1, hits=3, untracked_bad_csum=0,
                                           ack_beyond_sent=0)
    assert set(t.stats()) == set(C.STAT_NAMES) | {"errors"}
    t.reset_stats()
    assert stats_without_errors(t) == dict.fromkeys(C.STAT_NAMES, 0)
    assert t.stats()["errors"] == zero_errors()
    assert len(t) == 2


def test_tracking_fields(engine):
    """frames, bytes, last_seen, flags_seen, seq_next, ack, window and timestamps of a flow."""
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80)
    syn = seg4("S", seq=100, opts=LINUX_SYN_OPTS)
    t.classify(syn, now=1.5)
    f = t.get(V4_A, 40000, V4_B, 80)
    assert (f.frames, f.bytes, f.last_seen, f.flags_seen, f.seq_next, f.ack, f.window) == (
        1, len(syn), 1.5, C.SYN, 101, 0, 0)
    assert (f.tsval, f.tsecr, f.ts_seen) == (123456, 0, True)
    data = seg4("PA", seq=101, ack=5000, payload=b"x" * 10, opts=[("NOP", None), ("NOP", None),
                                                                 ("Timestamp", (123460, 777))])
    t.classify(data, now=2.25)
    f = t.get(V4_A, 40000, V4_B, 80)
    assert (f.frames, f.bytes, f.last_seen, f.flags_seen) == (2, len(syn) + len(data), 2.25,
                                                               C.SYN | C.PSH | C.ACK)
    assert (f.seq_next, f.ack, f.window, f.tsval, f.tsecr) == (111, 5000, 8192, 123460, 777)
    older = seg4("A", seq=50, ack=4000, opts=[("NOP", None), ("NOP", None), ("Timestamp", (123000, 1))])
    t.classify(older, now=3.0)
    f = t.get(V4_A, 40000, V4_B, 80)
    assert (f.seq_next, f.ack, f.tsval, f.tsecr, f.last_seen, f.frames) == (111, 5000, 123460, 777, 3.0, 3)


def test_raw_link_table(engine):
    """A LINK_RAW table classifies bare IP packets."""
    t = engine.FlowTable(link=RAW)
    t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_src=V4_C)
    frame = seg4(link=RAW)
    assert t.classify(frame) == C.REWRITE
    assert dissect(frame, RAW)[IP].src == V4_C and scapy_checksums_ok(frame, RAW)
    assert t.classify(seg4()) == C.PASS and t.stats()["malformed"] == 1  # an Ethernet frame is not IP


@pytest.mark.parametrize("verdict", [C.PASS, C.REWRITE])
def test_classify_read_only_raises(engine, verdict):
    """classify() needs a writable buffer: a bytes frame raises TypeError or BufferError."""
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80, verdict, new_src=V4_C)
    with pytest.raises((TypeError, BufferError)):
        t.classify(bytes(seg4()))


def test_failed_classify_counts_nothing(engine):
    """A classify() that raised leaves stats consistent (frames = sum of verdict counters)."""
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_src=V4_C)
    with pytest.raises((TypeError, BufferError)):
        t.classify(bytes(seg4()))
    assert_stats_consistent(t)
    assert t.stats()["frames"] == 0 and t.get(V4_A, 40000, V4_B, 80).frames == 0


def test_classify_memoryview(engine):
    """classify() on a writable memoryview slice rewrites the underlying buffer."""
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_dst=V4_D)
    frame = seg4()
    buf = bytearray(b"\xaa" * 5) + frame + b"\xbb" * 5
    assert t.classify(memoryview(buf)[5:5 + len(frame)]) == C.REWRITE
    assert buf[:5] == b"\xaa" * 5 and buf[-5:] == b"\xbb" * 5
    assert dissect(bytes(buf[5:-5]))[IP].dst == V4_D


# --- process_batch ----------------------------------------------------------------------


def _batch(frames, gap=2):
    buf, offs, lens = bytearray(), array("I"), array("I")
    for f in frames:
        buf += b"\xcc" * gap
        offs.append(len(buf))
        lens.append(len(f))
        buf += f
    return buf, offs, lens


def _table(engine):
    t = engine.FlowTable(default_punt=C.SYN, nontcp_verdict=C.DROP, malformed_verdict=C.PYTHON)
    t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_src=V4_C, new_dport=8080, punt_flags=C.FIN)
    t.set(V6_A, 40000, V6_B, 443, C.DROP)
    return t


def _batch_frames():
    return [seg4(), seg4("FA"), seg6(), seg4("S", sport=5), seg4(sport=6), udp4(), bytearray(b"\x01" * 10),
            seg4("PA", payload=b"hello")]


def test_process_batch_matches_classify(engine):
    """process_batch gives the verdicts, buffer and stats of classify() on each frame in turn."""
    frames = _batch_frames()
    buf, offs, lens = _batch(frames)
    verdicts = bytearray(len(frames))
    t1 = _table(engine)
    assert t1.process_batch(buf, offs, lens, verdicts, now=4.0) == len(frames)
    t2 = _table(engine)
    singles = [bytearray(f) for f in frames]
    want = [t2.classify(f, 4.0) for f in singles]
    assert list(verdicts) == want == [C.REWRITE, C.PYTHON, C.DROP, C.PYTHON, C.PASS, C.DROP, C.PYTHON,
                                      C.REWRITE]
    assert buf == _batch(singles)[0]
    assert t1.stats() == t2.stats()
    assert t1.get(V4_A, 40000, V4_B, 80) == t2.get(V4_A, 40000, V4_B, 80)
    assert t1.get(V4_A, 40000, V4_B, 80).last_seen == 4.0
    rewritten = dissect(bytes(buf[offs[0]:offs[0] + lens[0]]))
    assert (rewritten[IP].src, rewritten[TCP].dport) == (V4_C, 8080) and scapy_checksums_ok(rewritten)


def test_process_batch_count_and_verdict_space(engine):
    """count limits the frames; a short verdicts array limits them too; frames past the count are untouched."""
    frames = _batch_frames()
    buf, offs, lens = _batch(frames)
    before = bytes(buf)
    t = _table(engine)
    verdicts = bytearray(b"\xff" * len(frames))
    assert t.process_batch(buf, offs, lens, verdicts, count=0) == 0
    assert t.stats()["frames"] == 0 and buf == before
    assert t.process_batch(buf, offs, lens, verdicts, count=3) == 3
    assert list(verdicts[3:]) == [0xFF] * (len(frames) - 3)
    assert t.stats()["frames"] == 3
    assert buf[offs[-1]:] == before[offs[-1]:]
    t2 = _table(engine)
    assert t2.process_batch(bytearray(before), offs, lens, bytearray(2)) == 2
    assert t2.stats()["frames"] == 2
    assert t2.process_batch(bytearray(before), offs, lens, array("B", bytes(len(frames)))) == len(frames)


def test_process_batch_bad_arguments(engine):
    """Offsets or lengths past the buffer and a count beyond the arrays raise ValueError, classifying nothing."""
    frames = _batch_frames()[:3]
    buf, offs, lens = _batch(frames)
    t = _table(engine)
    verdicts = bytearray(3)
    with pytest.raises(ValueError):
        t.process_batch(buf, offs, lens, verdicts, count=4)
    bad = array("I", offs)
    bad[2] = len(buf)
    with pytest.raises(ValueError):
        t.process_batch(buf, bad, lens, verdicts)
    bad_lens = array("I", lens)
    bad_lens[0] = 0xFFFFFFFF
    with pytest.raises(ValueError):
        t.process_batch(buf, offs, bad_lens, verdicts)
    assert t.stats()["frames"] == 0


def test_process_batch_empty(engine):
    """An empty batch returns 0."""
    t = _table(engine)
    assert t.process_batch(bytearray(), array("I"), array("I"), bytearray()) == 0
    assert t.process_batch(bytearray(), array("I", [0]), array("I", [0]), bytearray(1)) == 1
    assert t.stats()["errors"]["TRUNCATED_ETHERNET"] == 1


# --- Trusted tracking: checksums, the peer's seq_next, DROP, SACK ------------------------

TRACKED = ("flags_seen", "seq_next", "ack", "window", "tsval", "tsecr", "ts_seen", "sack")
ADDR = {4: (V4_A, V4_B, V4_C, V4_D), 6: (V6_A, V6_B, V6_C, V6_D)}


def seg(family, flags="A", seq=1000, ack=0, payload=b"", opts=(), sport=40000, dport=80, src=None, dst=None,
        window=8192, bad_tcp=False, bad_ip=False):
    """A scapy-built frame; bad_tcp / bad_ip set that checksum (chksum=) to a wrong value."""
    src = src or ADDR[family][0]
    dst = dst or ADDR[family][1]
    build = tcp4 if family == 4 else tcp6
    pkt = ether(build(list(opts), payload=payload, src=src, dst=dst, sport=sport, dport=dport, seq=seq, ack=ack,
                      flags=flags, window=window))
    good = dissect(raw(pkt))
    if bad_tcp:
        pkt[TCP].chksum = good[TCP].chksum ^ 0x0F0F
    if bad_ip:
        pkt[IP].chksum = good[IP].chksum ^ 0x0F0F
    return bytearray(raw(pkt))


def ts(tsval, tsecr=0):
    return [("NOP", None), ("NOP", None), ("Timestamp", (tsval, tsecr))]


def sack(*blocks):
    return [("NOP", None), ("NOP", None), ("SAck", tuple(x for b in blocks for x in b))]


def tracked(f):
    return {name: getattr(f, name) for name in TRACKED}


def test_flow_new_fields_at_the_end():
    """Flow keeps its old field order (positional users), sack and ignored come last with defaults."""
    assert C.Flow._fields[-2:] == ("sack", "ignored")
    assert C.Flow._fields[:20] == (
        "src", "sport", "dst", "dport", "verdict", "new_src", "new_sport", "new_dst", "new_dport", "punt_flags",
        "frames", "bytes", "last_seen", "flags_seen", "seq_next", "ack", "window", "tsval", "tsecr", "ts_seen")
    old = C.Flow(*range(20))
    assert (old.sack, old.ignored) == ((), 0)
    assert C.STAT_NAMES[-2:] == ("untracked_bad_csum", "ack_beyond_sent")


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("verdict", [C.PASS, C.REWRITE, C.DROP, C.PYTHON])
def test_bad_tcp_checksum_moves_nothing(engine, family, verdict):
    """A frame with a wrong TCP checksum keeps its verdict and rewrite, counts, but moves no tracked field."""
    a, b, c, d = ADDR[family]
    t = engine.FlowTable()
    t.set(a, 40000, b, 80, verdict, new_dst=c, new_dport=8080)
    good = seg(family, "PA", seq=100, ack=5000, payload=b"x" * 10, opts=ts(7, 3) + sack((4000, 4500)))
    assert t.classify(good, now=1.0) == verdict
    before = tracked(t.get(a, 40000, b, 80))
    assert before["ack"] == 5000 and before["sack"] == ((4000, 4500),)
    bad = seg(family, "FA", seq=110, ack=1083922712, payload=b"y" * 20, opts=ts(900, 800), window=1, bad_tcp=True)
    assert engine.verify_checksums(bad) == (True, False)
    want = bytearray(bad)
    if verdict == C.REWRITE:  # rewritten exactly as before: the receiver's kernel drops it, not us
        engine.rewrite_addresses(want, dst=c, dport=8080)
    assert t.classify(bad, now=2.0) == verdict
    assert bad == want
    f = t.get(a, 40000, b, 80)
    assert tracked(f) == before
    assert (f.frames, f.bytes, f.last_seen, f.ignored) == (2, len(good) + len(bad), 2.0, 1)
    s = t.stats()
    assert (s["untracked_bad_csum"], s["ack_beyond_sent"], s["hits"]) == (1, 0, 2)
    assert s[("passed", "rewritten", "dropped", "to_python")[verdict]] == 2
    assert_stats_consistent(t)


@pytest.mark.parametrize("verdict", [C.PASS, C.REWRITE])
def test_bad_ipv4_header_checksum_moves_nothing(engine, verdict):
    """A wrong IPv4 header checksum (TCP checksum fine) is untrusted too; IPv6 has none to check."""
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80, verdict, new_src=V4_C)
    t.classify(seg(4, "A", seq=1, ack=10))
    before = tracked(t.get(V4_A, 40000, V4_B, 80))
    bad = seg(4, "PA", seq=1, ack=20, payload=b"abc", opts=ts(5), bad_ip=True)
    assert engine.verify_checksums(bad) == (False, True)
    want = bytearray(bad)
    if verdict == C.REWRITE:
        engine.rewrite_addresses(want, src=V4_C)
    assert t.classify(bad) == verdict and bad == want
    f = t.get(V4_A, 40000, V4_B, 80)
    assert tracked(f) == before and (f.frames, f.ignored) == (2, 1)
    assert t.stats()["untracked_bad_csum"] == 1


@pytest.mark.parametrize("family,which", [(4, "tcp"), (6, "tcp"), (4, "ip")])
def test_partial_frame_is_trusted_unverified(engine, family, which):
    """partial_csum: the checksum is the kernel's to complete, so the same bad frame is tracked."""
    a, b = ADDR[family][:2]
    t = engine.FlowTable()
    t.set(a, 40000, b, 80)
    bad = seg(family, "PA", seq=100, ack=5000, payload=b"x" * 10, opts=ts(7, 3), window=77,
              bad_tcp=which == "tcp", bad_ip=which == "ip")
    assert t.classify(bytearray(bad)) == C.PASS
    assert t.get(a, 40000, b, 80).ack == 0
    assert t.classify(bad, partial_csum=True) == C.PASS
    f = t.get(a, 40000, b, 80)
    assert (f.seq_next, f.ack, f.window, f.tsval, f.tsecr, f.flags_seen, f.ignored) == (
        110, 5000, 77, 7, 3, C.PSH | C.ACK, 1)
    assert t.stats()["untracked_bad_csum"] == 1


@pytest.mark.parametrize("family", [4, 6])
def test_needs_csum_frame_tracked_only_as_partial(engine, family):
    """A real NEEDS_CSUM frame (pseudo-header sum in the field) is tracked when flagged, not otherwise."""
    a, b = ADDR[family][:2]
    frame = seg(family, "PA", seq=7, ack=9, payload=b"offload")
    v = engine.parse(frame)
    l4len = v.ip_end - v.l4_off
    if family == 4:
        pseudo = bytes(frame[v.l3_off + 12:v.l3_off + 20]) + bytes((0, 6)) + l4len.to_bytes(2, "big")
    else:
        pseudo = bytes(frame[v.l3_off + 8:v.l3_off + 40]) + l4len.to_bytes(4, "big") + bytes((0, 0, 0, 6))
    frame[v.l4_off + 16:v.l4_off + 18] = ones_sum(pseudo).to_bytes(2, "big")
    assert engine.verify_checksums(frame) == (True, False)
    t = engine.FlowTable()
    t.set(a, 40000, b, 80)
    t.classify(bytearray(frame))  # not flagged: its field is no checksum
    f = t.get(a, 40000, b, 80)
    assert (f.seq_next, f.ack, f.ignored) == (0, 0, 1)
    t.classify(bytearray(frame), partial_csum=True)
    f = t.get(a, 40000, b, 80)
    assert (f.seq_next, f.ack, f.ignored) == (14, 9, 1)


def _pair(engine, family, client_verdict=C.PASS, server_verdict=C.PASS):
    """A client flow a:40000 > b:80 and the server's reverse flow b:80 > a:40000."""
    a, b = ADDR[family][:2]
    t = engine.FlowTable()
    t.set(a, 40000, b, 80, client_verdict)
    t.set(b, 80, a, 40000, server_verdict)
    return t, a, b


@pytest.mark.parametrize("family", [4, 6])
def test_ack_never_past_peer_seq_next(engine, family):
    """An ack beyond the bytes the peer flow sent is refused and counted; up to it, it is taken."""
    t, a, b = _pair(engine, family)
    t.classify(seg(family, "A", seq=1, ack=500))  # no server frame yet: nothing bounds the ack
    assert t.get(a, 40000, b, 80).ack == 500
    t.classify(seg(family, "PA", seq=5000, ack=1, payload=b"s" * 100, sport=80, dport=40000, src=b, dst=a))
    assert t.get(b, 80, a, 40000).seq_next == 5100
    steps = [(5100, 5100, 0), (5101, 5100, 1), (0x80000000, 5100, 2), (5050, 5100, 2), (5100, 5100, 2)]
    for ack, want, beyond in steps:
        t.classify(seg(family, "A", seq=1, ack=ack, window=ack & 0xFFFF, opts=ts(ack)))
        f = t.get(a, 40000, b, 80)
        assert (f.ack, f.window, f.ignored, t.stats()["ack_beyond_sent"]) == (want, 5100, beyond, beyond), ack
    assert f.tsval == 0x80000000  # a refused ack's frame is still trusted: its timestamp is tracked
    assert t.stats()["untracked_bad_csum"] == 0


def test_refused_first_ack_does_not_pin_later_acks(engine):
    """A refused first ack leaves the entry without an ack, so the next valid one is taken whatever its value."""
    t, a, b = _pair(engine, 4)
    t.classify(seg(4, "PA", seq=0xC0000000, payload=b"s" * 10, sport=80, dport=40000, src=b, dst=a))
    t.classify(seg(4, "A", seq=1, ack=0xC0000100))
    f = t.get(a, 40000, b, 80)
    assert (f.ack, f.flags_seen, f.ignored) == (0, C.ACK, 1)
    t.classify(seg(4, "A", seq=1, ack=0xC000000A))
    assert t.get(a, 40000, b, 80).ack == 0xC000000A


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("verdict", [C.REWRITE, C.DROP, C.PYTHON])
def test_peer_found_through_rewrite_fields(engine, family, verdict):
    """The peer is the reverse of the tuple after the rewrite, whatever the entry's verdict."""
    client, vip, server, _ = ADDR[family]
    t = engine.FlowTable()
    t.set(client, 40000, vip, 80, verdict, new_dst=server, new_dport=8080)
    t.set(server, 8080, client, 40000, C.REWRITE, new_src=vip, new_sport=80)
    t.set(vip, 80, client, 40000, C.PASS)  # the plain reverse tuple: a decoy, not the peer
    f = t.get(client, 40000, vip, 80)
    assert (f.verdict, f.new_dst, f.new_dport) == (verdict, socket.inet_pton(
        socket.AF_INET if family == 4 else socket.AF_INET6, server), 8080)
    t.classify(seg(family, "PA", seq=9000, payload=b"d" * 1000, sport=80, dport=40000, src=vip, dst=client))
    t.classify(seg(family, "PA", seq=5000, payload=b"s" * 100, sport=8080, dport=40000, src=server, dst=client))
    assert t.get(vip, 80, client, 40000).seq_next == 10000 and t.get(server, 8080, client, 40000).seq_next == 5100
    t.classify(seg(family, "A", seq=1, ack=5100, src=client, dst=vip))
    t.classify(seg(family, "A", seq=1, ack=9999, src=client, dst=vip))
    f = t.get(client, 40000, vip, 80)
    assert (f.ack, f.ignored) == (5100, 1) and t.stats()["ack_beyond_sent"] == 1
    # and the other way: the server flow's peer is the client flow (reverse of vip:80 > client)
    t.classify(seg(family, "A", seq=1, ack=2, src=client, dst=vip))  # older ack: refused, not counted
    t.classify(seg(family, "A", seq=5100, ack=3, sport=8080, dport=40000, src=server, dst=client))
    f = t.get(server, 8080, client, 40000)
    want_seq_next = 1 if verdict != C.DROP else 0  # a DROP entry's frames never advance seq_next
    assert t.get(client, 40000, vip, 80).seq_next == want_seq_next
    if verdict == C.DROP:
        assert f.ack == 3  # the client flow has seen no forwarded sequence: nothing bounds the ack
    else:
        assert (f.ack, f.ignored) == (0, 1) and t.stats()["ack_beyond_sent"] == 2


def test_set_keeps_rewrite_fields_on_drop_and_python(engine):
    """set() stores new_src/new_dst/ports with DROP or PYTHON; a later set() without them clears them."""
    t = engine.FlowTable()
    for verdict in (C.DROP, C.PYTHON):
        t.set(V4_A, 1, V4_B, 2, verdict, new_src=V4_C, new_sport=3, new_dst=V4_D, new_dport=4)
        f = t.get(V4_A, 1, V4_B, 2)
        assert (f.verdict, f.new_src, f.new_sport, f.new_dst, f.new_dport) == (
            verdict, socket.inet_pton(socket.AF_INET, V4_C), 3, socket.inet_pton(socket.AF_INET, V4_D), 4)
    t.set(V4_A, 1, V4_B, 2, C.DROP)
    f = t.get(V4_A, 1, V4_B, 2)
    assert (f.new_src, f.new_sport, f.new_dst, f.new_dport) == (None, None, None, None)


@pytest.mark.parametrize("family", [4, 6])
def test_dropped_frames_do_not_advance_seq_next(engine, family):
    """seq_next moves with frames forwarded or punted, never with DROPped ones (their other fields count)."""
    a, b = ADDR[family][:2]
    t = engine.FlowTable()
    t.set(a, 40000, b, 80, C.DROP, punt_flags=C.FIN)
    assert t.classify(seg(family, "PA", seq=100, ack=7, payload=b"x" * 50, opts=ts(11))) == C.DROP
    f = t.get(a, 40000, b, 80)
    assert (f.seq_next, f.ack, f.tsval, f.frames, f.ignored) == (0, 7, 11, 1, 0)
    assert t.classify(seg(family, "FA", seq=150, ack=8)) == C.PYTHON  # punted: it reaches the control plane
    assert t.get(a, 40000, b, 80).seq_next == 151
    assert t.classify(seg(family, "PA", seq=151, ack=8, payload=b"y" * 9)) == C.DROP
    assert t.get(a, 40000, b, 80).seq_next == 151
    t.set(a, 40000, b, 80, C.PASS)
    assert t.classify(seg(family, "PA", seq=151, ack=8, payload=b"y" * 9)) == C.PASS
    assert t.get(a, 40000, b, 80).seq_next == 160


def test_dropped_peer_bytes_do_not_count_as_sent(engine):
    """An ack of bytes the table DROPped on the peer flow is beyond what the peer sent."""
    t, a, b = _pair(engine, 4, server_verdict=C.DROP)
    t.set(b, 80, a, 40000, C.PASS)
    t.classify(seg(4, "PA", seq=1000, payload=b"s" * 10, sport=80, dport=40000, src=b, dst=a))
    t.set(b, 80, a, 40000, C.DROP)
    t.classify(seg(4, "PA", seq=1010, payload=b"s" * 10, sport=80, dport=40000, src=b, dst=a))
    assert t.get(b, 80, a, 40000).seq_next == 1010
    t.classify(seg(4, "A", seq=1, ack=1020))
    t.classify(seg(4, "A", seq=1, ack=1010))
    assert t.get(a, 40000, b, 80).ack == 1010 and t.stats()["ack_beyond_sent"] == 1


@pytest.mark.parametrize("family", [4, 6])
def test_sack_blocks_recorded_and_cleared(engine, family):
    """The SACK blocks of the latest trusted frame whose ack was taken (or is the current one)."""
    a, b = ADDR[family][:2]
    t = engine.FlowTable()
    t.set(a, 40000, b, 80)
    get = lambda: t.get(a, 40000, b, 80)  # noqa: E731
    t.classify(seg(family, "A", ack=1000, opts=sack((2000, 3000))))
    assert get().sack == ((2000, 3000),)
    t.classify(seg(family, "A", ack=1000, opts=sack((2000, 3000), (4000, 5000))))  # a dup ack: same ack
    assert get().sack == ((2000, 3000), (4000, 5000))
    t.classify(seg(family, "A", ack=900, opts=sack((1, 2))))  # an older ack: not taken, nor its blocks
    t.classify(seg(family, "A", ack=1000, opts=sack((7, 8)), bad_tcp=True))  # untrusted
    t.classify(seg(family, "S", seq=5, opts=sack((9, 10))))  # no ACK flag: no ack, no blocks
    assert get().sack == ((2000, 3000), (4000, 5000))
    four = ((0xFFFFFF00, 0x10), (0x20, 0x30), (0x40, 0x50), (0x60, 0x70))
    t.classify(seg(family, "A", ack=1000 + 2**31 + 1, opts=sack((1, 2))))  # over 2**31 ahead: older
    t.classify(seg(family, "A", ack=1500, opts=sack(*four)))  # four blocks, one across the wrap
    assert get().sack == four and get().ack == 1500
    t.classify(seg(family, "A", ack=1400))  # older, no blocks: keeps them
    assert get().sack == four
    t.classify(seg(family, "A", ack=1500, opts=ts(1)))  # the current ack, no blocks: cleared
    assert get().sack == ()
    t.classify(seg(family, "A", ack=1600, opts=sack((1700, 1800))))
    t.classify(seg(family, "A", ack=1700))
    assert get().sack == () and get().ack == 1700


def test_sack_of_refused_ack_not_recorded(engine):
    """A SACK riding on an ack beyond the peer's seq_next is refused with it; at the current ack it counts."""
    t, a, b = _pair(engine, 4)
    t.classify(seg(4, "A", seq=1, ack=3000, opts=sack((3500, 4000))))  # no peer sequence yet: taken
    t.classify(seg(4, "PA", seq=1000, payload=b"s" * 100, sport=80, dport=40000, src=b, dst=a))
    t.classify(seg(4, "A", seq=1, ack=1100, opts=sack((1200, 1300))))  # older than 3000: not taken
    t.classify(seg(4, "A", seq=1, ack=3001, opts=sack((5000, 6000))))  # beyond 1100: refused
    assert t.get(a, 40000, b, 80).sack == ((3500, 4000),)
    t.classify(seg(4, "A", seq=1, ack=3000, opts=sack((3600, 4000))))  # the current ack (taken before)
    f = t.get(a, 40000, b, 80)
    assert (f.ack, f.sack, f.ignored) == (3000, ((3600, 4000),), 2)


def test_new_stats_reset_and_batch(engine):
    """The new stats appear in stats(), reset_stats() zeroes them, entries keep their ignored counts;
    process_batch tracks like classify."""
    t, a, b = _pair(engine, 4)
    frames = [seg(4, "PA", seq=1000, payload=b"s" * 100, sport=80, dport=40000, src=b, dst=a),
              seg(4, "A", seq=1, ack=1100), seg(4, "A", seq=1, ack=1200), seg(4, "A", seq=1, ack=1100, bad_tcp=True),
              seg(4, "A", seq=1, ack=1100, bad_ip=True)]
    buf, offs, lens = _batch(frames)
    assert t.process_batch(buf, offs, lens, bytearray(len(frames))) == len(frames)
    t2, _, _ = _pair(engine, 4)
    for f in frames:
        t2.classify(bytearray(f))
    assert t.stats() == t2.stats() and t.get(a, 40000, b, 80) == t2.get(a, 40000, b, 80)
    s = t.stats()
    assert (s["untracked_bad_csum"], s["ack_beyond_sent"]) == (2, 1)
    assert t.get(a, 40000, b, 80).ignored == 3 and t.get(b, 80, a, 40000).ignored == 0
    t.reset_stats()
    s = t.stats()
    assert (s["untracked_bad_csum"], s["ack_beyond_sent"]) == (0, 0)
    assert t.get(a, 40000, b, 80).ignored == 3


_RANDOM_FRAMES = []


def _random_flow_frames(n=20000):
    """n valid-checksum frames of one connection, from both sides, with random seq/ack and options.

    Built with the pure builder (scapy would take a minute for 20,000, and re-encodes garbage
    options); the checksums of a sample are checked independently.
    """
    if _RANDOM_FRAMES:
        return _RANDOM_FRAMES
    rng = random.Random(2024)
    from _fastpath import _pyengine
    nxt = {0: rng.getrandbits(32), 1: rng.getrandbits(32)}
    for i in range(n):
        side = rng.getrandbits(1)
        (src, sport), (dst, dport) = ((V4_A, 40000), (V4_B, 80))[::1 if side == 0 else -1]
        r = rng.random()
        if r < 0.6:
            seq = nxt[side]
        elif r < 0.8:
            seq = (nxt[side] + rng.randrange(-5000, 5000)) & C.MASK32
        else:
            seq = rng.getrandbits(32)
        r = rng.random()
        other = nxt[1 - side]
        if r < 0.4:
            ack = (other + rng.randrange(-3000, 3000)) & C.MASK32
        elif r < 0.5:
            ack = other
        else:
            ack = rng.getrandbits(32)
        flags = rng.choice((C.ACK, C.ACK, C.ACK | C.PSH, C.ACK | C.FIN, C.SYN, C.SYN | C.ACK, C.RST, 0))
        payload = bytes(rng.randrange(0, 1200)) if rng.random() < 0.5 else b""
        frame = _pyengine.build_tcp(src, dst, sport, dport, seq, ack, flags, rng.getrandbits(16),
                                    garbage_options(rng), payload, eth_src=MAC_A, eth_dst=MAC_B)
        if seq == nxt[side] and not flags & C.RST:
            nxt[side] = (seq + len(payload) + bool(flags & C.SYN) + bool(flags & C.FIN)) & C.MASK32
        _RANDOM_FRAMES.append((side, seq, ack, flags, len(payload), bytes(frame)))
    for f in _RANDOM_FRAMES[:300]:  # checked by code that shares nothing with the engines
        ip = f[5][14:]
        seg_ = ip[20:(ip[2] << 8 | ip[3])]
        assert ones_sum(ip[:20]) == 0xFFFF
        assert ones_sum(ip[12:20] + bytes((0, 6)) + len(seg_).to_bytes(2, "big") + seg_) == 0xFFFF
    return _RANDOM_FRAMES


def test_random_frames_never_ack_past_peer(engine):
    """20,000 valid frames with random seq/ack and garbage options: no ack taken beyond the peer's
    seq_next; a model of the rules predicts every ack, seq_next and the count of refusals."""
    frames = _random_flow_frames()
    t = engine.FlowTable()
    keys = ((V4_A, 40000, V4_B, 80), (V4_B, 80, V4_A, 40000))
    for k in keys:
        t.set(*k)
    model = [dict(seq_seen=False, seq_next=0, ack_seen=False, ack=0) for _ in keys]
    refused = taken = 0
    for side, seq, ack, flags, plen, frame in frames:
        me, peer = model[side], model[1 - side]
        assert t.classify(bytearray(frame)) == C.PASS
        if not flags & C.RST:
            end = (seq + plen + bool(flags & C.SYN) + bool(flags & C.FIN)) & C.MASK32
            if not me["seq_seen"] or C.seq_gt(end, me["seq_next"]):
                me.update(seq_seen=True, seq_next=end)
        if flags & C.ACK and (not me["ack_seen"] or C.seq_ge(ack, me["ack"])):
            if peer["seq_seen"] and C.seq_gt(ack, peer["seq_next"]):
                refused += 1
            else:
                me.update(ack_seen=True, ack=ack)
                taken += 1
        f, p = t.get(*keys[side]), t.get(*keys[1 - side])
        assert (f.seq_next, f.ack) == (me["seq_next"], me["ack"])
        if f.ack == ack and flags & C.ACK and p.frames:
            assert C.seq_le(f.ack, p.seq_next) or not peer["seq_seen"]
    s = t.stats()
    assert s["ack_beyond_sent"] == refused > 1000 and taken > 1000
    assert s["untracked_bad_csum"] == 0
    assert t.get(*keys[0]).ignored + t.get(*keys[1]).ignored == refused
