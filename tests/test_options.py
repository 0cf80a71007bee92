"""Shared TCP option encoders, decoded by scapy (tested once: the same code in both builds)."""

import random

import pytest

import _fastpath
from _fastpath import _common as C
from helpers import decode_options_with_scapy


def _decode_one(option):
    """scapy's decoding of a single option (any trailing EOL padding dropped)."""
    opts = decode_options_with_scapy(option)
    while opts and opts[-1] == ("EOL", None):
        opts.pop()
    assert len(opts) == 1, opts
    return opts[0]


@pytest.mark.parametrize("mss", [0, 536, 1460, 65535])
def test_opt_mss(mss):
    """MSS: kind 2, length 4."""
    assert _decode_one(C.opt_mss(mss)) == ("MSS", mss) and len(C.opt_mss(mss)) == 4


@pytest.mark.parametrize("shift", [0, 7, 14, 255])
def test_opt_wscale(shift):
    """Window scale: kind 3, length 3."""
    assert _decode_one(C.opt_wscale(shift)) == ("WScale", shift)


def test_opt_sack_permitted():
    """SACK-permitted: kind 4, length 2."""
    assert _decode_one(C.opt_sack_permitted()) == ("SAckOK", b"")


@pytest.mark.parametrize("blocks", [[(1, 2)], [(0, 0xFFFFFFFF), (5, 6)], [(i, i + 1) for i in range(4)]])
def test_opt_sack(blocks):
    """SACK with 1..4 blocks: kind 5, length 2 + 8n."""
    name, value = _decode_one(C.opt_sack(blocks))
    assert name == "SAck" and tuple(zip(value[0::2], value[1::2])) == tuple(blocks)


def test_opt_sack_block_count_and_masking():
    """0 or 5 blocks are refused; edges are taken modulo 2**32."""
    for bad in ([], [(1, 2)] * 5):
        with pytest.raises(ValueError):
            C.opt_sack(bad)
    assert _decode_one(C.opt_sack([(2**32 + 1, -1)])) == ("SAck", (1, 0xFFFFFFFF))


@pytest.mark.parametrize("tsval,tsecr", [(0, 0), (1, 2), (0xFFFFFFFF, 0x80000000)])
def test_opt_timestamps(tsval, tsecr):
    """Timestamps: kind 8, length 10."""
    assert _decode_one(C.opt_timestamps(tsval, tsecr)) == ("Timestamp", (tsval, tsecr))


def test_opt_migrate_permitted_insecure():
    """Insecure Migrate-Permitted: kind 253, length 5, ExID 0x4D50, curve 0."""
    kind, body = _decode_one(C.opt_migrate_permitted())
    assert (kind, body) == (253, b"\x4d\x50\x00")
    assert len(C.opt_migrate_permitted()) == C.MIGRATE_PERMITTED_LEN


def test_opt_migrate_permitted_secure():
    """Secure Migrate-Permitted: length 22, the curve id then 17 bytes of key data."""
    key = bytes(range(100, 117))
    kind, body = _decode_one(C.opt_migrate_permitted(7, key))
    assert (kind, body) == (253, b"MP" + bytes([7]) + key)
    with pytest.raises(ValueError):
        C.opt_migrate_permitted(7, bytes(16))
    with pytest.raises(ValueError):
        C.opt_migrate_permitted(0, b"x")


def test_opt_migrate_fields():
    """Migrate: kind 253, length 21, ExID 0x4D47, P bit, 7-bit ReqNo, 64-bit Token and Request."""
    rng = random.Random(21)
    for _ in range(200):
        preload, reqno = rng.random() < 0.5, rng.randrange(128)
        token, request = rng.getrandbits(64), rng.getrandbits(64)
        opt = C.opt_migrate(preload, reqno, token, request)
        assert len(opt) == C.MIGRATE_LEN
        kind, body = _decode_one(opt)
        assert kind == 253 and body[:2] == b"MG"
        assert (bool(body[2] & 0x80), body[2] & 0x7F) == (preload, reqno)
        assert (int.from_bytes(body[3:11], "big"), int.from_bytes(body[11:19], "big")) == (token, request)


def test_opt_migrate_masks_reqno():
    """ReqNo is taken modulo 128 and never touches the P bit."""
    assert C.opt_migrate(False, 128 + 5, 0, 0)[4] == 5
    assert C.opt_migrate(True, 0xFF, 0, 0)[4] == 0xFF


def test_aligned_option_and_pad_options():
    """aligned_option puts NOPs first so the option ends on 4 bytes; pad_options pads with EOL/zero."""
    for n in range(2, 41):
        opt = bytes([30, n]) + bytes(n - 2)
        al = C.aligned_option(opt)
        assert len(al) % 4 == 0 and al.endswith(opt) and set(al[:len(al) - n]) <= {1}
        assert len(al) - n < 4
    opts = decode_options_with_scapy(C.aligned_option(C.opt_migrate(True, 1, 2, 3)))
    assert [o[0] for o in opts] == ["NOP", "NOP", "NOP", 253]
    assert C.pad_options(b"\x01") == b"\x01\x00\x00\x00"
    assert C.pad_options(bytes(40)) == bytes(40)
    with pytest.raises(ValueError):
        C.pad_options(bytes(41))


def test_combined_linux_syn_options():
    """A whole Linux SYN option block built from the encoders decodes as scapy's list."""
    block = C.opt_mss(1460) + C.opt_sack_permitted() + C.opt_timestamps(9, 0) + b"\x01" + C.opt_wscale(7)
    assert decode_options_with_scapy(block) == [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (9, 0)),
                                                ("NOP", None), ("WScale", 7)]


def test_package_reexports_encoders():
    """_fastpath re-exports the shared encoders."""
    assert _fastpath.opt_migrate is C.opt_migrate and _fastpath.opt_mss is C.opt_mss
