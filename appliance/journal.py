"""A small append-only journal of per-key records, so an appliance restarted (cleanly or by
SIGKILL) finds its state where it left it.

Each change is one JSON line, handed to a writer thread (appliance.filewriter: the caller
never waits on the disk) that writes and flushes it to the kernel at once: a killed process
loses nothing the kernel has (a crash of the whole host is another matter: the state dir is
normally a tmpfs, /run, which a reboot clears, and rightly: the connections are gone too).
A line is ``{"k": key, "v": record}`` (the key's latest record) or ``{"k": key, "x": 1}``
(the key is gone). Loading replays the lines in order; a torn last line (the process died
mid-write) is ignored and counted. When the file holds many more lines than live keys it is
rewritten (to a temporary file, then renamed over the old one), so it stays proportional to
what is live.

    j = Journal("/run/appliance/client-ca.journal")
    state = j.load()             # {key: record}; keys are tuples where the JSON had lists
    j.put(key, record); j.drop(key); j.flush()
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from .filewriter import FileWriter

__all__ = ["Journal"]

COMPACT_SLACK = 1000  # lines beyond twice the live keys before a rewrite


def _tuple(k):
    return tuple(_tuple(x) for x in k) if isinstance(k, list) else k


class Journal:
    """Per-key records in an append-only file (see the module docstring)."""

    def __init__(self, path, compact_slack: int = COMPACT_SLACK, writer: Optional[FileWriter] = None) -> None:
        self.path = str(path)
        self.compact_slack = compact_slack
        self._live: Dict[Any, Any] = {}
        self._lines = 0
        self._own_writer = writer is None
        self._w = writer
        self.counters = {"loaded": 0, "torn": 0, "bad": 0, "writes": 0, "compactions": 0}

    def load(self) -> Dict[Any, Any]:
        """Replay the file (absent: empty); the live records by key. Opens it for appending."""
        live: Dict[Any, Any] = {}
        lines = 0
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        chunks = data.split(b"\n")
        for i, raw in enumerate(chunks):
            if not raw:
                continue
            try:
                rec = json.loads(raw)
                key = _tuple(rec["k"])
            except (ValueError, KeyError, TypeError):
                if i == len(chunks) - 1:
                    self.counters["torn"] += 1  # the last write was cut short
                else:
                    self.counters["bad"] += 1
                continue
            lines += 1
            if rec.get("x"):
                live.pop(key, None)
            else:
                live[key] = rec.get("v")
        self._live, self._lines = live, lines
        self.counters["loaded"] = len(live)
        self._rewrite()  # drop what is dead (and a torn tail) before appending
        self._writer().flush()
        return dict(live)

    def _writer(self) -> FileWriter:
        if self._w is None:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._w = FileWriter("journal")
        return self._w

    def _write(self, obj: dict) -> None:
        self._writer().append(self.path, json.dumps(obj, separators=(",", ":")) + "\n")
        self._lines += 1
        self.counters["writes"] += 1

    def put(self, key, record) -> None:
        """The key's state is now `record` (JSON-able)."""
        self._live[key] = record
        self._write({"k": key, "v": record})

    def drop(self, key) -> None:
        """The key is gone."""
        if self._live.pop(key, None) is None:
            return
        self._write({"k": key, "x": 1})

    def flush(self) -> None:
        """Rewrite the file when it holds many more lines than live keys (each line is
        already on its way to the kernel: the writer thread flushes every one)."""
        if self._lines > 2 * len(self._live) + self.compact_slack:
            self._rewrite()

    def sync(self, timeout: float = 2.0) -> bool:
        """Wait until every line so far is written (tests, a clean stop)."""
        return self._writer().flush(timeout)

    def _rewrite(self) -> None:
        text = "".join(json.dumps({"k": key, "v": rec}, separators=(",", ":")) + "\n"
                       for key, rec in self._live.items())
        self._writer().replace(self.path, text, coalesce=False)
        self._lines = len(self._live)
        self.counters["compactions"] += 1

    def __len__(self) -> int:
        return len(self._live)

    def close(self) -> None:
        if self._w is not None:
            if self._own_writer:
                self._w.close()
            else:
                self._w.flush()
                self._w.forget(self.path)
            self._w = None

    def snapshot(self) -> Dict[str, Optional[int]]:
        return {"path": self.path, "live": len(self._live), "lines": self._lines, **self.counters}
