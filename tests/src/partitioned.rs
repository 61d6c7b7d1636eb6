//! A partitioned consumer service as a real process (`partition-consumer`), and the ledger of what its
//! instances did, read from its database.
//!
//! Each instance subscribes to group `PC_GROUP` with `PC_PARTITIONS` partitions on RabbitMQ and handles
//! [`Numbered`] events through the inbox: in the inbox transaction it appends a row to `handled` (event id, key,
//! position, instance) and advances the key's row in `key_last`, counting an **out-of-order** handling when the
//! key's last handled position is beyond the new one. The `key_last` row lock serializes the handlings of one key
//! in commit order, so the count is exact whatever the instances do concurrently.

use std::process::ExitCode;
use std::sync::Arc;

use bus_core::{EventBus, GroupName, HandlerError, Subscription};
use outbox::{Inbox, InboxConfig, InboxTransaction, Outbox, OutboxConfig, SubscriptionInboxExt};
use sqlx::{PgPool, Postgres};

use crate::Numbered;

/// The consumer's settings, from the environment (`PC_*`).
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    /// PostgreSQL URL (`PC_DATABASE_URL`).
    pub database_url: String,
    /// Schema holding the consumer's inbox, `handled` and `key_last` (`PC_SCHEMA`).
    pub schema: String,
    /// RabbitMQ URL (`PC_AMQP_URL`).
    pub amqp_url: String,
    /// The bus exchange (`PC_EXCHANGE`).
    pub exchange: String,
    /// The consumer group (`PC_GROUP`).
    pub group: String,
    /// Its partition count (`PC_PARTITIONS`).
    pub partitions: u16,
    /// This instance's name, recorded with each handling (`PC_INSTANCE`).
    pub instance: String,
}

impl ConsumerSettings {
    /// The environment for a process with these settings.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("PC_DATABASE_URL", self.database_url.clone()),
            ("PC_SCHEMA", self.schema.clone()),
            ("PC_AMQP_URL", self.amqp_url.clone()),
            ("PC_EXCHANGE", self.exchange.clone()),
            ("PC_GROUP", self.group.clone()),
            ("PC_PARTITIONS", self.partitions.to_string()),
            ("PC_INSTANCE", self.instance.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    fn from_env() -> Result<Self, String> {
        let var = |name: &str| std::env::var(name).map_err(|_| format!("{name} is not set"));
        Ok(Self {
            database_url: var("PC_DATABASE_URL")?,
            schema: var("PC_SCHEMA")?,
            amqp_url: var("PC_AMQP_URL")?,
            exchange: var("PC_EXCHANGE")?,
            group: var("PC_GROUP")?,
            partitions: var("PC_PARTITIONS")?.parse().map_err(|_| "PC_PARTITIONS: not a number".to_owned())?,
            instance: var("PC_INSTANCE")?,
        })
    }
}

/// Creates the consumer's schema: the inbox (through the outbox crate's migrations), `handled` and `key_last`.
///
/// # Panics
/// When the database refuses.
pub async fn create_consumer_schema(pool: &PgPool, schema: &str, group: &str) {
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\"")).execute(pool).await.expect("create schema");
    Outbox::new(pool.clone(), OutboxConfig::new(group).schema(schema))
        .expect("outbox config")
        .migrate()
        .await
        .expect("migrate");
    sqlx::query(&format!(
        "CREATE TABLE \"{schema}\".handled (id BIGSERIAL PRIMARY KEY, event_id UUID NOT NULL, key TEXT NOT NULL, \
         seq INTEGER NOT NULL, instance TEXT NOT NULL)"
    ))
    .execute(pool)
    .await
    .expect("create handled");
    sqlx::query(&format!(
        "CREATE TABLE \"{schema}\".key_last (key TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, \
         out_of_order INTEGER NOT NULL DEFAULT 0)"
    ))
    .execute(pool)
    .await
    .expect("create key_last");
}

/// `partition-consumer`: runs one instance until SIGTERM (then stops gracefully) or SIGKILL.
pub async fn consumer_main() -> ExitCode {
    crate::init_tracing();
    let settings = match ConsumerSettings::from_env() {
        Ok(settings) => settings,
        Err(reason) => {
            eprintln!("partition-consumer: {reason}");
            return ExitCode::from(2);
        }
    };
    match run_consumer(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            eprintln!("partition-consumer: {reason}");
            ExitCode::FAILURE
        }
    }
}

