"""The takeover engine on one asyncio loop, against a real local HTTP server on loopback: the
engine's socket factory is a plain loopback connection standing in for the repaired socket,
so checking, fetching, resuming and relaying run for real. Refuse before you claim (pass, or
reset when last), Migrate RSTs whenever a takeover cannot go on, the bytes above a hole
queued as sent, the digest level, the queue beyond max_active, abort and close.

The kernel side (TCP_REPAIR in namespaces, a stand-in client appliance) is in
tests/lab/test_repair_ns.py; the raw sockets in tests/test_rawsock.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading
import time

import pytest

import _fastpath as fp
from appliance import handshake as hs
from appliance import httpserver
from appliance import repair
from appliance import rawsock as rs
from appliance import takeover as tk
from appliance.handshake import PROBE_BEHIND, SYNACK_EXACT
from appliance.selection import TakeoverAction
from appliance.sync import Entry, ObjectRef

SIZE = 300_000


@pytest.fixture(scope="module")
def docroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("docroot")
    data = os.urandom(SIZE)
    (root / "f.bin").write_bytes(data)
    (root / "small.txt").write_bytes(b"hello, again\n")
    srv = httpserver.make_server(str(root), "127.0.0.1", 0)
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    st = os.stat(root / "f.bin")
    obj = ObjectRef("127.0.0.1", "/f.bin", httpserver.etag_for(st), httpserver.http_date(st.st_mtime), SIZE,
                    hashlib.sha256(data).digest())
    yield {"root": root, "data": data, "addr": ("127.0.0.1", srv.server_port), "obj": obj}
    srv.shutdown()
    srv.server_close()


def entry(docroot, **kw) -> Entry:
    base = dict(client_ip=socket.inet_aton("127.0.0.1"), client_port=40000, server_ip=socket.inet_aton("127.0.0.2"),
                server_port=80, ni=1000, na=50000, c_mss=1460, c_wscale=7, c_sack=True, c_ts=True, s_mss=1460,
                s_wscale=9, s_sack=True, s_ts=True, mp=True, reqno=0, state="ACTIVE", object=docroot["obj"],
                req_range=None, status=200, body_start=50201, body_offset=0, body_length=SIZE)
    base.update(kw)
    return Entry(**base)


def action(e, last=True, rank=0):
    return TakeoverAction(e.key, e, "a", 1, rank, 0.0, last=last, candidates=("b",))


def synack(e, ack, flags=fp.SYN | fp.ACK, sack=(), urgent=0):
    opts = bytes((1, 1)) + fp.opt_timestamps(777, 888888)
    if sack:
        opts += bytes((1, 1)) + fp.opt_sack(sack)
    return fp.build_tcp("127.0.0.1", "127.0.0.1", e.client_port, 80, 1234, ack, flags, 501, opts, urgent=urgent)


class FakeInjector:
    def __init__(self):
        self.packets = []

    def send(self, packet):
        self.packets.append(bytes(packet))
        return True

    def close(self):
        pass

    def of(self, flags):
        return [fp.parse(p, fp.LINK_RAW) for p in self.packets if fp.parse(p, fp.LINK_RAW).flags & flags]


class FakeClient:
    """The client end: the socket factory connects here instead of repairing a socket."""

    def __init__(self):
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.params = []
        self.peers = []

    def factory(self, sent=b"", blocking=True, **params):
        self.params.append(dict(params, sent=sent))
        s = socket.create_connection(self.lsock.getsockname())
        peer, _ = self.lsock.accept()
        peer.settimeout(5)
        self.peers.append(peer)
        s.setblocking(blocking)
        return s

    @property
    def peer(self):
        return self.peers[-1]

    def close(self):
        self.lsock.close()
        for p in self.peers:
            p.close()


def recv_n(sock, n):
    got = bytearray()
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return bytes(got)


class World:
    def __init__(self, docroot, **kw):
        self.events, self.claims, self.passes, self.owned, self.released = [], [], [], [], []
        self.client = FakeClient()
        self.injector = FakeInjector()
        self.eng = tk.TakeoverEngine(
            "127.0.0.1", [80], docroot["addr"][1], lambda kind, **f: self.events.append((kind, f)),
            injector=self.injector, receiver=False, socket_factory=self.client.factory,
            on_claim=self.claims.append, on_pass=self.passes.append,
            on_owned=lambda e, r, s: self.owned.append((e, r, s)), on_released=self.released.append, **kw)
        self.eng.attach(asyncio.get_running_loop())

    async def event(self, kind, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for k, f in list(self.events):
                if k == kind:
                    return f
            await asyncio.sleep(0.005)
        raise AssertionError(f"no {kind} event in {[k for k, _ in self.events]}")

    async def events_of(self, kind, n, timeout=5.0):
        """Wait until n events of this kind have been seen."""
        deadline = time.monotonic() + timeout
        while sum(k == kind for k, _ in self.events) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} {kind} events in {[k for k, _ in self.events]}")
            await asyncio.sleep(0.005)

    async def handshake(self, e, ack, **kw):
        """Wait for the Migrate SYN, then answer it."""
        await self.event("migrate_syn_sent")
        assert self.eng.feed(synack(e, ack, **kw))

    async def peer(self, n=1):
        """The client end of the n-th repaired socket, once it exists."""
        deadline = time.monotonic() + 5
        while len(self.client.peers) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return self.client.peers[n - 1]

    def kinds(self):
        return [k for k, _ in self.events]

    async def close(self):
        await self.eng.aclose()
        self.client.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_resumes_a_download_and_proxies_the_next_request(docroot):
    async def main():
        w = World(docroot)
        e = entry(docroot, na=0xFFFFFE00, body_start=0xFFFFFF00)  # resumes across the 2**32 wrap
        try:
            assert w.eng.start(action(e))
            assert not w.eng.start(e)  # already in progress: counted, ignored
            ack = (e.body_start + 200_000) & 0xFFFFFFFF
            await w.handshake(e, ack)
            got = await asyncio.to_thread(recv_n, await w.peer(), SIZE - 200_000)
            assert got == docroot["data"][200_000:]
            p = w.client.params[0]
            assert p["snd_nxt"] == ack and p["local"] == ("127.0.0.1", 80) and p["sent"] == b""
            await w.event("body_sent")
            w.client.peer.sendall(b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await asyncio.to_thread(w.client.peer.recv, 4096)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello, again\n")
            [(owned, rcv_nxt, snd_nxt)] = w.owned
            assert owned.reqno == 1 and owned.server_ip == socket.inet_aton("127.0.0.1") and snd_nxt == ack
            assert owned.state == "ACTIVE" and rcv_nxt == 1234 and w.claims and not w.passes
            w.client.peer.close()
            done = await w.event("done")
            assert done["bytes"] == SIZE - 200_000 + len(answer)
            assert w.kinds() == ["claimed", "checked", "migrate_syn_sent", "synack", "repaired", "resumed",
                                 "outcome", "first_byte", "body_sent", "done"]
            assert dict(w.events)["outcome"]["outcome"] == "resumed"
            assert w.released == [owned]
            c = w.eng.counters()
            assert c["resumed"] == 1 and c["done"] == 1 and c["duplicates"] == 1 and c["active"] == 0
            assert c["checks"] == 1 and c["outcome_resumed"] == 1
        finally:
            await w.close()
    run(main())


def test_claim_then_refuse_passes_on_or_resets_when_last(docroot):
    """Another version of the object here: a candidate that is not last claims at once, then
    passes (withdrawing the claim) without a Migrate SYN; the last one learns the client's
    position and sends a Migrate RST."""
    async def main():
        w = World(docroot)
        o = docroot["obj"]
        other = ObjectRef(o.host, o.path, '"other"', o.last_modified, o.total_length)
        try:
            e = entry(docroot, object=other)
            assert w.eng.start(action(e, last=False))
            out = await w.event("outcome")
            assert out["outcome"] == "passed" and out["reason"].startswith("etag:")
            assert w.passes == w.claims == [w.passes[0]] and w.injector.packets == []
            w.events.clear()
            e2 = entry(docroot, object=other, client_port=40001)
            w.eng.start(action(e2, last=True))
            await w.handshake(e2, e2.body_start + 5000)
            out = await w.event("outcome")
            assert out["outcome"] == "reset" and "no member can serve it" in out["reason"]
            [rst] = w.injector.of(fp.RST)[:1]
            assert rst.opts & fp.HAS_MIGRATE and rst.migrate_preload and rst.seq == e2.body_start + 5000
            assert rst.migrate_request == fp.migrate_request(e2.ni, e2.na, b"", rst.seq, 1)
            assert w.client.params == []  # never repaired
            assert w.eng.counters()["checks_cached"] == 1  # the same object: checked once
        finally:
            await w.close()
    run(main())


def test_reset_only_pending_idle_and_inside_head(docroot):
    async def main():
        w = World(docroot)
        try:
            # a RESET entry (e.g. chunked): claimed at once, the client reset at its position
            r = entry(docroot, state="RESET", object=None, status=0, body_start=0, body_length=0,
                      reason="chunked transfer-encoding")
            w.eng.start(action(r))
            await w.handshake(r, 77777)
            out = await w.event("outcome")
            assert out["outcome"] == "reset" and "chunked" in out["reason"]
            assert w.injector.of(fp.RST)[0].seq == 77777
            # a PENDING request: answered whole by this server
            w.events.clear()
            p = entry(docroot, client_port=40002, state="PENDING",
                      object=ObjectRef("127.0.0.1", "/f.bin", None, None, 0), status=0, body_start=90000,
                      body_length=0)
            w.eng.start(action(p))
            await w.handshake(p, 90000)
            assert (await w.event("resumed"))["mode"] == "whole"
            head = await asyncio.to_thread((await w.peer(1)).recv, 4096, socket.MSG_PEEK)
            hl = head.index(b"\r\n\r\n") + 4
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert (await asyncio.to_thread(recv_n, w.client.peer, hl + SIZE))[hl:] == docroot["data"]
            assert w.owned[-1][0].state == "PENDING" and w.owned[-1][0].body_start == 90000
            # IDLE: adopted, later requests relayed
            w.events.clear()
            i = entry(docroot, client_port=40003, state="IDLE", object=None, status=0, body_start=0, body_length=0)
            w.eng.start(action(i))
            await w.handshake(i, 999)
            assert (await w.event("resumed"))["mode"] == "adopt"
            (await w.peer(2)).sendall(b"GET /small.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.to_thread(w.client.peer.recv, 4096)).endswith(b"hello, again\n")
            # the client is inside the response head: nobody can splice there: reset
            w.events.clear()
            h = entry(docroot, client_port=40004)
            w.eng.start(action(h))
            await w.handshake(h, h.body_start - 5)
            out = await w.event("outcome")
            assert out["outcome"] == "reset" and out["reason"].startswith("inside the response head")
        finally:
            await w.close()
    run(main())


def test_bytes_above_a_hole_are_queued_as_sent(docroot):
    async def main():
        w = World(docroot)
        e = entry(docroot)
        try:
            w.eng.start(action(e))
            ack = e.body_start + 100_000
            await w.handshake(e, ack, sack=[(ack + 20_000, ack + 50_000)])
            await w.event("resumed")
            p = w.client.params[0]
            assert p["snd_nxt"] == ack and p["sent"] == docroot["data"][100_000:150_000]
            # what goes out is what follows the held bytes
            got = await asyncio.to_thread(recv_n, await w.peer(), SIZE - 150_000)
            assert got == docroot["data"][150_000:]
            assert dict(w.events)["repaired"]["held_above"] == 50_000
        finally:
            await w.close()
    run(main())


def test_digest_level(docroot):
    async def main():
        good = docroot["obj"].digest
        w = World(docroot, validators="digest", digest_of=lambda path: good)
        o = docroot["obj"]
        try:
            e = entry(docroot)
            w.eng.start(action(e))
            await w.handshake(e, e.body_start + 299_000)
            assert await asyncio.to_thread(recv_n, await w.peer(), 1000) == docroot["data"][299_000:]
            # same headers, other bytes advertised: never spliced
            w.events.clear()
            bad = ObjectRef(o.host, o.path, o.etag, o.last_modified, o.total_length, hashlib.sha256(b"x").digest())
            e2 = entry(docroot, client_port=40005, object=bad)
            w.eng.start(action(e2, last=False))
            out = await w.event("outcome")
            assert out["outcome"] == "passed" and out["reason"] == "digest: this replica's copy has other bytes"
        finally:
            await w.close()
    run(main())


def test_failures_no_synack_client_rst_local_server_down(docroot):
    async def main():
        w = World(docroot, initial_rto=0.05, give_up=0.3)
        try:
            e = entry(docroot)
            w.eng.start(action(e))
            out = await w.event("outcome")
            assert out["outcome"] == "failed" and "no SYN/ACK" in out["reason"]
            assert w.eng.counters()["retransmissions"] >= 2
            w.events.clear()
            e2 = entry(docroot, client_port=40009)
            w.eng.start(action(e2))
            await w.handshake(e2, 1, flags=fp.RST | fp.ACK)
            assert "refused the Migrate SYN" in (await w.event("outcome"))["reason"]
            w.events.clear()
            assert not w.eng.start(entry(docroot, client_port=40010, mp=False))
            assert "Migrate-Permitted" in w.events[-1][1]["reason"]
            assert w.client.params == []
        finally:
            await w.close()
        # no local server at all: the check fails, the last candidate resets
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = dict(docroot, addr=("127.0.0.1", s.getsockname()[1]))
        s.close()
        w = World(dead, check_timeout=0.5)
        try:
            e = entry(docroot)
            w.eng.start(action(e))
            await w.handshake(e, e.body_start + 10)
            out = await w.event("outcome")
            assert out["outcome"] == "reset" and "local server" in out["reason"]
        finally:
            await w.close()
    run(main())


def test_planned_migration_that_cannot_be_served_gives_the_connection_back(docroot):
    async def main():
        w = World(docroot)
        try:
            e = entry(docroot)
            w.eng.start(e, planned=True)
            await w.handshake(e, e.body_start - 5)  # inside the head: B cannot go on
            out = await w.event("outcome")
            assert out["outcome"] == "failed"
            rst = w.injector.of(fp.RST)[0]
            assert rst.opts & fp.HAS_MIGRATE and not rst.migrate_preload  # P clear: back to the old server
        finally:
            await w.close()
    run(main())


def test_queue_beyond_max_active_then_abort_and_close(docroot):
    async def main():
        w = World(docroot, max_active=2, initial_rto=0.05, give_up=5.0)
        try:
            es = [entry(docroot, client_port=41000 + i) for i in range(5)]
            for e in es:
                assert w.eng.start(action(e))
            await asyncio.sleep(0.1)
            c = w.eng.counters()
            assert (c["running"], c["waiting"], c["queued"], c["failed"]) == (2, 3, 3, 0)
            for e in es[:2]:
                assert w.eng.feed(synack(e, e.body_start + 299_990))
            await asyncio.sleep(0.3)
            c = w.eng.counters()  # relays do not hold a setup slot: two more started
            assert (c["relaying"], c["running"], c["waiting"]) == (2, 2, 1)
            assert w.eng.abort(es[4].key, "operator")  # still queued
            assert w.eng.counters()["waiting"] == 0
            assert w.eng.abort(es[0].key, "operator")  # relaying: stopped, the client reset
            await asyncio.sleep(0.1)
            assert any(f["client_port"] == 41000 and f["outcome"] == "resumed"
                       for k, f in w.events if k == "outcome")
        finally:
            await w.close()
        assert not w.eng.start(entry(docroot, client_port=42000))
        assert w.eng.active() == []
        assert threading.active_count() < 10  # no thread per takeover
    run(main())


class AnsweringInjector(FakeInjector):
    """Plays the client appliance at once: every Migrate SYN is answered with a SYN/ACK."""

    def __init__(self, engine_ref, entries):
        super().__init__()
        self.engine_ref, self.by_port = engine_ref, {e.client_port: e for e in entries}
        self.order = []

    def send(self, packet):
        super().send(packet)
        v = fp.parse(packet, fp.LINK_RAW)
        if v.flags & fp.SYN:
            self.order.append(v.dport)
            e = self.by_port[v.dport]
            asyncio.get_running_loop().call_soon(self.engine_ref[0].feed, synack(e, 5000 + v.dport % 1000))
        return True


def test_ten_thousand_takeovers_queue_and_drain_in_order_none_failed(docroot):
    """More work than capacity waits its turn, most urgent first, arrival order within; nothing fails."""
    async def main():
        states = ["IDLE", "RESET", "PENDING"]
        es = []
        for i in range(10_000):
            st = states[i % 3]
            obj = ObjectRef("127.0.0.1", "/f.bin", None, None, 0) if st == "PENDING" else None
            es.append(entry(docroot, client_port=10_000 + i, state=st, object=obj, status=0, body_start=7,
                            body_length=0, reason="chunked" if st == "RESET" else None))
        ref = []
        inj = AnsweringInjector(ref, es)
        outcomes = {}
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()  # a local server that refuses at once: every fetch fails fast
        eng = tk.TakeoverEngine("127.0.0.1", [80], port,
                                lambda kind, **f: outcomes.__setitem__(f["client_port"], f["outcome"])
                                if kind == "outcome" else None,
                                injector=inj, receiver=False, max_active=32,
                                socket_factory=lambda **kw: (_ for _ in ()).throw(OSError("no repair here")))
        ref.append(eng)
        eng.attach(asyncio.get_running_loop())
        try:
            for e in es:
                assert eng.start(action(e))
            assert eng.counters()["waiting"] == 10_000 - 32
            deadline = time.monotonic() + 60
            while len(outcomes) < 10_000 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await eng.aclose()
        assert len(outcomes) == 10_000
        # RESET entries end reset; the others could not be served here (the local server
        # refuses): they end reset too, on purpose, never silently: nobody is left without an outcome
        assert set(outcomes.values()) == {"reset"}
        c = eng.counters()
        assert c["queued"] == 10_000 - 32 and c["failed"] == 0 and c["outcome_reset"] == 10_000
        # after the first 32 (started at once), the most urgent first, arrival order within
        rest = inj.order[32:]
        urg = [tk.URGENCY[es[p - 10_000].state] for p in rest]
        assert urg == sorted(urg)
        for u in set(urg):
            ports = [p for p, x in zip(rest, urg) if x == u]
            assert ports == sorted(ports)
    run(main())


def test_a_failover_refused_because_the_server_lives_is_retried_while_it_is_held_dead(docroot):
    async def main():
        dead = [True]
        w = World(docroot, retry_alive=lambda a: dead[0], retry_backoff=(0.05, 0.1))
        e = entry(docroot, state="IDLE", object=None, status=0, body_start=0, body_length=0)
        try:
            w.eng.start(action(e))
            for _ in range(2):  # the client appliance still hears the server, twice
                await w.event("migrate_syn_sent")
                syn = fp.parse(w.injector.packets[-1], fp.LINK_RAW)
                assert syn.window == 1  # a failover
                req = fp.migrate_request(e.ni, e.na, b"", 0, syn.migrate_reqno)
                alive = fp.build_tcp("127.0.0.1", "127.0.0.1", e.client_port, 80, 0, syn.seq + 1, fp.RST | fp.ACK, 0,
                                     fp.aligned_option(fp.opt_migrate(False, syn.migrate_reqno, syn.migrate_token, req)))
                assert w.eng.feed(alive)
                out = await w.event("outcome")
                assert out["outcome"] == "failed" and "it is alive" in out["reason"]
                w.events.clear()
            dead[0] = False  # heard again: no more retries
            await asyncio.sleep(0.3)
            c = w.eng.counters()
            assert c["retries"] == 1 and c["retries_scheduled"] == 2 and w.eng.active() == []
        finally:
            await w.close()
    run(main())


class FakeWatch:
    """An AckWatch whose 'client' answers every old-byte probe of its tuple after 30 ms."""
    open_now, peak, probes = 0, 0, 0

    def __init__(self, client_ip, client_port, local, local_port):
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.port = client_port
        FakeWatch.open_now += 1
        FakeWatch.peak = max(FakeWatch.peak, FakeWatch.open_now)
        FakeWatch.watches[client_port] = self

    def fileno(self):
        return self.r.fileno()

    def read_all(self):
        try:
            self.r.recv(100)
        except BlockingIOError:
            return []
        return [rs.ClientAck(0, self.ack, 501, None, None, ((self.probe, (self.probe + 1) & fp.MASK32),))]

    def answer(self, probe):
        """The client kernel's answer to the probe at `probe`: its rcv_nxt, and a D-SACK of the byte."""
        self.probe, self.ack = probe, (probe + PROBE_BEHIND) & fp.MASK32
        threading.Timer(0.03, lambda: self.w.send(b"x")).start()

    def close(self):
        FakeWatch.open_now -= 1
        self.r.close()
        self.w.close()


