//! The datapath's pins on bpffs: where each link and map lives, reading the maps from outside the
//! agent, and removing exactly the agent's own pins.

use std::{
    collections::BTreeSet,
    fs, io,
    io::ErrorKind,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::maps::{HashMap, Map, MapData, SockHash};
use probe_bypass_common::{Addr, ConnKey, LAYOUT_VERSION, PodEntry, PodName, names};

use super::{DatapathError, error::map_error, sys};

/// Where each meshed pod's sk_lookup link is pinned, under its namespace's cookie.
pub(super) const NETNS_LINKS: &str = "netns";

/// Where the maps of this layout are pinned under `pins`.
pub(super) fn maps_dir(pins: &Path) -> PathBuf {
    pins.join(format!("maps-v{LAYOUT_VERSION}"))
}

/// The addresses of the pods in the maps pinned under `pins`, read from outside the agent that
/// keeps them (by an operator's tool or a benchmark, while the agent runs).
pub fn mapped_addrs(pins: &Path) -> Result<BTreeSet<IpAddr>, DatapathError> {
    let data = MapData::from_pin(maps_dir(pins).join(names::PODS_BY_ADDR))
        .map_err(|source| map_error(names::PODS_BY_ADDR, "open the pin of", source))?;
    let map: HashMap<MapData, Addr, PodEntry> = HashMap::try_from(Map::HashMap(data))
        .map_err(|source| map_error(names::PODS_BY_ADDR, "open the pin of", source))?;
    map.keys()
        .map(|addr| addr.map(IpAddr::from))
        .collect::<Result<_, _>>()
        .map_err(|source| map_error(names::PODS_BY_ADDR, "read", source))
}

/// The sockets in the sockhash pinned under `pins`, whose messages sk_msg may move straight to
/// their peer's: each as (its own address, its peer's), read from outside the agent (by an
/// operator's tool or a test). Only connections with both ends on this node belong there.
pub fn short_circuit_sockets(pins: &Path) -> Result<Vec<(SocketAddr, SocketAddr)>, DatapathError> {
    let data = MapData::from_pin(maps_dir(pins).join(names::SOCKETS))
        .map_err(|source| map_error(names::SOCKETS, "open the pin of", source))?;
    let map: SockHash<MapData, ConnKey> = SockHash::try_from(Map::SockHash(data))
        .map_err(|source| map_error(names::SOCKETS, "open the pin of", source))?;
    map.keys()
        .map(|key| {
            key.map(|key| {
                (
                    SocketAddr::new(IpAddr::from(key.a), key.a_port),
                    SocketAddr::new(IpAddr::from(key.b), key.b_port),
                )
            })
        })
        .collect::<Result<_, _>>()
        .map_err(|source| map_error(names::SOCKETS, "read", source))
}

/// The pods recorded under `pins` as depending on the datapath alone (their mesh's iptables init
/// container was replaced), as `namespace/name`, sorted: as the last agent left them, which may
/// name a pod deleted since. None when nothing is pinned there, or pinned by an agent that kept
/// no such record.
pub fn dependents(pins: &Path) -> Result<Vec<String>, DatapathError> {
    let path = maps_dir(pins).join(names::DEPENDENTS);
    let data = match MapData::from_pin(&path) {
        Ok(data) => data,
        Err(_) if !path.exists() => return Ok(Vec::new()),
        Err(source) => return Err(map_error(names::DEPENDENTS, "open the pin of", source)),
    };
    let map: HashMap<MapData, Addr, PodName> = HashMap::try_from(Map::HashMap(data))
        .map_err(|source| map_error(names::DEPENDENTS, "open the pin of", source))?;
    let mut pods = map
        .iter()
        .map(|entry| entry.map(|(_, name)| name.as_str().to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| map_error(names::DEPENDENTS, "read", source))?;
    pods.sort();
    Ok(pods)
}

/// Removes the pinned maps of other layouts, which no program uses any more.
pub(super) fn remove_other_layouts(pins: &Path, current: &Path) {
    let Ok(entries) = fs::read_dir(pins) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path != current && name.to_string_lossy().starts_with("maps-v") {
            log::info!("removing maps of an older layout: {}", path.display());
            remove_known(&path, &names::MAPS, &mut Vec::new());
        }
    }
}

/// What [`uninstall`] removed and what it left.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub removed: Vec<PathBuf>,
    /// Entries under the pin directory that are not the agent's, left in place.
    pub left: Vec<PathBuf>,
}

