"""Many HTTP/1.1 downloads at once from one process: one asyncio loop, one TCP connection each.

Run it in a client node of the lab (``lab.popen("c1", [sys.executable, "-m",
"appliance.manyget", ...])``)::

    python -m appliance.manyget --url http://10.70.1.2/obj-1m -n 1000 --out /tmp/r.json \\
        [--url URL ...] [--manifest objects.json] [--deadline 120] [--idle-timeout 0] \\
        [--gap-ms 50] [--max-connecting 256] [--connect-rate 0] [--progress /tmp/p.json] \\
        [--progress-interval 0.1]

* ``--url`` (repeatable) with ``-n N``: N connections, the URLs used in turn (one URL N times,
  or a list; ``-n`` defaults to the number of URLs). Each connection sends one ``GET`` (HTTP/1.1,
  keep-alive as curl does: no ``Connection`` header) and closes once the body is complete
  (``Content-Length``; without one, the body ends at the server's EOF). Chunked bodies are not
  decoded: such a connection ends with the error ``chunked``.
* The body is hashed (sha256) as it arrives, never held whole. Each connection records its
  status, body bytes, Content-Length, sha256, error (``reset``, ``eof`` = EOF before the end
  of the body, ``timeout`` = no byte for ``--idle-timeout`` s, ``connect: ...``, ``http: ...``,
  ``hung`` = still incomplete at the deadline or at SIGTERM) and the wall times
  (``time.time()``) of its start, connect, response head, first and last body byte.
* **The mark.** SIGUSR1 marks "the kill happened now" (``time.time()`` in the handler; the
  latest signal counts, all are listed in ``marks``). From then on each connection records
  ``bytes_at_mark``, ``last_byte_before_mark`` (wall), ``first_byte_after_mark`` (wall), and the
  gaps in its arrivals longer than ``--gap-ms`` that end after the mark (``gaps_after_mark``:
  [start, end] walls, the first 16, plus ``longest_gap_after_mark``): a failover is the end of
  the long pause; bytes already in the client's socket buffer or on the wire when the server
  died may arrive first. ``max_gap_before_mark`` is the longest ordinary pause before it.
* Connections open ``--max-connecting`` at a time, as fast as they are set up, or paced at
  ``--connect-rate`` per second (connection i opens i / rate s after the start).
* ``--deadline`` (s from the start): exit after it, every incomplete connection reported as
  ``hung``. SIGTERM / SIGINT: the same at once.
* ``--manifest``: a JSON object {path: [size, sha256hex]} (``lab.objects`` as JSON): each
  connection is then also ``intact`` (status 200, length and sha256 those of its path) or not.
* ``--progress PATH``: every ``--progress-interval`` s a small JSON snapshot (replaced
  atomically): connections opened, connected, with a head, done, failed, body bytes, the
  expected total (from the Content-Lengths seen so far), the mark.
* ``--out PATH``: the result at the end: ``{"summary": {...}, "connections": [...]}``.

RLIMIT_NOFILE is raised to N + 256 (up to the hard limit) before the first connection; the
exit status is 0 whatever the downloads did (the result file says it), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import signal
import sys
import time
from urllib.parse import urlsplit

HEAD_MAX = 64 << 10
GAPS_KEPT = 16


class _Conn(asyncio.Protocol):
    """One download: its state machine (head, body) and its record."""

    __slots__ = (
        "_gaps",
        "cid",
        "ended",
        "hasher",
        "head",
        "host",
        "last",
        "path",
        "port",
        "rec",
        "remaining",
        "run",
        "transport",
        "url",
    )

    def __init__(self, cid: int, url: str, run: Run) -> None:
        self.cid, self.url, self.run = cid, url, run
        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.transport = None
        self.head = bytearray()
        self.hasher = hashlib.sha256()
        self.last = None  # wall time of the latest body byte
        self.remaining = None  # body bytes still expected (None: until EOF, or no head yet)
        self.ended = False
        self._gaps = []
        self.rec = {"id": cid, "url": url, "local_port": None, "status": None, "content_length": None,
                    "bytes": 0, "sha256": None, "error": None, "complete": False, "started": None,
                    "connected": None, "head_at": None, "first_byte": None, "last_byte": None, "ended": None,
                    "bytes_at_mark": None, "last_byte_before_mark": None, "first_byte_after_mark": None,
                    "max_gap_before_mark": 0.0, "gaps_after_mark": self._gaps, "longest_gap_after_mark": None}

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        now = time.time()
        self.rec["connected"] = now
        try:
            self.rec["local_port"] = transport.get_extra_info("sockname")[1]
        except (TypeError, IndexError):
            pass
        self.run.connected += 1
        req = (f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUser-Agent: appliance-manyget\r\n"
               "Accept: */*\r\n\r\n").encode()
        transport.write(req)

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        if self.rec["head_at"] is None:
            self.head += data
            i = self.head.find(b"\r\n\r\n")
            if i < 0:
                if len(self.head) > HEAD_MAX:
                    self._finish("http: response head too long")
                return
            body = bytes(self.head[i + 4:])
            if not self._parse_head(bytes(self.head[:i])):
                return
            self.head = bytearray()
            if body:
                self._body(body)
            elif self.remaining == 0:
                self._finish(None)
            return
        self._body(data)

    def eof_received(self):
        if not self.ended:
            if self.rec["head_at"] is not None and self.remaining is None:
                self._finish(None)  # a body delimited by the close
            else:
                self._finish("eof")
        return False

    def connection_lost(self, exc) -> None:
        if self.ended:
            return
        if isinstance(exc, ConnectionResetError):
            self._finish("reset")
        elif exc is not None:
            self._finish(f"{type(exc).__name__}: {exc}")
        elif self.rec["head_at"] is not None and self.remaining is None:
            self._finish(None)
        else:
            self._finish("eof")

    # -- the response ---------------------------------------------------------------------------

    def _parse_head(self, raw: bytes) -> bool:
        self.rec["head_at"] = time.time()
        self.run.heads += 1
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            self._finish(f"http: bad status line {lines[0][:80]!r}")
            return False
        self.rec["status"] = int(parts[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                try:
                    length = int(value.strip())
                except ValueError:
                    self._finish(f"http: bad Content-Length {value.strip()[:40]!r}")
                    return False
            elif name == "transfer-encoding" and "chunked" in value.lower():
                self._finish("chunked")
                return False
        self.rec["content_length"] = length
        self.remaining = length
        if length is not None:
            self.run.expected_bytes += length
        return True

    def _body(self, data: bytes) -> None:
        now = time.time()
        n = len(data)
        rec = self.rec
        if self.remaining is not None and n > self.remaining:
            data = data[:self.remaining]
            n = len(data)
            rec["error_extra_bytes"] = True
        last = self.last
        mark = self.run.mark
        if last is None:
            rec["first_byte"] = now
        else:
            gap = now - last
            if mark is not None and now >= mark:
                if gap >= self.run.gap_s:
                    g = [last, now]
                    if len(self._gaps) < GAPS_KEPT:
                        self._gaps.append(g)
                    lg = rec["longest_gap_after_mark"]
                    if lg is None or gap > lg[1] - lg[0]:
                        rec["longest_gap_after_mark"] = g
            elif gap > rec["max_gap_before_mark"]:
                rec["max_gap_before_mark"] = gap
        if mark is not None and now >= mark and rec["first_byte_after_mark"] is None:
            rec["first_byte_after_mark"] = now
        self.last = now
        rec["last_byte"] = now
        rec["bytes"] += n
        self.run.bytes += n
        self.hasher.update(data)
        if self.remaining is not None:
            self.remaining -= n
            if self.remaining <= 0:
                self._finish(None)

    def on_mark(self, mark: float) -> None:
        """At the signal: where this connection stands."""
        rec = self.rec
        rec["bytes_at_mark"] = rec["bytes"]
        rec["last_byte_before_mark"] = self.last
        rec["first_byte_after_mark"] = None
        rec["longest_gap_after_mark"] = None
        self._gaps.clear()  # the pause in progress at the mark counts as a gap after it once it ends

    def _finish(self, error) -> None:
        if self.ended:
            return
        self.ended = True
        rec = self.rec
        rec["ended"] = time.time()
        rec["error"] = error
        rec["sha256"] = self.hasher.hexdigest()
        rec["complete"] = error is None
        self.run.ended_one(self, error)
        if self.transport is not None:
            if error is None:
                self.transport.close()
            else:
                self.transport.abort()

    def idle_check(self, now: float, idle_s: float) -> None:
        if self.ended or idle_s <= 0:
            return
        ref = self.last or self.rec["head_at"] or self.rec["connected"] or self.rec["started"]
        if ref is not None and now - ref > idle_s:
            self._finish("timeout")


class Run:
    def __init__(self, args, urls) -> None:
        self.args = args
        self.urls = urls
        self.gap_s = args.gap_ms / 1000.0
        self.mark = None
        self.marks = []
        self.conns = []
        self.connected = self.heads = self.done = self.failed = self.bytes = self.expected_bytes = 0
        self.opened = 0
        self.all_ended = None  # asyncio.Event
        self.stop = None
        self.started = time.time()
        self.manifest = None
        if args.manifest:
            with open(args.manifest) as f:
                self.manifest = {k: tuple(v) for k, v in json.load(f).items()}

    def ended_one(self, conn: _Conn, error) -> None:
        if error is None:
            self.done += 1
        else:
            self.failed += 1
        if self.done + self.failed >= len(self.urls) and self.all_ended is not None:
            self.all_ended.set()

    def on_mark(self, at: float | None = None) -> None:
        self.mark = time.time() if at is None else at
        self.marks.append(self.mark)
        for c in self.conns:
            c.on_mark(self.mark)

    def progress(self) -> dict:
        return {"t": time.time(), "n": len(self.urls), "opened": self.opened, "connected": self.connected,
                "heads": self.heads, "done": self.done, "failed": self.failed, "bytes": self.bytes,
                "expected_bytes": self.expected_bytes, "mark": self.mark, "pid": os.getpid()}

    def write_progress(self) -> None:
        if not self.args.progress:
            return
        tmp = self.args.progress + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(self.progress(), f)
            os.replace(tmp, self.args.progress)
        except OSError:
            pass

    async def _open(self, conn: _Conn, sem: asyncio.Semaphore, loop) -> None:
        if self.args.connect_rate > 0:  # paced: connection i opens i / rate seconds after the start
            await asyncio.sleep(max(0.0, self.started + conn.cid / self.args.connect_rate - time.time()))
        async with sem:
            if self.stop.is_set():
                return
            conn.rec["started"] = time.time()
            self.opened += 1
            try:
                await asyncio.wait_for(loop.create_connection(lambda: conn, conn.host, conn.port),
                                       self.args.connect_timeout)
            except TimeoutError:
                conn._finish("connect: timeout")
            except OSError as exc:
                conn._finish(f"connect: {exc.strerror or exc}")

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        self.all_ended = asyncio.Event()
        self.stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, self.on_mark)
        for at in _EARLY_MARKS:  # a signal before the loop ran (SIGUSR1 would otherwise kill us)
            self.on_mark(at)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        self.conns = [_Conn(i, u, self) for i, u in enumerate(self.urls)]
        sem = asyncio.Semaphore(max(1, self.args.max_connecting))
        openers = [loop.create_task(self._open(c, sem, loop)) for c in self.conns]
        deadline = self.started + self.args.deadline
        ticks = int(self.args.deadline / self.args.progress_interval) + 10
        for _ in range(ticks):  # bounded: the deadline, in progress intervals
            self.write_progress()
            now = time.time()
            if self.all_ended.is_set() or self.stop.is_set() or now >= deadline:
                break
            if self.args.idle_timeout > 0:
                for c in self.conns:
                    c.idle_check(now, self.args.idle_timeout)
            try:
                await asyncio.wait_for(self.all_ended.wait(), min(self.args.progress_interval, deadline - now))
            except TimeoutError:
                pass
        for t in openers:
            t.cancel()
        await asyncio.gather(*openers, return_exceptions=True)
        for c in self.conns:
            if not c.ended:
                c._finish("hung")
        self.write_progress()
        await asyncio.sleep(0)  # let the aborts run

    def result(self) -> dict:
        conns = [c.rec for c in self.conns]
        errors = {}
        for r in conns:
            if r["error"] is not None:
                key = r["error"].split(":")[0]
                errors[key] = errors.get(key, 0) + 1
        summary = {"n": len(conns), "complete": sum(1 for r in conns if r["complete"]), "errors": errors,
                   "bytes": self.bytes, "started": self.started, "ended": time.time(), "marks": self.marks,
                   "mark": self.mark, "gap_ms": self.args.gap_ms, "deadline_s": self.args.deadline,
                   "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}
        if self.manifest is not None:
            for r, c in zip(conns, self.conns):
                exp = self.manifest.get(urlsplit(c.url).path)
                r["intact"] = bool(exp and r["complete"] and r["status"] == 200 and r["bytes"] == exp[0]
                                   and r["sha256"] == exp[1])
            summary["intact"] = sum(1 for r in conns if r["intact"])
        if self.mark is not None:
            after = [r["first_byte_after_mark"] for r in conns if r["first_byte_after_mark"] is not None]
            summary["first_byte_after_mark_count"] = len(after)
            if after:
                summary["first_byte_after_mark_last"] = max(after)
        return {"summary": summary, "connections": conns}


_EARLY_MARKS = []


def raise_nofile(n: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 256
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main(argv=None) -> int:
    signal.signal(signal.SIGUSR1, lambda *_: _EARLY_MARKS.append(time.time()))
    ap = argparse.ArgumentParser(prog="python -m appliance.manyget", description=__doc__.splitlines()[0])
    ap.add_argument("--url", action="append", default=[], help="a URL (repeatable; used in turn)")
    ap.add_argument("--urls-file", help="a file of URLs, one a line")
    ap.add_argument("-n", type=int, default=None, help="connections (default: the number of URLs)")
    ap.add_argument("--out", required=True, help="the result file (JSON)")
    ap.add_argument("--manifest", help="JSON {path: [size, sha256hex]}: each connection is checked")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds from the start (then: hung)")
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    ap.add_argument("--idle-timeout", type=float, default=0.0, help="no byte this long: timeout (0: off)")
    ap.add_argument("--gap-ms", type=float, default=50.0, help="pauses after the mark longer than this are kept")
    ap.add_argument("--max-connecting", type=int, default=256, help="connections being set up at once")
    ap.add_argument("--connect-rate", type=float, default=0.0,
                    help="open at most this many connections per second (0: all at once, --max-connecting at a time)")
    ap.add_argument("--progress", help="a progress snapshot file (JSON, replaced atomically)")
    ap.add_argument("--progress-interval", type=float, default=0.1)
    args = ap.parse_args(argv)
    urls = list(args.url)
    if args.urls_file:
        with open(args.urls_file) as f:
            urls += [line.strip() for line in f if line.strip()]
    if not urls:
        print("manyget: no URL (--url or --urls-file)", file=sys.stderr)
        return 2
    n = args.n if args.n is not None else len(urls)
    if n < 1 or args.deadline <= 0 or args.progress_interval <= 0:
        print("manyget: -n, --deadline and --progress-interval must be positive", file=sys.stderr)
        return 2
    for u in urls:
        if urlsplit(u).scheme != "http" or not urlsplit(u).hostname:
            print(f"manyget: not an http:// URL: {u!r}", file=sys.stderr)
            return 2
    raise_nofile(n)
    run = Run(args, [urls[i % len(urls)] for i in range(n)])
    asyncio.run(run.main())
    res = run.result()
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
