"""The failure detector (appliance.health), with an injected clock: no sleeping, no sockets."""

import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.health import (
    ALIVE, DEAD, SUSPECT, UNKNOWN, FailureDetector, phi_of_z, z_of_phi,
)

KINDS = ["phi", "missed"]
INTERVALS = [0.010, 0.020, 0.050]
DEAD_AFTER = 0.100
STEP = 0.001          # how often the tests call check()


def kinds_of(events):
    return [e[0] for e in events]


def feed(det, gaps, t0=0.0, epoch=1, check_before=True):
    """Heartbeats separated by `gaps`, check() just before each arrival (the longest silence
    of each gap: silence only grows between arrivals, so this sees every crossing).
    Returns (time of the last heartbeat, all events)."""
    t = t0
    events = det.heartbeat(t, epoch)
    for g in gaps:
        t += g
        if check_before:
            events += det.check(t)
        events += det.heartbeat(t, epoch)
    return t, events


def jittered(rng, interval, n, jitter=0.3, loss=0.0):
    """Inter-arrival gaps: each send interval +-jitter (uniform); a lost heartbeat merges two
    gaps (never two losses in a row)."""
    gaps, lost_prev = [], False
    while len(gaps) < n:
        g = interval * (1 + rng.uniform(-jitter, jitter))
        if not lost_prev and rng.random() < loss:
            g += interval * (1 + rng.uniform(-jitter, jitter))
            lost_prev = True
        else:
            lost_prev = False
        gaps.append(g)
    return gaps


def time_to_dead(det, last, step=STEP, limit=5.0):
    """Silence after `last` at which check() (called every `step`) declares DEAD."""
    k = 1
    while k * step < limit:
        now = last + k * step
        for ev in det.check(now):
            if ev[0] == "dead":
                assert ev[2] == pytest.approx(now - last)
                return now - last
        k += 1
    raise AssertionError("never declared dead")


# -- phi arithmetic -------------------------------------------------------------------------

def test_phi_of_z_is_continuous_increasing_and_inverted():
    zs = [-5 + 0.05 * i for i in range(2000)]
    phis = [phi_of_z(z) for z in zs]
    assert all(b > a for a, b in zip(phis, phis[1:]))
    assert phi_of_z(0) == pytest.approx(math.log10(2))
    # the switch to the asymptotic tail is seamless
    assert phi_of_z(29.999999) == pytest.approx(phi_of_z(30.000001), rel=1e-6)
    assert math.isfinite(phi_of_z(1e4))
    for p in (0.5, 1, 3, 16.65, 44.1, 224, 5000):
        assert phi_of_z(z_of_phi(p)) == pytest.approx(p, rel=1e-9)


def test_default_thresholds():
    det = FailureDetector()
    assert (det.kind, det.interval, det.dead_after) == ("phi", 0.02, 0.1)
    # steady history: SUSPECT at 62 ms, DEAD at 90 ms of silence (cap 100 ms)
    assert det.suspect_silence() == pytest.approx(0.062)
    assert det.dead_silence() == pytest.approx(0.090)
    assert det.suspect_phi < det.dead_phi
    missed = FailureDetector("missed")
    assert missed.k == 5
    assert missed.suspect_silence() == pytest.approx(0.050)
    assert missed.dead_silence() == pytest.approx(0.100)


@pytest.mark.parametrize("kwargs", [
    dict(kind="nope"), dict(interval=0), dict(interval=-1), dict(interval=float("nan")),
    dict(dead_after=0.02), dict(dead_after=0.01), dict(window=1), dict(min_std=0),
    dict(suspect_phi=50, dead_phi=10),
])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        FailureDetector(**kwargs)


