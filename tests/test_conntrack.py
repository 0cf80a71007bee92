"""FlowTable(conntrack=True): client SYNs tagged and recorded in the engine, both builds.

Frames are built with scapy, which is also the oracle for a tagged SYN: checksums scapy
agrees with, the Migrate-Permitted option present, the rest of the SYN unchanged (and the
same bytes as insert_option() gives). test_both_builds_same_answers drives both builds with
the same random traffic and control calls and compares everything they answer; the
forwarders of the inline bridge are run over AF_UNIX datagram pairs (no namespaces).
"""

from __future__ import annotations

import hashlib
import random
import struct
from array import array

import pytest

from _fastpath import _common as C
from helpers import (
    ETH, IP, LINUX_SYN_OPTS, MAC_A, MAC_B, RAW, TCP, V4_A, V4_B, V4_C, V6_A, V6_B, IPv6, dissect, ether,
    load_cengine, load_pyengine, ones_sum, raw, scapy_checksums_ok, tcp4, tcp6,
)

MP = (253, b"MP\x00")  # scapy's view of Migrate-Permitted (RFC 6994 kind 253, ExID "MP", curve 0)
ADDR = {4: (V4_A, V4_B, V4_C), 6: (V6_A, V6_B, "2001:db8:2::3")}
PORT = {4: 80, 6: 443}
MACS = (bytes.fromhex(MAC_A.replace(":", "")), bytes.fromhex(MAC_B.replace(":", "")))


def frame(family=4, flags="A", seq=1000, ack=0, opts=(), payload=b"", sport=40000, dport=None, src=None, dst=None,
          window=8192, reverse=False, link=ETH, ip_kw=None, vlan=None):
    """A scapy-built frame; reverse: from the server (dst side) to the client."""
    dport = PORT[family] if dport is None else dport
    src = src or ADDR[family][0]
    dst = dst or ADDR[family][1]
    if reverse:
        src, dst, sport, dport = dst, src, dport, sport
    build = tcp4 if family == 4 else tcp6
    pkt = build(list(opts), payload=payload, src=src, dst=dst, sport=sport, dport=dport, seq=seq, ack=ack,
                flags=flags, window=window, ip_kw=ip_kw)
    if link == ETH:
        pkt = ether(pkt, vlan=vlan)
        if reverse:
            pkt.src, pkt.dst = MAC_B, MAC_A
    return bytearray(raw(pkt))


def syn(family=4, seq=1000, opts=LINUX_SYN_OPTS, **kw):
    return frame(family, "S", seq, 0, opts, window=64240, **kw)


def synack(family=4, seq=5000, ack=1001, opts=LINUX_SYN_OPTS, **kw):
    return frame(family, "SA", seq, ack, opts, reverse=True, window=65160, **kw)


def table(engine, **kw):
    kw.setdefault("conntrack", True)
    return engine.FlowTable(**kw)


def out(t, f, now=0.0, room=64, partial=False):
    """classify_frame() OUT with `room` spare bytes; returns (verdict, the frame as sent)."""
    buf = bytearray(f) + bytearray(room)
    verdict, n = t.classify_frame(buf, len(f), len(f) + room, now, partial, C.OUT)
    assert bytes(buf[n:]) == bytes(len(buf) - n) or n < len(f)  # nothing written past the frame
    return verdict, bytearray(buf[:n])


def inn(t, f, now=0.0):
    f = bytearray(f)
    return t.classify(f, now, direction=C.IN), f


def handshake(t, family=4, sport=40000, cisn=1000, sisn=5000, now=1.0):
    """SYN, SYN/ACK, and the client's ACK (at now + 0.02, when the connection is established)."""
    out(t, syn(family, cisn, sport=sport), now)
    inn(t, synack(family, sisn, (cisn + 1) & C.MASK32, sport=sport), now + 0.01)
    out(t, frame(family, "A", (cisn + 1) & C.MASK32, (sisn + 1) & C.MASK32, sport=sport), now + 0.02)
    return t.connection(ADDR[family][0], sport, ADDR[family][1], PORT[family])


def key(family=4, sport=40000):
    return (ADDR[family][0], sport, ADDR[family][1], PORT[family])


def rkey(family=4, sport=40000):
    a, p, b, q = key(family, sport)
    return (b, q, a, p)


def ct_stats(t):
    s = t.stats()
    return {k: s[k] for k in C.CT_STAT_NAMES + C.CT_GAUGE_NAMES}


def nonzero(t):
    return {k: v for k, v in ct_stats(t).items() if v}


def assert_tagged(before, after, link=ETH):
    """scapy's verdict on a tagged SYN: valid checksums, Migrate-Permitted present, the rest
    (every other option, header field and payload) unchanged."""
    assert scapy_checksums_ok(after, link)
    b, a = dissect(before, link), dissect(after, link)
    assert MP in a[TCP].options and MP not in b[TCP].options
    pad = ("NOP", "EOL")
    assert [o for o in a[TCP].options if o[0] not in pad and o != MP] == \
        [o for o in b[TCP].options if o[0] not in pad]
    for f in ("sport", "dport", "seq", "ack", "flags", "window", "urgptr"):
        assert getattr(a[TCP], f) == getattr(b[TCP], f), f
    assert bytes(a[TCP].payload) == bytes(b[TCP].payload)
    ip_a, ip_b = (a[IP], b[IP]) if IP in a else (a[IPv6], b[IPv6])
    assert (ip_a.src, ip_a.dst) == (ip_b.src, ip_b.dst)


# --- Configuration ------------------------------------------------------------------------


@pytest.mark.parametrize("field,bad", [
    ("conntrack", 2), ("conntrack", "yes"), ("max_connections", 0), ("max_connections", 1.5),
    ("max_connections", True), ("max_connections", C.MAX_CONNECTIONS + 1), ("max_half_open", 0),
    ("max_half_open", -3), ("half_open_timeout", 0), ("half_open_timeout", float("nan")),
    ("half_open_timeout", "5"), ("idle_timeout", -1.0), ("idle_timeout", float("inf")),
    ("closed_linger", -0.1), ("closed_linger", None), ("tag_syns", 3), ("event_capacity", 0),
    ("event_capacity", C.MAX_EVENTS + 1),
])
def test_constructor_validation_names_the_field(engine, field, bad):
    """Every conntrack setting is checked, in both builds, with a ValueError naming it."""
    kw = {"conntrack": True}
    kw[field] = bad
    with pytest.raises(ValueError, match=field):
        engine.FlowTable(**kw)
    with pytest.raises(ValueError, match=field):
        engine.FlowTable(**{field: bad})  # checked with conntrack off too


def test_settings_readable(engine):
    t = engine.FlowTable(conntrack=True, max_connections=50, max_half_open=7, half_open_timeout=2,
                         idle_timeout=30, closed_linger=0, tag_syns=False, event_capacity=9)
    assert (t.conntrack, t.max_connections, t.max_half_open, t.half_open_timeout, t.idle_timeout, t.closed_linger,
            t.tag_syns, t.event_capacity) == (True, 50, 7, 2.0, 30.0, 0.0, False, 9)
    d = engine.FlowTable()
    assert (d.conntrack, d.max_connections, d.max_half_open, d.half_open_timeout, d.idle_timeout,
            d.closed_linger, d.tag_syns) == (False, 100_000, 10_000, 5.0, 600.0, 10.0, True)


