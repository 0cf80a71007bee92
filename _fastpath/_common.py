"""Constants, option encoders, Migrate crypto and packet builders shared by both builds.

Nothing here runs per forwarded frame: builders and crypto serve the control plane
(a Migrate SYN, a SYN/ACK reply, a RST), and each engine binds the builders to its
own checksum routine so both builds' checksums are exercised.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import socket
import struct
from typing import NamedTuple, Optional, Union

Address = Union[str, bytes, bytearray, ipaddress.IPv4Address, ipaddress.IPv6Address]

# --- Parse outcome ----------------------------------------------------------------------


class Err(enum.IntEnum):
    """Why a frame could not be parsed; OK when it could (even if it is not TCP)."""

    OK = 0
    TRUNCATED_ETHERNET = 1  # shorter than 14 bytes, or a VLAN tag cut off
    TRUNCATED_IP = 2  # fewer bytes than a minimal IPv4/IPv6 header
    BAD_IP_VERSION = 3  # version nibble disagrees with the EtherType
    BAD_IHL = 4  # IPv4 IHL < 5 or the header runs past the frame
    BAD_IP_LENGTH = 5  # IPv4 total length / IPv6 payload length lies
    BAD_IPV6_EXTENSION = 6  # an extension header runs past the packet, or too many
    TRUNCATED_L4 = 7  # fewer bytes than a minimal TCP (20) or UDP (8) header
    BAD_TCP_OFFSET = 8  # TCP data offset < 5 or past the segment
    BAD_TCP_OPTION = 9  # option length 0 or 1, or running past the header


N_ERRORS = len(Err)


class FrameError(ValueError):
    """A frame given to a rewrite or checksum call could not be parsed."""

    def __init__(self, error: int, what: str = "frame") -> None:
        self.error = Err(error)
        super().__init__(f"malformed {what}: {self.error.name}")


class Verdict(enum.IntEnum):
    """What the flow table decides for a frame."""

    PASS = 0  # forward unchanged
    REWRITE = 1  # rewrite addresses/ports, then forward
    DROP = 2
    PYTHON = 3  # hand to the control plane


PASS, REWRITE, DROP, PYTHON = 0, 1, 2, 3

LINK_ETHERNET = 0
LINK_RAW = 1  # the buffer starts at the IP header

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# --- TCP options ------------------------------------------------------------------------

OPT_EOL, OPT_NOP, OPT_MSS, OPT_WSCALE, OPT_SACK_PERMITTED, OPT_SACK, OPT_TIMESTAMPS = 0, 1, 2, 3, 4, 5, 8
OPT_EXP1, OPT_EXP2 = 253, 254  # RFC 6994 shared experimental kinds
MAX_TCP_OPTIONS = 40

# RFC 6994 experiment identifiers for the draft's two options. Not IANA-registered:
# the draft never got kind numbers, and these two are unassigned in the ExID registry.
EXID_MIGRATE_PERMITTED = 0x4D50  # "MP"
EXID_MIGRATE = 0x4D47  # "MG"
MIGRATE_PERMITTED_LEN = 5  # kind, len, ExID(2), curve id: the insecure form (curve 0, K = 0)
MIGRATE_PERMITTED_SECURE_LEN = 22  # ... plus 17 bytes of ECDH key data
MIGRATE_LEN = 21  # kind, len, ExID(2), P|ReqNo, Token(8), Request(8)
MIGRATE_KEY_LEN = 25  # K is left-padded to 200 bits

# Bits of FrameView.opts / the batch record's opts byte.
HAS_SACK_PERMITTED = 0x01
HAS_TIMESTAMPS = 0x02
HAS_SACK = 0x04
HAS_MIGRATE_PERMITTED = 0x08
HAS_MIGRATE = 0x10
IS_FRAGMENT = 0x20
HAS_MSS = 0x40
HAS_WSCALE = 0x80

# --- Batch parse record -----------------------------------------------------------------

# One fixed-size little-endian record per frame from parse_batch(); unpack with
# struct.iter_unpack(RECORD_FORMAT, records) or a numpy structured dtype.
RECORD_FORMAT = "<BBBBHHHHHHIIIIIHBB"
RECORD_SIZE = struct.calcsize(RECORD_FORMAT)
RECORD_FIELDS = (
    "error", "ip_version", "ip_proto", "flags", "l3_off", "l4_off", "payload_off",
    "sport", "dport", "window", "payload_len", "seq", "ack", "tsval", "tsecr", "mss",
    "wscale", "opts",
)  # wscale is 255 when absent
assert RECORD_SIZE == 40


class Record(NamedTuple):
    error: int
    ip_version: int
    ip_proto: int
    flags: int
    l3_off: int
    l4_off: int
    payload_off: int
    sport: int
    dport: int
    window: int
    payload_len: int
    seq: int
    ack: int
    tsval: int
    tsecr: int
    mss: int
    wscale: int
    opts: int


def iter_records(records, count: int):
    """Decode the first count records written by parse_batch()."""
    view = memoryview(records).cast("B")[: count * RECORD_SIZE]
    return [Record(*r) for r in struct.iter_unpack(RECORD_FORMAT, view)]


# --- Flow table snapshots ---------------------------------------------------------------


class Flow(NamedTuple):
    """A snapshot of one flow-table entry (the key is as seen on the wire).

    The tracked fields (flags_seen to sack) say where the connection stands at a
    takeover, so only frames with valid checksums move them, and ack never passes the
    bytes the peer entry has sent. New fields go at the end: callers unpack by position.
    """

    src: bytes
    sport: int
    dst: bytes
    dport: int
    verdict: int
    new_src: Optional[bytes]
    new_sport: int
    new_dst: Optional[bytes]
    new_dport: int
    punt_flags: int
    frames: int
    bytes: int
    last_seen: float
    flags_seen: int
    seq_next: int  # highest seq + length (SYN and FIN count) forwarded or punted, 0 before any
    ack: int  # latest acknowledgment carried with ACK, never behind itself or past the peer's seq_next
    window: int  # raw window field of the frame whose ack was taken
    tsval: int
    tsecr: int
    ts_seen: bool
    sack: tuple = ()  # (left, right) blocks of the latest SACK with the current ack; () when none
    ignored: int = 0  # frames that moved nothing: bad checksum, or ack beyond what the peer sent


MAX_CAPACITY = 1 << 24  # flows per table; far above what one appliance carries

STAT_NAMES = ("frames", "bytes", "passed", "rewritten", "dropped", "to_python",
              "malformed", "non_tcp", "misses", "hits", "untracked_bad_csum", "ack_beyond_sent")


# --- Addresses --------------------------------------------------------------------------


def pack_address(addr: Address) -> bytes:
    """An IPv4 or IPv6 address as 4 or 16 packed bytes."""
    if isinstance(addr, (bytes, bytearray)):
        if len(addr) not in (4, 16):
            raise ValueError(f"a packed address has 4 or 16 bytes, not {len(addr)}")
        return bytes(addr)
    if isinstance(addr, str):  # the common case, without ipaddress's parser (a hot path)
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                return socket.inet_pton(family, addr)
            except OSError:
                pass
    return ipaddress.ip_address(addr).packed


def address_text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def pack_mac(mac) -> bytes:
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        return bytes(mac)
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {mac!r}")
    return bytes(int(p, 16) for p in parts)


# --- Unsigned 32-bit sequence arithmetic (RFC 793 / RFC 1982 style) ---------------------

MASK32 = 0xFFFFFFFF


def seq_add(a: int, n: int) -> int:
    return (a + n) & MASK32


def seq_diff(a: int, b: int) -> int:
    """a - b as a signed 32-bit distance."""
    d = (a - b) & MASK32
    return d - 0x100000000 if d & 0x80000000 else d


def seq_lt(a: int, b: int) -> bool:
    return seq_diff(a, b) < 0


def seq_le(a: int, b: int) -> bool:
    return seq_diff(a, b) <= 0


def seq_gt(a: int, b: int) -> bool:
    return seq_diff(a, b) > 0


def seq_ge(a: int, b: int) -> bool:
    return seq_diff(a, b) >= 0


def seq_in_window(seq: int, left: int, size: int) -> bool:
    """left <= seq < left + size, modulo 2**32 (size < 2**31)."""
    return ((seq - left) & MASK32) < size


# --- Migrate crypto (draft-snoeren-tcp-migrate-00 §3) ------------------------------------


def _key_bytes(k: bytes) -> bytes:
    if len(k) > MIGRATE_KEY_LEN:
        raise ValueError(f"the Migrate key K has at most {MIGRATE_KEY_LEN} bytes")
    return bytes(MIGRATE_KEY_LEN - len(k)) + bytes(k)


def migrate_token(ni: int, na: int, k: bytes = b"") -> int:
    """Token = top 64 bits of SHA-1(Ni, Na, K); K = 0 for the insecure variant."""
    digest = hashlib.sha1(struct.pack("!II", ni & MASK32, na & MASK32) + _key_bytes(k)).digest()
    return int.from_bytes(digest[:8], "big")


def migrate_request(ni: int, na: int, k: bytes, s: int, reqno: int) -> int:
    """Request = top 64 bits of SHA-1(Ni, Na, K, S, ReqNo), S the Migrate SYN's sequence number."""
    data = struct.pack("!II", ni & MASK32, na & MASK32) + _key_bytes(k) + struct.pack("!IB", s & MASK32, reqno & 0x7F)
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big")


