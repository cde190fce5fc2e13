//! `probe-bypass webhook`, the real binary, over real HTTPS: certificates made by `openssl` for
//! 127.0.0.1, a rustls client that trusts only the test's CA. Every fixture pod of the rewriter
//! goes in as an AdmissionReview, and the JSON Patch that comes back, applied to the pod, gives
//! what `probe-bypass rewrite` prints for it. Malformed requests get their documented answer and
//! leave the server serving; the certificate is reloaded when a Secret volume's `..data` link
//! is swapped, and a broken one is refused. Needs no privileges.
#![expect(
    clippy::expect_used,
    reason = "test setup that cannot proceed panics, naming what failed"
)]

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, body::Bytes};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::ByteString;
use probe_bypass::{
    defaults::{WEBHOOK_HEALTHZ_PATH, WEBHOOK_MUTATE_PATH, WEBHOOK_REPLACE_MESH_INIT_PATH},
    webhook::server::MAX_BODY,
};
use probe_bypass_rewrite::review::WARNING_PREFIX;
use probe_bypass_testing::{
    rewrite_cli::run_rewrite,
    sidecar::{Certificates, TempDir},
};
use serde::Deserialize as _;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream as AsyncTcpStream,
};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{
        ClientConfig, RootCertStore,
        crypto::ring,
        pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    },
};

/// Where the test's server certificates are valid.
const ALT_NAMES: [&str; 2] = ["IP:127.0.0.1", "DNS:localhost"];

/// Bound on waiting for the webhook to start, or to pick up a new certificate.
const PATIENCE: Duration = Duration::from_secs(10);

/// The webhook binary, killed on drop; its log goes to a file the test reads.
struct Webhook {
    child: Child,
    log: PathBuf,
    reviews: SocketAddr,
    health: SocketAddr,
    _dir: TempDir,
}

impl Webhook {
    /// Starts the webhook on ephemeral loopback ports and waits for its start-up log line, which
    /// names the bound addresses.
    fn start(cert: &Path, key: &Path, style: &str) -> Self {
        Self::start_with(cert, key, &["--style", style])
    }

    /// [`Webhook::start`] with `args` (its options beyond the addresses and the certificate).
    fn start_with(cert: &Path, key: &Path, args: &[&str]) -> Self {
        let dir = TempDir::new("webhook");
        let log = dir.path.join("webhook.log");
        let child = webhook_command(cert, key, args, &log)
            .spawn()
            .expect("the webhook starts");
        let mut webhook = Self {
            child,
            log,
            reviews: SocketAddr::from(([0, 0, 0, 0], 0)),
            health: SocketAddr::from(([0, 0, 0, 0], 0)),
            _dir: dir,
        };
        let line = webhook.wait_for_log("reviews on https://");
        webhook.reviews = address_after(&line, "https://");
        webhook.health = address_after(&line, "http://");
        webhook
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first log line containing `needle`, waited for; panics with the log if the webhook
    /// exits or does not write it in time.
    fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|line| line.contains(needle)) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the webhook exited ({status}) before logging {needle:?}:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "the webhook did not log {needle:?} within {PATIENCE:?}:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn webhook_command(cert: &Path, key: &Path, args: &[&str], log: &Path) -> Command {
    let log = fs::File::create(log).expect("the log file");
    let mut command = Command::new(probe_bypass_testing::agent_bin());
    command
        .args([
            "webhook",
            "--listen",
            "127.0.0.1:0",
            "--healthz",
            "127.0.0.1:0",
        ])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    command
}

/// The `ip:port` that follows `scheme` in `line`.
fn address_after(line: &str, scheme: &str) -> SocketAddr {
    let rest = &line[line.find(scheme).expect("the scheme") + scheme.len()..];
    let end = rest.find('/').expect("a path after the address");
    rest[..end].parse().expect("an address")
}

