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

// The claim. A row is claimable when it is pending, due, and its lease is free: never leased, expired, or held by
// a relay that is gone (PostgreSQL: its session advisory lock is free; SQLite: its registration was removed by a
// relay that found its lock file free). A keyed
// row is eligible only when every earlier unpublished row of its key (pending or failed) is claimable too or
// already held by this relay (which publishes a key's rows one after the other, in order), and this filter
// runs before the LIMIT, so a key that is blocked (head in backoff, failed, or held by another live relay)
// never takes the places of other keys' rows. On PostgreSQL, `FOR UPDATE SKIP LOCKED`
// may skip an earlier row of a key that a concurrent claim is taking: `eligible` then drops the key's later
// rows, so at most one relay holds a key's rows at a time, and it holds a prefix of them. `sized` keeps the
// batch under its byte budget (always at least one row). Claiming counts the attempt.

/// Joined into every PostgreSQL statement of the relay's own (claim, mark, renew, release, failure): its
/// transaction commits without waiting for the WAL flush. Safe for these writes alone: one lost in a database
/// crash (never in a client's) leaves its rows pending or leased as before, so they are published again (a
/// duplicate the consumers' inboxes drop), never lost; and every other session sees it at once. Producers'
/// commits keep the database's setting. Saves a WAL flush per write-back, the relay's main cost per event.
const RELAY_WRITE: &str = "(SELECT set_config('synchronous_commit', 'off', true)) AS relay_write";

/// A pending row that is scheduled (enqueued with a not-before time still to come, never tried yet).
fn scheduled(now: &str) -> String {
    format!("(attempts = 0 AND next_attempt_at > {now})")
}

/// How often a SQLite relay refreshes its registration, and how old the registration of a relay whose lock file
/// this process cannot see may get before it is forgotten (its rows then free), in milliseconds.
pub(crate) const SQLITE_REGISTRATION_REFRESH_MS: i64 = 10_000;
/// How often a SQLite relay looks for dead relays (and so how soon their rows are free), in milliseconds.
pub(crate) const SQLITE_PROOF_INTERVAL_MS: i64 = 250;
pub(crate) const SQLITE_UNSEEN_RELAY_FORGOTTEN_AFTER_MS: i64 = 60_000;

