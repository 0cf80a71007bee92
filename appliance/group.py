"""One server appliance's membership in its support group, sans-I/O (docs/support-group.md).

GroupNode joins the three cores: the sync protocol (appliance.sync: what every peer
advertises), a failure detector per peer (appliance.health) and the takeover planner
(appliance.selection). The adapter feeds it datagrams and the local stream map's changes,
calls tick(now) every few milliseconds (or at next_deadline()), sends what tick returns to
every peer, and executes the takeover actions it pops.

    g = GroupNode(config, epoch=time_us(), now=monotonic())
    g.local_add(entry, now) / g.local_remove(key, now)     # from the stream mapper
    g.receive(datagram, now)                                # -> the sender's id, or None
    for datagram in g.tick(now): send_to_every_peer(datagram)
    g.next_deadline()                                       # when tick() must run next
    g.pop_actions()                                         # TakeoverAction: this node takes these over
    g.claim_action(action, now) / g.pass_action(action, now)   # when it starts / if it cannot serve
    g.pop_events()                                          # (kind, fields) for the event log
    g.pop_disowned()                                        # keys taken over elsewhere: drop the local socket
    g.pop_revoked()                                         # (key, peer): own takeovers of a peer that was alive

Claim, then check: the adapter claims an action when it starts it (the others stand down,
even while it waits in the takeover queue), then checks that its local server can serve the
rest (appliance.takeover); if not, it passes the connection on, which withdraws the claim
(the next candidate acts at once, without waiting for its stagger); the last candidate
resets the client instead of passing.

Overload must not become a storm (docs/support-group.md, "Overload"):

* Local health (Lifeguard). Each tick measures its own lag: how late it runs against the
  deadline it was asked to run at (next_deadline() at the end of the previous tick, or
  sooner when a datagram queued urgent work). A tick more than one heartbeat interval late
  is *lagging*: the detectors are not checked (nobody is declared dead, no takeover starts)
  until SETTLE_BEATS intervals after the last lagging tick, datagrams read meanwhile are
  signs of life but not inter-arrival samples (they waited in the socket), and the detectors
  forget the gap across the stall. Lag above the adapter's tick slack raises the detectors'
  thresholds by the local health multiplier 1 + recent lag / dead_after (the recent lag
  decays with a half-life of LAG_HALF_LIFE s; at most MAX_MULTIPLIER).
* Indirect confirmation (SWIM). A detector that declares peer P dead does not hand P's
  connections to the planner at once when a third member exists: the node asks the members
  it considers alive (PROBE_REQ) whether they miss P too. One "I miss it" (PROBE_ACK with
  state SUSPECT or DEAD, or a silence of at least dead_after / 2) confirms; every member
  asked answering "alive" refutes (nothing happens; P is asked about again every
  REPROBE_AFTER s while it stays silent); members that die meanwhile leave the ask set, and
  an empty ask set proceeds alone. A PROBE_REQ or a CLAIM about P from another member is a
  confirmation too (it misses P).
* No re-migration on a fresh suspicion. A connection learnt from the group with a newer
  ReqNo less than RECENT_MOVE s ago is taken over again only on a confirmed death; without
  confirmation it is held back MOVED_HOLD s and taken only if its owner is still dead then.
  An entry that another member (or this node) advertises with a newer ReqNo is stale and
  never taken.
* Isolation. A member whose every peer went silent at once (within ISOLATION_WINDOW_BEATS
  intervals of each other, two peers at least) is most likely the one cut off. It waits
  ISOLATION_HOLD s more before it acts alone (a crash of every other member must still be
  taken over), and the moment it hears any peer again it cancels every decision it made
  alone and not yet executed, asks again, and reports the takeovers it started on peers
  that turn out alive (pop_revoked). It never takes over, on a suspicion alone, a
  connection that migrated recently (above), so after a heal it cannot steal back the
  connections the group took over from it: it learns they moved and disowns them.
"""

from __future__ import annotations

import math
from typing import Optional

import _fastpath as fp

from .health import ALIVE, DEAD, SUSPECT, UNKNOWN, FailureDetector
from .selection import LoadAdvertiser, MemberInfo, TakeoverPlanner
from .sync import PROBE_STATES, SyncNode

CLAIM_COPIES = 3

