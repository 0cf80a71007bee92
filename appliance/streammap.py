"""The stream mapper: HTTP-over-TCP connection state inferred from a passive tap (sans-I/O).

The paper's "stream mapping": from the frames a replica's tap captures, keep for each TCP
connection to a service port what a takeover server needs to resume it: both endpoints, the
initial sequence numbers (Ni from the client's SYN, Na from the server's SYN/ACK), each
side's SYN options, and the HTTP exchange (requests in order on keep-alive connections, and
for each response the server sequence number where its body starts plus the validators).

No sockets, no clock: the caller passes frames and `now` (seconds, any epoch; the server
passes capture timestamps), and gets events back.

    m = StreamMapper(service_ports={80}, max_connections=65536, idle_timeout=300.0)
    events = m.handle_frame(frame, now)              # Ethernet frame (link=LINK_RAW: IP packet)
    events = m.handle_frame(frame, now, wire_len=n)  # frame cut by the capture's snaplen
    events = m.handle_view(_fastpath.parse(frame), now)
    events = m.expire(now)                           # idle expiry (handle_frame also calls it)
    m.connections()            # live connections, then recently closed ones (Connection objects)
    m.get(client, cport, server, sport)  # one connection (addresses as text or packed)
    m.counters()               # JSON-able counters: frames, malformed by kind, connections, ...
    conn.to_dict()             # JSON-able (sequence numbers as unsigned ints)

Events (`Event`, with `.kind`, `.conn`, `.request`, `.response`, `.to_dict()`):
  conn_open       the server's SYN/ACK was seen (Ni, Na and both sides' options are known)
  conn_established the client acknowledged the SYN/ACK: the handshake is complete (from
                  here on the connection is advertised; a SYN flood's never are)
  request         a request head was parsed completely (client direction)
  response_start  a response head was matched to its request: the moment the entry is worth
                  advertising to the support group
  conn_close      a connection that had a conn_open is gone: FIN from both sides, a RST,
                  idle expiry, eviction, or a new SYN reusing the 4-tuple

Inputs and what is done with them:
* A connection is keyed by (client address, client port, server address, server port), the
  server port being one of `service_ports`. IPv4 and IPv6. Malformed frames are counted by
  `_fastpath.Err` kind and ignored, never raised; non-TCP frames, IP fragments and other
  ports are counted too.
* Client SYN: Ni, MSS/wscale/SACK-permitted/timestamps (+ TSval), Migrate-Permitted and its
  curve. A retransmitted SYN (same ISN) is ignored; a SYN with another ISN replaces the
  entry (port reuse). SYN/ACK (ack = Ni + 1): Na and the server's options, state
  `established` (the handshake's last ACK is a pure ACK the tap's filter does not admit).
  A SYN/ACK whose SYN was not seen still opens an entry (Ni = ack - 1, client options None).
* Client payload is reassembled in sequence order: duplicates and retransmissions are
  ignored, partial overlaps trimmed, out-of-order segments buffered (at most
  `max_ooo_bytes` per connection) and drained when the hole fills. The in-order bytes go
  to httptools' HttpRequestParser (keep-alive, pipelining, heads split across segments).
  If the stream cannot be followed any more (capture gap proven by the server's ack, buffer
  overflow, a parse error, an Upgrade/CONNECT, a segment cut by the snaplen outside a
  body, a head over `max_head`), the connection's request stream is marked lost with a
  reason and later responses get no request (they are counted as unmatched).
* Server payload: the tap's filter admits only server segments whose payload starts with
  "HTTP", never the body. The next such segment (that is not a retransmission of a head
  already seen and does not lie inside the previous response's body) is the response to
  the oldest request still waiting; its head is parsed with httptools' HttpResponseParser.
  The body starts at seq(head segment) + head length (mod 2**32). Interim 1xx responses
  are skipped (101 marks the connection upgraded). A head that is not complete in that one
  segment is recorded as not resumable, reason "head split" ("head cut by capture" when the
  snaplen cut it).
* `resumable` is False, with `unresumable_reason`, for: head split, HEAD requests, a status
  other than 200/206, chunked (or other) transfer-encoding, no Content-Length, a 206 without
  a single-range Content-Range or with an unknown total length.
* FIN from one side -> `closing` (closed_by that side); FIN from both, or a RST -> `closed`.
  Idle entries (no frame for `idle_timeout`) expire. Closed entries stay visible in
  `connections()` for `closed_linger` seconds. At `max_connections` the least recently
  seen entry is evicted.
* "latest ack/window/TSval" per direction (`last_client`, `last_server`) come from the
  frames the tap admits: SYNs, FINs, RSTs, client data, server heads; not pure ACKs.

Sequence numbers, acks and timestamps are unsigned 32-bit; comparisons use
`_fastpath.seq_*` (modulo 2**32).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional

import httptools

import _fastpath as fp

SYN_SENT, ESTABLISHED, CLOSING, CLOSED = "syn_sent", "established", "closing", "closed"
CLIENT, SERVER = "client", "server"

MAX_AHEAD = 1 << 30  # a client segment further ahead than this is bogus, not out of order
_MASK = fp.MASK32


# --- Header values -----------------------------------------------------------------------


class ByteRange(NamedTuple):
    """One range of a Range header: bytes=first-last, bytes=first- (last None), bytes=-suffix."""

    first: Optional[int]
    last: Optional[int]
    suffix: Optional[int]


class ContentRange(NamedTuple):
    """Content-Range: bytes first-last/total; total None for "*"; first/last None for "*/total"."""

    first: Optional[int]
    last: Optional[int]
    total: Optional[int]


def _digits(s: str) -> Optional[int]:
    s = s.strip()
    return int(s) if s.isdigit() and s.isascii() else None


def parse_range(value: Optional[str]) -> Optional[ByteRange]:
    """A single byte range of a Range header value, or None (absent, multiple, other unit, invalid)."""
    if not value:
        return None
    unit, sep, spec = value.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    if not sep:
        return None
    if not first.strip():
        n = _digits(last)
        return ByteRange(None, None, n) if n is not None else None
    a = _digits(first)
    if a is None:
        return None
    if not last.strip():
        return ByteRange(a, None, None)
    b = _digits(last)
    if b is None or b < a:
        return None
    return ByteRange(a, b, None)


def parse_content_range(value: Optional[str]) -> Optional[ContentRange]:
    """Content-Range of a single-part response, or None when absent or invalid."""
    if not value:
        return None
    unit, _, rest = value.strip().partition(" ")
    if unit.lower() != "bytes":
        return None
    span, sep, total = rest.strip().partition("/")
    if not sep:
        return None
    t = None if total.strip() == "*" else _digits(total)
    if t is None and total.strip() != "*":
        return None
    if span.strip() == "*":
        return ContentRange(None, None, t) if t is not None else None
    first, sep, last = span.partition("-")
    a, b = _digits(first), _digits(last)
    if not sep or a is None or b is None or b < a or (t is not None and b >= t):
        return None
    return ContentRange(a, b, t)


def _text(b: bytes) -> str:
    return b.decode("latin-1")


# --- Per-connection records --------------------------------------------------------------


@dataclass
class TcpOptions:
    """The options one side put on its SYN (or SYN/ACK)."""

    mss: Optional[int] = None
    wscale: Optional[int] = None
    sack_permitted: bool = False
    timestamps: bool = False
    tsval: Optional[int] = None
    tsecr: Optional[int] = None

    @classmethod
    def from_view(cls, v) -> "TcpOptions":
        o = v.opts
        ts = bool(o & fp.HAS_TIMESTAMPS)
        return cls(mss=v.mss if o & fp.HAS_MSS else None,
                   wscale=v.wscale if o & fp.HAS_WSCALE else None,
                   sack_permitted=bool(o & fp.HAS_SACK_PERMITTED), timestamps=ts,
                   tsval=v.tsval if ts else None, tsecr=v.tsecr if ts else None)

    def to_dict(self) -> dict:
        return {"mss": self.mss, "wscale": self.wscale, "sack_permitted": self.sack_permitted,
                "timestamps": self.timestamps, "tsval": self.tsval, "tsecr": self.tsecr}


@dataclass
class LastSeen:
    """The latest captured segment of one direction: its seq, ack, window and TSval, and when."""

    seq: int
    ack: Optional[int]  # None when the ACK flag was off
    window: int  # the raw field (shift by the sender's wscale for bytes)
    tsval: Optional[int]
    tsecr: Optional[int]
    t: float

    def to_dict(self) -> dict:
        return {"seq": self.seq, "ack": self.ack, "window": self.window, "tsval": self.tsval,
                "tsecr": self.tsecr, "t": self.t}


@dataclass
class Response:
    """A response head as the tap saw it (one segment starting with "HTTP/")."""

    status: Optional[int]
    status_text: str = ""
    version: str = ""
    headers: list = field(default_factory=list)  # [(name, value)] as text, in order
    content_length: Optional[int] = None
    content_range_raw: Optional[str] = None
    content_range: Optional[ContentRange] = None
    etag: Optional[str] = None
    last_modified: Optional[str] = None
    transfer_encoding: Optional[str] = None
    content_type: Optional[str] = None
    keep_alive: Optional[bool] = None
    head_seq: int = 0  # server seq of the segment carrying the head
    head_len: Optional[int] = None  # None when the head was not complete in that segment
    body_start: Optional[int] = None  # head_seq + head_len, mod 2**32
    resumable: bool = False
    unresumable_reason: Optional[str] = None
    t: float = 0.0
    digest: Optional[bytes] = None  # sha-256 of the whole object, when known (adopt(), the server appliance)

    @property
    def body_end(self) -> Optional[int]:
        """The server seq just past the body, when its length is known."""
        if self.body_start is None or self.content_length is None:
            return None
        return fp.seq_add(self.body_start, self.content_length & _MASK)

    @property
    def total_length(self) -> Optional[int]:
        """The representation's full length: Content-Length of a 200, the total of a 206."""
        if self.status == 206:
            return self.content_range.total if self.content_range else None
        return self.content_length

    def to_dict(self) -> dict:
        cr = self.content_range
        return {
            "status": self.status, "status_text": self.status_text, "version": self.version,
            "content_length": self.content_length, "content_range": self.content_range_raw,
            "content_range_first": cr.first if cr else None, "content_range_last": cr.last if cr else None,
            "content_range_total": cr.total if cr else None, "total_length": self.total_length,
            "etag": self.etag, "last_modified": self.last_modified,
            "transfer_encoding": self.transfer_encoding, "content_type": self.content_type,
            "keep_alive": self.keep_alive, "head_seq": self.head_seq, "head_len": self.head_len,
            "body_start": self.body_start, "body_end": self.body_end, "resumable": self.resumable,
            "unresumable_reason": self.unresumable_reason, "t": self.t,
        }