def reqno_newer(a: int, b: int) -> bool:
    """Whether ReqNo a is newer than b, modulo 128 (half the space ahead)."""
    d = (a - b) & 0x7F
    return 0 < d < 64


def reqno_next(a: int) -> int:
    return (a + 1) & 0x7F


# --- Option encoders --------------------------------------------------------------------


def opt_mss(mss: int) -> bytes:
    return struct.pack("!BBH", OPT_MSS, 4, mss)


def opt_wscale(shift: int) -> bytes:
    return struct.pack("!BBB", OPT_WSCALE, 3, shift)


def opt_sack_permitted() -> bytes:
    return bytes((OPT_SACK_PERMITTED, 2))


def opt_sack(blocks) -> bytes:
    blocks = list(blocks)
    if not 1 <= len(blocks) <= 4:
        raise ValueError("a SACK option carries 1 to 4 blocks")
    return bytes((OPT_SACK, 2 + 8 * len(blocks))) + b"".join(struct.pack("!II", l & MASK32, r & MASK32) for l, r in blocks)


def opt_timestamps(tsval: int, tsecr: int) -> bytes:
    return struct.pack("!BBII", OPT_TIMESTAMPS, 10, tsval & MASK32, tsecr & MASK32)


def opt_migrate_permitted(curve: int = 0, key: bytes = b"") -> bytes:
    """Migrate-Permitted in RFC 6994 form; curve 0 and no key is the insecure variant."""
    if curve == 0:
        if key:
            raise ValueError("curve 0 carries no key data")
        return struct.pack("!BBHB", OPT_EXP1, MIGRATE_PERMITTED_LEN, EXID_MIGRATE_PERMITTED, 0)
    if len(key) != 17:
        raise ValueError("the secure Migrate-Permitted carries 17 bytes of key data")
    return struct.pack("!BBHB", OPT_EXP1, MIGRATE_PERMITTED_SECURE_LEN, EXID_MIGRATE_PERMITTED, curve) + bytes(key)


