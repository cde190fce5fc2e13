//! The agent's HTTPS admin address (`run --secure-admin-addr`, issue 15), the real binary against
//! a stand-in API server that answers TokenReviews and SubjectAccessReviews over real HTTPS
//! (`tests/support/review_api.rs`). The client is curl, as a scraper: a bearer token in the
//! `Authorization` header, the agent's certificate verified against the CA that issued it.
//!
//! Needs no privileges: no datapath, pods from a directory of manifests.
#![expect(
    clippy::expect_used,
    reason = "test setup that cannot proceed panics, naming what failed"
)]

use std::{fs, net::SocketAddr, path::Path, process::Command, time::Duration};

use probe_bypass_testing::{
    agent::{Agent, free_loopback_port},
    kube_api::Kubeconfig,
    review_api::ReviewApi,
};
use serde_json::Value;
use tokio::runtime::Runtime;

const PROMETHEUS: &str = "system:serviceaccount:monitoring:prometheus-k8s";
const PROMETHEUS_TOKEN: &str = "prometheus-token";
/// A good token whose user has no grant.
const STRANGER: &str = "system:serviceaccount:default:someone";
const STRANGER_TOKEN: &str = "someone-token";

/// A pod the agent cannot serve (its namespace does not exist): `/health/ready` names it.
const UNSERVABLE_POD: &str = r#"{"apiVersion":"v1","kind":"Pod",
  "metadata":{"name":"secret-shop-cart","namespace":"shop",
    "annotations":{"probe-bypass/netns":"/nonexistent/pb-admin-test/netns"}},
  "spec":{"containers":[{"name":"app","livenessProbe":{"tcpSocket":{"port":8080}}}]},
  "status":{"podIP":"198.18.0.2"}}"#;

/// The stand-in API server (on a runtime of its own, so the test itself can block on curl) and
/// the agent pointed at it.
struct Node {
    api: ReviewApi,
    _kubeconfig: Kubeconfig,
    agent: Agent,
    /// The HTTPS admin address.
    secure: SocketAddr,
    /// The CA the agent's certificate was issued by, or `None` for a self-signed one.
    ca: Option<String>,
    _runtime: Runtime,
}

impl Node {
    /// An agent with a certificate issued by the stand-in's CA, serving [`UNSERVABLE_POD`], with
    /// Prometheus's token and a stranger's known to the API server.
    fn start() -> Self {
        Self::start_with(true)
    }

    fn start_with(given_cert: bool) -> Self {
        let runtime = Runtime::new().expect("a tokio runtime");
        let api = runtime.block_on(ReviewApi::start());
        api.add_token(
            PROMETHEUS_TOKEN,
            PROMETHEUS,
            &["system:serviceaccounts", "system:authenticated"],
        );
        api.add_token(STRANGER_TOKEN, STRANGER, &["system:authenticated"]);
        let kubeconfig = api.kubeconfig();
        let secure = free_loopback_port();
        let mut agent = Agent::builder()
            .pods(&[("cart.json", UNSERVABLE_POD)])
            .flag("--secure-admin-addr", secure.to_string())
            .env("KUBECONFIG", &kubeconfig.path)
            .env_remove("KUBERNETES_SERVICE_HOST");
        let mut ca = None;
        if given_cert {
            let (cert, key) = api.certificates().issue_for("agent", &["IP:127.0.0.1"]);
            agent = agent
                .flag("--admin-tls-cert", cert)
                .flag("--admin-tls-key", key);
            ca = Some(api.certificates().ca());
        }
        let agent = agent.start();
        let node = Self {
            api,
            _kubeconfig: kubeconfig,
            agent,
            secure,
            ca,
            _runtime: runtime,
        };
        node.wait_for_https();
        node
    }

