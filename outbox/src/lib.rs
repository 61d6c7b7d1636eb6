//! The transactional outbox, its relay and the inbox, on PostgreSQL and SQLite (sqlx).
//!
//! - [`Outbox`]: a service writes the events it publishes into the outbox table **in the same transaction** as
//!   its business change ([`Outbox::begin`], then [`OutboxTransaction::enqueue`]; or [`Outbox::enqueue`] on a
//!   transaction of the caller's own): both commit, or neither. Rolled back ⇒ never
//!   published.
//! - [`Relay`]: a background task that publishes committed rows to an [`EventBus`](bus_core::EventBus) and
//!   marks them published only after the bus confirmed them (see the [`relay`] module for its guarantees).
//! - [`Inbox`]: wraps handlers so that the inbox row and the handler's writes commit together: exactly-once
//!   effect per (event id, handler), whatever the bus redelivers.
//!
//! Our tables (`<prefix>outbox`, `<prefix>inbox`, `<prefix>migrations`) live in the application's database,
//! under a validated, configurable schema and prefix; [`Outbox::migrate`] creates them. Queries are checked at
//! run time (no database needed to compile).
//!
//! ```no_run
//! use bus_core::IntegrationEvent;
//! use outbox::{Outbox, OutboxConfig};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct ProductPriceChanged { product_id: i64, new_price_cents: i64 }
//! # impl IntegrationEvent for ProductPriceChanged { const TYPE_NAME: &'static str = "ProductPriceChanged"; }
//!
//! # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
//! let outbox = Outbox::new(pool.clone(), OutboxConfig::new("catalog"))?;
//! outbox.migrate().await?;
//!
//! let mut tx = outbox.begin().await?;
//! sqlx::query("UPDATE items SET price_cents = $1 WHERE id = $2").bind(250).bind(7).execute(&mut *tx).await?;
//! tx.enqueue(&ProductPriceChanged { product_id: 7, new_price_cents: 250 }).await?;
//! tx.commit().await?; // and the relay wakes at once
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod backend;
mod commit_watch;
mod config;
mod database_url;
mod dead_letters;
mod direct;
mod error;
#[cfg(feature = "failpoints")]
mod failpoint;
mod handler_key;
mod inbox;
pub mod metrics;
mod outbox;
pub mod relay;
mod row;
mod sql;
mod wakeup;

pub use backend::Backend;
pub use config::{InboxConfig, OutboxConfig, RelayConfig};
pub use database_url::DatabaseUrl;
pub use dead_letters::DeadLetterTable;
pub use error::OutboxError;
pub use inbox::{Inbox, InboxHandler, InboxStats, InboxTransaction, SubscriptionInboxExt};
pub use metrics::{ServiceMetrics, ServiceStats};
pub use outbox::{Outbox, OutboxTransaction};
pub use relay::{Relay, RelayHandle, RelayMonitor, RelayStats};
pub use row::{FailedEvent, OutboxStatus};
