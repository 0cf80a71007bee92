#!/usr/bin/env python3
"""The paper's "Varying Oscillation Rates": goodput of a transfer whose connection moves
between two replicas every N seconds, against the same transfer without migrations.

128 kbit/s links, 60 s transfers (20 s with --quick), no oscillation and migrations every
2, 5, 10 and 12 s. The five runs go at the same time, each with its own client (c1..c5)
and its own pair of replicas (a/b, c/d, ...), so that they share no shaped link; every
migration is a planned one (appliance ctl migrate: the target replica takes the connection
over from its partner while the partner lives). Goodput is the bytes the client received,
sampled every 0.25 s; the figure plots bytes against time like the paper's. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from appliance.control import ControlError, call  # noqa: E402
from appliance.lab import Lab, file_size, wait_for  # noqa: E402
from appliance.statusfile import read_status  # noqa: E402

PERIODS = (None, 2, 5, 10, 12)  # None: no oscillation
REPLICAS = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")
TARGETS = (("goodput_ratio_5s", ">=", 0.95), ("goodput_ratio_2s", ">=", 0.85))






def label(period) -> str:
    return "none" if period is None else f"{period}s"


def client_port(lab, client_ip: str):
    st = read_status(lab.lab_dir, "client", "ca") or {}
    for c in st.get("connections", []):
        if c["client"][0] == client_ip and c["state"] != "closed":
            return c["client"][1]
    return None


def oscillate(lab, conn: str, pair: tuple, period: float, t_end: float, log: list) -> None:
    k = 0
    next_at = time.monotonic() + period
    while True:
        delay = next_at - time.monotonic()
        if time.monotonic() + max(0.0, delay) >= t_end:
            return
        time.sleep(max(0.0, delay))
        target = pair[(k + 1) % 2]
        try:
            call(lab.lab_dir / f"server-{target}.sock", {"cmd": "migrate", "conn": conn}, timeout=10)
            log.append((time.monotonic(), target, "ok"))
        except ControlError as exc:
            log.append((time.monotonic(), target, str(exc)))
        k += 1
        next_at += period


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run under a minute (20 s transfers)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    ap.add_argument("--png", metavar="PATH", default="results/oscillation.png")
    ap.add_argument("--duration", type=float, default=None, help="seconds of transfer (default 60, quick 20)")
    ap.add_argument("--rate", default="128kbit")
    ap.add_argument("--buffer-ms", type=float, default=None,
                    help="the links' queue in ms at the rate (tbf latency; default the lab's 400 ms)")
    ap.add_argument("--lab-name", default=f"os{os.getpid() % 100000}")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("oscillation: needs root (network namespaces)", file=sys.stderr)
        return 2
    duration = args.duration or (20.0 if args.quick else 60.0)
    runs = len(PERIODS)
    replicas = REPLICAS[:2 * runs]
    started = time.monotonic()
    curves = {}
    migrations = {}
    with Lab(args.lab_name, clients=runs, replicas=replicas, client_path="appliance", appliances=True,
             object_sizes=("4m",), links={r: {"rate": args.rate, **({"buffer_ms": args.buffer_ms}
                                                                    if args.buffer_ms else {})}
                                         for r in replicas}) as lab:
        ok = wait_for(lambda: all(len(((read_status(lab.lab_dir, "server", r) or {}).get("group") or {})
                                      .get("peers", {})) == len(replicas) - 1 for r in replicas), 30)
        if not ok:
            print("oscillation: the support group did not form", file=sys.stderr)
            return 1
        tmp = tempfile.mkdtemp()
        outs, curls = {}, {}
        for i, period in enumerate(PERIODS):
            client, server = f"c{i + 1}", replicas[2 * i]
            outs[period] = os.path.join(tmp, label(period))
            curls[period] = lab.popen(client, ["curl", "-sS", "--max-time", str(duration + 60), "-o", outs[period],
                                               lab.url(server, "/obj-4m")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        t_end = t0 + duration
        conns = {}
        wait_for(lambda: all(client_port(lab, lab.ip(f"c{i + 1}")) for i in range(runs)), 10, 0.05)
        threads = []
        for i, period in enumerate(PERIODS):
            migrations[period] = []
            if period is None:
                continue
            cip = lab.ip(f"c{i + 1}")
            conns[period] = f"{cip}:{client_port(lab, cip)}"
            pair = (replicas[2 * i], replicas[2 * i + 1])
            t = threading.Thread(target=oscillate, args=(lab, conns[period], pair, period, t_end, migrations[period]),
                                 daemon=True)
            t.start()
            threads.append(t)
        for period in PERIODS:
            curves[period] = []
        while time.monotonic() < t_end:
            now = time.monotonic() - t0
            for period in PERIODS:
                curves[period].append((now, file_size(outs[period])))
            time.sleep(0.25)
        for period in PERIODS:
            curves[period].append((duration, file_size(outs[period])))
        for t in threads:
            t.join(15)
        for c in curls.values():
            c.kill()
            c.wait()
        shim = (read_status(lab.lab_dir, "client", "ca") or {}).get("shim", {})
    base = curves[None][-1][1]
    results = {"duration_s": duration, "rate": args.rate, "buffer_ms": args.buffer_ms or 400,
               "seconds": time.monotonic() - started,
               "migrations_accepted": shim.get("migrations"), "goodput_none_Bps": base / duration}
    print(f"\ngoodput over {duration:.0f} s on {args.rate} links with a {args.buffer_ms or 400:.0f} ms queue "
          f"(bytes received; ratio to no oscillation)")
    print(f"{'migrate every':>14}{'bytes':>12}{'B/s':>10}{'ratio':>8}{'migrations':>12}")
    for period in PERIODS:
        got = curves[period][-1][1]
        ratio = got / base if base else 0.0
        ok = sum(1 for _, _, r in migrations[period] if r == "ok")
        print(f"{label(period):>14}{got:>12,}{got / duration:>10,.0f}{ratio:>8.3f}{ok:>12}")
        if period is not None:
            results[f"goodput_ratio_{period}s"] = ratio
            results[f"migrations_{period}s"] = ok
    print("\ntargets (benchmark, not test):")
    for key, op, target in TARGETS:
        val = results.get(key)
        ok = val is not None and val >= target
        print(f"  {key:<22}{val if val is None else f'{val:.3f}':>10}  {op} {target}  {'met' if ok else 'MISSED'}")
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(curves, args.png, args.rate, duration)
    print(f"\nfigure: {args.png}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, sort_keys=True)
        print(f"figures written to {args.json}")
    return 0


def plot(curves: dict, path: str, rate: str, duration: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for period, pts in curves.items():
        xs, ys = zip(*pts)
        ax.plot(xs, [y / 1000 for y in ys], label="no oscillation" if period is None else f"every {period} s",
                lw=1.6 if period is None else 1.1)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("bytes received (KB)")
    ax.set_title(f"Varying oscillation rates: goodput on {rate} links")
    ax.set_xlim(0, duration)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
