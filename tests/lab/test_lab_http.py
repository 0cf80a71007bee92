"""HTTP through the direct (bridge) client path, with Debian curl in c1, for both servers."""

from __future__ import annotations

import hashlib
import re

import pytest

import labutil
from appliance import docroot

pytestmark = pytest.mark.lab

SIZES = ("1k", "100k", "1m", "10m")


@pytest.fixture(scope="module", params=["builtin", "nginx"])
def lab(request):
    reason = labutil.netns_unusable()
    if reason:
        pytest.skip(reason)
    with labutil.running_lab(server=request.param, client_path="bridge", appliances=False) as lab:
        yield lab


def curl(lab, *args, timeout=60):
    return lab.run("c1", ["curl", "-s", "-S", "--fail", *args], timeout=timeout)


def sha_file(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_ping_replicas(lab):
    for rep in lab.replicas:
        res = lab.run("c1", ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", lab.ip(rep)], check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        assert " 0% packet loss" in res.stdout


def test_downloads_byte_identical_on_one_connection(lab, tmp_path):
    """Every object from every replica, all objects of a replica over one keep-alive connection."""
    for rep in lab.replicas:
        args = []
        for s in SIZES:
            args += [lab.url(rep, f"/obj-{s}"), "-o", str(tmp_path / f"{rep}-{s}")]
        res = curl(lab, "-w", "%{http_code} %{num_connects}\\n", *args)
        lines = res.stdout.split()
        codes, connects = lines[0::2], [int(x) for x in lines[1::2]]
        assert codes == ["200"] * len(SIZES)
        assert sum(connects) == 1, f"{rep}: {connects} connections for {len(SIZES)} requests"
        for s in SIZES:
            size, sha = lab.objects[f"/obj-{s}"]
            f = tmp_path / f"{rep}-{s}"
            assert f.stat().st_size == size
            assert sha_file(f) == sha, f"{rep} obj-{s}"


@pytest.mark.parametrize("spec,first,last", [("100-199", 100, 199), ("1000-", 1000, None), ("-500", None, None)])
def test_ranges(lab, tmp_path, spec, first, last):
    size = docroot.parse_size("1m")
    data = docroot.object_path("1m").read_bytes()
    if first is None:
        first, last = size - 500, size - 1
    if last is None:
        last = size - 1
    for rep in lab.replicas:
        out = tmp_path / f"{rep}.part"
        res = curl(lab, "-r", spec, "-D", "-", "-o", str(out), lab.url(rep, "/obj-1m"))
        head = res.stdout
        assert re.search(r"^HTTP/1.1 206", head, re.M), head
        assert f"Content-Range: bytes {first}-{last}/{size}" in head
        assert out.read_bytes() == data[first:last + 1]


def test_416(lab):
    res = lab.run("c1", ["curl", "-s", "-o", "/dev/null", "-D", "-", "-r", "2000-", lab.url("a", "/obj-1k")])
    assert res.stdout.startswith("HTTP/1.1 416")
    assert "Content-Range: bytes */1024" in res.stdout


def test_validators_identical_across_replicas(lab):
    seen = set()
    for rep in lab.replicas:
        head = curl(lab, "-I", lab.url(rep, "/obj-10m")).stdout
        etag = re.search(r"^ETag: (.*?)\r?$", head, re.M | re.I).group(1)
        lm = re.search(r"^Last-Modified: (.*?)\r?$", head, re.M | re.I).group(1)
        assert re.search(r"^Accept-Ranges: bytes", head, re.M | re.I)
        assert re.search(r"^Content-Length: 10485760", head, re.M | re.I)
        seen.add((etag, lm))
    assert seen == {(f'"{docroot.MTIME:x}-{10 * 1024 * 1024:x}"', "Tue, 14 Nov 2023 22:13:20 GMT")}
