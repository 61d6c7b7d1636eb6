//! Fault injection for the fault suite (`FAULT_TRANSIENT_FAILURES`): a seeded share of events fail their first
//! handlings with a transient error, as a flaky dependency would. Never set in production.
//!
//! Whether and how an event fails depends only on the seed and the event id, so a run can be repeated and a
//! test can tell which events failed. A failing event fails its first 1 to 3 attempts; half of them fail
//! *before* the handler runs (nothing happened: the retry does the work), the other half *after* the handler's
//! inbox transaction committed (the effect happened once: the retry must find it in the inbox and skip it).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bus_core::{DeliveryContext, EnvelopeHandler, HandlerError};
use uuid::Uuid;

/// A seeded share of events whose first handlings fail transiently (see the module docs).
#[derive(Clone, Debug)]
pub struct TransientFaults {
    /// Percentage of events that fail (0 to 100).
    pub percent: u8,
    /// Decides which events, how often, and where.
    pub seed: u64,
    /// Failures injected so far (shared by every clone).
    injected: Arc<AtomicU64>,
}

impl PartialEq for TransientFaults {
    fn eq(&self, other: &Self) -> bool {
        (self.percent, self.seed) == (other.percent, other.seed)
    }
}

/// What an event goes through under [`TransientFaults`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Attempts that fail (1 to 3): attempt `failures + 1` succeeds.
    pub failures: u32,
    /// The failure comes after the handler's transaction committed (else before the handler runs).
    pub after_commit: bool,
}

impl TransientFaults {
    /// Parses `<percent>:<seed>` (`10:42`: 10 % of events, seed 42).
    ///
    /// # Errors
    /// A message saying what is expected.
    pub fn parse(value: &str) -> Result<Self, String> {
        let bad = || format!("{value:?} is not <percent 0-100>:<seed>, like 10:42");
        let (percent, seed) = value.trim().split_once(':').ok_or_else(bad)?;
        let percent = percent.parse::<u8>().ok().filter(|p| *p <= 100).ok_or_else(bad)?;
        let seed = seed.parse::<u64>().map_err(|_| bad())?;
        Ok(Self::new(percent, seed))
    }

    /// `percent` % of events fail, as `seed` decides.
    pub fn new(percent: u8, seed: u64) -> Self {
        Self { percent: percent.min(100), seed, injected: Arc::default() }
    }

    /// The same faults with a count of their own (each service counts its injections).
    pub fn counted_apart(&self) -> Self {
        Self::new(self.percent, self.seed)
    }

    /// Failures injected so far (the sample services show it at `GET /faults`).
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// What event `id` goes through: `None` for most events.
    pub fn fault(&self, id: Uuid) -> Option<Fault> {
        let bits = id.as_u128();
        let mut rng = fastrand::Rng::with_seed(self.seed ^ (bits as u64) ^ ((bits >> 64) as u64).rotate_left(17));
        (rng.u8(0..100) < self.percent).then(|| Fault { failures: rng.u32(1..=3), after_commit: rng.bool() })
    }

    /// `handler`, failing as these faults say.
    pub fn wrap(&self, handler: Arc<dyn EnvelopeHandler>) -> Arc<dyn EnvelopeHandler> {
        Arc::new(Faulty { faults: self.clone(), inner: handler })
    }
}

struct Faulty {
    faults: TransientFaults,
    inner: Arc<dyn EnvelopeHandler>,
}

#[async_trait]
impl EnvelopeHandler for Faulty {
    async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
        let Some(fault) = self.faults.fault(ctx.event_id()).filter(|f| ctx.attempt() <= f.failures) else {
            return self.inner.handle(ctx).await;
        };
        let attempt = ctx.attempt();
        if fault.after_commit {
            self.inner.handle(ctx).await?;
        }
        self.faults.injected.fetch_add(1, Ordering::Relaxed);
        Err(HandlerError::transient(format!(
            "injected transient failure {attempt} of {} ({} the handler)",
            fault.failures,
            if fault.after_commit { "after" } else { "before" }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seeded_share_fails_one_to_three_times() {
        let faults = TransientFaults::parse("10:7").unwrap();
        let ids: Vec<Uuid> = (0..10_000).map(|_| Uuid::new_v4()).collect();
        let failing: Vec<Fault> = ids.iter().filter_map(|id| faults.fault(*id)).collect();
        assert!((800..1200).contains(&failing.len()), "{}", failing.len());
        assert!(failing.iter().all(|f| (1..=3).contains(&f.failures)));
        assert!(failing.iter().any(|f| f.after_commit) && failing.iter().any(|f| !f.after_commit));
        assert_eq!(
            ids.iter().map(|id| faults.fault(*id)).collect::<Vec<_>>(),
            ids.iter().map(|id| faults.fault(*id)).collect::<Vec<_>>()
        );
        assert!(TransientFaults::parse("101:1").is_err() && TransientFaults::parse("10").is_err());
    }
}
