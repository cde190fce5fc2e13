//! The mesh's sidecar, stood in for by HAProxy, and the certificates its mTLS needs.
//!
//! One HAProxy per meshed pod, started inside the pod's network namespace and inside the test's
//! cgroup, behaves as FSM's proxy does behind `fsm-init.iptables`: it runs as the proxy UID (1500),
//! takes inbound connections on 15003 (mTLS, client certificate required) and hands them to the app
//! on 127.0.0.1 at the original port, and takes outbound connections on 15001 and forwards them,
//! over mTLS, to their original destination. Both read the original destination with
//! getsockopt(SO_ORIGINAL_DST). It logs one line per connection, which [`Sidecar::log_since`]
//! parses, so a test can tell which connections went through which proxy.

use std::{
    fmt, fs,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{cgroup::TestCgroup, pod::TestPod};

/// The proxy's UID and GID: the mesh's rules let this user's connections out unredirected.
pub const PROXY_UID: u32 = 1500;

/// Where the mesh redirects a meshed pod's inbound connections: the proxy's mTLS port.
pub const INBOUND_PORT: u16 = 15003;

/// Where the mesh redirects a meshed pod's outbound connections.
pub const OUTBOUND_PORT: u16 = 15001;

/// Explicit proxying (no interception), where [`SidecarConfig::explicit`] adds it: the app sends
/// its requests to this port on 127.0.0.1, and the proxy forwards them to the peer pod's
/// [`EXPLICIT_INBOUND_PORT`].
pub const EXPLICIT_OUTBOUND_PORT: u16 = 15080;

/// Explicit proxying's inbound port: the proxy forwards what arrives here to the app on 127.0.0.1.
pub const EXPLICIT_INBOUND_PORT: u16 = 15081;

/// Name of the inbound frontend (and its bind) in the proxy's configuration and log.
pub const INBOUND: &str = "inbound";

/// Name of the outbound frontend (and its bind) in the proxy's configuration and log.
pub const OUTBOUND: &str = "outbound";

/// The HAProxy the setup installs (Debian's 2.6).
const HAPROXY: &str = "/usr/sbin/haproxy";

/// How long HAProxy may take to listen after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Each log line HAProxy writes for a connection it forwarded starts with this tag.
const LOG_TAG: &str = "probe-bypass-test";

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A directory under the system temp dir named after the test process and a counter, removed
/// with its contents on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(what: &str) -> Self {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pb-test-{what}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("create {}: {error}", path.display()));
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A certificate authority of the test's own and the certificates it issued, made with the
/// `openssl` CLI into a temp dir.
pub struct Certificates {
    dir: TempDir,
    /// How long the CA and every certificate it issues are valid, in days.
    days: String,
}

impl Certificates {
    /// Makes the CA (an EC P-256 key and a self-signed certificate valid for a day).
    pub fn new() -> Self {
        Self::valid_for(1)
    }

    /// [`Self::new`], the CA and what it issues valid for `days`.
    pub fn valid_for(days: u32) -> Self {
        let dir = TempDir::new("certs");
        let certs = Self {
            dir,
            days: days.to_string(),
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            &certs.days,
            "-subj",
            "/CN=probe-bypass test mesh CA",
            "-keyout",
            &certs.file("ca.key"),
            "-out",
            &certs.ca(),
        ]);
        certs
    }

    /// The CA certificate (PEM), which both ends of every mTLS connection verify the other against.
    pub fn ca(&self) -> String {
        self.file("ca.pem")
    }

    /// Issues `name` a certificate for both ends of mTLS (server and client authentication),
    /// returning a PEM with the certificate and its key, as HAProxy's `crt` wants them.
    pub fn issue(&self, name: &str) -> String {
        let (cert, key) = self.issue_for(name, &[]);
        let pem = self.file(&format!("{name}.pem"));
        let read = |path: &str| {
            fs::read_to_string(path).unwrap_or_else(|error| panic!("read {path}: {error}"))
        };
        fs::write(&pem, [read(&cert), read(&key)].concat())
            .unwrap_or_else(|error| panic!("write {pem}: {error}"));
        pem
    }

    /// Issues `name` a certificate as [`Self::issue`] does, valid for `alt_names` too
    /// (`DNS:localhost`, `IP:127.0.0.1`), and returns the paths of the certificate and of its key.
    pub fn issue_for(&self, name: &str, alt_names: &[&str]) -> (String, String) {
        self.issue_to(
            name,
            &format!("/CN={name}"),
            "serverAuth, clientAuth",
            alt_names,
        )
    }

    /// Issues the certificate `name` to `subject` (`/O=group/CN=user`, as Kubernetes reads a
    /// client's identity) for `usage` (`serverAuth`, `clientAuth`, or both), valid for
    /// `alt_names` too, and returns the paths of the certificate and of its key.
    pub fn issue_to(
        &self,
        name: &str,
        subject: &str,
        usage: &str,
        alt_names: &[&str],
    ) -> (String, String) {
        let key = self.file(&format!("{name}.key"));
        let request = self.file(&format!("{name}.csr"));
        let cert = self.file(&format!("{name}.crt"));
        let extensions = self.file(&format!("{name}.ext"));
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &key,
            "-out",
            &request,
        ]);
        let mut extension_text = format!(
            "basicConstraints = CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = {usage}\n"
        );
        if !alt_names.is_empty() {
            extension_text += &format!("subjectAltName = {}\n", alt_names.join(", "));
        }
        fs::write(&extensions, extension_text)
            .unwrap_or_else(|error| panic!("write {extensions}: {error}"));
        openssl(&[
            "x509",
            "-req",
            "-in",
            &request,
            "-CA",
            &self.ca(),
            "-CAkey",
            &self.file("ca.key"),
            "-CAcreateserial",
            "-days",
            &self.days,
            "-extfile",
            &extensions,
            "-out",
            &cert,
        ]);
        (cert, key)
    }

    fn file(&self, name: &str) -> String {
        self.dir.path.join(name).display().to_string()
    }
}

