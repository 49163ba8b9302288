#!/usr/bin/env python3
"""Servers the real-client corpus (tests/tests/corpus.rs) drives clients against.

Each server binds the address it is given (port 0 by default), prints one JSON
line {"port": N} on stdout once it accepts traffic, and then serves until it is
killed: the test owns its lifetime, so nothing here outlives a failing test.

    servers.py http --status 503 [--bind ::1] [--tls CERT KEY]
    servers.py sink                      # TCP: accept, then close at once
    servers.py udp-echo                  # UDP: answer every datagram
    servers.py dns --bind 127.0.0.1 --port 53   # answers every query NOERROR
"""
import argparse
import json
import socket
import ssl
import struct
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def ready(port):
    print(json.dumps({"port": port}), flush=True)


def http(args):
    status = args.status
    body = (b"Service Unavailable\n" if status == 503 else b"ok\n")

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1: connections stay open unless the client asks otherwise,
        # so keep-alive clients resend on one connection, as in production.
        protocol_version = "HTTP/1.1"
        # One write per response (headers and body together) and no Nagle:
        # otherwise the body waits for the client's delayed ACK (40 ms) and a
        # keep-alive client is throttled to 25 requests/s by the server.
        wbufsize = 65536
        disable_nagle_algorithm = True

        def do_GET(self):
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *_):
            pass

    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET

    class Server(ThreadingHTTPServer):
        address_family = family
        request_queue_size = 512
        daemon_threads = True

        def handle_error(self, request, client_address):
            # A client that hangs up mid-request (wrk stopping, ab's last
            # connections) is not an error worth a traceback.
            pass

    srv = Server((args.bind, args.port), Handler)
    if args.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls[0], args.tls[1])
        # The handshake runs in the handler's thread (on its first read),
        # not in the accept loop, so one slow client cannot stall the rest.
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True,
                                     do_handshake_on_connect=False)
    ready(srv.server_address[1])
    srv.serve_forever()


def sink(args):
    """Accepts and closes: what a port probe (nc -z) connects to."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((args.bind, args.port))
    s.listen(512)
    ready(s.getsockname()[1])
    while True:
        c, _ = s.accept()
        c.close()


def udp_echo(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((args.bind, args.port))
    ready(s.getsockname()[1])
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"ok " + data, peer)


def dns_answer(query, rcode=0):
    """NOERROR for any question; an A record (192.0.2.1, TEST-NET-1: never
    contacted) when the question is for A, no records otherwise. With a
    non-zero rcode (2: SERVFAIL), that rcode and no records."""
    if len(query) < 12:
        return None
    (qid, flags, qdcount) = struct.unpack("!HHH", query[:6])
    if qdcount != 1:
        return None
    i = 12
    while i < len(query) and query[i] != 0:
        i += 1 + query[i]
    end = i + 5
    if end > len(query):
        return None
    qtype = struct.unpack("!H", query[i + 1:i + 3])[0]
    question = query[12:end]
    answers = b""
    if qtype == 1 and rcode == 0:
        answers = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton("192.0.2.1")
    rd = flags & 0x0100
    header = struct.pack("!HHHHHH", qid, 0x8080 | rd | (rcode & 0xF), 1, 1 if answers else 0, 0, 0)
    return header + question + answers


def dns(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((args.bind, args.port))
    ready(s.getsockname()[1])
    while True:
        data, peer = s.recvfrom(4096)
        reply = dns_answer(data, args.rcode)
        if reply:
            s.sendto(reply, peer)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("http")
    h.add_argument("--status", type=int, default=200)
    h.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    for name in ("sink", "udp-echo"):
        sub.add_parser(name)
    d = sub.add_parser("dns")
    d.add_argument("--rcode", type=int, default=0)
    for sp in sub.choices.values():
        sp.add_argument("--bind", default="127.0.0.1")
        sp.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    {"http": http, "sink": sink, "udp-echo": udp_echo, "dns": dns}[args.cmd](args)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
