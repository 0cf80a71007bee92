"""The stream mapper, in memory: frames built with `_fastpath.build_tcp`, `now` injected.

The engine is used only through `_fastpath`, so these tests run on whichever build is
loaded (CI runs the suite once compiled and once with APPLIANCE_PUREPYTHON=1).
"""

import json

import pytest

import _fastpath as fp
from appliance.streammap import (
    ByteRange, ContentRange, StreamMapper, parse_content_range, parse_range,
)

C4, S4 = "10.1.0.2", "10.1.0.1"
C6, S6 = "2001:db8:1::2", "2001:db8:1::1"
MACS = {"eth_src": "02:00:00:00:00:0c", "eth_dst": "02:00:00:00:00:05"}
PA = fp.PSH | fp.ACK


def client_syn_options(tsval=111, mss=1460, wscale=7, migrate=True):
    opts = (fp.opt_mss(mss) + fp.opt_sack_permitted() + fp.opt_timestamps(tsval, 0)
            + bytes((fp.OPT_NOP,)) + fp.opt_wscale(wscale))
    if migrate:
        opts += fp.aligned_option(fp.opt_migrate_permitted())
    return opts


class Flow:
    """One TCP connection's frames, both directions, with sequence numbers tracked."""

    def __init__(self, client=C4, server=S4, cport=40000, sport=80, ni=1000, na=5000, link_eth=True):
        self.client, self.server, self.cport, self.sport = client, server, cport, sport
        self.ni, self.na = ni, na
        self.c_next = fp.seq_add(ni, 1)
        self.s_next = fp.seq_add(na, 1)
        self.kw = dict(MACS) if link_eth else {}
        self.c_ts, self.s_ts = 111, 999

    def _c(self, seq, ack, flags, payload=b"", options=b"", window=502):
        return fp.build_tcp(self.client, self.server, self.cport, self.sport, seq, ack, flags, window,
                            options, payload, **self.kw)

    def _s(self, seq, ack, flags, payload=b"", options=b"", window=509):
        return fp.build_tcp(self.server, self.client, self.sport, self.cport, seq, ack, flags, window,
                            options, payload, **self.kw)

    def syn(self, options=None):
        return self._c(self.ni, 0, fp.SYN, options=client_syn_options() if options is None else options,
                       window=64240)

    def synack(self, options=None):
        if options is None:
            options = (fp.opt_mss(1400) + fp.opt_sack_permitted() + fp.opt_timestamps(self.s_ts, self.c_ts)
                       + bytes((fp.OPT_NOP,)) + fp.opt_wscale(9))
        return self._s(self.na, fp.seq_add(self.ni, 1), fp.SYN | fp.ACK, options=options, window=65160)

    def ts(self, side):
        if side == "c":
            self.c_ts += 1
            return bytes((fp.OPT_NOP, fp.OPT_NOP)) + fp.opt_timestamps(self.c_ts, self.s_ts)
        self.s_ts += 1
        return bytes((fp.OPT_NOP, fp.OPT_NOP)) + fp.opt_timestamps(self.s_ts, self.c_ts)

    def c(self, payload=b"", flags=PA, seq=None, advance=True):
        """A client segment; by default at the next client seq, which then advances."""
        s = self.c_next if seq is None else seq
        f = self._c(s, self.s_next, flags, payload, self.ts("c"))
        if seq is None and advance:
            self.c_next = fp.seq_add(self.c_next, len(payload) + (1 if flags & fp.FIN else 0))
        return f

    def s(self, payload=b"", flags=PA, seq=None):
        s = self.s_next if seq is None else seq
        f = self._s(s, self.c_next, flags, payload, self.ts("s"))
        if seq is None:
            self.s_next = fp.seq_add(self.s_next, len(payload) + (1 if flags & fp.FIN else 0))
        return f

    def skip_server(self, n):
        """Body bytes the tap never sees (its filter drops them)."""
        self.s_next = fp.seq_add(self.s_next, n)


def feed(m, frames, now=1.0, **kw):
    events = []
    for f in frames:
        events += m.handle_frame(f, now, **kw)
    return events


def kinds(events):
    return [e.kind for e in events]


def open_conn(m, flow, now=1.0):
    """The three-way handshake (the client's ACK completes it: conn_established)."""
    return feed(m, [flow.syn(), flow.synack(), flow.c(b"", flags=fp.ACK)], now)


