//! The explorer's server-side state: signed-in sessions ([`SessionStore`]) and one-time login
//! tokens ([`LoginTokens`]), each a trait with an in-memory implementation. Node-local state
//! sits behind these traits so a cluster mode can share it. Times come from tokio's clock, so
//! expiry can be tested with paused time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// A session ends after this long without a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after sign-in, however busy.
pub const ABSOLUTE_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// A login token not used within this long stops working.
pub const LOGIN_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// Login tokens outstanding at most: each mint beyond drops the oldest, so minting in a loop
/// cannot grow memory.
const MAX_LOGIN_TOKENS: usize = 256;
/// Sessions at most; a sign-in beyond drops the one closest to its end.
const MAX_SESSIONS: usize = 10_000;

/// How long sessions live.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub idle: Duration,
    pub absolute: Duration,
}

impl Default for SessionLimits {
    fn default() -> Self {
        Self {
            idle: IDLE_TIMEOUT,
            absolute: ABSOLUTE_LIFETIME,
        }
    }
}

/// 256 random bits, base64url without padding: session ids, CSRF and login tokens.
pub fn random_token() -> String {
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Secrets are kept by digest: a map lookup by the digest reveals nothing about the secret's
/// prefix through timing, and a memory dump holds no usable session id.
fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The shared access policy the session acts as; its keys are read from the hub per call,
    /// so they are never copied here.
    pub policy: String,
    pub csrf_token: String,
    pub created: Instant,
    pub last_seen: Instant,
}

impl Session {
    /// When the session ends unless used again.
    pub fn deadline(&self, limits: &SessionLimits) -> Instant {
        (self.last_seen + limits.idle).min(self.created + limits.absolute)
    }

    /// Whether `csrf` is this session's CSRF token, compared in constant time.
    pub fn csrf_matches(&self, csrf: &str) -> bool {
        bool::from(self.csrf_token.as_bytes().ct_eq(csrf.as_bytes()))
    }
}

/// Where sessions live, by session id (the cookie's value).
#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Starts a session for `policy`; returns its id and the session.
    async fn create(&self, policy: &str) -> (String, Session);
    /// The live session `id`, its idle time refreshed; `None` when unknown or expired.
    async fn touch(&self, id: &str) -> Option<Session>;
    /// Ends session `id`, if any.
    async fn remove(&self, id: &str);
    /// Drops every expired session; returns how many.
    async fn sweep(&self) -> usize;
    /// The limits sessions are held to.
    fn limits(&self) -> SessionLimits;
}

/// Sessions in this process's memory.
pub struct MemorySessions {
    limits: SessionLimits,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

impl MemorySessions {
    pub fn new(limits: SessionLimits) -> Self {
        Self {
            limits,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        // No invariant spans entries, so a panicked holder leaves nothing half-done.
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl SessionStore for MemorySessions {
    async fn create(&self, policy: &str) -> (String, Session) {
        let now = Instant::now();
        let id = random_token();
        let session = Session {
            policy: policy.to_owned(),
            csrf_token: random_token(),
            created: now,
            last_seen: now,
        };
        let mut sessions = self.lock();
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| s.deadline(&self.limits) > now);
            if sessions.len() >= MAX_SESSIONS {
                let limits = self.limits;
                if let Some(k) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.deadline(&limits))
                    .map(|(k, _)| *k)
                {
                    sessions.remove(&k);
                }
            }
        }
        sessions.insert(digest(&id), session.clone());
        (id, session)
    }

    async fn touch(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let key = digest(id);
        let mut sessions = self.lock();
        let s = sessions.get_mut(&key)?;
        if s.deadline(&self.limits) <= now {
            sessions.remove(&key);
            return None;
        }
        s.last_seen = now;
        Some(s.clone())
    }

    async fn remove(&self, id: &str) {
        self.lock().remove(&digest(id));
    }

    async fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut sessions = self.lock();
        let before = sessions.len();
        sessions.retain(|_, s| s.deadline(&self.limits) > now);
        before - sessions.len()
    }

    fn limits(&self) -> SessionLimits {
        self.limits
    }
}

/// One-time login tokens: minted at start-up (the banner's URL) and by
/// `POST /explorer/api/login-tokens`, each good for one sign-in as the owner policy.
#[async_trait]
pub trait LoginTokens: Send + Sync {
    /// A fresh token.
    async fn mint(&self) -> String;
    /// Whether `token` is live; a live token is used up by this call.
    async fn consume(&self, token: &str) -> bool;
}

