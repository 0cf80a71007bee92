"""Content digests (appliance.digests): the cache against hashlib, the path rules against the
embedded server's, the RFC 9530 / RFC 3230 parsers, and the background thread's manners."""

import base64
import hashlib
import os
import shutil
import stat
import threading
import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance import digests, docroot, httpserver
from appliance.digests import (
    DigestCache, file_digest, format_digest, parse_digest_header, parse_legacy_digest,
    resolve_target, response_digest, url_to_file,
)

MIB = 1024 * 1024
SIZES = [0, 1, 1000, 1024, MIB - 1, MIB, MIB + 1, 3 * MIB + 17]


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_for(pred, timeout=5.0, step=0.01):
    """Poll `pred` until it returns something truthy, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(step)


def lab_object(root, size, name=None, mtime=docroot.MTIME):
    """Write obj-<size> the way appliance.docroot does; returns (url path, bytes)."""
    name = name or docroot.object_name(size)
    data = b"".join(docroot.generate_chunks(name, size))
    path = root / name
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return "/" + name, data


@pytest.fixture
def cache_factory():
    made = []

    def make(root, **kw):
        kw.setdefault("racy", 0.0)
        c = DigestCache(root, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        assert c.stop(timeout=2.0)


# --- digests match hashlib ---------------------------------------------------------------


def test_digests_match_hashlib(tmp_path, cache_factory):
    objs = [lab_object(tmp_path, n) for n in SIZES]
    cache = cache_factory(tmp_path)
    for url, data in objs:
        d = cache.digest_now(url, timeout=10)
        assert d == sha(data) == file_digest(tmp_path / url[1:])
        assert len(d) == 32
        assert cache.lookup(url) == d
    assert cache.lookup("/obj-0") == sha(b"")
    c = cache.counters()
    assert c["hashed"] == len(SIZES) and c["files_known"] == len(SIZES)
    assert c["bytes_hashed"] == sum(SIZES)


def test_digests_match_the_lab_manifest(tmp_path, monkeypatch, cache_factory):
    monkeypatch.setenv("APPLIANCE_DOCROOT", str(tmp_path))
    objs = docroot.ensure([0, "1k", "10k", "1m", MIB + 3])
    cache = cache_factory(tmp_path)
    for url, (size, hexsha) in objs.items():
        assert cache.digest_now(url, timeout=10).hex() == hexsha


def test_copies_agree_and_lookalikes_do_not(tmp_path, cache_factory):
    """The point of the level: headers say "different" for copies, "same" for lookalikes."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    url, data = lab_object(a, MIB + 5)
    shutil.copyfile(a / url[1:], b / url[1:])  # a copy: its own inode
    os.utime(b / url[1:], (docroot.MTIME, docroot.MTIME))
    lookalike = bytearray(data)
    lookalike[MIB] ^= 1
    (b / "other").write_bytes(bytes(lookalike))
    os.utime(b / "other", (docroot.MTIME, docroot.MTIME))
    sa, sb, so = os.stat(a / url[1:]), os.stat(b / url[1:]), os.stat(b / "other")
    assert sa.st_ino != sb.st_ino
    assert (sa.st_size, sa.st_mtime_ns) == (so.st_size, so.st_mtime_ns)
    ca, cb = cache_factory(a), cache_factory(b)
    assert ca.digest_now(url) == cb.digest_now(url) == sha(data)
    assert cb.digest_now("/other") != ca.digest_now(url)


def test_query_string_and_aliases_name_the_same_file(tmp_path, cache_factory):
    url, data = lab_object(tmp_path, 1000)
    (tmp_path / "alias").symlink_to(url[1:])
    cache = cache_factory(tmp_path)
    d = cache.digest_now(url)
    assert cache.lookup(url + "?x=1&y=%2F") == d
    assert cache.lookup("/obj-%31000") == d
    assert cache.lookup("/./" + url[1:]) == d
    assert cache.lookup("/alias") == d
    assert cache.counters()["hashed"] == 1


# --- the background thread ---------------------------------------------------------------


