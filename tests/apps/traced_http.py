#!/usr/bin/env python3
"""An HTTP/1.1 server and client instrumented with the OpenTelemetry Python SDK,
for tests/links.rs: the W3C traceparent headers it sends are what otel-tcpstates
turns into span links on the sockets' tcp.session roots.

The server (http.server's ThreadingHTTPServer, HTTP/1.1, keep-alive) extracts
each request's context with the SDK's global propagator and serves the request
in a SERVER span, whose own context it puts in the response's headers (as some
servers do), so that a test can tell that responses are not scanned. The client
(one http.client.HTTPConnection, reused for every request) sends each request in
a CLIENT span whose context the same propagator injects. Both export their spans
over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT, each span as it ends.

    traced_http.py --family 4|6 --traced N [--mix]

--traced N: N traced requests on the one keep-alive connection, with the HTTP
methods in turn. --mix (N >= 4) adds, on that same connection: a request whose
first attempt the server answers 503 and that is retried last with the same
headers (one CLIENT span, sent twice); a request without any trace header;
requests with invalid traceparent values (written by hand: the SDK makes no
invalid ones); a request from a span that is not sampled (sampled flag clear);
two CLIENT spans of one trace; requests whose header names are capitalised as
Go's net/http does ("Traceparent"). It also opens one connection that is not
HTTP: its first bytes are "HELLO\\r\\ntraceparent: 00-...-01", then it sends a
whole HTTP request with a valid traceparent, which must not be linked either.

On success it prints one JSON object on stdout: the ports, every request made on
the keep-alive connection in order (kind, method, the traceparent sent or null),
and the non-HTTP connection's ports and the ids it sent. Any failure (a
connection not kept alive, an unexpected status) raises: exit status 1 with a
traceback on stderr.
"""

import argparse
import http.client
import json
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

SERVICE = "traced-http"
METHODS = ["GET", "POST", "PUT", "DELETE"]
# How long any one socket operation may take before the app gives up: far longer
# than anything takes, so only a hang trips it.
TIMEOUT = 120

provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
# Each span exported as it ends: nothing is left in a queue when the app exits.
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
tracer = provider.get_tracer("traced_http")
# Spans that are not sampled: valid contexts, injected with the sampled flag
# clear, never exported.
unsampled_tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("traced_http")


def hex_id(nbytes):
    """Random lowercase hex with at least one letter (so that upper-casing it
    changes it)."""
    while True:
        value = secrets.token_hex(nbytes)
        if any(c in "abcdef" for c in value) and value.strip("0"):
            return value


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Paths already answered once: "/flaky" fails its first time only.
    seen = set()
    seen_lock = threading.Lock()

    def log_message(self, *args):
        pass

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        context = propagate.extract(self.headers)
        with tracer.start_as_current_span(
            f"{self.command} {self.path}",
            context=context,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": self.command, "url.path": self.path},
        ):
            with Handler.seen_lock:
                first = self.path not in Handler.seen
                Handler.seen.add(self.path)
            status = 503 if self.path == "/flaky" and first else 200
            body = b"ok\n"
            self.send_response(status)
            # The server span's own context, in the response.
            response_headers = {}
            propagate.inject(response_headers)
            for name, value in response_headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = handle_any


class Server(ThreadingHTTPServer):
    # server_close() waits for the handlers, so their spans are exported by then.
    daemon_threads = False
    block_on_close = True


class Server6(Server):
    address_family = socket.AF_INET6


class Client:
    """One keep-alive connection; every request must go over it."""

    def __init__(self, host, port):
        self.conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port = self.conn.sock.getsockname()[1]
        self.sent = []

    def send(self, kind, method, path, headers, expect=200):
        body = b'{"n":1}' if method in ("POST", "PUT") else None
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        response.read()
        if response.status != expect:
            raise RuntimeError(f"{method} {path}: status {response.status}, want {expect}")
        sock = self.conn.sock
        if sock is None or sock.getsockname()[1] != self.local_port:
            raise RuntimeError(f"{method} {path}: the connection was not kept alive")
        traceparent = next((v for k, v in headers.items() if k.lower() == "traceparent"), None)
        self.sent.append({"kind": kind, "method": method, "path": path, "traceparent": traceparent})

    def traced(self, method, path, index, canonical=False):
        """One request in its own CLIENT span, its context injected by the SDK."""
        with tracer.start_as_current_span(
            f"{method} {path}",
            kind=SpanKind.CLIENT,
            attributes={"http.request.method": method, "app.request.index": index},
        ):
            headers = {}
            propagate.inject(headers)
            if canonical:
                headers = {name.title(): value for name, value in headers.items()}
            self.send("traced", method, path, headers)

    def close(self):
        self.conn.close()


