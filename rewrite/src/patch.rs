//! The RFC 6902 operations the rewriter emits, with their RFC 6901 paths built from tokens so that a
//! `/` or `~` in a key (every annotation key has a `/`) is escaped as `~1` and `~0`.
//!
//! An admission webhook returns these operations to the API server as they are; `rewrite` applies
//! them with [`json_patch::patch`].

use json_patch::{
    AddOperation, PatchOperation, RemoveOperation, ReplaceOperation, jsonptr::PointerBuf,
};
use serde_json::{Map, Value, json};

/// The path of a container's probe field.
pub(super) fn probe_path(container_index: usize, field: &str) -> PointerBuf {
    PointerBuf::from_tokens([
        "spec".to_owned(),
        "containers".to_owned(),
        container_index.to_string(),
        field.to_owned(),
    ])
}

/// The path of a container in `list` (`containers`, `initContainers`).
pub(super) fn container_path(list: &str, index: usize) -> PointerBuf {
    PointerBuf::from_tokens(["spec".to_owned(), list.to_owned(), index.to_string()])
}

/// Removes the value at `path`, which must exist; a list's later items move down one.
pub(super) fn remove(path: PointerBuf) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation { path })
}

/// Replaces the value at `path`, which must exist.
pub(super) fn replace(path: PointerBuf, value: Value) -> PatchOperation {
    PatchOperation::Replace(ReplaceOperation { path, value })
}

/// Sets each annotation `(key, value)` of `set` on a pod whose `metadata` is `metadata`. RFC
/// 6902's `add` needs the parent to exist, so a pod without annotations (or without metadata)
/// gets the whole object added, once, with every key; `add` on an existing key replaces its value.
pub(super) fn set_annotations(
    metadata: Option<&Map<String, Value>>,
    set: Vec<(String, String)>,
) -> Vec<PatchOperation> {
    if set.is_empty() {
        return Vec::new();
    }
    let annotations = metadata.and_then(|metadata| metadata.get("annotations"));
    let add = |path: PointerBuf, value: Value| PatchOperation::Add(AddOperation { path, value });
    let object = || {
        Value::Object(
            set.iter()
                .map(|(k, v)| (k.clone(), v.clone().into()))
                .collect(),
        )
    };
    match (metadata, annotations) {
        (None, _) => vec![add(
            PointerBuf::from_tokens(["metadata"]),
            json!({ "annotations": object() }),
        )],
        (Some(_), None | Some(Value::Null)) => vec![add(
            PointerBuf::from_tokens(["metadata", "annotations"]),
            object(),
        )],
        (Some(_), Some(_)) => set
            .into_iter()
            .map(|(key, value)| {
                add(
                    PointerBuf::from_tokens(["metadata", "annotations", key.as_str()]),
                    Value::String(value),
                )
            })
            .collect(),
    }
}

/// Removes annotation `key`, which must exist.
pub(super) fn remove_annotation(key: &str) -> PatchOperation {
    PatchOperation::Remove(RemoveOperation {
        path: PointerBuf::from_tokens(["metadata", "annotations", key]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sets annotation `key` to `value` on a pod whose `metadata` is `metadata`, as
    /// `set_annotations` does.
    fn set_annotation(
        metadata: Option<&Map<String, Value>>,
        key: &str,
        value: String,
    ) -> PatchOperation {
        let mut operations = set_annotations(metadata, vec![(key.to_owned(), value)]);
        operations.remove(0)
    }

    fn applied(mut doc: Value, operation: PatchOperation) -> Value {
        json_patch::patch(&mut doc, &[operation]).expect("the operation applies");
        doc
    }

    #[test]
    fn annotation_keys_are_escaped_in_the_path() {
        let operation = set_annotation(
            Some(&Map::from_iter([("annotations".to_owned(), json!({}))])),
            "example.io/a~b",
            "v".into(),
        );
        assert_eq!(
            serde_json::to_value(&operation).expect("serializes"),
            json!({"op": "add", "path": "/metadata/annotations/example.io~1a~0b", "value": "v"})
        );
        assert_eq!(
            applied(json!({"metadata": {"annotations": {}}}), operation),
            json!({"metadata": {"annotations": {"example.io/a~b": "v"}}})
        );
    }

    #[test]
    fn an_annotation_is_added_to_a_pod_without_annotations_or_metadata() {
        let pod = json!({"metadata": {"name": "web"}});
        let operation = set_annotation(pod["metadata"].as_object(), "a.io/k", "v".into());
        assert_eq!(
            applied(pod, operation),
            json!({"metadata": {"name": "web", "annotations": {"a.io/k": "v"}}})
        );

        let pod = json!({"metadata": {"annotations": null}});
        let operation = set_annotation(pod["metadata"].as_object(), "a.io/k", "v".into());
        assert_eq!(
            applied(pod, operation),
            json!({"metadata": {"annotations": {"a.io/k": "v"}}})
        );

        let operation = set_annotation(None, "a.io/k", "v".into());
        assert_eq!(
            applied(json!({"spec": {}}), operation),
            json!({"spec": {}, "metadata": {"annotations": {"a.io/k": "v"}}})
        );
    }

    #[test]
    fn an_existing_annotation_is_replaced_and_can_be_removed() {
        let pod = json!({"metadata": {"annotations": {"a.io/k": "old", "other": "x"}}});
        let operation = set_annotation(pod["metadata"].as_object(), "a.io/k", "new".into());
        let pod = applied(pod, operation);
        assert_eq!(
            pod,
            json!({"metadata": {"annotations": {"a.io/k": "new", "other": "x"}}})
        );
        assert_eq!(
            applied(pod, remove_annotation("a.io/k")),
            json!({"metadata": {"annotations": {"other": "x"}}})
        );
    }

    #[test]
    fn a_probe_is_replaced_in_its_container() {
        let path = probe_path(1, "livenessProbe");
        assert_eq!(path.as_str(), "/spec/containers/1/livenessProbe");
        let pod = json!({"spec": {"containers": [{}, {"livenessProbe": {"exec": {}}}]}});
        assert_eq!(
            applied(pod, replace(path, json!({"tcpSocket": {"port": 1}}))),
            json!({"spec": {"containers": [{}, {"livenessProbe": {"tcpSocket": {"port": 1}}}]}})
        );
    }
}
