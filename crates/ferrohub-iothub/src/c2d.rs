//! Cloud-to-device message rules: the property bag a device reads from the topic, with the
//! system properties IoT Hub exposes, in the order IoT Hub writes them.

use crate::identity::Identity;
use crate::topics::Property;

/// The system properties of a cloud-to-device message a device may read.
#[derive(Debug, Clone, Copy)]
pub struct C2dSystemProperties<'a> {
    pub identity: &'a Identity,
    pub message_id: &'a str,
    pub correlation_id: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub content_encoding: Option<&'a str>,
    /// The expiry as the hub formats UTC times (7 fractional digits).
    pub expiry_utc: &'a str,
    /// `iothub-ack` (`positive`, `negative`, `full`), when the sender asked for feedback.
    pub ack: Option<&'a str>,
}

/// The topic's property bag: the system properties, then the application properties in send
/// order.
pub fn c2d_property_bag(sys: &C2dSystemProperties<'_>, application: &[Property]) -> Vec<Property> {
    let mut props: Vec<Property> = Vec::with_capacity(application.len() + 8);
    props.push(("$.mid".into(), Some(sys.message_id.to_string())));
    let to = match &sys.identity.module_id {
        None => format!("/devices/{}/messages/devicebound", sys.identity.device_id),
        Some(m) => format!(
            "/devices/{}/modules/{m}/messages/devicebound",
            sys.identity.device_id
        ),
    };
    props.push(("$.to".into(), Some(to)));
    for (key, value) in [
        ("$.cid", sys.correlation_id),
        ("$.uid", sys.user_id),
        ("$.ct", sys.content_type),
        ("$.ce", sys.content_encoding),
    ] {
        if let Some(v) = value {
            props.push((key.into(), Some(v.to_string())));
        }
    }
    props.push(("$.exp".into(), Some(sys.expiry_utc.to_string())));
    if let Some(a) = sys.ack {
        props.push(("iothub-ack".into(), Some(a.into())));
    }
    props.extend(application.iter().cloned());
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topics::c2d_topic;

    #[test]
    fn bag_has_system_properties_then_application_ones_in_order() {
        let id = Identity::module("d1", "m1");
        let sys = C2dSystemProperties {
            identity: &id,
            message_id: "m1",
            correlation_id: Some("c 1"),
            user_id: None,
            content_type: None,
            content_encoding: Some("utf-8"),
            expiry_utc: "1970-01-01T00:00:00.0000000Z",
            ack: Some("full"),
        };
        let bag = c2d_property_bag(&sys, &[("z".into(), None)]);
        assert_eq!(
            c2d_topic(&id, &bag),
            "devices/d1/modules/m1/messages/devicebound/%24.mid=m1\
             &%24.to=%2Fdevices%2Fd1%2Fmodules%2Fm1%2Fmessages%2Fdevicebound\
             &%24.cid=c%201&%24.ce=utf-8&%24.exp=1970-01-01T00%3A00%3A00.0000000Z&iothub-ack=full&z"
        );
    }
}
