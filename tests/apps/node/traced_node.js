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
 * The sampling, the export and the options shared with traced_grpc.js (--family,
 * --ratio, --delay-ms, --port, --tls) are traced_common.js's: see there.
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

const api = require('@opentelemetry/api');
const { HttpInstrumentation } = require('@opentelemetry/instrumentation-http');

const common = require('./traced_common.js');

const { TRACEPARENT, TIMEOUT_MS } = common;
const fail = common.failer('traced_node.js');

function parseArguments() {
  const { values, family, ratio, delayMs, port, tls } = common.parseArguments(fail, {
    options: {
      requests: { type: 'string' },
      mode: { type: 'string', default: 'keepalive' },
      method: { type: 'string', default: 'GET' },
    },
    afterFamily(values) {
      const requests = Number(values.requests);
      if (!Number.isInteger(requests) || requests < 1) fail('--requests N (N >= 1) is required');
      if (values.mode !== 'keepalive' && values.mode !== 'new') fail('--mode is keepalive or new');
    },
    afterDelay(values) {
      if (!/^[A-Z]+$/.test(values.method)) fail('--method is an upper-case HTTP method');
    },
  });
  const requests = Number(values.requests);
  return { family, requests, mode: values.mode, ratio, delayMs, method: values.method, port, tls };
}

const args = parseArguments();

// Each CLIENT span's context, by the ClientRequest it was made for.
const clientSpans = new WeakMap();
const tracing = common.startTracing({
  fail,
  service: 'traced-node',
  ratio: args.ratio,
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
  // export them all before telling anyone the run is over, and check there is
  // one CLIENT and one SERVER span per sampled request.
  await tracing.finish(report, 'requests');
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

common.run(fail, main);
