//! `probe-bypass rewrite`: the probes of the pods in a manifest, rewritten as the webhook would
//! rewrite them, so that a user can see (or apply) the result before a cluster does.
//!
//! YAML in gives YAML out, several documents (`---`) included; JSON in gives JSON out. Pods, workloads
//! with a pod template, and `List`s of them are rewritten; objects of any other kind (the Service and
//! ConfigMap beside a Deployment) come out unchanged, so a whole application's manifest can go
//! through `rewrite` on its way to `kubectl apply`. Comments in YAML are not kept.

use std::{
    io::{self, Read as _},
    path::{Path, PathBuf},
};

use serde::Deserialize as _;
use serde_json::Value;

use super::{Options, RewriteError, Style, rewrite_in_place_with};

/// The kinds whose pods `rewrite` finds, and where: the pod itself or its template.
const POD_TEMPLATES: [(&str, &str); 7] = [
    ("Pod", ""),
    ("Deployment", "/spec/template"),
    ("StatefulSet", "/spec/template"),
    ("DaemonSet", "/spec/template"),
    ("ReplicaSet", "/spec/template"),
    ("Job", "/spec/template"),
    ("CronJob", "/spec/jobTemplate/spec/template"),
];

/// The kind whose `items` are manifests of their own.
const LIST_KIND: &str = "List";

/// Why a manifest could not be rewritten. Nothing is printed then, so no half-rewritten set of
/// documents is ever applied.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("the input is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("document {document} is not valid YAML: {source}")]
    Yaml {
        document: usize,
        source: serde_norway::Error,
    },
    #[error("{at}: {problem}; rewrite reads {}", supported_kinds())]
    Kind { at: String, problem: String },
    #[error("{at}: {source}")]
    Rewrite { at: String, source: RewriteError },
    #[error("cannot write the manifest as YAML: {0}")]
    Render(serde_norway::Error),
}

fn supported_kinds() -> String {
    let kinds: Vec<&str> = POD_TEMPLATES.iter().map(|(kind, _)| *kind).collect();
    format!("{} and {LIST_KIND}", kinds.join(", "))
}

/// What the input held, for the warning given when it held no pod at all.
#[derive(Default)]
struct Found {
    pods: usize,
    others: Vec<String>,
}

/// The rewritten manifest, and the warnings to show beside it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Output {
    pub manifest: String,
    pub warnings: Vec<String>,
    /// The input as `manifest` renders it, but not rewritten (no comments, the same layout): what
    /// a diff of the rewrite compares `manifest` with.
    pub original: String,
}

