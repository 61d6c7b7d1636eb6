//! Settings of the outbox, the relay and the inbox, validated when each is built.

use std::time::Duration;

use bus_core::{DEFAULT_MAX_PAYLOAD_BYTES, RetryPolicy};

use crate::error::OutboxError;

/// Checks a SQL identifier (schema, table prefix) against `^[A-Za-z_][A-Za-z0-9_]{0,62}$`.
pub(crate) fn check_identifier(setting: &'static str, value: &str, may_be_empty: bool) -> Result<(), OutboxError> {
    if value.is_empty() {
        return if may_be_empty { Ok(()) } else { Err(OutboxError::config(setting, "must not be empty")) };
    }
    let mut chars = value.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || value.len() > 63 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(OutboxError::config(
            setting,
            format!("{value:?} is not a valid identifier (expected ^[A-Za-z_][A-Za-z0-9_]{{0,62}}$)"),
        ));
    }
    Ok(())
}

/// Where the outbox keeps its tables and how it accepts events.
#[derive(Clone, Debug)]
pub struct OutboxConfig {
    /// PostgreSQL schema of our tables (`None`: the connection's search path). Must be `None` on SQLite.
    pub schema: Option<String>,
    /// Prefix of our table names: `<prefix>outbox`, `<prefix>inbox`, `<prefix>migrations`. Default `bus_`.
    pub table_prefix: String,
    /// The publishing service's name, stored as each event's `source` (AMQP `app_id`).
    pub service: String,
    /// Largest payload accepted by `enqueue`, in bytes. Default 256 KiB.
    pub max_payload_bytes: usize,
    /// PostgreSQL only: after a commit, also wake relays in other processes with a `NOTIFY` (sent outside the
    /// business transaction, coalesced). Default true.
    pub notify_other_processes: bool,
    /// Shortest time between two such NOTIFYs: commits in between share the next one. Each NOTIFY takes a
    /// global lock in PostgreSQL, so sending one per commit costs producers throughput (−13 % at 8 writers
    /// without this debounce, measured); relays in this process are woken at once regardless. Default 5 ms.
    pub notify_interval: Duration,
}

impl OutboxConfig {
    /// Defaults for service `service`.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            schema: None,
            table_prefix: "bus_".into(),
            service: service.into(),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            notify_other_processes: true,
            notify_interval: Duration::from_millis(5),
        }
    }

    /// Sets the schema.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }

    /// Sets the table prefix.
    pub fn table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.table_prefix = prefix.into();
        self
    }

    pub(crate) fn validate(&self) -> Result<(), OutboxError> {
        if let Some(schema) = &self.schema {
            check_identifier("outbox.schema", schema, false)?;
        }
        check_identifier("outbox.table_prefix", &self.table_prefix, true)?;
        if self.table_prefix.len() > 40 {
            return Err(OutboxError::config("outbox.table_prefix", "must be at most 40 characters"));
        }
        if self.service.is_empty() || self.service.len() > bus_core::MAX_METADATA_LEN {
            return Err(OutboxError::config("outbox.service", "must be 1 to 200 characters"));
        }
        if self.max_payload_bytes == 0 {
            return Err(OutboxError::config("outbox.max_payload_bytes", "must be at least 1"));
        }
        if self.notify_interval > Duration::from_secs(1) {
            return Err(OutboxError::config("outbox.notify_interval", "must be at most 1 s (relays poll anyway)"));
        }
        Ok(())
    }
}

/// How the relay claims, publishes, retries and cleans up.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Rows claimed and published per batch (all their confirmations in flight at once). Default 500.
    pub batch_size: usize,
    /// How long a claim is exclusive unless renewed; a live relay renews it every third of this while its batch
    /// is in flight, a relay that died releases its rows when it expires. Default 30 s.
    pub lease: Duration,
    /// How long the relay waits for the bus to confirm a batch; an unconfirmed event is then counted as a
    /// failed attempt and published again later. Default 60 s.
    pub confirm_timeout: Duration,
    /// Catch-up poll when no wake-up comes (NOTIFY can be lost while a listener reconnects). Default 1 s.
    pub poll_interval: Duration,
    /// Publish attempts before a row becomes `failed` (kept, listed, re-queueable) and backoff between them.
    pub retry: RetryPolicy,
    /// How long published rows are kept (for replay) before cleanup deletes them. Default 7 days.
    pub retention: Duration,
    /// How often cleanup runs. Default 60 s.
    pub cleanup_interval: Duration,
    /// Rows deleted per cleanup statement (small batches keep locks short). Default 1,000.
    pub cleanup_batch: usize,
    /// Payload bytes one batch may claim (a batch always takes at least one row). With two batches in flight,
    /// this bounds the relay's memory for events. Default 8 MiB.
    pub batch_bytes: usize,
    /// Direct dispatch (PostgreSQL; see [`Outbox::begin`](crate::Outbox::begin)): producers of this process
    /// lease their rows to this relay as they insert them and hand them over right after their commit, so that
    /// the relay publishes them without a claim round trip. Rows that cannot go direct (a key with earlier rows
    /// still pending, a full relay, a scheduled event, a connection of the caller's own) take the claim as
    /// before. Default `true`; ignored on SQLite.
    pub direct_dispatch: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            lease: Duration::from_secs(30),
            confirm_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            retry: RetryPolicy {
                max_attempts: 10,
                initial_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(300),
                multiplier: 2.0,
                jitter: 0.2,
            },
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 1_000,
            batch_bytes: 8 << 20,
            direct_dispatch: true,
        }
    }
}

