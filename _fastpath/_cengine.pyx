# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: embedsignature=True
"""Compiled packet engine: the C twin of `_pyengine.py`, with the same API and answers.

The per-frame functions (fp_parse, fp_table_classify) take a pointer and a length,
hold no Python object and run without the GIL; process_batch() and parse_batch() loop
over many frames of one buffer inside C.
"""

from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memcmp, memmove, memset
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_FAILED

cdef extern from "<sys/mman.h>" nogil:
    int madvise(void* addr, size_t length, int advice)
    int MADV_HUGEPAGE

cdef enum:
    MADV_POPULATE_WRITE_ = 23  # Linux 5.14; older kernels refuse it (EINVAL): pages are then touched one by one

from ._common import (
    MAX_CAPACITY, Err, Flow, FrameError, STAT_NAMES, address_text, check_option, check_port, check_u32, check_verdict, list_options,
    make_builders,
    pack_address,
)
from ._common import (
    CT_CLOSED, CT_CLOSED_BY, CT_EVENTS, CT_GAUGE_NAMES, CT_REASONS, CT_STAT_NAMES, CT_STATES, Conn, SynOptions,
    _check_number, check_conn, check_conntrack_config, check_direction,
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
    S_UNTRACKED_BAD_CSUM = 10
    S_ACK_BEYOND_SENT = 11
    N_STATS = 12

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
assert len(STAT_NAMES) == N_STATS

# Connection tracking (FlowTable(conntrack=True)); mirrors of the _common / _pyengine values.
cdef enum:
    DIR_NONE = -1
    DIR_OUT = 0
    DIR_IN = 1
    ROLE_C2S = 0
    ROLE_S2C = 1
    CS_SYN_SENT = 0
    CS_ESTABLISHED = 1
    CS_CLOSED = 2
    CF_USED = 0x01
    CF_TAGGED = 0x02
    CF_PINNED = 0x04
    CF_TOKEN = 0x08
    CF_SERVER = 0x10
    CF_MACS = 0x20
    CF_ESTABLISHED = 0x40
    L_HALF = 1
    L_EST = 2
    L_CLOSED = 3
    SO_MSS = 0x01
    SO_WSCALE = 0x02
    SO_SACK = 0x04
    SO_TS = 0x08
    SO_MP = 0x10
    EVK_ESTABLISHED = 0
    EVK_CLOSED = 1
    EVK_FORGOTTEN = 2
    R_NONE = 0
    R_HALF_OPEN_TIMEOUT = 1
    R_IDLE = 2
    R_CLOSED = 3
    R_EVICTED = 4
    R_REUSED = 5
    BY_FIN = 1
    BY_CLIENT_RST = 2
    BY_SERVER_RST = 3
    BIG_ALLOC = 1 << 20      # allocations from this size on are mmap'd (freed pages go back at once)
    HUGE_ALLOC = 4 << 20     # ... and from this size on 2 MiB-aligned, with transparent huge pages asked for
    HUGE_PAGE = 2 << 20
    PAGE = 4096
    MIN_CONNS = 64           # the records array's first size
    MIN_SHRINK = 1024        # ... and the smallest it shrinks to
    MAX_TOKEN_BUCKETS = 1 << 20

cdef enum:                   # CT_STAT_NAMES order
    C_SYNS = 0
    C_SYNS_TAGGED = 1
    C_SYNS_ALREADY_PERMITTED = 2
    C_SYNS_NO_ROOM = 3
    C_SYNS_UNTRACKED_FULL = 4
    C_SYNS_RETRANSMITTED = 5
    C_SYNS_REUSED = 6
    C_SYNS_BAD_CHECKSUM = 7
    C_HALF_OPEN_EVICTED = 8
    C_HALF_OPEN_EXPIRED = 9
    C_IDLE_EXPIRED = 10
    C_CLOSED_EXPIRED = 11
    C_SYNACKS_MATCHED = 12
    C_SYNACKS_UNMATCHED = 13
    C_SYNACKS_RETRANSMITTED = 14
    C_MIGRATE_SYNS = 15
    C_CLOSED_FIN = 16
    C_CLOSED_CLIENT_RST = 17
    C_CLOSED_SERVER_RST = 18
    C_EVENTS_DROPPED = 19
    C_CLOSED_EVICTED = 20
    C_SYNS_ON_ESTABLISHED = 21
    N_CT_STATS = 22

assert len(CT_STAT_NAMES) == N_CT_STATS and CT_STAT_NAMES[C_EVENTS_DROPPED] == "events_dropped"
assert CT_STAT_NAMES[C_CLOSED_FIN] == "closed_fin" and CT_CLOSED_BY[BY_SERVER_RST] == "server_rst"
assert CT_REASONS[R_REUSED] == "reused" and CT_STATES[CS_CLOSED] == CT_CLOSED
cdef size_t C_MAX_CAPACITY = MAX_CAPACITY
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
    """Ones' complement sum of n bytes as big-endian 16-bit words plus acc, folded to 16 bits.

    Adds native (little-endian) 32-bit words and swaps the folded sum once: the sum does
    not depend on byte order (RFC 1071 2.B), and every tracked frame is verified whole.
    """
    cdef uint64_t s = 0, a, b
    cdef uint32_t w
    cdef uint16_t h
    while n >= 16:
        memcpy(&a, p, 8)
        memcpy(&b, p + 8, 8)
        s += (a & 0xFFFFFFFFULL) + (a >> 32) + (b & 0xFFFFFFFFULL) + (b >> 32)
        p += 16
        n -= 16
    while n >= 4:
        memcpy(&w, p, 4)
        s += w
        p += 4
        n -= 4
    if n >= 2:
        memcpy(&h, p, 2)
        s += h
        p += 2
        n -= 2
    if n:
        s += p[0]  # the high byte of a big-endian word is the low byte of a native one
    w = fold(s)
    return fold(acc + (((w & 0xFF) << 8) | (w >> 8)))


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


cdef inline bint ipv4_header_ok(const uint8_t* f, const fp_view* v) noexcept nogil:
    """An IPv4 header sums to 0xFFFF with its checksum (either zero form accepted)."""
    return sum16(f + v.l3_off, (f[v.l3_off] & 0x0F) * 4, 0) == 0xFFFF


cdef inline bint l4_ok(const uint8_t* f, const fp_view* v) noexcept nogil:
    """The TCP/UDP checksum verifies over the pseudo-header; a zero UDP/IPv4 one is unchecked."""
    cdef uint32_t field = v.l4_off + (16 if v.ip_proto == 6 else 6)
    if v.ip_proto == 17 and v.ip_version == 4 and rd16(f + field) == 0:
        return True
    return fold(<uint64_t>sum16(f + v.l4_off, v.ip_end - v.l4_off, 0) + pseudo_sum(f, v)) == 0xFFFF


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
    cdef bint ip_ok = True, l4_good = True
    if v.ip_version == 4:
        ip_ok = ipv4_header_ok(f, &v)
    if view_is_l4(&v):
        l4_good = l4_ok(f, &v)
    PyBuffer_Release(&pb)
    return ip_ok, l4_good


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


cdef fp_entry* table_peer(fp_table* t, const fp_entry* e) noexcept nogil:
    """The entry of the other direction: the reverse of e's tuple as rewritten (the rewrite
    fields count whatever e's verdict: the control plane keeps them on DROP and PYTHON)."""
    cdef fp_key k
    cdef int alen = 4 if e.key.family == 4 else 16
    memset(&k, 0, sizeof(fp_key))
    if e.has_new_dst:
        memcpy(k.src, e.new_dst, alen)
    else:
        memcpy(k.src, e.key.dst, alen)
    if e.has_new_src:
        memcpy(k.dst, e.new_src, alen)
    else:
        memcpy(k.dst, e.key.src, alen)
    k.sport = <uint16_t>e.new_dport if e.new_dport >= 0 else e.key.dport
    k.dport = <uint16_t>e.new_sport if e.new_sport >= 0 else e.key.sport
    k.family = e.key.family
    return table_find(t, &k, key_hash(&k))


cdef inline void track(fp_table* t, fp_entry* e, const uint8_t* f, const fp_view* v, size_t n, double now,
                       int verdict, bint trusted) noexcept nogil:
    """Count a frame of e and, if trusted, take what it says about the connection.

    Either would make a takeover resume at the wrong byte: a frame the receiver's kernel
    drops (bad checksum) moves nothing, and an ack of bytes the peer never sent is refused.
    """
    cdef uint32_t end
    cdef fp_entry* peer
    cdef bint taken = False
    cdef int i
    e.frames += 1
    e.bytes += n
    e.last_seen = now
    if not trusted:
        e.ignored += 1
        t.stats[S_UNTRACKED_BAD_CSUM] += 1
        return
    e.flags_seen |= v.flags
    if verdict != V_DROP and not v.flags & F_RST:  # a dropped segment was never sent on
        end = v.seq + v.payload_len + (1 if v.flags & F_SYN else 0) + (1 if v.flags & F_FIN else 0)
        if not e.seq_seen or seq_diff(end, e.seq_next) > 0:
            e.seq_next = end
            e.seq_seen = 1
    if v.flags & F_ACK:
        if not e.ack_seen or seq_diff(v.ack, e.ack) >= 0:
            peer = table_peer(t, e)
            if peer != NULL and peer.seq_seen and seq_diff(v.ack, peer.seq_next) > 0:
                e.ignored += 1
                t.stats[S_ACK_BEYOND_SENT] += 1
            else:
                e.ack = v.ack
                e.window = v.window
                e.ack_seen = 1
                taken = True
        if v.opts & O_SACK and (taken or (e.ack_seen and v.ack == e.ack)):
            e.sack_count = v.sack_count if v.sack_count < 4 else 4
            for i in range(2 * e.sack_count):
                e.sack[i] = rd32(f + v.sack_off + 4 * i)
        elif taken:
            e.sack_count = 0
    if v.opts & O_TIMESTAMPS and (not e.ts_seen or seq_diff(v.tsval, e.tsval) >= 0):
        e.tsval = v.tsval
        e.tsecr = v.tsecr
        e.ts_seen = 1


# --- Allocation and table maintenance (also used on the per-frame path: C only) ------

cdef void* big_alloc(size_t size) noexcept nogil:
    """Zeroed memory; from mmap when large, so that freeing it gives the pages back at once.

    From HUGE_ALLOC on, the mapping is 2 MiB-aligned and madvise(MADV_HUGEPAGE)'d: a table
    of 100,000 connections spans ~110 MB touched at random, which with 4 KiB pages costs a
    page fault per first touch (the growth rehash touches them all) and a TLB miss per lookup.
    """
    cdef uint8_t* p
    cdef size_t total, head, tail
    if size < BIG_ALLOC:
        return calloc(1, size if size else 1)
    size = (size + PAGE - 1) & ~(<size_t>PAGE - 1)
    if size < HUGE_ALLOC:
        p = <uint8_t*>mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        return NULL if <void*>p == MAP_FAILED else p
    total = size + HUGE_PAGE
    p = <uint8_t*>mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if <void*>p == MAP_FAILED:
        return NULL
    head = (HUGE_PAGE - (<size_t>p & (HUGE_PAGE - 1))) & (HUGE_PAGE - 1)
    tail = total - head - size
    if head:
        munmap(p, head)
    if tail:
        munmap(p + head + size, tail)
    madvise(p + head, size, MADV_HUGEPAGE)  # a hint: without THP, ordinary pages
    return p + head


cdef void* big_alloc_prefaulted(size_t size) noexcept nogil:
    """big_alloc() with every page already faulted in (zeroed): for growing a table outside its
    lock, so that the forwarding threads, waiting on it, pay only for the copy."""
    cdef uint8_t* p = <uint8_t*>big_alloc(size)
    cdef size_t off
    if p != NULL and size >= BIG_ALLOC and madvise(p, (size + PAGE - 1) & ~(<size_t>PAGE - 1),
                                                   MADV_POPULATE_WRITE_) != 0:
        off = 0
        while off < size:
            p[off] = 0
            off += PAGE
    return p


cdef void big_free(void* p, size_t size) noexcept nogil:
    if p == NULL:
        return
    if size >= BIG_ALLOC:
        munmap(p, (size + PAGE - 1) & ~(<size_t>PAGE - 1))
    else:
        free(p)


cdef int table_resize(fp_table* t, size_t cap) noexcept nogil:
    """Rehash every flow into cap (a power of two) slots; -1, unchanged, if out of memory."""
    cdef fp_entry* fresh = <fp_entry*>big_alloc(cap * sizeof(fp_entry))
    if fresh == NULL:
        return -1
    table_rehash_into(t, fresh, cap)
    return 0


cdef void table_rehash_into(fp_table* t, fp_entry* fresh, size_t cap) noexcept nogil:
    """Move every flow into fresh (cap zeroed slots, from big_alloc) and free the old slots."""
    cdef size_t old_cap = t.mask + 1, i, j, mask = cap - 1
    cdef fp_entry* old = t.slots
    for i in range(old_cap):
        if old[i].used:
            j = old[i].hash & mask
            while fresh[j].used:
                j = (j + 1) & mask
            fresh[j] = old[i]
    t.slots = fresh
    t.mask = mask
    big_free(old, old_cap * sizeof(fp_entry))


cdef int table_room(fp_table* t, size_t extra) noexcept nogil:
    """Grow the table so that extra more flows keep it at most half full; -1 if it cannot."""
    if t.count + extra > C_MAX_CAPACITY:
        return -1
    while (t.count + extra) * 2 > t.mask + 1:
        if table_resize(t, (t.mask + 1) * 2) < 0:
            return -1
    return 0


cdef fp_entry* table_insert(fp_table* t, const fp_key* k, uint32_t h) noexcept nogil:
    """A new, zeroed flow for k (absent; room made by table_room)."""
    cdef size_t i = h & t.mask
    cdef fp_entry* e
    while t.slots[i].used:
        i = (i + 1) & t.mask
    e = &t.slots[i]
    memset(e, 0, sizeof(fp_entry))
    e.key = k[0]
    e.hash = h
    e.used = 1
    e.new_sport = -1
    e.new_dport = -1
    t.count += 1
    return e


cdef void table_remove_at(fp_table* t, size_t i) noexcept nogil:
    """Remove slot i (backward-shift deletion keeps probe chains intact)."""
    cdef size_t j = i, home
    while True:
        j = (j + 1) & t.mask
        if not t.slots[j].used:
            break
        home = t.slots[j].hash & t.mask
        # slot j may move to i only if its home does not lie cyclically in (i, j]
        if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
            t.slots[i] = t.slots[j]
            i = j
    memset(&t.slots[i], 0, sizeof(fp_entry))
    t.count -= 1


cdef inline void reverse_key(const fp_key* k, fp_key* r) noexcept nogil:
    memset(r, 0, sizeof(fp_key))
    memcpy(r.src, k.dst, 16)
    memcpy(r.dst, k.src, 16)
    r.sport = k.dport
    r.dport = k.sport
    r.family = k.family


# --- SHA-1 (FIPS 180-4), for the Migrate Token on the per-frame path --------------------

cdef inline uint32_t rol32(uint32_t x, int n) noexcept nogil:
    return (x << n) | (x >> (32 - n))


cdef void sha1_block(uint32_t* h, const uint8_t* p) noexcept nogil:
    cdef uint32_t w[80]
    cdef uint32_t a, b, c, d, e, f, k, tmp
    cdef int i
    for i in range(16):
        w[i] = rd32(p + 4 * i)
    for i in range(16, 80):
        w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1)
    a = h[0]
    b = h[1]
    c = h[2]
    d = h[3]
    e = h[4]
    for i in range(80):
        if i < 20:
            f = (b & c) | ((~b) & d)
            k = 0x5A827999
        elif i < 40:
            f = b ^ c ^ d
            k = 0x6ED9EBA1
        elif i < 60:
            f = (b & c) | (b & d) | (c & d)
            k = 0x8F1BBCDC
        else:
            f = b ^ c ^ d
            k = 0xCA62C1D6
        tmp = rol32(a, 5) + f + e + k + w[i]
        e = d
        d = c
        c = rol32(b, 30)
        b = a
        a = tmp
    h[0] += a
    h[1] += b
    h[2] += c
    h[3] += d
    h[4] += e


