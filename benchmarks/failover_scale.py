#!/usr/bin/env python3
"""Failover at scale: N concurrent downloads from one replica, the replica killed, all resumed?

For each N (10, 100, 1000, 5000; --quick 10, 100, 1000): one appliance.manyget in c1 opens N
connections to replica a (nginx by default, ``--server builtin`` for comparison), each GET
of one object whose body manyget hashes with sha256 as it arrives. Once every connection has
its response head (or has failed), the support group has had ``--settle`` s to advertise
them and the aggregate has reached ``--kill-at`` (30 %) of all the bytes, manyget is told the
kill happens now (SIGUSR1) and a is crashed (lab.kill_replica: links down, then SIGKILL); b
and c take the connections over. One lab for all N (brought up once; a revived and the group
re-formed between runs).

Choices:

* Objects and links: every replica link ``--rate`` (300mbit, so the client appliance carries
  600 Mbit/s after the failover); the object per N keeps a run at about 1000 MiB (10 x 100m,
  100 x 10m, 1000 x 1m; 5000 x 1m = 5000 MiB, the smallest lab object that leaves every
  connection hundreds of KiB in flight): the kill comes ~8 s after the start (30 % of
  1000 MiB at 300 Mbit/s), long after every head was seen and synced, each connection far
  from its end, and a run takes 20-40 s (5000: ~2 min).
* Connections open at ``--connect-rate`` (500/s: 1000 in 2 s, 5000 in 10 s), not all at
  once: a flash crowd of 1000 connections in 0.3 s stalls the serving replica's server
  appliance (event-loop lags of 0.2-1 s) and its peers declare it dead while it lives,
  which is another test than a failover (``--connect-rate 0`` runs it).
* node.capacity: 10000 wanted (each server appliance then raises RLIMIT_NOFILE to 1024 + 6
  per connection = 61024); where the hard limit is lower and cannot be raised (no
  CAP_SYS_RESOURCE, e.g. in a container) the largest capacity that starts is used and said.
  The lab's nginx config has worker_connections 4096: this benchmark's Lab subclass raises it
  (and worker_rlimit_nofile) for N = 5000; nothing else differs.

Measured per N, from the kill (``lab.kill_replica``'s time):

* the first resumed byte of the median and of the last connection: per connection the
  earliest ``first_byte`` event (its ``wall``) of the takers b and c after the kill;
  cross-checked with manyget's own view (the end of the pause the kill caused in each
  connection; its first byte after the mark if there was no pause);
* intact: manyget's sha256 and length equal to the object's (status 200, no error);
* each taker's server appliance: CPU seconds (/proc/<pid>/stat utime+stime) from the kill to
  the last first byte of the connections it resumed (the takeover window; sampled every
  ~20 ms with Threads and VmRSS, the value at the window's end read off the samples), peak
  threads, VmRSS growth per connection resumed;
* where the time goes: kill -> peer_dead, -> the "takeover" events, consecutive Migrate
  SYNs, SYN/ACKs, repairs, first bytes (and per connection the median of each step); the
  takers' eth0 qdisc backlog (what their Migrate SYNs and window probes wait behind); the
  client appliance's migrate_accepted / migrate_answered (fresh probe or not) / migrated,
  their rate and network-lock times; outcomes and failures by reason; what happened before
  the kill (false suspicions of the live replica); the connections not intact, classed by
  what happened to them, with example timelines.

Beside them, sync_cpu_share_100k: benchmarks/sync_cost.py's steady-state CPU share of one node
advertising 100k connections with two peers (its measure(), one size, 2 s; run after the
labs are down). Output: a table, one flat JSON object (--json PATH; per-N details in PATH with
.details.json), a PNG of time-to-resume against N (--png, default next to the JSON, or
/tmp/failover_scale.png); --keep DIR copies every appliance's logs and event logs. It
measures, it is not a test: exit 0 unless it could not run. Needs root (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from appliance.lab import Lab, LabError, code_digest, group_formed, parse_rate, wait_for
from appliance.statusfile import events_path, read_status

NS_FULL = (10, 100, 1000, 5000)
NS_QUICK = (10, 100, 1000)
OBJECT_FOR = {10: "100m", 100: "10m", 1000: "1m", 5000: "1m"}
TAKERS = ("b", "c")
SAMPLE_S = 0.02
TARGETS = [("intact_ratio_{N}", "==", 1.0, None), ("last_first_byte_ms_1000", "<=", 500, 1000),
           ("last_first_byte_ms_5000", "<=", 2000, 5000), ("sync_cpu_share_100k", "<=", 0.05, None)]


def object_for(n: int) -> str:
    if n in OBJECT_FOR:
        return OBJECT_FOR[n]
    return "100m" if n <= 10 else "10m" if n <= 100 else "1m"


class ScaleLab(Lab):
    """The lab, with a's (every replica's) nginx allowed more than 4096 connections."""

    def __init__(self, *a, nginx_connections: int = 4096, **kw) -> None:
        super().__init__(*a, **kw)
        self.nginx_connections = nginx_connections

    def _nginx_conf(self, rep):
        conf = super()._nginx_conf(rep)
        if self.nginx_connections > 4096:
            text = conf.read_text()
            conf.write_text(text.replace("worker_connections 4096;",
                                         f"worker_connections {self.nginx_connections};")
                            .replace("worker_processes 1;",
                                     f"worker_processes 1;\nworker_rlimit_nofile {self.nginx_connections + 1024};"))
        return conf


def read_events_since(lab, role: str, node: str, since: float) -> list:
    """The event log's events with t >= since (a torn last line, being written, is skipped)."""
    out = []
    try:
        with open(events_path(lab.lab_dir, role, node)) as f:
            for line in f:
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                if ev.get("t", 0) >= since:
                    out.append(ev)
    except FileNotFoundError:
        pass
    return out


# --- the takers' processes -------------------------------------------------------------------


def proc_sample(pid: int):
    """(cpu seconds utime+stime, threads, VmRSS KiB) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / hz  # utime, stime (fields 14, 15 of stat)
    threads = rss = 0
    for line in status.splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return cpu, threads, rss


class Sampler(threading.Thread):
    """Samples each taker's server appliance every SAMPLE_S: (wall, cpu s, threads, rss KiB)."""

    def __init__(self, pids: dict, max_s: float) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.samples = {r: [] for r in pids}
        self.stop = threading.Event()
        self.max_s = max_s

    def run(self) -> None:
        end = time.monotonic() + self.max_s
        for _ in range(int(self.max_s / SAMPLE_S) + 10):  # bounded in count and time
            if self.stop.is_set() or time.monotonic() > end:
                break
            for r, pid in self.pids.items():
                s = proc_sample(pid)
                if s is not None:
                    self.samples[r].append((time.time(), *s))
            self.stop.wait(SAMPLE_S)

    def at(self, r: str, wall: float):
        """The last sample at or before `wall` (the first one if none)."""
        xs = self.samples[r]
        if not xs:
            return None
        best = xs[0]
        for s in xs:
            if s[0] <= wall:
                best = s
            else:
                break
        return best

    def first_after(self, r: str, wall: float):
        for s in self.samples[r]:
            if s[0] >= wall:
                return s
        return self.samples[r][-1] if self.samples[r] else None

    def peak_threads(self, r: str, start: float, end: float) -> int:
        return max((s[2] for s in self.samples[r] if start <= s[0] <= end), default=0)


