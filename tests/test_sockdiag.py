"""appliance.sockdiag: the kernel's view of TCP sockets (inet_diag) and SOCK_DESTROY.

Loopback server/client pairs: find() on both ends, the tcp_info byte counters against what
the test sent, dumps with kernel-side state and port filters, destroy() and what the owner
and the peer see, IPv6 and v4-mapped sockets, a 2,000-socket dump in bounded time, reading
without privileges, the calling thread's network namespace, malformed input and malformed
kernel answers. Tests that need root (SOCK_DESTROY, setuid, netns) are skipped without it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from appliance import sockdiag as sd

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root (CAP_NET_ADMIN / setuid / netns)")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1)")


def until(pred, timeout=3.0, step=0.01):
    """pred()'s first truthy value within `timeout` (bounded in time and count), else the last."""
    deadline = time.monotonic() + timeout
    value = None
    for _ in range(int(timeout / step) + 2):
        value = pred()
        if value or time.monotonic() >= deadline:
            break
        time.sleep(step)
    return value


def ends(sock):
    """(local, remote) of a connected socket as (ip, port) pairs, v4-mapped spelled as IPv4."""
    def norm(a):
        ip = a[0]
        return (ip.removeprefix("::ffff:"), a[1])
    return norm(sock.getsockname()), norm(sock.getpeername())


class Pair:
    """A listener and one connection on loopback: `client` and `server` (the accepted socket)."""

    def __init__(self, family=socket.AF_INET, host="127.0.0.1", connect_to=None):
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        target = connect_to or host
        self.client = socket.create_connection((target, self.port), timeout=5)
        self.server, _ = self.listener.accept()
        self.server.settimeout(5)

    def close(self):
        for s in (self.client, self.server, self.listener):
            try:
                s.close()
            except OSError:
                pass


@pytest.fixture
def pair():
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def recv_exactly(sock, n):
    buf = b""
    for _ in range(10_000):
        if len(buf) >= n:
            break
        chunk = sock.recv(n - len(buf))
        assert chunk, "peer closed early"
        buf += chunk
    assert len(buf) == n
    return buf


# ------------------------------------------------------------------------------ reading

def test_find_both_ends_counts_and_rtt(pair):
    up, down = 3000, 1234
    pair.client.sendall(b"u" * up)
    recv_exactly(pair.server, up)
    pair.server.sendall(b"d" * down)
    recv_exactly(pair.client, down)
    cl, cr = ends(pair.client)
    sl, sr = ends(pair.server)
    assert cl == sr and cr == sl

    # both ACKs are in once each side's bytes_acked has caught up (loopback: at once, but bounded)
    c = until(lambda: (t := sd.find(cl, cr)) and t.bytes_acked == up + 1 and t)
    s = until(lambda: (t := sd.find(sl, sr)) and t.bytes_acked == down and t)
    assert c and s, (sd.find(cl, cr), sd.find(sl, sr))

    for t, (loc, rem), sock in ((c, (cl, cr), pair.client), (s, (sl, sr), pair.server)):
        assert t.state == 1 and t.state_name == "ESTABLISHED"
        assert t.family == socket.AF_INET
        assert t.local == loc and t.remote == rem
        assert t.inode == os.fstat(sock.fileno()).st_ino
        assert t.uid == os.geteuid()
        assert t.cookie > 0
        assert t.info_len is not None and t.info_len >= 232   # 4.19+ tcp_info: every field here fits
        assert t.rtt_us is not None and t.rtt_us > 0
        assert t.rttvar_us is not None and t.min_rtt_us is not None and 0 < t.min_rtt_us
        assert t.snd_cwnd and t.snd_cwnd >= 1 and t.snd_mss > 0 and t.rcv_mss > 0
        assert t.rto_us >= 200_000                          # Linux's TCP_RTO_MIN is 200 ms
        assert t.unacked == 0 and t.retransmits == 0 and t.total_retrans == 0 and t.bytes_retrans == 0
        assert t.lost == 0 and t.sacked == 0 and t.notsent_bytes == 0
        assert t.segs_in > 0 and t.segs_out > 0 and t.delivered > 0
        assert t.rqueue == 0 and t.wqueue == 0
        assert t.last_data_recv_ms is not None and t.last_ack_recv_ms is not None

    # The client (active opener) sent `up` data bytes; the kernel counts its SYN in bytes_acked.
    assert c.bytes_sent == up and c.bytes_acked == up + 1 and c.bytes_received == down
    # The server (passive opener): no SYN in bytes_acked.
    assert s.bytes_sent == down and s.bytes_acked == down and s.bytes_received == up


