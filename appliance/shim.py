"""The client appliance's protocol core, sans-I/O: frames and `now` in, frames to send out.

The shim gives an unmodified client kernel the Migrate options (DESIGN §3, §4): it tags
the client's SYNs with Migrate-Permitted where they have room, and keeps per connection
what a takeover needs (notes/tcp-repair.md, "Shim state"): both ISNs, both option sets,
and the latest ACK, window and TSval in each direction with the time seen. The last
three are tracked in the flow table by the fast path for every frame; the shim reads
them from the table rather than seeing the frames.

Directions: OUT is client -> network, IN is network -> client.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import _fastpath as fp

OUT, IN = "out", "in"
PUNT_FLAGS = fp.SYN | fp.RST  # what the fast path hands over for known connections
CLOSED_LINGER = 10.0  # seconds a closed connection stays visible before it is forgotten
IDLE_TIMEOUT = 600.0  # seconds without a frame before an open connection is forgotten


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
    server: tuple
    client_syn: SynOptions
    opened: float
    tagged: bool  # we added Migrate-Permitted to the client's SYN
    migrate_permitted: bool  # the connection can be migrated (our tag, or the client's own)
    server_syn: Optional[SynOptions] = None
    state: str = "syn_sent"  # syn_sent, established, closed
    closed_at: Optional[float] = None
    closed_by: Optional[str] = None

    @property
    def key(self) -> tuple:
        return self.client + self.server


class ClientShim:
    """Decides the frames the fast path hands over; keeps the per-connection shim state."""

    def __init__(self, table, tag_syns: bool = True) -> None:
        self.table = table
        self.tag_syns = tag_syns
        self.connections: dict = {}
        self._events: list = []
        self.counters = dict.fromkeys(
            ("syns", "syns_tagged", "syns_already_permitted", "syns_no_room", "synacks", "rsts", "punted_other",
             "malformed", "expired"), 0)

    def pop_events(self) -> list:
        """What happened since the last call, as (kind, fields) pairs."""
        events, self._events = self._events, []
        return events

    def handle(self, direction: str, frame: bytearray, now: float) -> list:
        """A punted frame from direction; returns [(direction, frame, modified)] to send on."""
        v = fp.parse(frame)
        if not v.is_tcp:
            if v.error:
                self.counters["malformed"] += 1
            return [(direction, frame, False)]
        if direction == OUT and v.flags & (fp.SYN | fp.ACK) == fp.SYN:
            return [self._client_syn(frame, v, now)]
        if direction == IN and v.flags & (fp.SYN | fp.ACK) == fp.SYN | fp.ACK:
            self._server_synack(v, now)
        elif v.flags & fp.RST:
            self._rst(direction, v, now)
        else:
            self.counters["punted_other"] += 1
        return [(direction, frame, False)]

    def _client_syn(self, frame: bytearray, v, now: float) -> tuple:
        self.counters["syns"] += 1
        client, server = (v.src_ip, v.sport), (v.dst_ip, v.dport)
        key = client + server
        syn = SynOptions.from_view(v)
        modified = False
        conn = self.connections.get(key)
        if conn is not None and conn.client_syn.isn != syn.isn:
            conn = None  # a new connection reusing the 4-tuple
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
            conn = Connection(client, server, syn, now, tagged, tagged or syn.migrate_permitted)
            self.connections[key] = conn
            self._events.append(("conn_open", {"client": list(client), "server": list(server), "tagged": tagged,
                                               "migrate_permitted": conn.migrate_permitted, "client_isn": syn.isn}))
            for args in ((v.src, v.sport, v.dst, v.dport), (v.dst, v.dport, v.src, v.sport)):
                self.table.set(*args, fp.PASS, punt_flags=PUNT_FLAGS)
        return (OUT, frame, modified)

    def _server_synack(self, v, now: float) -> None:
        self.counters["synacks"] += 1
        conn = self.connections.get((v.dst_ip, v.dport, v.src_ip, v.sport))
        if conn is None:
            return
        conn.server_syn = SynOptions.from_view(v)
        if conn.state == "syn_sent":
            conn.state = "established"
            self._events.append(("conn_established", {"client": list(conn.client), "server": list(conn.server),
                                                      "server_isn": v.seq}))

    def _rst(self, direction: str, v, now: float) -> None:
        self.counters["rsts"] += 1
        key = (v.src_ip, v.sport, v.dst_ip, v.dport) if direction == OUT else (v.dst_ip, v.dport, v.src_ip, v.sport)
        conn = self.connections.get(key)
        if conn is not None and conn.state != "closed":
            conn.state, conn.closed_at, conn.closed_by = "closed", now, "client" if direction == OUT else "server"
            self._events.append(("conn_reset", {"client": list(conn.client), "server": list(conn.server),
                                                 "by": conn.closed_by}))

    def _flows(self, conn: Connection):
        (cip, cport), (sip, sport) = conn.client, conn.server
        return self.table.get(cip, cport, sip, sport), self.table.get(sip, sport, cip, cport)

    def tick(self, now: float) -> None:
        """Forget connections closed a while ago or idle too long; notice FIN-closed ones."""
        for key, conn in list(self.connections.items()):
            out, inn = self._flows(conn)
            last = max((f.last_seen for f in (out, inn) if f is not None and f.frames), default=conn.opened)
            if conn.state != "closed" and out and inn and out.flags_seen & fp.FIN and inn.flags_seen & fp.FIN:
                conn.state, conn.closed_at, conn.closed_by = "closed", last, "fin"
            done = conn.state == "closed" and now - (conn.closed_at or now) > CLOSED_LINGER
            if done or now - last > IDLE_TIMEOUT:
                (cip, cport), (sip, sport) = conn.client, conn.server
                self.table.remove(cip, cport, sip, sport)
                self.table.remove(sip, sport, cip, cport)
                del self.connections[key]
                self.counters["expired"] += 1
                self._events.append(("conn_forgotten", {"client": list(conn.client), "server": list(conn.server),
                                                        "state": conn.state}))

    def snapshot(self, limit: int = None) -> list:
        """Connections (the `limit` most recently opened) with what the fast path last saw
        each way (JSON-able)."""
        out = []
        conns = list(self.connections.values())
        if limit is not None and len(conns) > limit:
            conns = sorted(conns, key=lambda c: c.opened)[-limit:]
        for conn in conns:
            c2s, s2c = self._flows(conn)
            d = dataclasses.asdict(conn)
            d["client"], d["server"] = list(conn.client), list(conn.server)
            d["client_to_server"] = _flow_view(c2s)
            d["server_to_client"] = _flow_view(s2c)
            out.append(d)
        return out


def _flow_view(flow) -> Optional[dict]:
    if flow is None:
        return None
    return {"frames": flow.frames, "bytes": flow.bytes, "last_seen": flow.last_seen, "flags_seen": flow.flags_seen,
            "seq_next": flow.seq_next, "ack": flow.ack, "window": flow.window,
            "tsval": flow.tsval if flow.ts_seen else None, "tsecr": flow.tsecr if flow.ts_seen else None}
