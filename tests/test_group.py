"""Support groups in memory: 3 to 5 GroupNodes, an injected clock, and a network that loses,
duplicates, reorders and partitions. Views converge to the truth, a stopped node is declared
dead within the bound and exactly one takeover action comes out per connection, forged,
replayed and garbled datagrams are rejected and counted."""

from __future__ import annotations

import dataclasses
import heapq
import random
import statistics

import pytest

from appliance.config import parse
from appliance.group import GroupNode
from appliance.health import ALIVE, DEAD
from appliance.sync import ACTIVE, Entry, ObjectRef

KEY = "hex:" + "5a" * 16
OBJ = ObjectRef("h", "/media/a.mp4", '"e1"', "Tue, 14 Nov 2023 22:13:20 GMT", 50_000_000)


def config(name, **sync):
    return parse({"node": {"id": name, "group": "g", "key": KEY, "capacity": 1000},
                  "sync": {"heartbeat_ms": 20, "refresh_s": 1.0, **sync},
                  "health": {"dead_after_ms": 100}})


def entry(i, server, obj=OBJ):
    return Entry(client_ip=bytes([10, 0, i >> 8 & 255, i & 255]), client_port=40000 + i % 20000,
                 server_ip=bytes([10, 70, server, 2]), server_port=80, ni=(i * 7919) & 0xFFFFFFFF,
                 na=(i * 104729) & 0xFFFFFFFF, c_mss=1460, c_wscale=7, c_sack=True, c_ts=True, s_mss=1460,
                 s_wscale=9, s_sack=True, s_ts=True, mp=True, reqno=0, state=ACTIVE, object=obj, req_range=None,
                 status=200, body_start=(i * 31) & 0xFFFFFFFF, body_offset=0, body_length=obj.total_length)


class Network:
    """Datagrams between nodes, delivered in time order: loss, duplication, delay, partitions."""

    def __init__(self, seed, loss=0.0, dup=0.0, delay=(0.0005, 0.004)):
        self.rng = random.Random(seed)
        self.loss, self.dup, self.delay = loss, dup, delay
        self.q = []
        self.n = 0
        self.cut = set()
        self.down = set()

    def send(self, src, data, now, dsts):
        for dst in dsts:
            if dst == src or {src, dst} & self.down or frozenset((src, dst)) in self.cut:
                continue
            if self.rng.random() < self.loss:
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):
                self.n += 1
                heapq.heappush(self.q, (now + self.rng.uniform(*self.delay), self.n, dst, data))

    def due(self, t):
        while self.q and self.q[0][0] <= t:
            yield heapq.heappop(self.q)


