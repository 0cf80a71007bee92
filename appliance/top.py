"""`appliance top`: the live terminal dashboard of a support group.

    appliance top --lab NAME                  # every replica's server appliance + the client appliance
    appliance top --lab NAME --node b         # one appliance (a replica, or ca for the client appliance)
    appliance top --socket PATH               # one appliance, by its control socket
    appliance top --lab NAME --once           # one frame to stdout, then exit (scripts, tests)

Four panels: the support group (each node alive / suspect / dead as its peers see it, phi,
last heard, load, connections, entries the group holds for it), the connections (client,
object, a progress bar of bytes acknowledged against the object's length, owner, migrations,
state), the client appliance's fast path (frames/s and bytes/s each way with sparklines,
frames that went to Python, drops) and a scrolling log of every appliance's events (failure
detected, claims, takeovers, Migrate SYNs accepted or rejected, resumed at which byte, how
long it took). Panels and columns are dropped to fit a small terminal; an appliance that
does not answer is shown as unreachable and asked again every interval.

Outcomes: every connection a migration ended is either resumed (a replica continues it at
the exact next byte) or its client is reset (nobody could continue it: the client gets an
error, not a resumption). A reset cannot be missed: the header counts the clients reset
(the client appliance's outcome_reset counter, else the takeover engines', else the reset
outcomes in the log) before anything else on the line; the connection's row says RESET (or
RESETTING while the client appliance still answers its frames with RSTs) in red with the
reason, the replica's when its takeover engine gave one, and sorts first; the panel's
bottom border gives the newest reset's reason at full width; the fast path panel has an
"outcomes" line (resumed, RESET, the probes and Migrate RSTs behind them) and the support
group's border the takeover engines' outcome counters.

Structure (anchors Part C): a Collector polls each control socket's "status" and follows its
"events" stream in background threads, and publishes an immutable State every 0.1 s at most;
render(state, width, height) is a pure function of that State, so rendering never waits on
an appliance and tests render recorded snapshots (Collector.ingest_*) into fixed-size consoles.

Progress: the client appliance sees every ACK the client sends (client_to_server.ack, in the
server's sequence space, which a migration keeps); the replicas' stream maps know where each
response body starts (body_start) and its Content-Length (from their status snapshots and
response_start events, remembered after the replica dies). Bytes acknowledged = ack -
body_start, against Content-Length. Without a replica's view the bar shows bytes acknowledged
in the stream (ack - server ISN - 1) with no length; without the client appliance it shows the
length only (a replica's tap does not see the body's ACKs).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from types import MappingProxyType
from typing import Optional

from rich import box
from rich.console import Console, Group
from rich.layout import Layout
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

PROG = "appliance top"
EVENT_KEEP = 1000  # events kept for the log
HISTORY = 240  # status samples kept for sparklines and rates
OBJECT_KEEP = 5000  # connections whose response (body start, length) is remembered
STATUS_TIMEOUT = 2.0  # seconds a status request may take before the appliance counts as unreachable
PUBLISH_EVERY = 0.1  # seconds between State publications (at most)
SPARK = "▁▂▃▄▅▆▇█"
SPARK_ASCII = " .:-=+*#"
MASK32 = 0xFFFFFFFF
ACK_FLAG = 0x10


# --- state ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SourceView:
    """One appliance as the dashboard last saw it."""

    name: str  # "server-a", "client-ca", or the socket file's stem
    path: str
    role: Optional[str]  # "server" or "client" (from the name, else the snapshot)
    node: Optional[str]
    snapshot: Optional[dict]  # the latest good status answer (kept while unreachable, marked stale)
    error: Optional[str]  # None when the latest poll answered
    ok_at: Optional[float]  # time.time() of the latest good answer
    down_since: Optional[float]  # when it stopped answering (None while it answers)
    polls: int = 0
    events_connected: bool = False

    @property
    def reachable(self) -> bool:
        return self.error is None and self.snapshot is not None

    @property
    def live(self) -> Optional[dict]:
        """The snapshot, only while the appliance answers."""
        return self.snapshot if self.error is None else None


@dataclasses.dataclass(frozen=True)
class State:
    """Everything render() reads; never mutated once published."""

    title: str
    now: float
    interval: float
    sources: tuple  # SourceView, servers by node then the client appliance
    events: tuple  # (source name, event dict), oldest first
    bridge_history: tuple  # (t, {"in": {...}, "out": {...}}) samples of the client appliance's bridge
    conn_history: MappingProxyType  # "client ip:port" -> ((t, ack), ...)
    objects: MappingProxyType  # "client ip:port" -> {path, body_start, content_length, na, node, ...}
    names: MappingProxyType  # server ip -> node name


def _role_node(name: str):
    for role in ("server", "client"):
        if name.startswith(role + "-"):
            return role, name[len(role) + 1:]
    return None, name


class Collector:
    """Polls appliances in background threads and publishes State; ingest_* also feeds recordings."""

    def __init__(self, sources, title: str = "", names=None, interval: float = 0.5, clock=time.time) -> None:
        self.title = title
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._sources: dict = {}
        for name, path in sources:
            role, node = _role_node(name)
            self._sources[name] = SourceView(name, str(path), role, node, None, None, None, None)
        self._events: deque = deque(maxlen=EVENT_KEEP)
        self._seen: dict = {name: (set(), deque()) for name in self._sources}
        self._bridge: deque = deque(maxlen=HISTORY)
        self._conn_hist: dict = {}
        self._objects: OrderedDict = OrderedDict()
        self._names = dict(names or {})
        self._dirty = True
        self._stop = threading.Event()
        self._threads: list = []
        self._socks: set = set()
        self.state = self.publish()

    # -- ingest (under the lock; also the tests' entry point) ---------------------------------

    def ingest_status(self, name: str, answer: dict, t: Optional[float] = None) -> None:
        t = self.clock() if t is None else t
        with self._lock:
            src = self._sources[name]
            was_down = src.error is not None
            role = src.role or answer.get("role")
            node = answer.get("node") or src.node
            self._sources[name] = dataclasses.replace(src, snapshot=answer, error=None, ok_at=t, down_since=None,
                                                      role=role, node=node, polls=src.polls + 1)
            if was_down:
                self._top_event(t, "top_reachable", source=name)
            try:  # derived state (rates, the object cache): an odd snapshot must not stop the poller
                if role == "client":
                    self._ingest_client(answer, t)
                elif role == "server":
                    self._ingest_server(node, answer)
            except (AttributeError, KeyError, TypeError, ValueError, IndexError):
                pass
            self._dirty = True

    def ingest_error(self, name: str, message: str, t: Optional[float] = None) -> None:
        t = self.clock() if t is None else t
        with self._lock:
            src = self._sources[name]
            if src.error is None:  # first failure (or never answered): log the transition once
                self._top_event(t, "top_unreachable", source=name, error=message)
            self._sources[name] = dataclasses.replace(src, error=message, down_since=src.down_since or t,
                                                      polls=src.polls + 1)
            self._dirty = True

    def ingest_event(self, name: str, ev: dict) -> None:
        if not isinstance(ev, dict) or "event" not in ev:
            return
        key = json.dumps(ev, sort_keys=True, default=str)
        with self._lock:
            seen, order = self._seen.setdefault(name, (set(), deque()))
            if key in seen:  # a backlog replayed after a reconnect
                return
            seen.add(key)
            order.append(key)
            if len(order) > 4 * EVENT_KEEP:
                seen.discard(order.popleft())
            self._events.append((name, ev))
            try:
                if ev.get("event") == "response_start":
                    src = self._sources.get(name)
                    self._remember_object(ev, src.node if src else None)
                elif ev.get("event") == "takeover" and isinstance(ev.get("key"), dict):
                    self._remember_takeover(ev)
            except (AttributeError, KeyError, TypeError, ValueError):
                pass
            self._dirty = True

    def set_events_connected(self, name: str, connected: bool) -> None:
        with self._lock:
            src = self._sources[name]
            if src.events_connected != connected:
                self._sources[name] = dataclasses.replace(src, events_connected=connected)
                self._dirty = True

    def _top_event(self, t: float, kind: str, **fields) -> None:
        self._events.append(("top", {"t": t, "event": kind, **fields}))

    def _ingest_client(self, answer: dict, t: float) -> None:
        bridge = answer.get("bridge") or {}
        sample = {}
        for d in ("in", "out"):
            st = bridge.get(d) or {}
            sample[d] = {k: st.get(k, 0) for k in ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes", "to_python",
                                                   "dropped", "tx_errors", "truncated")}
        self._bridge.append((t, sample))
        live = set()
        for c in answer.get("connections") or []:
            try:
                key = _ep(c["client"])
                c2s = c.get("client_to_server") or {}
            except (KeyError, TypeError):
                continue
            live.add(key)
            if c2s.get("frames") and c2s.get("flags_seen", ACK_FLAG) & ACK_FLAG and c2s.get("ack") is not None:
                hist = self._conn_hist.setdefault(key, deque(maxlen=HISTORY))
                hist.append((t, c2s["ack"]))
        for key in list(self._conn_hist):
            if key not in live:
                del self._conn_hist[key]

    def _ingest_server(self, node: Optional[str], answer: dict) -> None:
        for field in ("address", "ip"):  # the replica's service address, if the snapshot says it
            ip = answer.get(field)
            if node and isinstance(ip, str) and ip not in self._names:
                self._names[ip] = node
        for c in answer.get("connections") or []:
            reqs = c.get("requests") or []
            cur = c.get("current")
            req = reqs[cur] if isinstance(cur, int) and 0 <= cur < len(reqs) else (reqs[-1] if reqs else None)
            if req and req.get("response"):
                self._remember_object({"client": c.get("client"), "client_port": c.get("client_port"),
                                       "server": c.get("server"), "server_port": c.get("server_port"),
                                       "na": c.get("na"), "request": req, "response": req["response"]}, node)

    def _remember_object(self, ev: dict, node: Optional[str]) -> None:
        resp = ev.get("response") or {}
        req = ev.get("request") or {}
        if ev.get("client") is None or ev.get("client_port") is None:
            return
        key = f"{ev['client']}:{ev['client_port']}"
        obj = {"path": req.get("path"), "method": req.get("method"), "status": resp.get("status"),
               "body_start": resp.get("body_start"), "content_length": resp.get("content_length"),
               "total_length": resp.get("total_length"), "offset": resp.get("content_range_first") or 0,
               "na": ev.get("na"), "node": node, "server": ev.get("server"), "resumable": resp.get("resumable")}
        old = self._objects.get(key)
        if old is not None and old.get("body_start") == obj["body_start"] and old.get("na") == obj["na"]:
            # the same response seen again (e.g. by the replica that took it over): keep the first node
            obj["node"] = old.get("node") or node
        self._objects[key] = obj
        self._objects.move_to_end(key)
        while len(self._objects) > OBJECT_KEEP:
            self._objects.popitem(last=False)

    def _remember_takeover(self, ev: dict) -> None:
        """A takeover names the dead node's connection and its object: enough for the object
        column when the dead replica's own events were never seen (a dashboard started later),
        and for progress too if it carries the entry's body_start and body_length."""
        k = ev["key"]
        key = f"{k.get('client')}:{k.get('client_port')}"
        old = self._objects.get(key)
        if old is not None and old.get("body_start") is not None:
            return
        self._objects[key] = {"path": ev.get("path"), "method": None, "status": ev.get("status"),
                              "body_start": ev.get("body_start"), "content_length": ev.get("body_length"),
                              "total_length": ev.get("total_length"), "offset": ev.get("body_offset") or 0,
                              "na": ev.get("na"), "node": ev.get("dead"), "server": k.get("server"),
                              "resumable": True}
        self._objects.move_to_end(key)

    def publish(self, now: Optional[float] = None) -> State:
        """Build the State from what was ingested (the render side only ever reads self.state)."""
        with self._lock:
            order = sorted(self._sources.values(),
                           key=lambda s: (0 if s.role == "server" else 1 if s.role == "client" else 2, s.node or s.name))
            state = State(
                title=self.title, now=self.clock() if now is None else now, interval=self.interval,
                sources=tuple(order),
                events=tuple(sorted(self._events, key=lambda e: _num(e[1].get("t")))),
                bridge_history=tuple(self._bridge),
                conn_history=MappingProxyType({k: tuple(v) for k, v in self._conn_hist.items()}),
                objects=MappingProxyType(dict(self._objects)),  # entries are replaced, never changed
                names=MappingProxyType(dict(self._names)),
            )
            self._dirty = False
        self.state = state
        return state

    # -- threads -----------------------------------------------------------------------------

    def start(self) -> None:
        for name in list(self._sources):
            for target in (self._status_loop, self._events_loop):
                th = threading.Thread(target=target, args=(name,), name=f"top-{target.__name__}-{name}", daemon=True)
                th.start()
                self._threads.append(th)
        th = threading.Thread(target=self._publish_loop, name="top-publish", daemon=True)
        th.start()
        self._threads.append(th)

    def stop(self) -> None:
        self._stop.set()
        for s in list(self._socks):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 1.0  # a poller stuck on a hung appliance is a daemon: not waited for
        for th in self._threads:
            th.join(max(0.0, deadline - time.monotonic()))

    def _publish_loop(self) -> None:
        while not self._stop.wait(PUBLISH_EVERY):
            if self._dirty:
                self.publish()
        self.publish()

    def poll_status(self, name: str) -> None:
        from .control import ControlError, call
        path = self._sources[name].path
        try:
            answer = call(path, {"cmd": "status"}, timeout=STATUS_TIMEOUT)
        except ControlError as exc:
            self.ingest_error(name, str(exc))
        except Exception as exc:  # noqa: BLE001  whatever goes wrong, the dashboard carries on
            self.ingest_error(name, f"{type(exc).__name__}: {exc}")
        else:
            self.ingest_status(name, answer)

    def _status_loop(self, name: str) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.poll_status(name)
            self._stop.wait(max(0.05, self.interval - (time.monotonic() - started)))

    def read_events(self, name: str, until=None, idle: Optional[float] = None) -> None:
        """Follow one appliance's event stream (backlog first) until stop, EOF, `until`
        (monotonic deadline) or `idle` seconds without a line."""
        from .control import ControlError, connect
        path = self._sources[name].path
        try:
            s = connect(path, 2.0)
        except ControlError:
            return
        self._socks.add(s)
        self.set_events_connected(name, True)
        try:
            s.sendall(b'{"cmd": "events", "backlog": true}\n')
            s.settimeout(0.25)
            buf = b""
            quiet_since = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if until is not None and now >= until or idle is not None and now - quiet_since >= idle:
                    return
                try:
                    chunk = s.recv(1 << 16)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                quiet_since = time.monotonic()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        continue
                    self.ingest_event(name, ev)
        except OSError:
            return
        finally:
            self._socks.discard(s)
            s.close()
            self.set_events_connected(name, False)

    def _events_loop(self, name: str) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            started = time.monotonic()
            self.read_events(name)
            if time.monotonic() - started > 5:
                backoff = 0.2
            self._stop.wait(backoff)
            backoff = min(2.0, backoff * 2)

    def poll_once(self, settle: float = 0.0) -> State:
        """One synchronous round (for --once): status and event backlog of every appliance,
        in parallel; with `settle`, a second status round that much later (rates need two)."""
        def one(name):
            self.poll_status(name)
            self.read_events(name, until=time.monotonic() + 1.5, idle=0.3)

        threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in self._sources]
        for th in threads:
            th.start()
        for th in threads:
            th.join(STATUS_TIMEOUT + 3)
        if settle > 0:
            time.sleep(settle)
            threads = [threading.Thread(target=self.poll_status, args=(n,), daemon=True) for n in self._sources]
            for th in threads:
                th.start()
            for th in threads:
                th.join(STATUS_TIMEOUT + 1)
        return self.publish()