def test_conntrack_off_is_today(engine):
    """Without conntrack a direction changes nothing, stats have today's keys, the new calls are inert."""
    t = engine.FlowTable(default_punt=C.SYN)
    f = syn()
    before = bytes(f)
    assert t.classify(f, 1.0, direction=C.OUT) == C.PYTHON and f == before
    buf = bytearray(f) + bytearray(50)
    assert t.classify_frame(buf, len(f), direction=C.OUT) == (C.PYTHON, len(f))
    assert set(t.stats()) == set(C.STAT_NAMES) | {"errors"}
    assert t.connection(*key()) is None and t.connections() == [] and t.events() == []
    assert t.find_token(1) is None and t.expire(100.0) == 0
    assert t.pin(*key()) is False and t.forget(*key()) is False
    with pytest.raises(ValueError):
        t.restore_connection(None)
    with pytest.raises(ValueError):
        t.classify(bytearray(f), direction=2)


def test_direction_none_keeps_todays_behaviour(engine):
    """A conntrack table given no direction decides exactly as a table without conntrack."""
    rng = random.Random(3)
    frames = [syn(seq=rng.getrandbits(32), sport=40000 + i % 5) for i in range(10)]
    frames += [synack(sport=40000 + i % 5) for i in range(5)] + [frame(flags="FA", sport=40001)]
    t0 = engine.FlowTable(default_punt=C.SYN)
    t1 = engine.FlowTable(default_punt=C.SYN, conntrack=True)
    for tb in (t0, t1):
        tb.set(*key(sport=40001), C.REWRITE, new_dst=V4_C)
    for f in frames:
        a, b = bytearray(f), bytearray(f)
        assert t0.classify(a, 2.0) == t1.classify(b, 2.0, direction=None)
        assert a == b
    s1 = t1.stats()
    assert {k: s1[k] for k in C.STAT_NAMES} == {k: v for k, v in t0.stats().items() if k in C.STAT_NAMES}
    assert s1["syns"] == 0 and s1["connections"] == 0 and t1.connections() == []
    assert t0.get(*key(sport=40001)) == t1.get(*key(sport=40001))


# --- The client's SYN ----------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_client_syn_tagged_and_recorded(engine, family):
    """An OUT SYN of an unknown flow: Migrate-Permitted added where insert_option puts it, checksums
    and lengths right, a half-open connection recorded with both PASS flows."""
    t = table(engine)
    f = syn(family, seq=0xFFFFFFF0)
    verdict, sent = out(t, f, now=3.25)
    assert verdict == C.PASS
    assert len(sent) == len(f) + 8  # 20 option bytes + NOP NOP NOP + 5 = 28
    assert_tagged(f, sent)
    ref = bytearray(f)
    assert engine.insert_option(ref, C.opt_migrate_permitted()) and sent == ref
    c = t.connection(*key(family))
    assert c == C.Conn(ADDR[family][0], 40000, ADDR[family][1], PORT[family], "syn_sent", 3.25, None,
                       C.SynOptions(0xFFFFFFF0, 1460, 7, True, True, 123456, False), None, True, None,
                       MACS[0], MACS[1], False)
    assert c.migrate_permitted and c.key == key(family)
    c2s, s2c = t.get(*key(family)), t.get(*rkey(family))
    assert (c2s.verdict, c2s.punt_flags, s2c.verdict, s2c.punt_flags) == (C.PASS, 0, C.PASS, 0)
    assert (c2s.frames, c2s.seq_next, c2s.flags_seen, c2s.bytes) == (1, 0xFFFFFFF1, C.SYN, len(sent))
    assert nonzero(t) == dict(syns=1, syns_tagged=1, connections=1, half_open=1)
    assert t.events() == []  # a SYN alone queues nothing
    assert t.stats()["misses"] == 1 and t.stats()["passed"] == 1


@pytest.mark.parametrize("family", [4, 6])
def test_retransmission_tagged_identically(engine, family):
    """The same SYN again (same ISN): tagged into the same bytes, nothing new recorded."""
    t = table(engine)
    _, first = out(t, syn(family), 1.0)
    _, again = out(t, syn(family), 2.0)
    assert again == first
    assert nonzero(t) == dict(syns=2, syns_tagged=2, syns_retransmitted=1, connections=1, half_open=1)
    assert t.connection(*key(family)).created == 1.0
    assert t.get(*key(family)).frames == 2


def test_retransmission_of_an_untagged_syn_stays_untagged(engine):
    """A first SYN without room was recorded untagged: its retransmission, even with room, is not tagged."""
    t = table(engine)
    f = syn()
    assert out(t, f, 1.0, room=0)[1] == f
    assert out(t, f, 2.0, room=64)[1] == f
    c = t.connection(*key())
    assert not c.tagged and not c.migrate_permitted
    assert nonzero(t) == dict(syns=2, syns_no_room=1, syns_retransmitted=1, connections=1, half_open=1)


def test_port_reuse_replaces_the_record(engine):
    """A SYN with another ISN on a known 4-tuple whose connection is closed (or half-open): the old
    one is forgotten ("reused"), a new one recorded. On an established one it changes nothing:
    the server answers it with a challenge ACK and the connection goes on (a SYN flood from the
    client's own address hits live ports too)."""
    t = table(engine)
    old = handshake(t, cisn=1000, sisn=5000)
    t.events()
    before = bytes(syn(seq=777777))
    _, sent = out(t, syn(seq=777777), 9.0)
    assert bytes(sent) == before and t.connection(*key()) == old and t.events() == []
    assert t.stats()["syns_on_established"] == 1 and t.find_token(old.token) == old
    out(t, frame(4, "R", 1001, 0), 9.5)  # the client resets it: now the tuple is free
    t.events()
    _, sent = out(t, syn(seq=777777), 10.0)
    assert_tagged(syn(seq=777777), sent)
    (kind, gone), = t.events()
    assert kind == "forgotten" and gone.state == "closed" and gone.forgotten == "reused"
    c = t.connection(*key())
    assert (c.state, c.client_syn.isn, c.created, c.token) == ("syn_sent", 777777, 10.0, None)
    assert t.find_token(old.token) is None
    assert nonzero(t) == dict(syns=3, syns_tagged=2, syns_reused=1, syns_on_established=1, synacks_matched=1,
                              closed_client_rst=1, connections=1, half_open=1)
    assert t.get(*key()).frames == 1  # fresh flows


def test_syn_already_permitted(engine):
    """A SYN carrying Migrate-Permitted itself is forwarded unchanged and is migratable."""
    t = table(engine)
    f = syn(opts=LINUX_SYN_OPTS + [MP])
    assert out(t, f)[1] == f
    c = t.connection(*key())
    assert not c.tagged and c.client_syn.migrate_permitted and c.migrate_permitted
    inn(t, synack())
    assert t.connection(*key()).token == C.migrate_token(1000, 5000)
    assert nonzero(t)["syns_already_permitted"] == 1 and "syns_tagged" not in nonzero(t)


def test_tag_syns_false_records_untagged(engine):
    t = table(engine, tag_syns=False)
    f = syn()
    assert out(t, f)[1] == f
    inn(t, synack())
    out(t, frame(4, "A", 1001, 5001))
    c = t.connection(*key())
    assert (c.state, c.tagged, c.token) == ("established", False, None)
    assert t.get(*rkey()).punt_flags == 0  # not migratable: its server's RSTs are the engine's
    assert nonzero(t) == dict(syns=1, synacks_matched=1, connections=1, established=1)


def test_bad_checksum_syn_is_not_tagged_or_recorded(engine):
    """A SYN its receiver would drop is left as it is: the client will send it again."""
    t = table(engine)
    f = syn()
    f[-1] ^= 0x40  # an option byte: the TCP checksum no longer verifies
    assert out(t, f) == (C.PASS, f)
    assert t.connection(*key()) is None and len(t) == 0
    assert nonzero(t) == dict(syns=1, syns_bad_checksum=1)


