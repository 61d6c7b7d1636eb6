//! The relay's pipeline: the rows a relay holds (claimed, not yet written back), per partition key in outbox
//! order, and the outcomes waiting to be written.
//!
//! A key has at most one event with the bus at a time: its next row is sent only once the bus confirmed the
//! previous one. That is what keeps per-key order through failures: when a publish fails, nothing later of its
//! key has been sent, so the retry cannot land after its successors. When a key's row fails, every later row of
//! that key the relay holds goes back untried, and the key is *draining*: rows of it that a claim started
//! before that release was written may still arrive, and they go back too (otherwise they could overtake the
//! failed row). Keyless rows and different keys go out in parallel, bounded by what the relay holds.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bus_core::{BusError, Envelope, EventBus, RetryPolicy};

use crate::row::OutboxRow;

/// Transport errors on one event while the bus says it is healthy, before they count as the event's own fault
/// (an attempt spent): a broker that closes the channel on one message (over its `max_message_size`), a
/// queue that never confirms it.
const TRANSPORT_STRIKES: u32 = 3;

/// Strikes are remembered for this many events at most (the relay's memory stays bounded).
const STRIKES_KEPT: usize = 10_000;

/// How many of its latest rows a relay remembers having taken in and having published, to ignore a late
/// hand-off or a claim that raced a mark (see [`Pipeline::accept`]).
const REMEMBERED: usize = 16_384;

/// The latest sequence numbers added, at most [`REMEMBERED`].
#[derive(Default)]
struct Remembered {
    order: VecDeque<i64>,
    set: std::collections::HashSet<i64>,
}

impl Remembered {
    /// Adds `seq`; returns the one forgotten to make room, if any.
    fn add(&mut self, seq: i64) -> Option<i64> {
        if self.set.insert(seq) {
            self.order.push_back(seq);
            if self.order.len() > REMEMBERED
                && let Some(oldest) = self.order.pop_front()
            {
                self.set.remove(&oldest);
                return Some(oldest);
            }
        }
        None
    }

    fn contains(&self, seq: i64) -> bool {
        self.set.contains(&seq)
    }
}

/// Where rows came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// The relay's claim.
    Claim,
    /// A producer of this process, right after its commit (direct dispatch).
    Handoff,
}

/// What the relay knows of a row while its envelope is with the bus.
#[derive(Clone, Debug)]
pub(super) struct RowMeta {
    pub seq: i64,
    pub event_id: uuid::Uuid,
    /// Attempts including this one (claims count them).
    pub attempts: u32,
    pub key: Option<String>,
}

/// A claimed row, ready to publish.
pub(super) struct Ready {
    pub meta: RowMeta,
    pub envelope: Envelope,
}

/// How a publish ended, as the relay must treat it.
#[derive(Debug)]
pub(super) enum Verdict {
    /// The bus confirmed it.
    Published,
    /// The transport was in trouble (no connection, timeout, closed channel, nack while the bus is unhealthy):
    /// not the event's fault, so no attempt is spent. `healthy` when the bus said it was healthy right after
    /// (a transport error that keeps striking one event on a healthy bus is the event's fault after all).
    Transport { error: BusError, healthy: bool },
    /// The bus refused this event while healthy (unroutable, nacked): an attempt, then backoff.
    Retryable(BusError),
    /// The event can never be published as it is (too large, invalid): failed at once.
    Permanent(BusError),
}

