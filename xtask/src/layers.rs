//! `cargo xtask layers`: checks that the agent's modules import only modules of their own layer or
//! of a layer below (issue 13), so that the folder names and imports tell the architecture.
//!
//! The layers are declared in [`LAYERS`], bottom to top, and drawn in ARCHITECTURE.md. The check
//! reads every file under `agent/src` as text and follows the paths that name another module of the
//! agent: `crate::x`, `use crate::{x, y::z}` and `super::` chains that climb to the crate root. It
//! fails on:
//! - an import of a module of a higher layer;
//! - two top-level modules that import each other (a circle inside one layer);
//! - a module that imports `run` (only `main.rs` may);
//! - a top-level module that no layer names, so a new module must be placed before it builds on
//!   anything.
//!
//! `main.rs` is the binary and sits above every layer; it alone may use `run`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::workspace_root;

/// The entry point of `probe-bypass run`: the binary uses it, and no module of the library does.
const ENTRY: &str = "run";

/// The agent's layers, bottom to top: a module may import the modules of its own layer and of the
/// layers below it.
pub const LAYERS: [(&str, &[&str]); 5] = [
    (
        "1 leaf: helpers, defaults and the pod model",
        &[
            "defaults",
            "dial",
            "dir_watch",
            "error",
            "exclusions",
            "http_text",
            "listen",
            "netns",
            "pod",
            "serving_cert",
            "signal",
            "time",
        ],
    ),
    (
        "2 the node: kernel datapath, netns discovery, pod sources, host checks",
        &["datapath", "discovery", "preflight", "source"],
    ),
    (
        "3 serving: the per-pod listeners and prober, the agent's own endpoints",
        &["admin", "serve"],
    ),
    ("4 reconcile: the pod set made real", &["reconcile"]),
    (
        "5 commands: the command line and what it runs",
        &["cli", "run", "validate", "webhook"],
    ),
];

pub fn run() -> Result<()> {
    let src = workspace_root().join("agent/src");
    let imports = imports(&src)?;
    let problems = check(&imports);
    for (layer, modules) in LAYERS {
        println!("layer {layer}: {}", modules.join(", "));
    }
    if problems.is_empty() {
        let edges: usize = imports.values().map(BTreeSet::len).sum();
        println!(
            "layers: ok ({} modules, {edges} imports between them, none upward, no circle)",
            imports.len()
        );
        return Ok(());
    }
    for problem in &problems {
        eprintln!("layers: {problem}");
    }
    bail!(
        "{} layering problems in agent/src (layers are declared in xtask/src/layers.rs)",
        problems.len()
    )
}

/// For each top-level module of the agent, the other top-level modules it imports.
fn imports(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut imports: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src)? {
        let relative = file.strip_prefix(src).unwrap_or(&file);
        let module = module_path(relative);
        let Some(top) = module.first().cloned() else {
            continue; // lib.rs and main.rs
        };
        let text = fs::read_to_string(&file)
            .with_context(|| format!("failed to read {}", file.display()))?;
        let used = imports.entry(top.clone()).or_default();
        for target in referenced_modules(&strip_comments(&text), &module) {
            if target != top {
                used.insert(target);
            }
        }
    }
    Ok(imports)
}

fn check(imports: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(index, (_, modules))| modules.iter().map(move |module| (*module, index)))
        .collect();
    let mut problems = BTreeSet::new();
    for (module, used) in imports {
        let Some(&layer) = layer_of.get(module.as_str()) else {
            problems.insert(format!("module `{module}` is in no layer"));
            continue;
        };
        for target in used {
            if target == ENTRY {
                problems.insert(format!(
                    "`{module}` imports `{ENTRY}`, which only main.rs may use"
                ));
                continue;
            }
            match layer_of.get(target.as_str()) {
                // Not a module of the agent: a local name that happens to follow `crate::`.
                None if !imports.contains_key(target) => {}
                None => {
                    problems.insert(format!("module `{target}` is in no layer"));
                }
                Some(&above) if above > layer => {
                    problems.insert(format!(
                        "`{module}` (layer {}) imports `{target}` (layer {}), a higher layer",
                        layer + 1,
                        above + 1
                    ));
                }
                Some(_)
                    if imports
                        .get(target)
                        .is_some_and(|back| back.contains(module)) =>
                {
                    if module < target {
                        problems.insert(format!("`{module}` and `{target}` import each other"));
                    }
                }
                Some(_) => {}
            }
        }
    }
    problems
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries =
            fs::read_dir(&dir).with_context(|| format!("failed to read {}", dir.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("failed to read {}", dir.display()))?
                .path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The module a file holds, from its path under `src`: `datapath/pods.rs` is `datapath::pods`;
/// `lib.rs` and `main.rs` are the crate root (empty).
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .components()
        .map(|part| part.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|last| last == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
        parts.clear();
    }
    parts
}

