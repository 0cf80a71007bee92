"""The lab: clients, the client appliance, a router and replicas in network namespaces.

Topology (lab name NAME matches [a-z0-9]{1,10}; every node is the namespace ``mig-NAME-<node>``)::

    c1 eth0 ----------------- cl0 [ca] up0 ------------------ cl0 [r] a0 ---------- eth0 a
    (N > 1: c1..cN eth0 -- p1..pN [sw br0] ca0 -- cl0 ca)      [r] b0 ---------- eth0 b
                                                               [r] c0 ---------- eth0 c

* Clients ``c1..cN`` (``eth0`` = 10.70.0.(10+k)/24, default via 10.70.0.1). With N > 1 a node
  ``sw`` holds a Linux bridge joining them and ca's ``cl0``.
* ``ca`` is the client appliance's node: ports ``cl0`` (toward the clients) and ``up0``
  (toward the router), no IP addresses, IPv6 off, promisc on, GRO left off (the veth
  default). ``client_path="appliance"``: the ports are bare and the client appliance process
  bridges them (no appliance running = no client connectivity, by design);
  ``client_path="bridge"``: a Linux bridge ``br0`` in ca (STP off, forward delay 0) joins
  them, the "direct" path for comparisons.
* ``r`` routes (ip_forward=1, rp_filter=0): ``cl0`` = 10.70.0.1/24; ``<replica>0`` =
  10.70.i.1/24 for replica number i (1, 2, 3, ... in list order).
* Replicas (default a, b, c): ``eth0`` = 10.70.i.2/24, default via 10.70.i.1; ``sync0`` =
  10.70.200.i/24 on the support group's LAN (node ``sx``, a bridge); an HTTP server on port 80
  of ``eth0``'s address over the replica's docroot (``lab.docroot_of(replica)``):

  - ``server="builtin"``: appliance.httpserver (its test knobs ``?chunked=1`` and
    ``?delay_ms=N`` are documented there);
  - ``server="nginx"``: Debian's /usr/sbin/nginx, ``LABDIR/nginx-<replica>.conf`` (keep-alive
    75 s / 100000 requests, sendfile, no open_file_cache);
  - ``server="lighttpd"``: Debian's /usr/sbin/lighttpd, ``lighttpd -D -f
    LABDIR/lighttpd-<replica>.conf`` (keep-alive: ``server.max-keep-alive-requests = 1000``,
    idle 75 s; lighttpd's default ETag, a hash of inode, mtime and size; stat cache off, so a
    changed file is served as it is at once; access and error logs
    ``LABDIR/lighttpd-<replica>.{access,error}.log``). Range requests -> 206 as usual.

  builtin and nginx give an object the same ETag (``"<mtime hex>-<size hex>"``) and
  Last-Modified on every replica, with either docroot; lighttpd only with ``docroot="shared"``
  (its ETag includes the inode). Every server is started and waited for (listening on
  port 80) at up and killed with the lab.
* Docroots: ``docroot="shared"`` (default): every replica serves the shared cache dir
  (appliance.docroot, ``lab.docroot``); ``docroot="copy"``: every replica serves its own copy
  of the objects (real copies: distinct inodes, same bytes, mtime docroot.MTIME) in
  ``/var/tmp/appliance-labs/NAME/<replica>/`` (on disk, not in /run), removed at down.
  ``lab.objects`` always describes the shared originals; ``alter_object`` makes one copy differ.
* IPv6 is disabled in every namespace (no ND/MLD noise through the appliance).

Links. ``links`` maps "client" or a replica name to options:

* ``rate`` ("128kbit", "4mbit", or bits/s as a number): tbf on both endpoint egresses, with
  ``burst`` max(1600 B, 4 ms of the rate) and ``latency 400ms`` (packet-io.md §3). Replica
  link: the replica's ``eth0`` and the router's ``<replica>0``. Client link: every client's
  ``eth0`` and the router's ``cl0`` (so with N > 1 the upstream limit is per client), never
  an appliance port (the client appliance may bypass qdiscs).
* ``delay_ms`` (one way, each direction) and ``loss`` (drop probability per frame, each
  direction), optional ``seed``: no netem here, so a link element (appliance.linkem) in a node
  of its own is spliced into the link: ``r a0 <-> la:r0 [linkem] la:s0 <-> a eth0``; for the
  client link ``ca up0 <-> lclient:c0 [linkem] lclient:r0 <-> r cl0``. The two interfaces
  facing a link element get ``ethtool -K tx off tso off gso off`` whatever ``offloads`` says
  (a plain AF_PACKET bridge cannot pass GSO super-frames or partial checksums).

Offloads: ``offloads="on"`` (default) leaves veth's TSO/GSO/tx-checksum on (the client
appliance reads PACKET_VNET_HDR); ``"off"`` runs ``ethtool -K <if> tx off tso off gso off`` on
the clients' ``eth0`` and the router's ``cl0``, the two ends of the appliance's link.

Appliances (unless ``appliances=False``): with client_path "appliance", ``python -m appliance
client --client-if cl0 --net-if up0 --node ca --state-dir LABDIR`` in ca; on every replica X
``python -m appliance server --config LABDIR/X.toml --node X --state-dir LABDIR``. A module
that does not exist yet (importlib.util.find_spec) is skipped with a warning. Each must write
``"ready": true`` (appliance.statusfile) within 15 s.

The group config (``LABDIR/<replica>.toml``, for ``appliance server --config``) has sections
[node] (id, group ``lab-NAME``, key), [sync] (sync0, zeroconf and/or static peers) and
[service] (ports [80], iface eth0, ``docroot`` = the replica's docroot). ``group_config`` (a
dict of sections) is merged over it: keys of a generated section are added or replaced, a new
section (e.g. ``{"takeover": {"validators": "digest"}}``) is appended.

State: ``/run/appliance/labs/NAME/`` (the lab dir: ``<label>.log`` per process, nginx and
lighttpd configs and logs, status/event files, ``topology.json`` with every node's addresses
and the replicas' docroots) and ``/run/appliance/labs/NAME.json`` (options, including the
docroot mode, namespaces, partitioned replicas, processes with pid and start time).
``down`` works even after the process that ran ``up`` crashed: it kills the recorded pids and
every process inside ``mig-NAME-*``, deletes those namespaces (found by glob, state file or
not), and removes the lab dir, the docroot copies (``/var/tmp/appliance-labs/NAME/``) and the
state file.

Python API::

    from appliance.lab import Lab
    with Lab("t1", clients=1, replicas=("a", "b", "c"), server="builtin",   # "nginx", "lighttpd"
             client_path="bridge", offloads="on", appliances=False, docroot="shared",  # or "copy"
             links={"a": {"rate": "4mbit"}, "b": {"delay_ms": 50}, "client": {"loss": 0.01}},
             object_sizes=("1k", "1m", "10m"), group_config={"takeover": {"validators": "digest"}}
             ) as lab:                  # __enter__ runs up(), __exit__ down()
        lab.ns("c1")            # "mig-t1-c1"
        lab.ip("b")             # "10.70.2.2"   (clients 10.70.0.1k, router 10.70.0.1)
        lab.url("a", "/obj-1m") # "http://10.70.1.2/obj-1m"
        lab.objects             # {"/obj-1m": (1048576, sha256hex), ...}: the shared originals
        lab.docroot, lab.lab_dir  # the shared cache dir; the lab dir
        lab.docroot_of("a")     # what a serves: lab.docroot, or /var/tmp/appliance-labs/t1/a (copy)
        lab.alter_object("a", "/obj-1m", "bytes", offset=None)  # docroot="copy" only; new sha256
        r = lab.run("c1", ["curl", "-s", lab.url("a", "/obj-1k")], timeout=10)  # CompletedProcess
        p = lab.popen("c1", ["iperf3", "-c", lab.ip("a")], stdout=subprocess.PIPE)
        lab.set_client_path("appliance")   # stops/starts the client appliance, removes/adds br0
        lab.stop_server_appliance("a", kill=False); lab.start_server_appliance("a", extra_args=[...])
        lab.start_server_appliance("b", wait=False); lab.wait_server_appliance("b")
        lab.start_client_appliance(); lab.stop_client_appliance(kill=False)   # kill=True: SIGKILL (a crash)
        lab.status()            # dict: namespaces, addresses, processes, appliance status files
        t = lab.kill_replica("a")        # crash: links down, then SIGKILL all in mig-t1-a
        lab.revive_replica("a")          # links up, fresh TCP state, HTTP server (+ appliance)
        lab.partition("b"); lab.heal("b")  # links down / up, processes left running
    Lab.down_by_name("t1")      # tear down whatever is left, even without a state file
    Lab.attach("t1")            # a Lab object for a lab another process brought up

``alter_object(replica, path, how, offset=None)`` changes the replica's copy in place (same
inode), while the servers run: ``how="bytes"``: same size and mtime, bytes from ``offset``
(default size // 2) to the end XORed with 0x5A (so a client splicing two replicas' bytes gets
a file matching neither copy, its first differing byte at ``offset``; computed from the
shared original, so repeating it changes nothing); ``"mtime"``: same bytes, mtime = the
original's + one day (Last-Modified and mtime-based ETags differ); ``"bytes+mtime"``: both.
Returns the copy's new sha256 hex; LabError with docroot="shared".

Crashes and partitions: ``kill_replica`` takes the replica's eth0 and sync0 down FIRST and
then SIGKILLs every process in its namespace, so no FIN or RST leaves it (a connection whose
server dies before its response head is not closed cleanly); it returns the time.time() taken
right before the links go down. ``revive_replica`` destroys the TCP sockets the killed
processes left (``ss -K``, links still down), brings the links up, restores the default route
and starts the HTTP server (and the server appliance unless ``appliance=False``).
``partition`` takes the links down with the processes left running; ``heal`` brings them up,
restores the default route, flushes the ARP entries on both sides and waits (bounded) until
both ends of both links are up. Both are idempotent; ``lab.partitioned`` is the set of
partitioned replicas.

``run()`` captures text output unless told otherwise (pass ``stdout=``/``stderr=``/``text=``)
and raises LabCommandError (a CalledProcessError whose message includes stderr) when
``check`` is true. ``popen()`` returns the Popen of the command itself (``ip netns exec``
execs it), so terminate() reaches it; anything left running in a namespace dies at down().
The appliances find the lab's addresses in ``LABDIR/topology.json``.

CLI: ``appliance lab up [--name N] [--clients N] [--replicas a,b,c]
[--server builtin|nginx|lighttpd] [--docroot shared|copy] [--client-path appliance|bridge]
[--offloads on|off] [--rate LINK=RATE]... [--delay LINK=MS]... [--loss LINK=P]...
[--objects 1k,1m,...] [--no-appliances] [--replace]``;
``appliance lab down [--name N]``; ``appliance lab status [--name N] [--json]``;
``appliance lab exec NODE [--name N] -- CMD...`` (exit status of CMD).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import docroot as docroot_mod
from . import statusfile

LAB_ROOT = Path(os.environ.get("APPLIANCE_LAB_ROOT") or "/run/appliance/labs")
NETNS_DIR = Path("/run/netns")
NS_PREFIX = "mig"
NAME_RE = re.compile(r"[a-z0-9]{1,10}")
REPLICA_RE = re.compile(r"[a-z][a-z0-9]{0,7}")
RESERVED_NODES = {"ca", "r", "sw", "sx", "lclient", "client"}
MAX_CLIENTS = 200
NGINX = "/usr/sbin/nginx"
LIGHTTPD = "/usr/sbin/lighttpd"
SERVERS = ("builtin", "nginx", "lighttpd")
DOCROOT_MODES = ("shared", "copy")
# docroot="copy": each replica's own copy of the objects, on disk (not /run, often a tmpfs)
COPIES_ROOT = Path(os.environ.get("APPLIANCE_LAB_COPIES") or "/var/tmp/appliance-labs")
ALTER_HOWS = ("bytes", "mtime", "bytes+mtime")
ALTER_XOR = 0x5A
_XOR_TABLE = bytes(b ^ ALTER_XOR for b in range(256))
READY_TIMEOUT = 15.0
CMD_TIMEOUT = 30.0
TBF_LATENCY = "400ms"
LINK_KEYS = {"rate", "buffer_ms", "delay_ms", "loss", "seed"}
NEEDS_ROOT = "needs root: CAP_NET_ADMIN and CAP_SYS_ADMIN to create network namespaces"


class LabError(Exception):
    """An error for the user: printed without a traceback by the CLI."""


class LabCommandError(subprocess.CalledProcessError):
    def __str__(self):
        msg = super().__str__()
        err = self.stderr
        if isinstance(err, bytes):
            err = err.decode(errors="replace")
        if err:
            msg += f"\nstderr: {err.strip()[-2000:]}"
        return msg


# --- small helpers -------------------------------------------------------------------------


SYNC_PORT = 7700


def code_digest() -> str:
    """A short digest of the appliance's code (appliance and _fastpath): the replicas'
    appliances restart at every revive, so a working tree edited during a benchmark mixes
    versions; a benchmark reports how many it saw."""
    import hashlib

    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for sub in ("appliance", "_fastpath"):
        for path in sorted((root / sub).iterdir()):
            if path.suffix in (".py", ".so", ".pyx", ".c", ".pxd"):
                h.update(path.name.encode())
                try:
                    h.update(path.read_bytes())
                except OSError:
                    pass
    return h.hexdigest()[:12]


def group_formed(lab, since: float = 0.0) -> bool:
    """Every replica's server appliance reports (a snapshot newer than `since`) every other
    replica alive, at the epoch that replica reports for itself (a replica revived is known anew)."""
    sts = {r: statusfile.read_status(lab.lab_dir, "server", r) or {} for r in lab.replicas}
    for r, st in sts.items():
        if not st.get("ready") or (st.get("time") or 0) < since:
            return False
        peers = (st.get("group") or {}).get("peers") or {}
        for p in lab.replicas:
            if p == r:
                continue
            info = peers.get(p)
            if not info or info.get("state") != "alive":
                return False
            own = (sts[p].get("group") or {}).get("epoch")
            if own is not None and info.get("epoch") is not None and info.get("epoch") != own:
                return False
    return True


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Poll predicate until it returns something true or timeout seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def file_sha256(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_size(path) -> int:
    """A file's size, 0 while it does not exist yet."""
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _toml(sections: dict) -> str:
    """A small TOML writer for the group configs (str, bool, int, float, lists of those)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")
    out = []
    for name, table in sections.items():
        out.append(f"[{name}]")
        out += [f"{k} = {value(v)}" for k, v in table.items()]
        out.append("")
    return "\n".join(out)


def ns_name(lab: str, node: str) -> str:
    return f"{NS_PREFIX}-{lab}-{node}"


def _check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LabError(f"name: bad lab name {name!r} (want 1-10 characters of [a-z0-9])")
    return name


_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_rate(rate) -> int:
    """A tc rate ("128kbit", "4mbit", "1.5mbit", "100kbps" = bytes/s) or a number of bits/s -> bits/s."""
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        bps = float(rate)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(rate))
        if not m or m.group(2).lower() not in _RATE_UNITS:
            raise ValueError(f"bad rate {rate!r} (want e.g. 128kbit, 4mbit, 1gbit)")
        bps = float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]
    if not 8000 <= bps <= 100e9:
        raise ValueError(f"rate {rate!r} out of range (8kbit .. 100gbit)")
    return int(bps)


def _proc_start_time(pid: int):
    """Field 22 of /proc/PID/stat (start time in clock ticks), and the state letter; None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    rest = data.rpartition(")")[2].split()
    try:
        return int(rest[19]), rest[0]
    except (IndexError, ValueError):
        return None


