"""The client appliance's side of a migration, in memory: Migrate SYN validation, the probe
that asks the client where it is, the SYN/ACK from its answer (or the tracked state), the
network lock, rebinding in the flow table, the old server's reset, retransmitted/redundant/
forged/stale Migrate SYNs, cascades, Migrate RSTs, resetting the client, MIGRATE-WAIT and lock
timeouts."""

import pytest

import _fastpath as fp
from appliance import shim as shim_mod
from appliance.shim import IN, LOCK_TIMEOUT, OUT, PROBE_TIMEOUT, RESET_LINGER, ClientShim

C, A, B, D = "10.70.0.11", "10.70.1.2", "10.70.2.2", "10.70.3.2"
CPORT = 40000
MAC_C, MAC_R = "02:00:00:00:00:11", "02:00:00:00:00:01"
NI, NA = 0xFFFFFF00, 0x7FFFFFF0  # client ISN wraps during the transfer
SYN_OPTS = fp.opt_mss(1460) + fp.opt_sack_permitted() + fp.opt_timestamps(1000, 0) + b"\x01" + fp.opt_wscale(7)


def c2s(seq, ack, flags=fp.ACK, payload=b"", tsval=1100, tsecr=5000, window=3000, sack=()):
    opts = b"\x01\x01" + fp.opt_timestamps(tsval, tsecr)
    if sack:
        opts += b"\x01\x01" + fp.opt_sack(list(sack))
    return bytearray(fp.build_tcp(C, A, CPORT, 80, seq, ack, flags, window, opts, payload, eth_src=MAC_C, eth_dst=MAC_R))


def s2c(src, seq, ack, flags=fp.ACK, payload=b"", tsval=5000, tsecr=1100, window=500, options=None):
    opts = b"\x01\x01" + fp.opt_timestamps(tsval, tsecr) if options is None else options
    return bytearray(fp.build_tcp(src, C, 80, CPORT, seq, ack, flags, window, opts, payload,
                                  eth_src=MAC_R, eth_dst=MAC_C))


def migrate_syn(src, reqno, s=12345, token=None, request=None, failover=False):
    token = fp.migrate_token(NI, NA) if token is None else token
    request = fp.migrate_request(NI, NA, b"", s, reqno) if request is None else request
    return bytearray(fp.build_migrate_syn(src, C, 80, CPORT, s, reqno, token, request, eth_src=MAC_R, eth_dst=MAC_C,
                                          window=1 if failover else 0))


class World:
    """The shim plus its table; frames the fast path decides go through classify()."""

    def __init__(self):
        self.t = fp.FlowTable(conntrack=True)
        self.shim = ClientShim(self.t)
        self.now = 1.0
        self.client_ack = NA + 1 + 8000  # where the client really is (what it answers a probe with)
        self.client_tsecr = 5009  # the last TSval of the server's the client accepted

    def punt(self, direction, frame):
        return self.shim.handle(direction, frame, self.now)

    def migrate(self, src, reqno, sack=None, **kw):
        """A Migrate SYN, the probe it causes, the client's answer (as Linux sends it: a D-SACK
        of the probe's byte first): the shim's SYN/ACK actions."""
        [(d, probe, _)] = self.punt(IN, migrate_syn(src, reqno, **kw))
        p = fp.parse(probe)
        assert d == IN and (p.src_ip, p.dst_ip, p.payload_len) == (A, C, 1) and fp.verify_checksums(probe) == (True, True)
        assert fp.seq_diff(self.client_ack, p.seq) > 1 << 29  # far behind: never data the client could take
        opts = b"\x01\x01" + fp.opt_timestamps(1100, self.client_tsecr)
        opts += b"\x01\x01" + fp.opt_sack([(p.seq, (p.seq + 1) & fp.MASK32)] + list(sack or ()))
        answer = bytearray(fp.build_tcp(C, A, CPORT, 80, (NI + 101) & fp.MASK32, self.client_ack, fp.ACK, 3000,
                                        opts, eth_src=MAC_C, eth_dst=MAC_R))
        return self.path(OUT, answer)

    def path(self, direction, frame):
        """What the appliance does with a frame: the fast path's verdict, or the shim's actions."""
        buf = bytearray(frame) + bytearray(64)
        verdict, n = self.t.classify_frame(buf, len(frame), len(buf), self.now, False,
                                           fp.OUT if direction == OUT else fp.IN)
        frame = buf[:n]
        if verdict == fp.PYTHON:
            return self.punt(direction, frame)
        if verdict == fp.DROP:
            return []
        return [(direction, frame, True)]