# --- Room for the option ------------------------------------------------------------------


def test_syn_without_room_for_the_option(engine):
    """No room in the buffer, or in the TCP header (40 option bytes used): forwarded untagged, recorded."""
    t = table(engine)
    full = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)), ("NOP", None), ("WScale", 7),
            (30, b"x" * 18)]  # 40 bytes
    f = syn(opts=full, sport=40001)
    assert len(engine.parse(f).options()) >= 5 and engine.parse(f).tcp_hdr_len == 60
    assert out(t, f, room=100) == (C.PASS, f)
    g = syn(sport=40002)
    assert out(t, g, room=7) == (C.PASS, g)  # needs 8
    for sport in (40001, 40002):
        c = t.connection(*key(sport=sport))
        assert c is not None and not c.tagged
    assert nonzero(t) == dict(syns=2, syns_no_room=2, connections=2, half_open=2)


def test_fixed_size_classify_never_grows(engine):
    """classify() cannot grow a frame: a SYN needing growth is untagged (syns_no_room); one whose
    header has spare bytes after an EOL is tagged in place, the header keeping its length."""
    t = table(engine)
    f = syn()
    before = bytes(f)
    assert t.classify(f, 1.0, direction=C.OUT) == C.PASS and f == before
    assert not t.connection(*key()).tagged
    padded = syn(opts=[("MSS", 1460), ("EOL", None)] + [("NOP", None)] * 11, sport=40001)  # 16 bytes, 4 used
    v = engine.parse(padded)
    assert v.tcp_hdr_len == 36
    g = bytearray(padded)
    assert t.classify(g, 1.0, direction=C.OUT) == C.PASS and len(g) == len(padded)
    assert_tagged(padded, g)
    assert dissect(g)[TCP].dataofs == 9
    assert g[v.l4_off + 20:v.l4_off + 36] == C.opt_mss(1460) + b"\x01\x01\x01" + C.opt_migrate_permitted() + \
        bytes(4)
    assert t.connection(*key(sport=40001)).tagged
    assert nonzero(t)["syns_no_room"] == 1 and nonzero(t)["syns_tagged"] == 1


@pytest.mark.parametrize("case", ["payload", "trailer", "ip_options", "vlan", "no_options", "odd_options"])
def test_tagging_shapes(engine, case):
    """Payload after the options, an Ethernet trailer, IPv4 options, a VLAN tag, no or odd options:
    the tagged SYN is what insert_option() makes, and scapy agrees with it."""
    kw = {}
    if case == "payload":
        kw = dict(payload=b"GET / HTTP/1.1\r\n\r\n")
    elif case == "ip_options":
        kw = dict(ip_kw=dict(options=[b"\x94\x04\x00\x00"]))  # Router Alert
    elif case == "vlan":
        kw = dict(vlan=12)
    opts = {"no_options": [], "odd_options": [("MSS", 1400), ("WScale", 2)]}.get(case, LINUX_SYN_OPTS)
    f = syn(opts=opts, **kw)
    if case == "trailer":
        f += b"\xee" * 6
    t = table(engine)
    verdict, sent = out(t, f)
    ref = bytearray(f)
    assert engine.insert_option(ref, C.opt_migrate_permitted())
    assert verdict == C.PASS and sent == ref
    if case == "trailer":
        assert sent.endswith(b"\xee" * 6)
        assert_tagged(f[:-6], sent[:-6])
    else:
        assert_tagged(f, sent)
    assert t.connection(*key()).tagged


@pytest.mark.parametrize("family", [4, 6])
def test_partial_checksum_syn(engine, family):
    """A NEEDS_CSUM SYN (its L4 field the pseudo-header sum) grows with the pseudo-header sum of its
    new length: what the kernel would have put there, so the device completes a correct checksum."""
    f = syn(family)
    v = engine.parse(f)
    struct.pack_into("!H", f, v.l4_off + 16, pseudo_sum(f, v))
    t = table(engine)
    verdict, sent = out(t, f, partial=True)
    assert verdict == C.PASS and len(sent) == len(f) + 8
    w = engine.parse(sent)
    assert struct.unpack_from("!H", sent, w.l4_off + 16)[0] == pseudo_sum(sent, w)
    if family == 4:
        assert engine.verify_checksums(sent)[0]
    done = complete(bytearray(sent), w)
    assert scapy_checksums_ok(done)
    fixed = bytearray(sent)
    engine.fix_checksums(fixed)
    assert fixed == done  # fix_checksums of a copy equals what the device computes
    assert_tagged(syn(family), done)
    assert t.connection(*key(family)).tagged


def pseudo_sum(frame, v) -> int:
    l4len = v.ip_end - v.l4_off
    if v.ip_version == 4:
        data = bytes(frame[v.l3_off + 12:v.l3_off + 20]) + struct.pack("!BBH", 0, v.ip_proto, l4len)
    else:
        data = bytes(frame[v.l3_off + 8:v.l3_off + 40]) + struct.pack("!IxxxB", l4len, v.ip_proto)
    return ones_sum(data)


def complete(frame: bytearray, v) -> bytearray:
    """What the device does with NEEDS_CSUM: sum the segment seeded with the field, store the complement."""
    struct.pack_into("!H", frame, v.l4_off + 16, ~ones_sum(bytes(frame[v.l4_off:v.ip_end])) & 0xFFFF)
    return frame


def test_raw_link_table(engine):
    t = table(engine, link=RAW)
    f = syn(link=RAW)
    verdict, sent = out(t, f)
    assert verdict == C.PASS and scapy_checksums_ok(sent, RAW)
    c = t.connection(*key())
    assert c.tagged and c.client_mac is None and c.router_mac is None


# --- The server's SYN/ACK and the Migrate Token --------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_synack_establishes_with_the_token(engine, family):
    t = table(engine)
    out(t, syn(family, seq=0xFFFFFFFF), 1.0)  # ISN + 1 wraps to 0
    bad = synack(family, 5000, 1)
    assert inn(t, bad, 1.1)[0] == C.PASS
    assert t.connection(*key(family)).state == "syn_sent"  # ack is not ISN + 1: unmatched
    sa = synack(family, 0x89ABCDEF, 0, opts=[("MSS", 1380), ("NOP", None), ("WScale", 9)])
    verdict, sent = inn(t, sa, 1.2)
    assert verdict == C.PASS and sent == sa
    c = t.connection(*key(family))
    token = C.migrate_token(0xFFFFFFFF, 0x89ABCDEF)
    # known (and migratable), but half-open until the client acknowledges the SYN/ACK
    assert (c.state, c.established_at, c.token) == ("syn_sent", None, token)
    assert c.server_syn == C.SynOptions(0x89ABCDEF, 1380, 9, False, False, None, False)
    assert t.find_token(token) == c and t.find_token(token ^ 1) is None
    assert t.get(*rkey(family)).punt_flags == C.RST
    assert t.events() == []
    inn(t, sa, 1.3)  # the same SYN/ACK again
    assert t.connection(*key(family)) == c
    out(t, frame(family, "A", 0, 0x89ABCDEF, window=500), 1.35)  # acks nothing of the server's: not it
    assert t.connection(*key(family)).state == "syn_sent"
    out(t, frame(family, "A", 0, 0x89ABCDF0, window=500), 1.4)  # the client's ACK
    c = t.connection(*key(family))
    assert (c.state, c.established_at, c.token) == ("established", 1.4, token)
    assert t.events() == [("established", c)]
    assert nonzero(t) == dict(syns=1, syns_tagged=1, synacks_matched=1, synacks_unmatched=1,
                              synacks_retransmitted=1, connections=1, established=1, tokens=1)


