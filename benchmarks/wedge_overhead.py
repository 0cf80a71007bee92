#!/usr/bin/env python3
"""The paper's "Wedge Overhead" figure: microseconds per request against request size.

In one lab and one run: direct (no appliance: a kernel bridge in the client appliance's
node, no tap), the server tap only, the client appliance only, and both; each request on
a new connection, many requests per size, two rounds in opposite mode order so that drift
does not favour a mode. Also the inline bridge's bulk TCP throughput (a download, offloads
on) and the round-trip time it adds, against the direct path. Needs root (namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from appliance import docroot  # noqa: E402
from appliance.lab import Lab  # noqa: E402

NETCLIENT = os.path.join(HERE, "_netclient.py")
SIZES = ("1k", "4k", "16k", "64k", "256k", "1m", "4m", "10m")
MODES = (  # name, client path, server tap running; in this order each step changes one thing
    ("direct", "bridge", False),
    ("tap", "bridge", True),
    ("both", "appliance", True),
    ("client", "appliance", False),
)
TARGETS = (("max_ratio_tap", "<=", 1.05), ("bridge_throughput_ratio", ">=", 0.8), ("bridge_added_rtt_us", "<=", 60))


def configure(lab: Lab, client_path: str, tap: bool) -> None:
    lab.set_client_path(client_path)
    if client_path == "appliance" and not _running(lab, "client-ca"):
        lab.start_client_appliance()
    if tap and not _running(lab, "server-a"):
        lab.start_server_appliance("a")
    elif not tap:
        lab.stop_server_appliance("a")
    time.sleep(0.3)


def _running(lab: Lab, label: str) -> bool:
    return bool(lab.status()["processes"].get(label, {}).get("alive"))


def netclient(lab: Lab, *args, timeout=300):
    r = lab.run("c1", [sys.executable, NETCLIENT, *map(str, args)], timeout=timeout)
    return json.loads(r.stdout)


def requests_for(size: int, scale: float) -> int:
    return max(5, min(200, int(scale * 2e7 / size)))


def measure_requests(lab: Lab, sizes, scale: float, rounds: int) -> dict:
    """Many short rounds over all modes, snake order (D T B C, C B T D, ...): the machine's
    drift (a 2-core VM varies by tens of percent over seconds) falls on every mode alike."""
    samples = {m[0]: {s: [] for s in sizes} for m in MODES}
    for rnd in range(rounds):
        order = MODES if rnd % 2 == 0 else tuple(reversed(MODES))
        for name, path, tap in order:
            configure(lab, path, tap)
            netclient(lab, "http", lab.ip("a"), 80, "/obj-1k", 10)  # warm up the path
            for s in sizes:
                n = requests_for(docroot.parse_size(s), scale)
                samples[name][s] += netclient(lab, "http", lab.ip("a"), 80, f"/obj-{s}", n)
        print(f"  round {rnd + 1}/{rounds} done", flush=True)
    return samples


def iperf_download(lab: Lab, seconds: float) -> float:
    r = lab.run("c1", ["iperf3", "-c", lab.ip("a"), "-p", "5201", "-R", "-t", str(seconds), "-J"],
                timeout=seconds + 30)
    return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]


def measure_bridge(lab: Lab, seconds: float, trials: int, rtt_n: int) -> dict:
    lab.stop_server_appliance("a")
    servers = [lab.popen("a", ["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
               lab.popen("a", [sys.executable, NETCLIENT, "echo-server", lab.ip("a"), "7000"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)]
    servers[1].stdout.readline()  # "listening"
    time.sleep(0.3)
    tput = {"bridge": [], "appliance": []}
    rtts = {"bridge": [], "appliance": []}
    try:
        for t in range(trials):
            for path in (("bridge", "appliance") if t % 2 == 0 else ("appliance", "bridge")):
                configure(lab, path, False)
                tput[path].append(iperf_download(lab, seconds))
                rtts[path] += netclient(lab, "rtt", lab.ip("a"), 7000, rtt_n)
    finally:
        for p in servers:
            p.terminate()
            p.wait(5)
    direct_bps, app_bps = statistics.median(tput["bridge"]), statistics.median(tput["appliance"])
    direct_rtt, app_rtt = statistics.median(rtts["bridge"]), statistics.median(rtts["appliance"])
    return {"direct_gbps": direct_bps / 1e9, "bridge_gbps": app_bps / 1e9,
            "bridge_throughput_ratio": app_bps / direct_bps, "direct_rtt_us": direct_rtt,
            "bridge_rtt_us": app_rtt, "bridge_added_rtt_us": app_rtt - direct_rtt,
            "throughput_trials_gbps": {k: [round(x / 1e9, 2) for x in v] for k, v in tput.items()}}


def summarize(samples: dict, sizes) -> dict:
    out = {}
    for name in samples:
        for s in sizes:
            xs = sorted(samples[name][s])
            q = statistics.quantiles(xs, n=4) if len(xs) >= 4 else [xs[0], statistics.median(xs), xs[-1]]
            out[(name, s)] = {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "n": len(xs)}
    return out


def plot(summary: dict, sizes, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [docroot.parse_size(s) for s in sizes]
    styles = {"direct": ("k", "o", "direct"), "tap": ("tab:blue", "s", "server tap (wedge)"),
              "client": ("tab:orange", "^", "client appliance"), "both": ("tab:red", "D", "both")}
    for name, (color, marker, label) in styles.items():
        med = [summary[(name, s)]["median"] for s in sizes]
        lo = [m - summary[(name, s)]["p25"] for m, s in zip(med, sizes)]
        hi = [summary[(name, s)]["p75"] - m for m, s in zip(med, sizes)]
        ax.errorbar(xs, med, yerr=[lo, hi], color=color, marker=marker, label=label, capsize=3, lw=1.2, ms=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("request size (bytes)")
    ax.set_ylabel("time per request (µs), median and IQR")
    ax.set_title("Wedge overhead: new connection per request")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run under a minute")
    ap.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    ap.add_argument("--png", metavar="PATH", default="results/wedge_overhead.png", help="where the figure goes")
    ap.add_argument("--server", choices=("builtin", "nginx"), default="builtin")
    ap.add_argument("--lab-name", default=f"wo{os.getpid() % 100000}")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("wedge_overhead: needs root (network namespaces)", file=sys.stderr)
        return 2
    scale, rounds = (0.06, 4) if args.quick else (0.25, 12)
    seconds, trials, rtt_n = (2, 2, 300) if args.quick else (5, 3, 2000)
    started = time.monotonic()
    with Lab(args.lab_name, replicas=("a",), server=args.server, client_path="bridge", appliances=False,
             object_sizes=SIZES) as lab:
        print(f"lab {args.lab_name} up; measuring requests ({rounds} round(s))", flush=True)
        samples = measure_requests(lab, SIZES, scale, rounds)
        print("measuring the bridge's throughput and added RTT", flush=True)
        bridge = measure_bridge(lab, seconds, trials, rtt_n)
    summary = summarize(samples, SIZES)
    results = {}
    print(f"\nµs per request, median [p25-p75] (n), ratio to direct; server={args.server}")
    print(f"{'size':>6}" + "".join(f"{m[0]:>26}" for m in MODES))
    for s in SIZES:
        d = summary[("direct", s)]["median"]
        row = f"{s:>6}"
        for name, _, _ in MODES:
            v = summary[(name, s)]
            ratio = v["median"] / d
            row += f"{v['median']:>9.0f} [{v['p25']:.0f}-{v['p75']:.0f}] x{ratio:.2f}".rjust(26)
            results[f"median_us_{name}_{s}"] = v["median"]
        print(row)
    for name, _, _ in MODES[1:]:
        ratios = {s: summary[(name, s)]["median"] / summary[("direct", s)]["median"] for s in SIZES}
        worst = max(ratios, key=ratios.get)
        results[f"max_ratio_{name}"] = ratios[worst]
        results[f"max_ratio_{name}_size"] = worst
    results.update({k: v for k, v in bridge.items() if not isinstance(v, dict)})
    results["server"] = args.server
    results["seconds"] = time.monotonic() - started
    print(f"\nbridge: download {bridge['bridge_gbps']:.2f} Gbit/s vs direct {bridge['direct_gbps']:.2f} "
          f"(trials {bridge['throughput_trials_gbps']}); RTT {bridge['bridge_rtt_us']:.0f} µs vs "
          f"{bridge['direct_rtt_us']:.0f} µs")
    print("\ntargets (benchmark, not test):")
    for key, op, target in TARGETS:
        val = results[key]
        ok = val <= target if op == "<=" else val >= target
        print(f"  {key:<26}{val:>10.3f}  {op} {target}  {'met' if ok else 'MISSED'}")
    os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    plot(summary, SIZES, args.png)
    print(f"\nfigure: {args.png}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, sort_keys=True)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
