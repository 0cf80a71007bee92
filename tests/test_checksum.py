"""Checksums: RFC 1071 sums, IPv4 header, TCP/UDP over IPv4/IPv6, RFC 1624 incremental updates."""

import random
import struct

import pytest

from helpers import (
    ETH, LINUX_SYN_OPTS, RAW, V4_A, V4_B, V6_A, V6_B, ICMP, IP, IPv6, Raw, TCP, UDP, IPv6ExtHdrDestOpt,
    IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, V6_C, V6_D, dissect, ether, raw, ref_checksum, scapy_checksums_ok,
    scapy_rebuild, strip_eth, tcp4, tcp6,
)
from scapy.layers.inet import IPOption

# (id, frame builder, link); every frame has scapy-correct checksums.
FRAMES = [
    ("tcp4-syn", lambda: ether(tcp4(LINUX_SYN_OPTS, flags="S")), ETH),
    ("tcp4-odd-payload", lambda: ether(tcp4(payload=b"odd")), ETH),
    ("tcp4-vlan-even-payload", lambda: ether(tcp4(payload=bytes(range(256)) * 4), vlan=12), ETH),
    ("tcp4-ip-options", lambda: ether(IP(src=V4_A, dst=V4_B, options=IPOption(b"\x01\x01\x01\x00"))
                                      / TCP(flags="PA") / Raw(b"x" * 9)), ETH),
    ("tcp4-all-ff", lambda: ether(IP(src="255.255.255.255", dst="255.255.255.255", id=0xFFFF, ttl=255)
                                  / TCP(sport=65535, dport=65535, seq=0xFFFFFFFF, ack=0xFFFFFFFF, window=65535)
                                  / Raw(b"\xff" * 7)), ETH),
    ("tcp4-zeros", lambda: ether(IP(src="0.0.0.0", dst="0.0.0.0", id=0) / TCP(sport=0, dport=0, flags=0,
                                                                               window=0) / Raw(bytes(5))), ETH),
    ("tcp4-trailer", lambda: raw(ether(tcp4(payload=b"ab"))) + b"\x99" * 4, ETH),
    ("tcp6", lambda: ether(tcp6(LINUX_SYN_OPTS, payload=b"hello", flags="S")), ETH),
    ("tcp6-odd-payload", lambda: ether(tcp6(payload=b"abcde" * 51)), ETH),
    ("tcp6-ext-headers", lambda: ether(tcp6(payload=b"z", ext=[IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()])),
     ETH),
    ("udp4", lambda: ether(IP(src=V4_A, dst=V4_B) / UDP(sport=53, dport=5353) / Raw(b"answer!")), ETH),
    ("udp6", lambda: ether(IPv6(src=V6_A, dst=V6_B) / UDP(sport=53, dport=5353) / Raw(b"answer")), ETH),
    ("raw-tcp4", lambda: tcp4(payload=b"raw"), RAW),
    ("raw-tcp6", lambda: tcp6(payload=b"raw6"), RAW),
]
IDS = [f[0] for f in FRAMES]
PARAMS = [f[1:] for f in FRAMES]


def _corrupt_checksums(frame, link):
    """A copy of frame with every checksum field overwritten by 0x1234."""
    out = bytearray(frame)
    pkt = dissect(frame, link)
    l3 = len(frame) - len(raw(pkt[IP] if IP in pkt else pkt[IPv6]))
    if IP in pkt:
        struct.pack_into("!H", out, l3 + 10, 0x1234)
        l4 = l3 + pkt[IP].ihl * 4
    else:
        l4 = len(frame) - len(raw(pkt[TCP] if TCP in pkt else pkt[UDP]))
    struct.pack_into("!H", out, l4 + (16 if TCP in pkt else 6), 0x1234)
    return out


def test_internet_checksum_rfc1071_example(engine):
    """The worked example of RFC 1071 section 3: sum 0xddf2, checksum 0x220d."""
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert engine.internet_checksum(data) == 0x220D
    assert engine.internet_checksum(b"") == 0xFFFF
    assert engine.internet_checksum(b"\xff\xff") == 0x0000


