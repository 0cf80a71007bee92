"""The control socket: requests and answers, the event stream, bad requests, a missing socket,
a client that disconnects mid-stream, and `appliance ctl`'s messages."""

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from appliance.control import ControlError, ControlServer, call, events


class Running:
    """A ControlServer on its own event loop thread."""

    def __init__(self, path, handlers):
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, handlers)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)

    def publish(self, ev):
        self.loop.call_soon_threadsafe(self.server.publish, ev)

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def srv(tmp_path):
    def boom(req):
        raise RuntimeError("kaput")

    def refuse(req):
        raise ControlError("not now")

    r = Running(tmp_path / "a.sock", {"status": lambda req: {"node": "a", "n": 3}, "boom": boom,
                                      "refuse": refuse, "echo": lambda req: {"got": req.get("x")}})
    yield r
    r.stop()


def test_request_answer_and_mode(srv):
    assert call(srv.server.path, {"cmd": "status"}) == {"ok": True, "node": "a", "n": 3}
    assert stat.S_IMODE(os.stat(srv.server.path).st_mode) == 0o600


def test_bad_requests_get_clear_errors_and_the_connection_survives(srv):
    s = socket.socket(socket.AF_UNIX)
    s.connect(srv.server.path)
    f = s.makefile("rwb")
    answers = []
    for line in (b"not json\n", b"[1,2]\n", b'{"cmd": "nope"}\n', b'{"cmd": "boom"}\n', b'{"cmd": "refuse"}\n',
                 b'{"cmd": "echo", "x": 7}\n'):
        f.write(line)
        f.flush()
        answers.append(json.loads(f.readline()))
    s.close()
    assert [a["ok"] for a in answers] == [False, False, False, False, False, True]
    assert "bad request" in answers[0]["error"] and "unknown command 'nope'" in answers[2]["error"]
    assert "kaput" in answers[3]["error"] and answers[4]["error"] == "not now" and answers[5]["got"] == 7
    with pytest.raises(ControlError, match="not now"):
        call(srv.server.path, {"cmd": "refuse"})


def test_event_stream_and_backlog(srv):
    srv.publish({"t": 1, "event": "old"})
    got = []

    def reader():
        for ev in events(srv.server.path, backlog=True, timeout=3):
            got.append(ev)
            if len(got) == 3:
                return

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.3)
    srv.publish({"t": 2, "event": "x"})
    srv.publish({"t": 3, "event": "y"})
    t.join(5)
    assert [e["event"] for e in got] == ["old", "x", "y"]


def test_subscriber_that_disconnects_mid_stream_is_dropped(srv):
    s = socket.socket(socket.AF_UNIX)
    s.connect(srv.server.path)
    s.sendall(b'{"cmd": "events"}\n')
    s.recv(100)
    s.close()
    for i in range(50):
        srv.publish({"t": i, "event": "after"})
    time.sleep(0.2)
    assert call(srv.server.path, {"cmd": "status"})["ok"]  # still serving
    assert not srv.server._subscribers


def test_missing_socket(tmp_path):
    with pytest.raises(ControlError, match="no control socket"):
        call(tmp_path / "nothing.sock", {"cmd": "status"})
    res = subprocess.run([sys.executable, "-m", "appliance", "ctl", "--socket", str(tmp_path / "x.sock"), "status"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1 and "no control socket" in res.stderr and "Traceback" not in res.stderr


def test_ctl_status_through_the_cli(srv):
    res = subprocess.run([sys.executable, "-m", "appliance", "ctl", "--socket", srv.server.path, "--json", "status"],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and json.loads(res.stdout)["n"] == 3
