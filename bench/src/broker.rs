//! The benchmark's RabbitMQ: `BENCH_AMQP_URL`, else `AMQP_URL`, else the local default. Each scenario uses its
//! own exchange and a durable classic queue bound to the benchmark event type, deleted afterwards.

use bus_rabbitmq::{RabbitBus, RabbitConfig};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::payload::EVENT_TYPE;

pub fn url() -> String {
    std::env::var("BENCH_AMQP_URL")
        .or_else(|_| std::env::var("AMQP_URL"))
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// An exchange and a queue bound to the benchmark event type, on a plain lapin channel.
pub struct Sink {
    pub exchange: String,
    pub queue: String,
    pub channel: Channel,
    /// The broker as the bus sees it (several nodes, comma-separated, for a cluster).
    bus_url: String,
    queue_type: bus_rabbitmq::QueueType,
    /// Kept alive with the channel: dropping the last connection handle closes it.
    _connection: Connection,
}

impl Sink {
    pub async fn new() -> anyhow::Result<Self> {
        Self::on(&url(), bus_rabbitmq::QueueType::Classic).await
    }

    /// On the broker `urls` (the raw channel on the first node), with a queue of type `queue_type`.
    pub async fn on(urls: &str, queue_type: bus_rabbitmq::QueueType) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let (exchange, queue) = (format!("bench.{id}"), format!("bench-{id}"));
        let first = urls.split(',').next().unwrap_or(urls);
        let connection = Connection::connect(first, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .exchange_declare(
                exchange.as_str().into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let mut arguments = FieldTable::default();
        if queue_type == bus_rabbitmq::QueueType::Quorum {
            arguments.insert("x-queue-type".into(), lapin::types::AMQPValue::LongString("quorum".into()));
        }
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                arguments,
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.as_str().into(),
                EVENT_TYPE.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self { exchange, queue, channel, bus_url: urls.to_owned(), queue_type, _connection: connection })
    }

    pub async fn purge(&self) -> anyhow::Result<()> {
        self.channel.queue_purge(self.queue.as_str().into(), QueuePurgeOptions::default()).await?;
        Ok(())
    }

    pub async fn bus(&self) -> anyhow::Result<RabbitBus> {
        let mut config = RabbitConfig::new(&self.bus_url)?;
        config.exchange = self.exchange.clone();
        config.queue_type = self.queue_type;
        Ok(RabbitBus::connect(config).await?)
    }

    pub async fn delete(self) -> anyhow::Result<()> {
        self.channel.queue_delete(self.queue.as_str().into(), Default::default()).await?;
        self.channel.exchange_delete(self.exchange.as_str().into(), Default::default()).await?;
        Ok(())
    }
}
