//! Device provisioning, DPS-compatible: enrollments and enrollment groups (the service side),
//! and the device side's register and operation-status calls, which check the device's
//! credentials against its enrollment, allocate it to a hub, create or re-use its device in
//! the registry with the enrollment's (or the group-derived) key, apply the initial twin on
//! first creation and record the registration.
//!
//! Pure rules (topics, username, key derivation, codes) are in `ferrohub_iothub::dps`. The
//! allocation step is behind [`Allocator`] so several hubs or a cluster can be targets later;
//! the one implementation today is this hub ([`ThisHub`]).

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use ferrohub_iothub::dps::{self, DpsErrorCode, DpsTopic};
use ferrohub_iothub::sas::{generate_key, SasToken};
use ferrohub_iothub::{validate_device_id, ErrorCode, Identity};
use ferrohub_mqtt::{Connect, ConnectReturnCode, Publish, QoS};
use ferrohub_store::{
    AuthType, Authentication, CaCertificate, IfMatch, ProvisioningKind, StoreError,
    StoredProvisioning, SymmetricKey, X509Thumbprint,
};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{info, warn};

use crate::error::HubError;
use crate::link::{self, Outbound};
use crate::registry::{AuthRequest, IdentityRequest};
use crate::{timefmt, Hub, Peer, PublishOutcome, Transport};

/// Most records one list call returns.
pub const MAX_LIST: usize = 1000;
/// What a provisioning connection is told to wait before it polls (seconds).
pub const RETRY_AFTER_SECS: u32 = 1;
/// How long a provisioning connection may stay open: registering takes seconds, and a
/// connection is let in before its credentials are checked (DPS checks them at register), so
/// it must not be able to sit on a socket forever.
pub const SESSION_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);
/// Requests one provisioning connection may make; past it each is answered 429 (a device
/// registers once and polls a few times, and each register writes to the store).
pub const MAX_REQUESTS_PER_CONNECTION: u32 = 50;

/// `provisioningStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum ProvisioningStatus {
    #[default]
    Enabled,
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttestationType {
    #[serde(rename = "symmetricKey")]
    SymmetricKey,
    #[serde(rename = "x509")]
    X509,
    #[serde(rename = "tpm")]
    Tpm,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct SymmetricKeyAttestation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary_key: Option<String>,
}

/// How devices of an enrollment prove who they are, in DPS's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attestation {
    #[serde(rename = "type")]
    pub kind: AttestationType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKeyAttestation>,
    /// DPS's shape, kept as sent: `clientCertificates` (an individual enrollment's, each
    /// `{"certificate": PEM}` or `{"info": {"sha256Thumbprint"|"sha1Thumbprint"}}`),
    /// `signingCertificates` (a group's CAs, `{"certificate": PEM}`) or `caReferences` (names of
    /// CAs registered with the hub), each with `primary` and optional `secondary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReprovisionPolicy {
    #[serde(default = "yes")]
    pub update_hub_assignment: bool,
    #[serde(default = "yes")]
    pub migrate_device_data: bool,
}

fn yes() -> bool {
    true
}

/// The twin a device starts with: `{"tags": {...}, "properties": {"desired": {...}}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<InitialTwinProperties>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct InitialTwinProperties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<Value>,
}

/// An individual enrollment (`/enrollments/{registrationId}`), in DPS's JSON shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndividualEnrollment {
    #[serde(default)]
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub attestation: Attestation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    #[serde(default)]
    pub provisioning_status: ProvisioningStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_state: Option<RegistrationState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
}

/// An enrollment group (`/enrollmentGroups/{enrollmentGroupId}`), in DPS's JSON shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnrollmentGroup {
    #[serde(default)]
    pub enrollment_group_id: String,
    pub attestation: Attestation,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iot_hub_host_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_twin: Option<InitialTwin>,
    #[serde(default)]
    pub provisioning_status: ProvisioningStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprovision_policy: Option<ReprovisionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
}

/// A device's registration (`/registrations/{registrationId}`, and `registrationState` in the
/// device's operation status), in DPS's JSON shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegistrationState {
    pub registration_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub substatus: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated_date_time_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// What the device sent as `payload` (IoT Plug and Play devices put their `modelId` here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// The group the device registered through, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_group_id: Option<String>,
    /// The operation that produced this state: the device's status query names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation_id: Option<String>,
}

/// Where a registering device goes.
#[derive(Debug, Clone)]
pub struct AllocationRequest<'a> {
    pub registration_id: &'a str,
    pub device_id: &'a str,
    /// The enrollment's `iotHubHostName` or `allocationPolicy`, for allocators that honour them.
    pub requested_hub: Option<&'a str>,
    pub allocation_policy: Option<&'a str>,
}

/// Chooses the hub a device is assigned to. A cluster or several hubs implement it (hashed,
/// lowest latency, static, a custom webhook); the device is then created on that hub.
pub trait Allocator: Send + Sync + 'static {
    /// The assigned hub's host name, or why none can take the device.
    fn allocate(&self, request: &AllocationRequest<'_>) -> Result<String, HubError>;
}

/// Every device goes to this hub, under its first host name.
pub struct ThisHub {
    pub hostname: String,
}

impl Allocator for ThisHub {
    fn allocate(&self, _request: &AllocationRequest<'_>) -> Result<String, HubError> {
        Ok(self.hostname.clone())
    }
}

/// The hub's provisioning service state: its ID scope (set once at start) and allocator.
#[derive(Default)]
pub struct ProvisioningService {
    id_scope: OnceLock<String>,
    allocator: OnceLock<Arc<dyn Allocator>>,
}