/// PostgreSQL limits identifiers (and so NOTIFY channel names) to 63 bytes.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// The NOTIFY channel: `[schema_]<prefix>outbox`, or, when that is longer than PostgreSQL allows, a prefix of it
/// followed by a hash of the whole name (stable across processes, so that producers and relays agree).
fn channel_name(full: String) -> String {
    if full.len() <= MAX_IDENTIFIER_BYTES {
        return full;
    }
    // FNV-1a: stable across processes and Rust versions (unlike `DefaultHasher`).
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let suffix = format!("_{hash:016x}");
    let keep = MAX_IDENTIFIER_BYTES - suffix.len();
    // Identifiers are ASCII, so any byte index is a character boundary.
    format!("{}{suffix}", &full[..keep])
}

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
    /// One row (PostgreSQL: `$1`..`$12`; SQLite: `?1`..`?12`).
    pub insert_outbox: String,
    /// PostgreSQL: one statement for any number of rows (arrays `$1`..`$11`, `$12` the due time), so that they
    /// are all written or none, in or outside a transaction. SQLite: the statement's head, followed by one
    /// [`insert_outbox_values`](Self::insert_outbox_values) per row.
    pub insert_outbox_rows: String,
    /// SQLite: one row's values in [`insert_outbox_rows`](Self::insert_outbox_rows) (anonymous parameters).
    pub insert_outbox_values: String,
    /// PostgreSQL: [`insert_outbox`](Self::insert_outbox) and [`insert_outbox_rows`](Self::insert_outbox_rows)
    /// returning the transaction id (for the wake-up after its commit).
    pub insert_outbox_waking: String,
    pub insert_outbox_rows_waking: String,
    /// PostgreSQL: [`insert_outbox`](Self::insert_outbox) for direct dispatch (`direct`): the row is leased at
    /// once to relay `$12` (lock key `$13`, lease `$14` ms, one attempt counted) when it is its key's head (no
    /// earlier pending or failed row of the key, other than rows this transaction leased to the same relay, as
    /// a READ COMMITTED statement sees them: under a stricter isolation the snapshot may miss earlier rows, so
    /// nothing is leased); the lease runs from the insert (`clock_timestamp`, not the transaction's start);
    /// returns `seq, leased`. Scalar parameters only, so that PostgreSQL settles on a generic plan instead of
    /// planning it at every execution. SQLite: empty (no direct dispatch).
    pub insert_outbox_leased: String,
    pub insert_inbox: String,
    /// The relays' liveness table (SQLite; PostgreSQL uses session advisory locks instead).
    pub relays: String,
    /// This outbox instance's mark on the NOTIFYs it sends, so that its own relays (woken in-process already)
    /// ignore them.
    pub origin: String,
    pub claim: String,
    pub mark_published: String,
    pub renew_lease: String,
    pub record_failure: String,
    pub release: String,
    pub register_relay: String,
    pub refresh_relay: String,
    pub registered_relays: String,
    /// SQLite: deletes one registration as it was read (`id`, `heartbeat_at`): never a newer one.
    pub forget_registration: String,
    pub forget_relay: String,
    pub status: String,
    pub failed: String,
    pub requeue_failed: String,
    pub delete_published: String,
    pub delete_inbox: String,
    pub forget_inbox: String,
    pub select_range: String,
    pub first_seq_since: String,
    /// The dead letters a bus keeps in this database ([`crate::DeadLetterTable`]); the same columns and types on
    /// both dialects (times in Unix milliseconds, ids as text).
    pub dead_letters: String,
    pub keep_dead_letter: String,
    pub list_dead_letters: String,
    pub remove_dead_letter: String,
}

