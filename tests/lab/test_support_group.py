"""Support groups in the lab: three replicas find each other with real zeroconf (or static
peers), a download from a appears in b's and c's tables, and killing a (its processes and
its links) is detected by b and c within the bound, with one takeover action per connection."""

from __future__ import annotations

import time

import pytest

import labutil
from appliance.lab import wait_for
from appliance.statusfile import read_events, read_status

pytestmark = pytest.mark.lab

DEAD_BOUND = 0.1 + 0.02 + 0.03  # dead_after + one heartbeat + scheduling slack on a 2-core VM




def group_status(lab, node):
    return (read_status(lab.lab_dir, "server", node) or {}).get("group") or {}


def peers_of(lab, node):
    return sorted(group_status(lab, node).get("peers", {}))


@pytest.mark.parametrize("sync", ["zeroconf", "static"])
def test_replicas_find_each_other_and_share_their_connections(netns_ok, sync):
    with labutil.running_lab(sync=sync, client_path="appliance", appliances=True, object_sizes=("100m",),
                             links={"a": {"rate": "40mbit"}}) as lab:
        found = wait_for(lambda: all(peers_of(lab, n) == sorted(set("abc") - {n}) for n in "abc"), timeout=15)
        assert found, {n: peers_of(lab, n) for n in "abc"}
        if sync == "zeroconf":
            learned = [e for e in read_events(lab.lab_dir, "server", "b") if e["event"] == "peer_discovered"]
            assert {e["node"] for e in learned} == {"a", "c"}  # via mDNS, not from a static list
        curl = lab.popen("c1", ["curl", "-s", "-o", "/dev/null", "--max-time", "30", lab.url("a", "/obj-100m")])
        try:
            def seen():
                return all(group_status(lab, n).get("peers", {}).get("a", {}).get("entries") == 1 for n in "bc")
            assert wait_for(seen, timeout=5), {n: group_status(lab, n).get("peers") for n in "bc"}
            # the entry is the live download: a advertises it (its snapshot may lag b's and c's)
            assert wait_for(lambda: group_status(lab, "a").get("local_entries") == 1, timeout=3)
        finally:
            curl.kill()
            curl.wait()


def test_killing_a_replica_is_detected_within_the_bound(netns_ok):
    with labutil.running_lab(client_path="appliance", appliances=True, object_sizes=("100m",),
                             links={"a": {"rate": "20mbit"}}) as lab:
        assert wait_for(lambda: all(len(peers_of(lab, n)) == 2 for n in "abc"), timeout=15)
        curls = [lab.popen("c1", ["curl", "-s", "-o", "/dev/null", "--max-time", "30", lab.url("a", "/obj-100m")])
                 for _ in range(3)]
        try:
            assert wait_for(lambda: all(group_status(lab, n)["peers"]["a"].get("entries") == 3 for n in "bc"),
                            timeout=5)
            killed = lab.kill_replica("a")
            time.sleep(1.0)
            takeovers = []
            for n in "bc":
                events = read_events(lab.lab_dir, "server", n)
                dead = [e for e in events if e["event"] == "peer_dead" and e["node"] == "a"]
                assert dead, f"{n} never declared a dead"
                detection = dead[0]["t"] - killed
                print(f"\n{n} declared a dead {detection * 1000:.0f} ms after the kill "
                      f"(silence {dead[0]['silence_ms']} ms)")
                assert 0 < detection <= DEAD_BOUND
                takeovers += [tuple(e["key"].values()) for e in events if e["event"] == "takeover"]
            assert len(takeovers) == 3 and len(set(takeovers)) == 3  # one action per connection
        finally:
            for c in curls:
                c.kill()
                c.wait()
