//! The device (and module) twin document: its stored form, the merge/replace rules for tags,
//! desired and reported properties, `$version`/`$metadata` bookkeeping, IoT Hub's twin limits,
//! and the JSON views devices and service clients read. Pure functions: no I/O, no clock.
//!
//! Decisions where IoT Hub's documentation is silent or ambiguous:
//! - Merging follows JSON merge patch (RFC 7386): objects merge member by member, anything else
//!   (arrays included) replaces, `null` removes. Removing the last member of an object leaves
//!   `{}` in place rather than pruning the parent, as RFC 7386 does; IoT Hub shows empty
//!   objects in twins (e.g. a PnP component with nothing reported yet).
//! - Every accepted device patch bumps the reported `$version`, even `{}`, so the `$version`
//!   the hub answers with always names a new state. A service desired patch that is empty once
//!   its echoed `$version`/`$metadata` are dropped is a no-op: there is nothing to notify.
//!   A tags write bumps the twin `version` only when the tags actually change.
//! - A service update touching both tags and desired is one write: the twin `version` goes up
//!   by one, not two.
//! - `PUT /twins/{id}` replaces both tags and desired: a missing (or `null`) `tags` or
//!   `properties.desired` means empty, because "replace" is what the REST API documents and a
//!   partial PUT silently keeping old values would make PATCH and PUT indistinguishable.
//! - `properties.reported` in a service body is ignored rather than rejected: the service SDKs'
//!   `replace_twin(get_twin())` round trip sends it back, and reported belongs to the device.
//! - Size limits count the compact JSON of the section (`{"a":1}` is 7 bytes), without
//!   `$version`/`$metadata`. IoT Hub's own formula (key bytes + 8 per number + 4 per boolean)
//!   counts less, so anything we accept IoT Hub would accept too.
//! - Depth counts containers: a top-level member is at level 1, and an object or array may sit
//!   at level 10 at most; scalars may sit inside a level-10 container. That is IoT Hub's
//!   documented example (`one` … `ten` objects holding `"property": "value"`). Arrays count
//!   like objects because an object inside an array is just as nested for queries.
//! - Key and string rules apply inside arrays too, and to keys whose value is `null`: a patch
//!   that IoT Hub would reject for any member is rejected as a whole.
//! - Keys may not contain `#` (our spec's rule, stricter than IoT Hub's public docs).
//! - `replace_desired` gives every property fresh metadata: everything in the body was written.
//! - The notification for a replaced desired section is the whole new section plus `$version`;
//!   members that disappeared are not listed as `null` (a device that needs exact state does a
//!   twin GET, as it does after reconnecting).

use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

use crate::errors::ErrorCode;

/// Limit on the compact JSON of `properties.desired` and of `properties.reported`.
pub const MAX_PROPERTIES_SIZE: usize = 32 * 1024;
/// Limit on the compact JSON of `tags`.
pub const MAX_TAGS_SIZE: usize = 8 * 1024;
/// Deepest level an object or array may sit at; a section's top-level members are level 1.
pub const MAX_DEPTH: usize = 10;
/// Longest property name, in UTF-8 bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Longest string value, in UTF-8 bytes.
pub const MAX_STRING_LEN: usize = 4 * 1024;

pub const VERSION: &str = "$version";
pub const METADATA: &str = "$metadata";
pub const LAST_UPDATED: &str = "$lastUpdated";
pub const LAST_UPDATED_VERSION: &str = "$lastUpdatedVersion";

/// Characters a property name may not contain, besides control characters.
pub const FORBIDDEN_KEY_CHARS: &[char] = &['.', '$', '#', ' '];

/// Error messages quote at most this many characters of an offending key, which may be huge.
const KEY_SHOWN_CHARS: usize = 64;

/// A part of the twin that limits apply to, named as in the service-side twin JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TwinPart {
    Tags,
    Desired,
    Reported,
}

impl TwinPart {
    pub fn as_str(&self) -> &'static str {
        match self {
            TwinPart::Tags => "tags",
            TwinPart::Desired => "properties.desired",
            TwinPart::Reported => "properties.reported",
        }
    }

    pub fn size_limit(&self) -> usize {
        match self {
            TwinPart::Tags => MAX_TAGS_SIZE,
            TwinPart::Desired | TwinPart::Reported => MAX_PROPERTIES_SIZE,
        }
    }
}

impl fmt::Display for TwinPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a twin write was refused. Locations are written like `properties.desired.a.b[2]`.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TwinError {
    #[error("{what} must be a JSON object")]
    NotAnObject { what: String },
    #[error("empty property name in {at}")]
    EmptyKey { at: String },
    #[error("property name {key} in {at} is {len} bytes long (max {MAX_KEY_LEN})")]
    KeyTooLong { at: String, key: String, len: usize },
    #[error("property name {key} in {at} starts with '$', which is reserved")]
    ReservedKey { at: String, key: String },
    #[error(
        "property name {key} in {at} contains {ch:?}; names may not contain '.', '$', '#', \
         space or control characters"
    )]
    InvalidKeyChar { at: String, key: String, ch: char },
    #[error("string value at {at} is {len} bytes long (max {MAX_STRING_LEN})")]
    StringTooLong { at: String, len: usize },
    #[error("{at} is nested deeper than {MAX_DEPTH} levels")]
    TooDeep { at: String },
    #[error("{part} would be {size} bytes of JSON (max {limit})")]
    TooLarge {
        part: TwinPart,
        size: usize,
        limit: usize,
    },
}

impl TwinError {
    /// Every twin validation failure is a bad request as far as IoT Hub is concerned.
    pub fn code(&self) -> ErrorCode {
        match self {
            TwinError::NotAnObject { .. }
            | TwinError::EmptyKey { .. }
            | TwinError::KeyTooLong { .. }
            | TwinError::ReservedKey { .. }
            | TwinError::InvalidKeyChar { .. }
            | TwinError::StringTooLong { .. }
            | TwinError::TooDeep { .. }
            | TwinError::TooLarge { .. } => ErrorCode::ArgumentInvalid,
        }
    }
}

/// One properties section (desired or reported) as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// The properties, without `$version`/`$metadata`.
    pub props: Map<String, Value>,
    /// The section's `$version`.
    pub version: u64,
    /// The section's `$metadata`: an object mirroring `props`, where every property has
    /// `$lastUpdated` (and in desired `$lastUpdatedVersion`) and object properties also hold
    /// their children's metadata under the children's names.
    pub metadata: Value,
}

/// The stored form of a twin; the store keeps it as a JSON string.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Twin {
    /// Goes up by one on every change of tags, desired or reported.
    pub version: u64,
    pub tags: Map<String, Value>,
    pub desired: Section,
    pub reported: Section,
}

/// What a service-side `PATCH`/`PUT /twins/{id}` did.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceUpdate {
    /// The body to publish to the device on `$iothub/twin/PATCH/properties/desired/`, if
    /// desired properties were written.
    pub desired_notification: Option<Value>,
    /// Whether tags or desired properties were written (so the twin version went up).
    pub changed: bool,
}

/// The metadata a write leaves on what it touched. Reported metadata has no version.
#[derive(Clone, Copy)]
struct Stamp<'a> {
    now: &'a str,
    version: Option<u64>,
}

impl Stamp<'_> {
    fn apply(&self, meta: &mut Map<String, Value>) {
        meta.insert(LAST_UPDATED.to_owned(), Value::String(self.now.to_owned()));
        if let Some(version) = self.version {
            meta.insert(LAST_UPDATED_VERSION.to_owned(), Value::from(version));
        }
    }

    fn fresh(&self) -> Map<String, Value> {
        let mut meta = Map::new();
        self.apply(&mut meta);
        meta
    }
}

impl Section {
    fn new(stamp: Stamp<'_>) -> Section {
        Section {
            props: Map::new(),
            version: 1,
            metadata: Value::Object(stamp.fresh()),
        }
    }

