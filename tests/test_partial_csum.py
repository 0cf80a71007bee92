"""Rewrites of frames whose L4 checksum is left to offload (PACKET_VNET_HDR, NEEDS_CSUM).

Such a frame's checksum field holds the uncomplemented pseudo-header sum (the kernel's
~csum_tcpudp_magic(..., 0)); the device later sums the segment from the L4 header on,
seeded with it, and stores the complement. A rewrite must leave a correct pseudo-header
sum behind, so that the completed checksum is right.
"""

import struct

import pytest

from _fastpath import _common as C

from helpers import (
    V4_A, V4_B, V4_C, V6_A, V6_B, V6_C, eth_tcp4, eth_tcp6, eth_udp4, ones_sum, scapy_checksums_ok,
)


def pseudo_sum(frame: bytes, v) -> int:
    l4len = v.ip_end - v.l4_off
    if v.ip_version == 4:
        data = bytes(frame[v.l3_off + 12:v.l3_off + 20]) + struct.pack("!BBH", 0, v.ip_proto, l4len)
    else:
        data = bytes(frame[v.l3_off + 8:v.l3_off + 40]) + struct.pack("!IxxxB", l4len, v.ip_proto)
    return ones_sum(data)


def field_offset(v) -> int:
    return v.l4_off + (16 if v.ip_proto == C.IPPROTO_TCP else 6)


def make_partial(engine, frame: bytes) -> bytearray:
    """The frame as the kernel hands it over with NEEDS_CSUM: pseudo-header sum in the field."""
    f = bytearray(frame)
    v = engine.parse(f)
    struct.pack_into("!H", f, field_offset(v), pseudo_sum(f, v))
    return f


def complete(engine, frame: bytearray) -> bytearray:
    """What the device does: sum the L4 segment seeded with the field, store the complement."""
    v = engine.parse(frame)
    off = field_offset(v)
    total = ones_sum(bytes(frame[v.l4_off:v.ip_end]))
    struct.pack_into("!H", frame, off, ~total & 0xFFFF)
    return frame


CASES = [
    ("tcp4", lambda: eth_tcp4(payload=b"hello world", sport=40000, dport=80), V4_C, V4_A),
    ("tcp6", lambda: eth_tcp6(payload=b"x" * 101, sport=40001, dport=80), V6_C, V6_A),
    ("udp4", lambda: eth_udp4(payload=b"datagram"), V4_C, V4_A),
]


@pytest.mark.parametrize("name,make,new_dst,new_src", CASES, ids=[c[0] for c in CASES])
def test_rewrite_keeps_a_correct_pseudo_header_sum(engine, name, make, new_dst, new_src):
    f = make_partial(engine, make())
    engine.rewrite_addresses(f, src=new_src, dst=new_dst, sport=1234, dport=4321, partial_csum=True)
    v = engine.parse(f)
    assert (v.src_ip, v.dst_ip, v.sport, v.dport) == (new_src, new_dst, 1234, 4321)
    assert struct.unpack_from("!H", f, field_offset(v))[0] == pseudo_sum(f, v)
    assert scapy_checksums_ok(bytes(complete(engine, f)))


def test_ports_alone_leave_a_partial_field_untouched(engine):
    f = make_partial(engine, eth_tcp4(payload=b"p", sport=1, dport=2))
    before = bytes(f)
    v = engine.parse(f)
    engine.rewrite_addresses(f, sport=9, dport=10, partial_csum=True)
    assert f[v.l4_off + 16:v.l4_off + 18] == before[v.l4_off + 16:v.l4_off + 18]
    assert scapy_checksums_ok(bytes(complete(engine, f)))


def test_flow_table_rewrites_partial_frames(engine):
    t = engine.FlowTable()
    t.set(V4_A, 40000, V4_B, 80, C.REWRITE, new_dst=V4_C, new_dport=8080)
    f = make_partial(engine, eth_tcp4(payload=b"GET / HTTP/1.1\r\n\r\n", sport=40000, dport=80))
    assert t.classify(f, 1.0, partial_csum=True) == C.REWRITE
    v = engine.parse(f)
    assert (v.dst_ip, v.dport) == (V4_C, 8080)
    assert struct.unpack_from("!H", f, v.l4_off + 16)[0] == pseudo_sum(f, v)
    assert scapy_checksums_ok(bytes(complete(engine, f)))
    # the same frame without partial_csum is an ordinary frame: its checksum is kept valid
    g = bytearray(eth_tcp4(payload=b"abc", sport=40000, dport=80))
    t.classify(g, 2.0)
    assert scapy_checksums_ok(bytes(g))


def test_batch_rewrites_partial_frames(engine):
    import array
    t = engine.FlowTable()
    t.set(V6_A, 40001, V6_B, 80, C.REWRITE, new_dst=V6_C)
    frames = [make_partial(engine, eth_tcp6(payload=bytes([i]) * (i + 1), sport=40001, dport=80)) for i in range(5)]
    buf = bytearray(b"".join(frames))
    offsets = array.array("I", [sum(len(x) for x in frames[:i]) for i in range(5)])
    lengths = array.array("I", [len(x) for x in frames])
    verdicts = bytearray(5)
    assert t.process_batch(buf, offsets, lengths, verdicts, 0.0, partial_csum=True) == 5
    assert list(verdicts) == [C.REWRITE] * 5
    for i in range(5):
        f = bytearray(buf[offsets[i]:offsets[i] + lengths[i]])
        v = engine.parse(f)
        assert v.dst_ip == V6_C
        assert scapy_checksums_ok(bytes(complete(engine, f)))