cdef void sha1(const uint8_t* data, size_t n, uint8_t* out) noexcept nogil:
    cdef uint32_t h[5]
    cdef uint8_t block[64]
    cdef size_t i, rest
    cdef uint64_t bits = (<uint64_t>n) * 8
    h[0] = 0x67452301
    h[1] = 0xEFCDAB89
    h[2] = 0x98BADCFE
    h[3] = 0x10325476
    h[4] = 0xC3D2E1F0
    i = 0
    while n - i >= 64:
        sha1_block(h, data + i)
        i += 64
    rest = n - i
    memset(block, 0, 64)
    memcpy(block, data + i, rest)
    block[rest] = 0x80
    if rest >= 56:
        sha1_block(h, block)
        memset(block, 0, 64)
    wr32(block + 56, <uint32_t>(bits >> 32))
    wr32(block + 60, <uint32_t>bits)
    sha1_block(h, block)
    for i in range(5):
        wr32(out + 4 * i, h[i])


cdef uint64_t ct_token(uint32_t ni, uint32_t na) noexcept nogil:
    """Token = top 64 bits of SHA-1(Ni, Na, K), K empty (25 zero bytes): _common.migrate_token."""
    cdef uint8_t msg[33]
    cdef uint8_t digest[20]
    memset(msg, 0, 33)
    wr32(msg, ni)
    wr32(msg + 4, na)
    sha1(msg, 33, digest)
    return rd64(digest)


# --- Tagging a SYN with Migrate-Permitted in place ---------------------------------------

cdef size_t tag_syn(uint8_t* f, size_t n, size_t cap, const fp_view* v, bint partial) noexcept nogil:
    """Add Migrate-Permitted to a parsed SYN of n bytes at f, where insert_option puts it (after
    the options before any EOL, NOP-aligned), growing the frame up to cap bytes when the header
    has no spare bytes (one that has keeps its length, the rest EOL). The IP length and both
    checksums move incrementally (RFC 1624), so a partial (NEEDS_CSUM) frame's pseudo-header
    sum stays right. Returns the new length, or 0 (frame untouched) if there is no room."""
    cdef uint32_t l3 = v.l3_off, l4 = v.l4_off
    cdef uint32_t start = l4 + 20, end = l4 + v.tcp_hdr_len, used = l4 + 20
    cdef uint32_t keep, pad, need, old, grow, size, l4len, iplen, i
    cdef uint32_t old_sum, new_sum, old_w, new_w, hc
    cdef uint64_t acc
    cdef uint8_t tmp[40]
    while used < end and f[used] != 0:
        used += 1 if f[used] == 1 else f[used + 1]
    keep = used - start
    pad = (4 - (keep + 5) % 4) % 4
    need = keep + pad + 5
    old = end - start
    if need > 40:
        return 0
    grow = need - old if need > old else 0
    size = old + grow
    l4len = v.ip_end - l4
    iplen = v.ip_end - l3 - (0 if v.ip_version == 4 else 40)
    if grow and (n + grow > cap or iplen + grow > 0xFFFF):
        return 0
    memcpy(tmp, f + start, keep)
    for i in range(keep, keep + pad):
        tmp[i] = 1
    tmp[keep + pad] = 253
    tmp[keep + pad + 1] = 5
    tmp[keep + pad + 2] = EXID_MP >> 8
    tmp[keep + pad + 3] = EXID_MP & 0xFF
    tmp[keep + pad + 4] = 0
    for i in range(need, size):
        tmp[i] = 0
    old_sum = sum16(f + start, old, 0)
    new_sum = sum16(tmp, size, 0)
    old_w = rd16(f + l4 + 12)
    new_w = (((20 + size) >> 2) << 12) | (old_w & 0x0FFF)
    hc = rd16(f + l4 + 16)
    if partial:  # the field is the pseudo-header sum: only the length in it moves
        if grow:
            hc = fold(<uint64_t>hc + (~l4len & 0xFFFF) + l4len + grow)
    else:
        acc = (<uint64_t>(~hc & 0xFFFF) + (~old_w & 0xFFFF) + new_w + (~old_sum & 0xFFFF) + new_sum
               + (~l4len & 0xFFFF) + l4len + grow)
        hc = ~fold(acc) & 0xFFFF
    if grow:
        if v.ip_version == 4:
            put16(f, l3 + 2, <uint16_t>(iplen + grow), l3 + 10)
        else:
            wr16(f + l3 + 4, <uint16_t>(iplen + grow))
        memmove(f + end + grow, f + end, n - end)
    memcpy(f + start, tmp, size)
    wr16(f + l4 + 12, <uint16_t>new_w)
    wr16(f + l4 + 16, <uint16_t>hc)
    return n + grow