def test_bytes_received_is_the_kernels_not_the_applications(pair):
    pair.client.sendall(b"x" * 777)
    sl, sr = ends(pair.server)
    t = until(lambda: (t := sd.find(sl, sr)) and t.bytes_received == 777 and t)
    assert t, sd.find(sl, sr)
    assert t.rqueue == 777           # received by the kernel, not yet read by the server
    recv_exactly(pair.server, 777)
    assert sd.find(sl, sr).rqueue == 0


def test_fin_counts_in_bytes_received(pair):
    pair.client.sendall(b"y" * 10)
    recv_exactly(pair.server, 10)
    pair.client.shutdown(socket.SHUT_WR)
    assert pair.server.recv(1) == b""
    sl, sr = ends(pair.server)
    t = until(lambda: (t := sd.find(sl, sr)) and t.state_name == "CLOSE_WAIT" and t)
    assert t and t.bytes_received == 11   # the FIN takes one byte of sequence space


def test_find_without_info_fields_and_state_name():
    t = sd.TcpSocket(socket.AF_INET, 1, ("127.0.0.1", 1), ("127.0.0.1", 2), 0, 0)
    assert t.state_name == "ESTABLISHED" and t.rtt_us is None and t.bytes_acked is None
    assert t._replace(state=6).state_name == "TIME_WAIT"
    assert t._replace(state=10).state_name == "LISTEN"
    assert t._replace(state=99).state_name == "UNKNOWN(99)"


def test_find_missing_tuple_is_none_even_beside_a_listener(pair):
    # The kernel's by-id lookup falls back to the listener on the local port: find() must not.
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    free_port = unused.getsockname()[1]
    unused.close()
    assert sd.find(("127.0.0.1", pair.port), ("127.0.0.1", free_port)) is None
    assert sd.find(("127.0.0.1", free_port), ("127.0.0.1", pair.port)) is None


def test_dump_state_and_port_filters():
    a, b = Pair(), Pair()
    try:
        a_sl, a_sr = ends(a.server)
        a_cl, a_cr = ends(a.client)
        b_sl, b_sr = ends(b.server)

        got = sd.tcp_sockets(local_port=a.port)
        assert [(t.local, t.remote, t.state_name) for t in got] == [(a_sl, a_sr, "ESTABLISHED")]

        got = sd.tcp_sockets(states=sd.ALL, local_port=a.port)
        assert sorted(t.state_name for t in got) == ["ESTABLISHED", "LISTEN"]
        assert sd.tcp_sockets(states=["LISTEN"], local_port=a.port)[0].remote == ("0.0.0.0", 0)
        assert sd.tcp_sockets(states={"SYN_SENT", "TIME_WAIT"}, local_port=a.port) == []

        for remote in (("127.0.0.1", a.port), (None, a.port)):
            got = sd.tcp_sockets(remote=remote)
            assert [(t.local, t.remote) for t in got] == [(a_cl, a_cr)], remote
        both = sd.tcp_sockets(remote=("127.0.0.1", None), family=socket.AF_INET)
        keys = {(t.local, t.remote) for t in both}
        assert (a_cl, a_cr) in keys and (a_sl, a_sr) in keys and (b_sl, b_sr) in keys
        assert sd.tcp_sockets(remote=("127.0.0.2", a.port)) == []
        assert sd.tcp_sockets(local_port=a.port, remote=("127.0.0.1", b.port)) == []
        assert sd.tcp_sockets(local_port=a.port, family=socket.AF_INET6) == []

        everything = sd.tcp_sockets(states=sd.ALL)
        keys = {(t.local, t.remote) for t in everything}
        assert {(a_sl, a_sr), (a_cl, a_cr), (b_sl, b_sr)} <= keys
        assert all(t.rtt_us is None for t in sd.tcp_sockets(local_port=a.port, info=False))
    finally:
        a.close()
        b.close()