/// A rustls client that trusts the CAs in `cas` (PEM files) and offers `alpn`.
fn tls_client(cas: &[&str], alpn: &[u8]) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from_pem_file(ca).expect("the CA certificate"))
            .expect("a CA rustls accepts");
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn connect(client: &TlsConnector, addr: SocketAddr) -> TlsStream<AsyncTcpStream> {
    let tcp = AsyncTcpStream::connect(addr).await.expect("connect");
    client
        .connect(ServerName::from(addr.ip()), tcp)
        .await
        .expect("a TLS handshake with the test's CA")
}

/// The DER of the certificate the server shows a new connection.
async fn served_certificate(client: &TlsConnector, addr: SocketAddr) -> Vec<u8> {
    let tls = connect(client, addr).await;
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

fn der_of(pem_file: &str) -> Vec<u8> {
    CertificateDer::from_pem_file(pem_file)
        .expect("a certificate")
        .to_vec()
}

/// One request over a new TLS connection, HTTP/2 when the server agreed to it by ALPN.
async fn send(
    client: &TlsConnector,
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let tls = connect(client, addr).await;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let request = Request::builder()
        .method(method)
        .uri(format!("https://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a request");
    let io = TokioIo::new(tls);
    let response = if h2 {
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("HTTP/2");
        tokio::spawn(connection);
        sender.send_request(request).await
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("HTTP/1.1");
        tokio::spawn(connection);
        sender.send_request(request).await
    }
    .expect("an answer");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes();
    (status, body.to_vec())
}

async fn post(client: &TlsConnector, addr: SocketAddr, body: &Value) -> (StatusCode, Value) {
    post_to(client, addr, WEBHOOK_MUTATE_PATH, body).await
}

async fn post_to(
    client: &TlsConnector,
    addr: SocketAddr,
    path: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let body = serde_json::to_vec(body).expect("JSON");
    let (status, answer) = send(client, addr, Method::POST, path, body).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    (
        status,
        serde_json::from_slice(&answer).expect("a JSON answer"),
    )
}

/// `pod` in an AdmissionReview v1 as the API server sends it for a CREATE.
fn admission_review(uid: &str, pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": pod["metadata"]["namespace"].as_str().unwrap_or("default"),
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// The webhook's certificates: a CA and a server certificate for 127.0.0.1.
struct ServerCerts {
    certs: Certificates,
    cert: String,
    key: String,
}

impl ServerCerts {
    fn new(name: &str) -> Self {
        let certs = Certificates::new();
        let (cert, key) = certs.issue_for(name, &ALT_NAMES);
        Self { certs, cert, key }
    }

    fn start(&self, style: &str) -> Webhook {
        Webhook::start(Path::new(&self.cert), Path::new(&self.key), style)
    }

    fn start_with(&self, args: &[&str]) -> Webhook {
        Webhook::start_with(Path::new(&self.cert), Path::new(&self.key), args)
    }

    fn client(&self, alpn: &[u8]) -> TlsConnector {
        tls_client(&[&self.certs.ca()], alpn)
    }
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/rewrite")
}

/// Every pod of the rewriter's fixtures, as a Pod: the review fixture's object, a Pod as it is,
/// a workload's pod template made a Pod (the first document of each file).
fn fixture_pods() -> Vec<(String, Value)> {
    // Subdirectories hold fixtures of their own (mesh-init/, read by the test of its own below).
    let mut names: Vec<String> = fs::read_dir(fixtures_dir())
        .expect("fixtures")
        .map(|entry| entry.expect("entry"))
        .filter(|entry| !entry.path().is_dir())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let text = fs::read_to_string(fixtures_dir().join(&name)).expect("fixture");
            let first = serde_norway::Deserializer::from_str(&text)
                .next()
                .expect("a document");
            let document = Value::deserialize(first).expect("valid YAML");
            let template = match document["kind"].as_str() {
                Some("AdmissionReview") => return (name, document["request"]["object"].clone()),
                Some("Pod") => return (name, document),
                Some("CronJob") => &document["spec"]["jobTemplate"]["spec"]["template"],
                _ => &document["spec"]["template"],
            };
            let pod = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": template["metadata"],
                "spec": template["spec"],
            });
            (name, pod)
        })
        .collect()
}

