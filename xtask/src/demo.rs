//! `cargo xtask demo`: the product's main job on one machine, no cluster needed.
//!
//! The default demo ([`run_mesh`]) builds the agent and `probe-bypass-demo` (a binary of the test
//! support crate, which xtask cannot depend on: it embeds the kernel object) and runs it: meshed
//! pods A and B with HAProxy sidecars and pod C, called behind the mesh's iptables rules and behind
//! the agent's eBPF datapath. It runs in its own process group, so Ctrl-C reaches only xtask, which
//! passes it on and waits for the demo to unwind; then it sweeps whatever the demo's names say is
//! left (a demo killed outright leaves its guards undropped).
//!
//! `--healthcheck-only` ([`run`]) builds two pods (network namespaces joined to the host by veths), runs a small app in one, runs
//! the agent on a directory of their manifests, probes them from the host the way the kubelet does
//! (with curl), prints what came back, and tears everything down, on Ctrl-C too.

use std::{
    fs,
    io::Read as _,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, setup};

/// The demo's pods: netns name, host veth, host address, pod address.
/// 198.18.0.0/15 is reserved for benchmarks, so it is never a real network here.
const PODS: [(&str, &str, &str, &str); 2] = [
    ("pb-demo-app", "pbdemo-app", "198.18.254.1", "198.18.254.2"),
    (
        "pb-demo-down",
        "pbdemo-down",
        "198.18.254.5",
        "198.18.254.6",
    ),
];
const APP_PORT: u16 = 8080;
const ADMIN: &str = "127.0.0.1:19091";

/// Everything the demo made, undone in reverse order by [`Cleanup::run`].
#[derive(Default)]
struct Cleanup {
    children: Vec<Child>,
    netns: Vec<String>,
    veths: Vec<String>,
    dirs: Vec<PathBuf>,
}

impl Cleanup {
    fn run(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
        // Deleting one end of a veth pair deletes both at once, whereas a deleted namespace takes
        // its pair down in the background: veths first, so the teardown is over when reported.
        for veth in self.veths.drain(..) {
            let _ = Command::new("ip")
                .args(["link", "del", &veth])
                .stderr(Stdio::null())
                .status();
        }
        for netns in self.netns.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &netns]).status();
        }
        for dir in self.dirs.drain(..) {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// `cargo xtask demo [--keep]`: builds the agent and the demo binary, runs it, and sweeps after
/// it.
pub fn run_mesh(keep: bool) -> Result<()> {
    setup::ensure()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces, cgroups and eBPF programs: run it as root");
    }
    println!("building the agent (with its eBPF object) and the demo…");
    cargo(&[
        "build",
        "--release",
        "--package",
        "probe-bypass",
        "--bin",
        "probe-bypass",
    ])?;
    cargo(&[
        "build",
        "--release",
        "--package",
        "probe-bypass-testing",
        "--bin",
        "probe-bypass-demo",
    ])?;
    let demo_bin = crate::target_dir()?.join("release/probe-bypass-demo");
    let mut command = Command::new(&demo_bin);
    if keep {
        command.arg("--keep");
    }
    let child = command
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", demo_bin.display()))?;
    let pid = child.id();
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: the demo is tearing itself down…");
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
    })
    .context("installing the Ctrl-C handler")?;
    let mut child = child;
    let status = child.wait().context("waiting for the demo")?;
    let swept = sweep(pid);
    if !swept.is_empty() {
        println!("swept what the demo left: {}", swept.join(", "));
    }
    match status.code() {
        Some(0) => Ok(()),
        // 130 is the demo's answer to an interrupt: it has torn itself down and said so.
        Some(130) => std::process::exit(130),
        _ => bail!("the demo failed: {status}"),
    }
}

