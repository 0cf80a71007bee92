"""The inline bridge: two AF_PACKET ports, frames forwarded under a flow table's verdicts.

Each port is one AF_PACKET socket used for both receive and send, with
PACKET_IGNORE_OUTGOING (so a frame we send is not read back) and, by default,
PACKET_VNET_HDR: frames then carry a virtio_net_hdr, GSO super-frames and partial
checksums pass through intact and endpoint offloads can stay on (packet-io.md §2.1).
One forwarding thread per direction: the compiled build's Forwarder (recvmmsg/sendmmsg
in C, GIL released) or, on the pure-Python build, PyForwarder with the same interface.
Frames the table gives to Python reach punt(direction, frame, vnet_hdr) in the
forwarding thread; the handler sends what it wants with Bridge.send().
When the table tracks connections (FlowTable(conntrack=True)), each forwarder classifies
with its direction (fp.OUT for frames from the client side, fp.IN for the network's), and
a client SYN the engine tags with Migrate-Permitted grows in its buffer before it is sent.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import sys
import termios
import threading
import time

import _fastpath

SOL_PACKET = 263
PACKET_STATISTICS = 6
MARK_KEEP = 1.0  # seconds a count of queued frames is kept for later deadlines
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
ETH_P_ALL = 0x0003
VNET_HDR_LEN = 10
VNET_F_NEEDS_CSUM = 1
NO_OFFLOAD = bytes(VNET_HDR_LEN)  # a virtio_net_hdr asking nothing of the kernel
RCV_TIMEOUT = 0.1  # seconds; how soon a forwarding thread notices stop()
SOCKET_BUFFER = 8 << 20

OUT, IN = "out", "in"  # client side -> network, network -> client side

try:
    from appliance import _bridge
except ImportError:  # pure-Python install
    _bridge = None


class PortError(OSError):
    """A port could not be opened; the message names the interface and the reason."""


def open_port(ifname: str, vnet: bool = True) -> socket.socket:
    """An AF_PACKET socket bound to ifname, for both directions, with a receive timeout."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except PermissionError:
        raise PortError(errno.EPERM, "opening an AF_PACKET socket needs CAP_NET_RAW (run as root)") from None
    try:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        if vnet:
            sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        for opt, forced in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_*BUFFORCE
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, SOCKET_BUFFER)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sec = int(RCV_TIMEOUT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", sec, int((RCV_TIMEOUT - sec) * 1e6)))
        sock.bind((ifname, 0))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENODEV:
            raise PortError(exc.errno, f"no such interface: {ifname}") from None
        raise PortError(exc.errno, f"cannot open port {ifname}: {exc.strerror}") from None
    return sock


class PyForwarder:
    """The pure-Python twin of _bridge.Forwarder: same constructor, run(), stop(), stats().
    It hands punted frames to punt in its own loop (it runs in Python anyway): no queue, so
    punt_drops and punt_queue_peak stay 0."""

    STAT_NAMES = ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "tx_errors", "dropped", "to_python",
                  "truncated", "batches", "rx_errors", "last_errno", "punt_drops", "punt_queue_peak")

    def __init__(self, rx_fd: int, tx_fd: int, table, punt=None, vnet: bool = False, batch: int = 64,
                 spin_us: float = 0.0, direction=None) -> None:
        self.direction = direction  # fp.OUT / fp.IN: classify_frame() with it; None: classify() as before
        _fastpath.check_direction(direction)
        self.rx = socket.socket(fileno=os.dup(rx_fd))
        self.tx = socket.socket(fileno=os.dup(tx_fd))
        self.table, self.punt, self.vnet = table, punt, vnet
        self.hdr = VNET_HDR_LEN if vnet else 0
        self._stopping = False
        self._stats = dict.fromkeys(self.STAT_NAMES, 0)
        self._idle = False
        self._drained_at = 0.0

    def stop(self) -> None:
        self._stopping = True

    def received(self) -> int:
        """Frames taken from the receive socket so far."""
        return self._stats["rx_frames"]

    def caught_up(self, t: float) -> bool:
        """Has every frame that reached the receive socket before monotonic time t been
        classified and handed to punt?"""
        if self._drained_at >= t:
            return True
        if self._idle:
            try:
                pending = fcntl.ioctl(self.rx.fileno(), termios.FIONREAD, b"\0\0\0\0")
            except OSError:
                return False
            return int.from_bytes(pending, sys.byteorder) == 0
        return False

    def stats(self) -> dict:
        return dict(self._stats)

    def run(self) -> dict:
        buf = bytearray(65536 + 256)
        mv = memoryview(buf)
        st, hdr, classify = self._stats, self.hdr, self.table.classify
        direction, classify_frame, room = self.direction, self.table.classify_frame, len(buf) - self.hdr
        try:
            while not self._stopping:
                # one frame per receive: the queue is empty only when a receive times out
                self._idle = True
                before = time.monotonic()
                try:
                    n, flags = self.rx.recvmsg_into([buf])[0:3:2]
                except (BlockingIOError, InterruptedError, socket.timeout):
                    self._idle = False
                    self._drained_at = before
                    continue
                except OSError as exc:
                    self._idle = False
                    st["rx_errors"] += 1
                    st["last_errno"] = exc.errno or 0
                    if exc.errno in (errno.EBADF, errno.ENOTSOCK):
                        break
                    time.sleep(0.01)
                    continue
                self._idle = False
                st["batches"] += 1
                st["rx_frames"] += 1
                st["rx_bytes"] += n
                if flags & socket.MSG_TRUNC or n < hdr:
                    st["truncated"] += 1
                    continue
                partial = bool(hdr and buf[0] & VNET_F_NEEDS_CSUM)
                if direction is None:
                    frame = mv[hdr:n]
                    verdict = classify(frame, time.monotonic(), partial)
                else:  # the frame may grow in buf (a tagged SYN)
                    verdict, length = classify_frame(mv[hdr:], n - hdr, room, time.monotonic(), partial, direction)
                    n = hdr + length
                    frame = mv[hdr:n]
                if verdict in (_fastpath.PASS, _fastpath.REWRITE):
                    try:
                        self.tx.send(mv[:n])
                        st["tx_frames"] += 1
                        st["tx_bytes"] += n - hdr
                    except OSError as exc:  # ENOBUFS from a full qdisc, EMSGSIZE: count, carry on
                        st["tx_errors"] += 1
                        st["last_errno"] = exc.errno or 0
                elif verdict == _fastpath.PYTHON:
                    st["to_python"] += 1
                    if self.punt is not None:
                        try:
                            self.punt(bytearray(frame), bytes(buf[:hdr]))
                        except Exception as exc:  # noqa: BLE001  forwarding goes on
                            print(f"bridge: punt handler failed: {exc!r}", file=sys.stderr)
                else:
                    st["dropped"] += 1
        finally:
            self.rx.close()
            self.tx.close()
        return self.stats()