    fn wait_for_https(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while self.get("/health/alive", None).0 != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "no HTTPS admin address on {}:\n{}",
                self.secure,
                self.agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET `path` on the HTTPS admin address with `token`: the status and the body.
    fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut curl = curl(self.secure, path);
        match &self.ca {
            Some(ca) => curl.args(["--cacert", ca]),
            None => curl.arg("--insecure"),
        };
        if let Some(token) = token {
            curl.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        answer_of(&curl.output().expect("run curl"))
    }
}

/// curl, as a scraper runs it: the status after the body, no proxy, a bound on the whole request.
fn curl(addr: SocketAddr, path: &str) -> Command {
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--noproxy", "*", "--max-time", "10"])
        .args(["-w", "\n%{http_code}"])
        .arg(format!("https://{addr}{path}"));
    curl
}

fn answer_of(output: &std::process::Output) -> (u16, String) {
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn a_token_allowed_get_on_metrics_reads_them_and_the_verdict_is_kept() {
    let node = Node::start();
    node.api.grant(PROMETHEUS, "/metrics");
    let (code, body) = node.get("/metrics", Some(PROMETHEUS_TOKEN));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("probe_bypass_"), "{body}");
    assert_eq!(
        node.api.reviews(),
        (1, 1),
        "one TokenReview, one SubjectAccessReview"
    );

    // The next scrapes, within a minute, ask the API server nothing.
    for _ in 0..3 {
        assert_eq!(node.get("/metrics", Some(PROMETHEUS_TOKEN)).0, 200);
    }
    assert_eq!(node.api.reviews(), (1, 1));
    // The agent asked with its own token, from the kubeconfig.
    assert_eq!(node.api.unauthorized(), 0);
}

#[test]
fn no_token_or_a_bad_one_is_refused_401_and_told_nothing() {
    let node = Node::start();
    node.api.grant(PROMETHEUS, "/metrics");
    let (code, body) = node.get("/metrics", None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("no bearer token"), "{body}");
    assert_eq!(
        node.api.reviews(),
        (0, 0),
        "nothing to review without a token"
    );

    let (code, body) = node.get("/metrics", Some("made-up-token"));
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("invalid bearer token"), "{body}");
    assert!(!body.contains("probe_bypass_"), "{body}");
    assert_eq!(
        node.api.reviews(),
        (1, 0),
        "a bad token is not asked about access"
    );

    // The refusal is kept a while too: the same bad token again costs no review.
    assert_eq!(node.get("/metrics", Some("made-up-token")).0, 401);
    assert_eq!(node.api.reviews(), (1, 0));

    // A scraper is told how to authenticate.
    let headers = curl(node.secure, "/metrics")
        .args(["-D", "-", "--cacert", node.ca.as_deref().expect("a CA")])
        .output()
        .expect("run curl");
    let headers = String::from_utf8_lossy(&headers.stdout).to_ascii_lowercase();
    assert!(
        headers.contains("www-authenticate: bearer realm=\"probe-bypass\""),
        "{headers}"
    );
}

#[test]
fn a_good_token_without_the_permission_is_refused_403() {
    let node = Node::start();
    node.api.grant(PROMETHEUS, "/metrics");
    let (code, body) = node.get("/metrics", Some(STRANGER_TOKEN));
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains(STRANGER) && body.contains("may not get /metrics"),
        "{body}"
    );
    assert_eq!(node.api.reviews(), (1, 1));

    // Allowed one path is not allowed another: Prometheus's grant here is /metrics alone.
    let (code, body) = node.get("/health/ready", Some(PROMETHEUS_TOKEN));
    assert_eq!(code, 403, "{body}");
}

#[test]
fn readiness_names_pods_only_to_an_allowed_token() {
    let node = Node::start();
    node.agent.wait_ready(503, Duration::from_secs(10));
    let (code, body) = node.get("/health/ready", None);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("not ready: 1 of 1 pods have no healthcheck listener\n"),
        "{body}"
    );
    assert!(!body.contains("secret-shop-cart"), "{body}");
    assert_eq!(node.api.reviews(), (0, 0));

    node.api.grant("system:serviceaccounts", "/health/ready");
    let (code, body) = node.get("/health/ready", Some(PROMETHEUS_TOKEN));
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("shop/secret-shop-cart"),
        "granted by group: {body}"
    );

    // The plain-HTTP address on loopback is for people on the node: it tells everything.
    let (code, body) = node.agent.get("/health/ready").expect("the local address");
    assert_eq!(code, 503);
    assert!(body.contains("shop/secret-shop-cart"), "{body}");
}

