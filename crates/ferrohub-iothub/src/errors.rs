//! IoT Hub's numeric error codes, mirrored in logs and in service API error bodies.

use std::fmt;

/// An IoT Hub error code. The first three digits are the HTTP status. Names are spelled as in
/// the protocol spec's table, and otherwise as the service SDKs spell them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorCode {
    GenericBadRequest,
    InvalidProtocolVersion,
    InvalidOperation,
    ArgumentInvalid,
    ArgumentNull,
    IotHubFormatError,
    ConnectionForcefullyClosedOnNewConnection,
    InvalidContentEncodingOrType,
    IotHubUnauthorizedAccess,
    IoTHubUnauthorized,
    IotHubQuotaExceeded,
    DeviceMaximumQueueDepthExceeded,
    DeviceNotFound,
    JobNotFound,
    ModuleNotFound,
    DeviceNotOnline,
    DeviceConnectionClosedRemotely,
    DeviceAlreadyExists,
    ModuleAlreadyExistsOnDevice,
    PreconditionFailed,
    DeviceMessageLockLost,
    MessageTooLarge,
    TooManyDevices,
    TooManyModulesOnDevice,
    ThrottlingException,
    ServerError,
    ServiceUnavailable,
    GatewayTimeout,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::GenericBadRequest,
        ErrorCode::InvalidProtocolVersion,
        ErrorCode::InvalidOperation,
        ErrorCode::ArgumentInvalid,
        ErrorCode::ArgumentNull,
        ErrorCode::IotHubFormatError,
        ErrorCode::ConnectionForcefullyClosedOnNewConnection,
        ErrorCode::InvalidContentEncodingOrType,
        ErrorCode::IotHubUnauthorizedAccess,
        ErrorCode::IoTHubUnauthorized,
        ErrorCode::IotHubQuotaExceeded,
        ErrorCode::DeviceMaximumQueueDepthExceeded,
        ErrorCode::DeviceNotFound,
        ErrorCode::JobNotFound,
        ErrorCode::ModuleNotFound,
        ErrorCode::DeviceNotOnline,
        ErrorCode::DeviceConnectionClosedRemotely,
        ErrorCode::DeviceAlreadyExists,
        ErrorCode::ModuleAlreadyExistsOnDevice,
        ErrorCode::PreconditionFailed,
        ErrorCode::DeviceMessageLockLost,
        ErrorCode::MessageTooLarge,
        ErrorCode::TooManyDevices,
        ErrorCode::TooManyModulesOnDevice,
        ErrorCode::ThrottlingException,
        ErrorCode::ServerError,
        ErrorCode::ServiceUnavailable,
        ErrorCode::GatewayTimeout,
    ];

    pub fn code(&self) -> u32 {
        match self {
            ErrorCode::GenericBadRequest => 400000,
            ErrorCode::InvalidProtocolVersion => 400001,
            ErrorCode::InvalidOperation => 400003,
            ErrorCode::ArgumentInvalid => 400004,
            ErrorCode::ArgumentNull => 400005,
            ErrorCode::IotHubFormatError => 400006,
            ErrorCode::ConnectionForcefullyClosedOnNewConnection => 400027,
            ErrorCode::InvalidContentEncodingOrType => 400103,
            ErrorCode::IotHubUnauthorizedAccess => 401002,
            ErrorCode::IoTHubUnauthorized => 401003,
            ErrorCode::IotHubQuotaExceeded => 403002,
            ErrorCode::DeviceMaximumQueueDepthExceeded => 403004,
            ErrorCode::DeviceNotFound => 404001,
            ErrorCode::JobNotFound => 404002,
            ErrorCode::ModuleNotFound => 404010,
            ErrorCode::DeviceNotOnline => 404103,
            ErrorCode::DeviceConnectionClosedRemotely => 404104,
            ErrorCode::DeviceAlreadyExists => 409001,
            ErrorCode::ModuleAlreadyExistsOnDevice => 409301,
            ErrorCode::PreconditionFailed => 412001,
            ErrorCode::DeviceMessageLockLost => 412002,
            ErrorCode::MessageTooLarge => 413001,
            ErrorCode::TooManyDevices => 413002,
            ErrorCode::TooManyModulesOnDevice => 413003,
            ErrorCode::ThrottlingException => 429001,
            ErrorCode::ServerError => 500001,
            ErrorCode::ServiceUnavailable => 503001,
            ErrorCode::GatewayTimeout => 504101,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ErrorCode::GenericBadRequest => "GenericBadRequest",
            ErrorCode::InvalidProtocolVersion => "InvalidProtocolVersion",
            ErrorCode::InvalidOperation => "InvalidOperation",
            ErrorCode::ArgumentInvalid => "ArgumentInvalid",
            ErrorCode::ArgumentNull => "ArgumentNull",
            ErrorCode::IotHubFormatError => "IotHubFormatError",
            ErrorCode::ConnectionForcefullyClosedOnNewConnection => {
                "ConnectionForcefullyClosedOnNewConnection"
            }
            ErrorCode::InvalidContentEncodingOrType => "InvalidContentEncodingOrType",
            ErrorCode::IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            ErrorCode::IoTHubUnauthorized => "IoTHubUnauthorized",
            ErrorCode::IotHubQuotaExceeded => "IotHubQuotaExceeded",
            ErrorCode::DeviceMaximumQueueDepthExceeded => "DeviceMaximumQueueDepthExceeded",
            ErrorCode::DeviceNotFound => "DeviceNotFound",
            ErrorCode::JobNotFound => "JobNotFound",
            ErrorCode::ModuleNotFound => "ModuleNotFound",
            ErrorCode::DeviceNotOnline => "DeviceNotOnline",
            ErrorCode::DeviceConnectionClosedRemotely => "DeviceConnectionClosedRemotely",
            ErrorCode::DeviceAlreadyExists => "DeviceAlreadyExists",
            ErrorCode::ModuleAlreadyExistsOnDevice => "ModuleAlreadyExistsOnDevice",
            ErrorCode::PreconditionFailed => "PreconditionFailed",
            ErrorCode::DeviceMessageLockLost => "DeviceMessageLockLost",
            ErrorCode::MessageTooLarge => "MessageTooLarge",
            ErrorCode::TooManyDevices => "TooManyDevices",
            ErrorCode::TooManyModulesOnDevice => "TooManyModulesOnDevice",
            ErrorCode::ThrottlingException => "ThrottlingException",
            ErrorCode::ServerError => "ServerError",
            ErrorCode::ServiceUnavailable => "ServiceUnavailable",
            ErrorCode::GatewayTimeout => "GatewayTimeout",
        }
    }

    /// The HTTP status a REST response carrying this error uses: the code's first three digits.
    pub fn http_status(&self) -> u16 {
        // Every code is six digits, so the quotient is 400..=599 and fits.
        (self.code() / 1000) as u16
    }

    pub fn from_code(code: u32) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|e| e.code() == code)
    }

    /// The JSON error body twin responses and the service API carry; the Node SDK treats a twin
    /// response as failed exactly when its body has `errorCode`.
    pub fn json_body(&self, message: &str) -> serde_json::Value {
        serde_json::json!({ "errorCode": self.code(), "message": message })
    }
}

