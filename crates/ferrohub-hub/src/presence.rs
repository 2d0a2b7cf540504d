//! Who is connected, and when each identity was last active: the live overlay on the registry.
//!
//! Kept in memory on purpose: connection state is true only while this process holds the
//! connection, so writing it to disk on every connect would cost an fsync and say nothing
//! after a restart. [`PresenceRegistry`] is what a clustered mode replaces; [`LocalPresence`]
//! is this process's.
//!
//! Activity is per connection: each connection owns a [`ConnectionActivity`] its PUBLISHes
//! stamp with one atomic store, so the hottest path of the hub takes no lock and shares no
//! cache line with other connections. The registry's map changes only on connect and
//! disconnect; readers (the REST device views) read the atomics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrohub_iothub::Identity;

/// What the API shows of an identity's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceEntry {
    pub connected: bool,
    /// When `connected` last changed (`connectionStateUpdatedTime`).
    pub state_updated: SystemTime,
    /// The last connect, device message or disconnect (`lastActivityTime`).
    pub last_activity: SystemTime,
}

/// One connection's last activity, written by that connection alone and read by anyone.
#[derive(Debug)]
pub struct ConnectionActivity {
    conn_seq: u64,
    /// Unix time in nanoseconds (an `i64` lasts until 2262).
    last: AtomicI64,
}

fn to_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn from_nanos(n: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(n).unwrap_or(0))
}

impl ConnectionActivity {
    /// The activity of connection `conn_seq`, active now.
    pub fn new(conn_seq: u64) -> Self {
        Self {
            conn_seq,
            last: AtomicI64::new(to_nanos(SystemTime::now())),
        }
    }

    /// Which connection of its identity this is (newer connections have larger numbers).
    pub fn conn_seq(&self) -> u64 {
        self.conn_seq
    }

    /// Records activity now: one relaxed store, nothing else is ordered by it.
    pub fn touch(&self) {
        self.touch_at(SystemTime::now());
    }

    pub fn touch_at(&self, t: SystemTime) {
        self.last.store(to_nanos(t), Ordering::Relaxed);
    }

    pub fn last(&self) -> SystemTime {
        from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// Who is connected, as the API reports it.
///
/// A clustered implementation must guarantee:
/// - connections are ordered by `conn_seq`, which must then be unique across the cluster (not
///   only per process): a `disconnected` or late `connected` of an older connection never
///   hides a newer one, whichever node holds either;
/// - `get` may lag for activity (IoT Hub's `lastActivityTime` is approximate too, so a node may
///   publish its connections' activity periodically rather than per message), but never
///   reports `Connected` for an identity whose every connection has ended, except for the time
///   it takes to learn that a node died;
/// - recording activity stays on the connection's own [`ConnectionActivity`], so the PUBLISH
///   path never waits on the shared engine.
pub trait PresenceRegistry: Send + Sync + 'static {
    /// A connection of `id` was established; `activity` is what its messages update.
    fn connected(&self, id: &Identity, activity: Arc<ConnectionActivity>);
    /// Connection `conn_seq` of `id` ended. A newer connection of `id` is left as it is.
    fn disconnected(&self, id: &Identity, conn_seq: u64);
    /// What is known of `id`, or `None` when it has not connected since this process started.
    fn get(&self, id: &Identity) -> Option<PresenceEntry>;
    /// Drops what is known of `id` (it was deleted from the registry).
    fn forget(&self, id: &Identity);
    /// How many devices (not modules) are connected now (`connectedDeviceCount`); a shared
    /// implementation counts every node's.
    fn connected_devices(&self) -> u64;
}

struct Entry {
    connected: bool,
    state_updated: SystemTime,
    activity: Arc<ConnectionActivity>,
}

/// Presence of this process's connections.
#[derive(Default)]
pub struct LocalPresence {
    map: Mutex<HashMap<Identity, Entry>>,
}

impl LocalPresence {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        // Plain values: a panicking holder cannot leave an entry half-changed.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PresenceRegistry for LocalPresence {
    fn connected(&self, id: &Identity, activity: Arc<ConnectionActivity>) {
        let now = SystemTime::now();
        activity.touch_at(now);
        let mut map = self.entries();
        if let Some(e) = map.get(id) {
            if e.activity.conn_seq() > activity.conn_seq() {
                return;
            }
        }
        map.insert(
            id.clone(),
            Entry {
                connected: true,
                state_updated: now,
                activity,
            },
        );
    }

