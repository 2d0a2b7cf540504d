//! `/statistics/devices` and `/statistics/service`: the registry's and the service's counts
//! (`ferrohub_hub::statistics`) in IoT Hub's shape.

use axum::extract::State;
use axum::Json;
use ferrohub_hub::statistics::{RegistryStatistics, ServiceStatistics};

use super::extract::{RegistryRead, ServiceConnect};
use super::{ApiError, ApiState};

/// IoT Hub's `GET /statistics/devices` needs RegistryRead.
pub async fn devices(
    _: RegistryRead,
    State(state): State<ApiState>,
) -> Result<Json<RegistryStatistics>, ApiError> {
    Ok(Json(state.hub.registry_statistics().await?))
}

/// IoT Hub's `GET /statistics/service` needs ServiceConnect.
pub async fn service(_: ServiceConnect, State(state): State<ApiState>) -> Json<ServiceStatistics> {
    Json(state.hub.service_statistics())
}
