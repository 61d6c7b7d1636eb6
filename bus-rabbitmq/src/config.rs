//! [`RabbitConfig`]: connection and topology settings, validated at start-up; the URL's password never appears
//! in `Debug`, `Display` or logs.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bus_core::{BusError, DEFAULT_MAX_PAYLOAD_BYTES, RetryPolicy};
use lapin::uri::AMQPUri;

/// The broker's address: one `amqp://` or `amqps://` URL, or several separated by commas, one per node of a
/// cluster (`amqp://u:p@node1:5672/%2f,amqp://u:p@node2:5672/%2f`). The bus connects to the first node that
/// answers, and after a connection loss tries the next one first (round robin), so a cluster survives the loss
/// of the node it was connected to. Shown with every password replaced by `***`.
#[derive(Clone)]
pub struct AmqpUrl {
    nodes: Vec<Node>,
}

#[derive(Clone)]
struct Node {
    raw: String,
    redacted: String,
}

/// At most this many nodes in one [`AmqpUrl`].
const MAX_NODES: usize = 16;

impl AmqpUrl {
    /// Parses and checks `url` (one URL, or several separated by commas).
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] naming `AMQP_URL` (and which node, for a list); the message never repeats the
    /// URL (it may hold a password).
    pub fn parse(url: &str) -> Result<Self, BusError> {
        let parts: Vec<&str> = url.split(',').map(str::trim).collect();
        if parts.len() > MAX_NODES {
            return Err(BusError::invalid_config("AMQP_URL", format!("at most {MAX_NODES} nodes")));
        }
        let mut nodes = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            let which =
                if parts.len() > 1 { format!("node {} of {}: ", index + 1, parts.len()) } else { String::new() };
            let invalid = |reason: &str| BusError::invalid_config("AMQP_URL", format!("{which}{reason}"));
            if !(part.starts_with("amqp://") || part.starts_with("amqps://")) {
                return Err(invalid("must start with amqp:// or amqps://"));
            }
            // The parser's own error text quotes the whole URL: never pass it on.
            let uri = AMQPUri::from_str(part).map_err(|_| invalid("is not a valid AMQP URL"))?;
            let scheme = if part.starts_with("amqps://") { "amqps" } else { "amqp" };
            let user = &uri.authority.userinfo.username;
            let redacted = format!(
                "{scheme}://{}{}:{}/{}",
                if user.is_empty() { String::new() } else { format!("{user}:***@") },
                uri.authority.host,
                uri.authority.port,
                uri.vhost.replace('/', "%2f"),
            );
            nodes.push(Node { raw: (*part).to_owned(), redacted });
        }
        Ok(Self { nodes })
    }

    /// How many nodes it names.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Node `index` (modulo the count): the URL to connect with, and how to show it.
    pub(crate) fn node(&self, index: usize) -> (&str, &str) {
        let node = &self.nodes[index % self.nodes.len()];
        (&node.raw, &node.redacted)
    }

    #[cfg(test)]
    pub(crate) fn expose(&self) -> String {
        self.nodes.iter().map(|n| n.raw.as_str()).collect::<Vec<_>>().join(",")
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.nodes.iter().map(|n| n.redacted.as_str()).collect::<Vec<_>>().join(","))
    }
}

/// Queue type of the queues we declare.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueueType {
    /// Classic durable queues (the default).
    #[default]
    Classic,
    /// Quorum queues (replicated; the path past one node).
    Quorum,
}

impl QueueType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Quorum => "quorum",
        }
    }
}

