//! The [`Inbox`]: exactly-once effects for handlers that write to their database.
//!
//! For each delivery the inbox begins a transaction and first inserts `(event id, handler)` into the inbox table.
//! If the row already exists the event was handled before: the delivery is acknowledged and the handler does not
//! run. A concurrent duplicate blocks on that key until the first transaction ends, then skips (or, if the first
//! rolled back, runs): the handler never runs twice to completion. Otherwise the handler runs with the
//! transaction ([`InboxContext::tx`]), may write its tables and enqueue events (carrying correlation and causation
//! forward), and the inbox commits; the bus is acknowledged only after the commit. A failing handler rolls
//! everything back, inbox row included, so the retry runs it again.
//!
//! Effects outside that transaction (an e-mail, an HTTP call) are at-least-once: make them idempotent.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use async_trait::async_trait;
use bus_core::{DeliveryContext, EnvelopeHandler, HandlerError, IntegrationEvent, RetryPolicy, Subscription};
use sqlx::Transaction;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::InboxConfig;
use crate::error::OutboxError;
use crate::outbox::Outbox;

/// The consumer side of one service's database: wraps handlers so their effects are exactly-once.
pub struct Inbox<DB: Backend> {
    outbox: Outbox<DB>,
    config: InboxConfig,
    counters: Arc<InboxCounters>,
}

impl<DB: Backend> Clone for Inbox<DB> {
    fn clone(&self) -> Self {
        Self { outbox: self.outbox.clone(), config: self.config.clone(), counters: self.counters.clone() }
    }
}

#[derive(Default)]
struct InboxCounters {
    handled: AtomicU64,
    duplicates: AtomicU64,
    failed: AtomicU64,
}

/// A snapshot of an inbox's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboxStats {
    /// Deliveries whose handler ran and committed.
    pub handled: u64,
    /// Deliveries skipped because the inbox had already handled the event.
    pub duplicates: u64,
    /// Deliveries whose handler (or commit) failed.
    pub failed: u64,
}

impl<DB: Backend> Inbox<DB> {
    /// An inbox in `outbox`'s database (its tables come with [`Outbox::migrate`]). `retry` is the retry policy
    /// of the bus that delivers to it: the inbox must remember events longer than retries can come.
    ///
    /// # Errors
    /// [`OutboxError::InvalidConfig`] naming `inbox.retention` when it does not outlast `retry`'s horizon.
    pub fn new(outbox: Outbox<DB>, config: InboxConfig, retry: &RetryPolicy) -> Result<Self, OutboxError> {
        config.validate_for(retry)?;
        Ok(Self { outbox, config, counters: Arc::default() })
    }

    /// The inbox's counters.
    pub fn stats(&self) -> InboxStats {
        InboxStats {
            handled: self.counters.handled.load(Ordering::Relaxed),
            duplicates: self.counters.duplicates.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }

    /// Wraps `handler` for events `E`: the result goes to [`Subscription::on_envelope`] (or use
    /// [`SubscriptionInboxExt::on_inbox`]).
    pub fn handler<E: IntegrationEvent, H: InboxHandler<E, DB>>(&self, handler: H) -> Arc<dyn EnvelopeHandler> {
        Arc::new(InboxEnvelopeHandler { inbox: self.clone(), handler, _event: PhantomData::<fn(E)> })
    }

    /// Deletes inbox rows older than the retention, in small batches. Returns how many.
    pub async fn cleanup(&self) -> Result<u64, OutboxError> {
        let batch = i64::try_from(self.config.cleanup_batch).unwrap_or(i64::MAX);
        let mut total = 0;
        loop {
            let deleted = DB::delete_inbox(self.outbox.pool(), self.outbox.sql(), self.config.retention, batch).await?;
            total += deleted;
            if deleted < self.config.cleanup_batch as u64 {
                return Ok(total);
            }
        }
    }

    /// Runs [`cleanup`](Self::cleanup) every `cleanup_interval` until `stop` is cancelled.
    pub fn spawn_cleanup(&self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let inbox = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(inbox.config.cleanup_interval) => {}
                }
                if let Err(error) = inbox.cleanup().await {
                    tracing::warn!(%error, "inbox retention cleanup failed");
                }
            }
        })
    }
}

/// The inbox's name for one handler: `<group>/<event type>` (one row per event and handler).
pub(crate) fn handler_key(group: &str, event_type: &str) -> String {
    format!("{group}/{event_type}")
}

/// A handler that writes through the inbox's transaction. Implemented for every
/// `Fn(E, InboxContext<DB>) -> impl Future<Output = Result<(), HandlerError>>`, so a plain async fn is one.
#[async_trait]
pub trait InboxHandler<E: IntegrationEvent, DB: Backend>: Send + Sync + 'static {
    /// Handles one event; `ctx` holds the transaction its writes must go through.
    async fn handle(&self, event: E, ctx: InboxContext<DB>) -> Result<(), HandlerError>;
}

#[async_trait]
impl<E, DB, F, Fut> InboxHandler<E, DB> for F
where
    E: IntegrationEvent,
    DB: Backend,
    F: Fn(E, InboxContext<DB>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, event: E, ctx: InboxContext<DB>) -> Result<(), HandlerError> {
        self(event, ctx).await
    }
}

