//! The exporter's TLS trust, from the standard variables: CA certificates to trust
//! besides the system's (`OTEL_EXPORTER_OTLP_[SIGNAL_]CERTIFICATE`) and a client
//! certificate for mutual TLS (`…_CLIENT_CERTIFICATE`, `…_CLIENT_KEY`). Files are
//! read and checked once, at start-up, so a bad one is a usage error, not a
//! stream of failed exports.
use std::{path::Path, thread, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use base64::Engine as _;
use opentelemetry_otlp::tonic_types::transport::{ClientTlsConfig, Identity};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

use crate::{
    otlp::{
        config::{ClientCert, KeyKind, Trust},
        liveness::{CONNECT_TIMEOUT, UNACKNOWLEDGED_TIMEOUT},
    },
    usage::UsageError,
};

/// The variable that sets `what` for `signal` (`TRACES`, `METRICS`, `LOGS`): the
/// signal's own, else the general one; with its value, trimmed.
fn lookup(
    signal: &str,
    what: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Option<(String, String)> {
    [
        format!("OTEL_EXPORTER_OTLP_{signal}_{what}"),
        format!("OTEL_EXPORTER_OTLP_{what}"),
    ]
    .into_iter()
    .find_map(|name| {
        let value = env(&name)?.trim().to_owned();
        (!value.is_empty()).then_some((name, value))
    })
}

/// A PEM parse error, without the bytes some variants carry (they could be a key's).
fn pem_reason(err: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error;
    match err {
        Error::MissingSectionEnd { .. } => "a section has no END line",
        Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        Error::Base64Decode(_) => "a section is not valid base64",
        Error::SectionTooLarge => "a section is too large",
        _ => "it cannot be parsed",
    }
}

fn read(name: &str, path: &str, should: &str) -> Result<Vec<u8>, UsageError> {
    std::fs::read(Path::new(path))
        .map_err(|err| UsageError(format!("{name}: cannot read '{path}' ({err}); {should}")))
}

/// Every certificate in the PEM file `path` names; at least one.
fn certificates(
    name: &str,
    path: &str,
    should: &str,
) -> Result<Vec<CertificateDer<'static>>, UsageError> {
    let pem = read(name, path, should)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            UsageError(format!(
                "{name}: '{path}' is not valid PEM ({}); {should}",
                pem_reason(&err)
            ))
        })?;
    if certs.is_empty() {
        return Err(UsageError(format!(
            "{name}: '{path}' holds no PEM certificate (-----BEGIN CERTIFICATE-----); {should}"
        )));
    }
    Ok(certs)
}

const SHOULD_CA: &str = "it should name a PEM file of CA certificates";
const SHOULD_CLIENT_CERT: &str = "it should name the client's PEM certificate";
const SHOULD_CLIENT_KEY: &str = "it should name the client's PEM private key";

