//! `probe-bypass-cluster`: runs the tests' one-node Kubernetes cluster
//! (`probe_bypass_testing::cluster`) until told to stop, then tears it down.
//!
//! It prints `ready <JSON>` once the node is Ready: the kubeconfig, the node's address, the
//! cgroup subtree and the rest of `cluster::Info`. It stops on SIGINT or SIGTERM, and with
//! `--until-stdin-closes` also when its standard input reaches its end: a test binary keeps that
//! pipe open and the kernel closes it however the test process ends, so no cluster outlives its
//! tests. `cargo xtask cluster up` runs it with `--dir` and `--demo` (the agent and the webhook
//! installed from `deploy/`, and a namespace of meshed pods; `--install` without the pods), and
//! `down` sends it SIGTERM.

use std::{
    io::Read as _,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    thread,
};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use probe_bypass_testing::cluster::{self, Installs};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: std::ffi::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() {
    let mut dir = None;
    let mut until_stdin_closes = false;
    let mut installs = Installs::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--until-stdin-closes" => until_stdin_closes = true,
            "--install" => installs.probe_bypass = true,
            "--demo" => installs.demo = true,
            other => {
                eprintln!(
                    "usage: probe-bypass-cluster [--dir DIR] [--until-stdin-closes] [--install] \
                     [--demo]; not {other:?}"
                );
                std::process::exit(2);
            }
        }
    }
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(error) = unsafe { sigaction(signal, &action) } {
            eprintln!("installing the {signal} handler: {error}");
            std::process::exit(1);
        }
    }
    if until_stdin_closes {
        thread::spawn(|| {
            let mut sink = [0; 64];
            while std::io::stdin().read(&mut sink).is_ok_and(|read| read > 0) {}
            STOP.store(true, Ordering::SeqCst);
        });
    }
    cluster::supervise(dir, installs, || STOP.load(Ordering::SeqCst));
}
