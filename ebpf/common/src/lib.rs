//! Types shared by the probe-bypass kernel programs (`probe-bypass-ebpf`) and the agent that loads
//! them: the keys and values of their maps, and the indices of their counters.
//!
//! Kernel and userspace exchange these as raw bytes through the maps, so each type is `#[repr(C)]`
//! with no implicit padding (explicit `_reserved` fields, always zero, fill the gaps) and its layout
//! is defined here once. The `user` feature implements `aya::Pod` for them, which lets the agent
//! use them as map keys and values.
//!
//! The maps are pinned and outlive the agent, so a change to any layout here is a change of
//! [`LAYOUT_VERSION`].
#![no_std]

/// Bumped whenever a map's key or value layout, or a map's meaning, changes. The agent keeps its
/// pins in a directory named after it, so a new layout never reads an old one's bytes.
pub const LAYOUT_VERSION: u32 = 3;

/// The names of the object's programs and maps. The agent finds and pins them by these names; the
/// kernel side fails to build if a program or map is named otherwise.
pub mod names {
    pub const CONNECT4: &str = "pb_connect4";
    pub const CONNECT6: &str = "pb_connect6";
    pub const SOCKOPS: &str = "pb_sockops";
    pub const GETSOCKOPT: &str = "pb_getsockopt";
    pub const SK_MSG: &str = "pb_sk_msg";
    pub const SK_LOOKUP: &str = "pb_sk_lookup";
    pub const REUSEPORT: &str = "pb_reuseport";
    /// The programs attached to the cgroup, each through a link of its own.
    pub const CGROUP_PROGRAMS: [&str; 4] = [CONNECT4, CONNECT6, SOCKOPS, GETSOCKOPT];

    pub const CONFIG: &str = "CONFIG";
    pub const PODS_BY_ADDR: &str = "PODS_BY_ADDR";
    pub const PODS_BY_NETNS: &str = "PODS_BY_NETNS";
    pub const PORT_RULES: &str = "PORT_RULES";
    pub const CIDR_RULES: &str = "CIDR_RULES";
    pub const PENDING: &str = "PENDING";
    pub const ORIG_DST: &str = "ORIG_DST";
    pub const SOCKETS: &str = "SOCKETS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EARLY_PROBES: &str = "EARLY_PROBES";
    pub const LISTENERS: &str = "LISTENERS";
    pub const LOCAL_CONNECTS: &str = "LOCAL_CONNECTS";
    pub const DEPENDENTS: &str = "DEPENDENTS";
    /// The `log` target of the programs' decision log (aya-log): `RUST_LOG=probe_bypass::ebpf=debug`
    /// or `--ebpf-log debug` turns it on. Its ring buffer (`AYA_LOGS`) and level (`AYA_LOG_LEVEL`)
    /// are aya-log's own, and never pinned.
    pub const LOG_TARGET: &str = "probe_bypass::ebpf";
    /// Every map of the object: the agent pins each under its name.
    pub const MAPS: [&str; 13] = [
        CONFIG,
        PODS_BY_ADDR,
        PODS_BY_NETNS,
        PORT_RULES,
        CIDR_RULES,
        PENDING,
        ORIG_DST,
        SOCKETS,
        COUNTERS,
        EARLY_PROBES,
        LISTENERS,
        LOCAL_CONNECTS,
        DEPENDENTS,
    ];

    /// Whether two names are the same, at compile time: the kernel side asserts with it that each
    /// of its programs and maps carries the name given here.
    pub const fn same(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// An IPv4 or IPv6 address in one 16-byte form, so that a single map serves both families: an IPv4
/// address is stored IPv4-mapped (`::ffff:a.b.c.d`), which is also how connect6 sees an IPv4
/// destination reached through an IPv6 socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    /// The address as four 32-bit words, each holding four of its bytes in network byte order.
    /// This is how the kernel's contexts hold IPv6 addresses (and an IPv4 one as one word), so the
    /// programs build keys with whole-word copies and no byte shuffling.
    pub words: [u32; 4],
}

/// The third word of every IPv4-mapped address: the bytes `00 00 ff ff`.
const IPV4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// `::`, also the scope of node-wide rules (no pod has it as its address).
    pub const UNSPECIFIED: Self = Self { words: [0; 4] };