# --- Connection tracking: records, lists, tokens, events ----------------------------------

cdef inline fp_conn* CONN(fp_ct* ct, uint32_t cid) noexcept nogil:
    return &ct.conns[cid - 1]


cdef void ct_lpush(fp_ct* ct, uint32_t cid, int lst) noexcept nogil:
    cdef fp_conn* c = CONN(ct, cid)
    c.lst = lst
    c.next = 0
    c.prev = ct.tail[lst]
    if ct.tail[lst]:
        CONN(ct, ct.tail[lst]).next = cid
    else:
        ct.head[lst] = cid
    ct.tail[lst] = cid
    ct.length[lst] += 1


cdef void ct_lremove(fp_ct* ct, uint32_t cid) noexcept nogil:
    cdef fp_conn* c = CONN(ct, cid)
    cdef int lst = c.lst
    if lst == 0:
        return
    if ct.cursor == cid:
        ct.cursor = c.next
    if c.prev:
        CONN(ct, c.prev).next = c.next
    else:
        ct.head[lst] = c.next
    if c.next:
        CONN(ct, c.next).prev = c.prev
    else:
        ct.tail[lst] = c.prev
    c.prev = 0
    c.next = 0
    c.lst = 0
    ct.length[lst] -= 1


cdef void ct_apush(fp_ct* ct, uint32_t cid) noexcept nogil:
    cdef fp_conn* c = CONN(ct, cid)
    c.anext = 0
    c.aprev = ct.all_tail
    if ct.all_tail:
        CONN(ct, ct.all_tail).anext = cid
    else:
        ct.all_head = cid
    ct.all_tail = cid


cdef void ct_aremove(fp_ct* ct, uint32_t cid) noexcept nogil:
    cdef fp_conn* c = CONN(ct, cid)
    if c.aprev:
        CONN(ct, c.aprev).anext = c.anext
    else:
        ct.all_head = c.anext
    if c.anext:
        CONN(ct, c.anext).aprev = c.aprev
    else:
        ct.all_tail = c.aprev
    c.aprev = 0
    c.anext = 0


cdef inline int state_list(const fp_conn* c) noexcept nogil:
    if c.flags & CF_PINNED:
        return 0
    return L_HALF if c.state == CS_SYN_SENT else (L_EST if c.state == CS_ESTABLISHED else L_CLOSED)


cdef void tok_insert(fp_ct* ct, uint32_t cid) noexcept nogil:
    cdef fp_conn* c = CONN(ct, cid)
    cdef uint32_t b = <uint32_t>(c.token & ct.tok_mask)
    c.tok_next = ct.tok_buckets[b]
    ct.tok_buckets[b] = cid
    c.flags |= CF_TOKEN
    ct.n_tokens += 1


cdef void tok_remove(fp_ct* ct, uint32_t cid) noexcept nogil:
    cdef fp_conn* c = CONN(ct, cid)
    cdef uint32_t b = <uint32_t>(c.token & ct.tok_mask)
    cdef uint32_t p = ct.tok_buckets[b]
    if p == cid:
        ct.tok_buckets[b] = c.tok_next
    else:
        while p and CONN(ct, p).tok_next != cid:
            p = CONN(ct, p).tok_next
        if p:
            CONN(ct, p).tok_next = c.tok_next
    c.tok_next = 0
    c.flags &= ~CF_TOKEN
    ct.n_tokens -= 1


cdef uint32_t tok_find(fp_ct* ct, uint64_t token) noexcept nogil:
    """The connection with this token (the most recently created of several), or 0."""
    cdef uint32_t p = ct.tok_buckets[<uint32_t>(token & ct.tok_mask)], best = 0
    while p:
        if CONN(ct, p).token == token and (best == 0 or CONN(ct, p).serial > CONN(ct, best).serial):
            best = p
        p = CONN(ct, p).tok_next
    return best


cdef void ct_event(fp_ct* ct, const fp_conn* c, int kind, int reason) noexcept nogil:
    """Queue an event with a copy of c; a full ring drops its oldest (counted)."""
    cdef fp_event* ev
    if ct.ev_len == ct.ev_cap:
        ct.ev_head = (ct.ev_head + 1) % ct.ev_cap
        ct.ev_len -= 1
        ct.stats[C_EVENTS_DROPPED] += 1
    ev = &ct.events[(ct.ev_head + ct.ev_len) % ct.ev_cap]
    ev.conn = c[0]
    ev.kind = kind
    ev.reason = reason
    ct.ev_len += 1


cdef void ct_forget(fp_table* t, uint32_t cid, int reason, bint emit) noexcept nogil:
    """Remove a connection: its lists, its token, both its flows; the record is freed. Only
    a connection that was established is an event: a SYN flood's never are (nothing was
    told of them, and their events would crowd out the others')."""
    cdef fp_ct* ct = t.ct
    cdef fp_conn* c = CONN(ct, cid)
    cdef fp_key k = c.key, r
    cdef fp_entry* e
    if emit and c.flags & CF_ESTABLISHED:
        ct_event(ct, c, EVK_FORGOTTEN, reason)
    ct_lremove(ct, cid)
    ct_aremove(ct, cid)
    if c.flags & CF_TOKEN:
        tok_remove(ct, cid)
    e = table_find(t, &k, key_hash(&k))
    if e != NULL and e.conn == cid:
        table_remove_at(t, e - t.slots)
    reverse_key(&k, &r)
    e = table_find(t, &r, key_hash(&r))
    if e != NULL and e.conn == cid:
        table_remove_at(t, e - t.slots)
    ct.n_state[c.state] -= 1
    if c.flags & CF_PINNED:
        ct.n_pinned -= 1
    ct.count -= 1
    memset(c, 0, sizeof(fp_conn))
    c.next = ct.free_head
    ct.free_head = cid


cdef uint32_t ct_close(fp_table* t, uint32_t cid, int by, double now) noexcept nogil:
    """Close a connection; returns cid if it is to be forgotten at once, when the frame is
    done with (it never completed its handshake: a flood's, refused by the client's RST,
    leaves nothing to linger), else 0."""
    cdef fp_ct* ct = t.ct
    cdef fp_conn* c = CONN(ct, cid)
    ct.n_state[c.state] -= 1
    ct.n_state[CS_CLOSED] += 1
    c.state = CS_CLOSED
    c.closed_at = now
    c.closed_by = by
    ct_lremove(ct, cid)
    ct_lpush(ct, cid, L_CLOSED)
    ct.stats[C_CLOSED_FIN + by - BY_FIN] += 1
    if not c.flags & CF_ESTABLISHED:
        return cid
    ct_event(ct, c, EVK_CLOSED, R_NONE)
    return 0


cdef bint ct_make_room(fp_table* t, bint half) noexcept nogil:
    """Evict the oldest half-open connections while a bound is reached; whether one more fits."""
    cdef fp_ct* ct = t.ct
    while ((half and ct.length[L_HALF] >= ct.max_half_open) or ct.count >= ct.max_connections) \
            and ct.head[L_HALF]:
        ct_forget(t, ct.head[L_HALF], R_EVICTED, 1)
        ct.stats[C_HALF_OPEN_EVICTED] += 1
    while ct.count >= ct.max_connections and ct.head[L_CLOSED]:  # then the closed, lingering ones
        ct_forget(t, ct.head[L_CLOSED], R_EVICTED, 1)
        ct.stats[C_CLOSED_EVICTED] += 1
    return ct.count < ct.max_connections


cdef int ct_reserve(fp_ct* ct) noexcept nogil:
    """Make sure a free record exists (the records array doubles, up to max_connections)."""
    cdef uint32_t new
    cdef fp_conn* fresh
    if ct.free_head:
        return 0
    new = ct_next_cap(ct)
    if new == 0:
        return -1
    fresh = <fp_conn*>big_alloc(<size_t>new * sizeof(fp_conn))
    if fresh == NULL:
        return -1
    ct_adopt(ct, fresh, new)
    return 0


cdef uint32_t ct_next_cap(fp_ct* ct) noexcept nogil:
    """The records array's next size (it doubles, up to max_connections); 0: it cannot grow."""
    cdef uint32_t old = ct.conn_cap, new
    if old >= ct.max_connections:
        return 0
    new = old * 2 if old else MIN_CONNS
    if new > ct.max_connections or new < old:
        new = ct.max_connections
    return new


cdef void ct_adopt(fp_ct* ct, fp_conn* fresh, uint32_t new) noexcept nogil:
    """Move the records into fresh (new zeroed records, new > conn_cap); the new ones are free."""
    cdef uint32_t old = ct.conn_cap, i
    if old:
        memcpy(fresh, ct.conns, <size_t>old * sizeof(fp_conn))
    big_free(ct.conns, <size_t>old * sizeof(fp_conn))
    ct.conns = fresh
    ct.conn_cap = new
    i = new
    while i > old:
        fresh[i - 1].next = ct.free_head
        ct.free_head = i
        i -= 1


cdef uint32_t ct_alloc(fp_ct* ct) noexcept nogil:
    """A zeroed record (ct_reserve first), counted and in the creation-order list."""
    cdef uint32_t cid = ct.free_head
    cdef fp_conn* c = CONN(ct, cid)
    ct.free_head = c.next
    memset(c, 0, sizeof(fp_conn))
    c.flags = CF_USED
    ct.serial += 1
    c.serial = ct.serial
    ct.count += 1
    ct_apush(ct, cid)
    return cid


cdef inline void entry_take(fp_entry* e, int role, uint32_t cid, int punt) noexcept nogil:
    e.verdict = V_PASS
    e.punt_flags = punt
    e.has_new_src = 0
    e.has_new_dst = 0
    e.new_sport = -1
    e.new_dport = -1
    e.role = role
    e.conn = cid


cdef void ct_link(fp_table* t, uint32_t cid) noexcept nogil:
    """Both flows of a connection (created, or taken over), PASS with the engine's punt flags."""
    cdef fp_conn* c = CONN(t.ct, cid)
    cdef fp_key k = c.key, r
    cdef uint32_t h = key_hash(&k)
    cdef fp_entry* e = table_find(t, &k, h)
    if e == NULL:
        e = table_insert(t, &k, h)
    entry_take(e, ROLE_C2S, cid, 0)
    reverse_key(&k, &r)
    h = key_hash(&r)
    e = table_find(t, &r, h)
    if e == NULL:
        e = table_insert(t, &r, h)
    entry_take(e, ROLE_S2C, cid, F_RST if c.flags & CF_TOKEN else 0)