@pytest.fixture
def w():
    w = World()
    [(_, syn, _)] = w.path(OUT, bytearray(fp.build_tcp(C, A, CPORT, 80, NI, 0, fp.SYN, 64240, SYN_OPTS,
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
    [(d, synack, keep)] = w.migrate(B, 1)
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
    w.migrate(B, 1)
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
    # A's late frames never reach the client: each is answered with a RST at the ack it carries
    [(d, rst, _)] = w.path(IN, s2c(A, NA + 9001, (NI + 101) & fp.MASK32, payload=b"z" * 10))
    r = fp.parse(rst)
    assert d == OUT and r.flags & fp.RST and (r.src_ip, r.dst_ip, r.seq) == (C, A, (NI + 101) & fp.MASK32)
    assert w.path(IN, s2c(A, NA + 9011, (NI + 101) & fp.MASK32, payload=b"z")) == []  # rate-limited
    w.now += 1.0
    assert len(w.path(IN, s2c(A, NA + 9012, (NI + 101) & fp.MASK32, payload=b"z"))) == 1
    assert w.shim.counters["former_rsts"] == 2 and w.shim.counters["former_rsts_limited"] == 1
    [conn] = w.shim.connections.values()
    assert conn.current == (B, 80) and conn.migrations == 1 and conn.reqno == 1
    kinds = [k for k, _ in w.shim.pop_events()]
    assert "migrate_accepted" in kinds and "migrated" in kinds


def test_retransmitted_migrate_syn_is_answered_again(w):
    [(_, first, _)] = w.migrate(B, 1)
    [(_, again, _)] = w.punt(IN, migrate_syn(B, 1))
    assert first == again and w.shim.counters["migrate_retransmissions"] == 1


def test_redundant_migrate_from_another_server_gets_a_rst(w):
    w.migrate(B, 1)
    [(d, rst, _)] = w.punt(IN, migrate_syn(D, 1))
    r = fp.parse(rst)
    assert d == OUT and r.flags & fp.RST and (r.src_ip, r.dst_ip, r.dport) == (C, D, 80)
    assert w.shim.counters["migrate_rejected_redundant"] == 1
    assert list(w.shim.connections.values())[0].pending[0] == (B, 80)  # nothing changed


@pytest.mark.parametrize("case", ["token", "request", "stale", "stale_unmigrated", "tuple"])
def test_invalid_migrate_syns_get_a_rst_and_change_nothing(w, case):
    if case == "stale_unmigrated":  # a true Token and Request, but ReqNo 0 on a connection never moved
        frame = bytearray(fp.build_migrate_syn(B, C, 80, CPORT, 1, 0, fp.migrate_token(NI, NA),
                                               fp.migrate_request(NI, NA, b"", 1, 0), eth_src=MAC_R, eth_dst=MAC_C))
    elif case == "stale":
        w.migrate(B, 5)
        w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32))  # B is live with ReqNo 5
        frame = migrate_syn(D, 3)
    elif case == "token":
        frame = migrate_syn(B, 1, token=0x1234)
    elif case == "request":
        frame = migrate_syn(B, 1, request=0x1234)
    else:  # the right token, sent to another client port
        frame = bytearray(fp.build_migrate_syn(B, C, 80, CPORT + 1, 1, 1, fp.migrate_token(NI, NA),
                                               fp.migrate_request(NI, NA, b"", 1, 1), eth_src=MAC_R, eth_dst=MAC_C))
    conn = w.shim.connections.get((C, CPORT, A, 80))
    before = (conn.current, conn.reqno, conn.pending) if conn else None
    rec = w.t.connection(C, CPORT, A, 80)
    [(d, rst, _)] = w.punt(IN, frame)
    assert d == OUT and fp.parse(rst).flags & fp.RST
    assert w.shim.counters[f"migrate_rejected_{case.split('_')[0]}"] == 1
    if conn is not None:
        assert (conn.current, conn.reqno, conn.pending) == before
    else:  # still only the engine's: an invalid Migrate SYN makes no Python object
        assert w.shim.connections == {} and w.t.connection(C, CPORT, A, 80) == rec and not rec.pinned


def test_cascade_a_to_b_to_d_then_back_to_a(w):
    w.migrate(B, 1)
    w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32, tsval=7000))
    w.path(IN, s2c(B, NA + 8001, (NI + 101) & fp.MASK32, payload=b"y" * 2000, tsval=7001))
    w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 10001, tsval=1200))
    w.client_ack, w.client_tsecr = NA + 10001, 7001
    [(_, synack, _)] = w.migrate(D, 2)
    v = fp.parse(synack)
    assert (v.dst_ip, v.ack, v.tsecr, v.tsval) == (D, NA + 10001, 7001, 1100)  # TSecr from B's flow now
    acts = w.path(IN, s2c(D, NA + 10000, (NI + 101) & fp.MASK32))
    assert fp.parse(acts[-1][1]).dst_ip == B  # the old server B is reset
    [(_, out, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 10001))
    assert fp.parse(out).dst_ip == D
    # back to A (the original): no rewriting needed any more
    w.migrate(A, 3)
    w.path(IN, s2c(A, NA + 10000, (NI + 101) & fp.MASK32))
    [(_, out, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 10001))
    assert fp.parse(out).dst_ip == A and w.t.get(C, CPORT, A, 80).verdict == fp.PASS
    conn = list(w.shim.connections.values())[0]
    assert conn.servers == [(A, 80), (B, 80), (D, 80), (A, 80)] and conn.migrations == 3


