//! The probe-bypass kernel programs, loaded and attached by the agent (`agent/src/datapath.rs`).
//!
//! For now one program: a cgroup connect4 hook that recognises connections to meshed pods and to
//! their probe ports, and counts them. It never changes a connection; the redirects that replace
//! the mesh's iptables rules build on these maps.
//!
//! Built for the BPF target this is a `no_std`, `no_main` object. Workspace-wide commands such as
//! `cargo clippy --workspace` also check it for the host, where it is an empty ordinary program:
//! a `no_std` binary cannot be built there, since the host's `core` unwinds on panic.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, PerCpuArray},
    programs::SockAddrContext,
};
use probe_bypass_common::{Counter, PodAddr, PodInfo};

/// Room for every pod of a large node twice over (dual-stack pods have an entry per family).
const MAX_MESHED_PODS: u32 = 4096;

/// Room for the mesh's probe ports (15901-15904), its metrics port and extra ports from the config.
const MAX_PROBE_PORTS: u32 = 256;

/// What a cgroup sock_addr program returns to let the call go on (0 would fail it with EPERM).
const ALLOW: i32 = 1;

/// The addresses of the meshed pods on this node, IPv4 ones IPv4-mapped. Filled by the agent.
#[map]
static MESHED_PODS: HashMap<PodAddr, PodInfo> = HashMap::with_max_entries(MAX_MESHED_PODS, 0);

/// The probe ports (host byte order) of meshed pods. Filled by the agent.
#[map]
static PROBE_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PROBE_PORTS, 0);

/// Event counters, indexed by [`Counter`]. Per CPU so that counting needs no atomics; the agent sums them.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Runs on every `connect()` of an IPv4 socket in the cgroup it is attached to, before the
/// connection is made. Counts the call, whether it goes to a meshed pod, and whether it goes to one
/// of that pod's probe ports. Always lets the call proceed, unchanged.
///
/// Minimum kernel version: 4.17 (`BPF_CGROUP_INET4_CONNECT`). From 5.7 the agent attaches it with a
/// bpf_link, earlier with `BPF_PROG_ATTACH`.
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    count(Counter::Connect4);

    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the duration of the call,
    // and both fields allow 4-byte reads.
    let (user_ip4, user_port) = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };

    let destination = PodAddr::ipv4_mapped(user_ip4);
    if MESHED_PODS.get_ptr(destination).is_none() {
        return ALLOW;
    }
    count(Counter::ToMeshedPod);

    // The kernel loads the 16-bit `sin_port` (network byte order) into the low half of the 32-bit field.
    let port = u16::from_be(user_port as u16);
    if PROBE_PORTS.get_ptr(port).is_some() {
        count(Counter::ToProbePort);
    }
    ALLOW
}

/// Adds one to a counter on the current CPU.
#[inline(always)]
fn count(counter: Counter) {
    // The lookup cannot fail for an index below `Counter::COUNT`, but the verifier insists on the check.
    if let Some(value) = COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: the pointer is to this CPU's slot, valid while the program runs, and the program
        // does not migrate between CPUs meanwhile. A plain increment suffices: only a preemptible
        // kernel can interleave two runs on one CPU, and then a count may be lost, never corrupted.
        unsafe { *value += 1 };
    }
}

/// The programs cannot panic: the verifier rejects any path that could reach this endless loop, so
/// a panic that the compiler failed to remove shows up as a load error rather than at run time.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

/// The license the kernel is told. No helper that requires a GPL-compatible license is used;
/// without this section the loader would declare "GPL" on the project's behalf.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
