"""Connection migration end to end (the paper's "Anatomy of Failover"): real curl, real
HTTP servers, live downloads that survive a replica crash, cascades, keep-alive, planned
oscillation, races, forged Migrate SYNs and a restarted replica whose kernel answers RST."""

from __future__ import annotations

import subprocess
import sys

import pytest

import labutil
from appliance.control import call
from appliance.lab import file_sha256, wait_for
from appliance.statusfile import read_events, read_status
from labutil import Download, client_conn, group_ready, owner_of, replica_at, wait_fraction

pytestmark = pytest.mark.lab

OBJ = "/obj-20m"


def failover_time(lab, killed_at):
    """Crash to the new server's first frame at the client, from the client appliance's events."""
    evs = [e for e in read_events(lab.lab_dir, "client", "ca") if e["event"] == "migrated" and e["t"] >= killed_at]
    return (evs[0]["t"] - killed_at) if evs else None


@pytest.fixture(params=["builtin", "nginx"])
def crash_lab(request, netns_ok):
    with labutil.running_lab(server=request.param, client_path="appliance", appliances=True,
                             object_sizes=("20m",), links={r: {"rate": "40mbit"} for r in "abc"}) as lab:
        group_ready(lab)
        yield lab


def test_download_survives_a_crash(crash_lab):
    lab = crash_lab
    size, digest = lab.objects[OBJ]
    dl = Download(lab, [lab.url("a", OBJ)])
    wait_fraction(lab, dl, size, 0.5)
    killed = lab.kill_replica("a")
    code, err = dl.wait()
    assert code == 0, err
    assert file_sha256(dl.outs[0]) == digest
    t = failover_time(lab, killed)
    assert t is not None
    print(f"\nfailover ({lab.server}): {t * 1000:.0f} ms from the crash to the new server's first frame")


def test_cascade_a_then_b_then_c(netns_ok):
    with labutil.running_lab(client_path="appliance", appliances=True, object_sizes=("20m",),
                             links={r: {"rate": "20mbit"} for r in "abc"}) as lab:
        group_ready(lab)
        size, digest = lab.objects[OBJ]
        dl = Download(lab, [lab.url("a", OBJ)])
        wait_fraction(lab, dl, size, 0.25)
        cport = client_conn(lab)["client"][1]
        lab.kill_replica("a")
        first = wait_for(lambda: (o := owner_of(lab, cport)) and o[0] != lab.ip("a") and o, timeout=5)
        assert first, "nobody took the connection over from a"
        taker = replica_at(lab, first)
        wait_fraction(lab, dl, size, 0.6)
        lab.kill_replica(taker)
        last = wait_for(lambda: (o := owner_of(lab, cport)) and o != first and o, timeout=5)
        assert last and replica_at(lab, last) not in ("a", taker)
        code, err = dl.wait()
        assert code == 0, err
        assert file_sha256(dl.outs[0]) == digest


def test_keepalive_second_object_from_the_new_owner(netns_ok):
    with labutil.running_lab(client_path="appliance", appliances=True, object_sizes=("20m", "1m"),
                             links={r: {"rate": "40mbit"} for r in "abc"}) as lab:
        group_ready(lab)
        dl = Download(lab, [lab.url("a", OBJ), lab.url("a", "/obj-1m")], extra=("-w", "%{num_connects}\n"))
        wait_fraction(lab, dl, lab.objects[OBJ][0], 0.4)
        lab.kill_replica("a")
        code, err = dl.wait()
        assert code == 0, err
        assert file_sha256(dl.outs[0]) == lab.objects[OBJ][1]
        assert file_sha256(dl.outs[1]) == lab.objects["/obj-1m"][1]
        assert dl.stdout.split()[:1] == ["1"]  # one connection for both objects


