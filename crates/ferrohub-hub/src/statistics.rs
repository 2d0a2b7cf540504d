//! Registry and service statistics (`GET /statistics/devices`, `GET /statistics/service`):
//! counts the store and the presence registry compute, never a walk over every record here.

use serde::{Deserialize, Serialize};

use crate::error::HubError;
use crate::Hub;

/// IoT Hub's `RegistryStatistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatistics {
    pub total_device_count: u64,
    pub enabled_device_count: u64,
    pub disabled_device_count: u64,
}

/// IoT Hub's `ServiceStatistics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatistics {
    pub connected_device_count: u64,
}

impl Hub {
    /// Devices in the registry, by status. Modules are not counted, as in IoT Hub.
    pub async fn registry_statistics(&self) -> Result<RegistryStatistics, HubError> {
        let total = self.store.count_devices().await?;
        let disabled = self.store.count_disabled_devices().await?;
        // Two reads, not one snapshot: a device created between them must not make the
        // enabled count wrap.
        let disabled = disabled.min(total);
        Ok(RegistryStatistics {
            total_device_count: total,
            enabled_device_count: total - disabled,
            disabled_device_count: disabled,
        })
    }

    /// Devices connected now (to this process; a cluster's presence registry counts them all).
    pub fn service_statistics(&self) -> ServiceStatistics {
        ServiceStatistics {
            connected_device_count: self.presence.connected_devices(),
        }
    }
}