@dataclass
class Request:
    """A request head from the reassembled client stream."""

    index: int  # 0, 1, 2 ... on its connection
    method: str
    target: str  # the request target as sent (usually the path)
    version: str
    headers: list  # [(name, value)] as text, in order
    host: Optional[str]
    range_raw: Optional[str]
    range: Optional[ByteRange]
    raw: bytes  # the request head as sent, request line to the empty line
    start_seq: int  # client seq of the head's first byte
    keep_alive: bool
    t: float
    response: Optional[Response] = None

    @property
    def path(self) -> str:
        return self.target

    @property
    def head_len(self) -> int:
        return len(self.raw)

    def to_dict(self, with_response: bool = True) -> dict:
        r = self.range
        d = {
            "index": self.index, "method": self.method, "path": self.target, "version": self.version,
            "host": self.host, "range": self.range_raw,
            "range_first": r.first if r else None, "range_last": r.last if r else None,
            "range_suffix": r.suffix if r else None, "keep_alive": self.keep_alive,
            "start_seq": self.start_seq, "head_len": self.head_len, "raw": _text(self.raw), "t": self.t,
        }
        if with_response:
            d["response"] = self.response.to_dict() if self.response else None
        return d


def _header(headers, name: str) -> Optional[str]:
    """The first value of a header (name in lower case), or None."""
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