class ProbeAnswering(FakeInjector):
    def send(self, packet):
        v = fp.parse(packet, fp.LINK_RAW)
        if v.payload_len == 1 and not v.flags & (fp.SYN | fp.RST):  # an old-byte probe
            FakeWatch.probes += 1
            FakeWatch.watches[v.dport].answer(v.seq)  # at its rcv_nxt
        return super().send(packet)


def test_verify_slots_bound_the_watches_open_at_once(docroot, monkeypatch):
    """Every takeover between its repair and the client's answer holds a raw socket (a watch);
    at most verify_slots are open at once, the others wait their turn (already repaired: the
    lock at the client appliance is over) and still resume, each asked by an old-byte probe."""
    FakeWatch.open_now = FakeWatch.peak = FakeWatch.probes = 0
    FakeWatch.watches = {}
    monkeypatch.setattr(tk, "AckWatch", FakeWatch)

    async def main():
        w = World(docroot, verify_slots=1, verify_ack=True)
        w.injector = w.eng.injector = ProbeAnswering()
        try:
            es = [entry(docroot, client_port=40000 + i) for i in range(3)]
            for e in es:
                w.eng.start(action(e))
            await w.events_of("migrate_syn_sent", 3)  # the engine sends its SYNs in batches
            for i, e in enumerate(es):
                assert w.eng.feed(synack(e, e.body_start + 1000 * (i + 1)))
            deadline = time.monotonic() + 5
            while sum(k == "outcome" for k, _ in w.events) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert [f["outcome"] for k, f in w.events if k == "outcome"] == ["resumed"] * 3
            repaired = [i for i, (k, _) in enumerate(w.events) if k == "repaired"]
            first_outcome = next(i for i, (k, _) in enumerate(w.events) if k == "outcome")
            assert len(repaired) == 3 and max(repaired) < first_outcome  # none waited to be repaired
            assert FakeWatch.peak == 1 and FakeWatch.probes == 3 and FakeWatch.open_now == 0
        finally:
            await w.close()
    run(main())


