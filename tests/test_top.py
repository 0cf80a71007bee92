"""`appliance top`: recorded snapshots rendered into fixed-size consoles, the collector against
a real control socket, and the command's --once.

tests/data/top/failover.json was recorded from a real lab by tests/data/top/record.py: three
server appliances and the client appliance polled every 0.5 s while c1 downloads /obj-100m from
a through a 40 mbit link, a killed 3 s in, 3 s more. The migration scenario below is that
recording with what the client appliance and the takeover engine report when the takeover
completes (events of the kinds and fields appliance/shim.py and appliance/takeover.py emit);
the reset scenario (reset_recording) is that recording where nobody can continue the
connection: c passes it, b (the last candidate) resets the client with a Migrate RST, the
client appliance resets the client, with the outcome fields and counters the appliances'
status snapshots now carry.
"""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from appliance import top
from appliance.control import ControlServer
from appliance.top import Collector, collector_from_recording, render

DATA = Path(__file__).parent / "data" / "top"
SIZES = [(120, 40), (80, 24), (40, 12)]


@pytest.fixture(scope="module")
def rec():
    return json.loads((DATA / "failover.json").read_text())


def screen(state, width, height, unicode=True) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO(), color_system=None)
    console.print(render(state, width, height, unicode))
    text = console.export_text()
    assert "render error" not in text, text
    lines = text.splitlines()
    assert len(lines) == height, (len(lines), text)
    assert all(len(line) <= width for line in lines), text
    return text


def before_kill(rec):
    return collector_from_recording(rec, until=rec["killed"] - 0.001).state


def after_kill(rec):
    return collector_from_recording(rec).state


def client_conn(rec, sample):
    return sample["snapshots"]["client-ca"]["connections"][0]


def expected_progress(rec, until):
    """The percentage the recording implies at `until`: client ACK - body start over Content-Length."""
    samples = [s for s in rec["samples"] if s["t"] <= until]
    conn = client_conn(rec, samples[-1])
    resp = None
    for s in samples:
        for c in s["snapshots"].get("server-a", {}).get("connections") or []:
            if c["client_port"] == conn["client"][1]:
                resp = c["requests"][0]["response"]
    assert resp is not None
    acked = (conn["client_to_server"]["ack"] - resp["body_start"]) & 0xFFFFFFFF
    return 100 * acked / resp["content_length"], conn


# --- the recording, before and after the kill ----------------------------------------------------


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_steady_download(rec, size):
    w, h = size
    text = screen(before_kill(rec), w, h)
    pct, conn = expected_progress(rec, rec["killed"] - 0.001)
    assert f"{pct:.1f}%" in text  # the progress of the live download
    assert f"{conn['client'][0]}:{conn['client'][1]}"[:15] in text
    assert "DEAD" not in text and "unreachable" not in text
    for node in "abc":
        assert any(line.split()[1:2] == [node] for line in text.splitlines() if line.startswith("│")), node
    if w >= 80:
        assert "alive" in text and "support group" in text
        assert "/obj-100m" in text
        assert "established" in text
    if h >= 24:
        assert "fast path" in text and "frames/s" in text
        assert any(ch in text for ch in "▁▂▃▄▅▆▇█")  # the sparklines
        assert "events" in text


def test_steady_download_details_at_120x40(rec):
    text = screen(before_kill(rec), 120, 40)
    lines = text.splitlines()
    row = next(line for line in lines if "/obj-100m" in line and "%" in line)
    assert " a " in row and "established" in row and " 0 " in row  # owner a, no migration yet
    assert "MiB/100.0 MiB" in row
    assert "client appliance ca's view" in text
    assert "open 10.70.0.11" in text and "tagged Migrate-Permitted" in text
    assert "GET /obj-100m -> 200 100.0 MiB" in text
    net_in = next(line for line in lines if "net → client" in line)
    assert "MiB/s" in net_in  # a 40 mbit download: MiB per second toward the client
    assert "table " in text and "to Python" in text and "1 SYN tagged" in text


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_after_kill(rec, size):
    w, h = size
    text = screen(after_kill(rec), w, h)
    row_a = next(line for line in text.splitlines() if line.startswith("│ a "))
    assert "DEAD" in row_a and "unreachable" in row_a
    for node in "bc":
        row = next(line for line in text.splitlines() if line.startswith(f"│ {node} "))
        assert "alive" in row
    assert "a✗" in text  # the connection's owner is dead
    if h >= 24:
        assert "peer a DEAD after" in text
        assert "takes over 10.70.0.11:" in text and "from dead a" in text
        assert "heard c claim 1 connection of dead a" in text
        assert "a✗ → c?" in text  # c claimed it; the client appliance has not seen a migration yet
        assert "seen as" in text or w < 100
    if w >= 120:
        assert "b:dead c:dead" in text
        assert "server-a unreachable" in text  # the header


def test_event_log_order_and_times(rec):
    state = after_kill(rec)
    text = screen(state, 120, 60)
    i_suspect = text.index("peer a suspect")
    i_dead = text.index("peer a DEAD")
    i_take = text.index("takes over")
    assert i_suspect < i_dead < i_take
    dead = next(ev for src, ev in state.events if ev.get("event") == "peer_dead")
    assert top.fmt_time(dead["t"]) in text


def test_render_is_pure(rec):
    state = after_kill(rec)
    frozen = copy.deepcopy((state.sources, state.events))
    a = screen(state, 100, 30)
    b = screen(state, 100, 30)
    assert a == b
    assert (state.sources, state.events) == frozen


# --- the takeover completes ----------------------------------------------------------------------


