"""The TOML config: every field checked, errors that name the field."""

import pytest

from appliance.config import ConfigError, load, parse

GOOD = {
    "node": {"id": "a", "group": "video", "key": "hex:" + "ab" * 16, "capacity": 500, "prefixes": ["/", "/video"]},
    "sync": {"port": 7701, "heartbeat_ms": 10, "refresh_s": 0.5, "peers": ["10.0.0.2", "10.0.0.3:7702", "[fd00::1]:7703"]},
    "health": {"detector": "missed", "dead_after_ms": 80},
    "service": {"ports": [80, 8080], "iface": "eth0"},
}


def test_good_config():
    c = parse(GOOD)
    assert c.node.id == "a" and c.node.key == bytes.fromhex("ab" * 16) and c.node.capacity == 500
    assert c.sync.heartbeat == 0.01 and c.sync.refresh == 0.5 and c.sync.port == 7701
    assert c.sync.peers == (("10.0.0.2", 7701), ("10.0.0.3", 7702), ("fd00::1", 7703))
    assert c.health.detector == "missed" and c.health.dead_after == 0.08
    assert c.service.ports == (80, 8080)


def test_defaults():
    c = parse({"node": {"id": "b", "group": "g", "key": "a text key of 16+ bytes"}})
    assert c.sync.port == 7700 and c.sync.heartbeat == 0.02 and c.sync.refresh == 1.0
    assert c.sync.expire_periods == 3 and c.sync.zeroconf and c.health.dead_after == 0.1
    assert c.node.key == b"a text key of 16+ bytes" and c.node.prefixes == ("/",)


def _with(section, key, value):
    d = {k: dict(v) for k, v in GOOD.items()}
    d.setdefault(section, {})
    if value is KeyError:
        del d[section][key]
    else:
        d[section][key] = value
    return d


@pytest.mark.parametrize("section,key,value,message", [
    ("node", "id", KeyError, "node.id: required"),
    ("node", "id", "bad id!", "node.id: must match"),
    ("node", "group", 3, "node.group: must be a string"),
    ("node", "key", KeyError, "node.key: required"),
    ("node", "key", "short", "node.key: must be at least 16 bytes"),
    ("node", "key", "hex:zz", "node.key: not valid hex"),
    ("node", "capacity", 0, "node.capacity: must be 1..10000000, not 0"),
    ("node", "prefixes", ["video"], "node.prefixes[0]: must start with '/'"),
    ("node", "colour", "blue", "node.colour: unknown key"),
    ("sync", "port", 0, "sync.port: must be 1..65535, not 0"),
    ("sync", "port", "80", "sync.port: must be an integer"),
    ("sync", "heartbeat_ms", -1, "sync.heartbeat_ms: must be 1..10000"),
    ("sync", "refresh_s", 0.001, "sync.refresh_s: must be 0.01..3600"),
    ("sync", "peers", ["not an address"], "sync.peers[0]: not an IP address"),
    ("sync", "peers", ["10.0.0.1:99999"], "sync.peers[0]: port must be 1..65535"),
    ("sync", "bind", "localhost", "sync.bind: not an IP address"),
    ("sync", "zeroconf", "yes", "sync.zeroconf: must be true or false"),
    ("health", "detector", "magic", "health.detector: must be 'phi' or 'missed'"),
    ("health", "dead_after_ms", 5, "health.dead_after_ms: must be at least two heartbeat intervals"),
    ("service", "ports", [80, 70000], "service.ports[1]: must be 1..65535"),
    ("service", "docroot", "/nonexistent/docroot", "service.docroot: not a directory"),
    ("takeover", "validators", "etag", "takeover.validators: must be one of strict, last-modified, digest"),
])
def test_bad_field_is_named(section, key, value, message):
    with pytest.raises(ConfigError) as e:
        parse(_with(section, key, value), source="a.toml")
    assert message in str(e.value) and str(e.value).startswith("a.toml: ")


def test_insecure_sync_needs_no_key():
    c = parse({"node": {"id": "a", "group": "g", "insecure_sync": True}})
    assert c.node.key is None and c.node.insecure_sync


def test_unknown_section():
    with pytest.raises(ConfigError, match=r"unknown section \[syncc\]"):
        parse({**GOOD, "syncc": {}})


def test_files(tmp_path):
    (tmp_path / "key").write_text("base64:" + "QUJDREVGR0hJSktMTU5PUFFSU1Q=\n")
    f = tmp_path / "a.toml"
    f.write_text('[node]\nid = "a"\ngroup = "g"\nkey_file = "key"\n')
    assert load(f).node.key == b"ABCDEFGHIJKLMNOPQRST"
    f.write_text('[node\nid = "a"')
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.toml")


def test_takeover_validators_and_docroot(tmp_path):
    c = parse(GOOD)
    assert c.takeover.validators == "strict" and c.service.docroot is None
    (tmp_path / "www").mkdir()
    f = tmp_path / "a.toml"
    f.write_text('[node]\nid = "a"\ngroup = "g"\ninsecure_sync = true\n[service]\ndocroot = "www"\n'
                 '[takeover]\nvalidators = "digest"\n')
    c = load(f)
    assert c.takeover.validators == "digest" and c.service.docroot == str(tmp_path / "www")
