"""FlowTable: entries, verdicts, punting, stats, tracking, REWRITE checked with scapy, batches."""

import ipaddress
import random
import socket
from array import array

import pytest

from _fastpath import _common as C
from helpers import (
    ETH, LINUX_SYN_OPTS, MAC_A, MAC_B, RAW, V4_A, V4_B, V4_C, V4_D, V6_A, V6_B, V6_C, V6_D, ARP, ICMP, IP,
    IPv6, Raw, TCP, UDP, Ether, dissect, ether, raw, scapy_checksums_ok, tcp4, tcp6,
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
                                           malformed=1, non_tcp=1, misses=1, hits=3)
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
