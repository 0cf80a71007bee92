"""The README's first command: `appliance demo` completes a failover and says so."""

import subprocess
import sys

import pytest

import labutil

pytestmark = pytest.mark.lab


def test_demo_survives_the_crash(netns_ok):
    name = labutil.unique_name()
    labutil.NAMES.add(name)
    res = subprocess.run([sys.executable, "-m", "appliance", "demo", "--no-dashboard", "--name", name, "--size", "20m",
                          "--rate", "100mbit"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    assert "EQUAL" in out and "DIFFERENT" not in out
    for step in ("failure detected", "Migrate SYN accepted", "TCP_REPAIR socket built", "first resumed byte"):
        assert step in out, step
    assert labutil.lab_namespaces(name) == []  # taken down
