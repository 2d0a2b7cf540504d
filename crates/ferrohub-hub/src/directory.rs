//! Who holds each identity's live connection, with what the hub's push features (C2D, desired
//! notifications, methods) need of it: [`ConnectionDirectory`], and this process's
//! implementation, [`LocalDirectory`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ferrohub_iothub::{Identity, SubscriptionKind};
use tokio::sync::{watch, Notify};

use crate::link::Outbound;

/// Which of the hub's push features a connection has subscribed to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Subscribed {
    pub c2d: bool,
    pub methods: bool,
    pub desired: bool,
}

impl Subscribed {
    pub(crate) fn of(identity: &Identity, filters: &[String]) -> Self {
        let mut s = Subscribed::default();
        for f in filters {
            match ferrohub_iothub::authorize_subscribe(identity, f) {
                Some(SubscriptionKind::C2d) | Some(SubscriptionKind::ModuleAll) => s.c2d = true,
                Some(SubscriptionKind::Methods) => s.methods = true,
                Some(SubscriptionKind::TwinDesired) => s.desired = true,
                _ => {}
            }
        }
        s
    }
}

/// The live connection of an identity.
pub struct Link {
    /// Which connection of the identity this is (see `HubClient::conn_seq`).
    pub conn_seq: u64,
    pub outbound: Outbound,
    pub subs: Subscribed,
    /// The task draining the C2D queue to this connection, and its wake-up.
    pub c2d: Option<(tokio::task::AbortHandle, Arc<Notify>)>,
}

/// What a reader gets of a link: cheap clones (reference counts), no allocation.
#[derive(Clone)]
pub struct LinkView {
    pub conn_seq: u64,
    pub outbound: Outbound,
    pub subs: Subscribed,
    /// Wakes the C2D delivery task, while there is one.
    pub c2d_wake: Option<Arc<Notify>>,
}

/// What [`ConnectionDirectory::detach`] found.
pub enum Detached {
    /// The connection's link, now removed.
    Removed(Link),
    /// The identity had no link (the connection never got as far as attaching).
    NotFound,
    /// A newer connection of the identity holds it; nothing changed.
    Replaced,
}

/// Which connection holds each identity, and the link to it.
///
/// A clustered implementation must guarantee:
/// - one live connection per identity across the cluster: `attach` on one node displaces a
///   connection held on another (which the front end there then closes, as a takeover), and
///   `conn_seq` is unique across the cluster, so `detach` and `update` of a displaced
///   connection never touch the newer one wherever it lives;
/// - `get` of an identity connected to another node returns a link whose [`Outbound`]
///   forwards to that node; the C2D delivery task and its wake-up stay on the node that holds
///   the connection (`update` runs there);
/// - `changes` fires after every change `get` can observe, whichever node made it: method
///   calls wait on it for a device to connect and subscribe.
pub trait ConnectionDirectory: Send + Sync + 'static {
    /// Makes `link` the identity's live connection; returns the link it displaced.
    fn attach(&self, identity: &Identity, link: Link) -> Option<Link>;
    /// Removes the identity's link if it is still connection `conn_seq`.
    fn detach(&self, identity: &Identity, conn_seq: u64) -> Detached;
    /// The identity's live connection, whichever it is.
    fn get(&self, identity: &Identity) -> Option<LinkView>;
    /// Changes connection `conn_seq`'s link in place; false when that connection no longer
    /// holds the identity (and `change` was not run).
    fn update(&self, identity: &Identity, conn_seq: u64, change: &mut dyn FnMut(&mut Link))
        -> bool;
    /// A counter that moves on every change.
    fn changes(&self) -> watch::Receiver<u64>;
}

/// The links of this process's connections.
pub struct LocalDirectory {
    links: Mutex<HashMap<Identity, Link>>,
    changes: watch::Sender<u64>,
}

impl Default for LocalDirectory {
    fn default() -> Self {
        Self {
            links: Mutex::new(HashMap::new()),
            changes: watch::channel(0).0,
        }
    }
}

impl LocalDirectory {
    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Link>> {
        // Each change is one insert, remove or field store: a panicking holder cannot leave a
        // link half-changed.
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
    }
}

impl ConnectionDirectory for LocalDirectory {
    fn attach(&self, identity: &Identity, link: Link) -> Option<Link> {
        let old = self.links().insert(identity.clone(), link);
        self.changed();
        old
    }

    fn detach(&self, identity: &Identity, conn_seq: u64) -> Detached {
        let found = {
            let mut links = self.links();
            match links.get(identity) {
                None => Detached::NotFound,
                Some(l) if l.conn_seq != conn_seq => Detached::Replaced,
                Some(_) => match links.remove(identity) {
                    Some(l) => Detached::Removed(l),
                    None => Detached::NotFound,
                },
            }
        };
        if matches!(found, Detached::Removed(_)) {
            self.changed();
        }
        found
    }

    fn get(&self, identity: &Identity) -> Option<LinkView> {
        self.links().get(identity).map(|l| LinkView {
            conn_seq: l.conn_seq,
            outbound: l.outbound.clone(),
            subs: l.subs,
            c2d_wake: l.c2d.as_ref().map(|(_, n)| n.clone()),
        })
    }

    fn update(
        &self,
        identity: &Identity,
        conn_seq: u64,
        change: &mut dyn FnMut(&mut Link),
    ) -> bool {
        let done = match self.links().get_mut(identity) {
            Some(l) if l.conn_seq == conn_seq => {
                change(l);
                true
            }
            _ => false,
        };
        if done {
            self.changed();
        }
        done
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{DeviceLink, NotConnected, OutboundMessage, TrySendError};

    struct Nowhere;

    #[async_trait::async_trait]
    impl DeviceLink for Nowhere {
        async fn send(&self, _: OutboundMessage) -> Result<(), NotConnected> {
            Err(NotConnected)
        }
        fn try_send(&self, _: OutboundMessage) -> Result<(), TrySendError> {
            Err(TrySendError::Closed)
        }
        fn is_closed(&self) -> bool {
            true
        }
    }

    fn link(conn_seq: u64) -> Link {
        Link {
            conn_seq,
            outbound: Outbound::new(Nowhere),
            subs: Subscribed::default(),
            c2d: None,
        }
    }

    #[test]
    fn a_displaced_connection_cannot_change_or_remove_the_newer_one() {
        let dir = LocalDirectory::default();
        let id = Identity::device("d");
        let mut changes = dir.changes();
        assert!(dir.attach(&id, link(1)).is_none());
        assert!(dir
            .attach(&id, link(2))
            .is_some_and(|old| old.conn_seq == 1));
        assert!(changes.has_changed().unwrap_or(false));
        changes.mark_unchanged();

        let subscribe = &mut |l: &mut Link| l.subs.methods = true;
        assert!(
            !dir.update(&id, 1, subscribe),
            "the old connection's SUBACK"
        );
        assert!(matches!(dir.detach(&id, 1), Detached::Replaced));
        assert!(!changes.has_changed().unwrap_or(true), "nothing changed");
        assert!(dir
            .get(&id)
            .is_some_and(|l| l.conn_seq == 2 && !l.subs.methods));

        assert!(dir.update(&id, 2, subscribe));
        assert!(dir.get(&id).is_some_and(|l| l.subs.methods));
        assert!(
            changes.has_changed().unwrap_or(false),
            "waiters see the subscription"
        );
        assert!(matches!(dir.detach(&id, 2), Detached::Removed(l) if l.conn_seq == 2));
        assert!(dir.get(&id).is_none());
        assert!(matches!(dir.detach(&id, 2), Detached::NotFound));
    }
}