def _pid_alive(pid: int, start_time=None) -> bool:
    info = _proc_start_time(pid)
    if info is None:
        return False
    st, state = info
    if state in ("Z", "X"):
        return False
    return start_time is None or st == start_time


def _netns_inode(ns: str):
    try:
        st = os.stat(NETNS_DIR / ns)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _pids_in_netns(namespaces) -> dict:
    """{pid: ns} of every process whose network namespace is one of `namespaces` (like `ip netns pids`)."""
    inodes = {}
    for ns in namespaces:
        key = _netns_inode(ns)
        if key is not None:
            inodes[key] = ns
    found = {}
    if not inodes:
        return found
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue
        ns = inodes.get((st.st_dev, st.st_ino))
        if ns is not None:
            found[int(entry)] = ns
    return found


def _lab_namespaces(name: str) -> list:
    prefix = f"{NS_PREFIX}-{name}-"
    try:
        entries = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(prefix) and "-" not in e[len(prefix):])


def _kill_pids(pids, grace: float = 3.0, popens=(), first=signal.SIGTERM) -> list:
    """Send `first` (SIGTERM) to `pids` ({pid: start_time or None}), SIGKILL what is left after
    `grace` s; returns survivors."""
    live = {p: st for p, st in pids.items() if _pid_alive(p, st)}
    for pid in live:
        try:
            os.kill(pid, first)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for _ in range(1000):
        _reap(popens)
        live = {p: st for p, st in live.items() if _pid_alive(p, st)}
        if not live or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for pid in live:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 3.0
    for _ in range(1000):
        _reap(popens)
        live = {p: st for p, st in live.items() if _pid_alive(p, st)}
        if not live or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return sorted(live)


def _reap(popens) -> None:
    for p in popens:
        try:
            p.poll()
        except Exception:  # noqa: BLE001
            pass


def _tail(path, n: int = 3000) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return "(no log)"
    return data[-n:].decode(errors="replace").strip() or "(empty log)"