def migrated_recording(rec):
    """The recording plus a completed takeover by c (what shim.py and takeover.py report)."""
    r = copy.deepcopy(rec)
    killed = r["killed"]
    last = r["samples"][-1]
    conn = last["snapshots"]["client-ca"]["connections"][0]
    client = conn["client"]
    ack = conn["client_to_server"]["ack"]
    t_dead = next(ev["t"] for ev in r["events"]["server-c"] if ev["event"] == "peer_dead")
    base = {"client": client[0], "client_port": client[1], "server": "10.70.1.2", "server_port": 80}
    r["events"]["server-c"] += [
        {"t": t_dead + 0.002, "event": "migrate_syn_sent", **base, "attempt": 1, "seq": 1, "reqno": 1,
         "since_start_ms": 0.1},
        {"t": t_dead + 0.004, "event": "synack", **base, "seq": 2, "ack": ack, "window": 63, "rtt_ms": 1.9,
         "since_start_ms": 2.0},
        {"t": t_dead + 0.005, "event": "repaired", **base, "ms": 3.1, "repair_ms": 0.4, "plan": "resume",
         "since_start_ms": 3.1},
        {"t": t_dead + 0.009, "event": "resumed", **base, "mode": "resume", "offset": 14_000_000,
         "bytes_left": 90_857_600, "since_start_ms": 7.0},
    ]
    r["events"]["client-ca"] += [
        {"t": t_dead + 0.004, "event": "migrate_accepted", "client": client, "to": ["10.70.3.2", 80],
         "from": ["10.70.1.2", 80], "reqno": 1, "seq": 1, "ack": ack, "tsecr": 1},
        {"t": t_dead + 0.006, "event": "migrated", "client": client, "to": ["10.70.3.2", 80],
         "from": ["10.70.1.2", 80], "reqno": 1, "lock_ms": 2.2},
    ]
    for s in r["samples"]:
        if s["t"] > killed:
            c = s["snapshots"]["client-ca"]["connections"][0]
            c.update(current=["10.70.3.2", 80], migrations=1, reqno=1,
                     servers=[["10.70.1.2", 80], ["10.70.3.2", 80]])
            s["snapshots"]["client-ca"]["shim"]["migrations"] = 1
            s["snapshots"]["client-ca"]["shim"]["migrate_syns"] = 1
    return r


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_migration_completed(rec, size):
    w, h = size
    text = screen(collector_from_recording(migrated_recording(rec)).state, w, h)
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "%" in line)
    cells = row.split()
    assert "c" in cells  # the owner is c now
    assert "a✗" not in row and "?" not in row
    if w >= 80:
        assert " 1 " in row  # one migration
    if w >= 120 and h >= 40:
        assert "a→c" in row  # the servers it has been on
        assert "shim 1 migration, 1 Migrate SYN, 0 rejected" in text  # the client appliance's counters
        assert "MIGRATED a -> c" in text and "network lock 2.2 ms" in text
        assert "ms after a was declared dead" in text
        assert "Migrate SYN from c accepted" in text and "resume at byte" in text
        assert "RESUMED at byte 14,000,000" in text
        assert "Migrate SYN #1 sent to 10.70.0.11:" in text


def test_takeover_in_progress_shows_its_phase(rec):
    r = migrated_recording(rec)
    # only the takeover engine's first steps: the client appliance has not switched yet
    r["events"]["client-ca"] = [ev for ev in r["events"]["client-ca"] if ev["event"] not in ("migrated",
                                                                                             "migrate_accepted")]
    r["events"]["server-c"] = [ev for ev in r["events"]["server-c"] if ev["event"] not in ("repaired", "resumed")]
    for s in r["samples"]:
        for c in s["snapshots"]["client-ca"]["connections"]:
            c.update(current=["10.70.1.2", 80], migrations=0, servers=[["10.70.1.2", 80]])
    text = screen(collector_from_recording(r).state, 120, 40)
    assert "a✗ → c? (SYN/ACK)" in text


def test_migrate_rejected_and_lock_timeout_in_the_log(rec):
    r = copy.deepcopy(rec)
    t = r["samples"][-1]["t"]
    r["events"]["client-ca"] += [
        {"t": t - 0.2, "event": "migrate_rejected", "from": ["10.70.2.2", 80], "client": ["10.70.0.11", 5],
         "reason": "token", "reqno": 3},
        {"t": t - 0.1, "event": "migrate_lock_timeout", "client": ["10.70.0.11", 6], "to": ["10.70.2.2", 80]},
        {"t": t - 0.05, "event": "rst_held", "client": ["10.70.0.11", 7], "server": ["10.70.1.2", 80],
         "seconds": 30.0},
        {"t": t - 0.01, "event": "something_new", "client": ["10.70.0.11", 8], "why": "because"},
    ]
    text = screen(collector_from_recording(r).state, 120, 40)
    assert "Migrate SYN from b REJECTED for 10.70.0.11:5: token (reqno 3)" in text
    assert "10.70.0.11:6: b never answered" in text
    assert "RST from a held for 10.70.0.11:7 (30.0 s MIGRATE-WAIT)" in text
    assert "something_new client=10.70.0.11:8 why=because" in text  # unknown kinds: their fields


# --- one appliance, unreachable appliances, tiny terminals -----------------------------------------


def only(rec, names, until=None):
    r = copy.deepcopy(rec)
    for s in r["samples"]:
        s["snapshots"] = {n: v for n, v in s["snapshots"].items() if n in names}
    r["events"] = {n: v for n, v in r["events"].items() if n in names}
    r["sockets"] = {n: v for n, v in r["sockets"].items() if n in names}
    return collector_from_recording(r, until=until).state


def test_one_server_appliance(rec):
    text = screen(only(rec, {"server-b"}), 120, 30)
    assert "connections (replicas' stream maps)" not in text or "no connections" in text
    row_a = next(line for line in text.splitlines() if line.startswith("│ a "))
    assert "DEAD" in row_a and "—" in row_a  # b's view; a's appliance is not watched here
    assert "fast path" not in text
    text = screen(only(rec, {"server-a"}, until=rec["killed"] - 0.001), 120, 30)
    assert "connections (replicas' stream maps)" in text
    row = next(line for line in text.splitlines() if "/obj-100m" in line)
    assert "100.0 MiB" in row and " a " in row and "established" in row
    assert "progress needs the client appliance" in text


