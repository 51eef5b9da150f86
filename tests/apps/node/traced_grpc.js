#!/usr/bin/env node
/*
 * A gRPC client and server in one Node.js process (@grpc/grpc-js), instrumented
 * with the OpenTelemetry JS SDK and its gRPC instrumentation, for the
 * otel-tcpstates tests: the W3C traceparent the instrumentation puts in each
 * call's metadata (a header in the call's HTTP/2 HEADERS frame) is what
 * otel-tcpstates turns into span links on the sockets' tcp.session roots.
 *
 * The SDK and GrpcInstrumentation are registered before `@grpc/grpc-js` is
 * loaded, as an instrumented app does: the instrumentation then makes a CLIENT
 * span for each call (the trace's root: no span is active when a call is made)
 * and injects its context into the call's metadata, and a SERVER span for each
 * call the server gets, under the context it carries. The sampling, the export
 * and the options shared with traced_node.js (--family, --ratio, --delay-ms,
 * --port, --tls) are traced_common.js's: see there.
 *
 *     node traced_grpc.js --family 4|6 --calls N --kind unary|stream
 *         [--ratio R] [--delay-ms D] [--port P] [--tls DIR] [--concurrent]
 *
 * The service is defined here, without a .proto file: otel.test.Echo, its
 * messages JSON in the gRPC frames. --kind unary: /otel.test.Echo/Unary, one
 * request, one response; stream: /otel.test.Echo/Stream, bidirectional: the
 * client writes 3 messages, each after the echo of the one before, the server
 * echoes each, then both ends close. The server answers (echoes) --delay-ms
 * after a message came. All calls go over one client channel, so over one
 * HTTP/2 connection (each call a stream of its own), one call after another;
 * with --concurrent (unary only) all at once, multiplexed, and the server
 * answers them in the reverse order: call n after (N - n) x --delay-ms.
 * The server listens on 127.0.0.1 (--family 4) or ::1 (6), port --port (0, the
 * default: any free one); plaintext HTTP/2 (h2c) unless --tls DIR: TLS with the
 * server's certificate and key in DIR/cert.pem and DIR/key.pem, which the
 * client trusts.
 *
 * On success it prints one JSON object on stdout:
 *   {"server_port": P, "pid": PID, "family": 4, "kind": "unary", "tls": false,
 *    "requests": [{"trace_id", "span_id", "sampled", "traceparent",
 *                  "client_port", "server_port", "status", "call"}, ...]}
 * one entry per call, in call order (with --concurrent: in the order the
 * server got them, which is their HEADERS frames' order), where trace_id, span_id and sampled come
 * from the traceparent the server got (the CLIENT span's context), client_port
 * is the client socket's local port as both ends saw it (the client's through
 * channelz, the server's through call.getPeer()), status is the call's gRPC
 * status code (0) and call its number (0 the first made). Any failure (a bad status, metadata the server did not get,
 * ports that do not agree, a call on a connection of its own, spans that could
 * not be exported) exits with status 1 and a message on stderr.
 */
'use strict';

const api = require('@opentelemetry/api');
const { GrpcInstrumentation } = require('@opentelemetry/instrumentation-grpc');

const common = require('./traced_common.js');

const { TRACEPARENT, TIMEOUT_MS } = common;
const fail = common.failer('traced_grpc.js');
// Messages per streaming call.
const STREAM_MESSAGES = 3;

function parseArguments() {
  const { values, family, ratio, delayMs, port, tls } = common.parseArguments(fail, {
    options: {
      calls: { type: 'string' },
      kind: { type: 'string' },
      concurrent: { type: 'boolean', default: false },
    },
    afterFamily(values) {
      const calls = Number(values.calls);
      if (!Number.isInteger(calls) || calls < 1) fail('--calls N (N >= 1) is required');
      if (values.kind !== 'unary' && values.kind !== 'stream') {
        fail('--kind unary or stream is required');
      }
    },
    afterTls(values) {
      if (values.concurrent && values.kind !== 'unary') fail('--concurrent is for --kind unary');
    },
  });
  return {
    family,
    calls: Number(values.calls),
    kind: values.kind,
    ratio,
    delayMs,
    port,
    tls,
    concurrent: values.concurrent,
  };
}

