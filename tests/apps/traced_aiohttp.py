#!/usr/bin/env python3
"""An HTTP/1.1 client made with aiohttp's ClientSession, instrumented by
opentelemetry-instrumentation-aiohttp-client as an application would be, and an
aiohttp.web server, both in the same process and on the same asyncio event loop
(one thread), for the otel-tcpstates tests: the W3C traceparent headers the
instrumentation injects into the client's requests are what otel-tcpstates
turns into span links on the sockets' tcp.session roots. It is
traced_requests.py on asyncio: with --tls, asyncio's TLS (ssl.SSLObject)
encrypts into memory BIOs and the event loop sends what they hold with plain
socket writes, for both ends of each connection.

AioHttpClientInstrumentor().instrument() patches aiohttp.ClientSession.__init__
(so it is called before the sessions are made) to add a TraceConfig: each
request is made in a CLIENT span of its own (the trace's root: no span is
active when a request is made) whose context the SDK's global propagator
injects into the request's headers. The sampler is
ParentBased(TraceIdRatioBased(--ratio)), so whether a request is sampled
depends on its trace id; an unsampled request still carries a traceparent. The
SDK sets W3C Trace Context Level 2's random-trace-id flag (0x02) too: the flags
are 03 (sampled) or 02 (not), where other SDKs send 01 or 00. Spans are
exported over OTLP/HTTP (protobuf) to OTEL_EXPORTER_OTLP_ENDPOINT (a base URL:
traces go to /v1/traces), in batches (from the SDK's own export thread), all
flushed before the report is printed. The server (aiohttp.web, HTTP/1.1,
keep-alive) is not instrumented: it records the traceparent each request
carried and the port of the connection it came on.

    traced_aiohttp.py --family 4|6 --requests N [--mode keepalive|new]
        [--ratio R] [--delay-ms D] [--method GET] [--port P] [--tls DIR]

--tls DIR: HTTPS, both ends through an ssl.SSLContext (the system's libssl,
through asyncio's SSL protocol): the server's certificate and key are
DIR/cert.pem and DIR/key.pem, which the client trusts.

--mode keepalive (the default): one ClientSession for every request, its
connector limited to one connection, so all go over one connection; new: a
ClientSession of its own per request, its connector closing each connection
after its response (force_close), closed after it, and `Connection: close`, so
each request has a connection of its own. Requests are made one after another;
the server answers each 200 with a small body, --delay-ms after it came (an
asyncio.sleep: the loop goes on meanwhile).

The packages are installed by scripts/setup.sh --test (pip --target); the tests
run this file with PYTHONPATH set to that directory. What it shares with
its sibling (command line, SDK setup, checks, report) is in traced_common.py.

On success it prints one JSON object on stdout:
  {"server_port": P, "pid": PID, "family": 4, "mode": "keepalive",
   "requests": [{"trace_id", "span_id", "sampled", "traceparent",
                 "client_port", "server_port", "status"}, ...]}
where client_port is the port of the client's connection as the server saw it,
matched to the request by its traceparent. Any failure (a bad status, a header
the server did not get, a connection not kept alive, spans that could not be
exported) raises: exit status 1 with a traceback on stderr.
"""

import asyncio
import os
import ssl

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from traced_common import TIMEOUT, arguments, checked_request, print_report, start_tracing

SERVICE = "traced-aiohttp"
class Server:
    """The aiohttp.web server, on the event loop the client runs on."""

    def __init__(self, delay):
        self.delay = delay
        # What the server saw of each request, by the traceparent it carried:
        # [client port, times seen]. Only the event loop's thread touches it.
        self.seen = {}
        self.runner = None
        self.port = None

    async def handle(self, request):
        if request.can_read_body:
            await request.read()
        traceparent = request.headers.get("traceparent")
        if traceparent is not None:
            # The peer of the connection (through the TLS transport to the
            # socket's with --tls).
            peer = request.transport.get_extra_info("peername")
            entry = self.seen.setdefault(traceparent, [peer[1], 0])
            entry[1] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        # aiohttp answers `Connection: close` to a request that said so, and
        # closes the connection after it.
        return web.Response(body=b"ok\n", content_type="text/plain")

    async def start(self, host, port, ssl_context):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        # An idle keep-alive connection is given up after TIMEOUT.
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=TIMEOUT)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self):
        if self.runner is not None:
            await self.runner.cleanup()


async def send(session, method, url, where, client_spans, ssl_context):
    """One request, its response read whole, on `session` (keep-alive) or, with
    None, on a connection of its own, closed after it. Returns the status, the
    traceparent the instrumentation put in the request and its CLIENT span's
    context."""
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    if session is not None:
        return await send_on(session, method, url, where, client_spans, {}, timeout)
    connector = aiohttp.TCPConnector(force_close=True, ssl=ssl_context)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as one:
        return await send_on(one, method, url, where, client_spans, {"Connection": "close"}, timeout)


async def send_on(session, method, url, where, client_spans, headers, timeout):
    async with session.request(method, url, headers=headers, timeout=timeout) as response:
        body = await response.read()
        if response.status != 200 or body != b"ok\n":
            raise RuntimeError(f"{where}: status {response.status}, body {body!r}")
        return (
            response.status,
            # The headers of the request as sent, which the instrumentation
            # injected into.
            response.request_info.headers.get("traceparent"),
            client_spans.pop(id(response), None),
        )


async def run(args, provider):
    # Each CLIENT span's context, by the ClientResponse it ended with.
    client_spans = {}

    def response_hook(span, params):
        response = getattr(params, "response", None)
        if response is not None:
            client_spans[id(response)] = span.get_span_context()

    AioHttpClientInstrumentor().instrument(tracer_provider=provider, response_hook=response_hook)

    host = {4: "127.0.0.1", 6: "::1"}[args.family]
    server_ssl = client_ssl = None
    if args.tls:
        server_ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ssl.load_cert_chain(
            os.path.join(args.tls, "cert.pem"), os.path.join(args.tls, "key.pem")
        )
        client_ssl = ssl.create_default_context(cafile=os.path.join(args.tls, "cert.pem"))
    scheme = "https" if args.tls else "http"
    url_host = f"[{host}]" if args.family == 6 else host

    server = Server(args.delay_ms / 1000)
    report = []
    session = None
    try:
        await server.start(host, args.port, server_ssl)
        if args.mode == "keepalive":
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1, ssl=client_ssl),
                timeout=aiohttp.ClientTimeout(total=TIMEOUT),
            )
        for n in range(args.requests):
            if trace.get_current_span().get_span_context().is_valid:
                raise RuntimeError("a span is active where a request is made")
            where = f"{args.method} /{n}"
            url = f"{scheme}://{url_host}:{server.port}/{n}"
            status, traceparent, span_context = await send(
                session, args.method, url, where, client_spans, client_ssl
            )
            seen = server.seen.get(traceparent, (None, 0))
            report.append(
                checked_request(
                    where,
                    traceparent,
                    span_context,
                    seen,
                    args.mode,
                    report,
                    server.port,
                    status,
                )
            )
    finally:
        if session is not None:
            # Closes the keep-alive connection.
            await session.close()
        await server.stop()
    return server.port, report


def main():
    args = arguments()

    provider, exporter = start_tracing(SERVICE, args.ratio)

    try:
        server_port, report = asyncio.run(run(args, provider))
    finally:
        # Every span ended by now: export them all before telling anyone the
        # run is over.
        provider.shutdown()

    print_report(exporter, args, server_port, report)


if __name__ == "__main__":
    main()