def test_synack_of_unknown_flow_is_todays(engine):
    t = table(engine, default_punt=C.SYN)
    assert inn(t, synack())[0] == C.PYTHON
    assert nonzero(t) == dict(synacks_unmatched=1)


def test_sha1_matches_hashlib(engine):
    """The compiled build's own SHA-1 (and the pure build's) against hashlib, every block boundary."""
    rng = random.Random(1)
    for n in list(range(0, 200)) + [1000, 4096, 65537]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert engine._sha1(data) == hashlib.sha1(data).digest(), n


def test_tokens_match_migrate_token(engine):
    t = table(engine)
    rng = random.Random(2)
    isns = [(rng.getrandbits(32), rng.getrandbits(32)) for _ in range(50)] + [(0, 0), (0xFFFFFFFF, 0xFFFFFFFE)]
    for i, (ni, na) in enumerate(isns):
        c = handshake(t, sport=20000 + i, cisn=ni, sisn=na)
        assert c.token == C.migrate_token(ni, na)
        assert t.find_token(c.token).client_port == 20000 + i


def test_same_token_finds_the_newest(engine):
    t = table(engine)
    handshake(t, sport=1, cisn=7, sisn=9)
    handshake(t, sport=2, cisn=7, sisn=9)
    tok = C.migrate_token(7, 9)
    assert t.find_token(tok).client_port == 2
    t.forget(*key(sport=2))
    assert t.find_token(tok).client_port == 1
    assert t.stats()["tokens"] == 1


def test_migrate_syn_always_punted(engine):
    """IN, a SYN with the Migrate option: PYTHON, whatever the table says about its tuple."""
    t = table(engine, default_verdict=C.DROP)
    c = handshake(t)
    mig = bytearray(engine.build_migrate_syn(V4_C, V4_A, 80, 40000, 99, 1, c.token, 5, eth_src=MAC_B, eth_dst=MAC_A))
    assert inn(t, mig)[0] == C.PYTHON
    t.set(V4_C, 80, V4_A, 40000, C.DROP)
    assert inn(t, mig)[0] == C.PYTHON
    assert t.stats()["migrate_syns"] == 2


# --- Closing -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_fin_both_ways_closes(engine, family):
    t = table(engine)
    handshake(t, family)
    t.events()
    assert out(t, frame(family, "FA", 1001, 5001), 2.0)[0] == C.PASS
    assert t.connection(*key(family)).state == "established"  # one way only
    bad = frame(family, "FA", 5001, 1002, reverse=True)
    bad[-1] ^= 1  # a FIN with a bad checksum closes nothing
    inn(t, bad, 2.5)
    assert t.connection(*key(family)).state == "established"
    inn(t, frame(family, "FA", 5001, 1002, reverse=True), 3.0)
    c = t.connection(*key(family))
    assert (c.state, c.closed_at, c.closed_by) == ("closed", 3.0, "fin")
    assert t.events() == [("closed", c)]
    assert t.expire(3.0 + 10.0) == 0  # closed_linger 10 s: not yet (strictly older)
    assert t.expire(13.5) == 1
    (kind, gone), = t.events()
    assert (kind, gone.forgotten, gone.state) == ("forgotten", "closed", "closed")
    assert t.connection(*key(family)) is None and t.get(*key(family)) is None and t.get(*rkey(family)) is None
    assert nonzero(t)["closed_fin"] == 1 and nonzero(t)["closed_expired"] == 1 and len(t) == 0


def test_client_rst_closes_and_is_forwarded(engine):
    t = table(engine)
    handshake(t)
    assert out(t, frame(flags="R", seq=1001), 4.0)[0] == C.PASS
    c = t.connection(*key())
    assert (c.state, c.closed_by, c.closed_at) == ("closed", "client_rst", 4.0)
    assert t.stats()["closed_client_rst"] == 1


def test_server_rst(engine):
    """A migratable connection's server RST goes to Python (MIGRATE-WAIT) and closes nothing; a
    half-open or unmigratable one's is forwarded and closes it."""
    t = table(engine)
    handshake(t, sport=1)
    assert inn(t, frame(flags="R", seq=5001, sport=1, reverse=True), 2.0)[0] == C.PYTHON
    assert t.connection(*key(sport=1)).state == "established"
    out(t, syn(sport=2), 2.0)
    assert inn(t, frame(flags="RA", seq=0, ack=1001, sport=2, reverse=True), 2.1)[0] == C.PASS
    assert t.connection(*key(sport=2)) is None  # never established: forgotten at once
    assert t.stats()["closed_server_rst"] == 1
    u = table(engine, tag_syns=False)
    handshake(u, sport=3)
    assert inn(u, frame(flags="R", seq=5001, sport=3, reverse=True), 3.0)[0] == C.PASS
    assert u.connection(*key(sport=3)).closed_by == "server_rst"


# --- Bounds, timers, pinning ----------------------------------------------------------------


def test_half_open_bound_evicts_oldest_first(engine):
    t = table(engine, max_half_open=3)
    for i in range(5):
        out(t, syn(sport=100 + i), float(i))
    assert t.events() == []  # never established: no events (a SYN flood's would crowd out the others')
    assert [c.client_port for c in t.connections()] == [102, 103, 104]
    assert t.get(*key(sport=100)) is None and t.get(*rkey(sport=100)) is None
    inn(t, synack(sport=102))
    out(t, frame(4, "A", 1001, 5001, sport=102))  # established ones do not count as half-open
    out(t, syn(sport=105), 6.0)
    assert [c.client_port for c in t.connections()] == [102, 103, 104, 105]
    out(t, syn(sport=106), 7.0)
    assert [c.client_port for c in t.connections()] == [102, 104, 105, 106]
    assert nonzero(t)["half_open_evicted"] == 3 and t.stats()["half_open"] == 3


def test_connection_bound(engine):
    """At max_connections a new SYN evicts the oldest half-open; with none it goes untracked, untagged."""
    t = table(engine, max_connections=3, default_verdict=C.PASS)
    handshake(t, sport=1)
    handshake(t, sport=2)
    out(t, syn(sport=3), 2.0)
    out(t, syn(sport=4), 3.0)  # evicts 3
    assert [c.client_port for c in t.connections()] == [1, 2, 4]
    inn(t, synack(sport=4))
    out(t, frame(4, "A", 1001, 5001, sport=4), 3.5)
    f = syn(sport=5)
    assert out(t, f, 4.0) == (C.PASS, f)
    assert t.connection(*key(sport=5)) is None and len(t) == 6
    assert nonzero(t)["syns_untracked_full"] == 1 and nonzero(t)["half_open_evicted"] == 1


