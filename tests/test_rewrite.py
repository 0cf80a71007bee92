"""In-place rewrites: rewrite_addresses, rewrite_tcp and insert_option, checked with scapy."""

import random
import socket
import struct

import pytest

from _fastpath import _common as C
from helpers import (
    ETH, LINUX_SYN_OPTS, RAW, V4_A, V4_B, V4_C, V4_D, V6_A, V6_B, V6_C, V6_D, ICMP, IP, IPv6, Raw, TCP, UDP,
    dissect, ether, raw, scapy_checksums_ok, scapy_rebuild, tcp4, tcp6,
)

UNKNOWN_OPTS = [(253, b"\xbe\xefdata"), ("NOP", None), (30, b"\x01\x02")]


def assert_checksums_exact(engine, frame, link=ETH):
    """Checksums verify with scapy and equal the engine's own full recomputation."""
    assert scapy_checksums_ok(frame, link), "scapy computes other checksums"
    v = engine.parse(frame, link)
    field = v.l4_off + (16 if v.ip_proto == C.IPPROTO_TCP else 6)
    assert struct.unpack_from("!H", frame, field)[0] == engine.tcp_checksum(frame, link)
    if v.ip_version == 4:
        assert struct.unpack_from("!H", frame, v.l3_off + 10)[0] == engine.ipv4_header_checksum(frame, link)
    assert engine.verify_checksums(frame, link) == (True, True)


def _checksum_fields(v):
    out = [v.l4_off + (16 if v.ip_proto == C.IPPROTO_TCP else 6)]
    if v.ip_version == 4:
        out.append(v.l3_off + 10)
    return out


def _patched(frame, v, src=None, sport=None, dst=None, dport=None):
    """The expected frame: the given fields replaced, checksum fields copied over later."""
    out = bytearray(frame)
    alen = 4 if v.ip_version == 4 else 16
    base = v.l3_off + (12 if v.ip_version == 4 else 8)
    fam = socket.AF_INET if alen == 4 else socket.AF_INET6
    if src is not None:
        out[base:base + alen] = socket.inet_pton(fam, src)
    if dst is not None:
        out[base + alen:base + 2 * alen] = socket.inet_pton(fam, dst)
    if sport is not None:
        struct.pack_into("!H", out, v.l4_off, sport)
    if dport is not None:
        struct.pack_into("!H", out, v.l4_off + 2, dport)
    return out


REWRITE_FRAMES = [
    ("tcp4", lambda: ether(tcp4(UNKNOWN_OPTS + [("Timestamp", (1, 2))], payload=b"payload!")), ETH, 4),
    ("tcp4-vlan", lambda: ether(tcp4(UNKNOWN_OPTS, payload=b"odd"), vlan=33), ETH, 4),
    ("tcp6", lambda: ether(tcp6(UNKNOWN_OPTS, payload=b"six")), ETH, 6),
    ("udp4", lambda: ether(IP(src=V4_A, dst=V4_B) / UDP(sport=53, dport=5353) / Raw(b"udp4")), ETH, 4),
    ("udp6", lambda: ether(IPv6(src=V6_A, dst=V6_B) / UDP(sport=53, dport=5353) / Raw(b"udp6!")), ETH, 6),
    ("raw-tcp4", lambda: tcp4(UNKNOWN_OPTS, payload=b"r"), RAW, 4),
    ("raw-udp6", lambda: IPv6(src=V6_A, dst=V6_B) / UDP(sport=1, dport=2) / Raw(b"r6"), RAW, 6),
]