# --- Client stream: reassembly and httptools ---------------------------------------------


class _RequestStream:
    """The client->server byte stream of one connection, reassembled and fed to httptools.

    Exact stream positions without parsing by hand: the parser is fed one line at a time
    (pieces ending in LF) while in a head or a chunked body, and exactly the remaining
    Content-Length bytes while in a body, so every head ends, and every message completes,
    at the end of a piece.
    """

    __slots__ = ("next", "offset", "base", "ooo", "ooo_bytes", "max_ooo", "max_head", "parser", "buf",
                 "piece_end", "in_body", "remaining", "chunked", "url", "headers", "lost", "done",
                 "fin_seq", "count", "now", "counters")

    def __init__(self, first_seq: int, max_ooo: int, max_head: int, counters: dict) -> None:
        self.base = first_seq  # client seq of stream offset 0 (Ni + 1)
        self.next = first_seq  # seq of the next in-order byte
        self.offset = 0  # stream offset of `next`
        self.ooo = {}  # seq -> (payload, missing)
        self.ooo_bytes = 0
        self.max_ooo = max_ooo
        self.max_head = max_head
        self.parser = httptools.HttpRequestParser(self)
        self.buf = bytearray()  # bytes since the end of the previous message (a head in progress)
        self.piece_end = 0
        self.in_body = False
        self.remaining: Optional[int] = None
        self.chunked = False
        self.url = bytearray()
        self.headers: list = []
        self.lost: Optional[str] = None
        self.done: list = []  # heads completed during the current call: (start_offset, raw, parser info)
        self.fin_seq: Optional[int] = None
        self.count = 0
        self.now = 0.0
        self.counters = counters

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = bytearray()
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((_text(name), _text(value)))

    def on_headers_complete(self) -> None:
        raw = bytes(self.buf).lstrip(b"\r\n")
        start = self.piece_end - len(raw)
        self.buf.clear()
        te = _header(self.headers, "transfer-encoding")
        self.chunked = te is not None
        self.remaining = None
        if not self.chunked:
            cl = _header(self.headers, "content-length")
            if cl is not None:
                self.remaining = _digits(cl)
                if self.remaining is None:
                    self.lose("bad Content-Length in a request")
        self.in_body = True  # until on_message_complete, which may follow at once
        p = self.parser
        self.done.append((start, raw, _text(p.get_method()), bytes(self.url), p.get_http_version(),
                          self.headers, p.should_keep_alive()))

    def on_body(self, body: bytes) -> None:
        if self.remaining is not None:
            self.remaining -= len(body)

    def on_message_complete(self) -> None:
        self.in_body = False
        self.remaining = None
        self.buf.clear()

    def lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
            self.ooo.clear()
            self.ooo_bytes = 0
            self.counters["streams_lost"] += 1

    # feeding
    def _feed(self, data, missing: int) -> None:
        """Feed in-order bytes (data, then `missing` bytes the capture cut off)."""
        mv = memoryview(data)
        n = len(data)
        pos = 0
        base = self.offset
        while pos < n and self.lost is None:
            if self.in_body and self.remaining:  # exactly the rest of a Content-Length body
                end = pos + min(self.remaining, n - pos)
            else:
                nl = data.find(b"\n", pos)
                end = n if nl < 0 else nl + 1
            piece = mv[pos:end]
            if not self.in_body:
                self.buf += piece
                if len(self.buf) > self.max_head:
                    self.lose("request head too large")
                    break
            self.piece_end = base + end
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self.lose("upgrade")
            except httptools.HttpParserError as exc:
                self.lose(f"request parse error: {exc}")
            pos = end
        self.offset = base + n
        if missing and self.lost is None:
            # Bytes the snaplen cut off can only be skipped inside a body of known length.
            if self.in_body and self.remaining is not None and missing <= self.remaining:
                self.piece_end = self.offset + missing
                try:
                    self.parser.feed_data(bytes(missing))
                except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                    self.lose(f"request parse error: {exc}")
            else:
                self.lose("client segment cut by capture")
        self.offset += missing

    def segment(self, seq: int, payload: bytes, missing: int = 0) -> None:
        """One client segment's payload (seq of its first byte); `missing` bytes were not captured."""
        if self.lost is not None:
            return
        n = len(payload) + missing
        d = fp.seq_diff(seq, self.next)
        if d + n <= 0:
            self.counters["duplicate_segments"] += 1
            return
        if d > MAX_AHEAD:
            self.counters["bogus_segments"] += 1
            return
        if d > 0:
            old = self.ooo.get(seq)
            if old is not None:
                if len(old[0]) + old[1] >= n:
                    self.counters["duplicate_segments"] += 1
                    return
                self.ooo_bytes -= len(old[0])
            if self.ooo_bytes + len(payload) > self.max_ooo:
                self.counters["ooo_overflow"] += 1
                self.lose("out-of-order buffer full")
                return
            self.ooo[seq] = (payload, missing)
            self.ooo_bytes += len(payload)
            self.counters["ooo_segments"] += 1
            return
        if d < 0:
            self.counters["partial_overlaps"] += 1
            cut = -d
            if cut >= len(payload):
                missing -= cut - len(payload)
                payload = b""
            else:
                payload = payload[cut:]
        self._deliver(payload, missing)
        while self.ooo and self.lost is None:
            ready = [s for s in self.ooo if fp.seq_le(s, self.next)]
            if not ready:
                break
            for s in sorted(ready, key=lambda s: fp.seq_diff(s, self.next)):
                p, m = self.ooo.pop(s)
                self.ooo_bytes -= len(p)
                d = fp.seq_diff(s, self.next)
                if d + len(p) + m <= 0:
                    continue
                cut = -d
                if cut >= len(p):
                    m -= cut - len(p)
                    p = b""
                else:
                    p = p[cut:]
                self._deliver(p, m)
                if self.lost is not None:
                    break

    def _deliver(self, payload: bytes, missing: int) -> None:
        self._feed(payload, missing)
        self.next = fp.seq_add(self.next, len(payload) + missing)

    def check_ack(self, ack: int) -> None:
        """The server acknowledged up to `ack`: data beyond what we reassembled was lost to the capture."""
        if self.lost is not None:
            return
        limit = self.next
        if self.fin_seq is not None and self.fin_seq == self.next:
            limit = fp.seq_add(limit, 1)
        if fp.seq_gt(ack, limit) and fp.seq_diff(ack, limit) < MAX_AHEAD:
            self.counters["capture_gaps"] += 1
            self.lose("capture gap")

    def to_dict(self) -> dict:
        return {"next_seq": self.next, "bytes": self.offset, "ooo_bytes": self.ooo_bytes,
                "ooo_segments": len(self.ooo), "lost": self.lost}


