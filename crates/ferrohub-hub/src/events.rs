//! Reading the telemetry log as back ends do: from a consumer group's checkpoint, the start,
//! the end, a time or a sequence number, across every partition or one, optionally only one
//! device's (or module's) events; the group's checkpoint follows what the reader has taken.
//!
//! A reader task per stream reads each partition in turn and, when caught up, sleeps on the
//! log's commit signal (no polling). Positions advance as [`EventStream::next`] hands events
//! out, so a reader that reconnects with the checkpoint gets no event twice and misses none
//! published since; events in flight when a reader vanished count as read.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrohub_store::telemetry::{EventRecord, StartPosition, TelemetryLog};
use tokio::sync::mpsc;

use crate::error::HubError;
use crate::Hub;

/// Events read from one partition per store call.
const READ_BATCH: usize = 256;
/// How often a reader's position is saved as the group's checkpoint.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Events buffered towards a slow reader before reading the log pauses.
const BUFFERED: usize = 64;
/// How often a reader that is behind measures how far (`ferrohub_event_reader_lag_events`).
const LAG_EVERY: Duration = Duration::from_secs(1);

/// The consumer group a reader belongs to when it names none.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";

/// Where a reader starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventStart {
    /// Where the group's last reader stopped, or the end if the group never read.
    Checkpoint,
    Position(StartPosition),
}

impl EventStart {
    /// `checkpoint` (the default) | `start` | `end` | a sequence number | an RFC 3339 time.
    pub fn parse(v: Option<&str>) -> Result<Self, HubError> {
        match v.unwrap_or("checkpoint") {
            "checkpoint" => Ok(EventStart::Checkpoint),
            "start" => Ok(EventStart::Position(StartPosition::Start)),
            "end" => Ok(EventStart::Position(StartPosition::End)),
            other => {
                if let Ok(n) = other.parse::<u64>() {
                    return Ok(EventStart::Position(StartPosition::Sequence(n)));
                }
                let t = time::OffsetDateTime::parse(
                    other,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|_| {
                    HubError::argument(format!(
                        "from must be checkpoint, start, end, a sequence number or an RFC 3339 time, not {other:?}"
                    ))
                })?;
                let ms = t.unix_timestamp_nanos() / 1_000_000;
                Ok(EventStart::Position(StartPosition::EnqueuedAt(
                    i64::try_from(ms).unwrap_or(i64::MAX),
                )))
            }
        }
    }
}

/// What a reader asks for.
#[derive(Debug, Clone)]
pub struct EventQuery {
    /// [`DEFAULT_CONSUMER_GROUP`] when `None`.
    pub consumer_group: Option<String>,
    pub start: EventStart,
    /// Every partition when `None`.
    pub partition: Option<u32>,
    pub device_id: Option<String>,
    pub module_id: Option<String>,
    /// The endpoint read: a custom stream's name, or the built-in stream for `None`/`events`.
    pub endpoint: Option<String>,
    /// Whether the group's checkpoint follows this reader (`GET /events`). Event Hubs readers
    /// keep their own checkpoints and only read, so theirs do not move the group's.
    pub track_checkpoint: bool,
}

/// What the Event Hubs `$management` READ of a partition reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The oldest retained sequence number (the next one to be written when empty).
    pub begin_sequence: u64,
    /// The newest stored event's sequence number and enqueued time (ms), if any.
    pub last: Option<(u64, i64)>,
}

fn valid_group(g: &str) -> bool {
    !g.is_empty()
        && g.len() <= 50
        && g.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._$".contains(c))
}

/// Per partition, the next sequence number the reader has not taken.
type Positions = Arc<Mutex<Vec<(u32, u64)>>>;

fn advance(positions: &Positions, partition: u32, next: u64) {
    let mut w = positions.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(slot) = w.iter_mut().find(|(p, _)| *p == partition) {
        slot.1 = next;
    }
}

