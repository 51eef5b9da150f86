#!/usr/bin/env python3
"""An HTTP/1.1 client made with the requests library, instrumented by
opentelemetry-instrumentation-requests as an application would be, and a plain
server in the same process, for the otel-tcpstates tests: the W3C traceparent
headers the instrumentation injects into the client's requests are what
otel-tcpstates turns into span links on the sockets' tcp.session roots.

RequestsInstrumentor().instrument() patches requests.Session.send: each request
is made in a CLIENT span of its own (the trace's root: no span is active when a
request is made) whose context the SDK's global propagator injects. The sampler
is ParentBased(TraceIdRatioBased(--ratio)), so whether a request is sampled
depends on its trace id; an unsampled request still carries a traceparent. The
SDK sets W3C Trace Context Level 2's random-trace-id flag (0x02) too: the
flags are 03 (sampled) or 02 (not), where other SDKs send 01 or 00. Spans are exported over OTLP/HTTP (protobuf) to
OTEL_EXPORTER_OTLP_ENDPOINT (a base URL: traces go to /v1/traces), in batches,
all flushed before the report is printed. The server (http.server's
ThreadingHTTPServer, HTTP/1.1, keep-alive) is not instrumented: it records the
traceparent each request carried and the port of the connection it came on.

    traced_requests.py --family 4|6 --requests N [--mode keepalive|new]
        [--ratio R] [--delay-ms D] [--method GET] [--port P] [--tls DIR]

--tls DIR: HTTPS, both ends through Python's ssl (the system's libssl): the
server's certificate and key are DIR/cert.pem and DIR/key.pem, which the
client trusts.

--mode keepalive (the default): one requests.Session for every request, so all
go over one connection; new: a Session of its own per request, closed after it,
and `Connection: close`, so each request has a connection of its own. Requests
are made one after another; the server answers each 200 with a small body,
--delay-ms after it came.

The packages are installed by scripts/setup.sh --test (pip --target); the tests
run this file with PYTHONPATH set to that directory. What it shares with
its sibling (command line, SDK setup, checks, report) is in traced_common.py.

On success it prints one JSON object on stdout:
  {"server_port": P, "pid": PID, "family": 4, "mode": "keepalive",
   "requests": [{"trace_id", "span_id", "sampled", "traceparent",
                 "client_port", "server_port", "status"}, ...]}
where client_port is the port of the client's connection as the server saw it
(requests does not tell), matched to the request by its traceparent. Any
failure (a bad status, a header the server did not get, a connection not kept
alive, spans that could not be exported) raises: exit status 1 with a traceback
on stderr.
"""

import os
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from opentelemetry import trace
from opentelemetry.instrumentation.requests import RequestsInstrumentor
from traced_common import TIMEOUT, arguments, checked_request, print_report, start_tracing

SERVICE = "traced-requests"
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # An idle keep-alive connection is given up after this long.
    timeout = TIMEOUT
    # The headers and the body go out in two writes: without TCP_NODELAY the
    # body waits for the client's delayed ACK (40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True
    delay = 0.0
    # What the server saw of each request, by the traceparent it carried:
    # [client port, times seen].
    seen = {}
    seen_lock = threading.Lock()

    def log_message(self, *args):
        pass

    def handle_any(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        traceparent = self.headers.get("traceparent")
        if traceparent is not None:
            with Handler.seen_lock:
                entry = Handler.seen.setdefault(traceparent, [self.client_address[1], 0])
                entry[1] += 1
        if Handler.delay:
            time.sleep(Handler.delay)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            # The request said `Connection: close`: so does the answer.
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = handle_any


class Server(ThreadingHTTPServer):
    # A handler still on a connection (a run that failed half-way) does not keep
    # the app from exiting; nothing the report needs is left in a handler.
    daemon_threads = True
    block_on_close = False


class Server6(Server):
    address_family = socket.AF_INET6


def send(session, method, url, where, client_spans, verify):
    """One request, its response read whole, on `session` (keep-alive) or, with
    None, on a connection of its own, closed after it. Returns the status, the
    traceparent the instrumentation put in the request and its CLIENT span's
    context. No response outlives this call: with urllib3 2, Session.close()
    only forgets its connection pools, which close their connections when
    they are garbage-collected, and a response refers to its pool."""
    if session is not None:
        response = session.request(method, url, timeout=TIMEOUT, verify=verify)
    else:
        with requests.Session() as one:
            response = one.request(
                method, url, headers={"Connection": "close"}, timeout=TIMEOUT, verify=verify
            )
    with response:
        if response.status_code != 200 or response.content != b"ok\n":
            raise RuntimeError(f"{where}: status {response.status_code}, body {response.content!r}")
        # The PreparedRequest the instrumentation injected into.
        request = response.request
        return (
            response.status_code,
            request.headers.get("traceparent"),
            client_spans.pop(id(request), None),
        )


def main():
    args = arguments()

    provider, exporter = start_tracing(SERVICE, args.ratio)

    # Each CLIENT span's context, by the PreparedRequest it was made for.
    client_spans = {}

    def request_hook(span, request):
        client_spans[id(request)] = span.get_span_context()

    RequestsInstrumentor().instrument(tracer_provider=provider, request_hook=request_hook)

    host, server_class = {4: ("127.0.0.1", Server), 6: ("::1", Server6)}[args.family]
    Handler.delay = args.delay_ms / 1000
    server = server_class((host, args.port), Handler)
    server_port = server.server_address[1]
    verify = True
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(os.path.join(args.tls, "cert.pem"), os.path.join(args.tls, "key.pem"))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        verify = os.path.join(args.tls, "cert.pem")
    scheme = "https" if args.tls else "http"
    server_thread = threading.Thread(target=server.serve_forever)
    server_thread.start()
    url_host = f"[{host}]" if args.family == 6 else host

    report = []
    session = requests.Session() if args.mode == "keepalive" else None
    try:
        for n in range(args.requests):
            if trace.get_current_span().get_span_context().is_valid:
                raise RuntimeError("a span is active where a request is made")
            where = f"{args.method} /{n}"
            url = f"{scheme}://{url_host}:{server_port}/{n}"
            status, traceparent, span_context = send(
                session, args.method, url, where, client_spans, verify
            )
            with Handler.seen_lock:
                seen = Handler.seen.get(traceparent, (None, 0))
            report.append(
                checked_request(
                    where,
                    traceparent,
                    span_context,
                    seen,
                    args.mode,
                    report,
                    server_port,
                    status,
                )
            )
    finally:
        if session is not None:
            # Its pool (and so the keep-alive connection) is closed as soon as
            # nothing refers to it: no response is left (see send).
            session.close()
            del session
        server.shutdown()
        server_thread.join(TIMEOUT)
        server.server_close()
        # Every span ended by now: export them all before telling anyone the
        # run is over.
        provider.shutdown()

    print_report(exporter, args, server_port, report)


if __name__ == "__main__":
    main()
