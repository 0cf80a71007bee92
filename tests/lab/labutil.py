"""Helpers shared by the lab tests (imported as `labutil`; tests/lab is on sys.path)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys

from appliance.lab import Lab

PYTHON = sys.executable
NAMES: set = set()


def unique_name() -> str:
    name = "t" + secrets.token_hex(3)
    NAMES.add(name)
    return name


_probe_result = None


def netns_unusable():
    """None if network namespaces can be made here, else the reason."""
    global _probe_result
    if _probe_result is None:
        if os.geteuid() != 0:
            _probe_result = "needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN) for network namespaces"
        elif shutil.which("ip") is None:
            _probe_result = "the ip binary (iproute2) is missing"
        else:
            probe = f"mig-p{secrets.token_hex(3)}-probe"
            res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
            if res.returncode != 0:
                _probe_result = f"ip netns add failed: {res.stderr.strip()}"
            else:
                subprocess.run(["ip", "netns", "del", probe], capture_output=True)
                _probe_result = ""
    return _probe_result or None


@contextlib.contextmanager
def running_lab(**kw):
    """Bring a lab up (unique name unless given), always take it down."""
    kw.setdefault("name", unique_name())
    NAMES.add(kw["name"])
    lab = Lab(**kw)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def lab_namespaces(name: str) -> list:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"mig-{name}-")]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def assert_gone(name: str, pids=()) -> None:
    """Nothing of lab `name` remains: namespaces, processes, lab dir, state file."""
    from appliance.lab import LAB_ROOT

    assert lab_namespaces(name) == []
    alive = [p for p in pids if pid_alive(p)]
    assert alive == [], f"processes still alive: {alive}"
    assert not (LAB_ROOT / name).exists()
    assert not (LAB_ROOT / f"{name}.json").exists()