/// One provisioning (DPS) connection, as the hub sees it. Credentials are kept for the
/// register call, which checks them against the enrollment (as DPS does).
pub struct ProvisioningClient {
    pub registration_id: String,
    pub id_scope: String,
    pub client_version: Option<String>,
    password: Option<String>,
    /// The TLS client certificate chain, for X.509 attestation.
    pub client_certs: Arc<Vec<CertificateDer<'static>>>,
    pub transport: Transport,
    pub peer: std::net::SocketAddr,
    /// When the connection must end: the token's expiry or [`SESSION_LIMIT`], whichever first.
    pub deadline: std::time::Instant,
    outbound: OnceLock<Outbound>,
    /// The operation this connection's last successful register started.
    operation: Mutex<Option<String>>,
    /// Requests made on this connection (see [`MAX_REQUESTS_PER_CONNECTION`]).
    requests: std::sync::atomic::AtomicU32,
}

impl std::fmt::Debug for ProvisioningClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisioningClient")
            .field("registration_id", &self.registration_id)
            .field("id_scope", &self.id_scope)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl ProvisioningClient {
    /// The broker's session key for this connection: never a device id (those cannot contain
    /// `/`), so a device re-provisioning while it is connected does not take its own hub
    /// connection over.
    pub fn session_key(&self) -> String {
        format!("$dps/{}/{}", self.id_scope, self.registration_id)
    }
}

/// A refusal of a device's provisioning request: the DPS code it answers, and why (for the
/// log only: the device learns the code).
#[derive(Debug)]
pub struct DpsRefusal {
    pub code: DpsErrorCode,
    pub why: String,
}

fn refusal(code: DpsErrorCode, why: impl Into<String>) -> DpsRefusal {
    DpsRefusal {
        code,
        why: why.into(),
    }
}

fn unauthorized(why: impl Into<String>) -> DpsRefusal {
    refusal(DpsErrorCode::Unauthorized, why)
}

fn server_error(e: impl std::fmt::Display) -> DpsRefusal {
    refusal(DpsErrorCode::ServerError, format!("storage: {e}"))
}

impl From<HubError> for DpsRefusal {
    fn from(e: HubError) -> Self {
        let code = match e.code() {
            ErrorCode::ThrottlingException => DpsErrorCode::Throttled,
            ErrorCode::ArgumentInvalid | ErrorCode::ArgumentNull => DpsErrorCode::BadRequest,
            _ => DpsErrorCode::ServerError,
        };
        refusal(code, e.message().to_string())
    }
}

/// The enrollment a registration matched.
enum Matched {
    Individual(Box<IndividualEnrollment>),
    Group(Box<EnrollmentGroup>),
}

impl Matched {
    fn enabled(&self) -> bool {
        match self {
            Matched::Individual(e) => e.provisioning_status == ProvisioningStatus::Enabled,
            Matched::Group(g) => g.provisioning_status == ProvisioningStatus::Enabled,
        }
    }
    fn initial_twin(&self) -> Option<&InitialTwin> {
        match self {
            Matched::Individual(e) => e.initial_twin.as_ref(),
            Matched::Group(g) => g.initial_twin.as_ref(),
        }
    }
    fn requested_hub(&self) -> Option<&str> {
        match self {
            Matched::Individual(e) => e.iot_hub_host_name.as_deref(),
            Matched::Group(g) => g.iot_hub_host_name.as_deref(),
        }
    }
    fn allocation_policy(&self) -> Option<&str> {
        match self {
            Matched::Individual(e) => e.allocation_policy.as_deref(),
            Matched::Group(g) => g.allocation_policy.as_deref(),
        }
    }
}

/// A request of the DPS HTTPS device API.
pub enum DpsHttpRequest<'a> {
    /// The register body, `{"registrationId", "payload"}`.
    Register(&'a [u8]),
    OperationStatus(&'a str),
}

/// The registering device's body: `{"registrationId": "...", "payload": ...}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterBody {
    #[serde(default)]
    registration_id: Option<String>,
    #[serde(default)]
    payload: Option<Value>,
}

fn new_operation_id() -> String {
    // DPS's look: `4.{16 hex}.{uuid}`; only its uniqueness matters to the SDKs.
    let r: [u8; 24] = rand::random();
    let h = hex::encode(r);
    format!(
        "4.{}.{}-{}-{}-{}-{}",
        &h[0..16],
        &h[16..24],
        &h[24..28],
        &h[28..32],
        &h[32..36],
        &h[36..48]
    )
}

fn parse_doc<T: serde::de::DeserializeOwned>(rec: &StoredProvisioning) -> Result<T, HubError> {
    serde_json::from_str(&rec.doc).map_err(|e| {
        HubError::internal(
            &format!("provisioning record {} {:?}", rec.kind.as_str(), rec.id),
            e,
        )
    })
}

fn enrollment_not_found(what: &str, id: &str) -> HubError {
    HubError::new(
        ErrorCode::DeviceNotFound,
        format!("{what} {id} cannot be found."),
    )
    .with_status(404)
}

fn store_error(e: StoreError, what: &str, id: &str) -> HubError {
    HubError::from_store(
        e,
        enrollment_not_found(what, id),
        HubError::new(
            ErrorCode::DeviceAlreadyExists,
            format!("{what} {id} exists."),
        ),
    )
}

/// Fills in generated keys and checks the attestation a client sent.
fn complete_attestation(a: &mut Attestation) -> Result<(), HubError> {
    match a.kind {
        AttestationType::SymmetricKey => {
            let keys = a.symmetric_key.get_or_insert_with(Default::default);
            for key in [&mut keys.primary_key, &mut keys.secondary_key] {
                match key {
                    None => *key = Some(generate_key()),
                    Some(k) if ferrohub_iothub::registry::valid_symmetric_key(k) => {}
                    Some(_) => {
                        return Err(HubError::argument(
                            "symmetric keys must be base64 of 16 to 64 bytes",
                        ))
                    }
                }
            }
            Ok(())
        }
        AttestationType::X509 => {
            let x = a.x509.as_ref();
            let has = |section: &str| !x509_slots(x, section).is_empty();
            if !(has("clientCertificates") || has("signingCertificates") || has("caReferences")) {
                return Err(HubError::argument(
                    "x509 attestation needs clientCertificates, signingCertificates or caReferences",
                ));
            }
            for section in ["clientCertificates", "signingCertificates"] {
                for c in x509_slots(x, section) {
                    if let Some(pem) = c.get("certificate").and_then(Value::as_str) {
                        crate::x509::pem_to_der(pem).map_err(|e| {
                            HubError::argument(format!("x509 {section} certificate: {e}"))
                        })?;
                    }
                }
            }
            Ok(())
        }
        AttestationType::Tpm => Err(HubError::argument("TPM attestation is not supported")),
    }
}