@pytest.mark.parametrize("build,link,family", [f[1:] for f in REWRITE_FRAMES], ids=[f[0] for f in REWRITE_FRAMES])
def test_rewrite_addresses(engine, build, link, family):
    """Addresses and ports change, checksums stay exact, every other byte (options too) is kept."""
    frame = bytearray(raw(build()))
    v = engine.parse(frame, link)
    new_src, new_dst = (V4_C, V4_D) if family == 4 else (V6_C, V6_D)
    want = _patched(frame, v, new_src, 1234, new_dst, 65535)
    engine.rewrite_addresses(frame, new_src, 1234, new_dst, 65535, link=link)
    for f in _checksum_fields(v):
        want[f:f + 2] = frame[f:f + 2]
    assert frame == want
    pkt = dissect(frame, link)
    ip = pkt[IP] if family == 4 else pkt[IPv6]
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    assert (ip.src, ip.dst, l4.sport, l4.dport) == (new_src, new_dst, 1234, 65535)
    assert_checksums_exact(engine, frame, link)


@pytest.mark.parametrize("build,link,family", [f[1:] for f in REWRITE_FRAMES], ids=[f[0] for f in REWRITE_FRAMES])
def test_rewrite_addresses_partial(engine, build, link, family):
    """Each field alone can be rewritten (None leaves a field alone); packed and text addresses both work."""
    new_src, new_dst = (V4_C, V4_D) if family == 4 else (V6_C, V6_D)
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    for kw in (dict(src=new_src), dict(dst=socket.inet_pton(fam, new_dst)), dict(sport=0), dict(dport=7),
               dict(src=None, sport=None, dst=None, dport=None)):
        frame = bytearray(raw(build()))
        v = engine.parse(frame, link)
        text = {k: (socket.inet_ntop(fam, a) if isinstance(a, bytes) else a) for k, a in kw.items()}
        want = _patched(frame, v, **text)
        engine.rewrite_addresses(frame, link=link, **kw)
        for f in _checksum_fields(v):
            want[f:f + 2] = frame[f:f + 2]
        assert frame == want, kw
        assert_checksums_exact(engine, frame, link)


def test_rewrite_addresses_random(engine):
    """Many random rewrites (edge values included) keep checksums equal to a full recomputation."""
    rng = random.Random(1624)
    edge4 = ("0.0.0.0", "255.255.255.255", "0.0.255.255", "255.255.0.0")
    edge6 = ("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff", "ffff::")
    ports = (0, 1, 0xFFFF, 0xFF00, 0x00FF, 0x8000)
    for i in range(300):
        name, build, link, family = REWRITE_FRAMES[i % len(REWRITE_FRAMES)]
        frame = bytearray(raw(build()))
        if rng.random() < 0.3:
            engine.rewrite_addresses(frame, rng.choice(edge4 if family == 4 else edge6), link=link)
        fam_bits = 32 if family == 4 else 128

        def addr():
            if rng.random() < 0.4:
                return rng.choice(edge4 if family == 4 else edge6)
            return rng.getrandbits(fam_bits).to_bytes(fam_bits // 8, "big")

        kw = dict(src=addr() if rng.random() < 0.7 else None, dst=addr() if rng.random() < 0.7 else None,
                  sport=rng.choice(ports + (rng.randrange(65536),)) if rng.random() < 0.7 else None,
                  dport=rng.choice(ports + (rng.randrange(65536),)) if rng.random() < 0.7 else None)
        engine.rewrite_addresses(frame, link=link, **kw)
        v = engine.parse(frame, link)
        field = _checksum_fields(v)[0]
        assert struct.unpack_from("!H", frame, field)[0] == engine.tcp_checksum(frame, link), (name, kw)
        assert engine.verify_checksums(frame, link) == (True, True)
        if i % 10 == 0:
            assert bytes(frame) == scapy_rebuild(frame, link)


def test_rewrite_udp4_zero_checksum_stays_zero(engine):
    """An IPv4 UDP datagram without a checksum (0) keeps it 0; the IP header checksum is updated."""
    frame = bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / UDP(sport=1, dport=2, chksum=0) / Raw(b"nock"))))
    engine.rewrite_addresses(frame, V4_C, 99, V4_D, 100)
    pkt = dissect(frame)
    assert pkt[UDP].chksum == 0 and (pkt[IP].src, pkt[UDP].dport) == (V4_C, 100)
    assert engine.verify_checksums(frame) == (True, True)
    assert pkt[IP].chksum == engine.ipv4_header_checksum(frame)


