"""Pure-Python twin of the compiled packet engine (`_cengine.pyx`): same API, same answers.

Used when there is no compiler or APPLIANCE_PUREPYTHON=1 is set, and as the reference the
fuzz tests compare the compiled build against. Offsets in a FrameView count from the start
of the frame; a view reads addresses and options from the frame it was parsed from.
"""

from __future__ import annotations

import collections
import itertools
import struct
import threading
from hmac import compare_digest as _compare_digest

from ._common import (
    ACK, DROP, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, Err, FIN, Flow, FrameError,
    HAS_MIGRATE, HAS_MIGRATE_PERMITTED, HAS_MSS, HAS_SACK, HAS_SACK_PERMITTED, HAS_TIMESTAMPS,
    HAS_WSCALE, MAX_CAPACITY, IPPROTO_TCP, IPPROTO_UDP, IS_FRAGMENT, LINK_ETHERNET, LINK_RAW, MASK32,
    EXID_MIGRATE, EXID_MIGRATE_PERMITTED, MAX_TCP_OPTIONS, MIGRATE_LEN, MIGRATE_PERMITTED_LEN,
    MIGRATE_PERMITTED_SECURE_LEN, N_ERRORS, OPT_EOL, OPT_EXP1, OPT_EXP2, OPT_MSS, OPT_NOP, OPT_SACK,
    OPT_SACK_PERMITTED, OPT_TIMESTAMPS, OPT_WSCALE, PASS, PYTHON, RECORD_FORMAT, RECORD_SIZE,
    REWRITE, RST, STAT_NAMES, SYN, address_text, check_option, check_port, check_u32, check_verdict, list_options,
    make_builders,
    pack_address,
)
from . import _common
from ._common import (
    CT_CLOSED_BY, CT_GAUGE_NAMES, CT_REASONS, CT_STAT_NAMES, CT_STATES, EV_CLOSED, EV_ESTABLISHED, EV_FORGOTTEN,
    HAS_MIGRATE as _HAS_MIGRATE, IN, MIGRATE_PERMITTED_OPTION, OUT, Conn, SynOptions, check_conn,
    check_conntrack_config, check_direction, migrate_token,
)

BUILD = "py"

_IPV6_EXT_HEADERS = (0, 43, 60, 51, 44)  # hop-by-hop, routing, destination, AH, fragment
_MAX_IPV6_EXT = 8
_H = struct.Struct("!H")
_I = struct.Struct("!I")
_IPV4 = struct.Struct("!BBHHHBBH")
_TCP = struct.Struct("!HHIIBBHHH")
_RECORD = struct.Struct(RECORD_FORMAT)


class FrameView:
    """Offsets and fields of one parsed frame; error is Err.OK when it parsed."""

    __slots__ = (
        "frame", "error", "link", "vlan", "ethertype", "ip_version", "l3_off", "ip_end", "ip_proto",
        "ttl", "l4_off", "sport", "dport", "seq", "ack", "tcp_hdr_len", "flags", "window", "checksum",
        "urgent", "payload_off", "payload_len", "opts", "mss", "wscale", "tsval", "tsecr", "ts_off",
        "sack_off", "sack_count", "mp_curve", "migrate_preload", "migrate_reqno", "migrate_token",
        "migrate_request", "unknown_options", "pseudo_dst_off",
    )

    def __init__(self, frame, link: int) -> None:
        self.frame = frame
        self.link = link
        self.error = Err.OK
        self.vlan = -1
        self.ethertype = 0
        self.ip_version = 0
        self.l3_off = self.ip_end = self.ip_proto = self.ttl = self.l4_off = 0
        self.sport = self.dport = self.seq = self.ack = self.tcp_hdr_len = self.flags = 0
        self.window = self.checksum = self.urgent = self.payload_off = self.payload_len = 0
        self.opts = self.mss = self.tsval = self.tsecr = self.sack_count = self.unknown_options = 0
        self.wscale = self.ts_off = self.sack_off = self.mp_curve = -1
        self.pseudo_dst_off = 0
        self.migrate_preload = False
        self.migrate_reqno = self.migrate_token = self.migrate_request = 0

    @property
    def ok(self) -> bool:
        return self.error == Err.OK

    @property
    def is_tcp(self) -> bool:
        return self.error == Err.OK and self.ip_proto == IPPROTO_TCP and not self.opts & IS_FRAGMENT

    @property
    def is_fragment(self) -> bool:
        return bool(self.opts & IS_FRAGMENT)

    @property
    def src(self) -> bytes:
        if self.ip_version == 4:
            return bytes(self.frame[self.l3_off + 12:self.l3_off + 16])
        if self.ip_version == 6:
            return bytes(self.frame[self.l3_off + 8:self.l3_off + 24])
        return b""

    @property
    def dst(self) -> bytes:
        if self.ip_version == 4:
            return bytes(self.frame[self.l3_off + 16:self.l3_off + 20])
        if self.ip_version == 6:
            return bytes(self.frame[self.l3_off + 24:self.l3_off + 40])
        return b""

    @property
    def src_ip(self) -> str:
        return address_text(self.src) if self.ip_version else ""

    @property
    def dst_ip(self) -> str:
        return address_text(self.dst) if self.ip_version else ""

    @property
    def sack_blocks(self) -> tuple:
        f, o = self.frame, self.sack_off
        return tuple((_I.unpack_from(f, o + 8 * i)[0], _I.unpack_from(f, o + 8 * i + 4)[0])
                     for i in range(self.sack_count))

    @property
    def payload(self) -> bytes:
        return bytes(self.frame[self.payload_off:self.payload_off + self.payload_len])

    def options(self) -> list:
        """Every TCP option as (kind, offset, length); NOP and EOL included, length 1."""
        return list_options(self.frame, self.l4_off, self.tcp_hdr_len) if self.is_tcp else []

    def __repr__(self) -> str:
        if self.error:
            return f"<FrameView {Err(self.error).name}>"
        if not self.ip_version:
            return f"<FrameView ethertype=0x{self.ethertype:04x}>"
        if self.is_tcp:
            return (f"<FrameView TCP {self.src_ip}:{self.sport} > {self.dst_ip}:{self.dport} "
                    f"flags=0x{self.flags:02x} seq={self.seq} ack={self.ack} len={self.payload_len}>")
        return f"<FrameView IPv{self.ip_version} proto={self.ip_proto} {self.src_ip} > {self.dst_ip}>"


