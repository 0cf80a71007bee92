"""TCP_REPAIR: a socket that continues, at the exact next byte, a TCP connection another host began.

`repaired_socket()` builds a connected, ESTABLISHED socket from the client's view of a
connection (sequence numbers, window scales, MSS, SACK, timestamp clock) without sending a
SYN, following the recipe measured in notes/tcp-repair.md ("The recipe that worked"), in
this order:

    socket()  TCP_REPAIR=1
              TCP_REPAIR_QUEUE=RECV, TCP_QUEUE_SEQ=rcv_nxt    (the client's acknowledged byte)
              TCP_REPAIR_QUEUE=SEND, TCP_QUEUE_SEQ=snd_nxt    (the client's rcv_nxt)
              TCP_REPAIR_QUEUE=NONE
              bind(local)          no SO_REUSEADDR after TCP_REPAIR: it would undo the forced
                                   reuse repair mode sets, and bind would fail with EADDRINUSE
              TCP_MAXSEG=mss       before connect, else the first segments use MSS 524
              connect(remote)      sends nothing; the socket is ESTABLISHED
              TCP_REPAIR_OPTIONS   MSS, WINDOW (snd_wscale | rcv_wscale << 16), SACK_PERM, TIMESTAMP
              TCP_REPAIR_WINDOW    snd_wl1=rcv_nxt, snd_wnd=max_window, rcv_wnd, rcv_wup=rcv_nxt
              TCP_TIMESTAMP=ts     always even: since Linux 6.7 the low bit selects usec stamps
              TCP_REPAIR=0         emits one window probe (ACK seq=snd_nxt-1); -1 would emit none

Nothing here can be sans-I/O; it is kept small, and every failure is a `RepairError` naming
the step and, for the usual causes, what to do: EPERM (no CAP_NET_ADMIN in the socket's
network namespace), EADDRNOTAVAIL at connect (the 4-tuple is taken: the old server's socket
still exists in this namespace, or a repaired socket for it already does), EADDRNOTAVAIL at
bind (the local address is not on this host).

`mark_sent()` appends bytes the peer already has to the send queue as sent: the fix when
snd_nxt turned out behind the peer's rcv_nxt (a stale SYN/ACK ack), which otherwise stalls
the connection for good (notes, pitfall 6).

`silent_close()` and `read_state()` are the other half of the notes' experiment: close a
live socket without a FIN or RST, and read a live socket's sequence state (both in repair
mode; used by the tests, and useful for planned migration from a cooperating host).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
from typing import NamedTuple, Optional, Tuple

# linux/tcp.h
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8
TCP_MAX_WSCALE = 14
MAX_WINDOW = 1 << 30  # the largest window a scaled 16-bit field can say (65535 << 14)
DEFAULT_MSS = 536  # RFC 879: what a peer that sent no MSS option accepts
MASK32 = 0xFFFFFFFF

__all__ = ["RepairError", "repaired_socket", "even_timestamp", "mark_sent", "window_probe", "silent_close",
           "read_state", "SocketState"]


class RepairError(OSError):
    """A step of the repair failed: `.step` names it, `.errno` is the kernel's answer."""

    def __init__(self, err: int, message: str, step: str) -> None:
        super().__init__(err, message)
        self.step = step


def even_timestamp(value: int) -> int:
    """The smallest even 32-bit value >= value (mod 2**32), for TCP_TIMESTAMP.

    Since Linux 6.7 the low bit of TCP_TIMESTAMP selects microsecond timestamps: an odd
    value would make the socket's TSval run 1000 times faster than the client expects."""
    return ((value + 1) & ~1) & MASK32


