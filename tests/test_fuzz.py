"""Differential fuzzing: the compiled and pure builds must agree on every input.

Both modules are imported directly (not through the `engine` fixture): each random,
mutated or hypothesis-generated frame goes to both, and every FrameView field, batch
record, checksum, rewrite result, verdict, output buffer and counter is compared.
"""

import random
import struct
from array import array

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _fastpath import _common as C
from helpers import (
    ETH, LINUX_SYN_OPTS, MAC_A, MAC_B, RAW, V4_A, V4_B, V4_C, V6_A, V6_B, V6_C, ICMP, IP, IPv6, Raw, UDP,
    IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, ether, garbage_options,
    load_cengine, load_pyengine, raw, tcp4, tcp6, view_dict,
)
from scapy.layers.inet6 import IPv6ExtHdrSegmentRouting

CE = load_cengine()  # skips this module when only the pure build is to be tested
PY = load_pyengine()

HYP = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

MIGRATE = C.opt_migrate(True, 5, 0x1122334455667788, 0x99AABBCCDDEEFF00)


def _corpus():
    """(frame, link) pairs covering every header and option the engine knows."""
    opt_sets = [[], LINUX_SYN_OPTS, [("NOP", None), ("NOP", None), ("Timestamp", (0xFFFFFFF0, 7)),
                                     ("NOP", None), ("NOP", None), ("SAck", (1, 2, 3, 4))],
                [(253, MIGRATE[2:])], [(253, b"MP\x00"), ("MSS", 9000)], [(30, b"abc"), ("EOL", None)],
                [(254, b"MP\x01" + bytes(17))]]
    out = []
    for i, opts in enumerate(opt_sets):
        out.append((raw(ether(tcp4(opts, payload=b"p" * i, flags="SA"[: 1 + i % 2], sport=40000 + i))), ETH))
        out.append((raw(ether(tcp6(opts, payload=b"q" * i, sport=41000 + i), vlan=i)), ETH))
        out.append((raw(tcp4(opts, payload=b"r" * i, sport=42000 + i)), RAW))
    out += [
        (raw(ether(tcp4(payload=b"x"), vlan=5, outer_vlan=6)), ETH),
        (raw(ether(tcp6(payload=b"ext", ext=[IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt()]))), ETH),
        (raw(ether(tcp6(ext=[IPv6ExtHdrFragment(offset=0, m=1)]))), ETH),
        (raw(ether(IPv6(src=V6_A, dst=V6_B) / IPv6ExtHdrFragment(offset=7, nh=6) / Raw(b"frag"))), ETH),
        (raw(ether(IP(src=V4_A, dst=V4_B, frag=4, proto=6) / Raw(b"fragment"))), ETH),
        (raw(ether(tcp4(payload=b"12345678", ip_kw=dict(flags="MF")))), ETH),
        (raw(ether(IP(src=V4_A, dst=V4_B) / UDP(sport=53, dport=53) / Raw(b"dns"))), ETH),
        (raw(ether(IP(src=V4_A, dst=V4_B) / UDP(sport=53, dport=53, chksum=0) / Raw(b"nock"))), ETH),
        (raw(ether(IPv6(src=V6_A, dst=V6_B) / UDP() / Raw(b"u6"))), ETH),
        (raw(ether(IP(src=V4_A, dst=V4_B) / ICMP())), ETH),
        (raw(ether(tcp4())) + bytes(12), ETH),
        (raw(IPv6(src=V6_A, dst=V6_B) / UDP()), RAW),
        (C.build_migrate_syn(PY.fix_checksums, V4_A, V4_B, 1, 2, 3, 4, 5, 6), RAW),
        (raw(ether(tcp6(payload=b"rh0", ext=[IPv6ExtHdrRouting(addresses=[V6_C, V6_B], segleft=2)]))), ETH),
        (raw(ether(tcp6(payload=b"srh", ext=[IPv6ExtHdrSegmentRouting(addresses=[V6_C, V6_A], segleft=1)]))),
         ETH),
        (raw(IPv6(src=V6_A, dst=V6_B) / IPv6ExtHdrRouting(type=2, addresses=[V6_C], segleft=1) / UDP()), RAW),
    ]
    return out


CORPUS = _corpus()
INTERESTING = (0, 1, 2, 3, 4, 5, 8, 0x0F, 0x10, 0x3F, 0x40, 0x45, 0x50, 0x60, 0x7F, 0x80, 0xF0, 0xFD, 0xFE, 0xFF)


