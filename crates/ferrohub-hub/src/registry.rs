//! The identity registry as a service: creating, reading, updating, deleting and listing
//! devices and modules, with generation ids, etags and generated or validated keys, and what a
//! change means for live connections (new keys, a disabled device or a deletion close the
//! identity's connection; a deletion also forgets the persistent sessions and presence of the
//! identity and, for a device, of every one of its modules).
//!
//! Records come back with what only the running hub knows about them ([`Live`]): presence and
//! the depth of the C2D queue. How they are rendered is the front end's business.

use ferrohub_iothub::notifications::Operation;
use ferrohub_iothub::registry::{new_generation_id, valid_symmetric_key, valid_thumbprint};
use ferrohub_iothub::sas::generate_key;
use ferrohub_iothub::{validate_device_id, validate_module_id, ErrorCode, Identity};
use ferrohub_store::{
    AuthType, Authentication, Capabilities, Device, IfMatch, Module, Status, SymmetricKey,
    X509Thumbprint,
};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::error::HubError;
use crate::presence::PresenceEntry;
use crate::timefmt;
use crate::Hub;

/// Most devices one list call returns (IoT Hub's cap for `GET /devices`).
pub const MAX_LIST_DEVICES: usize = 1000;

/// The writable part of a device or module, as clients send it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authentication: Option<AuthRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
}

/// The authentication a client asks for; missing SAS keys are generated.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthRequest {
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub auth_type: Option<AuthType>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetric_key: Option<SymmetricKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_thumbprint: Option<X509Thumbprint>,
}

/// What only the running hub knows about an identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    /// `None` when this process has not seen the identity connect.
    pub presence: Option<PresenceEntry>,
    pub c2d_count: u64,
}

/// A device record with its live overlay.
#[derive(Debug, Clone)]
pub struct LiveDevice {
    pub device: Device,
    pub live: Live,
}

/// A module record with its live overlay.
#[derive(Debug, Clone)]
pub struct LiveModule {
    pub module: Module,
    pub live: Live,
}

fn device_exists(id: &str) -> HubError {
    HubError::new(
        ErrorCode::DeviceAlreadyExists,
        format!("A device with ID '{id}' is already registered."),
    )
}

fn module_exists(id: &str, mid: &str) -> HubError {
    HubError::new(
        ErrorCode::ModuleAlreadyExistsOnDevice,
        format!("A module with ID '{mid}' already exists on device '{id}'."),
    )
}

fn check_ids(id: &str, mid: Option<&str>) -> Result<(), HubError> {
    validate_device_id(id).map_err(|e| HubError::argument(format!("invalid device id: {e}")))?;
    if let Some(mid) = mid {
        validate_module_id(mid)
            .map_err(|e| HubError::argument(format!("invalid module id: {e}")))?;
    }
    Ok(())
}

/// Builds the stored authentication from a request, generating SAS keys that were not given;
/// without a request the current one stays (or, for a new identity, fresh SAS keys).
fn authentication(
    req: Option<AuthRequest>,
    current: Option<&Authentication>,
) -> Result<Authentication, HubError> {
    let Some(req) = req else {
        return Ok(match current {
            Some(c) => c.clone(),
            None => Authentication {
                symmetric_key: SymmetricKey {
                    primary_key: Some(generate_key()),
                    secondary_key: Some(generate_key()),
                },
                ..Default::default()
            },
        });
    };
    let auth_type = req.auth_type.unwrap_or(AuthType::Sas);
    let mut auth = Authentication {
        auth_type,
        ..Default::default()
    };
    match auth_type {
        AuthType::Sas => {
            let given = req.symmetric_key.unwrap_or_default();
            let pick = |k: Option<String>| -> Result<String, HubError> {
                match k.filter(|k| !k.is_empty()) {
                    Some(k) if valid_symmetric_key(&k) => Ok(k),
                    Some(_) => Err(HubError::argument(
                        "symmetric keys must be base64 of 16 to 64 bytes",
                    )),
                    None => Ok(generate_key()),
                }
            };
            auth.symmetric_key = SymmetricKey {
                primary_key: Some(pick(given.primary_key)?),
                secondary_key: Some(pick(given.secondary_key)?),
            };
        }
        AuthType::SelfSigned => {
            let t = req.x509_thumbprint.unwrap_or_default();
            let primary = t.primary_thumbprint.filter(|s| !s.is_empty());
            let secondary = t.secondary_thumbprint.filter(|s| !s.is_empty());
            if primary.is_none() && secondary.is_none() {
                return Err(HubError::argument(
                    "selfSigned authentication needs a thumbprint",
                ));
            }
            if !primary
                .iter()
                .chain(secondary.iter())
                .all(|t| valid_thumbprint(t))
            {
                return Err(HubError::argument(
                    "thumbprints are SHA-1 (40) or SHA-256 (64) hex digits",
                ));
            }
            auth.x509_thumbprint = X509Thumbprint {
                primary_thumbprint: primary.map(|s| s.to_ascii_uppercase()),
                secondary_thumbprint: secondary.map(|s| s.to_ascii_uppercase()),
            };
        }
        AuthType::CertificateAuthority | AuthType::None => {}
    }
    Ok(auth)
}