def test_lookup_is_none_until_the_background_thread_hashed_it(tmp_path, cache_factory):
    objs = [lab_object(tmp_path, n) for n in (0, 1000, MIB + 1)]
    cache = cache_factory(tmp_path, rescan=60)
    url, data = objs[2]
    assert cache.lookup(url) is None  # not hashed yet: queued
    c = cache.counters()
    assert (c["lookups"], c["misses"], c["hits"], c["hashed"]) == (1, 1, 0, 0)
    assert cache.snapshot()["queued"] == 1 and not cache.snapshot()["running"]
    cache.start()
    assert wait_for(lambda: cache.lookup(url)) == sha(data)
    assert wait_for(lambda: cache.counters()["files_known"] == 3)
    for u, d in objs:
        assert cache.lookup(u) == sha(d)
    c = cache.counters()
    assert c["hits"] >= 4 and c["misses"] >= 1 and c["lookups"] == c["hits"] + c["misses"]
    assert c["hashed"] == 3 and c["bytes_hashed"] == MIB + 1001 and c["errors"] == 0
    snap = cache.snapshot()
    assert snap["root"] == str(tmp_path) and snap["running"] and snap["files_known"] == 3


def test_smallest_first_and_rate_limit(tmp_path, cache_factory):
    small, sdata = lab_object(tmp_path, 10)
    big, bdata = lab_object(tmp_path, 2 * MIB)
    cache = cache_factory(tmp_path, rescan=60, max_bytes_per_second=4 * MIB)
    t0 = time.monotonic()
    cache.start()
    assert wait_for(lambda: cache.counters()["files_known"] == 1)
    assert cache.lookup(small) == sha(sdata)  # the one known is the small one
    assert wait_for(lambda: cache.counters()["files_known"] == 2)
    assert time.monotonic() - t0 >= 0.4  # 2 MiB at 4 MiB/s
    assert cache.lookup(big) == sha(bdata)


def test_queued_lookups_go_before_the_rest_of_the_walk(tmp_path, cache_factory):
    walk = [lab_object(tmp_path, MIB + i) for i in range(3)]
    cache = cache_factory(tmp_path, rescan=60, max_bytes_per_second=2 * MIB)  # 0.5 s per file
    cache.start()
    late, ldata = lab_object(tmp_path, 10, name="late")  # after the walk listed the root
    assert cache.lookup(late) is None
    assert wait_for(lambda: cache.lookup(late), timeout=5) == sha(ldata)
    known_walked = sum(cache.lookup(u) is not None for u, _ in walk)
    assert known_walked < 3  # it did not wait for the whole walk
    assert wait_for(lambda: all(cache.lookup(u) == sha(d) for u, d in walk), timeout=10)


def test_rescan_finds_new_files_and_forgets_deleted_ones(tmp_path, cache_factory):
    a, adata = lab_object(tmp_path, 100)
    b, _ = lab_object(tmp_path, 200)
    cache = cache_factory(tmp_path, rescan=0.1)
    cache.start()
    assert wait_for(lambda: cache.counters()["files_known"] == 2)
    (tmp_path / b[1:]).unlink()
    sub = tmp_path / "sub"
    sub.mkdir()
    c, cdata = lab_object(sub, 300)
    assert wait_for(lambda: cache.counters()["walks"] >= 3)
    assert wait_for(lambda: cache.lookup("/sub" + c) == sha(cdata))
    assert wait_for(lambda: cache.counters()["files_known"] == 2)
    assert cache.lookup(a) == sha(adata) and cache.lookup(b) is None


def test_stop_is_prompt_mid_file(tmp_path, cache_factory):
    lab_object(tmp_path, 8 * MIB)
    cache = cache_factory(tmp_path, max_bytes_per_second=MIB)  # 8 s for the file
    cache.start()
    time.sleep(0.3)
    assert cache.snapshot()["running"]
    t0 = time.monotonic()
    assert cache.stop(timeout=2.0)
    assert time.monotonic() - t0 < 0.5
    assert not cache.snapshot()["running"]
    assert cache.counters()["files_known"] == 0  # an interrupted file is not cached


def test_stop_without_start_and_restart(tmp_path, cache_factory):
    url, data = lab_object(tmp_path, 10)
    cache = cache_factory(tmp_path)
    assert cache.stop()
    cache.start()
    cache.start()  # idempotent
    assert cache.stop()
    cache.start()
    assert wait_for(lambda: cache.lookup(url)) == sha(data)


# --- a file that changes -----------------------------------------------------------------


def rewrite_in_place(path, data):
    """New bytes, same size, same inode, mtime restored: everything but ctime as before."""
    st0 = os.stat(path)
    assert len(data) == st0.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    st1 = os.stat(path)
    assert (st1.st_ino, st1.st_size, st1.st_mtime_ns) == (st0.st_ino, st0.st_size, st0.st_mtime_ns)
    return st0, st1


