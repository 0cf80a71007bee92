# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: embedsignature=True
"""Compiled packet engine: the C twin of `_pyengine.py`, with the same API and answers.

The per-frame functions (fp_parse, fp_table_classify) take a pointer and a length,
hold no Python object and run without the GIL; process_batch() and parse_batch() loop
over many frames of one buffer inside C.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memcmp, memset

from ._common import (
    MAX_CAPACITY, Err, Flow, FrameError, STAT_NAMES, address_text, check_option, check_port, check_u32, check_verdict, list_options,
    make_builders,
    pack_address,
)

BUILD = "c"

# Mirrors of the _common constants as C values (cdef enums are not importable).
cdef enum:
    E_OK = 0
    E_TRUNCATED_ETHERNET = 1
    E_TRUNCATED_IP = 2
    E_BAD_IP_VERSION = 3
    E_BAD_IHL = 4
    E_BAD_IP_LENGTH = 5
    E_BAD_IPV6_EXTENSION = 6
    E_TRUNCATED_L4 = 7
    E_BAD_TCP_OFFSET = 8
    E_BAD_TCP_OPTION = 9

cdef enum:
    V_PASS = 0
    V_REWRITE = 1
    V_DROP = 2
    V_PYTHON = 3

cdef enum:
    S_FRAMES = 0
    S_BYTES = 1
    S_PASSED = 2
    S_REWRITTEN = 3
    S_DROPPED = 4
    S_TO_PYTHON = 5
    S_MALFORMED = 6
    S_NON_TCP = 7
    S_MISSES = 8
    S_HITS = 9

cdef enum:
    LINK_ETH = 0
    LINK_IP = 1
    F_FIN = 0x01
    F_SYN = 0x02
    F_RST = 0x04
    F_ACK = 0x10
    O_SACK_PERMITTED = 0x01
    O_TIMESTAMPS = 0x02
    O_SACK = 0x04
    O_MIGRATE_PERMITTED = 0x08
    O_MIGRATE = 0x10
    O_FRAGMENT = 0x20
    O_MSS = 0x40
    O_WSCALE = 0x80
    EXID_MP = 0x4D50
    EXID_MG = 0x4D47
    MAX_IPV6_EXT = 8

cdef packed struct fp_record:      # RECORD_FORMAT "<BBBBHHHHHHIIIIIHBB" on a little-endian host
    uint8_t error
    uint8_t ip_version
    uint8_t ip_proto
    uint8_t flags
    uint16_t l3_off
    uint16_t l4_off
    uint16_t payload_off
    uint16_t sport
    uint16_t dport
    uint16_t window
    uint32_t payload_len
    uint32_t seq
    uint32_t ack
    uint32_t tsval
    uint32_t tsecr
    uint16_t mss
    uint8_t wscale
    uint8_t opts

assert sizeof(fp_record) == 40
cdef int _ONE = 1
if (<char*>&_ONE)[0] != 1:
    raise ImportError("_cengine writes little-endian batch records; this host is big-endian")


# --- Byte access ------------------------------------------------------------------------

cdef inline uint16_t rd16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])

cdef inline uint32_t rd32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]

cdef inline uint64_t rd64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>rd32(p) << 32) | <uint64_t>rd32(p + 4)

cdef inline void wr16(uint8_t* p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF

cdef inline void wr32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = v >> 24
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF

cdef inline int32_t seq_diff(uint32_t a, uint32_t b) noexcept nogil:
    return <int32_t>(a - b)


# --- Parse ------------------------------------------------------------------------------

cdef inline void view_init(fp_view* v, int link) noexcept nogil:
    memset(v, 0, sizeof(fp_view))
    v.link = link
    v.vlan = -1
    v.wscale = -1
    v.ts_off = -1
    v.sack_off = -1
    v.mp_curve = -1


cdef int parse_options(const uint8_t* f, uint32_t i, uint32_t end, fp_view* v) noexcept nogil:
    cdef uint32_t length
    cdef uint8_t kind
    cdef uint16_t exid
    while i < end:
        kind = f[i]
        if kind == 0:
            return E_OK
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            return E_BAD_TCP_OPTION
        length = f[i + 1]
        if length < 2 or i + length > end:
            return E_BAD_TCP_OPTION
        if kind == 2 and length == 4:
            v.opts |= O_MSS
            v.mss = rd16(f + i + 2)
        elif kind == 3 and length == 3:
            v.opts |= O_WSCALE
            v.wscale = f[i + 2]
        elif kind == 4 and length == 2:
            v.opts |= O_SACK_PERMITTED
        elif kind == 5 and length >= 10 and (length - 2) % 8 == 0:
            v.opts |= O_SACK
            v.sack_off = i + 2
            v.sack_count = (length - 2) // 8
        elif kind == 8 and length == 10:
            v.opts |= O_TIMESTAMPS
            v.ts_off = i
            v.tsval = rd32(f + i + 2)
            v.tsecr = rd32(f + i + 6)
        elif (kind == 253 or kind == 254) and length >= 4:
            exid = rd16(f + i + 2)
            if exid == EXID_MP and (length == 5 or length == 22):
                v.opts |= O_MIGRATE_PERMITTED
                v.mp_curve = f[i + 4]
            elif exid == EXID_MG and length == 21:
                v.opts |= O_MIGRATE
                v.migrate_preload = (f[i + 4] >> 7) & 1
                v.migrate_reqno = f[i + 4] & 0x7F
                v.migrate_token = rd64(f + i + 5)
                v.migrate_request = rd64(f + i + 13)
            else:
                v.unknown_options += 1
        else:
            v.unknown_options += 1
        i += length
    return E_OK


cdef int fp_parse(const uint8_t* f, size_t n, int link, fp_view* v) noexcept nogil:
    """Fill v from the n bytes at f; returns (and stores) the error kind."""
    cdef uint32_t off = 0, ihl, total, l4, end, plen, hlen, frag
    cdef uint16_t et
    cdef int tags = 0, count = 0, version
    cdef uint8_t proto, nxt
    view_init(v, link)
    if link == LINK_ETH:
        if n < 14:
            v.error = E_TRUNCATED_ETHERNET
            return v.error
        et = rd16(f + 12)
        off = 14
        while (et == 0x8100 or et == 0x88A8) and tags < 2:
            if n < off + 4:
                v.error = E_TRUNCATED_ETHERNET
                return v.error
            if v.vlan < 0:
                v.vlan = rd16(f + off) & 0x0FFF
            et = rd16(f + off + 2)
            off += 4
            tags += 1
        v.ethertype = et
        if et == 0x0800:
            version = 4
        elif et == 0x86DD:
            version = 6
        else:
            return E_OK
    else:
        if n < 1:
            v.error = E_TRUNCATED_IP
            return v.error
        version = f[0] >> 4
        if version != 4 and version != 6:
            v.error = E_BAD_IP_VERSION
            return v.error
        v.ethertype = 0x0800 if version == 4 else 0x86DD
    v.l3_off = off
    if version == 4:
        if n - off < 20:
            v.error = E_TRUNCATED_IP
            return v.error
        if f[off] >> 4 != 4:
            v.error = E_BAD_IP_VERSION
            return v.error
        ihl = (f[off] & 0x0F) * 4
        if ihl < 20 or off + ihl > n:
            v.error = E_BAD_IHL
            return v.error
        total = rd16(f + off + 2)
        if total < ihl or off + total > n:
            v.error = E_BAD_IP_LENGTH
            return v.error
        v.ip_version = 4
        v.ip_end = off + total
        v.pseudo_dst_off = off + 16
        v.ttl = f[off + 8]
        proto = f[off + 9]
        frag = rd16(f + off + 6) & 0x3FFF
        l4 = off + ihl
        if frag:
            v.opts |= O_FRAGMENT
            if frag & 0x1FFF:
                v.ip_proto = proto
                v.l4_off = l4
                return E_OK
    else:
        if n - off < 40:
            v.error = E_TRUNCATED_IP
            return v.error
        if f[off] >> 4 != 6:
            v.error = E_BAD_IP_VERSION
            return v.error
        plen = rd16(f + off + 4)
        if plen == 0 or off + 40 + plen > n:
            v.error = E_BAD_IP_LENGTH
            return v.error
        v.ip_version = 6
        end = off + 40 + plen
        v.ip_end = end
        v.pseudo_dst_off = off + 24
        v.ttl = f[off + 7]
        proto = f[off + 6]
        l4 = off + 40
        while proto == 0 or proto == 43 or proto == 60 or proto == 51 or proto == 44:
            count += 1
            if count > MAX_IPV6_EXT or l4 + 8 > end:
                v.error = E_BAD_IPV6_EXTENSION
                return v.error
            nxt = f[l4]
            if proto == 44:
                if rd16(f + l4 + 2) & 0xFFF9:  # offset or M; an atomic fragment is whole (RFC 6946)
                    v.opts |= O_FRAGMENT
                if rd16(f + l4 + 2) & 0xFFF8:
                    v.ip_proto = nxt
                    v.l4_off = l4 + 8
                    return E_OK
                hlen = 8
            elif proto == 51:
                hlen = (f[l4 + 1] + 2) * 4
            else:
                hlen = (f[l4 + 1] + 1) * 8
            if l4 + hlen > end:
                v.error = E_BAD_IPV6_EXTENSION
                return v.error
            if proto == 43 and f[l4 + 3] and hlen >= 24:
                # RFC 8200 8.1: in transit, the pseudo-header carries the final destination
                if f[l4 + 2] == 4:
                    v.pseudo_dst_off = l4 + 8
                elif f[l4 + 2] == 0 or f[l4 + 2] == 2:
                    v.pseudo_dst_off = l4 + 8 + ((hlen - 8) // 16 - 1) * 16
            l4 += hlen
            proto = nxt
    v.ip_proto = proto
    v.l4_off = l4
    end = v.ip_end
    if proto == 17:
        if end - l4 < 8:
            v.error = E_TRUNCATED_L4
            return v.error
        v.sport = rd16(f + l4)
        v.dport = rd16(f + l4 + 2)
        v.payload_off = l4 + 8
        v.payload_len = end - l4 - 8
        return E_OK
    if proto != 6:
        return E_OK
    if end - l4 < 20:
        v.error = E_TRUNCATED_L4
        return v.error
    v.sport = rd16(f + l4)
    v.dport = rd16(f + l4 + 2)
    v.seq = rd32(f + l4 + 4)
    v.ack = rd32(f + l4 + 8)
    hlen = (f[l4 + 12] >> 4) * 4
    v.flags = f[l4 + 13]
    v.window = rd16(f + l4 + 14)
    v.checksum = rd16(f + l4 + 16)
    v.urgent = rd16(f + l4 + 18)
    if hlen < 20 or l4 + hlen > end:
        v.error = E_BAD_TCP_OFFSET
        return v.error
    v.tcp_hdr_len = hlen
    v.payload_off = l4 + hlen
    v.payload_len = end - l4 - hlen
    v.error = parse_options(f, l4 + 20, l4 + hlen, v)
    return v.error


cdef inline bint view_is_l4(const fp_view* v) noexcept nogil:
    return v.error == E_OK and (v.opts & O_FRAGMENT) == 0 and (v.ip_proto == 6 or v.ip_proto == 17)


# --- Checksums --------------------------------------------------------------------------

cdef inline uint32_t fold(uint64_t acc) noexcept nogil:
    while acc >> 16:
        acc = (acc & 0xFFFF) + (acc >> 16)
    return <uint32_t>acc


cdef uint32_t sum16(const uint8_t* p, size_t n, uint64_t acc) noexcept nogil:
    """Ones' complement sum of n bytes as big-endian 16-bit words, folded to 16 bits."""
    while n >= 8:
        acc += (<uint64_t>rd16(p)) + rd16(p + 2) + rd16(p + 4) + rd16(p + 6)
        p += 8
        n -= 8
    while n >= 2:
        acc += rd16(p)
        p += 2
        n -= 2
    if n:
        acc += (<uint64_t>p[0]) << 8
    return fold(acc)


