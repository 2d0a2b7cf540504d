//! The load generator: one task per connection keeping --inflight QoS 1 PUBLISHes unacknowledged,
//! paced when --rate is given, timing each PUBACK while the window is measured.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use ferrohub_mqtt::{decode, encode, Packet, Publish, QoS};
use hdrhistogram::Histogram;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use super::{Shared, TelemetryArgs};
use crate::device::{self, CloseOutcome, MqttStream};
use crate::registry::FleetArgs;

/// Longest the bench waits, after the measured window, for PUBLISHes still in flight.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// A PUBACK is 4 bytes; anything near this limit means the peer is not an MQTT server.
const MAX_INBOUND_PACKET: usize = 4096;
/// A paced send this far behind its schedule counts as late: the generator or the server could
/// not keep up with --rate (or --inflight was too small for it), which latency measured from the
/// actual send would not show. Above tokio's 1 ms timer resolution, which alone makes paced sends
/// up to a millisecond late, in small bursts.
pub(super) const LATE: Duration = Duration::from_millis(2);

/// What one connection did.
pub(super) struct ConnReport {
    /// PUBACK latency in microseconds, measured window only.
    pub(super) latency_us: Histogram<u64>,
    pub(super) sent: u64,
    pub(super) acked: u64,
    pub(super) late_sends: u64,
    /// PUBLISHes still unacknowledged when the connection ended.
    pub(super) unacked: usize,
    /// Why the connection ended before the bench closed it.
    pub(super) error: Option<String>,
    pub(super) close: Option<CloseOutcome>,
}

/// One connection's publishing state.
struct Publisher {
    stream: MqttStream,
    /// The encoded PUBLISH; only its packet identifier changes from message to message.
    template: Vec<u8>,
    id_offset: usize,
    limit: usize,
    /// Packet identifier to send time.
    in_flight: HashMap<u16, Instant>,
    last_id: u16,
    pace: Option<Pace>,
}

struct Pace {
    interval: Duration,
    next_due: Instant,
}

impl Publisher {
    fn new(stream: MqttStream, topic: String, body: Bytes, limit: usize) -> Result<Publisher> {
        let (template, id_offset) = publish_template(topic, body)?;
        Ok(Publisher {
            stream,
            template,
            id_offset,
            limit,
            in_flight: HashMap::with_capacity(limit),
            last_id: 0,
            pace: None,
        })
    }

    /// Packet identifiers cycle through 1..=65535, skipping those still in flight; a broker
    /// treats a reused in-flight identifier as a retransmission.
    fn next_id(&mut self) -> u16 {
        loop {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            if !self.in_flight.contains_key(&self.last_id) {
                return self.last_id;
            }
        }
    }

    async fn run(
        &mut self,
        start: Instant,
        shared: &Shared,
        stop: &mut watch::Receiver<bool>,
        report: &mut ConnReport,
    ) -> Result<(), String> {
        let mut out = BytesMut::with_capacity(self.template.len() * self.limit.min(64));
        let mut input = BytesMut::with_capacity(4096);
        let mut drain_deadline: Option<Instant> = None;
        sleep_until(start.into()).await;
        loop {
            if drain_deadline.is_none() {
                let now = Instant::now();
                while self.in_flight.len() < self.limit {
                    if let Some(pace) = &mut self.pace {
                        if pace.next_due > now {
                            break;
                        }
                        if now - pace.next_due > LATE {
                            report.late_sends += 1;
                        }
                        pace.next_due += pace.interval;
                    }
                    let id = self.next_id();
                    let at = out.len();
                    out.extend_from_slice(&self.template);
                    out[at + self.id_offset..at + self.id_offset + 2]
                        .copy_from_slice(&id.to_be_bytes());
                    self.in_flight.insert(id, now);
                    report.sent += 1;
                }
                // Never more than `limit` PUBLISHes and their PUBACKs are outstanding, so writing
                // without reading cannot deadlock against a server blocked on writing to us.
                if !out.is_empty() {
                    self.stream
                        .write_all(&out)
                        .await
                        .map_err(|e| format!("writing PUBLISH: {e}"))?;
                    self.stream
                        .flush()
                        .await
                        .map_err(|e| format!("writing PUBLISH: {e}"))?;
                    out.clear();
                }
            } else if self.in_flight.is_empty() {
                return Ok(());
            }

            let wake = match (drain_deadline, &self.pace) {
                (Some(deadline), _) => Some(deadline),
                (None, Some(pace)) if self.in_flight.len() < self.limit => Some(pace.next_due),
                _ => None,
            };
            tokio::select! {
                read = self.stream.read_buf(&mut input) => {
                    match read {
                        Ok(0) => return Err("server closed the connection".to_owned()),
                        Ok(_) => {}
                        Err(e) => return Err(format!("reading: {e}")),
                    }
                    self.take_acks(&mut input, shared, report)?;
                }
                _ = sleep_until(wake.unwrap_or_else(Instant::now).into()), if wake.is_some() => {
                    if drain_deadline.is_some() {
                        return Err(format!(
                            "{} PUBLISHes still unacknowledged {} s after the run",
                            self.in_flight.len(),
                            DRAIN_TIMEOUT.as_secs()
                        ));
                    }
                }
                _ = stop.changed(), if drain_deadline.is_none() => {
                    drain_deadline = Some(Instant::now() + DRAIN_TIMEOUT);
                }
            }
        }
    }