class Group:
    """serves(node, action) -> bool stands for the adapter's check that its local server can
    serve the rest: then the node claims; else it passes (the last candidate claims and resets).

    adopt=True also plays the takeover engine's end: a claimed takeover completes when a
    Migrate SYN reaches the client (sent at once, then retried 0.2, 0.6, 1.4, 3.0 s later, as
    appliance.handshake does; it reaches the client when the claimer is not in net.down) and
    the claimer then advertises the connection as its own with the next ReqNo (its own server
    address); until then it waits in `inflight`, and the adapter abandons those that
    pop_revoked() names. stall(name, s): the node neither ticks nor reads its socket for s
    seconds; then what arrived meanwhile is read at once at the late time, before its next
    tick (backlog="before") or right after it ("after")."""

    def __init__(self, names, seed=1, serves=lambda node, action: True, adopt=False, **net):
        self.serves = serves
        self.adopt = adopt
        self.resets = {n: [] for n in names}
        self.t = 0.0
        self.names = list(names)
        self.nodes = {n: GroupNode(config(n), epoch=1000 + i, now=0.0) for i, n in enumerate(names)}
        self.net = Network(seed, **net)
        self.actions = {n: [] for n in names}
        self.events = {n: [] for n in names}
        self.revoked = {n: [] for n in names}
        self.inflight = {n: {} for n in names}
        self.adopted = {n: [] for n in names}
        self.stopped = set()
        self.stalled = {}  # name -> (until, backlog order)
        self.backlog = {n: [] for n in names}

    def run(self, seconds, step=0.002):
        end = self.t + seconds
        while self.t < end:
            self.t += step
            for at, _, dst, data in self.net.due(self.t):
                if dst in self.stopped:
                    continue
                if dst in self.stalled:
                    self.backlog[dst].append(data)
                else:
                    self.nodes[dst].receive(data, at)
            for name, node in self.nodes.items():
                if name in self.stopped:
                    continue
                late = None
                if name in self.stalled:
                    until, order = self.stalled[name]
                    if self.t < until:
                        continue
                    del self.stalled[name]
                    late, self.backlog[name] = self.backlog[name], []
                    if order == "before":
                        for data in late:
                            node.receive(data, self.t)
                        late = None
                for d in node.tick(self.t):
                    self.net.send(name, d, self.t, self.nodes)
                for data in late or ():
                    node.receive(data, self.t)
                for a in node.pop_actions():
                    self.actions[name].append((self.t, a))
                    if self.serves(name, a):
                        node.claim_action(a, self.t)
                        if self.adopt:
                            self.inflight[name][a.key] = (a, self.t, 0)
                    elif a.last:
                        self.resets[name].append((self.t, a))
                        node.claim_action(a, self.t)
                    else:
                        node.pass_action(a, self.t)
                for key, peer in node.pop_revoked():
                    self.revoked[name].append((self.t, key, peer))
                    self.inflight[name].pop(key, None)  # the adapter abandons the handshake
                for key, (a, t0, k) in list(self.inflight[name].items()):
                    if self.t < t0 + 0.2 * (2 ** k - 1):
                        continue  # the next Migrate SYN is not due yet
                    if name in self.net.down:
                        self.inflight[name][key] = (a, t0, k + 1)  # lost: retried later
                        continue
                    del self.inflight[name][key]
                    mine = dataclasses.replace(a.entry, server_ip=bytes([10, 70, self.names.index(name) + 1, 2]),
                                               reqno=(a.entry.reqno + 1) & 127)
                    node.local_add(mine, self.t)
                    self.adopted[name].append((self.t, mine))
                self.events[name] += [(self.t, e) for e in node.pop_events()]

    def stop(self, name):
        self.stopped.add(name)

    def stall(self, name, seconds, backlog="before"):
        self.stalled[name] = (self.t + seconds, backlog)

    def claimants(self, client):
        """The nodes that advertise a connection of this client (ip, port) as their own."""
        return sorted(n for n, node in self.nodes.items() if n not in self.stopped
                      and any(k[:2] == client for k in node.sync.local_entries()))

    def kinds(self, name, kind, **match):
        return [(t, f) for t, (k, f) in self.events[name] if k == kind
                and all(f.get(x) == v for x, v in match.items())]

    def truth_matches(self):
        bad = []
        for x, nx in self.nodes.items():
            if x in self.stopped:
                continue
            for y, ny in self.nodes.items():
                if x != y and y not in self.stopped and nx.sync.peer_entries(y) != ny.sync.local_entries():
                    bad.append((x, y))
        return bad


@pytest.mark.parametrize("n", [3, 4, 5])
def test_views_converge_through_a_bad_network(n):
    names = "abcde"[:n]
    g = Group(names, seed=n, loss=0.1, dup=0.05, delay=(0.0005, 0.03))  # delay spread: heavy reordering
    rng = random.Random(n)
    live = {x: {} for x in names}
    i = 0
    for rnd in range(6):
        if rnd == 2:
            g.net.cut = {frozenset((names[0], y)) for y in names[1:]}  # node a partitioned away
        if rnd == 4:
            g.net.cut = set()
        for _ in range(40):
            x = rng.choice(names)
            if live[x] and rng.random() < 0.35:
                k = rng.choice(list(live[x]))
                g.nodes[x].local_remove(k, g.t)
                del live[x][k]
            else:
                i += 1
                e = entry(i, names.index(x) + 1)
                g.nodes[x].local_add(e, g.t)
                live[x][e.key] = e
        g.run(0.5)
    g.net.loss = g.net.dup = 0.0
    g.run(2.0)  # two refresh periods after the network healed
    assert g.truth_matches() == []
    assert sum(len(v) for v in live.values()) > 50