def get(path="/a", host="example.test", extra=b""):
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\nUser-Agent: t\r\n" + extra + b"\r\n"


def ok_head(length, status=b"200 OK", extra=b""):
    return (b"HTTP/1.1 " + status + b"\r\nServer: t\r\nContent-Length: " + str(length).encode()
            + b"\r\nETag: \"abc-123\"\r\nLast-Modified: Thu, 26 Nov 2026 10:00:00 GMT\r\n" + extra + b"\r\n")


def exchange(m, flow, request, head, body_len, now=2.0, body_in_head_segment=b""):
    """Client sends request; server's head segment (optionally with body bytes), rest unseen."""
    events = feed(m, [flow.c(request)], now)
    head_seq = flow.s_next
    events += feed(m, [flow.s(head + body_in_head_segment)], now)
    flow.skip_server(body_len - len(body_in_head_segment))
    return events, head_seq


def jsonable(obj):
    return json.loads(json.dumps(obj))


# --- handshake ---------------------------------------------------------------------------


def test_handshake_records_both_sides_options_and_migrate_permitted():
    m = StreamMapper(service_ports={80})
    flow = Flow()
    ev = feed(m, [flow.syn()], 1.0)
    assert ev == []
    (conn,) = m.connections()
    assert conn.state == "syn_sent" and conn.ni == 1000 and conn.na is None
    ev = feed(m, [flow.synack()], 1.5)
    assert kinds(ev) == ["conn_open"]
    assert conn.state == "established" and conn.na == 5000
    co, so = conn.client_options, conn.server_options
    assert (co.mss, co.wscale, co.sack_permitted, co.timestamps, co.tsval) == (1460, 7, True, True, 111)
    assert (so.mss, so.wscale, so.sack_permitted, so.timestamps, so.tsval, so.tsecr) == (1400, 9, True, True, 999, 111)
    assert conn.migrate_permitted and conn.mp_curve == 0
    assert (conn.client_ip, conn.client_port, conn.server_ip, conn.server_port) == (C4, 40000, S4, 80)
    d = ev[0].to_dict()
    assert d["ni"] == 1000 and d["na"] == 5000 and d["migrate_permitted"] is True
    assert d["client_options"]["wscale"] == 7 and d["server_options"]["mss"] == 1400
    assert jsonable(d) == d and "t" not in d and "event" not in d
    assert conn.last_server.tsval == 999 and conn.last_server.ack == 1001 and conn.last_server.t == 1.5
    assert conn.last_client.ack is None  # a SYN carries no ACK


def test_syn_without_options_or_migrate_permitted():
    m = StreamMapper()
    flow = Flow()
    feed(m, [flow.syn(options=b""), flow.synack(options=fp.opt_mss(536))])
    (conn,) = m.connections()
    assert not conn.migrate_permitted and conn.mp_curve is None
    assert conn.client_options.mss is None and conn.client_options.wscale is None
    assert not conn.client_options.timestamps and conn.client_options.tsval is None
    assert conn.server_options.mss == 536 and not conn.server_options.sack_permitted


def test_retransmitted_syn_and_synack_are_ignored_and_mismatch_counted():
    m = StreamMapper()
    flow = Flow()
    ev = feed(m, [flow.syn(), flow.syn(), flow.synack(), flow.synack()])
    assert kinds(ev) == ["conn_open"]
    c = m.counters()
    assert c["syn_retransmits"] == 1 and c["synack_retransmits"] == 1
    # a SYN/ACK that does not acknowledge Ni + 1 does not open anything
    other = Flow(cport=40001)
    feed(m, [other.syn()])
    bad = fp.build_tcp(S4, C4, 80, 40001, 7, 12345, fp.SYN | fp.ACK, **MACS)
    assert feed(m, [bad]) == []
    assert m.counters()["synack_mismatch"] == 1
    assert m.get(C4, 40001, S4, 80).state == "syn_sent"


def test_a_half_open_connection_is_never_advertised():
    """A SYN flood's connections (SYN, SYN/ACK, then the client's RST or nothing) are not
    worth advertising: only the client's ACK of the SYN/ACK makes an entry."""
    from appliance.sync import entry_from_connection
    m = StreamMapper()
    flow = Flow()
    assert kinds(feed(m, [flow.syn(), flow.synack()])) == ["conn_open"]
    conn = m.get(C4, 40000, S4, 80)
    assert entry_from_connection(conn) is None and not conn.client_acked
    assert kinds(feed(m, [flow.c(b"", flags=fp.ACK)])) == ["conn_established"]
    assert conn.client_acked and entry_from_connection(conn).state == "IDLE"