    fn take_acks(
        &mut self,
        input: &mut BytesMut,
        shared: &Shared,
        report: &mut ConnReport,
    ) -> Result<(), String> {
        let now = Instant::now();
        let measuring = shared.measuring.load(Ordering::Relaxed);
        let mut acked = 0;
        let result = loop {
            match decode(input, MAX_INBOUND_PACKET) {
                Ok(Some(Packet::PubAck(id))) => match self.in_flight.remove(&id) {
                    Some(sent) => {
                        acked += 1;
                        if measuring {
                            // `record` grows the histogram as needed; `saturating_record` would
                            // clamp to its current (initially tiny) range instead.
                            let us = (now - sent).as_micros() as u64;
                            if report.latency_us.record(us).is_err() {
                                report.latency_us.saturating_record(us);
                            }
                        }
                    }
                    None => {
                        break Err(format!("PUBACK for packet id {id}, which is not in flight"))
                    }
                },
                Ok(Some(other)) => break Err(format!("unexpected packet {other:?}")),
                Ok(None) => break Ok(()),
                Err(e) => break Err(format!("undecodable packet: {e}")),
            }
        };
        // One shared update per read rather than per PUBACK keeps the counter off the hot path.
        shared.acked.fetch_add(acked, Ordering::Relaxed);
        report.acked += acked;
        result
    }
}

/// A QoS 1 PUBLISH and the offset of its packet identifier, so messages are made by copying and
/// patching two bytes rather than encoding.
pub(crate) fn publish_template(topic: String, body: Bytes) -> Result<(Vec<u8>, usize)> {
    let body_len = body.len();
    let mut buf = BytesMut::new();
    encode(
        &Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic,
            packet_id: 1,
            payload: body,
        }),
        &mut buf,
    )
    .context("encoding PUBLISH")?;
    // The identifier is the last field of the variable header, right before the payload.
    let offset = buf.len() - body_len - 2;
    Ok((buf.to_vec(), offset))
}