fn snapshot(positions: &Positions) -> Vec<(u32, u64)> {
    positions.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// An open event stream; dropping it stops its reader (which saves the checkpoint last).
pub struct EventStream {
    rx: mpsc::Receiver<EventRecord>,
    taken: Positions,
}

impl EventStream {
    /// The next event, waiting for one to be committed; `None` once the log failed or closed.
    /// The group's position moves past the event as it is handed out.
    pub async fn next(&mut self) -> Option<EventRecord> {
        let e = self.rx.recv().await?;
        advance(&self.taken, e.partition, e.sequence + 1);
        crate::metrics::event_delivered();
        Some(e)
    }

    /// The next event if one is already read and waiting, without waiting for more (an AMQP
    /// drain: send what is there, then give up the rest of the credit).
    pub fn try_next(&mut self) -> Option<EventRecord> {
        let e = self.rx.try_recv().ok()?;
        advance(&self.taken, e.partition, e.sequence + 1);
        crate::metrics::event_delivered();
        Some(e)
    }
}

impl Hub {
    /// Opens a stream of telemetry events for a back end.
    pub async fn open_events(&self, q: EventQuery) -> Result<EventStream, HubError> {
        let log = self.endpoint_log(q.endpoint.as_deref())?;
        let group = q
            .consumer_group
            .unwrap_or_else(|| DEFAULT_CONSUMER_GROUP.into());
        if !valid_group(&group) {
            return Err(HubError::argument(
                "consumerGroup: 1-50 of A-Z a-z 0-9 - . _ $",
            ));
        }
        let count = log.partition_count();
        let partitions: Vec<u32> = match q.partition {
            Some(p) if p >= count => {
                return Err(HubError::argument(format!(
                    "partition must be below {count}"
                )))
            }
            Some(p) => vec![p],
            None => (0..count).collect(),
        };
        if matches!(q.start, EventStart::Position(StartPosition::Sequence(_)))
            && partitions.len() != 1
        {
            return Err(HubError::argument(
                "a sequence number in from needs a partition",
            ));
        }
        let saved = log.checkpoints(&group).await?;
        let mut positions = Vec::with_capacity(partitions.len());
        for p in &partitions {
            let pos = match (q.start, saved.get(p)) {
                (EventStart::Checkpoint, Some(n)) => *n,
                (EventStart::Checkpoint, None) => log.resolve(*p, StartPosition::End).await?,
                (EventStart::Position(sp), _) => log.resolve(*p, sp).await?,
            };
            positions.push((*p, pos));
        }
        let (tx, rx) = mpsc::channel(BUFFERED);
        let taken: Positions = Arc::new(Mutex::new(positions.clone()));
        let reader = Reader {
            log,
            group,
            track_checkpoint: q.track_checkpoint,
            device: q.device_id,
            module: q.module_id,
            tx,
            taken: taken.clone(),
        };
        tokio::spawn(reader.run(positions));
        Ok(EventStream { rx, taken })
    }
}

impl Hub {
    /// How many partitions the telemetry log has.
    pub fn event_partitions(&self) -> u32 {
        self.telemetry.partition_count()
    }

    /// The retained range of one partition.
    pub async fn partition_info(&self, partition: u32) -> Result<PartitionInfo, HubError> {
        let count = self.telemetry.partition_count();
        if partition >= count {
            return Err(HubError::argument(format!(
                "partition must be below {count}"
            )));
        }
        let begin = self
            .telemetry
            .resolve(partition, StartPosition::Start)
            .await?;
        let end = self
            .telemetry
            .resolve(partition, StartPosition::End)
            .await?;
        let last = match end.checked_sub(1).filter(|l| *l >= begin) {
            Some(l) => self
                .telemetry
                .read(partition, l, 1)
                .await?
                .first()
                .map(|e| (e.sequence, e.event.enqueued_ms)),
            None => None,
        };
        Ok(PartitionInfo {
            begin_sequence: begin,
            last,
        })
    }
}

/// The task behind one [`EventStream`].
struct Reader {
    log: Arc<dyn TelemetryLog>,
    group: String,
    track_checkpoint: bool,
    device: Option<String>,
    module: Option<String>,
    tx: mpsc::Sender<EventRecord>,
    /// What the stream has handed out; checkpoints are saved from this, not from what is
    /// merely queued.
    taken: Positions,
}

impl Reader {
    fn wanted(&self, e: &EventRecord) -> bool {
        self.device
            .as_deref()
            .is_none_or(|d| d == e.event.device_id)
            && self
                .module
                .as_deref()
                .is_none_or(|m| Some(m) == e.event.module_id.as_deref())
    }

    /// Events committed past `positions`: one read per partition, so done at most once a
    /// second, and only while behind (caught up is 0 without asking).
    async fn lag(&self, positions: &[(u32, u64)]) -> u64 {
        let mut behind = 0u64;
        for (partition, next) in positions {
            if let Ok(head) = self.log.resolve(*partition, StartPosition::End).await {
                behind = behind.saturating_add(head.saturating_sub(*next));
            }
        }
        behind
    }

    /// Reads the partitions in turn until the stream goes away.
    async fn run(self, mut positions: Vec<(u32, u64)>) {
        let mut commits = self.log.watch_commits();
        let mut saved_at = Instant::now();
        let mut dirty = false;
        let mut metrics = crate::metrics::ReaderMetrics::open();
        let mut lag_at: Option<Instant> = None;
        'outer: loop {
            commits.borrow_and_update();
            let mut progressed = false;
            for (partition, next) in positions.iter_mut() {
                let batch = match self.log.read(*partition, *next, READ_BATCH).await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "event stream read failed");
                        break 'outer;
                    }
                };
                for e in batch {
                    *next = e.sequence + 1;
                    progressed = true;
                    dirty = true;
                    if !self.wanted(&e) {
                        // Filtered out: nothing to hand out, but the group has passed it.
                        advance(&self.taken, *partition, *next);
                        continue;
                    }
                    if self.tx.send(e).await.is_err() {
                        break 'outer;
                    }
                }
            }
            if dirty && saved_at.elapsed() >= CHECKPOINT_EVERY {
                self.save().await;
                saved_at = Instant::now();
                dirty = false;
            }
            if progressed {
                if lag_at.is_none_or(|t| t.elapsed() >= LAG_EVERY) {
                    metrics.lag(self.lag(&positions).await);
                    lag_at = Some(Instant::now());
                }
                continue;
            }
            metrics.lag(0);
            tokio::select! {
                r = commits.changed() => if r.is_err() { break },
                _ = self.tx.closed() => break,
                _ = tokio::time::sleep(CHECKPOINT_EVERY), if dirty => {}
            }
        }
        if dirty {
            self.save().await;
        }
    }

    async fn save(&self) {
        if !self.track_checkpoint {
            return;
        }
        for (p, n) in snapshot(&self.taken) {
            if let Err(e) = self.log.save_checkpoint(&self.group, p, n).await {
                tracing::warn!(error = %e, group = %self.group, "could not save a checkpoint");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_parse_as_iot_hub_readers_give_them() {
        assert_eq!(EventStart::parse(None).ok(), Some(EventStart::Checkpoint));
        assert_eq!(
            EventStart::parse(Some("17")).ok(),
            Some(EventStart::Position(StartPosition::Sequence(17)))
        );
        assert_eq!(
            EventStart::parse(Some("1970-01-01T00:00:01Z")).ok(),
            Some(EventStart::Position(StartPosition::EnqueuedAt(1000)))
        );
        assert!(EventStart::parse(Some("soon")).is_err());
    }

    #[test]
    fn group_names_follow_event_hubs_rules() {
        assert!(valid_group("$Default"));
        assert!(!valid_group(""));
        assert!(!valid_group("a/b"));
        assert!(!valid_group(&"g".repeat(51)));
    }
}
