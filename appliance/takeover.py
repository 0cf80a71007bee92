"""The takeover engine: continue another replica's live HTTP downloads at the exact next byte,
or end them with a reset the client's kernel accepts: never a hang, never a splice of other bytes.

For each connection the selection layer hands it (`selection.TakeoverAction`, or an
`sync.Entry` for a planned migration), on an asyncio loop, with no thread per connection:

1. **Claim, then check, else pass.** A group action is claimed when it starts (`on_claim`:
   the other candidates stand down, even while it waits in a long queue). An ACTIVE entry's
   object is then checked against this replica's own server: its last byte, asked for over
   a pool of keep-alive connections (appliance.localhttp.ProbePool), must come back as a
   206 of an object with the advertised length and validators (appliance.resume, at the
   group's `validators` level; under ``digest`` this replica's digest of its copy must
   equal the advertised one). If it does not, the connection is passed on (`on_pass`
   withdraws the claim: the next candidate acts at once), unless this is the last
   candidate, which resets the client instead (a planned one stays where it is).
2. **Migrate handshake** (appliance.handshake): Migrate SYNs until the client appliance's
   SYN/ACK gives the client's exact position (and what it holds above a hole).
3. **Local fetch**: the rest of the body as `Range: bytes=<offset>-<last>` on a keep-alive
   connection to the local server, its head validated again; or the request re-issued
   whole (a PENDING entry, or one whose response had not begun); or nothing (adopt).
4. **Repair** (appliance.repair): B's socket in the client's exact view. Bytes the client
   holds above a hole are queued as already sent, so its jump in ack once the hole is
   filled is an ack of sent data.
5. **Verify**: unless the SYN/ACK is exact (the client appliance's own probe of a failover
   whose server was silent was answered, and nothing reached the client after it), the
   client's answer to an old-byte probe (handshake.old_byte_probe, seen by a
   raw socket filtered to that 4-tuple; at most `verify_slots` such sockets at once) must
   show the position the SYN/ACK gave; a client a little ahead is caught up (those bytes
   are marked sent), one behind B (B would be ahead: a hole nobody fills) is reset. No
   answer: probe again; still none: reset. No first body byte leaves before this.
6. **Relay** (appliance.relay): the rest of the body spliced into the socket, then later
   requests proxied to the local server on the same keep-alive connection, both ways,
   until either side closes. `on_owned(entry, rcv_nxt, snd_nxt)` hands the connection to
   the server appliance (its stream mapper adopts it, so later responses are advertised as
   this replica's); `on_released(entry)` when the relay ends.

Whenever a takeover cannot go on once the client appliance has answered (a RESET-only
entry, the client inside a response head, a local server that fails, a lost position),
this replica sends a **Migrate RST** (appliance.handshake.migrate_rst): with P set the
client appliance resets the client at once; for a planned migration P is clear and the
connection stays with its old server.

Outcomes, one per takeover (event "outcome", and counters): resumed, reset (with the reason),
passed, failed (no SYN/ACK, refused by the client appliance, an internal error). Every step
is also an event through on_event(kind, **fields) with client, client_port, server,
server_port (A's), mono, wall and since_start_ms:

    checked           ok, reason, ms, cached
    passed / claimed  reason (passed)
    migrate_syn_sent  attempt, seq, reqno, sent
    synack            seq, ack, window, tsval, tsecr, rtt_ms, attempts, held_above
    repaired          ms, repair_ms, plan, held_above
    resynced          stale_ack, ack, gap: the client was ahead of its SYN/ACK; fixed
    reprobe           attempt
    ts_advanced       tsval, ts_recent, to: B's TSval clock was behind the client's; moved
    resumed           mode (resume/adopt/whole), offset, bytes_left
    first_byte        ms: the first byte written to the client's socket
    body_sent         bytes, seconds
    refused           reason: the client is reset on purpose (a Migrate RST was sent)
    done              bytes, bytes_from_client, seconds, end
    failed            reason
    outcome           outcome, reason

More work than `max_active` takeovers being set up at once waits in a queue (counted, never
failed; a relay holds no slot), served closest-to-stalling first: resets (a client waiting
for an error), then requests waiting for their whole response, then responses in flight,
then idle connections (nobody waits on them); in arrival order within each.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional

import _fastpath as fp

from . import localhttp, repair
from .handshake import (
    ADOPT, BACKOFF, GIVE_UP, INITIAL_RTO, REFUSE, RESET, RESET_ONLY, RESUME, WHOLE, Handshake, Plan, RepairParams,
    answers_probe, best_answer, migrate_rst, old_byte_probe, plan_resume, probe_seq,
)
from .rawsock import AckWatch, Receiver, TakeoverError, interface_ipv4
from .relay import PIPE_SIZE, Relay
from .resume import Refused, check_probe, check_range_head, probe_request, range_request, whole_request

__all__ = ["TakeoverEngine", "TakeoverError", "interface_ipv4", "owned_entry", "Refused", "Plan", "plan_resume",
           "RESUMED", "RESET_OUTCOME", "PASSED", "FAILED"]

VERIFY_SLOTS = 64  # takeovers between repair and the client's answer at once (each holds a raw socket)
HANDSHAKE_SLOTS = 128  # Migrate handshakes awaiting their SYN/ACK at once (the client appliance's queue)
LATE_ANSWER_FOR = 30.0  # seconds a given-up handshake still answers a late SYN/ACK (a Migrate RST, P clear)
LATE_ANSWER_MAX = 16384  # ... and how many of them are remembered
MAX_INITIAL_RTO = 2.0  # seconds: the most a first Migrate SYN waits before its retransmission
MAX_RESYNC = 4 << 20  # bytes the client may be ahead of its SYN/ACK and still be caught up
URGENCY = {"RESET": 0, "PENDING": 1, "ACTIVE": 2, "IDLE": 3}  # who waits most for a takeover: first
CHECK_CACHE_S = 2.0  # a check of one object (path and validators) holds this long
RESUMED, RESET_OUTCOME, PASSED, FAILED = "resumed", "reset", "passed", "failed"


def _text(packed: bytes) -> str:
    return fp.address_text(packed)


class _Failed(Exception):
    """The takeover cannot happen and nothing can be told to the client (str: the reason)."""


def owned_entry(entry, local: bytes, local_port: int, reqno: int, plan: Plan):
    """What the new owner's stream mapper adopts: A's entry with B's address and port and the
    ReqNo this takeover used (so the next takeover uses a newer one); a response about to be
    answered whole is a PENDING request; a connection adopted with nothing in flight is IDLE."""
    e = replace(entry, server_ip=local, server_port=local_port, reqno=reqno)
    if plan.kind == WHOLE:
        first = (entry.na + 1) & 0xFFFFFFFF if entry.state == "ACTIVE" else entry.body_start
        obj = entry.object
        return replace(e, state="PENDING", object=replace(obj, etag=None, last_modified=None, total_length=0,
                                                         digest=None),
                       status=0, body_start=first, body_offset=0, body_length=0, reason=None)
    if plan.kind == ADOPT:
        return replace(e, state="IDLE", object=None, req_range=None, status=0, body_start=0, body_offset=0,
                       body_length=0, reason=None)
    return e


def _close_connected(task: asyncio.Task) -> None:
    """A pre-opened local connection the takeover did not use: closed (its error, if it
    failed, taken so that asyncio does not log it)."""
    if task.cancelled():
        return
    if task.exception() is None:
        task.result().close()


@dataclass
class _Takeover:
    key: tuple
    entry: object
    action: object  # the TakeoverAction, or None (a planned migration or a direct start)
    planned: bool
    fields: dict
    started: float
    local_port: int
    phase: str = "queued"  # queued checking handshake fetching repairing verifying relaying + the end ones
    hs: Optional[Handshake] = None
    synack: Optional[asyncio.Future] = None
    timer: object = None
    plan: Optional[Plan] = None
    params: Optional[RepairParams] = None
    sock: Optional[socket.socket] = None
    local: Optional[socket.socket] = None
    relay: Optional[Relay] = None
    watch: Optional[AckWatch] = None
    task: object = None
    to_client: int = 0
    to_local: int = 0
    first_byte: Optional[float] = None
    ended: Optional[float] = None
    reason: str = ""
    outcome: Optional[str] = None
    owned: object = None
    sent_above: int = 0  # bytes queued as sent at repair (held by the client above a hole)
    slot: bool = False  # counts against max_active (setup under way)
    repaired_at: float = 0.0
    connecting: Optional[asyncio.Task] = None  # the local server's connection, opened during the handshake

    def row(self, now: float) -> dict:
        p = self.plan
        return {**self.fields, "phase": self.phase, "attempts": self.hs.attempts if self.hs else 0,
                "age_s": round((self.ended or now) - self.started, 3), "plan": p.kind if p else None,
                "offset": p.offset if p else None, "bytes_left": p.bytes_left if p else None,
                "to_client": self.to_client, "to_local": self.to_local, "reason": self.reason,
                "outcome": self.outcome, "reqno": self.hs.reqno if self.hs else None}


class TakeoverEngine:
    """Takes over connections of dead (or draining) peers on this replica (module docstring).

    local_ip: this replica's address (Migrate SYNs leave from it; repaired sockets bind it).
    service_ports: the ports this replica serves (B's port is the entry's server port when
        it is one of them, else the first); the receiver admits SYN/ACKs and RSTs to them only.
    http_port: the local HTTP server's port (reached at http_host, default local_ip).
    validators: "strict", "last-modified" or "digest" (appliance.resume);
    digest_of(path) -> sha-256 bytes or None: this replica's digest of its copy (digest level).
    on_event(kind, **fields), on_claim(action), on_pass(action), on_owned(entry, rcv_nxt,
        snd_nxt), on_released(entry): called in the loop's thread.
    injector: sends IP packets (default appliance.inject.RawInjector()).
    receiver: open the raw SYN/ACK socket (False: feed() packets yourself, e.g. in tests).
    socket_factory: builds the socket from RepairParams (default repair.repaired_socket).
    verify_ack: (default: when receiver is on) wait for the client's answer to the window probe.
    max_active: takeovers running at once; more wait in a queue.
    retry_alive(action) -> bool: the client appliance refused a failover because it still hears
        the server (a false suspicion): try it again after a backoff (retry_backoff: first,
        cap) while this says the server is still held dead (its real death must not be missed).

    attach(loop) in the loop's thread before start(); close() at the end.
    """

    def __init__(self, local_ip: str, service_ports, http_port: int, on_event: Callable = None,
                 injector=None, *, http_host: Optional[str] = None, initial_rto: float = INITIAL_RTO,
                 backoff: float = BACKOFF, give_up: float = GIVE_UP, receiver: bool = True,
                 socket_factory: Optional[Callable] = None, validators: str = "strict",
                 digest_of: Optional[Callable] = None, max_active: int = 1024, fetch_timeout: float = 5.0,
                 check_timeout: float = 2.0, idle_timeout: float = 300.0, pipe_size: int = PIPE_SIZE,
                 keep_finished: int = 100, on_owned: Optional[Callable] = None,
                 on_released: Optional[Callable] = None, on_claim: Optional[Callable] = None,
                 on_pass: Optional[Callable] = None, verify_ack: Optional[bool] = None,
                 max_resync: int = MAX_RESYNC, probe_wait=(0.05, 1.0), reprobes: int = 4,
                 retry_alive: Optional[Callable] = None, retry_backoff=(0.5, 4.0),
                 verify_slots: int = VERIFY_SLOTS, handshake_slots: int = HANDSHAKE_SLOTS) -> None:
        self.local_ip = str(ipaddress.ip_address(local_ip))
        self.local_packed = fp.pack_address(self.local_ip)
        self.family = socket.AF_INET6 if len(self.local_packed) == 16 else socket.AF_INET
        self.service_ports = sorted(set(int(p) for p in service_ports))
        if not self.service_ports:
            raise ValueError("at least one service port")
        if validators not in ("strict", "last-modified", "digest"):
            raise ValueError(f"validators must be strict, last-modified or digest, not {validators!r}")
        self.validators = validators
        self.digest_of = digest_of
        self.http_addr = (http_host or self.local_ip, int(http_port))
        self.on_event = on_event
        self.on_owned, self.on_released, self.on_claim, self.on_pass = on_owned, on_released, on_claim, on_pass
        if injector is None:
            from .inject import RawInjector
            injector = RawInjector()
        self.injector = injector
        self.timing = (initial_rto, backoff, give_up)
        self.socket_factory = socket_factory or repair.repaired_socket
        self.max_active = max_active
        self.fetch_timeout, self.check_timeout = fetch_timeout, check_timeout
        self.idle_timeout, self.pipe_size = idle_timeout, pipe_size
        self._receiver = Receiver(self.family, self.service_ports) if receiver else None
        self.verify_ack = receiver if verify_ack is None else verify_ack
        self.max_resync = max_resync
        self.probe_wait, self.reprobes = probe_wait, reprobes
        if verify_slots < 1 or handshake_slots < 1:
            raise ValueError("verify_slots and handshake_slots must be at least 1")
        self.verify_slots, self.handshake_slots = verify_slots, handshake_slots
        self._verifying: Optional[asyncio.Semaphore] = None
        self._handshaking: Optional[asyncio.Semaphore] = None
        self._srtt: Optional[float] = None  # smoothed SYN/ACK time of first attempts (Karn)
        self.retry_alive, self.retry_backoff = retry_alive, retry_backoff
        self._retries: Dict[tuple, int] = {}
        self._active: "OrderedDict[tuple, _Takeover]" = OrderedDict()  # running or queued
        self._queue: list = []  # heap of (urgency, arrival, takeover)
        self._arrivals = 0
        self._running = 0
        self._by_match: Dict[tuple, _Takeover] = {}  # handshakes in flight, by the SYN/ACK's 4-tuple
        self._ended: "OrderedDict[tuple, tuple]" = OrderedDict()  # given-up handshakes: match -> (hs, when)
        self._by_client: Dict[tuple, _Takeover] = {}  # every takeover not over, by the same 4-tuple
        self._finished: deque = deque(maxlen=keep_finished)
        self._checks: Dict[tuple, tuple] = {}  # (path, validators of the entry) -> (at, reason)
        self._pool: Optional[localhttp.ProbePool] = None
        self._loop = None
        self._closed = False
        self._counters = dict.fromkeys(
            ("started", "queued", "checks", "checks_cached", "checks_failed", "claimed", "passed", "migrate_syns",
             "retransmissions", "synacks", "repaired", "resumed", "adopted", "whole", "refused", "resets_sent",
             "failed", "done", "duplicates", "superseded", "packets", "ignored", "bytes_to_client", "bytes_from_client",
             "send_errors", "late_synacks", "resynced", "reprobes", "answers_unmarked", "verify_skipped", "ts_advanced", "held_above", "retries_scheduled", "retries",
             "outcome_resumed", "outcome_reset",
             "outcome_passed", "outcome_failed"), 0)

    # -- events --------------------------------------------------------------------------------

    def _emit(self, t: Optional[_Takeover], kind: str, **fields) -> None:
        if self.on_event is None:
            return
        mono = time.monotonic()
        base = dict(t.fields) if t is not None else {}
        if t is not None:
            base["since_start_ms"] = round((mono - t.started) * 1000, 3)
        base.update(fields)
        base["mono"] = mono
        base["wall"] = time.time()
        self._call(self.on_event, kind, **base)

    @staticmethod
    def _call(fn: Optional[Callable], *args, **kw) -> None:
        if fn is None:
            return
        try:
            fn(*args, **kw)
        except Exception:  # noqa: BLE001  a reporting bug must not break a takeover
            pass

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] += n

    # -- the loop --------------------------------------------------------------------------------

    def attach(self, loop) -> None:
        """Run on an asyncio loop (call in its thread): the raw socket's reader and the pool."""
        self._loop = loop
        if self._receiver is not None:
            loop.add_reader(self._receiver.fileno(), self.on_readable)
        self._pool = localhttp.ProbePool(loop, self.http_addr, timeout=self.check_timeout)

    def detach(self) -> None:
        if self._loop is None:
            return
        if self._receiver is not None:
            try:
                self._loop.remove_reader(self._receiver.fileno())
            except Exception:  # noqa: BLE001  the loop may be closed already
                pass

    def fileno(self) -> int:
        """The raw SYN/ACK socket's descriptor."""
        if self._receiver is None:
            raise ValueError("this engine has no receiver")
        return self._receiver.fileno()

    def on_readable(self, limit: int = 256) -> int:
        """Read and handle up to `limit` packets from the raw socket; returns how many."""
        if self._receiver is None:
            return 0
        packets = self._receiver.read(limit)
        now = time.monotonic()
        for p in packets:
            self.feed(p, now)
        return len(packets)

    def feed(self, packet: bytes, now: Optional[float] = None) -> bool:
        """One received IP packet (a SYN/ACK or RST); True if it answered a takeover."""
        now = time.monotonic() if now is None else now
        self._count("packets")
        v = fp.parse(packet, fp.LINK_RAW)
        match = (v.src, v.sport, v.dst, v.dport) if v.is_tcp else None
        t = self._by_match.get(match) if match is not None else None
        if t is None and match is not None and v.flags & (fp.SYN | fp.ACK | fp.RST) == fp.SYN | fp.ACK:
            self._answer_late(match, v)
        if t is None or t.phase != "handshake" or t.synack is None or t.synack.done():
            self._count("ignored")
            return False
        params = t.hs.on_synack(v, now)
        if t.hs.state == RESET:
            t.synack.set_exception(_Failed(t.hs.reason))
            return True
        if params is None:
            self._count("ignored")
            return False
        t.synack.set_result(params)
        return True

    def _answer_late(self, match: tuple, v) -> None:
        """A SYN/ACK for a handshake this engine gave up on (its Migrate SYN reached a loaded
        client appliance after the takeover failed): a Migrate RST without P ends the lock
        there at once, instead of the client's traffic waiting for the lock timeout."""
        ended = self._ended.get(match)
        if ended is None:
            return
        hs, at = ended
        if time.monotonic() - at > LATE_ANSWER_FOR:
            del self._ended[match]
            return
        if not self.injector.send(migrate_rst(hs, v.ack, preload=False)):
            self._count("send_errors")
        self._count("late_synacks")

    # -- starting ---------------------------------------------------------------------------------

    def start(self, action_or_entry, now: Optional[float] = None, planned: bool = False) -> bool:
        """Begin taking over a connection (a TakeoverAction, or a sync.Entry). False (with a
        failed event) when it cannot be migrated here, or it is already being taken over
        (counted, no event). Call in the loop's thread, after attach()."""
        if self._loop is None:
            raise RuntimeError("attach(loop) first")
        entry = getattr(action_or_entry, "entry", action_or_entry)
        action = action_or_entry if action_or_entry is not entry else None
        key = entry.key
        fields = {"client": _text(entry.client_ip), "client_port": entry.client_port,
                  "server": _text(entry.server_ip), "server_port": entry.server_port}
        if self._closed:
            return False
        if key in self._active:
            self._count("duplicates")
            return False
        local_port = entry.server_port if entry.server_port in self.service_ports else self.service_ports[0]
        match = (entry.client_ip, entry.client_port, self.local_packed, local_port)
        problem = None
        if not entry.mp:
            problem = "the client's SYN had no Migrate-Permitted"
        elif len(entry.client_ip) != len(self.local_packed):
            problem = "the client's address family differs from this replica's"
        else:
            other = self._by_client.get(match)
            if other is not None:
                # two entries of one connection (a dead member's stale copy, and the newer one
                # of the member that took it over and died too): the newer ReqNo is the truth
                if fp.reqno_newer(entry.reqno, other.entry.reqno) and other.outcome is None and other.relay is None:
                    self._count("superseded")
                    self.abort(other.key, "superseded by a newer entry of the same connection")
                else:
                    problem = "another takeover of this client address and port is in progress"
            elif match in self._by_match:
                problem = "another takeover of this client address and port is in progress"
        if problem:
            self._count("failed")
            self._emit(None, "failed", reason=problem, **fields)
            return False
        t = _Takeover(key, entry, action, planned, fields, time.monotonic(), local_port)
        self._active[key] = t
        self._by_client[match] = t
        self._count("started")
        if action is not None:
            # at once, not after the check: a lower-ranked candidate must not start on it
            # while it waits here behind others (a pass withdraws the claim)
            self._count("claimed")
            self._call(self.on_claim, action)
            self._emit(t, "claimed", last=action.last, rank=action.rank)
        if self._running < self.max_active:
            self._launch(t)
        else:
            self._arrivals += 1
            heapq.heappush(self._queue, (URGENCY.get(t.entry.state, 2), self._arrivals, t))
            self._count("queued")
        return True

    def _retry(self, t: _Takeover) -> None:
        """The server was alive after all (a false suspicion): try again later, while the
        group still holds it dead, so that its real death later is not missed."""
        if t.action is None or self.retry_alive is None or self._closed:
            return
        n = self._retries.get(t.key, 0)
        delay = min(self.retry_backoff[1], self.retry_backoff[0] * 2 ** n)
        self._retries[t.key] = n + 1
        self._count("retries_scheduled")

        def again() -> None:
            if not self._closed and t.key not in self._active and self._call_ok(self.retry_alive, t.action):
                self._count("retries")
                self.start(t.action)
            else:
                self._retries.pop(t.key, None)

        self._loop.call_later(delay, again)

    @staticmethod
    def _call_ok(fn, *args) -> bool:
        try:
            return bool(fn(*args))
        except Exception:  # noqa: BLE001
            return False

    def _launch(self, t: _Takeover) -> None:
        self._running += 1
        t.slot = True
        t.task = self._loop.create_task(self._run(t))

    def _release_slot(self, t: _Takeover) -> None:
        """A takeover past its setup (relaying, or over) no longer counts against max_active."""
        if not t.slot:
            return
        t.slot = False
        self._running -= 1
        while self._queue and self._running < self.max_active and not self._closed:
            nxt = heapq.heappop(self._queue)[2]
            if nxt.outcome is None:
                self._launch(nxt)

    async def _run(self, t: _Takeover) -> None:
        try:
            await self._takeover(t)
        except _Failed as exc:
            self._end(t, FAILED, str(exc))
            if t.hs is not None and t.hs.server_alive:
                self._retry(t)
        except asyncio.CancelledError:
            self._abort_client(t)
            self._end(t, FAILED, t.reason or "engine closed")
        except Exception as exc:  # noqa: BLE001  a bug here must not kill the engine
            self._abort_client(t)
            self._end(t, FAILED, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._cleanup(t)
            self._release_slot(t)

    # -- one takeover -----------------------------------------------------------------------------

    async def _takeover(self, t: _Takeover) -> None:
        e = t.entry
        t.phase = "checking"
        why = await self._check(t)
        reset_reason = None
        if why is not None:
            if t.action is not None and not t.action.last:
                self._count("passed")
                self._call(self.on_pass, t.action)
                self._emit(t, "passed", reason=why)
                self._end(t, PASSED, why)
                return
            if t.planned:  # the connection stays where it is: no Migrate SYN at all
                self._end(t, FAILED, f"cannot serve it here: {why}")
                return
            reset_reason = f"no member can serve it: {why}"
        if e.state == "RESET":
            reset_reason = f"not resumable: {e.reason or 'unknown'}"
        if reset_reason is None:
            # while the client appliance checks and probes, so that the fetch needs one
            # round trip to the local server, not two
            t.connecting = self._loop.create_task(localhttp.connect(self._loop, self.http_addr, self.fetch_timeout))
        params = await self._handshake(t)
        if reset_reason is not None:
            self._reset(t, reset_reason)
            return
        t.plan = plan = plan_resume(e, params.snd_nxt)
        if plan.kind in (REFUSE, RESET_ONLY):
            self._reset(t, plan.reason)
            return
        t.phase = "fetching"
        try:
            await self._fetch(t)
        except (Refused, localhttp.LocalError) as exc:
            self._reset(t, str(exc))
            return
        synack = t.hs.synack
        held = min(synack.held_above, t.plan.bytes_left) if t.plan.kind == RESUME else 0
        sent = b""
        if held > 0:
            try:
                sent = await localhttp.read_exactly(self._loop, t.local, held, self.fetch_timeout)
            except localhttp.LocalError as exc:
                self._reset(t, str(exc))
                return
            t.plan = t.plan._replace(offset=t.plan.offset + held, bytes_left=t.plan.bytes_left - held)
            t.sent_above = held
            self._count("held_above")
        t.phase = "repairing"
        r0 = time.monotonic()
        try:
            # its window probe (TCP_REPAIR off) is B's first frame: it ends the client
            # appliance's network lock, so the repair never waits
            t.sock = self.socket_factory(**params.kwargs(), sent=sent, blocking=False)
        except (OSError, ValueError) as exc:
            self._reset(t, f"repair: {exc}")
            return
        r1 = t.repaired_at = time.monotonic()
        self._count("repaired")
        self._emit(t, "repaired", ms=round((r1 - t.started) * 1000, 3), repair_ms=round((r1 - r0) * 1000, 3),
                   plan=t.plan.kind, held_above=held)
        if self.verify_ack and t.hs.synack.exact:
            # the SYN/ACK is the client's own answer to a probe that nothing followed: asking
            # again would get the same answer, one round trip and a raw socket later
            self._count("verify_skipped")
        elif self.verify_ack:
            t.phase = "verifying"
            if self._verifying is None:
                self._verifying = asyncio.Semaphore(self.verify_slots)
            # At most verify_slots watches at once: each is a raw socket that the kernel hands
            # every TCP segment reaching this host, so a thousand of them would cost a thousand
            # filter runs per segment. The client is asked by old-byte probes, which it answers
            # whenever they come (the kernel's window probe above was for the lock).
            async with self._verifying:
                try:
                    t.watch = AckWatch(e.client_ip, e.client_port, t.hs.local, t.hs.local_port)
                except OSError:
                    t.watch = None
                if t.watch is not None:
                    try:
                        await self._verify(t)
                    except (Refused, localhttp.LocalError) as exc:
                        self._reset(t, str(exc))
                        return
        await self._relay(t)

    async def _check(self, t: _Takeover) -> Optional[str]:
        """Why this replica cannot serve the rest of the connection, or None."""
        e = t.entry
        if e.state != "ACTIVE" or e.object is None:
            return None  # IDLE, PENDING: anything this server answers is new to the client; RESET: nothing to check
        obj = e.object
        ck = (obj.path, obj.host, obj.etag, obj.last_modified, obj.total_length, obj.digest)
        now = time.monotonic()
        hit = self._checks.get(ck)
        t0 = time.monotonic()
        if hit is not None and now - hit[0] < CHECK_CACHE_S:
            self._count("checks_cached")
            why = hit[1]
            cached = True
        else:
            self._count("checks")
            cached = False
            try:
                head, _ = await self._pool.fetch(probe_request(e, self._host()), max_body=16)
                local = self._local_digest(obj.path, head) if self.validators == "digest" else None
                why = check_probe(head, e, self.validators, local)
            except localhttp.LocalError as exc:
                why = str(exc)
            self._checks[ck] = (time.monotonic(), why)
            if len(self._checks) > 4096:
                for k in list(self._checks)[:1024]:
                    del self._checks[k]
        if why is not None:
            self._count("checks_failed")
        self._emit(t, "checked", ok=why is None, reason=why, ms=round((time.monotonic() - t0) * 1000, 3),
                   cached=cached)
        return why

    def _local_digest(self, path: str, head=None) -> Optional[bytes]:
        d = self.digest_of(path) if self.digest_of is not None else None
        if d is None and head is not None:
            from .digests import response_digest
            d = response_digest(head.headers, head.status)
        return d

    def _initial_rto(self) -> float:
        """The configured initial RTO, or twice the recent SYN/ACK time when the client
        appliance answers more slowly than that (a loaded one: retransmissions would only
        add to its queue)."""
        rto = self.timing[0]
        if self._srtt is not None:
            rto = min(max(rto, MAX_INITIAL_RTO), max(rto, 2 * self._srtt))
        return rto

    async def _handshake(self, t: _Takeover) -> RepairParams:
        t.phase = "handshake"
        if self._handshaking is None:
            self._handshaking = asyncio.Semaphore(self.handshake_slots)
        async with self._handshaking:  # a window of handshakes in flight, the rest wait here
            now = time.monotonic()
            t.hs = hs = Handshake(t.entry, self.local_packed, now, t.local_port, self._initial_rto(),
                                  *self.timing[1:], failover=not t.planned)
            t.synack = self._loop.create_future()
            self._by_match[hs.match] = t
            self._hs_timer(t)
            try:
                params = await t.synack
            finally:
                if t.timer is not None:
                    t.timer.cancel()
                    t.timer = None
        t.params = params
        s = hs.synack
        if s.attempts == 1:
            self._srtt = s.rtt if self._srtt is None else 0.875 * self._srtt + 0.125 * s.rtt
        self._count("synacks")
        self._emit(t, "synack", seq=s.seq, ack=s.ack, window=s.window, tsval=s.tsval, tsecr=s.tsecr,
                   rtt_ms=round(s.rtt * 1000, 3), attempts=s.attempts, held_above=s.held_above)
        return params

    def _hs_timer(self, t: _Takeover) -> None:
        """Send what is due, give up when it is time, and sleep until the next deadline."""
        t.timer = None
        if t.synack is None or t.synack.done():
            return
        now = time.monotonic()
        hs = t.hs
        if hs.expired(now):
            t.synack.set_exception(_Failed(hs.reason))
            return
        for packet in hs.datagrams(now):
            ok = self.injector.send(packet)
            self._count("migrate_syns")
            if hs.attempts > 1:
                self._count("retransmissions")
            if not ok:
                self._count("send_errors")
            self._emit(t, "migrate_syn_sent", attempt=hs.attempts, seq=hs.seq, reqno=hs.reqno, sent=bool(ok))
        d = hs.next_deadline()
        if d is not None:
            t.timer = self._loop.call_later(max(0.0, d - time.monotonic()), self._hs_timer, t)

    async def _fetch(self, t: _Takeover) -> None:
        plan, e = t.plan, t.entry
        loop = self._loop
        if t.connecting is not None:
            task, t.connecting = t.connecting, None
            t.local = await task
        else:
            t.local = await localhttp.connect(loop, self.http_addr, self.fetch_timeout)
        if plan.kind == RESUME:
            await localhttp.send_all(loop, t.local, range_request(e, plan.offset, self._host()), self.fetch_timeout)
            head = await localhttp.read_head(loop, t.local, self.fetch_timeout)
            local = self._local_digest(e.object.path, head) if self.validators == "digest" else None
            why = check_range_head(head, e, plan.offset, self.validators, local)
            if why:
                raise Refused(why)
        elif plan.kind == WHOLE:
            await localhttp.send_all(loop, t.local, whole_request(e, self._host()), self.fetch_timeout)

    async def _verify(self, t: _Takeover) -> None:
        """The client's answer to the old-byte probe: the position the SYN/ACK gave, or fixed;
        and B's TSval clock moved up to the client's ts_recent if it was behind."""
        s = t.hs.synack
        lo, hi = self.probe_wait
        wait = min(hi, max(lo, 4 * s.rtt))
        pseq = probe_seq(t.params)
        # With SACK the answer names itself (a D-SACK of the probe's byte); without, the
        # highest ack seen while waiting is taken, so a stale ACK seen first cannot win.
        dsack = bool(t.params.sack)
        seen: list = []
        ans = None
        for attempt in range(1 + self.reprobes):
            if attempt:
                self._count("reprobes")
                self._emit(t, "reprobe", attempt=attempt)
            # not a kernel window probe: the client answers those at most once per 500 ms
            if not self.injector.send(old_byte_probe(t.params, s.tsval or 0, time.monotonic() - t.repaired_at)):
                self._count("send_errors")
            sure = await self._await_answer(t.watch, wait, seen, pseq if dsack else None)
            ans = best_answer(seen, t.params.snd_nxt)
            if sure or (ans is not None and (not dsack or attempt == self.reprobes)):
                if not sure and dsack:
                    self._count("answers_unmarked")  # the client sends no D-SACKs: the best seen
                break
            wait = min(hi, wait * 2)
        self._close_watch(t)
        if ans is None:
            raise Refused(f"the client's position is unknown: no answer to {1 + self.reprobes} window probes")
        self._check_timestamp(t, ans)
        una = t.params.snd_nxt  # B's snd_una: the client's rcv_nxt per the SYN/ACK
        nxt = fp.seq_add(una, t.sent_above)
        behind = fp.seq_diff(una, ans.ack)
        if behind > 0:
            raise Refused(f"the client is {behind} bytes behind its SYN/ACK: resuming would leave a hole")
        top = max([ans.ack] + [r for _, r in ans.sack if fp.seq_gt(r, ans.ack)], key=lambda x: fp.seq_diff(x, nxt))
        gap = fp.seq_diff(top, nxt)
        if gap <= 0:
            return
        plan = t.plan
        if gap > self.max_resync:
            raise Refused(f"the client is {gap} bytes past its SYN/ACK (more than {self.max_resync})")
        if plan.kind != RESUME or gap > plan.bytes_left:
            # bytes of a response this replica knows nothing of: nothing it sends could be right
            raise Refused(f"the client is {gap} bytes past its SYN/ACK, beyond the advertised response")
        data = await localhttp.read_exactly(self._loop, t.local, gap, self.fetch_timeout)
        t.plan = plan._replace(offset=plan.offset + gap, bytes_left=plan.bytes_left - gap)
        repair.mark_sent(t.sock, data)
        t.sent_above += gap
        self._count("resynced")
        self._emit(t, "resynced", stale_ack=una, ack=ans.ack, gap=gap)

    async def _await_answer(self, watch: AckWatch, timeout: float, seen: list, pseq: Optional[int]) -> bool:
        """Collect the client's ACKs into `seen` for up to `timeout`; True as soon as one answers
        the probe at `pseq` (its D-SACK). With pseq None, False after the whole timeout: without
        a D-SACK nothing tells the answer from a stale ACK, so all that came are kept."""
        fut = self._loop.create_future()

        def readable() -> None:
            got = watch.read_all()
            seen.extend(got)
            if pseq is not None and any(answers_probe(a, pseq) for a in got) and not fut.done():
                fut.set_result(True)

        self._loop.add_reader(watch.fileno(), readable)
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            return False
        finally:
            self._loop.remove_reader(watch.fileno())

    def _check_timestamp(self, t: _Takeover, ans) -> None:
        """A client whose ts_recent (its answer's TSecr) is ahead of B's TSval clock would drop
        every segment of B as old (PAWS) until the clock caught up: move the clock."""
        p = t.params
        if not p.timestamps or ans.tsecr is None:
            return
        now_ts = ((p.ts_val or 0) + int((time.monotonic() - t.repaired_at) * 1000)) & fp.MASK32
        if not fp.seq_gt(ans.tsecr, now_ts):
            return
        try:
            ts = repair.set_timestamp(t.sock, (ans.tsecr + 1) & fp.MASK32)
        except OSError as err:
            raise Refused(f"B's TSval clock is behind the client's and cannot be moved: {err}") from err
        self._count("ts_advanced")
        self._emit(t, "ts_advanced", tsval=now_ts, ts_recent=ans.tsecr, to=ts)
        t.params = p._replace(ts_val=ts)
        t.repaired_at = time.monotonic()

    async def _relay(self, t: _Takeover) -> None:
        plan = t.plan
        mode = {RESUME: "resume", ADOPT: "adopt", WHOLE: "whole"}[plan.kind]
        self._count({RESUME: "resumed", ADOPT: "adopted", WHOLE: "whole"}[plan.kind])
        self._emit(t, "resumed", mode=mode, offset=plan.offset, bytes_left=plan.bytes_left)
        t.outcome = RESUMED
        self._count("outcome_resumed")
        self._emit(t, "outcome", outcome=RESUMED, reason=mode)
        t.phase = "relaying"
        t.owned = owned_entry(t.entry, t.hs.local, t.hs.local_port, t.hs.reqno, plan)
        self._call(self.on_owned, t.owned, t.params.rcv_nxt, t.params.snd_nxt)
        mark = plan.bytes_left if plan.kind == RESUME else None

        def progress(total: int) -> None:
            nonlocal mark
            t.to_client = total
            if t.first_byte is None:
                t.first_byte = time.monotonic()
                self._emit(t, "first_byte", ms=round((t.first_byte - t.started) * 1000, 3))
            if mark is not None and total >= mark:
                mark = None
                self._emit(t, "body_sent", bytes=total, seconds=round(time.monotonic() - t.first_byte, 6))

        def upstream(total: int) -> None:
            t.to_local = total

        t.relay = relay = Relay(self._loop, t.sock, t.local, idle_timeout=self.idle_timeout, pipe_size=self.pipe_size,
                                on_client_bytes=progress, on_local_bytes=upstream)
        relay.start()
        self._release_slot(t)
        res = await relay.done
        t.to_client, t.to_local = res.to_client, res.to_local
        if res.end.startswith("stopped") or res.end == "engine closed":
            self._abort_client(t)  # the client must not take it for a clean end
        self._count("bytes_to_client", res.to_client)
        self._count("bytes_from_client", res.to_local)
        self._count("done")
        t.reason = t.reason or res.end
        self._emit(t, "done", bytes=res.to_client, bytes_from_client=res.to_local,
                   seconds=round(time.monotonic() - t.started, 6), end=res.end)
        self._finish(t, "done")

    # -- ending -------------------------------------------------------------------------------------

    def _reset(self, t: _Takeover, reason: str) -> None:
        """Nobody can continue it (or, planned, this replica cannot): a Migrate RST at the
        client's rcv_nxt, P set to reset the client, clear to give the connection back."""
        if t.sock is not None:
            try:
                repair.silent_close(t.sock)
            except OSError:
                t.sock.close()
            t.sock = None
        seq = t.params.snd_nxt if t.params is not None else t.entry.body_start
        packet = migrate_rst(t.hs, seq, preload=not t.planned)
        for _ in range(2):  # a lost one would leave the client waiting for the lock timeout
            if not self.injector.send(packet):
                self._count("send_errors")
        self._count("resets_sent")
        self._count("refused")
        self._emit(t, "refused", reason=reason, planned=t.planned)
        self._end(t, RESET_OUTCOME if not t.planned else FAILED, reason, phase="refused")

    def _abort_client(self, t: _Takeover) -> None:
        """The relay was stopped under the client: reset it (Migrate RST at B's snd_nxt)."""
        if t.sock is None or t.hs is None or t.hs.synack is None:
            return
        try:
            seq = repair.read_state(t.sock).snd_nxt
            t.sock.close()
        except OSError:
            seq = t.params.snd_nxt
        t.sock = None
        self.injector.send(migrate_rst(t.hs, seq, preload=True))

    def _end(self, t: _Takeover, outcome: str, reason: str, phase: Optional[str] = None) -> None:
        """The takeover is over: its outcome (the first one given sticks) and the reason."""
        if t.outcome is None:
            t.outcome = outcome
            self._count(f"outcome_{outcome}")
            self._emit(t, "outcome", outcome=outcome, reason=reason)
        t.reason = t.reason or reason
        if outcome == FAILED and phase is None:
            self._count("failed")
            self._emit(t, "failed", reason=reason)
        self._finish(t, phase or outcome)

    def _finish(self, t: _Takeover, phase: str) -> None:
        t.phase = phase
        t.ended = time.monotonic()
        if t.outcome in (FAILED, PASSED) and t.hs is not None and t.hs.attempts and t.hs.synack is None:
            self._ended[t.hs.match] = (t.hs, t.ended)  # a SYN/ACK may still come: _answer_late
            self._ended.move_to_end(t.hs.match)
            while len(self._ended) > LATE_ANSWER_MAX:
                self._ended.popitem(last=False)
        if self._active.get(t.key) is t:
            del self._active[t.key]
            self._finished.append(t)
        if t.hs is not None and self._by_match.get(t.hs.match) is t:
            del self._by_match[t.hs.match]
        match = (t.entry.client_ip, t.entry.client_port, self.local_packed, t.local_port)
        if self._by_client.get(match) is t:
            del self._by_client[match]

    def _close_watch(self, t: _Takeover) -> None:
        w, t.watch = t.watch, None
        if w is not None:
            w.close()

    def _cleanup(self, t: _Takeover) -> None:
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None
        self._close_watch(t)
        if t.connecting is not None:
            task, t.connecting = t.connecting, None
            if not task.done():
                task.add_done_callback(_close_connected)
                task.cancel()
            else:
                _close_connected(task)
        if t.relay is not None and t.relay.result is None:
            t.relay.stop("engine closed")
        if t.owned is not None:
            owned, t.owned = t.owned, None
            self._call(self.on_released, owned)
        for name in ("sock", "local"):
            s = getattr(t, name)
            if s is not None:
                setattr(t, name, None)
                try:
                    s.close()
                except OSError:
                    pass
        if self._active.get(t.key) is t:
            self._finish(t, t.phase if t.outcome else "failed")

    def abort(self, key, reason: str = "aborted") -> bool:
        """Stop a takeover: a handshake is abandoned; a relay is stopped and the client reset."""
        t = self._active.get(key)
        if t is None:
            return False
        t.reason = reason
        if t.relay is not None and t.relay.result is None:
            t.relay.stop("stopped")
        elif t.task is not None:
            t.task.cancel()
        else:  # still queued: skipped when its turn comes
            self._queue = [q for q in self._queue if q[2] is not t]
            heapq.heapify(self._queue)
            self._end(t, FAILED, reason)
        return True

    def _host(self) -> str:
        return self.http_addr[0] if ":" not in self.http_addr[0] else f"[{self.http_addr[0]}]"

    # -- status -------------------------------------------------------------------------------------

    def active_phase(self, key) -> Optional[str]:
        """The phase of a takeover in progress (queued, checking, handshake, ...), or None."""
        t = self._active.get(key)
        return t.phase if t is not None else None

    def active(self) -> List[tuple]:
        """Keys (client_ip, client_port, server_ip, server_port) of takeovers in progress or queued."""
        return list(self._active)

    def owned_entries(self) -> list:
        """The entries of connections this replica now serves through a relay."""
        return [t.owned for t in self._active.values() if t.owned is not None]

    def counters(self) -> dict:
        c = dict(self._counters)
        c["active"] = len(self._active)
        c["running"] = self._running
        c["relaying"] = sum(1 for t in self._active.values() if t.relay is not None)
        c["waiting"] = len(self._queue)
        return c

    def snapshot(self) -> dict:
        """For the status file: counters, takeovers in progress and the latest finished ones."""
        now = time.monotonic()
        return {"counters": self.counters(), "local_ip": self.local_ip, "service_ports": self.service_ports,
                "http": f"{self.http_addr[0]}:{self.http_addr[1]}", "validators": self.validators,
                "pool": self._pool.counters() if self._pool is not None else None,
                "active": [t.row(now) for t in list(self._active.values())],
                "finished": [t.row(now) for t in list(self._finished)]}

    async def aclose(self, timeout: float = 2.0) -> None:
        """Stop everything: pending takeovers abandoned, relays stopped (their clients reset)."""
        self._closed = True
        tasks = []
        for t in list(self._active.values()):
            if t.task is not None and not t.task.done():
                t.reason = t.reason or "engine closed"
                if t.relay is not None and t.relay.result is None:
                    t.relay.stop("engine closed")
                else:
                    t.task.cancel()
                tasks.append(t.task)
            elif t.task is None:
                self._end(t, FAILED, "engine closed")
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self.close()

    def close(self) -> None:
        """Release the raw sockets and the pool (after aclose(), or when the loop is gone)."""
        self._closed = True
        self.detach()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
        close = getattr(self.injector, "close", None)
        if close is not None:
            close()
