//! The probe-bypass kernel programs, loaded and attached by the agent (`agent/src/datapath.rs`).
//!
//! Together they do for every meshed pod on the node what the mesh's init container did with
//! per-pod iptables rules (`tests/fixtures/fsm-init.iptables`), from one place, the node's cgroup v2
//! root:
//!
//! - **connect4 / connect6** decide, before a TCP connection is made, whether it goes to a proxy:
//!   a meshed pod's own connections to its proxy's outbound port, connections to a meshed pod to
//!   its proxy's inbound port. They remember the destination that was asked for.
//! - **sockops** files that destination under the connection's addresses once it is established,
//!   and puts the sockets of mesh connections into the `SOCKETS` sockhash for sk_msg. It also
//!   notes which connections to meshed pods start on this node, and which sockets are proxies'
//!   inbound listeners, for sk_lookup.
//! - **getsockopt** answers the proxy's `SO_ORIGINAL_DST` from that record.
//! - **sk_msg** hands data between two sockets of the same node straight to the peer's receive
//!   queue, skipping the rest of the TCP/IP stack.
//! - **sk_lookup**, attached to each meshed pod's network namespace rather than to the cgroup,
//!   hands the connections that arrive from other nodes (where no hook of this node ran at
//!   connect()) to the pod's proxy, as the mesh's PREROUTING rule did (issue 5). See
//!   [`pb_sk_lookup`] for why this hook and not tc.
//!
//! The one rule iptables cannot express: a connection to a probe port (15901-15904 and the mesh's
//! metrics port) skips the proxy only when it comes from the host network namespace, where the
//! kubelet runs. From any other pod it meets the proxy, and mTLS, like any other port.
//!
//! They also count the kubelet's probes to a pod the agent knows but does not serve yet (issue 4):
//! such a probe finds no listener and fails with "connection refused" (istio#18505).
//!
//! Built for the BPF target this is a `no_std`, `no_main` object. Workspace-wide commands such as
//! `cargo clippy --workspace` also check it for the host, where it is an empty ordinary program:
//! a `no_std` binary cannot be built there, since the host's `core` unwinds on panic.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF target has no read-modify-write atomics in `core::sync::atomic` (it declares no
// compare-and-swap), but it has an atomic add, which LLVM emits for the intrinsic.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(
    target_arch = "bpf",
    expect(internal_features, reason = "core_intrinsics, for the BPF atomic add")
)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_uid_gid, bpf_get_netns_cookie,
        bpf_get_socket_cookie,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sk_reuseport, sock_ops},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, lpm_trie::Key as LpmKey},
    programs::{
        SkLookupContext, SkMsgContext, SkReuseportContext, SockAddrContext, SockOpsContext,
        SockoptContext,
    },
};
use probe_bypass_common::{
    Addr, CidrRule, Config, ConnKey, Counter, ListenerKey, OrigDst, PodEntry, PodName, PortRule,
    cidr_rule, names, port_rule, redirect,
};

/// Fails the build unless each program and map is named as `probe_bypass_common::names` says:
/// the agent loads and pins them by those names.
macro_rules! named {
    ($($item:ident = $name:ident),+ $(,)?) => {
        $(const _: () = {
            #[expect(unused_imports, reason = "it only proves that the item exists")]
            use crate::$item as _;
            assert!(names::same(stringify!($item), names::$name));
        };)+
    };
}

named!(
    pb_connect4 = CONNECT4,
    pb_connect6 = CONNECT6,
    pb_sockops = SOCKOPS,
    pb_getsockopt = GETSOCKOPT,
    pb_sk_msg = SK_MSG,
    pb_sk_lookup = SK_LOOKUP,
    pb_reuseport = REUSEPORT,
    CONFIG = CONFIG,
    PODS_BY_ADDR = PODS_BY_ADDR,
    PODS_BY_NETNS = PODS_BY_NETNS,
    PORT_RULES = PORT_RULES,
    CIDR_RULES = CIDR_RULES,
    PENDING = PENDING,
    ORIG_DST = ORIG_DST,
    SOCKETS = SOCKETS,
    COUNTERS = COUNTERS,
    EARLY_PROBES = EARLY_PROBES,
    LISTENERS = LISTENERS,
    LOCAL_CONNECTS = LOCAL_CONNECTS,
    DEPENDENTS = DEPENDENTS,
);

/// Room for every pod of a large node twice over (dual-stack pods have an entry per family).
const MAX_PODS: u32 = 4096;
/// Port rules: the node's probe ports and exclusions plus every pod's exclusions.
const MAX_PORT_RULES: u32 = 65536;
/// Address-range rules, node-wide and per pod.
const MAX_CIDR_RULES: u32 = 16384;
/// Connections being tracked at once (redirected and not yet closed, or sockets for sk_msg).
/// Least recently used entries make way when it is full.
const MAX_CONNECTIONS: u32 = 65536;

