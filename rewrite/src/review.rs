//! One admission review: the body the API server POSTs, turned into the body of the answer. No
//! I/O, so the server, the unit tests and the fuzz target all go through this one function.
//!
//! What comes back:
//! - A body that is not an AdmissionReview v1 with a request has no `uid` to answer with, so it is
//!   a [`BadReview`]: the server says why in an HTTP 400, and the API server applies the webhook's
//!   `failurePolicy`.
//! - Anything else is answered `allowed: true`. The rewriter's [`Warning`](crate::Warning)s go into
//!   `response.warnings`, which `kubectl` prints. A review the webhook should not have been sent
//!   (not a Pod, not a CREATE, no object) and a pod the rewriter cannot read are allowed unchanged
//!   with a warning that says why: rewriting probes is never a reason to refuse a pod, and a pod
//!   the rewriter cannot read is one the API server refuses itself, with a better message.

use k8s_openapi::ByteString;
use kube_core::{
    DynamicObject,
    admission::{
        AdmissionRequest, AdmissionResponse, AdmissionReview, META_API_VERSION_V1, META_KIND,
        Operation,
    },
};
use serde_json::Value;

use crate::{Options, Style, rewrite_pod_with};

/// Prefix of every admission warning: `kubectl` prints them without saying which webhook spoke.
pub const WARNING_PREFIX: &str = "probe-bypass: ";

/// A request body that is not an AdmissionReview v1 with a request.
#[derive(Debug, thiserror::Error)]
pub enum BadReview {
    #[error("the body is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("the body is not an AdmissionReview: {0}")]
    NotAReview(String),
    #[error(
        "the body is {kind:?} of apiVersion {api_version:?}; this webhook reads {META_KIND} \
         {META_API_VERSION_V1} (admissionReviewVersions: [\"v1\"])"
    )]
    WrongVersion { api_version: String, kind: String },
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("the AdmissionReview's request is malformed: {0}")]
    BadRequest(serde_json::Error),
}

/// The answer to one review, and what the log says about it.
#[derive(Debug)]
pub struct Admission {
    /// The AdmissionReview to send back, with its response.
    pub review: AdmissionReview<DynamicObject>,
    /// `namespace/name` of the pod, its generateName followed by `*` when it has no name yet.
    pub pod: String,
    /// Operations in the JSON Patch; 0 when nothing changed.
    pub operations: usize,
    pub dry_run: bool,
}

impl Admission {
    /// The answer as the API server reads it.
    pub fn body(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut body = serde_json::to_value(&self.review)?;
        // kube writes the patch's bytes as an array of numbers (kube-rs/kube#1781); the API
        // documents a base64 string, as Go writes a []byte.
        if let Some(patch) = self.review.response.as_ref().and_then(|r| r.patch.clone()) {
            body["response"]["patch"] = serde_json::to_value(ByteString(patch))?;
        }
        serde_json::to_vec(&body)
    }

    /// The warnings the answer carries.
    pub fn warnings(&self) -> &[String] {
        self.review
            .response
            .as_ref()
            .and_then(|response| response.warnings.as_deref())
            .unwrap_or_default()
    }
}

/// Answers the AdmissionReview in `body`, rewriting its pod's probes in `style`.
pub fn review(body: &[u8], style: Style) -> Result<Admission, BadReview> {
    review_with(body, &Options::new(style))
}

