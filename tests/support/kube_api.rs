//! A stand-in for the Kubernetes API server's pods endpoint, over real HTTP on loopback.
//!
//! It speaks the protocol kube-rs speaks to the real one: `GET /api/v1/pods` answers a `PodList`
//! with the current resourceVersion, `?watch=true&resourceVersion=N` streams newline-delimited
//! events (`{"type":"ADDED","object":{…}}`) from version N on, replaying what happened since, and
//! a watch from a version older than the last compaction gets the `ERROR` event with a 410 Gone
//! `Status` that tells a client to list again. `fieldSelector` must be `spec.nodeName=<node>`;
//! anything else is answered 400 and recorded. Pods of other nodes are stored and filtered out,
//! as the real server does. The server stops when the guard drops.
//!
//! [`FakeApi::start_tls`] serves the same over HTTPS, with a certificate for `IP:127.0.0.1` from a
//! CA of the test's own, and [`FakeApi::service_account`] writes what the kubelet mounts into a
//! pod for its service account (`token`, `ca.crt`, `namespace`) with the environment that names
//! the server: a containerised agent finds it as it would in a cluster (in-cluster config).

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    fs,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use futures::{
    StreamExt as _,
    channel::mpsc::{UnboundedSender, unbounded},
};
use http_body_util::{Full, StreamBody, combinators::BoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    task::JoinHandle,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    probe_apps::server_config,
    sidecar::{Certificates, TempDir},
};

/// An FSM-injected pod as the API server returns it, for tests and benchmarks to name and place.
pub const FSM_POD: &str = include_str!("kube_pod.json");

type Body = BoxBody<Bytes, Infallible>;

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: JoinHandle<()>,
    /// The CA of the server's certificate, when it serves HTTPS.
    certs: Option<Certificates>,
}

#[derive(Default)]
struct State {
    node: String,
    version: u64,
    /// Every pod, of any node, by name.
    pods: BTreeMap<String, Value>,
    /// Every watch event: the version it made, its node, its line.
    log: Vec<(u64, String, String)>,
    /// A watch from a version before this one gets 410 Gone.
    oldest: u64,
    watches: Vec<(String, UnboundedSender<String>)>,
    lists: usize,
    /// The `resourceVersion` each answered list asked for (none: a consistent read).
    list_versions: Vec<Option<String>>,
    /// Lists still to be refused (403), to stand for an RBAC rule not yet in place.
    refuse_lists: usize,
    bad_requests: Vec<String>,
}

impl FakeApi {
    /// Serves the pods of node `node` over HTTP on a free loopback port; call from a tokio runtime.
    pub async fn start(node: &str) -> Self {
        Self::serve(node, None).await
    }

    /// Serves as [`Self::start`] does, over HTTPS, with a certificate for `IP:127.0.0.1`.
    pub async fn start_tls(node: &str) -> Self {
        Self::serve(node, Some(Certificates::new())).await
    }

    async fn serve(node: &str, certs: Option<Certificates>) -> Self {
        let acceptor = certs.as_ref().map(|certs| {
            let (cert, key) = certs.issue_for("api-server", &["IP:127.0.0.1"]);
            TlsAcceptor::from(Arc::new(server_config(cert.as_ref(), key.as_ref())))
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("its address");
        let state = Arc::new(Mutex::new(State {
            node: node.to_owned(),
            version: 100,
            ..State::default()
        }));
        let shared = Arc::clone(&state);
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, state) = (acceptor.clone(), Arc::clone(&shared));
                tokio::spawn(async move {
                    match acceptor {
                        None => serve_connection(stream, state).await,
                        Some(acceptor) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                serve_connection(tls, state).await;
                            }
                        }
                    }
                });
            }
        });
        Self {
            addr,
            state,
            server,
            certs,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// Creates or updates a pod (keyed by `metadata.name`) and tells the watches.
    pub fn apply(&self, mut pod: Value) {
        let mut state = self.lock();
        let name = pod["metadata"]["name"]
            .as_str()
            .expect("a pod has a name")
            .to_owned();
        state.version += 1;
        pod["metadata"]["resourceVersion"] = json!(state.version.to_string());
        let kind = if state.pods.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.pods.insert(name, pod.clone());
        state.event(kind, pod);
    }

    /// Deletes a pod and tells the watches.
    pub fn delete(&self, name: &str) {
        let mut state = self.lock();
        let mut pod = state.pods.remove(name).expect("no such pod");
        state.version += 1;
        pod["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.event("DELETED", pod);
    }

    /// Deletes a pod while no watch is there to see it: only a new list shows it gone.
    pub fn delete_unseen(&self, name: &str) {
        let mut state = self.lock();
        state.pods.remove(name).expect("no such pod");
        state.version += 1;
    }

    /// Compacts the history (as etcd does): every watch gets 410 Gone and ends, and no watch can
    /// resume from a version before now. Clients must list again.
    pub fn expire_watches(&self) {
        let mut state = self.lock();
        state.oldest = state.version + 1;
        let gone = gone_line(state.version);
        for (_, watch) in state.watches.drain(..) {
            let _ = watch.unbounded_send(gone.clone());
        }
    }

    /// Refuses the next `count` lists with 403 Forbidden.
    pub fn refuse_lists(&self, count: usize) {
        self.lock().refuse_lists = count;
    }

    /// Lists answered (refused ones not counted).
    pub fn lists(&self) -> usize {
        self.lock().lists
    }

    /// The `resourceVersion` of each answered list, in order: `None` for a consistent read,
    /// `Some("0")` for one from the API server's watch cache.
    pub fn list_versions(&self) -> Vec<Option<String>> {
        self.lock().list_versions.clone()
    }

    /// Requests that did not ask for this node's pods only.
    pub fn bad_requests(&self) -> Vec<String> {
        self.lock().bad_requests.clone()
    }

    /// A kubeconfig naming this server (and its CA, over HTTPS), for the agent binary
    /// (`KUBECONFIG`).
    pub fn kubeconfig(&self) -> Kubeconfig {
        let authority = self.certs.as_ref().map_or_else(String::new, |certs| {
            format!("    certificate-authority: {}\n", certs.ca())
        });
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: test\n  cluster:\n    server: {}\n{authority}\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             users:\n- name: test\n  user:\n    token: test\n",
            self.url()
        );
        Kubeconfig::write(self.addr.port(), &text)
    }

    /// What the kubelet gives a pod of service account `namespace`/…: the directory to mount at
    /// [`ServiceAccount::MOUNT`] and the environment naming this server. Only over HTTPS, as a
    /// cluster's `kubernetes` Service is.
    pub fn service_account(&self, namespace: &str) -> ServiceAccount {
        let certs = self
            .certs
            .as_ref()
            .expect("in-cluster config is HTTPS: start the server with start_tls");
        let dir = TempDir::new("serviceaccount");
        let write = |name: &str, text: &str| {
            let path = dir.path.join(name);
            fs::write(&path, text)
                .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
        };
        let ca = fs::read_to_string(certs.ca()).expect("read the CA");
        write("ca.crt", &ca);
        write("token", "test");
        write("namespace", namespace);
        ServiceAccount {
            env: vec![
                (
                    "KUBERNETES_SERVICE_HOST".to_owned(),
                    self.addr.ip().to_string(),
                ),
                (
                    "KUBERNETES_SERVICE_PORT".to_owned(),
                    self.addr.port().to_string(),
                ),
            ],
            dir,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A pod's service account, as the kubelet projects it: the files and the environment.
pub struct ServiceAccount {
    /// Holds `token`, `ca.crt` and `namespace`; deleted on drop.
    pub dir: TempDir,
    /// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT`.
    pub env: Vec<(String, String)>,
}

impl ServiceAccount {
    /// Where the kubelet mounts it in every container.
    pub const MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
}

/// Serves the API on one accepted connection, plain or TLS.
async fn serve_connection<S>(stream: S, state: Arc<Mutex<State>>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handle(&state, &request)) }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// A temporary kubeconfig file; deleted on drop.
pub struct Kubeconfig {
    pub path: PathBuf,
}

impl Kubeconfig {
    /// Writes `text` to a temporary file named after this process and the server's `port`.
    pub fn write(port: u16, text: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("pb-test-kubeconfig-{}-{port}", std::process::id()));
        fs::write(&path, text).expect("write the kubeconfig");
        Self { path }
    }
}

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
        // Ends the streams of the watches still open.
        self.lock().watches.clear();
    }
}

