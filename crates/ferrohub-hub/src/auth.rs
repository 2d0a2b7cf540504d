//! CONNECT authentication: SAS tokens (identity key or hub policy) and X.509 client
//! certificates, checked against the registry.
//!
//! Every refusal is logged here with its reason and `401003 IoTHubUnauthorized`; the client
//! learns only the CONNACK code.

use std::fmt;

use ferrohub_iothub::sas::{parse_resource, resource_matches_identity, ResourceScope};
use ferrohub_iothub::{parse_connect, ErrorCode, Identity, SasToken};
use ferrohub_mqtt::{Connect, ConnectReturnCode};
use ferrohub_store::{AuthType, Authentication, Status};
use tracing::{info, warn};

use crate::{x509, Hub};

/// How a connection authenticated; stamped on telemetry as `iothub-connection-auth-method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthMethod {
    pub scope: AuthScope,
    pub kind: AuthKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthScope {
    Device,
    Module,
    Hub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    Sas,
    X509,
}

impl AuthMethod {
    /// The scope and type as IoT Hub names them.
    pub(crate) fn names(&self) -> (&'static str, &'static str) {
        let scope = match self.scope {
            AuthScope::Device => "device",
            AuthScope::Module => "module",
            AuthScope::Hub => "hub",
        };
        let kind = match self.kind {
            AuthKind::Sas => "sas",
            AuthKind::X509 => "x509",
        };
        (scope, kind)
    }

    /// The JSON IoT Hub stamps on telemetry.
    pub fn to_json(&self) -> String {
        let (scope, kind) = self.names();
        format!(r#"{{"scope":"{scope}","type":"{kind}","issuer":"iothub"}}"#)
    }
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scope, kind) = self.names();
        write!(f, "{kind}/{scope}")
    }
}

/// A refusal: the CONNACK code, and why (for the log only).
struct Refusal {
    code: ConnectReturnCode,
    why: String,
}

fn refuse(code: ConnectReturnCode, why: impl Into<String>) -> Refusal {
    Refusal {
        code,
        why: why.into(),
    }
}

fn connack_from_u8(code: u8) -> ConnectReturnCode {
    match code {
        1 => ConnectReturnCode::UnacceptableProtocolVersion,
        2 => ConnectReturnCode::IdentifierRejected,
        3 => ConnectReturnCode::ServerUnavailable,
        4 => ConnectReturnCode::BadUserNameOrPassword,
        _ => ConnectReturnCode::NotAuthorized,
    }
}

/// The registry's view of an identity, enough to authenticate it.
struct IdentityRecord {
    enabled: bool,
    authentication: Authentication,
    generation_id: String,
}

/// A connection that passed authentication.
pub struct Authenticated {
    pub identity: Identity,
    pub auth: AuthMethod,
    pub model_id: Option<String>,
    /// The identity's generationId, stamped on its telemetry.
    pub generation_id: String,
    /// The SDK's user agent from the username, for logs.
    pub client_type: Option<String>,
    /// When the credentials stop being valid (Unix seconds): a SAS token's `se`, a CA-signed
    /// certificate's notAfter. IoT Hub closes the connection then.
    pub credentials_expiry: Option<u64>,
}

