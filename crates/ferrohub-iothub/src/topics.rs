//! Which MQTT topics a device or module may publish and subscribe to, property bags, and the
//! topics the hub publishes to devices.

use thiserror::Error;

use crate::encoding;
use crate::identity::Identity;

/// IoT Hub refuses a sixth subscription on one connection.
pub const MAX_SUBSCRIPTIONS: usize = 5;

/// A PUBLISH from a device that IoT Hub accepts, by purpose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishTopic<'a> {
    /// Device-to-cloud telemetry. `property_bag` is the raw text after `messages/events/`
    /// (empty when there is none); decode it with [`parse_property_bag`].
    Telemetry {
        property_bag: &'a str,
    },
    /// `rid` is kept exactly as sent (not percent-decoded) so the response echoes the same bytes
    /// the device will compare against.
    TwinGet {
        rid: String,
    },
    TwinPatchReported {
        rid: String,
    },
    MethodResponse {
        status: u16,
        rid: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TopicError {
    #[error("wildcard characters are not allowed in a topic name")]
    Wildcard,
    #[error("topic belongs to another device or module")]
    OtherIdentity,
    #[error("topic is not one a device may publish to")]
    NotAllowed,
    #[error("topic has no $rid")]
    MissingRid,
    #[error("topic repeats $rid")]
    DuplicateRid,
    #[error("method response status is not an integer in 0..=65535")]
    InvalidStatus,
    #[error("property bag has an empty key")]
    EmptyKey,
    #[error("property bag is not valid UTF-8 after percent-decoding")]
    InvalidUtf8,
}

/// Classifies a PUBLISH topic from `identity`. Anything IoT Hub would refuse (which closes the
/// connection) is an error.
pub fn classify_publish<'a>(
    identity: &Identity,
    topic: &'a str,
) -> Result<PublishTopic<'a>, TopicError> {
    // MQTT forbids wildcards in topic names; refusing them here also keeps a device from
    // reaching another device's topics through a filter-like name.
    if topic.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    if let Some(rest) = topic.strip_prefix("$iothub/") {
        return classify_iothub(rest);
    }
    let Some(rest) = strip_identity_prefix(identity, topic) else {
        return Err(if addresses_someone_else(identity, topic) {
            TopicError::OtherIdentity
        } else {
            TopicError::NotAllowed
        });
    };
    match rest.strip_prefix("messages/events") {
        Some("") => Ok(PublishTopic::Telemetry { property_bag: "" }),
        Some(tail) => match tail.strip_prefix('/') {
            Some(property_bag) => Ok(PublishTopic::Telemetry { property_bag }),
            None => Err(TopicError::NotAllowed),
        },
        None => Err(TopicError::NotAllowed),
    }
}

/// Strips `devices/{id}/` (or `devices/{id}/modules/{mid}/` for a module) for exactly this
/// identity: a module may not publish as its device, nor a device as one of its modules.
fn strip_identity_prefix<'a>(identity: &Identity, topic: &'a str) -> Option<&'a str> {
    let rest = topic
        .strip_prefix("devices/")?
        .strip_prefix(identity.device_id.as_str())?
        .strip_prefix('/')?;
    match &identity.module_id {
        None => {
            if rest.starts_with("modules/") {
                return None;
            }
            Some(rest)
        }
        Some(module_id) => rest
            .strip_prefix("modules/")?
            .strip_prefix(module_id.as_str())?
            .strip_prefix('/'),
    }
}

/// Only tells the two refusals apart for logs: a topic under another device, another module,
/// or (for a module) its parent device.
fn addresses_someone_else(identity: &Identity, topic: &str) -> bool {
    let Some((device, rest)) = topic
        .strip_prefix("devices/")
        .and_then(|r| r.split_once('/'))
    else {
        return false;
    };
    if device != identity.device_id {
        return true;
    }
    let module = rest
        .strip_prefix("modules/")
        .and_then(|r| r.split('/').next());
    module != identity.module_id.as_deref()
}

