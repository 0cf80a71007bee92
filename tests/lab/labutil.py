"""Helpers shared by the lab tests (imported as `labutil`; tests/lab is on sys.path)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from appliance.lab import Lab, wait_for

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
    except BaseException:
        keep = os.environ.get("APPLIANCE_LAB_KEEP")  # a failed test's lab dir (logs, events) copied there
        if keep and lab.lab_dir.exists():
            shutil.copytree(lab.lab_dir, Path(keep) / kw["name"], dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "*.tmp", "docroot*"))
        raise
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


# --- Downloads through a lab with appliances (the failover tests) -------------------------------


def group_ready(lab, replicas="abc", timeout=15):
    """Every replica's server appliance sees all the others."""
    from appliance.statusfile import read_status

    def ready():
        for n in replicas:
            st = (read_status(lab.lab_dir, "server", n) or {}).get("group") or {}
            if len(st.get("peers", {})) != len(replicas) - 1:
                return False
        return True
    assert wait_for(ready, timeout=timeout), "the support group did not form"


def client_conns(lab):
    """The client appliance's open connections (most recent last)."""
    from appliance.statusfile import read_status
    st = read_status(lab.lab_dir, "client", "ca") or {}
    return [c for c in st.get("connections", []) if c["state"] != "closed"]


def client_conn(lab):
    conns = client_conns(lab)
    return conns[-1] if conns else None


def owner_of(lab, conn_port):
    """The replica address that holds the client's connection now, per the client appliance."""
    from appliance.statusfile import read_status
    st = read_status(lab.lab_dir, "client", "ca") or {}
    for c in st.get("connections", []):
        if c["client"][1] == conn_port:
            return c["current"]
    return None


def replica_at(lab, addr):
    for r in lab.replicas:
        if lab.ip(r) == addr[0]:
            return r
    return None


class Download:
    """One curl in a client node fetching `urls` (one connection, or --parallel), each to a
    temp file; `wait()` gives the exit status and when it ended."""

    def __init__(self, lab, urls, extra=(), node="c1", parallel=False, max_time=120):
        import tempfile
        self.dir = tempfile.mkdtemp()
        self.outs = [os.path.join(self.dir, f"o{i}") for i in range(len(urls))]
        args = []
        for u, o in zip(urls, self.outs):
            args += [u, "-o", o]
        par = ["--parallel", "--parallel-immediate", "--parallel-max", str(len(urls))] if parallel else []
        self.proc = lab.popen(node, ["curl", "-sS", "--max-time", str(max_time), *par, *extra, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ended = None
        self.stdout = ""

    def wait(self, timeout=150):
        import time
        self.stdout, err = self.proc.communicate(timeout=timeout)
        self.ended = time.time()
        return self.proc.returncode, err

    def size(self, i=0):
        from appliance.lab import file_size
        return file_size(self.outs[i])

    def sha(self, i=0):
        from appliance.lab import file_sha256
        return file_sha256(self.outs[i])


def wait_fraction(lab, dl, size, fraction, timeout=30, i=0):
    assert wait_for(lambda: dl.size(i) >= size * fraction, timeout=timeout), \
        f"download stalled at {dl.size(i)} bytes"


