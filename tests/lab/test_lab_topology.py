"""Lab lifecycle: up/down leaves nothing, crash-safe down, client path switching, clients > 1."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import textwrap
import time

import pytest

import labutil
from appliance.lab import LAB_ROOT, Lab, LabError

pytestmark = pytest.mark.lab


def ping(lab, node, dst, count=1, wait=1):
    return lab.run(node, ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), "-i", "0.2", dst], check=False)


def test_up_down_leaves_nothing_and_client_path_switches(make_lab):
    lab = make_lab(replicas=("a", "b"), client_path="appliance", appliances=False)
    name = lab.name
    assert sorted(labutil.lab_namespaces(name)) == sorted(f"mig-{name}-{n}" for n in ("c1", "ca", "r", "sx", "a", "b"))
    state = json.loads(lab.state_file.read_text())
    pids = [p["pid"] for p in state["processes"].values()]
    assert len(pids) == 2 and all(labutil.pid_alive(p) for p in pids)
    assert (lab.lab_dir / "topology.json").exists()

    # ca's ports: no addresses, promisc, IPv6 off
    out = lab.run("ca", ["ip", "-j", "-d", "addr", "show"]).stdout
    links = {ln["ifname"]: ln for ln in json.loads(out)}
    for port in ("cl0", "up0"):
        assert links[port]["addr_info"] == []
        assert links[port]["promiscuity"] >= 1
        assert lab.run("ca", ["sysctl", "-n", f"net.ipv6.conf.{port}.disable_ipv6"]).stdout.strip() == "1"

    # the router and replicas work; the client path has no appliance -> no connectivity
    assert ping(lab, "r", lab.ip("b")).returncode == 0
    assert ping(lab, "c1", lab.ip("a")).returncode != 0
    lab.set_client_path("bridge")
    assert ping(lab, "c1", lab.ip("a"), count=3).returncode == 0  # any reply: a new bridge may lose the first
    lab.set_client_path("appliance")
    assert "br0" not in lab.run("ca", ["ip", "-br", "link"]).stdout
    assert ping(lab, "c1", lab.ip("a")).returncode != 0
    lab.set_client_path("bridge")

    # a second up of the same name fails clearly
    with pytest.raises(LabError, match="already exists"):
        Lab(name=name).up()

    lab.down()
    labutil.assert_gone(name, pids)
    Lab.down_by_name(name)  # idempotent


@pytest.mark.parametrize("keep_state_file", [True, False], ids=["state-file", "no-state-file"])
def test_down_after_crash(netns_ok, keep_state_file):
    """The process that ran up() is SIGKILLed; down_by_name still removes everything."""
    name = labutil.unique_name()
    script = textwrap.dedent(f"""
        import os, signal
        from appliance.lab import Lab
        lab = Lab({name!r}, replicas=("a", "b"), client_path="bridge", appliances=False,
                  links={{"b": {{"delay_ms": 5}}}})
        lab.up()
        print("UP", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    res = subprocess.run([labutil.PYTHON, "-c", script], capture_output=True, text=True, timeout=60)
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert "UP" in res.stdout
    state = json.loads((LAB_ROOT / f"{name}.json").read_text())
    pids = [p["pid"] for p in state["processes"].values()]
    assert len(pids) == 3  # two HTTP servers and the link element outlived their parent
    assert all(labutil.pid_alive(p) for p in pids)
    assert len(labutil.lab_namespaces(name)) == 7  # c1 ca r sx a lb b
    if not keep_state_file:
        (LAB_ROOT / f"{name}.json").unlink()
    Lab.down_by_name(name)
    labutil.assert_gone(name, pids)


def test_failed_up_cleans_up(netns_ok, monkeypatch):
    name = labutil.unique_name()
    lab = Lab(name, replicas=("a",), client_path="bridge", appliances=False)

    def boom():
        raise LabError("injected failure")

    monkeypatch.setattr(lab, "_start_http_servers", boom)
    with pytest.raises(LabError, match="injected"):
        lab.up()
    labutil.assert_gone(name)


def test_two_clients_offloads_off(make_lab):
    lab = make_lab(clients=2, replicas=("a",), client_path="bridge", offloads="off", appliances=False)
    assert "sw" in lab.nodes and lab.ip("c2") == "10.70.0.12"
    for c in ("c1", "c2"):
        assert ping(lab, c, lab.ip("a")).returncode == 0
        feats = lab.run(c, ["ethtool", "-k", "eth0"]).stdout
        assert "tcp-segmentation-offload: off" in feats
        assert "tx-checksumming: off" in feats
    assert "tcp-segmentation-offload: off" in lab.run("r", ["ethtool", "-k", "cl0"]).stdout
    # replica side untouched
    assert "tcp-segmentation-offload: on" in lab.run("a", ["ethtool", "-k", "eth0"]).stdout
    size, sha = lab.objects["/obj-1m"]
    res = lab.run("c2", ["sh", "-c", f"curl -sf {lab.url('a', '/obj-1m')} | sha256sum"], timeout=30)
    assert res.stdout.split()[0] == sha


def test_appliances_started_or_skipped(make_lab, capfd):
    """With appliances=True the lab starts the appliance modules that exist, and says which it skipped."""
    lab = make_lab(replicas=("a",), client_path="appliance", appliances=True)
    err = capfd.readouterr().err
    for role, label, node in (("client", "client-ca", "ca"), ("server", "server-a", "a")):
        if importlib.util.find_spec(f"appliance.{role}") is None:
            assert f"appliance.{role} does not exist yet" in err
            assert label not in lab.procs
        else:
            assert lab.procs[label] and labutil.pid_alive(lab.procs[label]["pid"])
            st = lab.status()["appliances"][f"{role}-{node}"]
            assert st["ready"] is True
    if "client-ca" in lab.procs:
        # the client appliance bridges ca's ports: c1 reaches a, bytes intact
        assert ping(lab, "c1", lab.ip("a"), count=2).returncode == 0
        res = lab.run("c1", ["sh", "-c", f"curl -sf {lab.url('a', '/obj-10m')} | sha256sum"], timeout=30)
        assert res.stdout.split()[0] == lab.objects["/obj-10m"][1]


def test_node_names_and_errors(netns_ok):
    lab = Lab(labutil.unique_name(), replicas=("a", "b", "c"), links={"b": {"delay_ms": 5}, "client": {"loss": 0.1}})
    assert lab.nodes == ["c1", "ca", "lclient", "r", "sx", "a", "lb", "b", "c"]
    assert lab.ns("lb") == f"mig-{lab.name}-lb"
    assert lab.ip("c1") == "10.70.0.11" and lab.ip("r") == "10.70.0.1" and lab.ip("c") == "10.70.3.2"
    assert lab.url("b", "obj-1m") == "http://10.70.2.2/obj-1m"
    with pytest.raises(LabError, match="unknown node 'zz'"):
        lab.ns("zz")
    with pytest.raises(LabError, match="no IP"):
        lab.ip("ca")


def test_process_logs_and_status(make_lab):
    lab = make_lab(replicas=("a",), client_path="bridge", appliances=False, links={"a": {"loss": 0.0}})
    st = lab.status()
    assert st["up"] is True
    assert st["nodes"]["a"]["interfaces"]["eth0"]["addresses"] == ["10.70.1.2/24"]
    assert st["nodes"]["ca"]["interfaces"]["cl0"]["master"] == "br0"
    assert all(p["alive"] for p in st["processes"].values())
    assert st["appliances"]["linkem-la"]["ready"] is True
    # stopping a process by label removes it from the state
    t0 = time.monotonic()
    lab._stop("linkem-la")
    assert time.monotonic() - t0 < 5
    assert "linkem-la" not in json.loads(lab.state_file.read_text())["processes"]
    assert os.path.exists(lab.lab_dir / "http-a.log")


def test_appliance_path_with_a_stand_in_bridge(make_lab, tmp_path):
    """client_path="appliance": whatever bridges ca's bare ports (here the link element as a
    stand-in for the client appliance, offloads off since it has no PACKET_VNET_HDR) connects c1."""
    lab = make_lab(replicas=("a",), client_path="appliance", offloads="off", appliances=False)
    assert ping(lab, "c1", lab.ip("a")).returncode != 0
    log = open(tmp_path / "standin.log", "wb")
    p = lab.popen("ca", [labutil.PYTHON, "-m", "appliance.linkem", "--ports", "cl0", "up0", "--node", "standin",
                         "--state-dir", str(tmp_path), "--duration", "30"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and ping(lab, "c1", lab.ip("a")).returncode != 0:
            assert p.poll() is None, (tmp_path / "standin.log").read_text()
        res = lab.run("c1", ["sh", "-c", f"curl -sf {lab.url('a', '/obj-10m')} | sha256sum"], timeout=30)
        assert res.stdout.split()[0] == lab.objects["/obj-10m"][1]
    finally:
        p.terminate()
        p.wait(5)
        log.close()


def test_missing_nginx_is_a_clear_error(netns_ok, monkeypatch):
    import appliance.lab as labmod

    monkeypatch.setattr(labmod, "NGINX", "/nonexistent/nginx")
    name = labutil.unique_name()
    with pytest.raises(LabError, match="nginx requested but /nonexistent/nginx is missing"):
        Lab(name, server="nginx").up()
    labutil.assert_gone(name)