def test_a_syn_flood_answered_by_the_server_stays_half_open(engine):
    """A SYN the server answers, with no ACK from the client (a flood from spoofed or raw-socket
    sources), is still half-open: bounded by max_half_open, evicted first, forgotten after
    half_open_timeout, or at once when reset; its token works meanwhile. The client's first
    data segment (its ACK lost) establishes it too. When closed ones fill max_connections,
    the oldest go first."""
    t = table(engine, max_half_open=2, max_connections=4, half_open_timeout=5, closed_linger=10)
    for i in range(3):
        out(t, syn(seq=1000 + i, sport=10 + i), float(i))
        inn(t, synack(seq=5000 + i, ack=1001 + i, sport=10 + i), float(i) + 0.01)
    assert [c.client_port for c in t.connections()] == [11, 12]
    assert nonzero(t)["half_open_evicted"] == 1 and t.stats()["half_open"] == 2 and t.stats()["tokens"] == 2
    c = t.connection(*key(sport=11))
    assert t.find_token(c.token) == c
    out(t, frame(4, "PA", 1002, 5002, payload=b"GET / HTTP/1.1\r\n\r\n", sport=11), 3.0)
    assert t.connection(*key(sport=11)).state == "established"
    t.events()
    t.expire(7.5)  # 12 is 5.5 s old without its handshake complete
    assert t.events() == [] and t.connection(*key(sport=12)) is None  # forgotten, quietly
    assert [c.client_port for c in t.connections()] == [11]
    # one its client's kernel refused with a RST (its SYN came from a raw socket): forgotten at once
    out(t, syn(sport=19), 7.6)
    inn(t, synack(sport=19), 7.61)
    assert out(t, frame(4, "R", 1001, 0, sport=19), 7.62)[0] == C.PASS
    assert t.events() == [] and t.stats()["closed_client_rst"] == 1
    assert t.get(*key(sport=19)) is None and t.get(*rkey(sport=19)) is None and len(t.connections()) == 1
    for i in range(3):  # three complete ones reset: closed, lingering
        handshake(t, sport=20 + i, now=8.0)
        out(t, frame(4, "R", 1001, 0, sport=20 + i), 8.05)
    assert t.stats()["closed"] == 3 and len(t.connections()) == 4
    handshake(t, sport=30, now=9.0)  # full: the oldest closed one makes room, not 11
    assert [c.client_port for c in t.connections()] == [11, 21, 22, 30]
    assert nonzero(t)["closed_evicted"] == 1 and t.connection(*key(sport=30)).state == "established"


def test_expire_timeouts(engine):
    t = table(engine, half_open_timeout=5, idle_timeout=100, closed_linger=10)
    out(t, syn(sport=1), 0.0)
    handshake(t, sport=2, now=0.0)
    handshake(t, sport=3, now=0.0)
    t.events()
    assert t.expire(5.0) == 0
    assert t.expire(5.5) == 1
    assert t.events() == []  # a connection never established is no event
    out(t, frame(flags="A", seq=1001, ack=5001, sport=3), 60.0)  # 3 is active
    assert t.expire(100.5) == 1
    assert [(c.client_port, c.forgotten) for _, c in t.events()] == [(2, "idle")]
    inn(t, frame(flags="A", seq=5001, ack=1001, sport=3, reverse=True), 150.0)  # either way counts
    assert t.expire(200.0) == 0
    assert t.expire(250.5) == 1 and t.connections() == []
    s = nonzero(t)
    assert (s["half_open_expired"], s["idle_expired"]) == (1, 2) and len(t) == 0


def test_expire_budget_resumes(engine):
    """With a budget the idle sweep examines that many established connections per call, resuming."""
    t = table(engine, idle_timeout=10)
    for i in range(6):
        handshake(t, sport=i, now=0.0)
    t.events()
    assert t.expire(20.0, budget=0) == 0
    assert t.expire(20.0, budget=4) == 4
    assert [c.client_port for _, c in t.events()] == [0, 1, 2, 3]
    assert t.expire(20.0, budget=1) == 1 and t.expire(20.0, budget=5) == 1
    assert t.stats()["connections"] == 0
    with pytest.raises(ValueError):
        t.expire(1.0, budget=-1)


def test_pin_protects(engine):
    t = table(engine, max_half_open=1, half_open_timeout=1, idle_timeout=1, closed_linger=1)
    out(t, syn(sport=1), 0.0)
    assert t.pin(*key(sport=1)) is True
    out(t, syn(sport=2), 0.0)
    assert t.connection(*key(sport=1)).pinned
    assert [c.client_port for c in t.connections()] == [1, 2]
    handshake(t, sport=3, now=0.0)  # the bound: 2 is evicted, not the pinned 1
    assert [(k, c.client_port) for k, c in t.events()] == [("established", 3)]  # 2 was never established
    assert t.connection(*key(sport=2)) is None
    t.pin(*key(sport=3))
    out(t, frame(flags="FA", sport=3), 0.5)
    inn(t, frame(flags="FA", seq=5001, sport=3, reverse=True), 0.5)
    assert t.connection(*key(sport=3)).state == "established"  # pinned: the control plane's to close
    assert t.expire(100.0) == 0 and t.events() == []
    assert [c.client_port for c in t.connections()] == [1, 3]
    assert t.stats()["pinned"] == 2
    assert t.pin(*key(sport=1), on=False) and t.pin(*key(sport=3), False)
    assert t.expire(200.0) == 2 and t.connections() == []
    assert t.pin(*key(sport=9)) is False and t.pin(*rkey(sport=3)) is False


def test_forget_and_remove(engine):
    t = table(engine)
    c = handshake(t, sport=1, cisn=11)
    handshake(t, sport=2, cisn=22)
    t.events()
    assert t.forget(*key(sport=1)) is True and t.forget(*key(sport=1)) is False
    assert t.forget(*rkey(sport=2)) is False  # by the client->server tuple only
    assert t.connection(*key(sport=1)) is None and t.find_token(c.token) is None
    assert t.get(*key(sport=1)) is None and t.get(*rkey(sport=1)) is None
    assert t.remove(*rkey(sport=2)) is True  # either flow of a connection takes the connection with it
    assert t.connections() == [] and len(t) == 0 and t.events() == []
    handshake(t, sport=3)
    t.set(V4_C, 1, V4_A, 2)
    t.clear()
    assert t.connections() == [] and len(t) == 0 and t.stats()["tokens"] == 0
    handshake(t, sport=4)
    assert t.stats()["connections"] == 1


def test_set_keeps_the_link(engine):
    """The control plane may change a tracked flow's verdict; the connection stays tracked."""
    t = table(engine)
    handshake(t)
    t.set(*key(), C.REWRITE, new_dst=V4_C, punt_flags=C.RST)
    assert out(t, frame(flags="R", seq=1001), 2.0)[0] == C.PYTHON
    assert t.connection(*key()).state == "established"
    assert t.forget(*key()) and len(t) == 0


# --- Restore, events, stats, listing --------------------------------------------------------


def _states(t):
    out(t, syn(sport=1), 1.0)  # syn_sent
    handshake(t, sport=2, cisn=1000, now=2.0)  # established, migratable
    handshake(t, sport=3, cisn=3000, now=3.0)
    out(t, frame(flags="R", seq=3001, sport=3), 3.5)  # closed
    handshake(t, family=6, sport=4, cisn=4000, now=4.0)
    t.pin(*key(6, 4))
    out(t, syn(sport=5), 5.0)
    out(t, frame(flags="R", seq=1001, sport=5), 5.5)  # closed before established: forgotten at once
    handshake(t, sport=6, cisn=6000, now=6.0)
    out(t, frame(flags="R", seq=6001, sport=6), 6.5)  # closed


def test_restore_connection_round_trip(engine):
    t = table(engine)
    _states(t)
    recs = t.connections()
    assert [c.state for c in recs] == ["syn_sent", "established", "closed", "established", "closed"]
    u = table(engine)
    for i, c in enumerate(recs):
        rec = (c, c._asdict(), list(c))[i % 3]  # a Conn, or its fields as a journal would keep them
        if i % 3 == 1:
            rec["client_syn"] = dict(c.client_syn._asdict())
        assert u.restore_connection(rec) == c
    assert u.connections() == recs
    for c in recs:
        assert u.connection(*c.key) == c
        if c.token is not None:
            assert u.find_token(c.token) == c
        f, r = u.get(*c.key), u.get(c.server, c.server_port, c.client, c.client_port)
        assert f.verdict == r.verdict == C.PASS
        assert r.punt_flags == (C.RST if c.token is not None else 0)
    assert nonzero(u) == dict(connections=5, half_open=1, established=2, closed=2, pinned=1, tokens=4)
    # a restored connection goes on as any other
    inn(u, frame(flags="FA", seq=5001, sport=2, reverse=True), 9.0)
    out(u, frame(flags="FA", seq=1001, sport=2), 9.1)
    assert u.connection(*key(sport=2)).closed_by == "fin"


