//! The SQL text of every statement, built once per outbox from validated, quoted identifiers.
//!
//! Nothing user-supplied is ever formatted into SQL except the schema and table prefix, which are checked against
//! `^[A-Za-z_][A-Za-z0-9_]{0,62}$` first and quoted; every value travels as a bind parameter.

use crate::config::OutboxConfig;

/// Row states in the outbox table.
pub(crate) const PENDING: i16 = 0;
pub(crate) const PUBLISHED: i16 = 1;
pub(crate) const FAILED: i16 = 2;

/// The SQL dialect of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[doc(hidden)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// SQLite's clock in Unix milliseconds, read when the statement runs (after it got the write lock), never a
/// value bound earlier: a statement that waited for the lock would otherwise work with a stale time.
pub(crate) const NOW: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

// The claim: `picked` is the lowest claimable pending rows; a keyed row among them is `eligible` only if every
// pending row of its key up to it is picked too (its rank among the picked rows of the key equals the number of
// pending rows of the key up to it, leaving out rows this relay has in flight, which it sent earlier on the
// same channel), so that no earlier event of the key is left to another relay or to a retry: per-key order
// across relays. The count walks the (partition_key, seq) index of pending rows.

/// Column list shared by every statement that reads rows back.
const COLUMNS: &str = "seq, event_id, event_type, version, occurred_at, correlation_id, causation_id, partition_key, \
                       source, traceparent, tracestate, payload, attempts";

/// Every statement of one outbox, in its dialect.
#[derive(Debug)]
#[doc(hidden)]
pub struct Sql {
    pub outbox: String,
    pub inbox: String,
    pub migrations: String,
    /// The PostgreSQL NOTIFY channel (an unquoted identifier; LISTEN quotes it).
    pub channel: String,
    pub prefix: String,
    pub schema: Option<String>,
    pub insert_outbox: String,
    pub insert_inbox: String,
    pub claim: String,
    pub mark_published: String,
    pub renew_lease: String,
    pub record_failure: String,
    pub status: String,
    pub failed: String,
    pub requeue_failed: String,
    pub delete_published: String,
    pub delete_inbox: String,
    pub forget_inbox: String,
    pub select_range: String,
}

fn quote(ident: &str) -> String {
    // Identifiers are validated to [A-Za-z0-9_], so there is no quote to escape.
    format!("\"{ident}\"")
}

