"""appliance.docroot: size names, deterministic content, manifest reuse and regeneration."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from appliance import docroot


def test_parse_and_name_sizes():
    assert docroot.parse_size("1k") == 1024
    assert docroot.parse_size("10m") == 10 * 1024 * 1024
    assert docroot.parse_size("4K") == 4096
    assert docroot.parse_size(1000) == 1000
    assert docroot.parse_size("1000") == 1000
    for bad in ("", "1x", "k", "-1", "1.5m", -3):
        with pytest.raises(ValueError):
            docroot.parse_size(bad)
    assert docroot.size_name(1024) == "1k"
    assert docroot.size_name(100 * 1024 * 1024) == "100m"
    assert docroot.size_name("64k") == "64k"
    assert docroot.size_name(1000) == "1000"
    assert docroot.size_name(3 * 1024 * 1024) == "3m"
    assert docroot.object_name("10m") == "obj-10m"


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_DOCROOT", str(tmp_path / "docroot"))
    return tmp_path / "docroot"


def test_content_and_manifest(root):
    objs = docroot.ensure(["1k", "1m", 1024 * 1024 + 7])
    assert set(objs) == {"/obj-1k", "/obj-1m", f"/obj-{1024 * 1024 + 7}"}
    for path, (size, sha) in objs.items():
        data = (root / path[1:]).read_bytes()
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == sha
        assert os.stat(root / path[1:]).st_mtime == docroot.MTIME
    # chunk 0 of obj-1m is the shake_128 digest named in the docstring
    first = hashlib.shake_128(b"appliance-object:obj-1m:0").digest(docroot.CHUNK)
    assert (root / "obj-1m").read_bytes() == first
    # the 1m+7 object spans two chunks, the second one different from the first
    big = (root / f"obj-{1024 * 1024 + 7}").read_bytes()
    assert big[docroot.CHUNK:] == hashlib.shake_128(
        f"appliance-object:obj-{1024 * 1024 + 7}:1".encode()).digest(docroot.CHUNK)[:7]
    assert docroot.expected_bytes(1024 * 1024 + 7, 1048570, 1048580) == big[1048570:1048580]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["obj-1k"] == {"size": 1024, "sha256": objs["/obj-1k"][1]}


def test_reuse_skips_generation(root, monkeypatch):
    first = docroot.ensure(["10k"])
    monkeypatch.setattr(docroot, "_generate", lambda *a: pytest.fail("regenerated an object that was fine"))
    os.utime(root / "obj-10k", (5, 5))  # drifted mtime is put back without regenerating
    assert docroot.ensure(["10k"]) == first
    assert os.stat(root / "obj-10k").st_mtime == docroot.MTIME


def test_wrong_size_regenerates(root):
    first = docroot.ensure(["10k"])
    with open(root / "obj-10k", "r+b") as f:
        f.truncate(100)
    assert docroot.ensure(["10k"]) == first
    assert (root / "obj-10k").stat().st_size == 10240
    (root / "obj-10k").unlink()
    assert docroot.ensure(["10k"]) == first