@pytest.mark.parametrize("family", [4, 6])
def test_rewrite_udp_checksum_never_becomes_zero(engine, family):
    """A port chosen so the updated UDP checksum would be 0x0000 gives 0xFFFF instead (0 means 'none')."""
    l3 = IP(src=V4_A, dst=V4_B) if family == 4 else IPv6(src=V6_A, dst=V6_B)
    frame = bytearray(raw(ether(l3 / UDP(sport=1000, dport=53) / Raw(b"zero"))))
    v = engine.parse(frame)
    c = struct.unpack_from("!H", frame, v.l4_off + 6)[0]
    new_sport = (1000 + c) % 0xFFFF  # ones' complement: the sum then reaches 0xFFFF
    engine.rewrite_addresses(frame, sport=new_sport)
    assert struct.unpack_from("!H", frame, v.l4_off + 6)[0] == 0xFFFF
    assert engine.tcp_checksum(frame) == 0xFFFF
    assert_checksums_exact(engine, frame)


def test_rewrite_addresses_errors(engine):
    """Wrong family, non-TCP/UDP, fragments and read-only frames are refused."""
    frame = bytearray(raw(ether(tcp4())))
    before = bytes(frame)
    with pytest.raises(ValueError):
        engine.rewrite_addresses(frame, src=V6_A)
    with pytest.raises(ValueError):
        engine.rewrite_addresses(bytearray(raw(ether(tcp6()))), dst=V4_A)
    with pytest.raises(ValueError):
        engine.rewrite_addresses(bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / ICMP()))), src=V4_C)
    with pytest.raises(ValueError):
        engine.rewrite_addresses(bytearray(raw(ether(tcp4(payload=b"12345678", ip_kw=dict(flags="MF"))))),
                                 src=V4_C)
    with pytest.raises((TypeError, BufferError)):
        engine.rewrite_addresses(before, src=V4_C)
    assert frame == before


# --- rewrite_tcp ------------------------------------------------------------------------

TS_FRAMES = [
    ("tcp4-ts", lambda: ether(tcp4([("NOP", None), ("NOP", None), ("Timestamp", (100, 200))] + UNKNOWN_OPTS,
                                   payload=b"data")), ETH),
    ("tcp6-ts-vlan", lambda: ether(tcp6([("Timestamp", (5, 6)), ("NOP", None), ("NOP", None)] + UNKNOWN_OPTS,
                                        payload=b"x"), vlan=9), ETH),
    ("raw-tcp4-ts", lambda: tcp4([("Timestamp", (0xFFFFFFFF, 0))]), RAW),
    ("tcp4-ts-odd-offset", lambda: ether(tcp4([("MSS", 1460), ("NOP", None), ("Timestamp", (7, 8)),
                                               ("NOP", None)] + UNKNOWN_OPTS, payload=b"odd")), ETH),
    ("tcp6-ts-odd-offset", lambda: ether(tcp6([("WScale", 2), ("Timestamp", (7, 8)), ("NOP", None)],
                                              payload=b"o")), ETH),
]


@pytest.mark.parametrize("build,link", [f[1:] for f in TS_FRAMES], ids=[f[0] for f in TS_FRAMES])
def test_rewrite_tcp(engine, build, link):
    """seq, ack, window, tsval and tsecr are rewritten; all else, unknown options included, is kept."""
    frame = bytearray(raw(build()))
    v = engine.parse(frame, link)
    want = bytearray(frame)
    struct.pack_into("!II", want, v.l4_off + 4, 0xFFFFFFFF, 0x80000001)
    struct.pack_into("!H", want, v.l4_off + 14, 0)
    struct.pack_into("!II", want, v.ts_off + 2, 0xDEADBEEF, 1)
    engine.rewrite_tcp(frame, seq=0xFFFFFFFF, ack=0x80000001, window=0, tsval=0xDEADBEEF, tsecr=1, link=link)
    want[v.l4_off + 16:v.l4_off + 18] = frame[v.l4_off + 16:v.l4_off + 18]
    assert frame == want
    t = dissect(frame, link)[TCP]
    assert (t.seq, t.ack, t.window) == (0xFFFFFFFF, 0x80000001, 0)
    assert dict(t.options)["Timestamp"] == (0xDEADBEEF, 1)
    assert_checksums_exact(engine, frame, link)


