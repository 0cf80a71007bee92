#!/usr/bin/env python3
"""Soak test of the outcome contract: many rounds of concurrent downloads through a crash.

Each round: 5 connections from the clients c1..c5 (one real curl each, its own client
address) to replica a through the client appliance: random objects of the lab (1m, 10m,
20m), some with a Range request (curl -r FIRST-LAST or FIRST-), some keep-alive pairs (one
curl, two URLs, one connection). Once a random one of the big downloads (8 MiB or more) has
received a random fraction (10 % to 70 %) of its bytes, a is crashed (lab.kill_replica: links
down, then SIGKILL); after every curl has ended (or been killed at its deadline) a is revived
and the support group must re-form before the next round. The server kind (builtin, nginx,
lighttpd) is drawn per round; one lab per kind drawn, brought up once, runs that kind's
rounds in the drawn order.

Every connection (a keep-alive pair is one connection carrying two objects) ends as:

* intact  -- curl exit 0 and every object's sha256 equals the expected one (the manifest's,
  or the requested slice's for a Range request);
* reset   -- curl exited with an error within 2 s of the crash, every byte it had received
  being the right one;
* hung    -- curl still running 10 s after the crash (killed), or an error more than 2 s
  after the crash (the contract is a prompt reset);
* corrupt -- wrong bytes: curl exit 0 with a wrong sha256, or an error after wrong bytes;
* early_error -- curl failed before the crash (nothing to do with the failover; should not
  happen, listed apart so that the four classes above stay about the crash).

Every replica serves the same content, so every connection should be intact; a reset is a
failure to resume and is listed with the client appliance's client_reset reason. Figures:
one flat JSON object (--json PATH) and the per-round details in PATH with .rounds.json.
It measures, it is not a test: exit status 0 unless it could not run at all. Needs root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from appliance.lab import Lab, LabError, code_digest, group_formed, wait_for  # noqa: E402
from appliance.statusfile import read_events  # noqa: E402

KINDS = ("builtin", "nginx", "lighttpd")
SIZES = ("1m", "10m", "20m")
SIZE_WEIGHTS = (3, 4, 2)
CONN_TYPES = ("plain", "range", "pair")
CONN_WEIGHTS = (5, 3, 2)
CONNS_PER_ROUND = 5
RESET_WITHIN = 2.0  # s from the crash: a reset later than this is not prompt (counted hung)
HUNG_AFTER = 10.0  # s from the crash: a curl still running then is hung (killed)
DEFAULT_SEED = 20240601
OUTCOMES = ("intact", "reset", "hung", "corrupt", "early_error")
TARGETS = (("hung", "==", 0), ("corrupt", "==", 0), ("intact_ratio", ">=", 0.99))
WFMT = "%{http_code} %{local_port} %{num_connects} %{size_download}\\n"
BLOCK = 1 << 20
EVENT_KEEP = 60  # events kept per bad connection in the rounds file
SLIM_DROP = ("mono", "seqs")


# --- one round's plan -----------------------------------------------------------------------


def plan_round(rng: random.Random, lab_objects: dict, budget_bytes: int) -> list:
    """CONNS_PER_ROUND connection specs whose bytes add up to at most about `budget_bytes`
    (redrawn, bounded), at least one object of 10m or more so something is in flight."""
    best = None
    for _ in range(30):
        conns = []
        for k in range(CONNS_PER_ROUND):
            ctype = rng.choices(CONN_TYPES, CONN_WEIGHTS)[0]
            n_obj = 2 if ctype == "pair" else 1
            objs = []
            for _ in range(n_obj):
                path = f"/obj-{rng.choices(SIZES, SIZE_WEIGHTS)[0]}"
                size = lab_objects[path][0]
                first, last = 0, None
                if ctype == "range":
                    first = rng.randrange(0, size // 2)
                    if rng.random() < 0.5:
                        last = rng.randrange(first + size // 4, size)
                length = (size if last is None else last + 1) - first
                objs.append({"path": path, "size": size, "first": first, "last": last, "length": length})
            conns.append({"id": k, "node": f"c{k + 1}", "type": ctype, "objects": objs,
                          "range": (f"{objs[0]['first']}-{'' if objs[0]['last'] is None else objs[0]['last']}"
                                    if ctype == "range" else None)})
        total = sum(o["length"] for c in conns for o in c["objects"])
        big = any(o["length"] >= 8 * BLOCK for c in conns for o in c["objects"])
        if big and (best is None or total < best[0]):
            best = (total, conns)
        if big and total <= budget_bytes:
            return conns
    if best is None:  # never drawn a big one (unlikely): make the first connection a plain 20m
        size = lab_objects["/obj-20m"][0]
        conns[0].update(type="plain", range=None, objects=[{"path": "/obj-20m", "size": size, "first": 0,
                                                            "last": None, "length": size}])
        return conns
    return best[1]


# --- bytes ----------------------------------------------------------------------------------


_slice_sha = {}


def expected_sha(lab, obj) -> str:
    if obj["first"] == 0 and obj["last"] is None:
        return lab.objects[obj["path"]][1]
    key = (obj["path"], obj["first"], obj["last"])
    if key not in _slice_sha:
        h = hashlib.sha256()
        with open(os.path.join(lab.docroot, obj["path"].lstrip("/")), "rb") as f:
            f.seek(obj["first"])
            left = obj["length"]
            for _ in range(obj["length"] // BLOCK + 2):
                if left <= 0:
                    break
                data = f.read(min(BLOCK, left))
                if not data:
                    break
                h.update(data)
                left -= len(data)
        _slice_sha[key] = h.hexdigest()
    return _slice_sha[key]


def check_bytes(lab, out: str, obj) -> dict:
    """What `out` holds against the expected bytes: size, sha256 match, first differing offset."""
    src = os.path.join(lab.docroot, obj["path"].lstrip("/"))
    h = hashlib.sha256()
    n, diff = 0, None
    if not os.path.exists(out):  # curl never wrote a byte
        return {"received": 0, "sha_ok": False, "first_diff": None, "prefix_ok": True}
    with open(out, "rb") as fo, open(src, "rb") as fs:
        fs.seek(obj["first"])
        for _ in range(obj["length"] // BLOCK + 64):  # bounded: the output may be longer than expected
            got = fo.read(BLOCK)
            if not got:
                break
            h.update(got)
            want = fs.read(min(len(got), max(0, obj["length"] - n)))
            if diff is None and got != want:
                k = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), min(len(got), len(want)))
                diff = n + k
            n += len(got)
    return {"received": n, "sha_ok": h.hexdigest() == expected_sha(lab, obj), "first_diff": diff,
            "prefix_ok": diff is None}


# --- curls ------------------------------------------------------------------------------------


class Curl:
    def __init__(self, lab, spec: dict, outdir: str, max_time: float) -> None:
        self.spec = spec
        self.outs = [os.path.join(outdir, f"c{spec['id']}-{i}") for i in range(len(spec["objects"]))]
        argv = ["curl", "-sS", "--fail-early", "--max-time", f"{max_time:.0f}", "-w", WFMT.replace("\\n", "\n")]
        if spec["range"]:
            argv += ["-r", spec["range"]]
        for obj, out in zip(spec["objects"], self.outs):
            argv += [lab.url("a", obj["path"]), "-o", out]
        self.started = time.time()
        self.proc = lab.popen(spec["node"], argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.ended = None  # time.time() when seen exited
        self.killed = False
        self.rc = None
        self.stdout = self.stderr = ""

    def poll(self) -> bool:
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.time()
        return self.ended is not None

    def finish(self) -> None:
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.stdout, self.stderr = self.proc.communicate(timeout=10)
        self.rc = self.proc.returncode

    def transfers(self) -> list:
        out = []
        for line in (self.stdout or "").splitlines():
            parts = line.split()
            if len(parts) == 4:
                out.append({"http_code": parts[0], "local_port": int(parts[1]) if parts[1].isdigit() else None,
                            "num_connects": int(parts[2]) if parts[2].isdigit() else None,
                            "size_download": int(parts[3]) if parts[3].isdigit() else None})
        return out


def received(c: Curl) -> int:
    n = 0
    for out in c.outs:
        try:
            n += os.stat(out).st_size
        except FileNotFoundError:
            pass
    return n


class Watcher(threading.Thread):
    """Sees each curl exit within ~5 ms (its end time decides reset vs hung)."""

    def __init__(self, curls) -> None:
        super().__init__(daemon=True)
        self.curls = curls
        self.stop = threading.Event()

    def run(self) -> None:
        for _ in range(int(600 / 0.005)):  # bounded: at most 10 minutes
            done = [c.poll() for c in self.curls]  # poll every one (all() would stop at the first running)
            if self.stop.is_set() or all(done):
                return
            time.sleep(0.005)


# --- events ---------------------------------------------------------------------------------


def slim(ev: dict, t_kill: float) -> dict:
    out = {k: v for k, v in ev.items() if k not in SLIM_DROP}
    out["dt_ms"] = round((ev.get("t", 0) - t_kill) * 1000, 1)
    return out


def client_events_for(events, ip: str, since: float) -> list:
    return [e for e in events if e.get("t", 0) >= since and isinstance(e.get("client"), list)
            and e["client"] and e["client"][0] == ip]


def server_events_for(events, ip: str, since: float) -> list:
    """A replica's events about the client address `ip` (flat fields, or a "key" dict as the
    "takeover" event carries)."""
    return [e for e in events if e.get("t", 0) >= since
            and (e.get("client") == ip or (isinstance(e.get("key"), dict) and e["key"].get("client") == ip))]


def replica_of(lab, addr):
    if not addr:
        return None
    for r in lab.replicas:
        if lab.ip(r) == addr[0]:
            return r
    return None


# --- one round ------------------------------------------------------------------------------


def run_round(lab, index: int, seed: int, args, rate_Bps: float) -> dict:
    rng = random.Random(f"{seed}:{index}")
    specs = plan_round(rng, lab.objects, int(rate_Bps * args.round_seconds))
    total = sum(o["length"] for s in specs for o in s["objects"])
    expected_s = total / rate_Bps
    # the crash: when a random one of the big downloads has received a random fraction of its bytes
    target = rng.choice([s for s in specs if sum(o["length"] for o in s["objects"]) >= 8 * BLOCK])
    frac = rng.uniform(0.10, 0.70)
    target_bytes = int(frac * sum(o["length"] for o in target["objects"]))
    rec = {"round": index, "kind": lab.server, "started": time.time(), "code": code_digest(), "bytes": total,
           "expected_s": round(expected_s, 3), "kill_target": target["id"], "kill_fraction": round(frac, 3),
           "kill_target_bytes": target_bytes, "connections": []}
    outdir = tempfile.mkdtemp(prefix="soak-")
    curls = []
    try:
        t0 = time.time()
        for s in specs:
            curls.append(Curl(lab, s, outdir, max_time=expected_s * 3 + HUNG_AFTER + 60))
        watcher = Watcher(curls)
        watcher.start()
        tc = curls[target["id"]]
        wait_s = expected_s * 3 + 10
        for _ in range(int(wait_s / 0.002) + 2):  # bounded: to the kill point, or the target's end
            if received(tc) >= target_bytes or tc.poll() or time.time() - t0 > wait_s:
                break
            time.sleep(0.002)
        rec["kill_reached"] = received(tc) >= target_bytes
        in_flight = [c.spec["id"] for c in curls if not c.poll()]
        t_kill = lab.kill_replica("a")
        rec["kill_at_s"] = round(t_kill - t0, 3)
        deadline = t_kill + HUNG_AFTER
        for _ in range(int(HUNG_AFTER / 0.02) + 50):
            done = [c.poll() for c in curls]
            if all(done) or time.time() >= deadline:
                break
            time.sleep(0.02)
        for c in curls:
            if not c.poll():
                c.killed = True
                c.proc.kill()
        watcher.stop.set()
        watcher.join(5)
        for c in curls:
            c.finish()
        rec["all_ended_s"] = round(max((c.ended or time.time()) for c in curls) - t_kill, 3)
        cev = read_events(lab.lab_dir, "client", "ca")
        sev = {r: read_events(lab.lab_dir, "server", r) for r in lab.replicas if r != "a"}
        for c in curls:
            rec["connections"].append(classify(lab, c, t0, t_kill, in_flight, cev, sev))
        if any(c["outcome"] != "intact" for c in rec["connections"]):
            # a bad round: what the takers did after the crash, by kind (events of any connection),
            # and their events that name no client (peer_dead, failed, ...)
            window = [(r, e) for r, evs in sev.items() for e in evs if t_kill <= e.get("t", 0) <= t_kill + HUNG_AFTER]
            kinds = {}
            for r, e in window:
                kinds[f"{r}:{e.get('event')}"] = kinds.get(f"{r}:{e.get('event')}", 0) + 1
            rec["replica_event_kinds_after_crash"] = kinds
            rec["replica_events_no_client"] = [dict(slim(e, t_kill), replica=r) for r, e in window
                                               if "client" not in e and "key" not in e][:EVENT_KEEP]
    finally:
        for c in curls:
            if c.proc.poll() is None:
                c.proc.kill()
                try:
                    c.proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        shutil.rmtree(outdir, ignore_errors=True)
    rec["migrated_events"] = sum(c["migrated"] for c in rec["connections"])
    rec["client_reset_events"] = sum(len(c["client_reset_reasons"]) for c in rec["connections"])
    rec["in_flight_at_crash"] = len(in_flight)
    # revive a, wait for the group to re-form
    t_rev = time.time()
    try:
        lab.revive_replica("a")
        rec["revive_error"] = None
    except (LabError, subprocess.SubprocessError, OSError) as exc:
        rec["revive_error"] = str(exc)[-500:]
    t_up = time.time()
    rec["revive_s"] = round(t_up - t_rev, 3)
    rec["group_reformed"] = bool(wait_for(lambda: group_formed(lab, since=t_up), 20, 0.1))
    rec["group_s"] = round(time.time() - t_up, 3)
    return rec


def classify(lab, c: Curl, t0: float, t_kill: float, in_flight, cev, sev) -> dict:
    spec = c.spec
    ip = lab.ip(spec["node"])
    checks = [check_bytes(lab, out, obj) for out, obj in zip(c.outs, spec["objects"])]
    all_ok = all(ch["sha_ok"] for ch in checks)
    prefix_ok = all(ch["prefix_ok"] for ch in checks)
    ended_after = None if c.ended is None or c.killed else c.ended - t_kill
    if c.killed or c.ended is None:
        outcome, why = "hung", f"still running {HUNG_AFTER:.0f} s after the crash (killed)"
    elif c.rc == 0:
        outcome, why = ("intact", None) if all_ok else ("corrupt", "curl exit 0 with wrong bytes")
    elif not prefix_ok:
        outcome, why = "corrupt", f"curl exit {c.rc} after wrong bytes"
    elif ended_after < 0:
        outcome, why = "early_error", f"curl exit {c.rc} {ended_after:.2f} s before the crash"
    elif ended_after <= RESET_WITHIN:
        outcome, why = "reset", f"curl exit {c.rc} {ended_after:.2f} s after the crash"
    else:
        outcome, why = "hung", f"curl exit {c.rc} {ended_after:.2f} s after the crash (not a prompt reset)"
    mine_c = client_events_for(cev, ip, t0 - 1)
    after_c = [e for e in mine_c if e["t"] >= t_kill]
    migrated = [e for e in after_c if e["event"] == "migrated"]
    resets = [e for e in after_c if e["event"] == "client_reset"]
    transfers = c.transfers()
    rec = {"id": spec["id"], "node": spec["node"], "client": ip, "type": spec["type"],
           "objects": [o["path"] for o in spec["objects"]], "range": spec["range"],
           "outcome": outcome, "why": why, "curl_rc": c.rc,
           "ended_after_crash_s": None if ended_after is None else round(ended_after, 3),
           "in_flight_at_crash": spec["id"] in in_flight,
           "received": [ch["received"] for ch in checks], "expected": [o["length"] for o in spec["objects"]],
           "sha_ok": [ch["sha_ok"] for ch in checks], "first_diff": [ch["first_diff"] for ch in checks],
           "transfers": transfers,
           "reused": (transfers[1]["num_connects"] == 0) if spec["type"] == "pair" and len(transfers) > 1 else None,
           "migrated": len(migrated),
           "failover_ms": round((migrated[0]["t"] - t_kill) * 1000, 1) if migrated else None,
           "taker": replica_of(lab, migrated[0].get("to")) if migrated else None,
           "migrations": [[round((e["t"] - t_kill) * 1000, 1), replica_of(lab, e.get("from")),
                           replica_of(lab, e.get("to"))] for e in migrated],
           "client_reset_reasons": [e.get("reason") for e in resets],
           "stderr": (c.stderr or "").strip()[-300:]}
    # events kept for a bad connection, and for an odd one (reset though intact, in flight at the
    # crash yet never migrated, migrated more than once)
    if outcome != "intact" or resets or (spec["id"] in in_flight) != bool(migrated) or len(migrated) > 1:
        rec["client_events"] = [slim(e, t_kill) for e in mine_c][-EVENT_KEEP:]
        rec["server_events"] = {r: [slim(e, t_kill) for e in server_events_for(evs, ip, t_kill - 1)][-EVENT_KEEP:]
                                for r, evs in sev.items()}
    return rec


# --- the run --------------------------------------------------------------------------------


def round_line(rec: dict, n_rounds: int) -> str:
    counts = {k: sum(1 for c in rec["connections"] if c["outcome"] == k) for k in OUTCOMES}
    objs = " ".join(("+".join(o.replace("/obj-", "") for o in c["objects"]) + ("r" if c["range"] else ""))
                    for c in rec["connections"])
    bad = [f"c{c['id'] + 1}:{c['outcome']}" for c in rec["connections"] if c["outcome"] != "intact"]
    extra = "" if rec.get("group_reformed", True) else "  GROUP NOT RE-FORMED"
    if rec.get("revive_error"):
        extra += "  REVIVE FAILED"
    return (f"  round {rec['round'] + 1:>3}/{n_rounds} {rec['kind']:<8} kill at {rec['kill_at_s']:5.2f} s "
            f"(c{rec['kill_target'] + 1} at {rec['kill_fraction'] * 100:2.0f}%"
            f"{'' if rec.get('kill_reached', True) else ' NOT REACHED'}) in flight "
            f"{rec['in_flight_at_crash']}/{len(rec['connections'])}  intact {counts['intact']} reset {counts['reset']} "
            f"hung {counts['hung']} corrupt {counts['corrupt']}"
            + (f" early {counts['early_error']}" if counts["early_error"] else "")
            + f"  migrated {rec['migrated_events']}  [{objs}]"
            + (f"  BAD {' '.join(bad)}" if bad else "") + extra)


def pct(xs, p):
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, round(p / 100 * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10 rounds (about a minute)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 100, --quick 10)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object "
                                                   "(and the per-round details to PATH with .rounds.json)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    ap.add_argument("--keep-going", action="store_true", default=True,
                    help="a bad round is recorded, not fatal (the default; always on)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="server kinds to draw from (default all three)")
    ap.add_argument("--rate", default="100mbit", help="the replicas' link rate (default 100mbit)")
    ap.add_argument("--round-seconds", type=float, default=4.0,
                    help="a round's expected transfer time at the rate, bounding its bytes (default 4)")
    ap.add_argument("--lab-name", default=f"sk{os.getpid() % 100000}", help="lab name prefix (+ kind initial)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds or any(k not in KINDS for k in kinds):
        print(f"soak: --kinds wants a list of {', '.join(KINDS)}", file=sys.stderr)
        return 2
    n = args.rounds if args.rounds is not None else (10 if args.quick else 100)
    if n < 1:
        print("soak: --rounds must be at least 1", file=sys.stderr)
        return 2
    from appliance.lab import parse_rate
    rate_Bps = parse_rate(args.rate) / 8 * 0.95  # tbf rate less the headers
    started = time.monotonic()
    draw = random.Random(f"{args.seed}:kinds")
    drawn = [draw.choice(kinds) for _ in range(n)]
    order = list(dict.fromkeys(drawn))
    print(f"soak: {n} rounds, seed {args.seed}, kinds drawn { {k: drawn.count(k) for k in order} } "
          f"(labs in order {', '.join(order)}), replica links {args.rate}, {CONNS_PER_ROUND} connections a round",
          flush=True)
    rounds, lab_errors, lab_codes = [], {}, {}
    for kind in order:
        idx = [i for i, k in enumerate(drawn) if k == kind]
        name = f"{args.lab_name}{kind[0]}"
        t_lab = time.monotonic()
        try:
            with Lab(name, clients=CONNS_PER_ROUND, server=kind, client_path="appliance", appliances=True,
                     object_sizes=SIZES, links={r: {"rate": args.rate} for r in "abc"}) as lab:
                if not wait_for(lambda: group_formed(lab), 30, 0.1):
                    lab_errors[kind] = "the support group did not form within 30 s"
                    print(f"  {kind}: the support group did not form; its {len(idx)} rounds not run", flush=True)
                    continue
                lab_codes[kind] = code_digest()
                print(f"  {kind} lab up in {time.monotonic() - t_lab:.1f} s (appliance code {lab_codes[kind]})",
                      flush=True)
                for i in idx:
                    try:
                        rec = run_round(lab, i, args.seed, args, rate_Bps)
                    except (LabError, subprocess.SubprocessError, OSError) as exc:
                        lab_errors[kind] = f"round {i + 1}: {exc}"[-500:]
                        print(f"  round {i + 1:>3}/{n} {kind:<8} could not run: {exc}", flush=True)
                        break
                    rounds.append(rec)
                    print(round_line(rec, n), flush=True)
                    if rec.get("revive_error"):
                        lab_errors[kind] = f"round {i + 1}: revive failed: {rec['revive_error']}"
                        break
        except LabError as exc:
            lab_errors[kind] = str(exc)[-500:]
            print(f"  {kind}: lab failed: {exc}", flush=True)
    seconds = time.monotonic() - started
    if not rounds:
        print("soak: no round could run", file=sys.stderr)
        for k, e in lab_errors.items():
            print(f"  {k}: {e}", file=sys.stderr)
        return 1

    conns = [c for r in rounds for c in r["connections"]]
    res = {"rounds": len(rounds), "rounds_planned": n, "connections": len(conns), "seed": args.seed,
           "rate": args.rate, "seconds": round(seconds, 1)}
    for k in OUTCOMES:
        res[k] = sum(1 for c in conns if c["outcome"] == k)
    res["intact_ratio"] = res["intact"] / len(conns) if conns else 0.0
    fl = [c for c in conns if c["in_flight_at_crash"]]
    res["in_flight_at_crash"] = len(fl)
    res["intact_in_flight"] = sum(1 for c in fl if c["outcome"] == "intact")
    res["intact_in_flight_ratio"] = res["intact_in_flight"] / len(fl) if fl else 0.0
    res["keepalive_pairs"] = sum(1 for c in conns if c["type"] == "pair")
    res["keepalive_pairs_reused"] = sum(1 for c in conns if c["reused"])
    res["range_connections"] = sum(1 for c in conns if c["type"] == "range")
    res["migrated_events"] = sum(r["migrated_events"] for r in rounds)
    res["client_reset_events"] = sum(r["client_reset_events"] for r in rounds)
    # the client appliance reset a connection whose curl had all its bytes (it ended at the crash)
    res["client_reset_on_intact"] = sum(1 for c in conns if c["outcome"] == "intact" and c["client_reset_reasons"])
    res["groups_not_reformed"] = sum(1 for r in rounds if not r["group_reformed"])
    res["lab_errors"] = len(lab_errors)
    codes = sorted(set(lab_codes.values()) | {r["code"] for r in rounds})
    res["code_versions"] = len(codes)  # > 1: the appliance's code changed during the run
    fo = [c["failover_ms"] for c in conns if c["failover_ms"] is not None]
    if fo:
        res.update(failover_p50_ms=statistics.median(fo), failover_p99_ms=pct(fo, 99), failover_max_ms=max(fo))
    res["round_p50_s"] = statistics.median([r["kill_at_s"] + r["all_ended_s"] + r["revive_s"] + r["group_s"]
                                            for r in rounds])
    for kind in order:
        kc = [c for r in rounds if r["kind"] == kind for c in r["connections"]]
        res[f"per_kind_rounds_{kind}"] = sum(1 for r in rounds if r["kind"] == kind)
        res[f"per_kind_connections_{kind}"] = len(kc)
        res[f"per_kind_intact_{kind}"] = sum(1 for c in kc if c["outcome"] == "intact")
        res[f"per_kind_intact_ratio_{kind}"] = (res[f"per_kind_intact_{kind}"] / len(kc)) if kc else 0.0

    print(f"\nsoak: {len(rounds)}/{n} rounds, {len(conns)} connections ({res['in_flight_at_crash']} in flight at "
          f"the crash, {res['keepalive_pairs']} keep-alive pairs, {res['range_connections']} ranges), seed "
          f"{args.seed}, {args.rate} links, {seconds:.0f} s")
    print(f"{'':<14}" + "".join(f"{k:>10}" for k in ("all", *order)))
    for k in OUTCOMES:
        row = [res[k]] + [sum(1 for r in rounds if r["kind"] == kd for c in r["connections"] if c["outcome"] == k)
                          for kd in order]
        print(f"{k:<14}" + "".join(f"{v:>10}" for v in row))
    print(f"{'intact_ratio':<14}{res['intact_ratio']:>10.3f}"
          + "".join(f"{res[f'per_kind_intact_ratio_{kd}']:>10.3f}" for kd in order))
    if fo:
        print(f"failover (crash to the client appliance's 'migrated'): p50 {res['failover_p50_ms']:.0f} ms, "
              f"p99 {res['failover_p99_ms']:.0f} ms, max {res['failover_max_ms']:.0f} ms over {len(fo)} connections")
    bad = [(r, c) for r in rounds for c in r["connections"] if c["outcome"] != "intact"]
    if bad:
        print("\nnot intact:")
        for r, c in bad:
            reasons = ",".join(str(x) for x in c["client_reset_reasons"]) or "no client_reset event"
            print(f"  round {r['round'] + 1} {r['kind']} {c['node']} {'+'.join(c['objects'])}"
                  f"{' -r ' + c['range'] if c['range'] else ''}: {c['outcome']} ({c['why']}); received "
                  f"{c['received']} of {c['expected']}; client appliance: {reasons}; stderr: {c['stderr'][-120:]}")
    quiet = [(r, c) for r in rounds for c in r["connections"] if c["outcome"] == "intact" and c["client_reset_reasons"]]
    if quiet:
        print("\nintact, yet reset by the client appliance after curl had every byte (it ended around the crash):")
        for r, c in quiet:
            reasons = ", ".join(map(str, c["client_reset_reasons"]))
            print(f"  round {r['round'] + 1} {r['kind']} {c['node']} {'+'.join(c['objects'])}: curl ended "
                  f"{c['ended_after_crash_s']:+.3f} s from the crash; client_reset {reasons}")
    if lab_errors:
        print("\nlab problems (not the appliance):")
        for k, e in lab_errors.items():
            print(f"  {k}: {e}")
    if len(codes) > 1:
        print(f"\nnote: the appliance's code changed during the run ({len(codes)} versions: {', '.join(codes)}): "
              "a revived replica ran newer code than its peers; per round in the rounds file ('code')")
    if res["groups_not_reformed"]:
        print(f"  the support group did not re-form within 20 s after {res['groups_not_reformed']} revive(s)")
    print("\ntargets (benchmark, not test):")
    for key, op, target in TARGETS:
        val = res.get(key)
        ok = val is not None and (val == target if op == "==" else val >= target)
        shown = f"{val:.3f}" if isinstance(val, float) else str(val)
        print(f"  {key:<22}{shown:>10}  {op} {target}  {'met' if ok else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, sort_keys=True)
        detail = os.path.splitext(args.json)[0] + ".rounds.json"
        with open(detail, "w") as fh:
            json.dump({"seed": args.seed, "drawn": drawn, "lab_errors": lab_errors, "lab_codes": lab_codes,
                       "rounds": rounds}, fh, indent=1)
        print(f"figures written to {args.json}, rounds to {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
