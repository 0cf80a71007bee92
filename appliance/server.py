"""`appliance server`: the server appliance, first form: tap -> stream mapper -> status files.

    appliance server --iface eth0 --port 80 [--port 8080 ...] --node NAME --state-dir DIR
                     [--pcap-out FILE] [--status-interval 0.5] [--snaplen 4096]
                     [--buffer-mb 32] [--idle-timeout 300]

One process, one plain loop: select() on the capture's fd (and on a signal wake-up pipe),
read the frames the kernel's BPF filter admitted (appliance.tap), feed them to the
sans-I/O stream mapper (appliance.streammap) with their capture timestamps, and report
through appliance.statusfile.StatusWriter(DIR, "server", NODE):

* events (<DIR>/server-NODE.events.jsonl): one line per mapper event, "event" being
  conn_open, request, response_start or conn_close, with the event's JSON fields
  (Event.to_dict(): the connection's identity, and Ni/Na/options, the request, the
  response with its body start seq and validators, or how it closed);
* status (<DIR>/server-NODE.status.json), written as soon as the capture is active and then
  every --status-interval seconds: {"ready": true, "node", "iface", "ports", "pid",
  "tap": capture counters (received, dropped, ifdropped, frames, bytes, truncated, ...),
  "mapper": mapper counters (frames, malformed by kind, connections, ...),
  "connections": [Connection.to_dict() of each live or recently closed connection, at most
  --status-max-connections of them, the most recently seen], "connections_omitted": n}.
  "mapper" also has "errors": frames the mapper raised on (a bug; the first traceback goes
  to stderr, and the loop carries on).

SIGTERM and SIGINT stop the loop; the frames still in the ring are read, a last status is
written with "ready": false and "stopped": true, and the exit status is 0.
A missing interface or missing privilege (or any other failure to open the capture) prints
one line naming it on stderr, writes {"ready": false, "error": ...} and exits with status 2.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
import traceback

from .statusfile import StatusWriter

PROG = "appliance server"


def register(subparsers) -> None:
    p = subparsers.add_parser("server", help="run the server appliance (passive tap + stream mapper)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, metavar="FILE",
                   help="the appliance's TOML config (docs/support-group.md): with it the appliance also "
                        "joins its support group (sync, health, selection); without it, it only maps streams")
    p.add_argument("--iface", default=None, help="interface to capture on (the replica's own; or service.iface)")
    p.add_argument("--port", type=int, action="append", dest="ports", metavar="PORT",
                   help="service port (repeatable; default service.ports, else 80)")
    p.add_argument("--node", default=None, help="this replica's name (default node.id)")
    p.add_argument("--state-dir", required=True, help="where status and event files go")
    p.add_argument("--pcap-out", default=None, help="also write every captured frame to this pcap file")
    p.add_argument("--status-interval", type=float, default=0.5, help="seconds between status snapshots")
    p.add_argument("--control", default=None, metavar="PATH",
                   help="the control socket (default <state-dir>/server-<node>.sock; 'none' for no socket)")
    p.add_argument("--events", choices=EVENT_SETS, default="responses",
                   help="which mapper events go to the event log: all (conn_open, request, response_start, "
                        "conn_close), responses (response_start, which carries the request and the handshake, "
                        "and conn_close: the default, half the cost per request), or none")
    p.add_argument("--nice", type=int, default=-10,
                   help="scheduling priority (default -10: the failure detector's heartbeats go out on time "
                        "even when the replica's CPUs are busy with transfers)")
    p.add_argument("--sched", choices=("normal", "batch"), default="normal",
                   help="batch: SCHED_BATCH (no wake-up preemption of the replica's server); measured no "
                        "better than normal in the wedge benchmark")
    p.add_argument("--capture", choices=("pcap", "socket"), default="pcap",
                   help="pcap (default): a pcapy-ng TPACKET_V3 ring (see --capture-timeout-ms); socket: the "
                        "same libpcap-compiled filter on a plain AF_PACKET socket, woken per admitted frame "
                        "with no timer (measured no cheaper for the replica: 10 MB responses x1.20-1.46 "
                        "against x1.08-1.29 for the ring at 10 ms)")
    p.add_argument("--capture-timeout-ms", type=int, default=10,
                   help="how long the kernel may hold captured frames before waking the tap: TPACKET_V3 "
                        "retires ring blocks on a timer of this period, and at 1 ms that timer alone cost "
                        "bulk transfers on the replica about 15%%; at 10 ms the cost is lost in the noise "
                        "and a response head is seen at most 10 ms late")
    p.add_argument("--snaplen", type=int, default=4096, help="bytes captured per frame")
    p.add_argument("--buffer-mb", type=int, default=32, help="capture ring size in MiB")
    p.add_argument("--idle-timeout", type=float, default=300.0, help="forget connections idle this long (s)")
    p.add_argument("--status-max-connections", type=int, default=200,
                   help="at most this many connections (the most recently seen) in each status snapshot")
    p.set_defaults(func=run)


FDS_PER_CONNECTION = 6  # a taken-over connection: its repaired socket, the local one, two pipes


def raise_nofile(capacity: int, base: int = 1024) -> str:
    """Raise RLIMIT_NOFILE to what `capacity` connections need; the problem ("" if none)."""
    import resource
    need = base + FDS_PER_CONNECTION * capacity
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return ""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need) if hard != resource.RLIM_INFINITY
                                                    else hard))
    except (ValueError, OSError):
        return (f"RLIMIT_NOFILE: node.capacity = {capacity} needs {need} open files, the hard limit is {hard} "
                "and cannot be raised here (raise it: ulimit -Hn, or LimitNOFILE= in the systemd unit; or lower "
                "node.capacity)")
    return ""


DRAIN_BUDGET = 0.005  # seconds of mapping per turn of the loop
DRAIN_BATCH = 128


def _fail(message: str, writer=None, **fields) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    if writer is not None:
        try:
            writer.status({"ready": False, "error": message, "pid": os.getpid(), **fields})
        except OSError:
            pass
    return 2


def run(args) -> int:
    # Imported here so that `appliance --help` works without pcapy/httptools.
    from .streammap import StreamMapper
    from .tap import SocketTap, Tap, TapError

    config = None
    if args.config:
        from .config import ConfigError, load
        try:
            config = load(args.config)
        except ConfigError as exc:
            return _fail(str(exc))
        args.iface = args.iface or config.service.iface
        args.ports = args.ports or list(config.service.ports)
        args.node = args.node or config.node.id
    if not args.iface:
        return _fail("--iface is required (or service.iface in --config)")
    if not args.node:
        return _fail("--node is required (or node.id in --config)")
    args.group_config = config
    ports = sorted(set(args.ports or [80]))
    for p in ports:
        if not 1 <= p <= 65535:
            return _fail(f"not a TCP port: {p}")
    if args.status_interval <= 0:
        return _fail("--status-interval must be positive")
    if config is not None:
        problem = raise_nofile(config.node.capacity)
        if problem:
            return _fail(problem)
    if args.sched == "batch":
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    if args.nice:
        try:  # heartbeats must not wait behind the replica's bulk transfers (false suspicions)
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError:
            pass
    try:
        writer = StatusWriter(args.state_dir, "server", args.node)
    except OSError as exc:
        return _fail(f"cannot write to state dir {args.state_dir}: {exc.strerror or exc}")
    ident = {"role": "server", "node": args.node, "iface": args.iface, "ports": ports}
    try:
        try:
            if args.capture == "socket":
                tap = SocketTap(args.iface, ports, snaplen=args.snaplen, buffer_size=args.buffer_mb << 20,
                                pcap_out=args.pcap_out)
            else:
                tap = Tap(args.iface, ports, snaplen=args.snaplen, buffer_size=args.buffer_mb << 20,
                          timeout_ms=args.capture_timeout_ms, pcap_out=args.pcap_out)
        except TapError as exc:
            return _fail(str(exc), writer, **ident)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot capture on {args.iface}: {exc}", writer, **ident)
        mapper = StreamMapper(service_ports=ports, idle_timeout=args.idle_timeout)
        try:
            return _loop(args, tap, mapper, writer, ident)
        finally:
            tap.close()
    finally:
        writer.close()


EVENT_SETS = {"all": None, "responses": frozenset({"response_start", "conn_close"}), "none": frozenset()}


def _snapshot(tap, mapper, ident: dict, started: float, limit: int, errors: int, ready: bool = True,
              include_closed: bool = False, **extra) -> dict:
    """Counters and connections. Periodic snapshots carry only open connections (closed ones
    are in the event log, and re-encoding hundreds of them every interval cost the tap more
    CPU per request than the mapper); the final one adds the recently closed."""
    conns = mapper.connections() if include_closed else mapper.open_connections()
    shown = sorted(conns, key=lambda c: c.last_seen)[-limit:] if len(conns) > limit else conns
    counters = mapper.counters()
    counters["errors"] = errors
    return {"ready": ready, **ident, "pid": os.getpid(), "started": started, "time": time.time(),
            "link": tap.datalink, "tap": tap.stats(), "mapper": counters,
            "connections": [c.to_dict() for c in shown], "connections_omitted": len(conns) - len(shown),
            **extra}


def _loop(args, tap, mapper, writer, ident: dict) -> int:
    return asyncio.run(_amain(args, tap, mapper, writer, ident))


class _SyncProtocol(asyncio.DatagramProtocol):
    """The support group's UDP socket: every datagram goes to the group node."""

    def __init__(self, group, membership) -> None:
        self.group, self.membership = group, membership
        self.errors = 0

    def datagram_received(self, data: bytes, addr) -> None:
        sender = self.group.receive(data, time.monotonic())
        if sender is not None:
            self.membership.heard(sender, addr)

    def error_received(self, exc) -> None:  # e.g. ICMP port unreachable from a dead peer
        self.errors += 1


