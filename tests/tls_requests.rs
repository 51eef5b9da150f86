//! Requests inside TLS (issue 30): real OpenTelemetry-instrumented applications
//! from the registries make HTTPS requests over loopback, their TLS done by
//! OpenSSL, and the daemon, which runs before they start, reads each request's
//! `traceparent` in the plaintext through its uprobes on `SSL_write`/`SSL_read`
//! and puts it on the TCP socket that carried it, on both ends, as it does for
//! plaintext HTTP. A TLS connection with no HTTP inside makes no link.
mod support;

use std::process::Command;

use support::{
    app_links::{check_links, check_request_spans, links, root},
    apps::{LONG, Mode, Runtime, run_app_over},
    load,
    otlp::{ReceivedSpan, Receiver},
    *,
};

/// Test `test`: under the daemon with `--links --tls`, runs a Python `script`
/// (argv: the test certificates' directory, then `args`) that prints its
/// client's and its server's ports, waits for both ends' roots, stops the daemon
/// and returns the ports and what the receiver got (None: not root, skipped).
fn run_script(test: &str, script: &str, args: &[&str]) -> Option<(u16, u16, Vec<ReceivedSpan>)> {
    if !root_or_skip(test) {
        return None;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = Tracer::linking_to(&rx, &["--tls"]);
    let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/apps/certs");
    let out = Command::new("python3")
        .args(["-c", script, &certs.display().to_string()])
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ports: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let (client, server) = (ports[0], ports[1]);
    let both = |spans: &[ReceivedSpan]| {
        root(spans, client, server).is_some() && root(spans, server, client).is_some()
    };
    rx.wait_for(LONG, both);
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    Some((client, server, rx.spans()))
}

/// Runs the app over HTTPS with the daemon linking, and checks the links.
fn https_requests_are_linked(test: &str, runtime: Runtime, mode: Mode, family: u8) {
    if !root_or_skip(test) {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = Tracer::linking_to(&rx, &["--tls"]);
    assert!(
        tracer
            .stderr()
            .iter()
            .any(|l| l.contains("TLS requests read in")),
        "{:?}",
        tracer.stderr()
    );
    let app = run_app_over(
        &rx.http_endpoint(),
        runtime,
        family,
        mode,
        8,
        1.0,
        None,
        true,
    );
    let pairs: Vec<(u16, u16)> = app
        .requests
        .iter()
        .flat_map(|r| {
            [
                (r.client_port, r.server_port),
                (r.server_port, r.client_port),
            ]
        })
        .collect();
    let all_there =
        |spans: &[ReceivedSpan]| pairs.iter().all(|&(l, p)| root(spans, l, p).is_some());
    rx.wait_for(LONG, all_there);
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    let spans = rx.spans();
    check_links(&spans, &app);
    check_request_spans(&spans, &app);
    assert!(
        !done
            .stderr
            .iter()
            .any(|l| l.contains("TLS unmatched") && !l.contains(" 0 TLS unmatched")),
        "{:?}",
        done.stderr
    );
}

#[test]
fn python_requests_over_https_keepalive_ipv4() {
    https_requests_are_linked(
        "python_requests_over_https_keepalive_ipv4",
        Runtime::Python,
        Mode::KeepAlive,
        4,
    );
}

#[test]
fn python_requests_over_https_a_connection_each_ipv6() {
    https_requests_are_linked(
        "python_requests_over_https_a_connection_each_ipv6",
        Runtime::Python,
        Mode::New,
        6,
    );
}

/// asyncio's TLS encrypts into memory and sends from the event loop, where one
/// thread runs both the client's and the server's connections.
#[test]
fn python_asyncio_aiohttp_over_https_keepalive_ipv6() {
    https_requests_are_linked(
        "python_asyncio_aiohttp_over_https_keepalive_ipv6",
        Runtime::PythonAsyncio,
        Mode::KeepAlive,
        6,
    );
}

#[test]
fn python_asyncio_aiohttp_over_https_a_connection_each_ipv4() {
    https_requests_are_linked(
        "python_asyncio_aiohttp_over_https_a_connection_each_ipv4",
        Runtime::PythonAsyncio,
        Mode::New,
        4,
    );
}

#[test]
fn node_https_keepalive_ipv4() {
    https_requests_are_linked(
        "node_https_keepalive_ipv4",
        Runtime::Node,
        Mode::KeepAlive,
        4,
    );
}

#[test]
fn node_https_a_connection_each_ipv6() {
    https_requests_are_linked(
        "node_https_a_connection_each_ipv6",
        Runtime::Node,
        Mode::New,
        6,
    );
}

/// curl (the system's libssl) as the client: three requests over one kept-alive
/// connection, each with its own `traceparent`, to a Python HTTPS server; every
/// one is a link on both ends, in order.
#[test]
fn curl_over_https_links_each_request() {
    let script = r#"
import http.server, os, ssl, subprocess, sys, threading
certs = sys.argv[1]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(certs + "/cert.pem", certs + "/key.pem")
server.socket = context.wrap_socket(server.socket, server_side=True)
port = server.server_address[1]
threading.Thread(target=server.serve_forever, daemon=True).start()
ids = sys.argv[2:]
command = ["curl", "-sS", "--cacert", certs + "/cert.pem", "-o", "/dev/null", "-w", "%{local_port}\n"]
for n, tp in enumerate(ids):
    if n:
        command.append("--next")
    command += ["--cacert", certs + "/cert.pem", "-o", "/dev/null", "-w", "%{local_port}\n",
                "-H", "traceparent: " + tp, f"https://localhost:{port}/{n}"]
out = subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()
if len(set(out)) != 1:
    raise SystemExit(f"curl used more than one connection: {out}")
print(out[0], port)
"#;
    let ids = [
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-00",
        "00-2af7651916cd43dd8448eb211c80319c-d7ad6b7169203331-01",
    ];
    let Some((client, server, spans)) =
        run_script("curl_over_https_links_each_request", script, &ids)
    else {
        return;
    };
    for (local, peer, direction) in [(client, server, "sent"), (server, client, "received")] {
        let root = root(&spans, local, peer).unwrap_or_else(|| panic!("no root of {local}"));
        let want: Vec<(String, String)> = ids
            .iter()
            .map(|id| (id[3..52].to_owned(), direction.to_owned()))
            .collect();
        assert_eq!(links(root), want, "{direction} end {local} -> {peer}");
    }
}

/// A TLS connection that carries no HTTP (a line protocol) makes no link, on
/// either end.
#[test]
fn a_tls_connection_without_http_makes_no_link() {
    // A TLS echo of a few lines that look like headers but start no request.
    let script = r#"
import socket, ssl, sys, threading
certs = sys.argv[1]
server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_ctx.load_cert_chain(certs + "/cert.pem", certs + "/key.pem")
listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
def serve():
    conn, _ = listener.accept()
    with server_ctx.wrap_socket(conn, server_side=True) as tls:
        while data := tls.recv(4096):
            tls.sendall(data)
threading.Thread(target=serve, daemon=True).start()
client_ctx = ssl.create_default_context(cafile=certs + "/cert.pem")
with socket.create_connection(("127.0.0.1", port)) as raw:
    with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        line = b"HELLO 1\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\n\n"
        for _ in range(4):
            tls.sendall(line)
            got = b""
            while len(got) < len(line):
                got += tls.recv(4096)
        print(tls.getsockname()[1], port)
"#;
    let Some((client, server, spans)) =
        run_script("a_tls_connection_without_http_makes_no_link", script, &[])
    else {
        return;
    };
    for (local, peer) in [(client, server), (server, client)] {
        let root = root(&spans, local, peer).unwrap_or_else(|| panic!("no root of {local}"));
        assert_eq!(
            links(root),
            Vec::<(String, String)>::new(),
            "{local} -> {peer}"
        );
    }
}
