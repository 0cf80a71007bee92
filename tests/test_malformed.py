"""Malformed input: parse() reports the documented Err kind and never raises; the other calls raise FrameError."""

import struct

import pytest

from _fastpath import _common as C
from helpers import (
    ETH, LINUX_SYN_OPTS, RAW, V4_A, V4_B, V6_A, V6_B, IP, IPv6, Raw, TCP, UDP, IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, ether, raw, tcp4, tcp6,
)

E = C.Err
L3 = 14  # IP header offset in an untagged frame
TCP4 = L3 + 20  # TCP header offset of an IPv4 frame without IP options
TCP6 = L3 + 40


def base4(payload=b"abcd", options=LINUX_SYN_OPTS):
    return bytearray(raw(ether(tcp4(options, payload=payload, flags="S"))))


def base6(payload=b"abcd", options=LINUX_SYN_OPTS, ext=()):
    return bytearray(raw(ether(tcp6(options, payload=payload, flags="S", ext=ext))))


def put(frame, off, fmt, value):
    struct.pack_into(fmt, frame, off, value)
    return frame


def ipv4_len(frame, total, l3=L3):
    """Set the IPv4 total length (the frame is cut to match when shorter)."""
    put(frame, l3 + 2, "!H", total)
    return frame[:l3 + total] if l3 + total < len(frame) else frame


def ipv6_plen(frame, plen, l3=L3):
    put(frame, l3 + 4, "!H", plen)
    return frame[:l3 + 40 + plen] if l3 + 40 + plen < len(frame) else frame