/// Answers the AdmissionReview in `body`, rewriting its pod with `options`.
pub fn review_with(body: &[u8], options: &Options) -> Result<Admission, BadReview> {
    let mut document: Value = serde_json::from_slice(body).map_err(BadReview::NotJson)?;
    let envelope = document
        .as_object_mut()
        .ok_or_else(|| BadReview::NotAReview("not a JSON object".to_owned()))?;
    let text = |field: &str| {
        envelope
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (text("apiVersion"), text("kind"));
    if api_version != META_API_VERSION_V1 || kind != META_KIND {
        return Err(BadReview::WrongVersion { api_version, kind });
    }
    // The pod is read as the JSON it came as, not through a type: the patch's paths are into
    // exactly what the API server sent, and a pod the rewriter cannot read is still answered.
    let object = match envelope.get_mut("request") {
        None | Some(Value::Null) => return Err(BadReview::NoRequest),
        Some(Value::Object(request)) => {
            request.remove("oldObject");
            request.remove("object")
        }
        Some(_) => return Err(BadReview::NotAReview("request is not an object".to_owned())),
    };
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_value(document).map_err(BadReview::BadRequest)?;
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| BadReview::NoRequest)?;
    Ok(answer(&request, object.filter(|o| !o.is_null()), options))
}

fn answer(
    request: &AdmissionRequest<DynamicObject>,
    object: Option<Value>,
    options: &Options,
) -> Admission {
    let pod = pod_name(request, object.as_ref());
    let allowed = AdmissionResponse::from(request);
    let (mut response, operations, warnings) =
        match (skip_reason(request, object.as_ref()), &object) {
            (None, Some(pod)) => rewrite(allowed, pod, options),
            (reason, _) => (allowed, 0, reason.into_iter().collect()),
        };
    if !warnings.is_empty() {
        response.warnings = Some(
            warnings
                .into_iter()
                .map(|warning| format!("{WARNING_PREFIX}{warning}"))
                .collect(),
        );
    }
    Admission {
        review: response.into_review(),
        pod,
        operations,
        dry_run: request.dry_run,
    }
}

/// Why the review is none of the rewriter's business; only a MutatingWebhookConfiguration that
/// sends more than Pod CREATEs gets here.
fn skip_reason(
    request: &AdmissionRequest<DynamicObject>,
    object: Option<&Value>,
) -> Option<String> {
    let kind = &request.kind;
    let resource = &request.resource;
    let is_pod = kind.group.is_empty()
        && kind.version == "v1"
        && kind.kind == "Pod"
        && resource.resource == "pods"
        && request.sub_resource.is_none();
    if !is_pod {
        let sub = request
            .sub_resource
            .as_ref()
            .map(|sub| format!("/{sub}"))
            .unwrap_or_default();
        return Some(format!(
            "left unchanged: the webhook was sent {}/{} {} ({}{sub}) and rewrites only v1 Pods; \
             check its MutatingWebhookConfiguration's rules",
            kind.group, kind.version, kind.kind, resource.resource
        ));
    }
    if request.operation != Operation::Create {
        return Some(format!(
            "left unchanged: the webhook was sent a {:?} and rewrites probes only on CREATE \
             (a pod's probes cannot change after); check its MutatingWebhookConfiguration's rules",
            request.operation
        ));
    }
    if object.is_none() {
        return Some("left unchanged: the admission request carries no pod".to_owned());
    }
    None
}

/// The response with the rewrite's patch and warnings; a pod the rewriter cannot read is allowed
/// as it is, with the reason as a warning.
fn rewrite(
    response: AdmissionResponse,
    pod: &Value,
    options: &Options,
) -> (AdmissionResponse, usize, Vec<String>) {
    let rewrite = match rewrite_pod_with(pod, options) {
        Ok(rewrite) => rewrite,
        Err(error) => {
            return (response, 0, vec![format!("probes left unchanged: {error}")]);
        }
    };
    let mut warnings: Vec<String> = rewrite.warnings.iter().map(ToString::to_string).collect();
    let operations = rewrite.patch.0.len();
    if operations == 0 {
        return (response, 0, warnings);
    }
    match response.clone().with_patch(rewrite.patch) {
        Ok(patched) => (patched, operations, warnings),
        Err(error) => {
            warnings.push(format!(
                "probes left unchanged: the patch does not serialize: {error}"
            ));
            (response, 0, warnings)
        }
    }
}

