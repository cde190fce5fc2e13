//! httpGet probes, run as the kubelet runs them (kubernetes `pkg/probe/http`;
//! `shared/reference/peers.md` §5).
//!
//! - One GET per request, HTTP/1.1, a new connection each (`Connection: close`: the kubelet turns
//!   keep-alive off). HTTPS does not verify the server's certificate ([`super::tls`]).
//! - Headers: the probe's `httpHeaders`, in order. `User-Agent` is the kubelet's unless the probe
//!   sets one (set empty, none is sent); `Accept: */*` unless the probe sets one (set empty, none is
//!   sent); `Host` is the probe's when it sets a non-empty one, else `host:port` of the URL. Names go
//!   out in Go's canonical case (`X-Custom-Header`).
//! - Status 200-399 passes, and the status is passed on to the caller; anything else fails. A 3xx
//!   is a redirect the kubelet did not follow ([`super::redirect`] has the rule), which it counts
//!   as a success with a warning.
//! - At most 10 KiB of the last response's body is read; the rest is left unread.
//! - The probe's timeout bounds all of it: name lookup, connects, TLS, redirects and body.
//!
//! Where this differs from the kubelet, on purpose or for lack of need: no HTTP/2 over TLS (the
//! kubelet's Go client offers it through ALPN; every HTTPS server answers HTTP/1.1 too); a
//! `Connection` header of the probe is not sent (the kubelet's `Connection: close` is); and a body
//! that breaks off fails the probe at once, where the kubelet tries twice more before it fails.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::pin,
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{
    Request, StatusCode,
    body::{Body, Bytes},
    client::conn::http1,
    header::{HeaderName, HeaderValue, LOCATION},
};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{ContainerPort, HTTPGetAction};
use probe_bypass_rewrite::ports::{PortError, resolve_port};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    Connector, Outcome, Protocol, Verdict, alongside,
    redirect::{self, Decision, RedirectError, Scheme, Url},
    tls::{self, TlsError},
};
use crate::{dial::StreamError, error::error_chain};

/// The most bytes of a response body the kubelet reads.
pub const MAX_BODY: usize = 10 * 1024;

/// An httpGet probe, ready to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProbe {
    /// The first request's URL.
    pub url: Url,
    /// The probe's `httpHeaders`, in order.
    pub headers: Vec<(String, String)>,
    /// The probe's `timeoutSeconds`: a bound on the whole probe.
    pub timeout: Duration,
}

