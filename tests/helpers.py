"""Shared helpers: loading the builds, scapy frame builders, and scapy's view of a frame.

scapy is the independent oracle: frames are built with it, and `scapy_view()` reads every
field the engine reports from scapy's own dissection, so parse results, checksums and
option encodings are checked against code that shares nothing with the engine.
"""

from __future__ import annotations

import os
import socket
import struct

import pytest

from _fastpath import _common as C
from _fastpath import _pyengine

from scapy.config import conf

conf.verb = 0
from scapy.compat import raw  # noqa: E402
from scapy.layers.inet import ICMP, IP, TCP, UDP  # noqa: E402,F401  (ICMP, ARP re-exported to tests)
from scapy.layers.inet6 import (  # noqa: E402
    IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrSegmentRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

ETH = C.LINK_ETHERNET
RAW = C.LINK_RAW

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"
V4_A, V4_B, V4_C, V4_D = "192.0.2.1", "198.51.100.2", "203.0.113.3", "10.9.8.7"
V6_A, V6_B, V6_C, V6_D = "2001:db8::1", "2001:db8:1::2", "2001:db8:2::3", "fd00::4"

# Linux's SYN options: MSS, SACK_PERM, TS, NOP, WS = 20 bytes.
LINUX_SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None), ("WScale", 7)]


# --- Loading the builds -----------------------------------------------------------------


def load_cengine():
    """The compiled build, or skip/fail per APPLIANCE_PUREPYTHON / APPLIANCE_REQUIRE_EXTENSION."""
    if os.environ.get("APPLIANCE_PUREPYTHON"):
        pytest.skip("APPLIANCE_PUREPYTHON is set: only the pure-Python build is tested",
                    allow_module_level=True)
    try:
        from _fastpath import _cengine
    except ImportError as exc:
        if os.environ.get("APPLIANCE_REQUIRE_EXTENSION"):
            pytest.fail(f"APPLIANCE_REQUIRE_EXTENSION is set but _fastpath._cengine does not import: {exc}")
        pytest.skip(f"the compiled build is not available: {exc}", allow_module_level=True)
    return _cengine


def load_pyengine():
    return _pyengine


# --- scapy builders ---------------------------------------------------------------------


def ether(l3, vlan=None, outer_vlan=None):
    """Wrap an IP packet in Ethernet, optionally with an 802.1Q tag (and an 802.1ad outer tag)."""
    frame = Ether(src=MAC_A, dst=MAC_B)
    if outer_vlan is not None:
        frame = frame / Dot1AD(vlan=outer_vlan)
    if vlan is not None:
        frame = frame / Dot1Q(vlan=vlan)
    return frame / l3


def tcp4(options=(), payload=b"", src=V4_A, dst=V4_B, ip_kw=None, **tcp_kw):
    tcp_kw.setdefault("sport", 40000)
    tcp_kw.setdefault("dport", 80)
    tcp_kw.setdefault("seq", 1000)
    tcp_kw.setdefault("flags", "A")
    pkt = IP(src=src, dst=dst, **(ip_kw or {})) / TCP(options=list(options), **tcp_kw)
    return pkt / Raw(payload) if payload else pkt


def tcp6(options=(), payload=b"", src=V6_A, dst=V6_B, ext=(), ip_kw=None, **tcp_kw):
    tcp_kw.setdefault("sport", 40000)
    tcp_kw.setdefault("dport", 443)
    tcp_kw.setdefault("seq", 1000)
    tcp_kw.setdefault("flags", "A")
    pkt = IPv6(src=src, dst=dst, **(ip_kw or {}))
    for e in ext:
        pkt = pkt / e
    pkt = pkt / TCP(options=list(options), **tcp_kw)
    return pkt / Raw(payload) if payload else pkt


def frame_bytes(pkt) -> bytes:
    return raw(pkt)


def eth_tcp4(**kw) -> bytes:
    vlan = kw.pop("vlan", None)
    return raw(ether(tcp4(**kw), vlan=vlan))


def eth_tcp6(**kw) -> bytes:
    vlan = kw.pop("vlan", None)
    return raw(ether(tcp6(**kw), vlan=vlan))


def eth_udp4(payload=b"data", src=V4_A, dst=V4_B, sport=5353, dport=53, chksum=None) -> bytes:
    udp = UDP(sport=sport, dport=dport) if chksum is None else UDP(sport=sport, dport=dport, chksum=chksum)
    return raw(ether(IP(src=src, dst=dst) / udp / Raw(payload)))


def eth_udp6(payload=b"data", src=V6_A, dst=V6_B, sport=5353, dport=53) -> bytes:
    return raw(ether(IPv6(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload)))


def linux_syn4(**kw) -> bytes:
    kw.setdefault("flags", "S")
    kw.setdefault("window", 64240)
    return eth_tcp4(options=LINUX_SYN_OPTS, **kw)


def linux_syn6(**kw) -> bytes:
    kw.setdefault("flags", "S")
    kw.setdefault("window", 64800)
    return eth_tcp6(options=LINUX_SYN_OPTS, **kw)


