"""The journal (appliance.journal) and the client appliance's state across a restart: what the
shim exports is what a new shim restores, with the same fast-path bindings, and a connection
opened before the restart can still be migrated afterwards (the probe asks the client where
it is: nothing per-frame needs to survive)."""

from __future__ import annotations

import json

import _fastpath as fp
from appliance.journal import Journal
from appliance.shim import IN, OUT, ClientShim, record_dict

C, A, B = "10.70.0.11", "10.70.1.2", "10.70.2.2"
MAC_C, MAC_R = "02:00:00:00:00:11", "02:00:00:00:00:01"
NI, NA = 0xFFFFFF00, 0x7FFFFFF0
SYN_OPTS = fp.opt_mss(1460) + fp.opt_sack_permitted() + fp.opt_timestamps(1000, 0) + b"\x01" + fp.opt_wscale(7)


def test_journal_replays_puts_and_drops_and_ignores_a_torn_tail(tmp_path):
    path = tmp_path / "j"
    j = Journal(path, compact_slack=5)
    assert j.load() == {}
    j.put(("a", 1), {"x": 1})
    j.put(("b", 2), {"x": 2})
    j.put(("a", 1), {"x": 3})
    j.drop(("b", 2))
    j.flush()
    j.close()
    with open(path, "a") as f:
        f.write('{"k": ["c", 3], "v": {"x"')  # the process died mid-write
    j2 = Journal(path, compact_slack=5)
    assert j2.load() == {("a", 1): {"x": 3}} and j2.counters["torn"] == 1
    assert [json.loads(x) for x in path.read_text().splitlines()] == [{"k": ["a", 1], "v": {"x": 3}}]
    for i in range(50):  # many changes to few keys: the file is rewritten, staying small
        j2.put(("a", 1), {"x": i})
        j2.flush()
    j2.sync()
    assert len(path.read_text().splitlines()) < 20 and Journal(path).load() == {("a", 1): {"x": 49}}


class Appliance:
    """A conntrack table and the shim; frames go through the table first, as in the bridge."""

    def __init__(self):
        self.table = fp.FlowTable(conntrack=True)
        self.shim = ClientShim(self.table)

    def path(self, direction, f, now):
        buf = bytearray(f) + bytearray(64)
        verdict, n = self.table.classify_frame(buf, len(f), len(buf), now, False,
                                               fp.OUT if direction == OUT else fp.IN)
        f = buf[:n]
        if verdict == fp.PYTHON:
            return self.shim.handle(direction, f, now)
        return [] if verdict == fp.DROP else [(direction, f, True)]

    def journal(self):
        """What the client appliance journals: the engine's records, and the shim's own."""
        out = []
        for rec in self.table.connections():
            conn = self.shim.connections.get(rec.key)
            out.append(self.shim.export(conn) if conn is not None else {"kind": "conn", "conn": record_dict(rec)})
        return [json.loads(json.dumps(r)) for r in out]


def c2s(seq, ack, flags=fp.ACK, tsval=1100, tsecr=5009, window=3000, payload=b"", probe=None):
    """A client frame; `probe`: the probe it answers (its byte D-SACKed, as Linux does)."""
    opts = b"\x01\x01" + fp.opt_timestamps(tsval, tsecr)
    if probe is not None:
        pseq = fp.parse(probe).seq
        opts += b"\x01\x01" + fp.opt_sack([(pseq, (pseq + 1) & fp.MASK32)])
    return bytearray(fp.build_tcp(C, A, 40000, 80, seq, ack, flags, window, opts, payload, eth_src=MAC_C, eth_dst=MAC_R))


def s2c(src, seq, ack, flags=fp.ACK, tsval=5009, payload=b"", options=None):
    opts = b"\x01\x01" + fp.opt_timestamps(tsval, 1100) if options is None else options
    return bytearray(fp.build_tcp(src, C, 80, 40000, seq, ack, flags, 500, opts, payload, eth_src=MAC_R, eth_dst=MAC_C))


def migrate_syn(src, reqno, s=12345):
    return bytearray(fp.build_migrate_syn(src, C, 80, 40000, s, reqno, fp.migrate_token(NI, NA),
                                          fp.migrate_request(NI, NA, b"", s, reqno), eth_src=MAC_R, eth_dst=MAC_C))