#[test]
fn with_the_api_server_down_new_callers_are_refused_and_the_agent_keeps_serving() {
    let mut node = Node::start();
    node.api.grant(PROMETHEUS, "/metrics");
    node.api.grant(STRANGER, "/metrics");
    assert_eq!(node.get("/metrics", Some(PROMETHEUS_TOKEN)).0, 200);
    node.api.stop();

    let (code, body) = node.get("/metrics", Some(STRANGER_TOKEN));
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cannot check the caller's token"), "{body}");
    // An error is not kept: each request asks again, and each is refused.
    assert_eq!(node.get("/metrics", Some(STRANGER_TOKEN)).0, 503);
    assert!(
        node.agent.log_text().contains("cannot check its token"),
        "{}",
        node.agent.log_text()
    );

    // A verdict given before the API server went down stands until it expires (a minute).
    assert_eq!(node.get("/metrics", Some(PROMETHEUS_TOKEN)).0, 200);
    assert_eq!(node.get("/health/alive", None).0, 200);
    assert!(node.agent.is_running());
    let (code, body) = node.agent.get("/metrics").expect("the local address");
    assert_eq!((code, body.contains("probe_bypass_")), (200, true));
}

#[test]
fn without_a_certificate_the_agent_serves_a_self_signed_one() {
    let node = Node::start_with(false);
    let verified = curl(node.secure, "/health/alive")
        .output()
        .expect("run curl");
    // 60: the peer's certificate cannot be verified with the known CAs.
    assert_eq!(
        verified.status.code(),
        Some(60),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert_eq!(node.get("/health/alive", None), (200, "alive\n".to_owned()));
    assert!(
        node.agent.log_text().contains("self-signed"),
        "{}",
        node.agent.log_text()
    );
}

#[test]
fn without_an_api_server_the_secure_address_refuses_to_start_naming_why() {
    let home = tempdir_for("no-kubeconfig");
    let mut agent = Agent::builder()
        .pods(&[])
        .flag("--secure-admin-addr", free_loopback_port().to_string())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", &home)
        .spawn();
    let status = agent
        .wait_for_exit(Duration::from_secs(10))
        .expect("the agent exits");
    assert!(!status.success());
    let log = agent.log_text();
    assert!(
        log.contains(
            "--secure-admin-addr checks its callers' tokens with the Kubernetes API server"
        ),
        "{log}"
    );
    let _ = fs::remove_dir_all(&home);
}

/// Prometheus as deploy/monitoring/ binds it, with the permissions deploy/rbac.yaml's
/// `probe-bypass-metrics-reader` grants: it reads `/metrics` and the whole readiness answer.
#[test]
fn the_deployed_metrics_reader_role_lets_prometheus_read_what_it_scrapes() {
    let node = Node::start();
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let documents = |file: &str| -> Vec<Value> {
        let text = fs::read_to_string(deploy.join(file)).expect("read a deploy/ file");
        serde_norway::Deserializer::from_str(&text)
            .map(|document| serde::Deserialize::deserialize(document).expect("YAML"))
            .collect()
    };
    let role = documents("rbac.yaml")
        .into_iter()
        .find(|doc| doc["metadata"]["name"] == "probe-bypass-metrics-reader")
        .expect("the metrics reader ClusterRole");
    let binding = &documents("monitoring/binding.yaml")[0];
    assert_eq!(binding["roleRef"]["name"], "probe-bypass-metrics-reader");
    let subject = &binding["subjects"][0];
    let user = format!(
        "system:serviceaccount:{}:{}",
        subject["namespace"].as_str().expect("a namespace"),
        subject["name"].as_str().expect("a name")
    );
    assert_eq!(user, PROMETHEUS);
    for rule in role["rules"].as_array().expect("rules") {
        assert_eq!(rule["verbs"], serde_json::json!(["get"]));
        for url in rule["nonResourceURLs"]
            .as_array()
            .expect("non-resource URLs")
        {
            node.api.grant(&user, url.as_str().expect("a path"));
        }
    }
    let (code, body) = node.get("/metrics", Some(PROMETHEUS_TOKEN));
    assert_eq!(code, 200, "{body}");
    let (_, body) = node.get("/health/ready", Some(PROMETHEUS_TOKEN));
    assert!(body.contains("shop/secret-shop-cart"), "{body}");
}

fn tempdir_for(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("pb-test-{what}-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("make a temp dir");
    dir
}
