"""The control socket: a UNIX socket per appliance, JSON lines, and `appliance ctl`.

Protocol: the client writes one JSON object per line, {"cmd": NAME, ...arguments}; the
appliance answers each with one line, {"ok": true, ...} or {"ok": false, "error": MESSAGE}.
"events" turns the connection into a stream: first {"ok": true}, then one line per event
({"t", "event", ...fields}) as it happens, until either side closes. A malformed line, an
unknown command or a failing handler gets an error answer and the connection stays usable;
a client that disconnects mid-stream is simply dropped. The socket file is mode 0600.

    server = ControlServer(path, {"status": fn, "migrate": fn, ...})   # fn(request) -> dict
    await server.start(); server.publish({"t":..., "event": ...}); await server.stop()
    call(path, {"cmd": "status"})                                      # one request, blocking
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Optional

MAX_LINE = 1 << 20
BACKLOG_EVENTS = 500  # the newest events, replayed to a new "events" client that asks


class ControlError(Exception):
    """A control request could not be made or was refused; str() is the message."""


class ControlServer:
    def __init__(self, path, handlers: dict) -> None:
        self.path = str(path)
        self.handlers = dict(handlers)
        self._server = None
        self._subscribers: set = set()
        self.backlog: deque = deque(maxlen=BACKLOG_EVENTS)
        self.counters = {"requests": 0, "errors": 0, "clients": 0, "subscribers": 0}

    async def start(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.unlink(self.path)  # a stale socket from a crashed run
        except FileNotFoundError:
            pass
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path, limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._subscribers):
                w.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
            self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def publish(self, event: dict) -> None:
        """Send an event to every "events" client (never blocks: a slow client is dropped)."""
        self.backlog.append(event)
        if not self._subscribers:
            return
        line = (json.dumps(event, default=_jsonable) + "\n").encode()
        for w in list(self._subscribers):
            if w.transport.get_write_buffer_size() > (4 << 20):
                self._subscribers.discard(w)
                w.close()
                continue
            w.write(line)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.counters["clients"] += 1
        try:
            while True:
                try:
                    line = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    await self._answer(writer, {"ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                    return
                if not line:
                    return
                self.counters["requests"] += 1
                try:
                    req = json.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError('a request is a JSON object with a "cmd" string')
                except ValueError as exc:
                    self.counters["errors"] += 1
                    await self._answer(writer, {"ok": False, "error": f"bad request: {exc}"})
                    continue
                if req["cmd"] == "events":
                    await self._stream(req, reader, writer)
                    return
                handler = self.handlers.get(req["cmd"])
                if handler is None:
                    self.counters["errors"] += 1
                    known = ", ".join(sorted(["events", *self.handlers]))
                    await self._answer(writer, {"ok": False, "error": f"unknown command {req['cmd']!r} (known: {known})"})
                    continue
                try:
                    result = handler(req)
                    if asyncio.iscoroutine(result):
                        result = await result
                    await self._answer(writer, {"ok": True, **(result or {})})
                except ControlError as exc:
                    self.counters["errors"] += 1
                    await self._answer(writer, {"ok": False, "error": str(exc)})
                except Exception as exc:  # noqa: BLE001  a handler bug is an answer, not a crash
                    self.counters["errors"] += 1
                    await self._answer(writer, {"ok": False, "error": f"{req['cmd']} failed: {exc!r}"})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            self._subscribers.discard(writer)
            writer.close()

    async def _answer(self, writer, obj: dict) -> None:
        writer.write((json.dumps(obj, default=_jsonable) + "\n").encode())
        await writer.drain()

    async def _stream(self, req: dict, reader, writer) -> None:
        await self._answer(writer, {"ok": True, "stream": "events"})
        if req.get("backlog"):
            for ev in list(self.backlog):
                writer.write((json.dumps(ev, default=_jsonable) + "\n").encode())
        self._subscribers.add(writer)
        self.counters["subscribers"] += 1
        try:
            while await reader.read(4096):  # the client says nothing more; EOF ends the stream
                pass
        finally:
            self._subscribers.discard(writer)


def _jsonable(obj):
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return repr(obj)


# --- the client side -----------------------------------------------------------------------


def connect(path, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except FileNotFoundError:
        s.close()
        raise ControlError(f"no control socket at {path} (is the appliance running?)") from None
    except ConnectionRefusedError:
        s.close()
        raise ControlError(f"nothing listens on {path} (the appliance stopped?)") from None
    except PermissionError:
        s.close()
        raise ControlError(f"no permission to use {path} (it is mode 0600: run as its owner)") from None
    return s


def call(path, request: dict, timeout: float = 10.0) -> dict:
    """One request, its answer (raises ControlError on an error answer or a broken socket)."""
    s = connect(path, timeout)
    try:
        s.sendall((json.dumps(request) + "\n").encode())
        f = s.makefile("rb")
        line = f.readline()
    except socket.timeout:
        raise ControlError(f"no answer from {path} within {timeout:.0f} s") from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        s.close()
    if not line:
        raise ControlError(f"the appliance at {path} closed the connection without answering")
    try:
        answer = json.loads(line)
    except ValueError:
        raise ControlError(f"the appliance at {path} answered something that is not JSON") from None
    if not answer.get("ok"):
        raise ControlError(answer.get("error") or "refused")
    return answer


def events(path, backlog: bool = False, timeout: Optional[float] = None):
    """Yield events from an appliance until it goes away (or `timeout` s pass without one)."""
    s = connect(path, 5.0)
    try:
        s.sendall((json.dumps({"cmd": "events", "backlog": backlog}) + "\n").encode())
        s.settimeout(timeout)
        f = s.makefile("rb")
        first = f.readline()
        if not first or not json.loads(first).get("ok"):
            raise ControlError(f"the appliance at {path} refused the event stream")
        while True:
            try:
                line = f.readline()
            except socket.timeout:
                return
            if not line:
                return
            try:
                yield json.loads(line)
            except ValueError:
                continue
    finally:
        s.close()


# --- `appliance ctl` -------------------------------------------------------------------------


def socket_path(state_dir, role: str, node: str) -> Path:
    return Path(state_dir) / f"{role}-{node}.sock"


def register(sub) -> None:
    p = sub.add_parser("ctl", help="talk to a running appliance through its control socket")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the appliance's control socket")
    where.add_argument("--lab", help="a lab's name: find the socket in its lab dir (with --node)")
    p.add_argument("--node", default=None, help="the node (a replica, or ca for the client appliance)")
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    cmds = p.add_subparsers(dest="ctl_command", metavar="COMMAND")
    cmds.add_parser("status", help="the appliance's status snapshot")
    ev = cmds.add_parser("events", help="follow the appliance's events")
    ev.add_argument("--backlog", action="store_true", help="start with the recent events")
    ev.add_argument("--count", type=int, default=0, help="stop after this many events")
    mg = cmds.add_parser("migrate", help="move a connection to a node (planned migration)")
    mg.add_argument("conn", help="the connection, as CLIENT_IP:PORT")
    mg.add_argument("--to", required=True, help="the node that takes it over")
    dr = cmds.add_parser("drain", help="move every connection away from this node, then report")
    dr.add_argument("--timeout", type=float, default=30.0)
    osc = cmds.add_parser("oscillate", help="move a connection between two nodes every N seconds")
    osc.add_argument("conn", help="the connection, as CLIENT_IP:PORT")
    osc.add_argument("--between", required=True, help="two nodes, e.g. a,b")
    osc.add_argument("--every", type=float, required=True, help="seconds between migrations")
    osc.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    p.set_defaults(func=run_ctl)


def _resolve(args, node: Optional[str] = None) -> Path:
    node = node or args.node
    if args.socket and not node:
        return Path(args.socket)
    if args.lab:
        from .lab import LAB_ROOT
        if not node:
            raise ControlError("--lab needs --node (a replica, or ca)")
        role = "client" if node == "ca" else "server"
        return socket_path(LAB_ROOT / args.lab, role, node)
    if args.socket:
        return Path(args.socket)
    raise ControlError("say which appliance: --socket PATH, or --lab NAME --node NODE")


def run_ctl(args) -> int:
    try:
        return _run_ctl(args)
    except ControlError as exc:
        print(f"appliance ctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run_ctl(args) -> int:
    cmd = args.ctl_command or "status"
    if cmd == "status":
        ans = call(_resolve(args), {"cmd": "status"})
        print(json.dumps(ans, indent=1, sort_keys=True) if args.json else _summary(ans))
        return 0
    if cmd == "events":
        n = 0
        for ev in events(_resolve(args), backlog=args.backlog):
            print(json.dumps(ev, sort_keys=True), flush=True)
            n += 1
            if args.count and n >= args.count:
                break
        return 0
    if cmd == "migrate":
        ans = call(_resolve(args, args.to), {"cmd": "migrate", "conn": args.conn}, timeout=15)
        print(json.dumps(ans, indent=1, sort_keys=True) if args.json else f"{args.conn}: {ans.get('result')}")
        return 0
    if cmd == "drain":
        ans = call(_resolve(args), {"cmd": "drain", "timeout": args.timeout}, timeout=args.timeout + 10)
        print(json.dumps(ans, indent=1, sort_keys=True) if args.json else
              f"drained: {ans.get('moved', 0)} moved, {ans.get('left', 0)} left")
        return 0 if not ans.get("left") else 1
    if cmd == "oscillate":
        nodes = [n for n in args.between.split(",") if n]
        if len(nodes) != 2:
            raise ControlError("--between takes two nodes, e.g. a,b")
        end = time.monotonic() + args.duration
        k = 0
        while time.monotonic() < end:
            target = nodes[(k + 1) % 2]
            try:
                ans = call(_resolve(args, target), {"cmd": "migrate", "conn": args.conn}, timeout=15)
                print(f"{time.strftime('%H:%M:%S')} {args.conn} -> {target}: {ans.get('result')}", flush=True)
            except ControlError as exc:
                print(f"{time.strftime('%H:%M:%S')} {args.conn} -> {target}: {exc}", flush=True)
            k += 1
            time.sleep(max(0.0, min(args.every, end - time.monotonic())))
        return 0
    raise ControlError(f"unknown command {cmd}")


def _summary(ans: dict) -> str:
    lines = [f"{ans.get('role', '?')} appliance {ans.get('node', '')}: ready={ans.get('ready')}"]
    group = ans.get("group") or {}
    for peer, info in sorted((group.get("peers") or {}).items()):
        lines.append(f"  peer {peer}: {info.get('state')}, {info.get('entries')} connections, load {info.get('load')}")
    conns = ans.get("connections") or []
    lines.append(f"  {len(conns)} connections")
    return "\n".join(lines)