async def _amain(args, tap, mapper, writer, ident: dict) -> int:
    """One asyncio loop: the tap's frames, the sync socket, zeroconf and the group's timers."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    got = []

    def on_signal(sig):
        got.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    started = time.time()
    from .gcwatch import GcWatch
    gcwatch = GcWatch()
    drain_deferred = [0]
    errors = [0]
    limit = max(0, args.status_max_connections)
    wanted = EVENT_SETS[args.events]
    config = args.group_config
    group = membership = transport = proto = engine = digests = mapjournal = None
    welcome = [False]  # send every page at once (a peer we just learned of, or that restarted)
    advertised = {}  # key -> conn id: what this node advertises to its group
    validators = config.takeover.validators if config is not None else "strict"

    def digest_of(req, resp):
        """The sha-256 of the object a response carries: its server said it, or the docroot's."""
        from .digests import response_digest
        d = response_digest({n: v for n, v in resp.headers}, resp.status or 0, method=req.method)
        if d is None and digests is not None:
            d = digests.lookup(req.target)
        return d

    def owned(entry, rcv_nxt, snd_nxt) -> None:
        conn = mapper.adopt(entry, rcv_nxt, snd_nxt, time.time())
        _advertise_conn(conn)

    def released(entry) -> None:
        if advertised.pop(entry.key, None):
            group.local_remove(entry.key, time.monotonic())
            if mapjournal is not None:
                mapjournal.drop(entry.key)

    if config is not None:
        from .group import GroupNode
        from .membership import Membership

        group = GroupNode(config, epoch=time.time_ns() // 1000, now=time.monotonic())
        def membership_event(kind, fields) -> None:
            writer.event(kind, **fields)
            if kind in ("peer_learned", "peer_discovered"):
                welcome[0] = True  # a new target: it needs our whole state, not just what changes from now

        membership = Membership(config.node.id, config.node.group, config.sync.port, config.node.prefixes,
                                config.sync.peers, config.sync.zeroconf, config.sync.zeroconf_interfaces,
                                on_event=membership_event)
        try:
            transport, proto = await loop.create_datagram_endpoint(
                lambda: _SyncProtocol(group, membership), local_addr=(config.sync.bind, config.sync.port))
        except OSError as exc:
            return _fail(f"cannot bind the sync socket {config.sync.bind}:{config.sync.port}: {exc.strerror}",
                         writer, **ident)
        from .takeover import TakeoverEngine, TakeoverError, interface_ipv4

        if config.service.docroot:
            from .digests import DigestCache
            digests = DigestCache(config.service.docroot)
            digests.start()
        try:
            local_ip = interface_ipv4(args.iface)
            # a connection taken over is this node's to advertise (so that it can move on
            # again): its stream mapper adopts it, and sees every later request on it
            engine = TakeoverEngine(local_ip, ident["ports"], ident["ports"][0],
                                    on_event=lambda kind, **f: writer.event(kind, **f),
                                    validators=config.takeover.validators,
                                    digest_of=digests.lookup if digests is not None else None,
                                    on_claim=lambda a: group.claim_action(a, time.monotonic()),
                                    on_pass=lambda a: group.pass_action(a, time.monotonic()),
                                    on_owned=owned, on_released=released,
                                    retry_alive=lambda a: group.peer_state(a.dead_node) == "dead"
                                    and a.dead_node not in group.draining_peers)
        except (OSError, ValueError, TakeoverError) as exc:
            return _fail(f"cannot start the takeover engine on {args.iface}: {exc}", writer, **ident)
        engine.attach(loop)
        from .persist import StreamMapJournal
        mapjournal = StreamMapJournal(os.path.join(args.state_dir, f"server-{args.node}.journal"))

    def take(entry, planned: bool = False) -> bool:
        return engine.start(entry, planned=planned)

    def log(events) -> None:
        for ev in events:
            if wanted is None or ev.kind in wanted:
                writer.event(ev.kind, **ev.to_dict())
            if group is not None:
                _advertise(ev)

    def _advertise(ev) -> None:
        """Keep the group's copy of this node's stream map current: every connection from
        its handshake on (so that a crash at any point is acted on), until it closes."""
        if ev.kind == "conn_close":
            key = _conn_key(ev.conn)
            if advertised.pop(key, None):
                group.local_remove(key, time.monotonic())
            group.forget_disowned(key)
            if mapjournal is not None:
                mapjournal.drop(key)
        else:
            _advertise_conn(ev.conn)

    def _advertise_conn(conn) -> None:
        from .sync import entry_from_connection

        now = time.monotonic()
        entry = entry_from_connection(conn, validators, digest_of)
        if entry is not None:
            if group.local_add(entry, now):  # False: taken over elsewhere (disowned)
                advertised[entry.key] = True
                if mapjournal is not None:
                    mapjournal.note(conn, entry)
        else:
            key = _conn_key(conn)
            if advertised.pop(key, None):
                group.local_remove(key, now)
                if mapjournal is not None:
                    mapjournal.drop(key)

    def _destroy_local(key) -> None:
        """Another replica continues this connection: the local socket must go now (its
        server would otherwise retransmit into the void for minutes)."""
        try:
            from .sockdiag import destroy
            local = _key_fields(key)
            ok = destroy((local["server"], local["server_port"]), (local["client"], local["client_port"]))
            writer.event("socket_destroyed", **local, existed=bool(ok))
        except Exception as exc:  # noqa: BLE001  no sock_diag here: the client appliance's RST frees it later
            writer.event("socket_destroy_failed", **_key_fields(key), reason=str(exc))

    def snapshot(**extra) -> dict:
        snap = _snapshot(tap, mapper, ident, started, limit, errors[0], drain_deferred=drain_deferred[0],
                         gc=gcwatch.snapshot(), **extra)
        if group is not None:
            snap["group"] = group.snapshot(time.monotonic())
            snap["membership"] = membership.snapshot()
            snap["sync_socket_errors"] = proto.errors
            snap["takeover"] = engine.snapshot()
            snap["advertised"] = [[_ip_text(k[0]), k[1], _ip_text(k[2]), k[3]]
                                  for k in list(group.sync.local_entries())[:limit]]
            if digests is not None:
                snap["digests"] = digests.snapshot()
            snap["address"] = engine.local_ip
        return snap

    def drain() -> None:
        """Map what the tap captured, for at most DRAIN_BUDGET seconds at a time: the rest
        waits for the next round of the loop (the tap's descriptor stays readable), so that
        heartbeats and takeovers never wait behind a burst of new connections."""
        end = time.monotonic() + DRAIN_BUDGET
        while True:
            frames = tap.read(DRAIN_BATCH)
            for ts, data, wire_len in frames:
                try:
                    log(mapper.handle_frame(data, ts, tap.link, wire_len))
                except Exception:  # a bug must not take the tap down (frames would go unmapped): count, report the first
                    errors[0] += 1
                    if errors[0] == 1:
                        traceback.print_exc(file=sys.stderr)
            if len(frames) < DRAIN_BATCH:
                return
            if time.monotonic() >= end:
                drain_deferred[0] += 1
                loop.call_soon(drain)  # the ring may not wake us again by itself (TPACKET_V3)
                return

    def group_tick() -> None:
        now = time.monotonic()
        datagrams = group.tick(now)
        if welcome[0]:
            welcome[0] = False
            datagrams = datagrams + [d for _, d in group.sync.refresh_datagrams(now)]
        if datagrams:
            targets = membership.targets()
            for d in datagrams:
                for addr in targets:
                    transport.sendto(d, addr)
        for fields in gcwatch.pop_slow():
            writer.event("gc_pause", **fields)
        for kind, fields in group.pop_events():
            writer.event(kind, **fields)
            if kind in ("peer_new", "peer_restarted"):
                welcome[0] = True
        for key in group.pop_disowned():
            advertised.pop(key, None)
            _destroy_local(key)
        for key, peer in group.pop_revoked():
            # the peer lives after all: a takeover still in its handshake must not take its connection
            t = engine.active_phase(key)
            if t == "checking" or t == "handshake" or t == "queued":
                engine.abort(key, f"{peer} is alive after all")
        for action in group.pop_actions():
            writer.event("takeover", dead=action.dead_node, rank=action.rank, key=_key_fields(action.key),
                         path=getattr(action.entry.object, "path", None), last=action.last,
                         state=action.entry.state)
            # a draining peer is alive: if this node cannot serve one of its connections
            # after all, the connection stays with it (a Migrate RST without P)
            engine.start(action, planned=action.dead_node in group.draining_peers)

    control = None
    if args.control != "none":
        from .control import ControlServer, socket_path

        path = args.control or socket_path(args.state_dir, "server", args.node)
        handlers = {"status": lambda req: snapshot()}
        if group is not None:
            handlers["migrate"] = lambda req: _ctl_migrate(req)
            handlers["drain"] = lambda req: _ctl_drain(req)
        control = ControlServer(path, handlers)
        await control.start()
        writer.listeners.append(control.publish)
    def _ctl_migrate(req: dict) -> dict:
        """Take a connection over from whichever peer holds it (planned migration)."""
        from .control import ControlError
        conn = str(req.get("conn", ""))
        ip, _, port = conn.rpartition(":")
        try:
            want = (fp_pack(ip.strip("[]")), int(port))
        except (ValueError, OSError):
            raise ControlError(f"conn: want CLIENT_IP:PORT, not {conn!r}") from None
        for key in group.sync.local_entries():
            if key[:2] == want:
                return {"result": "already here"}
        for peer in group.sync.peers():
            for key, entry in group.sync.peer_entries(peer).items():
                if key[:2] == want:
                    if not take(entry, planned=True):
                        raise ControlError(f"cannot take {conn} over now (see the event log)")
                    return {"result": "started", "from": peer}
        raise ControlError(f"no connection {conn} in the support group's tables")

    async def _ctl_drain(req: dict) -> dict:
        """Hand every connection to the group, wait until none is left (or the timeout)."""
        if req.get("off"):
            group.drain(False)
            return {"draining": False}
        before = group.sync.local_count
        group.drain(True)
        deadline = time.monotonic() + float(req.get("timeout", 30.0))
        while group.sync.local_count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        left = group.sync.local_count
        return {"draining": True, "moved": before - left, "left": left}

    if mapjournal is not None:
        # the stream map of a previous run of this appliance: what still exists is ours again
        try:
            from . import sockdiag
            restored = mapjournal.reconcile(sockdiag.find)
        except OSError as exc:
            restored = []
            writer.event("restore_failed", reason=str(exc))
        for r in restored:
            conn = mapper.adopt(r.entry, r.rcv, r.snd, time.time())
            conn.rcv_base, conn.snd_base = r.rcv_base, r.snd_base
            _advertise_conn(conn)
        writer.event("restored", connections=len(restored), reset=sum(1 for r in restored if r.why),
                     **mapjournal.counters)
    loop.add_reader(tap.fileno(), drain)
    try:
        if membership is not None:
            await membership.start()
        writer.status(snapshot())  # the capture is active: ready
        interval = args.status_interval
        next_status = time.monotonic() + interval
        next_drain = time.monotonic()
        tick = config.sync.heartbeat / 4 if config is not None else 0.25
        while not stop.is_set():
            now = time.monotonic()
            if group is not None:
                group_tick()
            if now >= next_drain:  # a retired ring block may not wake the reader
                drain()
                next_drain = now + 0.25
            if now >= next_status:
                log(mapper.expire(time.time()))
                writer.status(snapshot())
                next_status = now + interval
            try:
                await asyncio.wait_for(stop.wait(), tick)
            except asyncio.TimeoutError:
                pass
        drain()
        sig = signal.Signals(got[0]).name if got else None
        writer.status(snapshot(ready=False, stopped=True, signal=sig, include_closed=True))
        return 0
    finally:
        loop.remove_reader(tap.fileno())
        if engine is not None:
            await engine.aclose()
        if digests is not None:
            digests.stop()
        if control is not None:
            await control.stop()
        if membership is not None:
            await membership.stop()
        if transport is not None:
            transport.close()


def fp_pack(ip):
    import _fastpath
    return _fastpath.pack_address(ip) if ip else b""


def _ip_text(packed: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _conn_key(conn) -> tuple:
    return (conn.client, conn.client_port, conn.server, conn.server_port)


def _key_fields(key) -> dict:
    cip, cport, sip, sport = key
    fam = socket.AF_INET if len(cip) == 4 else socket.AF_INET6
    return {"client": socket.inet_ntop(fam, cip), "client_port": cport, "server": socket.inet_ntop(fam, sip),
            "server_port": sport}
