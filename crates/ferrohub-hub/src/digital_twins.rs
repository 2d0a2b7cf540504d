//! The IoT Plug and Play digital twin API as front ends call it: the digital twin of a device,
//! its JSON Patch update and its commands. Nothing here has state of its own: reads and writes
//! go through the service twin (so etags, desired notifications, configurations and limits
//! are the twin's) and commands are direct methods named `command` or `component*command`.
//! The shapes are `ferrohub_iothub::digital_twin`'s.
//!
//! IoT Hub's digital twin API names devices only (`/digitaltwins/{id}`, and the service SDKs
//! have no module form), so modules are not covered here either.

use ferrohub_iothub::digital_twin;
use ferrohub_iothub::{ErrorCode, Identity};
use ferrohub_store::IfMatch;
use serde_json::{json, Value};

use crate::error::HubError;
use crate::methods::{Invocation, MethodResult};
use crate::Hub;

/// A digital twin and the etag of the twin it was made from.
#[derive(Debug, Clone)]
pub struct DigitalTwin {
    pub twin: Value,
    pub etag: String,
}

fn device(device_id: &str) -> Identity {
    Identity {
        device_id: device_id.to_owned(),
        module_id: None,
    }
}

fn etag_of(twin: &Value) -> Result<String, HubError> {
    twin.get("etag")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| HubError::internal("digital twin", "the service twin has no etag"))
}

impl Hub {
    /// The digital twin of a registered device.
    pub async fn digital_twin(&self, device_id: &str) -> Result<DigitalTwin, HubError> {
        let twin = self.service_twin(&device(device_id)).await?;
        Ok(DigitalTwin {
            etag: etag_of(&twin)?,
            twin: digital_twin::digital_twin(device_id, &twin),
        })
    }

    /// Applies a digital twin JSON Patch as a desired-properties update under `If-Match`;
    /// answers the twin's new etag once the update is stored and the device told.
    pub async fn update_digital_twin(
        &self,
        device_id: &str,
        patch: &Value,
        if_match: IfMatch,
    ) -> Result<String, HubError> {
        let identity = device(device_id);
        // Which names are components comes from the twin's markers: the patch alone cannot
        // tell `/thermostat1/targetTemperature` from a member of a complex property.
        let current = self.service_twin(&identity).await?;
        let components = digital_twin::components(&current);
        let desired = digital_twin::desired_patch(patch, &components)
            .map_err(|e| HubError::new(e.code(), e.to_string()))?;
        let body = json!({"properties": {"desired": desired}});
        let twin = self
            .service_update_twin(&identity, body, false, if_match)
            .await?;
        etag_of(&twin)
    }

    /// Invokes a digital twin command (`component*command` on a component) and waits for the
    /// device's answer within the invocation's timeouts.
    pub async fn invoke_command(
        &self,
        device_id: &str,
        component: Option<&str>,
        command: &str,
        mut inv: Invocation,
    ) -> Result<MethodResult, HubError> {
        // A '*' would make the method name ambiguous: the device splits at the first one.
        if component.is_some_and(|c| c.is_empty() || c.contains('*')) {
            return Err(HubError::new(
                ErrorCode::ArgumentInvalid,
                "a component name may not be empty or contain '*'",
            ));
        }
        inv.method_name = match component {
            Some(c) => format!("{c}*{command}"),
            None => command.to_owned(),
        };
        Ok(self.invoke_method(&device(device_id), inv).await?)
    }
}
