"""appliance.relay: the splice relay on an asyncio loop, over real TCP on loopback.

Each test builds two connected pairs: (c_app, c_peer) stands for the repaired client
connection (c_app what the relay holds, c_peer the client) and (l_app, l_peer) for the local
HTTP connection (l_app the relay's end, l_peer the local server). The peers are driven by
the same loop, so a test runs in one thread and can count threads, registrations and fds.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import socket
import stat
import struct
import threading
import time

import pytest

from appliance import docroot
from appliance import relay as relay_mod
from appliance.relay import Relay, RelayResult


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def registered(loop) -> int:
    return len(loop._selector.get_map())  # the loop's own self-pipe included


def tcp_pair(lsock=None, rcvbuf=None, sndbuf=None):
    """(accepted end, connecting end), both non-blocking. rcvbuf: the connecting end's
    receive buffer, set before connect; sndbuf: the accepted end's send buffer."""
    own = lsock is None
    if own:
        lsock = socket.create_server(("127.0.0.1", 0))
    peer = socket.socket()
    if rcvbuf:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    peer.connect(lsock.getsockname())
    app, _ = lsock.accept()
    if own:
        lsock.close()
    if sndbuf:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    for s in (app, peer):
        s.setblocking(False)
    return app, peer


def close_all(*socks):
    for s in socks:
        s.close()


def reset(sock):
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def recv_n(loop, sock, n, timeout=5.0, chunk=1 << 16):
    got = bytearray()
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(got)} of {n} bytes"
        data = await asyncio.wait_for(loop.sock_recv(sock, min(chunk, n - len(got))), left)
        if not data:
            break
        got += data
    return bytes(got)


