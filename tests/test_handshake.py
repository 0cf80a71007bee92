"""appliance.handshake, sans-I/O: the Migrate SYN and its retransmissions, the SYN/ACK and the
repair parameters it gives (SACK blocks included), where to resume for every entry state, and
the Migrate RST, checked by the client appliance's own shim."""

from __future__ import annotations

import socket

import pytest

import _fastpath as fp
from appliance import handshake as hs_
from appliance import repair
from appliance.shim import IN, OUT, ClientShim
from appliance.sync import Entry, ObjectRef

C_IP, A_IP, B_IP = "10.0.0.1", "10.0.0.2", "10.0.0.3"


def make_entry(**kw) -> Entry:
    base = dict(client_ip=socket.inet_aton(C_IP), client_port=40000, server_ip=socket.inet_aton(A_IP),
                server_port=80, ni=1000, na=50000, c_mss=1460, c_wscale=7, c_sack=True, c_ts=True, s_mss=1460,
                s_wscale=9, s_sack=True, s_ts=True, mp=True, reqno=0, state="ACTIVE",
                object=ObjectRef("example", "/f.bin", '"e1"', "Mon, 01 Jan 2024 00:00:00 GMT", 10000),
                req_range=None, status=200, body_start=50001 + 200, body_offset=0, body_length=10000)
    base.update(kw)
    return Entry(**base)


def synack(entry, seq=1234, ack=None, window=501, tsval=777, tsecr=888888, flags=fp.SYN | fp.ACK, src=C_IP,
           dst=B_IP, sport=None, dport=80, sack=()) -> bytes:
    ack = (entry.body_start + 100) if ack is None else ack
    opts = b"" if tsval is None else bytes((1, 1)) + fp.opt_timestamps(tsval, tsecr)
    if sack:
        opts += bytes((1, 1)) + fp.opt_sack(sack)
    return fp.build_tcp(src, dst, entry.client_port if sport is None else sport, dport, seq, ack, flags, window, opts)


def view(packet):
    return fp.parse(packet, fp.LINK_RAW)


# --- The Migrate SYN --------------------------------------------------------------------------------


def test_migrate_syn_carries_only_the_migrate_option_with_the_right_fields():
    e = make_entry(reqno=5)
    hs = hs_.Handshake(e, B_IP, now=10.0)
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


def test_the_migrate_syns_window_says_failover_or_planned():
    assert view(hs_.Handshake(make_entry(), B_IP, 0.0).datagrams(0.0)[0]).window == hs_.FAILOVER
    assert view(hs_.Handshake(make_entry(), B_IP, 0.0, failover=False).datagrams(0.0)[0]).window == 0


def test_reqno_wraps_and_local_port_can_differ():
    e = make_entry(reqno=127)
    hs = hs_.Handshake(e, B_IP, 0.0, local_port=8080)
    v = view(hs.datagrams(0.0)[0])
    assert v.migrate_reqno == 0 and v.sport == 8080
    assert v.migrate_request == fp.migrate_request(e.ni, e.na, b"", e.body_start, 0)


def test_retransmission_schedule_and_giving_up():
    hs = hs_.Handshake(make_entry(), B_IP, now=100.0, give_up=3.0)
    sent = []
    t = 100.0
    while t < 104.0:
        if hs.expired(t):
            break
        if hs.datagrams(t):
            sent.append(round(t - 100.0, 3))
        t = round(t + 0.01, 6)
    assert sent == pytest.approx([0.0, 0.2, 0.6, 1.4], abs=0.0101)  # first at once, then 200 ms doubling
    assert round(t - 100.0, 3) == pytest.approx(3.0, abs=0.0101) and hs.state == hs_.EXPIRED
    assert "no SYN/ACK within 3 s (4 Migrate SYNs" in hs.reason
    assert hs.datagrams(200.0) == [] and hs.next_deadline() is None
    # identical retransmissions
    hs2 = hs_.Handshake(make_entry(), B_IP, 0.0, initial_rto=0.05, backoff=3, give_up=1.0)
    a = hs2.datagrams(0.0)
    times = []
    while hs2.next_deadline() is not None and len(times) < 10:
        d = hs2.next_deadline()
        times.append(d)
        if hs2.expired(d):
            break
        assert hs2.datagrams(d) == a  # identical retransmissions
    assert times == pytest.approx([0.05, 0.2, 0.65, 1.0])  # x3 backoff; the give-up comes first
    assert hs2.attempts == 4 and hs2.state == hs_.EXPIRED