cdef inline uint16_t csum_upd16(uint16_t hc, uint16_t old, uint16_t new) noexcept nogil:
    cdef uint64_t s = (<uint64_t>(~hc & 0xFFFF)) + (~old & 0xFFFF) + new
    return <uint16_t>(~fold(s) & 0xFFFF)


cdef inline void csum_field16(uint8_t* f, int csum_off, uint16_t old, uint16_t new) noexcept nogil:
    if csum_off >= 0:
        wr16(f + csum_off, csum_upd16(rd16(f + csum_off), old, new))


cdef inline void put16(uint8_t* f, uint32_t off, uint16_t value, int csum_off) noexcept nogil:
    cdef uint16_t old = rd16(f + off)
    wr16(f + off, value)
    csum_field16(f, csum_off, old, value)


cdef inline void put32(uint8_t* f, uint32_t off, uint32_t value, int csum_off) noexcept nogil:
    cdef uint32_t old = rd32(f + off)
    wr32(f + off, value)
    if csum_off >= 0:
        wr16(f + csum_off, csum_upd16(csum_upd16(rd16(f + csum_off), old >> 16, value >> 16),
                                      old & 0xFFFF, value & 0xFFFF))


cdef void put32_any(uint8_t* f, uint32_t base, uint32_t off, uint32_t value, int csum_off) noexcept nogil:
    """Write a 32-bit field at any offset; the checksum update covers the 16-bit words
    (counted from base, the L4 header) the field overlaps, so odd offsets work too."""
    cdef uint32_t a = off - ((off - base) & 1), e = off + 4
    cdef uint32_t old_sum, new_sum
    e += (e - base) & 1
    old_sum = sum16(f + a, e - a, 0)
    wr32(f + off, value)
    if csum_off >= 0:
        new_sum = sum16(f + a, e - a, 0)
        wr16(f + csum_off, <uint16_t>(~fold(<uint64_t>(~rd16(f + csum_off) & 0xFFFF) + (~old_sum & 0xFFFF)
                                           + new_sum) & 0xFFFF))