def mutate(rng, frame):
    """One to four random edits: byte flips, interesting bytes, length fields, truncation, extension, splices."""
    f = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if op == 0 and f:
            f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
        elif op == 1 and f:
            f[rng.randrange(len(f))] = rng.choice(INTERESTING)
        elif op == 2 and len(f) > 1:
            pos = rng.randrange(len(f) - 1)
            struct.pack_into("!H", f, pos, rng.choice((0, 1, 7, 8, 19, 20, 39, 40, len(f), len(f) - 14,
                                                       len(f) - 54, 0x7FFF, 0xFFFF)) & 0xFFFF)
        elif op == 3:
            f = f[:rng.randrange(len(f) + 1)]
        elif op == 4:
            f += bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40)))
        elif op == 5 and len(f) > 40:
            pos = rng.randrange(20, len(f))  # an option-like run somewhere in the headers
            f[pos:pos + 3] = bytes((rng.choice((0, 1, 2, 3, 4, 5, 8, 253, 254)), rng.randrange(0, 24),
                                    rng.getrandbits(8)))
        elif op == 6:
            other = rng.choice(CORPUS)[0]
            cut = rng.randrange(len(f) + 1)
            f = f[:cut] + other[rng.randrange(len(other) + 1):]
        elif op == 7 and f:
            pos = rng.randrange(len(f))
            del f[pos:pos + rng.randrange(1, 9)]
    return bytes(f)


def _outcome(fn, *args):
    """A call's result, or its exception as (type, FrameError kind) for comparison."""
    try:
        return ("ok", fn(*args))
    except C.FrameError as exc:
        return ("FrameError", exc.error)
    except Exception as exc:  # noqa: BLE001  both builds must fail alike
        return ("raised", type(exc).__name__)


def assert_same_answers(frame, link):
    """parse, checksum and rewrite calls give identical answers in both builds."""
    frame = bytes(frame)
    vc, vp = CE.parse(frame, link), PY.parse(frame, link)
    assert view_dict(vc) == view_dict(vp)
    for name in ("verify_checksums", "tcp_checksum", "ipv4_header_checksum"):
        assert _outcome(getattr(CE, name), frame, link) == _outcome(getattr(PY, name), frame, link), name
    if vp.ok and vp.ip_version:
        new = V4_C if vp.ip_version == 4 else V6_C
        for call in (lambda e, f: e.fix_checksums(f, link),
                     lambda e, f: e.rewrite_addresses(f, new, 4321, None, 0, link=link),
                     lambda e, f: e.rewrite_addresses(f, None, None, new, None, link=link),
                     lambda e, f: e.rewrite_tcp(f, 0xFFFFFFFF, 1, 0xFFFF, link=link),
                     lambda e, f: e.rewrite_tcp(f, tsval=0x80000000, tsecr=0, link=link)):
            fc, fp = bytearray(frame), bytearray(frame)
            assert _outcome(call, CE, fc) == _outcome(call, PY, fp)
            assert fc == fp


def test_corpus_is_well_formed():
    """The seed corpus parses in both builds."""
    for frame, link in CORPUS:
        assert CE.parse(frame, link).ok and PY.parse(frame, link).ok


def test_corpus_same_answers():
    """Unmutated frames: identical views, checksums and rewrites."""
    for frame, link in CORPUS:
        assert_same_answers(frame, link)


def test_mutated_frames_same_answers():
    """Seeded random mutations of the corpus (thousands of frames) give identical answers."""
    rng = random.Random(20240601)
    errors = set()
    for i in range(30000):
        frame, link = CORPUS[i % len(CORPUS)]
        m = mutate(rng, frame)
        assert_same_answers(m, link)
        errors.add(PY.parse(m, link).error)
    assert len(errors) >= 8  # the mutations reach most error kinds


def test_random_bytes_same_answers():
    """Pure random byte strings of every small length, both links."""
    rng = random.Random(99)
    for n in range(0, 200):
        for link in (ETH, RAW):
            data = bytes(rng.getrandbits(8) for _ in range(n))
            if link == RAW and data:
                data = bytes([rng.choice((0x45, 0x46, 0x4F, 0x60))]) + data[1:]
            assert_same_answers(data, link)


@HYP
@given(data=st.binary(max_size=160), link=st.sampled_from([ETH, RAW]))
def test_hypothesis_binary(data, link):
    """hypothesis-generated byte strings give identical answers."""
    assert_same_answers(data, link)


@HYP
@given(index=st.integers(0, len(CORPUS) - 1),
       edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 200)), tail=st.binary(max_size=16))
def test_hypothesis_structured(index, edits, cut, tail):
    """hypothesis-driven edits of corpus frames (byte sets, a cut and a tail) give identical answers."""
    frame, link = CORPUS[index]
    f = bytearray(frame)
    for pos, value in edits:
        if pos < len(f):
            f[pos] = value
    if cut is not None:
        f = f[:cut]
    assert_same_answers(bytes(f) + tail, link)


