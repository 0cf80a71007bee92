"""Support-group soft-state synchronization: wire codec, replay protection, advertisement
pages and the peer table (sans-I/O; the design of record is docs/support-group.md).

No sockets, no clock: `now` (seconds, one monotonic clock) is always passed in; datagrams go
in and out as bytes. The adapter sends every datagram of `outgoing()` to every peer (the same
bytes to each) and feeds every datagram it receives to `receive()`.

    node = SyncNode("a", "video", key, epoch=time_us(), refresh=1.0, heartbeat=0.02)
    node.add_local(entry, now)             # a response started: a delta ADVERT goes out
    node.remove_local(entry.key, now)      # the connection ended: a WITHDRAW goes out
    node.claim(dead, dead_epoch, keys, now)   # CLAIM, sent 3 times, `heartbeat` apart
    node.probe(target, nonce, now)         # PROBE_REQ: do you miss `target` too?
    node.probe_ack(target, nonce, silence_ms, state, now)   # PROBE_ACK: how I see it
    node.next_due()                        # when outgoing() next has something to send
    for kind, datagram in node.outgoing(now):  # every heartbeat tick (20 ms) or sooner
        send_to_every_peer(datagram)
    events = node.receive(datagram, now)   # never raises; node.heard_from: (sender, epoch)
    node.expire(now)                       # [(sender, key)] not refreshed for 3 x refresh
    node.peer_entries("b"), node.peer_info("b"), node.forget_peer("b"), node.counters()

Events (NamedTuples whose first field is `kind`, so they compare equal to plain tuples):
Heartbeat("heartbeat", sender, epoch, load, connections, capacity, prefixes, sync_port),
PeerNew("peer_new", sender, epoch), PeerEpoch("peer_epoch", sender, old, new) (a restart:
the old entries are already dropped), Claim("claim", sender, epoch, dead_node, dead_epoch,
keys), Withdraw("withdraw", sender, epoch, keys, dropped), ProbeReq("probe_req", sender,
epoch, target, nonce), ProbeAck("probe_ack", sender, epoch, target, nonce, silence_ms, state)
(state an index into PROBE_STATES). Most datagrams (unchanged pages)
cause no event; `heard_from` tells after each receive() whether it was a valid datagram (a
sign of life) and from whom.

Wire format (docs/support-group.md): byte 0 = version 1, then the msgpack array
[kind, group, sender, epoch, seq, body], then HMAC-SHA256(key, everything before it).
Choices the design leaves open, fixed here:
* `Entry.state` travels as an int (1 ACTIVE, 0 IDLE); the object as an index into the page's
  object table (nil when IDLE); addresses as msgpack bin. entry_from_connection() makes
  IDLE entries with req_range None and status, body_start, body_offset, body_length 0.
* `seq` starts at 1 for each (sender, epoch), grows by one per datagram of any kind, and is
  written as a msgpack uint32 (uint64 past 2**32); a CLAIM's copies have their own seqs.
* A delta ADVERT carries entries of one page only, and `page` is that page: a full version
  of the page sent after the delta is the truth about them.
* `pages` is the sender's page capacity, grown in steps of 1.5 to 3 %; pages past the last
  used one are sent empty. Every body carries it, so a receiver recognizes a page whose only
  change is `pages` as unchanged. `generation` (mod 65536) changes when the sender repacks
  (compaction after many removals); entries then change pages, and a receiver that has all
  pages of the new generation drops what none of them carried.
* Insecure mode: key None. The MAC is then HMAC-SHA256 with the empty key: it catches
  corruption but authenticates nothing; every member of the group must use it.

Sender: entries keep their page while they live (an update stays on its page when it fits);
a page's body bytes are cached and re-made only when its entries change, so a refresh of
unchanged pages costs a seq and a MAC per datagram. The refresh is paced: page i of a round
goes out at round start + i/pages x refresh (pace=False: all pages at once).

Receiver rules, per sender and epoch (seq orders everything): an entry learnt from a
datagram is replaced only by a datagram with a higher seq; a WITHDRAW leaves a tombstone
that older datagrams (still inside the replay window) cannot undo; a full page that lacks a
key of its previous version (same generation) removes it. An unchanged full page is
recognized by the digest of its body (Python's 64-bit keyed hash of the bytes) and only
bumps the page's timestamp, which every entry the page carries shares: no msgpack decode.
"""

from __future__ import annotations

import heapq
import math
import re
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, fields
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import msgpack

import _fastpath as fp

VERSION = 1
MAX_DATAGRAM = 1200
MAC_LEN = 32
HEARTBEAT, ADVERT, CLAIM, WITHDRAW, PASS, PROBE_REQ, PROBE_ACK = 1, 2, 3, 4, 5, 6, 7
KIND_NAMES = {HEARTBEAT: "heartbeat", ADVERT: "advert", CLAIM: "claim", WITHDRAW: "withdraw", PASS: "pass",
              PROBE_REQ: "probe_req", PROBE_ACK: "probe_ack"}
# a PROBE_ACK's state: the answerer's failure-detector state for the target (wire: the index)
PROBE_STATES = ("unknown", "alive", "suspect", "dead")
# ACTIVE: a response is on its way (resume it); IDLE: nothing in flight (adopt it); PENDING: a
# request waits for its response (answer it in full); RESET: nobody can continue it (when its
# server dies, a member resets the client at once instead of leaving it to hang)
ACTIVE, IDLE, PENDING, RESET = "ACTIVE", "IDLE", "PENDING", "RESET"
STATES = (ACTIVE, IDLE, PENDING, RESET)
_STATE_WIRE = {ACTIVE: 1, IDLE: 0, PENDING: 2, RESET: 3}
DIGEST_LEN = 32  # sha-256
REPLAY_WINDOW = 1024
_RING_MASK = REPLAY_WINDOW - 1  # REPLAY_WINDOW is a power of two
MAX_OBJECTS_PER_PAGE = 15  # the object table stays a fixarray; indices one-byte fixints
MAX_PAGES = 65535
_U32 = 0xFFFFFFFF
_U64 = (1 << 64) - 1
NODE_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}\Z")
DROP_REASONS = ("oversize", "version", "short", "mac", "undecodable", "group", "self",
                "stale_epoch", "replay")
_MIN_LEN = 1 + 7 + MAC_LEN  # version, the smallest possible msgpack array of six, MAC

Key = Tuple[bytes, int, bytes, int]


# --- Entries ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """The object a response carries; entries on a page refer to a shared table of these."""

    host: str
    path: str
    etag: Optional[str]
    last_modified: Optional[str]
    total_length: int
    digest: Optional[bytes] = None  # sha-256 of the whole object, when the advertiser knows it

    def __post_init__(self) -> None:
        if not _object_ok(self.host, self.path, self.etag, self.last_modified, self.total_length, self.digest):
            raise ValueError(f"invalid ObjectRef {self!r}")


@dataclass(frozen=True, slots=True)
class Entry:
    """What a peer needs to take a connection over (fields in the design's table order)."""

    client_ip: bytes
    client_port: int
    server_ip: bytes
    server_port: int
    ni: int
    na: int
    c_mss: int
    c_wscale: int
    c_sack: bool
    c_ts: bool
    s_mss: int
    s_wscale: int
    s_sack: bool
    s_ts: bool
    mp: bool
    reqno: int
    state: str
    object: Optional[ObjectRef]
    req_range: Optional[str]
    status: int
    body_start: int
    body_offset: int
    body_length: int
    reason: Optional[str] = None  # RESET: why it cannot be continued

    def __post_init__(self) -> None:
        reason = _entry_problem(tuple(getattr(self, n) for n in ENTRY_FIELDS))
        if reason:
            raise ValueError(f"invalid Entry: {reason}")

    @property
    def key(self) -> Key:
        return (self.client_ip, self.client_port, self.server_ip, self.server_port)


ENTRY_FIELDS = tuple(f.name for f in fields(Entry))
_OBJ_POS = ENTRY_FIELDS.index("object")
_STATE_POS = ENTRY_FIELDS.index("state")


