//! The catalog's SQL. Every statement is portable between PostgreSQL and SQLite, so the store is written once,
//! in `catalog_store!`, and implemented for both backends; only the migrations (column types) differ.
//! Writes take a connection (`&mut *tx`: the caller's transaction, where the outbox rows go too); reads that
//! need no transaction take the pool.

use async_trait::async_trait;
use outbox::Backend;
use serde::Serialize;
use sqlx::Pool;
use sqlx::migrate::{MigrateError, Migrator};
use uuid::Uuid;

/// A catalog item as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Item {
    /// Its id.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// Its price.
    pub price_cents: i64,
    /// Units in stock (reserved units excluded).
    pub stock: i64,
    /// Units sold to paid orders (a read model).
    pub units_sold: i64,
}

/// The catalog's storage operations on one backend.
#[async_trait]
pub trait CatalogStore: Backend {
    /// Runs the catalog's own migrations (its tables, not the outbox's).
    async fn migrate_schema(pool: &Pool<Self>) -> Result<(), MigrateError>;
    /// Inserts a new item.
    async fn insert_item(conn: &mut Self::Connection, item: &Item) -> sqlx::Result<()>;
    /// Every item, oldest first.
    async fn items(pool: &Pool<Self>) -> sqlx::Result<Vec<Item>>;
    /// One item.
    async fn item(pool: &Pool<Self>, id: Uuid) -> sqlx::Result<Option<Item>>;
    /// Locks the item's row for the rest of the transaction (a no-op write: a row lock on PostgreSQL, the
    /// database's write lock on SQLite) and reads it; `None` if it does not exist.
    async fn lock_item(conn: &mut Self::Connection, id: Uuid) -> sqlx::Result<Option<Item>>;
    /// Sets an item's price.
    async fn set_price(conn: &mut Self::Connection, id: Uuid, price_cents: i64) -> sqlx::Result<()>;
    /// Takes `units` from the item's stock if it has them; false (and nothing changed) otherwise.
    async fn take_stock(conn: &mut Self::Connection, id: Uuid, units: i64) -> sqlx::Result<bool>;
    /// Records units reserved for an order.
    async fn record_reservation(conn: &mut Self::Connection, order: Uuid, id: Uuid, units: i64) -> sqlx::Result<()>;
    /// Removes and returns an order's reservations.
    async fn take_reservations(conn: &mut Self::Connection, order: Uuid) -> sqlx::Result<Vec<(Uuid, i64)>>;
    /// Gives `units` back to the item's stock.
    async fn return_stock(conn: &mut Self::Connection, id: Uuid, units: i64) -> sqlx::Result<()>;
    /// Adds `units` to the item's `units_sold`.
    async fn add_units_sold(conn: &mut Self::Connection, id: Uuid, units: i64) -> sqlx::Result<()>;
}

const ITEM_COLUMNS: &str = "id, name, price_cents, stock, units_sold";

macro_rules! catalog_store {
    ($db:ty, $migrations:literal) => {
        #[async_trait]
        impl CatalogStore for $db {
            async fn migrate_schema(pool: &Pool<Self>) -> Result<(), MigrateError> {
                static MIGRATOR: Migrator = sqlx::migrate!($migrations);
                MIGRATOR.run(pool).await
            }

            async fn insert_item(conn: &mut Self::Connection, item: &Item) -> sqlx::Result<()> {
                sqlx::query("INSERT INTO items (id, name, price_cents, stock, units_sold) VALUES ($1, $2, $3, $4, 0)")
                    .bind(item.id)
                    .bind(&item.name)
                    .bind(item.price_cents)
                    .bind(item.stock)
                    .execute(conn)
                    .await
                    .map(drop)
            }

            async fn items(pool: &Pool<Self>) -> sqlx::Result<Vec<Item>> {
                sqlx::query_as(&format!("SELECT {ITEM_COLUMNS} FROM items ORDER BY created_at, id"))
                    .fetch_all(pool)
                    .await
            }

            async fn item(pool: &Pool<Self>, id: Uuid) -> sqlx::Result<Option<Item>> {
                sqlx::query_as(&format!("SELECT {ITEM_COLUMNS} FROM items WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(pool)
                    .await
            }

            async fn lock_item(conn: &mut Self::Connection, id: Uuid) -> sqlx::Result<Option<Item>> {
                sqlx::query_as(&format!("UPDATE items SET stock = stock WHERE id = $1 RETURNING {ITEM_COLUMNS}"))
                    .bind(id)
                    .fetch_optional(conn)
                    .await
            }

            async fn set_price(conn: &mut Self::Connection, id: Uuid, price_cents: i64) -> sqlx::Result<()> {
                sqlx::query("UPDATE items SET price_cents = $1 WHERE id = $2")
                    .bind(price_cents)
                    .bind(id)
                    .execute(conn)
                    .await
                    .map(drop)
            }

            async fn take_stock(conn: &mut Self::Connection, id: Uuid, units: i64) -> sqlx::Result<bool> {
                let done = sqlx::query("UPDATE items SET stock = stock - $1 WHERE id = $2 AND stock >= $1")
                    .bind(units)
                    .bind(id)
                    .execute(conn)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn record_reservation(
                conn: &mut Self::Connection,
                order: Uuid,
                id: Uuid,
                units: i64,
            ) -> sqlx::Result<()> {
                sqlx::query("INSERT INTO reservations (order_id, product_id, units) VALUES ($1, $2, $3)")
                    .bind(order)
                    .bind(id)
                    .bind(units)
                    .execute(conn)
                    .await
                    .map(drop)
            }

            async fn take_reservations(conn: &mut Self::Connection, order: Uuid) -> sqlx::Result<Vec<(Uuid, i64)>> {
                sqlx::query_as("DELETE FROM reservations WHERE order_id = $1 RETURNING product_id, units")
                    .bind(order)
                    .fetch_all(conn)
                    .await
            }

            async fn return_stock(conn: &mut Self::Connection, id: Uuid, units: i64) -> sqlx::Result<()> {
                sqlx::query("UPDATE items SET stock = stock + $1 WHERE id = $2")
                    .bind(units)
                    .bind(id)
                    .execute(conn)
                    .await
                    .map(drop)
            }

            async fn add_units_sold(conn: &mut Self::Connection, id: Uuid, units: i64) -> sqlx::Result<()> {
                sqlx::query("UPDATE items SET units_sold = units_sold + $1 WHERE id = $2")
                    .bind(units)
                    .bind(id)
                    .execute(conn)
                    .await
                    .map(drop)
            }
        }
    };
}

catalog_store!(sqlx::Postgres, "migrations/catalog/postgres");
catalog_store!(sqlx::Sqlite, "migrations/catalog/sqlite");