    /// The IPv4-mapped form of an IPv4 address given as the kernel holds it: one word whose bytes
    /// are the address's octets in network byte order.
    pub const fn ipv4_mapped(ip4: u32) -> Self {
        Self {
            words: [0, 0, IPV4_MAPPED_PREFIX, ip4],
        }
    }

    /// The address from its 16 octets in network byte order (as `Ipv6Addr::octets` returns them).
    pub const fn from_octets(octets: [u8; 16]) -> Self {
        const fn word(octets: &[u8; 16], at: usize) -> u32 {
            u32::from_ne_bytes([octets[at], octets[at + 1], octets[at + 2], octets[at + 3]])
        }
        Self {
            words: [
                word(&octets, 0),
                word(&octets, 4),
                word(&octets, 8),
                word(&octets, 12),
            ],
        }
    }

    /// Whether this is an IPv4 address (IPv4-mapped).
    #[inline(always)]
    pub const fn is_ipv4(&self) -> bool {
        self.words[0] == 0 && self.words[1] == 0 && self.words[2] == IPV4_MAPPED_PREFIX
    }

    /// Whether this is a loopback address: 127.0.0.0/8 or `::1`. Connections between loopback
    /// addresses stay inside one network namespace, and every namespace has the same ones.
    #[inline(always)]
    pub const fn is_loopback(&self) -> bool {
        if self.is_ipv4() {
            // The first octet is the first byte in memory.
            self.words[3].to_ne_bytes()[0] == 127
        } else {
            self.words[0] == 0
                && self.words[1] == 0
                && self.words[2] == 0
                && self.words[3] == u32::from_ne_bytes([0, 0, 0, 1])
        }
    }

    /// The loopback address of this address's family: 127.0.0.1 (IPv4-mapped) or `::1`.
    #[inline(always)]
    pub const fn loopback_like(&self) -> Self {
        if self.is_ipv4() {
            Self::ipv4_mapped(u32::from_ne_bytes([127, 0, 0, 1]))
        } else {
            Self {
                words: [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])],
            }
        }
    }
}

/// Userspace conversions, kept out of the kernel build so the programs only carry what they use.
#[cfg(feature = "user")]
impl From<core::net::IpAddr> for Addr {
    fn from(addr: core::net::IpAddr) -> Self {
        match addr {
            core::net::IpAddr::V4(v4) => Self::ipv4_mapped(u32::from_ne_bytes(v4.octets())),
            core::net::IpAddr::V6(v6) => Self::from_octets(v6.octets()),
        }
    }
}

#[cfg(feature = "user")]
impl From<Addr> for core::net::IpAddr {
    fn from(addr: Addr) -> Self {
        let mut octets = [0; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(addr.words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        let v6 = core::net::Ipv6Addr::from(octets);
        match v6.to_ipv4_mapped() {
            Some(v4) => Self::V4(v4),
            None => Self::V6(v6),
        }
    }
}

/// Node-wide settings: the only entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The sidecar proxy's UID: its connections are never sent to its own outbound port.
    pub proxy_uid: u32,
    /// The proxy's inbound port (15003): where connections to a meshed pod are sent.
    pub inbound_port: u16,
    /// The proxy's outbound port (15001): where a meshed pod's own connections are sent.
    pub outbound_port: u16,
    /// [`Config::PROBE_BYPASS_FROM_ANY`], [`Config::SK_MSG`], [`Config::PROBE_BYPASS_FROM_KUBELET`].
    pub flags: u32,
    /// With [`Config::PROBE_BYPASS_FROM_KUBELET`]: the level of the kubelet's cgroup in the
    /// cgroup v2 hierarchy (the root is 0).
    pub kubelet_cgroup_level: u32,
    /// With [`Config::PROBE_BYPASS_FROM_KUBELET`]: the id of the kubelet's cgroup (its directory's
    /// inode number).
    pub kubelet_cgroup_id: u64,
}

impl Config {
    /// Probe ports are reached directly from every caller, as under the mesh's iptables rules,
    /// not only from the host network namespace (where the kubelet runs).
    pub const PROBE_BYPASS_FROM_ANY: u32 = 1;
    /// Same-node connections are short-circuited with sk_msg.
    pub const SK_MSG: u32 = 2;
    /// Probe ports are reached directly only by callers in the host network namespace whose
    /// cgroup is the kubelet's ([`Config::kubelet_cgroup_id`]) or below it.
    pub const PROBE_BYPASS_FROM_KUBELET: u32 = 4;
}

/// A meshed pod: the value of `PODS_BY_ADDR` (keyed by each of its addresses) and of
/// `PODS_BY_NETNS` (keyed by its network namespace cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodEntry {
    /// The pod's first address: the scope of its own port and CIDR rules.
    pub id: Addr,
    /// The cookie of the pod's network namespace (`SO_NETNS_COOKIE`).
    pub netns_cookie: u64,
    /// [`PodEntry::HAS_INCLUSIONS`].
    pub flags: u32,
    pub _reserved: u32,
}