    /// The section after merging `patch`, with the next `$version`. `versioned_metadata` is
    /// true for desired, whose metadata records the `$version` of each write.
    fn patched(&self, patch: &Map<String, Value>, now: &str, versioned_metadata: bool) -> Section {
        let version = self.version.saturating_add(1);
        let stamp = Stamp {
            now,
            version: versioned_metadata.then_some(version),
        };
        let mut props = self.props.clone();
        let mut metadata = match &self.metadata {
            Value::Object(meta) => meta.clone(),
            // A stored twin always has object metadata; rebuilding beats failing a write.
            _ => Map::new(),
        };
        merge(&mut props, Some(&mut metadata), patch, stamp);
        stamp.apply(&mut metadata);
        Section {
            props,
            version,
            metadata: Value::Object(metadata),
        }
    }

    /// The section holding exactly `props` (minus nulls), with the next `$version`.
    fn replaced(&self, props: &Map<String, Value>, now: &str, versioned_metadata: bool) -> Section {
        let version = self.version.saturating_add(1);
        let stamp = Stamp {
            now,
            version: versioned_metadata.then_some(version),
        };
        let mut new_props = Map::new();
        let mut metadata = stamp.fresh();
        merge(&mut new_props, Some(&mut metadata), props, stamp);
        Section {
            props: new_props,
            version,
            metadata: Value::Object(metadata),
        }
    }

    fn view(&self, with_metadata: bool) -> Value {
        let mut out = self.props.clone();
        if with_metadata {
            out.insert(METADATA.to_owned(), self.metadata.clone());
        }
        out.insert(VERSION.to_owned(), Value::from(self.version));
        Value::Object(out)
    }

    /// The props plus `$version`: what a device is told about desired properties.
    fn notification(props: &Map<String, Value>, version: u64) -> Value {
        let mut body = props.clone();
        body.insert(VERSION.to_owned(), Value::from(version));
        Value::Object(body)
    }
}

/// A new desired section with the body to notify the device with.
struct DesiredWrite {
    section: Section,
    notification: Value,
}

impl Twin {
    /// A twin as IoT Hub creates it with its identity. `now` is an RFC 3339 UTC timestamp such
    /// as `2026-11-22T07:00:00.1234567Z`, stored verbatim.
    pub fn new(now: &str) -> Twin {
        Twin {
            version: 1,
            tags: Map::new(),
            desired: Section::new(Stamp {
                now,
                version: Some(1),
            }),
            reported: Section::new(Stamp { now, version: None }),
        }
    }

    /// Applies a device's reported-properties patch and returns the new reported `$version`.
    pub fn patch_reported(&mut self, patch: &Value, now: &str) -> Result<u64, TwinError> {
        let patch = as_object(patch, "the reported properties patch")?;
        validate(patch, TwinPart::Reported)?;
        let section = self.reported.patched(patch, now, false);
        check_size(&section.props, TwinPart::Reported)?;
        self.reported = section;
        self.bump();
        Ok(self.reported.version)
    }

    /// Applies a service's desired-properties patch. Returns the notification for the device
    /// (the patch, nulls included, plus the new `$version`), or `None` when the patch holds
    /// nothing but echoed `$version`/`$metadata` and so changed nothing.
    pub fn patch_desired(&mut self, patch: &Value, now: &str) -> Result<Option<Value>, TwinError> {
        let patch = as_object(patch, "the desired properties patch")?;
        let write = self.plan_desired_patch(patch, now)?;
        Ok(write.map(|write| self.commit_desired(write)))
    }

    /// Replaces the desired properties with `desired` (a service `PUT`). Returns the
    /// notification for the device: the whole new desired section plus `$version`.
    pub fn replace_desired(&mut self, desired: &Value, now: &str) -> Result<Value, TwinError> {
        let desired = as_object(desired, "the desired properties")?;
        let write = self.plan_desired_replace(desired, now)?;
        Ok(self.commit_desired(write))
    }

    /// Merges `patch` into the tags; returns whether they changed.
    pub fn patch_tags(&mut self, patch: &Value) -> Result<bool, TwinError> {
        let patch = as_object(patch, "tags")?;
        let tags = plan_tags(&self.tags, patch, false)?;
        Ok(self.commit_tags(tags))
    }

    /// Replaces the tags with `tags` (nulls dropped); returns whether they changed.
    pub fn replace_tags(&mut self, tags: &Value) -> Result<bool, TwinError> {
        let tags = as_object(tags, "tags")?;
        let tags = plan_tags(&self.tags, tags, true)?;
        Ok(self.commit_tags(tags))
    }

    /// Applies the body of `PATCH /twins/{id}` (`replace == false`) or `PUT /twins/{id}`
    /// (`replace == true`): its `tags` and `properties.desired`. Everything else in the body
    /// (`deviceId`, `etag`, `version`, `properties.reported`, …) is ignored, so a twin read
    /// with GET can be sent back as is. Both parts are validated before either is applied.
    pub fn apply_service_update(
        &mut self,
        body: &Value,
        replace: bool,
        now: &str,
    ) -> Result<ServiceUpdate, TwinError> {
        let body = as_object(body, "the twin")?;
        let tags = optional_object(body.get("tags"), "tags")?;
        let desired = match optional_object(body.get("properties"), "properties")? {
            Some(properties) => optional_object(properties.get("desired"), "properties.desired")?,
            None => None,
        };

        let empty = Map::new();
        let (tags, desired) = if replace {
            (
                Some(tags.unwrap_or(&empty)),
                Some(desired.unwrap_or(&empty)),
            )
        } else {
            (tags, desired)
        };

        let new_tags = tags
            .map(|tags| plan_tags(&self.tags, tags, replace))
            .transpose()?;
        let desired_write = match desired {
            Some(desired) if replace => Some(self.plan_desired_replace(desired, now)?),
            Some(desired) => self.plan_desired_patch(desired, now)?,
            None => None,
        };

        let tags_changed = new_tags.as_ref().is_some_and(|tags| *tags != self.tags);
        let changed = tags_changed || desired_write.is_some();
        if let Some(tags) = new_tags {
            self.tags = tags;
        }
        let desired_notification = desired_write.map(|write| {
            self.desired = write.section;
            write.notification
        });
        if changed {
            self.bump();
        }
        Ok(ServiceUpdate {
            desired_notification,
            changed,
        })
    }

    /// The body of a device's twin GET: both sections with `$version`, no metadata.
    pub fn device_view(&self) -> Value {
        let mut out = Map::new();
        out.insert("desired".to_owned(), self.desired.view(false));
        out.insert("reported".to_owned(), self.reported.view(false));
        Value::Object(out)
    }

    /// The `properties` member of the service-side twin JSON: both sections with `$metadata`
    /// and `$version`.
    pub fn properties_view(&self) -> Value {
        let mut out = Map::new();
        out.insert("desired".to_owned(), self.desired.view(true));
        out.insert("reported".to_owned(), self.reported.view(true));
        Value::Object(out)
    }

    /// The full service-side twin JSON: the caller's identity members (`deviceId`, `moduleId`,
    /// `etag`, `status`, `connectionState`, `modelId`, …) followed by `version`, `tags` and
    /// `properties`, which this twin owns and which win over same-named members of `extra`.
    /// Member order is serde_json's `Map` order (sorted unless `preserve_order` is enabled).
    pub fn service_view(&self, extra: Map<String, Value>) -> Value {
        let mut out = extra;
        out.insert("version".to_owned(), Value::from(self.version));
        out.insert("tags".to_owned(), Value::Object(self.tags.clone()));
        out.insert("properties".to_owned(), self.properties_view());
        Value::Object(out)
    }

    /// Validates a desired patch and computes its result without applying it. `None` means
    /// the patch is empty once echoed `$version`/`$metadata` are dropped.
    fn plan_desired_patch(
        &self,
        patch: &Map<String, Value>,
        now: &str,
    ) -> Result<Option<DesiredWrite>, TwinError> {
        let props = without_read_only(patch);
        validate(&props, TwinPart::Desired)?;
        if props.is_empty() {
            return Ok(None);
        }
        let section = self.desired.patched(&props, now, true);
        check_size(&section.props, TwinPart::Desired)?;
        let notification = Section::notification(&props, section.version);
        Ok(Some(DesiredWrite {
            section,
            notification,
        }))
    }

    /// Validates a desired replacement and computes its result without applying it.
    fn plan_desired_replace(
        &self,
        desired: &Map<String, Value>,
        now: &str,
    ) -> Result<DesiredWrite, TwinError> {
        let props = without_read_only(desired);
        validate(&props, TwinPart::Desired)?;
        let section = self.desired.replaced(&props, now, true);
        check_size(&section.props, TwinPart::Desired)?;
        let notification = Section::notification(&section.props, section.version);
        Ok(DesiredWrite {
            section,
            notification,
        })
    }