def test_stopped_node_dead_within_bound_and_one_action_per_connection():
    g = Group("abcd", seed=7, loss=0.0)
    for i in range(300):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    g.run(1.5)
    assert len(g.nodes["b"].sync.peer_entries("a")) == 300
    t_stop = g.t
    g.stop("a")
    g.run(0.5)
    for name in "bcd":
        dead = [t for t, (kind, f) in g.events[name] if kind == "peer_dead" and f["node"] == "a"]
        assert dead, f"{name} never declared a dead"
        assert 0.08 <= dead[0] - t_stop <= 0.1 + 0.02 + 0.005, dead[0] - t_stop  # ~100 ms, + one interval
    taken = [a.key for name in "bcd" for _, a in g.actions[name]]
    assert len(taken) == 300 and len(set(taken)) == 300  # exactly one action per connection
    by_node = {name: len(g.actions[name]) for name in "bcd"}
    assert all(v > 50 for v in by_node.values()), by_node  # spread by rendezvous hashing
    assert all(g.nodes[name].counters["races"] == 0 for name in "bcd")


def test_second_candidate_acts_when_the_first_is_dead_too():
    g = Group("abc", seed=3)
    for i in range(100):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    g.run(1.5)
    g.stop("a")
    g.stop("b")
    g.run(0.5)
    assert len({a.key for _, a in g.actions["c"]}) == 100  # c ends up with all of them


def test_false_suspicion_is_counted_and_cancels():
    g = Group("abc", seed=5)
    for i in range(50):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    g.run(1.5)
    g.net.down.add("a")  # a is silent for 60 ms, then back with the same epoch
    g.run(0.06)
    g.net.down.discard("a")
    g.run(0.5)
    assert sum(g.nodes[n].counters["deaths"] for n in "bc") == 0  # 60 ms is not death
    g.net.down.add("a")
    g.run(0.15)  # long enough to be declared dead
    g.net.down.discard("a")
    g.run(0.5)
    assert all(g.nodes[n].counters["false_suspicions"] >= 1 for n in "bc")
    assert all(g.nodes[n].peer_state("a") == ALIVE for n in "bc")


def test_forged_replayed_garbled_datagrams_rejected_and_counted():
    g = Group("ab", seed=9)
    for i in range(20):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    captured = []
    orig = g.net.send

    def tap(src, data, now, dsts):
        if src == "a":
            captured.append(data)
        orig(src, data, now, dsts)

    g.net.send = tap
    g.run(1.2)
    b = g.nodes["b"]
    before = dict(b.sync.counters()["dropped"])
    intruder = GroupNode(parse({"node": {"id": "a", "group": "g", "key": "hex:" + "66" * 16}}), 1000, 0.0)
    intruder.local_add(entry(999, 1), 0.0)
    for d in intruder.tick(0.0):
        b.receive(d, g.t)  # forged: the wrong key
    for d in captured[:30]:
        b.receive(d, g.t)  # replayed
    rng = random.Random(1)
    for d in captured[:30]:
        m = bytearray(d)
        m[rng.randrange(len(m))] ^= 0x40
        b.receive(bytes(m), g.t)  # garbled
    b.receive(b"\x01" * 1500, g.t)  # oversize
    b.receive(b"\x09" + captured[0][1:], g.t)  # unknown version
    after = b.sync.counters()["dropped"]
    grew = {k: after[k] - before.get(k, 0) for k in after}
    assert grew["mac"] >= 30 and grew["replay"] >= 29 and grew["oversize"] == 1 and grew["version"] >= 1
    assert entry(999, 1).key not in b.sync.peer_entries("a")  # nothing forged got in
    assert len(b.sync.peer_entries("a")) == 20


