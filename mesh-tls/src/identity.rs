//! A workload's identity: its X.509-SVID, private key and trust bundle, loaded from PEM files
//! and reloaded when they change.
//!
//! [`Identity`] is what servers and clients are built from ([`Identity::server_config`],
//! [`Identity::client_config`]). Its configurations resolve the certificate and the trust
//! bundle at each handshake, so a [`reload`](Identity::reload) (or the task of
//! [`watch`](Identity::watch)) rotates both for new connections, while established ones keep
//! the keys they were made with. A new set of files that does not load (unparsable, a key
//! that does not match the certificate, a leaf that is not an SVID, an SVID of another trust
//! domain than the bundle's) is refused with a logged reason, and the old credentials keep
//! serving: cert-manager and SPIRE helpers write the files one by one, so a half-written set
//! is simply retried at the next poll.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_core::{SpiffeId, TrustDomain};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::svid::{leaf_svid, not_after};

/// The one rustls crypto provider of the workspace (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider())).clone()
}

/// Why credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file's PEM holds nothing usable.
    #[error("{what}: {reason}")]
    Pem {
        /// The file (or `certificate chain`, `private key`, `trust bundle` for in-memory PEM).
        what: String,
        /// Why.
        reason: String,
    },
    /// The leaf is not an acceptable X.509-SVID.
    #[error("{what}: the leaf certificate is not a valid X.509-SVID: {source}")]
    Svid {
        /// The certificate file.
        what: String,
        /// Why.
        #[source]
        source: crate::SvidError,
    },
    /// The key does not fit the certificate, or rustls refused either.
    #[error("{what}: {source}")]
    Tls {
        /// The file.
        what: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
}

/// Where a workload's credentials are: its certificate chain (leaf first), its private key,
/// and the trust bundle (CA certificates) of its trust domain. Kubernetes Secrets hold them
/// as `tls.crt`, `tls.key` and `ca.crt`; SPIRE helpers as `svid.pem`, `svid_key.pem` and
/// `svid_bundle.pem`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialFiles {
    /// The certificate chain, leaf first.
    pub cert_chain: PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: PathBuf,
    /// The trust bundle.
    pub trust_bundle: PathBuf,
}

impl CredentialFiles {
    /// The Kubernetes TLS Secret layout (`tls.crt`, `tls.key`, `ca.crt`) in `dir`.
    pub fn kubernetes_secret(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self { cert_chain: dir.join("tls.crt"), private_key: dir.join("tls.key"), trust_bundle: dir.join("ca.crt") }
    }

    fn read(&self) -> Result<[Vec<u8>; 3], CredentialsError> {
        let read =
            |path: &Path| std::fs::read(path).map_err(|source| CredentialsError::Read { path: path.into(), source });
        Ok([read(&self.cert_chain)?, read(&self.private_key)?, read(&self.trust_bundle)?])
    }
}

/// One loaded, consistent set of credentials.
pub struct Credentials {
    certified: Arc<CertifiedKey>,
    id: SpiffeId,
    not_after: SystemTime,
    trust_domain: TrustDomain,
    roots: Arc<RootCertStore>,
    bundle_not_after: Option<SystemTime>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("id", &self.id)
            .field("not_after", &self.not_after)
            .field("trust_domain", &self.trust_domain)
            .field("roots", &self.roots.len())
            .finish()
    }
}

impl Credentials {
    /// Parses PEM: the chain (leaf first), the key, the trust bundle. The bundle is taken to
    /// be the leaf's own trust domain's.
    pub fn from_pem(chain: &[u8], key: &[u8], bundle: &[u8]) -> Result<Self, CredentialsError> {
        Self::parse(chain, key, bundle, ["certificate chain", "private key", "trust bundle"].map(String::from))
    }

    /// Reads and parses `files`.
    pub fn load(files: &CredentialFiles) -> Result<Self, CredentialsError> {
        let [chain, key, bundle] = files.read()?;
        Self::parse(&chain, &key, &bundle, names(files))
    }

    fn parse(
        chain: &[u8],
        key: &[u8],
        bundle: &[u8],
        [chain_name, key_name, bundle_name]: [String; 3],
    ) -> Result<Self, CredentialsError> {
        let pem = |what: &String, reason: String| CredentialsError::Pem { what: what.clone(), reason };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<_, _>>()
            .map_err(|e| pem(&chain_name, e.to_string()))?;
        let Some(leaf) = certs.first() else { return Err(pem(&chain_name, "no CERTIFICATE block".into())) };
        let svid = leaf_svid(leaf).map_err(|source| CredentialsError::Svid { what: chain_name.clone(), source })?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| pem(&key_name, e.to_string()))?;
        let provider = provider();
        let certified = CertifiedKey::from_der(certs, key, &provider)
            .map_err(|source| CredentialsError::Tls { what: key_name.clone(), source })?;
        let mut roots = RootCertStore::empty();
        let mut bundle_not_after: Option<SystemTime> = None;
        for cert in CertificateDer::pem_slice_iter(bundle) {
            let cert = cert.map_err(|e| pem(&bundle_name, e.to_string()))?;
            if let Some(t) = not_after(&cert) {
                bundle_not_after = Some(bundle_not_after.map_or(t, |b| b.min(t)));
            }
            roots.add(cert).map_err(|source| CredentialsError::Tls { what: bundle_name.clone(), source })?;
        }
        if roots.is_empty() {
            return Err(pem(&bundle_name, "no CERTIFICATE block".into()));
        }
        let roots = Arc::new(roots);
        let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .map_err(|e| pem(&bundle_name, e.to_string()))?;
        Ok(Self {
            certified: Arc::new(certified),
            trust_domain: svid.id.trust_domain(),
            id: svid.id,
            not_after: svid.not_after,
            roots,
            bundle_not_after,
            client_verifier,
        })
    }

    /// The workload's SPIFFE ID.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// When the workload certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// When the first CA of the trust bundle expires.
    pub fn bundle_not_after(&self) -> Option<SystemTime> {
        self.bundle_not_after
    }

    /// The trust domain whose bundle this is; peers must belong to it.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The certificate and key, as rustls uses them.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    pub(crate) fn roots(&self) -> &RootCertStore {
        &self.roots
    }

    pub(crate) fn client_verifier(&self) -> &Arc<dyn ClientCertVerifier> {
        &self.client_verifier
    }
}

