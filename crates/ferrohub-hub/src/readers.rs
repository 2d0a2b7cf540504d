//! Who reads each partition of a consumer group over the Event Hubs endpoint, with Event Hubs'
//! rules: an epoch reader is exclusive and the newest epoch at or above the current one takes
//! over (the others are told they were stolen); without an epoch, at most
//! [`MAX_READERS`] read one partition of one group at once. Node-local: readers of one group
//! on other nodes of a cluster are not counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::Hub;

/// Non-epoch readers per partition per consumer group, as Event Hubs allows.
pub const MAX_READERS: usize = 5;

/// Why a reader was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReaderRefusal {
    #[error("at most {MAX_READERS} readers per partition and consumer group")]
    TooManyReaders,
    #[error("a reader with epoch {current} holds this partition; epoch {asked} is lower")]
    LowerEpoch { current: i64, asked: i64 },
    #[error("a reader with epoch {0} holds this partition; readers without an epoch cannot join")]
    EpochHeld(i64),
}

struct Member {
    id: u64,
    epoch: Option<i64>,
    stolen: watch::Sender<bool>,
}

#[derive(Default)]
pub(crate) struct Readers {
    slots: Mutex<HashMap<(String, u32), Vec<Member>>>,
    next_id: AtomicU64,
}

/// A reader's place; dropping it frees the place. `stolen` turns true when a newer epoch
/// reader took the partition.
pub struct ReaderLease {
    readers: Arc<Readers>,
    key: (String, u32),
    id: u64,
    pub stolen: watch::Receiver<bool>,
}

impl Drop for ReaderLease {
    fn drop(&mut self) {
        let mut slots = self.readers.lock();
        if let Some(members) = slots.get_mut(&self.key) {
            members.retain(|m| m.id != self.id);
            if members.is_empty() {
                slots.remove(&self.key);
            }
        }
    }
}

impl Readers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u32), Vec<Member>>> {
        // Each change leaves the map consistent; a panicking holder breaks nothing.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn admit(
        self: &Arc<Self>,
        group: &str,
        partition: u32,
        epoch: Option<i64>,
    ) -> Result<ReaderLease, ReaderRefusal> {
        let key = (group.to_ascii_lowercase(), partition);
        let mut slots = self.lock();
        let members = slots.entry(key.clone()).or_default();
        let held = members.iter().filter_map(|m| m.epoch).max();
        match (held, epoch) {
            (Some(current), Some(asked)) if asked < current => {
                return Err(ReaderRefusal::LowerEpoch { current, asked })
            }
            (Some(current), None) => return Err(ReaderRefusal::EpochHeld(current)),
            (None, None) if members.len() >= MAX_READERS => {
                return Err(ReaderRefusal::TooManyReaders)
            }
            _ => {}
        }
        if epoch.is_some() {
            // The new epoch reader takes the partition from everyone else.
            for m in members.drain(..) {
                let _ = m.stolen.send(true);
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        members.push(Member {
            id,
            epoch,
            stolen: tx,
        });
        Ok(ReaderLease {
            readers: self.clone(),
            key,
            id,
            stolen: rx,
        })
    }
}

impl Hub {
    /// Admits a reader of `partition` in `group` (case-insensitive) under Event Hubs' epoch
    /// and reader-count rules; hold the lease while reading.
    pub fn admit_reader(
        &self,
        group: &str,
        partition: u32,
        epoch: Option<i64>,
    ) -> Result<ReaderLease, ReaderRefusal> {
        self.readers.admit(group, partition, epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_five_readers_without_an_epoch() {
        let r = Arc::new(Readers::default());
        let leases: Vec<_> = (0..MAX_READERS)
            .filter_map(|_| r.admit("$Default", 0, None).ok())
            .collect();
        assert_eq!(leases.len(), MAX_READERS);
        assert_eq!(
            r.admit("$default", 0, None).err(),
            Some(ReaderRefusal::TooManyReaders)
        );
        assert!(r.admit("$Default", 1, None).is_ok(), "another partition");
        assert!(r.admit("other", 0, None).is_ok(), "another group");
        drop(leases);
        assert!(
            r.admit("$Default", 0, None).is_ok(),
            "places are freed on drop"
        );
    }

    #[test]
    fn a_higher_or_equal_epoch_steals_and_a_lower_one_is_refused() {
        let r = Arc::new(Readers::default());
        let plain = r.admit("g", 0, None).ok();
        let first = r.admit("g", 0, Some(5)).ok();
        assert_eq!(plain.as_ref().map(|l| *l.stolen.borrow()), Some(true));
        assert_eq!(first.as_ref().map(|l| *l.stolen.borrow()), Some(false));
        assert_eq!(
            r.admit("g", 0, Some(4)).err(),
            Some(ReaderRefusal::LowerEpoch {
                current: 5,
                asked: 4
            })
        );
        assert_eq!(
            r.admit("g", 0, None).err(),
            Some(ReaderRefusal::EpochHeld(5))
        );
        let second = r.admit("g", 0, Some(5)).ok();
        assert_eq!(first.as_ref().map(|l| *l.stolen.borrow()), Some(true));
        assert_eq!(second.as_ref().map(|l| *l.stolen.borrow()), Some(false));
        drop((first, second, plain));
        assert!(r.admit("g", 0, None).is_ok(), "no epoch reader left");
    }
}