/// Sorts a publish result into a [`Verdict`]. A nack counts as transport trouble when the bus reports itself
/// unhealthy right after it.
pub(super) async fn verdict(bus: &dyn EventBus, result: Result<(), BusError>) -> Verdict {
    match result {
        Ok(()) => Verdict::Published,
        Err(error @ BusError::Closed) => Verdict::Transport { error, healthy: false },
        Err(error @ (BusError::Transport(_) | BusError::ConfirmationLost(_))) => {
            Verdict::Transport { error, healthy: bus.health().await.is_ok() }
        }
        Err(error @ BusError::Nacked { .. }) => match bus.health().await {
            Ok(()) => Verdict::Retryable(error),
            Err(_) => Verdict::Transport { error, healthy: false },
        },
        Err(error @ BusError::Unroutable { .. }) => Verdict::Retryable(error),
        Err(
            error @ (BusError::PayloadTooLarge { .. }
            | BusError::InvalidEnvelope { .. }
            | BusError::InvalidName { .. }
            | BusError::Serialize { .. }
            | BusError::InvalidConfig { .. }),
        ) => Verdict::Permanent(error),
        // A kind this relay does not know yet: retried with backoff, never dropped.
        Err(error) => Verdict::Retryable(error),
    }
}

/// A failed attempt to write back: the row, why, and what becomes of it.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub seq: i64,
    pub reason: String,
    pub give_up: bool,
    pub retry_in: Duration,
}

/// Outcomes waiting to be written, in the order they must be written: failures (which block their keys)
/// before releases (which free later rows of those keys), marks at any time.
#[derive(Debug, Default, Clone)]
pub(super) struct Outcomes {
    pub failures: Vec<Failure>,
    pub released: Vec<i64>,
    pub published: Vec<i64>,
    /// Whether transport trouble gave rows back (for the counters).
    pub transport_released: u64,
}

impl Outcomes {
    /// Whether these outcomes give rows back (failures or releases).
    pub fn gives_back(&self) -> bool {
        !self.failures.is_empty() || !self.released.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.failures.is_empty() && self.released.is_empty() && self.published.is_empty()
    }

    fn seqs(&self) -> impl Iterator<Item = i64> + '_ {
        self.failures.iter().map(|f| f.seq).chain(self.released.iter().copied()).chain(self.published.iter().copied())
    }
}

#[derive(Default)]
struct KeyQueue {
    waiting: VecDeque<Ready>,
    /// One of the key's rows is with the bus.
    sending: bool,
}

struct Held {
    claim: u64,
    bytes: usize,
}

/// What one write-back finished: how long its claims took, end to end (for the batch counters).
#[derive(Debug, Default)]
pub(super) struct Finished {
    pub claims: u64,
    pub claim_micros: u64,
}

/// The rows a relay holds and what it still has to write back about them.
#[derive(Default)]
pub(super) struct Pipeline {
    keys: HashMap<String, KeyQueue>,
    keyless: VecDeque<Ready>,
    held: HashMap<i64, Held>,
    held_bytes: usize,
    /// Per claim: rows not yet written back, and when it was claimed.
    claims: HashMap<u64, (usize, Instant)>,
    next_claim: u64,
    /// Keys whose rows went back, with the write-back that gives them back.
    draining: HashMap<String, u64>,
    outcomes: Outcomes,
    /// Write-backs handed out, and written.
    writes_started: u64,
    writes_done: u64,
    /// Transport errors per event on a healthy bus.
    strikes: HashMap<i64, u32>,
    /// Rows taken in lately (a hand-off of one of them is late: the claim took it first).
    taken_in: Remembered,
    /// Rows published and marked lately, with the write-back that marked them (a claim that started before that
    /// write returns them still pending; one that started after it finds them pending only because the mark was
    /// lost, a database crash with the relay's asynchronous commit, and must take them).
    published: Remembered,
    marked_by: HashMap<i64, u64>,
    /// Rows the write-back in progress gives back (released or failed).
    giving_back: std::collections::HashSet<i64>,
}

impl Pipeline {
    /// Rows held (claimed and not yet written back).
    pub fn held_rows(&self) -> usize {
        self.held.len()
    }

    /// Payload bytes held.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Every row held, for lease renewal.
    pub fn held_seqs(&self) -> Vec<i64> {
        self.held.keys().copied().collect()
    }

    /// The write-backs written so far: a claim started now sees every release written by then.
    pub fn writes_done(&self) -> u64 {
        self.writes_done
    }

