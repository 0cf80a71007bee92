"""The lab's embedded HTTP/1.1 server: static files over a docroot, with byte ranges.

Built on ``http.server.ThreadingHTTPServer``. What a migrating connection needs from a
replica's server, and what nginx also does:

* HTTP/1.1 keep-alive (``protocol_version = "HTTP/1.1"``), GET and HEAD; other methods 501.
* ``Content-Length`` on every response (but ``?chunked=1``, below), ``Accept-Ranges: bytes``,
  ``Last-Modified`` and an nginx-style ``ETag`` ``"<mtime hex>-<size hex>"``, so one object has
  the same validators on every replica sharing the docroot or holding a copy with the same
  mtime (and the same as nginx's).
* One byte range (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) -> 206 with ``Content-Range``;
  a range starting at or past the end (or ``-0``) -> 416 with ``Content-Range: bytes */size``;
  several ranges, a syntactically invalid range or another unit -> 200 with the whole body.
  ``If-Range`` (an ETag, compared strongly, or an HTTP date equal to Last-Modified) honoured:
  no match -> 200 with the whole body.
* The body leaves with ``socket.sendfile`` on a blocking socket (one ``sendfile(2)`` call for
  the whole body, no Python loop per chunk), corked together with the header
  (TCP_CORK), so a small response is one segment and never waits for a delayed ACK.
* Path traversal (``..`` segments, symlinks leaving the root, NUL) and directories -> 404.
* Idle keep-alive connections are closed after ``idle_timeout`` seconds (SO_RCVTIMEO, so
  the socket stays blocking for sendfile).
* Quiet: no per-request logging unless an access log file is given.

Test knobs, chosen by the URL's query string (the query never takes part in finding the
file: ``/obj-1m?chunked=1`` is ``/obj-1m``); both may be combined, e.g.
``/obj-1m?chunked=1&delay_ms=500``:

* ``chunked=1``: the response carries ``Transfer-Encoding: chunked`` and no
  ``Content-Length``; a GET body is written in 64 KiB chunks (a Python loop over the file,
  no sendfile) and ends with the last chunk (``0`` CRLF CRLF, no trailers). Range and
  If-Range are ignored (always 200 with the whole body); ETag, Last-Modified and keep-alive
  are as usual. A HEAD gets the same head and no body. ``chunked=0`` is the normal path.
* ``delay_ms=N`` (integer, 0..60000): sleep N ms after reading the request and before
  writing the response head (a slow server: a crash can land between the request and the
  response head). Applies to every answer of a GET/HEAD, 404 included.
* Any other value of these two parameters -> 400; other query parameters are ignored.

Run: ``python -m appliance.httpserver --root DIR --bind ADDR --port 80 [--access-log FILE]``.
In-process (tests)::

    srv = make_server(root, "127.0.0.1", 0)          # port 0: ephemeral, srv.server_port
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    ...; srv.shutdown(); srv.server_close()
"""

from __future__ import annotations

import argparse
import email.utils
import mimetypes
import os
import re
import signal
import socket
import stat
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVER_VERSION = "appliance-httpserver/1"
CHUNK_SIZE = 64 * 1024  # the chunk size of ?chunked=1 responses
MAX_DELAY_MS = 60000


def etag_for(st: os.stat_result) -> str:
    """nginx's ETag: '"<mtime hex>-<size hex>"' (integer seconds, lower-case hex)."""
    return f'"{int(st.st_mtime):x}-{st.st_size:x}"'


def http_date(ts: float) -> str:
    return email.utils.formatdate(int(ts), usegmt=True)


_RANGE_RE = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


def parse_range(header: str | None, size: int):
    """Interpret a Range header against a body of `size` bytes.

    Returns None (serve the whole body with 200), "unsatisfiable" (416), or (first, last)
    inclusive byte positions for a 206.
    """
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = spec.split(",")
    if len(parts) != 1:
        return None  # several ranges: the whole body (no multipart/byteranges)
    m = _RANGE_RE.fullmatch(parts[0])
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    if m.group(1) == "":  # suffix: the last n bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - n), size - 1)
    first = int(m.group(1))
    if m.group(2) != "":
        last = int(m.group(2))
        if last < first:
            return None  # invalid: ignore the header (RFC 7233 §3.1)
    else:
        last = size - 1
    if first >= size:
        return "unsatisfiable"
    return (first, min(last, size - 1))


def parse_knobs(query: str):
    """The test knobs of a URL's query string -> {"chunked": bool, "delay_ms": int}.

    ValueError (-> 400) for a bad value of either knob; other parameters are ignored.
    """
    knobs = {"chunked": False, "delay_ms": 0}
    for key, value in urllib.parse.parse_qsl(query or "", keep_blank_values=True):
        if key == "chunked":
            if value not in ("0", "1"):
                raise ValueError(f"chunked: want 0 or 1, got {value!r}")
            knobs["chunked"] = value == "1"
        elif key == "delay_ms":
            if not re.fullmatch(r"\d{1,5}", value) or int(value) > MAX_DELAY_MS:
                raise ValueError(f"delay_ms: want an integer 0..{MAX_DELAY_MS}, got {value!r}")
            knobs["delay_ms"] = int(value)
    return knobs


def if_range_matches(value: str, etag: str, mtime: float) -> bool:
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return value == etag  # strong comparison: a weak tag never matches
    try:
        dt = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return False
    if dt is None:
        return False
    return int(dt.timestamp()) == int(mtime)


class DocrootHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = SERVER_VERSION
    sys_version = ""

    def version_string(self):
        return self.server_version

    # -- connection setup: blocking socket, idle timeout via SO_RCVTIMEO, NODELAY -----------

    def setup(self):
        super().setup()
        sock = self.connection
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            idle = float(getattr(self.server, "idle_timeout", 0) or 0)
            if idle > 0:
                sec = int(idle)
                usec = int((idle - sec) * 1e6)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, usec))
        except OSError:
            pass

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError, BlockingIOError):
            self.close_connection = True
        except OSError:
            self.close_connection = True

    # -- logging: quiet unless the server has an access log --------------------------------

    def log_message(self, format, *args):  # noqa: A002  (BaseHTTPRequestHandler's signature)
        log = getattr(self.server, "access_log", None)
        if log is not None:
            line = "%s - - [%s] %s\n" % (self.address_string(), self.log_date_time_string(), format % args)
            with self.server.log_lock:
                log.write(line)
                log.flush()

    # -- responses --------------------------------------------------------------------------

    def _cork(self, on: bool) -> None:
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
        except OSError:
            pass

    def _simple(self, code: int, body: bytes = b"", headers=()) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _resolve(self):
        """The file for the request path, or None (-> 404)."""
        raw = urllib.parse.urlsplit(self.path).path
        path = urllib.parse.unquote(raw)
        if not path.startswith("/") or "\x00" in path:
            return None
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            return None
        root = self.server.root_real
        full = os.path.realpath(os.path.join(root, *parts))
        if full != root and not full.startswith(root + os.sep):
            return None
        return full

    def do_GET(self):  # noqa: N802
        self._serve(body=True)

    def do_HEAD(self):  # noqa: N802
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        try:
            knobs = parse_knobs(urllib.parse.urlsplit(self.path).query)
        except ValueError as exc:
            self._simple(400, f"bad request: {exc}\n".encode())
            return
        if knobs["delay_ms"]:
            time.sleep(knobs["delay_ms"] / 1000.0)  # a slow server: nothing written yet
        full = self._resolve()
        f = None
        if full is not None:
            try:
                f = open(full, "rb")
            except OSError:
                f = None
        if f is None:
            self._simple(404, b"not found\n")
            return
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                self._simple(404, b"not found\n")
                return
            size = st.st_size
            etag = etag_for(st)
            last_modified = http_date(st.st_mtime)
            ctype = mimetypes.guess_type(full)[0] or "application/octet-stream"
            if knobs["chunked"]:
                self._serve_chunked(f, size, ctype, etag, last_modified, body)
                return
            rng = parse_range(self.headers.get("Range"), size)
            if rng is not None:
                if_range = self.headers.get("If-Range")
                if if_range is not None and not if_range_matches(if_range, etag, st.st_mtime):
                    rng = None
            if rng == "unsatisfiable":
                self._simple(416, b"", headers=[("Content-Range", f"bytes */{size}"), ("Accept-Ranges", "bytes")])
                return
            if rng is None:
                code, offset, count = 200, 0, size
            else:
                code, offset, count = 206, rng[0], rng[1] - rng[0] + 1
            self._cork(True)
            try:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(count))
                if code == 206:
                    self.send_header("Content-Range", f"bytes {offset}-{offset + count - 1}/{size}")
                self.send_header("Last-Modified", last_modified)
                self.send_header("ETag", etag)
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if body and count:
                    self.connection.sendfile(f, offset, count)
            finally:
                self._cork(False)

    def _serve_chunked(self, f, size: int, ctype: str, etag: str, last_modified: str, body: bool) -> None:
        """?chunked=1: 200, Transfer-Encoding: chunked, the file in CHUNK_SIZE chunks (Range ignored)."""
        self._cork(True)
        try:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Last-Modified", last_modified)
            self.send_header("ETag", etag)
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            left = size
            for _ in range(size // CHUNK_SIZE + 2):  # bounded: the size read by fstat
                data = f.read(min(CHUNK_SIZE, left)) if left > 0 else b""
                if not data:
                    break
                left -= len(data)
                self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        finally:
            self._cork(False)


class DocrootHTTPServer(ThreadingHTTPServer):
    """A threading HTTP/1.1 server of one docroot."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, server_address, root, access_log=None, idle_timeout: float = 75.0,
                 handler=DocrootHandler, bind_and_activate=True):
        self.root = os.fspath(root)
        self.root_real = os.path.realpath(self.root)
        self.idle_timeout = idle_timeout
        self.log_lock = threading.Lock()
        self.access_log = open(access_log, "a") if access_log else None
        super().__init__(server_address, handler, bind_and_activate)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, BlockingIOError)):
            return
        super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        if self.access_log is not None:
            self.access_log.close()
            self.access_log = None


def make_server(root, bind: str = "127.0.0.1", port: int = 0, access_log=None,
                idle_timeout: float = 75.0) -> DocrootHTTPServer:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"docroot {root} is not a directory")
    return DocrootHTTPServer((bind, port), root, access_log=access_log, idle_timeout=idle_timeout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m appliance.httpserver", description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="docroot directory")
    p.add_argument("--bind", default="0.0.0.0", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--access-log", help="append an access log line per request to this file")
    p.add_argument("--idle-timeout", type=float, default=75.0, help="close idle keep-alive connections (s)")
    args = p.parse_args(argv)
    try:
        srv = make_server(args.root, args.bind, args.port, args.access_log, args.idle_timeout)
    except OSError as exc:
        print(f"httpserver: cannot serve {args.root} on {args.bind}:{args.port}: {exc}", file=sys.stderr)
        return 1

    def _stop(signum, frame):
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    print(f"httpserver: serving {args.root} on {args.bind}:{srv.server_port}", file=sys.stderr, flush=True)
    try:
        srv.serve_forever(poll_interval=0.25)
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
