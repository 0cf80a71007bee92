"""Failure detector for one support-group peer (sans-I/O: `now` is always passed in).

One `FailureDetector` per peer. Feed it every HEARTBEAT with `heartbeat(now, epoch)` and any
other valid datagram from that peer with `heard(now, epoch)` (a sign of life that does not
enter the inter-arrival statistics), and call `check(now)` often (every few ms, or at
`next_deadline()`). Both return a list of events (plain tuples):

    ("alive", t)                    the peer became ALIVE (first heartbeat, two fresh
                                    heartbeats after SUSPECT, or heard again after DEAD)
    ("suspect", t)                  ALIVE -> SUSPECT
    ("dead", t, silence)            -> DEAD, `silence` seconds after the last sign of life
    ("false_suspicion", t)          a DEAD peer was heard again with the SAME epoch: it was
                                    never dead; its connections are its own again
                                    (followed by ("alive", t))
    ("restarted", old, new)         a NEWER epoch: the peer restarted, its old state is gone
                                    (followed by ("alive", t) if it was not ALIVE)

States are plain strings: UNKNOWN (never heard: never declared dead), ALIVE, SUSPECT, DEAD.
DEAD is sticky for an epoch until the peer is heard again. A datagram with an OLDER epoch
than the newest seen is ignored (counted in `stale`).

Kinds:

* ``"phi"`` (default): phi-accrual (Hayashibara et al. 2004) with a normal model of the
  inter-arrival times over a sliding window (default the last 100), whose standard deviation
  is floored at `min_std` (default interval / 4) so that perfectly regular heartbeats do not
  make it hair-trigger. The two phi thresholds are derived from `interval` and `dead_after`:
  with a steady history (mean = interval, std = min_std) phi crosses the DEAD threshold at
  0.9 x dead_after of silence, and the SUSPECT threshold 60% of the way from one interval to
  that point (62 ms with the defaults: a single lost heartbeat with 30% jitter, 52 ms, is not
  suspected). A jittery history raises the std and so delays both; a hard cap on silence
  declares DEAD at `dead_after` whatever phi says, so DEAD never comes later than dead_after
  (plus the delay between two `check` calls) after the last sign of life.
* ``"missed"``: k = round(dead_after / interval) (at least 1); DEAD after k intervals of
  silence, SUSPECT after max(k / 2, 1.5) intervals (the 1.5 floor keeps k = 2 from
  suspecting on ordinary jitter; with k = 1 DEAD comes first and both events are emitted).

Hysteresis: SUSPECT -> ALIVE needs two consecutive signs of life with no new crossing of the
suspect threshold between them; a crossing in between starts the count again.

Local health (Lifeguard). The detector measures silence on the local clock: when the local
process itself runs late (CPU starvation, a long takeover burst), heartbeats wait unread
in the socket and the silence it sees is the peer's plus its own lag. Three knobs let the
owner of the detectors (appliance.group.GroupNode) correct for that:

* ``set_multiplier(m)`` (m >= 1): both silence thresholds, and the cap, are multiplied by
  m (the "local health multiplier", raised while the local process lags and decayed back
  as it runs on time). With m = 1 (the default) nothing changes.
* ``heartbeat(now, epoch, sample=False)``: a HEARTBEAT that waited in the socket while the
  process lagged is a sign of life, but its arrival time says nothing about the peer's
  rhythm: it is not an inter-arrival sample, and neither is the gap to the next heartbeat.
* ``rebase()``: forget the last heartbeat's time, so that the gap across a local stall does
  not enter the history.

Bursts. Without that help a backlog read at once after a stall looks like one huge gap
followed by many near-zero ones, which inflates the std (slower detection for a whole
window) and drags the mean down. So a heartbeat arriving less than 0.2 x interval after
the previous one is not a sample (counted in ``bursts``), and when it follows a gap longer
than 2 x interval, that gap is taken out of the history too (the silence before a burst is
the stall's, not the peer's).
"""

from __future__ import annotations

import math
from collections import deque

__all__ = [
    "UNKNOWN", "ALIVE", "SUSPECT", "DEAD", "STATES",
    "EV_ALIVE", "EV_SUSPECT", "EV_DEAD", "EV_FALSE_SUSPICION", "EV_RESTARTED",
    "FailureDetector", "phi_of_z", "z_of_phi", "MAX_MULTIPLIER",
]

UNKNOWN = "unknown"
ALIVE = "alive"
SUSPECT = "suspect"
DEAD = "dead"
STATES = (UNKNOWN, ALIVE, SUSPECT, DEAD)

