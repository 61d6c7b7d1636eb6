//! The [`Inbox`]: exactly-once effects for handlers that write to their database.
//!
//! For each delivery the inbox begins a transaction and first inserts `(event id, handler)` into the inbox table.
//! If the row already exists the event was handled before: the delivery is acknowledged and the handler does not
//! run. A concurrent duplicate blocks on that key until the first transaction ends, then skips (or, if the first
//! rolled back, runs): the handler never runs twice to completion. Otherwise the handler gets the transaction as
//! a value ([`InboxTransaction`]), writes its tables through it and enqueues events on it (carrying correlation
//! and causation forward), and the inbox commits it; the bus is acknowledged only after the commit. A failing
//! handler rolls everything back, inbox row included, so the retry runs it again.
//!
//! Effects outside that transaction (an e-mail, an HTTP call) are at-least-once: make them idempotent.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bus_core::{DeliveryContext, EnvelopeHandler, HandlerError, IntegrationEvent, RetryPolicy, Subscription};
use sqlx::Transaction;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::InboxConfig;
use crate::direct::Dispatch;
use crate::error::OutboxError;
use crate::handler_key::handler_key;
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
    /// Deliveries whose handler failed (an error, a panic, a timeout) or whose commit failed.
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

/// A handler that writes through the inbox's transaction. Implemented for every
/// `Fn(E, InboxTransaction<DB>) -> impl Future<Output = Result<(), HandlerError>>`, so a plain async fn is one:
///
/// ```
/// # use bus_core::{EventTypeName, HandlerError, IntegrationEvent};
/// # use outbox::InboxTransaction;
/// # #[derive(serde::Serialize, serde::Deserialize)]
/// # struct OrderPaid { order_id: i64 }
/// # impl IntegrationEvent for OrderPaid { const TYPE_NAME: &'static str = "OrderPaid"; }
/// async fn record_sale(event: OrderPaid, mut tx: InboxTransaction<sqlx::Sqlite>) -> Result<(), HandlerError> {
///     sqlx::query("UPDATE sales SET paid = paid + 1 WHERE order_id = ?")
///         .bind(event.order_id)
///         .execute(&mut *tx)
///         .await?; // any error is transient (retried); `HandlerError::permanent` dead-letters at once
///     Ok(())
/// }
/// ```
#[async_trait]
pub trait InboxHandler<E: IntegrationEvent, DB: Backend>: Send + Sync + 'static {
    /// Handles one event; every write goes through `tx`, which commits with the inbox row when this returns
    /// `Ok` (and rolls back otherwise).
    async fn handle(&self, event: E, tx: InboxTransaction<DB>) -> Result<(), HandlerError>;
}

#[async_trait]
impl<E, DB, F, Fut> InboxHandler<E, DB> for F
where
    E: IntegrationEvent,
    DB: Backend,
    F: Fn(E, InboxTransaction<DB>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, event: E, tx: InboxTransaction<DB>) -> Result<(), HandlerError> {
        self(event, tx).await
    }
}

