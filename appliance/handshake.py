"""The taker's side of the Migrate handshake, sans-I/O: the Migrate SYN and its
retransmissions, the SYN/ACK that answers it, the repair parameters it gives, where to
resume, and the Migrate RST that ends a takeover on purpose.

1. **Migrate SYN.** From this replica's address and the service port to the client, a SYN
   carrying only the Migrate option (P=1, ReqNo = entry.reqno + 1, Token and Request from
   Ni, Na, K = 0 and S = entry.body_start), its window field saying why (FAILOVER: the
   sender believes the connection's server has failed, so the client appliance first checks
   that the server is silent; 0: a planned migration), retransmitted with exponential backoff (200 ms,
   doubling) until the answer comes, given up after 8 s (long enough to ride out a restart
   of the client appliance).
2. **SYN/ACK.** The client appliance answers for the client: seq = the client's acknowledged
   byte (B's rcv_nxt), ack = the client's rcv_nxt (B's snd_nxt), window = the client's window
   field, TSval/TSecr = the client's last TSval and the last TSval it accepted, and SACK
   blocks for what the client holds above a hole. A RST instead means the Migrate SYN was
   refused (stale, redundant or invalid).
3. **Where to resume** (`plan_resume`): never ahead of the client.
4. **Migrate RST** (`migrate_rst`): a RST carrying the Migrate option of this handshake
   (Request computed over the RST's own sequence number), so the client appliance knows it is
   deliberate: with P set, nobody can continue the connection and the client is reset at
   once; without P, the migration is abandoned and the connection stays with its previous
   server (a planned migration whose taker cannot serve it).
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import _fastpath as fp

from . import repair

MASK32 = 0xFFFFFFFF
INITIAL_RTO = 0.2
BACKOFF = 2.0
GIVE_UP = 8.0  # long enough to ride out a restart of the client appliance

FAILOVER = 1  # the Migrate SYN's window: a takeover from a server believed dead (0: planned)
# In the SYN/ACK's urgent pointer (URG clear: no TCP stack reads it), from the client
# appliance (appliance.shim): the position is its client's answer to a probe of a failover
# whose server was found silent, so nothing reached the client after it: exact.
SYNACK_EXACT = 1

SENT, ANSWERED, RESET, EXPIRED = "sent", "answered", "reset", "expired"
RESUME, ADOPT, WHOLE, REFUSE, RESET_ONLY = "resume", "adopt", "whole", "refuse", "reset"

__all__ = ["SynAck", "RepairParams", "Handshake", "repair_params", "Plan", "plan_resume", "migrate_rst", "FAILOVER",
           "SENT", "ANSWERED", "RESET", "EXPIRED", "RESUME", "ADOPT", "WHOLE", "REFUSE", "RESET_ONLY"]


def _text(packed: bytes) -> str:
    return fp.address_text(packed)


class SynAck(NamedTuple):
    """The client appliance's SYN/ACK as received."""

    seq: int  # the client's acknowledged byte: B's rcv_nxt
    ack: int  # the client's rcv_nxt: B's snd_nxt
    window: int  # the client's last window field (unscaled)
    tsval: Optional[int]
    tsecr: Optional[int]  # the last TSval the client accepted from the old server
    rtt: float  # seconds since the latest Migrate SYN was sent
    elapsed: float  # seconds since the first one
    attempts: int
    sack: tuple = ()  # blocks (left, right) the client holds above a hole
    exact: bool = False  # the client's own answer to a probe nothing followed (SYNACK_EXACT)

    @property
    def held_above(self) -> int:
        """Bytes from ack to the right edge of the highest SACK block (0 without a hole)."""
        return max((fp.seq_diff(r, self.ack) for _, r in self.sack if fp.seq_gt(r, self.ack)), default=0)


