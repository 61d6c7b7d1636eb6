//! Direct dispatch (PostgreSQL): a transaction whose commit the outbox sees ([`Outbox::begin`], the inbox's
//! transaction) hands its fresh rows to a relay of its own process right after the commit, with no claim round
//! trip.
//!
//! # How it keeps the relay's guarantees
//! - **The rows are the relay's before they commit.** The insert writes them already leased to the relay that
//!   offered itself (its id, the key of its liveness lock, a lease, one attempt counted), exactly as its claim
//!   would. Nothing else can take them while that relay lives; if the process dies after the commit, the
//!   liveness lock goes with it and every other relay may claim them at once. No loss, and no second relay
//!   publishes them while the first is alive: no duplicate in normal operation.
//! - **Only a key's head goes direct.** A keyed row is leased at insert only when its key has no earlier
//!   pending or failed row (other than rows leased the same way earlier in the same transaction). Otherwise it
//!   is written unleased and takes the ordinary claim, which publishes it after its predecessors. So a direct
//!   row never overtakes an earlier row of its key, in this relay or any other. (As for the claim, rows of one
//!   key written by concurrent transactions that do not serialize on a business row have no order between
//!   them; a transaction that waited for another's row lock sees its committed rows.)
//! - **A hand-off that goes wrong costs only latency.** The hand-off is a bounded channel. When it is full
//!   (the producer then wakes the relays) the rows stay leased to the relay but not held, and its claim takes
//!   them once they are a second old (younger ones are presumed on their way: a claim must not take a row twice
//!   over). A hand-off the relay cannot take in (full, paused, stopping, its liveness proof changed) is given
//!   back at once with no attempt spent. A relay that already holds or published a row ignores a late
//!   hand-off of it. Before the commit the producer checks that its leased rows are all still there: an
//!   aborted transaction (which PostgreSQL rolls back on COMMIT without an error) or a rolled-back savepoint
//!   hands nothing over. At most `relay.batch_size` rows of one transaction are leased.
//! - **Isolation.** Rows are leased only by READ COMMITTED transactions (a stricter snapshot could miss an
//!   earlier row of the key); the lease runs from the insert.
//! - **A relay accepts while it can publish**: it offers itself only while it has a fresh liveness proof, the
//!   bus is healthy, it holds fewer rows and bytes than its pipeline allows, and it is not stopping.
//!
//! Scheduled events, events enqueued through a connection of the caller's own ([`Outbox::enqueue`]) and SQLite
//! keep the ordinary wake-up and claim.
//!
//! [`Outbox::begin`]: crate::Outbox::begin
//! [`Outbox::enqueue`]: crate::Outbox::enqueue

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::backend::Owner;
use crate::row::OutboxRow;

/// Hand-offs a relay may have waiting before producers fall back to waking it.
const HANDOFF_QUEUE: usize = 4_096;

/// Rows handed to a relay, leased to it as `owner` when they were inserted.
pub(crate) struct Handoff {
    pub(crate) owner: Owner,
    pub(crate) rows: Vec<OutboxRow>,
}

/// A relay offering to take rows directly: what producers lease their rows to.
pub(crate) struct DirectTarget {
    relay: Uuid,
    lease: Duration,
    /// Rows one transaction may lease (the relay's batch size).
    per_transaction: usize,
    /// The owner rows are leased to while the relay accepts; `None` while it does not.
    accepting: Mutex<Option<Owner>>,
    sender: mpsc::Sender<Handoff>,
}

impl DirectTarget {
    /// A relay's target and the receiving end of its hand-offs.
    pub(crate) fn new(relay: Uuid, lease: Duration, per_transaction: usize) -> (Arc<Self>, mpsc::Receiver<Handoff>) {
        let (sender, receiver) = mpsc::channel(HANDOFF_QUEUE);
        (Arc::new(Self { relay, lease, per_transaction, accepting: Mutex::new(None), sender }), receiver)
    }

    /// Rows one transaction may lease to this relay.
    pub(crate) fn per_transaction(&self) -> usize {
        self.per_transaction
    }

