//! `--replace-mesh-init`: the node's datapath takes the place of the mesh's per-pod iptables rules.
//!
//! For a pod the mesh's injector wrote, the rewriter
//! - recognises the injector's iptables init container (`fsm-init`, `osm-init`) by its name and
//!   its shape: `/bin/sh -c` with a script of iptables rules, and NET_ADMIN or privileged;
//! - reads the script (`script`) and, when the datapath does every rule of it, carries its
//!   exclusions (the pod's annotations' and the MeshConfig's, which the injector rendered into
//!   it) onto the pod's exclusion annotations, merged with what they say already;
//! - puts the validation init container ([`validation`]) in its place, aimed at an address the
//!   datapath redirects for the pod ([`target`]), at the same index, so that
//!   it runs where the rules were installed: after the app's own init containers, before the
//!   sidecar (a native sidecar too, an init container with `restartPolicy: Always`);
//! - removes the mesh's healthcheck container (`fsm-healthcheck`, `osm-healthcheck`): the agent
//!   answers 15904;
//! - records what it removed in [`REPLACED_MESH_INIT_ANNOTATION`].
//!
//! Anything it cannot carry over keeps the init container, and the healthcheck container, as they
//! are, with a [`Kept`] warning naming why: a rule the datapath cannot do as the script does, a
//! container of the name but another shape, an exclusion annotation the agent would ignore.
//! The pod then keeps its iptables rules, and the agent serves it on top of them.

mod script;
mod target;
pub mod validation;

use serde_json::{Map, Value, json};

use self::script::Reading;
pub use self::script::{Carried, Finding};
use crate::{
    Issue,
    contract::{
        FSM_ANNOTATION_PREFIX, HEALTHCHECK_PORT, INBOUND_PORT_EXCLUSION_LIST,
        OSM_ANNOTATION_PREFIX, OUTBOUND_IP_RANGE_EXCLUSION_LIST, OUTBOUND_IP_RANGE_INCLUSION_LIST,
        OUTBOUND_PORT_EXCLUSION_LIST, REPLACED_MESH_INIT_ANNOTATION, VALIDATION_CONTAINER_NAME,
    },
};

/// The mesh whose injector wrote a pod's init container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mesh {
    Fsm,
    Osm,
}

impl Mesh {
    pub const ALL: [Mesh; 2] = [Mesh::Fsm, Mesh::Osm];

    /// The name of the injector's iptables init container.
    pub fn init_container(self) -> &'static str {
        match self {
            Mesh::Fsm => "fsm-init",
            Mesh::Osm => "osm-init",
        }
    }

    /// The name of the injector's healthcheck container (added for tcpSocket probes).
    pub fn healthcheck_container(self) -> &'static str {
        match self {
            Mesh::Fsm => "fsm-healthcheck",
            Mesh::Osm => "osm-healthcheck",
        }
    }

    /// The prefix of the mesh's pod annotations.
    pub fn annotation_prefix(self) -> &'static str {
        match self {
            Mesh::Fsm => FSM_ANNOTATION_PREFIX,
            Mesh::Osm => OSM_ANNOTATION_PREFIX,
        }
    }

    /// The prefix of the chains the injector's rules make (`FSM_PROXY_INBOUND`, ...).
    fn chain_prefix(self) -> &'static str {
        match self {
            Mesh::Fsm => "FSM",
            Mesh::Osm => "OSM",
        }
    }

    fn injector(self) -> &'static str {
        match self {
            Mesh::Fsm => "FSM's injector",
            Mesh::Osm => "OSM's injector",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mesh::Fsm => "fsm",
            Mesh::Osm => "osm",
        }
    }
}

/// Why the mesh's init container (or its healthcheck container) was kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kept {
    /// The container has the injector's name but not its shape.
    OtherShape(String),
    /// A rule of its script the datapath cannot do as the script does.
    Rule(Finding),
    /// The pod's exclusion annotation is malformed: the agent ignores it whole, so the script's
    /// exclusions merged into it would be lost.
    MalformedAnnotation { key: String, value: String },
    /// The pod has more than one mesh init container.
    SeveralInitContainers(Vec<String>),
    /// The validation's check would have no address that the datapath redirects for the pod
    /// ([`target`]), so the validation could never pass.
    NoValidationTarget(String),
}