def _is_int(v, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_opt_str(v) -> bool:
    return v is None or type(v) is str


def _object_ok(host, path, etag, last_modified, total_length, digest=None) -> bool:
    return (type(host) is str and type(path) is str and _is_opt_str(etag)
            and _is_opt_str(last_modified) and _is_int(total_length, 0, _U64)
            and (digest is None or (type(digest) is bytes and len(digest) == DIGEST_LEN)))


def _addr_ok(a) -> bool:
    return type(a) is bytes and len(a) in (4, 16)


def _entry_problem(v: tuple) -> Optional[str]:
    """Why the 24 Entry values (Python form: state a str, object an ObjectRef) are bad, or None."""
    (cip, cport, sip, sport, ni, na, c_mss, c_ws, c_sack, c_ts, s_mss, s_ws, s_sack, s_ts, mp,
     reqno, state, obj, req_range, status, body_start, body_offset, body_length, reason) = v
    if not (_addr_ok(cip) and _addr_ok(sip) and len(cip) == len(sip)):
        return "addresses must be packed, 4 or 16 bytes, of one family"
    if not (_is_int(cport, 0, 65535) and _is_int(sport, 0, 65535)):
        return "ports must be 0..65535"
    if not (_is_int(ni, 0, _U32) and _is_int(na, 0, _U32) and _is_int(body_start, 0, _U32)):
        return "sequence numbers must be unsigned 32-bit"
    if not (_is_int(c_mss, 0, 65535) and _is_int(s_mss, 0, 65535)):
        return "mss must be 0..65535"
    if not (_is_int(c_ws, -1, 14) and _is_int(s_ws, -1, 14)):
        return "wscale must be -1..14"
    if not all(type(b) is bool for b in (c_sack, c_ts, s_sack, s_ts, mp)):
        return "c_sack, c_ts, s_sack, s_ts, mp must be bool"
    if not _is_int(reqno, 0, 127):
        return "reqno must be 0..127"
    if state in (ACTIVE, PENDING):
        if type(obj) is not ObjectRef:
            return f"an {state} entry needs an ObjectRef"
    elif state == IDLE:
        if obj is not None:
            return "an IDLE entry has no object"
    elif state == RESET:
        if obj is not None and type(obj) is not ObjectRef:
            return "a RESET entry's object is an ObjectRef or None"
    else:
        return "state must be ACTIVE, IDLE, PENDING or RESET"
    if not (_is_opt_str(req_range) and _is_opt_str(reason)):
        return "req_range and reason must be str or None"
    if not (_is_int(status, 0, 999) and _is_int(body_offset, 0, _U64) and _is_int(body_length, 0, _U64)):
        return "status, body_offset, body_length out of range"
    return None


_B, _I, _T, _N, _S = bytes, int, bool, type(None), str
_WIRE_TYPES = frozenset((_B, _I, _B, _I, _I, _I, _I, _I, _T, _T, _I, _I, _T, _T, _T, _I, _I, o, r, _I, _I, _I, _I,
                         why) for o in (_I, _N) for r in (_S, _N) for why in (_S, _N))
_WIRE_STATES = {w: s for s, w in _STATE_WIRE.items()}


def _wire_entry(a, objs: list) -> "Entry":
    """An Entry from its compact wire array (objects: the page's ObjectRefs); raises _Bad."""
    if type(a) is not list or tuple(map(type, a)) not in _WIRE_TYPES:
        raise _Bad
    (cip, cport, sip, sport, ni, na, c_mss, c_ws, _, _, s_mss, s_ws, _, _, _, reqno, st, idx, _, status,
     body_start, body_offset, body_length, _) = a
    if not (len(cip) == len(sip) and (len(cip) == 4 or len(cip) == 16) and 0 <= cport <= 65535
            and 0 <= sport <= 65535 and 0 <= ni <= _U32 and 0 <= na <= _U32 and 0 <= body_start <= _U32
            and 0 <= c_mss <= 65535 and 0 <= s_mss <= 65535 and -1 <= c_ws <= 14 and -1 <= s_ws <= 14
            and 0 <= reqno <= 127 and 0 <= status <= 999 and 0 <= body_offset <= _U64
            and 0 <= body_length <= _U64):
        raise _Bad
    state = _WIRE_STATES.get(st)
    if idx is not None:
        if state == IDLE or not 0 <= idx < len(objs):
            raise _Bad
        a[_OBJ_POS] = objs[idx]
    elif state in (ACTIVE, PENDING) or state is None:
        raise _Bad
    a[_STATE_POS] = state
    return _new_entry(a)


def _unchecked(cls, names):
    """A constructor of the frozen, slotted dataclass cls from already validated values,
    without its checks (the receive path): the slots' setters, unrolled."""
    env = {"_new": object.__new__, "cls": cls}
    lines = ["def make(v):", "    o = _new(cls)"]
    for i, n in enumerate(names):
        env[f"_s{i}"] = getattr(cls, n).__set__
        lines.append(f"    _s{i}(o, v[{i}])")
    lines.append("    return o")
    exec("\n".join(lines), env)
    return env["make"]


_new_entry = _unchecked(Entry, ENTRY_FIELDS)
_new_object = _unchecked(ObjectRef, ("host", "path", "etag", "last_modified", "total_length", "digest"))


def entry_from_connection(conn, validators: str = "strict", digest_of=None) -> Optional[Entry]:
    """What to advertise for a stream-map Connection (appliance.streammap), or None.

    None when no member could act on it at all: no Migrate-Permitted on the client's SYN,
    handshake not complete, closing or closed. Otherwise every connection is advertised, so
    that when its server dies a member always acts:
    * IDLE: nothing in flight (no request yet, or the latest response known to be delivered:
      the client acked its last byte): a taker adopts it and relays later requests.
    * PENDING: one GET waits for its response (body_start: where that response will begin):
      a taker answers it in full from its own server.
    * ACTIVE: a resumable response is on its way, with the validators the group's
      `validators` level needs (strict: ETag or Last-Modified; last-modified: Last-Modified;
      digest: the object's sha-256, from `digest_of(request, response)` or the response).
    * RESET, with the reason, when nobody could continue it byte-exact (a response that is
      chunked, without a length or not 200/206, a method other than GET, pipelined requests,
      a request stream the tap lost, validators missing at this level): a taker resets the
      client at once instead of leaving it to hang.
    """
    if not conn.migrate_permitted or conn.ni is None or conn.na is None:
        return None
    if conn.state != "established" or conn.client_options is None or conn.server_options is None:
        return None
    if not getattr(conn, "client_acked", True):
        return None  # half-open: its client has not acknowledged the SYN/ACK (a SYN flood)
    co, so = conn.client_options, conn.server_options
    common = (conn.client, conn.client_port, conn.server, conn.server_port, conn.ni, conn.na,
              co.mss or 0, -1 if co.wscale is None else co.wscale, bool(co.sack_permitted), bool(co.timestamps),
              so.mss or 0, -1 if so.wscale is None else so.wscale, bool(so.sack_permitted), bool(so.timestamps),
              True, getattr(conn, "reqno", 0) & 0x7F)
    req = conn.current
    resp = req.response if req is not None else None

    def reset(why: str) -> Entry:
        obj = None
        if req is not None:
            obj = ObjectRef(req.host or "", req.target, None, None, 0)
        return Entry(*common, RESET, obj, None, 0, 0, 0, 0, why)

    if getattr(conn, "reset_reason", None):
        return reset(conn.reset_reason)
    stream = conn.stream
    if stream is None or stream.lost is not None:
        return reset(f"request stream lost ({stream.lost if stream is not None else 'no stream'})")
    if conn.upgraded:
        return reset("connection upgraded")
    pending = conn.pending
    if len(pending) > 1:
        return reset("pipelined requests")
    if pending:
        p = pending[0]
        if resp is not None and not _delivered(conn, req, resp):
            return reset("a request pipelined behind a response in flight")
        if p.method != "GET":
            req = p
            return reset(f"{p.method} request")
        if _has_body(p.headers):
            req = p
            return reset("GET with a body")
        first = conn.resp_min_seq if conn.resp_min_seq is not None else (conn.na + 1) & _U32
        obj = ObjectRef(p.host or "", p.target, None, None, 0)
        return Entry(*common, PENDING, obj, p.range_raw, 0, first, 0, 0)
    if resp is None or _delivered(conn, req, resp):
        return Entry(*common, IDLE, None, None, 0, 0, 0, 0)
    if not resp.resumable or resp.body_start is None:
        return reset(resp.unresumable_reason or "response not resumable")
    digest = None
    if validators == "strict" and resp.etag is None and resp.last_modified is None:
        return reset("no ETag or Last-Modified (validators = strict)")
    if validators == "last-modified" and resp.last_modified is None:
        return reset("no Last-Modified (validators = last-modified)")
    if validators == "digest":
        digest = resp.digest if resp.digest is not None else (digest_of(req, resp) if digest_of else None)
        if digest is None:
            return reset("no digest of the object (validators = digest)")
    total = resp.total_length
    offset = resp.content_range.first if resp.status == 206 else 0
    obj = ObjectRef(req.host or "", req.target, resp.etag, resp.last_modified, total, digest)
    return Entry(*common, ACTIVE, obj, req.range_raw, resp.status, resp.body_start, offset, resp.content_length)


def _delivered(conn, req, resp) -> bool:
    """The client acked the response's last byte (for a response without a body: its head)."""
    if resp.body_start is None:
        return False
    if req.method == "HEAD" or resp.status in (204, 304) or (resp.status or 0) < 200:
        end = resp.body_start
    elif resp.content_length == 0:
        return True
    else:
        end = resp.body_end
    last = conn.last_client
    return (end is not None and last is not None and last.ack is not None
            and ((last.ack - end) & _U32) < 0x80000000)


def _has_body(headers) -> bool:
    for n, v in headers:
        n = n.lower()
        if n == "transfer-encoding" or (n == "content-length" and v.strip() not in ("", "0")):
            return True
    return False


# --- MAC and codec ------------------------------------------------------------------------


def _Mac(key: Optional[bytes]):
    """HMAC-SHA256 under key (None: the empty key): the engine's, so the compiled build seals
    and checks each datagram in one call into OpenSSL (mac(data), seal(head, body),
    check(datagram))."""
    return fp.Mac(b"" if key is None else key)


def _key_bytes(key) -> Optional[bytes]:
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    key = bytes(key)
    if not key:
        raise ValueError("an empty group key; use key=None for insecure mode")
    return key


_packb = msgpack.packb
_SEQ32 = struct.Struct(">BI").pack  # seq as msgpack uint32 (valid, fixed width)
_SEQ32_UNPACK = struct.Struct(">BI").unpack_from


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def _prefix(kind: int, group: str, sender: str, epoch: int) -> bytes:
    return bytes((VERSION, 0x96)) + _packb(kind) + _packb(group) + _packb(sender) + _packb(epoch)


def encode(kind: int, group: str, sender: str, epoch: int, seq: int, body, key: Optional[bytes]) -> bytes:
    """One datagram: version, msgpack [kind, group, sender, epoch, seq, body], HMAC-SHA256.

    key None is insecure mode (the MAC uses the empty key). Raises ValueError beyond 1200 bytes.
    """
    data = _prefix(kind, group, sender, epoch) + _packb(seq) + _packb(body)
    data += _Mac(_key_bytes(key))(data)
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"datagram of {len(data)} bytes, more than {MAX_DATAGRAM}")
    return data