impl RelayConfig {
    pub(crate) fn validate(&self) -> Result<(), OutboxError> {
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err(OutboxError::config("relay.batch_size", "must be between 1 and 10,000"));
        }
        if self.lease < Duration::from_millis(100) {
            return Err(OutboxError::config("relay.lease", "must be at least 100 ms"));
        }
        if self.confirm_timeout.is_zero() {
            return Err(OutboxError::config("relay.confirm_timeout", "must be more than zero"));
        }
        if self.poll_interval.is_zero() {
            return Err(OutboxError::config("relay.poll_interval", "must be more than zero"));
        }
        if self.cleanup_batch == 0 {
            return Err(OutboxError::config("relay.cleanup_batch", "must be at least 1"));
        }
        if self.cleanup_interval.is_zero() {
            return Err(OutboxError::config("relay.cleanup_interval", "must be more than zero"));
        }
        if self.batch_bytes == 0 {
            return Err(OutboxError::config("relay.batch_bytes", "must be at least 1"));
        }
        const DAY: Duration = Duration::from_secs(24 * 3600);
        for (setting, value, most) in [
            ("relay.lease", self.lease, DAY),
            ("relay.confirm_timeout", self.confirm_timeout, DAY),
            ("relay.poll_interval", self.poll_interval, Duration::from_secs(3600)),
            ("relay.cleanup_interval", self.cleanup_interval, 7 * DAY),
        ] {
            if value > most {
                return Err(OutboxError::config(setting, format!("must be at most {most:?}")));
            }
        }
        self.retry.validate().map_err(|e| OutboxError::config("relay.retry", e.to_string()))
    }
}

/// How long the inbox remembers handled events.
#[derive(Clone, Debug)]
pub struct InboxConfig {
    /// Inbox rows older than this are deleted. It must outlast the bus's retry horizon (checked at start-up),
    /// or a late retry would run a handler twice. Default 7 days.
    pub retention: Duration,
    /// How often cleanup runs. Default 60 s.
    pub cleanup_interval: Duration,
    /// Rows deleted per cleanup statement. Default 1,000.
    pub cleanup_batch: usize,
}

impl Default for InboxConfig {
    fn default() -> Self {
        Self {
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch: 1_000,
        }
    }
}

impl InboxConfig {
    /// Checks the settings against the retry policy of the bus that delivers to this inbox.
    ///
    /// # Errors
    /// [`OutboxError::InvalidConfig`] naming `inbox.retention` when it is shorter than `retry`'s horizon.
    pub fn validate_for(&self, retry: &RetryPolicy) -> Result<(), OutboxError> {
        let horizon = retry.horizon();
        if self.retention <= horizon {
            return Err(OutboxError::config(
                "inbox.retention",
                format!(
                    "{:?} is not longer than the retry horizon {horizon:?}: a late retry could run a handler twice",
                    self.retention
                ),
            ));
        }
        if self.cleanup_batch == 0 {
            return Err(OutboxError::config("inbox.cleanup_batch", "must be at least 1"));
        }
        if self.cleanup_interval.is_zero() {
            return Err(OutboxError::config("inbox.cleanup_interval", "must be more than zero"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["bus_", "_x", "Outbox1", &"a".repeat(63)] {
            assert!(check_identifier("s", ok, false).is_ok(), "{ok}");
        }
        for bad in ["1x", "a-b", "a b", "x\"; drop table y; --", &"a".repeat(64), "é"] {
            let err = check_identifier("outbox.schema", bad, false).unwrap_err();
            assert!(err.to_string().contains("outbox.schema"), "{err}");
        }
        assert!(check_identifier("s", "", true).is_ok());
        assert!(check_identifier("s", "", false).is_err());
    }

    #[test]
    fn inbox_retention_must_outlast_retries() {
        let retry = RetryPolicy::exponential(5, Duration::from_secs(10));
        let short = InboxConfig { retention: Duration::from_secs(60), ..InboxConfig::default() };
        let err = short.validate_for(&retry).unwrap_err();
        assert!(err.to_string().contains("inbox.retention"), "{err}");
        assert!(InboxConfig::default().validate_for(&retry).is_ok());
    }

    #[test]
    fn relay_settings_are_named() {
        let err = RelayConfig { batch_size: 0, ..RelayConfig::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("relay.batch_size"));
        assert!(RelayConfig::default().validate().is_ok());
    }
}
