//! Who may read the admin answers that name pods, on the HTTPS admin address.
//!
//! As Kubernetes' own components and controller-runtime's secure metrics do, the API server
//! decides: the caller's bearer token is checked with a TokenReview, and the user it names must be
//! allowed `get` on the request's path (a non-resource URL, such as `/metrics`) by a
//! SubjectAccessReview. The agent keeps no list of users or tokens of its own.
//!
//! A verdict is kept for a while per token and path ([`ALLOWED_FOR`], [`REFUSED_FOR`]), so that a
//! scrape every 15 s costs two reviews a minute, not eight. An API server that cannot be asked
//! refuses the request (503) and is asked again at the next one: an error is not kept. At most
//! [`REVIEWS_AT_ONCE`] reviews are in flight, so a flood of made-up tokens waits its turn rather
//! than flooding the API server.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, UserInfo},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};
use tokio::{sync::Semaphore, time::Instant};

use crate::error::error_chain;

/// How long an allowed token and path stay allowed without asking again: as long as
/// controller-runtime keeps an authenticated token, so a revoked token is refused within a minute.
pub const ALLOWED_FOR: Duration = Duration::from_secs(60);

/// How long a refused token and path stay refused without asking again.
pub const REFUSED_FOR: Duration = Duration::from_secs(10);

/// Verdicts kept at most; when full, the one that expires first makes room.
const MAX_KEPT: usize = 1024;

/// Reviews in flight at most.
const REVIEWS_AT_ONCE: usize = 4;

/// Bound on waiting for a turn and for both reviews.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// The verb a GET or HEAD asks for, as the API server's own filter names it.
const VERB: &str = "get";

/// What the API server said of a caller: the user its token names, which may `get` the path, or
/// why it may not.
pub type Verdict = Result<String, Refusal>;

/// Why a caller may not `get` a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No bearer token, or one the API server does not accept (401).
    Unauthenticated { reason: String },
    /// The token is good, but its user may not `get` the path (403).
    Forbidden { user: String, reason: String },
    /// The reviews could not be made (503); nothing is kept.
    Unavailable { reason: String },
}

/// Asks the API server about callers, and keeps its verdicts for a while.
pub struct Reviewer {
    client: Client,
    kept: Mutex<Kept>,
    turns: Semaphore,
}

impl Reviewer {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            kept: Mutex::new(Kept::default()),
            turns: Semaphore::new(REVIEWS_AT_ONCE),
        }
    }

    /// Whether the caller that sent `authorization` (the header's value, if any) may `get` `path`.
    pub async fn check(&self, authorization: Option<&[u8]>, path: &str) -> Verdict {
        let Some(token) = authorization.and_then(bearer_token) else {
            return Err(Refusal::Unauthenticated {
                reason: "no bearer token (send `Authorization: Bearer <token>`)".to_owned(),
            });
        };
        let key = (token.to_owned(), path.to_owned());
        if let Some(verdict) = self.kept().get(&key, Instant::now()) {
            return verdict;
        }
        let verdict = match tokio::time::timeout(REVIEW_TIMEOUT, self.review(token, path)).await {
            Ok(verdict) => verdict,
            Err(_) => Err(Refusal::Unavailable {
                reason: format!("the API server did not answer within {REVIEW_TIMEOUT:?}"),
            }),
        };
        match &verdict {
            Ok(user) => log::debug!("admin: {user} may get {path}"),
            Err(Refusal::Unavailable { reason }) => {
                log::warn!("admin: refused a request for {path}: cannot check its token: {reason}");
            }
            Err(refused) => log::info!("admin: refused a request for {path}: {refused:?}"),
        }
        self.kept().put(key, verdict.clone(), Instant::now());
        verdict
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn review(&self, token: &str, path: &str) -> Verdict {
        let Ok(_turn) = self.turns.acquire().await else {
            return Err(Refusal::Unavailable {
                reason: "the agent is stopping".to_owned(),
            });
        };
        let user = match self.authenticate(token).await {
            Ok(Ok(user)) => user,
            Ok(Err(reason)) => return Err(Refusal::Unauthenticated { reason }),
            Err(error) => return unavailable("TokenReview", "tokenreviews", &error),
        };
        let name = user.username.clone().unwrap_or_default();
        match self.authorize(user, path).await {
            Ok(Ok(())) => Ok(name),
            Ok(Err(reason)) => Err(Refusal::Forbidden { user: name, reason }),
            Err(error) => unavailable("SubjectAccessReview", "subjectaccessreviews", &error),
        }
    }

    /// The token's user, or why the API server does not accept the token.
    async fn authenticate(&self, token: &str) -> Result<Result<UserInfo, String>, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = answer.status.unwrap_or_default();
        Ok(match (status.authenticated, status.user) {
            (Some(true), Some(user)) if user.username.is_some() => Ok(user),
            _ => Err(status
                .error
                .filter(|error| !error.is_empty())
                .unwrap_or_else(|| "the API server does not accept the token".to_owned())),
        })
    }

    /// Whether `user` may `get` `path`, or why not.
    async fn authorize(
        &self,
        user: UserInfo,
        path: &str,
    ) -> Result<Result<(), String>, kube::Error> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_owned()),
                    verb: Some(VERB.to_owned()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = answer.status.unwrap_or_default();
        if status.allowed {
            return Ok(Ok(()));
        }
        let reason = [status.reason, status.evaluation_error]
            .into_iter()
            .flatten()
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        Ok(Err(if reason.is_empty() {
            format!("no RBAC rule allows `{VERB}` on the non-resource URL {path}")
        } else {
            reason
        }))
    }
}