impl PodEntry {
    /// An outbound IP-range inclusion list applies to this pod (its own or the node's): only
    /// destinations in an included range go to the proxy.
    pub const HAS_INCLUSIONS: u32 = 1;
}

/// A pod's `namespace/name`, UTF-8, padded with NULs: the value of `DEPENDENTS`, the pods that
/// have no interception but the datapath's (their mesh's iptables init container was replaced).
/// No program reads it; it is pinned with the other maps so that `probe-bypass uninstall` can
/// name those pods from the pins alone, when no agent runs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodName {
    pub bytes: [u8; PodName::LEN],
}

impl PodName {
    /// Room for a namespace (at most 63 bytes), the `/` and a pod name (at most 253 bytes).
    pub const LEN: usize = 320;

    /// The name `namespace/name`. A longer one than [`Self::LEN`] (not a Kubernetes name) is cut
    /// at the last character that fits.
    pub fn new(name: &str) -> Self {
        let mut end = name.len().min(Self::LEN);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; Self::LEN];
        bytes[..end].copy_from_slice(&name.as_bytes()[..end]);
        Self { bytes }
    }

    /// The name without its padding (lossy, should the bytes not be UTF-8).
    pub fn as_str(&self) -> &str {
        let end = self.bytes.iter().position(|&b| b == 0).unwrap_or(Self::LEN);
        let bytes = &self.bytes[..end];
        match core::str::from_utf8(bytes) {
            Ok(name) => name,
            Err(error) => {
                // Only a valid prefix is shown: the name was not written by this agent.
                let valid = &bytes[..error.valid_up_to()];
                core::str::from_utf8(valid).unwrap_or_default()
            }
        }
    }
}

/// What a [`PortRule`] says about its port.
pub mod port_rule {
    /// Connections to the pod on this port are not sent to its proxy.
    pub const INBOUND_EXCLUDED: u16 = 1;
    /// The pod's own connections to this port are not sent to its proxy.
    pub const OUTBOUND_EXCLUDED: u16 = 2;
    /// A probe port: reached directly from the host network namespace (node scope only).
    pub const PROBE: u16 = 3;
}

/// A rule about one port: the key of `PORT_RULES`. The value is one byte, [`RULE_PRESENT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRule {
    /// The pod it applies to ([`PodEntry::id`]), or [`Addr::UNSPECIFIED`] for the whole node.
    pub scope: Addr,
    /// The port, in host byte order.
    pub port: u16,
    /// One of [`port_rule`]'s constants.
    pub kind: u16,
}

/// What a [`CidrRule`] says about its range.
pub mod cidr_rule {
    /// The pod's connections to this range are not sent to its proxy.
    pub const EXCLUDED: u32 = 1;
    /// The pod's connections to this range are sent to its proxy (when a pod has any inclusion,
    /// only these are).
    pub const INCLUDED: u32 = 2;
}

