//! What the broker needs from durable storage: persistent (CleanSession=0) sessions' subscriptions.
//!
//! The broker defines the trait; whoever composes the server adapts a real store to it, so the
//! broker never depends on a storage crate.

use async_trait::async_trait;
use ferrohub_mqtt::QoS;

/// The part of a session that must survive reconnects and restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersistedSession {
    /// Filters and granted QoS, in subscription order.
    pub subscriptions: Vec<(String, QoS)>,
}

/// A session store failure, with the engine's error as its source.
#[derive(Debug, thiserror::Error)]
#[error("session store failed: {0}")]
pub struct PersistenceError(#[source] pub Box<dyn std::error::Error + Send + Sync + 'static>);

/// Durable storage of persistent sessions, keyed by client id.
#[async_trait]
pub trait SessionPersistence: Send + Sync + 'static {
    async fn load(&self, client_id: &str) -> Result<Option<PersistedSession>, PersistenceError>;
    /// Durable when it returns: a SUBACK is sent only after this.
    async fn save(
        &self,
        client_id: &str,
        session: &PersistedSession,
    ) -> Result<(), PersistenceError>;
    async fn delete(&self, client_id: &str) -> Result<(), PersistenceError>;
}

/// Keeps nothing: for a broker whose sessions need not outlive the process, and for tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPersistence;

#[async_trait]
impl SessionPersistence for NoPersistence {
    async fn load(&self, _: &str) -> Result<Option<PersistedSession>, PersistenceError> {
        Ok(None)
    }
    async fn save(&self, _: &str, _: &PersistedSession) -> Result<(), PersistenceError> {
        Ok(())
    }
    async fn delete(&self, _: &str) -> Result<(), PersistenceError> {
        Ok(())
    }
}
