"""appliance.filewriter: writes off the caller's thread, in order, replacements atomic."""

from __future__ import annotations

import json
import threading

from appliance.filewriter import FileWriter
from appliance.statusfile import StatusWriter, read_events, read_status


def test_appends_in_order_and_replacements_coalesce(tmp_path):
    w = FileWriter()
    log, snap = tmp_path / "log", tmp_path / "snap"
    for i in range(1000):
        w.append(log, f"{i}\n")
        w.replace(snap, str(i))  # superseded ones may be skipped, the newest always lands
    assert w.flush(5)
    assert log.read_text().split() == [str(i) for i in range(1000)]
    assert snap.read_text() == "999" and not (tmp_path / "snap.tmp").exists()
    w.close()


def test_a_rewrite_between_appends_keeps_the_order(tmp_path):
    w = FileWriter()
    p = tmp_path / "journal"
    w.append(p, "a\n")
    w.replace(p, "B\n", coalesce=False)  # a compaction: the appends after it go to the new file
    w.append(p, "c\n")
    w.replace(p, "D\n", coalesce=False)
    w.append(p, "e\n")
    w.close()
    assert p.read_text() == "D\ne\n"


def test_the_caller_does_not_wait_and_close_writes_everything(tmp_path):
    w = FileWriter()
    gate = threading.Event()
    real_open = open

    # the first write blocks (a slow disk): the caller still returns at once
    import builtins
    def slow_open(*a, **kw):
        gate.wait(5)
        return real_open(*a, **kw)
    builtins.open = slow_open
    try:
        w.append(tmp_path / "x", "1\n")
        w.append(tmp_path / "x", "2\n")  # returns although the thread is stuck
        assert not w.flush(0.05)
    finally:
        builtins.open = real_open
        gate.set()
    w.close()
    assert (tmp_path / "x").read_text() == "1\n2\n"


def test_status_writer_through_the_thread(tmp_path):
    sw = StatusWriter(tmp_path, "server", "a")
    sw.event("hello", n=1)
    sw.status({"ready": True, "b": b"\x01"})
    assert sw.flush()
    assert read_status(tmp_path, "server", "a") == {"ready": True, "b": "01"}
    assert [e["event"] for e in read_events(tmp_path, "server", "a")] == ["hello"]
    sw.close()
    assert json.loads((tmp_path / "server-a.events.jsonl").read_text())["n"] == 1
