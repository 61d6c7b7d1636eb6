//! The ordering service's SQL, portable between PostgreSQL and SQLite: written once in `ordering_store!` and
//! implemented for both backends; only the migrations (column types) differ.

use async_trait::async_trait;
use outbox::Backend;
use serde::Serialize;
use sqlx::Pool;
use sqlx::migrate::{MigrateError, Migrator};
use uuid::Uuid;

/// A product as the ordering service knows it (its read model of the catalog).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Product {
    /// The catalog item's id.
    pub product_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its price, as last heard from the catalog.
    pub price_cents: i64,
}

/// One line of an order, priced when it was placed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OrderItem {
    /// The product.
    pub product_id: Uuid,
    /// Its name then.
    pub product_name: String,
    /// Its price then.
    pub unit_price_cents: i64,
    /// Units ordered.
    pub units: i64,
}

/// An order as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Order {
    /// Its id.
    pub id: Uuid,
    /// Who placed it.
    pub buyer: String,
    /// `awaiting_validation`, `paid` or `cancelled`.
    pub status: String,
    /// Its lines.
    pub items: Vec<OrderItem>,
    /// Σ units × unit price.
    pub total_cents: i64,
}

/// An order's row, without its lines.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct OrderHeader {
    /// Its id.
    pub id: Uuid,
    /// Who placed it.
    pub buyer: String,
    /// Its status.
    pub status: String,
    /// Its total.
    pub total_cents: i64,
}

/// The ordering service's storage operations on one backend.
#[async_trait]
pub trait OrderingStore: Backend {
    /// Runs the ordering service's migrations.
    async fn migrate_schema(pool: &Pool<Self>) -> Result<(), MigrateError>;
    /// Adds a product to the read model (nothing if it is there already).
    async fn insert_product(conn: &mut Self::Connection, product: &Product) -> sqlx::Result<()>;
    /// Sets a product's price if it is `old` now; false otherwise (missing, or a different price).
    async fn change_price(conn: &mut Self::Connection, id: Uuid, old: i64, new: i64) -> sqlx::Result<bool>;
    /// A product's current price in the read model, within a transaction.
    async fn price(conn: &mut Self::Connection, id: Uuid) -> sqlx::Result<Option<i64>>;
    /// The read model.
    async fn products(pool: &Pool<Self>) -> sqlx::Result<Vec<Product>>;
    /// One product of the read model.
    async fn product(pool: &Pool<Self>, id: Uuid) -> sqlx::Result<Option<Product>>;
    /// Inserts an order; false (nothing written) when `key` is already taken by another order.
    async fn insert_order(
        conn: &mut Self::Connection,
        order: &OrderHeader,
        key: Option<&str>,
        fingerprint: &str,
    ) -> sqlx::Result<bool>;
    /// Inserts line `line` of an order.
    async fn insert_line(conn: &mut Self::Connection, order: Uuid, line: i64, item: &OrderItem) -> sqlx::Result<()>;
    /// The order placed with an idempotency key, and the fingerprint of the request that placed it.
    async fn order_by_key(pool: &Pool<Self>, key: &str) -> sqlx::Result<Option<(Uuid, String)>>;
    /// An order's row, within a transaction.
    async fn header(conn: &mut Self::Connection, id: Uuid) -> sqlx::Result<Option<OrderHeader>>;
    /// An order's lines, within a transaction.
    async fn lines(conn: &mut Self::Connection, id: Uuid) -> sqlx::Result<Vec<OrderItem>>;
    /// Moves an order from `awaiting_validation` to `status`; false if it was not awaiting validation.
    async fn settle(conn: &mut Self::Connection, id: Uuid, status: &str) -> sqlx::Result<bool>;
    /// One order with its lines.
    async fn order(pool: &Pool<Self>, id: Uuid) -> sqlx::Result<Option<Order>>;
    /// Orders (of one buyer, if given), oldest first, with their lines.
    async fn orders(pool: &Pool<Self>, buyer: Option<&str>) -> sqlx::Result<Vec<Order>>;
    /// How many orders are in each status.
    async fn status_counts(pool: &Pool<Self>) -> sqlx::Result<Vec<(String, i64)>>;
}

const HEADER_COLUMNS: &str = "id, buyer, status, total_cents";
const LINE_COLUMNS: &str = "product_id, product_name, unit_price_cents, units";

