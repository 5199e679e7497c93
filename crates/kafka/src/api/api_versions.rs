//! ApiVersions: which APIs and versions this broker serves.

use kafka_protocol::messages::ApiVersionsResponse;
use kafka_protocol::messages::api_versions_response::ApiVersion;

/// The response, with `error_code` (0, or UNSUPPORTED_VERSION for the v0 fallback).
pub fn response(error_code: i16) -> ApiVersionsResponse {
    let api_keys = super::supported_apis()
        .map(|(key, min, max)| {
            ApiVersion::default()
                .with_api_key(key as i16)
                .with_min_version(min)
                .with_max_version(max)
        })
        .collect();
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(api_keys)
}