impl Sql {
    pub(crate) fn new(config: &OutboxConfig, dialect: Dialect) -> Self {
        let prefix = config.table_prefix.clone();
        let qualify = |name: &str| match &config.schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(&format!("{prefix}{name}"))),
            None => quote(&format!("{prefix}{name}")),
        };
        let (outbox, inbox, migrations) = (qualify("outbox"), qualify("inbox"), qualify("migrations"));
        let channel =
            format!("{}{prefix}outbox", config.schema.as_deref().map(|s| format!("{s}_")).unwrap_or_default());
        let t = &outbox;
        match dialect {
            Dialect::Postgres => Self {
                insert_outbox: format!(
                    "INSERT INTO {t} (event_id, event_type, version, occurred_at, correlation_id, causation_id, \
                     partition_key, source, traceparent, tracestate, payload) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
                ),
                insert_inbox: format!("INSERT INTO {inbox} (event_id, handler) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
                claim: format!(
                    "WITH picked AS ( \
                       SELECT seq, partition_key FROM {t} \
                       WHERE status = {PENDING} AND next_attempt_at <= now() \
                         AND (locked_until IS NULL OR locked_until < now()) \
                       ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED \
                     ), ranked AS ( \
                       SELECT seq, partition_key, \
                         row_number() OVER (PARTITION BY partition_key ORDER BY seq) AS rank FROM picked \
                     ), eligible AS ( \
                       SELECT o.seq FROM ranked o \
                       WHERE o.partition_key IS NULL OR o.rank = ( \
                         SELECT count(*) FROM {t} p \
                         WHERE p.status = {PENDING} AND p.partition_key = o.partition_key AND p.seq <= o.seq \
                           AND NOT coalesce(p.locked_by = $2 AND p.locked_until >= now(), false)) \
                     ) \
                     UPDATE {t} t SET locked_by = $2, locked_until = now() + $3 * interval '1 millisecond' \
                     FROM eligible e WHERE t.seq = e.seq \
                     RETURNING {}",
                    COLUMNS.split(", ").map(|c| format!("t.{c}")).collect::<Vec<_>>().join(", ")
                ),
                mark_published: format!(
                    "UPDATE {t} SET status = {PUBLISHED}, published_at = now(), locked_by = NULL, locked_until = NULL \
                     WHERE seq = ANY($1)"
                ),
                renew_lease: format!(
                    "UPDATE {t} SET locked_until = now() + $3 * interval '1 millisecond' \
                     WHERE seq = ANY($1) AND locked_by = $2 AND status = {PENDING}"
                ),
                record_failure: format!(
                    "UPDATE {t} SET attempts = attempts + 1, last_error = $2, locked_by = NULL, locked_until = NULL, \
                     status = CASE WHEN $3 THEN {FAILED} ELSE {PENDING} END, \
                     next_attempt_at = now() + $4 * interval '1 millisecond' WHERE seq = $1"
                ),
                status: format!(
                    "SELECT count(*) FILTER (WHERE status = {PENDING}), \
                       count(*) FILTER (WHERE status = {PENDING} AND locked_until > now()), \
                       count(*) FILTER (WHERE status = {FAILED}), \
                       count(*) FILTER (WHERE status = {PUBLISHED}), \
                       (EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE status = {PENDING})) * 1000)::bigint \
                     FROM {t}"
                ),
                failed: format!("SELECT {COLUMNS}, last_error FROM {t} WHERE status = {FAILED} ORDER BY seq LIMIT $1"),
                requeue_failed: format!(
                    "UPDATE {t} SET status = {PENDING}, attempts = 0, next_attempt_at = now(), last_error = NULL \
                     WHERE status = {FAILED} AND ($1::uuid IS NULL OR event_id = $1)"
                ),
                delete_published: format!(
                    "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE status = {PUBLISHED} \
                     AND published_at < now() - $1 * interval '1 millisecond' ORDER BY seq LIMIT $2)"
                ),
                delete_inbox: format!(
                    "DELETE FROM {inbox} WHERE ctid IN (SELECT ctid FROM {inbox} \
                     WHERE handled_at < now() - $1 * interval '1 millisecond' LIMIT $2)"
                ),
                forget_inbox: format!("DELETE FROM {inbox} WHERE handler = $1"),
                select_range: format!(
                    "SELECT {COLUMNS} FROM {t} WHERE seq > $1 AND seq <= $2 AND status = {PUBLISHED} \
                     AND ($3::text IS NULL OR event_type = $3) ORDER BY seq LIMIT $4"
                ),
                outbox,
                inbox,
                migrations,
                channel,
                prefix,
                schema: config.schema.clone(),
            },
            Dialect::Sqlite => Self {
                insert_outbox: format!(
                    "INSERT INTO {t} (event_id, event_type, version, occurred_at, correlation_id, causation_id, \
                     partition_key, source, traceparent, tracestate, payload, next_attempt_at, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, {NOW}, {NOW})"
                ),
                insert_inbox: format!(
                    "INSERT INTO {inbox} (event_id, handler, handled_at) VALUES (?1, ?2, {NOW}) ON CONFLICT DO NOTHING"
                ),
                claim: format!(
                    "WITH picked AS ( \
                       SELECT seq, partition_key FROM {t} \
                       WHERE status = {PENDING} AND next_attempt_at <= {NOW} \
                         AND (locked_until IS NULL OR locked_until < {NOW}) \
                       ORDER BY seq LIMIT ?1 \
                     ), ranked AS ( \
                       SELECT seq, partition_key, \
                         row_number() OVER (PARTITION BY partition_key ORDER BY seq) AS rank FROM picked \
                     ), eligible AS ( \
                       SELECT o.seq FROM ranked o \
                       WHERE o.partition_key IS NULL OR o.rank = ( \
                         SELECT count(*) FROM {t} p \
                         WHERE p.status = {PENDING} AND p.partition_key = o.partition_key AND p.seq <= o.seq \
                           AND NOT coalesce(p.locked_by = ?2 AND p.locked_until >= {NOW}, 0)) \
                     ) \
                     UPDATE {t} SET locked_by = ?2, locked_until = {NOW} + ?3 \
                     WHERE seq IN (SELECT seq FROM eligible) \
                     RETURNING {COLUMNS}"
                ),
                mark_published: format!(
                    "UPDATE {t} SET status = {PUBLISHED}, published_at = {NOW}, locked_by = NULL, locked_until = NULL \
                     WHERE seq IN (SELECT value FROM json_each(?1))"
                ),
                renew_lease: format!(
                    "UPDATE {t} SET locked_until = {NOW} + ?3 \
                     WHERE seq IN (SELECT value FROM json_each(?1)) AND locked_by = ?2 AND status = {PENDING}"
                ),
                record_failure: format!(
                    "UPDATE {t} SET attempts = attempts + 1, last_error = ?2, locked_by = NULL, locked_until = NULL, \
                     status = CASE WHEN ?3 THEN {FAILED} ELSE {PENDING} END, next_attempt_at = {NOW} + ?4 \
                     WHERE seq = ?1"
                ),
                status: format!(
                    "SELECT coalesce(sum(status = {PENDING}), 0), \
                       coalesce(sum(status = {PENDING} AND locked_until > {NOW}), 0), \
                       coalesce(sum(status = {FAILED}), 0), \
                       coalesce(sum(status = {PUBLISHED}), 0), \
                       {NOW} - min(CASE WHEN status = {PENDING} THEN created_at END) \
                     FROM {t}"
                ),
                failed: format!("SELECT {COLUMNS}, last_error FROM {t} WHERE status = {FAILED} ORDER BY seq LIMIT ?1"),
                requeue_failed: format!(
                    "UPDATE {t} SET status = {PENDING}, attempts = 0, next_attempt_at = {NOW}, last_error = NULL \
                     WHERE status = {FAILED} AND (?1 IS NULL OR event_id = ?1)"
                ),
                delete_published: format!(
                    "DELETE FROM {t} WHERE seq IN (SELECT seq FROM {t} WHERE status = {PUBLISHED} \
                     AND published_at < {NOW} - ?1 ORDER BY seq LIMIT ?2)"
                ),
                delete_inbox: format!(
                    "DELETE FROM {inbox} WHERE rowid IN (SELECT rowid FROM {inbox} WHERE handled_at < {NOW} - ?1 LIMIT ?2)"
                ),
                forget_inbox: format!("DELETE FROM {inbox} WHERE handler = ?1"),
                select_range: format!(
                    "SELECT {COLUMNS} FROM {t} WHERE seq > ?1 AND seq <= ?2 AND status = {PUBLISHED} \
                     AND (?3 IS NULL OR event_type = ?3) ORDER BY seq LIMIT ?4"
                ),
                outbox,
                inbox,
                migrations,
                channel,
                prefix,
                schema: config.schema.clone(),
            },
        }
    }

    /// A quoted index name in the tables' schema.
    pub(crate) fn index(&self, name: &str) -> String {
        quote(&format!("{}{name}", self.prefix))
    }
}

