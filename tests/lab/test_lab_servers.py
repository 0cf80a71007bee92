"""The lab's server kinds and docroots: lighttpd, per-replica docroot copies, alter_object,
the embedded server's test knobs, kill_replica without goodbye, partition/heal.

Three labs (one per server kind, each with docroot="copy" and no appliances, bridged client
path) are shared by the tests of this module; each test alters its own objects.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import os
import subprocess
import time

import pytest

import labutil
from appliance import config as config_mod
from appliance import docroot
from appliance.lab import COPIES_ROOT, Lab, LabError, _pids_in_netns, file_sha256, file_size, wait_for

pytestmark = pytest.mark.lab

def _lab(**kw):
    kw.setdefault("replicas", ("a", "b"))
    return labutil.running_lab(docroot="copy", client_path="bridge", appliances=False, **kw)


@pytest.fixture(scope="module")
def lighttpd_lab(netns_ok):
    with _lab(server="lighttpd") as lab:
        yield lab


@pytest.fixture(scope="module")
def nginx_lab(netns_ok):
    with _lab(server="nginx") as lab:
        yield lab


@pytest.fixture(scope="module")
def builtin_lab(netns_ok):
    # c: a slow link, for a download that is still running when the replica is killed
    with _lab(server="builtin", replicas=("a", "b", "c"), links={"c": {"rate": "1mbit"}}) as lab:
        yield lab


def head(lab, replica, path, node="c1"):
    """Response headers (lower-case names) of a HEAD from `node`."""
    res = lab.run(node, ["curl", "-sS", "-I", "--max-time", "5", lab.url(replica, path)])
    lines = res.stdout.splitlines()
    assert lines and lines[0].startswith("HTTP/1.1 200"), res.stdout
    return {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ":" in ln)}


def get(lab, replica, path, out):
    """GET into file `out`; (status code, sha256 hex, bytes)."""
    res = lab.run("c1", ["curl", "-sS", "--max-time", "10", "-o", str(out), "-w", "%{http_code}",
                         lab.url(replica, path)])
    data = out.read_bytes()
    return int(res.stdout), hashlib.sha256(data).hexdigest(), data


# -- lighttpd ------------------------------------------------------------------------------


def test_lighttpd_intact_keepalive_and_range(lighttpd_lab, tmp_path):
    lab = lighttpd_lab
    assert {"lighttpd-a", "lighttpd-b"} <= set(lab.procs)
    conf = (lab.lab_dir / "lighttpd-a.conf").read_text()
    for line in ("server.max-keep-alive-requests = 1000", "server.max-keep-alive-idle = 75",
                 'etag.use-inode = "enable"', f'server.document-root = "{lab.docroot_of("a")}"'):
        assert line in conf
    # two objects over one connection (keep-alive): the second transfer makes no new connect
    f1, f2 = tmp_path / "one", tmp_path / "two"
    res = lab.run("c1", ["curl", "-sS", "--max-time", "10", "-w", "%{http_code} %{num_connects}\\n",
                         "-o", str(f1), lab.url("a", "/obj-1m"), "-o", str(f2), lab.url("a", "/obj-100k")])
    assert res.stdout.split() == ["200", "1", "200", "0"], res.stdout
    for f, path in ((f1, "/obj-1m"), (f2, "/obj-100k")):
        assert (len(f.read_bytes()), hashlib.sha256(f.read_bytes()).hexdigest()) == lab.objects[path]
    h = head(lab, "a", "/obj-1m")
    assert h["server"].startswith("lighttpd") and h["etag"] and h["last-modified"]
    # a range: 206 with exactly those bytes
    f3 = tmp_path / "range"
    res = lab.run("c1", ["curl", "-sS", "--max-time", "10", "-r", "1000-1999", "-D", "-", "-o", str(f3),
                         lab.url("b", "/obj-1m")])
    assert res.stdout.startswith("HTTP/1.1 206"), res.stdout
    assert "content-range: bytes 1000-1999/1048576" in res.stdout.lower()
    assert f3.read_bytes() == docroot.expected_bytes("1m", 1000, 2000)


def test_docroot_copies_distinct_inodes(lighttpd_lab):
    lab = lighttpd_lab
    da, db = lab.docroot_of("a"), lab.docroot_of("b")
    assert da == str(COPIES_ROOT / lab.name / "a") and db == str(COPIES_ROOT / lab.name / "b")
    assert not da.startswith("/run/")
    for path, (size, sha) in lab.objects.items():
        sts = [os.stat(os.path.join(d, path.lstrip("/"))) for d in (da, db, lab.docroot)]
        assert len({(st.st_dev, st.st_ino) for st in sts}) == 3, path  # three files, no links
        assert all(st.st_size == size and st.st_mtime == docroot.MTIME and st.st_nlink == 1 for st in sts), path
        if size <= docroot.parse_size("1m"):
            assert all(file_sha256(os.path.join(d, path.lstrip("/"))) == sha for d in (da, db))
    topo = json.loads((lab.lab_dir / "topology.json").read_text())
    assert topo["docroots"] == {"a": da, "b": db} and topo["docroot_mode"] == "copy"
    attached = Lab.attach(lab.name)
    assert attached.docroot_mode == "copy" and attached.docroot_of("b") == db


def test_etags_across_copies(lighttpd_lab, nginx_lab, builtin_lab):
    # lighttpd's default ETag includes the inode: the copies differ; nginx's and the builtin's do not
    la, lb = head(lighttpd_lab, "a", "/obj-10k"), head(lighttpd_lab, "b", "/obj-10k")
    assert la["etag"] != lb["etag"] and la["last-modified"] == lb["last-modified"]
    for lab in (nginx_lab, builtin_lab):
        ha, hb = head(lab, "a", "/obj-10k"), head(lab, "b", "/obj-10k")
        assert ha["etag"] == hb["etag"] == f'"{docroot.MTIME:x}-{10240:x}"', lab.server
        assert ha["last-modified"] == hb["last-modified"]


# -- alter_object ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nginx", "builtin"])
def test_alter_bytes_same_validators(request, tmp_path, kind):
    lab = request.getfixturevalue(f"{kind}_lab")
    path, size = "/obj-100k", 102400
    before = head(lab, "a", path)
    new_sha = lab.alter_object("a", path, "bytes")
    assert new_sha != lab.objects[path][1]
    st = os.stat(os.path.join(lab.docroot_of("a"), "obj-100k"))
    assert st.st_size == size and st.st_mtime == docroot.MTIME
    after, other = head(lab, "a", path), head(lab, "b", path)
    for k in ("etag", "last-modified", "content-length"):
        assert before[k] == after[k] == other[k], k
    code, sha, data = get(lab, "a", path, tmp_path / "altered")
    assert code == 200 and sha == new_sha and len(data) == size
    orig = docroot.expected_bytes("100k")
    first = next(i for i in range(size) if data[i] != orig[i])
    assert first == size // 2
    assert all(data[i] != orig[i] for i in range(first, size, 997))  # differs to the end
    code, sha, _ = get(lab, "b", path, tmp_path / "other")
    assert sha == lab.objects[path][1]  # the other replica's copy is untouched
    # an explicit offset; deterministic from the original (not cumulative)
    assert lab.alter_object("a", path, "bytes", offset=1000) == lab.alter_object("a", path, "bytes", offset=1000)
    _, _, data = get(lab, "a", path, tmp_path / "altered2")
    assert data[:1000] == orig[:1000] and data[1000] != orig[1000]


@pytest.mark.parametrize("kind", ["lighttpd", "nginx", "builtin"])
def test_alter_mtime_while_serving(request, tmp_path, kind):
    lab = request.getfixturevalue(f"{kind}_lab")
    path = "/obj-1k"
    before = head(lab, "b", path)
    assert lab.alter_object("b", path, "mtime") == lab.objects[path][1]  # same bytes
    after = head(lab, "b", path)  # at once: no server serves a cached stat
    lm = email.utils.parsedate_to_datetime(after["last-modified"]).timestamp()
    assert lm == docroot.MTIME + 86400
    assert after["last-modified"] != before["last-modified"] and after["etag"] != before["etag"]
    assert head(lab, "a", path)["last-modified"] == before["last-modified"]
    code, sha, _ = get(lab, "b", path, tmp_path / "body")
    assert code == 200 and sha == lab.objects[path][1]


def test_alter_bytes_and_mtime_lighttpd(lighttpd_lab, tmp_path):
    lab = lighttpd_lab
    path = "/obj-10k"
    before = head(lab, "a", path)
    new_sha = lab.alter_object("a", path, "bytes+mtime", offset=10)
    after = head(lab, "a", path)
    assert after["last-modified"] != before["last-modified"] and after["content-length"] == "10240"
    code, sha, data = get(lab, "a", path, tmp_path / "body")
    assert sha == new_sha != lab.objects[path][1]
    orig = docroot.expected_bytes("10k")
    assert data[:10] == orig[:10] and data[10] != orig[10]


def test_alter_object_errors(builtin_lab):
    shared = Lab(labutil.unique_name(), replicas=("a", "b"), docroot="shared")
    with pytest.raises(LabError, match="docroot='copy'"):
        shared.alter_object("a", "/obj-1k", "bytes")
    with pytest.raises(LabError, match="how must be one of"):
        builtin_lab.alter_object("a", "/obj-1k", "size")
    with pytest.raises(LabError, match="offset"):
        builtin_lab.alter_object("a", "/obj-1k", "bytes", offset=1024)
    with pytest.raises(LabError, match="unknown object"):
        builtin_lab.alter_object("a", "/obj-3k", "mtime")
    with pytest.raises(LabError, match="unknown replica"):
        builtin_lab.alter_object("zz", "/obj-1k", "mtime")
    with pytest.raises(LabError, match="docroot: want 'shared' or 'copy'"):
        Lab("x", docroot="tmpfs")


# -- the group config -------------------------------------------------------------------------


def test_group_config_docroot_and_extra_section(builtin_lab):
    lab = builtin_lab
    saved = lab.group_config
    try:
        lab.group_config = {"takeover": {"validators": "digest"}, "service": {"ports": [80, 8080]}}
        cfg = config_mod.load(lab.write_group_config("b"))
    finally:
        lab.group_config = saved
    assert cfg.service.docroot == lab.docroot_of("b") and cfg.service.ports == (80, 8080)
    assert cfg.takeover.validators == "digest" and cfg.node.id == "b"
    cfg = config_mod.load(lab.write_group_config("a"))
    assert cfg.service.docroot == lab.docroot_of("a") and cfg.takeover.validators == "strict"
    with pytest.raises(LabError, match="group_config"):
        Lab("x", group_config={"takeover": "digest"})


# -- the embedded server's knobs ---------------------------------------------------------------


def test_builtin_chunked_and_delay(builtin_lab, tmp_path):
    lab = builtin_lab
    out = tmp_path / "chunked"
    res = lab.run("c1", ["curl", "-sS", "--max-time", "10", "-D", "-", "-o", str(out),
                         lab.url("a", "/obj-1m?chunked=1")])
    low = res.stdout.lower()
    assert res.stdout.startswith("HTTP/1.1 200") and "transfer-encoding: chunked" in low
    assert "content-length" not in low
    assert (len(out.read_bytes()), file_sha256(out)) == lab.objects["/obj-1m"]
    fmt = "%{http_code} %{time_pretransfer} %{time_starttransfer}"
    for query, delay in (("?delay_ms=600", 0.6), ("?delay_ms=400&chunked=1", 0.4)):
        res = lab.run("c1", ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", fmt,
                             lab.url("a", "/obj-100k" + query)])
        code, pre, start = res.stdout.split()
        assert code == "200" and float(start) - float(pre) >= delay, res.stdout


# -- partitions and crashes ---------------------------------------------------------------------


def _ping(lab, node, dst):
    return lab.run(node, ["ping", "-n", "-q", "-c", "1", "-W", "1", dst], check=False).returncode


def test_partition_heal(builtin_lab, tmp_path):
    lab = builtin_lab
    pid = lab.procs["http-b"]["pid"]
    assert _ping(lab, "c1", lab.ip("b")) == 0
    lab.partition("b")
    lab.partition("b")  # twice is fine
    assert lab.partitioned == {"b"}
    assert _ping(lab, "c1", lab.ip("b")) != 0
    assert _ping(lab, "a", lab.sync_ip("b")) != 0
    res = lab.run("c1", ["curl", "-sS", "--max-time", "1.5", "-o", "/dev/null", lab.url("b", "/obj-1k")],
                  check=False)
    assert res.returncode != 0
    assert labutil.pid_alive(pid)  # the processes live on
    lab.heal("b")
    lab.heal("b")
    assert lab.partitioned == set()
    assert _ping(lab, "c1", lab.ip("b")) == 0
    assert _ping(lab, "a", lab.sync_ip("b")) == 0
    code, sha, _ = get(lab, "b", "/obj-10k", tmp_path / "after")
    assert code == 200 and sha == lab.objects["/obj-10k"][1]
    assert lab.procs["http-b"]["pid"] == pid


def _alive_after_kill(lab, replica, curls, outs):
    """Kill `replica`; 2 s later every curl still runs and no output file grew after +0.5 s."""
    t0 = time.time()
    killed = lab.kill_replica(replica)
    assert t0 <= killed <= time.time()
    assert not _pids_in_netns([lab.ns(replica)])
    assert f"http-{replica}" not in lab.procs
    time.sleep(0.5)
    sizes = [file_size(f) for f in outs]
    time.sleep(max(0.0, killed + 2.0 - time.time()))
    for curl in curls:
        assert curl.poll() is None, f"curl ended: rc {curl.returncode}, {curl.stderr.read()!r}"
    assert [file_size(f) for f in outs] == sizes
    return sizes


def _tcp_states(lab, node):
    out = lab.run(node, ["ss", "-tanH"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _curl(lab, out, replica, path):
    return lab.popen("c1", ["curl", "-sS", "--max-time", "30", "-o", str(out), lab.url(replica, path)],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_replica_mid_download(builtin_lab, tmp_path):
    """A client mid-download of a rate-limited object sees neither EOF nor a reset after the kill."""
    lab = builtin_lab
    if "http-c" not in lab.procs:
        lab.revive_replica("c", appliance=False)
    out = tmp_path / "partial"
    curl = _curl(lab, out, "c", "/obj-1m")
    try:
        assert wait_for(lambda: file_size(out) >= 64 * 1024, 8.0), "the download did not start"
        size, = _alive_after_kill(lab, "c", [curl], [out])
        assert size < 1048576
    finally:
        curl.kill()
        curl.wait(5)


def test_kill_replica_before_response_head(builtin_lab, tmp_path):
    """A crash between the request and the response head (?delay_ms): no FIN reaches the client
    (with the processes killed first, the kernel would close the idle connection cleanly)."""
    lab = builtin_lab
    if "http-c" not in lab.procs:
        lab.revive_replica("c", appliance=False)  # after the other kill test: and nothing left of it
    assert _tcp_states(lab, "c") <= {"LISTEN"}  # a revived replica has no TCP state of its past
    out = tmp_path / "slow"
    curl = _curl(lab, out, "c", "/obj-1k?delay_ms=20000")
    try:
        assert wait_for(lambda: "ESTAB" in _tcp_states(lab, "c"), 5.0), "no connection"
        time.sleep(0.2)  # the request is in; the server sleeps before the head
        assert _alive_after_kill(lab, "c", [curl], [out]) == [0]
    finally:
        curl.kill()
        curl.wait(5)


def test_preflight_names_missing_lighttpd(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("preflight checks for root first")
    import appliance.lab as lab_mod
    monkeypatch.setattr(lab_mod, "LIGHTTPD", "/nonexistent/sbin/lighttpd")
    with pytest.raises(LabError, match="lighttpd requested but /nonexistent/sbin/lighttpd is missing"):
        Lab.preflight("lighttpd")
    Lab.preflight("builtin")
