//! The eShop flow end to end, checked against every invariant of CONTRACT §2 at rest:
//! - embedded: both services in this process, SQLite files, the in-process bus;
//! - distributed: the `catalog` and `ordering` binaries as two processes, each with its own PostgreSQL database,
//!   over RabbitMQ, with the ordering process killed (SIGKILL) and restarted in the middle of the flow.
//!
//! Both place a few hundred orders concurrently (declined payments, orders over stock, requests repeated with
//! the same `Idempotency-Key`) while prices change.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use integration_tests::{amqp_url, database_url, delete_partitioned_topology, unique};
use samples::client::{ShopClient, metric_value};
use samples::demo::{Demo, DemoConfig, place_orders, seed};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

const SETTLE: Duration = Duration::from_secs(120);

/// Changes every product's price a few times while orders are placed; returns nothing but the changes' effect
/// is checked by the invariants (ordering's read model must end with the catalog's prices).
async fn change_prices(client: &ShopClient, products: &[Uuid]) {
    for round in 1..=3 {
        for (i, product) in products.iter().enumerate() {
            client.set_price(*product, 100 * round + i as i64).await.expect("change a price");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run_orders(client: &ShopClient, products: &[Uuid], n: usize) {
    let (placed, ()) =
        tokio::join!(place_orders(client, products, n, 16, Duration::ZERO, || {}), change_prices(client, products));
    let placed = placed.expect("orders placed");
    assert_eq!(placed.orders, n);
}

/// Waits until all settled, then checks the invariants and that exactly `cancelled` of the `orders` were cancelled.
async fn assert_settled_and_consistent(
    client: &ShopClient,
    initial: &HashMap<Uuid, i64>,
    orders: usize,
    cancelled: usize,
) {
    let violations = client.wait_consistent(initial, SETTLE, |_, _| {}).await.expect("every order settles");
    assert!(violations.is_empty(), "invariants violated:\n{}", violations.join("\n"));
    let stored = client.orders().await.unwrap();
    assert_eq!(stored.len(), orders, "one order per request, repeated Idempotency-Keys included");
    let paid = stored.iter().filter(|o| o.status == "paid").count();
    assert_eq!(stored.iter().filter(|o| o.status == "cancelled").count(), cancelled, "declined + over stock");
    assert_eq!(paid, orders - cancelled);
    for order in &stored {
        if order.buyer.starts_with("fail-") {
            assert_eq!(order.status, "cancelled", "declined payment cancels {}", order.id);
        }
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn status_and_error(request: reqwest::RequestBuilder) -> (u16, String) {
    let response = request.send().await.expect("answer");
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    (status, body["error"].as_str().unwrap_or_default().to_owned())
}

/// Every error the CONTRACT names, with its status and a message that says what is wrong.
async fn check_api_errors(client: &ShopClient, product: Uuid) {
    let (catalog, ordering) = (&client.catalog, &client.ordering);
    let post = |url: String, body: &'static str| http().post(url).header("content-type", "application/json").body(body);

    let (status, error) = status_and_error(post(format!("{catalog}/items"), "{not json")).await;
    assert_eq!(status, 400, "malformed JSON: {error}");
    let (status, error) =
        status_and_error(post(format!("{catalog}/items"), r#"{"name":"x","price_cents":-1,"stock":1}"#)).await;
    assert_eq!((status, error.contains("price_cents")), (422, true), "{error}");
    let (status, error) =
        status_and_error(post(format!("{catalog}/items"), r#"{"name":"","price_cents":1,"stock":1}"#)).await;
    assert_eq!((status, error.contains("name")), (422, true), "{error}");
    let (status, error) =
        status_and_error(post(format!("{catalog}/items"), r#"{"name":"x","price_cents":1.5,"stock":1}"#)).await;
    assert_eq!(status, 422, "{error}");
    let (status, error) = status_and_error(post(format!("{catalog}/items"), r#"{"name":"x","stock":1}"#)).await;
    assert_eq!((status, error.contains("price_cents")), (422, true), "{error}");
    let (status, _) = status_and_error(http().get(format!("{catalog}/items/{}", Uuid::now_v7()))).await;
    assert_eq!(status, 404);
    let (status, _) = status_and_error(http().get(format!("{catalog}/items/not-a-uuid"))).await;
    assert_eq!(status, 404);
    let (status, _) =
        status_and_error(http().put(format!("{catalog}/items/{}/price", Uuid::now_v7())).body(r#"{"price_cents":1}"#))
            .await;
    assert_eq!(status, 404);
    let (status, _) =
        status_and_error(http().put(format!("{catalog}/items/{product}/price")).body(r#"{"price_cents":-5}"#)).await;
    assert_eq!(status, 422);

    let (status, error) = status_and_error(post(format!("{ordering}/orders"), "[1,")).await;
    assert_eq!(status, 400, "{error}");
    let (status, error) = status_and_error(post(format!("{ordering}/orders"), r#"{"buyer":"a","items":[]}"#)).await;
    assert_eq!((status, error.contains("items")), (422, true), "{error}");
    let body = format!(r#"{{"buyer":"a","items":[{{"product_id":"{}","units":1}}]}}"#, Uuid::now_v7());
    let (status, error) = status_and_error(http().post(format!("{ordering}/orders")).body(body)).await;
    assert_eq!((status, error.contains("unknown product")), (422, true), "{error}");
    let body = format!(r#"{{"buyer":"a","items":[{{"product_id":"{product}","units":0}}]}}"#);
    let (status, error) = status_and_error(http().post(format!("{ordering}/orders")).body(body)).await;
    assert_eq!((status, error.contains("units")), (422, true), "{error}");
    let body = r#"{"buyer":"a","items":[{"product_id":"nope","units":1}]}"#;
    let (status, _) = status_and_error(http().post(format!("{ordering}/orders")).body(body)).await;
    assert_eq!(status, 422);
    let (status, _) = status_and_error(http().get(format!("{ordering}/orders/{}", Uuid::now_v7()))).await;
    assert_eq!(status, 404);

    // One key, two different requests: the second is refused, never a second order.
    let key = unique("key");
    let first = client.place_order("reuser", &[(product, 1)], Some(&key)).await.expect("first use of the key");
    let again = client.place_order("reuser", &[(product, 1)], Some(&key)).await.expect("same request again");
    assert_eq!(first.id, again.id, "the same key returns the same order");
    let body = format!(r#"{{"buyer":"reuser","items":[{{"product_id":"{product}","units":2}}]}}"#);
    let (status, error) =
        status_and_error(http().post(format!("{ordering}/orders")).header("Idempotency-Key", &key).body(body)).await;
    assert_eq!((status, error.contains("Idempotency-Key")), (422, true), "{error}");
}

/// A request's trace continues the caller's (W3C `traceparent`), and the response says which span served it.
async fn check_trace_header(client: &ShopClient) {
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = http().get(format!("{}/items", client.catalog)).header("traceparent", caller).send().await.unwrap();
    let served = response.headers()["traceparent"].to_str().unwrap().to_owned();
    assert!(served.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "same trace: {served}");
    assert!(!served.contains("00f067aa0ba902b7"), "a child span: {served}");
}

async fn check_health_and_metrics(client: &ShopClient) {
    for base in [&client.catalog, &client.ordering] {
        let health: Value = http().get(format!("{base}/health")).send().await.unwrap().json().await.unwrap();
        assert_eq!(health["status"], "ok");
        let text = http().get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        for metric in [
            "bus_outbox_pending",
            "bus_outbox_oldest_pending_seconds",
            "bus_published_total",
            "bus_handled_total",
            "bus_duplicates_total",
            "bus_retries_total",
            "bus_dead_lettered_total",
        ] {
            assert!(metric_value(&text, metric).is_some(), "{base}/metrics lacks {metric}:\n{text}");
        }
        assert!(metric_value(&text, "bus_published_total").unwrap() > 0.0, "{base} published events");
        assert!(metric_value(&text, "bus_handled_total").unwrap() > 0.0, "{base} handled events");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embedded_flow_keeps_every_invariant() {
    integration_tests::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(DemoConfig::on_loopback(dir.path())).await.expect("demo starts");
    let client = demo.client.clone();
    let initial = seed(&client).await.expect("seeded");
    let products: Vec<Uuid> = initial.keys().copied().collect();
    check_api_errors(&client, products[0]).await;
    run_orders(&client, &products, 300).await;
    // 300 orders, and the one the key-reuse check placed; every 10th is declined, every 10th over stock.
    assert_settled_and_consistent(&client, &initial, 301, 60).await;
    check_health_and_metrics(&client).await;
    check_trace_header(&client).await;
    demo.shutdown().await;
}

/// A service binary running as its own process.
struct Process {
    child: Child,
    url: String,
}

async fn spawn_service(binary: &str, env: &[(&str, String)]) -> Process {
    let mut command = Command::new(binary);
    command
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("spawn service binary");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let url = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if let Some((_, url)) = line.split_once(" listening on ") {
                return url.to_owned();
            }
        }
        panic!("{binary} exited before listening")
    })
    .await
    .expect("service listening within 60 s");
    // Keep reading stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Process { child, url }
}

async fn create_database(admin_url: &str, name: &str) -> String {
    let admin = sqlx::PgPool::connect(admin_url).await.expect("PostgreSQL reachable");
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&admin).await.expect("create database");
    let base = admin_url.split('?').next().unwrap_or(admin_url);
    let (server, _) = base.rsplit_once('/').expect("a database URL with a path");
    format!("{server}/{name}")
}

async fn drop_database(admin_url: &str, name: &str) {
    if let Ok(admin) = sqlx::PgPool::connect(admin_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&admin).await;
    }
}

/// Partitions of each service's consumer group in the distributed flow.
const PARTITIONS: u16 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn distributed_flow_survives_a_killed_service() {
    integration_tests::init_tracing();
    let (admin_url, amqp) = (database_url().await, amqp_url().await);
    let id = Uuid::new_v4().simple().to_string();
    let (catalog_name, ordering_name, exchange) =
        (format!("catalog-{id}"), format!("ordering-{id}"), format!("test.shop.{id}"));
    let catalog_db = create_database(&admin_url, &format!("catalog_{id}")).await;
    let ordering_db = create_database(&admin_url, &format!("ordering_{id}")).await;
    let env = |name: &str, db: &str| {
        vec![
            ("SERVICE_NAME", name.to_owned()),
            ("DATABASE_URL", db.to_owned()),
            ("AMQP_URL", amqp.clone()),
            ("BUS_EXCHANGE", exchange.clone()),
            // Both groups partitioned: the whole flow, and the SIGKILL below, through partitions.
            ("BUS_PARTITIONS", PARTITIONS.to_string()),
        ]
    };
    let catalog_env = env(&catalog_name, &catalog_db);
    let ordering_env = env(&ordering_name, &ordering_db);
    let catalog = spawn_service(env!("CARGO_BIN_EXE_catalog"), &catalog_env).await;
    let mut ordering = spawn_service(env!("CARGO_BIN_EXE_ordering"), &ordering_env).await;
    let client = ShopClient::new(catalog.url.clone(), ordering.url.clone());

    let initial = seed(&client).await.expect("seeded");
    let products: Vec<Uuid> = initial.keys().copied().collect();
    run_orders(&client, &products, 150).await;

    // Crash the ordering service with its events in flight, then start it again (on a new port).
    ordering.child.start_kill().expect("kill ordering");
    let _ = ordering.child.wait().await;
    ordering = spawn_service(env!("CARGO_BIN_EXE_ordering"), &ordering_env).await;
    let client = ShopClient::new(catalog.url.clone(), ordering.url.clone());
    run_orders(&client, &products, 150).await;

    assert_settled_and_consistent(&client, &initial, 300, 60).await;
    check_health_and_metrics(&client).await;

    drop((catalog, ordering));
    for group in [&catalog_name, &ordering_name] {
        delete_partitioned_topology(&exchange, group, PARTITIONS).await;
    }
    drop_database(&admin_url, &format!("catalog_{id}")).await;
    drop_database(&admin_url, &format!("ordering_{id}")).await;
}

#[tokio::test]
async fn a_bad_setting_stops_start_up_naming_the_variable() {
    let cases = [
        ("DATABASE_URL", "mysql://root@localhost/db"),
        ("DATABASE_URL", "postgres://user:s3cr3t-pw@127.0.0.1:1/db"),
        ("AMQP_URL", "http://guest:s3cr3t-pw@localhost"),
        ("HTTP_ADDR", "localhost:http"),
        ("SERVICE_NAME", "bad name"),
        ("BUS_EXCHANGE", "bad exchange!"),
        ("BUS_PARTITIONS", "0"),
        ("BUS_PARTITIONS", "65"),
        ("BUS_PARTITIONS", "many"),
        ("RELAY_MAX_ATTEMPTS", "0"),
        ("RELAY_MAX_ATTEMPTS", "ten"),
        ("RELAY_RETRY_DELAY_MS", "0"),
        ("RELAY_RETRY_DELAY_MS", "-5"),
    ];
    for (variable, value) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_catalog"))
            .env(variable, value)
            .env("HTTP_ADDR", if variable == "HTTP_ADDR" { value } else { "127.0.0.1:0" })
            .env("RUST_LOG", "off")
            .output()
            .await
            .expect("run catalog");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{variable}={value}: {stderr}");
        assert!(stderr.contains(variable), "{variable}={value}: the error names the variable: {stderr}");
        assert!(!stderr.contains("s3cr3t-pw"), "{variable}: the error shows no password: {stderr}");
    }
}