def strip_eth(frame: bytes) -> bytes:
    """The IP packet of an untagged Ethernet frame (for LINK_RAW)."""
    return frame[14:]


def garbage_options(rng) -> bytes:
    """A random TCP option block that parses: every option well formed (kinds known and
    unknown, any values), sometimes an EOL followed by junk."""
    out = b""
    while rng.random() < 0.8:
        k = rng.randrange(9)
        if k == 0:
            o = b"\x01"
        elif k == 1:
            o = C.opt_mss(rng.getrandbits(16))
        elif k == 2:
            o = C.opt_wscale(rng.getrandbits(8))
        elif k == 3:
            o = C.opt_sack_permitted()
        elif k == 4:
            o = C.opt_sack([(rng.getrandbits(32), rng.getrandbits(32)) for _ in range(rng.randint(1, 4))])
        elif k == 5:
            o = C.opt_timestamps(rng.getrandbits(32), rng.getrandbits(32))
        elif k == 6:
            o = bytes((rng.choice((253, 254)), 0)) + bytes(rng.getrandbits(8) for _ in range(rng.randrange(2, 20)))
            o = o[:1] + bytes((len(o),)) + o[2:]
        elif k == 7:
            o = C.opt_migrate(bool(rng.getrandbits(1)), rng.getrandbits(7), rng.getrandbits(64), rng.getrandbits(64))
        else:
            o = bytes((rng.choice((6, 7, 30, 99, 200)), 0)) + bytes(rng.getrandbits(8) for _ in range(rng.randrange(8)))
            o = o[:1] + bytes((len(o),)) + o[2:]
        if len(out) + len(o) > C.MAX_TCP_OPTIONS:
            break
        out += o
    if rng.random() < 0.2 and len(out) < C.MAX_TCP_OPTIONS:
        out += b"\x00" + bytes(rng.getrandbits(8) for _ in range(rng.randrange(C.MAX_TCP_OPTIONS - len(out))))
    return out


# --- scapy's view -----------------------------------------------------------------------


def dissect(frame, link=ETH):
    frame = bytes(frame)
    if link == ETH:
        return Ether(frame)
    return IP(frame) if frame[0] >> 4 == 4 else IPv6(frame)


def _ext_len(layer) -> int:
    if isinstance(layer, IPv6ExtHdrFragment):
        return 8
    return (layer.len + 1) * 8


def _option_list(opts):
    """scapy's option list as (kind-or-name, value) pairs, raw experimental options as bytes."""
    return [(o[0], o[1]) for o in opts]


def options_view(options) -> dict:
    """What the engine should report for a scapy-decoded option list (last occurrence wins)."""
    out = dict(opts=0, mss=0, wscale=-1, tsval=0, tsecr=0, sack_blocks=(), mp_curve=-1,
               migrate_preload=False, migrate_reqno=0, migrate_token=0, migrate_request=0,
               unknown_options=0)
    for name, value in _option_list(options):
        if name in ("EOL",):
            break
        if name == "NOP":
            continue
        if name == "MSS":
            out["opts"] |= C.HAS_MSS
            out["mss"] = value
        elif name == "WScale":
            out["opts"] |= C.HAS_WSCALE
            out["wscale"] = value
        elif name == "SAckOK":
            out["opts"] |= C.HAS_SACK_PERMITTED
        elif name == "SAck":
            out["opts"] |= C.HAS_SACK
            out["sack_blocks"] = tuple(zip(value[0::2], value[1::2]))
        elif name == "Timestamp":
            out["opts"] |= C.HAS_TIMESTAMPS
            out["tsval"], out["tsecr"] = value
        elif name in (253, 254) and len(value) >= 2:
            exid = int.from_bytes(value[:2], "big")
            if exid == C.EXID_MIGRATE_PERMITTED and len(value) in (3, 20):
                out["opts"] |= C.HAS_MIGRATE_PERMITTED
                out["mp_curve"] = value[2]
            elif exid == C.EXID_MIGRATE and len(value) == 19:
                out["opts"] |= C.HAS_MIGRATE
                out["migrate_preload"] = bool(value[2] & 0x80)
                out["migrate_reqno"] = value[2] & 0x7F
                out["migrate_token"] = int.from_bytes(value[3:11], "big")
                out["migrate_request"] = int.from_bytes(value[11:19], "big")
            else:
                out["unknown_options"] += 1
        else:
            out["unknown_options"] += 1
    return out


def _load(l4) -> bytes:
    """The L4 payload scapy dissected, without any Ethernet trailer (scapy's Padding)."""
    p = l4.payload
    return bytes(p.load) if type(p) is Raw else b""


