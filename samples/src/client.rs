//! [`ShopClient`]: a client of the two sample APIs, and the checks of the CONTRACT's invariants. The demo and
//! the tests use it against embedded and distributed deployments alike: it only speaks HTTP.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

/// A request that failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer.
    #[error("HTTP: {0}")]
    Http(#[from] reqwest::Error),
    /// An answer with an unexpected status.
    #[error("{method} {url}: {status}: {body}")]
    Status {
        /// The request's method.
        method: &'static str,
        /// Its URL.
        url: String,
        /// The status received.
        status: u16,
        /// The body received.
        body: String,
    },
    /// The services did not settle in time.
    #[error("not settled after {0:?}: {1}")]
    NotSettled(Duration, String),
}

/// An item as the catalog returns it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ItemView {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Price.
    pub price_cents: i64,
    /// Stock.
    pub stock: i64,
    /// Units sold.
    pub units_sold: i64,
}

/// An order line as the ordering service returns it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct OrderLineView {
    /// Product.
    pub product_id: Uuid,
    /// Units.
    pub units: i64,
    /// Unit price when ordered.
    pub unit_price_cents: i64,
}

/// An order as the ordering service returns it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct OrderView {
    /// Id.
    pub id: Uuid,
    /// Buyer.
    pub buyer: String,
    /// Status.
    pub status: String,
    /// Lines.
    pub items: Vec<OrderLineView>,
    /// Total.
    pub total_cents: i64,
}

/// A product of the ordering service's read model.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ProductView {
    /// Id.
    pub product_id: Uuid,
    /// Name.
    pub name: String,
    /// Price.
    pub price_cents: i64,
}

/// The two APIs' base URLs and an HTTP client.
#[derive(Clone, Debug)]
pub struct ShopClient {
    http: reqwest::Client,
    /// The catalog's base URL, e.g. `http://127.0.0.1:5101`.
    pub catalog: String,
    /// The ordering service's base URL.
    pub ordering: String,
}