def _listening(pid: int, port: int, ns: str | None = None) -> bool:
    """Is anything listening on TCP `port` in the network namespace of `pid` (which must be `ns`)?"""
    try:
        if ns is not None:
            st = os.stat(f"/proc/{pid}/ns/net")
            if (st.st_dev, st.st_ino) != _netns_inode(ns):
                return False  # still `ip netns exec` before setns()
        lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    want = f":{port:04X}"
    for line in lines:
        f = line.split()
        if len(f) > 3 and f[1].endswith(want) and f[3] == "0A":
            return True
    return False


def _write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _warn(msg: str) -> None:
    print(f"appliance lab: warning: {msg}", file=sys.stderr, flush=True)


# --- the lab -------------------------------------------------------------------------------


class Lab:
    """One lab: see the module docstring."""

    def __init__(self, name: str = "lab", clients: int = 1, replicas=("a", "b", "c"), server: str = "builtin",
                 client_path: str = "appliance", offloads: str = "on", links=None, appliances: bool = True,
                 object_sizes=None, sync: str = "zeroconf", group_key: str = None, group_config=None,
                 docroot: str = "shared"):
        self.name = _check_name(name)
        if sync not in ("zeroconf", "static", "both"):
            raise LabError(f"sync: want 'zeroconf', 'static' or 'both', got {sync!r}")
        self.sync = sync
        self.group_key = group_key or secrets.token_hex(16)
        if group_config is not None and not isinstance(group_config, dict):
            raise LabError(f"group_config: want a dict of sections, e.g. {{'takeover': {{'validators': 'digest'}}}}, "
                           f"got {group_config!r}")
        for section, values in (group_config or {}).items():
            if not isinstance(section, str) or not isinstance(values, dict):
                raise LabError(f"group_config[{section!r}]: want a dict of keys for the [{section}] section, "
                               f"got {values!r}")
        # extra TOML sections/keys for every replica (merged over the generated ones)
        self.group_config = {k: dict(v) for k, v in (group_config or {}).items()}
        if isinstance(clients, bool) or not isinstance(clients, int) or not 1 <= clients <= MAX_CLIENTS:
            raise LabError(f"clients: want an integer 1..{MAX_CLIENTS}, got {clients!r}")
        self.clients = clients
        if isinstance(replicas, str):
            replicas = [r for r in replicas.split(",") if r]
        replicas = list(replicas)
        if not replicas:
            raise LabError("replicas: at least one replica is needed")
        for r in replicas:
            if not isinstance(r, str) or not REPLICA_RE.fullmatch(r) or r in RESERVED_NODES \
                    or re.fullmatch(r"c\d+", r):
                raise LabError(f"replicas: bad replica name {r!r} (want [a-z][a-z0-9]{{0,7}}, not ca, r, sw, sx, "
                               "client, lclient or c<digits>)")
        if len(set(replicas)) != len(replicas):
            raise LabError(f"replicas: duplicate names in {replicas}")
        if len(replicas) > 250:
            raise LabError("replicas: at most 250")
        self.replicas = replicas
        if server not in SERVERS:
            raise LabError(f"server: want 'builtin', 'nginx' or 'lighttpd', got {server!r}")
        self.server = server
        if docroot not in DOCROOT_MODES:
            raise LabError(f"docroot: want 'shared' or 'copy', got {docroot!r}")
        self.docroot_mode = docroot
        if client_path not in ("appliance", "bridge"):
            raise LabError(f"client_path: want 'appliance' or 'bridge', got {client_path!r}")
        self.client_path = client_path
        if offloads not in ("on", "off"):
            raise LabError(f"offloads: want 'on' or 'off', got {offloads!r}")
        self.offloads = offloads
        self.links = self._check_links(links or {})
        self.appliances = bool(appliances)
        try:
            sizes = list(docroot_mod.DEFAULT_SIZES) + list(object_sizes or ())
            self.object_sizes = sorted({docroot_mod.size_name(s) for s in sizes}, key=docroot_mod.parse_size)
        except ValueError as exc:
            raise LabError(f"object_sizes: {exc}") from None
        linknodes = [self.link_node(k) for k in self.links if self._needs_element(k)]
        nodes = [f"c{k}" for k in range(1, clients + 1)] + (["sw"] if clients > 1 else []) + ["ca"]
        nodes += (["lclient"] if "lclient" in linknodes else []) + ["r", "sx"]
        for rep in replicas:
            if self.link_node(rep) in linknodes:
                nodes.append(self.link_node(rep))
            nodes.append(rep)
        if len(set(nodes)) != len(nodes):
            raise LabError(f"replicas: names collide with link-element nodes: {nodes}")
        self.nodes = nodes
        self.lab_dir = LAB_ROOT / self.name
        self.state_file = LAB_ROOT / f"{self.name}.json"
        self.docroot = str(docroot_mod.docroot_dir())  # the shared cache (lab.objects describes it)
        self.copies_dir = COPIES_ROOT / self.name  # docroot="copy": <copies_dir>/<replica>/
        self.partitioned = set()  # replicas whose links partition() took down
        self.procs = {}  # label -> {"pid", "start_time", "node", "argv", "log"}
        self._popen = {}  # label -> Popen (only in the process that started it)
        self._objects = None
        self._is_up = False

    # -- options ------------------------------------------------------------------------

    def _check_links(self, links) -> dict:
        if not isinstance(links, dict):
            raise LabError(f"links: want a dict like {{'a': {{'rate': '128kbit'}}}}, got {links!r}")
        out = {}
        for key, opts in links.items():
            if key != "client" and key not in self.replicas:
                raise LabError(f"links: unknown link {key!r} (want 'client' or a replica: {', '.join(self.replicas)})")
            if not isinstance(opts, dict):
                raise LabError(f"links[{key!r}]: want a dict of {sorted(LINK_KEYS)}, got {opts!r}")
            bad = set(opts) - LINK_KEYS
            if bad:
                raise LabError(f"links[{key!r}]: unknown option(s) {sorted(bad)} (known: {sorted(LINK_KEYS)})")
            o = {}
            if opts.get("rate") is not None:
                try:
                    o["rate_bps"] = parse_rate(opts["rate"])
                except ValueError as exc:
                    raise LabError(f"links[{key!r}]['rate']: {exc}") from None
                o["rate"] = str(opts["rate"]) if isinstance(opts["rate"], str) else f"{o['rate_bps']}bit"
            if opts.get("buffer_ms") is not None:
                b = opts["buffer_ms"]
                if isinstance(b, bool) or not isinstance(b, (int, float)) or not 50 <= b <= 10000:
                    raise LabError(f"links[{key!r}]['buffer_ms']: want a number of ms in 50..10000, got {b!r}")
                if "rate_bps" not in o:
                    raise LabError(f"links[{key!r}]['buffer_ms']: sizes the rate limiter's queue; give a rate too")
                o["buffer_ms"] = float(b)
            if opts.get("delay_ms") is not None:
                d = opts["delay_ms"]
                if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 10000:
                    raise LabError(f"links[{key!r}]['delay_ms']: want a number of ms in 0..10000, got {d!r}")
                o["delay_ms"] = float(d)
            if opts.get("loss") is not None:
                p = opts["loss"]
                if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                    raise LabError(f"links[{key!r}]['loss']: want a probability in [0, 1], got {p!r}")
                o["loss"] = float(p)
            if opts.get("seed") is not None:
                o["seed"] = str(opts["seed"])
            out[key] = o
        return out

    def _needs_element(self, link: str) -> bool:
        o = self.links.get(link, {})
        return "delay_ms" in o or "loss" in o

    @staticmethod
    def link_node(link: str) -> str:
        return "lclient" if link == "client" else f"l{link}"

    def options(self) -> dict:
        return {"name": self.name, "clients": self.clients, "replicas": list(self.replicas), "server": self.server,
                "client_path": self.client_path, "offloads": self.offloads,
                "links": {k: {kk: vv for kk, vv in v.items() if kk != "rate_bps"} for k, v in self.links.items()},
                "appliances": self.appliances, "object_sizes": list(self.object_sizes), "sync": self.sync,
                "group_key": self.group_key, "group_config": self.group_config, "docroot": self.docroot_mode}

    # -- naming and addressing ------------------------------------------------------------

    def ns(self, node: str) -> str:
        if node not in self.nodes:
            raise LabError(f"unknown node {node!r} (nodes of lab {self.name}: {', '.join(self.nodes)})")
        return ns_name(self.name, node)

    def replica_index(self, replica: str) -> int:
        if replica not in self.replicas:
            raise LabError(f"unknown replica {replica!r} (replicas: {', '.join(self.replicas)})")
        return self.replicas.index(replica) + 1

    def ip(self, node: str) -> str:
        if node == "r":
            return "10.70.0.1"
        if node in self.replicas:
            return f"10.70.{self.replica_index(node)}.2"
        m = re.fullmatch(r"c(\d+)", node)
        if m and 1 <= int(m.group(1)) <= self.clients:
            return f"10.70.0.{10 + int(m.group(1))}"
        self.ns(node)  # unknown node -> LabError
        raise LabError(f"node {node!r} has no IP address")

    def sync_ip(self, replica: str) -> str:
        """The replica's address on the support group's LAN (node sx): mDNS and sync datagrams."""
        return f"10.70.200.{self.replica_index(replica)}"

    def docroot_of(self, replica: str) -> str:
        """The directory `replica`'s HTTP server serves: the shared cache, or its own copy."""
        self.replica_index(replica)
        if self.docroot_mode == "copy":
            return str(self.copies_dir / replica)
        return self.docroot

    def group_config_path(self, replica: str) -> Path:
        return self.lab_dir / f"{replica}.toml"

    def write_group_config(self, replica: str) -> Path:
        """The server appliance's TOML for a replica: group lab-<name>, this lab's key, sync on sync0."""
        peers = [f"{self.sync_ip(r)}:{SYNC_PORT}" for r in self.replicas if r != replica]
        sections = {
            "node": {"id": replica, "group": f"lab-{self.name}", "key": f"hex:{self.group_key}", "prefixes": ["/"]},
            "sync": {"port": SYNC_PORT, "zeroconf": self.sync in ("zeroconf", "both"),
                     "zeroconf_interfaces": [self.sync_ip(replica)],
                     "peers": peers if self.sync in ("static", "both") else []},
            "service": {"ports": [80], "iface": "eth0", "docroot": self.docroot_of(replica)},
        }
        for section, values in self.group_config.items():  # a new section is appended, a known one merged
            sections.setdefault(section, {}).update(values)
        path = self.group_config_path(replica)
        path.write_text(_toml(sections))
        return path

    def _set_links(self, replica: str, state: str) -> None:
        """eth0 and sync0 of `replica` up or down (one `ip -batch`)."""
        self._ip_batch(replica, [f"link set eth0 {state}", f"link set sync0 {state}"])

    def _link_ends(self, replica: str) -> list:
        """(node, iface) of both ends of the replica's links: eth0 and its peer, sync0 and sx's port."""
        peer = (self.link_node(replica), "s0") if self._needs_element(replica) else ("r", f"{replica}0")
        return [(replica, "eth0"), peer, (replica, "sync0"), ("sx", f"s{replica}")]

    def kill_replica(self, replica: str) -> float:
        """Crash a replica: take its links (eth0, sync0) down, then SIGKILL every process in its
        namespace. A crash says no goodbye: with the links down first, no FIN or RST the dying
        processes' sockets produce can leave the replica's kernel. Returns the time.time() of the
        kill (taken right before the links go down)."""
        ns = self.ns(replica)
        t = time.time()
        self._set_links(replica, "down")
        for _ in range(5):  # again if something forked meanwhile (bounded)
            pids = _pids_in_netns([ns])
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 2.0
            for _ in range(200):
                _reap(self._popen.values())
                if not any(_pid_alive(p) for p in pids) or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
        _reap(self._popen.values())
        for label, info in list(self.procs.items()):
            if info.get("node") == replica:
                self.procs.pop(label, None)
                self._popen.pop(label, None)
        self.partitioned.discard(replica)
        self._save()
        return t

    def partition(self, replica: str) -> None:
        """Cut a replica off: its links (eth0, sync0) down, its processes left running. Idempotent."""
        self.ns(replica)
        self._set_links(replica, "down")
        self.partitioned.add(replica)
        self._save()

    def heal(self, replica: str, timeout: float = 5.0) -> None:
        """End a partition: links up, the default route back (link down dropped it), the ARP
        entries on both sides of its links flushed (an address resolution that failed or is
        still retrying during the partition would delay the first packets by up to 3 s), and
        wait (at most `timeout` s) until both ends of both links are operationally up. Idempotent."""
        self._links_up(replica, timeout)
        self.partitioned.discard(replica)
        self._save()

    def _links_up(self, replica: str, timeout: float = 5.0) -> None:
        i = self.replica_index(replica)
        self._set_links(replica, "up")
        self._ip_batch(replica, [f"route replace default via 10.70.{i}.1",
                                 "neigh flush dev eth0", "neigh flush dev sync0"])
        self._ip_batch("r", [f"neigh flush dev {replica}0"])
        for other in self.replicas:
            if other != replica:
                self._ip_batch(other, [f"neigh flush to {self.sync_ip(replica)}"])
        self._wait_ifaces_up(self._link_ends(replica), timeout)

    def _wait_ifaces_up(self, ifaces, timeout: float = 5.0) -> None:
        """Wait until every (node, iface) is operationally up (see _wait_links_up)."""
        deadline = time.monotonic() + timeout
        pending = list(ifaces)
        for _ in range(int(timeout / 0.05) + 5):
            still = []
            for node, iface in pending:
                res = subprocess.run(["ip", "-n", self.ns(node), "-j", "link", "show", "dev", iface],
                                     capture_output=True, text=True, timeout=CMD_TIMEOUT)
                try:
                    links = json.loads(res.stdout or "[]")
                except json.JSONDecodeError:
                    links = []
                if not links or links[0].get("operstate") not in ("UP", "UNKNOWN"):
                    still.append((node, iface))
            pending = still
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if pending:
            raise LabError(f"interfaces not up after {timeout:.0f} s: "
                           + ", ".join(f"{node}:{iface}" for node, iface in pending))

    def alter_object(self, replica: str, path: str, how: str, offset: int = None) -> str:
        """Make `replica`'s copy of an object differ from the others (docroot="copy" only).

        how="bytes": same size and mtime, the bytes from `offset` (default size // 2) to the end
        are the shared original's XOR 0x5A (so the first differing byte is at `offset`);
        how="mtime": same bytes, mtime = the original's + one day (Last-Modified and mtime-based
        ETags differ); how="bytes+mtime": both; what `how` does not name is left as it is.
        Deterministic from the shared original (calling it twice gives the same file). In place
        (same inode), while the servers run: none of them caches file contents or stat data
        (nginx's open_file_cache is off, the lighttpd config disables its stat cache). Returns
        the file's new sha256 hex.
        """
        self.replica_index(replica)
        if self.docroot_mode != "copy":
            raise LabError(f"alter_object: needs docroot='copy' (lab {self.name} has docroot="
                           f"{self.docroot_mode!r}: every replica serves the same shared files)")
        if how not in ALTER_HOWS:
            raise LabError(f"alter_object: how must be one of {', '.join(ALTER_HOWS)}, not {how!r}")
        key = path if path.startswith("/") else "/" + path
        if key not in self.objects:
            raise LabError(f"alter_object: unknown object {path!r} (objects: {', '.join(self.objects)})")
        size = self.objects[key][0]
        original = Path(self.docroot) / key.lstrip("/")
        target = Path(self.docroot_of(replica)) / key.lstrip("/")
        if not target.is_file():
            raise LabError(f"alter_object: {target} does not exist (is lab {self.name} up?)")
        st = target.stat()
        if "bytes" in how:
            if offset is None:
                offset = size // 2
            if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < size:
                raise LabError(f"alter_object: offset must be an integer in [0, {size}), got {offset!r}")
            block = 1 << 20
            with open(original, "rb") as src, open(target, "r+b") as dst:
                pos = 0
                for _ in range(size // block + 2):  # bounded: one MiB per round
                    data = src.read(block)
                    if not data:
                        break
                    if pos + len(data) > offset:  # this block holds bytes to alter
                        cut = max(0, offset - pos)
                        data = data[:cut] + data[cut:].translate(_XOR_TABLE)
                    dst.seek(pos)
                    if dst.read(len(data)) != data:  # only dirty what differs
                        dst.seek(pos)
                        dst.write(data)
                    pos += len(data)
                dst.truncate(size)
                dst.flush()  # the page cache is what every server reads: no fsync needed
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # the write moved the mtime: put it back
        if "mtime" in how:
            mtime = int(original.stat().st_mtime) + 86400
            os.utime(target, (mtime, mtime))
        return file_sha256(target)

    def url(self, replica: str, path: str) -> str:
        if replica not in self.replicas:
            raise LabError(f"unknown replica {replica!r} (replicas: {', '.join(self.replicas)})")
        if not path.startswith("/"):
            path = "/" + path
        return f"http://{self.ip(replica)}{path}"

    @property
    def objects(self) -> dict:
        if self._objects is None:
            self._objects = docroot_mod.ensure(self.object_sizes)
        return self._objects

    def topology(self) -> dict:
        return {"name": self.name,
                "namespaces": {n: ns_name(self.name, n) for n in self.nodes},
                "clients": {f"c{k}": self.ip(f"c{k}") for k in range(1, self.clients + 1)},
                "router": {"cl0": "10.70.0.1", **{f"{r}0": f"10.70.{i}.1" for i, r in enumerate(self.replicas, 1)}},
                "replicas": {r: {"ip": self.ip(r), "iface": "eth0", "gateway": f"10.70.{i}.1", "port": 80,
                                 "index": i, "sync_ip": self.sync_ip(r), "sync_port": SYNC_PORT}
                             for i, r in enumerate(self.replicas, 1)},
                "client_appliance": {"node": "ca", "client_if": "cl0", "net_if": "up0"},
                "docroot": self.docroot, "docroot_mode": self.docroot_mode,
                "docroots": {r: self.docroot_of(r) for r in self.replicas},
                "server": self.server, "links": self.options()["links"]}

    # -- running commands -----------------------------------------------------------------

    def run(self, node: str, argv, check: bool = True, timeout: float = CMD_TIMEOUT, **kw):
        if isinstance(argv, str):
            argv = shlex.split(argv)
        if not any(k in kw for k in ("stdout", "stderr", "capture_output")):
            kw["capture_output"] = True
        if kw.get("capture_output") or "stdout" in kw:
            kw.setdefault("text", True)
        cmd = ["ip", "netns", "exec", self.ns(node), *argv]
        res = subprocess.run(cmd, timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise LabCommandError(res.returncode, cmd, res.stdout, res.stderr)
        return res

    def popen(self, node: str, argv, **kw) -> subprocess.Popen:
        if isinstance(argv, str):
            argv = shlex.split(argv)
        return subprocess.Popen(["ip", "netns", "exec", self.ns(node), *argv], **kw)

    def _sh(self, argv, timeout: float = CMD_TIMEOUT, input=None):  # noqa: A002
        res = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise LabError(f"command failed ({res.returncode}): {' '.join(argv)}\n{(res.stderr or res.stdout).strip()}")
        return res

    def _ip_batch(self, node: str, lines) -> None:
        lines = [ln for ln in lines if ln]
        if lines:
            self._sh(["ip", "-n", self.ns(node), "-batch", "-"], input="\n".join(lines) + "\n")

    def _sysctl(self, node: str, settings: dict) -> None:
        args = [f"{k}={v}" for k, v in settings.items()]
        self._sh(["ip", "netns", "exec", self.ns(node), "sysctl", "-q", "-w", *args])

    def _ethtool_off(self, node: str, iface: str) -> None:
        self._sh(["ip", "netns", "exec", self.ns(node), "ethtool", "-K", iface, "tx", "off", "tso", "off",
                  "gso", "off"])

    def _tbf(self, node: str, iface: str, rate_bps: int, buffer_ms=None) -> None:
        burst = max(1600, int(rate_bps / 8 * 0.004))
        latency = f"{int(buffer_ms)}ms" if buffer_ms else TBF_LATENCY  # the queue: this long at the rate
        self._sh(["tc", "-n", self.ns(node), "qdisc", "replace", "dev", iface, "root", "tbf", "rate",
                  f"{rate_bps}bit", "burst", str(burst), "latency", latency])

    # -- state ----------------------------------------------------------------------------

    def _save(self, phase: str = "up") -> None:
        LAB_ROOT.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.state_file, {
            "name": self.name, "phase": phase, "created": getattr(self, "_created", time.time()),
            "creator_pid": os.getpid(), "options": self.options(), "nodes": list(self.nodes),
            "namespaces": [ns_name(self.name, n) for n in self.nodes], "lab_dir": str(self.lab_dir),
            "docroot": self.docroot, "copies_dir": str(self.copies_dir) if self.docroot_mode == "copy" else None,
            "partitioned": sorted(self.partitioned), "processes": self.procs})

    @classmethod
    def attach(cls, name: str) -> "Lab":
        """A Lab object for an existing lab, from its state file."""
        _check_name(name)
        path = LAB_ROOT / f"{name}.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"lab {name!r} is not up (no {path})") from None
        except json.JSONDecodeError as exc:
            raise LabError(f"lab {name!r}: unreadable state file {path}: {exc}") from None
        o = state["options"]
        lab = cls(name=name, clients=o["clients"], replicas=o["replicas"], server=o["server"],
                  client_path=o["client_path"], offloads=o["offloads"], links=o["links"],
                  appliances=o["appliances"], object_sizes=o.get("object_sizes"), sync=o.get("sync", "zeroconf"),
                  group_key=o.get("group_key"), group_config=o.get("group_config"),
                  docroot=o.get("docroot", "shared"))
        lab.procs = state.get("processes", {})
        lab.partitioned = set(state.get("partitioned", ()))
        lab._created = state.get("created", time.time())
        lab._is_up = state.get("phase") == "up"
        return lab

    @staticmethod
    def exists(name: str) -> bool:
        _check_name(name)
        return (LAB_ROOT / f"{name}.json").exists() or (LAB_ROOT / name).exists() or bool(_lab_namespaces(name))

    # -- bring up -------------------------------------------------------------------------

    @staticmethod
    def preflight(server: str = "builtin") -> None:
        if os.geteuid() != 0:
            raise LabError(NEEDS_ROOT)
        for tool in ("ip", "tc", "ethtool", "sysctl"):
            if shutil.which(tool) is None and not any(
                    os.access(f"{d}/{tool}", os.X_OK) for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin")):
                raise LabError(f"missing the {tool!r} binary (Debian: apt-get install iproute2 ethtool procps)")
        if server == "nginx" and not os.access(NGINX, os.X_OK):
            raise LabError(f"server: nginx requested but {NGINX} is missing (Debian: apt-get install nginx-light)")
        if server == "lighttpd" and not os.access(LIGHTTPD, os.X_OK):
            raise LabError(f"server: lighttpd requested but {LIGHTTPD} is missing (Debian: apt-get install lighttpd; "
                           "./setup.sh installs it)")

    def up(self, replace: bool = False) -> "Lab":
        self.preflight(self.server)
        if self.exists(self.name):
            if not replace:
                raise LabError(f"lab {self.name!r} already exists; run `appliance lab down --name {self.name}` "
                               "(or up with --replace / Lab.up(replace=True))")
            self.down_by_name(self.name)
        self._created = time.time()
        try:
            self.lab_dir.mkdir(parents=True)
            self._save(phase="creating")
            self._objects = docroot_mod.ensure(self.object_sizes)
            if self.docroot_mode == "copy":
                self._make_copies()
            self._build_topology()
            (self.lab_dir / "topology.json").write_text(json.dumps(self.topology(), indent=1, sort_keys=True))
            self._start_link_elements()
            self._start_http_servers()
            self._is_up = True
            self._save()
            if self.appliances:
                started = [rep for rep in self.replicas if self.start_server_appliance(rep, wait=False) is not None]
                for rep in started:  # all start in parallel, then each must report ready
                    self.wait_server_appliance(rep)
                if self.client_path == "appliance":
                    self.start_client_appliance()
        except BaseException:
            try:
                self.down()
            except Exception as exc:  # noqa: BLE001
                _warn(f"cleanup after a failed up also failed: {exc}")
            raise
        self._save()
        return self

    def _veths(self) -> list:
        """(node1, if1, node2, if2) for every veth pair."""
        pairs = []
        if self.clients == 1:
            pairs.append(("c1", "eth0", "ca", "cl0"))
        else:
            for k in range(1, self.clients + 1):
                pairs.append((f"c{k}", "eth0", "sw", f"p{k}"))
            pairs.append(("sw", "ca0", "ca", "cl0"))
        if self._needs_element("client"):
            pairs += [("ca", "up0", "lclient", "c0"), ("lclient", "r0", "r", "cl0")]
        else:
            pairs.append(("ca", "up0", "r", "cl0"))
        for rep in self.replicas:
            if self._needs_element(rep):
                ln = self.link_node(rep)
                pairs += [("r", f"{rep}0", ln, "r0"), (ln, "s0", rep, "eth0")]
            else:
                pairs.append(("r", f"{rep}0", rep, "eth0"))
            pairs.append(("sx", f"s{rep}", rep, "sync0"))  # the support group's LAN (mDNS, sync)
        return pairs

    def _build_topology(self) -> None:
        for node in self.nodes:
            self._sh(["ip", "netns", "add", self.ns(node)])
        for node in self.nodes:
            settings = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1}
            if node == "r":
                settings.update({"net.ipv4.ip_forward": 1, "net.ipv4.conf.all.rp_filter": 0,
                                 "net.ipv4.conf.default.rp_filter": 0})
            self._sysctl(node, settings)
        by_node = {}
        for n1, i1, n2, i2 in self._veths():
            by_node.setdefault(n1, []).append(f"link add {i1} type veth peer name {i2} netns {self.ns(n2)}")
        for node, lines in by_node.items():
            self._ip_batch(node, lines)

        cfg = {n: ["link set lo up"] for n in self.nodes}
        for k in range(1, self.clients + 1):
            c = f"c{k}"
            cfg[c] += ["link set eth0 up", f"addr add {self.ip(c)}/24 dev eth0", "route add default via 10.70.0.1"]
        if self.clients > 1:
            cfg["sw"] += ["link add br0 type bridge stp_state 0 forward_delay 0", "link set br0 up"]
            for port in [f"p{k}" for k in range(1, self.clients + 1)] + ["ca0"]:
                cfg["sw"] += [f"link set {port} master br0", f"link set {port} up"]
        cfg["ca"] += ["link set cl0 promisc on", "link set up0 promisc on", "link set cl0 up", "link set up0 up"]
        cfg["r"] += ["link set cl0 up", "addr add 10.70.0.1/24 dev cl0"]
        cfg["sx"] += ["link add br0 type bridge stp_state 0 forward_delay 0", "link set br0 up"]
        for i, rep in enumerate(self.replicas, 1):
            cfg["r"] += [f"link set {rep}0 up", f"addr add 10.70.{i}.1/24 dev {rep}0"]
            cfg[rep] += ["link set eth0 up", f"addr add 10.70.{i}.2/24 dev eth0", f"route add default via 10.70.{i}.1"]
            cfg["sx"] += [f"link set s{rep} master br0", f"link set s{rep} up"]
            cfg[rep] += ["link set sync0 up", f"addr add {self.sync_ip(rep)}/24 dev sync0"]
        for link in self.links:
            if self._needs_element(link):
                ln = self.link_node(link)
                ports = ("c0", "r0") if link == "client" else ("r0", "s0")
                for p in ports:
                    cfg[ln] += [f"link set {p} promisc on", f"link set {p} up"]
        for node in self.nodes:
            self._ip_batch(node, cfg[node])
        self._sysctl("ca", {"net.ipv6.conf.cl0.disable_ipv6": 1, "net.ipv6.conf.up0.disable_ipv6": 1})
        if self.client_path == "bridge":
            self._add_ca_bridge()
        self._wait_links_up()

        # offloads: the ends of the appliance's link, and every interface facing a link element
        off = set()
        if self.offloads == "off":
            off |= {(f"c{k}", "eth0") for k in range(1, self.clients + 1)} | {("r", "cl0")}
        if self._needs_element("client"):
            off |= {("ca", "up0"), ("r", "cl0")}
        for rep in self.replicas:
            if self._needs_element(rep):
                off |= {("r", f"{rep}0"), (rep, "eth0")}
        for node, iface in sorted(off):
            self._ethtool_off(node, iface)

        # rates: tbf on both endpoint egresses
        for link, o in self.links.items():
            if "rate_bps" not in o:
                continue
            if link == "client":
                ends = [(f"c{k}", "eth0") for k in range(1, self.clients + 1)] + [("r", "cl0")]
            else:
                ends = [(link, "eth0"), ("r", f"{link}0")]
            for node, iface in ends:
                self._tbf(node, iface, o["rate_bps"], o.get("buffer_ms"))

    def _wait_links_up(self, nodes=None, timeout: float = 5.0) -> None:
        """Wait until every interface is operationally up.

        A veth brought up before its peer gets its qdisc (and a bridge port its forwarding
        state) only when linkwatch processes the carrier-on event, up to a second later;
        until then frames are dropped. So `up` returns only once that has happened.
        """
        deadline = time.monotonic() + timeout
        pending = list(self.nodes if nodes is None else nodes)
        for _ in range(int(timeout / 0.05) + 5):
            still = []
            for node in pending:
                res = subprocess.run(["ip", "-n", self.ns(node), "-j", "link", "show"], capture_output=True,
                                     text=True, timeout=CMD_TIMEOUT)
                try:
                    links = json.loads(res.stdout or "[]")
                except json.JSONDecodeError:
                    links = []
                if not links or any(ln.get("ifname") != "lo" and ln.get("operstate") not in ("UP", "UNKNOWN")
                                    for ln in links):
                    still.append(node)
            pending = still
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if pending:
            raise LabError(f"interfaces not up after {timeout:.0f} s in: {', '.join(pending)}")

    def _add_ca_bridge(self) -> None:
        self._ip_batch("ca", ["link add br0 type bridge stp_state 0 forward_delay 0",
                              "link set cl0 master br0", "link set up0 master br0", "link set br0 up"])

    # -- processes ------------------------------------------------------------------------

    def _spawn(self, label: str, node: str, argv) -> subprocess.Popen:
        if label in self.procs and self._proc_alive(label):
            raise LabError(f"process {label} is already running (pid {self.procs[label]['pid']})")
        log = self.lab_dir / f"{label}.log"
        with open(log, "ab") as f:
            p = subprocess.Popen(["ip", "netns", "exec", self.ns(node), *map(str, argv)], stdin=subprocess.DEVNULL,
                                 stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        info = _proc_start_time(p.pid)
        self.procs[label] = {"pid": p.pid, "start_time": info[0] if info else None, "node": node,
                             "argv": [str(a) for a in argv], "log": str(log)}
        self._popen[label] = p
        self._save(phase="up" if self._is_up else "creating")
        return p

    def _proc_alive(self, label: str) -> bool:
        info = self.procs.get(label)
        if not info:
            return False
        p = self._popen.get(label)
        if p is not None:
            return p.poll() is None
        return _pid_alive(info["pid"], info.get("start_time"))

    def _stop(self, label: str, grace: float = 5.0, kill: bool = False) -> None:
        info = self.procs.get(label)
        if not info:
            return
        p = self._popen.get(label)
        survivors = _kill_pids({info["pid"]: info.get("start_time")}, grace, popens=[p] if p else [],
                               first=signal.SIGKILL if kill else signal.SIGTERM)
        if p is not None:
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if survivors:
            raise LabError(f"process {label} (pid {info['pid']}) survived SIGKILL")
        self.procs.pop(label, None)
        self._popen.pop(label, None)
        self._save()

    def _wait(self, label: str, ready, what: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 10):
            if ready():
                return
            if not self._proc_alive(label):
                raise LabError(f"{what} ({label}) exited before it was ready; log {self.procs[label]['log']}:\n"
                               f"{_tail(self.procs[label]['log'])}")
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise LabError(f"{what} ({label}) not ready after {timeout:.0f} s; log {self.procs[label]['log']}:\n"
                       f"{_tail(self.procs[label]['log'])}")

    def _status_ready(self, role: str, node: str):
        def ready():
            st = statusfile.read_status(self.lab_dir, role, node)
            return isinstance(st, dict) and st.get("ready") is True
        return ready

    def _start_link_elements(self) -> None:
        started = []
        for link, o in self.links.items():
            if not self._needs_element(link):
                continue
            ln = self.link_node(link)
            ports = ("c0", "r0") if link == "client" else ("r0", "s0")
            argv = [sys.executable, "-m", "appliance.linkem", "--ports", *ports,
                    "--delay-ms", o.get("delay_ms", 0.0), "--loss", o.get("loss", 0.0),
                    "--seed", o.get("seed", f"{self.name}:{link}"), "--node", ln, "--state-dir", self.lab_dir]
            statusfile.status_path(self.lab_dir, "linkem", ln).unlink(missing_ok=True)
            self._spawn(f"linkem-{ln}", ln, argv)
            started.append(ln)
        for ln in started:
            self._wait(f"linkem-{ln}", self._status_ready("linkem", ln), "link element")

    def _make_copies(self) -> None:
        """docroot="copy": every replica's own copy of the objects under copies_dir/<replica>/."""
        shutil.rmtree(self.copies_dir, ignore_errors=True)  # a stale one from a crashed lab
        self.copies_dir.mkdir(parents=True)
        for rep in self.replicas:
            try:
                docroot_mod.copy_to(self.docroot_of(rep), self.object_sizes)
            except OSError as exc:
                raise LabError(f"docroot: cannot copy the objects to {self.docroot_of(rep)}: {exc}") from None

    def _nginx_conf(self, rep: str) -> Path:
        d = self.lab_dir
        tmp = d / f"nginx-{rep}"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        conf = d / f"nginx-{rep}.conf"
        conf.write_text(f"""# generated by appliance.lab for replica {rep} of lab {self.name}
worker_processes 1;
daemon off;
master_process on;
user root;
pid {d}/nginx-{rep}.pid;
error_log {d}/nginx-{rep}.error.log warn;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    access_log {d}/nginx-{rep}.access.log;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 100000;
    server_tokens off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen {self.ip(rep)}:80;
        root {self.docroot_of(rep)};
        location / {{ }}
    }}
}}
""")
        return conf

    def _lighttpd_conf(self, rep: str) -> Path:
        d = self.lab_dir
        conf = d / f"lighttpd-{rep}.conf"
        q = json.dumps  # lighttpd's strings are double-quoted with backslash escapes, like JSON's
        conf.write_text(f"""# generated by appliance.lab for replica {rep} of lab {self.name}
server.document-root = {q(self.docroot_of(rep))}
server.bind = {q(self.ip(rep))}
server.port = 80
server.modules = ("mod_accesslog")
server.errorlog = {q(str(d / f"lighttpd-{rep}.error.log"))}
accesslog.filename = {q(str(d / f"lighttpd-{rep}.access.log"))}
server.upload-dirs = ({q(str(d))})
server.tag = "lighttpd"
mimetype.assign = ("" => "application/octet-stream")  # a type for every file: else no ETag/Last-Modified
server.max-keep-alive-requests = 1000
server.max-keep-alive-idle = 75
# lighttpd's default ETag: a hash of inode, mtime and size (so copies on other replicas differ)
static-file.etags = "enable"
etag.use-inode = "enable"
etag.use-mtime = "enable"
etag.use-size = "enable"
# no stat cache: a file changed under a running server (Lab.alter_object) is served as it is now
server.stat-cache-engine = "disable"
""")
        return conf

    def revive_replica(self, replica: str, appliance: bool = True) -> None:
        """Bring a killed replica back: links up, its HTTP server and (by default) its server
        appliance started again (a new epoch: its peers see a restart). Like a rebooted machine
        it keeps no TCP state: sockets its killed processes left behind (a FIN still waiting to
        be sent) are destroyed while the links are still down."""
        self.replica_index(replica)
        subprocess.run(["ss", "-N", self.ns(replica), "-K", "-t", "state", "all"], capture_output=True,
                       timeout=CMD_TIMEOUT)  # best effort (needs CONFIG_INET_DIAG_DESTROY)
        self._links_up(replica)
        self.partitioned.discard(replica)
        self._start_http_servers([replica])
        if appliance and self.appliances:
            self.start_server_appliance(replica)
        self._save()

    def _start_http_servers(self, replicas=None) -> None:
        labels = []
        for rep in (replicas or self.replicas):
            if self.server == "lighttpd":
                argv = [LIGHTTPD, "-D", "-f", self._lighttpd_conf(rep)]
                label = f"lighttpd-{rep}"
            elif self.server == "nginx":
                conf = self._nginx_conf(rep)
                argv = [NGINX, "-c", conf, "-p", self.lab_dir / f"nginx-{rep}", "-e",
                        self.lab_dir / f"nginx-{rep}.error.log"]
                label = f"nginx-{rep}"
            else:
                argv = [sys.executable, "-m", "appliance.httpserver", "--root", self.docroot_of(rep),
                        "--bind", self.ip(rep), "--port", "80", "--access-log", self.lab_dir / f"http-{rep}.access.log"]
                label = f"http-{rep}"
            self._spawn(label, rep, argv)
            labels.append(label)
        for label in labels:
            pid, ns = self.procs[label]["pid"], self.ns(self.procs[label]["node"])
            self._wait(label, lambda pid=pid, ns=ns: _listening(pid, 80, ns), "HTTP server")

    def start_client_appliance(self, extra_args=()):
        """Start the client appliance in ca (client_path must be "appliance"); None if it does not exist yet."""
        if self.client_path != "appliance":
            raise LabError("the client appliance runs only with client_path='appliance' (ca has br0 now)")
        if importlib.util.find_spec("appliance.client") is None:
            _warn("appliance.client does not exist yet: not starting the client appliance "
                  "(the clients have no connectivity with client_path=appliance)")
            return None
        statusfile.status_path(self.lab_dir, "client", "ca").unlink(missing_ok=True)
        argv = [sys.executable, "-m", "appliance", "client", "--client-if", "cl0", "--net-if", "up0", "--node", "ca",
                "--state-dir", self.lab_dir, *extra_args]
        p = self._spawn("client-ca", "ca", argv)
        self._wait("client-ca", self._status_ready("client", "ca"), "client appliance")
        return p

    def stop_client_appliance(self, kill: bool = False) -> None:
        """Stop the client appliance: SIGTERM (a clean stop), or with kill=True SIGKILL (a crash)."""
        self._stop("client-ca", kill=kill)

    def start_server_appliance(self, replica: str, extra_args=(), wait: bool = True):
        """Start the server appliance on `replica`; None if appliance.server does not exist yet."""
        self.replica_index(replica)
        if importlib.util.find_spec("appliance.server") is None:
            _warn(f"appliance.server does not exist yet: not starting the server appliance on {replica}")
            return None
        statusfile.status_path(self.lab_dir, "server", replica).unlink(missing_ok=True)
        config = self.write_group_config(replica)
        argv = [sys.executable, "-m", "appliance", "server", "--config", str(config), "--node", replica,
                "--state-dir", self.lab_dir, *extra_args]
        label = f"server-{replica}"
        p = self._spawn(label, replica, argv)
        if wait:
            self.wait_server_appliance(replica)
        return p

    def wait_server_appliance(self, replica: str, timeout: float = READY_TIMEOUT) -> None:
        self._wait(f"server-{replica}", self._status_ready("server", replica), "server appliance", timeout)

    def stop_server_appliance(self, replica: str, kill: bool = False) -> None:
        """Stop a replica's server appliance (its HTTP server lives on): SIGTERM, or SIGKILL."""
        self.replica_index(replica)
        self._stop(f"server-{replica}", kill=kill)

    def set_client_path(self, mode: str) -> None:
        if mode not in ("appliance", "bridge"):
            raise LabError(f"client_path: want 'appliance' or 'bridge', got {mode!r}")
        if mode == self.client_path:
            return
        if mode == "bridge":
            self.stop_client_appliance()
            self._add_ca_bridge()
            self._wait_links_up(["ca"])
            self.client_path = "bridge"
            self._save()
        else:
            self._ip_batch("ca", ["link del br0", "link set cl0 promisc on", "link set up0 promisc on",
                                  "link set cl0 up", "link set up0 up"])
            self._wait_links_up(["ca"])
            self.client_path = "appliance"
            self._save()
            if self.appliances:
                self.start_client_appliance()

    # -- status ---------------------------------------------------------------------------

    def status(self) -> dict:
        nss = set(_lab_namespaces(self.name))
        nodes = {}
        for node in self.nodes:
            ns = ns_name(self.name, node)
            entry = {"ns": ns, "exists": ns in nss, "interfaces": {}}
            if ns in nss:
                res = subprocess.run(["ip", "-n", ns, "-j", "addr", "show"], capture_output=True, text=True,
                                     timeout=CMD_TIMEOUT)
                try:
                    for link in json.loads(res.stdout or "[]"):
                        if link.get("ifname") == "lo":
                            continue
                        entry["interfaces"][link["ifname"]] = {
                            "state": link.get("operstate"), "master": link.get("master"),
                            "addresses": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                                          if a.get("family") == "inet"]}
                except (json.JSONDecodeError, KeyError):
                    pass
            nodes[node] = entry
        procs = {label: {**info, "alive": self._proc_alive(label)} for label, info in self.procs.items()}
        appl = {}
        for role, node in ([("client", "ca")] + [("server", r) for r in self.replicas]
                           + [("linkem", self.link_node(k)) for k in self.links if self._needs_element(k)]):
            st = statusfile.read_status(self.lab_dir, role, node)
            if st is not None:
                appl[f"{role}-{node}"] = st
        return {"name": self.name, "up": self._is_up and bool(nss), "options": self.options(),
                "lab_dir": str(self.lab_dir), "state_file": str(self.state_file), "docroot": self.docroot,
                "docroot_mode": self.docroot_mode, "docroots": {r: self.docroot_of(r) for r in self.replicas},
                "partitioned": sorted(self.partitioned), "nodes": nodes, "processes": procs, "appliances": appl}

    # -- tear down ------------------------------------------------------------------------

    def down(self) -> None:
        popens = list(self._popen.values())
        self.down_by_name(self.name, popens=popens, extra_pids={i["pid"]: i.get("start_time")
                                                               for i in self.procs.values()})
        for p in popens:
            try:
                p.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.procs = {}
        self._popen = {}
        self._is_up = False

    @staticmethod
    def down_by_name(name: str, popens=(), extra_pids=None) -> None:
        """Remove everything of lab `name`: processes, namespaces, lab dir, state file."""
        _check_name(name)
        if os.geteuid() != 0:
            raise LabError(NEEDS_ROOT)
        state_file = LAB_ROOT / f"{name}.json"
        pids = dict(extra_pids or {})
        try:
            state = json.loads(state_file.read_text())
            for info in state.get("processes", {}).values():
                pids[int(info["pid"])] = info.get("start_time")
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            state = None
        namespaces = set(_lab_namespaces(name))
        if state:
            namespaces |= {ns for ns in state.get("namespaces", []) if (NETNS_DIR / ns).exists()}
        # Recorded pids (checked against their start time, so a recycled pid is never hit),
        # then everything still inside the namespaces; twice, in case something forked meanwhile.
        for _ in range(2):
            for pid, ns in _pids_in_netns(namespaces).items():
                pids.setdefault(pid, None)
            survivors = _kill_pids(pids, grace=3.0, popens=popens)
            pids = {}
            if survivors:
                _warn(f"processes survived SIGKILL: {survivors}")
        errors = []
        for ns in sorted(namespaces):
            res = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=CMD_TIMEOUT)
            if res.returncode != 0 and (NETNS_DIR / ns).exists():
                errors.append(f"{ns}: {res.stderr.strip()}")
        shutil.rmtree(LAB_ROOT / name, ignore_errors=True)
        shutil.rmtree(COPIES_ROOT / name, ignore_errors=True)  # docroot="copy"
        for path in (state_file,):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if errors:
            raise LabError("could not delete namespaces: " + "; ".join(errors))

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> "Lab":
        if not self._is_up:
            self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def __repr__(self) -> str:
        return f"Lab({self.name!r}, nodes={self.nodes})"


