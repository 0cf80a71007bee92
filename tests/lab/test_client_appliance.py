"""The lab with both appliances running: downloads through the client appliance, the replicas'
stream maps checked against what curl did and against an independent capture, ARP/ICMP across
the bridge, malformed frames counted, and the Migrate-Permitted tag on the wire.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import tempfile
import time

import pytest

import labutil
from appliance.lab import file_sha256, wait_for
from appliance.statusfile import read_events, read_status

pytestmark = pytest.mark.lab

SIZES = ("1k", "100k", "1m", "10m")


@pytest.fixture(scope="module", params=["builtin", "nginx"])
def lab(request, netns_ok):
    with labutil.running_lab(server=request.param, client_path="appliance", appliances=True,
                             object_sizes=SIZES) as lab:
        yield lab






def curl(lab, *args, timeout=60):
    return lab.run("c1", ["curl", "-sS", "--max-time", "50", *args], timeout=timeout)


@pytest.mark.parametrize("replica", ["a", "b", "c"])
def test_keepalive_downloads_byte_identical(lab, replica):
    with tempfile.TemporaryDirectory() as d:
        out = [os.path.join(d, f"o{i}") for i in range(3)]
        paths = ["/obj-10m", "/obj-1k", "/obj-1m"]
        args = []
        for p, o in zip(paths, out):
            args += [lab.url(replica, p), "-o", o]
        r = curl(lab, *args, "-w", "%{num_connects}\n")
        assert r.stdout.split() == ["1", "0", "0"]  # one connection, kept alive for all three
        for p, o in zip(paths, out):
            assert file_sha256(o) == lab.objects[p][1]


@pytest.mark.parametrize("rng", ["100-199", "1000-", "-4096", "5000000-5999999"])
def test_range_requests_byte_exact(lab, rng):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "part")
        r = curl(lab, "-r", rng, lab.url("b", "/obj-10m"), "-o", out, "-w", "%{http_code}")
        assert r.stdout == "206"
        data = open(os.path.join(lab.docroot, "obj-10m"), "rb").read()
        first, _, last = rng.partition("-")
        if not first:
            want = data[-int(last):]
        else:
            want = data[int(first):int(last) + 1 if last else None]
        assert open(out, "rb").read() == want


def test_icmp_and_arp_cross_the_bridge(lab):
    lab.run("c1", ["ip", "neigh", "flush", "dev", "eth0"])
    for replica in ("a", "b", "c"):
        r = lab.run("c1", ["ping", "-c", "2", "-i", "0.2", "-W", "2", lab.ip(replica)], check=False, timeout=10)
        assert r.returncode == 0, r.stdout + r.stderr
    neigh = lab.run("c1", ["ip", "-j", "neigh", "show", "dev", "eth0"]).stdout
    router = [n for n in json.loads(neigh) if n.get("dst") == "10.70.0.1"]
    assert router and router[0].get("lladdr"), neigh  # the ARP reply came back through the appliance
    table = wait_for(lambda: read_status(lab.lab_dir, "client", "ca")["table"]["non_tcp"] > 0, 5)
    assert table


def _send_raw(lab, frames):
    """Send raw Ethernet frames out of c1's eth0 (from inside its namespace)."""
    code = ("import socket,sys,binascii\n"
            "s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n"
            "s.bind(('eth0',0))\n"
            "for h in sys.argv[1:]: s.send(binascii.unhexlify(h))\n")
    import sys
    lab.run("c1", [sys.executable, "-c", code, *[f.hex() for f in frames]])


def test_malformed_frames_are_counted_and_the_bridge_carries_on(lab):
    mac = bytes.fromhex("020000000001")
    eth = b"\xff" * 6 + mac + b"\x08\x00"
    ip_ok = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, 0, 64, 6, 0, socket.inet_aton("10.70.0.11"),
                        socket.inet_aton(lab.ip("a")))
    frames = [
        eth + b"\x43" + ip_ok[1:],                                  # IHL 3
        eth + ip_ok[:2] + struct.pack("!H", 1400) + ip_ok[4:] + bytes(20),  # total length lies
        eth + ip_ok + struct.pack("!HHIIBBHHH", 1, 80, 0, 0, 0x30, 2, 0, 0, 0),  # TCP data offset 3
        eth + ip_ok[:2] + struct.pack("!H", 30) + ip_ok[4:] + bytes(10),  # TCP header cut at 10 bytes
    ]
    before = read_status(lab.lab_dir, "client", "ca")["table"]
    _send_raw(lab, frames)
    after = wait_for(lambda: (s := read_status(lab.lab_dir, "client", "ca")["table"])["malformed"]
                     >= before["malformed"] + 3 and s, 5)
    assert after, "malformed frames were not counted"
    errs, errs0 = after["errors"], before["errors"]
    assert errs["BAD_IHL"] > errs0["BAD_IHL"]
    assert errs["BAD_IP_LENGTH"] > errs0["BAD_IP_LENGTH"]
    assert errs["BAD_TCP_OFFSET"] > errs0["BAD_TCP_OFFSET"]
    assert errs["TRUNCATED_L4"] > errs0["TRUNCATED_L4"]
    # and the bridge still forwards
    with tempfile.TemporaryDirectory() as d:
        curl(lab, lab.url("a", "/obj-1m"), "-o", os.path.join(d, "x"))
        assert file_sha256(os.path.join(d, "x")) == lab.objects["/obj-1m"][1]


