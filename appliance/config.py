"""The server appliance's TOML config: one file per appliance (docs/support-group.md).

    cfg = load("/etc/appliance/a.toml")      # or parse(dict, source="...")
    cfg.node.id, cfg.node.group, cfg.node.key, cfg.sync.port, cfg.sync.peers, cfg.health.dead_after

Every field is checked; a bad one raises ConfigError whose message names it
("sync.port: must be 1..65535, not 0"). Unknown sections or keys are errors too, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

NODE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")
MIN_KEY_BYTES = 16


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the field."""


@dataclass(frozen=True)
class NodeConfig:
    id: str
    group: str
    key: Optional[bytes]
    insecure_sync: bool = False
    capacity: int = 1000
    prefixes: tuple = ("/",)


@dataclass(frozen=True)
class SyncConfig:
    bind: str = "0.0.0.0"
    port: int = 7700
    heartbeat: float = 0.02  # seconds
    refresh: float = 1.0
    expire_periods: int = 3
    zeroconf: bool = True
    zeroconf_interfaces: tuple = ()  # addresses to announce and browse on; () = all
    peers: tuple = ()  # ((host, port), ...)


@dataclass(frozen=True)
class HealthConfig:
    detector: str = "phi"
    dead_after: float = 0.1  # seconds
    stagger: float = 0.02


@dataclass(frozen=True)
class ServiceConfig:
    ports: tuple = (80,)
    iface: Optional[str] = None
    docroot: Optional[str] = None  # the HTTP server's document root (digests of what it serves)


VALIDATORS = ("strict", "last-modified", "digest")


