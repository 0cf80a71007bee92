"""The client appliance's protocol core, sans-I/O: frames and `now` in, frames to send out.

The shim gives an unmodified client kernel the Migrate options (DESIGN §3, §4; the draft's
processing rules, notes/paper.md §2.5-2.7):

* It tags the client's SYNs with Migrate-Permitted where they have room, and keeps per
  connection what a takeover needs (notes/tcp-repair.md, "Shim state"): both ISNs, both
  option sets, and the latest ACK, window and TSval in each direction with the time seen.
  The fast path tracks the last three for every frame in the flow table; the shim reads them.
* It validates Migrate SYNs (known Token, Request hash, ReqNo newer modulo 128; the same
  ReqNo from the same source is a retransmission and is answered again, from another source
  it is redundant and gets a RST; anything invalid gets a RST and changes nothing), answers
  with the draft's SYN/ACK (seq = the client's acknowledged byte, ack = the client's
  rcv_nxt, TSecr = the last TSval the client accepted), and rebinds the connection: the
  fast path then rewrites addresses and ports both ways. The client always talks to the
  server it first connected to (the "original" address); only the appliance knows where
  the connection lives now.
* Network lock: from the accepted Migrate SYN until the new server's first ACK, the
  client's frames are dropped (it retransmits) and so are the new server's RSTs (its
  kernel answers the SYN/ACK with one before the repaired socket exists). Then the old
  server's socket is reset with an in-window RST (a planned migration leaves it alive).
* MIGRATE-WAIT: a RST from the current server of a migratable connection is held for a
  grace period in which a migrate may come; it reaches the client only if none does.

Directions: OUT is client -> network, IN is network -> client. handle() returns actions
(direction, frame, keep_vnet): keep_vnet says the frame still carries the received frame's
offload state (a partial checksum, GSO) so its virtio header must go with it; frames the
shim built or fully checksummed go without one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import _fastpath as fp

OUT, IN = "out", "in"
PUNT_FLAGS = fp.SYN | fp.RST  # what the fast path hands over for known connections
CLOSED_LINGER = 10.0  # seconds a closed connection stays visible before it is forgotten
IDLE_TIMEOUT = 600.0  # seconds without a frame before an open connection is forgotten
MIGRATE_WAIT = 30.0  # seconds a RST from the server is held (DESIGN §7)
LOCK_TIMEOUT = 3.0  # seconds the network lock waits for the new server's first ACK


@dataclasses.dataclass
class SynOptions:
    """What one side's SYN (or SYN/ACK) offered."""

    isn: int
    mss: Optional[int]
    wscale: Optional[int]
    sack_permitted: bool
    timestamps: bool
    tsval: Optional[int]
    migrate_permitted: bool

    @classmethod
    def from_view(cls, v) -> "SynOptions":
        return cls(
            isn=v.seq,
            mss=v.mss if v.opts & fp.HAS_MSS else None,
            wscale=v.wscale if v.opts & fp.HAS_WSCALE else None,
            sack_permitted=bool(v.opts & fp.HAS_SACK_PERMITTED),
            timestamps=bool(v.opts & fp.HAS_TIMESTAMPS),
            tsval=v.tsval if v.opts & fp.HAS_TIMESTAMPS else None,
            migrate_permitted=bool(v.opts & fp.HAS_MIGRATE_PERMITTED),
        )


@dataclasses.dataclass
class Connection:
    client: tuple  # (ip text, port)
    server: tuple  # the original server: the address the client's kernel talks to
    client_syn: SynOptions
    opened: float
    tagged: bool  # we added Migrate-Permitted to the client's SYN
    migrate_permitted: bool  # the connection can be migrated (our tag, or the client's own)
    server_syn: Optional[SynOptions] = None
    state: str = "syn_sent"  # syn_sent, established, migrating, closed
    closed_at: Optional[float] = None
    closed_by: Optional[str] = None
    token: Optional[int] = None
    current: Optional[tuple] = None  # the server that holds the connection now
    reqno: int = 0  # the last accepted Migrate ReqNo
    migrator: Optional[tuple] = None  # source of the last accepted Migrate SYN
    pending: Optional[tuple] = None  # (new server, old server, lock started) while the lock is on
    synack: Optional[bytes] = None  # our last SYN/ACK, for retransmitted Migrate SYNs
    macs: Optional[tuple] = None  # (client MAC, router MAC) for frames the shim builds
    held_rst: Optional[tuple] = None  # (frame, keep_vnet, deadline): MIGRATE-WAIT
    migrations: int = 0
    servers: list = dataclasses.field(default_factory=list)  # every server that held it, in order

    @property
    def key(self) -> tuple:
        return self.client + self.server