def test_drain_hands_every_connection_to_the_others_and_never_to_the_drainer():
    g = Group("abcd", seed=11)
    for i in range(200):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    g.run(1.5)
    g.nodes["a"].drain()
    g.run(0.3)
    taken = [a.key for name in "bcd" for _, a in g.actions[name]]
    assert len(taken) == 200 and len(set(taken)) == 200 and not g.actions["a"]
    assert all("a" in g.nodes[n].draining_peers for n in "bcd")
    assert all(g.nodes[n].counters["deaths"] == 0 for n in "bcd")  # a is alive throughout


def test_a_real_death_soon_after_a_false_suspicion_is_still_taken_over():
    """Claims from a false-suspicion round must not make the group skip the real death."""
    g = Group("abc", seed=13)
    for i in range(60):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    g.run(1.5)
    g.net.down.add("a")  # silent long enough to be declared dead: b and c take (and claim) a's 60
    g.run(0.15)
    first = sum(len(g.actions[n]) for n in "bc")
    assert first == 60
    g.net.down.discard("a")  # a was alive all along: a false suspicion
    g.run(0.5)
    assert all(g.nodes[n].counters["false_suspicions"] >= 1 for n in "bc")
    for n in "bc":
        g.actions[n].clear()
    g.stop("a")  # now a really dies, well within the planner's claim memory
    g.run(0.5)
    taken = [a.key for n in "bc" for _, a in g.actions[n]]
    assert len(taken) == 60 and len(set(taken)) == 60


def test_refuse_before_claim_passes_to_the_next_candidate_at_once():
    """b cannot serve a's connections: each goes to c without waiting for c's stagger; when
    nobody can serve, the last candidate resets the client; no connection is left to nobody."""
    for can in ("c", ""):
        g = Group("abc", serves=lambda node, action, can=can: node == can)
        for i in range(40):
            g.nodes["a"].local_add(entry(i, 1), g.t)
        g.run(1.5)
        g.net.down.add("a")
        g.run(0.4)
        done = {}
        for n in "bc":
            for t, act in g.actions[n]:
                done.setdefault(act.key, []).append((n, act.rank, act.last))
        assert len(done) == 40
        for key, acts in done.items():
            takers = [a for a in acts if a[0] == can or a[2]]  # served, or reset by the last
            assert len(takers) == 1, acts
            assert all(rank <= 1 for _, rank, _ in acts)
        resets = [a.key for n in "bc" for _, a in g.resets[n]]
        assert len(resets) == (0 if can else 40)
        # the second candidate acted within a few ms of the first one's pass, not after 20 ms
        for n in "bc":
            passed = g.nodes[n].planner.counters()["advanced_by_pass"]
            assert passed == sum(1 for _, a in g.actions[n] if a.rank == 1), n