def test_late_timer_sends_one_syn_not_a_burst():
    hs = hs_.Handshake(make_entry(), B_IP, now=0.0)
    assert hs.datagrams(0.0)
    assert len(hs.datagrams(1.0)) == 1 and hs.datagrams(1.0) == []
    assert hs.next_deadline() == pytest.approx(1.4)


# --- The SYN/ACK ------------------------------------------------------------------------------------


def test_synack_gives_the_repair_parameters():
    e = make_entry()
    hs = hs_.Handshake(e, B_IP, now=1.0)
    hs.datagrams(1.0)
    p = hs.on_synack(view(synack(e, seq=0xFFFFFFF0, ack=e.body_start + 4000, window=501, tsval=42, tsecr=888888)),
                     1.0125)
    assert hs.state == hs_.ANSWERED
    assert p.local == (B_IP, 80) and p.remote == (C_IP, 40000)
    assert p.rcv_nxt == 0xFFFFFFF0 and p.snd_nxt == e.body_start + 4000
    assert p.mss == 1460 and p.snd_wscale == 7 and p.rcv_wscale == 9 and p.sack and p.timestamps
    assert p.ts_val == 888890 and p.ts_val % 2 == 0  # TSecr + 1 rounded up to even
    assert p.snd_wnd == 501 << 7 and p.rcv_wnd == 65535 << 9
    assert hs.synack.rtt == pytest.approx(0.0125) and hs.synack.tsval == 42 and hs.synack.attempts == 1
    odd = hs_.Handshake(e, B_IP, 0.0)
    odd.datagrams(0.0)
    assert odd.on_synack(view(synack(e, tsecr=888887)), 0.1).ts_val == 888888
    # a second answer (the client appliance answering a retransmission) is not ours any more
    assert hs.on_synack(view(synack(e)), 1.1) is None


def test_synack_rejections():
    e = make_entry()
    hs = hs_.Handshake(e, B_IP, now=0.0)
    hs.datagrams(0.0)
    for bad in (synack(e, sport=40001), synack(e, src="10.0.0.9"), synack(e, dport=81), synack(e, dst="10.0.0.4"),
                synack(e, flags=fp.SYN), synack(e, flags=fp.ACK), synack(e, flags=fp.ACK | fp.PSH)):
        assert hs.on_synack(view(bad), 0.1) is None
        assert hs.state == hs_.SENT
    assert hs.on_synack(view(synack(e, flags=fp.RST | fp.ACK)), 0.1) is None
    assert hs.state == hs_.RESET and "refused" in hs.reason
    assert hs.on_synack(view(synack(e)), 0.2) is None  # too late
    late = hs_.Handshake(e, B_IP, 0.0)
    assert late.expired(hs_.GIVE_UP) and late.on_synack(view(synack(e)), 5.0) is None


def test_synack_without_negotiated_options():
    e = make_entry(c_wscale=-1, s_wscale=9, c_ts=False, c_sack=False, c_mss=0)
    hs = hs_.Handshake(e, B_IP, 0.0)
    hs.datagrams(0.0)
    p = hs.on_synack(view(synack(e, window=30000, tsval=None)), 0.1)
    assert p.snd_wscale is None and p.rcv_wscale is None
    assert p.snd_wnd == 30000 and p.rcv_wnd == 65535
    assert not p.sack and not p.timestamps and p.ts_val is None and p.mss == repair.DEFAULT_MSS
    # negotiated timestamps but the SYN/ACK has none: continue without (Linux accepts that)
    e2 = make_entry()
    hs2 = hs_.Handshake(e2, B_IP, 0.0)
    hs2.datagrams(0.0)
    assert hs2.on_synack(view(synack(e2, tsval=None)), 0.1).timestamps is False


def test_handshake_refuses_mixed_families():
    with pytest.raises(ValueError):
        hs_.Handshake(make_entry(), "2001:db8::1", 0.0)


# --- Where to resume ----------------------------------------------------------------------------------


