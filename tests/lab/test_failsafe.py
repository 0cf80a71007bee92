"""The outcome contract in the lab: every connection of a dead replica ends byte-exact, or
with a reset its kernel accepts within 2 s of the crash; never a hang, never a splice.

Real curl through the client appliance, the embedded server, nginx and lighttpd; replicas
with their own copies of the docroot where the case needs them (appliance.lab's
docroot="copy" and alter_object), each validators level (strict, last-modified, digest).
"""

from __future__ import annotations

import os
import random
import socket
import sys
import time

import pytest

import labutil
from appliance.control import call
from appliance.lab import wait_for
from appliance.selection import MemberInfo, rank
from appliance.statusfile import read_events, read_status
from labutil import Download, client_conn, group_ready, owner_of, replica_at, wait_fraction

pytestmark = pytest.mark.lab

BIG = "/obj-20m"
RESET_WITHIN = 2.0  # seconds from the crash to the client's reset
CURL_RESET = 56  # curl: failure receiving network data (the connection was reset)
ROUNDS = int(os.environ.get("APPLIANCE_FAILSAFE_ROUNDS", "10"))


def appliance_lab(**kw):
    kw.setdefault("client_path", "appliance")
    kw.setdefault("appliances", True)
    kw.setdefault("links", {r: {"rate": "40mbit"} for r in "abc"})
    return labutil.running_lab(**kw)


def validators(level):
    return {"takeover": {"validators": level}}


def outcomes(lab, since):
    """The client appliance's outcome events since `since`: [(outcome, reason)]."""
    return [(e["event"], e.get("reason")) for e in read_events(lab.lab_dir, "client", "ca")
            if e["t"] >= since and e["event"] in ("client_reset", "migrated")]


def assert_reset_promptly(lab, dl, killed, code, err):
    assert code == CURL_RESET, (code, err)
    assert dl.ended - killed < RESET_WITHIN, f"reset {dl.ended - killed:.2f} s after the crash"
    assert any(k == "client_reset" for k, _ in outcomes(lab, killed)), outcomes(lab, killed)


def first_candidate(lab, path, dead="a"):
    """The member ranked first to take the client's latest connection to `dead` over."""
    conn = client_conn(lab)
    cip, cport = conn["client"]
    key = (socket.inet_aton(cip), cport, socket.inet_aton(lab.ip(dead)), 80)
    members = {}
    for r in lab.replicas:
        if r != dead:
            g = (read_status(lab.lab_dir, "server", r) or {}).get("group") or {}
            members[r] = MemberInfo(load=g.get("advertised_load", 0.0) or 0.0, prefixes=("/",), alive=True)
    return rank(key, path, members)[0]


def revive(lab, replica="a"):
    lab.revive_replica(replica)
    group_ready(lab)


# --- validators levels and copies that differ ------------------------------------------------------


@pytest.mark.parametrize("level", ["last-modified", "strict"])
def test_lighttpd_own_copies_resume_under_last_modified_and_reset_under_strict(netns_ok, level):
    """lighttpd's ETags include the inode: identical copies look different to strict."""
    with appliance_lab(server="lighttpd", docroot="copy", object_sizes=("20m",),
                       group_config=validators(level)) as lab:
        group_ready(lab)
        size, digest = lab.objects[BIG]
        dl = Download(lab, [lab.url("a", BIG)])
        wait_fraction(lab, dl, size, 0.3)
        killed = lab.kill_replica("a")
        code, err = dl.wait()
        if level == "last-modified":
            assert code == 0, err
            assert dl.sha() == digest
        else:
            assert_reset_promptly(lab, dl, killed, code, err)
            assert dl.size() < size


def test_other_bytes_are_never_spliced(netns_ok):
    """builtin server, own copies, strict: b and c hold another version (other bytes, other
    mtime) -> reset; then only the first candidate's copy differs -> the other one resumes."""
    with appliance_lab(docroot="copy", object_sizes=("20m",)) as lab:
        group_ready(lab)
        size, digest = lab.objects[BIG]
        for r in "bc":
            lab.alter_object(r, BIG, "bytes+mtime")
        dl = Download(lab, [lab.url("a", BIG)])
        wait_fraction(lab, dl, size, 0.3)
        killed = lab.kill_replica("a")
        code, err = dl.wait()
        assert_reset_promptly(lab, dl, killed, code, err)
        # now only the first candidate of the next connection has another copy
        revive(lab)
        _restore(lab, "bc")
        dl = Download(lab, [lab.url("a", BIG)])
        wait_fraction(lab, dl, size, 0.3)
        first = first_candidate(lab, BIG)
        lab.alter_object(first, BIG, "bytes+mtime")
        cport = client_conn(lab)["client"][1]
        lab.kill_replica("a")
        code, err = dl.wait()
        assert code == 0, err
        assert dl.sha() == digest
        taker = replica_at(lab, owner_of(lab, cport))
        assert taker not in ("a", first), (taker, first)
        passed = [e for e in read_events(lab.lab_dir, "server", first) if e["event"] == "passed"]
        assert passed and passed[-1]["reason"].startswith(("etag:", "last-modified:"))