def opt_migrate(preload: bool, reqno: int, token: int, request: int) -> bytes:
    """The Migrate option of a Migrate SYN, in RFC 6994 form."""
    return struct.pack("!BBHBQQ", OPT_EXP1, MIGRATE_LEN, EXID_MIGRATE,
                       (0x80 if preload else 0) | (reqno & 0x7F), token & 0xFFFFFFFFFFFFFFFF,
                       request & 0xFFFFFFFFFFFFFFFF)


def pad_options(options: bytes) -> bytes:
    """Pad an option list to a multiple of 4 bytes with trailing EOL/zero bytes."""
    if len(options) > MAX_TCP_OPTIONS:
        raise ValueError(f"TCP options are at most {MAX_TCP_OPTIONS} bytes, not {len(options)}")
    return bytes(options) + bytes(-len(options) % 4)


def aligned_option(option: bytes) -> bytes:
    """An option preceded by NOPs so that its end falls on a 4-byte boundary."""
    return bytes((OPT_NOP,)) * (-len(option) % 4) + bytes(option)


# --- Builders ---------------------------------------------------------------------------


def build_tcp(fix_checksums, src: Address, dst: Address, sport: int, dport: int, seq: int, ack: int = 0,
              flags: int = ACK, window: int = 65535, options: bytes = b"", payload: bytes = b"",
              ttl: int = 64, ip_id: int = 0, tos: int = 0, urgent: int = 0,
              eth_src=None, eth_dst=None, vlan: Optional[int] = None) -> bytes:
    """A TCP segment as an IP packet, or as an Ethernet frame when eth_src/eth_dst are given."""
    s, d = pack_address(src), pack_address(dst)
    if len(s) != len(d):
        raise ValueError("source and destination must both be IPv4 or both IPv6")
    opts = pad_options(options)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & MASK32, ack & MASK32, (20 + len(opts)) << 2,
                      flags & 0xFF, window, 0, urgent) + opts + bytes(payload)
    if len(s) == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + len(tcp), ip_id, 0x4000, ttl, IPPROTO_TCP, 0, s, d)
        ethertype = ETH_P_IP
    else:
        ip = struct.pack("!IHBB16s16s", (6 << 28) | (tos << 20), len(tcp), IPPROTO_TCP, ttl, s, d)
        ethertype = ETH_P_IPV6
    link = LINK_RAW
    l2 = b""
    if eth_src is not None or eth_dst is not None:
        l2 = pack_mac(eth_dst or b"\xff" * 6) + pack_mac(eth_src or bytes(6))
        if vlan is not None:
            l2 += struct.pack("!HH", ETH_P_8021Q, vlan & 0x0FFF)
        l2 += struct.pack("!H", ethertype)
        link = LINK_ETHERNET
    frame = bytearray(l2 + ip + tcp)
    fix_checksums(frame, link)
    return bytes(frame)