/// Columns of the dead-letter table, in the order `keep_dead_letter` binds them.
pub(crate) const DEAD_LETTER_COLUMNS: &str = "group_name, event_id, seq, event_type, version, occurred_at_ms, \
     correlation_id, causation_id, partition_key, source, traceparent, tracestate, payload, last_error, cause, \
     attempts, failed_at_ms";

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
        let (outbox, inbox, migrations, relays) =
            (qualify("outbox"), qualify("inbox"), qualify("migrations"), qualify("relays"));
        let dead_letters = qualify("dead_letters");
        let channel = channel_name(format!(
            "{}{prefix}outbox",
            config.schema.as_deref().map(|s| format!("{s}_")).unwrap_or_default()
        ));
        let origin = uuid::Uuid::new_v4().simple().to_string();
        let t = &outbox;
        let (scheduled_pg, scheduled_sqlite) = (scheduled("now()"), scheduled(NOW));
        let mut sql = match dialect {
            Dialect::Postgres => Self {
                insert_outbox: format!(
                    "INSERT INTO {t} (event_id, event_type, version, occurred_at, correlation_id, causation_id, \
                     partition_key, source, traceparent, tracestate, payload, next_attempt_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, coalesce($12, now()))"
                ),
                insert_outbox_rows: format!(
                    "INSERT INTO {t} (event_id, event_type, version, occurred_at, correlation_id, causation_id, \
                     partition_key, source, traceparent, tracestate, payload, next_attempt_at) \
                     SELECT e, ty, v, o, c, ca, k, s, tp, ts, p, coalesce($12, now()) \
                     FROM unnest($1::uuid[], $2::text[], $3::int4[], $4::timestamptz[], $5::text[], $6::uuid[], \
                       $7::text[], $8::text[], $9::text[], $10::text[], $11::bytea[]) \
                       WITH ORDINALITY AS u(e, ty, v, o, c, ca, k, s, tp, ts, p, ord) \
                     ORDER BY ord"
                ),
                insert_outbox_values: String::new(),
                insert_outbox_waking: String::new(),
                insert_outbox_rows_waking: String::new(),
                insert_outbox_leased: format!(
                    "INSERT INTO {t} (event_id, event_type, version, occurred_at, correlation_id, causation_id, \
                     partition_key, source, traceparent, tracestate, payload, next_attempt_at, locked_by, \
                     locked_key, locked_until, attempts) \
                     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, now(), CASE WHEN head THEN $12::uuid END, \
                       CASE WHEN head THEN $13::int4 END, \
                       CASE WHEN head THEN clock_timestamp() + $14 * interval '1 millisecond' END, CASE WHEN head THEN 1 ELSE 0 END \
                     FROM (SELECT (current_setting('transaction_isolation') = 'read committed' AND \
                       ($7::text IS NULL OR NOT EXISTS ( \
                         SELECT 1 FROM {t} r WHERE r.partition_key = $7::text AND r.status IN ({PENDING}, {FAILED}) \
                           AND NOT coalesce(r.locked_by = $12::uuid AND r.xmin = pg_current_xact_id()::xid, false))) \
                       ) AS head) h \
                     RETURNING seq, locked_by IS NOT NULL AS leased"
                ),
                insert_inbox: format!("INSERT INTO {inbox} (event_id, handler) VALUES ($1, $2) ON CONFLICT DO NOTHING"),
                claim: {
                    // $1 rows, $2 relay id, $3 lease ms, $4 the relay's lock key, $5 byte budget, $6 lock namespace,
                    // $7 the rows this relay holds (its own leased rows that it does not hold are lost to it: free,
                    // unless leased within the last second: those are hand-offs on their way to it, see `direct`).
                    let free = |r: &str| {
                        format!(
                            "CASE WHEN {r}.locked_until IS NULL OR {r}.locked_until < now() THEN true \
                               WHEN {r}.locked_by = $2 THEN NOT ({r}.seq = ANY($7)) \
                                 AND {r}.locked_until < now() + ($3 - 1000) * interval '1 millisecond' \
                               ELSE coalesce(pg_try_advisory_xact_lock($6, {r}.locked_key), false) END"
                        )
                    };
                    let (free_o, free_r) = (free("o"), free("r"));
                    // Held by this relay: published after the earlier rows it holds, in order.
                    // (coalesce: an unleased row has NULLs, which would make the whole test NULL, and so never a blocker.)
                    let mine_r = "coalesce(r.locked_by = $2 AND r.locked_until >= now() AND r.seq = ANY($7), false)";
                    format!(
                        "WITH picked AS ( \
                           SELECT o.seq, o.partition_key FROM {t} o \
                           WHERE o.status = {PENDING} AND o.next_attempt_at <= now() AND {free_o} \
                             AND (o.partition_key IS NULL OR NOT EXISTS ( \
                               SELECT 1 FROM {t} r WHERE r.partition_key = o.partition_key AND r.seq < o.seq \
                                 AND r.status IN ({PENDING}, {FAILED}) \
                                 AND NOT (r.status = {PENDING} AND ({mine_r} OR \
                                   (r.next_attempt_at <= now() AND {free_r}))))) \
                           ORDER BY o.seq LIMIT $1 FOR UPDATE OF o SKIP LOCKED \
                         ), eligible AS ( \
                           SELECT p.seq FROM picked p WHERE p.partition_key IS NULL OR NOT EXISTS ( \
                             SELECT 1 FROM {t} r WHERE r.partition_key = p.partition_key AND r.seq < p.seq \
                               AND r.status IN ({PENDING}, {FAILED}) AND r.seq NOT IN (SELECT seq FROM picked) \
                               AND NOT (r.status = {PENDING} AND {mine_r})) \
                         ), sized AS ( \
                           SELECT e.seq, octet_length(x.payload) AS size, sum(octet_length(x.payload)) OVER \
                             (ORDER BY e.seq) - octet_length(x.payload) AS before \
                           FROM eligible e JOIN {t} x ON x.seq = e.seq \
                         ) \
                         UPDATE {t} t SET locked_by = $2, locked_key = $4, attempts = t.attempts + 1, \
                           locked_until = now() + $3 * interval '1 millisecond' \
                         FROM sized s, {RELAY_WRITE} WHERE t.seq = s.seq AND (s.before = 0 OR s.before + s.size <= $5) \
                         RETURNING {}",
                        COLUMNS.split(", ").map(|c| format!("t.{c}")).collect::<Vec<_>>().join(", ")
                    )
                },
                mark_published: format!(
                    "UPDATE {t} SET status = {PUBLISHED}, published_at = now(), locked_by = NULL, locked_until = NULL, \
                     locked_key = NULL FROM {RELAY_WRITE} WHERE seq = ANY($1) AND locked_by = $2 AND status = {PENDING}"
                ),
                renew_lease: format!(
                    "UPDATE {t} SET locked_until = now() + $3 * interval '1 millisecond', locked_key = $4 \
                     FROM {RELAY_WRITE} WHERE seq = ANY($1) AND locked_by = $2 AND status = {PENDING} RETURNING seq"
                ),
                record_failure: format!(
                    "UPDATE {t} SET last_error = $3, locked_by = NULL, locked_until = NULL, locked_key = NULL, \
                     status = CASE WHEN $4 THEN {FAILED} ELSE {PENDING} END, \
                     next_attempt_at = now() + $5 * interval '1 millisecond' \
                     FROM {RELAY_WRITE} WHERE seq = $1 AND locked_by = $2 AND status = {PENDING}"
                ),
                release: format!(
                    "UPDATE {t} SET attempts = greatest(attempts - 1, 0), locked_by = NULL, locked_until = NULL, \
                     locked_key = NULL FROM {RELAY_WRITE} WHERE seq = ANY($1) AND locked_by = $2 AND status = {PENDING}"
                ),
                register_relay: String::new(),
                refresh_relay: String::new(),
                registered_relays: String::new(),
                forget_registration: String::new(),
                forget_relay: String::new(),
                status: format!(
                    "SELECT count(*) FILTER (WHERE status = {PENDING}), \
                       count(*) FILTER (WHERE status = {PENDING} AND locked_until > now()), \
                       count(*) FILTER (WHERE status = {FAILED}), \
                       count(*) FILTER (WHERE status = {PUBLISHED}), \
                       (EXTRACT(EPOCH FROM now() - min(CASE WHEN attempts = 0 THEN greatest(created_at, next_attempt_at) \
                         ELSE created_at END) FILTER (WHERE status = {PENDING} AND NOT {scheduled_pg})) * 1000)::bigint, \
                       count(DISTINCT partition_key) FILTER (WHERE status = {FAILED}), \
                       count(*) FILTER (WHERE status = {PENDING} AND {scheduled_pg}) \
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
                first_seq_since: format!("SELECT min(seq) FROM {t} WHERE created_at >= $1"),
                outbox,
                inbox,
                migrations,
                relays,
                origin,
                channel,
                prefix,
                schema: config.schema.clone(),
                dead_letters: dead_letters.clone(),
                keep_dead_letter: String::new(),
                list_dead_letters: String::new(),
                remove_dead_letter: String::new(),
            },
            Dialect::Sqlite => Self {
                insert_outbox: format!(
                    "INSERT INTO {t} (event_id, event_type, version, occurred_at, correlation_id, causation_id, \
                     partition_key, source, traceparent, tracestate, payload, next_attempt_at, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, coalesce(?12, {NOW}), {NOW})"
                ),
                insert_outbox_rows: format!(
                    "INSERT INTO {t} (event_id, event_type, version, occurred_at, correlation_id, causation_id, \
                     partition_key, source, traceparent, tracestate, payload, next_attempt_at, created_at) VALUES "
                ),
                insert_outbox_values: format!("(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, coalesce(?, {NOW}), {NOW})"),
                insert_outbox_waking: String::new(),
                insert_outbox_rows_waking: String::new(),
                insert_outbox_leased: String::new(),
                insert_inbox: format!(
                    "INSERT INTO {inbox} (event_id, handler, handled_at) VALUES (?1, ?2, {NOW}) ON CONFLICT DO NOTHING"
                ),
                claim: {
                    // ?1 rows, ?2 relay id, ?3 lease ms, ?4 the relay's lock key (unused), ?5 byte budget, ?6 the
                    // rows this relay holds (a JSON array; its own leased rows that it does not hold are free).
                    let free = |r: &str| {
                        format!(
                            "({r}.locked_until IS NULL OR {r}.locked_until < {NOW} \
                               OR ({r}.locked_by = ?2 AND {r}.seq NOT IN (SELECT value FROM json_each(?6))) \
                               OR ({r}.locked_by <> ?2 AND \
                               NOT EXISTS (SELECT 1 FROM {relays} h WHERE h.id = {r}.locked_by)))"
                        )
                    };
                    let (free_o, free_r) = (free("o"), free("r"));
                    // Held by this relay: published after the earlier rows it holds, in order.
                    // (coalesce: an unleased row has NULLs, which would make the whole test NULL, and so never a blocker.)
                    let mine_r = format!(
                        "coalesce(r.locked_by = ?2 AND r.locked_until >= {NOW} \
                           AND r.seq IN (SELECT value FROM json_each(?6)), 0)"
                    );
                    format!(
                        "WITH picked AS ( \
                           SELECT o.seq, length(o.payload) AS size FROM {t} o \
                           WHERE o.status = {PENDING} AND o.next_attempt_at <= {NOW} AND {free_o} \
                             AND (o.partition_key IS NULL OR NOT EXISTS ( \
                               SELECT 1 FROM {t} r WHERE r.partition_key = o.partition_key AND r.seq < o.seq \
                                 AND r.status IN ({PENDING}, {FAILED}) \
                                 AND NOT (r.status = {PENDING} AND ({mine_r} OR \
                                   (r.next_attempt_at <= {NOW} AND {free_r}))))) \
                           ORDER BY o.seq LIMIT ?1 \
                         ), sized AS ( \
                           SELECT seq, size, sum(size) OVER (ORDER BY seq) - size AS before FROM picked \
                         ) \
                         UPDATE {t} SET locked_by = ?2, locked_key = ?4, attempts = attempts + 1, \
                           locked_until = {NOW} + ?3 \
                         WHERE seq IN (SELECT seq FROM sized WHERE before = 0 OR before + size <= ?5) \
                         RETURNING {COLUMNS}"
                    )
                },
                mark_published: format!(
                    "UPDATE {t} SET status = {PUBLISHED}, published_at = {NOW}, locked_by = NULL, locked_until = NULL, \
                     locked_key = NULL \
                     WHERE seq IN (SELECT value FROM json_each(?1)) AND locked_by = ?2 AND status = {PENDING}"
                ),
                renew_lease: format!(
                    "UPDATE {t} SET locked_until = {NOW} + ?3, locked_key = ?4 \
                     WHERE seq IN (SELECT value FROM json_each(?1)) AND locked_by = ?2 AND status = {PENDING} \
                     RETURNING seq"
                ),
                record_failure: format!(
                    "UPDATE {t} SET last_error = ?3, locked_by = NULL, locked_until = NULL, locked_key = NULL, \
                     status = CASE WHEN ?4 THEN {FAILED} ELSE {PENDING} END, next_attempt_at = {NOW} + ?5 \
                     WHERE seq = ?1 AND locked_by = ?2 AND status = {PENDING}"
                ),
                release: format!(
                    "UPDATE {t} SET attempts = max(attempts - 1, 0), locked_by = NULL, locked_until = NULL, \
                     locked_key = NULL \
                     WHERE seq IN (SELECT value FROM json_each(?1)) AND locked_by = ?2 AND status = {PENDING}"
                ),
                // A relay's registration: while it is there, the relay's rows are its own until their lease ends
                // (`heartbeat_at` is when it was last refreshed).
                register_relay: format!(
                    "INSERT INTO {relays} (id, heartbeat_at) VALUES (?1, {NOW}) \
                     ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
                ),
                refresh_relay: format!("UPDATE {relays} SET heartbeat_at = {NOW} WHERE id = ?1"),
                registered_relays: format!(
                    "SELECT id, heartbeat_at, heartbeat_at < {NOW} - {SQLITE_UNSEEN_RELAY_FORGOTTEN_AFTER_MS} \
                     FROM {relays}"
                ),
                forget_registration: format!("DELETE FROM {relays} WHERE id = ?1 AND heartbeat_at = ?2"),
                forget_relay: format!("DELETE FROM {relays} WHERE id = ?1"),
                status: format!(
                    "SELECT coalesce(sum(status = {PENDING}), 0), \
                       coalesce(sum(status = {PENDING} AND locked_until > {NOW}), 0), \
                       coalesce(sum(status = {FAILED}), 0), \
                       coalesce(sum(status = {PUBLISHED}), 0), \
                       {NOW} - min(CASE WHEN status = {PENDING} AND NOT ({scheduled_sqlite}) THEN \
                         CASE WHEN attempts = 0 THEN max(created_at, next_attempt_at) ELSE created_at END END), \
                       count(DISTINCT CASE WHEN status = {FAILED} THEN partition_key END), \
                       coalesce(sum(status = {PENDING} AND {scheduled_sqlite}), 0) \
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
                first_seq_since: format!("SELECT min(seq) FROM {t} WHERE created_at >= ?1"),
                outbox,
                inbox,
                migrations,
                relays,
                origin,
                channel,
                prefix,
                schema: config.schema.clone(),
                dead_letters: dead_letters.clone(),
                keep_dead_letter: String::new(),
                list_dead_letters: String::new(),
                remove_dead_letter: String::new(),
            },
        };
        if dialect == Dialect::Postgres {
            let waking = |insert: &str| {
                format!(
                    "WITH inserted AS ({insert} RETURNING 1) SELECT pg_current_xact_id()::text FROM inserted LIMIT 1"
                )
            };
            sql.insert_outbox_waking = waking(&sql.insert_outbox);
            sql.insert_outbox_rows_waking = waking(&sql.insert_outbox_rows);
        }
        let placeholder = |n: usize| match dialect {
            Dialect::Postgres => format!("${n}"),
            Dialect::Sqlite => format!("?{n}"),
        };
        let d = &sql.dead_letters;
        let values: Vec<String> = (1..=17).map(placeholder).collect();
        sql.keep_dead_letter = format!(
            "INSERT INTO {d} ({DEAD_LETTER_COLUMNS}) VALUES ({}) ON CONFLICT (group_name, event_id) DO UPDATE SET \
             last_error = excluded.last_error, cause = excluded.cause, attempts = excluded.attempts, \
             failed_at_ms = excluded.failed_at_ms",
            values.join(", ")
        );
        sql.list_dead_letters = format!(
            "SELECT {DEAD_LETTER_COLUMNS} FROM {d} WHERE group_name = {} ORDER BY failed_at_ms, event_id",
            placeholder(1)
        );
        sql.remove_dead_letter = format!(
            "DELETE FROM {d} WHERE group_name = {} AND event_id = {} AND failed_at_ms = {}",
            placeholder(1),
            placeholder(2),
            placeholder(3)
        );
        sql
    }

    /// A quoted index name in the tables' schema.
    pub(crate) fn index(&self, name: &str) -> String {
        quote(&format!("{}{name}", self.prefix))
    }

    /// A quoted index name qualified with the tables' schema (for `DROP INDEX`).
    pub(crate) fn qualified_index(&self, name: &str) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote(schema), self.index(name)),
            None => self.index(name),
        }
    }
}

