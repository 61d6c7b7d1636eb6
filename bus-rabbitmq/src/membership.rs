//! Who the live instances of a partitioned group are, and which partitions this one should consume.
//!
//! Every instance declares an exclusive queue bound to the fanout exchange `<group>.members` and publishes a
//! heartbeat there every `heartbeat` (its member id in the `x-member` header; the message expires after
//! `member_timeout`). An instance is live while its heartbeats keep arriving within `member_timeout`; one that
//! stops gracefully says so (`x-leaving`) and is dropped at once. Each instance sorts the live ids and takes the
//! partitions `p` with `p mod live == its rank`: the views agree once heartbeats have gone round, so every
//! partition has one owner and the partitions are spread evenly.
//!
//! The view is only a plan. What makes order safe is the broker: each partition queue has a *single active
//! consumer*, so while two views disagree two instances may both subscribe to a partition, but only the first
//! one receives; the other waits until the first lets go (its channel closes) and then gets the partition's
//! messages from where the first stopped.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bus_core::{BusError, GroupName};
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, ExchangeKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::link::{Session, transport};
use crate::topology;

const H_MEMBER: &str = "x-member";
/// How long leaving may take on a connection that may be dead.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);
const H_LEAVING: &str = "x-leaving";

/// This instance's membership in its group, for as long as the session lives.
pub(crate) struct Membership {
    me: String,
    live: watch::Receiver<Vec<String>>,
    channel: Channel,
    exchange: String,
    stop: CancellationToken,
}

impl Membership {
    /// Joins `group` on `session` as `me`: declares the exchange and this instance's queue, starts the heartbeat
    /// and the listener. Both stop when the membership is dropped or the session dies.
    pub(crate) async fn join(
        session: &Session,
        group: &GroupName,
        me: String,
        heartbeat: Duration,
        member_timeout: Duration,
    ) -> Result<Self, BusError> {
        let channel = session.connection.create_channel().await.map_err(transport)?;
        let exchange = topology::membership_exchange(group);
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(transport)?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() },
                FieldTable::default(),
            )
            .await
            .map_err(transport)?;
        channel
            .queue_bind(
                queue.name().as_str().into(),
                exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(transport)?;
        let heartbeats = channel
            .basic_consume(
                queue.name().as_str().into(),
                format!("{me}-members").as_str().into(),
                BasicConsumeOptions { no_ack: true, ..BasicConsumeOptions::default() },
                FieldTable::default(),
            )
            .await
            .map_err(transport)?;
        let stop = CancellationToken::new();
        let (view_tx, live) = watch::channel(vec![me.clone()]);
        let membership = Self { me: me.clone(), live, channel: channel.clone(), exchange, stop: stop.clone() };
        membership.announce(false, member_timeout).await;
        tokio::spawn(listen(heartbeats, me.clone(), member_timeout, view_tx, stop.clone()));
        let (beat, exchange) = (channel, membership.exchange.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if publish(&beat, &exchange, &me, false, member_timeout).await.is_err() {
                    return; // the session died; the next one joins again
                }
            }
        });
        Ok(membership)
    }

    /// The live members, sorted; changes as instances come and go.
    pub(crate) fn live(&self) -> watch::Receiver<Vec<String>> {
        self.live.clone()
    }

    /// The partitions (of `partitions`) this instance should consume with the members `live`.
    pub(crate) fn assignment(&self, live: &[String], partitions: u16) -> BTreeSet<u16> {
        assignment(live, &self.me, partitions)
    }

    /// Tells the others this instance is leaving, so they take over its partitions without waiting for the
    /// timeout; then stops the heartbeat.
    pub(crate) async fn leave(self, member_timeout: Duration) {
        // Announce before stopping the listener (its queue goes with it). Bounded: on a connection that died
        // without a clean close, neither would ever complete.
        let _ = tokio::time::timeout(LEAVE_TIMEOUT, self.announce(true, member_timeout)).await;
        self.stop.cancel();
        let _ = tokio::time::timeout(LEAVE_TIMEOUT, self.channel.close(200, "OK".into())).await;
    }

    async fn announce(&self, leaving: bool, member_timeout: Duration) {
        if let Err(error) = publish(&self.channel, &self.exchange, &self.me, leaving, member_timeout).await {
            tracing::debug!(%error, leaving, "membership announcement not sent");
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `p mod live.len() == rank of me in live` (`live` sorted); nothing if `me` is not in `live`.
pub(crate) fn assignment(live: &[String], me: &str, partitions: u16) -> BTreeSet<u16> {
    match live.iter().position(|m| m == me) {
        Some(rank) => (0..partitions).filter(|p| usize::from(*p) % live.len() == rank).collect(),
        None => BTreeSet::new(),
    }
}

async fn publish(
    channel: &Channel,
    exchange: &str,
    me: &str,
    leaving: bool,
    member_timeout: Duration,
) -> Result<(), lapin::Error> {
    let mut headers = FieldTable::default();
    headers.insert(H_MEMBER.into(), AMQPValue::LongString(LongString::from(me.as_bytes().to_vec())));
    headers.insert(H_LEAVING.into(), AMQPValue::Boolean(leaving));
    // A heartbeat older than the timeout says nothing: let the broker drop it rather than deliver it late.
    let properties = BasicProperties::default()
        .with_headers(headers)
        .with_expiration(member_timeout.as_millis().max(1).to_string().into());
    channel.basic_publish(exchange.into(), "".into(), BasicPublishOptions::default(), b"", properties).await?;
    Ok(())
}

async fn listen(
    mut heartbeats: lapin::Consumer,
    me: String,
    member_timeout: Duration,
    view: watch::Sender<Vec<String>>,
    stop: CancellationToken,
) {
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut prune = tokio::time::interval(member_timeout / 4);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = prune.tick() => {}
            next = heartbeats.next() => match next {
                Some(Ok(delivery)) => {
                    let headers = delivery.properties.headers().as_ref();
                    let member = headers.and_then(|h| match h.inner().get(H_MEMBER) {
                        Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).ok(),
                        _ => None,
                    });
                    let leaving = headers.is_some_and(|h| matches!(h.inner().get(H_LEAVING), Some(AMQPValue::Boolean(true))));
                    match member {
                        Some(member) if member == me => {}
                        Some(member) if leaving => { seen.remove(&member); }
                        Some(member) => { seen.insert(member, Instant::now()); }
                        None => {}
                    }
                }
                // The session died: the instance stops consuming and joins again on the next one.
                _ => return,
            },
        }
        seen.retain(|_, at| at.elapsed() < member_timeout);
        let mut live: Vec<String> = seen.keys().cloned().chain(std::iter::once(me.clone())).collect();
        live.sort();
        view.send_if_modified(|current| {
            if *current == live {
                false
            } else {
                *current = live;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i}")).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner_and_shares_are_even() {
        for partitions in [1u16, 3, 12, 256] {
            for n in 1..=7 {
                let live = members(n);
                let mut owners = vec![0; usize::from(partitions)];
                let mut shares = Vec::new();
                for me in &live {
                    let mine = assignment(&live, me, partitions);
                    shares.push(mine.len());
                    for p in mine {
                        owners[usize::from(p)] += 1;
                    }
                }
                assert!(owners.iter().all(|&o| o == 1), "{partitions} partitions over {n}: {owners:?}");
                let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(max - min <= 1, "{shares:?}");
            }
        }
    }

    #[test]
    fn a_stranger_owns_nothing() {
        assert!(assignment(&members(3), "other", 12).is_empty());
    }
}