/// Settings of a [`RabbitBus`](crate::RabbitBus).
#[derive(Clone, Debug)]
pub struct RabbitConfig {
    /// The broker URL (`AMQP_URL`).
    pub url: AmqpUrl,
    /// The topic exchange events are published to. Default `bus.events`.
    pub exchange: String,
    /// Queue type of declared queues.
    pub queue_type: QueueType,
    /// Unacknowledged deliveries held at once per consumed queue (AMQP prefetch): an instance of an unpartitioned
    /// group holds at most this many, an instance of a partitioned group this many *per partition it owns*.
    /// Deliveries waiting behind a key that retries in place count here. Default 64.
    pub prefetch: u16,
    /// Events a subscription instance handles at once, unless its subscription says otherwise. Default 8.
    pub concurrency: usize,
    /// Retry policy of groups whose subscription sets none (delays go through `<queue>.retry`).
    pub retry: RetryPolicy,
    /// Publishes awaiting their broker confirm at once; a publisher waits for room beyond it. Default 256.
    pub confirm_window: usize,
    /// Largest payload published or accepted, in bytes. Default 256 KiB.
    pub max_payload_bytes: usize,
    /// How long a publish, and a `subscribe`, waits for a connection while the broker is unreachable before
    /// failing. Default 5 s.
    pub publish_timeout: Duration,
    /// First and longest delay between reconnection attempts. Defaults 100 ms and 5 s.
    pub reconnect_delay: (Duration, Duration),
    /// How often an instance of a partitioned group tells the others it is alive. Default 500 ms.
    pub membership_heartbeat: Duration,
    /// How long an instance of a partitioned group is counted as live after its last heartbeat; its partitions
    /// move to the others after that (at once when it stops gracefully). At least twice the heartbeat.
    /// Default 3 s.
    pub member_timeout: Duration,
    /// An event type that no instance of a group has bound for this long is unbound from the group (instances
    /// refresh what they handle every third of it; see the topology docs). Default 30 minutes.
    pub stale_binding_grace: Duration,
    /// How long stopping a subscription waits for its handlers in progress before closing their channel anyway
    /// (their deliveries, unacknowledged, go back to the queue; a handler that never returns must not hold a
    /// deploy for ever). Default 30 s.
    pub stop_timeout: Duration,
    /// A message the broker has delivered this many times without its being settled (acknowledged, retried or
    /// dead-lettered) is dead-lettered at its next delivery, as permanent: it most likely crashes or hangs its
    /// consumer, and would otherwise come back for ever. Counted by quorum queues only (`x-delivery-count`);
    /// a handover or reconnection counts too, hence a generous default: 20.
    pub redelivery_limit: u32,
    /// The name the connection shows in the broker's management UI and `rabbitmqctl list_connections` (the
    /// service's name, say). Default `bus-rabbitmq`.
    pub connection_name: String,
}

impl RabbitConfig {
    /// Defaults for the broker at `url`.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] naming `AMQP_URL` for a malformed URL.
    pub fn new(url: &str) -> Result<Self, BusError> {
        Ok(Self {
            url: AmqpUrl::parse(url)?,
            exchange: "bus.events".into(),
            queue_type: QueueType::Classic,
            prefetch: 64,
            concurrency: 8,
            retry: RetryPolicy::default(),
            confirm_window: 256,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            publish_timeout: Duration::from_secs(5),
            reconnect_delay: (Duration::from_millis(100), Duration::from_secs(5)),
            membership_heartbeat: Duration::from_millis(500),
            member_timeout: Duration::from_secs(3),
            stale_binding_grace: Duration::from_secs(30 * 60),
            stop_timeout: Duration::from_secs(30),
            redelivery_limit: 20,
            connection_name: "bus-rabbitmq".into(),
        })
    }