fn check_initial_twin(t: &Option<InitialTwin>) -> Result<(), HubError> {
    if let Some(t) = t {
        let tags_ok = t.tags.as_ref().is_none_or(Value::is_object);
        let desired_ok = t
            .properties
            .as_ref()
            .and_then(|p| p.desired.as_ref())
            .is_none_or(Value::is_object);
        if !tags_ok || !desired_ok {
            return Err(HubError::argument(
                "initialTwin tags and properties.desired must be JSON objects",
            ));
        }
    }
    Ok(())
}

/// The service side: enrollments, groups and registrations.
impl Hub {
    /// Sets the ID scope (the configured one, else the stored one, else a new one stored now)
    /// and the allocator; called once while composing the server. Returns the scope.
    pub async fn init_provisioning(
        &self,
        configured: Option<String>,
        allocator: Option<Arc<dyn Allocator>>,
    ) -> Result<String, HubError> {
        let scope = match configured {
            Some(s) => {
                dps::validate_id_scope(&s).map_err(|e| HubError::argument(e.to_string()))?;
                s
            }
            None => self.store.ensure_id_scope(dps::generate_id_scope()).await?,
        };
        let _ = self.provisioning.id_scope.set(scope.clone());
        let allocator = allocator.unwrap_or_else(|| {
            Arc::new(ThisHub {
                hostname: self.assigned_hostname(),
            })
        });
        let _ = self.provisioning.allocator.set(allocator);
        Ok(scope)
    }

    /// The provisioning service's ID scope, once [`Hub::init_provisioning`] ran.
    pub fn id_scope(&self) -> Option<&str> {
        self.provisioning.id_scope.get().map(String::as_str)
    }

    fn assigned_hostname(&self) -> String {
        self.hostnames
            .first()
            .cloned()
            .unwrap_or_else(|| "localhost".into())
    }

    pub async fn enrollment(&self, id: &str) -> Result<IndividualEnrollment, HubError> {
        let rec = self
            .store
            .get_provisioning(ProvisioningKind::Enrollment, id)
            .await?
            .ok_or_else(|| enrollment_not_found("Enrollment", id))?;
        let mut e: IndividualEnrollment = parse_doc(&rec)?;
        e.etag = Some(rec.etag);
        Ok(e)
    }

    pub async fn enrollments(&self) -> Result<Vec<IndividualEnrollment>, HubError> {
        let recs = self
            .store
            .list_provisioning(ProvisioningKind::Enrollment, None, MAX_LIST)
            .await?;
        recs.iter()
            .map(|r| {
                let mut e: IndividualEnrollment = parse_doc(r)?;
                e.etag = Some(r.etag.clone());
                Ok(e)
            })
            .collect()
    }

    /// Creates or replaces an individual enrollment (`If-Match` guards a replace); keys left
    /// out are generated.
    pub async fn put_enrollment(
        &self,
        id: &str,
        mut e: IndividualEnrollment,
        if_match: IfMatch,
    ) -> Result<IndividualEnrollment, HubError> {
        dps::validate_registration_id(id).map_err(|e| HubError::argument(e.to_string()))?;
        if !e.registration_id.is_empty() && e.registration_id != id {
            return Err(HubError::argument(
                "registrationId in the body does not match the URL",
            ));
        }
        if let Some(d) = &e.device_id {
            validate_device_id(d).map_err(|x| HubError::argument(format!("deviceId: {x}")))?;
        }
        complete_attestation(&mut e.attestation)?;
        check_initial_twin(&e.initial_twin)?;
        e.registration_id = id.to_string();
        let id = id.to_string();
        self.to_the_end(move |hub| async move {
            let now = timefmt::now_iso();
            let existing = hub
                .store
                .get_provisioning(ProvisioningKind::Enrollment, &id)
                .await?;
            e.created_date_time_utc = match &existing {
                Some(r) => parse_doc::<IndividualEnrollment>(r)?.created_date_time_utc,
                None => Some(now.clone()),
            };
            e.last_updated_date_time_utc = Some(now);
            e.etag = None;
            e.registration_state = None;
            let doc = serde_json::to_string(&e).map_err(|x| HubError::internal("enrollment", x))?;
            let rec = hub
                .store
                .put_provisioning(ProvisioningKind::Enrollment, &id, doc, if_match)
                .await
                .map_err(|x| store_error(x, "Enrollment", &id))?;
            e.etag = Some(rec.etag);
            Ok(e)
        })
        .await
    }

    pub async fn delete_enrollment(&self, id: &str, if_match: IfMatch) -> Result<(), HubError> {
        let id = id.to_string();
        self.to_the_end(move |hub| async move {
            hub.store
                .delete_provisioning(ProvisioningKind::Enrollment, &id, if_match)
                .await
                .map_err(|x| store_error(x, "Enrollment", &id))
        })
        .await
    }

    pub async fn enrollment_group(&self, id: &str) -> Result<EnrollmentGroup, HubError> {
        let rec = self
            .store
            .get_provisioning(ProvisioningKind::EnrollmentGroup, id)
            .await?
            .ok_or_else(|| enrollment_not_found("Enrollment group", id))?;
        let mut g: EnrollmentGroup = parse_doc(&rec)?;
        g.etag = Some(rec.etag);
        Ok(g)
    }

    pub async fn enrollment_groups(&self) -> Result<Vec<EnrollmentGroup>, HubError> {
        let recs = self
            .store
            .list_provisioning(ProvisioningKind::EnrollmentGroup, None, MAX_LIST)
            .await?;
        recs.iter()
            .map(|r| {
                let mut g: EnrollmentGroup = parse_doc(r)?;
                g.etag = Some(r.etag.clone());
                Ok(g)
            })
            .collect()
    }

