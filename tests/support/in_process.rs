//! The eBPF datapath driven in-process by a benchmark, as the agent drives it: installed under the
//! benchmark's own cgroup (never the root) with pins on a bpffs of its own, reinstalled over its
//! pins to switch settings (as a restarted agent would), pods meshed through the library's API.
//! Its counters show what the programs did with the measured connections.

use std::{
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use probe_bypass::{
    datapath::{
        self, Counters, Datapath, FiledListeners, Inbound, PodRules, ProbeBypass, Programs,
        Settings,
    },
    exclusions::Exclusions,
    netns::NetnsWorker,
    preflight,
};

use crate::{
    bpffs::TestPins,
    cgroup::{TestCgroup, attached_programs},
    mesh_rules::{redirect_packets, unused_cidrs, unused_ports},
    pod::TestPod,
    sidecar::{INBOUND_PORT, OUTBOUND_PORT, PROXY_UID},
};

/// The datapath installed under a cgroup, pinned on a bpffs of its own. On drop the handles go,
/// the pins are uninstalled (with the bpffs), and nothing may be left attached to the cgroup.
pub struct InProcessDatapath {
    /// Behind a mutex only because [`Datapath::guard_inbound`] takes the agent's shared datapath.
    datapath: Option<Mutex<Datapath>>,
    pins: TestPins,
    cgroup: PathBuf,
}

impl InProcessDatapath {
    /// Checks the host as the agent does; installs nothing yet.
    pub fn new(cgroup: &TestCgroup) -> Self {
        let pins = TestPins::new();
        preflight::check(&preflight::DATAPATH_NEEDS, Some(cgroup.path()), pins.path())
            .expect("host checks");
        Self {
            datapath: None,
            pins,
            cgroup: cgroup.path().to_owned(),
        }
    }

    /// Installs with the mesh's ports and the host trusted for the probe ports, or reinstalls over
    /// the pins with new settings as a restarted agent would; pods stay in the pinned maps.
    pub fn install(&mut self, sk_msg: bool) {
        self.install_object(sk_msg, None);
    }

    /// [`Self::install`] with the programs of `object` (a file, such as the programs built without
    /// their log) in place of the agent's own, or the agent's own without one. The programs' log
    /// is off either way.
    pub fn install_object(&mut self, sk_msg: bool, object: Option<&Path>) {
        self.datapath = None;
        let settings = Settings {
            proxy_uid: PROXY_UID,
            inbound_port: INBOUND_PORT,
            outbound_port: OUTBOUND_PORT,
            probe_ports: [15010, 15901, 15902, 15903, 15904].into(),
            probe_bypass: ProbeBypass::Host,
            sk_msg,
            node: Exclusions::default(),
            proc_root: "/proc".into(),
        };
        let programs = Programs {
            object: object.map(Path::to_owned),
            log: None,
        };
        let (datapath, _no_log) =
            Datapath::install_with(&self.cgroup, self.pins.path(), settings, &programs)
                .unwrap_or_else(|error| panic!("install: {:?}", anyhow::Error::new(error)));
        self.datapath = Some(Mutex::new(datapath));
    }

    /// Where the programs and maps are pinned.
    pub fn pin_path(&self) -> &Path {
        self.pins.path()
    }

    /// Meshes `pod` with `exclusions`, and has its connections from other nodes handed to its
    /// proxy, which must listen already.
    pub fn mesh(&mut self, pod: &TestPod, exclusions: Exclusions) {
        self.datapath()
            .upsert_pod(&PodRules {
                addrs: vec![IpAddr::V4(pod.ip)],
                netns_cookie: pod.netns_cookie(),
                exclusions,
                dependent: None,
            })
            .expect("mesh the pod");
        guard_inbound(self.shared(), pod);
    }

    /// The programs' counters.
    pub fn counters(&self) -> Counters {
        self.shared()
            .lock()
            .expect("no panic while it was shared")
            .counters()
            .expect("read the datapath's counters")
    }

    fn datapath(&mut self) -> &mut Datapath {
        self.datapath
            .as_mut()
            .expect("installed")
            .get_mut()
            .expect("no panic while it was shared")
    }

    fn shared(&self) -> &Mutex<Datapath> {
        self.datapath.as_ref().expect("installed")
    }
}

impl Drop for InProcessDatapath {
    fn drop(&mut self) {
        self.datapath = None;
        match datapath::uninstall(self.pins.path()) {
            Ok(report) if report.left.is_empty() => {}
            Ok(report) => eprintln!("uninstall left {:?} behind", report.left),
            Err(error) => eprintln!("uninstall {}: {error}", self.pins.path().display()),
        }
        match attached_programs(&self.cgroup) {
            Ok(attached) if attached.is_empty() => {}
            Ok(attached) => eprintln!(
                "after uninstall, {} still has {attached:?}",
                self.cgroup.display()
            ),
            Err(error) => eprintln!("{error}"),
        }
    }
}

/// The datapath's form of the exclusions [`crate::mesh_rules::fsm_rules_with_unused`] adds: `n`
/// of each kind, matching no traffic.
pub fn unused_exclusions(n: usize) -> Exclusions {
    Exclusions {
        inbound_ports: unused_ports(n).into_iter().collect(),
        outbound_ports: unused_ports(n).into_iter().collect(),
        outbound_ip_ranges: unused_cidrs(n).into_iter().collect(),
        outbound_ip_range_inclusions: Default::default(),
    }
}

/// Has the datapath hand `pod`'s connections from other nodes to its proxy, as the agent does
/// when it serves a pod ([`Datapath::guard_inbound`]): its proxy's listener (started before the
/// datapath, so sockops never saw it listen) is taken over, then sk_lookup is attached to its
/// namespace.
fn guard_inbound(datapath: &Mutex<Datapath>, pod: &TestPod) {
    let worker = NetnsWorker::spawn().expect("netns worker");
    let inbound = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(Datapath::guard_inbound(
            datapath,
            &FiledListeners::default(),
            &worker,
            pod.netns(),
            pod.netns_cookie(),
        ))
        .expect("guard the pod's inbound connections");
    assert!(
        matches!(
            inbound,
            Inbound::Known | Inbound::TookOver { listeners: 1.., .. }
        ),
        "no proxy listens in {}: {inbound:?}",
        pod.netns_name
    );
}

/// Connections redirected to a sidecar, inbound and outbound, and for the datapath the messages
/// sk_msg moved: what a benchmark reads before and after a measurement to check that every
/// measured connection really met the interception.
#[derive(Clone, Copy)]
pub struct Redirects {
    pub inbound: u64,
    pub outbound: u64,
    pub sk_msg: Option<u64>,
}

impl Redirects {
    /// The mesh's iptables REDIRECT counters: `inbound` pod's inbound chain, `outbound` pod's
    /// outbound chain.
    pub fn of_iptables(inbound: &TestPod, outbound: &TestPod) -> Self {
        Self {
            inbound: redirect_packets(inbound, "FSM_PROXY_IN_REDIRECT"),
            outbound: redirect_packets(outbound, "FSM_PROXY_OUT_REDIRECT"),
            sk_msg: None,
        }
    }

    /// The datapath's counters.
    pub fn of_datapath(datapath: &InProcessDatapath) -> Self {
        let Counters {
            redirected_inbound,
            redirected_outbound,
            sk_msg_redirected,
            remote_redirected,
            ..
        } = datapath.counters();
        Self {
            // Same-node at connect(), cross-node at sk_lookup: both meet the pod's proxy.
            inbound: redirected_inbound + remote_redirected,
            outbound: redirected_outbound,
            sk_msg: Some(sk_msg_redirected),
        }
    }

    /// What was counted from `before` to `self`.
    pub fn since(&self, before: &Self) -> Self {
        Self {
            inbound: self.inbound.saturating_sub(before.inbound),
            outbound: self.outbound.saturating_sub(before.outbound),
            sk_msg: self
                .sk_msg
                .zip(before.sk_msg)
                .map(|(now, then)| now.saturating_sub(then)),
        }
    }

    /// Panics, naming `label`, unless at least `connections` met the inbound redirect (if
    /// `inbound`) and the outbound one (if `outbound`), and, where sk_msg is counted, it moved
    /// messages exactly when `sk_msg_on`.
    pub fn check(
        &self,
        (inbound, outbound): (bool, bool),
        sk_msg_on: bool,
        connections: u64,
        label: &str,
    ) {
        assert!(
            !inbound || self.inbound >= connections,
            "{label}: {} inbound redirects for {connections} connections",
            self.inbound
        );
        assert!(
            !outbound || self.outbound >= connections,
            "{label}: {} outbound redirects for {connections} connections",
            self.outbound
        );
        if let Some(moved) = self.sk_msg {
            assert_eq!(
                moved > 0,
                sk_msg_on,
                "{label}: sk_msg moved {moved} messages"
            );
        }
    }
}

impl fmt::Display for Redirects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "redirected: {} inbound, {} outbound",
            self.inbound, self.outbound
        )?;
        if let Some(moved) = self.sk_msg {
            write!(f, "; sk_msg moved {moved} messages")?;
        }
        Ok(())
    }
}