# --- Response heads ----------------------------------------------------------------------


class _ResponseHead:
    """Parse one response head out of a segment's payload with httptools' HttpResponseParser."""

    __slots__ = ("status_text", "headers", "complete", "parser")

    def __init__(self) -> None:
        self.status_text = bytearray()
        self.headers: list = []
        self.complete = False
        self.parser = httptools.HttpResponseParser(self)

    def on_status(self, text: bytes) -> None:
        self.status_text += text

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((_text(name), _text(value)))

    def on_headers_complete(self) -> None:
        self.complete = True

    def run(self, data: bytes, start: int):
        """Feed line by line from `start`; (head length or None, error text or None)."""
        mv = memoryview(data)
        pos, n = start, len(data)
        while pos < n:
            nl = data.find(b"\n", pos)
            end = n if nl < 0 else nl + 1
            try:
                self.parser.feed_data(mv[pos:end])
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                if self.complete:  # e.g. an Upgrade response: the head itself is fine
                    return end - start, None
                return None, str(exc) or type(exc).__name__
            if self.complete:
                return end - start, None
            pos = end
        return None, None


# --- Connections -------------------------------------------------------------------------


class Connection:
    """Everything the mapper knows about one TCP connection to a service port."""

    def __init__(self, client: bytes, client_port: int, server: bytes, server_port: int, now: float) -> None:
        self.client = client
        self.client_port = client_port
        self.server = server
        self.server_port = server_port
        self.ip_version = 4 if len(client) == 4 else 6
        self.client_ip = fp.address_text(client)
        self.server_ip = fp.address_text(server)
        self.state = SYN_SENT
        self.ni: Optional[int] = None
        self.na: Optional[int] = None
        self.client_options: Optional[TcpOptions] = None
        self.server_options: Optional[TcpOptions] = None
        self.migrate_permitted = False
        self.mp_curve: Optional[int] = None
        self.syn_seen = False
        self.opened = False  # conn_open emitted
        self.client_acked = False  # the client's ACK of the SYN/ACK seen: the handshake is complete
        self.opened_at: Optional[float] = None
        self.created_at = now
        self.last_seen = now
        self.last_client: Optional[LastSeen] = None
        self.last_server: Optional[LastSeen] = None
        self.client_fin = False
        self.server_fin = False
        self.closed_by: Optional[str] = None
        self.close_reason: Optional[str] = None
        self.closed_at: Optional[float] = None
        self.stream: Optional[_RequestStream] = None
        self.requests: collections.deque = collections.deque()
        self.requests_total = 0
        self.pending: collections.deque = collections.deque()  # requests waiting for a response
        self.responses_total = 0
        self.unmatched_responses = 0
        self.resp_min_seq: Optional[int] = None  # the next head cannot start before this
        self.upgraded = False
        self.reqno = 0  # the ReqNo of the Migrate handshake that brought it here (adopt())
        self.adopted = False
        self.reset_reason: Optional[str] = None  # it cannot be continued byte-exact, whatever comes
        self.rcv_base: Optional[int] = None  # client seq where this host's socket began receiving
        self.snd_base: Optional[int] = None  # server seq where this host's socket began sending

    @property
    def key(self) -> tuple:
        return (self.client, self.client_port, self.server, self.server_port)

    @property
    def id(self) -> str:
        c = self.client_ip if self.ip_version == 4 else f"[{self.client_ip}]"
        s = self.server_ip if self.ip_version == 4 else f"[{self.server_ip}]"
        return f"{c}:{self.client_port}>{s}:{self.server_port}"

    @property
    def current(self) -> Optional[Request]:
        """The request whose response is the latest one seen; before any response, the first request."""
        for req in reversed(self.requests):
            if req.response is not None:
                return req
        return self.requests[0] if self.requests else None

    def identity(self) -> dict:
        return {"conn": self.id, "ip_version": self.ip_version, "client": self.client_ip,
                "client_port": self.client_port, "server": self.server_ip, "server_port": self.server_port}

    def handshake(self) -> dict:
        return {"ni": self.ni, "na": self.na,
                "client_options": self.client_options.to_dict() if self.client_options else None,
                "server_options": self.server_options.to_dict() if self.server_options else None,
                "migrate_permitted": self.migrate_permitted, "mp_curve": self.mp_curve,
                "syn_seen": self.syn_seen}

    def to_dict(self) -> dict:
        cur = self.current
        return {
            **self.identity(), **self.handshake(),
            "state": self.state, "closed_by": self.closed_by, "close_reason": self.close_reason,
            "client_fin": self.client_fin, "server_fin": self.server_fin,
            "created_at": self.created_at, "opened_at": self.opened_at, "last_seen": self.last_seen,
            "closed_at": self.closed_at,
            "last_client": self.last_client.to_dict() if self.last_client else None,
            "last_server": self.last_server.to_dict() if self.last_server else None,
            "request_stream": self.stream.to_dict() if self.stream else None,
            "upgraded": self.upgraded,
            "requests_total": self.requests_total, "responses_total": self.responses_total,
            "unmatched_responses": self.unmatched_responses,
            "current": cur.index if cur else None,
            "requests": [r.to_dict() for r in self.requests],
        }

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.state} requests={self.requests_total}>"