EV_ALIVE = "alive"
EV_SUSPECT = "suspect"
EV_DEAD = "dead"
EV_FALSE_SUSPICION = "false_suspicion"
EV_RESTARTED = "restarted"

KINDS = ("phi", "missed")

# Fraction of dead_after at which phi, on a steady history, crosses the DEAD threshold.
_DEAD_AT = 0.9
# Where, between one interval and the DEAD point, phi crosses the SUSPECT threshold.
_SUSPECT_AT = 0.6
# Heartbeats needed to leave SUSPECT.
_RECOVER_BEATS = 2
# A heartbeat closer than this fraction of the interval to the previous one is part of a burst
# (a backlog read at once): not an inter-arrival sample.
_BURST_FRACTION = 0.2
# A gap longer than this many intervals right before a burst is the stall's: taken out.
_BURST_GAP = 2.0
# The largest local health multiplier accepted.
MAX_MULTIPLIER = 16.0

_LN10 = math.log(10.0)
_HALF_LN_2PI = 0.5 * math.log(2.0 * math.pi)


def phi_of_z(z: float) -> float:
    """phi = -log10(P(X > mean + z * std)) for a normal X; finite for any z (log-space tail)."""
    if z < 30.0:
        q = 0.5 * math.erfc(z / math.sqrt(2.0))
        if q > 0.0:
            return -math.log10(q)
    # Asymptotic tail: ln Q(z) = -z^2/2 - ln(z sqrt(2 pi)) + ln(1 - 1/z^2 + 3/z^4 - ...)
    z2 = z * z
    ln_q = -0.5 * z2 - math.log(z) - _HALF_LN_2PI + math.log1p(-1.0 / z2 + 3.0 / (z2 * z2))
    return -ln_q / _LN10


def z_of_phi(phi: float) -> float:
    """Inverse of `phi_of_z` (bisection; phi_of_z is increasing)."""
    lo, hi = -10.0, 10.0
    while phi_of_z(hi) < phi:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if phi_of_z(mid) < phi:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