/// Runs `openssl` with `args`, panicking with what it printed if it fails.
fn openssl(args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run openssl (apt-get install openssl): {error}"));
    assert!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A meshed pod's proxy: HAProxy in the pod's namespace and the test's cgroup, killed on drop.
pub struct Sidecar {
    child: Child,
    dir: TempDir,
    netns: String,
}

impl Sidecar {
    /// Starts the proxy of `pod` with the certificate `pem` (see [`Certificates::issue`]) and
    /// waits until it listens on both of its ports.
    pub fn start(cgroup: &TestCgroup, pod: &TestPod, certs: &Certificates, pem: &str) -> Self {
        Self::start_with(cgroup, pod, &SidecarConfig::mtls(pem, &certs.ca()))
    }

    /// Starts the proxy of `pod` configured by `config` and waits until it listens on both of its
    /// ports.
    pub fn start_with(cgroup: &TestCgroup, pod: &TestPod, config: &SidecarConfig) -> Self {
        let dir = TempDir::new("sidecar");
        let mut ports = vec![INBOUND_PORT, OUTBOUND_PORT];
        if config.explicit.is_some() {
            ports.extend([EXPLICIT_OUTBOUND_PORT, EXPLICIT_INBOUND_PORT]);
        }
        let child = start_haproxy(cgroup, pod, &dir, &config.render(), &ports);
        Self {
            child,
            dir,
            netns: pod.netns_name.clone(),
        }
    }

    /// HAProxy's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A mark in the log: the lines written after it are [`Self::log_since`] it.
    pub fn log_mark(&self) -> u64 {
        fs::metadata(self.log_path()).map_or(0, |meta| meta.len())
    }

    /// The connections the proxy logged after `mark`, in the order it logged them.
    pub fn log_since(&self, mark: u64) -> Vec<ProxyLog> {
        let text = fs::read(self.log_path()).unwrap_or_default();
        let start = usize::try_from(mark).map_or(text.len(), |mark| mark.min(text.len()));
        String::from_utf8_lossy(&text[start..])
            .lines()
            .map(ProxyLog::parse)
            .collect()
    }

    /// Everything the proxy logged, raw.
    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path.join("stdout.log")
    }

    fn stderr_text(&self) -> String {
        stderr_text(&self.dir)
    }
}

/// Starts HAProxy with `config` in `pod`'s namespace and in `cgroup`, its stdout and stderr in
/// `dir` (`stdout.log`, `stderr.log`), and waits until it listens on each of `ports`, or fails
/// with HAProxy's own words. The caller owns the child; the cgroup kills it in any case.
fn start_haproxy(
    cgroup: &TestCgroup,
    pod: &TestPod,
    dir: &TempDir,
    config: &str,
    ports: &[u16],
) -> Child {
    let config_path = dir.path.join("haproxy.cfg");
    fs::write(&config_path, config)
        .unwrap_or_else(|error| panic!("write {}: {error}", config_path.display()));
    let log = fs::File::create(dir.path.join("stdout.log")).expect("create the proxy's log");
    let errors = fs::File::create(dir.path.join("stderr.log")).expect("create the proxy's log");
    let config_path = config_path.display().to_string();
    // `ip netns exec` execs the program, so the child is HAProxy itself (-db: in the foreground,
    // no master process).
    let mut child = cgroup
        .command(
            "ip",
            &[
                "netns",
                "exec",
                &pod.netns_name,
                HAPROXY,
                "-db",
                "-f",
                &config_path,
            ],
        )
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(errors)
        .spawn()
        .unwrap_or_else(|error| panic!("start {HAPROXY}: {error}"));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if pod.listens_on(ports) {
            return child;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "HAProxy in {} exited at start ({status}):\n{}",
                pod.netns_name,
                stderr_text(dir)
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "HAProxy in {} does not listen on each of {ports:?}:\n{}",
                pod.netns_name,
                stderr_text(dir)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_text(dir: &TempDir) -> String {
    fs::read_to_string(dir.path.join("stderr.log")).unwrap_or_default()
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!(
                "--- HAProxy in {} ---\n{}{}",
                self.netns,
                self.log_text(),
                self.stderr_text()
            );
        }
    }
}

