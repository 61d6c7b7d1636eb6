//! The supervised broker connection: connects, declares the exchange, opens the confirm-mode publishing channel,
//! and when the connection or that channel dies, reconnects with backoff. Every state change is logged once,
//! with the URL's password redacted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bus_core::BusError;
use lapin::options::{ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::RabbitConfig;
use crate::confirms::ConfirmedChannel;

/// One live connection and its publishing channel.
pub(crate) struct Session {
    pub(crate) connection: Connection,
    /// The confirm-mode channel events are published on, with its ordered confirm path.
    pub(crate) publisher: Arc<ConfirmedChannel>,
    pub(crate) generation: u64,
}

impl Session {
    pub(crate) fn healthy(&self) -> bool {
        self.connection.status().connected() && self.publisher.channel().status().connected()
    }
}

pub(crate) struct Link {
    config: Arc<RabbitConfig>,
    current: watch::Sender<Option<Arc<Session>>>,
    trouble: Notify,
    generation: AtomicU64,
    /// The node of the cluster to try first at the next connection.
    next_node: std::sync::atomic::AtomicUsize,
    stop: CancellationToken,
    /// Cancelled when the supervisor is done (connection closed).
    closed: CancellationToken,
}

/// `delay` shortened by up to half at random, so that many clients that lost the broker together do not all
/// come back at the same instant.
pub(crate) fn jittered(delay: Duration) -> Duration {
    delay.mul_f64(1.0 - 0.5 * fastrand::f64())
}

pub(crate) fn transport(error: impl std::error::Error + Send + Sync + 'static) -> BusError {
    BusError::Transport(Box::new(error))
}

impl Link {
    pub(crate) fn start(config: Arc<RabbitConfig>, stop: CancellationToken) -> Arc<Self> {
        let link = Arc::new(Self {
            config,
            current: watch::channel(None).0,
            trouble: Notify::new(),
            generation: AtomicU64::new(0),
            next_node: std::sync::atomic::AtomicUsize::new(0),
            stop,
            closed: CancellationToken::new(),
        });
        tokio::spawn(link.clone().supervise());
        link
    }

    /// The live session, waiting up to `timeout` while (re)connecting.
    pub(crate) async fn session(&self, timeout: Duration) -> Result<Arc<Session>, BusError> {
        let mut current = self.current.subscribe();
        let wait = current.wait_for(|s| s.as_ref().is_some_and(|s| s.healthy()));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(session)) => session.clone().ok_or(BusError::Closed),
            Ok(Err(_)) => Err(BusError::Closed),
            Err(_) => Err(BusError::Transport(
                format!("no connection to RabbitMQ at {} within {timeout:?}", self.config.url).into(),
            )),
        }
    }

    /// Waits for a healthy session, until `stop`.
    pub(crate) async fn next_session(&self, stop: &CancellationToken) -> Option<Arc<Session>> {
        let mut current = self.current.subscribe();
        tokio::select! {
            () = stop.cancelled() => None,
            session = current.wait_for(|s| s.as_ref().is_some_and(|s| s.healthy())) => {
                session.ok().and_then(|s| s.clone())
            }
        }
    }

    /// Connections established so far.
    pub(crate) fn connections(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Something failed on the session: have the supervisor check it now.
    pub(crate) fn report_trouble(&self) {
        self.trouble.notify_one();
    }

    async fn connect(&self) -> Result<Session, lapin::Error> {
        let properties =
            ConnectionProperties::default().with_connection_name(self.config.connection_name.as_str().into());
        // Round robin over the cluster's nodes, starting after the one that worked last: a node that died is tried
        // last, not first.
        let nodes = self.config.url.nodes();
        let start = self.next_node.load(Ordering::Relaxed);
        let mut offset = 0;
        let connection = loop {
            let (raw, shown) = self.config.url.node(start + offset);
            match Connection::connect(raw, properties.clone()).await {
                Ok(connection) => {
                    // After a loss, the next attempt starts with the node after this one.
                    self.next_node.store((start + offset + 1) % nodes, Ordering::Relaxed);
                    if nodes > 1 {
                        tracing::info!(node = shown, "connected to RabbitMQ node");
                    }
                    break connection;
                }
                Err(error) if offset + 1 < nodes => {
                    tracing::info!(node = shown, %error, "RabbitMQ node unreachable; trying the next one");
                    offset += 1;
                }
                Err(error) => return Err(error),
            }
        };
        let publisher = connection.create_channel().await?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await?;
        publisher
            .exchange_declare(
                self.config.exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() },
                FieldTable::default(),
            )
            .await?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Session { connection, publisher: ConfirmedChannel::new(publisher), generation })
    }

    async fn supervise(self: Arc<Self>) {
        let (first, longest) = self.config.reconnect_delay;
        let mut delay = first;
        let mut failures = 0u32;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            let session = tokio::select! {
                () = self.stop.cancelled() => break,
                session = self.connect() => session,
            };
            match session {
                Ok(session) => {
                    let session = Arc::new(session);
                    tracing::info!(url = %self.config.url, generation = session.generation, "connected to RabbitMQ");
                    self.current.send_replace(Some(session.clone()));
                    delay = first;
                    failures = 0;
                    loop {
                        tokio::select! {
                            () = self.stop.cancelled() => break,
                            () = self.trouble.notified() => {}
                            () = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                        if !session.healthy() {
                            break;
                        }
                    }
                    self.current.send_replace(None);
                    if self.stop.is_cancelled() {
                        // Bounded: a half-dead connection may never answer the close.
                        let close = session.connection.close(200, "shutdown".into());
                        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
                        break;
                    }
                    tracing::warn!(url = %self.config.url, generation = session.generation, "RabbitMQ connection lost; reconnecting");
                    let _ = session.connection.close(320, "reconnecting".into()).await;
                }
                Err(error) => {
                    failures += 1;
                    // Log the first failure and then every tenth, not every attempt.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(url = %self.config.url, %error, attempts = failures, ?delay, "cannot connect to RabbitMQ; retrying");
                    }
                    tokio::select! {
                        () = self.stop.cancelled() => break,
                        () = tokio::time::sleep(jittered(delay)) => {}
                    }
                    delay = (delay * 2).min(longest);
                }
            }
        }
        self.current.send_replace(None);
        tracing::info!(url = %self.config.url, "RabbitMQ connection closed");
        self.closed.cancel();
    }

    /// Resolves once the supervisor has stopped and closed the connection (after its `stop`).
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await;
    }
}