/// Why an httpGet probe cannot be run, or why it failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Port(#[from] PortError),
    #[error("scheme {0:?} is neither HTTP nor HTTPS")]
    Scheme(String),
    #[error("cannot resolve {host}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error(transparent)]
    Connect(#[from] StreamError),
    #[error(transparent)]
    TlsSetup(#[from] TlsError),
    #[error("{0:?} cannot be a TLS server name")]
    ServerName(String),
    #[error("TLS handshake with {url}: {source}")]
    Tls { url: String, source: io::Error },
    #[error("invalid header {name:?}: {reason}")]
    Header { name: String, reason: String },
    #[error("cannot build the request to {url}: {reason}")]
    Request { url: String, reason: String },
    #[error("{url}: {}", error_chain(.source))]
    Exchange { url: String, source: hyper::Error },
    #[error("reading the response body from {url}: {}", error_chain(.source))]
    Body { url: String, source: hyper::Error },
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

impl HttpProbe {
    /// The probe the kubelet runs for `action` of a container with `ports`, in a pod with IP
    /// `pod_ip`: `host` defaults to the pod IP, a named port is looked up in `ports`, the scheme
    /// defaults to HTTP and the path to `/`.
    pub fn from_action(
        action: &HTTPGetAction,
        ports: &[ContainerPort],
        pod_ip: IpAddr,
        timeout: Duration,
    ) -> Result<Self, HttpError> {
        let scheme = match action.scheme.as_deref() {
            None | Some("") => Scheme::Http,
            Some(text) if text.eq_ignore_ascii_case("http") => Scheme::Http,
            Some(text) if text.eq_ignore_ascii_case("https") => Scheme::Https,
            Some(text) => return Err(HttpError::Scheme(text.to_owned())),
        };
        let port = resolve_port(&action.port, ports)?;
        let host = match action.host.as_deref() {
            None | Some("") => pod_ip.to_string(),
            Some(host) => host.to_owned(),
        };
        let path = action.path.as_deref().unwrap_or_default();
        Ok(Self {
            url: Url::for_probe(scheme, &host, port, path),
            headers: action
                .http_headers
                .iter()
                .flatten()
                .map(|header| (header.name.clone(), header.value.clone()))
                .collect(),
            timeout,
        })
    }

    pub fn protocol(&self) -> Protocol {
        match self.url.scheme {
            Scheme::Http => Protocol::Http,
            Scheme::Https => Protocol::Https,
        }
    }
}

/// Runs `probe`, connecting through `connector`. `user_agent` is sent unless the probe sets its
/// own: the kubelet's, `kube-probe/<major>.<minor>`.
pub async fn probe<C: Connector>(connector: &C, probe: &HttpProbe, user_agent: &str) -> Outcome {
    let started = Instant::now();
    let result = tokio::time::timeout(probe.timeout, run(connector, probe, user_agent)).await;
    let (verdict, status, message) = match result {
        Ok(Ok(Answered {
            status,
            body,
            location,
        })) => classify(status, &body, location.as_deref()),
        Ok(Err(error)) => (Verdict::Failure, None, error.to_string()),
        Err(_) => (
            Verdict::Timeout,
            None,
            format!("{} did not answer within {:?}", probe.url, probe.timeout),
        ),
    };
    Outcome {
        verdict,
        status,
        message,
        latency: started.elapsed(),
    }
}

/// The verdict on the last response, as the kubelet gives it. The body goes into the message only
/// for a redirect, as in the kubelet's warning: the body of a failure may hold what the app would
/// not show to whoever reads the pod's events.
fn classify(
    status: StatusCode,
    body: &[u8],
    location: Option<&str>,
) -> (Verdict, Option<u16>, String) {
    let code = status.as_u16();
    let (verdict, message) = match code {
        200..=299 => (
            Verdict::Success,
            format!("HTTP probe succeeded with status code {code}"),
        ),
        300..=399 => (
            Verdict::Warning,
            format!(
                "HTTP probe stopped at a redirect it does not follow (status code {code}, Location {}); \
                 a success with a warning. Response body: {}",
                location.unwrap_or("absent"),
                String::from_utf8_lossy(body)
            ),
        ),
        _ => (
            Verdict::Failure,
            format!("HTTP probe failed with status code {code}"),
        ),
    };
    (verdict, Some(code), message)
}

/// The last response of a probe.
struct Answered {
    status: StatusCode,
    location: Option<String>,
    body: Vec<u8>,
}

/// Follows the probe's requests to its last response.
async fn run<C: Connector>(
    connector: &C,
    probe: &HttpProbe,
    user_agent: &str,
) -> Result<Answered, HttpError> {
    let headers = Headers::new(&probe.headers, user_agent)?;
    let mut url = probe.url.clone();
    let mut host = headers.host.clone();
    let mut referer = None;
    let mut requests = 0;
    loop {
        let request = headers.request(&url, host.as_deref(), referer.as_deref())?;
        requests += 1;
        let response = exchange(connector, &url, request).await?;
        let decision = match (is_redirect(response.status), &response.location) {
            (true, Some(location)) => redirect::decide(&probe.url.host, &url, requests, location)?,
            _ => Decision::NotFollowed,
        };
        let Decision::Follow {
            url: next,
            relative,
        } = decision
        else {
            return Ok(Answered {
                status: response.status,
                location: response.location,
                body: response.body.map_err(|source| HttpError::Body {
                    url: url.to_string(),
                    source,
                })?,
            });
        };
        // Go keeps the probe's Host header only across redirects without a scheme.
        if !relative {
            host = None;
        }
        referer = redirect::referer(&url, &next);
        url = next;
    }
}

/// The statuses Go's client follows when they carry a `Location`.
fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// The headers of every request of a probe, as the kubelet makes them from the probe's.
#[derive(Debug)]
struct Headers {
    /// The probe's own `Host`, when it sets a non-empty one.
    host: Option<String>,
    /// Everything else, `User-Agent` and `Accept` included, in order.
    others: Vec<(HeaderName, HeaderValue)>,
}

impl Headers {
    fn new(probe: &[(String, String)], user_agent: &str) -> Result<Self, HttpError> {
        let named = |wanted: &str| {
            probe
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(wanted))
                .map(|(_, value)| value.as_str())
        };
        let host = named("host")
            .filter(|host| !host.is_empty())
            .map(str::to_owned);
        let user_agent = named("user-agent").unwrap_or(user_agent);
        let accept_dropped = named("accept").is_some_and(str::is_empty);
        let mut others = Vec::with_capacity(probe.len() + 2);
        if !user_agent.is_empty() {
            others.push(header("user-agent", user_agent)?);
        }
        if named("accept").is_none() {
            others.push(header("accept", "*/*")?);
        }
        for (name, value) in probe {
            // Host and User-Agent are sent once, above; the framing headers are hyper's to write,
            // and the kubelet always asks to close.
            let skipped = [
                "host",
                "user-agent",
                "connection",
                "content-length",
                "transfer-encoding",
                "trailer",
            ]
            .iter()
            .any(|skipped| name.eq_ignore_ascii_case(skipped));
            let dropped = accept_dropped && name.eq_ignore_ascii_case("accept");
            if !skipped && !dropped {
                others.push(header(name, value)?);
            }
        }
        others.push(header("connection", "close")?);
        Ok(Self { host, others })
    }

    /// The request for `url`, with `host` as its Host header (else the URL's) and a `Referer`.
    fn request(
        &self,
        url: &Url,
        host: Option<&str>,
        referer: Option<&str>,
    ) -> Result<Request<Empty<Bytes>>, HttpError> {
        let invalid = |reason: String| HttpError::Request {
            url: url.to_string(),
            reason,
        };
        let mut request = Request::get(url.target.as_str())
            .body(Empty::new())
            .map_err(|error| invalid(error.to_string()))?;
        let headers = request.headers_mut();
        let host = host.map_or_else(|| url.authority(), str::to_owned);
        headers.append(
            hyper::header::HOST,
            HeaderValue::try_from(host).map_err(|error| invalid(error.to_string()))?,
        );
        for (name, value) in &self.others {
            headers.append(name.clone(), value.clone());
        }
        if let Some(referer) = referer {
            headers.insert(
                hyper::header::REFERER,
                HeaderValue::try_from(referer).map_err(|error| invalid(error.to_string()))?,
            );
        }
        Ok(request)
    }
}

fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), HttpError> {
    let invalid = |reason: String| HttpError::Header {
        name: name.to_owned(),
        reason,
    };
    Ok((
        HeaderName::try_from(name).map_err(|error| invalid(error.to_string()))?,
        HeaderValue::try_from(value).map_err(|error| invalid(error.to_string()))?,
    ))
}

