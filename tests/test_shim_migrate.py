"""The client appliance's side of a migration, in memory: Migrate SYN validation, the SYN/ACK
from the tracked state, the network lock, rebinding in the flow table, the old server's reset,
retransmitted/redundant/forged/stale Migrate SYNs, cascades, MIGRATE-WAIT and lock timeouts."""

import pytest

import _fastpath as fp
from appliance.shim import IN, LOCK_TIMEOUT, OUT, ClientShim

C, A, B, D = "10.70.0.11", "10.70.1.2", "10.70.2.2", "10.70.3.2"
CPORT = 40000
MAC_C, MAC_R = "02:00:00:00:00:11", "02:00:00:00:00:01"
NI, NA = 0xFFFFFF00, 0x7FFFFFF0  # client ISN wraps during the transfer
SYN_OPTS = fp.opt_mss(1460) + fp.opt_sack_permitted() + fp.opt_timestamps(1000, 0) + b"\x01" + fp.opt_wscale(7)


def c2s(seq, ack, flags=fp.ACK, payload=b"", tsval=1100, tsecr=5000, window=3000):
    return bytearray(fp.build_tcp(C, A, CPORT, 80, seq, ack, flags, window,
                                  b"\x01\x01" + fp.opt_timestamps(tsval, tsecr), payload, eth_src=MAC_C, eth_dst=MAC_R))


def s2c(src, seq, ack, flags=fp.ACK, payload=b"", tsval=5000, tsecr=1100, window=500, options=None):
    opts = b"\x01\x01" + fp.opt_timestamps(tsval, tsecr) if options is None else options
    return bytearray(fp.build_tcp(src, C, 80, CPORT, seq, ack, flags, window, opts, payload,
                                  eth_src=MAC_R, eth_dst=MAC_C))


def migrate_syn(src, reqno, s=12345, token=None, request=None):
    token = fp.migrate_token(NI, NA) if token is None else token
    request = fp.migrate_request(NI, NA, b"", s, reqno) if request is None else request
    return bytearray(fp.build_migrate_syn(src, C, 80, CPORT, s, reqno, token, request, eth_src=MAC_R, eth_dst=MAC_C))


class World:
    """The shim plus its table; frames the fast path decides go through classify()."""

    def __init__(self):
        self.t = fp.FlowTable(default_punt=fp.SYN)
        self.shim = ClientShim(self.t)
        self.now = 1.0

    def punt(self, direction, frame):
        return self.shim.handle(direction, frame, self.now)

    def path(self, direction, frame):
        """What the appliance does with a frame: the fast path's verdict, or the shim's actions."""
        verdict = self.t.classify(frame, self.now)
        if verdict == fp.PYTHON:
            return self.punt(direction, frame)
        if verdict == fp.DROP:
            return []
        return [(direction, frame, True)]


@pytest.fixture
def w():
    w = World()
    [(_, syn, _)] = w.punt(OUT, bytearray(fp.build_tcp(C, A, CPORT, 80, NI, 0, fp.SYN, 64240, SYN_OPTS,
                                                          eth_src=MAC_C, eth_dst=MAC_R)))
    assert fp.parse(syn).opts & fp.HAS_MIGRATE_PERMITTED
    w.path(IN, s2c(A, NA, NI + 1, fp.SYN | fp.ACK, options=SYN_OPTS))
    # the client sends a request, A sends 10 segments of body, the client acks 8 of them
    w.path(OUT, c2s((NI + 1) & fp.MASK32, NA + 1, payload=b"G" * 100, tsval=1050))
    for i in range(10):
        w.path(IN, s2c(A, NA + 1 + i * 1000, (NI + 101) & fp.MASK32, payload=b"x" * 1000, tsval=5000 + i))
    w.now = 2.0
    w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 1 + 8000, tsval=1100, window=3000))
    return w