def collector_from_recording(recording: dict, until: Optional[float] = None, title: Optional[str] = None,
                             interval: float = 0.5) -> Collector:
    """A Collector fed a recording (tests/data/top/record.py writes them) up to time `until`:

        {"title", "sockets": {name: path}, "names": {ip: node},
         "samples": [{"t", "snapshots": {name: status answer | {"ok": false, "error": msg}}}, ...],
         "events": {name: [event, ...]}}

    Its state's `now` is the last sample's time (or `until`)."""
    samples = [s for s in recording.get("samples") or [] if until is None or s["t"] <= until]
    names = []
    for sample in samples:
        names += [n for n in sample["snapshots"] if n not in names]
    names += [n for n in (recording.get("sockets") or {}) if n not in names]
    names += [n for n in (recording.get("events") or {}) if n not in names]
    paths = recording.get("sockets") or {}
    clock = [samples[-1]["t"] if samples else (until or 0.0)]
    col = Collector([(n, paths.get(n, f"{n}.sock")) for n in names], title=title or recording.get("title", ""),
                    names=recording.get("names") or {}, interval=interval, clock=lambda: clock[0])
    timeline = [(s["t"], 1, "sample", s) for s in samples]
    for name, evs in (recording.get("events") or {}).items():
        timeline += [(_num(ev.get("t")), 0, name, ev) for ev in evs if until is None or _num(ev.get("t")) <= until]
    for t, _, name, item in sorted(timeline, key=lambda x: (x[0], x[1])):
        if name != "sample":
            col.ingest_event(name, item)
            continue
        for src, ans in item["snapshots"].items():
            if ans.get("ok") is False:
                col.ingest_error(src, ans.get("error") or "error", t)
            else:
                col.ingest_status(src, ans, t)
    col.publish(now=until if until is not None and not samples else clock[0])
    return col


# --- small formatting helpers -----------------------------------------------------------------


def _num(v, default=0.0) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _ep(v) -> str:
    """An endpoint ([ip, port], (ip, port), "ip:port" or a key dict) as "ip:port"."""
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return f"{v[0]}:{v[1]}"
    if isinstance(v, dict) and "client" in v:
        return f"{v.get('client')}:{v.get('client_port')}"
    return str(v)


def _ip(v) -> Optional[str]:
    if isinstance(v, (list, tuple)) and v:
        return str(v[0])
    if isinstance(v, str):
        return v.rsplit(":", 1)[0] if v.count(":") == 1 else v
    return None


def fmt_bytes(n, suffix: str = "") -> str:
    n = _num(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}{suffix}" if unit == "B" else f"{n:.1f} {unit}{suffix}"
        n /= 1024
    return f"{n:.1f}"


def fmt_count(n) -> str:
    n = _num(n)
    if abs(n) >= 10_000_000:
        return f"{n / 1e6:.0f}M"
    if abs(n) >= 10_000:
        return f"{n / 1e3:.0f}k"
    if n == int(n):
        return f"{int(n)}"
    return f"{n:.1f}"