/// Removes what the demo process `pid` made and did not remove (its resources are named after
/// its pid: see tests/support), and names what it removed.
fn sweep(pid: u32) -> Vec<String> {
    let mut swept = Vec::new();
    let cgroup_root = Path::new("/sys/fs/cgroup");
    let entries = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|entry| entry.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    for name in entries(cgroup_root) {
        if name.starts_with(&format!("probe-bypass-test-{pid}-")) {
            let dir = cgroup_root.join(&name);
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
            }
            swept.push(format!("cgroup {}", dir.display()));
        }
    }
    for name in entries(Path::new("/sys/class/net")) {
        if name.starts_with(&format!("pbt{pid}x")) {
            let _ = Command::new("ip").args(["link", "del", &name]).status();
            swept.push(format!("veth {name}"));
        }
    }
    for name in entries(Path::new("/run/netns")) {
        if name.starts_with(&format!("pb-test-{pid}-")) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
            swept.push(format!("netns {name}"));
        }
    }
    let tmp = std::env::temp_dir();
    for name in entries(&tmp) {
        let dir = tmp.join(&name);
        if name.starts_with(&format!("pb-bpffs-{pid}-")) {
            let _ = Command::new("umount").arg("--recursive").arg(&dir).status();
        }
        if name.starts_with("pb-") && name.contains(&format!("-{pid}-")) {
            let _ = fs::remove_dir_all(&dir);
            swept.push(format!("dir {}", dir.display()));
        }
    }
    swept
}

