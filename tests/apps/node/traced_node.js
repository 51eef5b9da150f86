#!/usr/bin/env node
/*
 * An HTTP/1.1 client and server in one Node.js process, instrumented with the
 * OpenTelemetry JS SDK and its `http` instrumentation, for the otel-tcpstates
 * tests: the W3C traceparent headers the instrumentation injects into the
 * client's requests are what otel-tcpstates turns into span links on the
 * sockets' tcp.session roots.
 *
 * The SDK is registered before `http` is loaded, as an instrumented app does:
 * HttpInstrumentation then makes a CLIENT span for each request (the trace's
 * root: no span is active when a request is made) and injects its context, and
 * a SERVER span for each request the server gets, under the context it carries.
 * The sampler is ParentBased(TraceIdRatioBased(--ratio)), so whether a request
 * is sampled depends on its trace id; an unsampled request still carries a
 * traceparent, its flags 00 (01 when sampled). Spans are exported over OTLP/HTTP
 * (protobuf encoding) to $OTEL_EXPORTER_OTLP_ENDPOINT (a base URL: traces go to
 * /v1/traces), in batches, all flushed before the report is printed.
 *
 *     node traced_node.js --family 4|6 --requests N [--mode keepalive|new]
 *         [--ratio R] [--delay-ms D] [--method GET] [--port P] [--tls DIR]
 *
 * --mode keepalive (the default): one http.Agent with keepAlive and maxSockets 1,
 * so every request goes over one connection; new: a connection of its own per
 * request (agent: false and `Connection: close`). Requests are made one after
 * another; the server answers each 200 with a small body, --delay-ms after it
 * came. --port: the server's port (0, the default: any free one).
 * --tls DIR: HTTPS (the `https` module, Node's own OpenSSL) with the server's
 * certificate and key in DIR/cert.pem and DIR/key.pem, which the client trusts.
 *
 * The packages come from package.json/package-lock.json next to this file;
 * scripts/setup.sh --test installs them with `npm ci` outside the repository, and
 * the tests run this file with NODE_PATH=<that directory>/node_modules.
 *
 * On success it prints one JSON object on stdout:
 *   {"server_port": P, "pid": PID, "family": 4, "mode": "keepalive",
 *    "requests": [{"trace_id", "span_id", "sampled", "traceparent",
 *                  "client_port", "server_port", "status"}, ...]}
 * where client_port is the client socket's local port as both ends saw it.
 * Any failure (a bad status, a header the server did not get, ports that do not
 * agree, a connection not kept alive, spans that could not be exported) exits
 * with status 1 and a message on stderr.
 */
'use strict';

const { parseArgs } = require('node:util');

const api = require('@opentelemetry/api');
const { ExportResultCode } = require('@opentelemetry/core');
const { OTLPTraceExporter } = require('@opentelemetry/exporter-trace-otlp-proto');
const { registerInstrumentations } = require('@opentelemetry/instrumentation');
const { HttpInstrumentation } = require('@opentelemetry/instrumentation-http');
const { resourceFromAttributes } = require('@opentelemetry/resources');
const {
  BatchSpanProcessor,
  ParentBasedSampler,
  TraceIdRatioBasedSampler,
} = require('@opentelemetry/sdk-trace-base');
const { NodeTracerProvider } = require('@opentelemetry/sdk-trace-node');

const SERVICE = 'traced-node';
const TRACEPARENT = /^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$/;
// How long any one request may take before the app gives up: far longer than
// anything takes, so only a hang trips it.
const TIMEOUT_MS = 120_000;

function fail(message) {
  process.stderr.write(`traced_node.js: ${message}\n`);
  process.exit(1);
}