def fmt_duration(s) -> str:
    if s is None:
        return "—"
    s = _num(s)
    if s < 0:
        s = 0.0
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _plural(n, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt_time(t) -> str:
    t = _num(t)
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def sparkline(values, width: int, unicode: bool = True) -> str:
    """The last `width` values as block characters, scaled to their maximum."""
    chars = SPARK if unicode else SPARK_ASCII
    vals = [max(0.0, _num(v)) for v in list(values)[-width:]] if width > 0 else []
    if not vals:
        return ""
    top = max(vals)
    if top <= 0:
        return chars[0] * len(vals)
    return "".join(chars[min(len(chars) - 1, int(v / top * (len(chars) - 1) + 0.5))] for v in vals)


def progress_bar(fraction: Optional[float], width: int, unicode: bool = True, color: str = "green") -> Text:
    width = max(1, width)
    if fraction is None:
        return Text(("░" if unicode else "-") * width, style="dim")
    fraction = min(1.0, max(0.0, fraction))
    full, empty = ("█", "░") if unicode else ("#", "-")
    eighths = "▏▎▍▌▋▊▉"
    cells = fraction * width
    n = int(cells)
    out = Text(full * n, style=color if fraction < 1 else f"bold {color}")
    if n < width:
        part = cells - n
        k = int(part * 8)
        if unicode and k > 0:
            out.append(eighths[k - 1], style=color)
            n += 1
        out.append(empty * (width - n), style="grey37")
    return out


def _rates(history, direction: str, key: str) -> list:
    """Per-second rates between consecutive samples (a counter that went back is a restart: skipped)."""
    out = []
    prev = None
    for t, sample in history:
        cur = (sample.get(direction) or {}).get(key)
        if prev is not None and cur is not None and prev[1] is not None:
            dt = t - prev[0]
            d = cur - prev[1]
            if dt > 0 and d >= 0:
                out.append(d / dt)
        prev = (t, cur)
    return out


# --- derived views (pure) -----------------------------------------------------------------------

SEVERITY = {"dead": 3, "suspect": 2, "alive": 1}
STATE_STYLE = {"alive": "bold green", "suspect": "bold yellow", "dead": "bold red", "self": "green",
               "unknown": "dim", "unreachable": "bold red"}


def _servers(state: State) -> list:
    return [s for s in state.sources if s.role == "server"]


def _client(state: State) -> Optional[SourceView]:
    for s in state.sources:
        if s.role == "client":
            return s
    return None


def group_view(state: State) -> list:
    """One row per node of the support group, merged from every reachable server appliance's peers."""
    servers = _servers(state)
    nodes = []
    for s in servers:
        if s.node and s.node not in nodes:
            nodes.append(s.node)
    for s in servers:
        snap = s.live
        for peer in sorted(((snap or {}).get("group") or {}).get("peers") or {}):
            if peer not in nodes:
                nodes.append(peer)
    rows = []
    for node in nodes:
        src = next((s for s in servers if s.node == node), None)
        views = {}
        ages = {}
        for s in servers:
            snap = s.live
            info = (((snap or {}).get("group") or {}).get("peers") or {}).get(node)
            if s.node != node and isinstance(info, dict):
                views[s.node] = info
                ages[s.node] = max(0.0, state.now - _num(snap.get("time"), state.now))
        own = (src.live or {}).get("group") if src is not None else None
        row = {"node": node, "appliance": "—" if src is None else ("up" if src.reachable else "unreachable"),
               "error": src.error if src is not None else None, "down_since": src.down_since if src else None,
               "views": {o: v.get("state") for o, v in views.items()}, "phi": None, "silence": None,
               "load": None, "connections": None, "capacity": None, "entries": None, "local_entries": None}
        if views:
            row["state"] = max((v.get("state") or "unknown" for v in views.values()),
                               key=lambda st: SEVERITY.get(st, 0))
            phis = [_num(v.get("phi"), None) for v in views.values() if v.get("phi") is not None]
            row["phi"] = max(phis) if phis else None
            # a peer's silence as of its observer's snapshot; a silent one's keeps growing since
            sil = [_num(v.get("silence")) + (ages[o] if v.get("state") in ("suspect", "dead") else 0.0)
                   for o, v in views.items() if v.get("silence") is not None]
            row["silence"] = min(sil) if sil else None
            freshest = min(views, key=lambda o: _num(views[o].get("silence"), 1e9))
            f = views[freshest]
            row.update(load=f.get("load"), connections=f.get("connections"), capacity=f.get("capacity"))
            ents = [v.get("entries") for v in views.values() if v.get("entries") is not None]
            row["entries"] = max(ents) if ents else None
        elif own is not None:
            row["state"] = "self"
        elif src is not None and not src.reachable:
            row["state"] = "unreachable"
        else:
            row["state"] = "unknown"
        if own is not None:
            row["local_entries"] = own.get("local_entries")
            if row["load"] is None:
                row["load"] = own.get("advertised_load")
            if row["connections"] is None:
                row["connections"] = len((src.live or {}).get("connections") or [])
        rows.append(row)
    return rows


def group_totals(state: State) -> dict:
    """The group's counters summed over the reachable server appliances; with their takeover
    engines' outcomes ("outcomes": False when no engine reports any)."""
    tot = {"deaths": 0, "takeovers": 0, "races": 0, "false_suspicions": 0, "restarts": 0, "outcomes": False,
           "resumed": 0, "reset": 0, "passed": 0, "failed": 0}
    for s in _servers(state):
        g = (s.live or {}).get("group") or {}
        c = g.get("group") or {}
        tot["deaths"] += int(_num(c.get("deaths")))
        tot["takeovers"] += int(_num(c.get("actions")))
        tot["races"] += int(_num(c.get("races")))
        tot["false_suspicions"] += int(_num(c.get("false_suspicions")))
        tot["restarts"] += int(_num(c.get("restarts")))
        tk = ((s.live or {}).get("takeover") or {}).get("counters")
        if isinstance(tk, dict) and "outcome_reset" in tk:
            tot["outcomes"] = True
            for k in ("resumed", "reset", "passed", "failed"):
                tot[k] += int(_num(tk.get(f"outcome_{k}")))
    return tot


def outcome_totals(state: State) -> dict:
    """How many connections were resumed and how many clients were reset: the client
    appliance's counters when it reports them (it sees every outcome, a MIGRATE-WAIT that
    ended too), else the takeover engines' counters, else the outcomes in the event log.
    "source": "client", "servers", "events" or None (nothing reports outcomes)."""
    client = _client(state)
    sh = ((client.live or {}).get("shim") if client is not None else None) or {}
    if isinstance(sh, dict) and "outcome_reset" in sh:
        return {"resumed": int(_num(sh.get("outcome_resumed"))), "reset": int(_num(sh.get("outcome_reset"))),
                "source": "client"}
    tot = group_totals(state)
    if tot["outcomes"]:
        return {"resumed": tot["resumed"], "reset": tot["reset"], "source": "servers"}
    resumed, reset = set(), set()
    for _src, ev in state.events:
        k = ev.get("event")
        if k == "client_reset" and ev.get("client") is not None:
            reset.add(_ep(ev["client"]))
        elif takeover_step(ev) == "outcome" and ev.get("outcome") in ("resumed", "reset"):
            (resumed if ev["outcome"] == "resumed" else reset).add(f"{ev.get('client')}:{ev.get('client_port')}")
    if not resumed and not reset:
        return {"resumed": 0, "reset": 0, "source": None}
    return {"resumed": len(resumed - reset), "reset": len(reset), "source": "events"}


def _node_states(state: State) -> dict:
    return {r["node"]: r["state"] for r in group_view(state)}


def _name(state: State, ep) -> str:
    ip = _ip(ep)
    return state.names.get(ip, ip or "?") if ip else "?"


_ADDRESS = re.compile(r"(?<![\w.:])\d{1,3}(?:\.\d{1,3}){3}(?![\w.])")


def reason_text(state: State, reason) -> str:
    """A reset's reason for a narrow cell: the replicas' addresses as their node names
    ("10.70.2.2 cannot continue it" -> "b cannot continue it"), on one line."""
    if reason is None:
        return ""
    text = " ".join(str(reason).split())
    return _ADDRESS.sub(lambda m: state.names.get(m.group(0), m.group(0)), text)


def connection_view(state: State) -> tuple:
    """(rows, source description). Rows from the client appliance when it answers, else from
    the replicas' stream maps."""
    client = _client(state)
    states = _node_states(state)
    # the newest takeover claim per connection, and the newest migration
    # and the resets: the client appliance's (client_reset) and the replicas' (a takeover
    # whose outcome is a reset: its reason says why nobody could continue the connection)
    claims, migrated, client_resets, server_resets = {}, {}, {}, {}
    for src, ev in state.events:
        kind = ev.get("event")
        step = takeover_step(ev)
        if kind == "takeover" and isinstance(ev.get("key"), dict):
            claims[_ep(ev["key"])] = (src, ev)
        elif step is not None:
            key = f"{ev.get('client')}:{ev.get('client_port')}"
            claims[key] = (src, ev)
            if step == "outcome" and ev.get("outcome") == "reset" or step == "refused" and not ev.get("planned"):
                server_resets[key] = (src, ev)
        elif kind in ("migrated", "migrate_accepted") and ev.get("client") is not None:
            migrated[_ep(ev["client"])] = ev
        elif kind == "client_reset" and ev.get("client") is not None:
            client_resets[_ep(ev["client"])] = ev
    rows = []
    if client is not None and client.live is not None:
        for c in client.live.get("connections") or []:
            try:
                key = _ep(c["client"])
            except (KeyError, TypeError):
                continue
            c2s = c.get("client_to_server") or {}
            ssyn = c.get("server_syn") or {}
            obj = state.objects.get(key)
            if obj is not None and obj.get("na") is not None and ssyn.get("isn") is not None \
                    and obj["na"] != ssyn["isn"]:
                obj = None  # another connection from the same client port
            ack = c2s.get("ack") if c2s.get("frames") and c2s.get("flags_seen", ACK_FLAG) & ACK_FLAG else None
            acked = length = None
            if ack is not None and obj is not None and obj.get("body_start") is not None:
                d = (ack - obj["body_start"]) & MASK32
                acked = 0 if d >= 0x80000000 else d
                length = obj.get("content_length")
                if length is not None:
                    acked = min(acked, length)
            elif ack is not None and ssyn.get("isn") is not None:
                d = (ack - ssyn["isn"] - 1) & MASK32
                acked = 0 if d >= 0x80000000 else d
            hist = state.conn_history.get(key) or ()
            rate = None
            if len(hist) >= 2:
                recent = [h for h in hist if h[0] >= hist[-1][0] - 1.5]
                if len(recent) < 2:
                    recent = hist[-2:]
                dt = recent[-1][0] - recent[0][0]
                if dt > 0:
                    rate = ((recent[-1][1] - recent[0][1]) & MASK32) / dt
            owner = _name(state, c.get("current") or c.get("server"))
            row = {"client": key, "object": (obj or {}).get("path"), "acked": acked, "length": length,
                   "length_known": obj is not None and length is not None, "owner": owner,
                   "owner_state": states.get(owner), "migrations": c.get("migrations", 0),
                   "state": c.get("state"), "closed_by": c.get("closed_by"), "rate": rate,
                   "servers": [_name(state, s) for s in c.get("servers") or []],
                   "migrating_to": _name(state, c["migrating_to"]) if c.get("migrating_to") else None,
                   "rst_held": c.get("rst_held"), "claim": None, "claim_phase": None, "opened": c.get("opened"),
                   "outcome": c.get("outcome"), "outcome_reason": c.get("outcome_reason"), "reset_by": None,
                   "reset_reason": None}
            creset = client_resets.get(key)
            if "outcome" not in c and creset is not None:  # a client appliance without outcomes in its status
                row["outcome"], row["outcome_reason"] = "reset", creset.get("reason")
            if row["state"] == "resetting":
                row["outcome"] = "reset"
            if row["outcome"] == "reset":
                sreset = server_resets.get(key)
                # the replica's reason, if it is this reset's (not an older connection's from this port)
                if sreset is not None and (creset is None
                                           or abs(_num(sreset[1].get("t")) - _num(creset.get("t"))) < 30):
                    row["reset_by"] = _short(sreset[0])
                    row["reset_reason"] = sreset[1].get("reason")
            claim = claims.get(key)
            if claim is not None:
                src, ev = claim
                mig = migrated.get(key)
                if mig is None or _num(mig.get("t")) < _num(ev.get("t")):
                    row["claim"] = src.split("-", 1)[-1]
                    row["claim_phase"] = _phase_label(ev)
            rows.append(row)
        source = "client"
    else:
        for s in _servers(state):
            for c in (s.live or {}).get("connections") or []:
                key = f"{c.get('client')}:{c.get('client_port')}"
                obj = state.objects.get(key) or {}
                rows.append({"client": key, "object": obj.get("path"), "acked": None,
                             "length": obj.get("content_length"), "length_known": obj.get("content_length") is not None,
                             "owner": s.node, "owner_state": states.get(s.node), "migrations": None,
                             "state": c.get("state"), "closed_by": c.get("closed_by"), "rate": None, "servers": [],
                             "migrating_to": None, "rst_held": None, "claim": None, "claim_phase": None,
                             "opened": c.get("opened_at"), "outcome": None, "outcome_reason": None,
                             "reset_by": None, "reset_reason": None})
        source = "servers"
    order = {"resetting": 0, "migrating": 1, "established": 2, "syn_sent": 3}
    # a reset client first: it must never be among the rows left out
    rows.sort(key=lambda r: (0 if r["outcome"] == "reset" else 1, order.get(r["state"], 4), -_num(r.get("opened"))))
    return rows, source


NOBODY = "no member can serve it: "  # the takeover engine's reason when the last candidate cannot


def reset_text(state: State, row: dict, short: bool = False) -> str:
    """Why a reset connection was reset: the replica's reason when its takeover engine said
    one ("by b: no member can serve it: ..."), else the client appliance's; `short` (a
    table cell, next to "RESET") leaves out what RESET already says."""
    if row.get("reset_by") and row.get("reset_reason"):
        why = reason_text(state, row["reset_reason"])
        if short and why.startswith(NOBODY) and len(why) > len(NOBODY):
            why = why[len(NOBODY):]
        return f"by {row['reset_by']}: {why}"
    return reason_text(state, row.get("outcome_reason")) or "reason unknown"


# --- the event log --------------------------------------------------------------------------------

# the takeover engine's steps (appliance.takeover), as the server appliance logs them; the kind
# may come bare or prefixed with "takeover_"; the phase a connection's owner cell shows
TAKEOVER_PHASES = {"checked": "checked", "passed": "passed", "claimed": "claimed",
                   "migrate_syn_sent": "Migrate SYN sent", "synack": "SYN/ACK", "repaired": "repaired",
                   "resynced": "resynced", "reprobe": "probing again", "resumed": "resumed", "first_byte": "sending",
                   "body_sent": "body sent", "done": "done", "refused": "client reset", "failed": "failed",
                   "outcome": "over"}
OUTCOME_STYLE = {"resumed": "bold green", "reset": "bold red", "passed": "yellow", "failed": "bold red"}


def takeover_step(ev: dict) -> Optional[str]:
    """The takeover step an event reports (bare kind), or None."""
    k = ev.get("event") or ""
    k = k[len("takeover_"):] if k.startswith("takeover_") else k
    if k in TAKEOVER_PHASES and ev.get("client_port") is not None:
        return k
    return None


def _phase_label(ev: dict) -> Optional[str]:
    """The phase a takeover step puts its connection in (the owner cell: "a✗ → c? (SYN/ACK)")."""
    step = takeover_step(ev)
    if step is None:
        return None
    if step == "outcome":
        return {"reset": "client reset"}.get(ev.get("outcome"), ev.get("outcome") or "over")
    if step == "checked":
        return "checked" if ev.get("ok") else "check failed"
    if step == "refused" and ev.get("planned"):
        return "given back"
    return TAKEOVER_PHASES[step]


def event_style(ev: dict) -> str:
    """The log line's style: by kind, and for some by what the event says (an outcome, a check)."""
    step = takeover_step(ev)
    if step == "outcome":
        return OUTCOME_STYLE.get(ev.get("outcome"), "")
    if step == "refused":
        return "yellow" if ev.get("planned") else "bold red"
    if step == "checked":
        return "dim" if ev.get("ok") else "yellow"
    if step is not None:
        return TAKEOVER_STYLE[step]
    return EVENT_STYLE.get(ev.get("event"), "")


EVENT_STYLE = {
    "peer_dead": "bold red", "top_unreachable": "bold red", "migrate_rejected": "bold red", "race": "red",
    "migrate_lock_timeout": "red", "conn_reset": "red", "takeover_failed": "bold red",
    "peer_suspect": "yellow", "false_suspicion": "yellow", "peer_restarted": "yellow", "rst_held": "yellow",
    "claim_heard": "magenta", "takeover": "bold magenta", "migrate_accepted": "cyan", "migrated": "bold green",
    "peer_alive": "green", "peer_new": "green", "top_reachable": "green",
    "peer_discovered": "dim", "peer_learned": "dim", "zeroconf_registered": "dim", "conn_open": "dim",
    "conn_established": "dim", "response_start": "dim", "conn_close": "dim", "conn_forgotten": "dim",
    "started": "dim", "stopped": "dim", "request": "dim", "peer_draining": "yellow", "peer_drain_over": "green",
    "client_reset": "bold red", "migrate_answered": "cyan", "migrate_abandoned": "yellow",
    "migrate_rst_rejected": "yellow", "pass_heard": "magenta",
}
TAKEOVER_STYLE = {"checked": "dim", "passed": "yellow", "claimed": "magenta", "migrate_syn_sent": "cyan",
                  "synack": "cyan", "repaired": "cyan", "resynced": "cyan", "reprobe": "yellow",
                  "resumed": "bold green", "first_byte": "green", "body_sent": "green", "done": "green",
                  "refused": "bold red", "failed": "bold red", "outcome": ""}
_HIDDEN_FIELDS = {"t", "event", "ts"}


def _short(src: str) -> str:
    return src.split("-", 1)[1] if src.count("-") and src.split("-", 1)[0] in ("server", "client") else src


def _resume_text(state: State, client_key: str, ack) -> str:
    obj = state.objects.get(client_key)
    if ack is None:
        return ""
    if obj and obj.get("body_start") is not None:
        d = (ack - obj["body_start"]) & MASK32
        if d < 0x80000000:
            off = d + int(_num(obj.get("offset")))
            length = obj.get("content_length")
            pct = f" ({100 * d / length:.1f}%)" if length else ""
            return f"resume at byte {off:,} of {obj.get('path')}{pct}"
    return f"resume at server seq {ack}"


def _describe_takeover(state: State, step: str, ev: dict) -> Optional[str]:
    g = ev.get
    who = f"{g('client')}:{g('client_port')}"
    ms = g("since_start_ms") if g("since_start_ms") is not None else g("ms")
    at = f" at +{_num(ms):.1f} ms" if ms is not None else ""
    why = reason_text(state, g("reason"))
    if step == "checked":
        if g("cached"):
            return None  # the same object checked moments ago: silent (its pass or claim is logged)
        took = f" ({_num(g('ms')):.1f} ms)" if g("ms") is not None else ""
        return f"checked {who}{took}" if g("ok") else f"cannot serve {who}: {why}{took}"
    if step == "passed":
        return f"passes {who}: {why}"
    if step == "claimed":
        return f"claims {who} (rank {g('rank')}{', the last candidate' if g('last') else ''})"
    if step == "reprobe":
        return f"no answer from {who} to the window probe: probing again (#{g('attempt')}){at}"
    if step == "resynced":
        gap = g("gap")
        return f"{who} was {gap:,} bytes past its SYN/ACK: caught up" if isinstance(gap, int) else \
            f"{who} was past its SYN/ACK: caught up"
    if step == "outcome":
        out = g("outcome")
        if out == "reset":
            return f"outcome of {who}: client RESET: {why}"
        if out == "failed":
            return f"outcome of {who}: FAILED: {why}"
        if out == "passed":
            return f"outcome of {who}: passed on ({why})"
        return f"outcome of {who}: {out}" + (f" ({why})" if why else "")
    if step == "migrate_syn_sent":
        return f"Migrate SYN #{g('attempt') or 1} sent to {who} (reqno {g('reqno')}){at}"
    if step == "synack":
        rtt = f", rtt {g('rtt_ms')} ms" if g("rtt_ms") is not None else ""
        return f"SYN/ACK from {who}'s appliance: seq {g('seq')} ack {g('ack')}{rtt}{at}"
    if step == "repaired":
        rep = f" in {g('repair_ms')} ms" if g("repair_ms") is not None else ""
        return f"socket for {who} repaired{rep} (plan {g('plan')}){at}"
    if step == "resumed":
        left = f", {fmt_bytes(g('bytes_left'))} left" if g("bytes_left") is not None else ""
        off = g("offset")
        return f"{who} RESUMED at byte {off:,}{left} ({g('mode')}){at}" if isinstance(off, int) else \
            f"{who} resumed ({g('mode')}){left}{at}"
    if step == "first_byte":
        return f"first byte to {who}{at}"
    if step == "body_sent":
        return f"rest of the body to {who} sent: {fmt_bytes(g('bytes'))} in {g('seconds')} s"
    if step == "done":
        return f"takeover of {who} done: {fmt_bytes(g('bytes'))} in {g('seconds')} s ({g('end')})"
    if step == "refused":  # a Migrate RST: P set resets the client, clear (planned) gives it back
        if g("planned"):
            return f"gives {who} back to its server: {why} (Migrate RST without P)"
        return f"resets the client {who}: {why} (Migrate RST){at}"
    return f"takeover of {who} FAILED: {g('reason')}{at}"


def describe_event(state: State, src: str, ev: dict) -> Optional[str]:
    """One event as a line of the log (what it carries, in words); None: not worth a line."""
    k = ev.get("event")
    g = ev.get
    name = lambda ep: _name(state, ep)  # noqa: E731
    try:
        if k == "peer_dead":
            return (f"peer {g('node')} DEAD after {g('silence_ms')} ms of silence "
                    f"({_plural(g('connections'), 'connection')})")
        if k == "peer_draining":
            return f"peer {g('node')} draining ({_plural(g('connections'), 'connection')} to move)"
        if k == "peer_drain_over":
            return f"peer {g('node')} no longer draining"
        if k == "peer_suspect":
            return f"peer {g('node')} suspect"
        if k == "peer_alive":
            return f"peer {g('node')} alive"
        if k == "peer_new":
            return f"peer {g('node')} joined (epoch {g('epoch')})"
        if k == "false_suspicion":
            return f"peer {g('node')} was falsely suspected: alive again, {g('cancelled')} takeovers cancelled"
        if k == "peer_restarted":
            return f"peer {g('node')} restarted (epoch {g('old_epoch')} -> {g('new_epoch')})"
        if k == "claim_heard":
            return f"heard {g('by')} claim {_plural(g('connections'), 'connection')} of dead {g('dead')}"
        if k == "race":
            return f"race with {g('other')} for {g('key')} of dead {g('dead')}"
        if k == "pass_heard":
            due = f": {g('now_due')} due here now" if g("now_due") else ""
            return f"heard {g('by')} pass on {_plural(g('connections'), 'connection')} of dead {g('dead')}{due}"
        if k == "takeover":
            notes = [f"rank {g('rank')}"]
            if g("last"):
                notes.append("the last candidate")
            if g("state") not in (None, "ACTIVE"):
                notes.append(f"{g('state')} entry")
            return f"takes over {_ep(g('key'))} {g('path') or ''} from dead {g('dead')} ({', '.join(notes)})"
        if k in ("peer_discovered", "peer_learned"):
            return f"found peer {g('node')} at {_ep(g('addr'))} via {g('via')}"
        if k == "zeroconf_registered":
            return f"registered {g('name')}"
        if k == "conn_open":
            tag = "tagged Migrate-Permitted" if g("tagged") else (
                "Migrate-Permitted" if g("migrate_permitted") else "not migratable")
            return f"open {_ep(g('client'))} -> {name(g('server'))} ({tag})"
        if k == "conn_established":
            return f"established {_ep(g('client'))} -> {name(g('server'))}"
        if k == "migrate_accepted":
            key = _ep(g("client"))
            resume = _resume_text(state, key, g("ack"))  # older client appliances said the ack here
            return (f"Migrate SYN from {name(g('to'))} accepted for {key} (was {name(g('from'))}, "
                    f"reqno {g('reqno')})" + (f": {resume}" if resume else ", probing the client's position"))
        if k == "migrate_answered":
            key = _ep(g("client"))
            how = "position probed" if g("probed") else "position estimated: no answer to the probe"
            sack = g("sack") or []
            above = f", {_plural(len(sack), 'SACK block')} above a hole" if sack else ""
            return (f"answers {name(g('to'))}'s Migrate SYN for {key} ({how}{above}): "
                    f"{_resume_text(state, key, g('ack'))}")
        if k == "client_reset":
            seqs = g("seqs")
            rsts = f" ({_plural(len(seqs), 'RST')})" if isinstance(seqs, list) else ""
            return f"resets the client {_ep(g('client'))}: {reason_text(state, g('reason'))}{rsts}"
        if k == "migrate_abandoned":
            return (f"migration of {_ep(g('client'))} to {name(g('to'))} abandoned: "
                    f"{reason_text(state, g('reason'))}; it stays with its server")
        if k == "migrate_rst_rejected":
            return (f"Migrate RST from {name(g('from'))} REJECTED for {_ep(g('client'))}: "
                    f"not the accepted migration's (ignored)")
        if k == "migrated":
            key = _ep(g("client"))
            took = ""
            t_mig, old = _num(g("t")), name(g("from"))
            causes = [e for s, e in state.events if e.get("event") in ("peer_dead", "peer_draining")
                      and e.get("node") == old and t_mig - 30.0 <= _num(e.get("t")) <= t_mig]
            if causes:  # the first observer's verdict of the latest death (or drain) before it
                latest = max(_num(e.get("t")) for e in causes)
                first = min((e for e in causes if e.get("event") == "peer_dead" and latest - _num(e.get("t")) < 1.0)
                            or [e for e in causes if _num(e.get("t")) == latest], key=lambda e: _num(e.get("t")))
                why = "was declared dead" if first.get("event") == "peer_dead" else "started draining"
                took = f", {(t_mig - _num(first.get('t'))) * 1000:.0f} ms after {old} {why}"
            return (f"{key} MIGRATED {name(g('from'))} -> {name(g('to'))} (reqno {g('reqno')}, "
                    f"network lock {g('lock_ms')} ms{took})")
        if k == "migrate_rejected":
            return (f"Migrate SYN from {name(g('from'))} REJECTED for {_ep(g('client'))}: {g('reason')} "
                    f"(reqno {g('reqno')})")
        if k == "rst_held":
            return f"RST from {name(g('server'))} held for {_ep(g('client'))} ({g('seconds')} s MIGRATE-WAIT)"
        if k == "migrate_lock_timeout":
            return f"{_ep(g('client'))}: {name(g('to'))} never answered; back to the previous server"
        if k == "conn_reset":
            return f"{_ep(g('client'))} reset by the {g('by')}"
        if k == "conn_forgotten":
            return f"forgot {_ep(g('client'))} ({g('state')})"
        if k == "response_start":
            req, resp = g("request") or {}, g("response") or {}
            return (f"{g('client')}:{g('client_port')} {req.get('method', '')} {req.get('path', '')} -> "
                    f"{resp.get('status')} {fmt_bytes(resp.get('content_length'))}"
                    f"{'' if resp.get('resumable') else ' (not resumable)'}")
        if k == "conn_close":
            return (f"close {g('client')}:{g('client_port')} ({g('close_reason') or g('state')}, by "
                    f"{g('closed_by')}, {g('responses_total')} responses)")
        step = takeover_step(ev)
        if step is not None:
            return _describe_takeover(state, step, ev)
        if k == "top_unreachable":
            return f"{g('source')} UNREACHABLE: {g('error')}"
        if k == "top_reachable":
            return f"{g('source')} answers again"
        if k == "started":
            return "started" + (f" ({g('forwarder')} forwarder)" if g("forwarder") else "")
    except Exception:  # noqa: BLE001  an odd event still gets the generic line
        pass
    fields = []
    for f, v in ev.items():
        if f in _HIDDEN_FIELDS:
            continue
        if isinstance(v, dict) and "client" in v and "client_port" in v:
            v = _ep(v)
        elif isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
            v = _ep(v)
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, separators=(",", ":"))[:60]
        fields.append(f"{f}={v}")
    return f"{k} " + " ".join(fields)