cdef inline uint8_t syn_opts(const fp_view* v) noexcept nogil:
    cdef uint8_t o = 0
    if v.opts & O_MSS:
        o |= SO_MSS
    if v.opts & O_WSCALE:
        o |= SO_WSCALE
    if v.opts & O_SACK_PERMITTED:
        o |= SO_SACK
    if v.opts & O_TIMESTAMPS:
        o |= SO_TS
    if v.opts & O_MIGRATE_PERMITTED:
        o |= SO_MP
    return o


cdef size_t ct_client_syn(fp_table* t, uint8_t* f, size_t n, size_t cap, const fp_view* v, const fp_key* k,
                          uint32_t cid, double now, bint partial, bint trusted) noexcept nogil:
    """A client's SYN of an unknown flow (cid 0) or of connection cid: tag it, record it.
    Returns the frame's new length when it was modified (tagged), else 0. Flows may move."""
    cdef fp_ct* ct = t.ct
    cdef fp_conn* c
    cdef bint mp = (v.opts & O_MIGRATE_PERMITTED) != 0
    cdef size_t m = 0
    ct.stats[C_SYNS] += 1
    if mp:
        ct.stats[C_SYNS_ALREADY_PERMITTED] += 1
    if not trusted:
        ct.stats[C_SYNS_BAD_CHECKSUM] += 1  # its receiver drops it: the client sends it again
        return 0
    if cid:
        c = CONN(ct, cid)
        if c.client_isn == v.seq:  # a retransmission: tagged as the first was
            ct.stats[C_SYNS_RETRANSMITTED] += 1
            if c.flags & CF_TAGGED and not mp:
                m = tag_syn(f, n, cap, v, partial)
                ct.stats[C_SYNS_TAGGED if m else C_SYNS_NO_ROOM] += 1
                return m
            return 0
        if c.state == CS_ESTABLISHED:
            # not a new connection: the server answers with a challenge ACK (RFC 5961 4.2)
            # and the connection goes on; a client that really reuses the tuple resets it first
            ct.stats[C_SYNS_ON_ESTABLISHED] += 1
            return 0
        ct.stats[C_SYNS_REUSED] += 1  # another ISN: a new connection reusing the 4-tuple
        ct_forget(t, cid, R_REUSED, 1)
    if not ct_make_room(t, 1) or table_room(t, 2) < 0 or ct_reserve(ct) < 0:
        ct.stats[C_SYNS_UNTRACKED_FULL] += 1
        return 0
    if not mp and ct.tag_syns:
        m = tag_syn(f, n, cap, v, partial)
        ct.stats[C_SYNS_TAGGED if m else C_SYNS_NO_ROOM] += 1
    cid = ct_alloc(ct)
    c = CONN(ct, cid)
    c.key = k[0]
    c.created = now
    c.active = now
    c.state = CS_SYN_SENT
    if m:
        c.flags |= CF_TAGGED
    c.client_isn = v.seq
    c.client_opts = syn_opts(v)
    if v.opts & O_MSS:
        c.client_mss = v.mss
    if v.opts & O_WSCALE:
        c.client_wscale = <uint8_t>v.wscale
    if v.opts & O_TIMESTAMPS:
        c.client_tsval = v.tsval
    if t.link == LINK_ETH:
        memcpy(c.client_mac, f + 6, 6)
        memcpy(c.router_mac, f, 6)
        c.flags |= CF_MACS
    ct.n_state[CS_SYN_SENT] += 1
    ct_lpush(ct, cid, L_HALF)
    ct_link(t, cid)
    return m


cdef void ct_synack(fp_table* t, fp_entry* e, uint32_t cid, const fp_view* v, double now,
                    bint trusted) noexcept nogil:
    """The server's SYN/ACK: its ISN, options and the Migrate Token are recorded, but the
    connection stays half-open until the client acknowledges it (ct_established): a SYN
    flood's connections, answered by the server, never complete."""
    cdef fp_ct* ct = t.ct
    cdef fp_conn* c = CONN(ct, cid)
    cdef fp_key k, r
    cdef fp_entry* p
    if c.state == CS_SYN_SENT and not c.flags & CF_SERVER:
        if trusted and v.ack == <uint32_t>(c.client_isn + 1):
            c.server_isn = v.seq
            c.server_opts = syn_opts(v)
            if v.opts & O_MSS:
                c.server_mss = v.mss
            if v.opts & O_WSCALE:
                c.server_wscale = <uint8_t>v.wscale
            if v.opts & O_TIMESTAMPS:
                c.server_tsval = v.tsval
            c.flags |= CF_SERVER
            if c.flags & CF_TAGGED or c.client_opts & SO_MP:
                c.token = ct_token(c.client_isn, c.server_isn)
                tok_insert(ct, cid)
                e.punt_flags |= F_RST  # MIGRATE-WAIT: the control plane holds the server's RSTs
            k = e.key
            reverse_key(&k, &r)
            p = table_find(t, &r, key_hash(&r))
            if p != NULL and p.conn == cid:
                p.awaiting_ack = 1
            ct.stats[C_SYNACKS_MATCHED] += 1
        else:
            ct.stats[C_SYNACKS_UNMATCHED] += 1
    elif c.state != CS_CLOSED and c.flags & CF_SERVER and trusted and v.seq == c.server_isn \
            and v.ack == <uint32_t>(c.client_isn + 1):
        ct.stats[C_SYNACKS_RETRANSMITTED] += 1
    else:
        ct.stats[C_SYNACKS_UNMATCHED] += 1


cdef void ct_established(fp_table* t, uint32_t cid, double now) noexcept nogil:
    """The client acknowledged the server's SYN/ACK: the handshake is complete."""
    cdef fp_ct* ct = t.ct
    cdef fp_conn* c = CONN(ct, cid)
    ct.n_state[CS_SYN_SENT] -= 1
    ct.n_state[CS_ESTABLISHED] += 1
    c.state = CS_ESTABLISHED
    c.established_at = now
    c.active = now
    c.flags |= CF_ESTABLISHED
    ct_lremove(ct, cid)
    ct_lpush(ct, cid, L_EST)
    ct_event(ct, c, EVK_ESTABLISHED, R_NONE)


cdef uint32_t ct_after(fp_table* t, fp_entry* e, const fp_view* v, double now, int verdict, bint trusted,
                       int direction, bint synack) noexcept nogil:
    """What a tracked frame of e's (unpinned) connection says about the connection's state.
    Returns a connection to forget once the frame is done with (ct_close), or 0."""
    cdef fp_ct* ct = t.ct
    cdef uint32_t cid = e.conn
    cdef fp_conn* c = CONN(ct, cid)
    cdef fp_key k, r
    cdef fp_entry* p
    if direction == DIR_IN and e.role == ROLE_S2C and synack:
        ct_synack(t, e, cid, v, now, trusted)
    if e.awaiting_ack and c.state != CS_SYN_SENT:
        e.awaiting_ack = 0
    if not trusted or c.state == CS_CLOSED:
        return 0
    if v.flags & F_RST:
        if verdict == V_PASS or verdict == V_REWRITE:
            if e.role == ROLE_C2S and direction == DIR_OUT:
                return ct_close(t, cid, BY_CLIENT_RST, now)
            elif e.role == ROLE_S2C and direction == DIR_IN:
                return ct_close(t, cid, BY_SERVER_RST, now)
    elif e.awaiting_ack:
        # the client's ACK of the SYN/ACK (or any later segment of it: the ACK may be lost)
        if direction == DIR_OUT and e.role == ROLE_C2S and v.flags & F_ACK and not v.flags & F_SYN \
                and c.flags & CF_SERVER and seq_diff(v.ack, c.server_isn) > 0 and verdict != V_DROP:
            e.awaiting_ack = 0
            ct_established(t, cid, now)
    elif v.flags & F_FIN and e.flags_seen & F_FIN:
        k = e.key
        reverse_key(&k, &r)
        p = table_find(t, &r, key_hash(&r))
        if p != NULL and p.flags_seen & F_FIN:
            return ct_close(t, cid, BY_FIN, now)
    return 0


cdef uint32_t ct_expire(fp_table* t, double now, int64_t budget) noexcept nogil:
    """expire(): heads of the half-open and closed lists, then up to budget (< 0: all)
    established connections from the sweep's cursor. Returns how many were forgotten."""
    cdef fp_ct* ct = t.ct
    cdef uint32_t n = 0, cur, nxt
    cdef int64_t steps, i
    cdef fp_conn* c
    cdef fp_key k, r
    cdef fp_entry* e
    cdef double last
    while ct.head[L_HALF] and now - CONN(ct, ct.head[L_HALF]).created > ct.half_open_timeout:
        ct_forget(t, ct.head[L_HALF], R_HALF_OPEN_TIMEOUT, 1)
        ct.stats[C_HALF_OPEN_EXPIRED] += 1
        n += 1
    while ct.head[L_CLOSED] and now - CONN(ct, ct.head[L_CLOSED]).closed_at > ct.closed_linger:
        ct_forget(t, ct.head[L_CLOSED], R_CLOSED, 1)
        ct.stats[C_CLOSED_EXPIRED] += 1
        n += 1
    steps = ct.length[L_EST]
    if budget >= 0 and budget < steps:
        steps = budget
    cur = ct.head[L_EST] if budget < 0 or not ct.cursor else ct.cursor
    for i in range(steps):
        if cur == 0:
            cur = ct.head[L_EST]
        c = CONN(ct, cur)
        nxt = c.next
        last = c.active
        k = c.key
        e = table_find(t, &k, key_hash(&k))
        if e != NULL and e.last_seen > last:
            last = e.last_seen
        reverse_key(&k, &r)
        e = table_find(t, &r, key_hash(&r))
        if e != NULL and e.last_seen > last:
            last = e.last_seen
        if now - last > ct.idle_timeout:
            ct_forget(t, cur, R_IDLE, 1)
            ct.stats[C_IDLE_EXPIRED] += 1
            n += 1
        cur = nxt
    ct.cursor = 0 if budget < 0 else cur
    return n


