"""appliance.rawsock: the classic BPF filters, the SYN/ACK receiver and the watch on a
repaired socket's 4-tuple, on real raw sockets (root), and the interface address."""

from __future__ import annotations

import os
import socket
import time

import pytest

import _fastpath as fp
from appliance import rawsock as rs

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="raw sockets need root")


def view(packet):
    return fp.parse(packet, fp.LINK_RAW)


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
    rx = rs.Receiver(socket.AF_INET, [port])
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
    prog = rs.synack_filter([80, 8080])
    assert prog[-1] == (0x06, 0, 0, 0) and prog[-2][0] == 0x06 and prog[-2][3] > 0
    for i, (code, jt, jf, k) in enumerate(prog):  # every jump lands inside the program
        if code & 0x07 == 0x05:  # BPF_JMP
            assert i + 1 + jt < len(prog) and i + 1 + jf < len(prog)
    assert rs.synack_filter([80], ipv4=False)[0] == (0x01, 0, 0, 0)
    with pytest.raises(ValueError):
        rs.synack_filter([])


@needs_root
def test_ipv6_receiver_rebuilds_the_ip_header():
    from appliance.inject import RawInjector

    port = _free_port()
    try:
        rx = rs.Receiver(socket.AF_INET6, [port])
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


def test_interface_ipv4():
    assert rs.interface_ipv4("lo") == "127.0.0.1"
    with pytest.raises(OSError):
        rs.interface_ipv4("no-such-if0")


@needs_root
def test_ack_watch_sees_only_the_clients_segments_to_the_repaired_tuple():
    from appliance.inject import RawInjector

    lport, cport = _free_port(), _free_port()
    lo = socket.inet_aton("127.0.0.1")
    w = rs.AckWatch(lo, cport, lo, lport)
    inj = RawInjector()
    try:
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", cport, lport, 0x33330001, 7, fp.SYN))  # no ACK flag
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", cport + 1, lport, 0x33330002, 7, fp.ACK))  # other port
        inj.send(fp.build_tcp("127.0.0.1", "127.0.0.1", cport, lport, 0x33330003, 0x44440003, fp.ACK, 300,
                              bytes((1, 1)) + fp.opt_timestamps(5, 6)))
        got = None
        deadline = time.monotonic() + 2
        while got is None and time.monotonic() < deadline:
            got = w.read()
            time.sleep(0.005)
        assert got == rs.ClientAck(0x33330003, 0x44440003, 300, 5, 6)
        assert w.read() is None  # non-blocking: nothing more
    finally:
        w.close()
        inj.close()
    prog = rs.tuple_filter(lo, cport, lport)
    assert prog[-1] == (0x06, 0, 0, 0) and all(i + 1 + jf < len(prog) for i, (c, jt, jf, k) in enumerate(prog)
                                               if c & 0x07 == 0x05)


@needs_root
def test_old_byte_probes_are_answered_every_time_while_pure_ack_probes_are_rate_limited():
    """Why a taker re-probes the client with one old byte (handshake.old_byte_probe) and not
    with another kernel window probe: the client's kernel answers out-of-window pure ACKs at
    most once per tcp_invalid_ratelimit (500 ms) per socket, data segments every time."""
    from appliance import repair
    from appliance.handshake import RepairParams, answers_probe, old_byte_probe, probe_seq
    from appliance.inject import RawInjector

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    cport = cli.getsockname()[1]
    inj = RawInjector()
    watch = rs.AckWatch(socket.inet_aton("127.0.0.1"), cport, socket.inet_aton("127.0.0.1"), port)
    try:
        cli.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        st = repair.read_state(conn, leave_in_repair=False)
        params = RepairParams(("127.0.0.1", port), ("127.0.0.1", cport), st.rcv_nxt, st.snd_nxt, 1460, 7, 7,
                              True, True, st.tsval, 65535, 65535)

        def answers(packets, gap=0.02):
            got = []
            watch.read()  # drop anything before
            for p in packets:
                assert inj.send(p)
                time.sleep(gap)
                a = watch.read()
                if a is not None:
                    got.append(a)
            return got

        got = answers([old_byte_probe(params) for _ in range(3)])
        assert len(got) == 3 and all(a.ack == st.snd_nxt for a in got)
        # each names itself: a D-SACK of the probe's byte, which no earlier ACK can carry
        assert all(answers_probe(a, probe_seq(params)) for a in got), got
        assert not answers_probe(rs.ClientAck(0, st.snd_nxt, 512, None, None, ()), probe_seq(params))
        pure = fp.build_tcp("127.0.0.1", "127.0.0.1", port, cport, (st.snd_nxt - 1) & fp.MASK32, st.rcv_nxt,
                            fp.ACK, 512, b"\x01\x01" + fp.opt_timestamps(st.tsval, 0))
        assert len(answers([pure, pure, pure])) == 1  # the kernel's 500 ms limit
    finally:
        watch.close()
        inj.close()
        for s in (cli, conn, srv):
            s.close()
