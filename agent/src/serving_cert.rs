//! A TLS server's certificate: the webhook's, and the admin port's.
//!
//! Given as files, it is re-read when they change.
//! cert-manager renews the certificate into a Secret, and the kubelet updates a Secret volume by
//! writing a new directory and swapping the `..data` symlink the files point through, so the
//! files' directories are watched (inotify) and any event there re-reads both files; they are
//! also re-read every [`RESYNC`] in case an event was missed or the files live elsewhere. A pair
//! that reads and matches serves every new TLS connection from then on; a broken pair (a
//! half-written file, a key of another certificate) is logged and the old pair kept.
//!
//! Not given (the admin port's default, as Kubernetes' own components and controller-runtime's
//! secure metrics do), it is a self-signed certificate made at start and held in memory only.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    thread,
    time::Duration,
};

use crate::dir_watch::{DirWatch, DirWatchError};
use tokio::net::TcpStream;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, ServerConfig,
        crypto::ring::{self as ring_provider, sign::any_supported_type},
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    },
    server::TlsStream,
};

/// A server configuration: TLS 1.2 and 1.3 with ring, the protocols `alpn` by ALPN, the
/// certificate from `cert` at each handshake.
pub fn server_config(
    cert: Arc<CurrentCert>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, rustls::Error> {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(ring_provider::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(config)
}

/// The TLS handshake of a new connection, within `timeout`; the error names the peer.
pub async fn handshake(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, String> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |peer| peer.to_string());
    tokio::time::timeout(timeout, acceptor.accept(stream))
        .await
        .map_err(|_| format!("{peer}: no TLS handshake within {timeout:?}"))?
        .map_err(|error: io::Error| format!("{peer}: TLS handshake: {error}"))
}

/// Re-read period when no event arrives.
const RESYNC: Duration = Duration::from_secs(30);

/// Wait after an event for the rest of a burst (the kubelet's swap is several steps).
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Why a certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a PEM certificate chain: {source}")]
    CertificatePem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no PEM private key: {source}")]
    KeyPem {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the private key in {path} is not one TLS can sign with: {source}")]
    Key {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("the key in {key} does not belong to the certificate in {cert}: {source}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error(transparent)]
    Watch(#[from] DirWatchError),
    #[error("cannot make a self-signed certificate: {0}")]
    SelfSigned(#[from] rcgen::Error),
}

/// Where the certificate and its key are.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The bytes of both files, to tell a change from a re-read of the same pair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Pems {
    cert: Vec<u8>,
    key: Vec<u8>,
}

impl CertFiles {
    fn read(&self) -> Result<Pems, CertError> {
        let read = |path: &Path| {
            fs::read(path).map_err(|source| CertError::Read {
                path: path.to_owned(),
                source,
            })
        };
        Ok(Pems {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
        })
    }

    /// The pair in `pems`, checked: the chain parses, the key parses and belongs to the leaf.
    fn certified(&self, pems: &Pems) -> Result<CertifiedKey, CertError> {
        let chain = CertificateDer::pem_slice_iter(&pems.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| CertError::CertificatePem {
                path: self.cert.clone(),
                source,
            })?;
        if chain.is_empty() {
            return Err(CertError::NoCertificate {
                path: self.cert.clone(),
            });
        }
        let key = PrivateKeyDer::from_pem_slice(&pems.key).map_err(|source| CertError::KeyPem {
            path: self.key.clone(),
            source,
        })?;
        let key = any_supported_type(&key).map_err(|source| CertError::Key {
            path: self.key.clone(),
            source,
        })?;
        let certified = CertifiedKey::new(chain, key);
        certified
            .keys_match()
            .map_err(|source| CertError::Mismatch {
                cert: self.cert.clone(),
                key: self.key.clone(),
                source,
            })?;
        Ok(certified)
    }

    /// The directories to watch: the files' own, where a Secret volume swaps `..data`.
    fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = [&self.cert, &self.key]
            .into_iter()
            .map(|path| match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
                _ => PathBuf::from("."),
            })
            .collect();
        dirs.dedup();
        dirs
    }
}

/// The certificate every new TLS connection gets: the latest good pair.
#[derive(Debug)]
pub struct CurrentCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

impl CurrentCert {
    fn set(&self, certified: CertifiedKey) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(certified);
    }
}

/// A self-signed certificate for `names` (DNS names or IP addresses), with a fresh P-256 key that
/// never leaves the process.
pub fn self_signed(names: Vec<String>) -> Result<Arc<CurrentCert>, CertError> {
    let made = rcgen::generate_simple_self_signed(names)?;
    let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
    let key = any_supported_type(&key).map_err(|source| CertError::Key {
        path: PathBuf::from("(self-signed)"),
        source,
    })?;
    Ok(Arc::new(CurrentCert {
        current: RwLock::new(Arc::new(CertifiedKey::new(
            vec![made.cert.der().clone()],
            key,
        ))),
    }))
}

/// Reads the pair once (an error here stops the server from starting), then follows the files on
/// a thread of its own for as long as the process runs.
pub fn load_and_watch(files: CertFiles) -> Result<Arc<CurrentCert>, CertError> {
    let pems = files.read()?;
    let current = Arc::new(CurrentCert {
        current: RwLock::new(Arc::new(files.certified(&pems)?)),
    });
    let dirs = files.dirs();
    let changes = DirWatch::new(&dirs.iter().map(PathBuf::as_path).collect::<Vec<_>>())?;
    let follower = Follower {
        files,
        current: Arc::clone(&current),
        served: pems,
        refused: None,
    };
    thread::Builder::new()
        .name("serving-cert".to_owned())
        .spawn(move || {
            follower.follow(&changes);
        })
        .map_err(|source| CertError::Read {
            path: PathBuf::from("(thread spawn)"),
            source,
        })?;
    Ok(current)
}

struct Follower {
    files: CertFiles,
    current: Arc<CurrentCert>,
    /// The pair being served.
    served: Pems,
    /// The last pair refused, so that it is logged once, not on every re-read.
    refused: Option<Pems>,
}

impl Follower {
    fn follow(mut self, changes: &DirWatch) {
        loop {
            changes.wait(RESYNC, DEBOUNCE);
            self.reread();
        }
    }

    fn reread(&mut self) {
        let files = &self.files;
        let pems = match files.read() {
            Ok(pems) => pems,
            // A Secret volume's swap can remove the old files an instant before the new ones
            // appear: the next event or re-read tries again.
            Err(error) => return self.refuse(None, &error),
        };
        if pems == self.served || self.refused.as_ref() == Some(&pems) {
            return;
        }
        match files.certified(&pems) {
            Ok(certified) => {
                self.current.set(certified);
                self.served = pems;
                self.refused = None;
                log::info!(
                    "serving the new certificate from {} and {} to new connections",
                    files.cert.display(),
                    files.key.display()
                );
            }
            Err(error) => self.refuse(Some(pems), &error),
        }
    }

    fn refuse(&mut self, pems: Option<Pems>, error: &CertError) {
        if pems.is_none() || self.refused != pems {
            log::warn!("certificate not reloaded: {error}; still serving the one loaded before");
        }
        if pems.is_some() {
            self.refused = pems;
        }
    }
}
