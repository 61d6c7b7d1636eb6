//! Crash points for fault-injection tests, compiled only with the `failpoints` feature (never in a release
//! build of an application that does not ask for it).
//!
//! `BUS_FAILPOINT=<name>@<n>` makes the process abort (as `kill -9` would: no destructors, no graceful
//! anything) the `n`-th time it reaches the crash point `name` (`n` defaults to 1). Points:
//! - `relay-after-confirm`: the bus confirmed a batch, the relay has not marked it published yet.

use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);

/// Aborts the process if `BUS_FAILPOINT` names `point` and this is the chosen hit.
pub(crate) fn crash_point(point: &str) {
    let Ok(spec) = std::env::var("BUS_FAILPOINT") else { return };
    let (name, nth) = spec.split_once('@').unwrap_or((spec.as_str(), "1"));
    if name != point {
        return;
    }
    let nth: u64 = nth.parse().unwrap_or(1);
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("failpoint {point}: aborting the process (hit {nth})");
        std::process::abort();
    }
}

/// `BUS_FAILPOINT_REFUSE_KEYS=<file>`: while `<file>` exists, the relay's bus refuses (as a broker nack while
/// healthy: an attempt spent, then backoff) every event whose partition key is a line of the file. A line
/// `next` is replaced by the key of the next keyed event the relay publishes, which is then refused. For the
/// fault suite's blocked-key scenario: one key kept failing while the others flow.
pub(crate) fn refusing_bus(bus: std::sync::Arc<dyn EventBus>) -> std::sync::Arc<dyn EventBus> {
    match std::env::var_os("BUS_FAILPOINT_REFUSE_KEYS") {
        Some(path) => {
            std::sync::Arc::new(RefusingBus { inner: bus, path: path.into(), lock: std::sync::Mutex::new(()) })
        }
        None => bus,
    }
}

use async_trait::async_trait;
use bus_core::{BusError, Confirmation, Envelope, EventBus, Subscription, SubscriptionHandle};

struct RefusingBus {
    inner: std::sync::Arc<dyn EventBus>,
    path: std::path::PathBuf,
    lock: std::sync::Mutex<()>,
}

impl RefusingBus {
    fn refuses(&self, key: &str) -> bool {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(text) = std::fs::read_to_string(&self.path) else { return false };
        if text.lines().any(|line| line.trim() == key) {
            return true;
        }
        if text.lines().any(|line| line.trim() == "next") {
            let replaced = text.replace("next", key);
            if std::fs::write(&self.path, replaced).is_ok() {
                eprintln!("failpoint refuse-keys: refusing key {key} from now on");
                return true;
            }
        }
        false
    }
}

#[async_trait]
impl EventBus for RefusingBus {
    async fn publish(&self, envelope: Envelope) -> Result<Confirmation, BusError> {
        if let Some(key) = envelope.partition_key()
            && self.refuses(key)
        {
            return Ok(Confirmation::failed(BusError::Nacked {
                event_id: envelope.id(),
                reason: "refused by the failpoint BUS_FAILPOINT_REFUSE_KEYS".into(),
            }));
        }
        self.inner.publish(envelope).await
    }

    async fn subscribe(&self, subscription: Subscription) -> Result<SubscriptionHandle, BusError> {
        self.inner.subscribe(subscription).await
    }

    async fn health(&self) -> Result<(), BusError> {
        self.inner.health().await
    }
}