impl State {
    fn event(&mut self, kind: &str, pod: Value) {
        let node = node_of(&pod);
        let line = format!("{}\n", json!({ "type": kind, "object": pod }));
        self.log.push((self.version, node.clone(), line.clone()));
        self.watches.retain(|(watching, watch)| {
            *watching != node || watch.unbounded_send(line.clone()).is_ok()
        });
    }
}

fn node_of(pod: &Value) -> String {
    pod["spec"]["nodeName"].as_str().unwrap_or("").to_owned()
}

fn handle(state: &Mutex<State>, request: &Request<Incoming>) -> Response<Body> {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    let uri = request.uri().to_string();
    if request.uri().path() != "/api/v1/pods" {
        state.bad_requests.push(uri);
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "only /api/v1/pods is served",
        );
    }
    let query = query(request.uri().query().unwrap_or(""));
    let wanted = format!("spec.nodeName={}", state.node);
    if query.get("fieldSelector") != Some(&wanted) {
        state.bad_requests.push(uri);
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("expected fieldSelector={wanted}"),
        );
    }
    let node = state.node.clone();
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let (watch, lines) = unbounded();
        if from < state.oldest {
            let _ = watch.unbounded_send(gone_line(state.version));
        } else {
            for (version, pod_node, line) in &state.log {
                if *version > from && *pod_node == node {
                    let _ = watch.unbounded_send(line.clone());
                }
            }
            state.watches.push((node, watch));
        }
        let frames = lines.map(|line| Ok(Frame::data(Bytes::from(line))));
        return Response::builder()
            .header("content-type", "application/json")
            .body(BoxBody::new(StreamBody::new(frames)))
            .unwrap_or_else(|e| panic!("watch response: {e}"));
    }
    if state.refuse_lists > 0 {
        state.refuse_lists -= 1;
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "pods is forbidden: User \"system:serviceaccount:probe-bypass:probe-bypass\" cannot list resource \"pods\" in API group \"\" at the cluster scope",
        );
    }
    state.lists += 1;
    let asked = query.get("resourceVersion").cloned();
    state.list_versions.push(asked);
    let items: Vec<&Value> = state
        .pods
        .values()
        .filter(|pod| node_of(pod) == node)
        .collect();
    let list = json!({
        "kind": "PodList",
        "apiVersion": "v1",
        "metadata": { "resourceVersion": state.version.to_string() },
        "items": items,
    });
    json_response(StatusCode::OK, &list)
}

/// The event the API server sends a watch it can no longer serve.
fn gone_line(version: u64) -> String {
    let status = json!({
        "type": "ERROR",
        "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: requested (current: {version})"),
            "reason": "Expired", "code": 410,
        },
    });
    format!("{status}\n")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    json_response(code, &status)
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = Full::new(Bytes::from(value.to_string()));
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(BoxBody::new(body))
        .unwrap_or_else(|e| panic!("response: {e}"))
}

/// The query's parameters, percent-decoded.
fn query(text: &str) -> HashMap<String, String> {
    text.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (decode(key), decode(value)))
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
