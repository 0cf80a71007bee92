"""appliance.takeover: the Migrate handshake (sans-I/O), where to resume, the 206 checks against
a local HTTP server, the splice relay, the SYN/ACK filter and the engine on loopback.

The kernel side (TCP_REPAIR in namespaces, a real client appliance stand-in) is in
tests/test_repair.py and tests/lab/test_repair_ns.py; here the engine's socket factory is
a plain loopback connection, so everything after the repair runs for real.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time

import pytest

import _fastpath as fp
from appliance import httpserver, repair
from appliance import takeover as tk
from appliance.sync import Entry, ObjectRef
from appliance.selection import TakeoverAction

C_IP, A_IP, B_IP = "10.0.0.1", "10.0.0.2", "10.0.0.3"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="raw sockets need root")


def make_entry(**kw) -> Entry:
    base = dict(client_ip=socket.inet_aton(C_IP), client_port=40000, server_ip=socket.inet_aton(A_IP),
                server_port=80, ni=1000, na=50000, c_mss=1460, c_wscale=7, c_sack=True, c_ts=True, s_mss=1460,
                s_wscale=9, s_sack=True, s_ts=True, mp=True, reqno=0, state="ACTIVE",
                object=ObjectRef("example", "/f.bin", '"e1"', "Mon, 01 Jan 2024 00:00:00 GMT", 10000),
                req_range=None, status=200, body_start=50001 + 200, body_offset=0, body_length=10000)
    base.update(kw)
    return Entry(**base)


def synack(entry, seq=1234, ack=None, window=501, tsval=777, tsecr=888888, flags=fp.SYN | fp.ACK, src=C_IP,
           dst=B_IP, sport=None, dport=80) -> bytes:
    ack = (entry.body_start + 100) if ack is None else ack
    opts = b"" if tsval is None else bytes((1, 1)) + fp.opt_timestamps(tsval, tsecr)
    return fp.build_tcp(src, dst, entry.client_port if sport is None else sport, dport, seq, ack, flags, window, opts)


def view(packet):
    return fp.parse(packet, fp.LINK_RAW)


# --- The Migrate SYN --------------------------------------------------------------------------------


def test_migrate_syn_carries_only_the_migrate_option_with_the_right_fields():
    e = make_entry(reqno=5)
    hs = tk.Handshake(e, B_IP, now=10.0)
    [pkt] = hs.datagrams(10.0)
    v = view(pkt)
    assert v.is_tcp and v.flags == fp.SYN
    assert (v.src_ip, v.sport, v.dst_ip, v.dport) == (B_IP, 80, C_IP, 40000)
    assert v.seq == e.body_start and v.ack == 0
    kinds = [k for k, _, _ in v.options() if k != fp.OPT_NOP]
    assert kinds == [fp.OPT_EXP1]  # nothing but Migrate: no MSS, wscale, SACK-permitted, TS
    assert v.opts & fp.HAS_MIGRATE and not v.opts & (fp.HAS_MSS | fp.HAS_WSCALE | fp.HAS_TIMESTAMPS
                                                     | fp.HAS_SACK_PERMITTED | fp.HAS_MIGRATE_PERMITTED)
    assert v.migrate_preload is True
    assert v.migrate_reqno == 6
    assert v.migrate_token == fp.migrate_token(e.ni, e.na)
    assert v.migrate_request == fp.migrate_request(e.ni, e.na, b"", e.body_start, 6)
    assert fp.verify_checksums(pkt, fp.LINK_RAW) == (True, True)


def test_reqno_wraps_and_local_port_can_differ():
    e = make_entry(reqno=127)
    hs = tk.Handshake(e, B_IP, 0.0, local_port=8080)
    v = view(hs.datagrams(0.0)[0])
    assert v.migrate_reqno == 0 and v.sport == 8080
    assert v.migrate_request == fp.migrate_request(e.ni, e.na, b"", e.body_start, 0)


def test_retransmission_schedule_and_giving_up():
    hs = tk.Handshake(make_entry(), B_IP, now=100.0)
    sent = []
    t = 100.0
    while t < 104.0:
        if hs.expired(t):
            break
        if hs.datagrams(t):
            sent.append(round(t - 100.0, 3))
        t = round(t + 0.01, 6)
    assert sent == pytest.approx([0.0, 0.2, 0.6, 1.4], abs=0.0101)  # first at once, then 200 ms doubling
    assert round(t - 100.0, 3) == pytest.approx(3.0, abs=0.0101) and hs.state == tk.EXPIRED
    assert "no SYN/ACK within 3 s (4 Migrate SYNs" in hs.reason
    assert hs.datagrams(200.0) == [] and hs.next_deadline() is None
    # identical retransmissions
    hs2 = tk.Handshake(make_entry(), B_IP, 0.0, initial_rto=0.05, backoff=3, give_up=1.0)
    a = hs2.datagrams(0.0)
    times = []
    while hs2.next_deadline() is not None and len(times) < 10:
        d = hs2.next_deadline()
        times.append(d)
        if hs2.expired(d):
            break
        assert hs2.datagrams(d) == a  # identical retransmissions
    assert times == pytest.approx([0.05, 0.2, 0.65, 1.0])  # x3 backoff; the give-up comes first
    assert hs2.attempts == 4 and hs2.state == tk.EXPIRED


def test_late_timer_sends_one_syn_not_a_burst():
    hs = tk.Handshake(make_entry(), B_IP, now=0.0)
    assert hs.datagrams(0.0)
    assert len(hs.datagrams(1.0)) == 1 and hs.datagrams(1.0) == []
    assert hs.next_deadline() == pytest.approx(1.4)


# --- The SYN/ACK ------------------------------------------------------------------------------------


def test_synack_gives_the_repair_parameters():
    e = make_entry()
    hs = tk.Handshake(e, B_IP, now=1.0)
    hs.datagrams(1.0)
    p = hs.on_synack(view(synack(e, seq=0xFFFFFFF0, ack=e.body_start + 4000, window=501, tsval=42, tsecr=888888)),
                     1.0125)
    assert hs.state == tk.ANSWERED
    assert p.local == (B_IP, 80) and p.remote == (C_IP, 40000)
    assert p.rcv_nxt == 0xFFFFFFF0 and p.snd_nxt == e.body_start + 4000
    assert p.mss == 1460 and p.snd_wscale == 7 and p.rcv_wscale == 9 and p.sack and p.timestamps
    assert p.ts_val == 888890 and p.ts_val % 2 == 0  # TSecr + 1 rounded up to even
    assert p.snd_wnd == 501 << 7 and p.rcv_wnd == 65535 << 9
    assert hs.synack.rtt == pytest.approx(0.0125) and hs.synack.tsval == 42 and hs.synack.attempts == 1
    odd = tk.Handshake(e, B_IP, 0.0)
    odd.datagrams(0.0)
    assert odd.on_synack(view(synack(e, tsecr=888887)), 0.1).ts_val == 888888
    # a second answer (the client appliance answering a retransmission) is not ours any more
    assert hs.on_synack(view(synack(e)), 1.1) is None


def test_synack_rejections():
    e = make_entry()
    hs = tk.Handshake(e, B_IP, now=0.0)
    hs.datagrams(0.0)
    for bad in (synack(e, sport=40001), synack(e, src="10.0.0.9"), synack(e, dport=81), synack(e, dst="10.0.0.4"),
                synack(e, flags=fp.SYN), synack(e, flags=fp.ACK), synack(e, flags=fp.ACK | fp.PSH)):
        assert hs.on_synack(view(bad), 0.1) is None
        assert hs.state == tk.SENT
    assert hs.on_synack(view(synack(e, flags=fp.RST | fp.ACK)), 0.1) is None
    assert hs.state == tk.RESET and "reset" in hs.reason
    assert hs.on_synack(view(synack(e)), 0.2) is None  # too late
    late = tk.Handshake(e, B_IP, 0.0)
    assert late.expired(5.0) and late.on_synack(view(synack(e)), 5.0) is None


def test_synack_without_negotiated_options():
    e = make_entry(c_wscale=-1, s_wscale=9, c_ts=False, c_sack=False, c_mss=0)
    hs = tk.Handshake(e, B_IP, 0.0)
    hs.datagrams(0.0)
    p = hs.on_synack(view(synack(e, window=30000, tsval=None)), 0.1)
    assert p.snd_wscale is None and p.rcv_wscale is None
    assert p.snd_wnd == 30000 and p.rcv_wnd == 65535
    assert not p.sack and not p.timestamps and p.ts_val is None and p.mss == repair.DEFAULT_MSS
    # negotiated timestamps but the SYN/ACK has none: continue without (Linux accepts that)
    e2 = make_entry()
    hs2 = tk.Handshake(e2, B_IP, 0.0)
    hs2.datagrams(0.0)
    assert hs2.on_synack(view(synack(e2, tsval=None)), 0.1).timestamps is False


def test_handshake_refuses_mixed_families():
    with pytest.raises(ValueError):
        tk.Handshake(make_entry(), "2001:db8::1", 0.0)


# --- Where to resume ----------------------------------------------------------------------------------


def test_plan_resume_cases():
    e = make_entry()  # na + 1 = 50001, head 200 bytes, body 10000 bytes
    assert tk.plan_resume(e, e.body_start) == tk.Plan(tk.RESUME, 0, 10000)
    assert tk.plan_resume(e, e.body_start + 4321) == tk.Plan(tk.RESUME, 4321, 10000 - 4321)
    assert tk.plan_resume(e, e.body_start + 9999) == tk.Plan(tk.RESUME, 9999, 1)
    assert tk.plan_resume(e, e.body_start + 10000) == tk.Plan(tk.ADOPT)  # complete: idle keep-alive
    beyond = tk.plan_resume(e, e.body_start + 10500)
    assert beyond.kind == tk.ADOPT and beyond.beyond == 500
    assert tk.plan_resume(e, 50001) == tk.Plan(tk.WHOLE, 0, 10000)  # the response had not begun
    head = tk.plan_resume(e, 50001 + 10)
    assert head.kind == tk.REFUSE and head.reason.startswith("inside the response head")
    assert tk.plan_resume(e, e.body_start - 1).kind == tk.REFUSE
    idle = make_entry(state="IDLE", object=None, status=0, body_start=0, body_length=0)
    assert tk.plan_resume(idle, 12345).kind == tk.ADOPT


def test_plan_resume_across_the_2_32_wrap_and_ranges():
    na = 0xFFFFFF00  # the head starts before the wrap, the body after it
    e = make_entry(na=na, body_start=(na + 1 + 0x150) & 0xFFFFFFFF, body_offset=1000, body_length=5000,
                   status=206, req_range="bytes=1000-5999")
    assert e.body_start == 0x51
    assert tk.plan_resume(e, 0x51 + 7) == tk.Plan(tk.RESUME, 1007, 4993)
    assert tk.plan_resume(e, 0x10).kind == tk.REFUSE  # after the wrap, still inside the head
    assert tk.plan_resume(e, 0xFFFFFFF0).kind == tk.REFUSE  # before the wrap, inside the head
    assert tk.plan_resume(e, (na + 1) & 0xFFFFFFFF) == tk.Plan(tk.WHOLE, 1000, 5000)
    e2 = make_entry(na=0xFFFFFF00, body_start=0xFFFFFFFE, body_length=100)  # body across the wrap
    assert tk.plan_resume(e2, 0x20) == tk.Plan(tk.RESUME, 0x22, 100 - 0x22)
    assert tk.plan_resume(e2, (0xFFFFFFFE + 100) & 0xFFFFFFFF).kind == tk.ADOPT


def test_requests():
    e = make_entry(body_offset=1000, body_length=5000, status=206, req_range="bytes=1000-5999")
    assert tk.range_request(e, 1500, "b") == (b"GET /f.bin HTTP/1.1\r\nHost: example\r\nRange: bytes=1500-5999\r\n"
                                              b"Connection: keep-alive\r\n\r\n")
    assert b"Range: bytes=1000-5999\r\n" in tk.whole_request(e, "b")
    e2 = make_entry(object=ObjectRef("", "/x", None, None, 10))
    assert b"Host: b\r\n" in tk.whole_request(e2, "b") and b"Range" not in tk.whole_request(e2, "b")


# --- The local server and the 206 rules ------------------------------------------------------------


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    data = os.urandom(300_000)
    (root / "f.bin").write_bytes(data)
    (root / "small.txt").write_bytes(b"hello, again\n")
    srv = httpserver.make_server(str(root), "127.0.0.1", 0)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    st = os.stat(root / "f.bin")
    obj = ObjectRef("127.0.0.1", "/f.bin", httpserver.etag_for(st), httpserver.http_date(st.st_mtime), len(data))
    yield {"root": root, "data": data, "addr": ("127.0.0.1", srv.server_port), "obj": obj}
    srv.shutdown()
    srv.server_close()


def served_entry(docroot, **kw):
    return make_entry(client_ip=socket.inet_aton("127.0.0.1"), server_ip=socket.inet_aton("127.0.0.2"),
                      object=kw.pop("object", docroot["obj"]), body_length=kw.pop("body_length", len(docroot["data"])),
                      **kw)


def test_open_range_consumes_exactly_the_head(docroot):
    e = served_entry(docroot)
    sock, head = tk.open_range(docroot["addr"], e, 123_456)
    try:
        assert head.status == 206 and head.headers["content-length"] == str(300_000 - 123_456)
        got = bytearray()
        sock.settimeout(5)
        while len(got) < 300_000 - 123_456:
            chunk = sock.recv(65536)
            assert chunk
            got += chunk
        assert bytes(got) == docroot["data"][123_456:]
    finally:
        sock.close()


def test_open_range_of_a_range_response(docroot):
    e = served_entry(docroot, body_offset=1000, body_length=5000, status=206, req_range="bytes=1000-5999")
    sock, head = tk.open_range(docroot["addr"], e, 2000)
    sock.settimeout(5)
    got = sock.recv(65536, socket.MSG_WAITALL) if False else _recv_n(sock, 4000)
    sock.close()
    assert head.headers["content-range"] == "bytes 2000-5999/300000" and got == docroot["data"][2000:6000]


def _recv_n(sock, n):
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


@pytest.mark.parametrize("change, reason", [
    ({"etag": '"other"'}, "etag:"),
    ({"last_modified": "Tue, 02 Jan 2024 00:00:00 GMT"}, "last-modified:"),
    ({"total_length": 299_999}, "total:"),
])
def test_validators_must_match(docroot, change, reason):
    o = docroot["obj"]
    obj = ObjectRef(o.host, o.path, change.get("etag", o.etag), change.get("last_modified", o.last_modified),
                    change.get("total_length", o.total_length))
    e = served_entry(docroot, object=obj, body_length=min(obj.total_length, 300_000))
    with pytest.raises(tk.Refused) as ei:
        tk.open_range(docroot["addr"], e, 100)
    assert str(ei.value).startswith(reason), str(ei.value)


def test_validators_absent_in_the_entry_are_not_checked(docroot):
    o = docroot["obj"]
    e = served_entry(docroot, object=ObjectRef(o.host, o.path, None, None, o.total_length))
    sock, head = tk.open_range(docroot["addr"], e, 10)
    sock.close()
    assert head.status == 206


def test_missing_object_and_dead_server(docroot):
    o = docroot["obj"]
    e = served_entry(docroot, object=ObjectRef(o.host, "/nope.bin", o.etag, o.last_modified, o.total_length))
    with pytest.raises(tk.Refused, match="status: local server answered 404"):
        tk.open_range(docroot["addr"], e, 10)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(tk.Refused, match="refused"):
        tk.open_range(("127.0.0.1", port), served_entry(docroot), 10)


class Scripted:
    """A one-shot server on 127.0.0.1 that answers each connection with scripted chunks."""

    def __init__(self, *chunks, pause=0.05, close=True):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.addr = self.lsock.getsockname()
        self.chunks, self.pause, self.close = chunks, pause, close
        self.requests = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        self.lsock.settimeout(5)
        try:
            conn, _ = self.lsock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            self.requests.append(conn.recv(65536))
            for c in self.chunks:
                conn.sendall(c)
                time.sleep(self.pause)
            if not self.close:
                time.sleep(1)
        self.lsock.close()


def _head(status=206, cr="bytes 100-9999/10000", cl="9900", etag='"e1"', lm="Mon, 01 Jan 2024 00:00:00 GMT",
          extra=""):
    lines = [f"HTTP/1.1 {status} X"]
    for name, value in (("Content-Range", cr), ("Content-Length", cl), ("ETag", etag), ("Last-Modified", lm)):
        if value is not None:
            lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


@pytest.mark.parametrize("head, reason", [
    (_head(status=200, cr=None, cl="10000"), "status: local server answered 200"),
    (_head(status=416, cr="bytes */10000", cl="0"), "status: local server answered 416"),
    (_head(cr="bytes 101-9999/10000", cl="9899"), "first byte:"),
    (_head(cr="bytes 100-9998/10000", cl="9899"), "last byte:"),
    (_head(cr="bytes 100-9999/20000"), "total:"),
    (_head(cr=None), "content-range:"),
    (_head(cl="9000"), "content-length:"),
    (_head(cl=None, extra="Transfer-Encoding: chunked\r\n"), "transfer-encoding:"),
    (_head(extra="Transfer-Encoding: chunked\r\n"), "local server: unparsable"),  # httptools: TE with CL
    (_head(etag='W/"e1"'), "etag:"),
    (_head(etag=None), "etag:"),
    (_head(lm=None), "last-modified:"),
    (b"garbage\r\n\r\n", "local server: unparsable"),
])
def test_206_rules(head, reason):
    srv = Scripted(head + b"x" * 100)
    e = make_entry(object=ObjectRef("h", "/f.bin", '"e1"', "Mon, 01 Jan 2024 00:00:00 GMT", 10000))
    with pytest.raises(tk.Refused) as ei:
        tk.open_range(srv.addr, e, 100, timeout=3)
    assert str(ei.value).startswith(reason), str(ei.value)
    assert srv.requests[0].startswith(b"GET /f.bin HTTP/1.1\r\n") and b"Range: bytes=100-9999\r\n" in srv.requests[0]


def test_head_split_across_segments_and_early_close():
    good = _head()
    srv = Scripted(good[:20], good[20:40], good[40:] + b"BODY", pause=0.05, close=False)
    e = make_entry(object=ObjectRef("h", "/f.bin", '"e1"', "Mon, 01 Jan 2024 00:00:00 GMT", 10000))
    t0 = time.monotonic()
    sock, head = tk.open_range(srv.addr, e, 100, timeout=3)
    sock.settimeout(2)
    assert sock.recv(4) == b"BODY" and head.length == len(good)
    assert time.monotonic() - t0 < 1.5
    sock.close()
    srv2 = Scripted(b"HTTP/1.1 206 Partial\r\nContent-")
    with pytest.raises(tk.Refused, match="closed the connection before a response head"):
        tk.open_range(srv2.addr, e, 100, timeout=3)
    srv3 = Scripted(b"HTTP/1.1 206 Partial\r\n", close=False, pause=0.0)
    with pytest.raises(tk.Refused, match="in time"):
        tk.open_range(srv3.addr, e, 100, timeout=0.3)


# --- The relay -----------------------------------------------------------------------------------------


def tcp_pair():
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    return a, b


def run_relay(**kw):
    c_app, c_peer = tcp_pair()  # c_app: what the engine holds (the repaired socket); c_peer: the client
    l_app, l_peer = tcp_pair()  # l_app: the engine's local connection; l_peer: the local server
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("res", tk.relay(c_app, l_app, **kw)), daemon=True)
    th.start()
    return c_app, c_peer, l_app, l_peer, th, out


def test_relay_both_ways_until_the_local_side_closes():
    data = os.urandom(3 << 20)
    seen = []
    c_app, c_peer, l_app, l_peer, th, out = run_relay(on_client_bytes=seen.append)
    threading.Thread(target=lambda: (l_peer.sendall(data)), daemon=True).start()
    c_peer.settimeout(5)
    assert _recv_n(c_peer, len(data)) == data
    c_peer.sendall(b"GET /next HTTP/1.1\r\n\r\n")
    l_peer.settimeout(5)
    assert _recv_n(l_peer, 22) == b"GET /next HTTP/1.1\r\n\r\n"
    l_peer.sendall(b"last words")
    l_peer.close()
    assert _recv_n(c_peer, 10) == b"last words"
    th.join(5)
    res = out["res"]
    assert res == tk.RelayResult(len(data) + 10, 22, "local closed")
    assert seen[-1] == len(data) + 10 and seen == sorted(seen)
    for s in (c_app, c_peer, l_app):
        s.close()


def test_relay_passes_the_client_fin_on_and_waits_for_the_local_answer():
    c_app, c_peer, l_app, l_peer, th, out = run_relay()
    c_peer.sendall(b"request")
    c_peer.shutdown(socket.SHUT_WR)
    l_peer.settimeout(5)
    assert _recv_n(l_peer, 100) == b"request"  # then EOF: the FIN was passed on
    l_peer.sendall(b"answer")
    l_peer.close()
    c_peer.settimeout(5)
    assert _recv_n(c_peer, 6) == b"answer"
    th.join(5)
    assert out["res"].end == "local closed"
    for s in (c_app, c_peer, l_app):
        s.close()


def test_relay_ends_on_reset_idle_and_stop():
    c_app, c_peer, l_app, l_peer, th, out = run_relay()
    c_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c_peer.close()  # the client resets
    th.join(5)
    assert out["res"].end.startswith("client error"), out["res"]
    for s in (c_app, l_app, l_peer):
        s.close()

    c_app, c_peer, l_app, l_peer, th, out = run_relay(idle_timeout=0.2, tick=0.05)
    th.join(5)
    assert out["res"].end == "idle"
    for s in (c_app, c_peer, l_app, l_peer):
        s.close()

    stop = threading.Event()
    c_app, c_peer, l_app, l_peer, th, out = run_relay(stop=stop, tick=0.05)
    stop.set()
    th.join(5)
    assert out["res"].end == "stopped"
    for s in (c_app, c_peer, l_app, l_peer):
        s.close()


# --- The SYN/ACK filter on a real raw socket ------------------------------------------------------------


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@needs_root
def test_synack_filter_admits_only_synacks_and_rsts_to_the_service_ports():
    from appliance.inject import RawInjector

    port, other = _free_port(), _free_port()
    rx = tk._Receiver(socket.AF_INET, [port])
    inj = RawInjector()
    try:
        marks = {"synack": 0x11110001, "rst": 0x11110002, "ack": 0x11110003, "other_port": 0x11110004,
                 "syn": 0x11110005}
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", 45000, port, marks["ack"], 1, fp.ACK))
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", 45000, port, marks["syn"], 0, fp.SYN))
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", 45000, other, marks["other_port"], 1, fp.SYN | fp.ACK))
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", 45000, port, marks["synack"], 1, fp.SYN | fp.ACK))
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", 45000, port, marks["rst"], 1, fp.RST | fp.ACK))
        got = set()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not {"synack", "rst"} <= got:
            for p in rx.read(64):
                v = view(p)
                for name, seq in marks.items():
                    if v.seq == seq and v.sport == 45000:
                        got.add(name)
            time.sleep(0.01)
        time.sleep(0.05)
        for p in rx.read(64):
            v = view(p)
            got.update(n for n, s in marks.items() if v.seq == s and v.sport == 45000)
        assert got == {"synack", "rst"}
    finally:
        rx.close()
        inj.close()


def test_filter_program_shape():
    prog = tk.synack_filter([80, 8080])
    assert prog[-1] == (0x06, 0, 0, 0) and prog[-2][0] == 0x06 and prog[-2][3] > 0
    for i, (code, jt, jf, k) in enumerate(prog):  # every jump lands inside the program
        if code & 0x07 == 0x05:  # BPF_JMP
            assert i + 1 + jt < len(prog) and i + 1 + jf < len(prog)
    assert tk.synack_filter([80], ipv4=False)[0] == (0x01, 0, 0, 0)
    with pytest.raises(ValueError):
        tk.synack_filter([])


# --- The engine on loopback (plain sockets stand in for the repaired one) --------------------------------


class FakeInjector:
    def __init__(self):
        self.packets = []

    def send(self, packet):
        self.packets.append(bytes(packet))
        return True

    def close(self):
        pass


class FakeClient:
    """The 'client' end: the engine's socket factory connects here instead of repairing."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.params = []
        self.peer = None

    def factory(self, **params):
        self.params.append(params)
        s = socket.create_connection(self.lsock.getsockname())
        self.peer, _ = self.lsock.accept()
        self.peer.settimeout(5)
        return s

    def close(self):
        self.lsock.close()
        if self.peer is not None:
            self.peer.close()