/// Joins lines (tagged with their order id) to their orders.
fn assemble(headers: Vec<OrderHeader>, lines: Vec<(Uuid, OrderItem)>) -> Vec<Order> {
    let mut by_order: std::collections::HashMap<Uuid, Vec<OrderItem>> = std::collections::HashMap::new();
    for (order, line) in lines {
        by_order.entry(order).or_default().push(line);
    }
    headers
        .into_iter()
        .map(|h| Order {
            items: by_order.remove(&h.id).unwrap_or_default(),
            id: h.id,
            buyer: h.buyer,
            status: h.status,
            total_cents: h.total_cents,
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct TaggedLine {
    order_id: Uuid,
    #[sqlx(flatten)]
    item: OrderItem,
}

macro_rules! ordering_store {
    ($db:ty, $migrations:literal) => {
        #[async_trait]
        impl OrderingStore for $db {
            async fn migrate_schema(pool: &Pool<Self>) -> Result<(), MigrateError> {
                static MIGRATOR: Migrator = sqlx::migrate!($migrations);
                MIGRATOR.run(pool).await
            }

            async fn insert_product(conn: &mut Self::Connection, product: &Product) -> sqlx::Result<()> {
                sqlx::query(
                    "INSERT INTO products (product_id, name, price_cents) VALUES ($1, $2, $3) \
                     ON CONFLICT (product_id) DO NOTHING",
                )
                .bind(product.product_id)
                .bind(&product.name)
                .bind(product.price_cents)
                .execute(conn)
                .await
                .map(drop)
            }

            async fn change_price(conn: &mut Self::Connection, id: Uuid, old: i64, new: i64) -> sqlx::Result<bool> {
                let done =
                    sqlx::query("UPDATE products SET price_cents = $1 WHERE product_id = $2 AND price_cents = $3")
                        .bind(new)
                        .bind(id)
                        .bind(old)
                        .execute(conn)
                        .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn price(conn: &mut Self::Connection, id: Uuid) -> sqlx::Result<Option<i64>> {
                sqlx::query_scalar("SELECT price_cents FROM products WHERE product_id = $1")
                    .bind(id)
                    .fetch_optional(conn)
                    .await
            }

            async fn products(pool: &Pool<Self>) -> sqlx::Result<Vec<Product>> {
                sqlx::query_as("SELECT product_id, name, price_cents FROM products ORDER BY product_id")
                    .fetch_all(pool)
                    .await
            }

            async fn product(pool: &Pool<Self>, id: Uuid) -> sqlx::Result<Option<Product>> {
                sqlx::query_as("SELECT product_id, name, price_cents FROM products WHERE product_id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await
            }

            async fn insert_order(
                conn: &mut Self::Connection,
                order: &OrderHeader,
                key: Option<&str>,
                fingerprint: &str,
            ) -> sqlx::Result<bool> {
                // First statement of the transaction, and a write: on a key already taken (even by a transaction
                // still in flight) it waits for that one to finish, then does nothing.
                let done = sqlx::query(
                    "INSERT INTO orders (id, buyer, status, total_cents, idempotency_key, request_fingerprint) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (idempotency_key) DO NOTHING",
                )
                .bind(order.id)
                .bind(&order.buyer)
                .bind(&order.status)
                .bind(order.total_cents)
                .bind(key)
                .bind(fingerprint)
                .execute(conn)
                .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn insert_line(
                conn: &mut Self::Connection,
                order: Uuid,
                line: i64,
                item: &OrderItem,
            ) -> sqlx::Result<()> {
                sqlx::query(
                    "INSERT INTO order_lines (order_id, line, product_id, product_name, unit_price_cents, units) \
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(order)
                .bind(line)
                .bind(item.product_id)
                .bind(&item.product_name)
                .bind(item.unit_price_cents)
                .bind(item.units)
                .execute(conn)
                .await
                .map(drop)
            }

            async fn order_by_key(pool: &Pool<Self>, key: &str) -> sqlx::Result<Option<(Uuid, String)>> {
                sqlx::query_as("SELECT id, request_fingerprint FROM orders WHERE idempotency_key = $1")
                    .bind(key)
                    .fetch_optional(pool)
                    .await
            }

            async fn header(conn: &mut Self::Connection, id: Uuid) -> sqlx::Result<Option<OrderHeader>> {
                sqlx::query_as(&format!("SELECT {HEADER_COLUMNS} FROM orders WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(conn)
                    .await
            }

            async fn lines(conn: &mut Self::Connection, id: Uuid) -> sqlx::Result<Vec<OrderItem>> {
                sqlx::query_as(&format!("SELECT {LINE_COLUMNS} FROM order_lines WHERE order_id = $1 ORDER BY line"))
                    .bind(id)
                    .fetch_all(conn)
                    .await
            }

            async fn settle(conn: &mut Self::Connection, id: Uuid, status: &str) -> sqlx::Result<bool> {
                let done =
                    sqlx::query("UPDATE orders SET status = $1 WHERE id = $2 AND status = 'awaiting_validation'")
                        .bind(status)
                        .bind(id)
                        .execute(conn)
                        .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn order(pool: &Pool<Self>, id: Uuid) -> sqlx::Result<Option<Order>> {
                let mut conn = pool.acquire().await?;
                let Some(header) = Self::header(&mut conn, id).await? else { return Ok(None) };
                let lines = Self::lines(&mut conn, id).await?;
                Ok(assemble(vec![header], lines.into_iter().map(|l| (id, l)).collect()).pop())
            }

            async fn orders(pool: &Pool<Self>, buyer: Option<&str>) -> sqlx::Result<Vec<Order>> {
                let headers: Vec<OrderHeader> = sqlx::query_as(&format!(
                    "SELECT {HEADER_COLUMNS} FROM orders WHERE $1 IS NULL OR buyer = $1 ORDER BY id"
                ))
                .bind(buyer)
                .fetch_all(pool)
                .await?;
                let lines: Vec<TaggedLine> = sqlx::query_as(&format!(
                    "SELECT l.order_id, l.{} FROM order_lines l JOIN orders o ON o.id = l.order_id \
                     WHERE $1 IS NULL OR o.buyer = $1 ORDER BY l.order_id, l.line",
                    LINE_COLUMNS.replace(", ", ", l.")
                ))
                .bind(buyer)
                .fetch_all(pool)
                .await?;
                Ok(assemble(headers, lines.into_iter().map(|l| (l.order_id, l.item)).collect()))
            }

            async fn status_counts(pool: &Pool<Self>) -> sqlx::Result<Vec<(String, i64)>> {
                sqlx::query_as("SELECT status, COUNT(*) FROM orders GROUP BY status ORDER BY status")
                    .fetch_all(pool)
                    .await
            }
        }
    };
}

ordering_store!(sqlx::Postgres, "migrations/ordering/postgres");
ordering_store!(sqlx::Sqlite, "migrations/ordering/sqlite");
