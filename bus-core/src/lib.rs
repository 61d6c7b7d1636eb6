//! Core types of the integration-event bus.
//!
//! A service publishes **integration events** (facts other services react to) and handles the events of others.
//! This crate holds what every part of the framework shares, and nothing tied to a transport or a database:
//!
//! - [`IntegrationEvent`]: implemented by user event types (a serde payload, a validated type name, a version,
//!   an optional partition key);
//! - [`Envelope`]: an event with its metadata (id, type, version, time, correlation and causation ids,
//!   partition key, source service, trace context, JSON payload), size limit enforced when built;
//! - [`EventBus`]: publish envelopes and learn through a [`Confirmation`] when the bus took responsibility for
//!   them; subscribe a consumer group with typed handlers ([`Subscription`]);
//! - [`Handler`] / [`EnvelopeHandler`]: plain async fns or types, failing with a transient or permanent
//!   [`HandlerError`] (`?` converts any error into a transient one);
//! - [`RetryPolicy`] and [`DeadLetter`]s;
//! - [`BusError`], every error with a message naming what was wrong.
//!
//! Transports live in their own crates: `bus-inproc` (tokio, in-process) and `bus-rabbitmq` (lapin). The
//! transactional outbox and the inbox live in `outbox`.
//!
//! # The whole API for service authors
//! | To | Use |
//! |---|---|
//! | declare an event | `impl` [`IntegrationEvent`] (`TYPE_NAME`, `VERSION`, `partition_key()`) on a serde type |
//! | build an envelope | [`Envelope::for_event`]`(&e)?` → [`EnvelopeBuilder`] (`.correlation_id`, `.source`, …) → `.build()?`; [`Envelope::caused`] for an event caused by another |
//! | publish | [`EventBus::publish`]`(envelope).await?` → [`Confirmation`] (await it: `Ok` = the bus took it); [`EventBus::publish_confirmed`], [`EventBus::publish_batch`] |
//! | consume | [`Subscription::new`]`(`[`GroupName::from_static`]`("svc"))` `.on::<E, _>(handler)` `.retry(`[`RetryPolicy`]`)` `.timeout(d)` `.concurrency(n)` `.partitions(n)` → [`EventBus::subscribe`] → [`SubscriptionHandle`] (`.stats()` → [`DeliveryStats`], `.shutdown()`) |
//! | handle | `async fn(E, `[`DeliveryContext`]`) -> Result<(), `[`HandlerError`]`>` (or a [`Handler`]; raw: [`EnvelopeHandler`]); `?` = transient, [`HandlerError::permanent`] = dead-letter now |
//! | read the delivery | [`DeliveryContext`]: `envelope()`, `event_id()`, `attempt()`, `group()` |
//! | inspect dead letters | [`DeadLetterQueue`] (`dead_letters`, `redrive`) → [`DeadLetter`] with its [`DeadLetterCause`] |
//! | check health | [`EventBus::health`] |
//! | trace | [`trace::scope`] around a request, [`trace::current`]; [`TraceContext`] travels with each envelope |
//! | handle errors | [`BusError`] (each names what was wrong); names: [`EventTypeName`], [`GroupName`] |
//! | know the limits | [`DEFAULT_MAX_PAYLOAD_BYTES`], [`MAX_METADATA_LEN`], [`MAX_TRACE_LEN`], [`MAX_NAME_LEN`], [`MAX_PARTITIONS`] |
//!
//! Everything a transport needs and a service author does not (the one [`Dispatcher`](transport::Dispatcher)
//! both buses run deliveries through, confirmation channels and countdowns, counters, spans) is in
//! [`transport`].
//!
//! # Guarantees, stated plainly
//! Delivery is **at least once** per consumer group: handlers may see an event more than once and must be
//! idempotent, or use the inbox, which makes database effects exactly-once. Events with the same partition key
//! are handled **in publish order** within a group; without a key, no order is promised. A publish is safe only
//! once its [`Confirmation`] resolved `Ok`.

#![warn(missing_docs)]

mod bus;
mod confirmation;
mod counters;
mod dead_letter;
mod envelope;
mod error;
mod event;
mod handler;
mod limits;
mod name;
mod retry;
mod subscription;

pub mod trace;
pub mod transport;

pub use bus::EventBus;
pub use confirmation::Confirmation;
pub use counters::DeliveryStats;
pub use dead_letter::{DeadLetter, DeadLetterCause, DeadLetterQueue, DeadLetterStore};
pub use envelope::{Envelope, EnvelopeBuilder};
pub use error::{BoxError, BusError};
pub use event::IntegrationEvent;
pub use handler::{DeliveryContext, EnvelopeHandler, FailureKind, Handler, HandlerError};
pub use limits::{DEFAULT_MAX_PAYLOAD_BYTES, MAX_METADATA_LEN, MAX_TRACE_LEN};
pub use name::{EventTypeName, GroupName, MAX_NAME_LEN};
pub use retry::{MAX_RETRY_HORIZON, RetryPolicy};
pub use subscription::{MAX_PARTITIONS, Subscription, SubscriptionHandle};
pub use trace::TraceContext;