# --- CLI -----------------------------------------------------------------------------------


def _kv_list(values, option: str, conv):
    out = {}
    for item in values or ():
        link, sep, val = item.partition("=")
        if not sep or not link or not val:
            raise LabError(f"{option}: want LINK=VALUE (LINK: client or a replica), got {item!r}")
        try:
            out[link] = conv(val)
        except ValueError:
            raise LabError(f"{option}: bad value {val!r} for link {link!r}") from None
    return out


def register(subparsers) -> None:
    lab = subparsers.add_parser("lab", help="build and manage the network-namespace lab",
                                description="Build and manage the network-namespace lab (needs root).")
    lab.set_defaults(func=_cli)
    sub = lab.add_subparsers(dest="lab_command", metavar="ACTION")

    up = sub.add_parser("up", help="create a lab")
    up.add_argument("--name", default="lab", help="lab name, [a-z0-9]{1,10} (default %(default)s)")
    up.add_argument("--clients", default="1", help="number of clients (default 1)")
    up.add_argument("--replicas", default="a,b,c", help="comma-separated replica names (default %(default)s)")
    up.add_argument("--server", default="builtin", help="builtin|nginx|lighttpd (default %(default)s)")
    up.add_argument("--docroot", default="shared",
                    help="shared|copy: one shared docroot, or each replica its own copy (default %(default)s)")
    up.add_argument("--client-path", default="appliance", help="appliance|bridge (default %(default)s)")
    up.add_argument("--offloads", default="on", help="on|off (default %(default)s)")
    up.add_argument("--rate", action="append", metavar="LINK=RATE", help="tbf rate on a link, e.g. a=128kbit")
    up.add_argument("--delay", action="append", metavar="LINK=MS", help="one-way delay via a link element")
    up.add_argument("--loss", action="append", metavar="LINK=P", help="loss probability via a link element")
    up.add_argument("--objects", default="", help="extra object sizes, e.g. 4k,64k,4m")
    up.add_argument("--no-appliances", action="store_true", help="do not start the appliance processes")
    up.add_argument("--replace", action="store_true", help="take down a lab of the same name first")

    down = sub.add_parser("down", help="remove a lab and everything it left behind")
    down.add_argument("--name", default="lab")

    st = sub.add_parser("status", help="show a lab's namespaces, addresses, processes and appliances")
    st.add_argument("--name", default="lab")
    st.add_argument("--json", action="store_true", help="print the status as JSON")

    ex = sub.add_parser("exec", help="run a command in a node's namespace: exec NODE [--name N] -- CMD...")
    ex.add_argument("--name", default="lab")
    ex.add_argument("node")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)