def test_internet_checksum_random(engine):
    """internet_checksum equals an independent bytewise sum on random data of every small length."""
    rng = random.Random(1071)
    for n in list(range(0, 70)) + [1499, 1500, 9001]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert engine.internet_checksum(data) == ref_checksum(data), n
        init = rng.randrange(0x10000)
        want = ref_checksum(data + struct.pack("!H", init)) if n % 2 == 0 else None
        if want is not None:
            assert engine.internet_checksum(data, init) == want


@pytest.mark.parametrize("build,link", PARAMS, ids=IDS)
def test_checksums_match_scapy(engine, build, link):
    """ipv4_header_checksum and tcp_checksum equal scapy's, and verify_checksums accepts the frame."""
    frame = raw(build())
    pkt = dissect(frame, link)
    if IP in pkt:
        assert engine.ipv4_header_checksum(frame, link) == pkt[IP].chksum
    else:
        with pytest.raises(ValueError):
            engine.ipv4_header_checksum(frame, link)
    l4 = pkt[TCP] if TCP in pkt else pkt[UDP]
    assert engine.tcp_checksum(frame, link) == l4.chksum
    assert engine.verify_checksums(frame, link) == (True, True)


@pytest.mark.parametrize("build,link", PARAMS, ids=IDS)
def test_fix_checksums_matches_scapy_rebuild(engine, build, link):
    """fix_checksums on a frame with wrong checksums gives scapy's bytes exactly."""
    frame = raw(build())
    bad = _corrupt_checksums(frame, link)
    is_v4 = IP in dissect(frame, link)
    assert engine.verify_checksums(bad, link) == (not is_v4, False)
    engine.fix_checksums(bad, link)
    assert bytes(bad) == scapy_rebuild(frame, link) == frame
    assert engine.verify_checksums(bad, link) == (True, True)


@pytest.mark.parametrize("build,link", PARAMS, ids=IDS)
def test_verify_detects_any_bit_flip(engine, build, link):
    """Flipping one checksummed bit (IPv4 header, IPv6 addresses, L4) is caught (sampled bits)."""
    frame = raw(build())
    v = engine.parse(frame, link)
    rng = random.Random(len(frame))
    first = v.l3_off if v.ip_version == 4 else v.l3_off + 8  # IPv6: only the pseudo-header part is covered
    for _ in range(40):
        pos = rng.randrange(first, v.ip_end)
        if v.ip_version == 6 and v.l3_off + 40 <= pos < v.l4_off:
            continue  # extension headers are in no checksum
        bad = bytearray(frame)
        bad[pos] ^= 1 << rng.randrange(8)
        bv = engine.parse(bad, link)
        if not bv.ok or bv.ip_end != v.ip_end or bv.l4_off != v.l4_off or bv.ip_proto != v.ip_proto:
            continue  # the flip changed the frame's structure
        assert engine.verify_checksums(bad, link) != (True, True)
        if bv.ip_version == 4 and pos < v.l4_off:
            assert engine.verify_checksums(bad, link)[0] is False


def test_udp_zero_checksum(engine):
    """An IPv4 UDP checksum of 0 means 'none' (verifies); over IPv6 it does not; computed 0 is sent as 0xFFFF."""
    frame4 = bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / UDP(sport=1, dport=2, chksum=0) / Raw(b"abc"))))
    assert engine.verify_checksums(frame4) == (True, True)
    frame6 = bytearray(raw(ether(IPv6(src=V6_A, dst=V6_B) / UDP(sport=1, dport=2, chksum=0) / Raw(b"abc"))))
    assert engine.verify_checksums(frame6) == (True, False)
    # choose payload bytes so that the true UDP sum is 0xFFFF, i.e. the computed checksum is 0
    frame = bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / UDP(sport=1, dport=2) / Raw(b"\0\0"))))
    v = engine.parse(frame)
    struct.pack_into("!H", frame, v.l4_off + 6, 0)
    partial = ref_checksum(bytes(frame[v.l3_off + 12:v.l3_off + 20]) + struct.pack("!BBH", 0, 17, 10)
                           + bytes(frame[v.l4_off:v.ip_end]))
    struct.pack_into("!H", frame, v.payload_off, partial)
    assert engine.tcp_checksum(frame) == 0xFFFF
    engine.fix_checksums(frame)
    assert struct.unpack_from("!H", frame, v.l4_off + 6)[0] == 0xFFFF
    assert scapy_checksums_ok(frame)
    assert engine.verify_checksums(frame) == (True, True)


