"""Who takes over each connection of a dead peer, decided by every node alone (sans-I/O).

Ranking is weighted rendezvous hashing (highest random weight): for a connection key and a
candidate node, u = (first 8 bytes of SHA-256(key, node) as an integer + 0.5) / 2**64, in
(0, 1), and score = -w / ln(u), w being the node's spare capacity quantized to 10 steps.
A node wins a key with probability w / sum(w) and a node's removal moves only its own keys.
Every node of the group computes the same ranking from the same heartbeats, so no round of
talk is needed: the rank-0 candidate acts at once and CLAIMs at once (before it has checked
that it can serve, so the claims of a long queue go out together); when it cannot serve, it
PASSes, and the claim is withdrawn. The rank-k candidate is due after k x stagger, and then
acts only when every candidate ranked above it is *clear*: it passed the connection, it is
dead, or it has been heard acting on this death at least `stagger` ago and still has not
claimed this connection (it ranks differently, or its claim was lost). A higher candidate
that has said nothing yet (it has not detected the death, or its loop is stalled) is waited
for, at most `max_defer` from the due time: detection times differ by tens of
milliseconds between nodes, and a stagger alone would turn that skew into races.

Canonical encoding hashed (version 1), for a key (client_ip, client_port, server_ip,
server_port) and a node id:

    b"rdv1" | for each key element:  bytes/IP -> 1-byte length + packed address
                                     int      -> 2 bytes big-endian (a port, 0..65535)
            | 1-byte length + node id in UTF-8

so `rendezvous_score` is the same in every process and on every platform (Python's hash()
is never used). Addresses given as text ("10.0.0.1", "2001:db8::1") are packed first.
"""

from __future__ import annotations

import hashlib
import heapq
import ipaddress
import math
from collections.abc import Mapping
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

__all__ = [
    "MemberInfo", "TakeoverAction", "Race", "TakeoverPlanner", "LoadAdvertiser",
    "spare_weight", "rendezvous_score", "encode_key", "covers", "normalize_path",
    "candidates", "rank", "entry_path",
]

_TWO64 = float(2 ** 64)
_TAG = b"rdv1"


# -- weights and scores ---------------------------------------------------------------------

def spare_weight(load: float) -> float:
    """Spare capacity 1 - load, rounded to tenths, at least 0.1 (load clamped to 0..1).

    Rounding to 10 steps makes nodes whose views of a load differ slightly (a heartbeat
    apart) still compute the same weight. A bad load (NaN, not a number) counts as full.
    """
    try:
        load = float(load)
    except (TypeError, ValueError):
        load = 1.0
    if not math.isfinite(load):
        load = 1.0
    load = min(1.0, max(0.0, load))
    tenths = round((1.0 - load) * 10)          # 0..10
    return max(1, tenths) / 10.0


def _pack_element(e: Any) -> bytes:
    if isinstance(e, (bytes, bytearray, memoryview)):
        b = bytes(e)
        if len(b) > 255:
            raise ValueError("key element longer than 255 bytes")
        return bytes((len(b),)) + b
    if isinstance(e, bool):
        raise TypeError("key elements are addresses (bytes) and ports (int), not bool")
    if isinstance(e, int):
        if not 0 <= e <= 0xFFFF:
            raise ValueError(f"port {e} out of range 0..65535")
        return e.to_bytes(2, "big")
    if isinstance(e, str):
        try:
            b = ipaddress.ip_address(e).packed
        except ValueError:
            raise ValueError(f"key element {e!r} is not an IP address") from None
        return bytes((len(b),)) + b
    raise TypeError(f"key elements are addresses (bytes) and ports (int), not {type(e).__name__}")


def encode_key(key: Iterable) -> bytes:
    """The canonical bytes of a connection key (see the module docstring)."""
    return _TAG + b"".join(_pack_element(e) for e in key)


@lru_cache(maxsize=1024)
def _node_bytes(node: str) -> bytes:
    b = node.encode("utf-8")
    if len(b) > 255:
        raise ValueError("node id longer than 255 bytes")
    return bytes((len(b),)) + b


