"""The takeover server: continue another replica's live HTTP downloads at the exact next byte.

When a support-group peer A dies (or is drained), this replica B takes over each connection
the selection layer hands it (`selection.TakeoverAction`, or an `sync.Entry` directly):

1. **Migrate SYN.** B sends, from its own address and the service port (B_ip:B_port) to the
   client, a SYN carrying only the Migrate option (P=1, ReqNo = entry.reqno + 1, Token and
   Request from Ni, Na, K = 0 and S = entry.body_start), through a raw IP socket
   (appliance.inject.RawInjector), and retransmits it with exponential backoff (200 ms,
   doubling; gives up after 3 s) until the answer comes.
2. **SYN/ACK.** The client appliance answers for the client: seq = the client's acknowledged
   byte (B's rcv_nxt), ack = the client's rcv_nxt (B's snd_nxt), window = the client's last
   window field, TSval/TSecr = the client's last TSval and the last TSval it accepted. A raw
   TCP socket with a classic BPF filter (only SYN+ACK or RST to the service ports) receives
   it. A RST from the client instead means the Migrate SYN was refused: give up. B's kernel
   answers the SYN/ACK with a RST of its own (no socket has the 4-tuple yet); the client
   appliance drops it, and nothing here depends on it.
3. **Repair.** `appliance.repair.repaired_socket()` builds B's socket in the client's exact
   view (sequence space, window scales, MSS, SACK, timestamp clock = TSecr + 1, even); its
   TCP_REPAIR=0 window probe is "B's first ACK" for the client appliance.
4. **Resume** at offset = (ack - body_start) mod 2**32 + body_offset (never ahead of the
   client), see `plan_resume()`: the rest of the body comes from B's own HTTP server as
   `Range: bytes=<offset>-<last>`, accepted only as a 206 with the same total length, first
   byte, ETag and Last-Modified as A's response (else the client connection is reset: a
   refusal), and is copied socket to socket with splice(2) through a pipe, never through
   Python; then the connection is relayed both ways to that same keep-alive local
   connection (later requests are proxied to the local server) until either side closes.
   A connection whose response is complete (or IDLE) is adopted (relay only); one whose
   first response had not begun is answered in full (the request re-issued).

Layers: `Handshake` (sans-I/O: frames and `now` in, Migrate SYN bytes and repair parameters
out), `plan_resume` and the 206 checks (pure), `read_head`/`open_range` and `relay` (blocking
socket helpers, used by one worker thread per connection), and `TakeoverEngine`, which owns
the raw sockets, the handshakes, the workers and the counters, with an asyncio adapter
(`attach(loop)`). Every step is reported through `on_event(kind, **fields)`:

    migrate_syn_sent  attempt, seq, reqno
    synack            seq, ack, window, tsval, tsecr, rtt_ms
    repaired          ms (since start), repair_ms (the syscalls), plan
    resumed           mode (resume/adopt/whole), offset, bytes_left
    first_byte        ms: the first byte written to the client's socket
    resynced          stale_ack, ack, gap: the client was ahead of its SYN/ACK; fixed
    ack_unverified    waited_ms: no answer to the window probe seen (carried on as planned)
    body_sent         bytes, seconds: the resumed range is all written (mode resume only)
    refused           reason: B reset the client connection on purpose
    done              bytes, bytes_from_client, seconds, end
    failed            reason: the takeover could not happen (no SYN/ACK, RST, repair error)

Each event also has client, client_port, server, server_port (A's), mono (time.monotonic())
and wall (time.time()) of the moment it happened, and since_start_ms.

Running it in the server appliance (appliance/server.py)::

    engine = TakeoverEngine(local_ip, service_ports, http_port,
                            on_event=lambda kind, **f: writer.event(kind, **f),
                            on_owned=lambda e: group.local_add(e, time.monotonic()),
                            on_released=lambda e: group.local_remove(e.key, time.monotonic()))
    engine.attach(loop)                      # in the loop's thread
    for action in group.pop_actions():       # selection.TakeoverAction
        engine.start(action)
    snapshot["takeover"] = engine.snapshot()
    engine.close()                           # at shutdown

What the client appliance should guarantee (besides the protocol above): the SYN/ACK's ack
is the client's exact rcv_nxt. Segments of the old server already passed to the client but
not yet acknowledged by it (delayed ACK; a planned migration with A still sending) make a
stale ack, and if B starts more than its initial window (~14 KB) behind, the connection
stalls for good (notes/tcp-repair.md, pitfall 6): answer only once the client's ACK covers
the last byte forwarded from the old server (bounded wait), or elicit a fresh ACK first.
B catches it anyway (verify_ack: the client's answer to the window probe carries its real
rcv_nxt; up to max_resync bytes are fixed, a "resynced" event), at the price of waiting
for that answer (one RTT, in parallel with the local fetch) before the first byte.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import re
import select
import socket
import struct
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import httptools

import _fastpath as fp

from . import repair

__all__ = [
    "Handshake", "RepairParams", "SynAck", "Plan", "plan_resume", "Refused", "range_request",
    "whole_request", "check_range_head", "read_head", "open_range", "relay", "synack_filter", "owned_entry",
    "interface_ipv4", "tuple_filter", "ClientAck",
    "TakeoverEngine", "SENT", "ANSWERED", "RESET", "EXPIRED", "RESUME", "ADOPT", "WHOLE", "REFUSE",
]

MASK32 = 0xFFFFFFFF
INITIAL_RTO = 0.2
BACKOFF = 2.0
GIVE_UP = 3.0
MAX_HEAD = 65536
PIPE_SIZE = 1 << 20
MAX_RESYNC = 4 << 20  # bytes a stale SYN/ACK ack may be behind the client and still be fixed

SENT, ANSWERED, RESET, EXPIRED = "sent", "answered", "reset", "expired"
RESUME, ADOPT, WHOLE, REFUSE = "resume", "adopt", "whole", "refuse"


def _text(packed: bytes) -> str:
    return fp.address_text(packed)


# --- The handshake, sans-I/O --------------------------------------------------------------------


class SynAck(NamedTuple):
    """The client appliance's SYN/ACK as received."""

    seq: int  # the client's acknowledged byte: B's rcv_nxt
    ack: int  # the client's rcv_nxt: B's snd_nxt
    window: int  # the client's last window field (unscaled)
    tsval: Optional[int]
    tsecr: Optional[int]  # the last TSval the client accepted from the old server
    rtt: float  # seconds since the latest Migrate SYN was sent
    elapsed: float  # seconds since the first one
    attempts: int


class RepairParams(NamedTuple):
    """The arguments of appliance.repair.repaired_socket() for one takeover."""

    local: Tuple[str, int]
    remote: Tuple[str, int]
    rcv_nxt: int
    snd_nxt: int
    mss: int
    snd_wscale: Optional[int]
    rcv_wscale: Optional[int]
    sack: bool
    timestamps: bool
    ts_val: Optional[int]
    snd_wnd: int
    rcv_wnd: int

    def kwargs(self) -> dict:
        return self._asdict()


