-- The catalog's items; `units_sold` is a read model fed by OrderStatusChangedToPaid.
-- Ids are UUIDs stored as 16-byte BLOBs (sqlx's encoding on SQLite).
CREATE TABLE items (
    id BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents >= 0),
    stock INTEGER NOT NULL CHECK (stock >= 0),
    units_sold INTEGER NOT NULL DEFAULT 0 CHECK (units_sold >= 0),
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Stock held for orders awaiting payment: given back if the order is cancelled, sold if it is paid.
CREATE TABLE reservations (
    order_id BLOB NOT NULL,
    product_id BLOB NOT NULL REFERENCES items (id),
    units INTEGER NOT NULL CHECK (units > 0),
    PRIMARY KEY (order_id, product_id)
);