@dataclass
class Event:
    """What the mapper reports; `kind` is conn_open, request, response_start or conn_close."""

    kind: str
    conn: Connection
    request: Optional[Request] = None
    response: Optional[Response] = None
    t: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able fields (no "t" or "event" keys: the status writer adds those; "ts" is `now`)."""
        c = self.conn
        d = {**c.identity(), "ts": self.t}
        if self.kind == "conn_open":
            d.update(c.handshake())
        elif self.kind == "request":
            d["request"] = self.request.to_dict(with_response=False)
        elif self.kind == "response_start":
            d.update(c.handshake())
            d["request"] = self.request.to_dict(with_response=False) if self.request else None
            d["response"] = self.response.to_dict()
        elif self.kind == "conn_close":
            d.update({"state": c.state, "closed_by": c.closed_by, "close_reason": c.close_reason,
                      "requests_total": c.requests_total, "responses_total": c.responses_total})
        return d


# --- The mapper --------------------------------------------------------------------------

_COUNTERS = (
    "frames", "bytes", "non_tcp", "fragments", "other_ports", "untracked", "truncated_frames",
    "opened", "closed", "expired", "evicted", "replaced", "syns_on_established", "syn_retransmits", "synack_retransmits",
    "synack_mismatch", "server_syns", "requests", "responses", "interim_responses",
    "unmatched_responses", "head_retransmits", "body_lookalikes", "server_payload_other",
    "duplicate_segments", "partial_overlaps", "ooo_segments", "ooo_overflow", "bogus_segments",
    "capture_gaps", "streams_lost", "after_close", "adopted", "before_adopt",
)


class StreamMapper:
    """Connection and HTTP state of the connections to `service_ports`, from captured frames."""

    def __init__(self, service_ports=(80,), max_connections: int = 65536, idle_timeout: float = 300.0,
                 closed_linger: float = 10.0, max_closed: int = 1024, max_requests: int = 32,
                 max_ooo_bytes: int = 256 * 1024, max_head: int = 64 * 1024,
                 expire_interval: float = 1.0) -> None:
        self.service_ports = frozenset(int(p) for p in service_ports)
        if not self.service_ports:
            raise ValueError("at least one service port is needed")
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.closed_linger = closed_linger
        self.max_requests = max_requests
        self.max_ooo_bytes = max_ooo_bytes
        self.max_head = max_head
        self.expire_interval = expire_interval
        self._conns: "collections.OrderedDict[tuple, Connection]" = collections.OrderedDict()  # LRU order
        self._closed: collections.deque = collections.deque(maxlen=max_closed)
        self._stats = dict.fromkeys(_COUNTERS, 0)
        self._malformed: collections.Counter = collections.Counter()
        self._next_expire: Optional[float] = None

    # --- input ---------------------------------------------------------------------------

    def handle_frame(self, frame, now: float, link: int = fp.LINK_ETHERNET,
                     wire_len: Optional[int] = None) -> List[Event]:
        """One captured frame; wire_len is its length on the wire when the capture cut it."""
        missing = 0
        if wire_len is not None and wire_len > len(frame):
            self._stats["truncated_frames"] += 1
            v = fp.parse(frame, link)
            if v.error == fp.Err.BAD_IP_LENGTH:
                frame, missing = self._untruncate(frame, v.l3_off, wire_len)
        v = fp.parse(frame, link)
        if missing and not v.ok:
            missing = 0
        return self.handle_view(v, now, missing)

    @staticmethod
    def _untruncate(frame, l3: int, wire_len: int):
        """A copy of a snaplen-cut frame whose IP length field fits what was captured."""
        buf = bytearray(frame)
        n = len(buf)
        if l3 >= n:
            return frame, 0
        version = buf[l3] >> 4
        if version == 4 and n - l3 >= 20:
            buf[l3 + 2:l3 + 4] = (n - l3).to_bytes(2, "big")
        elif version == 6 and n - l3 > 40:
            buf[l3 + 4:l3 + 6] = (n - l3 - 40).to_bytes(2, "big")
        else:
            return frame, 0
        return buf, wire_len - n

    def handle_view(self, v, now: float, missing: int = 0) -> List[Event]:
        """One parsed frame (a `_fastpath.FrameView`); `missing` payload bytes were not captured."""
        st = self._stats
        st["frames"] += 1
        st["bytes"] += len(v.frame) + missing
        events: List[Event] = []
        if self._next_expire is None or now >= self._next_expire:
            events.extend(self.expire(now))
        if not v.ok:
            self._malformed[fp.Err(v.error).name] += 1
            return events
        if not v.is_tcp:
            if v.is_fragment:
                st["fragments"] += 1
            else:
                st["non_tcp"] += 1
            return events
        sport, dport = v.sport, v.dport
        ports = self.service_ports
        if dport in ports:
            key = (v.src, sport, v.dst, dport)
            from_client = True
            if sport in ports and key not in self._conns and (v.dst, dport, v.src, sport) in self._conns:
                key, from_client = (v.dst, dport, v.src, sport), False
        elif sport in ports:
            key = (v.dst, dport, v.src, sport)
            from_client = False
        else:
            st["other_ports"] += 1
            return events
        flags = v.flags
        conn = self._conns.get(key)
        if flags & fp.SYN:
            if from_client and not flags & fp.ACK:
                self._client_syn(key, conn, v, now, missing, events)
            elif not from_client and flags & fp.ACK:
                self._server_synack(key, conn, v, now, events)
            else:
                st["server_syns"] += 1  # a Migrate SYN, or a simultaneous open
            return events
        if conn is None:
            st["untracked"] += 1
            return events
        self._touch(conn, key, now)
        self._segment(conn, v, from_client, now, missing, events)
        return events

    def adopt(self, entry, rcv_nxt: int, snd_nxt: int, now: float) -> Connection:
        """A connection this replica took over, seeded from its advertised entry (whose server
        address and port are now this replica's) and the position where it continues: B's
        rcv_nxt (the client's next byte) and snd_nxt (the next byte B sends). From then on its
        frames are mapped like any other connection's, so every later request and response on
        it is seen (and advertised), and its close is reported. An ACTIVE entry brings the
        response being resumed; a PENDING one, the request about to be answered in full."""
        key = entry.key
        old = self._conns.get(key)
        events: List[Event] = []
        if old is not None:
            self._close(old, None, "reused", now, events)
        self._make_room(now, events)
        conn = Connection(entry.client_ip, entry.client_port, entry.server_ip, entry.server_port, now)
        conn.ni, conn.na = entry.ni, entry.na
        conn.client_options = TcpOptions(entry.c_mss or None, entry.c_wscale if entry.c_wscale >= 0 else None,
                                         entry.c_sack, entry.c_ts)
        conn.server_options = TcpOptions(entry.s_mss or None, entry.s_wscale if entry.s_wscale >= 0 else None,
                                         entry.s_sack, entry.s_ts)
        conn.migrate_permitted = entry.mp
        conn.state = ESTABLISHED
        conn.opened = conn.adopted = conn.client_acked = True
        conn.opened_at = now
        conn.reqno = entry.reqno
        conn.stream = _RequestStream(rcv_nxt & _MASK, self.max_ooo_bytes, self.max_head, self._stats)
        conn.resp_min_seq = snd_nxt & _MASK
        conn.rcv_base, conn.snd_base = rcv_nxt & _MASK, snd_nxt & _MASK
        if entry.state == "RESET":
            conn.reset_reason = entry.reason or "not resumable"
        obj = entry.object
        if entry.state in ("ACTIVE", "PENDING") and obj is not None:
            headers = [("Host", obj.host)] if obj.host else []
            if entry.req_range:
                headers.append(("Range", entry.req_range))
            req = Request(index=0, method="GET", target=obj.path, version="1.1", headers=headers,
                          host=obj.host or None, range_raw=entry.req_range, range=parse_range(entry.req_range),
                          raw=b"", start_seq=rcv_nxt & _MASK, keep_alive=True, t=now)
            conn.requests.append(req)
            conn.requests_total = 1
            if entry.state == "PENDING":
                conn.pending.append(req)
            else:
                cr = None
                if entry.status == 206:
                    cr = ContentRange(entry.body_offset, entry.body_offset + entry.body_length - 1,
                                      obj.total_length)
                req.response = Response(status=entry.status, content_length=entry.body_length,
                                        content_range=cr, etag=obj.etag, last_modified=obj.last_modified,
                                        keep_alive=True, body_start=entry.body_start, resumable=True, t=now,
                                        digest=obj.digest)
                conn.responses_total = 1
                conn.resp_min_seq = req.response.body_end
        self._conns[key] = conn
        self._stats["adopted"] += 1
        return conn

    # --- handshake -----------------------------------------------------------------------

    def _client_syn(self, key, conn, v, now, missing, events) -> None:
        if conn is not None:
            if conn.ni == v.seq:
                self._stats["syn_retransmits"] += 1
                self._touch(conn, key, now)
                conn.last_client = self._last(v, now)
                return
            if conn.state == ESTABLISHED and conn.client_acked:
                # not a new connection: the server's kernel answers it with a challenge ACK
                # (RFC 5961 4.2) and the connection goes on (a SYN flood hits live ports too)
                self._stats["syns_on_established"] += 1
                return
            self._stats["replaced"] += 1
            self._close(conn, None, "reused", now, events)
        self._make_room(now, events)
        conn = Connection(v.src, v.sport, v.dst, v.dport, now)
        conn.syn_seen = True
        conn.ni = v.seq
        conn.client_options = TcpOptions.from_view(v)
        if v.opts & fp.HAS_MIGRATE_PERMITTED:
            conn.migrate_permitted = True
            conn.mp_curve = v.mp_curve
        conn.last_client = self._last(v, now)
        conn.stream = _RequestStream(fp.seq_add(v.seq, 1), self.max_ooo_bytes, self.max_head, self._stats)
        self._conns[key] = conn
        if v.payload_len or missing:  # TCP Fast Open data
            self._client_data(conn, fp.seq_add(v.seq, 1), v.payload, missing, now, events)

    def _server_synack(self, key, conn, v, now, events) -> None:
        if conn is None:
            # The SYN was missed (the tap started late, or capture loss): Ni = ack - 1.
            self._make_room(now, events)
            conn = Connection(v.dst, v.dport, v.src, v.sport, now)
            conn.ni = fp.seq_add(v.ack, -1)
            conn.stream = _RequestStream(v.ack, self.max_ooo_bytes, self.max_head, self._stats)
            self._conns[key] = conn
        else:
            self._touch(conn, key, now)
        if conn.na is not None:
            if conn.na == v.seq:
                self._stats["synack_retransmits"] += 1
            else:
                self._stats["synack_mismatch"] += 1
            conn.last_server = self._last(v, now)
            return
        if conn.ni is not None and v.ack != fp.seq_add(conn.ni, 1):
            self._stats["synack_mismatch"] += 1
            return
        conn.na = v.seq
        conn.rcv_base, conn.snd_base = fp.seq_add(conn.ni, 1), fp.seq_add(v.seq, 1)
        conn.server_options = TcpOptions.from_view(v)
        conn.last_server = self._last(v, now)
        conn.resp_min_seq = fp.seq_add(v.seq, 1)
        if conn.state == SYN_SENT:
            conn.state = ESTABLISHED
        conn.opened = True
        conn.opened_at = now
        self._stats["opened"] += 1
        events.append(Event("conn_open", conn, t=now))

    # --- established -----------------------------------------------------------------------

    def _segment(self, conn: Connection, v, from_client: bool, now: float, missing: int, events) -> None:
        flags = v.flags
        if conn.state == CLOSED:
            self._stats["after_close"] += 1
            return
        if conn.adopted and now < conn.created_at:
            # captured before the takeover made it ours (the capture hands frames over late):
            # e.g. this host's RST to the client appliance's SYN/ACK, sent before the repair
            self._stats["before_adopt"] += 1
            return
        if from_client:
            conn.last_client = self._last(v, now)
            if not conn.client_acked and flags & fp.ACK and not flags & fp.RST and conn.na is not None \
                    and fp.seq_gt(v.ack, conn.na):
                # a SYN flood's half-open connections never get here: they are never advertised
                conn.client_acked = True
                events.append(Event("conn_established", conn, t=now))
            if v.payload_len or missing:
                self._client_data(conn, v.seq, v.payload, missing, now, events)
        else:
            conn.last_server = self._last(v, now)
            if flags & fp.ACK and conn.stream is not None and not flags & fp.RST:
                conn.stream.check_ack(v.ack)
            if v.payload_len:
                self._server_data(conn, v, missing, now, events)
        if flags & fp.RST:
            side = CLIENT if from_client else SERVER
            conn.closed_by = side
            self._close(conn, side, "rst", now, events)
            return
        if flags & fp.FIN:
            side = CLIENT if from_client else SERVER
            if from_client:
                conn.client_fin = True
                if conn.stream is not None:
                    conn.stream.fin_seq = fp.seq_add(v.seq, v.payload_len + missing)
            else:
                conn.server_fin = True
            if conn.closed_by is None:
                conn.closed_by = side
            if conn.client_fin and conn.server_fin:
                self._close(conn, conn.closed_by, "fin", now, events)
            else:
                conn.state = CLOSING

    def _client_data(self, conn: Connection, seq: int, payload: bytes, missing: int, now: float, events) -> None:
        s = conn.stream
        if s is None or s.lost is not None:
            return
        s.segment(seq, payload, missing)
        if s.done:
            done, s.done = s.done, []
            for start, raw, method, url, version, headers, keep_alive in done:
                self._new_request(conn, start, raw, method, url, version, headers, keep_alive, now, events)

    def _new_request(self, conn, start, raw, method, url, version, headers, keep_alive, now, events) -> None:
        range_raw = _header(headers, "range")
        req = Request(index=conn.requests_total, method=method, target=_text(url), version=version,
                      headers=headers, host=_header(headers, "host"), range_raw=range_raw,
                      range=parse_range(range_raw), raw=raw,
                      start_seq=fp.seq_add(conn.stream.base, start & _MASK), keep_alive=keep_alive, t=now)
        conn.requests_total += 1
        conn.requests.append(req)
        while len(conn.requests) > self.max_requests:
            conn.requests.popleft()
        conn.pending.append(req)
        self._stats["requests"] += 1
        events.append(Event("request", conn, request=req, t=now))

    def _server_data(self, conn: Connection, v, missing: int, now: float, events) -> None:
        payload = v.payload
        if not payload.startswith(b"HTTP/"):
            self._stats["server_payload_other"] += 1
            return
        seq = v.seq
        for req in conn.requests:
            if req.response is not None and req.response.head_seq == seq:
                self._stats["head_retransmits"] += 1
                return
        if conn.resp_min_seq is not None and fp.seq_lt(seq, conn.resp_min_seq):
            self._stats["body_lookalikes"] += 1
            return
        if conn.upgraded:
            self._stats["server_payload_other"] += 1
            return
        pos = 0
        while True:
            resp = self._parse_response(payload, pos, seq, missing, now)
            if resp.status is not None and 100 <= resp.status < 200 and resp.status != 101 \
                    and resp.head_len is not None:
                # An interim response (100 Continue, 103 Early Hints): the final one follows.
                self._stats["interim_responses"] += 1
                pos += resp.head_len
                conn.resp_min_seq = fp.seq_add(seq, pos)
                if payload.startswith(b"HTTP/", pos):
                    continue
                return
            break
        if not conn.pending:
            conn.unmatched_responses += 1
            self._stats["unmatched_responses"] += 1
            return
        req = conn.pending.popleft()
        self._judge(req, resp)
        req.response = resp
        conn.responses_total += 1
        self._stats["responses"] += 1
        if resp.status == 101:
            conn.upgraded = True
        if resp.body_start is not None:
            if resp.content_length is not None and req.method != "HEAD" \
                    and resp.status not in (204, 304) and not resp.transfer_encoding:
                conn.resp_min_seq = resp.body_end
            else:
                conn.resp_min_seq = resp.body_start
        else:
            conn.resp_min_seq = fp.seq_add(seq, 1)
        events.append(Event("response_start", conn, request=req, response=resp, t=now))

    @staticmethod
    def _parse_response(payload: bytes, pos: int, seq: int, missing: int, now: float) -> Response:
        h = _ResponseHead()
        head_len, error = h.run(payload, pos)
        p = h.parser
        status = p.get_status_code() or None
        hdrs = h.headers
        resp = Response(status=status, status_text=_text(bytes(h.status_text)),
                        version=p.get_http_version() if status else "", headers=hdrs,
                        head_seq=fp.seq_add(seq, pos), t=now)
        cl = _header(hdrs, "content-length")
        resp.content_length = _digits(cl) if cl is not None else None
        resp.content_range_raw = _header(hdrs, "content-range")
        resp.content_range = parse_content_range(resp.content_range_raw)
        resp.etag = _header(hdrs, "etag")
        resp.last_modified = _header(hdrs, "last-modified")
        resp.transfer_encoding = _header(hdrs, "transfer-encoding")
        resp.content_type = _header(hdrs, "content-type")
        if head_len is not None:
            resp.head_len = head_len
            resp.body_start = fp.seq_add(resp.head_seq, head_len)
            resp.keep_alive = p.should_keep_alive()
        elif error is not None:
            resp.unresumable_reason = f"response parse error: {error}"
        elif missing:
            resp.unresumable_reason = "head cut by capture"
        else:
            resp.unresumable_reason = "head split"
        return resp

    @staticmethod
    def _judge(req: Request, resp: Response) -> None:
        """Set resp.resumable and the reason when it is not."""
        reason = resp.unresumable_reason
        if reason is None:
            te = (resp.transfer_encoding or "").lower()
            cr = resp.content_range
            if req.method == "HEAD":
                reason = "HEAD request"
            elif resp.status not in (200, 206):
                reason = f"status {resp.status}"
            elif "chunked" in te:
                reason = "chunked transfer-encoding"
            elif te:
                reason = f"transfer-encoding {resp.transfer_encoding}"
            elif resp.content_length is None:
                reason = "no Content-Length"
            elif resp.status == 206 and cr is None:
                reason = "206 without a single Content-Range"
            elif resp.status == 206 and cr.total is None:
                reason = "206 with unknown total length"
            elif resp.status == 206 and cr.last - cr.first + 1 != resp.content_length:
                reason = "Content-Range disagrees with Content-Length"
        resp.unresumable_reason = reason
        resp.resumable = reason is None

    # --- bookkeeping -----------------------------------------------------------------------

    @staticmethod
    def _last(v, now: float) -> LastSeen:
        ts = v.opts & fp.HAS_TIMESTAMPS
        return LastSeen(seq=v.seq, ack=v.ack if v.flags & fp.ACK else None, window=v.window,
                        tsval=v.tsval if ts else None, tsecr=v.tsecr if ts else None, t=now)

    def _touch(self, conn: Connection, key, now: float) -> None:
        conn.last_seen = now
        self._conns.move_to_end(key)

    def _make_room(self, now: float, events) -> None:
        while len(self._conns) >= self.max_connections:
            _, old = next(iter(self._conns.items()))
            self._stats["evicted"] += 1
            self._close(old, None, "evicted", now, events)

    def _close(self, conn: Connection, side: Optional[str], reason: str, now: float, events) -> None:
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        if conn.closed_by is None:
            conn.closed_by = side
        conn.close_reason = reason
        conn.closed_at = now
        if conn.stream is not None:  # free the parser and buffers; keep the summary
            conn.stream.ooo.clear()
            conn.stream.buf.clear()
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        self._closed.append(conn)
        self._stats["closed"] += 1
        if conn.opened:
            events.append(Event("conn_close", conn, t=now))

    def expire(self, now: float) -> List[Event]:
        """Close connections idle for idle_timeout and forget closed ones older than closed_linger."""
        self._next_expire = now + self.expire_interval
        events: List[Event] = []
        limit = now - self.idle_timeout
        while self._conns:
            conn = next(iter(self._conns.values()))
            if conn.last_seen > limit:
                break
            self._stats["expired"] += 1
            self._close(conn, None, "idle", now, events)
        gone = now - self.closed_linger
        while self._closed and self._closed[0].closed_at <= gone:
            self._closed.popleft()
        return events

    # --- output --------------------------------------------------------------------------

    def connections(self) -> List[Connection]:
        """Live connections (least recently seen first), then the recently closed ones."""
        return list(self._conns.values()) + list(self._closed)

    def open_connections(self) -> List[Connection]:
        """Live connections only, least recently seen first."""
        return list(self._conns.values())

    def get(self, client, client_port: int, server, server_port: int) -> Optional[Connection]:
        """A live connection, or else the most recent closed one with that 4-tuple."""
        key = (fp.pack_address(client), client_port, fp.pack_address(server), server_port)
        conn = self._conns.get(key)
        if conn is None:
            for c in reversed(self._closed):
                if c.key == key:
                    return c
        return conn

    def __len__(self) -> int:
        return len(self._conns)

    def counters(self) -> dict:
        d = dict(self._stats)
        d["malformed"] = dict(self._malformed)
        d["malformed_total"] = sum(self._malformed.values())
        d["connections"] = len(self._conns)
        d["recently_closed"] = len(self._closed)
        return d