# --- rendering ---------------------------------------------------------------------------------


def _truncate(rows: list, avail: int) -> tuple:
    """(rows to show, how many left out) when `avail` table rows fit: a "+N more" line takes one."""
    if len(rows) <= avail:
        return rows, 0
    if avail <= 1:
        return rows[:max(0, avail)], 0
    return rows[:avail - 1], len(rows) - (avail - 1)


def _state_text(st: Optional[str]) -> Text:
    st = st or "unknown"
    label = {"dead": "DEAD", "suspect": "SUSPECT", "alive": "alive"}.get(st, st)
    return Text(label, style=STATE_STYLE.get(st, ""))


def _fit_columns(specs, width: int) -> list:
    """specs: (key, min width, priority); keep the highest priorities that fit `width`."""
    chosen = list(specs)
    while len(chosen) > 1 and sum(s[1] + 1 for s in chosen) > width:
        worst = max(range(len(chosen)), key=lambda i: (chosen[i][2], i))
        chosen.pop(worst)
    return chosen


def _table(columns, width: int) -> Table:
    t = Table(box=None, padding=(0, 1, 0, 0), expand=True, show_edge=False, header_style="bold", pad_edge=False,
              collapse_padding=True)
    for key, minw, _prio, *rest in columns:
        opts = rest[0] if rest else {}
        t.add_column(opts.get("title", key), no_wrap=True, overflow="ellipsis", min_width=min(minw, width),
                     justify=opts.get("justify", "left"), ratio=opts.get("ratio"))
    return t


