#!/usr/bin/env python3
"""Measuring tools run inside a lab namespace by the benchmarks (stdlib only, prints JSON).

  http HOST PORT PATH N     N requests, each on a new connection (Connection: close);
                            microseconds from connect() to the last byte, per request
  echo-server HOST PORT     a TCP echo server (runs until killed)
  rtt HOST PORT N           N round trips of 64 bytes on one TCP_NODELAY connection, in us
"""

import json
import socket
import sys
import threading
import time


def http(host: str, port: int, path: str, n: int) -> list:
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    buf = bytearray(1 << 20)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(req)
        total = 0
        while True:
            k = s.recv_into(buf)
            if not k:
                break
            total += k
        s.close()
        times.append((time.perf_counter() - t0) * 1e6)
        if total == 0:
            raise SystemExit(f"empty response for {path}")
    return times


def echo_server(host: str, port: int) -> None:
    srv = socket.create_server((host, port), reuse_port=True)

    def serve(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    print("listening", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def rtt(host: str, port: int, n: int) -> list:
    s = socket.create_connection((host, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.sendall(msg)
        got = 0
        while got < 64:
            got += len(s.recv(64 - got))
        out.append((time.perf_counter() - t0) * 1e6)
    s.close()
    return out


def main(argv) -> int:
    cmd = argv[0]
    if cmd == "http":
        print(json.dumps(http(argv[1], int(argv[2]), argv[3], int(argv[4]))))
    elif cmd == "echo-server":
        echo_server(argv[1], int(argv[2]))
    elif cmd == "rtt":
        print(json.dumps(rtt(argv[1], int(argv[2]), int(argv[3]))))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