/// A rule about an address range: the data of an `CIDR_RULES` longest-prefix-match key. The scope
/// and kind are always matched in full, so the key's prefix length is
/// [`CidrRule::FIXED_BITS`] plus the range's prefix length (IPv4 ranges are IPv4-mapped: +96).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrRule {
    pub scope: Addr,
    pub kind: u32,
    pub addr: Addr,
}

impl CidrRule {
    /// The bits of `scope` and `kind`, which precede the address.
    pub const FIXED_BITS: u32 = 128 + 32;
    /// The prefix length of a lookup: every bit.
    pub const ALL_BITS: u32 = Self::FIXED_BITS + 128;
}

/// The value stored for a rule; only the presence of a key matters.
pub const RULE_PRESENT: u8 = 1;

/// Which redirect a connection met.
pub mod redirect {
    /// Sent to its own pod's proxy outbound port.
    pub const OUTBOUND: u16 = 1;
    /// Sent to the destination pod's proxy inbound port.
    pub const INBOUND: u16 = 2;
}

/// The destination a redirected connection asked for: what `SO_ORIGINAL_DST` answers. The value of
/// `PENDING` (by socket cookie, from connect until established) and `ORIG_DST` (by connection).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    /// In host byte order.
    pub port: u16,
    /// One of [`redirect`]'s constants.
    pub redirect: u16,
    pub _reserved: u32,
}

/// A TCP connection as one of its ends sees it: the key of `ORIG_DST` (`a` is the client, `b` the
/// server) and of the `SOCKETS` sockhash (`a` is the socket's own end, `b` its peer).
///
/// Addresses are unique on a node except loopback ones, which every network namespace has: a
/// connection between loopback addresses carries its namespace's cookie in `netns`, any other
/// has 0 there, so that both ends of a connection across namespaces compute the same key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnKey {
    pub netns: u64,
    pub a: Addr,
    pub b: Addr,
    /// In host byte order.
    pub a_port: u16,
    /// In host byte order.
    pub b_port: u16,
    pub _reserved: u32,
}

/// A proxy's inbound listener: the key of the `LISTENERS` sockhash, from which sk_lookup hands a
/// meshed pod the connections that arrive from other nodes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    /// The cookie of the listener's network namespace.
    pub netns: u64,
    /// The listener's address family: `AF_INET` (2) or `AF_INET6` (10). An IPv6 listener that is
    /// not IPv6-only also takes IPv4 connections.
    pub family: u32,
    pub _reserved: u32,
}

/// The per-CPU counters of the `COUNTERS` array, by index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// TCP `connect()` calls the connect4 and connect6 programs ran for.
    Connects = 0,
    /// A meshed pod's connection sent to its proxy's outbound port.
    RedirectedOutbound = 1,
    /// A connection to a meshed pod sent to its proxy's inbound port.
    RedirectedInbound = 2,
    /// A connection from the host network namespace to a probe port, let through directly.
    ProbeBypassed = 3,
    /// A connection to a probe port from elsewhere, sent to the proxy instead.
    BypassRefused = 4,
    /// `getsockopt(SO_ORIGINAL_DST)` calls seen.
    OrigDstLookups = 5,
    /// Those for a connection the datapath did not redirect (left to the kernel's answer).
    OrigDstMisses = 6,
    /// Messages handed straight to the peer socket by sk_msg.
    SkMsgRedirected = 7,
    /// A connection that arrived at a meshed pod from another node, handed to its proxy's
    /// inbound listener by sk_lookup.
    RemoteRedirected = 8,
    /// One from another node to an inbound-excluded port, or a probe port under
    /// `--probe-bypass-from any`, let through to the app.
    RemoteExcluded = 9,
    /// One from another node refused because the pod's proxy has no inbound listener the
    /// datapath knows of (as the mesh's redirect to a port nobody listens on is refused).
    RemoteRefused = 10,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Self; 11] = [
        Self::Connects,
        Self::RedirectedOutbound,
        Self::RedirectedInbound,
        Self::ProbeBypassed,
        Self::BypassRefused,
        Self::OrigDstLookups,
        Self::OrigDstMisses,
        Self::SkMsgRedirected,
        Self::RemoteRedirected,
        Self::RemoteExcluded,
        Self::RemoteRefused,
    ];

    /// The number of counters: the size of the `COUNTERS` array.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The counter's index in the `COUNTERS` array.
    pub const fn index(self) -> u32 {
        self as u32
    }
}