fn classify_iothub(rest: &str) -> Result<PublishTopic<'_>, TopicError> {
    if let Some(query) = rest.strip_prefix("twin/GET/?") {
        return Ok(PublishTopic::TwinGet {
            rid: find_rid(query)?,
        });
    }
    if let Some(query) = rest.strip_prefix("twin/PATCH/properties/reported/?") {
        return Ok(PublishTopic::TwinPatchReported {
            rid: find_rid(query)?,
        });
    }
    if let Some(rest) = rest.strip_prefix("methods/res/") {
        let (status, query) = rest.split_once("/?").ok_or(TopicError::NotAllowed)?;
        if status.is_empty() || !status.bytes().all(|b| b.is_ascii_digit()) {
            return Err(TopicError::InvalidStatus);
        }
        let status = status.parse().map_err(|_| TopicError::InvalidStatus)?;
        return Ok(PublishTopic::MethodResponse {
            status,
            rid: find_rid(query)?,
        });
    }
    Err(TopicError::NotAllowed)
}

/// Finds `$rid` among the query's keys (in any position, the key possibly written `%24rid`).
fn find_rid(query: &str) -> Result<String, TopicError> {
    let mut rid = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let is_rid = key == "$rid" || key.eq_ignore_ascii_case("%24rid");
        if is_rid && rid.replace(value).is_some() {
            return Err(TopicError::DuplicateRid);
        }
    }
    match rid {
        Some(rid) if !rid.is_empty() => Ok(rid.to_owned()),
        _ => Err(TopicError::MissingRid),
    }
}

/// What a SUBSCRIBE filter from a device or module is for; `None` means SUBACK failure (0x80).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SubscriptionKind {
    /// Cloud-to-device messages for this device (or module).
    C2d,
    /// `devices/{id}/modules/{mid}/inputs/#`: module input messages.
    ModuleInputs,
    /// `devices/{id}/modules/{mid}/#`: everything addressed to the module.
    ModuleAll,
    TwinResponses,
    TwinDesired,
    Methods,
}

/// Decides whether `identity` may subscribe to `filter`. The device segment may be `+`, which
/// means the subscriber itself (the C SDK's C2D filter); no other wildcard position is allowed,
/// so `#` only ever admits the property bags of the subscriber's own topics.
///
/// A bare `#` (Microsoft's mosquitto_sub sample for IoT Hub subscribes to it to receive C2D)
/// means the subscriber's own topics outside `$iothub`: its C2D messages (and, for a module,
/// everything addressed to it). MQTT 3.1.1 (4.7.2) keeps a leading wildcard from matching
/// topics that start with `$`, so it grants no method requests or desired-property patches;
/// those need their `$iothub/...` filters. Twin responses go out without any subscription.
pub fn authorize_subscribe(identity: &Identity, filter: &str) -> Option<SubscriptionKind> {
    match filter {
        "#" if identity.module_id.is_none() => return Some(SubscriptionKind::C2d),
        "#" => return Some(SubscriptionKind::ModuleAll),
        "$iothub/twin/res/#" => return Some(SubscriptionKind::TwinResponses),
        "$iothub/twin/PATCH/properties/desired/#" => return Some(SubscriptionKind::TwinDesired),
        "$iothub/methods/POST/#" => return Some(SubscriptionKind::Methods),
        _ => {}
    }
    let (device, rest) = filter.strip_prefix("devices/")?.split_once('/')?;
    if device != "+" && (device != identity.device_id || has_wildcard(device)) {
        return None;
    }
    match &identity.module_id {
        None => (rest == "messages/devicebound/#").then_some(SubscriptionKind::C2d),
        Some(module_id) => {
            let (module, rest) = rest.strip_prefix("modules/")?.split_once('/')?;
            if module != module_id || has_wildcard(module) {
                return None;
            }
            match rest {
                "messages/devicebound/#" => Some(SubscriptionKind::C2d),
                "inputs/#" => Some(SubscriptionKind::ModuleInputs),
                "#" => Some(SubscriptionKind::ModuleAll),
                _ => None,
            }
        }
    }
}

fn has_wildcard(segment: &str) -> bool {
    segment.contains(['+', '#'])
}

/// A decoded property: `None` is a key written without `=` (a null value).
pub type Property = (String, Option<String>);

/// Decodes a property bag (`k=v&k2=&k3`): keys and values are percent-decoded, `+` stays `+`,
/// `k=` is an empty value, a bare `k` is null. Empty segments (`a=1&&b=2`, a trailing `&`) are
/// skipped. Duplicate keys are kept in order for the caller to judge.
pub fn parse_property_bag(bag: &str) -> Result<Vec<Property>, TopicError> {
    let mut props = Vec::new();
    for pair in bag.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = match pair.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (pair, None),
        };
        let key = encoding::decode(raw_key).map_err(|_| TopicError::InvalidUtf8)?;
        if key.is_empty() {
            return Err(TopicError::EmptyKey);
        }
        let value = raw_value
            .map(encoding::decode)
            .transpose()
            .map_err(|_| TopicError::InvalidUtf8)?;
        props.push((key, value));
    }
    Ok(props)
}