def test_migrate_wait_rst_is_discarded_when_a_migrate_comes(w):
    assert w.path(IN, s2c(A, NA + 10001, 0, fp.RST)) == []  # held
    conn = list(w.shim.connections.values())[0]
    assert conn.held_rst is not None
    w.migrate(B, 1)
    assert conn.held_rst is None and w.shim.counters["rsts_discarded"] == 1
    w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32))
    assert w.shim.handle_timer(w.now + 100) == []  # nothing left to deliver
    assert conn.state == "established"


def test_lock_timeout_restores_the_previous_binding(w):
    w.migrate(B, 1)
    w.now += LOCK_TIMEOUT + 0.5
    w.shim.handle_timer(w.now)
    conn = list(w.shim.connections.values())[0]
    assert conn.pending is None and conn.current == (A, 80) and w.shim.counters["lock_timeouts"] == 1
    [(_, out, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 8001))
    assert fp.parse(out).dst_ip == A


def test_partial_checksum_frames_rewritten_in_python(w):
    """Frames of the new server that reach Python during the lock keep a valid pseudo-header sum."""
    import struct
    w.migrate(B, 1)
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


def test_the_synack_comes_from_the_clients_answer_not_a_poisoned_table(w):
    """Frames with a valid checksum but a forged ack cannot make the shim resume the server ahead."""
    for i in range(50):
        w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 1 + 8000 + 500 + i, tsval=1100))  # acks data A sent
    [(_, synack, _)] = w.migrate(B, 1)
    assert fp.parse(synack).ack == NA + 1 + 8000  # the client's own answer, lower than the table's
    assert w.shim.counters["probe_answers"] == 1


def test_a_bad_checksum_answer_is_not_taken(w):
    [(_, probe, _)] = w.punt(IN, migrate_syn(B, 1))
    bad = c2s((NI + 101) & fp.MASK32, NA + 1 + 9999)
    bad[-1] ^= 0xFF  # the payload-less frame's last option byte: checksum now wrong
    assert w.path(OUT, bad) == []
    assert w.shim.counters["probe_bad_checksum"] == 1
    pseq = fp.parse(probe).seq
    [(_, synack, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 1 + 8000, sack=[(pseq, pseq + 1)]))
    assert fp.parse(synack).ack == NA + 1 + 8000


def test_without_an_answer_the_client_is_asked_again_then_the_tracked_state_is_used(w):
    from appliance.shim import PROBE_PATIENCE
    [(d, probe, _)] = w.punt(IN, migrate_syn(B, 1))
    assert w.shim.next_deadline() <= w.now + PROBE_TIMEOUT
    assert w.shim.handle_timer(w.now + PROBE_TIMEOUT / 2) == []
    t, probes = w.now, []
    synack = None
    for _ in range(20):  # asked again, the waits doubling, before anything is guessed
        t = w.shim.next_deadline()
        acts = w.shim.handle_timer(t)
        if acts and acts[0][0] == OUT:
            [(d, synack, _)] = acts
            break
        probes += [fp.parse(f).dst_ip for d, f, _ in acts]
    assert probes and set(probes) == {C} and t - w.now >= PROBE_PATIENCE
    assert fp.parse(synack).ack == NA + 1 + 8000
    assert w.shim.counters["probe_timeouts"] == len(probes) + 1
    # a retransmitted Migrate SYN during the probe waits; after it, it is answered again
    assert w.punt(IN, migrate_syn(B, 1)) == [(OUT, bytearray(synack), False)]