class ClientShim:
    """Decides the frames the fast path hands over; keeps the per-connection shim state."""

    def __init__(self, table, tag_syns: bool = True, migrate_wait: float = MIGRATE_WAIT) -> None:
        self.table = table
        self.tag_syns = tag_syns
        self.migrate_wait = migrate_wait
        self.connections: dict = {}
        self.by_token: dict = {}
        self.by_server: dict = {}  # (server ip, port, client ip, port) -> the connection's original server
        self._events: list = []
        self.counters = dict.fromkeys(
            ("syns", "syns_tagged", "syns_already_permitted", "syns_no_room", "synacks", "rsts", "punted_other",
             "malformed", "expired", "migrate_syns", "migrations", "migrate_retransmissions",
             "migrate_rejected_token", "migrate_rejected_request", "migrate_rejected_stale",
             "migrate_rejected_redundant", "migrate_rejected_tuple", "migrate_rejected_not_permitted",
             "lock_dropped_client", "lock_dropped_rst", "lock_timeouts", "rsts_held", "rsts_released",
             "rsts_discarded", "old_server_resets"), 0)

    def pop_events(self) -> list:
        """What happened since the last call, as (kind, fields) pairs."""
        events, self._events = self._events, []
        return events

    # -- dispatch ------------------------------------------------------------------------

    def handle(self, direction: str, frame: bytearray, now: float, partial: bool = False) -> list:
        """A punted frame from direction; returns [(direction, frame, keep_vnet)] to send on."""
        v = fp.parse(frame)
        if not v.is_tcp:
            if v.error:
                self.counters["malformed"] += 1
            return [(direction, frame, True)]
        syn_ack = v.flags & (fp.SYN | fp.ACK)
        if direction == OUT:
            if syn_ack == fp.SYN:
                return [self._client_syn(frame, v, now)]
            conn = self.connections.get((v.src_ip, v.sport, v.dst_ip, v.dport))
            if conn is not None and v.flags & fp.RST:
                return self._client_rst(conn, frame, v, now, partial)
            self.counters["punted_other"] += 1
            return self._to_current(conn, frame, v, partial) if conn else [(OUT, frame, True)]
        if syn_ack == fp.SYN and v.opts & fp.HAS_MIGRATE:
            return self._migrate_syn(frame, v, now)
        conn = self.connections.get((v.dst_ip, v.dport) + self._orig_for(v))
        src = (v.src_ip, v.sport)
        if conn is None:
            if syn_ack == fp.SYN | fp.ACK:
                self.counters["synacks"] += 1
            return [(IN, frame, True)]
        if conn.pending and src == conn.pending[0]:
            return self._from_new_server(conn, frame, v, now, partial)
        if syn_ack == fp.SYN | fp.ACK and src == conn.server and conn.current in (None, conn.server):
            self._server_synack(conn, v, now)
            return [(IN, frame, True)]
        if v.flags & fp.RST:
            return self._server_rst(conn, frame, v, now, partial)
        if src == conn.current:
            self.counters["punted_other"] += 1
            return self._from_current(conn, frame, v, partial)
        return []  # a former server's frame: the connection is not its any more

    def _orig_for(self, v) -> tuple:
        """The original server of the connection a server->client frame belongs to."""
        return self.by_server.get((v.src_ip, v.sport, v.dst_ip, v.dport), (v.src_ip, v.sport))

    # -- the original handshake ---------------------------------------------------------

    def _client_syn(self, frame: bytearray, v, now: float) -> tuple:
        self.counters["syns"] += 1
        client, server = (v.src_ip, v.sport), (v.dst_ip, v.dport)
        key = client + server
        syn = SynOptions.from_view(v)
        modified = False
        conn = self.connections.get(key)
        if conn is not None and conn.client_syn.isn != syn.isn:
            self._forget(conn)  # a new connection reusing the 4-tuple
            conn = None
        if syn.migrate_permitted:
            self.counters["syns_already_permitted"] += 1
            tagged = False
        elif self.tag_syns and fp.insert_option(frame, fp.opt_migrate_permitted()):
            # a retransmitted SYN gets the same option, so it stays identical to the first
            self.counters["syns_tagged"] += 1
            tagged = modified = True
        else:
            self.counters["syns_no_room"] += 1
            tagged = False
        if conn is None:
            conn = Connection(client, server, syn, now, tagged, tagged or syn.migrate_permitted, current=server,
                              servers=[server])
            conn.macs = (frame[6:12], frame[0:6])  # (client, router) as the client's SYN carries them
            self.connections[key] = conn
            self._index(conn, server)
            self.table.set(v.src, v.sport, v.dst, v.dport, fp.PASS, punt_flags=PUNT_FLAGS)
            self.table.set(v.dst, v.dport, v.src, v.sport, fp.PASS, punt_flags=PUNT_FLAGS)
            self._events.append(("conn_open", {"client": list(client), "server": list(server), "tagged": tagged,
                                               "migrate_permitted": conn.migrate_permitted, "client_isn": syn.isn}))
        return (OUT, frame, not modified)

    def _server_synack(self, conn: Connection, v, now: float) -> None:
        self.counters["synacks"] += 1
        conn.server_syn = SynOptions.from_view(v)
        if conn.state == "syn_sent":
            conn.state = "established"
            if conn.migrate_permitted:
                conn.token = fp.migrate_token(conn.client_syn.isn, v.seq)
                self.by_token[conn.token] = conn
            self._events.append(("conn_established", {"client": list(conn.client), "server": list(conn.server),
                                                      "server_isn": v.seq}))

    # -- the Migrate handshake -------------------------------------------------------------

    def _migrate_syn(self, frame: bytearray, v, now: float) -> list:
        self.counters["migrate_syns"] += 1
        src, client = (v.src_ip, v.sport), (v.dst_ip, v.dport)
        conn = self.by_token.get(v.migrate_token)
        reject = None
        if conn is None or conn.state == "closed":
            reject = "token"
        elif conn.client != client:
            reject = "tuple"
        elif not conn.migrate_permitted or conn.server_syn is None:
            reject = "not_permitted"
        elif fp.migrate_request(conn.client_syn.isn, conn.server_syn.isn, b"", v.seq,
                                v.migrate_reqno) != v.migrate_request:
            reject = "request"
        elif v.migrate_reqno == conn.reqno and conn.reqno != 0:
            if src == conn.migrator and conn.synack is not None:
                self.counters["migrate_retransmissions"] += 1
                return [(OUT, bytearray(conn.synack), False)]
            reject = "redundant"
        elif not fp.reqno_newer(v.migrate_reqno, conn.reqno):
            reject = "stale"
        if reject is not None:
            self.counters[f"migrate_rejected_{reject}"] += 1
            self._events.append(("migrate_rejected", {"from": list(src), "client": list(client), "reason": reject,
                                                      "reqno": v.migrate_reqno}))
            return [(OUT, self._rst_reply(frame, v), False)]
        return self._accept(conn, frame, v, src, now)

    def _accept(self, conn: Connection, frame: bytearray, v, src: tuple, now: float) -> list:
        (cip, cport), (oip, oport) = conn.client, conn.server
        old = conn.pending[0] if conn.pending else conn.current
        c2s = self.table.get(cip, cport, oip, oport)
        s2c = self.table.get(old[0], old[1], cip, cport) if old else None
        acked = s2c.ack if s2c is not None and s2c.flags_seen & fp.ACK else (conn.client_syn.isn + 1) & fp.MASK32
        rcv_nxt = c2s.ack if c2s is not None and c2s.flags_seen & fp.ACK else (conn.server_syn.isn + 1) & fp.MASK32
        window = c2s.window if c2s is not None and c2s.frames else 65535
        ts = conn.client_syn.timestamps and conn.server_syn.timestamps
        tsval = c2s.tsval if ts and c2s is not None and c2s.ts_seen else None
        tsecr = s2c.tsval if ts and s2c is not None and s2c.ts_seen else None
        if ts and tsval is None:
            tsval = conn.client_syn.tsval or 0
        client_mac, router_mac = frame[0:6], frame[6:12]  # the Migrate SYN came from the router
        synack = fp.build_migrate_synack(cip, src[0], cport, src[1], acked, rcv_nxt, window,
                                         tsval=tsval if ts else None, tsecr=(tsecr or 0) if ts else None,
                                         eth_src=client_mac, eth_dst=router_mac)
        conn.reqno, conn.migrator, conn.synack = v.migrate_reqno, src, synack
        conn.macs = (bytes(client_mac), bytes(router_mac))
        conn.pending = (src, old, now)
        conn.state = "migrating"
        if conn.held_rst is not None:  # MIGRATE-WAIT ends well: the RST never reaches the client
            conn.held_rst = None
            self.counters["rsts_discarded"] += 1
        # the lock: the client's frames and the new server's wait for its first ACK
        self.table.set(cip, cport, oip, oport, fp.DROP, punt_flags=fp.RST)
        self.table.set(src[0], src[1], cip, cport, fp.PYTHON)
        if old is not None and old != src:
            self.table.set(old[0], old[1], cip, cport, fp.DROP, punt_flags=fp.SYN)
        self._index(conn, src)
        self._events.append(("migrate_accepted", {"client": list(conn.client), "to": list(src),
                                                  "from": list(old) if old else None, "reqno": v.migrate_reqno,
                                                  "seq": acked, "ack": rcv_nxt, "tsecr": tsecr}))
        return [(OUT, bytearray(synack), False)]

    def _from_new_server(self, conn: Connection, frame: bytearray, v, now: float, partial: bool) -> list:
        if v.flags & fp.SYN:
            return [] if not v.opts & fp.HAS_MIGRATE else self._migrate_syn(frame, v, now)
        if v.flags & fp.RST:
            self.counters["lock_dropped_rst"] += 1
            return []
        if not v.flags & fp.ACK:
            return []
        # the new server's first ACK (its window probe after TCP_REPAIR off): it is live
        new, old, started = conn.pending
        (cip, cport), (oip, oport) = conn.client, conn.server
        conn.pending = None
        conn.current = new
        conn.state = "established"
        conn.migrations += 1
        conn.servers.append(new)
        self.counters["migrations"] += 1
        if new == conn.server:  # back to the original server: nothing to rewrite
            self.table.set(cip, cport, oip, oport, fp.PASS, punt_flags=PUNT_FLAGS)
            self.table.set(oip, oport, cip, cport, fp.PASS, punt_flags=PUNT_FLAGS)
        else:
            self.table.set(cip, cport, oip, oport, fp.REWRITE, new_dst=new[0], new_dport=new[1],
                           punt_flags=PUNT_FLAGS)
            self.table.set(new[0], new[1], cip, cport, fp.REWRITE, new_src=oip, new_sport=oport,
                           punt_flags=PUNT_FLAGS)
        out = self._from_current(conn, frame, v, partial)
        if old is not None and old != new:
            out.append((OUT, self._reset_old(conn, old), False))
        self._events.append(("migrated", {"client": list(conn.client), "to": list(new),
                                          "from": list(old) if old else None, "reqno": conn.reqno,
                                          "lock_ms": round((now - started) * 1000, 3)}))
        return out

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
        return self._to_current(conn, frame, v, partial)

    def _server_rst(self, conn: Connection, frame: bytearray, v, now: float, partial: bool) -> list:
        self.counters["rsts"] += 1
        if (v.src_ip, v.sport) != conn.current:
            return []  # a former server's RST
        if conn.migrate_permitted and conn.state == "established" and self.migrate_wait > 0:
            conn.held_rst = (bytearray(frame), partial, now + self.migrate_wait)
            self.counters["rsts_held"] += 1
            self._events.append(("rst_held", {"client": list(conn.client), "server": list(conn.current),
                                              "seconds": self.migrate_wait}))
            return []
        self._close(conn, now, "server")
        return self._from_current(conn, frame, v, partial)

    def _close(self, conn: Connection, now: float, by: str) -> None:
        if conn.state != "closed":
            conn.state, conn.closed_at, conn.closed_by = "closed", now, by
            self._events.append(("conn_reset", {"client": list(conn.client), "server": list(conn.server),
                                                "by": by}))

    # -- bookkeeping -----------------------------------------------------------------------

    def _index(self, conn: Connection, server: tuple) -> None:
        """Remember that frames from `server` to the client belong to conn (found by its original)."""
        self.by_server[server + conn.client] = conn.server

    def _forget(self, conn: Connection) -> None:
        (cip, cport), (oip, oport) = conn.client, conn.server
        self.table.remove(cip, cport, oip, oport)
        for s in set(conn.servers) | ({conn.pending[0]} if conn.pending else set()):
            self.table.remove(s[0], s[1], cip, cport)
            self.by_server.pop(s + conn.client, None)
        if conn.token is not None and self.by_token.get(conn.token) is conn:
            del self.by_token[conn.token]
        self.connections.pop(conn.key, None)

    def _flows(self, conn: Connection):
        (cip, cport), (sip, sport) = conn.client, conn.current or conn.server
        return self.table.get(cip, cport, conn.server[0], conn.server[1]), self.table.get(sip, sport, cip, cport)

    def tick(self, now: float) -> list:
        """Timers: MIGRATE-WAIT expiry (held RSTs delivered), lock timeouts, forgetting.
        Returns actions like handle()."""
        out = []
        for key, conn in list(self.connections.items()):
            if conn.held_rst is not None and now >= conn.held_rst[2]:
                frame, partial, _ = conn.held_rst
                conn.held_rst = None
                self.counters["rsts_released"] += 1
                self._close(conn, now, "server")
                v = fp.parse(frame)
                out += self._from_current(conn, frame, v, partial)
            if conn.pending is not None and now - conn.pending[2] > LOCK_TIMEOUT:
                self._lock_timeout(conn, now)
            out_flow, in_flow = self._flows(conn)
            last = max((f.last_seen for f in (out_flow, in_flow) if f is not None and f.frames), default=conn.opened)
            if conn.state != "closed" and out_flow and in_flow and out_flow.flags_seen & fp.FIN \
                    and in_flow.flags_seen & fp.FIN:
                conn.state, conn.closed_at, conn.closed_by = "closed", last, "fin"
            done = conn.state == "closed" and now - (conn.closed_at or now) > CLOSED_LINGER
            if done or now - last > IDLE_TIMEOUT:
                self._forget(conn)
                self.counters["expired"] += 1
                self._events.append(("conn_forgotten", {"client": list(conn.client), "server": list(conn.server),
                                                        "state": conn.state}))
        return out

    def _lock_timeout(self, conn: Connection, now: float) -> None:
        """The new server never came: go back to the connection's previous binding."""
        new, old, _ = conn.pending
        conn.pending = None
        conn.state = "established"
        self.counters["lock_timeouts"] += 1
        (cip, cport), (oip, oport) = conn.client, conn.server
        self.table.remove(new[0], new[1], cip, cport) if new not in conn.servers else None
        cur = conn.current
        if cur == conn.server:
            self.table.set(cip, cport, oip, oport, fp.PASS, punt_flags=PUNT_FLAGS)
            self.table.set(oip, oport, cip, cport, fp.PASS, punt_flags=PUNT_FLAGS)
        else:
            self.table.set(cip, cport, oip, oport, fp.REWRITE, new_dst=cur[0], new_dport=cur[1], punt_flags=PUNT_FLAGS)
            self.table.set(cur[0], cur[1], cip, cport, fp.REWRITE, new_src=oip, new_sport=oport, punt_flags=PUNT_FLAGS)
        self._events.append(("migrate_lock_timeout", {"client": list(conn.client), "to": list(new)}))

    def snapshot(self, limit: int = None) -> list:
        """Connections (the `limit` most recently opened) with what the fast path last saw
        each way (JSON-able)."""
        out = []
        conns = list(self.connections.values())
        if limit is not None and len(conns) > limit:
            conns = sorted(conns, key=lambda c: c.opened)[-limit:]
        for conn in conns:
            c2s, s2c = self._flows(conn)
            d = {
                "client": list(conn.client), "server": list(conn.server),
                "current": list(conn.current) if conn.current else None, "state": conn.state,
                "tagged": conn.tagged, "migrate_permitted": conn.migrate_permitted,
                "client_syn": dataclasses.asdict(conn.client_syn),
                "server_syn": dataclasses.asdict(conn.server_syn) if conn.server_syn else None,
                "opened": conn.opened, "closed_at": conn.closed_at, "closed_by": conn.closed_by,
                "reqno": conn.reqno, "migrations": conn.migrations, "servers": [list(s) for s in conn.servers],
                "migrating_to": list(conn.pending[0]) if conn.pending else None,
                "rst_held": conn.held_rst is not None,
                "client_to_server": _flow_view(c2s), "server_to_client": _flow_view(s2c),
            }
            out.append(d)
        return out


def _flow_view(flow) -> Optional[dict]:
    if flow is None:
        return None
    return {"frames": flow.frames, "bytes": flow.bytes, "last_seen": flow.last_seen, "flags_seen": flow.flags_seen,
            "seq_next": flow.seq_next, "ack": flow.ack, "window": flow.window,
            "tsval": flow.tsval if flow.ts_seen else None, "tsecr": flow.tsecr if flow.ts_seen else None}
