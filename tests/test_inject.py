"""Raw-socket injection: a SYN built by the engine reaches a real listener, whose kernel answers."""

import os
import socket
import time

import pytest

import _fastpath as fp
from appliance.inject import RawInjector

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need root")


def _sniff_synack(sniffer, sport, dport, deadline):
    while time.monotonic() < deadline:
        try:
            data = sniffer.recv(65535)
        except socket.timeout:
            continue
        v = fp.parse(data)
        if v.is_tcp and v.sport == sport and v.dport == dport and v.flags & (fp.SYN | fp.ACK) == fp.SYN | fp.ACK:
            return v
    return None


def test_injected_syn_is_answered_by_the_kernel():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sniffer.bind(("lo", 0))
    sniffer.settimeout(0.2)
    inj = RawInjector()
    try:
        syn = fp.build_tcp("127.0.0.1", "127.0.0.1", 61234, port, 0xFFFFFFF0, 0, fp.SYN, 1024,
                           fp.opt_mss(1400) + fp.aligned_option(fp.opt_migrate_permitted()))
        assert inj.send(syn)
        v = _sniff_synack(sniffer, port, 61234, time.monotonic() + 3)
        assert v is not None, "no SYN/ACK for the injected SYN"
        assert v.ack == 0xFFFFFFF1  # the kernel acknowledged our ISN across the wrap
        assert inj.counters["packets"] == 1 and inj.counters["bytes"] == len(syn)
    finally:
        inj.close()
        sniffer.close()
        listener.close()


def test_garbage_is_counted_not_sent():
    inj = RawInjector()
    assert not inj.send(b"\x00\x01\x02")
    assert inj.counters["errors"] == 1 and inj.counters["packets"] == 0
    inj.close()