/// One migration: a version, what it does, and its DDL per dialect.
pub(crate) struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: fn(&Sql, Dialect) -> String,
}

/// Every migration, oldest first. Never edit one that shipped: add a new one.
pub(crate) const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "outbox and inbox tables",
    sql: |s, dialect| {
        let (t, i) = (&s.outbox, &s.inbox);
        let (pending, pending_key, published, failed, handled) = (
            s.index("outbox_pending"),
            s.index("outbox_pending_key"),
            s.index("outbox_published"),
            s.index("outbox_failed"),
            s.index("inbox_handled_at"),
        );
        match dialect {
            Dialect::Postgres => format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
                   event_id UUID NOT NULL, event_type TEXT NOT NULL, version INTEGER NOT NULL, \
                   occurred_at TIMESTAMPTZ NOT NULL, correlation_id TEXT NOT NULL, causation_id UUID, \
                   partition_key TEXT, source TEXT, traceparent TEXT, tracestate TEXT, payload BYTEA NOT NULL, \
                   status SMALLINT NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, \
                   next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(), locked_by UUID, locked_until TIMESTAMPTZ, \
                   last_error TEXT, created_at TIMESTAMPTZ NOT NULL DEFAULT now(), published_at TIMESTAMPTZ); \
                 CREATE INDEX IF NOT EXISTS {pending} ON {t} (seq) WHERE status = {PENDING}; \
                 CREATE INDEX IF NOT EXISTS {pending_key} ON {t} (partition_key, seq) \
                   WHERE status = {PENDING} AND partition_key IS NOT NULL; \
                 CREATE INDEX IF NOT EXISTS {published} ON {t} (published_at) WHERE status = {PUBLISHED}; \
                 CREATE INDEX IF NOT EXISTS {failed} ON {t} (seq) WHERE status = {FAILED}; \
                 CREATE TABLE IF NOT EXISTS {i} (event_id UUID NOT NULL, handler TEXT NOT NULL, \
                   handled_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (event_id, handler)); \
                 CREATE INDEX IF NOT EXISTS {handled} ON {i} (handled_at);"
            ),
            Dialect::Sqlite => format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   seq INTEGER PRIMARY KEY AUTOINCREMENT, \
                   event_id TEXT NOT NULL, event_type TEXT NOT NULL, version INTEGER NOT NULL, \
                   occurred_at INTEGER NOT NULL, correlation_id TEXT NOT NULL, causation_id TEXT, \
                   partition_key TEXT, source TEXT, traceparent TEXT, tracestate TEXT, payload BLOB NOT NULL, \
                   status INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, \
                   next_attempt_at INTEGER NOT NULL, locked_by TEXT, locked_until INTEGER, \
                   last_error TEXT, created_at INTEGER NOT NULL, published_at INTEGER); \
                 CREATE INDEX IF NOT EXISTS {pending} ON {t} (seq) WHERE status = {PENDING}; \
                 CREATE INDEX IF NOT EXISTS {pending_key} ON {t} (partition_key, seq) \
                   WHERE status = {PENDING} AND partition_key IS NOT NULL; \
                 CREATE INDEX IF NOT EXISTS {published} ON {t} (published_at) WHERE status = {PUBLISHED}; \
                 CREATE INDEX IF NOT EXISTS {failed} ON {t} (seq) WHERE status = {FAILED}; \
                 CREATE TABLE IF NOT EXISTS {i} (event_id TEXT NOT NULL, handler TEXT NOT NULL, \
                   handled_at INTEGER NOT NULL, PRIMARY KEY (event_id, handler)); \
                 CREATE INDEX IF NOT EXISTS {handled} ON {i} (handled_at);"
            ),
        }
    },
}];