const args = parseArguments();

const tracing = common.startTracing({
  fail,
  service: 'traced-grpc',
  ratio: args.ratio,
  instrumentations: [new GrpcInstrumentation()],
});

// Only now, so that the instrumentation patches it.
const grpc = require('@grpc/grpc-js');

// The service, without a .proto file: messages are JSON.
const serialize = (value) => Buffer.from(JSON.stringify(value));
const deserialize = (buffer) => JSON.parse(buffer.toString('utf8'));
const method = (name, streaming) => ({
  path: `/otel.test.Echo/${name}`,
  requestStream: streaming,
  responseStream: streaming,
  requestSerialize: serialize,
  requestDeserialize: deserialize,
  responseSerialize: serialize,
  responseDeserialize: deserialize,
});
const ECHO = { unary: method('Unary', false), stream: method('Stream', true) };

// What the server saw of each call, by the traceparent it carried.
const served = new Map();
// Calls whose SERVER spans have ended: a unary call's when its handler answers,
// a stream's when the server's side of it finished, which may come after the
// client got the call's status.
let finished = 0;
let onFinished = () => {};
function serverFinished() {
  finished += 1;
  onFinished();
}

// The port at the end of a getPeer() ("127.0.0.1:P", "::1:P" or "[::1]:P").
function peerPort(peer) {
  const match = /:(\d+)$/.exec(peer);
  return match ? Number(match[1]) : null;
}

// Records what a call carried; false when it had no valid traceparent.
function record(call) {
  const values = call.metadata.get('traceparent');
  const traceparent = values.length === 1 ? String(values[0]) : null;
  const seen = {
    peer: call.getPeer(),
    remotePort: peerPort(call.getPeer()),
    count: 1,
    arrived: served.size,
  };
  if (traceparent === null || !TRACEPARENT.test(traceparent)) {
    process.stderr.write(
      `traced_grpc.js: the server got a call without a valid traceparent ` +
        `(${JSON.stringify(values.map(String))})\n`,
    );
    return false;
  }
  const earlier = served.get(traceparent);
  if (earlier) seen.count = earlier.count + 1;
  served.set(traceparent, seen);
  return true;
}

const handlers = {
  unary(call, callback) {
    if (!record(call)) {
      callback({ code: grpc.status.INVALID_ARGUMENT, details: 'no traceparent' });
      serverFinished();
      return;
    }
    // Concurrent calls are answered last first: each stream's answer is its
    // own, whatever the order.
    const delay = args.concurrent ? args.delayMs * (args.calls - call.request.n) : args.delayMs;
    setTimeout(() => {
      // The SERVER span ends in the instrumentation's callback, before this
      // returns.
      callback(null, { echo: call.request });
      serverFinished();
    }, delay);
  },
  stream(call) {
    // Added after the instrumentation's own 'finish' listener, which ends the
    // SERVER span.
    call.on('finish', serverFinished);
    if (!record(call)) {
      call.emit('error', { code: grpc.status.INVALID_ARGUMENT, details: 'no traceparent' });
      return;
    }
    let pending = 0;
    let ended = false;
    call.on('data', (message) => {
      pending += 1;
      setTimeout(() => {
        call.write({ echo: message });
        pending -= 1;
        if (ended && pending === 0) call.end();
      }, args.delayMs);
    });
    call.on('end', () => {
      ended = true;
      if (pending === 0) call.end();
    });
  },
};