def test_rewrite_tcp_random(engine):
    """Random single-field rewrites keep the TCP checksum equal to a full recomputation."""
    rng = random.Random(793)
    edges = (0, 0xFFFFFFFF, 0xFFFF0000, 0x0000FFFF, 0x80000000, 0x7FFFFFFF)
    for i in range(400):
        name, build, link = TS_FRAMES[i % len(TS_FRAMES)]
        frame = bytearray(raw(build()))
        field = rng.choice(("seq", "ack", "window", "tsval", "tsecr"))
        value = rng.choice(edges) if rng.random() < 0.5 else rng.getrandbits(32)
        if field == "window":
            value &= 0xFFFF
        engine.rewrite_tcp(frame, link=link, **{field: value})
        v = engine.parse(frame, link)
        assert getattr(v, field) == value
        assert v.checksum == engine.tcp_checksum(frame, link), (name, field, value)
        if i % 20 == 0:
            assert bytes(frame) == scapy_rebuild(frame, link)


@pytest.mark.parametrize("field", ["tsval", "tsecr"])
def test_rewrite_tcp_timestamps_at_odd_offset(engine, field):
    """A TS option need not be aligned (MSS,NOP,TS puts tsval at an odd offset); checksums must stay exact."""
    frame = bytearray(raw(ether(tcp4([("MSS", 1460), ("NOP", None), ("Timestamp", (100, 200)), ("NOP", None)],
                                     payload=b"data"))))
    v = engine.parse(frame)
    assert (v.ts_off - v.l4_off) % 2 == 1
    engine.rewrite_tcp(frame, **{field: 0x12345678})
    assert getattr(engine.parse(frame), field) == 0x12345678
    assert_checksums_exact(engine, frame)


def test_rewrite_tcp_errors(engine):
    """Timestamps need a TS option; UDP is refused; nothing given changes nothing."""
    frame = bytearray(raw(ether(tcp4(payload=b"a"))))
    before = bytes(frame)
    with pytest.raises(ValueError):
        engine.rewrite_tcp(frame, tsval=1)
    with pytest.raises(ValueError):
        engine.rewrite_tcp(frame, tsecr=1)
    assert frame == before
    engine.rewrite_tcp(frame)
    assert frame == before
    with pytest.raises(ValueError):
        engine.rewrite_tcp(bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / UDP()))), seq=1)
    with pytest.raises((TypeError, BufferError)):
        engine.rewrite_tcp(before, seq=1)


# --- insert_option ----------------------------------------------------------------------


def _scapy_opts(frame, link=ETH):
    return dissect(frame, link)[TCP].options


@pytest.mark.parametrize("family", [4, 6])
def test_insert_migrate_permitted_into_linux_syn(engine, family):
    """Into a Linux SYN (20 bytes of options) Migrate-Permitted goes after 3 NOPs: 28 bytes, all correct."""
    build = tcp4 if family == 4 else tcp6
    orig = raw(ether(build(LINUX_SYN_OPTS, flags="S", window=64240)))
    frame = bytearray(orig)
    assert engine.insert_option(frame, C.opt_migrate_permitted()) is True
    assert len(frame) == len(orig) + 8
    pkt = dissect(frame)
    t = pkt[TCP]
    assert t.dataofs * 4 == 20 + 28
    assert t.options == LINUX_SYN_OPTS + [("NOP", None)] * 3 + [(253, b"MP\x00")]
    if family == 4:
        assert pkt[IP].len == len(orig) - 14 + 8
    else:
        assert pkt[IPv6].plen == len(orig) - 54 + 8
    assert_checksums_exact(engine, frame)
    v = engine.parse(frame)
    assert v.ok and v.opts & C.HAS_MIGRATE_PERMITTED and v.mp_curve == 0
    assert (v.mss, v.wscale, v.tsval) == (1460, 7, 123456)