cdef inline void replace_address(uint8_t* f, uint32_t off, const uint8_t* new, int alen,
                                 int csum_a, int csum_b, bint a_partial) noexcept nogil:
    """Copy a new address over the old one, updating up to two checksums by RFC 1624.

    a_partial: csum_a holds an uncomplemented pseudo-header sum (a NEEDS_CSUM frame),
    so it moves by the same delta without the complements: S' = S + ~m + m'.
    """
    cdef uint64_t delta = 0
    cdef int i
    for i in range(0, alen, 2):
        delta += (~rd16(f + off + i) & 0xFFFF) + rd16(new + i)
    memcpy(f + off, new, alen)
    if csum_a >= 0:
        if a_partial:
            wr16(f + csum_a, <uint16_t>fold(delta + rd16(f + csum_a)))
        else:
            wr16(f + csum_a, <uint16_t>(~fold(delta + (~rd16(f + csum_a) & 0xFFFF)) & 0xFFFF))
    if csum_b >= 0:
        wr16(f + csum_b, <uint16_t>(~fold(delta + (~rd16(f + csum_b) & 0xFFFF)) & 0xFFFF))


cdef inline int l4_csum_field(const uint8_t* f, const fp_view* v, bint partial) noexcept nogil:
    """Offset of the L4 checksum to maintain, or -1 (none, or a zero UDP/IPv4 checksum)."""
    cdef int field
    if not view_is_l4(v):
        return -1
    field = v.l4_off + (16 if v.ip_proto == 6 else 6)
    if not partial and v.ip_proto == 17 and v.ip_version == 4 and f[field] == 0 and f[field + 1] == 0:
        return -1
    return field


cdef void rewrite_view(uint8_t* f, const fp_view* v, const uint8_t* src, int32_t sport,
                       const uint8_t* dst, int32_t dport, bint partial) noexcept nogil:
    """Rewrite addresses/ports of a parsed TCP/UDP frame; NULL or -1 leaves a field alone.

    partial: the frame's L4 checksum is left to offload (virtio NEEDS_CSUM) and its field
    holds only the pseudo-header sum: addresses move it, ports (not in it) do not.
    """
    cdef int l4c = l4_csum_field(f, v, partial)
    cdef int ipc = v.l3_off + 10 if v.ip_version == 4 else -1
    cdef int alen = 4 if v.ip_version == 4 else 16
    cdef uint32_t base = v.l3_off + (12 if v.ip_version == 4 else 8)
    if src != NULL:
        replace_address(f, base, src, alen, l4c, ipc, partial)
    if dst != NULL:
        replace_address(f, base + alen, dst, alen, l4c if v.pseudo_dst_off == base + alen else -1, ipc, partial)
    if sport >= 0:
        put16(f, v.l4_off, <uint16_t>sport, -1 if partial else l4c)
    if dport >= 0:
        put16(f, v.l4_off + 2, <uint16_t>dport, -1 if partial else l4c)
    if not partial and l4c >= 0 and v.ip_proto == 17 and rd16(f + l4c) == 0:
        wr16(f + l4c, 0xFFFF)


cdef uint32_t pseudo_sum(const uint8_t* f, const fp_view* v) noexcept nogil:
    cdef uint32_t l4len = v.ip_end - v.l4_off
    cdef uint64_t acc
    if v.ip_version == 4:
        return sum16(f + v.l3_off + 12, 8, <uint64_t>v.ip_proto + l4len)
    acc = sum16(f + v.l3_off + 8, 16, <uint64_t>v.ip_proto + (l4len >> 16) + (l4len & 0xFFFF))
    return sum16(f + v.pseudo_dst_off, 16, acc)


cdef uint16_t l4_checksum(const uint8_t* f, const fp_view* v, uint32_t field) noexcept nogil:
    """The correct L4 checksum, the checksum field taken as zero."""
    cdef uint64_t acc = pseudo_sum(f, v)
    acc += sum16(f + v.l4_off, field - v.l4_off, 0)
    acc += sum16(f + field + 2, v.ip_end - field - 2, 0)
    return <uint16_t>(~fold(acc) & 0xFFFF)


cdef uint16_t ipv4_checksum(const uint8_t* f, const fp_view* v) noexcept nogil:
    cdef uint32_t ihl = (f[v.l3_off] & 0x0F) * 4
    cdef uint64_t acc = sum16(f + v.l3_off, 10, 0)
    acc += sum16(f + v.l3_off + 12, ihl - 12, 0)
    return <uint16_t>(~fold(acc) & 0xFFFF)


# --- Python-facing helpers --------------------------------------------------------------

cdef inline void get_buffer(object obj, Py_buffer* pb, bint writable) except *:
    PyObject_GetBuffer(obj, pb, PyBUF_WRITABLE if writable else PyBUF_SIMPLE)