class Handshake:
    """One connection's Migrate handshake: the Migrate SYN and its retransmissions, and the
    check that a SYN/ACK answers it. Sans-I/O: `now` is passed in, bytes come out.

    entry: the advertised sync.Entry of the connection (A's address is in it; the client's
    address and port, Ni, Na, options, reqno). local_ip: this replica's address (text or
    packed); local_port: B's service port (default: the entry's server port).
    """

    def __init__(self, entry, local_ip, now: float, local_port: Optional[int] = None,
                 initial_rto: float = INITIAL_RTO, backoff: float = BACKOFF, give_up: float = GIVE_UP,
                 build_migrate_syn: Callable = None) -> None:
        if initial_rto <= 0 or backoff < 1 or give_up <= 0:
            raise ValueError("initial_rto and give_up must be positive, backoff at least 1")
        self.entry = entry
        self.local = fp.pack_address(local_ip)
        if len(self.local) != len(entry.client_ip):
            raise ValueError("the local address and the client's are of different families")
        self.local_port = entry.server_port if local_port is None else local_port
        self.seq = entry.body_start & MASK32  # S: any value works; it is an input of Request
        self.reqno = fp.reqno_next(entry.reqno)
        self.token = fp.migrate_token(entry.ni, entry.na)
        self.request = fp.migrate_request(entry.ni, entry.na, b"", self.seq, self.reqno)
        build = build_migrate_syn or fp.build_migrate_syn
        self.packet = build(self.local, entry.client_ip, self.local_port, entry.client_port, seq=self.seq,
                            reqno=self.reqno, token=self.token, request=self.request, preload=True)
        self.initial_rto, self.backoff, self.give_up = initial_rto, backoff, give_up
        self.started = now
        self.state = SENT
        self.reason = ""
        self.attempts = 0
        self.sent_at: List[float] = []
        self._next_due = now
        self._rto = initial_rto
        self.synack: Optional[SynAck] = None

    @property
    def match(self) -> tuple:
        """(src, sport, dst, dport) of the answer: the Migrate SYN's 4-tuple reversed."""
        return (self.entry.client_ip, self.entry.client_port, self.local, self.local_port)

    def datagrams(self, now: float) -> List[bytes]:
        """The Migrate SYN if one is due at `now` (the first at once, then after 200 ms,
        400 ms, ... while the give-up time has not come), else []."""
        if self.state != SENT or now < self._next_due or now >= self.started + self.give_up:
            return []
        self.attempts += 1
        self.sent_at.append(now)
        self._next_due = now + self._rto
        self._rto *= self.backoff
        return [self.packet]

    def next_deadline(self) -> Optional[float]:
        """When datagrams() or expired() next has something to do; None once settled."""
        if self.state != SENT:
            return None
        return min(self._next_due, self.started + self.give_up)

    def expired(self, now: float) -> bool:
        """True (and state EXPIRED) once give_up seconds passed without an answer."""
        if self.state == SENT and now >= self.started + self.give_up:
            self.state = EXPIRED
            self.reason = f"no SYN/ACK within {self.give_up:g} s ({self.attempts} Migrate SYNs sent)"
        return self.state == EXPIRED

    def on_synack(self, view, now: float) -> Optional[RepairParams]:
        """The repair parameters if `view` (a parsed IP packet) answers our Migrate SYN.

        None if it is not ours (another 4-tuple, not SYN+ACK, or we are not waiting). A RST
        from the client for our 4-tuple while waiting sets state RESET (the client appliance
        refused the Migrate SYN) and also returns None. The SYN/ACK needs no Migrate option.
        """
        if self.state != SENT or not view.is_tcp:
            return None
        if (view.src, view.sport, view.dst, view.dport) != self.match:
            return None
        flags = view.flags
        if flags & fp.RST:
            self.state = RESET
            self.reason = "the client appliance reset the Migrate SYN (refused: token, Request or ReqNo)"
            return None
        if flags & (fp.SYN | fp.ACK) != fp.SYN | fp.ACK:
            return None
        e = self.entry
        last = self.sent_at[-1] if self.sent_at else self.started
        has_ts = bool(view.opts & fp.HAS_TIMESTAMPS)
        self.synack = SynAck(view.seq, view.ack, view.window, view.tsval if has_ts else None,
                             view.tsecr if has_ts else None, now - last, now - self.started, self.attempts)
        self.state = ANSWERED
        return repair_params(e, self.local, self.local_port, self.synack)


def repair_params(entry, local: bytes, local_port: int, synack: SynAck) -> RepairParams:
    """What repaired_socket() needs, from the advertised entry and the SYN/ACK."""
    e = entry
    wscale = e.c_wscale >= 0 and e.s_wscale >= 0
    snd_ws = e.c_wscale if wscale else None
    rcv_ws = e.s_wscale if wscale else None
    ts = e.c_ts and e.s_ts and synack.tsecr is not None
    ts_val = repair.even_timestamp(synack.tsecr + 1) if ts else None
    snd_wnd = min(synack.window << (snd_ws or 0), repair.MAX_WINDOW)
    rcv_wnd = min(65535 << (rcv_ws or 0), repair.MAX_WINDOW)
    return RepairParams((_text(local), local_port), (_text(e.client_ip), e.client_port), synack.seq, synack.ack,
                        e.c_mss or repair.DEFAULT_MSS, snd_ws, rcv_ws, bool(e.c_sack and e.s_sack), ts, ts_val,
                        snd_wnd, rcv_wnd)


# --- Where to resume --------------------------------------------------------------------------


class Plan(NamedTuple):
    kind: str  # RESUME, ADOPT, WHOLE or REFUSE
    offset: Optional[int] = None  # object offset of the next byte the client wants (RESUME, WHOLE)
    bytes_left: int = 0  # body bytes still to send (RESUME: to the end of A's response)
    reason: str = ""  # REFUSE: why
    beyond: int = 0  # ADOPT: how far the client is past the end of the advertised response


def plan_resume(entry, ack: int) -> Plan:
    """What to do, given the SYN/ACK's ack (the client's rcv_nxt).

    Positions are measured from Na + 1 modulo 2**32, so the 2**32 wrap is harmless:
    * IDLE entry -> ADOPT (relay only).
    * ack == Na + 1 (the first response had not begun) -> WHOLE (re-issue the request).
    * ack before body_start otherwise -> REFUSE "inside the response head".
    * received = (ack - body_start) mod 2**32 < body_length -> RESUME at
      body_offset + received, body_length - received bytes left.
    * received >= body_length (the response is complete) -> ADOPT.
    """
    if entry.state != "ACTIVE":  # sync.IDLE
        return Plan(ADOPT)
    first = (entry.na + 1) & MASK32
    if ack & MASK32 == first:
        return Plan(WHOLE, entry.body_offset, entry.body_length)
    pos = (ack - first) & MASK32
    body = (entry.body_start - first) & MASK32
    if pos < body:
        return Plan(REFUSE, reason=f"inside the response head ({body - pos} bytes before the body)")
    received = (ack - entry.body_start) & MASK32
    if received < entry.body_length:
        return Plan(RESUME, entry.body_offset + received, entry.body_length - received)
    return Plan(ADOPT, beyond=received - entry.body_length)


