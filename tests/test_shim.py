"""The client appliance's sans-I/O shim: SYN tagging and per-connection state, in memory."""

import pytest

import _fastpath as fp
from appliance.shim import IN, OUT, PUNT_FLAGS, ClientShim, CLOSED_LINGER

C_IP, S_IP = "10.70.0.11", "10.70.1.2"
C6, S6 = "fd70::11", "fd70:1::2"
MAC_C, MAC_R = "02:00:00:00:00:11", "02:00:00:00:00:01"
LINUX_SYN = (fp.opt_mss(1460) + fp.opt_sack_permitted() + fp.opt_timestamps(1000, 0) + b"\x01"
             + fp.opt_wscale(7))


def frame(src, dst, sport, dport, seq, ack=0, flags=fp.ACK, options=b"", payload=b"", window=500):
    return bytearray(fp.build_tcp(src, dst, sport, dport, seq, ack, flags, window, options, payload,
                                  eth_src=MAC_C, eth_dst=MAC_R))


@pytest.fixture
def shim():
    return ClientShim(fp.FlowTable(default_punt=fp.SYN))


def handshake(shim, c=C_IP, s=S_IP, cport=40000, isn=0xFFFFFF00, server_isn=7):
    syn = frame(c, s, cport, 80, isn, flags=fp.SYN, options=LINUX_SYN)
    [(d, out, keep_vnet)] = shim.handle(OUT, syn, 1.0)
    modified = not keep_vnet
    synack = frame(s, c, 80, cport, server_isn, isn + 1, fp.SYN | fp.ACK,
                   fp.opt_mss(1400) + fp.opt_sack_permitted() + fp.opt_timestamps(5000, 1000) + b"\x01"
                   + fp.opt_wscale(9))
    shim.handle(IN, synack, 1.001)
    return out, modified


def test_client_syn_is_tagged_and_stays_valid(shim):
    out, modified = handshake(shim)
    assert modified
    v = fp.parse(out)
    assert v.opts & fp.HAS_MIGRATE_PERMITTED and v.mp_curve == 0
    assert (v.mss, v.wscale, v.tsval) == (1460, 7, 1000)  # the client's own options kept
    assert fp.verify_checksums(out) == (True, True)
    assert shim.counters["syns_tagged"] == 1


def test_connection_state_from_both_syns(shim):
    handshake(shim)
    [conn] = shim.connections.values()
    assert conn.state == "established" and conn.tagged and conn.migrate_permitted
    assert (conn.client_syn.isn, conn.client_syn.mss, conn.client_syn.wscale) == (0xFFFFFF00, 1460, 7)
    assert (conn.server_syn.isn, conn.server_syn.mss, conn.server_syn.wscale) == (7, 1400, 9)
    assert conn.server_syn.sack_permitted and conn.server_syn.timestamps and conn.server_syn.tsval == 5000
    kinds = [k for k, _ in shim.pop_events()]
    assert kinds == ["conn_open", "conn_established"]


def test_table_tracks_latest_ack_window_tsval_each_way_across_the_wrap(shim):
    handshake(shim)
    t = shim.table
    # client ACKs server data; its seq wraps past 2**32 (ISN 0xFFFFFF00)
    for i, ack in enumerate((8, 1456, 2904)):
        assert t.classify(frame(C_IP, S_IP, 40000, 80, 0xFFFFFF01, ack,
                                options=b"\x01\x01" + fp.opt_timestamps(1001 + i, 5000 + i)), 2.0 + i) == fp.PASS
    t.classify(frame(S_IP, C_IP, 80, 40000, 8, 0xFFFFFF01 + 300, payload=b"x" * 1448, window=2000,
                     options=b"\x01\x01" + fp.opt_timestamps(5003, 1003)), 5.5)
    [snap] = shim.snapshot()
    c2s, s2c = snap["client_to_server"], snap["server_to_client"]
    assert (c2s["ack"], c2s["tsval"], c2s["tsecr"], c2s["last_seen"]) == (2904, 1003, 5002, 4.0)
    assert (s2c["ack"], s2c["window"], s2c["tsval"], s2c["last_seen"]) == ((0xFFFFFF01 + 300) % 2**32, 2000, 5003, 5.5)
    assert s2c["seq_next"] == 8 + 1448


def test_retransmitted_syn_is_tagged_identically(shim):
    syn = frame(C_IP, S_IP, 40001, 80, 99, flags=fp.SYN, options=LINUX_SYN)
    [(_, first, _)] = shim.handle(OUT, bytearray(syn), 1.0)
    [(_, again, _)] = shim.handle(OUT, bytearray(syn), 2.0)
    assert first == again
    assert len(shim.connections) == 1


