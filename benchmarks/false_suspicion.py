#!/usr/bin/env python3
"""False suspicions and needless migrations under CPU load; detection of a real crash under load.

A support group of three replicas (a, b, c) serves long downloads: a few curls in each
client node, rate-limited (--limit-rate) over shaped replica links so that each lasts about a
minute, restarted as they finish, spread over the replicas. For each CPU load (none; one core
saturated; both saturated: busy-loop processes ``python -c 'while 1: pass'`` run inside the
replicas' namespaces), the group runs N minutes (--quick: 1; default 5) and the server
appliances' event logs are read: "false_suspicion" (a peer declared dead was heard again),
"peer_dead" (a death acted upon), "takeover" (an action: the engine starts taking a
connection over) and the engine's "outcome". Nobody is killed during these phases, so every
takeover there is a needless migration. Two more loads stand for what busy loops alone seldom
cause on an idle machine (a process whose event loop is blocked: a takeover burst, a garbage
collection, a write to a slow disk, a VM that is not scheduled): "stall_one" stops one server
appliance at a time (SIGSTOP, then SIGCONT) for 30-60 ms, short enough that its peers must
not declare it dead (its silence stays below dead_after), every 1-3 s; "stall_all" stops all
three at once for 100-300 ms every 2-5 s, as a host that is not scheduled would; they are
reported beside the CPU loads (keys stall_one_*, stall_all_*), not in the *_loaded figures.
Then, under the heaviest CPU load, real crashes: a
replica serving downloads is killed (lab.kill_replica: links down, then SIGKILL) and timed
from the kill to the first "peer_dead" about it at a survivor; it is revived before the next
crash (takeovers of any other peer during a crash trial are needless too). Needs root.

JSON keys (one flat object): false_suspicions_per_hour_idle, false_suspicions_per_hour_loaded,
needless_migrations_per_hour_loaded, detection_p50_ms_loaded, and per-load details.

The lab's state dir (status files, event logs) goes on a tmpfs: the server appliance writes
its status file (write, then rename over the old one) on its event loop every second, and
on a disk-backed /run a busy disk makes that rename block the loop for 50-600 ms (seen here:
the main thread in D state in rename/openat), which stalls every member's heartbeats at once:
a disk problem, not the CPU load this benchmark is about. --lab-root chooses another place
(e.g. --lab-root /run/appliance/labs to measure with the stalls).
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
DEFAULT_LAB_ROOT = "/dev/shm/appliance-labs"


def _lab_root_from_argv(argv) -> str:
    """--lab-root must be known before appliance.lab reads APPLIANCE_LAB_ROOT at import."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, a in enumerate(argv):
        if a == "--lab-root" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--lab-root="):
            return a.split("=", 1)[1]
    return os.environ.get("APPLIANCE_LAB_ROOT") or DEFAULT_LAB_ROOT


if __name__ == "__main__":
    os.environ["APPLIANCE_LAB_ROOT"] = _lab_root_from_argv(None)

from appliance.lab import LAB_ROOT, Lab, wait_for  # noqa: E402
from appliance.statusfile import read_events, read_status  # noqa: E402

OBJ = "/obj-20m"
REPLICAS = ("a", "b", "c")
# busy loops per load level: the replicas whose namespaces get one
LOADS = (("idle", ()), ("one_core", ("a",)), ("both_cores", ("a", "b")))
# stalls: (name, stop all at once?, stall seconds (min, max), pause between stalls (min, max))
STALLS = (("stall_one", False, (0.03, 0.06), (1.0, 3.0)), ("stall_all", True, (0.1, 0.3), (2.0, 5.0)))
CPU_LOADS = tuple(n for n, _ in LOADS)
TARGETS = (("needless_migrations_per_hour_loaded", "<=", 1.0), ("detection_p50_ms_loaded", "<=", 150.0))
BUSY = "while 1: pass"


def group_alive(lab) -> bool:
    """Every replica's server appliance sees every other one alive."""
    for r in REPLICAS:
        peers = ((read_status(lab.lab_dir, "server", r) or {}).get("group") or {}).get("peers", {})
        if sorted(p for p, info in peers.items() if info.get("state") == "alive") != sorted(set(REPLICAS) - {r}):
            return False
    return True


def events_between(lab, t0: float, t1: float) -> dict:
    """replica -> its server appliance's events with t0 <= t < t1."""
    return {r: [e for e in read_events(lab.lab_dir, "server", r) if t0 <= e.get("t", 0) < t1] for r in REPLICAS}


def group_counters(lab) -> dict:
    """replica -> the group counters of its latest status snapshot (what exists of them)."""
    out = {}
    for r in REPLICAS:
        g = ((read_status(lab.lab_dir, "server", r) or {}).get("group") or {})
        c = dict(g.get("group") or {})
        c["_multiplier"] = (g.get("health") or {}).get("multiplier")
        c["_local_entries"] = g.get("local_entries") or 0
        out[r] = c
    return out


