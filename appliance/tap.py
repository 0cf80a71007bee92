"""The server appliance's passive tap: pcapy-ng capture with a kernel BPF filter.

    f = bpf_filter([80, 8080])        # the filter string (tcpdump syntax)
    tap = Tap("eth0", [80], snaplen=4096, buffer_size=32 << 20, timeout_ms=1, pcap_out=None)
    tap.fileno()                      # select()/add_reader() on it
    for ts, frame, wire_len in tap.read(1024): ...   # Captured(ts, data, wire_len), never blocks
    tap.link                          # _fastpath.LINK_ETHERNET or LINK_RAW, for the mapper
    tap.stats()                       # received, dropped, ifdropped (kernel) + frames, bytes, ...
    tap.close()
    Tap.offline("trace.pcap")         # the same reader over a pcap file (tests, replays)

The filter admits only what the stream mapper needs, so a replica's bulk traffic never
wakes the appliance. On the service ports:
  * TCP segments with SYN, FIN or RST (either direction);
  * client->server segments that carry payload (dst port a service port, payload > 0);
  * server->client segments whose payload starts with "HTTP" (a response head; the body
    segments that follow it are dropped in the kernel).
IPv4 uses `tcp[...]`; IPv6 uses `ip6[...]` offsets that assume the TCP header follows the
fixed 40-byte IPv6 header (no extension headers: such packets are not admitted). Frames
with a VLAN tag still on them (a trunk port) are not admitted either: capture on the VLAN
interface. Not admitted by design: pure ACKs, window updates, and server payload segments
that do not start with "HTTP" (bodies, and any head that starts mid-segment, e.g. the second
of two pipelined responses packed into one segment).

Errors: the constructor raises TapError (with .kind "no_such_device", "permission",
"down" or "pcap") and a one-line message naming the interface.

Reading follows notes/packet-io.md §1: a blocking dispatch() never returns on the read
timeout, so the handle is non-blocking and read() is meant to follow select() on fileno();
`timeout_ms` (>= 1; 0 delivers nothing) bounds how long the kernel holds a ring block, so a
frame reaches the appliance 1-2 ms after it was captured. The ring is `buffer_size` bytes
(the 2 MB default dropped 7-15 % under bulk traffic). `pcap_out` also writes every captured
frame (as captured, snaplen-cut) to a pcap file that tcpdump and Wireshark read.
"""

from __future__ import annotations

import ctypes
import errno
import select
import socket
import struct
import time
from typing import Iterable, List, NamedTuple, Optional

import pcapy

import _fastpath as fp

DLT_LINUX_SLL = 113
DLT_LINUX_SLL2 = 276
DLT_RAW_VALUES = (12, 14, 101)  # DLT_RAW on various platforms, LINKTYPE_RAW

# pcap_activate() status codes (pcap/pcap.h)
_PCAP_ERRORS = {
    -1: "generic error", -2: "loop broken", -3: "not activated", -4: "already activated",
    -5: "no such device", -6: "rfmon not supported", -7: "not in rfmon mode",
    -8: "permission denied", -9: "interface is down", -10: "cannot set timestamp type",
    -11: "permission denied for promiscuous mode", -12: "timestamp precision not supported",
}

HTTP_MAGIC = 0x48545450  # "HTTP"