def test_syn_without_room_passes_unchanged(shim):
    full = fp.opt_mss(1460) + fp.opt_sack_permitted() + fp.opt_timestamps(1, 0) + b"\x01" + fp.opt_wscale(7) \
        + b"\x01\x01" + fp.opt_sack([(1, 2), (3, 4)])[:18]  # 40 bytes of options: no room
    syn = frame(C_IP, S_IP, 40002, 80, 5, flags=fp.SYN, options=full[:40])
    assert fp.parse(syn).tcp_hdr_len == 60
    [(_, out, keep_vnet)] = shim.handle(OUT, bytearray(syn), 1.0)
    modified = not keep_vnet
    assert not modified and out == syn
    assert shim.counters["syns_no_room"] == 1
    [conn] = shim.connections.values()
    assert not conn.migrate_permitted


def test_syn_already_permitted_is_not_tagged_twice(shim):
    syn = frame(C_IP, S_IP, 40003, 80, 5, flags=fp.SYN, options=fp.opt_mss(1460) + fp.aligned_option(
        fp.opt_migrate_permitted()))
    [(_, out, keep_vnet)] = shim.handle(OUT, bytearray(syn), 1.0)
    modified = not keep_vnet
    assert not modified and out == syn
    assert list(shim.connections.values())[0].migrate_permitted


def test_known_connections_punt_syn_and_rst_only(shim):
    handshake(shim)
    f = shim.table.get(C_IP, 40000, S_IP, 80)
    assert f.punt_flags == PUNT_FLAGS and f.verdict == fp.PASS
    assert shim.table.classify(frame(C_IP, S_IP, 40000, 80, 1, 8), 3.0) == fp.PASS
    assert shim.table.classify(frame(S_IP, C_IP, 80, 40000, 8, 1, fp.RST | fp.ACK), 3.0) == fp.PYTHON


def test_server_rst_is_held_then_released_and_linger_forgets(shim):
    """MIGRATE-WAIT: a RST from the server reaches the client only if no migrate comes in time."""
    from appliance.shim import MIGRATE_WAIT
    handshake(shim)
    rst = frame(S_IP, C_IP, 80, 40000, 8, 0xFFFFFF01, fp.RST | fp.ACK)
    assert shim.handle(IN, rst, 3.0) == []
    [conn] = shim.connections.values()
    assert conn.state == "established" and shim.counters["rsts_held"] == 1
    assert shim.tick(3.0 + MIGRATE_WAIT / 2) == []
    [(d, out, _)] = shim.tick(3.0 + MIGRATE_WAIT + 0.1)
    assert d == IN and out == rst
    assert conn.state == "closed" and conn.closed_by == "server"
    shim.tick(3.0 + MIGRATE_WAIT + CLOSED_LINGER * 2)
    assert not shim.connections
    assert shim.table.get(C_IP, 40000, S_IP, 80) is None and len(shim.table) == 0


def test_client_rst_passes_and_closes(shim):
    handshake(shim)
    rst = frame(C_IP, S_IP, 40000, 80, 0xFFFFFF01, 8, fp.RST | fp.ACK)
    [(d, out, keep)] = shim.handle(OUT, rst, 3.0)
    assert d == OUT and out == rst and keep
    assert list(shim.connections.values())[0].closed_by == "client"


def test_fin_both_ways_closes(shim):
    handshake(shim)
    shim.table.classify(frame(C_IP, S_IP, 40000, 80, 0xFFFFFF01, 8, fp.FIN | fp.ACK), 4.0)
    shim.table.classify(frame(S_IP, C_IP, 80, 40000, 8, 0xFFFFFF02, fp.FIN | fp.ACK), 4.1)
    shim.tick(5.0)
    assert list(shim.connections.values())[0].closed_by == "fin"


def test_ipv6_connection(shim):
    out, modified = handshake(shim, C6, S6, 40010)
    assert modified and fp.parse(out).opts & fp.HAS_MIGRATE_PERMITTED
    assert fp.verify_checksums(out) == (True, True)
    assert list(shim.connections.values())[0].state == "established"


def test_non_tcp_and_malformed_frames_pass_through(shim):
    junk = bytearray(b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + b"\x45\x00\x00")  # truncated IPv4
    [(d, out, keep_vnet)] = shim.handle(OUT, junk, 1.0)
    assert (d, out, keep_vnet) == (OUT, junk, True)
    assert shim.counters["malformed"] == 1


def test_tagging_can_be_turned_off():
    shim = ClientShim(fp.FlowTable(default_punt=fp.SYN), tag_syns=False)
    out, modified = handshake(shim)
    assert not modified and not fp.parse(out).opts & fp.HAS_MIGRATE_PERMITTED
