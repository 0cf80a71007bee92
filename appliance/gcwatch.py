"""How long the garbage collector stops an appliance's loop (a pause is a late heartbeat)."""

from __future__ import annotations

import gc
import time

SLOW = 0.02  # seconds: a collection this long is reported


class GcWatch:
    """Times every collection (gc.callbacks); `snapshot()` for the status file, `pop_slow()`
    for the event log."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.total = 0.0
        self.max = 0.0
        self._start = None
        self._slow: list = []
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        if self._start is None:
            return
        took = time.perf_counter() - self._start
        self._start = None
        gen = info.get("generation", 0)
        self.collections[gen] += 1
        self.total += took
        if took > self.max:
            self.max = took
        if took >= SLOW and len(self._slow) < 100:
            self._slow.append({"generation": gen, "ms": round(took * 1000, 1), "collected": info.get("collected", 0)})

    def pop_slow(self) -> list:
        slow, self._slow = self._slow, []
        return slow

    def close(self) -> None:
        try:
            gc.callbacks.remove(self._callback)
        except ValueError:
            pass

    def snapshot(self) -> dict:
        return {"collections": list(self.collections), "total_ms": round(self.total * 1000, 1),
                "max_ms": round(self.max * 1000, 1), "counts": list(gc.get_count()),
                "thresholds": list(gc.get_threshold())}
