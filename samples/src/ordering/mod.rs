//! The ordering service: orders and their payment, and a read model of the catalog's products.
//!
//! - Publishes `OrderStatusChangedToAwaitingValidation` (HTTP API), then `OrderStatusChangedToPaid` or
//!   `OrderStatusChangedToCancelled`.
//! - Consumes `ProductCreated` and `ProductPriceChanged` (the product read model), `OrderStockConfirmed`
//!   (take the payment) and `OrderStockRejected` (cancel).
//!
//! Invariant at rest: every order is `paid` or `cancelled`; the read model's prices equal the catalog's.

mod handlers;
mod http;
pub mod payment;
mod store;

use std::sync::Arc;

use bus_core::{EventBus, GroupName};
use outbox::SubscriptionInboxExt;
use sqlx::Pool;

pub use store::{Order, OrderItem, OrderingStore, Product};

use crate::host::{RunningService, ServiceHost, ServiceOptions, StartError};

/// The default `HTTP_ADDR`.
pub const DEFAULT_ADDR: &str = "127.0.0.1:5102";

/// Migrates `pool`'s database and starts the ordering service named `name` on `bus`, its consumer
/// group and relay set up by `options`.
///
/// # Errors
/// A migration failed or the bus refused the subscription.
pub async fn start<DB: OrderingStore>(
    name: GroupName,
    pool: Pool<DB>,
    bus: Arc<dyn EventBus>,
    options: ServiceOptions,
) -> Result<RunningService, StartError> {
    DB::migrate_schema(&pool).await?;
    let host = ServiceHost::new(name, pool, bus).await?.options(options);
    let subscription = host
        .subscription()
        .on_inbox(&host.inbox, handlers::product_created)
        .on_inbox(&host.inbox, handlers::price_changed)
        .on_inbox(&host.inbox, handlers::stock_confirmed)
        .on_inbox(&host.inbox, handlers::stock_rejected);
    let api = http::router(host.outbox.clone());
    host.start(subscription, api).await
}