def test_port_filters_run_in_the_kernel(monkeypatch):
    """With the Python re-check disabled, the bytecode program alone must filter."""
    a, b = Pair(), Pair()
    try:
        monkeypatch.setattr(sd, "_matches", lambda *args: True)
        got = sd.tcp_sockets(states=sd.ALL, local_port=a.port)
        assert got and all(t.local[1] == a.port for t in got)
        got = sd.tcp_sockets(remote=("127.0.0.1", b.port))
        assert [(t.local, t.remote) for t in got] == [ends(b.client)]
        got = sd.tcp_sockets(remote=(None, b.port))
        assert [(t.local, t.remote) for t in got] == [ends(b.client)]
        assert sd.tcp_sockets(remote=("127.0.0.2", None)) == []
    finally:
        a.close()
        b.close()


def test_bytecode_layout():
    # S_EQ 80, then D_COND 10.0.0.1/32 port 443: each op rejects by jumping to end + 4.
    bc = sd._bytecode(80, (socket.AF_INET, socket.inet_aton("10.0.0.1") + bytes(12), 443))
    assert len(bc) == 8 + 4 + 8 + 4
    assert struct.unpack_from("=BBH", bc, 0) == (sd.INET_DIAG_BC_S_EQ, 8, 24 + 4)
    assert struct.unpack_from("=BBH", bc, 4) == (0, 0, 80)
    assert struct.unpack_from("=BBH", bc, 8) == (sd.INET_DIAG_BC_D_COND, 16, 16 + 4)
    assert struct.unpack_from("=BBxxi", bc, 12) == (socket.AF_INET, 32, 443)
    assert bc[20:24] == socket.inet_aton("10.0.0.1")
    assert sd._bytecode(None, None) == b""
    assert sd._bytecode(None, (None, None, 22)) == struct.pack("=BBHBBH", sd.INET_DIAG_BC_D_EQ, 8, 12, 0, 0, 22)


@needs_ipv6
def test_ipv6_loopback():
    p = Pair(socket.AF_INET6, "::1")
    try:
        p.client.sendall(b"6" * 100)
        recv_exactly(p.server, 100)
        sl, sr = ends(p.server)
        t = until(lambda: (t := sd.find(sl, sr)) and t.bytes_received == 100 and t)
        assert t and t.family == socket.AF_INET6 and t.state_name == "ESTABLISHED"
        assert t.local == ("::1", p.port) and t.rtt_us > 0
        # getsockname()'s IPv6 4-tuple is accepted as it is
        assert sd.find(p.client.getsockname(), p.client.getpeername()).remote == ("::1", p.port)
        got = sd.tcp_sockets(remote=("::1", p.port))
        assert [(x.local, x.remote) for x in got] == [ends(p.client)]
        assert sd.tcp_sockets(family=socket.AF_INET, local_port=p.port) == []
        assert [x.local for x in sd.tcp_sockets(family=socket.AF_INET6, local_port=p.port)] == [sl]
        if ROOT:
            assert sd.destroy(sl, sr) is True
            with pytest.raises(ConnectionAbortedError):
                p.server.recv(1)
            assert until(lambda: sd.find(sl, sr) is None)
    finally:
        p.close()


