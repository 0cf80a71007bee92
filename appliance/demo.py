"""`appliance demo`: bring the lab up and show a download through both appliances.

The client c1 downloads an object from replica a through the client appliance; the demo
shows the two sha256 sums side by side, the Migrate-Permitted tag the client appliance
added to the client's SYN, and replica a's stream map entry for the response (URL,
length, validators, the sequence number where the body starts). Exit status is non-zero
on any failure. The lab is taken down afterwards unless --keep is given.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time

from . import docroot
from .statusfile import read_events, read_status


def register(sub) -> None:
    p = sub.add_parser("demo", help="bring the lab up and show a download through both appliances")
    p.add_argument("--name", default="demo", help="the lab's name")
    p.add_argument("--server", choices=("builtin", "nginx"), default="builtin")
    p.add_argument("--size", default="10m", help="object size (1k, 10m, ...)")
    p.add_argument("--rate", default=None, help="shape replica a's link, e.g. 100mbit")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.set_defaults(func=run)


class DemoFailure(Exception):
    pass


def _step(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:7.3f}s] {text}", flush=True)


def _wait(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def run(args) -> int:
    if os.geteuid() != 0:
        print("appliance demo: needs root (network namespaces)", file=sys.stderr)
        return 2
    from .lab import Lab, LabError

    size = docroot.size_name(docroot.parse_size(args.size))
    path = f"/obj-{size}"
    links = {"a": {"rate": args.rate}} if args.rate else None
    t0 = time.monotonic()
    lab = Lab(args.name, server=args.server, client_path="appliance", appliances=True, links=links,
              object_sizes=(size,))
    try:
        _step(t0, f"bringing up lab '{args.name}': client c1, client appliance, router, replicas a b c "
                  f"({args.server} HTTP server), a server appliance on each replica")
        lab.up(replace=True)
        _step(t0, "lab up; every appliance reports ready")
        expected = lab.objects[path][1]
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "download")
            url = lab.url("a", path)
            _step(t0, f"c1: curl {url}")
            r = lab.run("c1", ["curl", "-sS", "--max-time", "120", "-o", out, "-w",
                               "%{http_code} %{size_download} %{speed_download}", url], timeout=150, check=False)
            if r.returncode != 0:
                raise DemoFailure(f"curl failed ({r.returncode}): {r.stderr.strip()}")
            code, nbytes, speed = r.stdout.split()
            h = hashlib.sha256()
            with open(out, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            got = h.hexdigest()
        _step(t0, f"HTTP {code}, {int(nbytes):,} bytes at {float(speed) * 8 / 1e6:,.0f} Mbit/s")
        print(f"            object   sha256 {expected}")
        print(f"            download sha256 {got}  {'EQUAL' if got == expected else 'DIFFERENT'}")
        if got != expected:
            raise DemoFailure("the download differs from the object")

        def client_conn():
            st = read_status(lab.lab_dir, "client", "ca") or {}
            return [c for c in st.get("connections", []) if c["server"] == [lab.ip("a"), 80]]

        conns = _wait(client_conn, 3)
        if not conns:
            raise DemoFailure("the client appliance did not record the connection")
        c = conns[-1]
        _step(t0, f"client appliance: connection {c['client'][0]}:{c['client'][1]} -> {lab.ip('a')}:80, "
                  f"SYN tagged with Migrate-Permitted: {c['tagged']}; ISNs client {c['client_syn']['isn']} "
                  f"server {c['server_syn']['isn'] if c['server_syn'] else '?'}")

        def server_entry():
            evs = [e for e in read_events(lab.lab_dir, "server", "a")
                   if e["event"] == "response_start" and e["client_port"] == c["client"][1]]
            return evs[-1] if evs else None

        ev = _wait(server_entry, 3)
        if not ev:
            raise DemoFailure("replica a's stream mapper did not record the response")
        resp = ev["response"]
        _step(t0, f"replica a stream map: GET {ev['request']['path']} -> {resp['status']}, "
                  f"Content-Length {resp['content_length']:,}, ETag {resp['etag']}, body starts at seq "
                  f"{resp['body_start']}, resumable: {resp['resumable']}, client offered Migrate: "
                  f"{ev['migrate_permitted']}")
        if not (c["tagged"] and ev["migrate_permitted"] and resp["resumable"]):
            raise DemoFailure("the connection is not migratable")
        _step(t0, "ok")
        return 0
    except (DemoFailure, LabError) as exc:
        print(f"appliance demo: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"lab '{args.name}' left up: appliance lab status --name {args.name}; "
                  f"appliance lab down --name {args.name}")
        else:
            lab.down()
            _step(t0, "lab down")
