//! `probe-bypass webhook`: the mutating admission webhook that rewrites a new Pod's probes as
//! [`probe_bypass_rewrite`] does, so that they reach the agent past the mesh's sidecar.
//!
//! - [`probe_bypass_rewrite::review`]: an AdmissionReview v1 request body in, the answer out (a
//!   JSON Patch and the rewriter's warnings), or why the body is not a review. Pure, and fuzzed.
//! - [`serving_cert`](crate::serving_cert): the serving certificate, re-read when cert-manager
//!   renews it.
//! - [`server`]: HTTPS (HTTP/2 or HTTP/1.1 by ALPN) at [`WEBHOOK_MUTATE_PATH`], and a plain-HTTP
//!   [`WEBHOOK_HEALTHZ_PATH`] for the webhook's own probes.
//!
//! The webhook needs no access to the Kubernetes API: everything it reads is in the review.

pub mod server;

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;

use crate::{
    cli::WebhookArgs,
    defaults::{WEBHOOK_HEALTHZ_PATH, WEBHOOK_MUTATE_PATH, WEBHOOK_REPLACE_MESH_INIT_PATH},
    serving_cert::{self, CertError, CertFiles},
};

/// How long the webhook keeps answering after SIGTERM (the Deployment's grace period is longer).
const DRAIN: Duration = Duration::from_secs(3);

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("serving certificate: {0}")]
    Cert(#[from] CertError),
    #[error("TLS set-up: {0}")]
    Tls(#[from] tokio_rustls::rustls::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot wait for signals: {0}")]
    Signal(io::Error),
}

/// Serves admission reviews until SIGTERM or SIGINT.
pub async fn run(args: WebhookArgs) -> Result<(), WebhookError> {
    let options = args.options();
    let WebhookArgs {
        listen,
        tls_cert,
        tls_key,
        healthz,
        style,
        replace_mesh_init,
        validation_image,
    } = args;
    let cert = serving_cert::load_and_watch(CertFiles {
        cert: tls_cert.clone(),
        key: tls_key.clone(),
    })?;
    let tls = server::tls_config(cert)?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| WebhookError::Listen { addr, source })
    };
    let reviews = bind(listen).await?;
    let health = bind(healthz).await?;
    let local = |listener: &TcpListener, asked: SocketAddr| listener.local_addr().unwrap_or(asked);
    log::info!(
        "admission webhook: reviews on https://{0}{WEBHOOK_MUTATE_PATH} (replacing the mesh's init \
         container: {replace_mesh_init}) and https://{0}{WEBHOOK_REPLACE_MESH_INIT_PATH} (always \
         replacing it), validation image {validation_image}, health on \
         http://{1}{WEBHOOK_HEALTHZ_PATH}; style {style:?}, certificate {2} and key {3}",
        local(&reviews, listen),
        local(&health, healthz),
        tls_cert.display(),
        tls_key.display()
    );
    let reviews = tokio::spawn(server::serve_reviews(reviews, Arc::new(tls), options));
    let health = tokio::spawn(server::serve_healthz(health));
    let signal = crate::signal::shutdown_requested()
        .await
        .map_err(WebhookError::Signal)?;
    // The API server may still pick this pod from the Service's endpoints until the endpoint
    // controller has removed it: keep answering for a moment, then stop.
    log::info!("{signal}: admission webhook stopping in {DRAIN:?}");
    tokio::time::sleep(DRAIN).await;
    reviews.abort();
    health.abort();
    Ok(())
}
