//! Which of the namespaces of a pod's processes is the pod's own.

use std::{collections::BTreeSet, net::IpAddr};

use super::{DiscoveryError, SeenNetns};
use crate::netns::NetnsId;

/// The one namespace among `seen` that holds `ip` and is the pod's alone. `pods_in` names the
/// pods with processes in a namespace.
pub fn choose(
    uid: &str,
    ip: IpAddr,
    seen: Vec<SeenNetns>,
    own_netns: Option<NetnsId>,
    pods_in: impl Fn(NetnsId) -> BTreeSet<String>,
) -> Result<SeenNetns, DiscoveryError> {
    let (mut holding, others): (Vec<_>, Vec<_>) =
        seen.into_iter().partition(|s| s.addresses.contains(&ip));
    let chosen = match holding.len() {
        0 => {
            return Err(DiscoveryError::IpNotFound {
                uid: uid.to_owned(),
                ip,
                namespaces: others,
            });
        }
        1 => holding.remove(0),
        _ => {
            return Err(DiscoveryError::SeveralNetns {
                uid: uid.to_owned(),
                ip,
                namespaces: holding,
            });
        }
    };
    if Some(chosen.id) == own_netns {
        return Err(DiscoveryError::HostNetns {
            uid: uid.to_owned(),
            ip,
            netns: chosen.id,
        });
    }
    let other_pods: Vec<String> = pods_in(chosen.id)
        .into_iter()
        .filter(|other| other != uid)
        .collect();
    if !other_pods.is_empty() {
        return Err(DiscoveryError::SharedNetns {
            uid: uid.to_owned(),
            ip,
            netns: chosen.id,
            other_pods,
        });
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const UID: &str = "0b9c4d1e-7f2a-4c3b-9d8e-1a2b3c4d5e6f";
    const OTHER: &str = "11111111-2222-3333-4444-555555555555";
    const POD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7));
    const HOST: NetnsId = NetnsId { dev: 4, ino: 1 };
    const POD_NS: NetnsId = NetnsId { dev: 4, ino: 2 };

    fn seen(id: NetnsId, pid: u32, addresses: &[IpAddr]) -> SeenNetns {
        SeenNetns {
            id,
            pid,
            container: None,
            addresses: addresses.to_vec(),
        }
    }

    fn only_this_pod(_: NetnsId) -> BTreeSet<String> {
        BTreeSet::from([UID.to_owned()])
    }

    #[test]
    fn the_namespace_holding_the_ip_is_chosen_over_conmons() {
        let host_ip: IpAddr = "192.0.2.10".parse().expect("ip");
        let conmon = SeenNetns {
            container: Some("crio-conmon-abc.scope".to_owned()),
            ..seen(HOST, 10, &[host_ip])
        };
        let pod = seen(POD_NS, 11, &[POD_IP]);
        let chosen = choose(
            UID,
            POD_IP,
            vec![conmon, pod.clone()],
            Some(HOST),
            only_this_pod,
        );
        assert_eq!(chosen.expect("found"), pod);
    }

    #[test]
    fn ip_in_no_namespace_lists_the_namespaces_and_addresses_seen() {
        let host_ip: IpAddr = "192.0.2.10".parse().expect("ip");
        let conmon = SeenNetns {
            container: Some("crio-conmon-abc.scope".to_owned()),
            ..seen(HOST, 10, &[host_ip])
        };
        let error =
            choose(UID, POD_IP, vec![conmon], Some(HOST), only_this_pod).expect_err("not found");
        assert!(
            matches!(&error, DiscoveryError::IpNotFound { namespaces, .. } if namespaces.len() == 1)
        );
        let message = error.to_string();
        for part in [
            UID,
            "10.244.1.7",
            "net:[1] of pid 10",
            "crio-conmon-abc.scope",
            "192.0.2.10",
        ] {
            assert!(message.contains(part), "{part:?} missing from: {message}");
        }
    }

    #[test]
    fn ip_in_two_namespaces_of_the_pod_is_ambiguous() {
        let third = NetnsId { dev: 4, ino: 3 };
        let error = choose(
            UID,
            POD_IP,
            vec![seen(POD_NS, 11, &[POD_IP]), seen(third, 12, &[POD_IP])],
            Some(HOST),
            only_this_pod,
        )
        .expect_err("ambiguous");
        assert!(
            matches!(error, DiscoveryError::SeveralNetns { ref namespaces, .. } if namespaces.len() == 2),
            "{error}"
        );
    }

    #[test]
    fn ip_in_the_agents_own_namespace_is_a_host_network_pod() {
        let error = choose(
            UID,
            POD_IP,
            vec![seen(HOST, 10, &[POD_IP])],
            Some(HOST),
            only_this_pod,
        )
        .expect_err("host network");
        assert!(
            matches!(error, DiscoveryError::HostNetns { netns: HOST, .. }),
            "{error}"
        );
    }

    #[test]
    fn namespace_shared_with_another_pod_is_refused_naming_it() {
        let error = choose(
            UID,
            POD_IP,
            vec![seen(POD_NS, 11, &[POD_IP])],
            Some(HOST),
            |_| BTreeSet::from([UID.to_owned(), OTHER.to_owned()]),
        )
        .expect_err("shared");
        assert!(
            matches!(&error, DiscoveryError::SharedNetns { other_pods, .. } if other_pods == &[OTHER]),
            "{error}"
        );
        assert!(error.to_string().contains(OTHER), "{error}");
    }
}
