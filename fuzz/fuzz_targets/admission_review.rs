//! Arbitrary bytes as the body of a POST to the webhook, through the function the server answers
//! with: it never panics; it either refuses the body with a reason (the server's HTTP 400) or
//! answers with an AdmissionReview v1 that echoes the request's uid, allows it, and carries either
//! no patch or a base64 JSON Patch that applies to the pod the request carried.
#![no_main]

use k8s_openapi::ByteString;
use libfuzzer_sys::fuzz_target;
use probe_bypass_rewrite::{Style, review::review};
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let style = if selector & 1 == 0 {
        Style::Osm
    } else {
        Style::Fsm
    };
    let admission = match review(body, style) {
        Ok(admission) => admission,
        Err(error) => {
            assert!(!error.to_string().is_empty(), "a refusal says why");
            return;
        }
    };
    let answer: Value =
        serde_json::from_slice(&admission.body().expect("the answer serializes")).expect("JSON");
    let request: Value = serde_json::from_slice(body).expect("an answered body is JSON");
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], request["request"]["uid"]);
    assert_eq!(response["allowed"], true);
    let Some(patch) = response.get("patch") else {
        assert!(response.get("patchType").is_none());
        return;
    };
    assert_eq!(response["patchType"], "JSONPatch");
    let ByteString(bytes) = serde_json::from_value(patch.clone()).expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).expect("a JSON Patch");
    assert!(!patch.0.is_empty(), "an empty patch is left out");
    let mut pod = request["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the request's pod");
});
