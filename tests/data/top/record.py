"""Record tests/data/top/failover.json from a real lab (root; about 10 s).

    .venv/bin/python tests/data/top/record.py [OUTPUT.json]

Brings a lab up (client appliance + server appliances on a, b, c; a's link at 40 mbit),
follows every appliance's event stream and asks each for its status every 0.5 s through
appliance.top's own Collector (every answer is logged as it is ingested), downloads
/obj-100m from a, kills replica a 3 s into the download, goes on for 3 s, takes the lab
down. The file:

    {"title", "sockets": {name: path}, "names": {ip: node}, "killed": t,
     "samples": [{"t", "snapshots": {name: status answer | {"ok": false, "error": msg}}}],
     "events": {name: [event, ...]}}

tests/test_top.py replays it with appliance.top.collector_from_recording(rec, until=t).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "lab"))

import labutil  # noqa: E402
from appliance.control import ControlError, call  # noqa: E402
from appliance.top import Collector, _topology_names  # noqa: E402

HERE = Path(__file__).resolve().parent


class RecordingCollector(Collector):
    def __init__(self, *a, **kw):
        self.log = {"samples": {}, "events": {}}
        super().__init__(*a, **kw)

    def ingest_status(self, name, answer, t=None):
        t = self.clock() if t is None else t
        self.log["samples"].setdefault(round(t, 3), {})[name] = answer
        super().ingest_status(name, answer, t)

    def ingest_error(self, name, message, t=None):
        t = self.clock() if t is None else t
        self.log["samples"].setdefault(round(t, 3), {})[name] = {"ok": False, "error": message}
        super().ingest_error(name, message, t)

    def ingest_event(self, name, ev):
        if isinstance(ev, dict) and "event" in ev:  # not the stream's {"ok": true} greeting
            self.log["events"].setdefault(name, []).append(ev)
        super().ingest_event(name, ev)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = HERE / (argv[0] if argv else "failover.json")
    names = ["server-a", "server-b", "server-c", "client-ca"]
    with labutil.running_lab(name="toprec", client_path="appliance", appliances=True, object_sizes=("100m",),
                             links={"a": {"rate": "40mbit"}}) as lab:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                if all(len(call(lab.lab_dir / f"server-{n}.sock", {"cmd": "status"})["group"]["peers"]) == 2
                       for n in "abc"):
                    break
            except (ControlError, KeyError):
                pass
            time.sleep(0.2)
        sockets = {n: str(lab.lab_dir / f"{n}.sock") for n in names}
        col = RecordingCollector(list(sockets.items()), title="lab toprec",
                                 names=_topology_names(lab.lab_dir / "topology.json"), interval=0.5)
        # one status thread per appliance samples at its own moments; sample them together instead
        col._status_loop = lambda name: None
        col.start()
        curl = lab.popen("c1", ["curl", "-s", "-o", "/dev/null", "--max-time", "60", lab.url("a", "/obj-100m")])
        killed = None
        try:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 6.0:
                if killed is None and time.monotonic() - t0 >= 3.0:
                    killed = lab.kill_replica("a")
                now = time.time()
                for n in names:
                    try:
                        col.ingest_status(n, call(sockets[n], {"cmd": "status"}, timeout=2), now)
                    except ControlError as exc:
                        col.ingest_error(n, str(exc), now)
                time.sleep(0.5)
        finally:
            curl.kill()
            curl.wait()
            col.stop()
    samples = [{"t": t, "snapshots": s} for t, s in sorted(col.log["samples"].items())]
    rec = {"title": "lab toprec", "sockets": sockets, "names": col.state.names and dict(col.state.names),
           "killed": killed, "samples": samples, "events": col.log["events"]}
    out.write_text(json.dumps(rec, sort_keys=True, separators=(",", ":")))
    print(f"{out}: {len(samples)} samples, {sum(len(v) for v in col.log['events'].values())} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
