"""`appliance client`: the client appliance, inline between a client and its network.

Forwards every frame between two ports through the flow table (appliance.bridge), which in
conntrack mode also tags the client SYNs with Migrate-Permitted and keeps every connection's
record in C (bounded: --max-connections, --max-half-open, half-open ones forgotten after
--half-open-timeout); Migrate SYNs and the RSTs that matter reach the shim (appliance.shim).
The shim's timers (the probe, the network lock, MIGRATE-WAIT, resets) and the table's expiry
run on a thread of their own at their deadlines.
Reports through a status file and an event log in the state dir (appliance.statusfile).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import _fastpath as fp

from . import bridge as bridge_mod
from .journal import Journal
from .shim import ClientShim, record_dict
from .statusfile import StatusWriter

STATUS_MAX_CONNECTIONS = 200  # per snapshot, most recent first; the event log has them all
EXPIRE_INTERVAL = 0.02  # seconds between the table's expiry passes (each bounded in work)
TRIM_BURST = 10_000  # new connections in a TRIM_CHECK interval: a burst (a SYN flood)...
TRIM_CHECK = 2.0  # seconds; ... over when an interval sees a tenth of that: memory goes back


def register(sub) -> None:
    p = sub.add_parser("client", help="run the client appliance (inline bridge between two ports)")
    p.add_argument("--client-if", required=True, help="the port facing the client(s)")
    p.add_argument("--net-if", required=True, help="the port facing the network (the router)")
    p.add_argument("--node", default="client", help="this appliance's name in status files")
    p.add_argument("--state-dir", default="/run/appliance", help="where status and event files go")
    p.add_argument("--no-vnet", action="store_true",
                   help="plain frames (needs endpoint offloads off) instead of PACKET_VNET_HDR")
    p.add_argument("--no-tag", action="store_true", help="do not add Migrate-Permitted to client SYNs")
    p.add_argument("--batch", type=int, default=64, help="frames per recvmmsg/sendmmsg")
    p.add_argument("--max-connections", type=int, default=100_000, help="connections the table tracks at most")
    p.add_argument("--max-half-open", type=int, default=10_000,
                   help="connections still in their handshake at most (the oldest are evicted first: a SYN flood "
                        "cannot crowd out established ones)")
    p.add_argument("--half-open-timeout", type=float, default=5.0,
                   help="seconds after which a connection that never completed its handshake is forgotten")
    p.add_argument("--no-journal", action="store_true",
                   help="do not keep <state-dir>/client-<node>.journal (a restart then forgets every connection)")
    p.add_argument("--status-interval", type=float, default=0.5, help="seconds between status snapshots")
    p.add_argument("--control", default=None, metavar="PATH",
                   help="the control socket (default <state-dir>/client-<node>.sock; 'none' for no socket)")
    p.set_defaults(func=run)


def malloc_trim() -> bool:
    """Give the C heap's free pages back to the system (glibc); False where there is none."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