# -- overload and confirmation (named constants; see the module docstring) -----------------------
LAG_BEATS = 1.0              # a tick later than this many heartbeat intervals past its deadline lags
SETTLE_BEATS = 2.0           # detectors are checked again this many intervals after the last lagging tick
LAG_SLACK_MIN = 0.008        # lag below max(this, interval / 4 + 3 ms) is the adapter's tick cadence
LAG_GAIN = 1.0               # multiplier = 1 + LAG_GAIN x recent lag / dead_after
LAG_HALF_LIFE = 1.0          # seconds: how fast the recent lag decays on on-time ticks
MAX_MULTIPLIER = 4.0
PROBE_TIMEOUT_BEATS = 3.0    # a probe round waits this many intervals for an answer
PROBE_COPIES = 2             # each PROBE_REQ is sent twice, one interval apart (loss)
PROBE_ROUNDS = 3             # rounds before proceeding alone when members are heard but never answer
REPROBE_AFTER = 1.0          # a refuted peer that stays silent is asked about again this often (s)
RECENT_MOVE = 5.0            # a connection that migrated less than this long ago (s) ...
MOVED_HOLD = 2.0             # ... is held back this long (s) when its owner's death is not confirmed
MOVED_MEMORY = 30.0          # how long the time of a migration is remembered (s)
ISOLATION_WINDOW_BEATS = 3.0  # peers whose last signs of life are this close went silent "at once"
ISOLATION_HOLD = 0.2         # an isolated member waits this much longer (s) before it acts alone
REVOKE_WINDOW = 10.0         # own takeovers of a peer are remembered this long (s) for pop_revoked

_STATE_CODE = {s: i for i, s in enumerate(PROBE_STATES)}


class _Probe:
    """One indirect confirmation in progress: is `target` dead for the others too?"""

    __slots__ = ("target", "epoch", "nonce", "asked", "alive", "unknown", "started", "deadline", "rounds",
                 "silence")

    def __init__(self, target, epoch, nonce, asked, now, deadline, silence) -> None:
        self.target, self.epoch, self.nonce = target, epoch, nonce
        self.asked = set(asked)
        self.alive: set = set()
        self.unknown: set = set()
        self.started, self.deadline, self.rounds, self.silence = now, deadline, 1, silence


