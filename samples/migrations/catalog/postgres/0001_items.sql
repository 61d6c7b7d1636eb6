-- The catalog's items; `units_sold` is a read model fed by OrderStatusChangedToPaid.
CREATE TABLE items (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    stock BIGINT NOT NULL CHECK (stock >= 0),
    units_sold BIGINT NOT NULL DEFAULT 0 CHECK (units_sold >= 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Stock held for orders awaiting payment: given back if the order is cancelled, sold if it is paid.
CREATE TABLE reservations (
    order_id UUID NOT NULL,
    product_id UUID NOT NULL REFERENCES items (id),
    units BIGINT NOT NULL CHECK (units > 0),
    PRIMARY KEY (order_id, product_id)
);