class RepairParams(NamedTuple):
    """The arguments of appliance.repair.repaired_socket() for one takeover."""

    local: Tuple[str, int]
    remote: Tuple[str, int]
    rcv_nxt: int
    snd_nxt: int
    mss: int
    snd_wscale: Optional[int]
    rcv_wscale: Optional[int]
    sack: bool
    timestamps: bool
    ts_val: Optional[int]
    snd_wnd: int
    rcv_wnd: int

    def kwargs(self) -> dict:
        return self._asdict()


class Handshake:
    """One connection's Migrate handshake. Sans-I/O: `now` is passed in, bytes come out.

    entry: the advertised sync.Entry of the connection (the client's address and port, Ni,
    Na, options, reqno). local_ip: this replica's address (text or packed); local_port: B's
    service port (default: the entry's server port).
    """

    def __init__(self, entry, local_ip, now: float, local_port: Optional[int] = None,
                 initial_rto: float = INITIAL_RTO, backoff: float = BACKOFF, give_up: float = GIVE_UP,
                 build_migrate_syn: Callable = None, failover: bool = True) -> None:
        if initial_rto <= 0 or backoff < 1 or give_up <= 0:
            raise ValueError("initial_rto and give_up must be positive, backoff at least 1")
        self.entry = entry
        self.local = fp.pack_address(local_ip)
        if len(self.local) != len(entry.client_ip):
            raise ValueError("the local address and the client's are of different families")
        self.local_port = entry.server_port if local_port is None else local_port
        self.seq = entry.body_start & MASK32  # S: any value works; it is an input of Request
        self.reqno = fp.reqno_next(entry.reqno)
        self.token = fp.migrate_token(entry.ni, entry.na)
        self.request = fp.migrate_request(entry.ni, entry.na, b"", self.seq, self.reqno)
        build = build_migrate_syn or fp.build_migrate_syn
        self.failover = failover
        self.packet = build(self.local, entry.client_ip, self.local_port, entry.client_port, seq=self.seq,
                            reqno=self.reqno, token=self.token, request=self.request, preload=True,
                            window=FAILOVER if failover else 0)
        self.initial_rto, self.backoff, self.give_up = initial_rto, backoff, give_up
        self.started = now
        self.state = SENT
        self.reason = ""
        self.attempts = 0
        self.sent_at: List[float] = []
        self._next_due = now
        self._rto = initial_rto
        self.synack: Optional[SynAck] = None
        self.server_alive = False

    @property
    def match(self) -> tuple:
        """(src, sport, dst, dport) of the answer: the Migrate SYN's 4-tuple reversed."""
        return (self.entry.client_ip, self.entry.client_port, self.local, self.local_port)

    def datagrams(self, now: float) -> List[bytes]:
        """The Migrate SYN if one is due at `now` (the first at once, then after 200 ms,
        400 ms, ... while the give-up time has not come), else []."""
        if self.state != SENT or now < self._next_due or now >= self.started + self.give_up:
            return []
        self.attempts += 1
        self.sent_at.append(now)
        self._next_due = now + self._rto
        self._rto *= self.backoff
        return [self.packet]

    def next_deadline(self) -> Optional[float]:
        """When datagrams() or expired() next has something to do; None once settled."""
        if self.state != SENT:
            return None
        return min(self._next_due, self.started + self.give_up)

    def expired(self, now: float) -> bool:
        """True (and state EXPIRED) once give_up seconds passed without an answer."""
        if self.state == SENT and now >= self.started + self.give_up:
            self.state = EXPIRED
            self.reason = f"no SYN/ACK within {self.give_up:g} s ({self.attempts} Migrate SYNs sent)"
        return self.state == EXPIRED

    def on_synack(self, view, now: float) -> Optional[RepairParams]:
        """The repair parameters if `view` (a parsed IP packet) answers our Migrate SYN.

        None if it is not ours (another 4-tuple, not SYN+ACK, or we are not waiting). A RST
        from the client for our 4-tuple while waiting sets state RESET (the client appliance
        refused the Migrate SYN) and also returns None."""
        if self.state != SENT or not view.is_tcp:
            return None
        if (view.src, view.sport, view.dst, view.dport) != self.match:
            return None
        flags = view.flags
        if flags & fp.RST:
            self.state = RESET
            e = self.entry
            if view.opts & fp.HAS_MIGRATE and not view.migrate_preload and view.migrate_reqno == self.reqno \
                    and view.migrate_request == fp.migrate_request(e.ni, e.na, b"", view.seq, self.reqno):
                self.server_alive = True  # the client appliance still hears the server
                self.reason = "the client appliance still hears the server: it is alive"
            else:
                self.reason = "the client appliance refused the Migrate SYN (stale, redundant or invalid)"
            return None
        if flags & (fp.SYN | fp.ACK) != fp.SYN | fp.ACK:
            return None
        last = self.sent_at[-1] if self.sent_at else self.started
        has_ts = bool(view.opts & fp.HAS_TIMESTAMPS)
        sack = tuple(view.sack_blocks) if view.opts & fp.HAS_SACK else ()
        self.synack = SynAck(view.seq, view.ack, view.window, view.tsval if has_ts else None,
                             view.tsecr if has_ts else None, now - last, now - self.started, self.attempts, sack,
                             bool(view.urgent & SYNACK_EXACT) and not view.flags & fp.URG)
        self.state = ANSWERED
        return repair_params(self.entry, self.local, self.local_port, self.synack)


