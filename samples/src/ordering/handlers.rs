//! The ordering service's event handlers, each in the inbox's transaction (see the catalog's handlers).

use bus_core::HandlerError;
use outbox::InboxTransaction;

use super::payment;
use super::store::{OrderItem, OrderingStore, Product};
use crate::events::{
    OrderLine, OrderStatusChangedToCancelled, OrderStatusChangedToPaid, OrderStockConfirmed, OrderStockRejected,
    ProductCreated, ProductPriceChanged,
};

fn order_lines(items: Vec<OrderItem>) -> Vec<OrderLine> {
    items.into_iter().map(|i| OrderLine { product_id: i.product_id, units: i.units }).collect()
}

/// `ProductCreated`: add the product to the read model.
pub async fn product_created<DB: OrderingStore>(
    event: ProductCreated,
    mut tx: InboxTransaction<DB>,
) -> Result<(), HandlerError> {
    let product = Product { product_id: event.product_id, name: event.name, price_cents: event.price_cents };
    DB::insert_product(&mut tx, &product).await?;
    Ok(())
}

/// `ProductPriceChanged`: update the read model. The change applies only on top of the price it replaces, so
/// changes applied out of order (a retried event overtaken by a later one) are retried until they line up.
pub async fn price_changed<DB: OrderingStore>(
    event: ProductPriceChanged,
    mut tx: InboxTransaction<DB>,
) -> Result<(), HandlerError> {
    let (id, old, new) = (event.product_id, event.old_price_cents, event.new_price_cents);
    if DB::change_price(&mut tx, id, old, new).await? {
        return Ok(());
    }
    match DB::price(&mut tx, id).await? {
        None => Err(HandlerError::transient(format!("price change for {id}, which is not in the read model yet"))),
        Some(current) => Err(HandlerError::transient(format!(
            "price change {old} → {new} for {id} does not apply on the current price {current} (an earlier change \
             has not arrived yet)"
        ))),
    }
}

/// `OrderStockConfirmed`: take the payment, then the order is paid, or cancelled with its stock given back.
pub async fn stock_confirmed<DB: OrderingStore>(
    event: OrderStockConfirmed,
    mut tx: InboxTransaction<DB>,
) -> Result<(), HandlerError> {
    let order = DB::header(&mut tx, event.order_id)
        .await?
        .ok_or_else(|| HandlerError::permanent(format!("unknown order {}", event.order_id)))?;
    if order.status != "awaiting_validation" {
        tracing::warn!(order = %order.id, status = %order.status, "stock confirmed for a settled order; ignored");
        return Ok(());
    }
    let items = order_lines(DB::lines(&mut tx, order.id).await?);
    match payment::charge(&order.buyer, order.total_cents) {
        Ok(()) => {
            DB::settle(&mut tx, order.id, "paid").await?;
            tx.enqueue(&OrderStatusChangedToPaid { order_id: order.id, items }).await?;
            tracing::info!(order = %order.id, total_cents = order.total_cents, "order paid");
        }
        Err(declined) => {
            DB::settle(&mut tx, order.id, "cancelled").await?;
            let cancelled = OrderStatusChangedToCancelled { order_id: order.id, items, stock_reserved: true };
            tx.enqueue(&cancelled).await?;
            tracing::info!(order = %order.id, %declined, "order cancelled");
        }
    }
    Ok(())
}

/// `OrderStockRejected`: the order is cancelled (nothing was reserved).
pub async fn stock_rejected<DB: OrderingStore>(
    event: OrderStockRejected,
    mut tx: InboxTransaction<DB>,
) -> Result<(), HandlerError> {
    if !DB::settle(&mut tx, event.order_id, "cancelled").await? {
        return match DB::header(&mut tx, event.order_id).await? {
            None => Err(HandlerError::permanent(format!("unknown order {}", event.order_id))),
            Some(order) => {
                tracing::warn!(order = %order.id, status = %order.status, "stock rejected for a settled order");
                Ok(())
            }
        };
    }
    let items = order_lines(DB::lines(&mut tx, event.order_id).await?);
    let missing: Vec<_> = event.items.iter().filter(|c| !c.has_stock).map(|c| c.product_id).collect();
    tx.enqueue(&OrderStatusChangedToCancelled { order_id: event.order_id, items, stock_reserved: false }).await?;
    tracing::info!(order = %event.order_id, ?missing, "order cancelled: not enough stock");
    Ok(())
}