/// Registry reads.
impl Hub {
    /// The live overlay of an identity.
    pub async fn live(&self, identity: &Identity) -> Result<Live, HubError> {
        let c2d_count = self
            .store
            .c2d_count(&identity.device_id, identity.module_id.as_deref())
            .await?;
        Ok(Live {
            presence: self.presence.get(identity),
            c2d_count,
        })
    }

    async fn live_device(&self, device: Device) -> Result<LiveDevice, HubError> {
        let live = self
            .live(&Identity::device(device.device_id.clone()))
            .await?;
        Ok(LiveDevice { device, live })
    }

    async fn live_module(&self, module: Module) -> Result<LiveModule, HubError> {
        let id = Identity::module(module.device_id.clone(), module.module_id.clone());
        let live = self.live(&id).await?;
        Ok(LiveModule { module, live })
    }

    pub async fn device(&self, id: &str) -> Result<LiveDevice, HubError> {
        let d = self
            .store
            .get_device(id)
            .await?
            .ok_or_else(|| HubError::device_not_found(id))?;
        self.live_device(d).await
    }

    /// Up to `top` devices (1 to [`MAX_LIST_DEVICES`]; all up to the cap when `None`).
    pub async fn devices(&self, top: Option<usize>) -> Result<Vec<LiveDevice>, HubError> {
        let top = top.unwrap_or(MAX_LIST_DEVICES);
        if !(1..=MAX_LIST_DEVICES).contains(&top) {
            return Err(HubError::argument(format!(
                "top must be between 1 and {MAX_LIST_DEVICES}"
            )));
        }
        let devices = self.store.list_devices(top).await?;
        // One query for every queue depth: a list of 1,000 devices is one round trip, not 1,000.
        let ids: Vec<&str> = devices.iter().map(|d| d.device_id.as_str()).collect();
        let counts = self.store.c2d_counts(&ids).await?;
        Ok(devices
            .into_iter()
            .map(|device| {
                let live = Live {
                    presence: self
                        .presence
                        .get(&Identity::device(device.device_id.clone())),
                    c2d_count: counts.get(&device.device_id).copied().unwrap_or(0),
                };
                LiveDevice { device, live }
            })
            .collect())
    }

    pub async fn module(&self, id: &str, mid: &str) -> Result<LiveModule, HubError> {
        let m = self
            .store
            .get_module(id, mid)
            .await?
            .ok_or_else(|| HubError::module_not_found(id, mid))?;
        self.live_module(m).await
    }

    pub async fn modules(&self, id: &str) -> Result<Vec<LiveModule>, HubError> {
        if self.store.get_device(id).await?.is_none() {
            return Err(HubError::device_not_found(id));
        }
        let mut out = Vec::new();
        for m in self.store.list_modules(id).await? {
            out.push(self.live_module(m).await?);
        }
        Ok(out)
    }
}

/// Registry changes. Each runs to its end once started (commit, then closing connections and
/// forgetting sessions), even when the caller stops waiting.
impl Hub {
    /// Creates a device (no `If-Match`, or `*`) or updates it (`If-Match`, IoT Hub's rule: a PUT
    /// without one means "create", so the device must not exist yet).
    pub async fn put_device(
        &self,
        id: &str,
        req: IdentityRequest,
        if_match: Option<IfMatch>,
    ) -> Result<LiveDevice, HubError> {
        check_ids(id, None)?;
        if req.device_id.as_deref().is_some_and(|d| d != id) {
            return Err(HubError::argument(
                "deviceId in the body does not match the URL",
            ));
        }
        let id = id.to_string();
        self.to_the_end(move |hub| async move {
            let saved = hub.put_device_now(&id, req, if_match).await?;
            // A new device may be targeted at once (`*`, or a condition on its id).
            hub.apply_configurations_to(&id).await;
            hub.live_device(saved).await
        })
        .await
    }