def _cli(args) -> int:
    try:
        if args.lab_command == "up":
            return _cli_up(args)
        if args.lab_command == "down":
            _check_name(args.name)
            Lab.down_by_name(args.name)
            print(f"lab {args.name}: down")
            return 0
        if args.lab_command == "status":
            return _cli_status(args)
        if args.lab_command == "exec":
            return _cli_exec(args)
        print("usage: appliance lab {up,down,status,exec} ... (see appliance lab -h)", file=sys.stderr)
        return 2
    except LabError as exc:
        print(f"appliance lab: error: {exc}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as exc:
        print(f"appliance lab: error: timed out: {exc}", file=sys.stderr)
        return 1


def _cli_up(args) -> int:
    try:
        clients = int(args.clients)
    except ValueError:
        raise LabError(f"--clients: want an integer, got {args.clients!r}") from None
    links = {}
    for option, values, key, conv in (("--rate", args.rate, "rate", str), ("--delay", args.delay, "delay_ms", float),
                                      ("--loss", args.loss, "loss", float)):
        for link, val in _kv_list(values, option, conv).items():
            links.setdefault(link, {})[key] = val
    try:
        lab = Lab(name=args.name, clients=clients, replicas=args.replicas, server=args.server,
                  client_path=args.client_path, offloads=args.offloads, links=links,
                  appliances=not args.no_appliances, object_sizes=[s for s in args.objects.split(",") if s],
                  docroot=args.docroot)
    except LabError as exc:
        msg = str(exc)
        m = re.match(r"links\['([^']*)'\]\['(\w+)'\]: (.*)", msg, re.S)
        if m:
            opt = {"rate": "--rate", "delay_ms": "--delay", "loss": "--loss"}.get(m.group(2), "--" + m.group(2))
            msg = f"{opt} {m.group(1)}=...: {m.group(3)}"
        elif msg.startswith("links: "):
            msg = "--rate/--delay/--loss: " + msg[len("links: "):]
        for opt in ("clients", "replicas", "server", "client_path", "offloads", "object_sizes", "name", "docroot"):
            if msg.startswith(opt + ":"):
                msg = "--" + {"client_path": "client-path", "object_sizes": "objects"}.get(opt, opt) + msg[len(opt):]
        raise LabError(msg) from None
    t0 = time.monotonic()
    lab.up(replace=args.replace)
    print(f"lab {lab.name}: up in {time.monotonic() - t0:.1f} s; nodes {', '.join(lab.nodes)}; "
          f"state {lab.state_file}")
    for rep in lab.replicas:
        print(f"  {rep}: {lab.url(rep, '/')}  docroot {lab.docroot_of(rep)}")
    return 0


def _cli_status(args) -> int:
    lab = Lab.attach(args.name)
    st = lab.status()
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 0
    o = st["options"]
    print(f"lab {lab.name}: {'up' if st['up'] else 'NOT UP'}; server {o['server']}, client path {o['client_path']}, "
          f"offloads {o['offloads']}, links {o['links'] or '-'}")
    print(f"  lab dir {st['lab_dir']}, docroot {o.get('docroot', 'shared')}: "
          + (st["docroot"] if o.get("docroot", "shared") == "shared"
             else ", ".join(f"{r} {d}" for r, d in st["docroots"].items())))
    if st.get("partitioned"):
        print(f"  partitioned: {', '.join(st['partitioned'])}")
    for node, e in st["nodes"].items():
        ifs = ", ".join(f"{i}{'@' + v['master'] if v.get('master') else ''} {v['state']} "
                        f"{' '.join(v['addresses']) or '-'}" for i, v in sorted(e["interfaces"].items()))
        print(f"  {node:8} {e['ns']:24} {'ok' if e['exists'] else 'MISSING':8} {ifs}")
    for label, p in sorted(st["processes"].items()):
        print(f"  process {label:14} pid {p['pid']:<8} {'alive' if p['alive'] else 'DEAD'}  log {p['log']}")
    for key, a in sorted(st["appliances"].items()):
        keys = [k for k in ("ready", "error", "connections", "peers", "migrations", "total") if k in a]
        summary = ", ".join(f"{k}={len(a[k]) if isinstance(a[k], list) else json.dumps(a[k], sort_keys=True)}"
                            for k in keys)
        print(f"  status {key:14} {summary}")
    return 0 if st["up"] else 1


def _cli_exec(args) -> int:
    cmd = list(args.cmd)
    name = args.name
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    elif cmd and cmd[0].startswith("-") and "--" in cmd:
        # options that argparse left in the remainder: exec NODE --name N -- CMD
        i = cmd.index("--")
        pre, cmd = cmd[:i], cmd[i + 1:]
        mini = argparse.ArgumentParser(prog="appliance lab exec", add_help=False)
        mini.add_argument("--name", default=name)
        try:
            ns, rest = mini.parse_known_args(pre)
        except SystemExit:
            return 2
        if rest:
            raise LabError(f"exec: unknown options {rest}")
        name = ns.name
    if not cmd:
        raise LabError("exec: no command given (exec NODE [--name N] -- CMD...)")
    lab = Lab.attach(name)
    ns = lab.ns(args.node)
    try:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd]).returncode
    except KeyboardInterrupt:
        return 130
