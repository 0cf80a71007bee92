"""The takeover engine end to end in network namespaces, with a stand-in client appliance.

Topology and shim from tests/test_repair.py: client C, old server A and takeover server B
on a bridge; both replicas run appliance.httpserver over one docroot (same ETag and
Last-Modified). The client downloads 8 MiB from A with a slow reader; at about half, A
crashes (its output dropped: no FIN, no RST, nothing) or, for a planned migration, stays
alive. B's TakeoverEngine, on its own asyncio loop inside B's namespace, gets the entry a
peer would have advertised and does the real thing: Migrate SYN through a raw socket,
SYN/ACK from the shim (which checks Token and Request like the client appliance), TCP_REPAIR
socket, Range request to B's own HTTP server, splice. The client must receive every byte
exactly once, then send a second request on the same connection, answered by B's server
through the relay. "stale": the stand-in answers with an ack 60000 bytes behind the
client's rcv_nxt (what a client appliance does if it answers before the client acknowledged
the old server's last segments); B must see the client's real rcv_nxt in the answer to its
window probe and fix it, else the connection stalls. Last case: B's copy of the object
differs (another Last-Modified), so B refuses and the client's connection is reset.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import threading
import time

import pytest

import test_repair as tr  # tests/ is on sys.path (tests/conftest.py)
from appliance import httpserver
from appliance.sync import Entry, ObjectRef
from appliance.takeover import TakeoverEngine

pytestmark = [pytest.mark.lab, tr.needs_netns]

SIZE = 8 << 20
STALE = 60_000  # a SYN/ACK ack this far behind the client stalls B for good unless it is caught
PORT = tr.PORT


class RecordingServer(httpserver.DocrootHTTPServer):
    """The docroot server, remembering its connections (to unblock them at teardown)."""

    def process_request(self, request, client_address):
        self.conns = getattr(self, "conns", [])
        self.conns.append(request)
        super().process_request(request, client_address)


def serve_in(ns: str, root, addr: str) -> RecordingServer:
    with tr.in_netns(ns):
        srv = RecordingServer((addr, PORT), root, idle_timeout=10)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


class EngineThread:
    """B's engine on an asyncio loop in a thread inside B's namespace."""

    def __init__(self, ns: str) -> None:
        self.events = []
        self.ready = threading.Event()
        self.error = None
        self.thread = tr.thread_in(ns, self._run)
        assert self.ready.wait(5), self.error

    def _on_event(self, kind, **fields):
        self.events.append((kind, fields))

    def _run(self):
        async def main():
            self.loop = asyncio.get_running_loop()
            self.stopped = asyncio.Event()
            self.engine = TakeoverEngine(tr.B_IP, [PORT], PORT, self._on_event)
            self.engine.attach(self.loop)
            self.ready.set()
            try:
                await asyncio.wait_for(self.stopped.wait(), 30)
            except asyncio.TimeoutError:
                pass
            await self.engine.aclose()

        try:
            asyncio.run(main())
        except Exception as exc:  # noqa: BLE001
            self.error = exc
            self.ready.set()

    def start(self, entry) -> None:
        self.loop.call_soon_threadsafe(self.engine.start, entry)

    def wait(self, kind: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for k, f in list(self.events):
                if k == kind:
                    return f
            time.sleep(0.005)
        raise AssertionError(f"no {kind} event: {self.events}")

    def stop(self) -> None:
        if getattr(self, "loop", None) is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.stopped.set)
            except RuntimeError:
                pass
        self.thread.join(5)


def make_docroot(tmp_path):
    root = tmp_path / "docroot"
    root.mkdir()
    body = tr.stream(SIZE, seed=11)
    (root / "big.bin").write_bytes(body)
    (root / "small.txt").write_bytes(b"second request, served by B\n")
    return root, body


def client_download(result: dict, half: threading.Event) -> None:
    """GET /big.bin from A with a slow reader, then GET /small.txt on the same connection."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)
    s.settimeout(0.5)
    buf = bytearray()
    try:
        s.connect((tr.A_IP, PORT))
        result["client_port"] = s.getsockname()[1]
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: a.example\r\n\r\n")
        need = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (need is None or len(buf) < need):
            try:
                data = s.recv(32768)
            except socket.timeout:
                continue
            if not data:
                break
            buf += data
            if need is None and b"\r\n\r\n" in buf:
                head_len = buf.index(b"\r\n\r\n") + 4
                lines = bytes(buf[:head_len]).decode("latin-1").split("\r\n")
                result["head_len"] = head_len
                result["headers"] = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                need = head_len + int(result["headers"]["content-length"])
            if need is not None and len(buf) >= need // 2:
                half.set()
            else:
                time.sleep(0.001)
        result["body"] = bytes(buf[result.get("head_len", 0):])
        result["t_done"] = time.monotonic()
        s.sendall(b"GET /small.txt HTTP/1.1\r\nHost: a.example\r\n\r\n")
        second = bytearray()
        while time.monotonic() < deadline + 5 and not second.endswith(b"served by B\n"):
            try:
                data = s.recv(4096)
            except socket.timeout:
                continue
            if not data:
                break
            second += data
        result["second"] = bytes(second)
    except OSError as exc:
        result["error"] = exc
        result.setdefault("body", bytes(buf[result.get("head_len", 0):]))
    finally:
        s.close()