def test_synack_without_syn_opens_with_ni_from_its_ack():
    m = StreamMapper()
    flow = Flow(ni=777)
    ev = feed(m, [flow.synack()])
    assert kinds(ev) == ["conn_open"]
    conn = m.get(C4, 40000, S4, 80)
    assert conn.ni == 777 and conn.client_options is None and not conn.syn_seen
    ev, head_seq = exchange(m, flow, get("/x"), ok_head(10), 10)
    assert kinds(ev) == ["conn_established", "request", "response_start"]  # its data acks the SYN/ACK
    assert ev[1].request.start_seq == 778


# --- one request -------------------------------------------------------------------------


def test_get_with_200_records_request_and_body_start():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    req = get("/video.mp4", extra=b"Accept: */*\r\n")
    head = ok_head(123456, extra=b"Content-Type: video/mp4\r\n")
    ev, head_seq = exchange(m, flow, req, head, 123456)
    assert kinds(ev) == ["request", "response_start"]
    r = ev[0].request
    assert (r.method, r.host, r.path, r.version, r.raw, r.start_seq) == (
        "GET", "example.test", "/video.mp4", "1.1", req, 1001)
    assert r.range is None and r.range_raw is None and r.keep_alive
    resp = ev[1].response
    assert ev[1].request is r and r.response is resp
    assert resp.status == 200 and resp.content_length == 123456 and resp.resumable
    assert resp.etag == '"abc-123"' and resp.last_modified == "Thu, 26 Nov 2026 10:00:00 GMT"
    assert resp.content_type == "video/mp4" and resp.transfer_encoding is None
    assert resp.head_seq == head_seq == 5001
    assert resp.head_len == len(head)
    assert resp.body_start == fp.seq_add(head_seq, len(head))
    assert resp.body_end == fp.seq_add(resp.body_start, 123456)
    d = ev[1].to_dict()
    assert jsonable(d) == d
    assert d["response"]["body_start"] == 5001 + len(head) and d["request"]["raw"] == req.decode()
    assert d["ni"] == 1000 and d["na"] == 5000
    conn = m.connections()[0]
    assert conn.current is r
    cd = conn.to_dict()
    assert jsonable(cd) == cd and cd["requests"][0]["response"]["status"] == 200 and cd["current"] == 0


def test_head_segment_carrying_body_bytes_too():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    head = ok_head(5000)
    ev, head_seq = exchange(m, flow, get(), head, 5000, body_in_head_segment=b"B" * 1000)
    resp = ev[1].response
    assert resp.body_start == fp.seq_add(head_seq, len(head)) and resp.resumable


# --- keep-alive --------------------------------------------------------------------------


def test_keep_alive_three_requests_each_matched_with_its_response():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    sizes = [1000, 250000, 17]
    heads, starts = [], []
    for i, n in enumerate(sizes):
        starts.append(flow.c_next)
        head = ok_head(n, extra=b"X-N: %d\r\n" % i)
        heads.append(head)
        ev, head_seq = exchange(m, flow, get(f"/f{i}"), head, n, now=2.0 + i)
        assert kinds(ev) == ["request", "response_start"]
        assert ev[0].request.index == i and ev[0].request.path == f"/f{i}"
        assert ev[1].request.path == f"/f{i}" and ev[1].response.content_length == n
        assert ev[1].response.body_start == fp.seq_add(head_seq, len(head))
    conn = m.connections()[0]
    assert [r.path for r in conn.requests] == ["/f0", "/f1", "/f2"]
    assert [r.start_seq for r in conn.requests] == starts
    assert conn.current.path == "/f2" and conn.requests_total == 3 and conn.responses_total == 3


def test_pipelined_requests_in_one_segment_and_a_post_body():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    r1 = get("/one")
    r2 = b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\n"
    body = b"a=1\r\nb=2\r\nc"
    r3 = b"\r\n" + get("/three")  # a stray CRLF before a request line is allowed
    ev = feed(m, [flow.c(r1 + r2 + body + r3)])
    assert [e.request.path for e in ev] == ["/one", "/form", "/three"]
    base = 1001
    assert [e.request.start_seq for e in ev] == [base, base + len(r1), base + len(r1 + r2 + body) + 2]
    assert ev[1].request.raw == r2 and ev[2].request.raw == get("/three")
    # responses come back in order
    ev = []
    for n in (10, 20, 30):
        ev += feed(m, [flow.s(ok_head(n))])
        flow.skip_server(n)
    assert [e.request.path for e in ev] == ["/one", "/form", "/three"]