class Message(NamedTuple):
    """A datagram that passed every check. body is the decoded body, or for an ADVERT whose
    bytes the caller recognized (Decoder.decode's `known`), what `known` returned."""

    kind: int
    group: str
    sender: str
    epoch: int
    seq: int
    body: object
    raw_body: bytes
    cached: bool
    old_epoch: Optional[int]  # the sender's previous epoch when this one is newer
    new_sender: bool  # the first datagram accepted from this sender
    head: int = 0  # length of the bytes before seq (version .. epoch); 0 when not our encoding


class _Window:
    """Replay state of one sender: its newest epoch, its highest seq `top`, and which of the
    1024 seqs up to top were seen. The window is a ring: slot seq % 1024 holds the last seq
    seen with that residue; a seq inside the window was seen iff its slot holds it (any
    other seq of that residue is outside the window). Same answers as a sliding bitmap."""

    __slots__ = ("epoch", "top", "ring")

    def __init__(self, epoch: int, seq: int) -> None:
        self.epoch, self.top = epoch, seq
        self.ring = [-1] * REPLAY_WINDOW
        self.ring[seq & _RING_MASK] = seq

    def check(self, seq: int) -> bool:
        """True when seq is new (not seen, not older than the window); does not record it."""
        if seq > self.top:
            return True
        return seq > self.top - REPLAY_WINDOW and self.ring[seq & _RING_MASK] != seq

    def record(self, seq: int) -> None:
        self.ring[seq & _RING_MASK] = seq
        if seq > self.top:
            self.top = seq


class _Bad(Exception):
    pass


def _take_int(data, pos: int):
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    if b == 0xCC:
        return data[pos + 1], pos + 2
    if b == 0xCD:
        return (data[pos + 1] << 8) | data[pos + 2], pos + 3
    if b == 0xCE and pos + 5 <= len(data):
        return int.from_bytes(data[pos + 1:pos + 5], "big"), pos + 5
    if b == 0xCF and pos + 9 <= len(data):
        return int.from_bytes(data[pos + 1:pos + 9], "big"), pos + 9
    raise _Bad


def _take_str(data, pos: int):
    b = data[pos]
    if 0xA0 <= b <= 0xBF:
        n, pos = b & 0x1F, pos + 1
    elif b == 0xD9:
        n, pos = data[pos + 1], pos + 2
    else:
        raise _Bad
    if pos + n > len(data):
        raise _Bad
    return data[pos:pos + n], pos + n


def _parse_head(data, end: int):
    """(kind, group bytes, sender bytes, epoch, seq, body offset) of data[1:end] for the
    encodings this module writes; raises _Bad (or IndexError) for anything else."""
    if data[1] != 0x96:
        raise _Bad
    kind = data[2]
    if kind >= 0x80:
        raise _Bad
    group, pos = _take_str(data, 3)
    sender, pos = _take_str(data, pos)
    epoch, head = _take_int(data, pos)
    seq, pos = _take_int(data, head)
    if pos >= end:
        raise _Bad
    return kind, group, sender, epoch, seq, pos, head


def _check_key(k) -> Key:
    if not (type(k) is list and len(k) == 4):
        raise _Bad
    cip, cport, sip, sport = k
    if not (_addr_ok(cip) and _addr_ok(sip) and len(cip) == len(sip)
            and _is_int(cport, 0, 65535) and _is_int(sport, 0, 65535)):
        raise _Bad
    return (cip, cport, sip, sport)


def _check_body(kind: int, body):
    """The body in its checked Python form; raises _Bad for a wrong shape."""
    if type(body) is not list:
        raise _Bad
    if kind == HEARTBEAT:
        if len(body) != 5:
            raise _Bad
        load, conns, cap, prefixes, port = body
        if not ((type(load) is float or type(load) is int) and 0 <= load <= 1
                and _is_int(conns, 0, _U64) and _is_int(cap, 0, _U64) and _is_int(port, 0, 65535)
                and type(prefixes) is list and all(type(p) is str for p in prefixes)):
            raise _Bad
        return (float(load), conns, cap, tuple(prefixes), port)
    if kind == ADVERT:
        if len(body) != 6:
            raise _Bad
        page, pages, gen, objects, entries, delta = body
        if not (_is_int(page, 0, _U32) and _is_int(pages, 0, _U32) and _is_int(gen, 0, _U64)
                and type(delta) is bool and type(objects) is list and type(entries) is list):
            raise _Bad
        if not delta and page >= pages:
            raise _Bad
        objs = []
        for o in objects:
            if not (type(o) is list and len(o) == 6 and _object_ok(*o)):
                raise _Bad
            objs.append(_new_object(o))
        return (page, pages, gen, [_wire_entry(a, objs) for a in entries], delta)
    if kind == CLAIM or kind == PASS:
        if len(body) != 3:
            raise _Bad
        node, epoch, keys = body
        if not (type(node) is str and NODE_ID.match(node) and _is_int(epoch, 0, _U64) and type(keys) is list):
            raise _Bad
        return (node, epoch, [_check_key(k) for k in keys])
    if kind == WITHDRAW:
        if len(body) != 1 or type(body[0]) is not list:
            raise _Bad
        return ([_check_key(k) for k in body[0]],)
    if kind == PROBE_REQ:
        if len(body) != 2:
            raise _Bad
        target, nonce = body
        if not (type(target) is str and NODE_ID.match(target) and _is_int(nonce, 0, _U32)):
            raise _Bad
        return (target, nonce)
    if kind == PROBE_ACK:
        if len(body) != 4:
            raise _Bad
        target, nonce, silence_ms, state = body
        if not (type(target) is str and NODE_ID.match(target) and _is_int(nonce, 0, _U32)
                and _is_int(silence_ms, 0, _U32) and _is_int(state, 0, len(PROBE_STATES) - 1)):
            raise _Bad
        return (target, nonce, silence_ms, state)
    raise _Bad


class Decoder:
    """The receive checks, in the design's order; every failure is dropped and counted.

    decode(data) returns a Message or None and never raises. Replay state is kept per
    sender: its newest epoch and a sliding window of 1024 seqs (reordering inside the window
    is accepted, duplicates and older seqs are not). A newer epoch resets the window.
    """

    def __init__(self, group: str, key: Optional[bytes], node: str) -> None:
        self.group = group
        self.node = node
        self._mac = _Mac(_key_bytes(key))
        self._group_raw = group.encode()
        self._names: Dict[bytes, str] = {}  # sender bytes -> validated node id
        self.windows: Dict[str, _Window] = {}
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        return None

    def decode(self, data, known=None) -> Optional[Message]:
        """known(sender, epoch, raw_body) -> token or None is asked about ADVERT bodies before they are
        decoded; a token stands for a body decoded before (its bytes are identical)."""
        try:
            if type(data) is not bytes:
                data = bytes(data)
            n = len(data)
            if n > MAX_DATAGRAM:
                return self._drop("oversize")
            if n == 0:
                return self._drop("short")
            if data[0] != VERSION:
                return self._drop("version")
            if n < _MIN_LEN:
                return self._drop("short")
            end = n - MAC_LEN
            if not self._mac.check(data):
                return self._drop("mac")
            return self._decode_authentic(data, end, known)
        except Exception:  # pragma: no cover - a bug; still never raise on input
            return self._drop("undecodable")

    def _decode_authentic(self, data: bytes, end: int, known) -> Optional[Message]:
        """The checks after the MAC (data: bytes whose MAC, at `end`, is good)."""
        body = token = None
        cached = False
        try:
            kind, graw, sraw, epoch, seq, pos, head = _parse_head(data, end)
            sender = self._names.get(sraw)
            if sender is None:
                sender = sraw.decode()
                if not NODE_ID.match(sender):
                    raise _Bad
                if len(self._names) < 4096:
                    self._names[sraw] = sender
            group = self.group if graw == self._group_raw else graw.decode()
            raw_body = data[pos:end]
            if kind == ADVERT and known is not None:
                token = known(sender, epoch, raw_body)
                cached = token is not None
            if not cached:
                body = msgpack.unpackb(raw_body, raw=False)
        except Exception:
            # Not our encoder's shapes, or bad msgpack: decode the whole array generically.
            try:
                arr = msgpack.unpackb(data[1:end], raw=False)
            except Exception:
                return self._drop("undecodable")
            if not (type(arr) is list and len(arr) == 6):
                return self._drop("undecodable")
            kind, group, sender, epoch, seq, body = arr
            if not (type(group) is str and type(sender) is str and NODE_ID.match(sender)
                    and _is_int(epoch, 0, _U64) and _is_int(seq, 0, _U64) and type(kind) is int):
                return self._drop("undecodable")
            try:
                raw_body = _packb(body)  # the digest of a foreign encoding: its canonical bytes
            except Exception:
                return self._drop("undecodable")
            cached = False
            head = 0
        if kind not in KIND_NAMES or not _is_int(epoch, 0, _U64) or not _is_int(seq, 0, _U64):
            return self._drop("undecodable")
        if not cached:
            try:
                body = _check_body(kind, body)
            except Exception:
                return self._drop("undecodable")
        else:
            body = token
        if group != self.group:
            return self._drop("group")
        if sender == self.node:
            return self._drop("self")
        w = self.windows.get(sender)
        old_epoch = None
        new_sender = w is None
        if w is None:
            self.windows[sender] = _Window(epoch, seq)
        elif epoch < w.epoch:
            return self._drop("stale_epoch")
        elif epoch > w.epoch:
            old_epoch = w.epoch
            self.windows[sender] = _Window(epoch, seq)
        elif not w.check(seq):
            return self._drop("replay")
        else:
            w.record(seq)
        return Message(kind, group, sender, epoch, seq, body, raw_body, cached, old_epoch, new_sender, head)