class TapError(Exception):
    """The capture could not be opened; str() is a one-line message naming the interface."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


class Captured(NamedTuple):
    """One captured frame: capture time (seconds since the epoch), bytes, length on the wire."""

    ts: float
    data: bytes
    wire_len: int


def _ports(ports: Iterable[int]) -> list:
    out = sorted({int(p) for p in ports})
    if not out:
        raise ValueError("at least one port is needed")
    for p in out:
        if not 1 <= p <= 65535:
            raise ValueError(f"not a TCP port: {p}")
    return out


def bpf_filter(ports: Iterable[int]) -> str:
    """The BPF filter (tcpdump syntax) admitting what the stream mapper needs on these ports."""
    ps = _ports(ports)

    def any_port(field: str) -> str:
        return "(" + " or ".join(f"{field} = {p}" for p in ps) + ")"

    # IPv4: libpcap's tcp[] follows the IHL and only looks at unfragmented (or first) fragments.
    src4, dst4 = any_port("tcp[0:2]"), any_port("tcp[2:2]")
    hlen4 = "((tcp[12:1] & 0xf0) >> 2)"
    v4 = (f"(ip and ({src4} or {dst4}) and ("
          f"(tcp[13] & 0x07) != 0"
          f" or ({dst4} and (ip[2:2] - ((ip[0] & 0x0f) << 2) - {hlen4}) != 0)"
          f" or ({src4} and tcp[{hlen4}:4] = 0x{HTTP_MAGIC:08x})))")
    # IPv6: the TCP header at offset 40, i.e. no extension headers.
    src6, dst6 = any_port("ip6[40:2]"), any_port("ip6[42:2]")
    hlen6 = "((ip6[52:1] & 0xf0) >> 2)"
    v6 = (f"(ip6 and ip6[6] = 6 and ({src6} or {dst6}) and ("
          f"(ip6[53] & 0x07) != 0"
          f" or ({dst6} and (ip6[4:2] - {hlen6}) != 0)"
          f" or ({src6} and ip6[40 + {hlen6}:4] = 0x{HTTP_MAGIC:08x})))")
    return f"{v4} or {v6}"


class _Capture:
    """What both capture backends share: waiting for frames, counting them, `with`."""

    def wait(self, timeout: float) -> bool:
        """Whether the capture became readable within timeout seconds (live handles only)."""
        r, _, _ = select.select([self.fileno()], [], [], timeout)
        return bool(r)

    def _tally(self, out: List[Captured]) -> List[Captured]:
        self.dispatches += 1
        self.frames += len(out)
        for c in out:
            self.bytes += c.wire_len
            if c.wire_len > len(c.data):
                self.truncated += 1
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Tap(_Capture):
    """A live (or offline) pcapy-ng capture handle reading frames for the stream mapper."""

    def __init__(self, iface: str, ports: Iterable[int], snaplen: int = 4096, buffer_size: int = 32 << 20,
                 timeout_ms: int = 1, pcap_out: Optional[str] = None, filter: Optional[str] = None,
                 _offline: Optional[str] = None) -> None:
        self.iface = iface
        self.ports = _ports(ports) if ports is not None else []
        self.snaplen = snaplen
        self.buffer_size = buffer_size
        self.filter = filter if filter is not None else (bpf_filter(self.ports) if self.ports else "")
        self.frames = 0
        self.bytes = 0
        self.truncated = 0
        self.dispatches = 0
        self._dumper = None
        self._closed = False
        self.live = _offline is None
        if _offline is not None:
            try:
                self._pcap = pcapy.open_offline(_offline)
            except pcapy.PcapError as exc:
                raise TapError("pcap", f"cannot read {_offline}: {exc}") from None
        else:
            if timeout_ms < 1:
                raise ValueError("timeout_ms must be at least 1 (0 delivers nothing with TPACKET_V3)")
            try:
                p = pcapy.create(iface)
                p.set_snaplen(snaplen)
                p.set_promisc(0)
                p.set_timeout(timeout_ms)
                p.set_buffer_size(buffer_size)
                status = p.activate()
            except pcapy.PcapError as exc:
                raise TapError("pcap", f"cannot capture on {iface}: {exc}") from None
            if status is not None and status < 0:
                raise self._activate_error(iface, status)
            self._pcap = p
        try:
            if self.filter:
                self._pcap.setfilter(self.filter)
            if self.live:
                self._pcap.setdirection(pcapy.PCAP_D_INOUT)
                self._pcap.setnonblock(1)
            if pcap_out:
                self._dumper = self._pcap.dump_open(str(pcap_out))
        except pcapy.PcapError as exc:
            self._pcap.close()
            raise TapError("pcap", f"cannot set up the capture on {iface}: {exc}") from None
        dlt = self._pcap.datalink()
        self.datalink = dlt
        self._strip = 0
        if dlt == pcapy.DLT_EN10MB:
            self.link = fp.LINK_ETHERNET
        elif dlt in DLT_RAW_VALUES:
            self.link = fp.LINK_RAW
        elif dlt == DLT_LINUX_SLL:  # the "any" device: a 16-byte cooked header, then IP
            self.link, self._strip = fp.LINK_RAW, 16
        elif dlt == DLT_LINUX_SLL2:
            self.link, self._strip = fp.LINK_RAW, 20
        else:
            self.close()
            raise TapError("pcap", f"cannot capture on {iface}: unsupported link type {dlt}")

    @staticmethod
    def _activate_error(iface: str, status: int) -> TapError:
        if status == -5:
            return TapError("no_such_device", f"no such interface: {iface}")
        if status in (-8, -11):
            return TapError("permission", f"no permission to capture on {iface} (needs root or CAP_NET_RAW)")
        if status == -9:
            return TapError("down", f"interface {iface} is down")
        return TapError("pcap", f"cannot capture on {iface}: {_PCAP_ERRORS.get(status, f'error {status}')}")

    @classmethod
    def offline(cls, path: str, ports: Optional[Iterable[int]] = None, filter: Optional[str] = None,
                pcap_out: Optional[str] = None) -> "Tap":
        """A tap reading a pcap file; with ports (or filter) the BPF filter applies."""
        return cls(str(path), ports, filter=filter, pcap_out=pcap_out, _offline=str(path))

    def fileno(self) -> int:
        return self._pcap.getfd()

    def read(self, max_frames: int = 1024) -> List[Captured]:
        """The frames captured so far, at most max_frames; an empty list when there are none."""
        out: List[Captured] = []
        strip = self._strip
        dumper = self._dumper

        def take(hdr, data):
            if dumper is not None:
                dumper.dump(hdr, data)
            sec, usec = hdr.getts()
            wire = hdr.getlen()
            if strip:
                data = data[strip:]
                wire -= strip
            out.append(Captured(sec + usec * 1e-6, data, wire))

        if self._closed:
            return out
        try:
            self._pcap.dispatch(max_frames, take)
        except pcapy.PcapError:
            if self.live:
                raise
        return self._tally(out)

    def stats(self) -> dict:
        """Kernel counters (received, dropped, ifdropped) and the adapter's own."""
        d = {"received": None, "dropped": None, "ifdropped": None, "frames": self.frames, "bytes": self.bytes,
             "truncated": self.truncated, "dispatches": self.dispatches, "snaplen": self.snaplen,
             "buffer_size": self.buffer_size}
        if self.live and not self._closed:
            try:
                d["received"], d["dropped"], d["ifdropped"] = self._pcap.stats()
            except pcapy.PcapError:
                pass
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._dumper is not None:
            self._dumper.close()
            self._dumper = None
        self._pcap.close()


