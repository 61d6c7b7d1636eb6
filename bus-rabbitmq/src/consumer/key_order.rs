//! Per-key sequencing: deliveries with the same partition key are handled one after the other, in arrival
//! order, each only once its predecessor is settled; deliveries of other keys (or without a key) run in
//! parallel, up to the instance's concurrency.

use std::sync::Arc;

use futures::FutureExt;
use lapin::message::Delivery;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

use super::{Instance, Lane};
use crate::wire;

impl Instance {
    pub(super) fn dispatch(self: &Arc<Self>, delivery: Delivery, lane: &Arc<Lane>, tasks: &TaskTracker) {
        let decoded = wire::envelope(&delivery.properties, &delivery.data, self.config.max_payload_bytes);
        // Register in the key's line now, in arrival order; wait for the predecessor inside the task.
        let (done, predecessor, key) = match decoded.as_ref().ok().and_then(|e| e.partition_key()) {
            Some(key) => {
                let (done, finished) = oneshot::channel::<bool>();
                let finished = finished.shared();
                let previous =
                    lane.tails.lock().unwrap_or_else(|p| p.into_inner()).insert(key.to_owned(), finished.clone());
                (Some((done, finished)), previous, Some(key.to_owned()))
            }
            None => (None, None, None),
        };
        let (this, lane) = (self.clone(), lane.clone());
        tasks.spawn(async move {
            let predecessor_settled = match predecessor {
                Some(previous) => previous.await.unwrap_or(false),
                None => true,
            };
            // A delivery whose predecessor was not settled stays unacknowledged too: both go back to the queue, in
            // order, when the channel closes (the consumer is stopping or restarting).
            let settled = predecessor_settled && {
                match lane.permits.clone().acquire_owned().await {
                    // A broken lane's deliveries go back to the queue: never start one.
                    Ok(permit) if !lane.broken.is_cancelled() => this.handle(delivery, decoded, &lane, permit).await,
                    _ => false,
                }
            };
            if let (Some((done, finished)), Some(key)) = (done, key) {
                let _ = done.send(settled);
                let mut tails = lane.tails.lock().unwrap_or_else(|p| p.into_inner());
                if tails.get(&key).is_some_and(|tail| tail.ptr_eq(&finished)) {
                    tails.remove(&key);
                }
            }
        });
    }
}