cdef class FrameView:
    """Offsets and fields of one parsed frame; error is Err.OK when it parsed."""

    cdef fp_view v
    cdef readonly object frame

    @property
    def error(self):
        return Err(self.v.error)

    @property
    def ok(self):
        return self.v.error == E_OK

    @property
    def is_tcp(self):
        return self.v.error == E_OK and self.v.ip_proto == 6 and not self.v.opts & O_FRAGMENT

    @property
    def is_fragment(self):
        return bool(self.v.opts & O_FRAGMENT)

    @property
    def link(self): return self.v.link
    @property
    def vlan(self): return self.v.vlan
    @property
    def ethertype(self): return self.v.ethertype
    @property
    def ip_version(self): return self.v.ip_version
    @property
    def l3_off(self): return self.v.l3_off
    @property
    def ip_end(self): return self.v.ip_end
    @property
    def ip_proto(self): return self.v.ip_proto
    @property
    def ttl(self): return self.v.ttl
    @property
    def l4_off(self): return self.v.l4_off
    @property
    def sport(self): return self.v.sport
    @property
    def dport(self): return self.v.dport
    @property
    def seq(self): return self.v.seq
    @property
    def ack(self): return self.v.ack
    @property
    def tcp_hdr_len(self): return self.v.tcp_hdr_len
    @property
    def flags(self): return self.v.flags
    @property
    def window(self): return self.v.window
    @property
    def checksum(self): return self.v.checksum
    @property
    def urgent(self): return self.v.urgent
    @property
    def payload_off(self): return self.v.payload_off
    @property
    def payload_len(self): return self.v.payload_len
    @property
    def opts(self): return self.v.opts
    @property
    def mss(self): return self.v.mss
    @property
    def wscale(self): return self.v.wscale
    @property
    def tsval(self): return self.v.tsval
    @property
    def tsecr(self): return self.v.tsecr
    @property
    def ts_off(self): return self.v.ts_off
    @property
    def sack_off(self): return self.v.sack_off
    @property
    def sack_count(self): return self.v.sack_count
    @property
    def mp_curve(self): return self.v.mp_curve
    @property
    def migrate_preload(self): return bool(self.v.migrate_preload)
    @property
    def migrate_reqno(self): return self.v.migrate_reqno
    @property
    def migrate_token(self): return self.v.migrate_token
    @property
    def migrate_request(self): return self.v.migrate_request
    @property
    def unknown_options(self): return self.v.unknown_options
    @property
    def pseudo_dst_off(self): return self.v.pseudo_dst_off

    @property
    def src(self):
        if self.v.ip_version == 4:
            return bytes(self.frame[self.v.l3_off + 12:self.v.l3_off + 16])
        if self.v.ip_version == 6:
            return bytes(self.frame[self.v.l3_off + 8:self.v.l3_off + 24])
        return b""

    @property
    def dst(self):
        if self.v.ip_version == 4:
            return bytes(self.frame[self.v.l3_off + 16:self.v.l3_off + 20])
        if self.v.ip_version == 6:
            return bytes(self.frame[self.v.l3_off + 24:self.v.l3_off + 40])
        return b""

    @property
    def src_ip(self):
        return address_text(self.src) if self.v.ip_version else ""

    @property
    def dst_ip(self):
        return address_text(self.dst) if self.v.ip_version else ""

    @property
    def sack_blocks(self):
        f, o = self.frame, self.v.sack_off
        return tuple((int.from_bytes(f[o + 8 * i:o + 8 * i + 4], "big"),
                      int.from_bytes(f[o + 8 * i + 4:o + 8 * i + 8], "big")) for i in range(self.v.sack_count))

    @property
    def payload(self):
        return bytes(self.frame[self.v.payload_off:self.v.payload_off + self.v.payload_len])

    def options(self):
        """Every TCP option as (kind, offset, length); NOP and EOL included, length 1."""
        return list_options(self.frame, self.v.l4_off, self.v.tcp_hdr_len) if self.is_tcp else []

    def __repr__(self):
        if self.v.error:
            return f"<FrameView {Err(self.v.error).name}>"
        if not self.v.ip_version:
            return f"<FrameView ethertype=0x{self.v.ethertype:04x}>"
        if self.is_tcp:
            return (f"<FrameView TCP {self.src_ip}:{self.sport} > {self.dst_ip}:{self.dport} "
                    f"flags=0x{self.flags:02x} seq={self.seq} ack={self.ack} len={self.payload_len}>")
        return f"<FrameView IPv{self.ip_version} proto={self.ip_proto} {self.src_ip} > {self.dst_ip}>"


def parse(frame, int link=LINK_ETH):
    """Parse an Ethernet frame (or, with LINK_RAW, an IP packet); never raises on bad input."""
    cdef Py_buffer pb
    cdef FrameView view = FrameView.__new__(FrameView)
    get_buffer(frame, &pb, False)
    fp_parse(<const uint8_t*>pb.buf, pb.len, link, &view.v)
    PyBuffer_Release(&pb)
    view.frame = frame
    return view


cdef Py_ssize_t batch_count(const uint8_t[::1] buf, const uint32_t[::1] offsets, const uint32_t[::1] lengths,
                            Py_ssize_t count, Py_ssize_t limit) except -1:
    cdef Py_ssize_t n = min(offsets.shape[0], lengths.shape[0], limit), i
    if count >= 0:
        if count > n:
            raise ValueError(f"count {count} exceeds the {n} frames the arrays describe")
        n = count
    for i in range(n):
        if <uint64_t>offsets[i] + lengths[i] > <uint64_t>buf.shape[0]:
            raise ValueError(f"frame {i} runs past the end of the buffer")
    return n


