"""A SYN flood from one lab node: many TCP SYNs to one server, random source ports and ISNs.

A lab tool (a client's network flooding the client appliance), run inside a client node::

    python -m appliance.synflood --src 10.70.0.2 --dst 10.70.1.2 --dport 80 -n 300000 \\
        [--rate 25000] [--seconds 30] [--progress PATH]

The SYNs leave by a raw IP socket (the kernel routes them and adds the Ethernet header),
each a valid segment (checksummed, MSS, SACK-permitted, window scale and timestamps, as
Linux sends them), so the client appliance tracks each one as a half-open connection. The
local kernel never sees them as its own: the server's SYN/ACKs are answered with RSTs,
as for any flood with a spoofed port. `--rate` paces them (SYNs per second; 0: as fast as
this process can). Ends after -n SYNs or --seconds, whichever first;
prints one JSON line {"sent", "errors", "seconds"}; `--progress` is rewritten (atomically)
every 10,000 SYNs with the count so far.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import _fastpath as fp

from .inject import RawInjector

BATCH = 10_000  # SYNs built at a time
PACE = 500  # SYNs sent between looks at the clock when paced


def syns(src: str, dst: str, dport: int, n: int, rnd: random.Random) -> list:
    """n SYNs from random ports >= 1024 with random ISNs and a Linux-like option set."""
    out = []
    for _ in range(n):
        opts = (fp.opt_mss(1460) + fp.opt_sack_permitted() + fp.opt_timestamps(rnd.getrandbits(32), 0)
                + b"\x01" + fp.opt_wscale(7))
        out.append(fp.build_tcp(src, dst, rnd.randrange(1024, 65536), dport, rnd.getrandbits(32), 0, fp.SYN,
                                64240, opts))
    return out


def _write_progress(path: str, sent: int) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"sent": sent, "time": time.time()}, f)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.synflood", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="the source address (this node's)")
    p.add_argument("--dst", required=True)
    p.add_argument("--dport", type=int, default=80)
    p.add_argument("-n", type=int, default=300_000)
    p.add_argument("--rate", type=float, default=0.0, help="SYNs per second (0: as fast as possible)")
    p.add_argument("--seconds", type=float, default=60.0, help="stop after this long whatever the count")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--progress", default=None)
    args = p.parse_args(argv)
    if args.n < 0 or not 0 < args.dport < 65536 or args.seconds <= 0 or args.rate < 0:
        print("synflood: -n must be >= 0, --dport 1..65535, --seconds > 0, --rate >= 0", file=sys.stderr)
        return 2
    rnd = random.Random(args.seed)
    inj = RawInjector()
    sent = errors = 0
    start = time.monotonic()
    try:
        while sent + errors < args.n and time.monotonic() - start < args.seconds:
            for i, pkt in enumerate(syns(args.src, args.dst, args.dport, min(BATCH, args.n - sent - errors), rnd)):
                if args.rate and i % PACE == 0:
                    ahead = (sent + errors) / args.rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
                if inj.send(pkt):
                    sent += 1
                else:
                    errors += 1  # e.g. ENOBUFS from a full queue: counted, the flood goes on
            if args.progress:
                _write_progress(args.progress, sent)
    finally:
        inj.close()
    print(json.dumps({"sent": sent, "errors": errors, "seconds": round(time.monotonic() - start, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