def _parse(v: FrameView, f, n: int) -> None:
    """Fill v from frame f of n bytes; stops at the first error."""
    off = 0
    if v.link == LINK_ETHERNET:
        if n < 14:
            v.error = Err.TRUNCATED_ETHERNET
            return
        et = (f[12] << 8) | f[13]
        off = 14
        tags = 0
        while et in (ETH_P_8021Q, ETH_P_8021AD) and tags < 2:
            if n < off + 4:
                v.error = Err.TRUNCATED_ETHERNET
                return
            if v.vlan < 0:
                v.vlan = ((f[off] << 8) | f[off + 1]) & 0x0FFF
            et = (f[off + 2] << 8) | f[off + 3]
            off += 4
            tags += 1
        v.ethertype = et
        if et == ETH_P_IP:
            version = 4
        elif et == ETH_P_IPV6:
            version = 6
        else:
            return
    else:
        if n < 1:
            v.error = Err.TRUNCATED_IP
            return
        version = f[0] >> 4
        if version not in (4, 6):
            v.error = Err.BAD_IP_VERSION
            return
        v.ethertype = ETH_P_IP if version == 4 else ETH_P_IPV6
    v.l3_off = off
    if version == 4:
        if n - off < 20:
            v.error = Err.TRUNCATED_IP
            return
        if f[off] >> 4 != 4:
            v.error = Err.BAD_IP_VERSION
            return
        ihl = (f[off] & 0x0F) * 4
        if ihl < 20 or off + ihl > n:
            v.error = Err.BAD_IHL
            return
        total = (f[off + 2] << 8) | f[off + 3]
        if total < ihl or off + total > n:
            v.error = Err.BAD_IP_LENGTH
            return
        v.ip_version = 4
        v.ip_end = off + total
        v.pseudo_dst_off = off + 16
        v.ttl = f[off + 8]
        proto = f[off + 9]
        frag = ((f[off + 6] << 8) | f[off + 7]) & 0x3FFF  # MF + offset
        l4 = off + ihl
        if frag:
            v.opts |= IS_FRAGMENT
            if frag & 0x1FFF:  # not the first fragment: no L4 header here
                v.ip_proto = proto
                v.l4_off = l4
                return
    else:
        if n - off < 40:
            v.error = Err.TRUNCATED_IP
            return
        if f[off] >> 4 != 6:
            v.error = Err.BAD_IP_VERSION
            return
        plen = (f[off + 4] << 8) | f[off + 5]
        if plen == 0 or off + 40 + plen > n:  # jumbograms are not supported
            v.error = Err.BAD_IP_LENGTH
            return
        v.ip_version = 6
        v.ip_end = end = off + 40 + plen
        v.pseudo_dst_off = off + 24
        v.ttl = f[off + 7]
        proto = f[off + 6]
        l4 = off + 40
        count = 0
        while proto in _IPV6_EXT_HEADERS:
            count += 1
            if count > _MAX_IPV6_EXT or l4 + 8 > end:
                v.error = Err.BAD_IPV6_EXTENSION
                return
            nxt = f[l4]
            if proto == 44:
                fo = (f[l4 + 2] << 8) | f[l4 + 3]
                if fo & 0xFFF9:  # offset or M set; an atomic fragment is a whole packet (RFC 6946)
                    v.opts |= IS_FRAGMENT
                if fo & 0xFFF8:
                    v.ip_proto = nxt
                    v.l4_off = l4 + 8
                    return
                hlen = 8
            elif proto == 51:
                hlen = (f[l4 + 1] + 2) * 4
            else:
                hlen = (f[l4 + 1] + 1) * 8
            if l4 + hlen > end:
                v.error = Err.BAD_IPV6_EXTENSION
                return
            if proto == 43 and f[l4 + 3] and hlen >= 24:
                # RFC 8200 8.1: in transit, the pseudo-header carries the final destination
                if f[l4 + 2] == 4:
                    v.pseudo_dst_off = l4 + 8
                elif f[l4 + 2] in (0, 2):
                    v.pseudo_dst_off = l4 + 8 + ((hlen - 8) // 16 - 1) * 16
            l4 += hlen
            proto = nxt
    v.ip_proto = proto
    v.l4_off = l4
    end = v.ip_end
    if proto == IPPROTO_UDP:
        if end - l4 < 8:
            v.error = Err.TRUNCATED_L4
            return
        v.sport = (f[l4] << 8) | f[l4 + 1]
        v.dport = (f[l4 + 2] << 8) | f[l4 + 3]
        v.payload_off = l4 + 8
        v.payload_len = end - l4 - 8
        return
    if proto != IPPROTO_TCP:
        return
    if end - l4 < 20:
        v.error = Err.TRUNCATED_L4
        return
    (v.sport, v.dport, v.seq, v.ack, doff, v.flags, v.window, v.checksum, v.urgent) = _TCP.unpack_from(f, l4)
    hlen = (doff >> 4) * 4
    if hlen < 20 or l4 + hlen > end:
        v.error = Err.BAD_TCP_OFFSET
        return
    v.tcp_hdr_len = hlen
    v.payload_off = l4 + hlen
    v.payload_len = end - l4 - hlen
    _parse_options(v, f, l4 + 20, l4 + hlen)


def _parse_options(v: FrameView, f, i: int, end: int) -> None:
    while i < end:
        kind = f[i]
        if kind == OPT_EOL:
            return
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            v.error = Err.BAD_TCP_OPTION
            return
        length = f[i + 1]
        if length < 2 or i + length > end:
            v.error = Err.BAD_TCP_OPTION
            return
        if kind == OPT_MSS and length == 4:
            v.opts |= HAS_MSS
            v.mss = (f[i + 2] << 8) | f[i + 3]
        elif kind == OPT_WSCALE and length == 3:
            v.opts |= HAS_WSCALE
            v.wscale = f[i + 2]
        elif kind == OPT_SACK_PERMITTED and length == 2:
            v.opts |= HAS_SACK_PERMITTED
        elif kind == OPT_SACK and length >= 10 and (length - 2) % 8 == 0:
            v.opts |= HAS_SACK
            v.sack_off = i + 2
            v.sack_count = (length - 2) // 8
        elif kind == OPT_TIMESTAMPS and length == 10:
            v.opts |= HAS_TIMESTAMPS
            v.ts_off = i
            v.tsval = _I.unpack_from(f, i + 2)[0]
            v.tsecr = _I.unpack_from(f, i + 6)[0]
        elif (kind == OPT_EXP1 or kind == OPT_EXP2) and length >= 4:
            exid = (f[i + 2] << 8) | f[i + 3]
            if exid == EXID_MIGRATE_PERMITTED and length in (MIGRATE_PERMITTED_LEN, MIGRATE_PERMITTED_SECURE_LEN):
                v.opts |= HAS_MIGRATE_PERMITTED
                v.mp_curve = f[i + 4]
            elif exid == EXID_MIGRATE and length == MIGRATE_LEN:
                v.opts |= HAS_MIGRATE
                v.migrate_preload = bool(f[i + 4] & 0x80)
                v.migrate_reqno = f[i + 4] & 0x7F
                v.migrate_token = int.from_bytes(f[i + 5:i + 13], "big")
                v.migrate_request = int.from_bytes(f[i + 13:i + 21], "big")
            else:
                v.unknown_options += 1
        else:
            v.unknown_options += 1
        i += length


def parse(frame, link: int = LINK_ETHERNET) -> FrameView:
    """Parse an Ethernet frame (or, with LINK_RAW, an IP packet); never raises on bad input."""
    if isinstance(frame, str):
        raise TypeError("parse() needs a bytes-like frame, not str")
    v = FrameView(frame, link)
    _parse(v, frame, len(frame))
    return v


def parse_batch(buf, offsets, lengths, records, count: int = -1, link: int = LINK_ETHERNET) -> int:
    """Parse count frames of buf (buf[offsets[i]:offsets[i]+lengths[i]]) into fixed records."""
    n = _batch_count(buf, offsets, lengths, count, len(memoryview(records).cast("B")) // RECORD_SIZE)
    mv = memoryview(buf)
    out = memoryview(records).cast("B")
    for i in range(n):
        v = parse(mv[offsets[i]:offsets[i] + lengths[i]], link)
        _RECORD.pack_into(out, i * RECORD_SIZE, v.error, v.ip_version, v.ip_proto & 0xFF, v.flags,
                          v.l3_off, v.l4_off, v.payload_off, v.sport, v.dport, v.window, v.payload_len,
                          v.seq, v.ack, v.tsval, v.tsecr, v.mss, v.wscale & 0xFF, v.opts)
    return n


def _batch_count(buf, offsets, lengths, count: int, limit: int) -> int:
    n = min(len(offsets), len(lengths), limit)
    if count >= 0:
        if count > n:
            raise ValueError(f"count {count} exceeds the {n} frames the arrays describe")
        n = count
    size = len(memoryview(buf).cast("B"))
    for i in range(n):
        if offsets[i] + lengths[i] > size:
            raise ValueError(f"frame {i} runs past the end of the buffer")
    return n


# --- Checksums --------------------------------------------------------------------------


def _sum16(data) -> int:
    """Ones' complement sum of data as 16-bit big-endian words (not inverted), 0..0xFFFF."""
    b = bytes(data)
    if len(b) & 1:
        b += b"\0"
    x = int.from_bytes(b, "big")
    if not x:
        return 0
    r = x % 0xFFFF  # 2**16 == 1 (mod 0xFFFF): the end-around carry, all at once
    return r or 0xFFFF


def internet_checksum(data, initial: int = 0) -> int:
    """RFC 1071 checksum of data; initial is a partial (uninverted) sum to add in."""
    s = _sum16(data) + initial
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def csum_update16(csum: int, old: int, new: int) -> int:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for one 16-bit field."""
    s = (~csum & 0xFFFF) + (~old & 0xFFFF) + (new & 0xFFFF)
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def csum_update32(csum: int, old: int, new: int) -> int:
    return csum_update16(csum_update16(csum, old >> 16, new >> 16), old & 0xFFFF, new & 0xFFFF)


def csum_update_bytes(csum: int, old: bytes, new: bytes) -> int:
    """Update a checksum for an even-length field that changed from old to new."""
    if len(old) != len(new) or len(old) & 1:
        raise ValueError("old and new must have the same even length")
    for i in range(0, len(old), 2):
        csum = csum_update16(csum, (old[i] << 8) | old[i + 1], (new[i] << 8) | new[i + 1])
    return csum


def _pseudo_sum(f, v: FrameView) -> int:
    l4len = v.ip_end - v.l4_off
    if v.ip_version == 4:
        return _sum16(bytes(f[v.l3_off + 12:v.l3_off + 20]) + struct.pack("!BBH", 0, v.ip_proto, l4len))
    return _sum16(bytes(f[v.l3_off + 8:v.l3_off + 24]) + bytes(f[v.pseudo_dst_off:v.pseudo_dst_off + 16])
                  + struct.pack("!IxxxB", l4len, v.ip_proto))


def _l4_checksum(f, v: FrameView, field: int) -> int:
    """The correct L4 checksum, computed with the checksum field taken as zero."""
    seg = bytearray(f[v.l4_off:v.ip_end])
    seg[field - v.l4_off:field - v.l4_off + 2] = b"\0\0"
    return internet_checksum(seg, _pseudo_sum(f, v))


def _checked(frame, link: int) -> FrameView:
    v = parse(frame, link)
    if v.error:
        raise FrameError(v.error)
    return v


def _l4_field(v: FrameView) -> int:
    if v.opts & IS_FRAGMENT or v.ip_proto not in (IPPROTO_TCP, IPPROTO_UDP):
        return -1
    return v.l4_off + (16 if v.ip_proto == IPPROTO_TCP else 6)


def ipv4_header_checksum(frame, link: int = LINK_ETHERNET) -> int:
    """The correct IPv4 header checksum of frame (the field taken as zero)."""
    v = _checked(frame, link)
    if v.ip_version != 4:
        raise ValueError("not an IPv4 packet")
    hdr = bytearray(frame[v.l3_off:v.l3_off + (frame[v.l3_off] & 0x0F) * 4])
    hdr[10:12] = b"\0\0"
    return internet_checksum(hdr)


def tcp_checksum(frame, link: int = LINK_ETHERNET) -> int:
    """The correct TCP (or UDP) checksum of frame, over the IPv4 or IPv6 pseudo-header."""
    v = _checked(frame, link)
    field = _l4_field(v)
    if field < 0:
        raise ValueError("not an unfragmented TCP or UDP packet")
    c = _l4_checksum(frame, v, field)
    if v.ip_proto == IPPROTO_UDP and c == 0:
        c = 0xFFFF
    return c


def _ipv4_header_ok(f, v: FrameView) -> bool:
    """An IPv4 header sums to 0xFFFF with its checksum (either zero form accepted)."""
    return _sum16(f[v.l3_off:v.l3_off + (f[v.l3_off] & 0x0F) * 4]) == 0xFFFF


def _l4_ok(f, v: FrameView, field: int) -> bool:
    """The TCP/UDP checksum verifies over the pseudo-header; a zero UDP/IPv4 one is unchecked."""
    if v.ip_proto == IPPROTO_UDP and v.ip_version == 4 and f[field] == 0 and f[field + 1] == 0:
        return True
    return _sum16(f[v.l4_off:v.ip_end]) + _pseudo_sum(f, v) in (0xFFFF, 0x1FFFE)


def verify_checksums(frame, link: int = LINK_ETHERNET) -> tuple:
    """(ip_ok, l4_ok): IPv6 has no header checksum, and an unchecked L4 counts as ok."""
    v = _checked(frame, link)
    ip_ok = True
    if v.ip_version == 4:
        ip_ok = _ipv4_header_ok(frame, v)
    field = _l4_field(v)
    if field < 0:
        return ip_ok, True
    return ip_ok, _l4_ok(frame, v, field)


def fix_checksums(frame, link: int = LINK_ETHERNET) -> None:
    """Recompute the IPv4 header checksum and the TCP/UDP checksum in place."""
    v = _checked(frame, link)
    if v.ip_version == 4:
        _H.pack_into(frame, v.l3_off + 10, 0)
        ihl = (frame[v.l3_off] & 0x0F) * 4
        _H.pack_into(frame, v.l3_off + 10, internet_checksum(frame[v.l3_off:v.l3_off + ihl]))
    field = _l4_field(v)
    if field >= 0:
        c = _l4_checksum(frame, v, field)
        if v.ip_proto == IPPROTO_UDP and c == 0:
            c = 0xFFFF
        _H.pack_into(frame, field, c)


# --- In-place rewrites ------------------------------------------------------------------


def _put16(frame, off: int, value: int, csum_off: int) -> None:
    old = (frame[off] << 8) | frame[off + 1]
    _H.pack_into(frame, off, value)
    if csum_off >= 0:
        _H.pack_into(frame, csum_off, csum_update16((frame[csum_off] << 8) | frame[csum_off + 1], old, value))


def _put32(frame, off: int, value: int, csum_off: int) -> None:
    old = _I.unpack_from(frame, off)[0]
    _I.pack_into(frame, off, value & MASK32)
    if csum_off >= 0:
        _H.pack_into(frame, csum_off, csum_update32((frame[csum_off] << 8) | frame[csum_off + 1], old, value & MASK32))


def _put32_any(frame, base: int, off: int, value: int, csum_off: int) -> None:
    """Write a 32-bit field at any offset; the update covers the 16-bit words (counted from
    base, the L4 header) the field overlaps, so odd offsets work too."""
    a = off - ((off - base) & 1)
    e = off + 4
    e += (e - base) & 1
    old = bytes(frame[a:e])
    _I.pack_into(frame, off, value & MASK32)
    _H.pack_into(frame, csum_off, csum_update_bytes((frame[csum_off] << 8) | frame[csum_off + 1], old,
                                                     bytes(frame[a:e])))


def _replace_address(frame, off: int, new: bytes, l4_csum: int, ip_csum: int, l4_partial: bool) -> None:
    old = bytes(frame[off:off + len(new)])
    frame[off:off + len(new)] = new
    if ip_csum >= 0:
        _H.pack_into(frame, ip_csum, csum_update_bytes((frame[ip_csum] << 8) | frame[ip_csum + 1], old, new))
    if l4_csum >= 0:
        c = (frame[l4_csum] << 8) | frame[l4_csum + 1]
        if l4_partial:  # an uncomplemented sum S: S' = S + ~m + m' = ~update(~S)
            c = ~csum_update_bytes(~c & 0xFFFF, old, new) & 0xFFFF
        else:
            c = csum_update_bytes(c, old, new)
        _H.pack_into(frame, l4_csum, c)


def _rewrite_view(frame, v: FrameView, src, sport, dst, dport, partial: bool = False) -> None:
    """Rewrite addresses/ports of a parsed TCP/UDP frame with incremental checksum updates.

    partial: the L4 checksum field holds a pseudo-header sum left for offload (virtio
    NEEDS_CSUM): addresses move it by the uncomplemented delta, ports do not touch it.
    """
    field = _l4_field(v)
    l4c = field
    if not partial and v.ip_proto == IPPROTO_UDP and v.ip_version == 4 and frame[field] == 0 and frame[field + 1] == 0:
        l4c = -1  # no UDP checksum to maintain
    alen = 4 if v.ip_version == 4 else 16
    base = v.l3_off + (12 if v.ip_version == 4 else 8)
    ipc = v.l3_off + 10 if v.ip_version == 4 else -1
    if src is not None:
        _replace_address(frame, base, src, l4c, ipc, partial)
    if dst is not None:
        keep_l4 = v.pseudo_dst_off != base + alen  # the pseudo-header uses a routing header's address
        _replace_address(frame, base + alen, dst, -1 if keep_l4 else l4c, ipc, partial)
    port_csum = -1 if partial else l4c
    if sport is not None and sport >= 0:  # -1: a flow entry's "unchanged"
        _put16(frame, v.l4_off, sport, port_csum)
    if dport is not None and dport >= 0:
        _put16(frame, v.l4_off + 2, dport, port_csum)
    if not partial and l4c >= 0 and v.ip_proto == IPPROTO_UDP and frame[l4c] == 0 and frame[l4c + 1] == 0:
        _H.pack_into(frame, l4c, 0xFFFF)


def _family_address(v: FrameView, addr):
    if addr is None:
        return None
    packed = pack_address(addr)
    if len(packed) != (4 if v.ip_version == 4 else 16):
        raise ValueError("the new address is not of the frame's IP version")
    return packed


def rewrite_addresses(frame, src=None, sport=None, dst=None, dport=None, link: int = LINK_ETHERNET,
                      partial_csum: bool = False) -> None:
    """Rewrite addresses and ports of a TCP or UDP frame in place, checksums updated.

    partial_csum: the L4 checksum field holds a pseudo-header sum left for offload
    (PACKET_VNET_HDR with NEEDS_CSUM); it is kept a correct pseudo-header sum.
    """
    check_port(sport, "sport")
    check_port(dport, "dport")
    v = _checked(frame, link)
    if _l4_field(v) < 0:
        raise ValueError("not an unfragmented TCP or UDP packet")
    _rewrite_view(frame, v, _family_address(v, src), sport, _family_address(v, dst), dport, partial_csum)


def rewrite_tcp(frame, seq=None, ack=None, window=None, tsval=None, tsecr=None, link: int = LINK_ETHERNET) -> None:
    """Rewrite seq, ack, window and timestamp values of a TCP frame in place."""
    for name, value in (("seq", seq), ("ack", ack), ("tsval", tsval), ("tsecr", tsecr)):
        check_u32(value, name)
    check_u32(window, "window", 16)
    v = _checked(frame, link)
    if not v.is_tcp:
        raise ValueError("not an unfragmented TCP packet")
    if (tsval is not None or tsecr is not None) and v.ts_off < 0:
        raise ValueError("the segment carries no timestamps option")
    c = v.l4_off + 16
    if seq is not None:
        _put32(frame, v.l4_off + 4, seq, c)
    if ack is not None:
        _put32(frame, v.l4_off + 8, ack, c)
    if window is not None:
        _put16(frame, v.l4_off + 14, window, c)
    if tsval is not None:
        _put32_any(frame, v.l4_off, v.ts_off + 2, tsval, c)
    if tsecr is not None:
        _put32_any(frame, v.l4_off, v.ts_off + 6, tsecr, c)


def insert_option(frame: bytearray, option: bytes, link: int = LINK_ETHERNET) -> bool:
    """Append a TCP option (NOP-aligned) to a segment's options; False, untouched, if no room."""
    if not isinstance(frame, bytearray):
        raise TypeError("insert_option needs a bytearray (the frame grows)")
    v = _checked(frame, link)
    if not v.is_tcp:
        raise ValueError("not an unfragmented TCP packet")
    start, end = v.l4_off + 20, v.l4_off + v.tcp_hdr_len
    used = start
    while used < end and frame[used] != OPT_EOL:  # options before an EOL stay, padding goes
        used += 1 if frame[used] == OPT_NOP else frame[used + 1]
    opt = check_option(option)
    pad = -(used - start + len(opt)) % 4
    new_opts = bytes(frame[start:used]) + bytes((OPT_NOP,)) * pad + opt
    if len(new_opts) > MAX_TCP_OPTIONS:
        return False
    grow = len(new_opts) - (end - start)
    frame[start:end] = new_opts
    frame[v.l4_off + 12] = ((20 + len(new_opts)) // 4) << 4 | (frame[v.l4_off + 12] & 0x0F)
    if v.ip_version == 4:
        _H.pack_into(frame, v.l3_off + 2, v.ip_end - v.l3_off + grow)
    else:
        _H.pack_into(frame, v.l3_off + 4, v.ip_end - v.l3_off - 40 + grow)
    fix_checksums(frame, link)
    return True


build_tcp, build_migrate_syn, build_migrate_synack, build_rst = make_builders(fix_checksums)


# --- Flow table -------------------------------------------------------------------------


class _Entry:
    __slots__ = ("verdict", "new_src", "new_sport", "new_dst", "new_dport", "punt_flags", "frames", "bytes",
                 "last_seen", "flags_seen", "seq_next", "seq_seen", "ack", "ack_seen", "window", "tsval", "tsecr",
                 "ts_seen", "sack", "ignored", "conn", "role", "awaiting_ack")

    def __init__(self) -> None:
        self.conn = None  # conntrack: the _Conn this entry is one direction of
        self.role = 0  # _C2S or _S2C
        self.seq_seen = self.ack_seen = False  # ack_seen: flags_seen & ACK may come from a refused ack
        self.awaiting_ack = False  # conntrack, client flow: the SYN/ACK was seen, the client's ACK not yet
        self.frames = self.bytes = self.flags_seen = self.seq_next = self.ack = self.window = 0
        self.tsval = self.tsecr = self.ignored = 0
        self.ts_seen = False
        self.sack = ()
        self.last_seen = 0.0


def _flow_key(src, sport: int, dst, dport: int) -> tuple:
    s, d = pack_address(src), pack_address(dst)
    if len(s) != len(d):
        raise ValueError("a flow's addresses must both be IPv4 or both IPv6")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError("ports are 0..65535")
    return s, sport, d, dport


class FlowTable:
    """Per-4-tuple verdicts for TCP frames, plus what each flow's frames carried last.

    A TCP frame of a known flow goes to Python if its flags meet the entry's punt_flags,
    otherwise it gets the entry's verdict, REWRITE rewriting addresses and ports in place.
    It is counted, and tracked (latest ack, window, SACK blocks, timestamps, highest
    sequence) because a takeover resumes the connection from those, so only what a
    receiver would accept moves them: a frame with a bad checksum (partial_csum frames
    are the kernel's to complete and pass) is counted in `ignored` and untracked_bad_csum;
    an ack past the peer entry's seq_next (the peer: the reverse of the rewritten tuple)
    is refused, counted in ack_beyond_sent; a DROPped frame does not advance seq_next.
    Unknown flows get default_verdict (default_punt applies likewise), frames that are
    not TCP get nontcp_verdict, and malformed frames get malformed_verdict, counted by kind.

    conntrack=True: the engine also tracks connections from frames of known direction
    (classify(..., direction=OUT/IN)): it tags client SYNs with Migrate-Permitted, records
    each connection (both ISNs and option sets, the MACs, the Migrate Token), bounds
    half-open ones (max_half_open, oldest evicted) and all (max_connections), and forgets
    them in expire(); see connection(), find_token(), events(), pin(), forget(),
    restore_connection(). The compiled build does the same in C, in the same order.
    """

    def __init__(self, capacity: int = 1024, default_verdict: int = PASS, default_punt: int = 0,
                 nontcp_verdict: int = PASS, malformed_verdict: int = PASS, link: int = LINK_ETHERNET,
                 conntrack: bool = False, max_connections: int = 100_000, max_half_open: int = 10_000,
                 half_open_timeout: float = 5.0, idle_timeout: float = 600.0, closed_linger: float = 10.0,
                 tag_syns: bool = True, event_capacity: int = 4096) -> None:
        (self._conntrack, self._max_connections, self._max_half_open, self._half_open_timeout,
         self._idle_timeout, self._closed_linger, self._tag_syns, self._event_capacity) = check_conntrack_config(
            conntrack, max_connections, max_half_open, half_open_timeout, idle_timeout, closed_linger, tag_syns,
            event_capacity)
        if capacity < 1:
            raise ValueError("capacity must be positive")
        if capacity > MAX_CAPACITY:
            raise ValueError(f"capacity is at most {MAX_CAPACITY} flows")
        self._flows: dict = {}
        self._lock = threading.RLock()  # forwarding threads share the table with the control plane
        self._default_verdict = check_verdict(default_verdict, "default_verdict")
        if default_verdict == REWRITE:
            raise ValueError("default_verdict cannot be REWRITE (there is nothing to rewrite to)")
        self._default_punt = default_punt & 0xFF
        self._nontcp_verdict = check_verdict(nontcp_verdict, "nontcp_verdict")
        self._malformed_verdict = check_verdict(malformed_verdict, "malformed_verdict")
        if REWRITE in (nontcp_verdict, malformed_verdict):
            raise ValueError("nontcp_verdict and malformed_verdict cannot be REWRITE")
        if link not in (LINK_ETHERNET, LINK_RAW):
            raise ValueError("link must be LINK_ETHERNET or LINK_RAW")
        self._link = link
        self._events = collections.deque()
        self._serial = 0
        self._ct_reset()
        self.reset_stats()

    # Read-only, as in the compiled build.
    default_verdict = property(lambda self: self._default_verdict)
    default_punt = property(lambda self: self._default_punt)
    nontcp_verdict = property(lambda self: self._nontcp_verdict)
    malformed_verdict = property(lambda self: self._malformed_verdict)
    link = property(lambda self: self._link)
    conntrack = property(lambda self: self._conntrack)
    max_connections = property(lambda self: self._max_connections)
    max_half_open = property(lambda self: self._max_half_open)
    half_open_timeout = property(lambda self: self._half_open_timeout)
    idle_timeout = property(lambda self: self._idle_timeout)
    closed_linger = property(lambda self: self._closed_linger)
    tag_syns = property(lambda self: self._tag_syns)
    event_capacity = property(lambda self: self._event_capacity)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = dict.fromkeys(STAT_NAMES, 0)
            self._errors = [0] * N_ERRORS
            self._cst = dict.fromkeys(CT_STAT_NAMES, 0)

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._stats)
            out["errors"] = {Err(i).name: n for i, n in enumerate(self._errors) if i}
            if self._conntrack:
                out.update(self._cst)
                out.update(zip(CT_GAUGE_NAMES, (self._ct_count, *self._n_state, self._n_pinned, self._n_tokens)))
        return out

    def __len__(self) -> int:
        return len(self._flows)

    def set(self, src, sport: int, dst, dport: int, verdict: int = PASS, *, new_src=None, new_sport=None,
            new_dst=None, new_dport=None, punt_flags: int = 0) -> None:
        """Add a flow or change its verdict; counters and tracked state are kept.

        The rewrite fields are replaced (omitted ones cleared) whatever the verdict: on a
        DROP or PYTHON entry they still name the peer whose seq_next bounds its ack.
        """
        key = _flow_key(src, sport, dst, dport)
        verdict = check_verdict(verdict, "verdict")
        ns = pack_address(new_src) if new_src is not None else None
        nd = pack_address(new_dst) if new_dst is not None else None
        for a in (ns, nd):
            if a is not None and len(a) != len(key[0]):
                raise ValueError("a rewrite cannot change the IP version")
        for p in (new_sport, new_dport):
            if p is not None and not 0 <= p <= 0xFFFF:
                raise ValueError("ports are 0..65535")
        with self._lock:
            e = self._flows.get(key)
            if e is None:
                if len(self._flows) >= MAX_CAPACITY:
                    raise MemoryError(f"the flow table holds at most {MAX_CAPACITY} flows")
                e = self._flows[key] = _Entry()
            e.verdict = verdict
            e.new_src, e.new_dst = ns, nd
            e.new_sport = -1 if new_sport is None else new_sport
            e.new_dport = -1 if new_dport is None else new_dport
            e.punt_flags = punt_flags & 0xFF

    def get(self, src, sport: int, dst, dport: int):
        key = _flow_key(src, sport, dst, dport)
        with self._lock:
            e = self._flows.get(key)
            return None if e is None else self._snapshot(key, e)

    def remove(self, src, sport: int, dst, dport: int) -> bool:
        """Remove a flow. In conntrack mode, removing either flow of a tracked connection
        forgets the connection (both flows), as forget() does."""
        key = _flow_key(src, sport, dst, dport)
        with self._lock:
            e = self._flows.get(key)
            if e is not None and e.conn is not None:
                self._ct_forget(e.conn, 0, False)
                return True
            return self._flows.pop(key, None) is not None

    def clear(self) -> None:
        """Remove every flow (and, in conntrack mode, every connection; queued events stay)."""
        with self._lock:
            self._flows.clear()
            self._ct_reset()

    def keys(self) -> list:
        with self._lock:
            return list(self._flows)

    @staticmethod
    def _snapshot(key, e: _Entry) -> Flow:
        return Flow(key[0], key[1], key[2], key[3], e.verdict, e.new_src,
                    None if e.new_sport < 0 else e.new_sport, e.new_dst,
                    None if e.new_dport < 0 else e.new_dport, e.punt_flags, e.frames, e.bytes,
                    e.last_seen, e.flags_seen, e.seq_next, e.ack, e.window, e.tsval, e.tsecr, e.ts_seen,
                    e.sack, e.ignored)

    def classify(self, frame, now: float = 0.0, partial_csum: bool = False, direction=None) -> int:
        """Decide one frame, rewriting it in place when the verdict is REWRITE.

        partial_csum: the frame's L4 checksum is a pseudo-header sum left for offload.
        direction: OUT (client side -> network), IN, or None (unknown). A conntrack table
        tracks connections from the frames of a known direction; the frame cannot grow here,
        so a client SYN whose Migrate-Permitted tag needs more bytes is forwarded untagged
        (counted syns_no_room): classify_frame() has room to grow.
        """
        d = check_direction(direction)
        mv = memoryview(frame)
        if mv.readonly:  # as the compiled build: a writable buffer, always
            raise BufferError("classify() needs a writable buffer")
        with self._lock:
            if d < 0 or not self._conntrack:
                return self._classify(frame, now, partial_csum)
            mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
            return self._classify_ct(mv, len(mv), len(mv), now, partial_csum, d)[0]

    def classify_frame(self, buf, length: int, cap=None, now: float = 0.0, partial_csum: bool = False,
                       direction=None) -> tuple:
        """classify() for a frame of `length` bytes at the start of buf, which may grow in
        place up to cap bytes (default: all of buf) when a client SYN is tagged with
        Migrate-Permitted; returns (verdict, the frame's new length)."""
        d = check_direction(direction)
        mv = memoryview(buf)
        if mv.readonly:
            raise BufferError("classify_frame() needs a writable buffer")
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        cap = len(mv) if cap is None else cap
        if not (isinstance(length, int) and isinstance(cap, int) and 0 <= length <= cap <= len(mv)):
            raise ValueError("classify_frame() needs 0 <= length <= cap <= len(buf)")
        with self._lock:
            if d < 0 or not self._conntrack:
                return self._classify(mv[:length], now, partial_csum), length
            return self._classify_ct(mv[:cap], length, cap, now, partial_csum, d)

    def _classify(self, frame, now: float, partial_csum: bool) -> int:
        st = self._stats
        n = len(frame)
        st["frames"] += 1
        st["bytes"] += n
        v = FrameView(frame, self._link)
        _parse(v, frame, n)
        if v.error:
            st["malformed"] += 1
            self._errors[v.error] += 1
            verdict = self._malformed_verdict
        elif v.ip_proto != IPPROTO_TCP or v.opts & IS_FRAGMENT:
            st["non_tcp"] += 1
            verdict = self._nontcp_verdict
        else:
            key = (v.src, v.sport, v.dst, v.dport)
            e = self._flows.get(key)
            if e is None:
                st["misses"] += 1
                verdict = PYTHON if v.flags & self._default_punt else self._default_verdict
            else:
                st["hits"] += 1
                verdict = PYTHON if v.flags & e.punt_flags else e.verdict
                # verified before the rewrite touches the checksums; a partial one is the kernel's
                trusted = partial_csum or ((v.ip_version != 4 or _ipv4_header_ok(frame, v))
                                           and _l4_ok(frame, v, v.l4_off + 16))
                self._track(key, e, v, n, now, verdict, trusted)
                if verdict == REWRITE:
                    _rewrite_view(frame, v, e.new_src, e.new_sport, e.new_dst, e.new_dport, partial_csum)
        st[("passed", "rewritten", "dropped", "to_python")[verdict]] += 1
        return verdict

    def _peer(self, key: tuple, e: _Entry):
        """The entry of the other direction: the reverse of e's tuple as rewritten (the rewrite
        fields count whatever e's verdict: the control plane keeps them on DROP and PYTHON)."""
        return self._flows.get((key[2] if e.new_dst is None else e.new_dst,
                                key[3] if e.new_dport < 0 else e.new_dport,
                                key[0] if e.new_src is None else e.new_src,
                                key[1] if e.new_sport < 0 else e.new_sport))

    def _track(self, key: tuple, e: _Entry, v: FrameView, n: int, now: float, verdict: int,
               trusted: bool) -> None:
        """Count a frame of e and, if trusted, take what it says about the connection.

        Either would make a takeover resume at the wrong byte: a frame the receiver's kernel
        drops (bad checksum) moves nothing, and an ack of bytes the peer never sent is refused.
        """
        e.frames += 1
        e.bytes += n
        e.last_seen = now
        if not trusted:
            e.ignored += 1
            self._stats["untracked_bad_csum"] += 1
            return
        e.flags_seen |= v.flags
        if verdict != DROP and not v.flags & RST:  # a dropped segment was never sent on
            end = (v.seq + v.payload_len + (1 if v.flags & SYN else 0) + (1 if v.flags & FIN else 0)) & MASK32
            if not e.seq_seen or _common.seq_gt(end, e.seq_next):
                e.seq_next = end
                e.seq_seen = True
        if v.flags & ACK:
            taken = False
            if not e.ack_seen or _common.seq_ge(v.ack, e.ack):
                peer = self._peer(key, e)
                if peer is not None and peer.seq_seen and _common.seq_gt(v.ack, peer.seq_next):
                    e.ignored += 1
                    self._stats["ack_beyond_sent"] += 1
                else:
                    e.ack, e.window, e.ack_seen = v.ack, v.window, True
                    taken = True
            if v.opts & HAS_SACK and (taken or (e.ack_seen and v.ack == e.ack)):
                e.sack = v.sack_blocks[:4]
            elif taken:
                e.sack = ()
        if v.opts & HAS_TIMESTAMPS and (not e.ts_seen or _common.seq_ge(v.tsval, e.tsval)):
            e.tsval, e.tsecr, e.ts_seen = v.tsval, v.tsecr, True

    def process_batch(self, buf, offsets, lengths, verdicts, now: float = 0.0, count: int = -1,
                      partial_csum: bool = False, direction=None, caps=None, new_lengths=None) -> int:
        """classify() for count frames of buf, verdicts written to verdicts[i]; returns count.

        direction: as classify(). caps (optional): the bytes each frame may grow to in place
        (frame i owns buf[offsets[i]:offsets[i] + caps[i]]); new_lengths (optional, writable,
        uint32): each frame's length afterwards (needed with caps: a tagged SYN grows).
        """
        d = check_direction(direction)
        vmv = memoryview(verdicts).cast("B")
        n = _batch_count(buf, offsets, lengths, count, len(vmv))
        mv = memoryview(buf).cast("B")
        if mv.readonly:
            raise BufferError("process_batch() needs a writable buffer")
        _check_caps(len(mv), offsets, lengths, n, caps, new_lengths)
        with self._lock:
            if d < 0 or not self._conntrack:
                for i in range(n):
                    vmv[i] = self._classify(mv[offsets[i]:offsets[i] + lengths[i]], now, partial_csum)
                    if new_lengths is not None:
                        new_lengths[i] = lengths[i]
            else:
                for i in range(n):
                    cap = lengths[i] if caps is None else caps[i]
                    vmv[i], m = self._classify_ct(mv[offsets[i]:offsets[i] + cap], lengths[i], cap, now,
                                                  partial_csum, d)
                    if new_lengths is not None:
                        new_lengths[i] = m
        return n

    # --- connection tracking ----------------------------------------------------------
    #
    # Per connection: a _Conn, and its two flow entries (client->server, role _C2S, and
    # server->client, role _S2C) linked to it. Every live connection has both entries:
    # removing either forgets it. Lists (creation order of each state): half-open (SYN_SENT,
    # not pinned), established (not pinned; the idle sweep walks it from a cursor), closed
    # (not pinned, closing order); pinned connections are in none. _all: every connection in
    # creation order (connections()). The compiled build keeps the same lists in C, so both
    # builds expire, evict and report in the same order.

    def _ct_reset(self) -> None:
        self._all: dict = {}
        self._lists = [_List(), _List(), _List(), _List()]  # [unused, half-open, established, closed]
        self._cursor = None
        self._tokens: dict = {}
        self._ct_count = 0
        self._n_state = [0, 0, 0]
        self._n_pinned = 0
        self._n_tokens = 0

    def _lpush(self, c, which: int) -> None:
        lst = self._lists[which]
        c.lst, c.prev, c.next = which, lst.tail, None
        if lst.tail is not None:
            lst.tail.next = c
        else:
            lst.head = c
        lst.tail = c
        lst.len += 1

    def _lremove(self, c) -> None:
        if not c.lst:
            return
        lst = self._lists[c.lst]
        if self._cursor is c:
            self._cursor = c.next
        if c.prev is not None:
            c.prev.next = c.next
        else:
            lst.head = c.next
        if c.next is not None:
            c.next.prev = c.prev
        else:
            lst.tail = c.prev
        c.prev = c.next = None
        c.lst = 0
        lst.len -= 1

    def _state_list(self, c) -> int:
        return 0 if c.pinned else (_L_HALF, _L_EST, _L_CLOSED)[c.state]

    def _event(self, kind: str, c, reason: int = 0) -> None:
        if len(self._events) >= self._event_capacity:
            self._events.popleft()
            self._cst["events_dropped"] += 1
        self._events.append((kind, self._conn_tuple(c, reason)))

    def _conn_tuple(self, c, reason: int = 0) -> Conn:
        s, sp, d, dp = c.key
        return Conn(address_text(s), sp, address_text(d), dp, CT_STATES[c.state], c.created,
                    c.closed_at if c.state == _S_CLOSED else None, c.client_syn, c.server_syn, c.tagged,
                    c.token, c.macs[0] if c.macs else None, c.macs[1] if c.macs else None, c.pinned,
                    c.established_at, CT_CLOSED_BY[c.closed_by], CT_REASONS[reason])

    def _ct_forget(self, c, reason: int, emit: bool) -> None:
        """Remove a connection; only one that was established is an event (a SYN flood's
        never are: nothing was told of them, and their events would crowd out the others')."""
        if emit and c.established_at is not None:
            self._event(EV_FORGOTTEN, c, reason)
        self._lremove(c)
        del self._all[c]
        if c.token is not None:
            same = self._tokens[c.token]
            same.remove(c)
            if not same:
                del self._tokens[c.token]
            self._n_tokens -= 1
        k = c.key
        for key in (k, (k[2], k[3], k[0], k[1])):
            e = self._flows.get(key)
            if e is not None and e.conn is c:
                del self._flows[key]
        self._n_state[c.state] -= 1
        self._n_pinned -= c.pinned
        self._ct_count -= 1

    def _ct_make_room(self, half: bool) -> bool:
        """Evict the oldest half-open connections while a bound is reached; whether one more fits."""
        lists = self._lists
        while ((half and lists[_L_HALF].len >= self._max_half_open) or self._ct_count >= self._max_connections) \
                and lists[_L_HALF].head is not None:
            self._ct_forget(lists[_L_HALF].head, _R_EVICTED, True)
            self._cst["half_open_evicted"] += 1
        while self._ct_count >= self._max_connections and lists[_L_CLOSED].head is not None:
            self._ct_forget(lists[_L_CLOSED].head, _R_EVICTED, True)  # then the closed, lingering ones
            self._cst["closed_evicted"] += 1
        return self._ct_count < self._max_connections

    def _ct_new(self, key: tuple, state: int, created: float, client_syn, tagged: bool, macs, pinned: bool):
        c = _Conn()
        self._serial += 1
        c.key, c.serial, c.state, c.created, c.active = key, self._serial, state, created, created
        c.client_syn, c.tagged, c.macs, c.pinned = client_syn, tagged, macs, pinned
        self._all[c] = None
        self._n_state[state] += 1
        self._n_pinned += pinned
        self._ct_count += 1
        return c

    def _ct_link(self, c) -> None:
        """Both flow entries of c (created, or taken over), PASS with the engine's punt flags."""
        k = c.key
        for role, key in ((_C2S, k), (_S2C, (k[2], k[3], k[0], k[1]))):
            e = self._flows.get(key)
            if e is None:
                e = self._flows[key] = _Entry()
            e.verdict, e.new_src, e.new_dst, e.new_sport, e.new_dport = PASS, None, None, -1, -1
            e.punt_flags = RST if role == _S2C and c.token is not None else 0
            e.conn, e.role = c, role

    def _ct_token(self, c, isn_c: int, isn_s: int) -> None:
        c.token = migrate_token(isn_c, isn_s)
        self._tokens.setdefault(c.token, []).append(c)
        self._n_tokens += 1

    def _classify_ct(self, buf, n: int, cap: int, now: float, partial: bool, direction: int) -> tuple:
        """_classify() for a frame of known direction in a conntrack table: buf[:n] is the
        frame, buf[:cap] the room it may grow into; returns (verdict, new length)."""
        st, cst = self._stats, self._cst
        st["frames"] += 1
        st["bytes"] += n
        frame = buf[:n]
        v = FrameView(frame, self._link)
        _parse(v, frame, n)
        if v.error:
            st["malformed"] += 1
            self._errors[v.error] += 1
            verdict = self._malformed_verdict
        elif v.ip_proto != IPPROTO_TCP or v.opts & IS_FRAGMENT:
            st["non_tcp"] += 1
            verdict = self._nontcp_verdict
        else:
            key = (v.src, v.sport, v.dst, v.dport)
            e = self._flows.get(key)
            hit = e is not None
            flags = v.flags
            syn_only = flags & (SYN | ACK) == SYN
            synack = flags & (SYN | ACK | RST) == SYN | ACK
            force = -1
            trusted = None
            if direction == IN and syn_only and v.opts & _HAS_MIGRATE:
                force = PYTHON  # a Migrate SYN: always the control plane's
                cst["migrate_syns"] += 1
            elif direction == OUT and syn_only and not v.opts & _HAS_MIGRATE and (key[0] != key[2] or key[1] != key[3]):
                c = None if e is None else e.conn
                if e is None or (c is not None and e.role == _C2S and not c.pinned):
                    trusted = partial or ((v.ip_version != 4 or _ipv4_header_ok(frame, v)) and
                                          _l4_ok(frame, v, v.l4_off + 16))
                    m = self._client_syn(buf, n, cap, v, key, c, float(now), partial, trusted)
                    if m:
                        n = m
                        frame = buf[:n]
                        v = FrameView(frame, self._link)
                        _parse(v, frame, n)
                    e = self._flows.get(key)
            if e is None:
                st["misses"] += 1
                verdict = force if force >= 0 else PYTHON if flags & self._default_punt else self._default_verdict
                if direction == IN and synack:
                    cst["synacks_unmatched"] += 1
            else:
                st["hits" if hit else "misses"] += 1
                verdict = PYTHON if flags & e.punt_flags else e.verdict
                if force >= 0:
                    verdict = force
                if trusted is None:
                    trusted = partial or ((v.ip_version != 4 or _ipv4_header_ok(frame, v))
                                          and _l4_ok(frame, v, v.l4_off + 16))
                self._track(key, e, v, n, now, verdict, trusted)
                c = e.conn
                doomed = None
                if c is not None and (flags & (SYN | FIN | RST) or e.awaiting_ack) and not c.pinned:
                    doomed = self._ct_after(key, e, c, v, float(now), verdict, trusted, direction, synack)
                elif direction == IN and synack:
                    cst["synacks_unmatched"] += 1
                if verdict == REWRITE:
                    _rewrite_view(frame, v, e.new_src, e.new_sport, e.new_dst, e.new_dport, partial)
                if doomed is not None:
                    self._ct_forget(doomed, _R_CLOSED, True)
        st[("passed", "rewritten", "dropped", "to_python")[verdict]] += 1
        return verdict, n

    def _client_syn(self, buf, n: int, cap: int, v, key: tuple, c, now: float, partial: bool,
                    trusted: bool) -> int:
        """A client's SYN of an unknown flow, or of the connection c: tag it, record it.
        Returns the frame's new length when it was modified (tagged), else 0."""
        cst = self._cst
        cst["syns"] += 1
        mp = bool(v.opts & HAS_MIGRATE_PERMITTED)
        if mp:
            cst["syns_already_permitted"] += 1
        if not trusted:
            cst["syns_bad_checksum"] += 1  # its receiver drops it: the client sends it again
            return 0
        if c is not None:
            if c.client_syn.isn == v.seq:  # a retransmission: tagged as the first was
                cst["syns_retransmitted"] += 1
                if c.tagged and not mp:
                    m = _tag_syn(buf, n, cap, v, partial)
                    cst["syns_tagged" if m else "syns_no_room"] += 1
                    return m
                return 0
            if c.state == _S_ESTABLISHED:
                # not a new connection: the server answers with a challenge ACK (RFC 5961 4.2)
                # and the connection goes on; a client that really reuses the tuple resets it first
                cst["syns_on_established"] += 1
                return 0
            cst["syns_reused"] += 1  # another ISN: a new connection reusing the 4-tuple
            self._ct_forget(c, _R_REUSED, True)
        if not self._ct_make_room(True) or len(self._flows) + 2 > MAX_CAPACITY:
            cst["syns_untracked_full"] += 1
            return 0
        m = 0
        if not mp and self._tag_syns:
            m = _tag_syn(buf, n, cap, v, partial)
            cst["syns_tagged" if m else "syns_no_room"] += 1
        macs = (bytes(buf[6:12]), bytes(buf[0:6])) if self._link == LINK_ETHERNET else None
        c = self._ct_new(key, _S_SYN_SENT, now, _syn_options(v), bool(m), macs, False)
        self._lpush(c, _L_HALF)
        self._ct_link(c)
        return m

    def _ct_after(self, key: tuple, e, c, v, now: float, verdict: int, trusted: bool, direction: int,
                  synack: bool) -> None:
        """What a tracked frame of c says about the connection's state. Returns a connection to
        forget once the frame is done with (_ct_close), or None."""
        if direction == IN and e.role == _S2C and synack:
            self._synack(key, e, c, v, now, trusted)
        if e.awaiting_ack and c.state != _S_SYN_SENT:
            e.awaiting_ack = False
        if not trusted or c.state == _S_CLOSED:
            return None
        flags = v.flags
        if flags & RST:
            if verdict in (PASS, REWRITE):
                if e.role == _C2S and direction == OUT:
                    return self._ct_close(c, now, _BY_CLIENT_RST)
                elif e.role == _S2C and direction == IN:
                    return self._ct_close(c, now, _BY_SERVER_RST)
        elif e.awaiting_ack:
            # the client's ACK of the SYN/ACK (or any later segment of it: the ACK may be lost)
            if direction == OUT and e.role == _C2S and flags & ACK and not flags & SYN \
                    and c.server_syn is not None and _common.seq_gt(v.ack, c.server_syn.isn) and verdict != DROP:
                e.awaiting_ack = False
                self._established(c, now)
        elif flags & FIN and e.flags_seen & FIN:
            other = self._flows.get((key[2], key[3], key[0], key[1]))
            if other is not None and other.flags_seen & FIN:
                return self._ct_close(c, now, _BY_FIN)
        return None

    def _synack(self, key: tuple, e, c, v, now: float, trusted: bool) -> None:
        """The server's SYN/ACK: its ISN, options and the Migrate Token are recorded, but the
        connection stays half-open until the client acknowledges it (_established): a SYN
        flood's connections, answered by the server, never complete."""
        cst = self._cst
        if c.state == _S_SYN_SENT and c.server_syn is None:
            if trusted and v.ack == (c.client_syn.isn + 1) & MASK32:
                c.server_syn = _syn_options(v)
                if c.tagged or c.client_syn.migrate_permitted:
                    self._ct_token(c, c.client_syn.isn, v.seq)
                    e.punt_flags |= RST  # MIGRATE-WAIT: the control plane holds the server's RSTs
                client = self._flows.get((key[2], key[3], key[0], key[1]))
                if client is not None and client.conn is c:
                    client.awaiting_ack = True
                cst["synacks_matched"] += 1
            else:
                cst["synacks_unmatched"] += 1
        elif (c.state != _S_CLOSED and c.server_syn is not None and trusted and v.seq == c.server_syn.isn
              and v.ack == (c.client_syn.isn + 1) & MASK32):
            cst["synacks_retransmitted"] += 1
        else:
            cst["synacks_unmatched"] += 1

    def _established(self, c, now: float) -> None:
        """The client acknowledged the server's SYN/ACK: the handshake is complete."""
        self._n_state[_S_SYN_SENT] -= 1
        self._n_state[_S_ESTABLISHED] += 1
        c.state, c.established_at, c.active = _S_ESTABLISHED, now, now
        self._lremove(c)
        self._lpush(c, _L_EST)
        self._event(EV_ESTABLISHED, c)

    def _ct_close(self, c, now: float, by: int):
        """Close a connection; returns it if it is to be forgotten at once, when the frame is
        done with (it never completed its handshake: a flood's, refused by the client's RST,
        leaves nothing to linger), else None."""
        self._n_state[c.state] -= 1
        self._n_state[_S_CLOSED] += 1
        c.state, c.closed_at, c.closed_by = _S_CLOSED, now, by
        self._lremove(c)
        self._lpush(c, _L_CLOSED)
        self._cst["closed_" + CT_CLOSED_BY[by]] += 1
        if c.established_at is None:
            return c
        self._event(EV_CLOSED, c)
        return None

    def _conn_of(self, src, sport: int, dst, dport: int):
        e = self._flows.get(_flow_key(src, sport, dst, dport))
        return e.conn if e is not None and e.role == _C2S else None

    def expire(self, now: float, budget=1024) -> int:
        """Forget what has timed out; returns how many connections were forgotten.

        Half-open connections older than half_open_timeout and closed ones closed longer
        than closed_linger are taken from the heads of their lists (creation / closing
        order): the cost is what expires. Established ones idle (no frame either way) longer
        than idle_timeout are found by a sweep that examines at most `budget` of them per
        call (None: all; the default 1,024 bounds a call's cost, and cycles through 100,000
        established connections in 98 calls), resuming where the last call stopped. Call it
        every few milliseconds to seconds. Each forgotten connection
        queues a "forgotten" event. Pinned connections are never expired.
        """
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"budget must be None or an integer >= 0, not {budget!r}")
        now = float(now)
        with self._lock:
            if not self._conntrack:
                return 0
            cst, lists, n = self._cst, self._lists, 0
            half, closed, est = lists[_L_HALF], lists[_L_CLOSED], lists[_L_EST]
            while half.head is not None and now - half.head.created > self._half_open_timeout:
                self._ct_forget(half.head, _R_HALF_OPEN_TIMEOUT, True)
                cst["half_open_expired"] += 1
                n += 1
            while closed.head is not None and now - closed.head.closed_at > self._closed_linger:
                self._ct_forget(closed.head, _R_CLOSED, True)
                cst["closed_expired"] += 1
                n += 1
            steps = est.len if budget is None else min(budget, est.len)
            c = est.head if budget is None else (self._cursor or est.head)
            flows = self._flows
            for _ in range(steps):
                if c is None:
                    c = est.head
                nxt = c.next
                k = c.key
                last = c.active
                for key in (k, (k[2], k[3], k[0], k[1])):
                    e = flows.get(key)
                    if e is not None and e.last_seen > last:
                        last = e.last_seen
                if now - last > self._idle_timeout:
                    self._ct_forget(c, _R_IDLE, True)
                    cst["idle_expired"] += 1
                    n += 1
                c = nxt
            self._cursor = None if budget is None else c
            return n

    def connection(self, src, sport: int, dst, dport: int):
        """The tracked connection of this client->server 4-tuple, or None."""
        with self._lock:
            c = self._conn_of(src, sport, dst, dport)
            return None if c is None else self._conn_tuple(c)

    def find_token(self, token):
        """The tracked connection with this Migrate Token (the most recently created if several), or None."""
        check_u32(token, "token", 64)
        with self._lock:
            same = self._tokens.get(token)
            return None if not same else self._conn_tuple(max(same, key=lambda c: c.serial))

    def connections(self, limit=None) -> list:
        """The `limit` most recently created (or restored) connections (None: all), oldest first."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or an integer >= 0, not {limit!r}")
        with self._lock:
            conns = list(itertools.islice(reversed(self._all), limit))
            return [self._conn_tuple(c) for c in reversed(conns)]

    def pin(self, src, sport: int, dst, dport: int, on: bool = True) -> bool:
        """The control plane owns this connection's lifecycle (on), or gives it back: a pinned
        connection is never expired or evicted, and its frames get only their flow entries'
        verdicts (no state changes, no tagging). False if there is no such connection."""
        with self._lock:
            c = self._conn_of(src, sport, dst, dport)
            if c is None:
                return False
            on = bool(on)
            if on != c.pinned:
                if on:
                    self._lremove(c)
                    c.pinned = True
                    self._n_pinned += 1
                else:
                    c.pinned = False
                    self._n_pinned -= 1
                    self._lpush(c, self._state_list(c))
            return True

    def forget(self, src, sport: int, dst, dport: int) -> bool:
        """Remove the connection and both its flow entries (no event); False if unknown."""
        with self._lock:
            c = self._conn_of(src, sport, dst, dport)
            if c is None:
                return False
            self._ct_forget(c, 0, False)
            return True

    def restore_connection(self, conn, now=None) -> Conn:
        """Re-create a connection (both PASS entries, its token) from a record, e.g. a
        journaled Conn after a restart; it counts as active at `now` (default: its latest
        recorded time). A connection on either tuple is replaced. Returns it as recorded."""
        if not self._conntrack:
            raise ValueError("restore_connection() needs a table with conntrack=True")
        rec, cpk, spk = check_conn(conn)
        if now is not None:
            now = _common._check_number(now, "now")
        key = (cpk, rec.client_port, spk, rec.server_port)
        if key[0] == key[2] and key[1] == key[3]:
            raise ValueError("a connection's two directions must differ")
        state = CT_STATES.index(rec.state)
        with self._lock:
            for k in (key, (key[2], key[3], key[0], key[1])):
                e = self._flows.get(k)
                if e is not None and e.conn is not None:
                    self._ct_forget(e.conn, 0, False)
            if not self._ct_make_room(state == _S_SYN_SENT and not rec.pinned):
                raise MemoryError(f"the table tracks at most {self._max_connections} connections")
            if len(self._flows) + 2 > MAX_CAPACITY:
                raise MemoryError(f"the flow table holds at most {MAX_CAPACITY} flows")
            macs = (rec.client_mac, rec.router_mac) if rec.client_mac is not None else None
            c = self._ct_new(key, state, rec.created, rec.client_syn, rec.tagged, macs, rec.pinned)
            c.server_syn, c.established_at, c.closed_at = rec.server_syn, rec.established_at, rec.closed_at
            c.closed_by = CT_CLOSED_BY.index(rec.closed_by)
            c.active = now if now is not None else max(t for t in (rec.created, rec.established_at, rec.closed_at)
                                                       if t is not None)
            if rec.token is not None:
                self._ct_token(c, rec.client_syn.isn, rec.server_syn.isn)
            if not c.pinned:
                self._lpush(c, self._state_list(c))
            self._ct_link(c)
            if state == _S_SYN_SENT and c.server_syn is not None:  # the client's ACK establishes it
                self._flows[key].awaiting_ack = True
            return self._conn_tuple(c)

    def events(self, limit: int = 1024) -> list:
        """Drain up to `limit` queued events, oldest first, as (kind, Conn): "established",
        "closed" and "forgotten" (Conn.forgotten says why). The queue holds event_capacity
        events; when it is full the oldest are dropped (counted events_dropped)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an integer >= 0, not {limit!r}")
        with self._lock:
            q = self._events
            return [q.popleft() for _ in range(min(limit, len(q)))]


_C2S, _S2C = 0, 1
_S_SYN_SENT, _S_ESTABLISHED, _S_CLOSED = 0, 1, 2
_L_HALF, _L_EST, _L_CLOSED = 1, 2, 3
_BY_FIN, _BY_CLIENT_RST, _BY_SERVER_RST = 1, 2, 3
_R_HALF_OPEN_TIMEOUT, _R_IDLE, _R_CLOSED, _R_EVICTED, _R_REUSED = 1, 2, 3, 4, 5


class _List:
    __slots__ = ("head", "tail", "len")

    def __init__(self) -> None:
        self.head = self.tail = None
        self.len = 0


class _Conn:
    __slots__ = ("key", "serial", "state", "created", "established_at", "closed_at", "active", "client_syn",
                 "server_syn", "tagged", "pinned", "token", "closed_by", "macs", "lst", "prev", "next")

    def __init__(self) -> None:
        self.established_at = self.closed_at = self.server_syn = self.token = None
        self.closed_by = self.lst = 0
        self.prev = self.next = None


def _syn_options(v) -> SynOptions:
    o = v.opts
    return SynOptions(v.seq, v.mss if o & HAS_MSS else None, v.wscale if o & HAS_WSCALE else None,
                      bool(o & HAS_SACK_PERMITTED), bool(o & HAS_TIMESTAMPS), v.tsval if o & HAS_TIMESTAMPS else None,
                      bool(o & HAS_MIGRATE_PERMITTED))


def _fold(x: int) -> int:
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def _tag_syn(buf, n: int, cap: int, v, partial: bool) -> int:
    """Add Migrate-Permitted to a parsed SYN in buf[:n], where insert_option puts it (after
    the options before any EOL, NOP-aligned), growing the frame into buf[:cap] if the header
    has no spare bytes (a header that has keeps its length, the rest EOL). The IP length and
    both checksums move incrementally (RFC 1624), so a partial (NEEDS_CSUM) frame's
    pseudo-header sum stays right. Returns the new length, or 0 if there is no room."""
    l3, l4 = v.l3_off, v.l4_off
    start, end = l4 + 20, l4 + v.tcp_hdr_len
    used = start
    while used < end and buf[used] != OPT_EOL:
        used += 1 if buf[used] == OPT_NOP else buf[used + 1]
    keep = used - start
    pad = -(keep + MIGRATE_PERMITTED_LEN) % 4
    need = keep + pad + MIGRATE_PERMITTED_LEN
    old = end - start
    if need > MAX_TCP_OPTIONS:
        return 0
    grow = max(0, need - old)
    size = old + grow
    l4len = v.ip_end - l4
    iplen = v.ip_end - l3 - (0 if v.ip_version == 4 else 40)
    if grow and (n + grow > cap or iplen + grow > 0xFFFF):
        return 0
    new = bytes(buf[start:used]) + b"\x01" * pad + MIGRATE_PERMITTED_OPTION + bytes(size - need)
    old_sum, new_sum = _sum16(buf[start:end]), _sum16(new)
    old_w = (buf[l4 + 12] << 8) | buf[l4 + 13]
    new_w = (((20 + size) >> 2) << 12) | (old_w & 0x0FFF)
    hc = (buf[l4 + 16] << 8) | buf[l4 + 17]
    if partial:  # the field is the pseudo-header sum: only the length in it moves
        if grow:
            hc = _fold(hc + (~l4len & 0xFFFF) + l4len + grow)
    else:
        hc = ~_fold((~hc & 0xFFFF) + (~old_w & 0xFFFF) + new_w + (~old_sum & 0xFFFF) + new_sum
                    + (~l4len & 0xFFFF) + l4len + grow) & 0xFFFF
    if grow:
        if v.ip_version == 4:
            _put16(buf, l3 + 2, iplen + grow, l3 + 10)
        else:
            _H.pack_into(buf, l3 + 4, iplen + grow)
        buf[end + grow:n + grow] = bytes(buf[end:n])
    buf[start:start + size] = new
    _H.pack_into(buf, l4 + 12, new_w)
    _H.pack_into(buf, l4 + 16, hc)
    return n + grow


def _check_caps(size: int, offsets, lengths, n: int, caps, new_lengths) -> None:
    if caps is not None:
        if len(caps) < n:
            raise ValueError("caps describes fewer frames than count")
        for i in range(n):
            if caps[i] < lengths[i] or offsets[i] + caps[i] > size:
                raise ValueError(f"frame {i}: caps[i] must be >= its length and within the buffer")
    if new_lengths is not None and (memoryview(new_lengths).readonly or len(new_lengths) < n):
        raise ValueError("new_lengths must be writable, with room for every frame")


def _sha1(data) -> bytes:
    """SHA-1 (the compiled build has its own, in C; tests compare both with hashlib)."""
    import hashlib
    return hashlib.sha1(bytes(data)).digest()




class Mac:
    """HMAC-SHA256 under one key (RFC 2104), the pads' states precomputed: mac(data) -> 32
    bytes; seal(head, body) -> head + body + mac; check(datagram) -> whether its last 32
    bytes are the MAC of the rest (in constant time)."""

    __slots__ = ("inner", "outer")

    def __init__(self, key=b"") -> None:
        import hashlib
        k = bytes(key)
        if len(k) > 64:
            k = hashlib.sha256(k).digest()
        k = k.ljust(64, b"\0")
        self.inner = hashlib.sha256(bytes(x ^ 0x36 for x in k))
        self.outer = hashlib.sha256(bytes(x ^ 0x5C for x in k))

    def __call__(self, data) -> bytes:
        i = self.inner.copy()
        i.update(data)
        o = self.outer.copy()
        o.update(i.digest())
        return o.digest()

    def seal(self, head: bytes, body: bytes) -> bytes:
        i = self.inner.copy()
        i.update(head)
        i.update(body)
        o = self.outer.copy()
        o.update(i.digest())
        return b"".join((head, body, o.digest()))

    def check(self, data) -> bool:
        if len(data) < 32:
            return False
        data = memoryview(data)
        return _compare_digest(self(data[:-32]), data[-32:])