def test_an_exact_synack_is_not_verified_again(docroot, monkeypatch):
    """A SYN/ACK marked exact (SYNACK_EXACT in its urgent pointer: the client appliance's own
    probe of a failover was answered) resumes without a watch or a probe of the taker's; an
    unmarked one, or one with URG set (the field is then an urgent pointer), is verified."""
    FakeWatch.open_now = FakeWatch.peak = FakeWatch.probes = 0
    FakeWatch.watches = {}
    monkeypatch.setattr(tk, "AckWatch", FakeWatch)

    async def main():
        w = World(docroot, verify_ack=True)
        w.injector = w.eng.injector = ProbeAnswering()
        try:
            es = [entry(docroot, client_port=40000 + i) for i in range(3)]
            for e in es:
                w.eng.start(action(e))
            await w.events_of("migrate_syn_sent", 3)
            marks = [dict(urgent=SYNACK_EXACT), dict(), dict(urgent=SYNACK_EXACT, flags=fp.SYN | fp.ACK | fp.URG)]
            for i, (e, kw) in enumerate(zip(es, marks)):
                assert w.eng.feed(synack(e, e.body_start + 1000 * (i + 1), **kw))
            deadline = time.monotonic() + 5
            while sum(k == "outcome" for k, _ in w.events) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert [f["outcome"] for k, f in w.events if k == "outcome"] == ["resumed"] * 3
            assert w.eng.counters()["verify_skipped"] == 1
            assert FakeWatch.probes == 2 and sorted(FakeWatch.watches) == [40001, 40002]
        finally:
            await w.close()
    run(main())