class _Hold:
    """Connections of a dead peer held back: released at `until` if it is still dead."""

    __slots__ = ("epoch", "entries", "until", "why", "silence")

    def __init__(self, epoch, entries, until, why, silence) -> None:
        self.epoch, self.entries, self.until, self.why, self.silence = epoch, entries, until, why, silence


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
        self._by_client: dict = {}  # (client ip, port) -> {key of a local entry}
        self.disowned: dict = {}  # key -> when: taken over by a newer ReqNo elsewhere; never re-advertised
        self._disowned_new: list = []
        self.started = now
        self.counters = {"actions": 0, "claims": 0, "passes": 0, "races": 0, "deaths": 0, "false_suspicions": 0,
                         "restarts": 0, "disowned": 0,
                         # local health
                         "late_ticks": 0, "lag_ticks": 0, "lag_episodes": 0, "max_lag_ms": 0.0, "stale_arrivals": 0,
                         # indirect confirmation
                         "probes_sent": 0, "probe_rounds": 0, "probes_answered": 0, "probe_acks": 0,
                         "probe_acks_unmatched": 0, "confirmations": 0, "refuted": 0, "proceeded_alone": 0,
                         "unanswered": 0, "isolations": 0,
                         # re-migration
                         "held_back": 0, "held_released": 0, "held_dropped": 0, "superseded": 0, "revoked": 0}
        hb, da = s.heartbeat, h.dead_after
        self._heartbeat, self._dead_after = hb, da
        self._lag_limit = LAG_BEATS * hb
        self._lag_slack = max(LAG_SLACK_MIN, hb / 4 + 0.003)
        self._settle = SETTLE_BEATS * hb
        self._probe_timeout = PROBE_TIMEOUT_BEATS * hb
        self._isolation_window = ISOLATION_WINDOW_BEATS * hb
        self._now = now
        self._asked: Optional[float] = None  # the deadline the next tick was asked to run at
        self._quiet_until = -math.inf  # detectors unchecked until then (after a lagging tick)
        self._rebase = False
        self._lag_episode: Optional[list] = None  # [start, ticks, max lag] of the current lag episode
        self._lag_score, self._lag_at = 0.0, now
        self.lag = 0.0  # the last tick's lag
        self.multiplier = 1.0
        self._nonce = (epoch * 2654435761) & 0xFFFFFFFF
        self._probes: dict = {}  # peer -> _Probe
        self._refuted: dict = {}  # peer -> [epoch, next re-probe]
        self._reqs: dict = {}  # peer -> {asker: when}: members that told us they miss the peer
        self._held: dict = {}  # peer -> [_Hold]
        self._moved: dict = {}  # (client ip, port) -> (when, owner, reqno, ni, na): learnt migrations
        self._moved_sweep = now + MOVED_MEMORY
        self._suspected: dict = {}  # peer -> when its detector declared it dead
        self._isolated_since: Optional[float] = None
        self._solo: set = set()  # peers acted on alone while isolated: re-asked when isolation ends
        self._took: dict = {}  # peer -> {key: when}: own takeover actions, for pop_revoked
        self._revoked: list = []

    # -- the local stream map ------------------------------------------------------------------

    def local_add(self, entry, now: float) -> bool:
        """Advertise a local connection (False when it was taken over elsewhere: disowned)."""
        if entry.key in self.disowned:
            return False
        ok = self.sync.add_local(entry, now)
        if ok:
            self._by_client.setdefault(entry.key[:2], set()).add(entry.key)
        self._update_load()
        return ok

    def local_remove(self, key, now: float) -> bool:
        ok = self.sync.remove_local(key, now)
        keys = self._by_client.get(key[:2])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_client[key[:2]]
        self._update_load()
        return ok

    def forget_disowned(self, key) -> None:
        """The local connection is closed: its key may be advertised again if it is reused."""
        self.disowned.pop(key, None)

    def _check_moved(self, now: float) -> None:
        """A peer advertises, with a newer ReqNo, a connection this node still advertises: it
        was taken over (this node was partitioned, or falsely suspected): stop claiming it.
        Every migration learnt is also remembered (when, by whom) for the re-migration rules."""
        moved = self.sync.moved
        while moved:
            peer, e = moved.popleft()
            self._moved[e.key[:2]] = (now, peer, e.reqno, e.ni, e.na)
            for key in list(self._by_client.get(e.key[:2], ())):
                mine = self.sync.local_entries_get(key)
                if mine is None or (mine.ni, mine.na) != (e.ni, e.na) or not fp.reqno_newer(e.reqno, mine.reqno):
                    continue
                self.local_remove(key, now)
                self.disowned[key] = now
                self._disowned_new.append(key)
                self.counters["disowned"] += 1
                self._events.append(("disowned", {"key": _key_text(key), "by": peer, "reqno": e.reqno,
                                                  "mine": mine.reqno}))
        if now >= self._moved_sweep:
            self._moved_sweep = now + MOVED_MEMORY / 4
            limit = now - MOVED_MEMORY
            for k in [k for k, m in self._moved.items() if m[0] < limit]:
                del self._moved[k]
            limit = now - REVOKE_WINDOW
            for peer in list(self._took):
                took = {k: at for k, at in self._took[peer].items() if at >= limit}
                if took:
                    self._took[peer] = took
                else:
                    del self._took[peer]
            for peer in list(self._reqs):
                if all(at < limit for at in self._reqs[peer].values()):
                    del self._reqs[peer]

    def pop_disowned(self) -> list:
        out, self._disowned_new = self._disowned_new, []
        return out

    def pop_revoked(self) -> list:
        """(key, peer) of takeover actions this node started, in the last REVOKE_WINDOW s, on a
        peer that then turned out alive (a false suspicion, or the end of this node's
        isolation). An adapter should abandon those still in their Migrate handshake (not yet
        answered by the client appliance): they would take a live connection from its owner."""
        out, self._revoked = self._revoked, []
        return out

    def _update_load(self) -> None:
        n = self.sync.local_count
        self.sync.advertised_load = self.load.update(n / self.config.node.capacity)

    # -- the network -----------------------------------------------------------------------------

    def _detector(self, peer: str) -> FailureDetector:
        d = self.detectors.get(peer)
        if d is None:
            h, s = self.config.health, self.config.sync
            d = self.detectors[peer] = FailureDetector(h.detector, interval=s.heartbeat, dead_after=h.dead_after)
            if self.multiplier != 1.0:
                d.set_multiplier(self.multiplier)
        return d

    def _urgent(self, now: float) -> None:
        """Something is due at once (a datagram queued, a takeover decided): the next tick is
        asked for now."""
        if self._asked is None or now < self._asked:
            self._asked = now

    def receive(self, data, now: float) -> Optional[str]:
        """One datagram; returns the sender's node id when it was valid, else None."""
        if now > self._now:
            self._now = now
        if self._asked is not None and now - self._asked > self._lag_limit:
            # no tick since long past its deadline: this process is stalled, and what it reads
            # now waited in the socket (a sign of life, not an arrival time)
            self._quiet(now)
        fresh = now >= self._quiet_until
        if fresh and self._rebase:
            self._rebase_all()
        events = self.sync.receive(data, now)
        heard = self.sync.heard_from  # (sender, epoch) of a valid datagram, also when it caused no event
        sender = heard[0] if heard else None
        if heard and not any(ev.kind in ("heartbeat", "peer_new") for ev in events):
            self._detector_events(heard[0], self._detector(heard[0]).heard(now, heard[1]), now)
        for ev in events:
            if ev.kind == "heartbeat":
                if not fresh:
                    self.counters["stale_arrivals"] += 1
                self._detector_events(ev.sender, self._detector(ev.sender).heartbeat(now, ev.epoch, sample=fresh),
                                      now)
                self._drain_check(ev.sender, ev.capacity, now)
            elif ev.kind == "peer_new":
                self._events.append(("peer_new", {"node": ev.sender, "epoch": ev.epoch}))
                self._detector_events(ev.sender, self._detector(ev.sender).heard(now, ev.epoch), now)
            elif ev.kind == "peer_epoch":
                self._events.append(("peer_restarted", {"node": ev.sender, "old_epoch": ev.old,
                                                        "new_epoch": ev.new}))
            elif ev.kind == "pass":
                advanced = self.planner.pass_heard(ev.sender, ev.dead_node, ev.keys, now)
                self._events.append(("pass_heard", {"by": ev.sender, "dead": ev.dead_node,
                                                    "connections": len(ev.keys), "now_due": advanced}))
                if advanced:
                    self._urgent(now)
            elif ev.kind == "claim":
                races = self.planner.claim_heard(ev.sender, ev.dead_node, ev.keys, now)
                self._events.append(("claim_heard", {"by": ev.sender, "dead": ev.dead_node,
                                                     "connections": len(ev.keys)}))
                for race in races:
                    self.counters["races"] += 1
                    self._events.append(("race", {"dead": race.dead_node, "other": race.other,
                                                  "key": _key_text(race.key)}))
                # the claimer acts on dead_node's death: it misses it too
                self._evidence(ev.dead_node, ev.sender, now)
            elif ev.kind == "probe_req":
                self._probe_req(ev.sender, ev.target, ev.nonce, now)
            elif ev.kind == "probe_ack":
                self._probe_ack(ev.sender, ev.target, ev.nonce, ev.silence_ms, ev.state, now)
        if heard and self._isolated_since is not None:
            self._end_isolation(now)
        return sender

    def claim_action(self, action, now: float) -> None:
        """This node starts on the action's connection: the other candidates stand down
        (until a pass_action withdraws the claim)."""
        self.counters["claims"] += 1
        self.sync.claim(action.dead_node, action.dead_epoch, [action.key], now, copies=CLAIM_COPIES)
        self._urgent(now)

    def pass_action(self, action, now: float) -> None:
        """This node cannot serve the action's connection: the next candidate acts now."""
        self.counters["passes"] += 1
        self.planner.pass_heard(self.node, action.dead_node, [action.key], now)
        self.sync.pass_on(action.dead_node, action.dead_epoch, [action.key], now, copies=CLAIM_COPIES)
        self._urgent(now)

    def drain(self, on: bool = True) -> None:
        """Ask the group to take this node's connections over (planned: this node stays up)."""
        self.sync.draining = on

    def _drain_check(self, peer: str, capacity: int, now: float) -> None:
        if capacity == 0 and peer not in self.draining_peers:
            self.draining_peers.add(peer)
            entries = self.sync.peer_entries(peer)
            self._events.append(("peer_draining", {"node": peer, "connections": len(entries)}))
            self.planner.peer_dead(peer, self.detectors[peer].epoch, entries, self.members(), now, gone=False)
            self._urgent(now)
        elif capacity > 0 and peer in self.draining_peers:
            self.draining_peers.discard(peer)
            self.planner.peer_alive_again(peer)
            self._events.append(("peer_drain_over", {"node": peer}))

    # -- time ------------------------------------------------------------------------------------

    def _quiet(self, now: float) -> None:
        """This process lags: no death is declared until SETTLE_BEATS intervals from now."""
        until = now + self._settle
        if until > self._quiet_until:
            self._quiet_until = until
        self._rebase = True

    def _rebase_all(self) -> None:
        """The settling time is over: the gap across the stall is not the peers' rhythm."""
        self._rebase = False
        for det in self.detectors.values():
            det.rebase()

    def _local_health(self, now: float) -> None:
        """Measure this tick's lag (against the deadline it was asked to run at) and update
        the local health multiplier."""
        lag = 0.0 if self._asked is None else max(0.0, now - self._asked)
        self.lag = lag
        c = self.counters
        if lag * 1000 > c["max_lag_ms"]:
            c["max_lag_ms"] = round(lag * 1000, 3)
        dt = now - self._lag_at
        self._lag_at = now
        if self._lag_score and dt > 0:
            self._lag_score *= 0.5 ** (dt / LAG_HALF_LIFE)
            if LAG_GAIN * self._lag_score < 0.01 * self._dead_after:
                self._lag_score = 0.0  # the multiplier would be within 1 % of 1
        if lag > self._lag_slack:
            c["late_ticks"] += 1
            if lag > self._lag_score:
                self._lag_score = lag
        m = min(MAX_MULTIPLIER, 1.0 + LAG_GAIN * self._lag_score / self._dead_after)
        if abs(m - self.multiplier) >= 0.01 or (m == 1.0 and self.multiplier != 1.0):
            self.multiplier = m
            for det in self.detectors.values():
                det.set_multiplier(m)
        if lag > self._lag_limit:
            c["lag_ticks"] += 1
            self._quiet(now)
            ep = self._lag_episode
            if ep is None:
                c["lag_episodes"] += 1
                self._lag_episode = [now, 1, lag]
                self._events.append(("lagging", {"lag_ms": round(lag * 1000, 1),
                                                 "multiplier": round(self.multiplier, 2)}))
            else:
                ep[1] += 1
                ep[2] = max(ep[2], lag)
        elif self._lag_episode is not None and now >= self._quiet_until:
            start, ticks, worst = self._lag_episode
            self._lag_episode = None
            self._events.append(("lag_over", {"ms": round((now - start) * 1000, 1), "ticks": ticks,
                                              "max_lag_ms": round(worst * 1000, 1),
                                              "multiplier": round(self.multiplier, 2)}))

    def tick(self, now: float) -> list:
        """Run the detectors and the planner; the datagrams due now (to every peer)."""
        if now > self._now:
            self._now = now
        self._local_health(now)
        checking = now >= self._quiet_until
        if checking and self._rebase:
            self._rebase_all()
        if self.sync.moved or now >= self._moved_sweep:
            self._check_moved(now)
        if checking:
            for peer, det in list(self.detectors.items()):
                self._detector_events(peer, det.check(now), now)
            self._probe_timeouts(now)
            self._release_holds(now)
            self._reprobe(now)
            for action in self.planner.due(now):
                self._actions.append(action)
                self.counters["actions"] += 1
                self._took.setdefault(action.dead_node, {})[action.key] = now
        for sender, key in self.sync.expire(now):
            pass  # soft state: an entry nobody refreshed is simply gone
        out = [datagram for _, datagram in self.sync.outgoing(now)]
        self._asked = self.next_deadline()
        return out

    def next_deadline(self) -> float:
        """When tick() must run next: the next heartbeat or queued datagram, the next detector
        deadline, the planner's next takeover, a probe's timeout, a hold's end. While this
        node lags, the detectors, the planner and the probes wait for the end of the settling
        time. An adapter that schedules tick() at this time must ask again after receive()
        and the claim/pass calls (they may queue urgent work)."""
        t = self.sync.next_due()
        if t == -math.inf:
            t = self._now
        if self._now < self._quiet_until:
            return min(t, self._quiet_until)
        for det in self.detectors.values():
            d = det.next_deadline()
            if d is not None and d < t:
                t = d
        d = self.planner.next_due()
        if d is not None and d < t:
            t = d
        for pr in self._probes.values():
            if pr.deadline < t:
                t = pr.deadline
        for holds in self._held.values():
            for hd in holds:
                if hd.until < t:
                    t = hd.until
        for r in self._refuted.values():
            if r[1] < t:
                t = r[1]
        return t

    # -- deaths: suspicion, confirmation, action ---------------------------------------------------

    def _detector_events(self, peer: str, events, now: float) -> None:
        for ev in events:
            kind = ev[0]
            if kind == "dead":
                self.counters["deaths"] += 1
                self._events.append(("peer_silent", {"node": peer, "silence_ms": round(ev[2] * 1000, 1),
                                                     "multiplier": round(self.multiplier, 2)}))
                self._suspected[peer] = now
                self._member_died(peer, now)
                self._suspect_dead(peer, now)
            elif kind == "false_suspicion":
                # the suspicion round is over: its claims and actions must not stop the next
                # round (a real death within claim_ttl would otherwise find every connection
                # "claimed" and nobody would take it)
                self.counters["false_suspicions"] += 1
                cancelled = self.planner.peer_alive_again(peer)
                self.planner.forget(peer)
                held = self._drop_peer_state(peer)
                revoked = self._revoke(peer, now)
                self._events.append(("false_suspicion", {"node": peer, "cancelled": cancelled, "held": held,
                                                         "revoked": revoked}))
            elif kind == "restarted":
                self.counters["restarts"] += 1
                self.planner.forget(peer)
                self._drop_peer_state(peer)
                self._took.pop(peer, None)  # it did die: what was taken from it stays taken
                self._events.append(("peer_restarted", {"node": peer, "old_epoch": ev[1], "new_epoch": ev[2]}))
            elif kind in ("suspect", "alive"):
                self._events.append((f"peer_{kind}", {"node": peer}))

    def _drop_peer_state(self, peer: str) -> int:
        """The peer is alive (or restarted): forget its probe, refutation and holds; returns
        how many held connections were dropped."""
        self._probes.pop(peer, None)
        self._refuted.pop(peer, None)
        self._reqs.pop(peer, None)
        self._suspected.pop(peer, None)
        self._solo.discard(peer)
        n = sum(len(hd.entries) for hd in self._held.pop(peer, ()))
        self.counters["held_dropped"] += n
        return n

    def _revoke(self, peer: str, now: float) -> int:
        took = self._took.pop(peer, None)
        if not took:
            return 0
        limit = now - REVOKE_WINDOW
        keys = [k for k, at in took.items() if at >= limit]
        self._revoked += [(k, peer) for k in keys]
        self.counters["revoked"] += len(keys)
        return len(keys)

    def _ask_set(self, target: str) -> set:
        """The members to ask about `target`: every other peer this node considers alive."""
        return {q for q, d in self.detectors.items() if q != target and d.state in (ALIVE, SUSPECT)}

    def _misses(self, state: int, silence_ms: int) -> bool:
        return state in (_STATE_CODE[SUSPECT], _STATE_CODE[DEAD]) or silence_ms >= self._dead_after * 500

    def _suspect_dead(self, peer: str, now: float) -> None:
        """peer's detector says DEAD: confirm with the others before acting."""
        det = self.detectors[peer]
        recent = self._reqs.get(peer)
        if recent:
            limit = now - self._dead_after - self._probe_timeout
            for asker, at in recent.items():
                d = self.detectors.get(asker)
                if at >= limit and d is not None and d.state != DEAD:
                    self.counters["confirmations"] += 1
                    self._proceed(peer, now, "confirmed", by=asker)
                    return
        ask = self._ask_set(peer)
        if not ask:
            self._proceed_alone(peer, now, "alone")
            return
        self._nonce = (self._nonce + 1) & 0xFFFFFFFF
        pr = self._probes[peer] = _Probe(peer, det.epoch, self._nonce, ask, now, now + self._probe_timeout,
                                         det.silence(now))
        self.sync.probe(peer, pr.nonce, now, copies=PROBE_COPIES)
        self.counters["probes_sent"] += 1
        self.counters["probe_rounds"] += 1
        self._events.append(("probe", {"node": peer, "asked": sorted(ask)}))
        self._urgent(now)

    def _member_died(self, member: str, now: float) -> None:
        """A member asked in a probe is dead now: it leaves every ask set."""
        for target, pr in list(self._probes.items()):
            if member in pr.asked and member not in pr.alive and member not in pr.unknown:
                pr.asked.discard(member)
                self._settle_probe(pr, now, final=False)

    def _settle_probe(self, pr: _Probe, now: float, final: bool) -> None:
        """Decide a probe once everyone asked has answered (or, final, at its timeout)."""
        if self._probes.get(pr.target) is not pr:
            return
        waiting = {q for q in pr.asked - pr.alive - pr.unknown
                   if q in self.detectors and self.detectors[q].state != DEAD}
        if waiting and not final:
            return
        if pr.alive and not waiting:
            self._refute(pr, now)
        elif not waiting:
            self._proceed_alone(pr.target, now, "alone")
        elif pr.rounds >= PROBE_ROUNDS:
            if pr.alive:
                self._refute(pr, now)  # some hear it, nobody misses it
            else:
                # members this node hears that never answer (loss, or a member that does not
                # know PROBE_REQ yet): proceed alone rather than leave the connections to nobody
                self.counters["unanswered"] += 1
                self._proceed_alone(pr.target, now, "unanswered")
        else:
            pr.rounds += 1
            pr.asked = waiting | pr.alive | pr.unknown
            pr.deadline = now + self._probe_timeout
            self.sync.probe(pr.target, pr.nonce, now, copies=PROBE_COPIES)
            self.counters["probe_rounds"] += 1
            self._urgent(now)

    def _refute(self, pr: _Probe, now: float) -> None:
        del self._probes[pr.target]
        self.counters["refuted"] += 1
        self._refuted[pr.target] = [pr.epoch, now + REPROBE_AFTER]
        self._events.append(("refuted", {"node": pr.target, "by": sorted(pr.alive),
                                         "ms": round((now - pr.started) * 1000, 1)}))

    def _probe_timeouts(self, now: float) -> None:
        for pr in [p for p in self._probes.values() if now >= p.deadline]:
            self._settle_probe(pr, now, final=True)

    def _reprobe(self, now: float) -> None:
        for peer in [p for p, r in self._refuted.items() if now >= r[1]]:
            epoch = self._refuted.pop(peer)[0]
            det = self.detectors.get(peer)
            if det is not None and det.state == DEAD and det.epoch == epoch and peer not in self._probes:
                self._suspect_dead(peer, now)

    def _probe_req(self, asker: str, target: str, nonce: int, now: float) -> None:
        """Another member asks whether this node misses `target`: answer, and take the
        question as a sign that the asker misses it."""
        if target == self.node:
            return  # about this node: its own datagrams are the answer
        det = self.detectors.get(target)
        if det is None:
            state, silence_ms = _STATE_CODE[UNKNOWN], 0
        else:
            state, silence_ms = _STATE_CODE[det.state], int(det.silence(now) * 1000)
        self.sync.probe_ack(target, nonce, silence_ms, state, now)
        self.counters["probes_answered"] += 1
        self._urgent(now)
        self._evidence(target, asker, now)

    def _evidence(self, target: str, member: str, now: float) -> None:
        """`member` says (a PROBE_REQ, a CLAIM) that it misses `target`."""
        if target == self.node or member == target:
            return
        self._reqs.setdefault(target, {})[member] = now
        det = self.detectors.get(target)
        if det is None or det.state != DEAD:
            return  # this node hears target: its answer said so
        if target in self._probes or target in self._refuted or any(
                hd.why != "moved" for hd in self._held.get(target, ())):
            self.counters["confirmations"] += 1
            self._proceed(target, now, "confirmed", by=member)
        elif any(hd.why == "moved" for hd in self._held.get(target, ())):
            self.counters["confirmations"] += 1
            self._release(target, now, confirmed_by=member)

    def _probe_ack(self, member: str, target: str, nonce: int, silence_ms: int, state: int, now: float) -> None:
        pr = self._probes.get(target)
        if pr is None or pr.nonce != nonce:
            self.counters["probe_acks_unmatched"] += 1
            return
        self.counters["probe_acks"] += 1
        if self._misses(state, silence_ms):
            self.counters["confirmations"] += 1
            self._proceed(target, now, "confirmed", by=member, answer_ms=silence_ms)
            return
        if state == _STATE_CODE[UNKNOWN]:
            pr.unknown.add(member)  # it never heard target: no opinion
        else:
            pr.alive.add(member)
            pr.unknown.discard(member)
        self._settle_probe(pr, now, final=False)

    def _isolated(self, peer: str, now: float) -> bool:
        """Every peer that was alive when `peer` went silent went silent with it (two at
        least): this node is most likely the one cut off."""
        ref = self.detectors[peer].last_heard
        if ref is None:
            return False
        w = self._isolation_window
        around = [d for d in self.detectors.values()
                  if d.state != UNKNOWN and d.last_heard is not None and d.last_heard >= ref - w]
        return len(around) >= 2 and all(d.state == DEAD and d.last_heard <= ref + w for d in around)

    def _proceed_alone(self, peer: str, now: float, how: str) -> None:
        self._probes.pop(peer, None)
        if how == "alone" and (self._isolated_since is not None or self._isolated(peer, now)):
            if self._isolated_since is None:
                self._isolated_since = now
                self.counters["isolations"] += 1
                self._events.append(("isolated", {"peers": sorted(p for p, d in self.detectors.items()
                                                                 if d.state == DEAD)}))
            det = self.detectors[peer]
            entries = self.sync.peer_entries(peer)
            self._held.setdefault(peer, []).append(
                _Hold(det.epoch, entries, now + ISOLATION_HOLD, "isolated", det.silence(now)))
            self.counters["held_back"] += len(entries)
            if entries:
                self._events.append(("held_back", {"node": peer, "connections": len(entries), "why": "isolated",
                                                   "seconds": ISOLATION_HOLD}))
            return
        self.counters["proceeded_alone"] += 1
        self._proceed(peer, now, how)

    def _proceed(self, peer: str, now: float, how: str, by: Optional[str] = None, entries=None,
                 answer_ms: Optional[int] = None) -> None:
        """Hand peer's connections to the planner (those that may be taken now)."""
        pr = self._probes.pop(peer, None)
        self._refuted.pop(peer, None)
        det = self.detectors.get(peer)
        if det is None or det.state != DEAD:
            return
        if self.sync.moved:
            self._check_moved(now)
        confirmed = how == "confirmed"
        if entries is None:
            entries = self.sync.peer_entries(peer)
            for hd in self._held.get(peer, ()):
                if confirmed or hd.why == "isolated":
                    for k, e in hd.entries.items():
                        entries.setdefault(k, e)
            if confirmed or self._held.get(peer):
                self._held[peer] = [hd for hd in self._held.get(peer, ()) if not confirmed and hd.why == "moved"]
                if not self._held[peer]:
                    del self._held[peer]
        take, held, superseded = {}, {}, 0
        already = set()
        if not confirmed:
            for hd in self._held.get(peer, ()):
                already.update(hd.entries)
        for key, e in entries.items():
            if key in already:
                continue
            m = self._moved.get(key[:2])
            if m is not None and (m[3], m[4]) == (e.ni, e.na):
                if m[1] != peer and fp.reqno_newer(m[2], e.reqno):
                    superseded += 1  # another member continues it with a newer ReqNo
                    continue
                if m[1] == peer and m[2] == e.reqno and now - m[0] < RECENT_MOVE and not confirmed:
                    held[key] = e  # it migrated to peer moments ago: not again on a suspicion alone
                    continue
            if self._superseded_locally(key, e):
                superseded += 1
                continue
            take[key] = e
        self.counters["superseded"] += superseded
        if held:
            self._held.setdefault(peer, []).append(_Hold(det.epoch, held, now + MOVED_HOLD, "moved",
                                                         det.silence(now)))
            self.counters["held_back"] += len(held)
            self._events.append(("held_back", {"node": peer, "connections": len(held), "why": "moved",
                                               "seconds": MOVED_HOLD}))
        if how in ("isolated", "alone", "unanswered") and self._isolated_since is not None:
            self._solo.add(peer)
        self.planner.peer_dead(peer, det.epoch, take, self.members(), now, heard_until=det.last_heard)
        self._urgent(now)
        suspected = self._suspected.get(peer, now)
        fields = {"node": peer, "silence_ms": round(det.silence(now) * 1000, 1), "connections": len(take),
                  "how": how, "confirm_ms": round((now - suspected) * 1000, 1)}
        if by is not None:
            fields["by"] = by
        if answer_ms is not None:
            fields["their_silence_ms"] = answer_ms
        if held:
            fields["held"] = len(held)
        if superseded:
            fields["superseded"] = superseded
        if pr is not None:
            fields["rounds"] = pr.rounds
        self._events.append(("peer_dead", fields))

    def _superseded_locally(self, key, e) -> bool:
        """This node continues the connection with a newer ReqNo (it took it over)."""
        for k in self._by_client.get(key[:2], ()):
            mine = self.sync.local_entries_get(k)
            if mine is not None and (mine.ni, mine.na) == (e.ni, e.na) and fp.reqno_newer(mine.reqno, e.reqno):
                return True
        return False

    def _release_holds(self, now: float) -> None:
        for peer in [p for p, hs in self._held.items() if any(now >= hd.until for hd in hs)]:
            self._release(peer, now)

    def _release(self, peer: str, now: float, confirmed_by: Optional[str] = None) -> None:
        holds = self._held.get(peer, [])
        due = [hd for hd in holds if confirmed_by is not None or now >= hd.until]
        rest = [hd for hd in holds if hd not in due]
        if rest:
            self._held[peer] = rest
        else:
            self._held.pop(peer, None)
        det = self.detectors.get(peer)
        for hd in due:
            if det is None or det.state != DEAD or det.epoch != hd.epoch:
                self.counters["held_dropped"] += len(hd.entries)
                continue
            if hd.why == "isolated":
                self.counters["proceeded_alone"] += 1
                self._proceed(peer, now, "confirmed" if confirmed_by else "isolated", by=confirmed_by,
                              entries=dict(hd.entries))
                continue
            self.counters["held_released"] += len(hd.entries)
            entries = {k: e for k, e in hd.entries.items() if not self._superseded_locally(k, e)}
            self.planner.peer_dead(peer, det.epoch, entries, self.members(), now, heard_until=det.last_heard)
            self._urgent(now)
            self._events.append(("held_released", {"node": peer, "connections": len(entries),
                                                   "by": confirmed_by}))

    def _end_isolation(self, now: float) -> None:
        """A peer is heard again: this node was cut off (or some came back). Decisions made
        alone and not yet executed are cancelled; the peers still silent are asked about."""
        since = self._isolated_since
        self._isolated_since = None
        cancelled = 0
        for peer in list(self._held):
            hs = [hd for hd in self._held[peer] if hd.why != "isolated"]
            cancelled += sum(len(hd.entries) for hd in self._held[peer] if hd.why == "isolated")
            if hs:
                self._held[peer] = hs
            else:
                del self._held[peer]
        solo, self._solo = self._solo, set()
        for peer in solo:
            cancelled += self.planner.peer_alive_again(peer)
        self.counters["held_dropped"] += cancelled
        self._events.append(("isolation_over", {"ms": round((now - since) * 1000, 1), "cancelled": cancelled}))
        for peer, det in self.detectors.items():
            if det.state == DEAD and peer not in self._probes and peer not in self._refuted:
                self._suspect_dead(peer, now)

    # -- views -------------------------------------------------------------------------------------

    def members(self) -> dict:
        """Every member as the planner sees it: this node, and each peer we have heard (a
        peer our detector says is dead but another member hears is alive)."""
        out = {self.node: MemberInfo(load=self.sync.advertised_load, prefixes=tuple(self.config.node.prefixes),
                                     alive=not self.sync.draining)}
        for peer, det in self.detectors.items():
            info = self.sync.peer_info(peer) or {}
            out[peer] = MemberInfo(load=info.get("load") or 0.0, prefixes=tuple(info.get("prefixes") or ("/",)),
                                   alive=(det.state != DEAD or peer in self._refuted)
                                   and peer not in self.draining_peers)
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

    def health(self, now: float) -> dict:
        """Local health: this node's lag, its multiplier, and the confirmation state."""
        return {"lag_ms": round(self.lag * 1000, 3), "max_lag_ms": self.counters["max_lag_ms"],
                "lag_ticks": self.counters["lag_ticks"], "multiplier": round(self.multiplier, 3),
                "settling": now < self._quiet_until, "isolated": self._isolated_since is not None,
                "probing": sorted(self._probes), "refuted": sorted(self._refuted),
                "held": {p: sum(len(hd.entries) for hd in hs) for p, hs in self._held.items()}}

    def snapshot(self, now: float) -> dict:
        peers = {}
        for peer, det in self.detectors.items():
            info = self.sync.peer_info(peer) or {}
            peers[peer] = {**det.snapshot(now), "entries": info.get("entries"), "load": info.get("load"),
                           "connections": info.get("connections"), "capacity": info.get("capacity"),
                           "prefixes": info.get("prefixes")}
        return {"node": self.node, "epoch": self.epoch, "local_entries": self.sync.local_count,
                "advertised_load": self.sync.advertised_load, "peers": peers, "planner": self.planner.counters(),
                "sync": self.sync.counters(), "group": dict(self.counters), "health": self.health(now)}


def _key_text(key) -> str:
    import socket
    cip, cport, sip, sport = key
    fam = socket.AF_INET if len(cip) == 4 else socket.AF_INET6
    return f"{socket.inet_ntop(fam, cip)}:{cport}->{socket.inet_ntop(fam, sip)}:{sport}"
