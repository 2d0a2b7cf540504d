//! The Event Hubs shape of the telemetry log over AMQP: link addresses (every node's), selector filters
//! -> start positions, a stored event -> the AMQP message Event Hubs consumers read, and the
//! `$management` READ answers. Pure mapping; the connection calls the hub with the results.

use ferrohub_amqp::message::{Body, Properties};
use ferrohub_amqp::performative::Symbol;
use ferrohub_amqp::{Message, Value};
use ferrohub_hub::events::PartitionInfo;
use ferrohub_iothub::telemetry as keys;
use ferrohub_store::telemetry::{EventRecord, StartPosition};

/// The filter key (and descriptor) of Event Hubs' selector filter.
pub const SELECTOR_FILTER: &str = "apache.org:selector-filter:string";
/// The numeric descriptor some clients use for it.
pub const SELECTOR_FILTER_CODE: u64 = 0x0000_468C_0000_0004;

/// A receiver's source address, once the scheme and host are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionAddress {
    pub consumer_group: String,
    pub partition: u32,
}

/// What a link address names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Cbs,
    Management,
    Partition(PartitionAddress),
    /// The IoT Hub-style events path (`messages/events[/...]`), answered with a redirect to
    /// the entity; carries what follows `messages/events`.
    IotHubEvents(String),
    /// `messages/devicebound`: back ends send C2D messages here.
    DeviceBound,
    /// `messages/serviceBound/feedback`: C2D feedback for back ends.
    Feedback,
    /// `messages/serviceBound/filenotifications`: file upload notifications.
    FileNotifications,
    Unknown,
}

/// Where an IoT Hub-style events address is redirected: the same path below the entity.
pub fn redirect_address(host: &str, port: u16, entity: &str, rest: &str) -> String {
    format!("amqps://{host}:{port}/{entity}{rest}")
}

/// The path of an address: `amqps://HOST[:PORT]/path`, `/path` or `path` all give `path`.
fn path_of(address: &str) -> &str {
    let rest = ["amqps://", "amqp://", "sb://"]
        .iter()
        .find_map(|s| address.strip_prefix(s))
        .map(|r| r.split_once('/').map_or("", |(_, p)| p));
    rest.unwrap_or(address).trim_start_matches('/')
}