    pub(crate) async fn put_device_now(
        &self,
        id: &str,
        req: IdentityRequest,
        if_match: Option<IfMatch>,
    ) -> Result<Device, HubError> {
        let store = &self.store;
        let existing = store.get_device(id).await?;
        let now = timefmt::now_iso();
        let store_err =
            |e| HubError::from_store(e, HubError::device_not_found(id), device_exists(id));
        match (existing, if_match) {
            (None, Some(IfMatch::Etag(_))) => Err(HubError::device_not_found(id)),
            (None, _) => {
                let device = Device {
                    device_id: id.to_string(),
                    generation_id: new_generation_id(),
                    status: req.status.unwrap_or_default(),
                    status_reason: req.status_reason,
                    status_updated_time: Some(now),
                    authentication: authentication(req.authentication, None)?,
                    capabilities: req.capabilities.unwrap_or_default(),
                    ..Default::default()
                };
                let created = store.create_device(device).await.map_err(store_err)?;
                // After the commit: the event reports a device that exists.
                self.emit_lifecycle(Operation::CreateDeviceIdentity, &Identity::device(id), None)
                    .await;
                Ok(created)
            }
            (Some(_), None) => Err(device_exists(id)),
            (Some(current), Some(cond)) => self.update_device_record(current, req, cond).await,
        }
    }

    /// Updates a device that must exist (bulk `update` modes never create one).
    pub(crate) async fn update_device_now(
        &self,
        id: &str,
        req: IdentityRequest,
        cond: IfMatch,
    ) -> Result<Device, HubError> {
        match self.store.get_device(id).await? {
            None => Err(HubError::device_not_found(id)),
            Some(current) => self.update_device_record(current, req, cond).await,
        }
    }

    async fn update_device_record(
        &self,
        current: Device,
        req: IdentityRequest,
        cond: IfMatch,
    ) -> Result<Device, HubError> {
        let id = current.device_id.clone();
        let mut device = current.clone();
        if let Some(s) = req.status {
            if s != current.status {
                device.status_updated_time = Some(timefmt::now_iso());
            }
            device.status = s;
        }
        if req.status_reason.is_some() {
            device.status_reason = req.status_reason;
        }
        device.authentication = authentication(req.authentication, Some(&current.authentication))?;
        if let Some(c) = req.capabilities {
            device.capabilities = c;
        }
        let saved = self.store.update_device(device, cond).await.map_err(|e| {
            HubError::from_store(e, HubError::device_not_found(&id), device_exists(&id))
        })?;
        // New keys or a disabled status take effect at once, as in IoT Hub.
        if saved.status == Status::Disabled || saved.authentication != current.authentication {
            self.kick(&Identity::device(&id));
        }
        Ok(saved)
    }

    /// Deletes a device and its modules, closes their connections and forgets their sessions
    /// and presence.
    pub async fn delete_device(&self, id: &str, if_match: IfMatch) -> Result<(), HubError> {
        let id = id.to_string();
        self.to_the_end(move |hub| async move {
            // Listed first: a failure leaves everything as it was, while a delete that went
            // ahead without the list would leave module sessions no one could forget.
            let modules = hub.store.list_modules(&id).await?;
            // The twins lifecycle events carry are read before they are gone (only when a
            // lifecycle route exists). A device's modules go with it, each with its event.
            let device_twin = hub.lifecycle_twin(&Identity::device(id.as_str())).await;
            let mut module_twins = Vec::new();
            if device_twin.is_some() {
                for m in &modules {
                    let identity = Identity::module(id.as_str(), m.module_id.as_str());
                    let twin = hub.lifecycle_twin(&identity).await;
                    module_twins.push((identity, twin));
                }
            }
            hub.store.delete_device(&id, if_match).await.map_err(|e| {
                HubError::from_store(
                    e,
                    HubError::device_not_found(&id),
                    HubError::device_not_found(&id),
                )
            })?;
            let mut gone = vec![Identity::device(id.clone())];
            gone.extend(
                modules
                    .into_iter()
                    .map(|m| Identity::module(id.clone(), m.module_id)),
            );
            for identity in &gone {
                hub.forget(identity).await;
            }
            for (identity, twin) in module_twins {
                if twin.is_some() {
                    hub.emit_lifecycle(Operation::DeleteModuleIdentity, &identity, twin)
                        .await;
                }
            }
            if device_twin.is_some() {
                hub.emit_lifecycle(
                    Operation::DeleteDeviceIdentity,
                    &Identity::device(id.as_str()),
                    device_twin,
                )
                .await;
            }
            Ok(())
        })
        .await
    }