/// One migration: a version, what it does, and its DDL per dialect.
pub(crate) struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: fn(&Sql, Dialect) -> String,
}

/// Every migration, oldest first. Never edit one that shipped: add a new one.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
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
    },
    Migration {
        version: 2,
        description: "relay ownership by liveness; key order through failed rows",
        sql: |s, dialect| {
            let t = &s.outbox;
            let unpublished_key = s.index("outbox_unpublished_key");
            let old_pending_key = s.qualified_index("outbox_pending_key");
            let key_index = format!(
                "CREATE INDEX IF NOT EXISTS {unpublished_key} ON {t} (partition_key, seq) \
                 WHERE status IN ({PENDING}, {FAILED}) AND partition_key IS NOT NULL; \
                 DROP INDEX IF EXISTS {old_pending_key};"
            );
            match dialect {
                Dialect::Postgres => {
                    format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS locked_key INTEGER; {key_index}")
                }
                Dialect::Sqlite => format!(
                    "ALTER TABLE {t} ADD COLUMN locked_key INTEGER; {key_index} \
                     CREATE TABLE IF NOT EXISTS {} (id TEXT PRIMARY KEY, heartbeat_at INTEGER NOT NULL);",
                    s.relays
                ),
            }
        },
    },
    Migration {
        version: 3,
        description: "dead letters kept by a bus without durable queues of its own (the in-process bus)",
        sql: |s, dialect| {
            let bytes = match dialect {
                Dialect::Postgres => "BYTEA",
                Dialect::Sqlite => "BLOB",
            };
            format!(
                "CREATE TABLE IF NOT EXISTS {} (group_name TEXT NOT NULL, event_id TEXT NOT NULL, seq BIGINT, \
                 event_type TEXT NOT NULL, version BIGINT NOT NULL, occurred_at_ms BIGINT NOT NULL, \
                 correlation_id TEXT NOT NULL, causation_id TEXT, partition_key TEXT, source TEXT, traceparent TEXT, \
                 tracestate TEXT, payload {bytes} NOT NULL, last_error TEXT NOT NULL, cause TEXT NOT NULL, \
                 attempts BIGINT NOT NULL, failed_at_ms BIGINT NOT NULL, PRIMARY KEY (group_name, event_id));",
                s.dead_letters
            )
        },
    },
    Migration {
        version: 4,
        description: "outbox pages keep room for the relay's lease updates (fillfactor 80: HOT updates)",
        sql: |s, dialect| match dialect {
            // A claim's update (lease columns only, none indexed) stays on its page, so it writes no index entry,
            // if the page has room: new pages keep a fifth of their space for it.
            // (A lock that does not come within 10 s, an anti-wraparound vacuum say, fails the start-up with an
            // error instead of holding every starting instance.)
            Dialect::Postgres => format!(
                "SET LOCAL lock_timeout = '10s'; ALTER TABLE {} SET (fillfactor = 80); SET LOCAL lock_timeout = DEFAULT",
                s.outbox
            ),
            // SQLite has no such setting: the migration is recorded and does nothing.
            Dialect::Sqlite => "SELECT 1".to_owned(),
        },
    },
];

#[cfg(test)]
mod tests {
    use super::channel_name;

    #[test]
    fn notify_channels_fit_postgres_identifiers_and_stay_distinct() {
        assert_eq!(channel_name("shop_bus_outbox".into()), "shop_bus_outbox", "short names are kept as they are");
        let long = |schema: &str| channel_name(format!("{schema}_{}outbox", "p".repeat(40)));
        let (a, b) = (long("tenant_number_one"), long("tenant_number_two"));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b, "two long names that share a prefix get different channels");
        assert_eq!(a, long("tenant_number_one"), "the same name gives the same channel in every process");
    }
}