def test_rewrite_in_place_with_restored_mtime_is_stale(tmp_path, cache_factory):
    url, old = lab_object(tmp_path, 5000)
    cache = cache_factory(tmp_path, racy=digests.RACY)  # the real margin: see the racy test
    d_old = cache.digest_now(url, timeout=5)
    assert d_old == sha(old) and cache.lookup(url) == d_old
    new = bytes(b ^ 0xFF for b in old)
    st0, st1 = rewrite_in_place(tmp_path / url[1:], new)
    assert st1.st_ctime_ns != st0.st_ctime_ns  # the one field a rewrite cannot hide
    assert cache.lookup(url) is None
    assert cache.counters()["stale"] == 1
    assert cache.digest_now(url, timeout=5) == sha(new)
    assert cache.lookup(url) == sha(new)


def test_recently_changed_file_is_not_trusted_until_its_ctime_is_old(tmp_path, cache_factory):
    url, data = lab_object(tmp_path, 1000)
    cache = cache_factory(tmp_path, racy=0.3)
    assert cache.digest_now(url, timeout=0.05) is None  # too fresh, and no time to wait
    c = cache.counters()
    assert c["files_known"] == 0 and c["racy"] == 1 and c["bytes_hashed"] == 0  # not even read
    t0 = time.monotonic()
    assert cache.digest_now(url, timeout=5) == sha(data)  # waits out the margin, then caches
    assert time.monotonic() - t0 < 1.0
    assert cache.lookup(url) == sha(data)
    url2, data2 = lab_object(tmp_path, 2000)
    cache.start()
    assert cache.lookup(url2) is None
    assert wait_for(lambda: cache.lookup(url2)) == sha(data2)  # deferred, then hashed


def test_file_changed_while_hashing_is_not_cached(tmp_path, cache_factory):
    url, old = lab_object(tmp_path, 2 * MIB)
    new = bytes(b ^ 0x55 for b in old[:MIB]) + old[MIB:]
    cache = cache_factory(tmp_path, rescan=60, max_bytes_per_second=2 * MIB)  # 1 s for the file
    cache.start()
    timer = threading.Timer(0.3, rewrite_in_place, (tmp_path / url[1:], new))
    timer.start()
    try:
        assert wait_for(lambda: cache.counters()["changed"] >= 1, timeout=5)
        assert wait_for(lambda: cache.lookup(url), timeout=10) == sha(new)
    finally:
        timer.cancel()
        timer.join(2)
    assert cache.counters()["changed"] == 1 and cache.counters()["hashed"] == 1


def test_digest_now_gives_up_early_and_leaves_it_to_the_thread(tmp_path, cache_factory):
    url, data = lab_object(tmp_path, 32 * MIB)
    cache = cache_factory(tmp_path, rescan=60)
    t0 = time.monotonic()
    assert cache.digest_now(url, timeout=0.005) is None  # on course to miss: stops early
    assert time.monotonic() - t0 < 0.5
    assert cache.counters()["bytes_hashed"] < 32 * MIB
    assert cache.snapshot()["queued"] == 1
    cache.start()
    assert wait_for(lambda: cache.lookup(url), timeout=10) == sha(data)


def test_a_file_that_keeps_changing_is_retried_less_and_less(tmp_path, cache_factory):
    cache = cache_factory(tmp_path, rescan=30)
    path = str(tmp_path / "log")
    delays = []
    for _ in range(8):
        t = time.monotonic()
        cache._record(path, digests._Result("changed", nbytes=1))
        delays.append(cache._deferred[path] - t)
    assert delays[0] < 0.2 and all(b > a for a, b in zip(delays[1:], delays[2:]))
    assert max(delays) <= 30.01  # capped at the rescan period
    cache._record(path, digests._Result("notfile"))
    assert path not in cache._deferred and path not in cache._unsettled
    assert cache.counters()["changed"] == 8