# --- one run ---------------------------------------------------------------------------------


def read_progress(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ms(x):
    return None if x is None else round(x * 1000, 1)


def spread(times, t0):
    """first, median, last of `times` (walls) in ms from t0, and their count."""
    xs = sorted(t - t0 for t in times)
    if not xs:
        return {"n": 0, "first_ms": None, "median_ms": None, "last_ms": None}
    return {"n": len(xs), "first_ms": ms(xs[0]), "median_ms": ms(statistics.median(xs)), "last_ms": ms(xs[-1])}


def intervals(times):
    xs = sorted(times)
    d = [b - a for a, b in zip(xs, xs[1:])]
    if not d:
        return {"mean_ms": None, "max_ms": None}
    return {"mean_ms": round(statistics.mean(d) * 1000, 3), "max_ms": round(max(d) * 1000, 1)}


def run_one(lab, n: int, args) -> dict:
    obj = f"/obj-{object_for(n)}"
    size, _ = lab.objects[obj]
    total = n * size
    url = lab.url("a", obj)
    cip = lab.ip("c1")
    out = str(lab.lab_dir / f"manyget-{n}.json")
    prog = str(lab.lab_dir / f"manyget-{n}.progress.json")
    manifest = str(lab.lab_dir / "manifest.json")
    rate_Bps = parse_rate(args.rate) / 8 * 0.95
    # the whole run at the replicas' rates: to the kill at a's, the rest at b's and c's; x3 + margin
    expected_s = total * args.kill_at / rate_Bps + total * (1 - args.kill_at) / (2 * rate_Bps)
    if args.connect_rate > 0:
        expected_s += n / args.connect_rate
    deadline = expected_s * 3 + 60
    rec = {"n": n, "connect_rate": args.connect_rate, "object": obj, "object_size": size, "total_bytes": total, "expected_s": round(expected_s, 1),
           "deadline_s": round(deadline, 1)}
    for p in (out, prog):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    t0 = time.time()
    mg = lab.popen("c1", [sys.executable, "-m", "appliance.manyget", "--url", url, "-n", str(n), "--out", out,
                          "--manifest", manifest, "--deadline", str(deadline), "--progress", prog,
                          "--progress-interval", "0.1", "--gap-ms", str(args.gap_ms),
                          "--max-connecting", str(args.max_connecting), "--idle-timeout", str(args.idle_timeout),
                          "--connect-rate", str(args.connect_rate)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = qdisc = None
    try:
        # to the kill point: every head seen (and synced for --settle s), the aggregate at kill_at
        heads_at = None
        p = None
        wait_s = expected_s * 3 + 30
        ramp_end = t0 + (n / args.connect_rate if args.connect_rate > 0 else 0.0)
        last_heads, heads_changed = -1, t0
        for _ in range(int(wait_s / 0.02) + 2):  # bounded
            p = read_progress(prog)
            now = time.time()
            if mg.poll() is not None or now - t0 > wait_s:
                break
            if p:
                if p["heads"] != last_heads:
                    last_heads, heads_changed = p["heads"], now
                # every head seen (or its connection over); or, the ramp over, no new head for 5 s
                # (a connection stalled in its setup must not hold the kill back for ever)
                settled = (p["heads"] + p["failed"] + p["done"] >= n
                           or (now > ramp_end and now - heads_changed > 5.0 and p["heads"] >= 0.9 * n))
                if settled and heads_at is None:
                    heads_at = now
                if heads_at is not None and now - heads_at >= args.settle and p["bytes"] >= args.kill_at * total:
                    break
            time.sleep(0.02)
        if mg.poll() is not None:
            rec["error"] = "manyget ended before the kill (every connection over): " + mg.stderr.read()[-500:]
            rec["before_kill"] = before_kill(lab, t0, time.time(), cip)
            try:
                with open(out) as f:
                    rec["manyget_errors"] = json.load(f)["summary"]["errors"]
            except (OSError, ValueError, KeyError):
                pass
            return rec
        rec["kill_reached"] = bool(p and p["bytes"] >= args.kill_at * total and p["heads"] >= n)
        rec["heads_at_kill"] = p["heads"] if p else 0
        rec["done_before_kill"] = p["done"] if p else 0
        rec["failed_before_kill"] = p["failed"] if p else 0
        rec["bytes_fraction_at_kill"] = round(p["bytes"] / total, 3) if p else 0.0
        rec["heads_s"] = round(heads_at - t0, 2) if heads_at else None
        st = {r: read_status(lab.lab_dir, "server", r) or {} for r in lab.replicas}
        rec["advertised_by_a_before_kill"] = (st["a"].get("group") or {}).get("local_entries")
        for rep in TAKERS:  # what each taker holds of a's table (status snapshots are 0.5 s apart)
            rec[f"a_entries_at_{rep}_before_kill"] = ((((st[rep].get("group") or {}).get("peers") or {})
                                                       .get("a") or {}).get("entries"))
        tcp_before = client_tcp_counters(lab)
        pids = {r: lab.procs[f"server-{r}"]["pid"] for r in TAKERS}
        rec["taker_pids"] = pids
        sampler = Sampler(pids, max_s=deadline + 30)
        sampler.start()
        qdisc = QdiscSampler(lab, TAKERS, max_s=args.qdisc_seconds) if args.qdisc_seconds > 0 else None
        time.sleep(0.1)  # a few samples before the kill
        os.kill(mg.pid, signal.SIGUSR1)  # manyget: the kill happens now (just before the links go down)
        t_kill = lab.kill_replica("a")
        if qdisc is not None:
            qdisc.start()
        rec["kill_at_s"] = round(t_kill - t0, 2)
        try:
            mg.wait(timeout=deadline + 30)
        except subprocess.TimeoutExpired:
            mg.kill()
            mg.wait(5)
        rec["ended_after_kill_s"] = round(time.time() - t_kill, 2)
    finally:
        if sampler is not None:
            sampler.stop.set()
            sampler.join(5)
        if qdisc is not None and qdisc.is_alive():
            qdisc.stop.set()
            qdisc.join(5)
        if mg.poll() is None:
            mg.kill()
            mg.wait(5)
    with open(out) as f:
        res = json.load(f)
    rec.update(analyse(lab, n, res, t_kill, sampler, cip))
    tcp_after = client_tcp_counters(lab)
    rec["client_tcp"] = {k: tcp_after[k] - tcp_before.get(k, 0) for k in tcp_after
                         if tcp_after[k] - tcp_before.get(k, 0)}
    rec["before_kill"] = before_kill(lab, t0, t_kill, cip)
    if qdisc is not None:
        rate_bps = parse_rate(args.rate)
        for rep in TAKERS:
            xs = qdisc.samples[rep]
            peak = max((b for _, b in xs), default=None)
            rec["takers"][rep]["qdisc_backlog_peak_bytes"] = peak
            rec["takers"][rep]["qdisc_delay_peak_ms"] = round(peak * 8 / rate_bps * 1000, 1) if peak else peak
            rec["takers"][rep]["qdisc_backlog"] = [[ms(t - t_kill), b] for t, b in xs]
    return rec


CLIENT_TCP = ("TcpExtPAWSEstab", "TcpExtTCPACKSkippedPAWS", "TcpExtPAWSOldAck", "TcpExtTCPOFOQueue",
              "TcpExtTCPOFODrop", "TcpExtTCPDSACKRecv", "TcpExtTCPDSACKOldSent", "TcpExtTCPAbortOnData",
              "TcpExtTCPRcvQDrop", "TcpExtTCPZeroWindowDrop", "TcpExtTCPACKSkippedSeq", "TcpEstabResets",
              "TcpInErrs", "TcpExtTCPChallengeACK", "TcpExtTCPSYNChallenge", "TcpExtTCPDSACKUndo")


def client_tcp_counters(lab) -> dict:
    """c1's kernel TCP counters (nstat, absolute, no history): PAWS rejections, out-of-order,
    duplicate segments (DSACKs), resets -- what the client's kernel made of the takers' bytes."""
    try:
        out = lab.run("c1", ["nstat", "-asz"], check=False, timeout=10).stdout or ""
    except (subprocess.SubprocessError, OSError):
        return {}
    vals = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in CLIENT_TCP:
            try:
                vals[parts[0]] = int(parts[1])
            except ValueError:
                pass
    return vals


def before_kill(lab, t0: float, t_kill: float, cip: str) -> dict:
    """What happened between the start of the downloads and the kill: takeovers (a false
    suspicion of a live replica), the client appliance's resets and rejections."""
    out = {}
    for rep in lab.replicas:
        evs = [e for e in read_events_since(lab, "server", rep, t0) if e["t"] < t_kill]
        kinds = {}
        for e in evs:
            if e["event"] in ("peer_silent", "peer_dead", "false_suspicion", "takeover", "refused", "failed",
                              "lagging", "first_byte"):
                kinds[e["event"]] = kinds.get(e["event"], 0) + 1
        lags = [e["lag_ms"] for e in evs if e["event"] == "lagging"]
        out[rep] = {"events": kinds, "max_lag_ms": max(lags, default=None),
                    "dead": [{"ms_from_start": ms(e["t"] - t0), "node": e.get("node"), "how": e.get("how"),
                              "silence_ms": e.get("silence_ms")} for e in evs if e["event"] == "peer_dead"][:10]}
    cev = [e for e in read_events_since(lab, "client", "ca", t0) if e["t"] < t_kill]
    reasons = {}
    for e in cev:
        if e["event"] in ("client_reset", "migrate_rejected", "migrated", "migrate_accepted"):
            k = f"{e['event']}: {str(e.get('reason'))[:60]}" if e.get("reason") else e["event"]
            reasons[k] = reasons.get(k, 0) + 1
    out["client_appliance"] = reasons
    return out


class QdiscSampler(threading.Thread):
    """The backlog of each taker's eth0 qdisc (the lab's tbf: what its own sends wait behind),
    every 0.2 s for max_s seconds from the kill."""

    def __init__(self, lab, replicas, max_s: float) -> None:
        super().__init__(daemon=True)
        self.lab, self.replicas, self.max_s = lab, replicas, max_s
        self.samples = {r: [] for r in replicas}
        self.stop = threading.Event()

    def run(self) -> None:
        import re
        end = time.monotonic() + self.max_s
        for _ in range(int(self.max_s / 0.2) + 5):  # bounded in count and time
            if self.stop.is_set() or time.monotonic() > end:
                break
            for r in self.replicas:
                try:
                    out = self.lab.run(r, ["tc", "-s", "qdisc", "show", "dev", "eth0"], check=False, timeout=5).stdout
                except (subprocess.SubprocessError, OSError):
                    continue
                m = re.search(r"backlog (\d+)b", out or "")
                if m:
                    self.samples[r].append((time.time(), int(m.group(1))))
            self.stop.wait(0.2)


def manyget_resume_of(c: dict, t_kill: float, drain_s: float = 0.25):
    """When manyget saw connection c resume: the end of the pause the kill caused (the first
    pause longer than the threshold that starts before t_kill + drain_s: bytes already past
    the replica's link when it went down arrive first); its first byte after the kill if no
    such pause (it resumed within the threshold); None if it got nothing after the kill."""
    for start, end in c.get("gaps_after_mark") or []:
        if end > t_kill and start <= t_kill + drain_s:
            return end
    fb = c.get("first_byte_after_mark")
    return fb if fb and fb >= t_kill else None


def rate_p10_p90(times):
    """Events per second over the middle 80 % of a burst (robust to stragglers and a second wave)."""
    xs = sorted(times)
    if len(xs) < 10:
        return None
    lo, hi = xs[len(xs) // 10], xs[(len(xs) * 9) // 10]
    return round(0.8 * len(xs) / (hi - lo), 1) if hi > lo else None


def analyse(lab, n: int, res: dict, t_kill: float, sampler: Sampler, cip: str) -> dict:
    conns = res["connections"]
    ports = {c["local_port"] for c in conns if c["local_port"]}
    r = {"intact": sum(1 for c in conns if c.get("intact")), "errors": res["summary"]["errors"]}
    r["intact_ratio"] = r["intact"] / n
    # manyget's view: per connection the end of its longest pause after the mark, and its first byte after it
    manyget_resumed = {}
    for c in conns:
        t = manyget_resume_of(c, t_kill)
        if t is not None:
            manyget_resumed[c["local_port"]] = t
    r["manyget_resume"] = spread(list(manyget_resumed.values()), t_kill)
    r["manyget_first_after_mark"] = spread([c["first_byte_after_mark"] for c in conns
                                            if c.get("first_byte_after_mark")], t_kill)
    r["manyget_max_gap_before_mark_ms"] = ms(max((c["max_gap_before_mark"] for c in conns), default=0.0))
    r["manyget_mark_minus_kill_ms"] = ms(res["summary"]["mark"] - t_kill) if res["summary"].get("mark") else None
    # the takers' view
    end = t_kill + 120
    taker = {}
    per_conn_first = {}  # port -> the earliest first_byte after the kill of a takeover of a's (either taker)
    a_ports = set()  # ports of a's connections taken over after the kill (by either taker)
    by_port = {}  # port -> [(replica, event)]
    group_events = []
    for rep in TAKERS:
        evs = [e for e in read_events_since(lab, "server", rep, t_kill) if e.get("t", 0) <= end]
        before = read_events_since(lab, "server", rep, res["summary"]["started"] - 1)
        lags_before = [e["lag_ms"] for e in before if e["event"] == "lagging" and e["t"] < t_kill]
        mine = [e for e in evs if e.get("client") == cip and e.get("client_port") in ports]
        by = {}
        for e in mine:
            by.setdefault(e["event"], []).append(e)
            by_port.setdefault(e["client_port"], []).append((rep, e))
        tk = [e for e in evs if e["event"] == "takeover" and isinstance(e.get("key"), dict)
              and e["key"].get("client") == cip and e["key"].get("client_port") in ports]
        for e in tk:
            by_port.setdefault(e["key"]["client_port"], []).append((rep, e))
        tk_a = [e for e in tk if e.get("dead") == "a"]
        first_bytes = []
        # a first byte counts for the kill if it ends a takeover of a's connection (not one of a
        # later false suspicion of the other taker): the latest "takeover" of that port before it
        dead_of = {}
        timeline = sorted([(e["t"], "tk", e["key"]["client_port"], e.get("dead")) for e in tk]
                          + [(e["t"], "fb", e["client_port"], e) for e in by.get("first_byte", [])],
                          key=lambda x: x[0])
        for _, kind, p, x in timeline:
            if kind == "tk":
                dead_of[p] = x
                if x == "a":
                    a_ports.add(p)
                continue
            first_bytes.append(x["wall"])
            if dead_of.get(p) == "a" and (p not in per_conn_first or x["wall"] < per_conn_first[p][0]):
                per_conn_first[p] = (x["wall"], rep)
        outcomes = {}
        for e in by.get("outcome", []):
            k = e.get("outcome") if e.get("outcome") != "reset" else f"reset: {str(e.get('reason'))[:60]}"
            outcomes[k] = outcomes.get(k, 0) + 1
        failed = {}
        for e in by.get("failed", []) + [e for e in evs if e["event"] == "failed" and "client" not in e]:
            k = str(e.get("reason"))[:80]
            failed[k] = failed.get(k, 0) + 1
        refused = {}
        for e in by.get("refused", []):
            k = str(e.get("reason"))[:80]
            refused[k] = refused.get(k, 0) + 1
        for e in evs:
            if e["event"] in ("peer_silent", "peer_dead", "false_suspicion", "peer_restarted", "isolated",
                              "held_back", "race", "refuted"):
                group_events.append({"at": rep, "ms": ms(e["t"] - t_kill), "event": e["event"],
                                     **{k: v for k, v in e.items() if k in ("node", "how", "silence_ms",
                                                                             "connections", "by", "held",
                                                                             "revoked", "cancelled", "why")}})
        lags = [e for e in evs if e["event"] == "lagging"]
        races = sum(1 for e in evs if e["event"] == "race")
        dead = [e["t"] for e in evs if e["event"] == "peer_dead" and e.get("node") == "a"]
        silent = [e["t"] for e in evs if e["event"] == "peer_silent" and e.get("node") == "a"]
        syn1 = [e["wall"] for e in by.get("migrate_syn_sent", []) if e.get("attempt", 1) <= 1]
        retx = sum(1 for e in by.get("migrate_syn_sent", []) if e.get("attempt", 1) > 1)
        took = len({e["client_port"] for e in by.get("first_byte", [])})
        t = {"took": took, "takeover_events": len(tk), "takeover_events_not_of_a": len(tk) - len(tk_a),
             "claimed": len(by.get("claimed", [])), "passed": len(by.get("passed", [])), "outcomes": outcomes,
             "failed": failed, "refused": refused,
             "races": races, "reprobes": len(by.get("reprobe", [])), "resynced": len(by.get("resynced", [])),
             "peer_silent_ms": ms(min(silent) - t_kill) if silent else None,
             "peer_dead_ms": ms(min(dead) - t_kill) if dead else None,
             "peer_dead_how": next((e.get("how") for e in evs if e["event"] == "peer_dead"
                                    and e.get("node") == "a"), None),
             "lag_episodes_before_kill": len(lags_before),
             "max_lag_ms_before_kill": max(lags_before, default=None),
             "lag_episodes_after_kill": len(lags), "max_lag_ms_after_kill": max((e["lag_ms"] for e in lags),
                                                                                default=None),
             "takeover": spread([e["t"] for e in tk_a], t_kill),
             "checked": spread([e["wall"] for e in by.get("checked", [])], t_kill),
             "migrate_syn": {**spread(syn1, t_kill), **intervals(syn1), "retransmissions": retx},
             "synack": spread([e["wall"] for e in by.get("synack", [])], t_kill),
             "repaired": {**spread([e["wall"] for e in by.get("repaired", [])], t_kill),
                          "repair_ms_median": (statistics.median([e["repair_ms"] for e in by["repaired"]
                                                                  if "repair_ms" in e])
                                               if any("repair_ms" in e for e in by.get("repaired", [])) else None)},
             "resumed": spread([e["wall"] for e in by.get("resumed", [])], t_kill),
             "first_byte": {**spread(first_bytes, t_kill), **intervals(first_bytes)},
             "since_start_ms_first_byte_median": (statistics.median([e["since_start_ms"]
                                                                     for e in by["first_byte"]])
                                                  if by.get("first_byte") else None)}
        # per connection, how long each step took (medians over this taker's connections, ms)
        steps = {}
        for p, pe in by_port.items():
            w = {}
            for rr, e in pe:
                if rr == rep and e["event"] not in w:
                    w[e["event"]] = e.get("wall", e["t"])
            for a_, b_ in (("takeover", "checked"), ("checked", "synack"), ("synack", "repaired"),
                           ("repaired", "resumed"), ("resumed", "first_byte")):
                if a_ in w and b_ in w:
                    steps.setdefault(f"{a_}->{b_}", []).append(w[b_] - w[a_])
        t["step_ms_median"] = {k: ms(statistics.median(v)) for k, v in steps.items()}
        taker[rep] = t
    # the process: CPU in the takeover window (from the kill to the last first byte of the
    # connections this taker resumed first), peak threads, memory per connection resumed
    for rep, t in taker.items():
        mine_first = [w for w, rr in per_conn_first.values() if rr == rep]
        t["resumed_first"] = len(mine_first)
        win_end = max(mine_first) if mine_first else t_kill
        s0 = sampler.at(rep, t_kill)
        s1 = sampler.first_after(rep, win_end)
        if s0 and s1:
            t["cpu_s"] = round(s1[1] - s0[1], 3)
            t["rss_before_kib"], t["rss_after_kib"] = s0[3], s1[3]
            t["rss_kib_per_conn"] = round((s1[3] - s0[3]) / len(mine_first), 2) if mine_first else None
            t["threads_before"] = s0[2]
            t["peak_threads"] = sampler.peak_threads(rep, t_kill, win_end + 0.5)
            t["window_s"] = round(win_end - t_kill, 3)
            last = sampler.samples[rep][-1]
            t["cpu_s_to_end"] = round(last[1] - s0[1], 3)
            t["seconds_to_end"] = round(last[0] - t_kill, 3)
            t["peak_threads_to_end"] = sampler.peak_threads(rep, t_kill, last[0])
    r["takers"] = taker
    r["group_events"] = sorted(group_events, key=lambda e: e["ms"])[:40]
    r["took_total"] = len(per_conn_first)
    r["first_byte"] = spread([w for w, _ in per_conn_first.values()], t_kill)
    r["a_connections_at_kill"] = len(a_ports)  # the takers' "takeover" events of dead a after the kill
    r["never_resumed"] = len(a_ports - set(per_conn_first))
    cpu = [t.get("cpu_s") for t in taker.values() if t.get("cpu_s") is not None]
    took_sum = sum(t["resumed_first"] for t in taker.values())
    r["taker_cpu_ms_per_conn"] = round(sum(cpu) * 1000 / took_sum, 3) if took_sum and cpu else None
    rss = [t["rss_after_kib"] - t["rss_before_kib"] for t in taker.values() if t.get("rss_after_kib") is not None]
    r["taker_rss_kib_per_conn"] = round(sum(rss) / took_sum, 2) if took_sum and rss else None
    r["taker_peak_threads"] = max((t.get("peak_threads", 0) for t in taker.values()), default=0)
    # the client appliance
    cev = [e for e in read_events_since(lab, "client", "ca", t_kill) if e.get("t", 0) <= end
           and isinstance(e.get("client"), list) and len(e["client"]) > 1 and e["client"][0] == cip
           and e["client"][1] in ports]
    ca = {}
    cby = {}
    for e in cev:
        cby.setdefault(e["client"][1], []).append(e)
    for kind in ("migrate_accepted", "migrate_answered", "migrated", "client_reset", "migrate_rejected",
                 "migrate_rst_rejected", "migrate_lock_timeout", "migrate_abandoned", "rst_held",
                 "former_server_reset"):
        ts = [e["t"] for e in cev if e["event"] == kind]
        if ts:
            ca[kind] = {**spread(ts, t_kill), "per_s_p10_p90": rate_p10_p90(ts)}
    answered = [e for e in cev if e["event"] == "migrate_answered"]
    ca["answered_unprobed"] = sum(1 for e in answered if e.get("probed") is False)
    locks = [e["lock_ms"] for e in cev if e["event"] == "migrated" and "lock_ms" in e]
    ca["lock_ms_median"] = statistics.median(locks) if locks else None
    ca["lock_ms_max"] = max(locks) if locks else None
    ca["migrated_twice_or_more"] = sum(1 for evs in cby.values() if sum(e["event"] == "migrated" for e in evs) > 1)
    reasons = {}
    for e in cev:
        if e["event"] in ("client_reset", "migrate_rejected"):
            k = f"{e['event']}: {str(e.get('reason'))[:60]}"
            reasons[k] = reasons.get(k, 0) + 1
    ca["reasons"] = reasons
    r["client_appliance"] = ca
    # the connections not intact, by what happened to them (from the start of the downloads:
    # a live replica falsely suspected before the kill leaves traces the kill then meets)
    t0 = res["summary"]["started"]
    hist = {}  # port -> [(t, node, event)] since the start, every appliance
    wanted = {c["local_port"] for c in conns if not c.get("intact")}
    quiet = ("conn_open", "conn_established", "response_start", "claim_heard")
    for node, role in (("a", "server"), ("b", "server"), ("c", "server"), ("ca", "client")):
        for e in read_events_since(lab, role, node, t0):
            if e.get("t", 0) > end or e["event"] in quiet:
                continue
            k = e.get("key")
            cl = e.get("client")
            p = (cl[1] if isinstance(cl, list) and len(cl) > 1 else e.get("client_port")
                 if cl == cip else k.get("client_port") if isinstance(k, dict) and k.get("client") == cip else None)
            if p in wanted:
                hist.setdefault(p, []).append((e.get("wall", e["t"]), node, e))
    classes = {}
    examples = []
    keep = ("reason", "attempt", "outcome", "mode", "offset", "bytes_left", "ack", "gap", "bytes", "end", "plan",
            "dead", "to", "from", "reqno", "probed", "lock_ms")
    for c in conns:
        if c.get("intact"):
            continue
        p = c["local_port"]
        h = sorted(hist.get(p, []), key=lambda x: x[0])
        touched = any(t < t_kill for t, _, _ in h)
        after = [(t, nd, e) for t, nd, e in h if t >= t_kill]
        tev = [f"{nd}:{e['event']}" for _, nd, e in after if nd != "ca"]
        cevs = [e for _, nd, e in after if nd == "ca"]
        migr = sum(1 for e in cevs if e["event"] == "migrated")
        unprobed = any(e["event"] == "migrate_answered" and e.get("probed") is False for e in cevs)
        ended_before = c.get("ended") is not None and c["ended"] < t_kill
        k = (f"{c['error']}" + ("; ended BEFORE the kill" if ended_before else "")
             + ("; taken over (or tried) before the kill" if touched else "")
             + f"; after it: taker's last event {tev[-1] if tev else None}, client appliance's last "
             f"{cevs[-1]['event'] if cevs else None}, migrated {migr}x" + (", an unprobed answer" if unprobed else ""))
        classes[k] = classes.get(k, 0) + 1
        if len(examples) < 5:
            examples.append({"port": p, "error": c["error"], "bytes": c["bytes"], "bytes_at_mark": c["bytes_at_mark"],
                             "last_byte_ms": ms(c["last_byte"] - t_kill) if c.get("last_byte") else None,
                             "ended_ms": ms(c["ended"] - t_kill) if c.get("ended") else None,
                             "events": [[nd, ms(t - t_kill), e["event"], {k2: v for k2, v in e.items() if k2 in keep}]
                                        for t, nd, e in h][:40]})
    r["not_intact_classes"] = dict(sorted(classes.items(), key=lambda kv: -kv[1]))
    r["not_intact_examples"] = examples
    # cross-check: per connection, manyget's resume against the taker's first_byte
    diffs = []
    for c in conns:
        fb = per_conn_first.get(c["local_port"])
        mr = manyget_resumed.get(c["local_port"])
        if fb and mr:
            diffs.append(mr - fb[0])
    r["crosscheck_manyget_minus_first_byte_ms_median"] = ms(statistics.median(diffs)) if diffs else None
    return r


# --- output ----------------------------------------------------------------------------------


def flat(results: dict, runs: list, sync_share) -> dict:
    out = dict(results)
    for rec in runs:
        n = rec["n"]
        fb = rec.get("first_byte") or {}
        out[f"intact_{n}"] = rec.get("intact")
        out[f"intact_ratio_{n}"] = rec.get("intact_ratio")
        out[f"median_first_byte_ms_{n}"] = fb.get("median_ms")
        out[f"last_first_byte_ms_{n}"] = fb.get("last_ms")
        out[f"first_first_byte_ms_{n}"] = fb.get("first_ms")
        out[f"taker_cpu_ms_per_conn_{n}"] = rec.get("taker_cpu_ms_per_conn")
        out[f"taker_rss_kib_per_conn_{n}"] = rec.get("taker_rss_kib_per_conn")
        out[f"taker_peak_threads_{n}"] = rec.get("taker_peak_threads")
        out[f"took_{n}"] = rec.get("took_total")
        out[f"a_connections_at_kill_{n}"] = rec.get("a_connections_at_kill")
        out[f"never_resumed_{n}"] = rec.get("never_resumed")
        mr = rec.get("manyget_resume") or {}
        out[f"manyget_median_resume_ms_{n}"] = mr.get("median_ms")
        out[f"manyget_last_resume_ms_{n}"] = mr.get("last_ms")
        out[f"done_before_kill_{n}"] = rec.get("done_before_kill")
        out[f"bytes_fraction_at_kill_{n}"] = rec.get("bytes_fraction_at_kill")
        out[f"client_paws_rejected_{n}"] = (rec.get("client_tcp") or {}).get("TcpExtPAWSEstab", 0)
        bk = rec.get("before_kill") or {}
        out[f"false_suspicion_takeovers_before_kill_{n}"] = sum(
            (v.get("events") or {}).get("takeover", 0) for k, v in bk.items() if k != "client_appliance")
        for rep, t in (rec.get("takers") or {}).items():
            out[f"peer_dead_ms_{rep}_{n}"] = t.get("peer_dead_ms")
            out[f"cpu_s_{rep}_{n}"] = t.get("cpu_s")
            out[f"took_{rep}_{n}"] = t.get("resumed_first")
        if rec.get("error"):
            out[f"error_{n}"] = rec["error"]
    out["sync_cpu_share_100k"] = sync_share
    return out


def print_table(runs: list, args) -> None:
    print(f"\nfailover at scale: {args.server} server, replica links {args.rate}, kill at "
          f"{args.kill_at * 100:.0f} % of the bytes")
    hdr = (f"{'N':>6}{'object':>8}{'intact':>12}{'resumed':>12}{'1st byte':>10}{'median':>9}{'last':>9}"
           f"{'mg med':>9}{'mg last':>9}{'cpu/conn':>10}{'KiB/conn':>10}{'threads':>9}{'peer_dead':>11}")
    print(hdr)
    for rec in runs:
        if rec.get("error"):
            print(f"{rec['n']:>6}  FAILED: {rec['error'][:100]}")
            continue
        fb, mr = rec["first_byte"], rec["manyget_resume"]
        pd = [t.get("peer_dead_ms") for t in rec["takers"].values() if t.get("peer_dead_ms") is not None]

        def f(v, w, fmt="{:.0f}"):
            return f"{'-' if v is None else fmt.format(v):>{w}}"
        print(f"{rec['n']:>6}{rec['object'].replace('/obj-', ''):>8}{rec['intact']:>6}/{rec['n']:<5}"
              f"{rec['took_total']:>6}/{rec['a_connections_at_kill']:<5}{f(fb['first_ms'], 8)}ms{f(fb['median_ms'], 7)}ms{f(fb['last_ms'], 7)}ms"
              f"{f(mr['median_ms'], 7)}ms{f(mr['last_ms'], 7)}ms{f(rec['taker_cpu_ms_per_conn'], 8, '{:.2f}')}ms"
              f"{f(rec['taker_rss_kib_per_conn'], 10, '{:.1f}')}{rec['taker_peak_threads']:>9}"
              f"{f(min(pd) if pd else None, 9)}ms")
    print("(resumed: of a's connections the takers took over after the kill, those given a first byte;\n"
          " 1st byte / median / last: the takers' first_byte events from the kill; mg: manyget's own view,\n"
          " the end of the pause the kill caused in each connection; cpu/conn: both takers' server\n"
          " appliance CPU from the kill to their last first_byte, per connection taken; KiB/conn: their\n"
          " VmRSS growth over that window per connection; threads: peak of either taker)")


def print_detail(rec: dict) -> None:
    print(f"\nN={rec['n']}: where the time goes (ms from the kill: n, first / median / last)")
    for rep, t in rec["takers"].items():
        print(f"  {rep}: first byte to {t['took']} connections ({t['resumed_first']} of them resumed here first; takeover events {t['takeover_events']}, of other dead peers "
              f"{t['takeover_events_not_of_a']}; claimed {t['claimed']}, passed {t['passed']}); peer_silent(a) "
              f"{t['peer_silent_ms']} peer_dead(a) {t['peer_dead_ms']} ({t['peer_dead_how']}); loop lags before the "
              f"kill {t['lag_episodes_before_kill']} (max {t['max_lag_ms_before_kill']} ms), after "
              f"{t['lag_episodes_after_kill']} (max {t['max_lag_ms_after_kill']} ms)")
        print(f"     outcomes {t['outcomes']}" + (f"; failed {t['failed']}" if t["failed"] else "")
              + (f"; refused {t['refused']}" if t["refused"] else "")
              + f"; reprobes {t['reprobes']}, resynced {t['resynced']}, races {t['races']}")
        for k in ("takeover", "checked", "migrate_syn", "synack", "repaired", "resumed", "first_byte"):
            s = t[k]
            extra = ""
            if s.get("mean_ms") is not None:
                extra = f", between consecutive: mean {s['mean_ms']} max {s['max_ms']}"
            if k == "migrate_syn":
                extra += f", retransmissions {s['retransmissions']}"
            print(f"     {k:<12} n={s['n']:<6} {s['first_ms']} / {s['median_ms']} / {s['last_ms']}{extra}")
        print(f"     per connection, median ms: {t['step_ms_median']}")
        if t.get("cpu_s") is not None:
            print(f"     process: CPU {t['cpu_s']} s in the {t['window_s']} s window ({t['cpu_s_to_end']} s CPU in the "
                  f"{t['seconds_to_end']} s to the end of the downloads), threads {t['threads_before']} -> peak "
                  f"{t['peak_threads']}, VmRSS {t['rss_before_kib']} -> {t['rss_after_kib']} KiB")
    if rec.get("client_tcp"):
        print(f"  c1's kernel TCP counters from the kill to the end (nstat deltas): {rec['client_tcp']}")
    bk = rec.get("before_kill") or {}
    bad_before = {r: v for r, v in bk.items() if r != "client_appliance" and (v["dead"] or v["events"].get("takeover"))}
    if bad_before or bk.get("client_appliance"):
        print(f"  BEFORE the kill: {bad_before}; client appliance {bk.get('client_appliance')}")
    for rep, t in rec["takers"].items():
        if t.get("qdisc_backlog_peak_bytes") is not None:
            print(f"  {rep}'s eth0 qdisc backlog after the kill: peak {t['qdisc_backlog_peak_bytes']} B "
                  f"= {t['qdisc_delay_peak_ms']} ms at the link rate (what its Migrate SYNs and probes wait behind)")
    if rec.get("group_events"):
        print("  group events after the kill: " + "; ".join(
            f"{e['at']}@{e['ms']}: {e['event']} {e.get('node', '')}"
            + (f" ({e['how']}, {e.get('connections')} conns)" if e.get("how") else "") for e in rec["group_events"]))
    ca = rec["client_appliance"]
    print("  client appliance: " + "; ".join(
        f"{k} n={v['n']} {v['first_ms']}/{v['median_ms']}/{v['last_ms']}"
        + (f" ({v['per_s_p10_p90']}/s)" if v.get("per_s_p10_p90") else "")
        for k, v in ca.items() if isinstance(v, dict) and "n" in v))
    print(f"    answered without a fresh probe {ca['answered_unprobed']}; network lock median {ca['lock_ms_median']} "
          f"max {ca['lock_ms_max']} ms; connections migrated twice or more {ca['migrated_twice_or_more']}")
    if ca["reasons"]:
        print(f"    resets/rejections: {ca['reasons']}")
    if rec["not_intact_classes"]:
        print(f"  not intact: {rec['n'] - rec['intact']} (manyget errors {rec['errors']}):")
        for k, v in rec["not_intact_classes"].items():
            print(f"    {v:>5}  {k}")
        for ex in rec["not_intact_examples"][:2]:
            print(f"    e.g. port {ex['port']} ({ex['error']}, {ex['bytes']} bytes, {ex['bytes_at_mark']} at the kill, "
                  f"last byte at {ex['last_byte_ms']} ms), ms from the kill:")
            print("      " + "; ".join(f"{nd}@{t}:{ev}" + (f"({','.join(f'{k}={v}' for k, v in f.items())})" if f else "")
                                      for nd, t, ev, f in ex["events"]))


def plot(runs: list, path: str, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in runs if not r.get("error") and r["first_byte"]["n"]]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def curve(key, which):
        pts = [(r["n"], r[key][which]) for r in ok if (r[key][which] or 0) > 0]
        return [x for x, _ in pts], [y for _, y in pts]
    ax.plot(*curve("first_byte", "median_ms"), "o-", label="median connection (takers' first_byte)")
    ax.plot(*curve("first_byte", "last_ms"), "s-", label="last connection (takers' first_byte)")
    ax.plot(*curve("manyget_resume", "median_ms"), "+--", color="gray", label="median connection (manyget)")
    ax.plot(*curve("manyget_resume", "last_ms"), "x--", color="gray", label="last connection (manyget)")
    for n, target in ((1000, 500), (5000, 2000)):
        ax.plot([n], [target], "v", color="red", alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("concurrent downloads from the killed replica")
    ax.set_ylabel("kill -> first resumed byte (ms)")
    ax.set_title(f"Failover at scale ({args.server}, {args.rate} links; red: targets)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sync_share_100k() -> float:
    """benchmarks/sync_cost.py's figure, in a process of its own: in this one the labs' and
    the runs' objects would make each of the garbage collector's full passes longer."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "sync.json")
        subprocess.run([sys.executable, os.path.join(HERE, "sync_cost.py"), "--quick", "--repeat", "3", "--json", out],
                       check=True, stdout=subprocess.DEVNULL, timeout=600)
        with open(out) as f:
            return json.load(f)["cpu_share_100k"]


def keep_logs(lab, dest: str) -> None:
    """Copy the lab dir's event logs, process logs and manyget files (the lab dir goes at down)."""
    import shutil
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(lab.lab_dir):
        if name.endswith((".events.jsonl", ".log", ".json")):
            try:
                shutil.copy2(lab.lab_dir / name, os.path.join(dest, name))
            except OSError:
                pass


def can_raise_hard() -> bool:
    """Whether this process may raise its hard RLIMIT_NOFILE (CAP_SYS_RESOURCE), as the server
    appliances would have to for node.capacity = 10000."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return True
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard + 1))
    except (ValueError, OSError):
        return False
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # lowering is always allowed
    return True


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"N in {NS_QUICK} (default {NS_FULL})")
    ap.add_argument("--n", default=None, help="comma-separated N to run (overrides --quick)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    ap.add_argument("--png", metavar="PATH", help="the figure (default: PATH of --json with .png)")
    ap.add_argument("--server", choices=("nginx", "builtin"), default="nginx")
    ap.add_argument("--rate", default="300mbit", help="every replica link's rate (default 300mbit)")
    ap.add_argument("--kill-at", type=float, default=0.3, help="the kill when this fraction of all bytes arrived")
    ap.add_argument("--settle", type=float, default=2.0, help="s after the last response head before the kill")
    ap.add_argument("--gap-ms", type=float, default=50.0, help="manyget's pause threshold")
    ap.add_argument("--max-connecting", type=int, default=256, help="manyget's connections being set up at once")
    ap.add_argument("--connect-rate", type=float, default=500.0,
                    help="manyget opens this many connections per second (0: all at once; default 500: a "
                         "flash crowd of 1000 in 0.3 s stalls the serving replica's appliance, see the docstring)")
    ap.add_argument("--capacity", type=int, default=None,
                    help="node.capacity of the server appliances (default 10000, or what the hard open-file "
                         "limit allows: each needs 1024 + 6 per connection and cannot raise the hard limit "
                         "without CAP_SYS_RESOURCE)")
    ap.add_argument("--idle-timeout", type=float, default=20.0,
                    help="manyget: a connection with no byte this long ends as a timeout (0: off)")
    ap.add_argument("--qdisc-seconds", type=float, default=6.0,
                    help="sample the takers' eth0 qdisc backlog this long from the kill (0: off)")
    ap.add_argument("--keep", metavar="DIR", help="copy the event logs, appliance logs and manyget results here")
    ap.add_argument("--no-sync", action="store_true", help="skip the sync_cost 100k measurement")
    ap.add_argument("--lab-name", default=f"scale{os.getpid() % 100000}")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("failover_scale: needs root (network namespaces)", file=sys.stderr)
        return 2
    ns = [int(x) for x in args.n.split(",")] if args.n else list(NS_QUICK if args.quick else NS_FULL)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    fit = (hard - 1024) // 6 if hard != resource.RLIM_INFINITY else 10000
    capacity_note = None
    if args.capacity is None:
        args.capacity = min(10000, fit) if not can_raise_hard() else 10000
        if args.capacity < 10000:
            capacity_note = (f"node.capacity {args.capacity}, not 10000: the hard RLIMIT_NOFILE is {hard} and this "
                             f"process cannot raise it (no CAP_SYS_RESOURCE); 10000 needs 61024")
            print(f"failover_scale: {capacity_note}", flush=True)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < hard:  # nginx and manyget inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    load_before = loadavg()
    sizes = sorted({object_for(n) for n in ns})
    nginx_conns = max(4096, min(2 * max(ns) + 1024, hard - 2048))
    runs, lab_error = [], None
    print(f"failover_scale: N {ns}, {args.server}, links {args.rate}, objects {sizes}, capacity {args.capacity}, "
          f"load average {load_before}", flush=True)
    try:
        with ScaleLab(args.lab_name, clients=1, server=args.server, client_path="appliance", appliances=True,
                      object_sizes=sizes, links={r: {"rate": args.rate} for r in "abc"},
                      group_config={"node": {"capacity": args.capacity}}, nginx_connections=nginx_conns) as lab:
            with open(lab.lab_dir / "manifest.json", "w") as f:
                json.dump({k: list(v) for k, v in lab.objects.items()}, f)
            if not wait_for(lambda: group_formed(lab), 30, 0.1):
                raise LabError("the support group did not form within 30 s")
            print(f"  lab up in {time.monotonic() - started:.1f} s", flush=True)
            for i, n in enumerate(ns):
                t_run = time.monotonic()
                code = code_digest()
                try:
                    rec = run_one(lab, n, args)
                except (RuntimeError, LabError, OSError, subprocess.SubprocessError, ValueError) as exc:
                    rec = {"n": n, "error": str(exc)[-800:]}
                rec["code"] = code
                rec["load_after"] = loadavg()
                rec["seconds"] = round(time.monotonic() - t_run, 1)
                runs.append(rec)
                if args.keep:
                    keep_logs(lab, os.path.join(args.keep, f"n{n}"))
                if rec.get("error"):
                    print(f"  N={n}: FAILED: {rec['error'][:300]}", flush=True)
                    if rec.get("before_kill"):
                        print(f"    before the kill: {rec['before_kill']}; manyget {rec.get('manyget_errors')}",
                              flush=True)
                else:
                    fb = rec["first_byte"]
                    print(f"  N={n} {rec['object']}: intact {rec['intact']}/{n}, resumed {rec['took_total']} of the "
                          f"{rec['a_connections_at_kill']} a held at the kill, "
                          f"first byte median {fb['median_ms']} ms last {fb['last_ms']} ms; kill at "
                          f"{rec['kill_at_s']} s ({rec['bytes_fraction_at_kill'] * 100:.0f} %, "
                          f"{rec['done_before_kill']} done before), run {rec['seconds']} s, load {rec['load_after']}",
                          flush=True)
                if i + 1 < len(ns) and "server-a" not in lab.procs:  # a was killed: bring it back
                    t_rev = time.time()
                    lab.revive_replica("a")
                    if not wait_for(lambda t=t_rev: group_formed(lab, since=t), 30, 0.1):
                        print("  the support group did not re-form within 30 s", flush=True)
    except LabError as exc:
        lab_error = str(exc)[-800:]
        print(f"failover_scale: lab failed: {lab_error}", file=sys.stderr)
    sync_share = None
    if not args.no_sync:
        print("  sync_cost: 100k connections ...", flush=True)
        sync_share = sync_share_100k()
    load_after = loadavg()
    codes = sorted({r.get("code") for r in runs if r.get("code")})
    results = {"server": args.server, "rate": args.rate, "code_versions": len(codes), "codes": codes, "kill_at": args.kill_at, "ns": ns,
               "capacity": args.capacity, "seconds": round(time.monotonic() - started, 1),
               "load_before": load_before, "load_after": load_after, "cpus": os.cpu_count()}
    if lab_error:
        results["lab_error"] = lab_error
    if capacity_note:
        results["capacity_note"] = capacity_note
    figures = flat(results, runs, sync_share)
    print_table(runs, args)
    for rec in runs:
        if not rec.get("error"):
            print_detail(rec)
    print(f"\nsync_cpu_share_100k: {sync_share}")
    print(f"load average before {load_before}, after {load_after} ({os.cpu_count()} CPUs)")
    print("\ntargets (benchmark, not test):")
    for key, op, target, only in TARGETS:
        keys = [key.format(N=n) for n in ns] if "{N}" in key else ([key] if only is None or only in ns else [])
        for k in keys:
            val = figures.get(k)
            ok = val is not None and (val == target if op == "==" else val <= target)
            shown = "-" if val is None else f"{val:.4g}"
            print(f"  {k:<28}{shown:>10}  {op} {target}  {'met' if ok else 'MISSED'}")
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else "/tmp/failover_scale.png")
    try:
        plot(runs, png, args)
        print(f"figure written to {png}")
    except Exception as exc:  # noqa: BLE001  a figure is not worth the figures
        print(f"no figure: {exc}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2, sort_keys=True)
        detail = os.path.splitext(args.json)[0] + ".details.json"
        with open(detail, "w") as fh:
            json.dump({"results": results, "runs": runs}, fh, indent=1)
        print(f"figures written to {args.json}, details to {detail}")
    return 0 if runs and not lab_error else 1


if __name__ == "__main__":
    sys.exit(main())