def test_a_node_that_hears_its_connection_taken_over_with_a_newer_reqno_disowns_it():
    """a is partitioned; b takes its connection over (ReqNo 1) and advertises it as its own;
    once the partition heals, a hears that and stops advertising the connection (its socket
    is the server appliance's to destroy), and never advertises it again."""
    import dataclasses
    g = Group("abc")
    e = entry(5, 1)
    g.nodes["a"].local_add(e, g.t)
    g.run(1.5)
    g.net.down.add("a")
    g.run(0.3)
    taken = dataclasses.replace(e, server_ip=bytes([10, 70, 2, 2]), reqno=1)
    g.nodes["b"].local_add(taken, g.t)
    g.run(0.5)
    assert e.key in g.nodes["a"].sync.local_entries()  # a, cut off, still claims it
    g.net.down.discard("a")
    g.run(1.2)  # b's next refresh reaches a
    assert e.key not in g.nodes["a"].sync.local_entries()
    assert g.nodes["a"].pop_disowned() == [e.key] and g.nodes["a"].counters["disowned"] == 1
    assert not g.nodes["a"].local_add(e, g.t)  # the mapper's next event cannot bring it back
    g.run(1.2)
    claimants = [n for n in "abc" if any(k[:2] == e.key[:2] for k in g.nodes[n].sync.local_entries())]
    assert claimants == ["b"]
    for n in "ac":
        assert any(k[:2] == e.key[:2] for k in g.nodes[n].sync.peer_entries("b"))
    assert e.key not in g.nodes["c"].sync.peer_entries("a")  # a's withdraw reached c


# -- overload does not become a storm ------------------------------------------------------------


@pytest.mark.parametrize("backlog", ["before", "after"])
def test_a_stalled_node_declares_nobody_dead_and_takes_nothing(backlog):
    """b's process stalls for 300 ms (no tick, nothing read), then runs again at the late time
    with its socket backlog read at once: it lags, so it declares nobody dead, and the burst
    of heartbeats does not enter its detectors' statistics. a and c do declare b dead (it was
    silent 300 ms), confirmed by each other; b has no connection, so nothing moves."""
    g = Group("abc", seed=21)
    for i in range(50):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    g.run(2.5)
    b = g.nodes["b"]
    before = {p: (d.mean, d.std) for p, d in b.detectors.items()}
    g.stall("b", 0.3, backlog)
    g.run(0.3)
    g.run(0.01)
    assert b.multiplier > 2.5  # 300 ms of lag raised the thresholds
    g.run(1.5)
    assert b.counters["deaths"] == 0 and b.counters["false_suspicions"] == 0
    assert not g.kinds("b", "peer_silent") and not g.kinds("b", "peer_dead")
    assert all(not g.actions[n] for n in "abc")
    assert b.counters["lag_ticks"] >= 1 and b.counters["lag_episodes"] == 1
    assert 280 <= b.counters["max_lag_ms"] <= 320
    assert b.counters["stale_arrivals"] >= 20  # the backlog's heartbeats: signs of life, not samples
    assert g.kinds("b", "lagging") and g.kinds("b", "lag_over")
    for p, d in b.detectors.items():
        assert d.state == ALIVE
        assert max(d._samples) < 0.05, p  # neither the stall's gap nor the burst entered the history
        assert abs(d.mean - before[p][0]) < 0.002 and d.std < before[p][1] + 0.003
    assert set(g.nodes["a"].sync.local_entries()) == {entry(i, 1).key for i in range(50)}
    for n in "ac":  # the others saw b silent for 300 ms: dead, confirmed, then back
        assert g.kinds(n, "peer_dead", node="b", how="confirmed")
        assert g.nodes[n].counters["false_suspicions"] == 1
    g.run(8.0)
    assert b.multiplier == 1.0  # decayed back once ticks came on time