def test_client_appliance_only(rec):
    text = screen(only(rec, {"client-ca"}, until=rec["killed"] - 0.001), 100, 24)
    assert "support group" not in text
    assert "connections (client appliance ca's view)" in text
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "a" in line.split())
    assert "?" in row  # no replica's stream map in view: no object length
    assert "MiB" in row  # but the bytes acknowledged
    assert "fast path" in text


def test_unreachable_appliances():
    col = Collector([("server-a", "/nonexistent/server-a.sock"), ("client-ca", "/nonexistent/client-ca.sock")],
                    title="lab gone", clock=lambda: 1000.0)
    col.ingest_error("server-a", "no control socket at /nonexistent/server-a.sock (is the appliance running?)", 990.0)
    col.ingest_error("client-ca", "nothing listens on /nonexistent/client-ca.sock (the appliance stopped?)", 995.0)
    state = col.publish()
    for w, h in SIZES:
        text = screen(state, w, h)
        assert "unreachable" in text
    text = screen(state, 120, 30)
    assert "server-a unreachable 10.0 s" in text
    assert "client appliance ca: unreachable (nothing listens on" in text
    assert "server-a UNREACHABLE: no control socket" in text
    row = next(line for line in text.splitlines() if line.startswith("│ a "))
    assert "unreachable" in row
    # it answers again: logged, and the row comes back
    col.ingest_status("server-a", {"ok": True, "role": "server", "node": "a", "time": 1000.0, "connections": [],
                                   "group": {"node": "a", "local_entries": 0, "advertised_load": 0.0, "peers": {}}},
                      1000.0)
    text = screen(col.publish(), 120, 30)
    assert "server-a answers again" in text
    row = next(line for line in text.splitlines() if line.startswith("│ a "))
    assert "up" in row and "self" in row


