"""Link element: a userspace two-port bridge that adds delay and loss (the kernel has no netem).

The lab inserts one, in a namespace node of its own (``l<replica>`` or ``lclient``), into a
link that asks for ``delay_ms`` or ``loss``::

    router a0 <-> la:r0 [linkem] la:s0 <-> replica a:eth0

How it works (measured design: ``notes/packet-io.md`` §2.2, §3):

* One plain AF_PACKET socket per port (bound to ETH_P_ALL), used for both receive and send,
  with PACKET_IGNORE_OUTGOING (23) so nothing it sends comes back; non-blocking; one epoll.
* Per direction a FIFO of (due time, frame). A constant delay keeps it time-ordered, so the
  head is always the next frame due; epoll's timeout is set to the earliest head (epoll has
  1 ms granularity: release is accurate to about 1 ms). Delay 0 goes through the same FIFO.
* Loss: each frame is dropped with probability ``loss`` per direction, from a seeded
  ``random.Random`` per direction (runs are reproducible given the same frame sequence).
* Send errors never stop it: ENOBUFS (a qdisc dropped the frame), EMSGSIZE (a frame larger
  than the MTU, e.g. a GSO super-frame) and other errors are counted and the frame dropped;
  EAGAIN (socket send buffer full) keeps the frame at the head and waits for EPOLLOUT.
  Queues are bounded (frames and bytes); overflow is counted as ``queue_drop``.
* Offloads: a plain AF_PACKET socket receives GSO super-frames and partially-checksummed
  frames as-is and cannot send them. The lab therefore turns TSO/GSO/tx-checksum off
  (``ethtool -K IF tx off tso off gso off``) on the two interfaces that face a link element,
  so the kernel segments and checksums in software before frames reach it.
* Counters go to a status file with appliance.statusfile.StatusWriter, role "linkem"
  (``<state-dir>/linkem-<node>.status.json``), every ``--status-interval`` seconds and at exit.
  Per direction (key "<rx port>-><tx port>"): rx, rx_bytes, tx, tx_bytes, lost, queue_drop,
  enobufs, emsgsize, eagain, tx_errors, rx_errors, oversize, queued, late_max_ms, late_avg_ms.

Run: ``python -m appliance.linkem --ports r0 s0 --delay-ms 50 --loss 0.01 --seed 1
--node la --state-dir DIR``. SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import collections
import errno
import os
import random
import select
import signal
import socket
import sys
import time

from .statusfile import StatusWriter

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_IGNORE_OUTGOING = 23
RX_BUF = 256 * 1024  # larger than any GSO super-frame; bigger frames are counted as oversize
DRAIN_BATCH = 256  # frames read per readable event before servicing the queues again


def open_port(ifname: str, sock_buf: int = 4 << 20) -> socket.socket:
    """An AF_PACKET socket bound to `ifname` for every protocol, ignoring its own output."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # protocol 0: receives nothing until bound
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
            try:
                s.setsockopt(socket.SOL_SOCKET, force, sock_buf)
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, plain, sock_buf)
        s.bind((ifname, ETH_P_ALL))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class Direction:
    """Frames received on `rx` wait in a FIFO and leave on `tx` when due."""

    COUNTERS = ("rx", "rx_bytes", "tx", "tx_bytes", "lost", "queue_drop", "enobufs", "emsgsize", "eagain",
                "tx_errors", "rx_errors", "oversize")

    def __init__(self, name, rx, tx, delay_s, loss, rng, max_frames, max_bytes):
        self.name = name
        self.rx = rx
        self.tx = tx
        self.delay = delay_s
        self.loss = loss
        self.rng = rng
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.q = collections.deque()
        self.qbytes = 0
        self.blocked = False  # tx returned EAGAIN: wait for EPOLLOUT
        self.c = dict.fromkeys(self.COUNTERS, 0)
        self.late_max = 0.0
        self.late_sum = 0.0
        self.errors_seen = {}

    def receive(self, frame: bytes, now: float) -> None:
        c = self.c
        c["rx"] += 1
        c["rx_bytes"] += len(frame)
        if self.loss > 0.0 and self.rng.random() < self.loss:
            c["lost"] += 1
            return
        if len(self.q) >= self.max_frames or self.qbytes + len(frame) > self.max_bytes:
            c["queue_drop"] += 1
            return
        self.q.append((now + self.delay, frame))
        self.qbytes += len(frame)

    def release(self, now: float, limit: int = 4096) -> None:
        """Send every frame that is due (at most `limit`), unless the tx socket is full."""
        q = self.q
        c = self.c
        sent = 0
        while q and not self.blocked and sent < limit:
            due, frame = q[0]
            if due > now:
                break
            try:
                self.tx.send(frame)
            except BlockingIOError:
                c["eagain"] += 1
                self.blocked = True
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    c["enobufs"] += 1
                elif exc.errno == errno.EMSGSIZE:
                    c["emsgsize"] += 1
                else:
                    c["tx_errors"] += 1
                    name = errno.errorcode.get(exc.errno, str(exc.errno))
                    self.errors_seen[name] = self.errors_seen.get(name, 0) + 1
            else:
                c["tx"] += 1
                c["tx_bytes"] += len(frame)
                late = now - due
                self.late_sum += late
                if late > self.late_max:
                    self.late_max = late
            q.popleft()
            self.qbytes -= len(frame)
            sent += 1

    def next_due(self):
        if self.q and not self.blocked:
            return self.q[0][0]
        return None

    def snapshot(self) -> dict:
        d = dict(self.c)
        d["queued"] = len(self.q)
        d["queued_bytes"] = self.qbytes
        d["delay_ms"] = self.delay * 1000.0
        d["loss"] = self.loss
        d["late_max_ms"] = round(self.late_max * 1000.0, 3)
        d["late_avg_ms"] = round(self.late_sum * 1000.0 / d["tx"], 3) if d["tx"] else 0.0
        if self.errors_seen:
            d["tx_error_kinds"] = dict(self.errors_seen)
        return d