def test_request_with_body_split_across_segments():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    r1 = b"PUT /up HTTP/1.1\r\nHost: h\r\nContent-Length: 3000\r\n\r\n"
    body = bytes(range(256)) * 11 + b"\n" * 184
    assert len(body) == 3000
    ev = feed(m, [flow.c(r1 + body[:1000]), flow.c(body[1000:2500]), flow.c(body[2500:] + get("/next"))])
    assert [e.request.path for e in ev] == ["/up", "/next"]
    assert ev[1].request.start_seq == 1001 + len(r1) + 3000


def test_chunked_request_body_then_next_request():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    r1 = b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"5\r\nhe\nlo\r\n0\r\n\r\n"
    ev = feed(m, [flow.c(r1 + body[:7]), flow.c(body[7:] + get("/after"))])
    assert [e.request.path for e in ev] == ["/c", "/after"]
    assert ev[1].request.start_seq == 1001 + len(r1) + len(body)


# --- reassembly --------------------------------------------------------------------------


@pytest.mark.parametrize("cuts", [(5,), (16, 17), (3, 30, 31), (len(get()) - 1,)])
def test_request_head_split_across_segments(cuts):
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    req = get("/split")
    bounds = [0, *cuts, len(req)]
    ev = []
    for a, b in zip(bounds, bounds[1:]):
        got = feed(m, [flow.c(req[a:b])])
        ev += got
        if b < len(req):
            assert got == []
    assert kinds(ev) == ["request"]
    assert ev[0].request.raw == req and ev[0].request.start_seq == 1001


def test_out_of_order_and_duplicate_client_segments():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    req = get("/ooo") + get("/second")
    parts = [req[:20], req[20:45], req[45:]]
    seqs = [fp.seq_add(1001, 0), fp.seq_add(1001, 20), fp.seq_add(1001, 45)]
    frames = [flow.c(p, seq=s) for p, s in zip(parts, seqs)]
    flow.c_next = fp.seq_add(1001, len(req))
    ev = feed(m, [frames[2], frames[1], frames[2]])  # two ahead of the hole, one twice
    assert ev == []
    assert m.connections()[0].stream.ooo_bytes == len(parts[1]) + len(parts[2])
    ev = feed(m, [frames[0]])
    assert [e.request.path for e in ev] == ["/ooo", "/second"]
    ev = feed(m, frames)  # all retransmitted
    assert ev == []
    overlap = flow.c(req[10:50], seq=fp.seq_add(1001, 10))  # a retransmission overlapping the end
    assert feed(m, [overlap]) == []
    c = m.counters()
    assert c["duplicate_segments"] >= 4 and c["ooo_segments"] == 2 and c["requests"] == 2
    # partial overlap: old bytes trimmed, new bytes parsed
    tail = get("/third")
    f = flow.c(req[-5:] + tail, seq=fp.seq_add(1001, len(req) - 5))
    ev = feed(m, [f])
    assert [e.request.path for e in ev] == ["/third"]
    assert ev[0].request.start_seq == fp.seq_add(1001, len(req)) and ev[0].request.raw == tail


def test_out_of_order_buffer_is_bounded():
    m = StreamMapper(max_ooo_bytes=100)
    flow = Flow()
    open_conn(m, flow)
    ev = feed(m, [flow.c(b"x" * 80, seq=2000), flow.c(b"y" * 80, seq=3000)])
    assert ev == []
    conn = m.connections()[0]
    assert conn.stream.lost == "out-of-order buffer full"
    assert m.counters()["ooo_overflow"] == 1 and m.counters()["streams_lost"] == 1


def test_capture_gap_proven_by_server_ack_loses_the_stream():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    flow.c(get("/missed"))  # built, never captured; c_next moves on
    ev = feed(m, [flow.s(ok_head(10))])
    conn = m.connections()[0]
    assert conn.stream.lost == "capture gap"
    assert kinds(ev) == [] and conn.unmatched_responses == 1
    assert m.counters()["capture_gaps"] == 1


# --- ranges and non-resumable responses ---------------------------------------------------