class StaleFirstWatch(FakeWatch):
    """The client appliance still had one of the client's ACKs queued from before the move
    (a stale rcv_nxt, no D-SACK); the client's answer to the probe (2 MSS further, with the
    D-SACK) comes 30 ms after it."""
    ahead, ts_recent = 2 * 1448, 888888

    def answer(self, probe):
        self.probe = probe
        una = (probe + PROBE_BEHIND) & fp.MASK32
        self.queue = [rs.ClientAck(0, (una + 1448) & fp.MASK32, 501, 1, 888000, ()),
                      rs.ClientAck(0, (una + self.ahead) & fp.MASK32, 501, 2, self.ts_recent,
                                   ((probe, (probe + 1) & fp.MASK32),))]
        self.w.send(b"x")
        threading.Timer(0.03, lambda: self.w.send(b"x")).start()

    def read_all(self):
        try:
            self.r.recv(100)
        except BlockingIOError:
            return []
        return [self.queue.pop(0)] if self.queue else []


def test_a_stale_ack_queued_before_the_move_is_not_taken_for_the_answer(docroot, monkeypatch):
    """The answer to the old-byte probe is the ACK carrying its D-SACK, not the first ACK that
    comes: a stale one would put B behind the client, whose ACKs B then drops as ACKs of
    unsent data, for good."""
    FakeWatch.open_now = FakeWatch.peak = FakeWatch.probes = 0
    FakeWatch.watches = {}
    monkeypatch.setattr(tk, "AckWatch", StaleFirstWatch)
    marked = []  # the fake client has not the bytes a real one would: they are only recorded
    monkeypatch.setattr(tk.repair, "mark_sent", lambda sock, data: marked.append(data))

    async def main():
        w = World(docroot, verify_ack=True)
        w.injector = w.eng.injector = ProbeAnswering()
        e = entry(docroot)
        try:
            assert w.eng.start(action(e))
            ack = (e.body_start + 100_000) & fp.MASK32
            await w.handshake(e, ack)
            f = await w.event("resynced")
            assert f["gap"] == StaleFirstWatch.ahead and f["ack"] == (ack + StaleFirstWatch.ahead) & fp.MASK32
            r = await w.event("resumed")
            assert r["offset"] == 100_000 + StaleFirstWatch.ahead
            ahead = 100_000 + StaleFirstWatch.ahead
            assert marked == [docroot["data"][100_000:ahead]]  # what the client already holds
            got = await asyncio.to_thread(recv_n, await w.peer(), SIZE - ahead)
            assert got == docroot["data"][ahead:]
            # B's clock (ts_val = the SYN/ACK's TSecr + 1) is not behind the client's ts_recent
            assert w.eng.counters()["ts_advanced"] == 0 and w.eng.counters()["answers_unmarked"] == 0
        finally:
            await w.close()
    run(main())