/// A response, its body read up to [`MAX_BODY`] or the error that cut it short: only the last
/// response's body matters, and a followed redirect's broken body does not fail the probe.
struct Response {
    status: StatusCode,
    location: Option<String>,
    body: Result<Vec<u8>, hyper::Error>,
}

/// Sends one request on a new connection to `url`.
async fn exchange<C: Connector>(
    connector: &C,
    url: &Url,
    request: Request<Empty<Bytes>>,
) -> Result<Response, HttpError> {
    let stream = connect(connector, url).await?;
    match url.scheme {
        Scheme::Http => send(stream, url, request).await,
        Scheme::Https => {
            let name =
                tls::server_name(&url.host).map_err(|_| HttpError::ServerName(url.host.clone()))?;
            let stream = tls::connector()?
                .connect(name, stream)
                .await
                .map_err(|source| HttpError::Tls {
                    url: url.to_string(),
                    source,
                })?;
            send(stream, url, request).await
        }
    }
}

/// Opens the connection the first request of `probe` would go over, and sends nothing: for a relay
/// of the kubelet's own TLS to the app (an HTTPS probe passed through on 15901-15903).
pub async fn connect_first<C: Connector>(
    connector: &C,
    probe: &HttpProbe,
) -> Result<C::Stream, HttpError> {
    connect(connector, &probe.url).await
}