def test_insert_option_same_answers():
    """insert_option on corpus and mutated frames: same result, same bytes in both builds."""
    rng = random.Random(4)
    options = [C.opt_migrate_permitted(), C.opt_sack_permitted(), C.opt_mss(1200), C.opt_timestamps(1, 2),
               MIGRATE, C.opt_wscale(3)]
    frames = CORPUS + [(mutate(rng, f), link) for f, link in CORPUS * 10]
    for frame, link in frames:
        for opt in options:
            fc, fp = bytearray(frame), bytearray(frame)
            assert _outcome(CE.insert_option, fc, opt, link) == _outcome(PY.insert_option, fp, opt, link), \
                (frame.hex(), opt.hex())
            assert fc == fp, (frame.hex(), opt.hex())


# --- Batches ----------------------------------------------------------------------------


def _fuzz_batch(seed, count=3000):
    rng = random.Random(seed)
    frames = []
    for i in range(count):
        frame, link = CORPUS[i % len(CORPUS)]
        if link != ETH:
            continue
        frames.append(frame if rng.random() < 0.3 else mutate(rng, frame))
    buf, offs, lens = bytearray(), array("I"), array("I")
    for f in frames:
        buf += bytes(rng.randrange(3))
        offs.append(len(buf))
        lens.append(len(f))
        buf += f
    return buf, offs, lens


def test_parse_batch_same_records():
    """parse_batch writes byte-identical records in both builds."""
    buf, offs, lens = _fuzz_batch(1)
    rc, rp = bytearray(C.RECORD_SIZE * len(offs)), bytearray(C.RECORD_SIZE * len(offs))
    assert CE.parse_batch(buf, offs, lens, rc) == PY.parse_batch(buf, offs, lens, rp) == len(offs)
    assert C.iter_records(rc, len(offs)) == C.iter_records(rp, len(offs))
    assert rc == rp


def _configured_table(engine, seed):
    """One table configuration, identical for both builds, with flows for the corpus 4-tuples."""
    rng = random.Random(seed)
    t = engine.FlowTable(capacity=8, default_verdict=C.DROP, default_punt=C.RST, nontcp_verdict=C.PYTHON,
                         malformed_verdict=C.DROP)
    cycle = [C.PASS, C.REWRITE, C.REWRITE, C.DROP, C.PYTHON]
    rng.shuffle(cycle)
    for i, (frame, link) in enumerate(CORPUS):
        v = PY.parse(frame, link)
        if not v.is_tcp:
            continue
        verdict = cycle[i % len(cycle)]
        new = V4_C if v.ip_version == 4 else V6_C
        t.set(v.src, v.sport, v.dst, v.dport, verdict, new_src=new if rng.random() < 0.7 else None,
              new_sport=rng.choice((None, 0, 65535, 1234)), new_dst=new if rng.random() < 0.3 else None,
              new_dport=rng.choice((None, 80)), punt_flags=rng.choice((0, C.SYN, C.FIN | C.RST)))
    return t


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_process_batch_same_verdicts_buffers_stats(seed):
    """process_batch on the same fuzzed buffer: same verdicts, output bytes, stats and flow snapshots."""
    buf, offs, lens = _fuzz_batch(seed * 7)
    tc, tp = _configured_table(CE, seed), _configured_table(PY, seed)
    bc, bp = bytearray(buf), bytearray(buf)
    vc, vp = bytearray(len(offs)), bytearray(len(offs))
    assert tc.process_batch(bc, offs, lens, vc, now=12.5) == tp.process_batch(bp, offs, lens, vp, now=12.5)
    assert vc == vp
    assert bc == bp
    assert tc.stats() == tp.stats()
    assert set(vc) == {C.PASS, C.REWRITE, C.DROP, C.PYTHON}
    assert sorted(tc.keys()) == sorted(tp.keys())
    for key in tp.keys():
        assert tc.get(*key) == tp.get(*key)


def test_classify_tracking_same_over_a_flow():
    """classify() one frame at a time with changing times: identical snapshots after every frame."""
    rng = random.Random(8)
    tc, tp = _configured_table(CE, 9), _configured_table(PY, 9)
    keys = tp.keys()
    for i in range(1500):
        frame, link = CORPUS[rng.randrange(len(CORPUS))]
        if link != ETH:
            continue
        f = mutate(rng, frame) if rng.random() < 0.5 else frame
        fc, fp = bytearray(f), bytearray(f)
        assert tc.classify(fc, i / 8) == tp.classify(fp, i / 8)
        assert fc == fp
    assert tc.stats() == tp.stats()
    assert [tc.get(*k) for k in keys] == [tp.get(*k) for k in keys]