/// What replacing a pod's mesh init container comes to.
#[derive(Debug, Default)]
pub(crate) struct Replacement {
    /// Index in `spec.initContainers` of the container to replace.
    pub init_index: usize,
    /// The validation container to put in its place; `None` when the pod has one already.
    pub validation: Option<Value>,
    /// Index in `spec.containers` of the healthcheck container to remove.
    pub healthcheck_index: Option<usize>,
    /// Annotations to set: the carried exclusions and the record.
    pub annotations: Vec<(String, String)>,
}

/// The plan for `spec`, whose pod has `annotations`; `None` (and why, when there is something to
/// say) when the pod keeps what it has.
pub(crate) fn plan(
    spec: Option<&Map<String, Value>>,
    annotations: Option<&Map<String, Value>>,
    validation_image: &str,
) -> (Option<Replacement>, Vec<Issue>) {
    let list = |field: &str| {
        spec.and_then(|spec| spec.get(field))
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    let (init_containers, containers) = (list("initContainers"), list("containers"));
    let found: Vec<(usize, Mesh, &Value)> = init_containers
        .iter()
        .enumerate()
        .filter_map(|(index, container)| {
            let name = container.get("name")?.as_str()?;
            let mesh = Mesh::ALL.into_iter().find(|m| m.init_container() == name)?;
            Some((index, mesh, container))
        })
        .collect();
    let (init_index, mesh, init) = match found.as_slice() {
        [] => return (None, Vec::new()),
        [one] => *one,
        several => {
            let names: Vec<String> = several
                .iter()
                .map(|(_, mesh, _)| mesh.init_container().to_owned())
                .collect();
            let kept = names
                .iter()
                .map(|name| Issue::MeshInitKept {
                    container: name.clone(),
                    reason: Kept::SeveralInitContainers(names.clone()),
                })
                .collect();
            return (None, kept);
        }
    };
    let name = mesh.init_container().to_owned();
    let kept = |reasons: Vec<Kept>| {
        let kept = reasons
            .into_iter()
            .map(|reason| Issue::MeshInitKept {
                container: name.clone(),
                reason,
            })
            .collect();
        (None, kept)
    };
    let script = match shape(init) {
        Ok(script) => script,
        Err(why) => return kept(vec![Kept::OtherShape(why)]),
    };
    let carried = match script::read(script, mesh) {
        Reading::Carried(carried) => carried,
        Reading::NotIptables(why) => return kept(vec![Kept::OtherShape(why)]),
        Reading::Inexpressible(findings) => {
            return kept(findings.into_iter().map(Kept::Rule).collect());
        }
    };

    let mut merged = Vec::new();
    let mut record = Map::new();
    let mut problems = Vec::new();
    for (suffix, items) in carried_lists(&carried) {
        if items.is_empty() {
            continue;
        }
        let key = format!("{}{suffix}", mesh.annotation_prefix());
        let existing = annotations.and_then(|a| a.get(&key));
        record.insert(key.clone(), Value::String(items.join(",")));
        match merge(existing, &items) {
            Ok(Some(value)) => merged.push((key, value)),
            Ok(None) => {}
            Err(()) => problems.push(Kept::MalformedAnnotation {
                key,
                value: existing.map(value_text).unwrap_or_default(),
            }),
        }
    }
    if !problems.is_empty() {
        return kept(problems);
    }
    // The lists the agent will read: the pod's own items and the carried ones.
    let effective = |suffix: &str, carried: &[ipnet::IpNet]| {
        let key = format!("{}{suffix}", mesh.annotation_prefix());
        let mut all = carried.to_vec();
        if let Some(Value::String(text)) = annotations.and_then(|a| a.get(&key)) {
            all.extend(
                text.split(',')
                    .filter_map(|item| match Item::of(item.trim()) {
                        Some(Item::Range(range)) => Some(range),
                        _ => None,
                    }),
            );
        }
        all
    };
    let targets = match target::ranges(
        &effective(
            OUTBOUND_IP_RANGE_EXCLUSION_LIST,
            &carried.outbound_ip_ranges,
        ),
        &effective(
            OUTBOUND_IP_RANGE_INCLUSION_LIST,
            &carried.outbound_ip_range_inclusions,
        ),
    ) {
        Ok(targets) => targets,
        Err(why) => return kept(vec![Kept::NoValidationTarget(why)]),
    };

    let mut warnings = Vec::new();
    let healthcheck = containers.iter().enumerate().find(|(_, container)| {
        container.get("name").and_then(Value::as_str) == Some(mesh.healthcheck_container())
    });
    let healthcheck = match healthcheck {
        Some((index, container)) if is_healthcheck(container, mesh) => Some((index, container)),
        Some(_) => {
            warnings.push(Issue::MeshHealthcheckKept {
                container: mesh.healthcheck_container().to_owned(),
                why: format!(
                    "it neither runs /{} nor listens on {HEALTHCHECK_PORT}",
                    mesh.healthcheck_container()
                ),
            });
            None
        }
        None => None,
    };

    let summary = |container: &Value| {
        let field = |name: &str| container.get(name).cloned().unwrap_or(Value::Null);
        json!({"name": field("name"), "image": field("image")})
    };
    let mut removed = Map::new();
    removed.insert("mesh".to_owned(), mesh.name().into());
    removed.insert("initContainer".to_owned(), summary(init));
    if let Some((_, container)) = healthcheck {
        removed.insert("healthcheckContainer".to_owned(), summary(container));
    }
    removed.insert("carried".to_owned(), Value::Object(record));
    merged.push((
        REPLACED_MESH_INIT_ANNOTATION.to_owned(),
        Value::Object(removed).to_string(),
    ));

    let has_validation = init_containers.iter().any(|container| {
        container.get("name").and_then(Value::as_str) == Some(VALIDATION_CONTAINER_NAME)
    });
    let replacement = Replacement {
        init_index,
        validation: (!has_validation)
            .then(|| validation::container(validation_image, carried.outbound_port, &targets)),
        healthcheck_index: healthcheck.map(|(index, _)| index),
        annotations: merged,
    };
    (Some(replacement), warnings)
}

/// The script of an init container of the injector's shape, or why it is not of that shape.
fn shape(container: &Value) -> Result<&str, String> {
    let strings = |field: &str| -> Vec<&str> {
        container
            .get(field)
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    let mut argv = strings("command");
    argv.extend(strings("args"));
    let script = match argv.as_slice() {
        ["/bin/sh" | "sh", "-c", script] => *script,
        _ => {
            return Err(
                "it does not run a shell script (`/bin/sh -c <script>`) as the injector's does"
                    .to_owned(),
            );
        }
    };
    let security = container.get("securityContext");
    let privileged = security
        .and_then(|s| s.get("privileged"))
        .and_then(Value::as_bool)
        == Some(true);
    let net_admin = security
        .and_then(|s| s.pointer("/capabilities/add"))
        .and_then(Value::as_array)
        .is_some_and(|added| {
            added
                .iter()
                .any(|c| matches!(c.as_str(), Some("NET_ADMIN" | "CAP_NET_ADMIN")))
        });
    if !privileged && !net_admin {
        return Err(
            "it has neither the NET_ADMIN capability nor privileged, so it cannot have set up \
             iptables rules"
                .to_owned(),
        );
    }
    Ok(script)
}

/// The injector's healthcheck container runs `/fsm-healthcheck` and listens on 15904.
fn is_healthcheck(container: &Value, mesh: Mesh) -> bool {
    let binary = format!("/{}", mesh.healthcheck_container());
    let runs = container
        .pointer("/command/0")
        .and_then(Value::as_str)
        .is_some_and(|command| command.ends_with(&binary));
    let listens = container
        .get("ports")
        .and_then(Value::as_array)
        .is_some_and(|ports| {
            ports.iter().any(|port| {
                port.get("containerPort").and_then(Value::as_u64) == Some(HEALTHCHECK_PORT.into())
            })
        });
    runs || listens
}

/// The carried exclusions, as annotation items, by annotation suffix.
fn carried_lists(carried: &Carried) -> [(&'static str, Vec<String>); 4] {
    let text = |items: &[_]| -> Vec<String> { items.iter().map(ToString::to_string).collect() };
    [
        (INBOUND_PORT_EXCLUSION_LIST, text(&carried.inbound_ports)),
        (OUTBOUND_PORT_EXCLUSION_LIST, text(&carried.outbound_ports)),
        (
            OUTBOUND_IP_RANGE_EXCLUSION_LIST,
            carried
                .outbound_ip_ranges
                .iter()
                .map(ToString::to_string)
                .collect(),
        ),
        (
            OUTBOUND_IP_RANGE_INCLUSION_LIST,
            carried
                .outbound_ip_range_inclusions
                .iter()
                .map(ToString::to_string)
                .collect(),
        ),
    ]
}

fn value_text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), ToOwned::to_owned)
}