def build_migrate_syn(fix_checksums, src: Address, dst: Address, sport: int, dport: int, seq: int,
                      reqno: int, token: int, request: int, preload: bool = True, window: int = 0,
                      **kw) -> bytes:
    """The takeover server's Migrate SYN: only the Migrate option, as the draft requires."""
    return build_tcp(fix_checksums, src, dst, sport, dport, seq, 0, SYN, window,
                     aligned_option(opt_migrate(preload, reqno, token, request)), **kw)


def build_migrate_synack(fix_checksums, src: Address, dst: Address, sport: int, dport: int, seq: int,
                         ack: int, window: int, tsval: Optional[int] = None, tsecr: Optional[int] = None,
                         sack=(), **kw) -> bytes:
    """The client side's reply: seq = client's acknowledged byte, ack = client's rcv_nxt.

    sack: the blocks the client holds above a hole (at most 3 with timestamps, 4 without),
    so that the new server counts them as sent and never sees the client ahead of it."""
    options = b""
    if tsval is not None:
        options = bytes((OPT_NOP, OPT_NOP)) + opt_timestamps(tsval, tsecr or 0)
    sack = list(sack)[:3 if tsval is not None else 4]
    if sack:
        options += bytes((OPT_NOP, OPT_NOP)) + opt_sack(sack)
    return build_tcp(fix_checksums, src, dst, sport, dport, seq, ack, SYN | ACK, window, options, **kw)


def build_rst(fix_checksums, src: Address, dst: Address, sport: int, dport: int, seq: int,
              ack: Optional[int] = None, **kw) -> bytes:
    """An in-window RST (RST|ACK when ack is given)."""
    flags = RST if ack is None else RST | ACK
    return build_tcp(fix_checksums, src, dst, sport, dport, seq, ack or 0, flags, 0, **kw)


