//! TLS for the tests: a throwaway CA that signs a server certificate for localhost
//! and 127.0.0.1 and a client certificate, files to hand the daemon, and the
//! server side of the OTLP receiver over TLS (tonic's for gRPC, rustls + hyper
//! for HTTP).

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicUsize, Ordering},
    },
};

use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        server::WebPkiClientVerifier,
    },
};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A CA and what it signed, all PEM.
pub struct Pki {
    pub ca: String,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: String,
    pub client_key: String,
}

impl Pki {
    /// A fresh CA, a server certificate for `localhost` and `127.0.0.1`, and a
    /// client certificate.
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "otel-tcpstates test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let leaf = |names: &[&str], purpose| {
            let key = KeyPair::generate().unwrap();
            let mut params =
                CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                    .unwrap();
            params.extended_key_usages = vec![purpose];
            let cert = params.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            &["otel-tcpstates.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        Pki {
            ca: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }

    /// The receiver's side: this server certificate, and, with `require_client`,
    /// only clients with a certificate from this CA.
    pub fn server(&self, require_client: bool) -> ServerTls {
        ServerTls {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: require_client.then(|| self.ca.clone()),
            refused: Arc::default(),
        }
    }
}

/// A directory of files for the daemon, removed when dropped.
pub struct Files(PathBuf);

impl Files {
    pub fn new() -> Files {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "otel-tcpstates-tls-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Files(dir)
    }

    /// Writes `contents` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_owned()
    }

    /// A path in the directory where nothing is.
    pub fn missing(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How the receiver serves TLS.
#[derive(Clone)]
pub struct ServerTls {
    pub cert: String,
    pub key: String,
    /// Set: clients must present a certificate this CA signed.
    pub client_ca: Option<String>,
    /// Why TLS handshakes over HTTP failed, shared by clones.
    refused: Arc<Mutex<Vec<String>>>,
}

/// rustls has two crypto providers in this build (ring, and aws-lc-rs through
/// reqwest) and then picks neither by itself; tonic's server asks for the
/// process default.
fn crypto() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    });
}

impl ServerTls {
    /// Why the HTTP server's TLS handshakes failed so far (tonic keeps the gRPC
    /// server's to itself).
    pub fn refused(&self) -> Vec<String> {
        self.refused.lock().unwrap().clone()
    }

    pub fn grpc(&self) -> ServerTlsConfig {
        crypto();
        let config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key));
        match &self.client_ca {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }

    fn acceptor(&self) -> TlsAcceptor {
        crypto();
        let certs = CertificateDer::pem_slice_iter(self.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.key.as_bytes()).unwrap();
        let builder = ServerConfig::builder();
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(cert.unwrap()).unwrap();
                }
                let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        TlsAcceptor::from(Arc::new(builder.with_single_cert(certs, key).unwrap()))
    }
}

/// Serves `app` over HTTP/1.1 in TLS on `listener` until dropped. A failed
/// handshake only ends that connection, as in a real collector.
pub async fn serve_https(
    listener: tokio::net::TcpListener,
    tls: ServerTls,
    app: axum::Router,
) -> std::io::Result<()> {
    let acceptor = tls.acceptor();
    loop {
        let (tcp, _) = listener.accept().await?;
        let (acceptor, app, refused) = (acceptor.clone(), app.clone(), Arc::clone(&tls.refused));
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(stream) => stream,
                Err(err) => {
                    eprintln!("OTLP/HTTP receiver: TLS handshake failed: {err}");
                    refused.lock().unwrap().push(err.to_string());
                    return;
                }
            };
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                .await;
        });
    }
}