def test_read_errors_are_counted(tmp_path, cache_factory, monkeypatch):
    url, _ = lab_object(tmp_path, 10)
    real_open = os.open

    def failing_open(path, *a, **kw):
        if str(path).endswith(url):
            raise PermissionError(13, "denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(digests.os, "open", failing_open)
    cache = cache_factory(tmp_path)
    assert cache.digest_now(url) is None
    assert cache.counters()["errors"] == 1


def test_concurrent_lookups(tmp_path, cache_factory):
    objs = [lab_object(tmp_path, n) for n in (0, 10, 1000, MIB, MIB + 7)]
    cache = cache_factory(tmp_path, rescan=0.2)
    cache.start()
    bad = []

    def worker(i):
        for k in range(200):
            url, data = objs[(i + k) % len(objs)]
            d = cache.digest_now(url, timeout=5) if k % 7 == 0 else cache.lookup(url)
            if d is not None and d != sha(data):
                bad.append(url)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and not bad
    assert wait_for(lambda: all(cache.lookup(u) == sha(d) for u, d in objs))


# --- request target -> file, as the server resolves it -----------------------------------


@pytest.fixture
def tree(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"a" * 10)
    (root / "d" / "b.txt").write_bytes(b"b" * 20)
    (root / "in").symlink_to("a.txt")
    (root / "d" / "up").symlink_to("../a.txt")
    (root / "out").symlink_to(outside / "secret")
    (root / "rel-out").symlink_to("../outside/secret")
    (root / "dir-out").symlink_to(outside)
    (root / "loop").symlink_to("loop")
    os.mkfifo(root / "fifo")
    return root


GOOD = {
    "/a.txt": "a.txt", "/a.txt?x=1": "a.txt", "/a.txt?": "a.txt", "/a.txt#frag": "a.txt",
    "/%61.txt": "a.txt", "/./a.txt": "a.txt", "/d//b.txt": "d/b.txt", "/d/b.txt": "d/b.txt",
    "/in": "a.txt", "/d/up": "a.txt", "http://example/a.txt": "a.txt", "/a.txt/": "a.txt",  # as the server
}
BAD = [
    "/../outside/secret", "/d/../../outside/secret", "/%2e%2e/outside/secret",
    "/%2E%2E/outside/secret", "/d/%2e%2e/a.txt", "/d/../a.txt", "/..", "/a.txt%00",
    "/a.txt\x00", "/out", "/rel-out", "/dir-out/secret", "/", "/d", "/d/", "a.txt", "",
    "*", "//a.txt", "/missing", "/loop", "/fifo", "/%2fetc/passwd",
]


def server_resolve(root, target):
    """The embedded server's own rule, for the same answer: its file or None (a 404)."""
    handler = SimpleNamespace(path=target, server=SimpleNamespace(root_real=os.path.realpath(root)))
    full = httpserver.DocrootHandler._resolve(handler)
    try:
        return full if full is not None and os.path.isfile(full) and not _is_fifo(full) else None
    except OSError:
        return None


def _is_fifo(path):
    return stat.S_ISFIFO(os.stat(path).st_mode)


@pytest.mark.parametrize("target", sorted(GOOD))
def test_url_to_file_good(tree, target):
    got = url_to_file(tree, target)
    assert got == tree / GOOD[target] or got == (tree / GOOD[target]).resolve()
    assert str(got) == server_resolve(tree, target)


@pytest.mark.parametrize("target", BAD)
def test_url_to_file_bad(tree, target, cache_factory):
    assert url_to_file(tree, target) is None
    assert server_resolve(tree, target) is None
    cache = cache_factory(tree)
    assert cache.lookup(target) is None
    assert cache.digest_now(target, timeout=1) is None  # a FIFO must not block it


@given(st.lists(st.sampled_from(["a.txt", "d", "b.txt", "..", ".", "", "%2e%2e", "%2F", "in",
                                 "out", "dir-out", "secret", "?q", "%00", "up", "x"]),
                min_size=0, max_size=6))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_url_to_file_agrees_with_the_server(tree, parts):  # the tree is only read
    target = "/" + "/".join(parts)
    got = url_to_file(tree, target)
    assert (None if got is None else str(got)) == server_resolve(tree, target)


def test_resolve_target_is_the_servers_rule(tree):
    root_real = os.path.realpath(tree)
    for target in [*GOOD, *BAD]:
        handler = SimpleNamespace(path=target, server=SimpleNamespace(root_real=root_real))
        assert resolve_target(root_real, target) == httpserver.DocrootHandler._resolve(handler)


def test_url_to_file_with_a_symlinked_root(tree, tmp_path):
    link = tmp_path / "root-link"
    link.symlink_to(tree)
    assert url_to_file(link, "/a.txt") == (tree / "a.txt").resolve()
    assert url_to_file(link, "/out") is None


def test_the_walk_stays_in_the_root(tree, cache_factory):
    cache = cache_factory(tree)
    cache.start()
    assert wait_for(lambda: cache.counters()["walks"] >= 1 and cache.counters()["files_known"] == 2)
    time.sleep(0.1)
    c = cache.counters()
    assert c["files_known"] == 2 and c["bytes_hashed"] == 30  # a.txt and d/b.txt, never secret


def test_walk_bounds(tmp_path, cache_factory):
    deep = tmp_path
    for i in range(5):
        deep = deep / f"l{i}"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"deep")
    (tmp_path / "top").write_bytes(b"top")
    cache = cache_factory(tmp_path, max_depth=3)
    cache.start()
    assert wait_for(lambda: cache.counters()["walks"] >= 1 and cache.counters()["files_known"] == 1)
    assert cache.lookup("/l0/l1/l2/l3/l4/f") is None  # too deep for the walk: queued by lookup
    assert wait_for(lambda: cache.lookup("/l0/l1/l2/l3/l4/f")) == sha(b"deep")