/// Publishes until told to stop, waits for the outstanding PUBACKs, then disconnects.
async fn drive(
    mut publisher: Publisher,
    start: Instant,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> ConnReport {
    let mut report = ConnReport {
        latency_us: Histogram::new(3).expect("3 significant figures are supported"),
        sent: 0,
        acked: 0,
        late_sends: 0,
        unacked: 0,
        error: None,
        close: None,
    };
    let outcome = publisher.run(start, &shared, &mut stop, &mut report).await;
    report.unacked = publisher.in_flight.len();
    match outcome {
        Ok(()) => report.close = Some(device::disconnect(publisher.stream).await),
        Err(e) => report.error = Some(e),
    }
    report
}

/// Filler for message bodies: printable, so a broker log or a stored event stays readable.
pub(crate) fn body(len: usize) -> Bytes {
    let pattern = b"ferrohub-bench telemetry ";
    Bytes::from(
        pattern
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect::<Vec<u8>>(),
    )
}

/// The telemetry of `--json-body`: what an IoT Plug and Play thermostat sends.
pub(crate) const JSON_BODY: &str = r#"{"temperature":21.5}"#;

/// `JSON_BODY` padded with spaces (still one JSON document) to `len` bytes, or unpadded when
/// `len` is shorter.
pub(crate) fn json_body(len: usize) -> Bytes {
    let mut body = JSON_BODY.as_bytes().to_vec();
    body.resize(len.max(body.len()), b' ');
    Bytes::from(body)
}

/// The topic's property bag declaring a JSON body, so routing and conformance read it as such.
const JSON_PROPERTIES: [(&str, &str); 2] = [("$.ct", "application/json"), ("$.ce", "utf-8")];

/// The property bag of a telemetry topic, each name and value percent-encoded.
fn property_bag<'a>(properties: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    properties
        .into_iter()
        .map(|(name, value)| {
            format!(
                "{}={}",
                utf8_percent_encode(name, NON_ALPHANUMERIC),
                utf8_percent_encode(value, NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

pub(super) fn spawn_publishers(
    args: &TelemetryArgs,
    fleet: &FleetArgs,
    streams: Vec<MqttStream>,
    start: Instant,
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
) -> Result<Vec<JoinHandle<ConnReport>>> {
    let n = streams.len();
    // Each connection offers rate/N, phase-shifted by i/N of its interval so the total is even.
    let interval = args.rate.map(|r| Duration::from_secs_f64(n as f64 / r));
    let (body, system): (_, &[(&str, &str)]) = if args.json_body {
        (json_body(args.body_bytes), &JSON_PROPERTIES)
    } else {
        (body(args.body_bytes), &[])
    };
    let application = args
        .properties
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()));
    let properties = property_bag(system.iter().copied().chain(application));
    let mut tasks = Vec::with_capacity(n);
    for (index, stream) in streams.into_iter().enumerate() {
        let topic = format!(
            "devices/{}/messages/events/{properties}",
            fleet.device_id(index)
        );
        let mut publisher = Publisher::new(stream, topic, body.clone(), args.inflight)?;
        publisher.pace = interval.map(|interval| Pace {
            interval,
            next_due: start + interval.mul_f64(index as f64 / n as f64),
        });
        tasks.push(tokio::spawn(drive(
            publisher,
            start,
            Arc::clone(shared),
            stop.clone(),
        )));
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_body_is_one_json_document_of_the_asked_length() -> anyhow::Result<()> {
        let body = json_body(256);
        assert_eq!(body.len(), 256);
        let parsed: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(parsed, serde_json::json!({"temperature": 21.5}));
        assert_eq!(json_body(3).as_ref(), JSON_BODY.as_bytes());
        Ok(())
    }

    #[test]
    fn property_bags_are_percent_encoded() {
        assert_eq!(
            property_bag(JSON_PROPERTIES.iter().copied().chain([("level", "a b&c")])),
            "%24%2Ect=application%2Fjson&%24%2Ece=utf%2D8&level=a%20b%26c"
        );
        assert_eq!(property_bag([]), "");
    }

    #[test]
    fn body_has_the_asked_length() {
        assert_eq!(body(256).len(), 256);
        assert_eq!(body(0).len(), 0);
        assert!(body(300).iter().all(|b| b.is_ascii_graphic() || *b == b' '));
    }

    #[test]
    fn latency_histograms_grow_to_fit() -> Result<()> {
        let mut h = Histogram::<u64>::new(3)?;
        for us in [150, 40_000, 2_500_000] {
            h.record(us)?;
        }
        assert_eq!(h.max(), h.highest_equivalent(2_500_000));
        assert!(h.value_at_percentile(50.0).abs_diff(40_000) < 40);
        Ok(())
    }

    #[test]
    fn patching_the_template_changes_only_the_packet_id() -> Result<()> {
        let topic = "devices/bench-7/messages/events/";
        // 200 bytes makes the remaining length a two-byte varint.
        for len in [0, 5, 200, 256] {
            let (template, offset) = publish_template(topic.to_owned(), body(len))?;
            for id in [1u16, 0x1234, 65535] {
                let mut wire = BytesMut::from(&template[..]);
                wire[offset..offset + 2].copy_from_slice(&id.to_be_bytes());
                match decode(&mut wire, 1 << 20)? {
                    Some(Packet::Publish(p)) => {
                        assert_eq!(p.packet_id, id);
                        assert_eq!(p.topic, topic);
                        assert_eq!(p.qos, QoS::AtLeastOnce);
                        assert_eq!(p.payload, body(len));
                    }
                    other => panic!("decoded {other:?}"),
                }
                assert!(wire.is_empty());
            }
        }
        Ok(())
    }
}
