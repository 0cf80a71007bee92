"""The kernel's own view of TCP sockets, and SOCK_DESTROY, over sock_diag netlink (stdlib only).

What it is for
--------------
The server appliance runs beside a replica's HTTP server and needs the kernel's truth about
that server's TCP connections: after a restart, to check the persisted stream map against
reality (bytes received from the client, bytes sent and acked), and at a takeover, the
connection's RTT, RTT variance and congestion window to hand to the replica that takes it
over. When another replica has taken a connection over (a partition that healed), the old
socket on this host must go at once, not after minutes of retransmissions: `destroy()`.
On a client host the same calls read the client's sockets (bytes received = its position).

API: `tcp_sockets()` (a dump), `find()` (one socket by its exact 4-tuple), `destroy()`
(SOCK_DESTROY of one 4-tuple), `TcpSocket` (one socket), `SockDiagError` (an OSError).

What it guarantees
------------------
* Bounded: every call opens its own NETLINK_SOCK_DIAG socket, sends one request per address
  family and reads the answer against a deadline (`timeout`, default 5 s, enforced per
  receive with a socket timeout, so a silent kernel can never hang the caller) and a count
  bound (`max_sockets`). Every message is checked: its length (a message running past the
  datagram is an error), its sequence number (stale answers are skipped), NLMSG_ERROR
  (mapped to a result or to `SockDiagError` with errno), NLMSG_DONE (its error code is
  checked too) and truncation (datagrams are read with MSG_TRUNC; one bigger than the
  buffer raises instead of being parsed short). Nothing is cached between calls.
* Calls block the calling thread, but only up to `timeout`. Measured on the development
  machine (2 cores, kernel 6.18, Python 3.11), 5,000 established loopback connections, so
  10,000 ESTABLISHED sockets: a full dump with tcp_info 55-60 ms (34-36 ms with info=False),
  a dump filtered to one side by local_port (5,000 sockets) 27-36 ms (18-21 ms), one `find()`
  about 40 us. About 6 us per socket returned, most of it parsing in Python: an event loop
  may call `find()`/`destroy()` inline and should run dumps of many sockets in an executor.
* Network namespaces: a netlink socket belongs to the namespace its creator was in when it
  was created, and this module creates one per call in the calling thread, so every call
  sees the namespace of the calling thread at that moment (`ip netns exec`, or `setns()`
  in that thread).
* `find()` and `destroy()` are exact. The kernel's by-id lookup (inet_lookup) falls back to
  a *listening* socket when no connection has the 4-tuple, so `find()` checks the answer
  against the tuple it asked for (a listener is not returned), and `destroy()` first finds
  the connection and then destroys it by 4-tuple *and* socket cookie: the kernel refuses
  (ESTALE) to destroy any other socket, so a listener, or a new connection that reused the
  tuple in between, is never killed.

Filtering (`tcp_sockets`)
-------------------------
States are filtered in the kernel (the idiag_states mask of inet_diag_req_v2). `local_port`
and `remote` are filtered in the kernel by an INET_DIAG_REQ_BYTECODE program
(INET_DIAG_BC_S_EQ for the local port, INET_DIAG_BC_D_COND with address and port for
the remote end, INET_DIAG_BC_D_EQ for a remote port alone), so a filtered dump costs in
proportion to what matches; every answer is then re-checked in Python against the same
filter, so a kernel that ignored the program could only cost time, never give a wrong list.

Addresses
---------
`local` and `remote` are (ip text, port). An IPv6 socket talking IPv4 (a dual-stack
listener's v4-mapped connection) is reported with family AF_INET6 but with plain dotted IPv4
text (``"192.0.2.1"``, not ``"::ffff:192.0.2.1"``), so one connection has one spelling; input
addresses are normalized the same way, and `find(("192.0.2.1", 80), ...)` finds that socket
(the kernel's IPv4 lookup sees v4-mapped IPv6 sockets). Input endpoints may also be the 4-tuples
that `getsockname()` gives for IPv6, or carry a ``%scope`` (interface name or index): the
interface goes into idiag_if, as link-local or device-bound sockets need.

Privileges (observed as root and as uid 65534 without capabilities, kernel 6.18)
-----------------------------------------------------------------------------
Reading needs no privilege: an unprivileged process dumps and finds every TCP socket of its
network namespace, its own and other users', tcp_info included (only INET_DIAG_MARK and the
class id, which this module does not ask for, are reserved to CAP_NET_ADMIN). SOCK_DESTROY
needs CAP_NET_ADMIN in the user namespace owning the socket's network namespace; without it
`destroy()` raises `SockDiagError(EPERM, "sock_diag netlink needs CAP_NET_ADMIN for
SOCK_DESTROY")`. A kernel built without CONFIG_INET_DIAG_DESTROY gives
`SockDiagError(EOPNOTSUPP, "the kernel lacks INET_DIAG_DESTROY ...")`.

What `destroy()` does (observed, loopback, kernel 6.18)
-------------------------------------------------------
The kernel aborts the socket (tcp_abort). Its owner sees poll() report
POLLIN|POLLOUT|POLLERR|POLLHUP at once, and the first recv() or send() after that fails with
ECONNABORTED (ConnectionAbortedError); the error is reported once (later recv()s read EOF).
The socket leaves the kernel's tables at once (no FIN_WAIT/TIME_WAIT: `find()` gives None
right away). For a synchronized state (ESTABLISHED, CLOSE_WAIT, FIN_WAIT1/2, SYN_RECV) the
kernel sends one RST to the peer (not retransmitted): a reachable peer sees
POLLIN|POLLERR|POLLHUP and ECONNRESET (ConnectionResetError), and its socket goes too. A peer
that is not reachable (the partition case) keeps its socket until its own timers end it.
TIME_WAIT sockets can be destroyed as well (True; no RST, they are just removed).

tcp_info fields and units (INET_DIAG_INFO, struct tcp_info of linux/tcp.h)
--------------------------------------------------------------------------
The kernel sends its own sizeof(struct tcp_info): the length tells the kernel's version of
the struct. Fields are read by name at offsets fixed by the uapi header (checked below
against the header's layout; later kernels only append); a field that does not fit in the
length the kernel sent is None, and so are all of them for sockets without tcp_info
(TIME_WAIT, SYN_RECV request sockets) or when `info=False`. `info_len` is that length (kernel
6.18 sends 280 bytes; the uapi header here lays out 232, every field read lies within them).
A timewait socket is reported in its sub-state: TIME_WAIT, or FIN_WAIT2 for an orphaned one.

  rtt_us, rttvar_us, min_rtt_us, rto_us  microseconds (smoothed RTT, its mean deviation,
                                         the windowed minimum RTT, retransmission timeout)
  snd_cwnd                               segments (packets), not bytes
  snd_mss, rcv_mss                       bytes
  bytes_sent                             bytes of data sent, retransmissions included (4.19+)
  bytes_acked                            bytes the peer has acked (4.1+), in sequence space:
                                         on the active opener (the connect() side) the SYN
                                         counts 1 (data acked + 1, observed), and a FIN, once
                                         acked, 1 more; the passive side's SYN does not count
  bytes_received                         bytes received in order (4.1+), in sequence space: a
                                         received FIN counts 1 (observed); the kernel's, not
                                         the application's: `rqueue` of them are still unread
  bytes_retrans                          bytes retransmitted (4.19+)
  segs_out, segs_in                      segments, pure ACKs included (4.2+)
  unacked, sacked, lost                  segments now in flight / SACKed / presumed lost
  retransmits                            consecutive RTO expiries without progress
  total_retrans                          segments retransmitted over the connection's life
  last_data_recv_ms, last_ack_recv_ms    milliseconds since the last data / ACK was received
  delivered                              segments delivered (retransmissions included) (4.18+)
  delivery_rate                          bytes per second, the latest delivery-rate sample
  notsent_bytes                          bytes written by the application, not yet sent (4.6+)

From struct inet_diag_msg (always present): `rqueue` and `wqueue`, for a connection the bytes
received but unread and the bytes sent but unacked (for a listener: accept queue length and
backlog), `cookie` (the kernel's 64-bit socket cookie), `inode` and `uid` (0 for TIME_WAIT
and request sockets).
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import operator
import os
import socket
import struct
import time
from typing import List, NamedTuple, Optional, Tuple

__all__ = ["SockDiagError", "TcpSocket", "tcp_sockets", "find", "destroy", "TCP_STATES",
           "ESTABLISHED_ONLY", "ALL", "state_mask"]

# --- uapi constants (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h, netinet/tcp.h) ---
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE, NLMSG_OVERRUN = 1, 2, 3, 4
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_INFO = 2
INET_DIAG_BC_D_COND = 8
INET_DIAG_BC_S_EQ = 11
INET_DIAG_BC_D_EQ = 12

TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
    12: "NEW_SYN_RECV", 13: "BOUND_INACTIVE",
}
_STATE_BY_NAME = {v: k for k, v in TCP_STATES.items()}
ESTABLISHED_ONLY = 1 << 1
# Every state of a real socket, 1..11 (the kernel adds NEW_SYN_RECV when SYN_RECV is asked
# for); not BOUND_INACTIVE (bound, never connected: no connection, like `ss -a`).
ALL = sum(1 << s for s in range(1, 12))

DEFAULT_TIMEOUT = 5.0
DEFAULT_MAX_SOCKETS = 1_000_000
_RECV_BUF = 256 * 1024   # the kernel's dump datagrams are at most ~32 KiB

_NLH = struct.Struct("=IHHII")             # nlmsghdr: len, type, flags, seq, pid
_ERRNO = struct.Struct("=i")
_REQ_HEAD = struct.Struct("=BBBBI")         # inet_diag_req_v2 up to idiag_states
_SOCKID_NET = struct.Struct("!HH16s16s")    # inet_diag_sockid: sport, dport, src, dst (network order)
_SOCKID_HOST = struct.Struct("=III")        # idiag_if, idiag_cookie[2] (host order)
_NLA = struct.Struct("=HH")
_DIAG_MSG = struct.Struct("=BBBBHH16s16sIIIIIIII")  # inet_diag_msg, ports still big-endian
_BC_OP = struct.Struct("=BBH")
_HOSTCOND = struct.Struct("=BBxxi")     # inet_diag_hostcond (2 bytes of padding before port)
assert _REQ_HEAD.size + _SOCKID_NET.size + _SOCKID_HOST.size == 56   # sizeof(inet_diag_req_v2)
assert _DIAG_MSG.size == 72                                           # sizeof(inet_diag_msg)

# struct tcp_info exactly as linux/tcp.h lays it out, every member in order (the header has
# no padding: u8s to 8, then u32s, u64s at 8-aligned offsets). Offsets are computed from this
# list and checked against the header's values; only the names in _TCPI_FIELDS are read.
_TCP_INFO_LAYOUT = [
    ("state", "B"), ("ca_state", "B"), ("retransmits", "B"), ("probes", "B"), ("backoff", "B"),
    ("options", "B"), ("wscale", "B"), ("app_limited", "B"),
    ("rto", "I"), ("ato", "I"), ("snd_mss", "I"), ("rcv_mss", "I"),
    ("unacked", "I"), ("sacked", "I"), ("lost", "I"), ("retrans", "I"), ("fackets", "I"),
    ("last_data_sent", "I"), ("last_ack_sent", "I"), ("last_data_recv", "I"), ("last_ack_recv", "I"),
    ("pmtu", "I"), ("rcv_ssthresh", "I"), ("rtt", "I"), ("rttvar", "I"), ("snd_ssthresh", "I"),
    ("snd_cwnd", "I"), ("advmss", "I"), ("reordering", "I"), ("rcv_rtt", "I"), ("rcv_space", "I"),
    ("total_retrans", "I"),
    ("pacing_rate", "Q"), ("max_pacing_rate", "Q"), ("bytes_acked", "Q"), ("bytes_received", "Q"),
    ("segs_out", "I"), ("segs_in", "I"), ("notsent_bytes", "I"), ("min_rtt", "I"),
    ("data_segs_in", "I"), ("data_segs_out", "I"), ("delivery_rate", "Q"),
    ("busy_time", "Q"), ("rwnd_limited", "Q"), ("sndbuf_limited", "Q"),
    ("delivered", "I"), ("delivered_ce", "I"), ("bytes_sent", "Q"), ("bytes_retrans", "Q"),
    ("dsack_dups", "I"), ("reord_seen", "I"), ("rcv_ooopack", "I"), ("snd_wnd", "I"),
]
_TCPI = struct.Struct("=" + "".join(f for _, f in _TCP_INFO_LAYOUT))
_TCPI_INDEX = {name: i for i, (name, _) in enumerate(_TCP_INFO_LAYOUT)}
_TCPI_END = {}
_off = 0
for _name, _fmt in _TCP_INFO_LAYOUT:
    _off += struct.calcsize("=" + _fmt)
    _TCPI_END[_name] = _off
del _off, _name, _fmt
# offsetof(struct tcp_info, tcpi_X) + sizeof, from linux/tcp.h (gcc offsetof on the uapi header).
for _name, _end in (("retransmits", 3), ("rto", 12), ("snd_mss", 20), ("rcv_mss", 24), ("unacked", 28),
                    ("sacked", 32), ("lost", 36), ("last_data_recv", 56), ("last_ack_recv", 60),
                    ("rtt", 72), ("rttvar", 76), ("snd_cwnd", 84), ("total_retrans", 104),
                    ("bytes_acked", 128), ("bytes_received", 136), ("segs_out", 140), ("segs_in", 144),
                    ("notsent_bytes", 148), ("min_rtt", 152), ("delivery_rate", 168),
                    ("delivered", 196), ("bytes_sent", 208), ("bytes_retrans", 216), ("snd_wnd", 232)):
    assert _TCPI_END[_name] == _end, (_name, _TCPI_END[_name], _end)
del _name, _end
assert _TCPI.size == 232

# TcpSocket field -> tcp_info member
_TCPI_FIELDS = [
    ("rtt_us", "rtt"), ("rttvar_us", "rttvar"), ("snd_cwnd", "snd_cwnd"), ("snd_mss", "snd_mss"),
    ("rcv_mss", "rcv_mss"), ("bytes_sent", "bytes_sent"), ("bytes_acked", "bytes_acked"),
    ("bytes_received", "bytes_received"), ("bytes_retrans", "bytes_retrans"),
    ("segs_out", "segs_out"), ("segs_in", "segs_in"), ("unacked", "unacked"),
    ("retransmits", "retransmits"), ("total_retrans", "total_retrans"), ("lost", "lost"),
    ("sacked", "sacked"), ("last_data_recv_ms", "last_data_recv"),
    ("last_ack_recv_ms", "last_ack_recv"), ("min_rtt_us", "min_rtt"), ("delivered", "delivered"),
    ("delivery_rate", "delivery_rate"), ("notsent_bytes", "notsent_bytes"), ("rto_us", "rto"),
]
_TCPI_PICK = [(_TCPI_INDEX[m], _TCPI_END[m]) for _, m in _TCPI_FIELDS]
_tcpi_pick = operator.itemgetter(*(i for i, _ in _TCPI_PICK))
_NO_INFO = (None,) * (len(_TCPI_FIELDS) + 1)   # + info_len


_new_tuple = tuple.__new__
_ntohs = socket.ntohs


class SockDiagError(OSError):
    """A sock_diag request failed: `errno` is the kernel's (or ETIMEDOUT, EBADMSG, EMSGSIZE
    for a timeout, a malformed or a truncated answer), `strerror` says what it means here."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.strerror} [{name}]"


