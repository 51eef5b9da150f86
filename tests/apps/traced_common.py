"""What traced_requests.py and traced_aiohttp.py share: their command line,
the OpenTelemetry SDK's setup (a sampled share of traces exported over
OTLP/HTTP, export failures remembered), the checks of each request against
what the server saw, and the report. Imported from the scripts' own directory.
"""

import argparse
import json
import os
import re
import sys

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

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


def arguments():
    """The apps' command line, checked."""
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
    return args


def start_tracing(service, ratio):
    """The global tracer provider: ParentBased(TraceIdRatioBased(ratio)),
    batches to the checked OTLP/HTTP exporter. Returns it and the exporter."""
    exporter = CheckedExporter(OTLPSpanExporter())
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(root=TraceIdRatioBased(ratio)),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider, exporter


def checked_request(where, traceparent, span_context, seen, mode, report, server_port, status):
    """The report's entry for a request that sent `traceparent` from its CLIENT
    span `span_context`, which the server saw as `seen` ([client port, times]);
    raises unless they agree, the server saw it once, and a kept-alive
    connection was kept."""
    match = TRACEPARENT.match(traceparent or "")
    if not match:
        raise RuntimeError(f"{where}: sent no valid traceparent ({traceparent!r})")
    trace_id, span_id, flags = match.groups()
    if (
        span_context is None
        or trace.format_trace_id(span_context.trace_id) != trace_id
        or trace.format_span_id(span_context.span_id) != span_id
    ):
        raise RuntimeError(f"{where}: {traceparent} is not its CLIENT span's context {span_context}")
    sampled = int(flags, 16) & 1 == 1
    if sampled != span_context.trace_flags.sampled:
        raise RuntimeError(f"{where}: {traceparent} and its span disagree on sampling")
    client_port, count = seen
    if count != 1:
        raise RuntimeError(f"{where}: the server got {traceparent} {count} times")
    if mode == "keepalive" and report and client_port != report[0]["client_port"]:
        raise RuntimeError(
            f"{where}: the connection was not kept alive"
            f" (port {client_port}, first {report[0]['client_port']})"
        )
    return {
        "trace_id": trace_id,
        "span_id": span_id,
        "sampled": sampled,
        "traceparent": traceparent,
        "client_port": client_port,
        "server_port": server_port,
        "status": status,
    }


def print_report(exporter, args, server_port, report):
    """Prints the report once every span was exported: one per sampled request."""
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