@dataclass(frozen=True)
class TakeoverConfig:
    validators: str = "strict"  # what must match before a replica splices its copy into a stream


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    sync: SyncConfig = field(default_factory=SyncConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    takeover: TakeoverConfig = field(default_factory=TakeoverConfig)
    source: str = "<config>"


def load(path) -> Config:
    """Read and check a TOML file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse(data, source=str(path), base=p.parent)


def parse(data: dict, source: str = "<config>", base: Optional[Path] = None) -> Config:
    """Check a parsed TOML document and build the Config."""
    r = _Reader(data, source)
    r.sections({"node", "sync", "health", "service", "takeover"})
    n = r.section("node", {"id", "group", "key", "key_file", "insecure_sync", "capacity", "prefixes"})
    node_id = n.string("id", required=True)
    if not NODE_ID.match(node_id):
        n.fail("id", f"must match {NODE_ID.pattern}, not {node_id!r}")
    group = n.string("group", required=True)
    if not group or len(group) > 64:
        n.fail("group", "must be 1 to 64 characters")
    insecure = n.boolean("insecure_sync", False)
    key = None
    if n.has("key") and n.has("key_file"):
        n.fail("key", "give key or key_file, not both")
    if n.has("key"):
        key = _key(n.string("key"), n, "key")
    elif n.has("key_file"):
        kf = Path(n.string("key_file"))
        if base is not None and not kf.is_absolute():
            kf = base / kf
        try:
            key = _key(kf.read_text().strip(), n, "key_file")
        except OSError as exc:
            n.fail("key_file", f"cannot read {kf}: {exc.strerror}")
    if key is None and not insecure:
        n.fail("key", "required: the group key authenticates every sync datagram "
                      "(or set insecure_sync = true, for tests only)")
    capacity = n.integer("capacity", 1000, 1, 10_000_000)
    prefixes = tuple(n.string_list("prefixes", ["/"]))
    for i, pfx in enumerate(prefixes):
        if not pfx.startswith("/"):
            n.fail(f"prefixes[{i}]", f"must start with '/', not {pfx!r}")
    node = NodeConfig(node_id, group, key, insecure, capacity, prefixes)

    s = r.section("sync", {"bind", "port", "heartbeat_ms", "refresh_s", "expire_periods", "zeroconf",
                           "zeroconf_interfaces", "peers"})
    bind = s.string("bind", "0.0.0.0")
    _address(bind, s, "bind")
    port = s.integer("port", 7700, 1, 65535)
    heartbeat = s.number("heartbeat_ms", 20, 1, 10_000) / 1000
    refresh = s.number("refresh_s", 1.0, 0.01, 3600)
    if refresh < heartbeat:
        s.fail("refresh_s", "must not be shorter than heartbeat_ms")
    expire = s.integer("expire_periods", 3, 2, 100)
    zc = s.boolean("zeroconf", True)
    zc_ifs = tuple(s.string_list("zeroconf_interfaces", []))
    for i, a in enumerate(zc_ifs):
        _address(a, s, f"zeroconf_interfaces[{i}]")
    peers = tuple(_peer(p, s, f"peers[{i}]", port) for i, p in enumerate(s.string_list("peers", [])))
    sync = SyncConfig(bind, port, heartbeat, refresh, expire, zc, zc_ifs, peers)

    h = r.section("health", {"detector", "dead_after_ms", "stagger_ms"})
    detector = h.string("detector", "phi")
    if detector not in ("phi", "missed"):
        h.fail("detector", f"must be 'phi' or 'missed', not {detector!r}")
    dead_after = h.number("dead_after_ms", 100, 1, 600_000) / 1000
    if dead_after < 2 * heartbeat:
        h.fail("dead_after_ms", "must be at least two heartbeat intervals (sync.heartbeat_ms)")
    stagger = h.number("stagger_ms", 20, 0, 10_000) / 1000
    health = HealthConfig(detector, dead_after, stagger)

    v = r.section("service", {"ports", "iface", "docroot"})
    ports = tuple(v.int_list("ports", [80], 1, 65535))
    if not ports:
        v.fail("ports", "needs at least one port")
    iface = v.string("iface", None)
    docroot = v.string("docroot", None)
    if docroot is not None:
        d = Path(docroot)
        if base is not None and not d.is_absolute():
            d = base / d
        if not d.is_dir():
            v.fail("docroot", f"not a directory: {docroot}")
        docroot = str(d)
    service = ServiceConfig(ports, iface, docroot)

    t = r.section("takeover", {"validators"})
    validators = t.string("validators", "strict")
    if validators not in VALIDATORS:
        t.fail("validators", f"must be one of {', '.join(VALIDATORS)}, not {validators!r}")
    takeover = TakeoverConfig(validators)
    return Config(node, sync, health, service, takeover, source)


class _Reader:
    """Typed access to one table of the document, with errors that name the field."""

    def __init__(self, data, where: str, prefix: str = "") -> None:
        self.data = data if data is not None else {}
        self.where = where
        self.prefix = prefix

    def fail(self, key: str, message: str):
        raise ConfigError(f"{self.where}: {self.prefix}{key}: {message}")

    def sections(self, allowed: set) -> None:
        for k in self.data:
            if k not in allowed:
                raise ConfigError(f"{self.where}: unknown section [{k}] (known: {', '.join(sorted(allowed))})")

    def section(self, name: str, allowed: set) -> "_Reader":
        table = self.data.get(name, {})
        if not isinstance(table, dict):
            self.fail(name, "must be a table")
        sub = _Reader(table, self.where, f"{name}.")
        for k in table:
            if k not in allowed:
                sub.fail(k, f"unknown key (known: {', '.join(sorted(allowed))})")
        return sub

    def has(self, key: str) -> bool:
        return key in self.data

    def string(self, key: str, default=None, required: bool = False):
        if key not in self.data:
            if required:
                self.fail(key, "required")
            return default
        v = self.data[key]
        if not isinstance(v, str):
            self.fail(key, f"must be a string, not {type(v).__name__}")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.data.get(key, default)
        if not isinstance(v, bool):
            self.fail(key, f"must be true or false, not {v!r}")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.data.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"must be an integer, not {v!r}")
        if not lo <= v <= hi:
            self.fail(key, f"must be {lo}..{hi}, not {v}")
        return v

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self.data.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(key, f"must be a number, not {v!r}")
        if not lo <= v <= hi:
            self.fail(key, f"must be {lo}..{hi}, not {v}")
        return float(v)

    def string_list(self, key: str, default) -> list:
        v = self.data.get(key, default)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.fail(key, "must be a list of strings")
        return v

    def int_list(self, key: str, default, lo: int, hi: int) -> list:
        v = self.data.get(key, default)
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            self.fail(key, "must be a list of integers")
        for i, x in enumerate(v):
            if not lo <= x <= hi:
                self.fail(f"{key}[{i}]", f"must be {lo}..{hi}, not {x}")
        return v


def _key(text: str, r: _Reader, name: str) -> bytes:
    """hex:..., base64:..., or the text itself (UTF-8); at least 16 bytes."""
    try:
        if text.startswith("hex:"):
            key = binascii.unhexlify(text[4:])
        elif text.startswith("base64:"):
            key = base64.b64decode(text[7:], validate=True)
        else:
            key = text.encode()
    except (binascii.Error, ValueError):
        r.fail(name, "not valid hex or base64 after its prefix")
    if len(key) < MIN_KEY_BYTES:
        r.fail(name, f"must be at least {MIN_KEY_BYTES} bytes (got {len(key)})")
    return key


def _address(text: str, r: _Reader, name: str) -> None:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        r.fail(name, f"not an IP address: {text!r}")


def _peer(text: str, r: _Reader, name: str, default_port: int) -> tuple:
    """'host', 'host:port' or '[v6]:port'."""
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\](?::(\d+))?$", text) or re.match(r"^([^:\[\]]+)(?::(\d+))?$", text)
    if not m:
        try:  # a bare IPv6 address
            ipaddress.IPv6Address(text)
            return (text, default_port)
        except ValueError:
            r.fail(name, f"not host, host:port or [v6]:port: {text!r}")
    host, port = m.group(1), int(m.group(2)) if m.group(2) else default_port
    _address(host, r, name)
    if not 1 <= port <= 65535:
        r.fail(name, f"port must be 1..65535, not {port}")
    return (host, port)