def make_builders(fix_checksums):
    """The four builders bound to one engine's fix_checksums."""

    def build_tcp_(src, dst, sport, dport, seq, ack=0, flags=ACK, window=65535, options=b"", payload=b"", **kw):
        return build_tcp(fix_checksums, src, dst, sport, dport, seq, ack, flags, window, options, payload, **kw)

    def build_migrate_syn_(src, dst, sport, dport, seq, reqno, token, request, preload=True, window=0, **kw):
        return build_migrate_syn(fix_checksums, src, dst, sport, dport, seq, reqno, token, request, preload,
                                 window, **kw)

    def build_migrate_synack_(src, dst, sport, dport, seq, ack, window, tsval=None, tsecr=None, sack=(), **kw):
        return build_migrate_synack(fix_checksums, src, dst, sport, dport, seq, ack, window, tsval, tsecr, sack,
                                    **kw)

    def build_rst_(src, dst, sport, dport, seq, ack=None, **kw):
        return build_rst(fix_checksums, src, dst, sport, dport, seq, ack, **kw)

    for f, g in ((build_tcp_, build_tcp), (build_migrate_syn_, build_migrate_syn),
                 (build_migrate_synack_, build_migrate_synack), (build_rst_, build_rst)):
        f.__name__ = f.__qualname__ = g.__name__
        f.__doc__ = g.__doc__
    return build_tcp_, build_migrate_syn_, build_migrate_synack_, build_rst_


def list_options(frame, l4_off: int, tcp_hdr_len: int) -> list:
    """Every TCP option of a parsed segment as (kind, offset, length); NOP and EOL have length 1."""
    out = []
    i, end = l4_off + 20, l4_off + tcp_hdr_len
    while i < end:
        kind = frame[i]
        if kind in (OPT_EOL, OPT_NOP):
            out.append((kind, i, 1))
            if kind == OPT_EOL:
                break
            i += 1
            continue
        length = frame[i + 1]
        out.append((kind, i, length))
        i += length
    return out


def check_port(port, name: str):
    """None (leave unchanged) or a port 0..65535."""
    if port is not None and not (isinstance(port, int) and 0 <= port <= 0xFFFF):
        raise ValueError(f"{name} must be a port 0..65535, not {port!r}")
    return port


def check_u32(value, name: str, bits: int = 32):
    """None (leave unchanged) or an unsigned field value of the given width."""
    if value is not None and not (isinstance(value, int) and 0 <= value < (1 << bits)):
        raise ValueError(f"{name} must be 0..{(1 << bits) - 1}, not {value!r}")
    return value


def check_option(option) -> bytes:
    """A single well-formed TCP option with a length byte (not EOL or NOP)."""
    opt = bytes(option)
    if len(opt) < 2 or opt[0] in (OPT_EOL, OPT_NOP) or opt[1] != len(opt):
        raise ValueError("not a single well-formed TCP option (kind, length, data)")
    return opt


def check_verdict(verdict: int, name: str) -> int:
    if verdict not in (PASS, REWRITE, DROP, PYTHON):
        raise ValueError(f"{name} must be PASS, REWRITE, DROP or PYTHON, not {verdict!r}")
    return int(verdict)


# --- Connection tracking (FlowTable(conntrack=True)) -------------------------------------

# A frame's direction, for classify(..., direction=) and process_batch(..., direction=):
# OUT is client side -> network, IN is network -> client side; None means unknown (the
# table then decides as it does without connection tracking).
OUT, IN = 0, 1

# Connection states and event kinds, as Conn.state and events() report them.
CT_SYN_SENT, CT_ESTABLISHED, CT_CLOSED = "syn_sent", "established", "closed"
CT_STATES = (CT_SYN_SENT, CT_ESTABLISHED, CT_CLOSED)
EV_ESTABLISHED, EV_CLOSED, EV_FORGOTTEN = "established", "closed", "forgotten"
CT_EVENTS = (EV_ESTABLISHED, EV_CLOSED, EV_FORGOTTEN)
# Conn.closed_by: what closed it (None while open)
CT_CLOSED_BY = (None, "fin", "client_rst", "server_rst")
# Conn.forgotten: why the engine forgot it (only in a "forgotten" event's snapshot)
CT_REASONS = (None, "half_open_timeout", "idle", "closed", "evicted", "reused")

# Monotonic counters of a conntrack table (stats() keys beside STAT_NAMES), then gauges.
CT_STAT_NAMES = (
    "syns", "syns_tagged", "syns_already_permitted", "syns_no_room", "syns_untracked_full", "syns_retransmitted",
    "syns_reused", "syns_bad_checksum", "half_open_evicted", "half_open_expired", "idle_expired", "closed_expired",
    "synacks_matched", "synacks_unmatched", "synacks_retransmitted", "migrate_syns", "closed_fin",
    "closed_client_rst", "closed_server_rst", "events_dropped", "closed_evicted", "syns_on_established",
)
CT_GAUGE_NAMES = ("connections", "half_open", "established", "closed", "pinned", "tokens")