# -- normal operation -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("interval", INTERVALS)
def test_steady_jitter_never_suspected(kind, interval):
    rng = random.Random(f"{kind}{interval}")
    det = FailureDetector(kind, interval, DEAD_AFTER)
    _, events = feed(det, jittered(rng, interval, 10_000, jitter=0.3))
    assert kinds_of(events) == ["alive"]
    assert det.state == ALIVE
    assert (det.suspicions, det.deaths, det.false_suspicions) == (0, 0, 0)
    assert det.samples == det.window
    assert det.mean == pytest.approx(interval, rel=0.1)


@pytest.mark.parametrize("interval", [0.010, 0.020])
def test_phi_occasional_single_loss_never_suspected(interval):
    rng = random.Random(interval)
    det = FailureDetector("phi", interval, DEAD_AFTER)
    _, events = feed(det, jittered(rng, interval, 10_000, jitter=0.3, loss=0.02))
    assert kinds_of(events) == ["alive"]
    assert det.suspicions == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("interval", [0.010, 0.020])
def test_one_lost_heartbeat_is_not_death(kind, interval):
    rng = random.Random(1)
    det = FailureDetector(kind, interval, DEAD_AFTER)
    last, events = feed(det, jittered(rng, interval, 150))
    # the worst single loss: two long gaps merged, checked every ms
    gap = 2 * 1.3 * interval
    for k in range(1, int(gap / STEP) + 1):
        events += det.check(last + k * STEP)
    events += det.check(last + gap)
    events += det.heartbeat(last + gap, 1)
    _, more = feed(det, jittered(rng, interval, 50), t0=last + gap)
    events += more
    assert "dead" not in kinds_of(events)
    assert det.state in (ALIVE, SUSPECT)
    assert det.deaths == 0
    if kind == "phi":
        assert det.suspicions == 0


# -- detection time ---------------------------------------------------------------------------

def histories(rng, interval):
    """name -> (gaps, normal?) ; the lower bound is promised only for normal histories."""
    return {
        "steady": ([interval] * 300, True),
        "jitter30": (jittered(rng, interval, 300, 0.3), True),
        "lossy": (jittered(rng, interval, 300, 0.3, loss=0.05), True),
        "short": ([interval] * 3, True),
        "first": ([], True),
        "jitter90": (jittered(rng, interval, 300, 0.9), False),
        "exponential": ([rng.expovariate(1 / interval) for _ in range(300)], False),
        "pauses": ([interval if i % 10 else 3 * interval for i in range(300)], False),
        "fast": ([interval / 2] * 300, False),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("interval", INTERVALS)
@pytest.mark.parametrize("dead_after", [DEAD_AFTER, "5x"])
def test_silence_dead_within_bounds(kind, interval, dead_after):
    dead_after = 5 * interval if dead_after == "5x" else dead_after
    rng = random.Random(f"{kind}{interval}{dead_after}")
    for name, (gaps, normal) in histories(rng, interval).items():
        det = FailureDetector(kind, interval, dead_after)
        last, _ = feed(det, gaps)
        # a wild history may be suspected (or die) on the way: quick heartbeats make it
        # ALIVE again, then it falls silent
        while det.state != ALIVE:
            last += interval / 4
            det.heartbeat(last, 1)
        det.check(last)
        assert det.state == ALIVE, name
        deaths, suspicions = det.deaths, det.suspicions
        silence = time_to_dead(det, last)
        assert silence <= dead_after + interval + 1e-9, (name, silence)
        assert silence <= dead_after + STEP + 1e-9, (name, silence)   # the cap, in fact
        if normal or kind == "missed":
            assert silence >= 0.8 * dead_after - 1e-9, (name, silence)
        assert det.state == DEAD, name
        assert (det.deaths, det.suspicions) == (deaths + 1, suspicions + 1), name


def test_dead_event_carries_silence_and_suspect_precedes():
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 50)
    events = []
    for k in range(1, 200):
        events += det.check(last + k * STEP)
    assert kinds_of(events) == ["suspect", "dead"]
    (_, t_s), (_, t_d, silence) = events
    assert t_s - last == pytest.approx(0.062, abs=STEP)
    assert t_d - last == pytest.approx(0.090, abs=STEP)
    assert silence == pytest.approx(t_d - last)