/// `cargo xtask demo --healthcheck-only`: the healthcheck on 15904 alone.
pub fn run() -> Result<()> {
    setup::ensure()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo creates network namespaces: run it as root");
    }
    println!("building the agent (release, with its eBPF object)…");
    cargo(&["build", "--release", "--package", "probe-bypass"])?;
    let agent_bin = crate::target_dir()?.join("release/probe-bypass");

    let cleanup = Arc::new(Mutex::new(Cleanup::default()));
    let on_interrupt = Arc::clone(&cleanup);
    ctrlc::set_handler(move || {
        eprintln!("\ninterrupted: tearing the demo down");
        if let Ok(mut cleanup) = on_interrupt.lock() {
            cleanup.run();
        }
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    let result = demo(&agent_bin, &cleanup);
    if let Ok(mut cleanup) = cleanup.lock() {
        cleanup.run();
    }
    println!("\ntorn down: namespaces, veths, app, agent and manifests removed");
    result
}

fn demo(agent_bin: &Path, cleanup: &Arc<Mutex<Cleanup>>) -> Result<()> {
    for (netns, veth, host_ip, pod_ip) in PODS {
        if Path::new("/run/netns").join(netns).exists() {
            bail!(
                "network namespace {netns} exists already (an earlier demo?); remove it with `ip netns del {netns}`"
            );
        }
        ip(&["netns", "add", netns])?;
        record(cleanup, |c| c.netns.push(netns.to_owned()));
        ip(&[
            "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
        ])?;
        record(cleanup, |c| c.veths.push(veth.to_owned()));
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", veth])?;
        ip(&["link", "set", veth, "up"])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{pod_ip}/30"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        println!("pod {netns}: ip {pod_ip}, host side {veth} {host_ip}");
    }

    let (app_netns, _, _, app_ip) = PODS[0];
    let app = Command::new("ip")
        .args(["netns", "exec", app_netns])
        .arg(std::env::current_exe().context("locating xtask")?)
        .args(["demo-app", "--listen", &format!("{app_ip}:{APP_PORT}")])
        .spawn()
        .context("starting the demo app")?;
    record(cleanup, |c| c.children.push(app));
    println!(
        "app listening on {app_ip}:{APP_PORT} in {app_netns}; nothing listens in {}",
        PODS[1].0
    );

    let dir = std::env::temp_dir().join(format!("pb-demo-pods-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    record(cleanup, |c| c.dirs.push(dir.clone()));
    for (netns, _, _, pod_ip) in PODS {
        fs::write(dir.join(format!("{netns}.yaml")), manifest(netns, pod_ip))?;
    }
    println!("manifests in {}", dir.display());

    let agent = Command::new(agent_bin)
        .args(["run", "--pod-manifests"])
        .arg(&dir)
        .args(["--admin-addr", ADMIN])
        // The demo shows the healthcheck; it does not attach eBPF programs to this machine's
        // cgroup root.
        .args(["--datapath", "none"])
        .env("RUST_LOG", "info")
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the agent")?;
    record(cleanup, |c| c.children.push(agent));
    wait_ready()?;

    let app_ip = PODS[0].3;
    let down_ip = PODS[1].3;
    let cases = [
        ("open port", app_ip, "/fsm-healthcheck", Some("8080")),
        ("closed port", down_ip, "/fsm-healthcheck", Some("8080")),
        ("OSM path", app_ip, "/osm-healthcheck", Some("8080")),
        ("undeclared port", app_ip, "/fsm-healthcheck", Some("22")),
        ("port not a number", app_ip, "/fsm-healthcheck", Some("abc")),
        (
            "port out of range",
            app_ip,
            "/fsm-healthcheck",
            Some("70000"),
        ),
        ("header missing", app_ip, "/fsm-healthcheck", None),
        ("other path", app_ip, "/healthz", Some("8080")),
    ];
    println!("\nkubelet-like probes (curl, User-Agent kube-probe/1.31) from the host:\n");
    println!("| case | request | status | body |\n|---|---|---|---|");
    for (case, ip, path, port) in cases {
        let (status, body) = curl_probe(ip, path, port)?;
        let header = port.map_or_else(
            || "no header".to_owned(),
            |p| format!("Original-Tcp-Port: {p}"),
        );
        println!("| {case} | GET {ip}:15904{path}, {header} | {status} | {body} |");
    }
    println!("\nthe agent's metrics (http://{ADMIN}/metrics), probe counters:");
    for line in http_get("/metrics")?.lines() {
        if line.starts_with("probe_bypass_healthcheck_probes_total")
            || line.starts_with("probe_bypass_pods")
        {
            println!("  {line}");
        }
    }
    Ok(())
}

/// Notes something to undo; the Ctrl-C handler shares the list.
fn record(cleanup: &Mutex<Cleanup>, note: impl FnOnce(&mut Cleanup)) {
    if let Ok(mut cleanup) = cleanup.lock() {
        note(&mut cleanup);
    }
}

fn manifest(name: &str, pod_ip: &str) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: demo
  annotations:
    probe-bypass/netns: {name}
spec:
  containers:
  - name: app
    image: demo
    livenessProbe:
      tcpSocket:
        port: {APP_PORT}
status:
  podIP: {pod_ip}
"
    )
}

fn ip(args: &[&str]) -> Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("running ip")?;
    if !status.success() {
        bail!("ip {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn wait_ready() -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if http_get("/health/ready").is_ok_and(|body| body.starts_with("ready")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent did not become ready within 10 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Probes like the kubelet: GET, its User-Agent and Accept headers, the probe's header.
fn curl_probe(ip: &str, path: &str, port: Option<&str>) -> Result<(String, String)> {
    let mut command = Command::new("curl");
    command.args([
        "-sS",
        "--max-time",
        "5",
        "-H",
        "User-Agent: kube-probe/1.31",
        "-H",
        "Accept: */*",
    ]);
    if let Some(port) = port {
        command.args(["-H", &format!("Original-Tcp-Port: {port}")]);
    }
    command.args(["-w", "\n%{http_code}", &format!("http://{ip}:15904{path}")]);
    let output = command.output().context("running curl")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (body, status) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    Ok((status.to_owned(), body.trim().to_owned()))
}

fn http_get(path: &str) -> Result<String> {
    let addr: SocketAddr = ADMIN.parse()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    std::io::Write::write_all(
        &mut stream,
        format!("GET {path} HTTP/1.1\r\nHost: {ADMIN}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// `xtask demo-app --listen ADDR`: the demo's app, run inside a pod's namespace. Accepts and closes
/// connections until killed.
pub fn app(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    for stream in listener.incoming() {
        drop(stream);
    }
    Ok(())
}