    fn commit_desired(&mut self, write: DesiredWrite) -> Value {
        self.desired = write.section;
        self.bump();
        write.notification
    }

    fn commit_tags(&mut self, tags: Map<String, Value>) -> bool {
        if tags == self.tags {
            return false;
        }
        self.tags = tags;
        self.bump();
        true
    }

    fn bump(&mut self) {
        self.version = self.version.saturating_add(1);
    }
}

/// The top-level members of a service desired body minus `$version`/`$metadata`: service SDKs
/// send back what GET returned, read-only members included.
fn without_read_only(body: &Map<String, Value>) -> Map<String, Value> {
    body.iter()
        .filter(|(key, _)| key.as_str() != VERSION && key.as_str() != METADATA)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// Validates a tags write and computes the new tags without applying them.
fn plan_tags(
    current: &Map<String, Value>,
    body: &Map<String, Value>,
    replace: bool,
) -> Result<Map<String, Value>, TwinError> {
    validate(body, TwinPart::Tags)?;
    let mut tags = if replace { Map::new() } else { current.clone() };
    merge(
        &mut tags,
        None,
        body,
        Stamp {
            now: "",
            version: None,
        },
    );
    check_size(&tags, TwinPart::Tags)?;
    Ok(tags)
}

fn as_object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, TwinError> {
    match value {
        Value::Object(map) => Ok(map),
        _ => Err(TwinError::NotAnObject {
            what: what.to_owned(),
        }),
    }
}

/// A member that may be absent or `null` (both mean "not given") but is otherwise an object.
fn optional_object<'a>(
    value: Option<&'a Value>,
    what: &str,
) -> Result<Option<&'a Map<String, Value>>, TwinError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => as_object(value, what).map(Some),
    }
}

/// Merges `patch` into `target` (RFC 7386 rules), keeping `meta` in step when given: touched
/// members get `stamp`, removed members lose their metadata, a member that stops being an
/// object loses its children's metadata.
fn merge(
    target: &mut Map<String, Value>,
    mut meta: Option<&mut Map<String, Value>>,
    patch: &Map<String, Value>,
    stamp: Stamp<'_>,
) {
    for (key, value) in patch {
        match value {
            Value::Null => {
                target.remove(key);
                if let Some(meta) = meta.as_deref_mut() {
                    meta.remove(key);
                }
            }
            Value::Object(child_patch) => {
                let slot = target.entry(key.clone()).or_insert(Value::Null);
                let (was_object, mut child) = match std::mem::take(slot) {
                    Value::Object(child) => (true, child),
                    _ => (false, Map::new()),
                };
                let meta_slot = meta
                    .as_deref_mut()
                    .map(|meta| meta.entry(key.clone()).or_insert(Value::Null));
                let mut child_meta = meta_slot.as_ref().map(|_| Map::new());
                if let (Some(slot), Some(child_meta)) = (&meta_slot, child_meta.as_mut()) {
                    if let (true, Value::Object(old)) = (was_object, &**slot) {
                        *child_meta = old.clone();
                    }
                    stamp.apply(child_meta);
                }
                merge(&mut child, child_meta.as_mut(), child_patch, stamp);
                *slot = Value::Object(child);
                if let (Some(slot), Some(child_meta)) = (meta_slot, child_meta) {
                    *slot = Value::Object(child_meta);
                }
            }
            leaf => {
                target.insert(key.clone(), leaf.clone());
                if let Some(meta) = meta.as_deref_mut() {
                    meta.insert(key.clone(), Value::Object(stamp.fresh()));
                }
            }
        }
    }
}

/// A step on the way to a value, for error messages.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

fn location(part: TwinPart, path: &[Step<'_>]) -> String {
    let mut at = part.as_str().to_owned();
    for step in path {
        match step {
            Step::Key(key) => {
                at.push('.');
                at.push_str(&shown_key(key));
            }
            Step::Index(index) => at.push_str(&format!("[{index}]")),
        }
    }
    at
}

/// A key quoted for an error message, shortened if it is long.
fn shown_key(key: &str) -> String {
    if key.chars().count() <= KEY_SHOWN_CHARS {
        format!("{key:?}")
    } else {
        let head: String = key.chars().take(KEY_SHOWN_CHARS).collect();
        format!("{head:?}…")
    }
}

/// Checks the key, string and depth rules on a patch or replacement body. Members sit at the
/// same place in the result as in the body, so the body's depth is the result's depth.
fn validate(body: &Map<String, Value>, part: TwinPart) -> Result<(), TwinError> {
    validate_members(body, part, &mut Vec::new(), 1)
}

fn validate_members<'a>(
    object: &'a Map<String, Value>,
    part: TwinPart,
    path: &mut Vec<Step<'a>>,
    level: usize,
) -> Result<(), TwinError> {
    for (key, value) in object {
        validate_key(key, part, path)?;
        path.push(Step::Key(key));
        validate_value(value, part, path, level)?;
        path.pop();
    }
    Ok(())
}