    /// Creates or updates a module of an existing device (the `If-Match` rule of
    /// [`Hub::put_device`]).
    pub async fn put_module(
        &self,
        id: &str,
        mid: &str,
        req: IdentityRequest,
        if_match: Option<IfMatch>,
    ) -> Result<LiveModule, HubError> {
        check_ids(id, Some(mid))?;
        if req.device_id.as_deref().is_some_and(|d| d != id)
            || req.module_id.as_deref().is_some_and(|m| m != mid)
        {
            return Err(HubError::argument(
                "deviceId/moduleId in the body do not match the URL",
            ));
        }
        let (id, mid) = (id.to_string(), mid.to_string());
        self.to_the_end(move |hub| async move {
            let saved = hub.put_module_now(&id, &mid, req, if_match).await?;
            // As for devices: a new module may be targeted at once (a condition on its id).
            hub.apply_configurations_to_module(&Identity::module(id.as_str(), mid.as_str()))
                .await;
            hub.live_module(saved).await
        })
        .await
    }

    async fn put_module_now(
        &self,
        id: &str,
        mid: &str,
        req: IdentityRequest,
        if_match: Option<IfMatch>,
    ) -> Result<Module, HubError> {
        let store = &self.store;
        if store.get_device(id).await?.is_none() {
            return Err(HubError::device_not_found(id));
        }
        let existing = store.get_module(id, mid).await?;
        match (existing, if_match) {
            (None, Some(IfMatch::Etag(_))) => Err(HubError::module_not_found(id, mid)),
            (None, _) => {
                let module = Module {
                    module_id: mid.to_string(),
                    device_id: id.to_string(),
                    generation_id: new_generation_id(),
                    managed_by: req.managed_by,
                    authentication: authentication(req.authentication, None)?,
                    ..Default::default()
                };
                let created = store.create_module(module).await.map_err(|e| {
                    HubError::from_store(e, HubError::device_not_found(id), module_exists(id, mid))
                })?;
                self.emit_lifecycle(
                    Operation::CreateModuleIdentity,
                    &Identity::module(id, mid),
                    None,
                )
                .await;
                Ok(created)
            }
            (Some(_), None) => Err(module_exists(id, mid)),
            (Some(current), Some(cond)) => {
                let mut module = current.clone();
                module.authentication =
                    authentication(req.authentication, Some(&current.authentication))?;
                if req.managed_by.is_some() {
                    module.managed_by = req.managed_by;
                }
                let saved = store.update_module(module, cond).await.map_err(|e| {
                    HubError::from_store(
                        e,
                        HubError::module_not_found(id, mid),
                        module_exists(id, mid),
                    )
                })?;
                if saved.authentication != current.authentication {
                    self.kick(&Identity::module(id, mid));
                }
                Ok(saved)
            }
        }
    }

    /// Deletes a module, closes its connection and forgets its session and presence.
    pub async fn delete_module(
        &self,
        id: &str,
        mid: &str,
        if_match: IfMatch,
    ) -> Result<(), HubError> {
        let (id, mid) = (id.to_string(), mid.to_string());
        self.to_the_end(move |hub| async move {
            let identity = Identity::module(id.as_str(), mid.as_str());
            let twin = hub.lifecycle_twin(&identity).await;
            hub.store
                .delete_module(&id, &mid, if_match)
                .await
                .map_err(|e| {
                    HubError::from_store(
                        e,
                        HubError::module_not_found(&id, &mid),
                        HubError::module_not_found(&id, &mid),
                    )
                })?;
            hub.forget(&identity).await;
            if twin.is_some() {
                hub.emit_lifecycle(Operation::DeleteModuleIdentity, &identity, twin)
                    .await;
            }
            Ok(())
        })
        .await
    }

    /// Closes the identity's live connection, if any, through the front end that holds it.
    fn kick(&self, identity: &Identity) {
        if let Some(control) = self.connection_control() {
            control.kick(&identity.to_string());
        }
    }

    /// Everything the hub and its front ends keep about a deleted identity goes: its
    /// connection, its persistent session, its presence.
    async fn forget(&self, identity: &Identity) {
        let client_id = identity.to_string();
        if let Some(control) = self.connection_control() {
            control.kick(&client_id);
            if let Err(e) = control.forget_session(&client_id).await {
                // The identity is gone already; its next namesake would find this session.
                warn!(client = %client_id, error = %e, "could not drop the session of a deleted identity");
            }
        }
        self.presence.forget(identity);
        self.forget_conformance(identity);
    }
}

#[cfg(test)]
mod tests;
