"""appliance.repair in network namespaces: the notes' takeover experiment, reproduced in code.

Namespaces mig-t<hex>-{sw,c,a,b}: a bridge (sw) and three hosts on it, client C 10.77.0.1,
old server A 10.77.0.2, takeover server B 10.77.0.3. A client in C downloads a
deterministic multi-MB stream from A with a slow reader; A is frozen silently after about
half (its output dropped, then TCP_REPAIR=1 and close); B builds its socket with
repaired_socket() from values seen on the client's wire (what the client appliance's
SYN/ACK carries) and sends the rest; the client's stream must be byte-identical. A stateless
address rewrite near the client plays the client appliance: NFQUEUE (iptables, in C) and a
small pure-Python nfnetlink_queue client that rewrites B <-> A with _fastpath (this machine
has no nft binary and no tc pedit; iptables -j NFQUEUE works).

Also: the clear error when the 4-tuple is taken (EADDRNOTAVAIL), and even TCP_TIMESTAMP.
The helpers (Topology, NfQueueShim, in_netns) are shared with tests/lab/test_repair_ns.py.
Needs root; every namespace is deleted afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import random
import secrets
import select
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

import _fastpath as fp
from appliance import repair
from appliance.inject import RawInjector

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
C_IP, A_IP, B_IP = "10.77.0.1", "10.77.0.2", "10.77.0.3"
PORT = 8080


def netns_unusable():
    if os.geteuid() != 0:
        return "needs root (network namespaces, TCP_REPAIR, NFQUEUE)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    return None


needs_netns = pytest.mark.skipif(netns_unusable() is not None, reason=str(netns_unusable()))


def sh(*args, check=True):
    res = subprocess.run(args, capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {res.stderr.strip()}")
    return res


@contextlib.contextmanager
def in_netns(name: str):
    """Move the calling thread into namespace `name` (threads started inside inherit it)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns {name}: {os.strerror(e)}")
        try:
            yield
        finally:
            if _libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace failed")
    finally:
        os.close(own)
        os.close(target)


def thread_in(ns: str, target, *args, **kw) -> threading.Thread:
    """A started daemon thread running target(*args) inside namespace ns."""
    with in_netns(ns):
        t = threading.Thread(target=target, args=args, kwargs=kw, daemon=True)
        t.start()
    return t