async fn run_consumer(settings: ConsumerSettings) -> Result<(), String> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect(&settings.database_url)
        .await
        .map_err(|e| format!("database: {e}"))?;
    let mut config = bus_rabbitmq::RabbitConfig::new(&settings.amqp_url).map_err(|e| e.to_string())?;
    config.exchange = settings.exchange.clone();
    config.membership_heartbeat = std::time::Duration::from_millis(200);
    config.member_timeout = std::time::Duration::from_secs(2);
    let bus = bus_rabbitmq::RabbitBus::connect(config).await.map_err(|e| e.to_string())?;
    let outbox = Outbox::new(pool.clone(), OutboxConfig::new(&settings.group).schema(&settings.schema))
        .map_err(|e| e.to_string())?;
    let inbox = Inbox::new(outbox, InboxConfig::default(), &bus.config().retry).map_err(|e| e.to_string())?;
    let subscription =
        ledger_subscription(&inbox, &settings.group, settings.partitions, &settings.schema, &settings.instance);
    let handle = bus.subscribe(subscription).await.map_err(|e| e.to_string())?;
    println!("partition-consumer {} listening on {}", settings.instance, settings.group);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("signal handler: {e}"))?;
    term.recv().await;
    handle.shutdown().await;
    bus.shutdown().await;
    Ok(())
}

/// The partitioned subscription of one instance, `instance`, of `group`: each [`Numbered`] event is handled
/// through `inbox`, recording the handling in `handled` and `key_last` of `schema` (see the module docs).
pub fn ledger_subscription(
    inbox: &Inbox<Postgres>,
    group: &str,
    partitions: u16,
    schema: &str,
    instance: &str,
) -> Subscription {
    let (schema, instance) = (Arc::<str>::from(schema), Arc::<str>::from(instance));
    let handler = move |event: Numbered, mut tx: InboxTransaction<Postgres>| {
        let (schema, instance) = (schema.clone(), instance.clone());
        async move {
            let seq = i32::try_from(event.seq).map_err(|_| HandlerError::permanent("seq out of range"))?;
            let event_id = tx.delivery().event_id();
            sqlx::query(&format!(
                "INSERT INTO \"{schema}\".key_last (key, last_seq) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE \
                 SET out_of_order = key_last.out_of_order + (key_last.last_seq > EXCLUDED.last_seq)::int, \
                 last_seq = EXCLUDED.last_seq"
            ))
            .bind(&event.key)
            .bind(seq)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::transient)?;
            sqlx::query(&format!(
                "INSERT INTO \"{schema}\".handled (event_id, key, seq, instance) VALUES ($1, $2, $3, $4)"
            ))
            .bind(event_id)
            .bind(&event.key)
            .bind(seq)
            .bind(&*instance)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::transient)?;
            Ok(())
        }
    };
    Subscription::new(GroupName::new(group).unwrap()).partitions(partitions).on_inbox(inbox, handler)
}

/// Distinct events the consumer in `schema` handled.
///
/// # Panics
/// When the database refuses.
pub async fn handled_events(pool: &PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(DISTINCT event_id) FROM \"{schema}\".handled"))
        .fetch_one(pool)
        .await
        .expect("count handled")
}

/// What the instances of a partitioned consumer did, from its database.
#[derive(Debug, Default)]
pub struct PartitionLedger {
    /// Handlings that committed.
    pub handlings: i64,
    /// Distinct events handled.
    pub distinct: i64,
    /// Handlings beyond the first of an event (duplicate effects).
    pub duplicate_effects: i64,
    /// Handlings that came after a later position of their key (from `key_last`).
    pub out_of_order: i64,
    /// Keys whose handlings, in commit order, are not exactly 0, 1, 2, … (a gap, a repeat or an inversion).
    pub keys_not_in_sequence: i64,
    /// Handlings per instance, by instance name.
    pub per_instance: Vec<(String, i64)>,
}

impl PartitionLedger {
    /// Reads the ledger of the consumer in `schema`.
    ///
    /// # Panics
    /// When the database refuses.
    pub async fn read(pool: &PgPool, schema: &str) -> Self {
        let one = |sql: String| async move { sqlx::query_scalar::<_, i64>(&sql).fetch_one(pool).await.expect(&sql) };
        let handlings = one(format!("SELECT count(*) FROM \"{schema}\".handled")).await;
        let distinct = one(format!("SELECT count(DISTINCT event_id) FROM \"{schema}\".handled")).await;
        let out_of_order =
            one(format!("SELECT coalesce(sum(out_of_order), 0)::bigint FROM \"{schema}\".key_last")).await;
        // Rows of one key are committed one after the other (the key_last row lock), so id order is commit order.
        let keys_not_in_sequence = one(format!(
            "SELECT count(*) FROM (SELECT key, bool_and(seq = pos) AS ok FROM (SELECT key, seq, \
             (row_number() OVER (PARTITION BY key ORDER BY id) - 1)::int AS pos FROM \"{schema}\".handled) r \
             GROUP BY key) k WHERE NOT ok"
        ))
        .await;
        let per_instance = sqlx::query_as::<_, (String, i64)>(&format!(
            "SELECT instance, count(*) FROM \"{schema}\".handled GROUP BY instance ORDER BY instance"
        ))
        .fetch_all(pool)
        .await
        .expect("per instance");
        Self {
            handlings,
            distinct,
            duplicate_effects: handlings - distinct,
            out_of_order,
            keys_not_in_sequence,
            per_instance,
        }
    }
}