# --- The local HTTP server ------------------------------------------------------------------------


class Refused(Exception):
    """The takeover must not continue; the client connection is reset. str() is the reason."""


def _host(entry, default: str) -> str:
    host = getattr(entry.object, "host", "") if entry.object is not None else ""
    return host or default


def range_request(entry, offset: int, host_default: str) -> bytes:
    """GET <path> with Range: bytes=<offset>-<last of A's response>, keep-alive."""
    last = entry.body_offset + entry.body_length - 1
    return (f"GET {entry.object.path} HTTP/1.1\r\nHost: {_host(entry, host_default)}\r\n"
            f"Range: bytes={offset}-{last}\r\nConnection: keep-alive\r\n\r\n").encode("latin-1")


def whole_request(entry, host_default: str) -> bytes:
    """The original request again (its Range, if any), keep-alive."""
    rng = f"Range: {entry.req_range}\r\n" if entry.req_range else ""
    return (f"GET {entry.object.path} HTTP/1.1\r\nHost: {_host(entry, host_default)}\r\n{rng}"
            f"Connection: keep-alive\r\n\r\n").encode("latin-1")


class _Head:
    __slots__ = ("headers", "complete")

    def __init__(self) -> None:
        self.headers: Dict[str, str] = {}
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        self.complete = True


class ResponseHead(NamedTuple):
    status: int
    headers: Dict[str, str]  # names lower-cased
    length: int  # bytes of the head, blank line included


def parse_head(data: bytes) -> ResponseHead:
    """Parse a complete response head (up to and including the blank line) with httptools."""
    h = _Head()
    parser = httptools.HttpResponseParser(h)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
        if not h.complete:
            raise Refused(f"local server: unparsable response head ({exc or type(exc).__name__})") from None
    if not h.complete:
        raise Refused("local server: incomplete response head")
    return ResponseHead(parser.get_status_code(), h.headers, len(data))


def read_head(sock: socket.socket, deadline: float, limit: int = MAX_HEAD, consume: bool = True) -> ResponseHead:
    """Read exactly the response head from a blocking socket, leaving the body in it.

    Peeks (MSG_PEEK) until the blank line is there, raising SO_RCVLOWAT to wait for more
    bytes instead of spinning, then consumes just the head (unless consume is False): the
    body stays in the kernel for splice()."""
    want = 1
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Refused("local server: no complete response head in time")
            sock.settimeout(left)
            try:
                data = sock.recv(limit, socket.MSG_PEEK)
            except socket.timeout:
                raise Refused("local server: no complete response head in time") from None
            if not data:
                raise Refused("local server closed the connection before a response head")
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                head = parse_head(data[:end + 4])
                break
            if len(data) >= limit:
                raise Refused(f"local server: response head longer than {limit} bytes")
            if len(data) < want:  # readable below SO_RCVLOWAT: the peer's FIN came first
                raise Refused("local server closed the connection before a response head")
            want = len(data) + 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
    finally:
        if want > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
    if not consume:
        return head
    got = sock.recv(head.length, socket.MSG_WAITALL)
    if len(got) != head.length:
        raise Refused("local server: the response head vanished while being read")
    return head


_CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+)\s*\Z", re.I)


def check_range_head(head: ResponseHead, entry, offset: int) -> Optional[str]:
    """Why the local answer to range_request() must not be spliced into the client's stream,
    or None: it must be a 206 for exactly [offset, A's last byte] of an object with A's total
    length, ETag and Last-Modified (when A's response had them), with that Content-Length."""
    obj = entry.object
    last = entry.body_offset + entry.body_length - 1
    count = last - offset + 1
    h = head.headers
    if head.status != 206:
        return f"status: local server answered {head.status}, not 206"
    if "transfer-encoding" in h:
        return f"transfer-encoding: local response is {h['transfer-encoding']}"
    m = _CONTENT_RANGE.match(h.get("content-range", ""))
    if not m:
        return f"content-range: unusable ({h.get('content-range')!r})"
    first, end, total = (int(x) for x in m.groups())
    if total != obj.total_length:
        return f"total: the local object has {total} bytes, A's had {obj.total_length}"
    if first != offset:
        return f"first byte: the local range starts at {first}, not {offset}"
    if end != last:
        return f"last byte: the local range ends at {end}, not {last}"
    if h.get("content-length") != str(count):
        return f"content-length: {h.get('content-length')!r}, not {count}"
    if obj.etag is not None and h.get("etag") != obj.etag:
        return f"etag: local {h.get('etag')!r} differs from A's {obj.etag!r}"
    if obj.last_modified is not None and h.get("last-modified") != obj.last_modified:
        return f"last-modified: local {h.get('last-modified')!r} differs from A's {obj.last_modified!r}"
    return None


def owned_entry(entry, local: bytes, local_port: int, reqno: int, head: Optional[ResponseHead] = None):
    """The sync.Entry this replica advertises for a connection it took over, or None.

    B continues in the client's own sequence space, so A's entry stays true for the
    response being resumed; only the server address (B's), the port and the ReqNo (the one
    this takeover used, so the next takeover uses a newer one) change. For a response B
    sent whole, `head` is B's own response head: the body starts after it (Na + 1 + its
    length); None is returned when that response could not be resumed (no Content-Length,
    chunked, a status other than 200/206)."""
    from dataclasses import replace

    from .sync import ObjectRef

    e = replace(entry, server_ip=local, server_port=local_port, reqno=reqno)
    if head is None:
        return e
    h = head.headers
    if head.status not in (200, 206) or "transfer-encoding" in h or not h.get("content-length", "").isdigit():
        return None
    length = int(h["content-length"])
    offset, total = 0, length
    if head.status == 206:
        m = _CONTENT_RANGE.match(h.get("content-range", ""))
        if not m:
            return None
        offset, total = int(m.group(1)), int(m.group(3))
    obj = ObjectRef(entry.object.host, entry.object.path, h.get("etag"), h.get("last-modified"), total)
    return replace(e, object=obj, status=head.status, body_start=(entry.na + 1 + head.length) & MASK32,
                   body_offset=offset, body_length=length)


