"""Raw sockets of the takeover engine: classic BPF filters, the SYN/ACK receiver, the watch on a
repaired socket's 4-tuple, and the interface address.

Classic BPF (SO_ATTACH_FILTER) keeps the kernel from waking the engine for anything but
the segments it waits for: SYN/ACKs and RSTs to the service ports, and the client's answer
to a repaired socket's window probe. No select(): every socket here is non-blocking and
read when the event loop says it is readable.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import socket
import struct
from typing import List, NamedTuple, Optional, Tuple

import _fastpath as fp

__all__ = ["synack_filter", "tuple_filter", "attach_filter", "Receiver", "AckWatch", "ClientAck",
           "interface_ipv4", "TakeoverError"]


SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
_LDB_ABS, _LDH_ABS, _LDXB_MSH, _LDH_IND, _LDB_IND = 0x30, 0x28, 0xB1, 0x48, 0x50
_LDX_IMM, _JEQ, _JSET, _AND, _RET = 0x01, 0x15, 0x45, 0x54, 0x06


def synack_filter(ports, ipv4: bool = True) -> List[Tuple[int, int, int, int]]:
    """A classic BPF program for a raw TCP socket admitting only segments to `ports` that
    carry SYN+ACK, or RST. IPv4 raw sockets see the IP header first (unfragmented TCP is
    checked); IPv6 ones see the TCP header. Instructions as (code, jt, jf, k)."""
    ports = sorted(set(int(p) for p in ports))
    if not ports or not all(0 < p < 65536 for p in ports):
        raise ValueError("service ports must be 1..65535")
    prog: list = []  # entries: [code, jt, jf, k] with jt/jf as labels or ints
    if ipv4:
        prog += [[_LDB_ABS, 0, 0, 9], [_JEQ, 0, "drop", 6],
                 [_LDH_ABS, 0, 0, 6], [_JSET, "drop", 0, 0x1FFF],
                 [_LDXB_MSH, 0, 0, 0]]
    else:
        prog += [[_LDX_IMM, 0, 0, 0]]
    prog.append([_LDH_IND, 0, 0, 2])
    for i, p in enumerate(ports):
        prog.append([_JEQ, "flags", 0 if i + 1 < len(ports) else "drop", p])
    labels = {"flags": len(prog)}
    prog += [[_LDB_IND, 0, 0, 13], [_JSET, "accept", 0, 0x04], [_AND, 0, 0, 0x12], [_JEQ, "accept", "drop", 0x12]]
    labels["accept"] = len(prog)
    prog.append([_RET, 0, 0, 0x40000])
    labels["drop"] = len(prog)
    prog.append([_RET, 0, 0, 0])
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out.append((code, jt, jf, k))
    return out


def attach_filter(sock: socket.socket, prog) -> None:
    code = b"".join(struct.pack("HBBI", c, jt, jf, k) for c, jt, jf, k in prog)
    buf = ctypes.create_string_buffer(code)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", len(prog), ctypes.addressof(buf)))


class TakeoverError(OSError):
    """The engine cannot run here (e.g. no privilege for raw sockets)."""


IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)


class Receiver:
    """A raw TCP socket with the SYN/ACK filter; yields whole IP packets (IPv6 heads rebuilt)."""

    def __init__(self, family: int, ports) -> None:
        try:
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        except PermissionError:
            raise TakeoverError(errno.EPERM, "the SYN/ACK receiver needs a raw socket (CAP_NET_RAW: run as root)") \
                from None
        try:
            attach_filter(sock, synack_filter(ports, family == socket.AF_INET))
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
            try:  # a mass failover brings a SYN/ACK per connection at once
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.setblocking(False)
            for _ in range(100_000):  # what arrived before the filter was attached
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
        except OSError:
            sock.close()
            raise
        self.sock, self.family = sock, family

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, limit: int) -> List[bytes]:
        out = []
        for _ in range(limit):
            try:
                if self.family == socket.AF_INET:
                    out.append(self.sock.recv(65536))
                    continue
                data, anc, _, addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(20))
            except BlockingIOError:
                break
            except OSError:
                break
            dst = None
            for level, kind, cdata in anc:
                if level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO and len(cdata) >= 16:
                    dst = cdata[:16]
            if dst is None:
                continue
            src = socket.inet_pton(socket.AF_INET6, addr[0].split("%")[0])
            out.append(struct.pack("!IHBB16s16s", 6 << 28, len(data), socket.IPPROTO_TCP, 64, src, dst) + data)
        return out

    def close(self) -> None:
        self.sock.close()


_LD_ABS = 0x20


def tuple_filter(client_ip: bytes, client_port: int, local_port: int) -> List[Tuple[int, int, int, int]]:
    """A classic BPF program for a raw TCP socket admitting only ACK-carrying segments from
    client_ip:client_port to local_port (IPv4; for IPv6, whose raw sockets see no IP header,
    the ports only: check the source address when reading)."""
    prog: list = []
    if len(client_ip) == 4:
        prog += [[_LDB_ABS, 0, 0, 9], [_JEQ, 0, "drop", 6], [_LDH_ABS, 0, 0, 6], [_JSET, "drop", 0, 0x1FFF],
                 [_LD_ABS, 0, 0, 12], [_JEQ, 0, "drop", int.from_bytes(client_ip, "big")], [_LDXB_MSH, 0, 0, 0]]
    else:
        prog.append([_LDX_IMM, 0, 0, 0])
    prog += [[_LDH_IND, 0, 0, 0], [_JEQ, 0, "drop", client_port], [_LDH_IND, 0, 0, 2], [_JEQ, 0, "drop", local_port],
             [_LDB_IND, 0, 0, 13], [_JSET, 0, "drop", 0x10], [_RET, 0, 0, 0x40000], [_RET, 0, 0, 0]]
    drop = len(prog) - 1
    return [(c, drop - i - 1 if jt == "drop" else jt, drop - i - 1 if jf == "drop" else jf, k)
            for i, (c, jt, jf, k) in enumerate(prog)]


class ClientAck(NamedTuple):
    seq: int
    ack: int  # the client's rcv_nxt as it really is
    window: int
    tsval: Optional[int]
    tsecr: Optional[int]
    sack: tuple = ()  # the client's SACK blocks: data it holds above a hole


class AckWatch:
    """Sees the client's segments to a repaired socket: its answer to the window probe, which
    carries the client's real rcv_nxt. Opened before the repair, read with the loop, closed."""

    def __init__(self, client_ip: bytes, client_port: int, local: bytes, local_port: int) -> None:
        self.family = socket.AF_INET if len(client_ip) == 4 else socket.AF_INET6
        self.client_ip, self.local = client_ip, local
        sock = socket.socket(self.family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        try:
            attach_filter(sock, tuple_filter(client_ip, client_port, local_port))
            sock.setblocking(False)
            for _ in range(10_000):
                try:
                    sock.recv(65536)
                except BlockingIOError:
                    break
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> Optional[ClientAck]:
        """The latest ACK from the client that is waiting in the socket, or None (non-blocking)."""
        got = self.read_all()
        return got[-1] if got else None

    def read_all(self) -> list:
        """Every ACK from the client waiting in the socket, oldest first (non-blocking)."""
        found = []
        for _ in range(1000):
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if self.family == socket.AF_INET6:
                if socket.inet_pton(socket.AF_INET6, addr[0].split("%")[0]) != self.client_ip:
                    continue
                data = struct.pack("!IHBB16s16s", 6 << 28, len(data), socket.IPPROTO_TCP, 64, self.client_ip,
                                   self.local) + data
            v = fp.parse(data, fp.LINK_RAW)
            if v.is_tcp and v.flags & fp.ACK and not v.flags & (fp.SYN | fp.RST):
                ts = bool(v.opts & fp.HAS_TIMESTAMPS)
                found.append(ClientAck(v.seq, v.ack, v.window, v.tsval if ts else None, v.tsecr if ts else None,
                                       tuple(v.sack_blocks) if v.opts & fp.HAS_SACK else ()))
        return found

    def close(self) -> None:
        self.sock.close()


SIOCGIFADDR = 0x8915


def interface_ipv4(iface: str) -> str:
    """The IPv4 address of an interface (e.g. service.iface), for TakeoverEngine's local_ip.
    Raises OSError (EADDRNOTAVAIL, ENODEV) when it has none or does not exist."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifreq = struct.pack("16s16x", iface.encode()[:15])
        res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, ifreq)
    return socket.inet_ntoa(res[20:24])