def test_plan_resume_cases():
    e = make_entry()  # na + 1 = 50001, head 200 bytes, body 10000 bytes
    assert hs_.plan_resume(e, e.body_start) == hs_.Plan(hs_.RESUME, 0, 10000)
    assert hs_.plan_resume(e, e.body_start + 4321) == hs_.Plan(hs_.RESUME, 4321, 10000 - 4321)
    assert hs_.plan_resume(e, e.body_start + 9999) == hs_.Plan(hs_.RESUME, 9999, 1)
    assert hs_.plan_resume(e, e.body_start + 10000) == hs_.Plan(hs_.ADOPT)  # complete: idle keep-alive
    beyond = hs_.plan_resume(e, e.body_start + 10500)  # bytes of a response nobody advertised
    assert beyond.kind == hs_.REFUSE and "500 bytes past the advertised response" in beyond.reason
    assert hs_.plan_resume(e, 50001) == hs_.Plan(hs_.WHOLE, 0, 10000)  # the response had not begun
    head = hs_.plan_resume(e, 50001 + 10)
    assert head.kind == hs_.REFUSE and head.reason.startswith("inside the response head")
    assert hs_.plan_resume(e, e.body_start - 1).kind == hs_.REFUSE
    idle = make_entry(state="IDLE", object=None, status=0, body_start=0, body_length=0)
    assert hs_.plan_resume(idle, 12345).kind == hs_.ADOPT


def test_plan_resume_across_the_2_32_wrap_and_ranges():
    na = 0xFFFFFF00  # the head starts before the wrap, the body after it
    e = make_entry(na=na, body_start=(na + 1 + 0x150) & 0xFFFFFFFF, body_offset=1000, body_length=5000,
                   status=206, req_range="bytes=1000-5999")
    assert e.body_start == 0x51
    assert hs_.plan_resume(e, 0x51 + 7) == hs_.Plan(hs_.RESUME, 1007, 4993)
    assert hs_.plan_resume(e, 0x10).kind == hs_.REFUSE  # after the wrap, still inside the head
    assert hs_.plan_resume(e, 0xFFFFFFF0).kind == hs_.REFUSE  # before the wrap, inside the head
    assert hs_.plan_resume(e, (na + 1) & 0xFFFFFFFF) == hs_.Plan(hs_.WHOLE, 1000, 5000)
    e2 = make_entry(na=0xFFFFFF00, body_start=0xFFFFFFFE, body_length=100)  # body across the wrap
    assert hs_.plan_resume(e2, 0x20) == hs_.Plan(hs_.RESUME, 0x22, 100 - 0x22)
    assert hs_.plan_resume(e2, (0xFFFFFFFE + 100) & 0xFFFFFFFF).kind == hs_.ADOPT


def test_ipv6_handshake_in_memory():
    e = make_entry(client_ip=socket.inet_pton(socket.AF_INET6, "2001:db8::1"),
                   server_ip=socket.inet_pton(socket.AF_INET6, "2001:db8::2"))
    hs = hs_.Handshake(e, "2001:db8::3", 0.0)
    v = view(hs.datagrams(0.0)[0])
    assert v.ip_version == 6 and v.flags == fp.SYN and v.opts & fp.HAS_MIGRATE
    assert (v.src_ip, v.dst_ip, v.dport) == ("2001:db8::3", "2001:db8::1", 40000)
    p = hs.on_synack(view(synack(e, src="2001:db8::1", dst="2001:db8::3")), 0.01)
    assert p.local == ("2001:db8::3", 80) and p.remote == ("2001:db8::1", 40000)


def test_plan_for_pending_and_reset_entries():
    p = make_entry(state="PENDING", object=ObjectRef("h", "/next", None, None, 0), status=0, body_start=70000,
                   body_length=0, req_range="bytes=5-")
    assert hs_.plan_resume(p, 70000) == hs_.Plan(hs_.WHOLE, 0, 0)
    refused = hs_.plan_resume(p, 70100)
    assert refused.kind == hs_.REFUSE and "never advertised" in refused.reason
    r = make_entry(state="RESET", object=None, status=0, body_start=0, body_length=0, reason="chunked")
    assert hs_.plan_resume(r, 12345) == hs_.Plan(hs_.RESET_ONLY, reason="chunked")


def test_synack_sack_blocks_tell_what_the_client_holds_above_a_hole():
    e = make_entry()
    h = hs_.Handshake(e, B_IP, 0.0)
    h.datagrams(0.0)
    ack = e.body_start + 1000
    h.on_synack(view(synack(e, ack=ack, sack=[(ack + 3000, ack + 5000), (ack + 6000, ack + 8000)])), 0.01)
    assert h.synack.sack == ((ack + 3000, ack + 5000), (ack + 6000, ack + 8000))
    assert h.synack.held_above == 8000
    h2 = hs_.Handshake(e, B_IP, 0.0)
    h2.datagrams(0.0)
    h2.on_synack(view(synack(e, ack=ack)), 0.01)
    assert h2.synack.held_above == 0