/// Reads the manifest at `path`, or standard input for `-`.
pub fn read_input(path: &Path) -> Result<String, ManifestError> {
    let read = if path == Path::new("-") {
        let mut text = String::new();
        io::stdin().read_to_string(&mut text).map(|_| text)
    } else {
        std::fs::read_to_string(path)
    };
    read.map_err(|source| ManifestError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Rewrites every pod in `input`, a YAML or JSON manifest.
pub fn rewrite_manifests(input: &str, style: Style) -> Result<Output, ManifestError> {
    rewrite_manifests_with(input, &Options::new(style))
}

/// [`rewrite_manifests`] with every option.
pub fn rewrite_manifests_with(input: &str, options: &Options) -> Result<Output, ManifestError> {
    let mut warnings = Vec::new();
    let mut found = Found::default();
    let original;
    let manifest = if looks_like_json(input) {
        let mut document: Value = serde_json::from_str(input).map_err(ManifestError::Json)?;
        let render = |document: &Value| {
            serde_json::to_string_pretty(document)
                .map(|mut text| {
                    text.push('\n');
                    text
                })
                .map_err(ManifestError::Json)
        };
        original = render(&document)?;
        rewrite_document(
            &mut document,
            options,
            "the document",
            &mut warnings,
            &mut found,
        )?;
        render(&document)?
    } else {
        // Every document is read before any is rewritten, so that a syntax error comes first.
        let mut documents = Vec::new();
        for (index, yaml) in serde_norway::Deserializer::from_str(input).enumerate() {
            let document = index + 1;
            let value = Value::deserialize(yaml)
                .map_err(|source| ManifestError::Yaml { document, source })?;
            documents.push((document, value));
        }
        let (mut before, mut rendered) = (Vec::new(), Vec::new());
        let render = |value: &Value| serde_norway::to_string(value).map_err(ManifestError::Render);
        // An empty document, such as one after a trailing `---`, holds no object to rewrite.
        for (document, mut value) in documents.into_iter().filter(|(_, v)| !v.is_null()) {
            before.push(render(&value)?);
            let at = format!("document {document}");
            rewrite_document(&mut value, options, &at, &mut warnings, &mut found)?;
            rendered.push(render(&value)?);
        }
        original = before.join("---\n");
        rendered.join("---\n")
    };
    if found.pods == 0 {
        // Most likely the wrong file: say so, rather than print it back as if it had been done.
        let read = if found.others.is_empty() {
            "no object".to_owned()
        } else {
            found.others.join(", ")
        };
        warnings.push(format!(
            "no pod found, so nothing was rewritten (read {read}); rewrite reads {}",
            supported_kinds()
        ));
    }
    Ok(Output {
        manifest,
        warnings,
        original,
    })
}

/// JSON is YAML too, but a JSON manifest should come back as JSON.
fn looks_like_json(input: &str) -> bool {
    input.trim_start().starts_with(['{', '['])
}

/// Rewrites the pods of one object; `at` says where it is in the input, for messages. An object of a
/// kind that has no pods is left as it is.
fn rewrite_document(
    document: &mut Value,
    options: &Options,
    at: &str,
    warnings: &mut Vec<String>,
    found: &mut Found,
) -> Result<(), ManifestError> {
    let kind_error = |problem: String| ManifestError::Kind {
        at: at.to_owned(),
        problem,
    };
    let kind = match document.get("kind") {
        Some(Value::String(kind)) => kind.clone(),
        Some(other) => return Err(kind_error(format!("kind {other} is not a string"))),
        None if document.is_object() => return Err(kind_error("it has no kind".to_owned())),
        None => return Err(kind_error("it is not an object".to_owned())),
    };
    let name = document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_owned();
    let object = format!("{kind} {name}");

    if kind == LIST_KIND {
        let items = document
            .get_mut("items")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| kind_error("the List has no items list".to_owned()))?;
        for (index, item) in items.iter_mut().enumerate() {
            let at = format!("{at}, item {}", index + 1);
            rewrite_document(item, options, &at, warnings, found)?;
        }
        return Ok(());
    }
    let Some((_, pointer)) = POD_TEMPLATES.iter().find(|(known, _)| *known == kind) else {
        found.others.push(object);
        return Ok(());
    };
    found.pods += 1;
    let pod = document
        .pointer_mut(pointer)
        .ok_or_else(|| kind_error(format!("{object} has no pod template at {pointer}")))?;
    let found = rewrite_in_place_with(pod, options).map_err(|source| ManifestError::Rewrite {
        at: format!("{at} ({object})"),
        source,
    })?;
    // The object names the pod better than the template, which usually has no name.
    warnings.extend(found.into_iter().map(|mut warning| {
        warning.pod = None;
        format!("{object}: {warning}")
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_of_other_kinds_pass_through_unchanged() {
        let input = "kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n---\n\
                     kind: Pod\nmetadata: {name: a}\nspec: {containers: []}\n";
        let output = rewrite_manifests(input, Style::Osm).expect("valid");
        assert_eq!(
            output.manifest,
            "kind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: 80\n---\n\
             kind: Pod\nmetadata:\n  name: a\nspec:\n  containers: []\n"
        );
        assert_eq!(output.warnings, Vec::<String>::new());
    }

    #[test]
    fn input_without_any_pod_is_printed_back_with_a_warning_naming_what_was_read() {
        let input = "kind: Service\nmetadata: {name: web}\n---\nkind: ConfigMap\n";
        let output = rewrite_manifests(input, Style::Osm).expect("valid");
        assert_eq!(
            output.manifest,
            "kind: Service\nmetadata:\n  name: web\n---\nkind: ConfigMap\n"
        );
        assert_eq!(
            output.warnings,
            [
                "no pod found, so nothing was rewritten (read Service web, ConfigMap (unnamed)); \
              rewrite reads Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob and \
              List"
            ]
        );
    }

    #[test]
    fn malformed_input_says_where() {
        let error =
            rewrite_manifests("kind: Pod\n---\nkind: [Pod\n", Style::Osm).expect_err("not YAML");
        let message = error.to_string();
        assert!(
            message.starts_with("document 2 is not valid YAML: "),
            "{message}"
        );
        assert!(message.contains("line 3"), "{message}");
        let error = rewrite_manifests("{\"kind\": \"Pod\",}", Style::Osm).expect_err("not JSON");
        assert_eq!(
            error.to_string(),
            "the input is not valid JSON: trailing comma at line 1 column 16"
        );
    }

    #[test]
    fn a_workload_without_its_template_is_an_error() {
        let error = rewrite_manifests("kind: CronJob\nmetadata: {name: nightly}\n", Style::Osm)
            .expect_err("no template");
        assert!(
            error.to_string().starts_with(
                "document 1: CronJob nightly has no pod template at /spec/jobTemplate/spec/template"
            ),
            "{error}"
        );
    }

    #[test]
    fn empty_documents_are_dropped() {
        let output = rewrite_manifests(
            "---\nkind: Pod\nmetadata: {name: a}\nspec: {containers: []}\n---\n",
            Style::Osm,
        )
        .expect("valid");
        assert_eq!(
            output.manifest,
            "kind: Pod\nmetadata:\n  name: a\nspec:\n  containers: []\n"
        );
    }
}