@pytest.mark.parametrize("size", [(40, 12), (20, 5), (10, 3), (1, 1), (200, 60), (30, 40)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_small_and_odd_terminals(rec, size):
    r = reset_recording(rec)
    for state in (before_kill(rec), after_kill(rec), collector_from_recording(migrated_recording(rec)).state,
                  collector_from_recording(r).state, collector_from_recording(r, until=resetting_at(r)).state,
                  Collector([], title="empty").state):
        screen(state, *size)


def test_tiny_terminal_keeps_the_essentials(rec):
    text = screen(after_kill(rec), 40, 12)
    assert "DEAD" in text and "unreachable" in text
    assert "%" in text  # the download's progress
    text = screen(after_kill(rec), 20, 5)
    assert "DEAD" in text  # the worst state first when not every node fits
    text = screen(collector_from_recording(reset_recording(rec)).state, 20, 5)
    assert "RESET" in text  # a client reset: the header says it first


def test_ascii_mode(rec):
    text = screen(before_kill(rec), 120, 40, unicode=False)
    assert not any(ch in text for ch in "▁▂▃▄▅▆▇█░")
    assert "#" in text


def test_a_malformed_snapshot_does_not_crash():
    col = Collector([("server-x", "x.sock"), ("client-ca", "c.sock")], clock=lambda: 5.0)
    col.ingest_status("server-x", {"ok": True, "role": "server", "node": "x", "group": {"peers": {"y": "junk"}},
                                   "connections": [{"requests": "junk"}, 5]}, 5.0)
    col.ingest_status("client-ca", {"ok": True, "role": "client", "bridge": {"in": None}, "connections": [
        {"client": ["1.2.3.4", 5], "client_to_server": {"frames": 1, "ack": "junk"}}, {"nope": 1}]}, 5.0)
    col.ingest_event("server-x", {"t": "junk", "event": "peer_dead"})
    col.ingest_event("server-x", ["not", "a", "dict"])
    screen(col.publish(), 100, 30)  # panels may show an error line; the screen still renders


# --- helpers -------------------------------------------------------------------------------------------


def test_sparkline_and_bar():
    assert top.sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert top.sparkline([0, 0, 0], 5) == "▁▁▁"
    assert top.sparkline(range(100), 10) == top.sparkline(range(90, 100), 10)  # the newest values
    assert top.sparkline([], 10) == "" and top.sparkline([1, 2], 0) == ""
    assert top.sparkline([0, 7], 2, unicode=False) == " #"
    assert top.progress_bar(0.5, 10).plain == "█████░░░░░"
    assert top.progress_bar(1.0, 4).plain == "████"
    assert len(top.progress_bar(0.33, 10).plain) == 10
    assert top.progress_bar(None, 3).plain == "░░░"
    assert top.progress_bar(0.5, 4, unicode=False).plain == "##--"


def test_rates_skip_restarts():
    hist = [(0.0, {"in": {"rx_bytes": 0}}), (1.0, {"in": {"rx_bytes": 1000}}), (2.0, {"in": {"rx_bytes": 10}}),
            (2.5, {"in": {"rx_bytes": 510}})]
    assert top._rates(hist, "in", "rx_bytes") == [1000.0, 1000.0]


def test_formatting():
    assert top.fmt_bytes(104857600) == "100.0 MiB"
    assert top.fmt_bytes(512) == "512 B"
    assert top.fmt_duration(0.0161) == "16 ms" and top.fmt_duration(2.5) == "2.5 s"
    assert top.fmt_duration(65) == "1m05s"
    assert top.fmt_count(45970) == "46k"


def test_backlog_replay_is_not_logged_twice():
    col = Collector([("server-a", "a.sock")], clock=lambda: 1.0)
    ev = {"t": 1.0, "event": "peer_dead", "node": "b", "silence_ms": 90.0, "connections": 0}
    col.ingest_event("server-a", ev)
    col.ingest_event("server-a", dict(ev))
    col.ingest_event("server-c", dict(ev))  # another appliance's observation is its own line
    assert len(col.publish().events) == 2


def test_resolve_sources(tmp_path, monkeypatch):
    import argparse

    import appliance.lab as lab_mod
    monkeypatch.setattr(lab_mod, "LAB_ROOT", tmp_path)
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1.json").write_text(json.dumps({"options": {"replicas": ["a", "b"], "client_path": "appliance"}}))
    (tmp_path / "t1" / "topology.json").write_text(json.dumps({"replicas": {"a": {"ip": "10.70.1.2"},
                                                                            "b": {"ip": "10.70.2.2"}}}))
    ns = argparse.Namespace(socket=None, lab="t1", node=None)
    sources, title, names = top.resolve_sources(ns)
    assert [n for n, _ in sources] == ["server-a", "server-b", "client-ca"]
    assert sources[0][1] == tmp_path / "t1" / "server-a.sock"
    assert names == {"10.70.1.2": "a", "10.70.2.2": "b"} and title == "lab t1"
    ns.node = "ca"
    assert top.resolve_sources(ns)[0] == [("client-ca", tmp_path / "t1" / "client-ca.sock")]
    ns.node = "b"
    assert top.resolve_sources(ns)[0] == [("server-b", tmp_path / "t1" / "server-b.sock")]
    ns.lab, ns.node = None, None  # the only lab there
    assert len(top.resolve_sources(ns)[0]) == 3
    ns.lab = "nosuch"
    with pytest.raises(ValueError, match="no lab 'nosuch'"):
        top.resolve_sources(ns)
    ns.lab, ns.socket = None, str(tmp_path / "t1" / "server-a.sock")
    sources, title, names = top.resolve_sources(ns)
    assert sources == [("server-a", tmp_path / "t1" / "server-a.sock")] and names["10.70.2.2"] == "b"


# --- against a real control socket ----------------------------------------------------------------------


class FakeAppliance:
    """A ControlServer in a thread of its own, answering with the recording's snapshots."""

    def __init__(self, path, snapshot: dict) -> None:
        self.path = str(path)
        self.snapshot = snapshot
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = None
        self.start()

    def start(self) -> None:
        self.server = ControlServer(self.path, {"status": lambda req: dict(self.snapshot)})
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    def publish(self, ev: dict) -> None:
        self.loop.call_soon_threadsafe(self.server.publish, ev)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(5)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(3)


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.fixture
def sockdir():
    with tempfile.TemporaryDirectory(prefix="top", dir="/tmp") as d:  # short: AF_UNIX paths are limited
        yield Path(d)


def test_collector_follows_a_live_appliance(rec, sockdir):
    snap = rec["samples"][2]["snapshots"]["server-b"]
    app = FakeAppliance(sockdir / "server-b.sock", snap)
    app.publish({"t": time.time(), "event": "peer_suspect", "node": "a"})  # in the backlog
    col = Collector([("server-b", sockdir / "server-b.sock")], title="test", interval=0.1)
    try:
        col.start()
        assert wait_for(lambda: col.state.sources[0].reachable and col.state.events)
        assert col.state.events[-1][1]["event"] == "peer_suspect"
        assert wait_for(lambda: col.state.sources[0].events_connected)
        app.publish({"t": time.time(), "event": "peer_dead", "node": "a", "silence_ms": 91.0, "connections": 1})
        assert wait_for(lambda: any(ev["event"] == "peer_dead" for _, ev in col.state.events))
        text = screen(col.state, 120, 30)
        assert "peer a DEAD after 91.0 ms" in text and "│ b " in text
        app.stop()  # the appliance goes away: unreachable, and asked again
        assert wait_for(lambda: not col.state.sources[0].reachable)
        assert "unreachable" in screen(col.state, 120, 30)
        app.start()  # back (a new process would have a new backlog; this one replays the old one)
        assert wait_for(lambda: col.state.sources[0].reachable and col.state.sources[0].events_connected)
        app.publish({"t": time.time(), "event": "peer_alive", "node": "a"})
        assert wait_for(lambda: any(ev["event"] == "peer_alive" for _, ev in col.state.events))
        kinds = [ev["event"] for src, ev in col.state.events if src == "server-b"]
        assert kinds == ["peer_suspect", "peer_dead", "peer_alive"]  # the replayed backlog is not doubled
        tops = [ev["event"] for src, ev in col.state.events if src == "top"]
        assert tops == ["top_unreachable", "top_reachable"]
    finally:
        col.stop()
        app.close()


def test_a_hung_appliance_does_not_stall_the_others(rec, sockdir, monkeypatch):
    import socket as socket_mod
    monkeypatch.setattr(top, "STATUS_TIMEOUT", 0.5)
    hung = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    hung.bind(str(sockdir / "server-a.sock"))
    hung.listen(5)  # accepts, never answers
    app = FakeAppliance(sockdir / "server-b.sock", rec["samples"][2]["snapshots"]["server-b"])
    col = Collector([("server-a", sockdir / "server-a.sock"), ("server-b", sockdir / "server-b.sock")],
                    interval=0.1)
    try:
        col.start()
        assert wait_for(lambda: col.state.sources[1].polls >= 5, timeout=3)
        assert wait_for(lambda: col.state.sources[0].error is not None, timeout=3)
        assert "no answer" in col.state.sources[0].error
        start = time.monotonic()
        screen(col.state, 120, 30)
        assert time.monotonic() - start < 0.5  # rendering reads the published state only
    finally:
        col.stop()
        app.close()
        hung.close()


def test_once_command(rec, sockdir, capsys):
    from appliance.__main__ import main

    apps = [FakeAppliance(sockdir / f"{n}.sock", rec["samples"][4]["snapshots"][n])
            for n in ("server-a", "server-b", "client-ca")]
    try:
        for app in apps:
            app.publish({"t": time.time(), "event": "peer_alive", "node": "z"})
        started = time.monotonic()
        rc = main(["top", "--socket", str(sockdir / "client-ca.sock"), "--once", "--width", "100", "--height", "30"])
        took = time.monotonic() - started
        out = capsys.readouterr().out
        assert rc == 0
        assert len(out.splitlines()) == 30
        assert "connections (client appliance ca's view)" in out and "fast path" in out
        assert "frames/s" in out and "peer z alive" in out
        assert took < 4, took
        (sockdir / "server-a.sock").unlink()
        rc = main(["top", "--socket", str(sockdir / "server-a.sock"), "--once", "--width", "80", "--height", "12"])
        out = capsys.readouterr().out
        assert rc == 1 and "unreachable" in out
    finally:
        for app in apps:
            app.close()


def test_top_is_registered():
    from appliance.__main__ import build_parser

    args = build_parser().parse_args(["top", "--lab", "x", "--node", "a", "--interval", "0.2", "--once"])
    assert args.func is top.run and args.lab == "x" and args.node == "a" and args.interval == 0.2 and args.once
    assert os.path.exists(DATA / "record.py")


def test_started_after_the_kill(rec):
    """A dashboard started after a died never saw a's response events: the takeover event still
    names the object; its progress needs body_start and Content-Length, so it shows bytes only."""
    r = copy.deepcopy(rec)
    r["samples"] = [s for s in r["samples"] if s["t"] > r["killed"]]
    r["events"]["server-a"] = []
    text = screen(collector_from_recording(r).state, 120, 40)
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "MiB" in line)
    assert "/obj-100m" in row and "?" in row and "a✗ → c?" in row
    # with the entry's body_start and length in the takeover event, the bar comes back
    for ev in r["events"]["server-c"]:
        if ev["event"] == "takeover":
            resp = next(c for s in rec["samples"] for c in s["snapshots"].get("server-a", {}).get("connections", [])
                        if c["client_port"] == ev["key"]["client_port"])["requests"][0]["response"]
            ev.update(body_start=resp["body_start"], body_length=resp["content_length"])
    text = screen(collector_from_recording(r).state, 120, 40)
    pct, _ = expected_progress(rec, rec["samples"][-1]["t"])
    assert f"{pct:.1f}%" in text


# --- a real migration (tests/data/top/record.py migrated.json, after the takeover was wired in) -----


@pytest.fixture(scope="module")
def mig():
    return json.loads((DATA / "migrated.json").read_text())


def taker(mig):
    ev = next(e for e in mig["events"]["client-ca"] if e["event"] == "migrated")
    return mig["names"][ev["to"][0]], ev


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_real_migration(mig, size):
    w, h = size
    new, ev = taker(mig)
    text = screen(collector_from_recording(mig).state, w, h)
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "%" in line)
    cells = row.replace("│", " ").split()
    assert new in cells and "a✗" not in row and "?" not in row  # the owner is the replica that took it
    assert "100.0%" in row  # the download completed on the new owner
    if w >= 80:
        assert "1" in cells  # one migration
    if w >= 120:
        assert f"a→{new}" in row
        assert f"MIGRATED a -> {new} (reqno 1, network lock {ev['lock_ms']} ms" in text
        assert "ms after a was declared dead" in text
        assert f"Migrate SYN from {new} accepted for 10.70.0.11:" in text
        resumed = next(e for e in mig["events"][f"server-{new}"] if e["event"] == "resumed")
        assert f"RESUMED at byte {resumed['offset']:,}" in text
        assert "takeover of 10.70.0.11:" in text and "done:" in text
        assert "shim 1 migration, 1 Migrate SYN, 0 rejected" in text