cdef void ct_move(fp_table* t, uint32_t a, uint32_t b) noexcept nogil:
    """Move record a to the free record b, every reference to it following."""
    cdef fp_ct* ct = t.ct
    cdef fp_conn* c = CONN(ct, b)
    cdef uint32_t bucket, p
    cdef fp_key k, r
    cdef fp_entry* e
    c[0] = CONN(ct, a)[0]
    memset(CONN(ct, a), 0, sizeof(fp_conn))
    if c.lst:
        if c.prev:
            CONN(ct, c.prev).next = b
        else:
            ct.head[c.lst] = b
        if c.next:
            CONN(ct, c.next).prev = b
        else:
            ct.tail[c.lst] = b
    if ct.cursor == a:
        ct.cursor = b
    if c.aprev:
        CONN(ct, c.aprev).anext = b
    else:
        ct.all_head = b
    if c.anext:
        CONN(ct, c.anext).aprev = b
    else:
        ct.all_tail = b
    if c.flags & CF_TOKEN:
        bucket = <uint32_t>(c.token & ct.tok_mask)
        if ct.tok_buckets[bucket] == a:
            ct.tok_buckets[bucket] = b
        else:
            p = ct.tok_buckets[bucket]
            while p and CONN(ct, p).tok_next != a:
                p = CONN(ct, p).tok_next
            if p:
                CONN(ct, p).tok_next = b
    k = c.key
    e = table_find(t, &k, key_hash(&k))
    if e != NULL and e.conn == a:
        e.conn = b
    reverse_key(&k, &r)
    e = table_find(t, &r, key_hash(&r))
    if e != NULL and e.conn == a:
        e.conn = b


cdef void ct_shrink(fp_table* t) noexcept nogil:
    """Give memory back when far under-used: the records array (live records moved to the
    front) when under 1/8 used, the flow slots when under 1/16 (never below the initial size)."""
    cdef fp_ct* ct = t.ct
    cdef uint32_t new = MIN_SHRINK, i, j = 0
    cdef fp_conn* fresh
    cdef size_t cap = t.mask + 1, slots
    if ct.conn_cap > MIN_SHRINK and <uint64_t>ct.count * 8 < ct.conn_cap:
        while new < ct.count * 2:
            new <<= 1
        for i in range(new, ct.conn_cap):
            if ct.conns[i].flags & CF_USED:
                while ct.conns[j].flags & CF_USED:
                    j += 1
                ct_move(t, i + 1, j + 1)
        fresh = <fp_conn*>big_alloc(<size_t>new * sizeof(fp_conn))
        if fresh != NULL:
            memcpy(fresh, ct.conns, <size_t>new * sizeof(fp_conn))
            big_free(ct.conns, <size_t>ct.conn_cap * sizeof(fp_conn))
            ct.conns = fresh
            ct.conn_cap = new
        ct.free_head = 0
        i = ct.conn_cap
        while i > 0:
            if not ct.conns[i - 1].flags & CF_USED:
                ct.conns[i - 1].next = ct.free_head
                ct.free_head = i
            i -= 1
    if cap > ct.min_slots and t.count * 16 < cap:
        slots = ct.min_slots
        while slots < t.count * 4:
            slots <<= 1
        if slots < cap:
            table_resize(t, slots)


cdef void ct_reset(fp_ct* ct) noexcept nogil:
    """No connections (clear()): records freed, lists and token index empty."""
    big_free(ct.conns, <size_t>ct.conn_cap * sizeof(fp_conn))
    ct.conns = NULL
    ct.conn_cap = 0
    ct.count = 0
    ct.free_head = 0
    memset(ct.tok_buckets, 0, (<size_t>ct.tok_mask + 1) * sizeof(uint32_t))
    memset(ct.head, 0, sizeof(ct.head))
    memset(ct.tail, 0, sizeof(ct.tail))
    memset(ct.length, 0, sizeof(ct.length))
    memset(ct.n_state, 0, sizeof(ct.n_state))
    ct.cursor = ct.all_head = ct.all_tail = 0
    ct.n_pinned = ct.n_tokens = 0


cdef int fp_table_classify(fp_table* t, uint8_t* f, size_t n, double now, bint partial) noexcept nogil:
    """Decide one frame, rewriting it in place for REWRITE; the verdict is returned.

    The caller holds t.lock. partial: the frame's L4 checksum is a NEEDS_CSUM pseudo-sum
    (the kernel completes it), so the frame is trusted unverified; any other frame of a
    known flow is tracked only if its checksums verify, before the rewrite touches them.
    """
    cdef fp_view v
    cdef fp_key k
    cdef fp_entry* e
    cdef int verdict
    cdef bint trusted
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
            verdict = V_PYTHON if v.flags & e.punt_flags else e.verdict
            trusted = partial or ((v.ip_version != 4 or ipv4_header_ok(f, &v)) and l4_ok(f, &v))
            track(t, e, f, &v, n, now, verdict, trusted)
            if verdict == V_REWRITE:
                rewrite_view(f, &v, e.new_src if e.has_new_src else NULL, e.new_sport,
                             e.new_dst if e.has_new_dst else NULL, e.new_dport, partial)
    t.stats[S_PASSED + verdict] += 1
    return verdict