# --- Events -------------------------------------------------------------------------------


class Heartbeat(NamedTuple):
    kind: str
    sender: str
    epoch: int
    load: float
    connections: int
    capacity: int
    prefixes: tuple
    sync_port: int


class PeerNew(NamedTuple):
    kind: str
    sender: str
    epoch: int


class PeerEpoch(NamedTuple):
    kind: str
    sender: str
    old: int
    new: int


class Claim(NamedTuple):
    kind: str
    sender: str
    epoch: int
    dead_node: str
    dead_epoch: int
    keys: list


class Pass(NamedTuple):
    """A member cannot serve these connections of dead_node: the next candidate acts now."""
    kind: str
    sender: str
    epoch: int
    dead_node: str
    dead_epoch: int
    keys: list


class Withdraw(NamedTuple):
    kind: str
    sender: str
    epoch: int
    keys: list  # every key of the WITHDRAW
    dropped: list  # those that were in the table (and older than the WITHDRAW)


class ProbeReq(NamedTuple):
    """The sender's detector declared `target` dead: does the receiver miss it too?"""
    kind: str
    sender: str
    epoch: int
    target: str
    nonce: int


class ProbeAck(NamedTuple):
    """The answer to a PROBE_REQ: how the sender sees `target` (silence in ms, and its
    detector's state as an index into PROBE_STATES)."""
    kind: str
    sender: str
    epoch: int
    target: str
    nonce: int
    silence_ms: int
    state: int


# --- Sender side: pages -------------------------------------------------------------------


class _TxEntry:
    __slots__ = ("entry", "pre", "post", "size", "page")

    def __init__(self, entry: Entry) -> None:
        v = [getattr(entry, n) for n in ENTRY_FIELDS]
        v[_STATE_POS] = _STATE_WIRE[v[_STATE_POS]]
        self.entry = entry
        # array16 header for 24 fields + the 17 before `object`; the 6 after it
        self.pre = b"\xdc\x00\x18" + _packb(v[:_OBJ_POS])[3:]
        self.post = _packb(v[_OBJ_POS + 1:])[1:]
        self.size = len(self.pre) + 1 + len(self.post)
        self.page = -1


class _TxPage:
    __slots__ = ("index", "keys", "objs", "used", "body", "rest", "in_open")

    def __init__(self, index: int) -> None:
        self.index = index
        self.keys: Dict[Key, _TxEntry] = {}
        self.objs: Dict[ObjectRef, int] = {}  # object -> entries of this page using it
        self.used = 0
        self.body: Optional[bytes] = None  # the encoded body (None: to be made)
        self.rest: Optional[bytes] = None  # its bytes after `pages`: generation .. delta
        self.in_open = False


def _object_bytes(o: ObjectRef) -> bytes:
    return _packb([o.host, o.path, o.etag, o.last_modified, o.total_length, o.digest])