def _ln_u(digest: bytes) -> float:
    """ln(u), u = (h + 0.5) / 2**64, accurate at both ends (u never rounds to 1.0)."""
    h = int.from_bytes(digest[:8], "big")
    if h < 2 ** 63:
        return math.log((h + 0.5) / _TWO64)
    # u close to 1: ln(u) = log1p(-(1 - u)), 1 - u = (2**64 - h - 0.5) / 2**64 exactly
    return math.log1p(-((2 ** 64 - h) - 0.5) / _TWO64)


def _score(key_bytes: bytes, node: str, weight: float) -> float:
    digest = hashlib.sha256(key_bytes + _node_bytes(node)).digest()
    return -weight / _ln_u(digest)


def rendezvous_score(key: Iterable, node: str, weight: float) -> float:
    """score = -weight / ln(u), u in (0, 1) from SHA-256 over the key and node id."""
    return _score(encode_key(key), node, weight)


class LoadAdvertiser:
    """The load a node puts in its HEARTBEATs: its load rounded to tenths, with hysteresis.

    Every receiver of a heartbeat sees the same number, so views of a member's weight
    differ only when some receivers missed the heartbeat in which it changed. Rounding on
    the receiver alone does not make that rare (a load wandering around a step boundary
    flips the step at every heartbeat); hysteresis on the sender does: the advertised step
    changes only once the raw load is more than `hysteresis` beyond the current step's
    rounding band. `spare_weight(advertised)` is then exactly 1 - advertised (at least 0.1).
    """

    def __init__(self, hysteresis: float = 0.02):
        if not 0 <= hysteresis < 0.05:
            raise ValueError(f"hysteresis must be in [0, 0.05), not {hysteresis!r}")
        self.hysteresis = float(hysteresis)
        self._tenths: int | None = None
        self.changes = 0

    @property
    def value(self) -> float | None:
        """The load last advertised (None before the first update)."""
        return None if self._tenths is None else self._tenths / 10.0

    def update(self, load: float) -> float:
        """Feed the current load (0..1); returns the load to advertise."""
        try:
            load = float(load)
        except (TypeError, ValueError):
            load = 1.0
        if not math.isfinite(load):
            load = 1.0
        load = min(1.0, max(0.0, load))
        t = self._tenths
        if t is None:
            self._tenths = round(load * 10)
        elif abs(load - t / 10.0) > 0.05 + self.hysteresis:
            self._tenths = round(load * 10)
            self.changes += 1
        return self._tenths / 10.0


# -- members and candidates -------------------------------------------------------------------

@dataclass(frozen=True)
class MemberInfo:
    """What selection needs of a member (self included), as of its last heartbeat.

    load: fraction of capacity in use (0..1) from the member's last HEARTBEAT; for self,
    use the load self last *sent*, so that every node ranks with the same numbers.
    """
    load: float = 0.0
    prefixes: tuple = ("/",)
    alive: bool = True


def normalize_path(path: str | None) -> str:
    """The path part of a request target: no scheme/authority, query or fragment; "/" if empty."""
    if not path:
        return "/"
    if "://" in path[:12]:                      # absolute-form request target
        rest = path.split("://", 1)[1]
        slash = rest.find("/")
        path = rest[slash:] if slash >= 0 else "/"
    for sep in ("?", "#"):
        i = path.find(sep)
        if i >= 0:
            path = path[:i]
    if not path.startswith("/"):
        path = "/" + path
    return path


@lru_cache(maxsize=1024)
def _norm_prefix(prefix: str) -> str:
    p = normalize_path(prefix)
    return p.rstrip("/") or "/"


def covers(prefix: str, path: str) -> bool:
    """Prefix match on path segments: "/video" covers "/video" and "/video/a.mp4", not
    "/videos/x"; "/" covers everything."""
    return _covers_norm(_norm_prefix(prefix), normalize_path(path))


def _covers_norm(p: str, path: str) -> bool:
    return p == "/" or path == p or path.startswith(p + "/")


def _member_covers(info: Any, path: str) -> bool:
    """`path` already normalized."""
    prefixes = getattr(info, "prefixes", ("/",))
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(_covers_norm(_norm_prefix(p), path) for p in prefixes)


