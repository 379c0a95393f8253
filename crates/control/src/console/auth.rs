//! Who may see the console: the admin client certificate, or a session opened with a login
//! token that `bulkhead console token` minted.
//!
//! A login token is single use and short-lived (15 minutes unless asked otherwise, at most
//! an hour); it is bound to the admin identity (and claimed user) that minted it, and so is
//! the session it is exchanged for. The exchange is a POST from the console's own origin;
//! the session travels only in an HttpOnly, SameSite=Strict cookie (`__Host-` and Secure
//! over HTTPS). Tokens and sessions are kept in memory as SHA-256 hashes, never logged, and
//! end with the process.
//!
//! It must never let a request through without one of the two credentials, and never turn
//! a failed check into anything but a 401 or 403 without data.

use crate::proxies::unix_now;
use crate::service::State;
use base64::Engine;
use bulkhead_api::v1 as pb;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tonic::{Request, Response, Status};

pub(super) const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
pub(super) const MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// How long a session lasts from login; then the operator mints a new token.
pub(super) const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
/// Login tokens waiting to be exchanged; more are refused until some expire or are used.
const MAX_PENDING_TOKENS: usize = 256;
/// Open sessions; past this, the oldest is closed to make room.
const MAX_SESSIONS: usize = 64;
/// Failed logins within a minute before every login is refused for the rest of it.
const MAX_FAILURES_PER_MINUTE: u32 = 20;

/// The session cookie over HTTPS: `__Host-` makes the browser require Secure, Path=/ and no
/// Domain.
pub(super) const SECURE_COOKIE: &str = "__Host-bulkhead-session";
/// The session cookie over plain HTTP on loopback.
pub(super) const PLAIN_COOKIE: &str = "bulkhead-session";

type Hash = [u8; 32];

#[derive(Default)]
pub(super) struct Auth {
    tokens: Mutex<HashMap<Hash, Pending>>,
    sessions: Mutex<HashMap<Hash, Session>>,
    failures: Mutex<(u64, u32)>,
    closings: Closings,
}

/// Counts sessions closed (logged out or evicted), so that live streams check theirs at once.
struct Closings(tokio::sync::watch::Sender<u64>);

impl Default for Closings {
    fn default() -> Closings {
        Closings(tokio::sync::watch::channel(0).0)
    }
}

struct Pending {
    actor: String,
    expires_unix: u64,
}

#[derive(Clone, Debug)]
struct Session {
    actor: String,
    opened_unix: u64,
    expires_unix: u64,
}

/// Who is looking, and by which credential.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Access {
    pub actor: String,
    /// `certificate` or `session`.
    pub via: &'static str,
    /// When the session ends (Unix seconds); 0 for the certificate.
    pub expires_unix: u64,
    #[serde(skip)]
    pub session: Option<Hash>,
}

/// Why a login was refused; the text is what the person at the browser reads.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum LoginError {
    #[error(
        "this login token is unknown, used or expired; mint a new one with `bulkhead console token`"
    )]
    Unknown,
    #[error("too many failed logins in the last minute; wait a minute and try again")]
    Throttled,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The maps hold no invariant a panicking holder could break halfway.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn hash(secret: &str) -> Hash {
    Sha256::digest(secret.as_bytes()).into()
}

fn secret() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A prefix of the hash, to tell tokens and sessions apart in logs without revealing them.
fn tag(h: &Hash) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

