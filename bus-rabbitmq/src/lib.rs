//! The RabbitMQ event bus, on lapin, with the wire format of CONTRACT §1.
//!
//! # Semantics
//! - **Topology.** A durable topic exchange (`bus.events` by default), declared at connect and after every
//!   reconnect. Each consumer group (service) has a durable queue named after it (classic or quorum), bound to
//!   every event type it handles; `<group>.retry` holds failed deliveries for their delay (per-message TTL) and
//!   dead-letters them back to `<group>`; `<group>.dlq` keeps what was given up on. No plugin is needed.
//! - **Publishing.** Persistent messages, `mandatory`, on a channel in confirm mode; many confirms in flight
//!   (up to `confirm_window`). A [`Confirmation`](bus_core::Confirmation) resolves `Ok` only on the broker's ack;
//!   a nack, a return (no queue took it: [`BusError::Unroutable`](bus_core::BusError::Unroutable)) or a lost
//!   connection is an error, so an outbox row stays pending.
//! - **Consuming.** Prefetch and concurrency per instance; deliveries with the same partition key are handled one
//!   at a time in arrival order, others in parallel. A delivery is acknowledged only after its handler (and its
//!   inbox transaction) committed, or after it was safely (broker-confirmed) moved to the retry or dead-letter
//!   queue. A message that can never succeed (no message id, invalid type, over the size limit, a body its
//!   handler cannot decode) goes to the dead-letter queue at once, with `x-last-error`; the consumer never stops
//!   or panics on bad input.
//! - **Reconnection.** When the broker restarts or closes the connection, the bus reconnects with backoff,
//!   re-declares, and resumes publishing and consuming. Deliveries that were not acknowledged come again; the
//!   inbox makes their effect single.
//! - **Partitions.** A group subscribed with [`Subscription::partitions`](bus_core::Subscription::partitions)
//!   gets `<group>.p000`… queues with a single active consumer each, fed by the headers exchange
//!   `<group>.partitions` by the `partition-bucket` header ([`partition_bucket`]: CRC-32 of the key mod 64, so
//!   a key never changes partition); its instances share the partitions through heartbeats on `<group>.members`,
//!   hand a partition over only after finishing what they took from it, and retry in place, so events of one key
//!   are handled in order however many instances run and whichever of them dies. See `docs/partitions.md`.
//! - **Publish order.** A keyed publish lost with a connection holds back the later publishes of its key until it
//!   is published again, so no event overtakes an earlier one of its key across a reconnection.
//! - **Limits.** The retry queue delays by per-message TTL, which RabbitMQ applies at the head of the queue: a
//!   message may wait behind one with a longer delay (never less than its own). Without partitions, order per
//!   key holds within an instance only: instances compete on the group's queue.
//! - **Secrets.** The URL's password never appears in `Debug`, `Display`, errors or logs.

#![warn(missing_docs)]

mod bus;
mod config;
mod confirms;
mod consumer;
mod dead_letters;
mod link;
mod membership;
mod publish_order;
mod side_publish;
mod stats;
mod topology;
mod wire;

pub use bus::{MAX_IN_PLACE_RETRY_HORIZON, RabbitBus, SHUTDOWN_CONFIRM_WAIT};
pub use config::{AmqpUrl, QueueType, RabbitConfig};
pub use dead_letters::MAX_LISTED_DEAD_LETTERS;
pub use stats::RabbitStats;
pub use wire::{PARTITION_BUCKETS, partition_bucket};