    pub async fn put_enrollment_group(
        &self,
        id: &str,
        mut g: EnrollmentGroup,
        if_match: IfMatch,
    ) -> Result<EnrollmentGroup, HubError> {
        dps::validate_registration_id(id)
            .map_err(|_| HubError::argument(format!("invalid enrollment group id {id:?}")))?;
        if !g.enrollment_group_id.is_empty() && g.enrollment_group_id != id {
            return Err(HubError::argument(
                "enrollmentGroupId in the body does not match the URL",
            ));
        }
        complete_attestation(&mut g.attestation)?;
        check_initial_twin(&g.initial_twin)?;
        g.enrollment_group_id = id.to_string();
        let id = id.to_string();
        self.to_the_end(move |hub| async move {
            let now = timefmt::now_iso();
            let existing = hub
                .store
                .get_provisioning(ProvisioningKind::EnrollmentGroup, &id)
                .await?;
            g.created_date_time_utc = match &existing {
                Some(r) => parse_doc::<EnrollmentGroup>(r)?.created_date_time_utc,
                None => Some(now.clone()),
            };
            g.last_updated_date_time_utc = Some(now);
            g.etag = None;
            let doc = serde_json::to_string(&g).map_err(|x| HubError::internal("group", x))?;
            let rec = hub
                .store
                .put_provisioning(ProvisioningKind::EnrollmentGroup, &id, doc, if_match)
                .await
                .map_err(|x| store_error(x, "Enrollment group", &id))?;
            g.etag = Some(rec.etag);
            Ok(g)
        })
        .await
    }

    pub async fn delete_enrollment_group(
        &self,
        id: &str,
        if_match: IfMatch,
    ) -> Result<(), HubError> {
        let id = id.to_string();
        self.to_the_end(move |hub| async move {
            hub.store
                .delete_provisioning(ProvisioningKind::EnrollmentGroup, &id, if_match)
                .await
                .map_err(|x| store_error(x, "Enrollment group", &id))
        })
        .await
    }

    pub async fn registration(&self, id: &str) -> Result<RegistrationState, HubError> {
        let rec = self
            .store
            .get_provisioning(ProvisioningKind::Registration, id)
            .await?
            .ok_or_else(|| enrollment_not_found("Registration", id))?;
        let mut r: RegistrationState = parse_doc(&rec)?;
        r.etag = Some(rec.etag);
        Ok(r)
    }

    pub async fn registrations(&self) -> Result<Vec<RegistrationState>, HubError> {
        let recs = self
            .store
            .list_provisioning(ProvisioningKind::Registration, None, MAX_LIST)
            .await?;
        recs.iter()
            .map(|rec| {
                let mut r: RegistrationState = parse_doc(rec)?;
                r.etag = Some(rec.etag.clone());
                Ok(r)
            })
            .collect()
    }

    /// Forgets a registration (the device stays in the registry, as with DPS).
    pub async fn delete_registration(&self, id: &str, if_match: IfMatch) -> Result<(), HubError> {
        let id = id.to_string();
        self.to_the_end(move |hub| async move {
            hub.store
                .delete_provisioning(ProvisioningKind::Registration, &id, if_match)
                .await
                .map_err(|x| store_error(x, "Registration", &id))
        })
        .await
    }
}

/// The device side: a provisioning connection's life.
impl Hub {
    /// Accepts a DPS CONNECT whose username parses; its credentials are checked at register,
    /// as DPS does (a wrong key is answered 401 on the register topic, not by CONNACK).
    pub fn provisioning_connect(
        &self,
        connect: &Connect,
        peer: &Peer,
    ) -> Result<ProvisioningClient, ConnectReturnCode> {
        let username = connect.username.as_deref().unwrap_or_default();
        let info = match dps::parse_dps_connect(&connect.client_id, username) {
            Ok(i) => i,
            Err(e) => {
                info!(client_id = %connect.client_id, peer = %peer.addr, transport = %peer.transport,
                      reason = %e, "provisioning connection refused");
                return Err(ConnectReturnCode::IdentifierRejected);
            }
        };
        let password = match &connect.password {
            Some(p) => match std::str::from_utf8(p) {
                Ok(t) => Some(t.to_string()),
                Err(_) => {
                    info!(registration_id = %info.registration_id, peer = %peer.addr,
                          "provisioning connection refused: password is not UTF-8");
                    return Err(ConnectReturnCode::BadUserNameOrPassword);
                }
            },
            None => None,
        };
        if password.is_none() && peer.client_certs.is_empty() {
            info!(registration_id = %info.registration_id, peer = %peer.addr,
                  "provisioning connection refused: no password and no client certificate");
            return Err(ConnectReturnCode::NotAuthorized);
        }
        let mut deadline = std::time::Instant::now() + SESSION_LIMIT;
        if let Some(se) = password.as_deref().and_then(|p| SasToken::parse(p).ok()) {
            let left = se.expiry.saturating_sub(crate::auth::now_epoch());
            deadline =
                deadline.min(std::time::Instant::now() + std::time::Duration::from_secs(left));
        }
        Ok(ProvisioningClient {
            registration_id: info.registration_id,
            id_scope: info.id_scope,
            client_version: info.client_version,
            password,
            client_certs: peer.client_certs.clone(),
            transport: peer.transport,
            peer: peer.addr,
            deadline,
            outbound: OnceLock::new(),
            operation: Mutex::new(None),
            requests: Default::default(),
        })
    }

    pub fn provisioning_connected(&self, client: &ProvisioningClient, outbound: Outbound) {
        let _ = client.outbound.set(outbound);
        info!(registration_id = %client.registration_id, id_scope = %client.id_scope,
              transport = %client.transport, peer = %client.peer,
              client_version = client.client_version.as_deref().unwrap_or(""),
              "provisioning connection opened");
    }