def _restore(lab, replicas):
    """Put the shared original back into each replica's copy (same inode, original mtime)."""
    import shutil
    for r in replicas:
        for path in lab.objects:
            src = os.path.join(lab.docroot, path.lstrip("/"))
            dst = os.path.join(lab.docroot_of(r), path.lstrip("/"))
            shutil.copyfile(src, dst)
            st = os.stat(src)
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_digest_level_catches_same_size_same_mtime_other_bytes(netns_ok):
    with appliance_lab(docroot="copy", object_sizes=("20m",), group_config=validators("digest")) as lab:
        group_ready(lab)
        size, digest = lab.objects[BIG]
        for r in "bc":
            lab.alter_object(r, BIG, "bytes")  # headers identical everywhere
        dl = Download(lab, [lab.url("a", BIG)])
        wait_fraction(lab, dl, size, 0.3)
        killed = lab.kill_replica("a")
        code, err = dl.wait()
        assert_reset_promptly(lab, dl, killed, code, err)
        for r in "bc":
            checks = [e for e in read_events(lab.lab_dir, "server", r) if e["event"] == "checked" and not e["ok"]]
            assert all(e["reason"].startswith("digest:") for e in checks), checks


# --- connections that were not resumable, or not yet answered -----------------------------------------


def test_chunked_response_is_reset_and_a_crash_before_the_head_is_answered_in_full(netns_ok):
    with appliance_lab(object_sizes=("20m", "1m")) as lab:
        group_ready(lab)
        dl = Download(lab, [lab.url("a", BIG + "?chunked=1")])
        assert wait_for(lambda: dl.size() > 2 << 20, timeout=20), dl.size()
        killed = lab.kill_replica("a")
        code, err = dl.wait()
        assert_reset_promptly(lab, dl, killed, code, err)
        revive(lab)
        # the request reached a, which takes 2 s to answer: a dies before the response head
        size, digest = lab.objects["/obj-1m"]
        dl = Download(lab, [lab.url("a", "/obj-1m?delay_ms=2000")])
        time.sleep(0.6)  # the tap saw the request and the group has the PENDING entry
        lab.kill_replica("a")
        code, err = dl.wait()
        assert code == 0, err
        assert dl.sha() == digest


# --- later responses on a connection a taker carries --------------------------------------------------


def test_cascade_during_a_later_keepalive_response(netns_ok):
    with appliance_lab(object_sizes=("20m", "10m")) as lab:
        group_ready(lab)
        urls = [lab.url("a", "/obj-10m"), lab.url("a", BIG)]
        dl = Download(lab, urls, extra=("-w", "%{num_connects}\n"))
        wait_fraction(lab, dl, lab.objects["/obj-10m"][0], 0.3)
        cport = client_conn(lab)["client"][1]
        lab.kill_replica("a")
        first = wait_for(lambda: (o := owner_of(lab, cport)) and o[0] != lab.ip("a") and o, timeout=5)
        assert first, "nobody took the connection over from a"
        taker = replica_at(lab, first)
        wait_fraction(lab, dl, lab.objects[BIG][0], 0.3, i=1)  # the second response, from the taker
        lab.kill_replica(taker)
        code, err = dl.wait()
        assert code == 0, err
        assert dl.sha(0) == lab.objects["/obj-10m"][1] and dl.sha(1) == lab.objects[BIG][1]
        assert dl.stdout.split()[:1] == ["1"]  # one connection for both
        last = owner_of(lab, cport)
        assert replica_at(lab, last) not in ("a", taker)


# --- the client's position cannot be poisoned -------------------------------------------------------------


INJECT = r'''
import random, sys
sys.path.insert(0, sys.argv[1])
import _fastpath as fp
from appliance.inject import RawInjector
from helpers import garbage_options
src, cport, dst, n, seed = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
rng = random.Random(seed)
inj = RawInjector()
if n == 0:   # one frame with a wrong TCP checksum and an ack a gigabyte ahead
    f = bytearray(fp.build_tcp(src, dst, cport, 80, rng.getrandbits(32), rng.getrandbits(32), fp.ACK, 500))
    f[36] ^= 0xFF
    assert inj.send(bytes(f))
for _ in range(n):
    opts = fp.pad_options(garbage_options(rng)[:40])
    inj.send(fp.build_tcp(src, dst, cport, 80, rng.getrandbits(32), rng.getrandbits(32), fp.ACK,
                          rng.getrandbits(16), opts))
'''