def test_rare_check_emits_suspect_and_dead_together():
    det = FailureDetector()
    det.heartbeat(0.0, 1)
    events = det.check(1.0)
    assert kinds_of(events) == ["suspect", "dead"]
    assert events[1] == ("dead", 1.0, 1.0)
    assert det.check(2.0) == []       # DEAD is sticky: no repeats
    assert det.deaths == 1


def test_jittery_history_is_slower_but_capped():
    rng = random.Random(5)
    calm = FailureDetector()
    wild = FailureDetector()
    feed(calm, jittered(rng, 0.02, 200, 0.1))
    feed(wild, jittered(rng, 0.02, 200, 0.9))
    assert wild.std > calm.std
    assert wild.suspect_silence() > calm.suspect_silence()
    assert wild.dead_silence() == pytest.approx(0.1)    # the cap


# -- false suspicion, restart, stale, unknown ---------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_false_suspicion_counted(kind):
    det = FailureDetector(kind)
    last, _ = feed(det, [0.02] * 100, epoch=7)
    events = []
    for k in range(1, 150):                   # a 150 ms pause
        events += det.check(last + k * STEP)
    assert det.state == DEAD
    t = last + 0.150
    events += det.check(t)
    back = det.heartbeat(t, 7)
    assert back == [("false_suspicion", t), ("alive", t)]
    assert det.state == ALIVE
    assert (det.suspicions, det.deaths, det.false_suspicions, det.recoveries) == (1, 1, 1, 0)
    # it carries on normally afterwards, and the pause entered its history
    last, more = feed(det, [0.02] * 50, t0=t + 0.02, epoch=7)
    assert "dead" not in kinds_of(more)
    assert det.false_suspicions == 1


def test_restart_with_newer_epoch_after_death():
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 100, epoch=100)
    det.check(last + 0.2)
    assert det.state == DEAD
    t = last + 0.5
    events = det.heartbeat(t, 200)
    assert events == [("restarted", 100, 200), ("alive", t)]
    assert det.state == ALIVE and det.epoch == 200
    assert det.samples == 0 and det.restarts == 1 and det.false_suspicions == 0
    # fresh history: nominal thresholds
    assert det.dead_silence() == pytest.approx(0.09)


def test_restart_while_alive_resets_history():
    det = FailureDetector()
    last, _ = feed(det, jittered(random.Random(2), 0.02, 100, 0.6), epoch=1)
    assert det.samples == 100
    events = det.heartbeat(last + 0.02, 2)
    assert events == [("restarted", 1, 2)]     # was ALIVE: no "alive" transition
    assert det.state == ALIVE and det.samples == 0


def test_restart_while_suspect():
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 10, epoch=1)
    det.check(last + 0.07)
    assert det.state == SUSPECT
    assert det.heartbeat(last + 0.07, 2) == [("restarted", 1, 2), ("alive", last + 0.07)]
    assert det.state == ALIVE


def test_older_epoch_ignored():
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 10, epoch=5)
    for k in range(1, 40):
        assert det.heartbeat(last + k * 0.005, 4) == []   # stale: not a sign of life
    assert det.stale == 39 and det.epoch == 5 and det.last_heard == last
    assert kinds_of(det.check(last + 0.2)) == ["suspect", "dead"]
    assert det.heartbeat(last + 0.3, 4) == []
    assert det.state == DEAD


def test_unknown_is_never_dead():
    det = FailureDetector()
    assert det.state == UNKNOWN and det.last_heard is None and det.epoch is None
    for t in (0.0, 0.1, 1.0, 1e6):
        assert det.check(t) == []
        assert det.phi(t) == 0.0
    assert det.state == UNKNOWN and det.deaths == 0
    assert det.next_deadline() is None
    assert det.heartbeat(5.0, 1) == [("alive", 5.0)]


# -- hysteresis -------------------------------------------------------------------------------