class ClientAppliance:
    """The bridge, the table and the shim, wired together."""

    def __init__(self, client_if: str, net_if: str, vnet: bool = True, tag: bool = True, batch: int = 64,
                 events=None, journal=None, max_connections: int = 100_000, max_half_open: int = 10_000,
                 half_open_timeout: float = 5.0) -> None:
        self.table = fp.FlowTable(capacity=4096, conntrack=True, max_connections=max_connections,
                                  max_half_open=max_half_open, half_open_timeout=half_open_timeout, tag_syns=tag)
        self.shim = ClientShim(self.table)
        self._next_expire = 0.0
        self.events = events
        # every connection's state, so that a restart (clean or SIGKILL) loses none of them
        self.journal = Journal(journal) if journal else None
        if self.journal is not None:
            records = self.journal.load()
            n = self.shim.restore(records.values(), time.monotonic())
            if events is not None:
                events.event("restored", connections=n, journaled=len(records), **self.journal.counters)
        self._lock = threading.Lock()  # both forwarding threads and the timer thread use the shim
        self.bridge = bridge_mod.Bridge(client_if, net_if, self.table, punt=self._punt, vnet=vnet, batch=batch)
        self.shim.caught_up = self.bridge.caught_up
        self.started = time.time()
        self._wake = threading.Event()
        self._armed: float = float("inf")  # the deadline the timer thread sleeps toward
        self._stopping = False
        self._timer_thread = threading.Thread(target=self._run_timers, name="shim-timers", daemon=True)
        self.timer_runs = 0
        self.timer_late_max = 0.0
        self._burst = False
        self._syns_seen, self._next_trim_check = 0, 0.0
        self.trims = 0

    def _punt(self, direction: str, frame: bytearray, vnet_hdr: bytes) -> None:
        partial = bool(vnet_hdr) and bool(vnet_hdr[0] & bridge_mod.VNET_F_NEEDS_CSUM)
        with self._lock:
            actions = self.shim.handle(direction, frame, time.monotonic(), partial)
            self._log_events()
            self._journal()
            d = self.shim.next_deadline()
            wake = d is not None and d < self._armed
        if wake:
            self._wake.set()
        self._send(actions, vnet_hdr)

    def _run_timers(self) -> None:
        """Sleep until the shim's next deadline (woken early when a sooner one appears), run it;
        every EXPIRE_INTERVAL the table's expiry and its events (the journal's records)."""
        while not self._stopping:
            with self._lock:
                d = self.shim.next_deadline()
                self._armed = d if d is not None else float("inf")
            now = time.monotonic()
            if now >= self._next_expire:
                self._next_expire = now + EXPIRE_INTERVAL
                self._expire(now)
            d2 = self._next_expire if d is None else min(d, self._next_expire)
            wait = max(0.0, d2 - time.monotonic())
            if wait > 0 and self._wake.wait(min(wait, 1.0)):
                self._wake.clear()
                continue
            now = time.monotonic()
            with self._lock:
                if d is not None and now >= d:
                    self.timer_runs += 1
                    self.timer_late_max = max(self.timer_late_max, now - d)
                actions = self.shim.handle_timer(now)
                self._log_events()
                self._journal()
            self._send(actions)

    def _send(self, actions, vnet_hdr: bytes = b"") -> None:
        for out_dir, out_frame, keep_vnet in actions:
            # a frame the shim built or fully checksummed leaves nothing for offload to do
            self.bridge.send(out_dir, out_frame, vnet_hdr if keep_vnet and vnet_hdr else bridge_mod.NO_OFFLOAD)

    def _expire(self, now: float) -> None:
        """The engine forgets what timed out; its events become the journal's records. Once a
        burst of new connections (a SYN flood) is over, the C heap's free memory goes back to
        the system (glibc keeps it in its per-thread arenas otherwise)."""
        self.table.expire(now)
        if now >= self._next_trim_check:
            self._next_trim_check = now + TRIM_CHECK
            syns = self.table.stats()["syns"]
            new, self._syns_seen = syns - self._syns_seen, syns
            if new >= TRIM_BURST:
                self._burst = True
            elif self._burst and new < TRIM_BURST // 10:
                self._burst = False
                self.trims += malloc_trim()
        events = self.table.events()
        if self.journal is None or not events:
            return
        with self._lock:
            mine = self.shim.connections
            for kind, rec in events:
                key = rec.key
                if key in mine:
                    continue  # the shim journals its own
                if kind == "forgotten":
                    self.journal.drop(key)
                elif kind == "established":
                    self.journal.put(key, {"kind": "conn", "conn": record_dict(rec)})
                else:  # closed: nothing to restore any more
                    self.journal.drop(key)
            self.journal.flush()

    def _journal(self) -> None:
        """Write what changed (called with the lock held, after each shim call)."""
        changed, gone = self.shim.pop_changes()
        if self.journal is None or not (changed or gone):
            return
        for conn in changed:
            self.journal.put(conn.key, self.shim.export(conn))
        for key in gone:
            self.journal.drop(key)
        self.journal.flush()

    def _log_events(self) -> None:
        for kind, fields in self.shim.pop_events():
            if self.events is not None:
                self.events.event(kind, **fields)

    def start(self) -> None:
        self.bridge.start()
        self._timer_thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._timer_thread.is_alive():
            self._timer_thread.join(2.0)
        self.bridge.close()
        if self.journal is not None:
            self.journal.close()

    def status(self) -> dict:
        """A snapshot (reads only: the timers run on their own thread)."""
        with self._lock:
            conns = self.shim.snapshot(limit=STATUS_MAX_CONNECTIONS)
            total = len(self.shim.connections)
            counters = dict(self.shim.counters)
        return {"ready": True, "role": "client", "build": fp.BUILD, "bridge": self.bridge.stats(),
                "table": self.table.stats(), "shim": counters, "connections": conns,
                "connections_omitted": total - len(conns), "started": self.started,
                "timers": {"runs": self.timer_runs, "late_max_ms": round(self.timer_late_max * 1000, 3)},
                "memory_trims": self.trims,
                "journal": self.journal.snapshot() if self.journal is not None else None}


class _ControlThread:
    """The control socket on an event loop of its own (the appliance itself runs threads)."""

    def __init__(self, path, handlers) -> None:
        import asyncio

        from .control import ControlServer
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, handlers)
        self.thread = threading.Thread(target=self.loop.run_forever, name="control", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    def publish(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.server.publish, event)

    def stop(self) -> None:
        import asyncio
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(3)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(3)


def run(args) -> int:
    if os.geteuid() != 0:
        print("appliance client: needs root (CAP_NET_RAW for AF_PACKET sockets)", file=sys.stderr)
        return 2
    writer = StatusWriter(args.state_dir, "client", args.node)
    try:
        app = ClientAppliance(args.client_if, args.net_if, vnet=not args.no_vnet, tag=not args.no_tag,
                              batch=args.batch, events=writer, max_connections=args.max_connections,
                              max_half_open=args.max_half_open, half_open_timeout=args.half_open_timeout,
                              journal=None if args.no_journal else os.path.join(args.state_dir,
                                                                                f"client-{args.node}.journal"))
    except bridge_mod.PortError as exc:
        print(f"appliance client: {exc.strerror}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a limit out of range: the message names it
        print(f"appliance client: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    control = None
    if args.control != "none":
        from .control import socket_path
        control = _ControlThread(args.control or socket_path(args.state_dir, "client", args.node),
                                 {"status": lambda req: app.status()})
        writer.listeners.append(control.publish)
    app.start()
    writer.event("started", client_if=args.client_if, net_if=args.net_if, forwarder=app.bridge.kind)
    try:
        while True:
            writer.status(app.status())
            if stop.wait(args.status_interval):
                break
    finally:
        if control is not None:
            control.stop()
        app.stop()
        final = app.status()
        final["ready"] = False
        writer.status(final)
        writer.event("stopped")
        writer.close()
    return 0