/// Classifies a link address against the Event Hubs-compatible entity name.
pub fn node(address: &str, entity: &str) -> Node {
    let path = path_of(address).trim_end_matches('/');
    if path == "$cbs" || path == "cbs" {
        return Node::Cbs;
    }
    if path == "$management" || path.eq_ignore_ascii_case(&format!("{entity}/$management")) {
        return Node::Management;
    }
    // Node spells `serviceBound`, the CLI `servicebound`.
    for (name, n) in [
        ("messages/devicebound", Node::DeviceBound),
        ("messages/servicebound/feedback", Node::Feedback),
        (
            "messages/servicebound/filenotifications",
            Node::FileNotifications,
        ),
    ] {
        if path.eq_ignore_ascii_case(name) {
            return n;
        }
    }
    if let Some(rest) = strip_prefix_ignore_case(path, "messages/events") {
        if rest.is_empty() || rest.starts_with('/') {
            return Node::IotHubEvents(rest.to_owned());
        }
    }
    let seg: Vec<&str> = path.split('/').collect();
    match seg.as_slice() {
        [e, cg, group, p, n]
            if e.eq_ignore_ascii_case(entity)
                && cg.eq_ignore_ascii_case("ConsumerGroups")
                && p.eq_ignore_ascii_case("Partitions") =>
        {
            match n.parse::<u32>() {
                // Event Hubs compares group names case-insensitively.
                Ok(partition) => Node::Partition(PartitionAddress {
                    consumer_group: group.to_ascii_lowercase(),
                    partition,
                }),
                Err(_) => Node::Unknown,
            }
        }
        _ => Node::Unknown,
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// The selector expression of a source's filter set, if it has one.
pub fn selector(filter: &Value) -> Option<String> {
    let Value::Map(entries) = filter else {
        return None;
    };
    entries.iter().find_map(|(k, v)| {
        let is_selector =
            k.as_str() == Some(SELECTOR_FILTER) || k.as_u64() == Some(SELECTOR_FILTER_CODE);
        match v {
            Value::Described(_, inner) if is_selector => inner.as_str().map(str::to_owned),
            _ => None,
        }
    })
}

/// Where a receiver starts, from its selector expression (`None`: Event Hubs starts at the
/// oldest event). The expressions are those the SDKs write:
/// `amqp.annotation.x-opt-offset > '-1'`, `... >= '12'`, `... > '@latest'`,
/// `amqp.annotation.x-opt-sequence-number > '5'`, `amqp.annotation.x-opt-enqueued-time > '<ms>'`,
/// and the older CLI's unquoted `amqp.annotation.x-opt-enqueuedtimeutc > 1578...`.
/// Offsets are our sequence numbers as text, so a consumer resuming after offset N reads N+1.
pub fn start_position(expr: Option<&str>) -> Result<StartPosition, String> {
    let Some(expr) = expr else {
        return Ok(StartPosition::Start);
    };
    let bad = || format!("unsupported selector filter {expr:?}");
    let full = expr.trim();
    let rest = full.strip_prefix("amqp.annotation.").ok_or_else(bad)?;
    let name_len = rest
        .find(|c: char| c.is_whitespace() || c == '>' || c == '=')
        .ok_or_else(bad)?;
    let (name, after_name) = rest.split_at(name_len);
    let after_name = after_name.trim_start();
    let (inclusive, value) = if let Some(v) = after_name.strip_prefix(">=") {
        (true, v)
    } else if let Some(v) = after_name.strip_prefix('>') {
        (false, v)
    } else if let Some(v) = after_name.strip_prefix('=') {
        (true, v)
    } else {
        return Err(bad());
    };
    let value = value.trim();
    let value = value
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .unwrap_or(value);
    let number = |v: &str| v.parse::<i64>().map_err(|_| bad());
    let after = |n: i64| -> StartPosition {
        if n < 0 {
            StartPosition::Start
        } else {
            let n = n as u64;
            StartPosition::Sequence(if inclusive { n } else { n.saturating_add(1) })
        }
    };
    match name {
        "x-opt-offset" => match value {
            "@latest" => Ok(StartPosition::End),
            v => Ok(after(number(v)?)),
        },
        "x-opt-sequence-number" => Ok(after(number(value)?)),
        "x-opt-enqueued-time" | "x-opt-enqueuedtimeutc" => {
            let ms = number(value)?;
            Ok(StartPosition::EnqueuedAt(if inclusive {
                ms
            } else {
                ms.saturating_add(1)
            }))
        }
        _ => Err(bad()),
    }
}

/// Properties-section keys of the stored property bag; everything else the hub stamped is a
/// message annotation, as IoT Hub's endpoint sends it.
fn is_property(key: &str) -> bool {
    [
        keys::MESSAGE_ID,
        keys::CORRELATION_ID,
        keys::USER_ID,
        keys::CONTENT_TYPE,
        keys::CONTENT_ENCODING,
    ]
    .contains(&key)
}

/// A stored event as the AMQP message Event Hubs consumers read.
pub fn event_message(e: &EventRecord) -> Message {
    let ev = &e.event;
    let mut annotations = vec![
        (
            Value::sym("x-opt-sequence-number"),
            Value::Long(e.sequence as i64),
        ),
        (
            Value::sym("x-opt-offset"),
            Value::str(e.sequence.to_string()),
        ),
        (
            Value::sym("x-opt-enqueued-time"),
            Value::Timestamp(ev.enqueued_ms),
        ),
    ];
    for (k, v) in &ev.system_properties {
        if is_property(k) {
            continue;
        }
        let value = if k == keys::ENQUEUED_TIME {
            Value::Timestamp(ev.enqueued_ms)
        } else {
            Value::str(v.clone())
        };
        annotations.push((Value::sym(k.clone()), value));
    }
    let sp = |k: &str| ev.system_properties.get(k).cloned();
    let properties = Properties {
        message_id: sp(keys::MESSAGE_ID).map_or(Value::Null, Value::String),
        user_id: sp(keys::USER_ID).map(String::into_bytes),
        correlation_id: sp(keys::CORRELATION_ID).map_or(Value::Null, Value::String),
        content_type: sp(keys::CONTENT_TYPE).map(Symbol),
        content_encoding: sp(keys::CONTENT_ENCODING).map(Symbol),
        ..Default::default()
    };
    Message {
        message_annotations: annotations,
        properties: Some(properties),
        application_properties: ev
            .properties
            .iter()
            .map(|(k, v)| {
                (
                    Value::str(k.clone()),
                    v.clone().map_or(Value::Null, Value::String),
                )
            })
            .collect(),
        body: Body::Data(vec![ev.body.clone()]),
        ..Default::default()
    }
}

/// The delivery annotations of a receiver that asked for runtime metrics: the partition's
/// newest event (the same figures as a `$management` partition READ) and when they were
/// taken, as `azure-eventhub`'s `last_enqueued_event_properties` reads them.
pub fn runtime_metrics(info: &PartitionInfo, now_ms: i64) -> Vec<(Value, Value)> {
    let (last_seq, last_time) = match info.last {
        Some((s, t)) => (s as i64, t),
        None => (-1, 0),
    };
    vec![
        (
            Value::sym("last_enqueued_sequence_number"),
            Value::Long(last_seq),
        ),
        (
            Value::sym("last_enqueued_offset"),
            Value::str(last_seq.to_string()),
        ),
        (
            Value::sym("last_enqueued_time_utc"),
            Value::Timestamp(last_time),
        ),
        (
            Value::sym("runtime_info_retrieval_time_utc"),
            Value::Timestamp(now_ms),
        ),
    ]
}

/// The `$management` READ answer for the event hub.
pub fn eventhub_properties(entity: &str, partitions: u32, created_ms: i64) -> Value {
    Value::Map(vec![
        (Value::str("name"), Value::str(entity)),
        (Value::str("type"), Value::str("com.microsoft:eventhub")),
        (Value::str("created_at"), Value::Timestamp(created_ms)),
        (Value::str("partition_count"), Value::Int(partitions as i32)),
        (
            Value::str("partition_ids"),
            Value::Array((0..partitions).map(|p| Value::str(p.to_string())).collect()),
        ),
    ])
}

/// The `$management` READ answer for one partition. An empty partition reports -1 as Event
/// Hubs does.
pub fn partition_properties(entity: &str, partition: u32, info: &PartitionInfo) -> Value {
    let (last_seq, last_time) = match info.last {
        Some((s, t)) => (s as i64, t),
        None => (-1, 0),
    };
    Value::Map(vec![
        (Value::str("name"), Value::str(entity)),
        (Value::str("type"), Value::str("com.microsoft:partition")),
        (Value::str("partition"), Value::str(partition.to_string())),
        (
            Value::str("begin_sequence_number"),
            Value::Long(info.begin_sequence as i64),
        ),
        (
            Value::str("last_enqueued_sequence_number"),
            Value::Long(last_seq),
        ),
        (
            Value::str("last_enqueued_offset"),
            Value::str(last_seq.to_string()),
        ),
        (
            Value::str("last_enqueued_time_utc"),
            Value::Timestamp(last_time),
        ),
        (
            Value::str("is_partition_empty"),
            Value::Bool(info.last.is_none()),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_partitions_case_insensitively() {
        let want = Node::Partition(PartitionAddress {
            consumer_group: "$default".into(),
            partition: 2,
        });
        assert_eq!(
            node(
                "amqps://h:5671/hub/ConsumerGroups/$Default/Partitions/2",
                "hub"
            ),
            want
        );
        assert_eq!(
            node("/HUB/consumergroups/$DEFAULT/partitions/2", "hub"),
            want
        );
        assert_eq!(
            node("other/ConsumerGroups/$Default/Partitions/2", "hub"),
            Node::Unknown
        );
        assert_eq!(
            node("hub/ConsumerGroups/$Default/Partitions/x", "hub"),
            Node::Unknown
        );
        assert_eq!(node("$cbs", "hub"), Node::Cbs);
        assert_eq!(
            node("amqps://h.example/messages/devicebound", "hub"),
            Node::DeviceBound
        );
        assert_eq!(node("/messages/devicebound", "hub"), Node::DeviceBound);
        assert_eq!(
            node("/messages/serviceBound/feedback", "hub"),
            Node::Feedback
        );
        assert_eq!(
            node("amqps://h/messages/servicebound/feedback", "hub"),
            Node::Feedback
        );
        assert_eq!(
            node("/messages/serviceBound/filenotifications", "hub"),
            Node::FileNotifications
        );
        assert_eq!(node("/messages/devicebound/x", "hub"), Node::Unknown);
        assert_eq!(node("amqps://h/hub/$management", "hub"), Node::Management);
        assert_eq!(
            node("amqps://h/messages/events/$management", "hub"),
            Node::IotHubEvents("/$management".into())
        );
        assert_eq!(
            node(
                "/messages/events/ConsumerGroups/$Default/Partitions/0",
                "hub"
            ),
            Node::IotHubEvents("/ConsumerGroups/$Default/Partitions/0".into())
        );
        assert_eq!(node("messages/eventsx", "hub"), Node::Unknown);
    }

    #[test]
    fn selectors_become_start_positions() {
        let p = |e: &str| start_position(Some(e));
        assert_eq!(
            p("amqp.annotation.x-opt-offset > '-1'"),
            Ok(StartPosition::Start)
        );
        assert_eq!(
            p("amqp.annotation.x-opt-offset > '@latest'"),
            Ok(StartPosition::End)
        );
        assert_eq!(
            p("amqp.annotation.x-opt-offset > '12'"),
            Ok(StartPosition::Sequence(13))
        );
        assert_eq!(
            p("amqp.annotation.x-opt-offset >= '12'"),
            Ok(StartPosition::Sequence(12))
        );
        assert_eq!(
            p("amqp.annotation.x-opt-sequence-number > '4'"),
            Ok(StartPosition::Sequence(5))
        );
        assert_eq!(
            p("amqp.annotation.x-opt-enqueued-time > '1000'"),
            Ok(StartPosition::EnqueuedAt(1001))
        );
        assert_eq!(
            p("amqp.annotation.x-opt-enqueuedtimeutc > 1578000000000"),
            Ok(StartPosition::EnqueuedAt(1_578_000_000_001))
        );
        assert!(p("amqp.annotation.x-opt-offset < '3'").is_err());
        assert!(p("sys.whatever = 1").is_err());
        assert_eq!(start_position(None), Ok(StartPosition::Start));
    }
}