def test_a_cut_link_is_refuted_by_the_third_member():
    """Only the a-b link is cut; c hears both. b's detector declares a dead, b asks c, c says
    a is alive: refuted, nothing happens (and the same the other way); a keeps its connections."""
    g = Group("abc", seed=22)
    for i in range(40):
        g.nodes["a"].local_add(entry(i, 1), g.t)
        g.nodes["b"].local_add(entry(1000 + i, 2), g.t)
    g.run(2.0)
    g.net.cut = {frozenset("ab")}
    g.run(2.5)  # long enough for re-probes too
    assert all(not g.actions[n] for n in "abc")
    for x, y in ("ba", "ab"):
        node = g.nodes[x]
        assert node.peer_state(y) == DEAD  # its own detector cannot hear y ...
        assert node.counters["refuted"] >= 2 and node.counters["confirmations"] == 0
        assert not g.kinds(x, "peer_dead")
        refuted = g.kinds(x, "refuted", node=y)
        assert refuted and all(f["by"] == ["c"] for _, f in refuted)
        assert all(f["ms"] <= 15 for _, f in refuted)  # one sync round trip, not a timeout
        assert node.members()[y].alive  # ... but the group hears it: still a candidate
    assert g.nodes["c"].counters["deaths"] == 0 and g.nodes["c"].counters["probes_answered"] >= 4
    assert set(g.nodes["a"].sync.local_entries()) == {entry(i, 1).key for i in range(40)}
    assert len(g.nodes["c"].sync.peer_entries("a")) == 40
    g.net.cut = set()
    g.run(1.0)
    assert all(not g.actions[n] for n in "abc")
    assert g.nodes["b"].peer_state("a") == ALIVE and g.nodes["a"].peer_state("b") == ALIVE


def test_a_real_crash_is_confirmed_within_the_bound_over_many_seeds():
    """A crash of a: both survivors miss it at about the same moment, so the confirmation
    costs a round trip, not a timeout; one action per connection; detection p50 <= 120 ms."""
    times = []
    for seed in range(30):
        g = Group("abc", seed=100 + seed)
        for i in range(30):
            g.nodes["a"].local_add(entry(i, 1), g.t)
        g.run(1.2 + random.Random(seed).uniform(0, 0.02))
        t_stop = g.t
        g.stop("a")
        g.run(0.4)
        first = min(t for n in "bc" for t, f in g.kinds(n, "peer_dead", node="a"))
        times.append(first - t_stop)
        for n in "bc":
            assert all(f["how"] == "confirmed" for _, f in g.kinds(n, "peer_dead"))
        taken = [a.key for n in "bc" for _, a in g.actions[n]]
        assert len(taken) == 30 and len(set(taken)) == 30, seed
    assert statistics.median(times) <= 0.120, times
    assert max(times) <= 0.1 + 0.02 + 0.02, times


def test_a_partitioned_node_heals_without_taking_anything():
    """c is cut off from everyone (all its links down) for 1 s. a and b confirm its death with
    each other and take its connections over. c loses every peer at once: isolated, it waits,
    then acts alone on a's and b's connections, but cannot reach their clients; when it hears
    them again every one of those takeovers is revoked before it reaches a client, it takes
    nothing after the heal, learns its own connections moved, and the group converges."""
    g = Group("abc", seed=23, adopt=True)
    own = {n: [entry(100 * k + i, k + 1) for i in range(20)] for k, n in enumerate("abc")}
    for n, es in own.items():
        for e in es:
            g.nodes[n].local_add(e, g.t)
    g.run(2.0)
    g.net.down.add("c")
    t_cut = g.t
    g.run(1.0)
    t_heal = g.t
    g.net.down.discard("c")
    g.run(1.2)
    c = g.nodes["c"]
    assert c.counters["isolations"] == 1 and g.kinds("c", "isolated") and g.kinds("c", "isolation_over")
    assert all(t < t_heal for t, _ in g.actions["c"])  # nothing after the heal
    assert not g.adopted["c"]  # none of its takeovers ever reached a client
    assert {k for _, k, _ in g.revoked["c"]} == {a.key for _, a in g.actions["c"]}
    # a and b took c's connections over, confirmed by each other, each exactly once
    for n in "ab":
        assert g.kinds(n, "peer_dead", node="c", how="confirmed")
        assert all(t < t_cut + 0.2 for t, _ in g.kinds(n, "peer_dead", node="c"))
    taken = [a.key for n in "ab" for _, a in g.actions[n]]
    assert sorted(taken) == sorted(e.key for e in own["c"])
    # one claimant per connection, 1 s after the heal
    for n, es in own.items():
        for e in es:
            who = g.claimants(e.key[:2])
            assert who == ([n] if n != "c" else who) and len(who) == 1, (n, who)
            if n == "c":
                assert who[0] in "ab"
    assert c.counters["disowned"] == 20 and not c.sync.local_entries()
    g.run(3.0)  # and it stays so
    assert all(t < t_heal for t, _ in g.actions["c"])
    assert sum(len(g.claimants(e.key[:2])) for es in own.values() for e in es) == 60