def test_suspect_needs_two_heartbeats():
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 50)
    assert det.check(last + 0.07) == [("suspect", last + 0.07)]
    t = last + 0.07
    assert det.heartbeat(t, 1) == []
    assert det.state == SUSPECT
    assert det.heartbeat(t + 0.02, 1) == [("alive", t + 0.02)]
    assert det.state == ALIVE and det.recoveries == 1 and det.false_suspicions == 0


def test_suspect_count_restarts_after_new_crossing():
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 50)
    det.check(last + 0.07)
    t = last + 0.07
    det.heartbeat(t, 1)                                 # one fresh heartbeat
    assert det.check(t + 0.08) == []                    # crossed again, still SUSPECT
    assert det.state == SUSPECT
    assert det.heartbeat(t + 0.08, 1) == []             # counts as the first again
    assert det.state == SUSPECT
    assert det.heartbeat(t + 0.10, 1) == [("alive", t + 0.10)]


def test_heard_is_sign_of_life_not_sample():
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 20)
    n = det.samples
    for k in range(1, 30):                 # adverts every 10 ms, heartbeats lost
        assert det.heard(last + k * 0.01, 1) == []
    assert det.samples == n and det.last_heard == pytest.approx(last + 0.29)
    assert det.state == ALIVE
    # a burst of adverts does not shrink the mean
    det.heartbeat(last + 0.30, 1)
    assert det.mean == pytest.approx(0.02 + (0.30 - 0.02) / det.samples, rel=1e-6)


def test_next_deadline_matches_check():
    det = FailureDetector()
    last, _ = feed(det, jittered(random.Random(3), 0.02, 100))
    d1 = det.next_deadline()
    assert det.check(d1 - 1e-6) == [] and kinds_of(det.check(d1)) == ["suspect"]
    d2 = det.next_deadline()
    assert d2 > d1
    assert det.check(d2 - 1e-6) == [] and kinds_of(det.check(d2)) == ["dead"]
    assert det.next_deadline() is None


def test_snapshot_is_plain():
    import json
    det = FailureDetector()
    feed(det, [0.02] * 5)
    snap = det.snapshot(0.2)
    json.dumps(snap)
    assert snap["state"] == ALIVE and snap["kind"] == "phi"


# -- properties -------------------------------------------------------------------------------

gap_lists = st.lists(st.floats(min_value=0.0, max_value=0.3, allow_nan=False), max_size=150)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS),
       interval=st.sampled_from([0.005, 0.01, 0.02, 0.03, 0.05]),
       ratio=st.floats(min_value=1.2, max_value=20),
       gaps=gap_lists,
       heard=st.booleans())
def test_property_dead_never_later_than_bound(kind, interval, ratio, gaps, heard):
    """Whatever the history (gaps of 0 to 300 ms, deaths and false suspicions included), a
    silent peer is DEAD no later than dead_after + interval after its last sign of life."""
    dead_after = interval * ratio
    det = FailureDetector(kind, interval, dead_after)
    t = 0.0
    det.heartbeat(t, 1)
    for g in gaps:
        det.check(t + g)
        t += g
        (det.heard if heard and g < interval / 4 else det.heartbeat)(t, 1)
    step = min(STEP, interval / 4)
    k, silence = 0, None
    while silence is None:
        k += 1
        now = t + k * step
        if "dead" in kinds_of(det.check(now)):
            silence = now - t
        assert k * step <= dead_after + interval + step
    assert silence <= dead_after + interval


@settings(max_examples=200, deadline=None)
@given(interval=st.sampled_from([0.01, 0.02]),
       seed=st.integers(0, 2**32 - 1),
       jitter=st.floats(min_value=0.0, max_value=0.3),
       loss=st.floats(min_value=0.0, max_value=0.05),
       n=st.integers(0, 300))
