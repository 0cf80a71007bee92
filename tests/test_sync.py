"""Support-group sync (appliance.sync), in memory: codec, drops, fuzz, pages, soft state over a
lossy, reordering, duplicating, partitioning network with an injected clock, and entries
built from a real stream mapper."""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import hmac
import random

import msgpack
import pytest

import _fastpath as fp
from appliance import sync
from appliance.streammap import StreamMapper
from appliance.sync import (
    ACTIVE, ADVERT, CLAIM, HEARTBEAT, IDLE, MAX_DATAGRAM, PASS, PENDING, PROBE_ACK, PROBE_REQ, PROBE_STATES, RESET,
    WITHDRAW, Decoder, Entry, ObjectRef, SyncNode, encode, entry_from_connection,
)

KEY = b"0123456789abcdef0123456789abcdef"
GROUP = "video"
OBJ = ObjectRef("video.example.net", "/media/films/2026/a-0001/video-1080p.mp4", '"6543a1b2-1f4c3d2"',
                "Thu, 26 Nov 2026 10:00:00 GMT", 123_456_789)


def entry(i=0, obj=OBJ, v6=False, state=ACTIVE, server=1, rng=None, **kw):
    """A realistic entry for client number i (deterministic)."""
    r = random.Random(i * 7919 + server)
    if v6:
        cip = bytes.fromhex("20010db8000100000000000000000000")[:12] + i.to_bytes(4, "big")
        sip = bytes.fromhex("20010db8000200000000000000000000")[:15] + bytes((server,))
    else:
        cip = bytes((10, 1, (i >> 8) & 255, i & 255))
        sip = bytes((10, 70, 1, server))
    fields = dict(client_ip=cip, client_port=40000 + i % 20000, server_ip=sip, server_port=80,
                  ni=r.getrandbits(32), na=r.getrandbits(32), c_mss=1460, c_wscale=7, c_sack=True, c_ts=True,
                  s_mss=1400, s_wscale=9, s_sack=True, s_ts=True, mp=True, reqno=0, state=state,
                  object=obj if state == ACTIVE else None, req_range=rng, status=206 if rng else 200,
                  body_start=r.getrandbits(32), body_offset=100 if rng else 0, body_length=obj.total_length)
    if state == IDLE:
        fields.update(req_range=None, status=0, body_start=0, body_offset=0, body_length=0)
    fields.update(kw)
    return Entry(**fields)


def node(name="a", epoch=1, key=KEY, **kw):
    return SyncNode(name, GROUP, key, epoch, **kw)


def datagrams(out):
    return [d for _, d in out]


def mac(data, key=KEY):
    return data + hmac.new(key or b"", data, hashlib.sha256).digest()


# --- entries ------------------------------------------------------------------------------