def _recv_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Refused("local server: the body did not come in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except socket.timeout:
            continue
        if not chunk:
            raise Refused("local server: the body ended early")
        buf += chunk
    return bytes(buf)


def connect_local(addr: Tuple[str, int], timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection(addr, timeout=timeout)
    except OSError as exc:
        raise Refused(f"local server {addr[0]}:{addr[1]}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def open_range(addr: Tuple[str, int], entry, offset: int, timeout: float = 5.0,
               host_default: Optional[str] = None) -> Tuple[socket.socket, ResponseHead]:
    """A local keep-alive connection whose next bytes are A's body from `offset` on, the
    validated head consumed. Raises Refused with the reason otherwise."""
    deadline = time.monotonic() + timeout
    sock = connect_local(addr, timeout)
    try:
        sock.sendall(range_request(entry, offset, host_default or addr[0]))
        head = read_head(sock, deadline)
        why = check_range_head(head, entry, offset)
        if why:
            raise Refused(why)
    except BaseException as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise Refused(f"local server: {exc.strerror or exc}") from None
        raise
    return sock, head


# --- Relaying with splice(2) ------------------------------------------------------------------------

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_IN, _OUT, _BAD = select.POLLIN, select.POLLOUT, select.POLLERR | select.POLLHUP | select.POLLNVAL


class _Dir:
    # full: the last splice into the pipe found it full. A pipe holds a fixed number of
    # buffers, and splice from a TCP socket fills one per skb fragment, so it can be full with
    # far fewer than `cap` bytes; polling the source then only spins.
    __slots__ = ("src", "dst", "r", "w", "cap", "pending", "eof", "moved", "shut", "full")

    def __init__(self, src: socket.socket, dst: socket.socket, pipe_size: int) -> None:
        self.src, self.dst = src, dst
        self.r, self.w = os.pipe()
        try:
            self.cap = fcntl.fcntl(self.w, _F_SETPIPE_SZ, pipe_size)
        except OSError:
            self.cap = 65536
        self.pending = 0
        self.eof = self.shut = self.full = False
        self.moved = 0

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class RelayResult(NamedTuple):
    to_client: int
    to_local: int
    end: str  # why it ended


def relay(client: socket.socket, local: socket.socket, stop: Optional[threading.Event] = None,
          idle_timeout: float = 300.0, pipe_size: int = PIPE_SIZE,
          on_client_bytes: Optional[Callable[[int], None]] = None, tick: float = 0.25,
          on_local_bytes: Optional[Callable[[int], None]] = None) -> RelayResult:
    """Copy bytes both ways between two sockets with splice(2) through pipes, in this thread.

    local -> client first of all (the resumed body, then later responses); client -> local
    (later requests). Ends when the local side closes (its last bytes delivered), on an
    error or reset of either side, after idle_timeout seconds without a byte either way, or
    when `stop` is set (checked every `tick`). A client FIN is passed on as a shutdown of the
    local socket's sending side; the relay then waits for the local side. on_client_bytes(n)
    is called with the running total after each write to the client, on_local_bytes(n) after
    each write to the local server. The sockets are left non-blocking and open (the caller
    closes them)."""
    client.setblocking(False)
    local.setblocking(False)
    down = _Dir(local, client, pipe_size)  # local -> client
    up = _Dir(client, local, pipe_size)  # client -> local
    cfd, lfd = client.fileno(), local.fileno()
    names = {cfd: "client", lfd: "local"}
    poller = select.poll()
    registered = {}
    end = None
    spins = 0
    last_move = time.monotonic()
    try:
        while end is None:
            if stop is not None and stop.is_set():
                end = "stopped"
                break
            masks = {cfd: 0, lfd: 0}
            for d in (down, up):
                if not d.eof and d.pending < d.cap and not d.full:
                    masks[d.src.fileno()] |= _IN
                if d.pending:
                    masks[d.dst.fileno()] |= _OUT
            for fd, m in masks.items():
                if m:
                    if registered.get(fd) != m:
                        poller.register(fd, m)
                        registered[fd] = m
                elif fd in registered:
                    poller.unregister(fd)
                    del registered[fd]
            if not registered:  # nothing to wait for: both directions finished
                end = "closed"
                break
            ready = dict(poller.poll(tick * 1000))
            now = time.monotonic()
            if now - last_move > idle_timeout:
                end = "idle"
                break
            if not ready:
                continue
            moved_before = down.moved + up.moved + down.pending + up.pending
            eofs_before = down.eof + up.eof
            for d in (down, up):
                sfd, dfd = d.src.fileno(), d.dst.fileno()
                if not d.eof and d.pending < d.cap and not d.full and ready.get(sfd, 0) & (_IN | _BAD):
                    try:
                        n = os.splice(sfd, d.w, d.cap - d.pending, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = -1
                        d.full = d.pending > 0  # the pipe's buffers are all taken: wait for the sink
                    except OSError as exc:
                        end = f"{names[sfd]} error: {exc.strerror or exc}"
                        break
                    if n == 0:
                        d.eof = True
                    elif n > 0:
                        d.pending += n
                        last_move = now
                if d.pending and (ready.get(dfd, 0) & (_OUT | _BAD) or ready.get(sfd, 0) & _IN):
                    try:
                        n = os.splice(d.r, dfd, d.pending, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = 0
                    except OSError as exc:
                        end = f"{names[dfd]} error: {exc.strerror or exc}"
                        break
                    if n > 0:
                        d.pending -= n
                        d.moved += n
                        d.full = False
                        last_move = now
                        if d is down:
                            if on_client_bytes is not None:
                                on_client_bytes(d.moved)
                        elif on_local_bytes is not None:
                            on_local_bytes(d.moved)
                if d.eof and not d.pending:
                    if d is down:
                        end = "local closed"
                        break
                    if not d.shut:  # the client's FIN, passed on
                        d.shut = True
                        try:
                            local.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                if end is None and ready.get(dfd, 0) & select.POLLERR and not d.pending:
                    err = d.dst.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        end = f"{names[dfd]} error: {os.strerror(err)}"
                        break
            if down.moved + up.moved + down.pending + up.pending + down.eof + up.eof != moved_before + eofs_before:
                spins = 0
            else:  # woken for nothing (an error or hang-up nobody reads): bounded
                spins += 1
                if spins > 1000:
                    end = "stalled"
                    break
    finally:
        down.close()
        up.close()
    return RelayResult(down.moved, up.moved, end)


# --- Receiving SYN/ACKs: a classic BPF filter for a raw TCP socket ----------------------------------

SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
_LDB_ABS, _LDH_ABS, _LDXB_MSH, _LDH_IND, _LDB_IND = 0x30, 0x28, 0xB1, 0x48, 0x50
_LDX_IMM, _JEQ, _JSET, _AND, _RET = 0x01, 0x15, 0x45, 0x54, 0x06


def synack_filter(ports, ipv4: bool = True) -> List[Tuple[int, int, int, int]]:
    """A classic BPF program for a raw TCP socket admitting only segments to `ports` that
    carry SYN+ACK, or RST. IPv4 raw sockets see the IP header first (unfragmented TCP is
    checked); IPv6 ones see the TCP header. Instructions as (code, jt, jf, k)."""
    ports = sorted(set(int(p) for p in ports))
    if not ports or not all(0 < p < 65536 for p in ports):
        raise ValueError("service ports must be 1..65535")
    prog: list = []  # entries: [code, jt, jf, k] with jt/jf as labels or ints
    if ipv4:
        prog += [[_LDB_ABS, 0, 0, 9], [_JEQ, 0, "drop", 6],
                 [_LDH_ABS, 0, 0, 6], [_JSET, "drop", 0, 0x1FFF],
                 [_LDXB_MSH, 0, 0, 0]]
    else:
        prog += [[_LDX_IMM, 0, 0, 0]]
    prog.append([_LDH_IND, 0, 0, 2])
    for i, p in enumerate(ports):
        prog.append([_JEQ, "flags", 0 if i + 1 < len(ports) else "drop", p])
    labels = {"flags": len(prog)}
    prog += [[_LDB_IND, 0, 0, 13], [_JSET, "accept", 0, 0x04], [_AND, 0, 0, 0x12], [_JEQ, "accept", "drop", 0x12]]
    labels["accept"] = len(prog)
    prog.append([_RET, 0, 0, 0x40000])
    labels["drop"] = len(prog)
    prog.append([_RET, 0, 0, 0])
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out.append((code, jt, jf, k))
    return out


def attach_filter(sock: socket.socket, prog) -> None:
    code = b"".join(struct.pack("HBBI", c, jt, jf, k) for c, jt, jf, k in prog)
    buf = ctypes.create_string_buffer(code)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(prog), ctypes.addressof(buf)))


class TakeoverError(OSError):
    """The engine cannot run here (e.g. no privilege for raw sockets)."""


IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)


class _Receiver:
    """A raw TCP socket with the SYN/ACK filter; yields whole IP packets (IPv6 heads rebuilt)."""

    def __init__(self, family: int, ports) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        except PermissionError:
            raise TakeoverError(errno.EPERM, "the SYN/ACK receiver needs a raw socket (CAP_NET_RAW: run as root)") \
                from None
        try:
            attach_filter(sock, synack_filter(ports, family == socket.AF_INET))
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            try:  # a mass failover brings a SYN/ACK per connection at once
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setblocking(False)
            for _ in range(100_000):  # what arrived before the filter was attached
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
        except OSError:
            sock.close()
            raise
        self.sock, self.family = sock, family

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, limit: int) -> List[bytes]:
        out = []
        for _ in range(limit):
            try:
                if self.family == socket.AF_INET:
                    out.append(self.sock.recv(65536))
                    continue
                data, anc, _, addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(20))
            except BlockingIOError:
                break
            except OSError:
                break
            dst = None
            for level, kind, cdata in anc:
                if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(cdata) >= 16:
                    dst = cdata[:16]
            if dst is None:
                continue
            src = socket.inet_pton(socket.AF_INET6, addr[0].split("%")[0])
            out.append(struct.pack("!IHBB16s16s", 6 << 28, len(data), socket.IPPROTO_TCP, 64, src, dst) + data)
        return out

    def close(self) -> None:
        self.sock.close()