def with_tcp_options(opts: bytes, family=4):
    """A segment whose option bytes are exactly opts (padded to a multiple of 4 with zeros by the caller)."""
    assert len(opts) % 4 == 0
    tcp = TCP(dataofs=(20 + len(opts)) // 4, flags="S") / Raw(opts + b"PAYLOAD")
    l3 = IP(src=V4_A, dst=V4_B) if family == 4 else IPv6(src=V6_A, dst=V6_B)
    return bytearray(raw(ether(l3 / tcp)))


def set_doff(frame, doff, l4=TCP4):
    frame[l4 + 12] = (doff << 4) | (frame[l4 + 12] & 0x0F)
    return frame


def ext_chain(n):
    """An IPv6 TCP segment behind n destination-options headers."""
    return base6(options=[], ext=[IPv6ExtHdrDestOpt() for _ in range(n)])


def vlan_cut(n_bytes, ethertype=0x8100):
    return bytearray(bytes.fromhex("02000000000b02000000000a") + struct.pack("!H", ethertype) + bytes(n_bytes))


# (id, frame builder, link, expected Err)
CASES = [
    ("empty-frame", lambda: bytearray(), ETH, E.TRUNCATED_ETHERNET),
    ("eth-13-bytes", lambda: base4()[:13], ETH, E.TRUNCATED_ETHERNET),
    ("vlan-tag-cut-0", lambda: vlan_cut(0), ETH, E.TRUNCATED_ETHERNET),
    ("vlan-tag-cut-3", lambda: vlan_cut(3), ETH, E.TRUNCATED_ETHERNET),
    ("qinq-outer-tag-cut", lambda: vlan_cut(2, 0x88A8), ETH, E.TRUNCATED_ETHERNET),
    ("qinq-inner-tag-cut", lambda: vlan_cut(4 + 3, 0x88A8)[:-7] + bytes.fromhex("000a8100000b"), ETH,
     E.TRUNCATED_ETHERNET),
    ("vlan-then-short-ip", lambda: vlan_cut(4 + 19)[:-19 - 4] + bytes.fromhex("000a0800") + bytes(19), ETH,
     E.TRUNCATED_IP),
    ("ipv4-19-bytes", lambda: base4()[:L3 + 19], ETH, E.TRUNCATED_IP),
    ("ipv6-39-bytes", lambda: base6()[:L3 + 39], ETH, E.TRUNCATED_IP),
    ("raw-empty", lambda: bytearray(), RAW, E.TRUNCATED_IP),
    ("raw-ipv4-19-bytes", lambda: base4()[L3:L3 + 19], RAW, E.TRUNCATED_IP),
    ("raw-version-5", lambda: put(base4()[L3:], 0, "!B", 0x55), RAW, E.BAD_IP_VERSION),
    ("raw-version-0", lambda: bytearray(b"\x00"), RAW, E.BAD_IP_VERSION),
    ("ethertype-ip-version-6", lambda: put(base4(), L3, "!B", 0x65), ETH, E.BAD_IP_VERSION),
    ("ethertype-ipv6-version-4", lambda: put(base6(), L3, "!B", 0x40), ETH, E.BAD_IP_VERSION),
    *[(f"ihl-{i}", (lambda i=i: put(base4(), L3, "!B", 0x40 | i)), ETH, E.BAD_IHL) for i in range(5)],
    ("ihl-15-past-frame", lambda: put(base4(payload=b"", options=[]), L3, "!B", 0x4F), ETH, E.BAD_IHL),
    ("ihl-past-total-length", lambda: put(put(base4(), L3, "!B", 0x46), L3 + 2, "!H", 22), ETH,
     E.BAD_IP_LENGTH),
    ("total-length-0", lambda: put(base4(), L3 + 2, "!H", 0), ETH, E.BAD_IP_LENGTH),
    ("total-length-19", lambda: put(base4(), L3 + 2, "!H", 19), ETH, E.BAD_IP_LENGTH),
    ("total-length-1-too-long", lambda: put(base4(), L3 + 2, "!H", len(base4()) - L3 + 1), ETH, E.BAD_IP_LENGTH),
    ("total-length-65535", lambda: put(base4(), L3 + 2, "!H", 65535), ETH, E.BAD_IP_LENGTH),
    ("total-length-cuts-tcp", lambda: put(base4(), L3 + 2, "!H", 20 + 19), ETH, E.TRUNCATED_L4),
    ("total-length-cuts-options", lambda: put(base4(), L3 + 2, "!H", 20 + 39), ETH, E.BAD_TCP_OFFSET),
    ("ipv6-plen-0", lambda: put(base6(), L3 + 4, "!H", 0), ETH, E.BAD_IP_LENGTH),
    ("ipv6-plen-1-too-long", lambda: put(base6(), L3 + 4, "!H", len(base6()) - TCP6 + 1), ETH, E.BAD_IP_LENGTH),
    ("ipv6-plen-cuts-tcp", lambda: put(base6(), L3 + 4, "!H", 19), ETH, E.TRUNCATED_L4),
    ("ipv6-plen-cuts-options", lambda: put(base6(), L3 + 4, "!H", 39), ETH, E.BAD_TCP_OFFSET),
    ("ipv6-ext-needs-8-bytes", lambda: put(put(base6(options=[]), L3 + 6, "!B", 0), L3 + 4, "!H", 7), ETH,
     E.BAD_IPV6_EXTENSION),
    ("ipv6-hbh-length-overflow", lambda: put(base6(ext=[IPv6ExtHdrHopByHop()]), TCP6 + 1, "!B", 255), ETH,
     E.BAD_IPV6_EXTENSION),
    ("ipv6-hbh-one-past-end", lambda: put(base6(payload=b"", options=[], ext=[IPv6ExtHdrHopByHop()]),
                                          TCP6 + 1, "!B", 3), ETH, E.BAD_IPV6_EXTENSION),
    ("ipv6-ah-length-overflow", lambda: put(put(base6(ext=[IPv6ExtHdrDestOpt()]), L3 + 6, "!B", 51),
                                            TCP6 + 1, "!B", 200), ETH, E.BAD_IPV6_EXTENSION),
    ("ipv6-nine-ext-headers", lambda: ext_chain(9), ETH, E.BAD_IPV6_EXTENSION),
    ("ipv6-ext-then-short-tcp", lambda: ipv6_plen(base6(payload=b"", options=[], ext=[IPv6ExtHdrDestOpt()]),
                                                  8 + 12), ETH, E.TRUNCATED_L4),
    *[(f"tcp-doff-{d}", (lambda d=d: set_doff(base4(), d)), ETH, E.BAD_TCP_OFFSET) for d in range(5)],
    ("tcp-doff-15-past-segment", lambda: set_doff(base4(payload=b""), 15), ETH, E.BAD_TCP_OFFSET),
    ("tcp6-doff-past-segment", lambda: set_doff(base6(payload=b""), 11, TCP6), ETH, E.BAD_TCP_OFFSET),
    ("udp-7-bytes", lambda: ipv4_len(bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / UDP()))), 27), ETH,
     E.TRUNCATED_L4),
    ("udp6-7-bytes", lambda: ipv6_plen(bytearray(raw(ether(IPv6(src=V6_A, dst=V6_B) / UDP()))), 7), ETH,
     E.TRUNCATED_L4),
    ("opt-length-0", lambda: with_tcp_options(b"\x02\x00\x05\xb4"), ETH, E.BAD_TCP_OPTION),
    ("opt-length-1", lambda: with_tcp_options(b"\x01\x01\x08\x01"), ETH, E.BAD_TCP_OPTION),
    ("opt-unknown-length-0", lambda: with_tcp_options(b"\x1e\x00\x00\x00"), ETH, E.BAD_TCP_OPTION),
    ("opt-overflows-header", lambda: with_tcp_options(b"\x02\x04\x05\xb4\x08\x0a\x00\x00"), ETH,
     E.BAD_TCP_OPTION),
    ("opt-migrate-overflows", lambda: with_tcp_options(b"\x01\x01\x01\xfd\x15MG\x00" + bytes(4)), ETH,
     E.BAD_TCP_OPTION),
    ("opt-kind-in-last-byte", lambda: with_tcp_options(b"\x01\x01\x01\x02"), ETH, E.BAD_TCP_OPTION),
    ("opt-sack-overflows", lambda: with_tcp_options(b"\x01\x01\x05\x12" + bytes(8), 6), ETH, E.BAD_TCP_OPTION),
    ("opt-bad-after-good", lambda: with_tcp_options(b"\x02\x04\x05\xb4\x03\x01\x00\x00"), ETH,
     E.BAD_TCP_OPTION),
    # well-formed neighbours of the cases above: they must parse
    ("ok-garbage-after-eol", lambda: with_tcp_options(b"\x02\x04\x05\xb4\x00\x00\xff\x01"), ETH, E.OK),
    ("ok-eight-ext-headers", lambda: ext_chain(8), ETH, E.OK),
    ("ok-ethernet-trailer", lambda: base4() + bytes(20), ETH, E.OK),
    ("ok-total-length-short-exact", lambda: put(base4(), L3 + 2, "!H", 20 + 40), ETH, E.OK),
    ("ok-later-fragment-short-l4", lambda: bytearray(raw(ether(IP(src=V4_A, dst=V4_B, frag=100, proto=6)
                                                               / Raw(b"abc")))), ETH, E.OK),
    ("ok-ipv6-later-fragment", lambda: bytearray(raw(ether(IPv6(src=V6_A, dst=V6_B)
                                                           / IPv6ExtHdrFragment(offset=9, nh=6) / Raw(b"x")))),
     ETH, E.OK),
    ("ok-non-ip-short", lambda: bytearray(raw(ether(Raw(b"")))[:12] + b"\x88\xcc"), ETH, E.OK),
]