def test_insert_option_keeps_payload_and_vlan(engine):
    """Header fields and payload survive an insertion into a VLAN-tagged segment with data."""
    orig = raw(ether(tcp4([("MSS", 1400)], payload=b"the payload", flags="PA", seq=77, ack=88), vlan=5))
    frame = bytearray(orig)
    assert engine.insert_option(frame, C.opt_timestamps(11, 22)) is True
    t = dissect(frame)[TCP]
    assert (t.seq, t.ack, int(t.flags), bytes(t.payload)) == (77, 88, C.PSH | C.ACK, b"the payload")
    assert t.options == [("MSS", 1400), ("NOP", None), ("NOP", None), ("Timestamp", (11, 22))]
    assert_checksums_exact(engine, frame)


@pytest.mark.parametrize("option", [C.opt_sack_permitted(), C.opt_mss(1200), C.opt_wscale(5),
                                    C.opt_migrate_permitted(), C.opt_migrate(True, 3, 1, 2),
                                    C.opt_migrate_permitted(2, bytes(17))],
                         ids=["sack-perm", "mss", "wscale", "mp", "migrate", "mp-secure"])
def test_insert_option_alignment(engine, option):
    """After inserting into a 4-byte option list the header length stays a multiple of 4 with NOP padding."""
    orig = raw(ether(tcp4([("MSS", 1460)], flags="S")))
    frame = bytearray(orig)
    assert engine.insert_option(frame, option) is True
    v = engine.parse(frame)
    pad = -(4 + len(option)) % 4
    assert v.ok and v.tcp_hdr_len == 20 + 4 + pad + len(option)
    assert frame[v.l4_off + 20:v.l4_off + v.tcp_hdr_len] == C.opt_mss(1460) + b"\x01" * pad + option
    assert v.payload_len == 0 and len(frame) == len(orig) + pad + len(option)
    assert_checksums_exact(engine, frame)


def test_insert_option_full_header_returns_false(engine):
    """A SYN with 40 bytes of options gets nothing and is left byte-for-byte unchanged."""
    opts = LINUX_SYN_OPTS + [("NOP", None), ("NOP", None), ("SAck", (1, 2, 3, 4))]
    orig = raw(ether(tcp4(opts, flags="S")))
    assert engine.parse(orig).tcp_hdr_len == 60
    frame = bytearray(orig)
    assert engine.insert_option(frame, C.opt_migrate_permitted()) is False
    assert frame == orig
    assert engine.insert_option(frame, C.opt_sack_permitted()) is False
    assert frame == orig


def test_insert_option_just_fits(engine):
    """33 bytes of options plus a 5-byte option pad to exactly 40; 36 plus 5 does not fit."""
    opts33 = [("MSS", 1460), ("Timestamp", (1, 2)), ("SAck", (3, 4)), ("NOP", None)]  # 4+10+10+1 = 25
    opts33 += [(30, b"abcdef")]  # + 8 = 33
    orig = raw(ether(tcp4(opts33, flags="S")))
    frame = bytearray(orig)
    assert engine.insert_option(frame, C.opt_migrate_permitted()) is True
    v = engine.parse(frame)
    assert v.ok and v.tcp_hdr_len == 60 and v.mp_curve == 0 and v.unknown_options == 1
    assert _scapy_opts(frame)[-3:] == [("NOP", None), ("NOP", None), (253, b"MP\x00")]
    assert_checksums_exact(engine, frame)
    opts36 = [("MSS", 1460), ("Timestamp", (1, 2)), ("SAck", (3, 4)), (30, b"abcdefghij")]  # 4+10+10+12
    orig = raw(ether(tcp4(opts36, flags="S")))
    frame = bytearray(orig)
    assert engine.insert_option(frame, C.opt_migrate_permitted()) is False
    assert frame == orig