def test_sack_blocks_above_the_hole_go_into_the_synack(w):
    blocks = [(NA + 1 + 9000, NA + 1 + 10000)]
    [(_, synack, _)] = w.migrate(B, 1, sack=blocks)
    v = fp.parse(synack)
    assert v.sack_blocks == tuple(blocks) and v.ack == NA + 1 + 8000


def migrate_rst(src, reqno, seq, preload=True, token=None):
    token = fp.migrate_token(NI, NA) if token is None else token
    opt = fp.aligned_option(fp.opt_migrate(preload, reqno, token, fp.migrate_request(NI, NA, b"", seq, reqno)))
    return bytearray(fp.build_tcp(src, C, 80, CPORT, seq, 0, fp.RST, 0, opt, eth_src=MAC_R, eth_dst=MAC_C))


def test_migrate_rst_resets_the_client_at_once_at_its_exact_position(w):
    w.migrate(B, 1)
    acts = w.path(IN, migrate_rst(B, 1, NA + 1 + 8000))
    rsts = [fp.parse(f) for d, f, _ in acts]
    assert acts and all(d == IN for d, _, _ in acts)
    assert all(r.flags & fp.RST and (r.src_ip, r.sport, r.dst_ip) == (A, 80, C) for r in rsts)
    assert NA + 1 + 8000 in [r.seq for r in rsts]  # the client's answer: exactly its rcv_nxt
    assert all(fp.verify_checksums(f) == (True, True) for _, f, _ in acts)
    conn = list(w.shim.connections.values())[0]
    assert (conn.state, conn.outcome) == ("resetting", "reset")
    # the client still sends (it had moved on): each of its frames gets a RST at its own ack
    [(d, rst, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 1 + 8500))
    assert d == IN and fp.parse(rst).seq == NA + 1 + 8500 and fp.parse(rst).flags & fp.RST
    assert w.path(IN, s2c(A, NA + 9001, 0, payload=b"late")) == []  # nothing of the servers' gets through
    w.shim.handle_timer(w.now + RESET_LINGER + 0.1)
    assert conn.state == "closed" and conn.closed_by == "appliance"
    assert w.shim.counters["client_resets"] == 1 and w.shim.counters["outcome_reset"] == 1
    assert any(k == "client_reset" for k, _ in w.shim.pop_events())


@pytest.mark.parametrize("case", ["other_source", "reqno", "token", "request"])
def test_forged_migrate_rsts_are_rejected_and_counted(w, case):
    w.migrate(B, 1)
    if case == "other_source":
        f = migrate_rst(D, 1, NA + 1)
    elif case == "reqno":
        f = migrate_rst(B, 2, NA + 1)
    elif case == "token":
        f = migrate_rst(B, 1, NA + 1, token=0x99)
    else:
        f = migrate_rst(B, 1, NA + 1)
        v = fp.parse(f)
        f[v.l4_off + 4:v.l4_off + 8] = (NA + 2).to_bytes(4, "big")  # seq no longer the one Request covers
        fp.fix_checksums(f)
    acts = w.path(IN, f)
    conn = list(w.shim.connections.values())[0]
    assert conn.state == "migrating" and conn.outcome is None and conn.reset_until is None
    if case == "other_source":  # not a server of this connection: passed on, the client's kernel ignores it
        assert [fp.parse(x).dst_ip for _, x, _ in acts] == [C] and w.shim.counters["migrate_rsts_rejected"] == 0
    else:
        assert acts == [] and w.shim.counters["migrate_rsts_rejected"] == 1