def test_checksum_calls_reject_non_l4(engine):
    """tcp_checksum wants an unfragmented TCP/UDP packet; verify/fix only handle the IP part of others."""
    icmp = bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / ICMP())))
    with pytest.raises(ValueError):
        engine.tcp_checksum(icmp)
    assert engine.verify_checksums(icmp) == (True, True)
    frag = bytearray(raw(ether(tcp4(payload=b"abcdefgh", ip_kw=dict(flags="MF")))))
    with pytest.raises(ValueError):
        engine.tcp_checksum(frag)
    struct.pack_into("!H", frag, 24, 0)
    engine.fix_checksums(frag)
    assert engine.verify_checksums(frag)[0] is True
    with pytest.raises(ValueError):
        engine.ipv4_header_checksum(raw(ether(tcp6())))


def _routing(kind):
    from scapy.layers.inet6 import IPv6ExtHdrSegmentRouting
    return {
        "type0-one": lambda: IPv6ExtHdrRouting(addresses=[V6_C], segleft=1),
        "type0-three": lambda: IPv6ExtHdrRouting(addresses=[V6_C, V6_D, "2001:db8::99"], segleft=2),
        "type0-segleft-0": lambda: IPv6ExtHdrRouting(addresses=[V6_C], segleft=0),
        "type2": lambda: IPv6ExtHdrRouting(type=2, addresses=[V6_C], segleft=1),
        "srh": lambda: IPv6ExtHdrSegmentRouting(addresses=[V6_D, V6_C], segleft=1),
        "srh-segleft-0": lambda: IPv6ExtHdrSegmentRouting(addresses=[V6_D, V6_C], segleft=0),
    }[kind]()


ROUTING = ["type0-one", "type0-three", "type0-segleft-0", "type2", "srh", "srh-segleft-0"]


@pytest.mark.parametrize("routing", ROUTING)
def test_ipv6_routing_header_pseudo_header_uses_final_destination(engine, routing):
    """RFC 8200 8.1: with a Routing header in transit the pseudo-header carries the final destination (as scapy)."""
    frame = raw(ether(tcp6(payload=b"sr", ext=[IPv6ExtHdrHopByHop(), _routing(routing)])))
    assert engine.tcp_checksum(frame) == dissect(frame)[TCP].chksum
    assert engine.verify_checksums(frame) == (True, True)
    bad = bytearray(frame)
    v = engine.parse(bad)
    bad[v.l4_off + 16:v.l4_off + 18] = b"\x00\x00"
    engine.fix_checksums(bad)
    assert bytes(bad) == frame == scapy_rebuild(frame)


@pytest.mark.parametrize("routing", ROUTING)
def test_ipv6_routing_header_rewrite_keeps_checksum(engine, routing):
    """Rewriting addresses and ports of a routed IPv6 segment keeps scapy-correct checksums."""
    frame = bytearray(raw(ether(tcp6(payload=b"sr", ext=[_routing(routing)]))))
    engine.rewrite_addresses(frame, src=V6_D, dst="2001:db8:ffff::1", sport=7, dport=8)
    assert scapy_checksums_ok(frame)
    assert engine.verify_checksums(frame) == (True, True)


def test_raw_link_matches_ethernet(engine):
    """The same packet gives the same checksums with LINK_RAW as inside an Ethernet frame."""
    frame = raw(ether(tcp4(LINUX_SYN_OPTS, payload=b"q")))
    ip = strip_eth(frame)
    assert engine.tcp_checksum(ip, RAW) == engine.tcp_checksum(frame, ETH)
    assert engine.ipv4_header_checksum(ip, RAW) == engine.ipv4_header_checksum(frame, ETH)


# --- RFC 1624 incremental updates -------------------------------------------------------

EDGE_WORDS = (0x0000, 0xFFFF, 0x0001, 0xFFFE, 0x8000, 0x7FFF)


