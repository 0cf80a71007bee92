"""The client appliance's protocol core, sans-I/O: frames and `now` in, frames to send out.

The shim gives an unmodified client kernel the Migrate options (docs/failsafe.md; the
draft's processing rules):

* The fast path's flow table (conntrack mode, in C) tags the client's SYNs with
  Migrate-Permitted, records both SYNs' options, finds connections by their Migrate Token,
  bounds and expires half-open ones, and tracks for every frame with a valid checksum the
  latest ack, window, TSval and SACK blocks in each direction: a connection that never
  migrates never becomes a Python object. The shim makes one (a `Connection`, pinned in the
  table) only when it must: a valid Migrate SYN, a server RST to hold, a reset.
* It validates Migrate SYNs (known Token, Request hash, ReqNo newer modulo 128; the same
  ReqNo from the same source is a retransmission and is answered again, from another source
  it is redundant and gets a RST; anything invalid gets a RST and changes nothing).
* A Migrate SYN that says its sender believes the server failed (window FAILOVER) is
  accepted only if the server is silent: a server heard in the last SERVER_RECENT seconds is
  alive; else one old byte sent to it elicits an ACK at once from a live one (within two of
  its round trips, measured at the handshake, bounded); any frame from it means it lives (a false suspicion: a loaded or partitioned-then-healed
  group, a restarted server appliance), and the Migrate SYN gets a RST, so a false
  suspicion costs no migration at all. Planned migrations (window 0) skip the check.
* Before it answers, it asks the client where it is: a probe (one old byte from the server,
  far behind the client's window) makes the client's kernel send an ACK at once carrying its
  exact rcv_nxt, window, TSval and SACK blocks, whatever a forged or stale frame left in the
  table. The draft's SYN/ACK (seq = the client's acknowledged byte, ack = its rcv_nxt, TSecr =
  the last TSval it accepted, SACK = what it holds above a hole) is built from that answer,
  or from the tracked state if no answer comes within PROBE_TIMEOUT. With SACK the answer
  names itself (a D-SACK of the probe's byte); ACKs the client sent before the probe reached
  it are stale and kept only in case no answer comes. A SYN/ACK from the answer to a probe of
  a failover whose server was found silent is exact (nothing reached the client after the
  probe): its urgent pointer says so (SYNACK_EXACT; URG is clear, so no TCP stack reads the
  field) and the taker need not ask the client again.
* Network lock: from the accepted Migrate SYN until the new server's first ACK, the
  client's frames are not forwarded (it retransmits) and neither are the new server's RSTs
  (its kernel answers the SYN/ACK with one before the repaired socket exists). Then the
  fast path rewrites addresses both ways, and the old server's socket is reset with an
  in-window RST (a planned migration leaves it alive).
* A Migrate RST (a RST carrying the Migrate option of the accepted handshake, from its
  sender) is deliberate: with P set the new server says nobody can continue the connection,
  and the client is reset at once; without P it abandons the migration and the connection
  goes back to its previous server.
* Resetting the client: RSTs from the original server at the client's known position, then,
  for RESET_LINGER seconds, every frame the client still sends is answered with a RST at
  the exact ack it carries (its rcv_nxt), so the client's kernel always accepts one.
* MIGRATE-WAIT: a RST from the current server of a migratable connection is held for a
  grace period in which a migrate may come; if none does, the client is reset.
* A frame from a server the connection has left (a partitioned replica whose links came
  back, a falsely suspected one) is answered with a RST at exactly the ack it carries, so
  that server's socket is freed as soon as the path is back (at most one per connection and
  server every FORMER_RST_INTERVAL).

Every connection ends with an outcome: "resumed" (a new server took it over), "reset" (with
the reason), or none (it ended on its own). Timers follow one contract: next_deadline() says
when handle_timer(now) must next run.

Directions: OUT is client -> network, IN is network -> client. handle() returns actions
(direction, frame, keep_vnet): keep_vnet says the frame still carries the received frame's
offload state (a partial checksum, GSO) so its virtio header must go with it; frames the
shim built or fully checksummed go without one.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import NamedTuple, Optional

import _fastpath as fp

OUT, IN = "out", "in"
PUNT_FLAGS = fp.SYN | fp.RST  # what the fast path hands over for known connections
CLOSED_LINGER = 10.0  # seconds a closed connection stays visible before it is forgotten
IDLE_TIMEOUT = 600.0  # seconds without a frame before an open connection is forgotten
MIGRATE_WAIT = 30.0  # seconds a RST from the server is held (docs/architecture.md)
LOCK_TIMEOUT = 3.0  # seconds the network lock waits for the new server's first ACK
PROBE_TIMEOUT = 0.05  # seconds to wait for the client's answer to the position probe
RESET_LINGER = 2.0  # seconds a reset client's frames are answered with RSTs
FORMER_RST_INTERVAL = 0.2  # seconds between RSTs to one former server of a connection
SWEEP_INTERVAL = 1.0  # seconds between passes that forget closed and idle connections
PROBE_BEHIND = 1 << 30  # the probe's byte lies this far behind anything the client could still want
SERVER_CHECK_MIN, SERVER_CHECK_MAX = 0.002, 0.05  # seconds a live server has to show it lives (2 RTTs, bounded)
SERVER_RECENT = 0.01  # a server heard this recently is alive: no probe needed
FAILOVER = 1  # a Migrate SYN's window: its sender believes the server failed (appliance.handshake)
REFUSED_MEMORY = 2.0  # seconds a refused failover's copies still in flight are refused too
PROBE_PATIENCE = 1.0  # seconds of asking the client again (doubling) before the tracked state is used
FENCE_STEP = 0.004  # seconds between looks at whether the adapter has read every frame up to a deadline
FENCE_MAX = 0.25  # seconds past a deadline after which it is decided whatever the adapter still holds
SYNACK_EXACT = 1  # in a SYN/ACK's urgent pointer: its position is the client's answer to the probe

SYN_SENT, ESTABLISHED, MIGRATING, RESETTING, CLOSED = "syn_sent", "established", "migrating", "resetting", "closed"
RESUMED, RESET = "resumed", "reset"


SynOptions = fp.SynOptions  # what one side's SYN (or SYN/ACK) offered: the engine's record


class Position(NamedTuple):
    """Where the client is, from one of its ACKs (its answer to the probe)."""

    ack: int  # its rcv_nxt
    window: int
    tsval: Optional[int]
    sack: tuple  # blocks above ack (data it holds above a hole)
    seq: Optional[int] = None  # its snd_nxt
    tsecr: Optional[int] = None  # the last TSval it accepted from the server (its ts_recent)


@dataclasses.dataclass
class Connection:
    client: tuple  # (ip text, port)
    server: tuple  # the original server: the address the client's kernel talks to
    client_syn: SynOptions
    opened: float
    tagged: bool  # we added Migrate-Permitted to the client's SYN
    migrate_permitted: bool  # the connection can be migrated (our tag, or the client's own)
    server_syn: Optional[SynOptions] = None
    state: str = ESTABLISHED
    closed_at: Optional[float] = None
    closed_by: Optional[str] = None
    token: Optional[int] = None
    current: Optional[tuple] = None  # the server that holds the connection now
    reqno: int = 0  # the last accepted Migrate ReqNo
    migrator: Optional[tuple] = None  # source of the last accepted Migrate SYN
    pending: Optional[tuple] = None  # (new server, old server, lock started) while the lock is on
    probe_until: Optional[float] = None  # waiting for the client's answer to the probe until then
    probe_wait: float = 0.0  # how long the latest probe waits (doubling while unanswered)
    check: Optional[tuple] = None  # (Migrate SYN frame, its source, deadline): is the server silent?
    refused: Optional[tuple] = None  # (source, ReqNo) of the last failover refused: the server lived
    server_rtt: Optional[float] = None  # the client's SYN to the server's SYN/ACK
    refused_at: float = 0.0
    position: Optional[Position] = None  # the client's answer to the latest probe
    probe_seq: Optional[int] = None  # the byte of the latest probe (its answer D-SACKs it)
    stale: Optional[Position] = None  # an ACK the client sent before the probe reached it
    silent: bool = False  # this migration's server check found the server silent
    synack: Optional[bytes] = None  # our last SYN/ACK, for retransmitted Migrate SYNs
    macs: Optional[tuple] = None  # (client MAC, router MAC) for frames the shim builds
    held_rst: Optional[float] = None  # MIGRATE-WAIT: a server RST is held until then
    reset_until: Optional[float] = None  # RESETTING: the client's frames get RSTs until then
    outcome: Optional[str] = None  # RESUMED or RESET
    outcome_reason: Optional[str] = None
    migrations: int = 0
    servers: list = dataclasses.field(default_factory=list)  # every server that held it, in order
    former_rst: dict = dataclasses.field(default_factory=dict)  # former server -> when we last reset it
    abandoned: list = dataclasses.field(default_factory=list)  # migrators whose migration was abandoned
    abandoned_reqno: Optional[int] = None  # the ReqNo of the last migration abandoned

    @property
    def key(self) -> tuple:
        return self.client + self.server

    @classmethod
    def from_record(cls, rec) -> "Connection":
        """The Python side of a connection the engine recorded (an fp.Conn)."""
        client, server = (rec.client, rec.client_port), (rec.server, rec.server_port)
        conn = cls(client, server, rec.client_syn, rec.created, rec.tagged, rec.migrate_permitted, rec.server_syn,
                   state=CLOSED if rec.state == "closed" else ESTABLISHED if rec.state == "established" else SYN_SENT,
                   token=rec.token, current=server, servers=[server],
                   macs=(bytes(rec.client_mac), bytes(rec.router_mac)) if rec.client_mac is not None else None)
        if rec.established_at is not None:
            conn.server_rtt = max(0.0, rec.established_at - rec.created)
        conn.closed_at = rec.closed_at
        return conn

    def record(self) -> dict:
        """The engine's record of it (fp.Conn fields), to restore it in a table."""
        return {"client": self.client[0], "client_port": self.client[1], "server": self.server[0],
                "server_port": self.server[1], "state": "closed" if self.state == CLOSED else "established",
                "created": self.opened, "closed_at": self.closed_at, "client_syn": self.client_syn._asdict(),
                "server_syn": self.server_syn._asdict() if self.server_syn else None, "tagged": self.tagged,
                "token": self.token, "client_mac": self.macs[0].hex() if self.macs else None,
                "router_mac": self.macs[1].hex() if self.macs else None, "pinned": True,
                "established_at": self.opened + (self.server_rtt or 0.0)}