def _capture(lab, node, iface, path, bpf):
    proc = lab.popen(node, ["tcpdump", "-Z", "root", "--immediate-mode", "-i", iface, "-nn", "-s", "2048", "-U", "-w", path, bpf],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # tcpdump says "listening on" once the capture is active
    deadline = time.monotonic() + 5
    line = b""
    while time.monotonic() < deadline and b"listening" not in line:
        line = proc.stderr.readline()
    return proc


def test_stream_map_matches_curl_and_the_capture(lab):
    """Server a's stream map: the URLs and lengths curl asked for, the client's tagged SYN, and
    body-start sequence numbers equal to what an independent tcpdump capture shows."""
    from scapy.all import rdpcap  # the independent oracle for the capture

    with tempfile.TemporaryDirectory() as d:
        pcap = os.path.join(d, "a.pcap")
        cap = _capture(lab, "a", "eth0", pcap, "tcp port 80")
        try:
            paths = ["/obj-100k", "/obj-1m"]
            args = []
            for p in paths:
                args += [lab.url("a", p), "-o", os.path.join(d, p.strip("/"))]
            curl(lab, *args)
            time.sleep(0.5)
        finally:
            cap.terminate()
            cap.wait(5)
        packets = rdpcap(pcap)

    syns = [p for p in packets if p["TCP"].flags & 0x02 and not p["TCP"].flags & 0x10]
    assert syns, "no SYN captured"
    syn = syns[-1]
    cport = syn["TCP"].sport
    exp = [o for o in syn["TCP"].options if o[0] == 253]
    assert exp and exp[0][1][:2] == b"MP", "the client's SYN reached the server without Migrate-Permitted"
    synack = [p for p in packets if p["TCP"].dport == cport and p["TCP"].flags & 0x12 == 0x12][-1]
    heads = []
    for p in packets:
        tcp = p["TCP"]
        payload = bytes(tcp.payload)
        if tcp.sport == 80 and tcp.dport == cport and payload.startswith(b"HTTP/"):
            head_len = payload.index(b"\r\n\r\n") + 4
            heads.append((tcp.seq + head_len) & 0xFFFFFFFF)

    def responses():
        evs = [e for e in read_events(lab.lab_dir, "server", "a")
               if e["event"] == "response_start" and e["client_port"] == cport]
        return evs if len(evs) == 2 else None

    events = wait_for(responses, timeout=5)
    assert events, "server a did not map both responses"
    assert [e["request"]["path"] for e in events] == paths
    assert [e["response"]["content_length"] for e in events] == [lab.objects[p][0] for p in paths]
    assert [e["response"]["body_start"] for e in events] == heads
    assert all(e["response"]["resumable"] for e in events)
    assert events[0]["ni"] == syn["TCP"].seq and events[0]["na"] == synack["TCP"].seq
    assert events[0]["migrate_permitted"] is True
    assert len({e["response"]["etag"] for e in events}) == 2


def test_client_appliance_keeps_shim_state(lab):
    with tempfile.TemporaryDirectory() as d:
        curl(lab, lab.url("c", "/obj-1m"), "-o", os.path.join(d, "x"))

    def conn():
        st = read_status(lab.lab_dir, "client", "ca")
        for c in st["connections"]:
            if c["server"] == [lab.ip("c"), 80] and c["server_to_client"] and c["server_to_client"]["frames"]:
                return c
        return None

    c = wait_for(conn, 5)
    assert c and c["tagged"] and c["migrate_permitted"]
    assert c["client_syn"]["mss"] and c["server_syn"]["isn"] is not None
    s2c, c2s = c["server_to_client"], c["client_to_server"]
    # the client acknowledged the whole response: 1 MiB of body plus the head, past the server's ISN
    acked = (c2s["ack"] - c["server_syn"]["isn"] - 1) % 2**32
    assert acked > 1 << 20
    assert c2s["tsval"] is not None and s2c["tsval"] is not None
    assert s2c["last_seen"] > 0 and c2s["window"] > 0