def test_case_ids_unique():
    """Case ids are unique (they name the tests)."""
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("build,link,err", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_reports_kind(engine, build, link, err):
    """parse() returns the exact Err kind and does not raise."""
    frame = build()
    view = engine.parse(bytes(frame), link)
    assert view.error == err
    assert view.ok == (err == E.OK)
    assert isinstance(repr(view), str)


def _calls(engine):
    return {
        "fix_checksums": lambda f, link: engine.fix_checksums(f, link),
        "verify_checksums": lambda f, link: engine.verify_checksums(f, link),
        "tcp_checksum": lambda f, link: engine.tcp_checksum(f, link),
        "ipv4_header_checksum": lambda f, link: engine.ipv4_header_checksum(f, link),
        "rewrite_addresses": lambda f, link: engine.rewrite_addresses(f, sport=1, link=link),
        "rewrite_tcp": lambda f, link: engine.rewrite_tcp(f, seq=1, link=link),
        "insert_option": lambda f, link: engine.insert_option(f, C.opt_sack_permitted(), link),
    }


BAD = [c for c in CASES if c[3] != E.OK]


@pytest.mark.parametrize("call", list(_calls(None)))
@pytest.mark.parametrize("build,link,err", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_calls_raise_frame_error(engine, build, link, err, call):
    """Rewrite and checksum calls raise FrameError (a ValueError) carrying the kind; the frame is untouched."""
    frame = bytearray(build())
    before = bytes(frame)
    with pytest.raises(C.FrameError) as info:
        _calls(engine)[call](frame, link)
    assert isinstance(info.value, ValueError)
    assert info.value.error == err
    assert err.name in str(info.value)
    assert frame == before


def _truncation_kind(n, l3, ip_len, min_ip, link=ETH):
    if link == ETH and n < 14:
        return E.TRUNCATED_ETHERNET
    if n < l3:
        return E.TRUNCATED_ETHERNET
    if n - l3 < min_ip:
        return E.TRUNCATED_IP
    if n < l3 + ip_len:
        return E.BAD_IP_LENGTH
    return E.OK


TRUNC = [
    ("ipv4", lambda: base4(), ETH, 14, 20),
    ("ipv4-vlan", lambda: bytearray(raw(ether(tcp4(LINUX_SYN_OPTS, payload=b"xy"), vlan=3))), ETH, 18, 20),
    ("ipv4-qinq", lambda: bytearray(raw(ether(tcp4(payload=b"xy"), vlan=3, outer_vlan=4))), ETH, 22, 20),
    ("ipv6", lambda: base6(), ETH, 14, 40),
    ("ipv6-ext", lambda: base6(ext=[IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()]), ETH, 14, 40),
    ("raw-ipv4", lambda: base4()[14:], RAW, 0, 20),
    ("raw-ipv6", lambda: base6()[14:], RAW, 0, 40),
]


@pytest.mark.parametrize("build,link,l3,min_ip", [t[1:] for t in TRUNC], ids=[t[0] for t in TRUNC])
def test_truncated_at_every_length(engine, build, link, l3, min_ip):
    """Every prefix of a frame gets the kind its length implies (the IP length field then lies)."""
    frame = bytes(build())
    ip_len = engine.parse(frame, link).ip_end - l3
    for n in range(len(frame) + 1):
        want = _truncation_kind(n, l3, ip_len, min_ip, link)
        if link == RAW and n == 0:
            want = E.TRUNCATED_IP
        assert engine.parse(frame[:n], link).error == want, n


@pytest.mark.parametrize("family", [4, 6])
def test_truncated_with_consistent_ip_length(engine, family):
    """Cutting the segment and fixing the IP length: TRUNCATED_L4, then BAD_TCP_OFFSET, then OK."""
    frame = base4() if family == 4 else base6()
    hdr = 20 if family == 4 else 40
    for l4len in range(0, len(frame) - L3 - hdr + 1):
        cut = bytearray(frame[:L3 + hdr + l4len])
        if family == 4:
            put(cut, L3 + 2, "!H", 20 + l4len)
        else:
            put(cut, L3 + 4, "!H", l4len)
        if family == 6 and l4len == 0:
            want = E.BAD_IP_LENGTH  # an IPv6 payload length of 0 means a jumbogram: unsupported
        elif l4len < 20:
            want = E.TRUNCATED_L4
        elif l4len < 40:
            want = E.BAD_TCP_OFFSET
        else:
            want = E.OK
        view = engine.parse(cut)
        assert view.error == want, l4len
        if want == E.OK:
            assert view.payload_len == l4len - 40


def test_truncated_udp_with_consistent_length(engine):
    """UDP needs 8 bytes."""
    frame = bytearray(raw(ether(IP(src=V4_A, dst=V4_B) / UDP() / Raw(b"abc"))))
    for l4len in range(0, 12):
        cut = put(bytearray(frame[:L3 + 20 + l4len]), L3 + 2, "!H", 20 + l4len)
        assert engine.parse(cut).error == (E.TRUNCATED_L4 if l4len < 8 else E.OK)


def test_every_option_length_byte(engine):
    """For an option at the end of the header, every length byte gives OK or BAD_TCP_OPTION, never a crash."""
    for length in range(256):
        frame = with_tcp_options(bytes([1, 1, 30, length]) + bytes(4))
        want = E.OK if 2 <= length <= 6 else E.BAD_TCP_OPTION
        assert engine.parse(frame).error == want, length


def test_every_ihl_and_doff(engine):
    """All 16 IHL and data-offset values on a short frame."""
    for ihl in range(16):
        frame = put(base4(payload=b"", options=[]), L3, "!B", 0x40 | ihl)
        want = E.BAD_IHL if ihl < 5 or L3 + ihl * 4 > len(frame) else (E.OK if ihl == 5 else E.TRUNCATED_L4)
        assert engine.parse(frame).error == want, ihl
    for doff in range(16):
        frame = set_doff(base4(payload=b"", options=[("MSS", 1)] * 2), doff)
        assert engine.parse(frame).error == (E.OK if doff in (5, 6, 7) else E.BAD_TCP_OFFSET), doff


def test_parse_never_raises_on_odd_inputs(engine):
    """Odd but legal argument values (empty buffers, unknown link values) do not raise."""
    for link in (ETH, RAW, 7):
        for data in (b"", b"\x45", b"\x60" + bytes(100), bytes(14) + b"\x45" + bytes(50)):
            assert isinstance(engine.parse(data, link).error, E)