/// What a cgroup program returns to let the call go on (0 would fail it with EPERM).
const ALLOW: i32 = 1;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const SOCK_STREAM: u32 = 1;
const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` (level `SOL_IP`) and `IP6T_SO_ORIGINAL_DST` (level `SOL_IPV6`) share the number.
const SO_ORIGINAL_DST: i32 = 80;
/// A getsockopt buffer the kernel would refuse to hand a program (more than a page).
const MAX_OPTLEN: i32 = 4096;
const TCP_CLOSE: u32 = 7;
const IPPROTO_TCP: u32 = 6;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// Reads a field of a kernel context (or `bpf_sock`) with a load at the field's own offset.
///
/// The verifier only allows context loads at constant offsets from the pointer it handed over. Left
/// to itself, the compiler may compute a field's address ahead of a branch and load through it
/// later ("dereference of modified ctx ptr"); a volatile read of each field, made unconditionally,
/// keeps every load a plain `ptr + offset` access.
macro_rules! field {
    ($ptr:expr, $($field:tt)+) => {
        // SAFETY: the caller passes a context pointer the kernel handed to this program.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) }
    };
}

/// Logs one decision of the programs (a redirect, a bypass, an exclusion, a refusal) at debug
/// level, under the target the agent filters by ([`names::LOG_TARGET`]).
///
/// Off costs one load and a branch: aya-log compares the record's level with `AYA_LOG_LEVEL`, a
/// read-only global the agent sets at load (0, nothing, unless `--ebpf-log` or `RUST_LOG` enable
/// the target), before it formats anything or reserves room in its ring buffer; the verifier knows
/// the frozen value and drops the rest. Without the `log` feature the call is not compiled at all.
/// The first argument stands for a context, which aya-log does not read.
macro_rules! decision {
    ($($arg:tt)+) => {
        #[cfg(feature = "log")]
        aya_log_ebpf::debug!(&(), target: names::LOG_TARGET, $($arg)+);
    };
}

/// An address as the log prints it (`{:i}`): its 16 bytes, so an IPv4 address shows IPv4-mapped
/// (`::ffff:198.18.0.2`). An `IpAddr`, its family chosen at run time, did not pass the verifier
/// here (`R5 !read_ok` in connect4).
#[cfg(feature = "log")]
#[inline(always)]
fn ip(addr: Addr) -> [u8; 16] {
    let [a, b, c, d] = addr.words.map(u32::to_ne_bytes);
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// Node-wide settings, at index 0. Filled by the agent before it attaches anything.
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Meshed pods by each of their addresses (IPv4 ones IPv4-mapped).
#[map]
static PODS_BY_ADDR: HashMap<Addr, PodEntry> = HashMap::with_max_entries(MAX_PODS, 0);

/// Meshed pods by the cookie of their network namespace.
#[map]
static PODS_BY_NETNS: HashMap<u64, PodEntry> = HashMap::with_max_entries(MAX_PODS, 0);

/// Probe ports and port exclusions, node-wide and per pod. Only presence matters.
#[map]
static PORT_RULES: HashMap<PortRule, u8> = HashMap::with_max_entries(MAX_PORT_RULES, 0);

/// Address-range exclusions and inclusions, node-wide and per pod. Only presence matters.
#[map]
static CIDR_RULES: LpmTrie<CidrRule, u8> = LpmTrie::with_max_entries(MAX_CIDR_RULES, 0);

/// The destination a redirected socket asked for, by socket cookie, from connect() until the
/// connection is established (when its source port is known).
#[map]
static PENDING: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// The destination a redirected connection asked for, by its addresses (client first), from
/// established until the proxy's end closes.
#[map]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Established sockets of mesh connections, by their own end first. The sk_msg program is attached
/// to this map and runs for every message these sockets send.
#[map]
static SOCKETS: SockHash<ConnKey> = SockHash::with_max_entries(MAX_CONNECTIONS, 0);

/// Probes from the host network namespace (the kubelet) to a meshed pod the agent knows but does
/// not serve yet, by the pod's address (issue 4). The agent puts a pending pod's address in with
/// a count of 0 and takes the count (reads and removes the entry) once it serves the pod; the
/// programs only ever add to entries that are there.
#[map]
static EARLY_PROBES: HashMap<Addr, u64> = HashMap::with_max_entries(MAX_PODS, 0);

/// The proxies' inbound listeners, by network namespace and family. sockops puts every socket that
/// starts listening on the inbound port here (the agent adds those that listened before its
/// programs were attached); the kernel takes a socket out when it closes. sk_lookup hands the
/// connections that arrive from other nodes to these.
#[map]
static LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(MAX_PODS * 2, 0);

/// Connections to a meshed pod made on this node, by their addresses (client first), from the
/// client's connect() until the entry ages out. Their path was decided at connect(); sk_lookup
/// leaves them alone (issue 5: the two paths never both act on one connection).
#[map]
static LOCAL_CONNECTS: LruHashMap<ConnKey, u8> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// The pods whose only interception is this datapath, by their first address: no program reads
/// it. It lives here, pinned with the other maps, so that `probe-bypass uninstall` can name the
/// pods it would leave unprotected, from the pins alone.
#[map]
static DEPENDENTS: HashMap<Addr, PodName> = HashMap::with_max_entries(MAX_PODS, 0);

/// Event counters, indexed by [`Counter`]. Per CPU so that counting needs no atomics; the agent sums them.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

/// Runs on every `connect()` of an IPv4 socket in the cgroup, before the connection is made.
#[cgroup_sock_addr(connect4)]
pub fn pb_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let (ip4, port, kind) = (
        field!(sa, user_ip4),
        field!(sa, user_port),
        field!(sa, type_),
    );
    if kind != SOCK_STREAM {
        return ALLOW;
    }
    // The kernel loads the 16-bit `sin_port` (network byte order) into the low half of the field.
    let port = u16::from_be(port as u16);
    if let Some((to, to_port)) = decide(&ctx, Addr::ipv4_mapped(ip4), port) {
        // SAFETY: as above; connect4 may write these two fields with 4-byte stores.
        unsafe {
            (*ctx.sock_addr).user_ip4 = to.words[3];
            (*ctx.sock_addr).user_port = u32::from(to_port.to_be());
        }
    }
    ALLOW
}

/// Runs on every `connect()` of an IPv6 socket in the cgroup, before the connection is made. An
/// IPv4 destination reached through an IPv6 socket arrives here IPv4-mapped and is treated as the
/// IPv4 address it is.
#[cgroup_sock_addr(connect6)]
pub fn pb_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // Word by word: the kernel allows 4-byte reads of `user_ip6`.
    let words = [
        field!(sa, user_ip6[0]),
        field!(sa, user_ip6[1]),
        field!(sa, user_ip6[2]),
        field!(sa, user_ip6[3]),
    ];
    let (port, kind) = (field!(sa, user_port), field!(sa, type_));
    if kind != SOCK_STREAM {
        return ALLOW;
    }
    let port = u16::from_be(port as u16);
    if let Some((to, to_port)) = decide(&ctx, Addr { words }, port) {
        // SAFETY: as above; connect6 may write each word of `user_ip6` and `user_port`.
        unsafe {
            let sa = &mut *ctx.sock_addr;
            sa.user_ip6[0] = to.words[0];
            sa.user_ip6[1] = to.words[1];
            sa.user_ip6[2] = to.words[2];
            sa.user_ip6[3] = to.words[3];
            sa.user_port = u32::from(to_port.to_be());
        }
    }
    ALLOW
}

/// The decision of both connect programs: where a TCP connection to `dst`:`port` goes instead, if
/// anywhere. Records the original destination under the socket's cookie when it redirects.
///
/// The order follows the mesh's iptables rules (OUTPUT in the caller's pod, then PREROUTING in the
/// destination pod), with the probe ports open to the host network namespace only (with
/// `--probe-bypass-from kubelet`, to the kubelet's cgroup in it).
#[inline(always)]
fn decide(ctx: &SockAddrContext, dst: Addr, port: u16) -> Option<(Addr, u16)> {
    count(Counter::Connects);
    let config = CONFIG.get(0)?;
    // SAFETY: the helpers take the program's own context (or NULL, for the initial namespace).
    let caller_netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let loopback = dst.is_loopback();

    // Outbound: the caller is a meshed pod.
    // SAFETY: map values stay valid while the program runs (RCU); read by value at once.
    if let Some(caller) = unsafe { PODS_BY_NETNS.get(caller_netns) }.copied() {
        // The low half is the UID (in the initial user namespace).
        let uid = bpf_get_current_uid_gid() as u32;
        if uid == config.proxy_uid {
            // The proxy's own connections go on to the inbound rules of their destination. To
            // its own pod's address they meet its inbound port whatever the port, exclusions
            // included: the mesh's rule for the proxy's calls over `lo` jumps to the inbound
            // redirect before any exclusion is looked at.
            if !loopback && port != config.inbound_port && to_own_pod(&caller, dst) {
                count(Counter::RedirectedInbound);
                decision!(
                    "pod {:i} (netns {}): sidecar connects to its own pod [{:i}]:{}: inbound redirect to sidecar {}",
                    ip(caller.id),
                    caller_netns,
                    ip(dst),
                    port,
                    config.inbound_port
                );
                return remember(ctx, dst, port, redirect::INBOUND)
                    .then_some((dst, config.inbound_port));
            }
        } else {
            if loopback || to_own_pod(&caller, dst) {
                return None;
            }
            if !outbound_excluded(&caller, dst, port) {
                count(Counter::RedirectedOutbound);
                decision!(
                    "pod {:i} (netns {}): connect to [{:i}]:{}: outbound redirect to sidecar {}",
                    ip(caller.id),
                    caller_netns,
                    ip(dst),
                    port,
                    config.outbound_port
                );
                return remember(ctx, dst, port, redirect::OUTBOUND)
                    .then(|| (dst.loopback_like(), config.outbound_port));
            }
            // Excluded from its own proxy, the connection still meets its destination's inbound
            // rules, as it does when it arrives at another pod under iptables.
        }
    }
    if loopback {
        return None;
    }

    // Inbound: the destination is a meshed pod.
    // SAFETY: as above.
    let Some(target) = (unsafe { PODS_BY_ADDR.get(dst) }).copied() else {
        count_early_probe(caller_netns, dst, port);
        return None;
    };
    if port == config.inbound_port {
        // Already addressed to the proxy; rewriting it would only make the proxy loop to itself.
        return None;
    }
    if has_port_rule(Addr::UNSPECIFIED, port, port_rule::PROBE) {
        // SAFETY: NULL asks for the initial network namespace's cookie.
        let host_netns = unsafe { bpf_get_netns_cookie(core::ptr::null_mut()) };
        let trusted = if config.flags & Config::PROBE_BYPASS_FROM_ANY != 0 {
            true
        } else if caller_netns != host_netns {
            false
        } else if config.flags & Config::PROBE_BYPASS_FROM_KUBELET != 0 {
            // The caller's cgroup at the kubelet's level: the kubelet's own for the kubelet and
            // anything it runs below itself (its exec probes' helpers), another's for the rest of
            // the host network namespace (hostNetwork pods, node daemons, the runtime).
            // SAFETY: the helper takes a level and reads the current task's cgroup.
            let ancestor =
                unsafe { bpf_get_current_ancestor_cgroup_id(config.kubelet_cgroup_level as i32) };
            ancestor == config.kubelet_cgroup_id
        } else {
            true
        };
        if trusted {
            count(Counter::ProbeBypassed);
            if config.flags & Config::PROBE_BYPASS_FROM_ANY != 0 {
                decision!(
                    "pod {:i}: connect to [{:i}]:{} from netns {}: probe port {} bypass: any caller (--probe-bypass-from any)",
                    ip(target.id),
                    ip(dst),
                    port,
                    caller_netns,
                    port
                );
            } else if config.flags & Config::PROBE_BYPASS_FROM_KUBELET != 0 {
                decision!(
                    "pod {:i}: connect to [{:i}]:{} from netns {}: probe port {} bypass: caller is kubelet",
                    ip(target.id),
                    ip(dst),
                    port,
                    caller_netns,
                    port
                );
            } else {
                decision!(
                    "pod {:i}: connect to [{:i}]:{} from netns {}: probe port {} bypass: caller is in the host netns (--probe-bypass-from host)",
                    ip(target.id),
                    ip(dst),
                    port,
                    caller_netns,
                    port
                );
            }
            return None;
        }
        count(Counter::BypassRefused);
        if caller_netns == host_netns {
            decision!(
                "pod {:i}: connect to [{:i}]:{} from netns {}: refused: probe port from non-kubelet caller (host netns, another cgroup)",
                ip(target.id),
                ip(dst),
                port,
                caller_netns,
                config.inbound_port
            );
        } else {
            decision!(
                "pod {:i}: connect to [{:i}]:{} from netns {}: refused: probe port from non-kubelet caller (not the host netns)",
                ip(target.id),
                ip(dst),
                port,
                caller_netns,
                config.inbound_port
            );
        }
    } else if inbound_excluded(&target, port) {
        return None;
    }
    count(Counter::RedirectedInbound);
    decision!(
        "pod {:i}: connect to [{:i}]:{} from netns {}: inbound redirect to sidecar {}",
        ip(target.id),
        ip(dst),
        port,
        caller_netns,
        config.inbound_port
    );
    remember(ctx, dst, port, redirect::INBOUND).then_some((dst, config.inbound_port))
}

/// Counts a probe from the host network namespace to a pod in `EARLY_PROBES`: a meshed pod the
/// agent does not serve yet, so that nothing listens on its probe port. The connection goes on
/// as it would, unchanged.
///
/// This runs for every connection to an address that is not a meshed pod's, most of the node's
/// traffic, so the cheapest test that rejects nearly all of it comes first: one `PORT_RULES`
/// lookup (a hash of 20 bytes). Only a probe port goes on to a helper call (the host's netns
/// cookie) and an `EARLY_PROBES` lookup, and only a pending pod to an atomic add.
#[inline(always)]
fn count_early_probe(caller_netns: u64, dst: Addr, port: u16) {
    if !has_port_rule(Addr::UNSPECIFIED, port, port_rule::PROBE) {
        return;
    }
    // SAFETY: NULL asks for the initial network namespace's cookie.
    let host_netns = unsafe { bpf_get_netns_cookie(core::ptr::null_mut()) };
    if caller_netns != host_netns {
        return;
    }
    if let Some(probes) = EARLY_PROBES.get_ptr_mut(dst) {
        // SAFETY: the pointer is to the entry's value, valid while the program runs (RCU), and
        // aligned for a u64.
        unsafe { atomic_add_one(probes) };
    }
}

/// Adds one to a value that programs on other CPUs may update at the same moment (the kubelet
/// probes pods concurrently), with the BPF atomic add (`lock xadd`, `__sync_fetch_and_add`).
///
/// # Safety
///
/// `value` must be valid for reads and writes and aligned for a u64.
#[inline(always)]
unsafe fn atomic_add_one(value: *mut u64) {
    #[cfg(target_arch = "bpf")]
    // SAFETY: as the caller promises.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            value, 1,
        );
    }
    // The host build only type-checks the programs; this keeps the function meaningful there.
    #[cfg(not(target_arch = "bpf"))]
    // SAFETY: as the caller promises.
    unsafe { core::sync::atomic::AtomicU64::from_ptr(value) }
        .fetch_add(1, core::sync::atomic::Ordering::Relaxed);
}

/// Whether a meshed pod's connection goes to the pod's own address: it stays inside the pod (on
/// `lo`), where the mesh's rules let the app's own connections be.
#[inline(always)]
fn to_own_pod(caller: &PodEntry, dst: Addr) -> bool {
    // SAFETY: as in `decide`.
    unsafe { PODS_BY_ADDR.get(dst) }
        .is_some_and(|target| target.netns_cookie == caller.netns_cookie)
}

/// Whether connections to `pod` on `port` skip its proxy: the pod's or the node's inbound
/// exclusion. The same rule for connections made on this node and for those from other nodes.
#[inline(always)]
fn inbound_excluded(pod: &PodEntry, port: u16) -> bool {
    if has_port_rule(pod.id, port, port_rule::INBOUND_EXCLUDED) {
        decision!(
            "pod {:i}: excluded inbound port {} by annotation",
            ip(pod.id),
            port
        );
        return true;
    }
    if has_port_rule(Addr::UNSPECIFIED, port, port_rule::INBOUND_EXCLUDED) {
        decision!(
            "pod {:i}: excluded inbound port {} by --inbound-port-exclusion-list",
            ip(pod.id),
            port
        );
        return true;
    }
    false
}

/// Whether a meshed pod's own (non-proxy) connection skips its proxy: to an excluded port or range,
/// or, when inclusions apply, outside every included range.
#[inline(always)]
fn outbound_excluded(caller: &PodEntry, dst: Addr, port: u16) -> bool {
    if has_port_rule(caller.id, port, port_rule::OUTBOUND_EXCLUDED) {
        decision!(
            "pod {:i}: connect to [{:i}]:{}: excluded outbound port {} by annotation",
            ip(caller.id),
            ip(dst),
            port,
            port
        );
        return true;
    }
    if has_port_rule(Addr::UNSPECIFIED, port, port_rule::OUTBOUND_EXCLUDED) {
        decision!(
            "pod {:i}: connect to [{:i}]:{}: excluded outbound port {} by --outbound-port-exclusion-list",
            ip(caller.id),
            ip(dst),
            port,
            port
        );
        return true;
    }
    if in_range(caller.id, cidr_rule::EXCLUDED, dst) {
        decision!(
            "pod {:i}: connect to [{:i}]:{}: excluded outbound address by annotation (ip range exclusion)",
            ip(caller.id),
            ip(dst),
            port
        );
        return true;
    }
    if in_range(Addr::UNSPECIFIED, cidr_rule::EXCLUDED, dst) {
        decision!(
            "pod {:i}: connect to [{:i}]:{}: excluded outbound address by --outbound-ip-range-exclusion-list",
            ip(caller.id),
            ip(dst),
            port
        );
        return true;
    }
    let outside = caller.flags & PodEntry::HAS_INCLUSIONS != 0
        && !in_range(caller.id, cidr_rule::INCLUDED, dst)
        && !in_range(Addr::UNSPECIFIED, cidr_rule::INCLUDED, dst);
    if outside {
        decision!(
            "pod {:i}: connect to [{:i}]:{}: excluded outbound address: outside every included ip range",
            ip(caller.id),
            ip(dst),
            port
        );
    }
    outside
}

#[inline(always)]
fn has_port_rule(scope: Addr, port: u16, kind: u16) -> bool {
    PORT_RULES.get_ptr(PortRule { scope, port, kind }).is_some()
}

#[inline(always)]
fn in_range(scope: Addr, kind: u32, addr: Addr) -> bool {
    let key = LpmKey::new(CidrRule::ALL_BITS, CidrRule { scope, kind, addr });
    CIDR_RULES.get(&key).is_some()
}

/// Files the destination a socket asked for under its cookie, for sockops to pick up once the
/// connection is established. A connection that cannot be remembered is not redirected: the proxy
/// could not tell where it was going.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: Addr, port: u16, kind: u16) -> bool {
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: dst,
        port,
        redirect: kind,
        _reserved: 0,
    };
    PENDING.insert(cookie, orig, u64::from(BPF_ANY)).is_ok()
}

/// Runs on TCP events of sockets in the cgroup: a connection started (for sk_lookup) and
/// established (either end), a socket starting to listen (the proxies' inbound listeners, for
/// sk_lookup), and the state changes of the sockets that asked for them.
#[sock_ops]
pub fn pb_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    let family = field!(ops, family);
    if family != AF_INET && family != AF_INET6 {
        return 1;
    }
    let (local, remote) = addresses(
        family,
        [field!(ops, local_ip4), field!(ops, remote_ip4)],
        [
            ip6(|i| field!(ops, local_ip6[i])),
            ip6(|i| field!(ops, remote_ip6[i])),
        ],
    );
    // `local_port` is in host byte order; `remote_port` holds the network-order port in its
    // upper half on little-endian machines, which a 32-bit byte swap brings down.
    let local_port = field!(ops, local_port) as u16;
    let remote_port = u32::from_be(field!(ops, remote_port)) as u16;
    // SAFETY: the helper takes the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let scope = key_netns(netns, local, remote);
    let own_view = ConnKey {
        netns: scope,
        a: local,
        b: remote,
        a_port: local_port,
        b_port: remote_port,
        _reserved: 0,
    };
    let client_view = ConnKey {
        netns: scope,
        a: remote,
        b: local,
        a_port: remote_port,
        b_port: local_port,
        _reserved: 0,
    };

    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: the helper takes the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: as in `decide`.
            if let Some(orig) = unsafe { PENDING.get(cookie) }.copied() {
                let _ = ORIG_DST.insert(own_view, orig, u64::from(BPF_ANY));
                let _ = PENDING.remove(cookie);
            }
            track_socket(&ctx, own_view, netns);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // The proxy's end of a redirected connection: forget the record when it closes.
            if ORIG_DST.get_ptr(client_view).is_some() {
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
            track_socket(&ctx, own_view, netns);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let _ = ORIG_DST.remove(client_view);
        }
        BPF_SOCK_OPS_TCP_CONNECT_CB => note_local_connect(own_view),
        BPF_SOCK_OPS_TCP_LISTEN_CB => track_listener(&ctx, family, local_port, netns),
        _ => {}
    }
    1
}

/// Records a connection made on this node to a meshed pod's port other than its proxy's, before
/// its SYN leaves: connect() has decided its path, and sk_lookup must not send it to the proxy
/// on arrival. `conn` is the client's view (its own end first). A connection already sent to the
/// proxy's inbound port needs no record: sk_lookup never touches that port.
#[inline(always)]
fn note_local_connect(conn: ConnKey) {
    let Some(config) = CONFIG.get(0) else { return };
    if conn.b_port != config.inbound_port && PODS_BY_ADDR.get_ptr(conn.b).is_some() {
        let _ = LOCAL_CONNECTS.insert(conn, 1, u64::from(BPF_ANY));
    }
}

/// Puts a socket that starts listening on the proxy's inbound port in `LISTENERS`, whichever
/// namespace it is in: the proxy may listen before the agent knows its pod (Linux 5.10+ for
/// listening sockets in a sockhash).
#[inline(always)]
fn track_listener(ctx: &SockOpsContext, family: u32, local_port: u16, netns: u64) {
    let Some(config) = CONFIG.get(0) else { return };
    if local_port != config.inbound_port {
        return;
    }
    let mut key = ListenerKey {
        netns,
        family,
        _reserved: 0,
    };
    // SAFETY: `ops` is the context the kernel passed, valid for the duration of the call.
    let _ = LISTENERS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
}

/// Runs in a meshed pod's network namespace when the kernel looks for the socket of a new
/// connection (a SYN) arriving there (Linux 5.9+; 5.17+ for the ingress interface). Connections
/// from another node, for which no hook on this node ran at connect(), go to the pod's proxy as
/// the mesh's PREROUTING rule sent them: to its inbound listener, with the same exclusions as the
/// same-node path, and with their original destination filed for `SO_ORIGINAL_DST`.
///
/// Why sk_lookup and not tc on the pod's interface: tc would have to rewrite the destination port
/// of every packet in and the source port of every packet out, and keep per-connection NAT state
/// to do so, which is conntrack written again. sk_lookup only chooses the listening socket: the
/// packets are untouched, the accepted socket keeps the address the client asked for (so the
/// original destination is simply its local address), nothing is attached to any interface, and
/// one attachment per namespace covers every interface of the pod.
///
/// The probe ports get no exception here unless `--probe-bypass-from any`: the kubelet runs on
/// this node, so a probe-port connection from another node is not the kubelet's.
#[sk_lookup]
pub fn pb_sk_lookup(ctx: SkLookupContext) -> u32 {
    let lk = ctx.lookup;
    let (family, protocol, ifindex) = (
        field!(lk, family),
        field!(lk, protocol),
        field!(lk, ingress_ifindex),
    );
    let (local, remote) = addresses(
        family,
        [field!(lk, local_ip4), field!(lk, remote_ip4)],
        [
            ip6(|i| field!(lk, local_ip6[i])),
            ip6(|i| field!(lk, remote_ip6[i])),
        ],
    );
    // `local_port` is in host byte order, `remote_port` in network byte order.
    let local_port = field!(lk, local_port) as u16;
    let remote_port = u16::from_be(field!(lk, remote_port));
    // A connection over `lo` was made inside the pod, where the mesh's PREROUTING rule never acts
    // on it either.
    if protocol != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX {
        return SK_PASS;
    }
    let conn = ConnKey {
        netns: 0,
        a: remote,
        b: local,
        a_port: remote_port,
        b_port: local_port,
        _reserved: 0,
    };
    steer_remote(&ctx, family, conn)
}

/// Whether `client` is an address of `pod` itself: the connection was made inside the pod. It
/// arrives over `lo` but, for the pod's own IP, carries the index of the interface with that IP.
#[inline(always)]
fn from_own_pod(pod: &PodEntry, client: Addr) -> bool {
    // SAFETY: as in `decide`.
    unsafe { PODS_BY_ADDR.get(client) }.is_some_and(|entry| entry.netns_cookie == pod.netns_cookie)
}

/// The decision of [`pb_sk_lookup`] for a TCP connection `conn` (client first) arriving in a pod's
/// namespace from outside it.
#[inline(always)]
fn steer_remote(ctx: &SkLookupContext, family: u32, conn: ConnKey) -> u32 {
    let Some(config) = CONFIG.get(0) else {
        return SK_PASS;
    };
    let port = conn.b_port;
    if port == config.inbound_port {
        return SK_PASS;
    }
    // SAFETY: as in `decide`.
    let Some(pod) = (unsafe { PODS_BY_ADDR.get(conn.b) }).copied() else {
        return SK_PASS;
    };
    if LOCAL_CONNECTS.get_ptr(conn).is_some() || from_own_pod(&pod, conn.a) {
        return SK_PASS;
    }
    let excluded = if has_port_rule(Addr::UNSPECIFIED, port, port_rule::PROBE) {
        config.flags & Config::PROBE_BYPASS_FROM_ANY != 0
    } else {
        inbound_excluded(&pod, port)
    };
    if excluded {
        count(Counter::RemoteExcluded);
        decision!(
            "pod {:i}: sk_lookup [{:i}]:{} -> [{:i}]:{} from another node: excluded, to the app",
            ip(pod.id),
            ip(conn.a),
            conn.a_port,
            ip(conn.b),
            port
        );
        return SK_PASS;
    }
    let orig = OrigDst {
        addr: conn.b,
        port,
        redirect: redirect::INBOUND,
        _reserved: 0,
    };
    // Filed before the proxy can accept the connection and ask for it.
    if ORIG_DST.insert(conn, orig, u64::from(BPF_ANY)).is_err() {
        count(Counter::RemoteRefused);
        decision!(
            "pod {:i}: sk_lookup [{:i}]:{} -> [{:i}]:{} from another node: refused: no room to file its original destination",
            ip(pod.id),
            ip(conn.a),
            conn.a_port,
            ip(conn.b),
            port
        );
        return SK_DROP;
    }
    let listener = |family| ListenerKey {
        netns: pod.netns_cookie,
        family,
        _reserved: 0,
    };
    // An IPv4 connection may also go to an IPv6 listener that takes both families.
    let assigned = LISTENERS
        .redirect_sk_lookup(ctx, listener(family), 0)
        .is_ok()
        || (family == AF_INET
            && LISTENERS
                .redirect_sk_lookup(ctx, listener(AF_INET6), 0)
                .is_ok());
    if assigned {
        count(Counter::RemoteRedirected);
        decision!(
            "pod {:i}: sk_lookup [{:i}]:{} -> [{:i}]:{} from another node: steered to the sidecar's inbound listener",
            ip(pod.id),
            ip(conn.a),
            conn.a_port,
            ip(conn.b),
            port
        );
        SK_PASS
    } else {
        // No proxy to take it: refused, as the mesh's redirect to a port nobody listens on is,
        // rather than let through to the app past the proxy.
        let _ = ORIG_DST.remove(conn);
        count(Counter::RemoteRefused);
        decision!(
            "pod {:i}: sk_lookup [{:i}]:{} -> [{:i}]:{} from another node: refused: no inbound listener of the sidecar known",
            ip(pod.id),
            ip(conn.a),
            conn.a_port,
            ip(conn.b),
            port
        );
        SK_DROP
    }
}

/// Adds an established socket to `SOCKETS` when sk_msg is on and sk_msg can short-circuit its
/// connection ([`short_circuits`]).
#[inline(always)]
fn track_socket(ctx: &SockOpsContext, mut key: ConnKey, netns: u64) {
    let Some(config) = CONFIG.get(0) else { return };
    if config.flags & Config::SK_MSG == 0 {
        return;
    }
    if short_circuits(&key, netns) {
        // SAFETY: `ops` is the context the kernel passed, valid for the duration of the call.
        let _ = SOCKETS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
    }
}

/// Whether sk_msg can move this connection's data from socket to socket: both of its ends are
/// sockets of this node that join `SOCKETS` by the same test (it is symmetric). That holds for a
/// connection inside a meshed pod (an app and its sidecar, over loopback or the pod's own
/// address) and for one between two meshed pods' addresses. A connection with an end anywhere else
/// (another node, the host, a pod outside the mesh) would gain nothing: its peer is never in the
/// map, so every message would run the program only to take the normal path, and the socket would
/// still pay for joining and leaving the map.
#[inline(always)]
fn short_circuits(key: &ConnKey, netns: u64) -> bool {
    if key.a == key.b || key.a.is_loopback() || key.b.is_loopback() {
        return PODS_BY_NETNS.get_ptr(netns).is_some();
    }
    PODS_BY_ADDR.get_ptr(key.a).is_some() && PODS_BY_ADDR.get_ptr(key.b).is_some()
}

/// An IPv6 address read word by word (contexts allow 4-byte reads of these arrays, not wider ones).
#[inline(always)]
fn ip6(word: impl Fn(usize) -> u32) -> [u32; 4] {
    [word(0), word(1), word(2), word(3)]
}

/// A socket's own and peer addresses from both families' fields, read beforehand, by its family.
#[inline(always)]
fn addresses(family: u32, ip4: [u32; 2], ip6: [[u32; 4]; 2]) -> (Addr, Addr) {
    if family == AF_INET {
        (Addr::ipv4_mapped(ip4[0]), Addr::ipv4_mapped(ip4[1]))
    } else {
        (Addr { words: ip6[0] }, Addr { words: ip6[1] })
    }
}

/// The namespace part of a connection key: the cookie for a connection between loopback
/// addresses, which repeat in every namespace, else 0 (see [`ConnKey`]).
#[inline(always)]
fn key_netns(netns: u64, local: Addr, remote: Addr) -> u64 {
    if local.is_loopback() || remote.is_loopback() {
        netns
    } else {
        0
    }
}

/// Runs on every `getsockopt()` in the cgroup. Answers `SO_ORIGINAL_DST` (IPv4) and
/// `IP6T_SO_ORIGINAL_DST` (IPv6) for connections this datapath redirected; anything else passes
/// with the kernel's own answer.
#[cgroup_sockopt(getsockopt)]
pub fn pb_getsockopt(ctx: SockoptContext) -> i32 {
    // SAFETY: the kernel hands the program a valid `bpf_sockopt` for the duration of the call.
    let sockopt = unsafe { &mut *ctx.sockopt };
    let level = sockopt.level;
    if !((level == SOL_IP || level == SOL_IPV6) && sockopt.optname == SO_ORIGINAL_DST) {
        // The kernel refuses a program's result whose buffer it did not hand over in full (more
        // than a page, as iptables' own calls are); zero makes it keep its own answer.
        if sockopt.optlen > MAX_OPTLEN {
            sockopt.optlen = 0;
        }
        return ALLOW;
    }
    count(Counter::OrigDstLookups);
    // SAFETY: for getsockopt the kernel always sets `sk` to the socket's full `bpf_sock`.
    let sk = unsafe { sockopt.__bindgen_anon_1.sk };
    let (local, remote) = addresses(
        field!(sk, family),
        [field!(sk, src_ip4), field!(sk, dst_ip4)],
        [
            ip6(|i| field!(sk, src_ip6[i])),
            ip6(|i| field!(sk, dst_ip6[i])),
        ],
    );
    // `src_port` is in host byte order, `dst_port` in network byte order.
    let local_port = field!(sk, src_port) as u16;
    let remote_port = u16::from_be(field!(sk, dst_port));
    // SAFETY: the helper takes the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let client_view = ConnKey {
        netns: key_netns(netns, local, remote),
        a: remote,
        b: local,
        a_port: remote_port,
        b_port: local_port,
        _reserved: 0,
    };
    // SAFETY: as in `decide`.
    let Some(orig) = (unsafe { ORIG_DST.get(client_view) }).copied() else {
        count(Counter::OrigDstMisses);
        decision!(
            "SO_ORIGINAL_DST for [{:i}]:{} -> [{:i}]:{} (netns {}): no record, not redirected here",
            ip(remote),
            remote_port,
            ip(local),
            local_port,
            netns
        );
        return ALLOW;
    };
    let written = if level == SOL_IP {
        orig.addr.is_ipv4() && write_sockaddr_in(sockopt, &orig)
    } else {
        write_sockaddr_in6(sockopt, &orig)
    };
    if written {
        sockopt.retval = 0;
        decision!(
            "SO_ORIGINAL_DST for [{:i}]:{} -> [{:i}]:{} (netns {}): answered [{:i}]:{}",
            ip(remote),
            remote_port,
            ip(local),
            local_port,
            netns,
            ip(orig.addr),
            orig.port
        );
    } else {
        count(Counter::OrigDstMisses);
    }
    ALLOW
}

/// Size of `struct sockaddr_in`.
const SOCKADDR_IN_LEN: usize = 16;
/// Size of `struct sockaddr_in6`.
const SOCKADDR_IN6_LEN: usize = 28;

/// Writes `orig` as a `struct sockaddr_in` into the caller's buffer, if it has room.
#[inline(always)]
fn write_sockaddr_in(sockopt: &mut aya_ebpf::bindings::bpf_sockopt, orig: &OrigDst) -> bool {
    // SAFETY: the kernel bounds the buffer by `optval_end`; nothing is written past the check.
    unsafe {
        let start = sockopt.__bindgen_anon_2.optval as *mut u8;
        let end = sockopt.__bindgen_anon_3.optval_end as *mut u8;
        if start.add(SOCKADDR_IN_LEN) > end {
            return false;
        }
        // sin_family, sin_port (network order), sin_addr, then eight bytes of zero.
        (start as *mut u16).write_unaligned(AF_INET as u16);
        (start.add(2) as *mut u16).write_unaligned(orig.port.to_be());
        (start.add(4) as *mut u32).write_unaligned(orig.addr.words[3]);
        (start.add(8) as *mut u32).write_unaligned(0);
        (start.add(12) as *mut u32).write_unaligned(0);
    }
    sockopt.optlen = SOCKADDR_IN_LEN as i32;
    true
}

/// Writes `orig` as a `struct sockaddr_in6` into the caller's buffer, if it has room.
#[inline(always)]
fn write_sockaddr_in6(sockopt: &mut aya_ebpf::bindings::bpf_sockopt, orig: &OrigDst) -> bool {
    // SAFETY: as in `write_sockaddr_in`.
    unsafe {
        let start = sockopt.__bindgen_anon_2.optval as *mut u8;
        let end = sockopt.__bindgen_anon_3.optval_end as *mut u8;
        if start.add(SOCKADDR_IN6_LEN) > end {
            return false;
        }
        // sin6_family, sin6_port, sin6_flowinfo, sin6_addr, sin6_scope_id.
        (start as *mut u16).write_unaligned(AF_INET6 as u16);
        (start.add(2) as *mut u16).write_unaligned(orig.port.to_be());
        (start.add(4) as *mut u32).write_unaligned(0);
        (start.add(8) as *mut u32).write_unaligned(orig.addr.words[0]);
        (start.add(12) as *mut u32).write_unaligned(orig.addr.words[1]);
        (start.add(16) as *mut u32).write_unaligned(orig.addr.words[2]);
        (start.add(20) as *mut u32).write_unaligned(orig.addr.words[3]);
        (start.add(24) as *mut u32).write_unaligned(0);
    }
    sockopt.optlen = SOCKADDR_IN6_LEN as i32;
    true
}

/// Runs for every message sent on a socket in `SOCKETS`. When the peer socket is there too (the
/// other end of the connection is on this node), the data goes straight into its receive queue;
/// otherwise it takes the normal path.
#[sk_msg]
pub fn pb_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    let family = field!(md, family);
    let (local, remote) = addresses(
        family,
        [field!(md, local_ip4), field!(md, remote_ip4)],
        [
            ip6(|i| field!(md, local_ip6[i])),
            ip6(|i| field!(md, remote_ip6[i])),
        ],
    );
    // As in sockops: `local_port` host order, `remote_port` network order in the upper half.
    let local_port = field!(md, local_port) as u16;
    let remote_port = u32::from_be(field!(md, remote_port)) as u16;
    if family != AF_INET && family != AF_INET6 {
        return SK_PASS;
    }
    // SAFETY: the helper takes the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut peer = ConnKey {
        netns: key_netns(netns, local, remote),
        a: remote,
        b: local,
        a_port: remote_port,
        b_port: local_port,
        _reserved: 0,
    };
    // The helper fails (and redirects nothing) when the peer is not in the map; the message then
    // passes as usual.
    if SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(Counter::SkMsgRedirected);
    }
    SK_PASS
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

/// Attached to the agent's own listeners (the healthcheck's in each pod), in their SO_REUSEPORT
/// group with the listeners of the agent beside it during a rolling update. It selects nothing,
/// so the kernel spreads connections as it would without it; its attach type
/// (`BPF_SK_REUSEPORT_SELECT_OR_MIGRATE`) is what it is for: when a listener closes (its agent
/// stopped or killed), the connections it has queued but not accepted move to another listener of
/// the group instead of being reset. `net.ipv4.tcp_migrate_req` would do that for every listener
/// of the pod's namespace; this does it for the agent's alone, with no write to a pod's sysctls.
#[sk_reuseport(migrate)]
pub fn pb_reuseport(_ctx: SkReuseportContext) -> u32 {
    SK_PASS
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

/// The license the kernel is told. The sk_msg and sockhash helpers are not GPL-only, nor is any
/// other helper used; without this section the loader would declare "GPL" on the project's behalf.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