def test_migrate_syn_is_answered_from_the_tracked_state(w):
    [(d, synack, keep)] = w.punt(IN, migrate_syn(B, 1))
    v = fp.parse(synack)
    assert d == OUT and not keep
    assert (v.src_ip, v.sport, v.dst_ip, v.dport) == (C, CPORT, B, 80)
    assert v.flags == fp.SYN | fp.ACK and not v.opts & fp.HAS_MIGRATE
    assert v.seq == (NI + 101) & fp.MASK32  # the client's byte that A acknowledged (across the wrap)
    assert v.ack == NA + 1 + 8000  # the client's rcv_nxt
    assert v.window == 3000 and v.tsval == 1100 and v.tsecr == 5009  # TSecr: A's last TSval
    assert fp.verify_checksums(synack) == (True, True)
    assert w.shim.counters["migrate_syns"] == 1


def test_lock_then_rebind_then_old_server_reset(w):
    w.punt(IN, migrate_syn(B, 1))
    # the lock: the client's frames are dropped, B's RST (its kernel's answer to our SYN/ACK) too
    assert w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 8001)) == []
    assert w.path(IN, s2c(B, 0, 0, fp.RST)) == []
    assert w.shim.counters["lock_dropped_rst"] == 1
    # B's first ACK (its window probe): the client sees it from A; A gets an in-window RST
    probe = s2c(B, NA + 8000, (NI + 101) & fp.MASK32, tsval=5020)
    acts = w.path(IN, probe)
    assert len(acts) == 2
    (d1, f1, keep1), (d2, rst, _) = acts
    v = fp.parse(f1)
    assert d1 == IN and keep1 and (v.src_ip, v.sport) == (A, 80) and fp.verify_checksums(f1) == (True, True)
    r = fp.parse(rst)
    assert d2 == OUT and r.flags & fp.RST and (r.src_ip, r.dst_ip) == (C, A) and r.seq == (NI + 101) & fp.MASK32
    # now the fast path rewrites both ways; A's late frames are dropped
    [(_, out, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 9001))
    assert (fp.parse(out).dst_ip, fp.verify_checksums(out)) == (B, (True, True))
    [(_, back, _)] = w.path(IN, s2c(B, NA + 9001, (NI + 101) & fp.MASK32, payload=b"y" * 1000))
    assert (fp.parse(back).src_ip, fp.verify_checksums(back)) == (A, (True, True))
    assert w.path(IN, s2c(A, NA + 9001, (NI + 101) & fp.MASK32, payload=b"z" * 10)) == []
    [conn] = w.shim.connections.values()
    assert conn.current == (B, 80) and conn.migrations == 1 and conn.reqno == 1
    kinds = [k for k, _ in w.shim.pop_events()]
    assert "migrate_accepted" in kinds and "migrated" in kinds


def test_retransmitted_migrate_syn_is_answered_again(w):
    [(_, first, _)] = w.punt(IN, migrate_syn(B, 1))
    [(_, again, _)] = w.punt(IN, migrate_syn(B, 1))
    assert first == again and w.shim.counters["migrate_retransmissions"] == 1


def test_redundant_migrate_from_another_server_gets_a_rst(w):
    w.punt(IN, migrate_syn(B, 1))
    [(d, rst, _)] = w.punt(IN, migrate_syn(D, 1))
    r = fp.parse(rst)
    assert d == OUT and r.flags & fp.RST and (r.src_ip, r.dst_ip, r.dport) == (C, D, 80)
    assert w.shim.counters["migrate_rejected_redundant"] == 1
    assert list(w.shim.connections.values())[0].pending[0] == (B, 80)  # nothing changed


@pytest.mark.parametrize("case", ["token", "request", "stale", "tuple"])
def test_invalid_migrate_syns_get_a_rst_and_change_nothing(w, case):
    conn = list(w.shim.connections.values())[0]
    if case == "stale":
        w.punt(IN, migrate_syn(B, 5))
        w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32))  # B is live with ReqNo 5
        frame = migrate_syn(D, 3)
    elif case == "token":
        frame = migrate_syn(B, 1, token=0x1234)
    elif case == "request":
        frame = migrate_syn(B, 1, request=0x1234)
    else:  # the right token, sent to another client port
        frame = bytearray(fp.build_migrate_syn(B, C, 80, CPORT + 1, 1, 1, fp.migrate_token(NI, NA),
                                               fp.migrate_request(NI, NA, b"", 1, 1), eth_src=MAC_R, eth_dst=MAC_C))
    before = (conn.current, conn.reqno, conn.pending)
    [(d, rst, _)] = w.punt(IN, frame)
    assert d == OUT and fp.parse(rst).flags & fp.RST
    assert w.shim.counters[f"migrate_rejected_{case}"] == 1
    assert (conn.current, conn.reqno, conn.pending) == before