impl ShopClient {
    /// A client of the services at these base URLs.
    pub fn new(catalog: impl Into<String>, ordering: impl Into<String>) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap_or_default();
        Self { http, catalog: catalog.into(), ordering: ordering.into() }
    }

    async fn expect<T: DeserializeOwned>(
        method: &'static str,
        url: String,
        request: reqwest::RequestBuilder,
        ok: &[u16],
    ) -> Result<T, ClientError> {
        let response = request.send().await?;
        let status = response.status().as_u16();
        if !ok.contains(&status) {
            let body = response.text().await.unwrap_or_default();
            return Err(ClientError::Status { method, url, status, body });
        }
        Ok(response.json().await?)
    }

    /// `POST /items`.
    ///
    /// # Errors
    /// Not a 201.
    pub async fn create_item(&self, name: &str, price_cents: i64, stock: i64) -> Result<ItemView, ClientError> {
        let url = format!("{}/items", self.catalog);
        let body = json!({ "name": name, "price_cents": price_cents, "stock": stock });
        Self::expect("POST", url.clone(), self.http.post(&url).json(&body), &[201]).await
    }

    /// `PUT /items/{id}/price`.
    ///
    /// # Errors
    /// Not a 200.
    pub async fn set_price(&self, id: Uuid, price_cents: i64) -> Result<ItemView, ClientError> {
        let url = format!("{}/items/{id}/price", self.catalog);
        let body = json!({ "price_cents": price_cents });
        Self::expect("PUT", url.clone(), self.http.put(&url).json(&body), &[200]).await
    }

    /// `GET /items`.
    ///
    /// # Errors
    /// Not a 200.
    pub async fn items(&self) -> Result<Vec<ItemView>, ClientError> {
        let url = format!("{}/items", self.catalog);
        Self::expect("GET", url.clone(), self.http.get(&url), &[200]).await
    }

    /// `GET /products` (ordering's read model).
    ///
    /// # Errors
    /// Not a 200.
    pub async fn products(&self) -> Result<Vec<ProductView>, ClientError> {
        let url = format!("{}/products", self.ordering);
        Self::expect("GET", url.clone(), self.http.get(&url), &[200]).await
    }

    /// `POST /orders` with `lines` as `(product, units)` and an optional `Idempotency-Key`.
    ///
    /// # Errors
    /// Not a 202.
    pub async fn place_order(
        &self,
        buyer: &str,
        lines: &[(Uuid, i64)],
        key: Option<&str>,
    ) -> Result<OrderView, ClientError> {
        let url = format!("{}/orders", self.ordering);
        let items: Vec<Value> = lines.iter().map(|(p, u)| json!({ "product_id": p, "units": u })).collect();
        let mut request = self.http.post(&url).json(&json!({ "buyer": buyer, "items": items }));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        Self::expect("POST", url, request, &[202]).await
    }

    /// `GET /orders`.
    ///
    /// # Errors
    /// Not a 200.
    pub async fn orders(&self) -> Result<Vec<OrderView>, ClientError> {
        let url = format!("{}/orders", self.ordering);
        Self::expect("GET", url.clone(), self.http.get(&url), &[200]).await
    }

    /// A metric's value from a service's `/metrics` (summed over label sets), if it is there.
    ///
    /// # Errors
    /// `/metrics` did not answer 200.
    pub async fn metric(&self, base: &str, name: &str) -> Result<Option<f64>, ClientError> {
        let url = format!("{base}/metrics");
        let response = self.http.get(&url).send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        if status != 200 {
            return Err(ClientError::Status { method: "GET", url, status, body: text });
        }
        Ok(metric_value(&text, name))
    }

    /// What a service's fault injection counted (`GET /faults`, only with `FAULT_TRANSIENT_FAILURES`).
    ///
    /// # Errors
    /// A request failed, or the service injects no faults.
    pub async fn fault_counts(&self, base: &str) -> Result<crate::faults::FaultCounts, ClientError> {
        let url = format!("{base}/faults");
        let response = self.http.get(&url).send().await?;
        let status = response.status().as_u16();
        let text = response.text().await?;
        match text.trim().parse() {
            Ok(count) if status == 200 => Ok(count),
            _ => Err(ClientError::Status { method: "GET", url, status, body: text }),
        }
    }

    /// Waits (polling) until every order is paid or cancelled and neither outbox holds a pending event.
    ///
    /// # Errors
    /// Still unsettled after `timeout` (the message says what is left), or a request failed.
    pub async fn wait_settled(
        &self,
        timeout: Duration,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<(), ClientError> {
        let start = Instant::now();
        loop {
            let orders = self.orders().await?;
            let open = orders.iter().filter(|o| o.status == "awaiting_validation").count();
            progress(orders.len() - open, orders.len());
            let mut pending = 0.0;
            for base in [&self.catalog, &self.ordering] {
                pending += self.metric(base, "bus_outbox_pending").await?.unwrap_or(0.0);
            }
            if open == 0 && pending == 0.0 {
                return Ok(());
            }
            if start.elapsed() > timeout {
                let left = format!("{open} orders awaiting validation, {pending} events pending in the outboxes");
                return Err(ClientError::NotSettled(timeout, left));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the services are at rest and consistent: [`wait_settled`](Self::wait_settled), then until the
    /// invariants hold (a consumer may still be draining its queue when the outboxes are already empty: the
    /// system is eventually consistent). Returns the violations still there after `timeout` (empty: all good).
    ///
    /// # Errors
    /// A request failed, or the orders did not settle in time.
    pub async fn wait_consistent(
        &self,
        initial_stock: &HashMap<Uuid, i64>,
        timeout: Duration,
        progress: impl FnMut(usize, usize),
    ) -> Result<Vec<String>, ClientError> {
        let start = Instant::now();
        self.wait_settled(timeout, progress).await?;
        loop {
            let violations = self.invariant_violations(initial_stock).await?;
            if violations.is_empty() || start.elapsed() > timeout {
                return Ok(violations);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Checks the CONTRACT's invariants at rest, given each item's initial stock; returns every violation.
    ///
    /// # Errors
    /// A request failed.
    pub async fn invariant_violations(&self, initial_stock: &HashMap<Uuid, i64>) -> Result<Vec<String>, ClientError> {
        let mut violations = Vec::new();
        let orders = self.orders().await?;
        let mut paid_units: HashMap<Uuid, i64> = HashMap::new();
        for order in &orders {
            match order.status.as_str() {
                "paid" => {
                    for line in &order.items {
                        *paid_units.entry(line.product_id).or_default() += line.units;
                    }
                }
                "cancelled" => {}
                other => violations.push(format!("order {} is {other}", order.id)),
            }
        }
        let items = self.items().await?;
        let products: HashMap<Uuid, i64> =
            self.products().await?.into_iter().map(|p| (p.product_id, p.price_cents)).collect();
        for item in &items {
            if let Some(&initial) = initial_stock.get(&item.id)
                && initial != item.stock + item.units_sold
            {
                violations.push(format!(
                    "item {}: initial stock {initial} != stock {} + units sold {}",
                    item.id, item.stock, item.units_sold
                ));
            }
            if item.stock < 0 {
                violations.push(format!("item {}: negative stock {}", item.id, item.stock));
            }
            let sold = paid_units.get(&item.id).copied().unwrap_or(0);
            if item.units_sold != sold {
                violations
                    .push(format!("item {}: units_sold {} but paid orders hold {sold}", item.id, item.units_sold));
            }
            match products.get(&item.id) {
                Some(&price) if price == item.price_cents => {}
                Some(&price) => violations.push(format!(
                    "item {}: catalog price {} but ordering's read model {price}",
                    item.id, item.price_cents
                )),
                None => violations.push(format!("item {}: missing from ordering's read model", item.id)),
            }
        }
        for base in [&self.catalog, &self.ordering] {
            for metric in ["bus_outbox_pending", "bus_outbox_failed", "bus_dead_lettered_total"] {
                let value = self.metric(base, metric).await?.unwrap_or(0.0);
                if value != 0.0 {
                    violations.push(format!("{base}: {metric} = {value}"));
                }
            }
        }
        Ok(violations)
    }
}

/// A metric's value in Prometheus/OpenMetrics text, summed over its label sets.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else { continue };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}