# --- A timer-free live capture: one AF_PACKET socket with the same BPF program -------------

SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_STATISTICS = 6
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
ETH_P_ALL = 0x0003
_AUXDATA = struct.Struct("IIIHHHH")  # struct tpacket_auxdata


class SocketTap(_Capture):
    """The live capture without a ring: the filter compiled by libpcap (pcapy.compile) is
    attached to a plain AF_PACKET socket, and each admitted frame wakes the reader at once.

    Why it exists: a TPACKET_V3 ring (what libpcap uses) retires blocks on a kernel timer, and
    a shorter period cost the replica's bulk transfers more (1 ms: ~15 % of a bulk download;
    10 MB responses x1.08-1.29 at 10 ms, x1.05 at 200 ms), while a longer one delays seeing
    response heads, which are advertised to the support group. This socket has no timer and
    delivers each admitted frame at once, but in the same benchmark it was no cheaper (x1.20-
    1.46): the cost follows the tap process's wake-ups during transfers, not the timer alone.
    It stays as `appliance server --capture socket`. Same interface as Tap (fileno, wait,
    read, stats, close, link, datalink)."""

    def __init__(self, iface: str, ports: Iterable[int], snaplen: int = 4096, buffer_size: int = 32 << 20,
                 pcap_out: Optional[str] = None, filter: Optional[str] = None) -> None:
        self.iface = iface
        self.ports = _ports(ports) if ports is not None else []
        self.snaplen = snaplen
        self.buffer_size = buffer_size
        self.filter = filter if filter is not None else (bpf_filter(self.ports) if self.ports else "")
        self.frames = self.bytes = self.truncated = self.dispatches = 0
        self.live = True
        self._closed = False
        self.link, self.datalink = fp.LINK_ETHERNET, pcapy.DLT_EN10MB
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except PermissionError:
            raise TapError("permission", f"no permission to capture on {iface} (needs root or CAP_NET_RAW)") from None
        try:
            if self.filter:
                prog = pcapy.compile(pcapy.DLT_EN10MB, snaplen, self.filter, 1, 0).get_bpf()
                code = b"".join(struct.pack("HBBI", c, jt, jf, k) for c, jt, jf, k in prog)
                buf = ctypes.create_string_buffer(code)
                fprog = struct.pack("HL", len(prog), ctypes.addressof(buf))
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            else:  # no filter: still cut frames at snaplen
                ins = [(0x06, 0, 0, snaplen)]  # BPF_RET|BPF_K snaplen
                buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in ins))
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HL", 1, ctypes.addressof(buf)))
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_size)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
            sock.bind((iface, 0))
            # frames that arrived before the filter was attached may sit in the queue: drop them
            sock.setblocking(False)
            while True:
                try:
                    sock.recv(1)
                except BlockingIOError:
                    break
        except pcapy.PcapError as exc:
            sock.close()
            raise TapError("pcap", f"cannot compile the capture filter: {exc}") from None
        except OSError as exc:
            sock.close()
            if exc.errno == errno.ENODEV:
                raise TapError("no_such_device", f"no such interface: {iface}") from None
            if exc.errno == errno.ENETDOWN:
                raise TapError("down", f"interface {iface} is down") from None
            raise TapError("pcap", f"cannot capture on {iface}: {exc.strerror}") from None
        self._sock = sock
        self._buf = bytearray(snaplen)
        self._kernel = [0, 0]  # PACKET_STATISTICS resets on read: keep running totals
        self._pcap_out = _PcapWriter(pcap_out, snaplen) if pcap_out else None

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, max_frames: int = 1024) -> List[Captured]:
        out: List[Captured] = []
        if self._closed:
            return out
        anc = socket.CMSG_SPACE(_AUXDATA.size)
        for _ in range(max_frames):
            try:
                n, ancdata, _, _ = self._sock.recvmsg_into([self._buf], anc)
            except (BlockingIOError, InterruptedError):
                break
            ts = time.time()
            wire = n
            for level, kind, data in ancdata:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= _AUXDATA.size:
                    wire = _AUXDATA.unpack_from(data)[1]  # tp_len: the frame's length before the cut
            data = bytes(self._buf[:n])
            out.append(Captured(ts, data, wire))
            if self._pcap_out is not None:
                self._pcap_out.write(ts, data, wire)
        return self._tally(out)

    def stats(self) -> dict:
        d = {"received": None, "dropped": None, "ifdropped": 0, "frames": self.frames, "bytes": self.bytes,
             "truncated": self.truncated, "dispatches": self.dispatches, "snaplen": self.snaplen,
             "buffer_size": self.buffer_size, "backend": "socket"}
        if not self._closed:
            packets, drops = struct.unpack("II", self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
            self._kernel[0] += packets
            self._kernel[1] += drops
            d["received"], d["dropped"] = self._kernel
        return d

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._pcap_out is not None:
            self._pcap_out.close()


class _PcapWriter:
    """A classic pcap file (microsecond timestamps, Ethernet) that tcpdump and Wireshark read."""

    def __init__(self, path: str, snaplen: int) -> None:
        self._f = open(path, "wb")
        self._f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, pcapy.DLT_EN10MB))

    def write(self, ts: float, data: bytes, wire_len: int) -> None:
        sec = int(ts)
        self._f.write(struct.pack("<IIII", sec, int((ts - sec) * 1e6), len(data), wire_len) + data)
        self._f.flush()

    def close(self) -> None:
        self._f.close()