class FailureDetector:
    """The health of one peer; see the module docstring.

    interval:   the peers' heartbeat period, seconds (default 20 ms).
    dead_after: silence after which a peer is dead, seconds (default 100 ms; must exceed
                interval). The phi detector never declares DEAD later than this (cap).
    window:     inter-arrival samples kept (phi).
    min_std:    floor of the standard deviation (phi), default interval / 4.
    suspect_phi, dead_phi: override the derived phi thresholds.
    """

    def __init__(self, kind: str = "phi", interval: float = 0.02, dead_after: float = 0.1,
                 *, window: int = 100, min_std: float | None = None,
                 suspect_phi: float | None = None, dead_phi: float | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if not (isinstance(interval, (int, float)) and interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if not (isinstance(dead_after, (int, float)) and math.isfinite(dead_after)
                and dead_after > interval):
            raise ValueError(f"dead_after must exceed interval ({interval}), not {dead_after!r}")
        if not (isinstance(window, int) and window >= 2):
            raise ValueError(f"window must be an int >= 2, not {window!r}")
        self.kind = kind
        self.interval = float(interval)
        self.dead_after = float(dead_after)
        self.window = window
        self.min_std = float(min_std) if min_std is not None else self.interval / 4.0
        if not self.min_std > 0:
            raise ValueError(f"min_std must be positive, not {min_std!r}")

        # phi thresholds, derived from the nominal steady history (mean interval, min_std).
        mu, sd = self.interval, self.min_std
        s_dead = max(_DEAD_AT * self.dead_after, mu + sd)
        s_susp = max(mu + _SUSPECT_AT * (s_dead - mu), mu + 0.5 * sd)
        self.dead_phi = float(dead_phi) if dead_phi is not None else phi_of_z((s_dead - mu) / sd)
        self.suspect_phi = (float(suspect_phi) if suspect_phi is not None
                            else phi_of_z((s_susp - mu) / sd))
        if not 0 < self.suspect_phi <= self.dead_phi:
            raise ValueError("thresholds must satisfy 0 < suspect_phi <= dead_phi")
        self._z_dead = z_of_phi(self.dead_phi)
        self._z_suspect = z_of_phi(self.suspect_phi)

        # missed: silences.
        self.k = max(1, round(self.dead_after / self.interval))
        self._missed_dead = self.k * self.interval
        self._missed_suspect = max(self.k / 2.0, 1.5) * self.interval

        self.state = UNKNOWN
        self.epoch: int | None = None
        self.last_heard: float | None = None   # last sign of life (any datagram)
        self._last_beat: float | None = None   # last HEARTBEAT (inter-arrival samples)
        self._samples: deque = deque(maxlen=window)
        self._mean = self.interval
        self._std = self.min_std
        self._fresh = 0                        # consecutive signs of life while SUSPECT
        self._suspect_after = math.inf         # silence thresholds for the current history
        self._dead_after = math.inf
        self._base_suspect = math.inf          # ... before the local health multiplier
        self._base_dead = math.inf
        self._mult = 1.0                       # local health multiplier (set_multiplier)
        self._last_sample = None               # the sample the last heartbeat appended
        self._recompute()

        self.suspicions = 0
        self.deaths = 0
        self.false_suspicions = 0
        self.recoveries = 0
        self.restarts = 0
        self.stale = 0
        self.heartbeats = 0
        self.bursts = 0

    # -- statistics ---------------------------------------------------------------------

    def _reset_history(self) -> None:
        self._samples.clear()
        self._last_beat = None
        self._last_sample = None
        self._recompute()

    def _recompute(self) -> None:
        n = len(self._samples)
        if n == 0:
            mean, std = self.interval, self.min_std
        else:
            mean = math.fsum(self._samples) / n
            var = math.fsum((x - mean) ** 2 for x in self._samples) / n if n > 1 else 0.0
            std = max(math.sqrt(var), self.min_std)
        self._mean, self._std = mean, std
        if self.kind == "phi":
            self._base_suspect = min(mean + self._z_suspect * std, self.dead_after)
            self._base_dead = min(mean + self._z_dead * std, self.dead_after)
        else:
            self._base_suspect = min(self._missed_suspect, self._missed_dead)
            self._base_dead = self._missed_dead
        self._apply_multiplier()

    def _apply_multiplier(self) -> None:
        m = self._mult
        self._suspect_after = self._base_suspect * m
        self._dead_after = self._base_dead * m

    # -- local health ---------------------------------------------------------------------

    @property
    def multiplier(self) -> float:
        """The local health multiplier in force (1: none)."""
        return self._mult

    def set_multiplier(self, m: float) -> None:
        """Scale both silence thresholds (and the dead_after cap) by m, 1 <= m <= 16: the
        local process lags, so the silence it measures is longer than the peer's."""
        try:
            m = float(m)
        except (TypeError, ValueError):
            raise ValueError(f"multiplier must be a number, not {m!r}") from None
        if not (m >= 1.0 and math.isfinite(m)):
            raise ValueError(f"multiplier must be >= 1, not {m!r}")
        m = min(m, MAX_MULTIPLIER)
        if m != self._mult:
            self._mult = m
            self._apply_multiplier()

    def rebase(self) -> None:
        """Forget when the last heartbeat came: the next one starts the inter-arrival count
        afresh (the gap across a local stall is not the peer's rhythm)."""
        self._last_beat = None
        self._last_sample = None

    @property
    def mean(self) -> float:
        """Mean inter-arrival time of the window (interval before any sample)."""
        return self._mean

    @property
    def std(self) -> float:
        """Standard deviation used by phi (at least min_std)."""
        return self._std

    @property
    def samples(self) -> int:
        return len(self._samples)

    def silence(self, now: float) -> float:
        """Seconds since the last sign of life (0 before the first)."""
        if self.last_heard is None:
            return 0.0
        return max(0.0, now - self.last_heard)

    def phi(self, now: float) -> float:
        """phi-accrual suspicion level now (0 before the first heartbeat)."""
        if self.last_heard is None:
            return 0.0
        return phi_of_z((self.silence(now) - self._mean) / self._std)

    def suspect_silence(self) -> float:
        """Silence at which the current history gets SUSPECT (after the cap)."""
        return self._suspect_after

    def dead_silence(self) -> float:
        """Silence at which the current history gets DEAD (after the cap)."""
        return self._dead_after

    def next_deadline(self) -> float | None:
        """The earliest `now` at which `check` could change the state (None: nothing due)."""
        if self.last_heard is None or self.state in (UNKNOWN, DEAD):
            return None
        if self.state == ALIVE:
            return self.last_heard + self._suspect_after
        return self.last_heard + self._dead_after

    # -- input --------------------------------------------------------------------------

    def heartbeat(self, now: float, epoch: int, sample: bool = True) -> list:
        """A HEARTBEAT from the peer arrived at `now`: a sign of life and an inter-arrival
        sample (sample=False: it waited in the socket while the local process lagged, so its
        arrival time is not a sample; still a sign of life)."""
        return self._arrival(now, epoch, sample=sample, beat=True)

    def heard(self, now: float, epoch: int) -> list:
        """Any other valid datagram from the peer: a sign of life, not an inter-arrival sample."""
        return self._arrival(now, epoch, sample=False)

    def _arrival(self, now: float, epoch: int, sample: bool, beat: bool = False) -> list:
        events: list = []
        if self.epoch is not None and epoch < self.epoch:
            self.stale += 1
            return events
        if sample or beat:
            self.heartbeats += 1
        if beat and not sample:
            self.rebase()  # its time is meaningless: so is the gap to the next one
        if self.epoch is None:
            self.epoch = epoch
        elif epoch > self.epoch:
            old, self.epoch = self.epoch, epoch
            self.restarts += 1
            self._reset_history()
            events.append((EV_RESTARTED, old, epoch))
            self._fresh = 0
            if self.state != ALIVE:
                self.state = ALIVE
                events.append((EV_ALIVE, now))
            self._touch(now, sample)
            return events

        if self.state == UNKNOWN:
            self.state = ALIVE
            events.append((EV_ALIVE, now))
        elif self.state == DEAD:
            self.false_suspicions += 1
            self.state = ALIVE
            self._fresh = 0
            events.append((EV_FALSE_SUSPICION, now))
            events.append((EV_ALIVE, now))
        elif self.state == SUSPECT:
            self._fresh += 1
            if self._fresh >= _RECOVER_BEATS:
                self.state = ALIVE
                self._fresh = 0
                self.recoveries += 1
                events.append((EV_ALIVE, now))
        self._touch(now, sample)
        return events

    def _touch(self, now: float, sample: bool) -> None:
        if self.last_heard is None or now > self.last_heard:
            self.last_heard = now
        if sample:
            last = self._last_beat
            if last is not None and now > last:
                gap = now - last
                if gap < _BURST_FRACTION * self.interval:
                    # a burst: a backlog read at once (here, or on the way). Not a sample, and
                    # the long gap just before it was the stall's, not the peer's rhythm.
                    self.bursts += 1
                    prev = self._last_sample
                    if (prev is not None and prev > _BURST_GAP * self.interval and self._samples
                            and self._samples[-1] == prev):
                        self._samples.pop()
                        self._recompute()
                    self._last_sample = None
                else:
                    self._samples.append(gap)
                    self._last_sample = gap
                    self._recompute()
            if last is None or now > last:
                self._last_beat = now

    def check(self, now: float) -> list:
        """Advance the state for the silence at `now`; returns the events."""
        if self.last_heard is None or self.state in (UNKNOWN, DEAD):
            return []
        # 1 ns of slack so that check(next_deadline()) fires despite float rounding
        silence = now - self.last_heard + 1e-9
        events: list = []
        if silence >= self._suspect_after or silence >= self._dead_after:
            if self.state == ALIVE:
                self.state = SUSPECT
                self.suspicions += 1
                events.append((EV_SUSPECT, now))
            self._fresh = 0    # a crossing since the last sign of life: count again
        if silence >= self._dead_after:
            self.state = DEAD
            self.deaths += 1
            events.append((EV_DEAD, now, now - self.last_heard))
        return events

    # -- reporting ----------------------------------------------------------------------

    def counters(self) -> dict:
        return {
            "suspicions": self.suspicions, "deaths": self.deaths,
            "false_suspicions": self.false_suspicions, "recoveries": self.recoveries,
            "restarts": self.restarts, "stale": self.stale, "heartbeats": self.heartbeats,
            "bursts": self.bursts,
        }

    def snapshot(self, now: float) -> dict:
        """JSON-able view for status files and the dashboard."""
        return {
            "kind": self.kind, "state": self.state, "epoch": self.epoch,
            "silence": round(self.silence(now), 6), "phi": round(self.phi(now), 3),
            "mean": round(self._mean, 6), "std": round(self._std, 6),
            "suspect_silence": round(self._suspect_after, 6),
            "dead_silence": round(self._dead_after, 6), "multiplier": round(self._mult, 3),
            **self.counters(),
        }

    def __repr__(self) -> str:
        return (f"FailureDetector(kind={self.kind!r}, state={self.state!r}, epoch={self.epoch}, "
                f"mean={self._mean:.4f}, std={self._std:.4f})")
