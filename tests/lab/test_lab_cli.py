"""`appliance lab up/status/exec/down` in subprocesses, as a user would run them."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

import labutil
from appliance.lab import COPIES_ROOT

pytestmark = pytest.mark.lab


def cli(*args, timeout=60):
    return subprocess.run([labutil.PYTHON, "-m", "appliance", "lab", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_round_trip(netns_ok):
    name = labutil.unique_name()
    try:
        res = cli("up", "--name", name, "--clients", "2", "--replicas", "a,b", "--client-path", "bridge",
                  "--offloads", "off", "--delay", "client=5", "--rate", "b=8mbit", "--no-appliances",
                  "--server", "lighttpd", "--docroot", "copy")
        assert res.returncode == 0, res.stderr
        assert f"lab {name}: up" in res.stdout
        assert f"docroot {COPIES_ROOT / name / 'b'}" in res.stdout
        assert (COPIES_ROOT / name / "a" / "obj-100k").is_file()

        again = cli("up", "--name", name, "--client-path", "bridge", "--no-appliances")
        assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr

        st = cli("status", "--name", name)
        assert st.returncode == 0, st.stderr
        for text in (f"mig-{name}-c2", f"mig-{name}-lclient", "10.70.2.2/24", "10.70.0.12/24", "alive",
                     "server lighttpd", "docroot copy", "lighttpd-a"):
            assert text in st.stdout
        js = json.loads(cli("status", "--name", name, "--json").stdout)
        assert js["up"] is True and set(js["nodes"]) == {"c1", "c2", "sw", "ca", "lclient", "r", "sx", "a", "b"}
        assert js["options"]["docroot"] == "copy" and js["docroots"]["a"] == str(COPIES_ROOT / name / "a")
        assert js["appliances"]["linkem-lclient"]["ready"] is True

        ping = cli("exec", "c2", "--name", name, "--", "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.70.2.2")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        rtt_min = float(ping.stdout.split("rtt min/avg/max/mdev = ")[1].split("/")[0])
        assert rtt_min >= 10.0  # 5 ms each way through lclient
        assert cli("exec", "--name", name, "c1", "--", "sh", "-c", "exit 3").returncode == 3
        curl = cli("exec", "c1", "--name", name, "--", "curl", "-sf", "-o", "/dev/null", "-w", "%{http_code}",
                   "http://10.70.1.2/obj-100k")
        assert curl.stdout == "200"

        bad = cli("exec", "zz", "--name", name, "--", "true")
        assert bad.returncode == 1 and "unknown node 'zz'" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        down = cli("down", "--name", name)
    assert down.returncode == 0, down.stderr
    labutil.assert_gone(name)
    assert not (COPIES_ROOT / name).exists()
    assert cli("status", "--name", name).returncode == 1


@pytest.mark.parametrize("args,needle", [
    (["--rate", "a=12x"], "--rate a=...: bad rate '12x'"),
    (["--delay", "zz=5"], "unknown link 'zz'"),
    (["--loss", "a=2"], "--loss a=...: want a probability"),
    (["--server", "apache"], "--server: want 'builtin', 'nginx' or 'lighttpd'"),
    (["--docroot", "tmpfs"], "--docroot: want 'shared' or 'copy'"),
    (["--client-path", "tunnel"], "--client-path: want 'appliance' or 'bridge'"),
    (["--offloads", "maybe"], "--offloads: want 'on' or 'off'"),
    (["--clients", "many"], "--clients: want an integer"),
    (["--replicas", "a,ca"], "--replicas: bad replica name 'ca'"),
    (["--name", "Bad-Name"], "--name: bad lab name"),
])
def test_cli_bad_options(args, needle):
    res = cli("up", *args)
    assert res.returncode in (1, 2)
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_not_root():
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) missing")
    res = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", labutil.PYTHON, "-m",
                          "appliance", "lab", "up", "--name", "nobody1"], capture_output=True, text=True, timeout=60,
                         cwd="/")
    if "ModuleNotFoundError" in res.stderr or "Permission denied" in res.stderr:
        pytest.skip(f"the venv is not usable by an unprivileged user here: {res.stderr.strip()[-200:]}")
    assert res.returncode == 1
    assert "needs root: CAP_NET_ADMIN and CAP_SYS_ADMIN" in res.stderr
    assert "Traceback" not in res.stderr
