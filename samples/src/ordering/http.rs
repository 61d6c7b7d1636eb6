//! The ordering service's HTTP API (CONTRACT §2). Placing an order writes the order and
//! `OrderStatusChangedToAwaitingValidation` in one transaction; the rest of the flow happens in event handlers.

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use outbox::Outbox;
use serde::{Deserialize, Serialize};
use sqlx::Pool;
use uuid::Uuid;

use super::store::{Order, OrderHeader, OrderItem, OrderingStore, Product};
use crate::api::{ApiError, JsonBody, check_name, parse_id};
use crate::events::{OrderLine, OrderStatusChangedToAwaitingValidation};

/// Lines per order, as the CONTRACT allows.
const MAX_LINES: usize = 100;

/// The ordering service's routes.
/// The state is the outbox: it holds the pool too.
pub(crate) fn router<DB: OrderingStore>(outbox: Outbox<DB>) -> Router {
    Router::new()
        .route("/orders", get(list_orders::<DB>).post(place_order::<DB>))
        .route("/orders/{id}", get(get_order::<DB>))
        .route("/products", get(list_products::<DB>))
        .with_state(outbox)
}

#[derive(Deserialize, Serialize)]
struct NewOrder {
    buyer: String,
    items: Vec<OrderLine>,
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key = value.to_str().map_err(|_| ApiError::invalid("Idempotency-Key must be visible ASCII"))?;
    if key.is_empty() || key.len() > 200 {
        return Err(ApiError::invalid("Idempotency-Key must be 1 to 200 characters"));
    }
    Ok(Some(key.to_owned()))
}

/// Prices each line from the product read model; a product this service has never heard of is a 422.
async fn price_lines<DB: OrderingStore>(pool: &Pool<DB>, lines: &[OrderLine]) -> Result<Vec<OrderItem>, ApiError> {
    let mut products: HashMap<Uuid, Product> = HashMap::new();
    let mut items = Vec::with_capacity(lines.len());
    for line in lines {
        if line.units < 1 {
            return Err(ApiError::invalid(format!(
                "units must be at least 1 (got {} for {})",
                line.units, line.product_id
            )));
        }
        let product = match products.get(&line.product_id) {
            Some(product) => product.clone(),
            None => {
                let product = DB::product(pool, line.product_id)
                    .await?
                    .ok_or_else(|| ApiError::invalid(format!("unknown product {}", line.product_id)))?;
                products.insert(line.product_id, product.clone());
                product
            }
        };
        items.push(OrderItem {
            product_id: product.product_id,
            product_name: product.name,
            unit_price_cents: product.price_cents,
            units: line.units,
        });
    }
    Ok(items)
}

fn total_cents(items: &[OrderItem]) -> Result<i64, ApiError> {
    items
        .iter()
        .try_fold(0i64, |total, item| item.unit_price_cents.checked_mul(item.units)?.checked_add(total))
        .ok_or_else(|| ApiError::invalid("the order's total is too large"))
}

async fn place_order<DB: OrderingStore>(
    State(outbox): State<Outbox<DB>>,
    headers: HeaderMap,
    JsonBody(new): JsonBody<NewOrder>,
) -> Result<(StatusCode, Json<Order>), ApiError> {
    let key = idempotency_key(&headers)?;
    check_name("buyer", &new.buyer)?;
    if new.items.is_empty() || new.items.len() > MAX_LINES {
        return Err(ApiError::invalid(format!("items must hold 1 to {MAX_LINES} lines (got {})", new.items.len())));
    }
    // The request as the key's owner sent it: a key reused for a different order is refused.
    let fingerprint = serde_json::to_string(&new).map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(key) = &key
        && let Some(order) = existing_order(outbox.pool(), key, &fingerprint).await?
    {
        return Ok((StatusCode::ACCEPTED, Json(order)));
    }
    let items = price_lines(outbox.pool(), &new.items).await?;
    let header = OrderHeader {
        id: Uuid::now_v7(),
        buyer: new.buyer,
        status: "awaiting_validation".into(),
        total_cents: total_cents(&items)?,
    };

    let mut tx = outbox.begin().await?;
    if !DB::insert_order(&mut tx, &header, key.as_deref(), &fingerprint).await? {
        // Another request with this key committed first (concurrent duplicates): answer with its order.
        tx.rollback().await?;
        let key = key.as_deref().unwrap_or_default();
        let order = existing_order(outbox.pool(), key, &fingerprint).await?;
        return order
            .map(|order| (StatusCode::ACCEPTED, Json(order)))
            .ok_or_else(|| ApiError::unavailable(&sqlx::Error::RowNotFound));
    }
    for (line, item) in (1..).zip(&items) {
        DB::insert_line(&mut tx, header.id, line, item).await?;
    }
    let event =
        OrderStatusChangedToAwaitingValidation { order_id: header.id, buyer: header.buyer.clone(), items: new.items };
    tx.enqueue(&event).await?;
    tx.commit().await?;
    tracing::info!(order = %header.id, buyer = %header.buyer, total_cents = header.total_cents, "order placed");
    let order =
        Order { id: header.id, buyer: header.buyer, status: header.status, items, total_cents: header.total_cents };
    Ok((StatusCode::ACCEPTED, Json(order)))
}

/// The order already placed with `key`, if any; 422 if it was placed by a different request.
async fn existing_order<DB: OrderingStore>(
    pool: &Pool<DB>,
    key: &str,
    fingerprint: &str,
) -> Result<Option<Order>, ApiError> {
    let Some((id, placed_with)) = DB::order_by_key(pool, key).await? else { return Ok(None) };
    if placed_with != fingerprint {
        return Err(ApiError::invalid("Idempotency-Key was already used for a different order"));
    }
    Ok(DB::order(pool, id).await?)
}

async fn get_order<DB: OrderingStore>(
    State(outbox): State<Outbox<DB>>,
    Path(id): Path<String>,
) -> Result<Json<Order>, ApiError> {
    let id = parse_id("order", &id)?;
    DB::order(outbox.pool(), id).await?.map(Json).ok_or_else(|| ApiError::not_found(format!("no order {id}")))
}

#[derive(Deserialize)]
struct OrdersQuery {
    buyer: Option<String>,
}

async fn list_orders<DB: OrderingStore>(
    State(outbox): State<Outbox<DB>>,
    Query(query): Query<OrdersQuery>,
) -> Result<Json<Vec<Order>>, ApiError> {
    Ok(Json(DB::orders(outbox.pool(), query.buyer.as_deref()).await?))
}

async fn list_products<DB: OrderingStore>(State(outbox): State<Outbox<DB>>) -> Result<Json<Vec<Product>>, ApiError> {
    Ok(Json(DB::products(outbox.pool()).await?))
}