def test_entry_fields_follow_the_design_table_and_key():
    assert sync.ENTRY_FIELDS == (
        "client_ip", "client_port", "server_ip", "server_port", "ni", "na", "c_mss", "c_wscale", "c_sack",
        "c_ts", "s_mss", "s_wscale", "s_sack", "s_ts", "mp", "reqno", "state", "object", "req_range",
        "status", "body_start", "body_offset", "body_length", "reason")
    e = entry(3)
    assert e.key == (bytes((10, 1, 0, 3)), 40003, bytes((10, 70, 1, 1)), 80)
    assert [f.name for f in dataclasses.fields(ObjectRef)] == ["host", "path", "etag", "last_modified",
                                                               "total_length", "digest"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.ni = 1
    hash(e), hash(OBJ)


@pytest.mark.parametrize("bad", [
    dict(client_ip=b"\1\2\3"), dict(server_ip=bytes(16)), dict(client_port=70000), dict(ni=1 << 32),
    dict(c_wscale=15), dict(s_mss=-1), dict(c_sack=1), dict(reqno=128), dict(state="RUNNING"),
    dict(object=None), dict(req_range=5), dict(body_length=-1),
])
def test_entry_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        entry(1, **bad)


def test_idle_entry_has_no_object():
    e = entry(1, state=IDLE)
    assert e.object is None and e.state == IDLE
    with pytest.raises(ValueError):
        entry(1, state=IDLE, object=OBJ)
    with pytest.raises(ValueError):
        ObjectRef("h", "/p", None, None, -1)


# --- codec --------------------------------------------------------------------------------


def test_datagram_layout_version_msgpack_hmac():
    d = encode(HEARTBEAT, GROUP, "a", 7, 1, [0.5, 3, 6, ["/"], 7700], KEY)
    assert d[0] == 1
    assert msgpack.unpackb(d[1:-32]) == [1, GROUP, "a", 7, 1, [0.5, 3, 6, ["/"], 7700]]
    assert d[-32:] == hmac.new(KEY, d[:-32], hashlib.sha256).digest()
    # insecure mode: HMAC with the empty key
    d = encode(HEARTBEAT, GROUP, "a", 7, 1, [0.5, 3, 6, ["/"], 7700], None)
    assert d[-32:] == hmac.new(b"", d[:-32], hashlib.sha256).digest()
    with pytest.raises(ValueError):
        encode(HEARTBEAT, GROUP, "a", 7, 1, [0.5, 3, 6, ["x" * 2000], 7700], KEY)


def test_pending_reset_and_digest_entries_round_trip():
    """Every state and an object digest cross the wire intact; PASS is a kind of its own."""
    a, b = node("a", 5), node("b", 9)
    digest = hashlib.sha256(b"the object").digest()
    obj = dataclasses.replace(OBJ, digest=digest)
    pending_obj = ObjectRef("h", "/p?x=1", None, None, 0)
    es = [entry(1, obj=obj), entry(2, state=PENDING, object=pending_obj, status=0, body_length=0),
          entry(3, state=RESET, object=None, reason="chunked transfer-encoding", status=0, body_length=0),
          entry(4, state=RESET, object=OBJ, reason="no validators")]
    for e in es:
        a.add_local(e, 0.0)
    a.pass_on("c", 42, [es[0].key], 0.0)
    events = []
    out = a.outgoing(0.0)
    assert PASS in [k for k, _ in out]
    for _, d in out:
        events += b.receive(d, 0.001)
    assert b.peer_entries("a") == {e.key: e for e in es}
    assert b.peer_entry("a", es[0].key).object.digest == digest
    assert [ev for ev in events if ev.kind == "pass"] == [("pass", "a", 5, "c", 42, [es[0].key])]
    assert b.counters()["dropped_total"] == 0


@pytest.mark.parametrize("bad", [
    lambda: entry(1, state=PENDING, object=None), lambda: entry(1, state="DONE"), lambda: entry(1, reason=b"x"),
    lambda: dataclasses.replace(OBJ, digest=b"short"),
])
def test_bad_new_entry_fields_rejected(bad):
    with pytest.raises(ValueError):
        bad()


def test_mac_matches_hmac_module_for_long_keys():
    for key in (b"k", KEY, b"x" * 64, b"y" * 65, b"z" * 200):
        m = sync._Mac(key)
        assert m(b"some data" * 50) == hmac.new(key, b"some data" * 50, hashlib.sha256).digest()


@pytest.mark.parametrize("key", [b"", b"k", KEY, b"x" * 64, b"y" * 65, b"z" * 200])
def test_engine_mac_seals_and_checks_like_hmac(engine, key):
    mac = engine.Mac(key)
    for n in (0, 1, 31, 32, 55, 56, 64, 119, MAX_DATAGRAM):
        data = random.Random(n).randbytes(n)
        ref = hmac.new(key, data, hashlib.sha256).digest()
        assert mac(data) == ref and mac(bytearray(data)) == ref and mac(memoryview(data)) == ref
        sealed = mac.seal(data[:n // 3], data[n // 3:])
        assert sealed == data + ref and mac.check(sealed) and mac.check(bytearray(sealed))
        for i in (0, n, n + 31):  # a flipped bit anywhere: in the data or in the MAC
            bad = bytearray(sealed)
            bad[i] ^= 0x40
            assert not mac.check(bytes(bad))
        assert not engine.Mac(key + b"!").check(sealed)
    assert not mac.check(b"x" * 31) and not mac.check(b"")


def test_round_trip_every_kind():
    a = node("a", 5, capacity=10, prefixes=("/media/", "/img/"), sync_port=7701)
    b = node("b", 9)
    e1, e2, e3 = entry(1), entry(2, rng="bytes=100-"), entry(3, state=IDLE)
    for e in (e1, e2, e3):
        a.add_local(e, 0.0)
    a.remove_local(e3.key, 0.0)
    a.claim("c", 42, [e1.key, e2.key], 0.0)
    out = a.outgoing(0.0)
    kinds = [k for k, _ in out]
    assert kinds[0] == HEARTBEAT and WITHDRAW in kinds and CLAIM in kinds and kinds.count(ADVERT) >= 2
    events = []
    for _, d in out:
        events += b.receive(d, 0.001)
    by = {ev.kind: ev for ev in events}
    assert by["peer_new"] == ("peer_new", "a", 5)
    assert by["heartbeat"] == ("heartbeat", "a", 5, 0.2, 2, 10, ("/media/", "/img/"), 7701)
    assert by["claim"] == ("claim", "a", 5, "c", 42, [e1.key, e2.key])
    assert by["withdraw"] == ("withdraw", "a", 5, [e3.key], [])  # e3's delta never went out
    assert b.peer_entries("a") == {e1.key: e1, e2.key: e2}
    info = b.peer_info("a")
    assert info["epoch"] == 5 and info["load"] == 0.2 and info["prefixes"] == ["/media/", "/img/"]
    assert info["sync_port"] == 7701 and info["last_heard"] == 0.001 and info["entries"] == 2
    c = b.counters()
    assert c["dropped_total"] == 0 and c["received"] == len(out)
    assert a.counters()["sent"] == len(out) and a.counters()["sent_bytes"] == sum(len(d) for _, d in out)


def test_decoder_decodes_what_encode_writes():
    dec = Decoder(GROUP, KEY, "me")
    body = [[[b"\1\2\3\4", 1, b"\5\6\7\x08", 80]]]
    m = dec.decode(encode(WITHDRAW, GROUP, "x", 3, 17, body, KEY))
    assert (m.kind, m.group, m.sender, m.epoch, m.seq) == (WITHDRAW, GROUP, "x", 3, 17)
    assert m.body == ([(b"\1\2\3\4", 1, b"\5\6\7\x08", 80)],) and m.new_sender and m.old_epoch is None
    # other valid msgpack encodings of the same array are accepted too (ints not minimal)
    raw = bytes((1,)) + b"\x96" + b"\xcc\x04" + msgpack.packb(GROUP) + msgpack.packb("x") + b"\xcf" + (3).to_bytes(8, "big") \
        + b"\xcf" + (18).to_bytes(8, "big") + msgpack.packb(body)
    m = dec.decode(mac(raw))
    assert m is not None and m.seq == 18 and m.kind == WITHDRAW


def test_advert_pages_decode_to_the_same_entries_ipv4_and_ipv6():
    a, b = node("a"), node("b")
    objs = [dataclasses.replace(OBJ, path=f"/media/{i}.mp4") for i in range(5)]
    es = [entry(i, obj=objs[i % 5], v6=i % 3 == 0, rng="bytes=100-" if i % 4 == 0 else None) for i in range(120)]
    es += [entry(1000 + i, state=IDLE) for i in range(10)]
    a.set_local(es)
    out = a.refresh_datagrams(0.0)
    assert len(out) == a.pages > 1
    for d in datagrams(out):
        assert len(d) <= MAX_DATAGRAM
        b.receive(d, 0.0)
    assert b.peer_entries("a") == {e.key: e for e in es}
    assert b.counters()["pages_decoded"] == a.pages


# --- drops --------------------------------------------------------------------------------


def dropped(n):
    return {k: v for k, v in n.counters()["dropped"].items() if v}


def test_every_drop_reason_is_counted_never_raised():
    a, b = node("a"), node("b")
    hb = datagrams(a.outgoing(0.0))[0]
    assert b.receive(hb, 0.0)[-1].kind == "heartbeat"
    # forged MAC / wrong key
    forged = hb[:-1] + bytes((hb[-1] ^ 1,))
    assert b.receive(forged, 0.0) == [] and dropped(b) == {"mac": 1}
    other_key = datagrams(node("a", key=b"another key").outgoing(0.0))[0]
    b.receive(other_key, 0.0)
    assert dropped(b) == {"mac": 2}
    # replay of a captured datagram
    b.receive(hb, 0.1)
    assert dropped(b) == {"mac": 2, "replay": 1}
    # unknown version, oversize, short, garbage
    b.receive(bytes((2,)) + hb[1:], 0.1)
    b.receive(hb + bytes(MAX_DATAGRAM), 0.1)
    b.receive(b"", 0.1)
    b.receive(hb[:20], 0.1)
    assert dropped(b) == {"mac": 2, "replay": 1, "version": 1, "oversize": 1, "short": 2}
    b.receive(mac(bytes((1,)) + b"\xc1garbage that is not msgpack at all"), 0.1)
    b.receive(mac(bytes((1,)) + msgpack.packb([1, GROUP, "a", 1, 99, {"not": "a list"}])), 0.1)
    assert dropped(b)["undecodable"] == 2
    # another group (same key), our own datagram looped back
    b.receive(encode(HEARTBEAT, "audio", "a", 1, 50, [0.0, 0, 1, [], 7700], KEY), 0.1)
    own = datagrams(b.outgoing(0.1))[0]
    b.receive(own, 0.1)
    assert dropped(b)["group"] == 1 and dropped(b)["self"] == 1
    # a datagram of an older epoch after a newer one
    a2 = node("a", epoch=2)
    ev = b.receive(datagrams(a2.outgoing(0.2))[0], 0.2)
    assert ("peer_epoch", "a", 1, 2) in ev
    b.receive(datagrams(a.outgoing(0.3))[0], 0.3)
    assert dropped(b)["stale_epoch"] == 1
    c = b.counters()
    assert c["dropped_total"] == sum(c["dropped"].values()) == 12
    assert set(c["dropped"]) == set(sync.DROP_REASONS)


def test_drop_order_follows_the_design():
    b = node("b")
    # oversize before version, version before short, short before mac
    assert b.receive(bytes((9,)) * 1300, 0) == [] and dropped(b) == {"oversize": 1}
    b.receive(bytes((9,)), 0)
    b.receive(bytes((1, 2)), 0)
    assert dropped(b) == {"oversize": 1, "version": 1, "short": 1}
    # mac before undecodable; undecodable before group; group before self
    b.receive(bytes((1,)) + b"\xc1" * 60, 0)
    assert dropped(b)["mac"] == 1
    b.receive(mac(bytes((1,)) + msgpack.packb([1, "other", "a", 1, 1, "bad body"])), 0)
    assert dropped(b)["undecodable"] == 1
    b.receive(encode(HEARTBEAT, "other", "b", 1, 1, [0.0, 0, 1, [], 1], KEY), 0)
    assert dropped(b)["group"] == 1 and "self" not in dropped(b)


def test_replay_window_allows_reordering_rejects_duplicates_and_old():
    b = node("b")
    ds = {seq: encode(HEARTBEAT, GROUP, "a", 1, seq, [0.0, 0, 1, [], 1], KEY) for seq in range(1, 3000)}
    assert b.receive(ds[2000], 0)
    for seq in (1999, 1500, 977, 1001):  # inside the window (2000 - 1023 .. 2000), out of order
        assert b.receive(ds[seq], 0)[0].kind == "heartbeat"
    assert dropped(b) == {}
    b.receive(ds[2000], 0)  # a duplicate
    b.receive(ds[1500], 0)  # a duplicate inside the window
    b.receive(ds[976], 0)  # older than the window
    assert dropped(b) == {"replay": 3}
    assert b.receive(ds[2500], 0)  # the window slides: 1477 .. 2500
    b.receive(ds[1476], 0)
    assert dropped(b) == {"replay": 4}
    assert b.receive(ds[1477], 0) and b.receive(ds[2499], 0)
    assert b.receive(ds[2500 + 1024], 0) if 3524 in ds else True


def test_replay_window_matches_a_model_of_the_design():
    """Accept a seq iff it is newer than any seen, or within the 1024 below the newest and
    not seen before: checked against a plain set on random reordered, duplicated streams."""
    rnd = random.Random(5)
    w = sync._Window(1, 1)
    seen, top = {1}, 1
    for _ in range(20000):
        r = rnd.random()
        if r < 0.6:
            seq = top + rnd.randrange(1, 30)
        elif r < 0.9:
            seq = max(0, top - rnd.randrange(0, 1100))
        else:
            seq = top + rnd.randrange(1000, 3000)  # a jump
        want = seq > top or (seq > top - 1024 and seq not in seen)
        assert w.check(seq) == want, (seq, top)
        if want:
            w.record(seq)
            seen.add(seq)
            top = max(top, seq)
        assert w.top == top


def test_new_epoch_resets_the_window_and_drops_the_peers_entries():
    a, b = node("a", epoch=10), node("b")
    a.add_local(entry(1), 0.0)
    for d in datagrams(a.outgoing(0.0)):
        b.receive(d, 0.0)
    assert len(b.peer_entries("a")) == 1
    a2 = node("a", epoch=11)  # restarted: seq starts again at 1
    a2.add_local(entry(2), 1.0)
    ev = []
    for d in datagrams(a2.outgoing(1.0)):
        ev += b.receive(d, 1.0)
    assert ev[0] == ("peer_epoch", "a", 10, 11)
    assert set(b.peer_entries("a")) == {entry(2).key}
    assert b.peer_info("a")["epoch"] == 11 and dropped(b) == {}


# --- fuzz ---------------------------------------------------------------------------------


def test_fuzz_never_raises():
    rnd = random.Random(20260526)
    a, b = node("a"), node("b")
    for i in range(40):
        a.add_local(entry(i, v6=i % 2 == 0, rng="bytes=5-" if i % 3 == 0 else None), 0.0)
    a.claim("z", 3, [entry(1).key], 0.0)
    a.remove_local(entry(0).key, 0.0)
    valid = datagrams(a.outgoing(0.0)) + datagrams(a.refresh_datagrams(0.0))
    for d in valid:  # b knows a: its prefix is registered, the fast path is armed
        b.receive(d, 0.0)
    assert b.peer_entries("a") == a.local_entries()
    prefix = b._peers["a"].prefix
    assert prefix
    shapes = [None, True, 1.5, -1, 2 ** 70, "", "x" * 40, b"\0", [], [[]], {}, {"a": 1},
              msgpack.ExtType(5, b"x"), [None] * 23, [b"\1\2\3\4"] * 23, [1] * 6]
    now = 1.0
    for _ in range(3000):
        r = rnd.random()
        if r < 0.2:
            d = rnd.randbytes(rnd.randrange(0, 1400))
        elif r < 0.4:
            d = rnd.choice(valid)
            d = d[:rnd.randrange(len(d))]
        elif r < 0.6:
            d = bytearray(rnd.choice(valid))
            for _ in range(rnd.randrange(1, 4)):
                d[rnd.randrange(len(d))] ^= 1 << rnd.randrange(8)
            d = bytes(d)
        elif r < 0.7:  # a valid MAC over garbage
            d = mac(bytes((1,)) + rnd.randbytes(rnd.randrange(1, 300)))
        elif r < 0.75:  # a known peer's prefix and a valid MAC, then a seq and anything
            body = rnd.choice([rnd.randbytes(rnd.randrange(0, 200)), msgpack.packb(rnd.choice(shapes[:4])),
                               rnd.choice(valid)[len(prefix) + 5:-32]])
            d = mac(prefix + rnd.choice([b"\xce" + rnd.randbytes(4), b"\xcf" + rnd.randbytes(8), b"\x05",
                                         b"\xc0", b""]) + body)
        else:  # a valid MAC over msgpack of wrong shapes/types
            kind = rnd.choice([0, 1, 2, 3, 4, 5, "1", None])
            body = rnd.choice(shapes)
            if rnd.random() < 0.6:  # a plausible body with one field broken
                base = msgpack.unpackb(rnd.choice(valid)[1:-32])[5]
                kind = msgpack.unpackb(rnd.choice(valid)[1:-32])[0]
                body = _mutate(base, rnd, shapes)
            arr = [kind, rnd.choice([GROUP, GROUP, 5]), rnd.choice(["a", "a", "", "bad id!", 7]),
                   rnd.choice([1, 1, -1, 2 ** 64]), rnd.randrange(1, 10 ** 6), body]
            if rnd.random() < 0.1:
                arr = arr[:rnd.randrange(6)]
            try:
                d = mac(bytes((1,)) + msgpack.packb(arr))
            except Exception:
                continue
        b.receive(d, now)
        now += 0.001
    b.expire(now + 100)
    assert b.peer_entries("a") == {}
    c = b.counters()
    assert c["dropped_total"] > 2000
    assert c["dropped"]["undecodable"] > 300 and c["dropped"]["mac"] > 300
    # the decoder alone never raises either, even on odd types
    dec = Decoder(GROUP, KEY, "me")
    for d in (None, 5, "text", bytearray(b"\1" * 60), memoryview(valid[0])):
        dec.decode(d)
        b.receive(d, now)


def _mutate(v, rnd, shapes):
    """v with one randomly chosen leaf replaced by a random shape."""
    if isinstance(v, list) and v and rnd.random() < 0.8:
        v = list(v)
        i = rnd.randrange(len(v))
        v[i] = _mutate(v[i], rnd, shapes)
        return v
    return rnd.choice(shapes)


# --- pages ----------------------------------------------------------------------------------


def test_pages_stay_within_1200_bytes_with_long_paths_etags_and_ipv6():
    a = node("a" * 32, epoch=2 ** 64 - 1)
    a._seq = 2 ** 40  # seqs past 32 bits take 9 bytes
    es = []
    for i in range(300):
        o = ObjectRef("h" * 60 + ".example.net", "/" + "p" * (50 + (i * 37) % 700) + f"/{i}",
                      '"' + "e" * (i % 90) + '"', "Thu, 26 Nov 2026 10:00:00 GMT", 2 ** 62 + i)
        es.append(entry(i, obj=o, v6=True, rng=f"bytes={2 ** 60}-{2 ** 61}" if i % 2 else None,
                        body_offset=2 ** 60, body_length=2 ** 61))
    assert all(a.add_local(e, 0.0) for e in es)
    out = a.outgoing(0.0) + a.refresh_datagrams(0.0)
    assert max(len(d) for d in datagrams(out)) <= MAX_DATAGRAM
    a.remove_local(es[0].key, 0.1)
    for i in range(300):
        a.claim("x" * 32, 2 ** 64 - 1, [e.key for e in es], 0.1)
        break
    out = a.outgoing(0.1)
    assert {k for k, _ in out} >= {WITHDRAW, CLAIM}
    assert max(len(d) for d in datagrams(out)) <= MAX_DATAGRAM
    assert sum(k == CLAIM for k, _ in out) >= 2  # 300 IPv6 keys do not fit one datagram
    # an entry whose object alone cannot fit is refused, counted, and not advertised
    huge = dataclasses.replace(OBJ, path="/" + "x" * 1200)
    assert not a.add_local(entry(9999, obj=huge), 0.2)
    assert a.counters()["too_big"] == 1 and entry(9999).key not in a.local_entries()


def test_unchanged_pages_are_cached_and_recognized_without_decoding():
    a, b = node("a"), node("b")
    a.set_local([entry(i, obj=dataclasses.replace(OBJ, path=f"/{i % 3}")) for i in range(100)])
    first = datagrams(a.refresh_datagrams(0.0))
    bodies = [p.body for p in a._pages]
    second = datagrams(a.refresh_datagrams(1.0))
    assert all(p.body is body for p, body in zip(a._pages, bodies))  # not re-encoded
    assert first != second  # seq and MAC differ
    for d in first:
        b.receive(d, 0.0)
    n = a.pages
    assert b.counters()["pages_decoded"] == n and b.counters()["pages_unchanged"] == 0
    for d in second:
        b.receive(d, 1.0)
    c = b.counters()
    assert c["pages_decoded"] == n and c["pages_unchanged"] == n
    assert all(b.refreshed_at("a", e) == 1.0 for e in b.peer_entries("a"))
    # one changed entry re-encodes its page only; the receiver decodes that page only
    a.remove_local(entry(5).key)
    changed = [i for i, p in enumerate(a._pages) if p.body is None]
    assert len(changed) == 1
    for d in datagrams(a.refresh_datagrams(2.0)):
        b.receive(d, 2.0)
    assert b.counters()["pages_decoded"] == n + 1
    assert entry(5).key not in b.peer_entries("a") and len(b.peer_entries("a")) == 99


def test_entries_keep_their_page_and_the_same_object_shares_pages():
    a = node("a")
    objs = [dataclasses.replace(OBJ, path=f"/o{i}") for i in range(4)]
    es = [entry(i, obj=objs[i % 4]) for i in range(200)]
    a.set_local(es)
    where = {k: t.page for k, t in a._local.items()}
    for e in es[::3]:
        a.remove_local(e.key)
    for e in es[1::3]:
        a.add_local(dataclasses.replace(e, reqno=1))  # an update that fits stays put
    assert all(a._local[k].page == where[k] for k in a._local)
    assert max(len(p.objs) for p in a._pages) <= 2  # grouped by object
    used = [p for p in a._pages if p.keys]
    assert len(used) <= 200 * 70 // 1000 + 5


def test_compaction_repacks_in_a_new_generation_and_receivers_follow():
    a, b = node("a"), node("b")
    es = [entry(i, obj=dataclasses.replace(OBJ, path=f"/{i % 7}")) for i in range(1000)]
    a.set_local(es)
    t = 0.0
    for _ in range(3):
        for d in datagrams(a.outgoing(t)):
            b.receive(d, t)
        t += 0.5
    for e in es[:950]:
        a.remove_local(e.key)
    pages_before = a.pages
    for _ in range(8):  # compaction happens at a round's start
        for d in datagrams(a.outgoing(t)):
            b.receive(d, t)
        b.expire(t)
        t += 0.25
    assert a.generation == 1 and a.pages < pages_before and a.counters()["compactions"] == 1
    assert b.peer_entries("a") == a.local_entries()
    for _ in range(16):  # and after the old generation's leftovers expired
        for d in datagrams(a.outgoing(t)):
            b.receive(d, t)
        b.expire(t)
        t += 0.25
    assert b.peer_entries("a") == a.local_entries() and b.peer_info("a")["pages"] <= a.pages


# --- soft state ---------------------------------------------------------------------------


def test_delta_then_refresh_then_withdraw_then_expiry():
    a, b = node("a"), node("b")
    e = entry(1)
    a.add_local(e, 0.0)
    for d in datagrams(a.outgoing(0.0)):
        b.receive(d, 0.001)
    assert b.peer_entries("a") == {e.key: e} and b.counters()["deltas_received"] == 1
    e2 = entry(2)
    a.add_local(e2, 0.3)
    out = a.outgoing(0.3)  # a heartbeat and the delta
    for d in datagrams(out):
        b.receive(d, 0.301)
    assert e2.key in b.peer_entries("a")
    a.remove_local(e.key, 0.4)
    out = a.outgoing(0.4)
    assert [k for k, _ in out] == [HEARTBEAT, WITHDRAW]
    ev = b.receive(out[1][1], 0.401)
    assert ev == [("withdraw", "a", 1, [e.key], [e.key])] and set(b.peer_entries("a")) == {e2.key}
    # a crashed sender: everything expires after expire_periods x refresh
    assert b.expire(3.2) == []
    assert b.expire(3.31) == [("a", e2.key)] and b.peer_entries("a") == {}
    assert b.counters()["entries_expired"] == 1


def test_withdraw_is_not_undone_by_an_older_datagram_arriving_late():
    a, b = node("a"), node("b")
    e = entry(1)
    a.add_local(e, 0.0)
    delta = datagrams(a.outgoing(0.0))  # heartbeat, delta, page 0...
    a.remove_local(e.key, 0.1)
    withdraw = datagrams(a.outgoing(0.1))
    for d in withdraw + delta:  # reordered: the withdraw first
        b.receive(d, 0.2)
    assert b.peer_entries("a") == {}
    a.add_local(e, 0.5)  # the same 4-tuple again, later: newer than the withdraw
    for d in datagrams(a.outgoing(0.5)):
        b.receive(d, 0.5)
    assert b.peer_entries("a") == {e.key: e}


def test_lost_withdraw_removed_by_the_next_version_of_its_page():
    a, b = node("a"), node("b")
    es = [entry(i) for i in range(5)]
    for e in es:
        a.add_local(e, 0.0)
    for d in datagrams(a.outgoing(0.0)):
        b.receive(d, 0.0)
    a.remove_local(es[2].key, 0.5)
    a.outgoing(0.5)  # the withdraw is lost
    for d in datagrams(a.outgoing(1.0)):  # the next refresh
        b.receive(d, 1.0)
    assert set(b.peer_entries("a")) == {e.key for e in es} - {es[2].key}


def test_forget_peer_and_claims_three_times():
    a, b = node("a", heartbeat=0.02), node("b")
    for i in range(3):
        a.add_local(entry(i), 0.0)
    for d in datagrams(a.outgoing(0.0)):
        b.receive(d, 0.0)
    assert b.forget_peer("a") == 3 and b.peer_entries("a") == {}
    claims = []
    a.claim("dead", 77, [entry(9).key], 0.5)
    for t in (0.5, 0.51, 0.52, 0.53, 0.54, 0.56, 0.6):
        for k, d in a.outgoing(t):
            for ev in b.receive(d, t):
                if ev.kind == "claim":
                    claims.append((t, ev))
    assert [t for t, _ in claims] == [0.5, 0.52, 0.54]
    assert all(ev == ("claim", "a", 1, "dead", 77, [entry(9).key]) for _, ev in claims)
    # claims queued together share datagrams: 1000 keys in a few, each sent 3 times
    for i in range(1000):
        a.claim("dead", 77, [entry(i).key], 0.7)
    out = [d for k, d in a.outgoing(0.7) if k == CLAIM]
    got = set()
    for d in out:
        for ev in b.receive(d, 0.7):
            got.update(ev.keys)
    assert got == {entry(i).key for i in range(1000)} and 10 <= len(out) <= 20
    # the forgotten peer's entries come back with its next full pages (it is alive after all)
    for d in datagrams(a.outgoing(1.0)):
        b.receive(d, 1.0)
    assert len(b.peer_entries("a")) == 3


def test_probe_req_and_ack_round_trip():
    a, b = node("a", 5), node("b", 9)
    a.probe("c", 0xDEADBEEF, 0.0)
    a.probe_ack("c", 7, 95.7, PROBE_STATES.index("suspect"), 0.0)
    out = a.outgoing(0.0)
    assert [k for k, _ in out] == [HEARTBEAT, PROBE_REQ, PROBE_ACK]
    events = []
    for _, d in out:
        assert len(d) < 100
        events += b.receive(d, 0.001)
    by = {ev.kind: ev for ev in events}
    assert by["probe_req"] == ("probe_req", "a", 5, "c", 0xDEADBEEF)
    assert by["probe_ack"] == ("probe_ack", "a", 5, "c", 7, 95, 2)
    assert b.heard_from == ("a", 5)
    c = b.counters()
    assert c["received_by_kind"]["probe_req"] == 1 and c["received_by_kind"]["probe_ack"] == 1
    assert a.counters()["sent_by_kind"]["probe_req"] == 1 and c["dropped_total"] == 0
    # the decoder reads what encode writes (and any valid msgpack encoding of it)
    dec = Decoder(GROUP, KEY, "me")
    m = dec.decode(encode(PROBE_ACK, GROUP, "x", 3, 17, ["a", 2**32 - 1, 2**32 - 1, 3], KEY))
    assert (m.kind, m.sender, m.seq, m.body) == (PROBE_ACK, "x", 17, ("a", 2**32 - 1, 2**32 - 1, 3))
    m = dec.decode(encode(PROBE_REQ, GROUP, "x", 3, 18, ["node-1.b_2", 0], KEY))
    assert (m.kind, m.body) == (PROBE_REQ, ("node-1.b_2", 0))


def test_probe_copies_are_heartbeat_apart_and_ack_silence_is_clamped():
    a, b = node("a", heartbeat=0.02), node("b")
    a.outgoing(0.0)
    a.probe("c", 1, 0.1, copies=2)
    a.probe_ack("c", 2, 10**12, 1, 0.1)
    assert a.next_due() == float("-inf")  # queued: due at once
    seen = []
    for t in (0.1, 0.11, 0.12, 0.13, 0.15):
        for k, d in a.outgoing(t):
            for ev in b.receive(d, t):
                if ev.kind in ("probe_req", "probe_ack"):
                    seen.append((t, ev.kind, ev[3:]))
    assert seen == [(0.1, "probe_req", ("c", 1)), (0.1, "probe_ack", ("c", 2, 2**32 - 1, 1)),
                    (0.12, "probe_req", ("c", 1))]
    for bad in (dict(target="bad id", nonce=1), dict(target="c", nonce=-1), dict(target="c", nonce=2**32)):
        with pytest.raises(ValueError):
            a.probe(bad["target"], bad["nonce"], 0.2)
    with pytest.raises(ValueError):
        a.probe_ack("c", 1, 0, len(PROBE_STATES), 0.2)
    with pytest.raises(ValueError):
        a.probe("c", 1, 0.2, copies=0)


@pytest.mark.parametrize("kind,body", [
    (PROBE_REQ, ["c"]), (PROBE_REQ, ["c", 1, 2]), (PROBE_REQ, ["bad id", 1]), (PROBE_REQ, ["c", -1]),
    (PROBE_REQ, ["c", 2**32]), (PROBE_REQ, [b"c", 1]), (PROBE_REQ, ["c", 1.5]), (PROBE_REQ, {"c": 1}),
    (PROBE_ACK, ["c", 1, 0]), (PROBE_ACK, ["c", 1, 0, 1, 0]), (PROBE_ACK, ["c", 1, -5, 1]),
    (PROBE_ACK, ["c", 1, 0, 4]), (PROBE_ACK, ["c", 1, 0, -1]), (PROBE_ACK, ["c", 1, 1.5, 1]),
    (PROBE_ACK, ["", 1, 0, 1]), (PROBE_ACK, ["c", 1, 2**32, 1]), (PROBE_ACK, ["c", 1, 0, True]),
])
def test_probe_bad_shapes_are_dropped_as_undecodable(kind, body):
    b = node("b")
    assert b.receive(encode(kind, GROUP, "a", 1, 1, body, KEY), 0.0) == []
    assert dropped(b) == {"undecodable": 1} and b.heard_from is None


def test_probe_mac_replay_group_and_self_rules_apply():
    a, b = node("a"), node("b")
    a.probe("c", 1, 0.0)
    a.probe_ack("c", 1, 0, 1, 0.0)
    out = [d for k, d in a.outgoing(0.0) if k in (PROBE_REQ, PROBE_ACK)]
    assert len(out) == 2
    for d in out:
        assert b.receive(d[:-1] + bytes((d[-1] ^ 1,)), 0.0) == []  # forged
    assert dropped(b) == {"mac": 2}
    for d in out:
        assert len(b.receive(d, 0.0)) >= 1
        assert b.receive(d, 0.0) == []  # replayed
    assert dropped(b) == {"mac": 2, "replay": 2}
    b.receive(encode(PROBE_REQ, "other", "a", 1, 99, ["c", 1], KEY), 0.0)
    b.receive(encode(PROBE_ACK, GROUP, "b", 1, 99, ["c", 1, 0, 1], KEY), 0.0)
    assert dropped(b)["group"] == 1 and dropped(b)["self"] == 1


def test_next_due_follows_heartbeats_claims_and_paced_pages():
    a = node("a", heartbeat=0.02, refresh=1.0)
    assert a.next_due() == float("-inf")  # nothing sent yet
    a.set_local([entry(i, obj=dataclasses.replace(OBJ, path=f"/{i % 50}")) for i in range(200)])
    a.outgoing(0.0)
    n = a.pages
    assert n > 2
    due = a.next_due()
    assert due == pytest.approx(min(0.018, 1.0 / n))  # the next page of the paced refresh, or the heartbeat
    t = 0.0
    for _ in range(200):  # outgoing() at next_due() sends something every time
        t = max(a.next_due(), t)
        assert a.outgoing(t), t
    a.claim("dead", 1, [entry(1).key], t)
    assert a.next_due() == float("-inf")
    a.outgoing(t)
    assert a.next_due() <= t + 0.02


def test_heartbeats_are_due_every_interval_and_refresh_is_paced():
    a = node("a", heartbeat=0.02, refresh=1.0)
    a.set_local([entry(i, obj=dataclasses.replace(OBJ, path=f"/{i % 50}")) for i in range(2000)])
    pages = a.pages
    sent = {HEARTBEAT: 0, ADVERT: 0}
    per_call = []
    t = 0.0
    for i in range(100):  # two seconds, every 20 ms
        out = a.outgoing(t)
        per_call.append(sum(k == ADVERT for k, _ in out))
        for k, _ in out:
            sent[k] += 1
        t = round(t + 0.02, 6)
    assert sent[HEARTBEAT] == 100
    assert 2 * pages - pages // 50 - 2 <= sent[ADVERT] < 2 * pages  # round 2's last pages are due at 2.0
    assert max(per_call) <= pages // 50 + 2  # spread over the period, not one burst
    out = a.outgoing(2.0)  # round 3 starts: round 2 completes, and its own first page
    assert sent[ADVERT] + sum(k == ADVERT for k, _ in out) == 2 * pages + 1
    assert a.counters()["sent_by_kind"]["heartbeat"] == 101
    hb = msgpack.unpackb(encode(HEARTBEAT, GROUP, "a", 1, 1, a.heartbeat_body(), KEY)[1:-32])[5]
    assert hb == [1.0, 2000, 1000, ["/"], 7700]  # load is capped at 1
    a.set_connections(250)
    assert a.heartbeat_body()[:3] == [0.25, 250, 1000]


def test_insecure_mode_interoperates_and_rejects_keyed_peers():
    a, b, c = node("a", key=None), node("b", key=None), node("c")
    assert a.insecure and not c.insecure
    d = datagrams(a.outgoing(0))[0]
    assert b.receive(d, 0)[-1].kind == "heartbeat"
    assert c.receive(d, 0) == [] and dropped(c) == {"mac": 1}
    with pytest.raises(ValueError):
        node("x", key=b"")


def test_constructor_validates():
    for bad in (dict(node="bad id"), dict(node=""), dict(node="x" * 33), dict(epoch=-1), dict(capacity=0),
                dict(sync_port=70000), dict(refresh=0)):
        kw = dict(node="a", group=GROUP, key=KEY, epoch=1)
        kw.update(bad)
        with pytest.raises(ValueError):
            SyncNode(**kw)


# --- an in-memory network ---------------------------------------------------------------


class Network:
    """Datagrams between named nodes: seeded loss, duplication, random delay (reordering),
    and partitions, delivered in time order."""

    def __init__(self, nodes, seed, loss=0.0, dup=0.0, delay=(0.001, 0.005)):
        self.nodes = nodes
        self.rng = random.Random(seed)
        self.loss, self.dup, self.delay = loss, dup, delay
        self.queue = []
        self.n = 0
        self.cut = set()  # frozenset({x, y}) pairs that cannot talk
        self.delivered = 0

    def partition(self, *groups):
        self.cut = {frozenset((x, y)) for g in groups for h in groups if g is not h for x in g for y in h}

    def heal(self):
        self.cut = set()

    def send(self, src, data, now):
        for dst in self.nodes:
            if dst == src or frozenset((src, dst)) in self.cut or self.rng.random() < self.loss:
                continue
            copies = 2 if self.rng.random() < self.dup else 1
            for _ in range(copies):
                self.n += 1
                heapq.heappush(self.queue, (now + self.rng.uniform(*self.delay), self.n, dst, data))

    def run_until(self, t):
        while self.queue and self.queue[0][0] <= t:
            at, _, dst, data = heapq.heappop(self.queue)
            if dst in self.nodes:
                self.nodes[dst].receive(data, at)
                self.delivered += 1


def views_match(nodes):
    """Every node's view of every peer equals that peer's local entries; the mismatches."""
    bad = []
    for x, nx in nodes.items():
        for y, ny in nodes.items():
            if x != y and nx.peer_entries(y) != ny.local_entries():
                bad.append((x, y, len(nx.peer_entries(y)), len(ny.local_entries())))
    return bad


class Sim:
    def __init__(self, names, seed, step=0.01, **net):
        self.t = 0.0
        self.step = step
        self.nodes = {n: node(n, epoch=1000 + i, refresh=1.0, heartbeat=0.02) for i, n in enumerate(names)}
        self.net = Network(self.nodes, seed, **net)
        self.rng = random.Random(seed + 1)
        self.next_id = 0
        self.objs = [dataclasses.replace(OBJ, path=f"/media/{i}.mp4") for i in range(6)]

    def churn(self, n_ops):
        for _ in range(n_ops):
            name = self.rng.choice(list(self.nodes))
            nd = self.nodes[name]
            local = list(nd.local_entries().values())
            r = self.rng.random()
            if r < 0.55 or not local:
                self.next_id += 1
                i = self.next_id
                e = entry(i, obj=self.rng.choice(self.objs), server=sorted(self.nodes).index(name) + 1,
                          v6=i % 5 == 0, rng="bytes=1000-" if i % 4 == 0 else None)
                nd.add_local(e, self.t)
            elif r < 0.85:
                nd.remove_local(self.rng.choice(local).key, self.t)
            else:  # an update: the next request on a keep-alive connection, or idle
                e = self.rng.choice(local)
                if self.rng.random() < 0.5:
                    o = self.rng.choice(self.objs)
                    nd.add_local(dataclasses.replace(e, state=ACTIVE, object=o, status=200, body_length=o.total_length,
                                                     body_start=(e.body_start + 99) & 0xFFFFFFFF), self.t)
                else:
                    nd.add_local(entry(0, state=IDLE, client_ip=e.client_ip, client_port=e.client_port,
                                       server_ip=e.server_ip, ni=e.ni, na=e.na), self.t)

    def tick(self, churn=0):
        self.churn(churn)
        for name, nd in self.nodes.items():
            for _, d in nd.outgoing(self.t):
                self.net.send(name, d, self.t)
        self.t = round(self.t + self.step, 9)
        self.net.run_until(self.t)
        for nd in self.nodes.values():
            nd.expire(self.t)

    def run(self, seconds, churn=0):
        for _ in range(round(seconds / self.step)):
            self.tick(churn)


@pytest.mark.parametrize("n_nodes,seed", [(3, 1), (5, 2)])
def test_network_views_converge_despite_loss_reordering_duplicates_and_partitions(n_nodes, seed):
    names = "abcde"[:n_nodes]
    sim = Sim(names, seed, loss=0.1, dup=0.1, delay=(0.001, 0.08))
    sim.run(2.0, churn=2)
    # a partition that comes and goes, twice, while connections come and go
    sim.net.partition(names[:2], names[2:])
    sim.run(1.5, churn=2)
    sim.net.heal()
    sim.run(0.5, churn=2)
    sim.net.partition(names[:1], names[1:])
    sim.run(1.0, churn=2)
    # heal: no loss from now on, still duplicates and reordering; churn stops
    sim.net.heal()
    sim.net.loss = 0.0
    sim.run(2.0)  # two refresh periods
    assert views_match(sim.nodes) == []
    assert sum(len(nd.local_entries()) for nd in sim.nodes.values()) > 20
    c = [nd.counters() for nd in sim.nodes.values()]
    assert sum(x["dropped"]["replay"] for x in c) > 0  # the duplicates
    assert sum(x["deltas_received"] for x in c) > 0 and sum(x["entries_withdrawn"] for x in c) > 0
    # with loss, views still converge: within 3 refresh periods of quiet
    sim.net.loss = 0.1
    sim.churn(30)
    sim.run(3.0)
    assert views_match(sim.nodes) == []


def test_network_converges_through_bursts_compaction_partition_and_restart():
    names = "abcd"
    sim = Sim(names, 12, loss=0.1, dup=0.1, delay=(0.001, 0.08))
    sim.run(1.0, churn=2)
    for i, nd in enumerate(sim.nodes.values()):  # a burst of connections on every node
        for j in range(400):
            nd.add_local(entry(100000 * (i + 1) + j, obj=sim.objs[j % 6], server=i + 1), sim.t)
    sim.run(1.3, churn=2)
    for nd in sim.nodes.values():  # most end; half of the withdraws are never sent
        for k in list(nd.local_entries())[:-30]:
            nd.remove_local(k, sim.t if sim.rng.random() < 0.5 else None)
    sim.net.partition(names[:2], names[2:])
    sim.run(1.5, churn=2)
    old = sim.nodes["d"]  # d restarts with a few of its connections
    new = node("d", epoch=old.epoch + 5, refresh=1.0, heartbeat=0.02)
    for e in list(old.local_entries().values())[:10]:
        new.add_local(e, sim.t)
    sim.nodes["d"] = new
    sim.run(0.5, churn=2)
    sim.net.heal()
    sim.net.loss = 0.0
    sim.run(2.0)
    assert views_match(sim.nodes) == []
    c = [nd.counters() for nd in sim.nodes.values()]
    assert sum(x["compactions"] for x in c) >= 3 and sum(x["generation_sweeps"] for x in c) >= 1


def test_network_deltas_are_visible_within_one_network_delay():
    sim = Sim("abc", 3, delay=(0.004, 0.005))
    sim.run(1.5)
    e = entry(77, server=1)
    sim.nodes["a"].add_local(e, sim.t)
    t0 = sim.t
    sim.tick()  # a's delta goes out now; arrives 4-5 ms later, within this 10 ms step
    assert sim.t - t0 <= 0.0100001
    assert sim.nodes["b"].peer_entry("a", e.key) == e and sim.nodes["c"].peer_entry("a", e.key) == e
    sim.nodes["a"].remove_local(e.key, sim.t)
    sim.tick()
    assert sim.nodes["b"].peer_entry("a", e.key) is None and sim.nodes["c"].peer_entry("a", e.key) is None


def test_network_restarted_node_replaces_its_old_state_and_dead_entries_expire():
    sim = Sim("abc", 4, loss=0.05, dup=0.05, delay=(0.001, 0.03))
    sim.run(1.0, churn=3)
    sim.net.loss = 0.0
    sim.run(1.5)
    assert views_match(sim.nodes) == []
    old = sim.nodes["c"].local_entries()
    assert old
    # c crashes: its entries (each refreshed within the last second) stay for
    # expire_periods x refresh after their last refresh, then expire
    crashed = sim.nodes.pop("c")
    t_crash = sim.t
    sim.run(1.95)
    assert sim.nodes["a"].peer_entries("c") == old
    sim.run(1.1)
    assert sim.nodes["a"].peer_entries("c") == {} and sim.nodes["b"].peer_entries("c") == {}
    assert sim.t - t_crash <= 3.0 + 0.05 + 0.02
    # c restarts (new epoch) with other connections; a's stale datagrams of c are refused
    c2 = node("c", epoch=crashed.epoch + 1, refresh=1.0, heartbeat=0.02)
    new = [entry(5000 + i, server=3) for i in range(4)]
    for e in new:
        c2.add_local(e, sim.t)
    sim.nodes["c"] = c2
    stale = [d for _, d in crashed.outgoing(sim.t)]
    sim.run(0.2)
    for d in stale:
        sim.nodes["a"].receive(d, sim.t)
    assert sim.nodes["a"].counters()["dropped"]["stale_epoch"] >= 1
    sim.run(2.0)
    assert views_match(sim.nodes) == []
    assert sim.nodes["a"].peer_entries("c") == {e.key: e for e in new}
    assert sim.nodes["a"].peer_info("c")["epoch"] == crashed.epoch + 1


def test_restart_replaces_old_state_at_once():
    a, b = node("a", epoch=1), node("b")
    for i in range(10):
        a.add_local(entry(i), 0.0)
    for d in datagrams(a.outgoing(0.0)):
        b.receive(d, 0.0)
    assert len(b.peer_entries("a")) == 10
    a2 = node("a", epoch=2)
    ev = b.receive(datagrams(a2.outgoing(0.5))[0], 0.5)  # its first heartbeat
    assert ("peer_epoch", "a", 1, 2) in ev and b.peer_entries("a") == {}


# --- entries from a real stream mapper ----------------------------------------------------

C4, S4 = "10.1.0.2", "10.1.0.1"
MACS = {"eth_src": "02:00:00:00:00:0c", "eth_dst": "02:00:00:00:00:05"}


class Flow:
    """One TCP connection's frames, both directions (as tests/test_streammap.py builds them)."""

    def __init__(self, client=C4, server=S4, cport=40000, ni=1000, na=5000, migrate=True):
        self.client, self.server, self.cport = client, server, cport
        self.ni, self.na = ni, na
        self.c_next, self.s_next = fp.seq_add(ni, 1), fp.seq_add(na, 1)
        self.migrate = migrate

    def syn(self):
        opts = (fp.opt_mss(1460) + fp.opt_sack_permitted() + fp.opt_timestamps(111, 0)
                + bytes((fp.OPT_NOP,)) + fp.opt_wscale(7))
        if self.migrate:
            opts += fp.aligned_option(fp.opt_migrate_permitted())
        return fp.build_tcp(self.client, self.server, self.cport, 80, self.ni, 0, fp.SYN, 64240, opts, **MACS)

    def synack(self):
        opts = fp.opt_mss(1400) + fp.opt_sack_permitted() + fp.opt_timestamps(999, 111) + bytes((fp.OPT_NOP,)) \
            + fp.opt_wscale(9)
        return fp.build_tcp(self.server, self.client, 80, self.cport, self.na, fp.seq_add(self.ni, 1),
                            fp.SYN | fp.ACK, 65160, opts, **MACS)

    def c(self, payload=b"", flags=fp.PSH | fp.ACK):
        f = fp.build_tcp(self.client, self.server, self.cport, 80, self.c_next, self.s_next, flags, 502,
                         b"", payload, **MACS)
        self.c_next = fp.seq_add(self.c_next, len(payload) + (1 if flags & fp.FIN else 0))
        return f

    def s(self, payload, body_len):
        f = fp.build_tcp(self.server, self.client, 80, self.cport, self.s_next, self.c_next, fp.PSH | fp.ACK, 509,
                         b"", payload, **MACS)
        self.s_next = fp.seq_add(self.s_next, len(payload) + body_len)
        return f


def feed(m, frames, now=1.0):
    for f in frames:
        m.handle_frame(f, now)


def get(path="/a.mp4", extra=b""):
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: video.example.net\r\nUser-Agent: t\r\n" + extra + b"\r\n"


def head(status=b"200 OK", length=1000, extra=b""):
    return (b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(length).encode()
            + b"\r\nETag: \"abc-123\"\r\nLast-Modified: Thu, 26 Nov 2026 10:00:00 GMT\r\n" + extra + b"\r\n")


def test_entry_from_connection_200_then_idle_then_206():
    m = StreamMapper(service_ports={80})
    f = Flow(ni=0xFFFFFFF0, na=4000000000)
    feed(m, [f.syn(), f.synack()])
    conn = m.get(C4, 40000, S4, 80)
    assert entry_from_connection(conn) is None  # half-open: nothing to take over yet
    feed(m, [f.c(b"", flags=fp.ACK)])
    e = entry_from_connection(conn)  # no request yet: a taker adopts it
    assert (e.state, e.object, e.body_start) == (IDLE, None, 0)
    feed(m, [f.c(get())])
    e = entry_from_connection(conn)  # a request waiting for its response: answered in full
    assert (e.state, e.object.path, e.object.host, e.body_start, e.req_range) == (
        PENDING, "/a.mp4", "video.example.net", fp.seq_add(4000000000, 1), None)
    h = head(length=5000)
    body_start = fp.seq_add(f.s_next, len(h))
    feed(m, [f.s(h, 5000)])
    e = entry_from_connection(conn)
    assert e == Entry(
        client_ip=fp.pack_address(C4), client_port=40000, server_ip=fp.pack_address(S4), server_port=80,
        ni=0xFFFFFFF0, na=4000000000, c_mss=1460, c_wscale=7, c_sack=True, c_ts=True,
        s_mss=1400, s_wscale=9, s_sack=True, s_ts=True, mp=True, reqno=0, state=ACTIVE,
        object=ObjectRef("video.example.net", "/a.mp4", '"abc-123"', "Thu, 26 Nov 2026 10:00:00 GMT", 5000),
        req_range=None, status=200, body_start=body_start, body_offset=0, body_length=5000)
    assert e.key == conn.key
    # the client acks the whole body on its next request: that one now waits
    body_end = fp.seq_add(body_start, 5000)
    feed(m, [f.c(get("/b.mp4", extra=b"Range: bytes=100-199\r\n"))])
    e = entry_from_connection(conn)
    assert (e.state, e.object.path, e.req_range, e.body_start) == (PENDING, "/b.mp4", "bytes=100-199", body_end)
    h = (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 100-199/8000\r\nContent-Length: 100\r\n"
         b"ETag: \"def\"\r\n\r\n")
    body_start = fp.seq_add(f.s_next, len(h))
    feed(m, [f.s(h, 100)])
    e = entry_from_connection(conn)
    assert (e.state, e.status, e.req_range, e.body_offset, e.body_length, e.body_start) == (
        ACTIVE, 206, "bytes=100-199", 100, 100, body_start)
    assert e.object == ObjectRef("video.example.net", "/b.mp4", '"def"', None, 8000)
    # a client segment acking the whole body with nothing pending: IDLE, no object
    feed(m, [f.c(b"", flags=fp.ACK | fp.PSH)])
    assert f.c_next and True
    m2 = StreamMapper(service_ports={80})
    g = Flow(cport=40001)
    feed(m2, [g.syn(), g.synack(), g.c(get())])
    feed(m2, [g.s(head(length=0), 0)])
    e = entry_from_connection(m2.get(C4, 40001, S4, 80))
    assert e.state == IDLE and e.object is None and e.status == 0 and e.body_length == 0
    # entries from the mapper go through a SyncNode unchanged
    a, b = node("a"), node("b")
    a.add_local(entry_from_connection(conn), 0.0)
    a.add_local(e, 0.0)
    for d in datagrams(a.outgoing(0.0)):
        b.receive(d, 0.0)
    assert b.peer_entries("a") == a.local_entries()


def test_entry_from_connection_not_advertisable_or_reset_only():
    m = StreamMapper(service_ports={80})
    f = Flow(migrate=False)  # no Migrate-Permitted: nobody could even reach the client
    feed(m, [f.syn(), f.synack(), f.c(get())])
    feed(m, [f.s(head(), 1000)])
    assert entry_from_connection(m.get(C4, 40000, S4, 80)) is None
    g = Flow(cport=40002)  # chunked: not resumable, so reset at once when its server dies
    feed(m, [g.syn(), g.synack(), g.c(get())])
    feed(m, [g.s(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0)])
    e = entry_from_connection(m.get(C4, 40002, S4, 80))
    assert (e.state, e.reason, e.object.path) == (RESET, "chunked transfer-encoding", "/a.mp4")
    h = Flow(cport=40003)  # a 404
    feed(m, [h.syn(), h.synack(), h.c(get())])
    feed(m, [h.s(head(status=b"404 Not Found"), 1000)])
    e = entry_from_connection(m.get(C4, 40003, S4, 80))
    assert (e.state, e.reason) == (RESET, "status 404")
    p = Flow(cport=40005)  # a POST waiting for its response
    feed(m, [p.syn(), p.synack(), p.c(b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")])
    e = entry_from_connection(m.get(C4, 40005, S4, 80))
    assert (e.state, e.reason) == (RESET, "POST request")
    q = Flow(cport=40006)  # two pipelined GETs
    feed(m, [q.syn(), q.synack(), q.c(get() + get("/b.mp4"))])
    assert entry_from_connection(m.get(C4, 40006, S4, 80)).reason == "pipelined requests"
    # validators levels: a 200 with only an ETag is resumable under strict, not under last-modified
    r = Flow(cport=40007)
    feed(m, [r.syn(), r.synack(), r.c(get())])
    feed(m, [r.s(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: \"x\"\r\n\r\n", 1000)])
    conn = m.get(C4, 40007, S4, 80)
    assert entry_from_connection(conn).state == ACTIVE
    assert entry_from_connection(conn, "last-modified").reason == "no Last-Modified (validators = last-modified)"
    assert entry_from_connection(conn, "digest").state == RESET
    d = hashlib.sha256(b"x").digest()
    e = entry_from_connection(conn, "digest", digest_of=lambda req, resp: d)
    assert e.state == ACTIVE and e.object.digest == d
    k = Flow(cport=40004)  # closed
    feed(m, [k.syn(), k.synack(), k.c(get())])
    feed(m, [k.s(head(), 1000), k.c(b"", flags=fp.RST | fp.ACK)])
    assert entry_from_connection(m.get(C4, 40004, S4, 80)) is None


def test_page_capacity_growth_does_not_make_receivers_decode_unchanged_pages():
    a, b = node("a"), node("b")
    objs = [dataclasses.replace(OBJ, path=f"/{i}") for i in range(10)]
    a.set_local([entry(i, obj=objs[i % 10]) for i in range(900)])
    n0 = a.pages
    for d in datagrams(a.refresh_datagrams(0.0)):
        b.receive(d, 0.0)
    decoded = b.counters()["pages_decoded"]
    assert decoded == n0
    i = 900
    while a.pages == n0:  # grow until the page capacity (`pages`, in every body) steps up
        a.add_local(entry(i, obj=objs[0]))
        i += 1
    changed = sum(p.rest is None for p in a._pages)  # pages whose entries changed
    for d in datagrams(a.refresh_datagrams(1.0)):
        b.receive(d, 1.0)
    c = b.counters()
    assert c["pages_decoded"] - decoded <= changed + (a.pages - n0)
    assert b.peer_entries("a") == a.local_entries()
    for d in datagrams(a.refresh_datagrams(2.0)):  # and the new bytes are on the fast path
        b.receive(d, 2.0)
    assert b.counters()["pages_decoded"] == c["pages_decoded"]


def test_advertised_load_heard_from_and_local_count():
    a, b = node("a", capacity=4), node("b")
    for i in range(3):
        a.add_local(entry(i))
    assert a.local_count == 3 and a.advertised_load == 0.75
    a.advertised_load = 0.5  # e.g. selection.LoadAdvertiser's rounded value
    assert a.heartbeat_body()[:2] == [0.5, 3]
    for v, want in ((7, 1.0), (-1, 0.0), (float("nan"), 1.0), ("x", 1.0)):
        a.advertised_load = v
        assert a.advertised_load == want
    a.advertised_load = None
    assert a.advertised_load == 0.75
    out = datagrams(a.outgoing(0.0)) + datagrams(a.refresh_datagrams(0.0))
    for d in out:
        b.receive(d, 0.0)
        assert b.heard_from == ("a", 1)
    b.receive(out[-1], 0.0)  # a replay: not a sign of life
    assert b.heard_from is None
    b.receive(out[-1][:-1], 0.0)
    assert b.heard_from is None
    assert b.peer_info("a")["last_heard"] == 0.0 and b.peer_info("a")["datagrams"] == len(out)
