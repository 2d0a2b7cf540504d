//! Digital Twin Model Identifiers (`dtmi:com:example:Thermostat;1`): syntax per DTDL version,
//! and the path a model has in a Device Models Repository (`dtmi/com/example/thermostat-1.json`).

use std::fmt;

use thiserror::Error;

/// DTDL's limit on an identifier's length, in characters.
pub const MAX_DTMI_CHARS: usize = 2048;

/// The largest version number DTDL allows.
const MAX_VERSION: u64 = 999_999_999;

/// A syntactically valid model identifier, as written (DTMIs are case-sensitive).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dtmi(String);

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("'{id}' is not a valid DTMI: {reason}")]
pub struct DtmiError {
    pub id: String,
    pub reason: String,
}

impl Dtmi {
    /// Parses a DTMI under the rules of DTDL v3, which accept every v2 identifier and also an
    /// omitted version or a `major.minor` one. Use [`Dtmi::parse_v2`] where v2 applies.
    pub fn parse(text: &str) -> Result<Self, DtmiError> {
        check(text, false).map(|()| Dtmi(text.to_owned()))
    }

    /// DTDL v2: the version is required and a whole number.
    pub fn parse_v2(text: &str) -> Result<Self, DtmiError> {
        check(text, true).map(|()| Dtmi(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where the Device Models Repository keeps this model: the path segments lowercased,
    /// `:` as `/`, `;` as `-`, then `.json` (`dtmi:com:example:Thermostat;1` ->
    /// `dtmi/com/example/thermostat-1.json`).
    pub fn repository_path(&self) -> String {
        format!(
            "{}.json",
            self.0.to_lowercase().replace(':', "/").replace(';', "-")
        )
    }

    /// The same for the expanded form (the model with all its dependencies in one array).
    pub fn expanded_repository_path(&self) -> String {
        format!(
            "{}.expanded.json",
            self.0.to_lowercase().replace(':', "/").replace(';', "-")
        )
    }
}

impl fmt::Display for Dtmi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check(text: &str, v2: bool) -> Result<(), DtmiError> {
    let fail = |reason: &str| {
        Err(DtmiError {
            id: text.chars().take(200).collect(),
            reason: reason.to_owned(),
        })
    };
    if text.chars().count() > MAX_DTMI_CHARS {
        return fail("it is longer than 2048 characters");
    }
    let Some(rest) = text.strip_prefix("dtmi:") else {
        return fail("it must start with 'dtmi:'");
    };
    let (path, version) = match rest.split_once(';') {
        Some((p, v)) => (p, Some(v)),
        None => (rest, None),
    };
    if path.is_empty() {
        return fail("it has no path after 'dtmi:'");
    }
    for segment in path.split(':') {
        if segment.is_empty() {
            return fail("a path segment is empty");
        }
        let mut chars = segment.chars();
        if !chars.next().is_some_and(|c| c.is_ascii_alphabetic()) {
            return fail(&format!("the segment '{segment}' must start with a letter"));
        }
        if !segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return fail(&format!(
                "the segment '{segment}' may hold only letters, digits and underscores"
            ));
        }
        if segment.ends_with('_') {
            return fail(&format!(
                "the segment '{segment}' must not end with an underscore"
            ));
        }
    }
    match version {
        None if v2 => fail("DTDL v2 requires a version (';1')"),
        None => Ok(()),
        Some(v) => {
            let (major, minor) = match v.split_once('.') {
                Some(_) if v2 => return fail("DTDL v2 versions are whole numbers"),
                Some((a, b)) => (a, Some(b)),
                None => (v, None),
            };
            for part in std::iter::once(major).chain(minor) {
                let ok = !part.is_empty()
                    && part.chars().all(|c| c.is_ascii_digit())
                    && !part.starts_with('0')
                    && part.parse::<u64>().is_ok_and(|n| n <= MAX_VERSION);
                if !ok {
                    return fail(&format!(
                        "the version '{v}' must be a number from 1 to 999999999 (major.minor in v3), without leading zeros"
                    ));
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        for id in [
            "dtmi:com:example:Thermostat;1",
            "dtmi:azure:DeviceManagement:DeviceInformation;1",
            "dtmi:a;999999999",
            "dtmi:com:x_y:Z9;12",
        ] {
            assert!(Dtmi::parse_v2(id).is_ok(), "{id}");
            assert!(Dtmi::parse(id).is_ok(), "{id}");
        }
        for id in ["dtmi:com:example:Thermostat", "dtmi:com:example:T;1.2"] {
            assert!(Dtmi::parse(id).is_ok(), "{id}");
            assert!(Dtmi::parse_v2(id).is_err(), "{id}");
        }
    }

    #[test]
    fn invalid_ids_say_why() {
        for (id, why) in [
            ("urn:com:x;1", "start with 'dtmi:'"),
            ("dtmi:;1", "no path"),
            ("dtmi:com::x;1", "segment is empty"),
            ("dtmi:1com:x;1", "start with a letter"),
            ("dtmi:com:x-y;1", "only letters"),
            ("dtmi:com:x_;1", "end with an underscore"),
            ("dtmi:com:x;0", "from 1 to 999999999"),
            ("dtmi:com:x;01", "leading zeros"),
            ("dtmi:com:x;1000000000", "from 1 to 999999999"),
            ("dtmi:com:x;1.", "from 1 to 999999999"),
            ("dtmi:com:x;a", "from 1 to 999999999"),
        ] {
            let e = Dtmi::parse(id).expect_err(id);
            assert!(e.reason.contains(why), "{id}: {e}");
        }
        let long = format!("dtmi:{};1", "a".repeat(MAX_DTMI_CHARS));
        assert!(Dtmi::parse(&long).is_err());
    }

    #[test]
    fn repository_paths() {
        let id = Dtmi::parse("dtmi:com:example:TemperatureController;1").unwrap();
        assert_eq!(
            id.repository_path(),
            "dtmi/com/example/temperaturecontroller-1.json"
        );
        assert_eq!(
            id.expanded_repository_path(),
            "dtmi/com/example/temperaturecontroller-1.expanded.json"
        );
    }
}