/// Connects to the URL's host: its address, or each address its name resolves to in turn (in the
/// agent's own network namespace, the node's, where the kubelet resolves it too).
async fn connect<C: Connector>(connector: &C, url: &Url) -> Result<C::Stream, HttpError> {
    let addrs: Vec<SocketAddr> = match url.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, url.port)],
        Err(_) => tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .map_err(|source| HttpError::Resolve {
                host: url.host.clone(),
                source,
            })?
            .collect(),
    };
    let mut last_error = HttpError::NoAddress(url.host.clone());
    for addr in addrs {
        match connector.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = error.into(),
        }
    }
    Err(last_error)
}

/// Sends `request` over `stream` with HTTP/1.1 and reads the response.
async fn send<S>(
    stream: S,
    url: &Url,
    request: Request<Empty<Bytes>>,
) -> Result<Response, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let failed = |source| HttpError::Exchange {
        url: url.to_string(),
        source,
    };
    let (mut sender, connection) = http1::Builder::new()
        .title_case_headers(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(failed)?;
    let exchange = async {
        let response = sender.send_request(request).await.map_err(failed)?;
        let status = response.status();
        let location = response
            .headers()
            .get(LOCATION)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let body = read_at_most(response.into_body(), MAX_BODY).await;
        Ok(Response {
            status,
            location,
            body,
        })
    };
    alongside(connection, exchange).await
}