@needs_ipv6
def test_v4_mapped_socket_reported_as_ipv4():
    p = Pair(socket.AF_INET6, "::", connect_to="127.0.0.1")
    try:
        sl, sr = ends(p.server)
        assert sl == ("127.0.0.1", p.port)
        t = sd.find(sl, sr)
        assert t and t.family == socket.AF_INET6 and t.local == sl and t.remote == sr
        # the getsockname() spelling (::ffff:127.0.0.1) finds the same socket
        assert sd.find(p.server.getsockname(), p.server.getpeername()).cookie == t.cookie
        assert [x.cookie for x in sd.tcp_sockets(family=socket.AF_INET6, local_port=p.port)] == [t.cookie]
        assert sd.tcp_sockets(family=socket.AF_INET, local_port=p.port) == []
        got = sd.tcp_sockets(family=socket.AF_INET6, remote=("127.0.0.1", sr[1]))
        assert [x.cookie for x in got] == [t.cookie]
        if ROOT:
            assert sd.destroy(sl, sr) is True
            with pytest.raises(ConnectionAbortedError):
                p.server.recv(1)
    finally:
        p.close()


def test_dump_of_2000_sockets_in_bounded_time():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2200
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"RLIMIT_NOFILE {hard} < {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port = listener.getsockname()[1]
    socks = []
    try:
        for _ in range(1000):
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            a, _ = listener.accept()
            socks += [c, a]

        t0 = time.monotonic()
        servers = sd.tcp_sockets(local_port=port)
        clients = sd.tcp_sockets(remote=("127.0.0.1", port))
        everything = sd.tcp_sockets(states=sd.ALL)
        elapsed = time.monotonic() - t0
        assert elapsed < 3.0, elapsed
        assert len(servers) == 1000 and len(clients) == 1000
        assert {t.remote[1] for t in servers} == {ends(c)[0][1] for c in socks[0::2]}
        assert {t.local[1] for t in clients} == {ends(c)[0][1] for c in socks[0::2]}
        assert all(t.rtt_us is not None and t.state == 1 for t in servers + clients)
        assert len(everything) >= 2001
        with pytest.raises(sd.SockDiagError) as ei:
            sd.tcp_sockets(local_port=port, max_sockets=10)
        assert ei.value.errno == errno.E2BIG
    finally:
        for s in socks:
            s.close()
        listener.close()


# ------------------------------------------------------------------------------ destroy

@needs_root
def test_destroy_aborts_owner_and_resets_peer(pair):
    pair.client.sendall(b"z" * 10)
    recv_exactly(pair.server, 10)
    sl, sr = ends(pair.server)
    cl, cr = ends(pair.client)
    assert sd.find(sl, sr).state_name == "ESTABLISHED"
    assert sd.destroy(sl, sr) is True
    # the owner: POLLERR at once, then ECONNABORTED
    r, _, _ = select.select([pair.server], [], [pair.server], 2.0)
    assert r, "destroyed socket not readable (error) at once"
    with pytest.raises(ConnectionAbortedError):
        pair.server.recv(1)
    # the peer: the kernel sent it a RST
    r, _, _ = select.select([pair.client], [], [], 2.0)
    assert r
    with pytest.raises(ConnectionResetError):
        pair.client.recv(1)
    # both gone from the kernel's tables at once (no FIN_WAIT / TIME_WAIT)
    assert until(lambda: sd.find(sl, sr) is None)
    assert until(lambda: sd.find(cl, cr) is None)
    assert sd.destroy(sl, sr) is False
    # the listener is untouched
    assert [t.state_name for t in sd.tcp_sockets(states=sd.ALL, local_port=pair.port)] == ["LISTEN"]


