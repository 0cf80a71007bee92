"""Packet builders bound to each engine: decoded with scapy, fields and checksums verified."""

import pytest

from _fastpath import _common as C
from helpers import (
    ETH, MAC_A, MAC_B, RAW, V4_A, V4_B, V6_A, V6_B, IP, IPv6, TCP, Dot1Q, Ether, dissect, scapy_checksums_ok,
)

TOKEN, REQUEST = 0x0123456789ABCDEF, 0xFFEEDDCCBBAA9988


def _check(engine, frame, link):
    assert isinstance(frame, bytes)
    assert scapy_checksums_ok(frame, link)
    assert engine.verify_checksums(frame, link) == (True, True)
    return dissect(frame, link)


@pytest.mark.parametrize("src,dst", [(V4_A, V4_B), (V6_A, V6_B)], ids=["v4", "v6"])
def test_build_migrate_syn(engine, src, dst):
    """A Migrate SYN carries SYN only, window 0 and exactly one option: Migrate, NOP-aligned."""
    frame = engine.build_migrate_syn(src, dst, 40001, 443, 0xFFFFFFF0, 127, TOKEN, REQUEST)
    pkt = _check(engine, frame, RAW)
    ip = pkt[IP] if IP in pkt else pkt[IPv6]
    t = pkt[TCP]
    assert (ip.src, ip.dst, t.sport, t.dport, t.seq, t.ack) == (src, dst, 40001, 443, 0xFFFFFFF0, 0)
    assert int(t.flags) == C.SYN and t.window == 0 and t.dataofs == 11
    body = bytes([0x80 | 127]) + TOKEN.to_bytes(8, "big") + REQUEST.to_bytes(8, "big")
    assert t.options == [("NOP", None)] * 3 + [(253, b"MG" + body)]
    v = engine.parse(frame, RAW)
    assert v.opts == C.HAS_MIGRATE and not v.unknown_options
    assert (v.migrate_preload, v.migrate_reqno, v.migrate_token, v.migrate_request) == (True, 127, TOKEN, REQUEST)


def test_build_migrate_syn_options(engine):
    """preload=False, window and Ethernet/VLAN keywords are honoured."""
    frame = engine.build_migrate_syn(V4_A, V4_B, 1, 2, 5, 0, 1, 2, preload=False, window=1024,
                                     eth_src=MAC_A, eth_dst=MAC_B, vlan=42, ttl=7)
    pkt = _check(engine, frame, ETH)
    assert pkt[Dot1Q].vlan == 42 and pkt[Ether].src == MAC_A and pkt[Ether].dst == MAC_B
    assert pkt[IP].ttl == 7 and pkt[TCP].window == 1024
    v = engine.parse(frame)
    assert (v.migrate_preload, v.migrate_reqno, v.migrate_token, v.migrate_request, v.vlan) == (False, 0, 1, 2, 42)


@pytest.mark.parametrize("src,dst", [(V4_A, V4_B), (V6_A, V6_B)], ids=["v4", "v6"])
def test_build_migrate_synack_with_timestamps(engine, src, dst):
    """The reply SYN/ACK carries NOP,NOP,TS when tsval is given."""
    frame = engine.build_migrate_synack(src, dst, 443, 40001, 0xFFFFFFFF, 0x10, 29200, tsval=0xFFFFFFFE,
                                        tsecr=77)
    t = _check(engine, frame, RAW)[TCP]
    assert (t.seq, t.ack, t.window, int(t.flags)) == (0xFFFFFFFF, 0x10, 29200, C.SYN | C.ACK)
    assert t.options == [("NOP", None), ("NOP", None), ("Timestamp", (0xFFFFFFFE, 77))]
    v = engine.parse(frame, RAW)
    assert (v.tsval, v.tsecr, v.opts) == (0xFFFFFFFE, 77, C.HAS_TIMESTAMPS)


def test_build_migrate_synack_without_timestamps(engine):
    """Without tsval there are no options at all; tsval=0 still adds the option (tsecr defaults to 0)."""
    frame = engine.build_migrate_synack(V4_A, V4_B, 443, 40001, 1, 2, 3)
    t = _check(engine, frame, RAW)[TCP]
    assert t.options == [] and t.dataofs == 5 and int(t.flags) == C.SYN | C.ACK
    frame = engine.build_migrate_synack(V4_A, V4_B, 443, 40001, 1, 2, 3, tsval=0)
    t = _check(engine, frame, RAW)[TCP]
    assert t.options == [("NOP", None), ("NOP", None), ("Timestamp", (0, 0))]