def test_two_members_crashing_at_once_the_survivors_confirm_with_each_other():
    g = Group("abcd", seed=24)
    for i in range(40):
        g.nodes["a"].local_add(entry(i, 1), g.t)
        g.nodes["b"].local_add(entry(1000 + i, 2), g.t)
    g.run(1.5)
    t_stop = g.t
    g.stop("a")
    g.stop("b")
    g.run(0.5)
    for n in "cd":
        for dead in "ab":
            evs = g.kinds(n, "peer_dead", node=dead)
            assert len(evs) == 1 and evs[0][1]["how"] == "confirmed", (n, dead, evs)
            assert evs[0][0] - t_stop <= 0.13
        assert g.nodes[n].counters["isolations"] == 0
    taken = [a.key for n in "cd" for _, a in g.actions[n]]
    assert len(taken) == 80 and len(set(taken)) == 80
    assert g.nodes["c"].counters["races"] == 0 and g.nodes["d"].counters["races"] == 0


def _moved_once(g, frm, to, n):
    """frm goes silent for 150 ms: `to` takes its n connections over (and adopts them)."""
    g.net.down.add(frm)
    g.run(0.15)
    g.net.down.discard(frm)
    g.run(1.5)  # to's next refresh: frm disowns them
    assert len(g.adopted[to]) == n and not g.nodes[frm].sync.local_entries()


def test_a_connection_that_just_moved_is_held_back_on_a_fresh_unconfirmed_suspicion():
    """Two members: a's connections moved to b a moment ago. b is then silent 150 ms: a's
    detector declares it dead and, with nobody to confirm, a holds those connections back
    (MOVED_HOLD) instead of taking them straight back; b comes back: nothing moved again."""
    from appliance.group import MOVED_HOLD
    g = Group("ab", seed=25, adopt=True)
    for i in range(10):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    g.run(2.0)
    _moved_once(g, "a", "b", 10)
    n_actions = len(g.actions["a"])
    g.net.down.add("b")
    g.run(0.15)
    g.net.down.discard("b")
    g.run(0.5)
    a = g.nodes["a"]
    assert len(g.actions["a"]) == n_actions == 0
    held = g.kinds("a", "held_back", node="b", why="moved")
    assert held and held[0][1]["connections"] == 10 and a.counters["held_back"] == 10
    assert a.counters["held_dropped"] == 10 and g.kinds("a", "false_suspicion", node="b", held=10)
    assert g.claimants(entry(3, 1).key[:2]) == ["b"]
    # b now really dies: a takes them, but only once the hold is over
    t_stop = g.t
    g.stop("b")
    g.run(MOVED_HOLD + 0.5)
    acts = g.actions["a"]
    assert len(acts) == 10 and len({x.key for _, x in acts}) == 10
    assert all(t - t_stop >= MOVED_HOLD for t, _ in acts)
    assert g.kinds("a", "held_released", node="b")


def test_a_connection_that_just_moved_is_taken_at_once_on_a_confirmed_death():
    """a's connections moved to b and c a moment ago; then b really dies: a and c confirm it
    with each other, so b's recently moved connections are taken at once (not held)."""
    g = Group("abc", seed=26, adopt=True)
    for i in range(20):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    g.run(2.0)
    g.net.down.add("a")
    g.run(0.15)
    g.net.down.discard("a")
    g.run(1.5)
    moved = {e.key[:2] for _, e in g.adopted["b"]}
    assert len(moved) + len(g.adopted["c"]) == 20 and moved
    for n in "abc":
        g.actions[n].clear()
    t_stop = g.t
    g.stop("b")
    g.run(0.5)
    taken = [x.key[:2] for n in "ac" for _, x in g.actions[n]]
    assert sorted(taken) == sorted(moved)
    assert all(t - t_stop < 0.2 for n in "ac" for t, _ in g.actions[n])  # confirmed: not held
    assert not any(g.kinds(n, "held_back", why="moved") for n in "ac")