def test_real_migration_just_after_the_kill(mig):
    """The first sample after the kill: a's appliance no longer answers, its peers have not
    declared it dead yet (they will within about 100 ms)."""
    first = next(s["t"] for s in mig["samples"] if s["t"] > mig["killed"])
    state = collector_from_recording(mig, until=first).state
    text = screen(state, 120, 40)
    row_a = next(line for line in text.splitlines() if line.startswith("│ a "))
    assert "unreachable" in row_a and "alive" in row_a and "DEAD" not in row_a
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "%" in line)
    assert " a " in row and "established" in row


def test_migration_time_counts_from_the_latest_death(mig):
    r = copy.deepcopy(mig)
    ev = next(e for e in r["events"]["client-ca"] if e["event"] == "migrated")
    # an old death of a, long before (it restarted since): not the cause of this migration
    r["events"]["server-c"].insert(0, {"t": ev["t"] - 600, "event": "peer_dead", "node": "a", "silence_ms": 90.0,
                                       "connections": 0})
    text = screen(collector_from_recording(r).state, 120, 60)
    line = next(line for line in text.splitlines() if "MIGRATED" in line)
    deaths = [e["t"] for n in ("server-b", "server-c") for e in mig["events"][n]
              if e["event"] == "peer_dead" and e["node"] == "a"]
    assert f"{(ev['t'] - min(deaths)) * 1000:.0f} ms after a was declared dead" in line
    # a planned migration (no death): no such claim
    r["events"]["server-b"] = [e for e in r["events"]["server-b"] if e["event"] != "peer_dead"]
    r["events"]["server-c"] = [e for e in r["events"]["server-c"] if e["event"] != "peer_dead"]
    text = screen(collector_from_recording(r).state, 120, 60)
    line = next(line for line in text.splitlines() if "MIGRATED" in line)
    assert "declared dead" not in line