// A promise that rejects if `promise` takes longer than TIMEOUT_MS.
function step(what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: timed out`)), TIMEOUT_MS);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// The client channel's sockets, as channelz sees them.
const channelz = grpc.getChannelzHandlers();
function channelzGet(name, request) {
  return new Promise((resolve, reject) => {
    channelz[name]({ request }, (error, value) =>
      error ? reject(new Error(`channelz ${name}: ${error.details}`)) : resolve(value),
    );
  });
}
async function clientSockets(client) {
  const channelId = client.getChannel().getChannelzRef().id;
  const { channel } = await channelzGet('GetChannel', { channel_id: channelId });
  const sockets = [];
  for (const { subchannel_id } of channel.subchannel_ref) {
    const { subchannel } = await channelzGet('GetSubchannel', { subchannel_id });
    for (const { socket_id } of subchannel.socket_ref) {
      sockets.push((await channelzGet('GetSocket', { socket_id })).socket);
    }
  }
  return sockets;
}

function deadline() {
  return new Date(Date.now() + TIMEOUT_MS);
}

// One unary call, to its status.
function unaryCall(client, n, metadata) {
  return new Promise((resolve, reject) => {
    let response;
    const call = client.unary({ n }, metadata, { deadline: deadline() }, (error, value) => {
      if (error) reject(new Error(`call ${n}: ${error.message}`));
      else response = value;
    });
    // After the callback.
    call.on('status', (status) => {
      if (status.code !== grpc.status.OK) return;
      if (!response || !response.echo || response.echo.n !== n) {
        reject(new Error(`call ${n}: response ${JSON.stringify(response)}`));
      } else {
        resolve(status);
      }
    });
  });
}

// One streaming call, to its status: each message written after the echo of
// the one before, then the client's side ended.
function streamCall(client, n, metadata) {
  return new Promise((resolve, reject) => {
    const call = client.stream(metadata, { deadline: deadline() });
    let echoes = 0;
    let status = null;
    let readEnded = false;
    const done = () => {
      if (status === null || !readEnded) return;
      if (status.code !== grpc.status.OK) {
        reject(new Error(`call ${n}: status ${status.code} ${status.details}`));
      } else if (echoes !== STREAM_MESSAGES) {
        reject(new Error(`call ${n}: ${echoes} echoes, want ${STREAM_MESSAGES}`));
      } else {
        resolve(status);
      }
    };
    call.on('data', (message) => {
      if (!message.echo || message.echo.n !== n || message.echo.m !== echoes) {
        reject(new Error(`call ${n}: echo ${JSON.stringify(message)}, want m ${echoes}`));
        return;
      }
      echoes += 1;
      if (echoes < STREAM_MESSAGES) call.write({ n, m: echoes });
      else call.end();
    });
    call.on('end', () => {
      readEnded = true;
      done();
    });
    call.on('status', (value) => {
      status = value;
      done();
    });
    call.on('error', (error) => reject(new Error(`call ${n}: ${error.message}`)));
    call.write({ n, m: 0 });
  });
}

async function main() {
  const host = args.family === 4 ? '127.0.0.1' : '::1';
  const hostPort = (port) => (args.family === 4 ? `${host}:${port}` : `[${host}]:${port}`);
  const server = new grpc.Server();
  server.addService(ECHO, handlers);
  const serverCredentials = args.tls
    ? grpc.ServerCredentials.createSsl(null, [
        { cert_chain: args.tls.cert, private_key: args.tls.key },
      ])
    : grpc.ServerCredentials.createInsecure();
  const serverPort = await step(
    'listen',
    new Promise((resolve, reject) => {
      server.bindAsync(hostPort(args.port), serverCredentials, (error, port) =>
        error ? reject(error) : resolve(port),
      );
    }),
  );
  const EchoClient = grpc.makeGenericClientConstructor(ECHO, 'otel.test.Echo');
  const client = new EchoClient(
    hostPort(serverPort),
    args.tls ? grpc.credentials.createSsl(args.tls.cert) : grpc.credentials.createInsecure(),
    {
      'grpc.enable_channelz': 1,
      // The certificate's DNS name, for SNI and the identity check: grpc-js
      // would otherwise set the TLS ServerName to the target's IP address,
      // which Node warns about (DEP0123).
      ...(args.tls ? { 'grpc.ssl_target_name_override': 'localhost' } : {}),
    },
  );

  const report = [];
  // Checks call n's traceparent and connection, after `streams` calls in all
  // have started on the channel, and reports it.
  const check = async (n, metadata, status, streams) => {
    const where = `call ${n}`;
    const sent = metadata.get('traceparent');
    const traceparent = sent.length === 1 ? String(sent[0]) : null;
    const match = traceparent !== null && TRACEPARENT.exec(traceparent);
    if (!match) fail(`${where}: sent no valid traceparent (${JSON.stringify(sent.map(String))})`);
    const [, traceId, spanId, flags] = match;
    const seen = served.get(traceparent);
    if (!seen || seen.count !== 1) {
      fail(`${where}: the server got ${traceparent} ${seen ? seen.count : 0} times`);
    }
    const sockets = await step(`${where}: channelz`, clientSockets(client));
    if (sockets.length !== 1) fail(`${where}: the channel has ${sockets.length} sockets, want 1`);
    const [socket] = sockets;
    const local = socket.local && socket.local.tcpip_address;
    const remote = socket.remote && socket.remote.tcpip_address;
    if (!local || !remote || seen.remotePort !== local.port || remote.port !== serverPort) {
      fail(
        `${where}: client port ${local && local.port} -> ${remote && remote.port}, ` +
          `the server saw ${seen.peer} -> ${serverPort}`,
      );
    }
    // Each call a stream of its own, all on the one connection.
    if (Number(socket.data.streams_started) !== streams) {
      fail(`${where}: the connection carried ${socket.data.streams_started} calls, want ${streams}`);
    }
    if (report.length > 0 && local.port !== report[0].client_port) {
      fail(`${where}: client port ${local.port}, the first call's ${report[0].client_port}`);
    }
    report.push({
      trace_id: traceId,
      span_id: spanId,
      sampled: (parseInt(flags, 16) & 1) === 1,
      traceparent,
      client_port: local.port,
      server_port: serverPort,
      status: status.code,
      call: n,
      arrived: seen.arrived,
    });
  };
  const call = args.kind === 'unary' ? unaryCall : streamCall;
  if (args.concurrent) {
    // All started before any is answered: one stream each, multiplexed.
    const calls = [];
    for (let n = 0; n < args.calls; n++) {
      if (api.trace.getActiveSpan()) fail('a span is active where a call is made');
      // The instrumentation injects the CLIENT span's context into this.
      const metadata = new grpc.Metadata();
      calls.push({ n, metadata, status: step(`call ${n}`, call(client, n, metadata)) });
    }
    for (const c of calls) await check(c.n, c.metadata, await c.status, args.calls);
    report.sort((a, b) => a.arrived - b.arrived);
  } else {
    for (let n = 0; n < args.calls; n++) {
      if (api.trace.getActiveSpan()) fail('a span is active where a call is made');
      const metadata = new grpc.Metadata();
      const status = await step(`call ${n}`, call(client, n, metadata));
      await check(n, metadata, status, n + 1);
    }
  }
  for (const r of report) delete r.arrived;
  await step(
    'server spans',
    new Promise((resolve) => {
      onFinished = () => finished >= args.calls && resolve();
      onFinished();
    }),
  );
  client.close();
  await step('server shutdown', new Promise((resolve) => server.tryShutdown(resolve)));
  // Every span ended by now: export them all before telling anyone the run is
  // over, and check there is one CLIENT and one SERVER span per sampled call,
  // none for the others.
  const exported = await tracing.finish(report, 'calls', (done) => step('export', done));
  for (const [n, r] of report.entries()) {
    const spans = exported.filter((s) => s.traceId === r.trace_id);
    // The CLIENT span the root, the SERVER span its child.
    const clientSpan = spans.find(
      (s) => s.kind === api.SpanKind.CLIENT && s.spanId === r.span_id && !s.parentSpanId,
    );
    const serverSpan = spans.find(
      (s) => s.kind === api.SpanKind.SERVER && s.parentSpanId === r.span_id,
    );
    if (spans.length !== (r.sampled ? 2 : 0) || (r.sampled && !(clientSpan && serverSpan))) {
      fail(`call ${n}: exported ${JSON.stringify(spans)} for ${r.traceparent}`);
    }
  }
  process.stdout.write(
    JSON.stringify({
      server_port: serverPort,
      pid: process.pid,
      family: args.family,
      kind: args.kind,
      tls: args.tls !== null,
      requests: report,
    }) + '\n',
  );
}

common.run(fail, main);