def test_migrate_rst_is_accepted_by_the_client_appliance_as_deliberate():
    """The Migrate RST the engine sends, through the client appliance's shim: P=1 resets the
    client, P=0 gives the connection back; a copy with a tampered seq is rejected."""
    MAC_C, MAC_R = "02:00:00:00:00:11", "02:00:00:00:00:01"
    ni, na = 1000, 50000
    e = make_entry(ni=ni, na=na)
    syn_opts = fp.opt_mss(1460) + fp.opt_sack_permitted() + fp.opt_timestamps(1000, 0) + b"\x01" + fp.opt_wscale(7)

    def eth(packet, src_mac, dst_mac):
        return bytearray(bytes.fromhex(dst_mac.replace(":", "")) + bytes.fromhex(src_mac.replace(":", ""))
                         + b"\x08\x00" + packet)

    for preload in (True, False):
        table = fp.FlowTable(conntrack=True)
        shim = ClientShim(table, probe_timeout=0)
        for f, d in ((fp.build_tcp(C_IP, A_IP, 40000, 80, ni, 0, fp.SYN, 64240, syn_opts, eth_src=MAC_C,
                                   eth_dst=MAC_R), fp.OUT),
                     (fp.build_tcp(A_IP, C_IP, 80, 40000, na, ni + 1, fp.SYN | fp.ACK, 65535, syn_opts,
                                   eth_src=MAC_R, eth_dst=MAC_C), fp.IN),
                     (fp.build_tcp(C_IP, A_IP, 40000, 80, ni + 1, na + 1, fp.ACK, 64240, b"", eth_src=MAC_C,
                                   eth_dst=MAC_R), fp.OUT)):
            buf = bytearray(f) + bytearray(64)
            table.classify_frame(buf, len(f), len(buf), 1.0, False, d)  # the engine records the handshake
        h = hs_.Handshake(e, B_IP, 2.0, failover=False)  # planned: no check that A is silent
        [syn] = h.datagrams(2.0)
        [(d, answer, _)] = shim.handle(IN, eth(syn, MAC_R, MAC_C), 2.0)
        assert d == OUT and fp.parse(answer).flags == fp.SYN | fp.ACK
        rst = hs_.migrate_rst(h, fp.parse(answer).ack, preload=preload)
        tampered = bytearray(rst)
        v = fp.parse(tampered, fp.LINK_RAW)
        tampered[v.l4_off + 4:v.l4_off + 8] = (v.seq + 1).to_bytes(4, "big")
        fp.fix_checksums(tampered, fp.LINK_RAW)
        assert shim.handle(IN, eth(bytes(tampered), MAC_R, MAC_C), 2.1) == []
        assert shim.counters["migrate_rsts_rejected"] == 1
        acts = shim.handle(IN, eth(rst, MAC_R, MAC_C), 2.1)
        conn = list(shim.connections.values())[0]
        if preload:
            assert acts and all(fp.parse(f).flags & fp.RST and d == IN for d, f, _ in acts)
            assert conn.outcome == "reset"
        else:
            assert acts == [] and conn.current == (A_IP, 80) and conn.pending is None


def test_the_probes_answer_is_told_by_its_dsack_and_the_best_ack_is_the_highest_across_the_wrap():
    from appliance.handshake import answers_probe, best_answer
    from appliance.rawsock import ClientAck

    probe = 0xFFFFFFFF  # the D-SACK block of the byte at 2**32 - 1 ends at 0
    answer = ClientAck(0, 20, 500, None, None, ((probe, 0), (100, 200)))
    stale = ClientAck(0, 0xFFFFFFF0, 500, None, None, ((30, 40),))
    assert answers_probe(answer, probe) and not answers_probe(stale, probe)
    assert not answers_probe(ClientAck(0, 20, 500, None, None, ()), probe)
    una = 0xFFFFFF00
    assert best_answer([stale, answer], una) is answer  # 20 is past 0xFFFFFFF0 from una
    assert best_answer([answer, stale], una) is answer  # whatever the order
    again = answer._replace(window=1)
    assert best_answer([answer, again], una) is again  # equals: the latest
    assert best_answer([], una) is None


def test_the_wire_marks_agree_with_the_client_appliance():
    """The Migrate SYN's FAILOVER window and the SYN/ACK's SYNACK_EXACT are read on one side
    and written on the other."""
    from appliance import shim
    assert (hs_.FAILOVER, hs_.SYNACK_EXACT) == (shim.FAILOVER, shim.SYNACK_EXACT)
