-- The product read model, fed by ProductCreated and ProductPriceChanged from the catalog.
CREATE TABLE products (
    product_id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    price_cents BIGINT NOT NULL
);

CREATE TABLE orders (
    id UUID PRIMARY KEY,
    buyer TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('awaiting_validation', 'paid', 'cancelled')),
    total_cents BIGINT NOT NULL,
    -- The client's Idempotency-Key and the request it came with: the same key never makes a second order.
    idempotency_key TEXT UNIQUE,
    request_fingerprint TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX orders_by_buyer ON orders (buyer);

CREATE TABLE order_lines (
    order_id UUID NOT NULL REFERENCES orders (id),
    line INTEGER NOT NULL,
    product_id UUID NOT NULL,
    product_name TEXT NOT NULL,
    unit_price_cents BIGINT NOT NULL,
    units BIGINT NOT NULL CHECK (units > 0),
    PRIMARY KEY (order_id, line)
);