    pub fn provisioning_authorize_subscribe(
        &self,
        client: &ProvisioningClient,
        filter: &str,
        requested: QoS,
    ) -> Option<QoS> {
        if dps::authorize_dps_subscribe(filter) {
            Some(requested.min(QoS::AtLeastOnce))
        } else {
            info!(registration_id = %client.registration_id, filter, "provisioning subscription refused");
            None
        }
    }

    pub async fn provisioning_publish(
        &self,
        client: &ProvisioningClient,
        publish: Publish,
    ) -> PublishOutcome {
        let topic = match dps::classify_dps_publish(&publish.topic) {
            Ok(t) => t,
            Err(e) => {
                return PublishOutcome::Reject(format!(
                    "provisioning publish to {:?} refused: {e}",
                    publish.topic
                ))
            }
        };
        let n = client
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let throttled = n >= MAX_REQUESTS_PER_CONNECTION;
        let (rid, result) = match topic {
            DpsTopic::Register { rid } | DpsTopic::OperationStatus { rid, .. } if throttled => (
                rid,
                Err(refusal(
                    DpsErrorCode::Throttled,
                    format!("more than {MAX_REQUESTS_PER_CONNECTION} requests on one connection"),
                )),
            ),
            DpsTopic::Register { rid } => {
                let r = self.device_register(client, &publish.payload).await;
                (
                    rid,
                    r.map(|(status, body)| (status, Some(RETRY_AFTER_SECS), body)),
                )
            }
            DpsTopic::OperationStatus { rid, operation_id } => {
                let r = self.operation_status(client, &operation_id).await;
                (rid, r.map(|body| (200, None, body)))
            }
        };
        let (status, retry_after, body) = match result {
            Ok(ok) => ok,
            Err(r) => {
                info!(registration_id = %client.registration_id, id_scope = %client.id_scope,
                      peer = %client.peer, reason = %r.why, error_code = r.code.code(),
                      "provisioning request refused");
                let retry = matches!(r.code, DpsErrorCode::Throttled | DpsErrorCode::ServerError)
                    .then_some(RETRY_AFTER_SECS);
                let body = r
                    .code
                    .json_body(&timefmt::tracking_id(), &timefmt::now_iso());
                (r.code.status(), retry, body)
            }
        };
        let topic = dps::response_topic(status, &rid, retry_after);
        self.provisioning_reply(client, topic, Bytes::from(body.to_string()));
        PublishOutcome::Accept
    }

    /// The DPS HTTPS device API: `PUT /{idScope}/registrations/{id}/register` and `GET
    /// /{idScope}/registrations/{id}/operations/{operationId}`, each authenticated on its own
    /// (`Authorization` SAS token, or the TLS client certificate). Returns the HTTP status and
    /// body; a refusal is logged here, as on MQTT.
    pub async fn provisioning_http(
        &self,
        id_scope: &str,
        registration_id: &str,
        authorization: Option<&str>,
        peer: &Peer,
        request: DpsHttpRequest<'_>,
    ) -> (u16, Value) {
        let result = self
            .provisioning_http_inner(id_scope, registration_id, authorization, peer, request)
            .await;
        match result {
            Ok(ok) => ok,
            Err(r) => {
                info!(registration_id, id_scope, peer = %peer.addr, transport = %peer.transport,
                      reason = %r.why, error_code = r.code.code(), "provisioning request refused");
                let body = r
                    .code
                    .json_body(&timefmt::tracking_id(), &timefmt::now_iso());
                (r.code.status(), body)
            }
        }
    }

    async fn provisioning_http_inner(
        &self,
        id_scope: &str,
        registration_id: &str,
        authorization: Option<&str>,
        peer: &Peer,
        request: DpsHttpRequest<'_>,
    ) -> Result<(u16, Value), DpsRefusal> {
        dps::validate_registration_id(registration_id)
            .map_err(|e| refusal(DpsErrorCode::BadRequest, e.to_string()))?;
        let client = ProvisioningClient {
            registration_id: registration_id.to_string(),
            id_scope: id_scope.to_string(),
            client_version: None,
            password: authorization.map(str::to_string),
            client_certs: peer.client_certs.clone(),
            transport: peer.transport,
            peer: peer.addr,
            deadline: std::time::Instant::now(),
            outbound: OnceLock::new(),
            operation: Mutex::new(None),
            requests: Default::default(),
        };
        match request {
            DpsHttpRequest::Register(body) => self.device_register(&client, body).await,
            DpsHttpRequest::OperationStatus(operation_id) => {
                // No session remembers who registered: the caller proves it again.
                self.authenticate_registration(&client).await?;
                if let Ok(mut op) = client.operation.lock() {
                    *op = Some(operation_id.to_string());
                }
                Ok((200, self.operation_status(&client, operation_id).await?))
            }
        }
    }

    /// A QoS 0 response, dropped when the connection's queue is full (the SDKs time out and
    /// ask again), for the reason [`Hub::reply`] gives.
    fn provisioning_reply(&self, client: &ProvisioningClient, topic: String, payload: Bytes) {
        let Some(out) = client.outbound.get() else {
            return;
        };
        let msg = link::OutboundMessage::new(topic, payload, QoS::AtMostOnce);
        if let Err(link::TrySendError::Full(m)) = out.try_send(msg) {
            warn!(registration_id = %client.registration_id, topic = %m.topic,
                  "outbound queue full: provisioning response dropped");
        }
    }

