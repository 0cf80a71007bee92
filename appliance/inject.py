"""Raw-socket injection: whole IP packets, built by the packet engine, sent by the kernel's IP layer.

The takeover server sends its Migrate SYNs this way (DESIGN §6): the kernel routes them
and fills in the link layer, and the packet leaves exactly as built (IP_HDRINCL).
"""

from __future__ import annotations

import errno
import socket

IPV6_HDRINCL = 36


class InjectError(OSError):
    """The raw socket could not be opened; the message says which privilege is missing."""


class RawInjector:
    """Sends IPv4 and IPv6 packets through raw sockets, counting what it sent and what failed."""

    def __init__(self) -> None:
        self._socks = {}
        self.counters = {"packets": 0, "bytes": 0, "errors": 0, "last_error": ""}

    def _sock(self, version: int) -> socket.socket:
        sock = self._socks.get(version)
        if sock is None:
            family = socket.AF_INET if version == 4 else socket.AF_INET6
            try:
                sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            except PermissionError:
                raise InjectError(errno.EPERM, "raw IP sockets need CAP_NET_RAW (run as root)") from None
            if version == 6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)
            self._socks[version] = sock
        return sock

    def send(self, packet: bytes) -> bool:
        """Send one IP packet (starting at the IP header) to its own destination address."""
        packet = bytes(packet)
        version = packet[0] >> 4 if packet else 0
        if version == 4 and len(packet) >= 20:
            dst = socket.inet_ntop(socket.AF_INET, packet[16:20])
            addr = (dst, 0)
        elif version == 6 and len(packet) >= 40:
            dst = socket.inet_ntop(socket.AF_INET6, packet[24:40])
            addr = (dst, 0, 0, 0)
        else:
            self.counters["errors"] += 1
            self.counters["last_error"] = "not an IPv4 or IPv6 packet"
            return False
        try:
            self._sock(version).sendto(packet, addr)
        except InjectError:
            raise
        except OSError as exc:  # no route, ENOBUFS, EMSGSIZE: counted, the caller retries by rule
            self.counters["errors"] += 1
            self.counters["last_error"] = exc.strerror or str(exc)
            return False
        self.counters["packets"] += 1
        self.counters["bytes"] += len(packet)
        return True

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