def test_cascade_a_to_b_to_d_then_back_to_a(w):
    w.punt(IN, migrate_syn(B, 1))
    w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32, tsval=7000))
    w.path(IN, s2c(B, NA + 8001, (NI + 101) & fp.MASK32, payload=b"y" * 2000, tsval=7001))
    w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 10001, tsval=1200))
    [(_, synack, _)] = w.punt(IN, migrate_syn(D, 2))
    v = fp.parse(synack)
    assert (v.dst_ip, v.ack, v.tsecr, v.tsval) == (D, NA + 10001, 7001, 1200)  # from B's flow now
    acts = w.path(IN, s2c(D, NA + 10000, (NI + 101) & fp.MASK32))
    assert fp.parse(acts[-1][1]).dst_ip == B  # the old server B is reset
    [(_, out, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 10001))
    assert fp.parse(out).dst_ip == D
    # back to A (the original): no rewriting needed any more
    w.punt(IN, migrate_syn(A, 3))
    w.path(IN, s2c(A, NA + 10000, (NI + 101) & fp.MASK32))
    [(_, out, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 10001))
    assert fp.parse(out).dst_ip == A and w.t.get(C, CPORT, A, 80).verdict == fp.PASS
    conn = list(w.shim.connections.values())[0]
    assert conn.servers == [(A, 80), (B, 80), (D, 80), (A, 80)] and conn.migrations == 3


def test_migrate_wait_rst_is_discarded_when_a_migrate_comes(w):
    assert w.path(IN, s2c(A, NA + 10001, 0, fp.RST)) == []  # held
    conn = list(w.shim.connections.values())[0]
    assert conn.held_rst is not None
    w.punt(IN, migrate_syn(B, 1))
    assert conn.held_rst is None and w.shim.counters["rsts_discarded"] == 1
    w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32))
    assert w.shim.tick(w.now + 100) == []  # nothing left to deliver
    assert conn.state == "established"


def test_lock_timeout_restores_the_previous_binding(w):
    w.punt(IN, migrate_syn(B, 1))
    w.now += LOCK_TIMEOUT + 0.5
    w.shim.tick(w.now)
    conn = list(w.shim.connections.values())[0]
    assert conn.pending is None and conn.current == (A, 80) and w.shim.counters["lock_timeouts"] == 1
    [(_, out, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 8001))
    assert fp.parse(out).dst_ip == A


def test_partial_checksum_frames_rewritten_in_python(w):
    """Frames of the new server that reach Python during the lock keep a valid pseudo-header sum."""
    import struct
    w.punt(IN, migrate_syn(B, 1))
    f = s2c(B, NA + 8000, (NI + 101) & fp.MASK32, payload=b"q" * 300)
    v = fp.parse(f)
    ip = bytes(f[v.l3_off + 12:v.l3_off + 20])
    pseudo = fp.internet_checksum(ip + struct.pack("!BBH", 0, 6, v.ip_end - v.l4_off))
    struct.pack_into("!H", f, v.l4_off + 16, ~pseudo & 0xFFFF)  # what the kernel leaves for offload
    acts = w.shim.handle(IN, f, w.now, partial=True)
    out = acts[0][1]
    o = fp.parse(out)
    want = fp.internet_checksum(bytes(out[o.l3_off + 12:o.l3_off + 20]) + struct.pack("!BBH", 0, 6, o.ip_end - o.l4_off))
    assert struct.unpack_from("!H", out, o.l4_off + 16)[0] == ~want & 0xFFFF and acts[0][2]