def _page_capacity(needed: int) -> int:
    """Page slots for `needed` pages: rounded up in steps of 1/64 to 1/32."""
    if needed <= 4:
        return 4
    step = max(4, 1 << max(0, needed.bit_length() - 6))
    return -(-needed // step) * step


# --- Receiver side: the peer table --------------------------------------------------------


class _RxPage:
    __slots__ = ("index", "digest", "blen", "rest_digest", "rest_len", "at", "seq", "gen", "members")

    def __init__(self, index: int) -> None:
        self.index = index
        self.digest: Optional[int] = None  # of the full body last decoded (None: none since)
        self.blen = 0  # and its length
        self.rest_digest: Optional[int] = None  # of its bytes after `pages`, and their length
        self.rest_len = 0
        self.at = -math.inf
        self.seq = -1  # seq of the full version applied
        self.gen = -1
        self.members: set = set()  # keys whose record points at this page


class _RxEntry:
    __slots__ = ("entry", "page", "seq", "at", "gen")

    def __init__(self, entry: Entry, page: _RxPage, seq: int, at: Optional[float], gen: int) -> None:
        self.entry = entry
        self.page = page  # the page (of generation `gen`) the datagram put it on
        self.seq = seq
        self.at = at  # own timestamp (from a delta); None: the page's timestamp applies
        self.gen = gen


class _Peer:
    def __init__(self, name: str, epoch: int, now: float) -> None:
        self.name = name
        self.epoch = epoch
        self.heard = (name, epoch)
        self.entries: Dict[Key, _RxEntry] = {}
        self.pages: "OrderedDict[int, _RxPage]" = OrderedDict()  # least recently refreshed first
        self.bodies: Dict[int, _RxPage] = {}  # digest of a page's body -> the page
        self.own: List[Tuple[float, Key]] = []  # heap of (at, key) of delta-held keys (lazy)
        self.tombs: Dict[Key, int] = {}
        self.tomb_order: List[Tuple[int, Key]] = []  # heap by seq
        self.adv_top = -1  # the highest ADVERT seq, its generation, the lowest seq of that generation
        self.gen = -1
        self.gen_min = -1
        self.gen_pages: set = set()  # pages of that generation received in full
        self.gen_swept = False
        self.prefix: Optional[bytes] = None  # registered for the fast path
        self.fast = 0  # datagrams taken by the fast path, and their bytes
        self.fast_bytes = 0
        self.window: Optional[_Window] = None  # the Decoder's replay window of this sender
        self.heartbeat: Optional[Heartbeat] = None
        self.heartbeat_at: Optional[float] = None
        self.first_heard = now
        self.last_heard = now
        self.datagrams = 0

    def reset(self, epoch: int) -> None:
        self.epoch = epoch
        self.heard = (self.name, epoch)
        self.entries.clear()
        self.pages.clear()
        self.bodies.clear()
        self.own.clear()
        self.tombs.clear()
        self.tomb_order.clear()
        self.adv_top = self.gen = self.gen_min = -1
        self.gen_pages = set()
        self.gen_swept = False

    def drop(self, k: Key) -> None:
        r = self.entries.pop(k, None)
        if r is not None:
            r.page.members.discard(k)


def _forget_digest(peer: _Peer, rp: _RxPage) -> None:
    if rp.digest is not None:
        peer.bodies.pop(rp.digest, None)
    rp.digest = rp.rest_digest = None


# --- One node -----------------------------------------------------------------------------


class SyncNode:
    """One node's synchronization state: its own advertised entries and its peers' tables."""

    def __init__(self, node: str, group: str, key, epoch: int, refresh: float = 1.0,
                 heartbeat: float = 0.02, expire_periods: float = 3, capacity: int = 1000,
                 prefixes: Iterable[str] = ("/",), sync_port: int = 7700, pace: bool = True) -> None:
        if not (isinstance(node, str) and NODE_ID.match(node)):
            raise ValueError(f"node id must match [A-Za-z0-9_.-]{{1,32}}, not {node!r}")
        if not (isinstance(group, str) and 0 < len(group) <= 64):
            raise ValueError(f"group must be a str of 1 to 64 characters, not {group!r}")
        if not _is_int(epoch, 0, _U64):
            raise ValueError("epoch must be an unsigned 64-bit int")
        if not (refresh > 0 and heartbeat > 0 and expire_periods > 0):
            raise ValueError("refresh, heartbeat and expire_periods must be positive")
        if not _is_int(capacity, 1, _U64):
            raise ValueError("capacity must be a positive int")
        if not _is_int(sync_port, 0, 65535):
            raise ValueError("sync_port must be 0..65535")
        self.node, self.group, self.epoch = node, group, epoch
        self.draining = False
        self.key = _key_bytes(key)
        self.insecure = self.key is None
        self.refresh, self.heartbeat, self.expire_periods = float(refresh), float(heartbeat), expire_periods
        self.capacity = capacity
        self.prefixes = list(prefixes)
        if not all(isinstance(p, str) for p in self.prefixes):
            raise ValueError("prefixes must be strings")
        self.sync_port = sync_port
        self.pace = pace
        self._mac = _Mac(self.key)
        self._decoder = Decoder(group, self.key, node)
        self._prefixes = {k: _prefix(k, group, node, epoch) for k in KIND_NAMES}
        self._seq = 0
        # content budget of a page (objects + entries), and of a WITHDRAW/CLAIM key list
        overhead = len(self._prefixes[ADVERT]) + 9 + MAC_LEN  # + seq, worst case
        # body: array header, page and pages (< 65536: 3 bytes), generation (kept < 65536),
        # objects (<= 15: fixarray), entries (array16), delta
        self._page_budget = MAX_DATAGRAM - overhead - (1 + 3 + 3 + 3 + 1 + 3 + 1)
        self._keys_budget = MAX_DATAGRAM - overhead - (1 + 3) - (1 + 34 + 9)
        biggest = _packb([0.5, _U64, _U64, self.prefixes, 65535])
        if overhead + len(biggest) > MAX_DATAGRAM:
            raise ValueError("prefixes too long: a HEARTBEAT must fit in 1200 bytes")
        # local side
        self._local: Dict[Key, _TxEntry] = {}
        self._pages: List[_TxPage] = []
        self._obj_bytes: Dict[ObjectRef, bytes] = {}
        self._obj_pages: Dict[ObjectRef, Dict[int, None]] = {}
        self._open: List[int] = []  # heap of pages with room
        self._empty: List[int] = []  # heap of empty pages
        self._fill = 0  # the page most recently started
        self._generation = 0
        self._connections: Optional[int] = None
        self._load: Optional[float] = None
        self._pending_delta: Dict[Key, None] = {}
        self._pending_withdraw: Dict[Key, None] = {}
        self._claims: List[list] = []  # [due, copies left, dead_node, dead_epoch, keys, kind]
        self._claims_new: Dict[tuple, Dict[Key, None]] = {}  # (kind, node, epoch, copies) -> keys
        self._probes: List[list] = []  # [due, copies left, kind, body bytes]: PROBE_REQ / PROBE_ACK
        self._next_heartbeat: Optional[float] = None
        self._round_start: Optional[float] = None
        self._round_next = 0
        # receive side
        self._peers: Dict[str, _Peer] = {}
        self._rx_prefix: Dict[bytes, _Peer] = {}
        self._rx_lens: Tuple[int, ...] = ()
        self._rx_len = 0  # the one prefix length, -1 for several, 0 for none
        # (peer, entry) of entries newly learnt with a ReqNo: connections that migrated, which
        # the node they came from must stop advertising (GroupNode.tick reads them)
        self.moved: deque = deque(maxlen=65536)
        # (sender, epoch) of the last datagram receive() accepted, None when it dropped it:
        # any valid datagram is a sign of life, and most (unchanged pages) cause no event
        self.heard_from: Optional[Tuple[str, int]] = None
        self._stats = dict.fromkeys((
            "sent", "sent_bytes", "received", "received_bytes", "pages_unchanged", "pages_decoded",
            "pages_stale", "deltas_received", "deltas_stale", "generation_sweeps", "entries_expired",
            "entries_withdrawn", "too_big", "pages_full", "compactions", "refresh_rounds"), 0)
        self._sent_by_kind = dict.fromkeys(KIND_NAMES.values(), 0)
        self._received_by_kind = dict.fromkeys(KIND_NAMES.values(), 0)

    # --- local side ----------------------------------------------------------------------

    def local_entries(self) -> Dict[Key, Entry]:
        return {k: t.entry for k, t in self._local.items()}

    def local_entries_get(self, key: Key) -> Optional[Entry]:
        """One local entry (O(1))."""
        t = self._local.get(key)
        return t.entry if t is not None else None

    def set_connections(self, n: Optional[int]) -> None:
        """Open connections for the heartbeat (None: the number of local entries)."""
        self._connections = n

    def add_local(self, entry: Entry, now: Optional[float] = None, _bulk: bool = False) -> bool:
        """Advertise (or update) an entry; with `now`, a delta ADVERT goes out at the next
        outgoing(). False when it cannot be advertised: the entry and its object do not fit in
        one datagram (counted too_big), or the node has MAX_PAGES pages (pages_full)."""
        k = entry.key
        old = self._local.get(k)
        if old is not None and old.entry == entry:
            return True
        te = _TxEntry(entry)
        why = self._place(te, old, _bulk and old is None)
        if why is not None:
            self._stats[why] += 1
            if k in self._local:
                self.remove_local(k, now)
            elif old is not None:  # already off its page
                self._pending_delta.pop(k, None)
                if now is not None:
                    self._pending_withdraw[k] = None
            return False
        self._pending_withdraw.pop(k, None)  # alive again after all
        if now is not None:
            self._pending_delta[k] = None
        return True

    def remove_local(self, key: Key, now: Optional[float] = None) -> bool:
        """Stop advertising a connection; with `now`, a WITHDRAW goes out at the next outgoing()."""
        te = self._local.pop(key, None)
        if te is None:
            return False
        self._unplace(key, te)
        self._pending_delta.pop(key, None)
        if now is not None:
            self._pending_withdraw[key] = None
        return True

    def set_local(self, entries: Iterable[Entry], now: Optional[float] = None) -> None:
        """Make the local entries exactly `entries` (a diff: unchanged entries keep their page).
        New ones are packed grouped by object. With `now`, deltas and withdraws are sent."""
        new = {}
        for e in entries:
            new[e.key] = e
        for k in [k for k in self._local if k not in new]:
            self.remove_local(k, now)
        groups: Dict[Optional[ObjectRef], List[Entry]] = {}
        for k, e in new.items():
            old = self._local.get(k)
            if old is None or old.entry != e:
                groups.setdefault(e.object, []).append(e)
        for group in groups.values():
            for e in group:
                self.add_local(e, now, _bulk=True)

    def _obj(self, o: ObjectRef) -> bytes:
        b = self._obj_bytes.get(o)
        if b is None:
            b = self._obj_bytes[o] = _object_bytes(o)
        return b

    def _room(self, page: _TxPage, te: _TxEntry) -> bool:
        o = te.entry.object
        need = te.size
        if o is not None and o not in page.objs:
            if len(page.objs) >= MAX_OBJECTS_PER_PAGE:
                return False
            need += len(self._obj(o))
        return page.used + need <= self._page_budget

    def _place(self, te: _TxEntry, old: Optional[_TxEntry], bulk: bool = False) -> Optional[str]:
        """Put te on a page (None) or say why it cannot be advertised ("too_big", "pages_full").
        bulk: entries come grouped by object; fill pages one after the other."""
        k = te.entry.key
        o = te.entry.object
        if te.size + (len(self._obj(o)) if o is not None else 0) > self._page_budget:
            return "too_big"
        if old is not None:  # an update keeps its page when it fits
            page = self._pages[old.page]
            self._remove_from_page(page, k, old)
            del self._local[k]
            if self._room(page, te):
                self._put(page, te)
                return None
            self._mark_open(page)
        # One by one: its object's most recent pages first; an object already on some page
        # gets a page of its own when those are full (more of its entries will likely
        # follow, and every page repeats the objects it uses); an object's first entry
        # shares the page being filled.
        page = None
        popular = False
        if bulk:
            popular = True  # the next empty page becomes the page being filled
            if self._fill < len(self._pages) and self._room(self._pages[self._fill], te):
                page = self._pages[self._fill]
        elif o is not None:
            cands = self._obj_pages.get(o)
            if cands:
                popular = True
                for j, i in enumerate(reversed(cands)):
                    if j == 4:
                        break
                    if self._room(self._pages[i], te):
                        page = self._pages[i]
                        break
        if page is None and not popular:
            if self._fill < len(self._pages) and self._room(self._pages[self._fill], te):
                page = self._pages[self._fill]
            while page is None and self._open:
                p = self._pages[self._open[0]] if self._open[0] < len(self._pages) else None
                if p is None or not p.keys or self._page_budget - p.used < 128:
                    heapq.heappop(self._open)
                    if p is not None:
                        p.in_open = False
                    continue
                if self._room(p, te):
                    page = p
                break
        if page is None:
            page = self._empty_page()
            if page is None:
                return "pages_full"
            if not popular or bulk:
                self._fill = page.index
        self._put(page, te)
        return None

    def _empty_page(self) -> Optional[_TxPage]:
        while self._empty:
            i = heapq.heappop(self._empty)
            if i < len(self._pages) and not self._pages[i].keys:
                return self._pages[i]
        n = len(self._pages)
        if n >= MAX_PAGES:
            return None
        cap = min(_page_capacity(n + 1), MAX_PAGES)
        for i in range(n, cap):
            self._pages.append(_TxPage(i))
            if i > n:
                heapq.heappush(self._empty, i)
        for p in self._pages[:n]:  # `pages` is in every body (the rest stays)
            p.body = None
        return self._pages[n]

    def _put(self, page: _TxPage, te: _TxEntry) -> None:
        k = te.entry.key
        o = te.entry.object
        te.page = page.index
        page.keys[k] = te
        page.used += te.size
        if o is not None:
            c = page.objs.get(o, 0)
            if c == 0:
                page.used += len(self._obj(o))
                self._obj_pages.setdefault(o, {})[page.index] = None
            page.objs[o] = c + 1
        page.body = page.rest = None
        self._local[k] = te
        if self._page_budget - page.used < 128 and page.in_open:
            pass  # lazily removed from the open heap

    def _remove_from_page(self, page: _TxPage, k: Key, te: _TxEntry) -> None:
        del page.keys[k]
        page.used -= te.size
        o = te.entry.object
        if o is not None:
            c = page.objs[o] - 1
            if c:
                page.objs[o] = c
            else:
                del page.objs[o]
                page.used -= len(self._obj(o))
                ps = self._obj_pages.get(o)
                if ps is not None:
                    ps.pop(page.index, None)
                    if not ps:
                        del self._obj_pages[o]
                        self._obj_bytes.pop(o, None)
        page.body = page.rest = None

    def _mark_open(self, page: _TxPage) -> None:
        if not page.keys:
            heapq.heappush(self._empty, page.index)
        elif not page.in_open and self._page_budget - page.used >= 128:
            page.in_open = True
            heapq.heappush(self._open, page.index)

    def _unplace(self, k: Key, te: _TxEntry) -> None:
        page = self._pages[te.page]
        self._remove_from_page(page, k, te)
        self._mark_open(page)

    def _body(self, page: _TxPage) -> bytes:
        b = page.body
        if b is None:
            rest = page.rest
            if rest is None:
                rest = page.rest = self._page_rest(page.keys.values(), False)
            b = page.body = b"".join((b"\x96", _packb(page.index), _packb(len(self._pages)), rest))
        return b

    def _page_body(self, index: int, tes, delta: bool) -> bytes:
        return b"".join((b"\x96", _packb(index), _packb(len(self._pages)), self._page_rest(tes, delta)))

    def _page_rest(self, tes, delta: bool) -> bytes:
        """An ADVERT body after `pages`: generation, objects, entries, delta."""
        objs: Dict[ObjectRef, bytes] = {}
        parts = []
        for te in tes:
            o = te.entry.object
            if o is None:
                parts.append(te.pre + b"\xc0" + te.post)
            else:
                i = objs.get(o)
                if i is None:
                    i = objs[o] = bytes((len(objs),))
                parts.append(te.pre + i + te.post)
        return b"".join((_packb(self._generation), _array_header(len(objs)), *(self._obj(o) for o in objs),
                         _array_header(len(parts)), *parts, b"\xc3" if delta else b"\xc2"))

    def compact(self) -> None:
        """Repack every local entry into as few pages as possible (a new generation)."""
        by_obj: Dict[Optional[ObjectRef], List[_TxEntry]] = {}
        for te in self._local.values():
            by_obj.setdefault(te.entry.object, []).append(te)
        self._generation = (self._generation + 1) & 0xFFFF  # receivers only compare for equality
        self._stats["compactions"] += 1
        self._pages, self._open, self._empty, self._fill = [], [], [], 0
        self._obj_pages = {}
        self._local = {}
        for group in by_obj.values():
            for te in group:
                self._place(te, None, bulk=True)

    def _needs_compaction(self) -> bool:
        n = len(self._pages)
        if n <= 8:
            return False
        used = sum(p.used for p in self._pages)
        ideal = used / (self._page_budget * 0.9) + 1
        return n > 2 * ideal + 8

    # --- output ----------------------------------------------------------------------------

    def _seal(self, kind: int, body: bytes) -> bytes:
        self._seq = seq = self._seq + 1
        return self._mac.seal(self._prefixes[kind] + (_SEQ32(0xCE, seq) if seq <= _U32 else _packb(seq)), body)

    def _emit(self, out: list, kind: int, body: bytes) -> None:
        d = self._seal(kind, body)
        out.append((kind, d))
        self._stats["sent"] += 1
        self._stats["sent_bytes"] += len(d)
        self._sent_by_kind[KIND_NAMES[kind]] += 1

    def heartbeat_body(self) -> list:
        n = len(self._local) if self._connections is None else self._connections
        # a draining node offers no capacity: its peers take its connections over while it lives
        return [self.advertised_load, n, 0 if self.draining else self.capacity, self.prefixes, self.sync_port]

    @property
    def advertised_load(self) -> float:
        """The load the HEARTBEATs carry: the value set (e.g. selection.LoadAdvertiser's, rounded
        with hysteresis), else connections / capacity; always clamped to 0..1."""
        load = self._load
        if load is None:
            n = len(self._local) if self._connections is None else self._connections
            load = n / self.capacity
        try:
            load = float(load)
        except (TypeError, ValueError):
            return 1.0
        return min(1.0, max(0.0, load)) if math.isfinite(load) else 1.0

    @advertised_load.setter
    def advertised_load(self, load: Optional[float]) -> None:
        self._load = load

    @property
    def local_count(self) -> int:
        """How many entries this node advertises (O(1), unlike local_entries())."""
        return len(self._local)

    def outgoing(self, now: float) -> List[Tuple[int, bytes]]:
        """The datagrams due at `now`, each to be sent to every peer: a heartbeat when due,
        withdraws, deltas and claims at once, and the pages of the full refresh that are due
        (spread over the refresh period when `pace`, else all at once every period)."""
        out: List[Tuple[int, bytes]] = []
        nh = self._next_heartbeat
        # due a little early is due (a timer that fires a hair early must not skip a beat)
        if nh is None or now >= nh - self.heartbeat * 0.1:
            self._emit(out, HEARTBEAT, _packb(self.heartbeat_body()))
            nh = (now if nh is None else nh) + self.heartbeat
            self._next_heartbeat = nh if nh > now else now + self.heartbeat
        if self._pending_withdraw:
            keys = [list(k) for k in self._pending_withdraw]
            self._pending_withdraw.clear()
            for chunk in self._key_chunks(keys):
                self._emit(out, WITHDRAW, b"\x91" + _packb(chunk))
        if self._pending_delta:
            by_page: Dict[int, List[_TxEntry]] = {}
            for k in self._pending_delta:
                te = self._local.get(k)
                if te is not None:
                    by_page.setdefault(te.page, []).append(te)
            self._pending_delta.clear()
            for i, tes in by_page.items():
                self._emit(out, ADVERT, self._page_body(i, tes, True))
        if self._claims_new:
            for (kind, node, epoch, copies), keys in self._claims_new.items():
                for chunk in self._key_chunks([list(k) for k in keys]):
                    self._claims.append([now, copies, node, epoch, chunk, kind])
            self._claims_new = {}
        if self._claims:
            for c in self._claims:
                if now >= c[0]:
                    self._emit(out, c[5], _packb([c[2], c[3], c[4]]))
                    c[1] -= 1
                    c[0] = now + self.heartbeat
            self._claims = [c for c in self._claims if c[1] > 0]
        if self._probes:
            for c in self._probes:
                if now >= c[0] - 1e-9:
                    self._emit(out, c[2], c[3])
                    c[1] -= 1
                    c[0] = now + self.heartbeat
            self._probes = [c for c in self._probes if c[1] > 0]
        self._refresh_due(now, out)
        return out

    def next_due(self) -> float:
        """The earliest `now` at which outgoing() has something to send: -inf when something
        is queued (a withdraw, a delta, a claim, a probe), else the next heartbeat, claim or
        probe copy, or refresh page, whichever comes first."""
        if self._pending_withdraw or self._pending_delta or self._claims_new:
            return -math.inf
        nh = self._next_heartbeat
        if nh is None or self._round_start is None:
            return -math.inf
        due = nh - self.heartbeat * 0.1
        for c in self._claims:
            if c[0] < due:
                due = c[0]
        for c in self._probes:
            if c[0] < due:
                due = c[0]
        rs = self._round_start
        n = len(self._pages)
        t = rs + self.refresh * 0.99  # the next round
        if n and self._round_next < n:
            t = min(t, rs + self._round_next * self.refresh / n) if self.pace else rs
        return min(due, t)

    def _refresh_due(self, now: float, out: list) -> None:
        rs = self._round_start
        if rs is None or now >= rs + self.refresh * 0.99:
            if rs is not None:
                self._send_pages(self._round_next, len(self._pages), out)
            if self._needs_compaction():
                self.compact()
            self._stats["refresh_rounds"] += 1
            self._round_start = rs = now if rs is None or now >= rs + 2 * self.refresh else rs + self.refresh
            self._round_next = 0
        n = len(self._pages)
        if self.pace:
            due = min(n, int((now - rs) / self.refresh * n) + 1)
        else:
            due = n
        if due > self._round_next:
            self._send_pages(self._round_next, due, out)
            self._round_next = due

    def _send_pages(self, start: int, stop: int, out: list) -> None:
        """Pages start..stop-1 (the refresh's hot loop: a cached body, a seq and a MAC each)."""
        pages = self._pages
        stop = min(stop, len(pages))
        if start >= stop:
            return
        pfx = self._prefixes[ADVERT]
        seal = self._mac.seal
        seq = self._seq
        nbytes = 0
        append = out.append
        for i in range(start, stop):
            p = pages[i]
            body = p.body
            if body is None:
                body = self._body(p)
            seq += 1
            head = pfx + _SEQ32(0xCE, seq) if seq <= _U32 else pfx + _packb(seq)
            data = seal(head, body)
            nbytes += len(data)
            append((ADVERT, data))
        self._seq = seq
        n = stop - start
        self._stats["sent"] += n
        self._stats["sent_bytes"] += nbytes
        self._sent_by_kind["advert"] += n

    def refresh_datagrams(self, now: float) -> List[Tuple[int, bytes]]:
        """Every page now (one full refresh), outside the paced schedule."""
        out: List[Tuple[int, bytes]] = []
        self._send_pages(0, len(self._pages), out)
        return out

    def _key_chunks(self, keys: list):
        chunk, size = [], 0
        for k in keys:
            s = 11 + len(k[0]) + len(k[2])
            if chunk and size + s > self._keys_budget:
                yield chunk
                chunk, size = [], 0
            chunk.append(k)
            size += s
        if chunk:
            yield chunk

    def claim(self, dead_node: str, dead_epoch: int, keys: Iterable[Key], now: float, copies: int = 3,
              kind: int = CLAIM) -> None:
        """Queue a CLAIM of `keys` of dead_node: sent at the next outgoing() and copies - 1
        times more, `heartbeat` apart (each copy a new datagram with its own seq). Claims of
        one dead node queued before the next outgoing() share datagrams. kind=PASS sends
        a PASS instead (this node cannot serve them), with the same rules."""
        if not (isinstance(dead_node, str) and NODE_ID.match(dead_node)) or not _is_int(dead_epoch, 0, _U64):
            raise ValueError("bad dead_node or dead_epoch")
        if not _is_int(copies, 1, 100):
            raise ValueError("copies must be 1..100")
        if kind not in (CLAIM, PASS):
            raise ValueError("kind must be CLAIM or PASS")
        pending = self._claims_new.setdefault((kind, dead_node, dead_epoch, copies), {})
        for k in keys:
            pending[tuple(k)] = None

    def pass_on(self, dead_node: str, dead_epoch: int, keys: Iterable[Key], now: float, copies: int = 3) -> None:
        """Queue a PASS of `keys` of dead_node (see claim())."""
        self.claim(dead_node, dead_epoch, keys, now, copies, kind=PASS)

    def probe(self, target: str, nonce: int, now: float, copies: int = 1) -> None:
        """Queue a PROBE_REQ about `target` (its nonce 0..2**32-1): sent at the next
        outgoing() and copies - 1 times more, `heartbeat` apart, each a new datagram."""
        if not (isinstance(target, str) and NODE_ID.match(target)) or not _is_int(nonce, 0, _U32):
            raise ValueError("bad target or nonce")
        if not _is_int(copies, 1, 100):
            raise ValueError("copies must be 1..100")
        self._probes.append([-math.inf, copies, PROBE_REQ, _packb([target, nonce])])

    def probe_ack(self, target: str, nonce: int, silence_ms: int, state: int, now: float) -> None:
        """Queue a PROBE_ACK (sent once, at the next outgoing()): how this node sees `target`.
        silence_ms is clamped to 0..2**32-1; state is an index into PROBE_STATES."""
        if not (isinstance(target, str) and NODE_ID.match(target)) or not _is_int(nonce, 0, _U32):
            raise ValueError("bad target or nonce")
        if not _is_int(state, 0, len(PROBE_STATES) - 1):
            raise ValueError(f"state must be 0..{len(PROBE_STATES) - 1}")
        silence_ms = min(_U32, max(0, int(silence_ms)))
        self._probes.append([-math.inf, 1, PROBE_ACK, _packb([target, nonce, silence_ms, state])])

    # --- receive ---------------------------------------------------------------------------

    def _known(self, sender: str, epoch: int, raw: bytes):
        p = self._peers.get(sender)
        if p is None or p.epoch != epoch:
            return None
        digest = hash(raw)
        rp = p.bodies.get(digest)
        if rp is not None and rp.blen == len(raw):
            return rp
        # The same page with only `pages` changed (the sender's page capacity grew): as good
        # as unchanged; its new digest is taken once the datagram is accepted.
        try:
            index, pos = _take_int(raw, 1)
            _, pos = _take_int(raw, pos)
        except Exception:
            return None
        rp = p.pages.get(index)
        if (rp is not None and raw[0] == 0x96 and rp.rest_digest is not None and rp.rest_len == len(raw) - pos
                and rp.rest_digest == hash(raw[pos:])):
            return (rp, digest, len(raw))
        return None

    def receive(self, data, now: float) -> list:
        """One datagram from the network: the events it causes (possibly none). Never raises.

        The fast path (a full ADVERT page whose body is byte-identical to the page's last
        decoded version, from a known peer and epoch): MAC, prefix lookup, body digest,
        replay window, timestamp bump. Everything else goes through the Decoder."""
        self.heard_from = None
        if type(data) is not bytes:
            try:
                data = bytes(data)
            except Exception:
                self._decoder.dropped["undecodable"] += 1
                return []
        n = len(data)
        if n > MAX_DATAGRAM or n < _MIN_LEN or data[0] != VERSION:
            return self._receive_slow(data, now, None)
        end = n - MAC_LEN
        if not self._mac.check(data):
            self._decoder.dropped["mac"] += 1
            return []
        plen = self._rx_len
        if plen <= 0:
            if not plen:
                return self._receive_slow(data, now, end)
            for plen in self._rx_lens:  # peers' prefixes of several lengths
                if data[:plen] in self._rx_prefix:
                    break
        peer = self._rx_prefix.get(data[:plen])
        if peer is None or end < plen + 8:
            return self._receive_slow(data, now, end)
        b, seq = _SEQ32_UNPACK(data, plen)  # seq as this module writes it (uint32)
        raw = data[plen + 5:end]
        rp = peer.bodies.get(hash(raw))
        if b != 0xCE or rp is None or rp.blen != len(raw):
            return self._receive_slow(data, now, end)
        w = peer.window
        top = w.top
        if seq > top:
            w.top = seq
        elif seq <= top - REPLAY_WINDOW or w.ring[seq & _RING_MASK] == seq:
            self._decoder.dropped["replay"] += 1
            return []
        w.ring[seq & _RING_MASK] = seq
        rp.at = now
        if seq > rp.seq:
            rp.seq = seq
        peer.pages.move_to_end(rp.index)
        peer.last_heard = now
        peer.fast += 1
        peer.fast_bytes += n
        self.heard_from = peer.heard
        return []

    def _receive_slow(self, data: bytes, now: float, mac_end: Optional[int]) -> list:
        dec = self._decoder
        if mac_end is None:
            msg = dec.decode(data, self._known)
        else:
            try:
                msg = dec._decode_authentic(data, mac_end, self._known)
            except Exception:  # pragma: no cover - a bug; still never raise on input
                dec.dropped["undecodable"] += 1
                msg = None
        if msg is None:
            return []
        st = self._stats
        st["received"] += 1
        st["received_bytes"] += len(data)
        self._received_by_kind[KIND_NAMES[msg.kind]] += 1
        sender = msg.sender
        peer = self._peers.get(sender)
        events: list = []
        if peer is None:
            peer = self._peers[sender] = _Peer(sender, msg.epoch, now)
            events.append(PeerNew("peer_new", sender, msg.epoch))
        elif msg.old_epoch is not None or peer.epoch != msg.epoch:
            events.append(PeerEpoch("peer_epoch", sender, peer.epoch, msg.epoch))
            self._unregister_prefix(peer)
            peer.reset(msg.epoch)
        peer.window = dec.windows[sender]
        self.heard_from = peer.heard
        peer.last_heard = now
        peer.datagrams += 1
        kind = msg.kind
        if msg.cached:  # an unchanged full page: bump its timestamp only
            rp = msg.body
            if type(rp) is tuple:  # only `pages` changed: take the new digest
                rp, digest, blen = rp
                if rp.digest is not None:
                    peer.bodies.pop(rp.digest, None)
                rp.digest, rp.blen = digest, blen
                peer.bodies[digest] = rp
            if msg.seq > rp.seq:
                rp.seq = msg.seq
            rp.at = now
            peer.pages.move_to_end(rp.index)
            st["pages_unchanged"] += 1
            return events
        body = msg.body
        if kind == ADVERT:
            if body[4]:
                self._apply_delta(peer, msg.seq, now, body)
            else:
                self._apply_page(peer, msg.seq, now, body, msg.raw_body)
                if msg.head and peer.prefix is None:
                    self._register_prefix(peer, data[:msg.head])
            self._track_generation(peer, msg.seq, body)
        elif kind == HEARTBEAT:
            hb = Heartbeat("heartbeat", sender, msg.epoch, *body)
            peer.heartbeat, peer.heartbeat_at = hb, now
            events.append(hb)
        elif kind == WITHDRAW:
            gone = self._apply_withdraw(peer, msg.seq, body[0])
            events.append(Withdraw("withdraw", sender, msg.epoch, body[0], gone))
        elif kind == CLAIM:
            events.append(Claim("claim", sender, msg.epoch, body[0], body[1], body[2]))
        elif kind == PASS:
            events.append(Pass("pass", sender, msg.epoch, body[0], body[1], body[2]))
        elif kind == PROBE_REQ:
            events.append(ProbeReq("probe_req", sender, msg.epoch, body[0], body[1]))
        elif kind == PROBE_ACK:
            events.append(ProbeAck("probe_ack", sender, msg.epoch, *body))
        return events

    def _register_prefix(self, peer: _Peer, prefix: bytes) -> None:
        """Remember the bytes before seq of the peer's ADVERTs (version .. epoch) for the fast path."""
        peer.prefix = prefix
        self._rx_prefix[prefix] = peer
        self._set_lens()

    def _set_lens(self) -> None:
        self._rx_lens = tuple(sorted({len(p) for p in self._rx_prefix}))
        self._rx_len = self._rx_lens[0] if len(self._rx_lens) == 1 else -1 if self._rx_lens else 0

    def _unregister_prefix(self, peer: _Peer) -> None:
        if peer.prefix is not None:
            self._rx_prefix.pop(peer.prefix, None)
            peer.prefix = None
            self._set_lens()

    def _newer_known(self, peer: _Peer, k: Key, seq: int) -> bool:
        """True when what the table holds about k is newer than seq (or k was withdrawn after)."""
        t = peer.tombs.get(k)
        if t is not None and t > seq:
            return True
        r = peer.entries.get(k)
        return r is not None and r.seq > seq

    def _apply_page(self, peer: _Peer, seq: int, now: float, body, raw: bytes) -> None:
        index, _pages, gen, entries, _ = body
        rp = peer.pages.get(index)
        if rp is None:
            rp = peer.pages[index] = _RxPage(index)
        elif seq < rp.seq:
            self._stats["pages_stale"] += 1
            return
        self._stats["pages_decoded"] += 1
        new_members = set()
        tab = peer.entries
        skipped = False
        for e in entries:
            k = e.key
            r = tab.get(k)
            if self._newer_known(peer, k, seq):
                skipped = True
                if r is not None and r.page is rp:
                    new_members.add(k)
                continue
            if r is not None and r.page is not rp:
                r.page.members.discard(k)
            tab[k] = _RxEntry(e, rp, seq, None, gen)
            if e.reqno and (r is None or r.entry.reqno != e.reqno):
                self.moved.append((peer.name, e))
            new_members.add(k)
        for k in rp.members - new_members:
            r = tab.get(k)
            if r is None or r.page is not rp:
                continue
            if r.seq > seq:
                new_members.add(k)  # a newer delta: its own timestamp rules
            elif r.gen == gen:
                del tab[k]  # gone from its page: the connection ended
            else:  # the sender repacked: it may live on another page now; let it expire
                new_members.add(k)
                if r.at is None:
                    r.at = rp.at
                    heapq.heappush(peer.own, (rp.at, k))
        rp.members = new_members
        rp.seq, rp.gen, rp.at = seq, gen, now
        peer.pages.move_to_end(index)
        _forget_digest(peer, rp)
        if skipped:  # the table is not this body: the same bytes again must be decoded again
            return
        rp.digest, rp.blen = hash(raw), len(raw)
        peer.bodies[rp.digest] = rp
        try:
            _, pos = _take_int(raw, 1)
            _, pos = _take_int(raw, pos)
            rp.rest_digest, rp.rest_len = hash(raw[pos:]), len(raw) - pos
        except Exception:  # pragma: no cover - raw is a checked ADVERT body
            rp.rest_digest = None

    def _apply_delta(self, peer: _Peer, seq: int, now: float, body) -> None:
        index, _pages, gen, entries, _ = body
        self._stats["deltas_received"] += 1
        rp = peer.pages.get(index)
        if rp is None:
            rp = peer.pages[index] = _RxPage(index)
            rp.gen = gen
            peer.pages.move_to_end(index, last=False)
        elif rp.seq > seq and rp.gen == gen:
            # a full version of its page sent after it was applied: that is the truth
            self._stats["deltas_stale"] += 1
            return
        tab = peer.entries
        for e in entries:
            k = e.key
            if self._newer_known(peer, k, seq):
                continue
            r = tab.get(k)
            if r is not None and r.page is not rp:
                r.page.members.discard(k)
            tab[k] = _RxEntry(e, rp, seq, now, gen)
            if e.reqno and (r is None or r.entry.reqno != e.reqno):
                self.moved.append((peer.name, e))
            rp.members.add(k)
            heapq.heappush(peer.own, (now, k))
            # the page's last decoded bytes no longer describe what the table holds for it
            _forget_digest(peer, rp)

    def _track_generation(self, peer: _Peer, seq: int, body) -> None:
        """Once every page of the sender's newest generation has arrived, entries that no
        datagram of that generation confirmed are gone (the sender repacked without them)."""
        index, pages, gen, _, delta = body
        if seq > peer.adv_top:
            peer.adv_top = seq
            if gen != peer.gen:
                # the first generation heard from this sender epoch has nothing older to sweep
                first = peer.gen == -1
                peer.gen, peer.gen_min, peer.gen_pages, peer.gen_swept = gen, seq, set(), first
        elif gen == peer.gen and seq < peer.gen_min:
            peer.gen_min = seq
        if delta or gen != peer.gen or peer.gen_swept:
            return
        peer.gen_pages.add(index)
        if len(peer.gen_pages) < pages or not all(i in peer.gen_pages for i in range(pages)):
            return
        peer.gen_swept = True
        old = [k for k, r in peer.entries.items() if r.seq < peer.gen_min]
        for k in old:
            peer.drop(k)
        for rp in list(peer.pages.values()):
            if rp.index >= pages and not rp.members:
                del peer.pages[rp.index]
                if rp.digest is not None:
                    peer.bodies.pop(rp.digest, None)
        if old:
            self._stats["generation_sweeps"] += 1

    def _apply_withdraw(self, peer: _Peer, seq: int, keys: list) -> list:
        gone = []
        for k in keys:
            r = peer.entries.get(k)
            if r is not None and r.seq < seq:
                peer.drop(k)
                gone.append(k)
                if r.at is None:  # its page's bytes, if sent again unchanged, must be decoded
                    _forget_digest(peer, r.page)
            if peer.tombs.get(k, -1) < seq:
                peer.tombs[k] = seq
                heapq.heappush(peer.tomb_order, (seq, k))
        self._stats["entries_withdrawn"] += len(gone)
        self._prune_tombs(peer)
        return gone

    def _prune_tombs(self, peer: _Peer) -> None:
        w = self._decoder.windows.get(peer.name)
        if w is None:
            return
        low = w.top - REPLAY_WINDOW
        h = peer.tomb_order
        while h and h[0][0] < low:
            s, k = heapq.heappop(h)
            if peer.tombs.get(k) == s:
                del peer.tombs[k]

    def expire(self, now: float) -> List[Tuple[str, Key]]:
        """Drop entries not refreshed for expire_periods x refresh: [(sender, key)] dropped.
        Costs O(what expired): pages are kept in refresh order, delta-held keys in a heap."""
        limit = now - self.expire_periods * self.refresh
        gone: List[Tuple[str, Key]] = []
        for peer in self._peers.values():
            pages = peer.pages
            old = []
            for rp in pages.values():
                if rp.at >= limit:
                    break
                old.append(rp)
            for rp in old:
                _forget_digest(peer, rp)
                keep = set()
                for k in rp.members:
                    r = peer.entries.get(k)
                    if r is None or r.page is not rp:
                        continue
                    if r.at is not None and r.at >= limit:
                        keep.add(k)  # delta-held and fresh
                        continue
                    del peer.entries[k]
                    gone.append((peer.name, k))
                rp.members = keep
                if keep:
                    pages.move_to_end(rp.index)  # stays for its fresh delta-held keys
                else:
                    del pages[rp.index]
            own = peer.own
            while own and own[0][0] < limit:
                at, k = heapq.heappop(own)
                r = peer.entries.get(k)
                if r is None or r.at != at:
                    continue
                peer.drop(k)
                gone.append((peer.name, k))
            self._prune_tombs(peer)
        self._stats["entries_expired"] += len(gone)
        return gone

    # --- peer table ------------------------------------------------------------------------

    def peers(self) -> List[str]:
        return list(self._peers)

    def peer_entries(self, sender: str) -> Dict[Key, Entry]:
        p = self._peers.get(sender)
        return {k: r.entry for k, r in p.entries.items()} if p is not None else {}

    def peer_entry(self, sender: str, key: Key) -> Optional[Entry]:
        p = self._peers.get(sender)
        r = p.entries.get(key) if p is not None else None
        return r.entry if r is not None else None

    def refreshed_at(self, sender: str, key: Key) -> Optional[float]:
        p = self._peers.get(sender)
        r = p.entries.get(key) if p is not None else None
        if r is None:
            return None
        return r.at if r.at is not None and r.at > r.page.at else r.page.at

    def peer_info(self, sender: str) -> Optional[dict]:
        p = self._peers.get(sender)
        if p is None:
            return None
        hb = p.heartbeat
        return {"node": sender, "epoch": p.epoch, "first_heard": p.first_heard, "last_heard": p.last_heard,
                "datagrams": p.datagrams + p.fast, "entries": len(p.entries), "pages": len(p.pages),
                "heartbeat_at": p.heartbeat_at,
                "load": hb.load if hb else None, "connections": hb.connections if hb else None,
                "capacity": hb.capacity if hb else None, "prefixes": list(hb.prefixes) if hb else None,
                "sync_port": hb.sync_port if hb else None}

    def forget_peer(self, sender: str) -> int:
        """Drop a peer's entries (after taking its connections over); its replay state stays,
        so its old datagrams are still refused. Returns how many entries were dropped."""
        p = self._peers.get(sender)
        if p is None:
            return 0
        n = len(p.entries)
        p.reset(p.epoch)
        return n

    def counters(self) -> dict:
        d = dict(self._stats)
        fast = sum(p.fast for p in self._peers.values())
        d["received"] += fast
        d["received_bytes"] += sum(p.fast_bytes for p in self._peers.values())
        d["pages_unchanged"] += fast
        d["dropped"] = dict(self._decoder.dropped)
        d["dropped_total"] = sum(self._decoder.dropped.values())
        d["sent_by_kind"] = dict(self._sent_by_kind)
        d["received_by_kind"] = dict(self._received_by_kind)
        d["received_by_kind"]["advert"] += fast
        d["local_entries"] = len(self._local)
        d["pages"] = len(self._pages)
        d["generation"] = self._generation
        d["peers"] = len(self._peers)
        d["peer_entries"] = sum(len(p.entries) for p in self._peers.values())
        return d

    @property
    def pages(self) -> int:
        return len(self._pages)

    @property
    def generation(self) -> int:
        return self._generation
