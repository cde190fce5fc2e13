//! Types shared by the probe-bypass kernel programs (`probe-bypass-ebpf`) and the agent that loads
//! them: the keys and values of their maps, and the indices of their counters.
//!
//! Kernel and userspace exchange these as raw bytes through the maps, so each type is `#[repr(C)]`
//! with no padding and its layout is defined here once. The `user` feature implements `aya::Pod`
//! for them, which lets the agent use them as map keys and values.
#![no_std]

/// The address of a meshed pod: the key of the `MESHED_PODS` map.
///
/// One 16-byte form serves both families so that a single map answers the IPv4 hook (connect4)
/// and the IPv6 one (connect6): an IPv4 address is stored IPv4-mapped (`::ffff:a.b.c.d`), which is
/// also how connect6 sees an IPv4 destination reached through an IPv6 socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodAddr {
    /// The address as four 32-bit words, each holding four of its bytes in network byte order.
    /// This is how the kernel's `bpf_sock_addr` holds `user_ip6` (and `user_ip4` as one word), so
    /// the programs build keys from those fields with whole-word copies and no byte shuffling.
    pub words: [u32; 4],
}

impl PodAddr {
    /// The IPv4-mapped form of an IPv4 address given as `bpf_sock_addr.user_ip4` holds it: one
    /// word whose bytes are the address's octets in network byte order.
    pub const fn ipv4_mapped(user_ip4: u32) -> Self {
        Self {
            words: [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), user_ip4],
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
}

/// Userspace conversion, kept out of the kernel build so the programs only carry what they use.
#[cfg(feature = "user")]
impl From<core::net::IpAddr> for PodAddr {
    fn from(addr: core::net::IpAddr) -> Self {
        match addr {
            core::net::IpAddr::V4(v4) => Self::ipv4_mapped(u32::from_ne_bytes(v4.octets())),
            core::net::IpAddr::V6(v6) => Self::from_octets(v6.octets()),
        }
    }
}

/// What the kernel knows about a meshed pod: the value of the `MESHED_PODS` map.
///
/// The connect4 program only asks whether an address has an entry, so there is nothing in it yet
/// but the one byte the kernel requires of a map value (a zero-sized value is rejected at map
/// creation). The fields the redirecting programs read will go here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodInfo {
    present: u8,
}

impl PodInfo {
    /// The entry for a pod that is part of the mesh.
    pub const MESHED: Self = Self { present: 1 };
}

/// Value of the `PROBE_PORTS` map, whose key is a port in host byte order. Only the presence of
/// a key matters; this is what the agent stores.
pub const PROBE_PORT_PRESENT: u8 = 1;

/// The per-CPU counters of the `COUNTERS` array, by index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every `connect()` on an IPv4 socket that the connect4 program ran for.
    Connect4 = 0,
    /// Those whose destination address is a meshed pod.
    ToMeshedPod = 1,
    /// Those to a meshed pod whose destination port is a probe port.
    ToProbePort = 2,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Self; 3] = [Self::Connect4, Self::ToMeshedPod, Self::ToProbePort];

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

// SAFETY: `#[repr(C)]` around four `u32`s: no padding, and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PodAddr {}

// SAFETY: `#[repr(C)]` around one `u8`: no padding, and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PodInfo {}

#[cfg(test)]
mod tests {
    use core::net::Ipv4Addr;

    use super::PodAddr;

    #[test]
    fn an_ipv4_address_and_its_ipv4_mapped_ipv6_form_are_one_key() {
        let pod = Ipv4Addr::new(10, 1, 0, 7);
        // What connect4 reads from `user_ip4`: the octets, in memory order.
        let user_ip4 = u32::from_ne_bytes(pod.octets());
        assert_eq!(
            PodAddr::ipv4_mapped(user_ip4),
            PodAddr::from_octets(pod.to_ipv6_mapped().octets())
        );
    }
}
