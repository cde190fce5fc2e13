//! A stand-in for the Kubernetes API server's review endpoints, over real HTTPS on loopback.
//!
//! It answers what the agent's HTTPS admin address asks (issue 15), as the real server does:
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: a TokenReview whose `status` says
//!   whether `spec.token` is one of the tokens given with [`ReviewApi::add_token`], and if so the
//!   user and groups it names;
//! - `POST /apis/authorization.k8s.io/v1/subjectaccessreviews`: a SubjectAccessReview whose
//!   `status.allowed` says whether `spec.user`, or one of `spec.groups`, was granted the verb `get`
//!   on the non-resource URL `spec.nonResourceAttributes.path` ([`ReviewApi::grant`]), as an RBAC
//!   ClusterRole with `nonResourceURLs` would.
//!
//! Every request must carry the agent's own bearer token, from the kubeconfig
//! ([`ReviewApi::kubeconfig`]); without it the answer is 401 with a `Status`, as the real server's.
//! The certificate is issued by a CA of the test's own, for `IP:127.0.0.1`, and the kubeconfig
//! names that CA, so the agent's client verifies the server as it would a real one.
//! [`ReviewApi::stop`] closes the listener and every open connection: the API server is down.

use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{AUTHORIZATION, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::{kube_api::Kubeconfig, probe_apps::server_config, sidecar::Certificates};

/// The agent's own token, written into the kubeconfig.
const AGENT_TOKEN: &str = "probe-bypass-agent-token";

pub struct ReviewApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
    certs: Certificates,
}

#[derive(Default)]
struct State {
    /// Token → (user, groups).
    tokens: BTreeMap<String, (String, Vec<String>)>,
    /// (user or group, path) granted `get`.
    grants: BTreeSet<(String, String)>,
    token_reviews: usize,
    access_reviews: usize,
    /// Requests without the agent's token.
    unauthorized: usize,
    connections: Vec<JoinHandle<()>>,
}

impl ReviewApi {
    /// Serves on a free loopback port; call from a tokio runtime.
    pub async fn start() -> Self {
        let certs = Certificates::new();
        let (cert, key) = certs.issue_for("api-server", &["IP:127.0.0.1"]);
        let acceptor = TlsAcceptor::from(Arc::new(server_config(cert.as_ref(), key.as_ref())));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the stand-in API server");
        let addr = listener.local_addr().expect("its address");
        let state = Arc::new(Mutex::new(State::default()));
        let shared = Arc::clone(&state);
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, state) = (acceptor.clone(), Arc::clone(&shared));
                let connection = tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(&state, request).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
                lock(&shared).connections.push(connection);
            }
        });
        Self {
            addr,
            state,
            server,
            certs,
        }
    }

    /// Makes `token` one the server accepts, naming `user` in `groups`.
    pub fn add_token(&self, token: &str, user: &str, groups: &[&str]) {
        let groups = groups.iter().map(|group| (*group).to_owned()).collect();
        self.lock()
            .tokens
            .insert(token.to_owned(), (user.to_owned(), groups));
    }

    /// Grants `subject` (a user or a group) `get` on the non-resource URL `path`.
    pub fn grant(&self, subject: &str, path: &str) {
        self.lock()
            .grants
            .insert((subject.to_owned(), path.to_owned()));
    }

    /// TokenReviews and SubjectAccessReviews answered so far.
    pub fn reviews(&self) -> (usize, usize) {
        let state = self.lock();
        (state.token_reviews, state.access_reviews)
    }

    /// Requests refused for want of the agent's own token.
    pub fn unauthorized(&self) -> usize {
        self.lock().unauthorized
    }

    /// Closes the listener and every connection: from now on the server cannot be reached.
    pub fn stop(&self) {
        self.server.abort();
        for connection in self.lock().connections.drain(..) {
            connection.abort();
        }
    }

    /// A kubeconfig naming this server, its CA and the agent's token, for the agent binary
    /// (`KUBECONFIG`).
    pub fn kubeconfig(&self) -> Kubeconfig {
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: test\n  cluster:\n    server: https://{}\n    \
             certificate-authority: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: agent\n\
             users:\n- name: agent\n  user:\n    token: {AGENT_TOKEN}\n",
            self.addr,
            self.certs.ca()
        );
        Kubeconfig::write(self.addr.port(), &text)
    }

    /// The CA the server's certificate is issued by; it can issue others (the agent's).
    pub fn certificates(&self) -> &Certificates {
        &self.certs
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for ReviewApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn handle(state: &Mutex<State>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let agent = request
        .headers()
        .get(AUTHORIZATION)
        .is_some_and(|value| value.as_bytes() == format!("Bearer {AGENT_TOKEN}").as_bytes());
    if !agent {
        lock(state).unauthorized += 1;
        return answer(StatusCode::UNAUTHORIZED, &status(401, "Unauthorized"));
    }
    let path = request.uri().path().to_owned();
    let Ok(body) = request.into_body().collect().await else {
        return answer(StatusCode::BAD_REQUEST, &status(400, "BadRequest"));
    };
    let Ok(review) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return answer(StatusCode::BAD_REQUEST, &status(400, "BadRequest"));
    };
    let mut state = lock(state);
    let status = match path.as_str() {
        "/apis/authentication.k8s.io/v1/tokenreviews" => {
            state.token_reviews += 1;
            let token = review["spec"]["token"].as_str().unwrap_or_default();
            match state.tokens.get(token) {
                Some((user, groups)) => json!({
                    "authenticated": true,
                    "user": {"username": user, "uid": format!("uid-of-{user}"), "groups": groups},
                }),
                None => json!({"authenticated": false, "error": "invalid bearer token"}),
            }
        }
        "/apis/authorization.k8s.io/v1/subjectaccessreviews" => {
            state.access_reviews += 1;
            let spec = &review["spec"];
            let attributes = &spec["nonResourceAttributes"];
            let asked = attributes["path"].as_str().unwrap_or_default();
            let mut subjects = vec![spec["user"].as_str().unwrap_or_default().to_owned()];
            subjects.extend(
                spec["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|group| group.as_str().map(str::to_owned)),
            );
            let allowed = attributes["verb"] == "get"
                && subjects
                    .into_iter()
                    .any(|subject| state.grants.contains(&(subject, asked.to_owned())));
            if allowed {
                json!({"allowed": true, "reason": "RBAC: allowed by a test grant"})
            } else {
                json!({"allowed": false})
            }
        }
        _ => return answer(StatusCode::NOT_FOUND, &status(404, "NotFound")),
    };
    let mut review = review;
    review["status"] = status;
    answer(StatusCode::CREATED, &review)
}

/// A `Status` object, as the API server answers an error.
fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason,
           "reason": reason, "code": code})
}

fn answer(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