def test_owner_names_from_the_snapshots(mig):
    """Outside a lab (no topology.json) a server snapshot that gives its address names the owner."""
    r = copy.deepcopy(mig)
    r["names"] = {}
    new, ev = taker(mig)
    text = screen(collector_from_recording(r).state, 120, 40)
    assert f"{ev['to'][0]}" in text  # no names: addresses
    for s in r["samples"]:
        for n, ip in mig["names"].items():
            if f"server-{ip}" in s["snapshots"] and s["snapshots"][f"server-{ip}"].get("ok", True):
                s["snapshots"][f"server-{ip}"]["address"] = n
    text = screen(collector_from_recording(r).state, 120, 40)
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "%" in line)
    assert new in row.replace("│", " ").split()


# --- outcomes: a client reset (nobody can continue it) ---------------------------------------------

ETAG = "etag: local '\"5f3b-6400000\"' differs from A's '\"5f3a-6400000\"'"  # appliance/resume.py's words


def reset_recording(rec):
    """The recording with what the appliances report when nobody can continue the connection:
    c (rank 0) checks its copy, it differs: c passes; b (the last candidate) hears the pass,
    checks, claims, does the Migrate handshake and resets the client with a Migrate RST; the
    client appliance resets the client (RESETTING for a while, then closed). The client and
    server snapshots have the outcome fields and counters of appliance/shim.py, client.py
    and takeover.py."""
    r = copy.deepcopy(rec)
    conn = r["samples"][-1]["snapshots"]["client-ca"]["connections"][0]
    client = conn["client"]
    ack = conn["client_to_server"]["ack"]
    t0 = next(ev["t"] for ev in r["events"]["server-c"] if ev["event"] == "peer_dead")
    base = {"client": client[0], "client_port": client[1], "server": "10.70.1.2", "server_port": 80}
    # c passes instead of claiming: no CLAIM for b to hear
    r["events"]["server-b"] = [ev for ev in r["events"]["server-b"] if ev["event"] != "claim_heard"]
    r["events"]["server-c"] += [
        {"t": t0 + 0.0010, "event": "checked", **base, "ok": False, "reason": ETAG, "ms": 1.4, "cached": False,
         "since_start_ms": 1.4},
        {"t": t0 + 0.0011, "event": "passed", **base, "reason": ETAG, "since_start_ms": 1.5},
        {"t": t0 + 0.0012, "event": "outcome", **base, "outcome": "passed", "reason": ETAG, "since_start_ms": 1.5},
    ]
    why = f"no member can serve it: {ETAG}"
    r["events"]["server-b"] += [
        {"t": t0 + 0.0030, "event": "pass_heard", "by": "c", "dead": "a", "connections": 1, "now_due": 1},
        {"t": t0 + 0.0031, "event": "takeover", "dead": "a", "rank": 1, "last": True, "state": "ACTIVE",
         "key": {"client": client[0], "client_port": client[1], "server": "10.70.1.2", "server_port": 80},
         "path": "/obj-100m"},
        {"t": t0 + 0.0045, "event": "checked", **base, "ok": False, "reason": ETAG, "ms": 1.2, "cached": False,
         "since_start_ms": 1.2},
        {"t": t0 + 0.0046, "event": "claimed", **base, "last": True, "rank": 1, "since_start_ms": 1.3},
        {"t": t0 + 0.0047, "event": "migrate_syn_sent", **base, "attempt": 1, "seq": 1, "reqno": 1, "sent": True,
         "since_start_ms": 1.4},
        {"t": t0 + 0.0070, "event": "synack", **base, "seq": 2, "ack": ack, "window": 63, "rtt_ms": 2.1,
         "attempts": 1, "held_above": 0, "since_start_ms": 3.6},
        {"t": t0 + 0.0071, "event": "refused", **base, "reason": why, "planned": False, "since_start_ms": 3.7},
        {"t": t0 + 0.0072, "event": "outcome", **base, "outcome": "reset", "reason": why, "since_start_ms": 3.7},
    ]
    r["events"]["client-ca"] += [
        {"t": t0 + 0.0050, "event": "migrate_accepted", "client": client, "to": ["10.70.2.2", 80],
         "from": ["10.70.1.2", 80], "reqno": 1},
        {"t": t0 + 0.0065, "event": "migrate_answered", "client": client, "to": ["10.70.2.2", 80], "seq": 1,
         "ack": ack, "tsecr": 7, "sack": [], "probed": True},
        {"t": t0 + 0.0075, "event": "client_reset", "client": client, "server": ["10.70.1.2", 80],
         "reason": "10.70.2.2 cannot continue it", "seqs": [ack]},
    ]
    zero = dict.fromkeys(("outcome_resumed", "outcome_reset", "client_resets", "probes", "probe_answers",
                          "probe_timeouts", "migrate_rsts", "migrate_rsts_rejected", "migrations_abandoned"), 0)
    engine = dict.fromkeys(("outcome_resumed", "outcome_reset", "outcome_passed", "outcome_failed", "checks",
                            "checks_cached", "checks_failed", "claimed", "passed", "resets_sent", "queued",
                            "held_above", "reprobes", "running", "waiting", "relaying"), 0)
    for s in r["samples"]:
        after = s["t"] > t0 + 0.01
        ca = s["snapshots"]["client-ca"]
        ca["shim"].update(zero)
        ca["timers"] = {"runs": 12, "late_max_ms": 0.8}
        for c in ca["connections"]:
            c.update(outcome=None, outcome_reason=None)
        for name, counts in (("server-b", {"outcome_reset": 1, "checks": 1, "checks_failed": 1, "claimed": 1,
                                           "resets_sent": 1}),
                             ("server-c", {"outcome_passed": 1, "checks": 1, "checks_failed": 1, "passed": 1})):
            snap = s["snapshots"].get(name)
            if snap is not None and snap.get("ok", True):
                snap["takeover"] = {"counters": {**engine, **(counts if after else {})}, "active": [], "finished": []}
        if not after:
            continue
        ca["shim"].update(outcome_reset=1, client_resets=1, probes=1, probe_answers=1, migrate_rsts=1,
                          migrate_syns=1)
        c = ca["connections"][0]
        c.update(outcome="reset", outcome_reason="10.70.2.2 cannot continue it", reqno=1, migrating_to=None,
                 state="resetting" if s["t"] < t0 + 2.0 else "closed",
                 closed_by=None if s["t"] < t0 + 2.0 else "appliance")
    return r


