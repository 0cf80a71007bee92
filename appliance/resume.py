"""What the taker asks its own HTTP server, and when its answer may be spliced into a
client's stream (pure functions; the I/O is appliance.localhttp).

Refuse before you touch the client: before it sends a Migrate SYN, a candidate asks its server for the
last byte of the object (`probe_request`) and checks the answer (`check_probe`) against what
the dead replica advertised, at the group's `validators` level:

* ``strict``: the total length, and the ETag and Last-Modified the dead replica sent (each
  when it sent one; a response with neither is advertised reset-only). Catches another
  version of the object whenever the server's validators change with it; cannot catch
  different bytes with the same size, ETag and mtime, and refuses identical copies whose
  ETags differ per host (lighttpd's and Apache's default ETags include the inode).
* ``last-modified``: the total length and Last-Modified; ETags are ignored. Right for
  identical copies on several hosts with per-host ETags; cannot catch different bytes with
  the same size and mtime.
* ``digest``: the total length and the sha-256 of the whole object: the dead replica
  advertised it (its server appliance hashes its docroot ahead of need, or its server sent a
  Repr-Digest), and the taker's own copy must have the same. Different bytes are never
  spliced, whatever the headers say.

Then, once the client's position is known, the real request is for exactly the rest
(`range_request`) and its head is checked again (`check_range_head`): a 206 for exactly that
range, with the same validators.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["Refused", "range_request", "whole_request", "probe_request", "check_probe", "check_range_head",
           "CONTENT_RANGE", "VALIDATORS"]

VALIDATORS = ("strict", "last-modified", "digest")
CONTENT_RANGE = re.compile(r"\s*bytes\s+(\d+)-(\d+)/(\d+)\s*\Z", re.I)


class Refused(Exception):
    """The takeover must not continue; str() is the reason."""


def _host(entry, default: str) -> str:
    host = getattr(entry.object, "host", "") if entry.object is not None else ""
    return host or default


def range_request(entry, offset: int, host_default: str) -> bytes:
    """GET <path> with Range: bytes=<offset>-<last of A's response>, keep-alive."""
    last = entry.body_offset + entry.body_length - 1
    return (f"GET {entry.object.path} HTTP/1.1\r\nHost: {_host(entry, host_default)}\r\n"
            f"Range: bytes={offset}-{last}\r\nConnection: keep-alive\r\n\r\n").encode("latin-1")


def whole_request(entry, host_default: str) -> bytes:
    """The original request again (its Range, if any), keep-alive."""
    rng = f"Range: {entry.req_range}\r\n" if entry.req_range else ""
    return (f"GET {entry.object.path} HTTP/1.1\r\nHost: {_host(entry, host_default)}\r\n{rng}"
            f"Connection: keep-alive\r\n\r\n").encode("latin-1")


def probe_request(entry, host_default: str) -> bytes:
    """The object's last byte: enough to see the server's total length and validators."""
    last = max(0, entry.object.total_length - 1)
    return (f"GET {entry.object.path} HTTP/1.1\r\nHost: {_host(entry, host_default)}\r\n"
            f"Range: bytes={last}-{last}\r\nConnection: keep-alive\r\n\r\n").encode("latin-1")


def _validators(h: dict, obj, validators: str, local_digest: Optional[bytes]) -> Optional[str]:
    if validators == "digest":
        if obj.digest is None:
            return "digest: the dead replica advertised none"
        if local_digest is None:
            return "digest: this replica does not know the digest of its copy"
        if local_digest != obj.digest:
            return "digest: this replica's copy has other bytes"
        return None
    if validators == "strict" and obj.etag is not None and h.get("etag") != obj.etag:
        return f"etag: local {h.get('etag')!r} differs from A's {obj.etag!r}"
    if obj.last_modified is not None and h.get("last-modified") != obj.last_modified:
        return f"last-modified: local {h.get('last-modified')!r} differs from A's {obj.last_modified!r}"
    return None


def check_probe(head, entry, validators: str = "strict", local_digest: Optional[bytes] = None) -> Optional[str]:
    """Why this replica cannot serve the rest of entry's object (from its answer to
    probe_request()), or None."""
    obj = entry.object
    h = head.headers
    if head.status != 206:
        return f"status: local server answered {head.status}, not 206"
    m = CONTENT_RANGE.match(h.get("content-range", ""))
    if not m:
        return f"content-range: unusable ({h.get('content-range')!r})"
    total = int(m.group(3))
    if total != obj.total_length:
        return f"total: the local object has {total} bytes, A's had {obj.total_length}"
    return _validators(h, obj, validators, local_digest)


def check_range_head(head, entry, offset: int, validators: str = "strict",
                     local_digest: Optional[bytes] = None) -> Optional[str]:
    """Why the local answer to range_request() must not be spliced into the client's stream,
    or None: it must be a 206 for exactly [offset, A's last byte] of an object with A's total
    length and validators, with that Content-Length."""
    obj = entry.object
    last = entry.body_offset + entry.body_length - 1
    count = last - offset + 1
    h = head.headers
    if head.status != 206:
        return f"status: local server answered {head.status}, not 206"
    if "transfer-encoding" in h:
        return f"transfer-encoding: local response is {h['transfer-encoding']}"
    m = CONTENT_RANGE.match(h.get("content-range", ""))
    if not m:
        return f"content-range: unusable ({h.get('content-range')!r})"
    first, end, total = (int(x) for x in m.groups())
    if total != obj.total_length:
        return f"total: the local object has {total} bytes, A's had {obj.total_length}"
    if first != offset:
        return f"first byte: the local range starts at {first}, not {offset}"
    if end != last:
        return f"last byte: the local range ends at {end}, not {last}"
    if h.get("content-length") != str(count):
        return f"content-length: {h.get('content-length')!r}, not {count}"
    return _validators(h, obj, validators, local_digest)
