//! The catalog's HTTP API (CONTRACT §2): items, their stock and price. Every change that other services must
//! hear about is written with its event in one transaction: the item and `ProductCreated`, the new price and
//! `ProductPriceChanged`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use outbox::Outbox;
use serde::Deserialize;
use uuid::Uuid;

use super::store::{CatalogStore, Item};
use crate::api::{ApiError, JsonBody, check_name, parse_id};
use crate::events::{ProductCreated, ProductPriceChanged};

/// The catalog's routes.
/// The state is the outbox: it holds the pool too.
pub(crate) fn router<DB: CatalogStore>(outbox: Outbox<DB>) -> Router {
    Router::new()
        .route("/items", get(list_items::<DB>).post(create_item::<DB>))
        .route("/items/{id}", get(get_item::<DB>))
        .route("/items/{id}/price", put(change_price::<DB>))
        .with_state(outbox)
}

#[derive(Deserialize)]
struct NewItem {
    name: String,
    price_cents: i64,
    stock: i64,
}

#[derive(Deserialize)]
struct NewPrice {
    price_cents: i64,
}

fn check_not_negative(field: &str, value: i64) -> Result<(), ApiError> {
    if value < 0 {
        return Err(ApiError::invalid(format!("{field} must be at least 0 (got {value})")));
    }
    Ok(())
}

async fn create_item<DB: CatalogStore>(
    State(outbox): State<Outbox<DB>>,
    JsonBody(new): JsonBody<NewItem>,
) -> Result<(StatusCode, Json<Item>), ApiError> {
    check_name("name", &new.name)?;
    check_not_negative("price_cents", new.price_cents)?;
    check_not_negative("stock", new.stock)?;
    let item =
        Item { id: Uuid::now_v7(), name: new.name, price_cents: new.price_cents, stock: new.stock, units_sold: 0 };

    let mut tx = outbox.begin().await?;
    DB::insert_item(&mut tx, &item).await?;
    tx.enqueue(&ProductCreated { product_id: item.id, name: item.name.clone(), price_cents: item.price_cents }).await?;
    tx.commit().await?;
    tracing::info!(item = %item.id, name = %item.name, "item created");
    Ok((StatusCode::CREATED, Json(item)))
}

async fn list_items<DB: CatalogStore>(State(outbox): State<Outbox<DB>>) -> Result<Json<Vec<Item>>, ApiError> {
    Ok(Json(DB::items(outbox.pool()).await?))
}

async fn get_item<DB: CatalogStore>(
    State(outbox): State<Outbox<DB>>,
    Path(id): Path<String>,
) -> Result<Json<Item>, ApiError> {
    let id = parse_id("item", &id)?;
    DB::item(outbox.pool(), id).await?.map(Json).ok_or_else(|| ApiError::not_found(format!("no item {id}")))
}

async fn change_price<DB: CatalogStore>(
    State(outbox): State<Outbox<DB>>,
    Path(id): Path<String>,
    JsonBody(new): JsonBody<NewPrice>,
) -> Result<Json<Item>, ApiError> {
    let id = parse_id("item", &id)?;
    check_not_negative("price_cents", new.price_cents)?;

    let mut tx = outbox.begin().await?;
    // Lock the row first: the old price in the event must be the one this update replaces.
    let Some(mut item) = DB::lock_item(&mut tx, id).await? else {
        return Err(ApiError::not_found(format!("no item {id}")));
    };
    let old_price_cents = item.price_cents;
    if old_price_cents != new.price_cents {
        DB::set_price(&mut tx, id, new.price_cents).await?;
        tx.enqueue(&ProductPriceChanged { product_id: id, old_price_cents, new_price_cents: new.price_cents }).await?;
        item.price_cents = new.price_cents;
    }
    tx.commit().await?;
    Ok(Json(item))
}