def render_group(state: State, width: int, rows_avail: int) -> Panel:
    rows = group_view(state)
    inner = max(10, width - 4)
    specs = [("node", 4, 0), ("appliance", 11, 1), ("state", 7, 0), ("seen as", 14, 5), ("phi", 6, 3),
             ("last heard", 10, 2), ("load", 5, 4), ("conns", 9, 4), ("entries", 7, 3)]
    cols = _fit_columns(specs, inner)
    keys = [c[0] for c in cols]
    table = _table([(c[0], c[1], c[2], {"justify": "right" if c[0] in ("phi", "load", "conns", "entries",
                                                                         "last heard") else "left"})
                    for c in cols], inner)
    if len(rows) > rows_avail:  # not all fit: the worst first
        rows = sorted(rows, key=lambda r: -max(SEVERITY.get(r["state"], 0), 3 if r["appliance"] == "unreachable" else 0))
    shown, more = _truncate(rows, rows_avail)
    for r in shown:
        cells = []
        for k in keys:
            if k == "node":
                cells.append(Text(str(r["node"]), style="bold"))
            elif k == "appliance":
                if r["appliance"] == "unreachable":
                    cells.append(Text("unreachable", style="bold red"))
                else:
                    cells.append(Text(r["appliance"], style="green" if r["appliance"] == "up" else "dim"))
            elif k == "state":
                cells.append(_state_text(r["state"]))
            elif k == "seen as":
                t = Text()
                for i, (o, st) in enumerate(sorted(r["views"].items())):
                    if i:
                        t.append(" ")
                    t.append(f"{o}:", style="dim")
                    t.append(st or "?", style=STATE_STYLE.get(st, ""))
                cells.append(t)
            elif k == "phi":
                phi = r["phi"]
                cells.append(Text("—" if phi is None else (f"{phi:.2f}" if phi < 100 else fmt_count(round(phi))),
                                  style="red" if phi is not None and phi >= 8 else ""))
            elif k == "last heard":
                sil = r["silence"]
                cells.append(Text("—" if sil is None else fmt_duration(sil) + " ago",
                                  style="red" if sil is not None and sil > 0.1 else ""))
            elif k == "load":
                cells.append(Text("—" if r["load"] is None else f"{_num(r['load']) * 100:.0f}%"))
            elif k == "conns":
                c, cap = r["connections"], r["capacity"]
                cells.append(Text("—" if c is None else (f"{c}/{cap}" if cap else f"{c}")))
            elif k == "entries":
                e = r["entries"] if r["entries"] is not None else r["local_entries"]
                cells.append(Text("—" if e is None else str(e)))
        table.add_row(*cells)
    if more:
        table.add_row(Text(f"+{more} more", style="dim"))
    if not rows:
        table.add_row(Text("no server appliance in view", style="dim"))
    tot = group_totals(state)
    sub = Text(f"deaths {tot['deaths']} · takeovers {tot['takeovers']} · races {tot['races']} · "
               f"false suspicions {tot['false_suspicions']}", style="dim")
    if tot["outcomes"]:  # the takeover engines' outcomes
        sub.append(f" · resumed {tot['resumed']} · ", style="dim")
        sub.append(f"reset {tot['reset']}", style="bold red" if tot["reset"] else "dim")
        sub.append(f" · passed {tot['passed']} · failed {tot['failed']}", style="dim")
    title = "support group"
    return Panel(table, title=Text(title, style="bold"), title_align="left",
                 subtitle=sub if width >= 60 else None, subtitle_align="right",
                 box=box.ROUNDED, padding=(0, 1))


