use std::path::PathBuf;

pub type StoreResult<T> = Result<T, StoreError>;

/// Store failures, each naming what was being done and where, never a password.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store URL '{0}': expected sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    #[error("SQLite store {} does not exist; run `herald init` or pass --store", path.display())]
    Missing { path: PathBuf },
    #[error("cannot open store {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot open store {url} for writing: {source}")]
    OpenWriter {
        url: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot watch {} for new events: {source}", path.display())]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("cannot migrate store {url}: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("store {url} is not migrated to this version of herald ({pending} migration(s) pending); run `herald migrate`")]
    NotMigrated { url: String, pending: usize },
    #[error("store query failed while {doing}: {source}")]
    Query {
        doing: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// On SQLite's dispatch connection (see `sqlite::writer`), which is not sqlx's.
    #[error("store query failed while {doing}: {source}")]
    Sqlite {
        doing: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store holds a value herald cannot read: {0}")]
    Corrupt(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("internal store invariant broken: {0}")]
    Invariant(String),
}

/// Attach what the store was doing to a database error.
pub(crate) trait QueryContext<T> {
    fn doing(self, doing: &'static str) -> StoreResult<T>;
}

impl<T> QueryContext<T> for Result<T, sqlx::Error> {
    fn doing(self, doing: &'static str) -> StoreResult<T> {
        self.map_err(|source| StoreError::Query { doing, source })
    }
}

impl<T> QueryContext<T> for Result<T, rusqlite::Error> {
    fn doing(self, doing: &'static str) -> StoreResult<T> {
        self.map_err(|source| StoreError::Sqlite { doing, source })
    }
}