def _u32(value: int, name: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= MASK32:
        raise ValueError(f"{name} must be an unsigned 32-bit integer, not {value!r}")
    return value


def _family(host: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def _sockaddr(addr: Tuple[str, int], family: int) -> tuple:
    host, port = addr[0], int(addr[1])
    return (host, port) if family == socket.AF_INET else (host, port, 0, 0)


def _explain(step: str, exc: OSError, local, remote) -> RepairError:
    e = exc.errno or 0
    where = f"{local[0]}:{local[1]} <-> {remote[0]}:{remote[1]}"
    if e == errno.EPERM and step in ("TCP_REPAIR=1", "socket"):
        msg = "TCP_REPAIR needs CAP_NET_ADMIN in the socket's network namespace (run the appliance as root)"
    elif e == errno.EADDRNOTAVAIL and step == "connect":
        msg = (f"the 4-tuple {where} is taken in this network namespace: the old server's socket still "
               f"exists here, or a repaired socket for this connection already does")
    elif e == errno.EADDRNOTAVAIL and step == "bind":
        msg = f"{local[0]} is not an address of this host (bind for {where})"
    elif e == errno.EADDRINUSE and step == "bind":
        msg = f"{local[0]}:{local[1]} cannot be bound in repair mode (was SO_REUSEADDR set after TCP_REPAIR?)"
    elif e == errno.EINVAL and step == "TCP_REPAIR_WINDOW":
        msg = f"the kernel refused the window values for {where} (snd_wnd > max_window, or rcv_wnd too small)"
    else:
        msg = f"{step} failed for {where}: {exc.strerror or exc}"
    return RepairError(e, msg, step)


def repaired_socket(local: Tuple[str, int], remote: Tuple[str, int], rcv_nxt: int, snd_nxt: int, mss: int,
                    snd_wscale: Optional[int], rcv_wscale: Optional[int], sack: bool, timestamps: bool,
                    ts_val: Optional[int], snd_wnd: int, rcv_wnd: int, *, window_probe: bool = True,
                    blocking: bool = True, sent: bytes = b"") -> socket.socket:
    """A connected TCP socket that continues a connection in the peer's exact view.

    local: (address, port) this socket takes, e.g. the takeover server's own address and the
        service port (a listener on that port does not get in the way).
    remote: (address, port) of the client.
    rcv_nxt: the next byte expected from the client (what the old server last acknowledged).
    snd_nxt: the next byte to send (the client's rcv_nxt: never ahead of it).
    mss: the client's MSS (its SYN's option; DEFAULT_MSS when it sent none).
    snd_wscale: the shift applied to the client's window field (the client SYN's wscale);
    rcv_wscale: the shift the client applies to ours (the old server's SYN/ACK wscale);
        None (or -1) for either: window scaling was not negotiated (no TCPOPT_WINDOW).
    sack: both SYNs offered SACK. timestamps: both SYNs offered timestamps.
    ts_val: the timestamp clock to continue from (the last TSval the client accepted, + 1):
        rounded up to even (see even_timestamp); ignored without timestamps.
    snd_wnd: the client's window in bytes (already scaled); also max_window.
    rcv_wnd: the window in bytes the client believes we offer (already scaled).
    window_probe: TCP_REPAIR=0 (one window probe, which also makes the client report its
        exact rcv_nxt and window) or False for TCP_REPAIR=-1 (nothing sent).
    blocking: False returns the socket non-blocking.
    sent: bytes the client already holds above a hole, from snd_nxt on: queued as sent before
        repair mode ends (snd_nxt moves past them), so that the client's jump in ack once the
        hole is filled is an ack of sent data, not of unsent data (which Linux discards).

    Raises RepairError (an OSError) naming the step; ValueError for out-of-range values.
    """
    _u32(rcv_nxt, "rcv_nxt")
    _u32(snd_nxt, "snd_nxt")
    _u32(snd_wnd, "snd_wnd")
    _u32(rcv_wnd, "rcv_wnd")
    if not isinstance(mss, int) or not 0 <= mss <= 65535:
        raise ValueError(f"mss must be 0..65535, not {mss!r}")
    mss = mss or DEFAULT_MSS
    wscale = snd_wscale is not None and rcv_wscale is not None and snd_wscale >= 0 and rcv_wscale >= 0
    if wscale and (snd_wscale > TCP_MAX_WSCALE or rcv_wscale > TCP_MAX_WSCALE):
        raise ValueError(f"window scales are at most {TCP_MAX_WSCALE}, not {snd_wscale}/{rcv_wscale}")
    if timestamps:
        if ts_val is None:
            raise ValueError("timestamps need ts_val (the last TSval the client accepted + 1)")
        ts = even_timestamp(_u32(ts_val, "ts_val"))
    family = _family(local[0])
    if _family(remote[0]) != family:
        raise ValueError(f"local {local[0]} and remote {remote[0]} are of different address families")

    step = "socket"
    sock = None
    try:
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        step = "TCP_REPAIR=1"
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        step = "TCP_QUEUE_SEQ"
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("I", rcv_nxt))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, struct.pack("I", snd_nxt))
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        step = "bind"
        sock.bind(_sockaddr(local, family))
        step = "TCP_MAXSEG"
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        step = "connect"
        sock.connect(_sockaddr(remote, family))
        step = "TCP_REPAIR_OPTIONS"
        opts = [TCPOPT_MSS, mss]
        if wscale:
            opts += [TCPOPT_WINDOW, snd_wscale | (rcv_wscale << 16)]
        if sack:
            opts += [TCPOPT_SACK_PERM, 0]
        if timestamps:
            opts += [TCPOPT_TIMESTAMP, 0]
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS, struct.pack(f"{len(opts)}I", *opts))
        step = "TCP_REPAIR_WINDOW"
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                        struct.pack("5I", rcv_nxt, snd_wnd, snd_wnd, rcv_wnd, rcv_nxt))
        if timestamps:
            step = "TCP_TIMESTAMP"
            sock.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, struct.pack("I", ts))
        if sent:
            step = "queue sent data"
            _queue_sent(sock, sent)
        step = "TCP_REPAIR=0"
        sock.setblocking(blocking)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF if window_probe else TCP_REPAIR_OFF_NO_WP)
    except OSError as exc:
        if sock is not None:
            sock.close()  # still in repair mode (or never in it): closes without a segment
        if isinstance(exc, RepairError):
            raise
        raise _explain(step, exc, local, remote) from None
    return sock


