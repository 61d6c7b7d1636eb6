//! The integration events of the flow (CONTRACT §2). Each is a plain serde struct: its JSON is the message body,
//! its [`IntegrationEvent::TYPE_NAME`] the routing key. Events about one order (or one product) carry its id as
//! partition key, so each service handles them in the order they were published.
//!
//! In a real system each service would own its copy of these types (or a shared contract crate); the samples
//! keep them in one module so the whole flow reads on one page.

use bus_core::IntegrationEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A product and a number of its units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The catalog item.
    pub product_id: Uuid,
    /// Units ordered (at least 1).
    pub units: i64,
}

/// Whether the catalog had the stock for one line of a rejected order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockCheck {
    /// The catalog item.
    pub product_id: Uuid,
    /// True when the item had the units asked for.
    pub has_stock: bool,
}

macro_rules! integration_event {
    ($event:ident, $key:ident) => {
        impl IntegrationEvent for $event {
            const TYPE_NAME: &'static str = stringify!($event);
            fn partition_key(&self) -> Option<String> {
                Some(self.$key.to_string())
            }
        }
    };
}

/// Catalog → ordering: a new item exists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductCreated {
    /// The item's id.
    pub product_id: Uuid,
    /// Its name.
    pub name: String,
    /// Its price.
    pub price_cents: i64,
}
integration_event!(ProductCreated, product_id);

/// Catalog → ordering: an item's price changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductPriceChanged {
    /// The item's id.
    pub product_id: Uuid,
    /// The price before.
    pub old_price_cents: i64,
    /// The price now.
    pub new_price_cents: i64,
}
integration_event!(ProductPriceChanged, product_id);

/// Ordering → catalog: an order was placed; reserve its stock, all lines or none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStatusChangedToAwaitingValidation {
    /// The order.
    pub order_id: Uuid,
    /// Who placed it.
    pub buyer: String,
    /// What it asks for.
    pub items: Vec<OrderLine>,
}
integration_event!(OrderStatusChangedToAwaitingValidation, order_id);

/// Catalog → ordering: the stock of every line is reserved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStockConfirmed {
    /// The order.
    pub order_id: Uuid,
}
integration_event!(OrderStockConfirmed, order_id);

/// Catalog → ordering: at least one line lacked stock; nothing was reserved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStockRejected {
    /// The order.
    pub order_id: Uuid,
    /// Each product of the order and whether it had the stock.
    pub items: Vec<StockCheck>,
}
integration_event!(OrderStockRejected, order_id);

/// Ordering → catalog: the order is paid; its units are sold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStatusChangedToPaid {
    /// The order.
    pub order_id: Uuid,
    /// Its lines.
    pub items: Vec<OrderLine>,
}
integration_event!(OrderStatusChangedToPaid, order_id);

/// Ordering → catalog: the order is cancelled; give back its stock if it was reserved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStatusChangedToCancelled {
    /// The order.
    pub order_id: Uuid,
    /// Its lines.
    pub items: Vec<OrderLine>,
    /// True when the catalog had reserved its stock (cancelled after reservation: payment declined).
    pub stock_reserved: bool,
}
integration_event!(OrderStatusChangedToCancelled, order_id);
