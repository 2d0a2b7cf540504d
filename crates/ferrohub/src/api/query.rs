//! `POST /devices/query`: IoT Hub's query over twins (body `{"query": "..."}`), paged with
//! `x-ms-max-item-count` and `x-ms-continuation`; the answer says its item type in
//! `x-ms-item-type` and carries `x-ms-continuation` only when another page exists.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferrohub_hub::query::DEFAULT_PAGE;
use serde::{Deserialize, Serialize};

use super::extract::{json_body, BodyBytes, RegistryRead};
use super::{ApiError, ApiState};

pub const MAX_ITEM_COUNT: &str = "x-ms-max-item-count";
pub const CONTINUATION: &str = "x-ms-continuation";
pub const ITEM_TYPE: &str = "x-ms-item-type";

/// The request body, as the SDKs send it (`QuerySpecification`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuerySpecification {
    pub query: String,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub async fn query(
    _: RegistryRead,
    State(state): State<ApiState>,
    headers: HeaderMap,
    BodyBytes(body): BodyBytes,
) -> Result<Response, ApiError> {
    let spec: QuerySpecification = json_body(&body, "query specification")?;
    let max = match header(&headers, MAX_ITEM_COUNT).map(str::trim) {
        None | Some("") => DEFAULT_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                tracing::info!(
                    value = v,
                    error_code = 400004,
                    "query refused: bad x-ms-max-item-count"
                );
                return Err(ApiError::argument(format!(
                    "{MAX_ITEM_COUNT} must be a positive whole number, not {v:?}"
                )));
            }
        },
    };
    let page = state
        .hub
        .query(&spec.query, max, header(&headers, CONTINUATION))
        .await?;
    let mut resp = Json(page.items).into_response();
    let h = resp.headers_mut();
    h.insert(ITEM_TYPE, HeaderValue::from_static(page.item_type.as_str()));
    if let Some(token) = page.continuation {
        // The token is base64url, always a valid header value.
        if let Ok(v) = HeaderValue::from_str(&token) {
            h.insert(CONTINUATION, v);
        }
    }
    Ok(resp)
}