def test_range_request_with_206():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    req = get("/iso", extra=b"Range: bytes=100-199\r\n")
    head = (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 100-199/1000\r\nContent-Length: 100\r\n"
            b"ETag: \"e1\"\r\n\r\n")
    ev, head_seq = exchange(m, flow, req, head, 100)
    r, resp = ev[1].request, ev[1].response
    assert r.range == ByteRange(100, 199, None) and r.range_raw == "bytes=100-199"
    assert resp.status == 206 and resp.content_range == ContentRange(100, 199, 1000)
    assert resp.content_range_raw == "bytes 100-199/1000" and resp.total_length == 1000
    assert resp.resumable and resp.body_start == fp.seq_add(head_seq, len(head))
    d = ev[1].to_dict()
    assert (d["request"]["range_first"], d["request"]["range_last"], d["request"]["range_suffix"]) == (100, 199, None)
    assert (d["response"]["content_range_first"], d["response"]["content_range_total"]) == (100, 1000)


def test_range_and_content_range_parsing():
    assert parse_range("bytes=0-") == ByteRange(0, None, None)
    assert parse_range("bytes=-500") == ByteRange(None, None, 500)
    assert parse_range(" Bytes = 5-9 ") == ByteRange(5, 9, None)  # recorded leniently
    assert parse_range("bytes=5-9") == ByteRange(5, 9, None)
    assert parse_range("bytes=0-1,5-6") is None
    assert parse_range("bytes=9-5") is None
    assert parse_range("items=0-5") is None
    assert parse_range("bytes=x-5") is None
    assert parse_range(None) is None
    assert parse_content_range("bytes 0-99/1000") == ContentRange(0, 99, 1000)
    assert parse_content_range("bytes 0-99/*") == ContentRange(0, 99, None)
    assert parse_content_range("bytes */1000") == ContentRange(None, None, 1000)
    assert parse_content_range("bytes 0-1000/1000") is None
    assert parse_content_range("bytes 0-99") is None


def test_suffix_range_request_recorded():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    ev = feed(m, [flow.c(get("/x", extra=b"Range: bytes=-500\r\n"))])
    assert ev[0].request.range == ByteRange(None, None, 500)


