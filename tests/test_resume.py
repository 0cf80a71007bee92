"""appliance.resume: the requests a taker sends its own server, and the rules by which the
answer may be spliced into a client's stream, at each validators level (strict,
last-modified, digest)."""

from __future__ import annotations

import hashlib
import socket

import pytest

from appliance import localhttp
from appliance.resume import check_probe, check_range_head, probe_request, range_request, whole_request
from appliance.sync import Entry, ObjectRef

LM = "Mon, 01 Jan 2024 00:00:00 GMT"
OBJ = ObjectRef("h", "/f.bin", '"e1"', LM, 10000)


def make_entry(**kw) -> Entry:
    base = dict(client_ip=socket.inet_aton("10.0.0.1"), client_port=40000, server_ip=socket.inet_aton("10.0.0.2"),
                server_port=80, ni=1000, na=50000, c_mss=1460, c_wscale=7, c_sack=True, c_ts=True, s_mss=1460,
                s_wscale=9, s_sack=True, s_ts=True, mp=True, reqno=0, state="ACTIVE", object=OBJ, req_range=None,
                status=200, body_start=50201, body_offset=0, body_length=10000)
    base.update(kw)
    return Entry(**base)


def head(status=206, cr="bytes 100-9999/10000", cl="9900", etag='"e1"', lm=LM, extra=""):
    lines = [f"HTTP/1.1 {status} X"]
    for name, value in (("Content-Range", cr), ("Content-Length", cl), ("ETag", etag), ("Last-Modified", lm)):
        if value is not None:
            lines.append(f"{name}: {value}")
    return localhttp.parse_head(("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode())


def test_requests():
    e = make_entry(body_offset=1000, body_length=5000, status=206, req_range="bytes=1000-5999")
    assert range_request(e, 1500, "b") == (b"GET /f.bin HTTP/1.1\r\nHost: h\r\nRange: bytes=1500-5999\r\n"
                                           b"Connection: keep-alive\r\n\r\n")
    assert b"Range: bytes=1000-5999\r\n" in whole_request(e, "b")
    e2 = make_entry(object=ObjectRef("", "/x", None, None, 10))
    assert b"Host: b\r\n" in whole_request(e2, "b") and b"Range" not in whole_request(e2, "b")
    assert b"Range: bytes=9999-9999\r\n" in probe_request(e, "b")  # the object's last byte


@pytest.mark.parametrize("h, reason", [
    (head(status=200, cr=None, cl="10000"), "status: local server answered 200"),
    (head(status=416, cr="bytes */10000", cl="0"), "status: local server answered 416"),
    (head(cr="bytes 101-9999/10000", cl="9899"), "first byte:"),
    (head(cr="bytes 100-9998/10000", cl="9899"), "last byte:"),
    (head(cr="bytes 100-9999/20000"), "total:"),
    (head(cr=None), "content-range:"),
    (head(cl="9000"), "content-length:"),
    (head(cl=None, extra="Transfer-Encoding: chunked\r\n"), "transfer-encoding:"),
    (head(etag='W/"e1"'), "etag:"),
    (head(etag=None), "etag:"),
    (head(lm=None), "last-modified:"),
])
def test_206_rules(h, reason):
    why = check_range_head(h, make_entry(), 100)
    assert why is not None and why.startswith(reason), why
    assert check_range_head(head(), make_entry(), 100) is None


def test_unparsable_heads_are_local_errors():
    for raw in (b"garbage\r\n\r\n", b"HTTP/1.1 206 X\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"):
        with pytest.raises(localhttp.LocalError, match="unparsable"):
            localhttp.parse_head(raw)


def test_validators_levels():
    """strict checks both validators the dead replica sent; last-modified ignores ETags
    (identical copies whose ETags include the inode); digest ignores both and compares bytes."""
    e = make_entry()
    inode_etag = head(etag='"2ac1-2710-656b5400"')
    assert check_range_head(inode_etag, e, 100, "strict").startswith("etag:")
    assert check_range_head(inode_etag, e, 100, "last-modified") is None
    other_mtime = head(lm="Tue, 02 Jan 2024 00:00:00 GMT")
    assert check_range_head(other_mtime, e, 100, "last-modified").startswith("last-modified:")
    d = hashlib.sha256(b"the bytes").digest()
    ed = make_entry(object=ObjectRef("h", "/f.bin", '"e1"', LM, 10000, d))
    assert check_range_head(other_mtime, ed, 100, "digest", d) is None  # same bytes, whatever the headers say
    assert check_range_head(head(), ed, 100, "digest", hashlib.sha256(b"other").digest()) \
        == "digest: this replica's copy has other bytes"
    assert check_range_head(head(), ed, 100, "digest", None).startswith("digest: this replica does not know")
    assert check_range_head(head(), e, 100, "digest", d) == "digest: the dead replica advertised none"
    assert check_range_head(head(cr="bytes 100-9999/9999", cl="9900"), ed, 100, "digest", d).startswith("total:")


def test_probe_rules():
    e = make_entry()
    probe = head(cr="bytes 9999-9999/10000", cl="1")
    assert check_probe(probe, e) is None
    assert check_probe(head(status=200, cr=None, cl="10000"), e).startswith("status:")
    assert check_probe(head(cr="bytes 9999-9999/12000", cl="1"), e).startswith("total:")
    assert check_probe(head(cr="bytes 9999-9999/10000", cl="1", etag='"x"'), e).startswith("etag:")
    assert check_probe(head(cr="bytes 9999-9999/10000", cl="1", etag='"x"'), e, "last-modified") is None