def render_connections(state: State, width: int, rows_avail: int, unicode: bool = True) -> Panel:
    rows, source = connection_view(state)
    inner = max(10, width - 4)
    bar_w = 24 if inner >= 140 else 16 if inner >= 110 else 10 if inner >= 76 else 6 if inner >= 60 else 0
    specs = [("client", 15, 0), ("object", 10, 2), ("progress", bar_w + 7, 0), ("acked", 19, 4),
             ("owner", 7, 0), ("migr", 4, 1), ("state", 11, 3), ("rate", 10, 5), ("servers", 9, 3)]
    if not any(r.get("migrations") for r in rows):  # the servers a connection has been on: once one moved
        specs = [s for s in specs if s[0] != "servers"]
    resets = [r for r in rows if r.get("outcome") == "reset"]
    if resets:  # room for the reason in the state column, before the migration count (and the rate, acked)
        state_w = 20 if inner < 100 else min(44, inner // 3)
        specs = [("state", state_w, 1) if s[0] == "state" else ("migr", 4, 2) if s[0] == "migr" else s
                 for s in specs]
    if source != "client":
        specs = [s for s in specs if s[0] not in ("migr", "rate", "servers", "acked")]
        specs = [("length" if s[0] == "progress" else s[0], 10 if s[0] == "progress" else s[1], s[2])
                 for s in specs]
    cols = _fit_columns(specs, inner)
    keys = [c[0] for c in cols]
    right = ("acked", "migr", "rate", "length")
    table = _table([(c[0], c[1], c[2], {"justify": "right" if c[0] in right else "left",
                                        "ratio": 1 if c[0] == "object" else 3 if c[0] == "state" and resets
                                        else None})
                    for c in cols], inner)
    shown, more = _truncate(rows, rows_avail)
    for r in shown:
        closed = r["state"] == "closed"
        reset = r.get("outcome") == "reset"
        cells = []
        for k in keys:
            if k == "client":
                cells.append(Text(r["client"], style="bold red" if reset else "dim" if closed else ""))
            elif k == "object":
                cells.append(Text(r["object"] or "?", style="dim" if r["object"] is None else ""))
            elif k == "progress":
                if r["length_known"] and r["acked"] is not None:
                    frac = r["acked"] / r["length"] if r["length"] else 1.0
                    t = progress_bar(frac, bar_w, unicode, "red" if reset else "green") if bar_w else Text()
                    t.append(f"{' ' if bar_w else ''}{frac * 100:5.1f}%", style="red" if reset else "")
                else:
                    t = progress_bar(None, bar_w, unicode) if bar_w else Text()
                    t.append("    n/a" if r["acked"] is None else "    ?  ", style="dim")
                cells.append(t)
            elif k == "acked":
                if r["acked"] is None:
                    cells.append(Text("—", style="dim"))
                elif r["length_known"]:
                    cells.append(Text(f"{fmt_bytes(r['acked'])}/{fmt_bytes(r['length'])}"))
                else:
                    cells.append(Text(f"{fmt_bytes(r['acked'])}"))
            elif k == "length":
                cells.append(Text("?" if r["length"] is None else fmt_bytes(r["length"])))
            elif k == "owner":
                t = Text()
                ost = r["owner_state"]
                t.append(r["owner"] or "?", style="bold red" if ost in ("dead", "unreachable") else
                         "yellow" if ost == "suspect" else "bold")
                if ost == "dead":
                    t.append("✗" if unicode else "x", style="bold red")
                if reset:  # nobody continues it: no claim to show; where no state column fits, say it here
                    if "state" not in keys:
                        t.append(" RESET", style="bold red")
                elif r["migrating_to"]:
                    t.append(" → " if unicode else " -> ", style="cyan")
                    t.append(r["migrating_to"], style="bold cyan")
                elif r["claim"] and r["claim"] != r["owner"]:
                    t.append(" → " if unicode else " -> ", style="magenta")
                    t.append(f"{r['claim']}?", style="magenta")
                    if r["claim_phase"]:
                        t.append(f" ({r['claim_phase']})", style="magenta")
                cells.append(t)
            elif k == "migr":
                m = r["migrations"]
                cells.append(Text("—" if m is None else str(m), style="bold cyan" if m else ""))
            elif k == "state":
                if reset:  # the client got an error, not a resumption
                    t = Text("RESETTING" if r["state"] == "resetting" else "RESET", style="bold reverse red")
                    t.append(f" {reset_text(state, r, short=True)}", style="bold red")
                    cells.append(t)
                    continue
                st = r["state"] or "?"
                if closed and r["closed_by"]:
                    st = f"closed ({r['closed_by']})"
                resumed = r.get("outcome") == "resumed"
                if resumed:
                    st = f"{st}, resumed" if closed else "resumed"
                if r["rst_held"]:
                    st += " RST held"
                cells.append(Text(st, style="dim" if closed else "bold green" if resumed else {
                    "migrating": "bold cyan", "established": "green"}.get(r["state"], "")))
            elif k == "rate":
                cells.append(Text("—" if r["rate"] is None else fmt_bytes(r["rate"], "/s")))
            elif k == "servers":
                arrow = "→" if unicode else ">"
                cells.append(Text(arrow.join(r["servers"]) if r["servers"] else "—"))
        table.add_row(*cells)
    if more:
        table.add_row(Text(f"+{more} more", style="dim"))
    if not rows:
        table.add_row(Text("no connections", style="dim"))
    if source == "client":
        client = _client(state)
        who = f"client appliance {client.node}" if client else "client appliance"
        title = f"connections ({who}'s view)" if width >= 50 else f"connections ({client.node if client else 'client'})"
        sub = "progress: client ACK − body start (replica stream map) / Content-Length"
    else:
        title = "connections (replicas' stream maps)" if width >= 50 else "connections (replicas)"
        sub = "length from the stream map; progress needs the client appliance's ACKs"
    subtitle = Text(sub, style="dim") if width >= len(sub) + 10 else None
    if resets:  # the bottom border says the newest reset in full (the cell may have cut its reason)
        newest = max(resets, key=lambda r: _num(r.get("opened")))
        subtitle = Text(f"{_plural(len(resets), 'client')} RESET", style="bold reverse red")
        subtitle.append(f" {newest['client']} {reset_text(state, newest)}", style="bold red")
    return Panel(table, title=Text(title, style="bold"), title_align="left",
                 subtitle=subtitle, subtitle_align="right", box=box.ROUNDED, padding=(0, 1))


def render_fastpath(state: State, width: int, unicode: bool = True) -> Panel:
    client = _client(state)
    inner = max(10, width - 4)
    snap = client.live if client else None
    if snap is None:
        msg = Text()
        if client is None:
            msg.append("no client appliance in view", style="dim")
        else:
            msg.append(f"client appliance {client.node}: ", style="bold")
            msg.append("unreachable", style="bold red")
            msg.append(f" ({client.error})" if client.error else "", style="red")
        return Panel(msg, title=Text("fast path", style="bold"), title_align="left", box=box.ROUNDED,
                     padding=(0, 1))
    hist = state.bridge_history
    spark_w = max(0, min(40, (inner - 59) // 2))  # what the other columns leave, for two sparklines
    specs = [("dir", 15, 0), ("frames/s", 9, 0), ("fr spark", spark_w, 3), ("bytes/s", 12, 0),
             ("B spark", spark_w, 2), ("to Python", 9, 1), ("dropped", 7, 1), ("frames", 8, 4), ("bytes", 10, 4)]
    if spark_w < 4:
        specs = [s for s in specs if "spark" not in s[0]]
    cols = _fit_columns(specs, inner)
    keys = [c[0] for c in cols]
    table = _table([(c[0], c[1], c[2], {"justify": "left" if c[0] in ("dir", "fr spark", "B spark") else "right",
                                        "title": "" if "spark" in c[0] else c[0]}) for c in cols], inner)
    bridge = snap.get("bridge") or {}
    for d, label in (("out", "client → net" if unicode else "client -> net"),
                     ("in", "net → client" if unicode else "net -> client")):
        st = bridge.get(d) or {}
        fr = _rates(hist, d, "rx_frames")
        by = _rates(hist, d, "rx_bytes")
        cells = []
        for k in keys:
            if k == "dir":
                cells.append(Text(label, style="bold"))
            elif k == "frames/s":
                cells.append(Text(fmt_count(fr[-1]) if fr else "—"))
            elif k == "fr spark":
                cells.append(Text(sparkline(fr, spark_w, unicode), style="cyan"))
            elif k == "bytes/s":
                cells.append(Text(fmt_bytes(by[-1], "/s") if by else "—"))
            elif k == "B spark":
                cells.append(Text(sparkline(by, spark_w, unicode), style="green"))
            elif k == "to Python":
                cells.append(Text(fmt_count(st.get("to_python", 0)), style="yellow" if st.get("to_python") else ""))
            elif k == "dropped":
                n = _num(st.get("dropped")) + _num(st.get("tx_errors")) + _num(st.get("truncated"))
                cells.append(Text(fmt_count(n), style="red" if n else ""))
            elif k == "frames":
                cells.append(Text(fmt_count(st.get("rx_frames", 0))))
            elif k == "bytes":
                cells.append(Text(fmt_bytes(st.get("rx_bytes", 0))))
        table.add_row(*cells)
    tb, sh = snap.get("table") or {}, snap.get("shim") or {}
    rejected = sum(int(_num(v)) for k, v in sh.items() if k.startswith("migrate_rejected_"))
    line1 = Text(overflow="ellipsis", no_wrap=True)
    line1.append("table ", style="bold")
    line1.append(f"{fmt_count(tb.get('frames', 0))} frames, {fmt_count(tb.get('rewritten', 0))} rewritten, "
                 f"{fmt_count(tb.get('to_python', 0))} to Python, {fmt_count(tb.get('dropped', 0))} dropped, "
                 f"{fmt_count(tb.get('malformed', 0))} malformed")
    line2 = Text(overflow="ellipsis", no_wrap=True)
    line2.append("shim ", style="bold")
    migrations = int(_num(sh.get("migrations")))
    line2.append(f"{_plural(migrations, 'migration')}", style="bold cyan" if migrations else "")
    line2.append(f", {_plural(int(_num(sh.get('migrate_syns'))), 'Migrate SYN')}, ")
    line2.append(f"{rejected} rejected", style="bold red" if rejected else "")
    line2.append(f", {fmt_count(_num(sh.get('lock_dropped_client')) + _num(sh.get('lock_dropped_rst')))} "
                 f"dropped in lock, {_plural(int(_num(sh.get('rsts_held'))), 'RST')} held, "
                 f"{_plural(int(_num(sh.get('syns_tagged', (snap.get('table') or {}).get('syns_tagged')))), 'SYN')}"
                 " tagged")
    outcomes = _outcome_line(snap)  # first: what became of the connections a migration ended
    summary = Group(*([outcomes] if outcomes is not None else []), line1, line2)
    title = f"fast path (client appliance {client.node}, build {snap.get('build', '?')}, {bridge.get('kind') or '?'} forwarder)"
    return Panel(Group(table, summary), title=Text(title, style="bold"), title_align="left", box=box.ROUNDED,
                 padding=(0, 1))


def _outcome_line(snap: Optional[dict]) -> Optional[Text]:
    """The client appliance's outcomes (every connection a migration ended: resumed, or its
    client reset), with the probes and Migrate RSTs behind them; None for an appliance that
    does not count outcomes."""
    sh = (snap or {}).get("shim") or {}
    if not isinstance(sh, dict) or "outcome_reset" not in sh:
        return None
    n = lambda k: int(_num(sh.get(k)))  # noqa: E731
    line = Text(overflow="ellipsis", no_wrap=True)
    line.append("outcomes ", style="bold")
    line.append(f"{n('outcome_resumed')} resumed", style="bold green" if n("outcome_resumed") else "")
    line.append(", ")
    line.append(f"{n('outcome_reset')} RESET" if n("outcome_reset") else "0 reset",
                style="bold reverse red" if n("outcome_reset") else "")
    line.append(f" · {_plural(n('probes'), 'probe')} ({n('probe_answers')} answered, "
                f"{n('probe_timeouts')} timed out), {_plural(n('migrate_rsts'), 'Migrate RST')} ")
    rej = n("migrate_rsts_rejected")
    line.append(f"({rej} rejected)", style="yellow" if rej else "")
    line.append(f", {n('migrations_abandoned')} abandoned")
    timers = snap.get("timers") or {}
    if isinstance(timers, dict) and timers.get("late_max_ms") is not None:
        late = _num(timers.get("late_max_ms"))
        line.append(f" · timers late {late:.1f} ms at most", style="yellow" if late >= 100 else "dim")
    return line


def event_lines(state: State, limit: int) -> list:
    """The newest `limit` log lines: (t, source, text, style, count), oldest first; consecutive
    identical lines from one source (a CLAIM is sent three times) are one line with a count."""
    out = []
    for src, ev in reversed(state.events):
        if len(out) > limit:
            break
        text = describe_event(state, src, ev)
        if text is None:
            continue
        style = event_style(ev)
        if out and out[-1][1] == src and out[-1][2] == text:
            t0, _, _, _, n = out[-1]
            out[-1] = (_num(ev.get("t")), src, text, style, n + 1)  # the first of the run keeps its time
            continue
        out.append((_num(ev.get("t")), src, text, style, 1))
    return list(reversed(out[:limit]))


def render_events(state: State, width: int, rows_avail: int) -> Panel:
    inner = max(10, width - 4)
    lines = event_lines(state, rows_avail) if rows_avail > 0 else []
    show_time = inner >= 50
    out = []  # plain lines, not a table: this panel has the most rows, and tables are slow to lay out
    for t, src, text, style, count in lines:
        line = Text(no_wrap=True, overflow="ellipsis")
        if show_time:
            line.append(fmt_time(t) + " ", style="dim")
        line.append(f"{_short(src)[:4]:<4} ", style="bold")
        line.append(text, style=style)
        if count > 1:
            line.append(f" ×{count}", style="bold")
        line.truncate(inner, overflow="ellipsis")
        out.append(line)
    if not out:
        out.append(Text("no events yet", style="dim"))
    grid = Group(*out)
    return Panel(grid, title=Text(f"events ({len(state.events)})", style="bold"), title_align="left",
                 box=box.ROUNDED, padding=(0, 1))


def render_unknown(state: State, width: int) -> Panel:
    """Appliances whose role is not known yet (a --socket that never answered)."""
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(no_wrap=True, style="bold")
    grid.add_column(no_wrap=True, overflow="ellipsis", ratio=1)
    for s in state.sources:
        if s.role is None:
            t = Text()
            if s.error is not None:
                t.append("unreachable", style="bold red")
                t.append(f" {s.error}", style="red")
            else:
                t.append("waiting for its first answer", style="dim")
            grid.add_row(Text(s.name), t)
    return Panel(grid, title=Text("appliances", style="bold"), title_align="left", box=box.ROUNDED, padding=(0, 1))


def render_header(state: State, width: int) -> Text:
    t = Text(no_wrap=True, overflow="ellipsis")
    resets = outcome_totals(state)["reset"]
    # a client got an error, not a resumption: said first, so that no terminal is too narrow for it
    if resets and width < 40:
        t.append(f" {resets} RESET ", style="bold reverse red")
    t.append(" appliance top ", style="bold reverse")
    if resets and width >= 40:
        t.append(f" {_plural(resets, 'client')} RESET ", style="bold reverse red")
    t.append(f" {state.title} ", style="bold")
    servers = _servers(state)
    client = _client(state)
    up = sum(1 for s in servers if s.reachable)
    if servers:
        t.append(f" {up}/{len(servers)} server appliances", style="green" if up == len(servers) else "yellow")
    if client is not None:
        t.append(" · client appliance ")
        t.append("up" if client.reachable else "unreachable", style="green" if client.reachable else "bold red")
    for s in state.sources:
        if s.error is not None:
            t.append(f" · {s.name} ", style="")
            t.append("unreachable", style="bold red")
            if s.down_since:
                t.append(f" {fmt_duration(state.now - s.down_since)}", style="red")
    t.append(f" · {time.strftime('%H:%M:%S', time.localtime(state.now))} · every {state.interval:g} s · q quits",
             style="dim")
    return t


def _error_panel(what: str, exc: Exception) -> Panel:
    return Panel(Text(f"render error in {what}: {type(exc).__name__}: {exc}", style="bold red"), box=box.ROUNDED)


def _safe(what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001  one bad snapshot must not take the dashboard down
        return _error_panel(what, exc)


def render(state: State, width: int, height: int, unicode: bool = True):
    """The whole screen for `state`, fitted to width x height (a pure function of its arguments)."""
    width, height = max(1, int(width)), max(1, int(height))
    try:
        return _render(state, width, height, unicode)
    except Exception as exc:  # noqa: BLE001
        return Text(f"render error: {type(exc).__name__}: {exc}", style="bold red")


def _render(state: State, width: int, height: int, unicode: bool):
    header = render_header(state, width)
    if height < 4:
        layout = Layout()
        layout.split_column(Layout(header, size=1), Layout(Text(" ")))
        return _Sized(layout, height)
    servers = _servers(state)
    client = _client(state)
    n_nodes = len(group_view(state)) if servers else 0
    n_conns = len(connection_view(state)[0])
    # blocks: [name, minimum lines, wanted lines], in priority order (borders 2 lines, table headers 1)
    group_lo, group_want = 4, n_nodes + 3 + (0 if n_nodes else 1)
    fast_lo = fast_want = 3 if client is None or client.live is None else \
        7 + (_outcome_line(client.live) is not None)
    side = width >= 150 and bool(servers) and client is not None
    blocks = []
    unknown = sum(1 for s in state.sources if s.role is None)
    if unknown:
        blocks.append(["unknown", 3, unknown + 2])
    if side:
        blocks.append(["top", max(group_lo, fast_lo), max(group_want, fast_want)])
    elif servers:
        blocks.append(["group", group_lo, group_want])
    blocks.append(["conns", 4, min(max(1, n_conns) + 3, max(4, height * 45 // 100))])  # leave the log room
    blocks.append(["events", 4, 4])
    if client is not None and not side:
        blocks.append(["fast", fast_lo, fast_want])
    avail = height - 1
    sizes = {}
    for name, lo, _want in blocks:  # each its minimum, while it fits
        if avail >= lo:
            sizes[name] = lo
            avail -= lo
    for name, _lo, want in blocks:  # then what each wants; the event log takes the rest
        if name in sizes and name != "events":
            extra = min(avail, max(0, want - sizes[name]))
            sizes[name] += extra
            avail -= extra
    for name in ("events", "conns", "top", "group", "fast", "unknown"):  # leftover lines: the first of these shown
        if name in sizes:
            sizes[name] += avail
            avail = 0
            break
    parts = [Layout(header, size=1, name="header")]
    if "unknown" in sizes:
        parts.append(Layout(_safe("appliances", render_unknown, state, width), size=sizes["unknown"]))
    if "top" in sizes:
        gw = max(60, width * 55 // 100)
        row = Layout(size=sizes["top"], name="top")
        row.split_row(Layout(_safe("group", render_group, state, gw, sizes["top"] - 3), size=gw),
                      Layout(_safe("fast path", render_fastpath, state, width - gw, unicode)))
        parts.append(row)
    if "group" in sizes:
        parts.append(Layout(_safe("group", render_group, state, width, sizes["group"] - 3), size=sizes["group"]))
    if "conns" in sizes:
        parts.append(Layout(_safe("connections", render_connections, state, width, sizes["conns"] - 3, unicode),
                            size=sizes["conns"]))
    if "fast" in sizes:
        parts.append(Layout(_safe("fast path", render_fastpath, state, width, unicode), size=sizes["fast"]))
    if "events" in sizes:
        parts.append(Layout(_safe("events", render_events, state, width, sizes["events"] - 2), size=sizes["events"]))
    used = sum(p.size or 0 for p in parts)
    if used < height:
        parts.append(Layout(Text(" "), size=height - used))
    layout = Layout()
    layout.split_column(*parts)
    return _Sized(layout, height)


class _Sized:
    """A renderable that renders `inner` at exactly `height` lines (Layout fills the console's height)."""

    def __init__(self, inner, height: int) -> None:
        self.inner, self.height = inner, height

    def __rich_console__(self, console, options):
        yield from console.render(self.inner, options.update(height=self.height))


# --- the command ------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser("top", help="live dashboard of a support group (status and events of its appliances)",
                              description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", help="one appliance's control socket")
    where.add_argument("--lab", help="a lab: every replica's server appliance and the client appliance")
    p.add_argument("--node", default=None, help="with --lab: only this appliance (a replica, or ca)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between status requests (default 0.5)")
    p.add_argument("--refresh", type=float, default=4.0, help="screen refreshes per second (default 4)")
    p.add_argument("--once", action="store_true", help="render one frame to stdout and exit")
    p.add_argument("--width", type=int, default=None, help="with --once: the frame's width (default: terminal, or 120)")
    p.add_argument("--height", type=int, default=None, help="with --once: the frame's height (default: terminal, or 40)")
    p.add_argument("--ascii", action="store_true", help="no block characters (sparklines, bars) even on UTF-8")
    p.set_defaults(func=run)


def _topology_names(path: Path) -> dict:
    try:
        topo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    names = {}
    for rep, info in (topo.get("replicas") or {}).items():
        if isinstance(info, dict) and info.get("ip"):
            names[info["ip"]] = rep
    return names


def resolve_sources(args) -> tuple:
    """(sources [(name, path)], title, names {ip: node}); raises ValueError with a message."""
    from .lab import LAB_ROOT
    if args.node and not args.lab:
        raise ValueError("--node goes with --lab NAME")
    if args.socket:
        path = Path(args.socket)
        return [(path.name.removesuffix(".sock"), path)], f"socket {path}", _topology_names(path.parent / "topology.json")
    lab = args.lab
    if not lab:
        labs = sorted(p.stem for p in LAB_ROOT.glob("*.json")) if LAB_ROOT.is_dir() else []
        if len(labs) != 1:
            known = f" (labs here: {', '.join(labs)})" if labs else ""
            raise ValueError(f"say which appliances: --lab NAME [--node NODE] or --socket PATH{known}")
        lab = labs[0]
    lab_dir = LAB_ROOT / lab
    state_file = LAB_ROOT / f"{lab}.json"
    options = {}
    try:
        options = json.loads(state_file.read_text()).get("options") or {}
    except (OSError, ValueError):
        if not lab_dir.is_dir():
            raise ValueError(f"no lab {lab!r} under {LAB_ROOT} (appliance lab up --name {lab})") from None
    names = _topology_names(lab_dir / "topology.json")
    if args.node:
        role = "client" if args.node == "ca" else "server"
        name = f"{role}-{args.node}"
        return [(name, lab_dir / f"{name}.sock")], f"lab {lab}, node {args.node}", names
    replicas = list(options.get("replicas") or [])
    if not replicas:
        replicas = sorted(p.name[len("server-"):-len(".sock")] for p in lab_dir.glob("server-*.sock"))
    sources = [(f"server-{r}", lab_dir / f"server-{r}.sock") for r in replicas]
    if options.get("client_path", "appliance") == "appliance" or (lab_dir / "client-ca.sock").exists():
        sources.append(("client-ca", lab_dir / "client-ca.sock"))
    if not sources:
        raise ValueError(f"lab {lab!r} has no appliances to show")
    return sources, f"lab {lab}", names


def run(args) -> int:
    try:
        sources, title, names = resolve_sources(args)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    if args.interval <= 0 or args.refresh <= 0:
        print(f"{PROG}: --interval and --refresh must be positive", file=sys.stderr)
        return 2
    collector = Collector(sources, title=title, names=names, interval=args.interval)
    if args.once:
        state = collector.poll_once(settle=min(args.interval, 0.5))
        tty = sys.stdout.isatty()
        size = os.get_terminal_size() if tty else None
        width = args.width or (size.columns if size else 120)
        height = args.height or (size.lines if size else 40)
        console = Console(width=width, height=height, force_terminal=tty or None)
        unicode = not args.ascii and console.encoding.lower().startswith("utf")
        console.print(render(state, width, height, unicode))
        return 0 if any(s.reachable for s in state.sources) else 1
    return _live(collector, args)


def _live(collector: Collector, args) -> int:
    from rich.live import Live

    # the terminal's real size, always: rich would pin it to COLUMNS/LINES when they are set
    # (exported once, they go stale when the terminal is resized; tmux may hand them down)
    environ = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} if sys.stdout.isatty() \
        else None
    console = Console(_environ=environ)
    unicode = not args.ascii and console.encoding.lower().startswith("utf")
    stop = threading.Event()

    def on_signal(*_):
        stop.set()

    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            old[sig] = signal.signal(sig, on_signal)
        except (ValueError, OSError):
            pass
    fd = None
    saved = None
    if sys.stdin.isatty():
        import termios
        import tty
        fd = sys.stdin.fileno()
        try:
            saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
        except termios.error:
            fd = None
    collector.start()
    try:
        with Live(console=console, screen=True, refresh_per_second=args.refresh, redirect_stderr=False,
                  get_renderable=lambda: render(collector.state, console.width, console.height, unicode)):
            while not stop.is_set():
                if fd is not None:
                    ready, _, _ = select.select([fd], [], [], 0.2)
                    if ready:
                        ch = os.read(fd, 1)
                        if ch in (b"q", b"Q") or not ch:
                            break
                else:
                    stop.wait(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if fd is not None and saved is not None:
            import termios
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        collector.stop()
    return 0
