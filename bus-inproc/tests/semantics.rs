//! The in-process bus's promises, each shown by a test that could fail.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_core::{
    BusError, DeadLetterCause, DeadLetterQueue, DeliveryContext, Envelope, EventBus, GroupName, HandlerError,
    IntegrationEvent, RetryPolicy, Subscription,
};
use bus_inproc::{ConfirmOn, InProcBus, InProcConfig};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Numbered {
    key: String,
    seq: u32,
}
impl IntegrationEvent for Numbered {
    const TYPE_NAME: &'static str = "Numbered";
    fn partition_key(&self) -> Option<String> {
        Some(self.key.clone())
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Plain {
    n: u32,
}
impl IntegrationEvent for Plain {
    const TYPE_NAME: &'static str = "Plain";
}

fn envelope<E: IntegrationEvent>(event: &E) -> Envelope {
    Envelope::for_event(event).unwrap().source("test").build().unwrap()
}

fn group(name: &str) -> GroupName {
    GroupName::new(name).unwrap()
}

const GRACE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fans_out_to_groups_and_instances_of_a_group_compete() {
    let bus = InProcBus::new();
    let seen_a1 = Arc::new(Mutex::new(Vec::new()));
    let seen_a2 = Arc::new(Mutex::new(Vec::new()));
    let seen_b = Arc::new(Mutex::new(Vec::new()));
    // Instance a1 handles nothing until a2 has handled something: with one worker each, a2 must get events.
    let (a2_started_tx, a2_started) = tokio::sync::watch::channel(false);
    let a2_started_tx = Arc::new(a2_started_tx);

    let seen = seen_a1.clone();
    let _a1 = bus
        .subscribe(Subscription::new(GroupName::from_static("a")).concurrency(1).on::<Plain, _>(
            move |e: Plain, _ctx: DeliveryContext| {
                let seen = seen.clone();
                let mut started = a2_started.clone();
                async move {
                    started.wait_for(|s| *s).await.map_err(HandlerError::transient)?;
                    seen.lock().unwrap().push(e.n);
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let seen = seen_a2.clone();
    let _a2 = bus
        .subscribe(Subscription::new(GroupName::from_static("a")).concurrency(1).on::<Plain, _>(
            move |e: Plain, _ctx: DeliveryContext| {
                let seen = seen.clone();
                let started = a2_started_tx.clone();
                async move {
                    seen.lock().unwrap().push(e.n);
                    started.send_replace(true);
                    tokio::task::yield_now().await;
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let seen = seen_b.clone();
    let _b = bus
        .subscribe(Subscription::new(GroupName::from_static("b")).on::<Plain, _>(
            move |e: Plain, _ctx: DeliveryContext| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(e.n);
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();

    let confirmations = bus.publish_batch((0..1000).map(|n| envelope(&Plain { n })).collect()).await;
    for confirmation in confirmations {
        confirmation.await.unwrap();
    }
    bus.settled().await;

    let a1 = seen_a1.lock().unwrap().clone();
    let a2 = seen_a2.lock().unwrap().clone();
    let mut a: Vec<u32> = a1.iter().chain(&a2).copied().collect();
    a.sort_unstable();
    assert_eq!(a, (0..1000).collect::<Vec<_>>(), "group a: each event exactly once across its instances");
    assert!(!a1.is_empty() && !a2.is_empty(), "both instances of a worked: {} / {}", a1.len(), a2.len());
    let mut b = seen_b.lock().unwrap().clone();
    b.sort_unstable();
    assert_eq!(b, (0..1000).collect::<Vec<_>>(), "group b got every event too");
    assert_eq!(bus.stats().handled, 2000);
    assert!(bus.shutdown(GRACE).await.drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_is_retried_with_backoff_then_dead_lettered_then_redriven() {
    let bus = InProcBus::new();
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let attempts = Arc::new(Mutex::new(Vec::<(u32, Instant)>::new()));
    let handled = Arc::new(AtomicU32::new(0));
    let retry = RetryPolicy::exponential(4, Duration::from_millis(20)).with_jitter(0.0);
    let (b, a, h) = (broken.clone(), attempts.clone(), handled.clone());
    let _sub = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).retry(retry).on::<Plain, _>(
            move |_e: Plain, ctx: DeliveryContext| {
                let (broken, attempts, handled) = (b.clone(), a.clone(), h.clone());
                async move {
                    attempts.lock().unwrap().push((ctx.attempt(), Instant::now()));
                    if broken.load(Ordering::SeqCst) {
                        return Err(HandlerError::transient("inventory service unavailable"));
                    }
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();

    let event = envelope(&Plain { n: 7 });
    let id = event.id();
    // Dead-lettering is the bus taking responsibility: the confirmation resolves Ok.
    bus.publish_confirmed(event).await.unwrap();
    bus.settled().await;

    let attempts_seen = attempts.lock().unwrap().clone();
    assert_eq!(attempts_seen.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
    let gaps: Vec<Duration> = attempts_seen.windows(2).map(|w| w[1].1 - w[0].1).collect();
    for (gap, nominal) in gaps.iter().zip([20, 40, 80]) {
        assert!(*gap >= Duration::from_millis(nominal), "backoff grows: gaps {gaps:?}");
    }
    let dead = bus.dead_letters(&group("svc")).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope.as_ref().unwrap().id(), id);
    assert!(dead[0].is(id));
    assert_eq!(dead[0].attempts, 4);
    assert_eq!(dead[0].cause, DeadLetterCause::AttemptsExhausted);
    assert!(dead[0].last_error.contains("inventory service unavailable"), "{}", dead[0].last_error);
    let stats = bus.stats();
    assert_eq!((stats.retried, stats.dead_lettered, stats.handled), (3, 1, 0));

    broken.store(false, Ordering::SeqCst);
    assert_eq!(bus.redrive(&group("svc"), Some(id)).await.unwrap(), 1);
    bus.settled().await;
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    assert!(bus.dead_letters(&group("svc")).await.unwrap().is_empty());
    assert_eq!(attempts.lock().unwrap().last().unwrap().0, 1, "a redriven event starts again at attempt 1");
    assert!(bus.shutdown(GRACE).await.drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_panics_and_undecodable_payloads_are_dead_lettered_while_good_events_flow() {
    let bus = InProcBus::new();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let h = handled.clone();
    let retry = RetryPolicy::exponential(3, Duration::from_millis(1));
    let _sub = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).retry(retry).on::<Plain, _>(
            move |e: Plain, _ctx: DeliveryContext| {
                let handled = h.clone();
                async move {
                    match e.n {
                        13 => Err(HandlerError::permanent("13 is not a valid quantity")),
                        666 => panic!("handler bug on 666"),
                        n => {
                            handled.lock().unwrap().push(n);
                            Ok(())
                        }
                    }
                }
            },
        ))
        .await
        .unwrap();
    let mut events: Vec<Envelope> = (0..100).map(|n| envelope(&Plain { n })).collect();
    events.push(envelope(&Plain { n: 666 }));
    let bad_json = Envelope::builder("Plain".try_into().unwrap(), &b"{not json"[..]).build().unwrap();
    let bad_id = bad_json.id();
    events.push(bad_json);
    for confirmation in bus.publish_batch(events).await {
        confirmation.await.unwrap();
    }
    bus.settled().await;

    let mut ok = handled.lock().unwrap().clone();
    ok.sort_unstable();
    assert_eq!(ok, (0..100).filter(|n| *n != 13).collect::<Vec<_>>());
    let dead = bus.dead_letters(&group("svc")).await.unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    let by_reason = |needle: &str| {
        dead.iter().find(|d| d.last_error.contains(needle)).unwrap_or_else(|| panic!("{needle}: {dead:?}"))
    };
    let permanent = by_reason("not a valid quantity");
    assert_eq!((permanent.attempts, permanent.cause), (1, DeadLetterCause::Permanent), "permanent: no retry");
    let panicked = by_reason("handler panicked: handler bug on 666");
    assert_eq!(
        (panicked.attempts, panicked.cause),
        (3, DeadLetterCause::AttemptsExhausted),
        "a panic is retried, then dead-lettered"
    );
    let undecodable = by_reason("payload is not a valid Plain");
    assert_eq!(undecodable.envelope.as_ref().unwrap().id(), bad_id);
    assert_eq!(undecodable.attempts, 1);
    assert!(bus.shutdown(GRACE).await.drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_events_over_a_hundred_keys_keep_per_key_order_in_parallel() {
    let bus = InProcBus::with_config(InProcConfig { queue_capacity: 1_000, ..InProcConfig::default() }).unwrap();
    let order: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let (o, f, m) = (order.clone(), in_flight.clone(), max_in_flight.clone());
    let _sub = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).concurrency(8).on::<Numbered, _>(
            move |e: Numbered, _ctx: DeliveryContext| {
                let (order, in_flight, max_in_flight) = (o.clone(), f.clone(), m.clone());
                async move {
                    let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    max_in_flight.fetch_max(now, Ordering::SeqCst);
                    // Vary handling time so that a bus without per-key order would reorder.
                    for _ in 0..(e.seq % 3) {
                        tokio::task::yield_now().await;
                    }
                    order.lock().unwrap().entry(e.key).or_default().push(e.seq);
                    in_flight.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();

    let publisher = bus.clone();
    let publishing = tokio::spawn(async move {
        let mut confirmations = Vec::new();
        for seq in 0..100u32 {
            for key in 0..100 {
                let event = Numbered { key: format!("key-{key}"), seq };
                confirmations.push(publisher.publish(envelope(&event)).await.unwrap());
            }
        }
        for confirmation in confirmations {
            confirmation.await.unwrap();
        }
    });
    publishing.await.unwrap();
    bus.settled().await;

    let order = std::mem::take(&mut *order.lock().unwrap());
    assert_eq!(order.len(), 100);
    let mut reordered = 0;
    for (key, seqs) in order.iter() {
        assert_eq!(seqs.len(), 100, "{key}: every event once");
        reordered += seqs.windows(2).filter(|w| w[0] >= w[1]).count();
    }
    assert_eq!(reordered, 0, "per-key order kept");
    assert!(max_in_flight.load(Ordering::SeqCst) > 1, "different keys are handled in parallel");
    assert!(bus.shutdown(GRACE).await.drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_event_holds_back_later_events_of_its_key_only() {
    let bus = InProcBus::new();
    let order = Arc::new(Mutex::new(Vec::new()));
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (o, f) = (order.clone(), failed_once.clone());
    let retry = RetryPolicy::exponential(3, Duration::from_millis(30)).with_jitter(0.0);
    let _sub = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).retry(retry).on::<Numbered, _>(
            move |e: Numbered, _ctx: DeliveryContext| {
                let (order, failed_once) = (o.clone(), f.clone());
                async move {
                    if e.key == "slow" && e.seq == 3 && !failed_once.swap(true, Ordering::SeqCst) {
                        return Err(HandlerError::transient("first try fails"));
                    }
                    order.lock().unwrap().push((e.key, e.seq));
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let mut events = Vec::new();
    for seq in 0..10 {
        events.push(envelope(&Numbered { key: "slow".into(), seq }));
        events.push(envelope(&Numbered { key: "fast".into(), seq }));
    }
    for confirmation in bus.publish_batch(events).await {
        confirmation.await.unwrap();
    }
    bus.settled().await;
    let order = std::mem::take(&mut *order.lock().unwrap());
    let slow: Vec<u32> = order.iter().filter(|(k, _)| k == "slow").map(|(_, s)| *s).collect();
    assert_eq!(slow, (0..10).collect::<Vec<_>>(), "the retry of 3 kept 4..9 waiting");
    let fast_done = order.iter().position(|(k, s)| k == "fast" && *s == 9).unwrap();
    let slow_3 = order.iter().position(|(k, s)| k == "slow" && *s == 3).unwrap();
    assert!(fast_done < slow_3, "the other key was not held back by the retry delay");
    assert!(bus.shutdown(GRACE).await.drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_handles_everything_accepted() {
    let bus =
        InProcBus::with_config(InProcConfig { confirm_on: ConfirmOn::Enqueued, ..InProcConfig::default() }).unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    let h = handled.clone();
    let _sub = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).concurrency(4).on::<Plain, _>(
            move |_e: Plain, _ctx: DeliveryContext| {
                let handled = h.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    for n in 0..500 {
        bus.publish_confirmed(envelope(&Plain { n })).await.unwrap();
    }
    assert!(handled.load(Ordering::SeqCst) < 500, "events were still queued when shutdown began");
    let report = bus.shutdown(Duration::from_secs(30)).await;
    assert!(report.drained && report.abandoned == 0, "{report:?}");
    assert_eq!(handled.load(Ordering::SeqCst), 500, "nothing lost at graceful shutdown");
    assert!(matches!(bus.publish(envelope(&Plain { n: 1 })).await, Err(BusError::Closed)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_not_finished_within_the_grace_period_fail_their_confirmation() {
    let bus = InProcBus::new(); // ConfirmOn::Handled
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let _sub = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).concurrency(1).on::<Plain, _>(
            move |_e: Plain, _ctx: DeliveryContext| {
                let gate = g.clone();
                async move {
                    // The first event is held until the test lets it go.
                    gate.acquire().await.map_err(HandlerError::transient)?.forget();
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let mut confirmations = Vec::new();
    for n in 0..5 {
        confirmations.push(bus.publish(envelope(&Plain { n })).await.unwrap());
    }
    let stopping = {
        let bus = bus.clone();
        tokio::spawn(async move { bus.shutdown(Duration::from_millis(50)).await })
    };
    // Let the one event in hand finish once the grace period has passed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.add_permits(1);
    let report = stopping.await.unwrap();
    assert!(!report.drained);
    assert_eq!(report.abandoned, 4);
    let results: Vec<_> = futures_results(confirmations).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "only the handled event is confirmed: {results:?}");
    assert!(results.iter().skip(1).all(|r| matches!(r, Err(BusError::ConfirmationLost(_)))));
}

async fn futures_results(confirmations: Vec<bus_core::Confirmation>) -> Vec<Result<(), BusError>> {
    let mut out = Vec::new();
    for c in confirmations {
        out.push(c.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmation_waits_for_the_handler_by_default() {
    let bus = InProcBus::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let _sub = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).on::<Plain, _>(
            move |_e: Plain, _ctx: DeliveryContext| {
                let gate = g.clone();
                async move {
                    gate.acquire().await.map_err(HandlerError::transient)?.forget();
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let mut confirmation = bus.publish(envelope(&Plain { n: 1 })).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(50), &mut confirmation).await.is_err(), "not confirmed yet");
    gate.add_permits(1);
    confirmation.await.unwrap();
    bus.shutdown(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_pressure_bounds_the_queue() {
    const CAPACITY: usize = 16;
    let bus = InProcBus::with_config(InProcConfig {
        queue_capacity: CAPACITY,
        confirm_on: ConfirmOn::Enqueued,
        ..InProcConfig::default()
    })
    .unwrap();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let max_depth = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let (g, m, h, b) = (gate.clone(), max_depth.clone(), handled.clone(), bus.clone());
    let _sub = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).concurrency(2).on::<Plain, _>(
            move |_e: Plain, _ctx: DeliveryContext| {
                let (gate, max_depth, handled, bus) = (g.clone(), m.clone(), h.clone(), b.clone());
                async move {
                    gate.acquire().await.map_err(HandlerError::transient)?.forget();
                    max_depth.fetch_max(bus.queue_depth(&group("svc")).unwrap(), Ordering::SeqCst);
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    for n in 0..CAPACITY as u32 {
        bus.publish_confirmed(envelope(&Plain { n })).await.unwrap();
    }
    assert_eq!(bus.queue_depth(&group("svc")), Some(CAPACITY));
    let blocked = tokio::time::timeout(Duration::from_millis(100), bus.publish(envelope(&Plain { n: 99 }))).await;
    assert!(blocked.is_err(), "the publisher waits while the group is full");

    let publisher = bus.clone();
    let publishing = tokio::spawn(async move {
        for n in CAPACITY as u32..200 {
            publisher.publish_confirmed(envelope(&Plain { n })).await.unwrap();
        }
    });
    gate.add_permits(200);
    publishing.await.unwrap();
    bus.settled().await;
    assert_eq!(handled.load(Ordering::SeqCst), 200);
    assert!(max_depth.load(Ordering::SeqCst) <= CAPACITY, "depth never passed the bound");
    bus.shutdown(GRACE).await;
}

#[tokio::test]
async fn invalid_names_sizes_settings_and_routes_are_refused_with_clear_errors() {
    #[derive(Serialize, Deserialize)]
    struct Bad;
    impl IntegrationEvent for Bad {
        const TYPE_NAME: &'static str = "Order Created!";
    }
    let ok = |_e: Plain, _ctx: DeliveryContext| async { Ok(()) };
    let bus = InProcBus::with_config(InProcConfig { max_payload_bytes: 64, ..InProcConfig::default() }).unwrap();

    let err = bus
        .subscribe(
            Subscription::new(GroupName::from_static("svc"))
                .on::<Bad, _>(|_e: Bad, _c: DeliveryContext| async { Ok(()) }),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("invalid event type name \"Order Created!\""), "{err}");
    let err = GroupName::new("bad group").unwrap_err();
    assert!(err.to_string().contains("consumer group name"), "{err}");
    let panicked = std::panic::catch_unwind(|| GroupName::from_static("bad group")).unwrap_err();
    assert!(panicked.downcast_ref::<String>().unwrap().contains("consumer group name"), "a literal that is no name");
    let err = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).concurrency(0).on::<Plain, _>(ok))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("concurrency"), "{err}");
    let err = bus.subscribe(Subscription::new(GroupName::from_static("svc"))).await.unwrap_err();
    assert!(err.to_string().contains("no handler"), "{err}");

    let err = bus.publish(envelope(&Plain { n: 1 })).await.unwrap_err();
    assert!(matches!(err, BusError::Unroutable { .. }), "no group subscribed: {err}");

    let _sub = bus.subscribe(Subscription::new(GroupName::from_static("svc")).on::<Plain, _>(ok)).await.unwrap();
    let err = bus
        .subscribe(
            Subscription::new(GroupName::from_static("svc"))
                .on::<Numbered, _>(|_e: Numbered, _c: DeliveryContext| async { Ok(()) }),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must handle the same event types"), "{err}");

    let big = Envelope::builder("Plain".try_into().unwrap(), vec![b' '; 65]).build().unwrap();
    let err = bus.publish(big).await.unwrap_err();
    assert_eq!(err.to_string(), "event Plain is 65 bytes, over the payload limit of 64 bytes");

    let err = InProcBus::with_config(InProcConfig { queue_capacity: 0, ..InProcConfig::default() }).unwrap_err();
    assert!(err.to_string().contains("queue_capacity"), "{err}");
    let retry = RetryPolicy { multiplier: 0.5, ..RetryPolicy::default() };
    let err = InProcBus::with_config(InProcConfig { retry, ..InProcConfig::default() }).unwrap_err();
    assert!(err.to_string().contains("retry.multiplier"), "{err}");
    bus.shutdown(GRACE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_leaves_its_events_to_the_others() {
    let bus = InProcBus::new();
    let seen: Arc<Mutex<HashSet<u32>>> = Arc::default();
    let make = |seen: Arc<Mutex<HashSet<u32>>>| {
        move |e: Plain, _ctx: DeliveryContext| {
            let seen = seen.clone();
            async move {
                assert!(seen.lock().unwrap().insert(e.n), "handled twice");
                Ok(())
            }
        }
    };
    let first = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).on::<Plain, _>(make(seen.clone())))
        .await
        .unwrap();
    first.shutdown().await;
    // No instance runs now: events wait in the group's queue.
    for n in 0..50 {
        drop(bus.publish(envelope(&Plain { n })).await.unwrap());
    }
    assert_eq!(bus.stats().outstanding, 50);
    let _second = bus
        .subscribe(Subscription::new(GroupName::from_static("svc")).on::<Plain, _>(make(seen.clone())))
        .await
        .unwrap();
    bus.settled().await;
    assert_eq!(seen.lock().unwrap().len(), 50);
    bus.shutdown(GRACE).await;
}

/// A group whose instances have all stopped keeps what fits in its queue (its consumers may come back), but once
/// full it refuses new events at once instead of blocking every publisher for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_without_a_running_instance_refuses_events_once_full_instead_of_blocking() {
    let bus = InProcBus::with_config(InProcConfig { queue_capacity: 4, ..InProcConfig::default() }).unwrap();
    let sub = bus
        .subscribe(Subscription::new(group("svc")).on::<Plain, _>(|_e: Plain, _ctx: DeliveryContext| async { Ok(()) }))
        .await
        .unwrap();
    sub.shutdown().await;
    let mut kept = Vec::new();
    for n in 0..4 {
        kept.push(bus.publish(envelope(&Plain { n })).await.expect("kept for the group's next instance"));
    }
    let refused = tokio::time::timeout(Duration::from_secs(2), bus.publish(envelope(&Plain { n: 4 })))
        .await
        .expect("the publish does not block");
    let error = refused.unwrap_err();
    assert!(error.to_string().contains("no running instance"), "{error}");
    // An instance comes back: the kept events are handled, and publishing works again.
    let handled = Arc::new(AtomicU32::new(0));
    let h = handled.clone();
    let _sub = bus
        .subscribe(Subscription::new(group("svc")).on::<Plain, _>(move |_e: Plain, _ctx: DeliveryContext| {
            let handled = h.clone();
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }))
        .await
        .unwrap();
    bus.publish(envelope(&Plain { n: 5 })).await.unwrap().await.unwrap();
    for confirmation in kept {
        confirmation.await.expect("handled by the new instance");
    }
    assert_eq!(handled.load(Ordering::SeqCst), 5);
    bus.shutdown(GRACE).await;
}

/// A handler that publishes to its own group and waits for the confirmation (same key, every worker busy) does
/// not deadlock: its own group's part of the confirmation resolves once the event is queued, as a broker's
/// confirm would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_publishing_confirmed_to_its_own_group_does_not_deadlock() {
    let bus = InProcBus::new();
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let (b, s) = (bus.clone(), seen.clone());
    let _sub = bus
        .subscribe(Subscription::new(group("svc")).concurrency(1).on::<Numbered, _>(
            move |e: Numbered, _ctx: DeliveryContext| {
                let (bus, seen) = (b.clone(), s.clone());
                async move {
                    seen.lock().unwrap().push(e.seq);
                    if e.seq == 0 {
                        let next = envelope(&Numbered { key: e.key.clone(), seq: 1 });
                        bus.publish_confirmed(next).await.map_err(HandlerError::transient)?;
                    }
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    let first = bus.publish(envelope(&Numbered { key: "k".into(), seq: 0 })).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), first).await.expect("no deadlock").unwrap();
    tokio::time::timeout(Duration::from_secs(5), bus.settled()).await.expect("settles");
    assert_eq!(*seen.lock().unwrap(), vec![0, 1]);
    bus.shutdown(GRACE).await;
}

/// Stopping is bounded: a handler that never returns is abandoned after `stop_timeout` (its event's
/// confirmation fails, so the publisher keeps it), both when its instance stops and when the bus does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_is_bounded_even_when_a_handler_never_returns() {
    let config = InProcConfig { stop_timeout: Duration::from_millis(200), ..InProcConfig::default() };
    for whole_bus in [false, true] {
        let bus = InProcBus::with_config(config.clone()).unwrap();
        let sub = bus
            .subscribe(Subscription::new(group("svc")).on::<Plain, _>(|_e: Plain, _ctx: DeliveryContext| async {
                std::future::pending::<()>().await;
                Ok(())
            }))
            .await
            .unwrap();
        let confirmation = bus.publish(envelope(&Plain { n: 1 })).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        if whole_bus {
            let report = bus.shutdown(Duration::from_millis(100)).await;
            assert!(!report.drained);
        } else {
            sub.shutdown().await;
        }
        assert!(started.elapsed() < Duration::from_secs(2), "stopped in {:?}", started.elapsed());
        let result = tokio::time::timeout(Duration::from_secs(2), confirmation).await.expect("resolved");
        assert!(matches!(result, Err(BusError::ConfirmationLost(_))), "{result:?}");
        bus.shutdown(Duration::from_millis(10)).await;
    }
}

/// A retry schedule RabbitMQ would refuse (longer than `bus_core::MAX_RETRY_HORIZON`) is refused here too, so
/// what works on the embedded bus works in production.
#[tokio::test]
async fn retry_schedules_rabbitmq_refuses_are_refused_here_too() {
    let bus = InProcBus::new();
    let long = RetryPolicy::exponential(40, Duration::from_secs(1)).with_max_delay(Duration::from_secs(60));
    let error = bus
        .subscribe(
            Subscription::new(group("svc"))
                .retry(long.clone())
                .on::<Plain, _>(|_e: Plain, _ctx: DeliveryContext| async { Ok(()) }),
        )
        .await
        .unwrap_err();
    assert!(error.to_string().contains("retry"), "{error}");
    let error = InProcBus::with_config(InProcConfig { retry: long, ..InProcConfig::default() }).unwrap_err();
    assert!(error.to_string().contains("retry"), "{error}");
    bus.shutdown(GRACE).await;
}
