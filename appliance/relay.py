"""The splice relay of a taken-over connection, on an asyncio event loop: no thread per connection.

After a takeover, the repaired client socket and the keep-alive connection to the local
HTTP server are joined both ways: local -> client carries the resumed body and then later
responses, client -> local carries later requests. `Relay` is what takeover.relay() does in
a worker thread, rebuilt as loop callbacks so that thousands of connections share one
thread and one epoll set (the default selector: no select(), descriptors above 1024 fine).

Guarantees:

* Bytes go socket -> pipe -> socket with splice(2) (SPLICE_F_MOVE | SPLICE_F_NONBLOCK), one
  pipe per direction (F_SETPIPE_SZ to pipe_size, else the pipe's own size), never through
  a Python buffer.
* Only readiness the relay can act on is registered: a source while its pipe has room, a
  sink while its pipe holds bytes. A pipe found full (splice into it EAGAIN while it holds
  data: a pipe has a fixed number of buffers and splice from TCP fills one per skb
  fragment, so "full" can be far below its capacity) stops reading the source until the
  sink took some. The idle timeout is one call_later re-armed lazily. A descriptor that
  keeps waking the loop without moving a byte ends the relay as "stalled" after
  `max_empty_wakeups` such wake-ups in a row.
* Ends, as `RelayResult.end`: "local closed" (the local side's FIN, its last bytes
  delivered), "client error: <strerror>" / "local error: <strerror>" (an error or a reset;
  the side is the one whose descriptor failed), "idle" (idle_timeout seconds without a byte
  either way), "stalled", or stop()'s reason. A client FIN is passed on as
  shutdown(SHUT_WR) of the local socket, and the relay goes on until the local side ends.
* At the end, whatever the cause: every descriptor unregistered from the loop, the timer
  cancelled, the pipes closed, `result` set, `done` resolved with it, on_end(result) called
  once. The sockets are left open and non-blocking: the caller closes them (not before
  the relay ended: the relay still has their descriptors registered).

Threading: construct, start() and stop() in the loop's thread, like every loop callback;
the callbacks (on_client_bytes, on_local_bytes, on_end) run there too. Nothing here locks.

    relay = Relay(loop, client_sock, local_sock, idle_timeout=300, on_client_bytes=progress,
                  on_end=lambda res: finished(res))
    relay.start()
    ...
    res = await relay.done            # RelayResult(to_client, to_local, end)
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Callable, NamedTuple, Optional

__all__ = ["Relay", "RelayResult", "PIPE_SIZE"]

PIPE_SIZE = 1 << 20
MAX_EMPTY_WAKEUPS = 1000

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_splice = os.splice  # a module attribute, so that a test can make it misbehave


class RelayResult(NamedTuple):
    to_client: int  # bytes written to the client
    to_local: int  # bytes written to the local server
    end: str  # why it ended


class _Dir:
    """One direction: its pipe and what the pipe holds. full: the last splice into the pipe
    found no buffer free, so reading the source only spins until the sink drains some."""

    __slots__ = ("src", "dst", "src_name", "dst_name", "r", "w", "cap", "pending", "moved", "eof", "full", "shut")

    def __init__(self, src: int, dst: int, src_name: str, dst_name: str, pipe_size: int) -> None:
        self.src, self.dst, self.src_name, self.dst_name = src, dst, src_name, dst_name
        self.r, self.w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.cap = fcntl.fcntl(self.w, _F_SETPIPE_SZ, pipe_size)
        except OSError:  # above pipe-max-size, or the user's pipe quota is used up
            try:
                self.cap = fcntl.fcntl(self.w, _F_GETPIPE_SZ)
            except OSError:
                self.cap = 65536
        self.pending = self.moved = 0
        self.eof = self.full = self.shut = False

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


class Relay:
    """Both directions of one taken-over connection, as callbacks on `loop` (see the module
    docstring for the guarantees). on_client_bytes(total) / on_local_bytes(total) get the
    running total after each write to that side and may stop() the relay; one that raises
    ends it as "internal error: ...". on_end(result) is called exactly once; what it raises
    goes to the loop's exception handler. `stats` counts wake-ups, empty ones and full-pipe
    pauses (the spin guard's evidence)."""

    max_empty_wakeups = MAX_EMPTY_WAKEUPS

    def __init__(self, loop, client_sock: socket.socket, local_sock: socket.socket, *,
                 idle_timeout: float = 300.0, pipe_size: int = PIPE_SIZE,
                 on_client_bytes: Optional[Callable[[int], None]] = None,
                 on_local_bytes: Optional[Callable[[int], None]] = None,
                 on_end: Optional[Callable[[RelayResult], None]] = None) -> None:
        if not idle_timeout > 0:
            raise ValueError("idle_timeout must be positive")
        if pipe_size < 4096:
            raise ValueError("pipe_size must be at least one page")
        self.loop = loop
        self.client, self.local = client_sock, local_sock
        self.idle_timeout, self.pipe_size = float(idle_timeout), int(pipe_size)
        self.on_client_bytes, self.on_local_bytes, self.on_end = on_client_bytes, on_local_bytes, on_end
        self.result: Optional[RelayResult] = None
        self.done = loop.create_future()
        # wakeups: callbacks run; empty_wakeups: of those, how many moved nothing;
        # full_waits: how often a full pipe paused its source
        self.stats = {"wakeups": 0, "empty_wakeups": 0, "full_waits": 0}
        self._down: Optional[_Dir] = None  # local -> client
        self._up: Optional[_Dir] = None  # client -> local
        self._readers: dict = {}  # fd -> _Dir, as registered with the loop
        self._writers: dict = {}
        self._timer = None
        self._last_move = 0.0
        self._empty = 0
        self._started = False

    @property
    def to_client(self) -> int:
        return self._down.moved if self._down is not None else 0

    @property
    def to_local(self) -> int:
        return self._up.moved if self._up is not None else 0

    def start(self) -> None:
        """Register with the loop; bytes already waiting in either socket move at once.
        Raises OSError (nothing left registered) if the pipes cannot be made."""
        if self._started:
            raise RuntimeError("relay already started")
        self._started = True
        if self.result is not None:  # stopped before it started
            return
        self.client.setblocking(False)
        self.local.setblocking(False)
        cfd, lfd = self.client.fileno(), self.local.fileno()
        self._down = _Dir(lfd, cfd, "local", "client", self.pipe_size)
        try:
            self._up = _Dir(cfd, lfd, "client", "local", self.pipe_size)
        except OSError:
            self._down.close()
            self._down = None
            raise
        self._last_move = self.loop.time()
        self._timer = self.loop.call_later(self.idle_timeout, self._on_timer)
        self._register()

    def stop(self, reason: str = "stopped") -> None:
        """End now (no-op once ended): what is still in the pipes is dropped."""
        self._finish(reason)

    # -- loop callbacks ----------------------------------------------------------------------

    def _on_readable(self, d: _Dir) -> None:
        if self.result is not None:
            return
        try:
            mark = self._mark()
            self._fill(d)
            if d.pending and self.result is None:
                self._drain(d)  # at once: the sink is usually writable, save a wake-up
            if self.result is None:
                self._settle(mark)
        except Exception as exc:  # noqa: BLE001  a callback's bug must still end the relay cleanly
            self._finish(f"internal error: {type(exc).__name__}: {exc}")

    def _on_writable(self, d: _Dir) -> None:
        if self.result is not None:
            return
        try:
            mark = self._mark()
            self._drain(d)
            if self.result is None:
                self._settle(mark)
        except Exception as exc:  # noqa: BLE001
            self._finish(f"internal error: {type(exc).__name__}: {exc}")

    def _on_timer(self) -> None:
        self._timer = None
        if self.result is not None:
            return
        due = self._last_move + self.idle_timeout
        now = self.loop.time()
        if now >= due:
            self._finish("idle")
        else:  # bytes moved since it was armed: one timer per idle period, not per byte
            self._timer = self.loop.call_later(due - now, self._on_timer)

    # -- moving bytes ------------------------------------------------------------------------

    def _fill(self, d: _Dir) -> None:
        try:
            n = _splice(d.src, d.w, d.cap - d.pending, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            if d.pending:  # readable, yet no room: the pipe's buffers are all taken
                d.full = True
                self.stats["full_waits"] += 1
            return
        except OSError as exc:
            self._finish(f"{d.src_name} error: {exc.strerror or exc}")
            return
        if n == 0:
            d.eof = True
        else:
            d.pending += n
            self._last_move = self.loop.time()

    def _drain(self, d: _Dir) -> None:
        try:
            n = _splice(d.r, d.dst, d.pending, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self._finish(f"{d.dst_name} error: {exc.strerror or exc}")
            return
        if n <= 0:
            return
        d.pending -= n
        d.moved += n
        d.full = False
        self._last_move = self.loop.time()
        cb = self.on_client_bytes if d is self._down else self.on_local_bytes
        if cb is not None:
            cb(d.moved)  # may stop() the relay: callers check self.result after this

    def _mark(self) -> tuple:
        down, up = self._down, self._up
        return (down.moved, up.moved, down.pending, up.pending, down.eof, up.eof)

    def _settle(self, mark: tuple) -> None:
        """After a callback: the ends, the client's FIN, the spin guard, the registrations."""
        down, up = self._down, self._up
        if down.eof and not down.pending:
            self._finish("local closed")
            return
        if up.eof and not up.pending and not up.shut:
            up.shut = True
            try:
                self.local.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the local side is gone: its own error or FIN ends the relay
        if self._mark() != mark:
            self._empty = 0
        else:  # woken for nothing: a hang-up or error no splice reports; bounded
            self._empty += 1
            self.stats["empty_wakeups"] += 1
            if self._empty > self.max_empty_wakeups:
                self._finish("stalled")
                return
        self.stats["wakeups"] += 1
        self._register()

    def _register(self) -> None:
        """Bring the loop's registrations in line with what each direction can do now."""
        want_r, want_w = {}, {}
        for d in (self._down, self._up):
            if not d.eof and not d.full and d.pending < d.cap:
                want_r[d.src] = d
            if d.pending:
                want_w[d.dst] = d
        loop = self.loop
        for fd in [fd for fd in self._readers if fd not in want_r]:
            del self._readers[fd]
            loop.remove_reader(fd)
        for fd in [fd for fd in self._writers if fd not in want_w]:
            del self._writers[fd]
            loop.remove_writer(fd)
        for fd, d in want_r.items():
            if fd not in self._readers:
                self._readers[fd] = d
                loop.add_reader(fd, self._on_readable, d)
        for fd, d in want_w.items():
            if fd not in self._writers:
                self._writers[fd] = d
                loop.add_writer(fd, self._on_writable, d)
        if not self._readers and not self._writers:  # both directions finished: nothing can happen
            self._finish("closed")

    def _finish(self, end: str) -> None:
        if self.result is not None:
            return
        loop = self.loop
        for fd in self._readers:
            loop.remove_reader(fd)
        for fd in self._writers:
            loop.remove_writer(fd)
        self._readers.clear()
        self._writers.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for d in (self._down, self._up):
            if d is not None:
                d.close()
        self.result = RelayResult(self.to_client, self.to_local, end)
        if not self.done.done():
            try:
                self.done.set_result(self.result)
            except RuntimeError:  # stopped after the loop was closed: nobody can await it
                pass
        if self.on_end is not None:
            try:
                self.on_end(self.result)
            except Exception as exc:  # noqa: BLE001  reported, never raised into the loop's selector
                loop.call_exception_handler({"message": "Relay on_end callback failed", "exception": exc})