def test_insert_option_replaces_eol_padding(engine):
    """Padding after an EOL is dropped: MSS,EOL,pad + MP gives MSS,NOP*3,MP; junk after EOL goes too."""
    orig = raw(ether(tcp4([("MSS", 1460), ("EOL", None)], payload=b"pp")))
    assert engine.parse(orig).tcp_hdr_len == 28
    frame = bytearray(orig)
    assert engine.insert_option(frame, C.opt_migrate_permitted()) is True
    v = engine.parse(frame)
    assert frame[v.l4_off + 20:v.payload_off] == C.opt_mss(1460) + b"\x01\x01\x01" + C.opt_migrate_permitted()
    assert v.payload == b"pp" and len(frame) == len(orig) + 4
    assert_checksums_exact(engine, frame)
    # EOL followed by junk bytes
    opts = C.opt_mss(1000) + b"\x00\xaa\xbb\xcc" + b"\xdd" * 4
    junk = raw(ether(IP(src=V4_A, dst=V4_B) / TCP(dataofs=(20 + len(opts)) // 4, flags="S") / Raw(opts)))
    frame = bytearray(junk)
    assert engine.insert_option(frame, C.opt_sack_permitted()) is True
    v = engine.parse(frame)
    assert frame[v.l4_off + 20:v.payload_off] == C.opt_mss(1000) + b"\x01\x01" + C.opt_sack_permitted()
    assert len(frame) == len(junk) - 4 and v.payload_len == 0
    assert_checksums_exact(engine, frame)


def test_insert_option_into_bare_syn_ipv6_raw(engine):
    """A bare IPv6 SYN (no options) on LINK_RAW gets the Migrate option NOP-aligned."""
    orig = raw(tcp6(flags="S"))
    frame = bytearray(orig)
    opt = C.opt_migrate(False, 9, 0x1111, 0x2222)
    assert engine.insert_option(frame, opt, RAW) is True
    v = engine.parse(frame, RAW)
    assert v.ok and v.tcp_hdr_len == 44 and v.migrate_reqno == 9 and v.migrate_token == 0x1111
    assert frame[v.l4_off + 20:v.l4_off + 44] == C.aligned_option(opt)
    assert_checksums_exact(engine, frame, RAW)


def test_insert_option_keeps_ethernet_trailer(engine):
    """With Ethernet padding after the IPv6 packet, the packet grows and the trailer stays at the end."""
    orig = raw(ether(tcp6([("MSS", 1220)], flags="S"))) + b"\xee" * 6
    frame = bytearray(orig)
    assert engine.insert_option(frame, C.opt_sack_permitted()) is True
    assert frame.endswith(b"\xee" * 6) and len(frame) == len(orig) + 4
    v = engine.parse(frame)
    assert v.ok and v.ip_end == len(frame) - 6 and v.opts == C.HAS_MSS | C.HAS_SACK_PERMITTED
    assert_checksums_exact(engine, frame[:-6])


@pytest.mark.parametrize("option", [b"\x01\x02", b"\x00\x02"], ids=["nop-with-length", "eol-with-length"])
def test_insert_option_rejects_single_byte_kinds(engine, option):
    """Kinds 0 (EOL) and 1 (NOP) have no length byte: such an "option" is refused, the frame untouched."""
    orig = raw(ether(tcp4([("MSS", 1460)], flags="S")))
    frame = bytearray(orig)
    with pytest.raises(ValueError):
        engine.insert_option(frame, option)
    assert frame == orig


def test_insert_option_errors(engine):
    """bytes frames, malformed options and non-TCP packets are refused."""
    syn = raw(ether(tcp4(LINUX_SYN_OPTS, flags="S")))
    with pytest.raises(TypeError):
        engine.insert_option(syn, C.opt_sack_permitted())
    for bad in (b"", b"\x04", b"\x04\x03", b"\xfd\x05MP"):
        frame = bytearray(syn)
        with pytest.raises(ValueError):
            engine.insert_option(frame, bad)
        assert frame == syn
    with pytest.raises(ValueError):
        engine.insert_option(bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / UDP()))), C.opt_sack_permitted())