def record_dict(rec) -> dict:
    """An fp.Conn as JSON-able data (for the journal)."""
    d = rec._asdict()
    d["client_syn"] = rec.client_syn._asdict()
    d["server_syn"] = rec.server_syn._asdict() if rec.server_syn else None
    for m in ("client_mac", "router_mac"):
        d[m] = bytes(d[m]).hex() if d[m] is not None else None
    d.pop("forgotten", None)
    return d


def _record_in(d: dict) -> dict:
    """A journaled record as restore_connection() takes it."""
    d = dict(d)
    d["client_syn"] = SynOptions(**d["client_syn"])
    if d.get("server_syn"):
        d["server_syn"] = SynOptions(**d["server_syn"])
    for m in ("client_mac", "router_mac"):
        if d.get(m) is not None:
            d[m] = bytes.fromhex(d[m])
    return d


def _ack_of(flow) -> Optional[int]:
    return flow.ack if flow is not None and flow.flags_seen & fp.ACK else None


class ClientShim:
    """Decides the frames the fast path hands over; keeps the per-connection shim state."""

    def __init__(self, table, migrate_wait: float = MIGRATE_WAIT,
                 probe_timeout: float = PROBE_TIMEOUT, lock_timeout: float = LOCK_TIMEOUT,
                 reset_linger: float = RESET_LINGER) -> None:
        if not getattr(table, "conntrack", False):
            raise ValueError("the shim needs a FlowTable with conntrack=True (the engine tracks connections)")
        self.table = table
        self.migrate_wait = migrate_wait
        self.probe_timeout = probe_timeout
        self.lock_timeout = lock_timeout
        self.reset_linger = reset_linger
        self.connections: dict = {}  # the Python-owned ones (pinned in the table), by client + original server
        self.by_server: dict = {}  # (server ip, port, client ip, port) -> the connection's original server
        self._events: list = []
        self._timers: list = []  # heap of (deadline, seq, connection key); each checked when due
        self._pending_out: list = []  # actions a side effect produced, sent with what handle() returns
        self._dirty: dict = {}  # keys whose journaled state changed
        self._gone: list = []  # keys forgotten
        self._timer_seq = 0
        self._next_sweep: Optional[float] = None
        # caught_up(direction, t): has the adapter handed over every frame of that direction that
        # arrived before monotonic time t? A deadline that waits for an answer (the server's,
        # the client's) is decided only then, or FENCE_MAX late: on a loaded host the answer
        # may sit unread in a socket while the timer fires. None: always (sans-I/O tests).
        self.caught_up = None
        self.counters = dict.fromkeys(
            ("fence_waits", "rsts", "punted_other", "adopted", "malformed", "expired", "migrate_syns", "migrations",
             "migrate_retransmissions",
             "migrate_rejected_token", "migrate_rejected_request", "migrate_rejected_stale",
             "migrate_rejected_redundant", "migrate_rejected_tuple", "migrate_rejected_not_permitted",
             "migrate_rejected_server_alive", "server_checks",
             "probes", "probe_answers", "probe_stale_answers", "probe_timeouts", "probe_bad_checksum", "migrate_rsts",
             "migrate_rsts_rejected", "migrations_abandoned",
             "lock_dropped_client", "lock_dropped_rst", "lock_timeouts", "rsts_held", "rsts_discarded",
             "old_server_resets", "former_rsts", "former_rsts_limited", "client_resets", "reset_rsts_sent",
             "outcome_resumed", "outcome_reset", "restored", "restore_errors"), 0)

    def pop_events(self) -> list:
        """What happened since the last call, as (kind, fields) pairs."""
        events, self._events = self._events, []
        return events

    def _note(self, conn: Connection, kind: str, fields: dict) -> None:
        """An event that changes what a restart must know of conn (see export())."""
        self._events.append((kind, fields))
        self._dirty[conn.key] = None

    def pop_changes(self) -> tuple:
        """(connections whose state changed, keys forgotten) since the last call: what the
        appliance journals so that a restart loses nothing."""
        changed = [self.connections[k] for k in self._dirty if k in self.connections]
        gone, self._gone = self._gone, []
        self._dirty = {}
        return changed, gone

    # -- dispatch ------------------------------------------------------------------------

    def handle(self, direction: str, frame: bytearray, now: float, partial: bool = False) -> list:
        """A punted frame from direction; returns [(direction, frame, keep_vnet)] to send on."""
        out = self._handle(direction, frame, now, partial)
        if self._pending_out:
            out = out + self._pending_out
            self._pending_out = []
        return out

    def _handle(self, direction: str, frame: bytearray, now: float, partial: bool) -> list:
        v = fp.parse(frame)
        if not v.is_tcp:
            if v.error:
                self.counters["malformed"] += 1
            return [(direction, frame, True)]
        syn_ack = v.flags & (fp.SYN | fp.ACK)
        if direction == OUT:
            conn = self.connections.get((v.src_ip, v.sport, v.dst_ip, v.dport))
            if conn is None:
                self.counters["punted_other"] += 1
                return [(OUT, frame, True)]
            if conn.reset_until is not None:
                return self._reset_answer(conn, frame, v, now, partial)
            if conn.probe_until is not None:
                return self._probe_answer(conn, frame, v, now, partial)
            if v.flags & fp.RST:
                return self._client_rst(conn, frame, v, now, partial)
            self.counters["punted_other"] += 1
            return self._to_current(conn, frame, v, partial)
        if syn_ack == fp.SYN and v.opts & fp.HAS_MIGRATE:
            return self._migrate_syn(frame, v, now)
        conn = self.connections.get((v.dst_ip, v.dport) + self._orig_for(v))
        src = (v.src_ip, v.sport)
        if conn is None and v.flags & fp.RST and not v.opts & fp.HAS_MIGRATE:
            rec = self.table.connection(v.dst_ip, v.dport, v.src_ip, v.sport)  # a server's RST: hold it?
            if rec is not None and rec.state == "established" and rec.migrate_permitted:
                conn = self._adopt(rec, now)
        if conn is None:
            self.counters["punted_other"] += 1
            return [(IN, frame, True)]
        if v.flags & fp.RST and v.opts & fp.HAS_MIGRATE:
            return self._migrate_rst(conn, frame, v, now)
        if conn.reset_until is not None:
            return []  # the client is being reset: nothing of the servers' reaches it
        if conn.pending and src == conn.pending[0]:
            return self._from_new_server(conn, frame, v, now, partial)
        if v.flags & fp.RST:
            return self._server_rst(conn, frame, v, now, partial)
        if src == conn.current:
            if conn.check is not None:
                self._server_lives(conn, now)
            self.counters["punted_other"] += 1
            return self._from_current(conn, frame, v, partial)
        return self._from_former(conn, src, v, now)

    def _from_former(self, conn: Connection, src: tuple, v, now: float) -> list:
        """A server the connection has left still sends (its links are back): reset its socket."""
        if v.flags & fp.RST or not v.flags & fp.ACK or conn.pending and src == conn.pending[1]:
            return []  # (during the lock the old server's frames are simply held back)
        last = conn.former_rst.get(src)
        if last is not None and now - last < FORMER_RST_INTERVAL:
            self.counters["former_rsts_limited"] += 1
            return []
        conn.former_rst[src] = now
        self.counters["former_rsts"] += 1
        (cip, cport) = conn.client
        client_mac, router_mac = conn.macs
        self._events.append(("former_server_reset", {"client": list(conn.client), "server": list(src)}))
        return [(OUT, bytearray(fp.build_rst(cip, src[0], cport, src[1], v.ack, eth_src=client_mac,
                                             eth_dst=router_mac)), False)]

    def _orig_for(self, v) -> tuple:
        """The original server of the connection a server->client frame belongs to."""
        return self.by_server.get((v.src_ip, v.sport, v.dst_ip, v.dport), (v.src_ip, v.sport))

    # -- the Python side of a connection ---------------------------------------------------

    def _adopt(self, rec, now: float) -> Connection:
        """Make the engine's record a Python connection, pinned (the engine no longer expires
        it, and leaves its lifecycle to the shim)."""
        conn = Connection.from_record(rec)
        self.connections[conn.key] = conn
        self._index(conn, conn.server)
        self.table.pin(conn.client[0], conn.client[1], conn.server[0], conn.server[1])
        self.counters["adopted"] += 1
        if self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL
        self._dirty[conn.key] = None
        return conn

    # -- the Migrate handshake -------------------------------------------------------------

    def _migrate_syn(self, frame: bytearray, v, now: float) -> list:
        self.counters["migrate_syns"] += 1
        src, client = (v.src_ip, v.sport), (v.dst_ip, v.dport)
        rec = self.table.find_token(v.migrate_token)
        conn = self.connections.get(rec.key) if rec is not None else None
        reject = None
        if rec is None or (conn.state in (CLOSED, RESETTING) if conn is not None else rec.state != "established"):
            reject = "token"
        elif (rec.client, rec.client_port) != client:
            reject = "tuple"
        elif not rec.migrate_permitted or rec.server_syn is None:
            reject = "not_permitted"
        elif fp.migrate_request(rec.client_syn.isn, rec.server_syn.isn, b"", v.seq,
                                v.migrate_reqno) != v.migrate_request:
            reject = "request"
        elif conn is None and not fp.reqno_newer(v.migrate_reqno, 0):
            reject = "stale"  # never migrated: only a ReqNo past 0 is new
        if reject is None and conn is None:
            conn = self._adopt(rec, now)  # a true Migrate SYN: from now on the shim owns the connection
        if reject is not None:
            pass
        elif conn.check is not None:
            if conn.check[1] == src and v.migrate_reqno == fp.parse(conn.check[0]).migrate_reqno:
                self.counters["migrate_retransmissions"] += 1
                return []  # still checking that the server is silent
            reject = "redundant"
        elif conn.refused == (src, v.migrate_reqno) and now - conn.refused_at < REFUSED_MEMORY:
            # a copy of a failover already refused, still in flight: its sender gave up on it
            self.counters["migrate_rejected_server_alive"] += 1
            return [(OUT, self._alive_reply(conn, frame), False)]
        elif v.migrate_reqno == conn.reqno and conn.reqno != 0 and (conn.pending or conn.current == src):
            if src == conn.migrator:
                self.counters["migrate_retransmissions"] += 1
                if conn.synack is None:
                    return []  # still waiting for the client's answer: the SYN/ACK follows
                return [(OUT, bytearray(conn.synack), False)]
            reject = "redundant"
        elif v.migrate_reqno == conn.reqno and conn.reqno != 0 and src != conn.migrator \
                and conn.abandoned_reqno != conn.reqno:
            reject = "redundant"
        elif v.migrate_reqno == conn.reqno and conn.reqno != 0:
            # its migration was abandoned: its taker tries again, or another member that could not
            # know the ReqNo was used (the first taker gave up on it): a new acceptance, asked afresh
            pass
        elif not fp.reqno_newer(v.migrate_reqno, conn.reqno):
            reject = "stale"
        if reject is not None:
            self.counters[f"migrate_rejected_{reject}"] += 1
            self._events.append(("migrate_rejected", {"from": list(src), "client": list(client), "reason": reject,
                                                      "reqno": v.migrate_reqno}))
            return [(OUT, self._rst_reply(frame, v), False)]
        if v.window == FAILOVER and not conn.pending and conn.current is not None and conn.state == ESTABLISHED \
                and conn.held_rst is None:
            return self._check_server(conn, frame, src, now)
        return self._accept(conn, frame, v, src, now)

    def _check_server(self, conn: Connection, frame: bytearray, src: tuple, now: float) -> list:
        """Before a failover: is the current server really silent? Probe it; its frames come here."""
        cur = conn.current
        (cip, cport) = conn.client
        rtt = conn.server_rtt if conn.server_rtt is not None else SERVER_CHECK_MIN
        deadline = now + min(SERVER_CHECK_MAX, max(SERVER_CHECK_MIN, 2 * rtt))
        conn.check = (bytes(frame), src, deadline)
        self.counters["server_checks"] += 1
        s2c = self.table.get(cur[0], cur[1], cip, cport)
        if s2c is not None and s2c.frames and now - s2c.last_seen < SERVER_RECENT:
            self._server_lives(conn, now)  # it is sending right now
            return []
        new_src = conn.server if cur != conn.server else None
        if new_src is not None:
            self.table.set(cur[0], cur[1], cip, cport, fp.PYTHON, new_src=new_src[0], new_sport=new_src[1])
        else:
            self.table.set(cur[0], cur[1], cip, cport, fp.PYTHON)
        self._timer(deadline, conn)
        return [(OUT, self._server_probe(conn), False)]

    def _server_probe(self, conn: Connection) -> bytearray:
        """One old byte from the client, far behind the server's window: a live server's
        kernel answers at once (data segments are never rate-limited)."""
        (cip, cport), (oip, oport) = conn.client, conn.server
        cur = conn.current
        c2s = self.table.get(cip, cport, oip, oport)
        s2c = self.table.get(cur[0], cur[1], cip, cport)
        top = c2s.seq_next if c2s is not None and c2s.frames else (conn.client_syn.isn + 1) & fp.MASK32
        ack = s2c.seq_next if s2c is not None and s2c.frames else (conn.server_syn.isn + 1) & fp.MASK32
        opts = b""
        if conn.client_syn.timestamps and conn.server_syn.timestamps:
            tsval = c2s.tsval if c2s is not None and c2s.ts_seen else (conn.client_syn.tsval or 0)
            tsecr = s2c.tsval if s2c is not None and s2c.ts_seen else 0
            opts = b"\x01\x01" + fp.opt_timestamps(tsval, tsecr)
        client_mac, router_mac = conn.macs
        return bytearray(fp.build_tcp(cip, cur[0], cport, cur[1], (top - PROBE_BEHIND) & fp.MASK32, ack, fp.ACK,
                                      65535, opts, b"\0", eth_src=client_mac, eth_dst=router_mac))

    def _server_lives(self, conn: Connection, now: float) -> None:
        """A frame from the server while checking: it is alive; the failover is refused."""
        frame, src, _ = conn.check
        conn.check = None
        conn.refused, conn.refused_at = (src, fp.parse(frame).migrate_reqno), now
        self._bind(conn)
        self.counters["migrate_rejected_server_alive"] += 1
        self._events.append(("migrate_rejected", {"from": list(src), "client": list(conn.client),
                                                  "reason": "server_alive", "server": list(conn.current)}))
        self._pending_out.append((OUT, self._alive_reply(conn, bytearray(frame)), False))

    def _server_silent(self, conn: Connection, now: float) -> list:
        """The check's time is up with no word from the server: it failed; go on."""
        frame, src, _ = conn.check
        conn.check = None
        self._bind(conn)
        f = bytearray(frame)
        return self._accept(conn, f, fp.parse(f), src, now, silent=True)

    def _accept(self, conn: Connection, frame: bytearray, v, src: tuple, now: float, silent: bool = False) -> list:
        cip, cport = conn.client
        old = conn.pending[0] if conn.pending else conn.current
        conn.reqno, conn.migrator, conn.synack = v.migrate_reqno, src, None
        conn.abandoned_reqno, conn.stale, conn.silent = None, None, silent
        conn.macs = (bytes(frame[0:6]), bytes(frame[6:12]))  # (client, router): the Migrate SYN came from the router
        conn.pending = (src, old, now)
        conn.state = MIGRATING
        conn.position = None
        if conn.held_rst is not None:  # MIGRATE-WAIT ends well: the RST never reaches the client
            conn.held_rst = None
            self.counters["rsts_discarded"] += 1
        # the lock: the client's frames come here (its answer to the probe), the new server's
        # too (its first ACK ends the lock); the old server's are dropped. The client's flow
        # keeps its binding (new_dst) so that its tracked ack stays bounded by what that
        # server really sent.
        self._set_client_flow(conn, fp.PYTHON if self.probe_timeout > 0 else fp.DROP, old)
        self.table.set(src[0], src[1], cip, cport, fp.PYTHON)
        if old is not None and old != src:
            self.table.set(old[0], old[1], cip, cport, fp.DROP, punt_flags=fp.SYN)
        self._index(conn, src)
        self._note(conn, "migrate_accepted", {"client": list(conn.client), "to": list(src),
                                                  "from": list(old) if old else None, "reqno": v.migrate_reqno})
        if self.probe_timeout <= 0:
            return [self._answer(conn, now, None)]
        conn.probe_wait = self.probe_timeout
        conn.probe_until = now + self.probe_timeout
        self._timer(conn.probe_until, conn)
        self.counters["probes"] += 1
        return [(IN, self._probe(conn, old), False)]

    def _set_client_flow(self, conn: Connection, verdict: int, bound: Optional[tuple]) -> None:
        (cip, cport), (oip, oport) = conn.client, conn.server
        if bound is not None and bound != conn.server:
            self.table.set(cip, cport, oip, oport, verdict, new_dst=bound[0], new_dport=bound[1],
                           punt_flags=fp.RST)
        else:
            self.table.set(cip, cport, oip, oport, verdict, punt_flags=fp.RST)

    def _probe(self, conn: Connection, old: Optional[tuple]) -> bytearray:
        """One byte from the server, far behind the client's window: its kernel answers with
        an ACK at once (data segments are never rate-limited) carrying its exact position."""
        (cip, cport), (oip, oport) = conn.client, conn.server
        s2c = self.table.get(old[0], old[1], cip, cport) if old else None
        c2s = self.table.get(cip, cport, oip, oport)
        top = s2c.seq_next if s2c is not None and s2c.frames else (conn.server_syn.isn + 1) & fp.MASK32
        ts = conn.client_syn.timestamps and conn.server_syn.timestamps
        opts = b""
        if ts:
            tsval = s2c.tsval if s2c is not None and s2c.ts_seen else (conn.server_syn.tsval or 0)
            tsecr = c2s.tsval if c2s is not None and c2s.ts_seen else (conn.client_syn.tsval or 0)
            opts = b"\x01\x01" + fp.opt_timestamps(tsval, tsecr)
        client_mac, router_mac = conn.macs
        ack = c2s.seq_next if c2s is not None and c2s.frames else (conn.client_syn.isn + 1) & fp.MASK32
        conn.probe_seq = (top - PROBE_BEHIND) & fp.MASK32
        return bytearray(fp.build_tcp(oip, cip, oport, cport, conn.probe_seq, ack, fp.ACK,
                                      65535, opts, b"\0", eth_src=router_mac, eth_dst=client_mac))

    def _position_known(self, conn: Connection) -> bool:
        """The table has seen the client's ACKs (and, unless it is the server that died, the
        server's), so a SYN/ACK from it would not be a guess."""
        (cip, cport), (oip, oport) = conn.client, conn.server
        return _ack_of(self.table.get(cip, cport, oip, oport)) is not None

    def _probe_answer(self, conn: Connection, frame: bytearray, v, now: float, partial: bool) -> list:
        """A client frame while we wait for its position: take it if it is a valid ACK."""
        if not v.flags & fp.ACK or v.flags & (fp.SYN | fp.RST):
            if v.flags & fp.RST:
                return self._client_rst(conn, frame, v, now, partial)
            return []
        if not partial and fp.verify_checksums(frame) != (True, True):
            self.counters["probe_bad_checksum"] += 1
            return []  # its kernel will drop it too; the real answer follows
        ts = bool(v.opts & fp.HAS_TIMESTAMPS)
        blocks = v.sack_blocks if v.opts & fp.HAS_SACK else ()
        sack = tuple(b for b in blocks if fp.seq_gt(b[1], v.ack))
        pos = Position(v.ack, v.window, v.tsval if ts else None, sack, v.seq, v.tsecr if ts else None)
        named = any(left == conn.probe_seq for left, _ in blocks)
        if not named and self._sack_on(conn):
            # sent before the probe reached the client (it would D-SACK the probe's byte):
            # its rcv_nxt may be behind; kept in case no answer comes
            self.counters["probe_stale_answers"] += 1
            if conn.stale is None or fp.seq_ge(v.ack, conn.stale.ack):
                conn.stale = pos
            return []
        self.counters["probe_answers"] += 1
        return [self._answer(conn, now, pos, exact=named and conn.silent)]

    @staticmethod
    def _sack_on(conn: Connection) -> bool:
        return bool(conn.client_syn.sack_permitted and conn.server_syn is not None and conn.server_syn.sack_permitted)

    def _answer(self, conn: Connection, now: float, pos: Optional[Position], exact: bool = False) -> tuple:
        """The SYN/ACK, from the client's answer (pos) or, without one, the tracked state;
        `exact`: pos is the answer to a probe that nothing followed to the client."""
        probed = pos is not None
        (cip, cport), (oip, oport) = conn.client, conn.server
        src, old, _ = conn.pending
        c2s = self.table.get(cip, cport, oip, oport)
        s2c = self.table.get(old[0], old[1], cip, cport) if old else None
        acked = _ack_of(s2c)
        if acked is None:  # the server's ACKs not seen (since a restart): the client's next byte
            acked = pos.seq if pos is not None and pos.seq is not None else (conn.client_syn.isn + 1) & fp.MASK32
        ts = conn.client_syn.timestamps and conn.server_syn.timestamps
        if pos is None:
            rcv_nxt = _ack_of(c2s)
            pos = Position(rcv_nxt if rcv_nxt is not None else (conn.server_syn.isn + 1) & fp.MASK32,
                           c2s.window if c2s is not None and c2s.frames else 65535,
                           c2s.tsval if c2s is not None and c2s.ts_seen else None,
                           tuple(b for b in getattr(c2s, "sack", ()) if fp.seq_gt(b[1], rcv_nxt or 0)))
        tsval = pos.tsval if pos.tsval is not None else (conn.client_syn.tsval or 0)
        if pos.tsecr is not None:  # what the client's kernel itself last accepted: exact
            tsecr = pos.tsecr
        else:
            tsecr = s2c.tsval if ts and s2c is not None and s2c.ts_seen else 0
        client_mac, router_mac = conn.macs
        synack = fp.build_migrate_synack(cip, src[0], cport, src[1], acked, pos.ack, pos.window,
                                         tsval=tsval if ts else None, tsecr=tsecr if ts else None,
                                         sack=pos.sack if conn.client_syn.sack_permitted else (),
                                         urgent=SYNACK_EXACT if exact else 0, eth_src=client_mac, eth_dst=router_mac)
        conn.synack, conn.probe_until, conn.position, conn.stale = synack, None, pos if probed else None, None
        conn.pending = (src, old, now)  # the lock's timeout counts from the SYN/ACK
        self._timer(now + self.lock_timeout, conn)
        self._set_client_flow(conn, fp.DROP, old)
        self._note(conn, "migrate_answered", {"client": list(conn.client), "to": list(src), "seq": acked,
                                                  "ack": pos.ack, "tsecr": tsecr, "sack": [list(b) for b in pos.sack],
                                                  "probed": probed, "exact": exact})
        return (OUT, bytearray(synack), False)

    def _from_new_server(self, conn: Connection, frame: bytearray, v, now: float, partial: bool) -> list:
        if v.flags & fp.SYN:
            return [] if not v.opts & fp.HAS_MIGRATE else self._migrate_syn(frame, v, now)
        if v.flags & fp.RST:
            self.counters["lock_dropped_rst"] += 1
            return []
        if not v.flags & fp.ACK or conn.synack is None:
            return []
        # the new server's first ACK (its window probe after TCP_REPAIR off): it is live
        new, old, started = conn.pending
        cip, cport = conn.client
        conn.pending = None
        conn.current = new
        conn.state = ESTABLISHED
        conn.migrations += 1
        conn.servers.append(new)
        conn.outcome, conn.outcome_reason = RESUMED, None
        self.counters["migrations"] += 1
        self.counters["outcome_resumed"] += 1
        self._bind(conn)
        out = self._from_current(conn, frame, v, partial)
        if old is not None and old != new:
            out.append((OUT, self._reset_old(conn, old), False))
            self.table.set(old[0], old[1], cip, cport, fp.PYTHON)  # its late frames: _from_former
        self._note(conn, "migrated", {"client": list(conn.client), "to": list(new),
                                          "from": list(old) if old else None, "reqno": conn.reqno,
                                          "lock_ms": round((now - started) * 1000, 3)})
        return out

    def _bind(self, conn: Connection) -> None:
        """The fast path's rewrite for the connection's current server."""
        (cip, cport), (oip, oport) = conn.client, conn.server
        cur = conn.current
        if cur == conn.server:  # back at the original server: nothing to rewrite
            self.table.set(cip, cport, oip, oport, fp.PASS, punt_flags=PUNT_FLAGS)
            self.table.set(oip, oport, cip, cport, fp.PASS, punt_flags=PUNT_FLAGS)
        else:
            self.table.set(cip, cport, oip, oport, fp.REWRITE, new_dst=cur[0], new_dport=cur[1],
                           punt_flags=PUNT_FLAGS)
            self.table.set(cur[0], cur[1], cip, cport, fp.REWRITE, new_src=oip, new_sport=oport,
                           punt_flags=PUNT_FLAGS)

    def _reset_old(self, conn: Connection, old: tuple) -> bytearray:
        """An in-window RST to the old server, from the client: frees its socket if it lives."""
        (cip, cport), (oip, oport) = conn.client, conn.server
        c2s = self.table.get(cip, cport, oip, oport)
        seq = c2s.seq_next if c2s is not None and c2s.frames else (conn.client_syn.isn + 1) & fp.MASK32
        self.counters["old_server_resets"] += 1
        client_mac, router_mac = conn.macs
        return bytearray(fp.build_rst(cip, old[0], cport, old[1], seq, eth_src=client_mac, eth_dst=router_mac))

    def _rst_reply(self, frame: bytearray, v) -> bytearray:
        """The client's RST for a segment it should never have received (a bad Migrate SYN)."""
        ack = (v.seq + v.payload_len + (1 if v.flags & fp.SYN else 0)) & fp.MASK32
        return bytearray(fp.build_rst(v.dst_ip, v.src_ip, v.dport, v.sport, 0, ack, eth_src=frame[0:6],
                                      eth_dst=frame[6:12]))

    def _alive_reply(self, conn: Connection, frame: bytearray) -> bytearray:
        """The refusal of a failover whose server still lives: a RST carrying the Migrate option
        of the SYN (P clear, Request over the RST's seq, so only this appliance can say it): the
        taker learns the server is alive, and may try again later, when it might not be."""
        v = fp.parse(frame)
        ack = (v.seq + 1) & fp.MASK32
        req = fp.migrate_request(conn.client_syn.isn, conn.server_syn.isn, b"", 0, v.migrate_reqno)
        opt = fp.aligned_option(fp.opt_migrate(False, v.migrate_reqno, v.migrate_token, req))
        return bytearray(fp.build_tcp(v.dst_ip, v.src_ip, v.dport, v.sport, 0, ack, fp.RST | fp.ACK, 0, opt,
                                      eth_src=frame[0:6], eth_dst=frame[6:12]))

    # -- deliberate resets -----------------------------------------------------------------

    def _migrate_rst(self, conn: Connection, frame: bytearray, v, now: float) -> list:
        """A RST with the Migrate option: valid only from the accepted migrator, with its ReqNo."""
        src = (v.src_ip, v.sport)
        ok = (conn.token is not None and v.migrate_token == conn.token and src == conn.migrator
              and v.migrate_reqno == conn.reqno and conn.server_syn is not None
              and fp.migrate_request(conn.client_syn.isn, conn.server_syn.isn, b"", v.seq, v.migrate_reqno)
              == v.migrate_request and conn.state in (MIGRATING, ESTABLISHED))
        if not ok:
            self.counters["migrate_rsts_rejected"] += 1
            self._events.append(("migrate_rst_rejected", {"from": list(src), "client": list(conn.client)}))
            return []
        self.counters["migrate_rsts"] += 1
        if v.migrate_preload:
            return self.reset_client(conn, now, f"{src[0]} cannot continue it")
        self._abandon(conn, now, f"{src[0]} abandoned the migration")
        return []

    def reset_client(self, conn: Connection, now: float, reason: str) -> list:
        """Reset the client's connection: RSTs at every position it may be at, then a RST for
        each frame it still sends (at the ack it carries) for reset_linger seconds."""
        (cip, cport), (oip, oport) = conn.client, conn.server
        cur = conn.pending[0] if conn.pending else conn.current
        c2s = self.table.get(cip, cport, oip, oport)
        s2c = self.table.get(cur[0], cur[1], cip, cport) if cur else None
        seqs = []
        for s in (conn.position.ack if conn.position else None, _ack_of(c2s),
                  s2c.seq_next if s2c is not None and s2c.frames else None):
            if s is not None and s not in seqs:
                seqs.append(s)
        if not seqs:
            seqs.append((conn.server_syn.isn + 1) & fp.MASK32 if conn.server_syn else 0)
        for s in {*conn.servers, *((conn.pending[0],) if conn.pending else ())}:
            self.table.set(s[0], s[1], cip, cport, fp.DROP)
        self._set_client_flow(conn, fp.PYTHON, cur)
        conn.pending = conn.probe_until = conn.held_rst = None
        conn.state = RESETTING
        conn.reset_until = now + self.reset_linger
        conn.outcome, conn.outcome_reason = RESET, reason
        self._timer(conn.reset_until, conn)
        self.counters["client_resets"] += 1
        self.counters["outcome_reset"] += 1
        self.counters["reset_rsts_sent"] += len(seqs)
        self._note(conn, "client_reset", {"client": list(conn.client), "server": list(conn.server),
                                              "reason": reason, "seqs": seqs})
        return [(IN, self._rst_to_client(conn, s), False) for s in seqs]

    def _rst_to_client(self, conn: Connection, seq: int) -> bytearray:
        (cip, cport), (oip, oport) = conn.client, conn.server
        client_mac, router_mac = conn.macs
        return bytearray(fp.build_rst(oip, cip, oport, cport, seq, eth_src=router_mac, eth_dst=client_mac))

    def _reset_answer(self, conn: Connection, frame: bytearray, v, now: float, partial: bool) -> list:
        """The client still sends while being reset: a RST at exactly the ack it carries."""
        if v.flags & fp.RST:
            self._close(conn, now, "client")
            return []
        if not v.flags & fp.ACK:
            return []
        self.counters["reset_rsts_sent"] += 1
        return [(IN, self._rst_to_client(conn, v.ack), False)]

    def _abandon(self, conn: Connection, now: float, why: str) -> None:
        """The migration will not happen: the connection goes back to its previous binding."""
        if conn.pending is None:
            return
        new, old, _ = conn.pending
        (cip, cport) = conn.client
        conn.pending = conn.probe_until = None
        conn.synack = None  # the same ReqNo from its sender later is a new try: asked afresh, never the old answer
        conn.abandoned_reqno = conn.reqno
        conn.state = ESTABLISHED
        if new not in conn.servers:
            # its late frames still come here: a Migrate RST (it gives up: the client is reset
            # if P says nobody can continue) is taken; anything else gets a RST (_from_former)
            self.table.set(new[0], new[1], cip, cport, fp.PYTHON)
            if new not in conn.abandoned:
                conn.abandoned.append(new)
        self._bind(conn)
        self.counters["migrations_abandoned"] += 1
        self._note(conn, "migrate_abandoned", {"client": list(conn.client), "to": list(new), "reason": why})

    # -- frames of migrated connections that reach Python ------------------------------------

    def _from_current(self, conn: Connection, frame: bytearray, v, partial: bool) -> list:
        """A frame from the current server, in Python: rewrite it as the fast path would."""
        if conn.current != conn.server:
            fp.rewrite_addresses(frame, src=conn.server[0], sport=conn.server[1], partial_csum=partial)
        return [(IN, frame, True)]

    def _to_current(self, conn: Connection, frame: bytearray, v, partial: bool) -> list:
        if conn.pending:
            self.counters["lock_dropped_client"] += 1
            return []
        if conn.current and conn.current != conn.server:
            fp.rewrite_addresses(frame, dst=conn.current[0], dport=conn.current[1], partial_csum=partial)
        return [(OUT, frame, True)]

    def _client_rst(self, conn: Connection, frame: bytearray, v, now: float, partial: bool) -> list:
        self.counters["rsts"] += 1
        self._close(conn, now, "client")
        conn.pending = conn.probe_until = None  # a migration under way is moot
        if conn.current and conn.current != conn.server:
            fp.rewrite_addresses(frame, dst=conn.current[0], dport=conn.current[1], partial_csum=partial)
        return [(OUT, frame, True)]

    def _server_rst(self, conn: Connection, frame: bytearray, v, now: float, partial: bool) -> list:
        self.counters["rsts"] += 1
        if (v.src_ip, v.sport) != conn.current:
            return []  # a former server's RST
        if conn.migrate_permitted and conn.state == ESTABLISHED and self.migrate_wait > 0:
            if conn.held_rst is None:
                conn.held_rst = now + self.migrate_wait
                self._timer(conn.held_rst, conn)
                self.counters["rsts_held"] += 1
                self._note(conn, "rst_held", {"client": list(conn.client), "server": list(conn.current),
                                                  "seconds": self.migrate_wait})
            return []
        self._close(conn, now, "server")
        return self._from_current(conn, frame, v, partial)

    def _close(self, conn: Connection, now: float, by: str) -> None:
        if conn.state != CLOSED:
            conn.state, conn.closed_at, conn.closed_by = CLOSED, now, by
            conn.reset_until = None
            self._note(conn, "conn_reset", {"client": list(conn.client), "server": list(conn.server),
                                                "by": by})

    # -- timers ----------------------------------------------------------------------------

    def _timer(self, deadline: float, conn: Connection) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, conn.key))

    def next_deadline(self) -> Optional[float]:
        """When handle_timer() next has work (a probe, lock, MIGRATE-WAIT or reset deadline,
        or the sweep that forgets old connections), or None."""
        t = self._timers[0][0] if self._timers else None
        s = self._next_sweep
        if t is None or (s is not None and s < t):
            return s
        return t

    def handle_timer(self, now: float) -> list:
        """Run what is due at `now`; returns actions like handle()."""
        out = []
        while self._timers and self._timers[0][0] <= now:
            _, _, key = heapq.heappop(self._timers)
            conn = self.connections.get(key)
            if conn is not None:
                out += self._due(conn, now)
        if self._next_sweep is not None and now >= self._next_sweep:
            self._sweep(now)
            self._next_sweep = now + SWEEP_INTERVAL if self.connections else None
        return out

    def _due(self, conn: Connection, now: float) -> list:
        """Every deadline of conn that has passed (a timer entry may be stale: check each)."""
        out = []
        if conn.check is not None and now >= conn.check[2]:
            if self._behind(IN, conn.check[2], now, conn):
                pass  # the server's answer may be in a frame not read yet
            else:
                out += self._server_silent(conn, now)
        if conn.probe_until is not None and now >= conn.probe_until and self._behind(OUT, conn.probe_until, now, conn):
            pass  # so may the client's
        elif conn.probe_until is not None and now >= conn.probe_until:
            self.counters["probe_timeouts"] += 1
            asked = now - conn.pending[2]
            known = self._position_known(conn)
            if conn.stale is not None:  # the client's own ACK, if not its answer: better than the table
                out.append(self._answer(conn, now, conn.stale))
            elif (known and asked >= min(PROBE_PATIENCE, self.lock_timeout)) or asked >= self.lock_timeout:
                out.append(self._answer(conn, now, None))
            else:  # ask again (a loaded client or appliance answers late), doubling; never guess early
                conn.probe_wait = min(PROBE_PATIENCE, 2 * max(conn.probe_wait, self.probe_timeout))
                conn.probe_until = now + conn.probe_wait
                self._timer(conn.probe_until, conn)
                self.counters["probes"] += 1
                out.append((IN, self._probe(conn, conn.pending[1]), False))
        if conn.pending is not None and conn.synack is not None and now - conn.pending[2] >= self.lock_timeout \
                and not self._behind(IN, conn.pending[2] + self.lock_timeout, now, conn):  # its first ACK unread?
            self.counters["lock_timeouts"] += 1
            self._note(conn, "migrate_lock_timeout", {"client": list(conn.client), "to": list(conn.pending[0])})
            self._abandon(conn, now, "no first ACK from the new server")
        if conn.held_rst is not None and now >= conn.held_rst:
            conn.held_rst = None
            out += self.reset_client(conn, now, "MIGRATE-WAIT ended: the server reset it and no migrate came")
        if conn.reset_until is not None and now >= conn.reset_until:
            self._close(conn, now, "appliance")
        return out

    def _behind(self, direction: int, deadline: float, now: float, conn: Connection) -> bool:
        """Is a frame of `direction` that arrived before `deadline` perhaps still unread? Then
        look again in FENCE_STEP."""
        if self.caught_up is None or now >= deadline + FENCE_MAX or self.caught_up(direction, deadline):
            return False
        self.counters["fence_waits"] += 1
        self._timer(now + FENCE_STEP, conn)
        return True

    def _sweep(self, now: float) -> None:
        for conn in list(self.connections.values()):
            out_flow, in_flow = self._flows(conn)
            last = max((f.last_seen for f in (out_flow, in_flow) if f is not None and f.frames), default=conn.opened)
            if conn.state not in (CLOSED, RESETTING) and out_flow and in_flow and out_flow.flags_seen & fp.FIN \
                    and in_flow.flags_seen & fp.FIN:
                conn.state, conn.closed_at, conn.closed_by = CLOSED, last, "fin"
                self._dirty[conn.key] = None
            done = conn.state == CLOSED and now - (conn.closed_at or now) > CLOSED_LINGER
            if done or (now - last > IDLE_TIMEOUT and conn.state != RESETTING):
                self._forget(conn)
                self.counters["expired"] += 1
                self._events.append(("conn_forgotten", {"client": list(conn.client), "server": list(conn.server),
                                                        "state": conn.state}))

    # -- bookkeeping -----------------------------------------------------------------------

    def _index(self, conn: Connection, server: tuple) -> None:
        """Remember that frames from `server` to the client belong to conn (found by its original)."""
        self.by_server[server + conn.client] = conn.server

    def _forget(self, conn: Connection) -> None:
        (cip, cport), (oip, oport) = conn.client, conn.server
        self.table.forget(cip, cport, oip, oport)
        for s in set(conn.servers) | set(conn.abandoned) | ({conn.pending[0]} if conn.pending else set()):
            if s != conn.server:
                self.table.remove(s[0], s[1], cip, cport)
            self.by_server.pop(s + conn.client, None)
        self.connections.pop(conn.key, None)
        self._dirty.pop(conn.key, None)
        self._gone.append(conn.key)

    def _flows(self, conn: Connection):
        (cip, cport), (sip, sport) = conn.client, conn.current or conn.server
        return self.table.get(cip, cport, conn.server[0], conn.server[1]), self.table.get(sip, sport, cip, cport)

    # -- surviving a restart ---------------------------------------------------------------

    def export(self, conn: Connection) -> dict:
        """What a restart needs of a connection (JSON-able): who it is, both SYNs, where it
        lives now, the Migrate state. Not what frames carry: the table re-learns that, and
        the probe asks the client for its position before any SYN/ACK."""
        def addr(a):
            return list(a) if a else None
        return {
            "kind": "shim", "record": conn.record(),
            "client": list(conn.client), "server": list(conn.server),
            "client_syn": conn.client_syn._asdict(),
            "server_syn": conn.server_syn._asdict() if conn.server_syn else None,
            "opened": conn.opened, "tagged": conn.tagged, "mp": conn.migrate_permitted, "state": conn.state,
            "current": addr(conn.current), "reqno": conn.reqno, "migrator": addr(conn.migrator),
            "pending": [addr(conn.pending[0]), addr(conn.pending[1])] if conn.pending else None,
            "synack": conn.synack.hex() if conn.synack else None,
            "macs": [bytes(m).hex() for m in conn.macs] if conn.macs else None,
            "held_rst": conn.held_rst, "reset_until": conn.reset_until, "outcome": conn.outcome,
            "outcome_reason": conn.outcome_reason, "migrations": conn.migrations,
            "servers": [list(x) for x in conn.servers], "server_rtt": conn.server_rtt,
        }

    def restore(self, records, now: float) -> int:
        """Connections journaled before a restart (the engine's records, {"kind": "conn",
        "conn": record_dict()}, and the shim's own, export()), with their fast-path bindings;
        returns how many. Deadlines are monotonic, which a restart of the process does not reset."""
        n = 0
        for r in records:
            try:
                if r.get("kind") == "conn":
                    self.table.restore_connection(_record_in(r["conn"]), now)
                    n += 1
                    continue
                conn = self._restored(r, now)
            except (KeyError, TypeError, ValueError, MemoryError):
                self.counters["restore_errors"] += 1
                continue
            if conn is not None:
                n += 1
        if n and self._next_sweep is None:
            self._next_sweep = now + SWEEP_INTERVAL
        self.counters["restored"] += n
        return n

    def _restored(self, r: dict, now: float) -> Optional[Connection]:
        def addr(a):
            return (a[0], int(a[1])) if a else None
        if r["state"] in (SYN_SENT, CLOSED) or not r.get("server_syn"):
            return None
        conn = Connection(addr(r["client"]), addr(r["server"]), SynOptions(**r["client_syn"]), float(r["opened"]),
                          bool(r["tagged"]), bool(r["mp"]), SynOptions(**r["server_syn"]), state=r["state"])
        conn.current, conn.reqno, conn.migrator = addr(r["current"]), int(r["reqno"]), addr(r["migrator"])
        conn.servers = [addr(x) for x in r["servers"]]
        conn.macs = tuple(bytes.fromhex(m) for m in r["macs"]) if r.get("macs") else None
        conn.outcome, conn.outcome_reason, conn.migrations = r.get("outcome"), r.get("outcome_reason"), r["migrations"]
        conn.synack = bytes.fromhex(r["synack"]) if r.get("synack") else None
        conn.server_rtt = r.get("server_rtt")
        rec = self.table.restore_connection(_record_in(r["record"]), now)  # pinned: the shim's
        conn.token = rec.token
        self.connections[conn.key] = conn
        for srv in conn.servers:
            self._index(conn, srv)
        (cip, cport) = conn.client
        if r.get("pending"):
            new, old = addr(r["pending"][0]), addr(r["pending"][1])
            conn.pending = (new, old, now)
            self._index(conn, new)
            self.table.set(new[0], new[1], cip, cport, fp.PYTHON)
            if old is not None and old != new:
                self.table.set(old[0], old[1], cip, cport, fp.DROP, punt_flags=fp.SYN)
            if conn.synack is not None:  # the lock was on: it goes on, its timeout from now
                self._set_client_flow(conn, fp.DROP, old)
                self._timer(now + self.lock_timeout, conn)
            else:  # it died while asking the client where it is: ask again at once
                self._set_client_flow(conn, fp.PYTHON, old)
                conn.probe_until, conn.probe_wait = now, self.probe_timeout
                self._timer(now, conn)
        elif conn.state == RESETTING:
            for srv in conn.servers:
                self.table.set(srv[0], srv[1], cip, cport, fp.DROP)
            self._set_client_flow(conn, fp.PYTHON, conn.current)
            conn.reset_until = now + self.reset_linger
            self._timer(conn.reset_until, conn)
        else:
            self._bind(conn)
            for srv in conn.servers:
                if srv != conn.current:
                    self.table.set(srv[0], srv[1], cip, cport, fp.PYTHON)  # a former server: _from_former
        if r.get("held_rst") is not None:
            conn.held_rst = float(r["held_rst"])
            self._timer(conn.held_rst, conn)
        return conn

    def snapshot(self, limit: int = None) -> list:
        """Connections (the shim's own, then the engine's most recent, `limit` in all) with
        what the fast path last saw each way (JSON-able)."""
        out = []
        mine = list(self.connections.values())
        if limit is not None and len(mine) > limit:
            mine = sorted(mine, key=lambda c: c.opened)[-limit:]
        room = None if limit is None else limit - len(mine)
        others = []
        if room is None or room > 0:
            keys = set(self.connections)
            recs = self.table.connections(None if room is None else room + len(keys))
            others = [Connection.from_record(r) for r in recs if r.key not in keys]
            if room is not None:
                others = others[-room:]
        conns = others + mine
        for conn in conns:
            c2s, s2c = self._flows(conn)
            d = {
                "client": list(conn.client), "server": list(conn.server),
                "current": list(conn.current) if conn.current else None, "state": conn.state,
                "tagged": conn.tagged, "migrate_permitted": conn.migrate_permitted,
                "client_syn": conn.client_syn._asdict(),
                "server_syn": conn.server_syn._asdict() if conn.server_syn else None,
                "opened": conn.opened, "closed_at": conn.closed_at, "closed_by": conn.closed_by,
                "reqno": conn.reqno, "migrations": conn.migrations, "servers": [list(s) for s in conn.servers],
                "migrating_to": list(conn.pending[0]) if conn.pending else None,
                "rst_held": conn.held_rst is not None, "outcome": conn.outcome,
                "outcome_reason": conn.outcome_reason,
                "client_to_server": _flow_view(c2s), "server_to_client": _flow_view(s2c),
            }
            out.append(d)
        return out


def _flow_view(flow) -> Optional[dict]:
    if flow is None:
        return None
    return {"frames": flow.frames, "bytes": flow.bytes, "last_seen": flow.last_seen, "flags_seen": flow.flags_seen,
            "seq_next": flow.seq_next, "ack": flow.ack, "window": flow.window,
            "tsval": flow.tsval if flow.ts_seen else None, "tsecr": flow.tsecr if flow.ts_seen else None,
            "sack": [list(b) for b in getattr(flow, "sack", ())], "ignored": getattr(flow, "ignored", 0)}