def test_forged_migrate_syns_are_rejected_and_the_download_goes_on(netns_ok):
    import _fastpath as fp
    with labutil.running_lab(client_path="appliance", appliances=True, object_sizes=("20m",),
                             links={"a": {"rate": "40mbit"}}) as lab:
        group_ready(lab)
        size, digest = lab.objects[OBJ]
        dl = Download(lab, [lab.url("a", OBJ)])
        wait_fraction(lab, dl, size, 0.2)
        conn = client_conn(lab)
        cip, cport = conn["client"]
        ni, na = conn["client_syn"]["isn"], conn["server_syn"]["isn"]
        good_token = fp.migrate_token(ni, na)
        forged = [
            fp.build_migrate_syn(lab.ip("c"), cip, 80, cport, 1, 1, good_token ^ 1, 0),              # wrong Token
            fp.build_migrate_syn(lab.ip("c"), cip, 80, cport, 1, 1, good_token, 12345),              # wrong Request
            fp.build_migrate_syn(lab.ip("c"), cip, 80, cport, 1, 0, good_token,                      # old ReqNo
                                 fp.migrate_request(ni, na, b"", 1, 0)),
        ]
        code = ("import sys, binascii\nfrom appliance.inject import RawInjector\nr = RawInjector()\n"
                "for h in sys.argv[1:]: assert r.send(binascii.unhexlify(h))\n")
        lab.run("c", [sys.executable, "-c", code, *[f.hex() for f in forged]])
        shim = wait_for(lambda: (s := read_status(lab.lab_dir, "client", "ca")["shim"])
                        and s["migrate_rejected_token"] and s["migrate_rejected_request"] and s["migrate_rejected_stale"]
                        and s, timeout=5)
        assert shim, read_status(lab.lab_dir, "client", "ca")["shim"]
        assert client_conn(lab)["current"] == [lab.ip("a"), 80]  # nothing moved
        code, err = dl.wait()
        assert code == 0, err
        assert file_sha256(dl.outs[0]) == digest


def test_race_two_takeovers_one_winner(netns_ok):
    with labutil.running_lab(client_path="appliance", appliances=True, object_sizes=("20m",),
                             links={r: {"rate": "40mbit"} for r in "abc"}) as lab:
        group_ready(lab)
        size, digest = lab.objects[OBJ]
        dl = Download(lab, [lab.url("a", OBJ)])
        wait_fraction(lab, dl, size, 0.3)
        cip, cport = client_conn(lab)["client"]
        conn = f"{cip}:{cport}"
        socks = {n: lab.lab_dir / f"server-{n}.sock" for n in "bc"}
        import threading
        answers = {}
        threads = [threading.Thread(target=lambda n=n: answers.__setitem__(n, call(socks[n], {"cmd": "migrate",
                                                                                              "conn": conn})))
                   for n in "bc"]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        code, err = dl.wait()
        assert code == 0, err
        assert file_sha256(dl.outs[0]) == digest
        shim = read_status(lab.lab_dir, "client", "ca")["shim"]
        assert shim["migrations"] >= 1
        assert shim["migrate_rejected_redundant"] + shim["migrate_rejected_stale"] >= 1 or shim["migrations"] == 2


def test_restarted_replica_rst_is_held_and_the_migration_succeeds(netns_ok):
    with labutil.running_lab(client_path="appliance", appliances=True, object_sizes=("20m",),
                             links={r: {"rate": "40mbit"} for r in "abc"}) as lab:
        group_ready(lab)
        size, digest = lab.objects[OBJ]
        dl = Download(lab, [lab.url("a", OBJ)])
        wait_fraction(lab, dl, size, 0.4)
        # a "restart": the processes die, the kernel forgets the connection, the link comes back
        lab.kill_replica("a")
        lab.run("a", ["ss", "-K", "dst", lab.ip("c1")], check=False)
        lab.run("a", ["ip", "link", "set", "eth0", "up"])
        lab.run("a", ["ip", "route", "replace", "default", "via", "10.70.1.1"])
        code, err = dl.wait()
        assert code == 0, err
        assert file_sha256(dl.outs[0]) == digest
        shim = read_status(lab.lab_dir, "client", "ca")["shim"]
        assert shim["migrations"] >= 1


def test_planned_oscillation_every_2s_through_a_60s_download(netns_ok):
    with labutil.running_lab(client_path="appliance", appliances=True, object_sizes=("20m",),
                             links={r: {"rate": "2700kbit"} for r in "ab"}, replicas=("a", "b")) as lab:
        group_ready(lab, "ab")
        size, digest = lab.objects[OBJ]
        dl = Download(lab, [lab.url("a", OBJ)])
        wait_fraction(lab, dl, size, 0.01)
        cip, cport = client_conn(lab)["client"]
        osc = subprocess.run([sys.executable, "-m", "appliance", "ctl", "--lab", lab.name, "oscillate",
                              f"{cip}:{cport}", "--between", "a,b", "--every", "2", "--duration", "50"],
                             capture_output=True, text=True, timeout=90)
        code, err = dl.wait(timeout=120)
        assert code == 0, err + osc.stdout + osc.stderr
        assert file_sha256(dl.outs[0]) == digest
        shim = read_status(lab.lab_dir, "client", "ca")["shim"]
        assert shim["migrations"] >= 15, (shim, osc.stdout)