// The kernel array and the agent's sums both rely on the indices being exactly 0..COUNT, in order.
const _: () = {
    let mut i = 0;
    while i < Counter::ALL.len() {
        assert!(Counter::ALL[i].index() as usize == i);
        i += 1;
    }
};

// The layouts have no implicit padding: each size is the sum of its fields.
const _: () = {
    assert!(size_of::<Addr>() == 16);
    assert!(size_of::<Config>() == 24);
    assert!(size_of::<PodEntry>() == 32);
    assert!(size_of::<PortRule>() == 20);
    assert!(size_of::<CidrRule>() == 36);
    assert!(size_of::<OrigDst>() == 24);
    assert!(size_of::<ConnKey>() == 48);
    assert!(size_of::<ListenerKey>() == 16);
    assert!(size_of::<PodName>() == PodName::LEN);
};

// SAFETY (all below): `#[repr(C)]` structs of integers whose sizes add up to the struct's size (see
// the assertions above), so there is no padding, and every bit pattern is a valid value.
#[cfg(feature = "user")]
mod pod_impls {
    use super::*;

    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for PodEntry {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for CidrRule {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ListenerKey {}
    unsafe impl aya::Pod for PodName {}
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::{Addr, PodName};

    #[test]
    fn a_pod_name_round_trips_and_one_too_long_is_cut_at_a_character() {
        assert_eq!(
            PodName::new("shop/bookstore-v1-7d9f").as_str(),
            "shop/bookstore-v1-7d9f"
        );
        let longest = [b'n'; PodName::LEN];
        let longest = core::str::from_utf8(&longest).expect("ascii");
        assert_eq!(PodName::new(longest).as_str(), longest);
        // 319 ASCII bytes, then a two-byte character that does not fit.
        let mut too_long = [b'n'; PodName::LEN + 1];
        too_long[PodName::LEN - 1..].copy_from_slice("é".as_bytes());
        let too_long = core::str::from_utf8(&too_long).expect("utf-8");
        assert_eq!(
            PodName::new(too_long).as_str(),
            &longest[..PodName::LEN - 1]
        );
    }

    #[test]
    fn an_ipv4_address_and_its_ipv4_mapped_ipv6_form_are_one_key() {
        let pod = Ipv4Addr::new(10, 1, 0, 7);
        // What connect4 reads from `user_ip4`: the octets, in memory order.
        let user_ip4 = u32::from_ne_bytes(pod.octets());
        assert_eq!(
            Addr::ipv4_mapped(user_ip4),
            Addr::from_octets(pod.to_ipv6_mapped().octets())
        );
        assert!(Addr::ipv4_mapped(user_ip4).is_ipv4());
        assert!(!Addr::ipv4_mapped(user_ip4).is_loopback());
    }

    #[test]
    fn loopback_is_recognised_in_both_families() {
        let v4 = |a, b, c, d| Addr::ipv4_mapped(u32::from_ne_bytes([a, b, c, d]));
        assert!(v4(127, 0, 0, 1).is_loopback());
        assert!(v4(127, 9, 8, 7).is_loopback());
        assert!(!v4(128, 0, 0, 1).is_loopback());
        assert!(Addr::from_octets(Ipv6Addr::LOCALHOST.octets()).is_loopback());
        assert!(!Addr::from_octets(Ipv6Addr::UNSPECIFIED.octets()).is_loopback());
        assert!(
            !Addr::from_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]).is_loopback()
        );
        assert_eq!(v4(10, 0, 0, 1).loopback_like(), v4(127, 0, 0, 1));
        assert_eq!(
            Addr::from_octets([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]).loopback_like(),
            Addr::from_octets(Ipv6Addr::LOCALHOST.octets())
        );
    }
}
