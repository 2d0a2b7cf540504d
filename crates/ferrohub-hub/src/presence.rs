//! Who is connected, and when each identity was last active: the live overlay on the registry.
//!
//! Kept in memory on purpose: connection state is true only while this process holds the
//! connection, so writing it to disk on every connect would cost an fsync and say nothing
//! after a restart. A clustered mode moves this map to the shared engine.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use ferrohub_iothub::Identity;

#[derive(Debug, Clone, Copy)]
pub struct PresenceEntry {
    pub connected: bool,
    pub state_updated: SystemTime,
    pub last_activity: SystemTime,
}

#[derive(Default)]
pub struct Presence {
    map: Mutex<HashMap<Identity, PresenceEntry>>,
}

impl Presence {
    pub fn connected(&self, id: &Identity) {
        let now = SystemTime::now();
        self.lock().insert(
            id.clone(),
            PresenceEntry {
                connected: true,
                state_updated: now,
                last_activity: now,
            },
        );
    }

    pub fn disconnected(&self, id: &Identity) {
        let now = SystemTime::now();
        if let Some(e) = self.lock().get_mut(id) {
            e.connected = false;
            e.state_updated = now;
            e.last_activity = now;
        }
    }

    pub fn activity(&self, id: &Identity) {
        if let Some(e) = self.lock().get_mut(id) {
            e.last_activity = SystemTime::now();
        }
    }

    pub fn get(&self, id: &Identity) -> Option<PresenceEntry> {
        self.lock().get(id).copied()
    }

    pub fn forget(&self, id: &Identity) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, PresenceEntry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}
