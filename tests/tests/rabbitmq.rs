//! The RabbitMQ bus against the real local broker: wire format both ways, unroutable publishes, poison messages,
//! retries and dead letters, graceful shutdown. Each test has its own exchange and queues, deleted at the end.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{
    BusError, DeadLetterQueue, DeliveryContext, Envelope, EventBus, EventTypeName, GroupName, HandlerError,
    RetryPolicy, Subscription, TraceContext,
};
use integration_tests::{Numbered, delete_topology, plain_amqp, rabbit_bus, unique, wait_until};
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

const WAIT: Duration = Duration::from_secs(30);

/// Subscribes group `group` to `Numbered` events, recording each handled one's `seq` in arrival order.
async fn recording_consumer(
    bus: &bus_rabbitmq::RabbitBus,
    group: &str,
) -> (bus_core::SubscriptionHandle, Arc<Mutex<Vec<u32>>>) {
    let handled: Arc<Mutex<Vec<u32>>> = Arc::default();
    let h = handled.clone();
    let handle = bus
        .subscribe(Subscription::new(GroupName::new(group).unwrap()).on::<Numbered, _>(
            move |e: Numbered, _ctx: DeliveryContext| {
                let handled = h.clone();
                async move {
                    handled.lock().unwrap().push(e.seq);
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    (handle, handled)
}

fn text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
        other => panic!("not a string: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_carry_every_contract_property_and_header() {
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let queue = unique("plain");
    let plain = plain_amqp().await;
    plain.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    plain
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "OrderPaid".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let cause = uuid::Uuid::now_v7();
    let envelope =
        Envelope::builder(EventTypeName::new("OrderPaid").unwrap(), &br#"{"order_id":"o-1","total_cents":1250}"#[..])
            .version(2)
            .correlation_id("request-7")
            .causation_id(Some(cause))
            .partition_key(Some("o-1".into()))
            .source("ordering")
            .sequence(Some(99))
            .trace(
                TraceContext::new(
                    Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
                    Some("rojo=00f067aa0ba902b7".into()),
                )
                .unwrap(),
            )
            .build()
            .unwrap();
    bus.publish_confirmed(envelope.clone()).await.unwrap();

    let message =
        plain.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("message");
    let p = &message.delivery.properties;
    assert_eq!(message.delivery.routing_key.as_str(), "OrderPaid");
    assert_eq!(message.delivery.data, envelope.payload().to_vec(), "the body is the payload only");
    assert_eq!(p.message_id().as_ref().unwrap().as_str(), envelope.id().to_string());
    assert_eq!(p.kind().as_ref().unwrap().as_str(), "OrderPaid");
    assert_eq!(p.content_type().as_ref().unwrap().as_str(), "application/json");
    assert_eq!(p.delivery_mode(), &Some(2));
    assert_eq!(p.timestamp(), &Some(envelope.occurred_at().timestamp() as u64));
    assert_eq!(p.correlation_id().as_ref().unwrap().as_str(), "request-7");
    assert_eq!(p.app_id().as_ref().unwrap().as_str(), "ordering");
    let h = p.headers().as_ref().unwrap().inner();
    assert_eq!(h.get("x-event-version"), Some(&AMQPValue::LongLongInt(2)));
    let occurred = text(&h["x-occurred-at"]);
    assert!(occurred.ends_with('Z') && occurred.len() == "2026-01-01T00:00:00.000Z".len(), "{occurred}");
    assert_eq!(chrono::DateTime::parse_from_rfc3339(&occurred).unwrap(), envelope.occurred_at());
    assert_eq!(text(&h["x-causation-id"]), cause.to_string());
    assert_eq!(text(&h["x-partition-key"]), "o-1");
    assert_eq!(text(&h["traceparent"]), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
    assert_eq!(text(&h["tracestate"]), "rojo=00f067aa0ba902b7");
    assert_eq!(h.get("x-outbox-seq"), Some(&AMQPValue::LongLongInt(99)));

    let _ = plain.queue_delete(queue.as_str().into(), Default::default()).await;
    bus.shutdown().await;
    delete_topology(&exchange, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_a_foreign_publisher_is_handled() {
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let seen: Arc<Mutex<Vec<(Numbered, Envelope)>>> = Arc::default();
    let s = seen.clone();
    let handle = bus
        .subscribe(Subscription::new(GroupName::new(&group).unwrap()).on::<Numbered, _>(
            move |e: Numbered, ctx: DeliveryContext| {
                let seen = s.clone();
                async move {
                    seen.lock().unwrap().push((e, ctx.envelope().clone()));
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    // Only what CONTRACT §1 requires, as another language's client would send it.
    let id = uuid::Uuid::new_v4();
    let plain = plain_amqp().await;
    plain
        .basic_publish(
            exchange.as_str().into(),
            "Numbered".into(),
            BasicPublishOptions::default(),
            br#"{"key":"k","seq":5}"#,
            BasicProperties::default()
                .with_message_id(id.to_string().into())
                .with_type("Numbered".into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_until("the foreign message was handled", WAIT, || async { !seen.lock().unwrap().is_empty() }).await;
    let (event, envelope) = seen.lock().unwrap()[0].clone();
    assert_eq!(event, Numbered { key: "k".into(), seq: 5 });
    assert_eq!(envelope.id(), id);
    assert_eq!(envelope.version(), 1);
    assert_eq!(envelope.correlation_id(), id.to_string(), "correlation defaults to the message id");
    handle.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_no_queue_takes_is_a_failure() {
    let bus = rabbit_bus(|_| {}).await;
    let envelope = Envelope::for_event(&Numbered { key: "k".into(), seq: 1 }).unwrap().build().unwrap();
    let err = bus.publish_confirmed(envelope).await.unwrap_err();
    assert!(matches!(err, BusError::Unroutable { .. }), "{err}");
    let exchange = bus.config().exchange.clone();
    bus.shutdown().await;
    delete_topology(&exchange, &[]).await;
}

/// Unroutable events mixed into a pipelined batch (hundreds of confirms in flight, acknowledged several at a
/// time): each unroutable one fails, every routable one succeeds, whatever confirm the broker's return comes
/// with. (lapin pairs a return with whichever confirm it settles next.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_events_in_a_pipelined_batch_fail_and_only_they_do() {
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let (handle, handled) = recording_consumer(&bus, &group).await;
    let routable = EventTypeName::new(<Numbered as bus_core::IntegrationEvent>::TYPE_NAME).unwrap();
    let nobody = EventTypeName::new("NobodySubscribes").unwrap();
    let (mut wrong, mut sent_routable) = (Vec::new(), 0);
    for round in 0..3u32 {
        let batch: Vec<(u32, bool)> = (0..1_000).map(|i| (round * 1_000 + i, i % 7 == 3)).collect();
        let envelopes = batch
            .iter()
            .map(|&(seq, unroutable)| {
                let payload = serde_json::to_vec(&Numbered { key: "k".into(), seq }).unwrap();
                let event_type = if unroutable { nobody.clone() } else { routable.clone() };
                Envelope::builder(event_type, payload).build().unwrap()
            })
            .collect();
        let confirmations = bus.publish_batch(envelopes).await;
        for (&(seq, unroutable), confirmation) in batch.iter().zip(confirmations) {
            let result = tokio::time::timeout(WAIT, confirmation).await.expect("answered");
            match (unroutable, &result) {
                (true, Err(BusError::Unroutable { .. })) => {}
                (false, Ok(())) => sent_routable += 1,
                _ => wrong.push((seq, unroutable, result.map_err(|e| e.to_string()))),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of 3000 confirmations were wrong, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
    // Publishes cancelled half-way (a caller's timeout) among them: whatever went out is still settled in order,
    // so no return is lost on a confirm nobody reads.
    let publishes = (0..2_000u32).map(|i| {
        let (bus, seq, unroutable) = (bus.clone(), 10_000 + i, i % 7 == 3);
        let payload = serde_json::to_vec(&Numbered { key: "k".into(), seq }).unwrap();
        let event_type = if unroutable { nobody.clone() } else { routable.clone() };
        let envelope = Envelope::builder(event_type, payload).build().unwrap();
        async move {
            let cut = Duration::from_micros(u64::from(i % 5) * 100);
            match tokio::time::timeout(cut, bus.publish(envelope)).await {
                Ok(Ok(confirmation)) => Some((seq, unroutable, tokio::time::timeout(WAIT, confirmation).await)),
                _ => None,
            }
        }
    });
    let answered: Vec<_> = futures::future::join_all(publishes).await.into_iter().flatten().collect();
    for (seq, unroutable, result) in answered {
        match (unroutable, result.expect("answered")) {
            (true, Err(BusError::Unroutable { .. })) | (false, Ok(())) => {}
            (unroutable, other) => wrong.push((seq, unroutable, other.map_err(|e| e.to_string()))),
        }
    }
    assert!(wrong.is_empty(), "with cancelled publishes among them: {:?}", &wrong[..wrong.len().min(5)]);
    wait_until("every routable event handled", WAIT, || async {
        handled.lock().unwrap().iter().filter(|&&seq| seq < 10_000).collect::<HashSet<_>>().len() == sent_routable
    })
    .await;
    handle.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_dead_lettered_with_reasons_while_good_ones_flow() {
    let bus = rabbit_bus(|c| c.max_payload_bytes = 1024).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let (handle, handled) = recording_consumer(&bus, &group).await;
    let plain = plain_amqp().await;
    let publish = |routing: &'static str, to_queue: bool, body: Vec<u8>, props: BasicProperties| {
        let (plain, exchange, group) = (plain.clone(), exchange.clone(), group.clone());
        async move {
            let (ex, key) = if to_queue { (String::new(), group) } else { (exchange, routing.to_owned()) };
            plain
                .basic_publish(ex.as_str().into(), key.as_str().into(), BasicPublishOptions::default(), &body, props)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    let good = || {
        BasicProperties::default()
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_type("Numbered".into())
            .with_delivery_mode(2)
    };
    publish("Numbered", false, br#"{"key":"k","seq":1}"#.to_vec(), good()).await;
    publish("Numbered", false, b"{not json".to_vec(), good()).await;
    publish(
        "Numbered",
        false,
        br#"{"key":"k","seq":2}"#.to_vec(),
        BasicProperties::default().with_type("Numbered".into()),
    )
    .await;
    publish("", true, br#"{"key":"k","seq":3}"#.to_vec(), good().with_type("Unknown".into())).await;
    let mut big = br#"{"key":"k","seq":4,"pad":""#.to_vec();
    big.extend(std::iter::repeat_n(b'x', 2048));
    big.extend(br#""}"#);
    publish("Numbered", false, big, good()).await;
    publish("Numbered", false, br#"{"key":"k","seq":6}"#.to_vec(), good()).await;

    let group_name = GroupName::new(&group).unwrap();
    wait_until("4 poison messages dead-lettered", WAIT, || async { bus.stats().dead_lettered == 4 }).await;
    wait_until("good messages handled", WAIT, || async { handled.lock().unwrap().len() == 2 }).await;
    let mut good = handled.lock().unwrap().clone();
    good.sort_unstable(); // no partition key: no order promised
    assert_eq!(good, vec![1, 6]);
    let dead = bus.dead_letters(&group_name).await.unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.last_error.as_str()).collect();
    assert_eq!(dead.len(), 4, "{reasons:?}");
    for expected in
        ["payload is not a valid Numbered", "missing message_id", "no handler for Unknown", "over the limit of 1024"]
    {
        assert!(reasons.iter().any(|r| r.contains(expected)), "{expected} not in {reasons:?}");
    }
    assert!(dead.iter().all(|d| d.attempts == 1), "poison is never retried");
    assert_eq!(bus.dead_letters(&group_name).await.unwrap().len(), 4, "listing does not consume");
    handle.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_with_growing_delay_then_dead_lettered_then_redriven() {
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let attempts: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (a, b) = (attempts.clone(), broken.clone());
    let retry = RetryPolicy::exponential(3, Duration::from_millis(200)).with_jitter(0.0);
    let handle = bus
        .subscribe(Subscription::new(GroupName::new(&group).unwrap()).retry(retry).on::<Numbered, _>(
            move |_e: Numbered, ctx: DeliveryContext| {
                let (attempts, broken) = (a.clone(), b.clone());
                async move {
                    attempts.lock().unwrap().push((ctx.attempt(), Instant::now()));
                    if broken.load(Ordering::SeqCst) {
                        return Err(HandlerError::transient("payment provider down"));
                    }
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let envelope = Envelope::for_event(&Numbered { key: "k".into(), seq: 1 }).unwrap().build().unwrap();
    let id = envelope.id();
    bus.publish_confirmed(envelope).await.unwrap();
    wait_until("dead-lettered after 3 attempts", WAIT, || async { bus.stats().dead_lettered == 1 }).await;

    let seen = attempts.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![1, 2, 3]);
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert!(gaps[0] >= Duration::from_millis(200) && gaps[1] >= Duration::from_millis(400), "growing delays: {gaps:?}");
    assert_eq!(bus.stats().retried, 2);
    let group_name = GroupName::new(&group).unwrap();
    let dead = bus.dead_letters(&group_name).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].is(id));
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].last_error.contains("payment provider down"), "{}", dead[0].last_error);

    broken.store(false, Ordering::SeqCst);
    assert_eq!(bus.redrive(&group_name, Some(id)).await.unwrap(), 1);
    wait_until("handled after redrive", WAIT, || async { bus.stats().handled == 1 }).await;
    assert_eq!(attempts.lock().unwrap().last().unwrap().0, 1, "redriven with attempts from 1");
    assert!(bus.dead_letters(&group_name).await.unwrap().is_empty());
    handle.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_loses_nothing_and_keeps_key_order() {
    let bus = rabbit_bus(|c| c.prefetch = 32).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let make = |seen: Arc<Mutex<Vec<(String, u32)>>>| {
        move |e: Numbered, _ctx: DeliveryContext| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                seen.lock().unwrap().push((e.key, e.seq));
                Ok(())
            }
        }
    };
    let first = bus
        .subscribe(
            Subscription::new(GroupName::new(&group).unwrap()).concurrency(4).on::<Numbered, _>(make(seen.clone())),
        )
        .await
        .unwrap();
    for seq in 0..100 {
        for key in ["a", "b", "c", "d", "e"] {
            bus.publish_confirmed(Envelope::for_event(&Numbered { key: key.into(), seq }).unwrap().build().unwrap())
                .await
                .unwrap();
        }
    }
    wait_until("some handled", WAIT, || async { seen.lock().unwrap().len() > 50 }).await;
    first.shutdown().await;
    let after_stop = seen.lock().unwrap().len();
    assert!(after_stop < 500, "stopped before the end");
    let second = bus
        .subscribe(
            Subscription::new(GroupName::new(&group).unwrap()).concurrency(4).on::<Numbered, _>(make(seen.clone())),
        )
        .await
        .unwrap();
    wait_until("all 500 handled", WAIT, || async { seen.lock().unwrap().len() >= 500 }).await;
    let seen = seen.lock().unwrap().clone();
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (500, 500), "nothing lost, nothing handled twice");
    for key in ["a", "b", "c", "d", "e"] {
        let seqs: Vec<u32> = seen.iter().filter(|(k, _)| k == key).map(|(_, s)| *s).collect();
        assert_eq!(seqs, (0..100).collect::<Vec<_>>(), "order of key {key}");
    }
    second.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

#[tokio::test]
async fn a_bad_url_is_refused_at_start_up_naming_the_setting_and_hiding_the_password() {
    let err = bus_rabbitmq::RabbitConfig::new("amqp://user:topsecret@[::1").unwrap_err().to_string();
    assert!(err.contains("AMQP_URL") && !err.contains("topsecret"), "{err}");
    let mut config = bus_rabbitmq::RabbitConfig::new("amqp://user:topsecret@127.0.0.1:1/%2f").unwrap();
    config.publish_timeout = Duration::from_millis(300);
    let err = bus_rabbitmq::RabbitBus::connect(config).await.unwrap_err().to_string();
    assert!(err.contains("amqp://user:***@127.0.0.1:1") && !err.contains("topsecret"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_confirm_window_is_published_without_waiting_on_the_caller() {
    let bus = rabbit_bus(|c| c.confirm_window = 16).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let handled = Arc::new(Mutex::new(0u32));
    let h = handled.clone();
    let handle = bus
        .subscribe(Subscription::new(GroupName::new(&group).unwrap()).on::<Numbered, _>(
            move |_e: Numbered, _ctx: DeliveryContext| {
                let handled = h.clone();
                async move {
                    *handled.lock().unwrap() += 1;
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    // Like the relay: the whole batch is handed over before any confirmation is awaited.
    let batch =
        (0..200).map(|seq| Envelope::for_event(&Numbered { key: "k".into(), seq }).unwrap().build().unwrap()).collect();
    let confirmations = tokio::time::timeout(WAIT, bus.publish_batch(batch)).await.expect("no deadlock on the window");
    for confirmation in confirmations {
        confirmation.await.unwrap();
    }
    wait_until("all handled", WAIT, || async { *handled.lock().unwrap() == 200 }).await;
    handle.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

/// A scheduled event through the outbox, the relay and RabbitMQ: published once due, not before, and the
/// event after it with the same key follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_event_goes_out_through_rabbitmq_when_due() {
    use integration_tests::TestDb;
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("scheduled");
    type Arrivals = Arc<Mutex<Vec<(u32, chrono::DateTime<chrono::Utc>)>>>;
    let seen: Arrivals = Arc::default();
    let s = seen.clone();
    let consumer = bus
        .subscribe(Subscription::new(GroupName::new(&group).unwrap()).on::<Numbered, _>(
            move |e: Numbered, _ctx: DeliveryContext| {
                let seen = s.clone();
                async move {
                    seen.lock().unwrap().push((e.seq, chrono::Utc::now()));
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let fixture = sqlx::Postgres::fixture().await;
    let outbox = integration_tests::migrated_outbox(&fixture).await;
    let relay = outbox.relay(Arc::new(bus.clone()), integration_tests::fast_relay()).unwrap().spawn();
    let due = chrono::Utc::now() + chrono::Duration::milliseconds(700);
    let mut tx = outbox.begin().await.unwrap();
    tx.enqueue_at(&Numbered { key: "k".into(), seq: 0 }, due).await.unwrap();
    tx.enqueue(&Numbered { key: "k".into(), seq: 1 }).await.unwrap();
    tx.commit().await.unwrap();
    wait_until("both delivered", WAIT, || async { seen.lock().unwrap().len() == 2 }).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![0, 1], "in key order");
    assert!(seen[0].1 >= due, "not before its time: {:?} < {due:?}", seen[0].1);
    relay.shutdown().await;
    consumer.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

/// `RabbitBus::shutdown` in the middle of a stream: every delivery the stopping bus had taken is finished and
/// acknowledged before the connection closes, so the next consumer gets none of them again (0 redeliveries of
/// what was handled), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_shutdown_mid_stream_redelivers_nothing_it_finished() {
    const EVENTS: u32 = 400;
    let publisher = rabbit_bus(|_| {}).await;
    let exchange = publisher.config().exchange.clone();
    let group = unique("svc");
    let handled: Arc<Mutex<Vec<u32>>> = Arc::default();
    let subscription = |handled: Arc<Mutex<Vec<u32>>>| {
        Subscription::new(GroupName::new(&group).unwrap()).concurrency(8).on::<Numbered, _>(
            move |e: Numbered, _ctx: DeliveryContext| {
                let handled = handled.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    handled.lock().unwrap().push(e.seq);
                    Ok(())
                }
            },
        )
    };
    let first = rabbit_bus(|c| c.exchange = exchange.clone()).await;
    let _first_handle = first.subscribe(subscription(handled.clone())).await.unwrap();
    let mut confirmations = Vec::new();
    for seq in 0..EVENTS {
        let key = format!("k{}", seq % 10);
        confirmations.push(
            publisher.publish(Envelope::for_event(&Numbered { key, seq }).unwrap().build().unwrap()).await.unwrap(),
        );
    }
    for confirmation in confirmations {
        confirmation.await.unwrap();
    }
    wait_until("some handled", WAIT, || async { handled.lock().unwrap().len() > 40 }).await;
    first.shutdown().await;
    let finished: HashSet<u32> = handled.lock().unwrap().iter().copied().collect();
    assert!(finished.len() < EVENTS as usize, "stopped before the end");
    let second = rabbit_bus(|c| c.exchange = exchange.clone()).await;
    let _second_handle = second.subscribe(subscription(handled.clone())).await.unwrap();
    wait_until("every event handled", WAIT, || async {
        handled.lock().unwrap().iter().collect::<HashSet<_>>().len() == EVENTS as usize
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handled = handled.lock().unwrap().clone();
    let redelivered = handled.len() - EVENTS as usize;
    assert_eq!(
        redelivered,
        0,
        "{redelivered} of the {} events finished before the shutdown came again",
        finished.len()
    );
    second.shutdown().await;
    publisher.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

/// A publish the broker nacks (its queue refuses it: `x-overflow=reject-publish`) holds back the later events of
/// its key, as a lost one does, until it is published again and confirmed; other keys are not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_event_holds_back_its_key_until_it_is_published_again() {
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let (full, group) = (unique("full"), unique("svc"));
    let channel = plain_amqp().await;
    // A queue of `Refused` events: full at once (it refuses every message) or a plain one.
    let declare_refused_queue = async |full_at_once: bool| {
        let mut arguments = FieldTable::default();
        if full_at_once {
            arguments.insert("x-max-length".into(), AMQPValue::LongInt(0));
            arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        }
        channel.queue_declare(full.as_str().into(), QueueDeclareOptions::default(), arguments).await.unwrap();
        channel
            .queue_bind(
                full.as_str().into(),
                exchange.as_str().into(),
                "Refused".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
    };
    declare_refused_queue(true).await;
    let (_handle, handled) = recording_consumer(&bus, &group).await;
    let refused = Envelope::builder(EventTypeName::new("Refused").unwrap(), b"{}".to_vec())
        .partition_key(Some("k".into()))
        .build()
        .unwrap();
    let err = bus.publish_confirmed(refused.clone()).await.unwrap_err();
    assert!(matches!(err, BusError::Nacked { .. }), "{err}");
    let next = |key: &str, seq| Envelope::for_event(&Numbered { key: key.into(), seq }).unwrap().build().unwrap();
    let held = next("k", 1);
    let err = bus.publish_confirmed(held.clone()).await.unwrap_err();
    assert!(matches!(err, BusError::ConfirmationLost(_)), "the nacked event's key is held back: {err}");
    bus.publish_confirmed(next("other", 2)).await.expect("another key goes on");
    // Room in the queue: the nacked event goes again, then its key is free.
    channel.queue_delete(full.as_str().into(), Default::default()).await.unwrap();
    declare_refused_queue(false).await;
    bus.publish_confirmed(refused).await.expect("published again");
    // The held-back event holds back its key in its turn until it goes again, in its order (as the relay does).
    let third = next("k", 3);
    assert!(bus.publish_confirmed(third.clone()).await.is_err(), "held back until event 1 went again");
    bus.publish_confirmed(held).await.expect("the held-back event goes");
    bus.publish_confirmed(third).await.expect("the key goes on");
    wait_until("all handled", WAIT, || async { handled.lock().unwrap().len() == 3 }).await;
    assert_eq!(*handled.lock().unwrap(), vec![2, 1, 3]);
    bus.shutdown().await;
    channel.queue_delete(full.as_str().into(), Default::default()).await.unwrap();
    delete_topology(&exchange, &[&group]).await;
}

/// A group that no longer handles an event type stops receiving it: the type is unbound once no instance has
/// bound it for `stale_binding_grace` (zero here; before, its binding stayed, so every such event was
/// dead-lettered "no handler" forever and a publisher never learnt that nobody handles it), on an unpartitioned
/// and on a partitioned group. Within the grace, an instance of the old version starting beside a canary that
/// added a handler does not unbind the canary's type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_type_a_group_stopped_handling_is_unbound() {
    for partitions in [None, Some(2u16)] {
        let bus = rabbit_bus(|c| {
            c.membership_heartbeat = Duration::from_millis(100);
            c.member_timeout = Duration::from_millis(1000);
            c.stale_binding_grace = Duration::ZERO;
        })
        .await;
        let exchange = bus.config().exchange.clone();
        let group = unique("svc");
        let with_partitions = |s: Subscription| match partitions {
            Some(n) => s.partitions(n),
            None => s,
        };
        let ok = |_e: Numbered, _ctx: DeliveryContext| async { Ok::<(), HandlerError>(()) };
        struct Ignore;
        #[async_trait::async_trait]
        impl bus_core::EnvelopeHandler for Ignore {
            async fn handle(&self, _ctx: DeliveryContext) -> Result<(), HandlerError> {
                Ok(())
            }
        }
        let old = bus
            .subscribe(with_partitions(
                Subscription::new(GroupName::new(&group).unwrap())
                    .on::<Numbered, _>(ok)
                    .on_envelope("Retired", Arc::new(Ignore)),
            ))
            .await
            .unwrap();
        let retired = || Envelope::builder(EventTypeName::new("Retired").unwrap(), b"{}".to_vec()).build().unwrap();
        bus.publish_confirmed(retired()).await.expect("the old version handles Retired");
        old.shutdown().await;
        let new = bus
            .subscribe(with_partitions(Subscription::new(GroupName::new(&group).unwrap()).on::<Numbered, _>(ok)))
            .await
            .unwrap();
        let error = bus.publish_confirmed(retired()).await.unwrap_err();
        assert!(matches!(error, BusError::Unroutable { .. }), "{partitions:?}: {error}");
        let numbered = Envelope::for_event(&Numbered { key: "k".into(), seq: 1 }).unwrap().build().unwrap();
        bus.publish_confirmed(numbered).await.expect("the handled type is still bound");
        new.shutdown().await;
        bus.shutdown().await;
        match partitions {
            Some(n) => integration_tests::delete_partitioned_topology(&exchange, &group, n).await,
            None => delete_topology(&exchange, &[&group]).await,
        }
    }

    // A canary adds a handler; an instance of the old version (re)starts beside it: the new type stays bound.
    let bus = rabbit_bus(|_| {}).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let ok = |_e: Numbered, _ctx: DeliveryContext| async { Ok::<(), HandlerError>(()) };
    let added = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = added.clone();
    let canary = bus
        .subscribe(Subscription::new(GroupName::new(&group).unwrap()).on::<Numbered, _>(ok).on::<Plain, _>(
            move |_e: Plain, _ctx: DeliveryContext| {
                let seen = seen.clone();
                async move {
                    seen.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            },
        ))
        .await
        .unwrap();
    let old = bus.subscribe(Subscription::new(GroupName::new(&group).unwrap()).on::<Numbered, _>(ok)).await;
    let old = old.expect("the old version subscribes beside the canary");
    // (Stopped before publishing: on one queue it could take the event and dead-letter it, having no handler.)
    old.shutdown().await;
    bus.publish_confirmed(Envelope::for_event(&Plain { n: 1 }).unwrap().build().unwrap())
        .await
        .expect("the canary's type is still bound");
    wait_until("the canary handled it", WAIT, || async { added.load(Ordering::SeqCst) == 1 }).await;
    canary.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Plain {
    n: u32,
}

impl bus_core::IntegrationEvent for Plain {
    const TYPE_NAME: &'static str = "Plain";
}

/// A message the broker keeps redelivering without its ever being settled (it crashes or hangs its consumers:
/// here a consumer that takes it and gives it back, three times) is dead-lettered at its next delivery, past
/// `redelivery_limit`, instead of coming back for ever. Quorum queues count deliveries (`x-delivery-count`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_redelivered_past_the_limit_is_dead_lettered_not_handled() {
    use lapin::options::BasicRejectOptions;
    let bus = rabbit_bus(|c| {
        c.queue_type = bus_rabbitmq::QueueType::Quorum;
        c.redelivery_limit = 3;
    })
    .await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let (handle, handled) = recording_consumer(&bus, &group).await;
    handle.shutdown().await;
    let event = Envelope::for_event(&Numbered { key: "k".into(), seq: 7 }).unwrap().build().unwrap();
    bus.publish_confirmed(event.clone()).await.unwrap();
    let channel = plain_amqp().await;
    for _ in 0..3 {
        let message = channel
            .basic_get(group.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .unwrap()
            .expect("the message is in the queue");
        channel.basic_reject(message.delivery.delivery_tag, BasicRejectOptions { requeue: true }).await.unwrap();
    }
    let (second, handled_again) = recording_consumer(&bus, &group).await;
    let group_name = GroupName::new(&group).unwrap();
    wait_until("dead-lettered", WAIT, || async { bus.dead_letters(&group_name).await.unwrap().len() == 1 }).await;
    let letters = bus.dead_letters(&group_name).await.unwrap();
    assert_eq!(letters[0].envelope.as_ref().map(Envelope::id), Some(event.id()));
    assert!(letters[0].last_error.contains("delivered 4 times"), "{}", letters[0].last_error);
    assert_eq!(letters[0].cause, bus_core::DeadLetterCause::Permanent);
    assert!(handled.lock().unwrap().is_empty() && handled_again.lock().unwrap().is_empty(), "never handled");
    second.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}

/// On quorum queues, a keyless event's retries go through `<group>.retry` (per-message TTL, dead-lettered back
/// to the group queue at least once) and arrive, with their delays; an event that keeps failing is
/// dead-lettered to `<group>.dlq`, listed there (more than once: listing takes and returns) and redriven.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_dead_letters_work_on_quorum_queues() {
    let bus = rabbit_bus(|c| c.queue_type = bus_rabbitmq::QueueType::Quorum).await;
    let exchange = bus.config().exchange.clone();
    let group = unique("svc");
    let group_name = GroupName::new(&group).unwrap();
    let attempts: Arc<Mutex<Vec<(u32, u32, Instant)>>> = Arc::default();
    let seen = attempts.clone();
    let retry = RetryPolicy::exponential(3, Duration::from_millis(200)).with_jitter(0.0);
    let handle = bus
        .subscribe(Subscription::new(group_name.clone()).retry(retry).on::<Plain, _>(
            move |e: Plain, ctx: DeliveryContext| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push((e.n, ctx.attempt(), Instant::now()));
                    match (e.n, ctx.attempt()) {
                        (1, a) if a < 3 => Err(HandlerError::transient("not yet")),
                        (2, _) => Err(HandlerError::transient("never")),
                        _ => Ok(()),
                    }
                }
            },
        ))
        .await
        .unwrap();
    for n in [1, 2] {
        bus.publish_confirmed(Envelope::for_event(&Plain { n }).unwrap().build().unwrap()).await.unwrap();
    }
    wait_until("event 1 handled on attempt 3", WAIT, || async {
        attempts.lock().unwrap().iter().any(|(n, a, _)| (*n, *a) == (1, 3))
    })
    .await;
    wait_until("event 2 dead-lettered", WAIT, || async { bus.dead_letters(&group_name).await.unwrap().len() == 1 })
        .await;
    let tries: Vec<(u32, Instant)> =
        attempts.lock().unwrap().iter().filter(|(n, _, _)| *n == 1).map(|(_, a, t)| (*a, *t)).collect();
    assert_eq!(tries.iter().map(|(a, _)| *a).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(tries[1].1 - tries[0].1 >= Duration::from_millis(190), "the first retry waited its delay");
    for _ in 0..3 {
        assert_eq!(bus.dead_letters(&group_name).await.unwrap().len(), 1, "listing keeps the dead letter");
    }
    assert_eq!(bus.redrive(&group_name, None).await.unwrap(), 1);
    wait_until("redriven and dead-lettered again", WAIT, || async {
        attempts.lock().unwrap().iter().filter(|(n, _, _)| *n == 2).count() == 6
    })
    .await;
    handle.shutdown().await;
    bus.shutdown().await;
    delete_topology(&exchange, &[&group]).await;
}