def candidates(path: str | None, members: Mapping[str, Any],
               exclude: Iterable[str] = ()) -> list:
    """Live members (sorted by node id) whose content prefixes cover `path`; with path None
    (an idle keep-alive connection) every live member."""
    exclude = set(exclude)
    if path is not None:
        path = normalize_path(path)
    return sorted(node for node, info in members.items()
                  if node not in exclude and getattr(info, "alive", True)
                  and (path is None or _member_covers(info, path)))


def _weights(members: Mapping[str, Any]) -> dict:
    return {n: spare_weight(getattr(info, "load", 1.0)) for n, info in members.items()}


def _rank_nodes(key_bytes: bytes, nodes: Iterable[str], weights: Mapping[str, float]) -> list:
    scored = [(-_score(key_bytes, n, weights[n]), n) for n in nodes]
    scored.sort()                       # highest score first, ties by node id
    return [n for _, n in scored]


def rank(key: Iterable, path: str | None, members: Mapping[str, Any],
         exclude: Iterable[str] = ()) -> list:
    """Candidates for `key`, highest score first (ties broken by node id)."""
    return _rank_nodes(encode_key(key), candidates(path, members, exclude), _weights(members))


def entry_path(entry: Any) -> str | None:
    """The path that decides who can adopt an entry: `.object.path`, else `.path`; None when
    the entry has neither (an IDLE keep-alive connection, `object` None): any live member
    can adopt it (`candidates(None, ...)`)."""
    obj = getattr(entry, "object", None)
    if obj is not None:
        p = getattr(obj, "path", None)
        return p if isinstance(p, str) and p else "/"
    p = getattr(entry, "path", None)
    return p if isinstance(p, str) and p else None


# -- takeover planning ------------------------------------------------------------------------

@dataclass(frozen=True)
class TakeoverAction:
    """This node must take over `key` of `dead_node` now (it was rank `rank`, due at `at`).

    It first checks that it can serve the rest; then it claims (GroupNode.claim_action), or it
    passes the connection on to the next candidate (GroupNode.pass_action) unless it is the
    `last` candidate, which resets the client instead."""
    key: tuple
    entry: Any = field(compare=False)
    dead_node: str
    dead_epoch: int
    rank: int
    at: float
    last: bool = True
    candidates: tuple = field(default=(), compare=False)


@dataclass(frozen=True)
class Race:
    """Another node claimed a connection this node already acted on: both acted.

    The client appliance accepts the first Migrate SYN and answers the second, redundant
    one with a RST; the migration layer should abandon its repaired socket on a RST (or
    when the client's SYN/ACK never comes)."""
    key: tuple
    dead_node: str
    other: str
    at: float


@dataclass
class _Pending:
    key: tuple
    entry: Any
    dead_node: str
    dead_epoch: int
    rank: int
    at: float          # when it is due
    order: tuple = ()
    first: float = 0.0  # when it was first due (reported as TakeoverAction.at)
    claimer: str = ""   # handed back by this claimer, declared dead (restored if it lives)
    claimed_at: float = 0.0


def _as_key(k: Any) -> tuple:
    return k if isinstance(k, tuple) else tuple(k)


