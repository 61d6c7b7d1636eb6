//! [`Confirmation`]: the future that tells a publisher the bus has taken responsibility for an event.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use crate::error::BusError;

/// Resolves when the bus has taken responsibility for one published event (`Ok`), or cannot (`Err`): a broker
/// publisher confirm, in the manner of rdkafka's `DeliveryFuture`.
///
/// Until it resolves `Ok`, the publisher must assume the event may be lost and keep it (the outbox keeps the row
/// pending). Many confirmations can be in flight at once: publish a batch, then await them. Dropping a
/// confirmation does not cancel the publish.
#[must_use = "a publish is only safe once its confirmation resolved Ok"]
pub struct Confirmation(State);

enum State {
    Ready(Option<Result<(), BusError>>),
    Waiting(oneshot::Receiver<Result<(), BusError>>),
    Future(BoxFuture<'static, Result<(), BusError>>),
}

impl Confirmation {
    /// An already confirmed publish.
    pub fn confirmed() -> Self {
        Self(State::Ready(Some(Ok(()))))
    }

    /// An already failed publish.
    pub fn failed(error: BusError) -> Self {
        Self(State::Ready(Some(Err(error))))
    }

    /// A confirmation answered through a channel; a dropped sender resolves to [`BusError::ConfirmationLost`].
    pub fn from_receiver(receiver: oneshot::Receiver<Result<(), BusError>>) -> Self {
        Self(State::Waiting(receiver))
    }

    /// A confirmation answered by a future.
    pub fn from_future(future: impl Future<Output = Result<(), BusError>> + Send + 'static) -> Self {
        Self(State::Future(Box::pin(future)))
    }

    /// A channel pair: answer through the sender, hand the confirmation to the publisher.
    pub fn channel() -> (oneshot::Sender<Result<(), BusError>>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Self::from_receiver(rx))
    }
}

impl Future for Confirmation {
    type Output = Result<(), BusError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            State::Ready(result) => Poll::Ready(
                result.take().unwrap_or_else(|| Err(BusError::ConfirmationLost("polled after completion".into()))),
            ),
            State::Waiting(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| Err(BusError::ConfirmationLost("the bus dropped the event unanswered".into())))
            }),
            State::Future(fut) => fut.as_mut().poll(cx),
        }
    }
}

impl fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.0 {
            State::Ready(_) => "ready",
            State::Waiting(_) | State::Future(_) => "pending",
        };
        f.debug_tuple("Confirmation").field(&state).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropped_sender_is_an_error_not_a_success() {
        let (tx, confirmation) = Confirmation::channel();
        drop(tx);
        assert!(matches!(confirmation.await, Err(BusError::ConfirmationLost(_))));
    }

    #[tokio::test]
    async fn answered_through_the_channel() {
        let (tx, confirmation) = Confirmation::channel();
        tx.send(Ok(())).unwrap();
        assert!(confirmation.await.is_ok());
        assert!(Confirmation::failed(BusError::Closed).await.is_err());
        assert!(Confirmation::from_future(async { Ok(()) }).await.is_ok());
    }
}