    /// The register call: answers 202 `assigning` with the operation the device then polls.
    async fn device_register(
        &self,
        client: &ProvisioningClient,
        body: &[u8],
    ) -> Result<(u16, Value), DpsRefusal> {
        let body: RegisterBody = if body.iter().all(u8::is_ascii_whitespace) {
            RegisterBody {
                registration_id: None,
                payload: None,
            }
        } else {
            serde_json::from_slice(body)
                .map_err(|e| refusal(DpsErrorCode::BadRequest, format!("register body: {e}")))?
        };
        if body
            .registration_id
            .as_deref()
            .is_some_and(|r| r != client.registration_id)
        {
            return Err(refusal(
                DpsErrorCode::BadRequest,
                "registrationId in the body differs from the connection's",
            ));
        }
        let admission = self.authenticate_registration(client).await?;
        let payload = body.payload.filter(|p| !p.is_null());
        let registration_id = client.registration_id.clone();
        let state = self
            .to_the_end(move |hub| async move {
                Ok(hub.assign(&registration_id, admission, payload).await)
            })
            .await
            .map_err(DpsRefusal::from)??;
        let operation_id = state.operation_id.clone().unwrap_or_default();
        if let Ok(mut op) = client.operation.lock() {
            *op = Some(operation_id.clone());
        }
        info!(registration_id = %client.registration_id, device_id = state.device_id.as_deref().unwrap_or(""),
              assigned_hub = state.assigned_hub.as_deref().unwrap_or(""),
              substatus = state.substatus.as_deref().unwrap_or(""),
              enrollment_group = state.enrollment_group_id.as_deref().unwrap_or(""),
              "device provisioned");
        Ok((
            202,
            json!({"operationId": operation_id, "status": "assigning"}),
        ))
    }

    /// The status poll: the registration the connection's register produced.
    async fn operation_status(
        &self,
        client: &ProvisioningClient,
        operation_id: &str,
    ) -> Result<Value, DpsRefusal> {
        let mine = client
            .operation
            .lock()
            .map(|op| op.as_deref() == Some(operation_id))
            .unwrap_or(false);
        if !mine {
            return Err(refusal(
                DpsErrorCode::NotFound,
                format!("operation {operation_id:?} was not started on this connection"),
            ));
        }
        let rec = self
            .store
            .get_provisioning(ProvisioningKind::Registration, &client.registration_id)
            .await
            .map_err(server_error)?
            .ok_or_else(|| refusal(DpsErrorCode::NotFound, "registration deleted"))?;
        let mut state: RegistrationState = serde_json::from_str(&rec.doc).map_err(server_error)?;
        if state.operation_id.as_deref() != Some(operation_id) {
            return Err(refusal(
                DpsErrorCode::NotFound,
                "a newer registration replaced this operation",
            ));
        }
        state.etag = Some(rec.etag);
        state.operation_id = None;
        state.enrollment_group_id = None;
        let status = state.status.clone();
        Ok(json!({
            "operationId": operation_id,
            "status": status,
            "registrationState": state,
        }))
    }

    /// Finds the registration's enrollment and checks the connection's credentials against
    /// it: a SAS token against the individual enrollment's keys, else each enabled
    /// symmetric-key group's keys derived for this registration id; a client certificate
    /// against the individual enrollment's certificates, else each enabled X.509 group's CAs.
    /// Returns the enrollment and the credentials the device gets in the registry.
    async fn authenticate_registration(
        &self,
        client: &ProvisioningClient,
    ) -> Result<Admission, DpsRefusal> {
        let scope = self.id_scope().unwrap_or_default();
        if !dps::scope_matches(&client.id_scope, scope) {
            return Err(unauthorized(format!(
                "unknown ID scope {:?}",
                client.id_scope
            )));
        }
        match client.password.as_deref() {
            Some(password) => self.admit_sas(client, scope, password).await,
            None => self.admit_x509(client).await,
        }
    }

    async fn admit_sas(
        &self,
        client: &ProvisioningClient,
        scope: &str,
        password: &str,
    ) -> Result<Admission, DpsRefusal> {
        let token = SasToken::parse(password)
            .map_err(|e| unauthorized(format!("malformed SAS token: {e}")))?;
        if token.is_expired(crate::auth::now_epoch()) {
            return Err(unauthorized("SAS token expired"));
        }
        if token
            .key_name
            .as_deref()
            .is_some_and(|k| k != dps::DEVICE_KEY_NAME)
        {
            return Err(unauthorized(format!(
                "token key name {:?} is not {:?}",
                token.key_name,
                dps::DEVICE_KEY_NAME
            )));
        }
        if !dps::resource_matches(&token.resource, scope, &client.registration_id) {
            return Err(unauthorized(format!(
                "token resource {:?} does not name this registration",
                token.resource
            )));
        }
        let rid = &client.registration_id;
        if let Some(e) = self.individual(rid).await? {
            if e.attestation.kind != AttestationType::SymmetricKey {
                return Err(unauthorized("the enrollment does not use symmetric keys"));
            }
            let keys = e.attestation.symmetric_key.clone().unwrap_or_default();
            if !verify_either(
                &token,
                keys.primary_key.as_deref(),
                keys.secondary_key.as_deref(),
            ) {
                return Err(unauthorized(
                    "signature does not match the enrollment's keys",
                ));
            }
            return Ok(Admission {
                matched: Matched::Individual(Box::new(e)),
                auth: sas_auth(keys.primary_key, keys.secondary_key),
            });
        }
        let mut disabled_match = false;
        for g in self.groups(AttestationType::SymmetricKey).await? {
            let keys = g.attestation.symmetric_key.clone().unwrap_or_default();
            let derive = |k: Option<&str>| k.and_then(|k| dps::derive_device_key(k, rid).ok());
            let primary = derive(keys.primary_key.as_deref());
            let secondary = derive(keys.secondary_key.as_deref());
            if verify_either(&token, primary.as_deref(), secondary.as_deref()) {
                if g.provisioning_status == ProvisioningStatus::Enabled {
                    return Ok(Admission {
                        matched: Matched::Group(Box::new(g)),
                        auth: sas_auth(primary, secondary),
                    });
                }
                disabled_match = true;
            }
        }
        if disabled_match {
            Err(unauthorized("the enrollment group is disabled"))
        } else {
            Err(unauthorized(
                "no enrollment for this registration id, and no group's derived key signed the token",
            ))
        }
    }

