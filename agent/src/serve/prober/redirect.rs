//! Where an HTTP probe's requests go: the URL the kubelet builds from the probe, and the redirects
//! it follows.
//!
//! The kubelet's rule (kubernetes `pkg/probe/http`, Go's `net/http` client underneath;
//! `shared/reference/peers.md` §5):
//! - 301, 302, 303, 307 and 308 with a `Location` are redirects; any other 3xx, or one of those
//!   without a `Location`, ends the probe on that response.
//! - A redirect is followed only when its host name (without the port) is the first request's host
//!   name, compared as written. Scheme and port may change: `http://10.1.2.3:8080/` to
//!   `https://10.1.2.3:8443/` is followed. A redirect elsewhere is not followed and the probe ends
//!   on the 3xx response, which the kubelet counts as a success with a warning.
//! - At most 10 requests: the redirect answering the tenth fails the probe ("stopped after 10
//!   redirects"), so at most 9 redirects are followed.
//! - A `Location` that cannot be parsed fails the probe, and so does a followed one whose scheme is
//!   neither http nor https.
//! - A relative `Location` is resolved against the URL of the request it answers (RFC 3986; as in
//!   Go, dot segments are removed even from a path taken whole from that URL). The probe's `Host`
//!   header is kept only when the `Location` has no scheme; the other headers are kept on every
//!   followed redirect, and `Referer` names the request redirected from (not after a move from
//!   https to http).

use std::fmt;

/// The most requests one probe makes, redirects included.
pub const MAX_REQUESTS: usize = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn parse(text: &str) -> Option<Self> {
        if text.eq_ignore_ascii_case("http") {
            Some(Self::Http)
        } else if text.eq_ignore_ascii_case("https") {
            Some(Self::Https)
        } else {
            None
        }
    }

    fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// The URL of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    /// A host name or IP address; an IPv6 address without brackets.
    pub host: String,
    pub port: u16,
    /// The request target: path and query, starting with `/`.
    pub target: String,
}

impl Url {
    /// The URL the kubelet probes: scheme, host and port of the probe, and its `path`, which may
    /// carry a query. A path without a leading `/` gets one; characters a request line cannot hold
    /// are percent-encoded, as Go's URL parser does.
    pub fn for_probe(scheme: Scheme, host: &str, port: u16, path: &str) -> Self {
        let path = path.split_once('#').map_or(path, |(path, _)| path);
        let target = if path.starts_with('/') {
            escape(path)
        } else {
            format!("/{}", escape(path))
        };
        Self {
            scheme,
            host: host.to_owned(),
            port,
            target,
        }
    }

    /// `host:port`, with brackets around an IPv6 address: the `Host` header's value.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(path, _)| path)
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{}{}",
            self.scheme.as_str(),
            self.authority(),
            self.target
        )
    }
}

/// Why a redirect fails the probe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot parse the Location header {location:?}: {reason}")]
    Location {
        location: String,
        reason: &'static str,
    },
    #[error("stopped after {MAX_REQUESTS} redirects")]
    TooMany,
    #[error("redirect to {location:?}: unsupported protocol scheme {scheme:?}")]
    Scheme { location: String, scheme: String },
}

/// What the probe does with a redirect.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Sends the next request to `url`. `relative`: the `Location` has no scheme, so the probe's
    /// own `Host` header still applies (Go's rule, even for `//host/path`).
    Follow { url: Url, relative: bool },
    /// Another host: the probe ends on this response, a success with a warning.
    NotFollowed,
}

/// Decides what to do with a redirect to `location`, which answered the request to `current`;
/// `first_host` is the host of the probe's first request and `requests` the number made so far.
pub fn decide(
    first_host: &str,
    current: &Url,
    requests: usize,
    location: &str,
) -> Result<Decision, RedirectError> {
    let reference = Reference::parse(location)?;
    let relative = reference.scheme.is_none();
    let resolved = reference.resolve(current);
    if resolved.host != first_host {
        return Ok(Decision::NotFollowed);
    }
    if requests >= MAX_REQUESTS {
        return Err(RedirectError::TooMany);
    }
    let scheme = Scheme::parse(&resolved.scheme).ok_or_else(|| RedirectError::Scheme {
        location: location.to_owned(),
        scheme: resolved.scheme.clone(),
    })?;
    let url = Url {
        scheme,
        host: resolved.host,
        port: resolved.port.unwrap_or(scheme.default_port()),
        target: resolved.target,
    };
    Ok(Decision::Follow { url, relative })
}

