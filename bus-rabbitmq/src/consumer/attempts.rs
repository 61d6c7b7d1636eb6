//! The attempts of events retried in place, remembered by this instance across the restarts of its consumption
//! (a reconnection, a broken lane, a partition handed over and taken back): a delivery that comes back goes on
//! with the attempt it had reached, after the delay it was waiting for, instead of starting its retry schedule
//! again. Only this process remembers: an event that moves to another instance starts from the attempt its
//! headers carry.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Most events remembered at once; past it, the oldest half is forgotten (they restart their schedule).
const MAX_REMEMBERED: usize = 100_000;

/// Where one event's in-place retry stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Standing {
    /// The attempt to run next.
    pub(crate) next_attempt: u32,
    /// Not before this instant.
    pub(crate) due: Instant,
}

#[derive(Debug, Default)]
pub(crate) struct InPlaceAttempts {
    events: Mutex<HashMap<Uuid, Standing>>,
}

impl InPlaceAttempts {
    /// Attempt `next_attempt` of event `id` is due in `delay`.
    pub(crate) fn remember(&self, id: Uuid, next_attempt: u32, delay: Duration) {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if events.len() >= MAX_REMEMBERED && !events.contains_key(&id) {
            let mut dues: Vec<Instant> = events.values().map(|s| s.due).collect();
            let (_, median, _) = dues.select_nth_unstable(events.len() / 2);
            let median = *median;
            events.retain(|_, s| s.due > median);
        }
        events.insert(id, Standing { next_attempt, due: Instant::now() + delay });
    }

    /// Where event `id` stands, if this instance retried it in place and has not settled it.
    pub(crate) fn standing(&self, id: Uuid) -> Option<Standing> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).get(&id).copied()
    }

    /// Event `id` is settled (handled, dead-lettered or moved to the retry queue).
    pub(crate) fn forget(&self, id: Uuid) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_forgotten_and_stays_bounded() {
        let attempts = InPlaceAttempts::default();
        let id = Uuid::new_v4();
        assert_eq!(attempts.standing(id), None);
        attempts.remember(id, 3, Duration::from_secs(1));
        assert_eq!(attempts.standing(id).map(|s| s.next_attempt), Some(3));
        attempts.forget(id);
        assert_eq!(attempts.standing(id), None);
        for _ in 0..MAX_REMEMBERED + 10 {
            attempts.remember(Uuid::new_v4(), 2, Duration::from_millis(1));
        }
        assert!(attempts.events.lock().unwrap().len() <= MAX_REMEMBERED);
    }
}
