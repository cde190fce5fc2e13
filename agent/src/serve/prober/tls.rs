//! TLS for HTTPS probes, as the kubelet does it: the server's certificate is not verified.
//!
//! The kubelet's prober sets `InsecureSkipVerify` (`shared/reference/peers.md` §5): an app's
//! certificate is usually issued for its service name, not the pod IP the probe connects to, and
//! is often self-signed. Like Go's TLS stack under that setting, the handshake's own signatures are
//! still checked against the certificate the server sent, so the server must hold its key; only the
//! chain, names and dates are not looked at. No session is resumed: each probe is a new handshake,
//! as the kubelet's (which keeps no session cache).

use std::sync::{Arc, LazyLock};

use tokio_rustls::{
    TlsConnector,
    rustls::{
        self, ClientConfig, DigitallySignedStruct, SignatureScheme,
        client::{
            Resumption,
            danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        },
        crypto::{CryptoProvider, ring, verify_tls12_signature, verify_tls13_signature},
        pki_types::{CertificateDer, ServerName, UnixTime},
    },
};

/// Why no TLS client could be made: the crypto provider refused every protocol version, which
/// the ring provider does not do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot set up TLS: {0}")]
pub struct TlsError(String);

/// The one client configuration every HTTPS probe shares.
static CONNECTOR: LazyLock<Result<TlsConnector, TlsError>> = LazyLock::new(|| {
    let provider = Arc::new(ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError(error.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
});

/// The TLS client HTTPS probes connect with.
pub fn connector() -> Result<TlsConnector, TlsError> {
    CONNECTOR.clone()
}

/// The server name sent for `host`: none for an IP address (rustls, like Go, sends no SNI then).
pub fn server_name(
    host: &str,
) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
    ServerName::try_from(host.to_owned())
}

/// Accepts whatever certificate the server presents, and checks the handshake's signatures with it.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
