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
//! The handshake asks [`CertStore`] for the key pair each time, and the
//! store holds it in an `ArcSwap`. A reload builds a whole new pair, checks
//! that the key belongs to the certificate, and swaps it in: new handshakes
//! use it, established connections keep the one they were made with (the
//! session keys do not depend on the certificate after the handshake).
//! Each certificate also gets a `ServerConfig` of its own, so its own session
//! cache: a client cannot resume, after a rotation, a session that was
//! authenticated with the previous certificate (which may have been rotated
//! because its key leaked); it does a full handshake and sees the new one.
//! The Secret is mounted as a directory and updated by the kubelet exactly like
//! a ConfigMap, so the same [`crate::watch::DirWatch`] drives the reload. A
//! bad or mismatched pair keeps the old one; the failure is logged and
//! counted in `canary_proxy_tls_reloads_total{result="failure"}`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::server::Acceptor;
use crate::watch::{self, DirWatch, WatchConfig};

/// ALPN protocols offered, in order of preference (RFC 7301). A client that
/// offers ALPN but none of these is refused with `no_application_protocol`;
/// a client that offers no ALPN at all gets HTTP/1.1 (or h2 if it sends the
/// h2 preface anyway).
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

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
    #[error("{path}: cannot read the TLS {what}: {source}; give the path of the Secret's {file} and mount the Secret as a directory (not with subPath)", path = path.display())]
    Read {
        path: PathBuf,
        what: &'static str,
        file: &'static str,
        source: io::Error,
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
pub struct CertInfo {
    pub subject: String,
    /// Hex, colon-separated, as `openssl x509 -serial` would show it.
    pub serial: String,
    /// notAfter, in Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertInfo, String> {
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
pub struct Pair {
    pub key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// Parse and check a pair: PEM certificates (at least one), one PEM private
/// key that the crypto provider can sign with, and the key matching the
/// leaf certificate. The paths only name the files in errors.
pub fn build(
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
    let chain = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not valid PEM ({e})")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_err(
            "no certificate found (no -----BEGIN CERTIFICATE----- block)".into(),
        ));
    };
    let info = CertInfo::parse(leaf).map_err(cert_err)?;
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| key_err(format!("not valid PEM ({e})")))?
        .ok_or_else(|| {
            key_err("no private key found (no -----BEGIN ... PRIVATE KEY----- block)".into())
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
    tokio::fs::read(path)
        .await
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            what,
            file,
            source,
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

/// The key pair new handshakes get. Swapped whole on rotation.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
    info: ArcSwap<CertInfo>,
}

impl CertStore {
    fn new(pair: Pair) -> Self {
        CertStore {
            current: ArcSwap::new(pair.key),
            info: ArcSwap::from_pointee(pair.info),
        }
    }

    fn store(&self, pair: Pair) {
        self.info.store(Arc::new(pair.info));
        self.current.store(pair.key);
    }

    /// The certificate new handshakes get.
    pub fn info(&self) -> Arc<CertInfo> {
        self.info.load_full()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A rustls server config for the pair in `store`, with an empty session
/// cache (see the module docs).
fn server_config(store: Arc<CertStore>) -> Arc<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// The HTTPS side of the proxy: the certificate store, the handshake, and
/// the reloader.
pub struct Tls {
    config: TlsConfig,
    store: Arc<CertStore>,
    server_config: Arc<ArcSwap<rustls::ServerConfig>>,
    /// The bytes the active pair was built from.
    loaded: (Vec<u8>, Vec<u8>),
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("config", &self.config)
            .field("cert", &self.store.info())
            .finish()
    }
}

impl Tls {
    /// Load and check the pair; any problem is an error naming the file,
    /// fatal at start-up (there is no previous certificate to keep).
    pub async fn load(config: TlsConfig) -> Result<Tls, TlsError> {
        let (cert_pem, key_pem) = read_pair(&config).await?;
        let pair = build(&config.cert, &cert_pem, &config.key, &key_pem)?;
        let store = Arc::new(CertStore::new(pair));
        Ok(Tls {
            config,
            server_config: Arc::new(ArcSwap::new(server_config(store.clone()))),
            store,
            loaded: (cert_pem, key_pem),
        })
    }

    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor {
            server_config: self.server_config.clone(),
            handshake_timeout: self.config.handshake_timeout,
        }
    }

    /// Export the expiry and watch the certificate's and key's directories
    /// until `stop`.
    pub fn spawn_reloader(
        &self,
        metrics: Arc<Metrics>,
        config: WatchConfig,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        metrics.tls_enabled();
        metrics
            .tls_cert_expiry
            .set(self.store.info().not_after as f64);
        let mut dirs = vec![watch::parent_dir(&self.config.cert).to_owned()];
        let key_dir = watch::parent_dir(&self.config.key).to_owned();
        if !dirs.contains(&key_dir) {
            dirs.push(key_dir);
        }
        let reloader = Reloader {
            config: self.config.clone(),
            store: self.store.clone(),
            server_config: self.server_config.clone(),
            last_seen: Some(self.loaded.clone()),
            metrics,
            watch: DirWatch::new(dirs, config, "TLS certificate"),
        };
        tokio::spawn(reloader.run(stop))
    }
}

/// The TLS handshake as the server's [`Acceptor`]: it runs in the
/// connection's own task, under a timeout, so a client that connects and
/// stalls holds neither an accept slot nor a task for long.
#[derive(Clone)]
pub struct TlsAcceptor {
    server_config: Arc<ArcSwap<rustls::ServerConfig>>,
    handshake_timeout: Duration,
}

impl Acceptor for TlsAcceptor {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;

    async fn accept(&self, stream: TcpStream) -> io::Result<Self::Io> {
        // A plaintext request or a client with no protocol in common fails
        // here, for this connection only.
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server_config.load_full());
        match tokio::time::timeout(self.handshake_timeout, acceptor.accept(stream)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "TLS handshake not finished within {}",
                    humantime::format_duration(self.handshake_timeout)
                ),
            )),
        }
    }

    fn is_tls(&self) -> bool {
        true
    }

    /// Decided by ALPN during the handshake.
    async fn is_h2(&self, io: &Self::Io, _limit: Duration) -> io::Result<bool> {
        Ok(io.get_ref().1.alpn_protocol() == Some(b"h2".as_slice()))
    }
}