@pytest.mark.parametrize("frames", [0, 20_000])
def test_forged_frames_do_not_poison_the_clients_position(netns_ok, frames):
    with appliance_lab(object_sizes=("20m",)) as lab:
        group_ready(lab)
        size, digest = lab.objects[BIG]
        dl = Download(lab, [lab.url("a", BIG)])
        wait_fraction(lab, dl, size, 0.2)
        cip, cport = client_conn(lab)["client"]
        tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        lab.run("c1", [sys.executable, "-c", INJECT, tests, cip, str(cport), lab.ip("a"), str(frames),
                       str(random.randrange(1 << 30))], timeout=120)
        table = read_status(lab.lab_dir, "client", "ca")["table"]
        if frames == 0:
            assert wait_for(lambda: read_status(lab.lab_dir, "client", "ca")["table"]["untracked_bad_csum"] >= 1,
                            timeout=3), table
        lab.kill_replica("a")
        code, err = dl.wait()
        assert code == 0, err
        assert dl.sha() == digest


# --- no stall at the seam ---------------------------------------------------------------------------------


def test_twenty_concurrent_downloads_through_one_crash_again_and_again(netns_ok):
    sizes = ("100k", "1m", "10m")
    with appliance_lab(object_sizes=sizes, links={r: {"rate": "100mbit"} for r in "abc"}) as lab:
        group_ready(lab)
        rng = random.Random(9)
        for rnd in range(ROUNDS):
            objs = [f"/obj-{rng.choice(sizes)}" for _ in range(20)]
            objs[0] = "/obj-10m"  # at least one still running at the crash
            dl = Download(lab, [lab.url("a", o) for o in objs], parallel=True)
            wait_fraction(lab, dl, lab.objects["/obj-10m"][0], 0.25)
            lab.kill_replica("a")
            code, err = dl.wait(timeout=120)
            bad = [(i, o, dl.size(i)) for i, o in enumerate(objs) if dl.sha(i) != lab.objects[o][1]]
            assert code == 0 and not bad, f"round {rnd}: curl {code} {err} {bad}"
            revive(lab)


def test_crash_while_the_client_holds_data_above_a_hole(netns_ok):
    """3 % loss on a's link: at the crash the client holds out-of-order data; the SYN/ACK
    tells the taker what it holds above the hole, and the download ends byte-exact.

    The hole is seen (the client's latest ACK carries SACK blocks) a few ms before the crash
    and may be filled in between: then the client appliance's answer has no SACK blocks and
    the taker holds nothing; the crash is tried again (up to ATTEMPTS) until one comes while
    the client still holds data above a hole."""
    attempts = 4
    with appliance_lab(object_sizes=("20m",), links={"a": {"rate": "20mbit", "loss": 0.03},
                                                     "b": {"rate": "40mbit"}, "c": {"rate": "40mbit"}}) as lab:
        group_ready(lab)
        size, digest = lab.objects[BIG]
        tried = []
        for attempt in range(attempts):
            if attempt:
                revive(lab)
            dl = Download(lab, [lab.url("a", BIG)])
            wait_fraction(lab, dl, size, 0.3, timeout=60)

            def holding():  # the client's latest ACK carries SACK blocks: data above a hole
                conns = [c for c in call(lab.lab_dir / "client-ca.sock", {"cmd": "status"})["connections"]
                         if c["state"] != "closed"]
                return conns and conns[-1]["client_to_server"]["sack"]
            assert wait_for(holding, timeout=10, interval=0.005), "the client never held data above a hole"
            killed = lab.kill_replica("a")
            code, err = dl.wait()
            assert code == 0, err
            assert dl.sha() == digest
            answered = [e for e in read_events(lab.lab_dir, "client", "ca")
                        if e["event"] == "migrate_answered" and e["t"] >= killed]
            held = [e["held_above"] for r in "bc" for e in read_events(lab.lab_dir, "server", r)
                    if e["event"] == "synack" and e["t"] >= killed]
            assert answered and held, (answered, held)
            # what the client appliance's answer said it holds is what the taker queued as sent
            assert (held[0] > 0) == bool(answered[0]["sack"]), (answered[0], held)
            tried.append(held[0])
            if held[0] > 0:
                break
        assert tried[-1] > 0, f"in {attempts} crashes the hole was always filled before the SYN/ACK: {tried}"