class Topology:
    """mig-t<hex>-sw holds a bridge; c, a, b hang off it with one veth each."""

    HOSTS = {"c": C_IP, "a": A_IP, "b": B_IP}

    def __init__(self) -> None:
        self.prefix = f"mig-t{secrets.token_hex(3)}"
        self.names = []

    def ns(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def up(self) -> "Topology":
        sw = self.ns("sw")
        for node in ("sw", *self.HOSTS):
            sh("ip", "netns", "add", self.ns(node))
            self.names.append(self.ns(node))
            sh("ip", "-n", self.ns(node), "link", "set", "lo", "up")
        sh("ip", "-n", sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", sw, "link", "set", "br0", "up")
        for node, addr in self.HOSTS.items():
            sh("ip", "-n", self.ns(node), "link", "add", "eth0", "type", "veth", "peer", "name", f"p{node}",
               "netns", sw)
            sh("ip", "-n", self.ns(node), "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", self.ns(node), "link", "set", "eth0", "up")
            sh("ip", "-n", sw, "link", "set", f"p{node}", "master", "br0", "up")
        return self

    def iptables(self, node: str, *rule: str) -> None:
        sh("ip", "netns", "exec", self.ns(node), "iptables", "-w", "5", *rule)

    def down(self) -> None:
        for name in reversed(self.names):
            sh("ip", "netns", "del", name, check=False)
        self.names.clear()

    def __enter__(self):
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc):
        self.down()


def leftover_namespaces(prefix: str) -> list:
    out = sh("ip", "netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


# --- A stateless client appliance stand-in: NFQUEUE + _fastpath rewriting -------------------

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_PAYLOAD = 1, 2, 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_PACKET = 2
NF_DROP, NF_ACCEPT = 0, 1


def _nla(kind: int, data: bytes) -> bytes:
    n = 4 + len(data)
    return struct.pack("HH", n, kind) + data + bytes(-n % 4)


class NfQueue:
    """A minimal nfnetlink_queue client: packets in, verdicts (with optional new payload) out."""

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE
        self.sock.bind((0, 0))
        self._seq = 0
        self._config(_nla(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._config(_nla(NFQA_CFG_PARAMS, struct.pack("!IB", 0xFFFF, NFQNL_COPY_PACKET)))

    def _send(self, msg_type: int, flags: int, body: bytes) -> None:
        self._seq += 1
        payload = struct.pack("!BBH", socket.AF_UNSPEC, 0, self.queue) + body
        self.sock.send(struct.pack("IHHII", 16 + len(payload), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags,
                                   self._seq, 0) + payload)

    def _config(self, attrs: bytes) -> None:
        self._send(NFQNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, attrs)
        data = self.sock.recv(65536)
        length, kind = struct.unpack_from("IH", data)
        if kind == NLMSG_ERROR:
            err = struct.unpack_from("i", data, 16)[0]
            if err:
                raise OSError(-err, f"nfqueue config: {os.strerror(-err)}")

    def packets(self, timeout: float):
        """[(packet id, payload bytes)] received within timeout (possibly empty)."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return []
        data = self.sock.recv(1 << 20)
        out, off = [], 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("IH", data, off)
            if length < 16:
                break
            if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
                pid, payload = None, None
                a = off + 20
                while a + 4 <= off + length:
                    alen, atype = struct.unpack_from("HH", data, a)
                    if alen < 4:
                        break
                    atype &= 0x3FFF
                    if atype == NFQA_PACKET_HDR:
                        pid = struct.unpack_from("!I", data, a + 4)[0]
                    elif atype == NFQA_PAYLOAD:
                        payload = bytes(data[a + 4:a + alen])
                    a += (alen + 3) & ~3
                if pid is not None and payload is not None:
                    out.append((pid, payload))
            off += (length + 3) & ~3
        return out

    def verdict(self, pid: int, verdict: int, payload: bytes = None) -> None:
        body = _nla(NFQA_VERDICT_HDR, struct.pack("!II", verdict, pid))
        if payload is not None:
            body += _nla(NFQA_PAYLOAD, payload)
        self._send(NFQNL_MSG_VERDICT, NLM_F_REQUEST, body)

    def close(self) -> None:
        self.sock.close()


class NfQueueShim:
    """Plays the client appliance in the client's namespace, statelessly where it can.

    Sees every segment of the client's connections to A:PORT (iptables raw OUTPUT and
    PREROUTING -> NFQUEUE) and keeps what a SYN/ACK needs: both SYNs' options, the client's
    latest ack/window/TSval/TSecr, A's latest ack. After `migrate()` (or an accepted Migrate
    SYN from B when answer_migrate is set) it rewrites client->A into client->B and B->client
    into A->client, drops everything from A and B's RSTs until B's first ACK."""

    def __init__(self, topo: Topology, queue: int = 7, answer_migrate: bool = False, ack_behind: int = 0) -> None:
        self.topo, self.queue, self.answer_migrate = topo, queue, answer_migrate
        self.ack_behind = ack_behind  # a deliberately stale SYN/ACK ack (bytes behind the client's rcv_nxt)
        self.state = {}
        self.migrated = False
        self.pending = None
        self.b_acked = False
        self.reqno = 0
        self.events = []
        self.counts = {"packets": 0, "rewritten": 0, "dropped": 0, "synacks": 0, "rsts_dropped": 0}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error = None
        self.lock = threading.Lock()
        ns = topo.ns("c")
        topo.iptables("c", "-t", "raw", "-A", "OUTPUT", "-p", "tcp", "-d", A_IP, "--dport", str(PORT),
                      "-j", "NFQUEUE", "--queue-num", str(queue))
        topo.iptables("c", "-t", "raw", "-A", "PREROUTING", "-p", "tcp", "--sport", str(PORT),
                      "-j", "NFQUEUE", "--queue-num", str(queue))
        self.thread = thread_in(ns, self._run)
        if not self._ready.wait(5) or self.error:
            raise RuntimeError(f"the NFQUEUE shim did not start: {self.error}")

    def _run(self) -> None:
        try:
            q = NfQueue(self.queue)
            self.injector = RawInjector()
        except Exception as exc:  # noqa: BLE001
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        deadline = time.monotonic() + 60
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                for pid, pkt in q.packets(0.01):
                    with self.lock:
                        verdict, out = self._handle(bytearray(pkt))
                    q.verdict(pid, verdict, out)
                with self.lock:
                    self._maybe_answer()
        except Exception as exc:  # noqa: BLE001
            self.error = exc
        finally:
            q.close()
            self.injector.close()

    def _handle(self, pkt: bytearray):
        self.counts["packets"] += 1
        v = fp.parse(pkt, fp.LINK_RAW)
        if not v.is_tcp:
            return NF_ACCEPT, None
        st = self.state
        src, flags = v.src_ip, v.flags
        if src == C_IP:
            if flags & fp.SYN:
                st.update(ni=v.seq, cport=v.sport, c_mss=v.mss if v.opts & fp.HAS_MSS else 0,
                          c_ws=v.wscale if v.opts & fp.HAS_WSCALE else -1,
                          c_sack=bool(v.opts & fp.HAS_SACK_PERMITTED), c_ts=bool(v.opts & fp.HAS_TIMESTAMPS))
            if flags & fp.ACK:
                st.update(c_ack=v.ack, c_win=v.window, c_tsval=v.tsval, c_tsecr=v.tsecr, c_seen=time.monotonic())
            if self.migrated:
                fp.rewrite_addresses(pkt, dst=B_IP, link=fp.LINK_RAW)
                self.counts["rewritten"] += 1
                return NF_ACCEPT, bytes(pkt)
            return NF_ACCEPT, None
        if src == A_IP:
            if self.migrated:
                self.counts["dropped"] += 1
                return NF_DROP, None
            if flags & (fp.SYN | fp.ACK) == fp.SYN | fp.ACK:
                st.update(na=v.seq, s_mss=v.mss if v.opts & fp.HAS_MSS else 0,
                          s_ws=v.wscale if v.opts & fp.HAS_WSCALE else -1,
                          s_sack=bool(v.opts & fp.HAS_SACK_PERMITTED), s_ts=bool(v.opts & fp.HAS_TIMESTAMPS))
            if flags & fp.ACK:
                st.update(a_ack=v.ack, a_tsval=v.tsval)
            end = (v.seq + v.payload_len + (1 if flags & fp.FIN else 0)) & 0xFFFFFFFF
            if "a_next" not in st or fp.seq_gt(end, st["a_next"]):
                st["a_next"] = end  # the highest byte of A's passed on to the client
            return NF_ACCEPT, None
        if src == B_IP:
            if flags & fp.SYN and v.opts & fp.HAS_MIGRATE:
                self._migrate_syn(v)
                return NF_DROP, None
            if not self.migrated:
                self.counts["dropped"] += 1
                return NF_DROP, None
            if flags & fp.RST and v.opts & fp.HAS_MIGRATE and v.migrate_reqno == self.reqno \
                    and v.migrate_request == fp.migrate_request(st["ni"], st["na"], b"", v.seq, v.migrate_reqno):
                # a Migrate RST: B resets the client on purpose, at the client's rcv_nxt
                self.counts["migrate_rsts"] = self.counts.get("migrate_rsts", 0) + 1
                fp.rewrite_addresses(pkt, src=A_IP, link=fp.LINK_RAW)
                return NF_ACCEPT, bytes(pkt)
            if flags & fp.RST and not self.b_acked:
                self.counts["rsts_dropped"] += 1
                return NF_DROP, None
            if flags & fp.ACK and not flags & fp.RST:
                self.b_acked = True
            fp.rewrite_addresses(pkt, src=A_IP, link=fp.LINK_RAW)
            self.counts["rewritten"] += 1
            return NF_ACCEPT, bytes(pkt)
        return NF_ACCEPT, None

    def synack_values(self) -> dict:
        """What the client appliance's SYN/ACK carries, from the wire."""
        st = self.state
        return {"seq": st["a_ack"], "ack": st["c_ack"], "window": st["c_win"], "tsval": st["c_tsval"],
                "tsecr": st["c_tsecr"]}

    def _migrate_syn(self, v) -> None:
        st = self.state
        ok = (self.answer_migrate and "na" in st and v.dport == st["cport"]
              and v.migrate_token == fp.migrate_token(st["ni"], st["na"])
              and v.migrate_request == fp.migrate_request(st["ni"], st["na"], b"", v.seq, v.migrate_reqno))
        self.events.append(("migrate_syn", time.monotonic(), v.migrate_reqno, ok))
        if not ok:
            self.injector.send(fp.build_rst(C_IP, B_IP, v.dport, v.sport, 0, (v.seq + 1) & 0xFFFFFFFF))
            return
        if self.migrated and v.migrate_reqno != self.reqno:
            self.injector.send(fp.build_rst(C_IP, B_IP, v.dport, v.sport, 0, (v.seq + 1) & 0xFFFFFFFF))
            return
        self.reqno = v.migrate_reqno
        self.migrated = True  # from now on nothing of A's reaches the client
        # The SYN/ACK's ack must be the client's exact rcv_nxt, including A's segments
        # already passed on: wait (bounded) for the client's ACK of the last of them.
        if self.pending is None:
            self.pending = (v.sport, v.dport, time.monotonic() + 0.3)
        self._maybe_answer()

    def _maybe_answer(self) -> None:
        if self.pending is None:
            return
        st = self.state
        sport, dport, deadline = self.pending
        if fp.seq_lt(st["c_ack"], st.get("a_next", st["c_ack"])) and time.monotonic() < deadline:
            return
        self.pending = None
        s = self.synack_values()
        s["ack"] = (s["ack"] - self.ack_behind) & 0xFFFFFFFF
        ts = (s["tsval"], s["tsecr"]) if st.get("c_ts") and st.get("s_ts") else (None, None)
        self.injector.send(fp.build_migrate_synack(C_IP, B_IP, dport, sport, s["seq"], s["ack"], s["window"],
                                                   tsval=ts[0], tsecr=ts[1]))
        self.counts["synacks"] += 1

    def migrate(self) -> None:
        with self.lock:
            self.migrated = True

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)


def stream(n: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(n)


def _recv_exact_until(sock, n: int, deadline: float, chunk=65536) -> bytes:
    buf = bytearray()
    while len(buf) < n and time.monotonic() < deadline:
        try:
            data = sock.recv(min(chunk, n - len(buf)))
        except socket.timeout:
            continue
        if not data:
            break
        buf += data
    return bytes(buf)


# --- The experiment --------------------------------------------------------------------------

TOTAL = 8 << 20
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TOTAL


@needs_netns
def test_takeover_by_repaired_socket_is_byte_exact():
    body = stream(TOTAL)
    want = hashlib.sha256(body).hexdigest()
    with Topology() as topo:
        shim = NfQueueShim(topo)
        try:
            _experiment(topo, shim, body, want)
        finally:
            shim.stop()
        prefix = topo.prefix
    assert leftover_namespaces(prefix) == []


def _experiment(topo: Topology, shim: NfQueueShim, body: bytes, want: str) -> None:
    half = threading.Event()
    freeze = threading.Event()
    result = {}

    with in_netns(topo.ns("a")):
        lsock = socket.create_server((A_IP, PORT))
    with in_netns(topo.ns("b")):
        b_listener = socket.create_server((B_IP, PORT))  # bind works beside a listener
        b_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def server_a():
        conn, _ = lsock.accept()
        result["a_conn"] = conn
        conn.recv(4096)
        conn.settimeout(0.05)
        data = memoryview(HEAD + body)
        off = 0
        while off < len(data) and not freeze.is_set():
            try:
                off += conn.send(data[off:off + 65536])
            except socket.timeout:
                pass
        result["a_sent"] = off

    def client():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)
        s.settimeout(0.5)
        s.connect((A_IP, PORT))
        result["client_port"] = s.getsockname()[1]
        s.sendall(b"GET /stream HTTP/1.1\r\nHost: a\r\n\r\n")
        need = len(HEAD) + TOTAL
        got = bytearray()
        deadline = time.monotonic() + 20
        while len(got) < need and time.monotonic() < deadline:
            try:
                data = s.recv(min(32768, need - len(got)))
            except socket.timeout:
                continue
            if not data:
                break
            if not got:
                result["t_first"] = time.monotonic()
            got += data
            if len(got) >= need // 2:
                half.set()
                if "t_resumed" not in result and "t_b" in result:
                    result["t_resumed"] = time.monotonic()
            else:
                time.sleep(0.001)  # a slow reader: A stays window-limited
        result["received"] = bytes(got)
        s.sendall(b"NEXT-REQUEST")  # the reverse direction, after the takeover
        time.sleep(0.2)
        s.close()

    ta = thread_in(topo.ns("a"), server_a)
    tc = thread_in(topo.ns("c"), client)
    assert half.wait(15), "the client never got half of the stream"
    # A dies silently: its output dropped first (the network lock; a crashed host sends
    # nothing, not even RSTs to the client's later segments), then TCP_REPAIR=1 + close.
    topo.iptables("a", "-I", "OUTPUT", "-p", "tcp", "--sport", str(PORT), "-j", "DROP")
    freeze.set()
    ta.join(5)
    repair.silent_close(result["a_conn"])
    lsock.close()
    time.sleep(0.15)  # the client's delayed ACK of the last segment has left

    st = dict(shim.state)
    syn = shim.synack_values()
    assert st["c_ws"] >= 0 and st["s_ws"] >= 0 and st["c_ts"] and st["s_ts"]
    offset = (syn["ack"] - (st["na"] + 1) - len(HEAD)) & 0xFFFFFFFF
    assert 0 < offset < TOTAL and offset <= result["a_sent"] - len(HEAD)
    shim.migrate()

    def server_b():
        try:
            result["t_b"] = time.monotonic()
            s = repair.repaired_socket(
                (B_IP, PORT), (C_IP, result["client_port"]), rcv_nxt=syn["seq"], snd_nxt=syn["ack"],
                mss=st["c_mss"], snd_wscale=st["c_ws"], rcv_wscale=st["s_ws"], sack=st["c_sack"] and st["s_sack"],
                timestamps=True, ts_val=syn["tsecr"] + 1, snd_wnd=syn["window"] << st["c_ws"],
                rcv_wnd=65535 << st["s_ws"])
            result["t_repaired"] = time.monotonic()
            s.sendall(body[offset:])
            s.settimeout(5)
            result["b_got"] = _recv_exact_until(s, len(b"NEXT-REQUEST"), time.monotonic() + 5)
            s.close()
        except Exception as exc:  # noqa: BLE001
            result["b_error"] = exc

    tb = thread_in(topo.ns("b"), server_b)
    tb.join(20)
    tc.join(20)
    b_listener.close()
    assert "b_error" not in result, result.get("b_error")
    got = result["received"]
    assert len(got) == len(HEAD) + TOTAL, (len(got), offset)
    assert got[:len(HEAD)] == HEAD
    assert hashlib.sha256(got[len(HEAD):]).hexdigest() == want
    assert result["b_got"] == b"NEXT-REQUEST"
    assert shim.error is None
    repair_ms = (result["t_repaired"] - result["t_b"]) * 1000
    print(f"offset {offset}, repair {repair_ms:.2f} ms, shim {shim.counts}")
    assert repair_ms < 50


@needs_netns
def test_taken_tuple_gives_a_clear_error_and_odd_timestamps_become_even():
    with Topology() as topo:
        out = {}

        def run():
            try:
                out.update(_tuple_and_timestamp_checks())
            except Exception as exc:  # noqa: BLE001
                out["error"] = exc

        thread_in(topo.ns("b"), run).join(10)
        prefix = topo.prefix
    assert leftover_namespaces(prefix) == []
    if "error" in out:
        raise out["error"]
    assert out["usec_low_bit"] == 1  # Linux >= 6.7: the hazard even_timestamp() avoids


def _tuple_and_timestamp_checks() -> dict:
    common = dict(rcv_nxt=1000, snd_nxt=5000, mss=1460, snd_wscale=7, rcv_wscale=7, sack=True, timestamps=True,
                  ts_val=12345, snd_wnd=65535 << 7, rcv_wnd=65535 << 7)
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    srv, peer = lsock.accept()
    # the live server-side socket holds (127.0.0.1:port, peer): the tuple is taken
    with pytest.raises(repair.RepairError) as ei:
        repair.repaired_socket(("127.0.0.1", port), peer, **common)
    assert ei.value.errno == errno.EADDRNOTAVAIL and ei.value.step == "connect"
    assert "taken" in str(ei.value)
    # a second repaired socket for one tuple: the same error
    first = repair.repaired_socket(("127.0.0.1", port), ("127.0.0.1", 1), window_probe=False, **common)
    with pytest.raises(repair.RepairError) as ei2:
        repair.repaired_socket(("127.0.0.1", port), ("127.0.0.1", 1), window_probe=False, **common)
    assert ei2.value.errno == errno.EADDRNOTAVAIL
    first.close()
    # an address that is not ours
    with pytest.raises(repair.RepairError) as ei3:
        repair.repaired_socket(("10.99.99.99", port), ("127.0.0.1", 2), window_probe=False, **common)
    assert ei3.value.step == "bind" and ei3.value.errno == errno.EADDRNOTAVAIL
    for s in (cli, srv, lsock):
        s.close()

    # TCP_TIMESTAMP: an odd ts_val is rounded up to even, so the clock stays in milliseconds
    odd = 1_000_001
    s = repair.repaired_socket(("127.0.0.1", 40001), ("127.0.0.1", 40002), window_probe=False,
                               **{**common, "ts_val": odd})
    got = struct.unpack("I", s.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, 4))[0]
    assert got & 1 == 0 and 0 <= got - (odd + 1) < 50, got
    time.sleep(0.03)
    later = struct.unpack("I", s.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, 4))[0]
    assert 20 <= later - got < 500  # milliseconds, not microseconds
    # set_timestamp: a live socket's clock moved forward (a client's ts_recent was ahead of it)
    moved = repair.set_timestamp(s, later + 100_001)
    now = struct.unpack("I", s.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, 4))[0]
    assert moved == later + 100_002 and 0 <= now - moved < 50, (moved, now)
    assert s.getsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR) == 0  # out of repair mode again
    s.close()
    # the hazard itself: an odd value set by hand selects usec timestamps (the getter's low bit)
    raw = socket.socket()
    raw.setsockopt(socket.IPPROTO_TCP, repair.TCP_REPAIR, 1)
    raw.setsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, struct.pack("I", odd))
    usec = struct.unpack("I", raw.getsockopt(socket.IPPROTO_TCP, repair.TCP_TIMESTAMP, 4))[0]
    raw.close()
    assert repair.even_timestamp(odd) == odd + 1 and repair.even_timestamp(odd + 1) == odd + 1
    assert repair.even_timestamp(0xFFFFFFFF) == 0
    return {"usec_low_bit": usec & 1}