MIGRATE_PERMITTED_OPTION = bytes((OPT_EXP1, MIGRATE_PERMITTED_LEN, EXID_MIGRATE_PERMITTED >> 8,
                                  EXID_MIGRATE_PERMITTED & 0xFF, 0))  # == opt_migrate_permitted()


class SynOptions(NamedTuple):
    """What one side's SYN (or SYN/ACK) offered; mss, wscale and tsval are None when absent."""

    isn: int
    mss: Optional[int]
    wscale: Optional[int]
    sack_permitted: bool
    timestamps: bool
    tsval: Optional[int]
    migrate_permitted: bool


class Conn(NamedTuple):
    """A connection the engine tracks (FlowTable(conntrack=True)), keyed by its client->server
    4-tuple. New fields go at the end: callers may unpack by position."""

    client: str  # ip text
    client_port: int
    server: str
    server_port: int
    state: str  # CT_SYN_SENT, CT_ESTABLISHED or CT_CLOSED
    created: float  # the client's first SYN (or the restore)
    closed_at: Optional[float]
    client_syn: SynOptions
    server_syn: Optional[SynOptions]  # None before the SYN/ACK
    tagged: bool  # the engine added Migrate-Permitted to the client's SYN
    token: Optional[int]  # the Migrate Token, once established, if migrate_permitted
    client_mac: Optional[bytes]  # the client SYN's source MAC (None on a LINK_RAW table)
    router_mac: Optional[bytes]  # its destination MAC
    pinned: bool  # the control plane owns its lifecycle: never expired or evicted
    established_at: Optional[float] = None
    closed_by: Optional[str] = None  # CT_CLOSED_BY
    forgotten: Optional[str] = None  # in a "forgotten" event: why (CT_REASONS)

    @property
    def migrate_permitted(self) -> bool:
        """The connection can be migrated: our tag, or the client's own option."""
        return self.tagged or self.client_syn.migrate_permitted

    @property
    def key(self) -> tuple:
        return (self.client, self.client_port, self.server, self.server_port)


def _check_number(value, name: str, minimum: Optional[float] = None, allow_equal: bool = False) -> float:
    """A finite int or float (not a bool), above minimum (or equal to it if allow_equal)."""
    import math
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum or (allow_equal and value == minimum)
    if not ok:
        bound = "" if minimum is None else f" {'>=' if allow_equal else '>'} {minimum}"
        raise ValueError(f"{name} must be a finite number{bound}, not {value!r}")
    return float(value)