fn names(files: &CredentialFiles) -> [String; 3] {
    [&files.cert_chain, &files.private_key, &files.trust_bundle].map(|p| p.display().to_string())
}

/// A workload identity whose credentials can be rotated; clones share them.
#[derive(Clone)]
pub struct Identity {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<Credentials>,
    files: Option<CredentialFiles>,
    // The contents last tried, so that an unchanged (or unchanged broken) set is not parsed
    // and logged again at every poll.
    seen: Mutex<Option<[Vec<u8>; 3]>>,
    reloads: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("current", &self.current()).field("files", &self.inner.files).finish()
    }
}

/// What [`Identity::status`] reports (for `/certs` and metrics).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IdentityStatus {
    /// The SPIFFE ID served.
    pub id: SpiffeId,
    /// When the served certificate expires.
    pub not_after: SystemTime,
    /// When the first CA of the bundle expires.
    pub bundle_not_after: Option<SystemTime>,
    /// Rotations applied.
    pub reloads: u64,
    /// New file sets refused.
    pub failures: u64,
    /// Why the last refused set was refused.
    pub last_error: Option<String>,
}

impl Identity {
    /// An identity with fixed credentials (rotate them with [`replace`](Self::replace)).
    pub fn new(credentials: Credentials) -> Self {
        Self::with(credentials, None, None)
    }

    /// Loads `files`; [`reload`](Self::reload) and [`watch`](Self::watch) read them again.
    pub fn from_files(files: CredentialFiles) -> Result<Self, CredentialsError> {
        let contents = files.read()?;
        let credentials = Credentials::parse(&contents[0], &contents[1], &contents[2], names(&files))?;
        Ok(Self::with(credentials, Some(files), Some(contents)))
    }

    fn with(credentials: Credentials, files: Option<CredentialFiles>, seen: Option<[Vec<u8>; 3]>) -> Self {
        Self {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(credentials),
                files,
                seen: Mutex::new(seen),
                reloads: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        }
    }

    /// The credentials new handshakes use.
    pub fn current(&self) -> Arc<Credentials> {
        self.inner.current.load_full()
    }

    /// Rotates to `credentials`.
    pub fn replace(&self, credentials: Credentials) {
        self.inner.current.store(Arc::new(credentials));
        self.inner.reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads the files again: `Ok(true)` when new credentials were installed, `Ok(false)` when
    /// the files are unchanged (or there are none), an error (and the old credentials kept)
    /// when the new ones do not load.
    pub fn reload(&self) -> Result<bool, CredentialsError> {
        let Some(files) = &self.inner.files else { return Ok(false) };
        let contents = files.read()?;
        let mut seen = self.inner.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.as_ref() == Some(&contents) {
            return Ok(false);
        }
        let parsed = Credentials::parse(&contents[0], &contents[1], &contents[2], names(files));
        *seen = Some(contents);
        drop(seen);
        match parsed {
            Ok(credentials) => {
                self.replace(credentials);
                *self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(true)
            }
            Err(e) => {
                self.inner.failures.fetch_add(1, Ordering::Relaxed);
                *self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// Polls the files every `interval` and rotates when they change, logging refused sets;
    /// the task ends when every clone of this identity is dropped. Polling (rather than
    /// inotify) sees Kubernetes' atomic symlink swap of a Secret volume and files on any
    /// filesystem alike; the files are small.
    pub fn watch(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { return };
                let identity = Identity { inner };
                match identity.reload() {
                    Ok(true) => {
                        let current = identity.current();
                        tracing::info!(id = %current.id(), not_after = ?current.not_after(), "workload certificate rotated");
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "new workload credentials refused; the old ones keep serving"),
                }
            }
        })
    }

    /// The served identity, its expiry and the rotation counters.
    pub fn status(&self) -> IdentityStatus {
        let current = self.current();
        IdentityStatus {
            id: current.id.clone(),
            not_after: current.not_after,
            bundle_not_after: current.bundle_not_after,
            reloads: self.inner.reloads.load(Ordering::Relaxed),
            failures: self.inner.failures.load(Ordering::Relaxed),
            last_error: self.inner.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}
