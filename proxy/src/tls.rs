//! HTTPS on the traffic side: rustls terminates TLS in the proxy itself (no
//! sidecar, no cloud-specific LoadBalancer annotation), from a certificate
//! and key mounted from a `kubernetes.io/tls` Secret, and rotated without a
//! restart.
//!
//! # Crypto provider
//! rustls 0.23 needs one crypto provider. We compile in exactly one, `ring`,
//! and pass it explicitly to every config we build ([`provider`]) instead of
//! relying on a process-wide default, so nothing depends on which crate
//! happened to install one first. Why `ring`: it builds with only a C
//! compiler (aws-lc-rs, rustls' default, also needs cmake, and Go or a
//! pre-generated build for some targets), which keeps the image build and
//! cross builds simple and fast; it runs on every target we ship. The price:
//! no FIPS 140-3 validated module. A FIPS deployment would switch to
//! aws-lc-rs with its `fips` feature; only [`provider`] would change.
//!
//! # Rotation
//! Each certificate gets a `ServerConfig` of its own, and the acceptor loads
//! the current one from an `ArcSwap` for every handshake. A reload builds a
//! whole new pair, checks that the key belongs to the certificate, and swaps
//! in a new config: new handshakes use it, established connections keep the
//! one they were made with (the session keys do not depend on the
//! certificate after the handshake). A config of its own per certificate
//! also means a session cache of its own: a client cannot resume, after a
//! rotation, a session that was authenticated with the previous certificate
//! (which may have been rotated because its key leaked); it does a full
//! handshake and sees the new one. The Secret is mounted as a directory and
//! updated by the kubelet exactly like a ConfigMap, so the same
//! [`crate::watch::reload_loop`] drives the reload. A bad or mismatched pair
//! keeps the old one; the failure is logged and counted in
//! `canary_proxy_tls_reloads_total{result="failure"}`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::server::{Acceptor, Detected};
use crate::watch::{self, DirWatch, Reload, WatchConfig};

/// ALPN protocols offered, in order of preference (RFC 7301). A client that
/// offers ALPN but none of these is refused with `no_application_protocol`;
/// a client that offers no ALPN at all gets HTTP/1.1 (or h2 if it sends the
/// h2 preface anyway).
pub(crate) const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first (a Secret's `tls.crt`).
    pub cert: PathBuf,
    /// PEM private key (a Secret's `tls.key`).
    pub key: PathBuf,
    /// A client must finish the handshake within this long, or it is
    /// dropped.
    pub handshake_timeout: Duration,
}

impl TlsConfig {
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsConfig {
            cert: cert.into(),
            key: key.into(),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // The io error is in the message, not a `source`: a chain printer
    // (`{:#}`) would repeat it.
    #[error("{path}: cannot read the TLS {what}: {error}; give the path of the Secret's {file} and mount the Secret as a directory (not with subPath)", path = path.display())]
    Read {
        path: PathBuf,
        what: &'static str,
        file: &'static str,
        error: io::Error,
    },
    #[error("{path}: {problem}; it must hold the PEM certificate chain, leaf first, like a kubernetes.io/tls Secret's tls.crt", path = path.display())]
    Cert { path: PathBuf, problem: String },
    #[error("{path}: {problem}; it must hold a PEM private key (PKCS#8, PKCS#1 or SEC1), like a kubernetes.io/tls Secret's tls.key", path = path.display())]
    Key { path: PathBuf, problem: String },
    #[error("the private key in {key} does not belong to the certificate in {cert}; give the tls.key that was issued with this tls.crt (both from the same Secret)", key = key.display(), cert = cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// The one crypto provider (see the module docs for why `ring`).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the logs and the expiry gauge say about the served certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo {
    pub(crate) subject: String,
    /// Hex, colon-separated, as `openssl x509 -serial` would show it.
    pub(crate) serial: String,
    /// notAfter, in Unix seconds.
    pub(crate) not_after: i64,
}

impl CertInfo {
    pub(crate) fn parse(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("the first certificate is not valid X.509 ({e})"))?;
        Ok(CertInfo {
            subject: cert.subject().to_string(),
            serial: cert.raw_serial_as_string(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }
}

/// A validated pair, ready to serve.
#[derive(Debug)]
pub(crate) struct Pair {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) info: CertInfo,
}

/// Parse and check a pair: PEM certificates (at least one), one PEM private
/// key that the crypto provider can sign with, and the key matching the
/// leaf certificate. The paths only name the files in errors.
pub(crate) fn build(
    cert_path: &Path,
    cert_pem: &[u8],
    key_path: &Path,
    key_pem: &[u8],
) -> Result<Pair, TlsError> {
    let cert_err = |problem: String| TlsError::Cert {
        path: cert_path.to_owned(),
        problem,
    };
    let key_err = |problem: String| TlsError::Key {
        path: key_path.to_owned(),
        problem,
    };
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not valid PEM ({e})")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_err(
            "no certificate found (no -----BEGIN CERTIFICATE----- block)".into(),
        ));
    };
    let info = CertInfo::parse(leaf).map_err(cert_err)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            key_err("no private key found (no -----BEGIN ... PRIVATE KEY----- block)".into())
        }
        e => key_err(format!("not valid PEM ({e})")),
    })?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(format!("unusable private key ({e})")))?;
    let key = CertifiedKey::new(chain, signing_key);
    match key.keys_match() {
        // ring can always derive the public key, so `Unknown` does not
        // happen; were it to, accept the pair as rustls itself does.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(TlsError::Mismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            })
        }
        Err(e) => return Err(cert_err(e.to_string())),
    }
    Ok(Pair {
        key: Arc::new(key),
        info,
    })
}