def scapy_view(frame, link=ETH) -> dict:
    """Every FrameView field of a well-formed frame, read from scapy's dissection."""
    frame = bytes(frame)
    pkt = dissect(frame, link)
    out = dict(error=C.Err.OK, vlan=-1)
    off = 0
    if link == ETH:
        off = 14
        tags = [layer for layer in (pkt.getlayer(Dot1AD), pkt.getlayer(Dot1Q)) if layer is not None]
        if tags:
            out["vlan"] = tags[0].vlan
        off += 4 * len(tags)
        out["ethertype"] = (tags[-1] if tags else pkt).type
    if IP in pkt:
        ip = pkt[IP]
        out.update(ip_version=4, l3_off=off, ip_end=off + ip.len, ttl=ip.ttl, ip_proto=ip.proto,
                   src=socket.inet_pton(socket.AF_INET, ip.src), dst=socket.inet_pton(socket.AF_INET, ip.dst),
                   src_ip=ip.src, dst_ip=ip.dst)
        l4 = off + ip.ihl * 4
        if link == RAW:
            out["ethertype"] = C.ETH_P_IP
    elif IPv6 in pkt:
        ip = pkt[IPv6]
        out.update(ip_version=6, l3_off=off, ip_end=off + 40 + ip.plen, ttl=ip.hlim,
                   src=socket.inet_pton(socket.AF_INET6, ip.src), dst=socket.inet_pton(socket.AF_INET6, ip.dst),
                   src_ip=socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip.src)),
                   dst_ip=socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip.dst)))
        l4 = off + 40
        layer = ip.payload
        proto = ip.nh
        while isinstance(layer, (IPv6ExtHdrHopByHop, IPv6ExtHdrDestOpt, IPv6ExtHdrRouting, IPv6ExtHdrSegmentRouting,
                                 IPv6ExtHdrFragment)):
            l4 += _ext_len(layer)
            proto = layer.nh
            layer = layer.payload
        out["ip_proto"] = proto
        if link == RAW:
            out["ethertype"] = C.ETH_P_IPV6
    else:
        return out
    out["l4_off"] = l4
    if TCP in pkt:
        t = pkt[TCP]
        hlen = t.dataofs * 4
        out.update(sport=t.sport, dport=t.dport, seq=t.seq, ack=t.ack, flags=int(t.flags), window=t.window,
                   checksum=t.chksum, urgent=t.urgptr, tcp_hdr_len=hlen, payload_off=l4 + hlen,
                   payload_len=out["ip_end"] - l4 - hlen)
        out.update(options_view(t.options))
        out["payload"] = _load(t)
    elif UDP in pkt:
        u = pkt[UDP]
        out.update(sport=u.sport, dport=u.dport, payload_off=l4 + 8, payload_len=out["ip_end"] - l4 - 8)
        out["payload"] = _load(u)
    return out


def engine_value(view, name):
    value = getattr(view, name)
    return value() if callable(value) else value


def assert_matches_scapy(view, frame, link=ETH, expected=None):
    """Compare every field scapy can tell with the engine's FrameView (and any explicit expectations)."""
    want = scapy_view(frame, link)
    if expected:
        want.update(expected)
    got = {k: engine_value(view, k) for k in want}
    assert got == want


# Every field and property of a FrameView, for comparing the two builds.
VIEW_FIELDS = (
    "error", "ok", "is_tcp", "is_fragment", "link", "vlan", "ethertype", "ip_version", "l3_off", "ip_end",
    "ip_proto", "ttl", "l4_off", "sport", "dport", "seq", "ack", "tcp_hdr_len", "flags", "window",
    "checksum", "urgent", "payload_off", "payload_len", "opts", "mss", "wscale", "tsval", "tsecr", "ts_off",
    "sack_off", "sack_count", "mp_curve", "migrate_preload", "migrate_reqno", "migrate_token",
    "migrate_request", "unknown_options", "pseudo_dst_off", "src", "dst", "src_ip", "dst_ip", "sack_blocks", "payload",
)


def view_dict(view) -> dict:
    out = {}
    for name in VIEW_FIELDS:
        try:
            out[name] = engine_value(view, name)
        except Exception as exc:  # a property that raises must raise alike in both builds
            out[name] = ("raised", type(exc).__name__)
    out["options()"] = view.options() if view.is_tcp else []
    out["repr"] = repr(view)
    return out


# --- Checksum oracle --------------------------------------------------------------------


def scapy_rebuild(frame, link=ETH) -> bytes:
    """The frame with scapy's own IPv4/TCP/UDP checksums (fields deleted and rebuilt)."""
    pkt = dissect(frame, link)
    for layer in (IP, TCP, UDP):
        if layer in pkt:
            del pkt[layer].chksum
    return raw(pkt)


def scapy_checksums_ok(frame, link=ETH) -> bool:
    """Whether every checksum in frame equals the one scapy computes."""
    return scapy_rebuild(frame, link) == bytes(frame)


def ones_sum(data: bytes) -> int:
    """Plain RFC 1071 ones' complement sum, a bytewise loop written independently of the engine."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_checksum(data: bytes) -> int:
    return ~ones_sum(data) & 0xFFFF


def decode_options_with_scapy(options: bytes):
    """scapy's decoding of a raw TCP option block (padded to 4 bytes) in a bare TCP header."""
    opts = C.pad_options(options)
    hdr = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, (20 + len(opts)) << 2, 0x02, 0, 0, 0) + opts
    return TCP(hdr).options