/// Encodes properties as IoT Hub writes them into C2D topics: everything but unreserved
/// characters is escaped (`$.mid` becomes `%24.mid`, which the C SDK matches literally).
pub fn encode_property_bag(props: &[Property]) -> String {
    let mut out = String::new();
    for (i, (key, value)) in props.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(&encoding::encode(key));
        if let Some(value) = value {
            out.push('=');
            out.push_str(&encoding::encode(value));
        }
    }
    out
}

/// `devices/{id}[/modules/{mid}]/messages/devicebound/{bag}`. The `/` after `devicebound` is
/// always written because the Node SDK's dispatch regex requires it.
pub fn c2d_topic(identity: &Identity, props: &[Property]) -> String {
    let mut topic = format!("devices/{}/", identity.device_id);
    if let Some(module_id) = &identity.module_id {
        topic.push_str("modules/");
        topic.push_str(module_id);
        topic.push('/');
    }
    topic.push_str("messages/devicebound/");
    topic.push_str(&encode_property_bag(props));
    topic
}

/// `$iothub/methods/POST/{name}/?$rid={rid}`: `$rid` must be the only and last key because the
/// C SDK takes everything after `$rid=` as the request id.
pub fn method_request_topic(method_name: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{method_name}/?$rid={rid}")
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`, `$rid` first as IoT Hub writes it.
pub fn twin_response_topic(status: u16, rid: &str, version: Option<u64>) -> String {
    match version {
        Some(v) => format!("$iothub/twin/res/{status}/?$rid={rid}&$version={v}"),
        None => format!("$iothub/twin/res/{status}/?$rid={rid}"),
    }
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}`; the C SDK requires the version.
pub fn desired_patch_topic(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn vectors() -> Value {
        serde_json::from_str(include_str!("../tests/vectors/sdk-topics.json")).unwrap()
    }

    /// The captures do not say which identity sent a `$iothub` topic; any identity will do.
    fn identity_for(topic: &str) -> Identity {
        let parts: Vec<&str> = topic.split('/').collect();
        match parts.as_slice() {
            ["devices", d, "modules", m, ..] => Identity::module(*d, *m),
            ["devices", d, ..] if *d != "+" => Identity::device(*d),
            _ => Identity::device("dev1"),
        }
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn every_captured_publish_is_accepted() {
        let v = vectors();
        let pubs = v["publishes"].as_array().unwrap();
        assert!(!pubs.is_empty());
        for p in pubs {
            let topic = p["topic"].as_str().unwrap();
            let id = identity_for(topic);
            let class = classify_publish(&id, topic).unwrap_or_else(|e| panic!("{topic}: {e}"));
            if let PublishTopic::Telemetry { property_bag } = class {
                parse_property_bag(property_bag).unwrap();
            }
            // The same topic from a stranger is refused.
            if topic.starts_with("devices/") {
                assert!(classify_publish(&Identity::device("intruder"), topic).is_err());
            }
        }
    }

    #[test]
    fn every_captured_subscribe_is_accepted() {
        let v = vectors();
        let subs = v["subscribes"].as_array().unwrap();
        assert!(!subs.is_empty());
        for sub in subs {
            let filter = sub["filter"].as_str().unwrap();
            let id = identity_for(filter);
            assert!(authorize_subscribe(&id, filter).is_some(), "{filter}");
            if filter.starts_with("devices/") {
                assert_eq!(
                    authorize_subscribe(&Identity::device("intruder"), filter),
                    None
                );
                assert_eq!(
                    authorize_subscribe(&Identity::module("intruder", "mod1"), filter),
                    None
                );
            }
        }
    }

    #[test]
    fn captured_publishes_classify_exactly() {
        let dev1 = Identity::device("dev1");
        let mod1 = Identity::module("dev1", "mod1");
        assert_eq!(
            classify_publish(
                &dev1,
                "$iothub/twin/GET/?$rid=d154bfbf-11a8-4c7e-9910-57b64c54c01c"
            ),
            Ok(PublishTopic::TwinGet {
                rid: s("d154bfbf-11a8-4c7e-9910-57b64c54c01c")
            })
        );
        assert_eq!(
            classify_publish(
                &mod1,
                "$iothub/twin/PATCH/properties/reported/?$rid=39fee4c3"
            ),
            Ok(PublishTopic::TwinPatchReported { rid: s("39fee4c3") })
        );
        assert_eq!(
            classify_publish(&dev1, "$iothub/methods/res/200/?$rid=1"),
            Ok(PublishTopic::MethodResponse {
                status: 200,
                rid: s("1")
            })
        );
        assert_eq!(
            classify_publish(
                &mod1,
                "devices/dev1/modules/mod1/messages/events/%24.on=out1"
            ),
            Ok(PublishTopic::Telemetry {
                property_bag: "%24.on=out1"
            })
        );
        assert_eq!(
            classify_publish(&dev1, "devices/dev1/messages/events/"),
            Ok(PublishTopic::Telemetry { property_bag: "" })
        );
        assert_eq!(
            classify_publish(&dev1, "devices/dev1/messages/events"),
            Ok(PublishTopic::Telemetry { property_bag: "" })
        );
    }

    #[test]
    fn rid_in_any_position_and_raw() {
        let dev = Identity::device("d");
        assert_eq!(
            classify_publish(
                &dev,
                "$iothub/twin/PATCH/properties/reported/?$version=3&$rid=a%20b"
            ),
            Ok(PublishTopic::TwinPatchReported { rid: s("a%20b") })
        );
        assert_eq!(
            classify_publish(&dev, "$iothub/methods/res/504/?x=1&%24rid=7"),
            Ok(PublishTopic::MethodResponse {
                status: 504,
                rid: s("7")
            })
        );
    }

    #[test]
    fn hostile_publishes_are_refused() {
        let dev1 = Identity::device("dev1");
        let mod1 = Identity::module("dev1", "mod1");
        let cases: &[(&Identity, &str, TopicError)] = &[
            (
                &dev1,
                "devices/dev2/messages/events/",
                TopicError::OtherIdentity,
            ),
            (
                &dev1,
                "devices/dev12/messages/events/",
                TopicError::OtherIdentity,
            ),
            (
                &dev1,
                "devices/dev/messages/events/",
                TopicError::OtherIdentity,
            ),
            (
                &dev1,
                "devices/DEV1/messages/events/",
                TopicError::OtherIdentity,
            ),
            (
                &dev1,
                "devices/dev1/modules/mod1/messages/events/",
                TopicError::OtherIdentity,
            ),
            (
                &mod1,
                "devices/dev1/messages/events/",
                TopicError::OtherIdentity,
            ),
            (
                &mod1,
                "devices/dev1/modules/mod2/messages/events/",
                TopicError::OtherIdentity,
            ),
            (&dev1, "devices/+/messages/events/", TopicError::Wildcard),
            (
                &dev1,
                "devices/dev1/messages/events/#",
                TopicError::Wildcard,
            ),
            (
                &dev1,
                "devices/dev1/messages/events/a=1+2",
                TopicError::Wildcard,
            ),
            (&dev1, "#", TopicError::Wildcard),
            (&dev1, "$iothub/twin/GET/?$rid=#", TopicError::Wildcard),
            (
                &dev1,
                "devices/dev1/messages/devicebound/",
                TopicError::NotAllowed,
            ),
            (
                &dev1,
                "devices/dev1/messages/eventsx",
                TopicError::NotAllowed,
            ),
            (&dev1, "devices/dev1/messages/", TopicError::NotAllowed),
            (&dev1, "devices/dev1", TopicError::NotAllowed),
            (&dev1, "devices/dev2", TopicError::NotAllowed),
            (&mod1, "devices/dev1/modules/mod1", TopicError::NotAllowed),
            (&mod1, "devices/dev1/modules/mod1/x", TopicError::NotAllowed),
            (&dev1, "devices/dev1/", TopicError::NotAllowed),
            (&dev1, "", TopicError::NotAllowed),
            (
                &dev1,
                "/devices/dev1/messages/events/",
                TopicError::NotAllowed,
            ),
            (&dev1, "other/topic", TopicError::NotAllowed),
            (
                &dev1,
                "$iothub/twin/res/200/?$rid=1",
                TopicError::NotAllowed,
            ),
            (
                &dev1,
                "$iothub/twin/PATCH/properties/desired/?$rid=1",
                TopicError::NotAllowed,
            ),
            (
                &dev1,
                "$iothub/methods/POST/x/?$rid=1",
                TopicError::NotAllowed,
            ),
            (&dev1, "$iothub/twin/GET/", TopicError::NotAllowed),
            (&dev1, "$iothub/twin/GET?$rid=1", TopicError::NotAllowed),
            (&dev1, "$iothub/twin/GET/?", TopicError::MissingRid),
            (&dev1, "$iothub/twin/GET/?$rid=", TopicError::MissingRid),
            (&dev1, "$iothub/twin/GET/?$rid", TopicError::MissingRid),
            (&dev1, "$iothub/twin/GET/?rid=1", TopicError::MissingRid),
            (
                &dev1,
                "$iothub/twin/GET/?$rid=1&$rid=2",
                TopicError::DuplicateRid,
            ),
            (
                &dev1,
                "$iothub/methods/res/ok/?$rid=1",
                TopicError::InvalidStatus,
            ),
            (
                &dev1,
                "$iothub/methods/res//?$rid=1",
                TopicError::InvalidStatus,
            ),
            (
                &dev1,
                "$iothub/methods/res/-1/?$rid=1",
                TopicError::InvalidStatus,
            ),
            (
                &dev1,
                "$iothub/methods/res/70000/?$rid=1",
                TopicError::InvalidStatus,
            ),
            (
                &dev1,
                "$iothub/methods/res/200?$rid=1",
                TopicError::NotAllowed,
            ),
            (&dev1, "$iothub/methods/res/200/?", TopicError::MissingRid),
        ];
        for (id, topic, expected) in cases {
            assert_eq!(
                classify_publish(id, topic).as_ref(),
                Err(expected),
                "{id} {topic}"
            );
        }
    }

    #[test]
    fn subscriptions() {
        let dev1 = Identity::device("dev1");
        let mod1 = Identity::module("dev1", "mod1");
        use SubscriptionKind::*;
        let cases: &[(&Identity, &str, Option<SubscriptionKind>)] = &[
            (&dev1, "devices/dev1/messages/devicebound/#", Some(C2d)),
            (&dev1, "devices/+/messages/devicebound/#", Some(C2d)),
            (&dev1, "$iothub/twin/res/#", Some(TwinResponses)),
            (
                &dev1,
                "$iothub/twin/PATCH/properties/desired/#",
                Some(TwinDesired),
            ),
            (&dev1, "$iothub/methods/POST/#", Some(Methods)),
            (&mod1, "$iothub/methods/POST/#", Some(Methods)),
            (
                &mod1,
                "devices/dev1/modules/mod1/messages/devicebound/#",
                Some(C2d),
            ),
            (
                &mod1,
                "devices/+/modules/mod1/messages/devicebound/#",
                Some(C2d),
            ),
            (
                &mod1,
                "devices/dev1/modules/mod1/inputs/#",
                Some(ModuleInputs),
            ),
            (&mod1, "devices/dev1/modules/mod1/#", Some(ModuleAll)),
            // A bare `#` is the subscriber's own C2D (mosquitto_sub's IoT Hub sample).
            (&dev1, "#", Some(C2d)),
            (&mod1, "#", Some(ModuleAll)),
            // Hostile or unknown filters.
            (&mod1, "+", None),
            (&dev1, "+", None),
            (&dev1, "+/#", None),
            (&dev1, "devices/#", None),
            (&dev1, "devices/+/#", None),
            (&dev1, "devices/dev1/#", None),
            (&dev1, "devices/dev2/messages/devicebound/#", None),
            (&dev1, "devices/dev1/messages/+/#", None),
            (&dev1, "devices/dev1/messages/devicebound/+", None),
            (&dev1, "devices/dev1/messages/devicebound", None),
            (&dev1, "devices/dev1/messages/devicebound/", None),
            (&dev1, "devices/dev1/messages/events/#", None),
            (&dev1, "devices/dev1/modules/mod1/#", None),
            (&dev1, "devices/dev1/modules/mod1/inputs/#", None),
            (&dev1, "devices/dev1/modules/+/#", None),
            (&dev1, "devices/de+/messages/devicebound/#", None),
            (&mod1, "devices/dev1/messages/devicebound/#", None),
            (&mod1, "devices/+/messages/devicebound/#", None),
            (&mod1, "devices/dev1/modules/+/#", None),
            (&mod1, "devices/dev1/modules/mod2/#", None),
            (&mod1, "devices/dev1/modules/#", None),
            (&mod1, "devices/dev1/modules/mod1/+/#", None),
            (&mod1, "devices/dev1/modules/mod1/inputs/x/#", None),
            (&mod1, "devices/dev2/modules/mod1/#", None),
            (&dev1, "$iothub/#", None),
            (&dev1, "$iothub/+/res/#", None),
            (&dev1, "$iothub/twin/#", None),
            (&dev1, "$iothub/twin/res/+", None),
            (&dev1, "$iothub/twin/PATCH/properties/reported/#", None),
            (&dev1, "$iothub/methods/res/#", None),
            (&dev1, "$SYS/#", None),
            (&dev1, "", None),
        ];
        for (id, filter, expected) in cases {
            assert_eq!(authorize_subscribe(id, filter), *expected, "{id} {filter}");
        }
    }

    #[test]
    fn captured_bags_decode() {
        let bag = "%24.mid=mid-1&%24.cid=cid-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp&%24.sub=comp1";
        assert_eq!(
            parse_property_bag(bag).unwrap(),
            vec![
                (s("$.mid"), Some(s("mid-1"))),
                (s("$.cid"), Some(s("cid-1"))),
                (s("$.ct"), Some(s("application/json"))),
                (s("$.ce"), Some(s("utf-8"))),
                (s("alert"), Some(s("high temp"))),
                (s("$.sub"), Some(s("comp1"))),
            ]
        );
    }

    #[test]
    fn bag_value_forms() {
        assert_eq!(parse_property_bag("").unwrap(), vec![]);
        assert_eq!(
            parse_property_bag("prop1&prop2=&prop3=a%20string&p4=a+b&p5=x=y&&").unwrap(),
            vec![
                (s("prop1"), None),
                (s("prop2"), Some(s(""))),
                (s("prop3"), Some(s("a string"))),
                (s("p4"), Some(s("a+b"))),
                (s("p5"), Some(s("x=y"))),
            ]
        );
        assert_eq!(parse_property_bag("=v"), Err(TopicError::EmptyKey));
        assert_eq!(parse_property_bag("k=%C3"), Err(TopicError::InvalidUtf8));
        assert_eq!(parse_property_bag("%FF=v"), Err(TopicError::InvalidUtf8));
    }

    #[test]
    fn bag_encoding_round_trips() {
        let props = vec![
            (s("$.mid"), Some(s("m 1"))),
            (s("$.to"), Some(s("/devices/dev1/messages/devicebound"))),
            (s("null"), None),
            (s("empty"), Some(s(""))),
            (s("odd&key=x"), Some(s("a+b&c=d%é"))),
        ];
        let bag = encode_property_bag(&props);
        assert_eq!(
            bag,
            "%24.mid=m%201&%24.to=%2Fdevices%2Fdev1%2Fmessages%2Fdevicebound&null&empty=&odd%26key%3Dx=a%2Bb%26c%3Dd%25%C3%A9"
        );
        assert_eq!(parse_property_bag(&bag).unwrap(), props);
        assert_eq!(encode_property_bag(&[]), "");
    }

    #[test]
    fn outgoing_topics() {
        let props = vec![
            (s("$.mid"), Some(s("1"))),
            (s("iothub-ack"), Some(s("full"))),
        ];
        assert_eq!(
            c2d_topic(&Identity::device("dev1"), &props),
            "devices/dev1/messages/devicebound/%24.mid=1&iothub-ack=full"
        );
        assert_eq!(
            c2d_topic(&Identity::module("dev1", "mod1"), &[]),
            "devices/dev1/modules/mod1/messages/devicebound/"
        );
        assert_eq!(
            method_request_topic("thermostat1*getMaxMinReport", "5"),
            "$iothub/methods/POST/thermostat1*getMaxMinReport/?$rid=5"
        );
        assert_eq!(
            twin_response_topic(200, "r", None),
            "$iothub/twin/res/200/?$rid=r"
        );
        assert_eq!(
            twin_response_topic(204, "r", Some(7)),
            "$iothub/twin/res/204/?$rid=r&$version=7"
        );
        assert_eq!(
            desired_patch_topic(3),
            "$iothub/twin/PATCH/properties/desired/?$version=3"
        );
    }

    #[test]
    fn c2d_topics_are_inside_the_c2d_subscription() {
        let dev1 = Identity::device("dev1");
        let topic = c2d_topic(&dev1, &[(s("a"), None)]);
        let filter_prefix = "devices/dev1/messages/devicebound/";
        assert!(topic.starts_with(filter_prefix));
        assert_eq!(
            authorize_subscribe(&dev1, "devices/dev1/messages/devicebound/#"),
            Some(SubscriptionKind::C2d)
        );
    }
}