@pytest.mark.parametrize("head,reason", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "chunked transfer-encoding"),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", "no Content-Length"),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\n", "status 404"),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", "status 304"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Type: multipart/byteranges; boundary=x\r\n"
     b"Content-Length: 300\r\n\r\n", "206 without a single Content-Range"),
    (b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-9/*\r\nContent-Length: 10\r\n\r\n",
     "206 with unknown total length"),
])
def test_not_resumable_responses(head, reason):
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    ev, head_seq = exchange(m, flow, get(), head, 0)
    resp = ev[1].response
    assert not resp.resumable and resp.unresumable_reason == reason
    assert resp.body_start == fp.seq_add(head_seq, len(head))
    assert ev[1].to_dict()["response"]["unresumable_reason"] == reason


def test_head_request_not_resumable():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    req = b"HEAD /big HTTP/1.1\r\nHost: h\r\n\r\n"
    ev, _ = exchange(m, flow, req, ok_head(1 << 30), 0)
    assert ev[1].request.method == "HEAD"
    assert not ev[1].response.resumable and ev[1].response.unresumable_reason == "HEAD request"
    # a HEAD response has no body: the next head follows it at once
    ev, head_seq = exchange(m, flow, get("/after"), ok_head(5), 5)
    assert ev[1].request.path == "/after" and ev[1].response.head_seq == head_seq


def test_response_head_split_across_segments_not_resumable():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    head = ok_head(100)
    ev = feed(m, [flow.c(get())])
    ev = feed(m, [flow.s(head[:30])])
    resp = ev[0].response
    assert not resp.resumable and resp.unresumable_reason == "head split"
    assert resp.status == 200 and resp.head_len is None and resp.body_start is None
    flow.s(head[30:])  # the rest does not start with "HTTP": the filter never shows it


def test_response_head_cut_by_snaplen():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    feed(m, [flow.c(get())])
    head = ok_head(100, extra=b"X-Pad: " + b"p" * 3000 + b"\r\n")
    f = flow.s(head + b"b" * 100)
    ev = m.handle_frame(f[:1000], 3.0, wire_len=len(f))
    assert ev[0].response.unresumable_reason == "head cut by capture"
    assert m.counters()["truncated_frames"] == 1


def test_interim_100_continue_is_skipped():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    req = b"PUT /u HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    feed(m, [flow.c(req)])
    ev = feed(m, [flow.s(b"HTTP/1.1 100 Continue\r\n\r\n")])
    assert ev == [] and m.counters()["interim_responses"] == 1
    feed(m, [flow.c(b"data")])
    head = ok_head(0, status=b"201 Created")
    head_seq = flow.s_next
    ev = feed(m, [flow.s(head)])
    assert ev[0].response.status == 201 and ev[0].response.head_seq == head_seq
    assert ev[0].response.unresumable_reason == "status 201"


def test_body_segment_starting_with_http_is_not_a_response():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    ev, head_seq = exchange(m, flow, get("/doc.txt"), ok_head(10000), 0)
    body_start = ev[1].response.body_start
    fake = flow.s(b"HTTP/1.0 is old\r\n", seq=fp.seq_add(body_start, 4000))
    assert feed(m, [fake]) == []
    assert feed(m, [flow.s(ok_head(10000), seq=head_seq)]) == []  # the head retransmitted
    c = m.counters()
    assert c["body_lookalikes"] == 1 and c["head_retransmits"] == 1 and c["responses"] == 1


def test_large_response_head_snaplen_cut_keeps_body_start():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    feed(m, [flow.c(get())])
    head = ok_head(60000)
    head_seq = flow.s_next
    f = flow.s(head + b"z" * 60000)  # a GSO super-frame: head and whole body
    ev = m.handle_frame(f[:4096], 3.0, wire_len=len(f))
    resp = ev[0].response
    assert resp.resumable and resp.body_start == fp.seq_add(head_seq, len(head))
    assert m.counters()["malformed_total"] == 0


def test_client_segment_cut_by_snaplen_inside_a_body_is_skipped():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    r1 = b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 20000\r\n\r\n"
    f1 = flow.c(r1 + b"q" * 10000)
    f2 = flow.c(b"q" * 10000 + get("/next"))
    ev = m.handle_frame(f1[:600], 2.0, wire_len=len(f1))
    assert [e.request.path for e in ev] == ["/big"]
    ev = m.handle_frame(f2, 2.0)
    assert [e.request.path for e in ev] == ["/next"]
    # cut outside a body: the stream is lost
    f3 = flow.c(get("/a") + get("/b"))
    m.handle_frame(f3[:len(f3) - 10], 2.0, wire_len=len(f3))
    assert m.connections()[0].stream.lost == "client segment cut by capture"


# --- closing -----------------------------------------------------------------------------


def test_fin_from_client_then_server_closes():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    exchange(m, flow, get(), ok_head(10), 10)
    ev = feed(m, [flow.c(flags=fp.FIN | fp.ACK)], 3.0)
    conn = m.get(C4, 40000, S4, 80)
    assert ev == [] and conn.state == "closing" and conn.closed_by == "client"
    ev = feed(m, [flow.s(flags=fp.FIN | fp.ACK)], 3.1)
    assert kinds(ev) == ["conn_close"]
    assert conn.state == "closed" and conn.closed_by == "client" and conn.close_reason == "fin"
    d = ev[0].to_dict()
    assert d["closed_by"] == "client" and d["requests_total"] == 1 and jsonable(d) == d
    assert m.counters()["connections"] == 0 and conn in m.connections()  # recently closed


def test_rst_from_server_closes():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    ev = feed(m, [flow.s(flags=fp.RST | fp.ACK)], 2.0)
    assert kinds(ev) == ["conn_close"]
    conn = ev[0].conn
    assert conn.state == "closed" and conn.closed_by == "server" and conn.close_reason == "rst"


def test_rst_to_a_syn_closes_quietly():
    m = StreamMapper()
    flow = Flow()
    feed(m, [flow.syn()])
    rst = fp.build_tcp(S4, C4, 80, 40000, 0, 1001, fp.RST | fp.ACK, **MACS)
    assert feed(m, [rst]) == []  # never opened: no conn_close
    assert m.connections()[0].state == "closed"


def test_new_syn_on_the_same_tuple_replaces_the_entry():
    """Of a half-open connection; an established one's kernel answers a SYN with a challenge
    ACK and goes on, and so does its entry (a SYN flood hits live ports too)."""
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    again = Flow(ni=900000)
    assert feed(m, [again.syn()]) == [] and m.get(C4, 40000, S4, 80).ni == flow.ni
    assert m.counters()["syns_on_established"] == 1
    m2 = StreamMapper()
    feed(m2, [flow.syn(), flow.synack()])  # the client's ACK not seen: half-open
    ev = feed(m2, [again.syn()])
    assert kinds(ev) == ["conn_close"] and ev[0].conn.close_reason == "reused"
    ev = feed(m2, [again.synack()])
    assert kinds(ev) == ["conn_open"] and m2.get(C4, 40000, S4, 80).ni == 900000


def test_idle_expiry_with_injected_now():
    m = StreamMapper(idle_timeout=30.0, closed_linger=5.0)
    a, b = Flow(cport=1111), Flow(cport=2222)
    open_conn(m, a, now=100.0)
    open_conn(m, b, now=110.0)
    assert m.expire(129.0) == []
    ev = m.expire(131.0)
    assert [e.conn.client_port for e in ev] == [1111]
    assert ev[0].conn.close_reason == "idle" and ev[0].conn.closed_by is None
    # a frame on b keeps it alive; handle_frame runs the expiry itself
    feed(m, [b.c(get())], now=135.0)
    ev = feed(m, [Flow(cport=3333).syn()], now=150.0)
    assert ev == [] and len(m) == 2
    assert [c.client_port for c in m.connections()] == [2222, 3333]  # 1111 lingered 5 s only
    ev = m.expire(170.0)
    assert [e.conn.client_port for e in ev] == [2222]  # 3333 never opened: no event


def test_max_connections_evicts_the_least_recently_seen():
    m = StreamMapper(max_connections=2)
    flows = [Flow(cport=p) for p in (1, 2, 3)]
    open_conn(m, flows[0], 1.0)
    open_conn(m, flows[1], 2.0)
    feed(m, [flows[0].c(get())], 3.0)
    ev = open_conn(m, flows[2], 4.0)
    assert kinds(ev) == ["conn_close", "conn_open", "conn_established"]
    assert ev[0].conn.client_port == 2 and ev[0].conn.close_reason == "evicted"
    assert m.counters()["evicted"] == 1


# --- sequence space, IPv6, link types ----------------------------------------------------


def test_sequence_numbers_across_the_wrap():
    m = StreamMapper()
    flow = Flow(ni=0xFFFFFF00, na=0xFFFFFFF0)
    open_conn(m, flow)
    big = get("/wrap", extra=b"X-Fill: " + b"f" * 300 + b"\r\n")  # crosses 2**32 on the client side
    ev, head_seq = exchange(m, flow, big, ok_head(1000), 1000)
    assert ev[0].request.start_seq == 0xFFFFFF01
    head = ok_head(1000)
    assert head_seq == 0xFFFFFFF1
    assert ev[1].response.body_start == (0xFFFFFFF1 + len(head)) & 0xFFFFFFFF
    ev, head_seq2 = exchange(m, flow, get("/next"), ok_head(7), 7)
    assert ev[0].request.start_seq == (0xFFFFFF01 + len(big)) & 0xFFFFFFFF
    assert head_seq2 == (0xFFFFFFF1 + len(head) + 1000) & 0xFFFFFFFF
    assert ev[1].response.body_start == (head_seq2 + len(ok_head(7))) & 0xFFFFFFFF
    d = m.connections()[0].to_dict()
    for r in d["requests"]:
        assert 0 <= r["start_seq"] < 2 ** 32 and 0 <= r["response"]["body_start"] < 2 ** 32
        assert 0 <= r["response"]["body_end"] < 2 ** 32
    # out of order across the wrap
    m2 = StreamMapper()
    f2 = Flow(ni=0xFFFFFFF0)
    open_conn(m2, f2)
    req = get("/ooo-wrap")
    a = f2.c(req[:40], seq=0xFFFFFFF1)
    b = f2.c(req[40:], seq=(0xFFFFFFF1 + 40) & 0xFFFFFFFF)
    assert feed(m2, [b]) == []
    ev = feed(m2, [a])
    assert ev[0].request.raw == req and ev[0].request.start_seq == 0xFFFFFFF1


def test_ipv6_connection():
    m = StreamMapper(service_ports={8080})
    flow = Flow(client=C6, server=S6, sport=8080)
    ev = open_conn(m, flow)
    assert kinds(ev) == ["conn_open", "conn_established"] and ev[0].conn.ip_version == 6
    assert ev[0].conn.migrate_permitted
    ev, head_seq = exchange(m, flow, get("/six"), ok_head(42), 42)
    assert ev[1].response.body_start == fp.seq_add(head_seq, len(ok_head(42)))
    d = ev[1].to_dict()
    assert d["client"] == C6 and d["server"] == S6 and d["conn"] == f"[{C6}]:40000>[{S6}]:8080"
    assert m.get(C6, 40000, S6, 8080) is ev[1].conn
    ev = feed(m, [flow.c(flags=fp.RST)])
    assert kinds(ev) == ["conn_close"] and ev[0].conn.closed_by == "client"


def test_raw_ip_link_type():
    m = StreamMapper()
    flow = Flow(link_eth=False)
    ev = feed(m, [flow.syn(), flow.synack()], link=fp.LINK_RAW)
    assert kinds(ev) == ["conn_open"]


# --- things that are not ours ------------------------------------------------------------


def test_malformed_frames_counted_not_raised():
    m = StreamMapper()
    flow = Flow()
    good = flow.syn()
    bad_offset = bytearray(good)
    bad_offset[14 + 20 + 12] = 0x20  # TCP data offset 2
    frames = [b"", b"\x01" * 10, good[:20], good[:40], bytes(bad_offset)]
    ev = feed(m, frames)
    assert ev == []
    c = m.counters()
    assert c["malformed"] == {"TRUNCATED_ETHERNET": 2, "TRUNCATED_IP": 1, "BAD_IP_LENGTH": 1,
                              "BAD_TCP_OFFSET": 1}
    assert c["malformed_total"] == 5 and c["frames"] == 5 and c["connections"] == 0


def test_other_traffic_is_counted_and_ignored():
    m = StreamMapper(service_ports={80})
    udp = bytes.fromhex("02000000000502000000000c0800") + bytes.fromhex(
        "4500001c00004000401100000a0100020a010001") + bytes.fromhex("d431003500080000")
    other = Flow(sport=443)
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    stray = Flow(cport=5555).c(get())  # data of a connection whose SYN the tap never saw
    ev = feed(m, [udp, other.syn(), other.synack(), arp, stray])
    assert ev == []
    c = m.counters()
    assert c["non_tcp"] == 2 and c["other_ports"] == 2 and c["untracked"] == 1


def test_garbage_on_the_service_port_loses_only_that_stream():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    ev = feed(m, [flow.c(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n")])
    assert ev == []
    assert m.connections()[0].stream.lost.startswith("request parse error")
    good = Flow(cport=40001)
    open_conn(m, good)
    ev, _ = exchange(m, good, get(), ok_head(3), 3)
    assert kinds(ev) == ["request", "response_start"]


def test_counters_and_snapshot_are_json():
    m = StreamMapper()
    flow = Flow()
    open_conn(m, flow)
    exchange(m, flow, get(), ok_head(10), 10)
    c = m.counters()
    assert jsonable(c) == c and c["requests"] == 1 and c["responses"] == 1 and c["opened"] == 1
    for conn in m.connections():
        d = conn.to_dict()
        assert jsonable(d) == d


def test_mutated_and_cut_frames_never_raise():
    """A deterministic fuzz: bit flips, cuts and snaplen claims on a real exchange's frames."""
    import random

    rnd = random.Random(1234)
    flow = Flow()
    frames = [flow.syn(), flow.synack(), flow.c(get("/a")), flow.s(ok_head(100)),
              flow.c(b"POST /p HTTP/1.1\r\nContent-Length: 5\r\nHost: h\r\n\r\nhello" + get("/b")),
              flow.s(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
              flow.c(flags=fp.FIN | fp.ACK), flow.s(flags=fp.RST)]
    six = Flow(client=C6, server=S6)
    frames += [six.syn(), six.synack(), six.c(get("/6")), six.s(ok_head(1))]
    for round_ in range(3):
        m = StreamMapper(max_connections=4, max_ooo_bytes=2000)
        now = 0.0
        for _ in range(600):
            f = bytearray(rnd.choice(frames))
            for _ in range(rnd.randrange(4)):
                f[rnd.randrange(len(f))] = rnd.randrange(256)
            wire = None
            if rnd.random() < 0.3:
                cut = rnd.randrange(len(f) + 1)
                wire = len(f) if rnd.random() < 0.7 else len(f) + rnd.randrange(70000)
                f = f[:cut]
            now += rnd.random() * 50
            for ev in m.handle_frame(bytes(f), now, wire_len=wire):
                json.dumps(ev.to_dict())
        json.dumps(m.counters())
        for conn in m.connections():
            json.dumps(conn.to_dict())