def opened(app, now=1.0):
    app.path(OUT, bytearray(fp.build_tcp(C, A, 40000, 80, NI, 0, fp.SYN, 64240, SYN_OPTS, eth_src=MAC_C,
                                         eth_dst=MAC_R)), now)
    app.path(IN, s2c(A, NA, NI + 1, fp.SYN | fp.ACK, options=SYN_OPTS), now)
    app.path(OUT, c2s(NI + 1, NA + 1), now)  # the handshake complete


def restarted(app, now):
    """A new table and shim from what the old ones journaled."""
    records = app.journal()
    fresh = Appliance()
    assert fresh.shim.restore(records, now) == len(records)
    return fresh


def test_a_connection_opened_before_a_restart_is_migrated_after_it():
    app = Appliance()
    opened(app)
    assert app.shim.connections == {}  # the engine's alone: journaled from its record
    fresh = restarted(app, 3.0)  # nothing per-frame survives: the table is empty of tracking
    t = fresh.table
    assert t.get(C, 40000, A, 80).verdict == fp.PASS and t.get(A, 80, C, 40000) is not None
    assert t.connection(C, 40000, A, 80).token == fp.migrate_token(NI, NA)
    [(d, probe, _)] = fresh.shim.handle(IN, migrate_syn(B, 1), 4.0)
    assert d == IN and fp.parse(probe).payload_len == 1
    [(d, synack, _)] = fresh.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 1 + 8000, tsecr=5009, probe=probe), 4.01)
    v = fp.parse(synack)
    assert d == OUT and v.flags == fp.SYN | fp.ACK
    # everything from the client's own answer: its rcv_nxt, its next byte (the server's ACKs
    # were never seen since the restart), the server TSval it last accepted
    assert (v.ack, v.seq, v.tsecr) == (NA + 1 + 8000, (NI + 101) & fp.MASK32, 5009)
    acts = fresh.path(IN, s2c(B, NA + 8000, (NI + 101) & fp.MASK32), 4.02)
    assert fp.parse(acts[0][1]).src_ip == A
    assert fresh.shim.connections[(C, 40000, A, 80)].current == (B, 80)


def test_without_an_answer_after_a_restart_the_shim_asks_again_rather_than_guess():
    app = Appliance()
    opened(app)
    fresh = restarted(app, 3.0)
    fresh.shim.handle(IN, migrate_syn(B, 1), 4.0)
    acts = fresh.shim.handle_timer(4.0 + fresh.shim.probe_timeout)
    assert [fp.parse(f).payload_len for d, f, _ in acts] == [1] and acts[0][0] == IN  # a second probe, no SYN/ACK
    assert fresh.shim.counters["probe_timeouts"] == 1 and fresh.shim.counters["probes"] == 2


def test_migrated_locked_and_resetting_states_survive():
    app = Appliance()
    opened(app)
    app.path(OUT, c2s((NI + 1) & fp.MASK32, NA + 1, payload=b"G" * 100), 1.5)
    [(_, probe, _)] = app.shim.handle(IN, migrate_syn(B, 1), 2.0)
    app.path(OUT, c2s((NI + 101) & fp.MASK32, NA + 1, probe=probe), 2.01)  # the answer: SYN/ACK sent, the lock is on
    fresh = restarted(app, 3.0)
    conn = fresh.shim.connections[(C, 40000, A, 80)]
    assert conn.pending[0] == (B, 80) and conn.synack is not None
    assert fresh.table.get(C, 40000, A, 80).verdict == fp.DROP  # the lock goes on
    assert fresh.table.connection(C, 40000, A, 80).pinned
    assert fresh.shim.handle(IN, migrate_syn(B, 1), 3.1) == [(OUT, bytearray(conn.synack), False)]  # retransmission
    fresh.path(IN, s2c(B, NA, (NI + 101) & fp.MASK32), 3.2)  # B's first ACK: live
    assert conn.current == (B, 80) and fresh.table.get(C, 40000, A, 80).verdict == fp.REWRITE
    again = restarted(fresh, 4.0)  # and after another restart, still bound to B, A's frames answered
    assert again.table.get(C, 40000, A, 80).verdict == fp.REWRITE
    assert again.table.get(A, 80, C, 40000).verdict == fp.PYTHON
    [(d, rst, _)] = again.path(IN, s2c(A, NA + 5000, (NI + 101) & fp.MASK32, payload=b"late"), 4.1)
    assert d == OUT and fp.parse(rst).flags & fp.RST and fp.parse(rst).dst_ip == A