/// The sidecar as a container of a pod made through CRI ([`crate::cri`]): HAProxy from the
/// sidecar image, configured by a [`SidecarConfig`], its configuration and certificates mounted
/// at their host paths. It starts as root and becomes the proxy's UID itself, as [`Sidecar`] does.
/// Its log is the container's, which CRI writes with a prefix on each line.
pub struct SidecarContainer {
    dir: TempDir,
    mounts: Vec<PathBuf>,
    log: Option<PathBuf>,
}

impl SidecarContainer {
    /// The container's name in its pod.
    pub const NAME: &str = "sidecar";

    /// Writes `config`'s configuration for a container to run.
    pub fn new(config: &SidecarConfig) -> Self {
        let dir = TempDir::new("sidecar-container");
        fs::write(dir.path.join("haproxy.cfg"), config.render()).expect("write haproxy.cfg");
        let mut mounts = vec![dir.path.clone()];
        if let Some(Mtls { pem, ca }) = &config.mtls {
            for file in [pem, ca] {
                let parent = std::path::Path::new(file).parent().expect("a file's dir");
                if !mounts.iter().any(|mount| mount == parent) {
                    mounts.push(parent.to_owned());
                }
            }
        }
        Self {
            dir,
            mounts,
            log: None,
        }
    }

    /// The container to create in the pod.
    pub fn container(&self) -> crate::cri::Container {
        let config = self.dir.path.join("haproxy.cfg").display().to_string();
        let mut container =
            crate::cri::Container::new(Self::NAME, crate::images::SIDECAR, &["-db", "-f", &config]);
        container.mounts = self
            .mounts
            .iter()
            .map(|dir| crate::cri::Bind::same(dir))
            .collect();
        container
    }

    /// The container as a Kubernetes pod's, with the `hostPath` volumes it mounts (its
    /// configuration's and certificates' directories, at the same paths): for a pod of the test
    /// cluster ([`crate::cluster`]), on the same machine.
    pub fn pod_container(&self) -> (serde_json::Value, Vec<serde_json::Value>) {
        let config = self.dir.path.join("haproxy.cfg").display().to_string();
        let names: Vec<String> = (0..self.mounts.len())
            .map(|n| format!("sidecar-{n}"))
            .collect();
        let container = serde_json::json!({
            "name": Self::NAME,
            "image": crate::images::SIDECAR,
            "imagePullPolicy": "Never",
            "args": ["-db", "-f", config],
            "volumeMounts": self.mounts.iter().zip(&names).map(|(dir, name)| serde_json::json!({
                "name": name, "mountPath": dir, "readOnly": true,
            })).collect::<Vec<_>>(),
        });
        let volumes = self
            .mounts
            .iter()
            .zip(&names)
            .map(|(dir, name)| {
                serde_json::json!({"name": name, "hostPath": {"path": dir, "type": "Directory"}})
            })
            .collect();
        (container, volumes)
    }

    /// Reads the proxy's log from `log`, the container's CRI log file, once it was started.
    pub fn started(&mut self, log: PathBuf) {
        self.log = Some(log);
    }

    /// A mark in the log: the lines written after it are [`Self::log_since`] it.
    pub fn log_mark(&self) -> u64 {
        self.log
            .as_ref()
            .and_then(|log| fs::metadata(log).ok())
            .map_or(0, |meta| meta.len())
    }

    /// The connections the proxy logged after `mark`, in the order it logged them.
    pub fn log_since(&self, mark: u64) -> Vec<ProxyLog> {
        let text = self
            .log
            .as_ref()
            .and_then(|log| fs::read(log).ok())
            .unwrap_or_default();
        let start = usize::try_from(mark).map_or(text.len(), |mark| mark.min(text.len()));
        String::from_utf8_lossy(&text[start..])
            .lines()
            .filter_map(|line| line.splitn(4, ' ').nth(3))
            .map(ProxyLog::parse)
            .collect()
    }
}