/// The `Referer` of a request redirected from `from` to `to`: none from https to http, as browsers
/// and Go do, so as not to leak an https URL over plaintext.
pub fn referer(from: &Url, to: &Url) -> Option<String> {
    (from.scheme == to.scheme || to.scheme == Scheme::Https).then(|| from.to_string())
}

/// A `Location` value taken apart (RFC 3986 §3), before it is resolved.
struct Reference<'a> {
    scheme: Option<&'a str>,
    /// Host (brackets removed) and port, when the reference names an authority.
    authority: Option<(String, Option<u16>)>,
    path: String,
    query: Option<&'a str>,
}

/// A resolved `Location`, whose scheme may still be one the probe cannot follow.
struct Resolved {
    scheme: String,
    host: String,
    port: Option<u16>,
    target: String,
}

impl<'a> Reference<'a> {
    fn parse(location: &'a str) -> Result<Self, RedirectError> {
        let invalid = |reason| RedirectError::Location {
            location: location.to_owned(),
            reason,
        };
        let rest = location.split_once('#').map_or(location, |(rest, _)| rest);
        let (scheme, rest) = match rest.split_once(':') {
            Some((scheme, rest)) if is_scheme(scheme) => (Some(scheme), rest),
            _ => (None, rest),
        };
        let (authority, rest) = match rest.strip_prefix("//") {
            Some(rest) => {
                let end = rest.find(['/', '?']).unwrap_or(rest.len());
                let (authority, rest) = rest.split_at(end);
                (Some(parse_authority(authority).map_err(invalid)?), rest)
            }
            None => (None, rest),
        };
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        Ok(Self {
            scheme,
            authority,
            path: escape(path),
            query,
        })
    }

    /// Resolves the reference against `base` (RFC 3986 §5.2.2), as Go's `ResolveReference` does.
    fn resolve(self, base: &Url) -> Resolved {
        let (host, port, path, query) = match (self.scheme, self.authority) {
            (_, Some((host, port))) => (host, port, remove_dot_segments(&self.path), self.query),
            // A scheme without an authority (`mailto:x`) names no host at all.
            (Some(_), None) => (String::new(), None, self.path, self.query),
            (None, None) => {
                // Go removes the dot segments of a path taken whole from the base too, where
                // RFC 3986 leaves it as it is: the probe's own path is sent as written.
                let path = if self.path.is_empty() {
                    remove_dot_segments(base.path())
                } else if self.path.starts_with('/') {
                    remove_dot_segments(&self.path)
                } else {
                    let base_path = base.path();
                    let directory = base_path.rfind('/').map_or("/", |i| &base_path[..=i]);
                    remove_dot_segments(&format!("{directory}{}", self.path))
                };
                let query = match (self.path.is_empty(), self.query) {
                    (true, None) => base.target.split_once('?').map(|(_, query)| query),
                    (_, query) => query,
                };
                (base.host.clone(), Some(base.port), path, query)
            }
        };
        let path = if path.is_empty() {
            "/".to_owned()
        } else {
            path
        };
        let target = match query {
            Some(query) => format!("{path}?{}", escape(query)),
            None => path,
        };
        Resolved {
            scheme: self
                .scheme
                .map_or(base.scheme.as_str().to_owned(), str::to_ascii_lowercase),
            host,
            port,
            target,
        }
    }
}