impl Trust {
    /// Reads and checks the files that `signal`'s TLS variables (`TRACES`, `METRICS`,
    /// `LOGS`: the signal's own, else the general ones) name. `None` when none is
    /// set: the system's roots alone, no client certificate.
    pub fn from_vars(
        signal: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, UsageError> {
        let ca = lookup(signal, "CERTIFICATE", &env);
        let cert = lookup(signal, "CLIENT_CERTIFICATE", &env);
        let key = lookup(signal, "CLIENT_KEY", &env);
        if ca.is_none() && cert.is_none() && key.is_none() {
            return Ok(None);
        }
        let mut trust = Trust::default();
        if let Some((name, path)) = &ca {
            trust.roots = certificates(name, path, SHOULD_CA)?;
            // As the TLS stacks will take them: a CA they cannot parse would
            // otherwise be skipped without a word.
            let mut store = RootCertStore::empty();
            for (at, root) in trust.roots.iter().enumerate() {
                store.add(root.clone()).map_err(|err| {
                    UsageError(format!(
                        "{name}: certificate {} in '{path}' is not a usable CA certificate ({err}); {SHOULD_CA}",
                        at + 1
                    ))
                })?;
            }
        }
        trust.client = match (cert, key) {
            (None, None) => None,
            (Some((name, _)), None) => {
                return Err(UsageError(format!(
                    "{name} is set but no client key is (OTEL_EXPORTER_OTLP_{signal}_CLIENT_KEY or \
                     OTEL_EXPORTER_OTLP_CLIENT_KEY); mutual TLS needs both"
                )));
            }
            (None, Some((name, _))) => {
                return Err(UsageError(format!(
                    "{name} is set but no client certificate is (OTEL_EXPORTER_OTLP_{signal}_CLIENT_CERTIFICATE \
                     or OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE); mutual TLS needs both"
                )));
            }
            (Some(cert), Some(key)) => Some(client_cert(cert, key)?),
        };
        Ok(Some(trust))
    }

    /// For OTLP/gRPC over `https://`: the system's roots and ours, and the client
    /// certificate if there is one.
    pub fn tonic_config(&self) -> Result<ClientTlsConfig> {
        let roots = self.root_store()?;
        let mut config = ClientTlsConfig::new().trust_anchors(roots.roots);
        if let Some(client) = &self.client {
            let (kind, key) = &client.key;
            config = config.identity(Identity::from_pem(
                pem(&client.chain, None),
                pem(&[], Some((*kind, key))),
            ));
        }
        Ok(config)
    }

    /// For OTLP/HTTP: a blocking client (as opentelemetry-otlp's own) that trusts
    /// the system's roots and ours, presents the client certificate if there is
    /// one, gives up on a request after `timeout` and on a dead connection sooner
    /// (see `otlp::liveness`).
    pub fn http_client(&self, timeout: Duration) -> Result<reqwest::blocking::Client> {
        let roots = self
            .roots
            .iter()
            .map(|der| reqwest::Certificate::from_der(der))
            .collect::<Result<Vec<_>, _>>()
            .context("loading the CA certificates")?;
        let identity = match &self.client {
            Some(client) => {
                let (kind, key) = &client.key;
                let pem = pem(&client.chain, Some((*kind, key)));
                Some(
                    reqwest::Identity::from_pem(pem.as_bytes())
                        .context("loading the client certificate")?,
                )
            }
            None => None,
        };
        // reqwest's blocking client runs its own runtime and, in debug builds,
        // panics when built on a tokio runtime thread (which this is): build it on
        // a plain thread, as opentelemetry-otlp does for its default client.
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    let mut builder = reqwest::blocking::Client::builder()
                        .timeout(timeout)
                        .connect_timeout(CONNECT_TIMEOUT)
                        .tcp_user_timeout(UNACKNOWLEDGED_TIMEOUT)
                        .tls_certs_merge(roots);
                    if let Some(identity) = identity {
                        builder = builder.identity(identity);
                    }
                    builder.build()
                })
                .join()
                .map_err(|_| anyhow!("building the HTTP client panicked"))?
                .context("building the HTTP client")
        })
    }

    /// For the span exporter's own client, over either transport: the system's
    /// roots and ours, and the client certificate if there is one.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig> {
        let builder = client_builder(self.root_store()?)?;
        let config = match &self.client {
            Some(client) => {
                let (kind, der) = &client.key;
                let key = match kind {
                    KeyKind::Pkcs8 => PrivateKeyDer::Pkcs8(der.clone().into()),
                    KeyKind::Pkcs1 => PrivateKeyDer::Pkcs1(der.clone().into()),
                    KeyKind::Sec1 => PrivateKeyDer::Sec1(der.clone().into()),
                };
                builder
                    .with_client_auth_cert(client.chain.clone(), key)
                    .context("loading the client certificate")?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(config)
    }

    /// The system's roots and ours. Loaded here rather than by tonic
    /// (`with_native_roots`), which fails when the system has none, even though
    /// ours would do.
    fn root_store(&self) -> Result<RootCertStore> {
        let mut store = RootCertStore::empty();
        let system = rustls_native_certs::load_native_certs();
        for err in &system.errors {
            tracing::debug!("loading the system's CA certificates: {err}");
        }
        store.add_parsable_certificates(system.certs);
        for root in &self.roots {
            store.add(root.clone())?;
        }
        if store.is_empty() {
            anyhow::bail!(
                "no CA certificate to verify the collector with: none found on this system; \
                 set OTEL_EXPORTER_OTLP_CERTIFICATE to a PEM file of CA certificates"
            );
        }
        Ok(store)
    }
}

/// A rustls client configuration for a connector that never makes a TLS
/// connection (an http:// endpoint): no roots to load, so a system without CA
/// certificates is no obstacle.
pub fn unused_config() -> Result<rustls::ClientConfig> {
    Ok(client_builder(RootCertStore::empty())?.with_no_client_auth())
}

/// rustls with ring and its safe protocol versions, trusting `roots`.
fn client_builder(
    roots: RootCertStore,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_root_certificates(roots))
}