type SharedTx<DB> = Arc<Mutex<Option<Transaction<'static, DB>>>>;

/// What an inbox handler gets besides the event: the delivery and the transaction.
pub struct InboxContext<DB: Backend> {
    delivery: DeliveryContext,
    tx: SharedTx<DB>,
    outbox: Outbox<DB>,
    enqueued: Arc<AtomicUsize>,
}

/// The inbox transaction, locked for the handler: dereferences to the connection (`&mut *tx` is an executor).
pub type InboxTx<'a, DB> = MappedMutexGuard<'a, <DB as sqlx::Database>::Connection>;

impl<DB: Backend> InboxContext<DB> {
    /// The delivery: envelope (ids, correlation, trace), attempt, group.
    pub fn delivery(&self) -> &DeliveryContext {
        &self.delivery
    }

    /// The transaction every write of the handler must go through: it commits with the inbox row.
    ///
    /// # Errors
    /// A transient [`HandlerError`] if the handling is already over (the context escaped into another task).
    pub async fn tx(&self) -> Result<InboxTx<'_, DB>, HandlerError> {
        MutexGuard::try_map(self.tx.lock().await, |tx| tx.as_deref_mut())
            .map_err(|_| HandlerError::transient("the inbox transaction is already finished"))
    }

    /// Enqueues `event` in the handler's transaction (pass the guard from [`tx`](Self::tx)), caused by the
    /// delivered event: same correlation id and trace, causation id = the delivered event's id. Published once
    /// the handling commits.
    ///
    /// # Errors
    /// A permanent [`HandlerError`] for an invalid event (too large, bad name), transient for a database error.
    pub async fn publish<E: IntegrationEvent>(
        &self,
        tx: &mut InboxTx<'_, DB>,
        event: &E,
    ) -> Result<uuid::Uuid, HandlerError> {
        let builder = self.delivery.envelope().caused(event).map_err(HandlerError::permanent)?;
        let id = self.outbox.enqueue_with(tx, builder).await.map_err(|e| match e {
            OutboxError::Bus(e) => HandlerError::permanent(e),
            other => HandlerError::transient(other),
        })?;
        self.enqueued.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }
}

struct InboxEnvelopeHandler<E, DB: Backend, H> {
    inbox: Inbox<DB>,
    handler: H,
    _event: PhantomData<fn(E)>,
}

#[async_trait]
impl<E: IntegrationEvent, DB: Backend, H: InboxHandler<E, DB>> EnvelopeHandler for InboxEnvelopeHandler<E, DB, H> {
    async fn handle(&self, delivery: DeliveryContext) -> Result<(), HandlerError> {
        let event: E = delivery
            .envelope()
            .decode()
            .map_err(|e| HandlerError::permanent(format!("payload is not a valid {}: {e}", E::TYPE_NAME)))?;
        let outbox = &self.inbox.outbox;
        let counters = &self.inbox.counters;
        let handler_key = handler_key(delivery.group().as_str(), E::TYPE_NAME);
        let mut tx = outbox.pool().begin().await.map_err(HandlerError::transient)?;
        // First statement: a duplicate (even a concurrent one) stops here.
        let fresh = DB::insert_inbox(&mut tx, outbox.sql(), delivery.event_id(), &handler_key)
            .await
            .map_err(HandlerError::transient)?;
        if !fresh {
            counters.duplicates.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(event_id = %delivery.event_id(), handler = %handler_key, "duplicate delivery skipped");
            let _ = tx.rollback().await;
            return Ok(());
        }
        let shared: SharedTx<DB> = Arc::new(Mutex::new(Some(tx)));
        let enqueued = Arc::new(AtomicUsize::new(0));
        let ctx = InboxContext {
            delivery: delivery.clone(),
            tx: shared.clone(),
            outbox: outbox.clone(),
            enqueued: enqueued.clone(),
        };
        let result = self.handler.handle(event, ctx).await;
        let tx = shared.lock().await.take();
        let Some(tx) = tx else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return Err(HandlerError::transient("the inbox transaction disappeared"));
        };
        match result {
            Ok(()) => {
                if let Err(error) = tx.commit().await {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    return Err(HandlerError::transient(error));
                }
                counters.handled.fetch_add(1, Ordering::Relaxed);
                if enqueued.load(Ordering::Relaxed) > 0 {
                    outbox.committed();
                }
                Ok(())
            }
            Err(error) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let _ = tx.rollback().await;
                Err(error)
            }
        }
    }
}

/// Adds inbox handlers to a [`Subscription`].
pub trait SubscriptionInboxExt {
    /// Handles events `E` with `handler` through `inbox` (exactly-once effects in its database).
    fn on_inbox<E: IntegrationEvent, DB: Backend, H: InboxHandler<E, DB>>(self, inbox: &Inbox<DB>, handler: H) -> Self;
}

impl SubscriptionInboxExt for Subscription {
    fn on_inbox<E: IntegrationEvent, DB: Backend, H: InboxHandler<E, DB>>(self, inbox: &Inbox<DB>, handler: H) -> Self {
        self.on_envelope(E::TYPE_NAME, inbox.handler(handler))
    }
}