impl Auth {
    /// Mints a login token for `actor`, valid for `ttl`.
    pub(super) fn mint(&self, actor: &str, ttl: Duration, now: u64) -> Result<String, Status> {
        let mut tokens = lock(&self.tokens);
        tokens.retain(|_, t| t.expires_unix > now);
        if tokens.len() >= MAX_PENDING_TOKENS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_PENDING_TOKENS} console login tokens are waiting to be used; use one, or wait until they expire"
            )));
        }
        let token = secret();
        let h = hash(&token);
        tokens.insert(
            h,
            Pending {
                actor: actor.to_string(),
                expires_unix: now + ttl.as_secs(),
            },
        );
        tracing::info!(
            actor,
            token = tag(&h),
            ttl_s = ttl.as_secs(),
            "console login token minted"
        );
        Ok(token)
    }

    /// Spends `token` (whatever happens next, it cannot be used again) and opens a session
    /// for the actor it was bound to; returns the session's secret and its access.
    pub(super) fn exchange(&self, token: &str, now: u64) -> Result<(String, Access), LoginError> {
        {
            let mut failures = lock(&self.failures);
            if now / 60 != failures.0 {
                *failures = (now / 60, 0);
            }
            if failures.1 >= MAX_FAILURES_PER_MINUTE {
                return Err(LoginError::Throttled);
            }
        }
        let pending = lock(&self.tokens)
            .remove(&hash(token.trim()))
            .filter(|p| p.expires_unix > now);
        let Some(pending) = pending else {
            lock(&self.failures).1 += 1;
            return Err(LoginError::Unknown);
        };
        let id = secret();
        let h = hash(&id);
        let session = Session {
            actor: pending.actor,
            opened_unix: now,
            expires_unix: now + SESSION_LIFETIME.as_secs(),
        };
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, s| s.expires_unix > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.opened_unix)
                .map(|(k, _)| *k)
        {
            sessions.remove(&oldest);
            self.closings.0.send_modify(|n| *n += 1);
            tracing::warn!(
                max = MAX_SESSIONS,
                session = tag(&oldest),
                "console sessions at their bound: closed the oldest"
            );
        }
        sessions.insert(h, session.clone());
        tracing::info!(
            actor = session.actor,
            session = tag(&h),
            "console session opened"
        );
        Ok((
            id,
            Access {
                actor: session.actor,
                via: "session",
                expires_unix: session.expires_unix,
                session: Some(h),
            },
        ))
    }

    /// The session a cookie value names, if it is open.
    pub(super) fn session(&self, id: &str, now: u64) -> Option<Access> {
        let h = hash(id);
        let sessions = lock(&self.sessions);
        let s = sessions.get(&h).filter(|s| s.expires_unix > now)?;
        Some(Access {
            actor: s.actor.clone(),
            via: "session",
            expires_unix: s.expires_unix,
            session: Some(h),
        })
    }

    /// Whether the session behind `access` is still open (a certificate always is).
    pub(super) fn still_open(&self, access: &Access, now: u64) -> bool {
        match &access.session {
            None => true,
            Some(h) => lock(&self.sessions)
                .get(h)
                .is_some_and(|s| s.expires_unix > now),
        }
    }

    pub(super) fn close(&self, access: &Access) {
        if let Some(h) = &access.session
            && let Some(s) = lock(&self.sessions).remove(h)
        {
            tracing::info!(actor = s.actor, session = tag(h), "console session closed");
            self.closings.0.send_modify(|n| *n += 1);
        }
    }

    /// Changes whenever a session is closed: a live stream then checks its own.
    pub(super) fn closings(&self) -> tokio::sync::watch::Receiver<u64> {
        self.closings.0.subscribe()
    }
}

/// `Admin.CreateConsoleToken`: needs the admin credential, like every admin call.
pub(crate) fn create_token(
    state: &State,
    req: Request<pb::CreateConsoleTokenRequest>,
) -> Result<Response<pb::CreateConsoleTokenResponse>, Status> {
    let actor = state.require_admin(&req)?;
    let Some(served) = state.console.served() else {
        return Err(Status::failed_precondition(
            "this control plane serves no console; start it with --console ADDR (e.g. --console 127.0.0.1:7445)",
        ));
    };
    let ttl = match req.into_inner().ttl_seconds {
        0 => DEFAULT_TOKEN_TTL,
        s => Duration::from_secs(s),
    };
    if ttl > MAX_TOKEN_TTL {
        return Err(Status::invalid_argument(format!(
            "a console login token may live at most {} minutes; it is only for logging in (the session lasts {} hours)",
            MAX_TOKEN_TTL.as_secs() / 60,
            SESSION_LIFETIME.as_secs() / 3600
        )));
    }
    let now = unix_now();
    let token = state.console.auth.mint(&actor, ttl, now)?;
    Ok(Response::new(pb::CreateConsoleTokenResponse {
        login_url: format!("{}#token={token}", served.url),
        token,
        expires_unix: now + ttl.as_secs(),
        console_url: served.url.clone(),
    }))
}

/// The value of cookie `name` in the request's Cookie headers.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The Set-Cookie value that opens (`Some(id)`) or ends (`None`) a session.
pub(super) fn set_cookie(secure: bool, id: Option<&str>) -> String {
    let (name, flags) = match secure {
        true => (SECURE_COOKIE, "; Secure"),
        false => (PLAIN_COOKIE, ""),
    };
    match id {
        Some(id) => format!(
            "{name}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{flags}",
            SESSION_LIFETIME.as_secs()
        ),
        None => format!("{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{flags}"),
    }
}