fn is_scheme(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Host and port of an authority (`user@host:port`; the user part is dropped).
fn parse_authority(authority: &str) -> Result<(String, Option<u16>), &'static str> {
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host_port)| host_port);
    let (host, port) = match host_port.strip_prefix('[') {
        Some(bracketed) => {
            let (host, rest) = bracketed
                .split_once(']')
                .ok_or("an IPv6 address without its closing bracket")?;
            match rest {
                "" => (host, None),
                rest => (
                    host,
                    Some(
                        rest.strip_prefix(':')
                            .ok_or("junk after the IPv6 address")?,
                    ),
                ),
            }
        }
        None => match host_port.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (host_port, None),
        },
    };
    let port = match port {
        None | Some("") => None,
        Some(port) => Some(port.parse::<u16>().map_err(|_| "an invalid port")?),
    };
    Ok((host.to_owned(), port))
}

/// Removes `.` and `..` segments from an absolute path (RFC 3986 §5.2.4).
fn remove_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match *segment {
            "." | ".." => {
                if *segment == ".." {
                    out.pop();
                }
                // A path ending in a dot segment names a directory: keep its trailing slash.
                if last {
                    out.push("");
                }
            }
            segment => out.push(segment),
        }
    }
    format!("/{}", out.join("/"))
}