/// Reads `body` until its end or `limit` bytes, whichever comes first; past `limit` it is not read
/// at all, so what follows cannot fail the probe.
async fn read_at_most<B>(body: B, limit: usize) -> Result<Vec<u8>, B::Error>
where
    B: Body<Data = Bytes>,
{
    let mut body = pin!(body);
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        let Some(frame) = body.frame().await else {
            break;
        };
        if let Ok(data) = frame?.into_data() {
            let room = limit - bytes.len();
            bytes.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use futures::stream;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use k8s_openapi::{api::core::v1::HTTPHeader, apimachinery::pkg::util::intstr::IntOrString};

    use super::*;

    fn headers(probe: &[(&str, &str)]) -> Vec<(String, String)> {
        let probe: Vec<(String, String)> = probe
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        let headers = Headers::new(&probe, "kube-probe/1.31").expect("valid headers");
        let url = Url::for_probe(Scheme::Http, "10.1.2.3", 8080, "/healthz");
        let request = headers
            .request(&url, headers.host.as_deref(), None)
            .expect("request");
        request
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().expect("ascii").to_owned()))
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn default_headers_are_the_kubelets() {
        assert_eq!(
            headers(&[]),
            pairs(&[
                ("host", "10.1.2.3:8080"),
                ("user-agent", "kube-probe/1.31"),
                ("accept", "*/*"),
                ("connection", "close"),
            ])
        );
    }

    #[test]
    fn probe_headers_override_user_agent_accept_and_host() {
        assert_eq!(
            headers(&[
                ("Host", "shop.example"),
                ("user-agent", "mine/1"),
                ("Accept", "application/json"),
                ("X-Token", "a"),
                ("X-Token", "b"),
                ("Connection", "keep-alive"),
            ]),
            pairs(&[
                ("host", "shop.example"),
                ("user-agent", "mine/1"),
                ("accept", "application/json"),
                ("x-token", "a"),
                ("x-token", "b"),
                ("connection", "close"),
            ])
        );
    }

    #[test]
    fn empty_user_agent_accept_or_host_in_the_probe() {
        assert_eq!(
            headers(&[("User-Agent", ""), ("Accept", ""), ("Host", "")]),
            pairs(&[("host", "10.1.2.3:8080"), ("connection", "close")])
        );
    }

    #[test]
    fn invalid_header_is_an_error_naming_it() {
        let probe = vec![("Bad Name".to_owned(), "x".to_owned())];
        let error = Headers::new(&probe, "kube-probe/1.31").expect_err("invalid");
        assert!(error.to_string().contains("\"Bad Name\""), "{error}");
    }

    #[test]
    fn status_classification_follows_the_kubelet() {
        let verdict = |code: u16| classify(StatusCode::from_u16(code).expect("status"), b"", None);
        for (code, expected) in [
            (100, Verdict::Failure),
            (200, Verdict::Success),
            (204, Verdict::Success),
            (299, Verdict::Success),
            (300, Verdict::Warning),
            (302, Verdict::Warning),
            (399, Verdict::Warning),
            (400, Verdict::Failure),
            (404, Verdict::Failure),
            (500, Verdict::Failure),
            (503, Verdict::Failure),
        ] {
            let (verdict, status, _) = verdict(code);
            assert_eq!((verdict, status), (expected, Some(code)), "{code}");
        }
        let (_, _, failure) = classify(StatusCode::INTERNAL_SERVER_ERROR, b"secret", None);
        assert_eq!(failure, "HTTP probe failed with status code 500");
        let (_, _, warning) = classify(StatusCode::FOUND, b"moved", Some("http://x/"));
        assert!(
            warning.contains("Location http://x/") && warning.ends_with("Response body: moved"),
            "{warning}"
        );
    }

    fn chunks(
        sizes: &[usize],
        then_fail: bool,
    ) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, &'static str>>> {
        let mut frames: Vec<Result<Frame<Bytes>, &'static str>> = sizes
            .iter()
            .map(|size| Ok(Frame::data(Bytes::from(vec![b'x'; *size]))))
            .collect();
        if then_fail {
            frames.push(Err("connection reset"));
        }
        StreamBody::new(stream::iter(frames))
    }

    #[tokio::test]
    async fn body_is_read_up_to_10_kib_and_no_further() {
        let body = read_at_most(chunks(&[4096, 4096, 4096], true), MAX_BODY).await;
        assert_eq!(body.map(|b| b.len()), Ok(MAX_BODY));
        let exact = read_at_most(chunks(&[MAX_BODY], true), MAX_BODY).await;
        assert_eq!(exact.map(|b| b.len()), Ok(MAX_BODY));
        let short = read_at_most(chunks(&[10, 20], false), MAX_BODY).await;
        assert_eq!(short.map(|b| b.len()), Ok(30));
        let broken = read_at_most(chunks(&[100], true), MAX_BODY).await;
        assert_eq!(broken, Err("connection reset"));
        let empty = read_at_most(Empty::<Bytes>::new(), MAX_BODY).await;
        assert_eq!(empty.map(|b| b.len()), Ok::<_, Infallible>(0));
    }

    #[test]
    fn probe_from_action_uses_the_pod_ip_named_ports_and_the_scheme() {
        let ports = [ContainerPort {
            name: Some("web".into()),
            container_port: 8443,
            ..ContainerPort::default()
        }];
        let action = HTTPGetAction {
            port: IntOrString::String("web".into()),
            scheme: Some("HTTPS".into()),
            path: Some("/ready?deep=1".into()),
            http_headers: Some(vec![HTTPHeader {
                name: "X-Probe".into(),
                value: "1".into(),
            }]),
            ..HTTPGetAction::default()
        };
        let ip: IpAddr = "10.1.2.3".parse().expect("ip");
        let probe = HttpProbe::from_action(&action, &ports, ip, Duration::from_secs(1))
            .expect("valid probe");
        assert_eq!(probe.url.to_string(), "https://10.1.2.3:8443/ready?deep=1");
        assert_eq!(probe.protocol(), Protocol::Https);
        assert_eq!(probe.headers, vec![("X-Probe".into(), "1".into())]);

        let plain = HTTPGetAction {
            port: IntOrString::Int(8080),
            host: Some("fd00::9".into()),
            ..HTTPGetAction::default()
        };
        let probe =
            HttpProbe::from_action(&plain, &[], ip, Duration::from_secs(1)).expect("valid probe");
        assert_eq!(probe.url.to_string(), "http://[fd00::9]:8080/");

        let unknown = HTTPGetAction {
            port: IntOrString::String("metrics".into()),
            ..HTTPGetAction::default()
        };
        assert!(matches!(
            HttpProbe::from_action(&unknown, &ports, ip, Duration::from_secs(1)),
            Err(HttpError::Port(_))
        ));
        let ftp = HTTPGetAction {
            scheme: Some("FTP".into()),
            ..plain
        };
        assert!(matches!(
            HttpProbe::from_action(&ftp, &[], ip, Duration::from_secs(1)),
            Err(HttpError::Scheme(_))
        ));
    }
}