@pytest.mark.parametrize("ack,flags", [(None, C.RST), (0, C.RST | C.ACK), (0xABCDEF01, C.RST | C.ACK)],
                         ids=["rst", "rst-ack-0", "rst-ack"])
def test_build_rst(engine, ack, flags):
    """RST alone without ack, RST|ACK with one; window 0 and no options."""
    frame = engine.build_rst(V6_A, V6_B, 1, 2, 0x7FFFFFFF, ack, eth_src=MAC_A, eth_dst=MAC_B)
    t = _check(engine, frame, ETH)[TCP]
    assert (t.seq, t.ack, int(t.flags), t.window, t.options) == (0x7FFFFFFF, ack or 0, flags, 0, [])


@pytest.mark.parametrize("vlan", [None, 0, 4095], ids=["untagged", "vlan0", "vlan4095"])
@pytest.mark.parametrize("src,dst", [(V4_A, V4_B), (V6_A, V6_B)], ids=["v4", "v6"])
def test_build_tcp_ethernet(engine, src, dst, vlan):
    """build_tcp with Ethernet and VLAN: every header field as requested, options padded with EOL."""
    opts = C.opt_mss(1400) + C.opt_wscale(9)  # 7 bytes, padded to 8
    frame = engine.build_tcp(src, dst, 65535, 0, 0xFFFFFFFF, 0x80000000, C.PSH | C.ACK | C.URG, 12345, opts,
                             b"payload", ttl=3, ip_id=0xBEEF, tos=0x10, urgent=5, eth_src=MAC_A, eth_dst=MAC_B,
                             vlan=vlan)
    pkt = _check(engine, frame, ETH)
    assert (pkt[Ether].src, pkt[Ether].dst) == (MAC_A, MAC_B)
    if vlan is None:
        assert Dot1Q not in pkt
    else:
        assert pkt[Dot1Q].vlan == vlan
    if IP in pkt:
        ip = pkt[IP]
        assert (ip.ttl, ip.id, ip.tos, ip.flags.value, ip.len) == (3, 0xBEEF, 0x10, 2, 20 + 28 + 7)
    else:
        ip = pkt[IPv6]
        assert (ip.hlim, ip.tc, ip.plen) == (3, 0x10, 28 + 7)
    t = pkt[TCP]
    assert (ip.src, ip.dst, t.sport, t.dport, t.seq, t.ack) == (src, dst, 65535, 0, 0xFFFFFFFF, 0x80000000)
    assert (int(t.flags), t.window, t.urgptr, bytes(t.payload)) == (C.PSH | C.ACK | C.URG, 12345, 5, b"payload")
    assert t.options == [("MSS", 1400), ("WScale", 9), ("EOL", None)]
    v = engine.parse(frame)
    assert (v.vlan, v.mss, v.wscale, v.payload) == (-1 if vlan is None else vlan, 1400, 9, b"payload")


def test_build_tcp_errors(engine):
    """Mixed address families and over-long options are refused."""
    with pytest.raises(ValueError):
        engine.build_tcp(V4_A, V6_B, 1, 2, 3)
    with pytest.raises(ValueError):
        engine.build_tcp(V4_A, V4_B, 1, 2, 3, options=bytes(41))


def test_builders_are_bound_to_the_engine(engine):
    """Each build's builders carry the shared docstrings and produce identical bytes."""
    from _fastpath import _pyengine
    assert engine.build_tcp.__doc__ == C.build_tcp.__doc__
    args = (V4_A, V4_B, 1, 2, 3, 4, C.ACK, 100, C.opt_timestamps(1, 2), b"x")
    assert engine.build_tcp(*args) == _pyengine.build_tcp(*args)
    assert engine.build_rst(V6_A, V6_B, 5, 6, 7, 8) == C.build_rst(_pyengine.fix_checksums, V6_A, V6_B, 5, 6, 7, 8)