def _queue_sent(sock: socket.socket, data: bytes) -> None:
    """In repair mode: append data to the send queue as sent (never transmitted as new)."""
    need = 2 * len(data) + (256 << 10)
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < need:
            sock.setsockopt(socket.SOL_SOCKET, 32, need)  # SO_SNDBUFFORCE
    except OSError:
        pass
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    timeout = sock.gettimeout()
    sock.settimeout(2.0)
    try:
        sock.sendall(data)
    finally:
        sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)


def window_probe(sock: socket.socket) -> None:
    """Send one more window probe (repair on, then off): the client answers it with its
    exact rcv_nxt, window and SACK blocks."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF)


def mark_sent(sock: socket.socket, data: bytes, window_probe: bool = True) -> None:
    """Append `data` to a connected socket's send queue as already sent (not transmitted).

    For a socket whose snd_nxt turned out to be behind the peer's rcv_nxt: the peer has
    these bytes, so B only has to count them as sent (repair mode, SEND queue: the kernel
    moves them to the retransmit queue without transmitting), after which the peer's ACKs
    are no longer "ACKs of unsent data". They must be the right bytes: they are
    retransmitted if the peer does not acknowledge them. Leaves repair mode with a window
    probe (which makes the peer acknowledge them at once) unless window_probe is False."""
    if not data:
        return
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    try:
        _queue_sent(sock, data)
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF if window_probe else TCP_REPAIR_OFF_NO_WP)


def set_timestamp(sock: socket.socket, tsval: int) -> int:
    """Move a connected socket's TSval clock to `tsval` (made even), in and out of repair mode
    without a window probe; returns the value set. For a clock that turned out to be behind
    the client's ts_recent: the client's PAWS check would drop every segment until it caught
    up."""
    ts = even_timestamp(_u32(tsval, "tsval"))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, struct.pack("I", ts))
    finally:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    return ts


def silent_close(sock: socket.socket) -> None:
    """Close a live TCP socket without a FIN or a RST (TCP_REPAIR=1, then close).

    What a crashed server looks like from the wire; needs CAP_NET_ADMIN. Note that repair
    mode is not a freeze: queued data may still leave until the close (notes, pitfall 6)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    sock.close()


class SocketState(NamedTuple):
    snd_nxt: int  # write_seq: the next byte the socket would queue
    rcv_nxt: int
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    tsval: int  # the socket's current TSval clock (TCP_TIMESTAMP)


def read_state(sock: socket.socket, leave_in_repair: bool = True) -> SocketState:
    """A live socket's sequence, window and timestamp state, read in repair mode.

    The socket is put in repair mode (TCP_REPAIR=1) and left there unless leave_in_repair
    is False, in which case repair is turned off without a window probe."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_ON)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        snd = struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        rcv = struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0]
        sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        win = struct.unpack("5I", sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW, 20))
        ts = struct.unpack("I", sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, 4))[0]
    finally:
        if not leave_in_repair:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
    return SocketState(snd, rcv, *win, ts)
