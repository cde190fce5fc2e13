//! Arbitrary bytes as an app's `Location` header, through the function that decides where an
//! httpGet probe's redirect leads and whether it is followed, by the kubelet's rules (`decide`):
//! nothing panics; a redirect is followed only to the host of the probe's first request, only
//! before the tenth request, and keeps the scheme when the `Location` has none; a followed URL's
//! target is one a request line can carry, and given back as a `Location` it leads to itself; a
//! path-only `Location` on the first request's host is always followed (or fails as the tenth).
//!
//! The bytes are the path of the request redirected from (given to `Url::for_probe`, as a probe's
//! path), a newline, then the `Location`. The first byte picks the number of requests made so far
//! (1-10, bits 0-3), whether the request redirected from went to another host than the first one
//! (bit 4), its scheme (bit 5) and its host (bits 6-7: an IPv4 address, an IPv6 one or a name).
#![no_main]

use libfuzzer_sys::fuzz_target;
use probe_bypass::serve::prober::fuzzing::{
    Decision, MAX_REQUESTS, RedirectError, Scheme, Url, decide,
};

const HOSTS: [&str; 3] = ["10.1.2.3", "fd00::5", "shop.example"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    // A header's value reaches the rule as text (the prober reads it lossily).
    let text = String::from_utf8_lossy(bytes);
    let (path, location) = text.split_once('\n').unwrap_or(("/healthz", &text));
    let requests = 1 + usize::from(selector & 0x0f) % MAX_REQUESTS;
    let scheme = if selector & 0x20 == 0 {
        Scheme::Http
    } else {
        Scheme::Https
    };
    let first_host = HOSTS[usize::from(selector >> 6) % HOSTS.len()];
    let current_host = if selector & 0x10 == 0 {
        first_host
    } else {
        "10.9.9.9"
    };
    let current = Url::for_probe(scheme, current_host, 8080, path);
    check_target(&current.target);
    let decided = decide(first_host, &current, requests, location);
    let path_only = location.starts_with('/') && !location.starts_with("//");
    if path_only && current_host == first_host {
        assert!(
            matches!(
                decided,
                Ok(Decision::Follow { .. }) | Err(RedirectError::TooMany)
            ),
            "{location:?} from {current}: {decided:?}"
        );
    }
    match decided {
        Ok(Decision::Follow { url, relative }) => {
            assert!(requests < MAX_REQUESTS, "followed as request {requests}");
            assert_eq!(url.host, first_host, "{location:?} followed to {url}");
            if relative {
                assert_eq!(url.scheme, current.scheme, "{location:?}");
            }
            check_target(&url.target);
            let again = decide(first_host, &url, 1, &url.to_string());
            assert_eq!(
                again,
                Ok(Decision::Follow {
                    url: url.clone(),
                    relative: false
                }),
                "{url} does not lead to itself"
            );
        }
        Ok(Decision::NotFollowed) => {}
        Err(RedirectError::TooMany) => assert!(requests >= MAX_REQUESTS),
        Err(error) => assert!(!error.to_string().is_empty()),
    }
});

/// A request target a request line can carry: starting with `/`, with no byte that would end or
/// break the line.
fn check_target(target: &str) {
    assert!(target.starts_with('/'), "{target:?}");
    let line = format!("GET {target} HTTP/1.1\r\n\r\n");
    let mut headers = [httparse::EMPTY_HEADER; 1];
    let mut request = httparse::Request::new(&mut headers);
    assert!(
        matches!(
            request.parse(line.as_bytes()),
            Ok(httparse::Status::Complete(_))
        ),
        "{target:?} breaks the request line"
    );
    assert_eq!(request.path, Some(target));
    assert!(!target.contains('#'), "a fragment is not sent: {target:?}");
}