    /// Takes claimed or handed-off rows in; returns how many it took. `claim_saw` is
    /// [`writes_done`](Self::writes_done) when the claim started (for a hand-off: now): rows of a key that was
    /// draining since a later write-back go back at once. A row that the claim counted past its last attempt,
    /// or that cannot be read back, fails at once.
    ///
    /// Rows it already holds are skipped (its lease lapsed and our own claim took it again: keep the copy we
    /// have), and so are rows it published lately (a claim whose statement ran before their mark) and, for a
    /// hand-off, rows it took in lately (its own claim took the fresh row before the hand-off arrived).
    pub fn accept(&mut self, rows: Vec<OutboxRow>, claim_saw: u64, retry: &RetryPolicy, source: Source) -> usize {
        let claim = self.next_claim;
        self.next_claim += 1;
        let mut taken = 0;
        for row in rows {
            if source == Source::Claim && self.held.contains_key(&row.seq) && self.giving_back.contains(&row.seq) {
                // The claim's statement ran after this row's release (or failure) was written, but the relay has
                // not seen that write finish: the row is this relay's again in the database, one more attempt
                // counted. Give it back once more, or it would stay leased to this relay, held by nobody.
                self.outcomes.released.push(row.seq);
                continue;
            }
            let raced_its_mark = match source {
                Source::Claim => self.marked_by.get(&row.seq).is_some_and(|&write| write > claim_saw),
                Source::Handoff => self.published.contains(row.seq),
            };
            if self.held.contains_key(&row.seq)
                || raced_its_mark
                || (source == Source::Handoff && self.taken_in.contains(row.seq))
            {
                continue;
            }
            self.taken_in.add(row.seq);
            taken += 1;
            let bytes = row.payload.len();
            self.held.insert(row.seq, Held { claim, bytes });
            self.held_bytes += bytes;
            let key = row.partition_key.clone();
            let attempts = u32::try_from(row.attempts).unwrap_or(0);
            let meta = RowMeta { seq: row.seq, event_id: row.event_id, attempts, key: key.clone() };
            if let Some(key) = &key
                && self.draining.get(key).is_some_and(|&write| write > claim_saw)
            {
                self.outcomes.released.push(row.seq);
                continue;
            }
            // Claimed once more than the attempts allow: the earlier claims ended without an outcome.
            let prepared = if !retry.should_retry(attempts.saturating_sub(1)) {
                Err(format!(
                    "claimed {attempts} times without an outcome: relays crashed or hung on this event (attempts \
                     allowed: {})",
                    retry.max_attempts
                ))
            } else {
                row.into_envelope().map_err(|e| e.to_string())
            };
            match prepared {
                Ok(envelope) => {
                    let ready = Ready { meta, envelope };
                    match &key {
                        Some(key) => self.keys.entry(key.clone()).or_default().waiting.push_back(ready),
                        None => self.keyless.push_back(ready),
                    }
                }
                Err(reason) => {
                    tracing::error!(seq = meta.seq, event_id = %meta.event_id, %reason, "outbox row cannot be published; marked failed");
                    self.fail(meta, reason, true, Duration::ZERO);
                }
            }
        }
        if taken > 0 {
            self.claims.insert(claim, (taken, Instant::now()));
        }
        if source == Source::Claim {
            // A claim started later sees every release written before it (a hand-off is no claim: a claim may
            // still be running that started before them).
            self.draining.retain(|_, write| *write > claim_saw);
        }
        taken
    }

    /// Gives back rows leased to this relay that it does not take in (a hand-off it cannot hold now): their
    /// attempt is not spent and they are free for any relay once written. Rows it holds or published are left.
    pub fn give_back_unheld(&mut self, seqs: impl IntoIterator<Item = i64>) {
        for seq in seqs {
            if !self.held.contains_key(&seq) && !self.published.contains(seq) {
                self.outcomes.released.push(seq);
            }
        }
    }