/// The wall clock in Unix seconds, as token expiries count.
pub(crate) fn now_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Hub {
    /// Authenticates CONNECT; on success returns the identity, how it authenticated and the
    /// IoT Plug and Play model id.
    pub(super) async fn authenticate(
        &self,
        connect: &Connect,
        peer: &crate::Peer,
    ) -> Result<Authenticated, ConnectReturnCode> {
        let info = match parse_connect(&connect.client_id, connect.username.as_deref()) {
            Ok(i) => i,
            Err(e) => {
                let code = connack_from_u8(e.connack_code());
                warn!(client_id = %connect.client_id, peer = %peer.addr, transport = %peer.transport,
                      reason = %e, connack = code as u8, "connection refused");
                crate::metrics::connect_refused(peer.transport, ErrorCode::ArgumentInvalid.name());
                return Err(code);
            }
        };
        let identity = info.identity.clone();
        match self.check_credentials(&identity, connect, peer).await {
            Ok((auth, generation_id, credentials_expiry)) => Ok(Authenticated {
                identity,
                auth,
                model_id: info.model_id,
                generation_id,
                client_type: info.device_client_type,
                credentials_expiry,
            }),
            Err(r) => {
                let error = if r.code == ConnectReturnCode::ServerUnavailable {
                    ErrorCode::ServiceUnavailable
                } else {
                    ErrorCode::IoTHubUnauthorized
                };
                crate::metrics::connect_refused(peer.transport, error.name());
                if r.code == ConnectReturnCode::ServerUnavailable {
                    warn!(identity = %identity, peer = %peer.addr, transport = %peer.transport,
                          reason = %r.why, connack = r.code as u8, "connection refused");
                } else {
                    info!(identity = %identity, peer = %peer.addr, transport = %peer.transport,
                          reason = %r.why, connack = r.code as u8,
                          error_code = ErrorCode::IoTHubUnauthorized.code(),
                          error = ErrorCode::IoTHubUnauthorized.name(), "connection refused");
                }
                Err(r.code)
            }
        }
    }

    async fn identity_record(
        &self,
        identity: &Identity,
    ) -> Result<Option<IdentityRecord>, Refusal> {
        let unavailable = |e: ferrohub_store::StoreError| {
            refuse(
                ConnectReturnCode::ServerUnavailable,
                format!("registry unavailable: {e}"),
            )
        };
        let Some(device) = self
            .store
            .get_device(&identity.device_id)
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let device_enabled = device.status == Status::Enabled;
        match &identity.module_id {
            None => Ok(Some(IdentityRecord {
                enabled: device_enabled,
                authentication: device.authentication,
                generation_id: device.generation_id,
            })),
            Some(m) => Ok(self
                .store
                .get_module(&identity.device_id, m)
                .await
                .map_err(unavailable)?
                .map(|module| IdentityRecord {
                    // A module of a disabled device cannot connect either.
                    enabled: device_enabled,
                    authentication: module.authentication,
                    generation_id: module.generation_id,
                })),
        }
    }

    async fn check_credentials(
        &self,
        identity: &Identity,
        connect: &Connect,
        peer: &crate::Peer,
    ) -> Result<(AuthMethod, String, Option<u64>), Refusal> {
        let scope = if identity.module_id.is_some() {
            AuthScope::Module
        } else {
            AuthScope::Device
        };
        let record = self.identity_record(identity).await?;
        let record = match record {
            Some(r) if r.enabled => r,
            Some(_) => {
                return Err(refuse(
                    ConnectReturnCode::NotAuthorized,
                    "identity is disabled",
                ))
            }
            None => {
                return Err(refuse(
                    ConnectReturnCode::NotAuthorized,
                    "identity not found",
                ))
            }
        };
        match &connect.password {
            Some(password) => {
                let text = std::str::from_utf8(password).map_err(|_| {
                    refuse(
                        ConnectReturnCode::BadUserNameOrPassword,
                        "password is not UTF-8",
                    )
                })?;
                let (method, expiry) = self.check_sas(identity, scope, &record, text).await?;
                Ok((method, record.generation_id, Some(expiry)))
            }
            None => {
                let chain = peer.client_certs.as_slice();
                if chain.is_empty() {
                    return Err(refuse(
                        ConnectReturnCode::NotAuthorized,
                        "no password and no client certificate",
                    ));
                }
                let expiry = self
                    .check_x509(identity, &record.authentication, chain)
                    .await?;
                let method = AuthMethod {
                    scope,
                    kind: AuthKind::X509,
                };
                Ok((method, record.generation_id, expiry))
            }
        }
    }

    async fn check_sas(
        &self,
        identity: &Identity,
        scope: AuthScope,
        record: &IdentityRecord,
        text: &str,
    ) -> Result<(AuthMethod, u64), Refusal> {
        let token = SasToken::parse(text).map_err(|e| {
            refuse(
                ConnectReturnCode::BadUserNameOrPassword,
                format!("malformed SAS token: {e}"),
            )
        })?;
        if token.is_expired(now_epoch()) {
            return Err(refuse(
                ConnectReturnCode::BadUserNameOrPassword,
                "SAS token expired",
            ));
        }
        let resource = parse_resource(&token.resource, &self.hostnames);
        match (&token.key_name, resource) {
            // A hub policy token: any identity, if the policy has the DeviceConnect right.
            (Some(policy_name), Some(res))
                if res == ResourceScope::Hub || res == ResourceScope::Device(identity.clone()) =>
            {
                let policy = self
                    .store
                    .get_policy(policy_name)
                    .await
                    .map_err(|e| {
                        refuse(
                            ConnectReturnCode::ServerUnavailable,
                            format!("policy store: {e}"),
                        )
                    })?
                    .ok_or_else(|| {
                        refuse(
                            ConnectReturnCode::NotAuthorized,
                            format!("unknown policy {policy_name:?}"),
                        )
                    })?;
                if !policy.rights.device_connect {
                    return Err(refuse(
                        ConnectReturnCode::NotAuthorized,
                        format!("policy {policy_name:?} lacks DeviceConnect"),
                    ));
                }
                let ok = token.verify_signature(&policy.primary_key)
                    | token.verify_signature(&policy.secondary_key);
                if !ok {
                    return Err(refuse(
                        ConnectReturnCode::NotAuthorized,
                        "signature does not match the policy key",
                    ));
                }
                let method = AuthMethod {
                    scope: AuthScope::Hub,
                    kind: AuthKind::Sas,
                };
                Ok((method, token.expiry))
            }
            (None, _) if resource_matches_identity(&token.resource, identity, &self.hostnames) => {
                let keys = &record.authentication.symmetric_key;
                if record.authentication.auth_type != AuthType::Sas {
                    return Err(refuse(
                        ConnectReturnCode::NotAuthorized,
                        "identity does not use SAS authentication",
                    ));
                }
                // Both keys are always checked so timing does not tell which one failed.
                let primary = keys
                    .primary_key
                    .as_deref()
                    .map(|k| token.verify_signature(k))
                    .unwrap_or(false);
                let secondary = keys
                    .secondary_key
                    .as_deref()
                    .map(|k| token.verify_signature(k))
                    .unwrap_or(false);
                if !(primary | secondary) {
                    return Err(refuse(
                        ConnectReturnCode::NotAuthorized,
                        "signature does not match the identity keys",
                    ));
                }
                let method = AuthMethod {
                    scope,
                    kind: AuthKind::Sas,
                };
                Ok((method, token.expiry))
            }
            _ => Err(refuse(
                ConnectReturnCode::NotAuthorized,
                format!(
                    "token resource {:?} does not match identity {identity}",
                    token.resource
                ),
            )),
        }
    }

    async fn check_x509(
        &self,
        identity: &Identity,
        auth: &Authentication,
        chain: &[rustls::pki_types::CertificateDer<'static>],
    ) -> Result<Option<u64>, Refusal> {
        let leaf = &chain[0];
        match auth.auth_type {
            AuthType::SelfSigned => {
                let t = &auth.x509_thumbprint;
                let ok = [&t.primary_thumbprint, &t.secondary_thumbprint]
                    .into_iter()
                    .flatten()
                    .any(|expected| x509::thumbprint_matches(leaf, expected));
                // No deadline: a registered thumbprint is trusted as such, and its validity
                // period is not checked at connect either.
                if ok {
                    Ok(None)
                } else {
                    Err(refuse(
                        ConnectReturnCode::NotAuthorized,
                        "client certificate thumbprint not registered",
                    ))
                }
            }
            AuthType::CertificateAuthority => {
                let cas = self.store.list_certificates().await.map_err(|e| {
                    refuse(
                        ConnectReturnCode::ServerUnavailable,
                        format!("certificate store: {e}"),
                    )
                })?;
                // A module's certificate names the module identity as IoT Hub writes it,
                // `{deviceId}/{moduleId}`: a bare module id is ambiguous (every device may have a
                // module `m1`), so a CA willing to sign "m1" for one device would open that module
                // on all of them. IoT Hub's own behaviour; see MicrosoftDocs/azure-docs issues
                // #63273 and #111494, which document it.
                let expected_cn = match &identity.module_id {
                    Some(m) => format!("{}/{m}", identity.device_id),
                    None => identity.device_id.clone(),
                };
                x509::verify_ca_signed(chain, &cas, &expected_cn)
                    .map_err(|e| refuse(ConnectReturnCode::NotAuthorized, e))?;
                Ok(x509::not_after(leaf))
            }
            AuthType::Sas | AuthType::None => Err(refuse(
                ConnectReturnCode::NotAuthorized,
                "identity does not use X.509 authentication",
            )),
        }
    }
}