def test_migrate_rst_without_p_abandons_the_migration(w):
    w.migrate(B, 1)
    assert w.path(IN, migrate_rst(B, 1, NA + 1, preload=False)) == []
    conn = list(w.shim.connections.values())[0]
    assert conn.pending is None and conn.current == (A, 80) and conn.state == "established"
    [(_, out, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 8001))
    assert fp.parse(out).dst_ip == A and w.shim.counters["migrations_abandoned"] == 1


def test_migrate_wait_ends_in_a_valid_reset_not_the_held_frame(w):
    from appliance.shim import MIGRATE_WAIT
    assert w.path(IN, s2c(A, NA + 10001, 0, fp.RST)) == []
    conn = list(w.shim.connections.values())[0]
    assert w.shim.next_deadline() <= w.now + MIGRATE_WAIT
    acts = w.shim.handle_timer(w.now + MIGRATE_WAIT)
    assert acts and all(fp.verify_checksums(f) == (True, True) and fp.parse(f).flags & fp.RST for _, f, _ in acts)
    assert NA + 1 + 8000 in [fp.parse(f).seq for _, f, _ in acts]  # the client's last ack
    assert conn.outcome == "reset" and "MIGRATE-WAIT" in conn.outcome_reason


def test_outcome_resumed_once_the_new_server_is_live(w):
    w.migrate(B, 1)
    w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32))
    conn = list(w.shim.connections.values())[0]
    assert conn.outcome == "resumed" and w.shim.counters["outcome_resumed"] == 1
    assert w.shim.snapshot()[0]["outcome"] == "resumed"


def test_a_failover_is_refused_while_the_server_still_sends(w):
    """A failover Migrate SYN (window 1) first probes the server; a frame from it = alive."""
    [(d, probe, _)] = w.punt(IN, migrate_syn(B, 1, failover=True))
    p = fp.parse(probe)
    assert d == OUT and (p.src_ip, p.dst_ip, p.payload_len) == (C, A, 1) and fp.verify_checksums(probe) == (True, True)
    assert w.punt(IN, migrate_syn(B, 1, failover=True)) == []  # a retransmission waits for the check
    acts = w.path(IN, s2c(A, NA + 1 + 10000, (NI + 101) & fp.MASK32, payload=b"x" * 1000))  # A lives
    kinds = [(d, fp.parse(f).flags & fp.RST, fp.parse(f).dst_ip) for d, f, _ in acts]
    assert (IN, 0, C) in kinds and (OUT, fp.RST, B) in kinds  # forwarded; B's Migrate SYN reset
    [rst] = [fp.parse(f) for d, f, _ in acts if d == OUT]
    assert rst.opts & fp.HAS_MIGRATE and not rst.migrate_preload and rst.migrate_reqno == 1  # "alive", signed
    assert rst.migrate_request == fp.migrate_request(NI, NA, b"", rst.seq, 1)
    conn = list(w.shim.connections.values())[0]
    assert conn.current == (A, 80) and conn.pending is None and conn.check is None
    assert w.shim.counters["migrate_rejected_server_alive"] == 1
    assert w.t.get(A, 80, C, CPORT).verdict == fp.PASS  # bound as before
    assert w.shim.handle_timer(w.now + 1.0) == []  # the check's deadline is moot


def test_a_failover_proceeds_once_the_server_stays_silent(w):
    [(d, probe, _)] = w.punt(IN, migrate_syn(B, 1, failover=True))
    assert w.shim.next_deadline() <= w.now + 0.1
    assert w.shim.handle_timer(w.now + 0.001) == []
    [(d, client_probe, _)] = w.shim.handle_timer(w.now + 0.11)  # silence: accept, ask the client
    pseq = fp.parse(client_probe).seq
    assert d == IN and fp.parse(client_probe).dst_ip == C
    # an ACK the client sent before the probe reached it: no D-SACK of the probe's byte, kept
    assert w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 1 + 7000)) == []
    assert w.shim.counters["probe_stale_answers"] == 1
    [(d, synack, _)] = w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 1 + 8000, sack=[(pseq, pseq + 1)]))
    v = fp.parse(synack)
    assert d == OUT and v.flags == fp.SYN | fp.ACK and v.dst_ip == B and v.ack == NA + 1 + 8000
    # the answer to the probe of a failover whose server was silent: exact, the taker may skip its own
    assert v.urgent == shim_mod.SYNACK_EXACT