fn unavailable(review: &str, resource: &str, error: &kube::Error) -> Verdict {
    let hint = match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            " (the agent's ClusterRole must allow `create` on {resource}; see deploy/rbac.yaml)"
        ),
        _ => String::new(),
    };
    Err(Refusal::Unavailable {
        reason: format!("{review} failed: {}{hint}", error_chain(error)),
    })
}

/// The token of an `Authorization: Bearer <token>` header's value (the scheme in any case).
fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

/// Verdicts by token and path, each until it expires.
#[derive(Default)]
struct Kept {
    verdicts: HashMap<(String, String), (Verdict, Instant)>,
}

impl Kept {
    fn get(&mut self, key: &(String, String), now: Instant) -> Option<Verdict> {
        match self.verdicts.get(key) {
            Some((verdict, until)) if *until > now => Some(verdict.clone()),
            Some(_) => {
                self.verdicts.remove(key);
                None
            }
            None => None,
        }
    }

    fn put(&mut self, key: (String, String), verdict: Verdict, now: Instant) {
        let keep_for = match verdict {
            Ok(_) => ALLOWED_FOR,
            Err(Refusal::Unauthenticated { .. } | Refusal::Forbidden { .. }) => REFUSED_FOR,
            Err(Refusal::Unavailable { .. }) => return,
        };
        if self.verdicts.len() >= MAX_KEPT && !self.verdicts.contains_key(&key) {
            self.verdicts.retain(|_, (_, until)| *until > now);
            if self.verdicts.len() >= MAX_KEPT {
                let first = self
                    .verdicts
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(key, _)| key.clone());
                if let Some(first) = first {
                    self.verdicts.remove(&first);
                }
            }
        }
        self.verdicts.insert(key, (verdict, now + keep_for));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bearer_header_with_one_token_gives_a_token() {
        assert_eq!(bearer_token(b"Bearer abc.def"), Some("abc.def"));
        assert_eq!(bearer_token(b"bearer  abc "), Some("abc"));
        assert_eq!(bearer_token(b"Basic dXNlcjpwYXNz"), None);
        assert_eq!(bearer_token(b"Bearer"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer a b"), None);
        assert_eq!(bearer_token(b"Bearer \xff"), None);
    }

    fn key(token: &str) -> (String, String) {
        (token.to_owned(), "/metrics".to_owned())
    }

    fn allowed() -> Verdict {
        Ok("system:serviceaccount:monitoring:prometheus".to_owned())
    }

    #[test]
    fn an_allowed_verdict_is_kept_a_minute_a_refusal_ten_seconds_an_error_not_at_all() {
        let now = Instant::now();
        let mut kept = Kept::default();
        let refused = Err(Refusal::Unauthenticated {
            reason: "no".to_owned(),
        });
        kept.put(key("good"), allowed(), now);
        kept.put(key("bad"), refused.clone(), now);
        kept.put(
            key("down"),
            Err(Refusal::Unavailable {
                reason: "connection refused".to_owned(),
            }),
            now,
        );
        let later = |seconds| now + Duration::from_secs(seconds);
        assert_eq!(kept.get(&key("good"), later(59)), Some(allowed()));
        assert_eq!(kept.get(&key("bad"), later(9)), Some(refused));
        assert_eq!(kept.get(&key("down"), now), None);
        assert_eq!(kept.get(&key("bad"), later(10)), None);
        assert_eq!(kept.get(&key("good"), later(60)), None);
        assert!(kept.verdicts.is_empty(), "expired verdicts are dropped");
    }

    #[test]
    fn a_verdict_is_per_path() {
        let now = Instant::now();
        let mut kept = Kept::default();
        kept.put(key("good"), allowed(), now);
        assert_eq!(
            kept.get(&("good".to_owned(), "/health/ready".to_owned()), now),
            None
        );
    }

    #[test]
    fn when_full_the_verdict_that_expires_first_makes_room() {
        let now = Instant::now();
        let mut kept = Kept::default();
        kept.put(key("first"), allowed(), now);
        for i in 1..MAX_KEPT {
            kept.put(
                key(&format!("token-{i}")),
                allowed(),
                now + Duration::from_millis(1),
            );
        }
        assert_eq!(kept.verdicts.len(), MAX_KEPT);
        kept.put(key("new"), allowed(), now + Duration::from_millis(2));
        assert_eq!(kept.verdicts.len(), MAX_KEPT);
        assert_eq!(kept.get(&key("first"), now), None);
        assert_eq!(kept.get(&key("new"), now), Some(allowed()));
    }
}
