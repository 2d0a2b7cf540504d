//! The service side of twins as front ends call it: reads, and updates that run to their end
//! (a desired-property change is committed and its notification sent even when the caller has
//! gone), with failures as [`HubError`]. The twin logic itself is in `twins.rs`.

use ferrohub_iothub::Identity;
use ferrohub_store::IfMatch;
use serde_json::Value;

use crate::error::HubError;
use crate::Hub;

impl Hub {
    /// The full service-side twin of a registered identity.
    pub async fn service_twin(&self, identity: &Identity) -> Result<Value, HubError> {
        let twin = self.get_twin(identity).await?;
        self.with_configurations(twin).await
    }

    /// `PATCH` (merge, `replace` false) or `PUT` (replace) of tags and desired properties
    /// under `If-Match`; connected devices subscribed to desired changes are told.
    pub async fn service_update_twin(
        &self,
        identity: &Identity,
        body: Value,
        replace: bool,
        if_match: IfMatch,
    ) -> Result<Value, HubError> {
        crate::metrics::twin("service", if replace { "replace" } else { "patch" });
        let identity = identity.clone();
        self.to_the_end(move |hub| async move {
            let twin = hub.update_twin(&identity, body, replace, if_match).await?;
            // New tags may make another configuration target the device or module.
            if identity.module_id.is_none() {
                hub.apply_configurations_to(&identity.device_id).await;
            } else {
                hub.apply_configurations_to_module(&identity).await;
            }
            hub.with_configurations(twin).await
        })
        .await
    }
}
