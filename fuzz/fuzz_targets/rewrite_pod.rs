//! Arbitrary bytes as a pod, or as an AdmissionReview carrying one, through the probe rewriter: it
//! never panics, its patch always applies to the pod it was made for, a rewritten pod rewrites to
//! itself, and the annotation it writes reads back. The same bytes also go to the annotation's
//! parser on their own. The selector's second bit turns `--replace-mesh-init` on, so the mesh
//! init container's script reader gets the bytes too (the seeds include the injectors' pods).
#![no_main]

use libfuzzer_sys::fuzz_target;
use probe_bypass_rewrite::{
    Options, OriginalProbes, Style, contract::ORIGINAL_PROBES_ANNOTATION, rewrite_pod_with,
};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, json)) = data.split_first() else {
        return;
    };
    let style = if selector & 1 == 0 {
        Style::Osm
    } else {
        Style::Fsm
    };
    let mut options = Options::new(style);
    options.replace_mesh_init = selector & 2 != 0;
    if let Ok(text) = std::str::from_utf8(json) {
        let _ = OriginalProbes::parse(text);
    }
    let Ok(document) = serde_json::from_slice::<Value>(json) else {
        return;
    };
    // What a webhook receives: an AdmissionReview with the pod at /request/object.
    let mut pod = match document.pointer("/request/object") {
        Some(object) => object.clone(),
        None => document,
    };
    let Ok(once) = rewrite_pod_with(&pod, &options) else {
        return;
    };
    json_patch::patch(&mut pod, &once.patch).expect("the rewrite's patch applies to its pod");
    let twice = rewrite_pod_with(&pod, &options).expect("a rewritten pod rewrites again");
    assert!(
        twice.patch.is_empty(),
        "rewriting a second time changed {pod}: {}",
        twice.patch
    );
    let annotation = pod
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(ORIGINAL_PROBES_ANNOTATION))
        .and_then(Value::as_str);
    if let Some(annotation) = annotation {
        OriginalProbes::parse(annotation).expect("the recorded originals read back");
    }
});
