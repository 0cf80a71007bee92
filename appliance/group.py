"""One server appliance's membership in its support group, sans-I/O (docs/support-group.md).

GroupNode joins the three cores: the sync protocol (appliance.sync: what every peer
advertises), a failure detector per peer (appliance.health) and the takeover planner
(appliance.selection). The adapter feeds it datagrams and the local stream map's changes,
calls tick(now) every few milliseconds, sends what tick returns to every peer, and
executes the takeover actions it pops.

    g = GroupNode(config, epoch=time_us(), now=monotonic())
    g.local_add(entry, now) / g.local_remove(key, now)     # from the stream mapper
    g.receive(datagram, now)                                # -> the sender's id, or None
    for datagram in g.tick(now): send_to_every_peer(datagram)
    g.pop_actions()                                         # TakeoverAction: this node takes these over
    g.pop_events()                                          # (kind, fields) for the event log
"""

from __future__ import annotations

from typing import Optional

from .health import ALIVE, DEAD, FailureDetector
from .selection import LoadAdvertiser, MemberInfo, TakeoverPlanner
from .sync import SyncNode

CLAIM_COPIES = 3


class GroupNode:
    def __init__(self, config, epoch: int, now: float) -> None:
        n, s, h = config.node, config.sync, config.health
        self.node = n.id
        self.epoch = epoch
        self.config = config
        self.sync = SyncNode(n.id, n.group, n.key, epoch, refresh=s.refresh, heartbeat=s.heartbeat,
                             expire_periods=s.expire_periods, capacity=n.capacity, prefixes=n.prefixes,
                             sync_port=s.port)
        self.load = LoadAdvertiser()
        self.planner = TakeoverPlanner(n.id, stagger=h.stagger)
        self.detectors: dict = {}
        self.draining_peers: set = set()  # peers that advertise no capacity: theirs are to take
        self._actions: list = []
        self._events: list = []
        self.started = now
        self.counters = {"actions": 0, "races": 0, "deaths": 0, "false_suspicions": 0, "restarts": 0}

    # -- the local stream map ------------------------------------------------------------------

    def local_add(self, entry, now: float) -> bool:
        ok = self.sync.add_local(entry, now)
        self._update_load()
        return ok

    def local_remove(self, key, now: float) -> bool:
        ok = self.sync.remove_local(key, now)
        self._update_load()
        return ok

    def _update_load(self) -> None:
        n = self.sync.local_count
        self.sync.advertised_load = self.load.update(n / self.config.node.capacity)

    # -- the network -----------------------------------------------------------------------------

    def _detector(self, peer: str) -> FailureDetector:
        d = self.detectors.get(peer)
        if d is None:
            h, s = self.config.health, self.config.sync
            d = self.detectors[peer] = FailureDetector(h.detector, interval=s.heartbeat, dead_after=h.dead_after)
        return d

    def receive(self, data, now: float) -> Optional[str]:
        """One datagram; returns the sender's node id when it was valid, else None."""
        events = self.sync.receive(data, now)
        heard = self.sync.heard_from  # (sender, epoch) of a valid datagram, also when it caused no event
        sender = heard[0] if heard else None
        if heard and not any(ev.kind in ("heartbeat", "peer_new") for ev in events):
            self._detector_events(heard[0], self._detector(heard[0]).heard(now, heard[1]), now)
        for ev in events:
            if ev.kind == "heartbeat":
                self._detector_events(ev.sender, self._detector(ev.sender).heartbeat(now, ev.epoch), now)
                self._drain_check(ev.sender, ev.capacity, now)
            elif ev.kind == "peer_new":
                self._events.append(("peer_new", {"node": ev.sender, "epoch": ev.epoch}))
                self._detector_events(ev.sender, self._detector(ev.sender).heard(now, ev.epoch), now)
            elif ev.kind == "peer_epoch":
                self._events.append(("peer_restarted", {"node": ev.sender, "old_epoch": ev.old,
                                                        "new_epoch": ev.new}))
            elif ev.kind == "claim":
                races = self.planner.claim_heard(ev.sender, ev.dead_node, ev.keys, now)
                self._events.append(("claim_heard", {"by": ev.sender, "dead": ev.dead_node,
                                                     "connections": len(ev.keys)}))
                for race in races:
                    self.counters["races"] += 1
                    self._events.append(("race", {"dead": race.dead_node, "other": race.other,
                                                  "key": _key_text(race.key)}))
        return sender

    def drain(self, on: bool = True) -> None:
        """Ask the group to take this node's connections over (planned: this node stays up)."""
        self.sync.draining = on

    def _drain_check(self, peer: str, capacity: int, now: float) -> None:
        if capacity == 0 and peer not in self.draining_peers:
            self.draining_peers.add(peer)
            entries = self.sync.peer_entries(peer)
            self._events.append(("peer_draining", {"node": peer, "connections": len(entries)}))
            self.planner.peer_dead(peer, self.detectors[peer].epoch, entries, self.members(), now)
        elif capacity > 0 and peer in self.draining_peers:
            self.draining_peers.discard(peer)
            self.planner.peer_alive_again(peer)
            self._events.append(("peer_drain_over", {"node": peer}))

    def tick(self, now: float) -> list:
        """Run the detectors and the planner; the datagrams due now (to every peer)."""
        for peer, det in self.detectors.items():
            self._detector_events(peer, det.check(now), now)
        for action in self.planner.due(now):
            self._actions.append(action)
            self.counters["actions"] += 1
            self.sync.claim(action.dead_node, action.dead_epoch, [action.key], now, copies=CLAIM_COPIES)
        for sender, key in self.sync.expire(now):
            pass  # soft state: an entry nobody refreshed is simply gone
        return [datagram for _, datagram in self.sync.outgoing(now)]

    def _detector_events(self, peer: str, events, now: float) -> None:
        for ev in events:
            kind = ev[0]
            if kind == "dead":
                self.counters["deaths"] += 1
                entries = self.sync.peer_entries(peer)
                self._events.append(("peer_dead", {"node": peer, "silence_ms": round(ev[2] * 1000, 1),
                                                   "connections": len(entries)}))
                self.planner.peer_dead(peer, self.detectors[peer].epoch, entries, self.members(), now)
            elif kind == "false_suspicion":
                # the suspicion round is over: its claims and actions must not stop the next
                # round (a real death within claim_ttl would otherwise find every connection
                # "claimed" and nobody would take it)
                self.counters["false_suspicions"] += 1
                cancelled = self.planner.peer_alive_again(peer)
                self.planner.forget(peer)
                self._events.append(("false_suspicion", {"node": peer, "cancelled": cancelled}))
            elif kind == "restarted":
                self.counters["restarts"] += 1
                self.planner.forget(peer)
                self._events.append(("peer_restarted", {"node": peer, "old_epoch": ev[1], "new_epoch": ev[2]}))
            elif kind in ("suspect", "alive"):
                self._events.append((f"peer_{kind}", {"node": peer}))

    # -- views -------------------------------------------------------------------------------------

    def members(self) -> dict:
        """Every member as the planner sees it: this node, and each peer we have heard."""
        out = {self.node: MemberInfo(load=self.sync.advertised_load, prefixes=tuple(self.config.node.prefixes),
                                     alive=not self.sync.draining)}
        for peer, det in self.detectors.items():
            info = self.sync.peer_info(peer) or {}
            out[peer] = MemberInfo(load=info.get("load") or 0.0, prefixes=tuple(info.get("prefixes") or ("/",)),
                                   alive=det.state != DEAD and peer not in self.draining_peers)
        return out

    def peer_state(self, peer: str) -> Optional[str]:
        d = self.detectors.get(peer)
        return None if d is None else d.state

    def pop_actions(self) -> list:
        out, self._actions = self._actions, []
        return out

    def pop_events(self) -> list:
        out, self._events = self._events, []
        return out

    def snapshot(self, now: float) -> dict:
        peers = {}
        for peer, det in self.detectors.items():
            info = self.sync.peer_info(peer) or {}
            peers[peer] = {**det.snapshot(now), "entries": info.get("entries"), "load": info.get("load"),
                           "connections": info.get("connections"), "capacity": info.get("capacity"),
                           "prefixes": info.get("prefixes")}
        return {"node": self.node, "epoch": self.epoch, "local_entries": self.sync.local_count,
                "advertised_load": self.sync.advertised_load, "peers": peers, "planner": self.planner.counters(),
                "sync": self.sync.counters(), "group": dict(self.counters)}


def _key_text(key) -> str:
    import socket
    cip, cport, sip, sport = key
    fam = socket.AF_INET if len(cip) == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(fam, cip)}:{cport}->{socket.inet_ntop(fam, sip)}:{sport}"
