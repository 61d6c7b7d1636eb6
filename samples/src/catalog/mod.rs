//! The catalog service: items with their price and stock.
//!
//! - Publishes `ProductCreated` and `ProductPriceChanged` (HTTP API), `OrderStockConfirmed` or
//!   `OrderStockRejected` (after reserving stock).
//! - Consumes `OrderStatusChangedToAwaitingValidation` (reserve stock, all lines or none),
//!   `OrderStatusChangedToPaid` (`units_sold += units`) and `OrderStatusChangedToCancelled` (give reserved
//!   stock back).
//!
//! Invariant at rest: for every item, `initial stock == stock + units_sold`.

mod handlers;
mod http;
mod store;

use std::sync::Arc;

use bus_core::{EventBus, GroupName};
use outbox::SubscriptionInboxExt;
use sqlx::Pool;

pub use store::{CatalogStore, Item};

use crate::host::{RunningService, ServiceHost, ServiceOptions, StartError};

/// The default `HTTP_ADDR`.
pub const DEFAULT_ADDR: &str = "127.0.0.1:5101";

/// Migrates `pool`'s database and starts the catalog named `name` on `bus`, its consumer
/// group and relay set up by `options`.
///
/// # Errors
/// A migration failed or the bus refused the subscription.
pub async fn start<DB: CatalogStore>(
    name: GroupName,
    pool: Pool<DB>,
    bus: Arc<dyn EventBus>,
    options: ServiceOptions,
) -> Result<RunningService, StartError> {
    DB::migrate_schema(&pool).await?;
    let host = ServiceHost::new(name, pool, bus).await?.options(options);
    let subscription = host
        .subscription()
        .on_inbox(&host.inbox, handlers::reserve_stock)
        .on_inbox(&host.inbox, handlers::record_sale)
        .on_inbox(&host.inbox, handlers::release_stock);
    let api = http::router(host.outbox.clone());
    host.start(subscription, api).await
}
