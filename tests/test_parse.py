"""parse() and parse_batch() against scapy's dissection of the same frames."""

from array import array

import pytest

from _fastpath import _common as C
from helpers import (
    ETH, LINUX_SYN_OPTS, MAC_A, MAC_B, RAW, V4_A, V4_B, V6_A, V6_B, ARP, ICMP, IP, IPv6, Ether, Raw, TCP,
    UDP, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, assert_matches_scapy,
    ether, raw, tcp4, tcp6,
)
from scapy.layers.inet import IPOption

MIGRATE_BODY = C.opt_migrate(True, 77, 0x0123456789ABCDEF, 0xFEDCBA9876543210)[2:]
MP_SECURE_BODY = C.opt_migrate_permitted(3, bytes(range(17)))[2:]

LINUX = dict(opts=C.HAS_MSS | C.HAS_WSCALE | C.HAS_SACK_PERMITTED | C.HAS_TIMESTAMPS, mss=1460, wscale=7,
             tsval=123456, tsecr=0)

# (id, frame builder, link, explicit expectations); scapy's view supplies all other fields.
CASES = [
    ("ipv4-linux-syn", lambda: ether(tcp4(LINUX_SYN_OPTS, flags="S", window=64240)), ETH,
     dict(flags=C.SYN, window=64240, l3_off=14, l4_off=34, tcp_hdr_len=40, payload_len=0, **LINUX)),
    ("ipv4-vlan-payload", lambda: ether(tcp4(payload=b"hello world", seq=7), vlan=100), ETH,
     dict(vlan=100, l3_off=18, l4_off=38, payload_off=58, payload_len=11, payload=b"hello world")),
    ("ipv4-qinq", lambda: ether(tcp4(payload=b"x"), vlan=200, outer_vlan=7), ETH,
     dict(vlan=7, l3_off=22, ethertype=C.ETH_P_IP)),
    ("ipv4-ip-options", lambda: ether(IP(src=V4_A, dst=V4_B, options=IPOption(b"\x01\x01\x01\x00"))
                                      / TCP(sport=1, dport=2, flags="A") / Raw(b"abc")), ETH,
     dict(l4_off=38, payload_off=58, payload_len=3)),
    ("max-field-values", lambda: ether(tcp4(sport=65535, dport=65535, seq=0xFFFFFFFF, ack=0xFFFFFFFF,
                                            window=65535, flags=0xFF, urgptr=0xFFFF)), ETH,
     dict(sport=65535, dport=65535, seq=0xFFFFFFFF, ack=0xFFFFFFFF, window=65535, flags=0xFF, urgent=0xFFFF)),
    ("zero-field-values", lambda: ether(tcp4(sport=0, dport=0, seq=0, ack=0, window=0, flags=0)), ETH,
     dict(sport=0, dport=0, seq=0, flags=0, window=0)),
    ("timestamps-high", lambda: ether(tcp4([("NOP", None), ("NOP", None),
                                            ("Timestamp", (0xFFFFFFFF, 0x80000000))])), ETH,
     dict(opts=C.HAS_TIMESTAMPS, tsval=0xFFFFFFFF, tsecr=0x80000000)),
    ("sack-1-block", lambda: ether(tcp4([("NOP", None), ("NOP", None), ("SAck", (100, 200))])), ETH,
     dict(opts=C.HAS_SACK, sack_blocks=((100, 200),))),
    ("sack-4-blocks", lambda: ether(tcp4([("NOP", None), ("NOP", None),
                                          ("SAck", (1, 2, 3, 4, 0xFFFFFFF0, 5, 0x80000000, 0xFFFFFFFF))])), ETH,
     dict(opts=C.HAS_SACK, sack_blocks=((1, 2), (3, 4), (0xFFFFFFF0, 5), (0x80000000, 0xFFFFFFFF)))),
    ("sack-with-timestamps", lambda: ether(tcp4([("NOP", None), ("NOP", None), ("Timestamp", (5, 6)),
                                                 ("NOP", None), ("NOP", None), ("SAck", (10, 20, 30, 40))])),
     ETH, dict(opts=C.HAS_SACK | C.HAS_TIMESTAMPS, tsval=5, tsecr=6, sack_blocks=((10, 20), (30, 40)))),
    ("migrate-permitted-insecure", lambda: ether(tcp4(LINUX_SYN_OPTS[:3] + [(253, b"MP\x00")], flags="S")), ETH,
     dict(mp_curve=0, opts=C.HAS_MSS | C.HAS_SACK_PERMITTED | C.HAS_TIMESTAMPS | C.HAS_MIGRATE_PERMITTED)),
    ("migrate-permitted-secure", lambda: ether(tcp4([(253, MP_SECURE_BODY)], flags="S")), ETH,
     dict(mp_curve=3, opts=C.HAS_MIGRATE_PERMITTED, unknown_options=0)),
    ("migrate-option", lambda: ether(tcp4([("NOP", None)] * 3 + [(253, MIGRATE_BODY)], flags="S", window=0)),
     ETH, dict(opts=C.HAS_MIGRATE, migrate_preload=True, migrate_reqno=77, migrate_token=0x0123456789ABCDEF,
               migrate_request=0xFEDCBA9876543210)),
    ("migrate-no-preload-kind-254", lambda: ether(tcp4([(254, C.opt_migrate(False, 0, 1, 2)[2:])])), ETH,
     dict(opts=C.HAS_MIGRATE, migrate_preload=False, migrate_reqno=0, migrate_token=1, migrate_request=2)),
    ("unknown-experimental-253", lambda: ether(tcp4([(253, b"\x12\x34abcd"), ("MSS", 536)])), ETH,
     dict(unknown_options=1, mss=536, opts=C.HAS_MSS)),
    ("exid-mp-bad-length", lambda: ether(tcp4([(253, b"MP\x00\x00")])), ETH,
     dict(unknown_options=1, mp_curve=-1, opts=0)),
    ("unknown-kind-30", lambda: ether(tcp4([(30, b"xyz"), ("WScale", 14)])), ETH,
     dict(unknown_options=1, wscale=14, opts=C.HAS_WSCALE)),
    ("eol-stops-parsing", lambda: ether(tcp4([("MSS", 1400), ("EOL", None), ("WScale", 3)])), ETH,
     dict(mss=1400, wscale=-1, opts=C.HAS_MSS)),
    ("ipv6-linux-syn", lambda: ether(tcp6(LINUX_SYN_OPTS, flags="S")), ETH,
     dict(ip_version=6, ethertype=C.ETH_P_IPV6, l4_off=54, **LINUX)),
    ("ipv6-vlan-payload", lambda: ether(tcp6(payload=b"\x00" * 33, ip_kw=dict(hlim=3)), vlan=4095), ETH,
     dict(vlan=4095, ttl=3, l3_off=18, payload_len=33)),
    ("ipv6-ext-headers", lambda: ether(tcp6(payload=b"abc", ext=[IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(),
                                                                IPv6ExtHdrRouting()])), ETH,
     dict(ip_proto=C.IPPROTO_TCP, l4_off=14 + 40 + 8 + 8 + 8)),
    # RFC 6946: an atomic fragment (offset 0, M clear) is a whole packet, not a fragment
    ("ipv6-atomic-fragment", lambda: ether(tcp6(ext=[IPv6ExtHdrFragment(offset=0, m=0)])), ETH,
     dict(opts=0, l4_off=62)),
    ("ipv6-later-fragment", lambda: ether(IPv6(src=V6_A, dst=V6_B) / IPv6ExtHdrFragment(offset=5, m=1, nh=6)
                                          / Raw(b"abcdefgh" * 3)), ETH,
     dict(ip_proto=6, l4_off=62, opts=C.IS_FRAGMENT, sport=0, seq=0)),
    ("ipv4-first-fragment", lambda: ether(tcp4(payload=b"abcdefgh", ip_kw=dict(flags="MF"))), ETH,
     dict(opts=C.IS_FRAGMENT)),
    ("ipv4-later-fragment", lambda: ether(IP(src=V4_A, dst=V4_B, frag=3, proto=6) / Raw(b"abcdefgh" * 3)),
     ETH, dict(ip_proto=6, l4_off=34, opts=C.IS_FRAGMENT, sport=0, seq=0, tcp_hdr_len=0)),
    ("ethernet-trailer", lambda: raw(ether(tcp4())) + bytes(6), ETH,
     dict(ip_end=54, payload_len=0, payload=b"")),
    ("ipv4-udp", lambda: ether(IP(src=V4_A, dst=V4_B) / UDP(sport=5353, dport=53) / Raw(b"query")), ETH,
     dict(ip_proto=17, sport=5353, dport=53, payload_off=42, payload_len=5)),
    ("ipv6-udp", lambda: ether(IPv6(src=V6_A, dst=V6_B) / UDP(sport=1, dport=2) / Raw(b"q")), ETH,
     dict(ip_proto=17, payload_off=62, payload_len=1)),
    ("ipv4-icmp", lambda: ether(IP(src=V4_A, dst=V4_B) / ICMP()), ETH,
     dict(ip_proto=1, sport=0, tcp_hdr_len=0)),
    ("arp", lambda: Ether(src=MAC_A, dst=MAC_B) / ARP(), ETH,
     dict(ethertype=0x0806, ip_version=0, l3_off=0)),
    ("raw-ipv4", lambda: tcp4(LINUX_SYN_OPTS, payload=b"p"), RAW,
     dict(l3_off=0, l4_off=20, ethertype=C.ETH_P_IP, vlan=-1, **LINUX)),
    ("raw-ipv6", lambda: tcp6(payload=b"pp"), RAW, dict(l3_off=0, l4_off=40, ip_version=6)),
]