# --- RFC 9530 / RFC 3230 headers ---------------------------------------------------------

D = sha(b'{"hello": "world"}\n')
D_B64 = "RK/0qy18MlBSVnWgjwz6lZEWjP/lF5HF9bvEF8FabDg="  # RFC 9530's own example
D512 = hashlib.sha512(b"x").digest()


def test_format_digest_round_trip():
    assert b64(D) == D_B64
    assert format_digest(D) == f"sha-256=:{D_B64}:"
    assert parse_digest_header(format_digest(D)) == D
    with pytest.raises(ValueError):
        format_digest(D[:31])
    with pytest.raises(ValueError):
        format_digest("x" * 32)


@pytest.mark.parametrize("value", [
    f"sha-256=:{D_B64}:",
    f"  sha-256=:{D_B64}:  ",
    f"sha-256=:{D_B64.rstrip('=')}:",  # RFC 8941: missing padding is not a failure
    f"sha-512=:{b64(D512)}:, sha-256=:{D_B64}:",
    f"sha-256=:{D_B64}:,sha-512=:{b64(D512)}:",
    f"sha-256=:{D_B64}: ,\tsha-512=:{b64(D512)}:",
    f"unixsum=30637, sha-256=:{D_B64}:",
    f"sha-256=:{D_B64}:;foo=bar;baz;n=-12;dec=1.5;s=\"a;b\"",
    f"sha-256=:{D_B64}:; foo=?0",
    f'a=1, b="x, y \\" z", c=(1 2 "3");p=4, d=tok/x:y, e=-0.125, f, g=?1, h=@1700000000, '
    f'i=%"caf%c3%a9", j=(), *k=*, sha-256=:{D_B64}:',
    f"sha-256=:{b64(b'0' * 32)}:, sha-256=:{D_B64}:",  # a repeated key: the last one counts
    [f"sha-512=:{b64(D512)}:", f"sha-256=:{D_B64}:"],  # two field lines
    f"sha-256=:{D_B64}:".encode(),
])
def test_parse_digest_header_valid(value):
    assert parse_digest_header(value) == D


@pytest.mark.parametrize("value", [
    None, "", "   ", 42,
    f"sha-512=:{b64(D512)}:",  # no sha-256
    "sha-256",  # a boolean
    f"sha-256={D_B64}",  # not a byte sequence
    f'sha-256="{D_B64}"',
    f"sha-256=(:{D_B64}:)",  # an inner list
    f"SHA-256=:{D_B64}:",  # keys are lower case
    f"sha-256=:{D_B64}",  # unterminated
    f"sha-256=:{D_B64}:,",  # trailing comma
    f"sha-256=:{D_B64}:,, sha-512=:{b64(D512)}:",
    f"sha-256=:{D_B64}: sha-512=:{b64(D512)}:",  # no comma
    f"sha-256=:{D_B64[:-2]}!=:",  # not base64
    f"sha-256=:{D_B64[:-1]}A==:",  # padding in the middle
    f"sha-256 =:{D_B64}:",
    f"sha-256=:{D_B64}:, x=\"unterminated",  # one bad member voids the field
    f"sha-256=:{D_B64}:, x=1.2345",
    f"sha-256=:{D_B64}:, x=1234567890123456",
    f"sha-256=:{D_B64}:, x=?2",
    f"sha-256=:{D_B64}:, x=%\"%C3%A9\"",
    f"sha-256=:{D_B64}:;",
    f"sha-256=:{D_B64}:, é=1",
    f"sha-256=:{D_B64}:, x=\"é\"",
    b"sha-256=:\xff:",
])
def test_parse_digest_header_malformed(value):
    assert parse_digest_header(value) is None


