//! Skip-or-fail rule for tests that need root, network namespaces or BPF.
//!
//! On a developer's machine without the privileges a test prints why and passes without running.
//! When `CI` is set the same situation is a failure: CI must run every privileged test.

use std::path::Path;

/// What a privileged test needs from the machine; `None` when all of it is there.
pub fn missing_privileges() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".to_owned());
    }
    for tool in ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"] {
        if Path::new(tool).exists() {
            return None;
        }
    }
    Some("iproute2 `ip` is not installed (run `cargo xtask setup`)".to_owned())
}

/// Returns true when the test may run. Otherwise prints the reason and returns false, or panics
/// when `CI` is set. The test is named by its thread, which libtest names after the test.
pub fn can_run() -> bool {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    let Some(reason) = missing_privileges() else {
        return true;
    };
    skip(test, &reason);
    false
}

/// Skips `test`, which cannot run here for `reason`: prints why, or panics when `CI` is set, where
/// every test must run.
pub fn skip(test: &str, reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: cannot run ({reason}) and CI is set: every test must run in CI"
    );
    eprintln!("SKIPPED {test}: {reason}");
}

/// [`can_run`] for a benchmark's `main`, which has no test thread to be named after: asks from a
/// thread named `bench <name>`, and passes a panic (no privileges and CI set) on as its own.
pub fn bench_can_run(name: &str) -> bool {
    std::thread::Builder::new()
        .name(format!("bench {name}"))
        .spawn(can_run)
        .unwrap_or_else(|error| panic!("start the privilege check: {error}"))
        .join()
        .unwrap_or_else(|payload| std::panic::resume_unwind(payload))
}

/// Returns early from a test that cannot run here (see [`can_run`]).
#[macro_export]
macro_rules! require_privileges {
    () => {
        if !$crate::privilege::can_run() {
            return;
        }
    };
}