fn client_cert(
    (cert_name, cert_path): (String, String),
    (key_name, key_path): (String, String),
) -> Result<ClientCert, UsageError> {
    let chain = certificates(&cert_name, &cert_path, SHOULD_CLIENT_CERT)?;
    let pem = read(&key_name, &key_path, SHOULD_CLIENT_KEY)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|err| {
        let why = match err {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"
            }
            ref other => pem_reason(other),
        };
        UsageError(format!(
            "{key_name}: '{key_path}' {why}; {SHOULD_CLIENT_KEY}"
        ))
    })?;
    let kind = match &key {
        PrivateKeyDer::Pkcs8(_) => KeyKind::Pkcs8,
        PrivateKeyDer::Pkcs1(_) => KeyKind::Pkcs1,
        PrivateKeyDer::Sec1(_) => KeyKind::Sec1,
        _ => {
            return Err(UsageError(format!(
                "{key_name}: '{key_path}' holds a key of an unknown kind; {SHOULD_CLIENT_KEY}"
            )));
        }
    };
    let der = key.secret_der().to_vec();
    // The same check the TLS stacks make when they connect, made now: a key that
    // is not the certificate's, or of a kind they cannot use.
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider).map_err(|err| {
        UsageError(format!(
            "{key_name}: the key in '{key_path}' cannot be used with the certificate in \
             '{cert_path}' ({cert_name}): {err}"
        ))
    })?;
    Ok(ClientCert {
        chain,
        key: (kind, der),
    })
}