/// `existing`'s items followed by those of `items` it lacks, comma-separated; `Ok(None)` when it
/// has them all. `Err` when `existing` is not a list the agent reads (it would ignore it whole).
fn merge(existing: Option<&Value>, items: &[String]) -> Result<Option<String>, ()> {
    let existing = match existing {
        None => "",
        Some(Value::String(text)) => text.as_str(),
        Some(_) => return Err(()),
    };
    let mut list: Vec<String> = Vec::new();
    if !existing.trim().is_empty() {
        for item in existing.split(',').map(str::trim) {
            if item.is_empty() || Item::of(item).is_none() {
                return Err(());
            }
            list.push(item.to_owned());
        }
    }
    let known: Vec<Item> = list.iter().filter_map(|item| Item::of(item)).collect();
    let new: Vec<&String> = items
        .iter()
        .filter(|item| Item::of(item).is_some_and(|item| !known.contains(&item)))
        .collect();
    if new.is_empty() {
        return Ok(None);
    }
    list.extend(new.into_iter().cloned());
    Ok(Some(list.join(",")))
}

/// One item of an exclusion list as the agent reads it, for telling `80` from `080`'s twin.
#[derive(PartialEq)]
enum Item {
    Port(u16),
    Range(ipnet::IpNet),
}

impl Item {
    fn of(text: &str) -> Option<Item> {
        match text.parse::<u16>() {
            Ok(0) => None,
            Ok(port) => Some(Item::Port(port)),
            Err(_) => text
                .parse::<ipnet::IpNet>()
                .ok()
                .map(|range| Item::Range(range.trunc())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_every_item_and_adds_only_new_ones() {
        let items = ["80".to_owned(), "443".to_owned()];
        assert_eq!(merge(None, &items), Ok(Some("80,443".to_owned())));
        assert_eq!(
            merge(Some(&json!("443, 8080")), &items),
            Ok(Some("443,8080,80".to_owned()))
        );
        assert_eq!(merge(Some(&json!("80,443")), &items), Ok(None));
        assert_eq!(
            merge(Some(&json!("")), &items),
            Ok(Some("80,443".to_owned()))
        );
        let ranges = ["10.0.0.0/8".to_owned()];
        assert_eq!(merge(Some(&json!("10.1.2.3/8")), &ranges), Ok(None));
    }

    #[test]
    fn a_malformed_annotation_is_not_merged_into() {
        let items = ["80".to_owned()];
        for bad in [
            json!("80,,443"),
            json!("eighty"),
            json!("10.0.0.1"),
            json!(80),
        ] {
            assert_eq!(merge(Some(&bad), &items), Err(()), "{bad}");
        }
    }
}