async fn read(path: &Path, what: &'static str, file: &'static str) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path).await.map_err(|error| TlsError::Read {
        path: path.to_owned(),
        what,
        file,
        error,
    })
}

/// Read the certificate and the key as one consistent pair. They are two
/// files, so a kubelet swap can land between the two reads; re-reading the
/// certificate afterwards detects that (an unchanged certificate means the
/// key read belongs to it too) and the read is retried.
async fn read_pair(config: &TlsConfig) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let cert = || read(&config.cert, "certificate", "tls.crt");
    let mut before = cert().await?;
    for _ in 0..3 {
        let key = read(&config.key, "private key", "tls.key").await?;
        let after = cert().await?;
        if after == before {
            return Ok((before, key));
        }
        before = after;
    }
    // Still moving after several tries: go with the last read; a mismatch
    // is then caught by the key check and the next event reads again.
    let key = read(&config.key, "private key", "tls.key").await?;
    Ok((before, key))
}

/// The pair being served: what the expiry gauge and the logs describe, and
/// the rustls config that serves it.
#[derive(Debug)]
struct Served {
    info: CertInfo,
    config: Arc<rustls::ServerConfig>,
}

impl Served {
    fn new(pair: Pair) -> Arc<Self> {
        Arc::new(Served {
            config: server_config(pair.key),
            info: pair.info,
        })
    }
}

/// Always the one pair a config was built for (see the module docs for why
/// a rotation builds a new config instead of swapping the pair underneath).
#[derive(Debug)]
struct OnePair(Arc<CertifiedKey>);

impl ResolvesServerCert for OnePair {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A rustls server config for `key`, with a session cache of its own.
fn server_config(key: Arc<CertifiedKey>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OnePair(key)));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The HTTPS side of the proxy: the served pair, the handshake, and the
/// reload.
pub(crate) struct Tls {
    config: TlsConfig,
    served: Arc<ArcSwap<Served>>,
    /// The bytes the active pair was built from.
    loaded: (Vec<u8>, Vec<u8>),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("config", &self.config)
            .field("cert", &self.info())
            .finish()
    }
}

impl Tls {
    /// Load and check the pair; any problem is an error naming the file,
    /// fatal at start-up (there is no previous certificate to keep).
    pub(crate) async fn load(config: TlsConfig) -> Result<Tls, TlsError> {
        let (cert_pem, key_pem) = read_pair(&config).await?;
        let pair = build(&config.cert, &cert_pem, &config.key, &key_pem)?;
        Ok(Tls {
            config,
            served: Arc::new(ArcSwap::new(Served::new(pair))),
            loaded: (cert_pem, key_pem),
        })
    }

    /// The certificate new handshakes get.
    pub(crate) fn info(&self) -> CertInfo {
        self.served.load().info.clone()
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor {
            served: self.served.clone(),
            handshake_timeout: self.config.handshake_timeout,
        }
    }

    /// Export the expiry and watch the certificate's and key's directories
    /// until `stop`.
    pub(crate) fn spawn_reloader(
        &self,
        metrics: Arc<Metrics>,
        config: &WatchConfig,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        metrics.tls_enabled();
        metrics.tls_cert_expiry.set(self.info().not_after as f64);
        let mut dirs = vec![watch::parent_dir(&self.config.cert).to_owned()];
        let key_dir = watch::parent_dir(&self.config.key).to_owned();
        if !dirs.contains(&key_dir) {
            dirs.push(key_dir);
        }
        let reload = CertReload {
            config: self.config.clone(),
            served: self.served.clone(),
            metrics,
        };
        let watch = DirWatch::new(dirs, config, "TLS certificate");
        tokio::spawn(watch::reload_loop(reload, watch, self.loaded.clone(), stop))
    }
}

