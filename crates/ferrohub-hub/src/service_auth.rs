//! Authorization of service (back-end) calls: a SAS token signed with one of the hub's shared
//! access policies (`skn` names it), scoped to the hub, whose rights must cover the operation.
//! Checked tokens are remembered for a short while, so the policy read and the HMACs are not
//! paid on every call.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferrohub_iothub::sas::host_matches;
use ferrohub_iothub::SasToken;
use ferrohub_store::AccessPolicy;

use crate::error::HubError;
use crate::Hub;

/// The policy rights a service operation needs (IoT Hub's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    RegistryRead,
    RegistryWrite,
    ServiceConnect,
    /// Reading enrollments, groups and registrations of the provisioning service.
    EnrollmentRead,
    /// Changing them.
    EnrollmentWrite,
}

fn unauthorized(why: &str) -> HubError {
    tracing::info!(reason = why, "service call refused");
    HubError::unauthorized()
}

/// How long a checked token is trusted without looking at its policy again.
const TRUST_FOR: Duration = Duration::from_secs(30);
/// Tokens remembered at most; back ends reuse one token for its lifetime, so few are live.
const CACHE_CAPACITY: usize = 1024;

/// Service tokens already checked: a back end reuses one token for many calls (the SDKs keep
/// it for its whole lifetime), and a map lookup is much cheaper than a policy read and two
/// HMACs per call. Policies do not change while the hub runs; the entries still lapse after
/// `TRUST_FOR`, which bounds how long a rotated key would keep working once they can.
#[derive(Default)]
pub(crate) struct TokenCache {
    checked: Mutex<HashMap<String, Checked>>,
}

struct Checked {
    policy: AccessPolicy,
    /// The token's own `se`, seconds since the Unix epoch.
    expiry: u64,
    until: Instant,
}

impl TokenCache {
    fn get(&self, header: &str, now_secs: u64) -> Option<AccessPolicy> {
        let checked = self.lock();
        let c = checked.get(header)?;
        (c.expiry > now_secs && c.until > Instant::now()).then(|| c.policy.clone())
    }

