//! The sandbox's process, as the kubelet's pause image has it: it holds the pod's namespaces and
//! does nothing else until it is stopped.

fn main() {
    probe_bypass_test_images::exit_on_stop_signals();
    loop {
        // SAFETY: `pause` only waits for a signal.
        unsafe { libc::pause() };
    }
}