def _equal_checksum(incremental, full, new_data):
    """Exact equality, except that all-zero data has two encodings of zero (RFC 1624 section 3)."""
    if any(new_data):
        return incremental == full
    return incremental in (0x0000, 0xFFFF) and full == 0xFFFF


def test_csum_update16_random(engine):
    """csum_update16 after changing one word equals a full recomputation (random and edge words)."""
    rng = random.Random(1624)
    for trial in range(3000):
        n = rng.choice((2, 4, 6, 20, 40))
        data = bytearray(rng.getrandbits(8) for _ in range(n))
        if trial % 5 == 0:
            data = bytearray(rng.choice((b"\x00", b"\xff"))[0] for _ in range(n))
        i = rng.randrange(n // 2) * 2
        old = (data[i] << 8) | data[i + 1]
        new = rng.choice(EDGE_WORDS) if trial % 3 else rng.randrange(0x10000)
        csum = ref_checksum(data)
        data[i:i + 2] = struct.pack("!H", new)
        got = engine.csum_update16(csum, old, new)
        assert _equal_checksum(got, ref_checksum(data), data), (bytes(data).hex(), old, new)


@pytest.mark.parametrize("csum", EDGE_WORDS)
@pytest.mark.parametrize("old", EDGE_WORDS)
@pytest.mark.parametrize("new", EDGE_WORDS)
def test_csum_update16_edge_words(engine, csum, old, new):
    """The ones' complement sum after the update is congruent to the expected one (mod 0xFFFF)."""
    got = engine.csum_update16(csum, old, new)
    assert 0 <= got <= 0xFFFF
    assert ((~got & 0xFFFF) - ((~csum & 0xFFFF) - old + new)) % 0xFFFF == 0


def test_csum_update16_identity(engine):
    """Replacing a word by itself never changes a checksum produced by a full computation."""
    rng = random.Random(7)
    for _ in range(500):
        data = bytes(rng.getrandbits(8) for _ in range(12))
        c = ref_checksum(data)
        w = rng.randrange(0x10000)
        assert engine.csum_update16(c, w, w) == c


def test_csum_update32_random(engine):
    """csum_update32 for a 32-bit field (e.g. seq) equals a full recomputation."""
    rng = random.Random(32)
    edges = (0, 0xFFFFFFFF, 0x0000FFFF, 0xFFFF0000, 0x80000000, 1)
    for trial in range(3000):
        data = bytearray(rng.getrandbits(8) for _ in range(24))
        if trial % 7 == 0:
            data = bytearray(24)
        i = rng.randrange(6) * 4
        old = struct.unpack_from("!I", data, i)[0]
        new = rng.choice(edges) if trial % 2 else rng.getrandbits(32)
        csum = ref_checksum(data)
        struct.pack_into("!I", data, i, new)
        assert _equal_checksum(engine.csum_update32(csum, old, new), ref_checksum(data), data)


def test_csum_update_bytes_random(engine):
    """csum_update_bytes for a 4- or 16-byte address equals a full recomputation."""
    rng = random.Random(6)
    for trial in range(2000):
        alen = rng.choice((4, 16))
        data = bytearray(rng.getrandbits(8) for _ in range(40))
        i = rng.randrange(0, 40 - alen + 1, 2)
        old = bytes(data[i:i + alen])
        new = bytes(rng.getrandbits(8) for _ in range(alen))
        if trial % 4 == 0:
            new = rng.choice((b"\x00", b"\xff")) * alen
        csum = ref_checksum(data)
        data[i:i + alen] = new
        assert _equal_checksum(engine.csum_update_bytes(csum, old, new), ref_checksum(data), data)
        assert engine.csum_update_bytes(csum, bytearray(old), memoryview(new)) == \
            engine.csum_update_bytes(csum, old, new)


def test_csum_update_bytes_rejects_bad_lengths(engine):
    """old and new must have one even length."""
    for old, new in ((b"ab", b"abc"), (b"abc", b"abc"), (b"a", b"b")):
        with pytest.raises(ValueError):
            engine.csum_update_bytes(0x1234, old, new)
    assert engine.csum_update_bytes(0x1234, b"", b"") == 0x1234