/// The text without `//` comments (doc comments included) and string literals, so that neither a
/// doc link nor a message that names a path counts as an import.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
                out.push_str("\"\"");
            }
            _ => out.push(c),
        }
    }
    out
}

/// The top-level modules a file of module `module` names: after `crate::`, and after a chain of
/// `super::` that climbs to the crate root.
fn referenced_modules(text: &str, module: &[String]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &text[at..];
        let root = if rest.starts_with("crate::") && !ident_before(bytes, at) {
            Some(at + "crate::".len())
        } else if rest.starts_with("super::") && !ident_before(bytes, at) {
            let mut depth = 0;
            let mut end = at;
            while text[end..].starts_with("super::") {
                depth += 1;
                end += "super::".len();
            }
            // `super` from a file of module a::b is a; from a it is the root.
            (depth >= module.len()).then_some(end)
        } else {
            None
        };
        match root {
            Some(start) => {
                found.extend(first_segments(&text[start..]));
                at = start;
            }
            None => at += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    found
}

fn ident_before(bytes: &[u8], at: usize) -> bool {
    at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_')
}

/// The first segment of each path in a use tree: `x::y` gives x; `{x, y::z, self}` gives x and y.
fn first_segments(tree: &str) -> Vec<String> {
    let tree = tree.trim_start();
    let Some(group) = tree.strip_prefix('{') else {
        return ident(tree).into_iter().collect();
    };
    let mut segments = Vec::new();
    let mut depth = 0;
    let mut item_start = true;
    for (index, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => item_start = true,
            c if item_start && !c.is_whitespace() => {
                item_start = false;
                if depth == 0 {
                    segments.extend(ident(&group[index..]));
                }
            }
            _ => {}
        }
    }
    segments
}

fn ident(text: &str) -> Option<String> {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    let name = &text[..end];
    (!name.is_empty() && name != "self" && name != "super").then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(text: &str, module: &[&str]) -> Vec<String> {
        let module: Vec<String> = module.iter().map(|part| (*part).to_owned()).collect();
        referenced_modules(&strip_comments(text), &module)
            .into_iter()
            .collect()
    }

    #[test]
    fn use_trees_paths_and_climbing_supers_are_imports() {
        let text = "use crate::{\n    datapath::{self, Datapath},\n    netns,\n};\n\
                    fn f() { crate::time::sleep_until(None); }\n\
                    use super::super::pod::Pod;\nuse super::sibling;\n";
        assert_eq!(
            modules(text, &["reconcile", "pods"]),
            ["datapath", "netns", "pod", "time"]
        );
    }

    #[test]
    fn comments_and_strings_are_not_imports() {
        let text = "//! See [`crate::run`].\nlet s = \"crate::cli\"; // crate::admin\n";
        assert!(modules(text, &["pod"]).is_empty());
    }

    #[test]
    fn an_upward_import_and_a_circle_are_reported() {
        let mut imports = BTreeMap::new();
        imports.insert("netns".to_owned(), BTreeSet::from(["reconcile".to_owned()]));
        imports.insert("reconcile".to_owned(), BTreeSet::new());
        imports.insert("datapath".to_owned(), BTreeSet::from(["source".to_owned()]));
        imports.insert("source".to_owned(), BTreeSet::from(["datapath".to_owned()]));
        imports.insert("run".to_owned(), BTreeSet::new());
        imports.insert("webhook".to_owned(), BTreeSet::from(["run".to_owned()]));
        imports.insert("stray".to_owned(), BTreeSet::new());
        let problems = check(&imports);
        assert_eq!(
            problems.into_iter().collect::<Vec<_>>(),
            [
                "`datapath` and `source` import each other",
                "`netns` (layer 1) imports `reconcile` (layer 4), a higher layer",
                "`webhook` imports `run`, which only main.rs may use",
                "module `stray` is in no layer",
            ]
        );
    }
}