function parseArguments() {
  const { values } = parseArgs({
    options: {
      family: { type: 'string' },
      requests: { type: 'string' },
      mode: { type: 'string', default: 'keepalive' },
      ratio: { type: 'string', default: '1.0' },
      'delay-ms': { type: 'string', default: '0' },
      method: { type: 'string', default: 'GET' },
      port: { type: 'string', default: '0' },
      tls: { type: 'string' },
    },
    strict: true,
  });
  const family = Number(values.family);
  const requests = Number(values.requests);
  const ratio = Number(values.ratio);
  const delayMs = Number(values['delay-ms']);
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) fail('--port is a port number (0: any)');
  if (family !== 4 && family !== 6) fail('--family 4 or 6 is required');
  if (!Number.isInteger(requests) || requests < 1) fail('--requests N (N >= 1) is required');
  if (values.mode !== 'keepalive' && values.mode !== 'new') fail('--mode is keepalive or new');
  if (!(ratio >= 0 && ratio <= 1)) fail('--ratio is a number from 0 to 1');
  if (!Number.isInteger(delayMs) || delayMs < 0) fail('--delay-ms is a whole number >= 0');
  if (!/^[A-Z]+$/.test(values.method)) fail('--method is an upper-case HTTP method');
  let tls = null;
  if (values.tls !== undefined) {
    const fs = require('node:fs');
    const path = require('node:path');
    tls = {
      cert: fs.readFileSync(path.join(values.tls, 'cert.pem')),
      key: fs.readFileSync(path.join(values.tls, 'key.pem')),
    };
  }
  return { family, requests, mode: values.mode, ratio, delayMs, method: values.method, port, tls };
}

const args = parseArguments();