@needs_root
def test_destroy_missing_tuple_is_false_and_spares_the_listener(pair):
    unused = socket.socket()
    unused.bind(("127.0.0.1", 0))
    free_port = unused.getsockname()[1]
    unused.close()
    # A raw SOCK_DESTROY of this tuple without a cookie would hit the listener (the kernel's
    # lookup falls back to it); destroy() must not.
    assert sd.destroy(("127.0.0.1", pair.port), ("127.0.0.1", free_port)) is False
    assert sd.destroy(("127.0.0.1", free_port), ("127.0.0.1", pair.port)) is False
    assert sorted(t.state_name for t in sd.tcp_sockets(states=sd.ALL, local_port=pair.port)) == ["ESTABLISHED", "LISTEN"]
    c2 = socket.create_connection(("127.0.0.1", pair.port), timeout=2)   # still listening
    c2.close()
    # and the connection is intact
    pair.client.sendall(b"ok")
    assert recv_exactly(pair.server, 2) == b"ok"


@needs_root
def test_destroy_client_side(pair):
    cl, cr = ends(pair.client)
    assert sd.destroy(cl, cr) is True
    with pytest.raises(ConnectionAbortedError):
        pair.client.recv(1)
    with pytest.raises(ConnectionResetError):
        pair.server.recv(1)


@needs_root
def test_destroy_time_wait():
    p = Pair()
    try:
        cl, cr = ends(p.client)
        p.client.close()                      # the active closer ends in TIME_WAIT
        assert p.server.recv(1) == b""
        p.server.close()
        t = until(lambda: (t := sd.find(cl, cr)) and t.state_name == "TIME_WAIT" and t)
        assert t and t.rtt_us is None and t.inode == 0     # no tcp_info for a timewait socket
        assert t in sd.tcp_sockets(states=["TIME_WAIT"], local_port=cl[1])
        assert sd.destroy(cl, cr) is True
        assert sd.find(cl, cr) is None
    finally:
        p.close()


@needs_root
def test_unprivileged_reads_but_cannot_destroy(pair):
    """Forked child with uid/gid 65534 and no capabilities: dump and find work, destroy is EPERM."""
    cl, cr = ends(pair.client)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # child: never returns into pytest
        res = {}
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            t = sd.find(cl, cr)
            res["find"] = [t.state_name, t.uid, t.rtt_us is not None] if t else None
            res["dump"] = len(sd.tcp_sockets(local_port=pair.port))
            try:
                res["destroy"] = sd.destroy(cl, cr)
            except sd.SockDiagError as e:
                res["destroy"] = [e.errno, str(e)]
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            res["exc"] = repr(e)
        finally:
            os.write(w, json.dumps(res).encode())
            os._exit(0)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 10)
        assert ready, "child did not answer"
        data = os.read(r, 65536)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    res = json.loads(data)
    assert "exc" not in res, res
    assert res["find"] == ["ESTABLISHED", 0, True]      # another user's socket, tcp_info included
    assert res["dump"] == 1
    assert res["destroy"][0] == errno.EPERM and "CAP_NET_ADMIN" in res["destroy"][1]
    assert sd.find(cl, cr).state_name == "ESTABLISHED"


# ------------------------------------------------------------------------------ namespaces

CLONE_NEWNET = 0x40000000


@needs_root
@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")
def test_calling_threads_network_namespace():
    name = f"mig-sd{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=10)
        libc = ctypes.CDLL(None, use_errno=True)
        result: dict = {}
        done = threading.Event()
        go_on = threading.Event()

        def in_netns():
            p = None
            try:
                fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                p = Pair()
                result["tuple"] = ends(p.server)
                result["port"] = p.port
                result["inside"] = sd.find(*result["tuple"])
                result["dump"] = sd.tcp_sockets(local_port=p.port)
                done.set()
                go_on.wait(10)
                result["destroy"] = sd.destroy(*result["tuple"])
            except BaseException as e:  # noqa: BLE001
                result["exc"] = e
            finally:
                done.set()
                if p is not None:
                    p.close()

        th = threading.Thread(target=in_netns, daemon=True)
        th.start()
        assert done.wait(10)
        assert "exc" not in result, result.get("exc")
        assert result["inside"] and result["inside"].state_name == "ESTABLISHED"
        assert len(result["dump"]) == 1
        # This thread is in the initial namespace: the socket is not there.
        assert sd.find(*result["tuple"]) is None
        assert sd.tcp_sockets(local_port=result["port"]) == []
        go_on.set()
        th.join(10)
        assert not th.is_alive()
        assert "exc" not in result, result.get("exc")
        assert result["destroy"] is True
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=10)


