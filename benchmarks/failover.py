#!/usr/bin/env python3
"""Failover time over repeated crashes, beside what a user would do instead.

Each trial: c1 downloads a 20 MB object from one replica over a shaped link; half-way that
replica is killed (processes and links). Failover time = from the kill to the first resumed
byte that curl writes: the end of the longest pause in the growth of the client's file after
the kill (sampled every millisecond; bytes in flight when the server died come first). The killed replica is revived before the next trial, and the serving replica
rotates. Side by side, in the same lab, the user's alternative without the appliances:
curl with the shortest stall detection (--speed-time 1), then `curl -C -` from another
replica, timed the same way. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from appliance.lab import Lab, file_sha256, file_size, wait_for  # noqa: E402
from appliance.statusfile import read_status  # noqa: E402

OBJ = "/obj-20m"
TARGETS = (("failover_p50_ms", "<=", 150), ("failover_p99_ms", "<=", 400))








def group_alive(lab) -> bool:
    for r in lab.replicas:
        peers = ((read_status(lab.lab_dir, "server", r) or {}).get("group") or {}).get("peers", {})
        live = [p for p, info in peers.items() if info.get("state") == "alive"]
        if len(live) != len(lab.replicas) - 1:
            return False
    return True


class Watch(threading.Thread):
    """Samples a file's size every millisecond; first_growth_after(t) is when it grew after t."""

    def __init__(self, path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.samples = []
        self.stop = threading.Event()

    def run(self) -> None:
        last = -1
        while not self.stop.is_set():
            n = file_size(self.path)
            if n != last:
                self.samples.append((time.time(), n))
                last = n
            time.sleep(0.001)

    def resumed_after(self, t: float):
        """When bytes flowed again after the outage that began at t: the end of the longest
        pause in the file's growth after t (bytes already in flight or buffered at the client
        when the server died still arrive first, and are not the failover)."""
        growth = [ts for ts, n in self.samples if ts >= t]
        best, end = 0.0, None
        for a, b in zip(growth, growth[1:]):
            if b - a > best:
                best, end = b - a, b
        return end


def trial_migrate(lab, server: str, fraction: float = 0.5) -> float:
    size, digest = lab.objects[OBJ]
    out = os.path.join(tempfile.mkdtemp(), "o")
    watch = Watch(out)
    watch.start()
    curl = lab.popen("c1", ["curl", "-sS", "--max-time", "120", "-o", out, lab.url(server, OBJ)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if not wait_for(lambda: file_size(out) >= size * fraction, 60, 0.001):
            raise RuntimeError("the download stalled before the crash")
        killed = lab.kill_replica(server)
        err = curl.communicate(timeout=120)[1]
    finally:
        watch.stop.set()
        watch.join()
    if curl.returncode != 0 or file_sha256(out) != digest:
        raise RuntimeError(f"the download did not survive: curl {curl.returncode} {err.strip()}")
    t = watch.resumed_after(killed)
    if t is None:
        raise RuntimeError("no byte after the crash")
    return (t - killed) * 1000


def trial_curl_retry(lab, server: str, other: str, fraction: float = 0.5) -> float:
    """What a user does without the appliances: notice the stall (curl's minimum, 1 s of
    no progress), then resume from another replica with -C -."""
    size, digest = lab.objects[OBJ]
    out = os.path.join(tempfile.mkdtemp(), "o")
    watch = Watch(out)
    watch.start()
    script = (f"curl -sS --speed-limit 1 --speed-time 1 -o {out} {lab.url(server, OBJ)} "
              f"|| curl -sS -C - -o {out} {lab.url(other, OBJ)}")
    sh = lab.popen("c1", ["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        if not wait_for(lambda: file_size(out) >= size * fraction, 60, 0.001):
            raise RuntimeError("the download stalled before the crash")
        killed = lab.kill_replica(server)
        sh.communicate(timeout=120)
    finally:
        watch.stop.set()
        watch.join()
    if file_sha256(out) != digest:
        raise RuntimeError("the resumed download differs")
    t = watch.resumed_after(killed)
    return (t - killed) * 1000


def pct(xs, p) -> float:
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run under a minute")
    ap.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    ap.add_argument("--crashes", type=int, default=None, help="crash trials with the appliances")
    ap.add_argument("--server", choices=("builtin", "nginx"), default="builtin")
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--lab-name", default=f"fo{os.getpid() % 100000}")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("failover: needs root (network namespaces)", file=sys.stderr)
        return 2
    n = args.crashes or (3 if args.quick else 20)
    n_curl = 2 if args.quick else 5
    started = time.monotonic()
    times, curl_times, errors = [], [], []
    with Lab(args.lab_name, server=args.server, client_path="appliance", appliances=True, object_sizes=("20m",),
             links={r: {"rate": args.rate} for r in "abc"}) as lab:
        if not wait_for(lambda: group_alive(lab), 20, 0.1):
            print("failover: the support group did not form", file=sys.stderr)
            return 1
        for i in range(n):
            server = "abc"[i % 3]
            try:
                ms = trial_migrate(lab, server)
                times.append(ms)
                print(f"  crash {i + 1}/{n} of {server}: first resumed byte {ms:.1f} ms after the kill", flush=True)
            except RuntimeError as exc:
                errors.append(str(exc))
                print(f"  crash {i + 1}/{n} of {server}: FAILED: {exc}", flush=True)
            lab.revive_replica(server)
            wait_for(lambda: group_alive(lab), 20, 0.1)
        lab.set_client_path("bridge")  # the user's alternative: no client appliance
        for i in range(n_curl):
            server, other = "abc"[i % 3], "abc"[(i + 1) % 3]
            ms = trial_curl_retry(lab, server, other)
            curl_times.append(ms)
            print(f"  curl --speed-time 1 then -C - from {other}: first resumed byte {ms:.0f} ms after the kill",
                  flush=True)
            lab.revive_replica(server, appliance=False)
    results = {"crashes": n, "failures": len(errors), "server": args.server, "rate": args.rate,
               "seconds": time.monotonic() - started}
    if times:
        results.update(failover_p50_ms=statistics.median(times), failover_p99_ms=pct(times, 99),
                       failover_min_ms=min(times), failover_max_ms=max(times))
    if curl_times:
        results["curl_resume_p50_ms"] = statistics.median(curl_times)
        if times:
            results["ratio_curl_vs_failover_p50"] = results["curl_resume_p50_ms"] / results["failover_p50_ms"]
    print(f"\nfailover over {len(times)} crashes ({len(errors)} failed), {args.server} server, {args.rate} links")
    print(f"{'':<34}{'p50':>10}{'p99':>10}{'min':>10}{'max':>10}")
    if times:
        print(f"{'migration (first resumed byte)':<34}{results['failover_p50_ms']:>8.1f}ms"
              f"{results['failover_p99_ms']:>8.1f}ms{min(times):>8.1f}ms{max(times):>8.1f}ms")
    if curl_times:
        print(f"{'curl -C - from another replica':<34}{results['curl_resume_p50_ms']:>8.0f}ms"
              f"{pct(curl_times, 99):>8.0f}ms{min(curl_times):>8.0f}ms{max(curl_times):>8.0f}ms")
    print("\ntargets (benchmark, not test):")
    for key, op, target in TARGETS:
        val = results.get(key)
        ok = val is not None and (val <= target if op == "<=" else val >= target)
        print(f"  {key:<22}{val if val is None else f'{val:.1f}':>10}  {op} {target}  {'met' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, sort_keys=True)
        print(f"figures written to {args.json}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