/// PEM text of certificates, then a key, and nothing else: reqwest refuses an
/// identity with any other section (such as the EC PARAMETERS that
/// `openssl ecparam -genkey` writes before the key).
fn pem(certs: &[CertificateDer<'_>], key: Option<(KeyKind, &[u8])>) -> String {
    let mut out = String::new();
    let mut section = |label: &str, der: &[u8]| {
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        out.push_str(&format!("-----BEGIN {label}-----\n"));
        for line in text.as_bytes().chunks(64) {
            // Base64 is ASCII.
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
    };
    for cert in certs {
        section("CERTIFICATE", cert);
    }
    if let Some((kind, der)) = key {
        section(kind.pem_label(), der);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

    use super::*;

    /// A file with `contents` in a fresh directory of its own.
    fn file(name: &str, contents: &[u8]) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir: PathBuf = std::env::temp_dir().join(format!(
            "otel-tcpstates-tls-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_owned()
    }

    struct Pki {
        ca: String,
        cert: String,
        key: String,
    }

    /// A CA and a certificate it signed, in PEM.
    fn pki() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "otel-tcpstates unit test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["client.test".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        Pki {
            ca: ca.pem(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    fn trust(vars: &[(&str, &str)]) -> Result<Option<Trust>, UsageError> {
        Trust::from_vars("TRACES", |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    /// The error, checked to be one line that names `var`.
    fn error(vars: &[(&str, &str)], var: &str) -> String {
        let err = trust(vars).unwrap_err().0;
        assert!(err.starts_with(var), "{err}");
        assert!(!err.contains('\n'), "{err}");
        err
    }

    const CA: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
    const TRACES_CA: &str = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE";
    const CERT: &str = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE";
    const KEY: &str = "OTEL_EXPORTER_OTLP_CLIENT_KEY";

    #[test]
    fn nothing_set_means_system_roots_only() {
        assert_eq!(trust(&[]), Ok(None));
        assert_eq!(trust(&[(CA, " ")]), Ok(None));
        // Another signal's variables are not ours.
        assert_eq!(
            trust(&[("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "/nonexistent")]),
            Ok(None)
        );
    }

    #[test]
    fn a_ca_file_is_read_and_the_signal_variable_wins() {
        let pki = pki();
        let both = format!("{}{}", pki.ca, pki.cert);
        let ca = file("ca.pem", pki.ca.as_bytes());
        let bundle = file("bundle.pem", both.as_bytes());
        let got = trust(&[(CA, &ca)]).unwrap().unwrap();
        assert_eq!(got.roots.len(), 1);
        assert!(got.client.is_none());
        let got = trust(&[(CA, "/nonexistent"), (TRACES_CA, &format!(" {bundle} "))])
            .unwrap()
            .unwrap();
        assert_eq!(got.roots.len(), 2);
        // The TLS configurations can be built from it.
        got.tonic_config().unwrap();
        got.http_client(Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn bad_ca_files_are_usage_errors_naming_variable_and_path() {
        let err = error(&[(CA, "/nonexistent/ca.pem")], CA);
        assert!(
            err.contains("cannot read '/nonexistent/ca.pem'")
                && err.ends_with("it should name a PEM file of CA certificates"),
            "{err}"
        );
        let dir = std::env::temp_dir();
        let err = error(&[(TRACES_CA, dir.to_str().unwrap())], TRACES_CA);
        assert!(err.contains("cannot read"), "{err}");

        let garbage = file("garbage.pem", b"not a certificate\n");
        let err = error(&[(CA, &garbage)], CA);
        assert!(
            err.contains(&format!("'{garbage}' holds no PEM certificate")),
            "{err}"
        );
        let empty = file("empty.pem", b"");
        error(&[(CA, &empty)], CA);
        // A key is not a certificate.
        let key = file("key.pem", pki().key.as_bytes());
        let err = error(&[(CA, &key)], CA);
        assert!(err.contains("holds no PEM certificate"), "{err}");

        let cut = pki().ca;
        let cut = file("cut.pem", &cut.as_bytes()[..cut.len() / 2]);
        let err = error(&[(CA, &cut)], CA);
        assert!(
            err.contains("is not valid PEM (a section has no END line)"),
            "{err}"
        );

        let bad_der = file(
            "bad-der.pem",
            b"-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
        );
        let err = error(&[(CA, &bad_der)], CA);
        assert!(
            err.contains(&format!(
                "certificate 1 in '{bad_der}' is not a usable CA certificate"
            )),
            "{err}"
        );
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let pki = pki();
        let cert = file("client.pem", pki.cert.as_bytes());
        let key = file("client.key", pki.key.as_bytes());
        let got = trust(&[(CERT, &cert), (KEY, &key)]).unwrap().unwrap();
        assert!(got.roots.is_empty());
        assert_eq!(got.client.as_ref().unwrap().chain.len(), 1);
        got.tonic_config().unwrap();
        got.http_client(Duration::from_secs(1)).unwrap();
        // The signal's own variable for one, the general one for the other.
        let traces_key = "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY";
        assert!(
            trust(&[(CERT, &cert), (traces_key, &key)])
                .unwrap()
                .is_some()
        );

        let err = error(&[(CERT, &cert)], CERT);
        assert!(err.contains("no client key is"), "{err}");
        let err = error(&[(traces_key, &key)], traces_key);
        assert!(err.contains("no client certificate is"), "{err}");
    }

    #[test]
    fn bad_client_keys_are_usage_errors_that_never_show_the_key() {
        let pki = pki();
        let cert = file("client.pem", pki.cert.as_bytes());
        let not_a_key = file("not-a-key.pem", pki.cert.as_bytes());
        let err = error(&[(CERT, &cert), (KEY, &not_a_key)], KEY);
        assert!(err.contains("holds no PEM private key"), "{err}");
        let missing = error(&[(CERT, &cert), (KEY, "/nonexistent/key.pem")], KEY);
        assert!(missing.contains("cannot read"), "{missing}");

        // Someone else's key.
        let other = KeyPair::generate().unwrap().serialize_pem();
        let other_file = file("other.key", other.as_bytes());
        let err = error(&[(CERT, &cert), (KEY, &other_file)], KEY);
        assert!(
            err.contains("cannot be used with the certificate in"),
            "{err}"
        );
        let body: Vec<&str> = other.lines().filter(|l| !l.starts_with("-----")).collect();
        for line in body {
            assert!(!err.contains(line), "key material in {err}");
        }
        let trust = trust(&[
            (CERT, &cert),
            (KEY, &file("client.key", pki.key.as_bytes())),
        ])
        .unwrap()
        .unwrap();
        let shown = format!("{trust:?}");
        assert_eq!(shown, "Trust { extra_roots: 0, client_certificate: true }");
    }

    #[test]
    fn pem_encoding_round_trips() {
        let pki = pki();
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(format!("{}{}", pki.ca, pki.cert).as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(pki.key.as_bytes()).unwrap();
        let text = pem(&certs, Some((KeyKind::Pkcs8, key.secret_der())));
        let again: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(again, certs);
        assert_eq!(
            PrivateKeyDer::from_pem_slice(text.as_bytes())
                .unwrap()
                .secret_der(),
            key.secret_der()
        );
        assert!(text.lines().all(|l| l.len() <= 64), "{text}");
    }
}
