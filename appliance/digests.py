"""Content digests of the objects a replica serves, for the ``digest`` validators level.

Before a taker splices its copy of an object into a client's stream it must know its bytes
are the dead replica's. Headers cannot tell: equal Content-Length, ETag and Last-Modified
can describe different bytes (same size, mtime restored), and lighttpd's ETag includes the
inode, so identical copies on two hosts look different. A sha-256 of the bytes can tell.
Each server appliance keeps one per object of its HTTP server's docroot
(``service.docroot``), computed ahead of need; the advertiser puts it in what it tells the
group and a taker resumes only if its own digest of the object is equal.

What each piece guarantees:

* ``resolve_target(root_real, target)`` / ``url_to_file(root, target)``: the file a request
  target names, resolved exactly as ``appliance.httpserver`` resolves it (its ``_resolve``):
  ``urlsplit(target).path`` (so the query string is ignored, and so is an absolute-form
  scheme and authority), percent-decoded; a path not starting with ``/``, a NUL, any ``..``
  segment, or a symlink that leaves the root gives None. ``url_to_file`` also gives None
  unless the result is a regular file (directories, FIFOs, missing files).
* ``DigestCache``: ``lookup()`` never hashes; it returns a digest only if it was computed
  for the file's CURRENT identity (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns).
  ctime is in the identity because a rewrite in place with the same size and a restored
  mtime (``os.utime``) keeps the other four; ctime changes on every write and no system
  call can set it. Two more rules keep a cached digest true to the bytes:
  a file whose identity differs before and after hashing is not cached, and neither is one
  whose ctime is so recent (within ``racy`` seconds of the start of hashing, two more
  seconds on a file system with whole-second timestamps) that a later write in the same
  timestamp tick could leave ctime unchanged (git's "racy clean" problem): it is hashed
  again once it is old enough. What stat cannot see (writes through a shared mmap, whose
  timestamps the kernel updates lazily; a remote file server whose clock lags ours by
  more than ``racy``) it cannot guard against.
* ``parse_digest_header`` / ``format_digest``: RFC 9530 ``Repr-Digest`` / ``Content-Digest``
  values, parsed as RFC 8941 Structured Fields dictionaries (a malformed field is ignored
  as a whole, as RFC 8941 says); only a ``sha-256`` byte sequence of exactly 32 bytes
  counts. ``parse_legacy_digest``: RFC 3230 ``Digest: SHA-256=<base64>``.
* ``response_digest(headers, status)``: the sha-256 of the whole object, only when a
  header says it unambiguously (see its docstring), otherwise None: a None means "compute
  it from the file", never "different".

    cache = DigestCache(cfg.service.docroot); cache.start()
    cache.lookup("/obj-10m")        # None until hashed (and queued), then 32 bytes
    cache.digest_now("/obj-10m", timeout=2.0)
    cache.stop()
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import os
import stat
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Mapping, Optional

__all__ = [
    "DIGEST_LEN", "CHUNK", "DigestCache", "resolve_target", "url_to_file",
    "parse_digest_header", "parse_legacy_digest", "format_digest", "response_digest",
    "file_digest",
]

DIGEST_LEN = 32  # sha-256
CHUNK = 1024 * 1024  # hashlib releases the GIL for updates this large
RACY = 0.1  # s: far more than a kernel timestamp tick (a jiffy, 1 to 10 ms)
COARSE_EXTRA = 2.0  # s: added where ctime has whole seconds only (1 s or 2 s granularity)
MAX_FILES = 100_000  # entries a walk visits, digests kept
MAX_DEPTH = 32
MAX_QUEUE = 10_000
BACKOFF = 0.25  # s: the second retry of a changing file; doubles up to `rescan`


# --- Request target -> file ----------------------------------------------------------------


def resolve_target(root_real: str, target: str) -> Optional[str]:
    """The real path a request target names under `root_real` (itself a realpath), or None.

    The embedded server's rule, step for step, so that the appliance digests the very
    file the server would send (existence and type not checked: see url_to_file)."""
    raw = urllib.parse.urlsplit(target).path
    path = urllib.parse.unquote(raw)
    if not path.startswith("/") or "\x00" in path:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    full = os.path.realpath(os.path.join(root_real, *parts))
    if full != root_real and not full.startswith(root_real + os.sep):
        return None
    return full


def url_to_file(root, url_path: str) -> Optional[Path]:
    """The regular file under `root` that `url_path` names, or None (the server's 404)."""
    if not isinstance(url_path, str):
        return None
    try:
        full = resolve_target(os.path.realpath(os.fspath(root)), url_path)
        if full is None or not stat.S_ISREG(os.stat(full).st_mode):
            return None
    except (OSError, ValueError):
        return None
    return Path(full)


# --- Hashing -------------------------------------------------------------------------------


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _racy_margin_ns(ctime_ns: int, racy: float) -> int:
    """How old a ctime must be before a write after it is sure to change it."""
    margin = racy
    if ctime_ns % 1_000_000_000 == 0:  # whole seconds: a coarse file system (or a 1-in-1e9 fluke)
        margin += COARSE_EXTRA
    return int(margin * 1e9)


class _Result:
    __slots__ = ("status", "identity", "digest", "nbytes", "retry_at")

    def __init__(self, status, identity=None, digest=None, nbytes=0, retry_at=None):
        self.status = status      # ok, racy, changed, error, notfile, timeout, stopped
        self.identity = identity
        self.digest = digest
        self.nbytes = nbytes
        self.retry_at = retry_at  # wall-clock ns after which a racy file can be trusted


def _hash_path(path: str, *, racy: float = RACY, deadline: Optional[float] = None,
               rate: Optional[float] = None, stop: Optional[threading.Event] = None) -> _Result:
    """Hash one file, reading exactly the size its first fstat gave (a file that grows or
    shrinks meanwhile fails the identity check), so the loop is bounded by that size.

    A file changed too recently to be trusted is not read at all ("racy", with the time
    it can be); with a `deadline`, hashing gives up as soon as it is on course to miss it."""
    t0 = time.time_ns()  # before the first fstat: a ctime older than this minus the margin is safe
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return _Result("notfile")
    except OSError:
        return _Result("error")
    nbytes = 0
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _Result("notfile")
        before = _identity(st)
        safe_at = st.st_ctime_ns + _racy_margin_ns(st.st_ctime_ns, racy)
        if safe_at > t0:
            return _Result("racy", before, retry_at=safe_at)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (OSError, AttributeError):
            pass
        h = hashlib.sha256()
        size = left = st.st_size
        buf = bytearray(min(CHUNK, max(left, 1)))
        view = memoryview(buf)
        m0 = time.monotonic()
        for _ in range(left // CHUNK + 2):  # one more for a short read's remainder
            if left <= 0:
                break
            if stop is not None and stop.is_set():
                return _Result("stopped", before, nbytes=nbytes)
            now = time.monotonic()
            if deadline is not None and (now > deadline or (
                    not rate and nbytes and m0 + (now - m0) * size / nbytes > deadline)):
                return _Result("timeout", before, nbytes=nbytes)
            n = os.readv(fd, [view[:min(len(buf), left)]])
            if not n:
                break  # truncated under us: the identity check below says so
            h.update(view[:n])
            nbytes += n
            left -= n
            if rate:
                pause = n / rate - (time.monotonic() - now)
                if pause > 0:
                    if deadline is not None:
                        pause = min(pause, max(deadline - time.monotonic(), 0.0))
                    if stop is not None:
                        stop.wait(pause)
                    else:
                        time.sleep(pause)
        after = _identity(os.fstat(fd))
    except OSError:
        return _Result("error", nbytes=nbytes)
    finally:
        os.close(fd)
    if after != before or left != 0:
        return _Result("changed", after, nbytes=nbytes)
    return _Result("ok", before, h.digest(), nbytes)


def file_digest(path) -> bytes:
    """sha-256 of a file's bytes, uncached and unchecked (for tools and tests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.digest()


# --- The cache -----------------------------------------------------------------------------


class DigestCache:
    """sha-256 digests of a docroot's files, computed in the background before anyone asks,
    so that the advertiser and the taker have one ready at the moment of a failover.

    Digests are kept per inode ((st_dev, st_ino) -> (identity, digest)), so every path to
    a file (a symlink inside the root) finds one entry, and an inode reused for a new file
    is told apart by the rest of its identity. Any change of the inode's metadata (chmod,
    a new hard link, a rename) changes its ctime too and so costs one more hashing: the
    price of catching rewrites in place. Thread-safe: one lock around the tables and
    counters, never held while hashing or doing I/O.
    """

    def __init__(self, root, *, rescan: float = 30.0, max_bytes_per_second: Optional[float] = None,
                 racy: float = RACY, max_files: int = MAX_FILES, max_depth: int = MAX_DEPTH) -> None:
        self.root = os.fspath(root)
        self.root_real = os.path.realpath(self.root)
        self.rescan = max(float(rescan), 0.05)
        self.rate = float(max_bytes_per_second) if max_bytes_per_second else None
        self.racy = max(float(racy), 0.0)
        self.max_files = int(max_files)
        self.max_depth = int(max_depth)
        self._lock = threading.Lock()
        self._known: dict = {}  # (dev, ino) -> (identity, digest)
        self._touched: set = set()  # inodes looked up since the last walk began (not pruned)
        self._queue: collections.OrderedDict = collections.OrderedDict()  # path -> None, FIFO
        self._deferred: dict = {}  # path -> monotonic time after which to hash it again
        self._unsettled: dict = {}  # path -> attempts in a row that found it changing
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.bytes_hashed = 0
        self.hashed = 0
        self.lookups = 0
        self.hits = 0
        self.misses = 0
        self.stale = 0
        self.errors = 0
        self.changed = 0
        self.racy_deferred = 0
        self.walks = 0

    # -- asking ------------------------------------------------------------------------------

    def _current(self, url_path: str):
        """(real path, identity) of the file `url_path` names now, or None."""
        if not isinstance(url_path, str):
            return None
        try:
            full = resolve_target(self.root_real, url_path)
            if full is None:
                return None
            st = os.stat(full)
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return full, _identity(st)

    def lookup(self, url_path: str) -> Optional[bytes]:
        """The digest if it is known for the file as it is now; never hashes, so it can be
        called on the failover path. A miss queues the file to be hashed next."""
        cur = self._current(url_path)
        with self._lock:
            self.lookups += 1
            if cur is None:
                self.misses += 1
                return None
            full, ident = cur
            key = ident[:2]
            self._touched.add(key)
            entry = self._known.get(key)
            if entry is not None and entry[0] == ident:
                self.hits += 1
                return entry[1]
            self.misses += 1
            if entry is not None:
                self.stale += 1
            self._enqueue_locked(full)
        self._wake.set()
        return None

    def digest_now(self, url_path: str, timeout: float = 5.0) -> Optional[bytes]:
        """The digest, hashing now if need be, for a caller that can afford to wait up to
        `timeout` seconds (None if that is not enough, or the file keeps changing; a file
        given up on is left to the background thread). Not rate-limited: it is needed now."""
        deadline = time.monotonic() + max(float(timeout), 0.0)
        for _ in range(4):
            cur = self._current(url_path)
            if cur is None:
                return None
            full, ident = cur
            with self._lock:
                entry = self._known.get(ident[:2])
                if entry is not None and entry[0] == ident:
                    return entry[1]
            res = _hash_path(full, racy=self.racy, deadline=deadline)
            self._record(full, res)
            if res.status == "ok":
                return res.digest
            if res.status == "racy":
                wait = (res.retry_at - time.time_ns()) / 1e9 + 0.001
                if time.monotonic() + wait > deadline:
                    return None
                time.sleep(max(wait, 0.0))
            elif res.status != "changed":
                return None
            if time.monotonic() >= deadline:
                return None
        return None

    # -- bookkeeping -------------------------------------------------------------------------

    def _enqueue_locked(self, full: str) -> None:
        if full in self._deferred or full in self._queue:
            return
        if len(self._queue) < MAX_QUEUE:
            self._queue[full] = None

    def _record(self, full: str, res: _Result) -> None:
        """Count a hashing attempt and cache its digest if it is trustworthy."""
        retry = None
        with self._lock:
            self.bytes_hashed += res.nbytes
            if res.status == "ok":
                self.hashed += 1
                key = res.identity[:2]
                if key in self._known or len(self._known) < self.max_files:
                    self._known[key] = (res.identity, res.digest)
            elif res.status == "racy":
                self.racy_deferred += 1
                retry = (res.retry_at - time.time_ns()) / 1e9
            elif res.status == "changed":
                self.changed += 1
                retry = self.racy
            elif res.status == "error":
                self.errors += 1
            elif res.status == "timeout":
                self._enqueue_locked(full)  # digest_now gave up: the background thread goes on
            if retry is None:
                self._unsettled.pop(full, None)
                if res.status in ("ok", "notfile"):
                    self._deferred.pop(full, None)
            else:
                # a file that keeps changing (a log being written) waits longer each time
                tries = self._unsettled.get(full, 0) + 1
                if tries > 1:
                    retry = max(retry, BACKOFF * 2 ** min(tries - 2, 16))
                if full in self._unsettled or len(self._unsettled) < MAX_QUEUE:
                    self._unsettled[full] = tries
                self._queue.pop(full, None)
                self._deferred[full] = time.monotonic() + min(max(retry, 0.001), self.rescan)
        if retry is not None or res.status == "timeout":
            self._wake.set()

    def counters(self) -> dict:
        """files_known (a gauge), and since start: bytes_hashed, hashed (files), lookups =
        hits + misses, stale (misses that found a digest of an older identity of the same
        inode), errors (open, read or walk failures), changed (hashings the file changed
        under), racy (hashings put off because ctime was too recent), walks."""
        with self._lock:
            return {
                "files_known": len(self._known), "bytes_hashed": self.bytes_hashed,
                "hashed": self.hashed, "lookups": self.lookups, "hits": self.hits,
                "misses": self.misses, "stale": self.stale, "errors": self.errors,
                "changed": self.changed, "racy": self.racy_deferred, "walks": self.walks,
            }

    def snapshot(self) -> dict:
        """JSON-able view for status files and the dashboard."""
        with self._lock:
            queued = len(self._queue) + len(self._deferred)
        running = self._thread is not None and self._thread.is_alive()
        return {"root": self.root, "running": running, "queued": queued, **self.counters()}

    # -- the background thread ---------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="digests", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Ask the thread to end and wait for it (at most `timeout`); True if it ended."""
        self._stopping.set()
        self._wake.set()
        t = self._thread
        if t is None:
            return True
        t.join(timeout)
        if t.is_alive():
            return False
        self._thread = None
        return True

    def _next_queued(self) -> Optional[str]:
        """The oldest queued path, after moving deferred ones that are due into the queue."""
        now = time.monotonic()
        with self._lock:
            for path, due in list(self._deferred.items()):
                if due <= now:
                    del self._deferred[path]
                    if len(self._queue) < MAX_QUEUE:
                        self._queue[path] = None
            if self._queue:
                return self._queue.popitem(last=False)[0]
            return None

    def _known_now(self, path: str) -> bool:
        try:
            ident = _identity(os.stat(path, follow_symlinks=False))
        except OSError:
            return True  # gone: nothing to hash
        with self._lock:
            entry = self._known.get(ident[:2])
        return entry is not None and entry[0] == ident

    def _hash_one(self, path: str) -> None:
        if self._known_now(path):
            return
        res = _hash_path(path, racy=self.racy, rate=self.rate, stop=self._stopping)
        self._record(path, res)

    def _walk(self):
        """Regular files under the root not known for their current identity, smallest
        first. Never follows a symlink (a symlinked file inside the root is reached by its
        own path; one outside is never served). Returns (paths, complete, seen inodes)."""
        with self._lock:
            self._touched = set()
        todo = []
        seen = set()
        visited = 0
        complete = True
        stack = [(self.root_real, 0)]
        while stack:
            if self._stopping.is_set():
                return [], False, seen
            d, depth = stack.pop()
            try:
                it = os.scandir(d)
            except OSError:
                with self._lock:
                    self.errors += 1
                complete = False
                continue
            with it:
                for e in it:
                    visited += 1
                    if visited > self.max_files:
                        complete = False
                        break
                    try:
                        if e.is_dir(follow_symlinks=False):
                            if depth + 1 < self.max_depth:
                                stack.append((e.path, depth + 1))
                            else:
                                complete = False
                            continue
                        if not e.is_file(follow_symlinks=False):
                            continue
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    ident = _identity(st)
                    seen.add(ident[:2])
                    todo.append((st.st_size, e.path, ident))
            if visited > self.max_files:
                break
        with self._lock:
            known = self._known
            todo = [(size, path) for size, path, ident in todo
                    if known.get(ident[:2], (None,))[0] != ident]
        todo.sort()
        return [path for _, path in todo], complete, seen

    def _prune(self, seen: set) -> None:
        """Forget inodes a complete walk did not meet and nobody looked up: deleted files."""
        with self._lock:
            keep = seen | self._touched
            for key in [k for k in self._known if k not in keep]:
                del self._known[key]

    def _run(self) -> None:
        pending: collections.deque = collections.deque()
        next_walk = 0.0
        while not self._stopping.is_set():
            self._wake.clear()
            path = self._next_queued()
            if path is not None:
                self._hash_one(path)
                continue
            now = time.monotonic()
            if now >= next_walk:
                paths, complete, seen = self._walk()
                if self._stopping.is_set():
                    break
                with self._lock:
                    self.walks += 1
                if complete:
                    self._prune(seen)
                pending = collections.deque(paths)
                next_walk = time.monotonic() + self.rescan
                continue
            if pending:
                self._hash_one(pending.popleft())
                continue
            with self._lock:
                dues = list(self._deferred.values())
            wake_at = min([next_walk, *dues])
            self._wake.wait(min(max(wake_at - time.monotonic(), 0.001), self.rescan))


# --- RFC 9530 / RFC 8941 -------------------------------------------------------------------


class _SFError(ValueError):
    pass


_LCALPHA = "abcdefghijklmnopqrstuvwxyz"
_DIGITS = "0123456789"
_ALPHA = _LCALPHA + _LCALPHA.upper()
_KEY_FIRST = frozenset(_LCALPHA + "*")
_KEY_CHARS = frozenset(_LCALPHA + _DIGITS + "_-.*")
_TOKEN_FIRST = frozenset(_ALPHA + "*")
_TOKEN_CHARS = frozenset(_ALPHA + _DIGITS + "!#$%&'*+-.^_`|~:/")
_B64_CHARS = frozenset(_ALPHA + _DIGITS + "+/=")
_LCHEX = frozenset(_DIGITS + "abcdef")


class _SFParser:
    """RFC 8941 (with RFC 9651's dates and display strings) Dictionary parsing: just enough
    to find one member reliably among any others a server may send."""

    def __init__(self, s: str) -> None:
        self.s = s
        self.i = 0

    def peek(self) -> str:
        return self.s[self.i] if self.i < len(self.s) else ""

    def skip(self, chars: str) -> None:
        while self.i < len(self.s) and self.s[self.i] in chars:
            self.i += 1

    def dictionary(self) -> dict:
        out: dict = {}
        self.skip(" ")
        if self.i == len(self.s):
            return out
        for _ in range(len(self.s)):  # every member consumes at least one character
            key = self.key()
            if self.peek() == "=":
                self.i += 1
                out[key] = self.item_or_inner_list()
            else:
                out[key] = (True, self.params())
            self.skip(" \t")
            if self.i == len(self.s):
                return out
            if self.peek() != ",":
                raise _SFError("expected ','")
            self.i += 1
            self.skip(" \t")
            if self.i == len(self.s):
                raise _SFError("trailing ','")
        raise _SFError("too many members")

    def key(self) -> str:
        if self.peek() not in _KEY_FIRST or not self.peek():
            raise _SFError("bad key")
        start = self.i
        self.i += 1
        while self.peek() and self.peek() in _KEY_CHARS:
            self.i += 1
        return self.s[start:self.i]

    def item_or_inner_list(self):
        if self.peek() == "(":
            return self.inner_list()
        return (self.bare_item(), self.params())

    def inner_list(self):
        self.i += 1
        items = []
        for _ in range(len(self.s)):
            self.skip(" ")
            if self.peek() == ")":
                self.i += 1
                return (items, self.params())
            items.append((self.bare_item(), self.params()))
            if self.peek() not in (" ", ")"):
                raise _SFError("bad inner list")
        raise _SFError("unterminated inner list")

    def params(self) -> dict:
        out = {}
        for _ in range(len(self.s)):
            if self.peek() != ";":
                return out
            self.i += 1
            self.skip(" ")
            key = self.key()
            value = True
            if self.peek() == "=":
                self.i += 1
                value = self.bare_item()
            out[key] = value
        return out

    def bare_item(self):
        c = self.peek()
        if not c:
            raise _SFError("missing item")
        if c == "-" or c in _DIGITS:
            return self.number()
        if c == '"':
            return self.string()
        if c == ":":
            return self.byte_sequence()
        if c == "?":
            return self.boolean()
        if c == "@":
            self.i += 1
            value = self.number()
            if not isinstance(value, int):
                raise _SFError("bad date")
            return value
        if c == "%":
            return self.display_string()
        if c in _TOKEN_FIRST:
            start = self.i
            self.i += 1
            while self.peek() and self.peek() in _TOKEN_CHARS:
                self.i += 1
            return self.s[start:self.i]
        raise _SFError("bad item")

    def number(self):
        sign = 1
        if self.peek() == "-":
            sign = -1
            self.i += 1
        if not self.peek() or self.peek() not in _DIGITS:
            raise _SFError("bad number")
        start = self.i
        while self.peek() and (self.peek() in _DIGITS or self.peek() == "."):
            self.i += 1
        text = self.s[start:self.i]
        if "." not in text:
            if len(text) > 15:
                raise _SFError("integer too long")
            return sign * int(text)
        whole, _, frac = text.partition(".")
        if len(text) > 16 or len(whole) > 12 or not 1 <= len(frac) <= 3 or "." in frac:
            raise _SFError("bad decimal")
        return sign * float(text)

    def string(self) -> str:
        self.i += 1
        out = []
        for _ in range(len(self.s)):
            c = self.peek()
            if not c:
                break
            self.i += 1
            if c == "\\":
                n = self.peek()
                if n not in ('"', "\\") or not n:
                    raise _SFError("bad escape")
                self.i += 1
                out.append(n)
            elif c == '"':
                return "".join(out)
            elif not (" " <= c <= "~"):
                raise _SFError("bad string character")
            else:
                out.append(c)
        raise _SFError("unterminated string")

    def byte_sequence(self) -> bytes:
        end = self.s.find(":", self.i + 1)
        if end < 0:
            raise _SFError("unterminated byte sequence")
        text = self.s[self.i + 1:end]
        self.i = end + 1
        if any(c not in _B64_CHARS for c in text):
            raise _SFError("bad base64")
        # RFC 8941 4.2.7: do not fail for missing "=" padding
        try:
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise _SFError("bad base64") from None

    def boolean(self) -> bool:
        self.i += 1
        c = self.peek()
        if c not in ("0", "1") or not c:
            raise _SFError("bad boolean")
        self.i += 1
        return c == "1"

    def display_string(self) -> str:
        self.i += 1
        if self.peek() != '"':
            raise _SFError("bad display string")
        self.i += 1
        out = bytearray()
        for _ in range(len(self.s)):
            c = self.peek()
            if not c:
                break
            if not (" " <= c <= "~"):
                raise _SFError("bad display string character")
            self.i += 1
            if c == '"':
                try:
                    return out.decode("utf-8")
                except UnicodeDecodeError:
                    raise _SFError("bad utf-8") from None
            if c == "%":
                h = self.s[self.i:self.i + 2]
                if len(h) != 2 or any(x not in _LCHEX for x in h):
                    raise _SFError("bad percent escape")
                self.i += 2
                out.append(int(h, 16))
            else:
                out += c.encode("ascii")
        raise _SFError("unterminated display string")


def _field_text(value) -> Optional[str]:
    """One field value as text: several field lines joined as HTTP joins them."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(_field_text(v) or "" for v in value)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or not value.isascii():
        return None
    return value


def parse_digest_header(value) -> Optional[bytes]:
    """The sha-256 in a ``Repr-Digest`` or ``Content-Digest`` value, or None.

    None for an absent field, one that is not a valid Structured Fields dictionary (the
    whole field is then void, RFC 8941 4.2), a ``sha-256`` member that is not a byte
    sequence, or one that is not 32 bytes: anything doubtful counts as "not said"."""
    text = _field_text(value)
    if text is None:
        return None
    try:
        members = _SFParser(text.strip(" \t")).dictionary()
    except _SFError:
        return None
    member = members.get("sha-256")
    if member is None:
        return None
    item = member[0]
    if not isinstance(item, bytes) or len(item) != DIGEST_LEN:
        return None
    return item


def parse_legacy_digest(value) -> Optional[bytes]:
    """The SHA-256 in an obsolete RFC 3230 ``Digest`` value (``SHA-256=<base64>``, the
    algorithm case-insensitive, other algorithms skipped), or None; None too if the value
    gives two different SHA-256s."""
    text = _field_text(value)
    if text is None:
        return None
    found = None
    for part in text.split(",")[:64]:
        alg, sep, b64 = part.strip(" \t").partition("=")
        if not sep or alg.strip().lower() != "sha-256":
            continue
        b64 = b64.strip(" \t")
        try:
            d = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(d) != DIGEST_LEN or (found is not None and found != d):
            return None
        found = d
    return found


def format_digest(digest: bytes) -> str:
    """A ``Repr-Digest`` / ``Content-Digest`` value for a sha-256 digest."""
    if not isinstance(digest, (bytes, bytearray)) or len(digest) != DIGEST_LEN:
        raise ValueError("a sha-256 digest is 32 bytes")
    return "sha-256=:" + base64.b64encode(bytes(digest)).decode("ascii") + ":"


def response_digest(headers: Mapping, status: int, *, method: str = "GET",
                    legacy: bool = True) -> Optional[bytes]:
    """The sha-256 of the whole object a response is about, when its headers say it
    without ambiguity; None otherwise (then hash the file).

    A header-supplied digest stands for the whole object (the file's bytes) only when:

    * the response has no ``Content-Encoding`` other than ``identity``: with one, the
      representation and the content are the encoded bytes, not the file's (so with any
      content-coding all three headers are ignored);
    * and the status is 200 or 206 (a 304, 416 or error describes something else); then
    * ``Repr-Digest`` (preferred) is of the whole selected representation, for a 200, a
      206 and a HEAD alike;
    * ``Content-Digest`` is of the message content, which is the whole representation
      only in a 200 with content: it is ignored in a 206 (it covers just the part sent)
      and in a response to HEAD (no content);
    * ``Digest`` (RFC 3230, `legacy`) only like Content-Digest, in a 200 to GET: RFC 3230
      meant the whole instance even in a 206, but implementations disagreed.

    If two of these headers give different sha-256s the server contradicts itself: None.
    `headers` maps names to values (a list for repeated field lines); names are matched
    case-insensitively."""
    h = {}
    for k, v in headers.items():
        k = str(k).lower()
        h[k] = [*h[k], v] if k in h else v
    enc = _field_text(h.get("content-encoding", ""))
    if enc is None or any(t.strip(" \t").lower() not in ("", "identity") for t in enc.split(",")):
        return None
    if status not in (200, 206):
        return None
    found = []
    if "repr-digest" in h:
        found.append(parse_digest_header(h["repr-digest"]))
    content_whole = status == 200 and str(method).upper() != "HEAD"
    if content_whole and "content-digest" in h:
        found.append(parse_digest_header(h["content-digest"]))
    if content_whole and legacy and "digest" in h:
        found.append(parse_legacy_digest(h["digest"]))
    found = {d for d in found if d is not None}
    return found.pop() if len(found) == 1 else None