def repair_params(entry, local: bytes, local_port: int, synack: SynAck) -> RepairParams:
    """What repaired_socket() needs, from the advertised entry and the SYN/ACK."""
    e = entry
    wscale = e.c_wscale >= 0 and e.s_wscale >= 0
    snd_ws = e.c_wscale if wscale else None
    rcv_ws = e.s_wscale if wscale else None
    ts = e.c_ts and e.s_ts and synack.tsecr is not None
    ts_val = repair.even_timestamp(synack.tsecr + 1) if ts else None
    snd_wnd = min(synack.window << (snd_ws or 0), repair.MAX_WINDOW)
    rcv_wnd = min(65535 << (rcv_ws or 0), repair.MAX_WINDOW)
    return RepairParams((_text(local), local_port), (_text(e.client_ip), e.client_port), synack.seq, synack.ack,
                        e.c_mss or repair.DEFAULT_MSS, snd_ws, rcv_ws, bool(e.c_sack and e.s_sack), ts, ts_val,
                        snd_wnd, rcv_wnd)


def migrate_rst(hs: Handshake, seq: int, preload: bool = True) -> bytes:
    """The Migrate RST of a handshake at `seq` (the client's rcv_nxt): P=1 reset the client,
    P=0 abandon the migration."""
    e = hs.entry
    request = fp.migrate_request(e.ni, e.na, b"", seq & MASK32, hs.reqno)
    opt = fp.aligned_option(fp.opt_migrate(preload, hs.reqno, hs.token, request))
    return fp.build_tcp(hs.local, e.client_ip, hs.local_port, e.client_port, seq & MASK32, 0, fp.RST, 0, opt)


PROBE_BEHIND = 1 << 30  # an old byte's offset behind the peer's window: surely outside it


def old_byte_probe(params: RepairParams, tsecr: int = 0, elapsed: float = 0.0) -> bytes:
    """One byte from B to the client far behind the client's window: its kernel answers at
    once with a duplicate ACK carrying its exact rcv_nxt and SACK blocks. A kernel window
    probe (TCP_REPAIR off) is a pure ACK, and out-of-window pure ACKs are answered at most
    once per tcp_invalid_ratelimit (500 ms) per socket; data segments never are limited.
    `elapsed`: seconds since the repair, so that the TSval follows B's 1 kHz clock."""
    (lip, lport), (rip, rport) = params.local, params.remote
    opts = b""
    if params.timestamps:
        tsval = (params.ts_val or 0) + int(elapsed * 1000)
        opts = b"\x01\x01" + fp.opt_timestamps(tsval & MASK32, tsecr & MASK32)
    window = min(0xFFFF, params.rcv_wnd >> (params.rcv_wscale or 0))
    return fp.build_tcp(lip, rip, lport, rport, (params.snd_nxt - PROBE_BEHIND) & MASK32, params.rcv_nxt & MASK32,
                        fp.ACK, window, opts, b"\0")


