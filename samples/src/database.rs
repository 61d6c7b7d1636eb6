//! Opening a service's database: PostgreSQL, or SQLite as we recommend it (WAL, a busy timeout so concurrent
//! writers wait for each other instead of failing).

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgPool, SqlitePool};

use crate::config::DatabaseUrl;

/// The database could not be opened. Names `DATABASE_URL`, never shows a password.
#[derive(Debug, thiserror::Error)]
#[error("DATABASE_URL: cannot open {database}: {source}")]
pub struct ConnectError {
    database: String,
    source: sqlx::Error,
}

/// Opens a PostgreSQL pool.
///
/// # Errors
/// The server does not answer or refuses the login.
pub async fn postgres(options: PgConnectOptions) -> Result<PgPool, ConnectError> {
    let database = DatabaseUrl::Postgres(options.clone()).describe();
    PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|source| ConnectError { database, source })
}

/// Opens (creating it if needed) a SQLite database.
///
/// # Errors
/// The file cannot be created or opened.
pub async fn sqlite(options: SqliteConnectOptions) -> Result<SqlitePool, ConnectError> {
    let database = DatabaseUrl::Sqlite(options.clone()).describe();
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(30));
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(|source| ConnectError { database, source })
}
