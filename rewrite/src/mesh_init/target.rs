//! Where the validation's check may connect to: an address range whose connections the datapath
//! redirects for this pod, so that `probe-bypass validate` can pass.
//!
//! The check connects to a documentation range by default (`192.0.2.0/24`, `2001:db8::/32`): no
//! network routes them, so nothing but a redirect answers. A pod's exclusions can take that away:
//! - an outbound IP range inclusion list redirects only what it names, so the check must aim
//!   inside it (only the families it names are redirected at all, so only those are checked);
//! - an outbound IP range exclusion covering the default lets it through unredirected, so the check
//!   takes another documentation range.
//!
//! The check's socket is bound to the loopback device, so an address inside an inclusion range
//! (a Service CIDR, say) is never reached on the network either. When no range is left for a
//! family, the pod cannot be validated and the rewriter keeps the mesh's init container.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::contract::{VALIDATION_TARGET_V4, VALIDATION_TARGET_V6};

/// The documentation ranges (RFC 5737, RFC 3849, RFC 9637), the first of each family the check's
/// own default.
fn documentation(v4: bool) -> Vec<IpNet> {
    if v4 {
        vec![
            IpNet::V4(VALIDATION_TARGET_V4),
            IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(198, 51, 100, 0), 24)),
            IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(203, 0, 113, 0), 24)),
        ]
    } else {
        vec![
            IpNet::V6(VALIDATION_TARGET_V6),
            IpNet::V6(Ipv6Net::new_assert(
                Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
                20,
            )),
        ]
    }
}

/// The largest block of an inclusion range the check aims at: a /24 (IPv4) or a /64 (IPv6) at
/// most, so that an excluded address elsewhere in a wide range does not rule the range out.
fn blocks(range: IpNet) -> Vec<IpNet> {
    let longest = if range.addr().is_ipv4() { 24 } else { 64 };
    if range.prefix_len() >= longest {
        return vec![range];
    }
    // The first and the last block of the range, computed rather than iterated to: a wide IPv6
    // range has 2^56 blocks of /64 and more.
    let block = |addr| IpNet::new(addr, longest).map(|block| block.trunc());
    [block(range.network()), block(range.broadcast())]
        .into_iter()
        .flatten()
        .collect()
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The ranges the check should aim at for a pod with these (effective) outbound ranges excluded
/// and included: `Ok(vec![])` when the defaults do, otherwise one range per family to check.
/// `Err` names the family that has none left.
pub fn ranges(excluded: &[IpNet], included: &[IpNet]) -> Result<Vec<IpNet>, String> {
    let free = |candidates: Vec<IpNet>| {
        candidates
            .into_iter()
            .find(|candidate| !excluded.iter().any(|range| overlaps(range, candidate)))
    };
    if included.is_empty() {
        let mut chosen = Vec::new();
        let mut moved = false;
        for v4 in [true, false] {
            let candidates = documentation(v4);
            let default = candidates[0];
            let family = if v4 { "IPv4" } else { "IPv6" };
            let range = free(candidates).ok_or_else(|| {
                format!(
                    "its outbound IP range exclusions cover every documentation range of {family}, \
                     so the validation's check has no address the datapath would redirect"
                )
            })?;
            moved |= range != default;
            chosen.push(range);
        }
        return Ok(if moved { chosen } else { Vec::new() });
    }
    let mut chosen = Vec::new();
    for v4 in [true, false] {
        let of_family: Vec<IpNet> = included
            .iter()
            .filter(|range| range.addr().is_ipv4() == v4)
            .flat_map(|range| blocks(range.trunc()))
            .collect();
        if of_family.is_empty() {
            // Nothing of this family is redirected for the pod: nothing to check.
            continue;
        }
        let family = if v4 { "IPv4" } else { "IPv6" };
        let range = free(of_family).ok_or_else(|| {
            format!(
                "its outbound IP range exclusions cover its {family} inclusion ranges where the \
                 validation's check would aim, so it has no address the datapath would redirect"
            )
        })?;
        chosen.push(range);
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter()
            .map(|net| net.parse().expect("a range"))
            .collect()
    }

    #[test]
    fn the_defaults_serve_a_pod_without_inclusions_or_overlapping_exclusions() {
        assert_eq!(ranges(&nets(&["10.0.0.0/8", "fd00::/8"]), &[]), Ok(vec![]));
        assert_eq!(ranges(&[], &[]), Ok(vec![]));
    }

    #[test]
    fn an_excluded_default_moves_the_check_to_another_documentation_range() {
        assert_eq!(
            ranges(&nets(&["192.0.0.0/16"]), &[]),
            Ok(nets(&["198.51.100.0/24", "2001:db8::/32"]))
        );
        assert_eq!(
            ranges(&nets(&["2001:db8:1::/48"]), &[]),
            Ok(nets(&["192.0.2.0/24", "3fff::/20"]))
        );
    }

    #[test]
    fn excluding_everything_leaves_nothing_to_check() {
        let error = ranges(&nets(&["0.0.0.0/0"]), &[]).expect_err("no range");
        assert!(error.contains("IPv4"), "{error}");
    }

    #[test]
    fn inclusions_are_aimed_inside_and_name_the_families_checked() {
        assert_eq!(
            ranges(&[], &nets(&["10.96.0.0/12"])),
            Ok(nets(&["10.96.0.0/24"]))
        );
        assert_eq!(
            ranges(&nets(&["10.96.0.0/24"]), &nets(&["10.96.0.0/12"])),
            Ok(nets(&["10.111.255.0/24"]))
        );
        assert_eq!(
            ranges(&nets(&["fd00::/64"]), &nets(&["fd00::/8"])),
            Ok(nets(&["fdff:ffff:ffff:ffff::/64"]))
        );
        assert_eq!(
            ranges(&[], &nets(&["10.1.2.3/32", "fd00:10::/108"])),
            Ok(nets(&["10.1.2.3/32", "fd00:10::/108"]))
        );
        let error = ranges(&nets(&["10.0.0.0/8"]), &nets(&["10.96.0.0/12"])).expect_err("none");
        assert!(error.contains("IPv4 inclusion"), "{error}");
    }
}
