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
    /// What happened so far (shared by every clone).
    counts: Arc<Counts>,
}

/// What [`TransientFaults`] counted: failures it injected, and the handlers' own failures (`overtaken`: those
/// saying an earlier event of the key has not arrived yet, i.e. the event overtook it).
#[derive(Debug, Default)]
struct Counts {
    injected: AtomicU64,
    natural: AtomicU64,
    overtaken: AtomicU64,
}

/// The counts of a service's [`TransientFaults`] (`GET /faults`: `injected=N natural=N overtaken=N`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Failures injected.
    pub injected: u64,
    /// Failures of the handlers themselves (a database error, an event that came too early).
    pub natural: u64,
    /// Of those, events that arrived before an earlier event of their key they depend on.
    pub overtaken: u64,
}

impl std::fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "injected={} natural={} overtaken={}", self.injected, self.natural, self.overtaken)
    }
}

impl std::str::FromStr for FaultCounts {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut counts = Self::default();
        for part in text.split_whitespace() {
            let (name, value) = part.split_once('=').ok_or_else(|| format!("{part:?} is not name=value"))?;
            let value = value.parse().map_err(|_| format!("{part:?} is not a count"))?;
            match name {
                "injected" => counts.injected = value,
                "natural" => counts.natural = value,
                "overtaken" => counts.overtaken = value,
                _ => return Err(format!("unknown count {name:?}")),
            }
        }
        Ok(counts)
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
        Self { percent: percent.min(100), seed, counts: Arc::default() }
    }

    /// The same faults with a count of their own (each service counts its injections).
    pub fn counted_apart(&self) -> Self {
        Self::new(self.percent, self.seed)
    }

    /// What was counted so far (the sample services show it at `GET /faults`).
    pub fn counts(&self) -> FaultCounts {
        let c = &self.counts;
        FaultCounts {
            injected: c.injected.load(Ordering::Relaxed),
            natural: c.natural.load(Ordering::Relaxed),
            overtaken: c.overtaken.load(Ordering::Relaxed),
        }
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

impl Faulty {
    /// Runs the real handler, counting its own failures.
    async fn run(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
        let result = self.inner.handle(ctx).await;
        if let Err(error) = &result {
            self.faults.counts.natural.fetch_add(1, Ordering::Relaxed);
            let error = error.to_string();
            if OVERTAKEN.iter().any(|said| error.contains(said)) {
                self.faults.counts.overtaken.fetch_add(1, Ordering::Relaxed);
            }
        }
        result
    }
}

/// What the samples' handlers say when an event arrives before an earlier one of its key it depends on (the
/// price read model: a change before the product, or before the change it applies on).
const OVERTAKEN: [&str; 2] = ["not in the read model yet", "has not arrived yet"];

#[async_trait]
impl EnvelopeHandler for Faulty {
    async fn handle(&self, ctx: DeliveryContext) -> Result<(), HandlerError> {
        let Some(fault) = self.faults.fault(ctx.event_id()).filter(|f| ctx.attempt() <= f.failures) else {
            return self.run(ctx).await;
        };
        let attempt = ctx.attempt();
        if fault.after_commit {
            self.run(ctx).await?;
        }
        self.faults.counts.injected.fetch_add(1, Ordering::Relaxed);
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
