"""appliance.localhttp: one connection's steps and the ProbePool, on an asyncio loop, on loopback.

The real local server is appliance.httpserver over the shared test docroot; the failure
cases use a tiny asyncio server (TinyServer) or a bare connected pair whose far end the
test writes by hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import threading
import time

import pytest

from appliance import docroot, httpserver
from appliance.localhttp import (LocalError, ProbePool, ResponseHead, connect, parse_head, read_exactly,
                                 read_head, send_all)

HEAD = (b"HTTP/1.1 206 Partial Content\r\nContent-Length: 4\r\nContent-Range: bytes 0-3/10\r\n"
        b"ETag: \"e1\"\r\n\r\n")


@pytest.fixture(scope="module")
def served():
    objs = docroot.ensure(["1k", "1m"])
    root = os.path.dirname(docroot.object_path("1k"))
    srv = httpserver.make_server(root, "127.0.0.1", 0)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    data = {name: docroot.object_path(name).read_bytes() for name in ("1k", "1m")}
    assert hashlib.sha256(data["1m"]).hexdigest() == objs["/obj-1m"][1]
    st = os.stat(docroot.object_path("1m"))
    yield {"addr": ("127.0.0.1", srv.server_port), "data": data, "etag": httpserver.etag_for(st),
           "last_modified": httpserver.http_date(st.st_mtime)}
    srv.shutdown()
    srv.server_close()


def pair():
    """(our end, the far end), both non-blocking."""
    lsock = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(lsock.getsockname())
    far, _ = lsock.accept()
    lsock.close()
    for s in (ours, far):
        s.setblocking(False)
    return ours, far


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rcvlowat(sock) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


def run(coro_fn, *args):
    async def main():
        loop = asyncio.get_running_loop()
        base = len(loop._selector.get_map())
        out = await coro_fn(loop, *args)
        assert len(loop._selector.get_map()) == base, "a descriptor is still registered with the loop"
        return out
    return asyncio.run(main())


async def write_later(loop, sock, *chunks, pause=0.05, close=False):
    for c in chunks:
        await asyncio.sleep(pause)
        await loop.sock_sendall(sock, c)
    if close:
        sock.close()


# --- parse_head ------------------------------------------------------------------------------------


def test_parse_head():
    h = parse_head(HEAD)
    assert h == ResponseHead(206, {"content-length": "4", "content-range": "bytes 0-3/10", "etag": '"e1"'}, len(HEAD))
    for bad, why in ((b"garbage\r\n\r\n", "unparsable"), (b"HTTP/1.1 200 OK\r\nX: y\r\n", "incomplete")):
        with pytest.raises(LocalError, match=f"^local server: {why}"):
            parse_head(bad)


# --- One connection ------------------------------------------------------------------------------------


def test_read_head_leaves_the_body_in_the_socket_for_splice(served):
    data = served["data"]

    async def go(loop):
        sock = await connect(loop, served["addr"], 2)
        assert not sock.getblocking() and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # the whole 1 MiB object from 1000 on: recv'd after the head
        await send_all(loop, sock, b"GET /obj-1m HTTP/1.1\r\nHost: x\r\nRange: bytes=1000-\r\n\r\n", 2)
        head = await read_head(loop, sock, 2)
        assert head.status == 206 and head.headers["content-length"] == str((1 << 20) - 1000)
        assert head.headers["etag"] == served["etag"]
        body = await read_exactly(loop, sock, (1 << 20) - 1000, 5)
        assert body == data["1m"][1000:]

        # the next response on the same keep-alive connection: spliced into a pipe
        await send_all(loop, sock, b"GET /obj-1k HTTP/1.1\r\nHost: x\r\nRange: bytes=100-\r\n\r\n", 2)
        head = await read_head(loop, sock, 2, consume=False)  # not consumed: still there
        assert sock.recv(64, socket.MSG_PEEK).startswith(b"HTTP/1.1 206")
        head = await read_head(loop, sock, 2)
        assert head.headers["content-range"] == "bytes 100-1023/1024"
        r, w = os.pipe()
        try:
            got = 0
            for _ in range(100):
                try:
                    got += os.splice(sock.fileno(), w, 924 - got, flags=os.SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                if got == 924:
                    break
            assert os.read(r, 4096) == data["1k"][100:]
        finally:
            os.close(r)
            os.close(w)
        sock.close()

    run(go)


def test_head_split_across_sends_waits_without_spinning_and_restores_rcvlowat():
    async def go(loop):
        ours, far = pair()
        writer = loop.create_task(write_later(loop, far, HEAD[:10], HEAD[10:40], HEAD[40:] + b"BODY", pause=0.1))
        t0, cpu0 = time.monotonic(), time.process_time()
        head = await read_head(loop, ours, 3)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        assert head.length == len(HEAD) and head.status == 206
        assert 0.25 < wall < 1.5, wall  # it came with the last piece, not at the timeout
        assert cpu < 0.5 * wall, (cpu, wall)  # woken by bytes, not polling
        assert rcvlowat(ours) == 1
        assert await read_exactly(loop, ours, 4, 1) == b"BODY"
        await writer
        ours.close()
        far.close()

    run(go)


def test_read_head_timeout_early_close_reset_and_too_long():
    async def go(loop):
        # no blank line in time
        ours, far = pair()
        await loop.sock_sendall(far, HEAD[:30])
        t0 = loop.time()
        with pytest.raises(LocalError, match="^local server: no complete response head in time"):
            await read_head(loop, ours, 0.3)
        assert 0.25 < loop.time() - t0 < 1.0
        assert rcvlowat(ours) == 1
        # then the FIN after part of a head: the raised SO_RCVLOWAT must not hide it
        writer = loop.create_task(write_later(loop, far, HEAD[30:40], close=True))
        with pytest.raises(LocalError, match="closed the connection before a response head"):
            await read_head(loop, ours, 3)
        assert rcvlowat(ours) == 1
        await writer
        ours.close()

        # a FIN and nothing else
        ours, far = pair()
        far.close()
        with pytest.raises(LocalError, match="closed the connection before a response head"):
            await read_head(loop, ours, 3)
        ours.close()

        # a reset
        ours, far = pair()
        await loop.sock_sendall(far, HEAD[:5])
        await asyncio.sleep(0.02)
        far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        far.close()
        with pytest.raises(LocalError, match="^local server: "):
            await read_head(loop, ours, 3)
        ours.close()

        # too long: at once, and growing to it
        for limit, chunks in ((65536, [b"X" * 70000]), (1000, [b"X" * 300, b"Y" * 400, b"Z" * 400])):
            ours, far = pair()
            writer = loop.create_task(write_later(loop, far, *chunks, pause=0.02))
            with pytest.raises(LocalError, match=f"response head longer than {limit} bytes"):
                await read_head(loop, ours, 3, limit=limit)
            assert rcvlowat(ours) == 1
            await writer
            ours.close()
            far.close()

        # unparsable, and nothing consumed by a failed read_head
        ours, far = pair()
        await loop.sock_sendall(far, b"garbage\r\n\r\nrest")
        with pytest.raises(LocalError, match="unparsable"):
            await read_head(loop, ours, 1)
        assert ours.recv(100) == b"garbage\r\n\r\nrest"
        ours.close()
        far.close()

    run(go)


def test_connect_refused_and_timeout():
    async def go(loop):
        port = free_port()
        with pytest.raises(LocalError, match=f"^local server: cannot connect to 127.0.0.1:{port}: Connection refused"):
            await connect(loop, ("127.0.0.1", port), 1)
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # one connection fills its accept queue; the next SYN is dropped
        first = await connect(loop, full.getsockname(), 1)
        t0 = loop.time()
        with pytest.raises(LocalError, match=r"cannot connect to 127\.0\.0\.1:\d+: no answer within 0.2 s"):
            await connect(loop, full.getsockname(), 0.2)
        assert loop.time() - t0 < 1.0
        first.close()
        full.close()

    fds = len(os.listdir("/proc/self/fd"))
    run(go)
    assert len(os.listdir("/proc/self/fd")) == fds  # the failed sockets were closed


def test_read_exactly_and_send_all_errors():
    async def go(loop):
        ours, far = pair()
        writer = loop.create_task(write_later(loop, far, b"abc", b"def", close=True))
        with pytest.raises(LocalError, match=r"the body ended early \(6 of 10 bytes\)"):
            await read_exactly(loop, ours, 10, 3)
        await writer
        ours.close()

        ours, far = pair()
        await loop.sock_sendall(far, b"abc")
        with pytest.raises(LocalError, match="did not come in time"):
            await read_exactly(loop, ours, 10, 0.2)
        # a peer that does not read: the buffers fill, then the timeout
        with pytest.raises(LocalError, match="did not take the request in time"):
            await send_all(loop, ours, bytes(64 << 20), 0.3)
        ours.close()
        far.close()

        ours, far = pair()
        data = os.urandom(4 << 20)
        reader = loop.create_task(read_exactly(loop, far, len(data), 5))
        await send_all(loop, ours, data, 5)
        assert await reader == data
        ours.close()
        far.close()

    run(go)


# --- ProbePool --------------------------------------------------------------------------------------


def test_1000_pipelined_range_probes_over_4_connections(served):
    data = served["data"]["1m"]
    rng = random.Random(7)
    offsets = [rng.randrange(len(data)) for _ in range(1000)]

    async def go(loop):
        pool = ProbePool(loop, served["addr"], connections=4, depth=64, timeout=10)
        t0 = time.monotonic()
        results = await asyncio.gather(*(pool.probe("/obj-1m", o) for o in offsets))
        took = time.monotonic() - t0
        for o, (head, body) in zip(offsets, results):
            assert head.status == 206, head
            h = head.headers
            assert h["content-range"] == f"bytes {o}-{o}/{len(data)}" and h["content-length"] == "1"
            assert h["etag"] == served["etag"] and h["last-modified"] == served["last_modified"]
            assert body == data[o:o + 1]
        c = pool.counters()
        assert c["requests"] == c["responses"] == 1000
        assert 1 <= c["connections_opened"] <= 4 and c["retries"] == c["errors"] == c["failed"] == 0, c
        # a later probe reuses an open connection
        head, body = await pool.probe("/obj-1k", 5)
        assert body == served["data"]["1k"][5:6] and pool.counters()["connections_opened"] == c["connections_opened"]
        pool.close()
        await asyncio.sleep(0)  # the transports finish closing
        return took

    took = run(go)
    assert took < 10


class TinyServer:
    """An asyncio HTTP/1.1 server answering each request head with respond(path, n, last),
    n counting the requests on the connection. close_after: the connection ends after that
    many requests, announced ("header": Connection: close on the last response) or not
    ("abrupt"). respond returning None: no answer, ever."""

    def __init__(self, respond=None, close_after=None, mode="header"):
        self.respond = respond or self.ok
        self.close_after, self.mode = close_after, mode
        self.connections = 0
        self.requests = []
        self.hold = asyncio.Event()
        self.handlers = set()
        self.writers = set()

    @staticmethod
    def ok(path, n, last):
        body = path.encode()
        extra = b"Connection: close\r\n" if last else b""
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.addr = self.server.sockets[0].getsockname()[:2]
        return self

    async def _handle(self, reader, writer):
        self.connections += 1
        self.handlers.add(asyncio.current_task())
        self.writers.add(writer)
        n = 0
        try:
            for _ in range(100_000):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                n += 1
                self.requests.append(head)
                last = self.close_after is not None and n >= self.close_after
                resp = self.respond(head.split(b" ")[1].decode(), n, last and self.mode == "header")
                if resp is None:
                    await self.hold.wait()
                    break
                writer.write(resp)
                await writer.drain()
                if last:
                    break
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self):
        self.hold.set()
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()


@pytest.mark.parametrize("mode", ["header", "abrupt"])
def test_a_server_closing_after_n_requests_is_handled_by_retry(mode):
    """10 requests per connection, 16 pipelined: every connection leaves 6 unanswered."""
    async def go(loop):
        srv = await TinyServer(close_after=10, mode=mode).start()
        pool = ProbePool(loop, srv.addr, connections=3, depth=16, timeout=10)
        paths = [f"/p{i}" for i in range(300)]
        results = await asyncio.gather(*(pool.fetch(pool.request(p)) for p in paths))
        assert [body.decode() for _, body in results] == paths  # each matched to its own request
        c = pool.counters()
        assert c["responses"] >= 300 and c["failed"] == 0 and c["retries"] > 0, c
        assert srv.connections == c["connections_opened"] >= 30
        if mode == "header":  # the limit was learnt: after the first ones, 10 per connection
            assert c["keepalive_limit"] == 10 and c["retries"] <= 3 * 6, c
        else:
            assert c["keepalive_limit"] is None, c
        pool.close()
        await srv.stop()

    run(go)


def test_bodyless_responses_and_unusable_ones():
    def respond(path, n, last):
        if path == "/chunked":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        if path == "/nolength":
            return b"HTTP/1.1 200 OK\r\n\r\n"
        if path == "/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if path == "/304":
            return b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"
        if path == "/continue":
            return b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        if path == "/big":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"b" * 100
        if path == "/head":  # the answer to HEAD: a length, no body
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        return TinyServer.ok(path, n, last)

    async def go(loop):
        srv = await TinyServer(respond).start()
        pool = ProbePool(loop, srv.addr, connections=1, timeout=3)
        head, body = await pool.fetch(pool.request("/head", method="HEAD"))
        assert head.headers["content-length"] == "1000" and body == b""
        for p, status in (("/204", 204), ("/304", 304), ("/continue", 200)):
            head, body = await pool.fetch(pool.request(p))
            assert head.status == status and body == (b"ok" if p == "/continue" else b"")
        with pytest.raises(LocalError, match="more than 10"):
            await pool.fetch(pool.request("/big"), max_body=10)
        assert (await pool.fetch(pool.request("/after")))[1] == b"/after"  # the body was skipped
        assert pool.counters()["connections_opened"] == 1
        with pytest.raises(LocalError, match="transfer-encoding chunked"):
            await pool.fetch(pool.request("/chunked"))
        with pytest.raises(LocalError, match="without a Content-Length"):
            await pool.fetch(pool.request("/nolength"))
        assert (await pool.fetch(pool.request("/again")))[1] == b"/again"  # a new connection
        c = pool.counters()
        assert c["connections_opened"] == 3 and c["failed"] == 3, c
        pool.close()
        await srv.stop()

    run(go)


def test_close_fails_pending_fetches_and_timeouts():
    async def go(loop):
        srv = await TinyServer(lambda path, n, last: None).start()  # never answers
        pool = ProbePool(loop, srv.addr, connections=2, timeout=0.3)
        t0 = loop.time()
        with pytest.raises(LocalError, match="no response within 0.3 s"):
            await pool.fetch(pool.request("/slow"))
        assert 0.25 < loop.time() - t0 < 1.0
        pool.timeout = 30
        tasks = [loop.create_task(pool.fetch(pool.request(f"/{i}"))) for i in range(10)]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in tasks)
        pool.close()
        for t in tasks:
            with pytest.raises(LocalError, match="closed"):
                await t
        with pytest.raises(LocalError, match="closed"):
            await pool.fetch(b"GET / HTTP/1.1\r\n\r\n")
        assert pool.counters()["connections"] == 0
        await srv.stop()

    run(go)


def test_a_dead_server_fails_fetches_after_two_connects():
    async def go(loop):
        port = free_port()
        pool = ProbePool(loop, ("127.0.0.1", port), connections=4, timeout=2)
        t0 = loop.time()
        results = await asyncio.gather(*(pool.fetch(pool.request("/x")) for _ in range(50)), return_exceptions=True)
        assert all(isinstance(r, LocalError) and "Connection refused" in str(r) for r in results), results[:3]
        assert loop.time() - t0 < 1.5
        c = pool.counters()
        assert c["errors"] <= 5 and c["failed"] == 50 and c["connections_opened"] == 0, c
        pool.close()

    run(go)


def test_a_request_lost_twice_fails_and_one_lost_once_is_answered():
    """The server takes each connection's first request and hangs up without answering; /ok
    survives because it was lost only once and then answered."""
    lost = set()

    def respond(path, n, last):
        if path == "/never" or (path == "/ok" and path not in lost):
            lost.add(path)
            return b""
        return TinyServer.ok(path, n, False)

    async def go(loop):
        srv = await TinyServer(respond, close_after=1, mode="abrupt").start()
        pool = ProbePool(loop, srv.addr, connections=1, timeout=3)
        with pytest.raises(LocalError, match=r"closed the connection \(failed twice\)"):
            await pool.fetch(pool.request("/never"))
        assert (await pool.fetch(pool.request("/ok")))[1] == b"/ok"
        c = pool.counters()
        assert c["retries"] == 2 and c["failed"] == 1 and srv.connections == 4, (c, srv.connections)
        pool.close()
        await srv.stop()

    run(go)
