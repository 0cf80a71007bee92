"""How an appliance process reports until the control socket exists: files in a state dir.

<state-dir>/<role>-<node>.status.json is a snapshot, replaced atomically (write, then
rename), with "ready": true once the appliance is forwarding or capturing.
<state-dir>/<role>-<node>.events.jsonl gets one JSON object per event, each with "t"
(time.time()) and "event" (its kind). The files are written by a thread of their own
(appliance.filewriter): the appliance's loop never waits on the disk.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .filewriter import FileWriter


def status_path(state_dir, role: str, node: str) -> Path:
    return Path(state_dir) / f"{role}-{node}.status.json"


def events_path(state_dir, role: str, node: str) -> Path:
    return Path(state_dir) / f"{role}-{node}.events.jsonl"


class StatusWriter:
    """Writes one appliance's status snapshots and event log."""

    def __init__(self, state_dir, role: str, node: str) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.status_file = status_path(state_dir, role, node)
        self.events_file = events_path(state_dir, role, node)
        open(self.events_file, "a").close()  # a missing state dir or a bad permission fails here, at once
        self.files = FileWriter(f"{role}-{node}-files")
        self.listeners: list = []  # callables given each event dict (the control socket's stream)

    def status(self, snapshot: dict) -> None:
        self.files.replace(self.status_file, json.dumps(snapshot, default=_jsonable, sort_keys=True))

    def event(self, kind: str, **fields) -> None:
        ev = {"t": time.time(), "event": kind, **fields}
        self.files.append(self.events_file, json.dumps(ev, default=_jsonable) + "\n")
        for listener in self.listeners:
            listener(ev)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait until what was asked so far is on disk (the last status at a stop, tests)."""
        return self.files.flush(timeout)

    def close(self) -> None:
        self.files.close()


def read_status(state_dir, role: str, node: str):
    """The latest snapshot, or None if the appliance has not written one."""
    try:
        return json.loads(status_path(state_dir, role, node).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_events(state_dir, role: str, node: str) -> list:
    try:
        lines = events_path(state_dir, role, node).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def _jsonable(obj):
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