/// Detaches the datapath by removing its pins under `pins`: the links (which detaches the cgroup
/// programs) and the maps (which frees them and detaches sk_msg). Nothing else is touched, and
/// anything unexpected under `pins` is left and reported. A missing `pins` is not an error.
pub fn uninstall(pins: &Path) -> Result<Uninstalled, DatapathError> {
    let mut report = Uninstalled::default();
    if !pins.exists() {
        return Ok(report);
    }
    let entries = fs::read_dir(pins).map_err(|source| DatapathError::Pin {
        path: pins.to_path_buf(),
        source,
    })?;
    let mut names = entries
        .map(|entry| entry.map(|entry| entry.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<String>, io::Error>>()
        .map_err(|source| DatapathError::Pin {
            path: pins.to_path_buf(),
            source,
        })?;
    // Links first, so the programs stop running before their maps go.
    names.sort_by_key(|name| !(name == "links" || name == NETNS_LINKS));
    for name in names {
        let path = pins.join(&name);
        if name == "links" || name == NETNS_LINKS {
            detach_pinned_links(&path);
        }
        if name == "links" {
            report.left.extend(remove_known(
                &path,
                &names::CGROUP_PROGRAMS,
                &mut report.removed,
            ));
        } else if name == NETNS_LINKS {
            report.left.extend(remove_matching(
                &path,
                |name| netns_link_cookie(name).is_some(),
                &mut report.removed,
            ));
        } else if name.starts_with("maps-v") {
            report
                .left
                .extend(remove_known(&path, &names::MAPS, &mut report.removed));
        } else {
            report.left.push(path);
        }
    }
    if report.left.is_empty() {
        fs::remove_dir(pins).map_err(|source| DatapathError::Pin {
            path: pins.to_path_buf(),
            source,
        })?;
        report.removed.push(pins.to_path_buf());
    }
    Ok(report)
}

/// Removes the entries of `dir` named in `known`, then `dir` if it is empty. Returns what it left.
fn remove_known(dir: &Path, known: &[&str], removed: &mut Vec<PathBuf>) -> Vec<PathBuf> {
    remove_matching(
        dir,
        |name| known.iter().any(|known| name == *known),
        removed,
    )
}

/// Removes the entries of `dir` whose names `ours` accepts, then `dir` if it is empty. Returns
/// what it left.
fn remove_matching(
    dir: &Path,
    ours: impl Fn(&std::ffi::OsStr) -> bool,
    removed: &mut Vec<PathBuf>,
) -> Vec<PathBuf> {
    let mut left = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return vec![dir.to_path_buf()];
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    paths.sort();
    for path in paths {
        if path.file_name().is_some_and(&ours) && fs::remove_file(&path).is_ok() {
            removed.push(path);
        } else {
            left.push(path);
        }
    }
    if left.is_empty() && fs::remove_dir(dir).is_ok() {
        removed.push(dir.to_path_buf());
    } else if left.is_empty() {
        left.push(dir.to_path_buf());
    }
    left
}

/// The namespace cookie a pin under `netns/` is named after, if it is one of ours.
pub(super) fn netns_link_cookie(name: &std::ffi::OsStr) -> Option<u64> {
    name.to_str()?.parse().ok()
}

/// Removes a pin; one already gone is fine.
/// Detaches every link pinned in `dir` (see [`detach_pinned_link`]).
fn detach_pinned_links(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        detach_pinned_link(&entry.path());
    }
}

/// Detaches the link pinned at `pin` before its pin is removed. Removing the pin alone drops the
/// kernel's reference in a deferred work item, so the program would still run for a moment after
/// `uninstall` returned, or for as long as any other process holds the link. A failure is logged
/// and left to the pin's removal.
pub(super) fn detach_pinned_link(pin: &Path) {
    let detached = sys::obj_get(pin).and_then(sys::link_detach);
    match detached {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => log::warn!(
            "cannot detach the link pinned at {}: {error}; removing its pin, which detaches it \
             once nothing else holds it",
            pin.display()
        ),
    }
}

pub(super) fn remove_pin(pin: &Path) -> Result<(), DatapathError> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Pin {
            path: pin.to_path_buf(),
            source,
        }),
    }
}

pub(super) fn create_dir(dir: &Path) -> Result<(), DatapathError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(DatapathError::Pin {
            path: dir.to_path_buf(),
            source,
        }),
    }
}