Endpoint = Tuple[str, int]


class TcpSocket(NamedTuple):
    """One TCP socket as the kernel reports it. local and remote: (ip text, port), v4-mapped
    IPv6 addresses as dotted IPv4. The tcp_info fields (rtt_us ... rto_us, units in the module
    docstring) are None when the kernel sent no tcp_info or one too short for them."""
    family: int
    state: int
    local: Endpoint
    remote: Endpoint
    inode: int
    uid: int
    cookie: int = 0
    rqueue: int = 0
    wqueue: int = 0
    rtt_us: Optional[int] = None
    rttvar_us: Optional[int] = None
    snd_cwnd: Optional[int] = None
    snd_mss: Optional[int] = None
    rcv_mss: Optional[int] = None
    bytes_sent: Optional[int] = None
    bytes_acked: Optional[int] = None
    bytes_received: Optional[int] = None
    bytes_retrans: Optional[int] = None
    segs_out: Optional[int] = None
    segs_in: Optional[int] = None
    unacked: Optional[int] = None
    retransmits: Optional[int] = None
    total_retrans: Optional[int] = None
    lost: Optional[int] = None
    sacked: Optional[int] = None
    last_data_recv_ms: Optional[int] = None
    last_ack_recv_ms: Optional[int] = None
    min_rtt_us: Optional[int] = None
    delivered: Optional[int] = None
    delivery_rate: Optional[int] = None
    notsent_bytes: Optional[int] = None
    rto_us: Optional[int] = None
    info_len: Optional[int] = None

    @property
    def state_name(self) -> str:
        """The kernel's name of the state (tcp_states.h): ESTABLISHED, SYN_SENT, ..."""
        return TCP_STATES.get(self.state, f"UNKNOWN({self.state})")