/// `namespace/name` for the log; a pod being created usually has only a generateName.
fn pod_name(request: &AdmissionRequest<DynamicObject>, object: Option<&Value>) -> String {
    let metadata = object.and_then(|o| o.get("metadata"));
    let field = |name: &str| metadata.and_then(|m| m.get(name)).and_then(Value::as_str);
    let namespace = request
        .namespace
        .as_deref()
        .or_else(|| field("namespace"))
        .unwrap_or("-");
    let name = Some(request.name.as_str())
        .filter(|name| !name.is_empty())
        .or_else(|| field("name"))
        .map(ToOwned::to_owned)
        .or_else(|| field("generateName").map(|generate| format!("{generate}*")))
        .unwrap_or_else(|| "-".to_owned());
    format!("{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/rewrite/admission-review.json");

    fn fixture() -> Value {
        serde_json::from_str(FIXTURE).expect("fixture")
    }

    /// The answer's response, its patch read from base64.
    fn answer_of(document: &Value) -> AdmissionResponse {
        let body = serde_json::to_vec(document).expect("json");
        let admission = review(&body, Style::Osm).expect("a review");
        let mut back: Value =
            serde_json::from_slice(&admission.body().expect("body")).expect("JSON");
        assert_eq!(back["apiVersion"], META_API_VERSION_V1);
        assert_eq!(back["kind"], META_KIND);
        let patch = back["response"]
            .as_object_mut()
            .expect("a response")
            .remove("patch")
            .map(|patch| {
                serde_json::from_value::<ByteString>(patch)
                    .expect("base64")
                    .0
            });
        let mut response: AdmissionResponse =
            serde_json::from_value(back["response"].take()).expect("an AdmissionResponse");
        response.patch = patch;
        response
    }

    #[test]
    fn a_pod_gets_a_json_patch_under_its_uid() {
        let response = answer_of(&fixture());
        assert_eq!(response.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert!(response.allowed);
        let patch: json_patch::Patch =
            serde_json::from_slice(&response.patch.expect("a patch")).expect("a JSON Patch");
        let mut pod = fixture()["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch).expect("applies");
        assert_eq!(
            pod["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"],
            15904
        );
        assert_eq!(response.warnings, None);
    }

    #[test]
    fn bodies_that_are_not_v1_reviews_with_a_request_are_refused() {
        let mut v1beta1 = fixture();
        v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
        let mut no_request = fixture();
        no_request["request"] = Value::Null;
        let mut no_uid = fixture();
        no_uid["request"]
            .as_object_mut()
            .expect("request")
            .remove("uid");
        let cases: [(&[u8], &str); 5] = [
            (b"{not json", "not JSON"),
            (b"[1]", "not an AdmissionReview"),
            (
                &serde_json::to_vec(&v1beta1).expect("json"),
                "admission.k8s.io/v1beta1",
            ),
            (
                &serde_json::to_vec(&no_request).expect("json"),
                "no request",
            ),
            (&serde_json::to_vec(&no_uid).expect("json"), "uid"),
        ];
        for (body, expected) in cases {
            let error = review(body, Style::Osm).expect_err("refused").to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
        }
    }

    #[test]
    fn reviews_that_are_not_pod_creations_are_allowed_unchanged_with_a_warning() {
        let mut service = fixture();
        service["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Service"});
        let mut update = fixture();
        update["request"]["operation"] = json!("UPDATE");
        let mut no_object = fixture();
        no_object["request"]["object"] = Value::Null;
        let mut unreadable = fixture();
        unreadable["request"]["object"]["spec"] = json!({"containers": "none"});
        for (document, expected) in [
            (service, "v1 Service"),
            (update, "Update"),
            (no_object, "carries no pod"),
            (unreadable, "/spec/containers is missing or not a list"),
        ] {
            let response = answer_of(&document);
            assert!(response.allowed);
            assert_eq!(response.patch, None);
            let warnings = response.warnings.expect("a warning");
            assert!(
                warnings[0].starts_with(WARNING_PREFIX) && warnings[0].contains(expected),
                "{warnings:?} lacks {expected:?}"
            );
        }
    }
}