def test_next_deadline_and_lag_counting():
    g = Group("ab", seed=27)
    g.run(1.0)
    a = g.nodes["a"]
    t = g.t
    d = a.next_deadline()
    assert t < d <= t + 0.02 + 1e-9  # the next heartbeat at the latest
    # ticks exactly at the deadlines: never late
    for _ in range(200):
        d = a.next_deadline()
        a.tick(max(d, a._now))
    assert a.counters["late_ticks"] == 0 and a.counters["lag_ticks"] == 0 and a.multiplier == 1.0
    # one tick 50 ms late: lagging, counted, multiplier raised by the lag
    late = a.next_deadline() + 0.05
    a.tick(late)
    assert a.counters["lag_ticks"] == 1 and abs(a.counters["max_lag_ms"] - 50) < 0.5
    assert a.multiplier == pytest.approx(1.5, abs=0.02)
    assert all(det.multiplier == a.multiplier for det in a.detectors.values())
    assert a.next_deadline() <= late + 0.04 + 1e-9  # the settling time ends within 2 intervals
    snap = a.snapshot(late)
    assert snap["health"]["lag_ticks"] == 1 and snap["health"]["settling"]


def test_a_member_asked_before_its_own_detector_fires_still_misses_the_peer():
    """c is asked about a 60 ms into a's silence (its detector not yet DEAD): its answer
    carries that silence, which is enough for the asker (>= dead_after / 2)."""
    from appliance.sync import PROBE_ACK, Decoder
    g = Group("abc", seed=28)
    g.run(1.0)
    g.stop("a")
    g.run(0.06)
    c = g.nodes["c"]
    assert c.peer_state("a") != DEAD
    b = g.nodes["b"]
    b.sync.probe("a", 4242, g.t)
    for d in b.tick(g.t):
        c.receive(d, g.t)
    dec = Decoder("g", bytes.fromhex("5a" * 16), "b")
    acks = [m for m in (dec.decode(d) for d in c.tick(g.t)) if m is not None and m.kind == PROBE_ACK]
    assert len(acks) == 1
    target, nonce, silence_ms, state = acks[0].body
    assert (target, nonce) == ("a", 4242) and silence_ms >= 50 and c.counters["probes_answered"] == 1
    assert b._misses(state, silence_ms)


def test_members_that_never_answer_do_not_leave_a_dead_peers_connections_to_nobody():
    """Nobody's PROBE_REQ gets through (say, members of an older version drop them): after
    PROBE_ROUNDS unanswered rounds a survivor proceeds alone; its CLAIMs confirm the death
    for the other; every connection is taken exactly once."""
    g = Group("abc", seed=29)
    for i in range(30):
        g.nodes["a"].local_add(entry(i, 1), g.t)
    g.run(1.5)
    orig = g.net.send
    g.net.send = lambda src, data, now, dsts: None if data[2] == 6 else orig(src, data, now, dsts)
    t_stop = g.t
    g.stop("a")
    g.run(0.6)
    hows = [f["how"] for n in "bc" for _, f in g.kinds(n, "peer_dead", node="a")]
    assert "unanswered" in hows and set(hows) <= {"unanswered", "confirmed"}
    taken = [x.key for n in "bc" for _, x in g.actions[n]]
    assert len(taken) == 30 and len(set(taken)) == 30
    assert max(t for n in "bc" for t, _ in g.actions[n]) - t_stop < 0.1 + 3 * 0.06 + 0.05