def probe_seq(params: RepairParams) -> int:
    """The sequence number of old_byte_probe's byte."""
    return (params.snd_nxt - PROBE_BEHIND) & MASK32


def answers_probe(ack, seq: int) -> bool:
    """Whether a client ACK is its kernel's answer to the old-byte probe at `seq`: the answer
    to a duplicate segment carries a D-SACK of it (RFC 2883; Linux's tcp_send_dupack), which
    no ACK the client sent before the probe can carry. ACKs still queued at the client
    appliance when the connection moved arrive first, and say a stale rcv_nxt."""
    return any(left == seq for left, _ in ack.sack)


def best_answer(acks, una: int):
    """Of the client's ACKs since the probe, the one saying the most: the highest ack
    (measured from `una`, mod 2**32; a client's rcv_nxt only grows), the latest of equals."""
    best = None
    for a in acks:
        if best is None or fp.seq_diff(a.ack, una) >= fp.seq_diff(best.ack, una):
            best = a
    return best


# --- Where to resume ------------------------------------------------------------------------------


class Plan(NamedTuple):
    kind: str  # RESUME, ADOPT, WHOLE, REFUSE or RESET_ONLY
    offset: Optional[int] = None  # object offset of the next byte the client wants (RESUME, WHOLE)
    bytes_left: int = 0  # body bytes still to send (RESUME: to the end of A's response)
    reason: str = ""  # REFUSE, RESET_ONLY: why


def plan_resume(entry, ack: int) -> Plan:
    """What to do, given the SYN/ACK's ack (the client's rcv_nxt).

    Positions are measured modulo 2**32, so the wrap is harmless:
    * RESET entry -> RESET_ONLY (nobody can continue it: the client is reset).
    * IDLE entry -> ADOPT (relay only).
    * PENDING entry: ack == where its response begins -> WHOLE (re-issue the request);
      otherwise REFUSE (the client has bytes of a response nobody advertised).
    * ACTIVE: ack == Na + 1 (the first response had not begun) -> WHOLE; ack before
      body_start otherwise -> REFUSE "inside the response head"; received = (ack -
      body_start) mod 2**32 < body_length -> RESUME at body_offset + received; received ==
      body_length (the response is complete) -> ADOPT; more -> REFUSE (the client has bytes
      of a response nobody advertised).
    """
    if entry.state == "RESET":
        return Plan(RESET_ONLY, reason=entry.reason or "not resumable")
    if entry.state == "IDLE":
        return Plan(ADOPT)
    if entry.state == "PENDING":
        if ack & MASK32 == entry.body_start & MASK32:
            return Plan(WHOLE, 0, 0)
        return Plan(REFUSE, reason=f"the client has {fp.seq_diff(ack, entry.body_start)} bytes of a response "
                                   "that was never advertised")
    first = (entry.na + 1) & MASK32
    if ack & MASK32 == first:
        return Plan(WHOLE, entry.body_offset, entry.body_length)
    pos = (ack - first) & MASK32
    body = (entry.body_start - first) & MASK32
    if pos < body:
        return Plan(REFUSE, reason=f"inside the response head ({body - pos} bytes before the body)")
    received = (ack - entry.body_start) & MASK32
    if received < entry.body_length:
        return Plan(RESUME, entry.body_offset + received, entry.body_length - received)
    if received == entry.body_length:
        return Plan(ADOPT)
    # bytes of a response nobody advertised (it began in the moment before the crash, or
    # the tap missed it): nothing this replica sends could be right
    return Plan(REFUSE, reason=f"the client has {received - entry.body_length} bytes past the advertised response")