def advertised_entry(shim, result) -> Entry:
    """What A's appliance would have advertised for the connection (sync.Entry)."""
    st, h = shim.state, result["headers"]
    return Entry(socket.inet_aton(tr.C_IP), result["client_port"], socket.inet_aton(tr.A_IP), PORT,
                 st["ni"], st["na"], st["c_mss"], st["c_ws"], st["c_sack"], st["c_ts"], st["s_mss"], st["s_ws"],
                 st["s_sack"], st["s_ts"], True, 0, "ACTIVE",
                 ObjectRef("a.example", "/big.bin", h.get("etag"), h.get("last-modified"), SIZE),
                 None, 200, (st["na"] + 1 + result["head_len"]) & 0xFFFFFFFF, 0, SIZE)


def run_case(tmp_path, mode: str):
    root, body = make_docroot(tmp_path)
    b_root = root
    if mode == "refuse":  # B's copy is another version: same bytes, another Last-Modified and ETag
        b_root = tmp_path / "docroot_b"
        b_root.mkdir()
        for f in root.iterdir():
            (b_root / f.name).write_bytes(f.read_bytes())
        os.utime(b_root / "big.bin", (time.time() - 86400, time.time() - 86400))
    result, half = {}, threading.Event()
    with tr.Topology() as topo:
        shim = tr.NfQueueShim(topo, answer_migrate=True, ack_behind=STALE if mode == "stale" else 0)
        a_srv = serve_in(topo.ns("a"), root, tr.A_IP)
        b_srv = serve_in(topo.ns("b"), b_root, tr.B_IP)
        eng = EngineThread(topo.ns("b"))
        try:
            tc = tr.thread_in(topo.ns("c"), client_download, result, half)
            assert half.wait(15), result
            t_crash = time.monotonic()
            if mode != "planned":  # a crash: A falls silent at once
                topo.iptables("a", "-I", "OUTPUT", "-p", "tcp", "--sport", str(PORT), "-j", "DROP")
            eng.start(advertised_entry(shim, result))
            tc.join(25)
            final = eng.wait("refused" if mode == "refuse" else "done", 10)
        finally:
            eng.stop()
            shim.stop()
            for srv in (a_srv, b_srv):
                for conn in getattr(srv, "conns", []):
                    try:
                        conn.shutdown(socket.SHUT_RDWR)  # unblocks a handler stuck in sendfile
                    except OSError:
                        pass
                srv.shutdown()
                srv.server_close()
        prefix = topo.prefix
    assert tr.leftover_namespaces(prefix) == []
    assert shim.error is None and eng.error is None
    return result, body, eng.events, final, shim, t_crash


@pytest.mark.parametrize("mode", ["crash", "planned", "stale"])
def test_engine_continues_the_download_at_the_exact_next_byte(tmp_path, mode):
    result, body, events, done, shim, t_crash = run_case(tmp_path, mode)
    assert "error" not in result, result["error"]
    assert len(result["body"]) == SIZE
    assert hashlib.sha256(result["body"]).digest() == hashlib.sha256(body).digest()
    assert result["second"].startswith(b"HTTP/1.1 200") and result["second"].endswith(b"second request, served by B\n")
    kinds = [k for k, _ in events]
    assert kinds[:3] == ["checked", "migrate_syn_sent", "synack"] and kinds[-1] == "done", kinds
    assert {"repaired", "resumed", "first_byte", "body_sent"} <= set(kinds)
    ev = dict(events)
    assert ev["resumed"]["mode"] == "resume" and 0 < ev["resumed"]["offset"] < SIZE
    assert ev["resumed"]["offset"] + ev["resumed"]["bytes_left"] == SIZE
    assert done["bytes_from_client"] == len(b"GET /small.txt HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert shim.counts["synacks"] == 1
    if mode == "stale":  # B saw the client's real rcv_nxt in its answer to the window probe
        assert ev["resynced"]["gap"] == STALE
        assert ev["resumed"]["offset"] - ev["resynced"]["gap"] + result["head_len"] == \
            (ev["synack"]["ack"] - shim.state["na"] - 1) & 0xFFFFFFFF
    else:
        assert "resynced" not in ev
    first = ev["first_byte"]["mono"] - t_crash
    print(f"\n{mode}: offset {ev['resumed']['offset']}, SYN/ACK rtt {ev['synack']['rtt_ms']} ms, repaired at "
          f"{ev['repaired']['ms']} ms (syscalls {ev['repaired']['repair_ms']} ms), first byte "
          f"{ev['first_byte']['ms']} ms after start, {first * 1000:.1f} ms after the crash; shim {shim.counts}")


def test_engine_refuses_when_bs_copy_differs(tmp_path):
    result, body, events, refused, shim, _ = run_case(tmp_path, "refuse")
    assert "etag:" in refused["reason"] or "last-modified:" in refused["reason"], refused
    assert isinstance(result.get("error"), ConnectionResetError), result
    assert len(result["body"]) < SIZE
    kinds = [k for k, _ in events]
    assert kinds[0] == "checked" and "refused" in kinds and "resumed" not in kinds and "repaired" not in kinds
    assert shim.counts["migrate_rsts"] >= 1  # the client was reset by B's Migrate RST, not left waiting