/// `404001 DeviceNotFound`, the form IoT Hub logs use.
impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code(), self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_table() {
        let table = [
            (400000, "GenericBadRequest", 400),
            (400004, "ArgumentInvalid", 400),
            (400103, "InvalidContentEncodingOrType", 400),
            (400027, "ConnectionForcefullyClosedOnNewConnection", 400),
            (401003, "IoTHubUnauthorized", 401),
            (403004, "DeviceMaximumQueueDepthExceeded", 403),
            (404001, "DeviceNotFound", 404),
            (404002, "JobNotFound", 404),
            (404103, "DeviceNotOnline", 404),
            (404104, "DeviceConnectionClosedRemotely", 404),
            (409001, "DeviceAlreadyExists", 409),
            (412001, "PreconditionFailed", 412),
            (412002, "DeviceMessageLockLost", 412),
            (413001, "MessageTooLarge", 413),
            (429001, "ThrottlingException", 429),
            (504101, "GatewayTimeout", 504),
        ];
        for (code, name, status) in table {
            let e = ErrorCode::from_code(code).unwrap();
            assert_eq!(e.name(), name);
            assert_eq!(e.http_status(), status);
            assert_eq!(e.to_string(), format!("{code} {name}"));
        }
    }

    #[test]
    fn codes_are_unique_six_digit_and_named_like_the_variant() {
        let mut seen = std::collections::HashSet::new();
        for e in ErrorCode::ALL {
            assert!(seen.insert(e.code()), "{e} duplicated");
            assert!((400_000..600_000).contains(&e.code()));
            assert_eq!(format!("{e:?}"), e.name());
            assert_eq!(ErrorCode::from_code(e.code()), Some(*e));
        }
        assert_eq!(ErrorCode::from_code(404003), None);
    }

    #[test]
    fn json_body() {
        assert_eq!(
            ErrorCode::ArgumentInvalid
                .json_body("not a JSON object")
                .to_string(),
            r#"{"errorCode":400004,"message":"not a JSON object"}"#
        );
    }
}
