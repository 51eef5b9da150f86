/*
 * What the Node.js test apps share (traced_node.js: HTTP/1.1 and HTTPS;
 * traced_grpc.js: gRPC over h2c and TLS): failing a run, the command line
 * options both take, the traceparent format, and the OpenTelemetry JS SDK's
 * setup.
 *
 * startTracing() registers the SDK and the app's instrumentations; an app calls
 * it before it loads the modules they patch (`http`, `https`, `@grpc/grpc-js`),
 * as an instrumented app does: an instrumentation patches a module as it is
 * required. The sampler is ParentBased(TraceIdRatioBased(--ratio)), so whether
 * a request (a call) is sampled depends on its trace id; an unsampled one still
 * carries a traceparent, its flags 00 (01 when sampled). Spans are exported over
 * OTLP/HTTP (protobuf encoding) to $OTEL_EXPORTER_OTLP_ENDPOINT (a base URL:
 * traces go to /v1/traces), in batches, all flushed before the report is
 * printed; a span that could not be exported fails the run, and so does an
 * export of other than one CLIENT and one SERVER span per sampled request.
 *
 * The options both apps take: --family 4|6, --ratio R (from 0 to 1, the
 * default 1.0), --delay-ms D (how long the server waits before it answers, the
 * default 0), --port P (the server's port; 0, the default: any free one) and
 * --tls DIR (TLS with the server's certificate and key in DIR/cert.pem and
 * DIR/key.pem, which the client trusts).
 *
 * The packages come from package.json/package-lock.json next to this file;
 * scripts/setup.sh --test installs them with `npm ci` outside the repository, and
 * the tests run the apps with NODE_PATH=<that directory>/node_modules.
 */
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const { ExportResultCode } = require('@opentelemetry/core');
const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-proto');
const { registerInstrumentations } = require('@opentelemetry/instrumentation');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const {
  BatchSpanProcessor,
  ParentBasedSampler,
  TraceIdRatioBasedSampler,
} = require('@opentelemetry/sdk-trace-base');
const { NodeTracerProvider } = require('@opentelemetry/sdk-trace-node');

// A W3C traceparent header: its trace id, span id and flags.
const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;
// How long any one request or call (or any one step after them) may take
// before the app gives up: far longer than anything takes, so only a hang
// trips it.
const TIMEOUT_MS = 120_000;

// The app's fail(message): the message on stderr after the app's name, then
// exit status 1.
function failer(app) {
  return (message) => {
    process.stderr.write(`${app}: ${message}\n`);
    process.exit(1);
  };
}

// The server's certificate and key in DIR (--tls DIR), or null without one.
function readTls(dir) {
  if (dir === undefined) return null;
  return {
    cert: fs.readFileSync(path.join(dir, 'cert.pem')),
    key: fs.readFileSync(path.join(dir, 'key.pem')),
  };
}

// Parses the command line: the options both apps take and the app's own
// `options` (parseArgs ones). The checks run in this order, each failing the
// run with `fail`: --port, --family, `afterFamily(values)`, --ratio,
// --delay-ms, `afterDelay(values)`, --tls (its files read), `afterTls(values)`.
// Returns the raw `values` and the shared options parsed.
function parseArguments(fail, { options, afterFamily, afterDelay, afterTls }) {
  const { values } = parseArgs({
    options: {
      family: { type: 'string' },
      ratio: { type: 'string', default: '1.0' },
      'delay-ms': { type: 'string', default: '0' },
      port: { type: 'string', default: '0' },
      tls: { type: 'string' },
      ...options,
    },
    strict: true,
  });
  const family = Number(values.family);
  const ratio = Number(values.ratio);
  const delayMs = Number(values['delay-ms']);
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail('--port is a port number (0: any)');
  if (family !== 4 && family !== 6) fail('--family 4 or 6 is required');
  if (afterFamily) afterFamily(values);
  if (!(ratio >= 0 && ratio <= 1)) fail('--ratio is a number from 0 to 1');
  if (!Number.isInteger(delayMs) || delayMs < 0) fail('--delay-ms is a whole number >= 0');
  if (afterDelay) afterDelay(values);
  const tls = readTls(values.tls);
  if (afterTls) afterTls(values);
  return { values, family, ratio, delayMs, port, tls };
}

// An exporter that passes spans on to `inner` and keeps the outcome: what it
// exported ({kind, traceId, spanId, parentSpanId} a span) and why an export
// failed, so that spans that could not be exported fail the run.
class CheckedExporter {
  constructor(inner) {
    this.inner = inner;
    this.exported = [];
    this.failures = [];
  }
  export(spans, resultCallback) {
    this.inner.export(spans, (result) => {
      if (result.code === ExportResultCode.SUCCESS) {
        for (const span of spans) {
          const context = span.spanContext();
          this.exported.push({
            kind: span.kind,
            traceId: context.traceId,
            spanId: context.spanId,
            parentSpanId: span.parentSpanContext ? span.parentSpanContext.spanId : undefined,
          });
        }
      } else {
        this.failures.push(String(result.error || 'export failed'));
      }
      resultCallback(result);
    });
  }
  shutdown() {
    return this.inner.shutdown();
  }
  forceFlush() {
    return this.inner.forceFlush ? this.inner.forceFlush() : Promise.resolve();
  }
}

// Registers the SDK (service.name `service`, sampled at `ratio`) and
// `instrumentations`; fails the run without an OTLP endpoint. Returns
// { provider, exporter, finish }, where
//   await finish(report, what[, wrap])
// shuts the provider down, exporting every span ended by then (`wrap`, if
// given, wraps the shutdown's promise, as in a timeout), fails the run if any
// could not be exported or if the spans exported are not one CLIENT and one
// SERVER span per sampled entry of `report` (`what`: what its entries are, for
// the message), and returns the spans exported.
function startTracing({ fail, service, ratio, instrumentations }) {
  if (!process.env.OTEL_EXPORTER_OTLP_ENDPOINT && !process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) {
    fail('OTEL_EXPORTER_OTLP_ENDPOINT is not set');
  }
  const exporter = new CheckedExporter(new OTLPTraceExporter());
  const provider = new NodeTracerProvider({
    resource: resourceFromAttributes({ 'service.name': service }),
    sampler: new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(ratio) }),
    // The exporter reads OTEL_EXPORTER_OTLP_ENDPOINT and appends /v1/traces.
    spanProcessors: [new BatchSpanProcessor(exporter)],
  });
  // The global tracer provider, the W3C trace-context propagator and the
  // AsyncLocalStorage context manager.
  provider.register();
  registerInstrumentations({ instrumentations });

  async function finish(report, what, wrap = (promise) => promise) {
    try {
      await wrap(provider.shutdown());
    } catch (error) {
      exporter.failures.push(String(error));
    }
    if (exporter.failures.length) fail(`could not export spans: ${exporter.failures.join('; ')}`);
    const sampledCount = report.filter((r) => r.sampled).length;
    if (exporter.exported.length !== 2 * sampledCount) {
      fail(
        `exported ${exporter.exported.length} spans, want ${2 * sampledCount} ` +
          `(${sampledCount} sampled ${what})`,
      );
    }
    return exporter.exported;
  }
  return { provider, exporter, finish };
}

// Runs the app's main(), failing the run with what it throws.
function run(fail, main) {
  main().catch((error) => fail(error && error.stack ? error.stack : String(error)));
}

module.exports = {
  TRACEPARENT,
  TIMEOUT_MS,
  failer,
  readTls,
  parseArguments,
  CheckedExporter,
  startTracing,
  run,
};
