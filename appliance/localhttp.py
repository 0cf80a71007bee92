"""Talking to this replica's own HTTP server from an asyncio loop: no thread, no select().

A takeover needs the local server twice: before it, a cheap check that the server has the
object with A's validators (a 1-byte Range request); during it, a keep-alive connection
whose next bytes are the rest of the body, the response head consumed and the body left in
the kernel for splice(2) (appliance.relay). This module gives both, as coroutines on the
loop (readiness through loop.add_reader/add_writer, i.e. epoll), for thousands at once:

* `connect`, `read_head`, `read_exactly`, `send_all`: one connection's steps. Each bounds
  its wait by `timeout`, leaves the socket non-blocking and raises `LocalError` (str: the
  reason, "local server: ...") for every failure, OSErrors included. read_head peeks
  (MSG_PEEK) and raises SO_RCVLOWAT to be woken only when more bytes came, never
  spinning, and consumes exactly the head: not one body byte. While one of them runs it
  owns the socket's registrations with the loop.
* `ProbePool`: small whole responses (Content-Length bodies) for many callers, pipelined
  over a few keep-alive connections, so a thousand checks at once cost a few connections,
  not a thousand. Responses are matched to requests in order; a connection the server
  closes is replaced and its unanswered requests are tried once more, first in line on a
  connection; a request fails (LocalError) after its second failure or its timeout.

Hosts are best given as IP addresses: a name is resolved by the loop's resolver, which
runs getaddrinfo in the default executor (a thread). Everything runs in the loop's thread.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import deque
from typing import Dict, List, NamedTuple, Optional, Tuple

import httptools

__all__ = ["LocalError", "ResponseHead", "parse_head", "connect", "read_head", "read_exactly", "send_all",
           "ProbePool", "MAX_HEAD"]

MAX_HEAD = 65536
MAX_EMPTY_WAKEUPS = 1000  # readiness that brings nothing, in a row, before giving up

_TCP_OPEN = (1, 4, 5)  # ESTABLISHED, FIN_WAIT1, FIN_WAIT2: no FIN from the peer yet


class LocalError(Exception):
    """The local server did not give what was needed; str() is the reason ("local server: ...")."""


class ResponseHead(NamedTuple):
    status: int
    headers: Dict[str, str]  # names lower-cased
    length: int  # bytes of the head, blank line included


class _Head:
    __slots__ = ("headers", "complete")

    def __init__(self) -> None:
        self.headers: Dict[str, str] = {}
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        self.complete = True


def parse_head(data: bytes) -> ResponseHead:
    """Parse a complete response head (up to and including the blank line) with httptools."""
    h = _Head()
    parser = httptools.HttpResponseParser(h)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
        if not h.complete:
            raise LocalError(f"local server: unparsable response head ({exc or type(exc).__name__})") from None
    if not h.complete:
        raise LocalError("local server: incomplete response head")
    return ResponseHead(parser.get_status_code(), h.headers, len(data))


# --- One connection's steps ----------------------------------------------------------------------


def _where(addr) -> str:
    host = addr[0]
    return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"


def _nonblocking(sock: socket.socket) -> None:
    if sock.gettimeout() != 0.0:
        sock.setblocking(False)


def _wake(fut: asyncio.Future, value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


async def _ready(loop, fd: int, deadline: float, write: bool = False) -> bool:
    """Wait until fd is readable (writable) or the deadline passed; False on the deadline."""
    left = deadline - loop.time()
    if left <= 0:
        return False
    fut = loop.create_future()
    if write:
        loop.add_writer(fd, _wake, fut, True)
    else:
        loop.add_reader(fd, _wake, fut, True)
    timer = loop.call_later(left, _wake, fut, False)
    try:
        return await fut
    finally:
        timer.cancel()
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the peer's FIN (or a reset) came: the TCP state says so (tcpi_state, byte 0)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] not in _TCP_OPEN
    except OSError:  # not TCP: a short read after waiting means the end
        return True


async def connect(loop, addr: Tuple[str, int], timeout: float) -> socket.socket:
    """A non-blocking TCP_NODELAY connection to the local server at addr (host, port)."""
    host = addr[0]
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, tuple(addr))
        except TimeoutError:
            raise LocalError(f"local server: cannot connect to {_where(addr)}: no answer within {timeout:g} s") \
                from None
        except OSError as exc:  # asyncio's strerror is "Connect call failed (...)": the errno's own text
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise LocalError(f"local server: cannot connect to {_where(addr)}: {why}") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def read_head(loop, sock: socket.socket, timeout: float, limit: int = MAX_HEAD,
                    consume: bool = True) -> ResponseHead:
    """The response head, consumed without taking one byte of the body (with consume=False
    nothing is taken: the head stays queued too).

    Peeks until the blank line is there; between peeks SO_RCVLOWAT is raised to one byte
    more than what is queued, so the loop is woken by more bytes or the peer's FIN, not by
    what it has already seen. SO_RCVLOWAT is back to 1 on return, whatever happened."""
    _nonblocking(sock)
    deadline = loop.time() + timeout
    fd = sock.fileno()
    want = 1
    backoff = 0.001
    try:
        for _ in range(limit + MAX_EMPTY_WAKEUPS):  # each round brings a byte more, or ends
            try:
                data = sock.recv(limit, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            except OSError as exc:
                raise LocalError(f"local server: {exc.strerror or exc} (reading the response head)") from None
            if data is not None:
                if not data:
                    raise LocalError("local server: closed the connection before a response head")
                end = data.find(b"\r\n\r\n")
                if end >= 0:
                    head = parse_head(data[:end + 4])
                    break
                if len(data) >= limit:
                    raise LocalError(f"local server: response head longer than {limit} bytes")
                if len(data) < want:  # woken below SO_RCVLOWAT: the FIN, or the kernel capped it
                    if _peer_closed(sock):
                        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise LocalError(f"local server: {os.strerror(err)} (reading the response head)")
                        raise LocalError("local server: closed the connection before a response head")
                    # rcvlowat is capped at half the receive buffer (and ignored under memory
                    # pressure): wait by time instead, still bounded by the deadline
                    left = deadline - loop.time()
                    if left <= 0:
                        raise LocalError("local server: no complete response head in time")
                    await asyncio.sleep(min(backoff, left))
                    backoff = min(backoff * 2, 0.05)
                    continue
                want = len(data) + 1
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            if not await _ready(loop, fd, deadline):
                raise LocalError("local server: no complete response head in time")
        else:
            raise LocalError("local server: the response head did not come (stalled)")
    finally:
        if want > 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass
    if not consume:
        return head
    try:
        got = sock.recv(head.length)
    except OSError as exc:
        raise LocalError(f"local server: {exc.strerror or exc} (reading the response head)") from None
    if len(got) != head.length:
        raise LocalError("local server: the response head vanished while being read")
    return head


async def read_exactly(loop, sock: socket.socket, n: int, timeout: float) -> bytes:
    """Exactly n bytes (body bytes the client turned out to have already, say)."""
    _nonblocking(sock)
    deadline = loop.time() + timeout
    fd = sock.fileno()
    buf = bytearray(n)
    view = memoryview(buf)
    got = empty = 0
    while got < n:
        try:
            k = sock.recv_into(view[got:], n - got)
        except BlockingIOError:
            empty += 1
            if empty > MAX_EMPTY_WAKEUPS:
                raise LocalError("local server: the body stalled") from None
            if not await _ready(loop, fd, deadline):
                raise LocalError(f"local server: the body did not come in time ({got} of {n} bytes)") from None
            continue
        except OSError as exc:
            raise LocalError(f"local server: {exc.strerror or exc} (reading the body)") from None
        if k == 0:
            raise LocalError(f"local server: the body ended early ({got} of {n} bytes)")
        got += k
        empty = 0
    return bytes(buf)


async def send_all(loop, sock: socket.socket, data: bytes, timeout: float) -> None:
    """All of data, or LocalError (a request the server does not take in time is lost)."""
    _nonblocking(sock)
    deadline = loop.time() + timeout
    fd = sock.fileno()
    view = memoryview(data)
    sent = empty = 0
    while sent < len(view):
        try:
            k = sock.send(view[sent:])
        except BlockingIOError:
            empty += 1
            if empty > MAX_EMPTY_WAKEUPS:
                raise LocalError("local server: sending stalled") from None
            if not await _ready(loop, fd, deadline, write=True):
                raise LocalError(f"local server: did not take the request in time ({sent} of {len(view)} bytes)") \
                    from None
            continue
        except OSError as exc:
            raise LocalError(f"local server: {exc.strerror or exc} (sending)") from None
        sent += k
        empty = 0


# --- Many small requests over a few connections --------------------------------------------------


class _Req:
    __slots__ = ("data", "head_only", "max_body", "future", "tries", "conn", "window")

    def __init__(self, data: bytes, max_body: int, future: asyncio.Future) -> None:
        self.data = data
        self.head_only = data[:5].upper() == b"HEAD "
        self.max_body = max_body
        self.future = future
        self.tries = 0  # failures so far (a connection lost with it unanswered)
        self.conn: Optional[_Conn] = None
        self.window = 0  # a retry: how far down a connection's requests it may go


class _Conn(asyncio.Protocol):
    """One keep-alive connection of a ProbePool: its requests in flight, in order."""

    def __init__(self, pool: "ProbePool") -> None:
        self.pool = pool
        self.transport = None  # None while connecting
        self.task: Optional[asyncio.Task] = None
        self.inflight: deque = deque()
        self.buf = bytearray()
        self.sent = self.answered = 0
        self.head: Optional[ResponseHead] = None  # the head whose body is being waited for
        self.need = 0  # its body length
        self.skip = 0  # body bytes to drop (a response longer than its max_body)
        self.close_after = False  # the current response is the server's last on this connection
        self.dead = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.pool._on_data(self, data)

    def eof_received(self) -> bool:
        self.pool._on_lost(self, "local server: closed the connection")
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        why = f"local server: connection lost: {getattr(exc, 'strerror', None) or exc}" if exc else \
            "local server: closed the connection"
        self.pool._on_lost(self, why)


class ProbePool:
    """Whole small responses from the local server, pipelined over a few keep-alive connections.

    Connections are opened as the load asks for them (a request waiting, fewer than
    `connections` open), at most `depth` requests in flight on each, new requests going to
    the least loaded. A connection the server ends (FIN, reset, `Connection: close`, a
    protocol error, a response overdue) is dropped; its unanswered requests are retried once,
    before any new request, and no further down a connection's requests than the dropped
    connection got answers: a server that ends connections after N requests answers every
    retry (for them the pool may open one connection over `connections`). A `Connection:
    close` with requests still unanswered teaches the pool the server's keep-alive limit
    (nginx's keepalive_requests): no connection is given more requests than that afterwards,
    so the next ones are not wasted. A 1xx other than 101 is an interim response, skipped.
    `timeout` bounds each fetch from its call (connecting and waiting included) and each
    connect; after a failed connect no new connection is tried for a short backoff while
    others are open. Use in the loop's thread only.
    """

    def __init__(self, loop, addr: Tuple[str, int], *, connections: int = 4, depth: int = 64,
                 timeout: float = 2.0, host: Optional[str] = None) -> None:
        if connections < 1 or depth < 1 or not timeout > 0:
            raise ValueError("connections and depth must be at least 1, timeout positive")
        self.loop = loop
        self.addr = (addr[0], int(addr[1]))
        self.connections, self.depth, self.timeout = connections, depth, float(timeout)
        self.host = host or (f"[{addr[0]}]" if ":" in addr[0] else addr[0])
        self._conns: List[_Conn] = []  # connecting or open
        self._backlog: deque = deque()  # new requests not yet sent
        self._retry: deque = deque()  # requests to send again
        self._limit: Optional[int] = None  # the server's requests per connection, once learnt
        self._hold_until = 0.0  # after a failed connect: no new connection before this
        self._backoff = 0.0
        self._closed = False
        self._counters = {"requests": 0, "responses": 0, "retries": 0, "connections_opened": 0, "errors": 0,
                          "failed": 0}

    # -- the API -------------------------------------------------------------------------------

    def request(self, path: str, *, method: str = "GET", byte_range: Optional[Tuple[int, Optional[int]]] = None,
                headers=()) -> bytes:
        """A keep-alive request for path with the pool's Host (and `Range: bytes=a-b`)."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}"]
        if byte_range is not None:
            first, last = byte_range
            lines.append(f"Range: bytes={first}-{'' if last is None else last}")
        lines += [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def probe(self, path: str, offset: int) -> Tuple[ResponseHead, bytes]:
        """The local server's answer to a 1-byte Range request at offset (before a takeover:
        compare its Content-Range, ETag and Last-Modified with A's)."""
        return await self.fetch(self.request(path, byte_range=(offset, offset)), max_body=1)

    async def fetch(self, request: bytes, max_body: int = 65536) -> Tuple[ResponseHead, bytes]:
        """(head, body) of the response to one complete request; LocalError otherwise (a body
        over max_body, chunked or without Content-Length; failed twice; timeout; closed)."""
        if self._closed:
            raise LocalError("local server: probe pool closed")
        req = _Req(bytes(request), max_body, self.loop.create_future())
        self._counters["requests"] += 1
        self._backlog.append(req)
        timer = self.loop.call_later(self.timeout, self._expire, req)
        try:
            self._dispatch()
            return await req.future
        finally:
            timer.cancel()

    def close(self) -> None:
        """Close every connection; fetches still pending fail with LocalError ("... closed")."""
        if self._closed:
            return
        self._closed = True
        err = "local server: probe pool closed"
        conns, self._conns = self._conns, []
        waiting = [r for c in conns for r in c.inflight] + list(self._retry) + list(self._backlog)
        self._retry.clear()
        self._backlog.clear()
        for c in conns:
            c.dead = True
            c.inflight.clear()
            try:
                if c.task is not None:
                    c.task.cancel()
                if c.transport is not None:
                    c.transport.abort()
            except RuntimeError:  # the loop is closed already (a shutdown): nothing runs any more
                pass
        for r in waiting:
            try:
                self._fail(r, err)
            except RuntimeError:
                pass

    async def __aenter__(self) -> "ProbePool":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def counters(self) -> dict:
        c = dict(self._counters)
        c["connections"] = len(self._conns)
        c["waiting"] = len(self._backlog) + len(self._retry)
        c["in_flight"] = sum(len(x.inflight) for x in self._conns)
        c["keepalive_limit"] = self._limit
        return c

    # -- placing requests ----------------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._closed:
            return
        out: Dict[_Conn, list] = {}
        self._place(self._retry, out)
        self._place(self._backlog, out)
        for c, parts in out.items():
            c.transport.write(b"".join(parts))
        if not (self._retry or self._backlog):
            return
        live = len(self._conns)
        if live and self.loop.time() < self._hold_until:
            return
        if live < self.connections:
            self._open()
        elif self._retry and not any(c.transport is None or self._takes(c, self._retry[0]) for c in self._conns):
            self._open()  # retries want a connection's first places: one over the limit for them

    def _takes(self, c: _Conn, req: _Req) -> bool:
        if c.transport is None or c.dead or len(c.inflight) >= self.depth:
            return False
        if self._limit is not None and c.sent >= self._limit:
            return False
        return not req.tries or c.sent < req.window

    def _place(self, queue: deque, out: dict) -> None:
        for _ in range(len(queue)):
            req = queue[0]
            if req.future.done():  # timed out or cancelled while waiting
                queue.popleft()
                continue
            best = None
            for c in self._conns:
                if self._takes(c, req) and (best is None or len(c.inflight) < len(best.inflight)):
                    best = c
            if best is None:
                return
            queue.popleft()
            req.conn = best
            best.inflight.append(req)
            best.sent += 1
            out.setdefault(best, []).append(req.data)

    def _open(self) -> None:
        c = _Conn(self)
        self._conns.append(c)
        c.task = self.loop.create_task(self._connect(c))

    async def _connect(self, c: _Conn) -> None:
        try:
            sock = await connect(self.loop, self.addr, self.timeout)
            await self.loop.create_connection(lambda: c, sock=sock)
        except (LocalError, OSError) as exc:
            self._connect_failed(c, str(exc) if isinstance(exc, LocalError) else
                                 f"local server: cannot connect to {_where(self.addr)}: {exc.strerror or exc}")
            return
        c.task = None
        if c.dead:  # closed meanwhile
            c.transport.abort()
            return
        self._counters["connections_opened"] += 1
        self._backoff = 0.0
        self._dispatch()

    def _connect_failed(self, c: _Conn, why: str) -> None:
        if c.dead:
            return
        c.dead = True
        self._conns.remove(c)
        self._counters["errors"] += 1
        self._backoff = min(1.0, max(0.05, self._backoff * 2))
        self._hold_until = self.loop.time() + self._backoff
        # Retries were waiting for a new connection: that was their second chance. New
        # requests take the blow too when no connection is left to serve them.
        struck = list(self._retry)
        self._retry.clear()
        if not self._conns:
            struck += self._backlog
            self._backlog.clear()
        self._strike(struck, why)
        self._dispatch()

    # -- responses -----------------------------------------------------------------------------

    def _on_data(self, c: _Conn, data: bytes) -> None:
        if c.dead:
            return
        buf = c.buf
        buf += data
        pos = 0
        for _ in range(len(buf) + 1):  # every round consumes bytes or returns
            if c.skip:
                take = min(c.skip, len(buf) - pos)
                pos += take
                c.skip -= take
                if c.skip:
                    break
            if c.head is None:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    if len(buf) - pos > MAX_HEAD:
                        self._broken(c, f"local server: response head longer than {MAX_HEAD} bytes")
                        return
                    break
                if not c.inflight:
                    self._drop(c, "local server: bytes with no request in flight", error=True)
                    self._dispatch()
                    return
                raw = bytes(buf[pos:end + 4])
                try:
                    head = parse_head(raw)
                except LocalError as exc:
                    self._broken(c, str(exc))
                    return
                pos = end + 4
                if 100 <= head.status < 200 and head.status != 101:
                    continue  # interim (100 Continue, 103 Early Hints): the response follows
                req = c.inflight[0]
                h = head.headers
                if req.head_only or head.status in (204, 304) or 100 <= head.status < 200:
                    n = 0
                elif head.status == 101:
                    self._broken(c, "local server: switched protocols (101)")
                    return
                elif "transfer-encoding" in h:
                    self._broken(c, f"local server: transfer-encoding {h['transfer-encoding']} "
                                    "(a probe needs a Content-Length)")
                    return
                elif h.get("content-length", "").isdigit():
                    n = int(h["content-length"])
                else:
                    self._broken(c, "local server: response without a Content-Length")
                    return
                c.head, c.need = head, n
                c.close_after = "close" in h.get("connection", "").lower() or (
                    raw.startswith(b"HTTP/1.0") and "keep-alive" not in h.get("connection", "").lower())
                if n > req.max_body:  # framing is intact: drop the body, keep the connection
                    self._answered(c)
                    self._fail(req, f"local server: {head.status} response body of {n} bytes, "
                                    f"more than {req.max_body}")
                    c.skip, c.head = n, None
                    if c.close_after:
                        self._closing(c)
                        return
                    continue
            if len(buf) - pos < c.need:
                break
            body = bytes(buf[pos:pos + c.need])
            pos += c.need
            head, c.head = c.head, None
            req = self._answered(c)
            if not req.future.done():
                req.future.set_result((head, body))
            if c.close_after:
                self._closing(c)
                return
        del buf[:pos]
        if self._limit is not None and c.sent >= self._limit and not c.inflight and not c.skip:
            self._drop(c, "", error=False)  # its share is used up: a new connection takes over
        self._dispatch()

    def _answered(self, c: _Conn) -> _Req:
        req = c.inflight.popleft()
        c.answered += 1
        self._counters["responses"] += 1
        return req

    def _closing(self, c: _Conn) -> None:
        """The server said it closes after this response: learn its limit, move on."""
        if c.inflight:
            self._limit = max(1, c.answered if self._limit is None else min(self._limit, c.answered))
        self._drop(c, f"local server: closed the connection after {c.answered} requests (Connection: close)",
                   error=False)
        self._dispatch()

    def _broken(self, c: _Conn, why: str) -> None:
        """A response that cannot be framed: it fails its request; the connection is done."""
        if c.inflight:
            self._fail(self._answered(c), why)
        self._drop(c, why, error=True)
        self._dispatch()

    def _on_lost(self, c: _Conn, why: str) -> None:
        if self._closed or c.dead:
            return
        self._drop(c, why, error=bool(c.inflight) or c.skip > 0 or c.head is not None)
        self._dispatch()

    def _drop(self, c: _Conn, why: str, error: bool) -> None:
        if c.dead:
            return
        c.dead = True
        if c in self._conns:
            self._conns.remove(c)
        if error:
            self._counters["errors"] += 1
        if c.task is not None:
            c.task.cancel()
        if c.transport is not None:
            c.transport.abort()
        waiting = list(c.inflight)
        c.inflight.clear()
        self._strike(waiting, why, c.answered)

    def _strike(self, reqs, why: str, answered: int = 0) -> None:
        """One more failure for each: a first one sends it again, a second one is final.

        A retry goes no further down a connection's requests than the failed connection got
        answers (all of depth if it got none): a server that ends connections after N
        requests without saying so then answers every retry."""
        window = min(self.depth, answered) if answered else self.depth
        for r in reqs:
            if r.future.done():
                continue
            r.tries += 1
            r.conn = None
            if r.tries >= 2:
                self._fail(r, f"{why} (failed twice)")
            else:
                r.window = window
                self._retry.append(r)
                self._counters["retries"] += 1

    def _expire(self, req: _Req) -> None:
        if req.future.done():
            return
        c = req.conn
        self._fail(req, f"local server: no response within {self.timeout:g} s")
        if c is not None and not c.dead and req in c.inflight:  # it holds up all behind it
            self._drop(c, "local server: a response is overdue on the connection", error=True)
            self._dispatch()

    def _fail(self, req: _Req, why: str) -> None:
        if not req.future.done():
            self._counters["failed"] += 1
            req.future.set_exception(LocalError(why))