def conn_port(r):
    return r["samples"][-1]["snapshots"]["client-ca"]["connections"][0]["client"][1]


def resetting_at(r):
    """A time while the client appliance still answers the client's frames with RSTs."""
    t0 = next(ev["t"] for ev in r["events"]["server-c"] if ev["event"] == "peer_dead")
    return next(s["t"] for s in r["samples"] if t0 + 0.01 < s["t"] < t0 + 2.0)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_client_reset_is_impossible_to_miss(rec, size):
    w, h = size
    r = reset_recording(rec)
    text = screen(collector_from_recording(r).state, w, h)
    lines = text.splitlines()
    assert "1 client RESET" in lines[0]  # the header, whatever the size
    row = next(line for line in lines if "10.70.0.11:" in line and "%" in line)
    assert "RESET" in row  # the connection's own row (its owner cell where no state column fits)
    assert "resumed" not in row and "a✗ → b?" not in row  # not a claim in progress any more
    if w >= 80:
        assert "RESET by b: etag: local" in row  # the replica's reason, cut to fit
        # the panel's border: the newest reset, its reason longer
        assert f"1 client RESET 10.70.0.11:{conn_port(r)} by b: no member can serve it: etag" in text


def test_client_reset_details_at_120x40(rec):
    r = reset_recording(rec)
    text = screen(collector_from_recording(r).state, 120, 40)
    lines = text.splitlines()
    # the client appliance's counters: the outcomes, and the probes and Migrate RSTs behind them
    outcomes = next(line for line in lines if "outcomes " in line)
    assert "outcomes 0 resumed, 1 RESET" in outcomes
    assert "1 probe (1 answered, 0 timed out), 1 Migrate RST (0 rejected), 0 abandoned" in outcomes
    assert "shim 1 migration" not in text and "shim 0 migrations, 1 Migrate SYN, 0 rejected" in text
    # the takeover engines' outcomes under the support group
    assert "resumed 0 · reset 1 · passed 1 · failed 0" in text
    # the event log tells the story
    assert "resets the client 10.70.0.11:" in text and ": b cannot continue it (1 RST)" in text  # ca
    assert "answers b's Migrate SYN for 10.70.0.11:" in text and "(position probed): resume at byte" in text
    assert "outcome of 10.70.0.11:" in text and "client RESET: no member can serve it: etag: local" in text
    i_pass = text.index("passes 10.70.0.11:")
    i_heard = text.index("heard c pass on 1 connection of dead a: 1 due here now")
    i_take = text.index("(rank 1, the last candidate)")
    i_claim = text.index("claims 10.70.0.11:")
    i_reset = text.index("resets the client 10.70.0.11:", i_claim)
    assert i_pass < i_heard < i_take < i_claim < i_reset
    assert f"cannot serve 10.70.0.11:{conn_port(r)}: etag: local" in text  # b's failed check


def test_client_reset_event_lines_and_styles(rec):
    r = reset_recording(rec)
    state = collector_from_recording(r).state
    lines = {(src, text): style for _t, src, text, style, _n in top.event_lines(state, 100)}

    def one(src, prefix):
        found = [(t, s) for (sr, t), s in lines.items() if sr == src and t.startswith(prefix)]
        assert len(found) == 1, (src, prefix, found)
        return found[0]

    text, style = one("server-b", "resets the client")
    assert text.endswith(f"no member can serve it: {ETAG} (Migrate RST) at +3.7 ms") and style == "bold red"
    text, style = one("server-b", "outcome of")
    assert "client RESET" in text and style == "bold red"
    text, style = one("client-ca", "resets the client")
    assert text.endswith("b cannot continue it (1 RST)") and style == "bold red"
    text, style = one("server-c", "passes")
    assert text.endswith(f": {ETAG}") and style == "yellow"
    text, style = one("server-c", "outcome of")
    assert "passed on" in text and style == "yellow"
    text, style = one("server-b", "claims")
    assert text.endswith("(rank 1, the last candidate)") and style == "magenta"
    assert one("server-b", "heard c pass on")[1] == "magenta"
    assert one("client-ca", "answers b's Migrate SYN")[1] == "cyan"
    text, _ = one("client-ca", "Migrate SYN from b accepted")
    assert text.endswith("(was a, reqno 1), probing the client's position")  # no ack in the event any more


def test_client_reset_while_resetting(rec):
    r = reset_recording(rec)
    text = screen(collector_from_recording(r, until=resetting_at(r)).state, 120, 40)
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "%" in line)
    assert "RESETTING by b: etag: local" in row
    text = screen(collector_from_recording(r, until=resetting_at(r)).state, 40, 12)
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "%" in line)
    assert "a✗ RESET" in row  # no room for a state column: the owner cell says it


def test_client_reset_with_the_client_appliance_alone(rec):
    """No replica in view: the client appliance's own reason, its addresses as names."""
    state = only(reset_recording(rec), {"client-ca"})
    text = screen(state, 120, 30)
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "?" in line)
    assert "RESET b cannot continue it" in row
    assert "1 client RESET" in text.splitlines()[0]


def test_client_reset_with_the_replicas_alone(rec):
    """No client appliance in view: the header counts the takeover engines' resets; the log
    says why."""
    state = only(reset_recording(rec), {"server-b", "server-c"})
    text = screen(state, 120, 40)
    assert "1 client RESET" in text.splitlines()[0]
    assert "resets the client 10.70.0.11:" in text and "client RESET: no member can serve it" in text
    # and without their snapshots' counters, from the events
    r = reset_recording(rec)
    for s in r["samples"]:
        for snap in s["snapshots"].values():
            snap.pop("takeover", None)
    state = only(r, {"server-b", "server-c"})
    assert top.outcome_totals(state) == {"resumed": 0, "reset": 1, "source": "events"}
    assert "1 client RESET" in screen(state, 80, 24).splitlines()[0]