/// The TLS handshake as the server's [`Acceptor`]: it runs in the
/// connection's own task, under a timeout, so a client that connects and
/// stalls holds neither an accept slot nor a task for long.
#[derive(Clone)]
pub(crate) struct TlsAcceptor {
    served: Arc<ArcSwap<Served>>,
    handshake_timeout: Duration,
}

impl Acceptor for TlsAcceptor {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;

    /// The protocol is decided by ALPN during the handshake, which has a
    /// timeout of its own (`handshake_timeout`).
    async fn accept(
        &self,
        stream: TcpStream,
        _deadline: Instant,
    ) -> io::Result<(Self::Io, Detected)> {
        // A plaintext request or a client with no protocol in common fails
        // here, for this connection only.
        let acceptor = tokio_rustls::TlsAcceptor::from(self.served.load().config.clone());
        let io = match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "TLS handshake not finished within {}",
                        humantime::format_duration(self.handshake_timeout)
                    ),
                ))
            }
        };
        let h2 = io.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        Ok((io, if h2 { Detected::H2 } else { Detected::Http1 }))
    }

    fn is_tls(&self) -> bool {
        true
    }
}

/// What the reload loop runs for the certificate and key.
struct CertReload {
    config: TlsConfig,
    served: Arc<ArcSwap<Served>>,
    metrics: Arc<Metrics>,
}

impl Reload for CertReload {
    type Content = (Vec<u8>, Vec<u8>);
    type Error = TlsError;

    async fn read(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        read_pair(&self.config).await
    }

    async fn apply(&mut self, pair: &(Vec<u8>, Vec<u8>), recovering: bool) -> Result<(), TlsError> {
        let new = build(&self.config.cert, &pair.0, &self.config.key, &pair.1)?;
        let old = self.served.load_full();
        self.metrics.tls_last_reload_ok.set(1);
        if old.info == new.info && recovering {
            tracing::info!(serial = %old.info.serial, "TLS certificate is readable again with the served content");
            return Ok(());
        }
        tracing::info!(
            subject = %new.info.subject,
            serial = %new.info.serial,
            not_after = %unix_to_rfc3339(new.info.not_after),
            previous_serial = %old.info.serial,
            "TLS certificate reloaded; new handshakes use it, open connections keep theirs"
        );
        self.metrics.tls_cert_expiry.set(new.info.not_after as f64);
        self.served.store(Served::new(new));
        self.metrics.tls_reload(true);
        Ok(())
    }

    fn failed(&mut self, error: TlsError) {
        let active = &self.served.load().info;
        tracing::error!(error = %error, active_serial = %active.serial, active_subject = %active.subject, "TLS certificate reload failed; still serving the previous certificate");
        self.metrics.tls_reload(false);
        self.metrics.tls_last_reload_ok.set(0);
    }
}

fn unix_to_rfc3339(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
            .to_string(),
        Err(_) => secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cn: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.serial_number = Some(rcgen::SerialNumber::from(42u64));
        params.not_after = rcgen::date_time_ymd(2040, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn try_build(cert: &str, key: &str) -> Result<Pair, TlsError> {
        build(
            Path::new("/s/tls.crt"),
            cert.as_bytes(),
            Path::new("/s/tls.key"),
            key.as_bytes(),
        )
    }

    #[test]
    fn a_good_pair_is_described() {
        let (cert, key) = pair("front-door");
        let p = try_build(&cert, &key).unwrap();
        assert_eq!(p.info.subject, "CN=front-door");
        assert_eq!(p.info.serial, "2a");
        // 2040-01-02T00:00:00Z
        assert_eq!(p.info.not_after, 2_209_075_200);
    }

    #[test]
    fn problems_name_the_file_at_fault() {
        let (cert, key) = pair("a");
        let (_, other_key) = pair("b");
        let e = try_build(&cert, &other_key).unwrap_err().to_string();
        assert!(matches!(
            try_build(&cert, &other_key),
            Err(TlsError::Mismatch { .. })
        ));
        assert!(e.contains("/s/tls.key") && e.contains("/s/tls.crt"), "{e}");

        let e = try_build("garbage", &key).unwrap_err().to_string();
        assert!(e.starts_with("/s/tls.crt: no certificate found"), "{e}");

        let e = try_build(&cert, "garbage").unwrap_err().to_string();
        assert!(e.starts_with("/s/tls.key: no private key found"), "{e}");

        // Swapped files: the key file holds a certificate and vice versa.
        let e = try_build(&key, &cert).unwrap_err().to_string();
        assert!(e.starts_with("/s/tls.crt:"), "{e}");

        let truncated = cert.replace("-----END CERTIFICATE-----", "");
        let e = try_build(&truncated, &key).unwrap_err().to_string();
        assert!(e.starts_with("/s/tls.crt: not valid PEM"), "{e}");
    }
}
