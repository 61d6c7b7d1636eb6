//! The outbox error type.

use thiserror::Error;

/// What can go wrong in the outbox, the relay or the inbox.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum OutboxError {
    /// The database failed (connection, constraint, timeout, ...).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// Building the envelope failed (invalid name, payload over the limit, ...).
    #[error(transparent)]
    Bus(#[from] bus_core::BusError),

    /// A configuration value is invalid; `setting` names it.
    #[error("invalid configuration {setting}: {reason}")]
    InvalidConfig {
        /// The setting, e.g. `outbox.table_prefix`.
        setting: &'static str,
        /// Why it was refused.
        reason: String,
    },

    /// A migration failed; the database is left at the last version that applied completely.
    #[error("migration {version} ({description}) failed: {source}")]
    Migration {
        /// The migration's version.
        version: i64,
        /// What it does.
        description: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },

    /// A stored row cannot be turned back into an envelope (it was written by something else, or damaged).
    #[error("outbox row {seq} is invalid: {reason}")]
    CorruptRow {
        /// The row's sequence number.
        seq: i64,
        /// What is wrong with it.
        reason: String,
    },
}

impl OutboxError {
    pub(crate) fn config(setting: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidConfig { setting, reason: reason.into() }
    }
}