/// Whether a state-changing request comes from the console's own pages: its Origin is one
/// of `origins`, or, without an Origin, the browser says it is same-origin. A request with
/// neither is refused: browsers send one or the other, and nothing but a browser logs in.
pub(super) fn same_origin(headers: &HeaderMap, origins: &[String]) -> bool {
    match headers.get(http::header::ORIGIN).map(|v| v.to_str()) {
        Some(Ok(origin)) => origins.iter().any(|o| o == origin),
        Some(Err(_)) => false,
        None => headers
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"same-origin"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_token_opens_one_session_for_the_actor_that_minted_it() {
        let auth = Auth::default();
        let token = auth
            .mint("admin (user alice)", DEFAULT_TOKEN_TTL, 1_000)
            .unwrap();
        let (id, access) = auth.exchange(&token, 1_010).unwrap();
        assert_eq!(access.actor, "admin (user alice)");
        assert_eq!(access.expires_unix, 1_010 + SESSION_LIFETIME.as_secs());
        assert_eq!(
            auth.exchange(&token, 1_011),
            Err(LoginError::Unknown),
            "single use"
        );
        let seen = auth.session(&id, 1_020).unwrap();
        assert_eq!(seen.actor, "admin (user alice)");
        assert!(auth.session("not-a-session", 1_020).is_none());
        assert!(auth.still_open(&seen, 1_020));
        // A live stream hears of every closed session, to check its own at once.
        let closings = auth.closings();
        assert!(!closings.has_changed().unwrap());
        auth.close(&seen);
        assert!(
            closings.has_changed().unwrap(),
            "logging out wakes live streams"
        );
        assert!(!auth.still_open(&seen, 1_021));
        assert!(!auth.still_open(&seen, 1_020));
        assert!(auth.session(&id, 1_020).is_none(), "closed");
    }

    #[test]
    fn tokens_and_sessions_expire() {
        let auth = Auth::default();
        let token = auth.mint("admin", Duration::from_secs(60), 1_000).unwrap();
        assert_eq!(auth.exchange(&token, 1_060), Err(LoginError::Unknown));
        let token = auth.mint("admin", Duration::from_secs(60), 1_000).unwrap();
        let (id, _) = auth.exchange(&token, 1_001).unwrap();
        let end = 1_001 + SESSION_LIFETIME.as_secs();
        assert!(auth.session(&id, end - 1).is_some());
        assert!(auth.session(&id, end).is_none());
    }

    #[test]
    fn guessing_is_throttled() {
        let auth = Auth::default();
        for _ in 0..MAX_FAILURES_PER_MINUTE {
            assert_eq!(auth.exchange("guess", 6_000), Err(LoginError::Unknown));
        }
        let token = auth.mint("admin", DEFAULT_TOKEN_TTL, 6_000).unwrap();
        assert_eq!(auth.exchange(&token, 6_001), Err(LoginError::Throttled));
        assert!(auth.exchange(&token, 6_060).is_ok(), "the next minute");
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes_first() {
        let auth = Auth::default();
        let mut ids = Vec::new();
        for i in 0..=MAX_SESSIONS as u64 {
            let token = auth.mint("admin", DEFAULT_TOKEN_TTL, 1_000 + i).unwrap();
            ids.push(auth.exchange(&token, 1_000 + i).unwrap().0);
        }
        assert!(
            auth.session(&ids[0], 2_000).is_none(),
            "the oldest was closed"
        );
        assert!(ids[1..].iter().all(|id| auth.session(id, 2_000).is_some()));
    }

    #[test]
    fn cookies_and_origins() {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::COOKIE,
            "a=1; __Host-bulkhead-session=xyz; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, SECURE_COOKIE), Some("xyz"));
        assert_eq!(cookie(&h, PLAIN_COOKIE), None);
        let set = set_cookie(true, Some("xyz"));
        assert!(set.starts_with("__Host-bulkhead-session=xyz; Path=/; HttpOnly; SameSite=Strict"));
        assert!(set.ends_with("; Secure"));
        assert!(!set_cookie(false, Some("xyz")).contains("Secure"));
        assert!(set_cookie(false, None).contains("Max-Age=0"));

        let origins = vec!["https://127.0.0.1:7445".to_string()];
        let mut h = HeaderMap::new();
        assert!(!same_origin(&h, &origins), "neither header: refused");
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(same_origin(&h, &origins));
        h.insert(
            http::header::ORIGIN,
            "https://evil.example".parse().unwrap(),
        );
        assert!(!same_origin(&h, &origins), "a foreign Origin wins");
        h.insert(
            http::header::ORIGIN,
            "https://127.0.0.1:7445".parse().unwrap(),
        );
        assert!(same_origin(&h, &origins));
    }
}