class TakeoverPlanner:
    """Takeover timing for one node (`self_node`); see the module docstring.

    stagger:   delay between consecutive ranks, and the grace after a higher candidate is
               first heard acting on a death (default 20 ms).
    max_defer: how long past its due time a lower rank waits for a higher candidate that
               has said nothing about the death (default 1 s).
    reclaim_after: how long after a claimer is declared dead its unfinished claims are due
               here (default 2 s): a member that is only stalled (a loaded host) is heard
               again first, and its takeovers are not raced.
    claim_ttl: how long heard claims and own actions are remembered (for claims that arrive
               before this node has itself detected the death, and for races).
    """

    def __init__(self, self_node: str, stagger: float = 0.02, claim_ttl: float = 10.0,
                 max_defer: float = 1.0, reclaim_after: float = 2.0):
        if not isinstance(self_node, str) or not self_node:
            raise ValueError("self_node must be a non-empty str")
        if not stagger >= 0:
            raise ValueError(f"stagger must be >= 0, not {stagger!r}")
        if not max_defer >= 0:
            raise ValueError(f"max_defer must be >= 0, not {max_defer!r}")
        self.self_node = self_node
        self.stagger = float(stagger)
        self.max_defer = float(max_defer)
        self.reclaim_after = float(reclaim_after)
        self.claim_ttl = float(claim_ttl)
        self._pending: dict = {}          # (dead_node, key) -> _Pending
        self._heap: list = []             # (at, seq, (dead_node, key)); lazy deletion
        self._seq = 0
        self._claimed: dict = {}          # (dead_node, key) -> (claimer, heard_at)
        self._held: dict = {}             # (dead_node, key) -> _Pending withdrawn by a claim
        self._acted: dict = {}            # (dead_node, key) -> acted_at
        self._passed: dict = {}           # (dead_node, key) -> ({passers}, heard_at)
        self._heard: dict = {}            # dead_node -> {node: first heard acting on it}
        self._gone: dict = {}             # node -> when it was declared dead
        self._next_sweep = -math.inf
        self.decided = 0                  # connections ranked (with at least one candidate)
        self.mine = 0                     # ... of which this node was a candidate (pending)
        self.acted = 0
        self.suppressed_by_claim = 0
        self.cancelled = 0
        self.races = 0
        self.no_candidate = 0
        self.claimed_before_decision = 0  # skipped at peer_dead: a claim was already heard
        self.passes_heard = 0
        self.advanced_by_pass = 0         # acted before their stagger: every higher rank passed
        self.deferred = 0                 # due, but a higher candidate had not spoken yet
        self.defer_expired = 0            # acted after max_defer without a word from above
        self.reclaimed = 0                # withdrawn by a claim, due again (PASS or claimer died)
        self.stale_dropped = 0            # claims, actions, passes of an earlier round, dropped at a death

    # -- inputs ---------------------------------------------------------------------------

    def peer_dead(self, dead_node: str, dead_epoch: int, entries: Any,
                  members: Mapping[str, Any], now: float, gone: bool = True,
                  heard_until: Optional[float] = None) -> None:
        """`dead_node` was declared DEAD: rank each of its entries and schedule this node's
        part. `entries`: {key: entry} or an iterable of entries with `.key`. `members`:
        {node: MemberInfo-like}, self included (the dead node is excluded whatever its
        `alive`). Connections already pending, acted on, or claimed are skipped. gone=False
        for a node that hands its connections over alive (a drain): what it claimed
        elsewhere stays its own. heard_until: when this node last heard `dead_node`; claims,
        passes and own actions from before then belong to an earlier round (a suspicion
        that proved false, here or at their sender) and are dropped: kept, they would have
        every candidate wait for another and nobody take the connection."""
        if self.self_node not in members:
            raise ValueError(f"members must include this node ({self.self_node!r}), with the "
                             "load it last advertised")
        self._expire(now)
        if heard_until is not None:
            self.stale_dropped += self._drop_before(dead_node, heard_until)
        if gone:
            self._node_gone(dead_node, now)
        if isinstance(entries, Mapping):
            items = entries.items()
        else:
            items = ((e.key, e) for e in entries)
        excl = (dead_node,)
        cand_cache: dict = {}
        weights = _weights(members)
        for key, entry in items:
            key = _as_key(key)
            ident = (dead_node, key)
            if ident in self._pending or ident in self._acted:
                continue
            if ident in self._claimed:
                self.claimed_before_decision += 1
                continue
            path = entry_path(entry)
            if path is not None:
                path = normalize_path(path)
            cands = cand_cache.get(path)
            if cands is None:
                cands = cand_cache[path] = candidates(path, members, excl)
            if not cands:
                self.no_candidate += 1
                continue
            self.decided += 1
            if self.self_node not in cands:
                continue
            order = tuple(_rank_nodes(encode_key(key), cands, weights))
            k = order.index(self.self_node)
            at = now + k * self.stagger
            passed = self._passed.get(ident)
            if passed is not None and all(n in passed[0] for n in order[:k]):
                at = now  # every candidate ranked above this node already said it cannot serve
            self._pending[ident] = _Pending(key, entry, dead_node, dead_epoch, k, at, order, at)
            self._seq += 1
            heapq.heappush(self._heap, (at, self._seq, ident))
            self.mine += 1

    def _node_gone(self, node: str, now: float) -> None:
        """`node` is dead: what it claimed and had not finished is due again here, and it no
        longer holds back lower ranks."""
        self._gone.setdefault(node, now)
        for ident in [i for i, (claimer, _) in self._claimed.items() if claimer == node]:
            p = self._held.pop(ident, None)
            _, heard = self._claimed.pop(ident)
            if p is not None and ident not in self._pending and ident not in self._acted:
                p.claimer, p.claimed_at = node, heard
                self._repend(ident, p, now + self.reclaim_after)
        for ident, p in self._pending.items():
            if p.at > now and node in p.order[:p.rank] and not p.claimer:
                self._repend(ident, p, now, count=False)

    def _repend(self, ident: tuple, p: _Pending, at: float, count: bool = True) -> None:
        p.at = at
        self._pending[ident] = p
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, ident))
        if count:
            self.reclaimed += 1

    def _spoke(self, node: str, dead_node: str, now: float) -> None:
        heard = self._heard.setdefault(dead_node, {})
        if node not in heard:
            heard[node] = now

    def _clear_at(self, ident: tuple, p: _Pending) -> float:
        """When every candidate ranked above this node has had its chance at the connection
        (inf: not foreseeable yet). A higher candidate is clear when it passed or died, or a
        stagger after it could act on the connection and did not claim it: after it was
        first heard acting on the death *and* every candidate above it was clear."""
        passed = self._passed.get(ident)
        passed = passed[0] if passed is not None else {}
        heard = self._heard.get(p.dead_node, {})
        above = -math.inf  # when every candidate ranked above the one looked at was clear
        for n in p.order[:p.rank]:
            done = min(self._gone.get(n, math.inf), passed.get(n, math.inf))
            could = max(heard.get(n, math.inf), above)
            above = max(above, min(done, could + self.stagger))
        return above

    def claim_heard(self, claimer: str, dead_node: str, keys: Iterable, now: float) -> list:
        """A CLAIM from `claimer` for `keys` of `dead_node`: those are not this node's to take.
        Returns the races (connections this node had already acted on)."""
        races = []
        if claimer == self.self_node:
            return races
        self._expire(now)
        self._spoke(claimer, dead_node, now)
        for key in keys:
            key = _as_key(key)
            ident = (dead_node, key)
            if ident in self._acted:
                if ident not in self._claimed:
                    self.races += 1
                    races.append(Race(key, dead_node, claimer, now))
                self._claimed[ident] = (claimer, now)
                continue
            self._claimed[ident] = (claimer, now)
            p = self._pending.pop(ident, None)
            if p is not None:
                self._held[ident] = p  # kept: the claimer may pass it on after all
                self.suppressed_by_claim += 1
        return races

    def pass_heard(self, passer: str, dead_node: str, keys: Iterable, now: float) -> int:
        """A PASS from `passer`: it cannot serve these connections of `dead_node`. A pending
        connection of this node whose higher-ranked candidates have all passed is due now
        (it no longer waits for its stagger). Returns how many became due."""
        self._expire(now)
        if passer != self.self_node:
            self._spoke(passer, dead_node, now)
        advanced = 0
        for key in keys:
            key = _as_key(key)
            ident = (dead_node, key)
            who = self._passed.get(ident)
            if who is None:
                who = self._passed[ident] = ({}, now)
            who[0].setdefault(passer, now)
            self.passes_heard += 1
            claim = self._claimed.get(ident)
            if claim is not None and claim[0] == passer:
                del self._claimed[ident]  # its claim is withdrawn
                held = self._held.pop(ident, None)
                if held is not None and ident not in self._pending and ident not in self._acted:
                    self._repend(ident, held, now)
                    advanced += 1
                    continue
            p = self._pending.get(ident)
            if p is None or p.at <= now or not all(n in who[0] for n in p.order[:p.rank]):
                continue
            p.at = now
            self._seq += 1
            heapq.heappush(self._heap, (now, self._seq, ident))
            self.advanced_by_pass += 1
            advanced += 1
        return advanced

    def peer_alive_again(self, dead_node: str) -> int:
        """`dead_node` was falsely suspected: drop its pending decisions. Returns how many."""
        self._gone.pop(dead_node, None)
        for ident, p in [(i, p) for i, p in self._pending.items() if p.claimer == dead_node]:
            del self._pending[ident]  # the claimer lives: its claims stand again
            p.claimer = ""
            self._held[ident] = p
            self._claimed[ident] = (dead_node, p.claimed_at)
        gone = [ident for ident in self._pending if ident[0] == dead_node]
        for ident in gone:
            del self._pending[ident]
        for ident in [i for i in self._held if i[0] == dead_node]:
            del self._held[ident]
        self.cancelled += len(gone)
        return len(gone)

    def _drop_before(self, dead_node: str, t: float) -> int:
        """Claims heard, own actions and passes for dead_node's connections older than t
        (with what a stale claim held back)."""
        stale = [i for i, (_, at) in self._claimed.items() if i[0] == dead_node and at < t]
        for ident in stale:
            del self._claimed[ident]
            self._held.pop(ident, None)
        acted = [i for i, at in self._acted.items() if i[0] == dead_node and at < t]
        for ident in acted:
            del self._acted[ident]
        passed = [i for i, (_, at) in self._passed.items() if i[0] == dead_node and at < t]
        for ident in passed:
            del self._passed[ident]
        return len(stale) + len(acted) + len(passed)

    def forget(self, dead_node: str) -> None:
        """Drop everything about `dead_node` (pending decisions are cancelled)."""
        self.peer_alive_again(dead_node)
        self._heard.pop(dead_node, None)
        for d in (self._claimed, self._acted, self._passed):
            for ident in [i for i in d if i[0] == dead_node]:
                del d[ident]

    # -- outputs --------------------------------------------------------------------------

    def due(self, now: float) -> list:
        """The actions this node must execute now (each returned once), in due order.
        The caller executes them and sends a CLAIM for their keys at once."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now + 1e-9:
            at, _, ident = heapq.heappop(heap)
            p = self._pending.get(ident)
            if p is None or p.at != at:
                continue                  # claimed, cancelled, or superseded
            clear = self._clear_at(ident, p) if p.rank else -math.inf
            if clear > now + 1e-9:
                limit = p.first + self.max_defer
                if now < limit - 1e-9:
                    if p.at == p.first:
                        self.deferred += 1
                    self._repend(ident, p, min(limit, clear, now + self.stagger), count=False)
                    continue
                self.defer_expired += 1
            del self._pending[ident]
            self._acted[ident] = now
            self.acted += 1
            out.append(TakeoverAction(p.key, p.entry, p.dead_node, p.dead_epoch, p.rank, p.first,
                                      last=p.rank >= len(p.order) - 1, candidates=p.order))
        self._expire(now)
        return out

    def next_due(self) -> float | None:
        """The earliest time `due` will return something (None: nothing pending)."""
        heap = self._heap
        while heap:
            at, _, ident = heap[0]
            p = self._pending.get(ident)
            if p is not None and p.at == at:
                return at
            heapq.heappop(heap)
        return None

    def pending(self, dead_node: str | None = None) -> int:
        if dead_node is None:
            return len(self._pending)
        return sum(1 for ident in self._pending if ident[0] == dead_node)

    def counters(self) -> dict:
        return {
            "decided": self.decided, "mine": self.mine, "acted": self.acted,
            "suppressed_by_claim": self.suppressed_by_claim, "cancelled": self.cancelled,
            "races": self.races, "no_candidate": self.no_candidate,
            "claimed_before_decision": self.claimed_before_decision,
            "passes_heard": self.passes_heard, "advanced_by_pass": self.advanced_by_pass,
            "deferred": self.deferred, "defer_expired": self.defer_expired, "reclaimed": self.reclaimed,
            "stale_dropped": self.stale_dropped,
            "pending": len(self._pending),
        }

    def _expire(self, now: float) -> None:
        """Forget claims heard and own actions older than claim_ttl (a sweep at most every
        claim_ttl / 4)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.claim_ttl / 4
        limit = now - self.claim_ttl
        for ident in [i for i, (_, t) in self._claimed.items() if t < limit]:
            del self._claimed[ident]
            self._held.pop(ident, None)
        for dead_node in [d for d, heard in self._heard.items() if max(heard.values()) < limit]:
            del self._heard[dead_node]
        for ident in [i for i, t in self._acted.items() if t < limit]:
            del self._acted[ident]
        for ident in [i for i, (_, t) in self._passed.items() if t < limit]:
            del self._passed[ident]