    /// Remembers rows published and marked (a claim that raced their mark must not take them in again).
    pub fn marked(&mut self, seqs: &[i64], write: u64) {
        for &seq in seqs {
            if let Some(forgotten) = self.published.add(seq) {
                self.marked_by.remove(&forgotten);
            }
            self.marked_by.insert(seq, write);
        }
    }

    /// The rows that may go to the bus now: every keyless row, and the next row of each key that has none
    /// with the bus.
    pub fn sendable(&mut self) -> Vec<Ready> {
        let mut out: Vec<Ready> = self.keyless.drain(..).collect();
        for queue in self.keys.values_mut().filter(|q| !q.sending) {
            if let Some(next) = queue.waiting.pop_front() {
                queue.sending = true;
                out.push(next);
            }
        }
        out.sort_unstable_by_key(|r| r.meta.seq);
        out
    }

    /// Records how a publish ended. Returns the transport error when the bus itself is in trouble (the relay
    /// then stops sending and gives everything unsent back).
    pub fn settle(&mut self, meta: RowMeta, verdict: Verdict, retry: &RetryPolicy) -> Option<BusError> {
        let verdict = match verdict {
            Verdict::Transport { error, healthy: true } => {
                if self.strikes.len() >= STRIKES_KEPT {
                    self.strikes.clear();
                }
                let strikes = self.strikes.entry(meta.seq).or_default();
                *strikes += 1;
                if *strikes >= TRANSPORT_STRIKES {
                    self.strikes.remove(&meta.seq);
                    Verdict::Retryable(BusError::ConfirmationLost(format!(
                        "{TRANSPORT_STRIKES} transport errors on this event while the bus was healthy, last: {error}"
                    )))
                } else {
                    Verdict::Transport { error, healthy: true }
                }
            }
            unhealthy @ Verdict::Transport { healthy: false, .. } => unhealthy,
            other => {
                self.strikes.remove(&meta.seq);
                other
            }
        };
        if let Some(key) = &meta.key
            && let Some(queue) = self.keys.get_mut(key)
        {
            queue.sending = false;
        }
        match verdict {
            Verdict::Published => {
                self.outcomes.published.push(meta.seq);
                if let Some(key) = &meta.key
                    && self.keys.get(key).is_some_and(|q| q.waiting.is_empty() && !q.sending)
                {
                    self.keys.remove(key);
                }
                None
            }
            Verdict::Transport { error, healthy } => {
                self.outcomes.released.push(meta.seq);
                self.outcomes.transport_released += 1;
                self.give_back_key(meta.key.as_deref());
                // On a bus that says it is healthy, only this event's key steps back (its strikes count).
                (!healthy).then_some(error)
            }
            Verdict::Retryable(error) => {
                let give_up = !retry.should_retry(meta.attempts);
                let retry_in = retry.delay(meta.attempts + 1);
                if give_up {
                    tracing::error!(seq = meta.seq, event_id = %meta.event_id, attempts = meta.attempts, %error, "publish failed for the last time; event marked failed");
                } else {
                    tracing::warn!(seq = meta.seq, event_id = %meta.event_id, attempts = meta.attempts, ?retry_in, %error, "publish failed; will retry");
                }
                self.fail(meta, error.to_string(), give_up, retry_in);
                None
            }
            Verdict::Permanent(error) => {
                tracing::error!(seq = meta.seq, event_id = %meta.event_id, %error, "the bus can never publish this event; marked failed");
                self.fail(meta, error.to_string(), true, Duration::ZERO);
                None
            }
        }
    }

    fn fail(&mut self, meta: RowMeta, reason: String, give_up: bool, retry_in: Duration) {
        self.outcomes.failures.push(Failure { seq: meta.seq, reason, give_up, retry_in });
        if let Some(key) = meta.key {
            // Its later rows must not go out before it: the key drains.
            self.give_back_key(Some(&key));
        }
    }