    /// X.509: the leaf's CN must be the registration id (DPS's rule); an individual enrollment
    /// names the device's certificates (by PEM or thumbprint), a group its CAs (by PEM, or a
    /// reference to a CA registered with the hub). The device is registered with the
    /// thumbprint of the certificate it presented (an individual enrollment's own
    /// certificates), so it connects to the hub with the same certificate.
    async fn admit_x509(&self, client: &ProvisioningClient) -> Result<Admission, DpsRefusal> {
        let chain = client.client_certs.as_slice();
        let Some(leaf) = chain.first() else {
            return Err(unauthorized("no SAS token and no client certificate"));
        };
        let rid = &client.registration_id;
        let cn = crate::x509::common_name(leaf);
        if cn.as_deref() != Some(rid.as_str()) {
            return Err(unauthorized(format!(
                "certificate CN {cn:?} is not the registration id"
            )));
        }
        let (_, leaf_sha256) = crate::x509::thumbprints(leaf);
        if let Some(e) = self.individual(rid).await? {
            if e.attestation.kind != AttestationType::X509 {
                return Err(unauthorized("the enrollment does not use X.509"));
            }
            let registered = client_thumbprints(e.attestation.x509.as_ref());
            if !registered
                .iter()
                .any(|t| crate::x509::thumbprint_matches(leaf, t))
            {
                return Err(unauthorized("client certificate is not the enrollment's"));
            }
            let mut it = registered.into_iter();
            return Ok(Admission {
                matched: Matched::Individual(Box::new(e)),
                auth: thumbprint_auth(it.next(), it.next()),
            });
        }
        let hub_cas = self.store.list_certificates().await.map_err(server_error)?;
        let mut disabled_match = false;
        for g in self.groups(AttestationType::X509).await? {
            let cas = group_cas(g.attestation.x509.as_ref(), &hub_cas);
            if cas.is_empty() || crate::x509::verify_ca_signed(chain, &cas, rid).is_err() {
                continue;
            }
            if g.provisioning_status == ProvisioningStatus::Enabled {
                return Ok(Admission {
                    matched: Matched::Group(Box::new(g)),
                    auth: thumbprint_auth(Some(leaf_sha256), None),
                });
            }
            disabled_match = true;
        }
        if disabled_match {
            Err(unauthorized("the enrollment group is disabled"))
        } else {
            Err(unauthorized(
                "no enrollment for this registration id, and no group's CA signed the certificate",
            ))
        }
    }

    /// The individual enrollment of `rid`, refused when disabled.
    async fn individual(&self, rid: &str) -> Result<Option<IndividualEnrollment>, DpsRefusal> {
        let Some(rec) = self
            .store
            .get_provisioning(ProvisioningKind::Enrollment, rid)
            .await
            .map_err(server_error)?
        else {
            return Ok(None);
        };
        let e: IndividualEnrollment = serde_json::from_str(&rec.doc).map_err(server_error)?;
        if e.provisioning_status != ProvisioningStatus::Enabled {
            return Err(unauthorized("the enrollment is disabled"));
        }
        Ok(Some(e))
    }

    /// Every enrollment group of one attestation kind, enabled or not, page by page.
    async fn groups(&self, kind: AttestationType) -> Result<Vec<EnrollmentGroup>, DpsRefusal> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .store
                .list_provisioning(ProvisioningKind::EnrollmentGroup, after.as_deref(), 100)
                .await
                .map_err(server_error)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            for rec in &page {
                let g: EnrollmentGroup = serde_json::from_str(&rec.doc).map_err(server_error)?;
                if g.attestation.kind == kind {
                    out.push(g);
                }
            }
        }
        Ok(out)
    }

    /// Allocates the device, creates or updates it in the registry, applies the initial twin
    /// on creation and the model id, and records the registration with a new operation id.
    async fn assign(
        &self,
        registration_id: &str,
        Admission { matched, auth }: Admission,
        payload: Option<Value>,
    ) -> Result<RegistrationState, DpsRefusal> {
        debug_assert!(matched.enabled());
        let (device_id, group_id) = match &matched {
            Matched::Individual(e) => (
                e.device_id
                    .clone()
                    .unwrap_or_else(|| registration_id.to_string()),
                None,
            ),
            Matched::Group(g) => (
                registration_id.to_string(),
                Some(g.enrollment_group_id.clone()),
            ),
        };
        // An id the registry cannot hold is refused rather than mangled.
        validate_device_id(&device_id).map_err(|e| {
            refusal(
                DpsErrorCode::BadRequest,
                format!("device id {device_id:?}: {e}"),
            )
        })?;
        let allocator =
            self.provisioning.allocator.get().cloned().ok_or_else(|| {
                refusal(DpsErrorCode::ServerError, "provisioning not initialised")
            })?;
        let hub = allocator.allocate(&AllocationRequest {
            registration_id,
            device_id: &device_id,
            requested_hub: matched.requested_hub(),
            allocation_policy: matched.allocation_policy(),
        })?;

        let existing = self
            .store
            .get_device(&device_id)
            .await
            .map_err(server_error)?;
        let created = match existing {
            None => {
                let req = IdentityRequest {
                    authentication: Some(auth),
                    ..Default::default()
                };
                self.put_device_now(&device_id, req, None).await?;
                true
            }
            Some(d) => {
                if auth_differs(&d.authentication, &auth) {
                    // Re-provisioning with other credentials (a rotated group key, a new
                    // certificate, a new enrollment): the device's hub credentials follow.
                    let req = IdentityRequest {
                        authentication: Some(auth),
                        status: Some(d.status),
                        ..Default::default()
                    };
                    self.update_device_now(&device_id, req, IfMatch::Any)
                        .await?;
                }
                false
            }
        };
        let identity = Identity::device(&device_id);
        let previous = self
            .store
            .get_provisioning(ProvisioningKind::Registration, registration_id)
            .await
            .map_err(server_error)?
            .and_then(|r| serde_json::from_str::<RegistrationState>(&r.doc).ok());
        // The initial twin goes with the first registration: when the device is created, or
        // when no registration was recorded yet (a first attempt that created the device and
        // then failed before recording its registration applies it on the retry).
        if created || previous.is_none() {
            if let Some(t) = matched.initial_twin() {
                let mut patch = serde_json::Map::new();
                if let Some(tags) = &t.tags {
                    patch.insert("tags".into(), tags.clone());
                }
                if let Some(desired) = t.properties.as_ref().and_then(|p| p.desired.clone()) {
                    patch.insert("properties".into(), json!({ "desired": desired }));
                }
                if !patch.is_empty() {
                    self.update_twin_unthrottled(
                        &identity,
                        Value::Object(patch),
                        false,
                        IfMatch::Any,
                    )
                    .await
                    .map_err(|e| {
                        refusal(DpsErrorCode::ServerError, format!("initial twin: {e}"))
                    })?;
                }
            }
            self.apply_configurations_to(&device_id).await;
        }
        if let Some(model_id) = payload
            .as_ref()
            .and_then(|p| p.get("modelId"))
            .and_then(Value::as_str)
        {
            self.record_model_id(&identity, model_id).await;
        }

        let now = timefmt::now_iso();
        let substatus = match (&previous, created) {
            (_, true) | (None, _) => "initialAssignment".to_string(),
            (Some(p), false) => p
                .substatus
                .clone()
                .unwrap_or_else(|| "initialAssignment".into()),
        };
        let mut state = RegistrationState {
            registration_id: registration_id.to_string(),
            created_date_time_utc: previous
                .as_ref()
                .and_then(|p| p.created_date_time_utc.clone())
                .or_else(|| Some(now.clone())),
            assigned_hub: Some(hub),
            device_id: Some(device_id),
            status: "assigned".into(),
            substatus: Some(substatus),
            last_updated_date_time_utc: Some(now),
            etag: None,
            payload,
            enrollment_group_id: group_id,
            operation_id: Some(new_operation_id()),
        };
        let doc = serde_json::to_string(&state).map_err(server_error)?;
        let rec = self
            .store
            .put_provisioning(
                ProvisioningKind::Registration,
                registration_id,
                doc,
                IfMatch::Any,
            )
            .await
            .map_err(server_error)?;
        state.etag = Some(rec.etag);
        Ok(state)
    }
}