_LD_ABS = 0x20


def tuple_filter(client_ip: bytes, client_port: int, local_port: int) -> List[Tuple[int, int, int, int]]:
    """A classic BPF program for a raw TCP socket admitting only ACK-carrying segments from
    client_ip:client_port to local_port (IPv4; for IPv6, whose raw sockets see no IP header,
    the ports only: check the source address when reading)."""
    prog: list = []
    if len(client_ip) == 4:
        prog += [[_LDB_ABS, 0, 0, 9], [_JEQ, 0, "drop", 6], [_LDH_ABS, 0, 0, 6], [_JSET, "drop", 0, 0x1FFF],
                 [_LD_ABS, 0, 0, 12], [_JEQ, 0, "drop", int.from_bytes(client_ip, "big")], [_LDXB_MSH, 0, 0, 0]]
    else:
        prog.append([_LDX_IMM, 0, 0, 0])
    prog += [[_LDH_IND, 0, 0, 0], [_JEQ, 0, "drop", client_port], [_LDH_IND, 0, 0, 2], [_JEQ, 0, "drop", local_port],
             [_LDB_IND, 0, 0, 13], [_JSET, 0, "drop", 0x10], [_RET, 0, 0, 0x40000], [_RET, 0, 0, 0]]
    drop = len(prog) - 1
    return [(c, drop - i - 1 if jt == "drop" else jt, drop - i - 1 if jf == "drop" else jf, k)
            for i, (c, jt, jf, k) in enumerate(prog)]


class ClientAck(NamedTuple):
    seq: int
    ack: int  # the client's rcv_nxt as it really is
    window: int
    tsval: Optional[int]
    tsecr: Optional[int]


class _AckWatch:
    """Sees the client's first segment to a repaired socket: its answer to the window probe,
    which carries the client's real rcv_nxt. Opened before the repair, read once, closed."""

    def __init__(self, client_ip: bytes, client_port: int, local: bytes, local_port: int) -> None:
        self.family = socket.AF_INET if len(client_ip) == 4 else socket.AF_INET6
        self.client_ip, self.local = client_ip, local
        sock = socket.socket(self.family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        try:
            attach_filter(sock, tuple_filter(client_ip, client_port, local_port))
            sock.setblocking(False)
            for _ in range(10_000):
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def first_ack(self, deadline: float) -> Optional[ClientAck]:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.sock], [], [], left)
            if not r:
                return None
            try:
                data, addr = self.sock.recvfrom(65536)
            except BlockingIOError:
                continue
            if self.family == socket.AF_INET6:
                if socket.inet_pton(socket.AF_INET6, addr[0].split("%")[0]) != self.client_ip:
                    continue
                data = struct.pack("!IHBB16s16s", 6 << 28, len(data), socket.IPPROTO_TCP, 64, self.client_ip,
                                   self.local) + data
            v = fp.parse(data, fp.LINK_RAW)
            if v.is_tcp and v.flags & fp.ACK and not v.flags & (fp.SYN | fp.RST):
                ts = bool(v.opts & fp.HAS_TIMESTAMPS)
                return ClientAck(v.seq, v.ack, v.window, v.tsval if ts else None, v.tsecr if ts else None)

    def close(self) -> None:
        self.sock.close()


SIOCGIFADDR = 0x8915


