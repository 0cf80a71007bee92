"""File writes off the caller's thread: an appliance's event loop (or forwarding thread) must
never wait on the disk. A rename or an append can block for hundreds of milliseconds when the
file system is busy (measured: 50-600 ms on this kind of machine's ext4 /run while other
processes wrote large files), which stalls heartbeats into false suspicions and takeovers
into long gaps.

One daemon thread per FileWriter does the writes in the order they were asked for: appends
(each a line of an event log or a journal, flushed to the kernel as soon as it is written, so
a killed process loses only what the thread had not reached), and replacements (write a
temporary file, rename it over the old one), where only the newest content of a path still
waiting is written (a status snapshot superseded before it was written is skipped).

    w = FileWriter()
    w.append(path, "line\\n")        # in order, per path and across paths
    w.replace(path, "{...}")         # atomically, newest wins
    w.flush(timeout=2.0)             # wait until everything asked so far is written
    w.close()
"""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import Dict, Optional

__all__ = ["FileWriter"]


class FileWriter:
    """Appends and atomic replacements, written by a thread of its own (module docstring)."""

    def __init__(self, name: str = "filewriter") -> None:
        self._q: deque = deque()  # ("append", path, text) | ("replace", path, None)
        self._latest: Dict[str, str] = {}  # path -> newest content to replace it with
        self._files: Dict[str, object] = {}
        self._cv = threading.Condition()
        self._pending = 0
        self._closed = False
        self.errors = 0
        self.last_error: Optional[str] = None
        self.written = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def append(self, path, text: str) -> None:
        with self._cv:
            if self._closed:
                return
            self._q.append(("append", str(path), text))
            self._pending += 1
            self._cv.notify()

    def replace(self, path, text: str, coalesce: bool = True) -> None:
        """Replace the file's content atomically. coalesce: while an earlier replacement of
        the path still waits, only the newest content is written (a status snapshot); off, each
        one is written in its place in the order (a journal rewritten between its appends)."""
        path = str(path)
        with self._cv:
            if self._closed:
                return
            if not coalesce:
                self._q.append(("rewrite", path, text))
                self._pending += 1
            else:
                if path not in self._latest:
                    self._q.append(("replace", path, None))
                    self._pending += 1
                self._latest[path] = text
            self._cv.notify()

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until everything asked for so far is written; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float = 2.0) -> None:
        self.flush(timeout)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)
        for f in self._files.values():
            try:
                f.close()
            except OSError:
                pass
        self._files.clear()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._q or self._closed)
                if not self._q:
                    return
                op, path, text = self._q.popleft()
                if op == "replace":
                    text = self._latest.pop(path)
            try:
                if op == "append":
                    f = self._files.get(path)
                    if f is None:
                        f = self._files[path] = open(path, "a", encoding="utf-8")
                    f.write(text)
                    f.flush()
                else:
                    old = self._files.pop(path, None)  # appends after this go to the new file
                    if old is not None:
                        old.close()
                    tmp = path + ".tmp"
                    with open(tmp, "w", encoding="utf-8") as f:
                        f.write(text)
                    os.replace(tmp, path)
                self.written += 1
            except OSError as exc:  # a full disk must not kill the appliance: counted
                self.errors += 1
                self.last_error = f"{path}: {exc.strerror or exc}"
            finally:
                with self._cv:
                    self._pending -= 1
                    self._cv.notify_all()

    def forget(self, path) -> None:
        """Close an appended-to file (e.g. before it is rewritten by another means)."""
        self.flush()
        f = self._files.pop(str(path), None)
        if f is not None:
            f.close()