# Both directions of connections whose entries are peers (one pair through rewrite fields),
# frames with valid, bad and partial checksums, and verdicts changed on the way.
PEER_KEYS = ((V4_A, 40000, V4_B, 80), (V4_C, 8080, V4_A, 40000), (V6_A, 40001, V6_B, 443), (V6_B, 443, V6_A, 40001),
             (V4_B, 80, V4_A, 40000))  # the last: the client's plain reverse tuple, not its peer
PEER_REWRITES = (dict(new_dst=V4_C, new_dport=8080), dict(new_src=V4_B, new_sport=80), {}, {}, {})


def _peer_table(engine):
    t = engine.FlowTable(capacity=4)
    for key, rw in zip(PEER_KEYS, PEER_REWRITES):
        t.set(*key, C.REWRITE if rw else C.PASS, **rw)
    return t


def _peer_traffic(seed, count):
    """(frame, partial, table change or None) triples, the same for both builds."""
    rng = random.Random(seed)
    nxt = [rng.getrandbits(32) for _ in PEER_KEYS]
    out = []
    for _ in range(count):
        i = rng.randrange(len(PEER_KEYS))
        src, sport, dst, dport = PEER_KEYS[i]
        peer = i ^ 1 if i < 4 else 0
        seq = nxt[i] if rng.random() < 0.7 else rng.getrandbits(32)
        ack = (nxt[peer] + rng.randrange(-2000, 2000)) & C.MASK32 if rng.random() < 0.7 else rng.getrandbits(32)
        flags = rng.choice((C.ACK, C.ACK | C.PSH, C.ACK | C.FIN, C.SYN, C.SYN | C.ACK, C.RST, C.ACK | C.RST))
        payload = bytes(rng.randrange(0, 300)) if rng.random() < 0.5 else b""
        f = bytearray(PY.build_tcp(src, dst, sport, dport, seq, ack, flags, rng.getrandbits(16),
                                   garbage_options(rng), payload, eth_src=MAC_A, eth_dst=MAC_B))
        if seq == nxt[i] and not flags & C.RST:
            nxt[i] = (seq + len(payload) + bool(flags & (C.SYN)) + bool(flags & C.FIN)) & C.MASK32
        r = rng.random()
        if r < 0.15:
            f[rng.randrange(14, len(f))] ^= 1 << rng.randrange(8)  # a bad checksum (or a changed header)
        elif r < 0.25:
            f = bytearray(mutate(rng, f))
            if PY.parse(f).ok and rng.random() < 0.7:
                try:
                    PY.fix_checksums(f)  # parseable garbage with valid checksums
                except ValueError:
                    pass
        change = None
        if rng.random() < 0.01:
            j = rng.randrange(len(PEER_KEYS))
            change = (j, rng.choice((C.PASS, C.REWRITE, C.DROP, C.PYTHON)), rng.choice((0, C.FIN, C.SYN | C.RST)))
        out.append((bytes(f), rng.random() < 0.2, change))
    return out


def test_peer_tracking_same_over_both_directions():
    """Two-sided traffic with valid, bad and partial checksums and verdict changes: identical verdicts,
    bytes, stats and snapshots (ack, sack, ignored...) after every frame; every kind of refusal happens."""
    tc, tp = _peer_table(CE), _peer_table(PY)
    sacks = 0
    for i, (frame, partial, change) in enumerate(_peer_traffic(31, 4000)):
        if change is not None:
            j, verdict, punt = change
            for t in (tc, tp):
                t.set(*PEER_KEYS[j], verdict, punt_flags=punt, **PEER_REWRITES[j])
        fc, fp = bytearray(frame), bytearray(frame)
        assert tc.classify(fc, i / 4, partial) == tp.classify(fp, i / 4, partial), i
        assert fc == fp, i
        flows = [tp.get(*k) for k in PEER_KEYS]
        assert [tc.get(*k) for k in PEER_KEYS] == flows, i
        sacks += sum(bool(f.sack) for f in flows)
    s = tp.stats()
    assert tc.stats() == s
    assert s["untracked_bad_csum"] > 100 and s["ack_beyond_sent"] > 100 and sacks > 100
    assert {tp.get(*k).verdict for k in PEER_KEYS} != {C.PASS, C.REWRITE}  # the verdict changes happened


def test_oversized_frame_parses_alike():
    """A buffer larger than 16 MiB holding a valid frame plus trailer parses the same in both builds."""
    frame = CORPUS[0][0] + bytes(16 * 1024 * 1024 + 1 - len(CORPUS[0][0]))
    assert view_dict(CE.parse(frame)) == view_dict(PY.parse(frame))