def test_property_phi_normal_histories(interval, seed, jitter, loss, n):
    """With heartbeats every interval +-30% and rare single losses: never DEAD while they
    come, and DEAD after silence within [0.8, 1] x dead_after (+ one check step)."""
    det = FailureDetector("phi", interval, DEAD_AFTER)
    last, events = feed(det, jittered(random.Random(seed), interval, n, jitter, loss))
    assert "dead" not in kinds_of(events)
    silence = time_to_dead(det, last)
    assert 0.8 * DEAD_AFTER - 1e-9 <= silence <= DEAD_AFTER + STEP + 1e-9


# -- local health: multiplier, stale arrivals, bursts ---------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_multiplier_scales_both_thresholds_and_the_cap(kind):
    det = FailureDetector(kind)
    last, _ = feed(det, [0.02] * 50)
    s0, d0 = det.suspect_silence(), det.dead_silence()
    det.set_multiplier(2.5)
    assert det.multiplier == 2.5
    assert det.suspect_silence() == pytest.approx(2.5 * s0) and det.dead_silence() == pytest.approx(2.5 * d0)
    assert det.next_deadline() == pytest.approx(last + 2.5 * s0)
    assert time_to_dead(det, last) == pytest.approx(2.5 * d0, abs=STEP)
    # the history keeps its effect under the multiplier; back to 1 restores the thresholds
    det.heartbeat(last + 1.0, 1)
    det.set_multiplier(1)
    assert det.dead_silence() <= det.dead_after + 1e-12
    with pytest.raises(ValueError):
        det.set_multiplier(0.5)
    with pytest.raises(ValueError):
        det.set_multiplier(float("nan"))
    det.set_multiplier(1000)
    assert det.multiplier == 16.0  # capped
    assert det.snapshot(last)["multiplier"] == 16.0


def test_a_stale_heartbeat_is_a_sign_of_life_not_a_sample():
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 50)
    n, mean = det.samples, det.mean
    assert det.heartbeat(last + 0.3, 1, sample=False) == []
    assert det.samples == n and det.mean == mean and det.last_heard == last + 0.3
    assert det.heartbeats == 52 and det.state == ALIVE
    det.heartbeat(last + 0.32, 1)  # nor the gap from the stale one, nor from the last sampled one
    assert det.samples == n
    det.heartbeat(last + 0.34, 1)
    assert det.samples == n + 1 and det.mean == pytest.approx(0.02)


def test_rebase_skips_the_gap_across_a_local_stall():
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 50)
    n = det.samples
    det.rebase()
    det.heartbeat(last + 0.5, 1)      # no sample: the gap is the stall's
    assert det.samples == n
    det.heartbeat(last + 0.52, 1)
    assert det.samples == n + 1 and det.mean == pytest.approx(0.02)


def test_a_burst_after_a_stall_does_not_confuse_phi():
    """A backlog read at once after a 300 ms stall: one huge gap, then near-zero ones. Without
    the burst rule the std would jump (slower detection for a whole window) and the mean
    drop; with it the history is what it was, and detection time too."""
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 100)
    mean, std, dead = det.mean, det.std, det.dead_silence()
    t = last + 0.3
    for k in range(15):               # 15 heartbeats read 20 us apart
        det.heartbeat(t + k * 2e-5, 1)
    assert det.bursts == 14
    assert det.mean == pytest.approx(mean) and det.std == pytest.approx(std)
    assert det.dead_silence() == pytest.approx(dead)
    last, events = feed(det, [0.02] * 20, t0=t + 14 * 2e-5)
    assert "dead" not in kinds_of(events) and det.std == pytest.approx(std, rel=0.05)
    assert time_to_dead(det, last) == pytest.approx(0.09, abs=2 * STEP)


def test_network_reordering_is_not_a_burst():
    """A heartbeat delayed 12 ms and the next on time: gaps of 32 and 8 ms, both samples."""
    det = FailureDetector()
    last, _ = feed(det, [0.02] * 20)
    n = det.samples
    det.heartbeat(last + 0.032, 1)
    det.heartbeat(last + 0.040, 1)
    assert det.samples == n + 2 and det.bursts == 0
