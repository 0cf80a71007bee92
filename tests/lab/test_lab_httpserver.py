"""appliance.httpserver on 127.0.0.1 in a thread: status codes, ranges, validators, keep-alive.

No namespaces needed. Bodies are checked against appliance.docroot.expected_bytes (computed
independently of the file the server reads).
"""

from __future__ import annotations

import email.utils
import http.client
import os
import socket
import threading
import time

import pytest

from appliance import docroot, httpserver

SIZE = 100 * 1024
NAME = "/obj-100k"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("http")
    root = base / "root"
    root.mkdir()
    os.environ["APPLIANCE_DOCROOT"] = str(root)
    try:
        docroot.ensure(["100k", "1k"])
    finally:
        del os.environ["APPLIANCE_DOCROOT"]
    (base / "secret").write_text("outside the docroot\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner").write_bytes(b"inner file\n")
    os.symlink(base / "secret", root / "escape")
    srv = httpserver.make_server(root, "127.0.0.1", 0, idle_timeout=10)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


def request(srv, method="GET", path=NAME, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        body = resp.read()
        return resp, body
    finally:
        conn.close()


BODY = docroot.expected_bytes("100k")


def test_get_200(server):
    resp, body = request(server)
    assert resp.status == 200
    assert body == BODY
    assert resp.getheader("Content-Length") == str(SIZE)
    assert resp.getheader("Accept-Ranges") == "bytes"
    assert resp.getheader("Content-Range") is None


def test_head(server):
    resp, body = request(server, "HEAD")
    assert resp.status == 200
    assert body == b""
    assert resp.getheader("Content-Length") == str(SIZE)
    assert resp.getheader("ETag") and resp.getheader("Last-Modified")


@pytest.mark.parametrize("spec,first,last", [
    ("bytes=100-199", 100, 199),
    ("bytes=1000-", 1000, SIZE - 1),
    ("bytes=-500", SIZE - 500, SIZE - 1),
    ("bytes=0-0", 0, 0),
    ("bytes=102000-999999", 102000, SIZE - 1),   # end past the size: clamped
    ("bytes=-999999", 0, SIZE - 1),              # suffix longer than the body: all of it
    ("bytes=%d-%d" % (SIZE - 1, SIZE - 1), SIZE - 1, SIZE - 1),
])
def test_range_206(server, spec, first, last):
    resp, body = request(server, headers={"Range": spec})
    assert resp.status == 206
    assert body == BODY[first:last + 1]
    assert resp.getheader("Content-Length") == str(last - first + 1)
    assert resp.getheader("Content-Range") == f"bytes {first}-{last}/{SIZE}"


def test_head_range(server):
    resp, body = request(server, "HEAD", headers={"Range": "bytes=10-19"})
    assert resp.status == 206 and body == b""
    assert resp.getheader("Content-Range") == f"bytes 10-19/{SIZE}"


@pytest.mark.parametrize("spec", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 10}", "bytes=-0"])
def test_range_416(server, spec):
    resp, body = request(server, headers={"Range": spec})
    assert resp.status == 416
    assert resp.getheader("Content-Range") == f"bytes */{SIZE}"
    assert resp.getheader("Content-Length") == str(len(body))


@pytest.mark.parametrize("spec", ["bytes=0-1,5-6", "bytes=5-2", "items=0-5", "bytes=abc", "bytes=-"])
def test_range_ignored_200(server, spec):
    resp, body = request(server, headers={"Range": spec})
    assert resp.status == 200
    assert body == BODY


def test_validators(server):
    resp, _ = request(server, "HEAD")
    st = os.stat(os.path.join(server.root, NAME[1:]))
    assert st.st_mtime == docroot.MTIME
    assert resp.getheader("ETag") == f'"{docroot.MTIME:x}-{SIZE:x}"'
    assert resp.getheader("Last-Modified") == email.utils.formatdate(docroot.MTIME, usegmt=True)
    resp2, _ = request(server, "HEAD")
    assert resp2.getheader("ETag") == resp.getheader("ETag")
    assert resp2.getheader("Last-Modified") == resp.getheader("Last-Modified")


def test_if_range(server):
    etag = f'"{docroot.MTIME:x}-{SIZE:x}"'
    lm = email.utils.formatdate(docroot.MTIME, usegmt=True)
    older = email.utils.formatdate(docroot.MTIME - 10, usegmt=True)
    for value, status in ((etag, 206), ('"nope-1"', 200), ("W/" + etag, 200), (lm, 206), (older, 200),
                          ("garbage", 200)):
        resp, body = request(server, headers={"Range": "bytes=10-19", "If-Range": value})
        assert resp.status == status, value
        assert body == (BODY[10:20] if status == 206 else BODY)


def _read_response(f):
    status = f.readline()
    headers = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    body = f.read(int(headers["content-length"]))
    return status, headers, body


def test_keepalive_two_requests_one_connection(server):
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
        f = s.makefile("rb")
        s.sendall(f"GET {NAME} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, body = _read_response(f)
        assert status.startswith(b"HTTP/1.1 200") and body == BODY
        assert headers.get("connection", "keep-alive").lower() != "close"
        s.sendall(b"GET /obj-1k HTTP/1.1\r\nHost: x\r\nRange: bytes=-24\r\n\r\n")
        status, headers, body = _read_response(f)
        assert status.startswith(b"HTTP/1.1 206")
        assert body == docroot.expected_bytes("1k")[-24:]
        s.sendall(b"HEAD /obj-1k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, _ = _read_response_head_only(f)
        assert status.startswith(b"HTTP/1.1 200")
        assert f.read() == b""  # server closed after Connection: close


def _read_response_head_only(f):
    status = f.readline()
    headers = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode().partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, b""


@pytest.mark.parametrize("path", ["/../secret", "/%2e%2e/secret", "/sub/../../secret", "/escape", "/sub",
                                  "/missing", "/sub/%00x", "/.."])
def test_not_found_and_traversal(server, path):
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 404"), data[:100]
    assert b"outside the docroot" not in data


def test_subdirectory_file_served(server):
    resp, body = request(server, path="/sub/inner")
    assert resp.status == 200 and body == b"inner file\n"


def test_post_not_implemented(server):
    resp, _ = request(server, "POST")
    assert resp.status == 501


def test_parse_range_unit():
    p = httpserver.parse_range
    assert p(None, 10) is None
    assert p("bytes=0-4", 10) == (0, 4)
    assert p("bytes=8-", 10) == (8, 9)
    assert p("bytes=-3", 10) == (7, 9)
    assert p("bytes=10-", 10) == "unsatisfiable"
    assert p("bytes=0-", 0) == "unsatisfiable"
    assert p("bytes=1-2, 4-5", 10) is None
    assert p("BYTES=1-2", 10) == (1, 2)


# -- test knobs: ?chunked=1 and ?delay_ms=N ------------------------------------------------


def _read_chunked(f):
    """Read a chunked body from `f`; returns (chunk sizes, body)."""
    sizes, body = [], b""
    for _ in range(10000):
        line = f.readline()
        n = int(line.split(b";")[0].strip(), 16)
        sizes.append(n)
        if n == 0:
            assert f.readline() == b"\r\n"  # no trailers
            return sizes, body
        body += f.read(n)
        assert f.read(2) == b"\r\n"
    raise AssertionError("too many chunks")


def test_chunked_get(server):
    resp, body = request(server, path=NAME + "?chunked=1")
    assert resp.status == 200
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.getheader("Content-Length") is None
    assert body == BODY
    plain, _ = request(server, "HEAD")
    assert resp.getheader("ETag") == plain.getheader("ETag")
    assert resp.getheader("Last-Modified") == plain.getheader("Last-Modified")


def test_chunked_raw_64k_chunks_range_ignored_keepalive(server):
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as s:
        f = s.makefile("rb")
        s.sendall(f"GET {NAME}?chunked=1 HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\n\r\n".encode())
        status, headers, _ = _read_response_head_only(f)
        assert status.startswith(b"HTTP/1.1 200")
        assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
        assert "content-range" not in headers
        sizes, body = _read_chunked(f)
        assert sizes == [65536, SIZE - 65536, 0]
        assert body == BODY
        # the connection stays usable: a normal request on it
        s.sendall(b"GET /obj-1k HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = _read_response(f)
        assert status.startswith(b"HTTP/1.1 200") and body == docroot.expected_bytes("1k")


def test_chunked_head(server):
    resp, body = request(server, "HEAD", path=NAME + "?chunked=1")
    assert resp.status == 200 and body == b""
    assert resp.getheader("Transfer-Encoding") == "chunked" and resp.getheader("Content-Length") is None


def _time_to_head(srv, path):
    with socket.create_connection(("127.0.0.1", srv.server_port), timeout=10) as s:
        f = s.makefile("rb")
        t0 = time.monotonic()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status = f.readline()
        elapsed = time.monotonic() - t0
        rest = f.read()
    return status, elapsed, rest


def test_delay_ms(server):
    status, elapsed, rest = _time_to_head(server, "/obj-1k?delay_ms=300")
    assert status.startswith(b"HTTP/1.1 200")
    assert elapsed >= 0.3
    assert rest.endswith(docroot.expected_bytes("1k"))
    status, elapsed, _ = _time_to_head(server, "/obj-1k?delay_ms=0")
    assert status.startswith(b"HTTP/1.1 200") and elapsed < 0.3


def test_delay_and_chunked_combined(server):
    t0 = time.monotonic()
    resp, body = request(server, path=NAME + "?chunked=1&delay_ms=200")
    assert time.monotonic() - t0 >= 0.2
    assert resp.getheader("Transfer-Encoding") == "chunked" and body == BODY


def test_query_ignored_when_resolving(server):
    resp, body = request(server, path="/obj-1k?x=1&chunked=0")
    assert resp.status == 200 and body == docroot.expected_bytes("1k")
    assert resp.getheader("Content-Length") == "1024"
    resp, _ = request(server, path="/missing?chunked=1")
    assert resp.status == 404


@pytest.mark.parametrize("query", ["chunked=yes", "chunked=", "delay_ms=-1", "delay_ms=60001", "delay_ms=abc",
                                   "delay_ms=1.5"])
def test_bad_knobs_400(server, query):
    resp, _ = request(server, path=f"/obj-1k?{query}")
    assert resp.status == 400


def test_parse_knobs_unit():
    k = httpserver.parse_knobs
    assert k("") == {"chunked": False, "delay_ms": 0}
    assert k("chunked=1&delay_ms=60000&other=z") == {"chunked": True, "delay_ms": 60000}
    with pytest.raises(ValueError):
        k("delay_ms=99999")
