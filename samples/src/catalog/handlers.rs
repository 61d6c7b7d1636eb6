//! The catalog's event handlers: `async fn(event, tx) -> Result<(), HandlerError>`. Each gets the inbox's
//! transaction `tx`: its writes (`&mut tx`), the events it enqueues (`tx.enqueue`) and the inbox row commit
//! together, so a redelivered event changes nothing twice. Any error (`?`: database trouble) is transient and
//! retried; a permanent one (`HandlerError::permanent`: an event that can never be applied) goes to the
//! dead-letter queue with its reason.

use std::collections::BTreeMap;

use bus_core::HandlerError;
use outbox::InboxTransaction;
use uuid::Uuid;

use super::store::CatalogStore;
use crate::events::{
    OrderLine, OrderStatusChangedToAwaitingValidation, OrderStatusChangedToCancelled, OrderStatusChangedToPaid,
    OrderStockConfirmed, OrderStockRejected, StockCheck,
};

/// Units per product, products in id order (rows are always locked in one order: no deadlock between orders).
fn units_per_product(lines: &[OrderLine]) -> Result<BTreeMap<Uuid, i64>, HandlerError> {
    let mut units = BTreeMap::new();
    for line in lines {
        if line.units < 1 {
            return Err(HandlerError::permanent(format!("line for {} asks for {} units", line.product_id, line.units)));
        }
        let total: &mut i64 = units.entry(line.product_id).or_default();
        *total = total.checked_add(line.units).ok_or_else(|| HandlerError::permanent("units overflow"))?;
    }
    if units.is_empty() {
        return Err(HandlerError::permanent("order without lines"));
    }
    Ok(units)
}

/// `OrderStatusChangedToAwaitingValidation`: reserve the stock of every line, or of none, and say which.
pub async fn reserve_stock<DB: CatalogStore>(
    event: OrderStatusChangedToAwaitingValidation,
    mut tx: InboxTransaction<DB>,
) -> Result<(), HandlerError> {
    let wanted = units_per_product(&event.items)?;
    // All or nothing: take the stock inside a savepoint and roll back to it if any product lacks units.
    let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
    let mut checks = Vec::with_capacity(wanted.len());
    for (&product_id, &units) in &wanted {
        let has_stock = DB::take_stock(&mut savepoint, product_id, units).await?;
        checks.push(StockCheck { product_id, has_stock });
    }
    if checks.iter().all(|c| c.has_stock) {
        for (&product_id, &units) in &wanted {
            DB::record_reservation(&mut savepoint, event.order_id, product_id, units).await?;
        }
        savepoint.commit().await?;
        tx.enqueue(&OrderStockConfirmed { order_id: event.order_id }).await?;
        tracing::info!(order = %event.order_id, "stock reserved");
    } else {
        savepoint.rollback().await?;
        tx.enqueue(&OrderStockRejected { order_id: event.order_id, items: checks }).await?;
        tracing::info!(order = %event.order_id, "stock rejected");
    }
    Ok(())
}

/// `OrderStatusChangedToPaid`: the reserved units are sold (the `units_sold` read model).
pub async fn record_sale<DB: CatalogStore>(
    event: OrderStatusChangedToPaid,
    mut tx: InboxTransaction<DB>,
) -> Result<(), HandlerError> {
    let reserved = DB::take_reservations(&mut tx, event.order_id).await?;
    if reserved.is_empty() {
        // Paid is only ever published after StockConfirmed, which this service sends once the stock is reserved.
        return Err(HandlerError::permanent(format!("order {} is paid but holds no reservation", event.order_id)));
    }
    for (product_id, units) in reserved {
        DB::add_units_sold(&mut tx, product_id, units).await?;
    }
    Ok(())
}

/// `OrderStatusChangedToCancelled`: give the reserved stock back (compensation), if any was reserved.
pub async fn release_stock<DB: CatalogStore>(
    event: OrderStatusChangedToCancelled,
    mut tx: InboxTransaction<DB>,
) -> Result<(), HandlerError> {
    // The reservations table, not the event, says what to give back: what was taken, exactly.
    let reserved = DB::take_reservations(&mut tx, event.order_id).await?;
    if event.stock_reserved && reserved.is_empty() {
        tracing::warn!(order = %event.order_id, "cancelled after reservation, but no reservation is held");
    }
    for (product_id, units) in reserved {
        DB::return_stock(&mut tx, product_id, units).await?;
    }
    Ok(())
}