    fn disconnected(&self, id: &Identity, conn_seq: u64) {
        let mut map = self.entries();
        if let Some(e) = map.get_mut(id) {
            if e.activity.conn_seq() == conn_seq && e.connected {
                let now = SystemTime::now();
                e.connected = false;
                e.state_updated = now;
                e.activity.touch_at(now);
            }
        }
    }

    fn get(&self, id: &Identity) -> Option<PresenceEntry> {
        self.entries().get(id).map(|e| PresenceEntry {
            connected: e.connected,
            state_updated: e.state_updated,
            last_activity: e.activity.last(),
        })
    }

    fn forget(&self, id: &Identity) {
        self.entries().remove(id);
    }

    fn connected_devices(&self) -> u64 {
        self.entries()
            .iter()
            .filter(|(id, e)| id.module_id.is_none() && e.connected)
            .count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    #[test]
    fn activity_is_recorded_while_the_map_is_locked() {
        let presence = LocalPresence::default();
        let id = Identity::device("d");
        let activity = Arc::new(ConnectionActivity::new(1));
        presence.connected(&id, activity.clone());

        // Whoever holds the map (a connect, a REST listing) cannot hold up a PUBLISH.
        let map = presence.entries();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let writer = activity.clone();
        std::thread::spawn(move || {
            writer.touch_at(at(42));
            let _ = done_tx.send(());
        });
        assert!(
            done_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "recording activity waited for the presence map"
        );
        drop(map);

        let p = presence.get(&id).expect("known after connect");
        assert!(p.connected);
        assert_eq!(p.last_activity, at(42));
        assert_ne!(
            p.state_updated,
            at(42),
            "activity does not change the state time"
        );
    }

    #[test]
    fn an_older_connection_ending_leaves_the_newer_one_connected() {
        let presence = LocalPresence::default();
        let id = Identity::module("d", "m");
        let old = Arc::new(ConnectionActivity::new(1));
        let new = Arc::new(ConnectionActivity::new(2));
        presence.connected(&id, old.clone());
        // The takeover: the new connection is set up before the old one's close is handled.
        presence.connected(&id, new.clone());
        old.touch_at(at(1));
        new.touch_at(at(2));
        presence.disconnected(&id, 1);
        let p = presence.get(&id).expect("known");
        assert!(p.connected, "the newer connection is still there");
        assert_eq!(p.last_activity, at(2), "and its activity is what shows");

        // A late set-up of the older one does not hide the newer either.
        presence.connected(&id, old);
        assert_eq!(presence.get(&id).map(|p| p.last_activity), Some(at(2)));

        presence.disconnected(&id, 2);
        let p = presence.get(&id).expect("still known after disconnect");
        assert!(!p.connected);
        assert_eq!(
            p.state_updated, p.last_activity,
            "the disconnect is the last activity"
        );
        presence.disconnected(&id, 2);
        assert_eq!(
            presence.get(&id),
            Some(p),
            "a second disconnect changes nothing"
        );

        presence.forget(&id);
        assert_eq!(presence.get(&id), None);
    }

    #[test]
    fn connected_devices_counts_devices_that_are_connected_now() {
        let presence = LocalPresence::default();
        presence.connected(&Identity::device("a"), Arc::new(ConnectionActivity::new(1)));
        presence.connected(&Identity::device("b"), Arc::new(ConnectionActivity::new(2)));
        presence.connected(
            &Identity::module("a", "m"),
            Arc::new(ConnectionActivity::new(3)),
        );
        assert_eq!(presence.connected_devices(), 2, "a module is not a device");
        presence.disconnected(&Identity::device("b"), 2);
        assert_eq!(presence.connected_devices(), 1, "b is known but gone");
        presence.forget(&Identity::device("a"));
        assert_eq!(presence.connected_devices(), 0);
    }
}