def invalid_traceparents():
    """Values the W3C Trace Context spec rejects, each with ids of its own."""
    values = []
    for shape in ["long", "short", "upper", "zero-trace", "zero-span", "version-ff"]:
        trace_id, span_id = hex_id(16), hex_id(8)
        values.append(
            {
                "long": f"00-{trace_id}-{span_id}-01-00",
                "short": f"00-{trace_id[:31]}-{span_id}-01",
                "upper": f"00-{trace_id.upper()}-{span_id}-01",
                "zero-trace": f"00-{'0' * 32}-{span_id}-01",
                "zero-span": f"00-{trace_id}-{'0' * 16}-01",
                "version-ff": f"ff-{trace_id}-{span_id}-01",
            }[shape]
        )
    return values


def keep_alive_requests(client, traced, mix):
    if not mix:
        for n in range(traced):
            client.traced(METHODS[n % len(METHODS)], f"/{n}", n)
        return
    # A request that fails once and is retried, last, from the same CLIENT span
    # with the same headers: the same (trace id, span id) twice.
    flaky = tracer.start_span(
        "GET /flaky",
        kind=SpanKind.CLIENT,
        attributes={"http.request.method": "GET", "app.request.index": -1},
    )
    flaky_headers = {}
    propagate.inject(flaky_headers, context=trace.set_span_in_context(flaky))
    client.send("traced", "GET", "/flaky", flaky_headers, expect=503)
    client.traced("GET", "/0", 0)
    client.send("none", "GET", "/plain", {})
    client.traced("POST", "/1", 1, canonical=True)
    for value in invalid_traceparents():
        client.send("invalid", "GET", "/invalid", {"traceparent": value})
    with unsampled_tracer.start_as_current_span("PUT /unsampled", kind=SpanKind.CLIENT):
        headers = {}
        propagate.inject(headers)
        client.send("unsampled", "PUT", "/unsampled", headers)
    # Two CLIENT spans of one trace: same trace id, two links.
    with tracer.start_as_current_span("batch"):
        client.traced("DELETE", "/2", 2)
        client.traced("GET", "/3", 3, canonical=True)
    for n in range(4, traced):
        client.traced(METHODS[n % len(METHODS)], f"/{n}", n)
    client.send("retry", "GET", "/flaky", flaky_headers)
    flaky.end()


class RawServer:
    """Accepts one connection and reads it to the end, telling how much came."""

    def __init__(self, family, host):
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind((host, 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.serve)
        self.thread.start()

    def serve(self):
        conn, _ = self.listener.accept()
        conn.settimeout(TIMEOUT)
        with conn:
            while chunk := conn.recv(65536):
                with self.cond:
                    self.received += len(chunk)
                    self.cond.notify_all()
        self.listener.close()

    def wait_for(self, total):
        with self.cond:
            if not self.cond.wait_for(lambda: self.received >= total, timeout=TIMEOUT):
                raise RuntimeError(f"the raw server got {self.received} of {total} bytes")


def not_http(family, host):
    """A connection whose first bytes are not an HTTP request line, though they
    hold a valid traceparent; then a whole HTTP request with another."""
    server = RawServer(family, host)
    ids = [(hex_id(16), hex_id(8)) for _ in range(2)]
    first = f"HELLO\r\ntraceparent: 00-{ids[0][0]}-{ids[0][1]}-01\r\n\r\n".encode()
    second = (
        f"GET / HTTP/1.1\r\nHost: {host}\r\ntraceparent: 00-{ids[1][0]}-{ids[1][1]}-01\r\n\r\n"
    ).encode()
    sock = socket.create_connection((host, server.port), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    local_port = sock.getsockname()[1]
    with sock:
        sock.sendall(first)
        server.wait_for(len(first))
        sock.sendall(second)
        server.wait_for(len(first) + len(second))
    server.thread.join(TIMEOUT)
    return {
        "client_port": local_port,
        "server_port": server.port,
        "ids": [{"trace_id": t, "span_id": s} for t, s in ids],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", type=int, choices=[4, 6], required=True)
    parser.add_argument("--traced", type=int, required=True)
    parser.add_argument("--mix", action="store_true")
    args = parser.parse_args()
    if args.mix and args.traced < 4:
        parser.error("--mix needs --traced 4 or more")
    host, family, server_class = {
        4: ("127.0.0.1", socket.AF_INET, Server),
        6: ("::1", socket.AF_INET6, Server6),
    }[args.family]

    server = server_class((host, 0), Handler)
    server_thread = threading.Thread(target=server.serve_forever)
    server_thread.start()
    server_port = server.server_address[1]
    try:
        client = Client(host, server_port)
        keep_alive_requests(client, args.traced, args.mix)
        client.close()
        raw = not_http(family, host) if args.mix else None
    finally:
        server.shutdown()
        server_thread.join(TIMEOUT)
        server.server_close()
        provider.shutdown()
    json.dump(
        {
            "family": args.family,
            "server_port": server_port,
            "client_port": client.local_port,
            "requests": client.sent,
            "not_http": raw,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