/// The mesh's proxy's mTLS: its certificate and key (`pem`), and the CA it trusts (`ca`).
#[derive(Clone, Debug)]
struct Mtls {
    pem: String,
    ca: String,
}

/// How a sidecar's HAProxy is configured: the frontends, backends and UID of the mesh's proxy
/// always, and the rest as a test or benchmark needs it. The parity tests run the mesh's own
/// ([`Self::mtls`]); the datapath benchmark runs it without TLS and without a log
/// ([`Self::plain`]), whose handshakes and writes would bury the redirect it measures, and closes
/// with a reset ([`Self::nolinger`]).
#[derive(Clone, Debug)]
pub struct SidecarConfig {
    mtls: Option<Mtls>,
    log: bool,
    nolinger: bool,
    /// The peer pod and the local app's port, for explicit proxying.
    explicit: Option<(Ipv4Addr, u16)>,
}

impl SidecarConfig {
    /// The mesh's sidecar: mTLS with the certificate `pem` (see [`Certificates::issue`]) on both
    /// sides, trusting `ca`, and a log line per connection ([`Sidecar::log_since`]).
    pub fn mtls(pem: &str, ca: &str) -> Self {
        Self {
            mtls: Some(Mtls {
                pem: pem.to_owned(),
                ca: ca.to_owned(),
            }),
            log: true,
            nolinger: false,
            explicit: None,
        }
    }

    /// Plain TCP on both sides, without a log.
    pub fn plain() -> Self {
        Self {
            mtls: None,
            log: false,
            nolinger: false,
            explicit: None,
        }
    }

    /// Logs a line per connection, or not.
    pub fn log(mut self, log: bool) -> Self {
        self.log = log;
        self
    }

    /// `option nolinger`: the proxy closes both of a connection's sides with a reset, as a
    /// benchmark's clients do, and leaves no TIME_WAIT behind.
    pub fn nolinger(mut self) -> Self {
        self.nolinger = true;
        self
    }

    /// Adds explicit proxying, the mesh's frontends left as they are: the app's requests to
    /// 127.0.0.1:[`EXPLICIT_OUTBOUND_PORT`] go to `peer`:[`EXPLICIT_INBOUND_PORT`], and what
    /// arrives on that port goes to the app on 127.0.0.1:`app_port`. No interception is needed:
    /// this is what the same proxies cost when the app is configured to use them.
    pub fn explicit(mut self, peer: Ipv4Addr, app_port: u16) -> Self {
        self.explicit = Some((peer, app_port));
        self
    }

    /// HAProxy's configuration text.
    ///
    /// `server local 127.0.0.1` has no port, so HAProxy connects to the port the client originally
    /// asked for; `server orig 0.0.0.0:0` connects to the original address and port. With mTLS
    /// the outbound side checks the peer's certificate against the CA but not its name (no
    /// `verifyhost`, no SNI), as the test's certificates name pods, not addresses. `retries 0`:
    /// like a mesh's TCP proxy, a failed connection to the server fails the client's at once
    /// (HAProxy would wait a second before each retry). `logasap` logs a connection as soon as it
    /// reaches its server, before the client sees the answer; one that fails is logged when it
    /// ends.
    pub fn render(&self) -> String {
        let (inbound_tls, outbound_tls) = match &self.mtls {
            Some(Mtls { pem, ca }) => (
                format!(" ssl crt {pem} verify required ca-file {ca}"),
                format!(" ssl crt {pem} ca-file {ca} verify required"),
            ),
            None => (String::new(), String::new()),
        };
        let (global_log, defaults_log, log_format) = if self.log {
            (
                "    log stdout format raw local0\n",
                "    log global\n    option logasap\n",
                format!(
                    "    log-format \"{LOG_TAG} frontend=%f client=%ci:%cp original_dst=%fi:%fp \
                     server=%si:%sp termination=%ts\"\n"
                ),
            )
        } else {
            ("", "", String::new())
        };
        let explicit = self.explicit.map_or_else(String::new, |(peer, app_port)| {
            format!(
                "
frontend explicit_outbound
    bind 127.0.0.1:{EXPLICIT_OUTBOUND_PORT}
    default_backend to_peer

backend to_peer
    server peer {peer}:{EXPLICIT_INBOUND_PORT}

frontend explicit_inbound
    bind :{EXPLICIT_INBOUND_PORT}
    default_backend to_app

backend to_app
    server app 127.0.0.1:{app_port}
"
            )
        });
        let nolinger = if self.nolinger {
            "    option nolinger\n"
        } else {
            ""
        };
        format!(
            "global
    uid {PROXY_UID}
    gid {PROXY_UID}
{global_log}
defaults
    mode tcp
{defaults_log}{nolinger}    retries 0
    timeout connect 1s
    timeout client 5s
    timeout server 5s
{log_format}
frontend {INBOUND}
    bind :{INBOUND_PORT} name {INBOUND}{inbound_tls}
    default_backend to_local_app

backend to_local_app
    server local 127.0.0.1

frontend {OUTBOUND}
    bind :{OUTBOUND_PORT} name {OUTBOUND}
    default_backend to_original_dst

backend to_original_dst
    server orig 0.0.0.0:0{outbound_tls}
{explicit}"
        )
    }
}