async def recv_eof(loop, sock, timeout=5.0) -> bytes:
    """Everything until the peer's FIN."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    for _ in range(100_000):
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), max(0.01, deadline - time.monotonic()))
        if not data:
            return bytes(got)
        got += data
    raise AssertionError("no FIN")


def run(coro_fn, *args):
    """Run coro_fn(loop, *args) on a fresh loop; afterwards no fd may be left registered."""
    async def main():
        loop = asyncio.get_running_loop()
        base = registered(loop)
        out = await coro_fn(loop, *args)
        assert registered(loop) == base, "a descriptor is still registered with the loop"
        return out
    return asyncio.run(main())


def check_ended(r: Relay, end: str, ends: list):
    assert r.result is not None and r.result.end == end, r.result
    assert r.done.done() and r.done.result() == r.result
    assert ends == [r.result], "on_end must be called exactly once"


# --- One relay --------------------------------------------------------------------------------------


def test_moves_16_mib_intact_to_a_slow_reader():
    docroot.ensure(["20m"])
    path = docroot.object_path("20m")
    offset, size = 100, 16 << 20
    with open(path, "rb") as f:
        f.seek(offset)
        want = hashlib.sha256(f.read(size)).hexdigest()
    fds = open_fds()

    async def go(loop):
        c_app, c_peer = tcp_pair(rcvbuf=64 << 10, sndbuf=64 << 10)  # small: the pipe fills up
        l_app, l_peer = tcp_pair()
        seen, ends = [], []
        r = Relay(loop, c_app, l_app, on_client_bytes=seen.append, on_end=ends.append)
        r.start()
        assert r.result is None

        async def serve():
            # sendfile, as the local server does: the skbs carry page-cache pages, and from an
            # odd offset the pipe runs out of buffers before it holds pipe_size bytes
            with open(path, "rb") as f:
                await loop.sock_sendfile(l_peer, f, offset, size)
            l_peer.close()  # the local server ends the connection after the response

        sender = loop.create_task(serve())
        digest, got = hashlib.sha256(), 0
        t0 = time.monotonic()
        while got < size:  # slow for the first 2 MiB, then as fast as it goes
            assert time.monotonic() - t0 < 20
            slow = got < (2 << 20)
            data = await asyncio.wait_for(loop.sock_recv(c_peer, 8192 if slow else 1 << 18), 5)
            assert data
            digest.update(data)
            got += len(data)
            if slow:
                await asyncio.sleep(0.002)
        await asyncio.wait_for(r.done, 5)
        await sender
        check_ended(r, "local closed", ends)
        assert r.result == RelayResult(size, 0, "local closed")
        assert digest.hexdigest() == want
        assert seen == sorted(seen) and seen[-1] == size
        assert r.stats["full_waits"] > 0, r.stats  # the pipe-full path was taken...
        assert r.stats["empty_wakeups"] <= r.stats["full_waits"] + 50, r.stats  # ...without spinning
        assert not c_app.getblocking() and not l_app.getblocking()
        c_app.getpeername()  # still open: the caller closes
        close_all(c_app, c_peer, l_app)

    run(go)
    assert open_fds() == fds, "the pipes (or a socket) were left open"


def test_a_pipe_full_far_below_its_size_pauses_the_source_instead_of_spinning(monkeypatch):
    """The kernel's behaviour made certain: any splice into a pipe holding 8 KiB or more
    fails with EAGAIN, as when its buffers are all taken by small skb fragments."""
    real, cap, room = os.splice, 1 << 20, 8192

    def small_pipe(src, dst, count, *a, **kw):
        if stat.S_ISFIFO(os.fstat(dst).st_mode):  # into the pipe: count is cap - pending
            if cap - count >= room:
                raise BlockingIOError(11, "Resource temporarily unavailable")
            count = min(count, room)
        return real(src, dst, count, *a, **kw)

    monkeypatch.setattr(relay_mod, "_splice", small_pipe)
    body = os.urandom(2 << 20)

    async def go(loop):
        c_app, c_peer = tcp_pair(rcvbuf=64 << 10, sndbuf=64 << 10)
        l_app, l_peer = tcp_pair()
        r = Relay(loop, c_app, l_app, pipe_size=cap)
        r.start()
        assert r._down.cap == cap
        sender = loop.create_task(loop.sock_sendall(l_peer, body))
        got = bytearray()
        while len(got) < len(body):
            data = await asyncio.wait_for(loop.sock_recv(c_peer, 4096), 5)
            assert data
            got += data
            await asyncio.sleep(0.0005)
        await sender
        assert bytes(got) == body and r.result is None
        assert r.stats["full_waits"] > 10, r.stats
        assert r.stats["empty_wakeups"] <= r.stats["full_waits"] + 10, r.stats
        r.stop()
        close_all(c_app, c_peer, l_app, l_peer)

    run(go)


def test_later_requests_and_responses_both_ways():
    async def go(loop):
        c_app, c_peer = tcp_pair()
        l_app, l_peer = tcp_pair()
        to_client, to_local = [], []
        r = Relay(loop, c_app, l_app, on_client_bytes=to_client.append, on_local_bytes=to_local.append)
        r.start()
        await loop.sock_sendall(l_peer, b"rest of the body")
        assert await recv_n(loop, c_peer, 16) == b"rest of the body"
        for i in range(3):
            req = f"GET /next{i} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            await loop.sock_sendall(c_peer, req)
            assert await recv_n(loop, l_peer, len(req)) == req
            resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            await loop.sock_sendall(l_peer, resp)
            assert await recv_n(loop, c_peer, len(resp)) == resp
        assert to_local[-1] == 3 * len(req) and to_client[-1] == 16 + 3 * len(resp)
        assert r.to_local == to_local[-1] and r.result is None
        r.stop()
        assert r.result == RelayResult(to_client[-1], to_local[-1], "stopped")
        close_all(c_app, c_peer, l_app, l_peer)

    run(go)


def test_client_fin_becomes_shut_wr_then_the_local_answer_and_close():
    async def go(loop):
        c_app, c_peer = tcp_pair()
        l_app, l_peer = tcp_pair()
        ends = []
        r = Relay(loop, c_app, l_app, on_end=ends.append)
        r.start()
        await loop.sock_sendall(c_peer, b"last request")
        c_peer.shutdown(socket.SHUT_WR)
        assert await recv_eof(loop, l_peer) == b"last request"  # then the FIN, passed on
        assert r.result is None  # still waiting for the local side
        await loop.sock_sendall(l_peer, b"its answer")
        l_peer.close()
        assert await recv_n(loop, c_peer, 10) == b"its answer"
        await asyncio.wait_for(r.done, 5)
        check_ended(r, "local closed", ends)
        assert r.result == RelayResult(10, 12, "local closed")
        close_all(c_app, c_peer, l_app)

    run(go)


@pytest.mark.parametrize("side", ["client", "local"])
def test_a_reset_of_either_side_ends_it(side):
    fds = open_fds()

    async def go(loop):
        c_app, c_peer = tcp_pair()
        l_app, l_peer = tcp_pair()
        ends = []
        r = Relay(loop, c_app, l_app, on_end=ends.append)
        r.start()
        await loop.sock_sendall(l_peer, b"x" * 1000)
        assert await recv_n(loop, c_peer, 1000) == b"x" * 1000
        reset(c_peer if side == "client" else l_peer)
        await asyncio.wait_for(r.done, 5)
        assert r.result.end.startswith(f"{side} error: "), r.result
        assert len(ends) == 1
        close_all(c_app, l_app, l_peer if side == "client" else c_peer)

    run(go)
    assert open_fds() == fds


def test_idle_timeout_is_rearmed_by_traffic():
    async def go(loop):
        c_app, c_peer = tcp_pair()
        l_app, l_peer = tcp_pair()
        ends = []
        r = Relay(loop, c_app, l_app, idle_timeout=0.3, on_end=ends.append)
        t0 = loop.time()
        r.start()
        await asyncio.sleep(0.2)
        await loop.sock_sendall(c_peer, b"keepalive")  # a byte at 0.2 s: idle until 0.5 s at least
        assert await recv_n(loop, l_peer, 9) == b"keepalive"
        await asyncio.wait_for(r.done, 3)
        took = loop.time() - t0
        check_ended(r, "idle", ends)
        assert 0.45 <= took < 1.5, took
        close_all(c_app, c_peer, l_app, l_peer)

    run(go)


def test_stop_ends_it_once_and_before_start_too():
    async def go(loop):
        c_app, c_peer = tcp_pair()
        l_app, l_peer = tcp_pair()
        ends = []
        r = Relay(loop, c_app, l_app, on_end=ends.append)
        r.start()
        await asyncio.sleep(0.01)
        r.stop("engine closed")
        r.stop("again")
        check_ended(r, "engine closed", ends)
        with pytest.raises(RuntimeError):
            r.start()
        await loop.sock_sendall(l_peer, b"late")  # nobody listens for it any more
        await asyncio.sleep(0.02)
        assert r.result.to_client == 0

        r2 = Relay(loop, c_app, l_app, on_end=ends.append)
        r2.stop()
        r2.start()  # stopped before it started: registers nothing
        assert r2.result == RelayResult(0, 0, "stopped") and len(ends) == 2
        close_all(c_app, c_peer, l_app, l_peer)

    run(go)


def test_a_callback_may_stop_it():
    async def go(loop):
        c_app, c_peer = tcp_pair()
        l_app, l_peer = tcp_pair()
        holder = {}

        def progress(total):
            if total >= 5:
                holder["r"].stop("enough")

        r = holder["r"] = Relay(loop, c_app, l_app, on_client_bytes=progress)
        r.start()
        await loop.sock_sendall(l_peer, b"12345678")
        await asyncio.wait_for(r.done, 5)
        assert r.result.end == "enough" and r.result.to_client >= 5
        close_all(c_app, c_peer, l_app, l_peer)

    run(go)


def test_a_descriptor_ready_with_no_progress_ends_it_as_stalled(monkeypatch):
    def never(*a, **kw):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(relay_mod, "_splice", never)

    async def go(loop):
        c_app, c_peer = tcp_pair()
        l_app, l_peer = tcp_pair()
        r = Relay(loop, c_app, l_app)
        r.max_empty_wakeups = 50
        r.start()
        await loop.sock_sendall(l_peer, b"readable forever")
        await asyncio.wait_for(r.done, 5)
        assert r.result.end == "stalled" and r.stats["empty_wakeups"] == 51
        close_all(c_app, c_peer, l_app, l_peer)

    run(go)


def test_pipe_size_falls_back_when_refused():
    async def go(loop):
        c_app, c_peer = tcp_pair()
        l_app, l_peer = tcp_pair()
        r = Relay(loop, c_app, l_app, pipe_size=1 << 40)  # beyond any pipe-max-size
        r.start()
        assert r._down.cap >= 4096 and r._up.cap >= 4096
        await loop.sock_sendall(l_peer, b"still works")
        assert await recv_n(loop, c_peer, 11) == b"still works"
        r.stop()
        close_all(c_app, c_peer, l_app, l_peer)

    run(go)


# --- Many relays in one loop ---------------------------------------------------------------------------


def test_200_relays_at_once_in_one_thread_with_descriptors_above_1024():
    n, size = 200, 256 << 10
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1100 + n * 8 + 200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]  # push new fds above 1024
    fds = open_fds()
    threads, before = threading.active_count(), set(threading.enumerate())
    bodies = [hashlib.shake_128(f"many:{i}".encode()).digest(size) for i in range(n)]

    async def one(loop, lsock, i, high):
        c_app, c_peer = tcp_pair(lsock)
        l_app, l_peer = tcp_pair(lsock)
        high.append(max(s.fileno() for s in (c_app, c_peer, l_app, l_peer)))
        r = Relay(loop, c_app, l_app, pipe_size=64 << 10)
        r.start()
        high.append(max(r._down.r, r._down.w, r._up.r, r._up.w))
        req = f"GET /{i} HTTP/1.1\r\n\r\n".encode()

        async def local():
            await loop.sock_sendall(l_peer, bodies[i])
            got = await recv_n(loop, l_peer, len(req), timeout=20)
            await loop.sock_sendall(l_peer, b"bye")
            l_peer.close()
            return got

        srv = loop.create_task(local())
        assert await recv_n(loop, c_peer, size, timeout=20) == bodies[i]
        await loop.sock_sendall(c_peer, req)
        assert await recv_n(loop, c_peer, 3, timeout=20) == b"bye"
        res = await asyncio.wait_for(r.done, 20)
        assert await srv == req
        close_all(c_app, c_peer, l_app)
        return res

    async def go(loop):
        lsock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        high = []
        t0 = time.monotonic()
        results = await asyncio.gather(*(one(loop, lsock, i, high) for i in range(n)))
        took = time.monotonic() - t0
        lsock.close()
        # (another test's server threads may still be winding down: none may be new)
        assert threading.active_count() <= threads and set(threading.enumerate()) <= before, "a thread was started"
        assert all(r == RelayResult(size + 3, len(f"GET /{i} HTTP/1.1\r\n\r\n"), "local closed")
                   for i, r in enumerate(results)), [r for r in results if r.end != "local closed"][:3]
        assert max(high) > 1024 + n
        return took

    try:
        took = run(go)
    finally:
        for fd in filler:
            os.close(fd)
    assert open_fds() == fds - len(filler)
    assert took < 15