fn validate_value<'a>(
    value: &'a Value,
    part: TwinPart,
    path: &mut Vec<Step<'a>>,
    level: usize,
) -> Result<(), TwinError> {
    match value {
        Value::String(s) if s.len() > MAX_STRING_LEN => Err(TwinError::StringTooLong {
            at: location(part, path),
            len: s.len(),
        }),
        Value::Object(_) | Value::Array(_) if level > MAX_DEPTH => Err(TwinError::TooDeep {
            at: location(part, path),
        }),
        Value::Object(object) => validate_members(object, part, path, level + 1),
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                path.push(Step::Index(index));
                validate_value(item, part, path, level + 1)?;
                path.pop();
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn validate_key(key: &str, part: TwinPart, path: &[Step<'_>]) -> Result<(), TwinError> {
    if key.is_empty() {
        return Err(TwinError::EmptyKey {
            at: location(part, path),
        });
    }
    if key.len() > MAX_KEY_LEN {
        return Err(TwinError::KeyTooLong {
            at: location(part, path),
            key: shown_key(key),
            len: key.len(),
        });
    }
    if key.starts_with('$') {
        return Err(TwinError::ReservedKey {
            at: location(part, path),
            key: shown_key(key),
        });
    }
    if let Some(ch) = key
        .chars()
        .find(|ch| ch.is_control() || FORBIDDEN_KEY_CHARS.contains(ch))
    {
        return Err(TwinError::InvalidKeyChar {
            at: location(part, path),
            key: shown_key(key),
            ch,
        });
    }
    Ok(())
}

/// Counts bytes written, so sizes are measured without building the JSON text.
struct ByteCounter(usize);

impl io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Length of the compact JSON of `object`.
fn json_size(object: &Map<String, Value>) -> usize {
    let mut counter = ByteCounter(0);
    match serde_json::to_writer(&mut counter, object) {
        Ok(()) => counter.0,
        // Cannot happen for a Map of Values; counting it as oversized keeps it out of the twin.
        Err(_) => usize::MAX,
    }
}

fn check_size(object: &Map<String, Value>, part: TwinPart) -> Result<(), TwinError> {
    let size = json_size(object);
    let limit = part.size_limit();
    if size > limit {
        return Err(TwinError::TooLarge { part, size, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const T0: &str = "2026-11-22T07:00:00.0000000Z";
    const T1: &str = "2026-11-22T07:00:01.1234567Z";
    const T2: &str = "2026-11-22T07:00:02.7654321Z";

    fn obj(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn meta_at<'a>(section: &'a Section, path: &[&str]) -> &'a Value {
        let mut meta = &section.metadata;
        for key in path {
            meta = &meta[*key];
        }
        meta
    }

    /// An object whose compact JSON is exactly `target` bytes, built from string members short
    /// enough that the string limit never interferes. Sizes 3 to 11 are too small for one member.
    fn object_of_size(target: usize) -> Map<String, Value> {
        const CHUNK: usize = 4000;
        let mut map = Map::new();
        let mut last_key: Option<String> = None;
        loop {
            let size = json_size(&map);
            assert!(size <= target);
            if size == target {
                return map;
            }
            let room = target - size;
            let key = format!("k{:04}", map.len());
            // `"key":""` plus the comma separating it from the previous member.
            let overhead = key.len() + 5 + usize::from(!map.is_empty());
            if room < overhead {
                let last = last_key.clone().unwrap();
                let Some(Value::String(s)) = map.get_mut(&last) else {
                    unreachable!()
                };
                s.push_str(&"y".repeat(room));
                continue;
            }
            let len = (room - overhead).min(CHUNK);
            map.insert(key.clone(), Value::String("x".repeat(len)));
            last_key = Some(key);
        }
    }

    /// `n` nested objects `{"l1":{"l2":…{"ln":{"leaf":1}}}}`: the innermost object is at
    /// level `n`, holding a scalar at level `n + 1`.
    fn objects_deep(n: usize) -> Value {
        let mut value = json!({ "leaf": 1 });
        for level in (1..=n).rev() {
            let mut map = Map::new();
            map.insert(format!("l{level}"), value);
            value = Value::Object(map);
        }
        value
    }

    /// `inner` placed at level `n` by `n - 1` wrapping objects: `{"l1":…{"l{n}": inner}}`.
    fn at_level(n: usize, inner: Value) -> Value {
        let mut value = inner;
        for level in (1..=n).rev() {
            let mut map = Map::new();
            map.insert(format!("l{level}"), value);
            value = Value::Object(map);
        }
        value
    }

    fn assert_rejected_unchanged(twin: &mut Twin, op: impl FnOnce(&mut Twin) -> TwinError) {
        let before = twin.clone();
        let err = op(twin);
        assert_eq!(err.code(), ErrorCode::ArgumentInvalid);
        assert_eq!(*twin, before, "a rejected write changed the twin ({err})");
    }

    // ---- new twin and views ----

    #[test]
    fn new_twin() {
        let twin = Twin::new(T0);
        assert_eq!(twin.version, 1);
        assert!(twin.tags.is_empty());
        assert_eq!(twin.desired.version, 1);
        assert_eq!(twin.reported.version, 1);
        assert!(twin.desired.props.is_empty() && twin.reported.props.is_empty());
        assert_eq!(
            twin.desired.metadata,
            json!({"$lastUpdated": T0, "$lastUpdatedVersion": 1})
        );
        assert_eq!(twin.reported.metadata, json!({ "$lastUpdated": T0 }));
    }

    #[test]
    fn device_view_has_both_versions_and_no_metadata() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(&json!({"battery": 55}), T1).unwrap();
        twin.patch_desired(&json!({"freq": "5m"}), T1).unwrap();
        assert_eq!(
            twin.device_view(),
            json!({
                "desired": {"freq": "5m", "$version": 2},
                "reported": {"battery": 55, "$version": 2},
            })
        );
        assert_eq!(
            Twin::new(T0).device_view(),
            json!({"desired": {"$version": 1}, "reported": {"$version": 1}})
        );
    }

    #[test]
    fn properties_and_service_views() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(&json!({"battery": 55}), T1).unwrap();
        twin.patch_tags(&json!({"site": "north"})).unwrap();
        assert_eq!(
            twin.properties_view(),
            json!({
                "desired": {
                    "$metadata": {"$lastUpdated": T0, "$lastUpdatedVersion": 1},
                    "$version": 1,
                },
                "reported": {
                    "battery": 55,
                    "$metadata": {"$lastUpdated": T1, "battery": {"$lastUpdated": T1}},
                    "$version": 2,
                },
            })
        );
        let extra = obj(json!({
            "deviceId": "d1",
            "etag": "AAAAAAAAAAE=",
            "status": "enabled",
            "version": 999,
            "tags": "not ours",
        }));
        let view = twin.service_view(extra);
        assert_eq!(
            view,
            json!({
                "deviceId": "d1",
                "etag": "AAAAAAAAAAE=",
                "status": "enabled",
                "version": 3,
                "tags": {"site": "north"},
                "properties": twin.properties_view(),
            })
        );
    }

    // ---- merge semantics ----

    #[test]
    fn reported_merge_adds_replaces_and_merges_recursively() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(
            &json!({"a": 1, "b": {"x": 1, "y": {"z": true}}, "c": [1, 2, 3]}),
            T1,
        )
        .unwrap();
        twin.patch_reported(
            &json!({"a": "one", "b": {"y": {"w": null, "v": 2}, "n": {}}, "c": [4], "d": null}),
            T2,
        )
        .unwrap();
        assert_eq!(
            Value::Object(twin.reported.props.clone()),
            json!({"a": "one", "b": {"x": 1, "y": {"z": true, "v": 2}, "n": {}}, "c": [4]})
        );
    }

    #[test]
    fn null_removes_members_at_any_depth() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(&json!({"a": 1, "b": {"x": 1, "y": 2}}), T1)
            .unwrap();
        twin.patch_reported(&json!({"a": null, "b": {"x": null}}), T2)
            .unwrap();
        assert_eq!(
            Value::Object(twin.reported.props.clone()),
            json!({"b": {"y": 2}})
        );
    }

    #[test]
    fn removing_the_last_child_keeps_an_empty_object() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(&json!({"b": {"x": 1}}), T1).unwrap();
        twin.patch_reported(&json!({"b": {"x": null}}), T2).unwrap();
        assert_eq!(Value::Object(twin.reported.props.clone()), json!({"b": {}}));
        assert_eq!(
            *meta_at(&twin.reported, &["b"]),
            json!({ "$lastUpdated": T2 })
        );
    }

    #[test]
    fn nulls_for_missing_members_are_not_stored() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(
            &json!({"gone": null, "new": {"a": null, "b": {"c": null}}}),
            T1,
        )
        .unwrap();
        assert_eq!(
            Value::Object(twin.reported.props.clone()),
            json!({"new": {"b": {}}})
        );
        assert!(meta_at(&twin.reported, &["gone"]).is_null());
        assert!(meta_at(&twin.reported, &["new", "a"]).is_null());
    }

    #[test]
    fn objects_and_scalars_replace_each_other() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(&json!({"a": 1, "b": {"x": {"y": 1}}}), T1)
            .unwrap();
        twin.patch_reported(&json!({"a": {"n": null, "m": 2}, "b": "flat"}), T2)
            .unwrap();
        assert_eq!(
            Value::Object(twin.reported.props.clone()),
            json!({"a": {"m": 2}, "b": "flat"})
        );
        assert_eq!(
            twin.reported.metadata,
            json!({
                "$lastUpdated": T2,
                "a": {"$lastUpdated": T2, "m": {"$lastUpdated": T2}},
                "b": {"$lastUpdated": T2},
            })
        );
    }

    #[test]
    fn arrays_are_leaves_and_keep_their_nulls() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(&json!({"a": [{"x": 1}, null, [2]]}), T1)
            .unwrap();
        twin.patch_reported(&json!({"a": [{"y": 2}]}), T2).unwrap();
        assert_eq!(
            Value::Object(twin.reported.props.clone()),
            json!({"a": [{"y": 2}]})
        );
        twin.patch_reported(&json!({"b": [null]}), T2).unwrap();
        assert_eq!(twin.reported.props["b"], json!([null]));
        assert_eq!(
            *meta_at(&twin.reported, &["a"]),
            json!({ "$lastUpdated": T2 })
        );
    }

    #[test]
    fn numbers_round_trip_as_parsed() {
        let mut twin = Twin::new(T0);
        let patch: Value = serde_json::from_str(
            r#"{"t":23.2,"f":0.1,"one":1.0,"neg":-5,"big":18446744073709551615,"min":-9223372036854775808}"#,
        )
        .unwrap();
        twin.patch_reported(&patch, T1).unwrap();
        let stored = serde_json::to_string(&twin).unwrap();
        let twin: Twin = serde_json::from_str(&stored).unwrap();
        let text = serde_json::to_string(&twin.device_view()).unwrap();
        for expected in [
            r#""t":23.2"#,
            r#""f":0.1"#,
            r#""one":1.0"#,
            r#""neg":-5"#,
            r#""big":18446744073709551615"#,
            r#""min":-9223372036854775808"#,
        ] {
            assert!(text.contains(expected), "{expected} missing from {text}");
        }
    }

    /// Found by the `twin_patch` fuzz target: serde_json's default float parsing is only
    /// best-effort, so a float written to the store read back one bit different.
    #[test]
    fn floats_survive_the_stored_form_exactly() {
        let mut twin = Twin::new(T0);
        let patch: Value = serde_json::from_str(
            r#"{"tbig":98446744073709551615,"x":9.844674407370955e19,"tiny":2.2250738585072014e-308,"pi":3.141592653589793}"#,
        )
        .unwrap();
        twin.patch_reported(&patch, T1).unwrap();
        assert_eq!(twin.reported.props["tbig"], 98446744073709551615.0);
        let stored = serde_json::to_string(&twin).unwrap();
        let back: Twin = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, twin);
        assert_eq!(serde_json::to_string(&back).unwrap(), stored);
    }

    // ---- versions ----

    #[test]
    fn each_accepted_reported_patch_bumps_once() {
        let mut twin = Twin::new(T0);
        assert_eq!(twin.patch_reported(&json!({"a": 1}), T1), Ok(2));
        assert_eq!(twin.version, 2);
        // Even an empty or no-op patch is a new reported version.
        assert_eq!(twin.patch_reported(&json!({}), T1), Ok(3));
        assert_eq!(twin.patch_reported(&json!({"a": 1}), T1), Ok(4));
        assert_eq!(twin.version, 4);
        assert_eq!(twin.desired.version, 1);
        assert_eq!(twin.reported.metadata["$lastUpdated"], json!(T1));
    }

    #[test]
    fn desired_patch_bumps_desired_and_twin_only() {
        let mut twin = Twin::new(T0);
        let note = twin.patch_desired(&json!({"a": 1}), T1).unwrap();
        assert_eq!(note, Some(json!({"a": 1, "$version": 2})));
        assert_eq!(
            (twin.version, twin.desired.version, twin.reported.version),
            (2, 2, 1)
        );
        let note = twin
            .patch_desired(&json!({"a": null, "b": {"c": null}}), T2)
            .unwrap();
        // The device is told about removals with the nulls as given.
        assert_eq!(
            note,
            Some(json!({"a": null, "b": {"c": null}, "$version": 3}))
        );
        assert_eq!(Value::Object(twin.desired.props.clone()), json!({"b": {}}));
        assert_eq!((twin.version, twin.desired.version), (3, 3));
    }

    #[test]
    fn desired_patch_of_only_echoed_read_only_members_is_a_no_op() {
        let mut twin = Twin::new(T0);
        twin.patch_desired(&json!({"a": 1}), T1).unwrap();
        let before = twin.clone();
        let echo = json!({"$version": 2, "$metadata": {"$lastUpdated": T1}});
        assert_eq!(twin.patch_desired(&echo, T2), Ok(None));
        assert_eq!(twin.patch_desired(&json!({}), T2), Ok(None));
        assert_eq!(twin, before);
        let note = twin
            .patch_desired(&json!({"b": 2, "$version": 7, "$metadata": {}}), T2)
            .unwrap();
        assert_eq!(note, Some(json!({"b": 2, "$version": 3})));
        assert_eq!(
            Value::Object(twin.desired.props.clone()),
            json!({"a": 1, "b": 2})
        );
    }

    #[test]
    fn tags_bump_the_twin_version_only_when_they_change() {
        let mut twin = Twin::new(T0);
        assert_eq!(
            twin.patch_tags(&json!({"site": {"city": "Oslo"}})),
            Ok(true)
        );
        assert_eq!(twin.version, 2);
        assert_eq!(
            twin.patch_tags(&json!({"site": {"city": "Oslo"}})),
            Ok(false)
        );
        assert_eq!(twin.patch_tags(&json!({})), Ok(false));
        assert_eq!(twin.patch_tags(&json!({"gone": null})), Ok(false));
        assert_eq!(twin.version, 2);
        assert_eq!(twin.patch_tags(&json!({"site": {"floor": 3}})), Ok(true));
        assert_eq!(
            Value::Object(twin.tags.clone()),
            json!({"site": {"city": "Oslo", "floor": 3}})
        );
        assert_eq!(twin.patch_tags(&json!({"site": {"city": null}})), Ok(true));
        assert_eq!(
            Value::Object(twin.tags.clone()),
            json!({"site": {"floor": 3}})
        );
        assert_eq!(twin.version, 4);
        assert_eq!((twin.desired.version, twin.reported.version), (1, 1));
    }

    #[test]
    fn replace_tags() {
        let mut twin = Twin::new(T0);
        twin.patch_tags(&json!({"a": 1, "b": {"c": 2}})).unwrap();
        assert_eq!(
            twin.replace_tags(&json!({"a": 1, "b": {"c": 2}})),
            Ok(false)
        );
        assert_eq!(twin.version, 2);
        assert_eq!(
            twin.replace_tags(&json!({"b": {"d": null}, "e": null})),
            Ok(true)
        );
        assert_eq!(Value::Object(twin.tags.clone()), json!({"b": {}}));
        assert_eq!(twin.version, 3);
    }

    #[test]
    fn replace_desired_versus_patch_desired() {
        let mut twin = Twin::new(T0);
        twin.patch_desired(&json!({"a": 1, "b": {"x": 1}}), T1)
            .unwrap();
        twin.patch_desired(&json!({"c": 3}), T1).unwrap();
        assert_eq!(
            Value::Object(twin.desired.props.clone()),
            json!({"a": 1, "b": {"x": 1}, "c": 3})
        );
        let note = twin
            .replace_desired(
                &json!({"b": {"y": 2, "z": null}, "d": null, "$version": 3, "$metadata": {}}),
                T2,
            )
            .unwrap();
        assert_eq!(note, json!({"b": {"y": 2}, "$version": 4}));
        assert_eq!(
            Value::Object(twin.desired.props.clone()),
            json!({"b": {"y": 2}})
        );
        assert_eq!((twin.version, twin.desired.version), (4, 4));
        // Everything written by a replace gets fresh metadata; removed members lose theirs.
        assert_eq!(
            twin.desired.metadata,
            json!({
                "$lastUpdated": T2, "$lastUpdatedVersion": 4,
                "b": {
                    "$lastUpdated": T2, "$lastUpdatedVersion": 4,
                    "y": {"$lastUpdated": T2, "$lastUpdatedVersion": 4},
                },
            })
        );
        // An empty replacement clears desired and is still a write.
        assert_eq!(
            twin.replace_desired(&json!({}), T2),
            Ok(json!({"$version": 5}))
        );
        assert!(twin.desired.props.is_empty());
    }

    // ---- metadata ----

    #[test]
    fn reported_metadata_tracks_touched_members_only() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(&json!({"a": 1, "b": {"x": 1, "y": 2}}), T1)
            .unwrap();
        assert_eq!(
            twin.reported.metadata,
            json!({
                "$lastUpdated": T1,
                "a": {"$lastUpdated": T1},
                "b": {"$lastUpdated": T1, "x": {"$lastUpdated": T1}, "y": {"$lastUpdated": T1}},
            })
        );
        twin.patch_reported(&json!({"b": {"y": 3, "z": 4}}), T2)
            .unwrap();
        assert_eq!(
            twin.reported.metadata,
            json!({
                "$lastUpdated": T2,
                "a": {"$lastUpdated": T1},
                "b": {
                    "$lastUpdated": T2,
                    "x": {"$lastUpdated": T1},
                    "y": {"$lastUpdated": T2},
                    "z": {"$lastUpdated": T2},
                },
            })
        );
        twin.patch_reported(&json!({"a": null, "b": {"x": null}}), T2)
            .unwrap();
        assert_eq!(
            twin.reported.metadata,
            json!({
                "$lastUpdated": T2,
                "b": {"$lastUpdated": T2, "y": {"$lastUpdated": T2}, "z": {"$lastUpdated": T2}},
            })
        );
    }

    #[test]
    fn desired_metadata_records_versions() {
        let mut twin = Twin::new(T0);
        twin.patch_desired(&json!({"a": 1, "b": {"x": 1}}), T1)
            .unwrap();
        twin.patch_desired(&json!({"b": {"y": 2}}), T2).unwrap();
        assert_eq!(
            twin.desired.metadata,
            json!({
                "$lastUpdated": T2, "$lastUpdatedVersion": 3,
                "a": {"$lastUpdated": T1, "$lastUpdatedVersion": 2},
                "b": {
                    "$lastUpdated": T2, "$lastUpdatedVersion": 3,
                    "x": {"$lastUpdated": T1, "$lastUpdatedVersion": 2},
                    "y": {"$lastUpdated": T2, "$lastUpdatedVersion": 3},
                },
            })
        );
        let view = twin.properties_view();
        assert_eq!(view["desired"]["$metadata"], twin.desired.metadata);
        assert_eq!(view["desired"]["$version"], json!(3));
        assert_eq!(view["desired"]["b"], json!({"x": 1, "y": 2}));
    }

    #[test]
    fn tags_have_no_metadata() {
        let mut twin = Twin::new(T0);
        twin.patch_tags(&json!({"a": 1})).unwrap();
        assert_eq!(twin.desired.metadata, Twin::new(T0).desired.metadata);
        assert_eq!(twin.reported.metadata, Twin::new(T0).reported.metadata);
    }

    // ---- limits: size ----

    #[test]
    fn size_helper_is_exact() {
        for target in [2, 12, 13, 100, 4011, 4012, 4013, 8192, 8193, 32768, 32769] {
            assert_eq!(json_size(&object_of_size(target)), target);
        }
    }

    #[test]
    fn reported_size_limit_at_the_boundary() {
        let mut twin = Twin::new(T0);
        let at_limit = Value::Object(object_of_size(MAX_PROPERTIES_SIZE));
        assert_eq!(twin.patch_reported(&at_limit, T1), Ok(2));

        let mut twin = Twin::new(T0);
        let over = Value::Object(object_of_size(MAX_PROPERTIES_SIZE + 1));
        assert_rejected_unchanged(&mut twin, |t| t.patch_reported(&over, T1).unwrap_err());
        assert_eq!(
            twin.patch_reported(&over, T1),
            Err(TwinError::TooLarge {
                part: TwinPart::Reported,
                size: MAX_PROPERTIES_SIZE + 1,
                limit: MAX_PROPERTIES_SIZE,
            })
        );
    }

    #[test]
    fn size_counts_the_result_not_the_patch() {
        let mut twin = Twin::new(T0);
        let full = object_of_size(MAX_PROPERTIES_SIZE);
        twin.patch_reported(&Value::Object(full.clone()), T1)
            .unwrap();
        // A tiny addition no longer fits…
        assert_rejected_unchanged(&mut twin, |t| {
            t.patch_reported(&json!({"z": 1}), T2).unwrap_err()
        });
        // …but it does once a member is removed in the same patch.
        let first = full.keys().next().unwrap().clone();
        let mut patch = Map::new();
        patch.insert(first, Value::Null);
        patch.insert("z".to_owned(), json!(1));
        assert_eq!(twin.patch_reported(&Value::Object(patch), T2), Ok(3));
    }

    #[test]
    fn desired_size_limit_at_the_boundary() {
        let at_limit = Value::Object(object_of_size(MAX_PROPERTIES_SIZE));
        let over = Value::Object(object_of_size(MAX_PROPERTIES_SIZE + 1));

        let mut twin = Twin::new(T0);
        assert!(twin.patch_desired(&at_limit, T1).unwrap().is_some());
        let mut twin = Twin::new(T0);
        assert!(twin.replace_desired(&at_limit, T1).is_ok());

        let mut twin = Twin::new(T0);
        assert_rejected_unchanged(&mut twin, |t| t.patch_desired(&over, T1).unwrap_err());
        assert_rejected_unchanged(&mut twin, |t| t.replace_desired(&over, T1).unwrap_err());
        let err = twin.patch_desired(&over, T1).unwrap_err();
        assert!(matches!(
            err,
            TwinError::TooLarge {
                part: TwinPart::Desired,
                ..
            }
        ));
        assert!(err.to_string().contains("properties.desired"), "{err}");
        assert!(err.to_string().contains("32769"), "{err}");

        // Echoed read-only members do not count towards the limit.
        let mut echoed = object_of_size(MAX_PROPERTIES_SIZE);
        echoed.insert("$version".to_owned(), json!(1));
        echoed.insert("$metadata".to_owned(), json!({"$lastUpdated": T0}));
        let mut twin = Twin::new(T0);
        assert!(twin.replace_desired(&Value::Object(echoed), T1).is_ok());
    }

    #[test]
    fn tags_size_limit_at_the_boundary() {
        let mut twin = Twin::new(T0);
        assert_eq!(
            twin.patch_tags(&Value::Object(object_of_size(MAX_TAGS_SIZE))),
            Ok(true)
        );
        let mut twin = Twin::new(T0);
        assert_eq!(
            twin.replace_tags(&Value::Object(object_of_size(MAX_TAGS_SIZE))),
            Ok(true)
        );
        let over = Value::Object(object_of_size(MAX_TAGS_SIZE + 1));
        let mut twin = Twin::new(T0);
        assert_rejected_unchanged(&mut twin, |t| t.patch_tags(&over).unwrap_err());
        assert_rejected_unchanged(&mut twin, |t| t.replace_tags(&over).unwrap_err());
        assert_eq!(
            twin.patch_tags(&over),
            Err(TwinError::TooLarge {
                part: TwinPart::Tags,
                size: MAX_TAGS_SIZE + 1,
                limit: MAX_TAGS_SIZE,
            })
        );
    }

    // ---- limits: depth ----

    #[test]
    fn depth_ten_objects_pass_eleven_fail() {
        for part in [TwinPart::Reported, TwinPart::Desired, TwinPart::Tags] {
            let write = |twin: &mut Twin, body: &Value| -> Result<(), TwinError> {
                match part {
                    TwinPart::Reported => twin.patch_reported(body, T1).map(drop),
                    TwinPart::Desired => twin.patch_desired(body, T1).map(drop),
                    TwinPart::Tags => twin.patch_tags(body).map(drop),
                }
            };
            let mut twin = Twin::new(T0);
            assert_eq!(write(&mut twin, &objects_deep(10)), Ok(()), "{part}");
            let mut twin = Twin::new(T0);
            assert_rejected_unchanged(&mut twin, |t| write(t, &objects_deep(11)).unwrap_err());
            let err = write(&mut twin, &objects_deep(11)).unwrap_err();
            let path = (1..=11).map(|l| format!(".\"l{l}\"")).collect::<String>();
            assert_eq!(
                err,
                TwinError::TooDeep {
                    at: format!("{part}{path}")
                }
            );
            // An empty object counts as a level as much as a full one.
            assert!(write(&mut twin, &at_level(10, json!({}))).is_ok());
            assert!(write(&mut twin, &at_level(11, json!({}))).is_err());
        }
    }

    #[test]
    fn depth_counts_the_result_path_after_a_merge() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(&objects_deep(10), T1).unwrap();
        // Adding a sibling next to the deepest leaf is fine, one object deeper is not.
        let ok = at_level(10, json!({"other": 2}));
        assert!(twin.patch_reported(&ok, T1).is_ok());
        let too_deep = at_level(10, json!({"other": {"x": 1}}));
        assert_rejected_unchanged(&mut twin, |t| t.patch_reported(&too_deep, T2).unwrap_err());
    }

    #[test]
    fn arrays_count_as_a_level() {
        let mut twin = Twin::new(T0);
        // A scalar array may sit where an object may.
        assert!(twin
            .patch_reported(&at_level(10, json!([1, 2])), T1)
            .is_ok());
        assert_rejected_unchanged(&mut twin, |t| {
            t.patch_reported(&at_level(11, json!([1, 2])), T1)
                .unwrap_err()
        });
        // An object in an array is one level below the array.
        assert!(twin
            .patch_reported(&at_level(9, json!([{"a": 1}])), T1)
            .is_ok());
        assert_rejected_unchanged(&mut twin, |t| {
            t.patch_reported(&at_level(10, json!([{"a": 1}])), T1)
                .unwrap_err()
        });
        let err = twin
            .patch_reported(&at_level(10, json!([[1]])), T1)
            .unwrap_err();
        assert!(
            matches!(err, TwinError::TooDeep { ref at } if at.ends_with(".\"l10\"[0]")),
            "{err}"
        );
    }

    // ---- limits: keys ----

    #[test]
    fn key_rules() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("a.b", "'.'"),
            ("a$b", "'$'"),
            ("a#b", "'#'"),
            ("a b", "' '"),
            ("a\u{0}b", "'\\0'"),
            ("a\tb", "'\\t'"),
            ("a\u{7f}b", "'\\u{7f}'"),
            ("a\u{85}b", "'\\u{85}'"),
            ("$reserved", "reserved"),
        ];
        for (key, in_message) in cases {
            for nested in [false, true] {
                let mut inner = Map::new();
                inner.insert((*key).to_owned(), json!(1));
                let patch = if nested {
                    json!({ "ok": Value::Object(inner) })
                } else {
                    Value::Object(inner)
                };
                let mut twin = Twin::new(T0);
                assert_rejected_unchanged(&mut twin, |t| t.patch_reported(&patch, T1).unwrap_err());
                assert_rejected_unchanged(&mut twin, |t| t.patch_desired(&patch, T1).unwrap_err());
                assert_rejected_unchanged(&mut twin, |t| t.patch_tags(&patch).unwrap_err());
                let err = twin.patch_reported(&patch, T1).unwrap_err();
                assert!(err.to_string().contains(in_message), "{key:?}: {err}");
                assert_eq!(err.code(), ErrorCode::ArgumentInvalid);
            }
        }
    }

    #[test]
    fn key_errors_name_the_key_and_where_it_is() {
        let mut twin = Twin::new(T0);
        let err = twin
            .patch_reported(&json!({"outer": {"list": [{"bad key": 1}]}}), T1)
            .unwrap_err();
        assert_eq!(
            err,
            TwinError::InvalidKeyChar {
                at: "properties.reported.\"outer\".\"list\"[0]".to_owned(),
                key: "\"bad key\"".to_owned(),
                ch: ' ',
            }
        );
        let err = twin
            .patch_desired(&json!({"a": {"$version": 1}}), T1)
            .unwrap_err();
        assert_eq!(
            err,
            TwinError::ReservedKey {
                at: "properties.desired.\"a\"".to_owned(),
                key: "\"$version\"".to_owned(),
            }
        );
    }

    #[test]
    fn null_members_with_bad_keys_are_rejected_too() {
        let mut twin = Twin::new(T0);
        assert_rejected_unchanged(&mut twin, |t| {
            t.patch_reported(&json!({"a.b": null}), T1).unwrap_err()
        });
    }

    #[test]
    fn key_length_limit_in_bytes() {
        let mut twin = Twin::new(T0);
        let mut patch = Map::new();
        patch.insert("k".repeat(MAX_KEY_LEN), json!(1));
        patch.insert("é".repeat(MAX_KEY_LEN / 2), json!(2));
        assert!(twin.patch_reported(&Value::Object(patch), T1).is_ok());

        for key in [
            "k".repeat(MAX_KEY_LEN + 1),
            "é".repeat(MAX_KEY_LEN / 2) + "k",
        ] {
            let mut patch = Map::new();
            patch.insert(key.clone(), json!(1));
            let patch = Value::Object(patch);
            assert_rejected_unchanged(&mut twin, |t| t.patch_tags(&patch).unwrap_err());
            let err = twin.patch_reported(&patch, T1).unwrap_err();
            assert!(
                matches!(err, TwinError::KeyTooLong { len: 1025, .. }),
                "{err}"
            );
            // The message stays readable however long the key is.
            assert!(err.to_string().chars().count() < 200, "{err}");
            assert!(err.to_string().contains("1025"), "{err}");
        }
    }

    #[test]
    fn reported_may_not_carry_read_only_members() {
        let mut twin = Twin::new(T0);
        assert_rejected_unchanged(&mut twin, |t| {
            t.patch_reported(&json!({"$version": 3, "a": 1}), T1)
                .unwrap_err()
        });
        assert_rejected_unchanged(&mut twin, |t| {
            t.patch_tags(&json!({"$metadata": {}})).unwrap_err()
        });
    }

    #[test]
    fn ordinary_and_pnp_keys_pass() {
        let mut twin = Twin::new(T0);
        let patch = json!({
            "__t": "c", "thermostat1": {"__t": "c"}, "targetTemperature": 1, "value": 2,
            "ac": 200, "av": 3, "ad": "ok", "température": "ok", "a-b_c:d@e": true, "日本": 1,
        });
        assert!(twin.patch_reported(&patch, T1).is_ok());
        assert!(twin.patch_desired(&patch, T1).is_ok());
        assert!(twin.patch_tags(&patch).is_ok());
    }

    // ---- limits: strings ----

    #[test]
    fn string_length_limit_in_bytes() {
        let mut twin = Twin::new(T0);
        let ok = json!({
            "ascii": "s".repeat(MAX_STRING_LEN),
            "utf8": "é".repeat(MAX_STRING_LEN / 2),
            "in": ["s".repeat(MAX_STRING_LEN)],
        });
        assert!(twin.patch_reported(&ok, T1).is_ok());
        for bad in [
            json!({"a": "s".repeat(MAX_STRING_LEN + 1)}),
            json!({"a": "é".repeat(MAX_STRING_LEN / 2) + "s"}),
            json!({"a": {"b": ["s".repeat(MAX_STRING_LEN + 1)]}}),
        ] {
            assert_rejected_unchanged(&mut twin, |t| t.patch_reported(&bad, T1).unwrap_err());
            assert_rejected_unchanged(&mut twin, |t| t.replace_desired(&bad, T1).unwrap_err());
            assert_rejected_unchanged(&mut twin, |t| t.replace_tags(&bad).unwrap_err());
            let err = twin.patch_reported(&bad, T1).unwrap_err();
            assert!(
                matches!(err, TwinError::StringTooLong { len: 4097, .. }),
                "{err}"
            );
        }
    }

    // ---- not an object ----

    #[test]
    fn top_level_must_be_an_object() {
        let mut twin = Twin::new(T0);
        for bad in [json!([1]), json!("s"), json!(1), json!(null), json!(true)] {
            assert_rejected_unchanged(&mut twin, |t| t.patch_reported(&bad, T1).unwrap_err());
            assert_rejected_unchanged(&mut twin, |t| t.patch_desired(&bad, T1).unwrap_err());
            assert_rejected_unchanged(&mut twin, |t| t.replace_desired(&bad, T1).unwrap_err());
            assert_rejected_unchanged(&mut twin, |t| t.patch_tags(&bad).unwrap_err());
            assert_rejected_unchanged(&mut twin, |t| t.replace_tags(&bad).unwrap_err());
            assert_rejected_unchanged(&mut twin, |t| {
                t.apply_service_update(&bad, false, T1).unwrap_err()
            });
            assert!(matches!(
                twin.patch_reported(&bad, T1),
                Err(TwinError::NotAnObject { .. })
            ));
        }
        assert_eq!(
            twin.patch_reported(&json!([]), T1).unwrap_err().to_string(),
            "the reported properties patch must be a JSON object"
        );
    }

    // ---- service updates ----

    #[test]
    fn service_patch_applies_tags_and_desired_and_ignores_the_rest() {
        let mut twin = Twin::new(T0);
        twin.patch_reported(&json!({"battery": 55}), T0).unwrap();
        twin.patch_tags(&json!({"keep": 1})).unwrap();
        let body = json!({
            "deviceId": "d1", "moduleId": null, "etag": "AAAAAAAAAAE=", "deviceEtag": "x",
            "status": "enabled", "connectionState": "Connected", "modelId": "", "version": 77,
            "tags": {"site": "north"},
            "properties": {
                "desired": {"freq": "5m", "$version": 1, "$metadata": {"$lastUpdated": T0}},
                "reported": {"battery": 1, "$version": 9, "$metadata": {}},
            },
        });
        let update = twin.apply_service_update(&body, false, T1).unwrap();
        assert_eq!(
            update,
            ServiceUpdate {
                desired_notification: Some(json!({"freq": "5m", "$version": 2})),
                changed: true,
            }
        );
        // Tags and desired in one write: one twin version.
        assert_eq!(twin.version, 4);
        assert_eq!(
            Value::Object(twin.tags.clone()),
            json!({"keep": 1, "site": "north"})
        );
        assert_eq!(
            Value::Object(twin.desired.props.clone()),
            json!({"freq": "5m"})
        );
        assert_eq!(
            Value::Object(twin.reported.props.clone()),
            json!({"battery": 55})
        );
        assert_eq!(twin.reported.version, 2);
    }

    #[test]
    fn service_patch_without_changes() {
        let mut twin = Twin::new(T0);
        twin.patch_tags(&json!({"a": 1})).unwrap();
        let before = twin.clone();
        for body in [
            json!({}),
            json!({"deviceId": "d1", "etag": "x"}),
            json!({"tags": null, "properties": null}),
            json!({"tags": {"a": 1}, "properties": {"desired": {"$version": 1}}}),
            json!({"properties": {"reported": {"x": 1}}}),
            // Reported is ignored however malformed it is.
            json!({"properties": {"reported": 5}}),
        ] {
            let update = twin.apply_service_update(&body, false, T1).unwrap();
            assert_eq!(
                update,
                ServiceUpdate {
                    desired_notification: None,
                    changed: false,
                },
                "{body}"
            );
            assert_eq!(twin, before, "{body}");
        }
    }

    #[test]
    fn service_put_replaces_tags_and_desired() {
        let mut twin = Twin::new(T0);
        twin.patch_tags(&json!({"a": 1, "b": 2})).unwrap();
        twin.patch_desired(&json!({"x": 1, "y": 2}), T0).unwrap();
        let body = json!({"tags": {"b": 3}, "properties": {"desired": {"y": 2, "z": null}}});
        let update = twin.apply_service_update(&body, true, T1).unwrap();
        assert_eq!(
            update,
            ServiceUpdate {
                desired_notification: Some(json!({"y": 2, "$version": 3})),
                changed: true,
            }
        );
        assert_eq!(Value::Object(twin.tags.clone()), json!({"b": 3}));
        assert_eq!(Value::Object(twin.desired.props.clone()), json!({"y": 2}));
        assert_eq!(twin.version, 4);

        // Missing parts of a PUT mean empty.
        let update = twin
            .apply_service_update(&json!({"deviceId": "d1"}), true, T2)
            .unwrap();
        assert_eq!(update.desired_notification, Some(json!({"$version": 4})));
        assert!(update.changed);
        assert!(twin.tags.is_empty() && twin.desired.props.is_empty());
        assert_eq!(twin.version, 5);
    }

    #[test]
    fn service_put_round_trip_of_the_service_view() {
        let mut twin = Twin::new(T0);
        twin.patch_tags(&json!({"site": "north"})).unwrap();
        twin.patch_desired(&json!({"freq": "5m", "cfg": {"a": 1}}), T0)
            .unwrap();
        twin.patch_reported(&json!({"battery": 55}), T0).unwrap();
        let extra = obj(json!({"deviceId": "d1", "etag": "AAAAAAAAAAE=", "status": "enabled"}));
        let body = twin.service_view(extra);
        let before = twin.clone();

        let update = twin.apply_service_update(&body, true, T1).unwrap();
        assert_eq!(
            update.desired_notification,
            Some(json!({"freq": "5m", "cfg": {"a": 1}, "$version": 3}))
        );
        assert!(update.changed);
        assert_eq!(twin.tags, before.tags);
        assert_eq!(twin.desired.props, before.desired.props);
        assert_eq!(twin.reported, before.reported);
        assert_eq!(twin.version, before.version + 1);

        // The same body as a PATCH rewrites desired too (it names members), tags stay equal.
        let update = twin.apply_service_update(&body, false, T2).unwrap();
        assert!(update.changed);
        assert_eq!(twin.desired.version, 4);
        assert_eq!(twin.desired.props, before.desired.props);
    }

    #[test]
    fn service_update_is_all_or_nothing() {
        let mut twin = Twin::new(T0);
        let bad_tags = json!({"tags": {"bad key": 1}, "properties": {"desired": {"ok": 1}}});
        let bad_desired = json!({"tags": {"ok": 1}, "properties": {"desired": {"a.b": 1}}});
        let big_desired = json!({
            "tags": {"ok": 1},
            "properties": {"desired": Value::Object(object_of_size(MAX_PROPERTIES_SIZE + 1))},
        });
        let big_tags = json!({
            "tags": Value::Object(object_of_size(MAX_TAGS_SIZE + 1)),
            "properties": {"desired": {"ok": 1}},
        });
        for body in [bad_tags, bad_desired, big_desired, big_tags] {
            for replace in [false, true] {
                assert_rejected_unchanged(&mut twin, |t| {
                    t.apply_service_update(&body, replace, T1).unwrap_err()
                });
            }
        }
        for (body, what) in [
            (json!({"tags": [1]}), "tags"),
            (json!({"properties": "x"}), "properties"),
            (json!({"properties": {"desired": 1}}), "properties.desired"),
        ] {
            assert_rejected_unchanged(&mut twin, |t| {
                t.apply_service_update(&body, true, T1).unwrap_err()
            });
            assert_eq!(
                twin.apply_service_update(&body, false, T1),
                Err(TwinError::NotAnObject {
                    what: what.to_owned()
                })
            );
        }
    }

    // ---- storage ----

    #[test]
    fn twin_round_trips_through_a_json_string() {
        let mut twin = Twin::new(T0);
        twin.patch_tags(&json!({"site": {"city": "Oslo"}})).unwrap();
        twin.patch_desired(&json!({"t": 23.2, "list": [1, "a", null]}), T1)
            .unwrap();
        twin.patch_reported(&json!({"thermostat1": {"__t": "c", "x": 1}}), T2)
            .unwrap();
        let stored = serde_json::to_string(&twin).unwrap();
        let back: Twin = serde_json::from_str(&stored).unwrap();
        assert_eq!(back, twin);
        assert_eq!(serde_json::to_string(&back).unwrap(), stored);
        // Writes keep working on a twin read back from the store.
        let mut back = back;
        assert_eq!(back.patch_reported(&json!({"y": 2}), T2), Ok(3));
    }

    // ---- IoT Plug and Play ----

    #[test]
    fn pnp_component_reported_verbatim() {
        let mut twin = Twin::new(T0);
        let patch: Value =
            serde_json::from_str(r#"{"thermostat1":{"__t":"c","maxTempSinceLastReboot":38.7}}"#)
                .unwrap();
        twin.patch_reported(&patch, T1).unwrap();
        assert_eq!(
            twin.device_view()["reported"]["thermostat1"],
            patch["thermostat1"]
        );
        let text = serde_json::to_string(&twin.device_view()["reported"]).unwrap();
        assert_eq!(
            text,
            r#"{"$version":2,"thermostat1":{"__t":"c","maxTempSinceLastReboot":38.7}}"#
        );
    }

    #[test]
    fn pnp_writable_property_acks_are_kept() {
        let mut twin = Twin::new(T0);
        let ack = json!({
            "targetTemperature": {"value": 23.2, "ac": 200, "av": 3, "ad": "Successfully updated"}
        });
        twin.patch_reported(&ack, T1).unwrap();
        let wrapped = json!({
            "thermostat1": {
                "__t": "c",
                "targetTemperature": {"value": 23.2, "ac": 200, "av": 3, "ad": "Successfully updated"},
            }
        });
        twin.patch_reported(&wrapped, T2).unwrap();
        let reported = &twin.device_view()["reported"];
        assert_eq!(reported["targetTemperature"], ack["targetTemperature"]);
        assert_eq!(reported["thermostat1"], wrapped["thermostat1"]);
        let text = serde_json::to_string(reported).unwrap();
        assert!(text.contains(r#""value":23.2"#), "{text}");
    }

    #[test]
    fn pnp_desired_component_notification() {
        let mut twin = Twin::new(T0);
        twin.patch_desired(&json!({"other": 1}), T0).unwrap();
        twin.patch_desired(&json!({"other": 2}), T0).unwrap();
        let note = twin
            .patch_desired(
                &json!({"thermostat1": {"__t": "c", "targetTemperature": 23.2}}),
                T1,
            )
            .unwrap()
            .unwrap();
        assert_eq!(
            serde_json::to_string(&note).unwrap(),
            r#"{"$version":4,"thermostat1":{"__t":"c","targetTemperature":23.2}}"#
        );
        assert_eq!(
            twin.device_view()["desired"]["thermostat1"],
            json!({"__t": "c", "targetTemperature": 23.2})
        );
    }
}
