//! The explorer's front-end files (`crates/ferrohub/explorer/`), embedded in the binary at
//! compile time, debug builds included, and served with a content type, an ETag and
//! `Cache-Control: no-cache`.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::api::ApiError;

#[derive(rust_embed::Embed)]
#[folder = "explorer/"]
struct Assets;

/// The content type of a file by its extension. Unknown kinds go out as bytes, which
/// `nosniff` keeps a browser from running.
fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    match ext.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" | "map" => "application/json",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// Whether an `If-None-Match` value names `etag` (or is `*`); weak tags compare by value, as
/// RFC 9110 has it for this header.
fn none_match(header: &str, etag: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

fn not_found() -> Response {
    ApiError::new(
        ferrohub_iothub::ErrorCode::InvalidOperation,
        "no such explorer file",
    )
    .with_status(StatusCode::NOT_FOUND)
    .into_response()
}

/// The embedded file at `path` (relative to the assets folder), or 404.
pub fn serve(path: &str, request: &HeaderMap) -> Response {
    let Some(file) = Assets::get(path) else {
        return not_found();
    };
    let hash = file.metadata.sha256_hash();
    let etag = format!("\"{}\"", hex::encode(&hash[..16]));
    let mut headers = HeaderMap::new();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    let unchanged = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| none_match(v, &etag));
    if unchanged {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    (headers, file.data.into_owned()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(content_type("app.js"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("a/b/style.CSS"), "text/css; charset=utf-8");
        assert_eq!(content_type("fonts/x.woff2"), "font/woff2");
        assert_eq!(content_type("LICENSE"), "application/octet-stream");
    }

    #[test]
    fn if_none_match_takes_lists_weak_tags_and_star() {
        assert!(none_match("\"a\"", "\"a\""));
        assert!(none_match("\"b\", W/\"a\"", "\"a\""));
        assert!(none_match("*", "\"a\""));
        assert!(!none_match("\"b\"", "\"a\""));
    }

    #[test]
    fn the_index_is_embedded() {
        assert!(Assets::get("index.html").is_some());
        assert!(Assets::get("../Cargo.toml").is_none());
    }
}