# ------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("call, word", [
    (lambda: sd.find(("not-an-ip", 80), ("127.0.0.1", 1)), "local"),
    (lambda: sd.find(("127.0.0.1", 80), ("300.1.1.1", 1)), "remote"),
    (lambda: sd.find(("127.0.0.1", 70000), ("127.0.0.1", 1)), "local"),
    (lambda: sd.find(("127.0.0.1", 80), ("127.0.0.1", 0)), "remote"),
    (lambda: sd.find(("127.0.0.1", 80), ("127.0.0.1", -1)), "remote"),
    (lambda: sd.find(("127.0.0.1", "80"), ("127.0.0.1", 1)), "local"),
    (lambda: sd.find(("127.0.0.1", True), ("127.0.0.1", 1)), "local"),
    (lambda: sd.find(("127.0.0.1",), ("127.0.0.1", 1)), "local"),
    (lambda: sd.find("127.0.0.1:80", ("127.0.0.1", 1)), "local"),
    (lambda: sd.find((b"127.0.0.1", 80), ("127.0.0.1", 1)), "local"),
    (lambda: sd.find(("127.0.0.1", 80), ("::1", 1)), "different address families"),
    (lambda: sd.find(("fe80::1%no-such-if0", 80), ("fe80::2", 1)), "local"),
    (lambda: sd.destroy(("127.0.0.1", 80), ("127.0.0.1", 65536)), "remote"),
    (lambda: sd.destroy(("", 80), ("127.0.0.1", 1)), "local"),
    (lambda: sd.find(("127.0.0.1", 80), ("127.0.0.1", 1), timeout=0), "timeout"),
    (lambda: sd.tcp_sockets(local_port=0), "local_port"),
    (lambda: sd.tcp_sockets(local_port=65536), "local_port"),
    (lambda: sd.tcp_sockets(local_port="80"), "local_port"),
    (lambda: sd.tcp_sockets(remote=("bad", 1)), "remote"),
    (lambda: sd.tcp_sockets(remote=("127.0.0.1", 99999)), "remote"),
    (lambda: sd.tcp_sockets(remote="127.0.0.1"), "remote"),
    (lambda: sd.tcp_sockets(family=99), "family"),
    (lambda: sd.tcp_sockets(states=["BOGUS"]), "states"),
    (lambda: sd.tcp_sockets(states=0), "states"),
    (lambda: sd.tcp_sockets(states=[]), "states"),
    (lambda: sd.tcp_sockets(max_sockets=0), "max_sockets"),
])
def test_malformed_input_names_the_argument(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_state_mask():
    assert sd.state_mask(sd.ESTABLISHED_ONLY) == 1 << 1
    assert sd.state_mask(["ESTABLISHED", "listen", 6]) == (1 << 1) | (1 << 10) | (1 << 6)
    assert sd.state_mask("TIME_WAIT") == 1 << 6
    assert sd.ALL == 0xFFE


# ------------------------------------------------------------------------------ kernel answers

def _diag_msg(attrs=b"", family=socket.AF_INET, state=1):
    src = socket.inet_aton("10.0.0.1") + bytes(12)
    dst = socket.inet_aton("10.0.0.2") + bytes(12)
    return (struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH16s16s", 80, 5555, src, dst)
            + struct.pack("=IIIIIIII", 0, 7, 0, 0, 3, 4, 1000, 42) + attrs)


def _attr(atype, payload):
    a = struct.pack("=HH", 4 + len(payload), atype) + payload
    return a + bytes(-len(a) % 4)


def test_parse_full_and_short_tcp_info():
    info = bytearray(280)
    struct.pack_into("=I", info, 68, 1500)        # tcpi_rtt
    struct.pack_into("=I", info, 72, 300)         # tcpi_rttvar
    struct.pack_into("=I", info, 80, 10)          # tcpi_snd_cwnd
    struct.pack_into("=Q", info, 120, 5001)       # tcpi_bytes_acked
    struct.pack_into("=Q", info, 128, 6000)       # tcpi_bytes_received
    struct.pack_into("=Q", info, 200, 5000)       # tcpi_bytes_sent
    struct.pack_into("=I", info, 144, 17)         # tcpi_notsent_bytes
    msg = _diag_msg(_attr(8, b"\x00") + _attr(sd.INET_DIAG_INFO, bytes(info)))
    t = sd._parse(memoryview(msg), 0, len(msg))
    assert t.local == ("10.0.0.1", 80) and t.remote == ("10.0.0.2", 5555)
    assert t.cookie == 7 and t.rqueue == 3 and t.wqueue == 4 and t.uid == 1000 and t.inode == 42
    assert (t.rtt_us, t.rttvar_us, t.snd_cwnd) == (1500, 300, 10)
    assert (t.bytes_acked, t.bytes_received, t.bytes_sent, t.notsent_bytes) == (5001, 6000, 5000, 17)
    assert t.info_len == 280

    # a 3.x kernel's 104-byte tcp_info: up to total_retrans, nothing after
    msg = _diag_msg(_attr(sd.INET_DIAG_INFO, bytes(info[:104])))
    t = sd._parse(memoryview(msg), 0, len(msg))
    assert t.rtt_us == 1500 and t.snd_cwnd == 10 and t.total_retrans == 0 and t.info_len == 104
    assert t.bytes_acked is None and t.bytes_received is None and t.bytes_sent is None
    assert t.min_rtt_us is None and t.delivered is None and t.notsent_bytes is None

    # v4-mapped IPv6 addresses come out as IPv4 text
    mapped = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("192.0.2.9")
    msg = bytearray(_diag_msg(family=socket.AF_INET6))
    msg[8:24] = mapped
    t = sd._parse(memoryview(bytes(msg)), 0, len(msg))
    assert t.family == socket.AF_INET6 and t.local == ("192.0.2.9", 80) and t.rtt_us is None


def test_parse_rejects_malformed_answers():
    msg = _diag_msg()
    with pytest.raises(sd.SockDiagError) as ei:
        sd._parse(memoryview(msg[:60]), 0, 60)
    assert ei.value.errno == errno.EBADMSG
    bad = msg + struct.pack("=HH", 200, sd.INET_DIAG_INFO) + bytes(8)    # attribute runs past the end
    with pytest.raises(sd.SockDiagError):
        sd._parse(memoryview(bad), 0, len(bad))
    bad = msg + struct.pack("=HH", 2, 1)                                  # attribute shorter than its header
    with pytest.raises(sd.SockDiagError):
        sd._parse(memoryview(bad), 0, len(bad))


def test_a_silent_kernel_times_out_not_hangs():
    t0 = time.monotonic()
    with sd._Session(0.3) as s, pytest.raises(sd.SockDiagError) as ei:
        s.run(12345, 10, [])              # nothing was sent: no answer will come
    assert ei.value.errno == errno.ETIMEDOUT
    assert "0.3 s" in str(ei.value)
    assert time.monotonic() - t0 < 2.0


def test_kernel_error_messages():
    e = sd._kernel_error(-errno.EPERM, "SOCK_DESTROY")
    assert isinstance(e, OSError) and e.errno == errno.EPERM
    assert "needs CAP_NET_ADMIN for SOCK_DESTROY" in str(e)
    e = sd._kernel_error(-errno.EOPNOTSUPP, "SOCK_DESTROY")
    assert "the kernel lacks INET_DIAG_DESTROY" in str(e)