    fn put(&self, header: &str, policy: &AccessPolicy, expiry: u64, now_secs: u64) {
        let now = Instant::now();
        let mut checked = self.lock();
        if checked.len() >= CACHE_CAPACITY {
            checked.retain(|_, c| c.expiry > now_secs && c.until > now);
            if checked.len() >= CACHE_CAPACITY {
                checked.clear();
            }
        }
        checked.insert(
            header.to_owned(),
            Checked {
                policy: policy.clone(),
                expiry,
                until: now + TRUST_FOR,
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Checked>> {
        // The map holds no invariant a panicking holder could break.
        self.checked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn permits(policy: &AccessPolicy, need: Right) -> Result<(), HubError> {
    if permits_quietly(policy, need) {
        Ok(())
    } else {
        Err(unauthorized("policy lacks the right for this operation"))
    }
}

impl Hub {
    /// The shared access policy called `name`.
    pub async fn policy(&self, name: &str) -> Result<Option<AccessPolicy>, HubError> {
        Ok(self.store.get_policy(name).await?)
    }

    /// Creates the policy unless one of its name exists; returns the stored one.
    pub async fn ensure_policy(&self, policy: AccessPolicy) -> Result<AccessPolicy, HubError> {
        Ok(self.store.ensure_policy(policy).await?)
    }

    /// The policy a service token names (`skn`), if one of its two keys signed the token
    /// (`verify` says how a key signs).
    async fn signing_policy(
        &self,
        token: &SasToken,
        verify: fn(&SasToken, &str) -> bool,
    ) -> Result<AccessPolicy, HubError> {
        let name = token
            .key_name
            .as_deref()
            .ok_or_else(|| unauthorized("token has no skn"))?;
        let policy = self
            .store
            .get_policy(name)
            .await
            .map_err(|e| {
                HubError::from_store(
                    e,
                    unauthorized("policy lookup failed"),
                    unauthorized("policy lookup failed"),
                )
            })?
            .ok_or_else(|| unauthorized("unknown policy"))?;
        // Both keys are checked, so the time taken does not tell which one matched.
        if !(verify(token, &policy.primary_key) | verify(token, &policy.secondary_key)) {
            return Err(unauthorized("signature does not match the policy key"));
        }
        Ok(policy)
    }

    /// Checks a service call's `Authorization` value and returns the policy it was signed
    /// with, if that policy grants `need`.
    pub async fn authorize_service(
        &self,
        authorization: Option<&str>,
        need: Right,
    ) -> Result<AccessPolicy, HubError> {
        let header = authorization.ok_or_else(|| unauthorized("no Authorization header"))?;
        let now = crate::auth::now_epoch();
        if let Some(policy) = self.tokens.get(header, now) {
            permits(&policy, need)?;
            return Ok(policy);
        }
        let token = SasToken::parse(header).map_err(|_| unauthorized("malformed SAS token"))?;
        if token.is_expired(now) {
            return Err(unauthorized("token expired"));
        }
        // Service tokens are scoped to the hub: `sr` is the host name (with a port, if the
        // client connected to one).
        let host = token.resource.trim_end_matches('/');
        if host.contains('/') || !host_matches(host, &self.hostnames) {
            return Err(unauthorized("token resource is not this hub"));
        }
        let policy = self
            .signing_policy(&token, SasToken::verify_signature)
            .await?;
        // Remembered before the rights check: the token is genuine whatever this call needs.
        self.tokens.put(header, &policy, token.expiry, now);
        permits(&policy, need)?;
        Ok(policy)
    }
}

/// What a claims-based-security token (AMQP `$cbs` put-token, or SASL PLAIN's password)
/// proved: the policy it was signed with and when it stops counting.
#[derive(Debug, Clone)]
pub struct Claim {
    pub policy: AccessPolicy,
    /// The token's `se`, seconds since the Unix epoch.
    pub expiry: u64,
}

impl Claim {
    /// Whether the claim still holds and its policy grants `need`.
    pub fn grants(&self, need: Right, now_secs: u64) -> bool {
        self.expiry > now_secs && permits_quietly(&self.policy, need)
    }
}

fn permits_quietly(policy: &AccessPolicy, need: Right) -> bool {
    let r = &policy.rights;
    match need {
        Right::RegistryRead => r.registry_read,
        Right::RegistryWrite => r.registry_write,
        Right::ServiceConnect => r.service_connect,
        // A policy that may write the registry can create any device with any key already,
        // so enrollments (which only create devices) give it nothing more; this also keeps
        // policies stored before provisioning existed (`iothubowner`) able to manage them.
        Right::EnrollmentRead => r.enrollment_read || r.enrollment_write || r.registry_write,
        Right::EnrollmentWrite => r.enrollment_write || r.registry_write,
    }
}

/// Whether a claim's audience (`sr`) is this hub's service side: the host alone, or a path
/// below it that a service client names (the Event Hubs entity, `messages/...`, IoT
/// Explorer's `messages/events`), with or without a scheme. `devices/...` is a device's
/// scope and never opens service links.
fn service_audience(resource: &str, hostnames: &[String], entity: &str) -> bool {
    let rest = ["sb://", "amqps://", "amqp://", "https://", "http://"]
        .iter()
        .find_map(|s| resource.strip_prefix(s))
        .unwrap_or(resource)
        .trim_end_matches('/');
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !host_matches(host, hostnames) {
        return false;
    }
    let first = path.split('/').next().unwrap_or("");
    path.is_empty() || first.eq_ignore_ascii_case(entity) || first == "messages"
}

impl Hub {
    /// Checks a claims-based-security token presented for `audience` over AMQP. Event Hubs
    /// clients sign with the policy key's text, IoT Hub clients with its decoded bytes; both
    /// are accepted (`SasToken::verify_signature_any_convention`). `entity` is the Event
    /// Hubs-compatible name, which Event Hubs audiences carry as their path.
    pub async fn authorize_claim(&self, token: &str, entity: &str) -> Result<Claim, HubError> {
        let now = crate::auth::now_epoch();
        let token = SasToken::parse(token).map_err(|_| unauthorized("malformed SAS token"))?;
        if token.is_expired(now) {
            return Err(unauthorized("token expired"));
        }
        if !service_audience(&token.resource, &self.hostnames, entity) {
            return Err(unauthorized(
                "token resource is not this hub's service side",
            ));
        }
        let policy = self
            .signing_policy(&token, SasToken::verify_signature_any_convention)
            .await?;
        Ok(Claim {
            policy,
            expiry: token.expiry,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrohub_store::Rights;

    fn policy() -> AccessPolicy {
        AccessPolicy {
            key_name: "service".into(),
            primary_key: "a2V5".into(),
            secondary_key: "a2V5".into(),
            rights: Rights {
                service_connect: true,
                ..Rights::default()
            },
        }
    }

    #[test]
    fn a_remembered_token_lapses_with_its_own_expiry() {
        let cache = TokenCache::default();
        cache.put("SharedAccessSignature x", &policy(), 1_000, 900);
        assert_eq!(cache.get("SharedAccessSignature x", 999), Some(policy()));
        assert_eq!(cache.get("SharedAccessSignature x", 1_000), None);
        assert_eq!(cache.get("SharedAccessSignature y", 999), None);
    }

    #[test]
    fn a_full_cache_keeps_working() {
        let cache = TokenCache::default();
        for i in 0..CACHE_CAPACITY + 10 {
            cache.put(&format!("t{i}"), &policy(), 1_000, 900);
        }
        assert!(cache.lock().len() <= CACHE_CAPACITY);
        let last = format!("t{}", CACHE_CAPACITY + 9);
        assert_eq!(cache.get(&last, 900), Some(policy()));
    }

    #[test]
    fn claim_audiences_are_the_hubs_service_side() {
        let hosts = vec!["hub.example".to_string()];
        assert!(service_audience("sb://hub.example/myhub", &hosts, "myhub"));
        assert!(service_audience(
            "amqps://hub.example:5671/MyHub/ConsumerGroups/$Default",
            &hosts,
            "myhub"
        ));
        assert!(service_audience("hub.example", &hosts, "myhub"));
        assert!(service_audience("https://hub.example", &hosts, "myhub"));
        assert!(service_audience(
            "hub.example/messages/events",
            &hosts,
            "myhub"
        ));
        assert!(!service_audience("hub.example/devices/d1", &hosts, "myhub"));
        assert!(!service_audience(
            "sb://other.example/myhub",
            &hosts,
            "myhub"
        ));
        assert!(!service_audience(
            "sb://hub.example/otherhub",
            &hosts,
            "myhub"
        ));
    }

    #[test]
    fn rights_are_checked_on_every_call() {
        assert!(permits(&policy(), Right::ServiceConnect).is_ok());
        assert!(permits(&policy(), Right::RegistryWrite).is_err());
    }
}