// Export results, so that spans that could not be exported fail the run.
const exportFailures = [];
let exportedSpans = 0;
class CheckedExporter {
  constructor(inner) {
    this.inner = inner;
  }
  export(spans, resultCallback) {
    this.inner.export(spans, (result) => {
      if (result.code === ExportResultCode.SUCCESS) {
        exportedSpans += spans.length;
      } else {
        exportFailures.push(String(result.error || 'export failed'));
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

if (!process.env.OTEL_EXPORTER_OTLP_ENDPOINT && !process.env.OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) {
  fail('OTEL_EXPORTER_OTLP_ENDPOINT is not set');
}
const provider = new NodeTracerProvider({
  resource: resourceFromAttributes({ 'service.name': SERVICE }),
  sampler: new ParentBasedSampler({ root: new TraceIdRatioBasedSampler(args.ratio) }),
  // The exporter reads OTEL_EXPORTER_OTLP_ENDPOINT and appends /v1/traces.
  spanProcessors: [new BatchSpanProcessor(new CheckedExporter(new OTLPTraceExporter()))],
});
// The global tracer provider, the W3C trace-context propagator and the
// AsyncLocalStorage context manager.
provider.register();

// Each CLIENT span's context, by the ClientRequest it was made for.
const clientSpans = new WeakMap();
registerInstrumentations({
  instrumentations: [
    new HttpInstrumentation({
      requestHook(span, request) {
        // Called for the server's requests too (IncomingMessage), and only
        // once `http` below is loaded.
        if (request instanceof http.ClientRequest) {
          clientSpans.set(request, span.spanContext());
        }
      },
    }),
  ],
});

// Only now, so that the instrumentation patches them.
const http = require('http');
const https = require('https');
// The module requests go through: https with --tls.
const web = args.tls ? https : http;

// What the server saw of each request, by the traceparent it carried.
const served = new Map();
// Responses whose last byte the server handed over: their SERVER spans end
// then ('finish'), which over TLS may come after the client read the response.
let finished = 0;
let onFinished = () => {};
const handler = (req, res) => {
  res.on('finish', () => {
    finished += 1;
    onFinished();
  });
  const traceparent = req.headers.traceparent;
  const seen = { remotePort: req.socket.remotePort, count: 0 };
  req.on('data', () => {});
  req.on('end', () => {
    if (typeof traceparent === 'string') {
      const earlier = served.get(traceparent);
      seen.count = earlier ? earlier.count + 1 : 1;
      served.set(traceparent, seen);
    }
    setTimeout(() => {
      const body = 'ok\n';
      res.writeHead(200, {
        'Content-Type': 'text/plain',
        'Content-Length': Buffer.byteLength(body),
      });
      res.end(body);
    }, args.delayMs);
  });
};
const server = args.tls
  ? https.createServer({ key: args.tls.key, cert: args.tls.cert }, handler)
  : http.createServer(handler);

function listen(host) {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host, port: args.port, ipv6Only: host === '::1' }, () => {
      server.off('error', reject);
      resolve(server.address().port);
    });
  });
}

// One request, to its end: the response read whole.
function request(host, port, agent, path) {
  return new Promise((resolve, reject) => {
    const headers = agent === false ? { Connection: 'close' } : {};
    const options = { host, port, path, method: args.method, agent, headers, timeout: TIMEOUT_MS };
    if (args.tls) options.ca = args.tls.cert;
    // No span is active here: the instrumentation's CLIENT span is the root.
    const req = web.request(options, (res) => {
      const socket = res.socket;
      const ports = { local: socket.localPort, remote: socket.remotePort };
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (chunk) => {
        body += chunk;
      });
      res.on('end', () => resolve({ req, res, body, socket, ports }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${args.method} ${path}: timed out`)));
    req.on('error', reject);
    req.end();
  });
}

async function main() {
  const host = args.family === 4 ? '127.0.0.1' : '::1';
  const serverPort = await listen(host);
  const agent =
    args.mode === 'keepalive'
      ? new web.Agent({ keepAlive: true, maxSockets: 1, ...(args.tls ? { ca: args.tls.cert } : {}) })
      : false;
  const report = [];
  let firstSocket = null;
  for (let n = 0; n < args.requests; n++) {
    if (api.trace.getActiveSpan()) fail('a span is active where a request is made');
    const path = `/${n}`;
    const { req, res, body, socket, ports } = await request(host, serverPort, agent, path);
    const where = `${args.method} ${path}`;
    if (res.statusCode !== 200 || body !== 'ok\n') {
      fail(`${where}: status ${res.statusCode}, body ${JSON.stringify(body)}`);
    }
    const traceparent = req.getHeader('traceparent');
    const match = typeof traceparent === 'string' && TRACEPARENT.exec(traceparent);
    if (!match) fail(`${where}: sent no valid traceparent (${JSON.stringify(traceparent)})`);
    const [, traceId, spanId, flags] = match;
    const spanContext = clientSpans.get(req);
    if (!spanContext || spanContext.traceId !== traceId || spanContext.spanId !== spanId) {
      fail(
        `${where}: traceparent ${traceparent} is not its CLIENT span's context ` +
          JSON.stringify(spanContext),
      );
    }
    const sampled = (parseInt(flags, 16) & 1) === 1;
    if (sampled !== ((spanContext.traceFlags & api.TraceFlags.SAMPLED) !== 0)) {
      fail(`${where}: traceparent ${traceparent} and its span disagree on sampling`);
    }
    const seen = served.get(traceparent);
    if (!seen || seen.count !== 1) {
      fail(`${where}: the server got ${traceparent} ${seen ? seen.count : 0} times`);
    }
    if (seen.remotePort !== ports.local || ports.remote !== serverPort) {
      fail(
        `${where}: client port ${ports.local} -> ${ports.remote}, ` +
          `the server saw ${seen.remotePort} -> ${serverPort}`,
      );
    }
    if (args.mode === 'keepalive') {
      if (firstSocket === null) firstSocket = socket;
      else if (socket !== firstSocket || ports.local !== report[0].client_port) {
        fail(
          `${where}: the connection was not kept alive ` +
            `(port ${ports.local}, first ${report[0].client_port})`,
        );
      }
    }
    report.push({
      trace_id: traceId,
      span_id: spanId,
      sampled,
      traceparent,
      client_port: ports.local,
      server_port: serverPort,
      status: res.statusCode,
    });
  }
  if (agent) agent.destroy();
  await new Promise((resolve) => {
    onFinished = () => finished >= args.requests && resolve();
    onFinished();
  });
  await new Promise((resolve) => server.close(resolve));
  // Every span ended by now (the SERVER ones when their responses finished):
  // export them all before telling anyone the run is over.
  try {
    await provider.shutdown();
  } catch (error) {
    exportFailures.push(String(error));
  }
  if (exportFailures.length) fail(`could not export spans: ${exportFailures.join('; ')}`);
  const sampledCount = report.filter((r) => r.sampled).length;
  // One CLIENT and one SERVER span per sampled request.
  if (exportedSpans !== 2 * sampledCount) {
    fail(
      `exported ${exportedSpans} spans, want ${2 * sampledCount} ` +
        `(${sampledCount} sampled requests)`,
    );
  }
  process.stdout.write(
    JSON.stringify({
      server_port: serverPort,
      pid: process.pid,
      family: args.family,
      mode: args.mode,
      requests: report,
    }) + '\n',
  );
}

main().catch((error) => fail(error && error.stack ? error.stack : String(error)));
