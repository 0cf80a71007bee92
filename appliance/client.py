"""`appliance client`: the client appliance, inline between a client and its network.

Forwards every frame between two ports through the flow table (appliance.bridge); SYNs
and RSTs reach the shim (appliance.shim), which tags client SYNs with Migrate-Permitted
and keeps the per-connection state a takeover needs. Reports through a status file and
an event log in the state dir (appliance.statusfile).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import _fastpath as fp

from . import bridge as bridge_mod
from .shim import IN, OUT, ClientShim
from .statusfile import StatusWriter

STATUS_MAX_CONNECTIONS = 200  # per snapshot, most recent first; the event log has them all


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
    p.add_argument("--status-interval", type=float, default=0.5, help="seconds between status snapshots")
    p.add_argument("--control", default=None, metavar="PATH",
                   help="the control socket (default <state-dir>/client-<node>.sock; 'none' for no socket)")
    p.set_defaults(func=run)


class ClientAppliance:
    """The bridge, the table and the shim, wired together."""

    def __init__(self, client_if: str, net_if: str, vnet: bool = True, tag: bool = True, batch: int = 64,
                 events=None) -> None:
        self.table = fp.FlowTable(capacity=4096, default_punt=fp.SYN)
        self.shim = ClientShim(self.table, tag_syns=tag)
        self.events = events
        self._lock = threading.Lock()  # both forwarding threads may punt at once
        self.bridge = bridge_mod.Bridge(client_if, net_if, self.table, punt=self._punt, vnet=vnet, batch=batch)
        self.started = time.time()

    def _punt(self, direction: str, frame: bytearray, vnet_hdr: bytes) -> None:
        partial = bool(vnet_hdr) and bool(vnet_hdr[0] & bridge_mod.VNET_F_NEEDS_CSUM)
        with self._lock:
            actions = self.shim.handle(direction, frame, time.monotonic(), partial)
            self._log_events()
        self._send(actions, vnet_hdr)

    def _send(self, actions, vnet_hdr: bytes = b"") -> None:
        for out_dir, out_frame, keep_vnet in actions:
            # a frame the shim built or fully checksummed leaves nothing for offload to do
            self.bridge.send(out_dir, out_frame, vnet_hdr if keep_vnet and vnet_hdr else bridge_mod.NO_OFFLOAD)

    def _log_events(self) -> None:
        for kind, fields in self.shim.pop_events():
            if self.events is not None:
                self.events.event(kind, **fields)

    def start(self) -> None:
        self.bridge.start()

    def stop(self) -> None:
        self.bridge.close()

    def status(self) -> dict:
        with self._lock:
            actions = self.shim.tick(time.monotonic())
            self._log_events()
        self._send(actions)
        with self._lock:
            conns = self.shim.snapshot(limit=STATUS_MAX_CONNECTIONS)
            total = len(self.shim.connections)
            counters = dict(self.shim.counters)
        return {"ready": True, "role": "client", "build": fp.BUILD, "bridge": self.bridge.stats(),
                "table": self.table.stats(), "shim": counters, "connections": conns,
                "connections_omitted": total - len(conns), "started": self.started}


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
                              batch=args.batch, events=writer)
    except bridge_mod.PortError as exc:
        print(f"appliance client: {exc.strerror}", file=sys.stderr)
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
