"""`appliance server` for real: a capture in a network namespace, checked against its own pcap.

Two namespaces joined by a veth pair (mig-t<hex>-s with the HTTP server and the server
appliance, mig-t<hex>-c with curl), made and removed here. The error paths run anywhere.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from appliance import statusfile

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ADDRS = {4: ("10.99.0.1", "10.99.0.2", 24), 6: ("fd00:99::1", "fd00:99::2", 64)}
SIZES = {"small.bin": 5000, "large.bin": 300000}


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_unusable():
    if os.geteuid() != 0:
        return "needs root for network namespaces and capture"
    for tool in ("ip", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    return None


@pytest.fixture
def netns_pair():
    reason = _netns_unusable()
    if reason:
        pytest.skip(reason)
    tag = "mig-t" + secrets.token_hex(3)
    s, c = f"{tag}-s", f"{tag}-c"
    made = []
    try:
        for ns in (s, c):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("-n", s, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", c)
        for i, ns in enumerate((s, c)):
            for fam, addrs in ADDRS.items():
                extra = ["nodad"] if fam == 6 else []
                _ip("-n", ns, "addr", "add", f"{addrs[i]}/{addrs[2]}", "dev", "eth0", *extra)
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield s, c
    finally:
        for ns in made:
            _ip("netns", "del", ns, check=False)


def _wait(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _stop(p: subprocess.Popen, sig=signal.SIGTERM, timeout=5.0):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return p.returncode


HTTP_SERVERS = {
    # Python's own: the head and the body leave in separate sends
    "http.server": lambda root, ip: [PYTHON, "-m", "http.server", "--protocol", "HTTP/1.1", "--bind", ip,
                                     "--directory", str(root), "80"],
    # the project's: head corked with a sendfile body, so the head rides in a TSO super-frame
    # that the 4096-byte snaplen cuts
    "appliance.httpserver": lambda root, ip: [PYTHON, "-m", "appliance.httpserver", "--root", str(root),
                                              "--bind", ip, "--port", "80"],
}


@pytest.mark.lab
@pytest.mark.parametrize("server,family", [("http.server", 4), ("appliance.httpserver", 4), ("http.server", 6)])
def test_capture_two_requests_on_one_keep_alive_connection(netns_pair, tmp_path, server, family):
    from scapy.config import conf

    conf.verb = 0
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap

    if server == "appliance.httpserver" and not (REPO / "appliance" / "httpserver.py").exists():
        pytest.skip("appliance.httpserver is not there")
    ns_s, ns_c = netns_pair
    server_ip, client_ip, _ = ADDRS[family]
    url_host = server_ip if family == 4 else f"[{server_ip}]"
    docroot = tmp_path / "www"
    docroot.mkdir()
    for name, size in SIZES.items():
        (docroot / name).write_bytes(os.urandom(size))
    state = tmp_path / "state"
    pcap = tmp_path / "tap.pcap"
    procs = []
    try:
        argv = HTTP_SERVERS[server](docroot, server_ip)
        httpd = subprocess.Popen(["ip", "netns", "exec", ns_s, *argv], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(httpd)
        app = subprocess.Popen(
            ["ip", "netns", "exec", ns_s, PYTHON, "-m", "appliance", "server", "--iface", "eth0", "--port", "80",
             "--node", "s", "--state-dir", str(state), "--pcap-out", str(pcap), "--status-interval", "0.2",
             "--events", "all"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(app)
        _wait(lambda: (statusfile.read_status(state, "server", "s") or {}).get("ready") or app.poll() is not None,
              10, "the server appliance to be ready")
        assert app.poll() is None, app.communicate()
        _wait(lambda: "LISTEN" in _ip("netns", "exec", ns_s, "ss", "-Hltn", "sport = :80", check=False).stdout
              or "80" in _ip("netns", "exec", ns_s, "ss", "-Hltn", "sport = :80", check=False).stdout,
              10, "the HTTP server to listen")
        urls = [f"http://{url_host}/{name}" for name in SIZES]
        res = subprocess.run(
            ["ip", "netns", "exec", ns_c, "curl", "-sS", "-g", "--max-time", "10", "-o", "/dev/null", "-o", "/dev/null",
             "-w", "%{num_connects} %{size_download}\\n", *urls], capture_output=True, text=True, timeout=20)
        assert res.returncode == 0, res.stderr
        lines = [line.split() for line in res.stdout.splitlines()]
        assert [int(n) for n, _ in lines] == [1, 0], "curl did not reuse the connection"
        assert [int(size) for _, size in lines] == list(SIZES.values())

        def closed():
            st = statusfile.read_status(state, "server", "s") or {}
            return (st.get("mapper", {}).get("responses") == 2
                    and any(e["event"] == "conn_close" for e in statusfile.read_events(state, "server", "s")))
        _wait(closed, 10, "two responses and the connection's close in the appliance's state")
        assert _stop(app) == 0
        out, err = app.communicate()
        assert err == ""
    finally:
        for p in procs:
            _stop(p)

    final = statusfile.read_status(state, "server", "s")
    assert final["ready"] is False and final["stopped"] is True and final["signal"] == "SIGTERM"
    assert final["node"] == "s" and final["iface"] == "eth0" and final["ports"] == [80]
    for key in ("received", "dropped", "ifdropped", "frames", "bytes"):
        assert isinstance(final["tap"][key], int), key
    assert final["tap"]["dropped"] == 0 and final["mapper"]["malformed_total"] == 0
    # the body never woke the appliance: far fewer frames than the 300 kB body's segments
    assert final["tap"]["frames"] < 40

    events = statusfile.read_events(state, "server", "s")
    kinds = [e["event"] for e in events]
    assert kinds == ["conn_open", "conn_established", "request", "response_start", "request", "response_start", "conn_close"], kinds
    requests = [e["request"] for e in events if e["event"] == "request"]
    assert [r["path"] for r in requests] == [f"/{name}" for name in SIZES]
    assert all(r["method"] == "GET" and r["host"] == url_host for r in requests)
    responses = [e for e in events if e["event"] == "response_start"]
    assert [e["request"]["path"] for e in responses] == [f"/{name}" for name in SIZES]
    assert [e["response"]["content_length"] for e in responses] == list(SIZES.values())
    assert all(e["response"]["status"] == 200 and e["response"]["resumable"] for e in responses)
    if server == "appliance.httpserver":
        assert all(e["response"]["etag"] for e in responses)
    assert events[-1]["closed_by"] == "client" and events[-1]["close_reason"] == "fin"
    conn = final["connections"][0]
    assert conn["requests_total"] == 2 and conn["state"] == "closed" and conn["current"] == 1

    # The appliance's own pcap, read back with scapy: handshake numbers and body start seqs.
    assert subprocess.run(["tcpdump", "-nn", "-r", str(pcap)], capture_output=True).returncode == 0 \
        if shutil.which("tcpdump") else True
    pkts = rdpcap(str(pcap))
    assert len(pkts) == final["tap"]["frames"]
    syn = next(p for p in pkts if TCP in p and p[TCP].flags == "S")
    synack = next(p for p in pkts if TCP in p and p[TCP].flags == "SA")
    assert events[0]["ni"] == syn[TCP].seq and events[0]["na"] == synack[TCP].seq
    assert events[0]["client_port"] == syn[TCP].sport and events[0]["client"] == client_ip
    L3 = IP if family == 4 else IPv6
    assert all(L3 in p for p in pkts)
    assert final["connections"][0]["ip_version"] == family
    heads = []
    for p in pkts:
        if TCP in p and p[L3].src == server_ip:
            payload = bytes(p[TCP].payload)
            if payload.startswith(b"HTTP/"):
                head_len = payload.index(b"\r\n\r\n") + 4
                heads.append((p[TCP].seq, (p[TCP].seq + head_len) & 0xFFFFFFFF))
    assert [(e["response"]["head_seq"], e["response"]["body_start"]) for e in responses] == heads
    gets = [(p[TCP].seq, bytes(p[TCP].payload)) for p in pkts
            if TCP in p and p[L3].src == client_ip and bytes(p[TCP].payload).startswith(b"GET ")]
    assert [(r["start_seq"], r["raw"].encode("latin-1")) for r in requests] == gets
    json.dumps(final)  # the snapshot is plain JSON


def test_missing_interface_exits_2_with_one_line(tmp_path):
    iface = "mig-t" + secrets.token_hex(3)[:4] + "x"
    res = subprocess.run([PYTHON, "-m", "appliance", "server", "--iface", iface, "--node", "s",
                          "--state-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and iface in lines[0] and "Traceback" not in res.stderr
    if os.geteuid() == 0:
        assert lines[0] == f"appliance server: no such interface: {iface}"
    st = statusfile.read_status(tmp_path, "server", "s")
    assert st["ready"] is False and iface in st["error"]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root to drop privileges with setpriv")
def test_missing_privilege_exits_2_with_one_line():
    state = tempfile.mkdtemp(prefix="mig-t-state-")
    try:
        os.chmod(state, 0o777)
        res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-m",
                              "appliance", "server", "--iface", "lo", "--node", "s", "--state-dir", state],
                             cwd=REPO, capture_output=True, text=True, timeout=30)
        if "Permission denied" in res.stderr and "python" in res.stderr.lower():
            pytest.skip("the unprivileged user cannot run this venv's python")
        assert res.returncode == 2, res.stderr
        assert res.stderr.splitlines() == ["appliance server: no permission to capture on lo "
                                           "(needs root or CAP_NET_RAW)"]
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_open_file_limit_is_raised_for_the_capacity_or_the_start_refused():
    import resource
    from appliance.server import FDS_PER_CONNECTION, raise_nofile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert raise_nofile(100) == ""
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 1024 + FDS_PER_CONNECTION * 100
        problem = raise_nofile(10_000_000)  # beyond fs.nr_open: cannot be had
        assert problem.startswith("RLIMIT_NOFILE: node.capacity = 10000000 needs") and "hard limit" in problem
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