def test_a_stale_ack_answers_only_when_no_answer_to_the_probe_comes(w):
    [(d, client_probe, _)] = w.punt(IN, migrate_syn(B, 1))
    assert w.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 1 + 7000)) == []  # no D-SACK: sent before the probe
    [(d, synack, _)] = w.shim.handle_timer(w.now + PROBE_TIMEOUT)
    v = fp.parse(synack)
    assert d == OUT and v.flags == fp.SYN | fp.ACK and v.ack == NA + 1 + 7000 and v.urgent == 0  # not exact
    assert w.shim.counters["probe_stale_answers"] == 1 and w.shim.counters["probe_answers"] == 0


def test_a_planned_migrations_answer_is_not_exact(w):
    """The old server lives during a planned migration: a frame of it forwarded just before
    the lock may reach the client after the probe, so the taker must ask again."""
    [(_, synack, _)] = w.migrate(B, 1)
    assert fp.parse(synack).urgent == 0 and fp.parse(synack).ack == NA + 1 + 8000


def test_a_failover_is_refused_at_once_when_the_server_was_just_heard(w):
    w.path(IN, s2c(A, NA + 1 + 10000, (NI + 101) & fp.MASK32, payload=b"x" * 1000))  # at w.now
    w.now += 0.002
    [(d, rst, _)] = w.punt(IN, migrate_syn(B, 1, failover=True))
    assert d == OUT and fp.parse(rst).flags & fp.RST and fp.parse(rst).dst_ip == B
    assert w.shim.counters["migrate_rejected_server_alive"] == 1 and w.shim.counters["server_checks"] == 1


def test_a_refused_failovers_late_copy_is_refused_too_and_an_abandoned_reqno_gets_a_fresh_answer(w):
    # the server lives: the failover is refused; a retransmission of it still in flight later
    # (its sender already gave up) must not be accepted
    w.punt(IN, migrate_syn(B, 1, failover=True))
    w.path(IN, s2c(A, NA + 1 + 10000, (NI + 101) & fp.MASK32, payload=b"x" * 100))
    w.now += 0.3
    [(d, rst, _)] = w.punt(IN, migrate_syn(B, 1, failover=True))
    assert d == OUT and fp.parse(rst).flags & fp.RST and fp.parse(rst).opts & fp.HAS_MIGRATE
    assert list(w.shim.connections.values())[0].pending is None
    # a planned migration is accepted, then abandoned by its taker (a Migrate RST without P)
    w.now += 3.0
    w.migrate(B, 2)
    first = list(w.shim.connections.values())[0].synack
    assert w.path(IN, bytearray(fp.build_tcp(B, C, 80, CPORT, NA + 1, 0, fp.RST, 0, fp.aligned_option(fp.opt_migrate(
        False, 2, fp.migrate_token(NI, NA), fp.migrate_request(NI, NA, b"", NA + 1, 2))), eth_src=MAC_R,
        eth_dst=MAC_C))) == []
    assert list(w.shim.connections.values())[0].pending is None
    # the taker tries again with the same ReqNo: a new acceptance, asked afresh (never the old SYN/ACK)
    w.client_ack = NA + 1 + 9500
    [(d, synack, _)] = w.migrate(B, 2)
    assert fp.parse(synack).ack == NA + 1 + 9500 and bytes(synack) != first


def test_a_silence_is_decided_only_once_the_adapter_has_read_every_frame_up_to_the_deadline(w):
    """On a loaded host the server's answer to the check may sit unread when the timer fires:
    the shim asks the adapter (caught_up) and looks again in FENCE_STEP, up to FENCE_MAX."""
    from appliance import shim as shim_mod
    asked = []
    behind = {"in": True}
    w.shim.caught_up = lambda direction, t: asked.append((direction, t)) or not behind[direction]
    w.punt(IN, migrate_syn(B, 1, failover=True))
    deadline = w.shim.next_deadline()
    assert w.shim.handle_timer(deadline + 0.001) == []  # not decided: frames may be unread
    assert asked[-1] == ("in", deadline) and w.shim.counters["fence_waits"] == 1
    assert w.shim.next_deadline() == pytest.approx(deadline + 0.001 + shim_mod.FENCE_STEP)
    # the answer was there after all: the server lives, the failover is refused
    acts = w.path(IN, s2c(A, NA + 1 + 10000, (NI + 101) & fp.MASK32, payload=b"x" * 100))
    assert any(d == OUT and fp.parse(f).flags & fp.RST for d, f, _ in acts)
    assert w.shim.counters["migrate_rejected_server_alive"] == 1
    # another failover; the adapter stays behind: decided FENCE_MAX after the deadline anyway
    w.now += 3.0
    w.punt(IN, migrate_syn(B, 2, failover=True))
    deadline = w.shim.next_deadline()
    t = deadline
    for _ in range(1000):
        t = w.shim.next_deadline()
        acts = w.shim.handle_timer(t)
        if acts:
            break
    assert t >= deadline + shim_mod.FENCE_MAX
    [(d, client_probe, _)] = acts  # accepted: the client is asked for its position
    assert d == IN and fp.parse(client_probe).dst_ip == C