/// A fast HTTP app: HAProxy answering every request itself (`http-request return`) with 200
/// and `ok`, on `port` of every address of its pod, keeping connections alive as long as the
/// client does. A benchmark's app, so that the proxies in front of it, not the app, are measured.
pub struct HttpResponder {
    child: Child,
    _dir: TempDir,
}

impl HttpResponder {
    /// The body of every answer.
    pub const BODY: &str = "ok";

    /// Starts it in `pod`'s namespace and in `cgroup`, and waits until it listens.
    pub fn start(cgroup: &TestCgroup, pod: &TestPod, port: u16) -> Self {
        let dir = TempDir::new("http-app");
        let config = format!(
            "global
    nbthread 2

defaults
    mode http
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    timeout http-keep-alive 10s

frontend app
    bind :{port}
    http-request return status 200 content-type text/plain string {}
",
            Self::BODY
        );
        let child = start_haproxy(cgroup, pod, &dir, &config, &[port]);
        Self { child, _dir: dir }
    }

    /// HAProxy's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HttpResponder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One line of a proxy's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyLog {
    /// The frontend that accepted the connection ([`INBOUND`] or [`OUTBOUND`]); empty if the line
    /// could not be parsed.
    pub frontend: String,
    /// The client's address and port as the proxy saw it.
    pub client: String,
    pub event: ProxyEvent,
    /// The line as HAProxy wrote it.
    pub raw: String,
}

/// What the proxy did with a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyEvent {
    /// It read the original destination and connected to `server` for it (or tried to:
    /// `termination` is HAProxy's two-letter session state, `--` for a normal one).
    Forwarded {
        original_dst: SocketAddr,
        server: SocketAddr,
        termination: String,
    },
    /// The connection failed before it reached the proxy's logic, with HAProxy's reason
    /// (`SSL handshake failure` for a client that did not speak mTLS).
    Failed(String),
    /// A line this parser does not know.
    Unparsed,
}

impl ProxyLog {
    /// Parses a line of the log format of [`SidecarConfig::render`], or one of the fixed-format
    /// lines HAProxy 2.6 writes for connections that die before a stream exists:
    /// `<client> [<date>] <frontend>/<bind>: <reason>`.
    pub fn parse(line: &str) -> Self {
        Self::parse_forwarded(line)
            .or_else(|| Self::parse_failed(line))
            .unwrap_or_else(|| Self {
                frontend: String::new(),
                client: String::new(),
                event: ProxyEvent::Unparsed,
                raw: line.to_owned(),
            })
    }

    fn parse_forwarded(line: &str) -> Option<Self> {
        let mut words = line.split(' ');
        if words.next()? != LOG_TAG {
            return None;
        }
        let mut field = |name: &str| {
            words
                .next()?
                .strip_prefix(name)?
                .strip_prefix('=')
                .map(str::to_owned)
        };
        let frontend = field("frontend")?;
        let client = field("client")?;
        let original_dst = field("original_dst")?.parse().ok()?;
        let server = field("server")?.parse().ok()?;
        let termination = field("termination")?;
        Some(Self {
            frontend,
            client,
            event: ProxyEvent::Forwarded {
                original_dst,
                server,
                termination,
            },
            raw: line.to_owned(),
        })
    }

    fn parse_failed(line: &str) -> Option<Self> {
        let (client, rest) = line.split_once(" [")?;
        let (_date, rest) = rest.split_once("] ")?;
        let (listener, reason) = rest.split_once(": ")?;
        let (frontend, _bind) = listener.split_once('/')?;
        Some(Self {
            frontend: frontend.to_owned(),
            client: client.to_owned(),
            event: ProxyEvent::Failed(reason.trim().to_owned()),
            raw: line.to_owned(),
        })
    }
}

impl fmt::Display for ProxyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}