cdef int fp_table_classify_dir(fp_table* t, uint8_t* f, size_t n, size_t cap, double now, bint partial,
                               int direction, size_t* new_len) noexcept nogil:
    """fp_table_classify() for a frame of known direction (DIR_OUT: client side -> network,
    DIR_IN), which may grow in place up to cap bytes; *new_len gets its length after.

    Without conntrack, or with direction -1, it is fp_table_classify(). With conntrack, a
    client SYN (OUT, SYN without ACK) of an unknown flow is tagged with Migrate-Permitted
    and recorded as a connection with both its flows; the server's SYN/ACK is recorded (its
    Migrate Token computed here) and the client's ACK of it establishes the connection; FINs
    both ways or a client or server RST close it (one never established is forgotten at
    once); a Migrate SYN (IN, SYN with the Migrate option) always goes to Python. The caller
    holds t.lock.
    """
    cdef fp_view v
    cdef fp_key k
    cdef fp_entry* e
    cdef fp_ct* ct = t.ct
    cdef int verdict, force = -1
    cdef uint32_t h, cid, doomed = 0
    cdef size_t m = n, grown
    cdef bint hit, syn_only, synack, trusted = 0, have_trusted = 0, handle
    if ct == NULL or (direction != DIR_OUT and direction != DIR_IN):
        new_len[0] = n
        return fp_table_classify(t, f, n, now, partial)
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
        h = key_hash(&k)
        e = table_find(t, &k, h)
        hit = e != NULL
        syn_only = (v.flags & (F_SYN | F_ACK)) == F_SYN
        synack = (v.flags & (F_SYN | F_ACK | F_RST)) == (F_SYN | F_ACK)
        if direction == DIR_IN and syn_only and v.opts & O_MIGRATE:
            force = V_PYTHON  # a Migrate SYN: always the control plane's
            ct.stats[C_MIGRATE_SYNS] += 1
        elif direction == DIR_OUT and syn_only and not v.opts & O_MIGRATE \
                and not (k.sport == k.dport and memcmp(k.src, k.dst, 16) == 0):
            handle = e == NULL
            cid = 0
            if e != NULL and e.conn and e.role == ROLE_C2S and not CONN(ct, e.conn).flags & CF_PINNED:
                handle = True
                cid = e.conn
            if handle:
                trusted = partial or ((v.ip_version != 4 or ipv4_header_ok(f, &v)) and l4_ok(f, &v))
                have_trusted = 1
                grown = ct_client_syn(t, f, n, cap, &v, &k, cid, now, partial, trusted)
                if grown:
                    m = grown
                    fp_parse(f, m, t.link, &v)
                e = table_find(t, &k, h)  # flows may have moved
        if e == NULL:
            t.stats[S_MISSES] += 1
            verdict = force if force >= 0 else (V_PYTHON if v.flags & t.default_punt else t.default_verdict)
            if direction == DIR_IN and synack:
                ct.stats[C_SYNACKS_UNMATCHED] += 1
        else:
            t.stats[S_HITS if hit else S_MISSES] += 1
            verdict = V_PYTHON if v.flags & e.punt_flags else e.verdict
            if force >= 0:
                verdict = force
            if not have_trusted:
                trusted = partial or ((v.ip_version != 4 or ipv4_header_ok(f, &v)) and l4_ok(f, &v))
            track(t, e, f, &v, m, now, verdict, trusted)
            # only SYN, FIN and RST move a connection, and the client's ACK completing the
            # handshake: other frames never touch its record
            if e.conn and (v.flags & (F_SYN | F_FIN | F_RST) or e.awaiting_ack) \
                    and not CONN(ct, e.conn).flags & CF_PINNED:
                doomed = ct_after(t, e, &v, now, verdict, trusted, direction, synack)
            elif direction == DIR_IN and synack:
                ct.stats[C_SYNACKS_UNMATCHED] += 1
            if verdict == V_REWRITE:
                rewrite_view(f, &v, e.new_src if e.has_new_src else NULL, e.new_sport,
                             e.new_dst if e.has_new_dst else NULL, e.new_dport, partial)
            if doomed:
                ct_forget(t, doomed, R_CLOSED, 1)
    t.stats[S_PASSED + verdict] += 1
    new_len[0] = m
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
    The table lives in C and grows only in set(), never on the per-frame path (except in
    conntrack mode, where a client SYN may add two flows).

    conntrack=True: the engine also tracks connections from frames of known direction
    (classify(..., direction=OUT/IN)): it tags client SYNs with Migrate-Permitted, records
    each connection (both ISNs and option sets, the MACs, the Migrate Token) in C, bounds
    half-open ones (max_half_open, oldest evicted) and all (max_connections), and forgets
    them in expire(); see connection(), find_token(), events(), pin(), forget(),
    restore_connection().
    """

    def __cinit__(self, Py_ssize_t capacity=1024, int default_verdict=V_PASS, int default_punt=0,
                  int nontcp_verdict=V_PASS, int malformed_verdict=V_PASS, int link=LINK_ETH,
                  conntrack=False, max_connections=100_000, max_half_open=10_000, half_open_timeout=5.0,
                  idle_timeout=600.0, closed_linger=10.0, tag_syns=True, event_capacity=4096):
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
        cfg = check_conntrack_config(conntrack, max_connections, max_half_open, half_open_timeout, idle_timeout,
                                     closed_linger, tag_syns, event_capacity)
        if capacity > MAX_CAPACITY:
            raise ValueError(f"capacity is at most {MAX_CAPACITY} flows")
        self._ct_config = cfg
        cdef size_t cap = 16
        cdef uint32_t buckets = 16
        cdef fp_ct* ct
        while cap < <size_t>capacity * 2:
            cap <<= 1
        self.t = <fp_table*>calloc(1, sizeof(fp_table))
        if self.t == NULL:
            raise MemoryError()
        self.t.slots = <fp_entry*>big_alloc(cap * sizeof(fp_entry))
        if self.t.slots == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.t.lock, NULL)
        self.t.mask = cap - 1
        self.t.link = link
        self.t.default_verdict = default_verdict
        self.t.default_punt = default_punt & 0xFF
        self.t.nontcp_verdict = nontcp_verdict
        self.t.malformed_verdict = malformed_verdict
        if cfg[0]:
            ct = <fp_ct*>calloc(1, sizeof(fp_ct))
            self.t.ct = ct
            if ct == NULL:
                raise MemoryError()
            while buckets < <uint32_t>cfg[1] and buckets < MAX_TOKEN_BUCKETS:
                buckets <<= 1
            ct.tok_buckets = <uint32_t*>big_alloc(buckets * sizeof(uint32_t))
            ct.events = <fp_event*>big_alloc(<size_t>cfg[7] * sizeof(fp_event))
            if ct.tok_buckets == NULL or ct.events == NULL:
                raise MemoryError()
            ct.tok_mask = buckets - 1
            ct.max_connections = cfg[1]
            ct.max_half_open = cfg[2]
            ct.half_open_timeout = cfg[3]
            ct.idle_timeout = cfg[4]
            ct.closed_linger = cfg[5]
            ct.tag_syns = cfg[6]
            ct.ev_cap = cfg[7]
            ct.min_slots = cap

    def __dealloc__(self):
        cdef fp_ct* ct
        if self.t != NULL:
            if self.t.slots != NULL:
                pthread_mutex_destroy(&self.t.lock)
            big_free(self.t.slots, (self.t.mask + 1) * sizeof(fp_entry))
            ct = self.t.ct
            if ct != NULL:
                big_free(ct.conns, <size_t>ct.conn_cap * sizeof(fp_conn))
                big_free(ct.tok_buckets, (<size_t>ct.tok_mask + 1) * sizeof(uint32_t))
                big_free(ct.events, <size_t>ct.ev_cap * sizeof(fp_event))
                free(ct)
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
    @property
    def conntrack(self): return self._ct_config[0]
    @property
    def max_connections(self): return self._ct_config[1]
    @property
    def max_half_open(self): return self._ct_config[2]
    @property
    def half_open_timeout(self): return self._ct_config[3]
    @property
    def idle_timeout(self): return self._ct_config[4]
    @property
    def closed_linger(self): return self._ct_config[5]
    @property
    def tag_syns(self): return self._ct_config[6]
    @property
    def event_capacity(self): return self._ct_config[7]

    def reset_stats(self):
        pthread_mutex_lock(&self.t.lock)
        memset(self.t.stats, 0, sizeof(self.t.stats))
        memset(self.t.errors, 0, sizeof(self.t.errors))
        if self.t.ct != NULL:
            memset(self.t.ct.stats, 0, sizeof(self.t.ct.stats))
        pthread_mutex_unlock(&self.t.lock)

    def stats(self):
        cdef uint64_t st[N_STATS]
        cdef uint64_t er[10]
        cdef uint64_t cs[N_CT_STATS]
        cdef uint64_t gauges[6]
        cdef fp_ct* ct = self.t.ct
        pthread_mutex_lock(&self.t.lock)
        memcpy(st, self.t.stats, sizeof(st))
        memcpy(er, self.t.errors, sizeof(er))
        if ct != NULL:
            memcpy(cs, ct.stats, sizeof(cs))
            gauges[0] = ct.count
            gauges[1] = ct.n_state[CS_SYN_SENT]
            gauges[2] = ct.n_state[CS_ESTABLISHED]
            gauges[3] = ct.n_state[CS_CLOSED]
            gauges[4] = ct.n_pinned
            gauges[5] = ct.n_tokens
        pthread_mutex_unlock(&self.t.lock)
        out = {name: st[i] for i, name in enumerate(STAT_NAMES)}
        out["errors"] = {Err(i).name: er[i] for i in range(1, len(Err))}
        if ct != NULL:
            out.update({name: cs[i] for i, name in enumerate(CT_STAT_NAMES)})
            out.update({name: gauges[i] for i, name in enumerate(CT_GAUGE_NAMES)})
        return out

    def __len__(self):
        return self.t.count

    cdef void _grow(self) except *:
        if table_resize(self.t, (self.t.mask + 1) * 2) < 0:
            raise MemoryError()

    def set(self, src, int sport, dst, int dport, int verdict=V_PASS, *, new_src=None, new_sport=None,
            new_dst=None, new_dport=None, int punt_flags=0):
        """Add a flow or change its verdict; counters and tracked state are kept.

        The rewrite fields are replaced (omitted ones cleared) whatever the verdict: on a
        DROP or PYTHON entry they still name the peer whose seq_next bounds its ack.
        """
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
        cdef int i
        sack = tuple([(e.sack[2 * i], e.sack[2 * i + 1]) for i in range(e.sack_count)])
        return Flow((<const char*>e.key.src)[:alen], e.key.sport, (<const char*>e.key.dst)[:alen],
                    e.key.dport, e.verdict,
                    (<const char*>e.new_src)[:alen] if e.has_new_src else None,
                    None if e.new_sport < 0 else e.new_sport,
                    (<const char*>e.new_dst)[:alen] if e.has_new_dst else None,
                    None if e.new_dport < 0 else e.new_dport, e.punt_flags, e.frames, e.bytes,
                    e.last_seen, e.flags_seen, e.seq_next, e.ack, e.window, e.tsval, e.tsecr, bool(e.ts_seen),
                    sack, e.ignored)

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
        """Remove a flow (backward-shift deletion keeps probe chains intact). In conntrack
        mode, removing either flow of a tracked connection forgets the connection (both
        flows), as forget() does."""
        cdef fp_key k = make_key(src, sport, dst, dport)
        cdef fp_entry* e
        pthread_mutex_lock(&self.t.lock)
        e = table_find(self.t, &k, key_hash(&k))
        if e == NULL:
            pthread_mutex_unlock(&self.t.lock)
            return False
        if self.t.ct != NULL and e.conn:
            ct_forget(self.t, e.conn, R_NONE, 0)
        else:
            table_remove_at(self.t, e - self.t.slots)
        pthread_mutex_unlock(&self.t.lock)
        return True

    def clear(self):
        """Remove every flow (and, in conntrack mode, every connection; queued events stay)."""
        pthread_mutex_lock(&self.t.lock)
        memset(self.t.slots, 0, (self.t.mask + 1) * sizeof(fp_entry))
        self.t.count = 0
        if self.t.ct != NULL:
            ct_reset(self.t.ct)
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

    def classify(self, frame, double now=0.0, bint partial_csum=False, direction=None):
        """Decide one frame, rewriting it in place when the verdict is REWRITE.

        partial_csum: the frame's L4 checksum is a pseudo-header sum left for offload.
        direction: OUT (client side -> network), IN, or None (unknown). A conntrack table
        tracks connections from the frames of a known direction; the frame cannot grow here,
        so a client SYN whose Migrate-Permitted tag needs more bytes is forwarded untagged
        (counted syns_no_room): classify_frame() has room to grow.
        """
        cdef int d = check_direction(direction)
        cdef Py_buffer pb
        cdef int verdict
        cdef size_t nl
        get_buffer(frame, &pb, True)
        pthread_mutex_lock(&self.t.lock)
        if d < 0:
            verdict = fp_table_classify(self.t, <uint8_t*>pb.buf, pb.len, now, partial_csum)
        else:
            verdict = fp_table_classify_dir(self.t, <uint8_t*>pb.buf, pb.len, pb.len, now, partial_csum, d, &nl)
        pthread_mutex_unlock(&self.t.lock)
        PyBuffer_Release(&pb)
        return verdict

    def classify_frame(self, buf, length, cap=None, double now=0.0, bint partial_csum=False, direction=None):
        """classify() for a frame of `length` bytes at the start of buf, which may grow in
        place up to cap bytes (default: all of buf) when a client SYN is tagged with
        Migrate-Permitted; returns (verdict, the frame's new length)."""
        cdef int d = check_direction(direction)
        cdef Py_buffer pb
        cdef int verdict
        cdef size_t nl, c_cap
        get_buffer(buf, &pb, True)
        try:
            if cap is None:
                cap = pb.len
            if not (isinstance(length, int) and isinstance(cap, int) and 0 <= length <= cap <= pb.len):
                raise ValueError("classify_frame() needs 0 <= length <= cap <= len(buf)")
            nl = length
            c_cap = cap
            with nogil:
                pthread_mutex_lock(&self.t.lock)
                if d < 0:
                    verdict = fp_table_classify(self.t, <uint8_t*>pb.buf, nl, now, partial_csum)
                else:
                    verdict = fp_table_classify_dir(self.t, <uint8_t*>pb.buf, nl, c_cap, now, partial_csum, d, &nl)
                pthread_mutex_unlock(&self.t.lock)
        finally:
            PyBuffer_Release(&pb)
        return verdict, nl

    def process_batch(self, uint8_t[::1] buf, const uint32_t[::1] offsets, const uint32_t[::1] lengths,
                      uint8_t[::1] verdicts, double now=0.0, Py_ssize_t count=-1, bint partial_csum=False,
                      direction=None, const uint32_t[::1] caps=None, uint32_t[::1] new_lengths=None):
        """classify() for count frames of buf, verdicts written to verdicts[i]; returns count.

        direction: as classify(). caps (optional): the bytes each frame may grow to in place
        (frame i owns buf[offsets[i]:offsets[i] + caps[i]]); new_lengths (optional, writable,
        uint32): each frame's length afterwards (needed with caps: a tagged SYN grows).
        """
        cdef int d = check_direction(direction)
        cdef Py_ssize_t n = batch_count(buf, offsets, lengths, count, verdicts.shape[0]), i
        cdef uint8_t* base = &buf[0] if buf.shape[0] else NULL
        cdef bint has_caps = caps is not None, has_new = new_lengths is not None
        cdef size_t nl, cap
        if has_caps:
            if caps.shape[0] < n:
                raise ValueError("caps describes fewer frames than count")
            for i in range(n):
                if caps[i] < lengths[i] or <uint64_t>offsets[i] + caps[i] > <uint64_t>buf.shape[0]:
                    raise ValueError(f"frame {i}: caps[i] must be >= its length and within the buffer")
        if has_new and new_lengths.shape[0] < n:
            raise ValueError("new_lengths must be writable, with room for every frame")
        if d < 0 or self.t.ct == NULL:
            with nogil:
                pthread_mutex_lock(&self.t.lock)
                for i in range(n):
                    verdicts[i] = fp_table_classify(self.t, base + offsets[i], lengths[i], now, partial_csum)
                pthread_mutex_unlock(&self.t.lock)
            if has_new:
                for i in range(n):
                    new_lengths[i] = lengths[i]
            return n
        with nogil:
            pthread_mutex_lock(&self.t.lock)
            for i in range(n):
                cap = caps[i] if has_caps else lengths[i]
                verdicts[i] = fp_table_classify_dir(self.t, base + offsets[i], lengths[i], cap, now, partial_csum,
                                                    d, &nl)
                if has_new:
                    new_lengths[i] = <uint32_t>nl
            pthread_mutex_unlock(&self.t.lock)
        return n

    # --- connection tracking ----------------------------------------------------------
    #
    # Per connection: an fp_conn record (152 bytes, in one array that doubles up to
    # max_connections and shrinks when far under-used), and its two flows linked to it
    # (entry.conn, entry.role). Every live connection has both flows: removing either
    # forgets it. Lists (doubly linked through the records): half-open in creation order,
    # established (the idle sweep walks it from a cursor), closed in closing order; pinned
    # connections are in none. The token index chains records from 2**k buckets.

    def expire(self, now, budget=1024):
        """Forget what has timed out; returns how many connections were forgotten.

        Half-open connections older than half_open_timeout and closed ones closed longer
        than closed_linger are taken from the heads of their lists (creation / closing
        order): the cost is what expires. Established ones idle (no frame either way) longer
        than idle_timeout are found by a sweep that examines at most `budget` of them per
        call (None: all; the default 1,024 bounds a call's cost, and cycles through 100,000
        established connections in 98 calls), resuming where the last call stopped. Call it
        every few milliseconds to seconds. Each forgotten connection
        queues a "forgotten" event. Pinned connections are never expired. Afterwards, a
        records array or flow table far under-used is shrunk (its memory returned), and one
        filling up is grown ahead of need, its new memory faulted in without the lock held.
        """
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
            raise ValueError(f"budget must be None or an integer >= 0, not {budget!r}")
        cdef double t_now = float(now)
        cdef int64_t b = -1 if budget is None else min(budget, 1 << 62)
        cdef uint32_t n, conn_cap = 0, new_conns = 0
        cdef size_t slots = 0
        cdef void* fresh
        cdef fp_ct* ct = self.t.ct
        if ct == NULL:
            return 0
        with nogil:
            pthread_mutex_lock(&self.t.lock)
            n = ct_expire(self.t, t_now, b)
            ct_shrink(self.t)
            # Growing ahead of need: past 3/8 full (the per-frame path grows at 1/2), the bigger
            # array is allocated and faulted in here, without the lock; only the rehash (or
            # copy) holds it, so the forwarding threads never wait for the kernel's zeroing.
            # (only if the flows can reach 1/2: two per connection up to max_connections, plus
            # those the control plane set)
            if self.t.count * 8 > (self.t.mask + 1) * 3 and (self.t.mask + 1) * 2 <= C_MAX_CAPACITY * 2 and \
                    (self.t.count + 2 * (<size_t>ct.max_connections - ct.count)) * 2 > self.t.mask + 1:
                slots = self.t.mask + 1
            if <uint64_t>ct.count * 8 > <uint64_t>ct.conn_cap * 5:
                conn_cap = ct.conn_cap
                new_conns = ct_next_cap(ct)
            pthread_mutex_unlock(&self.t.lock)
            if slots:
                fresh = big_alloc_prefaulted(slots * 2 * sizeof(fp_entry))
                if fresh != NULL:
                    pthread_mutex_lock(&self.t.lock)
                    if self.t.mask + 1 == slots:
                        table_rehash_into(self.t, <fp_entry*>fresh, slots * 2)
                        fresh = NULL
                    pthread_mutex_unlock(&self.t.lock)
                    big_free(fresh, slots * 2 * sizeof(fp_entry))
            if new_conns:
                fresh = big_alloc_prefaulted(<size_t>new_conns * sizeof(fp_conn))
                if fresh != NULL:
                    pthread_mutex_lock(&self.t.lock)
                    if ct.conn_cap == conn_cap:
                        ct_adopt(ct, <fp_conn*>fresh, new_conns)
                        fresh = NULL
                    pthread_mutex_unlock(&self.t.lock)
                    big_free(fresh, <size_t>new_conns * sizeof(fp_conn))
        return n

    def connection(self, src, int sport, dst, int dport):
        """The tracked connection of this client->server 4-tuple, or None."""
        cdef fp_conn copy
        cdef uint32_t cid = 0
        cdef fp_key k = make_key(src, sport, dst, dport)
        if self.t.ct == NULL:
            return None
        pthread_mutex_lock(&self.t.lock)
        cid = conn_of(self.t, &k)
        if cid:
            copy = CONN(self.t.ct, cid)[0]
        pthread_mutex_unlock(&self.t.lock)
        return conn_object(&copy, R_NONE) if cid else None

    def find_token(self, token):
        """The tracked connection with this Migrate Token (the most recently created if several), or None."""
        check_u32(token, "token", 64)
        cdef fp_conn copy
        cdef uint32_t cid = 0
        if token is None or self.t.ct == NULL:
            return None
        cdef uint64_t tok = token
        pthread_mutex_lock(&self.t.lock)
        cid = tok_find(self.t.ct, tok)
        if cid:
            copy = CONN(self.t.ct, cid)[0]
        pthread_mutex_unlock(&self.t.lock)
        return conn_object(&copy, R_NONE) if cid else None

    def connections(self, limit=None):
        """The `limit` most recently created (or restored) connections (None: all), oldest first."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be None or an integer >= 0, not {limit!r}")
        cdef fp_ct* ct = self.t.ct
        cdef fp_conn* buf
        cdef size_t n = 0, want, i
        cdef uint32_t cid
        cdef uint64_t lim = 0xFFFFFFFF if limit is None or limit > 0xFFFFFFFF else limit
        if ct == NULL:
            return []
        pthread_mutex_lock(&self.t.lock)
        want = ct.count if lim > ct.count else lim
        buf = <fp_conn*>malloc(want * sizeof(fp_conn) + 1)
        if buf != NULL:
            cid = ct.all_tail
            while cid and n < want:
                buf[want - 1 - n] = CONN(ct, cid)[0]
                n += 1
                cid = CONN(ct, cid).aprev
        pthread_mutex_unlock(&self.t.lock)
        if buf == NULL:
            raise MemoryError()
        try:
            return [conn_object(&buf[i], R_NONE) for i in range(want - n, want)]
        finally:
            free(buf)

    def pin(self, src, int sport, dst, int dport, on=True):
        """The control plane owns this connection's lifecycle (on), or gives it back: a pinned
        connection is never expired or evicted, and its frames get only their flow entries'
        verdicts (no state changes, no tagging). False if there is no such connection."""
        cdef fp_ct* ct = self.t.ct
        cdef uint32_t cid
        cdef fp_conn* c
        cdef bint pin_on = bool(on)
        cdef fp_key k = make_key(src, sport, dst, dport)
        if ct == NULL:
            return False
        pthread_mutex_lock(&self.t.lock)
        cid = conn_of(self.t, &k)
        if cid:
            c = CONN(ct, cid)
            if pin_on and not c.flags & CF_PINNED:
                ct_lremove(ct, cid)
                c.flags |= CF_PINNED
                ct.n_pinned += 1
            elif not pin_on and c.flags & CF_PINNED:
                c.flags &= ~CF_PINNED
                ct.n_pinned -= 1
                ct_lpush(ct, cid, state_list(c))
        pthread_mutex_unlock(&self.t.lock)
        return bool(cid)

    def forget(self, src, int sport, dst, int dport):
        """Remove the connection and both its flow entries (no event); False if unknown."""
        cdef uint32_t cid
        cdef fp_key k = make_key(src, sport, dst, dport)
        if self.t.ct == NULL:
            return False
        pthread_mutex_lock(&self.t.lock)
        cid = conn_of(self.t, &k)
        if cid:
            ct_forget(self.t, cid, R_NONE, 0)
        pthread_mutex_unlock(&self.t.lock)
        return bool(cid)

    def restore_connection(self, conn, now=None):
        """Re-create a connection (both PASS entries, its token) from a record, e.g. a
        journaled Conn after a restart; it counts as active at `now` (default: its latest
        recorded time). A connection on either tuple is replaced. Returns it as recorded."""
        cdef fp_ct* ct = self.t.ct
        cdef fp_conn tpl, copy
        cdef fp_key k, r
        cdef fp_entry* e
        cdef uint32_t cid
        cdef int err = 0, state
        cdef bint half, has_token
        if ct == NULL:
            raise ValueError("restore_connection() needs a table with conntrack=True")
        rec, cpk, spk = check_conn(conn)
        if now is not None:
            now = _check_number(now, "now")
        k = make_key(cpk, rec.client_port, spk, rec.server_port)
        if k.sport == k.dport and memcmp(k.src, k.dst, 16) == 0:
            raise ValueError("a connection's two directions must differ")
        state = CT_STATES.index(rec.state)
        memset(&tpl, 0, sizeof(fp_conn))
        tpl.key = k
        tpl.state = state
        tpl.created = rec.created
        tpl.flags = CF_USED
        if rec.tagged:
            tpl.flags |= CF_TAGGED
        if rec.pinned:
            tpl.flags |= CF_PINNED
        syn_record(rec.client_syn, &tpl.client_isn, &tpl.client_mss, &tpl.client_wscale, &tpl.client_opts,
                   &tpl.client_tsval)
        if rec.server_syn is not None:
            tpl.flags |= CF_SERVER
            syn_record(rec.server_syn, &tpl.server_isn, &tpl.server_mss, &tpl.server_wscale, &tpl.server_opts,
                       &tpl.server_tsval)
        if rec.established_at is not None:
            tpl.flags |= CF_ESTABLISHED
            tpl.established_at = rec.established_at
        if rec.closed_at is not None:
            tpl.closed_at = rec.closed_at
        tpl.closed_by = CT_CLOSED_BY.index(rec.closed_by)
        if rec.client_mac is not None:
            tpl.flags |= CF_MACS
            memcpy(tpl.client_mac, <const char*>rec.client_mac, 6)
            memcpy(tpl.router_mac, <const char*>rec.router_mac, 6)
        tpl.active = now if now is not None else max(x for x in (rec.created, rec.established_at, rec.closed_at)
                                                     if x is not None)
        if rec.token is not None:
            tpl.token = rec.token
        half = state == CS_SYN_SENT and not rec.pinned
        has_token = rec.token is not None
        reverse_key(&k, &r)
        with nogil:
            pthread_mutex_lock(&self.t.lock)
            e = table_find(self.t, &k, key_hash(&k))
            if e != NULL and e.conn:
                ct_forget(self.t, e.conn, R_NONE, 0)
            e = table_find(self.t, &r, key_hash(&r))
            if e != NULL and e.conn:
                ct_forget(self.t, e.conn, R_NONE, 0)
            if not ct_make_room(self.t, half):
                err = 1
            elif table_room(self.t, 2) < 0 or ct_reserve(ct) < 0:
                err = 2
            else:
                cid = ct_alloc(ct)
                tpl.serial = CONN(ct, cid).serial
                tpl.aprev = CONN(ct, cid).aprev
                CONN(ct, cid)[0] = tpl
                ct.n_state[state] += 1
                if tpl.flags & CF_PINNED:
                    ct.n_pinned += 1
                if has_token:
                    tok_insert(ct, cid)
                if not tpl.flags & CF_PINNED:
                    ct_lpush(ct, cid, state_list(&tpl))
                ct_link(self.t, cid)
                if state == CS_SYN_SENT and tpl.flags & CF_SERVER:  # the client's ACK establishes it
                    e = table_find(self.t, &k, key_hash(&k))
                    if e != NULL:
                        e.awaiting_ack = 1
                copy = CONN(ct, cid)[0]
            pthread_mutex_unlock(&self.t.lock)
        if err == 1:
            raise MemoryError(f"the table tracks at most {ct.max_connections} connections")
        if err == 2:
            raise MemoryError("out of memory (or the flow table is full)")
        return conn_object(&copy, R_NONE)

    def events(self, limit=1024):
        """Drain up to `limit` queued events, oldest first, as (kind, Conn): "established",
        "closed" and "forgotten" (Conn.forgotten says why). The queue holds event_capacity
        events; when it is full the oldest are dropped (counted events_dropped)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an integer >= 0, not {limit!r}")
        cdef fp_ct* ct = self.t.ct
        cdef fp_event* buf
        cdef size_t n = 0, i
        cdef uint64_t lim = 0xFFFFFFFF if limit > 0xFFFFFFFF else limit
        if ct == NULL:
            return []
        pthread_mutex_lock(&self.t.lock)
        n = ct.ev_len if lim > ct.ev_len else lim
        buf = <fp_event*>malloc(n * sizeof(fp_event) + 1)
        if buf != NULL:
            for i in range(n):
                buf[i] = ct.events[(ct.ev_head + i) % ct.ev_cap]
            ct.ev_head = (ct.ev_head + n) % ct.ev_cap
            ct.ev_len -= n
        pthread_mutex_unlock(&self.t.lock)
        if buf == NULL:
            raise MemoryError()
        try:
            return [(CT_EVENTS[buf[i].kind], conn_object(&buf[i].conn, buf[i].reason)) for i in range(n)]
        finally:
            free(buf)

    def _memory(self):
        """Bytes the table has allocated: {"slots", "connections", "token_index", "events"}."""
        cdef fp_ct* ct = self.t.ct
        pthread_mutex_lock(&self.t.lock)
        out = {"slots": (self.t.mask + 1) * sizeof(fp_entry),
               "connections": ct.conn_cap * sizeof(fp_conn) if ct != NULL else 0,
               "token_index": (ct.tok_mask + 1) * sizeof(uint32_t) if ct != NULL else 0,
               "events": ct.ev_cap * sizeof(fp_event) if ct != NULL else 0}
        pthread_mutex_unlock(&self.t.lock)
        return out


cdef uint32_t conn_of(fp_table* t, const fp_key* k) noexcept nogil:
    """The connection whose client->server 4-tuple is k (the caller holds the lock), or 0."""
    cdef fp_entry* e = table_find(t, k, key_hash(k))
    if e == NULL or not e.conn or e.role != ROLE_C2S:
        return 0
    return e.conn


cdef void syn_record(object syn, uint32_t* isn, uint16_t* mss, uint8_t* wscale, uint8_t* opts,
                     uint32_t* tsval) except *:
    isn[0] = syn.isn
    opts[0] = 0
    if syn.mss is not None:
        opts[0] |= SO_MSS
        mss[0] = syn.mss
    if syn.wscale is not None:
        opts[0] |= SO_WSCALE
        wscale[0] = syn.wscale
    if syn.sack_permitted:
        opts[0] |= SO_SACK
    if syn.timestamps:
        opts[0] |= SO_TS
        tsval[0] = syn.tsval or 0
    if syn.migrate_permitted:
        opts[0] |= SO_MP


cdef object syn_object(uint32_t isn, uint16_t mss, uint8_t wscale, uint8_t opts, uint32_t tsval):
    return SynOptions(isn, mss if opts & SO_MSS else None, wscale if opts & SO_WSCALE else None,
                      bool(opts & SO_SACK), bool(opts & SO_TS), tsval if opts & SO_TS else None, bool(opts & SO_MP))


cdef object conn_object(const fp_conn* c, int reason):
    """A Conn from a record (a copy taken under the lock)."""
    cdef int alen = 4 if c.key.family == 4 else 16
    return Conn(address_text((<const char*>c.key.src)[:alen]), c.key.sport,
                address_text((<const char*>c.key.dst)[:alen]), c.key.dport, CT_STATES[c.state], c.created,
                c.closed_at if c.state == CS_CLOSED else None,
                syn_object(c.client_isn, c.client_mss, c.client_wscale, c.client_opts, c.client_tsval),
                syn_object(c.server_isn, c.server_mss, c.server_wscale, c.server_opts, c.server_tsval)
                if c.flags & CF_SERVER else None,
                bool(c.flags & CF_TAGGED), c.token if c.flags & CF_TOKEN else None,
                (<const char*>c.client_mac)[:6] if c.flags & CF_MACS else None,
                (<const char*>c.router_mac)[:6] if c.flags & CF_MACS else None,
                bool(c.flags & CF_PINNED), c.established_at if c.flags & CF_ESTABLISHED else None,
                CT_CLOSED_BY[c.closed_by], CT_REASONS[reason])


def _sha1(data):
    """SHA-1 of data, by the engine's own C implementation (tests compare it with hashlib)."""
    cdef Py_buffer pb
    cdef uint8_t out[20]
    get_buffer(data, &pb, False)
    sha1(<const uint8_t*>pb.buf, pb.len, out)
    PyBuffer_Release(&pb)
    return (<const char*>out)[:20]


# --- HMAC-SHA256 for the group's soft-state sync ---------------------------------------------
# Each sync datagram is sealed or checked once; at 100,000 connections per replica that is
# ~15,000 datagrams a second per node, and through hashlib each costs seven calls (copy,
# update, digest twice, compare). Here it is one call into OpenSSL's SHA-256 (SHA-NI where
# the CPU has it), the pads' states copied as plain structs.

cdef extern from "<openssl/sha.h>" nogil:
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c)
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n)
    int SHA256_Final(unsigned char* md, SHA256_CTX* c)

