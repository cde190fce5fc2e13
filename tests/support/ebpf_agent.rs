//! The agent run with its eBPF datapath in a test: attached to the test's cgroup, pinned on a bpffs
//! of its own, and uninstalled (with a check that nothing is left) when its guard drops.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use crate::{
    agent::Agent,
    bpffs::TestPins,
    cgroup::{TestCgroup, attached_programs},
};

/// The agent with its eBPF datapath attached to the test's cgroup (never the root) and pinned
/// on a bpffs of the test's own. On drop the agent is stopped and `probe-bypass uninstall`
/// removes the pins, which detaches the programs: afterwards the pin directory must be gone and
/// nothing attached to the cgroup.
pub struct EbpfAgent {
    agent: Option<Agent>,
    // After the agent: unmounts the bpffs (and uninstalls what `probe-bypass uninstall` did not).
    pins: TestPins,
    cgroup: PathBuf,
}

impl EbpfAgent {
    /// Starts the agent with `start`, given the datapath's arguments (attached to `cgroup`, pinned
    /// on a bpffs of the guard's own), and waits until it has attached its programs; `start`
    /// returns once the agent serves its pods.
    pub fn start_with(cgroup: &TestCgroup, start: impl FnOnce(&[&str]) -> Agent) -> Self {
        // From here on, dropping the guard uninstalls whatever the agent pinned.
        let mut guard = Self {
            agent: None,
            pins: TestPins::new(),
            cgroup: cgroup.path().to_owned(),
        };
        let cgroup_root = cgroup.path().display().to_string();
        let pin_path = guard.pins.arg();
        let agent = guard.agent.insert(start(&[
            "--datapath",
            "ebpf",
            "--cgroup-root",
            &cgroup_root,
            "--pin-path",
            &pin_path,
        ]));
        let deadline = Instant::now() + Duration::from_secs(10);
        while attached_programs(cgroup.path())
            .unwrap_or_else(|error| panic!("{error}"))
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "the agent attached nothing to {cgroup_root}:\n{}",
                agent.log_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
        guard
    }

    /// Where the datapath's programs and maps are pinned.
    pub fn pin_path(&self) -> &Path {
        self.pins.path()
    }

    /// The running agent.
    pub fn agent(&self) -> &Agent {
        self.agent
            .as_ref()
            .expect("the agent runs until the guard drops")
    }

    /// What is wrong after `probe-bypass uninstall`, if anything.
    fn uninstall(&self) -> Option<String> {
        let output = match Command::new(crate::agent_bin())
            .arg("uninstall")
            .arg("--pin-path")
            .arg(self.pins.path())
            .output()
        {
            Ok(output) => output,
            Err(error) => return Some(format!("could not run `probe-bypass uninstall`: {error}")),
        };
        if !output.status.success() {
            return Some(format!(
                "`probe-bypass uninstall --pin-path {}` failed ({}): {}",
                self.pins.path().display(),
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        if self.pins.path().exists() {
            return Some(format!(
                "`probe-bypass uninstall` left {} behind",
                self.pins.path().display()
            ));
        }
        match attached_programs(&self.cgroup) {
            Ok(attached) if attached.is_empty() => None,
            Ok(attached) => Some(format!(
                "after `probe-bypass uninstall`, {} still has {attached:?} attached",
                self.cgroup.display()
            )),
            Err(error) => Some(error),
        }
    }
}

impl Drop for EbpfAgent {
    fn drop(&mut self) {
        drop(self.agent.take());
        let Some(problem) = self.uninstall() else {
            return;
        };
        if thread::panicking() {
            eprintln!("{problem}");
        } else {
            panic!("{problem}");
        }
    }
}