def test_a_clock_behind_the_clients_ts_recent_is_moved_past_it():
    """The answer's TSecr is the client's ts_recent: were B's TSval clock behind it, the client
    would drop every segment of B as old (PAWS); the clock is moved (a real socket's, read back)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(lsock.getsockname())
    srv, _ = lsock.accept()
    try:
        clock = struct.unpack("I", srv.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, 4))[0]
        eng = tk.TakeoverEngine.__new__(tk.TakeoverEngine)
        eng._counters, eng.on_event = {"ts_advanced": 0}, lambda kind, **f: events.append((kind, f))
        events = []
        params = hs.RepairParams(("127.0.0.1", 80), ("127.0.0.1", 1), 0, 0, 1460, 7, 7, True, True, clock,
                                 65535, 65535)
        t = tk._Takeover(("k",), None, None, False, {}, time.monotonic(), 0, params=params, sock=srv,
                         repaired_at=time.monotonic())
        eng._check_timestamp(t, rs.ClientAck(0, 0, 0, 1, (clock - 50) & fp.MASK32))  # behind: left alone
        assert eng._counters["ts_advanced"] == 0
        ahead = (clock + 5000) & fp.MASK32
        eng._check_timestamp(t, rs.ClientAck(0, 0, 0, 1, ahead))
        now = struct.unpack("I", srv.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, 4))[0]
        assert eng._counters["ts_advanced"] == 1 and 0 < fp.seq_diff(now, ahead) < 50
        assert t.params.ts_val == repair.even_timestamp(ahead + 1) and events[0][0] == "ts_advanced"
    finally:
        for s in (cli, srv, lsock):
            s.close()


def test_a_window_of_handshakes_and_an_initial_rto_that_follows_a_slow_client_appliance(docroot):
    """handshake_slots bounds the Migrate handshakes awaiting a SYN/ACK (a loaded client
    appliance is not flooded); a first attempt's SYN/ACK time sets later initial RTOs."""
    async def main():
        w = World(docroot, handshake_slots=1)
        try:
            es = [entry(docroot, client_port=40000 + i) for i in range(3)]
            for e in es:
                w.eng.start(action(e))
            await w.event("migrate_syn_sent")
            await asyncio.sleep(0.05)
            sent = {fp.parse(p, fp.LINK_RAW).dport for p in w.injector.packets if fp.parse(p, fp.LINK_RAW).flags & fp.SYN}
            assert len(sent) == 1  # one at a time
            for n in range(3):
                deadline = time.monotonic() + 5
                while sum(k == "migrate_syn_sent" for k, _ in w.events) < n + 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                port = fp.parse(w.injector.packets[-1], fp.LINK_RAW).dport
                e = next(x for x in es if x.client_port == port)
                assert w.eng.feed(synack(e, e.body_start + 100))
                while sum(k == "synack" for k, _ in w.events) < n + 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
            assert sum(k == "synack" for k, _ in w.events) == 3
        finally:
            await w.close()
    run(main())
    eng = tk.TakeoverEngine.__new__(tk.TakeoverEngine)
    eng.timing, eng._srtt = (0.2, 2.0, 8.0), None
    assert eng._initial_rto() == 0.2
    eng._srtt = 0.01
    assert eng._initial_rto() == 0.2  # never below the configured one
    eng._srtt = 0.4
    assert eng._initial_rto() == pytest.approx(0.8)
    eng._srtt = 5.0
    assert eng._initial_rto() == tk.MAX_INITIAL_RTO