def test_restore_connection_checks_and_replaces(engine):
    t = table(engine, idle_timeout=50)
    c = handshake(t, now=1.0)
    for bad in (dict(state="open"), dict(client="nowhere"), dict(client_port=70000), dict(server=V6_A),
                dict(server_syn=None), dict(client_syn=C.SynOptions(-1, None, None, False, False, None, False)),
                dict(client_mac=b"\x01")):
        with pytest.raises(ValueError):
            t.restore_connection(c._replace(**bad))
    with pytest.raises(ValueError):
        t.restore_connection(("too", "short"))
    with pytest.raises(ValueError):
        t.restore_connection(c, now="later")
    d = t.restore_connection(c._replace(created=0.5, established_at=0.6), now=100.0)
    assert t.connections() == [d] and d.created == 0.5
    assert t.expire(140.0) == 0 and t.expire(150.5) == 1  # active from `now`


def test_restore_connection_bound(engine):
    t = table(engine, max_connections=2)
    a, b = handshake(t, sport=1), handshake(t, sport=2)
    with pytest.raises(MemoryError):
        t.restore_connection(a._replace(client_port=3))
    t.forget(*key(sport=2))
    assert t.restore_connection(b) == b


def test_events_ring_drops_the_oldest(engine):
    t = table(engine, event_capacity=4)
    for i in range(3):
        handshake(t, sport=i)
        out(t, frame(flags="R", seq=1001, sport=i), 2.0)
    ev = t.events(limit=2)
    assert [(k, c.client_port) for k, c in ev] == [("established", 1), ("closed", 1)]
    assert [(k, c.client_port) for k, c in t.events()] == [("established", 2), ("closed", 2)]
    assert t.events() == [] and t.stats()["events_dropped"] == 2
    with pytest.raises(ValueError):
        t.events(-1)


def test_stats_keys_and_reset(engine):
    t = table(engine)
    handshake(t)
    s = t.stats()
    assert set(s) == set(C.STAT_NAMES) | {"errors"} | set(C.CT_STAT_NAMES) | set(C.CT_GAUGE_NAMES)
    assert s["frames"] == s["misses"] + s["hits"] + s["malformed"] + s["non_tcp"]
    t.reset_stats()
    assert nonzero(t) == dict(connections=1, established=1, tokens=1)  # gauges stay


def test_connections_limit_most_recent(engine):
    t = table(engine)
    for i in range(10):
        out(t, syn(sport=i), float(i))
    assert [c.client_port for c in t.connections(3)] == [7, 8, 9]
    assert t.connections(0) == [] and len(t.connections()) == 10 and len(t.connections(100)) == 10
    with pytest.raises(ValueError):
        t.connections(-1)


def test_process_batch_with_caps(engine):
    """process_batch(direction=OUT, caps=, new_lengths=) tags in each frame's own room, as classify_frame."""
    frames = [syn(sport=i, seq=i * 1000) for i in range(5)] + [syn(sport=9, opts=LINUX_SYN_OPTS + [MP])]
    slot = 200
    buf = bytearray(slot * len(frames))
    for i, f in enumerate(frames):
        buf[i * slot:i * slot + len(f)] = f
    offs = array("I", [i * slot for i in range(len(frames))])
    lens = array("I", [len(f) for f in frames])
    caps = array("I", [len(f) + (64 if i != 2 else 0) for i, f in enumerate(frames)])
    newl = array("I", bytes(4 * len(frames)))
    verdicts = bytearray(len(frames))
    t = table(engine)
    assert t.process_batch(buf, offs, lens, verdicts, 1.0, direction=C.OUT, caps=caps, new_lengths=newl) == 6
    u = table(engine)
    for i, f in enumerate(frames):
        b = bytearray(f) + bytearray(caps[i] - len(f))
        v, n = u.classify_frame(b, len(f), caps[i], 1.0, False, C.OUT)
        assert (verdicts[i], newl[i]) == (v, n) and buf[offs[i]:offs[i] + n] == b[:n]
    assert list(newl) == [len(f) + (8 if i not in (2, 5) else 0) for i, f in enumerate(frames)]
    assert u.connections() == t.connections() and ct_stats(u) == ct_stats(t)
    with pytest.raises(ValueError):
        t.process_batch(buf, offs, lens, verdicts, direction=C.OUT, caps=array("I", [slot * 10] * 6))
    with pytest.raises(ValueError):
        t.process_batch(buf, offs, lens, verdicts, direction=C.OUT, caps=array("I", [1] * 6))


def test_classify_frame_arguments(engine):
    t = table(engine)
    with pytest.raises(ValueError):
        t.classify_frame(bytearray(10), 11)
    with pytest.raises(ValueError):
        t.classify_frame(bytearray(10), 5, 11)
    with pytest.raises((TypeError, BufferError)):
        t.classify_frame(bytes(syn()), 10)
    assert t.classify_frame(bytearray(10), 10, direction=C.OUT) == (C.PASS, 10)  # malformed: default


def test_shrinks_when_far_under_used():
    """The compiled build gives memory back after a flood: the records array and the flow slots."""
    ce = load_cengine()
    t = ce.FlowTable(conntrack=True, max_half_open=20_000, half_open_timeout=1.0)
    base = t._memory()
    n = 20_000
    opts = SYN_OPTS[0]
    frames = [ce.build_tcp(f"10.1.{i >> 8}.{i & 255}", V4_B, 1024 + i, 80, i, 0, C.SYN, 64240, opts,
                           eth_src=MAC_A, eth_dst=MAC_B) for i in range(n)]
    buf = bytearray(b"".join(frames))
    one = len(frames[0])
    offs = array("I", range(0, n * one, one))
    lens = array("I", [one] * n)
    t.process_batch(buf, offs, lens, bytearray(n), 0.0, direction=C.OUT)
    grown = t._memory()
    assert t.stats()["connections"] == n and grown["slots"] >= 4 * n * 184 // 2 and grown["connections"] >= n * 152
    assert t.expire(2.0) == n
    small = t._memory()
    assert small["slots"] == base["slots"] and small["connections"] == 1024 * 152
    assert len(t) == 0 and t.stats()["half_open_expired"] == n
    handshake(t)  # and it works on
    assert t.stats()["connections"] == 1


# --- Both builds, same answers ------------------------------------------------------------

POOL = [(4, 40000 + i) for i in range(4)] + [(6, 41000 + i) for i in range(2)]
SYN_OPTS = [C.opt_mss(1460) + C.opt_sack_permitted() + C.opt_timestamps(1, 0) + b"\x01" + C.opt_wscale(7),
            b"", C.opt_mss(1200) + C.aligned_option(C.opt_migrate_permitted()),
            C.opt_mss(536) + b"\x00" * 12, bytes((30, 38)) + bytes(36),
            C.opt_wscale(14) + C.opt_timestamps(0xFFFFFFFF, 5)]