    /// Checks every setting ([`RabbitBus::connect`](crate::RabbitBus::connect) does too), so a service can refuse
    /// a bad configuration before it starts anything.
    ///
    /// # Errors
    /// [`BusError::InvalidConfig`] naming the setting.
    pub fn validate(&self) -> Result<(), BusError> {
        bus_core::EventTypeName::new(&self.exchange)
            .map_err(|_| BusError::invalid_config("exchange", "must match ^[A-Za-z][A-Za-z0-9_.-]{0,199}$"))?;
        if self.connection_name.is_empty()
            || self.connection_name.len() > 200
            || self.connection_name.chars().any(char::is_control)
        {
            return Err(BusError::invalid_config(
                "connection_name",
                "must be 1 to 200 bytes without control characters",
            ));
        }
        if self.stop_timeout.is_zero() {
            return Err(BusError::invalid_config("stop_timeout", "must be more than zero"));
        }
        if self.redelivery_limit == 0 {
            return Err(BusError::invalid_config("redelivery_limit", "must be at least 1"));
        }
        if self.prefetch == 0 {
            return Err(BusError::invalid_config("prefetch", "must be at least 1"));
        }
        if self.concurrency == 0 || self.concurrency > usize::from(self.prefetch).max(1) * 16 {
            return Err(BusError::invalid_config("concurrency", "must be between 1 and 16 x prefetch"));
        }
        if self.confirm_window == 0 {
            return Err(BusError::invalid_config("confirm_window", "must be at least 1"));
        }
        if self.max_payload_bytes == 0 || self.max_payload_bytes > 128 * 1024 * 1024 {
            return Err(BusError::invalid_config("max_payload_bytes", "must be between 1 and 128 MiB"));
        }
        if self.reconnect_delay.0.is_zero() || self.reconnect_delay.0 > self.reconnect_delay.1 {
            return Err(BusError::invalid_config("reconnect_delay", "first must be > 0 and <= longest"));
        }
        if self.membership_heartbeat < Duration::from_millis(10) {
            return Err(BusError::invalid_config("membership_heartbeat", "must be at least 10 ms"));
        }
        if self.member_timeout < self.membership_heartbeat * 2 {
            return Err(BusError::invalid_config("member_timeout", "must be at least twice membership_heartbeat"));
        }
        self.retry.validate_for_handlers()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_never_shows() {
        let url = AmqpUrl::parse("amqp://app:s3cret-pw@broker.example:5672/%2f").unwrap();
        for shown in [format!("{url}"), format!("{url:?}"), format!("{:?}", RabbitConfig::new(&url.expose()).unwrap())]
        {
            assert!(!shown.contains("s3cret-pw"), "{shown}");
        }
        assert_eq!(url.to_string(), "amqp://app:***@broker.example:5672/%2f");
    }

    #[test]
    fn a_cluster_is_a_list_of_nodes_each_checked_none_shown_with_its_password() {
        let url = AmqpUrl::parse("amqp://app:pw1@n1:5672/%2f, amqp://app:pw2@n2:5673/%2f").unwrap();
        assert_eq!(url.nodes(), 2);
        assert_eq!(url.to_string(), "amqp://app:***@n1:5672/%2f,amqp://app:***@n2:5673/%2f");
        assert_eq!(url.node(3).1, "amqp://app:***@n2:5673/%2f");
        let error = AmqpUrl::parse("amqp://app:pw1@n1:5672/%2f,http://app:secret@n2").unwrap_err().to_string();
        assert!(error.contains("AMQP_URL") && error.contains("node 2 of 2") && !error.contains("secret"), "{error}");
        assert!(AmqpUrl::parse("amqp://a@n1/%2f,").is_err(), "an empty node is refused");
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        for bad in ["http://x", "amqp://user:hunter2@[bad", "", "amqp//missing"] {
            let err = AmqpUrl::parse(bad).unwrap_err().to_string();
            assert!(err.contains("AMQP_URL"), "{err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn settings_are_named() {
        let mut config = RabbitConfig::new("amqp://localhost").unwrap();
        config.prefetch = 0;
        assert!(config.validate().unwrap_err().to_string().contains("prefetch"));
        let mut config = RabbitConfig::new("amqp://localhost").unwrap();
        config.exchange = "bad exchange".into();
        assert!(config.validate().unwrap_err().to_string().contains("exchange"));
    }
}
