//! busctl against real PostgreSQL and RabbitMQ: every command, the exit codes, and the replay that rebuilds a
//! read model (the sample services run in this process, busctl as its own process).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bus_core::{DeliveryContext, EventBus, GroupName, HandlerError, IntegrationEvent, RetryPolicy, Subscription};
use integration_tests::shop::{create_database, drop_database};
use integration_tests::{Numbered, TestDb, amqp_url, delete_topology, rabbit_bus, unique, wait_until};
use outbox::{DatabaseUrl, Outbox, RelayConfig};
use samples::Service;
use samples::client::ShopClient;
use samples::demo::{place_orders, seed};
use serde_json::Value;

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Output {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("busctl printed JSON ({e}): {}", self.stdout))
    }
}

async fn busctl(args: &[&str]) -> Output {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_busctl"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("AMQP_URL")
        .output()
        .await
        .expect("run busctl");
    Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn ok(args: &[&str]) -> Output {
    let output = busctl(args).await;
    assert_eq!(output.code, 0, "busctl {args:?}: {}", output.stderr);
    output
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_rebuilds_ordering_s_product_view_and_reaches_no_other_queue() {
    integration_tests::init_tracing();
    let id = unique("r").replace('-', "_");
    let (catalog_db, ordering_db) = (format!("catalog_{id}"), format!("ordering_{id}"));
    let (catalog_url, ordering_url) = (create_database(&catalog_db).await, create_database(&ordering_db).await);
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let (catalog_name, ordering_name) = (format!("catalog-{id}"), format!("ordering-{id}"));
    let shared: Arc<dyn EventBus> = Arc::new(bus.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let mut urls = Vec::new();
    for (service, name, db) in
        [(Service::Catalog, &catalog_name, &catalog_url), (Service::Ordering, &ordering_name, &ordering_url)]
    {
        let running = service
            .start(
                GroupName::new(name.as_str()).unwrap(),
                &DatabaseUrl::parse(db).unwrap(),
                shared.clone(),
                samples::host::ServiceOptions::default(),
            )
            .await
            .expect("service starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.push(format!("http://{}", listener.local_addr().unwrap()));
        tokio::spawn(running.serve(listener, stop.clone().cancelled_owned()));
    }
    let client = ShopClient::new(urls[0].clone(), urls[1].clone());
    let initial = seed(&client).await.expect("seeded");
    let products: Vec<_> = initial.keys().copied().collect();
    for (i, product) in products.iter().enumerate() {
        client.set_price(*product, 5_000 + i as i64).await.unwrap();
        client.set_price(*product, 6_000 + i as i64).await.unwrap();
    }
    place_orders(&client, &products, 20, 4, Duration::ZERO, || {}).await.unwrap();
    let violations = client.wait_consistent(&initial, Duration::from_secs(120), |_, _| {}).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    let before = client.products().await.unwrap();

    // Another group that also takes ProductCreated: a replay to ordering must not reach it.
    let bystander = Arc::new(AtomicUsize::new(0));
    let seen = bystander.clone();
    let probe = bus
        .subscribe(Subscription::new(GroupName::new(format!("bystander-{id}")).unwrap()).on(
            move |_e: ProductCreatedProbe, _ctx: DeliveryContext| {
                let seen = seen.clone();
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            },
        ))
        .await
        .unwrap();

    // Wipe the view and make the inbox forget it, as an operator rebuilding it would.
    let ordering_pool = sqlx::PgPool::connect(&ordering_url).await.unwrap();
    sqlx::query("DELETE FROM products").execute(&ordering_pool).await.unwrap();
    assert!(client.products().await.unwrap().is_empty());
    let amqp = amqp_url().await;
    for event_type in ["ProductCreated", "ProductPriceChanged"] {
        let out = ok(&[
            "inbox",
            "forget",
            "--queue",
            &ordering_name,
            "--type",
            event_type,
            "--database-url",
            &ordering_url,
            "--json",
        ])
        .await;
        assert!(out.json()["forgotten"].as_u64().unwrap() > 0, "{}", out.stdout);
    }
    let replay_since = |event_type: &'static str, since: Option<&'static str>| {
        let (catalog_url, amqp, exchange, ordering_name) =
            (catalog_url.clone(), amqp.clone(), exchange.clone(), ordering_name.clone());
        async move {
            let mut args = vec![
                "replay",
                "--queue",
                &ordering_name,
                "--type",
                event_type,
                "--database-url",
                &catalog_url,
                "--amqp-url",
                &amqp,
                "--exchange",
                &exchange,
                "--json",
            ];
            if let Some(since) = since {
                args.extend(["--since", since]);
            }
            ok(&args).await.json()
        }
    };
    let replay = |event_type: &'static str| replay_since(event_type, None);
    let created = replay("ProductCreated").await;
    assert_eq!(created["replayed"].as_u64(), Some(products.len() as u64), "{created}");
    // From a time: everything enqueued since then, nothing for a time to come.
    let since_then = replay_since("ProductCreated", Some("2000-01-01T00:00:00Z")).await;
    assert_eq!(since_then["replayed"].as_u64(), Some(products.len() as u64), "{since_then}");
    let from_now_on = replay_since("ProductCreated", Some("2999-01-01T00:00:00+01:00")).await;
    assert_eq!(from_now_on["replayed"].as_u64(), Some(0), "{from_now_on}");
    let changed = replay("ProductPriceChanged").await;
    assert_eq!(changed["replayed"].as_u64(), Some(2 * products.len() as u64), "{changed}");
    wait_until("the view is rebuilt", Duration::from_secs(30), || async { client.products().await.unwrap() == before })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(bystander.load(Ordering::SeqCst), 0, "the replay reached ordering's queue only");

    probe.shutdown().await;
    stop.cancel();
    bus.shutdown().await;
    delete_topology(&exchange, &[&catalog_name, &ordering_name, &format!("bystander-{id}")]).await;
    ordering_pool.close().await;
    drop_database(&catalog_db).await;
    drop_database(&ordering_db).await;
}

/// ProductCreated as a bystander service would declare it.
#[derive(serde::Deserialize, serde::Serialize)]
struct ProductCreatedProbe {
    product_id: uuid::Uuid,
}

impl IntegrationEvent for ProductCreatedProbe {
    const TYPE_NAME: &'static str = "ProductCreated";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_status_failed_and_retry() {
    let fixture = sqlx::Postgres::fixture().await;
    let outbox = Outbox::new(fixture.pool.clone(), fixture.outbox_config("producer")).unwrap();
    outbox.migrate().await.unwrap();
    // No queue is bound to this exchange: every publish is unroutable, and one attempt is all the relay gets.
    let bus = rabbit_bus(|_| {}).await;
    let config =
        RelayConfig { retry: RetryPolicy { max_attempts: 1, ..RetryPolicy::default() }, ..RelayConfig::default() };
    let relay = outbox.relay(Arc::new(bus.clone()), config).unwrap().spawn();
    let mut tx = outbox.begin().await.unwrap();
    let event_id = tx.enqueue(&Numbered { key: "k".into(), seq: 1 }).await.unwrap();
    tx.enqueue(&Numbered { key: "k2".into(), seq: 2 }).await.unwrap();
    tx.commit().await.unwrap();
    wait_until("both events failed", Duration::from_secs(20), || async { outbox.status().await.unwrap().failed == 2 })
        .await;
    relay.shutdown().await;

    let db = integration_tests::database_url().await;
    let schema = fixture.schema.clone().expect("a PostgreSQL fixture has a schema");
    let ok = |args: &[&str]| {
        let mut args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        args.extend(["--schema".to_owned(), schema.clone()]);
        async move { ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let status = ok(&["outbox", "status", "--database-url", &db, "--json"]).await.json();
    assert_eq!((status["failed"].as_i64(), status["pending"].as_i64()), (Some(2), Some(0)), "{status}");
    assert_eq!(status["parked_keys"].as_i64(), Some(2), "each failed keyed event parks its key: {status}");
    let human = ok(&["outbox", "status", "--database-url", &db]).await.stdout;
    assert!(human.contains("failed") && human.contains("parked keys") && human.contains("oldest pending"), "{human}");
    let failed = ok(&["outbox", "failed", "--database-url", &db, "--json"]).await.json();
    assert_eq!(failed.as_array().unwrap().len(), 2);
    assert!(failed[0]["last_error"].as_str().unwrap().contains("unroutable"), "{failed}");
    let one = ok(&["outbox", "retry", "--id", &event_id.to_string(), "--database-url", &db, "--json"]).await.json();
    assert_eq!(one["requeued"].as_u64(), Some(1));
    let status = ok(&["outbox", "status", "--database-url", &db, "--json"]).await.json();
    assert_eq!((status["failed"].as_i64(), status["pending"].as_i64()), (Some(1), Some(1)), "{status}");
    let missing_id = uuid::Uuid::now_v7().to_string();
    let missing = busctl(&[
        "outbox",
        "retry",
        "--id",
        &missing_id,
        "--database-url",
        &db,
        "--schema",
        fixture.schema.as_deref().unwrap(),
    ])
    .await;
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    assert!(missing.stderr.contains("no failed event"), "{}", missing.stderr);
    let all = ok(&["outbox", "retry", "--all", "--database-url", &db, "--json"]).await.json();
    assert_eq!(all["requeued"].as_u64(), Some(1));
    bus.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_list_and_redrive() {
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("dlq");
    let failing = Arc::new(AtomicBool::new(true));
    let handled = Arc::new(AtomicUsize::new(0));
    let (fail, done) = (failing.clone(), handled.clone());
    let consumer = bus
        .subscribe(Subscription::new(GroupName::new(&group).unwrap()).on(move |_e: Numbered, _ctx: DeliveryContext| {
            let (fail, done) = (fail.clone(), done.clone());
            async move {
                if fail.load(Ordering::SeqCst) {
                    return Err(HandlerError::permanent("inventory system says no"));
                }
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }))
        .await
        .unwrap();
    let envelope = bus_core::Envelope::for_event(&Numbered { key: "k".into(), seq: 7 }).unwrap().build().unwrap();
    let id = envelope.id();
    bus.publish_confirmed(envelope).await.unwrap();
    let amqp = amqp_url().await;
    let args = |extra: &[&str]| {
        let mut args: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        args.extend([
            "--queue".into(),
            group.clone(),
            "--amqp-url".into(),
            amqp.clone(),
            "--exchange".into(),
            exchange.clone(),
        ]);
        args
    };
    let mut listed = Value::Null;
    for _ in 0..100 {
        let a = args(&["dlq", "list", "--json"]);
        listed = ok(&a.iter().map(String::as_str).collect::<Vec<_>>()).await.json();
        if listed.as_array().is_some_and(|l| !l.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = listed.as_array().expect("a list");
    assert_eq!(letters.len(), 1, "{listed}");
    assert_eq!(letters[0]["message_id"].as_str(), Some(id.to_string().as_str()));
    assert!(letters[0]["reason"].as_str().unwrap().contains("inventory system says no"), "{listed}");
    let a = args(&["dlq", "list"]);
    let human = ok(&a.iter().map(String::as_str).collect::<Vec<_>>()).await.stdout;
    assert!(human.contains("inventory system says no"), "{human}");

    failing.store(false, Ordering::SeqCst);
    let a = args(&["dlq", "redrive", "--json"]);
    let redriven = ok(&a.iter().map(String::as_str).collect::<Vec<_>>()).await.json();
    assert_eq!(redriven["redriven"].as_u64(), Some(1));
    wait_until("the redriven event is handled", Duration::from_secs(10), || async {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
    consumer.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

#[tokio::test]
async fn bad_usage_and_bad_urls_fail_cleanly() {
    for args in [vec!["nonsense"], vec!["dlq", "list"], vec!["outbox", "retry", "--database-url", "sqlite://x.db"]] {
        let out = busctl(&args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
    }
    for args in [
        vec!["replay", "--queue", "q", "--since", "yesterday"],
        vec!["replay", "--queue", "q", "--since", "2026-12-02T14:00:00Z", "--from-seq", "5"],
    ] {
        let out = busctl(&args).await;
        assert_eq!(out.code, 2, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("--since"), "{args:?}: the error names --since: {}", out.stderr);
    }
    let cases: [(&[&str], &str); 4] = [
        (&["outbox", "status", "--database-url", "mysql://root@localhost/x"], "--database-url"),
        (&["outbox", "status", "--database-url", "postgres://u:s3cr3t@127.0.0.1:1/x"], "cannot connect"),
        (&["outbox", "status"], "--database-url"),
        (&["dlq", "list", "--queue", "q", "--amqp-url", "amqp://guest:s3cr3t@127.0.0.1:1/%2f"], "broker"),
    ];
    for (args, says) in cases {
        let out = busctl(args).await;
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(says), "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("s3cr3t"), "{args:?} shows no password: {}", out.stderr);
        assert_eq!(out.stderr.trim().lines().count(), 1, "{args:?}: one line: {}", out.stderr);
    }
}
