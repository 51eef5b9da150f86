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
run this file with PYTHONPATH set to that directory.

On success it prints one JSON object on stdout:
  {"server_port": P, "pid": PID, "family": 4, "mode": "keepalive",
   "requests": [{"trace_id", "span_id", "sampled", "traceparent",
                 "client_port", "server_port", "status"}, ...]}
where client_port is the port of the client's connection as the server saw it,
matched to the request by its traceparent. Any failure (a bad status, a header
the server did not get, a connection not kept alive, spans that could not be
exported) raises: exit status 1 with a traceback on stderr.
"""

import argparse
import asyncio
import json
import os
import re
import ssl
import sys

import aiohttp
from aiohttp import web
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

SERVICE = "traced-aiohttp"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# How long any one request may take before the app gives up: far longer than
# anything takes, so only a hang trips it.
TIMEOUT = 120


class CheckedExporter(SpanExporter):
    """The OTLP/HTTP exporter, remembering how its exports went, so that spans
    that could not be exported fail the run."""

    def __init__(self, inner):
        self.inner = inner
        self.exported = 0
        self.failures = 0

    def export(self, spans):
        result = self.inner.export(spans)
        if result == SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failures += 1
        return result

    def shutdown(self):
        self.inner.shutdown()

    def force_flush(self, timeout_millis=30000):
        return self.inner.force_flush(timeout_millis)


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
            match = TRACEPARENT.match(traceparent or "")
            if not match:
                raise RuntimeError(f"{where}: sent no valid traceparent ({traceparent!r})")
            trace_id, span_id, flags = match.groups()
            if (
                span_context is None
                or trace.format_trace_id(span_context.trace_id) != trace_id
                or trace.format_span_id(span_context.span_id) != span_id
            ):
                raise RuntimeError(
                    f"{where}: {traceparent} is not its CLIENT span's context {span_context}"
                )
            sampled = int(flags, 16) & 1 == 1
            if sampled != span_context.trace_flags.sampled:
                raise RuntimeError(f"{where}: {traceparent} and its span disagree on sampling")
            client_port, count = server.seen.get(traceparent, (None, 0))
            if count != 1:
                raise RuntimeError(f"{where}: the server got {traceparent} {count} times")
            if args.mode == "keepalive" and report and client_port != report[0]["client_port"]:
                raise RuntimeError(
                    f"{where}: the connection was not kept alive"
                    f" (port {client_port}, first {report[0]['client_port']})"
                )
            report.append(
                {
                    "trace_id": trace_id,
                    "span_id": span_id,
                    "sampled": sampled,
                    "traceparent": traceparent,
                    "client_port": client_port,
                    "server_port": server.port,
                    "status": status,
                }
            )
    finally:
        if session is not None:
            # Closes the keep-alive connection.
            await session.close()
        await server.stop()
    return server.port, report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", type=int, choices=[4, 6], required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--mode", choices=["keepalive", "new"], default="keepalive")
    parser.add_argument("--ratio", type=float, default=1.0)
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls", metavar="DIR")
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    if not 0.0 <= args.ratio <= 1.0:
        parser.error("--ratio is a number from 0 to 1")
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    if not re.fullmatch(r"[A-Z]+", args.method):
        parser.error("--method is an upper-case HTTP method")
    if not any(os.environ.get(f"OTEL_EXPORTER_OTLP_{k}ENDPOINT") for k in ["", "TRACES_"]):
        parser.error("OTEL_EXPORTER_OTLP_ENDPOINT is not set")

    exporter = CheckedExporter(OTLPSpanExporter())
    provider = TracerProvider(
        resource=Resource.create({"service.name": SERVICE}),
        sampler=ParentBased(root=TraceIdRatioBased(args.ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    try:
        server_port, report = asyncio.run(run(args, provider))
    finally:
        # Every span ended by now: export them all before telling anyone the
        # run is over.
        provider.shutdown()

    if exporter.failures:
        raise RuntimeError(f"{exporter.failures} exports of spans failed")
    sampled_count = sum(r["sampled"] for r in report)
    if exporter.exported != sampled_count:
        raise RuntimeError(
            f"exported {exporter.exported} spans, want {sampled_count} (one per sampled request)"
        )
    json.dump(
        {
            "server_port": server_port,
            "pid": os.getpid(),
            "family": args.family,
            "mode": args.mode,
            "requests": report,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
