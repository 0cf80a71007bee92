"""`appliance demo`: a live download survives the crash of the replica serving it.

The lab comes up (client c1, the client appliance, a router, replicas a b c each with an
HTTP server and a server appliance in one support group). c1 downloads a large object from
replica a over a shaped link; half-way, a is killed (its processes and its links). Its peers
declare it dead, one of them sends the client a Migrate SYN, rebuilds the connection with
TCP_REPAIR and continues it at the exact next byte from its own copy. On a terminal the
live dashboard (appliance top) shows it happen. Then the demo prints both sha256 sums and a
timeline: failure detected, takeover decided, Migrate SYN sent, accepted, first resumed byte.
Exit status is non-zero on any failure. The lab is taken down unless --keep is given.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time

from . import docroot
from .lab import file_sha256, file_size, wait_for
from .statusfile import read_events, read_status


def register(sub) -> None:
    p = sub.add_parser("demo", help="a live download survives the crash of its replica (the failover demo)")
    p.add_argument("--name", default="demo", help="the lab's name")
    p.add_argument("--server", choices=("builtin", "nginx"), default="builtin")
    p.add_argument("--size", default="100m", help="object size (default 100m)")
    p.add_argument("--rate", default="100mbit", help="the replicas' link rate (default 100mbit)")
    p.add_argument("--kill-at", type=float, default=0.5, help="fraction of the download at which a dies")
    p.add_argument("--no-dashboard", action="store_true", help="plain progress lines even on a terminal")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.set_defaults(func=run)


class DemoFailure(Exception):
    pass








class Scenario:
    """The demo's steps, run in a thread while the dashboard (or a printer) shows them."""

    def __init__(self, lab, path: str, kill_at: float, say) -> None:
        self.lab, self.path, self.kill_at, self.say = lab, path, kill_at, say
        self.out = os.path.join(tempfile.mkdtemp(prefix="appliance-demo-"), "download")
        self.killed_at = None
        self.curl_done_at = None
        self.error = None
        self.curl = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001  reported by the caller
            self.error = exc
        finally:
            self.done.set()

    def _run(self) -> None:
        lab = self.lab
        size = lab.objects[self.path][0]
        ok = wait_for(lambda: all(len(((read_status(lab.lab_dir, "server", r) or {}).get("group") or {})
                                   .get("peers", {})) == len(lab.replicas) - 1 for r in lab.replicas), 20)
        if not ok:
            raise DemoFailure("the support group did not form (zeroconf discovery)")
        self.say("support group formed: a, b and c see each other")
        url = lab.url("a", self.path)
        self.say(f"c1: curl {url}  ({size / 2**20:.0f} MiB)")
        self.started = time.time()
        self.curl = lab.popen("c1", ["curl", "-sS", "--max-time", "300", "-o", self.out, url],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if not wait_for(lambda: file_size(self.out) >= size * self.kill_at or self.curl.poll() is not None, 120):
            raise DemoFailure("the download did not get half-way")
        if self.curl.poll() is not None:
            raise DemoFailure(f"curl ended before the crash: {self.curl.stderr.read().strip()}")
        self.say(f"{file_size(self.out) / 2**20:.1f} MiB received: killing replica a (processes and links)")
        self.killed_at = lab.kill_replica("a")
        try:
            err = self.curl.communicate(timeout=300)[1]
        except subprocess.TimeoutExpired:
            self.curl.kill()
            raise DemoFailure("the download did not finish") from None
        self.curl_done_at = time.time()
        if self.curl.returncode != 0:
            raise DemoFailure(f"curl failed ({self.curl.returncode}): {err.strip()}")
        self.say(f"curl finished: {file_size(self.out):,} bytes")


def timeline(lab, killed_at: float, started: float) -> list:
    """(seconds after the crash, who, what) for the steps of the failover. A step from before
    the crash (a peer falsely suspected of death moved the connection early: allowed by the
    design, it costs a needless migration, not data) shows with a negative time."""
    rows = [(killed_at, "lab", "replica a killed (processes and links)")]
    seen = set()

    def first(role, node, kind, pred=lambda e: True):
        for e in read_events(lab.lab_dir, role, node):
            if e["event"] == kind and e["t"] >= started and pred(e):
                return e
        return None

    for r in lab.replicas:
        if r == "a":
            continue
        e = first("server", r, "peer_dead", lambda e: e.get("node") == "a")
        if e:
            rows.append((e["t"], r, f"failure detected: a silent for {e.get('silence_ms')} ms"))
        for kind, text in (("takeover", "selected: takes the connection over (rank {rank})"),
                           ("migrate_syn_sent", "Migrate SYN sent to the client (ReqNo {reqno})"),
                           ("synack", "the client appliance's SYN/ACK received (rtt {rtt_ms} ms)"),
                           ("repaired", "TCP_REPAIR socket built in the client's view"),
                           ("resumed", "local Range request validated: resuming at byte {offset:,}"),
                           ("first_byte", "first resumed byte written to the client"),
                           ("body_sent", "rest of the object sent: {bytes:,} bytes")):
            e = first("server", r, kind)
            if e and (r, kind) not in seen:
                seen.add((r, kind))
                try:
                    rows.append((e["t"], r, text.format(**e)))
                except (KeyError, ValueError):
                    rows.append((e["t"], r, text.split(":")[0]))
    for kind, text in (("migrate_accepted", "Migrate SYN accepted: token, Request and ReqNo valid; network locked"),
                       ("migrated", "new server's first frame: connection rebound, lock released")):
        e = first("client", "ca", kind)
        if e:
            rows.append((e["t"], "ca", text))
    rows.sort()
    return [(t - killed_at, who, what) for t, who, what in rows]


def run(args) -> int:
    if os.geteuid() != 0:
        print("appliance demo: needs root (network namespaces)", file=sys.stderr)
        return 2
    from .lab import Lab, LabError

    size = docroot.size_name(docroot.parse_size(args.size))
    path = f"/obj-{size}"
    t0 = time.monotonic()

    def say(text: str) -> None:
        print(f"[{time.monotonic() - t0:7.3f}s] {text}", flush=True)

    lab = Lab(args.name, server=args.server, client_path="appliance", appliances=True,
              links={r: {"rate": args.rate} for r in ("a", "b", "c")}, object_sizes=(size,))
    try:
        say(f"bringing up lab '{args.name}': client c1, client appliance, router, replicas a b c "
            f"({args.server} HTTP server, {args.rate} links), a server appliance on each replica")
        lab.up(replace=True)
        say("lab up; every appliance reports ready")
        scenario = Scenario(lab, path, args.kill_at, say)
        dashboard = sys.stdout.isatty() and not args.no_dashboard
        if dashboard:
            messages = []
            scenario.say = lambda text: messages.append(f"[{time.monotonic() - t0:7.3f}s] {text}")
            _with_dashboard(lab, scenario)
            for m in messages:
                print(m)
        else:
            scenario.run()
        if scenario.error is not None:
            raise scenario.error
        expected = lab.objects[path][1]
        got = file_sha256(scenario.out)
        print(f"\n  object   sha256 {expected}")
        print(f"  download sha256 {got}  {'EQUAL' if got == expected else 'DIFFERENT'}")
        if got != expected:
            raise DemoFailure("the download differs from the object")
        rows = timeline(lab, scenario.killed_at, scenario.started)
        print("\ntimeline (milliseconds after replica a was killed):")
        for dt, who, what in rows:
            print(f"  {dt * 1000:9.1f} ms  {who:>3}  {what}")
        if any(dt < 0 and who != "lab" for dt, who, _ in rows):
            print("  (steps before the crash: a peer suspected a of death under load and moved the connection "
                  "early; a false suspicion costs a needless migration, never data)")
        if not any("first resumed byte" in what for _, _, what in rows):
            raise DemoFailure("no replica resumed the download")
        print("\nok: the client never noticed; the download finished from another replica, byte-identical")
        return 0
    except (DemoFailure, LabError) as exc:
        print(f"appliance demo: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"lab '{args.name}' left up: appliance top --lab {args.name}; appliance lab down --name {args.name}")
        else:
            lab.down()
            say("lab down")


def _with_dashboard(lab, scenario: Scenario) -> None:
    """Run the scenario in a thread while the dashboard shows the group, until it is over."""
    from rich.console import Console
    from rich.live import Live

    from .top import Collector, render, resolve_sources

    class _Args:
        socket = None
        node = None
    a = _Args()
    a.lab = lab.name
    sources, title, names = resolve_sources(a)
    collector = Collector(sources, title=title, names=names, interval=0.25)
    console = Console()
    thread = threading.Thread(target=scenario.run, daemon=True)
    collector.start()
    try:
        with Live(console=console, screen=True, refresh_per_second=4,
                  get_renderable=lambda: render(collector.state, console.width, console.height)):
            thread.start()
            while not scenario.done.wait(0.2):
                pass
            time.sleep(1.5)  # let the last events show
    finally:
        collector.stop()