def test_an_older_client_appliance_without_outcomes(rec):
    """A client appliance that has no outcome fields yet: the client_reset event says it."""
    r = reset_recording(rec)
    for s in r["samples"]:
        ca = s["snapshots"]["client-ca"]
        for k in ("outcome_resumed", "outcome_reset"):
            ca["shim"].pop(k, None)
        for c in ca["connections"]:
            c.pop("outcome", None)
            c.pop("outcome_reason", None)
            if c["state"] == "resetting":
                c["state"] = "closed"
    text = screen(collector_from_recording(r).state, 120, 40)
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "%" in line)
    assert "RESET by b: etag: local" in row
    assert "outcomes " not in text  # no outcome counters: no such line


def test_resumed_outcome_in_the_connection_row(rec):
    r = migrated_recording(rec)
    for s in r["samples"]:
        ca = s["snapshots"]["client-ca"]
        ca["shim"].update(outcome_resumed=1 if s["t"] > r["killed"] else 0, outcome_reset=0, probes=1,
                          probe_answers=1)
        for c in ca["connections"]:
            c.update(outcome="resumed" if s["t"] > r["killed"] else None, outcome_reason=None)
    text = screen(collector_from_recording(r).state, 120, 40)
    row = next(line for line in text.splitlines() if "10.70.0.11:" in line and "%" in line)
    assert "resumed" in row and "RESET" not in text
    assert "outcomes 1 resumed, 0 reset" in text
    assert "shim 1 migration, 1 Migrate SYN, 0 rejected" in text


def test_more_outcome_events_in_the_log(rec):
    r = copy.deepcopy(rec)
    t = r["samples"][-1]["t"]
    k = {"client": "10.70.0.11", "server": "10.70.1.2", "server_port": 80}
    r["events"]["server-b"] += [
        {"t": t - 0.30, "event": "checked", **k, "client_port": 11, "ok": True, "reason": None, "ms": 0.9,
         "cached": False},
        {"t": t - 0.29, "event": "checked", **k, "client_port": 12, "ok": True, "reason": None, "ms": 0.0,
         "cached": True},
        {"t": t - 0.28, "event": "checked", **k, "client_port": 13, "ok": False, "reason": "cached reason",
         "ms": 0.0, "cached": True},
        {"t": t - 0.27, "event": "reprobe", **k, "client_port": 11, "attempt": 1, "since_start_ms": 9.5},
        {"t": t - 0.26, "event": "resynced", **k, "client_port": 11, "stale_ack": 5, "ack": 1453, "gap": 1448},
        {"t": t - 0.25, "event": "outcome", **k, "client_port": 11, "outcome": "resumed", "reason": "resume"},
        {"t": t - 0.24, "event": "refused", **k, "client_port": 14, "reason": "the local server failed",
         "planned": True},
        {"t": t - 0.23, "event": "outcome", **k, "client_port": 14, "outcome": "failed",
         "reason": "the local server failed"},
    ]
    r["events"]["client-ca"] += [
        {"t": t - 0.20, "event": "migrate_answered", "client": ["10.70.0.11", 15], "to": ["10.70.3.2", 80],
         "seq": 1, "ack": 99, "tsecr": 0, "sack": [[200, 300]], "probed": False},
        {"t": t - 0.19, "event": "migrate_abandoned", "client": ["10.70.0.11", 14], "to": ["10.70.2.2", 80],
         "reason": "10.70.2.2 abandoned the migration"},
        {"t": t - 0.18, "event": "migrate_rst_rejected", "from": ["10.70.3.2", 80], "client": ["10.70.0.11", 16]},
    ]
    state = collector_from_recording(r).state
    text = screen(state, 160, 60)
    assert "checked 10.70.0.11:11 (0.9 ms)" in text
    assert "10.70.0.11:12" not in text and "10.70.0.11:13" not in text  # cached checks: silent
    assert "no answer from 10.70.0.11:11 to the window probe: probing again (#1)" in text
    assert "10.70.0.11:11 was 1,448 bytes past its SYN/ACK: caught up" in text
    assert "outcome of 10.70.0.11:11: resumed (resume)" in text
    assert "gives 10.70.0.11:14 back to its server: the local server failed (Migrate RST without P)" in text
    assert "outcome of 10.70.0.11:14: FAILED: the local server failed" in text
    assert ("answers c's Migrate SYN for 10.70.0.11:15 (position estimated: no answer to the probe, 1 SACK block "
            "above a hole): resume at server seq 99") in text
    assert "migration of 10.70.0.11:14 to b abandoned: b abandoned the migration; it stays with its server" in text
    assert "Migrate RST from c REJECTED for 10.70.0.11:16" in text
    styles = {text: style for _t, _s, text, style, _n in top.event_lines(state, 100)}
    assert styles["outcome of 10.70.0.11:11: resumed (resume)"] == "bold green"
    assert next(s for tx, s in styles.items() if tx.startswith("gives 10.70.0.11:14")) == "yellow"
    assert next(s for tx, s in styles.items() if tx.startswith("checked 10.70.0.11:11")) == "dim"
    assert "RESET" not in text.splitlines()[0]  # no client was reset


def test_reason_text_names_the_replicas(rec):
    state = after_kill(rec)
    assert top.reason_text(state, "10.70.2.2 cannot continue it") == "b cannot continue it"
    assert top.reason_text(state, "MIGRATE-WAIT ended:\n the server") == "MIGRATE-WAIT ended: the server"
    assert top.reason_text(state, "10.70.9.9 and 10.70.1.2:80") == "10.70.9.9 and a:80"
    assert top.reason_text(state, None) == ""