/// Percent-encodes the bytes a request target cannot hold (spaces, quotes, controls, non-ASCII),
/// leaving existing escapes as they are.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        let allowed = byte.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&byte);
        if allowed {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str) -> Url {
        let (scheme, rest) = text.split_once("://").expect("scheme");
        let scheme = Scheme::parse(scheme).expect("http or https");
        let (authority, target) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = parse_authority(authority).expect("authority");
        Url {
            scheme,
            host,
            port: port.unwrap_or(scheme.default_port()),
            target: if target.is_empty() {
                "/".into()
            } else {
                target.into()
            },
        }
    }

    fn follow(base: &str, location: &str) -> String {
        match decide(&url(base).host, &url(base), 1, location) {
            Ok(Decision::Follow { url, .. }) => url.to_string(),
            other => panic!("{location}: {other:?}"),
        }
    }

    #[test]
    fn the_probe_url_is_the_kubelets() {
        let probe = Url::for_probe(Scheme::Http, "10.1.2.3", 8080, "/healthz?full=1#top");
        assert_eq!(probe.to_string(), "http://10.1.2.3:8080/healthz?full=1");
        assert_eq!(
            Url::for_probe(Scheme::Https, "fd00::5", 8443, "").to_string(),
            "https://[fd00::5]:8443/"
        );
        assert_eq!(
            Url::for_probe(Scheme::Http, "10.1.2.3", 80, "health check").target,
            "/health%20check"
        );
        assert_eq!(
            Url::for_probe(Scheme::Http, "h", 80, "/a%2Fb").target,
            "/a%2Fb"
        );
    }

    #[test]
    fn relative_locations_resolve_against_the_request_url() {
        let base = "http://10.1.2.3:8080/app/health?x=1";
        assert_eq!(follow(base, "/ok"), "http://10.1.2.3:8080/ok");
        assert_eq!(follow(base, "ready"), "http://10.1.2.3:8080/app/ready");
        assert_eq!(
            follow(base, "../ready?y=2"),
            "http://10.1.2.3:8080/ready?y=2"
        );
        assert_eq!(follow(base, "./"), "http://10.1.2.3:8080/app/");
        assert_eq!(follow(base, "?y=2"), "http://10.1.2.3:8080/app/health?y=2");
        assert_eq!(follow(base, ""), "http://10.1.2.3:8080/app/health?x=1");
        assert_eq!(follow(base, "/a/./b/../c#frag"), "http://10.1.2.3:8080/a/c");
        assert_eq!(follow(base, "//10.1.2.3:9090/x"), "http://10.1.2.3:9090/x");
    }

    #[test]
    fn a_location_without_a_path_drops_the_dot_segments_of_the_request_path() {
        // The probe's own path is sent as written; Go's client resolves a redirect's path through
        // its dot-segment removal even when the Location has no path of its own.
        let base = "http://10.1.2.3:8080/app/../health/./?x=1";
        assert_eq!(follow(base, "?y=2"), "http://10.1.2.3:8080/health/?y=2");
        assert_eq!(follow(base, ""), "http://10.1.2.3:8080/health/?x=1");
        assert_eq!(follow(base, "#top"), "http://10.1.2.3:8080/health/?x=1");
    }

    #[test]
    fn same_host_is_followed_whatever_the_scheme_and_port() {
        let base = "http://10.1.2.3:8080/";
        assert_eq!(
            follow(base, "https://10.1.2.3:8443/secure"),
            "https://10.1.2.3:8443/secure"
        );
        assert_eq!(follow(base, "HTTPS://10.1.2.3"), "https://10.1.2.3:443/");
        assert_eq!(follow(base, "http://user@10.1.2.3/"), "http://10.1.2.3:80/");
        assert_eq!(
            follow("http://[fd00::5]:80/", "http://[fd00::5]:81/v6"),
            "http://[fd00::5]:81/v6"
        );
        let relative = decide("10.1.2.3", &url(base), 1, "/ok").expect("decided");
        assert!(matches!(relative, Decision::Follow { relative: true, .. }));
        let absolute = decide("10.1.2.3", &url(base), 1, "http://10.1.2.3/ok").expect("decided");
        assert!(matches!(
            absolute,
            Decision::Follow {
                relative: false,
                ..
            }
        ));
    }

    #[test]
    fn another_host_is_not_followed_even_when_it_is_the_same_machine() {
        let base = url("http://10.1.2.3:8080/");
        for location in [
            "http://10.9.9.9:8080/",
            "http://localhost:8080/",
            "http://127.0.0.1:8080/",
            "//example.com/x",
            "ftp://example.com/x",
            "mailto:ops@10.1.2.3",
        ] {
            assert_eq!(
                decide("10.1.2.3", &base, 1, location),
                Ok(Decision::NotFollowed),
                "{location}"
            );
        }
        // The rule compares with the first request's host, not the one redirected from.
        let moved = url("http://10.1.2.3:9090/");
        assert!(matches!(
            decide("10.1.2.3", &moved, 2, "/x"),
            Ok(Decision::Follow { .. })
        ));
    }

    #[test]
    fn the_tenth_redirect_fails_the_probe() {
        let base = url("http://10.1.2.3:8080/loop");
        assert!(matches!(
            decide("10.1.2.3", &base, MAX_REQUESTS - 1, "/loop"),
            Ok(Decision::Follow { .. })
        ));
        assert_eq!(
            decide("10.1.2.3", &base, MAX_REQUESTS, "/loop"),
            Err(RedirectError::TooMany)
        );
        // A redirect elsewhere is a stop before the count is looked at.
        assert!(matches!(
            decide("10.1.2.3", &base, MAX_REQUESTS, "http://10.9.9.9/"),
            Ok(Decision::NotFollowed)
        ));
    }

    #[test]
    fn bad_locations_and_schemes_fail_the_probe() {
        let base = url("http://10.1.2.3:8080/");
        assert!(matches!(
            decide("10.1.2.3", &base, 1, "http://10.1.2.3:http/"),
            Err(RedirectError::Location { .. })
        ));
        assert!(matches!(
            decide("10.1.2.3", &base, 1, "http://[fd00::1/"),
            Err(RedirectError::Location { .. })
        ));
        assert!(matches!(
            decide("10.1.2.3", &base, 1, "ftp://10.1.2.3/x"),
            Err(RedirectError::Scheme { .. })
        ));
    }

    #[test]
    fn referer_names_the_previous_url_except_from_https_to_http() {
        let http = url("http://10.1.2.3:8080/a");
        let https = url("https://10.1.2.3:8443/b");
        assert_eq!(
            referer(&http, &https).as_deref(),
            Some("http://10.1.2.3:8080/a")
        );
        assert_eq!(
            referer(&https, &https).as_deref(),
            Some("https://10.1.2.3:8443/b")
        );
        assert_eq!(referer(&https, &http), None);
    }
}