def test_a_newer_entry_of_the_same_connection_supersedes_a_stale_one(docroot):
    """A cascade: the stale entry of the first dead member (ReqNo 0) and the newer one of the
    member that took it over and died too (ReqNo 1) reach this node at once. The newer one
    wins, whatever the order; the stale one never steals the other's SYN/ACK."""
    async def main():
        w = World(docroot)
        try:
            stale = entry(docroot)
            newer = entry(docroot, server_ip=socket.inet_aton("127.0.0.3"), reqno=1)
            assert w.eng.start(action(stale)) and w.eng.start(action(newer))
            assert not w.eng.start(action(entry(docroot, reqno=0, server_ip=socket.inet_aton("127.0.0.4"))))
            await w.event("migrate_syn_sent")
            [syn] = [fp.parse(p, fp.LINK_RAW) for p in w.injector.packets]
            assert syn.migrate_reqno == 2
            assert w.eng.feed(synack(newer, newer.body_start + 500))
            out = await w.event("resumed")
            assert out["client_port"] == newer.client_port
            c = w.eng.counters()
            assert c["superseded"] == 1 and c["migrate_syns"] == 1
        finally:
            await w.close()
    run(main())


def test_a_synack_for_a_handshake_given_up_is_answered_with_a_migrate_rst_without_p(docroot):
    """A false suspicion: the takeover is aborted while its Migrate SYN waits in a loaded client
    appliance, which answers it later. The engine answers that SYN/ACK with a Migrate RST, P
    clear, so the lock there ends at once (the connection stays with its live server)."""
    async def main():
        w = World(docroot)
        try:
            e = entry(docroot)
            w.eng.start(action(e))
            await w.event("migrate_syn_sent")
            syn = fp.parse(w.injector.packets[-1], fp.LINK_RAW)
            assert w.eng.abort(e.key, "a is alive after all")
            await w.event("outcome")
            n = len(w.injector.packets)
            assert not w.eng.feed(synack(e, e.body_start + 100))
            [rst] = [fp.parse(p, fp.LINK_RAW) for p in w.injector.packets[n:]]
            assert rst.flags & fp.RST and rst.opts & fp.HAS_MIGRATE and not rst.migrate_preload
            assert (rst.migrate_reqno, rst.migrate_token) == (syn.migrate_reqno, syn.migrate_token)
            assert rst.migrate_request == fp.migrate_request(e.ni, e.na, b"", rst.seq, syn.migrate_reqno)
            assert w.eng.counters()["late_synacks"] == 1
        finally:
            await w.close()
    run(main())
