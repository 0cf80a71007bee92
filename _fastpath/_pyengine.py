"""Pure-Python twin of the compiled packet engine (`_cengine.pyx`): same API, same answers.

Used when there is no compiler or APPLIANCE_PUREPYTHON=1 is set, and as the reference the
fuzz tests compare the compiled build against. Offsets in a FrameView count from the start
of the frame; a view reads addresses and options from the frame it was parsed from.
"""

from __future__ import annotations

import struct
import threading

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


def verify_checksums(frame, link: int = LINK_ETHERNET) -> tuple:
    """(ip_ok, l4_ok): IPv6 has no header checksum, and an unchecked L4 counts as ok."""
    v = _checked(frame, link)
    ip_ok = True
    if v.ip_version == 4:
        ip_ok = _sum16(frame[v.l3_off:v.l3_off + (frame[v.l3_off] & 0x0F) * 4]) == 0xFFFF
    field = _l4_field(v)
    if field < 0:
        return ip_ok, True
    if v.ip_proto == IPPROTO_UDP and v.ip_version == 4 and frame[field] == 0 and frame[field + 1] == 0:
        return ip_ok, True
    return ip_ok, _sum16(bytes(frame[v.l4_off:v.ip_end])) + _pseudo_sum(frame, v) in (0xFFFF, 0x1FFFE)


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
                 "last_seen", "flags_seen", "seq_next", "seq_seen", "ack", "window", "tsval", "tsecr", "ts_seen")

    def __init__(self) -> None:
        self.seq_seen = False
        self.frames = self.bytes = self.flags_seen = self.seq_next = self.ack = self.window = 0
        self.tsval = self.tsecr = 0
        self.ts_seen = False
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

    A TCP frame of a known flow is counted and tracked (latest ack, window, timestamps,
    highest sequence); it goes to Python if its flags meet the entry's punt_flags,
    otherwise it gets the entry's verdict, REWRITE rewriting addresses and ports in place.
    Unknown flows get default_verdict (default_punt applies likewise), frames that are
    not TCP get nontcp_verdict, and malformed frames get malformed_verdict, counted by kind.
    """

    def __init__(self, capacity: int = 1024, default_verdict: int = PASS, default_punt: int = 0,
                 nontcp_verdict: int = PASS, malformed_verdict: int = PASS, link: int = LINK_ETHERNET) -> None:
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
        self.reset_stats()

    # Read-only, as in the compiled build.
    default_verdict = property(lambda self: self._default_verdict)
    default_punt = property(lambda self: self._default_punt)
    nontcp_verdict = property(lambda self: self._nontcp_verdict)
    malformed_verdict = property(lambda self: self._malformed_verdict)
    link = property(lambda self: self._link)

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = dict.fromkeys(STAT_NAMES, 0)
            self._errors = [0] * N_ERRORS

    def stats(self) -> dict:
        with self._lock:
            out = dict(self._stats)
            out["errors"] = {Err(i).name: n for i, n in enumerate(self._errors) if i}
        return out

    def __len__(self) -> int:
        return len(self._flows)

    def set(self, src, sport: int, dst, dport: int, verdict: int = PASS, *, new_src=None, new_sport=None,
            new_dst=None, new_dport=None, punt_flags: int = 0) -> None:
        """Add a flow or change its verdict; counters and tracked state are kept."""
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
        key = _flow_key(src, sport, dst, dport)
        with self._lock:
            return self._flows.pop(key, None) is not None

    def clear(self) -> None:
        with self._lock:
            self._flows.clear()

    def keys(self) -> list:
        with self._lock:
            return list(self._flows)

    @staticmethod
    def _snapshot(key, e: _Entry) -> Flow:
        return Flow(key[0], key[1], key[2], key[3], e.verdict, e.new_src,
                    None if e.new_sport < 0 else e.new_sport, e.new_dst,
                    None if e.new_dport < 0 else e.new_dport, e.punt_flags, e.frames, e.bytes,
                    e.last_seen, e.flags_seen, e.seq_next, e.ack, e.window, e.tsval, e.tsecr, e.ts_seen)

    def classify(self, frame, now: float = 0.0, partial_csum: bool = False) -> int:
        """Decide one frame, rewriting it in place when the verdict is REWRITE.

        partial_csum: the frame's L4 checksum is a pseudo-header sum left for offload.
        """
        if memoryview(frame).readonly:  # as the compiled build: a writable buffer, always
            raise BufferError("classify() needs a writable buffer")
        with self._lock:
            return self._classify(frame, now, partial_csum)

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
            e = self._flows.get((v.src, v.sport, v.dst, v.dport))
            if e is None:
                st["misses"] += 1
                verdict = PYTHON if v.flags & self._default_punt else self._default_verdict
            else:
                st["hits"] += 1
                self._track(e, v, n, now)
                if v.flags & e.punt_flags:
                    verdict = PYTHON
                else:
                    verdict = e.verdict
                    if verdict == REWRITE:
                        _rewrite_view(frame, v, e.new_src, e.new_sport, e.new_dst, e.new_dport, partial_csum)
        st[("passed", "rewritten", "dropped", "to_python")[verdict]] += 1
        return verdict

    @staticmethod
    def _track(e: _Entry, v: FrameView, n: int, now: float) -> None:
        prev_flags = e.flags_seen
        e.frames += 1
        e.bytes += n
        e.last_seen = now
        e.flags_seen |= v.flags
        if not v.flags & RST:
            end = (v.seq + v.payload_len + (1 if v.flags & SYN else 0) + (1 if v.flags & FIN else 0)) & MASK32
            if not e.seq_seen or _common.seq_gt(end, e.seq_next):
                e.seq_next = end
                e.seq_seen = True
        if v.flags & ACK and (not prev_flags & ACK or _common.seq_ge(v.ack, e.ack)):
            e.ack = v.ack
            e.window = v.window
        if v.opts & HAS_TIMESTAMPS and (not e.ts_seen or _common.seq_ge(v.tsval, e.tsval)):
            e.tsval, e.tsecr, e.ts_seen = v.tsval, v.tsecr, True

    def process_batch(self, buf, offsets, lengths, verdicts, now: float = 0.0, count: int = -1,
                      partial_csum: bool = False) -> int:
        """classify() for count frames of buf, verdicts written to verdicts[i]; returns count."""
        vmv = memoryview(verdicts).cast("B")
        n = _batch_count(buf, offsets, lengths, count, len(vmv))
        mv = memoryview(buf).cast("B")
        if mv.readonly:
            raise BufferError("process_batch() needs a writable buffer")
        with self._lock:
            for i in range(n):
                vmv[i] = self._classify(mv[offsets[i]:offsets[i] + lengths[i]], now, partial_csum)
        return n


