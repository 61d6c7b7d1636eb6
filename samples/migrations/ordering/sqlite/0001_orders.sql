-- The product read model, fed by ProductCreated and ProductPriceChanged from the catalog.
-- Ids are UUIDs stored as 16-byte BLOBs (sqlx's encoding on SQLite).
CREATE TABLE products (
    product_id BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    price_cents INTEGER NOT NULL
);

CREATE TABLE orders (
    id BLOB PRIMARY KEY,
    buyer TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('awaiting_validation', 'paid', 'cancelled')),
    total_cents INTEGER NOT NULL,
    -- The client's Idempotency-Key and the request it came with: the same key never makes a second order.
    idempotency_key TEXT UNIQUE,
    request_fingerprint TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX orders_by_buyer ON orders (buyer);

CREATE TABLE order_lines (
    order_id BLOB NOT NULL REFERENCES orders (id),
    line INTEGER NOT NULL,
    product_id BLOB NOT NULL,
    product_name TEXT NOT NULL,
    unit_price_cents INTEGER NOT NULL,
    units INTEGER NOT NULL CHECK (units > 0),
    PRIMARY KEY (order_id, line)
);