/// What a finished handling hands back to the inbox: the transaction and how many events it enqueued.
type Finished<DB> = (Transaction<'static, DB>, Dispatch);

/// The inbox's transaction, owned by the handler for the time of one delivery: it dereferences to the
/// database connection (`&mut *tx` is an executor; pass `&mut tx` where a `&mut Connection` is expected), and
/// [`enqueue`](Self::enqueue) writes events that are published once the handling commits.
///
/// It is a plain value: helpers borrow it (`&mut InboxTransaction<DB>` or `&mut DB::Connection`) one after the
/// other, and two borrows at once do not compile, so nothing can wait on it:
///
/// ```compile_fail,E0499
/// # async fn f(mut tx: outbox::InboxTransaction<sqlx::Sqlite>) {
/// let first = &mut *tx;
/// let second = &mut *tx; // error[E0499]: cannot borrow `tx` as mutable more than once at a time
/// # let _ = (first, second);
/// # }
/// ```
///
/// The inbox commits it after the handler returned `Ok`. A handler that moves it elsewhere (into a spawned
/// task) fails with a clear transient error as soon as it returns, and the transaction rolls back when that
/// other owner drops it.
pub struct InboxTransaction<DB: Backend> {
    // Every way SQL reaches `tx` other than `Outbox::write` must call `touched()` on the dispatch first (as
    // `deref_mut` does): the pre-commit check of leased rows is skipped when nothing else ran.
    tx: Option<Transaction<'static, DB>>,
    delivery: DeliveryContext,
    outbox: Outbox<DB>,
    dispatch: Option<Dispatch>,
    finished: Option<oneshot::Sender<Finished<DB>>>,
}

impl<DB: Backend> InboxTransaction<DB> {
    /// The delivery being handled: envelope (ids, correlation, trace), attempt, group.
    pub fn delivery(&self) -> &DeliveryContext {
        &self.delivery
    }

    /// Enqueues `event` in this transaction, caused by the delivered event (same correlation id and trace,
    /// causation id = the delivered event's id). Published once the handling commits; returns its id.
    ///
    /// # Errors
    /// A permanent [`HandlerError`] for an event that can never be published (too large, bad name), transient
    /// for a database error.
    pub async fn enqueue<E: IntegrationEvent>(&mut self, event: &E) -> Result<uuid::Uuid, HandlerError> {
        let builder = self.delivery.envelope().caused(event).map_err(HandlerError::permanent)?;
        let tx = self.tx.as_deref_mut().expect("the transaction is held until drop");
        let dispatch = self.dispatch.get_or_insert_with(Dispatch::default);
        self.outbox.write(tx, builder, None, dispatch).await.map_err(|e| match e {
            OutboxError::Bus(e) => HandlerError::permanent(e),
            other => HandlerError::transient(other),
        })
    }
}

impl<DB: Backend> std::ops::Deref for InboxTransaction<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        self.tx.as_deref().expect("the transaction is held until drop")
    }
}

impl<DB: Backend> std::ops::DerefMut for InboxTransaction<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        // What the handler runs now may abort the transaction or roll back a savepoint holding leased rows.
        if let Some(dispatch) = &mut self.dispatch {
            dispatch.touched();
        }
        self.tx.as_deref_mut().expect("the transaction is held until drop")
    }
}

impl<DB: Backend> Drop for InboxTransaction<DB> {
    fn drop(&mut self) {
        // Back to the inbox, which commits or rolls back; if the inbox is gone (the handling was cancelled),
        // the transaction is dropped here and rolls back.
        if let (Some(tx), Some(finished)) = (self.tx.take(), self.finished.take()) {
            let _ = finished.send((tx, self.dispatch.take().unwrap_or_default()));
        }
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
        let (finished, mut handed_back) = oneshot::channel();
        let tx = InboxTransaction {
            tx: Some(tx),
            delivery: delivery.clone(),
            outbox: outbox.clone(),
            dispatch: None,
            finished: Some(finished),
        };
        // Counts the handling as failed unless it commits, whether it returns an error, panics or is cancelled
        // (a timeout drops this future).
        let failure = CountsFailure(Some(counters));
        let result = self.handler.handle(event, tx).await;
        let handed_back = handed_back.try_recv();
        let (tx, dispatch) = match (result, handed_back) {
            (Err(error), handed_back) => {
                if let Ok((tx, _)) = handed_back {
                    let _ = tx.rollback().await;
                }
                return Err(error);
            }
            (Ok(()), Err(_)) => {
                return Err(HandlerError::transient(
                    "the inbox transaction outlived its handler (moved into a task or a value that lives on?): \
                     nothing was committed; it rolls back when its new owner drops it",
                ));
            }
            (Ok(()), Ok(finished)) => finished,
        };
        let (mut tx, mut dispatch) = (tx, dispatch);
        outbox.check_leased(&mut tx, &mut dispatch).await;
        if let Err(error) = tx.commit().await {
            // The outcome is unknown: whatever committed is claimed.
            if dispatch.enqueued > 0 {
                outbox.committed();
            }
            return Err(HandlerError::transient(error));
        }
        failure.disarm();
        counters.handled.fetch_add(1, Ordering::Relaxed);
        outbox.after_commit(dispatch);
        Ok(())
    }
}

/// Adds one to `failed` when dropped armed.
struct CountsFailure<'a>(Option<&'a InboxCounters>);

impl CountsFailure<'_> {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CountsFailure<'_> {
    fn drop(&mut self) {
        if let Some(counters) = self.0 {
            counters.failed.fetch_add(1, Ordering::Relaxed);
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
