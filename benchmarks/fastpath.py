#!/usr/bin/env python3
"""Packets per second of the packet engine against the pure-Python twin, dpkt and scapy.

One generated trace (SYNs with full option sets, data with timestamps, ACKs with SACK
blocks; IPv4 and IPv6) is run through each contestant twice: parse only, and parse +
address rewrite + checksum update. All figures come from the same run, so the ratios
compare like with like. Single-threaded: one core.
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import _fastpath  # noqa: E402
from _fastpath import _common as common  # noqa: E402
from _fastpath import _pyengine  # noqa: E402

try:
    from _fastpath import _cengine
except ImportError:  # pragma: no cover - the benchmark needs the compiled build
    _cengine = None

MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
BATCH = 64  # frames per recvmmsg in the bridge


def make_trace(n_frames: int, n_flows: int, seed: int = 7):
    """A realistic mix: per flow a handshake, then data and ACKs (some with SACK blocks)."""
    rnd = random.Random(seed)
    build = _pyengine.build_tcp
    flows = []
    for i in range(n_flows):
        if i % 5 == 4:  # one flow in five over IPv6
            c, s = f"2001:db8:1::{i + 1:x}", f"2001:db8:2::{i % 7 + 1:x}"
        else:
            c, s = f"10.1.{i // 250}.{i % 250 + 1}", f"10.2.0.{i % 7 + 1}"
        flows.append((c, s, 40000 + i, 80, rnd.getrandbits(32), rnd.getrandbits(32)))
    frames = []
    syn_opts = common.opt_mss(1460) + common.opt_sack_permitted() + common.opt_timestamps(1, 0) + b"\x01" + common.opt_wscale(7)
    payload = bytes(rnd.getrandbits(8) for _ in range(1448))
    while len(frames) < n_frames:
        c, s, cp, sp, cisn, sisn = flows[rnd.randrange(n_flows)]
        ts = rnd.getrandbits(32)
        r = rnd.random()
        if r < 0.06:  # handshake
            frames.append(build(c, s, cp, sp, cisn, 0, common.SYN, 64240, syn_opts, eth_src=MAC_A, eth_dst=MAC_B))
            frames.append(build(s, c, sp, cp, sisn, cisn + 1, common.SYN | common.ACK, 65160, syn_opts,
                                eth_src=MAC_B, eth_dst=MAC_A))
        elif r < 0.62:  # server data with timestamps
            off = rnd.randrange(1 << 20)
            frames.append(build(s, c, sp, cp, (sisn + 1 + off) & 0xFFFFFFFF, cisn + 1, common.ACK | common.PSH, 509,
                                b"\x01\x01" + common.opt_timestamps(ts, ts - 5), payload,
                                eth_src=MAC_B, eth_dst=MAC_A))
        else:  # client ACKs, a third of them with SACK blocks
            ack = (sisn + 1 + rnd.randrange(1 << 20)) & 0xFFFFFFFF
            opts = b"\x01\x01" + common.opt_timestamps(ts, ts - 3)
            if rnd.random() < 0.33:
                opts += b"\x01\x01" + common.opt_sack([(ack + 2896, ack + 5792), (ack + 8688, ack + 10136)])
            frames.append(build(c, s, cp, sp, cisn + 1, ack, common.ACK, 1024, opts, eth_src=MAC_A, eth_dst=MAC_B))
    return frames[:n_frames], flows


def pack_batch(frames):
    buf = bytearray(b"".join(frames))
    offsets, lengths = array.array("I"), array.array("I")
    pos = 0
    for f in frames:
        offsets.append(pos)
        lengths.append(len(f))
        pos += len(f)
    return buf, offsets, lengths


def rewrite_table(engine, flows):
    """Entries that swap each flow between two server addresses, so every pass rewrites."""
    t = engine.FlowTable(capacity=len(flows) * 4)
    for c, s, cp, sp, _, _ in flows:
        alt = s.replace("10.2.0.", "10.3.0.") if ":" not in s else s.replace("2001:db8:2::", "2001:db8:3::")
        t.set(c, cp, s, sp, common.REWRITE, new_dst=alt)
        t.set(c, cp, alt, sp, common.REWRITE, new_dst=s)
        t.set(s, sp, c, cp, common.REWRITE, new_src=alt)
        t.set(alt, sp, c, cp, common.REWRITE, new_src=s)
    return t


def rate(fn, n_per_call: int, min_time: float) -> float:
    """Frames per second of fn(), repeated until min_time has passed (best of the calls' means)."""
    fn()  # warm up
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return calls * n_per_call / elapsed


def syn_flood(n: int, seed: int = 5, slot: int = 128):
    """n client SYNs (Linux's options) with random source ports from 256 client addresses, each in a
    slot with room to grow: (buffer, offsets, lengths, caps)."""
    rnd = random.Random(seed)
    syn_opts = common.opt_mss(1460) + common.opt_sack_permitted() + common.opt_timestamps(1, 0) + b"\x01" + \
        common.opt_wscale(7)
    template = {}
    buf = bytearray(n * slot)
    offsets, lengths, caps = array.array("I"), array.array("I"), array.array("I")
    for i in range(n):
        c = rnd.randrange(256)
        f = template.get(c)
        if f is None:
            f = template[c] = bytearray(_cengine.build_tcp(f"10.7.0.{c}", "10.8.0.1", 1, 80, 0, 0, common.SYN, 64240,
                                                           syn_opts, eth_src=MAC_A, eth_dst=MAC_B))
        g = bytearray(f)
        g[34:36] = rnd.randrange(1024, 65536).to_bytes(2, "big")  # the source port
        g[38:42] = rnd.getrandbits(32).to_bytes(4, "big")  # the ISN
        _cengine.fix_checksums(g)
        buf[i * slot:i * slot + len(g)] = g
        offsets.append(i * slot)
        lengths.append(len(g))
        caps.append(slot)
    return buf, offsets, lengths, caps


def bench_conntrack(n_syns: int, repeats: int) -> dict:
    """Client SYNs tagged and recorded per second (conntrack, OUT, batches of BATCH as the bridge
    hands them over), without eviction and with the half-open bound evicting the oldest."""
    out = {}
    buf, offsets, lengths, caps = syn_flood(n_syns)
    chunks = [(offsets[i:i + BATCH], lengths[i:i + BATCH], caps[i:i + BATCH]) for i in range(0, n_syns, BATCH)]
    verdicts = bytearray(BATCH)
    new_lengths = array.array("I", bytes(4 * BATCH))
    for key, half in (("conntrack_syn_pps", n_syns), ("conntrack_syn_evict_pps", 10_000)):
        best = 0.0
        for _ in range(repeats):
            b = bytearray(buf)
            t = _cengine.FlowTable(conntrack=True, max_connections=max(n_syns, 100_000), max_half_open=half)
            start = time.perf_counter()
            for o, l, c in chunks:
                t.process_batch(b, o, l, verdicts, 1.0, -1, False, common.OUT, c, new_lengths)
            elapsed = time.perf_counter() - start
            s = t.stats()
            assert s["syns_tagged"] == n_syns, s
            best = max(best, n_syns / elapsed)
        out[key] = best
    out["conntrack_syns"] = n_syns
    return out


def bench_fastpath(frames, flows, min_time: float, slow_frames: int):
    results = {}
    buf, offsets, lengths = pack_batch(frames)
    n = len(frames)
    records = bytearray(n * common.RECORD_SIZE)
    verdicts = bytearray(n)
    small = frames[:slow_frames]

    if _cengine is not None:
        cparse = _cengine.parse
        # Batches of 64 frames, as the bridge hands them over from one recvmmsg; the whole
        # trace in one call is reported beside (it streams the trace from memory, out of cache).
        chunks = [(offsets[i:i + BATCH], lengths[i:i + BATCH]) for i in range(0, n, BATCH)]

        def parse_chunks():
            for o, l in chunks:
                _cengine.parse_batch(buf, o, l, records)

        results["parse_batch_pps"] = rate(parse_chunks, n, min_time)
        results["parse_whole_trace_pps"] = rate(lambda: _cengine.parse_batch(buf, offsets, lengths, records), n,
                                                min_time)
        results["parse_single_pps"] = rate(lambda: [cparse(f) for f in frames], n, min_time)
        table = rewrite_table(_cengine, flows)

        def process_chunks():
            for o, l in chunks:
                table.process_batch(buf, o, l, verdicts)

        results["batch_pps"] = rate(process_chunks, n, min_time)
        results["whole_trace_pps"] = rate(lambda: table.process_batch(buf, offsets, lengths, verdicts), n, min_time)
        # The same work on a trace ten times larger than L2: frames come from memory, not cache
        cold_frames, cold_flows = make_trace(n * 10, n_flows=500, seed=11)
        cbuf, coffs, clens = pack_batch(cold_frames)
        ctable = rewrite_table(_cengine, cold_flows)
        cverdicts = bytearray(BATCH)
        cchunks = [(coffs[i:i + BATCH], clens[i:i + BATCH]) for i in range(0, len(cold_frames), BATCH)]

        def process_cold():
            for o, l in cchunks:
                ctable.process_batch(cbuf, o, l, cverdicts)

        results["cold_batch_pps"] = rate(process_cold, len(cold_frames), min_time)
        hits_ok = table.stats()["rewritten"] == table.stats()["frames"]
        single_frames = [bytearray(f) for f in frames]
        classify = rewrite_table(_cengine, flows).classify
        results["single_pps"] = rate(lambda: [classify(f) for f in single_frames], n, min_time)
        results["every_frame_rewritten"] = bool(hits_ok)

    pparse = _pyengine.parse
    results["parse_pure_pps"] = rate(lambda: [pparse(f) for f in small], len(small), min_time)
    pframes = [bytearray(f) for f in small]
    pclassify = rewrite_table(_pyengine, flows).classify
    results["pure_pps"] = rate(lambda: [pclassify(f) for f in pframes], len(small), min_time)

    try:
        import dpkt
    except ImportError:
        dpkt = None
    if dpkt is not None:
        def dpkt_parse():
            for f in small:
                eth = dpkt.ethernet.Ethernet(f)
                dpkt.tcp.parse_opts(eth.data.data.opts)

        def dpkt_rewrite():
            for f in small:
                eth = dpkt.ethernet.Ethernet(f)
                ip = eth.data
                dpkt.tcp.parse_opts(ip.data.opts)
                ip.dst = ip.dst[:-1] + bytes((ip.dst[-1] ^ 1,))
                if isinstance(ip, dpkt.ip.IP):
                    ip.sum = 0
                ip.data.sum = 0
                bytes(eth)

        results["parse_dpkt_pps"] = rate(dpkt_parse, len(small), min_time)
        results["dpkt_pps"] = rate(dpkt_rewrite, len(small), min_time)

    try:
        import logging
        logging.getLogger("scapy.runtime").setLevel(logging.ERROR)
        from scapy.layers.l2 import Ether
        from scapy.layers.inet import IP, TCP
    except ImportError:
        Ether = None
    if Ether is not None:
        tiny = small[: max(50, len(small) // 10)]

        def scapy_parse():
            for f in tiny:
                Ether(f)

        def scapy_rewrite():
            for f in tiny:
                p = Ether(f)
                ip = p.payload
                ip.dst = ip.dst  # touch the field so scapy rebuilds it
                if IP in p:
                    del p[IP].chksum
                del p[TCP].chksum
                bytes(p)

        results["parse_scapy_pps"] = rate(scapy_parse, len(tiny), min_time)
        results["scapy_pps"] = rate(scapy_rewrite, len(tiny), min_time)

    if "batch_pps" in results:
        for key in ("dpkt", "pure", "scapy"):
            if f"{key}_pps" in results:
                results[f"ratio_batch_vs_{key}"] = results["batch_pps"] / results[f"{key}_pps"]
            if f"parse_{key}_pps" in results:
                results[f"parse_ratio_batch_vs_{key}"] = results["parse_batch_pps"] / results[f"parse_{key}_pps"]
        results["ratio_batch_vs_single"] = results["batch_pps"] / results["single_pps"]
    return results


TARGETS = {"batch_pps": 3_000_000, "ratio_batch_vs_dpkt": 40, "ratio_batch_vs_pure": 30}


def print_table(r: dict, n_frames: int) -> None:
    rows = [
        ("compiled, batch", "parse_batch_pps", "batch_pps"),
        ("compiled, single call", "parse_single_pps", "single_pps"),
        ("pure-Python twin", "parse_pure_pps", "pure_pps"),
        ("dpkt", "parse_dpkt_pps", "dpkt_pps"),
        ("scapy", "parse_scapy_pps", "scapy_pps"),
    ]
    base_p, base_r = r.get("parse_batch_pps"), r.get("batch_pps")
    print(f"\nfast path, {n_frames} frames in the trace (in cache), batches of {BATCH}, one core "
          f"(frames/s; x = compiled batch / row)")
    print(f"{'contestant':<24}{'parse only':>14}{'':>9}{'parse+rewrite+csum':>22}{'':>9}")
    for name, pk, rk in rows:
        if pk not in r and rk not in r:
            continue
        p, w = r.get(pk), r.get(rk)
        px = f"x{base_p / p:,.1f}" if base_p and p else ""
        wx = f"x{base_r / w:,.1f}" if base_r and w else ""
        print(f"{name:<24}{p or 0:>14,.0f}{px:>9}{w or 0:>22,.0f}{wx:>9}")
    if "whole_trace_pps" in r:
        print(f"{'compiled, whole trace in one call':<24}{r['parse_whole_trace_pps']:>14,.0f}{'':>9}"
              f"{r['whole_trace_pps']:>22,.0f}")
        print(f"{'compiled, batch, cold':<24}{'':>14}{'':>9}{r['cold_batch_pps']:>22,.0f}"
              f"   (a trace 10x larger, out of cache)")
    if "conntrack_syn_pps" in r:
        print(f"\nconnection tracking: {r['conntrack_syns']:,} client SYNs (random source ports), tagged and "
              f"recorded, batches of {BATCH}")
        print(f"  {'no eviction':<36}{r['conntrack_syn_pps']:>14,.0f} SYNs/s")
        print(f"  {'half-open bound 10,000, evicting':<36}{r['conntrack_syn_evict_pps']:>14,.0f} SYNs/s")
    print("\ntargets (benchmark, not test):")
    for key, target in TARGETS.items():
        val = r.get(key)
        verdict = "n/a" if val is None else ("met" if val >= target else "MISSED")
        print(f"  {key:<24} {val if val is None else f'{val:,.1f}':>14}  >= {target:,}  {verdict}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a run under a minute")
    ap.add_argument("--json", metavar="PATH", help="write the figures as one flat JSON object")
    ap.add_argument("--frames", type=int, default=None, help="frames in the trace")
    args = ap.parse_args(argv)
    n_frames = args.frames or 2_000  # ~1.4 MB: in cache, as the bridge's just-received batches are
    n_syns = 100_000 if args.quick else 300_000
    min_time = 1.0 if args.quick else 3.0
    slow_frames = 2_000 if args.quick else 5_000
    frames, flows = make_trace(n_frames, n_flows=500)
    if _cengine is None:
        print("warning: the compiled build is not installed; only slow contestants run", file=sys.stderr)
    results = bench_fastpath(frames, flows, min_time, slow_frames)
    if _cengine is not None:
        results.update(bench_conntrack(n_syns, 2 if args.quick else 3))
    results["frames_in_trace"] = n_frames
    results["loaded_build"] = _fastpath.BUILD
    print_table(results, n_frames)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, sort_keys=True)
        print(f"\nfigures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
