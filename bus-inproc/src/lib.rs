//! The in-process event bus: tokio tasks and bounded queues, with the delivery semantics of the RabbitMQ bus.
//!
//! It is what the embedded demo and the tests run on, so it is not a toy: whatever an application sees here,
//! it sees in production.
//!
//! # Semantics
//!
//! - **Fan-out, then competition.** Each consumer group (a service) subscribed to an event type gets every
//!   event of that type. Every [`subscribe`](bus_core::EventBus::subscribe) of a group starts one *instance*
//!   with `concurrency` workers; all workers of all instances of a group compete for its events, so each event
//!   is handled once per group. Instances of one group must handle the same event types.
//! - **At least once per group, no lossy broadcast.** Every group has its own queue; an event stays there until
//!   a handler succeeded or it was dead-lettered. A publish of a type no group subscribes to fails with
//!   [`BusError::Unroutable`](bus_core::BusError::Unroutable).
//! - **Bounded memory, back-pressure.** A group holds at most [`InProcConfig::queue_capacity`] events (queued,
//!   waiting for their key, waiting to be retried, in handling). A publisher waits while a group is full and
//!   has a running instance to make room; a full group without a running instance refuses the event at once
//!   ([`BusError::Transport`](bus_core::BusError::Transport): the outbox relay keeps it and tries again later)
//!   instead of blocking every publisher for good.
//! - **Confirmations.** By default ([`ConfirmOn::Handled`]) a publish is confirmed once every group handled or
//!   dead-lettered the event. An in-process queue dies with its process; confirming only when the work is done
//!   lets the outbox keep an event until then, so a crash loses nothing. A handler publishing to its *own*
//!   group is the exception: that group's part is confirmed once the event is queued, as a broker's confirm
//!   would be (waiting until it is handled could mean waiting for the handler itself). Queued means in memory:
//!   a handler that must not lose what it publishes publishes through its inbox transaction (`tx.enqueue`, the
//!   outbox), as the samples do. Only a publish from the handler's own task is recognized: one from a task the
//!   handler spawned waits as any other publisher does.
//! - **Retries, then dead letters.** A transient failure (an `Err(HandlerError::transient(..))`, a panic) is
//!   retried after the [`RetryPolicy`](bus_core::RetryPolicy)'s delay, up to its attempts; then, or at once for a
//!   permanent failure, the event becomes a [`DeadLetter`](bus_core::DeadLetter) with the last error and the
//!   attempt count, listed and redriven through [`DeadLetterQueue`](bus_core::DeadLetterQueue). Kept in memory,
//!   unless a durable store is given for the group with
//!   [`EventBus::keep_dead_letters`](bus_core::EventBus::keep_dead_letters) (the samples keep them in the
//!   service's database, `outbox::DeadLetterTable`): then an event counts as dead-lettered, and its
//!   confirmation resolves, only once the store has it, and a crash loses no dead letter.
//! - **Order per partition key.** Within a group, events with the same key are handled one at a time in publish
//!   order, retries included (a later event of the key waits until the earlier one is handled or
//!   dead-lettered); different keys, and events without a key, are handled in parallel. This is what the
//!   RabbitMQ bus does within an instance, for the same reason (keyed events retry in place), and the retry
//!   schedules it accepts are the same (at most [`bus_core::MAX_RETRY_HORIZON`]). One difference remains, in
//!   this bus's favour: here the instances of an unpartitioned group share the key lines, while on RabbitMQ only
//!   a partitioned group keeps order across instances.
//! - **Graceful shutdown.** [`InProcBus::shutdown`] refuses new work, finishes accepted events within a grace
//!   period, then stops; events it could not finish fail their confirmations rather than vanish. Stopping never
//!   hangs: a handler still running [`InProcConfig::stop_timeout`] after it was asked to stop is abandoned (its
//!   future dropped, its event's confirmation failed together with those of the later events of its key, so
//!   the publisher sends them again in order).
//! - **Settling.** [`InProcBus::settled`] resolves when every accepted event has been handled or dead-lettered:
//!   tests wait on it instead of sleeping.
//!
//! # Example
//!
//! ```
//! use bus_core::{DeliveryContext, Envelope, EventBus, GroupName, HandlerError, IntegrationEvent, Subscription};
//! use bus_inproc::InProcBus;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct ProductCreated {
//!     name: String,
//! }
//! impl IntegrationEvent for ProductCreated {
//!     const TYPE_NAME: &'static str = "ProductCreated";
//! }
//!
//! async fn on_created(event: ProductCreated, _ctx: DeliveryContext) -> Result<(), HandlerError> {
//!     println!("product {} created", event.name);
//!     Ok(())
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), bus_core::BusError> {
//! let bus = InProcBus::new();
//! let ordering = Subscription::new(GroupName::from_static("ordering")).on::<ProductCreated, _>(on_created);
//! let _ordering = bus.subscribe(ordering).await?;
//! let envelope = Envelope::for_event(&ProductCreated { name: "mug".into() })?.source("catalog").build()?;
//! bus.publish(envelope).await?.await?; // resolves once `ordering` handled it
//! bus.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod bus;
mod config;
mod group;
mod job;
mod stats;
mod worker;

pub use bus::{InProcBus, ShutdownReport};
pub use config::{ConfirmOn, InProcConfig};
pub use stats::InProcStats;