def diff(after: dict, before: dict, key: str) -> int:
    return sum(int(after[r].get(key) or 0) - int(before.get(r, {}).get(key) or 0) for r in REPLICAS)


class Downloads:
    """Per client, `per_client` shell loops of rate-limited curls (restarted as they finish)."""

    def __init__(self, lab, per_client: int, limit: str) -> None:
        self.lab, self.procs = lab, []
        k = 0
        for c in range(1, lab.clients + 1):
            for j in range(per_client):
                rep = REPLICAS[k % len(REPLICAS)]
                k += 1
                script = (f"for i in $(seq 1 10000); do curl -s -o /dev/null --max-time 900 --limit-rate {limit} "
                          f"{lab.url(rep, OBJ)}; sleep 0.2; done")
                self.procs.append(lab.popen(f"c{c}", ["sh", "-c", script], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


class Load:
    """Busy loops in replicas' namespaces."""

    def __init__(self, lab) -> None:
        self.lab, self.procs = lab, {}

    def set(self, replicas) -> None:
        self.stop()
        for r in replicas:
            self.procs[r] = self.lab.popen(r, [sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)

    def restart(self, replica) -> None:
        if replica in self.procs:
            self.procs[replica] = self.lab.popen(replica, [sys.executable, "-c", BUSY], stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = {}


class Staller:
    """A thread that stops server appliances (SIGSTOP) for a while, then resumes them."""

    def __init__(self, lab, together: bool, stall, pause, seed: int = 1) -> None:
        import random
        import threading
        self.lab, self.together, self.stall, self.pause = lab, together, stall, pause
        self.rng = random.Random(seed)
        self.stop_evt = threading.Event()
        self.stalls = []  # (time, victims, seconds)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import signal
        for _ in range(100000):  # bounded; stops when told
            if self.stop_evt.wait(self.rng.uniform(*self.pause)):
                return
            victims = list(REPLICAS) if self.together else [self.rng.choice(REPLICAS)]
            pids = [self.lab.procs.get(f"server-{r}", {}).get("pid") for r in victims]
            pids = [p for p in pids if p]
            d = self.rng.uniform(*self.stall)
            try:
                for p in pids:
                    os.kill(p, signal.SIGSTOP)
                self.stalls.append((time.time(), victims, d))
                time.sleep(d)
            except ProcessLookupError:
                pass
            finally:
                for p in pids:
                    try:
                        os.kill(p, signal.SIGCONT)
                    except ProcessLookupError:
                        pass

    def stop(self) -> None:
        self.stop_evt.set()
        self.thread.join(timeout=5)


def count(evs: dict, kind: str, pred=lambda e: True) -> int:
    return sum(1 for r in REPLICAS for e in evs[r] if e.get("event") == kind and pred(e))


def phase(lab, name: str, seconds: float) -> dict:
    before = group_counters(lab)
    t0 = time.time()
    deadline = time.monotonic() + seconds
    active = []
    for _ in range(int(seconds) + 2):  # sample the advertised connections every second
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(1.0, left))
        active.append(sum(c["_local_entries"] for c in group_counters(lab).values()))
    t1 = time.time()
    time.sleep(1.5)  # the status files and event logs catch up (status every 1 s)
    evs = events_between(lab, t0, t1)
    after = group_counters(lab)
    hours = (t1 - t0) / 3600
    res = {
        "seconds": round(t1 - t0, 1),
        "false_suspicions": count(evs, "false_suspicion"),
        "peer_dead": count(evs, "peer_dead"),
        "peer_silent": count(evs, "peer_silent"),
        "takeovers": count(evs, "takeover"),
        "resumed": count(evs, "outcome", lambda e: e.get("outcome") == "resumed"),
        "refuted": count(evs, "refuted"),
        "held_back": sum(int(e.get("connections") or 0) for r in REPLICAS for e in evs[r]
                         if e.get("event") == "held_back"),
        "lag_episodes": count(evs, "lagging"),
        "lag_ticks": diff(after, before, "lag_ticks"),
        "late_ticks": diff(after, before, "late_ticks"),
        "probes_sent": diff(after, before, "probes_sent"),
        "max_lag_ms": max((float(after[r].get("max_lag_ms") or 0) for r in REPLICAS), default=0.0),
        "max_multiplier": max((float(after[r].get("_multiplier") or 1) for r in REPLICAS), default=1.0),
        "connections_mean": round(statistics.mean(active), 1) if active else 0,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    pairs = {}
    for r in REPLICAS:
        for e in evs[r]:
            if e.get("event") == "false_suspicion":
                pairs[f"{r}->{e.get('node')}"] = pairs.get(f"{r}->{e.get('node')}", 0) + 1
    res["false_suspicion_pairs"] = pairs
    res["false_suspicions_per_hour"] = res["false_suspicions"] / hours
    res["needless_migrations_per_hour"] = res["takeovers"] / hours
    return res


def crash(lab, load, victim: str) -> dict:
    """Kill `victim`; time to the first peer_dead about it at a survivor; revive it."""
    killed = lab.kill_replica(victim)
    survivors = [r for r in REPLICAS if r != victim]

    def first_dead():
        ts = [e["t"] for r in survivors for e in read_events(lab.lab_dir, "server", r)
              if e.get("event") == "peer_dead" and e.get("node") == victim and e.get("t", 0) >= killed]
        return min(ts) if ts else None

    t = wait_for(first_dead, 10, 0.02)
    time.sleep(3.0)  # the takeovers run
    t_end = time.time()
    evs = events_between(lab, killed, t_end)
    takeovers = [e for r in survivors for e in evs[r] if e.get("event") == "takeover"]
    res = {"victim": victim, "detection_ms": None if t is None else (t - killed) * 1000,
           "takeovers": sum(1 for e in takeovers if e.get("dead") == victim),
           "needless": sum(1 for e in takeovers if e.get("dead") != victim),
           "false_suspicions": sum(1 for r in survivors for e in evs[r] if e.get("event") == "false_suspicion"
                                   and e.get("node") != victim),
           "seconds": t_end - killed}
    lab.revive_replica(victim)
    load.restart(victim)
    wait_for(lambda: group_alive(lab), 30, 0.2)
    time.sleep(2.0)  # let the revived replica's restart settle before the next trial
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 minute per load, 2 crashes")
    ap.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    ap.add_argument("--minutes", type=float, default=None, help="minutes per load (default 5, --quick 1)")
    ap.add_argument("--crashes", type=int, default=None, help="crashes under the heaviest load (default 5, --quick 2)")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--per-client", type=int, default=3, help="download loops per client")
    ap.add_argument("--limit-rate", default="300k", help="curl --limit-rate per download (bytes/s)")
    ap.add_argument("--rate", default="40mbit", help="each replica link's rate")
    ap.add_argument("--loads", default="idle,one_core,both_cores,stall_one,stall_all",
                    help="which loads to run, in order (the crashes run under the last CPU load)")
    ap.add_argument("--lab-name", default=f"fs{os.getpid() % 100000}")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the appliances' event logs here before the lab goes")
    ap.add_argument("--lab-root", default=_lab_root_from_argv(argv),
                    help=f"where the lab's state dir goes (default {DEFAULT_LAB_ROOT}, a tmpfs; see above)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("false_suspicion: needs root (network namespaces)", file=sys.stderr)
        return 2
    if str(LAB_ROOT) != args.lab_root:
        print(f"false_suspicion: run it as a script (the lab root is {LAB_ROOT}, not {args.lab_root})",
              file=sys.stderr)
        return 2
    print(f"  lab state in {LAB_ROOT}", flush=True)
    minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 5.0)
    n_crashes = args.crashes if args.crashes is not None else (2 if args.quick else 5)
    wanted = [x for x in args.loads.split(",") if x]
    loads = [(n, reps) for n, reps in LOADS if n in wanted]
    stalls = [st for st in STALLS if st[0] in wanted]
    started = time.monotonic()
    phases, crashes = {}, []
    with Lab(args.lab_name, clients=args.clients, client_path="appliance", appliances=True, object_sizes=("20m",),
             links={r: {"rate": args.rate} for r in REPLICAS}) as lab:
        if not wait_for(lambda: group_alive(lab), 30, 0.1):
            print("false_suspicion: the support group did not form", file=sys.stderr)
            return 1
        load = Load(lab)
        dls = Downloads(lab, args.per_client, args.limit_rate)
        try:
            time.sleep(5.0)  # downloads under way and advertised
            for name, reps in loads:
                load.set(reps)
                time.sleep(2.0)
                print(f"  load {name}: {len(reps)} busy loop(s) in {','.join(reps) or '-'}, {minutes:g} min ...",
                      flush=True)
                phases[name] = phase(lab, name, minutes * 60)
                p = phases[name]
                print(f"    false suspicions {p['false_suspicions']} {p['false_suspicion_pairs']}, "
                      f"peer_dead {p['peer_dead']}, takeovers {p['takeovers']}, refuted {p['refuted']}, "
                      f"lag ticks {p['lag_ticks']}, max lag {p['max_lag_ms']:.0f} ms, "
                      f"connections ~{p['connections_mean']}", flush=True)
            load.stop()
            for name, together, stall, pause in stalls:
                print(f"  load {name}: {'all appliances' if together else 'one appliance'} stopped "
                      f"{stall[0] * 1000:.0f}-{stall[1] * 1000:.0f} ms every {pause[0]:g}-{pause[1]:g} s, "
                      f"{minutes:g} min ...", flush=True)
                staller = Staller(lab, together, stall, pause)
                try:
                    phases[name] = phase(lab, name, minutes * 60)
                finally:
                    staller.stop()
                p = phases[name]
                p["stalls"] = len(staller.stalls)
                print(f"    {p['stalls']} stalls; false suspicions {p['false_suspicions']} "
                      f"{p['false_suspicion_pairs']}, peer_dead {p['peer_dead']}, takeovers {p['takeovers']}, "
                      f"refuted {p['refuted']}, lag ticks {p['lag_ticks']}", flush=True)
                time.sleep(2.0)
            heavy = loads[-1][1] if loads else ()
            load.set(heavy)
            time.sleep(2.0)
            for i in range(n_crashes):
                victim = REPLICAS[i % len(REPLICAS)]
                res = crash(lab, load, victim)
                crashes.append(res)
                d = res["detection_ms"]
                print(f"  crash {i + 1}/{n_crashes} of {victim} under load: first peer_dead "
                      f"{'never' if d is None else f'{d:.0f} ms'} after the kill, {res['takeovers']} takeovers, "
                      f"{res['needless']} needless", flush=True)
        finally:
            load.stop()
            dls.stop()
            if args.keep_logs:
                import shutil
                os.makedirs(args.keep_logs, exist_ok=True)
                for f in os.listdir(lab.lab_dir):
                    if f.endswith(".jsonl") or f.endswith(".status.json"):
                        shutil.copy(os.path.join(lab.lab_dir, f), args.keep_logs)
    results = {"minutes_per_load": minutes, "crashes": len(crashes), "seconds": round(time.monotonic() - started, 1),
               "clients": args.clients, "downloads": args.clients * args.per_client, "limit_rate": args.limit_rate,
               "lab_root": str(LAB_ROOT)}
    for name, p in phases.items():
        for k, v in p.items():
            if k != "false_suspicion_pairs":
                results[f"{name}_{k}"] = v
    idle = phases.get("idle")
    loaded = [phases[n] for n in phases if n != "idle" and n in CPU_LOADS]
    if idle:
        results["false_suspicions_per_hour_idle"] = idle["false_suspicions_per_hour"]
        results["needless_migrations_per_hour_idle"] = idle["needless_migrations_per_hour"]
    det = [c["detection_ms"] for c in crashes if c["detection_ms"] is not None]
    crash_hours = sum(c["seconds"] for c in crashes) / 3600
    if loaded:
        hours = sum(p["seconds"] for p in loaded) / 3600
        results["false_suspicions_per_hour_loaded"] = sum(p["false_suspicions"] for p in loaded) / hours
        results["needless_migrations_per_hour_loaded"] = (
            (sum(p["takeovers"] for p in loaded) + sum(c["needless"] for c in crashes)) / (hours + crash_hours))
    if det:
        results["detection_p50_ms_loaded"] = statistics.median(det)
        results["detection_max_ms_loaded"] = max(det)
        results["detection_min_ms_loaded"] = min(det)
    results["crash_takeovers"] = sum(c["takeovers"] for c in crashes)
    results["crash_needless"] = sum(c["needless"] for c in crashes)
    results["crash_undetected"] = sum(1 for c in crashes if c["detection_ms"] is None)

    print(f"\nfalse suspicions under load: a group of {len(REPLICAS)}, {results['downloads']} downloads, "
          f"{minutes:g} min per load")
    print(f"{'load':<12}{'false susp':>11}{'/hour':>9}{'peer_dead':>10}{'takeovers':>10}{'refuted':>8}"
          f"{'lag ticks':>10}{'max lag':>9}{'conns':>7}{'loadavg':>8}")
    for name, p in phases.items():
        print(f"{name:<12}{p['false_suspicions']:>11}{p['false_suspicions_per_hour']:>9.0f}{p['peer_dead']:>10}"
              f"{p['takeovers']:>10}{p['refuted']:>8}{p['lag_ticks']:>10}{p['max_lag_ms']:>7.0f}ms"
              f"{p['connections_mean']:>7}{p['loadavg_1m']:>8}")
    if crashes:
        print(f"crashes under {loads[-1][0] if loads else 'no'} load: {len(crashes)}, detection "
              + (f"p50 {statistics.median(det):.0f} ms, min {min(det):.0f}, max {max(det):.0f}" if det else "none")
              + f"; takeovers {results['crash_takeovers']}, needless {results['crash_needless']}")
    print("\ntargets (benchmark, not test):")
    for key, op, target in TARGETS:
        val = results.get(key)
        ok = val is not None and (val <= target if op == "<=" else val >= target)
        print(f"  {key:<38}{'-' if val is None else f'{val:.1f}':>10}  {op} {target:g}  {'met' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, sort_keys=True)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