# _parse builds TcpSockets positionally: the tcp_info fields must follow the base ones in order.
assert TcpSocket._fields[9:] == tuple(f for f, _ in _TCPI_FIELDS) + ("info_len",)


# ----------------------------------------------------------------------------- input checks

def _addr(text, what: str) -> Tuple[int, bytes, int, str]:
    """(family, 16-byte kernel address, ifindex from a %scope, normalized text) of `text`."""
    if not isinstance(text, str):
        raise ValueError(f"{what}: the address must be text, not {type(text).__name__}")
    scope = 0
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not an IPv4 or IPv6 address") from None
    if ip.version == 6 and ip.scope_id:
        scope = _ifindex(ip.scope_id, what)
        ip = ipaddress.IPv6Address(text.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return socket.AF_INET, ip.packed + bytes(12), scope, str(ip)
    return socket.AF_INET6, ip.packed, scope, str(ip)


def _ifindex(scope, what: str) -> int:
    if isinstance(scope, int):
        return scope
    if scope.isdigit():
        return int(scope)
    try:
        return socket.if_nametoindex(scope)
    except OSError:
        raise ValueError(f"{what}: no interface {scope!r} for the address's scope") from None


def _port(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what}: the port must be an int, not {type(value).__name__}")
    if not 0 < value < 65536:
        raise ValueError(f"{what}: port {value} out of range 1..65535")
    return value


def _endpoint(ep, what: str) -> Tuple[int, bytes, int, int, str]:
    """(family, address, port, ifindex, normalized text) of an (ip, port) or an IPv6
    getsockname() 4-tuple (ip, port, flowinfo, scope_id)."""
    if isinstance(ep, (str, bytes)) or not isinstance(ep, (tuple, list)) or len(ep) not in (2, 4):
        raise ValueError(f"{what}: expected (ip text, port), got {ep!r}")
    fam, raw, scope, text = _addr(ep[0], what)
    port = _port(ep[1], what)
    if len(ep) == 4 and ep[3]:
        scope = _ifindex(ep[3], what)
    return fam, raw, port, scope, text


def _pair(local, remote):
    lf, lraw, lport, lscope, ltext = _endpoint(local, "local")
    rf, rraw, rport, rscope, rtext = _endpoint(remote, "remote")
    if lf != rf:
        raise ValueError(f"local and remote are of different address families: {ltext} and {rtext}")
    return lf, lraw, lport, rraw, rport, lscope or rscope, (ltext, lport), (rtext, rport)


def _timeout(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ValueError(f"timeout: expected seconds in (0, 3600], got {value!r}")
    return float(value)


def state_mask(states) -> int:
    """The idiag_states mask for `states`: an int mask (ESTABLISHED_ONLY, ALL, or any
    1 << state combination), or an iterable of state numbers or names."""
    if isinstance(states, bool):
        raise ValueError(f"states: expected a mask or state names, got {states!r}")
    if isinstance(states, int):
        if not 0 < states < (1 << 32) or states & 1:
            raise ValueError(f"states: mask {states:#x} is not a set of TCP states")
        return states
    if isinstance(states, str):
        states = [states]
    mask = 0
    try:
        items = list(states)
    except TypeError:
        raise ValueError(f"states: expected a mask or state names, got {states!r}") from None
    for s in items:
        if isinstance(s, str) and s.upper() in _STATE_BY_NAME:
            mask |= 1 << _STATE_BY_NAME[s.upper()]
        elif isinstance(s, int) and not isinstance(s, bool) and s in TCP_STATES:
            mask |= 1 << s
        else:
            raise ValueError(f"states: {s!r} is not a TCP state")
    if not mask:
        raise ValueError("states: no state given")
    return mask


# ------------------------------------------------------------------------------- netlink

_seq = itertools.count((os.getpid() & 0xFFFF) << 12)


def _request(nl_type: int, flags: int, seq: int, family: int, states: int, ext: int,
             src: bytes = bytes(16), sport: int = 0, dst: bytes = bytes(16), dport: int = 0,
             ifindex: int = 0, cookie: Optional[int] = None, bytecode: bytes = b"") -> bytes:
    if cookie is None:
        c0 = c1 = INET_DIAG_NOCOOKIE
    else:
        c0, c1 = cookie & 0xFFFFFFFF, cookie >> 32
    body = (_REQ_HEAD.pack(family, socket.IPPROTO_TCP, ext, 0, states)
            + _SOCKID_NET.pack(sport, dport, src, dst) + _SOCKID_HOST.pack(ifindex, c0, c1))
    if bytecode:
        body += _NLA.pack(_NLA.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
    return _NLH.pack(_NLH.size + len(body), nl_type, flags, seq, 0) + body


_MAPPED = b"\0\0\0\0\0\0\0\0\0\0\xff\xff"
_text_cache: dict = {}


def _text(family: int, raw: bytes) -> str:
    """Address text of a kernel address (v4-mapped IPv6 as dotted IPv4), memoized (bounded)."""
    key = (family, raw)
    text = _text_cache.get(key)
    if text is None:
        if family == socket.AF_INET:
            text = socket.inet_ntop(socket.AF_INET, raw[:4])
        elif raw[:12] == _MAPPED:
            text = socket.inet_ntop(socket.AF_INET, raw[12:16])
        else:
            text = socket.inet_ntop(socket.AF_INET6, raw)
        if len(_text_cache) >= 4096:
            _text_cache.clear()
        _text_cache[key] = text
    return text


def _parse(buf, off: int, end: int) -> TcpSocket:
    """One inet_diag_msg and its attributes, buf[off:end] (off: after the nlmsghdr)."""
    if end - off < _DIAG_MSG.size:
        raise SockDiagError(errno.EBADMSG, "sock_diag answer shorter than struct inet_diag_msg")
    (fam, state, _timer, _retr, sport, dport, src, dst, _if, c0, c1,
     _exp, rq, wq, uid, inode) = _DIAG_MSG.unpack_from(buf, off)
    info = _NO_INFO
    a = off + _DIAG_MSG.size
    while a + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, a)
        if alen < 4 or a + alen > end:
            raise SockDiagError(errno.EBADMSG, "malformed attribute in a sock_diag answer")
        if atype & 0x3FFF == INET_DIAG_INFO:
            info = _tcp_info(buf, a + 4, alen - 4)
        a += (alen + 3) & ~3
    return _new_tuple(TcpSocket, ((fam, state, (_text(fam, src), _ntohs(sport)), (_text(fam, dst), _ntohs(dport)),
                                   inode, uid, c0 | (c1 << 32), rq, wq) + info))


def _tcp_info(buf, off: int, n: int) -> tuple:
    if n >= _TCPI.size:
        return _tcpi_pick(_TCPI.unpack_from(buf, off)) + (n,)
    v = _TCPI.unpack(bytes(buf[off:off + n]).ljust(_TCPI.size, b"\0"))
    return tuple(v[i] if e <= n else None for i, e in _TCPI_PICK) + (n,)


class _Session:
    """One NETLINK_SOCK_DIAG socket, in the calling thread's network namespace, with a deadline."""

    def __init__(self, timeout: float):
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
        except OSError as e:
            raise SockDiagError(e.errno, f"cannot open a NETLINK_SOCK_DIAG socket: {e.strerror}") from None
        try:
            self.sock.bind((0, 0))
            try:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)   # errors without the request echoed
            except OSError:
                pass
        except OSError as e:
            self.sock.close()
            raise SockDiagError(e.errno, f"cannot bind a NETLINK_SOCK_DIAG socket: {e.strerror}") from None
        self.buf = bytearray(_RECV_BUF)
        self.view = memoryview(self.buf)

    def close(self):
        self.view.release()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, msg: bytes):
        self._settimeout()
        try:
            self.sock.sendto(msg, (0, 0))
        except socket.timeout:
            raise SockDiagError(errno.ETIMEDOUT, "sending the sock_diag request timed out") from None
        except OSError as e:
            raise SockDiagError(e.errno, f"sending the sock_diag request failed: {e.strerror}") from None

    def _settimeout(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise SockDiagError(errno.ETIMEDOUT, f"sock_diag answer not complete within {self.timeout:g} s")
        self.sock.settimeout(left)

    def run(self, seq: int, limit: int, out: list) -> int:
        """Reads the answer to request `seq` into `out` (TcpSockets) until NLMSG_DONE (dump)
        or NLMSG_ERROR (an acked request); returns the kernel's error (0, or a negative errno).
        `limit` bounds len(out)."""
        for _ in range(limit + 1024):       # each datagram holds >= 1 message of ours, or is stale
            self._settimeout()
            try:
                n = self.sock.recv_into(self.buf, len(self.buf), socket.MSG_TRUNC)
            except socket.timeout:
                raise SockDiagError(errno.ETIMEDOUT,
                                    f"sock_diag answer not complete within {self.timeout:g} s") from None
            except OSError as e:
                raise SockDiagError(e.errno, f"reading the sock_diag answer failed: {e.strerror}") from None
            if n > len(self.buf):
                raise SockDiagError(errno.EMSGSIZE, f"sock_diag datagram of {n} bytes truncated to {len(self.buf)}")
            off = 0
            while off + _NLH.size <= n:
                ln, typ, _flags, mseq, _pid = _NLH.unpack_from(self.buf, off)
                if ln < _NLH.size or off + ln > n:
                    raise SockDiagError(errno.EBADMSG, f"malformed netlink message (length {ln} of {n - off})")
                if mseq == seq:
                    if typ == NLMSG_ERROR or typ == NLMSG_DONE:
                        if typ == NLMSG_ERROR and ln < _NLH.size + 4:
                            raise SockDiagError(errno.EBADMSG, "NLMSG_ERROR without an error code")
                        err = _ERRNO.unpack_from(self.buf, off + _NLH.size)[0] if ln >= _NLH.size + 4 else 0
                        return err
                    if typ == SOCK_DIAG_BY_FAMILY:
                        if len(out) >= limit:
                            raise SockDiagError(errno.E2BIG, f"more than {limit} sockets in the sock_diag answer")
                        out.append(_parse(self.view, off + _NLH.size, off + ln))
                    elif typ == NLMSG_OVERRUN:
                        raise SockDiagError(errno.EBADMSG, "netlink overrun in the sock_diag answer")
                off += (ln + 3) & ~3
        raise SockDiagError(errno.EBADMSG, "sock_diag answer never ended")


def _kernel_error(err: int, what: str) -> SockDiagError:
    e = -err
    if e == errno.EPERM or e == errno.EACCES:
        if what == "SOCK_DESTROY":
            return SockDiagError(e, "sock_diag netlink needs CAP_NET_ADMIN for SOCK_DESTROY")
        return SockDiagError(e, f"sock_diag {what} not permitted")
    if e == errno.EOPNOTSUPP and what == "SOCK_DESTROY":
        return SockDiagError(e, "the kernel lacks INET_DIAG_DESTROY (CONFIG_INET_DIAG_DESTROY)")
    if e == errno.ENOENT:
        return SockDiagError(e, "the kernel lacks tcp_diag (CONFIG_INET_DIAG / CONFIG_INET_TCP_DIAG)")
    if e == errno.EINVAL:
        return SockDiagError(e, f"the kernel rejected the sock_diag {what} request as invalid")
    return SockDiagError(e, f"sock_diag {what} failed: {os.strerror(e)}")


# ------------------------------------------------------------------------------ bytecode

def _bytecode(local_port: Optional[int], remote) -> bytes:
    """An inet_diag bytecode program accepting sockets that match every condition: each op
    jumps on to the next when it holds (yes = its length) and past the end + 4 (reject)
    when it fails; running exactly off the end accepts."""
    ops: List[Tuple[int, bytes]] = []
    if local_port is not None:
        ops.append((INET_DIAG_BC_S_EQ, _BC_OP.pack(0, 0, local_port)))
    if remote is not None:
        fam, raw, port = remote
        if raw is not None:
            alen = 4 if fam == socket.AF_INET else 16
            ops.append((INET_DIAG_BC_D_COND,
                        _HOSTCOND.pack(fam, alen * 8, -1 if port is None else port) + raw[:alen]))
        elif port is not None:
            ops.append((INET_DIAG_BC_D_EQ, _BC_OP.pack(0, 0, port)))
    total = sum(_BC_OP.size + len(arg) for _, arg in ops)
    out, pos = b"", 0
    for code, arg in ops:
        size = _BC_OP.size + len(arg)
        out += _BC_OP.pack(code, size, total - pos + 4) + arg
        pos += size
    return out


def _remote_filter(remote):
    """(family, raw address or None, port or None, text or None) of tcp_sockets' `remote`."""
    if isinstance(remote, (str, bytes)) or not isinstance(remote, (tuple, list)) or len(remote) != 2:
        raise ValueError(f"remote: expected (ip text or None, port or None), got {remote!r}")
    ip, port = remote
    fam = raw = text = None
    if ip is not None:
        fam, raw, _scope, text = _addr(ip, "remote")
    if port is not None:
        port = _port(port, "remote")
    if ip is None and port is None:
        return None
    return fam, raw, port, text


# ---------------------------------------------------------------------------------- API

def tcp_sockets(family: Optional[int] = None, states=ESTABLISHED_ONLY, local_port: Optional[int] = None,
                remote: Optional[Tuple[Optional[str], Optional[int]]] = None, info: bool = True, *,
                timeout: float = DEFAULT_TIMEOUT, max_sockets: int = DEFAULT_MAX_SOCKETS) -> List[TcpSocket]:
    """A dump of the TCP sockets of the calling thread's network namespace.

    family: None (IPv4 and IPv6, two requests), socket.AF_INET or socket.AF_INET6: the
    socket's own family, so an IPv6 socket with v4-mapped addresses is AF_INET6.
    states: ESTABLISHED_ONLY (default), ALL, another mask, or an iterable of state numbers or
    names; filtered in the kernel (idiag_states).
    local_port: only sockets bound to this port; remote: (ip text, port), either may be None
    for "any": only sockets whose peer matches (a v4 address matches v4-mapped peers too).
    Both are filtered in the kernel by an inet_diag bytecode program (S_EQ, D_COND, D_EQ)
    and re-checked in Python.
    info: ask for tcp_info (INET_DIAG_INFO); without it the tcp_info fields are None.
    Raises ValueError for bad arguments, SockDiagError when the kernel refuses, or on
    timeout, or past max_sockets.
    """
    if family is None:
        families = (socket.AF_INET, socket.AF_INET6)
    elif family in (socket.AF_INET, socket.AF_INET6) and not isinstance(family, bool):
        families = (family,)
    else:
        raise ValueError(f"family: expected None, AF_INET or AF_INET6, got {family!r}")
    mask = state_mask(states)
    if local_port is not None:
        local_port = _port(local_port, "local_port")
    rf = _remote_filter(remote) if remote is not None else None
    timeout = _timeout(timeout)
    if isinstance(max_sockets, bool) or not isinstance(max_sockets, int) or max_sockets < 1:
        raise ValueError(f"max_sockets: expected a positive int, got {max_sockets!r}")
    bytecode = _bytecode(local_port, rf[:3] if rf else None)
    ext = (1 << (INET_DIAG_INFO - 1)) if info else 0
    out: List[TcpSocket] = []
    with _Session(timeout) as s:
        for fam in families:
            seq = next(_seq) & 0xFFFFFFFF
            s.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, fam, mask, ext,
                            bytecode=bytecode))
            err = s.run(seq, max_sockets, out)
            if err < 0:
                raise _kernel_error(err, "dump")
    if local_port is not None or rf is not None:
        out = [t for t in out if _matches(t, local_port, rf)]
    return out


