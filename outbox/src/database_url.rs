//! [`DatabaseUrl`]: a PostgreSQL or SQLite URL, parsed and checked before anything connects, that can be
//! described in logs and errors without its password.

use std::str::FromStr;

/// Where a service keeps its data: PostgreSQL or SQLite, chosen by the URL's scheme.
#[derive(Clone)]
pub enum DatabaseUrl {
    /// `postgres://…` or `postgresql://…`.
    Postgres(sqlx::postgres::PgConnectOptions),
    /// `sqlite://path/to/file.db`.
    Sqlite(sqlx::sqlite::SqliteConnectOptions),
}

impl DatabaseUrl {
    /// Parses `url`. The error says what is wrong without repeating the URL (it may hold a password); the caller
    /// names the setting it came from.
    ///
    /// # Errors
    /// An unsupported scheme or an unparsable URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme).unwrap_or_default();
        // sqlx's parse errors can quote the URL; never echo it (it may hold a password).
        match scheme {
            "postgres" | "postgresql" => sqlx::postgres::PgConnectOptions::from_str(url)
                .map(Self::Postgres)
                .map_err(|_| "not a valid PostgreSQL URL (postgres://user@host:port/db)".to_owned()),
            "sqlite" => sqlx::sqlite::SqliteConnectOptions::from_str(url)
                .map(Self::Sqlite)
                .map_err(|_| "not a valid SQLite URL (sqlite://path/to/file.db)".to_owned()),
            _ => Err("expected a postgres://… or sqlite://… URL".to_owned()),
        }
    }

    /// A description safe to log: the backend and where, never a password.
    pub fn describe(&self) -> String {
        match self {
            Self::Postgres(o) => format!(
                "PostgreSQL {}@{}:{}/{}",
                o.get_username(),
                o.get_host(),
                o.get_port(),
                o.get_database().unwrap_or("(default)")
            ),
            Self::Sqlite(o) => format!("SQLite {}", o.get_filename().display()),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}