/// Login tokens in this process's memory.
pub struct MemoryLoginTokens {
    lifetime: Duration,
    /// Digest and expiry, oldest first.
    tokens: Mutex<Vec<([u8; 32], Instant)>>,
}

impl MemoryLoginTokens {
    pub fn new(lifetime: Duration) -> Self {
        Self {
            lifetime,
            tokens: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<([u8; 32], Instant)>> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl LoginTokens for MemoryLoginTokens {
    async fn mint(&self) -> String {
        let token = random_token();
        let now = Instant::now();
        let mut tokens = self.lock();
        tokens.retain(|(_, until)| *until > now);
        if tokens.len() >= MAX_LOGIN_TOKENS {
            tokens.remove(0);
        }
        tokens.push((digest(&token), now + self.lifetime));
        token
    }

    async fn consume(&self, token: &str) -> bool {
        let now = Instant::now();
        let wanted = digest(token);
        let mut tokens = self.lock();
        // Every entry is compared, in constant time, so neither timing nor position tells
        // anything about the tokens held.
        let mut found = None;
        for (i, (d, until)) in tokens.iter().enumerate() {
            if bool::from(d.ct_eq(&wanted)) && *until > now {
                found = Some(i);
            }
        }
        tokens.retain(|(_, until)| *until > now);
        match found {
            Some(_) => {
                tokens.retain(|(d, _)| !bool::from(d.ct_eq(&wanted)));
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_session_ends_after_idling_and_at_its_absolute_lifetime() {
        let store = MemorySessions::new(SessionLimits::default());
        let (id, _) = store.create("iothubowner").await;
        tokio::time::advance(IDLE_TIMEOUT - Duration::from_secs(1)).await;
        assert!(
            store.touch(&id).await.is_some(),
            "used within the idle time"
        );
        // The touch refreshed it: another almost-idle period still finds it.
        tokio::time::advance(IDLE_TIMEOUT - Duration::from_secs(1)).await;
        assert!(
            store.touch(&id).await.is_some(),
            "refreshed by the last use"
        );
        tokio::time::advance(IDLE_TIMEOUT).await;
        assert!(store.touch(&id).await.is_none(), "idle too long");

        let (busy, _) = store.create("iothubowner").await;
        let mut used = Duration::ZERO;
        while used + Duration::from_secs(600) < ABSOLUTE_LIFETIME {
            tokio::time::advance(Duration::from_secs(600)).await;
            used += Duration::from_secs(600);
            assert!(store.touch(&busy).await.is_some(), "alive at {used:?}");
        }
        tokio::time::advance(ABSOLUTE_LIFETIME - used).await;
        assert!(store.touch(&busy).await.is_none(), "past 12 h however busy");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_sessions_are_swept_and_removed_ones_are_gone() {
        let store = MemorySessions::new(SessionLimits::default());
        let (a, _) = store.create("registryRead").await;
        let (b, _) = store.create("registryRead").await;
        store.remove(&a).await;
        assert!(store.touch(&a).await.is_none());
        assert_eq!(store.sweep().await, 0, "b is still live");
        tokio::time::advance(IDLE_TIMEOUT).await;
        assert_eq!(store.sweep().await, 1);
        assert!(store.touch(&b).await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_login_token_works_once_and_expires() {
        let tokens = MemoryLoginTokens::new(LOGIN_TOKEN_LIFETIME);
        let t = tokens.mint().await;
        assert!(!tokens.consume("not-a-token").await);
        assert!(tokens.consume(&t).await);
        assert!(!tokens.consume(&t).await, "used up");
        let late = tokens.mint().await;
        tokio::time::advance(LOGIN_TOKEN_LIFETIME).await;
        assert!(!tokens.consume(&late).await, "expired");
    }

    #[test]
    fn csrf_tokens_compare_whole() {
        let s = Session {
            policy: "p".into(),
            csrf_token: "abc".into(),
            created: Instant::now(),
            last_seen: Instant::now(),
        };
        assert!(s.csrf_matches("abc"));
        assert!(!s.csrf_matches("ab"));
        assert!(!s.csrf_matches("abcd"));
    }
}
