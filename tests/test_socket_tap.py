"""The timer-free capture backend: same filter, same answers as the pcapy-ng ring."""

import os
import socket
import time

import pytest

import _fastpath as fp
from appliance.tap import SocketTap, Tap

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="live capture needs root")


def _http_exchange(port):
    srv = socket.create_server(("127.0.0.1", port))
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    cli.sendall(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    conn.recv(1000)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n")
    conn.sendall(b"y" * 3000)  # body: must not be admitted
    cli.recv(10000)
    cli.close()
    conn.close()
    srv.close()


@pytest.mark.parametrize("backend", ["socket", "pcap"])
def test_live_capture_admits_what_the_mapper_needs(backend, tmp_path):
    port = 18000 + os.getpid() % 1000
    pcap = tmp_path / "out.pcap"
    tap = (SocketTap("lo", [port], pcap_out=str(pcap)) if backend == "socket"
           else Tap("lo", [port], timeout_ms=1, pcap_out=str(pcap)))
    try:
        _http_exchange(port)
        frames = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if tap.wait(0.3):
                frames += tap.read()
            elif frames:
                break  # quiet for 0.3 s after the exchange
        views = [fp.parse(f.data) for f in frames]
        assert all(v.is_tcp and port in (v.sport, v.dport) for v in views)
        flags = [v.flags for v in views]
        assert any(f & fp.SYN and not f & fp.ACK for f in flags)  # the SYN
        assert any(v.payload.startswith(b"GET /x") for v in views)
        heads = [v for v in views if v.payload.startswith(b"HTTP/1.1 200")]
        assert heads and not any(v.payload.startswith(b"yyy") for v in views)  # body dropped in the kernel
        assert all(f.wire_len >= len(f.data) for f in frames)
        st = tap.stats()
        assert st["frames"] == len(frames) and st["received"] is not None
    finally:
        tap.close()
    replay = Tap.offline(str(pcap))
    try:
        assert len(replay.read(100)) == len(frames)  # the pcap file holds what was captured
    finally:
        replay.close()


def test_socket_tap_missing_interface():
    from appliance.tap import TapError
    with pytest.raises(TapError) as e:
        SocketTap("nope0", [80])
    assert e.value.kind == "no_such_device"