def _check_count(value, name: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ValueError(f"{name} must be an integer 1..{maximum}, not {value!r}")
    return value


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise ValueError(f"{name} must be True or False, not {value!r}")
    return bool(value)


MAX_CONNECTIONS = MAX_CAPACITY // 4  # two flow entries each, at most half the table's flows
MAX_EVENTS = 1 << 20


def check_conntrack_config(conntrack, max_connections, max_half_open, half_open_timeout, idle_timeout,
                           closed_linger, tag_syns, event_capacity) -> tuple:
    """The conntrack settings of a FlowTable, checked (ValueError naming the field) and normalized."""
    return (_check_flag(conntrack, "conntrack"),
            _check_count(max_connections, "max_connections", MAX_CONNECTIONS),
            _check_count(max_half_open, "max_half_open", MAX_CONNECTIONS),
            _check_number(half_open_timeout, "half_open_timeout", 0),
            _check_number(idle_timeout, "idle_timeout", 0),
            _check_number(closed_linger, "closed_linger", 0, allow_equal=True),
            _check_flag(tag_syns, "tag_syns"),
            _check_count(event_capacity, "event_capacity", MAX_EVENTS))


def check_direction(direction) -> int:
    """None (unknown: -1) or OUT / IN."""
    if direction is None:
        return -1
    if isinstance(direction, bool) or direction not in (OUT, IN):
        raise ValueError(f"direction must be OUT, IN or None, not {direction!r}")
    return int(direction)


def _syn_options(value, name: str) -> SynOptions:
    if isinstance(value, dict):
        value = SynOptions(**value)
    elif not isinstance(value, SynOptions):
        value = SynOptions(*value)
    check_u32(value.isn, f"{name}.isn")
    if value.mss is not None:
        check_u32(value.mss, f"{name}.mss", 16)
    if value.wscale is not None:
        check_u32(value.wscale, f"{name}.wscale", 8)
    if value.tsval is not None:
        check_u32(value.tsval, f"{name}.tsval")
    if value.tsval is not None and not value.timestamps:
        raise ValueError(f"{name}.tsval needs {name}.timestamps")
    return value._replace(sack_permitted=bool(value.sack_permitted), timestamps=bool(value.timestamps),
                          migrate_permitted=bool(value.migrate_permitted),
                          tsval=(value.tsval or 0) if value.timestamps else None)


def check_conn(conn) -> tuple:
    """A record for restore_connection(): a Conn (or its fields as a dict or sequence, e.g. from a
    journal), checked; returns (Conn, packed client, packed server)."""
    try:
        if isinstance(conn, dict):
            conn = Conn(**conn)
        elif not isinstance(conn, Conn):
            conn = Conn(*conn)
    except TypeError as exc:
        raise ValueError(f"not a connection record: {exc}") from None
    try:
        c, s = pack_address(conn.client), pack_address(conn.server)
    except ValueError:
        raise ValueError("client and server must be IP addresses") from None
    if len(c) != len(s):
        raise ValueError("client and server must both be IPv4 or both IPv6")
    check_port(conn.client_port, "client_port")
    check_port(conn.server_port, "server_port")
    if conn.client_port is None or conn.server_port is None:
        raise ValueError("client_port and server_port are needed")
    if conn.state not in CT_STATES:
        raise ValueError(f"state must be one of {CT_STATES}, not {conn.state!r}")
    created = _check_number(conn.created, "created")
    client_syn = _syn_options(conn.client_syn, "client_syn")
    server_syn = None if conn.server_syn is None else _syn_options(conn.server_syn, "server_syn")
    if conn.state == CT_ESTABLISHED and server_syn is None:
        raise ValueError("an established connection needs server_syn")
    closed_at = None
    if conn.state == CT_CLOSED:
        closed_at = _check_number(conn.closed_at if conn.closed_at is not None else created, "closed_at")
    established_at = None  # syn_sent: never, even with server_syn (the client's ACK not seen yet)
    if server_syn is not None and conn.state != CT_SYN_SENT:
        established_at = _check_number(conn.established_at if conn.established_at is not None else created,
                                       "established_at")
    macs = []
    for name in ("client_mac", "router_mac"):
        m = getattr(conn, name)
        if m is not None:
            m = pack_mac(bytes.fromhex(m.replace(":", "")) if isinstance(m, str) else m)
        macs.append(m)
    if (macs[0] is None) != (macs[1] is None):
        raise ValueError("client_mac and router_mac go together")
    closed_by = conn.closed_by if conn.state == CT_CLOSED else None
    if closed_by not in CT_CLOSED_BY:
        raise ValueError(f"closed_by must be one of {CT_CLOSED_BY}, not {closed_by!r}")
    tagged = _check_flag(conn.tagged, "tagged")
    token = None
    if server_syn is not None and (tagged or client_syn.migrate_permitted):
        token = migrate_token(client_syn.isn, server_syn.isn)
    out = Conn(address_text(c), conn.client_port, address_text(s), conn.server_port, conn.state, created,
               closed_at, client_syn, server_syn, tagged, token, macs[0], macs[1], _check_flag(conn.pinned, "pinned"),
               established_at, closed_by, None)
    return out, c, s


# What each engine module provides; _fastpath re-exports these from the build it loads.
ENGINE_API = (
    "BUILD", "FrameView", "parse", "parse_batch", "internet_checksum", "csum_update16", "csum_update32",
    "csum_update_bytes", "ipv4_header_checksum", "tcp_checksum", "verify_checksums", "fix_checksums",
    "rewrite_addresses", "rewrite_tcp", "insert_option", "build_tcp", "build_migrate_syn",
    "build_migrate_synack", "build_rst", "FlowTable", "Mac",
)