    /// Gives back every row of `key` not yet sent, and lets the key drain.
    fn give_back_key(&mut self, key: Option<&str>) {
        let Some(key) = key else { return };
        if let Some(queue) = self.keys.remove(key) {
            self.outcomes.released.extend(queue.waiting.into_iter().map(|r| r.meta.seq));
            if queue.sending {
                // A row of the key is still with the bus: keep the key's slot until it answers.
                self.keys.insert(key.to_owned(), KeyQueue { waiting: VecDeque::new(), sending: true });
            }
        }
        self.draining.insert(key.to_owned(), self.writes_started + 1);
    }

    /// Gives back every row not yet sent (transport trouble, or stopping).
    pub fn give_back_unsent(&mut self, transport: bool) {
        let keyless: Vec<i64> = self.keyless.drain(..).map(|r| r.meta.seq).collect();
        let before = self.outcomes.released.len();
        self.outcomes.released.extend(keyless);
        let keys: Vec<String> =
            self.keys.iter().filter(|(_, q)| !q.waiting.is_empty()).map(|(k, _)| k.clone()).collect();
        for key in keys {
            self.give_back_key(Some(&key));
        }
        if transport {
            self.outcomes.transport_released += (self.outcomes.released.len() - before) as u64;
        }
    }

    /// Drops the rows not yet sent that are no longer this relay's in the database (not in `still_held`): they
    /// are neither sent nor written back. The rows of their keys it still holds go back, and those keys drain.
    /// Returns how many rows were dropped.
    pub fn drop_lost_unsent(&mut self, still_held: &std::collections::HashSet<i64>) -> usize {
        let mut lost = Vec::new();
        self.keyless.retain(|r| {
            let keep = still_held.contains(&r.meta.seq);
            if !keep {
                lost.push(r.meta.seq);
            }
            keep
        });
        let touched: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, q)| q.waiting.iter().any(|r| !still_held.contains(&r.meta.seq)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in touched {
            // The lost rows go unsent; the ones still held go back with the rest of the key.
            if let Some(queue) = self.keys.get_mut(&key) {
                queue.waiting.retain(|r| {
                    let keep = still_held.contains(&r.meta.seq);
                    if !keep {
                        lost.push(r.meta.seq);
                    }
                    keep
                });
            }
            self.give_back_key(Some(&key));
        }
        for seq in &lost {
            self.unhold(*seq);
        }
        lost.len()
    }

    /// Forgets a held row; returns the claim it finished, if it was that claim's last row.
    fn unhold(&mut self, seq: i64) -> Option<Instant> {
        let held = self.held.remove(&seq)?;
        self.held_bytes -= held.bytes;
        let (left, started) = self.claims.get_mut(&held.claim)?;
        *left -= 1;
        if *left > 0 {
            return None;
        }
        let started = *started;
        self.claims.remove(&held.claim);
        Some(started)
    }

    /// Whether rows wait to be given back (failures or releases not yet handed to a write-back).
    pub fn gives_back(&self) -> bool {
        self.outcomes.gives_back()
    }

    /// Whether there is something to write back.
    pub fn has_outcomes(&self) -> bool {
        !self.outcomes.is_empty()
    }

    /// Hands out the outcomes gathered so far, to be written as write-back number `id`.
    pub fn take_outcomes(&mut self) -> (u64, Outcomes) {
        self.writes_started += 1;
        let outcomes = &self.outcomes;
        self.giving_back = outcomes.failures.iter().map(|f| f.seq).chain(outcomes.released.iter().copied()).collect();
        (self.writes_started, std::mem::take(&mut self.outcomes))
    }

    /// Write-back `id` is written (or given up on: the rows then wait for their lease): its rows are no
    /// longer held.
    pub fn written(&mut self, id: u64, outcomes: &Outcomes) -> Finished {
        self.writes_done = self.writes_done.max(id);
        self.giving_back.clear();
        let mut finished = Finished::default();
        let seqs: Vec<i64> = outcomes.seqs().collect();
        for seq in seqs {
            if let Some(started) = self.unhold(seq) {
                finished.claims += 1;
                finished.claim_micros += u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            }
        }
        finished
    }
}