def parse_batch(const uint8_t[::1] buf, const uint32_t[::1] offsets, const uint32_t[::1] lengths,
                uint8_t[::1] records, Py_ssize_t count=-1, int link=LINK_ETH):
    """Parse count frames of buf (buf[offsets[i]:offsets[i]+lengths[i]]) into fixed records."""
    cdef Py_ssize_t n = batch_count(buf, offsets, lengths, count, records.shape[0] // sizeof(fp_record)), i
    cdef fp_view v
    cdef fp_record* r
    cdef const uint8_t* base = &buf[0] if buf.shape[0] else NULL
    with nogil:
        for i in range(n):
            fp_parse(base + offsets[i], lengths[i], link, &v)
            r = <fp_record*>(&records[0] + i * sizeof(fp_record))
            r.error = v.error
            r.ip_version = v.ip_version
            r.ip_proto = v.ip_proto
            r.flags = v.flags
            r.l3_off = v.l3_off
            r.l4_off = v.l4_off
            r.payload_off = v.payload_off
            r.sport = v.sport
            r.dport = v.dport
            r.window = v.window
            r.payload_len = v.payload_len
            r.seq = v.seq
            r.ack = v.ack
            r.tsval = v.tsval
            r.tsecr = v.tsecr
            r.mss = v.mss
            r.wscale = <uint8_t>v.wscale
            r.opts = v.opts
    return n


def internet_checksum(data, initial=0):
    """RFC 1071 checksum of data; initial is a partial (uninverted) sum to add in."""
    cdef Py_buffer pb
    cdef uint32_t s
    get_buffer(data, &pb, False)
    s = sum16(<const uint8_t*>pb.buf, pb.len, <uint64_t>initial)
    PyBuffer_Release(&pb)
    return ~s & 0xFFFF


def csum_update16(csum, old, new):
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m') for one 16-bit field."""
    return csum_upd16(csum & 0xFFFF, old & 0xFFFF, new & 0xFFFF)


def csum_update32(csum, old, new):
    old &= 0xFFFFFFFF
    new &= 0xFFFFFFFF
    return csum_upd16(csum_upd16(csum & 0xFFFF, old >> 16, new >> 16), old & 0xFFFF, new & 0xFFFF)


def csum_update_bytes(csum, old, new):
    """Update a checksum for an even-length field that changed from old to new."""
    old, new = bytes(old), bytes(new)
    if len(old) != len(new) or len(old) & 1:
        raise ValueError("old and new must have the same even length")
    cdef uint16_t c = csum & 0xFFFF
    cdef Py_ssize_t i
    for i in range(0, len(old), 2):
        c = csum_upd16(c, (old[i] << 8) | old[i + 1], (new[i] << 8) | new[i + 1])
    return c


cdef fp_view checked(object frame, Py_buffer* pb, bint writable, int link) except *:
    """Parse frame through an acquired buffer; raises FrameError (buffer released) if malformed."""
    cdef fp_view v
    get_buffer(frame, pb, writable)
    fp_parse(<const uint8_t*>pb.buf, pb.len, link, &v)
    if v.error:
        PyBuffer_Release(pb)
        raise FrameError(v.error)
    return v


def ipv4_header_checksum(frame, int link=LINK_ETH):
    """The correct IPv4 header checksum of frame (the field taken as zero)."""
    cdef Py_buffer pb
    cdef fp_view v = checked(frame, &pb, False, link)
    try:
        if v.ip_version != 4:
            raise ValueError("not an IPv4 packet")
        return ipv4_checksum(<const uint8_t*>pb.buf, &v)
    finally:
        PyBuffer_Release(&pb)


def tcp_checksum(frame, int link=LINK_ETH):
    """The correct TCP (or UDP) checksum of frame, over the IPv4 or IPv6 pseudo-header."""
    cdef Py_buffer pb
    cdef fp_view v = checked(frame, &pb, False, link)
    cdef uint16_t c
    try:
        if not view_is_l4(&v):
            raise ValueError("not an unfragmented TCP or UDP packet")
        c = l4_checksum(<const uint8_t*>pb.buf, &v, v.l4_off + (16 if v.ip_proto == 6 else 6))
        if v.ip_proto == 17 and c == 0:
            c = 0xFFFF
        return c
    finally:
        PyBuffer_Release(&pb)


def verify_checksums(frame, int link=LINK_ETH):
    """(ip_ok, l4_ok): IPv6 has no header checksum, and an unchecked L4 counts as ok."""
    cdef Py_buffer pb
    cdef fp_view v = checked(frame, &pb, False, link)
    cdef const uint8_t* f = <const uint8_t*>pb.buf
    cdef bint ip_ok = True, l4_ok = True
    cdef int field
    if v.ip_version == 4:
        ip_ok = sum16(f + v.l3_off, (f[v.l3_off] & 0x0F) * 4, 0) == 0xFFFF
    if view_is_l4(&v):
        field = v.l4_off + (16 if v.ip_proto == 6 else 6)
        if not (v.ip_proto == 17 and v.ip_version == 4 and rd16(f + field) == 0):
            l4_ok = fold(<uint64_t>sum16(f + v.l4_off, v.ip_end - v.l4_off, 0) + pseudo_sum(f, &v)) == 0xFFFF
    PyBuffer_Release(&pb)
    return ip_ok, l4_ok


cdef void fix_view(uint8_t* f, const fp_view* v) noexcept nogil:
    cdef uint16_t c
    cdef uint32_t field
    if v.ip_version == 4:
        wr16(f + v.l3_off + 10, ipv4_checksum(f, v))
    if view_is_l4(v):
        field = v.l4_off + (16 if v.ip_proto == 6 else 6)
        c = l4_checksum(f, v, field)
        if v.ip_proto == 17 and c == 0:
            c = 0xFFFF
        wr16(f + field, c)


def fix_checksums(frame, int link=LINK_ETH):
    """Recompute the IPv4 header checksum and the TCP/UDP checksum in place."""
    cdef Py_buffer pb
    cdef fp_view v = checked(frame, &pb, True, link)
    fix_view(<uint8_t*>pb.buf, &v)
    PyBuffer_Release(&pb)


cdef bytes family_address(const fp_view* v, object addr):
    if addr is None:
        return None
    packed = pack_address(addr)
    if len(packed) != (4 if v.ip_version == 4 else 16):
        raise ValueError("the new address is not of the frame's IP version")
    return packed


def rewrite_addresses(frame, src=None, sport=None, dst=None, dport=None, int link=LINK_ETH, bint partial_csum=False):
    """Rewrite addresses and ports of a TCP or UDP frame in place, checksums updated.

    partial_csum: the L4 checksum field holds a pseudo-header sum left for offload
    (PACKET_VNET_HDR with NEEDS_CSUM); it is kept a correct pseudo-header sum.
    """
    check_port(sport, "sport")
    check_port(dport, "dport")
    cdef Py_buffer pb
    cdef fp_view v = checked(frame, &pb, True, link)
    cdef bytes s, d
    try:
        if not view_is_l4(&v):
            raise ValueError("not an unfragmented TCP or UDP packet")
        s = family_address(&v, src)
        d = family_address(&v, dst)
        rewrite_view(<uint8_t*>pb.buf, &v, <const uint8_t*>s if s is not None else NULL,
                     -1 if sport is None else <uint16_t>sport,
                     <const uint8_t*>d if d is not None else NULL, -1 if dport is None else <uint16_t>dport,
                     partial_csum)
    finally:
        PyBuffer_Release(&pb)


def rewrite_tcp(frame, seq=None, ack=None, window=None, tsval=None, tsecr=None, int link=LINK_ETH):
    """Rewrite seq, ack, window and timestamp values of a TCP frame in place."""
    for name, value in (("seq", seq), ("ack", ack), ("tsval", tsval), ("tsecr", tsecr)):
        check_u32(value, name)
    check_u32(window, "window", 16)
    cdef Py_buffer pb
    cdef fp_view v = checked(frame, &pb, True, link)
    cdef uint8_t* f = <uint8_t*>pb.buf
    cdef int c = v.l4_off + 16
    try:
        if not (v.ip_proto == 6 and not v.opts & O_FRAGMENT):
            raise ValueError("not an unfragmented TCP packet")
        if (tsval is not None or tsecr is not None) and v.ts_off < 0:
            raise ValueError("the segment carries no timestamps option")
        if seq is not None:
            put32(f, v.l4_off + 4, seq & 0xFFFFFFFF, c)
        if ack is not None:
            put32(f, v.l4_off + 8, ack & 0xFFFFFFFF, c)
        if window is not None:
            put16(f, v.l4_off + 14, window & 0xFFFF, c)
        if tsval is not None:
            put32_any(f, v.l4_off, v.ts_off + 2, tsval & 0xFFFFFFFF, c)
        if tsecr is not None:
            put32_any(f, v.l4_off, v.ts_off + 6, tsecr & 0xFFFFFFFF, c)
    finally:
        PyBuffer_Release(&pb)


def insert_option(frame, option, int link=LINK_ETH):
    """Append a TCP option (NOP-aligned) to a segment's options; False, untouched, if no room."""
    if not isinstance(frame, bytearray):
        raise TypeError("insert_option needs a bytearray (the frame grows)")
    cdef Py_buffer pb
    cdef fp_view v = checked(frame, &pb, False, link)
    PyBuffer_Release(&pb)
    if not (v.ip_proto == 6 and not v.opts & O_FRAGMENT):
        raise ValueError("not an unfragmented TCP packet")
    opt = check_option(option)
    cdef uint32_t start = v.l4_off + 20, end = v.l4_off + v.tcp_hdr_len, used = start
    while used < end and frame[used] != 0:     # options before an EOL stay, padding goes
        used += 1 if frame[used] == 1 else frame[used + 1]
    cdef Py_ssize_t pad = (4 - (<Py_ssize_t>(used - start) + len(opt)) % 4) % 4
    new_opts = bytes(frame[start:used]) + b"\x01" * pad + opt
    if len(new_opts) > 40:
        return False
    cdef Py_ssize_t grow = len(new_opts) - (end - start)
    frame[start:end] = new_opts
    frame[v.l4_off + 12] = ((20 + len(new_opts)) // 4) << 4 | (frame[v.l4_off + 12] & 0x0F)
    if v.ip_version == 4:
        frame[v.l3_off + 2:v.l3_off + 4] = (v.ip_end - v.l3_off + grow).to_bytes(2, "big")
    else:
        frame[v.l3_off + 4:v.l3_off + 6] = (v.ip_end - v.l3_off - 40 + grow).to_bytes(2, "big")
    fix_checksums(frame, link)
    return True


build_tcp, build_migrate_syn, build_migrate_synack, build_rst = make_builders(fix_checksums)


# --- Flow table -------------------------------------------------------------------------

cdef inline uint32_t key_hash(const fp_key* k) noexcept nogil:
    cdef uint64_t w, h = 0x243F6A8885A308D3ULL
    cdef int i
    for i in range(5):
        memcpy(&w, (<const uint8_t*>k) + 8 * i, 8)
        h = (h ^ w) * 0x9E3779B97F4A7C15ULL
        h ^= h >> 29
    return <uint32_t>(h ^ (h >> 32))


cdef inline void key_from_view(const uint8_t* f, const fp_view* v, fp_key* k) noexcept nogil:
    memset(k, 0, sizeof(fp_key))
    if v.ip_version == 4:
        memcpy(k.src, f + v.l3_off + 12, 4)
        memcpy(k.dst, f + v.l3_off + 16, 4)
    else:
        memcpy(k.src, f + v.l3_off + 8, 16)
        memcpy(k.dst, f + v.l3_off + 24, 16)
    k.sport = v.sport
    k.dport = v.dport
    k.family = v.ip_version


cdef fp_entry* table_find(fp_table* t, const fp_key* k, uint32_t h) noexcept nogil:
    cdef size_t i = h & t.mask
    cdef fp_entry* e
    while True:
        e = &t.slots[i]
        if not e.used:
            return NULL
        if e.hash == h and memcmp(&e.key, k, sizeof(fp_key)) == 0:
            return e
        i = (i + 1) & t.mask


cdef inline void track(fp_entry* e, const fp_view* v, size_t n, double now) noexcept nogil:
    cdef uint8_t prev_flags = e.flags_seen
    cdef uint32_t end
    e.frames += 1
    e.bytes += n
    e.last_seen = now
    e.flags_seen |= v.flags
    if not v.flags & F_RST:
        end = v.seq + v.payload_len + (1 if v.flags & F_SYN else 0) + (1 if v.flags & F_FIN else 0)
        if not e.seq_seen or seq_diff(end, e.seq_next) > 0:
            e.seq_next = end
            e.seq_seen = 1
    if v.flags & F_ACK and (not prev_flags & F_ACK or seq_diff(v.ack, e.ack) >= 0):
        e.ack = v.ack
        e.window = v.window
    if v.opts & O_TIMESTAMPS and (not e.ts_seen or seq_diff(v.tsval, e.tsval) >= 0):
        e.tsval = v.tsval
        e.tsecr = v.tsecr
        e.ts_seen = 1


cdef int fp_table_classify(fp_table* t, uint8_t* f, size_t n, double now, bint partial) noexcept nogil:
    """Decide one frame, rewriting it in place for REWRITE; the verdict is returned.

    The caller holds t.lock. partial: the frame's L4 checksum is a NEEDS_CSUM pseudo-sum.
    """
    cdef fp_view v
    cdef fp_key k
    cdef fp_entry* e
    cdef int verdict
    t.stats[S_FRAMES] += 1
    t.stats[S_BYTES] += n
    fp_parse(f, n, t.link, &v)
    if v.error:
        t.stats[S_MALFORMED] += 1
        t.errors[v.error] += 1
        verdict = t.malformed_verdict
    elif v.ip_proto != 6 or v.opts & O_FRAGMENT:
        t.stats[S_NON_TCP] += 1
        verdict = t.nontcp_verdict
    else:
        key_from_view(f, &v, &k)
        e = table_find(t, &k, key_hash(&k))
        if e == NULL:
            t.stats[S_MISSES] += 1
            verdict = V_PYTHON if v.flags & t.default_punt else t.default_verdict
        else:
            t.stats[S_HITS] += 1
            track(e, &v, n, now)
            if v.flags & e.punt_flags:
                verdict = V_PYTHON
            else:
                verdict = e.verdict
                if verdict == V_REWRITE:
                    rewrite_view(f, &v, e.new_src if e.has_new_src else NULL, e.new_sport,
                                 e.new_dst if e.has_new_dst else NULL, e.new_dport, partial)
    t.stats[S_PASSED + verdict] += 1
    return verdict


cdef fp_key make_key(object src, int sport, object dst, int dport) except *:
    cdef fp_key k
    cdef bytes s = pack_address(src), d = pack_address(dst)
    if len(s) != len(d):
        raise ValueError("a flow's addresses must both be IPv4 or both IPv6")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError("ports are 0..65535")
    memset(&k, 0, sizeof(fp_key))
    memcpy(k.src, <const uint8_t*>s, len(s))
    memcpy(k.dst, <const uint8_t*>d, len(d))
    k.sport = sport
    k.dport = dport
    k.family = 4 if len(s) == 4 else 6
    return k


cdef class FlowTable:
    """Per-4-tuple verdicts for TCP frames, plus what each flow's frames carried last.

    A TCP frame of a known flow is counted and tracked (latest ack, window, timestamps,
    highest sequence); it goes to Python if its flags meet the entry's punt_flags,
    otherwise it gets the entry's verdict, REWRITE rewriting addresses and ports in place.
    Unknown flows get default_verdict (default_punt applies likewise), frames that are
    not TCP get nontcp_verdict, and malformed frames get malformed_verdict, counted by kind.
    The table lives in C and grows only in set(), never on the per-frame path.
    """

    def __cinit__(self, Py_ssize_t capacity=1024, int default_verdict=V_PASS, int default_punt=0,
                  int nontcp_verdict=V_PASS, int malformed_verdict=V_PASS, int link=LINK_ETH):
        if capacity < 1:
            raise ValueError("capacity must be positive")
        check_verdict(default_verdict, "default_verdict")
        if default_verdict == V_REWRITE:
            raise ValueError("default_verdict cannot be REWRITE (there is nothing to rewrite to)")
        check_verdict(nontcp_verdict, "nontcp_verdict")
        check_verdict(malformed_verdict, "malformed_verdict")
        if nontcp_verdict == V_REWRITE or malformed_verdict == V_REWRITE:
            raise ValueError("nontcp_verdict and malformed_verdict cannot be REWRITE")
        if link != LINK_ETH and link != LINK_IP:
            raise ValueError("link must be LINK_ETHERNET or LINK_RAW")
        if capacity > MAX_CAPACITY:
            raise ValueError(f"capacity is at most {MAX_CAPACITY} flows")
        cdef size_t cap = 16
        while cap < <size_t>capacity * 2:
            cap <<= 1
        self.t = <fp_table*>calloc(1, sizeof(fp_table))
        if self.t == NULL:
            raise MemoryError()
        self.t.slots = <fp_entry*>calloc(cap, sizeof(fp_entry))
        if self.t.slots == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.t.lock, NULL)
        self.t.mask = cap - 1
        self.t.link = link
        self.t.default_verdict = default_verdict
        self.t.default_punt = default_punt & 0xFF
        self.t.nontcp_verdict = nontcp_verdict
        self.t.malformed_verdict = malformed_verdict

    def __dealloc__(self):
        if self.t != NULL:
            if self.t.slots != NULL:
                pthread_mutex_destroy(&self.t.lock)
            free(self.t.slots)
            free(self.t)

    @property
    def default_verdict(self): return self.t.default_verdict
    @property
    def default_punt(self): return self.t.default_punt
    @property
    def nontcp_verdict(self): return self.t.nontcp_verdict
    @property
    def malformed_verdict(self): return self.t.malformed_verdict
    @property
    def link(self): return self.t.link

    def reset_stats(self):
        pthread_mutex_lock(&self.t.lock)
        memset(self.t.stats, 0, sizeof(self.t.stats))
        memset(self.t.errors, 0, sizeof(self.t.errors))
        pthread_mutex_unlock(&self.t.lock)

    def stats(self):
        cdef uint64_t st[10]
        cdef uint64_t er[10]
        pthread_mutex_lock(&self.t.lock)
        memcpy(st, self.t.stats, sizeof(st))
        memcpy(er, self.t.errors, sizeof(er))
        pthread_mutex_unlock(&self.t.lock)
        out = {name: st[i] for i, name in enumerate(STAT_NAMES)}
        out["errors"] = {Err(i).name: er[i] for i in range(1, len(Err))}
        return out

    def __len__(self):
        return self.t.count

    cdef void _grow(self) except *:
        cdef size_t old_cap = self.t.mask + 1, i, j
        cdef fp_entry* old = self.t.slots
        cdef fp_entry* fresh = <fp_entry*>calloc(old_cap * 2, sizeof(fp_entry))
        if fresh == NULL:
            raise MemoryError()
        self.t.slots = fresh
        self.t.mask = old_cap * 2 - 1
        for i in range(old_cap):
            if old[i].used:
                j = old[i].hash & self.t.mask
                while fresh[j].used:
                    j = (j + 1) & self.t.mask
                fresh[j] = old[i]
        free(old)

    def set(self, src, int sport, dst, int dport, int verdict=V_PASS, *, new_src=None, new_sport=None,
            new_dst=None, new_dport=None, int punt_flags=0):
        """Add a flow or change its verdict; counters and tracked state are kept."""
        cdef fp_key k = make_key(src, sport, dst, dport)
        cdef uint32_t h = key_hash(&k)
        cdef fp_entry* e
        cdef size_t i
        check_verdict(verdict, "verdict")
        ns = pack_address(new_src) if new_src is not None else None
        nd = pack_address(new_dst) if new_dst is not None else None
        for a in (ns, nd):
            if a is not None and len(a) != (4 if k.family == 4 else 16):
                raise ValueError("a rewrite cannot change the IP version")
        for p in (new_sport, new_dport):
            if p is not None and not 0 <= p <= 0xFFFF:
                raise ValueError("ports are 0..65535")
        pthread_mutex_lock(&self.t.lock)
        try:
            self._set_locked(&k, h, verdict, ns, new_sport, nd, new_dport, punt_flags)
        finally:
            pthread_mutex_unlock(&self.t.lock)

    cdef void _set_locked(self, fp_key* kp, uint32_t h, int verdict, object ns, object new_sport, object nd,
                          object new_dport, int punt_flags) except *:
        cdef fp_key k = kp[0]
        cdef fp_entry* e = table_find(self.t, &k, h)
        cdef size_t i
        if e == NULL:
            if self.t.count >= MAX_CAPACITY:
                raise MemoryError(f"the flow table holds at most {MAX_CAPACITY} flows")
            if (self.t.count + 1) * 2 > self.t.mask + 1:
                self._grow()
            i = h & self.t.mask
            while self.t.slots[i].used:
                i = (i + 1) & self.t.mask
            e = &self.t.slots[i]
            memset(e, 0, sizeof(fp_entry))
            e.key = k
            e.hash = h
            e.used = 1
            self.t.count += 1
        e.verdict = verdict
        e.punt_flags = punt_flags & 0xFF
        e.has_new_src = ns is not None
        e.has_new_dst = nd is not None
        if ns is not None:
            memcpy(e.new_src, <const uint8_t*><bytes>ns, len(ns))
        if nd is not None:
            memcpy(e.new_dst, <const uint8_t*><bytes>nd, len(nd))
        e.new_sport = -1 if new_sport is None else new_sport
        e.new_dport = -1 if new_dport is None else new_dport

    cdef object _snapshot(self, const fp_entry* e):
        cdef int alen = 4 if e.key.family == 4 else 16
        return Flow((<const char*>e.key.src)[:alen], e.key.sport, (<const char*>e.key.dst)[:alen],
                    e.key.dport, e.verdict,
                    (<const char*>e.new_src)[:alen] if e.has_new_src else None,
                    None if e.new_sport < 0 else e.new_sport,
                    (<const char*>e.new_dst)[:alen] if e.has_new_dst else None,
                    None if e.new_dport < 0 else e.new_dport, e.punt_flags, e.frames, e.bytes,
                    e.last_seen, e.flags_seen, e.seq_next, e.ack, e.window, e.tsval, e.tsecr, bool(e.ts_seen))

    def get(self, src, int sport, dst, int dport):
        cdef fp_key k = make_key(src, sport, dst, dport)
        cdef fp_entry* e
        cdef fp_entry copy
        pthread_mutex_lock(&self.t.lock)
        e = table_find(self.t, &k, key_hash(&k))
        if e != NULL:
            copy = e[0]
        pthread_mutex_unlock(&self.t.lock)
        return None if e == NULL else self._snapshot(&copy)

    def remove(self, src, int sport, dst, int dport):
        """Remove a flow (backward-shift deletion keeps probe chains intact)."""
        cdef fp_key k = make_key(src, sport, dst, dport)
        cdef fp_entry* e
        cdef size_t i, j, home
        pthread_mutex_lock(&self.t.lock)
        e = table_find(self.t, &k, key_hash(&k))
        if e == NULL:
            pthread_mutex_unlock(&self.t.lock)
            return False
        i = e - self.t.slots
        j = i
        while True:
            j = (j + 1) & self.t.mask
            if not self.t.slots[j].used:
                break
            home = self.t.slots[j].hash & self.t.mask
            # slot j may move to i only if its home does not lie cyclically in (i, j]
            if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
                self.t.slots[i] = self.t.slots[j]
                i = j
        memset(&self.t.slots[i], 0, sizeof(fp_entry))
        self.t.count -= 1
        pthread_mutex_unlock(&self.t.lock)
        return True

    def clear(self):
        pthread_mutex_lock(&self.t.lock)
        memset(self.t.slots, 0, (self.t.mask + 1) * sizeof(fp_entry))
        self.t.count = 0
        pthread_mutex_unlock(&self.t.lock)

    def keys(self):
        cdef size_t i
        cdef int alen
        out = []
        pthread_mutex_lock(&self.t.lock)
        for i in range(self.t.mask + 1):
            if self.t.slots[i].used:
                alen = 4 if self.t.slots[i].key.family == 4 else 16
                out.append(((<const char*>self.t.slots[i].key.src)[:alen], self.t.slots[i].key.sport,
                            (<const char*>self.t.slots[i].key.dst)[:alen], self.t.slots[i].key.dport))
        pthread_mutex_unlock(&self.t.lock)
        return out

    def classify(self, frame, double now=0.0, bint partial_csum=False):
        """Decide one frame, rewriting it in place when the verdict is REWRITE.

        partial_csum: the frame's L4 checksum is a pseudo-header sum left for offload.
        """
        cdef Py_buffer pb
        cdef int verdict
        get_buffer(frame, &pb, True)
        pthread_mutex_lock(&self.t.lock)
        verdict = fp_table_classify(self.t, <uint8_t*>pb.buf, pb.len, now, partial_csum)
        pthread_mutex_unlock(&self.t.lock)
        PyBuffer_Release(&pb)
        return verdict

    def process_batch(self, uint8_t[::1] buf, const uint32_t[::1] offsets, const uint32_t[::1] lengths,
                      uint8_t[::1] verdicts, double now=0.0, Py_ssize_t count=-1, bint partial_csum=False):
        """classify() for count frames of buf, verdicts written to verdicts[i]; returns count."""
        cdef Py_ssize_t n = batch_count(buf, offsets, lengths, count, verdicts.shape[0]), i
        cdef uint8_t* base = &buf[0] if buf.shape[0] else NULL
        with nogil:
            pthread_mutex_lock(&self.t.lock)
            for i in range(n):
                verdicts[i] = fp_table_classify(self.t, base + offsets[i], lengths[i], now, partial_csum)
            pthread_mutex_unlock(&self.t.lock)
        return n