@pytest.mark.parametrize("build,link,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_parse_matches_scapy(engine, build, link, expected):
    """Every parsed field equals scapy's view and the case's explicit expectations."""
    frame = raw(build())
    view = engine.parse(frame, link)
    assert view.error == C.Err.OK and view.ok
    assert view.link == link
    assert_matches_scapy(view, frame, link, expected)


@pytest.mark.parametrize("build,link,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_options_list_matches_scapy(engine, build, link, expected):
    """FrameView.options() lists the same option kinds, in order, as scapy up to the first EOL."""
    frame = raw(build())
    view = engine.parse(frame, link)
    if not view.is_tcp:
        assert view.options() == []
        return
    scapy_kinds = []
    for name, _ in TCP(frame[view.l4_off:]).options:
        kind = {"EOL": 0, "NOP": 1, "MSS": 2, "WScale": 3, "SAckOK": 4, "SAck": 5, "Timestamp": 8}.get(name, name)
        scapy_kinds.append(kind)
        if kind == 0:
            break
    got = view.options()
    assert [k for k, _, _ in got] == scapy_kinds[:len(got)]
    for kind, off, length in got:
        assert frame[off] == kind
        assert length == (1 if kind in (0, 1) else frame[off + 1])


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_parse_accepts_buffers(engine, kind):
    """parse() takes bytes, bytearray and memoryview alike and keeps the frame it read."""
    frame = raw(ether(tcp4(LINUX_SYN_OPTS, payload=b"xyz", flags="S")))
    obj = kind(frame)
    view = engine.parse(obj)
    assert view.frame is obj
    assert view.is_tcp and view.mss == 1460 and view.payload == b"xyz"


def test_known_options_with_wrong_length_count_as_unknown(engine):
    """MSS/WS/SACK_PERM/TS/SACK with a non-standard length are not taken as such."""
    opts = bytes([2, 3, 5, 3, 4, 7, 0, 4, 3, 0, 8, 6, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4]) + bytes([1, 1])
    frame = raw(ether(IP(src=V4_A, dst=V4_B) / TCP(dataofs=(20 + len(opts)) // 4) / Raw(opts)))
    view = engine.parse(frame)
    assert view.ok
    assert (view.opts, view.mss, view.wscale, view.tsval, view.unknown_options) == (0, 0, -1, 0, 5)


def test_repeated_option_last_one_wins(engine):
    """When an option appears twice the later occurrence is reported."""
    frame = raw(ether(tcp4([("MSS", 1000), ("MSS", 1200), ("WScale", 2), ("WScale", 9)])))
    view = engine.parse(frame)
    assert (view.mss, view.wscale) == (1200, 9)


def test_view_properties(engine):
    """src/dst, text addresses, repr and the is_tcp/is_fragment properties."""
    v4 = engine.parse(raw(ether(tcp4(payload=b"ab"))))
    assert (v4.src_ip, v4.dst_ip, v4.src, v4.dst) == (V4_A, V4_B, bytes([192, 0, 2, 1]), bytes([198, 51, 100, 2]))
    assert repr(v4) == f"<FrameView TCP {V4_A}:40000 > {V4_B}:80 flags=0x10 seq=1000 ack=0 len=2>"
    v6 = engine.parse(raw(ether(IPv6(src=V6_A, dst=V6_B) / UDP(sport=1, dport=2))))
    assert (v6.src_ip, v6.dst_ip, v6.is_tcp) == (V6_A, V6_B, False)
    assert repr(v6) == f"<FrameView IPv6 proto=17 {V6_A} > {V6_B}>"
    arp = engine.parse(raw(Ether(src=MAC_A, dst=MAC_B) / ARP()))
    assert (arp.src, arp.src_ip, repr(arp)) == (b"", "", "<FrameView ethertype=0x0806>")
    bad = engine.parse(b"\x00" * 5)
    assert repr(bad) == "<FrameView TRUNCATED_ETHERNET>" and not bad.ok


def test_vlan_third_tag_is_not_ip(engine):
    """Only two VLAN tags are followed: a third leaves a non-IP EtherType, parsed OK."""
    inner = raw(tcp4())
    frame = bytes.fromhex("02000000000b02000000000a") + b"".join(
        bytes.fromhex(t) for t in ("8100000a", "8100000b", "8100000c")) + b"\x08\x00" + inner
    view = engine.parse(frame)
    assert view.ok and view.ip_version == 0 and view.ethertype == 0x8100 and view.vlan == 10


# --- parse_batch ------------------------------------------------------------------------

RECORD_VIEW_FIELDS = ("error", "ip_version", "ip_proto", "flags", "l3_off", "l4_off", "payload_off", "sport",
                      "dport", "window", "payload_len", "seq", "ack", "tsval", "tsecr", "mss", "wscale", "opts")


def _pack(frames, gap=3):
    buf, offs, lens = bytearray(), array("I"), array("I")
    for f in frames:
        buf += b"\xee" * gap  # garbage between frames must not be read
        offs.append(len(buf))
        lens.append(len(f))
        buf += f
    return buf, offs, lens


def _expected_record(engine, frame, link):
    v = engine.parse(frame, link)
    vals = [int(getattr(v, f)) for f in RECORD_VIEW_FIELDS]
    vals[RECORD_VIEW_FIELDS.index("wscale")] &= 0xFF
    return C.Record(*vals)


def _batch_frames(link):
    frames = [raw(c[1]()) for c in CASES if c[2] == link]
    good = frames[0]
    frames += [good[:n] for n in (0, 10, 30, len(good) - 1)]  # malformed ones too
    return frames


@pytest.mark.parametrize("link", [ETH, RAW], ids=["eth", "raw"])
def test_parse_batch_records_equal_parse(engine, link):
    """Each record decoded with iter_records equals the fields of a single parse() call."""
    frames = _batch_frames(link)
    buf, offs, lens = _pack(frames)
    records = bytearray(C.RECORD_SIZE * len(frames))
    n = engine.parse_batch(buf, offs, lens, records, link=link)
    assert n == len(frames)
    got = C.iter_records(records, n)
    assert got == [_expected_record(engine, f, link) for f in frames]


def test_parse_batch_count_and_record_space(engine):
    """count limits the frames parsed; a short records buffer limits them too."""
    frames = _batch_frames(ETH)
    buf, offs, lens = _pack(frames)
    records = bytearray(C.RECORD_SIZE * len(frames))
    assert engine.parse_batch(buf, offs, lens, records, 2) == 2
    assert records[2 * C.RECORD_SIZE:] == bytes(len(records) - 2 * C.RECORD_SIZE)
    assert C.iter_records(records, 2) == [_expected_record(engine, f, ETH) for f in frames[:2]]
    small = bytearray(C.RECORD_SIZE * 3 + 7)
    assert engine.parse_batch(buf, offs, lens, small) == 3
    assert engine.parse_batch(buf, offs, lens, records, 0) == 0


def test_parse_batch_bad_arguments(engine):
    """Offsets running past the buffer and a count beyond the arrays raise ValueError."""
    frames = _batch_frames(ETH)[:3]
    buf, offs, lens = _pack(frames)
    records = bytearray(C.RECORD_SIZE * 3)
    with pytest.raises(ValueError):
        engine.parse_batch(buf, offs, lens, records, 4)
    bad = array("I", offs)
    bad[1] = len(buf) - 1
    with pytest.raises(ValueError):
        engine.parse_batch(buf, bad, lens, records)
    with pytest.raises(ValueError):
        engine.parse_batch(buf, offs, array("I", [lens[0], lens[1], lens[2] + 4]), records)