def make_engine(docroot, client, events, **kw):
    return tk.TakeoverEngine("127.0.0.1", [80], docroot["addr"][1], lambda kind, **f: events.append((kind, f)),
                             injector=kw.pop("injector", FakeInjector()), receiver=kw.pop("receiver", False),
                             socket_factory=client.factory, **kw)


def wait_for(events, kind, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for k, f in list(events):
            if k == kind:
                return f
        time.sleep(0.005)
    raise AssertionError(f"no {kind} event in {[k for k, _ in events]}")


def test_engine_resumes_a_download_and_proxies_the_next_request(docroot):
    events, client = [], FakeClient()
    eng = make_engine(docroot, client, events)
    e = served_entry(docroot, na=0xFFFFFE00, body_start=0xFFFFFF00)  # resumes across the 2**32 wrap
    try:
        assert eng.start(TakeoverAction(e.key, e, "a", 1, 0, 0.0), now=time.monotonic())
        assert not eng.start(e)  # already in progress: counted, ignored
        [syn] = eng.injector.packets
        v = view(syn)
        assert v.dport == 40000 and v.sport == 80 and v.opts & fp.HAS_MIGRATE
        ack = (e.body_start + 200_000) & 0xFFFFFFFF
        assert eng.feed(synack(e, ack=ack, src="127.0.0.1", dst="127.0.0.1"))
        p = client.params[0]
        assert p["snd_nxt"] == ack and p["local"] == ("127.0.0.1", 80) and p["remote"] == ("127.0.0.1", 40000)
        got = _recv_n(client.peer, 100_000)
        assert got == docroot["data"][200_000:]
        wait_for(events, "body_sent")
        client.peer.sendall(b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = client.peer.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello, again\n")
        client.peer.close()
        client.peer = None
        done = wait_for(events, "done")
        kinds = [k for k, _ in events]
        assert kinds == ["migrate_syn_sent", "synack", "repaired", "resumed", "first_byte", "body_sent", "done"]
        resumed = dict(events)["resumed"]
        assert resumed["mode"] == "resume" and resumed["offset"] == 200_000 and resumed["bytes_left"] == 100_000
        assert done["bytes"] == 100_000 + len(answer) and done["bytes_from_client"] > 0
        for _, f in events:
            assert f["client"] == "127.0.0.1" and f["client_port"] == 40000 and f["server"] == "127.0.0.2"
            assert "mono" in f and "wall" in f
        c = eng.counters()
        assert c["resumed"] == 1 and c["done"] == 1 and c["duplicates"] == 1 and c["active"] == 0
        assert eng.snapshot()["finished"][0]["phase"] == "done"
    finally:
        eng.close()
        client.close()


def test_engine_refuses_on_a_different_etag_with_a_reset(docroot):
    events, client = [], FakeClient()
    eng = make_engine(docroot, client, events)
    o = docroot["obj"]
    e = served_entry(docroot, object=ObjectRef(o.host, o.path, '"changed"', o.last_modified, o.total_length))
    try:
        eng.start(e)
        eng.feed(synack(e, ack=e.body_start + 10, src="127.0.0.1", dst="127.0.0.1"))
        refused = wait_for(events, "refused")
        assert refused["reason"].startswith("etag:")
        with pytest.raises(ConnectionResetError):
            client.peer.recv(10)
        assert eng.counters()["refused"] == 1 and eng.active() == []
    finally:
        eng.close()
        client.close()


def test_engine_inside_head_adopt_and_whole(docroot):
    events, client = [], FakeClient()
    eng = make_engine(docroot, client, events)
    try:
        e = served_entry(docroot)
        eng.start(e)
        eng.feed(synack(e, ack=e.body_start - 5, src="127.0.0.1", dst="127.0.0.1"))
        assert wait_for(events, "refused")["reason"].startswith("inside the response head")
        with pytest.raises(ConnectionResetError):
            client.peer.recv(10)

        events.clear()
        e2 = served_entry(docroot, client_port=40002)
        eng.start(e2)
        eng.feed(synack(e2, ack=e2.na + 1, src="127.0.0.1", dst="127.0.0.1"))
        assert wait_for(events, "resumed")["mode"] == "whole"
        head = client.peer.recv(4096, socket.MSG_PEEK)
        assert head.startswith(b"HTTP/1.1 200 OK")
        hl = head.index(b"\r\n\r\n") + 4
        assert _recv_n(client.peer, hl + 300_000)[hl:] == docroot["data"]

        events.clear()
        e3 = served_entry(docroot, client_port=40003, state="IDLE", object=None, status=0, body_start=0,
                          body_length=0)
        eng.start(e3)
        eng.feed(synack(e3, ack=999, src="127.0.0.1", dst="127.0.0.1"))
        assert wait_for(events, "resumed")["mode"] == "adopt"
        client.peer.sendall(b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.peer.recv(4096).endswith(b"hello, again\n")
    finally:
        eng.close()
        client.close()


def test_engine_gives_up_and_handles_the_clients_rst(docroot):
    events, client = [], FakeClient()
    eng = make_engine(docroot, client, events)
    try:
        e = served_entry(docroot)
        t0 = 1000.0
        eng.start(e, now=t0)
        for dt in (0.1, 0.2, 0.6, 1.4, 2.9):
            eng.poll(t0 + dt)
        assert [f["attempt"] for k, f in events if k == "migrate_syn_sent"] == [1, 2, 3, 4]
        assert eng.next_deadline() == pytest.approx(t0 + 3.0)
        eng.poll(t0 + 3.0)
        assert events[-1][0] == "failed" and "no SYN/ACK" in events[-1][1]["reason"]
        assert eng.active() == [] and eng.next_deadline() is None

        events.clear()
        e2 = served_entry(docroot, client_port=40009)
        eng.start(e2)
        eng.feed(synack(e2, flags=fp.RST | fp.ACK, src="127.0.0.1", dst="127.0.0.1"))
        assert events[-1][0] == "failed" and "reset" in events[-1][1]["reason"]
        assert not eng.start(served_entry(docroot, client_port=40010, mp=False))
        assert "Migrate-Permitted" in events[-1][1]["reason"]
        assert client.params == []
        c = eng.counters()
        assert c["failed"] == 3 and c["retransmissions"] == 3
    finally:
        eng.close()
        client.close()


def test_engine_repair_error_is_a_failure(docroot):
    events = []

    class Broken(FakeClient):
        def factory(self, **params):
            raise repair.RepairError(99, "the 4-tuple is taken", "connect")

    client = Broken()
    eng = make_engine(docroot, client, events)
    try:
        e = served_entry(docroot)
        eng.start(e)
        eng.feed(synack(e, src="127.0.0.1", dst="127.0.0.1"))
        assert events[-1][0] == "failed" and "taken" in events[-1][1]["reason"]
    finally:
        eng.close()
        client.close()


@needs_root
def test_engine_on_asyncio_receives_the_synack_on_its_raw_socket(docroot):
    from appliance.inject import RawInjector

    events, client = [], FakeClient()
    port = _free_port()
    inj = FakeInjector()
    eng = tk.TakeoverEngine("127.0.0.1", [port], docroot["addr"][1], lambda kind, **f: events.append((kind, f)),
                            injector=inj, socket_factory=client.factory, initial_rto=0.05, give_up=2.0)
    e = served_entry(docroot, server_port=port)
    sender = RawInjector()

    async def main():
        eng.attach(asyncio.get_running_loop())
        eng.start(e)
        await asyncio.sleep(0.12)  # two retransmissions on the loop's timer
        sender.send(synack(e, ack=e.body_start + 299_000, src="127.0.0.1", dst="127.0.0.1", dport=port))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(k == "body_sent" for k, _ in events):
            await asyncio.sleep(0.01)
        eng.detach()

    try:
        asyncio.run(main())
        kinds = [k for k, _ in events]
        assert kinds.count("migrate_syn_sent") >= 2 and "synack" in kinds
        assert _recv_n(client.peer, 1000) == docroot["data"][299_000:]
        assert threading.current_thread() is threading.main_thread()
    finally:
        eng.close()
        sender.close()
        client.close()


# --- IPv6 ------------------------------------------------------------------------------------------------


def test_ipv6_handshake_in_memory():
    e = make_entry(client_ip=socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
                   server_ip=socket.inet_pton(socket.AF_INET6, "2001:db8::2"))
    hs = tk.Handshake(e, "2001:db8::3", 0.0)
    v = view(hs.datagrams(0.0)[0])
    assert v.ip_version == 6 and v.flags == fp.SYN and v.opts & fp.HAS_MIGRATE
    assert (v.src_ip, v.dst_ip, v.dport) == ("2001:db8::3", "2001:db8::1", 40000)
    p = hs.on_synack(view(synack(e, src="2001:db8::1", dst="2001:db8::3")), 0.01)
    assert p.local == ("2001:db8::3", 80) and p.remote == ("2001:db8::1", 40000)


@needs_root
def test_ipv6_receiver_rebuilds_the_ip_header():
    from appliance.inject import RawInjector

    port = _free_port()
    try:
        rx = tk._Receiver(socket.AF_INET6, [port])
    except OSError as exc:
        pytest.skip(f"no IPv6 raw socket here: {exc}")
    inj = RawInjector()
    try:
        inj.send(fp.build_tcp("::1", "::1", 45001, port, 0x22220001, 5, fp.SYN | fp.ACK))
        inj.send(fp.build_tcp("::1", "::1", 45001, port, 0x22220002, 5, fp.ACK))
        got = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not got:
            got += [view(p) for p in rx.read(64)]
            time.sleep(0.01)
        mine = [v for v in got if v.sport == 45001]
        assert [v.seq for v in mine] == [0x22220001]
        v = mine[0]
        assert v.is_tcp and v.src_ip == "::1" and v.dst_ip == "::1" and v.dport == port
    finally:
        rx.close()
        inj.close()


def test_engine_abort_and_close(docroot):
    events, client = [], FakeClient()
    eng = make_engine(docroot, client, events)
    try:
        e = served_entry(docroot)
        eng.start(e)
        assert eng.abort(e.key, "race lost") and events[-1][0] == "failed"
        assert events[-1][1]["reason"] == "race lost" and eng.active() == []
        assert not eng.abort(e.key)

        events.clear()
        e2 = served_entry(docroot, client_port=40020, state="IDLE", object=None, status=0, body_start=0,
                          body_length=0)
        eng.start(e2)
        eng.feed(synack(e2, src="127.0.0.1", dst="127.0.0.1"))
        wait_for(events, "resumed")
        assert eng.abort(e2.key, "operator")
        done = wait_for(events, "done")
        assert done["end"] == "stopped"
        with pytest.raises(ConnectionResetError):
            client.peer.recv(10)
        assert eng.snapshot()["finished"][-1]["reason"] == "operator"

        events.clear()
        e3 = served_entry(docroot, client_port=40021)
        eng.start(e3)
        eng.close()
        assert events[-1][0] == "failed" and events[-1][1]["reason"] == "engine closed"
        assert not eng.start(served_entry(docroot, client_port=40022))
    finally:
        eng.close()
        client.close()


def test_owned_entry_is_as_with_bs_address_and_the_reqno_used():
    e = make_entry(reqno=3)
    b = socket.inet_aton(B_IP)
    o = tk.owned_entry(e, b, 8080, 4)
    assert o.key == (e.client_ip, 40000, b, 8080) and o.reqno == 4
    assert (o.ni, o.na, o.body_start, o.body_offset, o.body_length, o.object) == \
        (e.ni, e.na, e.body_start, 0, 10000, e.object)
    head = tk.parse_head(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 50\r\nContent-Range: bytes 10-59/900\r\n"
                         b"ETag: \"b\"\r\n\r\n")
    w = tk.owned_entry(e, b, 80, 4, head)
    assert (w.status, w.body_start, w.body_offset, w.body_length) == (206, e.na + 1 + head.length, 10, 50)
    assert w.object.total_length == 900 and w.object.etag == '"b"' and w.object.last_modified is None
    chunked = tk.parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert tk.owned_entry(e, b, 80, 4, chunked) is None


def test_engine_reports_what_it_now_owns(docroot):
    events, client, owned, released = [], FakeClient(), [], []
    eng = make_engine(docroot, client, events, on_owned=owned.append, on_released=released.append)
    try:
        e = served_entry(docroot, reqno=9)
        eng.start(e)
        eng.feed(synack(e, ack=e.body_start + 250_000, src="127.0.0.1", dst="127.0.0.1"))
        assert _recv_n(client.peer, 50_000) == docroot["data"][250_000:]
        wait_for(events, "body_sent")
        [o] = owned
        assert o.reqno == 10 and o.server_ip == socket.inet_aton("127.0.0.1") and o.server_port == 80
        assert eng.owned_entries() == [o] and released == []
        client.peer.sendall(b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n")  # a later request: stale now
        assert client.peer.recv(4096).endswith(b"hello, again\n")
        assert released == [o] and eng.owned_entries() == []
        client.peer.close()
        client.peer = None
        wait_for(events, "done")
        assert released == [o]

        e2 = served_entry(docroot, client_port=40030)
        eng.start(e2)
        eng.feed(synack(e2, ack=e2.na + 1, src="127.0.0.1", dst="127.0.0.1"))
        deadline = time.monotonic() + 5
        while len(owned) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        w = owned[1]
        head = client.peer.recv(4096, socket.MSG_PEEK)
        assert w.body_start == (e2.na + 1 + head.index(b"\r\n\r\n") + 4) & 0xFFFFFFFF
        assert w.status == 200 and w.body_length == 300_000 and w.object.etag == docroot["obj"].etag
    finally:
        eng.close()
        client.close()


def test_interface_ipv4():
    assert tk.interface_ipv4("lo") == "127.0.0.1"
    with pytest.raises(OSError):
        tk.interface_ipv4("no-such-if0")


@needs_root
def test_ack_watch_sees_only_the_clients_segments_to_the_repaired_tuple():
    from appliance.inject import RawInjector

    lport, cport = _free_port(), _free_port()
    lo = socket.inet_aton("127.0.0.1")
    w = tk._AckWatch(lo, cport, lo, lport)
    inj = RawInjector()
    try:
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", cport, lport, 0x33330001, 7, fp.SYN))  # no ACK flag
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", cport + 1, lport, 0x33330002, 7, fp.ACK))  # other port
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", cport, lport, 0x33330003, 0x44440003, fp.ACK, 300,
                              bytes((1, 1)) + fp.opt_timestamps(5, 6)))
        got = w.first_ack(time.monotonic() + 2)
        assert got == tk.ClientAck(0x33330003, 0x44440003, 300, 5, 6)
        assert w.first_ack(time.monotonic() + 0.05) is None
    finally:
        w.close()
        inj.close()
    prog = tk.tuple_filter(lo, cport, lport)
    assert prog[-1] == (0x06, 0, 0, 0) and all(i + 1 + jf < len(prog) for i, (c, jt, jf, k) in enumerate(prog)
                                               if c & 0x07 == 0x05)
