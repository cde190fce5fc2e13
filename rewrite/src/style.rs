//! The two shapes a rewritten probe can take: OSM's, which the FSM documentation describes, and the
//! one FSM's injector produces today. Both keep every field of the probe but its handler (timing
//! fields included) and both drop `httpGet.host`, so that the kubelet probes the pod's own IP.

use serde_json::{Map, Value, json};

use super::{ProbeKind, probe::Check};
use crate::contract::{
    GRPC_HEALTHCHECK_PATH, HEALTHCHECK_PATH, HEALTHCHECK_PORT, ORIGINAL_GRPC_PORT_HEADER,
    ORIGINAL_GRPC_SERVICE_HEADER, ORIGINAL_HTTP_PATH_HEADER, ORIGINAL_HTTP_PORT_HEADER,
    ORIGINAL_TCP_PORT_HEADER,
};

/// Which shape rewritten httpGet probes take. tcpSocket and gRPC probes take one shape in both.
///
/// With the `clap` feature, a `--style` value of the agent's command line (`osm`, `fsm`), its help
/// from these doc comments; without it, the fuzz targets and tests build no command-line parser.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Style {
    /// OSM's shape: an HTTP probe goes to `/fsm-<kind>-probe/<container>` on the kind's port
    /// (15901-15903); an HTTPS probe only changes port. The agent finds the original probe in
    /// the original-probes annotation.
    #[default]
    Osm,
    /// FSM's shape: every httpGet probe goes to `/fsm-healthcheck` on the kind's port, the original
    /// port and path in `Original-Http-Port` and `Original-Http-Path`; an HTTPS probe becomes
    /// plain HTTP with `Original-Tcp-Port`, so only a TCP connect is checked.
    Fsm,
}

impl Style {
    /// The rewritten form of `probe` (a JSON object) of `container`, which runs `check`.
    pub(super) fn rewrite(
        self,
        probe: &Map<String, Value>,
        check: Check<'_>,
        kind: ProbeKind,
        container: &str,
    ) -> Value {
        match check {
            Check::Http { port, https } => {
                let original = probe
                    .get("httpGet")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                let http_get = match self {
                    Self::Osm => osm_http(original, https, kind, container),
                    Self::Fsm => fsm_http(original, port, https, kind),
                };
                with_handler(probe, "httpGet", http_get)
            }
            Check::Tcp { port } => with_handler(
                probe,
                "tcpSocket",
                healthcheck_get(
                    HEALTHCHECK_PATH,
                    &[(ORIGINAL_TCP_PORT_HEADER, port.to_string())],
                ),
            ),
            Check::Grpc { port, service } => {
                let mut headers = vec![(ORIGINAL_GRPC_PORT_HEADER, port.to_string())];
                headers.extend(service.map(|s| (ORIGINAL_GRPC_SERVICE_HEADER, s.to_owned())));
                with_handler(
                    probe,
                    "grpc",
                    healthcheck_get(GRPC_HEALTHCHECK_PATH, &headers),
                )
            }
        }
    }
}

/// OSM: the kind's port; an HTTP probe's path names the kind and the container, an HTTPS probe
/// keeps its path (and scheme), since the kubelet's TLS goes through to the app untouched.
fn osm_http(
    mut http_get: Map<String, Value>,
    https: bool,
    kind: ProbeKind,
    container: &str,
) -> Value {
    http_get = without_host(http_get);
    http_get.insert("port".into(), kind.port().into());
    if !https {
        http_get.insert("path".into(), format!("{}/{container}", kind.path()).into());
    }
    Value::Object(http_get)
}

/// FSM: the kind's port and `/fsm-healthcheck`, the original in headers after the probe's own.
/// FSM's injector writes the header value with the original path as it was, empty when absent.
fn fsm_http(mut http_get: Map<String, Value>, port: u16, https: bool, kind: ProbeKind) -> Value {
    http_get = without_host(http_get);
    let headers = if https {
        http_get.insert("scheme".into(), "HTTP".into());
        vec![(ORIGINAL_TCP_PORT_HEADER, port.to_string())]
    } else {
        let path = http_get.get("path").and_then(Value::as_str).unwrap_or("");
        vec![
            (ORIGINAL_HTTP_PORT_HEADER, port.to_string()),
            (ORIGINAL_HTTP_PATH_HEADER, path.to_owned()),
        ]
    };
    http_get.insert("port".into(), kind.port().into());
    http_get.insert("path".into(), HEALTHCHECK_PATH.into());
    let mut all_headers = http_get
        .get("httpHeaders")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    all_headers.extend(headers.iter().map(|(name, value)| header(name, value)));
    http_get.insert("httpHeaders".into(), all_headers.into());
    Value::Object(http_get)
}

/// An httpGet on the agent's healthcheck port, which bypasses the proxy, as the seed documents
/// show it (`scheme: HTTP` is what the API server would default it to).
fn healthcheck_get(path: &str, headers: &[(&str, String)]) -> Value {
    let headers: Vec<Value> = headers
        .iter()
        .map(|(name, value)| header(name, value))
        .collect();
    json!({
        "httpHeaders": headers,
        "path": path,
        "port": HEALTHCHECK_PORT,
        "scheme": "HTTP",
    })
}

fn header(name: &str, value: &str) -> Value {
    json!({ "name": name, "value": value })
}

/// `host` would send the kubelet somewhere other than this pod; the original-probes annotation
/// keeps it for the agent.
fn without_host(http_get: Map<String, Value>) -> Map<String, Value> {
    http_get
        .into_iter()
        .filter(|(key, _)| key != "host")
        .collect()
}

/// `probe` with its `handler` field replaced by `httpGet`, in the same place among its fields. An
/// `httpGet: null` beside another handler goes, or it would overwrite the new one.
fn with_handler(probe: &Map<String, Value>, handler: &str, http_get: Value) -> Value {
    let fields = probe
        .iter()
        .filter(|(key, _)| handler == "httpGet" || *key != "httpGet")
        .map(|(key, value)| {
            if key == handler {
                ("httpGet".to_owned(), http_get.clone())
            } else {
                (key.clone(), value.clone())
            }
        });
    Value::Object(fields.collect())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_null_http_get_beside_the_real_handler_does_not_overwrite_the_rewrite() {
        let probe = json!({"tcpSocket": {"port": 80}, "httpGet": null, "periodSeconds": 3});
        let rewritten = Style::Osm.rewrite(
            probe.as_object().expect("object"),
            Check::Tcp { port: 80 },
            ProbeKind::Liveness,
            "app",
        );
        assert_eq!(
            rewritten,
            json!({
                "httpGet": {
                    "httpHeaders": [{"name": "Original-Tcp-Port", "value": "80"}],
                    "path": "/fsm-healthcheck", "port": 15904, "scheme": "HTTP",
                },
                "periodSeconds": 3,
            })
        );
    }
}
