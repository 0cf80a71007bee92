"""The client appliance's sans-I/O shim over a conntrack table, in memory: a connection that
never migrates stays in the engine (no Python object); a server RST makes one, held for
MIGRATE-WAIT; the snapshot shows both kinds."""

import pytest

import _fastpath as fp
from appliance.shim import CLOSED_LINGER, IN, OUT, ClientShim

C_IP, S_IP = "10.70.0.11", "10.70.1.2"
C6, S6 = "fd70::11", "fd70:1::2"
MAC_C, MAC_R = "02:00:00:00:00:11", "02:00:00:00:00:01"
LINUX_SYN = (fp.opt_mss(1460) + fp.opt_sack_permitted() + fp.opt_timestamps(1000, 0) + b"\x01"
             + fp.opt_wscale(7))


def frame(src, dst, sport, dport, seq, ack=0, flags=fp.ACK, options=b"", payload=b"", window=500):
    return bytearray(fp.build_tcp(src, dst, sport, dport, seq, ack, flags, window, options, payload,
                                  eth_src=MAC_C, eth_dst=MAC_R))


class Appliance:
    """The table decides each frame (with its direction); what it punts goes to the shim."""

    def __init__(self, **kw):
        self.table = fp.FlowTable(conntrack=True, **kw)
        self.shim = ClientShim(self.table)

    def path(self, direction, f, now):
        buf = bytearray(f) + bytearray(64)
        verdict, n = self.table.classify_frame(buf, len(f), len(buf), now, False,
                                               fp.OUT if direction == OUT else fp.IN)
        f = buf[:n]
        if verdict == fp.PYTHON:
            return self.shim.handle(direction, f, now)
        return [] if verdict == fp.DROP else [(direction, f, True)]


@pytest.fixture
def app():
    return Appliance()


def handshake(app, c=C_IP, s=S_IP, cport=40000, isn=0xFFFFFF00, server_isn=7):
    [(d, out, _)] = app.path(OUT, frame(c, s, cport, 80, isn, flags=fp.SYN, options=LINUX_SYN), 1.0)
    synack = frame(s, c, 80, cport, server_isn, isn + 1, fp.SYN | fp.ACK,
                   fp.opt_mss(1400) + fp.opt_sack_permitted() + fp.opt_timestamps(5000, 1000) + b"\x01"
                   + fp.opt_wscale(9))
    app.path(IN, synack, 1.001)
    app.path(OUT, frame(c, s, cport, 80, isn + 1, server_isn + 1, fp.ACK), 1.002)  # the handshake complete
    return out


def test_a_connection_that_never_migrates_is_no_python_object(app):
    out = handshake(app)
    v = fp.parse(out)
    assert v.opts & fp.HAS_MIGRATE_PERMITTED and fp.verify_checksums(out) == (True, True)  # tagged in C
    assert app.shim.connections == {}
    rec = app.table.connection(C_IP, 40000, S_IP, 80)
    assert rec.state == "established" and rec.tagged and rec.token == fp.migrate_token(0xFFFFFF00, 7)
    assert (rec.client_syn.mss, rec.client_syn.wscale, rec.server_syn.isn, rec.server_syn.wscale) == (1460, 7, 7, 9)
    # data both ways never reaches Python
    assert app.path(OUT, frame(C_IP, S_IP, 40000, 80, 0xFFFFFF01, 8, payload=b"G" * 10), 2.0)[0][0] == OUT
    assert app.path(IN, frame(S_IP, C_IP, 80, 40000, 8, 0xFFFFFF0B, payload=b"x" * 100), 2.0)[0][0] == IN
    assert app.shim.connections == {} and app.shim.counters["punted_other"] == 0
    [snap] = app.shim.snapshot()
    assert snap["state"] == "established" and snap["client"] == [C_IP, 40000] and snap["outcome"] is None
    assert snap["server_to_client"]["seq_next"] == 108


def test_server_rst_is_held_then_the_client_reset_and_linger_forgets(app):
    """MIGRATE-WAIT: a RST from the server is held; if no migrate comes in time, the client is
    reset (with RSTs the shim builds: full checksums, at the client's position)."""
    from appliance.shim import MIGRATE_WAIT, RESET_LINGER
    handshake(app)
    rst = frame(S_IP, C_IP, 80, 40000, 8, 0xFFFFFF01, fp.RST | fp.ACK)
    assert app.path(IN, rst, 3.0) == []
    [conn] = app.shim.connections.values()  # now the shim owns it, pinned in the table
    assert conn.state == "established" and app.shim.counters["rsts_held"] == 1
    assert app.table.connection(C_IP, 40000, S_IP, 80).pinned
    assert app.shim.handle_timer(3.0 + MIGRATE_WAIT / 2) == []
    assert app.shim.next_deadline() <= 3.0 + MIGRATE_WAIT
    acts = app.shim.handle_timer(3.0 + MIGRATE_WAIT + 0.1)
    assert acts and all(d == IN and fp.parse(f).flags & fp.RST and fp.verify_checksums(f) == (True, True)
                        for d, f, _ in acts)
    assert 8 in [fp.parse(f).seq for _, f, _ in acts]  # the server's first byte: where the client is
    assert conn.state == "resetting" and conn.outcome == "reset"
    app.shim.handle_timer(3.0 + MIGRATE_WAIT + RESET_LINGER + 0.2)
    assert conn.state == "closed" and conn.closed_by == "appliance"
    app.shim.handle_timer(3.0 + MIGRATE_WAIT + RESET_LINGER + CLOSED_LINGER * 2)
    assert not app.shim.connections
    assert app.table.connection(C_IP, 40000, S_IP, 80) is None and len(app.table) == 0


def test_client_rst_and_fins_close_in_the_engine(app):
    handshake(app)
    app.path(OUT, frame(C_IP, S_IP, 40000, 80, 0xFFFFFF01, 8, fp.RST | fp.ACK), 3.0)
    assert app.table.connection(C_IP, 40000, S_IP, 80).state == "closed" and not app.shim.connections
    handshake(app, cport=40001)
    app.path(OUT, frame(C_IP, S_IP, 40001, 80, 0xFFFFFF01, 8, fp.FIN | fp.ACK), 4.0)
    app.path(IN, frame(S_IP, C_IP, 80, 40001, 8, 0xFFFFFF02, fp.FIN | fp.ACK), 4.1)
    assert app.table.connection(C_IP, 40001, S_IP, 80).state == "closed"


def test_ipv6_connection(app):
    out = handshake(app, C6, S6, 40010)
    assert fp.parse(out).opts & fp.HAS_MIGRATE_PERMITTED and fp.verify_checksums(out) == (True, True)
    assert app.table.connection(C6, 40010, S6, 80).state == "established"


def test_non_tcp_and_malformed_frames_pass_through(app):
    junk = bytearray(b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + b"\x45\x00\x00")  # truncated IPv4
    [(d, out, keep_vnet)] = app.shim.handle(OUT, junk, 1.0)
    assert (d, out, keep_vnet) == (OUT, junk, True)
    assert app.shim.counters["malformed"] == 1


def test_tagging_can_be_turned_off():
    app = Appliance(tag_syns=False)
    out = handshake(app)
    assert not fp.parse(out).opts & fp.HAS_MIGRATE_PERMITTED


def test_the_shim_needs_a_conntrack_table():
    with pytest.raises(ValueError, match="conntrack"):
        ClientShim(fp.FlowTable())
