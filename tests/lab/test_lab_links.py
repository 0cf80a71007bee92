"""Link shaping: tbf rate on a replica link, delay and loss from the userspace link element."""

from __future__ import annotations

import hashlib
import re
import statistics
import time

import pytest

import labutil
from appliance import statusfile

pytestmark = pytest.mark.lab

RATE_BPS = 4_000_000  # 1 MiB at 4 Mbit/s: about 2.2 s
DELAY_MS = 50
LOSS = 0.1


@pytest.fixture(scope="module")
def lab():
    reason = labutil.netns_unusable()
    if reason:
        pytest.skip(reason)
    links = {"a": {"rate": "4mbit"}, "b": {"delay_ms": DELAY_MS}, "c": {"loss": LOSS, "seed": 7}}
    with labutil.running_lab(client_path="bridge", appliances=False, links=links) as lab:
        yield lab


def rtts(lab, dst, count, interval="0.05"):
    res = lab.run("c1", ["ping", "-n", "-c", str(count), "-i", interval, "-W", "2", dst], check=False, timeout=30)
    return [float(x) for x in re.findall(r"time=([\d.]+) ms", res.stdout)], res.stdout


def test_topology_has_link_elements(lab):
    assert "lb" in lab.nodes and "lc" in lab.nodes and "la" not in lab.nodes
    # interfaces facing a link element have offloads off, others keep them
    assert "tcp-segmentation-offload: off" in lab.run("b", ["ethtool", "-k", "eth0"]).stdout
    assert "tcp-segmentation-offload: off" in lab.run("r", ["ethtool", "-k", "b0"]).stdout
    assert "tcp-segmentation-offload: on" in lab.run("a", ["ethtool", "-k", "eth0"]).stdout
    for node, iface in (("a", "eth0"), ("r", "a0")):
        assert "tbf" in lab.run(node, ["tc", "qdisc", "show", "dev", iface]).stdout


def test_tbf_rate(lab, tmp_path):
    out = tmp_path / "a-1m"
    res = lab.run("c1", ["curl", "-s", "--fail", "-o", str(out), "-w", "%{size_download} %{time_total}",
                         lab.url("a", "/obj-1m")], timeout=20)
    size, secs = res.stdout.split()
    goodput_bps = int(size) * 8 / float(secs)
    assert 0.7 * RATE_BPS <= goodput_bps <= 1.3 * RATE_BPS, f"{goodput_bps / 1e6:.2f} Mbit/s in {secs} s"
    assert hashlib.sha256(out.read_bytes()).hexdigest() == lab.objects["/obj-1m"][1]


def test_delay(lab, tmp_path):
    times, out = rtts(lab, lab.ip("b"), 6, "0.2")
    assert len(times) == 6, out
    steady = times[1:]  # the first one also waited for ARP through the link element
    assert min(steady) >= 2 * DELAY_MS, out
    assert statistics.median(steady) < 2 * DELAY_MS + 50, out
    # bulk TCP through the element: byte-identical, nothing too big for it
    f = tmp_path / "b-1m"
    lab.run("c1", ["curl", "-s", "--fail", "-o", str(f), lab.url("b", "/obj-1m")], timeout=30)
    assert hashlib.sha256(f.read_bytes()).hexdigest() == lab.objects["/obj-1m"][1]
    st = wait_status(lab, "lb", lambda s: s["total"]["tx"] >= 500)
    assert st["total"]["emsgsize"] == 0 and st["total"]["oversize"] == 0
    for d in st["directions"].values():
        assert d["late_avg_ms"] < 5


def wait_status(lab, node, cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    st = None
    for _ in range(200):
        st = statusfile.read_status(lab.lab_dir, "linkem", node)
        if st and cond(st):
            return st
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    raise AssertionError(f"linkem {node} status never satisfied the condition: {st}")


def test_loss(lab):
    before = wait_status(lab, "lc", lambda s: True)["total"]
    n = 300
    times, out = rtts(lab, lab.ip("c"), n, "0.005")
    st = wait_status(lab, "lc", lambda s: s["total"]["rx"] - before["rx"] >= n * 1.5)
    rx = st["total"]["rx"] - before["rx"]
    lost = st["total"]["lost"] - before["lost"]
    assert 0.04 <= lost / rx <= 0.18, f"lost {lost} of {rx}"
    # a ping survives only if both directions pass: about (1 - p)^2 = 81 %
    assert 0.6 * n <= len(times) <= 0.95 * n, out[-300:]
    for d in st["directions"].values():
        assert d["lost"] > 0