def interface_ipv4(iface: str) -> str:
    """The IPv4 address of an interface (e.g. service.iface), for TakeoverEngine's local_ip.
    Raises OSError (EADDRNOTAVAIL, ENODEV) when it has none or does not exist."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16s16x", iface.encode()[:15])
        res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, ifreq)
    return socket.inet_ntoa(res[20:24])


# --- The engine ------------------------------------------------------------------------------------


@dataclass
class _Takeover:
    key: tuple
    entry: object
    hs: Handshake
    started: float  # time.monotonic() at start (the handshake runs on the caller's `now`)
    fields: dict
    phase: str = "handshake"  # handshake, repairing, fetching, relaying, done, refused, failed
    plan: Optional[Plan] = None
    sock: Optional[socket.socket] = None
    local: Optional[socket.socket] = None
    thread: Optional[threading.Thread] = None
    stop: Optional[threading.Event] = None
    to_client: int = 0
    to_local: int = 0
    first_byte: Optional[float] = None
    ended: Optional[float] = None
    reason: str = ""
    owned: object = None  # the sync.Entry this replica advertises for it while relaying
    params: Optional[RepairParams] = None
    watch: Optional[_AckWatch] = None
    repaired_at: float = 0.0

    def row(self, now: float) -> dict:
        p = self.plan
        return {**self.fields, "phase": self.phase, "attempts": self.hs.attempts,
                "age_s": round((self.ended or now) - self.started, 3), "plan": p.kind if p else None,
                "offset": p.offset if p else None, "bytes_left": p.bytes_left if p else None,
                "to_client": self.to_client, "to_local": self.to_local, "reason": self.reason,
                "reqno": self.hs.reqno}


def _linger_reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a RST instead of a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class TakeoverEngine:
    """Takes over connections of dead (or draining) peers on this replica.

    local_ip: this replica's address (Migrate SYNs leave from it; repaired sockets bind it).
    service_ports: the ports this replica serves (B_port is the entry's server port when it
        is one of them, else the first); the receiver admits SYN/ACKs and RSTs to them only.
    http_port: the local HTTP server's port (reached at http_host, default local_ip).
    on_event(kind, **fields): the report of every step (module docstring). With a loop
        attached, events from worker threads are delivered in the loop's thread.
    injector: sends IP packets (default appliance.inject.RawInjector()).
    receiver: open the raw SYN/ACK socket (False: feed() packets yourself, e.g. in tests).
    socket_factory: builds the socket from RepairParams (default repair.repaired_socket).
    max_active: takeovers at once (each relay holds 2 sockets, 2 pipes and a thread);
        more are failed at start ("busy").
    verify_ack: (default: when receiver is on) check the SYN/ACK's ack against the client's
        answer to the repaired socket's window probe, read on a raw socket filtered to that
        one 4-tuple while the local response is fetched. If the client is ahead (a stale
        ack: bytes of the old server's still unacknowledged when the client appliance
        answered), the missing bytes (at most max_resync) are marked as sent in the
        repaired socket (repair.mark_sent) and the resume point moves up: a "resynced"
        event. Without this a gap larger than the initial window stalls the connection.
    on_owned(entry) / on_released(entry): this replica now serves the connection and should
        advertise `entry` to its group (owned_entry(): A's entry with B's address, port and
        the ReqNo used), so that a later takeover from B (a cascade) works; released when
        the relay ends, or when the client sends a later request (the entry would be stale:
        the relay does not parse the responses it splices). Called in the loop's thread when
        a loop is attached. owned_entries() lists the current ones.

    Drive it with attach(loop) (asyncio), or call on_readable(now), poll(now) and
    next_deadline() from any loop; start(), abort(), on_readable() and poll() belong to one
    thread (the loop's). Relays run in their own daemon threads; close() stops them.
    """

    def __init__(self, local_ip: str, service_ports, http_port: int, on_event: Callable = None,
                 injector=None, *, http_host: Optional[str] = None, initial_rto: float = INITIAL_RTO,
                 backoff: float = BACKOFF, give_up: float = GIVE_UP, receiver: bool = True,
                 socket_factory: Optional[Callable] = None, max_active: int = 256, fetch_timeout: float = 5.0,
                 idle_timeout: float = 300.0, pipe_size: int = PIPE_SIZE, keep_finished: int = 100,
                 on_owned: Optional[Callable] = None, on_released: Optional[Callable] = None,
                 verify_ack: Optional[bool] = None, max_resync: int = MAX_RESYNC) -> None:
        self.local_ip = str(ipaddress.ip_address(local_ip))
        self.local_packed = fp.pack_address(self.local_ip)
        self.family = socket.AF_INET6 if len(self.local_packed) == 16 else socket.AF_INET
        self.service_ports = sorted(set(int(p) for p in service_ports))
        if not self.service_ports:
            raise ValueError("at least one service port")
        self.http_addr = (http_host or self.local_ip, int(http_port))
        self.on_event = on_event
        self.on_owned, self.on_released = on_owned, on_released
        if injector is None:
            from .inject import RawInjector
            injector = RawInjector()
        self.injector = injector
        self.timing = (initial_rto, backoff, give_up)
        self.socket_factory = socket_factory or repair.repaired_socket
        self.max_active = max_active
        self.fetch_timeout, self.idle_timeout, self.pipe_size = fetch_timeout, idle_timeout, pipe_size
        self._receiver = _Receiver(self.family, self.service_ports) if receiver else None
        self.verify_ack = receiver if verify_ack is None else verify_ack
        self.max_resync = max_resync
        self._lock = threading.Lock()
        self._event_lock = threading.Lock()
        self._active: "OrderedDict[tuple, _Takeover]" = OrderedDict()
        self._by_match: Dict[tuple, _Takeover] = {}
        self._finished: deque = deque(maxlen=keep_finished)
        self._loop = None
        self._timer = None
        self._closed = False
        self._counters = dict.fromkeys(
            ("started", "migrate_syns", "retransmissions", "synacks", "repaired", "resumed", "adopted", "whole",
             "refused", "failed", "done", "duplicates", "busy", "packets", "ignored", "bytes_to_client",
             "bytes_from_client", "send_errors"), 0)

    # -- events ----------------------------------------------------------------------------------

    def _emit(self, t: Optional[_Takeover], kind: str, **fields) -> None:
        mono = time.monotonic()
        base = dict(t.fields) if t is not None else {}
        if t is not None:
            base["since_start_ms"] = round((mono - t.started) * 1000, 3)
        base.update(fields)
        base["mono"] = mono
        base["wall"] = time.time()
        if self.on_event is not None:
            self._in_loop(self.on_event, kind, **base)

    def _in_loop(self, fn: Callable, *args, **kw) -> None:
        """Call fn in the loop's thread when a loop is attached (else here, serialized)."""
        loop = self._loop
        if loop is not None and threading.current_thread() is not self._loop_thread:
            try:
                loop.call_soon_threadsafe(lambda: self._call(fn, args, kw))
                return
            except RuntimeError:  # the loop is closed: call here
                pass
        self._call(fn, args, kw)

    def _call(self, fn: Callable, args, kw) -> None:
        with self._event_lock:
            try:
                fn(*args, **kw)
            except Exception:  # a reporting bug must not break a takeover
                pass

    def _own(self, t: _Takeover, entry) -> None:
        t.owned = entry
        if entry is not None and self.on_owned is not None:
            self._in_loop(self.on_owned, entry)

    def _release(self, t: _Takeover) -> None:
        entry, t.owned = t.owned, None
        if entry is not None and self.on_released is not None:
            self._in_loop(self.on_released, entry)

    def owned_entries(self) -> list:
        """The entries this replica should advertise for connections it took over."""
        with self._lock:
            return [t.owned for t in self._active.values() if t.owned is not None]

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    # -- starting --------------------------------------------------------------------------------

    def start(self, action_or_entry, now: Optional[float] = None) -> bool:
        """Begin taking over a connection: a selection.TakeoverAction or a sync.Entry.

        Sends the first Migrate SYN at once. False (with a failed event) when the entry
        cannot be migrated here, or it is already being taken over (counted, no event)."""
        now = time.monotonic() if now is None else now
        entry = getattr(action_or_entry, "entry", action_or_entry)
        key = entry.key
        fields = {"client": _text(entry.client_ip), "client_port": entry.client_port,
                  "server": _text(entry.server_ip), "server_port": entry.server_port}
        if self._closed:
            return False
        with self._lock:
            if key in self._active:
                self._counters["duplicates"] += 1
                return False
        problem = None
        local_port = entry.server_port if entry.server_port in self.service_ports else self.service_ports[0]
        match = (entry.client_ip, entry.client_port, self.local_packed, local_port)
        if not entry.mp:
            problem = "the client's SYN had no Migrate-Permitted"
        elif len(entry.client_ip) != len(self.local_packed):
            problem = "the client's address family differs from this replica's"
        elif match in self._by_match:
            problem = "another takeover of this client address and port is in progress"
        elif len(self._active) >= self.max_active:
            problem = f"busy: {self.max_active} takeovers in progress"
        if problem:
            self._count("busy" if problem.startswith("busy") else "failed")
            self._emit(None, "failed", reason=problem, **fields)
            return False
        hs = Handshake(entry, self.local_packed, now, local_port, *self.timing)
        t = _Takeover(key, entry, hs, time.monotonic(), fields)
        with self._lock:
            self._active[key] = t
            self._by_match[match] = t
            self._counters["started"] += 1
        self._send_due(t, now)
        self._rearm()
        return True

    def _send_due(self, t: _Takeover, now: float) -> None:
        for packet in t.hs.datagrams(now):
            ok = self.injector.send(packet)
            self._count("migrate_syns")
            if t.hs.attempts > 1:
                self._count("retransmissions")
            if not ok:
                self._count("send_errors")
            self._emit(t, "migrate_syn_sent", attempt=t.hs.attempts, seq=t.hs.seq, reqno=t.hs.reqno,
                       sent=bool(ok))

    # -- the loop's side ---------------------------------------------------------------------------

    def fileno(self) -> int:
        """The raw SYN/ACK socket's descriptor (readable when on_readable() has work)."""
        if self._receiver is None:
            raise ValueError("this engine has no receiver")
        return self._receiver.fileno()

    def on_readable(self, now: Optional[float] = None, limit: int = 256) -> int:
        """Read and handle up to `limit` packets from the raw socket; returns how many."""
        if self._receiver is None:
            return 0
        packets = self._receiver.read(limit)
        for p in packets:
            self.feed(p, time.monotonic() if now is None else now)
        return len(packets)

    def feed(self, packet: bytes, now: Optional[float] = None) -> bool:
        """Handle one received IP packet (a SYN/ACK or RST); True if it was for a takeover."""
        now = time.monotonic() if now is None else now
        self._count("packets")
        v = fp.parse(packet, fp.LINK_RAW)
        if not v.is_tcp:
            self._count("ignored")
            return False
        t = self._by_match.get((v.src, v.sport, v.dst, v.dport))
        if t is None or t.phase != "handshake":
            self._count("ignored")
            return False
        params = t.hs.on_synack(v, now)
        if t.hs.state == RESET:
            self._fail(t, t.hs.reason)
            return True
        if params is None:
            self._count("ignored")
            return False
        s = t.hs.synack
        self._count("synacks")
        self._emit(t, "synack", seq=s.seq, ack=s.ack, window=s.window, tsval=s.tsval, tsecr=s.tsecr,
                   rtt_ms=round(s.rtt * 1000, 3), attempts=s.attempts)
        self._takeover(t, params)
        self._rearm()
        return True

    def poll(self, now: Optional[float] = None) -> None:
        """Retransmit due Migrate SYNs and give up on expired handshakes."""
        now = time.monotonic() if now is None else now
        for t in list(self._active.values()):
            if t.phase != "handshake":
                continue
            if t.hs.expired(now):
                self._fail(t, t.hs.reason)
            else:
                self._send_due(t, now)

    def next_deadline(self) -> Optional[float]:
        """The monotonic time poll() next has work, or None."""
        ds = [d for d in (t.hs.next_deadline() for t in list(self._active.values()) if t.phase == "handshake")
              if d is not None]
        return min(ds) if ds else None

    # -- asyncio adapter ----------------------------------------------------------------------------

    def attach(self, loop) -> None:
        """Run on an asyncio loop: a reader on the raw socket and a timer for retransmissions.
        Call from the loop's thread."""
        self._loop = loop
        self._loop_thread = threading.current_thread()
        if self._receiver is not None:
            loop.add_reader(self._receiver.fileno(), self.on_readable)
        self._rearm()

    def detach(self) -> None:
        if self._loop is None:
            return
        if self._receiver is not None:
            try:
                self._loop.remove_reader(self._receiver.fileno())
            except Exception:  # noqa: BLE001  the loop may be closed already
                pass
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    def _rearm(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        d = self.next_deadline()
        if d is not None:
            self._timer = loop.call_later(max(0.0, d - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.poll()
        self._rearm()

    _loop_thread = None

    # -- the takeover itself ------------------------------------------------------------------------

    def _takeover(self, t: _Takeover, params: RepairParams) -> None:
        t.phase = "repairing"
        t.plan = plan = plan_resume(t.entry, params.snd_nxt)
        t.params = params
        if self.verify_ack and plan.kind in (RESUME, ADOPT):
            try:
                t.watch = _AckWatch(t.entry.client_ip, t.entry.client_port, t.hs.local, t.hs.local_port)
            except OSError:
                t.watch = None  # no raw socket: go without the check
        r0 = time.monotonic()
        try:
            t.sock = self.socket_factory(**params.kwargs())
        except (OSError, ValueError) as exc:
            self._close_watch(t)
            self._fail(t, f"repair: {exc}")
            return
        r1 = t.repaired_at = time.monotonic()
        self._count("repaired")
        self._emit(t, "repaired", ms=round((r1 - t.started) * 1000, 3), repair_ms=round((r1 - r0) * 1000, 3),
                   plan=plan.kind)
        if plan.kind == REFUSE:
            self._close_watch(t)
            self._refuse(t, plan.reason)
            return
        t.stop = threading.Event()
        t.phase = "fetching"
        t.thread = threading.Thread(target=self._serve, args=(t,), name=f"takeover-{t.fields['client_port']}",
                                    daemon=True)
        t.thread.start()

    def _serve(self, t: _Takeover) -> None:
        """One connection's worker: the local response, then the relay."""
        plan, e = t.plan, t.entry
        try:
            try:
                if plan.kind == RESUME:
                    t.local, _ = open_range(self.http_addr, e, plan.offset, self.fetch_timeout, self._host())
                    owned = owned_entry(e, t.hs.local, t.hs.local_port, t.hs.reqno)
                else:
                    t.local = connect_local(self.http_addr, self.fetch_timeout)
                    owned = owned_entry(e, t.hs.local, t.hs.local_port, t.hs.reqno)
                    if plan.kind == WHOLE:
                        t.local.sendall(whole_request(e, self._host()))
                        head = read_head(t.local, time.monotonic() + self.fetch_timeout, consume=False)
                        owned = owned_entry(e, t.hs.local, t.hs.local_port, t.hs.reqno, head)
                if t.watch is not None:
                    self._check_ack(t)
                    plan = t.plan
            except (Refused, OSError) as exc:
                self._refuse(t, str(exc) if isinstance(exc, Refused) else f"local server: {exc}")
                return
            if t.stop.is_set():
                self._refuse(t, t.reason or "stopped")
                return
            mode = {RESUME: "resume", ADOPT: "adopt", WHOLE: "whole"}[plan.kind]
            self._count({RESUME: "resumed", ADOPT: "adopted", WHOLE: "whole"}[plan.kind])
            extra = {"beyond": plan.beyond} if plan.kind == ADOPT else {}
            self._emit(t, "resumed", mode=mode, offset=plan.offset, bytes_left=plan.bytes_left, **extra)
            t.phase = "relaying"
            self._own(t, owned)
            mark = plan.bytes_left if plan.kind == RESUME else None

            def later_request(total: int) -> None:
                if t.owned is not None:  # the advertised response is no longer the current one
                    self._release(t)

            def progress(total: int) -> None:
                nonlocal mark
                t.to_client = total
                if t.first_byte is None:
                    t.first_byte = time.monotonic()
                    self._emit(t, "first_byte", ms=round((t.first_byte - t.started) * 1000, 3))
                if mark is not None and total >= mark:
                    mark = None
                    self._emit(t, "body_sent", bytes=total, seconds=round(time.monotonic() - t.first_byte, 6))

            res = relay(t.sock, t.local, t.stop, self.idle_timeout, self.pipe_size, progress,
                        on_local_bytes=later_request)
            self._release(t)
            t.to_client, t.to_local = res.to_client, res.to_local
            if res.end == "stopped":  # abort() or close(): the client must not take it for a clean end
                self._close_sockets(t, reset=True)
            t.reason = t.reason or res.end
            self._count("bytes_to_client", res.to_client)
            self._count("bytes_from_client", res.to_local)
            self._finish(t, "done")
            self._count("done")
            self._emit(t, "done", bytes=res.to_client, bytes_from_client=res.to_local,
                       seconds=round(time.monotonic() - t.started, 6), end=res.end)
        except Exception as exc:  # noqa: BLE001  a bug here must not kill the engine
            self._close_sockets(t, reset=True)
            self._fail(t, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._close_watch(t)
            self._release(t)
            self._close_sockets(t, reset=False)

    def _close_watch(self, t: _Takeover) -> None:
        w, t.watch = t.watch, None
        if w is not None:
            w.close()

    def _check_ack(self, t: _Takeover) -> None:
        """The client's answer to the window probe against the SYN/ACK: fix a stale ack."""
        rtt = t.hs.synack.rtt if t.hs.synack is not None else 0.0
        wait = min(1.0, max(0.05, 4 * rtt))
        try:
            reply = t.watch.first_ack(max(t.repaired_at + wait, time.monotonic() + 0.001))
        finally:
            self._close_watch(t)
        if reply is None:
            self._emit(t, "ack_unverified", waited_ms=round(wait * 1000, 3))
            return
        gap = fp.seq_diff(reply.ack, t.params.snd_nxt)
        if gap <= 0:  # as the SYN/ACK said (behind it: an older segment; nothing to fix)
            return
        plan = t.plan
        if gap > self.max_resync:
            raise Refused(f"the client is {gap} bytes past its SYN/ACK (more than {self.max_resync})")
        if plan.kind == RESUME and gap <= plan.bytes_left:
            data = _recv_exactly(t.local, gap, time.monotonic() + self.fetch_timeout)
            t.plan = plan._replace(offset=plan.offset + gap, bytes_left=plan.bytes_left - gap)
        elif plan.kind == ADOPT:
            data = bytes(gap)  # bytes the client has and will never ask for again
            t.plan = plan._replace(beyond=plan.beyond + gap)
        else:
            raise Refused(f"the client is {gap} bytes past its SYN/ACK, beyond the advertised response")
        repair.mark_sent(t.sock, data)
        self._emit(t, "resynced", stale_ack=t.params.snd_nxt, ack=reply.ack, gap=gap)

    def _host(self) -> str:
        return self.http_addr[0] if ":" not in self.http_addr[0] else f"[{self.http_addr[0]}]"

    def _close_sockets(self, t: _Takeover, reset: bool) -> None:
        for name in ("sock", "local"):
            s = getattr(t, name)
            if s is not None:
                setattr(t, name, None)
                if reset and name == "sock":
                    _linger_reset(s)
                else:
                    try:
                        s.close()
                    except OSError:
                        pass

    def _refuse(self, t: _Takeover, reason: str) -> None:
        """Reset the client connection on purpose (SO_LINGER 0 on the repaired socket)."""
        self._close_sockets(t, reset=True)
        t.reason = reason
        self._finish(t, "refused")
        self._count("refused")
        self._emit(t, "refused", reason=reason)

    def _fail(self, t: _Takeover, reason: str) -> None:
        t.reason = reason
        self._finish(t, "failed")
        self._count("failed")
        self._emit(t, "failed", reason=reason)

    def _finish(self, t: _Takeover, phase: str) -> None:
        t.phase = phase
        t.ended = time.monotonic()
        with self._lock:
            if self._active.get(t.key) is t:
                del self._active[t.key]
                self._by_match.pop(t.hs.match, None)
                self._finished.append(t)

    def abort(self, key, reason: str = "aborted") -> bool:
        """Stop a takeover: a handshake is abandoned; a relay is stopped and the client reset."""
        t = self._active.get(key)
        if t is None:
            return False
        if t.phase in ("handshake", "repairing"):
            self._close_sockets(t, reset=True)
            self._fail(t, reason)
        elif t.stop is not None:
            t.reason = reason
            t.stop.set()
        return True

    # -- status -------------------------------------------------------------------------------------

    def active(self) -> List[tuple]:
        """Keys (client_ip, client_port, server_ip, server_port) of takeovers in progress."""
        with self._lock:
            return list(self._active)

    def counters(self) -> dict:
        with self._lock:
            c = dict(self._counters)
            c["active"] = len(self._active)
        return c

    def snapshot(self) -> dict:
        """For the status file: counters, takeovers in progress and the latest finished ones."""
        now = time.monotonic()
        with self._lock:
            active = list(self._active.values())
            finished = list(self._finished)
        return {"counters": self.counters(), "local_ip": self.local_ip, "service_ports": self.service_ports,
                "http": f"{self.http_addr[0]}:{self.http_addr[1]}",
                "active": [t.row(now) for t in active], "finished": [t.row(now) for t in finished]}

    def close(self, timeout: float = 2.0) -> None:
        """Stop everything: pending handshakes are abandoned, relays stopped (their
        connections closed), the raw sockets closed."""
        self._closed = True
        self.detach()
        with self._lock:
            active = list(self._active.values())
        threads = []
        for t in active:
            if t.phase == "handshake":
                self._fail(t, "engine closed")
            elif t.stop is not None:
                t.reason = t.reason or "engine closed"
                t.stop.set()
                if t.thread is not None:
                    threads.append(t.thread)
        deadline = time.monotonic() + timeout
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        close = getattr(self.injector, "close", None)
        if close is not None:
            close()