    /// Sets whether (and as whom) the relay takes rows now.
    pub(crate) fn accept_as(&self, owner: Option<Owner>) {
        *self.accepting.lock().unwrap_or_else(|p| p.into_inner()) = owner;
    }

    fn accepting(&self) -> Option<Owner> {
        *self.accepting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lease rows get at insert.
    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// Hands committed rows over; `false` when the relay cannot take them now (they wait for its claim).
    fn hand_off(&self, owner: Owner, rows: Vec<OutboxRow>) -> bool {
        self.sender.try_send(Handoff { owner, rows }).is_ok()
    }
}

/// Where an outbox finds the relay of its process that takes rows directly (at most one at a time).
#[derive(Default)]
pub(crate) struct DirectSlot {
    target: Mutex<Option<Arc<DirectTarget>>>,
}

impl DirectSlot {
    /// The relay to lease fresh rows to, and as whom, if one accepts now.
    pub(crate) fn current(&self) -> Option<(Arc<DirectTarget>, Owner)> {
        let target = self.target.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        let owner = target.accepting()?;
        Some((target, owner))
    }

    /// Offers `target` (kept if the slot is free or already its own).
    pub(crate) fn offer(&self, target: &Arc<DirectTarget>) {
        let mut slot = self.target.lock().unwrap_or_else(|p| p.into_inner());
        let vacant = slot.as_ref().is_none_or(|t| t.relay == target.relay || t.sender.is_closed());
        if vacant {
            *slot = Some(target.clone());
        }
    }

    /// Withdraws relay `relay`'s offer (it stops).
    pub(crate) fn withdraw(&self, relay: Uuid) {
        let mut slot = self.target.lock().unwrap_or_else(|p| p.into_inner());
        if slot.as_ref().is_some_and(|t| t.relay == relay) {
            *slot = None;
        }
    }
}

/// What a transaction enqueued, and what it has to do once it commits.
#[derive(Default)]
pub(crate) struct Dispatch {
    /// Rows written, leased or not.
    pub(crate) enqueued: usize,
    /// Rows written unleased: the relays must be woken to claim them.
    pub(crate) unleased: usize,
    /// Rows leased to `target` as the given owner, in outbox order.
    pub(crate) leased: Vec<OutboxRow>,
    pub(crate) target: Option<(Arc<DirectTarget>, Owner)>,
    /// A statement the outbox did not make itself ran on the transaction after a row was leased, or one of its
    /// own failed: it may have aborted the transaction or rolled back a savepoint holding leased rows, so they
    /// are checked before the commit. Otherwise they are known to be there (no round trip spent).
    pub(crate) unverified: bool,
}

impl Dispatch {
    /// Whether another row may be leased in this transaction (at most `limit` per transaction: a relay holds
    /// a bounded number of rows).
    pub(crate) fn may_lease(&self, limit: usize) -> bool {
        self.leased.len() < limit
    }

    /// The leased rows are not (all) there any more (the transaction aborted, or a savepoint rolled some back):
    /// hand nothing over, wake the relays instead (their claims find whatever commits).
    pub(crate) fn forget_leased(&mut self) {
        self.unleased += self.leased.len();
        self.leased.clear();
        self.target = None;
    }

    /// The caller reached the transaction's connection (or an outbox statement failed): if rows are leased
    /// already, they must be checked before the commit.
    pub(crate) fn touched(&mut self) {
        if !self.leased.is_empty() {
            self.unverified = true;
        }
    }

    /// The sequence numbers of the leased rows.
    pub(crate) fn leased_seqs(&self) -> Vec<i64> {
        self.leased.iter().map(|r| r.seq).collect()
    }

    /// After the commit: hands the leased rows over. Returns whether the relays must still be woken (rows
    /// written unleased, or a hand-off the relay could not take).
    pub(crate) fn after_commit(self) -> bool {
        let mut wake = self.unleased > 0;
        if let Some((target, owner)) = self.target
            && !self.leased.is_empty()
        {
            wake |= !target.hand_off(owner, self.leased);
        }
        wake
    }
}