def _fuzz_ops(seed, count):
    """(op, args) for both builds: frames (with direction, room, partial) and control calls."""
    rng = random.Random(seed)
    py = load_pyengine()
    cisn = {p: rng.choice((1000, 2000, 0xFFFFFFFF)) for p in POOL}
    sisn = {p: rng.getrandbits(32) for p in POOL}
    ops = []
    now = 0.0
    for _ in range(count):
        now += rng.choice((0.0, 0.01, 0.3, 1.0, 4.0))
        fam, port = p = rng.choice(POOL)
        a, b, c3 = ADDR[fam]
        sp = PORT[fam]
        r = rng.random()
        if r < 0.08:
            ops.append(("expire", now, rng.choice((None, 0, 1, 3))))
            continue
        if r < 0.12:
            ops.append((rng.choice(("pin", "unpin", "forget", "remove", "remove_rev", "set", "restore", "events",
                                    "connection")), p, now))
            continue
        kind = rng.random()
        mac_out, mac_in = (MAC_A, MAC_B), (MAC_B, MAC_A)
        payload = b""
        if kind < 0.3:
            if rng.random() < 0.4:
                cisn[p] = rng.choice((1000, 2000, 0xFFFFFFFF, rng.getrandbits(32)))
            if rng.random() < 0.2:
                payload = bytes(rng.randrange(30))
            f = py.build_tcp(a, b, port, sp, cisn[p], 0, C.SYN, 64240, rng.choice(SYN_OPTS), payload,
                             eth_src=mac_out[0], eth_dst=mac_out[1])
            d = C.OUT
        elif kind < 0.5:
            if rng.random() < 0.3:
                sisn[p] = rng.getrandbits(32)
            ack = (cisn[p] + 1) & C.MASK32 if rng.random() < 0.8 else rng.getrandbits(32)
            f = py.build_tcp(b, a, sp, port, sisn[p], ack, C.SYN | C.ACK, 65160, rng.choice(SYN_OPTS),
                             eth_src=mac_in[0], eth_dst=mac_in[1])
            d = C.IN
        elif kind < 0.55:
            f = py.build_migrate_syn(c3, a, 80, port, rng.getrandbits(32), 1, rng.getrandbits(64), 2,
                                     eth_src=mac_in[0], eth_dst=mac_in[1])
            d = C.IN
        else:
            flags = rng.choice((C.ACK, C.ACK | C.PSH, C.ACK | C.FIN, C.FIN, C.RST, C.RST | C.ACK, C.SYN | C.ACK))
            if rng.random() < 0.5:
                f = py.build_tcp(a, b, port, sp, (cisn[p] + 1) & C.MASK32, (sisn[p] + 1) & C.MASK32, flags, 500,
                                 b"", bytes(rng.randrange(3)), eth_src=mac_out[0], eth_dst=mac_out[1])
                d = C.OUT
            else:
                f = py.build_tcp(b, a, sp, port, (sisn[p] + 1) & C.MASK32, (cisn[p] + 1) & C.MASK32, flags, 500,
                                 b"", b"", eth_src=mac_in[0], eth_dst=mac_in[1])
                d = C.IN
        f = bytearray(f)
        if rng.random() < 0.08:
            f[rng.randrange(14, len(f))] ^= 1 << rng.randrange(8)
        if rng.random() < 0.05:
            d = C.IN if d == C.OUT else C.OUT
        if rng.random() < 0.03:
            d = None
        ops.append(("frame", bytes(f), now, rng.choice((0, 0, 4, 8, 64)), rng.random() < 0.15, d,
                    rng.random() < 0.3))
    return ops


def _apply(t, op):
    kind = op[0]
    if kind == "frame":
        _, f, now, room, partial, d, fixed = op
        buf = bytearray(f) + bytearray(room)
        if fixed:
            return t.classify(buf, now, partial, d), bytes(buf)
        return t.classify_frame(buf, len(f), len(buf), now, partial, d), bytes(buf)
    if kind == "expire":
        return t.expire(op[1], op[2]), t.events()
    (fam, port), now = op[1], op[2]
    k = key(fam, port)
    if kind == "pin":
        return t.pin(*k)
    if kind == "unpin":
        return t.pin(*k, on=False)
    if kind == "forget":
        return t.forget(*k)
    if kind == "remove":
        return t.remove(*k)
    if kind == "remove_rev":
        return t.remove(*rkey(fam, port))
    if kind == "set":
        return t.set(*rkey(fam, port), C.PASS, punt_flags=C.RST | C.FIN)
    if kind == "restore":
        c = t.connection(*k)
        return None if c is None else t.restore_connection(c._replace(created=c.created - 1), now)
    if kind == "events":
        return t.events(3)
    return t.connection(*k)


def _everything(t):
    keys = sorted(t.keys())
    return (t.stats(), t.connections(), keys, [t.get(*kk) for kk in keys],
            [t.find_token(c.token) for c in t.connections() if c.token is not None])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_both_builds_same_answers(seed):
    """Random SYN / SYN-ACK / ACK / FIN / RST / Migrate SYN traffic (bad checksums, partial frames, wrong
    or no direction, room or none) and control calls: both builds answer alike after every step."""
    ce, py = load_cengine(), load_pyengine()
    kw = dict(conntrack=True, capacity=2, max_connections=5, max_half_open=2, half_open_timeout=3.0,
              idle_timeout=8.0, closed_linger=2.0, event_capacity=1)
    tc, tp = ce.FlowTable(**kw), py.FlowTable(**kw)
    seen = set()
    for i, op in enumerate(_fuzz_ops(seed, 2500)):
        assert _apply(tc, op) == _apply(tp, op), (i, op)
        if i % 50 == 0:
            assert _everything(tc) == _everything(tp), i
        seen.add(op[0])
    s = tp.stats()
    assert _everything(tc) == _everything(tp)
    for name in ("syns_tagged", "syns_retransmitted", "syns_reused", "half_open_evicted", "synacks_matched",
                 "synacks_unmatched", "closed_fin", "closed_client_rst", "migrate_syns", "events_dropped",
                 "syns_no_room", "syns_bad_checksum", "half_open_expired", "syns_already_permitted"):
        assert s[name] > 0, name


def test_compaction_keeps_everything():
    """Thousands of connections, most forgotten, the rest scattered (pinned, closed, with tokens): the
    compiled build moves its records to the front and shrinks its slots; both builds still answer alike,
    and go on alike (expiry order, the idle sweep's cursor, tokens, eviction)."""
    ce, py = load_cengine(), load_pyengine()
    kw = dict(conntrack=True, max_connections=20_000, max_half_open=20_000, half_open_timeout=50.0,
              idle_timeout=100.0, closed_linger=30.0)
    tables = [ce.FlowTable(**kw), py.FlowTable(**kw)]
    opts = SYN_OPTS[0]

    def src(i):
        return f"10.2.{i >> 8}.{i & 255}"

    def both(fn, *args):
        answers = [fn(t, *args) for t in tables]
        assert answers[0] == answers[1]
        return answers[0]

    def pin(t, i, on=True):
        return t.pin(src(i), 1024 + i, V4_B, 80, on)

    def send(t, i, flags, now, d, seq=None, ack=0):
        if d == C.OUT:
            f = bytearray(py.build_tcp(src(i), V4_B, 1024 + i, 80, i if seq is None else seq, ack, flags, 100, opts,
                                       eth_src=MAC_A, eth_dst=MAC_B)) + bytearray(16)
            return t.classify_frame(f, len(f) - 16, None, now, False, d), bytes(f)
        f = bytearray(py.build_tcp(V4_B, src(i), 80, 1024 + i, 7 * i, (i + 1) & C.MASK32, flags, 100, opts,
                                   eth_src=MAC_B, eth_dst=MAC_A))
        return t.classify(f, now, direction=d), bytes(f)

    n = 4000
    for i in range(n):
        both(send, i, C.SYN, i / 1000, C.OUT)
        if i % 3 == 0:
            both(send, i, C.SYN | C.ACK, i / 1000, C.IN)
        if i % 7 == 0:
            both(pin, i)
        if i % 33 == 0:
            both(send, i, C.RST, i / 1000, C.OUT, i + 1)
    keep = {i for i in range(n) if i % 97 == 0 or i > n - 10}
    for i in range(n):
        if i not in keep:
            both(lambda t, i: t.forget(src(i), 1024 + i, V4_B, 80), i)
    before = tables[0]._memory()
    both(lambda t: (t.expire(5.0), t.events(10_000)))
    after = tables[0]._memory()
    assert after["connections"] < before["connections"] and after["slots"] < before["slots"]
    both(_everything)
    both(lambda t: [pin(t, i, False) for i in sorted(keep)])
    for i in sorted(keep)[::3]:
        both(send, i, C.ACK, 60.0, C.OUT, i + 1)
    for step in range(12):
        both(lambda t, now: (t.expire(now, budget=7), t.events()), 58.0 + step * 10)
        both(_everything)
    for i in range(n, n + 50):
        both(send, i, C.SYN, 200.0, C.OUT)
    both(lambda t: (t.expire(400.0), t.events(10_000)))
    both(_everything)
    assert tables[1].stats()["connections"] == 0