/// What `probe-bypass rewrite --style <style>` prints for `pod` (as JSON), and its warnings.
fn cli_rewrite(pod: &Value, style: &str) -> (Value, Vec<String>) {
    cli_rewrite_with(pod, &["--style", style])
}

/// What `probe-bypass rewrite <args>` prints for `pod` (as JSON), and its warnings.
fn cli_rewrite_with(pod: &Value, args: &[&str]) -> (Value, Vec<String>) {
    let input = serde_json::to_vec(pod).expect("JSON");
    let mut argv = vec!["-f", "-"];
    argv.extend_from_slice(args);
    let output = run_rewrite(&argv, &input);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "rewrite failed: {stderr}");
    let warnings = stderr
        .lines()
        .map(|line| line.strip_prefix("warning: ").unwrap_or(line).to_owned())
        .collect();
    (
        serde_json::from_slice(&output.stdout).expect("JSON out"),
        warnings,
    )
}

/// A warning without the name of the pod it is about, which the CLI writes as `Pod <name>: ` and
/// the webhook as `pod <name>: `.
fn substance(warning: &str) -> &str {
    match warning.split_once(": ") {
        Some((pod, rest)) if pod.to_lowercase().starts_with("pod") => rest,
        _ => warning,
    }
}

/// The review's response: uid echoed, allowed; its JSON Patch (empty when there is none) and
/// warnings with the webhook's prefix taken off.
fn response_of(answer: &Value, uid: &str) -> (json_patch::Patch, Vec<String>) {
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{answer}");
    assert_eq!(answer["kind"], "AdmissionReview", "{answer}");
    let response = &answer["response"];
    assert_eq!(response["uid"], uid, "{answer}");
    assert_eq!(response["allowed"], true, "{answer}");
    let patch = match response.get("patch") {
        None => {
            assert_eq!(response.get("patchType"), None, "{answer}");
            json_patch::Patch(Vec::new())
        }
        Some(patch) => {
            assert_eq!(response["patchType"], "JSONPatch", "{answer}");
            let ByteString(bytes) = serde_json::from_value(patch.clone()).expect("base64");
            serde_json::from_slice(&bytes).expect("a JSON Patch")
        }
    };
    let warnings = response
        .get("warnings")
        .and_then(Value::as_array)
        .map(|warnings| {
            warnings
                .iter()
                .map(|warning| {
                    let warning = warning.as_str().expect("a string");
                    warning
                        .strip_prefix(WARNING_PREFIX)
                        .unwrap_or_else(|| panic!("{warning:?} lacks {WARNING_PREFIX:?}"))
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default();
    (patch, warnings)
}

/// Posts `pod` for review to the webhook at (client, address, path), applies the patch it answers
/// and checks the pod and the warnings against `cli` (the CLI's output and warnings); says the
/// warnings.
async fn assert_admission_equals_cli(
    (client, addr, path): (&TlsConnector, SocketAddr, &str),
    uid: &str,
    pod: &Value,
    (expected, cli_warnings): &(Value, Vec<String>),
    case: &str,
) -> Vec<String> {
    let (_, answer) = post_to(client, addr, path, &admission_review(uid, pod)).await;
    let (patch, warnings) = response_of(&answer, uid);
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch)
        .unwrap_or_else(|error| panic!("{case}: the patch applies: {error}"));
    assert_eq!(&patched, expected, "{case}");
    assert_eq!(
        warnings.iter().map(|w| substance(w)).collect::<Vec<_>>(),
        cli_warnings
            .iter()
            .map(|w| substance(w))
            .collect::<Vec<_>>(),
        "{case}"
    );
    warnings
}

#[tokio::test(flavor = "multi_thread")]
async fn every_fixture_pod_patched_over_https_equals_the_cli_rewrite() {
    let certs = ServerCerts::new("webhook");
    for (style, alpn) in [("osm", &b"h2"[..]), ("fsm", &b"http/1.1"[..])] {
        let webhook = certs.start(style);
        let client = certs.client(alpn);
        let mut warned = 0;
        for (n, (name, pod)) in fixture_pods().into_iter().enumerate() {
            let uid = format!("00000000-0000-0000-0000-{n:012}");
            let case = format!("{name} ({style})");
            let cli = cli_rewrite(&pod, style);
            let webhook_at = (&client, webhook.reviews, WEBHOOK_MUTATE_PATH);
            let warnings = assert_admission_equals_cli(webhook_at, &uid, &pod, &cli, &case).await;
            warned += usize::from(!warnings.is_empty());
        }
        assert!(warned > 0, "some fixture warns (an unresolvable port, say)");
        let log = webhook.log();
        assert!(
            log.contains("pod bookstore/bookstore-v1-699c79b9dc-*: patched"),
            "each admission is logged:\n{log}"
        );
    }
}

/// The pods of the `--replace-mesh-init` fixtures (`mesh-init/`, not their expected results).
fn mesh_init_pods() -> Vec<(String, Value)> {
    let dir = fixtures_dir().join("mesh-init");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .expect("fixtures")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| !name.ends_with(".expected.yaml"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let text = fs::read_to_string(dir.join(&name)).expect("fixture");
            (name, serde_norway::from_str(&text).expect("YAML"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn replace_mesh_init_over_https_equals_the_cli_on_both_paths_and_with_the_flag() {
    let certs = ServerCerts::new("webhook");
    let plain = certs.start("osm");
    let flagged = certs.start_with(&["--style", "osm", "--replace-mesh-init"]);
    let client = certs.client(b"h2");
    let mut replaced_pods = 0;
    for (n, (name, pod)) in mesh_init_pods().into_iter().enumerate() {
        let replacing = cli_rewrite_with(&pod, &["--style", "osm", "--replace-mesh-init"]);
        let not_replacing = cli_rewrite(&pod, "osm");
        replaced_pods += usize::from(replacing.0 != not_replacing.0);
        for (webhook, flag, path, cli) in [
            (&plain, "", WEBHOOK_MUTATE_PATH, &not_replacing),
            (&plain, "", WEBHOOK_REPLACE_MESH_INIT_PATH, &replacing),
            (
                &flagged,
                "--replace-mesh-init",
                WEBHOOK_MUTATE_PATH,
                &replacing,
            ),
            (
                &flagged,
                "--replace-mesh-init",
                WEBHOOK_REPLACE_MESH_INIT_PATH,
                &replacing,
            ),
        ] {
            let case = format!("{name}: webhook {flag} at {path}");
            let uid = format!("00000000-0000-0000-0000-{n:012}");
            let webhook_at = (&client, webhook.reviews, path);
            assert_admission_equals_cli(webhook_at, &uid, &pod, cli, &case).await;
        }
    }
    assert!(
        replaced_pods >= 4,
        "most fixtures have their init container replaced"
    );
    let log = flagged.log();
    assert!(
        log.contains("replacing the mesh's init container: true"),
        "the start-up line says what /mutate does:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unresolvable_named_port_is_left_alone_with_an_admission_warning_saying_why() {
    let certs = ServerCerts::new("webhook");
    let webhook = certs.start("osm");
    let (_, pod) = fixture_pods()
        .into_iter()
        .find(|(name, _)| name == "bug-unresolvable-named-port.yaml")
        .expect("the fixture");
    let (_, answer) = post(
        &certs.client(b"h2"),
        webhook.reviews,
        &admission_review("u-1", &pod),
    )
    .await;
    let warnings = answer["response"]["warnings"].to_string();
    assert!(
        warnings.contains("left unchanged") && warnings.contains("is not the name of"),
        "{warnings}"
    );
}

/// Writes an HTTP/1.1 POST to /mutate that declares a body of `length` bytes and sends `body`,
/// and returns the beginning of the answer.
async fn raw_request(
    client: &TlsConnector,
    addr: SocketAddr,
    length: usize,
    body: &[u8],
) -> String {
    let mut tls = connect(client, addr).await;
    let head = format!(
        "POST {WEBHOOK_MUTATE_PATH} HTTP/1.1\r\nHost: webhook\r\nContent-Length: {length}\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await.expect("request");
    tls.write_all(body).await.expect("body");
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(PATIENCE + Duration::from_secs(5), tls.read(&mut answer))
        .await
        .expect("an answer in time")
        .expect("an answer");
    String::from_utf8_lossy(&answer[..read]).into_owned()
}

/// A request the webhook must refuse, and how.
struct Refused {
    case: &'static str,
    method: Method,
    path: &'static str,
    body: Vec<u8>,
    status: StatusCode,
    message: &'static str,
}

/// A POST of `review` is answered 200 and reviewed: the server still serves after `case`.
async fn assert_still_serves(client: &TlsConnector, addr: SocketAddr, review: &[u8], case: &str) {
    let (got, answer) = send(
        client,
        addr,
        Method::POST,
        WEBHOOK_MUTATE_PATH,
        review.to_vec(),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(got, StatusCode::OK, "after {case}: {answer}");
    assert!(
        answer.contains("\"allowed\":true"),
        "after {case}: {answer}"
    );
}

/// `review` is allowed with no patch and one warning that contains `expected`.
async fn assert_allowed_unchanged(
    client: &TlsConnector,
    addr: SocketAddr,
    review: &Value,
    expected: &str,
) {
    let uid = review["request"]["uid"].as_str().expect("a uid");
    let (_, answer) = post(client, addr, review).await;
    let (patch, warnings) = response_of(&answer, uid);
    assert!(patch.0.is_empty(), "{answer}");
    assert_eq!(warnings.len(), 1, "{answer}");
    assert!(
        warnings[0].contains(expected),
        "{warnings:?} lacks {expected:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_a_clear_answer_and_the_server_keeps_serving() {
    let certs = ServerCerts::new("webhook");
    let webhook = certs.start("osm");
    let client = certs.client(b"http/1.1");
    let pod = &fixture_pods()[0].1;
    let good = serde_json::to_vec(&admission_review("good", pod)).expect("JSON");
    let mut v1beta1 = admission_review("old", pod);
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let mut no_request = admission_review("none", pod);
    no_request["request"] = Value::Null;
    let refused = |case, method, path, body, status, message| Refused {
        case,
        method,
        path,
        body,
        status,
        message,
    };
    let (post, mutate, bad) = (Method::POST, WEBHOOK_MUTATE_PATH, StatusCode::BAD_REQUEST);
    let cases = [
        refused(
            "not JSON",
            post.clone(),
            mutate,
            b"{\"apiVersion\":".to_vec(),
            bad,
            "the body is not JSON",
        ),
        refused(
            "v1beta1",
            post.clone(),
            mutate,
            serde_json::to_vec(&v1beta1).expect("JSON"),
            bad,
            "this webhook reads AdmissionReview admission.k8s.io/v1",
        ),
        refused(
            "another kind",
            post.clone(),
            mutate,
            br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec(),
            bad,
            "the body is \"Pod\" of apiVersion \"v1\"",
        ),
        refused(
            "no request",
            post.clone(),
            mutate,
            serde_json::to_vec(&no_request).expect("JSON"),
            bad,
            "the AdmissionReview has no request",
        ),
        refused(
            "wrong path",
            post,
            "/validate",
            good.clone(),
            StatusCode::NOT_FOUND,
            "admission reviews go to POST /mutate",
        ),
        refused(
            "wrong method",
            Method::GET,
            mutate,
            Vec::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "/mutate takes POST, not GET",
        ),
    ];
    for refused in cases {
        let case = refused.case;
        let (got, answer) = send(
            &client,
            webhook.reviews,
            refused.method,
            refused.path,
            refused.body,
        )
        .await;
        let answer = String::from_utf8_lossy(&answer);
        assert_eq!(got, refused.status, "{case}: {answer}");
        assert!(
            answer.contains(refused.message),
            "{case}: {answer:?} lacks {:?}",
            refused.message
        );
        assert_still_serves(&client, webhook.reviews, &good, case).await;
    }

    // Too large: refused on its Content-Length, before the body is read.
    let answer = raw_request(&client, webhook.reviews, MAX_BODY + 1, b"").await;
    assert!(
        answer.starts_with("HTTP/1.1 413") && answer.contains("an admission review is at most"),
        "{answer}"
    );
    assert_still_serves(&client, webhook.reviews, &good, "too large").await;

    // A Service sent by a too-broad MutatingWebhookConfiguration: allowed as it is, and told.
    let mut service = admission_review("svc", pod);
    service["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Service"});
    service["request"]["resource"] = json!({"group": "", "version": "v1", "resource": "services"});
    service["request"]["object"] = json!({"apiVersion": "v1", "kind": "Service"});
    assert_allowed_unchanged(&client, webhook.reviews, &service, "rewrites only v1 Pods").await;

    // A pod the rewriter cannot read: allowed as it is, for the API server to refuse.
    let mut broken = admission_review("broken", pod);
    broken["request"]["object"]["spec"]["containers"] = json!("not a list");
    let expected = "probes left unchanged: /spec/containers";
    assert_allowed_unchanged(&client, webhook.reviews, &broken, expected).await;

    // A client that never finishes its handshake holds no one else up.
    let _idle = TcpStream::connect(webhook.reviews).expect("connect");
    assert_still_serves(&client, webhook.reviews, &good, "an idle connection").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_stops_arriving_is_answered_408_after_the_client_timeout() {
    let certs = ServerCerts::new("webhook");
    let webhook = certs.start("osm");
    let started = Instant::now();
    let answer = raw_request(&certs.client(b"http/1.1"), webhook.reviews, 100, b"{\"api").await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("the body did not arrive within 10s"),
        "{answer}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn healthz_answers_200_on_the_health_address() {
    let certs = ServerCerts::new("webhook");
    let webhook = certs.start("osm");
    let mut stream = TcpStream::connect(webhook.health).expect("connect");
    write!(
        stream,
        "GET {WEBHOOK_HEALTHZ_PATH} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A directory laid out as the kubelet lays out a Secret volume: `tls.crt` and `tls.key` are
/// links through `..data`, a link to the current timestamped directory.
struct SecretVolume {
    dir: TempDir,
    generation: u32,
}

impl SecretVolume {
    fn new(cert: &str, key: &str) -> Self {
        let mut volume = Self {
            dir: TempDir::new("secret-volume"),
            generation: 0,
        };
        volume.update(&fs::read(cert).expect("cert"), &fs::read(key).expect("key"));
        for file in ["tls.crt", "tls.key"] {
            symlink(format!("..data/{file}"), volume.dir.path.join(file)).expect("link");
        }
        volume
    }

    /// Writes a new timestamped directory and swaps `..data` to it, as the kubelet does.
    fn update(&mut self, cert: &[u8], key: &[u8]) {
        self.generation += 1;
        let name = format!("..2026_11_21_00_00_0{}", self.generation);
        let data = self.dir.path.join(&name);
        fs::create_dir(&data).expect("data dir");
        fs::write(data.join("tls.crt"), cert).expect("cert");
        fs::write(data.join("tls.key"), key).expect("key");
        let temporary = self.dir.path.join("..data_tmp");
        symlink(&name, &temporary).expect("link");
        fs::rename(&temporary, self.dir.path.join("..data")).expect("swap");
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path.join(name)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_certificate_serves_new_connections_and_a_broken_one_is_refused() {
    let first = ServerCerts::new("webhook-1");
    let second = ServerCerts::new("webhook-2");
    let mut volume = SecretVolume::new(&first.cert, &first.key);
    let mut webhook = Webhook::start(&volume.file("tls.crt"), &volume.file("tls.key"), "osm");
    let client = tls_client(&[&first.certs.ca(), &second.certs.ca()], b"h2");
    assert_eq!(
        served_certificate(&client, webhook.reviews).await,
        der_of(&first.cert)
    );

    // An open connection keeps working across the renewal; new ones get the new certificate.
    volume.update(
        &fs::read(&second.cert).expect("cert"),
        &fs::read(&second.key).expect("key"),
    );
    wait_for_certificate(&webhook, &client, &second.cert).await;
    webhook.wait_for_log("serving the new certificate");

    // A key that is not the certificate's: logged, and the last good pair keeps serving.
    volume.update(
        &fs::read(&first.cert).expect("cert"),
        &fs::read(&second.key).expect("key"),
    );
    let line = webhook.wait_for_log("certificate not reloaded");
    assert!(
        line.contains("does not belong to the certificate"),
        "{line}"
    );
    assert_eq!(
        served_certificate(&client, webhook.reviews).await,
        der_of(&second.cert)
    );
    let (status, _) = send(
        &client,
        webhook.reviews,
        Method::POST,
        WEBHOOK_MUTATE_PATH,
        serde_json::to_vec(&admission_review("after", &fixture_pods()[0].1)).expect("JSON"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

/// Polls new TLS connections until the server shows the certificate in `cert`.
async fn wait_for_certificate(webhook: &Webhook, client: &TlsConnector, cert: &str) {
    let deadline = Instant::now() + PATIENCE;
    while served_certificate(client, webhook.reviews).await != der_of(cert) {
        assert!(
            Instant::now() < deadline,
            "still the old certificate after {PATIENCE:?}:\n{}",
            webhook.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn certificate_files_rewritten_in_place_are_reloaded_and_garbage_is_refused() {
    let first = ServerCerts::new("webhook-1");
    let second = ServerCerts::new("webhook-2");
    let dir = TempDir::new("plain-certs");
    let (cert, key) = (dir.path.join("tls.crt"), dir.path.join("tls.key"));
    fs::copy(&first.cert, &cert).expect("cert");
    fs::copy(&first.key, &key).expect("key");
    let mut webhook = Webhook::start(&cert, &key, "osm");
    let client = tls_client(&[&first.certs.ca(), &second.certs.ca()], b"http/1.1");
    wait_for_certificate(&webhook, &client, &first.cert).await;

    fs::copy(&second.key, &key).expect("key");
    fs::copy(&second.cert, &cert).expect("cert");
    wait_for_certificate(&webhook, &client, &second.cert).await;

    fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").expect("garbage");
    let line = webhook.wait_for_log("certificate not reloaded");
    assert!(line.contains(&cert.display().to_string()), "{line}");
    assert_eq!(
        served_certificate(&client, webhook.reviews).await,
        der_of(&second.cert)
    );
}

#[test]
fn start_up_without_a_usable_certificate_fails_naming_the_file() {
    let certs = ServerCerts::new("webhook");
    let other = ServerCerts::new("other");
    let dir = TempDir::new("webhook-start");
    let missing = dir.path.join("missing.crt");
    let cases = [
        (
            missing.clone(),
            PathBuf::from(&certs.key),
            missing.display().to_string(),
        ),
        (
            PathBuf::from(&certs.key),
            PathBuf::from(&certs.key),
            "holds no PEM certificate".to_owned(),
        ),
        (
            PathBuf::from(&certs.cert),
            PathBuf::from(&other.key),
            format!(
                "the key in {} does not belong to the certificate in {}",
                other.key, certs.cert
            ),
        ),
    ];
    for (cert, key, expected) in cases {
        let log = dir.path.join("start.log");
        let status = webhook_command(&cert, &key, &["--style", "osm"], &log)
            .status()
            .expect("the webhook runs");
        let log = fs::read_to_string(&log).expect("log");
        assert!(
            !status.success(),
            "it started with {}:\n{log}",
            cert.display()
        );
        assert!(log.contains(&expected), "{log:?} lacks {expected:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_keeps_answering_briefly_then_exits_cleanly() {
    let certs = ServerCerts::new("webhook");
    let mut webhook = certs.start("osm");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(webhook.child.id()).expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    webhook.wait_for_log("admission webhook stopping");
    let review = admission_review("late", &fixture_pods()[0].1);
    let (_, answer) = post(&certs.client(b"h2"), webhook.reviews, &review).await;
    response_of(&answer, "late");
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = webhook.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}:\n{}", webhook.log());
}