struct Reloader {
    config: TlsConfig,
    store: Arc<CertStore>,
    server_config: Arc<ArcSwap<rustls::ServerConfig>>,
    /// Bytes of the last read pair, good or bad; `None` after a failed read.
    last_seen: Option<(Vec<u8>, Vec<u8>)>,
    metrics: Arc<Metrics>,
    watch: DirWatch,
}

impl Reloader {
    async fn run(mut self, stop: CancellationToken) {
        while self.watch.changed(&stop).await {
            self.check().await;
        }
    }

    async fn check(&mut self) {
        let pair = match read_pair(&self.config).await {
            Ok(p) => p,
            Err(e) => {
                // Counted once per outage, not on every periodic re-read.
                if self.last_seen.take().is_some() {
                    self.fail(&e);
                }
                return;
            }
        };
        if self.last_seen.as_ref() == Some(&pair) {
            return;
        }
        let recovering = self.last_seen.is_none();
        if recovering || !self.watch.is_watching() {
            self.watch.ensure();
        }
        let built = build(&self.config.cert, &pair.0, &self.config.key, &pair.1);
        self.last_seen = Some(pair);
        match built {
            Ok(new) => {
                let old = self.store.info();
                if *old == new.info && recovering {
                    tracing::info!(serial = %old.serial, "TLS certificate is readable again with the served content");
                    return;
                }
                tracing::info!(
                    subject = %new.info.subject,
                    serial = %new.info.serial,
                    not_after = %unix_to_rfc3339(new.info.not_after),
                    previous_serial = %old.serial,
                    "TLS certificate reloaded; new handshakes use it, open connections keep theirs"
                );
                self.metrics.tls_cert_expiry.set(new.info.not_after as f64);
                self.store.store(new);
                self.server_config.store(server_config(self.store.clone()));
                self.metrics.tls_reload(true);
            }
            Err(e) => self.fail(&e),
        }
    }

    fn fail(&self, error: &TlsError) {
        let active = self.store.info();
        tracing::error!(error = %error, active_serial = %active.serial, active_subject = %active.subject, "TLS certificate reload failed; still serving the previous certificate");
        self.metrics.tls_reload(false);
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