def _matches(t: TcpSocket, local_port, rf) -> bool:
    if local_port is not None and t.local[1] != local_port:
        return False
    if rf is not None:
        _fam, _raw, port, text = rf
        if port is not None and t.remote[1] != port:
            return False
        if text is not None and t.remote[0] != text:
            return False
    return True


def _find(s: _Session, fam, lraw, lport, rraw, rport, scope, want_local, want_remote) -> Optional[TcpSocket]:
    seq = next(_seq) & 0xFFFFFFFF
    s.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_ACK, seq, fam, ALL, 1 << (INET_DIAG_INFO - 1),
                    lraw, lport, rraw, rport, scope))
    out: List[TcpSocket] = []
    err = s.run(seq, 4, out)
    if err == -errno.ENOENT:
        return None
    if err < 0:
        raise _kernel_error(err, "lookup")
    for t in out:
        # The kernel's lookup falls back to a listener on the local port: only the exact tuple counts.
        if t.local == want_local and t.remote == want_remote:
            return t
    return None


def find(local, remote, *, timeout: float = DEFAULT_TIMEOUT) -> Optional[TcpSocket]:
    """The TCP socket with exactly this 4-tuple in the calling thread's network namespace, by
    an inet_diag request with the full id (not a dump), or None. local and remote: (ip text,
    port) as seen from this host (local = this host's end). Any state, tcp_info included."""
    fam, lraw, lport, rraw, rport, scope, wl, wr = _pair(local, remote)
    timeout = _timeout(timeout)
    with _Session(timeout) as s:
        return _find(s, fam, lraw, lport, rraw, rport, scope, wl, wr)


def destroy(local, remote, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """SOCK_DESTROY the TCP socket with exactly this 4-tuple (local = this host's end): True
    if a socket was destroyed, False if none had the tuple. The kernel aborts it: the owner
    gets ECONNABORTED, the peer a RST for a synchronized state (see the module docstring).
    Exact by socket cookie: never a listener or another socket. Needs CAP_NET_ADMIN
    (SockDiagError EPERM without it)."""
    fam, lraw, lport, rraw, rport, scope, wl, wr = _pair(local, remote)
    timeout = _timeout(timeout)
    with _Session(timeout) as s:
        for _attempt in range(3):
            t = _find(s, fam, lraw, lport, rraw, rport, scope, wl, wr)
            if t is None:
                return False
            seq = next(_seq) & 0xFFFFFFFF
            s.send(_request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, seq, fam, ALL, 0,
                            lraw, lport, rraw, rport, scope, cookie=t.cookie))
            err = s.run(seq, 4, [])
            if err == 0:
                return True
            if err == -errno.ENOENT:
                return False
            if err == -errno.ESTALE:     # the tuple now names another socket (or only a listener)
                continue
            raise _kernel_error(err, "SOCK_DESTROY")
    return False
