//! Who a connection is: a device or a module of a device, and the rules for their ids.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// IoT Hub caps device and module ids at 128 characters.
pub const MAX_ID_LEN: usize = 128;

/// Special characters IoT Hub allows in device and module ids besides ASCII alphanumerics.
/// `;` is left out although some Azure pages list it: it is the separator of connection strings,
/// so an id containing it could not be written into one. `/` is never allowed: it separates the
/// device and module parts of client ids, usernames, resource URIs and topics.
pub const ID_SPECIAL_CHARS: &str = "-.+%_#*?!(),:=@$'";

/// An authenticated principal on the device side of the hub.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identity {
    pub device_id: String,
    pub module_id: Option<String>,
}

impl Identity {
    pub fn device(device_id: impl Into<String>) -> Self {
        Identity {
            device_id: device_id.into(),
            module_id: None,
        }
    }

    pub fn module(device_id: impl Into<String>, module_id: impl Into<String>) -> Self {
        Identity {
            device_id: device_id.into(),
            module_id: Some(module_id.into()),
        }
    }

    pub fn is_module(&self) -> bool {
        self.module_id.is_some()
    }

    /// Checks both ids against IoT Hub's id rules.
    pub fn validate(&self) -> Result<(), IdError> {
        validate_device_id(&self.device_id)?;
        if let Some(module_id) = &self.module_id {
            validate_module_id(module_id)?;
        }
        Ok(())
    }
}

/// Writes the MQTT client id form: `dev1` or `dev1/mod1`.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.module_id {
            Some(module_id) => write!(f, "{}/{}", self.device_id, module_id),
            None => f.write_str(&self.device_id),
        }
    }
}

/// Which kind of id failed validation, so errors read "invalid module id".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Device,
    Module,
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::Device => "device id",
            IdKind::Module => "module id",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: IdKind },
    #[error("{kind} is {len} characters long (max {MAX_ID_LEN})")]
    TooLong { kind: IdKind, len: usize },
    #[error("{kind} contains {ch:?} at position {position}")]
    InvalidChar {
        kind: IdKind,
        ch: char,
        position: usize,
    },
}

pub fn validate_device_id(id: &str) -> Result<(), IdError> {
    validate(id, IdKind::Device)
}

pub fn validate_module_id(id: &str) -> Result<(), IdError> {
    validate(id, IdKind::Module)
}

fn validate(id: &str, kind: IdKind) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if let Some((position, ch)) = id
        .chars()
        .enumerate()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || ID_SPECIAL_CHARS.contains(c)))
    {
        return Err(IdError::InvalidChar { kind, ch, position });
    }
    // Only ASCII is left at this point, so the byte length is the character count.
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            len: id.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_the_client_id_form() {
        assert_eq!(Identity::device("dev1").to_string(), "dev1");
        assert_eq!(Identity::module("dev1", "mod1").to_string(), "dev1/mod1");
        assert!(Identity::module("d", "m").is_module());
        assert!(!Identity::device("d").is_module());
    }

    #[test]
    fn accepts_every_documented_character() {
        validate_device_id("aZ09-.+%_#*?!(),:=@$'").unwrap();
        validate_module_id("aZ09-.+%_#*?!(),:=@$'").unwrap();
        validate_device_id(&"a".repeat(128)).unwrap();
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(
            validate_device_id(""),
            Err(IdError::Empty {
                kind: IdKind::Device
            })
        );
        assert_eq!(
            validate_module_id(&"m".repeat(129)),
            Err(IdError::TooLong {
                kind: IdKind::Module,
                len: 129
            })
        );
        for bad in [
            "a/b", "a b", "a;b", "a&b", "é", "a\0", "a\"b", "a<b", "a\\b", "a[b",
        ] {
            assert!(
                matches!(validate_device_id(bad), Err(IdError::InvalidChar { .. })),
                "{bad:?} accepted"
            );
        }
        let err = validate_module_id("ok/no").unwrap_err();
        assert_eq!(err.to_string(), "module id contains '/' at position 2");
    }

    #[test]
    fn identity_validate_checks_both_parts() {
        Identity::module("dev1", "mod1").validate().unwrap();
        assert!(Identity::module("dev1", "").validate().is_err());
        assert!(Identity::device("a/b").validate().is_err());
    }
}
