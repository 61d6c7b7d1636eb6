//! A partitioned group's instance: consumes the partitions its [`Membership`] view assigns to it, and gives up
//! the ones it no longer owns in order ([`Handover::InOrder`]).
//!
//! Per-key order across instances rests on three facts: a key always goes to the same partition (its
//! `partition-bucket` header, routed by a fixed headers-exchange binding per bucket); a partition queue delivers to one consumer at
//! a time (single active consumer); and an instance lets go of a partition only after every delivery it took
//! from it is finished, by closing the channel, which returns the rest to their places before the next consumer
//! is activated. A crashed instance's connection closes, which does the same. Within an instance, deliveries of
//! one key are handled one after the other (as for any queue), other keys in parallel.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use bus_core::BusError;
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Handover, Instance};
use crate::confirms::ConfirmedChannel;
use crate::link::Session;
use crate::membership::Membership;
use crate::topology;

/// Runs until `stop` (`Ok`, after every partition was handed over) or until the session fails.
pub(crate) async fn run(
    instance: &Arc<Instance>,
    session: &Arc<Session>,
    side: &Arc<ConfirmedChannel>,
    permits: &Arc<Semaphore>,
    stop: &CancellationToken,
    partitions: u16,
) -> Result<(), BusError> {
    let config = &instance.config;
    let group = &instance.group;
    let membership = Membership::join(
        session,
        group,
        instance.member_id.clone(),
        config.membership_heartbeat,
        config.member_timeout,
    )
    .await?;
    let mut live = membership.live();
    tracing::info!(%group, member = %instance.member_id, partitions, generation = session.generation, "joined the group");
    // Hear from the others before taking anything, so that a new instance does not first grab every partition.
    tokio::select! {
        () = stop.cancelled() => {}
        () = tokio::time::sleep(config.membership_heartbeat * 2) => {}
    }
    let mut owned: HashMap<u16, CancellationToken> = HashMap::new();
    let mut consumers: JoinSet<(u16, Result<(), BusError>)> = JoinSet::new();
    let mut health = tokio::time::interval(std::time::Duration::from_millis(250));
    let outcome = loop {
        if stop.is_cancelled() {
            break Ok(());
        }
        let wanted = membership.assignment(&live.borrow_and_update(), partitions);
        rebalance(instance, session, side, permits, &wanted, &mut owned, &mut consumers);
        tokio::select! {
            () = stop.cancelled() => break Ok(()),
            changed = live.changed() => {
                if changed.is_err() || !session.healthy() {
                    break Err(BusError::Transport("the connection to the broker was lost".into()));
                }
            }
            _ = health.tick() => {
                if !session.healthy() {
                    break Err(BusError::Transport("the connection to the broker was lost".into()));
                }
            }
            Some(finished) = consumers.join_next() => match finished {
                Ok((partition, Ok(()))) => {
                    // Handed over; if it is wanted again, the next round takes it back.
                    tracing::debug!(%group, partition, "partition handed over");
                    owned.remove(&partition);
                }
                Ok((partition, Err(error))) => {
                    tracing::debug!(%group, partition, %error, "partition consumer failed");
                    owned.remove(&partition);
                    break Err(error);
                }
                Err(join) => break Err(BusError::Transport(format!("partition consumer task failed: {join}").into())),
            },
        }
    };
    // Leaving (or the session failed): tell the others first so that they subscribe and wait, then let go of
    // every partition in order.
    membership.leave(config.member_timeout).await;
    for token in owned.values() {
        token.cancel();
    }
    while let Some(finished) = consumers.join_next().await {
        if let Ok((partition, Err(error))) = finished {
            tracing::debug!(%group, partition, %error, "partition consumer ended with an error");
        }
    }
    outcome
}

/// Starts consumers for the partitions in `wanted` this instance does not hold, and tells the ones it holds but
/// no longer wants to hand over. A partition being handed over is started again only once it is released
/// (its consumer's task ended): it is then no longer in `owned`.
fn rebalance(
    instance: &Arc<Instance>,
    session: &Arc<Session>,
    side: &Arc<ConfirmedChannel>,
    permits: &Arc<Semaphore>,
    wanted: &BTreeSet<u16>,
    owned: &mut HashMap<u16, CancellationToken>,
    consumers: &mut JoinSet<(u16, Result<(), BusError>)>,
) {
    for (partition, token) in owned.iter() {
        if !wanted.contains(partition) && !token.is_cancelled() {
            tracing::info!(group = %instance.group, partition, "handing the partition over");
            token.cancel();
        }
    }
    for &partition in wanted {
        if owned.contains_key(&partition) {
            continue;
        }
        let token = CancellationToken::new();
        owned.insert(partition, token.clone());
        let (instance, session, side, permits) = (instance.clone(), session.clone(), side.clone(), permits.clone());
        tracing::info!(group = %instance.group, partition, "taking the partition");
        consumers.spawn(async move {
            let queue = topology::partition_queue(&instance.group, partition);
            let result = instance
                .consume_queue(&session, &queue, FieldTable::default(), &side, &permits, &token, Handover::InOrder)
                .await;
            (partition, result)
        });
    }
}