cdef extern from "<openssl/crypto.h>" nogil:
    int CRYPTO_memcmp(const void* a, const void* b, size_t n)

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
import hashlib

cdef enum:
    MAC_LEN = 32


cdef class Mac:
    """HMAC-SHA256 under one key (RFC 2104): mac(data) -> 32 bytes; seal(head, body) ->
    head + body + mac; check(datagram) -> whether its last 32 bytes are the MAC of the rest
    (in constant time)."""

    cdef SHA256_CTX inner, outer

    def __init__(self, key=b""):
        cdef bytes k = bytes(key)
        cdef uint8_t pad[64]
        cdef int i
        if len(k) > 64:
            k = hashlib.sha256(k).digest()
        k = k.ljust(64, b"\0")
        for i in range(64):
            pad[i] = (<uint8_t>k[i]) ^ 0x36
        SHA256_Init(&self.inner)
        SHA256_Update(&self.inner, pad, 64)
        for i in range(64):
            pad[i] = (<uint8_t>k[i]) ^ 0x5C
        SHA256_Init(&self.outer)
        SHA256_Update(&self.outer, pad, 64)

    cdef void _mac(self, const uint8_t* p, size_t n, uint8_t* out) noexcept nogil:
        cdef SHA256_CTX c = self.inner
        SHA256_Update(&c, p, n)
        SHA256_Final(out, &c)
        c = self.outer
        SHA256_Update(&c, out, MAC_LEN)
        SHA256_Final(out, &c)

    def __call__(self, data):
        cdef Py_buffer pb
        cdef uint8_t out[MAC_LEN]
        get_buffer(data, &pb, False)
        self._mac(<const uint8_t*>pb.buf, pb.len, out)
        PyBuffer_Release(&pb)
        return PyBytes_FromStringAndSize(<char*>out, MAC_LEN)

    def seal(self, bytes head not None, bytes body not None):
        cdef Py_ssize_t hn = PyBytes_GET_SIZE(head), bn = PyBytes_GET_SIZE(body)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, hn + bn + MAC_LEN)
        cdef uint8_t* o = <uint8_t*>PyBytes_AS_STRING(out)
        memcpy(o, PyBytes_AS_STRING(head), hn)
        memcpy(o + hn, PyBytes_AS_STRING(body), bn)
        self._mac(o, hn + bn, o + hn + bn)
        return out

    def check(self, data):
        cdef Py_buffer pb
        cdef uint8_t out[MAC_LEN]
        cdef bint ok = False
        get_buffer(data, &pb, False)
        if pb.len >= MAC_LEN:
            self._mac(<const uint8_t*>pb.buf, pb.len - MAC_LEN, out)
            ok = CRYPTO_memcmp(out, <const uint8_t*>pb.buf + pb.len - MAC_LEN, MAC_LEN) == 0
        PyBuffer_Release(&pb)
        return ok
