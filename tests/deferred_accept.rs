//! Deferred accepts (`TCP_DEFER_ACCEPT`: nginx `deferred`, HAProxy
//! `defer-accept`): the handshake's bare ACK is dropped, and the request itself
//! completes the handshake, in the segment that creates the server's socket.
//! The packet program sees that segment on the listener; with `--links` its
//! `traceparent` must still become a link on the connection that carried it,
//! on both ends, and never on the listener.
mod support;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::Duration,
};

use support::{
    otlp::{KIND_CLIENT, KIND_SERVER, ROOT, ReceivedSpan, Receiver, WAIT},
    *,
};

/// Answers each request on its connection and closes it; its listener defers
/// accepts until data arrives.
const SERVER: &str = r#"
import socket, sys
port = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
s.bind(("127.0.0.1", port))
s.listen(128)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.recv(4096)
    c.sendall(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    c.close()
"#;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The root of the socket on `local` talking to `peer`, of `kind`.
fn root(spans: &[ReceivedSpan], kind: i32, local: u16, peer: u16) -> Option<&ReceivedSpan> {
    spans.iter().find(|s| {
        s.name == ROOT
            && s.kind == kind
            && s.int_attr("network.local.port") == Some(i64::from(local))
            && s.int_attr("network.peer.port") == Some(i64::from(peer))
    })
}

/// The (trace id, span id) of each link of `span`.
fn links(span: Option<&ReceivedSpan>) -> Vec<(String, String)> {
    span.map(|s| {
        s.links
            .iter()
            .map(|l| (l.trace_id.clone(), l.span_id.clone()))
            .collect()
    })
    .unwrap_or_default()
}

/// Clients each send one request, with a `traceparent` of their own, in the
/// first data segment; the server defers its accepts. Every accepted socket's
/// root links that request's context, and so does its client's; the
/// listener's root links nothing.
#[test]
fn a_deferred_accept_carries_its_requests_link() {
    if !root_or_skip("a_deferred_accept_carries_its_requests_link") {
        return;
    }
    const CLIENTS: usize = 8;
    let port = 23_000 + (std::process::id() % 1000) as u16;
    let rx = Receiver::start();
    let tracer = Tracer::linking_to(&rx, &[]);
    let mut child = Command::new("python3")
        .args(["-c", SERVER, &port.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/setup.sh --test installs it)");
    let mut said = BufReader::new(child.stdout.take().unwrap()).lines();
    let server = Server(child);
    assert_eq!(said.next().unwrap().unwrap(), "listening");

    let mut sent = Vec::new();
    for i in 0..CLIENTS {
        let trace = format!("{:032x}", 0x5eed_0000_u128 + i as u128 + 1);
        let span = format!("{:016x}", 0xab00 + i as u64 + 1);
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client.set_nodelay(true).unwrap();
        let request =
            format!("GET /{i} HTTP/1.1\r\nHost: test\r\ntraceparent: 00-{trace}-{span}-01\r\n\r\n");
        client.write_all(request.as_bytes()).unwrap();
        // The server answers and closes only once it accepted: a bound far
        // beyond its defer timeout (5 s), so only a hang fails.
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 204"), "{answer:?}");
        sent.push((client.local_addr().unwrap().port(), trace, span));
    }

    let spans = rx.wait_for(WAIT, |s| {
        sent.iter().all(|(peer, ..)| {
            root(s, KIND_SERVER, port, *peer).is_some()
                && root(s, KIND_CLIENT, *peer, port).is_some()
        })
    });
    let (mut servers, mut clients) = (0, 0);
    let mut wrong = Vec::new();
    for (peer, trace, span) in &sent {
        let want = vec![(trace.clone(), span.clone())];
        let server_links = links(root(&spans, KIND_SERVER, port, *peer));
        let client_links = links(root(&spans, KIND_CLIENT, *peer, port));
        servers += usize::from(server_links == want);
        clients += usize::from(client_links == want);
        if server_links != want || client_links != want {
            wrong.push(format!(
                ":{peer} sent {want:?}: server root links {server_links:?}, client root links {client_links:?}"
            ));
        }
    }
    eprintln!(
        "{servers} of {CLIENTS} accepted sockets and {clients} of {CLIENTS} clients linked their request"
    );
    drop(server);
    let is_listener = |s: &ReceivedSpan| {
        s.name == ROOT
            && s.str_attr("tcpstates.role") == Some("listener")
            && s.int_attr("network.local.port") == Some(i64::from(port))
    };
    let spans = rx.wait_for(WAIT, |s| s.iter().any(is_listener));
    let listener: Vec<&ReceivedSpan> = spans.iter().filter(|s| is_listener(s)).collect();
    assert_eq!(listener.len(), 1, "the listener's root");
    let listener_links = links(Some(listener[0]));
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        listener_links.is_empty(),
        "the listener linked {listener_links:?}"
    );
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
}
