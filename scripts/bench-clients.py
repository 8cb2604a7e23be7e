#!/usr/bin/env python3
"""Many concurrent downloads from one process, for `scripts/bench` (BENCH_CONCURRENCY,
BENCH_SLOW); not meant to be run alone.

Usage: bench-clients.py HOST:PORT PATH CLIENTS RATE SECONDS
Opens CLIENTS connections at once, sends one GET each, and reads every response with at most
RATE bytes per second per connection (0: as fast as it can), for at most SECONDS or until every
body has arrived. A slow reader keeps its connection, and whatever the server holds for it, open
for the whole run, which is the point: peak memory with many slow clients. Prints one line:
`connected N, finished N, failed N, bytes N, seconds S`. Standard library only, one thread, so
a thousand clients cost a few MiB here rather than a thousand curl processes.
"""

import selectors
import socket
import sys
import time

ADDR, PATH = sys.argv[1], sys.argv[2]
CLIENTS, RATE, SECONDS = int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
HOST, PORT = ADDR.rsplit(":", 1)
BUF = 256 * 1024


class Conn:
    def __init__(self, sock):
        self.sock = sock
        self.got = 0
        self.head = b""
        self.length = None  # body length once the head is in
        self.body = 0
        self.allowance = 0.0
        self.done = False


def main():
    sel = selectors.DefaultSelector()
    conns = []
    failed = 0
    request = f"GET {PATH} HTTP/1.1\r\nHost: {ADDR}\r\nConnection: close\r\n\r\n".encode()
    for _ in range(CLIENTS):
        try:
            s = socket.create_connection((HOST, int(PORT)), timeout=30)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            s.sendall(request)
            s.setblocking(False)
        except OSError:
            failed += 1
            continue
        c = Conn(s)
        conns.append(c)
        sel.register(s, selectors.EVENT_READ, c)
    start = time.monotonic()
    last = start
    total = 0
    open_count = len(conns)
    while open_count and time.monotonic() - start < SECONDS:
        now = time.monotonic()
        if RATE:
            for c in conns:
                c.allowance = min(c.allowance + RATE * (now - last), RATE)
        last = now
        for key, _ in sel.select(timeout=0.05):
            c = key.data
            want = BUF if not RATE else int(c.allowance)
            if want <= 0:
                continue
            try:
                data = c.sock.recv(min(want, BUF))
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(c.sock)
                c.sock.close()
                open_count -= 1
                c.done = c.length is not None and c.body >= c.length
                if not c.done:
                    failed += 1
                continue
            c.allowance -= len(data)
            total += len(data)
            if c.length is None:
                c.head += data
                end = c.head.find(b"\r\n\r\n")
                if end >= 0:
                    head = c.head[:end].decode("latin-1").lower()
                    if not head.startswith("http/1.1 200"):
                        failed += 1
                        sel.unregister(c.sock)
                        c.sock.close()
                        open_count -= 1
                        continue
                    for line in head.split("\r\n"):
                        if line.startswith("content-length:"):
                            c.length = int(line.split(":", 1)[1])
                    c.body = len(c.head) - end - 4
                    c.head = b""
            else:
                c.body += len(data)
        if RATE:
            # Sleep until some connection may read again rather than spinning.
            time.sleep(0.02)
    finished = sum(1 for c in conns if c.done)
    for c in conns:
        try:
            c.sock.close()
        except OSError:
            pass
    print(
        f"connected {len(conns)}, finished {finished}, failed {failed}, bytes {total}, "
        f"seconds {time.monotonic() - start:.1f}"
    )


main()