@pytest.mark.parametrize("kind", ["c", "py"])
def test_forwarders_classify_with_their_direction(kind):
    """The bridge's forwarders (over AF_UNIX datagram pairs here, no namespaces): with OUT, a client SYN
    leaves tagged and longer, its connection recorded; with IN, a Migrate SYN goes to the punt handler;
    with no direction, a frame leaves as today."""
    import socket
    import threading
    import time

    from appliance import bridge
    if kind == "c":
        engine = load_cengine()
        if bridge._bridge is None:
            pytest.skip("the compiled bridge is not built")
        cls = bridge._bridge.Forwarder
    else:
        engine, cls = load_pyengine(), bridge.PyForwarder
    mig = engine.build_migrate_syn(V4_C, V4_A, 80, 40000, 1, 1, 2, 3, eth_src=MAC_B, eth_dst=MAC_A)
    tagged = bytearray(syn())
    engine.insert_option(tagged, C.opt_migrate_permitted())
    for direction, sent, want, want_punted in ((C.OUT, syn(), tagged, []), (None, syn(), syn(), []),
                                               (C.IN, mig, None, [mig])):
        t = engine.FlowTable(conntrack=True)
        rx_peer, rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tx, tx_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))
        tx_peer.settimeout(0.2 if want is None else 5.0)
        punted = []
        fwd = cls(rx.fileno(), tx.fileno(), t, lambda f, h: punted.append(bytes(f)), False, 8, 0.0,
                  direction=direction)
        th = threading.Thread(target=fwd.run, daemon=True)
        th.start()
        got = None
        try:
            rx_peer.send(bytes(sent))
            try:
                got = tx_peer.recv(70000)
            except socket.timeout:
                pass
            deadline = time.monotonic() + 5.0
            while fwd.stats()["to_python"] + fwd.stats()["tx_frames"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            fwd.stop()
            th.join(5.0)
            for sock in (rx_peer, rx, tx, tx_peer):
                sock.close()
        assert not th.is_alive()
        st = fwd.stats()
        assert got == (None if want is None else bytes(want)) and punted == want_punted, direction
        assert st["tx_bytes"] == (0 if want is None else len(want)) and st["rx_bytes"] == len(sent)
        assert (t.connection(*key()) is not None) == (direction == C.OUT)
        if direction == C.OUT:
            assert t.connection(*key()).tagged


def test_expire_grows_ahead_of_need():
    """Past 3/8 full, expire() doubles the flow slots (allocated outside the lock) before the per-frame
    path would have to (at 1/2); everything stays findable."""
    ce = load_cengine()
    t = ce.FlowTable(capacity=64, conntrack=True, max_half_open=1000)  # 128 slots
    for i in range(26):  # 52 flows: 52 * 8 > 128 * 3
        out(t, syn(sport=1000 + i, seq=i), 0.0)
    assert t._memory()["slots"] == 128 * 184
    t.expire(0.5)
    assert t._memory()["slots"] == 256 * 184
    assert all(t.connection(*key(sport=1000 + i)).client_syn.isn == i for i in range(26))
    assert len(t) == 52


def test_out_migrate_syn_is_not_a_client_syn(engine):
    t = table(engine)
    mig = bytearray(engine.build_migrate_syn(V4_A, V4_B, 40000, 80, 9, 1, 2, 3, eth_src=MAC_A, eth_dst=MAC_B))
    before = bytes(mig)
    assert out(t, mig)[1] == before and t.connection(*key()) is None and t.stats()["syns"] == 0


def test_bridge_gives_directions_only_to_a_conntrack_table(engine, monkeypatch):
    """Bridge passes fp.OUT / fp.IN to its forwarders when the table tracks connections, None otherwise."""
    import socket

    from appliance import bridge
    pairs = []

    def fake_port(ifname, vnet=True):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        pairs.append(b)
        return a

    monkeypatch.setattr(bridge, "open_port", fake_port)
    monkeypatch.setattr(bridge, "forwarder_class", lambda: bridge.PyForwarder)
    for conntrack, want in ((True, {bridge.OUT: C.OUT, bridge.IN: C.IN}), (False, {bridge.OUT: None, bridge.IN: None})):
        b = bridge.Bridge("c0", "n0", engine.FlowTable(conntrack=conntrack), vnet=False)
        try:
            assert b.conntrack is conntrack
            assert {d: f.direction for d, f in b.forwarders.items()} == want
        finally:
            b.close()
            for f in b.forwarders.values():
                f.rx.close()
                f.tx.close()
    for s in pairs:
        s.close()


@pytest.mark.parametrize("kind", ["c", "py"])
def test_forwarders_say_when_they_have_handled_every_frame_up_to_a_time(kind):
    """caught_up(t): False while a frame that arrived before t is unread or still in punt; True
    once it has been handed over, and while the forwarder waits on an empty queue."""
    import socket
    import threading
    import time

    from appliance import bridge
    if kind == "c":
        engine = load_cengine()
        if bridge._bridge is None:
            pytest.skip("the compiled bridge is not built")
        cls = bridge._bridge.Forwarder
    else:
        engine, cls = load_pyengine(), bridge.PyForwarder
    mig = engine.build_migrate_syn(V4_C, V4_A, 80, 40000, 1, 1, 2, 3, eth_src=MAC_B, eth_dst=MAC_A)
    t = engine.FlowTable(conntrack=True)
    rx_peer, rx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx, tx_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 50_000))
    entered, release = threading.Event(), threading.Event()

    def punt(frame, hdr):
        entered.set()
        release.wait(5.0)

    fwd = cls(rx.fileno(), tx.fileno(), t, punt, False, 8, 0.0, direction=C.IN)
    th = threading.Thread(target=fwd.run, daemon=True)
    th.start()

    def soon(cond, limit=2.0):
        end = time.monotonic() + limit
        while not cond() and time.monotonic() < end:
            time.sleep(0.002)
        return cond()

    try:
        assert soon(lambda: fwd.caught_up(time.monotonic()))  # nothing came: caught up
        sent = time.monotonic()
        rx_peer.send(bytes(mig))
        assert entered.wait(5.0)
        assert not fwd.caught_up(sent + 1e-6)  # the frame is in punt, not handled yet
        time.sleep(0.05)
        assert not fwd.caught_up(sent + 1e-6)
        release.set()
        assert soon(lambda: fwd.caught_up(sent + 1e-6))
        assert soon(lambda: fwd.caught_up(time.monotonic()))
    finally:
        release.set()
        fwd.stop()
        th.join(5.0)
        for sock in (rx_peer, rx, tx, tx_peer):
            sock.close()
    assert not th.is_alive()