class LinkElement:
    def __init__(self, port_a, port_b, delay_ms=0.0, loss=0.0, seed=1, delay_ms_b2a=None, loss_b2a=None,
                 max_frames=50000, max_bytes=64 << 20):
        if not 0.0 <= loss <= 1.0 or (loss_b2a is not None and not 0.0 <= loss_b2a <= 1.0):
            raise ValueError("loss must be a probability in [0, 1]")
        if delay_ms < 0 or (delay_ms_b2a is not None and delay_ms_b2a < 0):
            raise ValueError("delay must be >= 0 ms")
        self.ports = (port_a, port_b)
        self.seed = seed
        self.sa = open_port(port_a)
        try:
            self.sb = open_port(port_b)
        except BaseException:
            self.sa.close()
            raise
        d_ba = delay_ms if delay_ms_b2a is None else delay_ms_b2a
        l_ba = loss if loss_b2a is None else loss_b2a
        self.dirs = [
            Direction(f"{port_a}->{port_b}", self.sa, self.sb, delay_ms / 1000.0, loss,
                      random.Random(f"{seed}:a2b"), max_frames, max_bytes),
            Direction(f"{port_b}->{port_a}", self.sb, self.sa, d_ba / 1000.0, l_ba,
                      random.Random(f"{seed}:b2a"), max_frames, max_bytes),
        ]
        self._by_rx = {self.sa.fileno(): self.dirs[0], self.sb.fileno(): self.dirs[1]}
        self._by_tx = {self.sb.fileno(): self.dirs[0], self.sa.fileno(): self.dirs[1]}
        self.ep = select.epoll()
        for fd in self._by_rx:
            self.ep.register(fd, select.EPOLLIN)
        self.buf = bytearray(RX_BUF)
        self.view = memoryview(self.buf)
        self.stop = False
        self.started = time.time()

    def close(self) -> None:
        self.ep.close()
        self.sa.close()
        self.sb.close()

    def _drain(self, d: Direction) -> None:
        sock = d.rx
        buf, view = self.buf, self.view
        for _ in range(DRAIN_BATCH):
            try:
                n = sock.recv_into(buf, RX_BUF, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                d.c["rx_errors"] += 1  # e.g. the interface went away: end this drain, not fatal
                return
            if n > RX_BUF:
                d.c["rx"] += 1
                d.c["oversize"] += 1
                continue
            d.receive(bytes(view[:n]), time.monotonic())

    def _update_epoll(self) -> None:
        for fd, d_rx in self._by_rx.items():
            mask = select.EPOLLIN
            if self._by_tx[fd].blocked:
                mask |= select.EPOLLOUT
            self.ep.modify(fd, mask)

    def snapshot(self, ready=True) -> dict:
        dirs = {d.name: d.snapshot() for d in self.dirs}
        total = {k: sum(v[k] for v in dirs.values()) for k in Direction.COUNTERS}
        return {"role": "linkem", "ready": ready, "pid": os.getpid(), "ports": list(self.ports),
                "seed": self.seed, "started": self.started, "uptime": time.time() - self.started,
                "directions": dirs, "total": total}

    def run(self, status=None, status_interval=0.5, duration=None) -> None:
        """Forward until self.stop is set (signal) or `duration` seconds have passed."""
        t_end = None if duration is None else time.monotonic() + duration
        next_status = 0.0
        was_blocked = False
        while not self.stop:
            now = time.monotonic()
            if t_end is not None and now >= t_end:
                break
            if status is not None and now >= next_status:
                status.status(self.snapshot())
                next_status = now + status_interval
            timeout = min(0.25, next_status - now if status is not None else 0.25)
            if t_end is not None:
                timeout = min(timeout, t_end - now)
            for d in self.dirs:
                due = d.next_due()
                if due is not None:
                    timeout = min(timeout, due - now)
            try:
                events = self.ep.poll(max(timeout, 0.0), 16)
            except InterruptedError:
                events = []
            for fd, ev in events:
                if ev & select.EPOLLOUT:
                    self._by_tx[fd].blocked = False
                if ev & (select.EPOLLIN | select.EPOLLERR):
                    self._drain(self._by_rx[fd])
            now = time.monotonic()
            for d in self.dirs:
                d.release(now)
            blocked = any(d.blocked for d in self.dirs)
            if blocked or was_blocked:
                self._update_epoll()
            was_blocked = blocked
        if status is not None:
            status.status(self.snapshot(ready=False))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.linkem",
                                description="two-port userspace link element: delay and loss")
    p.add_argument("--ports", nargs=2, metavar=("A", "B"), required=True, help="the two interfaces to join")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction (default 0)")
    p.add_argument("--delay-ms-b2a", type=float, help="one-way delay B->A if different")
    p.add_argument("--loss", type=float, default=0.0, help="drop probability per frame, each direction")
    p.add_argument("--loss-b2a", type=float, help="drop probability B->A if different")
    p.add_argument("--seed", default="1", help="random seed for loss (default 1)")
    p.add_argument("--node", default="linkem", help="node name for the status file")
    p.add_argument("--state-dir", help="write linkem-<node>.status.json and events here")
    p.add_argument("--status-interval", type=float, default=0.5)
    p.add_argument("--max-queue-frames", type=int, default=50000)
    p.add_argument("--max-queue-bytes", type=int, default=64 << 20)
    p.add_argument("--duration", type=float, help="exit after this many seconds")
    args = p.parse_args(argv)
    try:
        le = LinkElement(args.ports[0], args.ports[1], args.delay_ms, args.loss, args.seed,
                         delay_ms_b2a=args.delay_ms_b2a, loss_b2a=args.loss_b2a,
                         max_frames=args.max_queue_frames, max_bytes=args.max_queue_bytes)
    except ValueError as exc:
        p.error(str(exc))
    except OSError as exc:
        print(f"linkem: cannot open ports {args.ports}: {exc}", file=sys.stderr)
        return 1

    def _stop(signum, frame):
        le.stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    writer = StatusWriter(args.state_dir, "linkem", args.node) if args.state_dir else None
    if writer is not None:
        writer.event("start", ports=list(args.ports), delay_ms=args.delay_ms, loss=args.loss, seed=args.seed)
    try:
        le.run(writer, args.status_interval, args.duration)
    finally:
        if writer is not None:
            writer.event("stop", **le.snapshot()["total"])
            writer.close()
        le.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