def forwarder_class():
    """The compiled Forwarder when the compiled engine is loaded, else PyForwarder."""
    if _fastpath.BUILD == "c" and _bridge is not None:
        return _bridge.Forwarder
    return PyForwarder


class Bridge:
    """Two ports joined by two forwarding threads; the table decides for every frame."""

    def __init__(self, client_if: str, net_if: str, table, punt=None, vnet: bool = True, batch: int = 64,
                 spin_us: float = 0.0) -> None:
        self.names = {OUT: client_if, IN: net_if}
        self.vnet = vnet
        self.table = table
        self.punt = punt
        self.ports = {}
        try:
            self.ports[OUT] = open_port(client_if, vnet)  # receives what the client sends
            self.ports[IN] = open_port(net_if, vnet)
        except Exception:
            self.close()
            raise
        cls = forwarder_class()
        self.kind = "c" if cls is not PyForwarder else "py"
        # a conntrack table needs each frame's direction; any other is classified as before
        self.conntrack = bool(getattr(table, "conntrack", False))
        engine_dir = {OUT: _fastpath.OUT, IN: _fastpath.IN} if self.conntrack else {OUT: None, IN: None}
        self.forwarders = {
            direction: cls(self.ports[direction].fileno(), self.ports[_other(direction)].fileno(), table,
                           self._punter(direction), vnet, batch, spin_us, direction=engine_dir[direction])
            for direction in (OUT, IN)
        }
        self.threads = {}
        self._queued = {OUT: 0, IN: 0}  # frames the kernel queued on each port (PACKET_STATISTICS totals)
        self._kernel_drops = {OUT: 0, IN: 0}  # ... and those it dropped, the receive queue full
        self._stats_lock = threading.Lock()
        self._marks = {OUT: [], IN: []}  # (monotonic time, queued by then), recent first-to-last
        self._send_lock = threading.Lock()
        self.sent_by_python = {OUT: 0, IN: 0}
        self.send_errors = 0

    def _punter(self, direction: str):
        if self.punt is None:
            return None
        return lambda frame, vnet_hdr: self.punt(direction, frame, vnet_hdr)

    def start(self) -> None:
        for direction, fwd in self.forwarders.items():
            t = threading.Thread(target=fwd.run, name=f"bridge-{direction}", daemon=True)
            t.start()
            self.threads[direction] = t

    def send(self, direction: str, frame, vnet_hdr: bytes = NO_OFFLOAD) -> bool:
        """Send a frame onward in a direction (OUT: toward the network, IN: toward the client)."""
        sock = self.ports[_other(direction)]
        data = (bytes(vnet_hdr) if self.vnet else b"") + bytes(frame)
        try:
            with self._send_lock:
                sock.send(data)
            self.sent_by_python[direction] += 1
            return True
        except OSError:
            self.send_errors += 1
            return False

    def caught_up(self, direction: str, t: float) -> bool:
        """Has the `direction` forwarder handled every frame received before monotonic time t?

        Its own answer covers a queue it has emptied (or waits on); under steady load the queue
        never empties, so the kernel's count of frames queued on the port (PACKET_STATISTICS,
        read once at or after t) is compared with the frames the forwarder has taken: frames
        leave the queue in order, so once it has taken that many, it has taken every frame
        that arrived before t."""
        fwd = self.forwarders[direction]
        if fwd.caught_up(t):
            return True
        target = self._queued_by(direction, t)
        return target is not None and fwd.received() >= target

    def _queued_by(self, direction: str, t: float):
        """How many frames had been queued on the port by a moment at or after t (None: unknown)."""
        marks = self._marks[direction]
        for when, count in marks:
            if when >= t:
                return count
        if not self._read_kernel(direction):
            return None
        now = time.monotonic()
        marks.append((now, self._queued[direction]))
        while marks and marks[0][0] < now - MARK_KEEP:
            marks.pop(0)
        return self._queued[direction]

    def _read_kernel(self, direction: str) -> bool:
        """Add the kernel's PACKET_STATISTICS of a port to the running totals (it resets
        them on every read)."""
        with self._stats_lock:  # the status thread reads them too: no lost update
            try:
                packets, drops = struct.unpack("II", self.ports[direction].getsockopt(SOL_PACKET, PACKET_STATISTICS,
                                                                                      8))
            except (OSError, KeyError, struct.error):
                return False
            self._queued[direction] += packets - drops
            self._kernel_drops[direction] += drops
        return True

    def stop(self, timeout: float = 2.0) -> None:
        for fwd in self.forwarders.values():
            fwd.stop()
        for t in self.threads.values():
            t.join(timeout)

    def close(self) -> None:
        if self.threads:
            self.stop()
        for sock in self.ports.values():
            sock.close()
        self.ports = {}

    def stats(self) -> dict:
        out = {direction: fwd.stats() for direction, fwd in getattr(self, "forwarders", {}).items()}
        for direction in out:
            self._read_kernel(direction)
            out[direction]["kernel_drops"] = self._kernel_drops[direction]
        out["kind"] = getattr(self, "kind", None)
        out["vnet"] = self.vnet
        out["sent_by_python"] = dict(self.sent_by_python)
        out["send_errors"] = self.send_errors
        return out


def _other(direction: str) -> str:
    return IN if direction == OUT else OUT