@pytest.mark.parametrize("raw", [b"", b"x", D[:31], D + b"\0", D512, D[:16]])
def test_parse_digest_header_wrong_length(raw):
    assert parse_digest_header(f"sha-256=:{b64(raw)}:") is None
    assert parse_legacy_digest(f"SHA-256={b64(raw)}") is None


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_parsers_never_raise(value):
    assert parse_digest_header(value) in (None,) or len(parse_digest_header(value)) == 32
    assert parse_legacy_digest(value) is None or len(parse_legacy_digest(value)) == 32


@given(st.binary(min_size=32, max_size=32))
@settings(max_examples=100, deadline=None)
def test_format_parse_round_trip(raw):
    assert parse_digest_header(format_digest(raw)) == raw
    assert parse_digest_header(f"md5=:AAAA:, {format_digest(raw)};x=1, sha-512=:AA==:") == raw


@pytest.mark.parametrize("value", [
    f"SHA-256={D_B64}", f"sha-256={D_B64}", f"MD5=HUXZLQLMuI/KZ5KDcJPcOA==, SHA-256={D_B64}",
    f" SHA-256 = {D_B64} ", f"SHA-256={D_B64}, SHA-256={D_B64}", f"UNIXsum=30637,SHA-256={D_B64}",
])
def test_parse_legacy_digest_valid(value):
    assert parse_legacy_digest(value) == D


@pytest.mark.parametrize("value", [
    None, "", "MD5=HUXZLQLMuI/KZ5KDcJPcOA==", f"SHA={b64(D[:20])}", f"SHA-256={D.hex()}",
    f"SHA-256={D_B64[:-2]}!=", f"SHA-256={D_B64.rstrip('=')}", f"SHA-256={D_B64}, SHA-256={b64(b'0' * 32)}",
    f"sha-256=:{D_B64}:",
])
def test_parse_legacy_digest_invalid(value):
    assert parse_legacy_digest(value) is None


# --- which response headers stand for the whole object -----------------------------------

REPR = format_digest(D)
OTHER = format_digest(sha(b"part"))


@pytest.mark.parametrize("headers,status,method,want", [
    ({"repr-digest": REPR}, 200, "GET", D),
    ({"repr-digest": REPR}, 206, "GET", D),  # of the whole representation, even in a 206
    ({"repr-digest": REPR}, 200, "HEAD", D),
    ({"content-digest": REPR}, 200, "GET", D),
    ({"content-digest": REPR}, 206, "GET", None),  # only the part sent
    ({"content-digest": REPR}, 200, "HEAD", None),  # no content
    ({"repr-digest": REPR, "content-digest": OTHER}, 206, "GET", D),
    ({"repr-digest": REPR, "content-digest": REPR}, 200, "GET", D),
    ({"repr-digest": REPR, "content-digest": OTHER}, 200, "GET", None),  # contradiction
    ({"repr-digest": "garbage", "content-digest": REPR}, 200, "GET", D),
    ({"repr-digest": f"sha-512=:{b64(D512)}:", "content-digest": REPR}, 200, "GET", D),
    ({"repr-digest": REPR, "content-encoding": "gzip"}, 200, "GET", None),
    ({"content-digest": REPR, "content-encoding": "br"}, 200, "GET", None),
    ({"repr-digest": REPR, "content-encoding": "identity"}, 206, "GET", D),
    ({"repr-digest": REPR, "content-encoding": "identity, gzip"}, 200, "GET", None),
    ({"repr-digest": REPR}, 304, "GET", None),
    ({"repr-digest": REPR}, 416, "GET", None),
    ({"repr-digest": REPR}, 404, "GET", None),
    ({"digest": f"SHA-256={D_B64}"}, 200, "GET", D),
    ({"digest": f"SHA-256={D_B64}"}, 206, "GET", None),
    ({"digest": f"SHA-256={D_B64}"}, 200, "HEAD", None),
    ({"digest": f"SHA-256={D_B64}", "repr-digest": OTHER}, 200, "GET", None),
    ({"Repr-Digest": REPR, "Content-Length": "5"}, 206, "GET", D),
    ({"repr-digest": [f"sha-512=:{b64(D512)}:", REPR]}, 206, "GET", D),
    ({"content-length": "5"}, 200, "GET", None),
    ({}, 206, "GET", None),
])
def test_response_digest(headers, status, method, want):
    assert response_digest(headers, status, method=method) == want


def test_response_digest_legacy_off():
    assert response_digest({"digest": f"SHA-256={D_B64}"}, 200, legacy=False) is None
    assert response_digest({"digest": f"SHA-256={D_B64}"}, 200) == D