def test_the_lock_timeout_waits_while_the_new_servers_first_ack_may_be_unread(w):
    """A loaded appliance may not have read the new server's first ACK when the lock's time is
    up: it is decided only once the adapter has read every frame up to then (or FENCE_MAX)."""
    behind = {"in": True, "out": False}
    w.shim.caught_up = lambda direction, t: not behind[direction]
    w.migrate(B, 1)
    conn = list(w.shim.connections.values())[0]
    deadline = conn.pending[2] + LOCK_TIMEOUT
    assert w.shim.handle_timer(deadline + 0.001) == [] and conn.pending is not None
    assert w.shim.counters["lock_timeouts"] == 0 and w.shim.counters["fence_waits"] >= 1
    # the first ACK was there after all: the migration completes
    w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32))
    assert conn.pending is None and conn.current == (B, 80) and conn.outcome == "resumed"


def test_after_a_lock_timeout_the_abandoned_migrators_frames_still_reach_the_shim(w):
    """A taker whose first ACK came too late still holds a socket: its frames get a RST, and its
    Migrate RST with P (nobody can continue) resets the client, which never hangs."""
    w.migrate(B, 1)
    w.now += LOCK_TIMEOUT + 0.5
    w.shim.handle_timer(w.now)
    conn = list(w.shim.connections.values())[0]
    assert conn.pending is None and conn.current == (A, 80) and w.shim.counters["lock_timeouts"] == 1
    [(d, rst, _)] = w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32, payload=b"\0"))
    r = fp.parse(rst)
    assert d == OUT and r.flags & fp.RST and (r.src_ip, r.dst_ip) == (C, B) and w.shim.counters["former_rsts"] == 1
    acts = w.path(IN, migrate_rst(B, 1, NA + 1 + 8000))
    assert acts and all(d == IN and fp.parse(f).flags & fp.RST and fp.parse(f).dst_ip == C for d, f, _ in acts)
    assert NA + 1 + 8000 in [fp.parse(f).seq for _, f, _ in acts]
    assert conn.outcome == "reset" and w.shim.counters["migrate_rsts"] == 1
    from appliance.shim import CLOSED_LINGER, SWEEP_INTERVAL
    for _ in range(3):
        w.now += max(RESET_LINGER, CLOSED_LINGER, SWEEP_INTERVAL) + 1
        w.shim.handle_timer(w.now)
    assert not w.shim.connections
    assert w.t.get(B, 80, C, CPORT) is None  # forgotten with the connection: no entry left behind


def test_another_member_may_use_the_reqno_of_an_abandoned_migration(w):
    """A taker's Migrate SYN of a false suspicion arrives late and is accepted; the taker has
    given up, the lock times out. When the server really dies, another member sends ReqNo 1
    too (it cannot know that it was used): accepted, not refused as redundant."""
    w.migrate(D, 1)
    w.now += LOCK_TIMEOUT + 0.5
    w.shim.handle_timer(w.now)
    conn = list(w.shim.connections.values())[0]
    assert conn.pending is None and w.shim.counters["migrations_abandoned"] == 1
    [(d, synack, _)] = w.migrate(B, 1)
    s = fp.parse(synack)
    assert d == OUT and s.flags & (fp.SYN | fp.ACK) == fp.SYN | fp.ACK and s.dst_ip == B
    assert w.shim.counters["migrate_rejected_redundant"] == 0
    w.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32))
    assert conn.current == (B, 80) and conn.outcome == "resumed"
    # once it has succeeded, the same ReqNo from a third member is redundant again
    w.punt(IN, migrate_syn(A, 1))
    assert w.shim.counters["migrate_rejected_redundant"] == 1