/// A registration that passed: its enrollment, and the credentials its device gets.
struct Admission {
    matched: Matched,
    auth: AuthRequest,
}

fn sas_auth(primary: Option<String>, secondary: Option<String>) -> AuthRequest {
    AuthRequest {
        auth_type: Some(AuthType::Sas),
        symmetric_key: Some(SymmetricKey {
            primary_key: primary,
            secondary_key: secondary,
        }),
        x509_thumbprint: None,
    }
}

fn thumbprint_auth(primary: Option<String>, secondary: Option<String>) -> AuthRequest {
    AuthRequest {
        auth_type: Some(AuthType::SelfSigned),
        symmetric_key: None,
        x509_thumbprint: Some(X509Thumbprint {
            primary_thumbprint: primary,
            secondary_thumbprint: secondary,
        }),
    }
}

/// Whether a device's registry credentials differ from what its enrollment gives it.
fn auth_differs(current: &Authentication, want: &AuthRequest) -> bool {
    if Some(current.auth_type) != want.auth_type {
        return true;
    }
    match current.auth_type {
        AuthType::Sas => want.symmetric_key.as_ref() != Some(&current.symmetric_key),
        // The registry keeps thumbprints in upper case, as they are made here.
        AuthType::SelfSigned => want.x509_thumbprint.as_ref() != Some(&current.x509_thumbprint),
        AuthType::CertificateAuthority | AuthType::None => false,
    }
}

/// `{"primary": {...}, "secondary": {...}}` of an X.509 attestation's `section`, primary first.
fn x509_slots<'a>(x509: Option<&'a Value>, section: &str) -> Vec<&'a Value> {
    ["primary", "secondary"]
        .iter()
        .filter_map(|slot| x509?.get(section)?.get(slot))
        .filter(|v| !v.is_null())
        .collect()
}

/// The thumbprints (upper-case hex) of an individual enrollment's client certificates: from
/// the PEM when given, else from DPS's `info` (`sha256Thumbprint`, else `sha1Thumbprint`).
fn client_thumbprints(x509: Option<&Value>) -> Vec<String> {
    x509_slots(x509, "clientCertificates")
        .into_iter()
        .filter_map(|c| {
            if let Some(pem) = c.get("certificate").and_then(Value::as_str) {
                let der = crate::x509::pem_to_der(pem).ok()?;
                return Some(crate::x509::thumbprints(&der).1);
            }
            let info = c.get("info")?;
            info.get("sha256Thumbprint")
                .or_else(|| info.get("sha1Thumbprint"))
                .and_then(Value::as_str)
                .map(|t| t.replace(':', "").to_ascii_uppercase())
        })
        .collect()
}

/// The CAs an X.509 group trusts: its `signingCertificates` (PEM) and the hub's registered CAs
/// its `caReferences` name.
fn group_cas(x509: Option<&Value>, hub_cas: &[CaCertificate]) -> Vec<CaCertificate> {
    let mut out: Vec<CaCertificate> = x509_slots(x509, "signingCertificates")
        .into_iter()
        .filter_map(|c| c.get("certificate").and_then(Value::as_str))
        .map(|pem| CaCertificate {
            name: String::new(),
            etag: String::new(),
            certificate: pem.to_string(),
            subject: String::new(),
            thumbprint: String::new(),
            created: String::new(),
        })
        .collect();
    for name in x509_slots(x509, "caReferences")
        .into_iter()
        .filter_map(Value::as_str)
    {
        out.extend(hub_cas.iter().filter(|c| c.name == name).cloned());
    }
    out
}

/// Checks both keys, always, so timing does not tell which one failed.
fn verify_either(token: &SasToken, primary: Option<&str>, secondary: Option<&str>) -> bool {
    let p = primary.is_some_and(|k| token.verify_signature(k));
    let s = secondary.is_some_and(|k| token.verify_signature(k));
    p | s
}
